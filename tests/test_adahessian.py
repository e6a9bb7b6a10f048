"""AdaHessian (fastopt.AdaHessian): the probe kernels, the Hutchinson estimate by double backward, both
modes against their upstream codes (pytorch_optimizer 4.1.0's AdaHessian with its probes replaced by
fastopt's; the official equations of amirgholami/adahessian transcribed below), every backend, state
dicts, errors, bf16.  The fused update alone (given estimates) also runs in the zoo (tests/zoo_cases.py)."""
import copy
import math

import pytest
import torch

import fastopt
from conftest import DEVICE_BACKENDS
from fastopt.optim.adahessian import hutchinson_consume_, rademacher_probe_
from fastopt.reference import adahessian as ref

BACKENDS = [b for _, b in DEVICE_BACKENDS]


# -- the probes --------------------------------------------------------------------------------------

def _fmix32(h):
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def _probe_python(seed, index, step, sample, j):
    """One element of the probe, in plain Python ints (the formula of fastopt/reference/adahessian.py)."""
    inner = (index * 0x27D4EB2F + step * 0x165667B1 + sample * 0x85EBCA77) & 0xFFFFFFFF
    key = _fmix32((seed & 0xFFFFFFFF) ^ 0x3C6EF372 ^ _fmix32(inner))
    return -1.0 if _fmix32(((j & 0xFFFFFFFF) * 0x9E3779B1 & 0xFFFFFFFF) ^ key) >> 31 else 1.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_probe_values_balance_and_backends(backend, dtype):
    n = 20011
    out = torch.full((n,), 7.0, dtype=dtype)
    rademacher_probe_(out, seed=5, index=3, step=9, sample=1, backend=backend)
    want = ref.rademacher_probe(torch.empty(n, dtype=dtype), 5, 3, 9, 1)
    assert torch.equal(out, want)
    assert set(out.float().unique().tolist()) == {-1.0, 1.0}
    assert abs(float(out.float().mean())) < 4.0 / math.sqrt(n)  # balanced (4 sigma)
    for j in (0, 1, 4097, n - 1):
        assert float(out[j]) == _probe_python(5, 3, 9, 1, j)
    # another sample, step, tensor or seed: another stream (about half the signs differ)
    for kw in (dict(seed=5, index=3, step=9, sample=2), dict(seed=5, index=3, step=10, sample=1),
               dict(seed=5, index=4, step=9, sample=1), dict(seed=6, index=3, step=9, sample=1)):
        other = rademacher_probe_(torch.empty(n, dtype=dtype), backend=backend, **kw)
        assert 0.45 < float((other != out).float().mean()) < 0.55, kw


