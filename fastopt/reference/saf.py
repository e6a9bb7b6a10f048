"""Reference SAF trajectory loss (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022).

The executable specification of :class:`fastopt.sharpness.SAFLoss` and of its fused kernels
(``csrc/cpu/saf_kernels.cpp``, ``triton_kernels/saf.py``); the ``torch`` backend runs it.

It follows the official code (github.com/AngusDujw/SAF, ``SAF_train.py``), whose per-example output
bank holds ``epochs_ago + 1`` epochs of outputs (``train_logits[n, minus_epoch + 1, C]``, a ring over
epochs).  At epoch ``e`` a batch

- writes its outputs (detached) into slot ``e % S`` (``S = epochs_ago + 1``) at its examples' indices,
- reads the outputs its examples got ``epochs_ago`` epochs earlier from slot ``(e - epochs_ago) % S``,
- and, when the loss is on, adds ``weight * tau^2 * mean_i KL(p_i || q_i)`` with
  ``p_i = softmax(old_i / tau)`` (the past outputs, a constant) and ``q_i = softmax(logits_i / tau)``:
  ``F.kl_div(log(softmax(out / T)), softmax(old / T), reduction="none").sum(-1).mean() * T**2 * reinforce``.

Differences from the official code, all deliberate: the bank is a tensor on any device in fp32 / bf16 /
fp16 (theirs: a NumPy array in the host memory); ``log_softmax`` instead of ``log(softmax)`` (the same
function, without the underflow to ``log 0``); the math is fp64 for fp64 logits, else fp32; and an
index that appears several times in one batch is written by its last occurrence (NumPy's assignment
in the official code does this in practice; here it is specified and deterministic on every backend).
"""
import torch
import torch.nn.functional as F


def slots(epoch, epochs_ago):
    """``(read, write)``: the bank slots (of ``epochs_ago + 1``) that epoch ``epoch`` reads its past
    outputs from and writes its outputs to."""
    s = epochs_ago + 1
    return (epoch - epochs_ago) % s, epoch % s


def last_occurrence(indices):
    """Bool (B,): True where ``indices[i]`` does not occur again later in the batch (the row that writes)."""
    b = indices.numel()
    if b <= 1:
        return torch.ones(b, dtype=torch.bool, device=indices.device)
    order = torch.argsort(indices, stable=True)
    s = indices[order]
    last_sorted = torch.ones(b, dtype=torch.bool, device=indices.device)
    last_sorted[:-1] = s[1:] != s[:-1]
    out = torch.empty_like(last_sorted)
    out[order] = last_sorted
    return out


def saf_kl_rows(logits, old, temperature):
    """Per-row ``KL(softmax(old / T) || softmax(logits / T))`` (B,) in the logits' precision (at least fp32)."""
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    log_q = F.log_softmax(logits.to(dt) / temperature, dim=-1)
    p = F.softmax(old.to(dt) / temperature, dim=-1)
    return F.kl_div(log_q, p, reduction="none").sum(-1)


def saf_reference(logits, indices, bank, epoch, *, weight, temperature, epochs_ago, active):
    """The SAF term of one batch, with the bank update in place.

    logits (B, C) float, the model's outputs (gradients flow through them); indices (B,) int64, each
    example's position in the training set; bank (epochs_ago + 1, N, C) fp32 / bf16 / fp16.  Reads
    the past outputs first, then writes ``logits.detach()`` (rounded to the bank's dtype) into the
    write slot (the last occurrence of a repeated index wins).  Returns
    ``weight * T^2 * mean_i KL(softmax(old_i / T) || softmax(logits_i / T))`` (a 0-dim tensor of
    fp32, fp64 for fp64 logits) when ``active``, else a zero that does not require grad.
    """
    read, write = slots(epoch, epochs_ago)
    dt = torch.float64 if logits.dtype == torch.float64 else torch.float32
    old = bank[read].index_select(0, indices) if active else None
    keep = last_occurrence(indices)
    with torch.no_grad():
        bank[write].index_copy_(0, indices[keep], logits.detach()[keep].to(bank.dtype))
    if not active or logits.shape[0] == 0:
        return torch.zeros((), dtype=dt, device=logits.device)
    kl = saf_kl_rows(logits, old, temperature)
    return kl.mean() * (float(temperature) ** 2 * float(weight))
