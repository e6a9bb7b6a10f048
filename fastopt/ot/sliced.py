"""Sliced Wasserstein distances: SW_p, max-SW, v-DSW and control-variate estimators (PyTorch, and a fused
Triton projection + sort kernel).

    sw = fastopt.ot.sliced.sliced_wasserstein(x, y, n_projections=200, seed=0)   # x (n, d), y (m, d)
    sw.backward()                                                                  # d SW_p / dx, d SW_p / dy
    msw, theta = fastopt.ot.sliced.max_sliced_wasserstein(x, y)                    # Max-SW and its direction
    dsw, mu = fastopt.ot.sliced.vmf_distributional_sliced_wasserstein(x, y, kappa=10.0)
    sw_cv = fastopt.ot.sliced.sliced_wasserstein(x, y, n_projections=20, control_variate="upper")

Conventions (those of POT's ``ot.sliced_wasserstein_distance``):

* every ``*_wasserstein`` function returns the distance ``SW_p``, not its p-th power::

      SW_p(mu, nu) = ( E_{theta ~ U(S^{d-1})} W_p^p(theta#mu, theta#nu) )^(1/p)
                   ~ ( 1/L sum_l W_p^p(theta_l#mu, theta_l#nu) )^(1/p),

  where ``theta#mu`` is the law of ``<theta, X>`` for ``X ~ mu``; only :func:`wasserstein_1d` returns
  ``W_p^p`` (like ``ot.wasserstein_1d``).  With the same ``projections`` the value equals POT's to
  rounding.
* ``projections`` have POT's layout ``(d, L)``: one unit direction per column (``(*batch, d, L)`` for one
  set per batch entry).  Random directions are ``randn`` columns normalized to unit length (uniform on
  the sphere), drawn from ``generator`` or from ``torch.Generator().manual_seed(seed)`` on the input's
  device (the same seed does not give POT's numpy directions: pass ``projections`` to compare).  For
  batched inputs one random set is drawn and shared by the whole batch.
* points ``x (n, d)`` and ``y (m, d)``, or batched ``(*batch, n, d)`` / ``(*batch, m, d)`` with equal batch
  shapes; weights ``a (n,)`` / ``b (m,)`` or ``(*batch, n)`` / ``(*batch, m)``, non-negative, normalized
  here to sum to one (``None``: uniform).  The result has shape ``batch`` (a 0-d tensor unbatched).
* dtypes: float32 and float64 are computed in their own precision; float16 and bfloat16 inputs are
  upcast to float32 first (a half-precision sum over thousands of points would lose the distance), so
  the result is float64 for float64 inputs and float32 otherwise.  Gradients flow back to the inputs in
  their own dtype.

How the 1-D problems are solved (all directions, all batch entries at once, no Python loop over them):
with uniform weights and ``n == m``, ``W_p^p = 1/n sum_i |u_(i) - v_(i)|^p`` on the sorted projections;
with uniform weights and ``n != m`` the quantile breakpoints ``{i/n} U {j/m}`` do not depend on the data
and are merged once, exactly, in integer arithmetic; with weights, the quantile functions are merged
along the sorted cumulative weights (the method of POT's ``ot.wasserstein_1d``), the breakpoint
indices read from the merge order instead of searched.  On CPU, rows of 16K+ values are sorted by
NumPy's SIMD sort in one block per torch thread (faster than ``torch.sort`` on CPUs; sorting is
exact, so the values are the same; ``FASTOPT_NUMPY_SORT=0`` turns it off).  Gradients with respect
to the points (and the weights) flow through the sort permutation.

Backends (``backend=``): ``"torch"`` runs every case on every device (a GEMM for the projections, then
the sorts above); ``"triton"`` runs every case on the kernels of ``triton_kernels/sliced.py`` in float32
(half inputs are upcast):

* uniform weights and ``n == m <= 8192``: one program per direction and batch entry projects both
  clouds, sorts them in registers and reduces ``1/n sum_k |xs_k - ys_k|^p``, so the ``L x n``
  projections are never written unsorted, and writes ``d W_p^p / d projection`` for the backward (two
  GEMMs);
* uniform weights and ``n == m > 8192``: each program projects and sorts a block of 4096 values of a
  direction, merge passes (merge path: each program finds its chunk's split of the two runs by binary
  search and sorts the chunk's keys in registers) double the sorted runs in global memory, and a
  reduction over the sorted pairs writes the partial sums and the derivatives (scattered through the
  permutation, which the sort keys carry);
* weights or ``n != m`` (any sizes): the same sorts, then the quantile merge of the two sorted
  cumulative-weight sequences (merge path again), ``W_p^p = sum_k (q_k - q_{k-1}) |xs_iu - ys_iv|^p``,
  with the derivatives with respect to the projections and, for weights that need a gradient, with
  respect to the cumulative weights (the weights' gradient is then a suffix sum in torch).

For ``d > 16`` a GEMM projects and the kernels only sort and reduce.  ``"auto"`` picks the kernels for
float32 (and half) CUDA tensors of any size and weights, and the torch path for float64, CPU tensors
and control variates (which need the projections' moments); ``backend="triton"`` on such a problem
raises ``BackendUnavailableError`` saying why.  There is no ``"cpu"`` / ``"cuda"`` (C++) kernel here.
The quantile merge adds the interval derivatives with atomics (several intervals share a point), so
its gradients may differ between runs in the last bits; values are deterministic.

Errors: bad inputs raise ``TypeError`` / ``ValueError`` naming the parameter, before any computation
(non-tensor, integer, bool or complex points; dimension or batch mismatch; negative, non-finite or
zero-sum weights; ``p < 1``; ``n_projections < 1``; an unknown control variate).
"""
import functools
import math
import numbers
import os
from typing import Optional, Sequence, Tuple, Union

import torch

from .. import _backend, _ops
from .._backend import BACKENDS
from . import _checks

__all__ = ["sliced_wasserstein", "max_sliced_wasserstein", "vmf_distributional_sliced_wasserstein",
           "wasserstein_1d", "random_projections", "sample_vmf", "CONTROL_VARIATES"]

CONTROL_VARIATES = (None, "lower", "upper")


# -- argument checks ------------------------------------------------------------------------------
def _fused_reason(x, y, a, b, dtype):
    """Why the fused Triton kernels cannot take this problem, or None when they can: they take any sizes
    n, m and any weights, in float32 (float64 runs on torch)."""
    if dtype != torch.float32:
        return f"{dtype} inputs (it computes in float32; they run on backend='torch')"
    return None


