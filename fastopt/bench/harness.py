"""The benchmark harness behind ``python -m fastopt.bench``: suites, timers, and the report.

An op joins the report by registering a :class:`Suite` (see ``fastopt/bench/adamw.py``): a function
that lists :class:`Case` objects for a device — one (config, method) pair each, with the work it does
(items processed and bytes moved per call) and a ``setup`` that builds a :class:`Workload` lazily, so
only one case's tensors are alive at a time — plus a baseline method for the speedup column and the
performance bars the issue sets, as data (:class:`Bar`).  The harness does the rest, the same way for
every op:

* timing — on CUDA ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (warm-up, L2 flushed
  between calls), or CUDA events after a warm-up when triton is missing; on CPU the median (and
  p20/p80) of ``time.perf_counter`` repeats after a warm-up, at least ``min_repeats`` of them and more
  until ``budget_s`` has passed;
* throughput — items/s, GB/s from the suite's bytes-moved model, and the fraction of the device's
  copy bandwidth, measured in the same run as a large ``dst.copy_(src)`` (bytes = read + write).
  On a CPU the copy also reads each destination line before writing it (write-allocate), traffic
  that count leaves out, so a kernel that writes only lines it has just read (AdamW) can exceed 100%;
* memory — ``state_MB`` (bytes of the optimizer state tensors, any device) and, on CUDA,
  ``peak_step_MB``: the ``torch.cuda.max_memory_allocated`` rise during one call, over what was
  allocated before it.  On CPU no allocator peak is available, so that column is left empty;
* output — progress on stderr, a table and a "bars" section (each bar PASS/FAIL with the measured
  number) on stdout, ``<out>/<device>-<date>.json`` (device name, versions, git sha, command line,
  copy bandwidth, every row) and a PNG plot beside it.  The JSON also records ``cpu_stall_pct``: the
  share of the run during which some task waited for a CPU (Linux ``/proc/pressure/cpu``); a high
  value means other processes competed with the benchmark and its CPU timings are noisy.
"""
import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

SUITES = {}
SCHEMA_VERSION = 1


class Unsupported(Exception):
    """Raised by a case's setup when its method cannot run on this device or install."""


@dataclass
class Workload:
    """What one case times: ``fn`` (one call = one unit of work) and how to size its state."""

    fn: Callable[[], object]
    state_bytes: Optional[Callable[[], int]] = None


@dataclass
class Case:
    """One (config, method) measurement of a suite.

    ``items`` and ``bytes_moved`` describe one call of the workload (e.g. parameters updated and the
    bytes an ideal kernel must read and write); ``info`` holds descriptive columns (dtype, tensors).
    """

    config: str
    method: str
    items: int
    bytes_moved: int
    setup: Callable[[], Workload]
    info: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Bar:
    """A performance bar: ``metric`` of the row (config, method) must be at least ``threshold``."""

    config: str
    method: str
    metric: str
    threshold: float


@dataclass
class Suite:
    """A registered benchmark: ``cases(ctx)`` lists what to measure on ``ctx.device``.

    ``unit`` names what ``items`` counts (it becomes the ``<unit>_per_s`` column); rows get a
    ``speedup_vs_<baseline>`` column when ``baseline`` names one of the methods; ``bars(ctx)`` lists
    the bars the report evaluates from the measured rows.
    """

    name: str
    cases: Callable[["Context"], list]
    unit: str = "items"
    baseline: Optional[str] = None
    bars: Callable[["Context"], list] = lambda ctx: []
    other_baselines: tuple = ()  # more methods to get a speedup_vs_<method> column

    @property
    def speedup_key(self):
        return speedup_key(self.baseline) if self.baseline else None


def speedup_key(method):
    return "speedup_vs_" + re.sub(r"\W", "_", method)


def register(suite):
    """Add ``suite`` to the report (``python -m fastopt.bench --ops <suite.name>``)."""
    if suite.name in SUITES:
        raise ValueError(f"benchmark suite {suite.name!r} is already registered")
    SUITES[suite.name] = suite
    return suite


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and the 20th / 80th percentiles over ``repeats`` calls
    (None when ``do_bench`` chose the count)."""

    ms: float
    ms_p20: float
    ms_p80: float
    repeats: Optional[int]


@dataclass
class Context:
    """Where and how long to measure; ``copy_GBps`` is filled in by :func:`measure_copy_bandwidth`."""

    device: torch.device
    quick: bool = False
    min_repeats: int = 10
    budget_s: float = 1.0
    rounds: int = 1
    copy_GBps: Optional[float] = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time(self, fn):
        """Time ``fn`` on this context's device (see the module docstring for the method)."""
        if self.device.type == "cuda":
            return _time_cuda(fn, self)
        return _time_cpu(fn, self)


