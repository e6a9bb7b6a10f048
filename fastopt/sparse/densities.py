"""Layer-wise densities for unstructured sparse training: the Erdős–Rényi-Kernel rule and the
layer-adaptive rate-distortion allocation.

    dens = fastopt.sparse.erk_densities(model, 0.1)                       # {param name: density}
    dens = fastopt.sparse.layer_adaptive_densities(model, 0.1, calib)     # probes the model, then a DP

Both return ``{parameter name: density}`` with the names of ``model.named_parameters()``, for the
prunable parameters only: by default the ``weight`` of every ``nn.Linear`` and convolution
(``nn.Conv1d/2d/3d`` and the transposed ones); ``include(name, module)`` (``layers`` for the
layer-adaptive rule, which also takes a list of names) chooses others.  A parameter shared by several
modules appears once, under its ``named_parameters()`` name.

:func:`erk_densities` is the ERK rule of Liu et al. 2022, *The Unreasonable Effectiveness of Random
Pruning: Return of the Most Naive Baseline for Sparse Training* (ICLR), with the algorithm of the
paper's code (VITA-Group/Random_Pruning, ``CIFAR/sparselearning/core.py``, ``Masking.init``, branch
``'ERK'``; ``ImageNet/core.py`` has the same).  A layer of shape ``(d_1, ..., d_k)`` (kernel dims
included) gets the raw probability ``((d_1 + ... + d_k) / (d_1 * ... * d_k)) ** erk_power_scale``;
the densities are ``epsilon * raw`` with ``epsilon`` chosen so that the kept parameters total
``density * total``; while ``epsilon * max(raw) > 1`` every layer whose raw probability equals that
maximum becomes dense (density 1.0, counted whole in the budget) and ``epsilon`` is solved again.
(Upstream chooses its layers differently: every parameter but those whose name contains ``bias`` and
the BatchNorm weights, so LayerNorm weights and embeddings too; ``include`` reproduces that, see the
tests.)

:func:`layer_adaptive_densities` is the allocation of Xu et al. 2023, *Efficient Joint Optimization of
Layer-Adaptive Weight Pruning in Deep Neural Networks* (ICCV; official code Akimoto-Cris/RD_PRUNE,
``tools/pruners.py`` ``gen_rd_curves`` and ``tools/algo.py`` ``dp_pruning``): for every prunable
layer ``l`` and pruning level (density) ``s``, the layer alone is magnitude-pruned to ``s`` (its
``round((1 - s) * n)`` smallest ``|w|`` zeroed, the count of ``torch.nn.utils.prune.l1_unstructured``
with ``amount = 1 - s``) and the output distortion ``d_l(s)`` is the mean squared difference of the
model's outputs on the calibration batches against the dense model's (upstream's
``((Y - Y_hat) ** 2).mean()``; ``worst_case=True``: upstream's ``--worst_case_curve``, the largest
per-sample mean).  Under the paper's additivity assumption the total distortion is
``sum_l d_l(s_l)``, which a dynamic program over the layers minimizes exactly subject to
``sum_l kept_l(s_l) <= floor(target * total)``, the state being the number of kept parameters (exact
while that budget is at most ``max_states``; beyond, counts are measured in units of
``ceil(budget / max_states)`` parameters, each layer's count rounded up and the budget down, so the
choice still fits the budget).  The default levels are upstream's grid (``--maxsps 100``) without
its 0.00: densities ``0.01, ..., 1.00``.  Upstream may prune a layer entirely; fastopt's sparse
schedules (``RandomSparsity``, ``MagnitudeSparsity``, ``unstructured_param_groups``) take densities in
(0, 1], so the default does not prune a layer whole (pass ``levels`` with 0.0 to allow it).  The returned
density of a layer is the fraction its chosen level keeps, ``kept / n`` (so ``round(density * n)`` and ``l1_unstructured(amount=1 - density)`` give the
same count).  Upstream's iterative mode (levels restricted to at least the current sparsity of each
layer) is not reproduced: each call is one-shot from the current weights.
"""
import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["erk_densities", "layer_adaptive_densities", "DEFAULT_LEVELS"]

DEFAULT_LEVELS: Tuple[float, ...] = tuple(k / 100 for k in range(1, 101))

_PRUNABLE = (nn.Linear, nn.modules.conv._ConvNd)