def _resolve(backend, fn, x, y, a, b, dtype, extra=None):
    """'triton' or 'torch' for a checked problem, by the "sliced" row of :data:`fastopt._backend.CAPABILITIES`
    (the Triton kernel only; ``auto`` keeps CPU tensors on torch, where Triton is the interpreter);
    ``extra``: why the caller rules the kernel out."""
    reason = extra or _fused_reason(x, y, a, b, dtype)
    try:
        return _backend.resolve(backend, x.device, dtype, op="sliced", reason=reason, name=fn)
    except ValueError:  # an unknown name
        raise ValueError(f"{fn}: backend must be one of {BACKENDS}, got {backend!r}") from None


def _compute_dtype(*dtypes):
    dtype = functools.reduce(torch.promote_types, dtypes)
    return torch.float64 if dtype == torch.float64 else torch.float32


def _normalized_weights(w, name, points, pname, dtype, fn):
    """``w`` as ``(n,)`` or ``(*batch, n)`` normalized weights in ``dtype`` (None stays None)."""
    if w is None:
        return None
    # with weights, their value check is the only host read of a call
    w = _checks.weights(w, name, fn, n=points.shape[-2], batch=points.shape[:-2], ref=pname, ref_shape=points.shape,
                        device=points.device, dtype=dtype)
    return w / w.sum(-1, keepdim=True)


def _check_p(p, fn):
    return _checks.real(p, "p", fn, low=1.0, low_ok=True)


def _prepare(x, y, a, b, fn):
    """Checked points (in the compute dtype) and normalized weights."""
    _checks.points(x, "x", fn, any_batch=True, nonempty=True, values=False)
    _checks.points(y, "y", fn, any_batch=True, nonempty=True, values=False)
    _checks.point_pair(x, y, fn, same_dtype=False)
    dtype = _compute_dtype(x.dtype, y.dtype)
    a = _normalized_weights(a, "a", x, "x", dtype, fn)
    b = _normalized_weights(b, "b", y, "y", dtype, fn)
    return x.to(dtype), y.to(dtype), a, b, dtype


def _make_generator(seed, generator, device, fn):
    if seed is not None and generator is not None:
        raise ValueError(f"{fn}: pass seed or generator, not both")
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise _checks.ArgumentTypeError(f"{fn}: generator must be a torch.Generator, got "
                                            f"{type(generator).__name__}")
        if generator.device.type != torch.device(device).type:
            raise ValueError(f"{fn}: generator is on {generator.device} but the inputs are on {device}")
        return generator
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise _checks.ArgumentTypeError(f"{fn}: seed must be an integer, got {seed!r}")
        return torch.Generator(device=device).manual_seed(int(seed))
    return None


def _check_directions(name, t, d, batch, dtype, device, vector, fn):
    """``t``: ``(d,)`` / ``(*batch, d)`` (vector) or ``(d, L)`` / ``(*batch, d, L)`` (matrix)."""
    _checks.float_tensor(t, name, fn)
    shapes = f"({d},) or {(*batch, d)}" if vector else f"({d}, L) or {(*batch, d, 'L')}"
    core = t.shape[-1:] if vector else t.shape[-2:-1]
    lead = t.shape[:-1] if vector else t.shape[:-2]
    if t.dim() < (1 if vector else 2) or tuple(core) != (d,) or lead not in ((), tuple(batch)):
        raise ValueError(f"{fn}: {name} must have shape {shapes}, got {tuple(t.shape)}")
    if not vector and t.shape[-1] == 0:
        raise ValueError(f"{fn}: {name} has no directions: shape {tuple(t.shape)}")
    _checks.same_device(t, name, device, "the points", fn)
    return t.to(dtype)


# -- sorting ----------------------------------------------------------------------------------------
_NUMPY_SORT = os.environ.get("FASTOPT_NUMPY_SORT", "1") not in ("", "0")
_NUMPY_MIN_NUMEL = 1 << 14
_POOL = None


def _numpy():
    try:
        import numpy
    except ImportError:
        return None
    return numpy


def _use_numpy(t):
    return (_NUMPY_SORT and t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64)
            and t.numel() >= _NUMPY_MIN_NUMEL and type(t) in (torch.Tensor, torch.nn.Parameter)
            and not torch.compiler.is_compiling() and _numpy() is not None)


def _reset_pool():
    global _POOL
    _POOL = None  # a forked child has none of the parent's threads


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_pool)


