"""The zoo's optimizers whose step needs per-tensor or per-row statistics: LAMB (trust ratio),
SGD-SaI (g-SNR at the first step), AdamP and SGDP (projection).  They run the generic elementwise op
in two kernel calls per bucket -- a reduce pass (phase 1: moments and per-row sums) and the update
(phase 0) -- with a few torch ops on the small sums in between, on the device (no host sync).

Papers: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes" (ICLR
2020); Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You Need" (2024); Heo
et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights" (ICLR 2021).
"""
import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..reference.adamp import adamp_reference, sgdp_reference
from ..reference.lamb import SCALAR_STATE_NAMES as LAMB_SCALARS
from ..reference.lamb import lamb_reference
from ..reference.lion import skipped
from ..reference.sgdsai import gsnr_of, sgdsai_reference
from . import functional as F
from .functional import elementwise_unchecked
from .lion import check_betas
from .zoo import _COMMON_DOC, _flags, _ZooOptimizer


def _lr64(lr, device):
    """``lr`` (a float or a one-element tensor of any shape) as an fp64 0-dim tensor on ``device``."""
    return torch.as_tensor(lr, dtype=torch.float64).reshape(()).to(device)


def _steps(states, device):
    return torch.stack([s["step"] for s in states]).to(device=device, dtype=torch.float64) + 1.0


def _keep_if_skipped(found_inf, new, old):
    """``new``, or ``old`` where AMP skipped the step (no host sync)."""
    return new if found_inf is None else torch.where(found_inf != 0, old, new)


class Lamb(_ZooOptimizer):
    r"""LAMB: Adam directions rescaled per tensor by the trust ratio ``min(|p|, clamp) / |u|``.

    Drop-in for ``pytorch_optimizer.Lamb`` (arguments, state names, the ``clamp`` trust-ratio bound
    that upstream keeps as a class attribute, ``adam_debias``).  ``pre_norm`` with ``max_grad_norm``
    scales the gradients by their global norm first (over the params of one (device, dtype) bucket;
    upstream: over every group).  Equations: :func:`fastopt.reference.lamb.lamb_reference`.
    """ + _COMMON_DOC

    OP = "lamb"
    STATE_NAMES = ("exp_avg", "exp_avg_sq")
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "grad_averaging", "max_grad_norm",
                   "adam", "pre_norm", "eps", "adam_debias", "clamp")
    REFERENCE = staticmethod(lamb_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, grad_averaging=True, max_grad_norm=1.0, adam=False, pre_norm=False, eps=1e-6,
                 adam_debias=False, clamp=10.0, *, maximize=False, foreach=None, stochastic_rounding=False,
                 master_weights=False, seed=0, backend="auto"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay,
                                      grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adam=adam,
                                      pre_norm=pre_norm, eps=eps, adam_debias=adam_debias, clamp=clamp,
                                      maximize=maximize, foreach=foreach, stochastic_rounding=stochastic_rounding,
                                      master_weights=master_weights, seed=seed, backend=backend))

    def _check_group(self, group):
        self._check_common(group)
        F.check_hyper("max_grad_norm", group["max_grad_norm"])
        F.check_hyper("clamp", group["clamp"])

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        for name in LAMB_SCALARS:
            state[name] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        b3 = 1.0 - b1 if group["grad_averaging"] else 1.0
        return (b1, b2, b3, float(group["weight_decay"]), float(group["eps"])), _flags(group)

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, n, eps = params[0].device, len(params), float(group["eps"])
        call = dict(lr=group["lr"], maximize=group["maximize"], found_inf=found_inf, backend=backend, device=device)
        if group["pre_norm"] and float(group["max_grad_norm"]) != 0.0:
            # the global norm of the (unscaled) gradients, by the clip op's reduce pass
            sums = torch.zeros((n, 4), dtype=torch.float32, device=device)
            elementwise_unchecked("clip", grads, grads, [], [], (), 0, **{**call, "maximize": False},
                                  grad_scale=None, phase=1, reduce_out=sums)
            sq = sums[:, 0].sum()
            if grad_scale is not None:
                sq = sq / (grad_scale * grad_scale)
            gscale = torch.clamp(float(group["max_grad_norm"]) / (sq.sqrt() + eps), max=1.0)
            grad_scale = (grad_scale if grad_scale is not None else torch.ones((), device=device)) / gscale
        hyper, flags = self._native_hyper(group)
        lists = [s[name] for name in self.STATE_NAMES for s in states]
        steps = [s["step"] for s in states]
        sums = torch.zeros((n, 4), dtype=torch.float32, device=device)
        elementwise_unchecked(self.OP, params, grads, lists, steps, hyper, flags, grad_scale=grad_scale,
                              phase=1, reduce_out=sums, **call)
        b1 = float(group["betas"][0])
        lr64 = _lr64(group["lr"], device)
        step_size = lr64 if group["adam_debias"] else lr64 / (1.0 - b1 ** _steps(states, device))
        wn = sums[:, 0].sqrt().clamp(min=0.0, max=float(group["clamp"]))
        un = sums[:, 1].sqrt()
        trust = torch.where((wn != 0) & (un != 0), wn / (un + eps), torch.ones_like(wn))
        row = torch.zeros((n, 4), dtype=torch.float32, device=device)
        row[:, 0] = step_size.float() * (torch.ones_like(trust) if group["adam"] else trust)
        for name, value in zip(LAMB_SCALARS, (wn, un, trust)):
            olds = [s[name] for s in states]
            torch._foreach_copy_(olds, list(_keep_if_skipped(found_inf, value, torch.stack(olds)).unbind()))
        elementwise_unchecked(self.OP, params, grads, lists, steps, hyper, flags, grad_scale=grad_scale,
                              phase=0, row_coef=row, seed=group["seed"],
                              stochastic=self._stochastic(group, params[0]), **call)


