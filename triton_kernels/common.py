"""Helpers shared by the zoo's Triton update functions."""
import math

import triton
import triton.language as tl

from .._opspec import FLAGS
from .multi_tensor import split_f64


@triton.jit
def bias_correction(step, log_hi, log_lo):
    """``1 - beta^step`` in fp64, with ``log(beta)`` given as an fp32 (hi, lo) pair."""
    return 1.0 - tl.exp(tl.cast(step, tl.float64) * (tl.cast(log_hi, tl.float64) + tl.cast(log_lo, tl.float64)))


def log_pair(beta):
    """``log(beta)`` as two fp32 numbers (``-inf`` for beta 0, so that ``beta^t`` is 0)."""
    return split_f64(math.log(beta)) if beta > 0 else (-math.inf, 0.0)

# The flag bits, from the op declaration (fastopt/_opspec.py FLAGS; the optimizer classes set them):
# constexpr, so the @triton.jit code may read them (the compiler refuses a plain int global); tested as
# ``BIT & FLAGS``, since the interpreter passes FLAGS as a plain int and int & constexpr is undefined.
# The C++ functors subtract the use_gc row mean unconditionally (their rows are zeros without it); the
# Triton ones only with the bit, since their "no row coefficient" blocks are p * 0 (NaN where p is not
# finite).
DECOUPLE = tl.constexpr(FLAGS["weight_decouple"])
FIXED_DECAY = tl.constexpr(FLAGS["fixed_decay"])
RECTIFY = tl.constexpr(FLAGS["rectify"])
DEGENERATED_TO_SGD = tl.constexpr(FLAGS["degenerated_to_sgd"])
ADAM_DEBIAS = tl.constexpr(FLAGS["adam_debias"])
NESTEROV = tl.constexpr(FLAGS["nesterov"])
USE_GC = tl.constexpr(FLAGS["use_gc"])
CAUTIOUS = tl.constexpr(FLAGS["cautious"])
CAUTIOUS_PD = tl.constexpr(FLAGS["cautious_pd"])
AMSGRAD = tl.constexpr(FLAGS["amsgrad"])


@triton.jit
def grad_rowsum_reduce(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                       H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    """Per-row sums of g (``GradRowSumOp`` in ``functors/clip.h``): gradient centralization's first pass."""
    z = g * 0.0
    return s0, s1, s2, s3, g, z, z, z


@triton.jit
def grad_rowsum_update(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                       H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS: tl.constexpr):
    return p, s0, s1, s2, s3


def grad_rowsum_pack(hyper, flags):
    () = hyper  # no hyperparameters
    return (), flags


@triton.jit
def decay(p, g, lr, wd, FLAGS: tl.constexpr):
    """pytorch_optimizer's weight decay: p *= 1 - wd (fixed ? 1 : lr) [decoupled], or g += wd p."""
    if DECOUPLE & FLAGS:
        if FIXED_DECAY & FLAGS:
            p = p * (1.0 - tl.cast(wd, tl.float64)).to(tl.float32)
        else:
            p = p * (1.0 - tl.cast(wd, tl.float64) * tl.cast(lr, tl.float64)).to(tl.float32)
    else:
        g = g + wd * p
    return p, g


@triton.jit
def rectified_step(step, lr, b2, l2_hi, l2_lo, n_sma_threshold, FLAGS: tl.constexpr):
    """(step size before the 1/(1 - b1^t) debias, mode): RAdam rectification as pytorch_optimizer
    computes it, in fp64; mode 1 adaptive, 2 plain momentum step, 0 no update."""
    lr64 = tl.cast(lr, tl.float64)
    size = lr64
    mode = 1
    if RECTIFY & FLAGS:
        b2_64 = tl.cast(b2, tl.float64)
        n_sma_max = 2.0 / (1.0 - b2_64) - 1.0
        b2t = 1.0 - bias_correction(step, l2_hi, l2_lo)
        step64 = tl.cast(step, tl.float64)
        n_sma = n_sma_max - 2.0 * step64 * b2t / (1.0 - b2t)
        rt2 = (1.0 - b2t) * (n_sma - 4.0) / (n_sma_max - 4.0) * (n_sma - 2.0) / n_sma * n_sma_max / (n_sma_max - 2.0)
        adaptive = n_sma >= tl.cast(n_sma_threshold, tl.float64)
        fallback = lr64
        if not (DEGENERATED_TO_SGD & FLAGS):
            fallback = -lr64
        size = tl.where(adaptive, lr64 * tl.sqrt(tl.maximum(rt2, 0.0)), fallback)
        mode = tl.where(adaptive, 1, tl.where(fallback > 0, 2, 0))
    return size, mode


@triton.jit
def lerp(a, b, w, one_minus_w, high):
    """torch.lerp(a, b, w) for a scalar weight: ``b - (b - a)(1 - w)`` when w >= 0.5 (``high``)."""
    return tl.where(high != 0.0, b - (b - a) * one_minus_w, a + w * (b - a))


def lerp_pack(w):
    return (w, 1.0 - w, 1.0 if w >= 0.5 else 0.0)


@triton.jit
def debiased(step, size, l1_hi, l1_lo, FLAGS: tl.constexpr):
    if not (ADAM_DEBIAS & FLAGS):
        size = size / bias_correction(step, l1_hi, l1_lo)
    return size.to(tl.float32)


def rectified_pack(hyper, flags):
    """Native (b1, b2, wd, eps, n_sma_threshold) -> Triton slots; the ams variants set AMSGRAD."""
    b1, b2, wd, eps, n_sma_threshold = hyper
    return (1.0 - b1, b2, 1.0 - b2, wd, eps, *log_pair(b1), *log_pair(b2), n_sma_threshold), flags


def rectified_pack_ams(hyper, flags):
    h, f = rectified_pack(hyper, flags)
    return h, f | AMSGRAD.value
