"""Reference AdaHessian (Yao et al., "ADAHESSIAN: An Adaptive Second Order Optimizer for Machine
Learning", AAAI 2021): the Rademacher probes, the Hutchinson estimate of the Hessian diagonal and the
update, in plain PyTorch.  The executable spec of ``fastopt.AdaHessian``'s kernels.

Probes.  Probe ``s`` (0-based sample) of tensor ``index`` (the parameter's position in the optimizer's
list of all parameters) at step ``step`` (the step count after the step) with seed ``seed`` gives
element ``j`` (its index in the whole tensor, low 32 bits; a piece starting at element ``offset`` of
its tensor uses ``j = offset + i``)::

    key  = fmix32(seed ^ 0x3C6EF372 ^ fmix32(index * 0x27D4EB2F + step * 0x165667B1 + s * 0x85EBCA77))
    z[j] = +1 if fmix32(j * 0x9E3779B1 ^ key) < 2^31 else -1

in 32-bit wrap-around arithmetic (``fmix32``: the murmur3 finalizer of ``fastopt/elementwise.h``).  The
C++ (``csrc/cpu/probe.cpp``) and Triton (``triton_kernels/adahessian.py``) kernels compute the same
bits, so the probes -- and the optimizer's results -- do not depend on the backend, nor on how a tensor
is split into pieces (FSDP2 shards: the global index).

Hutchinson estimate (one step): for each sample ``s``, ``Hz = d(g . z)/dw`` by double backward through
the gradients of ``loss.backward(create_graph=True)``, then

    mode "pytorch_optimizer":  D = sum_s (1/n) (Hz_s z_s)           (pytorch_optimizer 4.1.0)
    mode "official":           D = sum_s (1/n) |Hz_s|, then for 4-D tensors (conv kernels) the mean
                               over dims (2, 3), broadcast back     (amirgholami/adahessian)

Update (per tensor, ``t`` = step after the step, ``bc1 = 1 - b1^t``, ``bc2 = 1 - b2^t``)::

    p, g = weight_decay_step(p, g, ...)     # decoupled p (1 - wd (fixed_decay ? 1 : lr)), or L2 g + wd p
    m = m + (1 - b1)(g - m)                 # exp_avg
    v = b2 v + (1 - b2) D D                 # exp_hessian_diag_sq (only at steps with a new estimate D)
    denom = (v / bc2)^(k/2) + eps           # k = hessian_power (sqrt for k = 1)
    p = p - (lr / bc1) (m / denom)

which is pytorch_optimizer's update; the official one, ``p - lr (m / bc1 / denom + wd p)`` with
``denom = sqrt(v)^k / sqrt(bc2)^k + eps``, is the same function (decoupled decay, not fixed), rounded
differently (within fp32 rounding: tested).
"""
import torch

from ._common import check_inputs, prepare_grad, skipped, weight_decay_step
from .rounding import _M32, _mul32, fmix32

STATE_NAMES = ("exp_avg", "exp_hessian_diag_sq")
MODES = ("pytorch_optimizer", "official")


def probe_key(seed, index, step, sample):
    """The 32-bit key of one probe stream (Python ints; see the module doc)."""
    inner = (int(index) * 0x27D4EB2F + int(step) * 0x165667B1 + int(sample) * 0x85EBCA77) & _M32
    return fmix32((int(seed) & _M32) ^ 0x3C6EF372 ^ fmix32(inner))


def probe_signs(numel, device, key, offset=0):
    """The probe bits of elements ``offset .. offset + numel - 1`` of stream ``key`` as an int64 tensor of
    0 (z = +1) and 1 (z = -1)."""
    i = torch.arange(numel, dtype=torch.int64, device=device)
    if offset:
        i = (i + (int(offset) & _M32)) & _M32
    return fmix32(_mul32(i, 0x9E3779B1) ^ key) >> 31


def rademacher_probe(like, seed, index, step, sample, offset=0):
    """The Rademacher probe (+1/-1, ``like``'s shape, dtype and device) of one (tensor, step, sample)
    stream: what the kernels compute (the module doc)."""
    bits = probe_signs(like.numel(), like.device, probe_key(seed, index, step, sample), offset)
    return (1 - 2 * bits).to(like.dtype).view(like.shape)


def consume_probe(hz, acc, key, scale, use_z, offset=0):
    """One sample's contribution to the Hutchinson estimate, in fp32: ``acc + scale * (z Hz)`` (use_z)
    or ``acc + scale * |Hz|`` (``acc`` None: 0), z regenerated from ``key``."""
    h = hz.float()
    if use_z:
        z = (1 - 2 * probe_signs(h.numel(), h.device, key, offset)).to(torch.float32).view(h.shape)
        term = (scale * h) * z
    else:
        term = scale * h.abs()
    return term if acc is None else acc + term


