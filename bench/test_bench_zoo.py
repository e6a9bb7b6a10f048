"""pytest-benchmark suite for one step of each zoo optimizer on CPU: ``pytest bench/ --benchmark-only``.

The same methods and parameter sets as the ``zoo-<name>`` suites of ``python -m fastopt.bench`` (the
code that builds them is shared: ``fastopt.bench.zoo``): the fastopt ``cpu`` backend and
``pytorch_optimizer``'s implementation on a small config and on 20x1M.  Methods this install cannot run
are skipped with the reason.
"""
import pytest
import torch

from fastopt.bench import zoo
from fastopt.bench.adamw import C_20X1M, C_SMALL
from fastopt.bench.harness import Unsupported

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("config", [C_SMALL, C_20X1M], ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["fastopt-cpu", zoo.BASELINE])
@pytest.mark.parametrize("spec", zoo.SPECS, ids=lambda s: s.name)
def test_zoo_step(benchmark, spec, config, method):
    try:
        workload = zoo.setup(spec, config, method, DEVICE)
    except Unsupported as e:
        pytest.skip(str(e))
    workload.fn()  # the first step allocates the state; keep it out of the timings
    benchmark.group = f"{spec.name} {config.name}"
    bytes_per_step = zoo.bytes_per_step(spec, config)
    benchmark.extra_info.update(params=config.numel, tensors=len(config.sizes), bytes_per_step=bytes_per_step)
    benchmark(workload.fn)
    benchmark.extra_info["GBps_at_median"] = bytes_per_step / benchmark.stats.stats.median / 1e9
