"""Reference SGD-SaI step (Xu et al. 2024, "No More Adam: Learning Rate Scaling at Initialization is All
You Need", arXiv:2412.11768).

Matches ``pytorch_optimizer.SGDSaI`` (4.1.0; per-parameter and foreach paths) on fp32 tensors.

Per tensor, at its first step (t = 1, i.e. ``state["step"] == 0``), from the gradient g of that step
(unscaled; its sign does not matter), with n = numel::

    sigma = nan_to_num(std(g))   (unbiased, n - 1)   if g.dim() > 1 and g.shape[0] != 1, else 0
    gsnr  = ||g|| / (sigma + eps)  if sigma != 0  else ||g||             (kept for the whole run)

then every step::

    buf = buf + (1 - momentum)(g - buf)      if momentum > 0 (torch.lerp's formula), else buf = g
    buf = buf + wd p                         if not weight_decouple (only with momentum == 0, see below)
    p   = p (1 - lr wd)                      if weight_decouple
    p   = p - lr gsnr buf

Phase split (what a fused kernel does): after the first step the step is purely elementwise with the
per-tensor coefficient ``coef = fp32(lr * gsnr)``.  Only at t = 1, per tensor: phase A1 sums
``S1 = sum g`` and ``S2 = sum g^2``; then ``mean = S1 / n``; phase A2 sums ``M2 = sum (g - mean)^2``
(the two-pass variance, as torch.std; ``(S2 - S1^2/n)`` would cancel catastrophically when
``|mean| >> std``); between phases ``sigma = nan_to_num(sqrt(M2 / (n - 1)))`` (0 when not applicable),
``gsnr = sigma != 0 ? sqrt(S2) / (sigma + eps) : sqrt(S2)`` selected with ``torch.where`` (no sync).
Once per run, so a kernel backend may just as well run these torch ops.

State: ``STATE_NAMES = ("momentum_buffer",)`` -- present only when ``momentum > 0``, as upstream
(:func:`sgdsai_init_state` creates it when the group's momentum is > 0 or no group is given; the step
creates a missing one, as upstream does); the per-tensor fp32 0-dim scalar ``state["gsnr"]`` (upstream's
name; 0 until the first step); ``state["step"]``.

Upstream quirk, and what is unsupported (``ValueError``): upstream applies L2 decay
(``weight_decouple=False``) by adding ``wd p`` to the gradient *after* the momentum buffer has consumed
it, so with ``momentum > 0`` L2 decay has no effect; with ``momentum == 0`` the buffer *is* the gradient
and the decay takes effect.  This reference supports ``weight_decouple=False`` with ``momentum == 0`` and
raises for ``weight_decouple=False, weight_decay != 0, momentum > 0``.  Also unsupported: complex
parameters, sparse gradients.  (SGD-SaI has no fixed_decay option upstream.)

Deliberate differences from upstream: math is fp32 whatever the storage dtype (upstream stores gsnr in
the parameter dtype); the step counter is a per-tensor fp32 0-dim tensor (upstream: per group int); the
"first step" is ``state["step"] == 0`` (upstream: "gsnr not yet in state"; the same unless a state dict
is edited); gradients are never written to.
"""
import torch

from ._common import as_plain, check_inputs, init_state, prepare_grad, skipped

STATE_NAMES = ("momentum_buffer",)
SCALAR_STATE_NAMES = ("gsnr",)


def sgdsai_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: fp32 step counter, fp32 0-dim ``gsnr`` (0) and, when the
    group's momentum is > 0 (or ``group`` is None), a zeroed ``momentum_buffer``."""
    init_state(p, state, ())
    state["gsnr"] = torch.zeros((), dtype=torch.float32, device=p.device)
    if group is None or float(group.get("momentum", 0.9)) > 0.0:
        state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def gsnr_of(g, eps):
    """The gradient signal-to-noise ratio of an fp32 gradient (first-step scalar; no host sync)."""
    s2 = (g * g).sum()
    norm = s2.sqrt()
    n = g.numel()
    if g.dim() > 1 and g.shape[0] != 1:
        mean = g.sum() / n
        m2 = ((g - mean) * (g - mean)).sum()
        sigma = torch.nan_to_num(torch.sqrt(m2 / (n - 1)) if n > 1 else torch.full_like(m2, float("nan")))
        return torch.where(sigma != 0.0, norm / (sigma + eps), norm)
    return norm


def sgdsai_reference(params, grads, states, *, lr, momentum=0.9, weight_decay=1e-2, weight_decouple=True,
                     eps=1e-8, maximize=False, grad_scale=None, found_inf=None):
    """One SGD-SaI step, in place (equations and phase split: module docstring).  ``states[i]`` is the
    state dict of ``params[i]``; ``lr`` may be a float or a one-element tensor (of any shape, used as a
    scalar); if ``found_inf`` is nonzero nothing changes."""
    momentum, wd, eps = float(momentum), float(weight_decay), float(eps)
    if not weight_decouple and wd != 0.0 and momentum > 0.0:
        raise ValueError("SGDSaI reference: weight_decouple=False with momentum > 0 is not supported (upstream "
                         "adds wd*p to the gradient after the momentum buffer used it, so the decay has no "
                         "effect); use decoupled decay or momentum=0")
    check_inputs("SGDSaI", params, grads, states)
    if any("step" not in st or "gsnr" not in st for st in states):
        raise ValueError("SGDSaI reference: state is missing step/gsnr; call sgdsai_init_state first")
    if skipped(found_inf):
        return
    for p, grad, st in zip(params, grads, states):
        device = p.device
        lr64 = torch.as_tensor(lr, dtype=torch.float64, device=device).reshape(())
        g = prepare_grad(grad, maximize, grad_scale)

        # first step only: gsnr from the gradient's per-tensor sums
        first = st["step"] == 0
        st["gsnr"].copy_(torch.where(first, as_plain(gsnr_of(g, eps)).to(st["gsnr"].dtype), st["gsnr"]))
        coef = (lr64 * st["gsnr"].double()).float()

        # elementwise step
        p32 = p.float()
        if momentum > 0.0:
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            b = st["momentum_buffer"].float()
            w = 1.0 - momentum
            buf = b + w * (g - b) if w < 0.5 else g - (g - b) * (1.0 - w)
            st["momentum_buffer"].copy_(buf)
        else:
            buf = g
        if wd != 0.0:
            if weight_decouple:
                p32 = p32 * (1.0 - lr64 * wd).float()
            else:
                buf = buf + wd * p32
        p.copy_(p32 - coef * buf)
        st["step"].add_(1)
