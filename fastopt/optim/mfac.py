"""Dense M-FAC: the sliding-window inverse-empirical-Fisher optimizer (Frantar, Kurtic, Alistarh, NeurIPS 2021).

The math and its scaling conventions are in :mod:`fastopt.reference.mfac`; this module holds the optimizer
class, which runs the window's two passes over d on the chosen backend (``cpu``: C++/OpenMP,
``csrc/cpu/mfac_kernels.cpp``; ``triton``: ``triton_kernels/mfac.py``; ``torch``: the reference) and the
O(m^2) m x m step in torch (fp64, on the window's device) for every backend.
"""
import math
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
from ..reference import mfac as ref

Params = Union[Iterable[Tensor], Iterable[Dict[str, Any]]]

_WINDOW_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
_STATE_KEYS = ("step", "grads", "gram", "inv", "damp", "momentum_buffer")


def _dtype_name(value):
    if isinstance(value, torch.dtype):
        for name, dt in _WINDOW_DTYPES.items():
            if dt == value:
                return name
    if isinstance(value, str) and value in _WINDOW_DTYPES:
        return value
    raise ValueError(f"MFAC: grads_dtype must be one of {tuple(_WINDOW_DTYPES)} (or the torch dtype), got {value!r}")


class MFAC(torch.optim.Optimizer):
    """Dense M-FAC (Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of Second-Order
    Information", NeurIPS 2021): steps along the inverse empirical Fisher of a sliding window of the last
    ``ngrads`` gradients, applied matrix-free.

    Each param group's params are flattened into one d-vector (in order, each param row-major); the
    group keeps the window ``G`` (m, d) of its last m gradients (a ring; rows not yet written are zero),
    their Gram matrix ``K = G G^T`` (fp64, one row updated per step) and ``W = (m damp I + K)^-1`` (fp64,
    updated in O(m^2) per step and recomputed every m steps).  With g the flattened gradient::

        g <- g + wd p                                  (weight_decay_mode="l2")
        G[(t - 1) % m] <- g;  K row/column updated;  W updated
        u <- (damp I + G^T G / m)^-1 g = g / damp - G^T W (G g) / damp
        v <- momentum v + (1 - momentum) u;  u <- v    (momentum > 0)
        p <- p (1 - wd)                                (weight_decay_mode="decoupled")
        p <- p - lr u

    Args:
        params: the parameters or param groups (fp32; fp64 with the torch backend).
        lr: learning rate.
        momentum: the M-FAC optimizer's momentum (``v <- momentum v + (1 - momentum) u``), in [0, 1).
        weight_decay: decay coefficient, applied as ``weight_decay_mode`` says.
        ngrads: m, the window's length (>= 1; the papers use up to 1024).
        damp: the dampening ``damp`` of ``damp I + G^T G / m`` (> 0).
        weight_decay_mode: ``"l2"`` adds ``wd p`` to the gradient before it enters the window (the
            official M-FAC optimizer, IST-DASLab/M-FAC ``optim.py``); ``"decoupled"`` multiplies p by
            ``1 - wd`` (not by lr) before the update (ista-daslab-optimizers' ``DenseMFAC``).
        grads_dtype: storage of the window, ``"float32"`` or ``"bfloat16"`` (``"float64"``: torch backend
            only, for tests).  The products are fp32 (fp64 partial sums) whatever the storage; with bf16
            the Gram matrix is that of the stored (rounded) rows and the preconditioned vector is the
            exact fp32 gradient.
        backend: ``"auto"`` (cpu kernel for CPU tensors, triton for CUDA tensors, else torch), ``"cpu"``,
            ``"triton"`` or ``"torch"`` (:mod:`fastopt.reference.mfac`).  The kernels take contiguous
            fp32 params and grads; ``auto`` falls back to torch otherwise.

    Matches the official codes step for step with one param group: ``momentum=0,
    weight_decay_mode="decoupled"`` is ista-daslab-optimizers 1.1.15's ``DenseMFAC(lr, weight_decay,
    ngrads, damp)``; ``weight_decay_mode="l2"`` is IST-DASLab/M-FAC's ``MFAC`` (same formulas; its
    ``sparse`` mode and multi-GPU split are not provided).  Differences: the window, K and W are per
    param group (the official codes keep one window over all groups); a param whose grad is None
    contributes a zero gradient (and is still updated) while any param of its group has one (the
    official codes drop it from the flattened vector, which misaligns the window); the m x m algebra is
    fp64 (the official codes use fp32 with an unpivoted LU per step, O(m^3)).  No closure-free AMP
    unscaling: unscale gradients first (``GradScaler.unscale_``).

    State (per group, under its first param; plain tensors, so ``torch.load(weights_only=True)`` works
    and a ``state_dict`` round trip is exact): ``step`` (fp32 CPU scalar), ``grads`` (m, d) window,
    ``gram`` and ``inv`` (m, m) fp64, ``damp`` (fp64 CPU scalar: the damp ``inv`` was built for),
    ``momentum_buffer`` (d,) when momentum > 0.
    """

    def __init__(self, params: Params, lr: float = 1e-3, momentum: float = 0.0, weight_decay: float = 0.0,
                 ngrads: int = 1024, damp: float = 1e-5, *, weight_decay_mode: str = "l2",
                 grads_dtype: Union[str, torch.dtype] = "float32", backend: str = "auto") -> None:
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, ngrads=ngrads, damp=damp,
                        weight_decay_mode=weight_decay_mode, grads_dtype=_dtype_name(grads_dtype), backend=backend)
        self._check_hyper(defaults, "")
        super().__init__(params, defaults)

    # -- validation -------------------------------------------------------------------------------------
    @staticmethod
    def _check_hyper(group, where):
        def bad(name, what):
            raise ValueError(f"MFAC: {name} {what}{where}, got {group[name]!r}")
        lr = group["lr"]
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not (math.isfinite(lr) and lr >= 0):
            bad("lr", "must be a finite float >= 0")
        m = group["momentum"]
        if not isinstance(m, (int, float)) or not 0.0 <= m < 1.0:
            bad("momentum", "must be in [0, 1)")
        wd = group["weight_decay"]
        if not isinstance(wd, (int, float)) or not (math.isfinite(wd) and wd >= 0):
            bad("weight_decay", "must be a finite float >= 0")
        n = group["ngrads"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            bad("ngrads", "must be an int >= 1")
        d = group["damp"]
        if not isinstance(d, (int, float)) or not (math.isfinite(d) and d > 0):
            bad("damp", "must be a finite float > 0")
        if group["weight_decay_mode"] not in ("l2", "decoupled"):
            bad("weight_decay_mode", "must be 'l2' or 'decoupled'")
        group["grads_dtype"] = _dtype_name(group["grads_dtype"])
        try:
            _backend.check_backend_name(group["backend"])
        except ValueError as exc:
            raise ValueError(f"MFAC: {exc}{where}") from None
        if group["backend"] == "cuda":
            raise _backend.BackendUnavailableError("MFAC: no 'cuda' kernel; use backend='triton', 'cpu', 'torch' "
                                                   "or 'auto'")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Add a param group (its params are flattened into one window of their own); checks its hyperparameters."""
        full = dict(self.defaults, **{k: v for k, v in param_group.items() if k != "params"})
        self._check_hyper(full, " (param group)")
        param_group = dict(param_group)
        if "grads_dtype" in param_group:
            param_group["grads_dtype"] = full["grads_dtype"]
        super().add_param_group(param_group)

    @staticmethod
    def _check_params(params, grads, where):
        dev = params[0].device
        dtype = params[0].dtype
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"MFAC: params must be float32 (or float64 on the torch backend){where}, got {dtype}")
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.dtype != dtype:
                raise TypeError(f"MFAC: params[{i}] is {p.dtype}, params[0] {dtype}: one dtype per group{where}")
            if p.device != dev:
                raise ValueError(f"MFAC: params[{i}] is on {p.device}, params[0] on {dev}{where}")
            if g is None:
                continue
            if g.is_sparse:
                raise TypeError(f"MFAC: sparse gradients are not supported (params[{i}]){where}")
            if g.dtype != p.dtype or g.shape != p.shape or g.device != p.device:
                raise ValueError(f"MFAC: params[{i}].grad is {g.dtype}{tuple(g.shape)} on {g.device}, the param "
                                 f"{p.dtype}{tuple(p.shape)} on {p.device}{where}")

    @staticmethod
    def _check_state(state, group, d, device, where):
        if not state:
            return
        m = group["ngrads"]
        wdt = _WINDOW_DTYPES[group["grads_dtype"]]
        want = {"grads": ((m, d), wdt), "gram": ((m, m), torch.float64), "inv": ((m, m), torch.float64),
                "damp": ((), torch.float64)}  # (damp: a CPU scalar, read on the host without a device sync)
        for key, (shape, dtype) in want.items():
            t = state.get(key)
            if not isinstance(t, Tensor) or tuple(t.shape) != shape or t.dtype != dtype:
                got = "missing" if t is None else (f"{t.dtype}{tuple(t.shape)}" if isinstance(t, Tensor) else type(t))
                raise ValueError(f"MFAC: state {key!r}{where} must be {dtype}{shape} (ngrads={m}, "
                                 f"grads_dtype={group['grads_dtype']}, d={d}), got {got}; a window cannot change "
                                 "its length, dtype or params: make a new optimizer")
            if t.device != (torch.device("cpu") if key == "damp" else device):
                raise ValueError(f"MFAC: state {key!r}{where} is on {t.device}, the params on {device}")
        step = state.get("step")
        if not isinstance(step, Tensor) or step.numel() != 1:
            raise ValueError(f"MFAC: state 'step'{where} must be a one-element tensor")
        mb = state.get("momentum_buffer")
        if mb is not None and (not isinstance(mb, Tensor) or tuple(mb.shape) != (d,) or mb.device != device):
            raise ValueError(f"MFAC: state 'momentum_buffer'{where} must be a ({d},) tensor on {device}")

    def _resolve(self, group, params, grads, window_dtype):
        device = params[0].device
        reason = None
        if window_dtype not in (torch.float32, torch.bfloat16):
            reason = f"a {window_dtype} window"
        elif params[0].dtype != torch.float32:
            reason = f"{params[0].dtype} params"
        elif not all(p.is_contiguous() for p in params) or not all(g is None or g.is_contiguous() for g in grads):
            reason = "non-contiguous params or grads"
        return _backend.resolve(group["backend"], device, torch.float32, op="mfac", reason=reason, name="MFAC")

    # -- step -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """One M-FAC step of every param group that has a gradient (validates everything first)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        plans = []
        for gi, group in enumerate(self.param_groups):
            where = f" (param group {gi})"
            params = list(group["params"])
            grads = [p.grad for p in params]
            if not params or all(g is None for g in grads):
                continue
            self._check_hyper(group, where)
            self._check_params(params, grads, where)
            d = sum(p.numel() for p in params)
            state = self.state[params[0]]
            self._check_state(state, group, d, params[0].device, where)
            wdt = _WINDOW_DTYPES[group["grads_dtype"]]
            backend = self._resolve(group, params, grads, wdt)
            plans.append((group, params, grads, d, wdt, backend))
        for plan in plans:
            self._step_group(*plan)
        return loss

    def _step_group(self, group, params, grads, d, wdt, backend):
        p0 = params[0]
        dev = p0.device
        m, damp = group["ngrads"], float(group["damp"])
        state = self.state[p0]
        if not state:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["grads"] = torch.zeros((m, d), dtype=wdt, device=dev)
            state["gram"] = torch.zeros((m, m), dtype=torch.float64, device=dev)
            state["inv"] = torch.eye(m, dtype=torch.float64, device=dev) / (m * damp)
            state["damp"] = torch.tensor(damp, dtype=torch.float64)
        momentum = float(group["momentum"])
        acc = ref.acc_dtype_of(state["grads"])
        if momentum > 0 and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros(d, dtype=acc, device=dev)
        grads = [g if g is not None else torch.zeros_like(p, memory_format=torch.contiguous_format)
                 for p, g in zip(params, grads)]
        wd = float(group["weight_decay"])
        wd_l2 = wd if group["weight_decay_mode"] == "l2" else 0.0
        wd_dec = wd if group["weight_decay_mode"] == "decoupled" else 0.0
        t = int(state["step"].item()) + 1
        slot, nrows = (t - 1) % m, min(t, m)
        window = state["grads"]
        # pass 1: window[slot] <- g, dots
        if backend == "torch":
            dots_x, dots_k = ref.mfac_window_dots_reference(window, slot, nrows, params, grads, wd_l2)
        else:
            from .. import _ops
            dots_x = torch.empty(m, dtype=torch.float64, device=dev)
            dots_k = torch.empty(m, dtype=torch.float64, device=dev) if wdt != torch.float32 else None
            _ops.mfac_dots(window, params, grads, dots_x, dots_k, slot, nrows, wd_l2, backend)
            if dots_k is None:
                dots_k = dots_x
        # m x m: K row/column, W, coefficients (fp64)
        gram, inv = state["gram"], state["inv"]
        gram[slot, :] = dots_k
        gram[:, slot] = dots_k
        if t % m == 0 or float(state["damp"]) != damp:
            inv.copy_(ref.mfac_refresh_inverse(gram, m, damp))
            state["damp"].fill_(damp)
        else:
            ref.mfac_replace_inverse_(inv, gram, slot, m, damp)
        coef = ref.mfac_coefficients(inv, dots_x, damp).to(acc)
        mb = state.get("momentum_buffer") if momentum > 0 else None
        # pass 2: u, momentum, decay, update
        if backend == "torch":
            ref.mfac_update_reference(window, nrows, coef, params, grads, mb, lr=float(group["lr"]), damp=damp,
                                      momentum=momentum, wd_l2=wd_l2, wd_decoupled=wd_dec)
        else:
            from .. import _ops
            _ops.mfac_update(window, params, grads, mb, coef.contiguous(), nrows, float(group["lr"]), damp,
                             momentum, wd_l2, wd_dec, backend)
        state["step"] += 1

    # -- checkpoints ----------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load a state dict; the window, Gram, inverse and momentum keep their saved dtypes (torch's loader
        would cast them to the params' dtype), so a round trip is exact.  Checked before anything changes."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"MFAC: the state dict has {len(groups)} param groups, the optimizer "
                             f"{len(self.param_groups)}")
        keep = {}
        for gi, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(f"MFAC: param group {gi} has {len(group['params'])} params, the state dict "
                                 f"{len(saved['params'])}")
            merged = dict(saved)
            self._check_hyper(merged, f" (saved param group {gi})")
            if not group["params"]:
                continue
            d = sum(p.numel() for p in group["params"])
            for pid, p in zip(saved["params"], group["params"]):
                st = state_dict["state"].get(pid)
                if st is None:
                    continue
                if p is not group["params"][0]:
                    raise ValueError(f"MFAC: state of param {pid} (not the first of group {gi}): not an MFAC "
                                     "state dict")
                moved = {k: (v.to(p.device) if isinstance(v, Tensor) and k not in ("step", "damp") else v)
                         for k, v in st.items()}
                if isinstance(moved.get("damp"), Tensor):
                    moved["damp"] = moved["damp"].cpu()
                self._check_state(moved, merged, d, p.device, f" (saved param group {gi})")
                keep[id(p)] = (p, moved)
        super().load_state_dict(state_dict)
        for p, moved in keep.values():
            st = self.state[p]
            for k in _STATE_KEYS:
                if k in moved:
                    st[k] = moved[k].detach().clone() if k not in ("step", "damp") else moved[k].detach().clone().cpu()
