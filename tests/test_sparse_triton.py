"""Triton N:M and transposable 2:4 masks (``fastopt.triton_kernels.sparse``) vs the reference
``fastopt.reference.sparse``, bit for bit.

* ``nm_mask``: random data over many decades and tie-heavy data (small integers, rounded values,
  +-0) in fp32 / fp16 / bf16; NaN, +-inf, -0.0, subnormals; n:m from 0:4 to 7:64 and 16:32 (m not a
  power of two too); the masked dimension first, middle and last of odd 3-d shapes; several programs
  with a partial last one; numel 0; the argument checks.
* ``transposable_mask`` exact and greedy: random, tied, NaN/inf data; every one of the 90 patterns as
  the unique winner, all-equal tiles (pattern 0), data where fp32 rounding of the fixed summation
  order decides the winner; shapes (4, 4), (8, 12), (12, 8, 2) viewed as [12, 16], (64, 64), and one
  with several programs.
* both kernels also with the other tile configuration (the GPU one under the interpreter), which for
  ``nm_mask`` is a different rank loop.
"""
import importlib
import math

import pytest
import torch

from conftest import NEEDS_TRITON, TRITON_DEVICE as DEVICE
from fastopt.reference.sparse import (nm_mask_reference, tile_pattern_masks, tile_patterns,
                                      transposable_mask_reference)

pytestmark = [
    NEEDS_TRITON,
    # the interpreter's numpy warns when fp32 sums of huge keys overflow to inf (as they must)
    pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning"),
]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NM = [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4), (3, 7), (5, 16), (1, 1), (16, 32), (7, 64)]


def ts():
    return importlib.import_module("fastopt.triton_kernels.sparse")


@pytest.fixture(params=["native", "other"])
def tiles(request, monkeypatch):
    """Run with this machine's tile configuration, and (under the interpreter only) with the GPU one."""
    if request.param == "other":
        if DEVICE != "cpu":
            pytest.skip("the interpreter's tiles are not meant for a GPU")
        monkeypatch.setattr(ts(), "_interpreting", lambda: False)
    return request.param


def run_nm(w, n, m, dim=-1):
    """The kernel's mask of ``w`` (any device) as a CPU bool tensor; ``out`` starts as garbage."""
    dim %= w.dim()
    shape = tuple(w.shape)
    outer, inner = math.prod(shape[:dim]), math.prod(shape[dim + 1:])
    x = w.to(DEVICE).contiguous()
    out = torch.full(shape, 7, dtype=torch.uint8, device=DEVICE)
    assert ts().nm_mask(x, out, outer, shape[dim], inner, n, m) is None
    out = out.cpu()
    assert ((out == 0) | (out == 1)).all(), "unwritten or non-0/1 bytes"
    return out.bool()


def run_t24(w, exact):
    rows = w.shape[0]
    cols = 1
    for s in w.shape[1:]:
        cols *= s
    x = w.to(DEVICE).contiguous()
    out = torch.full(tuple(w.shape), 7, dtype=torch.uint8, device=DEVICE)
    assert ts().transposable_mask(x, out, rows, cols, exact) is None
    out = out.cpu()
    assert ((out == 0) | (out == 1)).all(), "unwritten or non-0/1 bytes"
    return out.bool()


def check_nm(w, n, m, dim=-1):
    got = run_nm(w, n, m, dim)
    ref = nm_mask_reference(w.cpu(), n, m, dim)
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {ref.numel()} differ, first at {bad[:4].tolist()}"
    return got


def check_t24(w, exact):
    got = run_t24(w, exact)
    ref = transposable_mask_reference(w.cpu(), "exact" if exact else "greedy")
    bad = (got != ref).nonzero()
    assert bad.numel() == 0, f"{bad.shape[0]} of {ref.numel()} differ, first at {bad[:4].tolist()}"
    return got


def wide(shape, dtype, seed=0):
    """Random signs and magnitudes over many decades (few ties)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen) * torch.exp(torch.randn(shape, generator=gen) * 3)
    return x.to(dtype)


def tied(shape, dtype, seed=0):
    """Values from {-1, 0, 1, 2} with -0.0 mixed in: most comparisons are ties."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -0.0])[torch.randint(0, 5, shape, generator=gen)]
    return x.to(dtype)