def spatial_average(d):
    """The official code's averaging over a conv kernel: a 4-D estimate becomes its mean over dims (2, 3),
    broadcast back to the tensor's shape; other tensors are returned as they are."""
    if d.dim() == 4:
        return d.mean(dim=(2, 3), keepdim=True).expand_as(d).contiguous()
    return d


def hutchinson_reference(params, grads, *, seed, indices, step, n_samples=1, mode="pytorch_optimizer",
                         average_conv_kernel=None, offsets=None, retain_graph=False):
    """The Hutchinson estimate ``D`` (fp32, one per parameter) of the Hessian diagonal at one step.

    ``grads``: the gradients, with their graph (``loss.backward(create_graph=True)``); those without a
    graph (constant in the parameters) contribute nothing.  ``indices[i]``: the probe stream index of
    ``params[i]``; ``step``: the step count after the step; ``offsets``: where each tensor starts in its
    whole tensor (None: 0).  See the module doc for the two modes; ``average_conv_kernel`` (default:
    True in "official" mode) switches the 4-D averaging.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if average_conv_kernel is None:
        average_conv_kernel = mode == "official"
    offsets = offsets or [0] * len(params)
    live = [i for i, g in enumerate(grads) if g.grad_fn is not None]
    if not live:
        raise RuntimeError("AdaHessian: no gradient has a graph; call loss.backward(create_graph=True)")
    acc = [None] * len(params)
    for s in range(n_samples):
        keys = [probe_key(seed, indices[i], step, s) for i in range(len(params))]
        zs = [rademacher_probe(grads[i], seed, indices[i], step, s, offsets[i]) for i in live]
        hzs = torch.autograd.grad([grads[i] for i in live], params, grad_outputs=zs,
                                  retain_graph=retain_graph or s < n_samples - 1, allow_unused=True)
        del zs
        for i, hz in enumerate(hzs):
            if hz is None:
                hz = torch.zeros_like(params[i])
            acc[i] = consume_probe(hz, acc[i], keys[i], 1.0 / n_samples, mode == "pytorch_optimizer", offsets[i])
    if average_conv_kernel:
        acc = [spatial_average(d) for d in acc]
    return acc


def adahessian_init_state(p, state, group=None):
    """Fill the empty state dict of ``p``: an fp32 step counter, ``exp_avg`` and ``exp_hessian_diag_sq``."""
    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
    for name in STATE_NAMES:
        state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)


def adahessian_reference(params, grads, states, *, lr, hessians=None, betas=(0.9, 0.999), weight_decay=0.0,
                         weight_decouple=True, fixed_decay=False, eps=1e-16, hessian_power=1.0, maximize=False,
                         grad_scale=None, found_inf=None):
    """One AdaHessian update, in place (the module doc; conventions: :mod:`fastopt.reference._common`).

    ``hessians[i]``: the estimate ``D`` of ``params[i]`` at this step (any float dtype, ``p``'s shape),
    or ``hessians=None`` for a step that reuses ``exp_hessian_diag_sq`` (update_period > 1).
    """
    check_inputs("AdaHessian", params, grads, states, ("step",) + STATE_NAMES, "call adahessian_init_state first")
    if hessians is not None and len(hessians) != len(params):
        raise ValueError("hessians: one estimate per parameter")
    if skipped(found_inf):
        return
    beta1, beta2 = (float(b) for b in betas)
    lr = float(lr)
    half = float(hessian_power) / 2.0
    for i, (p, grad, st) in enumerate(zip(params, grads, states)):
        t = st["step"].item() + 1.0
        bc1 = 1.0 - beta1 ** t
        bc2 = 1.0 - beta2 ** t
        g = prepare_grad(grad, maximize, grad_scale)
        p32, g = weight_decay_step(p.float(), g, weight_decay, weight_decouple, fixed_decay, lr)
        m = st["exp_avg"].float()
        m = m + (1.0 - beta1) * (g - m)
        v = st["exp_hessian_diag_sq"].float()
        if hessians is not None:
            d = hessians[i].float()
            v = beta2 * v + (1.0 - beta2) * d * d
        x = v / bc2
        denom = (x.sqrt() if half == 0.5 else x.pow(half)) + eps
        p32 = p32 - (lr / bc1) * (m / denom)
        p.copy_(p32)
        st["exp_avg"].copy_(m)
        st["exp_hessian_diag_sq"].copy_(v)
        st["step"].add_(1)
