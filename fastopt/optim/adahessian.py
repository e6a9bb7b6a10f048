"""AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine Learning", AAAI
2021): Adam's update with the squared gradient replaced by the square of a Hutchinson estimate of the
Hessian diagonal, fused.

A step (the estimate when due, then the update):

1. probes: for each sample ``s < num_samples``, a Rademacher vector ``z`` per parameter, drawn by a
   kernel from fastopt's counter-based hash (``fmix32``) keyed on (seed, step, tensor, sample, the
   element's index in the whole tensor): no random state, the same bits on every backend and world
   size (:mod:`fastopt.reference.adahessian` has the formula).  A probe exists only for the double
   backward it feeds: nothing is kept in the optimizer state.
2. ``Hz = torch.autograd.grad(grads, params, grad_outputs=z)``: the gradients must carry their graph
   (``loss.backward(create_graph=True)``, or a closure that does it).
3. a kernel turns ``Hz`` into the estimate ``D``, regenerating ``z`` rather than reading it back:
   ``D = mean_s z Hz`` (mode "pytorch_optimizer") or ``D = mean_s |Hz|`` then, for 4-D (conv) tensors,
   the mean over the kernel's spatial dims (mode "official", ``average_conv_kernel``).
4. one fused kernel call per (device, dtype) bucket (the elementwise op ``adahessian``; D rides in the
   state slot ``hessian``, as pytorch_optimizer keeps it; ``adahessian_plain`` at the steps between two
   estimates; their ``_pow`` variants for a ``hessian_power`` other than 1): weight decay, the first
   moment, the Hessian moment, bias corrections, ``hessian_power``, the step.

Backends: "cpu" (``csrc/cpu/probe.cpp`` and the C++ op), "triton" (``triton_kernels/adahessian.py``),
"cuda" (the CUDA op; the probes by the Triton kernels when Triton is installed, else by torch ops: the
same bits), "torch" (the reference, torch integer ops for the probes).
"""
from typing import Any, List, Optional, Tuple, Union

import torch

from .. import _backend, _sharded
from .._opspec import OPS, native_args
from ..reference.adahessian import (MODES, adahessian_reference, consume_probe, probe_key, probe_signs,
                                    spatial_average)
from . import functional as F
from .base import ElementwiseOptimizer
from .functional import Params, elementwise_unchecked
from ._pytorch_optimizer import check_betas

__all__ = ["AdaHessian", "rademacher_probe_", "hutchinson_consume_"]

_M32 = 0xFFFFFFFF


def _check_probe_tensor(who, t, dtypes):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{who}: expected a tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{who}: dtype {t.dtype} is not one of {tuple(str(d) for d in dtypes)}")
    if t.layout != torch.strided or not t.is_contiguous():
        raise ValueError(f"{who}: the tensor must be dense and contiguous (shape {tuple(t.shape)}, strides "
                         f"{t.stride() if t.layout == torch.strided else t.layout})")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _probe_backend(backend, device):
    """The backend that draws probes for a tensor the update steps with ``backend``."""
    if backend in ("torch", "cpu", "triton"):
        return backend
    if backend == "cuda":  # no native CUDA probe kernel: Triton's, else torch ops (the same bits)
        return "triton" if _backend.has_triton() else "torch"
    return _backend.resolve(backend, device, torch.float32, True)


def rademacher_probe_(out: torch.Tensor, *, seed: int, index: int, step: int, sample: int, offset: int = 0,
                      backend: str = "auto") -> torch.Tensor:
    """Fill ``out`` (contiguous fp32/fp16/bf16) with the Rademacher probe (+1/-1) of stream (seed, index,
    step, sample); element ``i`` gets the bits of element ``offset + i`` of the whole tensor.  The same
    values on every backend ("cpu": ``csrc/cpu/probe.cpp``, "triton", "torch": torch integer ops);
    :func:`fastopt.reference.adahessian.rademacher_probe` is the spec.  Returns ``out``."""
    _check_probe_tensor("rademacher_probe_", out, _FLOATS)
    offset = _check_index("offset", offset)
    for name, v in (("seed", seed), ("index", index), ("step", step), ("sample", sample)):
        _check_index(name, v)
    key = probe_key(seed, index, step, sample)
    _fill([out], [key], [offset], _probe_backend(backend, out.device))
    return out


