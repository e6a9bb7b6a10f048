"""SGD-SaI's elementwise step as a Triton function (``csrc/include/fastopt/functors/sgdsai.h``)."""
import triton
import triton.language as tl

from .common import decay, lerp, lerp_pack

# Triton-private bit above every op flag (fastopt/_opspec.py FLAGS): the op name picks the variant
MOMENTUM = tl.constexpr(1 << 20)


@triton.jit
def sgdsai_update(p, g, buf, s1, s2, s3, step, lr, r0, r1, r2, r3, w, one_minus_w, high, wd,
                  H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    b = g
    if MOMENTUM & FLAGS:
        b = lerp(buf, g, w, one_minus_w, high)
        buf = b
    pd, b = decay(p, b, lr, wd, FLAGS)
    return pd - r0 * b, buf, s1, s2, s3


def _pack(hyper, flags, momentum_flag):
    momentum, wd = hyper
    return (*lerp_pack(1.0 - momentum), wd), flags | momentum_flag


def sgdsai_pack(hyper, flags):
    return _pack(hyper, flags, MOMENTUM.value)


def sgdsai_plain_pack(hyper, flags):
    return _pack(hyper, flags, 0)