@pytest.mark.parametrize("backend", BACKENDS)
def test_probe_pieces_use_the_global_index(backend):
    whole = rademacher_probe_(torch.empty(37, 101), seed=1, index=0, step=3, sample=0, backend=backend)
    rows = [0, 5, 6, 20, 37]
    pieces = [rademacher_probe_(torch.empty(b - a, 101), seed=1, index=0, step=3, sample=0, offset=a * 101,
                                backend=backend) for a, b in zip(rows, rows[1:])]
    assert torch.equal(torch.cat(pieces), whole)
    # the low 32 bits of the index: an offset past 2^32 wraps as the kernels' uint32 does
    far = rademacher_probe_(torch.empty(64), seed=1, index=0, step=3, sample=0, offset=2 ** 32 - 10, backend=backend)
    assert [float(v) for v in far] == [_probe_python(1, 0, 3, 0, 2 ** 32 - 10 + j) for j in range(64)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_z", [True, False])
def test_consume_regenerates_the_probe(backend, use_z):
    gen = torch.Generator().manual_seed(0)
    hz = torch.randn(3001, generator=gen)
    key = ref.probe_key(2, 1, 4, 0)
    acc = torch.randn(3001, generator=gen)
    want = ref.consume_probe(hz, acc.clone(), key, 0.25, use_z, offset=17)
    got = hutchinson_consume_(hz, acc.clone(), seed=2, index=1, step=4, sample=0, scale=0.25, use_z=use_z,
                              accumulate=True, offset=17, backend=backend)
    assert torch.equal(got, want)
    z = ref.rademacher_probe(hz, 2, 1, 4, 0, offset=17)
    torch.testing.assert_close(want, acc + 0.25 * (z * hz if use_z else hz.abs()), rtol=0, atol=1e-6)
    bf = hz.bfloat16()  # in place over fp32 hz, and from bf16
    inplace = hz.clone()
    hutchinson_consume_(inplace, inplace, seed=2, index=1, step=4, sample=0, scale=0.5, use_z=use_z,
                        accumulate=False, offset=17, backend=backend)
    assert torch.equal(inplace, ref.consume_probe(hz, None, key, 0.5, use_z, offset=17))
    out = hutchinson_consume_(bf, torch.empty(3001), seed=2, index=1, step=4, sample=0, scale=0.5, use_z=use_z,
                              accumulate=False, offset=17, backend=backend)
    assert torch.equal(out, ref.consume_probe(bf, None, key, 0.5, use_z, offset=17))


def test_probe_wrappers_check_their_input():
    with pytest.raises(ValueError, match="contiguous"):
        rademacher_probe_(torch.empty(4, 6)[:, :3], seed=0, index=0, step=1, sample=0)
    with pytest.raises(TypeError, match="dtype"):
        rademacher_probe_(torch.empty(4, dtype=torch.int32), seed=0, index=0, step=1, sample=0)
    with pytest.raises(ValueError, match="offset"):
        rademacher_probe_(torch.empty(4), seed=0, index=0, step=1, sample=0, offset=-1)
    with pytest.raises(TypeError, match="dtype"):  # the estimate accumulates in fp32
        hutchinson_consume_(torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), seed=0, index=0, step=1, sample=0,
                            scale=1.0, use_z=True, accumulate=False)
    with pytest.raises(ValueError, match="shape"):
        hutchinson_consume_(torch.zeros(4), torch.zeros(5), seed=0, index=0, step=1, sample=0, scale=1.0,
                            use_z=True, accumulate=False)
    buf = torch.zeros(8)
    with pytest.raises(ValueError, match="overlap"):
        hutchinson_consume_(buf[:6], buf[2:], seed=0, index=0, step=1, sample=0, scale=1.0, use_z=True,
                            accumulate=False)


# -- a small model, its loss and the step loop --------------------------------------------------------

