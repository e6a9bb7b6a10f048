"""pytest-benchmark suite for one AdamW step with low-bit states on CPU: ``pytest bench/ --benchmark-only``.

The same methods and parameter sets as the ``lowbit-adamw`` suite of ``python -m fastopt.bench`` (shared
code: ``fastopt.bench.lowbit``): fastopt's cpu backend with 8-bit, 4-bit and fp8 states, torchao's and
bitsandbytes' 8-bit AdamW and torch's fused fp32 AdamW.  Methods this install cannot run are skipped.
"""
import pytest
import torch

from fastopt.bench import lowbit
from fastopt.bench.adamw import make_params
from fastopt.bench.harness import Unsupported

DEVICE = torch.device("cpu")
METHODS = ["fastopt-cpu-8bit", "fastopt-cpu-4bit", "fastopt-cpu-fp8", "torch-fused-fp32", "torchao-8bit", "bnb-8bit"]


@pytest.mark.parametrize("config", [lowbit.C_CPU_SMALL, lowbit.C_CPU], ids=lambda c: c.name)
@pytest.mark.parametrize("method", METHODS)
def test_lowbit_adamw_step(benchmark, method, config):
    try:
        opt = lowbit.make_optimizer(method, make_params(config, DEVICE), DEVICE)
    except Unsupported as e:
        pytest.skip(str(e))
    opt.step()  # the first step allocates the state (and compiles torchao's step)
    benchmark.group = f"lowbit-adamw {config.name}"
    benchmark.extra_info.update(params=config.numel, state_bytes=lowbit.state_bytes(opt))
    benchmark(opt.step)
