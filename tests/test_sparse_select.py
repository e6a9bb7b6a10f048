"""Magnitude selection (``fastopt.sparse.magnitude_masks`` / ``magnitude_thresholds``): masks vs
``torch.nn.utils.prune`` (l1_unstructured per layer, global_unstructured), the tie rule and the thresholds
vs brute force, every backend bit for bit (C++, Triton, the torch reference), NaN/inf, mixed dtypes,
a > 2^24-element group, edge cases and argument errors."""
import math

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fastopt import _backend, _ops, sparse
from fastopt.reference.select import magnitude_keys, magnitude_select_reference, prune_count

from conftest import NEEDS_TRITON, TRITON_DEVICE

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(37, 11), (5,), (3, 4, 5), (1,), (64, 33)]
DENSITIES = [0.03, 0.3, 0.5, 0.9, 1.0]
BACKENDS = [b for b in ("cpu",) if b in _backend.available_backends("cpu")] + ["torch"]


def distinct(shapes, dtype, seed=0):
    """Tensors of ``dtype`` whose magnitudes are all distinct (across all of them), random signs."""
    gen = torch.Generator().manual_seed(seed)
    total = sum(math.prod(s) for s in shapes)
    if dtype == torch.float32:
        mags = (torch.randperm(total, generator=gen) + 1).float() * 0.37
    else:  # distinct positive finite bit patterns
        top = 0x7BFF if dtype == torch.float16 else 0x7F7F
        mags = (torch.randperm(top, generator=gen)[:total] + 1).to(torch.int16).view(dtype)
    signs = torch.randint(0, 2, (total,), generator=gen).to(dtype) * 2 - 1
    flat = mags.to(dtype) * signs
    return [c.reshape(s).clone() for c, s in zip(flat.split([math.prod(s) for s in shapes]), shapes)]


def tied(shape, dtype=torch.float32, seed=0, hi=4):
    """Small integers (many ties), with NaN, +-inf and -0.0 sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-hi + 1, hi, shape, generator=gen).float()
    flat = w.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = -float("inf")
    flat[1::17] = -0.0
    return w.to(dtype)


def torch_layer_mask(w, density):
    m = nn.Module()
    m.weight = nn.Parameter(w.clone())
    prune.l1_unstructured(m, "weight", amount=1 - density)
    return m.weight_mask.bool()


def torch_global_masks(ws, density):
    mods = []
    for w in ws:
        m = nn.Module()
        m.weight = nn.Parameter(w.clone())
        mods.append(m)
    prune.global_unstructured([(m, "weight") for m in mods], pruning_method=prune.L1Unstructured,
                              amount=1 - density)
    return [m.weight_mask.bool() for m in mods]


def brute(ws, densities, scope):
    """(thresholds, masks) by sorting (key, -flat index) in Python: the spec's order, written out."""
    groups = [[w] for w in ws] if scope == "layer" else [list(ws)]
    thr, masks = [], []
    for grp, d in zip(groups, densities):
        keys = [v for w in grp for v in magnitude_keys(w).tolist()]
        p = prune_count(d, len(keys))
        order = sorted(range(len(keys)), key=lambda i: (keys[i], -i))
        keep = [True] * len(keys)
        for i in order[:p]:
            keep[i] = False
        thr.append(keys[order[p - 1]] if p else -math.inf)
        flat = torch.tensor(keep, dtype=torch.bool)
        start = 0
        for w in grp:
            masks.append(flat[start:start + w.numel()].view(w.shape))
            start += w.numel()
    return torch.tensor(thr, dtype=torch.float32), masks


def assert_masks(got, want, what=""):
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want)):
        assert g.dtype == torch.bool and g.shape == w.shape, (what, i)
        assert torch.equal(g, w.to(g.device)), (what, i, int((g.cpu() != w.cpu()).sum()))


