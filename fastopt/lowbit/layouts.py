"""How an optimizer step stores what it updates: the state layouts that fastopt's optimizers compose.

Two independent choices per parameter:

* **where the step writes the weights** -- the parameter itself (plain), an fp32 copy
  (:class:`MasterWeights`), the parameter rounded stochastically from fp32 (:class:`StochasticRounding`),
  or, for the int8 weights of :class:`~fastopt.lowbit.Int8Linear`, a dequantized fp32 copy that is
  requantized after the step (:class:`Int8Weights`);
* **how the optimizer states are stored** -- full precision (the dtype of what the step writes:
  :func:`state_dtype`) or blockwise quantized (:class:`LowbitStates`, ``state_bits=``).

Each class is a namespace of functions over explicit arguments (a param group dict, parameters, their
state dicts); none keeps data of its own.  The one place they call back into an optimizer is
:meth:`LowbitStates.step`, through the :class:`ElementwiseOp` protocol (the hooks every elementwise
optimizer defines).  Kernels are reached through :mod:`fastopt._ops`, never through the optimizers.
"""
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import torch

from .. import _backend, _ops, _sharded
from ..reference.rounding import bf16_stochastic
from . import int8 as lowbit_int8
from . import state as lowbit_state
from .codebook import (FORMATS, Format, codebook, dequantize_reference, get_format, quantize_reference,
                       rank1_dequantize_reference, rank1_quantize_reference)

LOW_PRECISION = (torch.bfloat16, torch.float16)

Group = Dict[str, Any]
State = Dict[str, Any]


def check_rounding_options(owner: str, stochastic_rounding: Any, master_weights: Any) -> None:
    """The two ways of storing low-precision weights exclude each other."""
    if stochastic_rounding and master_weights:
        raise ValueError(f"{owner}: choose stochastic_rounding or master_weights, not both")


class MasterWeights:
    """``master_weights=True``: a bf16/fp16 parameter is stepped through an fp32 copy,
    ``state["master_param"]``, with its gradients cast to fp32 and its states fp32; the parameter then
    gets the copy rounded to nearest."""

    KEY = "master_param"

    @staticmethod
    def uses(group: Group, p: torch.Tensor) -> bool:
        return bool(group.get("master_weights")) and p.dtype in LOW_PRECISION

    @staticmethod
    def create(p: torch.Tensor) -> torch.Tensor:
        """The fp32 copy of ``p`` (its memory layout kept)."""
        return p.detach().float().clone(memory_format=torch.preserve_format)

    @staticmethod
    def redirect(grads: Sequence[torch.Tensor], states: Sequence[State]) -> Tuple[List[torch.Tensor],
                                                                                List[torch.Tensor]]:
        """(the tensors the step updates, their gradients): the fp32 copies and fp32 gradients."""
        return [s[MasterWeights.KEY] for s in states], [g.float() for g in grads]

    @staticmethod
    def write_back(params: Sequence[torch.Tensor], masters: Sequence[torch.Tensor]) -> None:
        # (DTensors: shard by shard; DTensor has no sharding rule for _foreach_copy_)
        torch._foreach_copy_([_sharded.local(p) for p in params], [_sharded.local(m) for m in masters])


class StochasticRounding:
    """``stochastic_rounding=True``: a bf16 parameter is stored from its fp32 update with seeded,
    counter-based stochastic rounding (:func:`fastopt.reference.rounding.bf16_stochastic`; the kernels
    round the same bits themselves).  Its states stay bf16."""

    @staticmethod
    def uses(group: Group, p: torch.Tensor) -> bool:
        return bool(group.get("stochastic_rounding")) and p.dtype == torch.bfloat16

    @staticmethod
    def write(params: Sequence[torch.Tensor], values: Sequence[torch.Tensor], seed: int,
              indices: Sequence[int], steps: Sequence[Any], offsets: Optional[Sequence[int]] = None) -> None:
        """``params[k] <- round(values[k])`` with the stream (``seed``, ``indices[k]``, ``steps[k]``), element
        ``i`` of ``params[k]`` rounding as element ``offsets[k] + i`` of its whole tensor (``params[k]`` a
        contiguous piece of it, e.g. an FSDP2 shard, starting there; the kernels' ``sr_offsets``).
        ``offsets``: None or empty (all 0), or one non-negative int per param, checked before any write."""
        from ..reference.rounding import check_offsets
        params = list(params)
        offsets = check_offsets(offsets, len(params), "StochasticRounding.write") or [0] * len(params)
        for p, v, i, step, off in zip(params, values, indices, steps, offsets):
            if p.numel() > 0:
                p.copy_(bf16_stochastic(v, seed, i, step, off))