class Net(torch.nn.Module):
    """Conv2d (a 4-D kernel: the spatial averaging) and Linear layers of odd shapes, tanh (a nonzero
    Hessian almost everywhere)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.fc1 = torch.nn.Linear(4 * 3 * 4, 5)
        self.fc2 = torch.nn.Linear(5, 3)

    def forward(self, x):
        h = torch.tanh(self.conv(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(h)))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    return Net().to(dtype)


def _batch(k, dtype=torch.float32):
    gen = torch.Generator().manual_seed(100 + k)
    return torch.randn(6, 3, 5, 6, generator=gen).to(dtype), torch.randn(6, 3, generator=gen).to(dtype)


def _loss(model, k):
    x, y = _batch(k, next(model.parameters()).dtype)
    return ((model(x).float() - y.float()) ** 2).mean()


def _step(model, opt, k):
    opt.zero_grad()
    _loss(model, k).backward(create_graph=True)
    opt.step()


def _probes_for(params, seed, step, n_samples):
    """fastopt's probes of one step, in pytorch_optimizer's drawing order (sample, then parameter)."""
    return [ref.rademacher_probe(p, seed, i, step, s) for s in range(n_samples) for i, p in enumerate(params)]


# -- mode "pytorch_optimizer" vs pytorch_optimizer 4.1.0 -----------------------------------------------

PO_CASES = [
    dict(lr=0.01),
    dict(lr=0.01, update_period=3, num_samples=2, weight_decay=0.01),
    dict(lr=0.02, num_samples=3, weight_decay=0.01, weight_decouple=False, hessian_power=0.5, betas=(0.8, 0.99)),
    dict(lr=0.01, update_period=2, weight_decay=0.1, fixed_decay=True, maximize=True, eps=1e-8),
]


# (the Triton interpreter is slow: one case there, the one with update_period and num_samples > 1)
PO_RUNS = [(b, c) for b in BACKENDS for c in range(len(PO_CASES)) if b != "triton" or c == 1]


@pytest.mark.parametrize("backend,case", PO_RUNS)
def test_matches_pytorch_optimizer_step_for_step(backend, case, monkeypatch):
    from pytorch_optimizer import AdaHessian as Upstream

    kw = PO_CASES[case]
    mine, theirs = _net(), _net()
    opt = fastopt.AdaHessian(mine.parameters(), backend=backend, seed=3, **kw)
    up = Upstream(theirs.parameters(), **kw)
    queue = []

    def randint_like(p, low, high, *args, **kwargs):  # upstream's draw: randint_like(p, 0, 2) * 2.0 - 1.0
        assert (low, high) == (0, 2)
        z = queue.pop(0)
        assert z.shape == p.shape
        return (z + 1) / 2

    monkeypatch.setattr(torch, "randint_like", randint_like)
    n, period = kw.get("num_samples", 1), kw.get("update_period", 1)
    for k in range(12):
        if k % period == 0:
            queue.extend(_probes_for(list(theirs.parameters()), 3, k + 1, n))
        _step(mine, opt, k)
        up.zero_grad()
        _loss(theirs, k).backward(create_graph=True)
        up.step()
        assert not queue  # upstream drew exactly the probes of this step
        for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"step {k} {name}: {m}")
            sa, sb = opt.state[a], up.state[b]
            for key in ("exp_avg", "exp_hessian_diag_sq", "hessian"):
                torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6,
                                           msg=lambda m: f"step {k} {name} {key}: {m}")
    assert opt.param_groups[0]["step"] == up.param_groups[0]["step"] == 12


# -- mode "official" vs the official equations ------------------------------------------------------

def _official_steps(model, steps, *, lr, betas, eps, weight_decay, hessian_power, seed):
    """amirgholami/adahessian image_classification/optim_adahessian.py's step, transcribed (its probes
    replaced by fastopt's): |Hv| per element, the mean over dims (2, 3) of 4-D tensors, then
    ``p <- p - lr (m / bc1 / denom + wd p)`` with ``denom = sqrt(v)^k / sqrt(bc2)^k + eps``."""
    params = list(model.parameters())
    state = {p: dict(step=0, exp_avg=torch.zeros_like(p), exp_hessian_diag_sq=torch.zeros_like(p)) for p in params}
    for k in range(steps):
        for p in params:
            p.grad = None
        _loss(model, k).backward(create_graph=True)
        grads = [p.grad for p in params]
        vs = [ref.rademacher_probe(p, seed, i, k + 1, 0) for i, p in enumerate(params)]
        hvs = torch.autograd.grad(grads, params, grad_outputs=vs, only_inputs=True, retain_graph=True)
        traces = [hv.abs() if hv.dim() <= 2 else torch.mean(hv.abs(), dim=[2, 3], keepdim=True) for hv in hvs]
        with torch.no_grad():
            for p, grad, tr in zip(params, grads, traces):
                st = state[p]
                st["step"] += 1
                b1, b2 = betas
                st["exp_avg"].mul_(b1).add_(grad.detach(), alpha=1 - b1)
                st["exp_hessian_diag_sq"].mul_(b2).addcmul_(tr, tr, value=1 - b2)
                bc1, bc2 = 1 - b1 ** st["step"], 1 - b2 ** st["step"]
                denom = ((st["exp_hessian_diag_sq"].sqrt() ** hessian_power) / math.sqrt(bc2) ** hessian_power
                         ).add_(eps)
                p.data = p.data - lr * (st["exp_avg"] / bc1 / denom + weight_decay * p.data)
    return state


OFFICIAL_CASES = [dict(), dict(lr=0.05, weight_decay=0.01, hessian_power=0.5, betas=(0.85, 0.99))]


@pytest.mark.parametrize("backend,case", [(b, c) for b in BACKENDS for c in range(len(OFFICIAL_CASES))
                                          if b != "triton" or c == 1])
def test_official_mode_matches_the_official_equations(backend, case):
    kw = OFFICIAL_CASES[case]
    mine, theirs = _net(), _net()
    opt = fastopt.AdaHessian(mine.parameters(), mode="official", backend=backend, seed=11, **kw)
    assert (opt.defaults["lr"], opt.defaults["eps"]) == (kw.get("lr", 0.15), 1e-4)  # the official defaults
    for k in range(8):
        _step(mine, opt, k)
    full = dict(lr=0.15, betas=(0.9, 0.999), eps=1e-4, weight_decay=0.0, hessian_power=1.0)
    full.update(kw)
    state = _official_steps(theirs, 8, seed=11, **full)
    for (name, a), b in zip(mine.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
        torch.testing.assert_close(opt.state[a]["exp_hessian_diag_sq"], state[b]["exp_hessian_diag_sq"].expand_as(a),
                                   rtol=1e-5, atol=1e-9, msg=lambda m: f"{name} v: {m}")
    conv = opt.state[mine.conv.weight]["hessian"]  # averaged over each 3x3 kernel
    assert torch.equal(conv, conv[:, :, :1, :1].expand_as(conv)) and conv.abs().sum() > 0


# -- every backend against the torch backend, bf16, state dicts, closures --------------------------------

@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_match_the_torch_backend(backend, dtype):
    kw = dict(lr=0.01, update_period=2, num_samples=2, weight_decay=0.01)
    runs = {}
    for b in ("torch", backend):
        model = _net(dtype)
        opt = fastopt.AdaHessian(model.parameters(), backend=b, **kw)
        for k in range(5):
            _step(model, opt, k)
        runs[b] = (model, opt)
    (m0, o0), (m1, o1) = runs["torch"], runs[backend]
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1.6e-2, atol=1e-2)
    for a, b in zip(m0.parameters(), m1.parameters()):
        assert a.dtype == dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)
        for key in ("exp_avg", "exp_hessian_diag_sq", "hessian"):
            torch.testing.assert_close(o0.state[a][key].float(), o1.state[b][key].float(), **tol)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_bf16_master_weights_match_the_torch_backend(backend):
    runs = []
    for b in ("torch", backend):
        model = _net(torch.bfloat16)
        opt = fastopt.AdaHessian(model.parameters(), lr=0.01, mode="official", backend=b, master_weights=True)
        for k in range(4):
            _step(model, opt, k)
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    for a, b in zip(m0.parameters(), m1.parameters()):
        master = o1.state[b]["master_param"]
        assert master.dtype == torch.float32 and o1.state[b]["hessian"].dtype == torch.float32
        assert torch.equal(b, master.bfloat16())
        torch.testing.assert_close(master, o0.state[a]["master_param"], rtol=1e-5, atol=1e-6)
    # the master copies hold what bf16 cannot: the small steps are not lost to rounding
    assert any(not torch.equal(o1.state[b]["master_param"], b.float()) for b in m1.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
def test_state_dict_round_trip_and_closure(backend):
    kw = dict(lr=0.01, update_period=2, num_samples=2, mode="official")
    a, b = _net(), _net()
    oa = fastopt.AdaHessian(a.parameters(), backend=backend, **kw)
    ob = fastopt.AdaHessian(b.parameters(), backend=backend, **kw)
    for k in range(3):
        _step(a, oa, k)
        _step(b, ob, k)
    saved = copy.deepcopy(ob.state_dict())
    assert saved["param_groups"][0]["step"] == 3
    c = _net()
    c.load_state_dict(b.state_dict())
    oc = fastopt.AdaHessian(c.parameters(), backend=backend, **kw)
    oc.load_state_dict(saved)
    for k in range(3, 6):
        _step(a, oa, k)

        def closure(k=k):
            oc.zero_grad()
            loss = _loss(c, k)
            loss.backward(create_graph=True)
            return loss

        loss = oc.step(closure)
        assert float(loss) == pytest.approx(float(_loss(c, k).detach()), rel=0.5)
    for x, y in zip(a.parameters(), c.parameters()):
        assert torch.equal(x, y)  # the same probes, the same schedule (group step 3 -> 6)


def test_update_period_reuses_the_estimate():
    model = _net()
    opt = fastopt.AdaHessian(model.parameters(), lr=0.01, update_period=3, backend="cpu")
    seen = []
    for k in range(7):
        if k % 3 == 0:
            _step(model, opt, k)
        else:  # between two estimates no double backward runs: plain gradients do
            opt.zero_grad()
            _loss(model, k).backward()
            opt.step()
        seen.append(opt.state[model.fc1.weight]["hessian"].clone())
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[1], seen[2])
    assert not torch.equal(seen[2], seen[3]) and torch.equal(seen[3], seen[5]) and not torch.equal(seen[5], seen[6])


def test_given_hessian_and_unused_parameters():
    model = _net()
    extra = torch.nn.Parameter(torch.randn(4))  # its gradient does not depend on the parameters
    opt = fastopt.AdaHessian(list(model.parameters()) + [extra], lr=0.01, backend="cpu")
    opt.zero_grad()
    (_loss(model, 0) + (extra * torch.arange(4.0)).sum()).backward(create_graph=True)
    opt.step()
    assert torch.equal(opt.state[extra]["hessian"], torch.zeros(4))  # its Hessian block is 0
    params = list(model.parameters()) + [extra]
    given = [torch.full_like(p, 0.5) for p in params]
    before = [p.detach().clone() for p in params]
    opt.zero_grad()
    _loss(model, 1).backward()  # no graph needed with step(hessian=...)
    extra.grad = torch.ones(4)
    opt.step(hessian=given)
    for p in params:
        assert torch.equal(opt.state[p]["hessian"], torch.full_like(p, 0.5))
    assert all(not torch.equal(x, y) for x, y in zip(before, params))


# -- errors before any change -------------------------------------------------------------------------

def _snapshot(model, opt):
    return [p.detach().clone() for p in model.parameters()], copy.deepcopy(opt.state_dict())


def _unchanged(model, opt, snap):
    params, sd = snap
    assert all(torch.equal(a, b) for a, b in zip(params, model.parameters()))
    now = opt.state_dict()
    assert now["param_groups"][0]["step"] == sd["param_groups"][0]["step"]
    for k, st in sd["state"].items():
        for key, v in st.items():
            assert torch.equal(v, now["state"][k][key]), key


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_touch_nothing(backend):
    model = _net()
    opt = fastopt.AdaHessian(model.parameters(), lr=0.01, backend=backend)
    _step(model, opt, 0)
    snap = _snapshot(model, opt)
    opt.zero_grad()
    _loss(model, 1).backward()  # no create_graph
    with pytest.raises(RuntimeError, match="create_graph=True"):
        opt.step()
    _unchanged(model, opt, snap)
    with pytest.raises(ValueError, match="one tensor per parameter"):
        opt.step(hessian=[torch.ones(1)])
    with pytest.raises(ValueError, match="float tensor of its shape"):
        opt.step(hessian=[torch.ones(1)] * len(list(model.parameters())))
    _unchanged(model, opt, snap)
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt2 = fastopt.AdaHessian(emb.parameters(), backend=backend)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt2.step()
    assert not opt2.state


@pytest.mark.parametrize("kw,match", [
    (dict(lr=-1.0), "learning rate"), (dict(betas=(1.0, 0.9)), "beta"), (dict(eps=-1e-8), "epsilon"),
    (dict(weight_decay=-0.1), "weight_decay"), (dict(hessian_power=0.0), "hessian_power"),
    (dict(hessian_power=1.5), "hessian_power"), (dict(update_period=0), "update_period"),
    (dict(num_samples=0), "num_samples"), (dict(n_samples=2.0), "num_samples"), (dict(mode="fairseq"), "mode"),
    (dict(hessian_distribution="gaussian"), "rademacher"), (dict(seed=-1), "seed"),
    (dict(num_samples=2, n_samples=3), "alias"), (dict(update_period=2, update_each=3), "alias"),
])
def test_bad_hyperparameters(kw, match):
    with pytest.raises(ValueError, match=match):
        fastopt.AdaHessian(_net().parameters(), **kw)


def test_per_optimizer_options_must_agree_across_groups():
    model = _net()
    with pytest.raises(ValueError, match="per optimizer"):
        fastopt.AdaHessian([{"params": model.conv.parameters()}, {"params": model.fc1.parameters(), "num_samples": 2}])
    opt = fastopt.AdaHessian([{"params": model.conv.parameters()},
                              {"params": model.fc1.parameters(), "mode": "official", "lr": 0.05}])
    assert opt.param_groups[1]["eps"] == 1e-16  # the constructor's mode sets the defaults; a group's mode the math


def test_aliases_and_mode_defaults():
    opt = fastopt.AdaHessian(_net().parameters(), n_samples=3, update_each=4)
    g = opt.param_groups[0]
    assert (g["num_samples"], g["update_period"], g["lr"], g["eps"], g["average_conv_kernel"]) == (3, 4, 0.1, 1e-16,
                                                                                                  False)
    g = fastopt.AdaHessian(_net().parameters(), mode="official", single_gpu=False).param_groups[0]
    assert (g["lr"], g["eps"], g["average_conv_kernel"]) == (0.15, 1e-4, True)


def test_signatures_follow_upstream():
    """pytorch_optimizer's named arguments in its order (lr and eps: None = the mode's default, its
    defaults in the default mode); the official constructor's through AdaHessian.official."""
    import inspect

    from pytorch_optimizer import AdaHessian as Upstream

    def named(fn):
        return [(p.name, p.default) for p in inspect.signature(fn).parameters.values()
                if p.name not in ("self", "cls") and p.kind is p.POSITIONAL_OR_KEYWORD]

    theirs, ours = named(Upstream.__init__), named(fastopt.AdaHessian.__init__)
    assert [n for n, _ in ours] == [n for n, _ in theirs]
    for (name, mine), (_, up) in zip(ours, theirs):
        assert mine == up or (name in ("lr", "eps") and mine is None), name
    g = fastopt.AdaHessian(_net().parameters(), *[d for _, d in theirs[1:]]).param_groups[0]
    assert (g["lr"], g["eps"], g["num_samples"], g["update_period"]) == (0.1, 1e-16, 1, 1)
    official = [("params", inspect.Parameter.empty), ("lr", 0.15), ("betas", (0.9, 0.999)), ("eps", 1e-4),
                ("weight_decay", 0.0), ("hessian_power", 1.0), ("single_gpu", True)]
    assert named(fastopt.AdaHessian.official) == official
    g = fastopt.AdaHessian.official(_net().parameters(), 0.2, (0.8, 0.9), 1e-3, 0.01, 0.5).param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"], g["hessian_power"], g["mode"]) == (
        0.2, (0.8, 0.9), 1e-3, 0.01, 0.5, "official")


