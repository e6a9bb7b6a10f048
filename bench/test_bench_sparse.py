"""pytest-benchmark suites for the 2:4 mask and the SR-STE 2:4 step on CPU: ``pytest bench/ --benchmark-only``.

The same methods as the ``nm-mask`` suite of ``python -m fastopt.bench`` (shared code:
``fastopt.bench.sparse``): fastopt's cpu kernel, the topk-based torch mask and the compiled rank mask.
"""
import pytest
import torch

from fastopt.bench import sparse as sb
from fastopt.bench.harness import Unsupported
from fastopt.sparse import is_nm_sparse

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


@pytest.mark.parametrize("config", [sb.S_CPU_QUICK, sb.S_CPU], ids=lambda c: c.name)
@pytest.mark.parametrize("method", ["fastopt-cpu-k1", "fastopt-cpu-steady", "fastopt-cpu-dense", sb.STEP_BASELINE])
def test_sparse_step_srste_2_4(benchmark, method, config):
    """One SR-STE 2:4 AdamW step (the ``sparse-step`` suite)."""
    work = sb.step_setup(config, method, DEVICE)
    benchmark.group = f"sparse-step {config.name}"
    benchmark.extra_info.update(params=config.numel)
    params = benchmark(work.fn)
    assert len(params) == config.tensors
    if not method.endswith("-dense"):
        assert all(is_nm_sparse(p, 2, 4) for p in params)
