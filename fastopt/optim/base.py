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

from .. import _backend, _ops, _sharded
from ..lowbit.layouts import (Int8Weights, LowbitStates, MasterWeights, StochasticRounding, check_rounding_options,
                              init_weights, state_dtype)
from ..sparse.training import NMSparseTraining, check_group_sparsity, load_schedules, save_schedules
from .functional import (ParamGroup, SchedulerAwareStep, as_param_groups, check_disjoint, check_view,
                         elementwise_unchecked, is_dense, overlaps_itself, scalar_lr, scalar_on,
                         scheduler_aware, step_lr)


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


# Every public optimizer class built on FusedOptimizer, in definition order: the error messages that
# name the optimizers able to do something are derived from it.
_OPTIMIZERS = []


def _able(capability):
    """The public optimizer classes with ``capability`` (a ``_supports_*`` flag), as a message names them."""
    able = [c for c in _OPTIMIZERS if getattr(c, capability)]
    names = ", ".join(c.__name__ for c in able if "_preset_of" not in vars(c))
    preset = next((c for c in able if "_preset_of" in vars(c)), None)
    return names + (f", or their low-bit presets ({preset.__module__}.{preset.__name__}, ...)" if preset else "")


class FusedOptimizer(SchedulerAwareStep, torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group``, ``_init_state`` and ``_step_bucket``.  A
    subclass whose name starts with ``_``, or that sets ``_listed = False`` in its body (an abstract
    base), is not named in the messages that list the optimizers able to do something."""

    _step_supports_amp_scaling = True
    # Whether the optimizer keeps blockwise quantized (low-bit) states (ElementwiseOptimizer).
    _supports_lowbit_states = False
    # Whether the optimizer can step the int8 weights of fastopt.lowbit.Int8Linear (ElementwiseOptimizer).
    _supports_int8_weights = False
    # Whether param groups may carry "sparsity": fastopt.sparse.NMSparsity (ElementwiseOptimizer).
    _supports_sparsity = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if not cls.__name__.startswith("_") and vars(cls).get("_listed", True):
            _OPTIMIZERS.append(cls)

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
        # and rebuilt by _before_load.
        return save_schedules(state_dict)

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
        if group.get("sparsity") is None:
            return
        try:
            if not self._supports_sparsity:
                raise TypeError(f"{name} does not support N:M sparse training or unstructured sparsity (a group's "
                                "'sparsity'); use one of fastopt's elementwise optimizers "
                                f"({_able('_supports_sparsity')}; fastopt.lowbit.ElementwiseAdamW for AdamW)")
            check_group_sparsity(name, group)
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise

    def __setstate__(self, state):
        super().__setstate__(state)
        as_param_groups(self.param_groups)  # (load_state_dict brings plain dicts)
        self.__dict__.setdefault("_step_called", {"called": False})
        fill_group_defaults(self, self._shared_defaults())

    # -- hooks for subclasses ------------------------------------------------------------------
    def _shared_defaults(self):
        """The defaults every param group takes (after unpickling or loading, for the keys it lacks)."""
        return self.defaults

    def _check_group(self, group):
        """Raise ValueError for invalid hyperparameters of ``group``."""
        raise NotImplementedError

    def _check_group_param(self, group, p):
        """Raise when parameter ``p`` (with a gradient) cannot be stepped in ``group`` (subclasses)."""

    def _resolve_backend(self, group, device, dtype, dense):
        """The backend that steps the ``dtype`` parameters of ``group`` on ``device``."""
        return _backend.resolve(group["backend"], device, dtype, dense)

    def _step_view(self, group):
        """``group`` as the step passes it to the buckets, made while planning (so its errors come
        before anything is written)."""
        return _group_view(group)

    def _begin_group(self, group):
        """Called once per planned group, after every check, before its buckets step; returns the
        group the buckets get (an optimizer that counts steps per group advances it here)."""
        return group

    def _init_state(self, group, p, state):
        """Fill the empty ``state`` dict of parameter ``p``."""
        raise NotImplementedError

    def _ensure_state(self, group, p):
        """Make the state of ``p`` ready for a step of ``group`` (after every check has passed)."""
        state = self.state[p]
        if not state:
            self._init_state(group, p, state)

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
                Int8Weights.check_traceable(type(self).__name__, p)
                if Int8Weights.is_weight(p):
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
                self._check_group_param(group, p)
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
                backend = self._resolve_backend(group, device, dtype, dense)
                params, grads = buckets[(device, dtype, backend)]
                params.extend(p for p, _ in pairs)
                grads.extend(g for _, g in pairs)
            buckets.update(int8)
            plan.append((self._step_view(group), buckets))
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
                            f"fastopt's elementwise optimizers ({_able('_supports_int8_weights')})")
        return Int8Weights.grad_of(name, p)

    def zero_grad(self, set_to_none=True):
        """torch's zero_grad, which also clears ``float_grad`` of the int8 weights of Int8Linear layers."""
        super().zero_grad(set_to_none)
        for group in self.param_groups:
            Int8Weights.clear_grads(group["params"], set_to_none)

    def _checked_plan(self, closure):
        """The start of a step: the closure's loss, the buckets (:meth:`_plan`) with every bucket's layout
        and states checked, and each device's ``(grad_scale, found_inf)`` -- all before anything is
        written."""
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
        return loss, plan, scalars

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss, plan, scalars = self._checked_plan(closure)
        for group, buckets in plan:
            for params, _grads in buckets.values():
                for p in params:
                    self._ensure_state(group, p)
        for group, buckets in plan:
            group = self._begin_group(group)
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
        state_dict = {**state_dict, "param_groups": load_schedules(state_dict["param_groups"])}
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
            quantized = LowbitStates.holds(saved_state)
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
            if LowbitStates.holds(state):
                if not self._supports_lowbit_states:
                    raise ValueError(f"{name}: {where} holds low-bit states ({state[LowbitStates.TAG_KEY]}); load it "
                                     "into an optimizer with the same state_bits (fastopt.lowbit.AdamW8bit, "
                                     "ElementwiseAdamW(state_bits=...), ...)")
                continue  # its layout: LowbitStates.check_loaded (ElementwiseOptimizer._check_loaded)
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


class ElementwiseOptimizer(NMSparseTraining, FusedOptimizer):
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

    The state layouts (master weights, stochastic rounding, low-bit states, the int8 weights of
    Int8Linear) are :mod:`fastopt.lowbit.layouts`; N:M sparse training (a group's ``sparsity``) is
    :class:`fastopt.sparse.training.NMSparseTraining`.  This class runs the op over them.
    """

    OP = None
    _listed = False
    _supports_int8_weights = True
    _supports_sparsity = True
    _supports_lowbit_states = True
    STATE_NAMES = ()
    HYPER_NAMES = ()
    REFERENCE = None

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                 defaults: Dict[str, Any]) -> None:
        check_rounding_options(type(self).__name__, defaults.get("stochastic_rounding"), defaults.get("master_weights"))
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """torch's add_param_group, then the low-bit options of the new group are checked (and
        ``state_bits`` normalized): every group may choose its own."""
        super().add_param_group(param_group)
        try:
            LowbitStates.check_options(type(self).__name__, self.param_groups[-1])
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
        return MasterWeights.uses(group, p)

    def _init_state(self, group, p, state):
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        like = init_weights(group, p, state)
        names = self._state_names(group)
        if LowbitStates.uses(group, p):
            LowbitStates.init(group, state, like, names)
            return
        for name in names:
            state[name] = torch.zeros_like(like, memory_format=torch.preserve_format)

    def _check_bucket(self, group, params, backend):
        LowbitStates.check_bucket(type(self).__name__, group, self._state_names(group), params, self.state, backend)

    def _elementwise_states(self, group, p, state):
        # quantized states: _check_bucket checks the format and sizes
        dtypes = {} if LowbitStates.holds(state) else dict.fromkeys(self._state_names(group), state_dtype(p, state))
        if MasterWeights.KEY in state:
            dtypes[MasterWeights.KEY] = torch.float32
        dtypes.update(self._sparse_state_dtypes(p, state))
        return dtypes

    def _check_loaded(self, state_dict, saved_ids):
        super()._check_loaded(state_dict, saved_ids)
        current = [(g, p) for g in self.param_groups for p in g["params"]]
        for pid, (group, p) in zip(saved_ids, current):
            state = state_dict["state"].get(pid)
            if state:
                LowbitStates.check_loaded(type(self).__name__, group, self._state_names(group), p, state,
                                          f"the state of parameter {pid}")

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        if Int8Weights.is_weight(params[0]):
            Int8Weights.step(self._step_float, group, params, grads, [self.state[p] for p in params], backend,
                             grad_scale, found_inf)
            return
        if group.get("sparsity") is not None:
            self._step_sparse(group, params, grads, backend, grad_scale, found_inf)
            return
        self._step_float(group, params, grads, [self.state[p] for p in params], backend, grad_scale, found_inf)

    def _step_is_one_call(self, group):
        """Whether a step of the op is one kernel call (ops with a reduce phase override ``_run``)."""
        return type(self)._run is ElementwiseOptimizer._run

    def _add_missing_states(self, group, params, states):
        for name in self._state_names(group):  # an option that adds a state was switched on later
            for p, s in zip(params, states):
                if name not in s and not LowbitStates.holds(s):
                    s[name] = torch.zeros_like(s.get(MasterWeights.KEY, p), memory_format=torch.preserve_format)

    def _step_float(self, group, params, grads, states, backend, grad_scale, found_inf):
        """One step of ``params`` through their layouts: on the master copies with master weights, the
        parameters with full-precision states in one call of the op (``_run``), those with quantized
        states through :class:`~fastopt.lowbit.layouts.LowbitStates`."""
        self._add_missing_states(group, params, states)
        targets = params
        if self._uses_master(group, params[0]):
            targets, grads = MasterWeights.redirect(grads, states)
        quant = [i for i, s in enumerate(states) if LowbitStates.holds(s)]
        if not quant:
            self._run(group, targets, grads, states, backend, grad_scale, found_inf)
        else:
            plain = [i for i, s in enumerate(states) if not LowbitStates.holds(s)]
            pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
            if plain:
                self._run(group, pick(targets, plain), pick(grads, plain), pick(states, plain), backend, grad_scale,
                          found_inf)
            LowbitStates.step(self, group, pick(targets, quant), pick(grads, quant), pick(states, quant), backend,
                              grad_scale, found_inf)
        if targets is not params:
            MasterWeights.write_back(params, targets)

    def _stochastic(self, group, p):
        return StochasticRounding.uses(group, p)

    def _check_group_param(self, group, p):
        if not _sharded.is_dtensor(p):
            return
        # what the step of a shard cannot do, whatever the backend (NOTE: [DTensors] in fastopt/_sharded.py)
        self._check_sparse_shards(group, [p])  # (raises where an N:M group would straddle a shard)
        if StochasticRounding.uses(group, p) and not _sharded.row_sharded(p):
            raise NotImplementedError(
                f"{type(self).__name__}: stochastic rounding of a DTensor {_sharded.describe_placement(p)}: the "
                "rounding is keyed on the element's index in the whole tensor, which needs shards that are row "
                "ranges (Shard(0) or Replicate placements, as fully_shard makes)")
        if LowbitStates.uses(group, p) and group.get("state_bits") == "4-rank1":
            raise NotImplementedError(
                f"{type(self).__name__}: rank-1 normalized low-bit states (state_bits='4-rank1') of a DTensor "
                f"{_sharded.describe_placement(p)}: their column maxima span every shard; use state_bits=4")

    def _reference_step(self, group, params, grads, states, grad_scale, found_inf):
        kwargs = {k: group[k] for k in self.HYPER_NAMES}
        sr = self._stochastic(group, params[0])
        targets = [p.float() for p in params] if sr else params
        # (compiled: the group's float lr, not its mirror -- the references compute with it in Python)
        lr = group["_lr_value"] if "_lr_value" in group else group["lr"]
        type(self).REFERENCE(targets, grads, states, lr=scalar_lr(lr), maximize=group["maximize"],
                             grad_scale=grad_scale, found_inf=found_inf, **kwargs)
        if sr and not (found_inf is not None and float(found_inf) != 0.0):
            offsets = None
            if _sharded.is_dtensor(params[0]):  # shard by shard, keyed on the index in the whole tensor
                offsets = _sharded.sr_offsets(params)
                params, targets = [p.to_local() for p in params], [t.to_local() for t in targets]
            StochasticRounding.write(params, targets, group["seed"], self._sr_indices(params),
                                     [float(s["step"]) for s in states], offsets)

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
