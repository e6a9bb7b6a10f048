"""EXAdam as a Triton update function (``csrc/include/fastopt/functors/exadam.h``)."""
import triton
import triton.language as tl

from .common import bias_correction, decay, rectified_pack


@triton.jit
def exadam_update(p, g, m, v, s2, s3, step, lr, r0, r1, r2, r3,
                  omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, H9, H10, H11, H12, H13,
                  H14, H15, FLAGS: tl.constexpr):
    bc1_64 = bias_correction(step, l1_hi, l1_lo)
    bc2_64 = bias_correction(step, l2_hi, l2_lo)
    bc1 = bc1_64.to(tl.float32)
    bc2 = bc2_64.to(tl.float32)
    b1t = (1.0 - bc1_64).to(tl.float32)
    b2t = (1.0 - bc2_64).to(tl.float32)
    p, g = decay(p, g, lr, wd, FLAGS)
    m = m + omb1 * (g - m)
    v = b2 * v + omb2 * g * g
    d1 = 1.0 + b2t * (v / (v + eps))
    m2 = m * m
    d2 = 1.0 + b1t * (m2 / (m2 + eps))
    u = (m / bc1) * d1 + d1 * (g / bc1)
    denom = tl.sqrt(d2 * (v / bc2)) + eps
    p = p - lr * (u / denom)
    return p, m, v, s2, s3


def exadam_pack(hyper, flags):
    """Native (b1, b2, wd, eps) -> the slots of :func:`rectified_pack` (EXAdam has no rectification)."""
    return rectified_pack(tuple(hyper) + (0.0,), flags)
