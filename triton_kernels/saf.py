"""Triton kernel of the fused SAF pass (the GPU side of ``csrc/cpu/saf_kernels.cpp``; spec:
``fastopt.reference.saf.saf_reference``; used by ``fastopt.sharpness.SAFLoss``).

One program per row ``i`` of the batch (index ``r = indices[i]``), walking the classes in tiles of
``BLOCK_C``:

- pass 1: the row's current outputs are stored into the bank's write slot (only when ``i`` is the last
  occurrence of ``r`` in the batch: every program scans the indices after its own, so the result does
  not depend on the order programs run), and, when active, the maxima ``M_z``, ``M_y`` of
  ``z = logits_i / T`` and ``y = bank[read, r] / T``;
- pass 2 (active): ``S_z = sum exp(z - M_z)``, ``S_y = sum exp(y - M_y)``,
  ``A = sum exp(y - M_y) ((y - M_y) - (z - M_z))``, and ``row_kl_i = A / S_y - log S_y + log S_z``;
- pass 3 (with a gradient): ``grad_i = grad_scale (exp(z - M_z) / S_z - exp(y - M_y) / S_y)``.

The read slot differs from the write slot, so no program reads what another writes.  A row of up to
``BLOCK_C`` classes is one tile (passes 2-3 re-read it from L1/L2).  The duplicate scan costs O(B) per
program (B int64 loads, in tiles of ``BLOCK_B``).
"""
import triton
import triton.language as tl

from .multi_tensor import to_bf16_rne

NEG_INF = tl.constexpr(float("-inf"))
MAX_BLOCK_C = 2048


@triton.jit
def _saf_kernel(logits_ptr, idx_ptr, bank_ptr, row_kl_ptr, grad_ptr, B, C, read_base, write_base, inv_t, gs,
                ACTIVE: tl.constexpr, WITH_GRAD: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_B: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    r = tl.load(idx_ptr + i)
    later = 0
    for j0 in range(0, B, BLOCK_B):
        offs = j0 + tl.arange(0, BLOCK_B)
        v = tl.load(idx_ptr + offs, mask=offs < B, other=-1)
        later += tl.sum(((v == r) & (offs > i)).to(tl.int32), axis=0)
    c_write = tl.where(later == 0, C, 0)  # the row writes its C classes, or none
    zrow = logits_ptr + i * C
    wrow = bank_ptr + write_base + r * C
    yrow = bank_ptr + read_base + r * C
    cols = tl.arange(0, BLOCK_C)
    mz = tl.full((BLOCK_C,), NEG_INF, tl.float32)
    my = tl.full((BLOCK_C,), NEG_INF, tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + cols
        m = c < C
        x = tl.load(zrow + c, mask=m, other=0.0)
        if bank_ptr.dtype.element_ty == tl.bfloat16:  # (round to nearest even, as torch; not the interpreter's cast)
            xw = to_bf16_rne(x.to(tl.float32))
        else:
            xw = x.to(bank_ptr.dtype.element_ty)
        tl.store(wrow + c, xw, mask=c < c_write)
        if ACTIVE:
            z = x.to(tl.float32) * inv_t
            y = tl.load(yrow + c, mask=m, other=0.0).to(tl.float32) * inv_t
            mz = tl.maximum(mz, tl.where(m, z, NEG_INF))
            my = tl.maximum(my, tl.where(m, y, NEG_INF))
    if ACTIVE:
        Mz = tl.max(mz, axis=0)
        My = tl.max(my, axis=0)
        sz = tl.zeros((BLOCK_C,), tl.float32)
        sy = tl.zeros((BLOCK_C,), tl.float32)
        acc = tl.zeros((BLOCK_C,), tl.float32)
        for c0 in range(0, C, BLOCK_C):
            c = c0 + cols
            m = c < C
            dz = tl.load(zrow + c, mask=m, other=0.0).to(tl.float32) * inv_t - Mz
            dy = tl.load(yrow + c, mask=m, other=0.0).to(tl.float32) * inv_t - My
            ez = tl.where(m, tl.exp(dz), 0.0)
            ey = tl.where(m, tl.exp(dy), 0.0)
            sz += ez
            sy += ey
            acc += tl.where(m, ey * (dy - dz), 0.0)
        Sz = tl.sum(sz, axis=0)
        Sy = tl.sum(sy, axis=0)
        A = tl.sum(acc, axis=0)
        tl.store(row_kl_ptr + i, A / Sy - tl.log(Sy) + tl.log(Sz))
        if WITH_GRAD:
            cz = gs / Sz
            cy = gs / Sy
            for c0 in range(0, C, BLOCK_C):
                c = c0 + cols
                m = c < C
                dz = tl.load(zrow + c, mask=m, other=0.0).to(tl.float32) * inv_t - Mz
                dy = tl.load(yrow + c, mask=m, other=0.0).to(tl.float32) * inv_t - My
                tl.store(grad_ptr + i * C + c, tl.exp(dz) * cz - tl.exp(dy) * cy, mask=m)


def _launch_config(b, c):
    block_c = min(triton.next_power_of_2(max(c, 1)), MAX_BLOCK_C)
    block_b = min(triton.next_power_of_2(max(b, 1)), 1024)
    warps = 1 if block_c <= 256 else (4 if block_c <= 1024 else 8)
    return block_c, block_b, warps


def saf_pass(logits, indices, bank, row_kl, grad, read_slot, write_slot, active, inv_temp, grad_scale):
    """The fused pass (module doc) over contiguous ``logits`` (B, C), int64 ``indices`` (B,) in ``[0, N)``,
    ``bank`` (S, N, C), fp32 ``row_kl`` (B,) and ``grad`` (B, C) or None (no gradient).  The caller
    (``fastopt.sharpness.saf``) has checked every tensor and index."""
    b, c = logits.shape
    _, n, _ = bank.shape
    if b * c == 0:
        return
    block_c, block_b, warps = _launch_config(b, c)
    with_grad = bool(active) and grad is not None
    _saf_kernel[(b,)](
        logits, indices, bank, row_kl, grad if with_grad else row_kl, b, c, int(read_slot) * n * c,
        int(write_slot) * n * c, float(inv_temp), float(grad_scale),
        ACTIVE=bool(active), WITH_GRAD=with_grad, BLOCK_C=block_c, BLOCK_B=block_b, num_warps=warps,
        enable_fp_fusion=False,
    )


def audit_exercise():
    """Every variant :func:`saf_pass` launches (for ``compile_audit``, on CPU tensors: nothing runs): active
    with and without the gradient and inactive; each pair of logits and bank dtypes; one tile (C = 3, 1000)
    and several (C = 5000); an index repeated in the batch."""
    import torch

    def run(c, ldt, bdt, active, grad, b=6):
        logits = torch.randn(b, c).to(ldt)
        idx = torch.tensor([0, 3, 1, 3, 5, 2][:b])
        bank = torch.zeros(3, 8, c, dtype=bdt)
        row_kl = torch.zeros(b)
        g = torch.zeros(b, c) if grad else None
        saf_pass(logits, idx, bank, row_kl, g, 1, 0, active, 0.2, 0.05)

    dts = (torch.float32, torch.bfloat16, torch.float16)
    for ldt in dts:
        for bdt in dts:
            run(1000, ldt, bdt, True, True)
            run(1000, ldt, bdt, False, False)
    for c in (3, 5000):
        for ldt, bdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)):
            run(c, ldt, bdt, True, True)
            run(c, ldt, bdt, True, False)
            run(c, ldt, bdt, False, False)
