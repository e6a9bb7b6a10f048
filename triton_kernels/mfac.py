"""Triton kernels of dense M-FAC's two window passes (the GPU side of ``csrc/cpu/mfac_kernels.cpp``;
the spec is ``fastopt.reference.mfac``).

The window ``G`` (m, d) row-major, fp32 or bf16, holds the params' gradients side by side; each param is
one launch over its columns (``d`` may exceed 2^31 elements in the window: row offsets are int64).  One
program takes ``BLOCK_N`` columns and walks rows ``[0, nrows)`` in tiles of ``BLOCK_M``:

  pass 1 (:func:`mfac_dots`): g = grad (+ wd p) in fp32 is written to row ``slot`` (bf16: rounded to
    nearest even) and the tile's dot products with g (and, for bf16, with the stored g) are summed over
    the program's columns into a partial (programs, m) fp32 buffer; the partials are added in fp64 by
    torch (a fixed order: the result does not depend on scheduling).  Row ``slot`` is taken from the
    registers, not reloaded, so no program reads what another writes.
  pass 2 (:func:`mfac_update`): acc = sum_j coef[j] G_j over the program's columns, then
    u = g / damp - acc, momentum, decay and the parameter update, all in registers.

Each element of the window is read once per pass (and row ``slot`` written once): the passes are
bandwidth-bound, ``2 m d`` bytes each in bf16.
"""
import torch
import triton
import triton.language as tl

from .multi_tensor import _rounded

BLOCK_M = 8
BLOCK_N = 1024
NUM_WARPS = 8


@triton.jit
def _mfac_dots_kernel(win_ptr, grad_ptr, param_ptr, part_x_ptr, part_k_ptr, ld, n, slot, nrows, part_ld,
                      wd_l2, HAS_WD: tl.constexpr, TWO: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < n
    g = tl.load(grad_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    if HAS_WD:
        g = g + wd_l2 * tl.load(param_ptr + cols, mask=cm, other=0.0).to(tl.float32)
    gs = _rounded(g, win_ptr.dtype.element_ty)
    ld64 = tl.full((), ld, tl.int64)
    tl.store(win_ptr + ld64 * slot + cols, gs, mask=cm)
    gk = gs.to(tl.float32)
    part_row = pid.to(tl.int64) * part_ld
    for r0 in range(0, nrows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rm = rows < nrows
        ptrs = win_ptr + rows.to(tl.int64)[:, None] * ld64 + cols[None, :]
        tile = tl.load(ptrs, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        tile = tl.where(rows[:, None] == slot, gk[None, :], tile)
        tl.store(part_x_ptr + part_row + rows, tl.sum(tile * g[None, :], axis=1), mask=rm)
        if TWO:
            tl.store(part_k_ptr + part_row + rows, tl.sum(tile * gk[None, :], axis=1), mask=rm)


@triton.jit
def _mfac_update_kernel(win_ptr, grad_ptr, param_ptr, mom_ptr, coef_ptr, ld, n, nrows, lr, damp, momentum,
                        one_minus, keep, wd_l2, HAS_WD: tl.constexpr, HAS_MOM: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cm = cols < n
    ld64 = tl.full((), ld, tl.int64)
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for r0 in range(0, nrows, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        rm = rows < nrows
        c = tl.load(coef_ptr + rows, mask=rm, other=0.0)
        ptrs = win_ptr + rows.to(tl.int64)[:, None] * ld64 + cols[None, :]
        tile = tl.load(ptrs, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * c[:, None], axis=0)
    p = tl.load(param_ptr + cols, mask=cm, other=0.0)
    g = tl.load(grad_ptr + cols, mask=cm, other=0.0)
    if HAS_WD:
        g = g + wd_l2 * p
    u = g / damp - acc
    if HAS_MOM:
        v = tl.load(mom_ptr + cols, mask=cm, other=0.0)
        u = momentum * v + one_minus * u
        tl.store(mom_ptr + cols, u, mask=cm)
    tl.store(param_ptr + cols, p * keep - lr * u, mask=cm)


def mfac_dots(window, params, grads, dots_x, dots_k, slot, nrows, wd_l2):
    """Pass 1 into ``dots_x`` / ``dots_k`` (fp64 (m,)); tensors already validated by ``fastopt/_ops.py``."""
    m, d = window.shape
    flat = window.view(-1)
    two = dots_k is not None
    dots_x.zero_()
    if two:
        dots_k.zero_()
    col = 0
    for p, g in zip(params, grads):
        n = p.numel()
        if n == 0:
            continue
        blocks = triton.cdiv(n, BLOCK_N)
        part_x = torch.empty((blocks, m), dtype=torch.float32, device=window.device)
        part_k = torch.empty((blocks, m), dtype=torch.float32, device=window.device) if two else part_x
        _mfac_dots_kernel[(blocks,)](
            flat[col:], g, p, part_x, part_k, d, n, slot, nrows, m, float(wd_l2),
            HAS_WD=wd_l2 != 0.0, TWO=two, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS, enable_fp_fusion=False)
        dots_x[:nrows] += part_x[:, :nrows].double().sum(0)
        if two:
            dots_k[:nrows] += part_k[:, :nrows].double().sum(0)
        col += n


def mfac_update(window, params, grads, momentum_buffer, coef, nrows, lr, damp, momentum, wd_l2, wd_decoupled):
    """Pass 2 (``u``, momentum, decay, update), in place on the params and the momentum buffer."""
    m, d = window.shape
    flat = window.view(-1)
    col = 0
    for p, g in zip(params, grads):
        n = p.numel()
        if n == 0:
            continue
        mom = momentum_buffer[col:] if momentum_buffer is not None else p
        _mfac_update_kernel[(triton.cdiv(n, BLOCK_N),)](
            flat[col:], g, p, mom, coef, d, n, nrows, float(lr), float(damp), float(momentum),
            float(1.0 - momentum), float(1.0 - wd_decoupled), float(wd_l2),
            HAS_WD=wd_l2 != 0.0, HAS_MOM=momentum_buffer is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            num_warps=NUM_WARPS, enable_fp_fusion=False)
        col += n


def audit_exercise():
    """Every variant the launchers start (for ``compile_audit``, on CPU tensors: nothing runs): fp32 and bf16
    windows, with and without L2 decay, with and without momentum; a window of 4096 columns (rows 16-byte
    aligned: vector loads) and one of 4005 (5 + 4000: unaligned rows and column offsets)."""
    for sizes in ((4096,), (5, 4000)):
        d = sum(sizes)
        for wdt in (torch.float32, torch.bfloat16):
            for wd in (0.0, 0.1):
                params = [torch.zeros(n) for n in sizes]
                grads = [torch.zeros(n) for n in sizes]
                window = torch.zeros(16, d, dtype=wdt)
                dx = torch.zeros(16, dtype=torch.float64)
                dk = torch.zeros(16, dtype=torch.float64) if wdt != torch.float32 else None
                mfac_dots(window, params, grads, dx, dk, 3, 16, wd)
                for mom in (None, torch.zeros(d)):
                    mfac_update(window, params, grads, mom, torch.zeros(16), 16, 0.1, 1e-4,
                                0.0 if mom is None else 0.9, wd, 0.0)
