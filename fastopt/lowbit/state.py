"""Low-bit optimizer states inside fastopt's elementwise optimizers (the machinery behind
``state_bits=``).

``state_bits`` picks a format family: ``8`` (``dyn8s`` for signed states, ``dyn8u`` for non-negative
ones, block 256), ``4`` (``dyn4s`` / ``lin4u``, block 128), ``"4-rank1"`` (as 4, but the non-negative
states of parameters with 2+ rows and columns are ``lin4u-r1``: scaled by min(row max, column max),
kept in ``state[name + "_row"]`` / ``state[name + "_col"]``; cpu and torch backends only) or
``"fp8"`` (e4m3, block 256: ``fp8`` / ``fp8u``).  The non-negative states take the unsigned format
of their family, whose positive values never decode to 0 (:mod:`fastopt.lowbit.codebook`).  A
contiguous parameter whose numel is at least ``min_quant_size`` (default 4096, as bitsandbytes'
``min_8bit_size``) and a multiple of the block gets quantized states; any other keeps its states in
full precision (the parameter's dtype, fp32 with ``master_weights``) and takes the ordinary path.

A quantized state ``name`` is stored as ``state[name]`` (uint8 codes) and ``state[name + "_absmax"]``
(fp32, one per block); ``state["state_format"]`` tags the layout, e.g.
``"fastopt.lowbit/1:dyn8s,dyn8u"`` (the storage format of each state, in the optimizer's state order;
``fp8u`` states are tagged ``fp8``: same codes and values, so checkpoints of either load).
"""
from typing import Iterable, Optional, Sequence, Tuple, Union

import torch

from .. import _sharded

from .codebook import get_format

TAG = "fastopt.lowbit/1"
STATE_BITS = {8: ("dyn8s", "dyn8u"), 4: ("dyn4s", "lin4u"), "fp8": ("fp8", "fp8u"), "4-rank1": ("dyn4s", "lin4u-r1")}
# States that never go negative take the unsigned map.
UNSIGNED_STATES = frozenset({"exp_avg_sq", "max_exp_avg_sq", "exp_avg_var", "max_exp_avg_var", "square_avg"})


def check_state_bits(bits, name="optimizer"):
    """``None`` (full precision), 8, 4, "fp8" or "4-rank1"; anything else is a ValueError."""
    if bits is None:
        return None
    if isinstance(bits, str) and bits.lower() in ("fp8", "4-rank1"):
        return bits.lower()
    if bits in (8, 4) and not isinstance(bits, bool):
        return int(bits)
    raise ValueError(f"{name}: state_bits must be None, 8, 4, 'fp8' or '4-rank1', got {bits!r}")


def rank1_rows(shape):
    """Rows of the rank-1 view of a parameter of ``shape`` (``shape[0]``), or None when it has fewer
    than 2 rows or columns (then its non-negative states are quantized per block)."""
    if len(shape) < 2 or shape[0] < 2:
        return None
    numel = 1
    for d in shape:
        numel *= d
    return shape[0] if numel // shape[0] >= 2 else None


def state_formats(bits: Union[int, str], names: Iterable[str],
                  shape: Optional[Sequence[int]] = None) -> Tuple[str, ...]:
    """The format name of each state in ``names`` for the family ``bits`` (``shape``: the parameter's,
    which decides whether "4-rank1" can normalize by rows and columns)."""
    signed, unsigned = STATE_BITS[check_state_bits(bits)]
    if unsigned == "lin4u-r1" and (shape is None or rank1_rows(shape) is None):
        unsigned = "lin4u"
    return tuple(unsigned if n in UNSIGNED_STATES else signed for n in names)


def format_tag(formats):
    """The ``state_format`` tag of states in ``formats`` (names): their storage formats."""
    return f"{TAG}:{','.join(get_format(f).storage for f in formats)}"


def block_of(bits):
    return get_format(STATE_BITS[check_state_bits(bits)][0]).block


