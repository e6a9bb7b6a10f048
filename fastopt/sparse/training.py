"""N:M sparse training inside the optimizer step: the schedule (:class:`NMSparsity`) and the step
(:class:`NMSparseTraining`, which fastopt's elementwise optimizers compose) that keeps the state
(the dense weights, the mask) in the optimizer.

A parameter group with ``"sparsity": NMSparsity(...)`` of any fastopt elementwise optimizer (Lion,
Adan, AdaBelief, DiffGrad, EXAdam, Lamb, AdamP, SGDP, SGD-SaI, ``fastopt.lowbit.AdamW8bit`` /
``ElementwiseAdamW``) trains its weights N:M sparse:

* the optimizer keeps the dense weights ``W`` (``state["dense_param"]``, or the fp32
  ``state["master_param"]`` with ``master_weights=True``) and the current mask
  (``state["nm_mask"]``, bool);
* the parameter itself holds what the forward uses, ``W * (mask + (1 - mask) * beta)``: exactly
  N:M sparse when ``beta == 0``;
* the gradient of that parameter is used as the gradient of ``W`` (straight-through), plus
  ``lambda * (1 - mask) * W`` (SR-STE);
* after the update the mask is recomputed from ``|W|`` every ``refresh_every`` steps (and whenever
  the pattern changes), and the parameter is rewritten.

Recipes (the ``recipe`` field):

* ``"ste"``: binary mask, plain straight-through gradient;
* ``"sr-ste"``: binary mask, ``grad += srste_lambda * (1 - mask) * W`` (Zhou et al. 2021, "Learning
  N:M fine-grained structured sparse neural networks from scratch"; lambda = 2e-4 there);
* ``"decay"``: the mask-decay gradient flow (MDGF) of Bambhaniya et al. 2024, "Progressive Gradient
  Flow for Robust N:M Sparsity Training in Transformers": pruned weights enter the forward scaled by
  ``beta(t) = max(1 - decay_coef * t, 0)`` (``decay="linear"``) or ``exp(-decay_coef * t)``
  (``decay="exp"``), ``t`` counting steps since the dense phase ended; plain straight-through gradient.

Phases (steps are ``optimizer.step()`` calls of the parameter): ``dense_steps`` dense steps, then the
sparse (decay) phase, then, from ``total_steps - finetune_steps``, fine-tuning with a binary mask
(``beta = 0``) that is frozen (``finetune_mask="fixed"``, the default) or still refreshed
(``"refresh"``).  ``structure_decay=True`` is the structure-decay schedule (SDGF) of the same paper:
the sparse phase is cut into ``log2(m / n)`` equal frames with patterns ``(m - 1):m``, then
``m/2:m``, ``m/4:m``, ...; the target ``n:m`` starts with fine-tuning (so it needs
``finetune_steps >= 1``).

Sharded parameters (DTensors: FSDP2's ``fully_shard``, sharded along dim 0): the masks are computed
on each rank's shard, and the states ``dense_param`` and ``nm_mask`` are DTensors with the parameter's
placements.  That is exact (the single-process result, bit for bit) when every mask group lies in one
shard: groups along a dim other than the sharded one always do; groups along the sharded dim (and the
transposable mask's 4x4 tiles along dim 0) need every shard to start and end on a multiple of ``m``
(of 4).  A parameter whose groups would straddle a shard boundary is refused with a ValueError when
its group is added to the optimizer (:meth:`NMSparsity.check_param`), and again while a step is
planned, before anything is written.
"""
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional

import torch

from .. import _backend, _ops
from .._sharded import local
from ..lowbit.layouts import Int8Weights, LowbitStates, MasterWeights
from ..reference.sparse import check_nm, check_tiles
from .masks import MAX_KERNEL_M, check_shard_groups, like_sharded, nm_mask, transposable_mask
from . import unstructured as _unstructured
from .unstructured import UnstructuredSparsity, check_unstructured_group

__all__ = ["NMSparsity", "nm_param_groups"]

RECIPES = ("ste", "sr-ste", "decay")


def _int(name, value, low):
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"NMSparsity: {name} must be an int >= {low}, got {value!r}")


