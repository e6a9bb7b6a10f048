"""The optimizer step fused into the backward pass: each parameter is stepped, and its gradient freed,
as soon as autograd has accumulated that gradient (``Tensor.register_post_accumulate_grad_hook``).

    model = ...                                             # (fully_shard() it first under FSDP2)
    opt = fastopt.optimizer_in_backward(fastopt.AdamW, model, lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)         # drives opt.param_groups, as usual
    for x in data:
        model(x).sum().backward()                           # every parameter is stepped in here
        opt.step(); opt.zero_grad(); sched.step()            # step and zero_grad: no-ops, kept for loops

At most one parameter's gradient is alive at a time (plus those autograd is still accumulating), instead
of all of them between ``backward()`` and ``step()``: the memory saving of torch's tutorial "How to save
memory by fusing the optimizer step into the backward pass" and of
``torch.distributed.optim._apply_optimizer_in_backward``, whose semantics this follows (one optimizer per
parameter, stepped from a hook; the gradient is set to None afterwards).

What is stepped, and why it equals a normal step
------------------------------------------------
:class:`OptimizerInBackward` builds the optimizer once over all parameters, as a normal run would (the
*template*: its constructor checks the arguments, and it holds the ``param_groups`` and the ``state``
that schedulers, ``state_dict`` and ``load_state_dict`` see), and one optimizer per parameter, built
from that parameter's group.  Before each per-parameter step its group takes the template group's
current values (so an LR scheduler, or ``group["lr"] = x``, acts as on a normal optimizer); its state
dict is the template's state dict of that parameter (the same object).  fastopt's optimizers compute
each parameter's update from that parameter alone -- the elementwise ones, and those whose reduce
pass (the ``reduce`` count of the op in ``fastopt/_opspec.py``) sums within one tensor or one row:
LAMB's trust ratio, AdamP/SGDP's projection, SGD-SaI's g-SNR, Lion's/Adan's ``use_gc`` and
``cautious``, OrthoGrad's projection, Muon's Newton-Schulz on one matrix -- so stepping one parameter
at a time gives the bits of one step over all of them (``tests/test_in_backward.py`` checks each).
One difference: Muon counts steps per group (``group["step"]``, as pytorch_optimizer; its AdamW groups
debias with it); here each parameter's group counts its own steps, the same count as long as every
parameter of a group gets a gradient in every backward (the template's group shows the last one).

Refused at construction, before any hook is registered (NotImplementedError), because they need every
gradient before the first parameter may move:

* a reduction across tensors: ``Lamb(pre_norm=True)`` (the global gradient norm); global-norm clipping
  (``clip_grad_norm_``) cannot be called either: there is no moment when every gradient exists (Adan's
  ``max_grad_norm`` is refused by Adan itself);
* ``stochastic_rounding=True`` on bf16 parameters: the rounding stream is keyed on the parameter's
  position in the kernel call, so one-parameter calls would round other bits;
* the int8 weights of :class:`fastopt.lowbit.Int8Linear`: their gradient (``float_grad``) is not
  accumulated by autograd, so no hook fires for them.

AMP: ``torch.amp.GradScaler`` unscales and checks every gradient for infs before the step, which
cannot happen here (the steps would use scaled gradients and could not be skipped): ``scaler.step(opt)``
raises RuntimeError.  Use bf16 autocast (no scaler) or fp32.  Gradient accumulation over several
backward passes is impossible too (each backward steps).

Distributed training
--------------------
* FSDP2 (``fully_shard``): supported.  FSDP2 calls the post-accumulate-grad hooks of its sharded
  parameters after the reduce-scatter, with the reduced gradient shard (with ``CPUOffloadPolicy`` on the
  CPU); the step is the one a normal step gives those shards.  Apply the helper *after* ``fully_shard``
  (which replaces the module's parameters; hooks on the old ones would never fire).
* DDP: apply the helper *before* wrapping the module in ``DistributedDataParallel``.  A
  post-accumulate-grad hook fires before DDP's all-reduce has averaged the gradient, so the helper
  registers its per-parameter optimizers the way torch's ``_apply_optimizer_in_backward`` does
  (``param._in_backward_optimizers``, and its hook handles in ``param_to_optim_hook_handle_map``):
  before its first forward DDP removes those hooks and steps the optimizers from its communication hook,
  after the all-reduce (checked on 2 CPU ranks: the parameters after the first backward equal the
  normal DDP step's bit for bit).  Caveat, torch 2.13: that DDP hook ends every backward with
  ``torch.accelerator.current_stream()``, which raises RuntimeError ("Cannot access accelerator device")
  on a machine without an accelerator, after the parameters were stepped -- so on CPU-only machines
  DDP with the optimizer in backward stops at the first backward; on GPUs this is torch's own path (not
  run here).  A ``DistributedDataParallel`` module passed here is refused (ValueError): its hooks would
  step un-averaged gradients.
"""
import functools
from typing import Any, Callable, Dict, Iterable, List, Optional, Type, Union

