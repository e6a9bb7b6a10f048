"""WTA-CRS linear layers: Winner-Take-All Column-Row Sampling (Liu et al., "Winner-Take-All Column Row
Sampling for Memory Efficient Adaptation of Language Model", NeurIPS 2023).

:class:`WTACRSLinear` is ``nn.Linear`` whose backward keeps, for the weight gradient, only ``k = budget *
n`` of the ``n`` rows of its (flattened) input: the rows of largest ``||x_i|| * ||dy_i||`` ("winners",
weight 1) and rows sampled with replacement from the rest, reweighted for an unbiased estimate (the
estimator: :mod:`fastopt.reference.wtacrs`).  The forward output, the input gradient and the bias
gradient are exact.

The row pass is one kernel per backend (``csrc/cpu/wtacrs_kernels.cpp`` with OpenMP over rows;
``triton_kernels/wtacrs.py`` on CUDA tensors; the ``torch`` backend is
:func:`fastopt.reference.wtacrs.rows_reference`): in the forward it computes the row scores
``||x_i|| * g_i`` and then copies the kept rows, scaled by their weights, into the compact buffer that
is saved; in the backward one pass over ``dy`` computes the norms ``||dy_i||`` (kept for the next
forward: the output-gradient norms of the previous step, by row position) and writes the kept rows of
``dy`` next to each other, and the weight-gradient GEMM multiplies the two compact buffers
(``dW = dy[idx]^T @ x_saved``): nothing is expanded back to ``n`` rows.
"""
import importlib
import numbers
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _backend, _ops
from ..reference.wtacrs import (DEFAULT_BUDGET, MIN_ROWS, num_rows, probabilities, rows_reference,
                                select_rows)

__all__ = ["WTACRSLinear", "convert_linear", "set_example_ids", "wtacrs_rows"]

_OP = "wtacrs"


def _triton_wtacrs():
    _backend.triton_kernels()  # (a clear error when triton is missing)
    return importlib.import_module("fastopt.triton_kernels.wtacrs")


def _wtacrs_rows_kernel(src: Tensor, pos: Optional[Tensor], weight: Optional[Tensor], out: Optional[Tensor],
                        gnorm: Optional[Tensor], norms: Optional[Tensor], backend: str) -> None:
    """The fused row pass over a contiguous ``src`` (R, C) fp32 / bf16 / fp16 (spec:
    :func:`fastopt.reference.wtacrs.rows_reference`):

    - ``norms`` fp32 (R,) (or None): ``norms[i] = ||src_i|| * gnorm[i]`` (``gnorm`` fp32 (R,) or None: 1);
    - ``out`` (K, C) in ``src``'s dtype (or None) with ``pos`` int64 (R,) each in ``[-1, K)``:
      ``out[pos[i]] = src_i * weight[pos[i]]`` for every ``pos[i] >= 0`` (``weight`` fp32 (K,) or None: 1);
      rows of ``out`` that no ``pos`` names are left as they are.

    Every tensor is checked (dtype, device, layout, sizes; ``pos``'s range on the host) before the kernel
    runs.  ``backend``: 'cpu', 'triton' or 'torch'.
    """
    if src.dim() != 2:
        raise ValueError(f"fastopt::wtacrs_rows_: src must be 2-D (rows, cols), got {tuple(src.shape)}")
    r, c = src.shape
    if src.dtype not in _backend.KERNEL_DTYPES:
        raise ValueError(f"fastopt::wtacrs_rows_: src must be one of {_backend.KERNEL_DTYPES}, got {src.dtype}")
    if (pos is None) != (out is None):
        raise ValueError("fastopt::wtacrs_rows_: pos and out go together")
    call = _ops._Call("wtacrs_rows_", src.device)
    _ops._add_contiguous(call, "src", src, src.dtype, r * c)
    k = 0
    if out is not None:
        if out.dim() != 2 or out.shape[1] != c:
            raise ValueError(f"fastopt::wtacrs_rows_: out must be (K, {c}), got {tuple(out.shape)}")
        k = out.shape[0]
        _ops._add_contiguous(call, "out", out, src.dtype, k * c)
        _ops._add_contiguous(call, "pos", pos, torch.int64, r)
        if weight is not None:
            _ops._add_contiguous(call, "weight", weight, torch.float32, k)
    if gnorm is not None:
        _ops._add_contiguous(call, "gnorm", gnorm, torch.float32, r)
    if norms is not None:
        _ops._add_contiguous(call, "norms", norms, torch.float32, r)
    if r == 0:
        return
    call.check()
    if pos is not None and not torch.compiler.is_compiling():
        lo, hi = torch.aminmax(pos)
        if int(lo) < -1 or int(hi) >= k:
            raise ValueError(f"fastopt::wtacrs_rows_: pos must be in [-1, {k}), got values in [{int(lo)}, {int(hi)}]")
    if backend == "torch":
        o, s = rows_reference(src, pos, weight if weight is not None else src.new_ones(k, dtype=torch.float32),
                              gnorm, norms is not None)
        if out is not None:
            sel = pos[pos >= 0]
            out[sel] = o[sel]
        if norms is not None:
            norms.copy_(s)
    elif backend == "triton":
        _triton_wtacrs().wtacrs_rows(src, pos, weight, out, gnorm, norms)
    elif backend == "cpu":
        _backend.native().wtacrs_rows_cpu(
            src.data_ptr(), _backend.dtype_code(src.dtype), r, c, 0 if pos is None else pos.data_ptr(),
            0 if weight is None else weight.data_ptr(), 0 if out is None else out.data_ptr(), k,
            0 if gnorm is None else gnorm.data_ptr(), 0 if norms is None else norms.data_ptr())
    else:
        raise _backend.BackendUnavailableError(f"fastopt::wtacrs_rows_: no kernel backend {backend!r}")


