"""The benchmark harness behind ``python -m fastopt.bench``: suites, timers, and the report.

An op joins the report by registering a :class:`Suite` (see ``fastopt/bench/adamw.py``): a function
that lists :class:`Case` objects for a device — one (config, method) pair each, with the work it does
(items processed and bytes moved per call) and a ``setup`` that builds a :class:`Workload` lazily, so
only one case's tensors are alive at a time — plus a baseline method for the speedup column and the
performance bars it must meet, as data (:class:`Bar`).  The harness does the rest, the same way for
every op:

* timing — on CUDA ``triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])`` (warm-up, L2 flushed
  between calls), or CUDA events after a warm-up when triton is missing; on CPU the median (and
  p20/p80) of ``time.perf_counter`` repeats after a warm-up, at least ``min_repeats`` of them and more
  until ``budget_s`` has passed;
* throughput — items/s and, for memory-bound suites (``Suite.memory_bound``), GB/s from the
  suite's bytes-moved model and ``frac_bw``: that GB/s over the device's attainable memory bandwidth,
  measured in the same run by :func:`measure_bandwidth` (a STREAM-style probe: copy, scale in place,
  ``a += s * b`` in place and the triad ``c = a + s * b`` on arrays several times the last-level
  cache, all threads, warm pages, the best of many repeats; bytes counted as STREAM counts them;
  probed again, shorter, before each memory-bound suite, and the highest figure of the run is used).
  A row whose working set fits in the last-level cache is marked ``in_cache`` (its ``frac_bw`` is
  not a memory figure); any other row above the probe is listed in the report's bandwidth check;
* memory — ``state_MB`` (bytes of the optimizer state tensors, any device) and, on CUDA,
  ``peak_step_MB``: the ``torch.cuda.max_memory_allocated`` rise during one call, over what was
  allocated before it.  On CPU no allocator peak is available, so that column is left empty;
* noise — each row records ``cpu_stall_pct``, the share of its timed wall time in which some task
  waited for a CPU (Linux ``/proc/pressure/cpu``), and ``noisy`` when that is above the threshold
  (``--noisy-threshold``, default 10 %): a bar measured on a noisy row is reported "noisy, not
  judged" instead of PASS or FAIL;
* output — progress on stderr; on stdout one table per suite (<= 120 columns: per-suite columns,
  the config as a heading line; everything else is in the JSON), then a summary (each bar PASS /
  FAIL / noisy, the bandwidth check, CPU pressure); ``<out>/<device>-<date>.json`` (device,
  versions, git sha, command line, the bandwidth probe, every row, every bar) and one PNG per
  suite beside it (``<device>-<date>-<suite>.png``).  ``--out`` defaults to
  ``./fastopt-bench-results`` in the current directory.
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
SCHEMA_VERSION = 3  # 2: the bandwidth probe ("bandwidth", "frac_bw", "in_cache"), per-row CPU pressure, "figures";
# 3: the report is rewritten after every suite: "complete" (false until the last suite ran), "suites_done"


class Unsupported(Exception):
    """Raised by a case's setup when its method cannot run on this device or install."""


def fastopt_backend(method, device):
    """The backend of a ``fastopt-<backend>`` method on ``device``; Unsupported when it is not available
    there, or when it is the Triton interpreter (a CPU test vehicle, not benchmarked)."""
    from fastopt._backend import available_backends

    backend, usable = method.removeprefix("fastopt-"), available_backends(device)
    if backend not in usable:
        raise Unsupported(f"backend {backend!r} is not among available_backends({device.type!r}) = {usable}")
    if backend == "triton" and device.type == "cpu":
        raise Unsupported("triton on CPU runs only in the TRITON_INTERPRET interpreter; not benchmarked")
    return backend


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
    memory_bound: bool = True  # False: no GB/s or bandwidth columns (compute-bound work: OT, Newton-Schulz)
    what: str = ""  # one call, in words, for the table's heading ("one opt.step()")

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
    """Where and how long to measure; ``bw_GBps`` and ``llc_bytes`` are filled in by :func:`measure_bandwidth`."""

    device: torch.device
    quick: bool = False
    min_repeats: int = 10
    budget_s: float = 1.0
    rounds: int = 1
    bw_GBps: Optional[float] = None  # attainable memory bandwidth (measure_bandwidth)
    llc_bytes: Optional[int] = None  # last-level cache (CPU) or L2 (CUDA) size
    noisy_pct: float = 10.0  # CPU pressure (%) above which a row is "noisy" and its bars are not judged
    bw_stall_pct: Optional[float] = None  # CPU pressure during the bandwidth probe
    bw_kernel: Optional[str] = None  # the probe kernel that gave bw_GBps

    @property
    def copy_GBps(self):  # the name before the bandwidth probe; same number
        return self.bw_GBps

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


