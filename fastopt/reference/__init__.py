"""Pure-PyTorch references: the executable specification of every fastopt kernel.

Each reference is tested against the upstream implementation it claims to match, and every kernel
backend is tested against its reference.  The ``torch`` backend runs these functions.
"""
from .adam import adam_reference  # noqa: F401
