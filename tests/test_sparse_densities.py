"""Layer-wise densities (fastopt/sparse/densities.py): the ERK rule against a float64 transcription of
the paper's code, the layer-adaptive DP against brute force, its distortion table against
torch.nn.utils.prune, exact restoration of the probed model, input errors before any change."""
import copy
import itertools
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from fastopt.sparse import erk_densities, layer_adaptive_densities
from fastopt.sparse.densities import DEFAULT_LEVELS, _distortion_table, _dp_choose, _kept


# -- the upstream ERK, transcribed ---------------------------------------------------------------------
def upstream_mask_shapes(model):
    """The layers Random_Pruning's Masking.add_module keeps (CIFAR/sparselearning/core.py): every
    named_parameters() entry, minus remove_weight_partial_name('bias') (any name containing 'bias'),
    minus remove_type(nn.BatchNorm2d / nn.BatchNorm1d) (the module name + '.weight')."""
    masks = OrderedDict((n, tuple(p.shape)) for n, p in model.named_parameters())
    for n in list(masks):
        if "bias" in n:
            masks.pop(n)
    for mname, m in model.named_modules():
        if isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            if mname in masks:
                masks.pop(mname)
            elif mname + ".weight" in masks:
                masks.pop(mname + ".weight")
    return masks


def upstream_erk(masks, density, erk_power_scale=1.0):
    """VITA-Group/Random_Pruning, CIFAR/sparselearning/core.py, Masking.init, the mode == 'ERK' branch
    (same in ImageNet/core.py), in numpy float64 without the mask drawing."""
    dense_layers = set()
    while True:
        divisor = 0
        rhs = 0
        raw_probabilities = {}
        for name, shape in masks.items():
            n_param = np.prod(shape)
            n_zeros = n_param * (1 - density)
            n_ones = n_param * density
            if name in dense_layers:
                rhs -= n_zeros
            else:
                rhs += n_ones
                raw_probabilities[name] = (np.sum(shape) / np.prod(shape)) ** erk_power_scale
                divisor += raw_probabilities[name] * n_param
        epsilon = rhs / divisor
        max_prob = np.max(list(raw_probabilities.values()))
        if max_prob * epsilon > 1:
            for mask_name, mask_raw_prob in raw_probabilities.items():
                if mask_raw_prob == max_prob:
                    dense_layers.add(mask_name)
        else:
            break
    return {name: 1.0 if name in dense_layers else float(epsilon * raw_probabilities[name]) for name in masks}


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 16, 3, bias=False)
        self.c3 = nn.Conv2d(16, 16, 1)
        self.fc1 = nn.Linear(16 * 4, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.bn(self.c1(x)))
        x = torch.relu(self.c3(torch.relu(self.c2(x))))
        x = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return self.fc2(torch.relu(self.fc1(x)))


def mlp():
    return nn.Sequential(nn.Linear(784, 300), nn.ReLU(), nn.Linear(300, 100), nn.ReLU(), nn.Linear(100, 10))


class TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(100, 32)
        self.block = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.ln = nn.LayerNorm(32)
        self.head = nn.Linear(32, 100)

    def forward(self, x):
        return self.head(self.ln(self.block(self.emb(x))))


def upstream_include(name, module):
    return "bias" not in name and not isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d))


def default_shapes(model):
    """The default choice: the weights of Linear and Conv modules."""
    out = OrderedDict()
    names = {id(p): n for n, p in model.named_parameters()}
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            out[names[id(m.weight)]] = tuple(m.weight.shape)
    return OrderedDict(sorted(out.items(), key=lambda kv: list(names.values()).index(kv[0])))


def check_erk_properties(dens, shapes, density):
    n = {k: math.prod(s) for k, s in shapes.items()}
    total = sum(n.values())
    assert abs(sum(dens[k] * n[k] for k in dens) - density * total) <= 1.0
    assert all(0.0 < d <= 1.0 for d in dens.values()), dens
    raw = {k: sum(s) / math.prod(s) for k, s in shapes.items()}
    for a, b in itertools.combinations(dens, 2):   # higher raw probability (smaller layer): denser
        if raw[a] > raw[b]:
            assert dens[a] >= dens[b]
        elif raw[b] > raw[a]:
            assert dens[b] >= dens[a]