def progress(msg):
    print(msg, file=sys.stderr, flush=True)


# -- timing -------------------------------------------------------------------------------------
def _quantiles(times_ms):
    q = torch.tensor(times_ms, dtype=torch.float64).quantile(torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
    return q.tolist()


def _time_cpu(fn, ctx):
    warm_until = time.perf_counter() + 0.1 * ctx.budget_s
    for i in range(1000):
        fn()
        if i >= 1 and time.perf_counter() >= warm_until:
            break
    times = []
    deadline = time.perf_counter() + ctx.budget_s
    while len(times) < ctx.min_repeats or (time.perf_counter() < deadline and len(times) < 10_000):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return Timing(*_quantiles(times), repeats=len(times))


def _estimate_cuda_ms(fn, ctx):
    fn()
    ctx.sync()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        fn()
    end.record()
    ctx.sync()
    return max(start.elapsed_time(end) / 3, 1e-3)


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except ImportError:
        return None
    return do_bench


def _time_cuda(fn, ctx):
    estimate = _estimate_cuda_ms(fn, ctx)
    rep_ms = max(ctx.budget_s * 1e3, ctx.min_repeats * estimate * 1.2)
    do_bench = _triton_do_bench()
    if do_bench is not None:
        ms, p20, p80 = do_bench(fn, warmup=max(10.0, 0.1 * rep_ms), rep=rep_ms,
                                quantiles=[0.5, 0.2, 0.8])
        return Timing(ms, p20, p80, repeats=None)
    for _ in range(max(2, int(0.1 * rep_ms / estimate))):
        fn()
    n = max(ctx.min_repeats, int(rep_ms / estimate))
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    ctx.sync()
    return Timing(*_quantiles([s.elapsed_time(e) for s, e in events]), repeats=n)


def peak_step_bytes(fn, ctx):
    """On CUDA, how far one call of ``fn`` raises allocated memory above its starting level."""
    if ctx.device.type != "cuda":
        return None
    ctx.sync()
    torch.cuda.reset_peak_memory_stats(ctx.device)
    before = torch.cuda.memory_allocated(ctx.device)
    fn()
    ctx.sync()
    return torch.cuda.max_memory_allocated(ctx.device) - before


def measure_copy_bandwidth(ctx):
    """GB/s of ``dst.copy_(src)`` on a buffer far larger than the caches (bytes = read + write)."""
    mib = {("cuda", False): 1024, ("cuda", True): 256, ("cpu", False): 256, ("cpu", True): 64}
    nbytes = mib[(ctx.device.type, ctx.quick)] << 20
    progress(f"[copy] measuring copy bandwidth: {nbytes >> 20} MiB dst.copy_(src) on {ctx.device}")
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=ctx.device)
    dst = torch.empty_like(src)
    timing = ctx.time(lambda: dst.copy_(src))
    ctx.copy_GBps = 2 * nbytes / (timing.ms * 1e-3) / 1e9
    progress(f"[copy] {ctx.copy_GBps:.1f} GB/s")
    return {"bytes_per_copy": 2 * nbytes, "ms": timing.ms, "GBps": ctx.copy_GBps}


# -- running suites -----------------------------------------------------------------------------
def _release(ctx):
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(suite, case, ctx):
    """Measure one case and return its result row (status "ok", "unsupported: ..." or "error: ...")."""
    row = {"op": suite.name, "config": case.config, "method": case.method, **case.info,
           suite.unit: case.items, "bytes_per_call": case.bytes_moved, "status": "ok"}
    try:
        workload = case.setup()
        timing = ctx.time(workload.fn)
        peak = peak_step_bytes(workload.fn, ctx)
        state = workload.state_bytes() if workload.state_bytes else None
    except Unsupported as e:
        row["status"] = f"unsupported: {e}"
        return row
    except Exception as e:  # a failing method is reported in its row; the other cases still run
        row["status"] = f"error: {type(e).__name__}: {e}"
        return row
    finally:
        workload = None
        _release(ctx)
    seconds = timing.ms * 1e-3
    gbps = case.bytes_moved / seconds / 1e9
    row.update({
        "ms": timing.ms, "ms_p20": timing.ms_p20, "ms_p80": timing.ms_p80, "repeats": timing.repeats,
        f"{suite.unit}_per_s": case.items / seconds, "GBps": gbps,
        "frac_copy_bw": gbps / ctx.copy_GBps if ctx.copy_GBps else None,
        "state_MB": state / 1e6 if state is not None else None,
        "peak_step_MB": peak / 1e6 if peak is not None else None,
    })
    return row


