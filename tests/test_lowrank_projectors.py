"""fastopt.lowrank projector math (projectors.py, quant.py) against galore-torch 1.0, q-galore-torch 1.0 and
ista-daslab-optimizers 1.1.15 (imported through tests/_upstream_lowrank.py; tests that need one skip without it)."""
import io
import math

import pytest
import torch

import _upstream_lowrank as up
from fastopt.lowrank import projectors as pj
from fastopt.lowrank import quant as qt

SHAPES = [(40, 24), (24, 40), (32, 32)]   # tall, wide, square


def _randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def _decaying(m, n, decay=0.9, noise=1e-3, seed=0):
    """U diag(decay^i) V^T plus Gaussian noise (Frobenius norm ~ noise)."""
    g = torch.Generator().manual_seed(seed)
    k = min(m, n)
    U = torch.linalg.qr(torch.randn(m, k, generator=g)).Q
    V = torch.linalg.qr(torch.randn(n, k, generator=g)).Q
    s = decay ** torch.arange(k, dtype=torch.float32)
    return U @ torch.diag(s) @ V.T + noise * torch.randn(m, n, generator=g) / math.sqrt(m * n)


def _orth_err(P, side):
    P = P.float()
    gram = P @ P.T if side == "right" else P.T @ P
    return (gram - torch.eye(gram.shape[0])).abs().max().item()


