"""SAM (Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021)
and ASAM (Kwon et al., "ASAM: Adaptive Sharpness-Aware Minimization", ICML 2021), around any optimizer.

Drop-in for davda54/sam's ``SAM`` and ``pytorch_optimizer.SAM`` (4.1.0): the same constructor, the
same ``first_step`` / ``second_step`` / ``step(closure)``, the same numbers.  The first step runs as
two multi-tensor launches per (device, dtype, backend, adaptive) bucket: a reduce pass (the squared
global norm of ``g``: the registered op ``clip``'s phase 1; or of ``|w| g``: ``asam_norm``), then one
pass that saves the weights and adds the perturbation (``sam`` / ``asam``,
``csrc/include/fastopt/functors/sam.h``); the scale
``rho / (norm + eps)`` is computed on the device between them (no host sync).  The second step
restores the weights from the saved copy (one pass, exact: the ``clip`` op's update with
coefficient 1) and steps the base optimizer.

Where ``no_sync`` goes under DistributedDataParallel, and how a ``torch.amp.GradScaler`` drives the
two steps: see :class:`SAM`.
"""
import inspect
from collections import defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Type, Union

import torch
from torch.optim import Optimizer

from .. import _backend, _sharded
from ..reference.sam import sam_perturb_reference, sam_scales, sam_sq_norms
from .functional import elementwise_unchecked, is_dense


def _check_rho(rho: Any, where: str = "rho") -> float:
    try:
        value = float(rho)
    except (TypeError, ValueError):
        raise TypeError(f"SAM: {where} must be a number, got {type(rho).__name__}") from None
    if not value >= 0.0:  # (nan too)
        raise ValueError(f"SAM: invalid {where} {rho!r}: it must be >= 0")
    return value