import torch
from torch.optim import Optimizer

from ..lowbit.layouts import Int8Weights, StochasticRounding
from .adam import Adam
from .base import ElementwiseOptimizer
from .functional import SchedulerAwareStep, scheduler_aware
from .lamb import Lamb
from .muon import Muon
from .orthograd import OrthoGrad

__all__ = ["OptimizerInBackward", "optimizer_in_backward"]

# The optimizer classes whose per-parameter step equals their step over many parameters (and their
# subclasses): the elementwise ops and the per-tensor reduce passes (see the module docstring).
_PER_PARAMETER = (Adam, ElementwiseOptimizer, Muon)
_MISSING = object()
# Group keys that the per-parameter optimizer writes itself (Muon's group step count): not refreshed
# from the template, copied back to it after each step.
_OWN_KEYS = ("params", "step")


def _ddp_handle_map():
    """torch's table of in-backward hook handles that DDP removes (None if this torch has none)."""
    try:
        from torch.distributed.optim import apply_optimizer_in_backward as aib
    except ImportError:
        return None
    return getattr(aib, "param_to_optim_hook_handle_map", None)


def _refusal(inner: Optimizer, group: Dict[str, Any], p: torch.Tensor) -> Optional[str]:
    """Why ``p`` of ``group`` cannot be stepped on its own in backward (None: it can)."""
    if isinstance(inner, Lamb) and group.get("pre_norm") and float(group.get("max_grad_norm", 0.0)) != 0.0:
        return ("Lamb(pre_norm=True) scales every gradient by the global gradient norm, which needs every "
                "gradient before the first step; use pre_norm=False (the per-tensor trust ratio is fine)")
    if StochasticRounding.uses(group, p):
        return ("stochastic_rounding=True on bf16 parameters keys the rounding on the parameter's position in "
                "the kernel call, so stepping one parameter at a time rounds other bits; use master_weights=True "
                "or fp32 parameters")
    if Int8Weights.is_weight(p):
        return ("the int8 weights of fastopt.lowbit.Int8Linear get their gradient in `float_grad`, outside "
                "autograd, so no post-accumulate-grad hook fires for them")
    return None


