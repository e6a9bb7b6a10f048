"""The ``fsdp`` benchmark suite, as a user runs it: ``python -m fastopt.bench --quick --suite fsdp`` (2 gloo
ranks spawned by the suite, a 4 x 256 model), and its report: every listed optimizer has a time or a
stated refusal in both configs (with and without CPUOffloadPolicy, whose states the suite asserts are
on the CPU), the baseline and its ratio column are there.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastopt.bench import SUITES, fsdp, harness

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("fsdp-bench")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "fastopt.bench", "--quick", "--device", "cpu", "--suite", "fsdp",
                           "--budget", "0.01", "--repeats", "2", "--no-plot", "--out", str(cwd)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (json_path,) = cwd.glob("*.json")
    return proc, json.loads(json_path.read_text())


def test_the_suite_is_registered_with_50m_and_quick_models():
    assert SUITES["fsdp"] is fsdp.SUITE and fsdp.SUITE.baseline == "torch-fused"
    full, quick = fsdp.configs(False), fsdp.configs(True)
    assert [c.offload for c in full] == [False, True] == [c.offload for c in quick]
    assert all(45e6 <= c.numel <= 55e6 for c in full)
    assert all(c.numel <= 1e6 for c in quick)
    # every fastopt optimizer class is listed (a new one must be added to the suite)
    import fastopt
    from fastopt.optim.base import _OPTIMIZERS

    public = {c.__name__ for c in _OPTIMIZERS if getattr(fastopt, c.__name__, None) is c}
    assert public <= set(fsdp.FASTOPT), public - set(fsdp.FASTOPT)


def test_every_optimizer_has_a_time_or_a_stated_refusal(quick_run):
    _, report = quick_run
    assert report["schema"] == harness.SCHEMA_VERSION
    rows = [r for r in report["rows"] if r["op"] == "fsdp"]
    configs = [c.name for c in fsdp.configs(True)]
    assert sorted({(r["config"], r["method"]) for r in rows}) == sorted((c, m) for c in configs for m in fsdp.METHODS)
    for r in rows:
        assert r["ranks"] == 2 and r["offload"] == ("offload" in r["config"]), r
        assert r["params"] == fsdp.configs(True)[0].numel
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"] and r["params_per_s"] > 0, r
            assert isinstance(r["noisy"], bool) and r["state_MB"] is not None
            assert r["speedup_vs_torch_fused"] is not None
            if r["method"] != fsdp.OVERHEAD:
                assert r["state_MB"] > 0
        else:  # a refusal, said in its row; never an error
            assert r["status"].startswith("unsupported: refused under FSDP2: "), r["status"]
    by = {(r["config"], r["method"]): r for r in rows}
    for c in configs:
        base = by[(c, "torch-fused")]
        assert base["status"] == "ok" and base["speedup_vs_torch_fused"] == pytest.approx(1.0)
        # torch's and fastopt's AdamW keep the same states: exp_avg, exp_avg_sq, a step per parameter
        ours = by[(c, "fastopt-AdamW")]
        assert ours["status"] == "ok"
        assert ours["state_MB"] == pytest.approx(base["state_MB"], rel=1e-3)
        assert ours["speedup_vs_torch_fused"] == pytest.approx(base["ms"] / ours["ms"])


def test_table_and_progress(quick_run):
    proc, _ = quick_run
    assert "== fsdp (cpu): one optimizer.step() on every rank (FSDP2); speedup vs torch-fused ==" in proc.stdout
    assert "starting 2 ranks (gloo, " in proc.stderr
    assert "in-rank step median" in proc.stderr
    assert max(len(line) for line in proc.stdout.splitlines() if "wrote" not in line) <= 120
