"""The CUDA kernels (csrc/cuda/*.cu) run on the CPU through the CUDA-on-CPU layer (csrc/cuda_on_cpu/,
tests/_cuda_on_cpu_build.py, tests/_cuda_on_cpu.py) and must give the cpu backend's results bit for bit
(the same formulas, no FMA contraction on either side) -- except the per-row sums of the reduce passes,
which the CUDA kernel adds in another order (per-thread strided partial sums, a warp-shuffle tree, one
atomicAdd per block) than the CPU loop: those optimizers are compared to 1e-6 relative in fp32 and to one
bf16 ulp (2^-7 relative) in bf16, where a last-bit difference of a sum can flip a stored value's rounding.

The mutation tests build a copy of the sources with one deliberate bug (a tail bound one past the end, the
block barrier of the reduce pass removed, the vector path's row cursor missing a row boundary) and check that
these comparisons catch it.  The vector-path tests run the 16-byte (aligned) and one-element (unaligned) paths
of the elementwise and Adam kernels on views at offsets 0..8, sizes around the vector and chunk boundaries.

The first run builds the module (about 2.5 min on 2 cores; cached in build/cuda_on_cpu/ until a source
changes).  The existing suites run their ``cuda`` cases through the same layer with
``PYTHONPATH=tests python -m pytest -p _cuda_on_cpu tests/... -k cuda`` (README).
"""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastopt
import fastopt.lowbit as lowbit
from fastopt import _backend

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _cuda_on_cpu as coc  # noqa: E402
import _cuda_on_cpu_build as coc_build  # noqa: E402
from zoo_cases import REDUCING, ZOO  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NEEDS_GXX = pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
pytestmark = [NEEDS_GXX, pytest.mark.skipif(not _backend.has_cpu(), reason="needs fastopt._C (the cpu backend)")]


@pytest.fixture(scope="module")
def built():
    return coc_build.build()


@pytest.fixture
def layer(built):
    """backend='cuda' on CPU tensors runs the module built from this tree."""
    coc.activate(coc_build.load(built))
    yield
    coc.deactivate()


# Shapes: a tensor over one 65536-element chunk with a ragged tail, rows shorter than a chunk (the reduce
# pass's per-element atomics), rows longer than a chunk (the block reduction), an odd small tensor, and a
# view at an odd offset (the unaligned paths).
def _params(dtype, gen):
    base = torch.randn(70001 + 3, generator=gen).to(dtype)
    ps = [torch.randn(70001, generator=gen).to(dtype),
          torch.randn(300, 7, generator=gen).to(dtype),
          torch.randn(2, 70000, generator=gen).to(dtype),
          torch.randn(33, generator=gen).to(dtype),
          base[3:].view(70001)]
    return [torch.nn.Parameter(p) for p in ps]


def _run(cls, kw, backend, dtype, steps=3):
    gen = torch.Generator().manual_seed(1)
    ps = _params(dtype, gen)
    opt = cls(ps, backend=backend, **kw)
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=gen).to(dtype)
        opt.step()
    states = [v for p in ps for v in opt.state[p].values() if torch.is_tensor(v)]
    return [p.detach() for p in ps] + states


def _compare(got, want, exact, what):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        if exact:
            same = torch.equal(g.view(torch.uint8) if g.dtype.itemsize == 1 else g, w.view(torch.uint8)
                               if w.dtype.itemsize == 1 else w) or torch.equal(g.isnan(), w.isnan()) and \
                torch.equal(torch.where(g.isnan(), 0, g), torch.where(w.isnan(), 0, w))
            assert same, f"{what}: tensor {i} differs from the cpu backend's " \
                         f"(max |diff| {(g.double() - w.double()).abs().max().item():.3g})"
        else:
            # fp32: the sums' rounding differs in the last bits; bf16: such a difference can flip the rounding
            # of a stored value to the neighbouring bf16 (one ulp, 2^-8 relative)
            tol = dict(rtol=1e-6, atol=1e-7) if w.dtype == torch.float32 else dict(rtol=2 ** -7, atol=1e-5)
            torch.testing.assert_close(g.double(), w.double(), equal_nan=True, msg=what, **tol)


