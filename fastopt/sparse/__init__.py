"""N:M and 2:4 structured sparsity: mask kernels and 2:4 compression.

    mask = fastopt.sparse.nm_mask(w, 2, 4)                 # the 2 largest |w| of every 4 along rows
    mask = fastopt.sparse.transposable_mask(w)             # 2:4 for w and for w.T (4x4 tiles, exact)
    w_sparse = fastopt.sparse.compress_2to4(w * mask)      # torch's semi-structured tensor (GPU)

Semantics (ties, NaN, the exact/greedy transposable rules) are those of
:mod:`fastopt.reference.sparse`; every backend (``cuda``, ``triton``, ``cpu``, ``torch``) returns the
same mask bit for bit.
"""
from .masks import MAX_KERNEL_M, compress_2to4, is_nm_sparse, nm_mask, transposable_mask
from .training import NMSparsity, nm_param_groups
from .unstructured import MagnitudeSparsity, RandomSparsity, unstructured_param_groups
from .densities import erk_densities, layer_adaptive_densities
from .select import magnitude_masks, magnitude_thresholds

__all__ = ["nm_mask", "transposable_mask", "is_nm_sparse", "compress_2to4", "MAX_KERNEL_M", "NMSparsity",
           "nm_param_groups"]
__all__ += ["RandomSparsity", "MagnitudeSparsity", "unstructured_param_groups"]
__all__ += ["magnitude_masks", "magnitude_thresholds"]
__all__ += ["erk_densities", "layer_adaptive_densities"]
