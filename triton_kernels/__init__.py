"""Triton kernels of fastopt, installed as ``fastopt.triton_kernels``.

One generic multi-tensor launcher (:mod:`.multi_tensor`) runs a per-optimizer ``@triton.jit`` update
function (e.g. :func:`.adam.adam_update`) over every chunk of every tensor in one launch.  On a machine
without a GPU the kernels run under ``TRITON_INTERPRET=1`` (that is how CI tests them).
"""
from .multi_tensor import multi_tensor_apply  # noqa: F401
from .adam import adam_step  # noqa: F401
from .ops import OPS, elementwise_step  # noqa: F401
from .lowbit import lowbit_step, quantize_blockwise  # noqa: F401
from .sparse import nm_mask, transposable_mask  # noqa: F401
from .ot import ot_pass  # noqa: F401
from .sliced import sliced_wpp  # noqa: F401
