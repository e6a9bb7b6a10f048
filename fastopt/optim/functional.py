"""Functional optimizer steps: validate lists of tensors, pick a backend, run the kernel.

These are the middle layer between the kernels (``fastopt._ops``, ``fastopt.reference``) and the
``torch.optim.Optimizer`` classes; they are usable on their own with tensors you manage yourself.
"""
import math
from typing import Any, Dict, Iterable, Optional, Sequence, Union

import torch

from .. import _backend, _ops, _sharded
from .._ops import elementwise_unchecked, is_dense, lowbit_unchecked  # noqa: F401  (re-exported)
from ..reference import adam_reference

# What an optimizer takes as ``params``: tensors, or param-group dicts.
Params = Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]]


def overlaps_itself(t):
    """Whether two elements of ``t`` share memory (an ``expand()``ed or ``as_strided`` view)."""
    if t.is_contiguous() or t.numel() <= 1:
        return False
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    extent = 0  # the largest offset the dims seen so far reach
    for stride, size in dims:
        if stride <= extent:
            break
        extent += stride * (size - 1)
    else:
        return False
    # Interleaved strides (rare): count the distinct offsets.
    offsets = torch.zeros((), dtype=torch.int64)
    for stride, size in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).flatten()
    return offsets.unique().numel() != offsets.numel()


def check_disjoint(owner, params, last=None):
    """Raise ValueError when two of ``params`` share memory (overlapping views of one buffer): the
    kernels step the tensors of a call concurrently, so each must own its elements.  Adjacent views
    (a flat buffer cut into pieces) are fine.  ``last``: a list holding the spans of the previous call
    that passed; the same spans are not sorted and compared again.  A DTensor (FSDP2's sharded
    parameters) owns its local shard: that is what is compared (its own ``data_ptr()`` is 0)."""
    spans = [(t.data_ptr(), t.nbytes) for t in map(_sharded.local, params)]
    if last is not None and spans == last:
        return
    ordered = sorted(spans)
    for (start, size), (next_start, _) in zip(ordered, ordered[1:]):
        if next_start < start + size:
            raise ValueError(f"{owner}: two parameters share memory (views of one tensor that overlap); fastopt "
                             "steps parameters concurrently, so each must own its elements")
    if last is not None:
        last[:] = spans


def scalar_lr(lr):
    """``lr`` as a scalar: a one-element tensor of any shape (torch.optim accepts ``torch.tensor([[1e-2]])``)
    as a 0-d view (in-place changes to ``lr`` still show), anything else as it is."""
    return lr.reshape(()) if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


# NOTE: [lr under torch.compile]
# dynamo specializes a compiled function on every Python float it reads (a guard ``group['lr'] ==
# 0.01``), so a float lr that a scheduler changes every step would recompile the step every step.  A
# compiled fastopt step therefore never reads a float ``group['lr']``: each param group is a
# ParamGroup, a dict (torch.optim's format: state_dict, schedulers and ``group['lr'] = x`` work as
# before, and ``group['lr']`` stays the float you set) that mirrors a number-valued ``lr``, whenever it
# is set, into a float64 CPU scalar (every bit of the float).  The compiled step hands that scalar to
# the kernels, which read it on the host when the graph runs (``fastopt._ops._host_lr``: the eager
# step's numbers, no GPU sync); the torch backend's references read the float itself (they do
# Python arithmetic with it: a scheduler recompiles them).  The mirror also remembers whether the
# value passes the learning-rate check; a compiled step guards on that flag and raises the check's
# error.  A tensor lr is used as it is (in place changes show, as in eager mode).


class ParamGroup(dict):
    """A param group of a fastopt optimizer: the dict torch.optim keeps, which also mirrors a
    number-valued ``lr`` for compiled steps (see NOTE: [lr under torch.compile]).  Plain dicts become
    ParamGroups in ``add_param_group`` and ``load_state_dict``."""

    __slots__ = ("lr_host", "lr_is_number", "lr_error", "step_host")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_host = torch.zeros((), dtype=torch.float64)
        self.step_host = torch.zeros((), dtype=torch.int64)
        self._mirror_lr()
        self._mirror_step()

    def _mirror_step(self):
        """A group-level int ``step`` (Muon's, as pytorch_optimizer) is mirrored too: a compiled step
        counts in ``step_host`` (see :func:`advance_group_step`)."""
        try:
            host = self.step_host
        except AttributeError:
            return
        step = dict.get(self, "step")
        if isinstance(step, int) and not isinstance(step, bool):
            host.fill_(step)

    def _mirror_lr(self):
        try:
            host = self.lr_host
        except AttributeError:  # unpickling sets the items before the slots (which hold the mirror)
            return
        lr = dict.get(self, "lr")
        self.lr_is_number = isinstance(lr, (int, float)) and not isinstance(lr, bool)
        self.lr_error = None
        if self.lr_is_number:
            try:
                check_hyper("learning rate", lr)
            except ValueError as e:
                self.lr_error = str(e)
            host.fill_(float(lr))

    def _mirror(self, key=None):
        if key is None or key == "lr":
            self._mirror_lr()
        if key is None or key == "step":
            self._mirror_step()

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._mirror(key)

    def __delitem__(self, key):
        super().__delitem__(key)
        self._mirror(key)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._mirror()

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._mirror(key)
        return value

    def pop(self, *args):
        value = super().pop(*args)
        self._mirror()
        return value

    def __ior__(self, other):
        super().__ior__(other)
        self._mirror()
        return self


