"""Optimal transport: online batched log-domain Sinkhorn (:mod:`.sinkhorn`)."""
from .sinkhorn import COSTS, SinkhornResult, sinkhorn, sinkhorn_divergence  # noqa: F401
