"""Reference LAMB step (You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76
minutes", ICLR 2020).

Matches ``pytorch_optimizer.Lamb`` (4.1.0; its per-parameter and foreach paths) on fp32 tensors, with
its options ``weight_decay`` / ``weight_decouple`` / ``fixed_decay``, ``grad_averaging``, ``adam``
(trust ratio 1), ``pre_norm`` with ``max_grad_norm``, ``eps``, the trust-ratio clamp (upstream's class
attribute ``Lamb.clamp = 10``, here the keyword ``clamp``) and the hidden group option ``adam_debias``.

What upstream computes (so what this computes), per tensor, with t = step + 1::

    gscale   = min(max_grad_norm / (sqrt(sum over ALL tensors of g^2) + eps), 1)   if pre_norm and
               max_grad_norm != 0, else 1   (the global norm of the unscaled, un-negated gradients)
    g        = gscale * g
    m        = b1 m + b3 g              b3 = 1 - b1 if grad_averaging else 1
    v        = b2 v + (1 - b2) g^2
    p'       = p (1 - wd (fixed_decay ? 1 : lr))          if weight_decouple (else p' = p)
    u        = m / (sqrt(v) + eps)  [+ wd p'   if not weight_decouple and wd > 0]
    wn       = min(||p'||, clamp) ;  un = ||u||
    trust    = wn / (un + eps)  if wn != 0 and un != 0 else 1
    p        = p' - lr / (1 - b1^t) * (adam ? 1 : trust) * u       (lr, not lr/(1 - b1^t), if adam_debias)

Upstream quirks worth knowing (reproduced):

* the docstring says "without bias correction", but the step size is ``lr / (1 - b1^t)`` unless the
  group has ``adam_debias=True``; there is never a second-moment correction;
* L2 weight decay (``weight_decouple=False``) is added to the *update* ``u`` (as in the LAMB paper), not
  to the gradient, so it never enters the moments; decoupled decay is applied *before* ``||p||`` is taken;
* ``state["trust_ratio"]`` records the computed ratio even when ``adam=True`` (which then steps with 1);
* ``pre_norm`` reads ``eps`` and ``max_grad_norm`` from the optimizer defaults, not from the group, and
  takes the norm over every group; here over the ``params`` of the call.

Phase split (what a fused kernel does):

* phase 0 (only if ``pre_norm and max_grad_norm != 0``), per tensor: ``S_g = sum g^2``; then
  ``gscale = min(max_grad_norm / (sqrt(sum_i S_g,i) + eps), 1)`` (a 0-dim fp32 tensor, no sync);
* phase A, per element: update and store ``m``, ``v``; form ``p'`` and ``u``; per tensor accumulate
  ``S_w = sum p'^2`` and ``S_u = sum u^2`` (``p`` is not written);
* between phases, per tensor: ``wn = min(sqrt(S_w), clamp)``, ``un = sqrt(S_u)``, ``trust`` as above,
  ``coef = fp32(step_size) * (adam ? 1 : trust)``; stored as ``state["weight_norm"]``,
  ``state["adam_norm"]``, ``state["trust_ratio"]``;
* phase B, per element: re-read ``m``, ``v`` (as stored), ``p``; recompute ``p'`` and ``u``;
  ``p = p' - coef u``.

State: ``STATE_NAMES = ("exp_avg", "exp_avg_sq")`` plus the per-tensor fp32 0-dim diagnostics
``SCALAR_STATE_NAMES = ("weight_norm", "adam_norm", "trust_ratio")`` (upstream's names; written every
step, never read) and ``state["step"]``.

Unsupported (``ValueError``): ``rectify=True`` (and with it ``degenerated_to_sgd`` / ``n_sma_threshold``,
which only act when rectifying), ``adanorm=True``, complex parameters, sparse gradients.

Deliberate differences from upstream: math is fp32 whatever the storage dtype; the step counter is a
per-tensor fp32 0-dim tensor (upstream: per group int); gradients are never written to (upstream leaves
``p.grad`` negated for ``maximize`` and scaled for ``pre_norm``); the weight-decay factor and the step size
are fp64 scalars rounded to fp32.
"""
import torch

from ._common import as_plain, check_inputs, init_state, prepare_grad, skipped

STATE_NAMES = ("exp_avg", "exp_avg_sq")
SCALAR_STATE_NAMES = ("weight_norm", "adam_norm", "trust_ratio")