@pytest.mark.parametrize("mode", ref.MODES)
def test_the_estimate_is_the_reference_hutchinson(mode):
    """The optimizer's estimate (cpu kernels) is fastopt.reference.adahessian.hutchinson_reference's."""
    model = _net()
    params = list(model.parameters())
    _loss(model, 0).backward(create_graph=True)
    want = ref.hutchinson_reference(params, [p.grad for p in params], seed=4, indices=range(len(params)), step=1,
                                    n_samples=2, mode=mode, retain_graph=True)
    opt = fastopt.AdaHessian(params, lr=0.01, mode=mode, num_samples=2, seed=4, backend="cpu")
    opt.step()
    for p, d in zip(params, want):
        assert torch.equal(opt.state[p]["hessian"], d)
    conv = want[0]  # the conv kernel's estimate: constant over each 3x3 kernel in official mode only
    assert torch.equal(conv, conv[:, :, :1, :1].expand_as(conv)) == (mode == "official")


def test_pytorch_optimizer_checkpoint_loads_and_continues(monkeypatch):
    """A pytorch_optimizer AdaHessian state_dict (no per-parameter step; the group's) loads into
    fastopt.AdaHessian, which then steps as upstream does."""
    from pytorch_optimizer import AdaHessian as Upstream

    queue = []
    monkeypatch.setattr(torch, "randint_like", lambda p, low, high, *a, **k: (queue.pop(0) + 1) / 2)
    theirs = _net()
    up = Upstream(theirs.parameters(), lr=0.01, update_period=2)
    for k in range(6):
        if k % 2 == 0:
            queue.extend(_probes_for(list(theirs.parameters()), 0, k + 1, 1))
        if k == 3:
            mine = _net()
            mine.load_state_dict(theirs.state_dict())
            opt = fastopt.AdaHessian(mine.parameters(), lr=0.01, update_period=2, backend="cpu")
            opt.load_state_dict(copy.deepcopy(up.state_dict()))
        if k >= 3:
            _step(mine, opt, k)
        up.zero_grad()
        _loss(theirs, k).backward(create_graph=True)
        up.step()
    for a, b in zip(mine.parameters(), theirs.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert float(opt.state[a]["step"]) == 6


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_channels_last_conv_matches_the_torch_backend(backend):
    """A dense non-contiguous parameter (a channels_last conv kernel): the probes follow the logical
    index, the estimate and the states the parameter's memory layout."""
    runs = []
    for b in ("torch", backend):
        model = _net().to(memory_format=torch.channels_last)
        assert not model.conv.weight.is_contiguous()
        opt = fastopt.AdaHessian(model.parameters(), lr=0.01, mode="official", backend=b)
        for k in range(3):
            _step(model, opt, k)
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    for a, b in zip(m0.parameters(), m1.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(o0.state[a]["hessian"], o1.state[b]["hessian"], rtol=1e-5, atol=1e-6)
        assert o1.state[b]["hessian"].stride() == b.stride()
