"""Triton kernel of the sliced Wasserstein distance: projection, sort and 1-D cost fused per direction.

One program takes one direction ``theta_l`` of one batch entry ``b`` and two point clouds of the same
size ``n`` with uniform weights (the sort-and-subtract case of ``W_p``):

    px_i = <theta_l, x_i>,  py_j = <theta_l, y_j>        (fp32, from any storage dtype)
    xs, ys = sort(px), sort(py)                            (in registers, ``tl.sort``)
    wpp[b, l] = 1/n sum_k |xs_k - ys_k|^p                  (W_p^p along theta_l)

so the ``L x n`` projections are never written unsorted, and with ``GRAD`` the only other output is
the derivative of ``wpp`` with respect to each projected value, scattered back to the point's own
position through the sort permutation:

    cx[b, l, i] = d wpp[b, l] / d px_i = p |xs_k - ys_k|^(p-1) sign(xs_k - ys_k) / n   (i = rank-k point)
    cy[b, l, j] = -(the same at j's rank)

from which the gradients are two GEMMs (``cx^T theta`` for the points, ``cx x + cy y`` for the
directions).  The permutation comes from sorting 64-bit keys ``(order-preserving int32 of the value)
<< 32 | index``: the sort is then stable, and the index is the low word.  With ``PROJECTED`` the
kernel reads precomputed projections ``(B, L, n)`` (a GEMM does them better when ``d`` is large) and
only sorts and reduces.  A program holds its ``n`` values in registers: ``n <= MAX_N``.
"""
import triton
import triton.language as tl

MAX_N = 8192


@triton.jit
def _sort_key(v, offs):
    """int64 keys that sort like the float32 values ``v``, ties broken by ``offs`` (stable)."""
    bits = v.to(tl.int32, bitcast=True)
    ordered = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # negative floats: reverse their magnitude order
    return (ordered.to(tl.int64) << 32) | offs.to(tl.int64)


@triton.jit
def _key_value(key):
    ordered = (key >> 32).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ 0x7FFFFFFF, ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _project(pts_ptr, dir_ptr, row0, offs, msk, d, BLOCK: tl.constexpr):
    acc = tl.zeros((BLOCK,), tl.float32)
    for k in range(d):
        t = tl.load(dir_ptr + k).to(tl.float32)
        acc += tl.load(pts_ptr + (row0 + offs) * d + k, mask=msk, other=0.0).to(tl.float32) * t
    return acc


@triton.jit
def _sw_kernel(x_ptr, y_ptr, dir_ptr, wpp_ptr, cx_ptr, cy_ptr, n, L, d, dir_bstride, p, inv_n,
               PROJECTED: tl.constexpr, P_KIND: tl.constexpr, GRAD: tl.constexpr, BLOCK: tl.constexpr):
    l = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    msk = offs < n
    row = (b * L + l) * n
    if PROJECTED:
        px = tl.load(x_ptr + row + offs, mask=msk, other=0.0).to(tl.float32)
        py = tl.load(y_ptr + row + offs, mask=msk, other=0.0).to(tl.float32)
    else:
        dptr = dir_ptr + b * dir_bstride + l * d
        px = _project(x_ptr, dptr, b * n, offs, msk, d, BLOCK)
        py = _project(y_ptr, dptr, b * n, offs, msk, d, BLOCK)
    # padding sorts last (the points are finite), so ranks < n pair real values
    px = tl.where(msk, px, float("inf"))
    py = tl.where(msk, py, float("inf"))
    if GRAD:
        kx = tl.sort(_sort_key(px, offs))
        ky = tl.sort(_sort_key(py, offs))
        xs = _key_value(kx)
        ys = _key_value(ky)
    else:
        xs = tl.sort(px)
        ys = tl.sort(py)
    diff = tl.where(msk, xs, 0.0) - tl.where(msk, ys, 0.0)
    ad = tl.abs(diff)
    if P_KIND == 1:
        cost = ad
    elif P_KIND == 2:
        cost = diff * diff
    else:
        cost = tl.where(ad > 0.0, tl.exp2(p * tl.log2(tl.where(ad > 0.0, ad, 1.0))), 0.0)
    # a NaN sorts by its bits, possibly past the padding: flag it instead of dropping it
    nans = tl.sum(tl.where(msk & ((px != px) | (py != py)), 1, 0), axis=0)
    total = tl.sum(cost, axis=0) * inv_n
    tl.store(wpp_ptr + b * L + l, tl.where(nans > 0, float("nan"), total))
    if GRAD:
        sign = tl.where(diff > 0.0, 1.0, tl.where(diff < 0.0, -1.0, 0.0))
        if P_KIND == 1:
            coef = sign
        elif P_KIND == 2:
            coef = 2.0 * diff
        else:
            coef = p * sign * tl.where(ad > 0.0, tl.exp2((p - 1.0) * tl.log2(tl.where(ad > 0.0, ad, 1.0))), 0.0)
        coef = coef * inv_n
        ix = kx.to(tl.int32)  # the low word of a key is its index
        iy = ky.to(tl.int32)
        # with a NaN input a padding index can land at a rank < n: never store outside the row
        tl.store(cx_ptr + row + ix, coef, mask=msk & (ix < n))
        tl.store(cy_ptr + row + iy, -coef, mask=msk & (iy < n))


def sliced_wpp(x, y, dirs, wpp, cx, cy, p, grad):
    """``W_p^p`` per direction into ``wpp`` (B, L) fp32, and with ``grad`` its derivatives with respect
    to the projected values into ``cx``, ``cy`` (B, L, n) fp32.

    ``x``, ``y``: contiguous points (B, n, d) with ``dirs`` contiguous (Bd, L, d), ``Bd`` 1 (shared) or B;
    or, with ``dirs`` None, contiguous projections (B, L, n).  ``n <= MAX_N``, ``p >= 1``."""
    batch, L = wpp.shape
    projected = dirs is None
    n = x.shape[2] if projected else x.shape[1]
    d = 1 if projected else x.shape[2]
    if batch * L == 0:
        return
    if n > MAX_N:
        raise ValueError(f"sliced_wpp: n = {n} points exceed the fused kernel's MAX_N = {MAX_N}")
    block = max(16, triton.next_power_of_2(n))
    p = float(p)
    p_kind = 1 if p == 1.0 else (2 if p == 2.0 else 0)
    dir_bstride = 0 if projected or dirs.shape[0] == 1 else L * d
    _sw_kernel[(L, batch)](
        x, y, wpp if projected else dirs, wpp, cx if grad else wpp, cy if grad else wpp,
        n, L, d, dir_bstride, p, 1.0 / n,
        PROJECTED=projected, P_KIND=p_kind, GRAD=bool(grad), BLOCK=block,
        num_warps=min(16, max(4, block // 512)), enable_fp_fusion=False,
    )
