"""Native and Triton entry points registered as ``torch.library.custom_op``s.

Each op takes already-validated lists (same device, same dtype, dense, matching layouts; see
``fastopt.optim.functional``) and a resolved kernel backend ('cuda', 'triton' or 'cpu').  The fake
implementations let ``torch.compile`` and CUDA-graph capture see the ops; they mutate in place and
return nothing.
"""
from typing import List, Optional

import torch
from torch import Tensor

from . import _backend


def _addrs(tensors):
    return [t.data_ptr() for t in tensors]


def _scalar_addr(t):
    return 0 if t is None else t.data_ptr()


@torch.library.custom_op(
    "fastopt::adam_step_",
    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"),
)
def adam_step_(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
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


@adam_step_.register_fake
def _adam_step_fake(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, lr_tensor, beta1,
                    beta2, eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend):
    return None
