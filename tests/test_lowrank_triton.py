"""GaLore's projected-step Triton kernels (triton_kernels/lowrank.py): ``project_adam`` and ``back_project_``
against the plain torch formula, both sides, fp32 / bf16 / fp16 gradients and parameters, dense fp32 and
INT4 projectors (Q-GaLore's dequantization, also checked against q_galore_torch's quantizer), with and
without an AMP grad scale, on odd shapes whose tiles are ragged; empty inputs; bad inputs raise before
anything is written.

The reference: the projection matmul in fp64 of the fp32 operands (the gradient converted exactly, the
INT4 projector dequantized in fp32 as Q-GaLore does), rounded once to fp32; then the epilogue in fp32 torch
ops in the kernel's order (``exp_avg * beta1 + (1 - beta1) * g``, ``exp_avg_sq * beta2 + (1 - beta2) * g * g``,
``exp_avg / (sqrt(exp_avg_sq) + eps) * (-step_size)``; ``param * beta + alpha * back``, rounded to the
parameter's dtype).  The kernel's fp32 dot products sum in another order than fp64, so results are
compared to 1e-5 of the largest magnitude of each tensor (fp32), and bf16 / fp16 parameters to one unit
in the last place of their dtype.  Without a GPU the kernels run under TRITON_INTERPRET=1.
"""
import pytest
import torch

from conftest import DEVICE_BACKENDS

TRITON_DEVICES = [d for d, b in DEVICE_BACKENDS if b == "triton"]
pytestmark = pytest.mark.skipif(not TRITON_DEVICES, reason="triton cannot run here")
DEV = TRITON_DEVICES[0] if TRITON_DEVICES else "cpu"

