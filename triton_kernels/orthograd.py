"""The OrthoGrad projection passes as Triton functions (same equations as
``csrc/include/fastopt/functors/orthograd.h``): called with the gradients as ``p`` (what is written)
and the weights as ``g``."""
import triton
import triton.language as tl


@triton.jit
def orthograd_reduce(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                     H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS):
    go = p - r0 * g
    return s0, s1, s2, s3, g * p, g * g, p * p, go * go


@triton.jit
def orthograd_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                     H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return tl.where(r1 == 0.0, 0.0, (p - r0 * g) * r1), s0, s1, s2, s3


def orthograd_pack(hyper, flags):
    () = hyper  # no hyperparameters
    return (), flags
