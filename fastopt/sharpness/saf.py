"""SAF: the trajectory loss of "Sharpness-Aware Training for Free" (Du et al., NeurIPS 2022), fused.

:class:`SAFLoss` keeps a per-example output bank and returns the trajectory term of one batch; the bank
gather, the softmax-KL term, its gradient and the bank scatter run in one kernel per backend
(``csrc/cpu/saf_kernels.cpp`` with OpenMP over rows, ``csrc/cuda/saf.cu`` and ``triton_kernels/saf.py`` one
block / program per row); the ``torch`` backend is :func:`fastopt.reference.saf.saf_reference`.
"""
import importlib
import numbers

import torch
from torch import Tensor, nn

from .. import _backend, _ops
from ..reference.saf import saf_reference, slots

__all__ = ["SAFLoss", "saf_pass"]

# The backends of the fused pass (its CAPABILITIES row).
_CAPS = _backend.CAPABILITIES["saf"]
BANK_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _triton_saf():
    _backend.triton_kernels()  # (a clear error when triton is missing)
    return importlib.import_module("fastopt.triton_kernels.saf")


def _launch(backend, logits, indices, bank, row_kl, grad, loss, loss_scale, read_slot, write_slot, active, inv_temp,
            grad_scale):
    """Run the fused pass on tensors already checked (see :func:`_saf_pass_kernel`); ``grad`` and ``loss``
    may be None.  The C++ CPU kernel also writes ``loss = loss_scale * sum(row_kl)`` when given; the CUDA
    and Triton kernels never do (the caller sums)."""
    b, c = logits.shape
    s, n, _ = bank.shape
    if backend == "triton":
        _triton_saf().saf_pass(logits, indices, bank, row_kl, grad, read_slot, write_slot, active, inv_temp,
                               grad_scale)
        return
    if backend == "cuda":
        args = (logits.data_ptr(), _backend.dtype_code(logits.dtype), indices.data_ptr(), bank.data_ptr(),
                _backend.dtype_code(bank.dtype), row_kl.data_ptr(), 0 if grad is None else grad.data_ptr(), b, n, c,
                s, int(read_slot), int(write_slot), bool(active), float(inv_temp), float(grad_scale))
        _ops._run_native("cuda", "saf", logits.device, args, "saf_pass_")
        return
    if backend != "cpu":
        raise _backend.BackendUnavailableError(f"fastopt::saf_pass_: no kernel backend {backend!r}")
    _backend.native().saf_cpu(
        logits.data_ptr(), _backend.dtype_code(logits.dtype), indices.data_ptr(), bank.data_ptr(),
        _backend.dtype_code(bank.dtype), row_kl.data_ptr(), 0 if grad is None else grad.data_ptr(), b, n, c, s,
        int(read_slot), int(write_slot), bool(active), float(inv_temp), float(grad_scale),
        0 if loss is None else loss.data_ptr(), float(loss_scale))


def _saf_pass_kernel(logits: Tensor, indices: Tensor, bank: Tensor, row_kl: Tensor, grad: Tensor, read_slot: int,
                     write_slot: int, active: bool, inv_temp: float, grad_scale: float, backend: str) -> None:
    """The fused SAF pass over contiguous ``logits`` (B, C) fp32 / bf16 / fp16 and int64 ``indices`` (B,),
    each in ``[0, N)``, on ``bank`` (S, N, C) fp32 / bf16 / fp16:

    - when ``active``: ``row_kl[i] = KL(softmax(bank[read_slot, idx_i] * inv_temp) || softmax(logits_i *
      inv_temp))`` (fp32 (B,)) and, when ``grad`` has B * C elements (else it is empty),
      ``grad[i] = grad_scale * (softmax(logits_i * inv_temp) - softmax(bank[read_slot, idx_i] * inv_temp))``
      (fp32 (B, C));
    - always: ``bank[write_slot, idx_i] = logits_i`` (rounded to nearest even) for the last i of each
      index (``read_slot != write_slot``: the rows read are never the rows written).

    Every tensor is checked (dtype, device, layout, sizes; the indices' range: on the host) before the
    kernel runs.  ``backend``: 'cpu', 'cuda' or 'triton'.
    """
    b, c = logits.shape
    s, n, bc = bank.shape
    if bc != c or indices.shape != (b,) or not (0 <= read_slot < s and 0 <= write_slot < s) \
            or (active and read_slot == write_slot):
        raise ValueError(f"fastopt::saf_pass_: logits {tuple(logits.shape)}, indices {tuple(indices.shape)}, "
                         f"bank {tuple(bank.shape)}, slots ({read_slot}, {write_slot}) do not agree")
    if not inv_temp > 0.0:
        raise ValueError(f"fastopt::saf_pass_: inv_temp must be > 0, got {inv_temp}")
    with_grad = active and grad.numel() > 0
    call = _ops._Call("saf_pass_", logits.device)
    _ops._add_contiguous(call, "logits", logits, logits.dtype, b * c)
    _ops._add_contiguous(call, "indices", indices, torch.int64, b)
    _ops._add_contiguous(call, "bank", bank, bank.dtype, s * n * c)
    _ops._add_contiguous(call, "row_kl", row_kl, torch.float32, b)
    if with_grad:
        _ops._add_contiguous(call, "grad", grad, torch.float32, b * c)
    for name, t, ok in (("logits", logits, _backend.KERNEL_DTYPES), ("bank", bank, BANK_DTYPES)):
        if t.dtype not in ok:
            raise ValueError(f"fastopt::saf_pass_: {name} must be one of {ok}, got {t.dtype}")
    if b * c == 0:
        return
    call.check()
    if b and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(indices)
        if int(lo) < 0 or int(hi) >= n:
            raise ValueError(f"fastopt::saf_pass_: indices must be in [0, {n}), got values in [{int(lo)}, {int(hi)}]")
    _launch(backend, logits, indices, bank, row_kl, grad if with_grad else None, None, 0.0, read_slot, write_slot,
            active, inv_temp, grad_scale)


