"""Native and Triton entry points registered as ``torch.library.custom_op``s.

Each op takes already-validated lists (same device, same dtype, dense, matching layouts; see
``fastopt.optim.functional``) and a resolved kernel backend ('cuda', 'triton' or 'cpu').  The fake
implementations let ``torch.compile`` see the ops; they mutate in place and return nothing.

In eager mode the public callers (``adam_step`` ...) skip the custom-op dispatcher, whose Python layers
cost about half a millisecond per call, and call the kernel directly, bumping the autograd version
counters of what it mutated themselves; under ``torch.compile`` they call the custom op.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import _backend


def _addrs(tensors):
    return [t.data_ptr() for t in tensors]


def _scalar_addr(t):
    return 0 if t is None else t.data_ptr()


def _adam_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
               beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
               maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], backend: str) -> None:
    """Fused Adam/AdamW over lists of tensors (see fastopt.optim.functional.adam for the semantics)."""
    if not params:
        return
    if backend == "triton":
        _backend.triton_kernels().adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf)
        return
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    args = (
        [a for lst in lists for a in _addrs(lst)], [p.numel() for p in params], _addrs(state_steps),
        _backend.dtype_code(params[0].dtype), lr, _scalar_addr(lr_tensor), beta1, beta2, eps, weight_decay,
        decoupled, amsgrad, maximize, _scalar_addr(grad_scale), _scalar_addr(found_inf),
    )
    native = _backend.native()
    if backend == "cpu":
        native.adam_cpu(*args)
    elif backend == "cuda":
        device = params[0].device
        with torch.cuda.device(device):
            native.adam_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        raise ValueError(f"fastopt::adam_step_ has no kernel backend {backend!r}")


adam_step_ = torch.library.custom_op(
    "fastopt::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)(_adam_kernel)


@adam_step_.register_fake
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1,
                    beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend):
    return None


def _eager_or_op(op, kernel, mutated, args):
    if torch.compiler.is_compiling():
        op(*args)
        return
    kernel(*args)
    torch.autograd.graph.increment_version([t for lst in mutated for t in lst])


def adam_step(*args):
    """``fastopt::adam_step_`` (same arguments), without the dispatcher's overhead in eager mode."""
    params, _grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps = args[:6]
    _eager_or_op(adam_step_, _adam_kernel, (params, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps), args)


def _elementwise_kernel(op: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
                        state_steps: List[Tensor], hyper: List[float], flags: int, lr: float,
                        lr_tensor: Optional[Tensor], maximize: bool, grad_scale: Optional[Tensor],
                        found_inf: Optional[Tensor], phase: int, rows: List[int], row_coef: Optional[Tensor],
                        reduce_out: Optional[Tensor], seed: int, stochastic: bool, backend: str) -> None:
    """One call of a registered elementwise op (``csrc/include/fastopt/ops.h``): ``states`` holds the
    op's state lists one after the other (``k * len(params)`` tensors).  Phase 0 is the update and
    increments ``state_steps``; phase 1 adds per-row sums into ``reduce_out`` (fp32 ``[rows, 4]``)."""
    if not params:
        return
    n = len(params)
    nstates = len(states) // n
    if backend == "triton":
        lists = [params, grads] + [states[k * n:(k + 1) * n] for k in range(nstates)]
        _backend.triton_kernels().elementwise_step(
            op, lists, state_steps, hyper=hyper, flags=flags, lr=lr_tensor if lr_tensor is not None else lr,
            grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0, phase=phase,
            rows=rows or None, row_coef=row_coef, reduce_out=reduce_out, seed=seed, stochastic=stochastic)
        return
    args = (
        op, _addrs(params) + _addrs(grads) + _addrs(states), [p.numel() for p in params], _addrs(state_steps),
        _backend.dtype_code(params[0].dtype), list(hyper), int(flags), float(lr), _scalar_addr(lr_tensor),
        _scalar_addr(grad_scale), _scalar_addr(found_inf), bool(maximize), int(phase), list(rows),
        _scalar_addr(row_coef), _scalar_addr(reduce_out), int(seed) & 0xFFFFFFFFFFFFFFFF, bool(stochastic),
    )
    native = _backend.native()
    if backend == "cpu":
        native.elementwise_cpu(*args)
    elif backend == "cuda":
        device = params[0].device
        with torch.cuda.device(device):
            native.elementwise_cuda(*args, torch.cuda.current_stream(device).cuda_stream)
    else:
        raise ValueError(f"fastopt::elementwise_step_ has no kernel backend {backend!r}")


elementwise_step_ = torch.library.custom_op(
    "fastopt::elementwise_step_",
    mutates_args=("params", "states", "state_steps", "reduce_out"),
)(_elementwise_kernel)


@elementwise_step_.register_fake
def _elementwise_step_fake(op, params, grads, states, state_steps, hyper, flags, lr, lr_tensor, maximize,
                           grad_scale, found_inf, phase, rows, row_coef, reduce_out, seed, stochastic, backend):
    return None


def elementwise_step(*args):
    """``fastopt::elementwise_step_`` (same arguments), without the dispatcher's overhead in eager mode."""
    params, states, state_steps, reduce_out = args[1], args[3], args[4], args[15]
    mutated = (params, states, state_steps) + (([reduce_out],) if reduce_out is not None else ())
    _eager_or_op(elementwise_step_, _elementwise_kernel, mutated, args)
