"""Triton kernels of GaLore's projected step (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection"; INT4 projectors as in Q-GaLore, Zhang et al. 2024).

For an m x n gradient ``G`` and a rank-r projector ``P``:

* side ``"right"``: ``P`` is r x n, the low-rank gradient is ``G @ P.T`` (m x r), back-projection ``U @ P``;
* side ``"left"``:  ``P`` is m x r, the low-rank gradient is ``P.T @ G`` (r x n), back-projection ``P @ U``.

Two kernels, each one GEMM with a fused epilogue:

* :func:`project_adam` -- tiles of the low-rank gradient accumulated in fp32, then on each finished tile the
  Adam moment update (in place) and the normalized update (a new fp32 tensor).  The low-rank gradient itself
  is never written to memory.
* :func:`back_project_` -- ``param = beta * param + alpha * back(update)``, tile by tile, in place; no
  full-size temporary.

Numerics: every operand is converted to fp32 in registers and the dots use ``input_precision="ieee"`` (no
TF32, which would round the operands to 10-bit mantissas; on sm_90 each term is an ``fma.rn.f32`` into the fp32
accumulator); epilogues in fp32 with IEEE-rounded division and square root (``tl.div_rn``, ``tl.sqrt_rn``:
``div.rn.f32`` / ``sqrt.rn.f32`` in the PTX) and fp fusion pinned off (no FMA contraction in the epilogue),
bf16 / fp16 parameters rounded to nearest even on store.  The only difference from torch's fp32 ``matmul``
+ elementwise ops is the summation (and FMA) order inside the dot products.

INT4 projectors (``int4=(codes, scales, zeros, group_size)``): ``codes`` uint8, two 4-bit codes per byte,
low nibble first, over the row-major flattening of ``P``; ``scales`` / ``zeros`` fp32, one per group of
``group_size`` consecutive elements of that flattening.  Element ``e`` of ``P`` is
``scales[e // group_size] * (code_e - zeros[e // group_size])`` (Q-GaLore's dequantization,
``q_galore_torch.q_galore_projector.GaLoreProjector``, in fp32), computed inside the GEMM's operand load: the
dense projector never exists in memory.

Tile sizes are fixed per shape (no autotuning: both kernels update tensors in place, which an autotuner
would re-run); see :func:`_project_blocks` and :func:`_back_blocks`.  Under ``TRITON_INTERPRET=1`` (CPU
tests) the same kernels run on CPU tensors.
"""
import contextlib
import math
import numbers
import os

import torch
import triton
import triton.language as tl

from .compile_audit import capturing
from .multi_tensor import to_bf16_rne

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_INDEX32_LIMIT = 2 ** 31


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# -- device code --------------------------------------------------------------------------------------------

@triton.jit
def _proj_tile(p_ptr, codes_ptr, scales_ptr, zeros_ptr, flat, mask, GROUP, INT4: tl.constexpr):
    """The projector's elements at row-major flat indices ``flat`` (a 2-D int32 tile), fp32; 0 where masked.
    INT4: the nibble ``flat`` of ``codes`` (low nibble first), dequantized as scales[g] * (code - zeros[g])."""
    if INT4:
        byte = tl.load(codes_ptr + (flat >> 1), mask=mask, other=0).to(tl.int32)
        code = ((byte >> ((flat & 1) * 4)) & 15).to(tl.float32)
        grp = flat // GROUP
        s = tl.load(scales_ptr + grp, mask=mask, other=0.0)
        z = tl.load(zeros_ptr + grp, mask=mask, other=0.0)
        return s * (code - z)
    else:
        return tl.load(p_ptr + flat, mask=mask, other=0.0)