ZOO_CASES = [(name, i) for name, (_, cfgs) in ZOO.items() for i in range(len(cfgs))]


def _reduces(name, kw):
    return name in REDUCING or kw.get("use_gc") or kw.get("cautious")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name,i", ZOO_CASES, ids=[f"{n}-{i}" for n, i in ZOO_CASES])
def test_zoo_cuda_kernels_match_cpu(layer, name, i, dtype):
    cls, cfgs = ZOO[name]
    kw = cfgs[i]
    want = _run(cls, kw, "cpu", dtype)
    got = _run(cls, kw, "cuda", dtype)
    _compare(got, want, exact=not _reduces(name, kw), what=f"{name} {kw} {dtype}")


ADAM_CASES = [(fastopt.Adam, dict(lr=1e-2)), (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1)),
              (fastopt.AdamW, dict(lr=1e-2, weight_decay=0.1, amsgrad=True, maximize=True))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("case", range(len(ADAM_CASES)))
def test_adam_cuda_kernel_matches_cpu(layer, case, dtype):
    cls, kw = ADAM_CASES[case]
    _compare(_run(cls, kw, "cuda", dtype), _run(cls, kw, "cpu", dtype), exact=True, what=f"{cls.__name__} {kw}")


LOWBIT = [lowbit.AdamW8bit, lowbit.Adam4bit, lowbit.AdamWFp8, lowbit.Lion8bit, lowbit.Adan4bit]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("cls", LOWBIT, ids=[c.__name__ for c in LOWBIT])
def test_lowbit_cuda_kernel_matches_cpu(layer, cls, dtype):
    kw = dict(lr=1e-2)
    _compare(_run(cls, kw, "cuda", dtype), _run(cls, kw, "cpu", dtype), exact=True, what=cls.__name__)


@pytest.mark.parametrize("fmt", ["dyn8s", "dyn8u", "dyn4s", "lin4u", "fp8"])
def test_codec_cuda_kernel_matches_cpu(layer, fmt):
    x = torch.randn(300, 64).abs() if fmt.endswith("u") else torch.randn(300, 64)
    x[7, 3] = float("inf")  # a poisoned block
    want = lowbit.quantize_blockwise(x, fmt, backend="cpu")
    got = lowbit.quantize_blockwise(x, fmt, backend="cuda")
    for u, v in zip(got, want):
        assert torch.equal(u.nan_to_num(), v.nan_to_num()) and torch.equal(u.isnan(), v.isnan())
    assert torch.equal(lowbit.dequantize_blockwise(*got, fmt=fmt, backend="cuda").nan_to_num(),
                       lowbit.dequantize_blockwise(*want, fmt=fmt, backend="cpu").nan_to_num())


def test_masks_cuda_kernels_match_cpu(layer):
    from fastopt import sparse

    w = torch.randn(64, 96)
    w[3, 5] = float("nan")
    for n, m, dim in [(2, 4, -1), (1, 4, 0), (2, 8, -1), (4, 16, -1), (3, 6, -1), (2, 4, 0), (1, 2, 0)]:
        assert torch.equal(sparse.nm_mask(w, n, m, dim, backend="cuda"), sparse.nm_mask(w, n, m, dim, backend="cpu"))
    for mode in ("exact", "greedy"):
        assert torch.equal(sparse.transposable_mask(w, mode, backend="cuda"),
                           sparse.transposable_mask(w, mode, backend="cpu"))