saf_pass_, saf_pass = _ops._kernel_op("saf_pass_", mutates=("bank", "row_kl", "grad"))(_saf_pass_kernel)


class _SAFFunction(torch.autograd.Function):
    """The fused forward; the backward scales the gradient the forward kernel computed (fp32 (B, C),
    the only tensor saved: no copy of the bank)."""

    @staticmethod
    def forward(ctx, logits, indices, bank, read_slot, write_slot, temperature, weight, backend):
        b, c = logits.shape
        dev = logits.device
        needs_grad = ctx.needs_input_grad[0]
        ctx.logits_dtype = logits.dtype
        row_kl = torch.empty(b, dtype=torch.float32, device=dev)
        grad = torch.empty((b, c) if needs_grad else (0,), dtype=torch.float32, device=dev)
        # d/dz [weight T^2 / B sum_i KL_i] = weight T / B (q - p)
        coef = weight * temperature * temperature / max(b, 1)
        gs, inv_t = weight * temperature / max(b, 1), 1.0 / temperature
        if needs_grad:
            ctx.save_for_backward(grad)
        if torch.compiler.is_compiling():
            saf_pass(logits, indices, bank, row_kl, grad, read_slot, write_slot, True, inv_t, gs, backend)
            return row_kl.sum() * coef
        if b * c == 0:
            return torch.zeros((), dtype=torch.float32, device=dev)
        loss = torch.empty((), dtype=torch.float32, device=dev) if backend == "cpu" else None
        _launch(backend, logits, indices, bank, row_kl, grad if needs_grad else None, loss, coef, read_slot,
                write_slot, True, inv_t, gs)
        return loss if loss is not None else row_kl.sum() * coef

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        g = grad * grad_out
        return (g if g.dtype == ctx.logits_dtype else g.to(ctx.logits_dtype)), None, None, None, None, None, None, None


def _owns_extent(t):
    """Whether ``t``'s storage holds its whole extent (a storage resized after the tensor was made may not)."""
    return (t.storage_offset() + t.numel()) * t.element_size() <= t.untyped_storage().nbytes()


def _real(value, name, low, low_ok):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"SAFLoss: {name} must be a real number, got {value!r}")
    v = float(value)
    if not (v == v and abs(v) != float("inf")) or v < low or (v == low and not low_ok):
        raise ValueError(f"SAFLoss: {name} must be a finite number {'>=' if low_ok else '>'} {low:g}, got {value!r}")
    return v


def _int(value, name, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"SAFLoss: {name} must be an integer, got {value!r}")
    if int(value) < low:
        raise ValueError(f"SAFLoss: {name} must be >= {low}, got {value!r}")
    return int(value)


