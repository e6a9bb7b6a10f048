"""The shared base class of fastopt's optimizers.

A step validates every group first (hyperparameters, gradients: sparse, complex, device, dtype),
then initializes missing state, then runs one fused kernel call per (device, dtype, backend) bucket
of each param group.  Nothing is written before every check has passed.

AMP: like torch's fused optimizers, ``_step_supports_amp_scaling = True``; ``torch.amp.GradScaler``
sets ``grad_scale`` / ``found_inf`` on the optimizer and the kernels unscale the gradients and skip
the step on inf/nan without a host sync.

NOTE: [checks under torch.compile]
``opt.step()`` compiles with ``torch.compile(fullgraph=True)``.  Every check above still runs for a
compiled step, except those that read addresses or tensor values on the host, which dynamo cannot
trace:
- at trace time (dynamo guards on everything they read, so any change retraces and checks again):
  the hyperparameters (``_check_group``; a number-valued lr is checked when it is set and its error
  raised by the step, NOTE: [lr under torch.compile] in functional.py; a tensor lr's shape only), the
  gradients (``_check_param``), every parameter's states (``_check_state_of``: dtype, shape, device,
  strides -- eager mode checks a state once and remembers it by weak reference, a compiled step checks
  them all in every trace), the low-bit formats (``_check_bucket``) and the backends;
- when the graph runs, inside the custom ops: the tensor boundary (NOTE: [the tensor boundary] in
  fastopt/_ops.py) on the tensors handed to each kernel, which includes that no two parameters of one
  kernel call share memory (what ``check_disjoint`` checks in eager mode over the whole step);
- not when compiled: the value of a tensor lr, and overlaps between parameters of different kernel
  calls (those are stepped one call after the other).
"""
import weakref
from collections import defaultdict
from typing import Any, Dict, Iterable, Union

import torch

from .. import _backend
from ..lowbit import int8 as lowbit_int8
from ..lowbit import state as lowbit_state
from ..lowbit.codebook import (FORMATS, codebook, dequantize_reference, get_format, quantize_reference,
                               rank1_dequantize_reference, rank1_quantize_reference)
from ..sparse import MAX_KERNEL_M, nm_mask, transposable_mask
from ..sparse.training import NMSparsity
from .functional import (ParamGroup, SchedulerAwareStep, as_param_groups, check_disjoint, check_view,
                         elementwise_unchecked, is_dense, lowbit_unchecked, overlaps_itself, scalar_lr, scalar_on,
                         scheduler_aware, step_lr)


@torch.compiler.assume_constant_result
def _codebooks(device):
    """Every codebook of ``FORMATS`` on ``device``, in order: under torch.compile constants of the graph
    (their construction, with data-dependent sizes, runs outside any trace).  One call returns them all:
    dynamo names the constants after the function, not its arguments."""
    return tuple(codebook(name, device) for name in FORMATS)


def _codebook(fmt, device):
    return _codebooks(device)[_FORMAT_INDEX[fmt.name]]


_FORMAT_INDEX = {name: i for i, name in enumerate(FORMATS)}


def lowbit_dequantize(state, name, fmt):
    """The fp32 values of quantized state ``name`` (reference path)."""
    if fmt.rank1:
        return rank1_dequantize_reference(state[name], state[name + "_row"], state[name + "_col"], fmt)
    return dequantize_reference(state[name], state[name + "_absmax"], fmt)


def lowbit_quantize_into(state, name, fmt, p, values):
    """Quantize ``values`` into quantized state ``name`` in place (reference path)."""
    if fmt.rank1:
        codes, rows, cols = rank1_quantize_reference(values, lowbit_state.rank1_rows(p.shape), fmt)
        state[name + "_row"].copy_(rows)
        state[name + "_col"].copy_(cols)
    else:
        codes, absmax = quantize_reference(values, fmt)
        state[name + "_absmax"].copy_(absmax)
    state[name].copy_(codes)


def _group_view(group):
    """``group`` as the step reads it: its ``lr`` as a scalar (:func:`.functional.scalar_lr`), so that
    every backend broadcasts it."""
    if torch.compiler.is_compiling() and isinstance(group, ParamGroup):
        # the float lr stays in the view for the torch backend's references (_reference_step)
        return {**group, "lr": step_lr(group), "_lr_value": group["lr"]}
    lr = scalar_lr(group.get("lr"))
    return group if lr is group.get("lr") else {**group, "lr": lr}


def _describe(v):
    return f"{v.dtype}{tuple(v.shape)} on {v.device}" if torch.is_tensor(v) else type(v).__name__


def fill_group_defaults(optimizer, defaults):
    """After unpickling or load_state_dict: every group gets the keys of ``defaults`` it lacks -- except
    "differentiable", which torch's ``__setstate__`` adds to the defaults of every optimizer, unless the
    optimizer had it at construction (so a resumed optimizer's groups have the keys of a fresh one)."""
    own = getattr(optimizer, "_constructed_defaults", None)
    for group in optimizer.param_groups:
        for key, value in defaults.items():
            if key != "differentiable" or own is None or key in own:
                group.setdefault(key, value)


