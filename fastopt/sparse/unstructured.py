"""Unstructured sparsity inside the optimizer step, prune-style: :class:`RandomSparsity` and
:class:`MagnitudeSparsity`, accepted by a param group's ``sparsity`` (beside ``NMSparsity``) of fastopt's
elementwise optimizers (``fastopt.ElementwiseAdamW``, Lion, Adan, AdaBelief, ...), and
:func:`unstructured_param_groups` for layer-wise densities (``erk_densities``, ``layer_adaptive_densities``).

Unlike N:M sparse training there is no dense copy: the parameter itself holds the sparse weights.  After
every step the pruned entries of the parameter and of every optimizer state are exactly 0 (the kernels
write 0 there and do not use those gradients): one step equals the dense step of the same optimizer
followed by zeroing the pruned weights and states.

* ``RandomSparsity(density, seed=0)``: the mask of the paper *The Unreasonable Effectiveness of Random
  Pruning* (Liu et al. 2022), drawn from fastopt's counter-based hash of (seed, the parameter's index in
  the optimizer, the element's index in the whole tensor) -- no mask tensor is stored, and every backend,
  and every FSDP2 shard (``sr_offsets``), draws the same mask (:mod:`fastopt.reference.unstructured`).
  The parameter's index is its position in the optimizer's parameter order (as ``state_dict`` numbers it).
* ``MagnitudeSparsity(density, scope="layer"|"global", refresh_every=None)``: keeps the largest ``|w|``
  (``torch.nn.utils.prune.l1_unstructured`` / ``global_unstructured`` with ``amount = 1 - density``:
  :func:`fastopt.sparse.select.magnitude_masks`), one threshold per parameter or one across the group's
  parameters stepped together (one device and dtype).  The mask (``state["sparse_mask"]``, bool) is
  computed at the first step (before it) and, with ``refresh_every=k``, recomputed after every ``k``-th
  step: that step is dense (pruned entries restart from 0 with zero states and get one update), then the
  new mask is taken from ``|w|`` and applied to the weights and states.

The first step (or ``optimizer.sparsify()``, which may come before the first forward) masks the parameter
and any existing state.  ``state["sparse_step"]`` counts a parameter's steps.  Checkpoints store the
schedules as plain dicts (``torch.load(weights_only=True)`` works).

Not supported (refused with an error when the group is added): low-bit states (``state_bits``), the int8
weights of ``Int8Linear``, DTensor parameters with ``MagnitudeSparsity`` (the threshold spans shards) or
with shards that are not row ranges; combining with ``NMSparsity``.  ``master_weights=True`` works (the
step runs on the fp32 copy, then copy and parameter are masked), as do ops with a reduce pass (LAMB,
AdamP, ...: the step, then the masking).
"""
import math
import numbers
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Mapping, Optional, Sequence, Union

import torch

from .. import _ops, _sharded
from ..lowbit.layouts import Int8Weights
from ..reference.unstructured import prune_key, prune_threshold, random_keep_mask

__all__ = ["RandomSparsity", "MagnitudeSparsity", "unstructured_param_groups", "UnstructuredSparsity"]

_SCOPES = ("layer", "global")


def _density(cls, value):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{cls}: density must be a float in (0, 1), got {type(value).__name__}")
    if not (0.0 < float(value) < 1.0):
        raise ValueError(f"{cls}: density must be in (0, 1) (the kept fraction; 1.0 is dense: give the parameters "
                         f"no sparsity), got {value!r}")


class UnstructuredSparsity:
    """Base of the prune-style schedules (checkpoint format, parameter checks)."""

    STATE_KEY = ""

    def to_state(self) -> Dict[str, Dict[str, Any]]:
        """The schedule as a plain dict (what a fastopt optimizer's ``state_dict()`` stores)."""
        return {self.STATE_KEY: asdict(self)}

    @classmethod
    def from_saved(cls, value: Any) -> Optional["UnstructuredSparsity"]:
        """The schedule a :meth:`to_state` dict describes, or None when ``value`` is not such a dict."""
        if not (isinstance(value, dict) and len(value) == 1):
            return None
        for kind in (RandomSparsity, MagnitudeSparsity):
            if kind.STATE_KEY in value and isinstance(value[kind.STATE_KEY], dict):
                saved = value[kind.STATE_KEY]
                unknown = set(saved) - {f.name for f in fields(kind)}
                if unknown:
                    raise ValueError(f"{kind.__name__}: the checkpoint's schedule has unknown fields {sorted(unknown)}")
                return kind(**saved)
        return None

    def check_param(self, p: torch.Tensor, who: str) -> None:
        """Raise (TypeError, ValueError, NotImplementedError) when ``p`` cannot be trained with this schedule."""
        kind = type(self).__name__
        if Int8Weights.is_weight(p):
            raise TypeError(f"{who}: the int8 weights of Int8Linear cannot be trained with {kind}")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{who}: {kind} needs real floating-point parameters, got {p.dtype}")
        self.check_shards(p, who)

    def check_shards(self, p: torch.Tensor, who: str) -> None:
        """Raise NotImplementedError for a DTensor this schedule cannot step exactly."""