@dataclass(frozen=True)
class NMSparsity:
    """The N:M sparse-training schedule of a parameter group (see the module doc).

    ``n``/``m``/``dim``: keep the ``n`` largest ``|W|`` of every ``m`` consecutive elements along
    ``dim`` (ties to the lowest index, as :func:`fastopt.sparse.nm_mask`).  ``transposable=True``
    (2:4 only) uses :func:`fastopt.sparse.transposable_mask` (exact): ``W * mask`` is 2:4 along rows
    and columns.  Every field is validated on construction.
    """

    n: int = 2
    m: int = 4
    recipe: str = "sr-ste"
    dim: int = -1
    srste_lambda: float = 2e-4
    decay: str = "linear"
    decay_coef: float = 1e-3
    refresh_every: int = 1
    dense_steps: int = 0
    total_steps: Optional[int] = None
    finetune_steps: int = 0
    finetune_mask: str = "fixed"
    structure_decay: bool = False
    transposable: bool = False

    def __post_init__(self):
        _int("m", self.m, 2)
        _int("n", self.n, 1)
        if self.n >= self.m:
            raise ValueError(f"NMSparsity: need 1 <= n < m, got n={self.n}, m={self.m}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise ValueError(f"NMSparsity: dim must be an int, got {self.dim!r}")
        if self.recipe not in RECIPES:
            raise ValueError(f"NMSparsity: recipe must be one of {RECIPES}, got {self.recipe!r}")
        if not (isinstance(self.srste_lambda, (int, float)) and 0.0 <= self.srste_lambda < math.inf):
            raise ValueError(f"NMSparsity: srste_lambda must be a finite float >= 0, got {self.srste_lambda!r}")
        if self.decay not in ("linear", "exp"):
            raise ValueError(f"NMSparsity: decay must be 'linear' or 'exp', got {self.decay!r}")
        if not (isinstance(self.decay_coef, (int, float)) and 0.0 <= self.decay_coef < math.inf):
            raise ValueError(f"NMSparsity: decay_coef must be a finite float >= 0, got {self.decay_coef!r}")
        _int("refresh_every", self.refresh_every, 1)
        _int("dense_steps", self.dense_steps, 0)
        _int("finetune_steps", self.finetune_steps, 0)
        if self.finetune_mask not in ("fixed", "refresh"):
            raise ValueError(f"NMSparsity: finetune_mask must be 'fixed' or 'refresh', got {self.finetune_mask!r}")
        if self.total_steps is None:
            if self.finetune_steps or self.structure_decay:
                raise ValueError("NMSparsity: finetune_steps and structure_decay need total_steps")
        else:
            _int("total_steps", self.total_steps, 1)
            if self.dense_steps + self.finetune_steps > self.total_steps:
                raise ValueError(f"NMSparsity: dense_steps + finetune_steps ({self.dense_steps} + "
                                 f"{self.finetune_steps}) exceed total_steps ({self.total_steps})")
        if self.structure_decay:
            frames = math.log2(self.m / self.n)
            if frames != int(frames):
                raise ValueError(f"NMSparsity: structure_decay needs m / n to be a power of 2, got {self.n}:{self.m}")
            if self.finetune_steps < 1:
                raise ValueError("NMSparsity: structure_decay reaches the target n:m when fine-tuning starts; "
                                 "give finetune_steps >= 1")
        if self.transposable and (self.n, self.m, self.structure_decay) != (2, 4, False):
            raise ValueError("NMSparsity: transposable masks are 2:4 (n=2, m=4) without structure_decay")

    # -- the schedule: t = the number of optimizer steps taken before the forward ------------------
    @property
    def finetune_start(self) -> Optional[int]:
        """The first fine-tuning step (None: no fine-tuning phase)."""
        if self.total_steps is None or self.finetune_steps == 0:
            return None
        return self.total_steps - self.finetune_steps

    def is_dense(self, t: int) -> bool:
        return t < self.dense_steps

    def finetuning(self, t: int) -> bool:
        start = self.finetune_start
        return start is not None and t >= start

    def pattern(self, t: int) -> int:
        """``n`` of the forward at step ``t`` (``m`` while dense)."""
        if self.is_dense(t):
            return self.m
        if not self.structure_decay:
            return self.n
        frames = int(round(math.log2(self.m / self.n)))
        size = (self.total_steps - self.dense_steps - self.finetune_steps) / frames
        n = self.m - 1
        for i in range(1, frames + 1):
            if t >= self.dense_steps + int(i * size):
                n = self.m >> i
        return n

    def beta(self, t: int) -> float:
        """The weight of the pruned entries in the forward at step ``t`` (1 while dense)."""
        if self.is_dense(t):
            return 1.0
        if self.recipe != "decay" or self.finetuning(t):
            return 0.0
        s = t - self.dense_steps
        if self.decay == "linear":
            return max(1.0 - self.decay_coef * s, 0.0)
        return math.exp(-self.decay_coef * s)

    def srste(self, t: int) -> float:
        """The SR-STE coefficient of the gradient of the forward at step ``t``."""
        return float(self.srste_lambda) if self.recipe == "sr-ste" and not self.is_dense(t) else 0.0

    def refresh(self, t: int) -> bool:
        """Whether the mask of the forward at step ``t`` is recomputed from the dense weights."""
        if self.is_dense(t):
            return False
        if t == self.dense_steps or self.pattern(t) != self.pattern(t - 1) or t == self.finetune_start:
            return True
        if self.finetuning(t) and self.finetune_mask == "fixed":
            return False
        return (t - self.dense_steps) % self.refresh_every == 0

    # -- checkpoints: a state_dict holds the schedule as a plain dict, so it loads with
    # torch.load(weights_only=True) (transformers' Trainer, Lightning) and without fastopt imported.
    STATE_KEY = "fastopt.NMSparsity"

    def to_state(self) -> Dict[str, Dict[str, Any]]:
        """The schedule as a plain dict (what a fastopt optimizer's ``state_dict()`` stores)."""
        return {self.STATE_KEY: asdict(self)}

    @classmethod
    def from_state(cls, value: Any) -> Optional["NMSparsity"]:
        """The inverse of :meth:`to_state`; an NMSparsity (an older checkpoint) or None is returned as is.
        Raises ValueError for anything else (and the constructor's checks run on the saved fields)."""
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, dict) and set(value) == {cls.STATE_KEY} and isinstance(value[cls.STATE_KEY], dict):
            saved = value[cls.STATE_KEY]
            known = {f.name for f in fields(cls)}
            unknown = set(saved) - known
            if unknown:
                raise ValueError(f"NMSparsity: the checkpoint's schedule has unknown fields {sorted(unknown)}")
            return cls(**saved)
        raise ValueError(f"a checkpoint's group 'sparsity' must be a saved NMSparsity, got {value!r}")

    def check_param(self, p: torch.Tensor, who: str) -> None:
        """Raise (ValueError/TypeError) when parameter ``p`` cannot be trained with this schedule."""
        if Int8Weights.is_weight(p):
            raise TypeError(f"{who}: the int8 weights of Int8Linear cannot be trained N:M sparse")
        if p.is_complex() or not p.is_floating_point():
            raise TypeError(f"{who}: N:M sparse training needs real floating-point parameters, got {p.dtype}")
        try:
            if self.transposable:
                check_tiles(tuple(p.shape))
            else:
                check_nm(tuple(p.shape), self.n, self.m, self.dim)
        except (ValueError, IndexError) as e:
            raise ValueError(f"{who}: a parameter of shape {tuple(p.shape)} cannot be {self.n}:{self.m} sparse: "
                             f"{e}") from None
        self.check_shards(p, who)

    def check_shards(self, p: torch.Tensor, who: str) -> None:
        """Raise (ValueError, NotImplementedError) when ``p`` is a DTensor some of whose mask groups would
        straddle a shard boundary (see the module doc); a plain tensor passes."""
        check_shard_groups(p, 4 if self.transposable else self.m, self.dim, self.transposable,
                           who=f"{who}: N:M sparse training ({self.n}:{self.m}"
                               f"{', transposable' if self.transposable else f', dim={self.dim}'})")


