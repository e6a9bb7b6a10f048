"""Lion as Triton functions (same equations as ``csrc/include/fastopt/functors/lion.h``): the update,
and the reduce pass of ``lion_cautious`` (the count of the cautious mask)."""
import triton
import triton.language as tl

from .common import CAUTIOUS, DECOUPLE, FIXED_DECAY, USE_GC



@triton.jit
def _lion_grad(p, g, wd, r0, FLAGS: tl.constexpr):
    """g after gradient centralization (r0: the row mean) and L2 decay."""
    if USE_GC & FLAGS:
        g = g - r0
    if not (DECOUPLE & FLAGS):
        g = g + wd * p
    return g


@triton.jit
def _sign_update(m, g, one_minus_beta1):
    blend = m + one_minus_beta1 * (g - m)
    return (blend > 0.0).to(tl.float32) - (blend < 0.0).to(tl.float32)


@triton.jit
def lion_update(p, g, m, s1, s2, s3, step, lr, r0, r1, r2, r3,
                one_minus_beta1, one_minus_beta2, wd, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    g = _lion_grad(p, g, wd, r0, FLAGS)
    if DECOUPLE & FLAGS:
        if FIXED_DECAY & FLAGS:
            p = p * (1.0 - wd)
        else:
            p = p * (1.0 - wd * lr)
    u = _sign_update(m, g, one_minus_beta1)
    if CAUTIOUS & FLAGS:  # r1: fp32(numel) / (count + 1) of the tensor (the reduce pass below)
        u = u * tl.where(u * g > 0.0, r1, 0.0)
    m = m + one_minus_beta2 * (g - m)
    p = p - lr * u
    return p, m, s1, s2, s3


@triton.jit
def lion_cautious_reduce(p, g, m, s1, s2, s3, step, lr, r0, r1, r2, r3,
                         one_minus_beta1, one_minus_beta2, wd, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                         FLAGS: tl.constexpr):
    g = _lion_grad(p, g, wd, r0, FLAGS)
    agree = (_sign_update(m, g, one_minus_beta1) * g > 0.0).to(tl.float32)
    z = g * 0.0
    return m, s1, s2, s3, agree, z, z, z


def lion_pack(hyper, flags):
    """Native hyper (beta1, beta2, wd) -> the Triton slots."""
    beta1, beta2, wd = hyper
    return (1.0 - beta1, 1.0 - beta2, wd), flags


def lion_cautious_pack(hyper, flags):
    return lion_pack(hyper, int(flags) | int(CAUTIOUS))