class SAFLoss(nn.Module):
    """The SAF trajectory loss (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022) with its
    per-example output bank, as in the official code (github.com/AngusDujw/SAF, ``SAF_train.py``)::

        saf = fastopt.sharpness.SAFLoss(len(train_set), num_classes, device="cuda")
        for epoch in range(epochs):
            for idx, x, y in loader:                    # the loader yields each example's index
                logits = model(x)
                loss = F.cross_entropy(logits, y) + saf(logits, idx, epoch)
                loss.backward(); opt.step(); opt.zero_grad()

    ``saf(logits, indices, epoch)`` with logits (B, num_classes) and indices (B,) int64 (int32 is taken
    too) on the bank's device:

    - returns ``weight * temperature**2 * mean_i KL(softmax(old_i / T) || softmax(logits_i / T))``, where
      ``old_i`` is what example ``indices[i]`` output ``epochs_ago`` epochs earlier (the bank's slot
      ``(epoch - epochs_ago) % (epochs_ago + 1)``; zeros, i.e. a uniform target, if it was never written).
      This is the official ``F.kl_div(softmax(out / T).log(), softmax(old / T), reduction="none").sum(-1)
      .mean() * T**2 * reinforce``: KL(past || current), the past outputs a constant (no gradient), the
      temperature on both sides, a T^2 factor, the sum over classes and the mean over the batch; a 0-dim
      fp32 tensor (fp64 for fp64 logits on the torch backend).  Its gradient w.r.t. the logits is
      ``weight * T / B * (softmax(logits / T) - softmax(old / T))``.
    - is on for ``start_epoch < epoch < end_epoch`` (the official ``epoch > kl_start_epoch and epoch <
      kl_end_epoch``: with ``start_epoch=5`` the first epoch with the term is epoch 6); otherwise it
      returns a zero that needs no gradient.
    - always writes ``logits.detach()`` (rounded to ``bank_dtype``) into the bank's slot
      ``epoch % (epochs_ago + 1)`` at ``indices`` (before the warm-up too, as the official code).  An index
      repeated in one batch is written by its last occurrence (deterministic on every backend; its
      occurrences all read the same past outputs).

    Defaults: ``weight=0.3`` (``--reinforce``), ``temperature=5`` (``--temperature``), ``start_epoch=5``
    (``--kl_start_epoch``), ``epochs_ago=2`` (``--minus_epoch``): the SAF command of the official
    ``run.sh`` and its README's recommendations (ImageNet, ResNet-50; the README gives lambda 0.3 / 0.8
    and E~ 2 / 3; the argparse defaults are reinforce 0.16, minus_epoch 3).

    The bank is the buffer ``bank`` of shape (epochs_ago + 1, num_examples, num_classes) in ``bank_dtype``
    (fp32, bf16 or fp16; the math is fp32 whatever it is), saved and loaded with ``state_dict``.

    ``backend``: ``auto`` runs the fused C++ kernel on CPU tensors and the CUDA kernel (``csrc/cuda/saf.cu``;
    the Triton kernel when fastopt._C has no CUDA part) on CUDA tensors, ``torch`` the plain formula
    (:func:`fastopt.reference.saf.saf_reference`, autograd through torch ops).
    The fused pass is one kernel per call (gather, KL, gradient, scatter); the backward multiplies the
    fp32 gradient it saved (B x C) by the incoming scalar.  Bad arguments raise ``TypeError`` /
    ``ValueError`` naming them before anything is read or written; on CUDA tensors the range check of
    ``indices`` reads their minimum and maximum on the host (one synchronization per call).
    """

    def __init__(self, num_examples, num_classes, *, weight=0.3, temperature=5.0, start_epoch=5, epochs_ago=2,
                 end_epoch=None, bank_dtype=torch.float32, device=None, backend="auto"):
        super().__init__()
        self.num_examples = _int(num_examples, "num_examples", 1)
        self.num_classes = _int(num_classes, "num_classes", 1)
        self.weight = _real(weight, "weight", 0.0, True)
        self.temperature = _real(temperature, "temperature", 0.0, False)
        self.start_epoch = _int(start_epoch, "start_epoch", -1)
        self.epochs_ago = _int(epochs_ago, "epochs_ago", 1)
        self.end_epoch = None if end_epoch is None else _int(end_epoch, "end_epoch", 0)
        if bank_dtype not in BANK_DTYPES:
            raise TypeError(f"SAFLoss: bank_dtype must be one of {BANK_DTYPES}, got {bank_dtype!r}")
        _backend.check_backend_name(backend)
        self.backend = backend
        self.register_buffer("bank", torch.zeros(self.epochs_ago + 1, self.num_examples, self.num_classes,
                                                 dtype=bank_dtype, device=device))

    def extra_repr(self):
        return (f"num_examples={self.num_examples}, num_classes={self.num_classes}, weight={self.weight}, "
                f"temperature={self.temperature}, start_epoch={self.start_epoch}, epochs_ago={self.epochs_ago}, "
                f"end_epoch={self.end_epoch}, bank_dtype={self.bank.dtype}")

    def is_active(self, epoch):
        """Whether the term is on at ``epoch``: ``start_epoch < epoch < end_epoch``."""
        return epoch > self.start_epoch and (self.end_epoch is None or epoch < self.end_epoch)

    def slots(self, epoch):
        """``(read, write)``: the bank slots epoch ``epoch`` reads its past outputs from and writes to."""
        return slots(epoch, self.epochs_ago)

    def _check(self, logits, indices, epoch):
        if not isinstance(logits, Tensor):
            raise TypeError(f"SAFLoss: logits must be a tensor, got {type(logits).__name__}")
        if not isinstance(indices, Tensor):
            raise TypeError(f"SAFLoss: indices must be a tensor, got {type(indices).__name__}")
        epoch = _int(epoch, "epoch", 0)
        if logits.dim() != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"SAFLoss: logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}")
        if logits.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(f"SAFLoss: logits must be fp32, bf16, fp16 or fp64, got {logits.dtype}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"SAFLoss: indices must be int64 (or int32), got {indices.dtype}")
        if indices.shape != (logits.shape[0],):
            raise ValueError(f"SAFLoss: indices must have shape ({logits.shape[0]},) (one per row of logits), got "
                             f"{tuple(indices.shape)}")
        dev = self.bank.device
        if logits.device != dev or indices.device != dev:
            raise ValueError(f"SAFLoss: logits ({logits.device}) and indices ({indices.device}) must be on the "
                             f"bank's device ({dev})")
        if logits.layout != torch.strided or indices.layout != torch.strided:
            raise ValueError("SAFLoss: logits and indices must be strided (dense) tensors")
        return epoch

    def _check_range(self, indices):
        """``indices`` in ``[0, num_examples)`` (read on the host: one synchronization on CUDA)."""
        if indices.numel():
            lo, hi = torch.aminmax(indices)
            lo, hi = int(lo), int(hi)
            if lo < 0 or hi >= self.num_examples:
                raise ValueError(f"SAFLoss: indices must be in [0, {self.num_examples}), got values in [{lo}, {hi}]")

    def _check_bank(self):
        bank = self.bank
        shape = (self.epochs_ago + 1, self.num_examples, self.num_classes)
        if not isinstance(bank, Tensor) or tuple(bank.shape) != shape or bank.dtype not in BANK_DTYPES \
                or not bank.is_contiguous() or bank.layout != torch.strided or not _owns_extent(bank):
            raise ValueError(f"SAFLoss: the bank must be a contiguous fp32 / bf16 / fp16 tensor of shape {shape}, got "
                             f"{type(bank).__name__} {getattr(bank, 'dtype', '')} {tuple(getattr(bank, 'shape', ()))}")

    def _resolve(self, device, logits_dtype):
        key = (device, logits_dtype, self.bank.dtype, self.backend)
        cache = self.__dict__.setdefault("_resolved", {})
        backend = cache.get(key)
        if backend is None:
            reason = "fp64 logits" if logits_dtype == torch.float64 else None
            backend = cache[key] = _backend.resolve(self.backend, device, self.bank.dtype, op="saf", reason=reason,
                                                    name="SAFLoss")
        return backend

    def forward(self, logits, indices, epoch):
        """The SAF term of this batch (see the class); writes the batch's outputs into the bank."""
        epoch = self._check(logits, indices, epoch)
        backend = self._resolve(logits.device, logits.dtype)
        if backend != "cpu" or torch.compiler.is_compiling():
            self._check_range(indices)  # (the C++ entry point checks the range itself before anything)
        indices = indices.to(torch.int64).contiguous()
        active = self.is_active(epoch)
        read, write = self.slots(epoch)
        if backend == "torch":
            return saf_reference(logits, indices, self.bank, epoch, weight=self.weight, temperature=self.temperature,
                                 epochs_ago=self.epochs_ago, active=active)
        self._check_bank()
        logits_c = logits.contiguous()
        if not (_owns_extent(logits_c) and _owns_extent(indices)):
            raise ValueError("SAFLoss: the storage of logits or indices is smaller than the tensor itself")
        try:
            if not active:
                row_kl = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
                if torch.compiler.is_compiling():
                    empty = torch.empty(0, dtype=torch.float32, device=logits.device)
                    saf_pass(logits_c.detach(), indices, self.bank, row_kl, empty, read, write, False, 1.0, 0.0,
                             backend)
                elif logits.numel():
                    _launch(backend, logits_c.detach(), indices, self.bank, row_kl, None, None, 0.0, read, write, False,
                            1.0, 0.0)
                return torch.zeros((), dtype=torch.float32, device=logits.device)
            return _SAFFunction.apply(logits_c, indices, self.bank, read, write, self.temperature, self.weight, backend)
        except ValueError as e:
            if "index out of range" in str(e):  # the C++ check (before anything was read or written)
                self._check_range(indices)
            raise
