"""Native and Triton entry points registered as ``torch.library.custom_op``s.

Each op takes already-validated lists (same device, same dtype, dense, matching layouts; see
``fastopt.optim.functional``) and a resolved kernel backend ('cuda', 'triton' or 'cpu').  The fake
implementations let ``torch.compile`` see the ops; they mutate in place and return nothing.

In eager mode the public callers (``adam_step`` ...) skip the custom-op dispatcher, whose Python layers
cost about half a millisecond per call, and call the kernel directly, bumping the autograd version
counters of what it mutated themselves; under ``torch.compile`` they call the custom op.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import _backend


def _addrs(tensors):
    return [t.data_ptr() for t in tensors]


def _scalar_addr(t):
    return 0 if t is None else t.data_ptr()


def _run_native(backend, name, device, args, op):
    """``fastopt._C.<name>_cpu(*args)`` or ``<name>_cuda(*args, stream)`` on ``device``'s current stream."""
    native = _backend.native()
    if backend == "cpu":
        getattr(native, name + "_cpu")(*args)
    elif backend == "cuda":
        with torch.cuda.device(device):
            getattr(native, name + "_cuda")(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        raise ValueError(f"fastopt::{op} has no kernel backend {backend!r}")


def _adam_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
               beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
               maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], backend: str) -> None:
    """Fused Adam/AdamW over lists of tensors (see fastopt.optim.functional.adam for the semantics)."""
    if not params:
        return
    if backend == "triton":
        _backend.triton_kernels().adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf)
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    args = (
        [a for lst in lists for a in _addrs(lst)], [p.numel() for p in params], _addrs(state_steps),
        _backend.dtype_code(params[0].dtype), lr, _scalar_addr(lr_tensor), beta1, beta2, eps, weight_decay,
        decoupled, amsgrad, maximize, _scalar_addr(grad_scale), _scalar_addr(found_inf),
    )
    _run_native(backend, "adam", params[0].device, args, "adam_step_")


adam_step_ = torch.library.custom_op(
    "fastopt::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)(_adam_kernel)


@adam_step_.register_fake
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1,
                    beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend):
    return None


def _eager_or_op(op, kernel, mutated, args):
    if torch.compiler.is_compiling():
        op(*args)
        return
    kernel(*args)
    torch.autograd.graph.increment_version([t for lst in mutated for t in lst])


def adam_step(*args):
    """``fastopt::adam_step_`` (same arguments), without the dispatcher's overhead in eager mode."""
    params, _grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = args[:6]
    _eager_or_op(adam_step_, _adam_kernel, (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), args)


def _elementwise_kernel(op: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
                        state_steps: List[Tensor], hyper: List[float], flags: int, lr: float,
                        lr_tensor: Optional[Tensor], maximize: bool, grad_scale: Optional[Tensor],
                        found_inf: Optional[Tensor], phase: int, rows: List[int], row_coef: Optional[Tensor],
                        reduce_out: Optional[Tensor], seed: int, stochastic: bool, backend: str,
                        sparse_mask: List[Tensor], sparse_out: List[Tensor], sparse_lambda: float,
                        sparse_beta: float) -> None:
    """One call of a registered elementwise op (``csrc/include/fastopt/ops.h``): ``states`` holds the
    op's state lists one after the other (``k * len(params)`` tensors).  Phase 0 is the update and
    increments ``state_steps``; phase 1 adds per-row sums into ``reduce_out`` (fp32 ``[rows, 4]``).
    ``sparse_mask`` (one bool mask per param, or []) adds the sparse-training epilogue to phase 0:
    the params are dense weights, ``g += sparse_lambda * p`` where the mask is False, and
    ``sparse_out`` (forward weights, or []) gets ``mask ? p : sparse_beta * p`` (see
    ``csrc/include/fastopt/elementwise.h``)."""
    if not params:
        return
    n = len(params)
    nstates = len(states) // n
    if backend == "triton":
        lists = [params, grads] + [states[k * n:(k + 1) * n] for k in range(nstates)]
        _backend.triton_kernels().elementwise_step(
            op, lists, state_steps, hyper=hyper, flags=flags, lr=lr_tensor if lr_tensor is not None else lr,
            grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0, phase=phase,
            rows=rows or None, row_coef=row_coef, reduce_out=reduce_out, seed=seed, stochastic=stochastic,
            sparse_mask=sparse_mask, sparse_out=sparse_out, sparse_lambda=sparse_lambda, sparse_beta=sparse_beta)
        return
    args = (
        op, _addrs(params) + _addrs(grads) + _addrs(states), [p.numel() for p in params], _addrs(state_steps),
        _backend.dtype_code(params[0].dtype), list(hyper), int(flags), float(lr), _scalar_addr(lr_tensor),
        _scalar_addr(grad_scale), _scalar_addr(found_inf), bool(maximize), int(phase), list(rows),
        _scalar_addr(row_coef), _scalar_addr(reduce_out), int(seed) & 0xFFFFFFFFFFFFFFFF, bool(stochastic),
        _addrs(sparse_mask), _addrs(sparse_out) if sparse_mask else [],
        float(sparse_lambda), float(sparse_beta),
    )
    _run_native(backend, "elementwise", params[0].device, args, "elementwise_step_")