@pytest.mark.parametrize("make", [SmallCNN, mlp, TinyTransformer])
@pytest.mark.parametrize("density,power", [(0.05, 1.0), (0.1, 1.0), (0.3, 0.5), (0.5, 1.0), (0.9, 1.0)])
def test_erk_matches_upstream(make, density, power):
    torch.manual_seed(0)
    model = make()
    # upstream's own layer choice, through include=
    masks = upstream_mask_shapes(model)
    ours = erk_densities(model, density, erk_power_scale=power, include=upstream_include)
    ref = upstream_erk(masks, density, power)
    assert list(ours) == list(ref)
    for k in ref:
        assert math.isclose(ours[k], ref[k], rel_tol=1e-13), (k, ours[k], ref[k])
        assert (ours[k] == 1.0) == (ref[k] == 1.0)
    check_erk_properties(ours, masks, density)
    # the default choice: Linear / Conv weights only
    shapes = default_shapes(model)
    ours = erk_densities(model, density, erk_power_scale=power)
    ref = upstream_erk(shapes, density, power)
    assert list(ours) == list(shapes)
    for k in ref:
        assert math.isclose(ours[k], ref[k], rel_tol=1e-13), (k, ours[k], ref[k])
    check_erk_properties(ours, shapes, density)


def test_erk_dense_layers_and_names():
    model = mlp()
    d = erk_densities(model, 0.5)
    assert list(d) == ["0.weight", "2.weight", "4.weight"]
    assert d["4.weight"] == 1.0 and d["0.weight"] < 0.5   # the small last layer is made dense
    # the transformer with upstream's choice: the LayerNorm weights (raw probability 1) go dense together
    t = TinyTransformer()
    d = erk_densities(t, 0.3, include=upstream_include)
    assert {k for k, v in d.items() if v == 1.0} >= {"block.norm1.weight", "block.norm2.weight", "ln.weight"}
    assert "block.self_attn.in_proj_weight" in d and "emb.weight" in d
    assert "block.self_attn.out_proj.weight" in erk_densities(t, 0.3)   # NonDynamicallyQuantizableLinear
    # power 0: uniform
    for v in erk_densities(SmallCNN(), 0.2, erk_power_scale=0.0).values():
        assert math.isclose(v, 0.2, rel_tol=1e-12)
    # density 1: everything dense (upstream fails on an empty max there)
    assert all(math.isclose(v, 1.0, rel_tol=1e-12) for v in erk_densities(SmallCNN(), 1.0).values())


def test_erk_tied_weights_once():
    a, b = nn.Linear(6, 6), nn.Linear(6, 6)
    b.weight = a.weight
    model = nn.Sequential(a, b, nn.Linear(6, 2))
    d = erk_densities(model, 0.4)
    assert list(d) == [n for n, _ in model.named_parameters() if n.endswith("weight")] == ["0.weight", "2.weight"]


def test_erk_input_errors():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    for bad in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="^erk_densities"):
            erk_densities(model, bad)
    for bad in (True, "0.1", None):
        with pytest.raises(TypeError, match="^erk_densities"):
            erk_densities(model, bad)
    with pytest.raises(ValueError, match="^erk_densities: erk_power_scale"):
        erk_densities(model, 0.1, erk_power_scale=float("inf"))
    with pytest.raises(ValueError, match="^erk_densities: the model has no prunable"):
        erk_densities(nn.Sequential(nn.ReLU(), nn.LayerNorm(4)), 0.1)
    with pytest.raises(ValueError, match="^erk_densities: the model has no prunable"):
        erk_densities(model, 0.1, include=lambda n, m: False)
    with pytest.raises(TypeError, match="^erk_densities: include"):
        erk_densities(model, 0.1, include=["0.weight"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# -- layer-adaptive: the DP -----------------------------------------------------------------------------
def brute_force(costs, dists, budget):
    best, arg, count = math.inf, None, 0
    for combo in itertools.product(*[range(len(r)) for r in costs]):
        if sum(costs[l][j] for l, j in enumerate(combo)) > budget:
            continue
        v = sum(dists[l][j] for l, j in enumerate(combo))
        if v < best:
            best, arg = v, combo
    for combo in itertools.product(*[range(len(r)) for r in costs]):   # how many optima
        if sum(costs[l][j] for l, j in enumerate(combo)) <= budget:
            count += sum(dists[l][j] for l, j in enumerate(combo)) == best
    return best, arg, count


def test_dp_matches_brute_force_random_tables():
    g = torch.Generator().manual_seed(1)
    checked_unique = 0
    for trial in range(40):
        nl, nv = (3, 5) if trial % 2 else (4, 4)
        costs = torch.randint(0, 30, (nl, nv), generator=g).tolist()
        dists = torch.rand(nl, nv, generator=g, dtype=torch.float64).tolist()
        budget = int(torch.randint(sum(min(r) for r in costs), sum(max(r) for r in costs) + 1, (1,), generator=g))
        picks = _dp_choose(costs, dists, budget)
        assert sum(costs[l][j] for l, j in enumerate(picks)) <= budget
        best, arg, count = brute_force(costs, dists, budget)
        assert sum(dists[l][j] for l, j in enumerate(picks)) == best
        if count == 1:
            assert tuple(picks) == arg
            checked_unique += 1
    assert checked_unique >= 30


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3)
        self.c2 = nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1))


