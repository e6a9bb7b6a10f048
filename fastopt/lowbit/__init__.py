"""Low-bit optimizer states: 8-bit and 4-bit blockwise, FP8, updated in one fused pass.

    import fastopt
    opt = fastopt.lowbit.AdamW8bit(model.parameters(), lr=1e-3)   # instead of bnb.optim.AdamW8bit

Every elementwise optimizer of fastopt (AdamW, Adam, Lion, Adan, AdaBelief, DiffGrad, EXAdam) takes
``state_bits=8``, ``4`` or ``"fp8"``; ``AdamW8bit``, ``Lion4bit``, ... are those optimizers with it
preset (defined in :mod:`fastopt.optim.lowbit_presets`, which builds on this package, and attached
here by ``import fastopt``).  Formats (maps, blocks, code layout): :mod:`fastopt.lowbit.codebook`; the
state machinery: :mod:`fastopt.lowbit.state`.
"""
from typing import Tuple, Union

import torch

from .. import _backend, _ops
from .codebook import FORMATS, Format, codebook, dequantize_reference, get_format, quantize_reference  # noqa: F401
from .int8 import (Int8Linear, dequantize_int8, int8_linear_, int8_weights, is_int8_weight,  # noqa: F401
                   quantize_int8, reduce_float_grads)
from .state import STATE_BITS, state_formats  # noqa: F401

# (the optimizer presets join this list when fastopt attaches them: fastopt/__init__.py)
__all__ = ["FORMATS", "codebook", "quantize_blockwise", "dequantize_blockwise", "state_formats", "Int8Linear",
           "reduce_float_grads", "int8_weights",
           "int8_linear_", "quantize_int8", "dequantize_int8", "is_int8_weight"]


def _codec_backend(backend, t):
    return _backend.resolve(backend, t.device, torch.float32, True)


def quantize_blockwise(x: torch.Tensor, fmt: Union[str, Format] = "dyn8s", *,
                       backend: str = "auto") -> Tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` blockwise in format ``fmt``: returns ``(codes, absmax)``.

    ``codes``: uint8, ``numel`` bytes (``numel / 2`` for 4-bit formats, two codes per byte, low nibble
    first); ``absmax``: fp32 ``[numel / block]``.  ``x.numel()`` must be a multiple of the format's
    block.  Nearest code, ties toward the lower value, except that in the unsigned formats (``dyn8u``,
    ``fp8u``, ``lin4u``) a positive value never takes the code of 0 (see :mod:`fastopt.lowbit.codebook`).
    """
    fmt = get_format(fmt)
    if x.numel() % fmt.block:
        raise ValueError(f"quantize_blockwise: numel {x.numel()} is not a multiple of the {fmt.name} block {fmt.block}")
    backend = _codec_backend(backend, x)
    if backend == "torch":
        return quantize_reference(x, fmt)
    xf = x.detach().reshape(-1).to(torch.float32).contiguous()
    codes = torch.empty(fmt.codes_numel(xf.numel()), dtype=torch.uint8, device=x.device)
    absmax = torch.empty(xf.numel() // fmt.block, dtype=torch.float32, device=x.device)
    _ops.blockwise_codec(xf, codes, absmax, codebook(fmt, x.device), fmt.block, False, backend)
    return codes, absmax


def dequantize_blockwise(codes: torch.Tensor, absmax: torch.Tensor, fmt: Union[str, Format] = "dyn8s", *,
                         backend: str = "auto") -> torch.Tensor:
    """fp32 values (flat) of ``codes`` / ``absmax`` made by :func:`quantize_blockwise` in ``fmt``."""
    fmt = get_format(fmt)
    numel = codes.numel() * 8 // fmt.bits
    if codes.dtype != torch.uint8 or absmax.dtype != torch.float32 or absmax.numel() * fmt.block != numel:
        raise ValueError(f"dequantize_blockwise: expected uint8 codes and fp32 absmax with "
                         f"{fmt.block} values per absmax ({fmt.name}), got {codes.dtype}[{codes.numel()}] "
                         f"and {absmax.dtype}[{absmax.numel()}]")
    if codes.device != absmax.device:
        raise ValueError("dequantize_blockwise: codes and absmax are on different devices")
    backend = _codec_backend(backend, codes)
    if backend == "torch":
        return dequantize_reference(codes, absmax, fmt)
    x = torch.empty(numel, dtype=torch.float32, device=codes.device)
    _ops.blockwise_codec(x, codes.contiguous(), absmax.contiguous(), codebook(fmt, codes.device), fmt.block, True,
                         backend)
    return x