def hutchinson_consume_(hz: torch.Tensor, acc: torch.Tensor, *, seed: int, index: int, step: int, sample: int,
                        scale: float, use_z: bool, accumulate: bool, offset: int = 0,
                        backend: str = "auto") -> torch.Tensor:
    """One probe's share of the Hutchinson estimate, in place: ``acc = [acc +] scale * (z Hz)`` (use_z) or
    ``[acc +] scale * |Hz|``, z regenerated from (seed, index, step, sample, offset + i).  ``acc`` fp32,
    ``hz`` fp32/fp16/bf16, both contiguous with one shape and device (``acc`` may be ``hz``).  Returns
    ``acc``."""
    _check_probe_tensor("hutchinson_consume_ hz", hz, _FLOATS)
    _check_probe_tensor("hutchinson_consume_ acc", acc, (torch.float32,))
    if hz.shape != acc.shape or hz.device != acc.device:
        raise ValueError(f"hutchinson_consume_: hz {tuple(hz.shape)} on {hz.device} and acc {tuple(acc.shape)} on "
                         f"{acc.device} must have one shape and device")
    if acc.data_ptr() != hz.data_ptr() and _overlap(hz, acc):
        raise ValueError("hutchinson_consume_: acc partly overlaps hz (it may be hz itself, or disjoint)")
    offset = _check_index("offset", offset)
    key = probe_key(seed, _check_index("index", index), _check_index("step", step), _check_index("sample", sample))
    _consume([hz], [acc], [key], [offset], float(scale), bool(use_z), bool(accumulate),
             _probe_backend(backend, hz.device))
    return acc


def _overlap(a, b):
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def _check_index(name, v):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} must be a non-negative int, got {v!r}")
    return v


def _fill(outs, keys, offsets, backend):
    """Write the probes of ``keys`` into the contiguous tensors ``outs`` (one device) with ``backend``."""
    if backend == "cpu":
        if outs and outs[0].device.type != "cpu":
            raise ValueError(f"the cpu backend draws probes for CPU tensors, not {outs[0].device}")
        _backend.native().probe_fill_cpu([t.data_ptr() for t in outs], [t.numel() for t in outs], list(keys),
                                         [o & _M32 for o in offsets], _backend.dtype_code(outs[0].dtype))
    elif backend == "triton":
        ta = _triton_probes()
        for t, k, o in zip(outs, keys, offsets):
            ta.probe_fill(t, k, o)
    else:
        for t, k, o in zip(outs, keys, offsets):
            t.copy_((1 - 2 * probe_signs(t.numel(), t.device, k, o)).to(t.dtype).view(t.shape))


def _triton_probes():
    """The module of the Triton probe kernels (a clear error when Triton is missing)."""
    _backend.triton_kernels()
    from ..triton_kernels import adahessian
    return adahessian


def _consume(hzs, accs, keys, offsets, scale, use_z, accumulate, backend):
    if not hzs:
        return
    if backend == "cpu":
        if hzs[0].device.type != "cpu":
            raise ValueError(f"the cpu backend consumes probes of CPU tensors, not {hzs[0].device}")
        by_dtype = {}
        for i, h in enumerate(hzs):
            by_dtype.setdefault(h.dtype, []).append(i)
        for dtype, idx in by_dtype.items():
            _backend.native().probe_consume_cpu(
                [hzs[i].data_ptr() for i in idx], [accs[i].data_ptr() for i in idx], [hzs[i].numel() for i in idx],
                [keys[i] for i in idx], [offsets[i] & _M32 for i in idx], _backend.dtype_code(dtype), scale, use_z,
                accumulate)
    elif backend == "triton":
        ta = _triton_probes()
        for h, a, k, o in zip(hzs, accs, keys, offsets):
            ta.probe_consume(h, a, k, o, scale, use_z, accumulate)
    else:
        for h, a, k, o in zip(hzs, accs, keys, offsets):
            a.copy_(consume_probe(h, a if accumulate else None, k, scale, use_z, o))


def _reference(params, grads, states, *, _hessians, **kwargs):
    adahessian_reference(params, grads, states, hessians=_hessians, **kwargs)


