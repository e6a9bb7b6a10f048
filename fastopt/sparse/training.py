"""N:M sparse training inside the optimizer step: the schedule (:class:`NMSparsity`) and the helpers
that keep the state (the dense weights, the mask) in the optimizer.

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
"""
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Dict, List, Optional

import torch

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
        from ..lowbit import int8 as lowbit_int8
        from ..reference.sparse import check_nm, check_tiles
        if lowbit_int8.is_int8_weight(p):
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


def nm_param_groups(model: torch.nn.Module, sparsity: NMSparsity, *,
                    filter: Optional[Callable[[str, torch.nn.Module], bool]] = None,
                    **options: Any) -> List[Dict[str, Any]]:
    """Param groups for a fastopt optimizer that train the weights of ``model``'s ``nn.Linear``
    layers (those whose ``in_features`` are a multiple of ``sparsity.m``; ``filter(name, module)``
    narrows the choice) N:M sparse, and every other parameter dense::

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
            if w.shape[sparsity.dim] % sparsity.m == 0 and (not sparsity.transposable or w.shape[0] % 4 == 0):
                if id(w) not in seen:
                    chosen.append(w)
                    seen.add(id(w))
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in seen]
    groups = [dict(params=chosen, sparsity=sparsity, **options)] if chosen else []
    if rest:
        groups.append({"params": rest})
    return groups