def rounded(shape, dtype, seed=0):
    """randn rounded to halves: ties between +x and -x and between equal values."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.round(torch.randn(shape, generator=gen) * 4) / 2).to(dtype)


def specials(shape, dtype, seed=0):
    """NaN, +-inf, +-0.0, subnormals and the dtype's largest finite values among ordinary numbers."""
    gen = torch.Generator().manual_seed(seed)
    fi = torch.finfo(dtype)
    pool = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, fi.max, -fi.max,
                         fi.tiny / 4, -fi.tiny / 2, 1.0, -1.0, 3.0], dtype=torch.float32).to(dtype)
    x = torch.randn(shape, generator=gen).to(dtype)
    pick = torch.randint(0, 2 * pool.numel(), shape, generator=gen)
    sel = pick < pool.numel()
    x[sel] = pool[pick[sel]]
    return x


# -- nm_mask -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", NM)
def test_nm_random(n, m, dtype, tiles):
    w = wide((6, 3 * m), dtype, seed=m * 31 + n)
    got = check_nm(w, n, m)
    assert torch.equal(got.view(-1, m).sum(1), torch.full((6 * 3,), n))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 7), (5, 16), (16, 32), (7, 64), (63, 64)])
@pytest.mark.parametrize("data", [tied, rounded])
def test_nm_ties(data, n, m, dtype):
    check_nm(data((5, 4 * m), dtype, seed=n + m), n, m)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,m", [(2, 4), (1, 4), (4, 8), (3, 7), (7, 64)])
def test_nm_specials(n, m, dtype, tiles):
    check_nm(specials((7, 4 * m), dtype, seed=m), n, m)


