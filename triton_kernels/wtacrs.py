"""Triton kernel of the WTA-CRS row pass (the GPU side of ``csrc/cpu/wtacrs_kernels.cpp``; spec:
``fastopt.reference.wtacrs.rows_reference``; used by ``fastopt.nn.WTACRSLinear``).

One program per ``BLOCK_R`` rows, walking the columns in tiles of ``BLOCK_C``: each tile is loaded once,
its squares summed (fp32) for the row norms ``||src_i|| * g_i`` and, for the rows kept (``0 <= pos[i] <
k``), written scaled by ``weight[pos[i]]`` to row ``pos[i]`` of the compact output.  In the forward it
runs twice (the norms over all rows; then the copy of the kept rows only, whose tiles of the other rows
are masked off: no load); in the backward once, over the output gradient (the norms for the next step
and the rows the weight-gradient GEMM takes).
"""
import triton
import triton.language as tl

from .multi_tensor import to_bf16_rne

MAX_BLOCK_C = 1024


@triton.jit
def _wtacrs_rows_kernel(src_ptr, pos_ptr, w_ptr, out_ptr, g_ptr, norms_ptr, R, C, K,
                        NORMS: tl.constexpr, GATHER: tl.constexpr, SCALED: tl.constexpr, HAS_G: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    rm = r < R
    if GATHER:
        j = tl.load(pos_ptr + r, mask=rm, other=-1)
        keep = rm & (j >= 0) & (j < K)
        jj = tl.where(keep, j, 0)
        if SCALED:
            w = tl.load(w_ptr + jj, mask=keep, other=0.0)
        else:
            w = tl.full((BLOCK_R,), 1.0, tl.float32)
        lm = keep
        if NORMS:
            lm = rm
    else:
        keep = rm & False
        jj = r * 0
        w = tl.full((BLOCK_R,), 1.0, tl.float32)
        lm = rm
    acc = tl.zeros((BLOCK_R, BLOCK_C), tl.float32)
    cols = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        cm = c < C
        v = tl.load(src_ptr + r[:, None] * C + c[None, :], mask=lm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        if NORMS:
            acc += v * v
        if GATHER:
            o = v * w[:, None]
            if out_ptr.dtype.element_ty == tl.bfloat16:  # (round to nearest even, as torch)
                o = to_bf16_rne(o)
            else:
                o = o.to(out_ptr.dtype.element_ty)
            tl.store(out_ptr + jj[:, None] * C + c[None, :], o, mask=keep[:, None] & cm[None, :])
    if NORMS:
        nrm = tl.sqrt(tl.sum(acc, axis=1))
        if HAS_G:
            nrm = nrm * tl.load(g_ptr + r, mask=rm, other=0.0)
        tl.store(norms_ptr + r, nrm, mask=rm)


def _launch_config(c):
    block_c = min(triton.next_power_of_2(max(c, 1)), MAX_BLOCK_C)
    block_r = max(1, min(16, 4096 // block_c))
    warps = 1 if block_r * block_c <= 256 else (4 if block_r * block_c <= 2048 else 8)
    return block_r, block_c, warps


def wtacrs_rows(src, pos, weight, out, gnorm, norms):
    """The row pass (module doc) over contiguous ``src`` (R, C); ``pos`` int64 (R,) or None, ``weight`` fp32
    (K,) or None (1), ``out`` (K, C) in ``src``'s dtype or None, ``gnorm`` fp32 (R,) or None, ``norms`` fp32
    (R,) or None.  The caller (``fastopt.nn.wtacrs``) has checked every tensor."""
    rows, cols = src.shape
    gather = pos is not None and out is not None and out.numel() > 0
    if rows == 0 or (not gather and norms is None):
        return
    k = out.shape[0] if gather else 0
    block_r, block_c, warps = _launch_config(cols)
    dummy = norms if norms is not None else out
    _wtacrs_rows_kernel[(triton.cdiv(rows, block_r),)](
        src, pos if gather else dummy, weight if (gather and weight is not None) else dummy,
        out if gather else src, gnorm if gnorm is not None else dummy, norms if norms is not None else dummy,
        rows, cols, k, NORMS=norms is not None, GATHER=gather, SCALED=gather and weight is not None,
        HAS_G=norms is not None and gnorm is not None, BLOCK_R=block_r, BLOCK_C=block_c, num_warps=warps,
        enable_fp_fusion=False,
    )


def audit_exercise():
    """Every variant :func:`wtacrs_rows` launches (for ``compile_audit``, on CPU tensors: nothing runs): the
    forward's norms (with and without the previous gradient norms) and its gather (scaled), the backward's
    norms + gather (unscaled), for fp32 / bf16 / fp16 and one tile (C = 64) or several (C = 3000)."""
    import torch

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for c in (64, 3000):
            src = torch.randn(40, c).to(dt)
            pos = torch.full((40,), -1, dtype=torch.int64)
            pos[::3] = torch.arange(14)
            w = torch.rand(14)
            out = torch.empty(14, c, dtype=dt)
            norms = torch.empty(40)
            g = torch.rand(40)
            wtacrs_rows(src, None, None, None, g, norms)
            wtacrs_rows(src, None, None, None, None, norms)
            wtacrs_rows(src, pos, w, out, None, None)
            wtacrs_rows(src, pos, None, out, None, norms)