@triton.jit
def _output_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """This program's output tile of an M x N result (row-major order of the tiles): its row and column
    indices and their in-bounds masks."""
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    rm = (pid // num_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = (pid % num_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rm, rn, rm < M, rn < N


@triton.jit
def _project_adam_kernel(g_ptr, p_ptr, codes_ptr, scales_ptr, zeros_ptr, m_ptr, v_ptr, u_ptr, gs_ptr,
                         M, N, K, stride_g, P_COLS, GROUP,
                         beta1, c1, beta2, c2, eps, neg_step,
                         LEFT: tl.constexpr, INT4: tl.constexpr, HAS_SCALE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """low (M x N) = A @ B over K, then Adam on the tile.

    right: A = G (m x n, row stride ``stride_g``), B = P^T (P r x n: B[k, j] = P[j, k]); M = m, N = r, K = n.
    left:  A = P^T (P m x r: A[i, k] = P[k, i]), B = G;                                 M = r, N = n, K = m.
    exp_avg (``m_ptr``), exp_avg_sq (``v_ptr``) and the update (``u_ptr``) are contiguous M x N fp32."""
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k0 * BLOCK_K + rk
        k_ok = kk < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        if LEFT:
            a = _proj_tile(p_ptr, codes_ptr, scales_ptr, zeros_ptr, kk[None, :] * P_COLS + rm[:, None], a_mask,
                           GROUP, INT4)
            b = tl.load(g_ptr + kk.to(tl.int64)[:, None] * stride_g + rn[None, :], mask=b_mask,
                        other=0.0).to(tl.float32)
        else:
            a = tl.load(g_ptr + rm.to(tl.int64)[:, None] * stride_g + kk[None, :], mask=a_mask,
                        other=0.0).to(tl.float32)
            b = _proj_tile(p_ptr, codes_ptr, scales_ptr, zeros_ptr, rn[None, :] * P_COLS + kk[:, None], b_mask,
                           GROUP, INT4)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    # epilogue: Adam on the finished tile (galore-torch's AdamW with the bias corrections in step_size)
    g = acc
    if HAS_SCALE:
        g = tl.div_rn(g, tl.load(gs_ptr) + tl.zeros_like(g))
    off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    ea = tl.load(m_ptr + off, mask=mask, other=0.0)
    ev = tl.load(v_ptr + off, mask=mask, other=0.0)
    ea = ea * beta1 + c1 * g
    ev = ev * beta2 + c2 * g * g
    tl.store(m_ptr + off, ea, mask=mask)
    tl.store(v_ptr + off, ev, mask=mask)
    upd = tl.div_rn(ea, tl.sqrt_rn(ev) + eps) * neg_step
    tl.store(u_ptr + off, upd, mask=mask)


@triton.jit
def _back_project_kernel(x_ptr, u_ptr, p_ptr, codes_ptr, scales_ptr, zeros_ptr, M, N, R, GROUP, beta, alpha,
                         LEFT: tl.constexpr, INT4: tl.constexpr, DTYPE: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """param (M x N, contiguous, ``DTYPE``) = beta * param + alpha * back(U), in place.

    right: back(U) = U @ P, U M x R (fp32), P R x N;  left: back(U) = P @ U, P M x R, U R x N (fp32)."""
    rm, rn, m_ok, n_ok = _output_tile(M, N, BLOCK_M, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(R, BLOCK_K)):
        kk = k0 * BLOCK_K + rk
        k_ok = kk < R
        a_mask = m_ok[:, None] & k_ok[None, :]
        b_mask = k_ok[:, None] & n_ok[None, :]
        if LEFT:
            a = _proj_tile(p_ptr, codes_ptr, scales_ptr, zeros_ptr, rm[:, None] * R + kk[None, :], a_mask, GROUP, INT4)
            b = tl.load(u_ptr + kk.to(tl.int64)[:, None] * N + rn[None, :], mask=b_mask, other=0.0)
        else:
            a = tl.load(u_ptr + rm.to(tl.int64)[:, None] * R + kk[None, :], mask=a_mask, other=0.0)
            b = _proj_tile(p_ptr, codes_ptr, scales_ptr, zeros_ptr, kk[:, None] * N + rn[None, :], b_mask, GROUP, INT4)
        acc = tl.dot(a, b, acc, input_precision="ieee")
    off = rm.to(tl.int64)[:, None] * N + rn[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    x = tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
    out = x * beta + alpha * acc
    if DTYPE == tl.bfloat16:
        tl.store(x_ptr + off, to_bf16_rne(out), mask=mask)
    else:
        tl.store(x_ptr + off, out.to(DTYPE), mask=mask)


# -- tile sizes (fixed per shape; the compile audit compiles each) ---------------------------------------------

def _pow2_clamp(x, lo, hi):
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def _project_blocks(side, m, n, r, elem=4):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of :func:`project_adam`'s launch.  The rank side of
    the output tile is r rounded up to a power of two, at least 16 and at most 32 for side "right" (the
    projector operand is k-contiguous there: a 64 x 64 tile took 190-255 registers and spilled with 4 warps
    on sm_90) and 64 for side "left"; the other side 64; K steps of 16 for fp32 gradients and 32 for
    bf16 / fp16 ones (``elem``: the gradient's element size), so that each thread's share of a gradient tile
    is one 16-byte copy; 8 warps (no spills in any variant, see tests/test_triton_compile_all.py).  Not tuned
    on a GPU."""
    bk = 16 if elem == 4 else 32
    if side == "right":
        return 64, _pow2_clamp(r, 16, 32), bk, 8, 3
    return _pow2_clamp(r, 16, 64), 64, bk, 8, 3


def _back_blocks(side, m, n, r):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) of :func:`back_project_`: 64 x 64 output tiles, K
    steps of 16 over the rank, 8 warps (4 warps spilled in the INT4 variants on sm_90).  Not tuned on a GPU."""
    return 64, 64, 16, 8, 2


# -- host side: validation -------------------------------------------------------------------------------------

def _device_ok(t):
    return t.device.type == "cuda" or (t.device.type == "cpu" and (_interpret() or capturing()))


def _check_tensor(t, name, dtypes, device):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in {[str(d) for d in dtypes]}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} (all tensors on one device)")
    if not _device_ok(t):
        raise ValueError(f"the low-rank Triton kernels need CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
                         f"{name} is on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_number(x, name, lo=None, hi=None, lo_open=False, hi_open=False):
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name} must be a real number (Python int or float), got {type(x).__name__}")
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"{name} must be finite, got {x}")
    if lo is not None and (x < lo or (lo_open and x == lo)):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {x}")
    if hi is not None and (x > hi or (hi_open and x == hi)):
        raise ValueError(f"{name} must be {'<' if hi_open else '<='} {hi}, got {x}")
    return x


def _check_side(side):
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")


def _proj_operands(proj, int4, proj_shape, device):
    """(P's shape, p tensor, codes, scales, zeros, group_size, INT4) after validation.  The unused pointer
    arguments get a valid tensor of the call (never read)."""
    if int4 is None:
        if proj is None:
            raise ValueError("proj is None: pass the fp32 projector, or int4=(codes, scales, zeros, group_size)")
        _check_tensor(proj, "proj", (torch.float32,), device)
        if proj.ndim != 2:
            raise ValueError(f"proj must be 2-D, got shape {tuple(proj.shape)}")
        if proj_shape is not None and tuple(proj_shape) != tuple(proj.shape):
            raise ValueError(f"proj_shape {tuple(proj_shape)} does not match proj's shape {tuple(proj.shape)}")
        shape = tuple(proj.shape)
        if proj.numel() >= _INDEX32_LIMIT:
            raise ValueError(f"proj has {proj.numel()} elements; at most 2**31 - 1 are supported")
        return shape, proj, proj, proj, proj, 1, False
    if proj is not None:
        raise ValueError("pass either proj or int4, not both (with int4, proj must be None)")
    if not isinstance(int4, (tuple, list)) or len(int4) != 4:
        raise TypeError("int4 must be a tuple (codes, scales, zeros, group_size)")
    codes, scales, zeros, group = int4
    if proj_shape is None:
        raise ValueError("int4 needs proj_shape, the projector's (rows, cols)")
    try:
        shape = tuple(int(s) for s in proj_shape)
    except TypeError:
        raise TypeError(f"proj_shape must be a pair of ints, got {proj_shape!r}") from None
    if len(shape) != 2 or any(s < 0 for s in shape):
        raise ValueError(f"proj_shape must be two non-negative ints, got {proj_shape!r}")
    numel = shape[0] * shape[1]
    if numel >= _INDEX32_LIMIT:
        raise ValueError(f"the projector has {numel} elements; at most 2**31 - 1 are supported")
    if isinstance(group, bool) or not isinstance(group, numbers.Integral):
        raise TypeError(f"int4 group_size must be an int, got {type(group).__name__}")
    group = int(group)
    if group <= 0 or numel % group:
        raise ValueError(f"int4 group_size must be a positive divisor of the projector's {numel} elements, got {group}")
    _check_tensor(codes, "int4 codes", (torch.uint8,), device)
    if codes.numel() != (numel + 1) // 2:
        raise ValueError(f"int4 codes must hold {(numel + 1) // 2} bytes (two codes per byte) for a projector of "
                         f"shape {shape}, got {codes.numel()}")
    for t, nm in ((scales, "int4 scales"), (zeros, "int4 zeros")):
        _check_tensor(t, nm, (torch.float32,), device)
        if t.numel() != numel // group:
            raise ValueError(f"{nm} must have {numel // group} elements (one per group of {group}), got {t.numel()}")
    return shape, codes, codes, scales, zeros, group, True


def _overlaps(a, b):
    """True when the (contiguous, non-empty) tensors share any byte of memory."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_no_overlap(written, others):
    """Each tensor written in place (name, tensor) must not share memory with any other operand."""
    for i, (wn, w) in enumerate(written):
        for on, o in list(written[:i]) + list(others):
            if o is not None and _overlaps(w, o):
                raise ValueError(f"{wn} must not share memory with {on}")


def _device_guard(t):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


# -- host side: the two entry points -----------------------------------------------------------------------

def _layout(side, t, name, proj, int4, proj_shape):
    """Check the m x n tensor ``t`` (the gradient or the parameter) and the projector of ``side`` against it;
    (m, n, r, the low-rank shape, then :func:`_proj_operands`' projector operands)."""
    _check_side(side)
    _check_tensor(t, name, tuple(_TL_DTYPES), None)
    if t.ndim != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    shape, p_t, codes, scales, zeros, group, is_int4 = _proj_operands(proj, int4, proj_shape, t.device)
    m, n = t.shape
    if side == "right":
        r, pn = shape
        if pn != n:
            raise ValueError(f"side='right': proj must be r x n = (r, {n}), got {shape}")
        low_shape = (m, r)
    else:
        pm, r = shape
        if pm != m:
            raise ValueError(f"side='left': proj must be m x r = ({m}, r), got {shape}")
        low_shape = (r, n)
    if r <= 0:
        raise ValueError(f"the rank must be positive, got a projector of shape {shape}")
    return m, n, r, low_shape, p_t, codes, scales, zeros, group, is_int4


def project_adam(grad, proj, side, exp_avg, exp_avg_sq, *, beta1, beta2, eps, step_size, grad_scale=None,
                 int4=None, proj_shape=None):
    """GaLore's projected Adam step in one kernel: project the gradient and update the low-rank moments.

    ``grad``: m x n, fp32 / bf16 / fp16, contiguous.  ``proj`` (fp32, contiguous): r x n for ``side="right"``
    (low = grad @ proj.T, m x r), m x r for ``side="left"`` (low = proj.T @ grad, r x n); or ``proj=None``
    with ``int4=(codes, scales, zeros, group_size)`` and ``proj_shape`` (see the module docstring).
    ``exp_avg`` / ``exp_avg_sq``: fp32, contiguous, of the low-rank shape, updated in place.
    ``grad_scale``: optional 1-element fp32 tensor on the device (AMP's loss scale), read by the kernel.

    Per element of the low-rank gradient (computed in fp32 tiles, never stored)::

        g = low / grad_scale                          (if grad_scale is given)
        exp_avg    = exp_avg * beta1 + (1 - beta1) * g
        exp_avg_sq = exp_avg_sq * beta2 + (1 - beta2) * g * g
        update     = exp_avg / (sqrt(exp_avg_sq) + eps) * (-step_size)

    galore-torch 1.0's ``GaLoreAdamW`` moments and normalized gradient (with ``step_size = lr * sqrt(1 - beta2^t)
    / (1 - beta1^t)`` computed by the caller).  Returns the update: a new fp32 tensor of the low-rank shape.
    Inputs are validated before anything is written (TypeError / ValueError naming the argument).
    """
    m, n, r, low_shape, p_t, codes, scales, zeros, group, is_int4 = _layout(side, grad, "grad", proj, int4, proj_shape)
    dev = grad.device
    M, N, K, p_cols = (m, r, n, n) if side == "right" else (r, n, m, r)
    for t, nm in ((exp_avg, "exp_avg"), (exp_avg_sq, "exp_avg_sq")):
        _check_tensor(t, nm, (torch.float32,), dev)
        if tuple(t.shape) != low_shape:
            raise ValueError(f"{nm} must have the low-rank shape {low_shape}, got {tuple(t.shape)}")
    beta1 = _check_number(beta1, "beta1", 0.0, 1.0, hi_open=True)
    beta2 = _check_number(beta2, "beta2", 0.0, 1.0, hi_open=True)
    eps = _check_number(eps, "eps", 0.0)
    step_size = _check_number(step_size, "step_size")
    if grad_scale is not None:
        _check_tensor(grad_scale, "grad_scale", (torch.float32,), dev)
        if grad_scale.numel() != 1:
            raise ValueError(f"grad_scale must have exactly one element, got {grad_scale.numel()}")
    _check_no_overlap([("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)],
                      [("grad", grad), ("proj" if int4 is None else "int4 codes", p_t), ("int4 scales", scales),
                       ("int4 zeros", zeros), ("grad_scale", grad_scale)])
    update = torch.empty(low_shape, dtype=torch.float32, device=dev)
    if update.numel() == 0:
        return update
    bm, bn, bk, warps, stages = _project_blocks(side, m, n, r, grad.element_size())
    grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn),)
    with _device_guard(grad):
        _project_adam_kernel[grid](
            grad, p_t, codes, scales, zeros, exp_avg, exp_avg_sq, update,
            grad_scale if grad_scale is not None else update,
            M, N, K, n, p_cols, group, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, -step_size,
            LEFT=side == "left", INT4=is_int4, HAS_SCALE=grad_scale is not None,
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return update


def back_project_(param, update, proj, side, *, beta, alpha, int4=None, proj_shape=None):
    """``param = beta * param + alpha * back(update)`` in one kernel, in place, tile by tile (no full-size
    temporary); returns None.

    ``param``: m x n, fp32 / bf16 / fp16, contiguous (math in fp32, rounded to nearest even on store).
    ``update``: fp32, contiguous, m x r for ``side="right"`` (back = update @ proj, proj r x n) or r x n for
    ``side="left"`` (back = proj @ update, proj m x r).  ``proj`` fp32, or ``proj=None`` with
    ``int4=(codes, scales, zeros, group_size)`` and ``proj_shape`` (see the module docstring).
    galore-torch's ``project_back`` followed by its parameter update (``beta`` carries decoupled weight decay,
    ``alpha`` the GaLore scale).  Inputs are validated before anything is written.
    """
    m, n, r, low_shape, p_t, codes, scales, zeros, group, is_int4 = _layout(side, param, "param", proj, int4,
                                                                            proj_shape)
    dev = param.device
    _check_tensor(update, "update", (torch.float32,), dev)
    if tuple(update.shape) != low_shape:
        raise ValueError(f"update must have the low-rank shape {low_shape}, got {tuple(update.shape)}")
    beta = _check_number(beta, "beta")
    alpha = _check_number(alpha, "alpha")
    _check_no_overlap([("param", param)], [("update", update), ("proj" if int4 is None else "int4 codes", p_t),
                                           ("int4 scales", scales), ("int4 zeros", zeros)])
    if param.numel() == 0:
        return None
    bm, bn, bk, warps, stages = _back_blocks(side, m, n, r)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    with _device_guard(param):
        _back_project_kernel[grid](
            param, update, p_t, codes, scales, zeros, m, n, r, group, beta, alpha,
            LEFT=side == "left", INT4=is_int4, DTYPE=_TL_DTYPES[param.dtype],
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages, enable_fp_fusion=False)
    return None
