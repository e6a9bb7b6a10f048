"""INT4 / INT8 storage of dense low-rank projectors (Q-GaLore, Zhang et al. 2024; q-galore-torch 1.0).

Format: the projector is flattened (row-major) and cut into groups of ``group_size`` consecutive elements.
Each group has an fp32 ``scale`` and an fp32 ``zero`` (asymmetric min/max quantization, q-galore-torch's
``GaLoreProjector._quantize``): ``scale = max(max - min, 1e-5) / (2^bits - 1)``,
``zero = clamp(-round(min / scale), 0, 2^bits - 1)``, ``code = clamp(round(w / scale) + zero, 0, 2^bits - 1)``;
``w ~= scale * (code - zero)``. q-galore keeps one code per uint8; here 4-bit codes are packed two per byte
(:func:`pack_int4`: element ``2i`` in the low nibble of byte ``i``, element ``2i+1`` in its high nibble), so an
INT4 projector takes ``numel / 2`` bytes plus ``8`` bytes per group (``numel/2 + numel/32`` bytes at the
default ``group_size = 256``). Stochastic rounding (``stochastic=True``) replaces ``round`` of ``w / scale``
by ``floor + (u < frac)`` with ``u`` from a seeded CPU generator: the same codes on every device and rank.
"""
from __future__ import annotations

import numbers
from typing import Dict, Mapping, Sequence, Tuple

import torch

__all__ = [
    "quantize_groupwise",
    "dequantize_groupwise",
    "pack_int4",
    "unpack_int4",
    "quantize_projector",
    "dequantize_projector",
]


def _check_bits(bits):
    if isinstance(bits, bool) or bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8; got {bits!r}")
    return int(bits)


def _group_rows(w, group_size):
    """``w`` as a ``[groups, group_size]`` view (``group_size=-1``: one group per row of a 2-D ``w``)."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
        raise TypeError(f"group_size must be an int (> 0, or -1 for one group per row); got {group_size!r}")
    if group_size == -1:
        if w.dim() != 2:
            raise ValueError(f"group_size=-1 (one group per row) needs a 2-D tensor; got shape {tuple(w.shape)}")
        return w
    if group_size < 1:
        raise ValueError(f"group_size must be > 0 (or -1 for one group per row); got {group_size}")
    if w.numel() == 0 or w.numel() % group_size:
        raise ValueError(
            f"numel {w.numel()} (shape {tuple(w.shape)}) is not a positive multiple of group_size={group_size}: "
            f"use a group_size that divides it (e.g. one of its divisors such as "
            f"{', '.join(str(d) for d in _divisors_near(w.numel(), group_size))}), or group_size=-1 for one group "
            f"per row of a 2-D tensor")
    return w.reshape(-1, group_size)


def _divisors_near(numel, target):
    """A few divisors of ``numel`` close to ``target`` (for the error message)."""
    if numel <= 0:
        return [1]
    divs = set()
    d = 1
    while d * d <= numel:
        if numel % d == 0:
            divs.add(d)
            divs.add(numel // d)
        d += 1
    return sorted(sorted(divs, key=lambda x: (abs(x - target), x))[:4])


def quantize_groupwise(w: torch.Tensor, *, group_size: int = 256, bits: int = 4, stochastic: bool = False,
                       seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group-wise asymmetric min/max quantization of ``w`` to ``bits``-bit codes (one uint8 per element).

    ``w``: a float tensor whose ``numel`` is a multiple of ``group_size`` (groups are consecutive elements of the
    flattened tensor; ``group_size=-1``: one group per row of a 2-D ``w``, q-galore's default). Computed in
    ``w``'s dtype, as q-galore does (pass fp32 for its projectors). Returns ``(codes, scales, zeros)``:
    ``codes`` uint8 ``[groups, group_size]`` in ``[0, 2^bits - 1]``; ``scales`` and ``zeros`` ``[groups, 1]``
    (fp32 for fp32 ``w``).

    ``stochastic=False``: bit-identical to q-galore-torch 1.0's ``GaLoreProjector._quantize``.
    ``stochastic=True``: ``w / scale`` is rounded stochastically, ``floor(x) + (u < x - floor(x))`` with
    ``u ~ U[0, 1)`` drawn from a CPU ``torch.Generator`` seeded with ``seed`` (int), so the expected code equals
    ``x + zero`` before clamping (unbiased) and the codes are the same on every device.
    """
    if not isinstance(w, torch.Tensor) or not w.is_floating_point():
        raise TypeError("w must be a floating-point tensor")
    bits = _check_bits(bits)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if not -(2 ** 63) <= seed < 2 ** 64:
        raise ValueError(f"seed must lie in [-2**63, 2**64); got {seed}")
    wg = _group_rows(w, group_size)
    if not torch.isfinite(wg).all():
        raise ValueError("w has non-finite values (nan/inf); cannot quantize")
    max_int = 2 ** bits - 1
    max_val = wg.amax(dim=1, keepdim=True)
    min_val = wg.amin(dim=1, keepdim=True)
    scales = (max_val - min_val).clamp(min=1e-5) / max_int
    zeros = (-torch.round(min_val / scales)).clamp_(0, max_int)
    x = wg / scales
    if stochastic:
        gen = torch.Generator(device="cpu")
        gen.manual_seed(int(seed))
        u = torch.rand(x.shape, generator=gen, dtype=torch.float32).to(device=x.device)
        fl = torch.floor(x)
        q = fl + ((x - fl) > u).to(x.dtype)
    else:
        q = torch.round(x)
    codes = torch.clamp(q + zeros, 0, max_int).to(torch.uint8)
    return codes, scales, zeros