# -- vs torch.nn.utils.prune -----------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_matches_torch_prune(dtype, backend):
    ws = distinct(SHAPES, dtype, seed=1)
    for d in DENSITIES:
        assert_masks(sparse.magnitude_masks(ws, d, backend=backend), [torch_layer_mask(w, d) for w in ws], d)
    per = [0.2, 0.7, 1.0, 0.5, 0.11]  # one density per tensor
    assert_masks(sparse.magnitude_masks(ws, per, backend=backend),
                 [torch_layer_mask(w, d) for w, d in zip(ws, per)], "per-tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_global_matches_torch_prune(dtype, backend):
    ws = distinct(SHAPES, dtype, seed=2)
    for d in DENSITIES:
        assert_masks(sparse.magnitude_masks(ws, d, scope="global", backend=backend), torch_global_masks(ws, d), d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_ties_prune_torch_counts(scope, backend):
    """With ties torch's choice among equal |w| is unspecified: the same number pruned (per tensor, or in
    all), and the same decision wherever |w| differs from the threshold."""
    ws = [tied((40, 9), seed=3).nan_to_num(nan=0.0), tied((7,), seed=4).nan_to_num(nan=0.0)]
    for d in (0.25, 0.5, 0.8):
        ours = sparse.magnitude_masks(ws, d, scope=scope, backend=backend)
        thr = sparse.magnitude_thresholds(ws, d, scope=scope, backend=backend)
        ref = [torch_layer_mask(w, d) for w in ws] if scope == "layer" else torch_global_masks(ws, d)
        if scope == "layer":
            assert [int(m.sum()) for m in ours] == [int(m.sum()) for m in ref]
        else:
            assert sum(int(m.sum()) for m in ours) == sum(int(m.sum()) for m in ref)
        for i, (w, a, b) in enumerate(zip(ws, ours, ref)):
            t = thr[i if scope == "layer" else 0]
            off = w.abs() != t
            assert torch.equal(a[off], b[off])


# -- the tie rule, thresholds, NaN -----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_tie_rule_and_thresholds_vs_brute_force(scope, dtype, backend):
    ws = [tied((13, 10), dtype, seed=5), tied((17,), dtype, seed=6), tied((2, 3, 4), dtype, seed=7)]
    for d in (0.05, 0.3, 0.5, 0.77, 1.0):
        dens = [d] * len(ws) if scope == "layer" else [d]
        want_thr, want = brute(ws, dens, scope)
        assert_masks(sparse.magnitude_masks(ws, d, scope=scope, backend=backend), want, (d, "masks"))
        got_thr = sparse.magnitude_thresholds(ws, d, scope=scope, backend=backend)
        assert got_thr.dtype == torch.float32 and torch.equal(got_thr, want_thr), (d, got_thr, want_thr)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_counts_as_inf(backend):
    w = torch.tensor([float("nan"), 1.0, float("inf"), -2.0, float("nan"), 0.5, -float("inf")])
    # keep 3 of 7: the keys inf (NaN), inf, inf (NaN), inf -- four tie at +inf; the lowest indices 0, 2, 4 kept
    m = sparse.magnitude_masks([w], 3 / 7, backend=backend)[0]
    assert m.tolist() == [True, False, True, False, True, False, False]
    assert sparse.magnitude_thresholds([w], 3 / 7, backend=backend).item() == math.inf
    # keep 5: the four infinities and -2.0
    m = sparse.magnitude_masks([w], 5 / 7, backend=backend)[0]
    assert m.tolist() == [True, False, True, True, True, False, True]
    assert sparse.magnitude_thresholds([w], 5 / 7, backend=backend).item() == 1.0


# -- backends agree (bigger, several units, ties across units) -------------------------------------------

@pytest.mark.parametrize("scope", ["layer", "global"])
def test_cpu_kernel_many_units_and_ties(scope):
    if "cpu" not in BACKENDS:
        pytest.skip("no fastopt._C")
    gen = torch.Generator().manual_seed(8)
    ws = [torch.randint(-40, 41, (140_001,), generator=gen).to(torch.bfloat16),   # ties across 3 units
          torch.randn(513, 257, generator=gen),
          torch.randint(-40, 41, (70_000,), generator=gen).half(),
          torch.randn(3, generator=gen)]
    for d in (0.1, 0.5):
        want_thr, want = magnitude_select_reference(ws, [d] * (len(ws) if scope == "layer" else 1), scope)
        assert_masks(sparse.magnitude_masks(ws, d, scope=scope, backend="cpu"), want, d)
        assert torch.equal(sparse.magnitude_thresholds(ws, d, scope=scope, backend="cpu"), want_thr)


def test_cpu_kernel_mostly_equal_magnitudes():
    """Most keys in the threshold's first-pass bin (the kernel then re-reads the tensors in pass 3 instead
    of collecting candidates in pass 2): still the reference's masks."""
    if "cpu" not in BACKENDS:
        pytest.skip("no fastopt._C")
    gen = torch.Generator().manual_seed(15)
    ws = [torch.where(torch.rand(150_000, generator=gen) < 0.5, 1.0, -1.0), torch.randn(40_000, generator=gen)]
    for scope in ("layer", "global"):
        want_thr, want = magnitude_select_reference(ws, [0.4] * (2 if scope == "layer" else 1), scope)
        assert_masks(sparse.magnitude_masks(ws, 0.4, scope=scope, backend="cpu"), want, scope)
        assert torch.equal(sparse.magnitude_thresholds(ws, 0.4, scope=scope, backend="cpu"), want_thr)


def test_cpu_kernel_group_above_2_pow_24():
    """A group of 2^24 + 5 fp16 elements (heavy ties): the count, the threshold and the tie rule hold."""
    if "cpu" not in BACKENDS:
        pytest.skip("no fastopt._C")
    n = (1 << 24) + 5
    w = torch.randn(n, generator=torch.Generator().manual_seed(9)).half()
    d = 0.3
    m = sparse.magnitude_masks([w], d, backend="cpu")[0]
    t = sparse.magnitude_thresholds([w], d, backend="cpu")
    p = prune_count(d, n)
    keys = w.float().abs()
    assert t.item() == torch.kthvalue(keys, p).values.item()
    assert int(m.sum()) == n - p
    assert bool(((m == (keys > t)) | (keys == t)).all())
    ties = (keys == t).nonzero().view(-1)
    kept = m[ties]
    assert kept.any() and not kept.all()
    assert bool((kept[:-1].int() >= kept[1:].int()).all())  # kept ties are the lowest indices


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes(backend):
    ws = distinct([(20, 20), (33,), (8, 8)], torch.float32, seed=10)
    ws = [ws[0], ws[1].bfloat16(), ws[2].half()]
    for scope in ("layer", "global"):
        want_thr, want = magnitude_select_reference(ws, [0.4] * (3 if scope == "layer" else 1), scope)
        assert_masks(sparse.magnitude_masks(ws, 0.4, scope=scope, backend=backend), want, scope)
        assert torch.equal(sparse.magnitude_thresholds(ws, 0.4, scope=scope, backend=backend), want_thr)
    up = [w.float() for w in ws]  # (exact conversions: the same keys)
    assert_masks(sparse.magnitude_masks(ws, 0.4, scope="global", backend=backend), torch_global_masks(up, 0.4))


def test_float64_runs_on_torch():
    ws = [torch.randn(30, 3, dtype=torch.float64), torch.randn(9, dtype=torch.float64)]
    assert_masks(sparse.magnitude_masks(ws, 0.3), [torch_layer_mask(w, 0.3) for w in ws])
    assert sparse.magnitude_thresholds(ws, 0.3, scope="global").dtype == torch.float64
    if "cpu" in BACKENDS:
        with pytest.raises(_backend.BackendUnavailableError, match="magnitude_masks: backend 'cpu'"):
            sparse.magnitude_masks(ws, 0.3, backend="cpu")


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_and_edge_cases(backend):
    w = distinct([(12, 9)], torch.float32, seed=11)[0]
    assert_masks(sparse.magnitude_masks([w.t()], 0.4, backend=backend), [torch_layer_mask(w.t().contiguous(), 0.4)])
    # density 1: everything kept, threshold -inf; an empty tensor in the list
    ws = [w, torch.empty(0, 3)]
    assert all(m.all() for m in sparse.magnitude_masks(ws, 1.0, backend=backend))
    assert sparse.magnitude_thresholds(ws, 1.0, backend=backend).tolist() == [-math.inf, -math.inf]
    assert sparse.magnitude_masks(ws, 0.5, backend=backend)[1].shape == (0, 3)
    # one element: round(0.5) = 0 pruned at density 0.5 (Python rounds half to even), 1 at density 0.4
    one = torch.tensor([-3.0])
    for d in (0.5, 0.4):
        assert_masks(sparse.magnitude_masks([one], d, backend=backend), [torch_layer_mask(one, d)], d)
    # everything pruned: the threshold is the largest |w|
    assert not sparse.magnitude_masks([w], 1e-9, backend=backend)[0].any()
    assert sparse.magnitude_thresholds([w], 1e-9, backend=backend).item() == w.abs().max().item()


# -- Triton ------------------------------------------------------------------------------------------------

@NEEDS_TRITON
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_triton_matches_reference(scope):
    gen = torch.Generator().manual_seed(12)
    ws = [tied((70_001,), torch.bfloat16, seed=13, hi=30),                        # two chunks, ties across them
          torch.randn(37, 11, generator=gen), tied((9,), torch.float16, seed=14), torch.empty(0),
          torch.randn(1001, generator=gen)[1:]]                                      # not 16-byte aligned
    ws = [w.to(TRITON_DEVICE) for w in ws]
    for d in (0.1, 0.6):
        dens = [d] * (len(ws) if scope == "layer" else 1)
        want_thr, want = magnitude_select_reference(ws, dens, scope)
        assert_masks(sparse.magnitude_masks(ws, d, scope=scope, backend="triton"), want, d)
        got = sparse.magnitude_thresholds(ws, d, scope=scope, backend="triton")
        assert torch.equal(got.cpu(), want_thr.cpu())
    if "cpu" in BACKENDS and TRITON_DEVICE == "cpu":
        assert_masks(sparse.magnitude_masks(ws, 0.3, scope=scope, backend="triton"),
                     sparse.magnitude_masks(ws, 0.3, scope=scope, backend="cpu"), "triton vs cpu")


# -- errors ------------------------------------------------------------------------------------------------

def test_argument_errors():
    w = torch.randn(4, 4)
    f = sparse.magnitude_masks
    cases = [
        (lambda: f([], 0.5), ValueError, "magnitude_masks: tensors is empty"),
        (lambda: f(w, 0.5), TypeError, "list or tuple"),
        (lambda: f([w, 3.0], 0.5), TypeError, r"tensors\[1\]"),
        (lambda: f([torch.ones(3, dtype=torch.int32)], 0.5), TypeError, "int32"),
        (lambda: f([w, torch.randn(3, device="meta")], 0.5), ValueError, "one device"),
        (lambda: f([w], 0.0), ValueError, r"\(0, 1\]"),
        (lambda: f([w], 1.5), ValueError, r"\(0, 1\]"),
        (lambda: f([w], float("nan")), ValueError, r"\(0, 1\]"),
        (lambda: f([w], True), TypeError, "density"),
        (lambda: f([w], "0.5"), TypeError, "density"),
        (lambda: f([w, w], [0.5]), ValueError, "1 densities for 2 tensors"),
        (lambda: f([w, w], [0.5, 0.5], scope="global"), TypeError, "density"),
        (lambda: f([w], 0.5, scope="model"), ValueError, "scope"),
        (lambda: f([w], 0.5, backend="gpu"), ValueError, "unknown backend"),
        (lambda: f([w], 0.5, backend="cuda"), _backend.BackendUnavailableError, "no 'cuda' kernel"),
        (lambda: sparse.magnitude_thresholds([w.to_sparse()], 0.5), TypeError, "strided"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            fn()


def test_op_and_native_checks():
    """The custom op checks what reaches the kernels, and the C++ entry re-checks its table."""
    if "cpu" not in BACKENDS:
        pytest.skip("no fastopt._C")
    x = torch.randn(10)
    thr = torch.empty(1)
    out = torch.empty(10, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"counts\[0\] = 11"):
        _ops.magnitude_select([x], [0], [11], thr, [out], "cpu")
    with pytest.raises(ValueError, match="groups"):
        _ops.magnitude_select([x, x], [0, 2], [1, 1], torch.empty(3), [], "cpu")
    with pytest.raises(ValueError, match="contiguous"):
        _ops.magnitude_select([torch.randn(4, 4).t()], [0], [1], thr, [], "cpu")
    with pytest.raises(ValueError, match="shares memory"):
        _ops.magnitude_select([x], [0], [1], thr, [x.view(torch.uint8)[:10]], "cpu")
    with pytest.raises(ValueError, match="elements"):
        _ops.magnitude_select([x], [0], [1], thr, [out[:5]], "cpu")
    native = _backend.native()
    with pytest.raises(ValueError, match="count out of range"):
        native.magnitude_select_cpu([x.data_ptr()], [10], [0], [0], [11], thr.data_ptr(), [])
    with pytest.raises(ValueError, match="unsupported dtype"):
        native.magnitude_select_cpu([x.data_ptr()], [10], [7], [0], [1], thr.data_ptr(), [])
    _ops.magnitude_select([x], [0], [3], thr, [out], "cpu")  # the checks pass a good call
    assert int(out.sum()) == 7 and thr.item() == x.abs().sort().values[2].item()