wtacrs_rows_, _wtacrs_rows_call = _ops._kernel_op("wtacrs_rows_", mutates=("out", "norms"))(_wtacrs_rows_kernel)


def wtacrs_rows(src: Tensor, pos: Optional[Tensor] = None, weight: Optional[Tensor] = None,
                out: Optional[Tensor] = None, gnorm: Optional[Tensor] = None, norms: Optional[Tensor] = None, *,
                backend: str = "auto") -> None:
    """The fused WTA-CRS row pass (in place on ``out`` and ``norms``; see ``fastopt::wtacrs_rows_``):
    ``norms[i] = ||src_i|| * gnorm[i]`` and ``out[pos[i]] = src_i * weight[pos[i]]`` for ``pos[i] >= 0``.
    ``backend``: 'auto' (C++ for CPU tensors, Triton for CUDA tensors), 'cpu', 'triton' or 'torch'."""
    if not isinstance(src, Tensor):
        raise TypeError(f"wtacrs_rows: src must be a tensor, got {type(src).__name__}")
    b = _backend.resolve(backend, src.device, src.dtype, op=_OP, name="wtacrs_rows")
    _wtacrs_rows_call(src, pos, weight, out, gnorm, norms, b)


class _GradNormCache:
    """The output-gradient row norms the next forward samples with.

    ``mode`` 'previous': those of the last backward through the layer (fp32 (n,)), by row position.
    ``mode`` 'example': a table of them per training example and position (fp32 (examples, n / B)), as the
    official code's cache: the forward reads the rows of the batch's examples (``ids``, (B,)), the
    backward writes them; a batch with an example never seen (or another row count) samples by
    ``||x_i||`` alone.  ``mode`` 'none': never any (``||x_i||`` alone).
    """

    __slots__ = ("mode", "norms", "table", "seen", "ids")

    def __init__(self, mode):
        self.mode = mode
        self.norms = None
        self.table = None
        self.seen = None
        self.ids = None

    def lookup(self, n, device):
        """``(g, token)``: the norms for a forward of ``n`` rows on ``device`` (or None) and what
        :meth:`store` needs after its backward."""
        if self.mode == "previous":
            g = self.norms
            return (None if g is None or g.numel() != n or g.device != device else g), None
        if self.mode != "example":
            return None, None
        ids = self.ids
        if ids is None:
            raise RuntimeError("WTACRSLinear: grad_norms='example' needs the batch's example ids: call "
                               "fastopt.nn.set_example_ids(model, ids) before the forward")
        b = ids.numel()
        if b == 0 or n % b:
            raise ValueError(f"WTACRSLinear: {n} rows are not a whole number of rows for each of the {b} examples")
        ids = ids.to(device)
        per = n // b
        if self.table is None or self.table.device != device or self.table.shape[1] != per:
            return None, (ids, per)
        known = ids < self.table.shape[0]
        if not bool(known.all()) or not bool(self.seen[ids].all()):
            return None, (ids, per)
        return self.table[ids].reshape(n), (ids, per)

    def store(self, token, norms):
        if self.mode == "previous":
            self.norms = norms
        elif self.mode == "example" and token is not None:
            ids, per = token
            need = int(ids.max()) + 1
            if self.table is None or self.table.device != norms.device or self.table.shape[1] != per:
                self.table = norms.new_zeros(need, per)
                self.seen = torch.zeros(need, dtype=torch.bool, device=norms.device)
            elif self.table.shape[0] < need:
                grow = max(need, 2 * self.table.shape[0])
                self.table = torch.cat([self.table, self.table.new_zeros(grow - self.table.shape[0], per)])
                self.seen = torch.cat([self.seen, self.seen.new_zeros(grow - self.seen.shape[0])])
            self.table[ids] = norms.view(-1, per)
            self.seen[ids] = True


