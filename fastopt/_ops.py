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
