"""The first step of SAM / ASAM as Triton functions (same equations as
``csrc/include/fastopt/functors/sam.h``): ASAM's norm pass (the squares of ``|w| g``; SAM's norm is
the ``clip`` op's pass) and the ascent ``old_p <- w; w <- w + e`` (``e = g r0`` or ``w^2 g r0``;
``r0 == 0`` leaves ``w`` as it is)."""
import triton
import triton.language as tl


@triton.jit
def asam_norm_reduce(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                     H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS):
    z = g * 0.0
    x = tl.abs(p) * g
    return s0, s1, s2, s3, x * x, z, z, z


@triton.jit
def asam_norm_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                     H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return p, s0, s1, s2, s3


@triton.jit
def sam_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
               H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return tl.where(r0 != 0.0, p + g * r0, p), p, s1, s2, s3


@triton.jit
def asam_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return tl.where(r0 != 0.0, p + (p * p * g) * r0, p), p, s1, s2, s3


def sam_pack(hyper, flags):
    () = hyper  # no hyperparameters
    return (), flags