elementwise_step_ = torch.library.custom_op(
    "fastopt::elementwise_step_",
    mutates_args=("params", "states", "state_steps", "reduce_out", "sparse_out"),
)(_elementwise_kernel)


@elementwise_step_.register_fake
def _elementwise_step_fake(op, params, grads, states, state_steps, hyper, flags, lr, lr_tensor, maximize,
                           grad_scale, found_inf, phase, rows, row_coef, reduce_out, seed, stochastic, backend,
                           sparse_mask, sparse_out, sparse_lambda, sparse_beta):
    return None


def elementwise_step(*args):
    """``fastopt::elementwise_step_`` (same arguments), without the dispatcher's overhead in eager mode."""
    params, states, state_steps, reduce_out = args[1], args[3], args[4], args[15]
    mutated = (params, states, state_steps, args[20]) + (([reduce_out],) if reduce_out is not None else ())
    _eager_or_op(elementwise_step_, _elementwise_kernel, mutated, args)


def _lowbit_kernel(op: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor], absmax: List[Tensor],
                   books: List[Tensor], block: int, state_steps: List[Tensor], hyper: List[float], flags: int,
                   lr: float, lr_tensor: Optional[Tensor], maximize: bool, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor], seed: int, stochastic: bool, colmax: List[Tensor],
                   rank1: List[bool], rank1_rows: List[int], backend: str) -> None:
    """One step of a registered elementwise op with low-bit states (``csrc/include/fastopt/quant.h``):
    ``states`` holds the op's state lists one after the other (uint8 codes for a quantized state, the
    params' dtype for a plain one); ``books`` one int32 codebook per state (an empty tensor: plain);
    ``absmax`` the fp32 block maxima of the quantized states, state after state.  Rank-1 normalized
    states (``rank1[k]``; CPU only) hold row maxima in ``absmax`` and column maxima in ``colmax`` (the
    rank-1 states' lists, state after state); ``rank1_rows`` gives each tensor's rows."""
    if not params:
        return
    n = len(params)
    nstates = len(books)
    quantized = [b.numel() > 0 for b in books]
    per_state, it = [], iter(absmax)
    for q in quantized:
        per_state.append([next(it) for _ in range(n)] if q else None)
    any_r1 = any(rank1)
    if any_r1 and backend != "cpu":
        raise _backend.BackendUnavailableError(
            f"rank-1 normalized low-bit states run on the cpu and torch backends only, not {backend!r}")
    if backend == "triton":
        lists = [params, grads] + [states[k * n:(k + 1) * n] for k in range(nstates)]
        _backend.triton_kernels().lowbit_step(
            op, lists, state_steps, books=[b if q else None for b, q in zip(books, quantized)], absmax=per_state,
            block=block, hyper=hyper, flags=flags, lr=lr_tensor if lr_tensor is not None else lr,
            grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0, seed=seed,
            stochastic=stochastic)
        return
    absmax_addrs = []
    for lst in per_state:
        absmax_addrs += _addrs(lst) if lst is not None else [0] * n
    colmax_addrs, it = [], iter(colmax)
    if any_r1:
        for r in (list(rank1) + [False] * nstates)[:nstates]:
            colmax_addrs += [next(it).data_ptr() for _ in range(n)] if r else [0] * n
    args = (
        op, _addrs(params) + _addrs(grads) + _addrs(states), [p.numel() for p in params], _addrs(state_steps),
        _backend.dtype_code(params[0].dtype), list(hyper), int(flags), float(lr), _scalar_addr(lr_tensor),
        _scalar_addr(grad_scale), _scalar_addr(found_inf), bool(maximize), 0, [], 0, 0,
        int(seed) & 0xFFFFFFFFFFFFFFFF, bool(stochastic),
        [b.data_ptr() if q else 0 for b, q in zip(books, quantized)], absmax_addrs, int(block), colmax_addrs,
        [int(r) for r in rank1_rows] if any_r1 else [],
    )
    _run_native(backend, "lowbit", params[0].device, args, "lowbit_step_")


