"""fastopt: fused optimizer, low-bit state, N:M sparsity and optimal-transport kernels for PyTorch.

    import fastopt
    opt = fastopt.AdamW(model.parameters(), lr=1e-3)   # instead of torch.optim.AdamW

``python -m fastopt.info`` prints what this install was built with and which backend ``auto`` picks.
"""
from . import _ops  # noqa: F401  (registers the torch.library custom ops)
from . import lowbit  # noqa: F401
from . import sparse  # noqa: F401
from . import ot  # noqa: F401
from . import sharpness  # noqa: F401  (SAFLoss)
from . import nn  # noqa: F401  (WTACRSLinear, convert_linear)
from . import comm  # noqa: F401  (DDP gradient-compression comm hooks)
from ._backend import BackendUnavailableError, available_backends, build_info  # noqa: F401
from .optim import (SGDP, AdaBelief, Adam, Adan, AdamP, AdamW, DiffGrad, EXAdam, Lamb, Lion, Muon,  # noqa: F401
                    SGDSaI, clip_grad_norm_, functional)
from .optim import OrthoGrad  # noqa: F401
from .optim import MFAC  # noqa: F401
from .optim import SGD, Adagrad, RMSprop  # noqa: F401
from .optim import SAM  # noqa: F401
from .optim import AdaHessian  # noqa: F401
from .optim import OptimizerInBackward, optimizer_in_backward  # noqa: F401
from .optim import lowbit_presets as _lowbit_presets
from . import lowrank  # noqa: F401,E402  (after the optimizers it builds on)


def _attach_lowbit_presets():
    """``fastopt.lowbit.AdamW8bit`` and the other presets: optimizers, so defined in fastopt.optim, which
    builds on fastopt.lowbit; attached here, after both, so that fastopt.lowbit never imports the optimizers."""
    for name in _lowbit_presets.__all__:
        setattr(lowbit, name, getattr(_lowbit_presets, name))
        if name not in lowbit.__all__:
            lowbit.__all__.append(name)


_attach_lowbit_presets()

__version__ = "0.1.0"