def tiny_mlp():
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 10),
                         nn.Tanh(), nn.Linear(10, 4))


def model_and_batches(kind):
    torch.manual_seed(3)
    if kind == "conv":
        return TinyConv(), [torch.randn(6, 2, 6, 6) for _ in range(2)]
    return tiny_mlp(), [torch.randn(7, 8), torch.randn(5, 8)]


@pytest.mark.parametrize("kind,levels", [("conv", (0.0, 0.25, 0.5, 0.75, 1.0)), ("mlp", (0.1, 0.4, 0.7, 1.0))])
@pytest.mark.parametrize("target", [0.3, 0.55])
def test_layer_adaptive_matches_brute_force_on_real_tables(kind, levels, target):
    model, batches = model_and_batches(kind)
    out = layer_adaptive_densities(model, target, batches, levels=levels)
    layers = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    assert list(out) == [n for n, _ in layers]
    table = _distortion_table(model, layers, sorted(levels), batches, lambda m, b: m(b), False)
    sizes = [p.numel() for _, p in layers]
    costs = [[_kept(s, n) for s in sorted(levels)] for n in sizes]
    budget = math.floor(target * sum(sizes))
    best, arg, count = brute_force(costs, table, budget)
    picks = [[c / n for c in row].index(out[name]) for (name, _), row, n in zip(layers, costs, sizes)]
    assert sum(costs[l][j] for l, j in enumerate(picks)) <= budget
    assert sum(table[l][j] for l, j in enumerate(picks)) == best
    if count == 1:
        assert tuple(picks) == arg
    assert len(set(picks)) > 1 or kind == "mlp"   # not a uniform answer on the conv net


def direct_distortions(model, name, level, batches):
    """Prune one layer with torch.nn.utils.prune on a copy; the mean squared output difference and the
    largest per-sample mean (upstream's --worst_case_curve)."""
    pruned = copy.deepcopy(model).eval()
    module = pruned.get_submodule(name.rsplit(".", 1)[0])
    prune.l1_unstructured(module, "weight", amount=1.0 - level)
    with torch.no_grad():
        y = torch.cat([model.eval()(b) for b in batches]).double()
        yh = torch.cat([pruned(b) for b in batches]).double()
    sq = (y - yh) ** 2
    return float(sq.mean()), float(sq.mean(dim=1).max())


@pytest.mark.parametrize("kind", ["conv", "mlp"])
def test_distortion_table_matches_torch_prune(kind):
    model, batches = model_and_batches(kind)
    layers = [(n, p) for n, p in model.named_parameters() if n.endswith("weight")]
    levels = [0.0, 0.2, 0.5, 0.9, 1.0]
    tables = [_distortion_table(model, layers, levels, batches, lambda m, b: m(b), worst) for worst in (False, True)]
    for l, (name, _) in enumerate(layers):
        for j, level in enumerate(levels):
            refs = direct_distortions(model, name, level, batches)
            for table, ref in zip(tables, refs):
                assert math.isclose(table[l][j], ref, rel_tol=1e-9, abs_tol=0.0), (name, level, table[l][j], ref)
        for table in tables:
            assert table[l][-1] == 0.0 and table[l][0] > 0.0


def test_distortion_additive_on_disjoint_outputs():
    """Two heads writing disjoint output columns: the joint distortion is exactly the sum (the paper's
    additivity assumption holds with equality)."""
    torch.manual_seed(5)

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 3), nn.Linear(8, 5)

        def forward(self, x):
            return torch.cat([self.a(x), self.b(x)], dim=1)

    model, batches = TwoHeads(), [torch.randn(9, 8), torch.randn(4, 8)]
    layers = [("a.weight", model.a.weight), ("b.weight", model.b.weight)]
    levels = [0.25, 0.5, 0.75]
    table = _distortion_table(model, layers, levels, batches, lambda m, b: m(b), False)
    for i, j in itertools.product(range(3), range(3)):
        pruned = copy.deepcopy(model)
        prune.l1_unstructured(pruned.a, "weight", amount=1 - levels[i])
        prune.l1_unstructured(pruned.b, "weight", amount=1 - levels[j])
        with torch.no_grad():
            joint = float(torch.cat([(pruned(x).double() - model(x).double()) ** 2 for x in batches]).mean())
        assert math.isclose(joint, table[0][i] + table[1][j], rel_tol=1e-9)