# ------------------------------------------------------------------------------------------ projection_side
def test_projection_side_table_and_errors():
    assert pj.projection_side((5, 3), "std") == "right"
    assert pj.projection_side((3, 3), "std") == "right"
    assert pj.projection_side((3, 5), "std") == "left"
    assert pj.projection_side((5, 3), "reverse_std") == "left"
    assert pj.projection_side((3, 5), "reverse_std") == "right"
    for t in ("left", "right", "full"):
        assert pj.projection_side((3, 5), t) == t
    with pytest.raises(ValueError, match="std"):
        pj.projection_side((3, 5), "sideways")
    with pytest.raises(ValueError, match="2-D"):
        pj.projection_side((3, 5, 7), "std")


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_side_and_svd_match_galore_project(proj_type, shape):
    """galore's project() picks the side projection_side names, with the projector svd_projector returns."""
    GaLoreProjector = up.galore_projector()
    G = _randn(*shape, seed=3)
    ref = GaLoreProjector(rank=6, proj_type=proj_type)
    low_ref = ref.project(G, 0)
    side = pj.projection_side(shape, proj_type)
    P = pj.svd_projector(G, 6, side)
    if side == "full":
        assert torch.equal(ref.ortho_matrix[0], P[0]) and torch.equal(ref.ortho_matrix[1], P[1])
        low = P[0].T @ G @ P[1].T
    else:
        assert torch.equal(ref.ortho_matrix, P)
        low = G @ P.T if side == "right" else P.T @ G
    # galore's projector is a view with LAPACK's strides, ours contiguous: the matmul may round differently
    torch.testing.assert_close(low, low_ref, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------ svd_projector
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank", [8, 50])  # 50 > min(m, n) for every shape
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_svd_projector_bit_identical_to_galore(side, shape, rank, dtype):
    GaLoreProjector = up.galore_projector()
    G = _randn(*shape, seed=1, dtype=dtype)
    ref = GaLoreProjector(rank=rank).get_orthogonal_matrix(G, rank, type=side)
    got = pj.svd_projector(G, rank, side)
    pairs = zip(ref, got) if side == "full" else [(ref, got)]
    for r, g in pairs:
        assert g.dtype == dtype and g.is_contiguous()
        assert g.shape == r.shape
        assert torch.equal(r, g)


def test_svd_projector_errors():
    G = _randn(6, 4)
    with pytest.raises(ValueError, match="rank"):
        pj.svd_projector(G, 0, "right")
    with pytest.raises(TypeError, match="rank"):
        pj.svd_projector(G, 2.0, "right")
    with pytest.raises(ValueError, match="side"):
        pj.svd_projector(G, 2, "top")
    with pytest.raises(ValueError, match="2-D"):
        pj.svd_projector(_randn(6), 2, "right")
    with pytest.raises(TypeError, match="floating"):
        pj.svd_projector(torch.ones(3, 3, dtype=torch.int64), 2, "right")
    with pytest.raises(ValueError, match="non-empty"):
        pj.svd_projector(torch.zeros(0, 3), 2, "right")
    with pytest.raises(ValueError, match="non-empty"):
        pj.randomized_projector(torch.zeros(3, 0), 2, "left")


# ------------------------------------------------------------------------------------------ randomized
@pytest.mark.parametrize("shape", [(300, 200), (200, 300), (256, 256)])
@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_randomized_subspace_error_close_to_svd(shape, side):
    G = _decaying(*shape, decay=0.9, seed=2)
    e_svd = pj.subspace_error(G, pj.svd_projector(G, 16, side), side)
    P = pj.randomized_projector(G, 16, side, seed=11)
    e_rnd = pj.subspace_error(G, P, side)
    assert e_svd <= e_rnd * (1 + 1e-5)          # the SVD is optimal (Eckart-Young)
    assert e_rnd <= 1.05 * e_svd, (e_rnd, e_svd)
    ref = pj.svd_projector(G, 16, side)
    for p, r in (zip(P, ref) if side == "full" else [(P, ref)]):
        assert p.shape == r.shape and p.dtype == r.dtype and p.is_contiguous()
    if side == "full":
        assert _orth_err(P[0], "left") < 1e-5 and _orth_err(P[1], "right") < 1e-5
    else:
        assert _orth_err(P, side) < 1e-5


@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_vectors_ordered_by_singular_value(shape):
    G = _decaying(*shape, decay=0.8, noise=1e-4, seed=4)
    side = pj.projection_side(shape, "std")
    P = pj.randomized_projector(G, 8, side, seed=5)
    S = pj.svd_projector(G, 8, side)
    # the leading vectors (well separated singular values) match the SVD's up to sign
    cos = (P * S).sum(dim=1 if side == "right" else 0).abs()
    assert (cos[:6] > 0.999).all(), cos


@pytest.mark.parametrize("decay", [0.97, 0.99])
@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_randomized_warm_start_at_least_as_good_as_cold(shape, decay):
    side = pj.projection_side(shape, "std")
    G1 = _decaying(*shape, decay=decay, seed=0)
    G2 = G1 + 0.05 * _decaying(*shape, decay=decay, seed=5)     # the next refresh: a slightly moved matrix
    prev = pj.randomized_projector(G1, 16, side, seed=1, power_iters=1)
    cold = pj.subspace_error(G2, pj.randomized_projector(G2, 16, side, seed=2, power_iters=1), side)
    warm = pj.subspace_error(G2, pj.randomized_projector(G2, 16, side, prev, seed=2, power_iters=1), side)
    best = pj.subspace_error(G2, pj.svd_projector(G2, 16, side), side)
    assert warm <= cold, (warm, cold)
    assert best <= warm * (1 + 1e-5)


def test_randomized_warm_start_full_side():
    G1 = _decaying(120, 90, decay=0.97, seed=0)
    G2 = G1 + 0.05 * _decaying(120, 90, decay=0.97, seed=5)
    prev = pj.randomized_projector(G1, 10, "full", seed=1)
    cold = pj.subspace_error(G2, pj.randomized_projector(G2, 10, "full", seed=2), "full")
    warm = pj.subspace_error(G2, pj.randomized_projector(G2, 10, "full", prev, seed=2), "full")
    assert warm <= cold


@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_randomized_seeded(side):
    G = _randn(50, 30, seed=7)
    a = pj.randomized_projector(G, 6, side, seed=123)
    b = pj.randomized_projector(G, 6, side, seed=123)
    c = pj.randomized_projector(G, 6, side, seed=124)
    flat = (lambda t: torch.cat([x.flatten() for x in t])) if side == "full" else (lambda t: t.flatten())
    assert torch.equal(flat(a), flat(b))
    assert not torch.equal(flat(a), flat(c))
    # the global RNG plays no part
    torch.manual_seed(999)
    assert torch.equal(flat(pj.randomized_projector(G, 6, side, seed=123)), flat(a))


@pytest.mark.parametrize("shape", [(20, 12), (12, 20)])
@pytest.mark.parametrize("side", ["right", "left"])
def test_randomized_rank_at_least_min_dim(shape, side):
    G = _randn(*shape, seed=8)
    for rank in (min(shape), min(shape) + 5):
        P = pj.randomized_projector(G, rank, side, seed=0)
        assert P.shape == pj.svd_projector(G, rank, side).shape
        assert pj.subspace_error(G, P, side) < 1e-5    # full rank: exact reconstruction
        assert _orth_err(P, side) < 1e-5


@pytest.mark.parametrize("side", ["right", "left"])
def test_randomized_bf16(side):
    G32 = _decaying(96, 64, decay=0.9, seed=9)
    G = G32.to(torch.bfloat16)
    P = pj.randomized_projector(G, 8, side, seed=3)
    assert P.dtype == torch.bfloat16 and P.shape == pj.svd_projector(G, 8, side).shape
    assert _orth_err(P, side) < 2e-2                    # bf16 storage of an fp32-orthonormal matrix
    # computed in fp32: the fp32 result cast to bf16
    P32 = pj.randomized_projector(G.float(), 8, side, seed=3)
    assert torch.equal(P32.to(torch.bfloat16), P)
    e = pj.subspace_error(G, P, side)
    e_svd = pj.subspace_error(G, pj.svd_projector(G, 8, side), side)
    assert e <= 1.05 * e_svd + 1e-2


def test_randomized_errors():
    G = _randn(30, 20)
    with pytest.raises(ValueError, match="rank"):
        pj.randomized_projector(G, 0, "right")
    with pytest.raises(ValueError, match="side"):
        pj.randomized_projector(G, 4, "diag")
    with pytest.raises(ValueError, match="oversample"):
        pj.randomized_projector(G, 4, "right", oversample=-1)
    with pytest.raises(ValueError, match="power_iters"):
        pj.randomized_projector(G, 4, "right", power_iters=-1)
    with pytest.raises(TypeError, match="seed"):
        pj.randomized_projector(G, 4, "right", seed=1.5)
    with pytest.raises(ValueError, match="seed"):
        pj.randomized_projector(G, 4, "right", seed=2 ** 64)
    with pytest.raises(ValueError, match="previous has shape"):
        pj.randomized_projector(G, 4, "right", previous=torch.zeros(4, 30))
    with pytest.raises(TypeError, match="previous"):
        pj.randomized_projector(G, 4, "full", previous=torch.zeros(30, 4))


def test_subspace_error_values():
    G = _decaying(40, 30, decay=0.5, noise=0.0, seed=1)
    s = torch.linalg.svdvals(G)
    for side in ("right", "left", "full"):
        e = pj.subspace_error(G, pj.svd_projector(G, 5, side), side)
        assert e == pytest.approx((s[5:].square().sum() / s.square().sum()).sqrt().item(), rel=1e-4)
    assert pj.subspace_error(torch.zeros(4, 3), torch.eye(3)[:2], "right") == 0.0


# ------------------------------------------------------------------------------------------ DCT
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16, 64, 100, 257, 512, 1024])
def test_dct_basis_vs_ista(n):
    ista = up.ista_dct()
    Q = pj.dct_basis(n, "cpu")
    exact = pj.dct_basis(n, "cpu", torch.float64)
    ref = ista.dct3_matrix(n, torch.float32, "cpu")
    assert Q.dtype == torch.float32 and Q.shape == (n, n)
    # ours is fp64 rounded once to fp32
    assert (Q.double() - exact).abs().max().item() <= 2 ** -24 * exact.abs().max().item()
    # ista evaluates cos(pi k (2j+1) / 2n) in fp32: its argument (up to ~pi n) carries an error ~ pi n 2^-24
    diff = (ref - Q).abs().max().item()
    assert diff <= max(1e-6, 4 * math.sqrt(2 / n) * math.pi * n * 2 ** -24), diff
    if n <= 16:
        assert diff <= 1e-6
    eye = torch.eye(n, dtype=torch.float64)
    assert (exact @ exact.T - eye).abs().max().item() < 1e-12