def lamb_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: fp32 step counter, zeroed ``STATE_NAMES`` tensors and zeroed
    fp32 0-dim ``SCALAR_STATE_NAMES``."""
    init_state(p, state, STATE_NAMES)
    for name in SCALAR_STATE_NAMES:
        state[name] = torch.zeros((), dtype=torch.float32, device=p.device)


def _check(params, grads, states, *, betas, rectify, adanorm):
    if rectify:
        raise ValueError("Lamb reference: rectify=True (RAdam-style rectification, with degenerated_to_sgd / "
                         "n_sma_threshold) is not supported")
    if adanorm:
        raise ValueError("Lamb reference: adanorm is not supported")
    if len(betas) != 2:
        raise ValueError(f"Lamb takes two betas, got {betas!r}")
    check_inputs("Lamb", params, grads, states, ("step",) + STATE_NAMES, "call lamb_init_state first")


def _direction(m, v, p_dec, *, eps, l2):
    """u = m / (sqrt(v) + eps) [+ l2 p']: the Adam direction LAMB rescales."""
    u = m / (v.sqrt() + eps)
    if l2 != 0.0:
        u = u + l2 * p_dec
    return u


def lamb_reference(params, grads, states, *, lr, betas=(0.9, 0.999), weight_decay=0.0, weight_decouple=True,
                   fixed_decay=False, rectify=False, degenerated_to_sgd=False, n_sma_threshold=5,
                   grad_averaging=True, max_grad_norm=1.0, adam=False, pre_norm=False, eps=1e-6,
                   adam_debias=False, clamp=10.0, adanorm=False, maximize=False, grad_scale=None,
                   found_inf=None):
    """One LAMB step, in place (equations and phase split: module docstring).  ``states[i]`` is the state
    dict of ``params[i]``; ``lr`` may be a float or a 0-dim tensor; if ``found_inf`` is nonzero nothing
    changes."""
    _check(params, grads, states, betas=betas, rectify=rectify, adanorm=adanorm)
    if skipped(found_inf):
        return
    beta1, beta2 = float(betas[0]), float(betas[1])
    beta3 = 1.0 - beta1 if grad_averaging else 1.0
    wd = float(weight_decay)
    eps = float(eps)
    decoupled = weight_decouple and wd != 0.0
    l2 = wd if (not weight_decouple and wd > 0.0) else 0.0

    # phase 0: the global gradient scale of pre_norm
    gscale = None
    if pre_norm and float(max_grad_norm) != 0.0 and len(params) > 0:
        device = params[0].device
        sq = torch.stack([(g * g).sum().to(device) for g in
                          (prepare_grad(grad, False, grad_scale) for grad in grads)]).sum()
        gscale = torch.clamp(float(max_grad_norm) / (sq.sqrt() + eps), max=1.0)

    def grad_of(i):
        g = prepare_grad(grads[i], maximize, grad_scale)
        return g if gscale is None else g * gscale.to(g.device)

    for i, (p, st) in enumerate(zip(params, states)):
        device = p.device
        t = st["step"].to(device=device, dtype=torch.float64) + 1.0
        lr64 = torch.as_tensor(lr, dtype=torch.float64, device=device)
        step_size = lr64 if adam_debias else lr64 / (1.0 - torch.pow(torch.tensor(beta1, dtype=torch.float64,
                                                                               device=device), t))
        decay = (1.0 - wd * (torch.ones_like(lr64) if fixed_decay else lr64)).float() if decoupled else None

        # phase A: moments; sums of p'^2 and u^2
        g = grad_of(i)
        m = beta1 * st["exp_avg"].float() + beta3 * g
        v = beta2 * st["exp_avg_sq"].float() + (1.0 - beta2) * g * g
        p_dec = p.float() if decay is None else p.float() * decay
        u = _direction(m, v, p_dec, eps=eps, l2=l2)
        s_w = (p_dec * p_dec).sum()
        s_u = (u * u).sum()
        st["exp_avg"].copy_(m)
        st["exp_avg_sq"].copy_(v)

        # between phases: trust ratio
        wn = as_plain(s_w).sqrt().clamp(min=0.0, max=float(clamp))  # (FSDP2: the sums over every shard)
        un = as_plain(s_u).sqrt()
        trust = torch.where((wn != 0) & (un != 0), wn / (un + eps), torch.ones_like(wn))
        coef = step_size.float() * (torch.ones_like(trust) if adam else trust)
        for name, value in zip(SCALAR_STATE_NAMES, (wn, un, trust)):
            if name in st:
                st[name].copy_(value)
            else:  # a state dict saved by upstream before its first step
                st[name] = value.clone()

        # phase B: p = p' - coef u, from the stored moments
        p_dec = p.float() if decay is None else p.float() * decay
        u = _direction(st["exp_avg"].float(), st["exp_avg_sq"].float(), p_dec, eps=eps, l2=l2)
        p.copy_(p_dec - coef * u)
        st["step"].add_(1)
