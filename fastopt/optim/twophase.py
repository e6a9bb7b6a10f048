"""The zoo's optimizers whose step needs per-tensor or per-row statistics: LAMB (trust ratio),
SGD-SaI (g-SNR at the first step), AdamP and SGDP (projection).  They run the generic elementwise op
in two kernel calls per bucket -- a reduce pass (phase 1: moments and per-row sums) and the update
(phase 0) -- with a few torch ops on the small sums in between, on the device (no host sync).

Papers: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes" (ICLR
2020); Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You Need" (2024); Heo
et al., "AdamP: Slowing Down the Slowdown for Momentum Optimizers on Scale-invariant Weights" (ICLR 2021).
"""
from typing import Optional, Tuple, Union

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ..reference.adamp import adamp_reference, sgdp_reference
from ..reference.lamb import SCALAR_STATE_NAMES as LAMB_SCALARS
from ..reference.lamb import lamb_reference
from ..reference.lion import skipped
from ..reference.sgdsai import gsnr_of, sgdsai_reference
from .._opspec import FLAGS, OPS, native_args
from . import functional as F
from .functional import elementwise_unchecked
from .lion import Params, check_adanorm, check_betas, check_unsupported, gradient_row_means
from .zoo import _COMMON_DOC, _ZooOptimizer


def _lr64(lr, device):
    """``lr`` (a float or a one-element tensor of any shape) as an fp64 0-dim tensor on ``device``."""
    return torch.as_tensor(lr, dtype=torch.float64).reshape(()).to(device)


def _steps(states, device):
    return torch.stack([s["step"] for s in states]).to(device=device, dtype=torch.float64) + 1.0


def _keep_if_skipped(found_inf, new, old):
    """``new``, or ``old`` where AMP skipped the step (no host sync)."""
    return new if found_inf is None else torch.where(found_inf != 0, old, new)


