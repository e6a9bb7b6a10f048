"""Lion as a Triton update function (same equations as ``csrc/include/fastopt/functors/lion.h``)."""
import triton
import triton.language as tl

DECOUPLE = tl.constexpr(1)  # constexpr: read by @triton.jit code
FIXED_DECAY = tl.constexpr(2)


@triton.jit
def lion_update(p, g, m, s2, s3, s4, step, lr, r0, r1, r2, r3,
                one_minus_beta1, one_minus_beta2, wd, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    if DECOUPLE & FLAGS:
        if FIXED_DECAY & FLAGS:
            p = p * (1.0 - wd)
        else:
            p = p * (1.0 - wd * lr)
    else:
        g = g + wd * p
    blend = m + one_minus_beta1 * (g - m)
    u = (blend > 0.0).to(tl.float32) - (blend < 0.0).to(tl.float32)
    m = m + one_minus_beta2 * (g - m)
    p = p - lr * u
    return p, m, s2, s3, s4


def lion_pack(hyper, flags):
    """Native hyper (beta1, beta2, wd) -> the Triton slots."""
    beta1, beta2, wd = hyper
    return (1.0 - beta1, 1.0 - beta2, wd), flags