def add_speedups(suite, rows):
    """``speedup_vs_<baseline>`` = baseline ms / ms, per config; None where either did not run."""
    for baseline in ((suite.baseline,) if suite.baseline else ()) + tuple(suite.other_baselines):
        base = {r["config"]: r.get("ms") for r in rows if r["method"] == baseline}
        for r in rows:
            b = base.get(r["config"])
            r[speedup_key(baseline)] = b / r["ms"] if b and r.get("ms") else None


def run_suite(suite, ctx):
    """Every case of ``suite``, ``ctx.rounds`` times round-robin; each case keeps its median round.

    Rounds spread slow drifts of the machine (other processes, memory placement) over all methods
    instead of charging them to whichever method happened to run at the time.
    """
    cases = suite.cases(ctx)
    runs = [[] for _ in cases]
    for r in range(ctx.rounds):
        for k, case in enumerate(cases):
            tag = f"[{suite.name} round {r + 1}/{ctx.rounds}, {k + 1}/{len(cases)}] {case.config} {case.method}"
            progress(f"{tag} ...")
            row = run_case(suite, case, ctx)
            progress(f"{tag}: " + (f"{row['ms']:.3f} ms" if row["status"] == "ok" else row["status"]))
            runs[k].append(row)
    rows = []
    for case_runs in runs:
        ok = sorted((row for row in case_runs if row["status"] == "ok"), key=lambda row: row["ms"])
        row = dict(ok[(len(ok) - 1) // 2] if len(ok) == len(case_runs) else case_runs[-1])
        row["rounds_ms"] = [row_r.get("ms") for row_r in case_runs]
        rows.append(row)
    add_speedups(suite, rows)
    return rows


def evaluate_bars(suite, rows, ctx):
    """Each bar of ``suite`` as a dict with its measured value and "PASS", "FAIL" or "n/a"."""
    out = []
    for bar in suite.bars(ctx):
        row = next((r for r in rows if r["config"] == bar.config and r["method"] == bar.method), None)
        value = row.get(bar.metric) if row else None
        if value is None:
            why = "not measured" if row is None else row["status"] if row["status"] != "ok" else "no value"
            verdict = f"n/a ({why})"
        else:
            verdict = "PASS" if value >= bar.threshold else "FAIL"
        out.append({"op": suite.name, **dataclasses.asdict(bar), "value": value, "result": verdict})
    return out


# -- the environment ----------------------------------------------------------------------------
def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _git(*args):
    try:
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=Path(__file__).resolve().parent,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_stall_us():
    """Linux PSI: total microseconds during which some runnable task waited for a CPU."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


class CpuContention:
    """The share of a run's wall time in which some task waited for a CPU (None without PSI)."""

    def __init__(self):
        self.t0, self.stall0 = time.monotonic(), _cpu_stall_us()

    def percent(self):
        stall = _cpu_stall_us()
        if stall is None or self.stall0 is None:
            return None
        return 100 * (stall - self.stall0) / ((time.monotonic() - self.t0) * 1e6)


def environment(ctx, argv):
    """The JSON header: what ran, where, with what, when."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fastopt
    from fastopt import _backend

    sha = _git("rev-parse", "HEAD")
    dirty = _git("status", "--porcelain", "--untracked-files=no") if sha else None
    name = device_name(ctx.device)
    return {
        "schema": SCHEMA_VERSION,
        "command": shlex.join(["python", "-m", "fastopt.bench", *argv]),
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": {"type": ctx.device.type, "name": name, "slug": slug(name)},
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                 "torch_threads": torch.get_num_threads()},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "triton": triton_version, "fastopt": fastopt.__version__,
                     "cuda": torch.version.cuda},
        "git": {"sha": sha or "unknown", "dirty": bool(dirty) if dirty is not None else None},
        "fastopt_build": _backend.build_info(),
        "settings": {"quick": ctx.quick, "min_repeats": ctx.min_repeats, "budget_s": ctx.budget_s,
                     "env": {k: os.environ[k] for k in ("TRITON_INTERPRET", "OMP_NUM_THREADS",
                                                         "CUDA_VISIBLE_DEVICES") if k in os.environ}},
        "memory_columns": {"state_MB": "bytes of the optimizer state tensors after warm-up",
                           "peak_step_MB": "CUDA only: max_memory_allocated rise during one call"},
    }


# -- output -------------------------------------------------------------------------------------
def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _sig(value):
    """A rate with three significant digits (no exponent up to 1e6)."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


_MEASURED = ("ms", "ms_p20", "ms_p80", "repeats", "GBps", "frac_copy_bw", "state_MB", "peak_step_MB")


def _info_keys(suite, rows):
    """The descriptive columns the suite's cases added (``Case.info``), in order of appearance."""
    fixed = {"op", "config", "method", suite.unit, "bytes_per_call", "status", f"{suite.unit}_per_s",
             suite.speedup_key, "rounds_ms", *_MEASURED, *(speedup_key(b) for b in suite.other_baselines)}
    return list(dict.fromkeys(k for r in rows for k in r if k not in fixed))


def format_table(suite, rows):
    """The rows of one suite as an aligned text table."""
    info_keys = _info_keys(suite, rows)
    has_peak = any(r.get("peak_step_MB") is not None for r in rows)
    headers = ["config", "method", *info_keys, f"M{suite.unit}", "ms", "p20-p80", f"M{suite.unit}/s", "GB/s",
               "copy%", "state_MB", *(["peak_MB"] if has_peak else []),
               *([f"vs {suite.baseline}"] if suite.baseline else []), *(f"vs {b}" for b in suite.other_baselines),
               "status"]
    lines = []
    for r in rows:
        cells = [r["config"], r["method"], *(str(r.get(k, "-")) for k in info_keys), f"{r[suite.unit] / 1e6:.3f}"]
        if r["status"] == "ok":
            frac = r["frac_copy_bw"]
            cells += [f"{r['ms']:.3f}", f"{r['ms_p20']:.3f}-{r['ms_p80']:.3f}",
                      _sig(r[f"{suite.unit}_per_s"] / 1e6), _sig(r["GBps"]),
                      _fmt(frac * 100 if frac is not None else None, ".0f"), _fmt(r["state_MB"], ".1f"),
                      *([_fmt(r["peak_step_MB"], ".1f")] if has_peak else []),
                      *([_fmt(r[suite.speedup_key], ".2f") + "x"] if suite.baseline else []),
                      *("-" if r.get(speedup_key(b)) is None else f"{r[speedup_key(b)]:.2f}x"
                        for b in suite.other_baselines)]
        else:
            cells += ["-"] * (len(headers) - len(cells) - 1)
        cells.append(r["status"] if len(r["status"]) <= 70 else r["status"][:67] + "...")
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(headers)]
    left = {0, 1, len(headers) - 1}

    def fmt_line(cells):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join(fmt_line(c).rstrip() for c in [headers, ["-" * w for w in widths], *lines])


def format_bars(bars):
    lines = []
    for b in bars:
        value = "-" if b["value"] is None else f"{b['value']:.3f}"
        lines.append(f"{b['result']:<4}  {b['op']} {b['config']}: {b['method']} {b['metric']} = {value} "
                     f"(bar: >= {b['threshold']})")
    return "\n".join(lines) if lines else "(no bars for this device)"


def plot(path, rows, header):
    """A horizontal bar chart of ms per call (median, p20-p80 whiskers) per method, one panel per config."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for r in rows:
        if r["status"] == "ok":
            groups.setdefault((r["op"], r["config"]), []).append(r)
    if not groups:
        return False
    ncols = min(len(groups), 2)
    nrows = math.ceil(len(groups) / ncols)
    tallest = max(len(g) for g in groups.values())
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, (0.5 * tallest + 1.4) * nrows + 0.6),
                             squeeze=False)
    for ax, ((op, config), group) in zip(axes.flat, groups.items()):
        ms = [r["ms"] for r in group]
        err = [[r["ms"] - r["ms_p20"] for r in group], [r["ms_p80"] - r["ms"] for r in group]]
        colors = ["tab:blue" if r["method"].startswith("fastopt") else "tab:gray" for r in group]
        ax.barh([r["method"] for r in group], ms, xerr=err, color=colors, capsize=3)
        ax.invert_yaxis()
        for i, r in enumerate(group):
            frac = f", {r['frac_copy_bw']:.0%} of copy" if r["frac_copy_bw"] is not None else ""
            ax.text(r["ms_p80"], i, f"  {r['ms']:.3g} ms, {_sig(r['GBps'])} GB/s{frac}", va="center", fontsize=8)
        if max(ms) > 10 * min(ms):
            ax.set_xscale("log")
            ax.set_xlim(min(r["ms_p20"] for r in group) / 2, max(ms) * 8)
        else:
            ax.set_xlim(0, max(ms) * 1.6)
        extra = ", ".join(f"{k} {group[0][k]}" for k in _info_keys(SUITES[op], group))
        ax.set_title(f"{op} {config} ({extra})" if extra else f"{op} {config}", fontsize=10)
        ax.set_xlabel("ms per call (median; whiskers p20-p80)")
    for ax in list(axes.flat)[len(groups):]:
        ax.set_visible(False)
    copy = header.get("copy_bandwidth", {}).get("GBps")
    fig.suptitle(f"{header['device']['name']} | copy {copy:.1f} GB/s | torch {header['versions']['torch']} | "
                 f"{header['git']['sha'][:10]} | {header['timestamp'][:10]}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# -- the command line ---------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastopt.bench",
        description="Benchmark fastopt's kernels beside their peers on one device: a table and the bars on "
                    "stdout, progress on stderr, <device>-<date>.json and .png in --out.")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    p.add_argument("--ops", default=",".join(SUITES),
                   help=f"comma-separated suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--out", default="bench/results", help="directory for the JSON and PNG (default: %(default)s)")
    p.add_argument("--device", choices=["cpu", "cuda"],
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to benchmark (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=None,
                   help="minimum timed repeats per case (default: 10, --quick: 3)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repeats per case (default: 1.0, --quick: 0.1)")
    p.add_argument("--rounds", type=int, default=None,
                   help="round-robin passes over all cases; each case reports its median pass "
                        "(default: 3 on CPU, 1 on CUDA and with --quick)")
    args = p.parse_args(argv)
    args.ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    unknown = [o for o in args.ops if o not in SUITES]
    if unknown or not args.ops:
        p.error(f"unknown suite(s) {unknown}; registered: {', '.join(SUITES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    ctx = Context(device=torch.device(args.device), quick=args.quick,
                  min_repeats=args.repeats if args.repeats is not None else (3 if args.quick else 10),
                  budget_s=args.budget if args.budget is not None else (0.1 if args.quick else 1.0),
                  rounds=args.rounds if args.rounds is not None else (
                      1 if args.quick or args.device == "cuda" else 3))
    contention = CpuContention()
    header = environment(ctx, argv)
    print(f"fastopt benchmark report: {header['device']['name']} ({ctx.device.type}), torch "
          f"{header['versions']['torch']}, triton {header['versions']['triton'] or 'not installed'}, git {header['git']['sha'][:10]}"
          f"{' (dirty)' if header['git']['dirty'] else ''}, {header['host']['torch_threads']} torch threads")
    header["copy_bandwidth"] = measure_copy_bandwidth(ctx)
    print(f"copy bandwidth (dst.copy_(src), read+write): {ctx.copy_GBps:.1f} GB/s")
    rows, bars = [], []
    for name in args.ops:
        suite = SUITES[name]
        suite_rows = run_suite(suite, ctx)
        rows += suite_rows
        bars += evaluate_bars(suite, suite_rows, ctx)
        print(f"\n== {name} ({ctx.device.type}) ==")
        print(format_table(suite, suite_rows))
    print("\n== bars ==")
    print(format_bars(bars))

    stalled = contention.percent()
    header["host"]["cpu_stall_pct"] = stalled
    if stalled is not None:
        print(f"\nCPU contention during the run: some task waited for a CPU {stalled:.1f}% of the time "
              "(/proc/pressure/cpu)" + ("; timings are noisy" if stalled > 5 else ""))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{header['device']['slug']}-{header['timestamp'][:10]}{'-quick' if ctx.quick else ''}"
    json_path, png_path = out / f"{stem}.json", out / f"{stem}.png"
    json_path.write_text(json.dumps({**header, "rows": rows, "bars": bars}, indent=2) + "\n")
    print(f"\nwrote {json_path}")
    if plot(png_path, rows, header):
        print(f"wrote {png_path}")
    return 1 if any(r["status"].startswith("error") for r in rows) else 0