def test_dct_basis_cached_and_shared():
    a = pj.dct_basis(48, "cpu")
    assert pj.dct_basis(48, torch.device("cpu"), torch.float32) is a
    assert pj.dct_basis(48, "cpu", torch.float64) is not a
    with pytest.raises(ValueError, match="n must"):
        pj.dct_basis(0, "cpu")
    with pytest.raises(TypeError, match="dtype"):
        pj.dct_basis(4, "cpu", torch.int32)


def _ista_projector(G, rank, norm):
    FFTLowRankProjector = up.ista_fft_projector()
    return FFTLowRankProjector(G, rank=rank, proj="dct", rotate_subspace=False, sim_type="matmul", ell_norm=norm)


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (200, 130), (70, 70)])
def test_dct_select_matches_ista(shape, norm):
    G = _randn(*shape, seed=21)
    rank = 12
    side = pj.projection_side(shape, "std")          # ista: right when rows >= cols (no Llama shapes here)
    size = min(shape)
    # 1) the same basis handed to both: bit-identical indices (same order) and projected gradient
    Q = pj.dct_basis(size, "cpu")
    ref = _ista_projector(G, rank, norm)
    low_ref = ref.change_subspace(Q, G.clone(), col_norms=None)
    idx, low = pj.dct_select(G, rank, side, norm=norm)
    assert ref.is_right_proj == (side == "right")
    assert idx.dtype == torch.int64 and idx.shape == (rank,)
    assert torch.equal(ref.indices_crt.long(), idx)
    assert torch.equal(low_ref, low)
    # its projections equal ours with the dense projector
    P = pj.dct_projector(idx, size, side, "cpu", torch.float32)
    assert P.shape == ((rank, size) if side == "right" else (size, rank))
    torch.testing.assert_close(ref.from_higher_to_lower_dimensions(Q, G), G @ P.T if side == "right" else P.T @ G,
                               rtol=1e-6, atol=1e-6)
    x = _randn(*low.shape, seed=22)
    back_ref = ref.from_lower_to_higher_dimensions(Q, x)
    assert torch.equal(back_ref, x @ P if side == "right" else P @ x)
    # 2) ista with its own (fp32-computed) basis: the same index set; the projected gradients differ by at
    #    most what that basis' own error (ista computes the cosines in fp32) propagates: |G| @ |Qi - Q|
    Qi = up.ista_dct().dct3_matrix(size, torch.float32, "cpu")
    ref2 = _ista_projector(G, rank, norm)
    low_ref2 = ref2.change_subspace(Qi, G.clone(), col_norms=None)
    assert set(ref2.indices_crt.tolist()) == set(idx.tolist())
    dQ = (Qi - Q).abs()
    bound = (G.abs() @ dQ)[:, idx] if side == "right" else (dQ.T @ G.abs())[idx, :]
    perm = [ref2.indices_crt.tolist().index(i) for i in idx.tolist()]   # identity when the order is the same
    sel = low_ref2[:, perm] if side == "right" else low_ref2[perm, :]
    assert ((sel - low).abs() <= 1.01 * bound + 1e-6 * low.abs().max()).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_dct_select_is_top_r_of_the_scores(side):
    G = _randn(50, 40, seed=5)
    idx, low = pj.dct_select(G, 7, side, norm=2)
    size = G.shape[1] if side == "right" else G.shape[0]
    Q = pj.dct_basis(size, "cpu")
    S = G @ Q if side == "right" else Q.T @ G
    scores = S.norm(p=2, dim=0 if side == "right" else 1)
    kept = scores[idx]
    others = scores[[i for i in range(size) if i not in set(idx.tolist())]]
    assert kept.min() >= others.max()
    P = pj.dct_projector(idx, size, side, "cpu", torch.float32)
    torch.testing.assert_close(low, G @ P.T if side == "right" else P.T @ G, rtol=1e-5, atol=1e-5)
    assert _orth_err(P, side) < 1e-5