def last_level_cache_bytes(device):
    """The largest cache of ``device``: the CPU's last level (sysfs) or the GPU's L2 (None if unknown)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "L2_cache_size", None)
    best = None
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            kind = (index / "type").read_text().strip()
        except OSError:
            continue
        m = re.fullmatch(r"(\d+)([KMG]?)", text)
        if m and kind != "Instruction":
            size = int(m.group(1)) << {"": 0, "K": 10, "M": 20, "G": 30}[m.group(2)]
            best = max(best or 0, size)
    return best


def _probe_times(fn, ctx, repeats):
    """Seconds per call of ``fn``: the best and the median of ``repeats`` calls after two warm-ups."""
    fn()
    fn()
    ctx.sync()
    times = []
    if ctx.device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        ctx.sync()
        times = [s.elapsed_time(e) * 1e-3 for s, e in events]
    else:
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    times.sort()
    return times[0], times[len(times) // 2]


# STREAM's kernels on torch ops, plus in-place ones; bytes per element as STREAM counts them (what the
# program reads and writes, not the write-allocate reads a CPU adds for a destination it has not
# read).  The in-place ones have the access pattern of the optimizer kernels (read a line, write it
# back).
BANDWIDTH_KERNELS = {
    "copy": (2, lambda a, b, c: c.copy_(a)),
    "scale_inplace": (2, lambda a, b, c: a.mul_(1.0)),
    "add_inplace": (3, lambda a, b, c: a.add_(b, alpha=1e-30)),
    # three read streams, one written back: closer to the mix of an optimizer step (3-6 read streams)
    "addcmul_inplace": (4, lambda a, b, c: a.addcmul_(b, c, value=1e-30)),
    "triad": (3, lambda a, b, c: torch.add(a, b, alpha=0.5, out=c)),
}


def measure_bandwidth(ctx, names=None, one_thread=True, repeats=None):
    """The device's attainable memory bandwidth: STREAM-style kernels on torch ops (see
    ``BANDWIDTH_KERNELS``) over three float32 arrays of at least 4x the last-level cache each, pages
    touched before timing, every thread torch uses (and one thread too on a CPU: on a shared machine
    one thread may get more), the best of ``repeats`` calls per kernel; ``ctx.bw_GBps`` becomes the
    best kernel's GB/s, or stays at an earlier probe's higher figure (the report probes again, shorter,
    before each memory-bound suite: a VM's memory bandwidth moves with its neighbours, which CPU
    pressure does not show, and the reference is the most the machine gave during the run).  A plain ``dst.copy_(src)`` is the slowest of these on a CPU: writing lines it
    has not read costs a write-allocate read the bytes model does not count, which the in-place
    optimizer kernels never pay, so a copy-based figure is too low for them."""
    ctx.llc_bytes = last_level_cache_bytes(ctx.device)
    floor = {("cuda", False): 1024, ("cuda", True): 256, ("cpu", False): 256, ("cpu", True): 128}
    nbytes = min(max(floor[(ctx.device.type, ctx.quick)] << 20, 4 * (ctx.llc_bytes or 0)), 2 << 30)
    repeats = repeats or (10 if ctx.quick else 30)
    names = list(names or BANDWIDTH_KERNELS)
    progress(f"[bandwidth] STREAM-style probe on {ctx.device}: 3 x {nbytes >> 20} MiB float32, "
             f"best of {repeats} per kernel")
    arrays = [torch.full((nbytes // 4,), 1.0 + i, dtype=torch.float32, device=ctx.device) for i in range(3)]
    threads = torch.get_num_threads()
    thread_counts = [threads] if ctx.device.type == "cuda" or threads == 1 or not one_thread else [threads, 1]
    stall = CpuContention()
    kernels = {}
    try:
        for nthreads in thread_counts:
            torch.set_num_threads(nthreads)
            for name in names:
                units, kernel = BANDWIDTH_KERNELS[name]
                best, median = _probe_times(lambda: kernel(*arrays), ctx, repeats)
                key = name if nthreads == threads else f"{name}@{nthreads}thread"
                kernels[key] = {"GBps": units * nbytes / best / 1e9, "GBps_median": units * nbytes / median / 1e9,
                                "bytes_per_call": units * nbytes, "threads": nthreads}
    finally:
        torch.set_num_threads(threads)
        arrays = None
        _release(ctx)
    best_name = max(kernels, key=lambda k: kernels[k]["GBps"])
    best, stall_pct = kernels[best_name]["GBps"], stall.percent()
    if ctx.bw_GBps is None or best > ctx.bw_GBps:
        ctx.bw_GBps, ctx.bw_stall_pct, ctx.bw_kernel = best, stall_pct, best_name
    progress("[bandwidth] " + ", ".join(f"{k} {v['GBps']:.1f}" for k, v in kernels.items()) + " GB/s")
    return {"GBps": best, "kernel": best_name, "array_bytes": nbytes, "repeats": repeats,
            "llc_bytes": ctx.llc_bytes, "cpu_stall_pct": stall_pct, "kernels": kernels}


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
        stall = CpuContention()
        timing = ctx.time(workload.fn)
        stall_pct = stall.percent()
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
    row.update({
        "ms": timing.ms, "ms_p20": timing.ms_p20, "ms_p80": timing.ms_p80, "repeats": timing.repeats,
        f"{suite.unit}_per_s": case.items / seconds,
        "state_MB": state / 1e6 if state is not None else None,
        "peak_step_MB": peak / 1e6 if peak is not None else None,
        "cpu_stall_pct": stall_pct, "noisy": stall_pct is not None and stall_pct > ctx.noisy_pct,
    })
    if suite.memory_bound:
        gbps = case.bytes_moved / seconds / 1e9
        row.update({"GBps": gbps, "frac_bw": gbps / ctx.bw_GBps if ctx.bw_GBps else None,
                    # the bytes model counts a footprint of at most about half the bytes moved
                    "in_cache": bool(ctx.llc_bytes) and case.bytes_moved <= 2 * ctx.llc_bytes})
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
        stalls = []
        if value is None:
            why = "not measured" if row is None else row["status"] if row["status"] != "ok" else "no value"
            verdict = f"n/a ({why})"
        else:
            # the rows the number depends on: the row, the baseline of a speedup, the probe of a fraction
            used = [row]
            if bar.metric.startswith("speedup_vs_"):
                base = [m for m in (suite.baseline, *suite.other_baselines) if m and speedup_key(m) == bar.metric]
                used += [r for r in rows if r["config"] == bar.config and base and r["method"] == base[0]]
            stalls = [r.get("cpu_stall_pct") for r in used]
            if bar.metric == "frac_bw":
                stalls.append(ctx.bw_stall_pct)
            noisy = any(x is not None and x > ctx.noisy_pct for x in stalls)
            verdict = "noisy, not judged" if noisy else "PASS" if value >= bar.threshold else "FAIL"
        known = [x for x in stalls if x is not None]
        out.append({"op": suite.name, **dataclasses.asdict(bar), "value": value, "result": verdict,
                    "cpu_stall_pct": max(known) if known else None})
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
TABLE_WIDTH = 120


def _fmt(value, spec):
    return "-" if value is None else format(value, spec)


def _sig(value):
    """A rate with three significant digits (no exponent up to 1e6)."""
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


def si(value):
    """``value`` with three significant digits and an SI prefix (1.43M, 72.5, 0.0123)."""
    if value is None:
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{prefix}"
    return f"{value:.3g}"


def _ms(value):
    return "-" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


_MEASURED = ("ms", "ms_p20", "ms_p80", "repeats", "GBps", "frac_bw", "state_MB", "peak_step_MB",
             "cpu_stall_pct", "noisy", "in_cache")


def _info_keys(suite, rows):
    """The descriptive columns the suite's cases added (``Case.info``), in order of appearance."""
    fixed = {"op", "config", "method", suite.unit, "bytes_per_call", "status", f"{suite.unit}_per_s",
             suite.speedup_key, "rounds_ms", *_MEASURED, *(speedup_key(b) for b in suite.other_baselines)}
    return list(dict.fromkeys(k for r in rows for k in r if k not in fixed))


