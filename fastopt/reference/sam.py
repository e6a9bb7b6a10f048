"""Reference first step of SAM (Foret et al., ICLR 2021) and ASAM (Kwon et al., ICML 2021): the ascent
``w <- w + e(w)`` with the weights saved for an exact restore.

Matches ``pytorch_optimizer.SAM.first_step`` (4.1.0) and davda54/sam's ``SAM.first_step``::

    norm  = sqrt(sum over every parameter with a gradient of ||a_i g_i||^2)   a_i = |w_i| (ASAM) or 1
    scale = rho_group / (norm + eps)                                          eps: perturb_eps, 1e-12
    old_p <- w
    w     <- w + (w^2 g) scale   (ASAM)     w <- w + g scale   (SAM)

computed as upstream does it: per-tensor fp32 norms, squared and summed, ``scale =
reciprocal(norm + eps) * fp32(rho)``, then ``e = (w * w * g) * scale``.  The fused kernels
(``csrc/include/fastopt/functors/sam.h``) accumulate the squares in their own order (fp64 partials on
the CPU, fp32 atomics in Triton), so their norm differs from this one by fp32 rounding.

One deliberate difference: where the norm is not finite (an inf/nan gradient, e.g. the overflow a
``torch.amp.GradScaler`` provokes now and then), ``scale`` is 0 and the weights are left as they are
(upstream adds ``nan``/``inf`` to them; its second step then restores them from ``old_p`` anyway).
"""
from typing import Optional, Sequence

import torch

SAM_EPS = 1e-12  # davda54/sam's constant, pytorch_optimizer's default perturb_eps


def _compute(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def sam_sq_norms(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                 adaptive: Sequence[bool]) -> torch.Tensor:
    """The fp32 squares ``||a_i g_i||^2`` of each pair (``a_i = |w_i|`` where ``adaptive[i]``), as a
    1-D tensor on the first parameter's device (pytorch_optimizer's ``get_global_gradient_norm``
    before its sum)."""
    device = params[0].device
    norms = []
    for p, g, a in zip(params, grads, adaptive):
        x = _compute(g) * p.abs() if a else _compute(g)
        norms.append(x.norm().to(device))
    return torch.stack(norms).float().square()


def sam_scales(sq_sum: torch.Tensor, rhos: torch.Tensor, eps: float = SAM_EPS) -> torch.Tensor:
    """``rho / (sqrt(sq_sum) + eps)`` per entry of ``rhos`` (fp32), as upstream computes it
    (``reciprocal(norm + eps) * rho``), and 0 where the norm is not finite."""
    denom = sq_sum.sqrt() + eps
    scale = torch.reciprocal(denom) * rhos
    return torch.where(torch.isfinite(denom), scale, torch.zeros_like(scale))


def sam_perturb_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                          old_params: Sequence[torch.Tensor], scales: torch.Tensor, adaptive: Sequence[bool]) -> None:
    """``old_params[i] <- params[i]; params[i] += e_i`` with ``e_i = (w^2 g) scales[i]`` (ASAM) or
    ``g scales[i]``, in place; nothing is added where ``scales[i] == 0``.  ``scales``: fp32, one per
    parameter, on any device."""
    for i, (p, g, old, a) in enumerate(zip(params, grads, old_params, adaptive)):
        old.copy_(p)
        s = scales[i].to(p.device)
        x = _compute(p)
        e = (x * x * _compute(g)) * s if a else _compute(g) * s
        p.copy_(torch.where(s != 0, x + e, x))


def sam_first_step_reference(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                             old_params: Sequence[torch.Tensor], rhos: Sequence[float], adaptive: Sequence[bool],
                             eps: float = SAM_EPS, sq_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The whole first step over one set of parameters (every entry of the lists is one parameter with
    its gradient, saved-weights buffer, group ``rho`` and group ``adaptive``).  ``sq_sum``: the squared
    global norm when already known.  Returns the global norm + eps (fp32, a one-element tensor)."""
    if sq_sum is None:
        sq_sum = sam_sq_norms(params, grads, adaptive).sum()
    rho_t = torch.tensor([float(r) for r in rhos], dtype=torch.float32, device=sq_sum.device)
    sam_perturb_reference(params, grads, old_params, sam_scales(sq_sum, rho_t, eps), adaptive)
    return sq_sum.sqrt() + eps