lowbit_step_ = torch.library.custom_op(
    "fastopt::lowbit_step_",
    mutates_args=("params", "states", "absmax", "state_steps", "colmax"),
)(_lowbit_kernel)


@lowbit_step_.register_fake
def _lowbit_step_fake(op, params, grads, states, absmax, books, block, state_steps, hyper, flags, lr, lr_tensor,
                      maximize, grad_scale, found_inf, seed, stochastic, colmax, rank1, rank1_rows, backend):
    return None


def lowbit_step(*args):
    """``fastopt::lowbit_step_`` (same arguments), without the dispatcher's overhead in eager mode."""
    params, states, absmax, state_steps, colmax = args[1], args[3], args[4], args[7], args[17]
    _eager_or_op(lowbit_step_, _lowbit_kernel, (params, states, absmax, state_steps, colmax), args)


def _codec_kernel(x: Tensor, codes: Tensor, absmax: Tensor, book: Tensor, block: int, dequantize: bool,
                  backend: str) -> None:
    """Blockwise quantize (``x`` -> ``codes``, ``absmax``) or dequantize (-> ``x``) of one fp32 buffer."""
    if x.numel() == 0:
        return
    if backend == "triton":
        _backend.triton_kernels().quantize_blockwise(x, codes, absmax, book, block, dequantize=dequantize)
        return
    args = (x.data_ptr(), codes.data_ptr(), absmax.data_ptr(), x.numel(), int(block), book.data_ptr(), bool(dequantize))
    _run_native(backend, "quantize", x.device, args, "blockwise_codec_")


blockwise_codec_ = torch.library.custom_op(
    "fastopt::blockwise_codec_", mutates_args=("x", "codes", "absmax"),
)(_codec_kernel)


@blockwise_codec_.register_fake
def _codec_fake(x, codes, absmax, book, block, dequantize, backend):
    return None


def blockwise_codec(*args):
    """``fastopt::blockwise_codec_`` without the dispatcher in eager mode."""
    _eager_or_op(blockwise_codec_, _codec_kernel, ([args[0]], [args[1]], [args[2]]), args)


def _nm_mask_kernel(x: Tensor, out: Tensor, outer: int, length: int, inner: int, n: int, m: int,
                    backend: str) -> None:
    """N:M mask of the contiguous ``x`` viewed as [outer, length, inner] into uint8 ``out``."""
    if x.numel() == 0:
        return
    if backend == "triton":
        _backend.triton_kernels().nm_mask(x, out, outer, length, inner, n, m)
        return
    args = (x.data_ptr(), out.data_ptr(), outer, length, inner, n, m, _backend.dtype_code(x.dtype))
    _run_native(backend, "nm_mask", x.device, args, "nm_mask_")


nm_mask_ = torch.library.custom_op("fastopt::nm_mask_", mutates_args=("out",))(_nm_mask_kernel)


@nm_mask_.register_fake
def _nm_mask_fake(x, out, outer, length, inner, n, m, backend):
    return None


def nm_mask(*args):
    """``fastopt::nm_mask_`` without the dispatcher in eager mode."""
    _eager_or_op(nm_mask_, _nm_mask_kernel, ([args[1]],), args)