class OptimizerInBackward(SchedulerAwareStep, Optimizer):
    """Step every parameter in ``params`` from a post-accumulate-grad hook during ``backward()`` and free
    its gradient (see :mod:`fastopt.optim.in_backward`).

    Args:
        optimizer: a fastopt optimizer class (built as ``optimizer(param_groups, **kwargs)``), or a
            factory: any callable that takes a list of param groups and returns a fastopt optimizer
            (e.g. ``lambda groups: fastopt.OrthoGrad(fastopt.AdamW(groups, lr=1e-3))``; no ``kwargs`` then).
        params: an ``nn.Module`` (its parameters that require grad), or parameters / param groups as any
            optimizer takes them.
        **kwargs: the optimizer's constructor arguments.

    Update, for each parameter ``p`` as soon as autograd has accumulated its gradient ``g``::

        p, state[p] <- the optimizer's step of p alone, with g      (the bits of a step over all parameters)
        p.grad      <- None

    The object is a ``torch.optim.Optimizer``: ``param_groups``, ``state`` and ``defaults`` are the
    template optimizer's (an LR scheduler drives ``param_groups``; the next backward uses the new
    values), ``state_dict()`` has the format of the normal optimizer's (a checkpoint loads into either),
    ``load_state_dict`` restores it, ``add_param_group`` hooks the new parameters.  ``step(closure)``
    only calls the closure (the parameters were stepped in backward); ``zero_grad`` clears what is left
    (nothing, normally).  ``optimizers`` maps each parameter to its own optimizer; ``remove()`` takes
    the hooks off.

    Raises, before any hook is registered: TypeError for an optimizer that is not one of fastopt's
    per-parameter optimizers, NotImplementedError for options that need every gradient first (see the
    module docstring), ValueError for parameters that cannot carry a hook (non-leaf, no grad) and for a
    ``DistributedDataParallel`` module.
    """

    # GradScaler passes itself as ``grad_scaler`` to such an optimizer's step: refused there (see step)
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: Union[Type[Optimizer], Callable[[List[Dict[str, Any]]], Optimizer]],
                 params: Union[torch.nn.Module, Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                 **kwargs: Any) -> None:
        if isinstance(optimizer, type):
            if not issubclass(optimizer, Optimizer):
                raise TypeError(f"optimizer_in_backward: {optimizer.__name__} is not a torch.optim.Optimizer class")
            make = functools.partial(optimizer, **kwargs)
        elif callable(optimizer):
            if kwargs:
                raise TypeError(f"optimizer_in_backward: unexpected arguments {sorted(kwargs)} with a factory "
                                "(pass them to the optimizer inside it)")
            make = optimizer
        else:
            raise TypeError("optimizer_in_backward takes an optimizer class or a factory (param groups -> optimizer), "
                            f"not {type(optimizer).__name__}")
        if isinstance(params, torch.nn.Module):
            if isinstance(params, torch.nn.parallel.DistributedDataParallel):
                raise ValueError("optimizer_in_backward: the module is already wrapped in DistributedDataParallel, "
                                 "whose hooks would step gradients before DDP averages them; apply "
                                 "optimizer_in_backward to the module first, then wrap it in DDP")
            # (the int8 weights of Int8Linear do not require grad: kept, so that they are refused, not skipped)
            params = [p for p in params.parameters() if p.requires_grad or Int8Weights.is_weight(p)]
        elif isinstance(params, torch.Tensor):
            raise TypeError("optimizer_in_backward: params must be a module or an iterable of Tensors or param "
                            f"groups, got {torch.typename(params)}")
        # Optimizer.__init__ is not called (param_groups and state are the template's); these are the
        # attributes torch's step wrapper, hooks and schedulers read.
        self._step_called = {"called": False}
        self._optimizer_step_pre_hooks = {}
        self._optimizer_step_post_hooks = {}
        self._patch_step_function()
        self._make = make
        self._handles: Dict[torch.Tensor, Any] = {}
        self._per_param: List[List[tuple]] = []  # per template group: [(param, optimizer)]
        self._removed = False
        self.steps_in_backward = 0  # per-parameter steps taken (all groups), a counter for users and tests
        self._template = make(list(params))
        self._inner(self._template)
        # every group checked and its optimizers built before the first hook
        built = [self._build_group(index) for index in range(len(self._template.param_groups))]
        for index, pairs in enumerate(built):
            self._hook_group(index, pairs)

    # -- construction ------------------------------------------------------------------------------
    @staticmethod
    def _inner(opt):
        """The fastopt optimizer inside ``opt`` (OrthoGrad wraps one); TypeError for anything else."""
        inner = opt.optimizer if isinstance(opt, OrthoGrad) else opt
        if not isinstance(inner, _PER_PARAMETER):
            raise TypeError(f"optimizer_in_backward steps fastopt's per-parameter optimizers (Adam, AdamW, Lion, "
                            f"Adan, AdaBelief, DiffGrad, EXAdam, Lamb, AdamP, SGDP, SGDSaI, Muon, the low-bit "
                            f"presets, OrthoGrad around one of them), not {type(inner).__module__}."
                            f"{type(inner).__qualname__}")
        return inner

    def _build_group(self, index):
        """Check the template's group ``index`` and build one optimizer per parameter: [(param, optimizer)]."""
        group = self._template.param_groups[index]
        inner = self._inner(self._template)
        for p in group["params"]:
            reason = _refusal(inner, group, p)
            if reason is not None:
                raise NotImplementedError(f"{type(inner).__name__} in backward: {reason}")
            if not (isinstance(p, torch.Tensor) and p.is_leaf and p.requires_grad):
                raise ValueError("optimizer_in_backward: every parameter must be a leaf tensor that requires grad "
                                 f"(a post-accumulate-grad hook needs one); got a {torch.typename(p)} of shape "
                                 f"{tuple(p.shape)} with requires_grad={p.requires_grad}, is_leaf={p.is_leaf}")
            if p in self._handles or getattr(p, "_in_backward_optimizers", None):
                raise ValueError(f"optimizer_in_backward: a parameter of shape {tuple(p.shape)} is stepped in backward "
                                 "already (by another optimizer_in_backward or torch's _apply_optimizer_in_backward); "
                                 "the first hook would free its gradient before the second could step it")
        settings = {k: v for k, v in group.items() if k != "params"}
        pairs = [(p, self._make([{**settings, "params": [p]}])) for p in group["params"]]
        for _, opt in pairs:
            self._inner(opt)
        return pairs

    def _hook_group(self, index, pairs):
        """Hook the parameters of group ``index`` to step their optimizers ``pairs``."""
        handles = _ddp_handle_map()
        for p, opt in pairs:
            opt.register_step_pre_hook(functools.partial(OptimizerInBackward._before_step, self, index))
            opt.register_step_post_hook(functools.partial(OptimizerInBackward._after_step, self, index, p))
            handle = p.register_post_accumulate_grad_hook(functools.partial(OptimizerInBackward._step_param, opt))
            self._handles[p] = handle
            # DDP steps these after its all-reduce, and removes the hooks it finds here (module docstring)
            if not hasattr(p, "_in_backward_optimizers"):
                p._in_backward_optimizers = []
            p._in_backward_optimizers.append(opt)
            if handles is not None:
                handles.setdefault(p, []).append(handle)
        self._per_param.append(pairs)

    # -- the hooks ---------------------------------------------------------------------------------
    @staticmethod
    def _step_param(opt, p):
        opt.step()
        p.grad = None

    def _before_step(self, index, opt, args, kwargs):
        """The parameter's group takes the template group's current values (schedulers set those)."""
        source, mine = self._template.param_groups[index], opt.param_groups[0]
        for key, value in source.items():
            if key not in _OWN_KEYS and mine.get(key, _MISSING) is not value:
                mine[key] = value

    def _after_step(self, index, p, opt, args, kwargs):
        """The template shows the parameter's state (the same dict) and its group's step count."""
        state = opt.state.get(p)
        if state is not None and self._template.state.get(p) is not state:
            self._template.state[p] = state
        mine, target = opt.param_groups[0], self._template.param_groups[index]
        if "step" in mine and target.get("step", _MISSING) != mine["step"]:
            target["step"] = mine["step"]
        self.steps_in_backward += 1
        self._record_step_call()

    # -- the Optimizer interface -------------------------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The template's param groups: what schedulers and users set; read at each parameter's step."""
        return self._template.param_groups

    @property
    def state(self) -> Dict[Any, Any]:
        """Per-parameter state: each parameter's optimizer's state dict (the same objects)."""
        return self._template.state

    @property
    def defaults(self) -> Dict[str, Any]:
        return self._template.defaults

    @property
    def optimizers(self) -> Dict[torch.Tensor, Optimizer]:
        """Each hooked parameter's own optimizer (torch's ``_get_in_backward_optimizers`` lists them too)."""
        return {p: opt for pairs in self._per_param for p, opt in pairs}

    def __repr__(self) -> str:
        return f"OptimizerInBackward({self._template!r})"

    def __getstate__(self):
        raise TypeError("OptimizerInBackward holds hooks on its parameters and cannot be pickled; save its "
                        "state_dict() (the normal optimizer's format) instead")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None, grad_scaler: Any = None) -> Any:
        """The parameters were stepped during backward: only calls ``closure`` (which runs a backward,
        stepping them) and returns its loss.  Raises RuntimeError under ``torch.amp.GradScaler``."""
        if grad_scaler is not None or getattr(self, "grad_scale", None) is not None:
            raise RuntimeError("optimizer_in_backward cannot run under torch.amp.GradScaler: the parameters were "
                               "stepped during backward with scaled gradients, before the scaler could unscale and "
                               "check every gradient for infs; use bf16 autocast without a scaler, or fp32")
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._record_step_call()
        return loss

    step = scheduler_aware(step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Nothing to do after a backward (each gradient was freed after its step); clears any left."""
        self._template.zero_grad(set_to_none)

    def state_dict(self) -> Dict[str, Any]:
        """The template's state dict: the format of the same optimizer stepped normally."""
        return self._template.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the template (its checks and conversions), then hand each parameter's optimizer
        its new state and group values."""
        self._template.load_state_dict(state_dict)
        for index, pairs in enumerate(self._per_param):
            source = self._template.param_groups[index]
            for p, opt in pairs:
                state = self._template.state.get(p)
                if state:
                    opt.state[p] = state
                else:
                    opt.state.pop(p, None)
                mine = opt.param_groups[0]
                for key, value in source.items():
                    if key != "params":
                        mine[key] = value
                if "step" in mine and "step" not in source:
                    del mine["step"]

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group to the template (its checks), then hook its parameters; on any error the group
        is removed again and nothing is hooked."""
        if self._removed:
            raise RuntimeError("optimizer_in_backward: add_param_group after remove()")
        self._template.add_param_group(param_group)
        index = len(self._template.param_groups) - 1
        try:
            pairs = self._build_group(index)
        except BaseException:
            self._template.param_groups.pop()
            raise
        self._hook_group(index, pairs)

    def remove(self) -> None:
        """Take every hook off (the parameters are no longer stepped in backward)."""
        handles = _ddp_handle_map()
        for pairs in self._per_param:
            for p, opt in pairs:
                handle = self._handles.pop(p, None)
                if handle is not None:
                    handle.remove()
                    if handles is not None and handle in handles.get(p, []):
                        handles[p].remove(handle)
                mine = getattr(p, "_in_backward_optimizers", None)
                if mine is not None:
                    mine[:] = [o for o in mine if o is not opt]
                    if not mine:
                        del p._in_backward_optimizers
        self._per_param = []
        self._removed = True


def optimizer_in_backward(optimizer: Union[Type[Optimizer], Callable[[List[Dict[str, Any]]], Optimizer]],
                          params: Union[torch.nn.Module, Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                          **kwargs: Any) -> OptimizerInBackward:
    """Step each parameter during ``backward()``, as soon as its gradient is accumulated, and free that
    gradient: :class:`OptimizerInBackward` (see :mod:`fastopt.optim.in_backward`)."""
    return OptimizerInBackward(optimizer, params, **kwargs)