@pytest.mark.parametrize("classes", [1, 3, 17, 1000])
@pytest.mark.parametrize("bank_dtype", [torch.float32, torch.bfloat16])
def test_saf_matches_cpu(layer, classes, bank_dtype):
    """SAFLoss's CUDA kernel (csrc/cuda/saf.cu: one block per row, tree reductions) against the CPU kernel over
    three epochs with a repeated index: the banks bit for bit, the values and gradients to fp32 rounding (the
    sums run in another order)."""
    from fastopt.sharpness import SAFLoss
    gen = torch.Generator().manual_seed(classes)
    idx = torch.tensor([4, 0, 9, 4, 7, 2, 11])
    mods = {b: SAFLoss(12, classes, start_epoch=0, epochs_ago=1, bank_dtype=bank_dtype, backend=b)
            for b in ("cuda", "cpu")}
    for epoch in range(3):
        x = torch.randn(len(idx), classes, generator=gen) * 3
        out = {}
        for b, mod in mods.items():
            logits = x.clone().requires_grad_(True)
            value = mod(logits, idx, epoch)
            grad = torch.autograd.grad(value, logits)[0] if value.requires_grad else torch.zeros_like(x)
            out[b] = (value.detach(), grad)
        assert torch.equal(mods["cuda"].bank, mods["cpu"].bank), f"epoch {epoch}: the banks differ"
        torch.testing.assert_close(out["cuda"][0], out["cpu"][0], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(out["cuda"][1], out["cpu"][1], rtol=1e-5, atol=1e-8)
    assert (float(out["cpu"][0]) > 0) == (classes > 1)  # (the last epoch's term was on; one class: KL = 0)


# ---- mutations: a copy of the tree with one bug must fail the comparisons ----

NO_KERNEL = "no CUDA kernel for elementwise op"  # elementwise.cu's error for an op left out of a build


def _only_op(name, functor):
    """Compile flags that give the one recompiled kernel file the instantiations of one op only (ops.h's
    FASTOPT_FOR_EACH_OP; the mutated module then runs that op alone, which is all its check runs): about a
    tenth of the compile of every op's instantiations."""
    return (f"-DFASTOPT_FOR_EACH_OP(X)=X(\"{name}\", ::fastopt::functors::{functor})",)


def _mutated_build(tmp_path, built, rel, old, new, only_op=()):
    src = ROOT / rel
    text = src.read_text()
    assert text.count(old) == 1, f"mutation anchor not found once in {rel}: {old!r}"
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / rel).write_text(text.replace(old, new))
    return coc_build.build(src_root=tree, out_dir=tmp_path / "out", reuse=(built, [rel]), extra_flags=only_op)


CHECK = """
import sys, torch
sys.path.insert(0, {tests!r})
import _cuda_on_cpu as coc, _cuda_on_cpu_build as b, test_cuda_on_cpu as t
coc.activate(b.load({path!r}))
cls, kw = {cls}, {kw!r}
t._compare(t._run(cls, kw, "cuda", torch.float32), t._run(cls, kw, "cpu", torch.float32), {exact}, "check")
"""


def _fails(module_path, cls, kw, exact):
    """Runs the comparison against the module at ``module_path`` in a fresh process (CPython keeps the first
    extension module named _C it loaded) and returns its error output, or None when it passed."""
    code = CHECK.format(tests=str(ROOT / "tests"), path=str(module_path), cls=cls, kw=kw, exact=exact)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    return None if r.returncode == 0 else r.stderr[-3000:]


def test_mutation_tail_bound_is_caught(tmp_path, built):
    """Adam's guarded tail loop running one element past its chunk (i <= n): the element after the chunk
    (the next chunk's first, or past the tensor) is stepped twice or out of bounds."""
    mutated = _mutated_build(tmp_path, built, "csrc/cuda/adam.cu", "i < n; i += blockDim.x) {  // guarded tail",
                             "i <= n; i += blockDim.x) {  // guarded tail")
    assert _fails(built, "t.fastopt.Adam", dict(lr=1e-2), True) is None  # the unmutated tree passes
    why = _fails(mutated, "t.fastopt.Adam", dict(lr=1e-2), True)
    assert why is not None, "the comparison with the cpu backend missed an off-by-one tail bound"


