"""The shared base class of fastopt's optimizers.

A step validates every group first (hyperparameters, gradients: sparse, complex, device, dtype),
then initializes missing state, then runs one fused kernel call per (device, dtype, backend) bucket
of each param group.  Nothing is written before every check has passed.

AMP: like torch's fused optimizers, ``_step_supports_amp_scaling = True``; ``torch.amp.GradScaler``
sets ``grad_scale`` / ``found_inf`` on the optimizer and the kernels unscale the gradients and skip
the step on inf/nan without a host sync.
"""
from collections import defaultdict

import torch

from .. import _backend
from .functional import is_dense


class FusedOptimizer(torch.optim.Optimizer):
    """Base class: subclasses define ``_check_group``, ``_init_state`` and ``_step_bucket``."""

    _step_supports_amp_scaling = True

    def __init__(self, params, defaults):
        _backend.check_backend_name(defaults.get("backend", "auto"))
        super().__init__(params, defaults)
        self.register_load_state_dict_post_hook(FusedOptimizer._steps_to_param_device)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in self.defaults.items():
                group.setdefault(key, value)

    # -- hooks for subclasses ------------------------------------------------------------------
    def _check_group(self, group):
        """Raise ValueError for invalid hyperparameters of ``group``."""
        raise NotImplementedError

    def _init_state(self, group, p, state):
        """Fill the empty ``state`` dict of parameter ``p``."""
        raise NotImplementedError

    def _step_bucket(self, group, params, backend, grad_scale, found_inf):
        """Run one fused step over ``params`` (one device, one dtype) with ``backend``."""
        raise NotImplementedError

    # -- the step --------------------------------------------------------------------------------
    def _check_param(self, p):
        g = p.grad
        name = type(self).__name__
        if g.is_sparse or g.layout != torch.strided:
            raise RuntimeError(f"{name} does not support sparse gradients")
        if p.is_complex():
            raise TypeError(f"{name} does not support complex parameters ({p.dtype}); "
                            "optimize torch.view_as_real(p) instead")
        if g.device != p.device:
            raise ValueError(f"{name}: a gradient is on {g.device} but its parameter on {p.device}")
        if g.dtype != p.dtype or g.shape != p.shape:
            raise ValueError(f"{name}: gradient {g.dtype}{tuple(g.shape)} does not match its parameter "
                             f"{p.dtype}{tuple(p.shape)}")

    def _plan(self):
        """Validate everything and bucket the params that have gradients; touches no state."""
        plan = []
        for group in self.param_groups:
            self._check_group(group)
            _backend.check_backend_name(group["backend"])
            buckets = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_param(p)
                dense = is_dense(p) and (p.numel() <= 1 or p.grad.stride() == p.stride())
                backend = _backend.resolve(group["backend"], p.device, p.dtype, dense)
                buckets[(p.device, p.dtype, backend)].append(p)
            plan.append((group, buckets))
        return plan

    @torch.no_grad()
    def step(self, closure=None):
        """Perform one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plan = self._plan()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group, buckets in plan:
            for params in buckets.values():
                for p in params:
                    if not self.state[p]:
                        self._init_state(group, p, self.state[p])
        for group, buckets in plan:
            for (device, _dtype, backend), params in buckets.items():
                self._step_bucket(group, params, backend, _on(grad_scale, device), _on(found_inf, device))
        return loss

    @staticmethod
    def _steps_to_param_device(optimizer):
        # torch.optim keeps `step` on the CPU for its non-fused paths; fastopt's kernels read it on
        # the parameter's device.  Loading either kind of checkpoint ends up here.
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "step" in state:
                    step = state["step"]
                    if not isinstance(step, torch.Tensor):
                        step = torch.tensor(float(step))
                    state["step"] = step.to(device=p.device, dtype=torch.float32).reshape(())


def _on(t, device):
    return None if t is None else t.to(device)
