"""Exhaustive bit-identity check of the CPU low-bit encoders against the scalar encoder (issue 18).

    python tools/codec_sweep/run.py                 # every fp32 pattern of [-1, 1], 6 formats (long: ~hours on 1 core)
    python tools/codec_sweep/run.py --stride 509    # a sample (seconds)

Exports each format's codebook (``fastopt.lowbit.codebook.codebook``) to a .bin file, compiles sweep.cpp
against csrc/cpu/quant_cpu.h with the flags of the AVX2 kernel copy (CMakeLists.txt), and runs it per
format (in parallel, one process per format): every value's code from the 8-lane (and, on an AVX-512
CPU, the 16-lane) encoder must equal ``quantize_code``'s.  Exit status 1 on any mismatch.  Not part of
the test suite (tests/test_lowbit_codec_cpu.py runs a strided sweep of the same kind on every run).
"""
import argparse
import concurrent.futures
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORMATS = ("dyn8s", "dyn8u", "fp8", "fp8u", "dyn4s", "lin4u")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stride", type=int, default=1, help="check every stride-th fp32 pattern (default 1: all)")
    ap.add_argument("--formats", default=",".join(FORMATS))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from fastopt.lowbit.codebook import codebook

    with tempfile.TemporaryDirectory() as tmp:
        exe = Path(tmp) / "sweep"
        subprocess.run(["g++", "-std=c++17", "-O2", "-ffp-contract=off", "-mavx2", "-mfma", "-DFASTOPT_CPU_NS=avx2",
                        f"-I{ROOT / 'csrc/include'}", f"-I{ROOT / 'csrc/cpu'}", str(Path(__file__).with_name("sweep.cpp")),
                        "-o", str(exe)], check=True)
        jobs = []
        for name in args.formats.split(","):
            path = Path(tmp) / f"{name}.bin"
            codebook(name).cpu().numpy().tofile(path)
            jobs.append([str(exe), str(path), str(args.stride)])
        with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
            results = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True), jobs))
        for r in results:  # stderr: the encoder's mode (avx512 1: the 16-lane encoder was checked too)
            print(r.stderr.strip() + "\n" + r.stdout.strip())
        return 0 if all(r.returncode == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