@pytest.mark.parametrize("norm", [1, 2])
@pytest.mark.parametrize("shape", [(96, 64), (64, 96), (33, 17), (17, 33), (80, 101), (9, 2), (2, 9)])
def test_dct_select_fft_matches_matmul(shape, norm):
    G = _randn(*shape, seed=31)
    side = pj.projection_side(shape, "std")
    rank = min(6, min(shape))
    i_mm, low_mm = pj.dct_select(G, rank, side, norm=norm)
    i_ft, low_ft = pj.dct_select(G, rank, side, norm=norm, method="fft")
    assert set(i_mm.tolist()) == set(i_ft.tolist())
    size = min(shape)
    Q = pj.dct_basis(size, "cpu")
    S = G @ Q if side == "right" else Q.T @ G
    S_ft = pj._dct3_rows_fft(G) if side == "right" else pj._dct3_rows_fft(G.T).T
    assert (S - S_ft).abs().max().item() <= 1e-5 * S.abs().max().item()
    perm = [i_ft.tolist().index(i) for i in i_mm.tolist()]
    sel = low_ft[:, perm] if side == "right" else low_ft[perm, :]
    torch.testing.assert_close(sel, low_mm, rtol=1e-5, atol=1e-5 * S.abs().max().item())


def test_dct_fft_exact_in_fp64():
    for N in (1, 2, 3, 4, 5, 8, 31, 64, 100):
        X = _randn(5, N, seed=N, dtype=torch.float64)
        ref = X @ pj.dct_basis(N, "cpu", torch.float64)
        assert (pj._dct3_rows_fft(X) - ref).abs().max().item() < 1e-12


