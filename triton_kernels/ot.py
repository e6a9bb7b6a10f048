"""Triton kernels of entropic optimal transport (the GPU side of ``csrc/cpu/ot_kernels.cpp``).

One program takes ``BLOCK_N`` rows ``i`` of one batch entry and walks the columns ``j`` in tiles of
``BLOCK_M``: the cost tile is computed from the points (``|x - y|^2`` or ``|x - y|``, fp32 from any
storage dtype) or loaded from a dense cost matrix, and an online log-sum-exp (running maximum, sum
rescaled when it grows; the flash-attention recurrence) accumulates

    mode 0:  out_i = LSE_j(h_j - C_ij / eps)
    mode 1:  out_i = sum_j exp(c_i + h_j - C_ij / eps) * dC_ij / dx_i

so no n x m matrix is ever stored: memory is O((n + m) d).  ``h`` and ``c`` may hold ``-inf`` (no mass).

    mode 2:  out_i = -eps log(sum_j w_j exp((g_j - C_ij) / eps) / sum_j w_j)    (w = h >= 0, g = c, (B, m))

is the weighted soft-minimum that ``fastopt.ot.sinkhorn`` iterates, in cost units and relative to the
row's smallest ``d_ij = C_ij - g_j``: with ``x = (d_i - d_ij) / eps <= 0``, ``S = sum w exp(x)`` and
``T = sum w expm1(x)`` (online, rescaled when the minimum drops), ``out_i = d_i - eps log1p(T / W)``
(or ``d_i - eps log(S / W)`` when ``T / W <= -1/2``).  It stays accurate in fp32 when eps is huge
against the costs, where ``log w + (g - C) / eps`` would round ``(g - C) / eps`` away
(``csrc/cpu/ot_kernels.cpp`` has the same pass, ``fastopt.reference.ot.softmin_reference`` the spec).
"""
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))  # constexpr: read by @triton.jit code
POS_INF = tl.constexpr(float("inf"))


@triton.jit
def _expm1_nonpositive(x, e):
    """``expm1(x)`` for ``x <= 0`` given ``e = exp(x)``: a Taylor polynomial where ``e - 1`` would cancel
    (``x > -ln2 / 2``; degree 8, relative error < 1e-8 there), ``e - 1`` elsewhere."""
    xs = tl.where(x > -0.35, x, 0.0)
    p = 1.0 / 40320.0
    p = p * xs + 1.0 / 5040.0
    p = p * xs + 1.0 / 720.0
    p = p * xs + 1.0 / 120.0
    p = p * xs + 1.0 / 24.0
    p = p * xs + 1.0 / 6.0
    p = p * xs + 0.5
    p = p * xs * xs + xs
    return tl.where(x > -0.35, p, e - 1.0)


@triton.jit
def _log1p(r):
    """``log1p(r)`` for ``r > -1/2``: ``log(u) * r / (u - 1)`` with ``u = 1 + r`` rounded (Goldberg), ``r``
    where ``u`` rounds to 1."""
    u = 1.0 + r
    um1 = u - 1.0
    return tl.where(um1 == 0.0, r, tl.log(u) * (r / tl.where(um1 == 0.0, 1.0, um1)))


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
    d_min = tl.full((BLOCK_N,), POS_INF, tl.float32)
    big_t = tl.zeros((BLOCK_N,), tl.float32)
    for j0 in range(0, m, BLOCK_M):
        cols = j0 + tl.arange(0, BLOCK_M)
        cmask = cols < m
        if MODE == 2:
            h = tl.load(h_ptr + b * m + cols, mask=cmask, other=0.0)
        else:
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
        if MODE == 2:  # the weighted soft-minimum: h = w, c = g, both (B, m)
            g = tl.load(c_ptr + b * m + cols, mask=cmask, other=0.0)
            valid = h > 0.0
            dd = tl.where(valid[None, :], cost - g[None, :], POS_INF)
            new_d = tl.minimum(d_min, tl.min(dd, axis=1))
            seen = w_sum > 0.0
            dl = tl.where(seen, (new_d - tl.where(seen, d_min, 0.0)) * inv_eps, 0.0)
            r = tl.exp(dl)
            rm1 = _expm1_nonpositive(dl, r)
            safe_d = tl.where(new_d == POS_INF, 0.0, new_d)
            xv = tl.where(valid[None, :], (safe_d[:, None] - dd) * inv_eps, NEG_INF)
            e = tl.exp(xv)
            em1 = _expm1_nonpositive(xv, e)
            big_t = big_t * r + w_sum * rm1 + tl.sum(tl.where(valid[None, :], h[None, :] * em1, 0.0), axis=1)
            big_s = big_s * r + tl.sum(h[None, :] * e, axis=1)
            w_sum = w_sum + tl.sum(h, axis=0)
            d_min = new_d
        else:
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
    if MODE == 2:
        seen = w_sum > 0.0
        wd = tl.where(seen, w_sum, 1.0)
        ratio = big_t / wd
        lg = tl.where(ratio > -0.5, _log1p(tl.maximum(ratio, -0.5)), tl.log(big_s / wd))
        out = tl.where(seen, d_min - lg / inv_eps, POS_INF)
        tl.store(out_ptr + b * n + rows, out, mask=rmask)
    elif MODE == 0:
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
        enable_fp_fusion=False,
    )


def ot_softmin(x, y, cost_matrix, w, g, out, eps, cost):
    """The weighted soft-minimum (mode 2 of the module doc) over contiguous ``x`` (B, n, d), ``y``
    (B, m, d) or a dense ``cost_matrix`` (B, n, m): ``w`` (B, m) fp32 weights >= 0, ``g`` (B, m) fp32
    potential in cost units, ``out`` fp32 (B, n)."""
    ot_pass(x, y, cost_matrix, w, g, out, eps, cost, 2)