class Int8Weights:
    """The int8 weights (uint8 codes with group scales and zeros) of :class:`~fastopt.lowbit.Int8Linear`:
    their gradient is the layer's ``float_grad`` (with several ranks, averaged by
    :func:`~fastopt.lowbit.reduce_float_grads` first, else refused); a step dequantizes one weight at a
    time to fp32 (so only one fp32 copy exists), steps it with fp32 states, and requantizes it with new
    group scales."""

    is_weight = staticmethod(lowbit_int8.is_int8_weight)

    @staticmethod
    def check_traceable(owner: str, p: torch.Tensor) -> None:
        """A compiled step cannot find the owner of a uint8 parameter (a weak dictionary)."""
        if p.dtype == torch.uint8 and torch.compiler.is_compiling():
            raise NotImplementedError(
                f"{owner}: a compiled step cannot step uint8 parameters (the int8 weights of "
                "fastopt.lowbit.Int8Linear are found through a weak dictionary, which dynamo does not trace); "
                "step this optimizer eagerly")

    @staticmethod
    def grad_of(owner: str, p: torch.Tensor) -> Optional[torch.Tensor]:
        """The fp32 gradient of int8 weight ``p`` (its ``float_grad``), or None; raises ValueError for a
        gradient that does not fit ``p``, RuntimeError for one that several ranks did not average
        (:func:`fastopt.lowbit.int8.check_float_grad_reduced`)."""
        g = getattr(p, "float_grad", None)
        if g is None:
            return None
        if (not torch.is_tensor(g) or g.layout != torch.strided or g.device != p.device or g.shape != p.shape
                or not g.is_floating_point() or g.is_complex()):
            what = f"{g.dtype}{tuple(g.shape)} on {g.device}" if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f"{owner}: the float_grad of an int8 weight {tuple(p.shape)} on {p.device} is {what}")
        lowbit_int8.check_float_grad_reduced(owner, p, g)  # (data parallel: averaged by reduce_float_grads)
        return g.float().contiguous()

    @staticmethod
    def clear_grads(params: Sequence[torch.Tensor], set_to_none: bool) -> None:
        """``zero_grad`` for the ``float_grad`` of the int8 weights among ``params``."""
        for p in params:
            if getattr(p, "float_grad", None) is not None and lowbit_int8.is_int8_weight(p):
                if set_to_none:
                    p.float_grad = None
                else:
                    p.float_grad.zero_()

    @staticmethod
    def state_like(p: torch.Tensor) -> torch.Tensor:
        """What the states of int8 weight ``p`` are shaped after: an fp32 tensor of its shape."""
        return torch.empty(p.shape, dtype=torch.float32, device=p.device)

    @staticmethod
    def step(step_float: Callable[..., None], group: Group, params: Sequence[torch.Tensor],
             grads: Sequence[torch.Tensor], states: Sequence[State], backend: str, grad_scale: Optional[torch.Tensor],
             found_inf: Optional[torch.Tensor]) -> None:
        """``step_float(group, [w], [g], [state], backend, grad_scale, found_inf)`` steps the fp32 copy
        ``w`` of each weight; the requantization rounds stochastically per the layer's option (stream:
        the weight's index in its group, its step).  A step skipped by AMP's ``found_inf`` leaves the
        codes as they were."""
        index = {id(p): i for i, p in enumerate(group["params"])}
        for p, g, state in zip(params, grads, states):
            owner = lowbit_int8.int8_owner(p)
            w = owner.dequantized_weight(torch.float32)
            step_float(group, [w], [g], [state], backend, grad_scale, found_inf)
            codes, scales, zeros = lowbit_int8.quantize_int8(
                w, owner.group_size, stochastic=owner.stochastic_rounding, seed=group.get("seed", 0),
                index=index[id(p)], step=state["step"])
            if found_inf is not None:
                skip = found_inf.to(device=p.device, dtype=torch.float32) != 0
                codes = torch.where(skip, p, codes)
                scales = torch.where(skip, owner.weight_scale, scales)
                zeros = torch.where(skip, owner.weight_zero, zeros)
            p.copy_(codes)
            owner.weight_scale.copy_(scales)
            owner.weight_zero.copy_(zeros)


def state_dtype(p: torch.Tensor, state: State) -> torch.dtype:
    """The dtype of the full-precision states of ``p``: fp32 beside a master copy or for int8 weights
    (both are stepped in fp32), else the parameter's."""
    return torch.float32 if MasterWeights.KEY in state or Int8Weights.is_weight(p) else p.dtype