def _kernel_reason(p: torch.Tensor, g: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot take this parameter, or None."""
    if _sharded.is_dtensor(p):
        return "DTensor parameters (the global norm spans every shard; the torch path reduces it)"
    if g.dtype != p.dtype:
        return f"a {g.dtype} gradient of a {p.dtype} parameter"
    if not is_dense(p):
        return "non-dense parameters"
    return None


class SAM(Optimizer):
    """Sharpness-aware minimization around a base optimizer: SAM, or ASAM with ``adaptive=True``.

    Update, per step (``g`` the gradient at ``w``; ``a = |w|`` for ASAM groups, else 1)::

        n      = sqrt(sum over every parameter of ||a g||^2)        (one global norm, all groups)
        e      = rho (a^2 g) / (n + perturb_eps)                     (rho of the parameter's group)
        w     <- w + e                                               first_step (old_p <- w first)
        g'     = the gradient at w + e                               (your second forward/backward)
        w     <- old_p;  w <- base_optimizer.step(w, g')             second_step

    Args:
        params: parameters or param groups; a group may set its own ``rho`` and ``adaptive``.
        base_optimizer: the optimizer *class* that makes the update (``fastopt.AdamW``, ``fastopt.SGD``,
            ``torch.optim.SGD``, ...), built as ``base_optimizer(self.param_groups, **kwargs)``.
        rho: the radius of the neighbourhood (>= 0).  ASAM usually wants about 10x SAM's.
        adaptive: ASAM's scale-invariant perturbation.
        use_gc: gradient centralization of the gradients used for the perturbation (after the norm, as
            pytorch_optimizer; the gradients are modified in place, as there).
        perturb_eps: added to the norm (davda54/sam's fixed 1e-12).
        foreach: passed to the base optimizer when given (as pytorch_optimizer).
        backend: who runs the first step: ``'auto'``, ``'cuda'``, ``'triton'``, ``'cpu'`` or ``'torch'``
            (the reference, :mod:`fastopt.reference.sam`); also passed to the base optimizer when its
            constructor takes ``backend`` (fastopt's).  fp64, non-dense and DTensor parameters use the
            reference under ``'auto'``.
        **kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...).

    Usage (davda54's two calls, or ``step(closure)``)::

        loss_fn(model(x), y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)

    ``param_groups`` and ``state`` are the base optimizer's (as pytorch_optimizer), so
    ``state_dict()`` is the base optimizer's and loads into a plain base optimizer and back; the
    saved weights are kept outside ``state`` (:attr:`old_params`, one buffer per parameter, reused
    every step), so a checkpoint does not carry a copy of the model.

    DDP: the paper averages per-accelerator SAM gradients (each replica perturbs with its own
    gradient).  Run the *first* forward and backward under ``model.no_sync()`` -- the forward too:
    DDP decides at forward time whether the next backward all-reduces, so a ``no_sync()`` around the
    backward alone still synchronizes (davda54's README puts only the backward there) -- and the second
    pair outside it; the replicas then step with the same averaged gradient and stay identical.
    Without ``no_sync`` every replica perturbs with the global gradient: SAM on the whole batch.

    AMP (``torch.amp.GradScaler``): call ``first_step`` on the *scaled* gradients (do not call
    ``scaler.unscale_`` before it: the direction ``g / ||g||`` does not depend on the scale, and the
    scaler must still unscale the second gradients), then ``scaler.step(opt)`` after the second
    backward: it calls :meth:`step` without a closure, which runs :meth:`second_step` with the
    scaler's ``grad_scale`` / ``found_inf`` (fused into fastopt base optimizers; other bases get
    torch's unscale-and-check, one host sync as GradScaler's own path).  A first gradient that is not
    finite leaves the weights unperturbed and, under the scaler, skips the base step as well.

    Differences from upstream: the global norm is summed in the kernels' order (fp32 rounding, not
    bitwise; the perturbation of fp16/bf16 parameters is computed in fp32 and rounded once, upstream
    rounds each operation); a non-finite norm perturbs nothing (upstream adds nan/inf and restores
    later); ``step`` returns the closure's loss (upstream returns None) and, without a closure, is
    ``second_step`` when a ``first_step`` is pending (the GradScaler path; upstream raises);
    ``second_step`` restores only what ``first_step`` perturbed (pytorch_optimizer's rule; davda54
    copies back every parameter that has a gradient); a second ``first_step`` before ``second_step``
    first restores the weights (upstream would save the perturbed ones); the saved weights persist
    between steps (one copy of the model, not reallocated each step); DTensor (FSDP2) parameters take
    the torch reference path (its norm is the DTensor's global one).

    Host syncs: none in ``first_step`` (the norm and the scales stay on the device) or
    ``second_step``, except under a GradScaler with a base optimizer without fused AMP support (one
    ``found_inf`` read, as GradScaler's own path).
    """

    _step_supports_amp_scaling = True

    def __init__(self, params: Union[Iterable[torch.Tensor], Iterable[Dict[str, Any]]],
                 base_optimizer: Type[Optimizer], rho: float = 0.05, adaptive: bool = False, use_gc: bool = False,
                 perturb_eps: float = 1e-12, foreach: Optional[bool] = None, *, backend: str = "auto",
                 **kwargs: Any) -> None:
        rho = _check_rho(rho)
        perturb_eps = _check_rho(perturb_eps, "perturb_eps")
        if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)):
            raise TypeError("SAM: base_optimizer must be an optimizer class (a torch.optim.Optimizer subclass, e.g. "
                            f"fastopt.AdamW), not {base_optimizer!r}")
        if base_optimizer is SAM or issubclass(base_optimizer, SAM):
            raise TypeError("SAM: base_optimizer cannot be SAM itself")
        _backend.check_backend_name(backend)
        self.use_gc = bool(use_gc)
        self.perturb_eps = perturb_eps
        self.backend = backend
        if foreach is not None:
            kwargs["foreach"] = foreach
        if "backend" in inspect.signature(base_optimizer).parameters:
            kwargs.setdefault("backend", backend)
        defaults = {"rho": rho, "adaptive": bool(adaptive), "foreach": foreach, **kwargs}
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_rho(group["rho"], "a param group's rho")
        self.base_optimizer: Optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.defaults.update(self.base_optimizer.defaults)
        self.old_params: Dict[torch.Tensor, torch.Tensor] = {}   # parameter -> its saved weights
        self._pending: List[torch.Tensor] = []                  # perturbed by first_step, not yet restored
        self._pending_buckets: List[Any] = []                   # the same, by (device, dtype, backend)
        self._first_inf: Optional[torch.Tensor] = None          # 1.0 where first_step's norm was not finite
        self._rho_cache: Dict[Any, torch.Tensor] = {}

    def __repr__(self) -> str:
        return f"SAM({self.base_optimizer!r})"

    # Pickled (and deep-copied) as the base optimizer plus SAM's options; torch's __getstate__ keeps only
    # defaults, state and param_groups, which would lose the base optimizer.  A pending first step is not
    # kept (nor the saved-weights buffers, rebuilt at the next first_step).
    def __getstate__(self) -> Dict[str, Any]:
        return {"base_optimizer": self.base_optimizer, "defaults": self.defaults, "use_gc": self.use_gc,
                "perturb_eps": self.perturb_eps, "backend": self.backend}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.old_params, self._pending, self._pending_buckets = {}, [], []
        self._first_inf, self._rho_cache = None, {}

    # -- the base optimizer's bookkeeping ------------------------------------------------------------
    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a group (with its own ``rho`` / ``adaptive``, defaulting to SAM's) to the base optimizer."""
        if "base_optimizer" not in self.__dict__:  # (torch's __init__ adds the first groups here)
            super().add_param_group(param_group)
            return
        group = dict(param_group)
        group.setdefault("rho", self.defaults["rho"])
        group.setdefault("adaptive", self.defaults["adaptive"])
        _check_rho(group["rho"], "a param group's rho")
        self.base_optimizer.add_param_group(group)

    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state_dict (its groups carry ``rho`` and ``adaptive``)."""
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load into the base optimizer (its load hooks run); groups without ``rho``/``adaptive`` (a
        plain base optimizer's checkpoint) take SAM's defaults."""
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        for group in self.param_groups:
            group.setdefault("rho", self.defaults["rho"])
            group.setdefault("adaptive", self.defaults["adaptive"])
        self._pending, self._pending_buckets = [], []

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's zero_grad."""
        self.base_optimizer.zero_grad(set_to_none)

    # -- the first step ---------------------------------------------------------------------------------
    def _old_buffer(self, p: torch.Tensor) -> torch.Tensor:
        old = self.old_params.get(p)
        if old is None or old.shape != p.shape or old.dtype != p.dtype or old.device != p.device \
                or (p.numel() > 1 and old.stride() != p.stride()):
            old = torch.empty_like(p, memory_format=torch.preserve_format)
            if p.numel() > 1 and old.stride() != p.stride():  # (a dense permuted layout preserve_format missed)
                old = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype, device=p.device)
            self.old_params[p] = old
        return old

    def _plan(self):
        """[(p, rho, adaptive, backend)] of every parameter with a gradient; raises before anything is
        written."""
        items = []
        for group in self.param_groups:
            rho = _check_rho(group.get("rho", self.defaults["rho"]), "a param group's rho")
            adaptive = bool(group.get("adaptive", False))
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.layout != torch.strided:
                    raise RuntimeError("SAM does not support sparse gradients")
                if not p.is_floating_point():
                    raise TypeError(f"SAM perturbs floating-point parameters; a parameter with a gradient is "
                                    f"{p.dtype}")
                if g.shape != p.shape or g.device != p.device:
                    raise ValueError(f"SAM: gradient {g.dtype}{tuple(g.shape)} on {g.device} does not match its "
                                     f"parameter {p.dtype}{tuple(p.shape)} on {p.device}")
                chosen = _backend.resolve(self.backend, p.device, p.dtype, True, reason=_kernel_reason(p, g),
                                          name="fastopt.SAM")
                items.append((p, rho, adaptive, chosen))
        return items

    @staticmethod
    def _grads(ps, chosen):
        """The gradients of ``ps`` as the kernels walk them: in their parameter's memory layout."""
        if chosen == "torch":
            return [p.grad for p in ps]
        return [p.grad if p.numel() <= 1 or p.grad.stride() == p.stride() else torch.empty_like(p).copy_(p.grad)
                for p in ps]

    def _rhos(self, rhos, device):
        key = (tuple(rhos), device)
        t = self._rho_cache.get(key)
        if t is None:
            if len(self._rho_cache) > 64:
                self._rho_cache.clear()
            t = self._rho_cache[key] = torch.tensor(rhos, dtype=torch.float32, device=device)
        return t

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Save every parameter with a gradient and move it to ``w + e(w)`` (see the class docstring)."""
        items = self._plan()
        if self._pending:  # a first step twice: go back to w first (as upstream's second clone would not)
            self._restore()
        if not items:
            self._first_inf = None
            if zero_grad:
                self.zero_grad()
            return
        first = items[0][0].device
        buckets = defaultdict(list)
        for p, rho, adaptive, chosen in items:
            key = ("torch",) if chosen == "torch" else (p.device, p.dtype, chosen, adaptive)
            buckets[key].append((p, rho, adaptive))
        # phase 1: the squared global norm
        sums = []
        for key, its in buckets.items():
            ps = [it[0] for it in its]
            if key[0] == "torch":
                sums.append(sam_sq_norms(ps, [p.grad for p in ps], [it[2] for it in its]).sum().to(first))
                continue
            device, _dtype, chosen, adaptive = key
            out = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
            gs = self._grads(ps, chosen)
            # SAM: the "clip" op's pass (sum g^2, g in both slots); ASAM: "asam_norm" (sum (|w| g)^2)
            elementwise_unchecked("asam_norm" if adaptive else "clip", ps if adaptive else gs, gs, [], [], (), 0,
                                  lr=0.0, maximize=False, grad_scale=None, found_inf=None, backend=chosen,
                                  device=device, phase=1, reduce_out=out)
            sums.append(out[:, 0].sum().to(first))
        sq_sum = torch.stack(sums).sum() if len(sums) > 1 else sums[0]
        self._first_inf = (~torch.isfinite(sq_sum)).to(torch.float32).reshape(1)
        if self.use_gc:  # pytorch_optimizer's centralize_gradient, in place, after the norm
            for p, _rho, _adaptive, _chosen in items:
                g = p.grad
                if g.dim() > 1:
                    g.sub_(g.mean(dim=tuple(range(1, g.dim())), keepdim=True))
        # phase 0: old_p <- w, w += e
        for key, its in buckets.items():
            ps = [it[0] for it in its]
            olds = [self._old_buffer(p) for p in ps]
            device = ps[0].device
            scales = sam_scales(sq_sum.to(device), self._rhos([it[1] for it in its], device), self.perturb_eps)
            if key[0] == "torch":
                sam_perturb_reference(ps, [p.grad for p in ps], olds, scales, [it[2] for it in its])
                continue
            _device, _dtype, chosen, adaptive = key
            row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
            row[:, 0] = scales
            elementwise_unchecked("asam" if adaptive else "sam", ps, self._grads(ps, chosen), olds, [], (), 0, lr=0.0,
                                  maximize=False, grad_scale=None, found_inf=None, backend=chosen, device=device,
                                  phase=0, row_coef=row)
        self._pending = [it[0] for it in items]
        restore = defaultdict(list)
        for p, _rho, _adaptive, chosen in items:
            restore[(p.device, p.dtype, chosen)].append(p)
        self._pending_buckets = list(restore.items())
        if zero_grad:
            self.zero_grad()

    # -- the second step --------------------------------------------------------------------------------
    @torch.no_grad()
    def _restore(self) -> None:
        """w <- old_p (exact) for what first_step perturbed: per kernel bucket one pass of the ``clip``
        op's update with coefficient 1 (``w = old_p * 1``, exact in every dtype), so that the copy runs
        in fastopt's thread pool like the passes around it (torch's copy_ between them made the two
        OpenMP runtimes wait on each other); the torch path copies."""
        old_params = self.old_params
        for (device, _dtype, chosen), ps in self._pending_buckets:
            olds = [old_params[p] for p in ps]
            if chosen == "torch":
                for p, old in zip(ps, olds):
                    p.copy_(old)
                continue
            ones = torch.ones((len(ps), 4), dtype=torch.float32, device=device)
            elementwise_unchecked("clip", ps, olds, [], [], (), 0, lr=0.0, maximize=False, grad_scale=None,
                                  found_inf=None, backend=chosen, device=device, phase=0, row_coef=ones)
        self._pending = []
        self._pending_buckets = []

    def _amp_scalars(self):
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        if grad_scale is None and found_inf is None:
            return None
        return grad_scale, found_inf

    def _base_step(self, amp) -> None:
        base = self.base_optimizer
        if amp is None:
            base.step()
            return
        grad_scale, found_inf = amp
        first_inf = self._first_inf
        if first_inf is not None:
            found_inf = first_inf if found_inf is None else found_inf + first_inf.to(found_inf.device).reshape(
                found_inf.shape)
        if getattr(base, "_step_supports_amp_scaling", False):
            base.grad_scale, base.found_inf = grad_scale, found_inf
            try:
                base.step()
            finally:
                del base.grad_scale, base.found_inf
            return
        # a base without fused scaling: GradScaler's own path (unscale in place, skip on inf: one sync)
        if grad_scale is not None:
            found_inf = self._check_grads(found_inf, grad_scale.double().reciprocal().float())
        if found_inf is None or float(found_inf.sum()) == 0.0:
            base.step()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore the weights saved by :meth:`first_step` (exactly) and step the base optimizer."""
        self._restore()
        self._base_step(self._amp_scalars())
        self._first_inf = None
        if zero_grad:
            self.zero_grad()

    def _check_grads(self, found_inf: Optional[torch.Tensor], inv_scale: Optional[torch.Tensor] = None
                     ) -> Optional[torch.Tensor]:
        """``found_inf`` plus 1 where a current gradient is not finite, without a host sync; the gradients
        are multiplied by ``inv_scale`` in place when it is given (GradScaler's unscale)."""
        by_key = defaultdict(list)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    by_key[(p.grad.device, p.grad.dtype)].append(p.grad)
        for (device, _dtype), grads in by_key.items():
            flag = torch.zeros(1, dtype=torch.float32, device=device)
            inv = torch.ones(1, device=device) if inv_scale is None else inv_scale.to(device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, flag, inv)
            found_inf = flag if found_inf is None else found_inf + flag.to(found_inf.device).reshape(found_inf.shape)
        return found_inf

    def _nonfinite_grads(self, found_inf: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """``found_inf`` plus 1 where a current gradient is not finite (the closure's, which the scaler
        has not seen), without a host sync."""
        return self._check_grads(found_inf)

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """With ``closure`` (which recomputes the loss and the gradients; the first gradients must already
        be there): ``first_step(zero_grad=True)``, the closure, ``second_step()``; returns the closure's
        loss.  Without: :meth:`second_step` after a pending :meth:`first_step` (what ``scaler.step(opt)``
        calls), else ValueError."""
        if closure is None:
            if not self._pending:
                raise ValueError("SAM.step needs `closure` (it recomputes the loss and gradients at the perturbed "
                                 "weights), or call first_step() first and then step() / second_step()")
            self.second_step()
            return None
        amp = self._amp_scalars()
        self.first_step(zero_grad=True)
        with torch.enable_grad():
            loss = closure()
        self._restore()
        if amp is not None:  # the scaler checked the first gradients; these are new
            amp = (amp[0], self._nonfinite_grads(amp[1]))
        self._base_step(amp)
        self._first_inf = None
        return loss
