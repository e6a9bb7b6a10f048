"""Reference ⊥Grad projection (Prieto et al., "Grokking at the Edge of Numerical Stability", 2025).

Matches ``pytorch_optimizer.OrthoGrad`` (4.1.0; its per-tensor ``apply_orthogonal_gradients`` with
``eps = 1e-30``).  For each parameter ``w`` with gradient ``g``, flattened, in fp32 (fp64 for fp64
parameters)::

    c   = (w . g) / (w . w + eps)
    go  = g - c w                                       (the part of g orthogonal to w)
    go  = 0                 if ||go|| <= 4 finfo.eps ||g||   (g parallel to w: no direction is left)
    go *= ||g|| / (||go|| + eps)                        (the gradient's norm is kept)
    g  <- go

A fused kernel computes this in three passes (see ``csrc/include/fastopt/functors/orthograd.h``):
the sums ``w.g``, ``w.w``, ``g.g``; then ``||g - c w||^2`` with ``c`` known (no cancellation for
near-parallel gradients); then the update.  :func:`orthograd_scale` is the arithmetic between the
passes, shared by the reference and the fused path.

Deliberate differences: sparse gradients raise (upstream skips them; complex parameters are skipped
as upstream); where ``go`` is zeroed the result is 0 even when ``||g|| / eps`` overflows (upstream
multiplies the zeroed ``go`` by that inf and gets NaN, e.g. ``g = 3 w`` with ``||g|| > 1e8`` in fp32).
"""
from typing import Iterable, Optional, Sequence

import torch

ORTHOGRAD_EPS = 1e-30  # pytorch_optimizer.OrthoGrad's eps


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the projection is computed in: fp64 for fp64 tensors, fp32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def orthograd_scale(g_norm: torch.Tensor, o_norm: torch.Tensor, eps: float = ORTHOGRAD_EPS) -> torch.Tensor:
    """The factor applied to ``go = g - c w``: ``||g|| / (||go|| + eps)``, or 0 where ``||go||`` is
    rounding noise (``<= 4 finfo.eps ||g||``, finfo of the norms' dtype).  Elementwise over tensors
    holding one norm per parameter."""
    tiny = 4.0 * torch.finfo(g_norm.dtype).eps
    return torch.where(o_norm <= tiny * g_norm, torch.zeros_like(g_norm), g_norm / (o_norm + eps))


def check_dense_gradient(g: torch.Tensor) -> None:
    """Sparse gradients raise: the projection needs the whole gradient as a dense vector."""
    if g.layout != torch.strided:
        raise RuntimeError(f"OrthoGrad does not support sparse gradients (got a {g.layout} gradient)")


def orthograd_reference(params: Sequence[torch.Tensor], grads: Iterable[Optional[torch.Tensor]],
                        eps: float = ORTHOGRAD_EPS) -> None:
    """Replace each gradient in ``grads`` (in place; None entries are skipped) by its part orthogonal
    to the matching parameter in ``params``, rescaled to the gradient's norm."""
    with torch.no_grad():
        for p, grad in zip(params, grads):
            if grad is None or torch.is_complex(p):
                continue
            check_dense_gradient(grad)
            dtype = compute_dtype(p.dtype)
            w = p.reshape(-1).to(dtype)
            g = grad.reshape(-1).to(dtype)
            go = g - w * (torch.dot(w, g) / (torch.dot(w, w) + eps))
            grad.copy_((go * orthograd_scale(g.norm(2), go.norm(2), eps)).view_as(grad))