def nm_param_groups(model: torch.nn.Module, sparsity: NMSparsity, *,
                    filter: Optional[Callable[[str, torch.nn.Module], bool]] = None,
                    **options: Any) -> List[Dict[str, Any]]:
    """Param groups for a fastopt optimizer that train the weights of ``model``'s ``nn.Linear``
    layers (those whose ``in_features`` are a multiple of ``sparsity.m`` and, sharded by FSDP2, whose
    shards hold whole mask groups; ``filter(name, module)`` narrows the choice) N:M sparse, and every
    other parameter dense::

        opt = fastopt.Lion(fastopt.sparse.nm_param_groups(model, NMSparsity(2, 4)), lr=1e-4)

    ``options`` (e.g. ``weight_decay=0.1``) go into the sparse group.  Other layers (convolutions:
    N:M along the input channels is ``NMSparsity(dim=1)``) can be put in groups by hand.
    """
    if not isinstance(sparsity, NMSparsity):
        raise TypeError(f"nm_param_groups: sparsity must be an NMSparsity, got {type(sparsity).__name__}")
    chosen, seen = [], set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and isinstance(module.weight, torch.nn.Parameter) \
                and module.weight.requires_grad and (filter is None or filter(name, module)):
            w = module.weight
            if (w.shape[sparsity.dim] % sparsity.m == 0 and (not sparsity.transposable or w.shape[0] % 4 == 0)
                    and _whole_groups_in_shards(sparsity, w)):
                if id(w) not in seen:
                    chosen.append(w)
                    seen.add(id(w))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [dict(params=chosen, sparsity=sparsity, **options)] if chosen else []
    if rest:
        groups.append({"params": rest})
    return groups