class AdaHessian(ElementwiseOptimizer):
    r"""AdaHessian: Adam with the Hessian diagonal's Hutchinson estimate in the denominator.

    Per step (``t``: the step count after it; ``D``: the estimate, see below)::

        p <- p (1 - wd (fixed_decay ? 1 : lr))   [weight_decouple]   or   g <- g + wd p
        m <- m + (1 - b1)(g - m)                                         exp_avg
        v <- b2 v + (1 - b2) D D        [steps t = 1, 1 + k, 1 + 2k, ... with k = update_period]
        p <- p - lr / (1 - b1^t) * m / ((v / (1 - b2^t))^(hessian_power / 2) + eps)

    ``D``: ``mean_s z_s Hz_s`` ("pytorch_optimizer" mode) or ``mean_s |Hz_s|`` averaged over the
    spatial dims of 4-D conv kernels ("official" mode), over ``num_samples`` Rademacher probes ``z``
    drawn in a kernel from the counter-based hash (module doc), ``Hz`` by double backward.  Call
    ``loss.backward(create_graph=True)`` before ``step()`` (or pass a closure that does), or pass
    estimates of your own as ``step(hessian=[...])`` (one per parameter of every group, as
    pytorch_optimizer).

    Modes (defaults of ``lr``, ``eps`` and ``average_conv_kernel`` follow the mode):

    - ``"pytorch_optimizer"`` (default): pytorch_optimizer 4.1.0's ``AdaHessian`` (``lr=0.1``,
      ``eps=1e-16``, ``z * Hz``, no averaging), its arguments and state names (``exp_avg``,
      ``exp_hessian_diag_sq``, ``hessian``: the last estimate).  Matches it step for step given the
      same probes (tests/test_adahessian.py, fp32 rtol 1e-5).
    - ``"official"``: amirgholami/adahessian's ``image_classification/optim_adahessian.py``
      (``lr=0.15``, ``eps=1e-4``, ``|Hz|`` with the mean over dims (2, 3) of 4-D tensors; its weight
      decay ``p - lr (update + wd p)`` is ``weight_decouple=True, fixed_decay=False``).  Its denominator
      ``sqrt(v)^k / sqrt(bc2)^k + eps`` is evaluated as ``(v / bc2)^(k/2) + eps`` (the same function,
      rounded differently).  ``single_gpu`` is accepted and ignored: the probes are identical on every
      rank by construction (the official code all-reduces them).

    Args:
        params: parameters or param groups.
        lr: learning rate (None: the mode's default).
        betas: (b1, b2) of the gradient and Hessian moments.
        weight_decay, weight_decouple, fixed_decay: pytorch_optimizer's weight decay modes.
        hessian_power: k in (0, 1].
        update_period: the estimate is recomputed every ``update_period`` steps (``v`` is not updated in
            between, as pytorch_optimizer); alias ``update_each`` (davda54/ada-hessian's name).
        num_samples: probes per estimate (averaged); alias ``n_samples``.
        hessian_distribution: only ``"rademacher"``.
        eps: added to the denominator (None: the mode's default).
        maximize: maximize the objective (the Hessian is that of the loss, as upstream).
        foreach: accepted and ignored (every backend is fused).
        mode: "pytorch_optimizer" or "official" (per group).
        average_conv_kernel: the mean of 4-D estimates over dims (2, 3) (None: True in official mode).
        seed: the probes' seed.
        stochastic_rounding, master_weights: bf16 parameters (see
            :class:`~fastopt.optim.base.ElementwiseOptimizer`).
        backend: "auto", "cuda", "triton", "cpu" or "torch" (the reference).

    ``update_period``, ``num_samples`` and ``seed`` are per optimizer (the double backward runs once for
    all parameters): every group must have the values of the first.  The schedule and the probes' step
    are counted in ``group["step"]`` (as pytorch_optimizer); the bias corrections use each parameter's
    ``state["step"]``.

    Differences from upstream: the probes come from fastopt's hash, not torch's generator (so the same
    seed gives the same run on every backend and world size); math is fp32 whatever the storage dtype;
    gradients are never written to (upstream negates them and adds L2 decay in place).  Not supported:
    low-bit states, N:M sparse groups, Int8Linear weights, DTensor (FSDP2) parameters, gaussian probes,
    the fairseq variant's ``block_length`` averaging of 2-D tensors, ``torch.compile`` of the step (the
    double backward runs eagerly).  A pytorch_optimizer checkpoint loads (its per-group step becomes each
    parameter's).
    """

    OP = "adahessian"
    STATE_NAMES = OPS["adahessian"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "eps", "hessian_power", "_hessians")
    REFERENCE = staticmethod(_reference)
    _supports_lowbit_states = False
    _supports_sparsity = False
    _supports_int8_weights = False

    _MODE_DEFAULTS = {"pytorch_optimizer": (1e-1, 1e-16), "official": (0.15, 1e-4)}

    def __init__(self, params: Params, lr: Optional[Union[float, torch.Tensor]] = None,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, hessian_power: float = 1.0, update_period: int = 1, num_samples: int = 1,
                 hessian_distribution: str = "rademacher", eps: Optional[float] = None, maximize: bool = False,
                 foreach: Optional[bool] = None, *, mode: str = "pytorch_optimizer",
                 n_samples: Optional[int] = None, update_each: Optional[int] = None,
                 average_conv_kernel: Optional[bool] = None, single_gpu: bool = True, seed: int = 0,
                 stochastic_rounding: bool = False, master_weights: bool = False, backend: str = "auto") -> None:
        if mode not in MODES:
            raise ValueError(f"AdaHessian: mode must be one of {MODES}, got {mode!r}")
        default_lr, default_eps = self._MODE_DEFAULTS[mode]
        if n_samples is not None:
            if num_samples != 1 and num_samples != n_samples:
                raise ValueError(f"AdaHessian: num_samples={num_samples} and its alias n_samples={n_samples} differ")
            num_samples = n_samples
        if update_each is not None:
            if update_period != 1 and update_period != update_each:
                raise ValueError(f"AdaHessian: update_period={update_period} and its alias update_each={update_each} "
                                 "differ")
            update_period = update_each
        defaults = dict(lr=default_lr if lr is None else lr, betas=tuple(betas), weight_decay=weight_decay,
                        weight_decouple=weight_decouple, fixed_decay=fixed_decay, hessian_power=hessian_power,
                        update_period=update_period, num_samples=num_samples,
                        hessian_distribution=hessian_distribution, eps=default_eps if eps is None else eps,
                        maximize=maximize, foreach=foreach, mode=mode,
                        average_conv_kernel=(mode == "official" if average_conv_kernel is None
                                             else average_conv_kernel),
                        seed=seed, stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                        backend=backend)
        self._check_group(defaults)
        self._step_update = True
        super().__init__(params, defaults)

    @classmethod
    def official(cls, params: Params, lr: Union[float, torch.Tensor] = 0.15, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-4, weight_decay: float = 0.0, hessian_power: float = 1.0, single_gpu: bool = True,
                 **kwargs: Any) -> "AdaHessian":
        """``mode="official"`` with the official constructor's signature (amirgholami/adahessian
        ``Adahessian(params, lr, betas, eps, weight_decay, hessian_power, single_gpu)``: its positional
        order and defaults); ``kwargs``: fastopt's other options (``backend``, ``seed``, ...)."""
        return cls(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, hessian_power=hessian_power,
                   single_gpu=single_gpu, mode="official", **kwargs)

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        check_betas(group["betas"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])
        hp = group["hessian_power"]
        if isinstance(hp, bool) or not isinstance(hp, (int, float)) or not 0.0 < hp <= 1.0:
            raise ValueError(f"Invalid hessian_power: {hp!r} (it must be in (0, 1])")
        for key in ("update_period", "num_samples"):
            v = group[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"Invalid {key}: {v!r} (a positive int)")
        if group["hessian_distribution"] != "rademacher":
            raise ValueError(f"AdaHessian: hessian_distribution={group['hessian_distribution']!r} is not supported "
                             "(only 'rademacher': the probes are drawn by fastopt's hash)")
        if group["mode"] not in MODES:
            raise ValueError(f"AdaHessian: mode must be one of {MODES}, got {group['mode']!r}")
        seed = group["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"Invalid seed: {seed!r} (a non-negative int)")
        groups = self.__dict__.get("param_groups")
        if groups:
            for key in ("update_period", "num_samples", "seed"):
                if group[key] != groups[0][key]:
                    raise ValueError(f"AdaHessian: {key} is per optimizer (one double backward for every group); a "
                                     f"group has {group[key]!r}, the first {groups[0][key]!r}")

    def add_param_group(self, param_group):
        """torch's add_param_group, then the new group's options are checked (a group that fails is not
        added)."""
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    def _check_group_param(self, group, p):
        if _sharded.is_dtensor(p):
            raise NotImplementedError(
                "AdaHessian: DTensor (FSDP2) parameters are not supported (the double backward and the probes run on "
                "whole tensors); under DDP the parameters are replicated and the probes, keyed on the element's "
                "index, are the same on every rank")
        super()._check_group_param(group, p)

    @staticmethod
    def _kernel_op(group, update):
        """The op of a step: ``adahessian`` (a new estimate) or ``adahessian_plain`` (between two), and
        their ``_pow`` variants for a hessian_power other than 1."""
        return ("adahessian" if update else "adahessian_plain") + ("" if group["hessian_power"] == 1 else "_pow")

    def _native_hyper(self, group, update=True):
        b1, b2 = group["betas"]
        return native_args(self._kernel_op(group, update), group, beta1=b1, beta2=b2,
                           weight_decay=group["weight_decay"], eps=group["eps"],
                           hessian_power=group["hessian_power"])

    def _ensure_state(self, group, p):
        state = self.state[p]
        if state and "step" not in state:  # a pytorch_optimizer checkpoint: the step is the group's
            state["step"] = torch.full((), float(group.get("step", 0)), dtype=torch.float32, device=p.device)
        super()._ensure_state(group, p)

    # -- the step --------------------------------------------------------------------------------------
    def _all_params(self):
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure=None, hessian: Optional[List[torch.Tensor]] = None):
        """One AdaHessian step.  ``closure`` re-evaluates the model and must call
        ``loss.backward(create_graph=True)``; ``hessian``: estimates of the Hessian diagonal of your own,
        one per parameter of every group in order (pytorch_optimizer's ``step(hessian=...)``)."""
        loss, plan, scalars = self._checked_plan(closure)
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        first = self.param_groups[0]
        t = int(first.get("step", 0)) + 1
        update = hessian is not None or (t - 1) % first["update_period"] == 0
        if hessian is not None:
            given = self._check_given(plan, hessian)
        elif update:
            self._check_graphs(plan)
        for group, buckets in plan:
            for params, _grads in buckets.values():
                for p in params:
                    self._ensure_state(group, p)
        amp = (grad_scale, found_inf) if grad_scale is not None or found_inf is not None else None
        if hessian is not None:
            for p, h in given:
                if h is not self.state[p]["hessian"]:  # (an estimate written into the state: nothing to copy)
                    self._write(self.state[p]["hessian"], h, None if amp is None else (None, amp[1]))
        elif update:
            self._estimate(plan, t, amp)
        self._step_update = update
        try:
            for group, buckets in plan:
                for (device, _dtype, backend), (params, grads) in buckets.items():
                    self._step_bucket(group, params, grads, backend, *scalars[device])
        finally:
            self._step_update = True
        for group in self.param_groups:
            F.advance_group_step(group)
        return loss

    def _check_given(self, plan, hessian):
        """[(p, estimate)] of ``step(hessian=...)``, checked before anything is written."""
        everything = self._all_params()
        if len(hessian) != len(everything):
            raise ValueError(f"AdaHessian: step(hessian=...) takes one tensor per parameter of every group "
                             f"({len(everything)}), got {len(hessian)}")
        index = {id(p): i for i, p in enumerate(everything)}
        out = []
        for _group, buckets in plan:
            for params, _grads in buckets.values():
                for p in params:
                    h = hessian[index[id(p)]]
                    if not isinstance(h, torch.Tensor) or h.shape != p.shape or not h.is_floating_point():
                        raise ValueError(f"AdaHessian: step(hessian=...): the estimate of a parameter "
                                         f"{tuple(p.shape)} is {getattr(h, 'dtype', type(h).__name__)}"
                                         f"{tuple(getattr(h, 'shape', ()))}; it must be a float tensor of its shape")
                    out.append((p, h))
        return out

    def _check_graphs(self, plan):
        if not any(p.grad.grad_fn is not None for _, buckets in plan for params, _ in buckets.values()
                   for p in params):
            raise RuntimeError("AdaHessian: the gradients carry no graph, so there is no Hessian-vector product; "
                               "call loss.backward(create_graph=True) before step() (or step(closure) with a "
                               "closure that does), or pass step(hessian=[...])")

    @staticmethod
    def _write(slot, d, amp):
        """``slot <- d``; under AMP (``amp = (grad_scale, found_inf)``) ``d / grad_scale``, and nothing
        written where ``found_inf`` is set (on the device: no host sync)."""
        if amp is not None:
            grad_scale, found_inf = amp
            if grad_scale is not None:
                d = d.float() / grad_scale.to(device=d.device, dtype=torch.float32)
            if found_inf is not None:
                d = torch.where(found_inf.to(d.device) != 0, slot.view(d.shape).to(d.dtype), d)
        slot.copy_(d.view(slot.shape))

    def _estimate(self, plan, t, amp=None):
        """Write the Hutchinson estimate at step ``t`` (module doc) into ``state["hessian"]`` of every
        parameter with a gradient (checked by :meth:`_check_graphs`).  Under AMP (``amp``: grad_scale,
        found_inf) the estimate of the scaled loss is unscaled, and not written on a skipped step."""
        index = {id(p): i for i, p in enumerate(self._all_params())}
        entries = []  # (p, group, probe backend)
        for group, buckets in plan:
            for (device, _dtype, backend), (params, _grads) in buckets.items():
                for p in params:
                    entries.append((p, group, _probe_backend(backend, device)))
        first = self.param_groups[0]
        n, seed = first["num_samples"], first["seed"]
        live = [k for k, (p, _, _) in enumerate(entries) if p.grad.grad_fn is not None]
        params = [p for p, _, _ in entries]
        offsets = [0] * len(entries)
        acc: List[Any] = [None] * len(entries)
        for s in range(n):
            keys = [probe_key(seed, index[id(p)], t, s) for p in params]
            zs = []
            for k in live:
                g = params[k].grad
                z = torch.empty(g.shape, dtype=g.dtype, device=g.device)
                _fill([z], [keys[k]], [offsets[k]], entries[k][2])
                zs.append(z)
            hzs = torch.autograd.grad([params[k].grad for k in live], params, grad_outputs=zs,
                                      retain_graph=s < n - 1, allow_unused=True)
            del zs
            for k, hz in enumerate(hzs):
                p, group, backend = entries[k]
                if hz is None:
                    hz = torch.zeros(p.shape, dtype=p.dtype, device=p.device)
                hz = hz.contiguous()
                if acc[k] is None:
                    slot = self.state[p]["hessian"]
                    direct = (slot.dtype == torch.float32 and slot.is_contiguous() and amp is None
                              and not (group["average_conv_kernel"] and p.dim() == 4))
                    acc[k] = slot if direct else torch.empty(hz.shape, dtype=torch.float32, device=hz.device)
                _consume([hz], [acc[k]], [keys[k]], [offsets[k]], 1.0 / n, group["mode"] == "pytorch_optimizer",
                         s > 0, backend)
        for (p, group, _), d in zip(entries, acc):
            slot = self.state[p]["hessian"]
            if d is slot:
                continue
            if group["average_conv_kernel"]:
                d = spatial_average(d.view(p.shape))
            self._write(slot, d.view(p.shape), amp)

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf, phase=0, rows=None,
             row_coef=None, reduce_out=None, sparse=None):
        update = self.__dict__.get("_step_update", True)
        if backend == "torch":
            estimates = [s["hessian"] for s in states] if update else None
            self._reference_step({**group, "_hessians": estimates}, params, grads, states, grad_scale, found_inf)
            return
        op = self._kernel_op(group, update)
        hyper, flags = self._native_hyper(group, update)
        lists = [s[name] for name in OPS[op].states for s in states]
        elementwise_unchecked(
            op, params, grads, lists, [s["step"] for s in states], hyper, flags, lr=group["lr"],
            maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, backend=backend,
            device=params[0].device, seed=group.get("seed", 0), stochastic=self._stochastic(group, params[0]))
