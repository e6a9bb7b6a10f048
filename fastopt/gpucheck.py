"""The one prepared GPU check: ``python -m fastopt.gpucheck`` on a machine with an NVIDIA GPU (H100/H200).

On a GPU machine run only this, from the repository's root, commit the JSON it writes under
``bench/results/`` with the command, and read the bars.  In order, each stage with its own time limit so
that the whole check ends in about 8 minutes and the JSON is written whatever happens:

1. ``environment``: the GPU, driver, CUDA, torch, triton, Python, the git commit;
2. ``build``: ``pip install --no-build-isolation --no-deps -e .`` with the CUDA kernels for this GPU's
   architecture only (``FASTOPT_CUDA_ARCHS``), unless an installed fastopt._C of this tree already has
   them (nothing is built that need not be);
3. ``tests``: the whole test suite (``pytest tests``, in parallel with pytest-xdist when it is
   installed): with a GPU the tests run every kernel on ``cuda`` and on real (compiled) ``triton`` as
   well as the CPU backends (tests/conftest.py); the JSON lists every failure;
4. ``bench``: the benchmark report (``python -m fastopt.bench --device cuda``) with its bars, embedded
   in the JSON; the report is written after every suite, so at the stage's time limit the suites that
   finished are kept (``complete``: false, ``suites_done``).

    python -m fastopt.gpucheck --out bench/results            # writes gpucheck-<gpu>-<date>.json

Exit status: 0 when every stage ran and passed, 1 otherwise.  ``--stages`` picks stages (e.g. ``tests``);
``--dry-run`` prints the commands without running them (this machine has no GPU: that is how CI checks
this module).
"""
import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

STAGES = ("environment", "build", "tests", "bench")
# seconds per stage: the whole check fits an 8-minute device call with its start and transfers
LIMITS = {"build": 150, "tests": 240, "bench": 90}
ROOT = Path(__file__).resolve().parent.parent


def _run(cmd, timeout, env=None, dry_run=False):
    """(returncode or "timeout", seconds, output tail) of ``cmd`` run in the repository's root.  At the
    time limit the command gets SIGINT (pytest then stops and still writes its report), then SIGKILL."""
    if dry_run:
        print("would run:", " ".join(cmd))
        return "dry run", 0.0, ""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                stderr=subprocess.STDOUT, text=True)
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            code = "timeout"
        log.seek(0)
        out = log.read()
    return code, round(time.perf_counter() - start, 1), out[-4000:]


def _status(code):
    return "passed" if code == 0 else code if code == "dry run" else f"failed ({code})"


def environment():
    """What the check ran on."""
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "gpu": None, "capability": None, "triton": None, "git": None, "time": datetime.datetime.now(
               datetime.timezone.utc).isoformat(timespec="seconds")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["gpu"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["sms"] = props.multi_processor_count
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True)
        env["nvidia_smi"] = smi.stdout.strip()
    if shutil.which("git"):
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
        env["git"] = {"sha": sha, "dirty": bool(dirty.strip())}
    return env


def _has_cuda_build():
    """Whether an importable fastopt._C of this tree was built with its CUDA kernels."""
    code = ("import fastopt, fastopt._C as C, fastopt.triton_kernels; "
            "import sys; sys.exit(0 if hasattr(C, 'elementwise_cuda') else 3)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tempfile.gettempdir(), capture_output=True)
    return proc.returncode == 0


def build(env, dry_run):
    if not dry_run and _has_cuda_build():
        return {"status": "skipped", "reason": "fastopt._C with its CUDA kernels is installed already"}
    arch = (env.get("capability") or "9.0").replace(".", "")
    build_env = {"FASTOPT_CUDA_ARCHS": arch, "FASTOPT_BUILD_JOBS": str(os.cpu_count() or 4)}
    code, seconds, tail = _run([sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "-q",
                                "-e", "."], LIMITS["build"], build_env, dry_run)
    return {"status": _status(code), "seconds": seconds, "archs": arch,
            "tail": tail if code != 0 else ""}


def _junit_summary(path):
    """Counts and the failures of a JUnit XML file written by pytest."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    suites = [root] if root.tag == "testsuite" else list(root)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failures = []
    for case in root.iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                failures.append({"test": f"{case.get('classname')}::{case.get('name')}", "kind": kind,
                                 "message": (node.get("message") or "")[:500]})
    return {**counts, "failed": failures[:200]}


def tests(out, dry_run):
    junit = Path(out) / "gpucheck-junit.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:randomly",
           f"--junitxml={junit}", "tests"]
    try:
        import xdist  # noqa: F401

        cmd[4:4] = ["-n", str(max(2, min(16, (os.cpu_count() or 4) - 2)))]
    except ImportError:
        pass
    code, seconds, tail = _run(cmd, LIMITS["tests"], dry_run=dry_run)
    summary = {} if dry_run else _junit_summary(junit)
    return {"status": _status(code), "seconds": seconds, **summary, "tail": "" if code == 0 else tail}


def bench(out, dry_run):
    bench_out = Path(out) / "gpucheck-bench"
    cmd = [sys.executable, "-m", "fastopt.bench", "--device", "cuda", "--budget", "0.2", "--no-plot",
           "--out", str(bench_out)]
    code, seconds, tail = _run(cmd, LIMITS["bench"], dry_run=dry_run)
    report = None
    reports = sorted(bench_out.glob("*.json")) if bench_out.exists() else []
    if reports:
        report = json.loads(reports[-1].read_text())
    bars = (report or {}).get("bars", [])
    failed_bars = [b for b in bars if b.get("result") == "FAIL"]
    # the report is rewritten after every suite (harness.main): at the time limit the finished suites stay
    return {"status": _status(code if code != 0 or not failed_bars else "bars failed"), "seconds": seconds,
            "complete": bool((report or {}).get("complete")), "suites_done": (report or {}).get("suites_done", []),
            "bars_failed": len(failed_bars), "report": report, "tail": "" if code == 0 else tail}


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m fastopt.gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results", help="folder for the JSON (default: %(default)s)")
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of " + ", ".join(STAGES))
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; the stages are {', '.join(STAGES)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = environment()
    if env["gpu"] is None and not args.dry_run and set(stages) & {"tests", "bench"}:
        print("fastopt.gpucheck: torch sees no CUDA device; run this on the GPU machine (or --dry-run)",
              file=sys.stderr)
        return 2
    result = {"schema": 1, "command": "python -m fastopt.gpucheck " + " ".join(argv or sys.argv[1:]),
              "environment": env, "stages": {}}
    slug = re.sub(r"[^a-z0-9]+", "-", (env["gpu"] or "no-gpu").lower()).strip("-")
    path = out / f"gpucheck-{slug}-{env['time'][:10]}.json"
    start = time.perf_counter()
    for stage in stages:
        if stage == "environment":
            continue
        print(f"[gpucheck] {stage} ...", flush=True)
        if stage == "build":
            result["stages"]["build"] = build(env, args.dry_run)
        elif stage == "tests":
            result["stages"]["tests"] = tests(out, args.dry_run)
        elif stage == "bench":
            result["stages"]["bench"] = bench(out, args.dry_run)
        print(f"[gpucheck] {stage}: {result['stages'][stage]['status']}", flush=True)
        result["seconds"] = round(time.perf_counter() - start, 1)
        path.write_text(json.dumps(result, indent=1) + "\n")  # after every stage: a cut-off run keeps its part
    print(f"wrote {path}")
    ok = all(s["status"] in ("passed", "skipped", "dry run") for s in result["stages"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
