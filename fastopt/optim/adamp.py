"""AdamP and SGDP (Heo et al., ICLR 2021), fused: drop-ins for ``pytorch_optimizer.AdamP`` / ``SGDP``;
the cosine similarity and projection are a reduce pass."""
from typing import Optional, Tuple, Union

import torch

from .._opspec import FLAGS, OPS, native_args
from ..reference.adamp import adamp_reference, sgdp_reference
from . import functional as F
from .functional import Params, elementwise_unchecked
from ._pytorch_optimizer import (_COMMON_DOC, _ZooOptimizer, _lr64, check_adanorm, check_betas, constructor_defaults,
                                 gradient_row_means)


class _Projected(_ZooOptimizer):
    """AdamP / SGDP: phase 1 updates the moments and sums (g.p, g.g, p.p, p.d) per row of every tensor
    (rows = ``p.shape[0]`` for 2+ dimensions); the projection coefficients are computed from those sums
    for all tensors of the bucket at once (a handful of torch ops, no host sync); phase 0 steps."""

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])
        F.check_hyper("delta", group["delta"])
        F.check_hyper("wd_ratio", group["wd_ratio"])
        if not group["weight_decouple"] and group["weight_decay"] != 0:
            raise ValueError(f"{type(self).__name__}: weight_decouple=False is not supported (upstream adds wd*p "
                             "to the gradient after it has been used, so L2 decay does not change the step)")

    def _decay_per_unit(self, group):
        """The weight decay per unit ratio, before the learning rate (float)."""
        return float(group["weight_decay"])

    def _layout(self, params, device):
        """Per-row tensor ids, rows per tensor, fp32 thresholds and fp32 numels, cached per bucket layout (the
        steady-state step copies nothing host-to-device)."""
        key = (tuple(tuple(p.shape) for p in params), str(device))
        cache = self.__dict__.setdefault("_layouts", {})
        if key not in cache:
            import math

            rows = [p.shape[0] if p.dim() > 1 and p.numel() > 0 else 1 for p in params]
            multi = torch.tensor([p.dim() > 1 and p.numel() > 0 for p in params], device=device)
            tid = torch.repeat_interleave(torch.arange(len(params)), torch.tensor(rows)).to(device)
            numel = [max(p.numel(), 1) for p in params]
            chan = torch.tensor([1.0 / math.sqrt(n // r) for n, r in zip(numel, rows)], dtype=torch.float64)
            layer = torch.tensor([1.0 / math.sqrt(n) for n in numel], dtype=torch.float64)
            numels = torch.tensor([float(p.numel()) for p in params], dtype=torch.float32)
            if len(cache) > 32:
                cache.clear()
            cache[key] = (rows, multi, tid, chan.to(device), layer.to(device), numels.to(device))
        return cache[key]

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, eps = params[0].device, float(group["eps"])
        hyper, flags = self._native_hyper(group)
        sr = dict(seed=group["seed"], stochastic=self._stochastic(group, params[0]))
        call = dict(lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf,
                    backend=backend, device=device)
        # Tensors of fewer than two dimensions are never projected: one pass ("<op>_flat").  The
        # stochastic-rounding stream numbers tensors within each of the two calls (_sr_indices).
        flat = [i for i, p in enumerate(params) if self._is_flat(p)]
        proj = [i for i, p in enumerate(params) if not self._is_flat(p)]
        for idx, op in ((flat, self.OP + "_flat"), (proj, self.OP)):
            if not idx:
                continue
            ps, gs, sts = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
            lists = [s[name] for name in self.STATE_NAMES for s in sts]
            steps = [s["step"] for s in sts]
            if group.get("cautious") and self.OP == "adamp":  # (pytorch_optimizer's SGDP has no cautious)
                self._run_cautious(group, ps, gs, lists, steps, op == self.OP, hyper, flags, eps, device, sr, call)
                continue
            if op != self.OP:
                row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
                row[:, 0].fill_(1.0)
                row[:, 2] = (1.0 - self._wd_eff(group, device)).float()
                elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, row_coef=row, **sr, **call)
                continue
            rows, multi, tid, chan_scale, layer_scale, numels = self._layout(ps, device)
            sums = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
            gc = None  # use_gc (AdamP): both passes subtract the row means, row coefficient 3
            if group.get("use_gc"):
                gc = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
                gc[:, 3] = gradient_row_means(self, ps, gs, rows, maximize=group["maximize"], grad_scale=grad_scale,
                                              found_inf=found_inf, backend=backend, device=device)
            elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, phase=1, reduce_out=sums, rows=rows,
                                  row_coef=gc, **call)
            row = self._coefficients(group, sums, len(ps), multi, tid, chan_scale, layer_scale, eps, device)
            if gc is not None:
                row[:, 3] = gc[:, 3]
            elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, phase=0, row_coef=row, rows=rows, **sr,
                                  **call)

    def _run_cautious(self, group, ps, gs, lists, steps, projected, hyper, flags, eps, device, sr, call):
        """AdamP's cautious mask (no use_gc; see functors/adamp.h): phase 1 updates the moments and sums
        (g.p, g.g, p.p, count of m g > 0) per row; scale = fp32(numel) / (count + 1) per tensor, as
        pytorch_optimizer's apply_cautious; for projected tensors a second reduce pass sums p.d with
        the masked direction; phase 0 steps with the scale in row coefficient 3.  Tensors of fewer than
        two dimensions run the same op, never projected (the flat op cannot count the mask)."""
        rows, multi, tid, chan_scale, layer_scale, numels = self._layout(ps, device)
        sums = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
        elementwise_unchecked(self.OP, ps, gs, lists, steps, hyper, flags, phase=1, reduce_out=sums, rows=rows,
                              **call)
        count = torch.zeros(len(ps), dtype=torch.float32, device=device).index_add_(0, tid, sums[:, 3])
        scale = (numels / (count + 1.0))[tid]
        if projected:
            coef = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
            coef[:, 3] = scale
            pd = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
            elementwise_unchecked(self.OP, ps, gs, lists, steps, hyper, flags | FLAGS["cautious_pd"], phase=1, reduce_out=pd,
                                  rows=rows, row_coef=coef, **call)
            sums[:, 3] = pd[:, 3]
            row = self._coefficients(group, sums, len(ps), multi, tid, chan_scale, layer_scale, eps, device)
        else:
            row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
            row[:, 0].fill_(1.0)
            row[:, 2] = (1.0 - self._wd_eff(group, device)).float()
        row[:, 3] = scale
        elementwise_unchecked(self.OP, ps, gs, lists, steps, hyper, flags, phase=0, row_coef=row, rows=rows, **sr,
                              **call)

    @staticmethod
    def _is_flat(p):
        return p.dim() < 2 or p.numel() == 0

    def _sr_indices(self, params):
        counts, out = [0, 0], []
        for p in params:
            k = 0 if self._is_flat(p) else 1
            out.append(counts[k])
            counts[k] += 1
        return out

    def _wd_eff(self, group, device):
        """The decay per unit ratio times (fixed_decay ? 1 : lr), fp64 on the device."""
        lr64 = _lr64(group["lr"], device)
        return self._decay_per_unit(group) * (torch.ones_like(lr64) if group["fixed_decay"] else lr64)

    def _coefficients(self, group, sums, n, multi, tid, chan_scale, layer_scale, eps, device):
        s_gp, s_gg, s_pp, s_pd = sums.unbind(1)

        def cos(gp, gg, pp):
            return (gp / (gg.sqrt().clamp_min(eps) * pp.sqrt().clamp_min(eps))).abs()

        delta = float(group["delta"])
        thr_c = (delta * chan_scale).float()
        thr_l = (delta * layer_scale).float()
        cmax = torch.zeros(n, dtype=torch.float32, device=device).scatter_reduce(
            0, tid, cos(s_gp, s_gg, s_pp), "amax", include_self=False)
        tot = torch.zeros((n, 4), dtype=torch.float32, device=device).index_add_(0, tid, sums)
        channel = multi & (cmax < thr_c)
        layer = multi & (cos(tot[:, 0], tot[:, 1], tot[:, 2]) < thr_l)
        projected = channel | layer
        ch_r, pr_r = channel[tid], projected[tid]
        den = torch.where(ch_r, s_pp.sqrt(), tot[:, 2].sqrt()[tid]) + eps
        radial = torch.where(ch_r, s_pd, tot[:, 3][tid]) / den
        wd_eff = self._wd_eff(group, device)
        ratio = torch.full((n,), float(group["wd_ratio"]), dtype=torch.float64, device=device).masked_fill_(~projected, 1.0)
        row = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
        row[:, 0] = torch.where(pr_r, den, torch.ones_like(den))
        row[:, 1] = torch.where(pr_r, radial, torch.zeros_like(radial))
        row[:, 2] = (1.0 - wd_eff * ratio).float()[tid]
        return row


