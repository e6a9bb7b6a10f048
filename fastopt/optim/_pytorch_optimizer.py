"""What the classes that mirror pytorch_optimizer (4.1.0) share: argument checks with upstream's
messages, docstring pieces, their base class, RAdam rectification (AdaBelief, diffGrad), and the
kernel passes of pytorch_optimizer's per-tensor gradient options on the fused backends (Lion, Adan,
AdamP): gradient centralization (``use_gc``) and the cautious mask (``cautious``).  Both reuse the
generic op's reduce pass (``csrc/include/fastopt/elementwise.h``): no launcher of their own.

LAMB (trust ratio), SGD-SaI (g-SNR at the first step), AdamP and SGDP (projection) step in two kernel
calls per bucket -- a reduce pass (phase 1: moments and per-row sums) and the update (phase 0) -- with
a few torch ops on the small sums in between, on the device (no host sync).
"""

import torch

from .._opspec import OPS, native_args
from ..lowbit import state as lowbit_state
from . import functional as F
from .base import ElementwiseOptimizer
from .functional import elementwise_unchecked


def check_betas(betas, name="betas", count=2):
    if len(betas) != count:
        raise ValueError(f"Invalid {name}: expected {count} values, got {betas!r}")
    for i, b in enumerate(betas):
        F.check_hyper(f"beta parameter at index {i}", b, high=1.0, high_open=True)


def check_unsupported(owner, group, **defaults):
    """Raise ValueError for an upstream option that fastopt does not implement when ``group`` sets it
    away from its (upstream) default.  ``defaults``: name -> (default, why)."""
    for key, (default, why) in defaults.items():
        value = group.get(key, default)
        if value != default:
            raise ValueError(f"{owner}: {key}={value!r} is not supported ({why}); leave it at its default "
                             f"{default!r}")


ADANORM_WHY = ("AdaNorm rescales each gradient by a running average of its norm: a per-tensor reduction and "
               "a state of its own that fastopt does not implement")


def check_adanorm(owner, group):
    check_unsupported(owner, group, adanorm=(False, ADANORM_WHY))


def gc_rows(params):
    """Rows of gradient centralization per tensor: ``p.shape[0]`` for 2+-dim tensors (upstream's
    ``centralize_gradient``: the mean over every dim but the first), else 1 (not centralized)."""
    return [p.shape[0] if p.dim() > 1 and p.numel() > 0 else 1 for p in params]


def _row_layout(opt, params, rows, device):
    """(positions of the centralized rows among all rows, their row lengths (fp32), tensor id per row),
    cached per bucket layout on ``opt``."""
    key = ("gc", tuple(tuple(p.shape) for p in params), tuple(rows), str(device))
    cache = opt.__dict__.setdefault("_gc_layouts", {})
    hit = cache.get(key)
    if hit is None:
        pos, lens, start = [], [], 0
        for p, r in zip(params, rows):
            if p.dim() > 1 and p.numel() > 0:
                pos.extend(range(start, start + r))
                lens.extend([p.numel() // r] * r)
            start += r
        tid = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(rows))
        hit = (torch.tensor(pos, dtype=torch.int64).to(device), torch.tensor(lens, dtype=torch.float32).to(device),
               tid.to(device), torch.tensor([float(p.numel()) for p in params], dtype=torch.float32).to(device))
        if len(cache) > 32:
            cache.clear()
        cache[key] = hit
    return hit


def gradient_row_means(opt, params, grads, rows, *, maximize, grad_scale, found_inf, backend, device):
    """fp32 ``[sum(rows)]``: the mean of each row of the (signed, unscaled) gradients over every dim but
    the first for 2+-dim tensors, 0 for the others -- the ``grad_rowsum`` op's reduce pass, one kernel
    call for the whole bucket, then a division on the device (no host sync)."""
    mean = torch.zeros(sum(rows), dtype=torch.float32, device=device)
    idx = [i for i, p in enumerate(params) if p.dim() > 1 and p.numel() > 0]
    if not idx:
        return mean
    pos, lens, _, _ = _row_layout(opt, params, rows, device)
    sub_rows = [rows[i] for i in idx]
    sums = torch.zeros((sum(sub_rows), 4), dtype=torch.float32, device=device)
    elementwise_unchecked("grad_rowsum", [params[i] for i in idx], [grads[i] for i in idx], [], [], (), 0, lr=0.0,
                          maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, backend=backend,
                          device=device, phase=1, rows=sub_rows, reduce_out=sums)
    mean[pos] = sums[:, 0] / lens
    return mean


class GradOptionsMixin:
    """``use_gc`` (and, where the op has it, ``cautious``) on the kernel backends: the row means come
    from one ``grad_rowsum`` reduce pass and reach the op as row coefficient ``rc[0]``.  The op's
    ``_run`` gets ``rows`` / ``row_coef``; low-bit states and the fused sparse epilogue run only
    without these options (the torch backend runs everything)."""

    def _grad_options(self, group):
        return bool(group.get("use_gc")) or bool(group.get("cautious"))

    def _fused_sparse_ok(self, group, params, states, backend):
        return (backend != "torch" and not self._grad_options(group)
                and not any("state_format" in s or "master_param" in s for s in states))

    def _check_bucket(self, group, params, backend):
        super()._check_bucket(group, params, backend)
        if backend == "torch" or not self._grad_options(group):
            return
        bits, size = group.get("state_bits"), group.get("min_quant_size", 4096)
        for p in params:
            state = self.state.get(p) or {}
            if "state_format" in state or (not state and lowbit_state.is_quantizable(p, bits, size)):
                on = [k for k in ("use_gc", "cautious") if group.get(k)]
                raise ValueError(f"{type(self).__name__}: {' and '.join(on)} with low-bit states (state_bits="
                                 f"{bits!r}) run on backend='torch' only, not {backend!r}")

    def _centralize(self, group, params, grads, backend, grad_scale, found_inf):
        """(rows, row_coef [sum(rows), 4] fp32 with the row means in column 0)."""
        device = params[0].device
        rows = gc_rows(params) if group.get("use_gc") else [1] * len(params)
        row = torch.zeros((sum(rows), 4), dtype=torch.float32, device=device)
        if group.get("use_gc"):
            row[:, 0] = gradient_row_means(self, params, grads, rows, maximize=group["maximize"],
                                           grad_scale=grad_scale, found_inf=found_inf, backend=backend,
                                           device=device)
        return rows, row

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf, phase=0, rows=None,
             row_coef=None, reduce_out=None, sparse=None):
        if backend == "torch" or not self._grad_options(group):
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf, phase=phase, rows=rows,
                                row_coef=row_coef, reduce_out=reduce_out, sparse=sparse)
        rows, row = self._centralize(group, params, grads, backend, grad_scale, found_inf)
        if group.get("cautious"):
            # the cautious mask's count per tensor (a reduce pass that writes nothing), then the scale
            # fp32(numel) / (count + 1) as upstream's apply_cautious, in column 1 of every row
            device = params[0].device
            hyper, flags = self._native_hyper(group)
            lists = [s[name] for name in self._state_names(group) for s in states]
            sums = torch.zeros((sum(rows), 4), dtype=torch.float32, device=device)
            elementwise_unchecked(self._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags,
                                  lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale,
                                  found_inf=found_inf, backend=backend, device=device, phase=1, rows=rows,
                                  row_coef=row, reduce_out=sums)
            _, _, tid, numels = _row_layout(self, params, rows, device)
            count = torch.zeros(len(params), dtype=torch.float32, device=device).index_add_(0, tid, sums[:, 0])
            row[:, 1] = (numels / (count + 1.0))[tid]
        return super()._run(group, params, grads, states, backend, grad_scale, found_inf, rows=rows, row_coef=row)


