"""AdamP and SGDP's two phases as Triton functions (``csrc/include/fastopt/functors/adamp.h``).

Slots: AdamP (1-b1 lerp triple, b2, 1-b2, eps, log(b1) pair, log(b2) pair); SGDP (momentum,
1-dampening).  Flags: bit 0 nesterov, bit 4 adam_debias (AdamP), bit 6 use_gc (AdamP: ``g - r3``, r3 the
row mean of g; both phases).
"""
import triton
import triton.language as tl

from .common import ADAM_DEBIAS, CAUTIOUS, CAUTIOUS_PD, NESTEROV, USE_GC, bias_correction, lerp, lerp_pack, log_pair



@triton.jit
def _adamp_direction(g, m, v, step, w, omw, high, eps, l2_hi, l2_lo, scale, FLAGS: tl.constexpr):
    bc2_sqrt = tl.sqrt(bias_correction(step, l2_hi, l2_lo)).to(tl.float32)
    if CAUTIOUS & FLAGS:  # the cautious mask: scale = numel / (count + 1) of the tensor
        m = m * tl.where(m * g > 0.0, scale, 0.0)
    num = m
    if NESTEROV & FLAGS:
        num = lerp(m, g, w, omw, high)
    return num * ((1.0 / (tl.sqrt(v) + eps)) * bc2_sqrt)


@triton.jit
def adamp_reduce(p, g, m, v, s2, s3, step, lr, r0, r1, r2, r3, w, omw, high, b2, omb2, eps, l1_hi, l1_lo, l2_hi,
                 l2_lo, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    if USE_GC & FLAGS:  # gradient centralization: r3 = the row mean of g
        g = g - r3
    if CAUTIOUS_PD & FLAGS:  # the cautious mask's second pass: p.d only, the moments as stored, r3 the scale
        d = _adamp_direction(g, m, v, step, w, omw, high, eps, l2_hi, l2_lo, r3, FLAGS)
        z = p * 0.0
        return m, v, s2, s3, z, z, z, p * d
    m = lerp(m, g, w, omw, high)
    v = b2 * v + omb2 * g * g
    if CAUTIOUS & FLAGS:  # the count of the mask in place of p.d
        return m, v, s2, s3, g * p, g * g, p * p, (m * g > 0.0).to(tl.float32)
    d = _adamp_direction(g, m, v, step, w, omw, high, eps, l2_hi, l2_lo, r3, FLAGS)
    return m, v, s2, s3, g * p, g * g, p * p, p * d


@triton.jit
def adamp_update(p, g, m, v, s2, s3, step, lr, den, radial, decay, r3, w, omw, high, b2, omb2, eps,
                 l1_hi, l1_lo, l2_hi, l2_lo, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    if USE_GC & FLAGS:
        g = g - r3
    lr64 = tl.cast(lr, tl.float64)
    step_size = lr64
    if not (ADAM_DEBIAS & FLAGS):
        step_size = lr64 / bias_correction(step, l1_hi, l1_lo)
    d = _adamp_direction(g, m, v, step, w, omw, high, eps, l2_hi, l2_lo, r3, FLAGS) - (p / den) * radial
    return p * decay - step_size.to(tl.float32) * d, m, v, s2, s3


@triton.jit
def _sgdp_direction(g, buf, momentum, FLAGS: tl.constexpr):
    d = buf
    if NESTEROV & FLAGS:
        d = buf * momentum + g
    return d


@triton.jit
def sgdp_reduce(p, g, buf, s1, s2, s3, step, lr, r0, r1, r2, r3, momentum, one_minus_dampening,
                H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    buf = buf * momentum + one_minus_dampening * g
    d = _sgdp_direction(g, buf, momentum, FLAGS)
    return buf, s1, s2, s3, g * p, g * g, p * p, p * d


@triton.jit
def sgdp_update(p, g, buf, s1, s2, s3, step, lr, den, radial, decay, r3, momentum, one_minus_dampening,
                H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    d = _sgdp_direction(g, buf, momentum, FLAGS) - (p / den) * radial
    return p * decay - lr * d, buf, s1, s2, s3


def adamp_pack(hyper, flags):
    b1, b2, eps = hyper
    return (*lerp_pack(1.0 - b1), b2, 1.0 - b2, eps, *log_pair(b1), *log_pair(b2)), flags


def sgdp_pack(hyper, flags):
    momentum, dampening = hyper
    return (momentum, 1.0 - dampening), flags


@triton.jit
def adamp_flat_update(p, g, m, v, s2, s3, step, lr, den, radial, decay, r3, w, omw, high, b2, omb2, eps,
                      l1_hi, l1_lo, l2_hi, l2_lo, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    # (flat tensors are never centralized: their r3 is 0)
    m = lerp(m, g, w, omw, high)
    v = b2 * v + omb2 * g * g
    return adamp_update(p, g, m, v, s2, s3, step, lr, den, radial, decay, r3, w, omw, high, b2, omb2, eps,
                        l1_hi, l1_lo, l2_hi, l2_lo, H10, H11, H12, H13, H14, H15, FLAGS)


@triton.jit
def sgdp_flat_update(p, g, buf, s1, s2, s3, step, lr, den, radial, decay, r3, momentum, one_minus_dampening,
                     H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    buf = buf * momentum + one_minus_dampening * g
    return sgdp_update(p, g, buf, s1, s2, s3, step, lr, den, radial, decay, r3, momentum, one_minus_dampening,
                       H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS)
