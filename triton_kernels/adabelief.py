"""AdaBelief as a Triton update function (``csrc/include/fastopt/functors/adabelief.h``)."""
import triton
import triton.language as tl

from .common import AMSGRAD, RECTIFY, bias_correction, debiased, decay, rectified_step


@triton.jit
def adabelief_update(p, g, m, s, smax, s3, step, lr, r0, r1, r2, r3,
                     omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, n_sma_threshold, H10, H11, H12, H13,
                     H14, H15, FLAGS: tl.constexpr):
    size, mode = rectified_step(step, lr, b2, l2_hi, l2_lo, n_sma_threshold, FLAGS)
    step_size = debiased(step, size, l1_hi, l1_lo, FLAGS)
    c2 = 1.0
    if not (RECTIFY & FLAGS):
        c2 = tl.sqrt(bias_correction(step, l2_hi, l2_lo)).to(tl.float32)
    p, g = decay(p, g, lr, wd, FLAGS)
    m = m + omb1 * (g - m)
    r = g - m
    s = b2 * s + omb2 * r * r + eps
    sd = s
    if AMSGRAD & FLAGS:  # ams_bound
        smax = tl.maximum(smax, s)
        sd = smax
    p = tl.where(mode == 1, p - step_size * (m / (tl.sqrt(sd) / c2 + eps)),
                 tl.where(mode == 2, p - step_size * m, p))
    return p, m, s, smax, s3
