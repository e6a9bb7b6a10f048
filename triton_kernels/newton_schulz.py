"""Newton–Schulz kernels for Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz").

One quintic Newton–Schulz iteration on a (batch of) matrix X (m x n, m <= n, bf16 by default) is

    A = X X^T                  symmetric m x m   -> :func:`syrk` (lower-triangle tiles only)
    B = b A + c A A            symmetric m x m   -> :func:`syrk` on A with a fused epilogue (A A = A A^T)
    X <- a X + B X             m x n             -> :func:`ns_update` (matmul with a fused epilogue)

Every kernel accumulates in fp32, computes its epilogue in fp32 and rounds once to the storage dtype
(round to nearest even) -- what ``torch.mm`` / ``torch.addmm(C, A, B, beta=, alpha=)`` do in bf16, so the
iteration follows :func:`fastopt.reference.muon.newton_schulz` (and pytorch_optimizer's
``zero_power_via_newton_schulz_5``) up to the fp32 summation order inside the dot products.

The symmetric kernel enumerates only the tiles on or under the diagonal: program ``pid`` of the first
grid axis handles tile (i, j) with ``pid = i (i + 1) / 2 + j``, ``j <= i``; it writes tile (i, j) and its
transpose at (j, i), and on diagonal tiles keeps the lower triangle and mirrors it, so the output is
exactly symmetric.  That halves the FLOPs of ``X X^T`` and of ``A A``.  The second grid axis is the batch.

Under ``TRITON_INTERPRET=1`` (CPU tests) the tiles are upcast to fp32 before ``tl.dot`` (the
interpreter's ``tl.dot`` mishandles bf16; bf16 products are exact in fp32, so this changes nothing but
the summation order) and small fixed tiles are used; on GPUs the tile shapes are autotuned per shape.
"""
import os

import torch
import triton
import triton.language as tl

from .compile_audit import capturing
from .multi_tensor import to_bf16_rne

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)
_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


def _interpret():
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_to(x, OUT_DTYPE: tl.constexpr):
    if OUT_DTYPE == tl.bfloat16:
        return to_bf16_rne(x)
    else:
        return x.to(OUT_DTYPE)


@triton.jit
def _lower_tile(pid):
    """pid -> (i, j) with j <= i and pid = i (i + 1) / 2 + j (float guess, then an exact fix-up)."""
    i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    return i, pid - i * (i + 1) // 2


