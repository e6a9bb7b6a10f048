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


def audit_exercise():
    """Every variant fastopt.SAM launches (for ``compile_audit``, on CPU tensors: nothing runs): the norm
    passes (``clip``'s phase 1 for SAM, ``asam_norm``), the ascents (``sam``, ``asam``) and the restore
    (``clip``'s update) over fp32, bf16 and fp16 tensors, 16-byte aligned and not (views one element into
    their storage)."""
    import torch

    from .ops import elementwise_step

    shapes = [(96, 1000), (64, 64), (33, 7)]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for unaligned in (False, True):
            def make(s):
                n = torch.Size(s).numel()
                return torch.randn(n + 1, dtype=dtype)[1:].view(s) if unaligned else torch.randn(s, dtype=dtype)
            ps, gs, olds = [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]
            out = torch.zeros(len(ps), 4)
            row = torch.zeros(len(ps), 4)
            elementwise_step("clip", [gs, gs], [], hyper=(), flags=0, lr=0.0, phase=1, reduce_out=out)
            elementwise_step("asam_norm", [ps, gs], [], hyper=(), flags=0, lr=0.0, phase=1, reduce_out=out)
            for op in ("sam", "asam"):
                elementwise_step(op, [ps, gs, olds], [], hyper=(), flags=0, lr=0.0, phase=0, row_coef=row)
            # the restore: w = old_p * 1 (the clip op's update)
            elementwise_step("clip", [ps, olds], [], hyper=(), flags=0, lr=0.0, phase=0, row_coef=row)
