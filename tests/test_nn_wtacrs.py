"""fastopt.nn.WTACRSLinear (Winner-Take-All Column-Row Sampling, Liu et al. NeurIPS 2023): the fused row
pass on every backend against the reference, an unbiased weight gradient (with a check that the bound
used can fail), a variance below plain column-row sampling, exact input / bias gradients, the saved
activations, nn.Linear compatibility, convert_linear, training, errors."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastopt
from fastopt.nn import WTACRSLinear, convert_linear, wtacrs_rows
from fastopt.reference import wtacrs as ref

from conftest import DEVICE_BACKENDS, KERNEL_DEVICE_BACKENDS


@pytest.fixture(autouse=True)
def _one_thread():
    """Small problems: one torch thread (the machine's other jobs make OpenMP teams spin)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- the row pass ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols", [(1, 1), (37, 5), (64, 1500)])
def test_row_pass_matches_reference(device, backend, dtype, rows, cols):
    g = torch.Generator().manual_seed(rows * cols)
    src = torch.randn(rows, cols, generator=g).to(device=device, dtype=dtype)
    k = max(rows // 3, 1)
    pos = torch.full((rows,), -1, dtype=torch.int64)
    pos[torch.randperm(rows, generator=g)[:k]] = torch.arange(k)
    pos = pos.to(device)
    w = torch.rand(k, generator=g).to(device)
    gn = torch.rand(rows, generator=g).to(device)
    o_ref, s_ref = ref.rows_reference(src, pos, w, gn)
    out = torch.full((k, cols), 7.0, dtype=dtype, device=device)
    norms = torch.empty(rows, device=device)
    wtacrs_rows(src, pos, w, out, gn, norms, backend=backend)
    assert torch.equal(out, o_ref)  # the same fp32 product, rounded alike
    torch.testing.assert_close(norms, s_ref, rtol=2e-6, atol=0)
    # the norms alone (no previous gradient norms), and the gather alone (unscaled), leave the rest
    out2 = torch.full((k + 1, cols), 7.0, dtype=dtype, device=device)
    n2 = torch.empty(rows, device=device)
    wtacrs_rows(src, None, None, None, None, n2, backend=backend)
    torch.testing.assert_close(n2, ref.row_scores(src), rtol=2e-6, atol=0)
    wtacrs_rows(src, pos, None, out2, backend=backend)
    sel = pos >= 0
    assert torch.equal(out2[pos[sel]], src[sel])
    assert torch.equal(out2[k], torch.full((cols,), 7.0, dtype=dtype, device=device))


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_row_pass_rejects_bad_inputs(device, backend):
    src = torch.randn(6, 4, device=device)
    out = torch.empty(2, 4, device=device)
    pos = torch.tensor([0, -1, 1, -1, -1, -1], device=device)
    with pytest.raises(ValueError, match=r"pos must be in \[-1, 2\)"):
        wtacrs_rows(src, torch.tensor([0, -1, 2, -1, -1, -1], device=device), None, out, backend=backend)
    with pytest.raises(ValueError, match="out must be"):
        wtacrs_rows(src, pos, None, torch.empty(2, 5, device=device), backend=backend)
    with pytest.raises(ValueError, match="contiguous"):
        wtacrs_rows(torch.randn(4, 6, device=device).t(), None, None, None, None, torch.empty(6), backend=backend)
    with pytest.raises(ValueError, match="pos and out go together"):
        wtacrs_rows(src, pos, None, None, backend=backend)
    with pytest.raises(ValueError, match="norms"):
        wtacrs_rows(src, None, None, None, None, torch.empty(5, device=device), backend=backend)
    if backend != "torch":
        with pytest.raises(fastopt.BackendUnavailableError):
            wtacrs_rows(src.double(), None, None, None, None, torch.empty(6, device=device), backend=backend)


# -- the estimator ---------------------------------------------------------------------------------------

def _problem(n=60, d_in=8, d_out=5, seed=0):
    """x with heavy-tailed row norms (as real activations), dy from a fixed linear map of x plus noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) * torch.exp(1.5 * torch.randn(n, 1, generator=g))
    dy = torch.randn(n, d_out, generator=g) * torch.exp(torch.randn(n, 1, generator=g))
    return x, dy


def _draws(layer_or_fn, x, dy, t):
    est = []
    for _ in range(t):
        est.append(layer_or_fn(x, dy))
    return torch.stack(est).double()


def _bias_z(est, exact):
    """max |mean - exact| / its standard error, over the elements."""
    t = est.shape[0]
    se = est.std(0) / math.sqrt(t)
    return float(((est.mean(0) - exact.double()).abs() / se.clamp_min(1e-12)).max())


# (the Triton interpreter runs a launch in ~0.1 s: its 1500 draws would take minutes; the row pass it
# runs is checked against the reference above, and the layer on it in test_backends_agree...)
@pytest.mark.parametrize("device,backend", [(d, b) for d, b in DEVICE_BACKENDS if (d, b) != ("cpu", "triton")])
def test_weight_gradient_is_unbiased(device, backend):
    """The mean of T sampled weight gradients is the exact one within 5 standard errors per element
    (40 elements: a false alarm has probability < 1e-4); an estimator without the reweighting fails
    the same check."""
    x, dy = _problem()
    x, dy = x.to(device), dy.to(device)
    exact = dy.t() @ x
    layer = WTACRSLinear(8, 5, seed=11, backend=backend, device=device)

    def sample(x, dy):
        layer.weight.grad = None
        xr = x.view(3, 20, 8)  # leading dims flattened to rows
        layer(xr).backward(dy.view(3, 20, 5))
        return layer.weight.grad.detach().cpu()

    t = 1500
    est = _draws(sample, x, dy, t)
    assert _bias_z(est, exact.cpu()) < 5.0
    assert layer.grad_norms is not None  # the later draws used the previous output-gradient norms
    torch.testing.assert_close(layer.grad_norms, dy.norm(dim=1), rtol=1e-5, atol=0)

    gen = torch.Generator().manual_seed(5)

    def unweighted(x, dy):  # the same rows, weight 1: biased
        p = ref.probabilities(ref.row_scores(x, dy.norm(dim=1)))
        idx, _ = ref.select_rows(p, ref.num_rows(60, 0.3), gen)
        return (dy[idx].t() @ x[idx]).cpu()

    assert _bias_z(_draws(unweighted, x.cpu(), dy.cpu(), 300), exact.cpu()) > 5.0


def test_variance_below_plain_column_row_sampling():
    """On a small model's last layer (its input activations and output gradients), WTA-CRS's mean squared
    error against the exact weight gradient is below plain column-row sampling's (the same probabilities,
    no winners) and below uniform sampling's, at the same budget of rows; its winners are in use."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 6))
    x = torch.randn(256, 16) * torch.exp(torch.randn(256, 1))
    y = torch.randint(0, 6, (256,))
    h = model[1](model[0](x)).detach().requires_grad_()
    out = model[2](h)
    dy, = torch.autograd.grad(F.cross_entropy(out, y), out)
    exact = dy.t() @ h.detach()
    hx = h.detach()
    k = ref.num_rows(256, ref.DEFAULT_BUDGET)
    p = ref.probabilities(ref.row_scores(hx, dy.norm(dim=1)))
    assert ref.winner_count(p, k) > 0
    gen = torch.Generator().manual_seed(1)

    def mse(p, winners, t=300):
        err = 0.0
        for _ in range(t):
            idx, w = ref.select_rows(p, k, gen, winners)
            est = dy[idx].t() @ (hx[idx] * w.float()[:, None])
            err += float(((est - exact) ** 2).sum())
        return err / t

    wta, crs = mse(p, True), mse(p, False)
    uniform = mse(torch.full((256,), 1 / 256, dtype=torch.float64), False)
    assert wta < 0.9 * crs, (wta, crs)
    assert wta < 0.5 * uniform, (wta, uniform)
    # the reference estimator (as the layer calls it) draws from the same rule
    est = ref.wtacrs_weight_grad_reference(hx, dy, grad_norms=dy.norm(dim=1), generator=torch.Generator().manual_seed(3))
    assert est.shape == exact.shape and torch.isfinite(est).all()


def test_winner_count_rule():
    """|C| minimizes (1 - P_C) / (k - |C|), 0 when nothing beats 1 / k (uniform p); brute force."""
    k = 6
    for p in (torch.full((20,), 0.05, dtype=torch.float64),
              torch.tensor([0.4, 0.2, 0.1] + [0.3 / 17] * 17, dtype=torch.float64)):
        srt = torch.sort(p, descending=True).values
        scores = [(1.0 - float(srt[:c].sum())) / (k - c) for c in range(0, k)]
        best = min(range(k), key=lambda c: (scores[c], c))
        assert ref.winner_count(p, k) == best
    assert ref.winner_count(torch.full((20,), 0.05, dtype=torch.float64), k) == 0


# -- the layer -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_forward_input_and_bias_gradients_exact(device, backend):
    torch.manual_seed(0)
    lin = nn.Linear(12, 7, device=device)
    layer = WTACRSLinear.from_linear(nn.Linear(12, 7, device=device), seed=0, backend=backend)
    layer.load_state_dict(lin.state_dict())
    x = torch.randn(5, 9, 12, device=device, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    g = torch.randn(5, 9, 7, device=device)
    y, y2 = layer(x), lin(x2)
    assert torch.equal(y, y2)
    y.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.bias.grad, lin.bias.grad, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(layer.weight.grad, lin.weight.grad)  # sampled (45 rows, 13 kept)
    # budget 1: every row kept, the weight gradient exact too
    full = WTACRSLinear.from_linear(lin, budget=1.0, backend=backend)
    lin.zero_grad()
    full(x2).backward(g)
    w1 = lin.weight.grad.clone()
    lin.zero_grad()
    F.linear(x2, lin.weight, lin.bias).backward(g)
    torch.testing.assert_close(w1, lin.weight.grad, rtol=1e-6, atol=1e-6)


def test_backends_agree_and_seed_is_deterministic():
    x, dy = _problem(200, 24, 10, seed=3)
    grads = {}
    for device, backend in DEVICE_BACKENDS:
        for rep in range(2):
            layer = WTACRSLinear(24, 10, seed=7, backend=backend, device=device)
            with torch.no_grad():
                layer.weight.copy_(torch.linspace(-1, 1, 240).view(10, 24))
            for _ in range(2):  # the second step samples with the first's output-gradient norms
                layer.weight.grad = None
                layer(x.to(device)).backward(dy.to(device))
            grads[(backend, rep)] = layer.weight.grad.cpu()
    first = next(iter(grads.values()))
    for key, g in grads.items():
        torch.testing.assert_close(g, first, rtol=1e-5, atol=1e-5, msg=str(key))
    other = WTACRSLinear(24, 10, seed=8, backend="torch")
    with torch.no_grad():
        other.weight.copy_(torch.linspace(-1, 1, 240).view(10, 24))
    other(x).backward(dy)
    other.weight.grad = None
    other(x).backward(dy)
    assert not torch.allclose(other.weight.grad, first)


def _saved_activation_bytes(module, x, g):
    """Bytes of the distinct storages saved for backward that are not parameters (saved_tensors_hooks; the
    wtacrs bench suite's measure)."""
    from fastopt.bench.wtacrs import saved_bytes

    return saved_bytes(module, x, g)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_saved_activations_at_most_budget(device, backend):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128, device=device)
    layer = WTACRSLinear.from_linear(lin, seed=1, backend=backend)
    x = torch.randn(8, 64, 256, device=device, requires_grad=True)
    g = torch.randn(8, 64, 128, device=device)
    base = _saved_activation_bytes(lin, x, g)
    assert base == x.numel() * 4
    for step in range(2):  # without, then with the previous output-gradient norms
        ours = _saved_activation_bytes(layer, x, g)
        assert ours <= 0.3 * base, (step, ours / base)
        k = ref.num_rows(512, 0.3)
        assert ours <= k * (256 * 4 + 8)  # never more than the k rows and their indices
    # eval, no_grad and a frozen weight: F.linear, nothing more than nn.Linear saves
    layer.eval()
    assert _saved_activation_bytes(layer, x, g) == base
    layer.train()
    layer.weight.requires_grad_(False)
    lin_frozen = _saved_activation_bytes(lin, x, g)
    assert _saved_activation_bytes(layer, x, g) == lin_frozen
    layer.weight.requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(layer(x), lin(x))


def test_state_dict_from_linear_and_convert_linear():
    torch.manual_seed(0)
    lin = nn.Linear(6, 4)
    layer = WTACRSLinear(6, 4)
    assert set(layer.state_dict()) == set(lin.state_dict()) == {"weight", "bias"}
    layer.load_state_dict(lin.state_dict())
    lin2 = nn.Linear(6, 4)
    lin2.load_state_dict(layer.state_dict())
    assert torch.equal(lin2.weight, lin.weight)
    nobias = WTACRSLinear(6, 4, bias=False)
    assert set(nobias.state_dict()) == {"weight"} and nobias.bias is None
    shared = WTACRSLinear.from_linear(lin, budget=0.5)
    assert shared.weight is lin.weight and shared.bias is lin.bias and shared.budget == 0.5

    inner = nn.Linear(8, 8)
    mha = nn.MultiheadAttention(8, 2)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Sequential(inner, nn.Linear(8, 3)), mha)
    model.add_module("again", inner)  # one layer registered twice
    params = list(model.parameters())
    out = convert_linear(model, budget=0.2, filter=lambda name, m: m.out_features != 3, seed=4)
    assert out is model
    assert isinstance(model[0], WTACRSLinear) and model[0].budget == 0.2 and model[0].seed == 4
    assert isinstance(model[2][0], WTACRSLinear) and model.again is model[2][0]
    assert type(model[2][1]) is nn.Linear  # filtered out
    assert not isinstance(mha.out_proj, WTACRSLinear)  # a subclass its module never calls: left
    assert list(model.parameters()) == params  # the same Parameter objects
    single = convert_linear(nn.Linear(3, 2))
    assert isinstance(single, WTACRSLinear)
    assert "budget=0.3" in repr(single)