def _split_info(suite, rows):
    """Info keys constant within every config (they go in the config's heading) and the varying ones."""
    keys = _info_keys(suite, rows)
    by_config = {}
    for r in rows:
        by_config.setdefault(r["config"], []).append(r)
    constant = [k for k in keys if all(len({str(r.get(k, "-")) for r in g}) == 1 for g in by_config.values())]
    return constant, [k for k in keys if k not in constant], by_config


def config_heading(suite, group, constant):
    r = group[0]
    bits = [f"{k} {r.get(k, '-')}" for k in constant]
    bits.append(f"{si(r[suite.unit])} {suite.unit}/call")
    if suite.memory_bound:
        bits.append(f"{r['bytes_per_call'] / 1e6:.3g} MB moved/call")
    return f"{r['config']} ({', '.join(bits)})"


def _notes(r):
    notes = []
    if r.get("noisy"):
        notes.append("noisy")
    if r.get("frac_bw") is not None and r["frac_bw"] > 1 and not r.get("in_cache"):
        notes.append("ABOVE BW")
    return ",".join(notes)


def format_table(suite, rows, ctx=None, width=TABLE_WIDTH):
    """The rows of one suite as a text table no wider than ``width``: a heading line per config, then
    one line per method.  Columns that do not fit are dropped (they stay in the JSON); the status of a
    row that did not run is written across the measured columns, wrapped."""
    import textwrap

    constant, varying, by_config = _split_info(suite, rows)
    has_peak = any(r.get("peak_step_MB") is not None for r in rows)
    has_state = any(r.get("state_MB") is not None for r in rows)
    baselines = [b for b in ((suite.baseline,) if suite.baseline else ()) + tuple(suite.other_baselines)
                 if any(r.get(speedup_key(b)) is not None for r in rows)]

    def bw_cell(r):
        f = r.get("frac_bw")
        return "-" if f is None else f"{f * 100:.0f}" + ("*" if r.get("in_cache") else "")

    # (header, cell function, drop priority: higher is dropped first; None = never dropped)
    columns = [("method", lambda r: r["method"], None),
               *((k, lambda r, k=k: str(r.get(k, "-")), 5) for k in varying),
               ("ms", lambda r: _ms(r["ms"]), None),
               ("spread%", lambda r: f"{100 * (r['ms_p80'] - r['ms_p20']) / r['ms']:.0f}" if r["ms"] else "-", 4),
               (f"{suite.unit}/s", lambda r: si(r[f"{suite.unit}_per_s"]), 2)]
    if suite.memory_bound:
        columns += [("GB/s", lambda r: _sig(r["GBps"]), 1), ("bw%", bw_cell, None)]
    if has_state:
        columns.append(("state MB", lambda r: _fmt(r.get("state_MB"), ".1f"), 3))
    if has_peak:
        columns.append(("peak MB", lambda r: _fmt(r.get("peak_step_MB"), ".1f"), 3))
    for b in baselines:
        columns.append((f"vs {b}", lambda r, b=b: "-" if r.get(speedup_key(b)) is None
                        else f"{r[speedup_key(b)]:.2f}x", None))
    columns.append(("note", _notes, None))

    legend = []

    def render(cols):
        ok_rows = [r for r in rows if r["status"] == "ok"]
        if not any(_notes(r) for r in ok_rows):
            cols = [c for c in cols if c[0] != "note"]
        cells = {id(r): [c[1](r) if (r["status"] == "ok" or i == 0 or c[0] in varying) else ""
                         for i, c in enumerate(cols)] for r in rows}
        widths = [max([len(c[0])] + [len(cells[id(r)][i]) for r in (rows if i == 0 or c[0] in varying else ok_rows)])
                  for i, c in enumerate(cols)]
        lead = 1 + sum(c[0] in varying for c in cols)  # method and the varying info columns

        def line(cs):
            out = "  ".join(c.ljust(w) if i < lead or cols[i][0] == "note" else c.rjust(w)
                            for i, (c, w) in enumerate(zip(cs, widths)))
            return "  " + out.rstrip()

        out = [line([c[0] for c in cols])]
        for config, group in by_config.items():
            out.append(config_heading(suite, group, constant))
            for r in group:
                if r["status"] == "ok":
                    out.append(line(cells[id(r)]))
                else:
                    head = line(cells[id(r)][:lead] + [""] * (len(cols) - lead)).rstrip()
                    head = head.ljust(2 + sum(widths[:lead]) + 2 * lead)
                    room = max(width - len(head), 40)
                    parts = textwrap.wrap(r["status"], room) or [""]
                    out.append(head + parts[0])
                    out += [" " * (width - room) + p for p in parts[1:]]
        return out

    def drop(*names):
        return lambda cs: [c for c in cs if c[0] not in names]

    def letters(cs):
        out, k = [], 0
        for c in cs:
            if c[0].startswith("vs ") and len(c[0]) > 5:
                legend.append(f"vs {'ABCDEFGH'[k]} = speedup over {c[0][3:]}")
                c = (f"vs {'ABCDEFGH'[k]}",) + c[1:]
                k += 1
            out.append(c)
        return out

    # what to give up, in order, until the table fits (everything stays in the JSON)
    shrink = [drop("spread%"), letters, drop("state MB", "peak MB"), drop(f"{suite.unit}/s"), drop("GB/s"),
              drop(*varying)]
    cols = columns
    lines = render(cols)
    while max(len(x) for x in lines) > width and shrink:
        cols = shrink.pop(0)(cols)
        lines = render(cols)
    if suite.memory_bound and any(r.get("in_cache") for r in rows if r["status"] == "ok"):
        llc = f"{ctx.llc_bytes >> 20} MiB " if ctx is not None and ctx.llc_bytes else ""
        legend.append(f"* the working set fits in the {llc}last-level cache: bw% is not a memory-bandwidth figure")
    if any(r.get("noisy") for r in rows):
        legend.append("noisy: other processes held the CPU during the timing (cpu_stall_pct in the JSON)")
    if any("ABOVE BW" in _notes(r) for r in rows if r["status"] == "ok"):
        legend.append("ABOVE BW: faster than the measured attainable bandwidth (see the bandwidth check)")
    return "\n".join(lines + ["  " + x for x in legend])


