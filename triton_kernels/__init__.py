"""Triton kernels of fastopt, installed as ``fastopt.triton_kernels``.

One elementwise kernel (:mod:`.elementwise`, on the shared launch tables of :mod:`.multi_tensor`) runs a
registered op's ``@triton.jit`` update / reduce functions (:mod:`.ops`: one per op declared in
``fastopt/_opspec.py``, e.g. :func:`.lion.lion_update`) over every chunk of every tensor in one launch;
:mod:`.lowbit` is its low-bit-state twin.  On a machine without a GPU the kernels run under
``TRITON_INTERPRET=1`` (that is how CI tests them).
"""
from .multi_tensor import multi_tensor_apply  # noqa: F401
from .adam import adam_step  # noqa: F401
from .ops import OPS, elementwise_step  # noqa: F401
from .lowbit import lowbit_step, quantize_blockwise  # noqa: F401
from .sparse import nm_mask, transposable_mask  # noqa: F401
from .ot import ot_pass  # noqa: F401
from .sliced import sliced_wpp  # noqa: F401