@dataclass(frozen=True)
class RandomSparsity(UnstructuredSparsity):
    """Random unstructured sparsity: each element of a parameter is kept with probability ``density``
    (in (0, 1)), by the hash of (``seed``, the parameter's index in the optimizer, the element's index),
    the same on every backend and world size (see the module doc).  ``seed``: an int in [0, 2**32)."""

    density: float
    seed: int = 0

    STATE_KEY = "fastopt.RandomSparsity"

    def __post_init__(self):
        _density("RandomSparsity", self.density)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2 ** 32:
            raise ValueError(f"RandomSparsity: seed must be an int in [0, 2**32), got {self.seed!r}")

    @property
    def threshold(self) -> int:
        """``floor(density * 2**32)``: the kernels keep an element whose hash is below it."""
        return prune_threshold(self.density)

    def key(self, index: int) -> int:
        """The mask key of the optimizer's parameter number ``index``."""
        return prune_key(self.seed, index)

    def mask(self, shape: Sequence[int], index: int, offset: int = 0,
             device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
        """The bool keep-mask of (a piece starting at element ``offset`` of) parameter ``index``."""
        return random_keep_mask(shape, self.seed, index, self.density, offset, device)

    def check_shards(self, p: torch.Tensor, who: str) -> None:
        if _sharded.is_dtensor(p) and not _sharded.row_sharded(p):
            raise NotImplementedError(
                f"{who}: RandomSparsity of a DTensor {_sharded.describe_placement(p)}: the mask is keyed on the "
                "element's index in the whole tensor, which needs shards that are row ranges (Shard(0) or "
                "Replicate placements, as fully_shard makes)")


@dataclass(frozen=True)
class MagnitudeSparsity(UnstructuredSparsity):
    """Magnitude pruning: keep the ``density`` fraction (in (0, 1)) of largest ``|w|`` per parameter
    (``scope="layer"``) or across the group's parameters stepped together (``scope="global"``); the
    mask is computed at the first step and recomputed after every ``refresh_every``-th step (None: never;
    see the module doc).  Masks equal ``torch.nn.utils.prune``'s (ties: the lowest flat index kept)."""

    density: float
    scope: str = "layer"
    refresh_every: Optional[int] = None

    STATE_KEY = "fastopt.MagnitudeSparsity"

    def __post_init__(self):
        _density("MagnitudeSparsity", self.density)
        if self.scope not in _SCOPES:
            raise ValueError(f"MagnitudeSparsity: scope must be 'layer' or 'global', got {self.scope!r}")
        r = self.refresh_every
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r < 1):
            raise ValueError(f"MagnitudeSparsity: refresh_every must be None or an int >= 1, got {r!r}")

    def refresh(self, t: int) -> bool:
        """Whether the step taken after ``t`` steps (``t + 1``-th) is dense and followed by a new mask."""
        return self.refresh_every is not None and (t + 1) % self.refresh_every == 0

    def masks(self, weights: List[torch.Tensor]) -> List[torch.Tensor]:
        """Keep-masks of ``weights`` (:func:`fastopt.sparse.select.magnitude_masks`)."""
        from .select import magnitude_masks

        return magnitude_masks([w.detach() for w in weights], self.density, scope=self.scope)

    def check_shards(self, p: torch.Tensor, who: str) -> None:
        if _sharded.is_dtensor(p):
            raise NotImplementedError(
                f"{who}: MagnitudeSparsity of a DTensor {_sharded.describe_placement(p)}: the magnitude threshold "
                "spans every shard; use RandomSparsity, or prune the unsharded model")


def check_unstructured_group(owner: str, group: Dict[str, Any]) -> None:
    """Raise (before any state changes) when ``group`` cannot be trained with its unstructured sparsity."""
    sp = group["sparsity"]
    bits = group.get("state_bits")
    if bits not in (None, 0, 32, "32", "fp32"):
        raise ValueError(f"{owner}: {type(sp).__name__} does not support low-bit states (state_bits={bits!r}): the "
                         "pruned entries of every state are written 0 by the full-precision step; drop state_bits")
    for p in group["params"]:
        sp.check_param(p, owner)