@triton.jit
def _syrk_kernel(x_ptr, e_ptr, out_ptr, M, K,
                 stride_xb, stride_xm, stride_xk, stride_eb, stride_em, stride_en,
                 stride_ob, stride_om, stride_on, alpha, beta,
                 HAS_E: tl.constexpr, OUT_DTYPE: tl.constexpr, UPCAST: tl.constexpr,
                 BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    """out = alpha X X^T (+ beta E): X is M x K, E and out M x M (E symmetric when given)."""
    ti, tj = _lower_tile(tl.program_id(0))
    bid = tl.program_id(1).to(tl.int64)
    rm = ti * BLOCK + tl.arange(0, BLOCK)
    rn = tj * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    x = x_ptr + bid * stride_xb
    a_ptrs = x + rm[:, None] * stride_xm + rk[None, :] * stride_xk      # rows i of X   (BLOCK x BLOCK_K)
    b_ptrs = x + rn[None, :] * stride_xm + rk[:, None] * stride_xk      # rows j of X^T (BLOCK_K x BLOCK)
    m_ok = rm < M
    n_ok = rn < M
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k0 * BLOCK_K
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * stride_xk
        b_ptrs += BLOCK_K * stride_xk
    out = alpha * acc
    mask = m_ok[:, None] & n_ok[None, :]
    if HAS_E:
        e = tl.load(e_ptr + bid * stride_eb + rm[:, None] * stride_em + rn[None, :] * stride_en, mask=mask,
                    other=0.0)
        out = beta * e.to(tl.float32) + out
    o = out_ptr + bid * stride_ob
    if ti == tj:
        out = tl.where(rm[:, None] >= rn[None, :], out, tl.trans(out))
        tl.store(o + rm[:, None] * stride_om + rn[None, :] * stride_on, _round_to(out, OUT_DTYPE), mask=mask)
    else:
        tl.store(o + rm[:, None] * stride_om + rn[None, :] * stride_on, _round_to(out, OUT_DTYPE), mask=mask)
        tl.store(o + rn[:, None] * stride_om + rm[None, :] * stride_on, _round_to(tl.trans(out), OUT_DTYPE),
                 mask=n_ok[:, None] & m_ok[None, :])


@triton.jit
def _update_kernel(b_ptr, x_ptr, out_ptr, M, N,
                   stride_bb, stride_bm, stride_bk, stride_xb, stride_xm, stride_xn,
                   stride_ob, stride_om, stride_on, a_coef,
                   OUT_DTYPE: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """out = a X + B X: B is M x M, X and out M x N (out must not alias X)."""
    pid = tl.program_id(0)
    bid = tl.program_id(1).to(tl.int64)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n          # grouped tile order: neighbouring programs share B rows (L2 reuse)
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    x = x_ptr + bid * stride_xb
    b_ptrs = b_ptr + bid * stride_bb + rm[:, None] * stride_bm + rk[None, :] * stride_bk
    x_ptrs = x + rk[:, None] * stride_xm + rn[None, :] * stride_xn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, tl.cdiv(M, BLOCK_K)):
        k_ok = rk < M - k0 * BLOCK_K
        bt = tl.load(b_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        xt = tl.load(x_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            acc = tl.dot(bt.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(bt, xt, acc)
        b_ptrs += BLOCK_K * stride_bk
        x_ptrs += BLOCK_K * stride_xm
    mask = m_ok[:, None] & n_ok[None, :]
    xe = tl.load(x + rm[:, None] * stride_xm + rn[None, :] * stride_xn, mask=mask, other=0.0)
    out = a_coef * xe.to(tl.float32) + acc
    tl.store(out_ptr + bid * stride_ob + rm[:, None] * stride_om + rn[None, :] * stride_on,
             _round_to(out, OUT_DTYPE), mask=mask)


# -- launch configurations -------------------------------------------------------------------------
# GPU: autotuned per (M, K) / (M, N) (outputs never alias inputs, so re-running a config is harmless).
_SYRK_CONFIGS = [
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 128, "BLOCK_K": 32}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK": 32, "BLOCK_K": 64}, num_warps=2, num_stages=3),
]
_UPDATE_CONFIGS = [
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8}, num_warps=2, num_stages=3),
]
# The software pipeline keeps num_stages copies of the A and B tiles in shared memory: fp32 tiles are twice
# bf16's, and some configs would need 256-328 KB where an H100/H200 block may have 227 KB.  Configs whose
# estimate (plus a margin for the epilogue's layout conversions) does not fit are pruned before tuning,
# per call, from the element size (tests/test_triton_compile_all.py checks the compiled sizes).
_SMEM_BUDGET = 227 * 1024 - 8 * 1024


def _fits_smem(tensor_arg, tiles):
    def prune(configs, named_args, **kwargs):
        size = named_args[tensor_arg].element_size()
        keep = [c for c in configs if c.num_stages * tiles(c.kwargs) * size <= _SMEM_BUDGET]
        return keep or [min(configs, key=lambda c: c.num_stages * tiles(c.kwargs))]
    return prune


_syrk_tuned = triton.autotune(configs=_SYRK_CONFIGS, key=["M", "K", "HAS_E"], prune_configs_by={
    "early_config_prune": _fits_smem("x_ptr", lambda k: 2 * k["BLOCK"] * k["BLOCK_K"])})(_syrk_kernel)
_update_tuned = triton.autotune(configs=_UPDATE_CONFIGS, key=["M", "N"], prune_configs_by={
    "early_config_prune": _fits_smem("b_ptr", lambda k: (k["BLOCK_M"] + k["BLOCK_N"]) * k["BLOCK_K"])})(_update_kernel)

# Interpreter (CPU tests): small fixed tiles, so that 30-100-sized test matrices span several tiles
# and the masks are exercised.
_INTERP_SYRK = dict(BLOCK=32, BLOCK_K=32)
_INTERP_UPDATE = dict(BLOCK_M=32, BLOCK_N=32, BLOCK_K=32, GROUP_M=2)


def _n_lower_tiles(m, block):
    t = triton.cdiv(m, block)
    return t * (t + 1) // 2


def _as_batch(t, name):
    if t.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions, got shape {tuple(t.shape)}")
    return t.reshape(-1, *t.shape[-2:]) if t.ndim != 3 else t


def _check_device(*tensors, check_dtype=True):
    for t in tensors:
        if t.device.type != "cuda" and not (t.device.type == "cpu" and (_interpret() or capturing())):
            raise ValueError(f"the Newton-Schulz Triton kernels need CUDA tensors (CPU tensors only under "
                             f"TRITON_INTERPRET=1); got a tensor on {t.device}")
        if check_dtype and t.dtype not in _TL_DTYPES:
            raise ValueError(f"the Newton-Schulz Triton kernels support {list(_TL_DTYPES)}, got {t.dtype}")


def syrk(x, e=None, alpha=1.0, beta=0.0, out=None):
    """``alpha * x @ x.mT + beta * e`` for ``x`` of shape (..., m, k), computing only the tiles on or under
    the diagonal and mirroring them.  ``e`` (..., m, m) must be symmetric: only its tiles on or under the
    diagonal are read.  fp32 accumulation and epilogue, one rounding to ``x.dtype``; the result is
    exactly symmetric."""
    _check_device(x)
    xb = _as_batch(x, "x")
    nb, m, k = xb.shape
    if out is None:
        out = torch.empty((*x.shape[:-2], m, m), device=x.device, dtype=x.dtype)
    ob = _as_batch(out, "out")
    if ob.shape != (nb, m, m) or ob.dtype != x.dtype or ob.device != x.device:
        raise ValueError(f"out must be {x.dtype} of shape {(*x.shape[:-2], m, m)} on {x.device}")
    if e is not None:
        _check_device(e)
        eb = _as_batch(e, "e")
        if eb.shape != (nb, m, m):
            raise ValueError(f"e must have shape {(*x.shape[:-2], m, m)}, got {tuple(e.shape)}")
    else:
        eb = ob  # unused (HAS_E=False)
    if nb == 0 or m == 0:
        return out
    args = (xb, eb, ob, m, k, *xb.stride(), *eb.stride(), *ob.stride(), float(alpha), float(beta))
    flags = dict(HAS_E=e is not None, OUT_DTYPE=_TL_DTYPES[x.dtype])
    if _interpret():
        grid = (_n_lower_tiles(m, _INTERP_SYRK["BLOCK"]), nb)
        _syrk_kernel[grid](*args, **flags, UPCAST=True, **_INTERP_SYRK, enable_fp_fusion=False)
    else:
        _syrk_tuned[lambda meta: (_n_lower_tiles(m, meta["BLOCK"]), nb)](*args, **flags, UPCAST=False,
                                                                          enable_fp_fusion=False)
    return out


def ns_update(b, x, a, out=None):
    """``a * x + b @ x`` for ``b`` (..., m, m) and ``x`` (..., m, n): fp32 accumulation and epilogue, one
    rounding to ``x.dtype``.  ``out`` must not alias ``x`` or ``b``."""
    _check_device(b, x)
    xb, bb = _as_batch(x, "x"), _as_batch(b, "b")
    nb, m, n = xb.shape
    if bb.shape != (nb, m, m):
        raise ValueError(f"b must have shape {(*x.shape[:-2], m, m)}, got {tuple(b.shape)}")
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    ob = _as_batch(out, "out")
    if ob.shape != xb.shape or ob.dtype != x.dtype:
        raise ValueError(f"out must be {x.dtype} of shape {tuple(x.shape)}")
    if nb == 0 or m == 0 or n == 0:
        return out
    args = (bb, xb, ob, m, n, *bb.stride(), *xb.stride(), *ob.stride(), float(a))
    dt = _TL_DTYPES[x.dtype]
    if _interpret():
        cfg = _INTERP_UPDATE
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), nb)
        _update_kernel[grid](*args, OUT_DTYPE=dt, UPCAST=True, **cfg, enable_fp_fusion=False)
    else:
        _update_tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), nb)](
            *args, OUT_DTYPE=dt, UPCAST=False, enable_fp_fusion=False)
    return out


