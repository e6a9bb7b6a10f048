"""The fused global-norm gradient clip as Triton functions (``csrc/include/fastopt/functors/clip.h``)."""
import triton
import triton.language as tl


@triton.jit
def clip_reduce(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS):
    z = g * 0.0
    return s0, s1, s2, s3, g * g, z, z, z


@triton.jit
def clip_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return g * r0, s0, s1, s2, s3


def clip_pack(hyper, flags):
    () = hyper  # no hyperparameters
    return (), flags