class FusedOptimizer(SchedulerAwareStep, torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group``, ``_init_state`` and ``_step_bucket``."""

    _step_supports_amp_scaling = True
    # Whether the optimizer keeps blockwise quantized (low-bit) states (ElementwiseOptimizer).
    _supports_lowbit_states = False
    # Whether the optimizer can step the int8 weights of fastopt.lowbit.Int8Linear (ElementwiseOptimizer).
    _supports_int8_weights = False
    # Whether param groups may carry "sparsity": fastopt.sparse.NMSparsity (ElementwiseOptimizer).
    _supports_sparsity = False

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                 defaults: Dict[str, Any]) -> None:
        _backend.check_backend_name(defaults.get("backend", "auto"))
        self._constructed_defaults = frozenset(defaults)
        super().__init__(params, defaults)
        self.register_load_state_dict_pre_hook(FusedOptimizer._before_load)
        self.register_load_state_dict_post_hook(FusedOptimizer._after_load)
        self.register_state_dict_post_hook(FusedOptimizer._plain_groups)

    @staticmethod
    def _plain_groups(optimizer, state_dict):
        # Every value of a saved group is a plain Python value or a tensor, so the state_dict loads with
        # torch.load(weights_only=True) (transformers' Trainer, Lightning): N:M schedules are saved as dicts
        # (NMSparsity.to_state) and rebuilt by _before_load.
        for group in state_dict["param_groups"]:
            if isinstance(group.get("sparsity"), NMSparsity):
                group["sparsity"] = group["sparsity"].to_state()
        return state_dict

    def add_param_group(self, param_group):
        """torch's add_param_group, then the group is checked: each parameter once (the kernels would
        step a repeated one concurrently), and its ``sparsity`` (N:M sparse training) against its
        parameters; a group that fails is not added."""
        super().add_param_group(param_group)
        as_param_groups(self.param_groups)  # (NOTE: [lr under torch.compile])
        group = self.param_groups[-1]
        name = type(self).__name__
        if len({id(p) for p in group["params"]}) != len(group["params"]):
            self.param_groups.pop()
            raise ValueError(f"{name}: a parameter appears more than once in one param group (torch.optim steps it "
                             "once per appearance, one after the other); pass each parameter once")
        sparsity = group.get("sparsity")
        if sparsity is None:
            return
        try:
            if not self._supports_sparsity:
                raise TypeError(f"{name} does not support N:M sparse training (a group's 'sparsity'); use one of "
                                "fastopt's elementwise optimizers (fastopt.lowbit.AdamW8bit / ElementwiseAdamW, Lion, "
                                "Adan, AdaBelief, DiffGrad, EXAdam, Lamb, AdamP, SGDP, SGDSaI)")
            if not isinstance(sparsity, NMSparsity):
                raise TypeError(f"{name}: a group's 'sparsity' must be a fastopt.sparse.NMSparsity, got "
                                f"{type(sparsity).__name__}")
            for p in group["params"]:
                sparsity.check_param(p, name)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        as_param_groups(self.param_groups)  # (load_state_dict brings plain dicts)
        self.__dict__.setdefault("_step_called", {"called": False})
        fill_group_defaults(self, self.defaults)

    # -- hooks for subclasses ------------------------------------------------------------------
    def _check_group(self, group):
        """Raise ValueError for invalid hyperparameters of ``group``."""
        raise NotImplementedError

    def _init_state(self, group, p, state):
        """Fill the empty ``state`` dict of parameter ``p``."""
        raise NotImplementedError

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        """Run one fused step over ``params`` (one device, one dtype) with ``backend``; ``grads[i]`` has
        the memory layout of ``params[i]`` (and of its state)."""
        raise NotImplementedError

    # -- the step --------------------------------------------------------------------------------
    def _check_param(self, p, g):
        if (g.layout, g.device, g.dtype, g.shape) == (torch.strided, p.device, p.dtype, p.shape) \
                and p.dtype.is_floating_point:
            return
        name = type(self).__name__
        if not (p.dtype.is_floating_point or p.dtype.is_complex):
            raise TypeError(f"{name} optimizes floating-point parameters; a parameter with a gradient is {p.dtype}")
        if g.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters ({p.dtype}); "
                            "optimize torch.view_as_real(p) instead")
        if g.device != p.device:
            raise ValueError(f"{name}: a gradient is on {g.device} but its parameter on {p.device}")
        raise ValueError(f"{name}: gradient {g.dtype}{tuple(g.shape)} does not match its parameter "
                         f"{p.dtype}{tuple(p.shape)}")

    def _plan(self):
        """Validate everything and bucket the params that have gradients; touches no state.

        Returns [(group, {(device, dtype, backend): ([params], [grads])})].  A gradient whose strides
        differ from its dense parameter's is copied into the parameter's layout (autograd normally
        produces matching layouts; the kernels walk parameter, gradient and state as flat buffers).
        """
        plan = []
        # (self.__dict__: dynamo's special handling of `optimizer.param_groups` would guard on every
        # value of every group, a float lr included; see NOTE: [lr under torch.compile])
        for group in self.__dict__["param_groups"]:
            self._check_group(check_view(group))
            by_layout = defaultdict(list)
            int8 = defaultdict(lambda: ([], []))
            for p in group["params"]:
                if p.dtype == torch.uint8 and torch.compiler.is_compiling():
                    raise NotImplementedError(
                        f"{type(self).__name__}: a compiled step cannot step uint8 parameters (the int8 weights "
                        "of fastopt.lowbit.Int8Linear are found through a weak dictionary, which dynamo does not "
                        "trace); step this optimizer eagerly")
                if lowbit_int8.is_int8_weight(p):
                    g = self._check_int8_param(p)
                    if g is not None:
                        backend = _backend.resolve(group["backend"], p.device, torch.float32, True)
                        int8[(p.device, torch.uint8, backend)][0].append(p)
                        int8[(p.device, torch.uint8, backend)][1].append(g)
                    continue
                g = p.grad
                if g is None:
                    continue
                self._check_param(p, g)
                if not (p.is_contiguous() and g.is_contiguous()):
                    dense = is_dense(p)
                    if not dense and overlaps_itself(p):
                        raise ValueError(f"{type(self).__name__}: a parameter of shape {tuple(p.shape)} has strides "
                                         f"{p.stride()}, so several of its elements share memory (an expand()ed "
                                         "tensor?); it cannot be updated in place")
                    if dense and p.numel() > 1 and g.stride() != p.stride():
                        g = torch.empty_like(p).copy_(g)
                else:
                    dense = True
                by_layout[(p.device, p.dtype, dense)].append((p, g))
            buckets = defaultdict(lambda: ([], []))
            for (device, dtype, dense), pairs in by_layout.items():
                backend = _backend.resolve(group["backend"], device, dtype, dense)
                params, grads = buckets[(device, dtype, backend)]
                params.extend(p for p, _ in pairs)
                grads.extend(g for _, g in pairs)
            buckets.update(int8)
            plan.append((_group_view(group), buckets))
        if not torch.compiler.is_compiling():  # compiled: the tensor boundary checks each call's params
            stepped = [p for _, buckets in plan for params, _ in buckets.values() for p in params]
            check_disjoint(type(self).__name__, stepped, self.__dict__.setdefault("_disjoint_checked", []))
        return plan

    def _check_int8_param(self, p):
        """The gradient (``float_grad``) of the int8 weight ``p`` of an Int8Linear, or None; raises for
        an optimizer that cannot step int8 weights or a gradient that does not fit."""
        name = type(self).__name__
        if not self._supports_int8_weights:
            raise TypeError(f"{name} cannot step the int8 weights of fastopt.lowbit.Int8Linear; use one of "
                            "fastopt's elementwise optimizers (fastopt.lowbit.AdamW8bit / ElementwiseAdamW, Lion, "
                            "Adan, AdaBelief, DiffGrad, EXAdam, Lamb, AdamP, SGDP, SGDSaI)")
        g = getattr(p, "float_grad", None)
        if g is None:
            return None
        if (not torch.is_tensor(g) or g.layout != torch.strided or g.device != p.device or g.shape != p.shape
                or not g.is_floating_point() or g.is_complex()):
            what = f"{g.dtype}{tuple(g.shape)} on {g.device}" if torch.is_tensor(g) else type(g).__name__
            raise ValueError(f"{name}: the float_grad of an int8 weight {tuple(p.shape)} on {p.device} is {what}")
        return g.float().contiguous()

    def zero_grad(self, set_to_none=True):
        """torch's zero_grad, which also clears ``float_grad`` of the int8 weights of Int8Linear layers."""
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            for p in group["params"]:
                if getattr(p, "float_grad", None) is not None and lowbit_int8.is_int8_weight(p):
                    if set_to_none:
                        p.float_grad = None
                    else:
                        p.float_grad.zero_()

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_call()  # (SchedulerAwareStep)
        plan = self._plan()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        scalars = {}
        for group, buckets in plan:
            for (device, _dtype, backend), (params, _grads) in buckets.items():
                self._check_bucket(group, params, backend)
                self._check_states(group, params)
                if device not in scalars:
                    scalars[device] = (scalar_on(grad_scale, device, "grad_scale"),
                                       scalar_on(found_inf, device, "found_inf"))
        for group, buckets in plan:
            for params, _grads in buckets.values():
                for p in params:
                    if not self.state[p]:
                        self._init_state(group, p, self.state[p])
        for group, buckets in plan:
            for (device, _dtype, backend), (params, grads) in buckets.items():
                self._step_bucket(group, params, grads, backend, *scalars[device])
        return loss

    step = scheduler_aware(step)  # (SchedulerAwareStep: a compiled step under an LR scheduler)

    @staticmethod
    def _before_load(optimizer, state_dict):
        # torch.optim casts every floating-point state to its param's dtype on load.  fastopt keeps the
        # fp32 state it made fp32 -- master weights and the states stepped with them, per-tensor fp32
        # scalars (LAMB's norms, SGD-SaI's g-SNR) -- so set those aside here; _after_load puts them back.
        # Low-bit states (uint8 codes, fp32 absmax) are set aside whatever the param's dtype: torch
        # would cast them to it.
        groups = []
        for g in state_dict["param_groups"]:
            if g.get("sparsity") is not None and not isinstance(g["sparsity"], NMSparsity):
                g = {**g, "sparsity": NMSparsity.from_state(g["sparsity"])}   # (the caller's dict is not changed)
            groups.append(g)
        state_dict = {**state_dict, "param_groups": groups}
        saved = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current = [p for g in optimizer.param_groups for p in g["params"]]
        master = {pid for g in state_dict["param_groups"] if g.get("master_weights") for pid in g["params"]}
        optimizer._check_loaded(state_dict, saved)
        # The backend the optimizer was built with wins over the checkpoint's (a checkpoint written on
        # another machine, or with another backend, must not choose this one's kernels).
        optimizer._backends_before_load = [g.get("backend", "auto") for g in optimizer.param_groups]
        stash = {}
        for pid, p in zip(saved, current):
            saved_state = state_dict["state"].get(pid, {})
            quantized = "state_format" in saved_state
            low_precision = p.is_floating_point() and p.dtype != torch.float32
            for key, value in saved_state.items():
                if key == "step" or not (torch.is_tensor(value) or (quantized and isinstance(value, str))):
                    continue  # (torch's load would turn the format tag, a str, into a generator's repr)
                if (quantized or value.dtype == torch.bool  # bool: the mask of N:M sparse training
                        or (low_precision and value.dtype == torch.float32 and (pid in master or value.dim() == 0))):
                    stash.setdefault(p, {})[key] = value
        optimizer._fp32_stash = stash
        return state_dict

    def _elementwise_states(self, group, p, state):
        """{name: dtype} of the states of ``p`` that a step walks element by element beside it: each
        must have ``p``'s shape, device and strides and this dtype (subclasses)."""
        return {}

    def _check_states(self, group, params):
        """Raise before any state changes when the state of one of ``params`` does not belong to it
        (replaced by hand, or loaded for another parameter).  A parameter whose state tensors are the
        very objects checked at an earlier step, at the same parameter address and with the same number
        of state entries, is not checked again (``_states_checked``: id -> weak references, so a recycled
        id never matches)."""
        if torch.compiler.is_compiling():  # every state, from its metadata: see NOTE: [checks under torch.compile]
            for p in params:
                state = self.state.get(p)
                if state:
                    self._check_state_of(group, p, state)
            return
        checked = self.__dict__.setdefault("_states_checked", {})
        state_of = self.state
        for p in params:
            state = state_of.get(p)
            if not state:
                continue
            entry = checked.get(id(p))
            if entry is not None and entry[0]() is p and entry[1] == p.data_ptr() and entry[3] == len(state):
                for name, ref in entry[2]:
                    if state.get(name) is not (ref and ref()):
                        break
                else:
                    continue
            names = self._check_state_of(group, p, state)
            checked[id(p)] = (weakref.ref(p), p.data_ptr(),
                              [(name, weakref.ref(state[name]) if name in state else None) for name in names],
                              len(state))

    def _check_state_of(self, group, p, state):
        """Check the state of ``p`` fully; returns the names of the state tensors checked."""
        shape, device, contiguous = p.shape, p.device, p.is_contiguous()
        names = self._elementwise_states(group, p, state)
        for name, dtype in names.items():
            v = state.get(name)
            if v is None:
                continue
            if not (isinstance(v, torch.Tensor) and v.dtype == dtype and v.shape == shape and v.device == device
                    and (v.is_contiguous() if contiguous else v.numel() <= 1 or v.stride() == p.stride())):
                raise ValueError(f"{type(self).__name__}: state {name!r} of a parameter {p.dtype}{tuple(shape)} "
                                 f"on {device} is {_describe(v)}; it must be {dtype} with the parameter's "
                                 "shape, device and strides")
        step = state.get("step")
        if step is not None and not (isinstance(step, torch.Tensor) and step.numel() == 1 and step.device == device):
            raise ValueError(f"{type(self).__name__}: the state 'step' of a parameter on {device} must be a "
                             f"one-element tensor on its device, got {_describe(step)}")
        return list(names) + ["step"]

    def _check_loaded(self, state_dict, saved_ids):
        """Raise before anything is loaded when ``state_dict`` cannot be loaded: a saved state must
        belong to the parameter it is loaded into (one-element tensors, or tensors of that parameter's
        shape), and only optimizers with low-bit states take low-bit ones."""
        name = type(self).__name__
        current = [p for g in self.param_groups for p in g["params"]]
        for i, (pid, p) in enumerate(zip(saved_ids, current)):
            state = state_dict["state"].get(pid)
            if not state:
                continue
            where = f"the state of parameter {pid} (loaded into parameter {i}, {p.dtype}{tuple(p.shape)})"
            if "state_format" in state:
                if not self._supports_lowbit_states:
                    raise ValueError(f"{name}: {where} holds low-bit states ({state['state_format']}); load it into "
                                     "an optimizer with the same state_bits (fastopt.lowbit.AdamW8bit, "
                                     "ElementwiseAdamW(state_bits=...), ...)")
                continue  # its layout: lowbit_state.check_loaded_state (ElementwiseOptimizer._check_loaded)
            for key, value in state.items():
                if not torch.is_tensor(value) or value.numel() == 1 and value.shape != p.shape:
                    continue
                if value.shape != p.shape:
                    raise ValueError(f"{name}: {where}: state {key!r} has shape {tuple(value.shape)}; the "
                                     "checkpoint's parameters are in another order or belong to another model")
                if not (value.is_floating_point() or value.dtype == torch.bool):
                    raise ValueError(f"{name}: {where}: state {key!r} is {value.dtype}, a format this optimizer "
                                     "does not read")

    def _check_bucket(self, group, params, backend):
        """Raise before any state changes when ``backend`` cannot step ``params`` (subclasses)."""

    @staticmethod
    def _after_load(optimizer):
        for group, backend in zip(optimizer.param_groups, getattr(optimizer, "_backends_before_load", ())):
            group["backend"] = backend
        optimizer._backends_before_load = []
        for p, values in getattr(optimizer, "_fp32_stash", {}).items():
            for key, value in values.items():
                optimizer.state[p][key] = (value if isinstance(value, str)
                                           else value.to(device=p.device, copy=value.device == p.device))
        optimizer._fp32_stash = {}
        # torch.optim keeps `step` on the CPU for its non-fused paths; fastopt's kernels read it on
        # the parameter's device as fp32.  State tensors get the parameter's memory layout, which the
        # kernels assume (they walk parameter, gradient and state as flat buffers in one order).
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if not state:
                    continue
                for key, value in state.items():
                    if key == "step":
                        step = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
                        state[key] = step.to(device=p.device, dtype=torch.float32).reshape(())
                    elif (isinstance(value, torch.Tensor) and value.shape == p.shape and value.numel() > 1
                          and value.stride() != p.stride()):
                        state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