def test_dct_rank_clamped_and_errors():
    G = _randn(10, 6)
    idx, low = pj.dct_select(G, 50, "right")
    assert sorted(idx.tolist()) == list(range(6)) and low.shape == (10, 6)
    with pytest.raises(ValueError, match="side"):
        pj.dct_select(G, 3, "full")
    with pytest.raises(ValueError, match="side"):
        pj.dct_projector(idx, 6, "full", "cpu", torch.float32)
    with pytest.raises(ValueError, match="rank"):
        pj.dct_select(G, 0, "right")
    with pytest.raises(ValueError, match="norm"):
        pj.dct_select(G, 3, "right", norm=0)
    with pytest.raises(ValueError, match="method"):
        pj.dct_select(G, 3, "right", method="dst")
    with pytest.raises(ValueError, match="indices"):
        pj.dct_projector(torch.tensor([0, 6]), 6, "right", "cpu", torch.float32)
    with pytest.raises(TypeError, match="indices"):
        pj.dct_projector(torch.tensor([0.0, 1.0]), 6, "right", "cpu", torch.float32)


# ------------------------------------------------------------------------------------------ adaptive gap
def _aligning_grads(shape, count, seed):
    """Gradients whose top singular vector drifts less and less: consecutive projectors align over time."""
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    base = torch.randn(m, n, generator=g)
    u, v = torch.randn(m, generator=g), torch.randn(n, generator=g)
    for t in range(count):
        noise = 2.0 * 0.6 ** t
        yield base * 0.05 + 5.0 * torch.outer(u, v) / (u.norm() * v.norm()) * 3 + noise * torch.randn(m, n, generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(40, 24), (24, 40)])
