"""Fused global-norm gradient clipping: ``fastopt.clip_grad_norm_`` (drop-in for
``torch.nn.utils.clip_grad_norm_``).

For norm_type 2 the kernels make two passes over all gradients in two launches per (device, dtype)
bucket: a multi-tensor reduction of the per-tensor sums of squares, then an in-place scale by
``min(1, max_norm / (total_norm + 1e-6))``, with ``total_norm`` and the coefficient staying on the
device (no host sync unless ``error_if_nonfinite``).  Other norm types run torch's implementation.
"""
from collections import defaultdict
from typing import Iterable, Optional, Union

import torch

from .. import _backend
from .functional import elementwise_unchecked, is_dense


def clip_grad_norm_(parameters: Union[torch.Tensor, Iterable[torch.Tensor]], max_norm: float,
                    norm_type: float = 2.0, error_if_nonfinite: bool = False, foreach: Optional[bool] = None,
                    backend: str = "auto") -> torch.Tensor:
    """Scale the gradients of ``parameters`` in place so that their global norm is at most
    ``max_norm``; returns the total norm (before clipping) as a tensor, like torch's function."""
    _backend.check_backend_name(backend)
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    params = list(parameters)
    grads = [p.grad for p in params if p.grad is not None]
    max_norm, norm_type = float(max_norm), float(norm_type)
    if not grads:
        return torch.tensor(0.0)
    if norm_type != 2.0 or backend == "torch":
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type=norm_type,
                                              error_if_nonfinite=error_if_nonfinite, foreach=foreach)
    for g in grads:
        if g.layout != torch.strided:
            raise RuntimeError("fastopt.clip_grad_norm_ does not support sparse gradients")
    buckets = defaultdict(list)
    for g in grads:
        chosen = _backend.resolve(backend, g.device, g.dtype, is_dense(g))
        buckets[(g.device, g.dtype, chosen)].append(g)
    first = grads[0].device
    sums = []
    for (device, _dtype, chosen), gs in buckets.items():
        if chosen == "torch":
            sums.append(torch.stack([g.float().pow(2).sum() for g in gs]).sum().to(first))
            continue
        out = torch.zeros((len(gs), 4), dtype=torch.float32, device=device)
        elementwise_unchecked("clip", gs, gs, [], [], (), 0, lr=0.0, maximize=False, grad_scale=None,
                              found_inf=None, backend=chosen, device=device, phase=1, reduce_out=out)
        sums.append(out[:, 0].sum().to(first))
    total = torch.stack(sums).sum().sqrt() if len(sums) > 1 else sums[0].sqrt()
    if error_if_nonfinite and bool(torch.logical_or(total.isnan(), total.isinf())):
        raise RuntimeError(
            f"The total norm of order {norm_type} for gradients from `parameters` is non-finite, so it cannot "
            "be clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for (device, _dtype, chosen), gs in buckets.items():
        c = coef.to(device)
        if chosen == "torch":
            torch._foreach_mul_(gs, c)
            continue
        row = c.reshape(1, 1).expand(len(gs), 4).contiguous()
        elementwise_unchecked("clip", gs, gs, [], [], (), 0, lr=0.0, maximize=False, grad_scale=None,
                              found_inf=None, backend=chosen, device=device, phase=0, row_coef=row)
    return total.to(grads[0].dtype) if grads[0].dtype.is_floating_point else total
