"""OrthoGrad (⊥Grad; Prieto et al., "Grokking at the Edge of Numerical Stability", 2025), fused.

Drop-in for ``pytorch_optimizer.OrthoGrad``: a wrapper that replaces every gradient by its part
orthogonal to its parameter, rescaled to the gradient's norm, and then steps the wrapped optimizer.
Equations: :func:`fastopt.reference.orthograd.orthograd_reference`.

On the kernel backends the projection is the registered op ``orthograd``
(``csrc/include/fastopt/functors/orthograd.h``) in three multi-tensor launches per (device, dtype)
bucket: a reduce pass (the sums ``w.g``, ``w.w``, ``g.g``), a second reduce pass with ``c = w.g /
(w.w + eps)`` in the row coefficients (``||g - c w||^2``), and the in-place update; ``c`` and the scale
are computed on the device between the passes (no host sync).
"""
import functools
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Dict, Iterable, List, Optional, Type, Union

import torch
from torch.optim import Optimizer

from .. import _backend
from ..reference.orthograd import ORTHOGRAD_EPS, check_dense_gradient, orthograd_reference, orthograd_scale
from .functional import elementwise_unchecked, is_dense


def _kernel_reason(p: torch.Tensor, g: torch.Tensor) -> Optional[str]:
    """Why the kernels cannot take this (parameter, gradient) pair, or None: the op reads the weights
    as the gradients' partner list, so both must share dtype and layout."""
    if g.dtype != p.dtype:
        return f"a {g.dtype} gradient of a {p.dtype} parameter"
    if p.numel() > 1 and g.stride() != p.stride():
        return f"a gradient with strides {g.stride()} for a parameter with strides {p.stride()}"
    return None


def orthogonalize_gradients_(params: Iterable[torch.Tensor], backend: str = "auto",
                             eps: float = ORTHOGRAD_EPS) -> None:
    """Replace the gradient of every parameter in ``params`` (in place; parameters without a gradient
    and complex ones are skipped) by its ⊥Grad projection.  Sparse gradients raise RuntimeError."""
    reference, buckets = [], defaultdict(list)
    for p in params:
        g = p.grad
        if g is None or torch.is_complex(p):
            continue
        check_dense_gradient(g)
        chosen = _backend.resolve(backend, p.device, p.dtype, is_dense(p) and is_dense(g), reason=_kernel_reason(p, g),
                                  name="fastopt.OrthoGrad")
        (reference if chosen == "torch" else buckets[(p.device, p.dtype, chosen)]).append(p)
    if reference:
        orthograd_reference(reference, [p.grad for p in reference], eps)
    for (device, _dtype, chosen), ps in buckets.items():
        # The gradients go in the "params" slot (they are what the update writes), the weights in "grads".
        run = functools.partial(elementwise_unchecked, "orthograd", [p.grad for p in ps], ps,
                                [], [], (), 0, lr=0.0, maximize=False, grad_scale=None, found_inf=None,
                                backend=chosen, device=device)
        sums = torch.zeros((2, len(ps), 4), dtype=torch.float32, device=device)
        run(phase=1, reduce_out=sums[0])
        row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
        row[:, 0] = sums[0, :, 0] / (sums[0, :, 1] + eps)
        run(phase=1, row_coef=row, reduce_out=sums[1])
        row[:, 1] = orthograd_scale(sums[0, :, 2].sqrt(), sums[1, :, 3].sqrt(), eps)
        run(phase=0, row_coef=row)