def test_adaptive_gap_replays_q_galore(shape, dtype):
    QGaLoreProjector = up.q_galore_projector()
    ref = QGaLoreProjector(rank=4, update_proj_gap=10, proj_type="std", quant=False)
    side = pj.projection_side(shape, "std")
    queue, past, gap = torch.zeros(0, dtype=torch.float64), None, 10
    gaps = []
    for G in _aligning_grads(shape, 12, seed=3):
        G = G.to(dtype)
        ref.project(G, 0)                       # iter 0: always a refresh
        new = ref.ortho_matrix                  # q-galore's float projector (quant=False)
        assert torch.equal(new, pj.svd_projector(G, 4, side))
        queue, past, gap = pj.adaptive_gap(queue, past, new, side, gap)
        assert gap == ref.update_proj_gap
        assert queue.dtype == torch.float64 and queue.tolist() == ref.queue
        assert torch.equal(past, ref.past_ortho_vector)
        gaps.append(gap)
    assert gaps[0] == 10 and gaps[-1] > 10, gaps       # the sequence does cross the threshold


@pytest.mark.parametrize("side", ["right", "left"])
def test_adaptive_gap_decisions(side):
    P = torch.linalg.qr(_randn(30, 4, seed=1)).Q
    P = P.T.contiguous() if side == "right" else P
    q, past, gap = pj.adaptive_gap(torch.zeros(0, dtype=torch.float64), None, P, side, 7)
    assert q.numel() == 0 and gap == 7                  # first refresh: only records the vector
    for i in range(4):                                  # identical projectors: cos = 1
        q, past, gap = pj.adaptive_gap(q, past, P, side, gap, queue_size=5)
        assert gap == 7
    q, past, gap = pj.adaptive_gap(q, past, P, side, gap, queue_size=5, gamma_proj=3)
    assert q.numel() == 5 and gap == 21
    q, past, gap = pj.adaptive_gap(q, past, -P, side, gap, queue_size=5)   # cos -1: mean (4 - 1)/5 = 0.6
    assert q.numel() == 5 and q[-1].item() == pytest.approx(-1.0) and gap == 42
    q, past, gap = pj.adaptive_gap(q, past, -P, side, gap, queue_size=5, cos_threshold=0.61)
    assert gap == 42                                    # mean 0.6 < 0.61
    with pytest.raises(ValueError, match="queue"):
        pj.adaptive_gap(torch.zeros(6, dtype=torch.float64), past, P, side, 7, queue_size=5)
    with pytest.raises(ValueError, match="gap"):
        pj.adaptive_gap(q, past, P, side, 0)


