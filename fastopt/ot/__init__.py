"""Optimal transport: online batched log-domain Sinkhorn (:mod:`.sinkhorn`), Sinkhorn–Newton–Sparse
(:mod:`.newton`), sparsity-constrained OT (:mod:`.sparse_ot`) and the sliced Wasserstein family
(:mod:`.sliced`)."""
from .sinkhorn import COSTS, SinkhornResult, sinkhorn, sinkhorn_divergence  # noqa: F401
from .sliced import (CONTROL_VARIATES, max_sliced_wasserstein, random_projections, sample_vmf,  # noqa: F401
                     sliced_wasserstein, vmf_distributional_sliced_wasserstein, wasserstein_1d)
from .newton import SNSResult, sinkhorn_newton_sparse  # noqa: F401
from .sparse_ot import SparseOTResult, sparsity_constrained_ot  # noqa: F401