SHAPES = [(37, 53, 5), (64, 129, 16), (130, 40, 8)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
HP = dict(beta1=0.9, beta2=0.999, eps=1e-8, step_size=0.01)


def _lowrank():
    from fastopt.triton_kernels import lowrank
    return lowrank


# -- helpers ------------------------------------------------------------------------------------------------

def pack_int4(codes):
    """uint8 codes 0..15 (any shape) -> two per byte, low nibble first, over the row-major flattening."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    return (flat[0::2] | (flat[1::2] << 4)).contiguous()


def dequant_int4(codes, scales, zeros, group, shape):
    """Q-GaLore's arithmetic in fp32: scales[g] * (code - zeros[g]) per group of ``group`` flat elements."""
    q = codes.reshape(-1, group).float()
    return (scales.reshape(-1, 1) * (q - zeros.reshape(-1, 1))).reshape(shape)


def make_proj(shape, int4, gen, group=None):
    """(proj, int4 tuple or None, dense fp32 projector the kernel must see)."""
    if not int4:
        p = torch.randn(shape, generator=gen) / shape[1] ** 0.5
        return p.to(DEV, copy=True), None, p
    numel = shape[0] * shape[1]
    group = group or min(shape)  # divides numel; groups straddle P's rows
    codes = torch.randint(0, 16, (numel,), generator=gen, dtype=torch.uint8)
    scales = torch.rand(numel // group, 1, generator=gen) * 0.1 + 0.01
    zeros = torch.randint(0, 16, (numel // group, 1), generator=gen).float()
    dense = dequant_int4(codes, scales, zeros, group, shape)
    q = (pack_int4(codes).to(DEV, copy=True), scales.to(DEV, copy=True), zeros.to(DEV, copy=True), group)
    return None, q, dense


def low_ref(grad, dense, side):
    g64, p64 = grad.double().cpu(), dense.double()
    return (g64 @ p64.T if side == "right" else p64.T @ g64).float()


def back_ref(update, dense, side):
    u64, p64 = update.double().cpu(), dense.double()
    return (u64 @ p64 if side == "right" else p64 @ u64).float()


def adam_ref(low, exp_avg, exp_avg_sq, scale, beta1, beta2, eps, step_size):
    g = low / scale if scale is not None else low
    ea = exp_avg * beta1 + (1 - beta1) * g
    ev = exp_avg_sq * beta2 + (1 - beta2) * g * g
    # the square root correctly rounded (through fp64): torch 2.13's CPU sqrt (AVX512) is not -- it is one
    # ulp off for about 20 % of fp32 inputs -- while the kernel's tl.sqrt_rn is
    return ea, ev, ea / (ev.double().sqrt().float() + eps) * (-step_size)


def assert_close32(actual, expected, rtol=1e-5, what=""):
    actual = actual.detach().float().cpu()
    atol = rtol * float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")


def assert_close_dtype(actual, expected32, dtype, what=""):
    """``actual`` (dtype) within one ulp of ``dtype`` of the fp32 reference, plus the fp32 tolerance."""
    actual = actual.detach().float().cpu()
    ulp = {torch.bfloat16: 2.0 ** -7, torch.float16: 2.0 ** -10}[dtype]
    err = (actual - expected32).abs()
    bound = ulp * expected32.abs() + 1e-5 * float(expected32.abs().max()) + 1e-30
    assert bool((err <= bound).all()), f"{what}: max err {float((err - bound).max())} over the bound"


def low_shape(side, m, n, r):
    return (m, r) if side == "right" else (r, n)


# -- project_adam -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scaled", [False, True], ids=["noscale", "gradscale"])
@pytest.mark.parametrize("int4", [False, True], ids=["dense", "int4"])
@pytest.mark.parametrize("gdtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_project_adam_matches_torch(m, n, r, side, gdtype, int4, scaled):
    L = _lowrank()
    gen = torch.Generator().manual_seed(m * 1000 + n + r)
    pshape = (r, n) if side == "right" else (m, r)
    proj, q, dense = make_proj(pshape, int4, gen)
    lshape = low_shape(side, m, n, r)
    ea = torch.randn(lshape, generator=gen) * 0.1
    ev = torch.rand(lshape, generator=gen) * 0.01
    exp_avg, exp_avg_sq = ea.to(DEV, copy=True), ev.to(DEV, copy=True)
    scale = 1024.0 if scaled else None
    gs = torch.tensor([scale], device=DEV) if scaled else None
    for step in range(2):  # two steps: the moments carry over
        grad = (torch.randn(m, n, generator=gen) * (scale or 1.0)).to(gdtype)
        upd = L.project_adam(grad.to(DEV, copy=True), proj, side, exp_avg, exp_avg_sq, **HP, grad_scale=gs, int4=q,
                             proj_shape=pshape if int4 else None)
        ea, ev, u_ref = adam_ref(low_ref(grad, dense, side), ea, ev, scale, **HP)
        assert upd.dtype == torch.float32 and tuple(upd.shape) == lshape
        assert_close32(exp_avg, ea, what=f"exp_avg step {step}")
        assert_close32(exp_avg_sq, ev, what=f"exp_avg_sq step {step}")
        assert_close32(upd, u_ref, what=f"update step {step}")
        ea, ev = exp_avg.cpu().clone(), exp_avg_sq.cpu().clone()  # continue from the kernel's moments


def test_project_adam_epilogue_is_exact_on_exact_products():
    """With a gradient and projector whose products and sums are exact in fp32 (small integers), the
    low-rank gradient is exact, so the kernel's epilogue must equal the fp32 torch formula bit for bit
    (IEEE division and square root, no FMA contraction)."""
    L = _lowrank()
    gen = torch.Generator().manual_seed(1)
    for side in ("right", "left"):
        m, n, r = 45, 70, 12
        grad = torch.randint(-8, 9, (m, n), generator=gen).float()
        proj = torch.randint(-4, 5, (r, n) if side == "right" else (m, r), generator=gen).float()
        lshape = low_shape(side, m, n, r)
        ea, ev = torch.randn(lshape, generator=gen), torch.rand(lshape, generator=gen)
        exp_avg, exp_avg_sq = ea.to(DEV, copy=True), ev.to(DEV, copy=True)
        gs = torch.tensor([3.0], device=DEV)
        upd = L.project_adam(grad.to(DEV, copy=True), proj.to(DEV, copy=True), side, exp_avg, exp_avg_sq,
                             beta1=0.85, beta2=0.995, eps=1e-6, step_size=0.003, grad_scale=gs)
        e1, e2, u = adam_ref(low_ref(grad, proj, side), ea, ev, 3.0, 0.85, 0.995, 1e-6, 0.003)
        assert torch.equal(exp_avg.cpu(), e1) and torch.equal(exp_avg_sq.cpu(), e2)
        assert torch.equal(upd.cpu(), u)


def test_project_adam_large_rank_spans_several_tiles():
    """r = 70: the rank side of the output spans two tiles (64 + 6) on both sides."""
    L = _lowrank()
    gen = torch.Generator().manual_seed(2)
    m, n, r = 90, 75, 70
    for side in ("right", "left"):
        grad = torch.randn(m, n, generator=gen)
        pshape = (r, n) if side == "right" else (m, r)
        proj, q, dense = make_proj(pshape, False, gen)
        lshape = low_shape(side, m, n, r)
        exp_avg, exp_avg_sq = torch.zeros(lshape, device=DEV), torch.zeros(lshape, device=DEV)
        upd = L.project_adam(grad.to(DEV, copy=True), proj, side, exp_avg, exp_avg_sq, **HP)
        ea, ev, u = adam_ref(low_ref(grad, dense, side), torch.zeros(lshape), torch.zeros(lshape), None, **HP)
        assert_close32(exp_avg, ea, what="exp_avg")
        assert_close32(upd, u, what="update")


# -- back_project_ ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("int4", [False, True], ids=["dense", "int4"])
@pytest.mark.parametrize("pdtype", DTYPES, ids=str)
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("m,n,r", SHAPES)
def test_back_project_matches_torch(m, n, r, side, pdtype, int4):
    L = _lowrank()
    gen = torch.Generator().manual_seed(m + 7 * n + r)
    pshape = (r, n) if side == "right" else (m, r)
    proj, q, dense = make_proj(pshape, int4, gen)
    update = torch.randn(low_shape(side, m, n, r), generator=gen) * 0.01
    param = torch.randn(m, n, generator=gen).to(pdtype)
    p_dev = param.to(DEV, copy=True)
    beta, alpha = 1 - 1e-3 * 0.1, 0.25 * (1 - 1e-3 * 0.1)
    upd_dev = update.to(DEV, copy=True)
    assert L.back_project_(p_dev, upd_dev, proj, side, beta=beta, alpha=alpha, int4=q,
                           proj_shape=pshape if int4 else None) is None
    expected = param.float() * beta + alpha * back_ref(update, dense, side)
    assert p_dev.dtype == pdtype
    if pdtype == torch.float32:
        assert_close32(p_dev, expected, what="param")
    else:
        assert_close_dtype(p_dev, expected, pdtype, what="param")
    assert torch.equal(upd_dev.cpu(), update)  # the update is read only


def test_back_project_rounds_to_nearest_even():
    """Exact products (small integers times powers of two): the fp32 result is exact, so the stored bf16 /
    fp16 values must equal torch's round-to-nearest-even conversion of it bit for bit."""
    L = _lowrank()
    gen = torch.Generator().manual_seed(3)
    m, n, r = 33, 47, 6
    for side in ("right", "left"):
        proj = torch.randint(-3, 4, (r, n) if side == "right" else (m, r), generator=gen).float()
        update = torch.randint(-5, 6, low_shape(side, m, n, r), generator=gen).float() * 2.0 ** -9
        base = torch.randn(m, n, generator=gen) * 3
        for dt in (torch.bfloat16, torch.float16, torch.float32):
            # a base exactly representable in dt; base + back is exact in fp32 for bf16 / fp16 (few
            # significant bits), so the only rounding is the store's; for fp32 both round the same fp32 sum
            base_dt = base.to(dt)
            exact = base_dt.float() + back_ref(update, proj, side)
            param = base_dt.to(DEV, copy=True)
            L.back_project_(param, update.to(DEV, copy=True), proj.to(DEV, copy=True), side, beta=1.0, alpha=1.0)
            assert torch.equal(param.cpu(), exact.to(dt)), (side, dt)


# -- INT4 against q_galore_torch's quantizer ------------------------------------------------------------------

def test_int4_matches_q_galore_dequantization():
    """Quantize a projector with q_galore_torch 1.0's own quantizer (4 bits, group 64), pack its codes two
    per byte, and check that the kernels see exactly Q-GaLore's dequantized matrix
    ``scales * (codes - zeros)``: back-projecting an identity-like update recovers its rows exactly."""
    qg = pytest.importorskip("q_galore_torch.q_galore_projector")
    L = _lowrank()
    gen = torch.Generator().manual_seed(4)
    r, n = 16, 96
    ortho = torch.linalg.qr(torch.randn(n, r, generator=gen))[0].T.contiguous()  # r x n, orthonormal rows
    proj_obj = qg.GaLoreProjector(rank=r, quant=True, group_size=64, n_bit=4)
    codes, scales, zeros, shape = proj_obj._quantize(ortho, q_group_size=64, n_bit=4)
    assert tuple(shape) == (r, n) and int(codes.max()) <= 15
    deq = (scales * (codes.to(scales.dtype) - zeros)).reshape(shape)
    q = (pack_int4(codes).to(DEV, copy=True), scales.float().contiguous().to(DEV, copy=True),
         zeros.float().contiguous().to(DEV, copy=True), 64)
    # back(U) with U = [I_r; 0] (m = r + 3 rows): row i of the result is row i of the dequantized P
    m = r + 3
    update = torch.zeros(m, r)
    update[:r] = torch.eye(r)
    param = torch.zeros(m, n, device=DEV)
    L.back_project_(param, update.to(DEV, copy=True), None, "right", beta=1.0, alpha=1.0, int4=q, proj_shape=(r, n))
    assert torch.equal(param[:r].cpu(), deq.float())
    assert torch.equal(param[r:].cpu(), torch.zeros(3, n))


@pytest.mark.parametrize("side", ["right", "left"])
def test_int4_matches_fastopt_quantizer(side):
    """fastopt.lowrank.quant's INT4 projector format (packed codes, [groups, 1] scales / zeros; stochastic
    rounding) is what the kernels read: with identity operands both kernels reproduce
    ``dequantize_projector`` exactly (products with 0 / 1 and sums of one term are exact in fp32)."""
    quant = pytest.importorskip("fastopt.lowrank.quant")
    L = _lowrank()
    gen = torch.Generator().manual_seed(7)
    m, n, r = 24, 40, 6
    group = 30 if side == "right" else 16  # divides numel(P); the groups straddle P's rows
    pshape = (r, n) if side == "right" else (m, r)
    q = quant.quantize_projector(torch.randn(pshape, generator=gen), bits=4, group_size=group, stochastic=True, seed=3)
    dense = quant.dequantize_projector(q, pshape)
    int4 = (q["codes"].to(DEV, copy=True), q["scales"].to(DEV, copy=True), q["zeros"].to(DEV, copy=True), group)
    # project: G selects P's columns (right: G = [I_n; 0] rows, low = G P^T; left: G = [I_m, 0], low = P^T G);
    # beta1 = 0 makes exp_avg the low-rank gradient itself
    grad = torch.eye(m, n)
    low = grad @ dense.T if side == "right" else dense.T @ grad
    lshape = low_shape(side, m, n, r)
    exp_avg, exp_avg_sq = torch.zeros(lshape, device=DEV), torch.zeros(lshape, device=DEV)
    L.project_adam(grad.to(DEV, copy=True), None, side, exp_avg, exp_avg_sq, beta1=0.0, beta2=0.5, eps=1e-8,
                   step_size=1.0, int4=int4, proj_shape=pshape)
    assert torch.equal(exp_avg.cpu(), low)
    # back: U = identity-like, so back(U) is the projector (padded with zeros)
    update = torch.eye(*lshape)
    param = torch.zeros(m, n, device=DEV)
    L.back_project_(param, update.to(DEV, copy=True), None, side, beta=1.0, alpha=1.0, int4=int4, proj_shape=pshape)
    expect = update @ dense if side == "right" else dense @ update
    assert torch.equal(param.cpu(), expect)
    assert torch.equal(expect[:r] if side == "right" else expect[:, :r], dense)  # every element of P was read


# -- small tiles: many tiles per dimension and several K steps --------------------------------------------------

@pytest.mark.parametrize("int4", [False, True], ids=["dense", "int4"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_small_tiles(monkeypatch, side, int4):
    L = _lowrank()
    monkeypatch.setattr(L, "_project_blocks", lambda *a: (16, 16, 16, 4, 1))
    monkeypatch.setattr(L, "_back_blocks", lambda *a: (16, 16, 16, 4, 1))
    gen = torch.Generator().manual_seed(5)
    m, n, r = 50, 61, 19
    pshape = (r, n) if side == "right" else (m, r)
    proj, q, dense = make_proj(pshape, int4, gen)
    grad = torch.randn(m, n, generator=gen, dtype=torch.bfloat16)
    lshape = low_shape(side, m, n, r)
    exp_avg, exp_avg_sq = torch.zeros(lshape, device=DEV), torch.zeros(lshape, device=DEV)
    ps = pshape if int4 else None
    upd = L.project_adam(grad.to(DEV, copy=True), proj, side, exp_avg, exp_avg_sq, **HP, int4=q, proj_shape=ps)
    ea, ev, u = adam_ref(low_ref(grad, dense, side), torch.zeros(lshape), torch.zeros(lshape), None, **HP)
    assert_close32(exp_avg, ea, what="exp_avg")
    assert_close32(exp_avg_sq, ev, what="exp_avg_sq")
    assert_close32(upd, u, what="update")
    param = torch.randn(m, n, generator=gen)
    p_dev = param.to(DEV, copy=True)
    L.back_project_(p_dev, upd, proj, side, beta=0.5, alpha=2.0, int4=q, proj_shape=ps)
    assert_close32(p_dev, param * 0.5 + 2.0 * back_ref(upd, dense, side), what="param")


# -- empty inputs -----------------------------------------------------------------------------------------------

def test_empty():
    L = _lowrank()
    r = 4
    # right, m = 0: the low-rank shape (0, r) is empty: nothing to do
    upd = L.project_adam(torch.zeros(0, 9, device=DEV), torch.randn(r, 9, device=DEV), "right",
                         torch.zeros(0, r, device=DEV), torch.zeros(0, r, device=DEV), **HP)
    assert upd.shape == (0, r)
    # left, m = 0: low = P^T G is an r x n zero matrix: the moments decay (a launch with an empty K loop)
    ea0, ev0 = torch.randn(r, 9), torch.rand(r, 9)
    ea, ev = ea0.to(DEV, copy=True), ev0.to(DEV, copy=True)
    upd = L.project_adam(torch.zeros(0, 9, device=DEV), torch.zeros(0, r, device=DEV), "left", ea, ev, **HP)
    e1, e2, u = adam_ref(torch.zeros(r, 9), ea0, ev0, None, **HP)
    assert torch.equal(ea.cpu(), e1) and torch.equal(ev.cpu(), e2) and torch.equal(upd.cpu(), u)
    # left, n = 0 / right, n = 0 ... back_project_ on an empty param: no launch, no error
    p = torch.zeros(0, 7, device=DEV)
    assert L.back_project_(p, torch.zeros(0, r, device=DEV), torch.randn(r, 7, device=DEV), "right",
                           beta=1.0, alpha=1.0) is None
    upd = L.project_adam(torch.zeros(5, 0, device=DEV), torch.zeros(5, r, device=DEV), "left",
                         torch.zeros(r, 0, device=DEV), torch.zeros(r, 0, device=DEV), **HP)
    assert upd.shape == (r, 0)


# -- bad inputs: a clear error, nothing written -------------------------------------------------------------------

def _case():
    gen = torch.Generator().manual_seed(6)
    m, n, r = 12, 10, 3
    t = {k: f(s, generator=gen).to(DEV, copy=True) for k, f, s in (
        ("grad", torch.randn, (m, n)), ("proj", torch.randn, (r, n)), ("exp_avg", torch.randn, (m, r)),
        ("exp_avg_sq", torch.rand, (m, r)), ("param", torch.randn, (m, n)), ("update", torch.randn, (m, r)))}
    codes = pack_int4(torch.randint(0, 16, (r * n,), generator=gen, dtype=torch.uint8)).to(DEV, copy=True)
    t["int4"] = (codes, torch.rand(r * n // 5, 1).to(DEV, copy=True), torch.zeros(r * n // 5, 1).to(DEV, copy=True), 5)
    return t


def _adam_call(t, **over):
    a = dict(grad=t["grad"], proj=t["proj"], side="right", exp_avg=t["exp_avg"], exp_avg_sq=t["exp_avg_sq"])
    kw = dict(HP)
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return lambda: _lowrank().project_adam(a["grad"], a["proj"], a["side"], a["exp_avg"], a["exp_avg_sq"], **kw)


def _back_call(t, **over):
    a = dict(param=t["param"], update=t["update"], proj=t["proj"], side="right")
    kw = dict(beta=0.9, alpha=0.5)
    for k, v in over.items():
        (a if k in a else kw)[k] = v
    return lambda: _lowrank().back_project_(a["param"], a["update"], a["proj"], a["side"], **kw)


def _overlapping_pair():
    base = torch.zeros(40, device=DEV)
    return dict(exp_avg=base[:36].view(12, 3), exp_avg_sq=base[4:].view(12, 3))  # partly the same memory


ADAM_BAD = {
    "side": (ValueError, "side", lambda t: dict(side="top")),
    "grad dtype": (TypeError, "grad", lambda t: dict(grad=t["grad"].double())),
    "grad int": (TypeError, "grad", lambda t: dict(grad=t["grad"].int())),
    "grad 1-D": (ValueError, "grad", lambda t: dict(grad=t["grad"].reshape(-1))),
    "grad not contiguous": (ValueError, "grad", lambda t: dict(grad=torch.randn(10, 12, device=DEV).T)),
    "grad not a tensor": (TypeError, "grad", lambda t: dict(grad=t["grad"].tolist())),
    "proj shape": (ValueError, "proj", lambda t: dict(proj=torch.randn(3, 11, device=DEV))),
    "proj left shape": (ValueError, "proj", lambda t: dict(side="left")),
    "proj dtype": (TypeError, "proj", lambda t: dict(proj=t["proj"].half())),
    "proj 3-D": (ValueError, "proj", lambda t: dict(proj=t["proj"][None])),
    "proj rank 0": (ValueError, "rank", lambda t: dict(proj=torch.zeros(0, 10, device=DEV),
                                                       exp_avg=torch.zeros(12, 0, device=DEV),
                                                       exp_avg_sq=torch.zeros(12, 0, device=DEV))),
    "proj none": (ValueError, "proj", lambda t: dict(proj=None)),
    "proj and int4": (ValueError, "int4", lambda t: dict(int4=t["int4"], proj_shape=(3, 10))),
    "int4 no shape": (ValueError, "proj_shape", lambda t: dict(proj=None, int4=t["int4"])),
    "int4 not a tuple": (TypeError, "int4", lambda t: dict(proj=None, int4=t["int4"][0], proj_shape=(3, 10))),
    "int4 codes bytes": (ValueError, "codes", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                            int4=(t["int4"][0][:-1], *t["int4"][1:]))),
    "int4 codes dtype": (TypeError, "codes", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                           int4=(t["int4"][0].to(torch.int8), *t["int4"][1:]))),
    "int4 scales size": (ValueError, "scales", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                             int4=(t["int4"][0], t["int4"][1][:-1], *t["int4"][2:]))),
    "int4 zeros dtype": (TypeError, "zeros", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                           int4=(*t["int4"][:2], t["int4"][2].double(), 5))),
    "int4 group": (ValueError, "group_size", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                           int4=(*t["int4"][:3], 7))),
    "int4 group type": (TypeError, "group_size", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                               int4=(*t["int4"][:3], 5.0))),
    "int4 shape mismatch": (ValueError, "proj", lambda t: dict(proj=None, proj_shape=(5, 6), int4=t["int4"])),
    "exp_avg shape": (ValueError, "exp_avg", lambda t: dict(exp_avg=t["exp_avg"][:-1])),
    "exp_avg dtype": (TypeError, "exp_avg", lambda t: dict(exp_avg=t["exp_avg"].bfloat16())),
    "exp_avg_sq not contiguous": (ValueError, "exp_avg_sq", lambda t: dict(
        exp_avg_sq=torch.zeros(3, 12, device=DEV).T)),
    "moments alias": (ValueError, "exp_avg_sq", lambda t: dict(exp_avg_sq=t["exp_avg"])),
    "moments overlap": (ValueError, "exp_avg_sq must not share memory with exp_avg", lambda t: _overlapping_pair()),
    "moment inside grad": (ValueError, "exp_avg must not share memory with grad", lambda t: dict(
        exp_avg=t["grad"].view(-1)[50:86].view(12, 3))),
    "beta1": (ValueError, "beta1", lambda t: dict(beta1=1.0)),
    "beta2": (ValueError, "beta2", lambda t: dict(beta2=-0.1)),
    "eps": (ValueError, "eps", lambda t: dict(eps=float("nan"))),
    "step_size type": (TypeError, "step_size", lambda t: dict(step_size=torch.tensor(0.1))),
    "grad_scale size": (ValueError, "grad_scale", lambda t: dict(grad_scale=torch.ones(2, device=DEV))),
    "grad_scale dtype": (TypeError, "grad_scale", lambda t: dict(grad_scale=torch.ones(1, device=DEV).double())),
    "grad_scale float": (TypeError, "grad_scale", lambda t: dict(grad_scale=2.0)),
}


@pytest.mark.parametrize("name", list(ADAM_BAD))
def test_project_adam_bad_input(name):
    t = _case()
    exc, word, over = ADAM_BAD[name]
    kw = over(t)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()}
    watched = [kw.get("exp_avg", t["exp_avg"]), kw.get("exp_avg_sq", t["exp_avg_sq"])]
    watched_before = [w.clone() for w in watched]
    with pytest.raises(exc, match=word):
        _adam_call(t, **kw)()
    for k in ("exp_avg", "exp_avg_sq", "grad", "proj"):
        assert torch.equal(t[k], before[k]), k
    for w, b in zip(watched, watched_before):
        assert torch.equal(w, b)


BACK_BAD = {
    "side": (ValueError, "side", lambda t: dict(side=1)),
    "param dtype": (TypeError, "param", lambda t: dict(param=t["param"].double())),
    "param 3-D": (ValueError, "param", lambda t: dict(param=t["param"][None])),
    "param not contiguous": (ValueError, "param", lambda t: dict(param=torch.randn(10, 12, device=DEV).T)),
    "update shape": (ValueError, "update", lambda t: dict(update=torch.randn(3, 10, device=DEV))),
    "update dtype": (TypeError, "update", lambda t: dict(update=t["update"].bfloat16())),
    "proj shape": (ValueError, "proj", lambda t: dict(proj=torch.randn(3, 9, device=DEV))),
    "proj left": (ValueError, "proj", lambda t: dict(side="left")),
    "int4 codes": (ValueError, "codes", lambda t: dict(proj=None, proj_shape=(3, 10),
                                                      int4=(t["int4"][0][1:], *t["int4"][1:]))),
    "beta": (TypeError, "beta", lambda t: dict(beta="1")),
    "alpha": (ValueError, "alpha", lambda t: dict(alpha=float("inf"))),
    "alias": (ValueError, "share memory", lambda t: dict(param=torch.zeros(12, 10, device=DEV),
                                                         update=None)),
    "param over proj": (ValueError, "param must not share memory with proj", lambda t: dict(
        param=t["proj"].view(3, 10), update=torch.zeros(3, 3, device=DEV))),
}


@pytest.mark.parametrize("name", list(BACK_BAD))
def test_back_project_bad_input(name):
    t = _case()
    exc, word, over = BACK_BAD[name]
    kw = over(t)
    if name == "alias":  # an update that is a view into the param's memory
        kw["update"] = kw["param"].view(-1)[: 12 * 3].view(12, 3)
    before = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in t.items()}
    p_watch = kw.get("param", t["param"])
    p_before = p_watch.clone()
    with pytest.raises(exc, match=word):
        _back_call(t, **kw)()
    for k in ("param", "update", "proj"):
        assert torch.equal(t[k], before[k]), k
    assert torch.equal(p_watch, p_before)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    """Outside TRITON_INTERPRET (and outside the compile audit) CPU tensors are refused with a clear error."""
    L = _lowrank()
    monkeypatch.setattr(L, "_interpret", lambda: False)
    t = _case()
    cpu = {k: v.cpu() for k, v in t.items() if torch.is_tensor(v)}
    with pytest.raises(ValueError, match="CUDA"):
        L.project_adam(cpu["grad"], cpu["proj"], "right", cpu["exp_avg"], cpu["exp_avg_sq"], **HP)
    with pytest.raises(ValueError, match="CUDA"):
        L.back_project_(cpu["param"], cpu["update"], cpu["proj"], "right", beta=1.0, alpha=1.0)


# -- the compiled epilogue (sm_90, no GPU needed) ------------------------------------------------------------------

_PTX_SCRIPT = r"""
import json, os, sys
import torch
import triton.runtime.jit as jit
from fastopt.triton_kernels import compile_audit as ca
from fastopt.triton_kernels import lowrank as tlr
with ca.capture() as launches:
    g, p = torch.randn(64, 48), torch.randn(8, 48)
    upd = tlr.project_adam(g, p, "right", torch.zeros(64, 8), torch.zeros(64, 8), beta1=0.9, beta2=0.999,
                           eps=1e-8, step_size=1e-3, grad_scale=torch.ones(1))
    tlr.back_project_(torch.randn(64, 48, dtype=torch.bfloat16), torch.zeros(64, 8), p, "right", beta=1.0, alpha=1.0)
ca._worker_init()
out = {}
for ln in launches:
    d = json.loads(ln.data)
    fn = jit._triton_jit_function_registry[":".join(d["name"].rsplit(".", 1))]
    out[ln.kernel] = fn.preload(ln.data).asm["ptx"]
json.dump(out, sys.stdout)
"""


def test_sm90_ptx_uses_ieee_division_and_square_root():
    """The interpreter computes ``/`` and ``tl.sqrt`` with numpy's IEEE operations, so it cannot tell a fast
    approximate division or square root from a correctly rounded one: compile both kernels for sm_90 (no GPU:
    compile_audit's stand-in driver) and read the PTX.  The Adam epilogue must use ``div.rn.f32`` and
    ``sqrt.rn.f32`` (no ``.approx`` / ``div.full``), so that it rounds like torch's fp32 ops."""
    import json
    import os
    import subprocess
    import sys

    from triton.backends import backends
    if "nvidia" not in backends:
        pytest.skip("triton has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PTX_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ptx = json.loads(proc.stdout)
    assert set(ptx) == {"_project_adam_kernel", "_back_project_kernel"}
    adam = ptx["_project_adam_kernel"]
    assert "div.rn.f32" in adam and "sqrt.rn.f32" in adam
    for bad in ("sqrt.approx", "div.approx", "div.full", "rsqrt", "rcp.approx"):
        assert bad not in adam, bad