class _WTACRSFunction(torch.autograd.Function):
    """``y = x W^T + b``; saves for ``dW`` only the kept rows of ``x`` (scaled) and their indices."""

    @staticmethod
    def forward(ctx, x, weight, bias, cache, budget, min_rows, generator, backend):
        y = F.linear(x, weight, bias)
        in_f = weight.shape[1]
        x2 = x.reshape(-1, in_f)
        n = x2.shape[0]
        k = num_rows(n, budget, min_rows)
        ctx.x_shape = x.shape
        ctx.n = n
        ctx.cache = cache
        ctx.backend = backend
        ctx.full = k >= n
        ctx.has_bias = bias is not None
        need_w = ctx.needs_input_grad[1]
        if not need_w:
            ctx.save_for_backward(weight)
            return y
        if ctx.full:
            ctx.save_for_backward(weight, x2, None)
            return y
        x2 = x2.contiguous()
        scores = torch.empty(n, dtype=torch.float32, device=x.device)
        g, ctx.token = cache.lookup(n, x.device)
        _wtacrs_rows_call(x2, None, None, None, g, scores, backend)
        idx, w = select_rows(probabilities(scores), k, generator)
        pos = torch.full((n,), -1, dtype=torch.int64, device=x.device)
        pos[idx] = torch.arange(idx.numel(), device=x.device)
        xs = torch.empty(idx.numel(), in_f, dtype=x.dtype, device=x.device)
        _wtacrs_rows_call(x2, pos, w.float(), xs, None, None, backend)
        ctx.save_for_backward(weight, xs, idx)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved = ctx.saved_tensors
        weight = saved[0]
        out_f, in_f = weight.shape
        dy2 = dy.reshape(-1, out_f)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = (dy2 @ weight.to(dy2.dtype)).view(*ctx.x_shape[:-1], in_f).to(dy.dtype)
        if ctx.needs_input_grad[1]:
            _, xs, idx = saved
            if ctx.full:
                dw = dy2.t() @ xs.to(dy2.dtype)
            else:
                dy2 = dy2.contiguous()
                n = ctx.n
                pos = torch.full((n,), -1, dtype=torch.int64, device=dy.device)
                pos[idx] = torch.arange(idx.numel(), device=dy.device)
                dys = torch.empty(idx.numel(), out_f, dtype=dy2.dtype, device=dy.device)
                norms = torch.empty(n, dtype=torch.float32, device=dy.device)
                backend = ctx.backend if dy2.dtype in _backend.KERNEL_DTYPES else "torch"
                _wtacrs_rows_call(dy2, pos, None, dys, None, norms, backend)
                ctx.cache.store(ctx.token, norms)
                dw = dys.t() @ xs.to(dys.dtype)
            dw = dw.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0)
        return dx, dw, db, None, None, None, None, None


def _check_budget(budget, where):
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real):
        raise TypeError(f"{where}: budget must be a real number in (0, 1], got {budget!r}")
    b = float(budget)
    if not 0.0 < b <= 1.0:
        raise ValueError(f"{where}: budget must be in (0, 1], got {budget!r}")
    return b


def _check_min_rows(min_rows, where):
    if isinstance(min_rows, bool) or not isinstance(min_rows, numbers.Integral) or int(min_rows) < 1:
        raise ValueError(f"{where}: min_rows must be an integer >= 1, got {min_rows!r}")
    return int(min_rows)


def _check_grad_norms(grad_norms, where):
    if grad_norms not in ("previous", "example", "none"):
        raise ValueError(f"{where}: grad_norms must be 'previous', 'example' or 'none', got {grad_norms!r}")


def _check_seed(seed, where):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral)):
        raise TypeError(f"{where}: seed must be an integer or None, got {seed!r}")
    return None if seed is None else int(seed)