def _default_include(name: str, module: nn.Module) -> bool:
    return isinstance(module, _PRUNABLE) and name.rsplit(".", 1)[-1] == "weight"


def _fraction(fn: str, what: str, value, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{fn}: {what} must be a float in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    value = float(value)
    low_ok = value >= 0.0 if allow_zero else value > 0.0
    if not (low_ok and value <= 1.0):  # NaN fails here too
        raise ValueError(f"{fn}: {what} must be in {'[0' if allow_zero else '(0'}, 1], got {value!r}")
    return value


def _prunable(fn: str, model, include) -> List[Tuple[str, nn.Parameter]]:
    """[(name, parameter)] of the chosen parameters, in ``model.named_parameters()`` order."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    names = {id(p): n for n, p in model.named_parameters()}
    order = {n: i for i, n in enumerate(names.values())}
    if include is None:
        include = _default_include
    elif isinstance(include, (str, bytes)) or not (callable(include) or isinstance(include, Iterable)):
        raise TypeError(f"{fn}: the layer choice must be a callable (name, module) -> bool or a list of "
                        f"parameter names, got {include!r}")
    elif not callable(include):
        wanted = list(include)
        for n in wanted:
            if n not in order:
                raise ValueError(f"{fn}: {n!r} is not a name of model.named_parameters()")
        chosen = set(wanted)
        include = lambda name, module: name in chosen  # noqa: E731
    picked = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = names.get(id(p))
            if name is None or name in picked:
                continue
            if include(name, module):
                picked[name] = p
    if not picked:
        raise ValueError(f"{fn}: the model has no prunable parameters (by default the weights of nn.Linear "
                         f"and nn.Conv*d layers)")
    out = sorted(picked.items(), key=lambda kv: order[kv[0]])
    for name, p in out:
        if p.dim() == 0 or p.numel() == 0:
            raise ValueError(f"{fn}: parameter {name!r} has shape {tuple(p.shape)}; prunable parameters need "
                             f"at least one dimension and one element")
    return out


# -- ERK -----------------------------------------------------------------------------------------------
def erk_densities(model: nn.Module, density: float, *, erk_power_scale: float = 1.0,
                  include: Optional[Callable[[str, nn.Module], bool]] = None) -> Dict[str, float]:
    """Per-layer densities of the Erdős–Rényi-Kernel rule (see the module doc), the algorithm of
    VITA-Group/Random_Pruning's ``Masking.init(mode='ERK')``.

    ``density`` in (0, 1]: the overall fraction of kept parameters over the prunable layers,
    ``sum(d_l * n_l) == density * sum(n_l)`` up to rounding.  ``erk_power_scale``: the exponent of the
    raw probabilities (1.0: ERK; 0.0: uniform).  ``include(name, module) -> bool`` chooses the layers
    (``name`` a ``model.named_parameters()`` name, ``module`` the module holding it); default: the
    weights of ``nn.Linear`` and convolutions.  Returns ``{name: density}`` with densities in (0, 1];
    layers that would exceed 1 are dense (1.0).  Nothing in the model changes.
    """
    fn = "erk_densities"
    density = _fraction(fn, "density", density)
    if isinstance(erk_power_scale, bool) or not isinstance(erk_power_scale, (int, float)) \
            or not math.isfinite(erk_power_scale):
        raise ValueError(f"{fn}: erk_power_scale must be a finite float, got {erk_power_scale!r}")
    if include is not None and not callable(include):
        raise TypeError(f"{fn}: include must be a callable (name, module) -> bool, got {include!r}")
    layers = [(name, tuple(p.shape)) for name, p in _prunable(fn, model, include)]
    power = float(erk_power_scale)

    raw = {name: (sum(shape) / math.prod(shape)) ** power for name, shape in layers}
    dense = set()
    while True:
        budget = 0.0   # kept parameters left to the sparse layers
        weighted = 0.0  # sum of raw * n over the sparse layers
        for name, shape in layers:
            n = math.prod(shape)
            if name in dense:
                budget -= n * (1.0 - density)
            else:
                budget += n * density
                weighted += raw[name] * n
        sparse = [name for name, _ in layers if name not in dense]
        if not sparse:  # only at density ~ 1 (upstream would fail on an empty max)
            epsilon = 0.0
            break
        epsilon = budget / weighted
        top = max(raw[name] for name in sparse)
        if top * epsilon > 1.0:
            dense.update(name for name in sparse if raw[name] == top)
        else:
            break
    return {name: 1.0 if name in dense else epsilon * raw[name] for name, _ in layers}


# -- layer-adaptive (rate-distortion) -----------------------------------------------------------------
def _kept(level: float, n: int) -> int:
    """Parameters kept by magnitude pruning to ``level``: torch.nn.utils.prune's count for amount 1 - level."""
    return n - round((1.0 - level) * n)


def _default_forward(model, batch):
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _outputs(fn, model, batches, forward):
    out = []
    for batch in batches:
        y = forward(model, batch)
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"{fn}: forward(model, batch) must return a tensor, got {type(y).__name__} "
                            f"(pass forward= to pick one)")
        out.append(y.detach())
    return out