class SGDSaI(_ZooOptimizer):
    r"""SGD-SaI: SGD with momentum, each tensor's learning rate scaled by the gradient signal-to-noise
    ratio ``|g| / std(g)`` of its first step (state ``gsnr``, kept for the run).

    Drop-in for ``pytorch_optimizer.SGDSaI``.  The first step computes the g-SNRs with torch ops (once
    per run); every step is one fused kernel.  Equations:
    :func:`fastopt.reference.sgdsai.sgdsai_reference`.
    """ + _COMMON_DOC

    OP = "sgdsai"
    STATE_NAMES = ("momentum_buffer",)
    HYPER_NAMES = ("momentum", "weight_decay", "weight_decouple", "eps")
    REFERENCE = staticmethod(sgdsai_reference)

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=1e-2, weight_decouple=True, eps=1e-8, *,
                 maximize=False, foreach=None, stochastic_rounding=False, master_weights=False, seed=0,
                 backend="auto"):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, eps=eps, maximize=maximize, foreach=foreach,
                                      stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                                      seed=seed, backend=backend))

    def _check_group(self, group):
        F.check_hyper("learning rate", group["lr"])
        F.check_hyper("momentum value", group["momentum"], high=1.0)
        F.check_hyper("weight_decay value", group["weight_decay"])
        F.check_hyper("epsilon value", group["eps"])
        if not group["weight_decouple"] and group["weight_decay"] != 0 and group["momentum"] > 0:
            raise ValueError("SGDSaI: weight_decouple=False with momentum > 0 is not supported (upstream adds "
                             "wd*p after the momentum buffer used the gradient, so the decay has no effect)")

    def _state_names(self, group):
        return self.STATE_NAMES if group["momentum"] > 0 else ()

    def _op_name(self, group):
        return "sgdsai" if group["momentum"] > 0 else "sgdsai_plain"

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        state["gsnr"] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _native_hyper(self, group):
        return (float(group["momentum"]), float(group["weight_decay"])), _flags(group)

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, eps = params[0].device, float(group["eps"])
        # The g-SNR of each tensor's first step: the step count is read on the host once per (step,
        # gsnr) pair of state tensors, so the steps after the first never sync.  `_gsnr_known` maps
        # each step tensor checked to the gsnr tensor it was checked with, weakly (by identity, never
        # by a recyclable id): a state made anew (opt.state.clear(), load_state_dict, a replaced step
        # or gsnr) is checked again.
        known = self.__dict__.get("_gsnr_known")
        if not isinstance(known, WeakIdKeyDictionary):
            known = self._gsnr_known = WeakIdKeyDictionary()
        unknown = [(g, s) for g, s in zip(grads, states) if known.get(s["step"]) is not s["gsnr"]]
        if unknown and not skipped(found_inf):
            for g, s in unknown:
                if float(s["step"]) == 0.0:
                    g32 = g.float() if grad_scale is None else g.float() / grad_scale
                    s["gsnr"].copy_(gsnr_of(g32, eps))
                known[s["step"]] = s["gsnr"]
        lr64 = _lr64(group["lr"], device)
        row = torch.zeros((len(params), 4), dtype=torch.float32, device=device)
        row[:, 0] = (lr64 * torch.stack([s["gsnr"] for s in states]).double()).float()
        hyper, flags = self._native_hyper(group)
        lists = [s[name] for name in self._state_names(group) for s in states]
        elementwise_unchecked(self._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags,
                              lr=group["lr"], maximize=group["maximize"], grad_scale=grad_scale,
                              found_inf=found_inf, backend=backend, device=device, row_coef=row,
                              seed=group["seed"], stochastic=self._stochastic(group, params[0]))


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
        """Per-row tensor ids, rows per tensor and fp32 thresholds, cached per bucket layout."""
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
            if len(cache) > 32:
                cache.clear()
            cache[key] = (rows, multi, tid, chan.to(device), layer.to(device))
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
            if op != self.OP:
                row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
                row[:, 0] = 1.0
                row[:, 2] = (1.0 - self._wd_eff(group, device)).float()
                elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, row_coef=row, **sr, **call)
                continue
            rows, multi, tid, chan_scale, layer_scale = self._layout(ps, device)
            sums = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
            elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, phase=1, reduce_out=sums, rows=rows,
                                  **call)
            row = self._coefficients(group, sums, len(ps), multi, tid, chan_scale, layer_scale, eps, device)
            elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, phase=0, row_coef=row, rows=rows, **sr,
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
        ratio = torch.where(projected, torch.tensor(float(group["wd_ratio"]), dtype=torch.float64, device=device),
                            torch.tensor(1.0, dtype=torch.float64, device=device))
        row = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
        row[:, 0] = torch.where(pr_r, den, torch.ones_like(den))
        row[:, 1] = torch.where(pr_r, radial, torch.zeros_like(radial))
        row[:, 2] = (1.0 - wd_eff * ratio).float()[tid]
        return row