def _over_rows(work, rows):
    """``work(rows_slice)`` over row blocks, one per torch thread (NumPy's sorts release the GIL)."""
    global _POOL
    threads = max(1, min(torch.get_num_threads(), rows))
    step = -(-rows // threads)
    blocks = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
    if len(blocks) == 1:
        work(blocks[0])
        return
    if _POOL is None:
        from concurrent.futures import ThreadPoolExecutor

        _POOL = ThreadPoolExecutor(max(2, torch.get_num_threads()), thread_name_prefix="fastopt-sort")
    list(_POOL.map(work, blocks))


def _np_sort(arr):
    np = _numpy()
    vals = np.empty_like(arr)

    def work(s):
        vals[s] = np.sort(arr[s], axis=-1)
    _over_rows(work, arr.shape[0])
    return vals


def _np_argsort(arr, kind):
    np = _numpy()
    vals, idx = np.empty_like(arr), np.empty(arr.shape, dtype=np.int64)

    def work(s):
        idx[s] = np.argsort(arr[s], axis=-1, kind=kind)
        vals[s] = np.take_along_axis(arr[s], idx[s], axis=-1)
    _over_rows(work, arr.shape[0])
    return vals, idx


def _as_rows(u):
    return u.detach().contiguous().reshape(-1, u.shape[-1]).numpy()


class _NumpySort(torch.autograd.Function):
    """Sort along the last dim with NumPy's SIMD sort (CPU); backward scatters through the permutation."""

    @staticmethod
    def forward(ctx, u, runs):
        # rows made of a few sorted runs (the merge of cumulative weights): timsort merges them in
        # linear time, while the SIMD quicksort is slower on them than on random data
        vals, idx = _np_argsort(_as_rows(u), "stable" if runs else "quicksort")
        vals, idx = torch.from_numpy(vals).view(u.shape), torch.from_numpy(idx).view(u.shape)
        ctx.mark_non_differentiable(idx)
        ctx.save_for_backward(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, grad_vals, grad_idx):
        (idx,) = ctx.saved_tensors
        return torch.empty_like(grad_vals).scatter_(-1, idx, grad_vals), None


def _sort(u, want_indices=False, runs=False):
    """(sorted values, permutation or None) along the last dim; differentiable in the values.

    ``runs``: each row is a concatenation of a few sorted runs (picks a merging sort on CPU).
    """
    if _use_numpy(u):
        if want_indices or runs or (u.requires_grad and torch.is_grad_enabled()):
            return _NumpySort.apply(u, runs)
        return torch.from_numpy(_np_sort(_as_rows(u))).view(u.shape), None
    vals, idx = torch.sort(u, dim=-1, stable=runs)
    return vals, (idx if want_indices else None)


# -- 1-D optimal transport ------------------------------------------------------------------------
def _pow_abs(t, p):
    if p == 1.0:
        return t.abs()
    if p == 2.0:
        return t * t
    return t.abs().pow(p)


@functools.lru_cache(maxsize=32)
def _uniform_merge(n, m, device):
    """Breakpoints of two uniform quantile functions (n and m atoms), merged exactly.

    Interval k of the merged grid is ``(K_{k-1}, K_k] / (n m)`` with keys ``K`` the union of
    ``{i m}`` and ``{j n}``; on it the quantile functions are ``u_(K_{k-1} // m)`` and ``v_(K_{k-1} // n)``.
    Returns (index into u, index into v, interval length in float64).
    """
    keys = torch.unique(torch.cat([torch.arange(1, n + 1, dtype=torch.int64) * m,
                                   torch.arange(1, m + 1, dtype=torch.int64) * n]))
    prev = torch.cat([keys.new_zeros(1), keys[:-1]])
    iu, iv = prev // m, prev // n
    delta = (keys - prev).to(torch.float64) / (n * m)
    return iu.to(device), iv.to(device), delta.to(device)


def _wpp_sorted_last(u, v, a, b, p):
    """``W_p^p`` between the 1-D measures ``sum_i a_i delta_{u_i}`` and ``sum_j b_j delta_{v_j}``.

    ``u (..., n)``, ``v (..., m)``: values along the last dim (any order); ``a`` / ``b``: normalized
    weights broadcastable to ``u`` / ``v``, or None for uniform.  Returns shape ``(...)``.
    """
    n, m = u.shape[-1], v.shape[-1]
    if a is None and b is None:
        us, _ = _sort(u)
        vs, _ = _sort(v)
        if n == m:
            return _pow_abs(us - vs, p).mean(-1)
        iu, iv, delta = _uniform_merge(n, m, u.device)
        diff = us.index_select(-1, iu) - vs.index_select(-1, iv)
        return (_pow_abs(diff, p) * delta.to(u.dtype)).sum(-1)
    # Weighted: POT's quantile merge.  Cumulative weights along the sorted atoms (divided by their
    # total so that both end at exactly 1), merged by one sort; interval k ends at qs_k, and its
    # quantile indices are the numbers of u / v breakpoints before position k in the merge (at ties
    # the intervals have length 0, so the order of equal breakpoints does not matter).
    lead = torch.broadcast_shapes(u.shape[:-1], v.shape[:-1])
    u, v = u.expand(*lead, n), v.expand(*lead, m)

    def cumulative(vals, w, k):
        if w is None:
            sv, _ = _sort(vals)
            cw = torch.arange(1, k + 1, device=vals.device, dtype=vals.dtype) / k
            return sv, cw.expand(*lead, k)
        sv, order = _sort(vals, want_indices=True)
        cw = torch.gather(w.expand(*lead, k), -1, order).cumsum(-1)
        return sv, cw / cw[..., -1:]

    us, cu = cumulative(u, a, n)
    vs, cv = cumulative(v, b, m)
    qs, order = _sort(torch.cat([cu, cv], -1), want_indices=True, runs=True)
    from_u = order < n
    iu = torch.cat([from_u.new_zeros(()).expand(*lead, 1), from_u[..., :-1]], -1).cumsum(-1)  # exclusive
    iv = torch.arange(n + m, device=u.device) - iu
    # iu can reach n (iv: m) only after the last u (v) breakpoint, where the interval is empty; a copy
    # of the last atom stands in for the clamp
    us, vs = torch.cat([us, us[..., -1:]], -1), torch.cat([vs, vs[..., -1:]], -1)
    delta = torch.diff(qs, dim=-1, prepend=qs.new_zeros(()).expand(*lead, 1))
    diff = torch.gather(us, -1, iu) - torch.gather(vs, -1, iv)
    return (delta * _pow_abs(diff, p)).sum(-1)


def wasserstein_1d(u_values: torch.Tensor, v_values: torch.Tensor, u_weights: Optional[torch.Tensor] = None,
                   v_weights: Optional[torch.Tensor] = None, p: float = 1, *, dim: int = 0,
                   backend: str = "auto") -> torch.Tensor:
    r"""``W_p^p`` between batched 1-D empirical measures (the convention of POT's ``ot.wasserstein_1d``).

    .. math:: W_p^p(\mu, \nu) = \int_0^1 |F_\mu^{-1}(q) - F_\nu^{-1}(q)|^p \, dq

    with :math:`F^{-1}` the quantile functions of :math:`\mu = \sum_i a_i \delta_{u_i}` and
    :math:`\nu = \sum_j b_j \delta_{v_j}` (Peyré & Cuturi, *Computational Optimal Transport*, 2019,
    Remark 2.30).  Like POT, the atoms lie along ``dim`` (default 0) and the other dims are a batch;
    ``u_weights`` is ``(n,)`` (shared by the batch) or of ``u_values``' shape, normalized here (POT uses
    the weights as given, so compare with normalized weights).  Returns ``W_p^p`` (not ``W_p``) with the
    batch shape, in float64 for float64 inputs and float32 otherwise.
    """
    fn = "wasserstein_1d"
    for name, t in (("u_values", u_values), ("v_values", v_values)):
        _checks.float_tensor(t, name, fn)
        if t.dim() == 0:
            raise ValueError(f"{fn}: {name} must have at least one dimension")
    if u_values.dim() != v_values.dim():
        raise ValueError(f"{fn}: u_values and v_values must have the same number of dims: "
                         f"{tuple(u_values.shape)} vs {tuple(v_values.shape)}")
    _checks.same_device(v_values, "v_values", u_values.device, "u_values", fn)
    p = _check_p(p, fn)
    if isinstance(dim, bool) or not isinstance(dim, numbers.Integral) or not -u_values.dim() <= dim < u_values.dim():
        raise ValueError(f"{fn}: dim must be an integer in [{-u_values.dim()}, {u_values.dim()}), got {dim!r}")
    u = torch.movedim(u_values, dim, -1)
    v = torch.movedim(v_values, dim, -1)
    if u.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"{fn}: u_values and v_values must have the same batch shape (all dims but dim={dim}): "
                         f"{tuple(u_values.shape)} vs {tuple(v_values.shape)}")
    for name, t in (("u_values", u), ("v_values", v)):
        if t.shape[-1] == 0:
            raise ValueError(f"{fn}: {name} has no atoms along dim={dim}")
    dtype = _compute_dtype(u.dtype, v.dtype)
    weights = []
    for name, w, vals, vname in (("u_weights", u_weights, u, "u_values"), ("v_weights", v_weights, v, "v_values")):
        if w is not None:
            _checks.float_tensor(w, name, fn)
            full = torch.movedim(vals, -1, dim).shape  # the values' own shape
            if w.shape != (vals.shape[-1],) and w.shape != full:
                raise ValueError(f"{fn}: {name} must have shape ({vals.shape[-1]},) or the shape of {vname} "
                                 f"{tuple(full)}, got {tuple(w.shape)}")
            if w.dim() > 1:
                w = torch.movedim(w, dim, -1)
            # checked as the weights of (*batch, k, 1) points
            w = _normalized_weights(w, name, vals.unsqueeze(-1), vname, dtype, fn)
        weights.append(w)
    u, v = u.to(dtype), v.to(dtype)
    if _resolve(backend, fn, u.unsqueeze(-1), v.unsqueeze(-1), *weights, dtype) == "triton":
        n, m = u.shape[-1], v.shape[-1]  # the fused kernels on given "projections": sort and reduce
        pu, pv = u.reshape(-1, 1, n).contiguous(), v.reshape(-1, 1, m).contiguous()
        if weights[0] is None and weights[1] is None and n == m:
            wpp = _FusedWpp.apply(pu, pv, None, p)
        else:
            wpp = _FusedQuantileWpp.apply(pu, pv, None, _weight_rows(weights[0], n), _weight_rows(weights[1], m), p)
        return wpp.reshape(u.shape[:-1])
    return _wpp_sorted_last(u, v, weights[0], weights[1], p)


