"""The CUDA optimizer kernels issue 16-byte vector loads and stores and spill nothing, for sm_90.

Compiles csrc/cuda/adam.cu and csrc/cuda/elementwise.cu with nvcc as CMakeLists.txt does (-O3 -lineinfo,
-DFASTOPT_WITH_CUDA), one cubin each for sm_90 with ``-Xptxas -v``, cached in build/cuda_sass/<hash of the
sources, flags and nvcc version>/ (about 1 min on 2 cores when a source changed, nothing otherwise), and
reads the result (the per-kernel counts are cached there too):

* ptxas -v: every function of both units reports 0 bytes of spill stores and loads;
* SASS (cuobjdump -sass, demangled with c++filt): every elementwise kernel variant that loads from global
  memory issues LDG.E.128, for fp32, bf16 and fp16; Lion (param, grad, one state) loads its three lists
  with LDG.E.128 and stores param and state with STG.E.128 in every phase-0 variant; the Adam kernels,
  fp32, bf16 and fp16, load their 4 lists (5 with amsgrad) with LDG.E.128 and store 3 (4) with STG.E.128.
  Without cuobjdump (it is not in every CUDA install) the same counts are read from the PTX that the
  same compile keeps (ld.global.v4 / st.global.v4 of 32-bit words).

Skips only when nvcc is absent (c++filt, from binutils, must be there: it names the kernels).
"""
import concurrent.futures
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
NVCC = shutil.which("nvcc")
pytestmark = pytest.mark.skipif(NVCC is None, reason="needs nvcc")

UNITS = ["adam", "elementwise"]
FLAGS = ["-std=c++17", "-O3", "-lineinfo", "-arch=sm_90", "-DFASTOPT_WITH_CUDA", "-Xptxas", "-v"]
TYPES = {"float": "fp32", "fastopt::bf16_t": "bf16", "fastopt::f16_t": "fp16"}


def _cuobjdump():
    found = shutil.which("cuobjdump")
    if found:
        return found
    for cand in [Path(NVCC).resolve().parent / "cuobjdump"]:
        if cand.exists():
            return str(cand)
    try:  # Triton ships one
        import triton.backends.nvidia as tn

        cand = Path(tn.__file__).parent / "bin" / "cuobjdump"
        if cand.exists():
            return str(cand)
    except Exception:
        pass
    return None


def _digest():
    h = hashlib.sha256()
    h.update(" ".join(FLAGS).encode())
    h.update(subprocess.run([NVCC, "--version"], capture_output=True, text=True).stdout.encode())
    for p in sorted(list((ROOT / "csrc/cuda").glob("*")) + list((ROOT / "csrc/include").rglob("*"))):
        if p.is_file():
            h.update(str(p.relative_to(ROOT)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


def _compile(out, unit):
    cubin, log = out / f"{unit}.cubin", out / f"{unit}.ptxas.txt"
    if cubin.exists() and log.exists() and (out / f"{unit}.ptx").exists():
        return
    keep = out / f"keep-{unit}"
    keep.mkdir(exist_ok=True)
    cmd = [NVCC, *FLAGS, "-cubin", "-keep", "-keep-dir", str(keep), f"-I{ROOT / 'csrc/include'}",
           f"-I{ROOT / 'csrc'}", "-x", "cu", str(ROOT / f"csrc/cuda/{unit}.cu"), "-o", str(cubin.with_suffix(".tmp"))]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=keep)
    assert r.returncode == 0, f"nvcc failed for {unit}.cu:\n{' '.join(cmd)}\n{r.stderr[-6000:]}"
    ptx = sorted(keep.glob("*.ptx"))
    assert ptx, f"nvcc -keep left no PTX for {unit}.cu"
    shutil.copyfile(ptx[0], out / f"{unit}.ptx")
    shutil.rmtree(keep, ignore_errors=True)
    log.write_text(r.stdout + r.stderr)
    cubin.with_suffix(".tmp").replace(cubin)


@pytest.fixture(scope="module")
def compiled():
    out = ROOT / "build" / "cuda_sass" / _digest()
    out.mkdir(parents=True, exist_ok=True)
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda u: _compile(out, u), UNITS))
    return out


def _demangle(names):
    cxxfilt = shutil.which("c++filt")
    assert cxxfilt, "c++filt (binutils) is needed to read the kernel names"
    out = subprocess.run([cxxfilt], input="\n".join(names) + "\n", capture_output=True, text=True, check=True).stdout
    return out.splitlines()[:len(names)]


