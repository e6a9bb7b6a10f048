"""pytest-benchmark suite for the 2:4 mask on CPU: ``pytest bench/ --benchmark-only``.

The same methods as the ``nm-mask`` suite of ``python -m fastopt.bench`` (shared code:
``fastopt.bench.sparse``): fastopt's cpu kernel, the topk-based torch mask and the compiled rank mask.
"""
import pytest
import torch

from fastopt.bench import sparse as sb
from fastopt.bench.harness import Unsupported

DEVICE = torch.device("cpu")


@pytest.mark.parametrize("config", [sb.C_CPU_QUICK, sb.C_CPU], ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["fastopt-cpu", sb.BASELINE, "torch-compile-rank"])
def test_nm_mask_2_4(benchmark, method, config):
    try:
        work = sb.nm_setup(config, method, DEVICE)
    except Unsupported as e:
        pytest.skip(str(e))
    benchmark.group = f"nm-mask {config.name}"
    benchmark.extra_info.update(elements=config.numel)
    mask = benchmark(work.fn)
    assert mask.shape == (config.rows, config.cols) and int(mask.sum()) == config.numel // 2
