"""fastopt optimizers: drop-in ``torch.optim.Optimizer`` classes running fused kernels."""
from . import functional  # noqa: F401
from .adam import Adam, AdamW  # noqa: F401
from .base import FusedOptimizer  # noqa: F401
from .lion import Lion  # noqa: F401
from .clip import clip_grad_norm_  # noqa: F401
from .zoo import AdaBelief, Adan, DiffGrad, EXAdam  # noqa: F401
from .muon import Muon  # noqa: F401
from .twophase import SGDP, AdamP, Lamb, SGDSaI  # noqa: F401