def _whole_groups_in_shards(sparsity, w):
    try:
        sparsity.check_shards(w, "nm_param_groups")
    except (ValueError, NotImplementedError):
        return False
    return True


# -- inside the optimizer ----------------------------------------------------------------------------
def check_group_sparsity(owner: str, group: Dict[str, Any]) -> None:
    """Raise (TypeError/ValueError) when a param group's ``sparsity`` is not an :class:`NMSparsity`, a
    ``RandomSparsity`` or a ``MagnitudeSparsity`` (:mod:`fastopt.sparse.unstructured`) that every
    parameter of the group can be trained with."""
    sparsity = group.get("sparsity")
    if sparsity is None:
        return
    if isinstance(sparsity, (list, tuple)):
        raise TypeError(f"{owner}: a group's 'sparsity' must be one schedule (a fastopt.sparse.NMSparsity, "
                        "RandomSparsity or MagnitudeSparsity); N:M and unstructured sparsity (or two schedules) "
                        f"cannot be combined on the same parameters, got {type(sparsity).__name__}")
    if isinstance(sparsity, UnstructuredSparsity):
        check_unstructured_group(owner, group)
        return
    if not isinstance(sparsity, NMSparsity):
        raise TypeError(f"{owner}: a group's 'sparsity' must be a fastopt.sparse.NMSparsity, RandomSparsity or "
                        f"MagnitudeSparsity, got {type(sparsity).__name__}")
    for p in group["params"]:
        sparsity.check_param(p, owner)


def save_schedules(state_dict: Dict[str, Any]) -> Dict[str, Any]:
    """A ``state_dict`` post-hook: the groups' schedules as plain dicts (:meth:`NMSparsity.to_state`), so
    that every value of a saved group is a plain Python value or a tensor."""
    for group in state_dict["param_groups"]:
        if isinstance(group.get("sparsity"), (NMSparsity, UnstructuredSparsity)):
            group["sparsity"] = group["sparsity"].to_state()
    return state_dict