def suite_title(suite, ctx):
    bits = [suite.what] if suite.what else []
    if suite.baseline:
        bits.append(f"speedup vs {suite.baseline}")
    if suite.memory_bound and ctx.bw_GBps:
        bits.append(f"bw% of {ctx.bw_GBps:.1f} GB/s")
    return f"== {suite.name} ({ctx.device.type})" + (f": {'; '.join(bits)}" if bits else "") + " =="


def format_bars(bars):
    """One line per bar: PASS / FAIL / NOISY (not judged) / N/A, the measured value and the bar."""
    lines = []
    for b in bars:
        word = ("NOISY" if b["result"].startswith("noisy") else "N/A" if b["result"].startswith("n/a")
                else b["result"])
        value = "-" if b["value"] is None else f"{b['value']:.3g}"
        metric = b["metric"]
        suite = SUITES.get(b["op"])
        for m in ((suite.baseline, *suite.other_baselines) if suite else ()):
            if m and speedup_key(m) == metric:
                metric = f"speedup vs {m}"
        why = ""
        if word == "NOISY":
            why = f" -- CPU pressure {b['cpu_stall_pct']:.0f}%: not judged"
        elif word == "N/A":
            why = " -- " + b["result"][5:-1]
        text = f"{word:<5}  {b['op']} {b['config']} {b['method']}: {metric} = {value} (bar >= {b['threshold']:g}){why}"
        lines.append(text if len(text) <= TABLE_WIDTH else text[:TABLE_WIDTH - 3] + "...")
    return "\n".join(lines) if lines else "(no bars for this device and size)"