# ------------------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group_size", [256, 64, -1])
def test_quantize_matches_q_galore(bits, group_size):
    QGaLoreProjector = up.q_galore_projector()
    P = pj.svd_projector(_randn(64, 48, seed=2), 16, "right")   # 16 x 48 = 768 = 3 * 256
    w, s, z, shape = QGaLoreProjector(rank=16)._quantize(P, q_group_size=group_size, n_bit=bits)
    codes, scales, zeros = qt.quantize_groupwise(P, group_size=group_size, bits=bits)
    assert codes.dtype == torch.uint8 and scales.dtype == torch.float32
    assert torch.equal(codes, w) and torch.equal(scales, s) and torch.equal(zeros, z)
    ref_deq = (s * (w.to(s.dtype) - z)).reshape(shape)             # q-galore's dequantization
    assert torch.equal(qt.dequantize_groupwise(codes, scales, zeros, shape), ref_deq)
    if group_size > 0:
        q = qt.quantize_projector(P, bits=bits, group_size=group_size)
        assert torch.equal(qt.dequantize_projector(q, P.shape, torch.float32), ref_deq)
        assert q["codes"].numel() == (P.numel() // 2 if bits == 4 else P.numel())


@pytest.mark.parametrize("shape", [(40, 32), (32, 40)])
def test_dequantized_projection_matches_q_galore_project(shape):
    """q-galore's quantized project(): the low-rank gradient through our packed INT4 projector is identical."""
    QGaLoreProjector = up.q_galore_projector()
    G = _randn(*shape, seed=4)
    ref = QGaLoreProjector(rank=8, proj_type="std", quant=True, group_size=256, n_bit=4)
    low_ref = ref.project(G, 0)
    side = pj.projection_side(shape, "std")
    P = pj.svd_projector(G, 8, side)
    q = qt.quantize_projector(P, bits=4, group_size=256)
    Pd = qt.dequantize_projector(q, P.shape, torch.float32)
    low = G @ Pd.T if side == "right" else Pd.T @ G
    assert torch.equal(low, low_ref)
    assert torch.equal(qt.unpack_int4(q["codes"], P.numel()).reshape(ref.ortho_matrix.shape), ref.ortho_matrix)


@pytest.mark.parametrize("numel", [1, 2, 7, 256, 1001])
def test_pack_int4_round_trip(numel):
    g = torch.Generator().manual_seed(numel)
    codes = torch.randint(0, 16, (numel,), generator=g, dtype=torch.uint8)
    packed = qt.pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == (numel + 1) // 2
    assert torch.equal(qt.unpack_int4(packed, numel), codes)
    # layout: element 2i in the low nibble, 2i+1 in the high nibble
    assert int(packed[0]) % 16 == int(codes[0])
    if numel >= 2:
        assert int(packed[0]) // 16 == int(codes[1])
    else:
        assert int(packed[0]) // 16 == 0


def test_pack_int4_errors():
    with pytest.raises(ValueError, match=r"\[0, 15\]"):
        qt.pack_int4(torch.tensor([3, 16], dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        qt.pack_int4(torch.tensor([3, 1]))
    with pytest.raises(ValueError, match="numel"):
        qt.unpack_int4(torch.zeros(3, dtype=torch.uint8), 8)


@pytest.mark.parametrize("bits", [4, 8])
def test_stochastic_rounding_unbiased_and_seeded(bits):
    w = _randn(4, 256, seed=6) * 0.1
    codes0, scales, zeros = qt.quantize_groupwise(w, group_size=256, bits=bits)
    # deterministic rounding error, in units of the scale
    det_err = ((qt.dequantize_groupwise(codes0, scales, zeros, w.shape) - w) / scales).abs()
    seeds = 400
    acc = torch.zeros(4, 256, dtype=torch.float64)
    for s in range(seeds):
        c, sc, z = qt.quantize_groupwise(w, group_size=256, bits=bits, stochastic=True, seed=s)
        assert torch.equal(sc, scales) and torch.equal(z, zeros)
        acc += qt.dequantize_groupwise(c, sc, z, w.shape).double()
    mean = acc / seeds
    x = w / scales + zeros
    inside = (x >= 0) & (x <= 2 ** bits - 1)          # elements no clamp touches
    err = ((mean - w.double()) / scales.double()).abs()[inside]
    # one rounding's std is <= 0.5 scale: the mean of 400 has std <= 0.025 scale; allow 5 sigma per element
    assert err.max().item() <= 0.125, err.max().item()
    assert err.mean().item() <= 0.25 * det_err[inside].mean().item()
    a = qt.quantize_groupwise(w, group_size=256, bits=bits, stochastic=True, seed=17)[0]
    b = qt.quantize_groupwise(w, group_size=256, bits=bits, stochastic=True, seed=17)[0]
    c = qt.quantize_groupwise(w, group_size=256, bits=bits, stochastic=True, seed=18)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert ((a.int() - codes0.int()).abs() <= 1).all()  # floor or ceil of the same value


def test_quantize_errors():
    w = torch.randn(10, 30)
    with pytest.raises(ValueError, match="group_size"):
        qt.quantize_groupwise(w, group_size=256)
    with pytest.raises(ValueError, match="bits"):
        qt.quantize_groupwise(w, group_size=30, bits=3)
    with pytest.raises(ValueError, match="group_size"):
        qt.quantize_groupwise(w, group_size=0)
    with pytest.raises(ValueError, match="non-finite"):
        qt.quantize_groupwise(torch.tensor([1.0, float("nan")]), group_size=2)
    with pytest.raises(TypeError, match="floating"):
        qt.quantize_groupwise(torch.ones(4, dtype=torch.int32), group_size=2)
    with pytest.raises(ValueError, match="bits"):
        qt.quantize_projector(w, bits=2, group_size=30)
    with pytest.raises(ValueError, match="seed"):
        qt.quantize_groupwise(w, group_size=30, stochastic=True, seed=-2 ** 64)
    with pytest.raises(TypeError, match="seed"):
        qt.quantize_groupwise(w, group_size=30, stochastic=True, seed="0")


def test_quantized_projector_loads_weights_only():
    P = pj.svd_projector(_randn(64, 32, seed=3), 8, "right")
    q = qt.quantize_projector(P, bits=4, group_size=256, stochastic=True, seed=5)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    q2 = torch.load(buf, weights_only=True)
    assert all(torch.equal(q[k], q2[k]) for k in q)
    Pd = qt.dequantize_projector(q2, P.shape, torch.float32)
    # 4-bit: every element within one quantization step of the original
    step = q["scales"].repeat_interleave(256, dim=0).reshape(P.shape)
    assert ((Pd - P).abs() <= step * (1 + 1e-5)).all()
    nbytes = sum(t.numel() * t.element_size() for t in q.values())
    assert nbytes == P.numel() // 2 + 8 * (P.numel() // 256)


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (1, 1), (2, 9), (13, 5)])
@pytest.mark.parametrize("side", ["right", "left", "full"])
def test_odd_shapes_all_projectors(shape, side):
    G = _randn(*shape, seed=13)
    S = pj.svd_projector(G, 3, side)
    R = pj.randomized_projector(G, 3, side, seed=0)
    shapes = (lambda x: [t.shape for t in x]) if side == "full" else (lambda x: [x.shape])
    assert shapes(S) == shapes(R)
    e_s, e_r = pj.subspace_error(G, S, side), pj.subspace_error(G, R, side)
    assert e_r <= 1.05 * e_s + 1e-5
    if side != "full":
        size = shape[1] if side == "right" else shape[0]
        for method in ("matmul", "fft"):
            idx, low = pj.dct_select(G, 3, side, method=method)
            P = pj.dct_projector(idx, size, side, "cpu", torch.float32)
            assert idx.numel() == min(3, size)
            torch.testing.assert_close(low, G @ P.T if side == "right" else P.T @ G, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(96, 64), (64, 96)])
