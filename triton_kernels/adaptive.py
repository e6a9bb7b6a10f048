"""AdaBelief, diffGrad and EXAdam as Triton update functions (``csrc/include/fastopt/functors/adaptive.h``).

Hyper slots after packing: 1-b1, b2, 1-b2, wd, eps, log(b1) pair, log(b2) pair, n_sma_threshold, b1.
"""
import triton
import triton.language as tl

from .common import ADAM_DEBIAS, AMSGRAD, RECTIFY, bias_correction, decay, log_pair, rectified_step


@triton.jit
def _debiased(step, size, l1_hi, l1_lo, FLAGS: tl.constexpr):
    if not (ADAM_DEBIAS & FLAGS):
        size = size / bias_correction(step, l1_hi, l1_lo)
    return size.to(tl.float32)


@triton.jit
def adabelief_update(p, g, m, s, smax, s3, step, lr, r0, r1, r2, r3,
                     omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, n_sma_threshold, H10, H11, H12, H13,
                     H14, H15, FLAGS: tl.constexpr):
    size, mode = rectified_step(step, lr, b2, l2_hi, l2_lo, n_sma_threshold, FLAGS)
    step_size = _debiased(step, size, l1_hi, l1_lo, FLAGS)
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


@triton.jit
def diffgrad_update(p, g, m, v, prev, vmax, step, lr, r0, r1, r2, r3,
                    omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, n_sma_threshold, H10, H11, H12, H13,
                    H14, H15, FLAGS: tl.constexpr):
    size, mode = rectified_step(step, lr, b2, l2_hi, l2_lo, n_sma_threshold, FLAGS)
    if not (RECTIFY & FLAGS):
        size = size * tl.sqrt(bias_correction(step, l2_hi, l2_lo))
    step_size = _debiased(step, size, l1_hi, l1_lo, FLAGS)
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


def adaptive_pack(hyper, flags):
    """Native (b1, b2, wd, eps, n_sma_threshold) -> Triton slots; the ams variants set AMSGRAD."""
    b1, b2, wd, eps, n_sma_threshold = hyper
    return (1.0 - b1, b2, 1.0 - b2, wd, eps, *log_pair(b1), *log_pair(b2), n_sma_threshold), flags


def exadam_pack(hyper, flags):
    """Native (b1, b2, wd, eps) -> the slots of :func:`adaptive_pack` (EXAdam has no rectification)."""
    return adaptive_pack(tuple(hyper) + (0.0,), flags)


def adaptive_pack_ams(hyper, flags):
    h, f = adaptive_pack(hyper, flags)
    return h, f | AMSGRAD.value
