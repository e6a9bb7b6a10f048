"""fastopt optimizers: drop-in ``torch.optim.Optimizer`` classes running fused kernels."""
from . import functional  # noqa: F401
from .adam import Adam, AdamW  # noqa: F401
from .base import FusedOptimizer  # noqa: F401
from .lion import Lion  # noqa: F401
from .clip import clip_grad_norm_  # noqa: F401
from .adabelief import AdaBelief  # noqa: F401
from .adan import Adan  # noqa: F401
from .diffgrad import DiffGrad  # noqa: F401
from .exadam import EXAdam  # noqa: F401
from .adahessian import AdaHessian  # noqa: F401
from .muon import Muon  # noqa: F401
from .orthograd import OrthoGrad  # noqa: F401
from .mfac import MFAC  # noqa: F401
from .sam import SAM  # noqa: F401
from .adamp import SGDP, AdamP  # noqa: F401
from .lamb import Lamb  # noqa: F401
from .sgdsai import SGDSaI  # noqa: F401
from .sgd import SGD  # noqa: F401
from .adagrad import Adagrad  # noqa: F401
from .rmsprop import RMSprop  # noqa: F401
from .in_backward import OptimizerInBackward, optimizer_in_backward  # noqa: F401