def test_dct_select_bf16_matches_ista(shape):
    """bf16 gradients: the product runs in bf16 with the bf16 basis, as ista's (which builds Q in p.dtype)."""
    G = _randn(*shape, seed=23, dtype=torch.bfloat16)
    side = pj.projection_side(shape, "std")
    Q = pj.dct_basis(min(shape), "cpu", torch.bfloat16)
    assert torch.equal(Q, pj.dct_basis(min(shape), "cpu").to(torch.bfloat16))
    ref = _ista_projector(G, 10, 1)
    low_ref = ref.change_subspace(Q, G.clone(), col_norms=None)
    idx, low = pj.dct_select(G, 10, side)
    assert low.dtype == torch.bfloat16
    assert torch.equal(ref.indices_crt.long(), idx) and torch.equal(low_ref, low)
    # the fft path computes in fp32 and rounds S once: within bf16 rounding of the fp32 product
    idx_ft, low_ft = pj.dct_select(G, 10, side, method="fft")
    assert low_ft.dtype == torch.bfloat16
    Q32 = pj.dct_basis(min(shape), "cpu")
    S32 = G.float() @ Q32 if side == "right" else Q32.T @ G.float()
    want = S32[:, idx_ft] if side == "right" else S32[idx_ft, :]
    torch.testing.assert_close(low_ft.float(), want, rtol=2 ** -8, atol=1e-5 * S32.abs().max().item())