def _schedule(coeffs, steps):
    if coeffs is None:
        coeffs = [DEFAULT_COEFFS]
    elif len(coeffs) == 3 and all(isinstance(c, (int, float)) for c in coeffs):
        coeffs = [tuple(coeffs)]
    coeffs = [tuple(float(v) for v in c) for c in coeffs]
    if not coeffs or any(len(c) != 3 for c in coeffs):
        raise ValueError("coeffs must be one (a, b, c) triple or a non-empty sequence of triples")
    return [coeffs[min(i, len(coeffs) - 1)] for i in range(steps)]


def newton_schulz_triton(G, steps=5, eps=1e-7, coeffs=None, dtype=torch.bfloat16):
    """Approximate the orthogonal polar factor of ``G`` (shape (..., rows, cols)) with ``steps`` quintic
    Newton–Schulz iterations in ``dtype`` -- the same computation as
    :func:`fastopt.reference.muon.newton_schulz` (and pytorch_optimizer's
    ``zero_power_via_newton_schulz_5``), with the matrix products in Triton::

        X = G^T if rows > cols else G, cast to dtype;   X <- X / max(||X||_F, eps)
        repeat steps times:  A = X X^T;  B = b A + c A A;  X <- a X + B X

    ``coeffs``: one (a, b, c) triple (default Keller Jordan's (3.4445, -4.7750, 2.0315)) or a schedule of
    triples (the last one repeats).  Returns a ``dtype`` tensor of ``G``'s shape (a transposed view when
    rows > cols, like upstream).
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz_triton needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative int, got {steps!r}")
    if dtype not in _TL_DTYPES:
        raise ValueError(f"dtype must be one of {list(_TL_DTYPES)}, got {dtype}")
    schedule = _schedule(coeffs, steps)
    _check_device(G, check_dtype=False)
    transpose = G.size(-2) > G.size(-1)
    x = (G.mT if transpose else G).to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)
    norm = x.norm(2, dim=(-2, -1), keepdim=True)
    x.div_(norm.clamp_min_(eps))
    batch_shape = x.shape[:-2]
    x = x.reshape(-1, *x.shape[-2:])
    if x.numel():
        gram = torch.empty((x.shape[0], x.shape[1], x.shape[1]), device=x.device, dtype=dtype)
        poly = torch.empty_like(gram)
        nxt = torch.empty_like(x)
        for a, b, c in schedule:
            syrk(x, out=gram)                                   # A = X X^T
            syrk(gram, e=gram, alpha=c, beta=b, out=poly)       # B = b A + c A A   (A A = A A^T)
            ns_update(poly, x, a, out=nxt)                      # X <- a X + B X
            x, nxt = nxt, x
    x = x.reshape(*batch_shape, *x.shape[-2:])
    return x.mT if transpose else x