def test_mutation_missing_barrier_is_caught(tmp_path, built):
    """The reduce pass's __syncthreads between the warps' partial sums and warp 0's final sum removed:
    warp 0 reads partial sums the other warps have not written yet."""
    mutated = _mutated_build(tmp_path, built, "csrc/cuda/elementwise.cu", "        __syncthreads();\n", "\n",
                             _only_op("lamb", "LambOp"))
    kw = ZOO["lamb"][1][0]
    assert _fails(built, "t.ZOO['lamb'][0]", kw, False) is None  # the unmutated tree passes
    why = _fails(mutated, "t.ZOO['lamb'][0]", kw, False)
    assert why is not None, "the comparison with the cpu backend missed a missing __syncthreads"
    assert NO_KERNEL not in why, why  # (it failed on the mutation, not on an op left out of the build)


def test_build_script_runs(built):
    """``python tests/_cuda_on_cpu_build.py`` finds the cached module (the README's command)."""
    out = subprocess.run([sys.executable, str(ROOT / "tests/_cuda_on_cpu_build.py")], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    assert Path(out.stdout.strip()) == Path(built)


# ---- the vectorized paths of the elementwise and Adam kernels (16-byte vectors when every pointer of a
# tensor is aligned, one element per thread otherwise) ----
#
# The lists are views at element offsets 0..8 into their own buffers: a tensor whose lists all sit at a
# 16-byte boundary takes the vector path, a tensor with one list (param, grad, a state, the sparse mask or
# output) off it the scalar path.  Sizes straddle the vector widths (4, 8), the 512-thread stride and the
# 65536-element chunk; rows are shorter than a vector, than a chunk, and longer than a chunk.

# (numel, rows)
VEC_SHAPES = [(1, 1), (7, 7), (8, 2), (9, 3), (15, 5), (16, 1), (17, 17), (33, 11), (4096 + 3, 1),
              (3 * 1337, 3), (300 * 7, 300), (65535, 5), (65536, 4), (65537, 1), (2 * 70001, 2),
              (65536 + 8 * 512 + 5, 1)]
VEC_OPS = {  # op: sparse epilogue allowed (no reduce pass)
    "adamw": True, "lion": True, "adan": True, "lion_cautious": False, "adamp": False, "lamb": False}
VEC_HYPER = [0.9, 0.99, 1e-6, 0.01, 0.95, 0.5, 0.1, 1.0]
VEC_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _offset_views(numels, nlists, dtype, gen, fill, seed_offset=0):
    """``nlists`` lists of views, one per numel: tensor j's lists all at offset 0, all at one offset of
    1..8 elements (8: aligned for 16-bit types), or aligned except list ``j % nlists`` (offset 1..7)."""
    out = [[] for _ in range(nlists)]
    for j, n in enumerate(numels):
        kind = (j + seed_offset) % 3
        for k in range(nlists):
            if kind == 0:
                off = 0
            elif kind == 1:
                off = 1 + (j % 8)
            else:
                off = 1 + (j % 7) if k == j % nlists else 0
            buf = torch.empty(n + 16, dtype=dtype)
            view = buf[off:off + n]
            view.copy_(fill(n))
            out[k].append(view)
    return out


def _vec_case(op, dtype, phase, rows, sparse, sr, seed=0):
    gen = torch.Generator().manual_seed(seed)
    nstates = _backend.native().op_shape(op)[0]
    numels = [n for n, _ in VEC_SHAPES]
    nlists = 2 + nstates + (2 if sparse else 0)
    lists = _offset_views(numels, nlists, dtype, gen, lambda n: torch.randn(n, generator=gen).to(dtype))
    states = [t.abs_() if k == nstates - 1 else t for k in range(nstates) for t in lists[2 + k]]  # v >= 0
    rows_list = [r for _, r in VEC_SHAPES] if rows else []
    total = sum(rows_list) if rows else len(numels)
    row_coef = (torch.rand(4 * total, generator=gen) + 0.5) if rows else None
    masks = outs = []
    if sparse:
        masks = _offset_views(numels, 1, torch.uint8, gen,
                              lambda n: (torch.rand(n, generator=gen) < 0.5).to(torch.uint8), seed_offset=1)[0]
        outs = lists[-1]
    return dict(op=op, params=lists[0], grads=lists[1], states=states,
                state_steps=[torch.tensor([float(3 + j % 2)]) for j in range(len(numels))],
                hyper=VEC_HYPER, flags=0, lr=1e-2, lr_tensor=None, maximize=False, grad_scale=None, found_inf=None,
                phase=phase, rows=rows_list, row_coef=row_coef,
                reduce_out=torch.zeros(4 * total) if phase == 1 else None, seed=1234, stochastic=sr,
                sparse_mask=masks, sparse_out=outs, sparse_lambda=0.01 if sparse else 0.0,
                sparse_beta=0.3 if sparse else 0.0,
                sr_offsets=[(2 ** 32 - 5 if j % 4 == 1 else 1000 * j) for j in range(len(numels))] if sr else None)


def _vec_outputs(case):
    out = case["params"] + case["states"] + case["state_steps"] + list(case["sparse_out"])
    return out + ([case["reduce_out"]] if case["reduce_out"] is not None else [])


VEC_CASES = [(op, phase, rows, sparse, sr) for op, may_sparse in VEC_OPS.items()
             for phase in ((0, 1) if not may_sparse else (0,))
             for rows in (False, True) for sparse in ((False, True) if may_sparse else (False,))
             for sr in ((False, True) if phase == 0 else (False,))]


@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("op,phase,rows,sparse,sr", VEC_CASES,
                         ids=[f"{o}-p{p}{'-rows' if r else ''}{'-sparse' if s else ''}{'-sr' if q else ''}"
                              for o, p, r, s, q in VEC_CASES])
def test_elementwise_vector_paths_match_cpu(layer, op, phase, rows, sparse, sr, dtype):
    from fastopt import _ops

    if sr and dtype != torch.bfloat16:
        pytest.skip("stochastic rounding is for bf16 params")
    want, got = _vec_case(op, dtype, phase, rows, sparse, sr), _vec_case(op, dtype, phase, rows, sparse, sr)
    _ops._elementwise_kernel(backend="cpu", **want)
    _ops._elementwise_kernel(backend="cuda", **got)
    w, g = _vec_outputs(want), _vec_outputs(got)
    if phase == 1:  # the states exactly; the per-row sums of counts (lion_cautious) exactly, others not
        _compare(g[:-1], w[:-1], True, f"{op} phase 1 {dtype}")
        if op == "lion_cautious":  # integers below 2^24: every summation order gives the same sums
            assert torch.equal(g[-1], w[-1]), f"{op}: phase-1 counts differ"
        else:  # fp32 sums of up to 140k terms in another order (module docstring): within 2e-5 of the largest
            torch.testing.assert_close(g[-1], w[-1], rtol=1e-4, atol=2e-5 * w[-1].abs().max().item(),
                                       msg=f"{op} phase-1 row sums")
        assert g[-1].abs().sum() > 0  # the pass summed something
    else:
        _compare(g, w, True, f"{op} rows={rows} sparse={sparse} sr={sr} {dtype}")
        assert not torch.equal(w[0][0], _vec_case(op, dtype, phase, rows, sparse, sr)["params"][0]) or op == "lamb"


@pytest.mark.parametrize("dtype", VEC_DTYPES, ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("amsgrad", [False, True], ids=["adam", "amsgrad"])
def test_adam_vector_paths_match_cpu(layer, dtype, amsgrad):
    from fastopt import _ops

    def case():
        gen = torch.Generator().manual_seed(3)
        numels = [n for n, _ in VEC_SHAPES]
        lists = _offset_views(numels, 5, dtype, gen, lambda n: torch.randn(n, generator=gen).to(dtype))
        for t in lists[3] + lists[4]:
            t.abs_()
        return dict(params=lists[0], grads=lists[1], exp_avgs=lists[2], exp_avg_sqs=lists[3],
                    max_exp_avg_sqs=lists[4] if amsgrad else [],
                    state_steps=[torch.tensor([float(2 + j % 3)]) for j in range(len(numels))], lr=1e-2,
                    lr_tensor=None, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True,
                    amsgrad=amsgrad, maximize=False, grad_scale=None, found_inf=None)

    want, got = case(), case()
    _ops._adam_kernel(backend="cpu", **want)
    _ops._adam_kernel(backend="cuda", **got)
    keys = ["params", "exp_avgs", "exp_avg_sqs", "state_steps"] + (["max_exp_avg_sqs"] if amsgrad else [])
    _compare([t for k in keys for t in got[k]], [t for k in keys for t in want[k]], True, f"adam {dtype} {amsgrad}")


def test_mutation_row_cursor_is_caught(tmp_path, built):
    """The vector path's row cursor stepping one element late (a row boundary missed inside a vector): the
    elements after it get their row coefficients from the row before."""
    mutated = _mutated_build(tmp_path, built, "csrc/cuda/elementwise.cu", "if (++col == len) {", "if (++col > len) {",
                             _only_op("adamp", "AdamPOp"))
    code = """
import sys, torch
sys.path.insert(0, {tests!r})
import _cuda_on_cpu as coc, _cuda_on_cpu_build as b, test_cuda_on_cpu as t
coc.activate(b.load({path!r}))
t.test_elementwise_vector_paths_match_cpu(None, "adamp", 0, True, False, False, torch.float32)
"""
    for path, ok in ((built, True), (mutated, False)):
        r = subprocess.run([sys.executable, "-c", code.format(tests=str(ROOT / "tests"), path=str(path))],
                           capture_output=True, text=True, cwd=ROOT)
        assert (r.returncode == 0) == ok and NO_KERNEL not in r.stderr, r.stderr[-3000:]


# ---- the step increment folded into the main launches (issue 18 item 3) ----
#
# Each launch of a call whose step counters are distinct takes tickets from the int32 counter the Python side
# passes (here coc.TICKET; _cuda_on_cpu.run_native also checks after every call that it is back at 0) and its
# last block increments the steps of the tensors the launch finishes (multi_tensor.cuh, StepFold).  These tests
# check the steps against the cpu backend and against old + 1, that no separate increment_steps_kernel launch
# ran (the layer counts launches per kernel), calls of several launches (more tensors than a launch holds, and
# a tensor whose chunks continue in the next launch), AMP-skipped calls and empty tensors.

def _launches(kernel):
    return sum(v for k, v in coc.module().coc_launch_counts().items() if k.startswith(kernel))


def _rand(gen, dtype):
    return lambda n, pos=False: (torch.randn(n, generator=gen).abs() if pos else torch.randn(n, generator=gen)).to(dtype)


def _adam_fold_case(numels, dtype=torch.float32, found_inf=None, shared_step=False, seed=5):
    gen = torch.Generator().manual_seed(seed)
    mk = _rand(gen, dtype)
    steps = [torch.tensor([float(1 + j % 5)]) for j in range(len(numels))]
    if shared_step:
        steps[-1] = steps[0]
    return dict(params=[mk(n) for n in numels], grads=[mk(n) for n in numels], exp_avgs=[mk(n) for n in numels],
                exp_avg_sqs=[mk(n, True) for n in numels], max_exp_avg_sqs=[], state_steps=steps, lr=1e-2,
                lr_tensor=None, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, decoupled=True, amsgrad=False,
                maximize=False, grad_scale=None,
                found_inf=None if found_inf is None else torch.tensor([float(found_inf)]))


def _lion_fold_case(numels, dtype=torch.float32, found_inf=None, seed=6):
    gen = torch.Generator().manual_seed(seed)
    mk = _rand(gen, dtype)
    return dict(op="lion", params=[mk(n) for n in numels], grads=[mk(n) for n in numels],
                states=[mk(n) for n in numels], state_steps=[torch.tensor([float(2 + j % 3)]) for j in range(len(numels))],
                hyper=VEC_HYPER, flags=0, lr=1e-2, lr_tensor=None, maximize=False, grad_scale=None,
                found_inf=None if found_inf is None else torch.tensor([float(found_inf)]), phase=0, rows=[],
                row_coef=None, reduce_out=None, seed=7, stochastic=False, sparse_mask=[], sparse_out=[],
                sparse_lambda=0.0, sparse_beta=0.0)


ADAM_KEYS = ["params", "exp_avgs", "exp_avg_sqs", "state_steps"]
LION_KEYS = ["params", "states", "state_steps"]


def _fold_check(kernel, make, keys, numels, min_launches, found_inf=None, fold=True, **kw):
    """Runs ``make(numels)`` on the cpu backend and through the layer; compares everything bit for bit, checks
    the steps (old + 1, or old when found_inf is set) and the launches; returns the launch counts."""
    from fastopt import _ops

    want, got, before = make(numels, found_inf=found_inf, **kw), make(numels, found_inf=found_inf, **kw), \
        make(numels, found_inf=found_inf, **kw)
    getattr(_ops, kernel)(backend="cpu", **want)
    main0, inc0 = _launches("multi_tensor_kernel"), _launches("increment_steps_kernel")
    coc.FOLD[0] = fold
    try:
        getattr(_ops, kernel)(backend="cuda", **got)
    finally:
        coc.FOLD[0] = True
    main, inc = _launches("multi_tensor_kernel") - main0, _launches("increment_steps_kernel") - inc0
    _compare([t for k in keys for t in got[k]], [t for k in keys for t in want[k]], True, f"{kernel} {numels}")
    skipped = found_inf is not None and found_inf != 0
    for j, (s, s0) in enumerate(zip(got["state_steps"], before["state_steps"])):
        if not kw.get("shared_step"):
            assert s.item() == s0.item() + (0 if skipped else 1), f"step {j}: {s0.item()} -> {s.item()}"
    if skipped:
        assert all(torch.equal(p, p0) for p, p0 in zip(got["params"], before["params"]))
    assert coc.TICKET.item() == 0
    assert main >= min_launches, f"{main} main launches, expected at least {min_launches}"
    return main, inc


# 130 tensors (Adam's launches hold 36, lion's 32), sizes 0..999 with an empty tensor every 13th
MANY = [0 if j % 13 == 5 else (j * 37) % 1000 + 1 for j in range(130)]


@pytest.mark.parametrize("found_inf", [None, 0.0, 1.0], ids=["no-amp", "finite", "inf"])
@pytest.mark.parametrize("which", ["adam", "lion"])
def test_step_fold_many_tensors(layer, which, found_inf):
    kernel, make, keys = (("_adam_kernel", _adam_fold_case, ADAM_KEYS) if which == "adam" else
                          ("_elementwise_kernel", _lion_fold_case, LION_KEYS))
    _, inc = _fold_check(kernel, make, keys, MANY, 4, found_inf)
    assert inc == 0, "a separate increment_steps_kernel launch ran"


@pytest.mark.parametrize("numels", [[0], [0, 0, 0], [0, 5, 0], [3, 0], [65537, 0]], ids=str)
@pytest.mark.parametrize("which", ["adam", "lion"])
def test_step_fold_empty_tensors(layer, which, numels):
    kernel, make, keys = (("_adam_kernel", _adam_fold_case, ADAM_KEYS) if which == "adam" else
                          ("_elementwise_kernel", _lion_fold_case, LION_KEYS))
    _, inc = _fold_check(kernel, make, keys, numels, 1)
    assert inc == 0, "a separate increment_steps_kernel launch ran"


def test_step_fold_tensor_across_launches(layer):
    """Two tensors of 200 chunks: the second one's chunks continue in the next launch (320 blocks a launch),
    so the first launch must leave its step alone (its later blocks read it)."""
    numels = [200 * 65536 + 3, 200 * 65536 + 5]
    _, inc = _fold_check("_elementwise_kernel", _lion_fold_case, LION_KEYS, numels, 2, dtype=torch.bfloat16)
    assert inc == 0


@pytest.mark.parametrize("which", ["adam", "lion"])
def test_step_fold_fallbacks(layer, which):
    """Ticket 0 (no counter) and a step counter shared by two tensors: the separate increment launch, as before."""
    kernel, make, keys = (("_adam_kernel", _adam_fold_case, ADAM_KEYS) if which == "adam" else
                          ("_elementwise_kernel", _lion_fold_case, LION_KEYS))
    _, inc = _fold_check(kernel, make, keys, MANY, 4, fold=False)
    assert inc >= 1
    if which == "adam":
        _, inc = _fold_check(kernel, make, keys, [5, 7, 9], 1, shared_step=True)
        assert inc >= 1


@pytest.mark.parametrize("found_inf", [None, 1.0], ids=["no-amp", "inf"])
def test_step_fold_lowbit_many_tensors(layer, found_inf):
    """AdamW8bit over 40 params (16 a launch), one of 3 chunks, and an AMP-skipped step."""
    shapes = [(j % 7 + 1) * 256 for j in range(40)] + [3 * 16384 + 256]

    def run(backend):
        gen = torch.Generator().manual_seed(4)
        ps = [torch.nn.Parameter(torch.randn(n, generator=torch.Generator().manual_seed(n))) for n in shapes]
        opt = lowbit.AdamW8bit(ps, lr=1e-2, backend=backend, min_quant_size=0)  # every param quantized
        for k in range(3 if found_inf is not None else 2):
            if k == 2:  # a third, AMP-skipped step
                opt.found_inf = torch.tensor([found_inf])
            for p in ps:
                p.grad = torch.randn(p.shape, generator=gen)
            opt.step()
        return ps, opt

    ps_w, opt_w = run("cpu")
    inc0, main0 = _launches("increment_steps_kernel"), _launches("lowbit_kernel")
    ps_g, opt_g = run("cuda")
    assert _launches("increment_steps_kernel") == inc0, "a separate increment_steps_kernel launch ran"
    assert _launches("lowbit_kernel") - main0 >= 2 * 3
    states = lambda ps, opt: [v for p in ps for v in opt.state[p].values() if torch.is_tensor(v)]  # noqa: E731
    _compare([p.detach() for p in ps_g] + states(ps_g, opt_g), [p.detach() for p in ps_w] + states(ps_w, opt_w),
             True, "AdamW8bit")
    assert all(float(opt_g.state[p]["step"]) == 2 for p in ps_g)
    assert coc.TICKET.item() == 0


def test_mutation_fold_continuing_tensor_is_caught(tmp_path, built):
    """The launcher letting a launch increment the step of the tensor that continues in the next launch: that
    launch's blocks then read step + 1 (wrong bias corrections, and the step ends one too high)."""
    rel = "csrc/include/fastopt/multi_tensor.cuh"
    old, new = "fold.nsteps = c == chunks - 1 ? ntensors : ntensors - 1;", "fold.nsteps = ntensors;"
    text = (ROOT / rel).read_text()
    assert text.count(old) == 1, f"mutation anchor not found once in {rel}"
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "csrc", tree / "csrc")
    (tree / rel).write_text(text.replace(old, new))
    # only elementwise.cu recompiled: the launcher's instantiations are local to each .cu (anonymous-namespace ops)
    mutated = coc_build.build(src_root=tree, out_dir=tmp_path / "out", reuse=(built, ["csrc/cuda/elementwise.cu"]),
                              extra_flags=_only_op("lion", "LionOp"))
    code = """
import sys
sys.path.insert(0, {tests!r})
import _cuda_on_cpu as coc, _cuda_on_cpu_build as b, test_cuda_on_cpu as t
coc.activate(b.load({path!r}))
t.test_step_fold_tensor_across_launches(None)
"""
    for path, ok in ((built, True), (mutated, False)):
        r = subprocess.run([sys.executable, "-c", code.format(tests=str(ROOT / "tests"), path=str(path))],
                           capture_output=True, text=True, cwd=ROOT)
        assert (r.returncode == 0) == ok and NO_KERNEL not in r.stderr, r.stderr[-3000:]