_COMMON_DOC = """
        stochastic_rounding, master_weights, seed: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    ``foreach`` is accepted and ignored (every backend is fused).  Common differences from
    pytorch_optimizer: math in fp32 whatever the storage dtype; ``step`` per parameter (upstream: per
    group); gradients are never written to (upstream negates ``p.grad`` for ``maximize``)."""

_LOWBIT_DOC = """
        state_bits, min_quant_size: low-bit states (see :mod:`fastopt.lowbit`)."""


class _ZooOptimizer(ElementwiseOptimizer):
    """Shared checks of the zoo's classes."""

    def __init__(self, params, defaults):
        self._check_group(defaults)
        super().__init__(params, defaults)

    def _check_common(self, group, nbetas=2):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"], count=nbetas)
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])


def constructor_defaults(arguments):
    """A constructor's param-group defaults: its arguments (``locals()`` taken first thing in
    ``__init__``) but ``self`` and ``params``, with ``betas`` as a tuple."""
    defaults = {k: v for k, v in arguments.items() if k not in ("self", "params", "__class__")}
    if "betas" in defaults:
        defaults["betas"] = tuple(defaults["betas"])
    return defaults


class _RectifiedAdam(_ZooOptimizer):
    """AdaBelief / diffGrad: RAdam rectification, ams_bound, adam_debias as pytorch_optimizer."""

    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "rectify", "n_sma_threshold",
                   "degenerated_to_sgd", "ams_bound", "eps", "adam_debias")


    def _check_group(self, group):
        self._check_common(group)
        if group["rectify"] and group["n_sma_threshold"] < 4:
            raise ValueError(f"Invalid n_sma_threshold: {group['n_sma_threshold']} (rectify needs >= 4: the "
                             "rectification term is undefined for 2 < n_sma < 4)")
        check_adanorm(type(self).__name__, group)

    def _state_names(self, group):
        return OPS[self._op_name(group)].states

    def _op_name(self, group):
        return self.OP + ("_ams" if group["ams_bound"] else "")

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self._op_name(group), group, beta1=b1, beta2=b2, weight_decay=group["weight_decay"],
                           eps=group["eps"], n_sma_threshold=group["n_sma_threshold"])


_RECTIFIED_ARGS = """
    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled ``p (1 - wd (fixed_decay ? 1 : lr))`` or L2.
        rectify, n_sma_threshold, degenerated_to_sgd: RAdam rectification (below the threshold a
            momentum-SGD step, or none without ``degenerated_to_sgd``).
        ams_bound: use the running maximum of the second moment.
        foreach: accepted and ignored.
        eps: as upstream.
        maximize: maximize the objective.
        adam_debias: do not divide the step size by ``1 - b1^t``.
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented)."""


def _lr64(lr, device):
    """``lr`` (a float or a one-element tensor of any shape) as an fp64 0-dim tensor on ``device`` (a float:
    filled on the device, no host-to-device copy)."""
    if not isinstance(lr, torch.Tensor):
        return torch.full((), float(lr), dtype=torch.float64, device=device)
    return torch.as_tensor(lr, dtype=torch.float64).reshape(()).to(device)