def dequantize_groupwise(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, shape: Sequence[int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``scales * (codes - zeros)`` reshaped to ``shape``: q-galore-torch 1.0's dequantization, same arithmetic.

    ``codes``: uint8, one per element (unpack INT4 first with :func:`unpack_int4`), any shape with
    ``groups * group_size`` elements; ``scales``, ``zeros``: ``[groups, 1]``. The product is computed in
    ``scales.dtype`` (as q-galore: ``scales * (codes.to(scales.dtype) - zeros)``) and cast to ``dtype``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError("codes must be a uint8 tensor (one code per element)")
    if scales.dim() != 2 or scales.shape[1] != 1 or zeros.shape != scales.shape:
        raise ValueError(f"scales and zeros must both be [groups, 1]; got {tuple(scales.shape)} and "
                         f"{tuple(zeros.shape)}")
    shape = tuple(shape)
    numel = 1
    for s in shape:
        numel *= int(s)
    groups = scales.shape[0]
    if codes.numel() != numel or groups == 0 or numel % groups:
        raise ValueError(f"{codes.numel()} codes in {groups} groups cannot fill shape {shape}")
    w = scales * (codes.reshape(groups, -1).to(scales.dtype) - zeros)
    return w.reshape(shape).to(dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte: ``byte[i] = codes[2i] | codes[2i+1] << 4`` (flattened, row-major).

    ``codes``: uint8 with values in ``[0, 15]``. Odd ``numel``: the last byte's high nibble is 0 (padding);
    the result has ``ceil(numel / 2)`` bytes and :func:`unpack_int4` needs the true ``numel``.
    """
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        raise TypeError("codes must be a uint8 tensor")
    flat = codes.reshape(-1)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError(f"4-bit codes must lie in [0, 15]; got a max of {int(flat.max())}")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.reshape(-1, 2)
    return (pairs[:, 0] | (pairs[:, 1] << 4)).contiguous()


def unpack_int4(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: ``numel`` uint8 codes (flat) from ``ceil(numel / 2)`` packed bytes."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8:
        raise TypeError("packed must be a uint8 tensor")
    if isinstance(numel, bool) or not isinstance(numel, numbers.Integral) or numel < 0:
        raise TypeError(f"numel must be a non-negative int; got {numel!r}")
    flat = packed.reshape(-1)
    if flat.numel() != (numel + 1) // 2:
        raise ValueError(f"{flat.numel()} packed bytes hold {2 * flat.numel() - 1} or {2 * flat.numel()} codes, "
                         f"not numel={numel}")
    out = torch.stack([flat & 0xF, flat >> 4], dim=1).reshape(-1)
    return out[:numel]


def quantize_projector(P: torch.Tensor, *, bits: int = 4, group_size: int = 256, stochastic: bool = False,
                       seed: int = 0) -> Dict[str, torch.Tensor]:
    """Quantize a dense projector for storage: ``dict(codes, scales, zeros)`` of plain tensors.

    ``codes``: for ``bits=4`` the packed uint8 bytes (``numel / 2``, see :func:`pack_int4`), for ``bits=8`` one
    uint8 per element (flat); ``scales``, ``zeros``: fp32 ``[numel / group_size, 1]``. ``P`` is quantized in fp32
    (``P.float()``). The dict loads with ``torch.load(weights_only=True)``. See :func:`quantize_groupwise`.
    """
    if not isinstance(P, torch.Tensor) or not P.is_floating_point():
        raise TypeError("P must be a floating-point tensor")
    bits = _check_bits(bits)
    codes, scales, zeros = quantize_groupwise(P.float(), group_size=group_size, bits=bits,
                                              stochastic=stochastic, seed=seed)
    codes = pack_int4(codes) if bits == 4 else codes.reshape(-1).contiguous()
    return {"codes": codes, "scales": scales, "zeros": zeros}


def dequantize_projector(q: Mapping[str, torch.Tensor], shape: Sequence[int],
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the ``shape`` projector in ``dtype`` from :func:`quantize_projector`'s dict.

    INT4 vs INT8 is read off the sizes: ``numel`` codes means one per element (INT8), ``ceil(numel / 2)``
    bytes means packed INT4 (for ``numel == 1`` both are the same byte and read the same).
    """
    if not isinstance(q, Mapping) or not {"codes", "scales", "zeros"} <= set(q):
        raise TypeError("q must be the dict returned by quantize_projector (keys codes, scales, zeros)")
    shape = tuple(int(s) for s in shape)
    numel = 1
    for s in shape:
        numel *= s
    codes = q["codes"]
    if codes.numel() == numel:
        flat = codes.reshape(-1)
    elif codes.numel() == (numel + 1) // 2:
        flat = unpack_int4(codes, numel)
    else:
        raise ValueError(f"{codes.numel()} code bytes fit neither INT8 ({numel}) nor packed INT4 "
                         f"({(numel + 1) // 2}) for shape {shape}")
    return dequantize_groupwise(flat, q["scales"], q["zeros"], shape, dtype)