def _tile24_kernel(x: Tensor, out: Tensor, rows: int, cols: int, exact: bool, backend: str) -> None:
    """Transposable 2:4 mask of the contiguous [rows, cols] ``x`` into uint8 ``out``."""
    if x.numel() == 0:
        return
    if backend == "triton":
        _backend.triton_kernels().transposable24(x, out, rows, cols, exact)
        return
    args = (x.data_ptr(), out.data_ptr(), rows, cols, _backend.dtype_code(x.dtype), bool(exact))
    _run_native(backend, "tile24_mask", x.device, args, "tile24_mask_")


tile24_mask_ = torch.library.custom_op("fastopt::tile24_mask_", mutates_args=("out",))(_tile24_kernel)


@tile24_mask_.register_fake
def _tile24_fake(x, out, rows, cols, exact, backend):
    return None


def tile24_mask(*args):
    """``fastopt::tile24_mask_`` without the dispatcher in eager mode."""
    _eager_or_op(tile24_mask_, _tile24_kernel, ([args[1]],), args)


def _ot_pass_kernel(x: Optional[Tensor], y: Optional[Tensor], cost_matrix: Optional[Tensor], h: Tensor,
                    c: Optional[Tensor], out: Tensor, eps: float, cost: int, kind: int, backend: str) -> None:
    """One entropic-OT pass (``csrc/include/fastopt/api.h`` OtArgs, ``triton_kernels/ot.py``) into ``out``:
    kind 0 ``out_i = LSE_j(h_j - C_ij / eps)``, kind 1 ``out_i = sum_j exp(c_i + h_j - C_ij / eps) dC_ij/dx_i``
    over contiguous points ``x`` (B, n, d), ``y`` (B, m, d) or a dense ``cost_matrix`` (B, n, m)."""
    if out.numel() == 0:
        return
    if backend == "triton":
        _backend.triton_kernels().ot_pass(x, y, cost_matrix, h, c, out, eps, cost, kind)
        return
    ref = cost_matrix if cost_matrix is not None else x
    d = 0 if cost_matrix is not None else x.shape[2]
    args = (_scalar_addr(x), _scalar_addr(y), _scalar_addr(cost_matrix), h.data_ptr(), _scalar_addr(c), out.data_ptr(),
            ref.shape[0], ref.shape[1], h.shape[1], d, int(cost), int(kind), float(eps),
            _backend.dtype_code(ref.dtype))
    _run_native(backend, "ot_pass", ref.device, args, "ot_pass_")


ot_pass_ = torch.library.custom_op("fastopt::ot_pass_", mutates_args=("out",))(_ot_pass_kernel)


@ot_pass_.register_fake
def _ot_pass_fake(x, y, cost_matrix, h, c, out, eps, cost, kind, backend):
    return None


def ot_pass(*args):
    """``fastopt::ot_pass_`` without the dispatcher in eager mode."""
    _eager_or_op(ot_pass_, _ot_pass_kernel, ([args[5]],), args)


def _sliced_wpp_kernel(x: Tensor, y: Tensor, dirs: Optional[Tensor], wpp: Tensor, cx: Tensor, cy: Tensor,
                       p: float, grad: bool, backend: str) -> None:
    """Sliced-Wasserstein projection + sort + ``W_p^p`` per direction (``triton_kernels/sliced.py``):
    ``x``, ``y`` (B, n, d) points with ``dirs`` (1 or B, L, d), or (B, L, n) projections with ``dirs``
    None, into ``wpp`` (B, L); with ``grad``, ``d wpp / d projection`` into ``cx``, ``cy`` (B, L, n).
    Triton only: there is no C++ kernel."""
    if backend != "triton":
        raise _backend.BackendUnavailableError(f"sliced_wpp has only a triton kernel, got backend {backend!r}")
    _backend.triton_kernels().sliced_wpp(x, y, dirs, wpp, cx, cy, p, grad)


sliced_wpp_ = torch.library.custom_op("fastopt::sliced_wpp_", mutates_args=("wpp", "cx", "cy"))(_sliced_wpp_kernel)


@sliced_wpp_.register_fake
def _sliced_wpp_fake(x, y, dirs, wpp, cx, cy, p, grad, backend):
    return None


def sliced_wpp(*args):
    """``fastopt::sliced_wpp_`` without the dispatcher in eager mode."""
    _eager_or_op(sliced_wpp_, _sliced_wpp_kernel, ([args[3]], [args[4]], [args[5]]), args)