def bandwidth_check(rows, ctx):
    """Rows whose GB/s is above the measured attainable bandwidth, split into cache-resident ones
    (expected) and the others (the probe or the bytes model is wrong: said explicitly)."""
    over = [r for r in rows if r["status"] == "ok" and r.get("frac_bw") is not None and r["frac_bw"] > 1]
    return [r for r in over if not r.get("in_cache")], [r for r in over if r.get("in_cache")]


def format_summary(bars, rows, ctx, header):
    out = ["== summary =="]
    counts = {}
    for b in bars:
        word = b["result"].split(",")[0].split(" ")[0]
        counts[word] = counts.get(word, 0) + 1
    out.append(f"bars: {len(bars)}" + (" (" + ", ".join(f"{v} {k}" for k, v in counts.items()) + ")" if bars else ""))
    if bars:
        out += format_bars(bars).splitlines()
    bw = header.get("bandwidth", {})
    if ctx.bw_GBps:
        again = f", the highest of {1 + len(bw['reprobes'])} probes" if bw.get("reprobes") else ""
        out.append(f"attainable bandwidth: {ctx.bw_GBps:.1f} GB/s ({ctx.bw_kernel or bw.get('kernel')}, STREAM-style "
                   f"probe, 3 x {bw.get('array_bytes', 0) >> 20} MiB{again}); plain copy "
                   f"{bw['kernels']['copy']['GBps']:.1f} GB/s")
    above, cached = bandwidth_check(rows, ctx)
    for r in above:
        out.append(f"ABOVE BANDWIDTH: {r['op']} {r['config']} {r['method']} reaches {r['GBps']:.1f} GB/s = "
                   f"{r['frac_bw']:.0%} of the probe's {ctx.bw_GBps:.1f} GB/s"
                   + (" (noisy row)" if r.get("noisy") else "") + ": the probe or the bytes model is off")
    if not any(r.get("frac_bw") is not None for r in rows):
        out.append("bandwidth check: no memory-bound rows in this run")
    elif all(r.get("in_cache") for r in rows if r.get("frac_bw") is not None):
        out.append("bandwidth check: every memory-bound row fits in the last-level cache (a --quick run?): "
                   "none is a memory-bandwidth figure to check against the probe")
    elif not above and ctx.bw_GBps:
        out.append("bandwidth check: no row beyond the last-level cache exceeds the attainable bandwidth"
                   + (f" ({len(cached)} cache-resident rows do, as expected)" if cached else ""))
    elif cached:
        out.append(f"({len(cached)} cache-resident rows exceed it too, as expected)")
    stalled = header["host"].get("cpu_stall_pct")
    if stalled is None:
        out.append("CPU pressure: unknown (no /proc/pressure/cpu); bars judged as measured")
    else:
        noisy_rows = sum(1 for r in rows if r.get("noisy"))
        out.append(f"CPU pressure: some task waited for a CPU {stalled:.1f}% of the run; {noisy_rows} of "
                   f"{sum(r['status'] == 'ok' for r in rows)} rows above {ctx.noisy_pct:g}% are noisy"
                   + (" -- rerun on an idle machine before quoting them" if noisy_rows else ""))
    if ctx.bw_stall_pct is not None and ctx.bw_stall_pct > ctx.noisy_pct:
        out.append(f"the bandwidth probe itself ran under {ctx.bw_stall_pct:.0f}% CPU pressure: noisy")
    import textwrap

    return "\n".join(w for line in out for w in (textwrap.wrap(line, TABLE_WIDTH, subsequent_indent="    ")
                                                  if len(line) > TABLE_WIDTH else [line]))


