"""Reference Adam / AdamW step (Kingma & Ba 2015; Loshchilov & Hutter 2019).

Matches ``torch.optim.Adam`` / ``torch.optim.AdamW`` (single-tensor implementation) on fp32 tensors,
including ``amsgrad``, ``maximize`` and L2 vs decoupled weight decay.  Differences, deliberate:
math is always fp32 whatever the storage dtype (torch does bf16/fp16 math in the storage dtype), and
bias corrections are computed in fp64 from the (possibly on-device) step counter, so nothing syncs
with the host except reading ``found_inf``.
"""
import torch


def adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2,
                   eps, weight_decay, decoupled, amsgrad, maximize, grad_scale=None, found_inf=None):
    """One Adam/AdamW step, in place, over lists of tensors.

    For each tensor, with t = step + 1 and g the gradient (negated if ``maximize``, divided by
    ``grad_scale`` if given)::

        p <- p (1 - lr wd)                         if decoupled (AdamW), else g <- g + wd p
        m <- m + (1 - b1)(g - m)
        v <- b2 v + (1 - b2) g^2
        vmax <- max(vmax, v)                       if amsgrad (then v below means vmax)
        p <- p - lr / (1 - b1^t) * (m / (sqrt(v) / sqrt(1 - b2^t) + eps))
        step <- t

    If ``found_inf`` is nonzero nothing changes (AMP skipped step).  ``lr`` may be a tensor.
    """
    if found_inf is not None and float(found_inf) != 0.0:
        return
    for i, p in enumerate(params):
        step_t = state_steps[i]
        device = p.device
        t = step_t.to(device=device, dtype=torch.float64) + 1.0
        lr64 = torch.as_tensor(lr, dtype=torch.float64, device=device)
        bc1 = 1.0 - torch.pow(torch.tensor(beta1, dtype=torch.float64, device=device), t)
        bc2 = 1.0 - torch.pow(torch.tensor(beta2, dtype=torch.float64, device=device), t)
        step_size = (lr64 / bc1).float()
        bc2_sqrt = bc2.sqrt().float()

        p32 = p.float()
        g = grads[i].float()
        if maximize:
            g = -g
        if grad_scale is not None:
            g = g / grad_scale.to(device=device, dtype=torch.float32)
        if weight_decay != 0:
            if decoupled:
                p32 = p32 * (1.0 - lr64 * weight_decay).float()
            else:
                g = g + weight_decay * p32
        m = exp_avgs[i].float()
        m = m + (1.0 - beta1) * (g - m)
        v = beta2 * exp_avg_sqs[i].float() + (1.0 - beta2) * g * g
        vd = v
        if amsgrad:
            vd = torch.maximum(max_exp_avg_sqs[i].float(), v)
            max_exp_avg_sqs[i].copy_(vd)
        denom = vd.sqrt() / bc2_sqrt + eps
        p32 = p32 - step_size * (m / denom)
        p.copy_(p32)
        exp_avgs[i].copy_(m)
        exp_avg_sqs[i].copy_(v)
        step_t.add_(1)