class OrthoGrad(Optimizer):
    """Wrap ``optimizer`` so that it steps with gradients orthogonal to the current parameters
    (``pytorch_optimizer.OrthoGrad``'s semantics; see :mod:`fastopt.optim.orthograd`).

    Update (per parameter ``w`` with gradient ``g``, before the wrapped optimizer's step)::

        c  = (w . g) / (w . w + 1e-30)
        go = g - c w                                   [go <- 0 when ||go|| <= 4 eps ||g||: rounding noise]
        g  <- go ||g|| / (||go|| + 1e-30)

    Args:
        optimizer: the optimizer to wrap (any ``torch.optim.Optimizer``: fastopt's, low-bit ones,
            torch's), or an optimizer class, then built as ``optimizer(params, **kwargs)``.
        foreach: accepted for upstream's signature; the kernel backends always batch a bucket in
            multi-tensor launches and the torch backend runs the per-tensor reference.
        backend: who runs the projection: ``'auto'`` (the fused kernels where they apply), ``'cuda'``,
            ``'triton'``, ``'cpu'`` or ``'torch'`` (the reference).  fp64 and non-dense tensors run the
            reference under ``'auto'``.  The wrapped optimizer keeps its own backend.
        **kwargs: the constructor arguments (``params`` included) when ``optimizer`` is a class.

    ``param_groups``, ``state``, ``defaults``, ``state_dict``, ``load_state_dict``, ``zero_grad`` and
    ``add_param_group`` are the wrapped optimizer's.  ``step(closure)`` calls the closure, projects the
    gradients, then steps the wrapped optimizer (the projection runs inside the closure it hands on,
    as upstream, so optimizers that re-evaluate the closure see projected gradients).

    AMP: ``_step_supports_amp_scaling`` is False, so ``torch.amp.GradScaler`` unscales the gradients
    and checks them for infs before :meth:`step`, which projects unscaled gradients (the projection is
    not linear in the gradient's scale at its ``eps`` and its zero threshold) and skips nothing itself.

    Differences from upstream: the kernels add the sums in their own order (fp32 partials widened to
    fp64 on the CPU, fp32 atomics in Triton), so results differ by fp32 rounding, not bitwise; a
    direction zeroed as parallel to its weight stays 0 where upstream's ``||g|| / eps`` overflows to
    NaN; sparse gradients raise (upstream skips them).
    """

    _step_supports_amp_scaling = False

    def __init__(self, optimizer: Union[Optimizer, Type[Optimizer]], foreach: Optional[bool] = None, *,
                 backend: str = "auto", **kwargs: Any) -> None:
        _backend.check_backend_name(backend)
        if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
            if "params" not in kwargs:
                raise ValueError("OrthoGrad: pass `params` (and the constructor's options) with an optimizer class")
            params = kwargs.pop("params")
            optimizer = optimizer(params, **kwargs)
        elif not isinstance(optimizer, Optimizer):
            raise TypeError(f"OrthoGrad wraps a torch.optim.Optimizer instance or class, not {type(optimizer).__name__}")
        elif kwargs:
            raise TypeError(f"OrthoGrad: unexpected arguments {sorted(kwargs)} with an optimizer instance")
        # Optimizer.__init__ is not called (param_groups and state are the wrapped optimizer's); these
        # are the attributes its hooks and profiler wrapper read.
        self._optimizer_step_pre_hooks: Dict[int, Callable] = OrderedDict()
        self._optimizer_step_post_hooks: Dict[int, Callable] = OrderedDict()
        self._patch_step_function()
        self.optimizer: Optimizer = optimizer
        self.foreach = foreach
        self.backend = backend
        self.eps = ORTHOGRAD_EPS

    def __repr__(self) -> str:
        return f"OrthoGrad({self.optimizer!r})"

    # (Pickled like torch's optimizers: the configuration, not the hooks or a scheduler's patched step.)
    def __getstate__(self) -> Dict[str, Any]:
        return {"optimizer": self.optimizer, "foreach": self.foreach, "backend": self.backend, "eps": self.eps}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._patch_step_function()

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        """The wrapped optimizer's parameter groups."""
        return self.optimizer.param_groups

    @property
    def state(self) -> Dict[Any, Any]:
        """The wrapped optimizer's per-parameter state."""
        return self.optimizer.state

    @property
    def defaults(self) -> Dict[str, Any]:
        """The wrapped optimizer's defaults."""
        return self.optimizer.defaults

    def state_dict(self) -> Dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def apply_orthogonal_gradients(self, params: Iterable[torch.Tensor]) -> None:
        """Project the gradients of ``params`` in place (what :meth:`step` does before stepping)."""
        orthogonalize_gradients_(params, self.backend, self.eps)

    def _project_all(self) -> None:
        for group in self.param_groups:
            self.apply_orthogonal_gradients(group["params"])

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Project every gradient, then step the wrapped optimizer; returns what its step returns."""
        if closure is None:
            self._project_all()
            return self.optimizer.step()

        def orthogonal_closure():
            with torch.enable_grad():
                loss = closure()
            self._project_all()
            return loss

        return self.optimizer.step(orthogonal_closure)
