"""Triton kernels of entropic optimal transport (the GPU side of ``csrc/cpu/ot_kernels.cpp``).

One program takes ``BLOCK_N`` rows ``i`` of one batch entry and walks the columns ``j`` in tiles of
``BLOCK_M``: the cost tile is computed from the points (``|x - y|^2`` or ``|x - y|``, fp32 from any
storage dtype) or loaded from a dense cost matrix, and an online log-sum-exp (running maximum, sum
rescaled when it grows; the flash-attention recurrence) accumulates

    mode 0:  out_i = LSE_j(h_j - C_ij / eps)
    mode 1:  out_i = sum_j exp(c_i + h_j - C_ij / eps) * dC_ij / dx_i

so no n x m matrix is ever stored: memory is O((n + m) d).  ``h`` and ``c`` may hold ``-inf`` (no mass).
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))  # constexpr: read by @triton.jit code


@triton.jit
def _ot_kernel(x_ptr, y_ptr, cm_ptr, h_ptr, c_ptr, out_ptr, n, m, inv_eps,
               D: tl.constexpr, D_PAD: tl.constexpr, COST: tl.constexpr, MODE: tl.constexpr, DENSE: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    dims = tl.arange(0, D_PAD)
    big_m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
    big_s = tl.zeros((BLOCK_N,), tl.float32)
    w_sum = tl.zeros((BLOCK_N,), tl.float32)
    acc = tl.zeros((BLOCK_N, D_PAD), tl.float32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < m
        h = tl.load(h_ptr + b * m + cols, mask=cmask, other=NEG_INF)
        if DENSE:
            cost = tl.load(cm_ptr + (b * n + rows[:, None]) * m + cols[None, :],
                           mask=rmask[:, None] & cmask[None, :], other=0.0).to(tl.float32)
        else:
            sq = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
            for k in tl.static_range(D):
                xk = tl.load(x_ptr + (b * n + rows) * D + k, mask=rmask, other=0.0).to(tl.float32)
                yk = tl.load(y_ptr + (b * m + cols) * D + k, mask=cmask, other=0.0).to(tl.float32)
                t = xk[:, None] - yk[None, :]
                sq += t * t
            if COST == 1:
                cost = tl.sqrt(sq)
            else:
                cost = sq
        s = h[None, :] - cost * inv_eps
        new_m = tl.maximum(big_m, tl.max(s, axis=1))
        safe_m = tl.where(new_m == NEG_INF, 0.0, new_m)
        scale = tl.exp(big_m - safe_m)
        e = tl.exp(s - safe_m[:, None])
        big_s = big_s * scale + tl.sum(e, axis=1)
        if MODE == 1:
            if COST == 1:
                e = tl.where(cost > 0.0, e / tl.where(cost > 0.0, cost, 1.0), 0.0)
            w_sum = w_sum * scale + tl.sum(e, axis=1)
            y2 = tl.load(y_ptr + (b * m + cols[:, None]) * D + dims[None, :],
                         mask=cmask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
            acc = acc * scale[:, None] + tl.sum(e[:, :, None] * y2[None, :, :], axis=1)
        big_m = new_m
    if MODE == 0:
        out = tl.where(big_m == NEG_INF, NEG_INF, big_m + tl.log(big_s))
        tl.store(out_ptr + b * n + rows, out, mask=rmask)
    else:
        c = tl.load(c_ptr + b * n + rows, mask=rmask, other=NEG_INF)
        lg = c + big_m
        mult = tl.where(lg == NEG_INF, 0.0, tl.exp(tl.where(lg == NEG_INF, 0.0, lg)))
        if COST == 0:
            mult = mult * 2.0
        x2 = tl.load(x_ptr + (b * n + rows[:, None]) * D + dims[None, :],
                     mask=rmask[:, None] & (dims[None, :] < D), other=0.0).to(tl.float32)
        grad = mult[:, None] * (x2 * w_sum[:, None] - acc)
        tl.store(out_ptr + (b * n + rows[:, None]) * D + dims[None, :], grad,
                 mask=rmask[:, None] & (dims[None, :] < D))


def ot_pass(x, y, cost_matrix, h, c, out, eps, cost, mode):
    """One pass (see the module doc) over contiguous ``x`` (B, n, d) and ``y`` (B, m, d), or a dense
    ``cost_matrix`` (B, n, m); ``h`` (B, m) and ``c`` (B, n) fp32; ``out`` fp32 (B, n) or (B, n, d).
    ``cost``: 0 squared Euclidean, 1 Euclidean; ``mode``: 0 log-sum-exp, 1 gradient."""
    dense = cost_matrix is not None
    ref = cost_matrix if dense else x
    batch, n = ref.shape[0], ref.shape[1]
    m = h.shape[1]
    d = 1 if dense else x.shape[2]
    if batch * n == 0:
        return
    d_pad = triton.next_power_of_2(max(d, 1))
    block_n = 32 if mode == 1 and d_pad > 8 else 64
    block_m = 32 if mode == 1 else 64
    dummy = h
    grid = (triton.cdiv(n, block_n), batch)
    _ot_kernel[grid](
        dummy if dense else x, dummy if dense else y, cost_matrix if dense else dummy, h,
        c if c is not None else dummy, out, n, m, float(1.0 / eps),
        D=d, D_PAD=d_pad, COST=int(cost), MODE=int(mode), DENSE=dense, BLOCK_N=block_n, BLOCK_M=block_m,
    )