def unstructured_param_groups(model: torch.nn.Module, densities: Union[float, Mapping[str, float]],
                              kind: str = "random", **options: Any) -> List[Dict[str, Any]]:
    """Param groups that train ``model`` unstructured sparse, one group per distinct density::

        d = fastopt.sparse.erk_densities(model, 0.1)                  # {parameter name: density}
        opt = fastopt.ElementwiseAdamW(unstructured_param_groups(model, d, "random", seed=0), lr=1e-3)

    ``densities``: a float (every parameter with two or more dims -- the weights of linear and
    convolution layers -- gets it; the rest stays dense) or ``{name: density}`` keyed by
    ``model.named_parameters()`` names (what ``erk_densities`` / ``layer_adaptive_densities`` return);
    parameters it does not name, and density 1.0, are dense.  ``kind``: ``"random"``
    (:class:`RandomSparsity`; option ``seed``) or ``"magnitude"`` (:class:`MagnitudeSparsity`; options
    ``scope``, ``refresh_every``).  The other ``options`` (``weight_decay=0.1``, ...) go into every
    sparse group.  Parameters without ``requires_grad`` are left out.
    """
    who = "unstructured_param_groups"
    if kind not in ("random", "magnitude"):
        raise ValueError(f"{who}: kind must be 'random' or 'magnitude', got {kind!r}")
    keys = ("seed",) if kind == "random" else ("scope", "refresh_every")
    sp_kwargs = {k: options.pop(k) for k in keys if k in options}
    cls = RandomSparsity if kind == "random" else MagnitudeSparsity
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if isinstance(densities, Mapping):
        names = {n for n, _ in model.named_parameters()}
        unknown = sorted(set(densities) - names)
        if unknown:
            raise ValueError(f"{who}: densities name parameters the model does not have: {unknown[:5]}")
        wanted = dict(densities)
    elif isinstance(densities, numbers.Real) and not isinstance(densities, bool):
        wanted = {n: densities for n, p in named if p.dim() >= 2}
    else:
        raise TypeError(f"{who}: densities must be a float or a {{parameter name: density}} dict, got "
                        f"{type(densities).__name__}")
    for n, d in wanted.items():
        if isinstance(d, bool) or not isinstance(d, numbers.Real) or not 0.0 < float(d) <= 1.0:
            raise ValueError(f"{who}: the density of {n!r} must be in (0, 1], got {d!r}")
    by_density: Dict[float, List[torch.Tensor]] = {}
    dense: List[torch.Tensor] = []
    for n, p in named:
        d = float(wanted.get(n, 1.0))
        (dense if d == 1.0 else by_density.setdefault(d, [])).append(p)
    groups = [dict(params=ps, sparsity=cls(d, **sp_kwargs), **options) for d, ps in by_density.items()]
    if dense:
        groups.append({"params": dense})
    return groups


# -- the step (used by fastopt.sparse.training.NMSparseTraining) ---------------------------------------
STEP_KEY, MASK_KEY = "sparse_step", "sparse_mask"


def _param_index(optimizer, p) -> int:
    """``p``'s position in the optimizer's parameter order (state_dict's numbering)."""
    cache = optimizer.__dict__.get("_unstructured_index")
    sizes = tuple(len(g["params"]) for g in optimizer.param_groups)
    if cache is None or cache[0] != sizes:
        order = {}
        for g in optimizer.param_groups:
            for q in g["params"]:
                order.setdefault(id(q), len(order))
        cache = (sizes, order)
        optimizer.__dict__["_unstructured_index"] = cache
    return cache[1][id(p)]


def _state_tensors(p, state):
    """The tensors of ``state`` that are per element of ``p`` (the op's states, the master copy)."""
    return [v for k, v in state.items() if torch.is_tensor(v) and k != MASK_KEY and v.shape == p.shape
            and v.numel() > 0 and (v.numel() > 1 or k != "step")]


def _keep_masks(optimizer, sp, params, states):
    """The bool keep-masks of ``params`` (local shards for DTensors)."""
    if isinstance(sp, MagnitudeSparsity):
        return [_sharded.local(s[MASK_KEY]) for s in states]
    out = []
    for p in params:
        lp = _sharded.local(p)
        offset = _sharded.flat_offset(p) if _sharded.is_dtensor(p) else 0
        out.append(sp.mask(lp.shape, _param_index(optimizer, p), offset, lp.device))
    return out


def _apply(params, states, masks, with_states=True):
    """Zero the pruned entries of the params and their per-element states (local shards)."""
    for p, s, m in zip(params, states, masks):
        for t in [p] + (_state_tensors(p, s) if with_states else []):
            lt = _sharded.local(t)
            torch.where(m, lt, torch.zeros((), dtype=lt.dtype, device=lt.device), out=lt)


