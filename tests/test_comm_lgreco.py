"""L-GreCo (fastopt.comm.lgreco): the DP against a brute force over every choice, the policy's error and
size tables against direct computation, and the policy on 2 gloo ranks with fastopt.comm's hooks."""
import datetime
import itertools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastopt.comm.lgreco import LGreCo, lgreco_dp, svd_error


def _brute(e, s, budget):
    """The least total size over every choice with total error <= budget (None: nothing fits)."""
    best = None
    for ch in itertools.product(range(e.shape[1]), repeat=e.shape[0]):
        if math.fsum(e[l, c] for l, c in enumerate(ch)) <= budget:
            size = math.fsum(s[l, c] for l, c in enumerate(ch))
            best = size if best is None else min(best, size)
    return best


def _check(e, s, res, budget):
    assert len(res.choice) == e.shape[0]
    assert res.error == pytest.approx(math.fsum(e[l, c] for l, c in enumerate(res.choice)), rel=1e-12)
    assert res.size == math.fsum(s[l, c] for l, c in enumerate(res.choice))
    assert res.error <= budget  # always feasible


def test_dp_exact_on_integer_errors():
    rng = np.random.default_rng(0)
    for _ in range(150):
        L, C = int(rng.integers(3, 6)), int(rng.integers(3, 5))
        e = rng.integers(0, 40, (L, C)).astype(float)
        s = rng.integers(1, 200, (L, C)).astype(float)
        d = int(rng.integers(C))
        budget = math.fsum(e[:, d])  # the uniform setting's error
        res = lgreco_dp(e, s, budget, default=d)
        _check(e, s, res, budget)
        assert res.size == _brute(e, s, budget)  # exact: the same least size
        assert res.size <= math.fsum(s[:, d])  # never worse than uniform
        # the same integers on a coarser grid (width 1/4 of an error unit: still on the grid) stay exact
        res = lgreco_dp(e / 4, s, budget / 4, bins=int(budget) if budget else 1, default=d)
        assert res.size == _brute(e, s, budget)
        # any budget, not only the uniform one
        b = float(rng.integers(0, int(e.sum()) + 1))
        want = _brute(e, s, b)
        if want is None:
            with pytest.raises(ValueError, match="lgreco_dp: no choice"):
                lgreco_dp(e, s, b)
        else:
            assert lgreco_dp(e, s, b).size == want


def test_dp_within_a_bin_per_layer_on_real_errors():
    rng = np.random.default_rng(1)
    for trial in range(150):
        L, C = int(rng.integers(3, 6)), int(rng.integers(3, 5))
        e = rng.random((L, C)) * rng.choice([1e-3, 1.0, 1e3])
        s = rng.integers(1, 1000, (L, C)).astype(float)
        d = int(rng.integers(C))
        budget = math.fsum(e[:, d])
        bins = int(rng.choice([10, 50, 10_000]))
        res = lgreco_dp(e, s, budget, bins=bins, default=d)
        _check(e, s, res, budget)
        assert res.size >= _brute(e, s, budget)  # (feasible, so no better than the optimum)
        assert res.size <= math.fsum(s[:, d])  # the uniform setting is feasible: never worse
        # each layer's error rounds up by less than one bin: at least as good as the optimum of the budget
        # shrunk by one bin per layer
        tight = _brute(e, s, budget - L * budget / bins)
        if tight is not None:
            assert res.size <= tight
    # fine bins give the exact optimum on these tables (checked, not assumed: the brute force decides)
    e = rng.random((4, 4))
    s = rng.integers(1, 1000, (4, 4)).astype(float)
    gaps = sorted({abs(math.fsum(e[l, c] for l, c in enumerate(ch)) - math.fsum(e[:, 1]))
                   for ch in itertools.product(range(4), repeat=4)} - {0.0})
    res = lgreco_dp(e, s, math.fsum(e[:, 1]), bins=int(8 * math.fsum(e[:, 1]) / gaps[0]) + 10, default=1)
    assert res.size == _brute(e, s, math.fsum(e[:, 1]))