# -- directions -----------------------------------------------------------------------------------
def random_projections(d: int, n_projections: int, *, batch_shape: Sequence[int] = (),
                       dtype: torch.dtype = torch.float32, device: Optional[Union[torch.device, str, int]] = None,
                       seed: Optional[int] = None, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``(*batch_shape, d, n_projections)`` directions uniform on the sphere S^{d-1} (POT's layout).

    Normalized standard normal columns, from ``generator`` or ``torch.Generator(device).manual_seed(seed)``
    (or torch's global generator when both are None).
    """
    fn = "random_projections"
    d = _checks.integer(d, "d", fn)
    n_projections = _checks.integer(n_projections, "n_projections", fn)
    device = torch.device("cpu") if device is None else torch.device(device)
    gen = _make_generator(seed, generator, device, fn)
    theta = torch.randn((*batch_shape, d, n_projections), generator=gen, device=device, dtype=dtype)
    return theta / torch.linalg.vector_norm(theta, dim=-2, keepdim=True)


_SMALL_PROJECTION = 1 << 15


def _project(dirs, x):
    """``<theta_l, x_i>``: ``dirs (*, L, d)``, ``x (*, n, d)`` -> ``(*, L, n)``, contiguous along n.

    Tiny products are computed elementwise: MKL enters a parallel region even for a 16x5 by 5x40
    GEMM, and waking its threads on a busy machine costs far more than such a product, which would
    dominate the ascent loops of max-SW and v-DSW on small problems.
    """
    L, (n, d) = dirs.shape[-2], x.shape[-2:]
    batch = torch.broadcast_shapes(dirs.shape[:-2], x.shape[:-2])
    if math.prod(batch) * L * n * d <= _SMALL_PROJECTION:
        return (dirs.unsqueeze(-2) * x.unsqueeze(-3)).sum(-1)
    return torch.matmul(dirs, x.mT)


_FUSED_MAX_N = 8192  # triton_kernels.sliced.MAX_N: the points one program sorts in registers (above: merges)
_FUSED_PROJECT_MAX_D = 16  # above, a GEMM projects and the kernel only sorts and reduces


class _FusedWpp(torch.autograd.Function):
    """``W_p^p`` per direction by the fused Triton kernel (``triton_kernels/sliced.py``).

    ``x``, ``y`` (B, n, d) fp32 and ``dirs`` (1 or B, L, d): projection, sort and cost in one kernel;
    or ``x``, ``y`` the projections (B, L, n) and ``dirs`` None.  The kernel also writes ``d wpp / d
    projection`` (B, L, n) when a gradient is needed, so the backward is two GEMMs (no sort, no scatter).
    """

    @staticmethod
    def forward(ctx, x, y, dirs, p):
        projected = dirs is None
        batch, n = x.shape[0], x.shape[-1] if projected else x.shape[1]
        L = x.shape[1] if projected else dirs.shape[1]
        grad = any(ctx.needs_input_grad[:3])
        wpp = x.new_empty((batch, L))
        cx = x.new_empty((batch, L, n) if grad else (0,))
        cy = x.new_empty((batch, L, n) if grad else (0,))
        _ops.sliced_wpp(x, y, dirs, wpp, cx, cy, p, grad, "triton")
        if grad:
            ctx.save_for_backward(x, y, dirs, cx, cy)
        return wpp

    @staticmethod
    def backward(ctx, g):
        x, y, dirs, cx, cy = ctx.saved_tensors
        return (*_projection_grads(ctx.needs_input_grad, g, x, y, dirs, cx, cy), None)


def _projection_grads(needs, g, x, y, dirs, cx, cy):
    """Gradients with respect to ``x``, ``y``, ``dirs`` from ``cx``, ``cy`` = ``d wpp / d projection``."""
    if not any(needs[:3]):
        return None, None, None
    wx, wy = g.unsqueeze(-1) * cx, g.unsqueeze(-1) * cy  # d loss / d projection
    if dirs is None:
        return wx, wy, None
    gx = torch.matmul(wx.mT, dirs) if needs[0] else None  # (B, n, L) @ (Bd, L, d)
    gy = torch.matmul(wy.mT, dirs) if needs[1] else None
    gd = None
    if needs[2]:
        gd = torch.matmul(wx, x) + torch.matmul(wy, y)  # (B, L, d)
        if dirs.shape[0] == 1 and gd.shape[0] != 1:
            gd = gd.sum(0, keepdim=True)
    return gx, gy, gd


def _weight_grad(g, w, gq, perm):
    """``d/dw sum_l g_l W_l(q_l)`` with ``q_l = cumsum(w[perm_l]) / sum(w)`` (the kernel's cumulative weights,
    sorted along direction l), from ``gq = d W_l / d q_l`` (B, L, k) in sorted order:
    ``d/dw_j = (sum_{i >= rank_l(j)} gq_i - sum_i gq_i q_i) / sum(w)``."""
    batch, L, k = gq.shape
    ws = torch.gather(w.reshape(-1, 1, k).expand(batch, L, k), -1, perm)
    cw = ws.cumsum(-1)
    total = cw[..., -1:]
    gl = gq * g.unsqueeze(-1)
    suffix = gl.flip(-1).cumsum(-1).flip(-1)
    gs = (suffix - (gl * (cw / total)).sum(-1, keepdim=True)) / total
    out = torch.zeros_like(gs).scatter_(-1, perm, gs).sum(1)  # (B, k)
    return out.sum(0, keepdim=True) if w.shape[0] == 1 and batch != 1 else out


class _FusedQuantileWpp(torch.autograd.Function):
    """``W_p^p`` per direction between weighted (or uniform) measures of any sizes n, m on the Triton
    kernels (``triton_kernels/sliced.py``, ``sliced_wpp_quantile``): sorted projections (multi-block sort
    and merge), then the merge of the cumulative weights (POT's quantile formula).

    ``x`` (B, n, d), ``y`` (B, m, d) and ``dirs`` (1 or B, L, d), or projections (B, L, n) / (B, L, m) and
    ``dirs`` None; ``a`` (1 or B, n), ``b`` (1 or B, m) normalized weights or None.  The kernel writes
    ``d wpp / d projection`` (the backward is two GEMMs, as for :class:`_FusedWpp`) and, for weights that
    need a gradient, ``d wpp / d cumulative weight`` and the sort permutation (the rest in torch:
    :func:`_weight_grad`)."""

    @staticmethod
    def forward(ctx, x, y, dirs, a, b, p):
        projected = dirs is None
        batch = x.shape[0]
        n, m = (x.shape[-1], y.shape[-1]) if projected else (x.shape[1], y.shape[1])
        L = x.shape[1] if projected else dirs.shape[1]
        grad = any(ctx.needs_input_grad[:3])
        wu = a is not None and ctx.needs_input_grad[3]
        wv = b is not None and ctx.needs_input_grad[4]
        wpp = x.new_empty((batch, L))
        cx = x.new_empty((batch, L, n) if grad else (0,))
        cy = x.new_empty((batch, L, m) if grad else (0,))
        gcu = x.new_empty((batch, L, n) if wu else (0,))
        gcv = x.new_empty((batch, L, m) if wv else (0,))
        perm_x = torch.empty((batch, L, n) if wu else (0,), dtype=torch.int64, device=x.device)
        perm_y = torch.empty((batch, L, m) if wv else (0,), dtype=torch.int64, device=x.device)
        _ops.sliced_wpp_quantile(x, y, dirs, a, b, wpp, cx, cy, gcu, gcv, perm_x, perm_y, p, grad, "triton")
        ctx.save_for_backward(x, y, dirs, a, b, cx, cy, gcu, gcv, perm_x, perm_y)
        return wpp

    @staticmethod
    def backward(ctx, g):
        x, y, dirs, a, b, cx, cy, gcu, gcv, perm_x, perm_y = ctx.saved_tensors
        gx, gy, gd = _projection_grads(ctx.needs_input_grad, g, x, y, dirs, cx, cy)
        ga = _weight_grad(g, a, gcu, perm_x) if gcu.numel() else None
        gb = _weight_grad(g, b, gcv, perm_y) if gcv.numel() else None
        return gx, gy, gd, ga, gb, None


def _fused_wpp(x, y, a, b, dirs, p):
    """``W_p^p`` along ``dirs (*, L, d)`` on the Triton kernels: ``(*batch, L)``.  Uniform weights and
    n == m: :class:`_FusedWpp` (one program per direction up to 8192 points, sorted blocks and merges
    above); otherwise :class:`_FusedQuantileWpp`."""
    batch, (n, d), m, L = x.shape[:-2], x.shape[-2:], y.shape[-2], dirs.shape[-2]
    xf, yf = x.reshape(-1, n, d), y.reshape(-1, m, d)
    if d > _FUSED_PROJECT_MAX_D:
        px = torch.matmul(dirs.reshape(-1, L, d), xf.mT).contiguous()  # (B, L, n)
        py = torch.matmul(dirs.reshape(-1, L, d), yf.mT).contiguous()
        args = (px, py, None)
    else:
        args = (xf.contiguous(), yf.contiguous(), dirs.reshape(-1, L, d).contiguous())
    if a is None and b is None and n == m:
        wpp = _FusedWpp.apply(*args, p)
    else:
        wpp = _FusedQuantileWpp.apply(*args, _weight_rows(a, n), _weight_rows(b, m), p)
    return wpp.reshape(*batch, L)


def _weight_rows(w, k):
    """Normalized weights ``(k,)`` or ``(*batch, k)`` as the kernel's ``(1 or B, k)`` (None stays None)."""
    return None if w is None else w.reshape(-1, k).contiguous()


def _wpp_directions(x, y, a, b, dirs, p, backend="torch"):
    """``W_p^p`` along each direction: ``dirs (*, L, d)`` (rows) -> ``(*batch, L)``, and the projections
    (None on the fused kernel, which never stores them unsorted)."""
    if backend == "triton":
        return _fused_wpp(x, y, a, b, dirs, p), None, None
    px = _project(dirs, x)  # (*batch, L, n)
    py = _project(dirs, y)
    a = None if a is None else a.unsqueeze(-2)
    b = None if b is None else b.unsqueeze(-2)
    return _wpp_sorted_last(px, py, a, b, p), px, py


def _weighted_mean(t, w):
    """Mean of ``t (..., k)`` over the last dim with weights ``w`` (broadcastable, normalized) or uniform."""
    return t.mean(-1) if w is None else (t * w).sum(-1)


def _control_variate(wpp, px, py, x, y, a, b, kind):
    r"""Nguyen & Ho's control-variate estimate of ``SW_2^2`` from per-direction ``W_2^2`` values ``wpp``."""
    d = x.shape[-1]
    aw = None if a is None else a.unsqueeze(-2)
    bw = None if b is None else b.unsqueeze(-2)
    m1, m2 = _weighted_mean(px, aw), _weighted_mean(py, bw)  # theta^T mean(x), theta^T mean(y): (*batch, L)
    mx, my = _weighted_mean(x.mT, aw), _weighted_mean(y.mT, bw)  # mean(x), mean(y): (*batch, d)
    control = (m1 - m2) ** 2
    expected = ((mx - my) ** 2).sum(-1) / d  # E[(theta^T v)^2] = |v|^2 / d
    if kind == "upper":
        s1 = _weighted_mean((px - m1.unsqueeze(-1)) ** 2, aw)  # theta^T Sigma_x theta
        s2 = _weighted_mean((py - m2.unsqueeze(-1)) ** 2, bw)
        tr_x = _weighted_mean(((x - mx.unsqueeze(-2)) ** 2).sum(-1), a)  # tr(Sigma_x)
        tr_y = _weighted_mean(((y - my.unsqueeze(-2)) ** 2).sum(-1), b)
        control = control + s1 + s2
        expected = expected + (tr_x + tr_y) / d  # E[theta^T A theta] = tr(A) / d
    centered = control - expected.unsqueeze(-1)
    w_centered = wpp - wpp.mean(-1, keepdim=True)
    var = (centered * centered).mean(-1)
    cov = (w_centered * centered).mean(-1)
    gamma = torch.where(var > 0, cov / torch.where(var > 0, var, torch.ones_like(var)), torch.zeros_like(var))
    return wpp.mean(-1) - gamma * centered.mean(-1)


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor] = None,
                       b: Optional[torch.Tensor] = None, *, n_projections: int = 50, p: float = 2,
                       projections: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                       generator: Optional[torch.Generator] = None, return_projections: bool = False,
                       control_variate: Optional[str] = None,
                       backend: str = "auto") -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    r"""Monte-Carlo sliced Wasserstein distance ``SW_p`` (Bonneel et al., 2015), POT's convention.

    .. math::
        \widehat{SW}_p(\mu, \nu) = \Big( \frac1L \sum_{l=1}^L W_p^p(\theta_l\#\mu, \theta_l\#\nu) \Big)^{1/p},
        \qquad \theta_l \sim \mathcal U(\mathbb S^{d-1})

    Bonneel, Rabin, Peyré, Pfister, "Sliced and Radon Wasserstein barycenters of measures", JMIV 2015.
    Equals ``ot.sliced_wasserstein_distance(x, y, a / a.sum(), b / b.sum(), projections=projections, p=p)``
    (it returns ``SW_p``, not ``SW_p^p``).

    Args:
        x, y: points ``(n, d)`` and ``(m, d)``, or ``(*batch, n, d)`` and ``(*batch, m, d)``.
        a, b: weights ``(n,)`` / ``(*batch, n)`` and ``(m,)`` / ``(*batch, m)``; None for uniform.
        n_projections: ``L``, the number of random directions (ignored when ``projections`` is given,
            like ``seed`` and ``generator``).
        p: the order, ``>= 1``.
        projections: ``(d, L)`` or ``(*batch, d, L)`` directions (unit columns; used as given).
        seed, generator: the source of the random directions (at most one; see the module docstring).
        return_projections: also return the ``(d, L)`` (or ``(*batch, d, L)``) directions used.
        control_variate: None, ``"lower"`` or ``"upper"`` (``p = 2`` only): the control-variate
            estimators of Nguyen & Ho, "Sliced Wasserstein Estimation with Control Variates"
            (ICLR 2024, arXiv:2305.00402).  Per direction, the projected measures are replaced by 1-D
            Gaussians with moments ``m1 = theta^T E_a[x]``, ``m2 = theta^T E_b[y]``,
            ``s1^2 = theta^T Sigma_x theta``, ``s2^2 = theta^T Sigma_y theta`` (weighted means and
            covariances, normalized by the total weight), whose ``W_2^2`` is
            ``(m1 - m2)^2 + (s1 - s2)^2``.  The control variate is its lower bound
            ``C = (m1 - m2)^2`` ("lower") or its upper bound ``C = (m1 - m2)^2 + s1^2 + s2^2``
            ("upper"), with the closed-form means over the uniform sphere
            ``E[C] = |E x - E y|^2 / d`` and ``E[C] = (|E x - E y|^2 + tr Sigma_x + tr Sigma_y) / d``
            (``E[(theta^T v)^2] = |v|^2 / d``, ``E[theta^T A theta] = tr(A) / d``).  The estimate of
            ``SW_2^2`` is ``mean(W) - gamma (mean(C) - E[C])`` with
            ``gamma = mean((W - mean W)(C - E C)) / mean((C - E C)^2)`` fitted on the same directions
            (as in the authors' code; 0 when ``C`` is constant), and ``SW_2`` is its square root
            (clamped at 0).  Fitting ``gamma`` on the same directions makes the estimator biased by
            O(1/L), as usual for control variates; the closed forms assume uniform directions, so
            pass only such ``projections``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (the fused kernel; see the module docstring).

    Returns:
        ``SW_p`` with shape ``batch`` (float64 for float64 inputs, float32 otherwise), differentiable
        with respect to ``x``, ``y``, ``a``, ``b`` (and ``projections``); plus the directions when
        ``return_projections``.  ``SW_p`` is not differentiable where it is 0 (``x`` equal to ``y``),
        like POT's.
    """
    fn = "sliced_wasserstein"
    x, y, a, b, dtype = _prepare(x, y, a, b, fn)
    p = _check_p(p, fn)
    if control_variate not in CONTROL_VARIATES:
        raise ValueError(f"{fn}: control_variate must be one of {CONTROL_VARIATES}, got {control_variate!r}")
    if control_variate is not None and p != 2.0:
        raise ValueError(f"{fn}: control_variate={control_variate!r} needs p=2 (the Gaussian W_2 closed form), "
                         f"got p={p}")
    backend = _resolve(backend, fn, x, y, a, b, dtype,
                       extra=None if control_variate is None else
                       "control variates (they need the projections' moments: torch only)")
    d, batch = x.shape[-1], x.shape[:-2]
    if projections is None:
        n_projections = _checks.integer(n_projections, "n_projections", fn)
        projections = random_projections(d, n_projections, dtype=dtype, device=x.device,
                                          generator=_make_generator(seed, generator, x.device, fn))
    else:
        projections = _check_directions("projections", projections, d, batch, dtype, x.device, False, fn)
    wpp, px, py = _wpp_directions(x, y, a, b, projections.mT, p, backend)
    if control_variate is None:
        sw = wpp.mean(-1)
        value = sw.sqrt() if p == 2.0 else sw.pow(1.0 / p)
    else:
        value = _control_variate(wpp, px, py, x, y, a, b, control_variate).clamp_min(0).sqrt()
    return (value, projections) if return_projections else value


# -- optimized directions: max-SW, v-DSW -----------------------------------------------------------
def _normalize(t):
    return t / torch.linalg.vector_norm(t, dim=-1, keepdim=True)


def _sphere_ascent_step(theta, grad, step):
    """Riemannian ascent on the sphere: move ``step`` along the normalized tangent gradient, renormalize."""
    tangent = grad - (grad * theta).sum(-1, keepdim=True) * theta
    norm = torch.linalg.vector_norm(tangent, dim=-1, keepdim=True)
    direction = torch.where(norm > 0, tangent / torch.where(norm > 0, norm, torch.ones_like(norm)),
                            torch.zeros_like(tangent))
    return _normalize(theta + step * direction)


def _step_size(lr, t, n_iter):
    return lr * 0.5 * (1.0 + math.cos(math.pi * t / n_iter))  # cosine decay from lr towards 0


def _init_directions(init, name, d, batch, k, dtype, device, gen, fn):
    if init is None:
        return _normalize(torch.randn((*batch, k, d), generator=gen, device=device, dtype=dtype))
    init = _check_directions(name, init, d, batch, dtype, device, True, fn).detach()
    norm = torch.linalg.vector_norm(init, dim=-1)
    if not bool((norm > 0).all() & torch.isfinite(norm).all()):
        raise ValueError(f"{fn}: {name} must be a finite non-zero vector")
    return _normalize(init).expand(*batch, d).unsqueeze(-2)


def max_sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor] = None,
                           b: Optional[torch.Tensor] = None, *, p: float = 2, n_iter: int = 100, lr: float = 0.5,
                           n_init: int = 16, init: Optional[torch.Tensor] = None, seed: Optional[int] = None,
                           generator: Optional[torch.Generator] = None,
                           backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    r"""Max-sliced Wasserstein distance by Riemannian gradient ascent on the sphere.

    .. math:: \text{Max-SW}_p(\mu, \nu) = \max_{\theta \in \mathbb S^{d-1}} W_p(\theta\#\mu, \theta\#\nu)

    Deshpande, Hu, Sun, Pyrros, Siddiqui, Koyejo, Zhao, Forsyth, Schwing, "Max-Sliced Wasserstein
    Distance and its use for GANs", CVPR 2019.  ``n_init`` random starting directions (or the one
    ``init``) are ascended in parallel for ``n_iter`` steps of projected gradient ascent on ``W_p^p``:
    ``theta <- (theta + s_t g_t / |g_t|) / |.|`` with ``g_t`` the gradient projected on the tangent
    space and ``s_t = lr (1 + cos(pi t / n_iter)) / 2`` (normalizing the gradient makes ``lr`` an angle,
    independent of the scale of the data, where a raw gradient step would need a tuned ``lr``).  The best
    direction visited is kept, so the value is never below the best of the starting directions; it is a
    lower bound of the true maximum, which it reaches on small problems (the tests compare with a
    brute-force search in 2-D).  POT's ``ot.max_sliced_wasserstein_distance`` is a random search.

    Returns ``(distance, theta)``: ``Max-SW_p`` with shape ``batch`` (differentiable with respect to
    ``x``, ``y``, ``a``, ``b`` at the fixed maximizing direction, the envelope theorem's gradient) and the
    unit direction ``theta`` of shape ``(*batch, d)`` (detached).  Random starts come from ``generator``
    or ``seed``.  dtypes as in :func:`sliced_wasserstein`.
    """
    fn = "max_sliced_wasserstein"
    x, y, a, b, dtype = _prepare(x, y, a, b, fn)
    p = _check_p(p, fn)
    backend = _resolve(backend, fn, x, y, a, b, dtype)
    n_iter = _checks.integer(n_iter, "n_iter", fn, low=0)
    lr = _checks.real(lr, "lr", fn)
    n_init = _checks.integer(n_init, "n_init", fn)
    d, batch = x.shape[-1], x.shape[:-2]
    gen = _make_generator(seed, generator, x.device, fn)
    theta = _init_directions(init, "init", d, batch, n_init, dtype, x.device, gen, fn)  # (*batch, K, d)
    xd, yd = x.detach(), y.detach()
    ad = None if a is None else a.detach()
    bd = None if b is None else b.detach()
    best_val = best_theta = None
    for t in range(n_iter + 1):
        th = theta.detach().requires_grad_(t < n_iter)
        with torch.enable_grad() if t < n_iter else torch.no_grad():
            val = _wpp_directions(xd, yd, ad, bd, th, p, backend)[0]  # (*batch, K)
            if t < n_iter:
                (grad,) = torch.autograd.grad(val.sum(), th)
        val = val.detach()
        if best_val is None:
            best_val, best_theta = val, theta
        else:
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_theta = torch.where(better.unsqueeze(-1), theta, best_theta)
        if t < n_iter:
            theta = _sphere_ascent_step(theta, grad, _step_size(lr, t, n_iter))
    pick = best_val.argmax(-1, keepdim=True)  # (*batch, 1)
    theta = torch.gather(best_theta, -2, pick.unsqueeze(-1).expand(*batch, 1, d))  # (*batch, 1, d)
    wpp = _wpp_directions(x, y, a, b, theta, p, backend)[0].squeeze(-1)
    value = wpp.sqrt() if p == 2.0 else wpp.pow(1.0 / p)
    return value, theta.squeeze(-2)


def _wood_cosines(d, kappa, shape, gen, device):
    """``w = <theta, mu>`` for ``theta ~ vMF(mu, kappa)`` on S^{d-1}: Wood (1994)'s rejection sampler (float64).

    ``b = (d-1) / (2 kappa + sqrt(4 kappa^2 + (d-1)^2))``, ``x0 = (1-b)/(1+b)``,
    ``c = kappa x0 + (d-1) log(1 - x0^2)``; propose ``z ~ Beta((d-1)/2, (d-1)/2)``,
    ``w = (1 - (1+b) z) / (1 - (1-b) z)``, accept when ``kappa w + (d-1) log(1 - x0 w) - c >= log U``.
    All proposals of a round are drawn at once; rounds repeat only for the rejected entries.
    ``Beta((d-1)/2, (d-1)/2)`` is drawn as ``(1 + g_1/|g|) / 2`` for ``g ~ N(0, I_d)`` (the first
    coordinate of a uniform point of S^{d-1}), which takes a ``torch.Generator``.
    """
    dm1 = d - 1
    b = dm1 / (2.0 * kappa + math.sqrt(4.0 * kappa * kappa + dm1 * dm1))
    x0 = (1.0 - b) / (1.0 + b)
    c = kappa * x0 + dm1 * math.log1p(-x0 * x0)
    w = torch.zeros(shape, dtype=torch.float64, device=device)
    done = torch.zeros(shape, dtype=torch.bool, device=device)
    for _ in range(1000):
        g = torch.randn((*shape, d), generator=gen, dtype=torch.float64, device=device)
        z = 0.5 * (1.0 + g[..., 0] / torch.linalg.vector_norm(g, dim=-1))
        prop = (1.0 - (1.0 + b) * z) / (1.0 - (1.0 - b) * z)
        u = torch.rand(shape, generator=gen, dtype=torch.float64, device=device)
        accept = kappa * prop + dm1 * torch.log1p(-x0 * prop) - c >= torch.log(u)
        w = torch.where(accept & ~done, prop, w)
        done = done | accept
        if bool(done.all()):
            return w.clamp(-1.0, 1.0)
    raise RuntimeError("vMF rejection sampler did not finish in 1000 rounds")  # acceptance is > 50%


def sample_vmf(mu: torch.Tensor, kappa: float, n_samples: int, *, generator: Optional[torch.Generator] = None,
               seed: Optional[int] = None) -> torch.Tensor:
    r"""``n_samples`` directions from the von Mises–Fisher distribution vMF(mu, kappa) on S^{d-1}.

    Density :math:`\propto \exp(\kappa \mu^\top \theta)`.  Wood, "Simulation of the von Mises Fisher
    distribution", Communications in Statistics - Simulation and Computation 23(1), 1994: the cosine
    ``w = mu^T theta`` by rejection (see ``_wood_cosines``), then ``theta = H (w, sqrt(1 - w^2) v)`` with
    ``v`` uniform on S^{d-2} and ``H`` the Householder reflection mapping ``e_1`` to ``mu``
    (``H = I - 2 u u^T / |u|^2``, ``u = e_1 - mu``; the reparameterization of Davidson et al.,
    "Hyperspherical Variational Auto-Encoders", UAI 2018).

    Differentiable: ``w`` and ``v`` do not depend on ``mu``, so the samples are a smooth function of
    ``mu`` (through ``mu / |mu|`` and ``H``) and gradients with respect to ``mu`` flow (a fixed
    ``generator`` state gives the same ``w``, ``v`` for every ``mu``).  ``kappa`` is a fixed number: the
    rejection step is not differentiable in it.

    Args:
        mu: ``(d,)`` or ``(*batch, d)`` mean directions (normalized here), ``d >= 2``, floating point.
        kappa: concentration ``>= 0`` (0 is the uniform distribution).
        n_samples: samples per mean direction.
    Returns ``(n_samples, d)`` or ``(*batch, n_samples, d)`` unit vectors in ``mu``'s dtype (float32 for
    half inputs); the cosines are drawn in float64.
    """
    fn = "sample_vmf"
    _checks.float_tensor(mu, "mu", fn)
    if mu.dim() < 1 or mu.shape[-1] < 2:
        raise ValueError(f"{fn}: mu must have shape (d,) or (*batch, d) with d >= 2, got {tuple(mu.shape)}")
    kappa = _checks.real(kappa, "kappa", fn, low_ok=True)
    n_samples = _checks.integer(n_samples, "n_samples", fn)
    gen = _make_generator(seed, generator, mu.device, fn)
    return _sample_vmf(mu.to(_compute_dtype(mu.dtype)), kappa, n_samples, gen)


def _sample_vmf(mu, kappa, n_samples, gen):
    d, batch, dtype = mu.shape[-1], mu.shape[:-1], mu.dtype
    mu = _normalize(mu)
    w = _wood_cosines(d, kappa, (*batch, n_samples), gen, mu.device).to(dtype)
    v = _normalize(torch.randn((*batch, n_samples, d - 1), generator=gen, device=mu.device, dtype=dtype))
    s = torch.cat([w.unsqueeze(-1), torch.sqrt((1 - w * w).clamp_min(0)).unsqueeze(-1) * v], -1)
    e1 = torch.zeros(d, dtype=dtype, device=mu.device)
    e1[0] = 1
    u = (e1 - mu).unsqueeze(-2)  # (*batch, 1, d)
    uu = (u * u).sum(-1, keepdim=True)
    safe = uu > 1e-12  # mu == e_1: H = I
    coef = torch.where(safe, 2.0 / torch.where(safe, uu, torch.ones_like(uu)), torch.zeros_like(uu))
    return s - coef * (s * u).sum(-1, keepdim=True) * u


def vmf_distributional_sliced_wasserstein(
        x: torch.Tensor, y: torch.Tensor, a: Optional[torch.Tensor] = None, b: Optional[torch.Tensor] = None, *,
        kappa: float = 10.0, n_projections: int = 50, p: float = 2, n_iter: int = 10, lr: float = 0.5,
        init: Optional[torch.Tensor] = None, seed: Optional[int] = None, generator: Optional[torch.Generator] = None,
        return_projections: bool = False, backend: str = "auto",
) -> Union[Tuple[torch.Tensor, torch.Tensor], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    r"""v-DSW: sliced Wasserstein with von Mises–Fisher directions around an optimized mean direction.

    .. math::
        \text{v-DSW}_p(\mu, \nu) = \max_{\epsilon \in \mathbb S^{d-1}}
            \Big( \mathbb E_{\theta \sim \text{vMF}(\epsilon, \kappa)} W_p^p(\theta\#\mu, \theta\#\nu) \Big)^{1/p}

    Nguyen, Nguyen, Ho, "Self-Attention Amortized Distributional Projection Optimization for Sliced
    Wasserstein Point-Cloud Reconstruction", ICML 2023 (the vMF family of distributional SW,
    Nguyen et al., "Distributional Sliced-Wasserstein and Applications to Generative Modeling",
    ICLR 2021).  Starting from ``init`` (or a random direction), ``n_iter`` steps of projected
    stochastic gradient ascent on the Monte-Carlo objective
    ``1/L sum_l W_p^p(theta_l)`` with ``theta_l ~ vMF(epsilon, kappa)`` reparameterized (see
    :func:`sample_vmf`), fresh directions every step, the step rule of :func:`max_sliced_wasserstein`
    (normalized tangent gradient, step ``lr`` decayed by a cosine; the paper adds the raw gradient times
    a learning rate, then renormalizes).  The distance is then estimated with
    ``L = n_projections`` fresh vMF directions around the final ``epsilon``.  ``kappa -> inf`` tends to
    Max-SW, ``kappa = 0`` to SW.

    Returns ``(distance, epsilon)``: the estimate with shape ``batch`` (differentiable with respect to
    ``x``, ``y``, ``a``, ``b`` at the fixed directions) and the mean direction ``(*batch, d)``
    (detached); with ``return_projections`` also the final directions in POT's layout ``(*batch, d, L)``
    (``sliced_wasserstein(x, y, projections=...)`` on them gives the same distance).  Needs ``d >= 2``.
    dtypes as in :func:`sliced_wasserstein`.
    """
    fn = "vmf_distributional_sliced_wasserstein"
    x, y, a, b, dtype = _prepare(x, y, a, b, fn)
    p = _check_p(p, fn)
    backend = _resolve(backend, fn, x, y, a, b, dtype)
    kappa = _checks.real(kappa, "kappa", fn, low_ok=True)
    n_projections = _checks.integer(n_projections, "n_projections", fn)
    n_iter = _checks.integer(n_iter, "n_iter", fn, low=0)
    lr = _checks.real(lr, "lr", fn)
    d, batch = x.shape[-1], x.shape[:-2]
    if d < 2:
        raise ValueError(f"{fn}: the vMF distribution needs d >= 2, got x with d={d}")
    gen = _make_generator(seed, generator, x.device, fn)
    eps = _init_directions(init, "init", d, batch, 1, dtype, x.device, gen, fn).squeeze(-2)  # (*batch, d)
    xd, yd = x.detach(), y.detach()
    ad = None if a is None else a.detach()
    bd = None if b is None else b.detach()
    for t in range(n_iter):
        e = eps.detach().requires_grad_(True)
        with torch.enable_grad():
            dirs = _sample_vmf(e, kappa, n_projections, gen)  # (*batch, L, d)
            val = _wpp_directions(xd, yd, ad, bd, dirs, p, backend)[0].mean(-1)
            (grad,) = torch.autograd.grad(val.sum(), e)
        eps = _sphere_ascent_step(eps, grad, _step_size(lr, t, n_iter))
    dirs = _sample_vmf(eps, kappa, n_projections, gen)
    sw = _wpp_directions(x, y, a, b, dirs, p, backend)[0].mean(-1)
    value = sw.sqrt() if p == 2.0 else sw.pow(1.0 / p)
    return (value, eps, dirs.mT) if return_projections else (value, eps)