class Lamb(_ZooOptimizer):
    __doc__ = r"""LAMB: Adam directions rescaled per tensor by the trust ratio ``min(|p|, clamp) / |u|``.

    Update (per tensor; ``b3 = 1 - b1`` with ``grad_averaging``, else 1)::

        g <- g min(1, max_grad_norm / (|g|_global + eps))          [pre_norm]
        m <- b1 m + b3 g      v <- b2 v + (1-b2) g^2
        p <- p (1 - wd (fixed_decay ? 1 : lr))                      [weight_decouple]
        u = m / (sqrt(v) + eps) (+ wd p without weight_decouple)
        p <- p - lr/(1-b1^t) trust u,  trust = min(|p|, clamp) / (|u| + eps)  (1 if a norm is 0 or adam)

    Paper: You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes"
    (ICLR 2020).  Fused as two kernel passes (the norms, then the step).  State: ``exp_avg``,
    ``exp_avg_sq`` and the per-tensor scalars ``weight_norm``, ``adam_norm``, ``trust_ratio``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        betas: ``(b1, b2)``.
        weight_decay, weight_decouple, fixed_decay: decoupled or L2 weight decay.
        rectify: accepted; ``True`` raises ValueError (upstream's rectified LAMB is not implemented);
            ``degenerated_to_sgd`` and ``n_sma_threshold`` only matter with it and are accepted.
        grad_averaging: ``b3 = 1 - b1`` (else 1).
        max_grad_norm, pre_norm: global gradient-norm scaling before the step (with ``pre_norm``).
        adam: skip the trust ratio (plain Adam directions).
        eps: as upstream.
        foreach: accepted and ignored.
        maximize: maximize the objective.
        adam_debias: do not divide the step size by ``1 - b1^t``.
        adanorm, adanorm_r: accepted; ``adanorm=True`` raises ValueError (not implemented).
        clamp: the bound of the weight norm in the trust ratio (upstream: a class attribute, 10).""" + \
        _COMMON_DOC + """  ``pre_norm``'s global norm is over the params of one (device, dtype)
    bucket (upstream: over every group).
    """

    OP = "lamb"
    STATE_NAMES = OPS["lamb"].states
    HYPER_NAMES = ("betas", "weight_decay", "weight_decouple", "fixed_decay", "grad_averaging", "max_grad_norm",
                   "adam", "pre_norm", "eps", "adam_debias", "clamp")
    REFERENCE = staticmethod(lamb_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0, weight_decouple: bool = True,
                 fixed_decay: bool = False, rectify: bool = False, degenerated_to_sgd: bool = False,
                 n_sma_threshold: int = 5, grad_averaging: bool = True, max_grad_norm: float = 1.0,
                 adam: bool = False, pre_norm: bool = False, eps: float = 1e-6, foreach: Optional[bool] = None,
                 maximize: bool = False, *, adam_debias: bool = False, adanorm: bool = False,
                 adanorm_r: float = 0.95, clamp: float = 10.0, stochastic_rounding: bool = False,
                 master_weights: bool = False, seed: int = 0, backend: str = "auto") -> None:
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, rectify=rectify,
                                      degenerated_to_sgd=degenerated_to_sgd, n_sma_threshold=n_sma_threshold,
                                      grad_averaging=grad_averaging, max_grad_norm=max_grad_norm, adam=adam,
                                      pre_norm=pre_norm, eps=eps, foreach=foreach, maximize=maximize,
                                      adam_debias=adam_debias, adanorm=adanorm, adanorm_r=adanorm_r, clamp=clamp,
                                      stochastic_rounding=stochastic_rounding, master_weights=master_weights,
                                      seed=seed, backend=backend))

    def _check_group(self, group):
        self._check_common(group)
        F.check_hyper("max_grad_norm", group["max_grad_norm"])
        F.check_hyper("clamp", group["clamp"])
        check_unsupported(type(self).__name__, group, rectify=(
            False, "upstream's rectified LAMB takes the trust ratio of a rectified update; not implemented"))
        check_adanorm(type(self).__name__, group)

    def _init_state(self, group, p, state):
        super()._init_state(group, p, state)
        for name in LAMB_SCALARS:
            state[name] = torch.zeros((), dtype=torch.float32, device=p.device)

    def _native_hyper(self, group):
        b1, b2 = (float(b) for b in group["betas"])
        b3 = 1.0 - b1 if group["grad_averaging"] else 1.0
        return native_args(self.OP, group, beta1=b1, beta2=b2, beta3=b3, weight_decay=group["weight_decay"],
                           eps=group["eps"])

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
    __doc__ = r"""SGD-SaI: SGD with momentum, each tensor's learning rate scaled by the gradient signal-to-noise
    ratio of its first step (state ``gsnr``, kept for the run).

    Update (per tensor, ``gsnr`` from the first step's gradient)::

        buf <- lerp(buf, g, 1 - momentum)   (buf = g without momentum; + wd p there without weight_decouple)
        p   <- p (1 - lr wd) [weight_decouple]  -  lr gsnr buf

    Paper: Xu et al., "No More Adam: Learning Rate Scaling at Initialization is All You Need" (2024).
    The first step computes the g-SNRs with torch ops (once per run); every step is one fused kernel.
    Equations: :func:`fastopt.reference.sgdsai.sgdsai_reference`.  State: ``momentum_buffer``, ``gsnr``.

    Args:
        params: parameters or param groups.
        lr: learning rate (float or one-element tensor).
        momentum: momentum factor (0: no buffer).
        weight_decay, weight_decouple: decoupled or L2 weight decay (L2 with momentum > 0 raises
            ValueError: upstream's L2 term has no effect there).
        eps: added to the g-SNR's standard deviation.
        maximize: maximize the objective.
        foreach: accepted and ignored.""" + _COMMON_DOC + "\n    "

    OP = "sgdsai"
    STATE_NAMES = OPS["sgdsai"].states
    HYPER_NAMES = ("momentum", "weight_decay", "weight_decouple", "eps")
    REFERENCE = staticmethod(sgdsai_reference)

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-2, momentum: float = 0.9,
                 weight_decay: float = 1e-2, weight_decouple: bool = True, eps: float = 1e-8, maximize: bool = False,
                 foreach: Optional[bool] = None, *, stochastic_rounding: bool = False, master_weights: bool = False,
                 seed: int = 0, backend: str = "auto") -> None:
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
        return native_args(self._op_name(group), group, momentum=group["momentum"],
                           weight_decay=group["weight_decay"])

    def _run(self, group, params, grads, states, backend, grad_scale, found_inf):
        if backend == "torch":
            return super()._run(group, params, grads, states, backend, grad_scale, found_inf)
        device, eps = params[0].device, float(group["eps"])
        # The g-SNR of each tensor's first step: the step count is read on the host once per (step,
        # gsnr) pair of state tensors, so the steps after the first never sync.  `_gsnr_known` maps
        # each step tensor checked to the gsnr tensor it was checked with, weakly (by identity, never
        # by a recyclable id): a state made anew (opt.state.clear(), load_state_dict, a replaced step
        # or gsnr) is checked again.
        #
        # Under torch.compile neither the host read nor the weak dictionary can be traced: the g-SNR
        # of every tensor is computed at every step and kept only where the step count is 0 and AMP
        # did not skip the step (torch.where on the device; the same numbers, one more pass over
        # the gradients per compiled step).
        if torch.compiler.is_compiling():
            first = [s["step"] == 0 if found_inf is None else (s["step"] == 0) & (found_inf == 0) for s in states]
            new = [gsnr_of(g.float() if grad_scale is None else g.float() / grad_scale, eps) for g in grads]
            olds = [s["gsnr"] for s in states]
            torch._foreach_copy_(olds, [torch.where(f, n, o) for f, n, o in zip(first, new, olds)])
        else:
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
            if group.get("cautious") and self.OP == "adamp":  # (pytorch_optimizer's SGDP has no cautious)
                self._run_cautious(group, ps, gs, lists, steps, op == self.OP, hyper, flags, eps, device, sr, call)
                continue
            if op != self.OP:
                row = torch.zeros((len(ps), 4), dtype=torch.float32, device=device)
                row[:, 0] = 1.0
                row[:, 2] = (1.0 - self._wd_eff(group, device)).float()
                elementwise_unchecked(op, ps, gs, lists, steps, hyper, flags, row_coef=row, **sr, **call)
                continue
            rows, multi, tid, chan_scale, layer_scale = self._layout(ps, device)
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
        rows, multi, tid, chan_scale, layer_scale = self._layout(ps, device)
        sums = torch.zeros((len(tid), 4), dtype=torch.float32, device=device)
        elementwise_unchecked(self.OP, ps, gs, lists, steps, hyper, flags, phase=1, reduce_out=sums, rows=rows,
                              **call)
        count = torch.zeros(len(ps), dtype=torch.float32, device=device).index_add_(0, tid, sums[:, 3])
        numels = torch.tensor([float(p.numel()) for p in ps], dtype=torch.float32, device=device)
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
            row[:, 0] = 1.0
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
        ratio = torch.where(projected, torch.tensor(float(group["wd_ratio"]), dtype=torch.float64, device=device),
                            torch.tensor(1.0, dtype=torch.float64, device=device))
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
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay,
                                      weight_decouple=weight_decouple, fixed_decay=fixed_decay, delta=delta,
                                      wd_ratio=wd_ratio, nesterov=nesterov, eps=eps, maximize=maximize,
                                      foreach=foreach, adam_debias=adam_debias, use_gc=use_gc, cautious=cautious,
                                      adanorm=adanorm, adanorm_r=adanorm_r, stochastic_rounding=stochastic_rounding,
                                      master_weights=master_weights, seed=seed, backend=backend))

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
        return native_args(self.OP, group, momentum=group["momentum"], dampening=group["dampening"])