def test_layer_adaptive_restores_model_exactly():
    model, batches = model_and_batches("conv")
    model.train()
    model.c2.eval()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    params = list(model.parameters())
    state = {k: v.clone() for k, v in model.state_dict().items()}
    grads = [p.grad.clone() for p in params]
    modes = [m.training for m in model.modules()]
    seen = []

    def fwd(m, b):
        seen.append(m.training)
        return m(b)

    layer_adaptive_densities(model, 0.4, batches, levels=(0.0, 0.5, 1.0), forward=fwd)
    assert seen and not any(seen)   # probed in eval mode
    assert list(model.parameters()) == params
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, params))
    assert [m.training for m in model.modules()] == modes
    assert all(p.requires_grad for p in params)

    calls = []

    def failing(m, b):   # fails in the middle of probing: still restored
        calls.append(1)
        if len(calls) == 6:
            raise RuntimeError("boom")
        return m(b)

    with pytest.raises(RuntimeError, match="boom"):
        layer_adaptive_densities(model, 0.4, batches, levels=(0.0, 0.5, 1.0), forward=failing)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert [m.training for m in model.modules()] == modes


def test_layer_adaptive_budget_levels_and_batches():
    model, batches = model_and_batches("mlp")
    sizes = {n: p.numel() for n, p in model.named_parameters() if n.endswith("weight")}
    total = sum(sizes.values())
    for target in (0.05, 0.2, 0.5, 1.0):
        out = layer_adaptive_densities(model, target, batches, levels=(0.0, 0.1, 0.3, 0.6, 1.0))
        kept = sum(round(out[n] * sizes[n]) for n in sizes)
        assert kept <= math.floor(target * total + 1e-6)
        assert all(0.0 <= v <= 1.0 for v in out.values())
    assert all(v == 1.0 for v in out.values())   # target 1: nothing pruned
    # the discretized DP (unit > 1) still fits the budget
    out = layer_adaptive_densities(model, 0.3, batches, levels=(0.0, 0.1, 0.3, 0.6, 1.0), max_states=7)
    assert sum(round(out[n] * sizes[n]) for n in sizes) <= math.floor(0.3 * total)
    # (input, label) tuples: the default forward takes the first element
    tupled = [(x, torch.zeros(len(x))) for x in batches]
    assert layer_adaptive_densities(model, 0.3, tupled, levels=(0.0, 0.5, 1.0)) == \
        layer_adaptive_densities(model, 0.3, iter(batches), levels=(0.0, 0.5, 1.0))
    # a names list picks the layers
    out = layer_adaptive_densities(model, 0.3, batches, levels=(0.0, 0.5, 1.0), layers=["2.weight", "0.weight"])
    assert list(out) == ["0.weight", "2.weight"]
    assert DEFAULT_LEVELS == tuple(k / 100 for k in range(1, 101))  # upstream's grid without 0 (no layer pruned whole)


def test_layer_adaptive_input_errors_before_any_change():
    model, batches = model_and_batches("mlp")
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def fwd(m, b):
        calls.append(1)
        return m(b)

    def bad(exc, match, *args, **kw):
        kw.setdefault("forward", fwd)
        with pytest.raises(exc, match="^layer_adaptive_densities: " + match):
            layer_adaptive_densities(*args, **kw)

    for t in (0.0, -1.0, 1.01, float("nan")):
        bad(ValueError, "target", model, t, batches)
    bad(TypeError, "target", model, None, batches)
    bad(ValueError, "calib_batches is empty", model, 0.5, [])
    bad(ValueError, "calib_batches is empty", model, 0.5, iter([]))
    bad(TypeError, "calib_batches", model, 0.5, batches[0])
    bad(ValueError, "the model has no prunable", nn.Sequential(nn.Tanh()), 0.5, batches)
    bad(ValueError, "the model has no prunable", model, 0.5, batches, layers=lambda n, m: False)
    bad(ValueError, "'nope' is not a name", model, 0.5, batches, layers=["nope"])
    bad(ValueError, "levels has repeated", model, 0.5, batches, levels=(0.5, 0.5))
    bad(ValueError, "levels is empty", model, 0.5, batches, levels=())
    bad(ValueError, "every level", model, 0.5, batches, levels=(0.5, 1.2))
    bad(ValueError, "even the sparsest levels", model, 0.2, batches, levels=(0.5, 1.0))
    bad(TypeError, "forward", model, 0.5, batches, forward=3)
    bad(ValueError, "max_states", model, 0.5, batches, max_states=0)
    assert not calls
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with pytest.raises(TypeError, match="^layer_adaptive_densities: forward.*must return a tensor"):
        layer_adaptive_densities(model, 0.5, batches, levels=(0.5, 1.0), forward=lambda m, b: (m(b),))
    with pytest.raises(ValueError, match="^layer_adaptive_densities: a distortion is not finite"):
        layer_adaptive_densities(model, 0.5, batches, levels=(0.5, 1.0), forward=lambda m, b: m(b) / 0.0)
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
