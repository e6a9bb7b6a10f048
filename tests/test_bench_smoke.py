"""The benchmark report as a user reads it: one quick end-to-end run of ``python -m fastopt.bench``
(a memory-bound suite, an OT suite and a suite that reports every row unsupported), plus the pieces of
the report (table width, bars under CPU pressure, the bandwidth check, figure size) on made-up rows.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastopt.bench import SUITES, harness

REPO = Path(__file__).resolve().parent.parent
QUICK_SUITES = "adamw,sliced-wasserstein,newton_schulz"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """``python -m fastopt.bench --quick`` from an empty directory with no ``--out``: the default."""
    cwd = tmp_path_factory.mktemp("user-dir")
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "fastopt.bench", "--quick", "--device", "cpu", "--suite", QUICK_SUITES,
                           "--budget", "0.02", "--repeats", "3"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = cwd / harness.DEFAULT_OUT
    (json_path,) = out.glob("*.json")
    return proc, json.loads(json_path.read_text()), out


def test_default_out_is_in_the_current_directory(quick_run):
    proc, report, out = quick_run
    assert f"results go to {out.resolve()}" in proc.stdout
    assert f"wrote {out.resolve() / ''}" in proc.stdout and "figure(s) beside it" in proc.stdout
    assert not (Path(out).parent / "bench").exists()


def test_report_rows_and_environment(quick_run):
    _, report, _ = quick_run
    assert report["device"]["name"] and report["versions"]["torch"]
    assert report["bandwidth"]["GBps"] > 0 and report["copy_bandwidth"]["GBps"] > 0
    rows = {(r["op"], r["config"], r["method"]): r for r in report["rows"]}
    for method in ("fastopt-cpu", "torch-fused", "torch-foreach", "torch-forloop"):
        ok = [r for (op, c, m), r in rows.items() if op == "adamw" and m == method and r["status"] == "ok"]
        assert ok, f"{method} did not run: {[r['status'] for (o, c, m), r in rows.items() if m == method]}"
        for r in ok:
            assert r["ms"] > 0 and r["GBps"] > 0 and r["frac_bw"] > 0
            assert isinstance(r["noisy"], bool) and "cpu_stall_pct" in r
    ot_rows = [r for r in report["rows"] if r["op"] == "sliced-wasserstein" and r["status"] == "ok"]
    assert ot_rows and all("GBps" not in r and "frac_bw" not in r for r in ot_rows)


def test_a_finished_run_says_complete(quick_run):
    _, report, out = quick_run
    assert report["complete"] is True and report["suites_done"] == QUICK_SUITES.split(",")
    assert not list(out.glob("*.tmp"))


def test_a_run_stopped_part_way_leaves_the_finished_suites(tmp_path, monkeypatch):
    """The GPU check stops the report at its time limit (SIGINT): the JSON on disk keeps every suite that
    finished, with its bars, and says the run is not complete."""
    real = harness.run_suite
    calls = []

    def stop_at_the_second(suite, ctx):
        calls.append(suite.name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(suite, ctx)

    monkeypatch.setattr(harness, "run_suite", stop_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        harness.main(["--quick", "--device", "cpu", "--suite", "adamw,newton_schulz", "--budget", "0.02",
                      "--repeats", "3", "--no-plot", "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("*.json")
    report = json.loads(json_path.read_text())
    assert report["complete"] is False and report["suites_done"] == ["adamw"]
    assert {r["op"] for r in report["rows"]} == {"adamw"} and report["rows"]
    assert [b["op"] for b in report["bars"]] == ["adamw"] * len(report["bars"]) and report["bars"]
    assert all(r["frac_bw"] > 0 for r in report["rows"] if r["status"] == "ok")


def test_table_fits_a_terminal_and_keeps_whole_statuses(quick_run):
    proc, report, out = quick_run
    widest = max((line for line in proc.stdout.splitlines() if str(out.resolve()) not in line), key=len)
    assert len(widest) <= 120, widest
    # an unsupported row's reason is printed whole (wrapped), not cut
    status = next(r["status"] for r in report["rows"] if r["op"] == "newton_schulz")
    assert status.startswith("unsupported: ")
    assert " ".join(status.split()) in " ".join(proc.stdout.split())


def test_ot_table_has_no_bandwidth_columns(quick_run):
    proc, _, _ = quick_run
    sections = re.split(r"\n(?===)", proc.stdout)
    (ot,) = [s for s in sections if s.startswith("== sliced-wasserstein (")]
    (adamw,) = [s for s in sections if s.startswith("== adamw (")]
    header = ot.splitlines()[1]
    assert "ms" in header.split() and "point_projections/s" in header.split()
    assert "GB/s" not in ot and "bw%" not in ot
    assert "GB/s" in adamw.splitlines()[1] and "bw%" in adamw.splitlines()[1]
    assert "0.000" not in ot  # rates carry SI prefixes instead of rounding to zero


def test_summary_lists_bars_bandwidth_and_pressure(quick_run):
    proc, report, _ = quick_run
    summary = proc.stdout.split("== summary ==", 1)[1]
    assert "attainable bandwidth:" in summary and "CPU pressure:" in summary
    assert "bandwidth check:" in summary or "ABOVE BANDWIDTH" in summary
    for bar in report["bars"]:  # quick runs have no bars of their own on CPU: "N/A (not measured)"
        assert f"{bar['op']} {bar['config']} {bar['method']}" in summary


def test_probe_is_not_below_any_kernel_or_the_report_says_so(quick_run):
    proc, report, _ = quick_run
    bw = report["bandwidth"]
    assert bw["first_GBps"] == max(k["GBps"] for k in bw["kernels"].values())
    assert bw["GBps"] >= bw["kernels"]["copy"]["GBps"]
    assert bw["array_bytes"] >= 4 * (bw["llc_bytes"] or 0)
    # probed again before the memory-bound suite; the reference is the highest probe of the run
    assert [p["before"] for p in bw["reprobes"]] == ["adamw"]
    assert bw["GBps"] == max([bw["first_GBps"]] + [p["GBps"] for p in bw["reprobes"]])
    for r in report["rows"]:
        if r.get("GBps") is not None:
            assert r["frac_bw"] == pytest.approx(r["GBps"] / bw["GBps"])
    for r in report["rows"]:
        if r["status"] == "ok" and r.get("frac_bw") is not None and r["frac_bw"] > 1 and not r["in_cache"]:
            assert f"ABOVE BANDWIDTH: {r['op']} {r['config']} {r['method']}" in proc.stdout


def test_one_sane_figure_per_suite(quick_run):
    from PIL import Image

    _, report, out = quick_run
    # newton_schulz ran nothing on the CPU: no figure for it
    assert set(report["figures"]) == {"adamw", "sliced-wasserstein"}
    for suite, name in report["figures"].items():
        with Image.open(out / name) as im:
            width, height = im.size
        panels = len({r["config"] for r in report["rows"] if r["op"] == suite and r["status"] == "ok"})
        bars = sum(1 for r in report["rows"] if r["op"] == suite and r["status"] == "ok")
        assert 600 <= width <= 1600
        assert height <= 100 * (0.32 * bars + 0.75 * panels + 0.6) + 5, (suite, width, height)


# -- the pieces, on made-up rows (fast, deterministic) ---------------------------------------------
def _ctx(**kw):
    ctx = harness.Context(device=torch.device("cpu"), **kw)
    ctx.bw_GBps, ctx.llc_bytes = 40.0, 32 << 20
    return ctx


def _row(op, config, method, ms, stall=0.0, **extra):
    return {"op": op, "config": config, "method": method, "status": "ok", "ms": ms, "ms_p20": ms * 0.9,
            "ms_p80": ms * 1.1, "params": 20_000_000, "params_per_s": 2e10 / ms, "bytes_per_call": 560_000_000,
            "GBps": 0.56 / ms, "frac_bw": 0.56 / ms / 40, "in_cache": False, "state_MB": 160.0,
            "cpu_stall_pct": stall, "noisy": stall > 10, **extra}


def test_bars_on_noisy_rows_are_not_judged():
    suite = SUITES["adamw"]
    ctx = _ctx()
    quiet = [_row("adamw", "20x1M", "fastopt-cpu", 10.0), _row("adamw", "20x1M", "torch-fused", 12.0)]
    harness.add_speedups(suite, quiet)
    (bar,) = harness.evaluate_bars(suite, quiet, ctx)
    assert bar["result"] == "PASS" and bar["value"] == pytest.approx(1.2)
    # the baseline's timing ran under pressure: the speedup is not judged, whatever its value
    noisy = [_row("adamw", "20x1M", "fastopt-cpu", 10.0), _row("adamw", "20x1M", "torch-fused", 12.0, stall=40.0)]
    harness.add_speedups(suite, noisy)
    (bar,) = harness.evaluate_bars(suite, noisy, ctx)
    assert bar["result"] == "noisy, not judged" and bar["cpu_stall_pct"] == 40.0
    text = harness.format_bars([bar])
    assert text.startswith("NOISY") and "not judged" in text and "PASS" not in text and "FAIL" not in text
    # a failing number under pressure is not a FAIL either; below the threshold it is
    slow = [_row("adamw", "20x1M", "fastopt-cpu", 20.0, stall=25.0), _row("adamw", "20x1M", "torch-fused", 12.0)]
    harness.add_speedups(suite, slow)
    assert harness.evaluate_bars(suite, slow, ctx)[0]["result"] == "noisy, not judged"
    assert harness.evaluate_bars(suite, slow, _ctx(noisy_pct=30.0))[0]["result"] == "FAIL"
    # in the summary: one line per bar, each within the width
    header = {"bandwidth": {"kernel": "add_inplace", "array_bytes": 128 << 20, "kernels": {"copy": {"GBps": 20.0}}},
              "host": {"cpu_stall_pct": 30.0}}
    bars = harness.evaluate_bars(suite, quiet, ctx) + harness.evaluate_bars(suite, noisy, ctx)
    summary = harness.format_summary(bars, quiet + noisy, ctx, header).splitlines()
    assert summary[0] == "== summary ==" and summary[1] == "bars: 2 (1 PASS, 1 noisy)"
    assert summary[2].startswith("PASS   adamw 20x1M fastopt-cpu: speedup vs torch-fused = 1.2 (bar >= 1)")
    assert summary[3].startswith("NOISY  adamw 20x1M fastopt-cpu") and summary[3].endswith("not judged")
    assert max(len(line) for line in summary) <= 120


def test_wide_suites_fit_120_columns():
    # long method names, long baseline names, per-method info columns and a long status
    suite = SUITES["sinkhorn-newton"]
    rows = []
    for k, m in enumerate(("fastopt-sns", "fastopt-sinkhorn", "torch-sinkhorn-log", "pot-sinkhorn-log")):
        r = {"op": suite.name, "config": "n100-eps0.01-f64", "method": m, "eps": 0.01, "tol": 1e-8, "iters": 24 + k,
             "newton": 4, "cg": 98, "err": "5.2e-11", "solves": 1, "bytes_per_call": 80_000, "status": "ok",
             "ms": 123.456 * (k + 1), "ms_p20": 120.0, "ms_p80": 130.0 * (k + 1), "solves_per_s": 8.1,
             "state_MB": None, "cpu_stall_pct": 50.0, "noisy": True}
        rows.append(r)
    rows.append({**rows[0], "method": "fastopt-triton-something-long", "status": "unsupported: " + "why " * 60})
    harness.add_speedups(suite, rows)
    table = harness.format_table(suite, rows, _ctx())
    assert max(len(line) for line in table.splitlines()) <= 120, table
    assert "iters" in table and "noisy" in table and "GB/s" not in table
    assert " ".join(("unsupported: " + "why " * 60).split()) in " ".join(table.split())


def test_rows_above_the_probe_are_named_in_the_summary():
    ctx = _ctx()
    fast = _row("zoo-lion", "20x1M", "fastopt-cpu", 0.01)  # 56 GB/s > 40 GB/s, beyond the cache
    cached = _row("zoo-lion", "4x64K", "fastopt-cpu", 0.001, in_cache=True)
    fine = _row("zoo-lion", "mixed", "fastopt-cpu", 1.0)
    header = {"bandwidth": {"kernel": "add_inplace", "array_bytes": 128 << 20, "kernels": {"copy": {"GBps": 20.0}}},
              "host": {"cpu_stall_pct": 1.0}}
    summary = harness.format_summary([], [fast, cached, fine], ctx, header)
    assert "ABOVE BANDWIDTH: zoo-lion 20x1M fastopt-cpu" in summary
    assert "4x64K" not in summary and "1 cache-resident" in summary
    table = harness.format_table(SUITES["zoo-lion"], [fast, cached, fine], ctx)
    assert "ABOVE BW" in table and "*" in table  # the flag in the row, the cache mark on the bw%
    summary = harness.format_summary([], [cached, fine], ctx, header)
    assert "ABOVE" not in summary and "no row beyond the last-level cache exceeds" in summary


def test_probe_reaches_an_optimizer_step_beyond_the_cache():
    """The attainable bandwidth is at least about what an in-place optimizer kernel gets on a working
    set well beyond the last-level cache (the copy-based measure it replaces was about half of it).
    Idle, the 2-core EPYC gave AdamW 98 % of the probe (best times); the 15 % margin and up to three
    tries are for a shared machine, where a burst of load during the probe makes it come out low (the
    report flags a row above the probe: see the test above)."""
    import time

    import fastopt

    ctx = harness.Context(device=torch.device("cpu"), quick=True)
    n = harness.last_level_cache_bytes(ctx.device) or 32 << 20  # numel: p, g, m and v are 4x the LLC each
    p = torch.nn.Parameter(torch.randn(n))
    p.grad = torch.randn(n)
    opt = fastopt.AdamW([p], lr=1e-3)
    opt.step()
    for attempt in range(3):
        probe = harness.measure_bandwidth(ctx)
        times = []
        for _ in range(8):
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
        step_GBps = 7 * 4 * n / min(times) / 1e9
        assert probe["kernels"]["copy"]["GBps"] <= ctx.bw_GBps
        if step_GBps <= 1.15 * ctx.bw_GBps:
            break
    assert step_GBps <= 1.15 * ctx.bw_GBps, (step_GBps, probe)
