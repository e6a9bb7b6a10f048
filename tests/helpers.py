"""Shared helpers of the optimizer tests: building parameter sets and running optimizers side by side."""
import torch

# Odd sizes: empty, one element, primes, one past the CPU/CUDA/Triton chunk (65536), a 2-D and a 3-D
# shape.
ODD_SHAPES = [(0,), (1,), (7,), (97,), (65537,), (13, 31), (5, 3, 11)]


def make_params(shapes, dtype=torch.float32, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]


def clone_params(tensors):
    return [torch.nn.Parameter(t.detach().clone()) for t in tensors]


def set_grads(param_sets, seed, scale=1.0):
    """Give every parameter of every set the same random gradient (one per position)."""
    gen = torch.Generator().manual_seed(seed)
    for params in zip(*param_sets):
        g = torch.randn(params[0].shape, generator=gen) * scale
        for p in params:
            p.grad = g.to(device=p.device, dtype=p.dtype, copy=True)  # upstream optimizers may edit grads


def run_side_by_side(opts, param_sets, steps, seed0=100):
    for k in range(steps):
        set_grads(param_sets, seed0 + k)
        for opt in opts:
            opt.step()


def assert_states_close(opt_a, params_a, opt_b, params_b, rtol, atol, keys=("exp_avg", "exp_avg_sq")):
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa.detach().float().cpu(), pb.detach().float().cpu(), rtol=rtol, atol=atol)
        sa, sb = opt_a.state[pa], opt_b.state[pb]
        for key in keys:
            torch.testing.assert_close(sa[key].float().cpu(), sb[key].float().cpu(), rtol=rtol, atol=atol,
                                       msg=lambda m, key=key: f"state {key}: {m}")
        assert float(sa["step"]) == float(sb["step"])


def run_pair(make_a, make_b, shapes, steps):
    """Two optimizers (``make_a(params)``, ``make_b(params)``) over copies of one random parameter set,
    stepped side by side on the same gradients; returns ``(opt_a, params_a, opt_b, params_b)``."""
    base = make_params(shapes)
    a_p, b_p = clone_params(base), clone_params(base)
    a, b = make_a(a_p), make_b(b_p)
    run_side_by_side([a, b], [a_p, b_p], steps=steps)
    return a, a_p, b, b_p


def assert_runs_close(actual, actual_params, expected, expected_params, keys, rtol, atol, state_atol=None):
    """``assert_close`` of every parameter and of its state tensors ``keys`` (``state_atol``, default
    ``atol``), the ``actual`` optimizer's side as the actual values."""
    for a, b in zip(actual_params, expected_params):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
        for key in keys:
            torch.testing.assert_close(actual.state[a][key], expected.state[b][key], rtol=rtol,
                                       atol=atol if state_atol is None else state_atol)
