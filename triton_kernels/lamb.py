"""LAMB's two phases as Triton functions (``csrc/include/fastopt/functors/lamb.h``)."""
import triton
import triton.language as tl

from .common import DECOUPLE, decay


@triton.jit
def _direction(pd, m, v, eps, wd, FLAGS: tl.constexpr):
    u = m / (tl.sqrt(v) + eps)
    if not (DECOUPLE & FLAGS):  # L2 decay enters the update, not the moments
        u = u + wd * pd
    return u


@triton.jit
def _decayed(p, lr, wd, FLAGS: tl.constexpr):
    pd = p
    if DECOUPLE & FLAGS:
        pd, _unused = decay(p, p, lr, wd, FLAGS)
    return pd


@triton.jit
def lamb_reduce(p, g, m, v, s2, s3, step, lr, r0, r1, r2, r3, b1, b2, b3, omb2, wd, eps,
                H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    m = b1 * m + b3 * g
    v = b2 * v + omb2 * g * g
    pd = _decayed(p, lr, wd, FLAGS)
    u = _direction(pd, m, v, eps, wd, FLAGS)
    return m, v, s2, s3, pd * pd, u * u, u * 0.0, u * 0.0


@triton.jit
def lamb_update(p, g, m, v, s2, s3, step, lr, r0, r1, r2, r3, b1, b2, b3, omb2, wd, eps,
                H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    pd = _decayed(p, lr, wd, FLAGS)
    p = pd - r0 * _direction(pd, m, v, eps, wd, FLAGS)
    return p, m, v, s2, s3


def lamb_pack(hyper, flags):
    b1, b2, b3, wd, eps = hyper
    return (b1, b2, b3, 1.0 - b2, wd, eps), flags
