"""N:M and transposable 2:4 masks: the reference vs brute force, every backend vs the reference
(random data, ties, NaN/inf/-0, odd shapes, every dtype), padding, errors, 2:4 compression."""
import itertools
import re
from pathlib import Path

import pytest
import torch

import fastopt
from fastopt import sparse
from fastopt.reference.sparse import (magnitude_key, nm_mask_reference, tile_pattern_masks, tile_patterns,
                                      transposable_mask_reference)

from conftest import DEVICE_BACKENDS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NM = [(2, 4), (1, 4), (4, 8), (0, 4), (4, 4), (3, 7), (5, 16), (1, 1), (16, 32), (7, 64)]


def tied(shape, dtype=torch.float32, seed=0):
    """Small integers (many ties), with NaN, +-inf and -0.0 sprinkled in."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randint(-3, 4, shape, generator=gen).float()
    flat = w.view(-1)
    flat[::7] = float("nan")
    flat[3::11] = float("inf")
    flat[5::13] = -float("inf")
    flat[1::17] = -0.0
    return w.to(dtype)


# -- the reference vs brute force --------------------------------------------------------------------

def brute_nm(w, n, m, dim):
    x = w.movedim(dim, -1).float().tolist() if w.dim() else []
    out = torch.zeros(w.movedim(dim, -1).shape, dtype=torch.bool).view(-1, m)
    flat = w.movedim(dim, -1).reshape(-1, m).float()
    for g in range(flat.shape[0]):
        vals = [abs(v) if v == v else float("inf") for v in flat[g].tolist()]
        order = sorted(range(m), key=lambda i: (-vals[i], i))
        for i in order[:n]:
            out[g, i] = True
    del x
    return out.reshape(w.movedim(dim, -1).shape).movedim(-1, dim)


@pytest.mark.parametrize("n,m", NM)
def test_nm_reference_is_brute_force(n, m):
    for w, dim in ((tied((3, 2 * m)), -1), (tied((2 * m, 3), seed=1), 0), (torch.randn(2, m, 3), 1)):
        assert torch.equal(nm_mask_reference(w, n, m, dim), brute_nm(w, n, m, dim))
        assert bool((nm_mask_reference(w, n, m, dim).movedim(dim, -1).reshape(-1, m).sum(1) == n).all())


def brute_patterns():
    pats = []
    for bits in range(1 << 16):
        mask = [[(bits >> (4 * r + c)) & 1 for c in range(4)] for r in range(4)]
        if all(sum(row) == 2 for row in mask) and all(sum(mask[r][c] for r in range(4)) == 2 for c in range(4)):
            pats.append(bits)
    return pats


def test_tile_patterns_are_all_90_and_the_header_table_matches():
    masks = tile_pattern_masks()
    assert sorted(masks) == brute_patterns() and len(set(masks)) == 90
    pairs = list(itertools.combinations(range(4), 2))
    for q, bits in zip(tile_patterns(), masks):
        assert bits == sum(1 << (4 * r + c) for r in range(4) for c in pairs[q[r]])
    header = (Path(__file__).parent.parent / "csrc/include/fastopt/sparse.h").read_text()
    table = header[header.index("#define FASTOPT_TILE_PATTERNS"):header.index("constexpr int kTilePatterns")]
    entries = [int(h, 16) for h in re.findall(r"0x[0-9a-fA-F]{4}", table)]
    assert entries == [q[0] | q[1] << 4 | q[2] << 8 | q[3] << 12 for q in tile_patterns()]


def tiles_of(mask, rows, cols):
    return mask.reshape(rows // 4, 4, cols // 4, 4).permute(0, 2, 1, 3).reshape(-1, 4, 4)


def test_transposable_exact_reference_is_optimal_and_greedy_is_a_2_approximation():
    pats = torch.tensor(brute_patterns())
    dense = ((pats[:, None] >> torch.arange(16)) & 1).double()            # [90, 16]
    for w in (torch.randn(16, 32), tied((8, 8)).float().nan_to_num(posinf=5.0, neginf=-5.0), torch.rand(8, 8) ** 8):
        key = tiles_of(magnitude_key(w).double(), *w.shape).reshape(-1, 16)
        best = (key @ dense.t()).max(1).values
        for mode in ("exact", "greedy"):
            mask = transposable_mask_reference(w, mode)
            t = tiles_of(mask, *w.shape)
            kept = (key * t.reshape(-1, 16)).sum(1)
            assert bool((t.sum(1) <= 2).all() and (t.sum(2) <= 2).all())
            if mode == "exact":
                assert bool((t.sum(1) == 2).all() and (t.sum(2) == 2).all())
                torch.testing.assert_close(kept, best, rtol=1e-6, atol=0)
            else:
                assert bool((kept >= 0.5 * best * (1 - 1e-6)).all())


def test_transposable_greedy_can_be_sparser_than_2_4():
    """The greedy rule can strand a row: here it keeps 7 of 8 -- a fact of the rule, documented."""
    w = torch.tensor([[9.0, 8.0, 0.0, 0.0],
                      [7.0, 6.0, 0.0, 0.0],
                      [0.0, 0.0, 5.0, 4.0],
                      [0.0, 0.0, 3.0, 1.0]])
    w[2, 0] = 0.5
    g = transposable_mask_reference(w, "greedy")
    e = transposable_mask_reference(w, "exact")
    assert int(e.sum()) == 8
    assert int(g.sum()) <= 8 and bool((g.sum(0) <= 2).all() and (g.sum(1) <= 2).all())
    assert float((w.abs() * g).sum()) <= float((w.abs() * e).sum())


# -- every backend vs the reference ----------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,m", NM)
def test_nm_mask_backends(device, backend, dtype, n, m):
    cases = [(tied((5, 3 * m), dtype), -1), (tied((3, 2 * m, 5), dtype, seed=1), 1),
             (tied((2 * m, 3, 2), dtype, seed=2), 0), (torch.randn(7, 4 * m).to(dtype), 1),
             (torch.randn(0, m).to(dtype), 1)]
    for w, dim in cases:
        w = w.to(device)
        got = sparse.nm_mask(w, n, m, dim, backend=backend)
        assert got.dtype == torch.bool and got.shape == w.shape
        assert torch.equal(got.cpu(), nm_mask_reference(w.cpu(), n, m, dim)), (w.shape, dim)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_nm_mask_non_contiguous_and_large(device, backend):
    w = torch.randn(96, 256, device=device)
    assert torch.equal(sparse.nm_mask(w.t(), 2, 4, dim=0, backend=backend).cpu(), nm_mask_reference(w.t().cpu(), 2, 4, 0))
    big = torch.randn(1 << 14, 8, device=device)
    assert torch.equal(sparse.nm_mask(big, 2, 8, backend=backend).cpu(), nm_mask_reference(big.cpu(), 2, 8))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["exact", "greedy"])
def test_transposable_mask_backends(device, backend, dtype, mode):
    for shape in ((4, 4), (8, 12), (12, 8, 2), (64, 64), (0, 8)):
        for w in (torch.randn(shape), tied(shape, seed=3)):
            w = w.to(dtype).to(device)
            got = sparse.transposable_mask(w, mode, backend=backend)
            assert got.shape == w.shape and got.dtype == torch.bool
            assert torch.equal(got.cpu(), transposable_mask_reference(w.cpu(), mode)), (shape, mode)


# -- options and errors -------------------------------------------------------------------------------------

def test_nm_mask_pad():
    w = torch.randn(3, 10)
    got = sparse.nm_mask(w, 2, 4, pad=True)
    ref = nm_mask_reference(torch.cat([w, torch.zeros(3, 2)], 1), 2, 4)[:, :10]
    assert torch.equal(got, ref)
    assert bool((got[:, 8:] == True).all())            # noqa: E712  (a partial group of 2 keeps both)
    one = sparse.nm_mask(torch.randn(2, 9), 2, 4, pad=True)
    assert one[:, 8].all()
    with pytest.raises(IndexError, match="dim 5"):
        sparse.nm_mask(w, 2, 4, dim=5, pad=True)


def test_nm_mask_errors():
    w = torch.randn(4, 10)
    with pytest.raises(ValueError, match="not a multiple of m=4"):
        sparse.nm_mask(w, 2, 4)
    with pytest.raises(ValueError, match="0 <= n <= m"):
        sparse.nm_mask(w, 5, 4, dim=0)
    with pytest.raises(IndexError, match="dim 2"):
        sparse.nm_mask(w, 2, 4, dim=2)
    with pytest.raises(TypeError, match="floating-point"):
        sparse.nm_mask(torch.ones(4, dtype=torch.int32), 2, 4)
    with pytest.raises(TypeError, match="n must be an int"):
        sparse.nm_mask(torch.ones(4), 2.0, 4)
    with pytest.raises(fastopt.BackendUnavailableError, match="at most 64"):
        sparse.nm_mask(torch.randn(2, 128), 2, 128, backend="cpu")
    x = torch.randn(2, 128)          # auto falls back to the torch reference for m > 64
    assert torch.equal(sparse.nm_mask(x, 3, 128), nm_mask_reference(x, 3, 128))
    with pytest.raises(ValueError, match="multiples of 4"):
        sparse.transposable_mask(torch.randn(6, 8))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        sparse.transposable_mask(torch.randn(16))
    with pytest.raises(ValueError, match="'exact' or 'greedy'"):
        sparse.transposable_mask(torch.randn(4, 4), "best")


def test_is_nm_sparse_and_compress():
    w = torch.randn(8, 16)
    masked = w * sparse.nm_mask(w, 2, 4)
    assert sparse.is_nm_sparse(masked, 2, 4) and not sparse.is_nm_sparse(w, 2, 4)
    if not torch.cuda.is_available():
        with pytest.raises(fastopt.BackendUnavailableError, match="compute capability"):
            sparse.compress_2to4(masked)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8,
                    reason="needs a GPU with compute capability >= 8.0")
def test_compress_2to4_matmul_on_gpu():
    w = torch.randn(128, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="more than 2 nonzeros"):
        sparse.compress_2to4(w)
    masked = w * sparse.nm_mask(w, 2, 4)
    compressed = sparse.compress_2to4(masked)
    x = torch.randn(128, 64, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.mm(compressed, x), torch.mm(masked, x), rtol=1e-2, atol=1e-2)