def load_schedules(groups: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The saved param groups of a checkpoint with their schedules rebuilt (new dicts where one is
    rebuilt: the caller's are not changed)."""
    return [{**g, "sparsity": _load_schedule(g["sparsity"])}
            if g.get("sparsity") is not None and not isinstance(g["sparsity"], (NMSparsity, UnstructuredSparsity))
            else g for g in groups]


def _load_schedule(value):
    """A saved schedule (:meth:`NMSparsity.to_state` or an unstructured one's) rebuilt."""
    unstructured = UnstructuredSparsity.from_saved(value)
    return unstructured if unstructured is not None else NMSparsity.from_state(value)


class NMSparseTraining:
    """The N:M sparse-training step, for an optimizer whose param groups may carry ``"sparsity"``.

    The state of a sparse-trained parameter adds ``dense_param`` (the dense weights, unless its fp32
    master copy ``master_param`` holds them), ``nm_mask`` (bool, the current mask) and ``nm_step`` (the
    optimizer steps it has taken).  The host optimizer provides ``state`` and ``param_groups`` (torch's),
    and the hooks

    * ``_init_state(group, p, state)``: fill an empty state;
    * ``_step_float(group, params, grads, states, backend, grad_scale, found_inf)``: one step of
      ``params`` (dense weights) through their state layouts;
    * ``_add_missing_states(group, params, states)``: the op's states that are not there yet;
    * ``_run(group, params, grads, states, backend, grad_scale, found_inf, sparse=...)``: one kernel call
      of the op with the fused sparse epilogue (``sparse = (masks, forward weights or [], lambda, beta)``);
    * ``_step_is_one_call(group)``: whether the op's step is one kernel call (no reduce pass), so the
      epilogue can ride on it.
    """

    DENSE_KEY, MASK_KEY, STEP_KEY = "dense_param", "nm_mask", "nm_step"

    @torch.no_grad()
    def sparsify(self) -> None:
        """Start N:M sparse training now: every parameter of a group with ``sparsity`` whose schedule
        is sparse at its current step gets its optimizer state (the dense weights, the mask) and its
        forward weights.  Without this call the first step does it, after a forward on the dense
        weights.  Parameters already sparse are left alone."""
        for group in self.param_groups:
            sp = group.get("sparsity")
            if sp is None:
                continue
            if isinstance(sp, UnstructuredSparsity):  # prune-style (fastopt.sparse.unstructured)
                _unstructured.sparsify(self, group)
                continue
            for p in group["params"]:
                state = self.state[p]
                t = state.get(self.STEP_KEY, 0)
                if self.MASK_KEY in state or sp.is_dense(t):
                    continue
                if not state:
                    self._init_state(group, p, state)
                backend = _backend.resolve(group["backend"], p.device, p.dtype, _ops.is_dense(p))
                self._enter_sparse(group, sp, p, state, t, backend)

    def _check_sparse_shards(self, group, params):
        """Raise (ValueError naming the boundary and the fix) where N:M sparse training of ``params``
        (DTensors, FSDP2) would split a mask group across shards: the masks are computed per shard,
        which is exact when no group straddles a shard boundary.  Checked when the group is added and
        while a step is planned (a schedule loaded since)."""
        sp = group.get("sparsity")
        if sp is not None:
            for p in params:
                sp.check_shards(p, type(self).__name__)

    def _sparse_state_dtypes(self, p, state):
        """{name: dtype} of the sparse-training states of ``p`` (they have its shape and strides)."""
        return {name: dtype for name, dtype in ((self.DENSE_KEY, p.dtype), (self.MASK_KEY, torch.bool),
                                                (_unstructured.MASK_KEY, torch.bool)) if name in state}

    def _dense_weight(self, group, p, state):
        """The dense weights of a sparse-trained parameter: the fp32 master copy or ``dense_param``."""
        return state[MasterWeights.KEY] if MasterWeights.KEY in state else state[self.DENSE_KEY]

    def _enter_sparse(self, group, sp, p, state, t, backend):
        """``p`` (dense so far) becomes sparse for the forward at step ``t``."""
        if MasterWeights.KEY not in state:
            state[self.DENSE_KEY] = p.detach().clone(memory_format=torch.preserve_format)
        self._refresh_mask(sp, p, self._dense_weight(group, p, state), state, t, backend, None)

    def _refresh_mask(self, sp, p, w, state, t, backend, found_inf):
        """New mask of ``w`` for the forward at step ``t``, then that forward's weights into ``p``."""
        kernel = backend if backend != "torch" and sp.m <= MAX_KERNEL_M else "torch"
        if sp.transposable:
            mask = transposable_mask(w, "exact", backend=kernel)
        else:
            mask = nm_mask(w, sp.pattern(t), sp.m, sp.dim, backend=kernel)
        # (DTensors: the masks of the local shards, written as a DTensor with w's placements)
        lw, lmask, new = local(w), local(mask), False
        if lmask.stride() != lw.stride():  # the kernels walk w, p and the mask as one flat buffer
            lmask, new = torch.empty_like(lw, dtype=torch.bool).copy_(lmask), True
        if found_inf is not None and self.MASK_KEY in state:  # AMP skipped the step: the mask stays (no sync)
            lmask = torch.where(found_inf.to(device=lmask.device) != 0, local(state[self.MASK_KEY]), lmask)
            new = True
        state[self.MASK_KEY] = like_sharded(w, lmask) if new else mask
        self._write_forward(p, p if MasterWeights.KEY in state else w, state[self.MASK_KEY], sp.beta(t), found_inf)

    @staticmethod
    def _write_forward(p, src, mask, beta, found_inf):
        """``p = mask ? src : beta * src`` (exactly 0 where pruned when beta is 0); with AMP's
        ``found_inf`` set, ``p`` keeps its values (as the fused epilogue does).  DTensors: on the local
        shards."""
        p, src, mask = local(p), local(src), local(mask)
        pruned = src * beta if beta != 0.0 else torch.zeros((), dtype=src.dtype, device=src.device)
        if found_inf is None:
            torch.where(mask, src, pruned, out=p)   # one pass, no temporary (src may be p itself)
            return
        p.copy_(torch.where(found_inf.to(device=p.device) != 0, p, torch.where(mask, src, pruned)))

    @staticmethod
    def _srste_grad(g, w, mask, lam, maximize, grad_scale):
        """``g`` plus the SR-STE term ``lam * (1 - mask) * w``, scaled (AMP) and signed (maximize) as
        the gradient is, so that the kernels' unscaling yields ``g / scale + lam * (1 - mask) * w``.
        DTensors: computed on the local shards, returned with ``g``'s placements."""
        ref, g, w, mask = g, local(g), local(w), local(mask)
        extra = torch.where(mask, 0.0, w.float()) * (-lam if maximize else lam)
        if grad_scale is not None:
            extra = extra * grad_scale.to(device=extra.device)
        return like_sharded(ref, (g.float() + extra).to(g.dtype))

    def _fused_sparse_ok(self, group, params, states, backend):
        """Whether one kernel call can run the step and the sparse epilogue: a kernel backend, an op
        without a reduce phase, full-precision states and no master copy."""
        return (backend != "torch" and self._step_is_one_call(group)
                and not any(LowbitStates.holds(s) or MasterWeights.KEY in s for s in states))

    def _step_sparse(self, group, params, grads, backend, grad_scale, found_inf):
        """A step of N:M sparse-trained parameters, in calls of parameters at the same point of the
        schedule."""
        sp = group["sparsity"]
        if isinstance(sp, UnstructuredSparsity):  # prune-style (fastopt.sparse.unstructured)
            _unstructured.step(self, group, params, grads, backend, grad_scale, found_inf)
            return
        calls = defaultdict(list)
        for p, g in zip(params, grads):
            state = self.state[p]
            calls[(state.get(self.STEP_KEY, 0), self.MASK_KEY in state)].append((p, g, state))
        for (t, sparse), items in calls.items():
            ps, gs, states = [list(x) for x in zip(*items)]
            if not sparse:  # dense so far: p holds the dense weights
                self._step_float(group, ps, gs, states, backend, grad_scale, found_inf)
                if not sp.is_dense(t + 1):
                    for p, state in zip(ps, states):
                        self._enter_sparse(group, sp, p, state, t + 1, backend)
            else:
                self._step_sparse_call(group, sp, t, ps, gs, states, backend, grad_scale, found_inf)
            for state in states:
                state[self.STEP_KEY] = t + 1

    def _step_sparse_call(self, group, sp, t, params, grads, states, backend, grad_scale, found_inf):
        lam, beta, refresh = sp.srste(t), sp.beta(t + 1), sp.refresh(t + 1)
        dense = [self._dense_weight(group, p, s) for p, s in zip(params, states)]
        masks = [s[self.MASK_KEY] for s in states]
        if self._fused_sparse_ok(group, params, states, backend):
            self._add_missing_states(group, dense, states)
            self._run(group, dense, grads, states, backend, grad_scale, found_inf,
                      sparse=(masks, [] if refresh else params, lam, beta))
        else:
            if lam:
                grads = [self._srste_grad(g, w, m, lam, group["maximize"], grad_scale)
                         for g, w, m in zip(grads, dense, masks)]
            master = MasterWeights.KEY in states[0]
            self._step_float(group, params if master else dense, grads, states, backend, grad_scale, found_inf)
            if not refresh:
                for p, w, m in zip(params, dense, masks):
                    self._write_forward(p, p if master else w, m, beta, found_inf)
        if refresh:
            for p, w, s in zip(params, dense, states):
                self._refresh_mask(sp, p, w, s, t + 1, backend, found_inf)
