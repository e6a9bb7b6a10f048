"""diffGrad as a Triton update function (``csrc/include/fastopt/functors/diffgrad.h``)."""
import triton
import triton.language as tl

from .common import AMSGRAD, RECTIFY, bias_correction, debiased, decay, rectified_step


@triton.jit
def diffgrad_update(p, g, m, v, prev, vmax, step, lr, r0, r1, r2, r3,
                    omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, n_sma_threshold, H10, H11, H12, H13,
                    H14, H15, FLAGS: tl.constexpr):
    size, mode = rectified_step(step, lr, b2, l2_hi, l2_lo, n_sma_threshold, FLAGS)
    if not (RECTIFY & FLAGS):
        size = size * tl.sqrt(bias_correction(step, l2_hi, l2_lo))
    step_size = debiased(step, size, l1_hi, l1_lo, FLAGS)
    p, g = decay(p, g, lr, wd, FLAGS)
    m = m + omb1 * (g - m)
    v = b2 * v + omb2 * g * g
    vd = v
    if AMSGRAD & FLAGS:  # ams_bound
        vmax = tl.maximum(vmax, v)
        vd = vmax
    denom = tl.sqrt(vd + 1e-15) + eps
    dfc = 1.0 / (1.0 + tl.exp(-tl.abs(prev - g)))
    p = tl.where(mode == 1, p - step_size * ((dfc * m) / denom), tl.where(mode == 2, p - step_size * m, p))
    return p, m, v, g, vmax