class WTACRSLinear(nn.Linear):
    """``nn.Linear`` with Winner-Take-All Column-Row Sampling in the backward (Liu et al., NeurIPS 2023;
    official code github.com/zirui-ray-liu/WTACRS)::

        layer = fastopt.nn.WTACRSLinear(1024, 4096)            # instead of nn.Linear(1024, 4096)
        model = fastopt.nn.convert_linear(model, budget=0.3)   # or: every nn.Linear of a model

    Same parameters and ``state_dict`` keys as ``nn.Linear`` (``weight``, ``bias``), same forward output.
    In training (``self.training``, grad mode on, ``weight.requires_grad``) the input's leading dims are
    flattened to ``n`` rows and only ``k = min(max(int(n * budget), min_rows), n)`` of them are kept for
    the weight gradient: the rows of largest ``p_i ~ ||x_i|| * ||dy_i||`` as winners (their number chosen
    by the paper's variance bound), the rest sampled with replacement and reweighted, so that
    ``E[weight.grad] = dy^T x`` (:mod:`fastopt.reference.wtacrs`).  ``||dy_i||`` are the output-gradient
    row norms of the previous backward through the layer (the only ones known at forward time; ``||x_i||``
    alone before the first backward or when the row count changes).  The input and bias gradients are
    exact.  Saved for the backward: the kept rows (a row drawn several times is kept once) and their
    int64 indices, about ``budget`` times the input's bytes; ``weight`` (a parameter, no copy) for the
    input gradient.  Otherwise (eval, ``no_grad``, a frozen weight) it is ``F.linear``.

    Arguments beyond ``nn.Linear``'s (keyword-only):

    - ``budget`` (default 0.3: the paper's WTA-CRS@0.3): the fraction of rows kept, in (0, 1];
      1 keeps every row (exact).
    - ``min_rows`` (default 10: the official ``minimal_k``): at least this many rows are kept.
    - ``grad_norms``: ``'previous'`` (default, the paper's ``||x_i|| * ||dy_i||``) takes ``||dy_i||`` from the
      previous backward by row position: meaningful when a row position means the same thing from step
      to step (sequence positions, padding); ``'example'`` keeps them per training example and position,
      as the official code (the previous epoch's norms of the same example): call
      :func:`set_example_ids` with the batch's example indices before each forward; ``'none'`` samples by
      ``||x_i||`` alone, better than ``'previous'`` for batches of shuffled i.i.d. examples, where the
      previous step's row ``i`` was another example.
    - ``seed``: an int makes the sampling reproducible (a ``torch.Generator`` of the layer's own, seeded
      once, on the input's device); None uses torch's global generator (reproducible under
      ``torch.manual_seed``).
    - ``backend``: the row pass's kernel: 'auto' (C++ on CPU tensors, Triton on CUDA tensors, torch for
      fp64), 'cpu', 'triton' or 'torch' (:func:`fastopt.reference.wtacrs.rows_reference`).

    Differences from the official code: see :mod:`fastopt.reference.wtacrs` (exact normalization, no
    biased shortcuts, merged repeated draws, norms of the previous step by row position rather than of
    the same training example in the previous epoch).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, budget: float = DEFAULT_BUDGET,
                 min_rows: int = MIN_ROWS, grad_norms: str = "previous", seed: Optional[int] = None,
                 backend: str = "auto", device: Optional[Union[torch.device, str]] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        budget = _check_budget(budget, "WTACRSLinear")
        _check_grad_norms(grad_norms, "WTACRSLinear")
        min_rows = _check_min_rows(min_rows, "WTACRSLinear")
        seed = _check_seed(seed, "WTACRSLinear")
        _backend.check_backend_name(backend)
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.budget = budget
        self.min_rows = min_rows
        self.grad_norms_mode = grad_norms
        self.seed = seed
        self.backend = backend
        self._generator = None
        self._cache = _GradNormCache(grad_norms)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, budget: float = DEFAULT_BUDGET, min_rows: int = MIN_ROWS,
                    grad_norms: str = "previous", seed: Optional[int] = None,
                    backend: str = "auto") -> "WTACRSLinear":
        """A WTACRSLinear sharing ``linear``'s parameters (the same ``Parameter`` objects: an optimizer
        built on them keeps working) and its training mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"WTACRSLinear.from_linear: expected an nn.Linear, got {type(linear).__name__}")
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, budget=budget,
                    min_rows=min_rows, grad_norms=grad_norms, seed=seed, backend=backend, device="meta")
        layer.weight = linear.weight
        if linear.bias is not None:
            layer.bias = linear.bias
        layer.train(linear.training)
        return layer

    def extra_repr(self) -> str:
        return super().extra_repr() + f", budget={self.budget}"

    def _generator_for(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
        return self._generator

    @property
    def grad_norms(self) -> Optional[Tensor]:
        """The output-gradient row norms the next forward samples with: those of the last backward (fp32
        (n,); ``grad_norms='previous'``), the per-example table (fp32 (examples, rows per example);
        ``'example'``), or None."""
        return self._cache.norms if self._cache.mode == "previous" else self._cache.table

    def forward(self, input: Tensor) -> Tensor:
        if not isinstance(input, Tensor):
            raise TypeError(f"WTACRSLinear: input must be a tensor, got {type(input).__name__}")
        if input.dim() == 0 or input.shape[-1] != self.in_features:
            raise ValueError(f"WTACRSLinear: input's last dim must be in_features={self.in_features}, got shape "
                             f"{tuple(input.shape)}")
        if not (self.training and torch.is_grad_enabled() and self.weight.requires_grad):
            return F.linear(input, self.weight, self.bias)
        if input.dtype != self.weight.dtype:
            raise ValueError(f"WTACRSLinear: input is {input.dtype}, the weight {self.weight.dtype}")
        backend = _backend.resolve(self.backend, input.device, input.dtype, op=_OP, name="WTACRSLinear")
        return _WTACRSFunction.apply(input, self.weight, self.bias, self._cache, self.budget, self.min_rows,
                                     self._generator_for(input.device), backend)


def convert_linear(model: nn.Module, *, budget: float = DEFAULT_BUDGET,
                   filter: Optional[Callable[[str, nn.Linear], bool]] = None, min_rows: int = MIN_ROWS,
                   grad_norms: str = "previous", seed: Optional[int] = None, backend: str = "auto") -> nn.Module:
    """Replace, in place, every ``nn.Linear`` of ``model`` (exactly that class: subclasses such as
    ``nn.MultiheadAttention``'s ``out_proj``, which its module never calls, are left) for which
    ``filter(qualified_name, module)`` is true (None: all) by a :class:`WTACRSLinear` sharing its
    parameters; returns ``model`` (the new layer when ``model`` itself is an ``nn.Linear``).  ``seed``:
    layer ``j`` (in ``named_modules`` order) gets ``seed + j``."""
    budget = _check_budget(budget, "convert_linear")
    min_rows = _check_min_rows(min_rows, "convert_linear")
    seed = _check_seed(seed, "convert_linear")
    _check_grad_norms(grad_norms, "convert_linear")
    _backend.check_backend_name(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert_linear: model must be an nn.Module, got {type(model).__name__}")
    if filter is not None and not callable(filter):
        raise TypeError(f"convert_linear: filter must be callable or None, got {filter!r}")

    def make(lin, j):
        return WTACRSLinear.from_linear(lin, budget=budget, min_rows=min_rows, grad_norms=grad_norms,
                                        seed=None if seed is None else seed + j, backend=backend)

    if type(model) is nn.Linear:
        return make(model, 0) if filter is None or filter("", model) else model
    made = {}  # id(nn.Linear) -> its WTACRSLinear (a layer registered at several places is converted once)
    targets = [(name, m) for name, m in model.named_modules(remove_duplicate=False) if type(m) is nn.Linear
               and (filter is None or filter(name, m))]
    for name, lin in targets:
        if id(lin) not in made:
            made[id(lin)] = make(lin, len(made))
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, made[id(lin)])
    return model


def set_example_ids(model: nn.Module, ids: Optional[Tensor]) -> None:
    """Tell every :class:`WTACRSLinear` of ``model`` (or ``model`` itself) with ``grad_norms='example'``
    which training examples the next batch holds: ``ids`` int64 (B,), the examples' indices in the data
    set (the input's rows are B equal runs, one per example, as ``(B, L, d)`` flattens); None clears."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"set_example_ids: model must be an nn.Module, got {type(model).__name__}")
    if ids is not None:
        if not isinstance(ids, Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"set_example_ids: ids must be a 1-D int64 tensor, got {ids!r}")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("set_example_ids: ids must be >= 0")
        ids = ids.long()
    for m in model.modules():
        if isinstance(m, WTACRSLinear) and m._cache.mode == "example":
            m._cache.ids = ids
