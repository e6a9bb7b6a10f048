"""Adan as a Triton update function (``csrc/include/fastopt/functors/adan.h``; per-step
coefficients in fp64 from ``log(beta)`` pairs)."""
import triton
import triton.language as tl

from .common import DECOUPLE, USE_GC, bias_correction, log_pair


@triton.jit
def adan_update(p, g, m, n, d, prev, step, lr, r0, r1, r2, r3,
                omb1, omb2, omb3, b2, b3, l1_hi, l1_lo, l2_hi, l2_lo, l3_hi, l3_lo, wd, eps, H13, H14, H15,
                FLAGS: tl.constexpr):
    lr64 = tl.cast(lr, tl.float64)
    step_size = (lr64 / bias_correction(step, l1_hi, l1_lo)).to(tl.float32)
    diff_step_size = (lr64 * tl.cast(b2, tl.float64) / bias_correction(step, l2_hi, l2_lo)).to(tl.float32)
    bc3_sqrt = tl.sqrt(bias_correction(step, l3_hi, l3_lo)).to(tl.float32)
    if USE_GC & FLAGS:  # gradient centralization: r0 = the row mean of g; the first difference is -r0
        g = g - r0
        not_first = (step != 1.0).to(tl.float32)
        diff = (g + prev) * not_first - r0 * (1.0 - not_first)
    else:
        prev = tl.where(step == 1.0, -g, prev)
        diff = g + prev
    m = m + omb1 * (g - m)
    d = d + omb2 * (diff - d)
    u = g + b2 * diff
    n = b3 * n + omb3 * u * u
    denom = tl.sqrt(n) / bc3_sqrt + eps
    if DECOUPLE & FLAGS:
        p = p * (1.0 - lr64 * tl.cast(wd, tl.float64)).to(tl.float32)
    p = p - step_size * (m / denom)
    p = p - diff_step_size * (d / denom)
    if not (DECOUPLE & FLAGS):
        p = p / (1.0 + lr64 * tl.cast(wd, tl.float64)).to(tl.float32)
    return p, m, n, d, -g


def adan_pack(hyper, flags):
    b1, b2, b3, wd, eps = hyper
    return (1.0 - b1, 1.0 - b2, 1.0 - b3, b2, b3, *log_pair(b1), *log_pair(b2), *log_pair(b3), wd, eps), flags