def test_nm_specials_by_hand():
    """NaN ties with +-inf (lowest index wins), -0.0 ties with 0.0, all-NaN and all-equal groups."""
    nan, inf = float("nan"), float("inf")
    w = torch.tensor([[1.0, -inf, nan, inf],      # keys 1, inf, inf, inf -> positions 1, 2
                      [-0.0, 0.0, -0.0, 0.0],     # all tied -> 0, 1
                      [nan, nan, nan, nan],       # 0, 1
                      [0.5, -2.0, 2.0, -0.5],     # 1, 2
                      [0.0, -1e-45, -0.0, 0.0],   # a subnormal beats the zeros: 1, then 0
                      [0.0, -0.0, 2e-45, 1e-45]])  # subnormals: 2, 3
    want = torch.tensor([[0, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [0, 1, 1, 0], [1, 1, 0, 0], [0, 0, 1, 1]],
                        dtype=torch.bool)
    for dtype in DTYPES:
        x = w.to(dtype)
        tiny = torch.finfo(dtype).tiny
        x[4] = torch.tensor([0.0, -tiny / 4, -0.0, 0.0], dtype=dtype)
        x[5] = torch.tensor([0.0, -0.0, tiny / 2, -tiny / 4], dtype=dtype)
        assert (x[4:].float() != 0).sum() == 3, "subnormals expected"
        assert torch.equal(check_nm(x, 2, 4), want), dtype
        # 1:4 on the subnormal rows: the larger subnormal alone
        assert torch.equal(check_nm(x[4:], 1, 4), torch.tensor([[0, 1, 0, 0], [0, 0, 1, 0]], dtype=torch.bool))
    # a whole group of 64 equal magnitudes keeps its first n
    x = torch.where(torch.arange(128) % 3 == 0, -1.5, 1.5).view(2, 64)
    got = check_nm(x, 7, 64)
    assert torch.equal(got, (torch.arange(64) < 7).expand(2, 64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,m,dim", [
    ((3, 14, 5), 7, 1), ((14, 3, 5), 7, 0), ((3, 5, 14), 7, 2), ((3, 5, 14), 7, -1), ((3, 14, 5), 7, -2),
    ((8, 3, 5), 4, 0), ((3, 8, 5), 4, 1), ((3, 5, 8), 4, 2), ((5, 64, 3), 64, 1), ((6, 3, 1), 3, 0),
    ((1, 32, 1), 16, 1), ((4, 5, 6), 1, 1),
])
def test_nm_dims(shape, m, dim, dtype, tiles):
    for n in sorted({0, 1, m // 2, m - 1, m}):
        check_nm(wide(shape, dtype, seed=n), n, m, dim)
        check_nm(tied(shape, dtype, seed=n), n, m, dim)


@pytest.mark.parametrize("shape,n,m,dim", [
    ((5, 4000, 3), 2, 4, 1),      # 15000 groups, inner 3: several programs, partial last
    ((9000, 4), 1, 4, -1),        # inner 1
    ((3, 2, 2499), 3, 7, 2),      # m not a power of two, inner 1
    ((100, 64), 7, 64, 1),
    ((64, 50), 7, 64, 0),         # inner 50
])
def test_nm_many_programs(shape, n, m, dim, tiles):
    check_nm(tied(shape, torch.float16, seed=1), n, m, dim)
    check_nm(wide(shape, torch.float32, seed=2), n, m, dim)


@pytest.mark.parametrize("shape,m,dim", [((0, 4), 4, 1), ((3, 0), 4, 1), ((0, 8, 2), 4, 1), ((2, 0, 5), 7, 1),
                                         ((0,), 1, 0)])
def test_nm_empty(shape, m, dim):
    w = torch.empty(shape)
    got = run_nm(w, min(2, m), m, dim)
    assert got.shape == w.shape
    assert torch.equal(got, nm_mask_reference(w, min(2, m), m, dim))


def test_nm_argument_checks():
    x = torch.randn(4, 8, device=DEVICE)
    out = torch.empty(4, 8, dtype=torch.uint8, device=DEVICE)
    for n, m in ((1, 0), (3, 2), (-1, 4), (1, 65)):
        with pytest.raises(ValueError):
            ts().nm_mask(x, out, 1, 32 if m > 32 else 8, 4 if m <= 32 else 1, n, m)
    with pytest.raises(ValueError):             # length not a multiple of m
        ts().nm_mask(x, out, 4, 8, 1, 1, 3)
    with pytest.raises(ValueError):             # the view does not cover x
        ts().nm_mask(x, out, 2, 8, 1, 1, 4)
    with pytest.raises(ValueError):             # out not uint8
        ts().nm_mask(x, out.bool(), 4, 8, 1, 1, 4)
    with pytest.raises(ValueError):             # x not contiguous
        ts().nm_mask(x.t(), out, 8, 4, 1, 1, 4)
    with pytest.raises(ValueError):             # integer x
        ts().nm_mask(x.int(), out, 4, 8, 1, 1, 4)
    # the same call with valid arguments works (and matches)
    ts().nm_mask(x, out, 4, 8, 1, 1, 4)
    assert torch.equal(out.cpu().bool(), nm_mask_reference(x.cpu(), 1, 4))


# -- transposable_mask ----------------------------------------------------------------------------------

T24_SHAPES = [(4, 4), (8, 12), (12, 8, 2), (64, 64)]


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "greedy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", T24_SHAPES, ids=str)
def test_t24_random(shape, dtype, exact, tiles):
    got = check_t24(wide(shape, dtype, seed=len(shape) + shape[0]), exact)
    t = got.reshape(shape[0] // 4, 4, -1, 4)
    rows, cols = t.sum(3), t.sum(1)
    if exact:
        assert (rows == 2).all() and (cols == 2).all()
    else:
        assert (rows <= 2).all() and (cols <= 2).all()


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "greedy"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("data", [tied, rounded, specials])
@pytest.mark.parametrize("shape", [(8, 12), (12, 8, 2), (64, 64)], ids=str)
def test_t24_ties_and_specials(shape, data, dtype, exact):
    check_t24(data(shape, dtype, seed=shape[0]), exact)


def test_t24_every_pattern_wins():
    """Tile p holds ones on pattern p and zeros elsewhere: exact must pick pattern p, for all 90; then
    tiles holding the union of two patterns (a tie between them, or an earlier one inside the union)."""
    masks = tile_pattern_masks()
    bits = torch.tensor(masks)[:, None] >> torch.arange(16) & 1            # [90, 16]
    w = bits.float().view(90, 4, 4).permute(1, 0, 2).reshape(4, 360)        # tile p at columns 4p..4p+3
    got = check_t24(w, True)
    assert torch.equal(got, w.bool())
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randint(0, 90, (2, 200), generator=gen)
    u = (bits[a] | bits[b]).float() * (1 + torch.rand(200, 1, generator=gen).round())
    w = u.view(200, 4, 4).permute(1, 0, 2).reshape(4, 800)
    check_t24(w, True)
    check_t24(w.half(), False)


def test_t24_all_equal_tiles():
    """Every pattern ties: the first one (tile_patterns()[0]); greedy keeps the row-major first ones."""
    first = torch.tensor([(tile_pattern_masks()[0] >> i) & 1 for i in range(16)], dtype=torch.bool).view(4, 4)
    assert tile_patterns()[0] == (0, 0, 5, 5)
    for v in (0.0, -0.0, 1.0, float("nan"), float("inf")):
        w = torch.full((8, 8), v)
        got = check_t24(w, True)
        assert torch.equal(got.view(2, 4, 2, 4).permute(0, 2, 1, 3), first.expand(2, 2, 4, 4))
        got = check_t24(w.bfloat16(), False)
        assert torch.equal(got.view(2, 4, 2, 4).permute(0, 2, 1, 3), first.expand(2, 2, 4, 4))


def _float64_choice(w):
    """Exact-mode winners with exact (float64, order-free) sums: differs from the spec's fp32 order on
    some tiles of the data below, which therefore checks that order."""
    rows, cols = w.shape
    k = w.float().abs().double().reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(-1, 16)
    bits = torch.tensor(tile_pattern_masks())[:, None] >> torch.arange(16) & 1   # [90, 16]
    s = k @ bits.double().t()
    return s.argmax(1)


def test_t24_fp32_summation_order():
    gen = torch.Generator().manual_seed(3)
    vals = torch.tensor([2.0 ** 24, 1.0, 0.5, 3.0, 2.0 ** 24 + 2, 1.5, 0.0, 2.0 ** 23 + 1])
    w = vals[torch.randint(0, vals.numel(), (64, 64), generator=gen)]
    got = check_t24(w, True)
    masks = torch.tensor(tile_pattern_masks())
    got_bits = (got.view(16, 4, 16, 4).permute(0, 2, 1, 3).reshape(-1, 16).long()
                << torch.arange(16)).sum(1)
    exact64 = masks[_float64_choice(w)]
    assert (got_bits != exact64).any(), "the data should make fp32 rounding matter"


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "greedy"])
def test_t24_many_programs(exact, tiles):
    """More tiles than one program takes (1280 under the interpreter, 320 with the GPU tiles), 40 tiles
    per row of tiles."""
    rows = 128 if tiles == "native" else 32
    check_t24(tied((rows, 160), torch.float32, seed=5), exact)
    check_t24(wide((rows, 40, 4), torch.bfloat16, seed=6), exact)


@pytest.mark.parametrize("shape", [(0, 4), (4, 0), (0, 8, 2), (8, 0, 3)], ids=str)
@pytest.mark.parametrize("exact", [True, False], ids=["exact", "greedy"])
def test_t24_empty(shape, exact):
    w = torch.empty(shape)
    got = run_t24(w, exact)
    assert got.shape == w.shape
    assert torch.equal(got, transposable_mask_reference(w, "exact" if exact else "greedy"))


def test_t24_argument_checks():
    x = torch.randn(8, 8, device=DEVICE)
    out = torch.empty(8, 8, dtype=torch.uint8, device=DEVICE)
    for rows, cols in ((6, 8), (8, 6), (4, 8)):
        with pytest.raises(ValueError):
            ts().transposable_mask(x, out, rows, cols, True)
    with pytest.raises(ValueError):
        ts().transposable_mask(x.double(), out, 8, 8, True)
    with pytest.raises(ValueError):
        ts().transposable_mask(x, out[:4], 8, 8, False)
    ts().transposable_mask(x, out, 8, 8, True)
    assert torch.equal(out.cpu().bool(), transposable_mask_reference(x.cpu()))