class AdamP(_Projected):
    r"""AdamP: Adam whose update loses its radial component on scale-invariant weights (those whose
    gradient is nearly orthogonal to the weight, per channel or per layer), with the weight decay
    scaled by ``wd_ratio`` there.  Drop-in for ``pytorch_optimizer.AdamP`` (and the official ``adamp``
    package up to its eps placement).  Equations: :func:`fastopt.reference.adamp.adamp_reference`.
    """ + _COMMON_DOC

    OP = "adamp"
    STATE_NAMES = ("exp_avg", "exp_avg_sq")
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "delta", "wd_ratio", "nesterov", "eps",
                   "adam_debias")

    REFERENCE = staticmethod(adamp_reference)

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, delta=0.1, wd_ratio=0.1, nesterov=False, eps=1e-8, adam_debias=False, *,
                 maximize=False, foreach=None, stochastic_rounding=False, master_weights=False, seed=0,
                 backend="auto"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, eps=eps, adam_debias=adam_debias,
                                      maximize=maximize, foreach=foreach, stochastic_rounding=stochastic_rounding,
                                      master_weights=master_weights, seed=seed, backend=backend))

    def _check_group(self, group):
        super()._check_group(group)
        check_betas(group["betas"])

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        flags = (1 if group["nesterov"] else 0) | (16 if group["adam_debias"] else 0)
        return (b1, b2, float(group["eps"])), flags


class SGDP(_Projected):
    r"""SGDP: SGD with momentum and AdamP's projection.  Drop-in for ``pytorch_optimizer.SGDP`` (the
    official ``adamp.SGDP`` also projects its momentum buffer in place without nesterov; this one, like
    pytorch_optimizer and the paper, does not).  Equations: :func:`fastopt.reference.adamp.sgdp_reference`.
    """ + _COMMON_DOC

    OP = "sgdp"
    STATE_NAMES = ("momentum",)
    HYPER_NAMES = ("momentum", "dampening", "weight_decay", "weight_decouple", "fixed_decay", "delta", "wd_ratio",
                   "nesterov", "eps")

    REFERENCE = staticmethod(sgdp_reference)

    def __init__(self, params, lr=1e-3, momentum=0.0, dampening=0.0, weight_decay=0.0, weight_decouple=True,
                 fixed_decay=False, delta=0.1, wd_ratio=0.1, nesterov=False, eps=1e-8, *, maximize=False,
                 foreach=None, stochastic_rounding=False, master_weights=False, seed=0, backend="auto"):
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, eps=eps, maximize=maximize,
                                      foreach=foreach, stochastic_rounding=stochastic_rounding,
                                      master_weights=master_weights, seed=seed, backend=backend))

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
        return (float(group["momentum"]), float(group["dampening"])), (1 if group["nesterov"] else 0)