def test_dp_ties_and_inputs():
    # equal sizes: the smaller error wins; unavailable candidates (inf / nan) are never picked
    e = np.array([[3.0, 1.0, np.inf], [2.0, 2.0, np.nan]])
    s = np.array([[5.0, 5.0, 0.0], [1.0, 7.0, 0.0]])
    res = lgreco_dp(e, s, 10.0)
    assert res.choice == [1, 0] and res.size == 6.0 and res.error == 3.0
    assert lgreco_dp(torch.tensor(e), torch.tensor(s), torch.tensor(10.0)).choice == [1, 0]
    with pytest.raises(ValueError, match="lgreco_dp: errors .* same shape"):
        lgreco_dp(e, s[:, :2], 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: errors must be >= 0"):
        lgreco_dp(-e, s, 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: sizes must be finite"):
        lgreco_dp(np.ones((2, 2)), np.full((2, 2), np.inf), 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: budget"):
        lgreco_dp(e, s, -1.0)
    with pytest.raises(ValueError, match="lgreco_dp: bins"):
        lgreco_dp(e, s, 1.0, bins=0)
    with pytest.raises(ValueError, match="lgreco_dp: default"):
        lgreco_dp(e, s, 1.0, default=3)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        lgreco_dp([1.0, 2.0], [1.0, 2.0], 1.0)
    # a zero budget: only zero errors fit
    assert lgreco_dp([[0.0, 1.0], [2.0, 0.0]], [[9, 1], [1, 9]], 0).choice == [0, 1]


# -- the policy on a minimal state (single process): the statistics, the tables, the decision -------
class _State:
    """The part of a fastopt.comm state the policy uses (top-k: a density per layer)."""

    def __init__(self, density):
        self.observer, self.layer_settings, self.uniform_setting, self.process_group = None, None, density, None

    def set_layer_settings(self, settings):
        self.layer_settings = settings


def _topk_sq_error(kind, t, density):
    """||t - topk(t)||^2, directly: the smallest (1 - density) share of the squares."""
    k = max(1, int(density * t.numel()))
    return float(t.flatten().square().sort().values[: t.numel() - k].sum())


def _topk_bytes(kind, shape, density, world_size=1):
    return max(1, int(density * math.prod(shape))) * 8  # a value and an index


def test_policy_decides_from_the_last_steps_and_matches_the_brute_force():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((6, 5), (12,), (3, 7), (4, 4))]
    state = _State(0.25)
    seen = []
    state.observer = lambda p, g: seen.append(p)  # an observer already there keeps being called
    pol = LGreCo(state, params, candidates=[0.125, 0.25, 0.5], every=3, accumulate=2,
                 kind="topk", error_fn=_topk_sq_error, bytes_fn=_topk_bytes)
    grads = [[torch.randn(p.shape) * (1 + 5 * i) for i, p in enumerate(params)] for _ in range(3)]
    for step in range(3):
        assert pol.collecting() == (step >= 1)
        for p, g in zip(params[:3], grads[step]):  # the last parameter is never observed
            state.observer(p, g)
        assert pol.step() == (step == 2)
    assert len(seen) == 9 and state.layer_settings is not None
    # the statistics: the mean of the last 2 steps' gradients, layer by layer
    means = [(grads[1][i] + grads[2][i]) / 2 for i in range(3)]
    E = np.array([[math.sqrt(_topk_sq_error("topk", m, d)) for d in pol.candidates] for m in means])
    S = np.array([[_topk_bytes("topk", tuple(m.shape), d) for d in pol.candidates] for m in means])
    np.testing.assert_allclose(pol.last["errors"], E, rtol=1e-6)
    np.testing.assert_array_equal(pol.last["sizes"], S)
    budget = math.fsum(E[:, 1])
    assert pol.last["budget"] == pytest.approx(budget, rel=1e-6)
    # the decision: the brute force's least size over the policy's own tables, up to a bin per layer
    Ep, b = pol.last["errors"], pol.last["budget"]
    assert _brute(Ep, S, b) <= pol.last["size"] <= _brute(Ep, S, b - 3 * b / pol.bins)
    assert pol.last["error"] <= b
    assert pol.last["size"] < pol.last["uniform_size"]  # heterogeneous layers: fewer bytes than uniform
    assert set(map(id, state.layer_settings)) == {id(p) for p in params[:3]}
    for i, p in enumerate(params[:3]):
        assert state.layer_settings[p] == pol.candidates[pol.last["choice"][i]]
    # squared errors: the sum of squares is the budget
    pol2 = LGreCo(_State(0.25), params, candidates=[0.125, 0.25, 0.5], every=1, squared=True, kind="topk",
                  error_fn=_topk_sq_error, bytes_fn=_topk_bytes)
    E2, _ = pol2.errors_and_sizes(means)
    np.testing.assert_allclose(E2, E ** 2, rtol=1e-6)
    # the next period starts from nothing: no observation, no change
    before = dict(state.layer_settings)
    for _ in range(3):
        pol.step()
    assert state.layer_settings == before
    # state_dict / load_state_dict re-apply the same settings
    sd = pol.state_dict()
    other = _State(0.25)
    pol3 = LGreCo(other, params, candidates=[0.125, 0.25, 0.5], every=3, kind="topk",
                  error_fn=_topk_sq_error, bytes_fn=_topk_bytes)
    pol3.load_state_dict(sd)
    assert other.layer_settings == state.layer_settings and pol3.steps == pol.steps
    pol.remove()
    assert state.observer is not None and state.observer != pol._observe


def test_policy_validates():
    p = [torch.nn.Parameter(torch.zeros(3, 3))]
    kw = dict(kind="topk", error_fn=_topk_sq_error, bytes_fn=_topk_bytes)
    with pytest.raises(TypeError, match="LGreCo: state"):
        LGreCo(object(), p, **kw)
    with pytest.raises(ValueError, match="LGreCo: candidates .* uniform"):
        LGreCo(_State(0.25), p, candidates=[0.5, 1.0], **kw)
    with pytest.raises(ValueError, match="LGreCo: a top-k candidate"):
        LGreCo(_State(0.25), p, candidates=[0.25, 1.5], **kw)
    with pytest.raises(ValueError, match="LGreCo: every"):
        LGreCo(_State(0.25), p, every=0, **kw)
    with pytest.raises(TypeError, match="LGreCo: model_or_params"):
        LGreCo(_State(0.25), [], **kw)
    with pytest.raises(TypeError, match="LGreCo: cannot tell"):
        LGreCo(_State(0.25), p, error_fn=_topk_sq_error, bytes_fn=_topk_bytes)
    state = _State(0.25)
    with pytest.raises(ValueError, match="LGreCo: alpha"):
        LGreCo(state, p, alpha=0.0, **kw)
    assert state.observer is None  # nothing changed by a failed construction
    with pytest.raises(ValueError, match="LGreCo.load_state_dict"):
        LGreCo(state, p, **kw).load_state_dict({"steps": 1})
    # a failing measurement surfaces from step() (after the broadcast the other ranks wait in)
    def broken(kind, t, d):
        raise ValueError("broken error_fn")

    state = _State(0.25)
    pol = LGreCo(state, p, every=1, kind="topk", error_fn=broken, bytes_fn=_topk_bytes)
    state.observer(p[0], torch.ones(3, 3))
    with pytest.raises(ValueError, match="broken error_fn"):
        pol.step()
    assert state.layer_settings is None


# -- fastopt.comm's error and byte tables against direct computation ---------------------------------
def test_policy_tables_match_direct_computation():
    from fastopt import comm

    torch.manual_seed(3)
    tensors = [torch.randn(40, 24), torch.randn(300), torch.randn(16, 3, 3, 3)]
    # top-k: the smallest (1 - density) share of the squares, sent as fp32 values and int32 indices
    pol = LGreCo(comm.TopKState(None, density=0.05), [torch.nn.Parameter(t.clone()) for t in tensors])
    E, S = pol.errors_and_sizes(tensors)
    for l, t in enumerate(tensors):
        for c, d in enumerate(pol.candidates):
            k = math.ceil(d * t.numel())
            sq = t.flatten().double().square().sort().values
            assert E[l, c] == pytest.approx(math.sqrt(float(sq[: t.numel() - k].sum())), rel=1e-5)
            assert S[l, c] == 8 * k
    # QSGD: the expected error of stochastic rounding, chunk by chunk: sum (norm / s)^2 p (1 - p)
    state = comm.QSGDState(None, bits=4, bucket_size=64)
    with pytest.raises(ValueError, match="LGreCo: candidate 3 is not a setting the state accepts"):
        LGreCo(state, [torch.nn.Parameter(tensors[0].clone())], candidates=[3, 4])
    pol = LGreCo(state, [torch.nn.Parameter(t.clone()) for t in tensors], squared=True)
    assert pol.candidates == [2, 4, 8]
    E, S = pol.errors_and_sizes(tensors)
    for l, t in enumerate(tensors):
        for c, bits in enumerate(pol.candidates):
            s, want = 2.0 ** bits - 1, 0.0
            for chunk in t.flatten().double().split(64):
                nrm = float(chunk.norm())
                lev = chunk.abs() / nrm * s
                p = lev - lev.floor()
                want += float(((nrm / s) ** 2 * p * (1 - p)).sum())
            assert E[l, c] == pytest.approx(want, rel=1e-5)
            assert S[l, c] == comm.bytes_for("qsgd", tuple(t.shape), bits, bucket_size=64)
    assert (S[:, 0] < S[:, 1]).all() and (S[:, 1] < S[:, 2]).all() and (E[:, 0] > E[:, 1]).all()
    # PowerSGD: one power iteration's rank-r error is at least the best rank-r error (Eckart-Young) and 0 on
    # a matrix of rank <= r; vectors and matrices not worth compressing are sent whole (no error)
    low = torch.randn(40, 3) @ torch.randn(3, 24)
    mats = [tensors[0], low, tensors[2], tensors[1]]
    pol = LGreCo(comm.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2),
                 [torch.nn.Parameter(t.clone()) for t in mats], squared=True)
    assert pol.candidates == list(range(2, 9))
    E, S = pol.errors_and_sizes(mats)
    for l, t in enumerate(mats[:3]):
        m = t.reshape(t.shape[0], -1)
        sv = torch.linalg.svdvals(m.double()).square()
        for c, r in enumerate(pol.candidates):
            n, k = m.shape
            if (n + k) * r * 2 < n * k:
                assert E[l, c] >= float(sv[r:].sum()) * (1 - 1e-5)
                assert S[l, c] == 4 * (n + k) * r
            else:
                assert E[l, c] == 0 and S[l, c] == 4 * n * k
    assert (E[1, 1:] <= 1e-6 * float(low.square().sum())).all()  # rank 3: exact from rank 3 on
    assert (E[3] == 0).all() and (S[3] == 4 * 300).all()
    # the official code's SVD error method: the error of the truncated SVD, reconstructed
    pol_svd = LGreCo(comm.PowerSGDState(None, matrix_approximation_rank=4, start_powerSGD_iter=2),
                     [torch.nn.Parameter(t.clone()) for t in mats], squared=True, error_fn=svd_error)
    Esvd, Ssvd = pol_svd.errors_and_sizes(mats)
    np.testing.assert_array_equal(Ssvd, S)
    for l, t in enumerate(mats[:3]):
        m = t.reshape(t.shape[0], -1).double()
        u, sv, vh = torch.linalg.svd(m, full_matrices=False)
        for c, r in enumerate(pol_svd.candidates):
            n, k = m.shape
            want = float((m - u[:, :r] @ torch.diag(sv[:r]) @ vh[:r]).square().sum()) if (n + k) * r * 2 < n * k else 0
            assert Esvd[l, c] == pytest.approx(want, rel=1e-6, abs=1e-9)
            assert Esvd[l, c] <= E[l, c] * (1 + 1e-5) + 1e-9  # the best rank-r error: no power iteration beats it
    with pytest.raises(ValueError, match="svd_error: only for kind 'powersgd'"):
        svd_error("topk", mats[0], 0.1)


# -- the policy driving fastopt.comm's hooks on 2 gloo ranks ------------------------------------------
WORLD, STEPS, EVERY = 2, 20, 5
KINDS = ("powersgd", "topk")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 96), torch.nn.Tanh(), torch.nn.Linear(96, 64), torch.nn.Tanh(),
                               torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))