def enter(optimizer, group, params, states):
    """Make ``params`` (not yet sparse) sparse: their masks (MagnitudeSparsity: from ``|w|`` now) and the
    pruned entries of the weights and states zeroed."""
    sp = group["sparsity"]
    if isinstance(sp, MagnitudeSparsity):
        weights = [s.get("master_param", p) for p, s in zip(params, states)]
        for s, m in zip(states, sp.masks(weights)):
            s[MASK_KEY] = m
    _apply(params, states, _keep_masks(optimizer, sp, params, states))
    for s in states:
        s.setdefault(STEP_KEY, 0)


def step(optimizer, group, params, grads, backend, grad_scale, found_inf):
    """One step of prune-style sparse ``params`` (one bucket of ``group``)."""
    sp = group["sparsity"]
    states = [optimizer.state[p] for p in params]
    for p, s in zip(params, states):
        if not s:
            optimizer._init_state(group, p, s)
    fresh = [i for i, s in enumerate(states) if STEP_KEY not in s]
    if fresh:
        enter(optimizer, group, [params[i] for i in fresh], [states[i] for i in fresh])
    calls: Dict[tuple, List[int]] = {}
    for i, s in enumerate(states):
        refresh = isinstance(sp, MagnitudeSparsity) and sp.refresh(s[STEP_KEY])
        calls.setdefault((refresh, s[STEP_KEY] if refresh else -1), []).append(i)
    for (refresh, _), idx in calls.items():
        ps, gs, ss = [params[i] for i in idx], [grads[i] for i in idx], [states[i] for i in idx]
        if refresh:  # dense step, then the new mask from |w|
            optimizer._step_float(group, ps, gs, ss, backend, grad_scale, found_inf)
            if found_inf is None or float(found_inf) == 0.0:
                enter_refresh(optimizer, group, ps, ss)
        elif optimizer._fused_sparse_ok(group, ps, ss, backend):
            optimizer._add_missing_states(group, ps, ss)
            if isinstance(sp, RandomSparsity):
                offsets = _sharded.sr_offsets(ps) if _sharded.is_dtensor(ps[0]) else []
                prune = dict(sparse_prune=2, sparse_keys=[sp.key(_param_index(optimizer, p)) for p in ps],
                             sparse_threshold=sp.threshold, sr_offsets=offsets)
            else:
                prune = dict(sparse_prune=1, sparse_mask=[s[MASK_KEY] for s in ss])
            _run_fused(optimizer, group, ps, gs, ss, backend, grad_scale, found_inf, prune)
        else:
            optimizer._step_float(group, ps, gs, ss, backend, grad_scale, found_inf)
            _apply(ps, ss, _keep_masks(optimizer, sp, ps, ss))
        for s in ss:
            s[STEP_KEY] += 1


def _run_fused(optimizer, group, params, grads, states, backend, grad_scale, found_inf, prune):
    """One kernel call of the optimizer's op with the prune-style epilogue (what ElementwiseOptimizer._run
    does for a one-call op; an op whose _run does more -- use_gc, cautious, a reduce pass -- is not fused:
    _fused_sparse_ok is False for it)."""
    hyper, flags = optimizer._native_hyper(group)
    lists = [s[name] for name in optimizer._state_names(group) for s in states]
    _ops.elementwise_unchecked(
        optimizer._op_name(group), params, grads, lists, [s["step"] for s in states], hyper, flags, lr=group["lr"],
        maximize=group["maximize"], grad_scale=grad_scale, found_inf=found_inf, backend=backend,
        device=params[0].device, seed=group.get("seed", 0), stochastic=optimizer._stochastic(group, params[0]),
        **prune)


def enter_refresh(optimizer, group, params, states):
    """After a dense refresh step: new magnitude masks, then the pruned weights and states zeroed."""
    sp = group["sparsity"]
    weights = [s.get("master_param", p) for p, s in zip(params, states)]
    for s, m in zip(states, sp.masks(weights)):
        s[MASK_KEY].copy_(m)
    _apply(params, states, [s[MASK_KEY] for s in states])


def sparsify(optimizer, group) -> None:
    """``optimizer.sparsify()`` for one group: every parameter not yet sparse becomes sparse now."""
    params = [p for p in group["params"] if STEP_KEY not in optimizer.state[p]]
    if not params:
        return
    states = [optimizer.state[p] for p in params]
    for p, s in zip(params, states):
        if not s:
            optimizer._init_state(group, p, s)
    enter(optimizer, group, params, states)
