"""AdamP / SGDP kernels vs the reference where the projection branches are taken: gradients made
orthogonal to the weights per row (channel view), per tensor (layer view), or left alone."""
import pytest
import torch

import fastopt
from conftest import KERNEL_DEVICE_BACKENDS
from fastopt.reference.adamp import projection_coefficients, projection_row_sums
from helpers import clone_params, make_params

SHAPES = [(8, 3, 3, 3), (13, 31), (6, 10), (7,), (1, 17)]
MODES = ["channel", "layer", "none", "channel", "none"]


def orthogonal_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for p, mode in zip(params, MODES):
        g = torch.randn(p.shape, generator=gen)
        p32 = p.detach().float().cpu()
        if mode == "channel" and p.dim() > 1:
            pr, gr = p32.reshape(p.shape[0], -1), g.reshape(p.shape[0], -1)
            gr -= ((gr * pr).sum(1, keepdim=True) / (pr * pr).sum(1, keepdim=True)) * pr
            g = gr.reshape(p.shape)
        elif mode == "layer":
            g -= ((g * p32).sum() / (p32 * p32).sum()) * p32
            g += 0.3 * torch.randn(p.shape, generator=gen) * (torch.arange(p.shape[0]) % 2).view(-1, 1)
            g -= ((g * p32).sum() / (p32 * p32).sum()) * p32
        out.append(g)
    return out


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("cls,kwargs", [
    (fastopt.AdamP, dict(lr=1e-2, weight_decay=0.1, wd_ratio=0.3)),
    (fastopt.AdamP, dict(lr=1e-2, weight_decay=0.1, nesterov=True)),
    (fastopt.SGDP, dict(lr=1e-2, momentum=0.9, weight_decay=0.1, wd_ratio=0.3)),
    (fastopt.SGDP, dict(lr=1e-2, momentum=0.9, nesterov=True, weight_decay=0.05)),
])
def test_projection_branches(device, backend, cls, kwargs):
    base = make_params(SHAPES, device=device)
    ref_p, ker_p = clone_params(base), clone_params(base)
    ref = cls(ref_p, backend="torch", **kwargs)
    ker = cls(ker_p, backend=backend, **kwargs)
    seen = set()
    for k in range(4):
        grads = orthogonal_grads(ref_p, 10 + k)
        for p, g in zip(ref_p[:3], grads[:3]):  # which branch the reference takes this step
            sums = projection_row_sums(p.detach().float().cpu(), g, g)
            _, _, projected, channel = projection_coefficients(sums, p.numel(), delta=0.1, eps=1e-8)
            seen.add("channel" if bool(channel) else "layer" if bool(projected) else "none")
        for a, b, g in zip(ref_p, ker_p, grads):
            a.grad = g.to(device)
            b.grad = g.clone().to(device)
        ref.step()
        ker.step()
    assert seen == {"channel", "layer", "none"}
    for a, b in zip(ref_p, ker_p):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        for key in ref.STATE_NAMES:
            torch.testing.assert_close(ref.state[a][key], ker.state[b][key], rtol=1e-5, atol=1e-6)
