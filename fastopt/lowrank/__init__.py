"""Low-rank gradient projection (GaLore, Q-GaLore, SVD-free DCT): optimizers and projector math.

    from fastopt.lowrank import GaLoreAdamW
    opt = GaLoreAdamW([{"params": others}, {"params": matrices, "rank": 128, "update_proj_gap": 200,
                                             "scale": 0.25, "proj_type": "std"}], lr=1e-3)

See :mod:`fastopt.lowrank.optim` (the step and its state), :mod:`fastopt.lowrank.projectors` (SVD,
randomized, DCT projectors; Q-GaLore's adaptive refresh) and :mod:`fastopt.lowrank.quant` (INT4/INT8
projector storage).
"""
from .optim import GaLoreAdaBelief, GaLoreAdamW, GaLoreAdan, GaLoreLion, low_rank_shape  # noqa: F401

__all__ = ["GaLoreAdamW", "GaLoreLion", "GaLoreAdan", "GaLoreAdaBelief", "low_rank_shape"]