def _distortion(fn, ref, got, worst_case):
    if worst_case:
        worst = None
        for r, g in zip(ref, got):
            if r.dim() == 0:
                raise ValueError(f"{fn}: worst_case needs outputs with a batch dimension")
            d = (g.double() - r.double()).pow(2).reshape(r.shape[0], -1).mean(dim=1).max()
            worst = d if worst is None else torch.maximum(worst, d)
        return float(worst)
    total = 0.0
    count = 0
    for r, g in zip(ref, got):
        if r.shape != g.shape:
            raise ValueError(f"{fn}: the model's output changed shape while probing ({tuple(r.shape)} -> "
                             f"{tuple(g.shape)})")
        total += float((g.double() - r.double()).pow(2).sum())
        count += r.numel()
    return total / count


def _distortion_table(model, layers, levels, batches, forward, worst_case, fn="layer_adaptive_densities"):
    """``table[l][j]`` = output distortion with layer ``l`` alone pruned to ``levels[j]``.

    Runs under no_grad with the model in eval mode; every weight and every module's mode are restored
    exactly afterwards (also on an error)."""
    modes = [(m, m.training) for m in model.modules()]
    saved = []
    try:
        model.eval()
        with torch.no_grad():
            ref = _outputs(fn, model, batches, forward)
            table = []
            for name, p in layers:
                orig = p.detach().clone()
                saved.append((p, orig))
                n = p.numel()
                mag = orig.abs().reshape(-1)
                row = []
                for level in levels:
                    k = n - _kept(level, n)
                    if k == 0:
                        row.append(0.0)
                        continue
                    flat = p.view(-1) if p.is_contiguous() else None
                    idx = torch.topk(mag, k, largest=False, sorted=False).indices
                    if flat is not None:
                        flat[idx] = 0
                    else:
                        pruned = orig.reshape(-1).clone()
                        pruned[idx] = 0
                        p.copy_(pruned.view_as(p))
                    row.append(_distortion(fn, ref, _outputs(fn, model, batches, forward), worst_case))
                    p.copy_(orig)
                saved.pop()
                table.append(row)
    finally:
        with torch.no_grad():
            for p, orig in saved:
                p.copy_(orig)
        for m, training in modes:
            m.training = training
    return table


def _dp_choose(costs: Sequence[Sequence[int]], dists: Sequence[Sequence[float]], budget: int) -> List[int]:
    """The level index per layer minimizing ``sum_l dists[l][j_l]`` subject to
    ``sum_l costs[l][j_l] <= budget`` (exact DP over the integer budget; ties: the first level)."""
    best = torch.zeros(budget + 1, dtype=torch.float64)   # no layer yet: distortion 0 for any budget
    choices = []
    for c_row, d_row in zip(costs, dists):
        new = torch.full((budget + 1,), math.inf, dtype=torch.float64)   # new[b]: these layers, kept <= b
        pick = torch.zeros(budget + 1, dtype=torch.int32)
        for j, (c, d) in enumerate(zip(c_row, d_row)):
            if c > budget:
                continue
            cand = best[: budget + 1 - c] + d
            tail = new[c:]
            better = cand < tail                 # strict: ties keep the first level
            torch.minimum(tail, cand, out=tail)
            pick[c:].masked_fill_(better, j)
        best = new
        choices.append(pick)
    if not math.isfinite(float(best[budget])):
        raise ValueError("layer_adaptive_densities: no choice of levels fits the budget")
    out = []
    b = budget
    for l in range(len(costs) - 1, -1, -1):
        j = int(choices[l][b])
        out.append(j)
        b -= costs[l][j]
    return out[::-1]


