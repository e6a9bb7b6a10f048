"""Reference global-norm gradient clipping (the semantics of ``torch.nn.utils.clip_grad_norm_``).

Matches ``torch.nn.utils.clip_grad_norm_`` (torch 2.13, foreach and for-loop paths) on fp32 gradients::

    total_norm = || (||g_1||_q, ..., ||g_n||_q) ||_q        (= ||concat(g_1, ..., g_n)||_q)
    coef       = min(max_norm / (total_norm + 1e-6), 1.0)
    g_i       <- g_i * coef                                   (every gradient, also when coef == 1)

returning ``total_norm``.  The scaling is applied without a host sync (the clamped coefficient stays a
device tensor); only ``error_if_nonfinite=True`` reads the norm on the host, as torch does.

Phase split (what a fused kernel does):

* phase A, per tensor: a partial ``P_i`` = ``sum g^2`` (q = 2), ``max |g|`` (q = inf) or
  ``sum |g|^q`` (other finite q > 0) -- :func:`grad_norm_partials`;
* between phases: ``total_norm`` = ``sqrt(sum_i P_i)`` / ``max_i P_i`` / ``(sum_i P_i)^(1/q)``
  (:func:`total_norm_from_partials`) and ``coef`` (:func:`clip_coefficient`);
* phase B, per element: ``g <- g * coef``.

Deliberate differences from torch:

* all math is fp32 whatever the gradient dtype (torch computes the per-tensor norms and the scaling in
  the gradient dtype); the returned norm is always an fp32 0-dim tensor on the first gradient's device
  (torch returns it in the gradients' dtype);
* the norm is the q-norm of the concatenation computed from partial sums, not a norm of per-tensor
  norms (equal up to rounding);
* an empty gradient contributes 0 to the inf-norm (torch's ``_foreach_norm`` raises on it);
* ``norm_type`` must be a positive number or ``inf`` (torch also accepts 0 and ``-inf``).

With no gradients the result is ``torch.tensor(0.0)`` and nothing is scaled, as torch.
"""
import math

import torch

CLIP_EPS = 1e-6  # torch.nn.utils.clip_grad_norm_'s constant in max_norm / (total_norm + 1e-6)


def _norm_type(norm_type):
    q = float(norm_type)
    if not (q > 0.0):  # also rejects nan
        raise ValueError(f"clip_grad_norm_reference supports norm_type > 0 or inf, got {norm_type!r}")
    return q


def grad_norm_partials(grads, norm_type=2.0):
    """Phase A: one fp32 partial per gradient, stacked into a 1-D tensor on the first gradient's device.

    ``sum g^2`` for q = 2, ``max |g|`` for q = inf (0 for an empty tensor), ``sum |g|^q`` otherwise.
    """
    q = _norm_type(norm_type)
    if len(grads) == 0:
        return torch.zeros(0, dtype=torch.float32)
    device = grads[0].device
    parts = []
    for grad in grads:
        g = grad.float()
        if q == 2.0:
            part = (g * g).sum()
        elif math.isinf(q):
            part = g.abs().amax() if g.numel() > 0 else torch.zeros((), dtype=torch.float32, device=g.device)
        else:
            part = g.abs().pow(q).sum()
        parts.append(part.to(device))
    return torch.stack(parts)


def total_norm_from_partials(partials, norm_type=2.0):
    """Between phases: the global q-norm (fp32 0-dim tensor) from :func:`grad_norm_partials`."""
    q = _norm_type(norm_type)
    if partials.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=partials.device)
    if q == 2.0:
        return partials.sum().sqrt()
    if math.isinf(q):
        return partials.amax()
    return partials.sum().pow(1.0 / q)


def clip_coefficient(total_norm, max_norm):
    """Between phases: ``min(max_norm / (total_norm + 1e-6), 1)`` as an fp32 device tensor (no sync)."""
    return torch.clamp(float(max_norm) / (total_norm.float() + CLIP_EPS), max=1.0)


def clip_grad_norm_reference(grads, max_norm, norm_type=2.0, error_if_nonfinite=False):
    """Scale ``grads`` (a list of tensors) in place so that their global ``norm_type``-norm is at most
    ``max_norm``, like ``torch.nn.utils.clip_grad_norm_``; return the total norm before clipping."""
    grads = [grads] if isinstance(grads, torch.Tensor) else list(grads)
    q = _norm_type(norm_type)
    if len(grads) == 0:
        return torch.tensor(0.0)
    total_norm = total_norm_from_partials(grad_norm_partials(grads, q), q)
    if error_if_nonfinite and torch.logical_or(total_norm.isnan(), total_norm.isinf()):
        raise RuntimeError(
            f"The total norm of order {q} for gradients from `parameters` is non-finite, so it cannot be "
            "clipped. To disable this error and scale the gradients by the non-finite norm anyway, set "
            "`error_if_nonfinite=False`")
    coef = clip_coefficient(total_norm, max_norm)
    for g in grads:
        g.copy_(g.float() * coef.to(g.device))
    return total_norm
