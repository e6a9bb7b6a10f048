"""Sharpness-aware training terms.

:class:`SAFLoss`: the trajectory loss of SAF (Du et al., "Sharpness-Aware Training for Free", NeurIPS 2022),
with its per-example output bank, fused (gather, softmax-KL, gradient, scatter) in one kernel per backend.
"""
from .saf import SAFLoss  # noqa: F401

__all__ = ["SAFLoss"]