def layer_adaptive_densities(model: nn.Module, target: float, calib_batches: Iterable, *,
                             levels: Sequence[float] = DEFAULT_LEVELS,
                             layers: Union[None, Iterable[str], Callable[[str, nn.Module], bool]] = None,
                             forward: Optional[Callable] = None, worst_case: bool = False,
                             max_states: int = 100_000) -> Dict[str, float]:
    """Per-layer densities minimizing the additive output distortion under a parameter budget (Xu et
    al. 2023, see the module doc).

    ``target`` in (0, 1]: kept parameters <= ``floor(target * total)`` over the chosen layers.
    ``calib_batches``: an iterable of model inputs, or of tuples ``(input, ...)`` (the default forward
    is ``model(batch)``, ``model(batch[0])`` for a tuple/list); it is read once into a list.
    ``forward(model, batch) -> tensor``: how to run a batch.  ``levels``: the candidate densities in
    [0, 1] (default: 0.01, 0.02, ..., 1.00).  ``layers``: None (the weights of nn.Linear and
    convolutions), a list of ``named_parameters()`` names, or ``include(name, module) -> bool``.
    ``worst_case``: distortion = the largest per-sample mean squared difference instead of the mean.
    ``max_states``: the DP's largest exact budget (see the module doc).

    The model is probed under ``torch.no_grad()`` in eval mode (``len(layers) * len(levels)`` passes
    over the batches); its weights and modes are restored exactly.  Returns ``{name: kept / n}``.
    """
    fn = "layer_adaptive_densities"
    target = _fraction(fn, "target", target)
    if isinstance(levels, (str, bytes)) or not isinstance(levels, Iterable):
        raise TypeError(f"{fn}: levels must be a sequence of densities in [0, 1], got {levels!r}")
    levels = [_fraction(fn, "every level", s, allow_zero=True) for s in levels]
    if not levels:
        raise ValueError(f"{fn}: levels is empty")
    if len(set(levels)) != len(levels):
        raise ValueError(f"{fn}: levels has repeated values: {levels}")
    levels.sort()
    if forward is None:
        forward = _default_forward
    elif not callable(forward):
        raise TypeError(f"{fn}: forward must be a callable (model, batch) -> tensor, got {forward!r}")
    if not isinstance(worst_case, bool):
        raise TypeError(f"{fn}: worst_case must be a bool, got {worst_case!r}")
    if isinstance(max_states, bool) or not isinstance(max_states, int) or max_states < 1:
        raise ValueError(f"{fn}: max_states must be an int >= 1, got {max_states!r}")
    chosen = _prunable(fn, model, layers)
    if isinstance(calib_batches, torch.Tensor) or not isinstance(calib_batches, Iterable):
        raise TypeError(f"{fn}: calib_batches must be an iterable of batches (a list of tensors, a "
                        f"DataLoader), got {type(calib_batches).__name__}")
    batches = list(calib_batches)
    if not batches:
        raise ValueError(f"{fn}: calib_batches is empty")

    sizes = [p.numel() for _, p in chosen]
    kept = [[_kept(s, n) for s in levels] for n in sizes]
    exact_budget = math.floor(target * sum(sizes) + 1e-6)  # 0.29 * 100 -> 29
    unit = max(1, -(-exact_budget // max_states))
    budget = exact_budget // unit
    costs = [[-(-k // unit) for k in row] for row in kept]
    if sum(min(row) for row in costs) > budget:
        raise ValueError(f"{fn}: even the sparsest levels keep more than target * total = {exact_budget} "
                         f"parameters (levels {levels[0]}..{levels[-1]})")

    table = _distortion_table(model, chosen, levels, batches, forward, worst_case, fn)
    if not all(math.isfinite(d) for row in table for d in row):
        raise ValueError(f"{fn}: a distortion is not finite (the model's outputs on the calibration batches "
                         f"are not finite)")
    picks = _dp_choose(costs, table, budget)
    return {name: kept[l][j] / sizes[l] for l, ((name, _), j) in enumerate(zip(chosen, picks))}