def plot_suite(path, suite, rows, header):
    """One figure for one suite: a panel per config, a horizontal bar per method (ms per call, median,
    whiskers p20-p80), the figures of each bar in the suite's own units as right-hand labels.  Sized
    to its content; None when no row ran."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    constant, _, by_config = _split_info(suite, rows)
    groups = [(config, [r for r in g if r["status"] == "ok"]) for config, g in by_config.items()]
    groups = [(c, g) for c, g in groups if g]
    if not groups:
        return None
    heights = [0.32 * len(g) + 0.75 for _, g in groups]
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, sum(heights) + 0.55), squeeze=False,
                             gridspec_kw={"height_ratios": heights}, layout="constrained")
    for ax, (config, group) in zip(axes[:, 0], groups):
        ms = [r["ms"] for r in group]
        err = [[r["ms"] - r["ms_p20"] for r in group], [r["ms_p80"] - r["ms"] for r in group]]
        colors = ["tab:blue" if r["method"].startswith("fastopt") else "tab:gray" for r in group]
        y = list(range(len(group)))
        bars = ax.barh(y, ms, xerr=err, color=colors, capsize=2, height=0.7)
        for bar, r in zip(bars, group):
            if r.get("noisy"):
                bar.set_hatch("//")
                bar.set_alpha(0.6)
        ax.set_yticks(y, [r["method"] + (" (noisy)" if r.get("noisy") else "") for r in group], fontsize=8)
        ax.set_ylim(len(group) - 0.5, -0.5)
        labels = []
        for r in group:
            bits = [f"{_ms(r['ms'])} ms", f"{si(r[suite.unit + '_per_s'])} {suite.unit}/s"]
            if suite.memory_bound and r.get("GBps") is not None:
                bits.append(f"{_sig(r['GBps'])} GB/s" + (f" ({r['frac_bw']:.0%} bw{'*' if r.get('in_cache') else ''})"
                                                         if r.get("frac_bw") is not None else ""))
            if suite.baseline and r.get(suite.speedup_key) is not None:
                bits.append(f"{r[suite.speedup_key]:.2f}x")
            labels.append(", ".join(bits))
        right = ax.secondary_yaxis("right")
        right.set_yticks(y, labels, fontsize=8)
        right.tick_params(length=0)
        lo, hi = min(r["ms_p20"] for r in group), max(r["ms_p80"] for r in group)
        if hi > 20 * lo:
            ax.set_xscale("log")
            ax.set_xlim(lo / 1.5, hi * 1.5)
            ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
        else:
            ax.set_xlim(0, hi * 1.08)
        r0 = group[0]
        extra = ", ".join(f"{k} {r0.get(k)}" for k in constant)
        ax.set_title(f"{config}" + (f" ({extra})" if extra else ""), fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("ms per call (median, whiskers p20-p80; blue: fastopt)", fontsize=8)
    bits = [f"{suite.name}: {suite.what}" if suite.what else suite.name]
    if suite.baseline:
        bits.append(f"speedup vs {suite.baseline}")
    bw = header.get("bandwidth", {}).get("GBps")
    if suite.memory_bound and bw:
        cached = any(r.get("in_cache") for _, g in groups for r in g)
        bits.append(f"bw = {bw:.1f} GB/s ({'* = in cache' if cached else 'probe'})")
    fig.suptitle(" | ".join(bits) + f"\n{header['device']['name']} | torch {header['versions']['torch']} | "
                 f"{header['git']['sha'][:10]} | {header['timestamp'][:10]}"
                 + (f" | CPU pressure {header['host']['cpu_stall_pct']:.0f}%"
                    if header["host"].get("cpu_stall_pct") is not None else ""), fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# -- the command line ---------------------------------------------------------------------------
DEFAULT_OUT = "fastopt-bench-results"


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastopt.bench",
        description="Benchmark fastopt's kernels beside their peers on one device: a table per suite and a "
                    "summary of the bars on stdout, progress on stderr, <device>-<date>.json and one "
                    "<device>-<date>-<suite>.png per suite in --out.")
    p.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a smoke run)")
    p.add_argument("--ops", "--suite", dest="ops", default=",".join(SUITES),
                   help=f"comma-separated suites to run (default: all of {', '.join(SUITES)})")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="directory for the JSON and PNGs, created if missing (default: ./%(default)s in the "
                        "current directory; the repository's committed results use --out bench/results)")
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
    p.add_argument("--noisy-threshold", type=float, default=10.0, metavar="PCT",
                   help="CPU pressure (%% of a row's timed wall time in which some task waited for a CPU) "
                        "above which the row is noisy and its bars are not judged (default: %(default)g)")
    p.add_argument("--no-plot", action="store_true", help="write no PNGs")
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
                      1 if args.quick or args.device == "cuda" else 3),
                  noisy_pct=args.noisy_threshold)
    out = Path(args.out).expanduser().resolve()
    contention = CpuContention()
    header = environment(ctx, argv)
    header["settings"]["noisy_threshold_pct"] = ctx.noisy_pct
    print(f"fastopt benchmark report: {header['device']['name']} ({ctx.device.type}), torch "
          f"{header['versions']['torch']}, triton {header['versions']['triton'] or 'not installed'}, "
          f"git {header['git']['sha'][:10]}{' (dirty)' if header['git']['dirty'] else ''}, "
          f"{header['host']['torch_threads']} torch threads")
    print(f"results go to {out}")
    header["bandwidth"] = measure_bandwidth(ctx)
    copy = header["bandwidth"]["kernels"]["copy"]
    header["copy_bandwidth"] = {"bytes_per_copy": copy["bytes_per_call"], "GBps": copy["GBps"]}
    bw = header["bandwidth"]
    print(f"memory bandwidth probe: {ctx.bw_GBps:.1f} GB/s ({bw['kernel']}; plain copy {copy['GBps']:.1f} GB/s"
          + (f"; last-level cache {ctx.llc_bytes >> 20} MiB" if ctx.llc_bytes else "") + ")")
    rows, bars, reprobes = [], [], []
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{header['device']['slug']}-{header['timestamp'][:10]}{'-quick' if ctx.quick else ''}"
    json_path = out / f"{stem}.json"

    def frac_bw_and_bars(names):
        for r in rows:  # every row against the most the machine gave so far in the run
            if r.get("GBps") is not None:
                r["frac_bw"] = r["GBps"] / ctx.bw_GBps
        return [b for name in names
                for b in evaluate_bars(SUITES[name], [r for r in rows if r["op"] == name], ctx)]

    def write_report(names, figures, complete):
        header["bandwidth"].update(GBps=ctx.bw_GBps, kernel=ctx.bw_kernel, cpu_stall_pct=ctx.bw_stall_pct,
                                   first_GBps=first_GBps, reprobes=reprobes)
        header["host"]["cpu_stall_pct"] = contention.percent()
        report = {**header, "complete": complete, "suites_done": list(names), "figures": figures, "rows": rows,
                  "bars": frac_bw_and_bars(names)}
        tmp = json_path.with_suffix(".json.tmp")  # a reader never sees half a file
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        tmp.replace(json_path)
        return report["bars"]

    first_GBps = header["bandwidth"]["GBps"]
    done = []
    for name in args.ops:
        suite = SUITES[name]
        if suite.memory_bound:
            progress(f"[bandwidth] again, shorter, before {name}")
            again = measure_bandwidth(ctx, names=("scale_inplace", "add_inplace"), one_thread=False, repeats=10)
            reprobes.append({"before": name, **{k: again[k] for k in ("GBps", "kernel", "cpu_stall_pct")}})
        rows += run_suite(suite, ctx)
        done.append(name)
        # the report so far, after every suite: a run stopped part-way (the GPU check's time limit, ^C)
        # still leaves every finished suite's rows and bars, marked "complete": false
        write_report(done, {}, complete=False)
    if reprobes:
        print(f"probed again before each memory-bound suite: {min(p['GBps'] for p in reprobes):.1f} to "
              f"{max(p['GBps'] for p in reprobes):.1f} GB/s; bw% is against the highest, {ctx.bw_GBps:.1f} GB/s")
    frac_bw_and_bars(args.ops)
    for name in args.ops:
        suite = SUITES[name]
        suite_rows = [r for r in rows if r["op"] == name]
        print("\n" + suite_title(suite, ctx))
        print(format_table(suite, suite_rows, ctx), flush=True)

    figures = {}
    if not args.no_plot:
        for name in args.ops:
            path = plot_suite(out / f"{stem}-{name}.png", SUITES[name], [r for r in rows if r["op"] == name], header)
            if path is not None:
                figures[name] = path.name
    bars = write_report(args.ops, figures, complete=True)
    print("\n" + format_summary(bars, rows, ctx, header))
    print(f"wrote {json_path}")
    if figures:
        print(f"and {len(figures)} figure(s) beside it: {stem}-<suite>.png")
    return 1 if any(r["status"].startswith("error") for r in rows) else 0