_PROJECTED_DOC = """
    Projection (2+-dim tensors): when the gradient is nearly orthogonal to the weight (cosine below
    ``delta / sqrt(row length)`` per channel, or ``delta / sqrt(numel)`` per layer), the direction
    ``d`` loses its radial component ``d <- d - p_n <p_n, d>`` (``p_n = p / (|p| + eps)`` per channel or
    layer) and the weight decay is scaled by ``wd_ratio``.  Paper: Heo et al., "AdamP: Slowing Down the
    Slowdown for Momentum Optimizers on Scale-invariant Weights" (ICLR 2021).  Fused as two kernel
    passes (moments and per-row sums, then the step) with the cosine tests on the device in between."""


class AdamP(_Projected):
    __doc__ = r"""AdamP: Adam whose update loses its radial component on scale-invariant weights, with the weight
    decay scaled by ``wd_ratio`` there.

    Update (per element, then the projection below)::

        g <- g - mean_row(g)                    [use_gc: 2+-dim tensors, mean over dims 1..]
        m <- lerp(m, g, 1-b1)      v <- b2 v + (1-b2) g^2
        n = m * [m g > 0] numel / (count + 1)   [cautious; else n = m]
        d = (nesterov ? lerp(n, g, 1-b1) : n) sqrt(1-b2^t) / (sqrt(v) + eps)
        p <- p (1 - wd (fixed_decay ? 1 : lr) ratio) - lr/(1-b1^t) d     (lr with adam_debias)
    """ + _PROJECTED_DOC + """

    Drop-in for ``pytorch_optimizer.AdamP`` (and the official ``adamp`` package up to its eps
    placement).  Equations: :func:`fastopt.reference.adamp.adamp_reference`.  State: ``exp_avg``,
    ``exp_avg_sq``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled weight decay (``weight_decouple=False``
            with ``weight_decay != 0`` raises ValueError: upstream's L2 term never reaches the step).
        delta, wd_ratio: the projection's threshold and the decay ratio on projected tensors.
        nesterov: Nesterov momentum.
        eps: as upstream.
        maximize: maximize the objective.
        foreach: accepted and ignored.
        adam_debias: do not divide the step size by ``1 - b1^t``.
        use_gc: gradient centralization (fused: one extra reduce pass over the gradients).
        cautious: the cautious mask on the momentum (fused: one or two extra reduce passes); together
            with ``use_gc`` on ``backend="torch"`` only (the kernel backends raise ValueError).
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).""" + _COMMON_DOC + "\n    "

    OP = "adamp"
    STATE_NAMES = OPS["adamp"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "delta", "wd_ratio", "nesterov", "eps",
                   "adam_debias", "use_gc", "cautious")

    REFERENCE = staticmethod(adamp_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
                 eps: float = 1e-8, maximize: bool = False, foreach: Optional[bool] = False, *,
                 adam_debias: bool = False, use_gc: bool = False, cautious: bool = False, adanorm: bool = False,
                 adanorm_r: float = 0.95, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        super()._check_group(group)
        check_betas(group["betas"])
        check_adanorm(type(self).__name__, group)

    def _check_bucket(self, group, params, backend):
        super()._check_bucket(group, params, backend)
        if group.get("cautious") and group.get("use_gc") and backend != "torch":
            raise ValueError(f"AdamP: cautious=True with use_gc=True runs on backend='torch' only, not {backend!r} "
                             "(the fused kernels run each of them alone); pass backend='torch'")

    def _native_hyper(self, group):
        b1, b2 = group["betas"]
        return native_args(self.OP, group, beta1=b1, beta2=b2, eps=group["eps"])


class SGDP(_Projected):
    __doc__ = r"""SGDP: SGD with momentum and AdamP's projection.

    Update (per element, then the projection below)::

        buf <- momentum buf + (1 - dampening) g
        d = nesterov ? momentum buf + g : buf
        p <- p (1 - wd (fixed_decay ? 1 : lr) ratio / (1 - momentum)) - lr d
    """ + _PROJECTED_DOC + """

    Drop-in for ``pytorch_optimizer.SGDP`` (the official ``adamp.SGDP`` also projects its momentum
    buffer in place without nesterov; this one, like pytorch_optimizer and the paper, does not).
    Equations: :func:`fastopt.reference.adamp.sgdp_reference`.  State: ``momentum``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        momentum, dampening, nesterov: as torch.optim.SGD.
        weight_decay, weight_decouple, fixed_decay: decoupled weight decay (see :class:`AdamP`).
        delta, wd_ratio: the projection's threshold and the decay ratio on projected tensors.
        eps: as upstream.
        maximize: maximize the objective.
        foreach: accepted and ignored.""" + _COMMON_DOC + "\n    "

    OP = "sgdp"
    STATE_NAMES = OPS["sgdp"].states
    HYPER_NAMES = ("momentum", "dampening", "weight_decay", "weight_decouple", "fixed_decay", "delta", "wd_ratio",
                   "nesterov", "eps")

    REFERENCE = staticmethod(sgdp_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, delta: float = 0.1, wd_ratio: float = 0.1, nesterov: bool = False,
                 eps: float = 1e-8, maximize: bool = False, foreach: Optional[bool] = False, *,
                 stochastic_rounding: bool = False, master_weights: bool = False, seed: int = 0,
                 backend: str = "auto") -> None:
        super().__init__(params, constructor_defaults(locals()))

    def _check_group(self, group):
        super()._check_group(group)
        F.check_hyper("momentum value", group["momentum"], high=1.0)
        F.check_hyper("dampening", group["dampening"], high=1.0)
        if group["momentum"] == 1.0 and group["weight_decay"] != 0:
            raise ValueError("SGDP: momentum=1 with weight decay is not supported (the decay is divided by "
                             "1 - momentum)")

    def _decay_per_unit(self, group):
        wd = float(group["weight_decay"])
        return wd / (1.0 - float(group["momentum"])) if wd != 0.0 else 0.0

    def _native_hyper(self, group):
        return native_args(self.OP, group, momentum=group["momentum"], dampening=group["dampening"])
