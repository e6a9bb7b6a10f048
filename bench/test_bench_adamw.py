"""pytest-benchmark suite for one AdamW step on CPU: ``pytest bench/ --benchmark-only``.

The same methods and parameter sets as the ``adamw`` suite of ``python -m fastopt.bench`` (the code
that builds them is shared: ``fastopt.bench.adamw``): every fastopt backend usable on the CPU, and
``torch.optim.AdamW`` fused / foreach / for-loop, on a small config and on 20x1M.  Methods this
install or device cannot run are skipped with the reason.  Each benchmark records the bytes an ideal
step moves and the GB/s at its median in ``extra_info``.
"""
import pytest
import torch

from fastopt.bench import adamw
from fastopt.bench.harness import Unsupported

DEVICE = torch.device("cpu")
CONFIGS = [adamw.C_SMALL, adamw.C_20X1M]
METHODS = [f"fastopt-{b}" for b in ("cpu", "triton", "torch")] + list(adamw.TORCH_METHODS)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("method", METHODS)
def test_adamw_step(benchmark, config, method):
    try:
        workload = adamw.setup(config, method, DEVICE)
    except Unsupported as e:
        pytest.skip(str(e))
    workload.fn()  # the first step allocates the state; keep it out of the timings
    benchmark.group = f"adamw {config.name}"
    benchmark.extra_info.update(params=config.numel, tensors=len(config.sizes),
                                bytes_per_step=config.bytes_per_step)
    benchmark(workload.fn)
    benchmark.extra_info["GBps_at_median"] = config.bytes_per_step / benchmark.stats.stats.median / 1e9