def init_weights(group: Group, p: torch.Tensor, state: State) -> torch.Tensor:
    """Create in the new ``state`` of ``p`` what the step writes instead of ``p`` (the master copy,
    when its group uses master weights); returns the tensor its states are shaped after."""
    if MasterWeights.uses(group, p):
        state[MasterWeights.KEY] = MasterWeights.create(p)
        return state[MasterWeights.KEY]
    return Int8Weights.state_like(p) if Int8Weights.is_weight(p) else p


# -- low-bit states -----------------------------------------------------------------------------------
@torch.compiler.assume_constant_result
def _codebooks(device):
    """Every codebook of ``FORMATS`` on ``device``, in order: under torch.compile constants of the graph
    (their construction, with data-dependent sizes, runs outside any trace).  One call returns them all:
    dynamo names the constants after the function, not its arguments."""
    return tuple(codebook(name, device) for name in FORMATS)


_FORMAT_INDEX = {name: i for i, name in enumerate(FORMATS)}


def _codebook(fmt, device):
    return _codebooks(device)[_FORMAT_INDEX[fmt.name]]


def lowbit_dequantize(state: State, name: str, fmt: Format, like: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The fp32 values (flat) of quantized state ``name`` (reference path); with ``like``, shaped as it
    (a DTensor's states, NOTE: [low-bit states of DTensors] in fastopt/lowbit/state.py: a DTensor
    sharded as ``like``, dequantized shard by shard)."""
    if like is not None and _sharded.is_dtensor(like):
        from torch.distributed.tensor import DTensor

        local_state = {k: _sharded.local(state[k]) for k in (name, name + "_absmax")}
        values = lowbit_dequantize(local_state, name, fmt).view_as(like.to_local())
        return DTensor.from_local(values, like.device_mesh, like.placements, shape=like.shape, stride=like.stride(),
                                  run_check=False)
    if like is not None:
        return lowbit_dequantize(state, name, fmt).view_as(like)
    if fmt.rank1:
        return rank1_dequantize_reference(state[name], state[name + "_row"], state[name + "_col"], fmt)
    return dequantize_reference(state[name], state[name + "_absmax"], fmt)


def lowbit_quantize_into(state: State, name: str, fmt: Format, p: torch.Tensor, values: torch.Tensor) -> None:
    """Quantize ``values`` into quantized state ``name`` of parameter ``p`` in place (reference path)."""
    if _sharded.is_dtensor(p):  # shard by shard: each holds whole blocks
        local_state = {k: _sharded.local(state[k]).view(-1) for k in (name, name + "_absmax")}  # (views: written through)
        lowbit_quantize_into(local_state, name, fmt, p.to_local(), _sharded.local(values))
        return
    if fmt.rank1:
        codes, rows, cols = rank1_quantize_reference(values, lowbit_state.rank1_rows(p.shape), fmt)
        state[name + "_row"].copy_(rows)
        state[name + "_col"].copy_(cols)
    else:
        codes, absmax = quantize_reference(values, fmt)
        state[name + "_absmax"].copy_(absmax)
    state[name].copy_(codes)


class ElementwiseOp(Protocol):
    """The hooks of an elementwise optimizer that a low-bit step calls (``fastopt.optim.base``)."""

    def _state_names(self, group: Group) -> Sequence[str]: ...

    def _op_name(self, group: Group) -> str: ...

    def _native_hyper(self, group: Group) -> Tuple[Sequence[float], int]: ...

    def _stochastic(self, group: Group, p: torch.Tensor) -> bool: ...

    def _reference_step(self, group: Group, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                        states: Sequence[State], grad_scale: Optional[torch.Tensor],
                        found_inf: Optional[torch.Tensor]) -> None: ...


class LowbitStates:
    """``state_bits=8``, ``4``, ``"fp8"`` or ``"4-rank1"`` (see :mod:`fastopt.lowbit.state`): the states of
    every parameter with at least ``min_quant_size`` elements (and a block-multiple numel) are kept
    blockwise quantized and updated in one fused dequantize-update-requantize pass."""

    TAG_KEY = "state_format"

    @staticmethod
    def check_options(owner: str, group: Group) -> None:
        """Normalize the group's ``state_bits`` in place; ValueError for invalid options."""
        if "state_bits" not in group:
            return
        group["state_bits"] = lowbit_state.check_state_bits(group["state_bits"], owner)
        size = group.get("min_quant_size")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise ValueError(f"{owner}: min_quant_size must be a non-negative int, got {size!r}")

    @staticmethod
    def uses(group: Group, p: torch.Tensor) -> bool:
        return lowbit_state.is_quantizable(p, group.get("state_bits"), group.get("min_quant_size", 4096))

    @staticmethod
    def holds(state: State) -> bool:
        """Whether ``state`` holds quantized states."""
        return LowbitStates.TAG_KEY in state

    @staticmethod
    def init(group: Group, state: State, like: torch.Tensor, names: Sequence[str]) -> None:
        lowbit_state.init_quantized(state, like, names, group.get("state_bits"))

    @staticmethod
    def check_bucket(owner: str, group: Group, names: Sequence[str], params: Sequence[torch.Tensor],
                     state_of: Dict[torch.Tensor, State], backend: str) -> None:
        """Raise before a step when a parameter's quantized states do not match the group's options, or
        ``backend`` cannot run the group's formats."""
        bits = group.get("state_bits")
        for p in params:
            tag = state_of[p].get(LowbitStates.TAG_KEY) if p in state_of else None
            if tag is None:
                continue
            expected = (lowbit_state.format_tag(lowbit_state.state_formats(bits, names, p.shape))
                        if bits is not None else None)
            if tag != expected:
                raise ValueError(f"{owner}: a parameter's states are {tag!r} but the group's options need "
                                 f"{expected!r} (state_bits or ams_bound changed after the first step)")
            lowbit_state.check_quantized(owner, state_of[p], p, names, lowbit_state.state_formats(bits, names, p.shape),
                                         "a parameter's state")
        if bits == "4-rank1" and backend not in ("cpu", "torch"):
            for p in params:
                if LowbitStates.uses(group, p) and any(
                        get_format(f).rank1 for f in lowbit_state.state_formats("4-rank1", names, p.shape)):
                    raise _backend.BackendUnavailableError(
                        f"{owner}: rank-1 normalized low-bit states run on the cpu and torch backends only, not "
                        f"{backend!r} (use state_bits=4 on GPUs)")

    @staticmethod
    def check_loaded(owner: str, group: Group, names: Sequence[str], p: torch.Tensor, state: State,
                     where: str) -> None:
        """Raise ValueError when a loaded ``state`` of ``p`` does not have the layout ``group`` gives it."""
        lowbit_state.check_loaded_state(owner, state, p, names, group.get("state_bits"),
                                        group.get("min_quant_size", 4096), where)

    @staticmethod
    def step(op: ElementwiseOp, group: Group, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
             states: Sequence[State], backend: str, grad_scale: Optional[torch.Tensor],
             found_inf: Optional[torch.Tensor]) -> None:
        """Fused steps of ``op`` over parameters whose states are quantized: one call per layout (the
        formats of a parameter's states depend on its shape only with rank-1 normalization)."""
        names = op._state_names(group)
        layouts = defaultdict(list)
        for i, p in enumerate(params):
            layouts[lowbit_state.state_formats(group["state_bits"], names, p.shape)].append(i)
        for fnames, idx in layouts.items():
            pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
            LowbitStates._step_layout(op, group, [get_format(f) for f in fnames], pick(params), pick(grads),
                                      pick(states), backend, grad_scale, found_inf)

    @staticmethod
    def _step_layout(op, group, formats, params, grads, states, backend, grad_scale, found_inf):
        names = op._state_names(group)
        if backend == "torch":  # dequantize, the reference step, requantize (unless AMP skipped the step)
            skip = found_inf is not None and float(found_inf) != 0.0
            temps = [{"step": s["step"], **{n: lowbit_dequantize(s, n, f, like=p) for n, f in zip(names, formats)}}
                     for p, s in zip(params, states)]
            op._reference_step(group, params, grads, temps, grad_scale, found_inf)
            if not skip:
                for p, s, t in zip(params, states, temps):
                    s["step"] = t["step"]
                    for n, f in zip(names, formats):
                        lowbit_quantize_into(s, n, f, p, t[n])
            return
        hyper, flags = op._native_hyper(group)
        device = params[0].device
        rank1 = [f.rank1 for f in formats]
        scales = [s[n + ("_row" if f.rank1 else "_absmax")] for n, f in zip(names, formats) for s in states]
        colmax = [s[n + "_col"] for n, f in zip(names, formats) if f.rank1 for s in states]
        _ops.run_lowbit(_ops.LowbitCall(
            op._op_name(group), params, grads, [s[n] for n in names for s in states], scales,
            [_codebook(f, device) for f in formats], formats[0].block, [s["step"] for s in states], hyper, flags,
            lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, backend=backend,
            device=device, seed=group.get("seed", 0), stochastic=op._stochastic(group, params[0]), colmax=colmax,
            rank1=rank1, rank1_rows=[lowbit_state.rank1_rows(p.shape) or 1 for p in params] if any(rank1) else []))