def is_quantizable(p, bits, min_size):
    """Whether parameter ``p`` gets quantized states: at least ``min_size`` elements, a block multiple,
    and contiguous (the kernels walk states in memory order, the reference in logical order).

    A DTensor (FSDP2) is judged on its global size, and is quantized only when its blocks can never
    straddle a shard: its shards are row ranges (Shard(0) / Replicate placements) and a row (the
    elements of one index of dim 0) is a whole number of blocks.  Then every shard holds whole blocks
    for any world size, and the states are the single-process ones bit for bit (NOTE: [low-bit states
    of DTensors])."""
    numel = p.numel()
    if not (bits is not None and numel >= max(int(min_size), 1) and numel % block_of(bits) == 0
            and p.is_contiguous()):
        return False
    if _sharded.is_dtensor(p):
        return p.dim() >= 1 and _sharded.row_sharded(p) and (numel // p.shape[0]) % block_of(bits) == 0
    return True


# NOTE: [low-bit states of DTensors]
# Under FSDP2 a parameter's quantized states are DTensors with the parameter's mesh and placements,
# shaped [rows, per row] (codes: the codes of one row; scales: its blocks), so that each rank's local
# shard holds the codes and block scales of its own rows -- the kernels run on those local shards --
# and distributed checkpoints reshard them with the parameter.  Single-process states are flat; the
# kernels and the checks read only their sizes, so a checkpoint of either loads into the other.
# Rank-1 normalization (a column statistic over every row) is not kept for DTensors.
def _zeros_like_rows(like, numel, dtype):
    """Zeros of ``numel`` elements laid out like the rows of parameter ``like`` (a DTensor: sharded as it)."""
    if not _sharded.is_dtensor(like):
        return torch.zeros(numel, dtype=dtype, device=like.device)
    from torch.distributed.tensor import DTensor

    rows = like.shape[0]
    per_row = numel // rows
    local_rows = _sharded.local_shape_and_offset(like)[0][0]
    data = torch.zeros((local_rows, per_row), dtype=dtype, device=like.device)
    return DTensor.from_local(data, like.device_mesh, like.placements, shape=torch.Size((rows, per_row)),
                              stride=(per_row, 1), run_check=False)


def scale_shapes(fmt, shape):
    """{suffix: numel} of the fp32 scales a state of format ``fmt`` keeps for a parameter of ``shape``."""
    numel = 1
    for d in shape:
        numel *= d
    if fmt.rank1:
        rows = rank1_rows(shape)
        return {"_row": rows, "_col": numel // rows}
    return {"_absmax": numel // fmt.block}


def init_quantized(state, like, names, bits):
    """Zero codes and scales for each state of ``names`` (shaped after ``like``)."""
    formats = state_formats(bits, names, like.shape)
    for name, fname in zip(names, formats):
        fmt = get_format(fname)
        if fmt.rank1 and _sharded.is_dtensor(like):
            raise NotImplementedError(f"rank-1 normalized low-bit states ({fname}) of a DTensor (FSDP2)")
        state[name] = _zeros_like_rows(like, fmt.codes_numel(like.numel()), torch.uint8)
        for suffix, size in scale_shapes(fmt, like.shape).items():
            state[name + suffix] = _zeros_like_rows(like, size, torch.float32)
    state["state_format"] = format_tag(formats)


def check_loaded_state(owner, state, p, names, bits, min_size, where):
    """Raise ValueError when a loaded ``state`` does not have the layout this optimizer gives ``p``."""
    expect_quant = is_quantizable(p, bits, min_size)
    tag = state.get("state_format")
    if tag is None:
        quant_keys = [n for n in names if n in state and torch.is_tensor(state[n]) and state[n].dtype == torch.uint8]
        if expect_quant and any(n in state for n in names):
            raise ValueError(
                f"{owner}: {where} holds full-precision states, but this optimizer keeps "
                f"{bits if bits == 'fp8' else str(bits) + '-bit'} states for this parameter; load it into the "
                f"full-precision optimizer, or start the low-bit one from scratch")
        if quant_keys:
            raise ValueError(f"{owner}: {where} holds uint8 states without a state_format tag")
        return
    if not isinstance(tag, str) or not tag.startswith(TAG + ":"):
        raise ValueError(f"{owner}: {where} has an unknown state format {tag!r} (this fastopt reads {TAG!r})")
    if not expect_quant:
        raise ValueError(f"{owner}: {where} holds low-bit states ({tag}), but this optimizer "
                         f"(state_bits={bits!r}, min_quant_size={min_size}) keeps this parameter's states in full "
                         "precision")
    expected = format_tag(state_formats(bits, names, p.shape))
    if tag != expected:
        raise ValueError(f"{owner}: {where} was saved with state format {tag!r}, but this optimizer uses "
                         f"{expected!r}; build the optimizer with the same state_bits (and options) as the "
                         "checkpoint")
    check_quantized(owner, state, p, names, state_formats(bits, names, p.shape), where, device=False)


def check_quantized(owner, state, p, names, formats, where, device=True):
    """Raise ValueError unless each quantized state of ``names`` (formats ``formats``) has the codes
    (uint8) and fp32 scales of its format for parameter ``p`` (and, with ``device``, on its device)."""
    for name, fname in zip(names, formats):
        fmt = get_format(fname)
        parts = [(state.get(name), torch.uint8, fmt.codes_numel(p.numel()))]
        parts += [(state.get(name + suffix), torch.float32, size) for suffix, size in scale_shapes(fmt, p.shape).items()]
        for t, dtype, numel in parts:
            if not (torch.is_tensor(t) and t.dtype == dtype and t.numel() == numel and t.is_contiguous()
                    and (not device or t.device == p.device)):
                raise ValueError(f"{owner}: {where}: state {name!r} does not match a {fname} state of a "
                                 f"{tuple(p.shape)} parameter on {p.device}")