class ElementwiseOptimizer(FusedOptimizer):
    """Base class of the optimizers that run a registered elementwise op (``fastopt/ops.h``).

    Subclasses set ``OP`` (the op name), ``STATE_NAMES`` (state tensors in the op's order),
    ``HYPER_NAMES`` (group keys passed to the reference) and ``REFERENCE``, and define ``_check_group``
    and ``_native_hyper(group) -> (floats, flags)``.  Ops with a reduce phase override ``_run``.

    bf16/fp16 parameters: ``stochastic_rounding=True`` stores bf16 params with seeded, counter-based
    stochastic rounding (the same bits on every backend); ``master_weights=True`` keeps an fp32 copy
    of each low-precision parameter in ``state["master_param"]`` (and fp32 states), steps that copy
    and writes it back rounded to nearest.

    Low-bit states: ``state_bits=8``, ``4`` or ``"fp8"`` keeps the states of every parameter with at
    least ``min_quant_size`` elements (and a numel that is a multiple of the block) blockwise
    quantized, updated in one fused dequantize-update-requantize pass (see :mod:`fastopt.lowbit`).
    Ops with a reduce phase (LAMB, AdamP, SGDP, SGD-SaI) do not support it.
    """

    OP = None
    _supports_int8_weights = True
    _supports_sparsity = True
    _supports_lowbit_states = True
    STATE_NAMES = ()
    HYPER_NAMES = ()
    REFERENCE = None

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                 defaults: Dict[str, Any]) -> None:
        if defaults.get("stochastic_rounding") and defaults.get("master_weights"):
            raise ValueError(f"{type(self).__name__}: choose stochastic_rounding or master_weights, not both")
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch's add_param_group, then the low-bit options of the new group are checked (and
        ``state_bits`` normalized): every group may choose its own."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if "state_bits" in group:
            name = type(self).__name__
            try:
                group["state_bits"] = lowbit_state.check_state_bits(group["state_bits"], name)
                size = group.get("min_quant_size")
                if not isinstance(size, int) or isinstance(size, bool) or size < 0:
                    raise ValueError(f"{name}: min_quant_size must be a non-negative int, got {size!r}")
            except ValueError:
                self.param_groups.pop()
                raise

    def _native_hyper(self, group):
        raise NotImplementedError

    def _state_names(self, group):
        """The op's state tensors for ``group`` (some options add one, e.g. ams_bound)."""
        return self.STATE_NAMES

    def _op_name(self, group):
        return self.OP

    def _uses_master(self, group, p):
        return bool(group.get("master_weights")) and p.dtype in (torch.bfloat16, torch.float16)

    def _init_state(self, group, p, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        like = p
        if lowbit_int8.is_int8_weight(p):  # stepped through an fp32 copy, so its states are fp32
            like = torch.empty(p.shape, dtype=torch.float32, device=p.device)
        if self._uses_master(group, p):
            state["master_param"] = p.detach().float().clone(memory_format=torch.preserve_format)
            like = state["master_param"]
        names = self._state_names(group)
        bits = group.get("state_bits")
        if lowbit_state.is_quantizable(p, bits, group.get("min_quant_size", 4096)):
            lowbit_state.init_quantized(state, like, names, bits)
            return
        for name in names:
            state[name] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _check_bucket(self, group, params, backend):
        names = self._state_names(group)
        for p in params:
            tag = self.state[p].get("state_format") if p in self.state else None
            if tag is not None:
                bits = group.get("state_bits")
                expected = (lowbit_state.format_tag(lowbit_state.state_formats(bits, names, p.shape))
                            if bits is not None else None)
                if tag != expected:
                    raise ValueError(f"{type(self).__name__}: a parameter's states are {tag!r} but the group's "
                                     f"options need {expected!r} (state_bits or ams_bound changed after the first "
                                     "step)")
                lowbit_state.check_quantized(type(self).__name__, self.state[p], p, names,
                                             lowbit_state.state_formats(bits, names, p.shape), "a parameter's state")
        if group.get("state_bits") == "4-rank1" and backend not in ("cpu", "torch"):
            for p in params:
                quantized = lowbit_state.is_quantizable(p, "4-rank1", group.get("min_quant_size", 4096))
                if quantized and any(get_format(f).rank1 for f in lowbit_state.state_formats("4-rank1", names, p.shape)):
                    raise _backend.BackendUnavailableError(
                        f"{type(self).__name__}: rank-1 normalized low-bit states run on the cpu and torch backends "
                        f"only, not {backend!r} (use state_bits=4 on GPUs)")

    def _elementwise_states(self, group, p, state):
        if "state_format" in state:  # quantized: _check_bucket checks the format and sizes
            dtypes = {}
        else:
            fp32 = "master_param" in state or lowbit_int8.is_int8_weight(p)
            dtypes = dict.fromkeys(self._state_names(group), torch.float32 if fp32 else p.dtype)
        if "master_param" in state:
            dtypes["master_param"] = torch.float32
        if "dense_param" in state:
            dtypes["dense_param"] = p.dtype
        if "nm_mask" in state:
            dtypes["nm_mask"] = torch.bool
        return dtypes

    def _check_loaded(self, state_dict, saved_ids):
        super()._check_loaded(state_dict, saved_ids)
        current = [(g, p) for g in self.param_groups for p in g["params"]]
        for pid, (group, p) in zip(saved_ids, current):
            state = state_dict["state"].get(pid)
            if state:
                lowbit_state.check_loaded_state(type(self).__name__, state, p, self._state_names(group),
                                                group.get("state_bits"), group.get("min_quant_size", 4096),
                                                f"the state of parameter {pid}")

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        if lowbit_int8.is_int8_weight(params[0]):
            self._step_int8(group, params, grads, backend, grad_scale, found_inf)
            return
        if group.get("sparsity") is not None:
            self._step_sparse(group, params, grads, backend, grad_scale, found_inf)
            return
        self._step_float(group, params, grads, [self.state[p] for p in params], backend, grad_scale, found_inf)

    # -- N:M sparse training (fastopt.sparse.training) ------------------------------------------------
    @torch.no_grad()
    def sparsify(self) -> None:
        """Start N:M sparse training now: every parameter of a group with ``sparsity`` whose schedule
        is sparse at its current step gets its optimizer state (the dense weights, the mask) and its
        forward weights.  Without this call the first step does it, after a forward on the dense
        weights.  Parameters already sparse are left alone."""
        for group in self.param_groups:
            sp = group.get("sparsity")
            if sp is None:
                continue
            for p in group["params"]:
                state = self.state[p]
                t = state.get("nm_step", 0)
                if "nm_mask" in state or sp.is_dense(t):
                    continue
                if not state:
                    self._init_state(group, p, state)
                backend = _backend.resolve(group["backend"], p.device, p.dtype, is_dense(p))
                self._enter_sparse(group, sp, p, state, t, backend)

    def _dense_weight(self, group, p, state):
        """The dense weights of a sparse-trained parameter: the fp32 master copy or ``dense_param``."""
        return state["master_param"] if "master_param" in state else state["dense_param"]

    def _enter_sparse(self, group, sp, p, state, t, backend):
        """``p`` (dense so far) becomes sparse for the forward at step ``t``."""
        if "master_param" not in state:
            state["dense_param"] = p.detach().clone(memory_format=torch.preserve_format)
        self._refresh_mask(sp, p, self._dense_weight(group, p, state), state, t, backend, None)

    def _refresh_mask(self, sp, p, w, state, t, backend, found_inf):
        """New mask of ``w`` for the forward at step ``t``, then that forward's weights into ``p``."""
        kernel = backend if backend != "torch" and sp.m <= MAX_KERNEL_M else "torch"
        if sp.transposable:
            mask = transposable_mask(w, "exact", backend=kernel)
        else:
            mask = nm_mask(w, sp.pattern(t), sp.m, sp.dim, backend=kernel)
        if mask.stride() != w.stride():  # the kernels walk w, p and the mask as one flat buffer
            mask = torch.empty_like(w, dtype=torch.bool).copy_(mask)
        if found_inf is not None and "nm_mask" in state:  # AMP skipped the step: the mask stays (no sync)
            mask = torch.where(found_inf.to(device=mask.device) != 0, state["nm_mask"], mask)
        state["nm_mask"] = mask
        self._write_forward(p, p if "master_param" in state else w, mask, sp.beta(t), found_inf)

    @staticmethod
    def _write_forward(p, src, mask, beta, found_inf):
        """``p = mask ? src : beta * src`` (exactly 0 where pruned when beta is 0); with AMP's
        ``found_inf`` set, ``p`` keeps its values (as the fused epilogue does)."""
        pruned = src * beta if beta != 0.0 else torch.zeros((), dtype=src.dtype, device=src.device)
        if found_inf is None:
            torch.where(mask, src, pruned, out=p)   # one pass, no temporary (src may be p itself)
            return
        p.copy_(torch.where(found_inf.to(device=p.device) != 0, p, torch.where(mask, src, pruned)))

    @staticmethod
    def _srste_grad(g, w, mask, lam, maximize, grad_scale):
        """``g`` plus the SR-STE term ``lam * (1 - mask) * w``, scaled (AMP) and signed (maximize) as
        the gradient is, so that the kernels' unscaling yields ``g / scale + lam * (1 - mask) * w``."""
        extra = torch.where(mask, 0.0, w.float()) * (-lam if maximize else lam)
        if grad_scale is not None:
            extra = extra * grad_scale.to(device=extra.device)
        return (g.float() + extra).to(g.dtype)

    def _fused_sparse_ok(self, group, params, states, backend):
        """Whether one kernel call can run the step and the sparse epilogue: a kernel backend, an op
        without a reduce phase, full-precision states and no master copy."""
        return (backend != "torch" and type(self)._run is ElementwiseOptimizer._run
                and not any("state_format" in s or "master_param" in s for s in states))

    def _step_sparse(self, group, params, grads, backend, grad_scale, found_inf):
        """A step of N:M sparse-trained parameters (see fastopt.sparse.training), in calls of
        parameters at the same point of the schedule."""
        sp = group["sparsity"]
        calls = defaultdict(list)
        for p, g in zip(params, grads):
            state = self.state[p]
            calls[(state.get("nm_step", 0), "nm_mask" in state)].append((p, g, state))
        for (t, sparse), items in calls.items():
            ps, gs, states = [list(x) for x in zip(*items)]
            if not sparse:  # dense so far: p holds the dense weights
                self._step_float(group, ps, gs, states, backend, grad_scale, found_inf)
                if not sp.is_dense(t + 1):
                    for p, state in zip(ps, states):
                        self._enter_sparse(group, sp, p, state, t + 1, backend)
            else:
                self._step_sparse_call(group, sp, t, ps, gs, states, backend, grad_scale, found_inf)
            for state in states:
                state["nm_step"] = t + 1

    def _step_sparse_call(self, group, sp, t, params, grads, states, backend, grad_scale, found_inf):
        lam, beta, refresh = sp.srste(t), sp.beta(t + 1), sp.refresh(t + 1)
        dense = [self._dense_weight(group, p, s) for p, s in zip(params, states)]
        masks = [s["nm_mask"] for s in states]
        if self._fused_sparse_ok(group, params, states, backend):
            self._add_missing_states(group, dense, states)
            self._run(group, dense, grads, states, backend, grad_scale, found_inf,
                      sparse=(masks, [] if refresh else params, lam, beta))
        else:
            if lam:
                grads = [self._srste_grad(g, w, m, lam, group["maximize"], grad_scale)
                         for g, w, m in zip(grads, dense, masks)]
            master = "master_param" in states[0]
            self._step_float(group, params if master else dense, grads, states, backend, grad_scale, found_inf)
            if not refresh:
                for p, w, m in zip(params, dense, masks):
                    self._write_forward(p, p if master else w, m, beta, found_inf)
        if refresh:
            for p, w, s in zip(params, dense, states):
                self._refresh_mask(sp, p, w, s, t + 1, backend, found_inf)

    def _step_int8(self, group, params, grads, backend, grad_scale, found_inf):
        """Int8Linear weights, one at a time (so only one fp32 copy exists): dequantize to fp32, step
        that copy with the parameter's states, requantize with new group scales (stochastic rounding
        per the layer's option).  A step skipped by AMP's ``found_inf`` leaves the codes as they were."""
        index = {id(p): i for i, p in enumerate(group["params"])}
        for p, g in zip(params, grads):
            owner = lowbit_int8.int8_owner(p)
            state = self.state[p]
            w = owner.dequantized_weight(torch.float32)
            self._step_float(group, [w], [g], [state], backend, grad_scale, found_inf)
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

    def _add_missing_states(self, group, params, states):
        for name in self._state_names(group):  # an option that adds a state was switched on later
            for p, s in zip(params, states):
                if name not in s and "state_format" not in s:
                    s[name] = torch.zeros_like(s.get("master_param", p), memory_format=torch.preserve_format)

    def _step_float(self, group, params, grads, states, backend, grad_scale, found_inf):
        self._add_missing_states(group, params, states)
        targets = params
        if self._uses_master(group, params[0]):
            targets = [s["master_param"] for s in states]
            grads = [g.float() for g in grads]
        quant = [i for i, s in enumerate(states) if "state_format" in s]
        if not quant:
            self._run(group, targets, grads, states, backend, grad_scale, found_inf)
        else:
            plain = [i for i, s in enumerate(states) if "state_format" not in s]
            pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
            if plain:
                self._run(group, pick(targets, plain), pick(grads, plain), pick(states, plain), backend, grad_scale,
                          found_inf)
            self._run_lowbit(group, pick(targets, quant), pick(grads, quant), pick(states, quant), backend,
                             grad_scale, found_inf)
        if targets is not params:
            torch._foreach_copy_(params, targets)

    def _run_lowbit(self, group, params, grads, states, backend, grad_scale, found_inf):
        """Fused steps over the params whose states are quantized: one call per layout (the formats of
        a parameter's states depend on its shape only with rank-1 normalization)."""
        names = self._state_names(group)
        layouts = defaultdict(list)
        for i, p in enumerate(params):
            layouts[lowbit_state.state_formats(group["state_bits"], names, p.shape)].append(i)
        for fnames, idx in layouts.items():
            pick = lambda seq: [seq[i] for i in idx]  # noqa: E731
            self._run_lowbit_layout(group, [get_format(f) for f in fnames], pick(params), pick(grads), pick(states),
                                    backend, grad_scale, found_inf)

    def _run_lowbit_layout(self, group, formats, params, grads, states, backend, grad_scale, found_inf):
        names = self._state_names(group)
        if backend == "torch":
            skip = found_inf is not None and float(found_inf) != 0.0
            temps = [{"step": s["step"], **{n: lowbit_dequantize(s, n, f).view_as(p) for n, f in zip(names, formats)}}
                     for p, s in zip(params, states)]
            self._reference_step(group, params, grads, temps, grad_scale, found_inf)
            if not skip:
                for p, s, t in zip(params, states, temps):
                    s["step"] = t["step"]
                    for n, f in zip(names, formats):
                        lowbit_quantize_into(s, n, f, p, t[n])
            return
        hyper, flags = self._native_hyper(group)
        device = params[0].device
        rank1 = [f.rank1 for f in formats]
        scales = [s[n + ("_row" if f.rank1 else "_absmax")] for n, f in zip(names, formats) for s in states]
        colmax = [s[n + "_col"] for n, f in zip(names, formats) if f.rank1 for s in states]
        lowbit_unchecked(
            self._op_name(group), params, grads, [s[n] for n in names for s in states], scales,
            [_codebook(f, device) for f in formats], formats[0].block, [s["step"] for s in states], hyper, flags,
            lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, backend=backend,
            device=device, seed=group.get("seed", 0), stochastic=self._stochastic(group, params[0]), colmax=colmax,
            rank1=rank1, rank1_rows=[lowbit_state.rank1_rows(p.shape) or 1 for p in params] if any(rank1) else [])

    def _stochastic(self, group, p):
        return bool(group.get("stochastic_rounding")) and p.dtype == torch.bfloat16

    def _reference_step(self, group, params, grads, states, grad_scale, found_inf):
        kwargs = {k: group[k] for k in self.HYPER_NAMES}
        sr = self._stochastic(group, params[0])
        targets = [p.float() for p in params] if sr else params
        # (compiled: the group's float lr, not its mirror -- the references compute with it in Python)
        lr = group["_lr_value"] if "_lr_value" in group else group["lr"]
        type(self).REFERENCE(targets, grads, states, lr=scalar_lr(lr), maximize=group["maximize"],
                             grad_scale=grad_scale, found_inf=found_inf, **kwargs)
        if sr and not (found_inf is not None and float(found_inf) != 0.0):
            from ..reference.rounding import bf16_stochastic
            for i, p, t, s in zip(self._sr_indices(params), params, targets, states):
                p.copy_(bf16_stochastic(t, group["seed"], i, float(s["step"])))

    def _sr_indices(self, params):
        """The index each param has in the kernel call that rounds it (its stochastic-rounding stream)."""
        return range(len(params))

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf, phase=0, rows=None,
             row_coef=None, reduce_out=None, sparse=None):
        """One call of the op over one bucket (``params`` may be fp32 master copies, or the dense
        weights of N:M sparse training with ``sparse = (masks, forward weights or [], lambda, beta)``:
        the fused epilogue of ``fastopt/elementwise.h``, kernel backends only)."""
        if backend == "torch":
            self._reference_step(group, params, grads, states, grad_scale, found_inf)
            return
        hyper, flags = self._native_hyper(group)
        lists = [s[name] for name in self._state_names(group) for s in states]
        elementwise_unchecked(
            self._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags, lr=group["lr"],
            maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, backend=backend,
            device=params[0].device, phase=phase, rows=rows, row_coef=row_coef, reduce_out=reduce_out,
            seed=group.get("seed", 0), stochastic=self._stochastic(group, params[0]),
            **(dict(zip(("sparse_mask", "sparse_out", "sparse_lambda", "sparse_beta"), sparse)) if sparse else {}))