def advance_group_step(group):
    """``group['step'] += 1`` for an optimizer that counts steps per group (Muon, as pytorch_optimizer);
    returns the group as the step reads it.  Under torch.compile reading the int would specialize the
    graph on it (a recompile every step): a ParamGroup counts in its int64 CPU mirror instead, and the
    returned view carries that tensor as ``step`` (and the lr of :func:`step_lr`); ``group['step']``
    itself catches up at the next eager step or ``state_dict()`` (:func:`sync_group_steps`)."""
    if not isinstance(group, ParamGroup):
        group["step"] = group.get("step", 0) + 1
        return group
    if torch.compiler.is_compiling():
        group.step_host.add_(1)
        return {**group, "step": group.step_host, "lr": step_lr(group)}
    group["step"] = int(group.step_host) + 1  # (the mirror follows; it is ahead after compiled steps)
    return group


def sync_group_steps(groups):
    """Bring each ParamGroup's ``step`` up to its mirror (after compiled steps; eager, no GPU sync)."""
    for group in groups:
        if isinstance(group, ParamGroup) and ("step" in group or int(group.step_host) != 0):
            step = int(group.step_host)
            if group.get("step") != step:
                group["step"] = step


class SchedulerAwareStep:
    """torch's LR schedulers wrap ``optimizer.step`` in a function of their own, only to record that it
    was called (``optimizer._opt_called``); dynamo does not trace into that file, so a compiled
    ``opt.step()`` would fail with fullgraph=True.  A subclass's step records its calls itself
    (:meth:`_record_step_call`) and carries ``_wrapped_by_lr_sched`` (set with :func:`scheduler_aware`),
    which tells the schedulers not to wrap it.  The record is a dict item: dynamo does not replay an
    attribute set on an optimizer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._step_called = {"called": False}
        super().__init__(*args, **kwargs)

    @property
    def _opt_called(self):
        return self.__dict__.get("_step_called", {}).get("called", False)

    @_opt_called.setter
    def _opt_called(self, value):
        self.__dict__["_step_called"] = {"called": bool(value)}

    def _record_step_call(self):
        self._step_called["called"] = True


def scheduler_aware(step):
    """Mark ``step`` (the function) as recording its own calls (:class:`SchedulerAwareStep`)."""
    step._wrapped_by_lr_sched = True
    return step


def as_param_groups(groups):
    """Make every dict of the list ``groups`` (an optimizer's ``param_groups``) a ParamGroup, in place."""
    for i, group in enumerate(groups):
        if not isinstance(group, ParamGroup):
            groups[i] = ParamGroup(group)


def step_lr(group):
    """The ``lr`` a step of ``group`` passes on: :func:`scalar_lr` of ``group['lr']``, or, under
    torch.compile, the float64 mirror of a number-valued lr (NOTE: [lr under torch.compile]; raises the
    learning-rate check's error for an invalid one)."""
    if torch.compiler.is_compiling() and isinstance(group, ParamGroup) and group.lr_is_number:
        if group.lr_error is not None:
            raise ValueError(group.lr_error)
        return group.lr_host
    return scalar_lr(group.get("lr"))


def check_view(group):
    """``group`` as the hyperparameter checks read it.  Under torch.compile a ParamGroup's lr is not
    read (that would specialize the graph on it): a number-valued one was checked when it was set
    (:func:`step_lr` raises that check's error), a tensor one must have one element (its value is not
    read: that would be a host sync)."""
    if torch.compiler.is_compiling() and isinstance(group, ParamGroup):
        if not group.lr_is_number:
            lr = group["lr"]
            if isinstance(lr, torch.Tensor):
                check_hyper("learning rate", lr)  # (its shape only, when compiling)
        return {**group, "lr": 0.0}
    return group


# torch.optim's names of the hyperparameters that may be tensors, for its "Tensor lr must be 1-element"
_TENSOR_NAMES = {"learning rate": "lr", "beta parameter at index 0": "betas[0]", "beta parameter at index 1": "betas[1]"}


def _one_element_message(name):
    """torch.optim's message for a multi-element tensor hyperparameter ("Tensor lr must be 1-element"),
    with what follows the known name (e.g. Muon's "(use_muon=False group)") after it."""
    for key, short in _TENSOR_NAMES.items():
        if name.startswith(key):
            rest = name[len(key):].strip()
            return f"Tensor {short} must be 1-element" + (f" {rest}" if rest else "")
    return f"Tensor {name} must be 1-element"


def check_hyper(name, value, low=0.0, high=math.inf, high_open=False):
    """torch.optim-style validation of one hyperparameter (raises ValueError, with torch's messages).
    Under torch.compile the value of a tensor is not checked (that would be a host sync; its shape is)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(_one_element_message(name))
        if torch.compiler.is_compiling():
            return
        value = float(value)
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")


def check_adam_hyper(lr, betas, eps, weight_decay):
    check_hyper("learning rate", lr)
    check_hyper("epsilon value", eps)
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected two values, got {betas!r}")
    check_hyper("beta parameter at index 0", betas[0], high=1.0, high_open=True)
    check_hyper("beta parameter at index 1", betas[1], high=1.0, high_open=True)
    check_hyper("weight_decay value", weight_decay)
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):  # torch.optim.Adam's rule
        raise ValueError("betas must be either both floats or both Tensors")


def check_lists(names, lists, state_steps=None):
    """Validate parallel tensor lists for one kernel call; returns (device, dtype, dense) of the call.

    Every list must have the same length; tensor i of every list must have the shape, dtype, device
    and strides of ``lists[0][i]``; the whole call must be on one device and of one dtype; tensors
    must be strided (not sparse) and real.  ``dense`` tells whether the kernels can walk every tensor
    as one flat buffer (else only the torch backend can run the call).
    """
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, {names[0]} has {n}")
    if n == 0:
        return None, None, True
    first = lists[0][0]
    device, dtype = first.device, first.dtype
    if first.is_complex():
        raise TypeError(f"fastopt does not support complex tensors ({names[0]}[0] is {dtype})")
    dense = True
    for i in range(n):
        ref = lists[0][i]
        want = (torch.strided, device, dtype, ref.shape)
        for name, lst in zip(names, lists):
            t = lst[i]
            if (t.layout, t.device, t.dtype, t.shape) != want:
                _explain_mismatch(name, i, t, names[0], ref, device, dtype)
            if t.numel() > 1 and t.stride() != ref.stride():  # (no `t is ref`: dynamo would guard on ids)
                dense = False
        dense = dense and is_dense(ref)
    if state_steps is not None:
        if len(state_steps) != n:
            raise ValueError(f"state_steps has {len(state_steps)} tensors, {names[0]} has {n}")
        for i, s in enumerate(state_steps):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
                raise ValueError(f"state_steps[{i}] must be a one-element float32 tensor on {device} "
                                 f"(got {s.dtype} with {s.numel()} elements on {s.device})")
    return device, dtype, dense


def _explain_mismatch(name, i, t, ref_name, ref, device, dtype):
    if t.layout != torch.strided:
        raise RuntimeError(f"fastopt does not support sparse tensors ({name}[{i}] is {t.layout})")
    if t.is_complex():
        raise TypeError(f"fastopt does not support complex tensors ({name}[{i}] is {t.dtype})")
    if t.device != device:
        raise ValueError(f"all tensors of one call must be on one device: {name}[{i}] is on {t.device}, "
                         f"{ref_name}[0] on {device}")
    if t.dtype != dtype:
        raise ValueError(f"all tensors of one call must have one dtype: {name}[{i}] is {t.dtype}, "
                         f"{ref_name}[0] is {dtype}")
    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, {ref_name}[{i}] has {tuple(ref.shape)}")


def scalar_on(t, device, name):
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor")
    return t.to(device=device, dtype=torch.float32)


def adam(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
         exp_avg_sqs: Sequence[torch.Tensor], max_exp_avg_sqs: Sequence[torch.Tensor],
         state_steps: Sequence[torch.Tensor], *, lr: Union[float, torch.Tensor], beta1: float, beta2: float,
         eps: float, weight_decay: float, decoupled: bool = True, amsgrad: bool = False, maximize: bool = False,
         grad_scale: Optional[torch.Tensor] = None, found_inf: Optional[torch.Tensor] = None,
         backend: str = "auto") -> None:
    """One fused Adam (``decoupled=False``) or AdamW (``decoupled=True``) step, in place.

    Equations: see :func:`fastopt.reference.adam_reference`.  All tensors of one call share one device
    and one dtype (fp32, fp16 or bf16 for the kernel backends); ``state_steps`` are one-element fp32
    tensors on that device, incremented by the call unless ``found_inf`` (AMP) is nonzero.  ``lr`` is
    a float or a one-element tensor (read on the device: no host sync, CUDA-graph safe).
    Everything is validated before anything is written.
    """
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    check_adam_hyper(lr, (beta1, beta2), eps, weight_decay)
    device, dtype, dense = check_lists(names, lists, state_steps)
    if device is None:
        return
    chosen = _backend.resolve(backend, device, dtype, dense)
    grad_scale = scalar_on(grad_scale, device, "grad_scale")
    found_inf = scalar_on(found_inf, device, "found_inf")
    adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                   beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                   maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, backend=chosen, device=device)


def adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                   weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend, device):
    """:func:`adam` for lists already validated (the optimizer classes validate once per step):
    ``backend`` is resolved, ``grad_scale``/``found_inf`` are None or fp32 scalars on ``device``."""
    if backend == "torch":
        adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                       maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
        return
    _ops.run_adam(_ops.AdamCall(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr, beta1, beta2,
                                eps, weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend,
                                device))
