"""torch.optim's SGD, Adagrad and RMSprop as Triton update functions (same equations as
``csrc/include/fastopt/functors/{sgd,adagrad,rmsprop}.h``; the references are
``fastopt/reference/{sgd,adagrad,rmsprop}.py``)."""
import triton
import triton.language as tl

from .common import NESTEROV, lerp, lerp_pack
from .multi_tensor import split_f64

# Triton-private bits above every op flag (fastopt/_opspec.py FLAGS): the op name picks the variant.
MOMENTUM = tl.constexpr(1 << 20)   # sgd / rmsprop_*momentum: a momentum_buffer
CENTERED = tl.constexpr(1 << 21)   # rmsprop_centered*: a grad_avg


@triton.jit
def sgd_update(p, g, buf, s1, s2, s3, step, lr, r0, r1, r2, r3, momentum, one_minus_dampening, wd,
               H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    """torch.optim.SGD: the first step (``step`` 1: the buffer was just made) sets buf = g."""
    g = g + wd * p
    if MOMENTUM & FLAGS:
        # (the first step as scalar coefficients, 0 buf + 1 g = g: a per-element select on the step kept a
        # predicate live through the low-bit kernel's loop, an 8-byte stack frame on sm_90)
        first = step <= 1.0
        keep = tl.where(first, 0.0, momentum)
        take = tl.where(first, 1.0, one_minus_dampening)
        buf = keep * buf + take * g
        if NESTEROV & FLAGS:
            g = g + momentum * buf
        else:
            g = buf
    return p - lr * g, buf, s1, s2, s3


def _sgd_pack(hyper, flags, momentum_flag):
    momentum, dampening, wd = hyper
    return (momentum, 1.0 - dampening, wd), int(flags) | momentum_flag


def sgd_pack(hyper, flags):
    return _sgd_pack(hyper, flags, MOMENTUM.value)


def sgd_plain_pack(hyper, flags):
    return _sgd_pack(hyper, flags, 0)


@triton.jit
def adagrad_update(p, g, s, s1, s2, s3, step, lr, r0, r1, r2, r3, lr_decay_hi, lr_decay_lo, wd, eps,
                   H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    """torch.optim.Adagrad; clr = lr / (1 + (step - 1) lr_decay) in fp64, rounded to fp32."""
    lr_decay = tl.cast(lr_decay_hi, tl.float64) + tl.cast(lr_decay_lo, tl.float64)
    clr = (tl.cast(lr, tl.float64) / (1.0 + (tl.cast(step, tl.float64) - 1.0) * lr_decay)).to(tl.float32)
    g = g + wd * p
    s = s + g * g
    p = p - clr * g / (tl.sqrt(s) + eps)
    return p, s, s1, s2, s3


def adagrad_pack(hyper, flags):
    lr_decay, wd, eps = hyper
    return (*split_f64(lr_decay), wd, eps), int(flags)


@triton.jit
def rmsprop_update(p, g, v, s1, s2, s3, step, lr, r0, r1, r2, r3, alpha, one_minus_alpha, eps, wd, momentum,
                   w, one_minus_w, high, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    """torch.optim.RMSprop; slots: square_avg, [momentum_buffer], [grad_avg] (torch's order)."""
    g = g + wd * p
    v = v * alpha + (one_minus_alpha * g) * g
    var = v
    if CENTERED & FLAGS:
        if MOMENTUM & FLAGS:
            s2 = lerp(s2, g, w, one_minus_w, high)
            var = v - s2 * s2
        else:
            s1 = lerp(s1, g, w, one_minus_w, high)
            var = v - s1 * s1
    avg = tl.sqrt(var) + eps
    if MOMENTUM & FLAGS:
        s1 = s1 * momentum + g / avg
        p = p - lr * s1
    else:
        p = p - (lr * g) / avg
    return p, v, s1, s2, s3


def _rmsprop_pack(hyper, flags, bits):
    alpha, eps, wd, momentum = hyper
    return (alpha, 1.0 - alpha, eps, wd, momentum, *lerp_pack(1.0 - alpha)), int(flags) | bits


def rmsprop_pack(hyper, flags):
    return _rmsprop_pack(hyper, flags, 0)


def rmsprop_momentum_pack(hyper, flags):
    return _rmsprop_pack(hyper, flags, MOMENTUM.value)


def rmsprop_centered_pack(hyper, flags):
    return _rmsprop_pack(hyper, flags, CENTERED.value)


def rmsprop_centered_momentum_pack(hyper, flags):
    return _rmsprop_pack(hyper, flags, MOMENTUM.value | CENTERED.value)


def audit_exercise():
    """The launches the compile audit (``compile_audit.EXERCISES``) adds for these ops beyond the zoo
    cases of the test's exercise (which start every elementwise variant): the low-bit step of
    SGD8bit / RMSprop8bit (momentum), fp32 and bf16, aligned and not.  Run under ``compile_audit.capture``
    on CPU tensors (nothing runs)."""
    import torch

    from fastopt import _backend, lowbit

    _backend.triton_interpret = lambda: True  # (the launchers take the CPU tensors; nothing runs)
    for dtype in (torch.float32, torch.bfloat16):
        for unaligned in (False, True):
            for make in (lambda ps: lowbit.SGD8bit(ps, lr=1e-3, momentum=0.9, nesterov=True, min_quant_size=0,
                                                   backend="triton"),
                         lambda ps: lowbit.RMSprop8bit(ps, lr=1e-3, momentum=0.9, min_quant_size=0, backend="triton"),
                         lambda ps: lowbit.RMSprop4bit(ps, lr=1e-3, min_quant_size=0, backend="triton")):
                n = 96 * 1024
                base = torch.randn(n + 1, dtype=dtype)
                p = torch.nn.Parameter(base[1:] if unaligned else base[:n].clone())
                p.grad = torch.randn_like(p)
                make([p]).step()