def _counts_sass(cubin, tool):
    text = subprocess.run([tool, "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    parts = re.split(r"\n\s*Function : (\S+)\n", text)
    names, bodies = parts[1::2], parts[2::2]
    assert names, f"no functions in the SASS of {cubin}"
    return {d: dict(ld128=len(re.findall(r"\bLDG\.E\.128\b", b)), st128=len(re.findall(r"\bSTG\.E\.128\b", b)),
                    ld=len(re.findall(r"\bLDG\.", b)))
            for d, b in zip(_demangle(names), bodies)}


def _counts_ptx(ptx):
    text = ptx.read_text()
    parts = re.split(r"\n(?:\.visible |\.weak )?\.entry (\S+)\(", text)
    names, bodies = parts[1::2], parts[2::2]
    assert names, f"no entry functions in {ptx}"
    return {d: dict(ld128=len(re.findall(r"ld\.global(?:\.nc)?\.v4\.(?:u|b|f)32", b)),
                    st128=len(re.findall(r"st\.global\.v4\.(?:u|b|f)32", b)),
                    ld=len(re.findall(r"ld\.global", b)))
            for d, b in zip(_demangle(names), bodies)}


@pytest.fixture(scope="module")
def counts(compiled):
    """{unit: {demangled kernel: {ld128, st128, ld}}}, cached next to the cubins (reading the SASS takes ~1 min)."""
    tool = _cuobjdump()
    cache = compiled / ("counts-sass.json" if tool else "counts-ptx.json")
    if cache.exists():
        return json.loads(cache.read_text())
    out = {}
    for unit in UNITS:
        out[unit] = _counts_sass(compiled / f"{unit}.cubin", tool) if tool else _counts_ptx(compiled / f"{unit}.ptx")
    cache.write_text(json.dumps(out))
    return out


def _variants(funcs, template):
    """{(op, dtype, rest): counts} of the multi_tensor_kernel instances of ``template`` (ElementwiseOp, AdamOp)."""
    out = {}
    for name, c in funcs.items():
        m = re.search(template + r"<(.*?), (float|fastopt::bf16_t|fastopt::f16_t), (.*?)>, fastopt::cuda::", name)
        if re.match(r"void fastopt::cuda::multi_tensor_kernel(_1)?<", name) and m:
            out[(m.group(1), TYPES[m.group(2)], m.group(3))] = c
    return out


def _adam_variants(funcs):
    out = {}
    for name, c in funcs.items():
        m = re.search(r"AdamOp<(float|fastopt::bf16_t|fastopt::f16_t), (true|false), (true|false)>", name)
        if re.match(r"void fastopt::cuda::multi_tensor_kernel(_1)?<", name) and m:
            out[(TYPES[m.group(1)], m.group(2) == "true", m.group(3) == "true")] = c
    return out


def test_no_spills(compiled):
    for unit in UNITS:
        log = (compiled / f"{unit}.ptxas.txt").read_text()
        props = re.findall(r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
                           r"(\d+) bytes spill loads", log)
        assert len(props) > 10, f"no ptxas -v function properties for {unit}.cu"
        spilling = [(n, int(s), int(l)) for n, _, s, l in props if int(s) or int(l)]
        assert not spilling, f"{unit}.cu: functions spill to local memory: " + \
            "; ".join(f"{d} ({s} B stored, {l} B loaded)" for d, (_, s, l) in
                      zip(_demangle([n for n, _, _ in spilling]), spilling))


def test_elementwise_kernels_use_16_byte_vectors(counts):
    variants = _variants(counts["elementwise"], r"ElementwiseOp")
    for dtype in ("fp32", "bf16", "fp16"):
        mine = {k: v for k, v in variants.items() if k[1] == dtype}
        assert len(mine) >= 40, f"only {len(mine)} {dtype} elementwise kernel variants found"
        # grad_rowsum and asam_norm have only a reduce pass: their phase 0 is never launched and stores
        # nothing (ptxas drops most of its loads, PTX keeps them)
        reduce_only = ("fastopt::functors::GradRowSumOp", "fastopt::functors::AsamNormOp")
        scalar = [k for k, v in mine.items() if v["ld"] > 0 and v["ld128"] == 0
                  and not (k[0] in reduce_only and k[2].startswith("0,"))]
        assert not scalar, f"{dtype} elementwise kernels without a 16-byte load: {scalar}"
    lion = {k: v for k, v in variants.items() if k[0] == "fastopt::functors::LionOpT<false>" and k[2].startswith("0,")}
    # per dtype the sparse epilogues (none, N:M, prune by mask, prune by hash) x stochastic rounding, which
    # only bf16 instantiates (elementwise.cu: it changes bf16 stores only): (1 + 1 + 2) x 4
    assert len(lion) == 16, sorted(lion)
    for k, v in lion.items():
        assert v["ld128"] >= 3 and v["st128"] >= 2, (k, v)  # param, grad, momentum in; param, momentum out


def test_adam_kernels_use_16_byte_vectors(counts):
    variants = _adam_variants(counts["adam"])
    assert len(variants) == 12, sorted(variants)
    for (dtype, decoupled, amsgrad), v in variants.items():
        lists = 5 if amsgrad else 4
        assert v["ld128"] >= lists and v["st128"] >= lists - 1, (dtype, decoupled, amsgrad, v)
