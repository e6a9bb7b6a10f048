"""Monge gap benchmark suite.

``monge-gap``: the value of the entropic Monge gap (:func:`fastopt.ot.monge_gap`) and its gradient with
respect to the mapped points ``Tx``, for n = 4000 source points in d = 3 (standard normal) and their
image under a non-optimal map (``tanh(x A) + 0.3 x + 0.5``), uniform weights, squared Euclidean cost,
``eps = 0.1``, float32, a fixed number of Sinkhorn iterations (50; ``--quick``: n = 300, 10 iterations):

* ``fastopt-<backend>``: :func:`fastopt.ot.monge_gap` with ``n_iter=50, tol=0`` (every iteration runs;
  the error is checked every 10, as ott does), then ``backward()`` (the envelope gradient: one more pass
  over the pairs);
* ``ott-jax`` (the baseline): ``jax.jit(jax.value_and_grad(f, argnums=1))`` with ``f(x, t) =
  ott.neural.methods.monge_gap.monge_gap_from_samples(x, t, epsilon=0.1, min_iterations=50,
  max_iterations=50, threshold=0)`` (50 iterations: the ``n_iters`` of its output; ott's other defaults:
  ``PointCloud`` with the dense cost matrix, ``scale_cost=1``, ``inner_iterations=10``, implicit
  differentiation with Danskin's rule for the value), compiled by one call in the setup, each call ending
  in ``block_until_ready``;
* ``ott-jax-danskin``: the same with ``implicit_diff=None, use_danskin=True`` (no implicit linear solve
  in the backward pass: the envelope gradient, like fastopt's).

Rows report ms per call (one value and gradient; ``items`` = 1, unit "solves").  Bar (CPU): ``fastopt-cpu``
>= 3x ``ott-jax`` at n = 4000.
"""

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, fastopt_backend, register
from .ot import Config  # (n, iters, d): the sinkhorn suite's configurations, named alike

BASELINE = "ott-jax"
EPS = 0.1


C_CPU = Config(4000, 50)
C_QUICK = Config(300, 10)


def _points(config):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(config.n, config.d, generator=gen)
    A = torch.randn(config.d, config.d, generator=gen)
    return x, torch.tanh(x @ A) + 0.3 * x + 0.5


def _ott(config, x, t, danskin):
    try:
        import jax
        from ott.neural.methods.monge_gap import monge_gap_from_samples
    except ImportError as e:
        raise Unsupported(f"ott-jax (with jax, flax, diffrax) is not installed ({e})") from e
    kw = dict(implicit_diff=None, use_danskin=True) if danskin else {}
    xj = jax.numpy.asarray(x.numpy())
    tj = jax.numpy.asarray(t.numpy())

    def f(xx, tt):
        return monge_gap_from_samples(xx, tt, epsilon=EPS, min_iterations=config.iters,
                                      max_iterations=config.iters, threshold=0.0, **kw)
    # (x is an argument, not a constant of the compiled function: XLA would fold what depends on it alone)
    vg = jax.jit(jax.value_and_grad(f, argnums=1))
    jax.block_until_ready(vg(xj, tj))  # (compiles)
    return Workload(fn=lambda: jax.block_until_ready(vg(xj, tj)))


def setup(config, method, device):
    from fastopt.ot import monge_gap

    x, t = _points(config)
    if method.startswith("ott-jax"):
        if device.type != "cpu":
            raise Unsupported("the ott-jax baseline runs on jax's CPU backend here")
        return _ott(config, x, t, danskin=method.endswith("-danskin"))
    backend = fastopt_backend(method, device)
    x, t = x.to(device), t.to(device)

    def run():
        tt = t.detach().requires_grad_()
        gap = monge_gap(x, tt, eps=EPS, n_iter=config.iters, tol=0.0, check_every=10, backend=backend)
        gap.backward()
        return gap, tt.grad
    return Workload(fn=run)


def _methods(device):
    from fastopt._backend import available_backends

    methods = [f"fastopt-{b}" for b in available_backends(device) if b not in ("torch", "cuda")]
    return methods + [BASELINE, "ott-jax-danskin"]


def cases(ctx):
    config = C_QUICK if ctx.quick else C_CPU
    return [Case(config=config.name, method=m, items=1, bytes_moved=0,
                 setup=lambda m=m: setup(config, m, ctx.device),
                 info={"n": config.n, "d": config.d, "eps": EPS, "iters": config.iters})
            for m in _methods(ctx.device)]


def bars(ctx):
    if ctx.quick or ctx.device.type != "cpu":
        return []
    return [Bar(C_CPU.name, "fastopt-cpu", SUITE.speedup_key, 3.0)]


SUITE = register(Suite(name="monge-gap", cases=cases, unit="solves", baseline=BASELINE, bars=bars,
                       other_baselines=("ott-jax-danskin",), memory_bound=False,
                       what="the Monge gap's value and gradient (a fixed number of Sinkhorn iterations)"))