def _train(kind, adaptive, rank):
    from fastopt import comm

    model = torch.nn.parallel.DistributedDataParallel(_net())
    if kind == "powersgd":
        state, hook = comm.PowerSGDState(None, matrix_approximation_rank=2, start_powerSGD_iter=2), comm.powersgd_hook
    else:
        state, hook = comm.TopKState(None, density=0.1), comm.topk_hook
    model.register_comm_hook(state, hook)
    policy = LGreCo(state, model, every=EVERY, accumulate=2) if adaptive else None
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(5)
    teacher = torch.nn.Linear(32, 8)
    gen = torch.Generator().manual_seed(100 + rank)  # each rank its own data
    params = list(model.module.parameters())
    opts = dict(min_compression_rate=2) if kind == "powersgd" else {}
    out = dict(losses=[], sent=[], settings=[], predicted=[], decisions=[])
    for _ in range(STEPS):
        x = torch.randn(64, 32, generator=gen)
        loss = (model(x) - teacher(x).detach()).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        out["losses"].append(loss.item())
        out["sent"].append(state.bytes_sent)
        if policy is not None and policy.step():
            out["settings"].append([state.setting_of(p) for p in params])
            # the bytes of the next step, predicted from fastopt.comm.bytes_for with the new settings
            out["predicted"].append(sum(comm.bytes_for(kind, tuple(p.shape), state.setting_of(p), **opts)
                                        for p in params))
            if rank == 0:
                out["decisions"].append({k: policy.last[k] for k in ("size", "uniform_size", "error", "budget")})
    del model  # (a DDP module left to the interpreter's exit can hang in its destructor)
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.save({(k, a): _train(k, a, rank) for k in KINDS for a in (False, True)}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_policy_on_two_gloo_ranks(tmp_path):
    mp.start_processes(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True,
                       start_method="spawn")
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD))
    for kind in KINDS:
        uni, ada, ada1 = r0[(kind, False)], r0[(kind, True)], r1[(kind, True)]
        assert len(ada["settings"]) == STEPS // EVERY
        assert ada["settings"] == ada1["settings"]  # every rank applies rank 0's decision
        assert ada["sent"] == ada1["sent"]
        for d, (at, pred) in enumerate(zip(range(EVERY, STEPS, EVERY), ada["predicted"])):
            assert ada["sent"][at] == pred  # the hook sends what bytes_for predicted for the new settings
        for dec in ada["decisions"]:
            assert dec["error"] <= dec["budget"] and dec["size"] <= dec["uniform_size"]
        # fewer bytes than uniform once the policy has decided, and training still converges
        assert sum(ada["sent"][EVERY:]) < sum(uni["sent"][EVERY:])
        assert ada["losses"][-1] < 0.4 * ada["losses"][0]
        assert ada["losses"][-1] < 1.25 * uni["losses"][-1]