def test_training_reaches_nn_linear_loss():
    """A 2-layer MLP regression (Adam, 300 steps of 256 rows, fixed seeds) ends within 5 % of nn.Linear's
    loss over the whole data set."""

    def run(wta):
        g = torch.Generator().manual_seed(0)
        x = torch.randn(1024, 16, generator=g)
        y = torch.tanh(x @ torch.randn(16, 4, generator=g)) + 0.05 * torch.randn(1024, 4, generator=g)
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 4))
        if wta:
            convert_linear(model, seed=3)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 300)
        for _ in range(300):
            i = torch.randint(0, 1024, (256,), generator=g)
            loss = F.mse_loss(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        with torch.no_grad():
            return float(F.mse_loss(model(x), y))

    base, ours = run(False), run(True)
    assert ours != base
    assert ours <= 1.05 * base, (ours, base)


def test_errors():
    for bad in (0, 0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"WTACRSLinear: budget must be in \(0, 1\]"):
            WTACRSLinear(4, 3, budget=bad)
    for bad in (True, "0.3", None):
        with pytest.raises(TypeError, match="WTACRSLinear: budget"):
            WTACRSLinear(4, 3, budget=bad)
    with pytest.raises(ValueError, match="WTACRSLinear: min_rows"):
        WTACRSLinear(4, 3, min_rows=0)
    with pytest.raises(ValueError, match="WTACRSLinear: grad_norms"):
        WTACRSLinear(4, 3, grad_norms="current")
    with pytest.raises(TypeError, match="WTACRSLinear: seed"):
        WTACRSLinear(4, 3, seed=1.5)
    with pytest.raises(ValueError, match="unknown backend"):
        WTACRSLinear(4, 3, backend="gpu")
    layer = WTACRSLinear(4, 3)
    with pytest.raises(ValueError, match="WTACRSLinear: input's last dim must be in_features=4"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="WTACRSLinear: input's last dim"):
        layer(torch.tensor(1.0))
    with pytest.raises(ValueError, match="WTACRSLinear: input is torch.float64"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="WTACRSLinear.from_linear"):
        WTACRSLinear.from_linear(nn.Conv1d(2, 2, 1))
    with pytest.raises(ValueError, match=r"convert_linear: budget must be in \(0, 1\]"):
        convert_linear(nn.Sequential(nn.Linear(2, 2)), budget=2)
    with pytest.raises(TypeError, match="convert_linear: model"):
        convert_linear([nn.Linear(2, 2)])
    with pytest.raises(TypeError, match="convert_linear: filter"):
        convert_linear(nn.Sequential(nn.Linear(2, 2)), filter=3)
    # a small input: k = min_rows or every row; one row works
    layer(torch.randn(4, requires_grad=True)).sum().backward()
    assert layer.weight.grad.shape == (3, 4)


def test_per_example_gradient_norms():
    """grad_norms='example' (the official cache): a batch of examples seen before samples with the norms
    their previous visit's backward stored (the same estimate as the reference given those norms and the
    same generator state); a batch with an unseen example samples by ||x_i|| alone."""
    from fastopt.nn import set_example_ids

    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 10, 8, generator=g) * torch.exp(torch.randn(6, 10, 1, generator=g))
    dy = torch.randn(6, 10, 5, generator=g)
    layer = WTACRSLinear(8, 5, grad_norms="example", seed=2, backend="torch")
    for ids in ([0, 1, 2], [3, 4, 5]):
        set_example_ids(layer, torch.tensor(ids))
        layer.weight.grad = None
        layer(x[ids]).backward(dy[ids])
    table = layer.grad_norms
    torch.testing.assert_close(table, dy.norm(dim=-1), rtol=1e-5, atol=0)
    ids = [2, 0, 5]
    for known, g_expected in ((ids, table[ids].reshape(-1).clone()), ([2, 0, 7], None)):
        set_example_ids(layer, torch.tensor(known))
        state = layer._generator.get_state()
        layer.weight.grad = None
        xb, dyb = x[[i % 6 for i in known]], dy[[i % 6 for i in known]]
        layer(xb).backward(dyb)
        gen = torch.Generator()
        gen.set_state(state)
        want = ref.wtacrs_weight_grad_reference(xb, dyb, grad_norms=g_expected, generator=gen)
        torch.testing.assert_close(layer.weight.grad, want, rtol=1e-5, atol=1e-5)
    assert layer.grad_norms.shape[0] >= 8 and layer.grad_norms.shape[1] == 10  # grown to example 7
    with pytest.raises(ValueError, match="set_example_ids: ids must be a 1-D int64 tensor"):
        set_example_ids(layer, torch.tensor([[1]]))
    with pytest.raises(ValueError, match="set_example_ids: ids must be >= 0"):
        set_example_ids(layer, torch.tensor([-1]))
    set_example_ids(layer, torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="WTACRSLinear: 30 rows are not a whole number"):
        layer(x[:3])
    set_example_ids(layer, None)
    with pytest.raises(RuntimeError, match="set_example_ids"):
        layer(x[:3])
