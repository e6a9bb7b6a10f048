"""pytest-benchmark suite for one step of SGD (momentum), Adagrad and RMSprop on CPU:
``pytest bench/ --benchmark-only``.

The same methods and parameter sets as the ``classic-<name>`` suites of ``python -m fastopt.bench`` (the
code that builds them is shared: ``fastopt.bench.classic``): the fastopt ``cpu`` backend and torch.optim's
fused (SGD, Adagrad), foreach and for-loop paths, on a small config and on 20x1M.
"""
import pytest
import torch

from fastopt.bench import classic
from fastopt.bench.adamw import C_20X1M, C_SMALL
from fastopt.bench.harness import Unsupported

DEVICE = torch.device("cpu")
CASES = [(spec, method) for spec in classic.SPECS for method in ("fastopt-cpu",) + spec.torch_paths]


@pytest.mark.parametrize("config", [C_SMALL, C_20X1M], ids=lambda c: c.name)
@pytest.mark.parametrize("spec,method", CASES, ids=[f"{s.name}-{m}" for s, m in CASES])
def test_classic_step(benchmark, spec, method, config):
    try:
        workload = classic.setup(spec, config, method, DEVICE)
    except Unsupported as e:
        pytest.skip(str(e))
    benchmark.group = f"{spec.name} {config.name}"
    bytes_per_step = (3 + 2 * classic.STATES) * config.dtype.itemsize * config.numel
    benchmark.extra_info.update(params=config.numel, tensors=len(config.sizes), bytes_per_step=bytes_per_step)
    benchmark(workload.fn)
    benchmark.extra_info["GBps_at_median"] = bytes_per_step / benchmark.stats.stats.median / 1e9
