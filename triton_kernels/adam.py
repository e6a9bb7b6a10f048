"""Adam / AdamW as a Triton update function for the generic multi-tensor launcher.

Same equations as ``csrc/include/fastopt/functors/adam.h`` (Kingma & Ba 2015; Loshchilov & Hutter 2019):

    p <- p (1 - lr wd)  [AdamW]          or   g <- g + wd p  [Adam, L2]
    m <- m + (1 - b1)(g - m);  v <- b2 v + (1 - b2) g^2;  vmax <- max(vmax, v)  [amsgrad]
    p <- p - lr / (1 - b1^t) * m / (sqrt(v or vmax) / sqrt(1 - b2^t) + eps)

Flags: bit 0 decoupled weight decay, bit 1 amsgrad.  Math in fp32 (bias corrections in fp64).
"""
import math

import triton
import triton.language as tl

from .multi_tensor import multi_tensor_apply, split_f64
from .common import AMSGRAD, DECOUPLE



@triton.jit
def adam_update(p, g, m, v, vmax, step, lr, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, H9, FLAGS: tl.constexpr):
    # Bias corrections in fp64 from log(beta) carried as an fp32 (hi, lo) pair.
    step64 = tl.cast(step, tl.float64)
    bc1 = 1.0 - tl.exp(step64 * (tl.cast(log_beta1_hi, tl.float64) + tl.cast(log_beta1_lo, tl.float64)))
    bc2 = 1.0 - tl.exp(step64 * (tl.cast(log_beta2_hi, tl.float64) + tl.cast(log_beta2_lo, tl.float64)))
    step_size = (tl.cast(lr, tl.float64) / bc1).to(tl.float32)
    bc2_sqrt = tl.sqrt(bc2).to(tl.float32)
    if DECOUPLE & FLAGS:
        p = p * (1.0 - tl.cast(lr, tl.float64) * tl.cast(weight_decay, tl.float64)).to(tl.float32)
    else:
        g = g + weight_decay * p
    m = m + one_minus_beta1 * (g - m)
    v = beta2 * v + one_minus_beta2 * g * g
    vd = v
    if AMSGRAD & FLAGS:
        vmax = tl.maximum(vmax, v)
        vd = vmax
    denom = tl.sqrt(vd) / bc2_sqrt + eps
    p = p - step_size * (m / denom)
    return p, m, v, vmax


def _log(beta):
    return math.log(beta) if beta > 0 else -math.inf


def adam_step(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, *, lr, beta1, beta2, eps,
              weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """One fused Adam/AdamW step over lists of same-device, same-dtype contiguous tensors."""
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    multi_tensor_apply(
        adam_op_update, lists, steps,
        hyper=(1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
               *split_f64(_log(beta1)), *split_f64(_log(beta2))),
        flags=(DECOUPLE.value if decoupled else 0) | (AMSGRAD.value if amsgrad else 0),
        lr=lr, grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0,
    )


# -- Adam / AdamW as registered elementwise ops ("adamw", "adamw_ams", "adam", "adam_ams"; the C++
# AdamOp<DECOUPLE, AMSGRAD> of functors/adam.h), for the generic launchers (elementwise.py, lowbit.py).

@triton.jit
def adam_op_update(p, g, m, v, vmax, s3, step, lr, r0, r1, r2, r3,
                   one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                   log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, H9, H10, H11, H12, H13, H14, H15,
                   FLAGS: tl.constexpr):
    """:func:`adam_update` with the generic UPDATE signature (states exp_avg, exp_avg_sq[, max_exp_avg_sq])."""
    p, m, v, vmax = adam_update(p, g, m, v, vmax, step, lr, one_minus_beta1, beta2, one_minus_beta2, eps,
                                weight_decay, log_beta1_hi, log_beta1_lo, log_beta2_hi, log_beta2_lo, H9, FLAGS)
    return p, m, v, vmax, s3


def _adam_pack(decoupled, amsgrad):
    bits = (DECOUPLE.value if decoupled else 0) | (AMSGRAD.value if amsgrad else 0)

    def pack(hyper, flags):
        """Native hyper (beta1, beta2, eps, weight_decay), flags 0 (the op name picks the variant) -> slots."""
        beta1, beta2, eps, weight_decay = hyper
        return (1.0 - beta1, beta2, 1.0 - beta2, eps, weight_decay,
                *split_f64(_log(beta1)), *split_f64(_log(beta2))), bits

    return pack


adamw_pack = _adam_pack(True, False)
adamw_ams_pack = _adam_pack(True, True)
adam_l2_pack = _adam_pack(False, False)
adam_l2_ams_pack = _adam_pack(False, True)
