"""GaLore: fastopt's elementwise optimizers stepped in a low-rank projection of each 2-D gradient.

Zhao et al., "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection" (ICML 2024), with
galore-torch 1.0's param-group keys and semantics; Zhang et al., "Q-GaLore" (2024) for INT4 projectors
and the adaptive refresh; Modoranu et al., "SVD-Free Low-Rank Adaptive Gradient Optimization" for the
DCT projector.

A parameter is *projected* when its group has a ``rank`` (not None) and it is 2-D (an m x n matrix, or
the int8 weight of a :class:`fastopt.lowbit.Int8Linear`).  Every other parameter takes the base
optimizer's plain fused step.  For a projected parameter with gradient G (galore-torch's
``GaLoreProjector`` then its AdamW):

    every update_proj_gap steps (host_step % gap == 0, and at the first step): P <- projector(G)
    R = low(G)          right: G P^T (m x r)   left: P^T G (r x n)   full: L^T G R^T (r x r)
    U = the base optimizer's update of a zero tensor with gradient R (its moments live in R's space;
        no weight decay here)
    p <- (p + scale * back(U)) (1 - lr wd)      back: U P, P U or L U R

computed as one BLAS call ``p.addmm_(.., beta=1 - lr wd, alpha=scale (1 - lr wd))`` (no full-size
temporary).  The projection of every projected parameter of a group is a torch matmul (or, on the
triton backend for GaLoreAdamW, one Triton GEMM whose epilogue runs the Adam update); the low-rank
updates of the whole group are one call of the base optimizer's fused kernel.

NOTE: [the GaLore state]
Everything is a plain tensor or int, so ``torch.load(weights_only=True)`` reads a checkpoint and a
resumed run is bit-exact: ``step`` (the kernels' fp32 count), ``host_step`` (the same count as a Python
int: the refresh schedule and the bias corrections are decided on the host without a device sync),
and for projected parameters ``proj_gap`` (the current refresh gap; Q-GaLore's adaptive refresh
lengthens it), ``proj_refreshes`` (how many projectors were made: seeds the randomized projector), the
moments in the low-rank shape, and the projector: ``projector`` (dense, the parameter's dtype; with
``proj_type="full"`` also ``projector_right``), or ``projector_codes`` / ``projector_scales`` /
``projector_zeros`` (INT4/INT8, two 4-bit codes per byte), or ``projector_indices`` (the DCT columns,
int64), plus ``proj_queue`` / ``proj_past`` for the adaptive refresh.
"""
import inspect
import math
from collections import defaultdict
from typing import Any, Dict, List, Optional, Tuple, Union

import torch

from .. import _sharded
from ..lowbit.layouts import Int8Weights, LowbitStates
from ..optim.adabelief import AdaBelief
from ..optim.adan import Adan
from ..optim.base import ElementwiseOptimizer
from ..optim.functional import Params, scalar_lr
from ..optim.lion import Lion
from ..optim.lowbit_presets import ElementwiseAdamW
from . import projectors as _proj
from . import quant as _quant

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
PROJECTORS = ("svd", "randomized", "dct")

# The param-group keys of the projection, with their defaults (galore-torch's projector defaults;
# Q-GaLore's for the adaptive refresh and the quantized projector).
LOWRANK_DEFAULTS = dict(rank=None, update_proj_gap=200, scale=1.0, proj_type="std", projector="svd",
                        proj_bits=None, proj_group_size=256, proj_stochastic=False, proj_adaptive=False,
                        queue_size=5, cos_threshold=0.4, gamma_proj=2, dct_norm=1, dct_method="matmul", oversample=8,
                        power_iters=1)

# The state keys that hold a projector (the optimizer's checks; the lowrank benchmark's memory split).
PROJECTOR_KEYS = ("projector", "projector_right", "projector_codes", "projector_scales", "projector_zeros",
                   "projector_indices")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def check_lowrank_group(owner: str, group: Dict[str, Any]) -> None:
    """Raise ValueError for invalid projection keys of ``group`` (a group whose ``rank`` is None is not
    projected and only needs valid values where it sets them)."""
    rank = group.get("rank")
    if rank is not None and (not _is_int(rank) or rank < 1):
        raise ValueError(f"{owner}: rank must be a positive int (or None: no projection), got {rank!r}")
    gap = group.get("update_proj_gap")
    if not _is_int(gap) or gap < 1:
        raise ValueError(f"{owner}: update_proj_gap must be a positive int, got {gap!r}")
    scale = group.get("scale")
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{owner}: scale must be a finite number, got {scale!r}")
    if group.get("proj_type") not in PROJ_TYPES:
        raise ValueError(f"{owner}: proj_type must be one of {PROJ_TYPES}, got {group.get('proj_type')!r}")
    if group.get("projector") not in PROJECTORS:
        raise ValueError(f"{owner}: projector must be one of {PROJECTORS}, got {group.get('projector')!r}")
    if group["projector"] == "dct" and group["proj_type"] == "full":
        raise ValueError(f"{owner}: the dct projector selects basis columns on one side; proj_type='full' "
                         "needs 'svd' or 'randomized'")
    bits = group.get("proj_bits")
    if bits not in (None, 4, 8):
        raise ValueError(f"{owner}: proj_bits must be None (a projector in the parameter's dtype), 4 or 8, got "
                         f"{bits!r}")
    if bits is not None and group["projector"] == "dct":
        raise ValueError(f"{owner}: a dct projector is stored as r column indices already; proj_bits applies to "
                         "the dense projectors ('svd', 'randomized')")
    size = group.get("proj_group_size")
    if not _is_int(size) or size < 1:
        raise ValueError(f"{owner}: proj_group_size must be a positive int, got {size!r}")
    qs = group.get("queue_size")
    if not _is_int(qs) or qs < 1:
        raise ValueError(f"{owner}: queue_size must be a positive int, got {qs!r}")
    for key in ("cos_threshold", "gamma_proj"):
        v = group.get(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{owner}: {key} must be a finite number, got {v!r}")
    if group["gamma_proj"] < 1:
        raise ValueError(f"{owner}: gamma_proj must be >= 1 (the factor that lengthens the gap), got "
                         f"{group['gamma_proj']!r}")
    if group.get("dct_norm") not in (1, 2):
        raise ValueError(f"{owner}: dct_norm must be 1 or 2 (the norm that scores the DCT columns), got "
                         f"{group.get('dct_norm')!r}")
    if group.get("dct_method") not in ("matmul", "fft"):
        raise ValueError(f"{owner}: dct_method must be 'matmul' (ista-daslab-optimizers' scoring) or 'fft' (the same "
                         f"scores through one real FFT per row, O(m n log n)), got {group.get('dct_method')!r}")
    for key in ("oversample", "power_iters"):
        v = group.get(key)
        if not _is_int(v) or v < 0:
            raise ValueError(f"{owner}: {key} must be a non-negative int, got {v!r}")


def low_rank_shape(side: str, m: int, n: int, rank: int) -> Tuple[int, int]:
    """The shape of the projected gradient of an m x n matrix (rank clamped to min(m, n))."""
    r = min(rank, m, n)
    return {"right": (m, r), "left": (r, n), "full": (r, r)}[side]


def _by_next_step(states, items):
    """``items`` grouped by the step count after this step (``host_step + 1``) of their ``states``: one
    fused call per group, since GaLoreAdamW's eps and learning rate depend on it."""
    out = defaultdict(list)
    for state, item in zip(states, items):
        out[state["host_step"] + 1].append(item)
    return out


class _LowRank:
    """The projection, mixed in before an :class:`~fastopt.optim.base.ElementwiseOptimizer` subclass.

    Subclasses may override :meth:`_plain_view` / :meth:`_projected_view` (the group a fused call of the
    base op gets, for host step ``t``, the step after this one)."""

    _supports_sparsity = False  # (N:M masks and a low-rank update do not compose)

    def _setup_lowrank(self, lowrank):
        """Before the base constructor: the projection keys every group takes unless it sets them."""
        check_lowrank_group(type(self).__name__, {**LOWRANK_DEFAULTS, **lowrank})
        self._lowrank_defaults = {**LOWRANK_DEFAULTS, **lowrank}

    def _finish_lowrank(self):
        """After the base constructor: the keys become defaults (groups added later, loaded state dicts)
        and the load hooks are registered."""
        self.defaults.update(self._lowrank_defaults)
        self.register_load_state_dict_pre_hook(_LowRank._stash_projected)
        self.register_load_state_dict_post_hook(_LowRank._restore_projected)

    def add_param_group(self, param_group):
        """torch's add_param_group; the group takes the projection keys it lacks from the constructor's
        and is checked (a group that fails is not added)."""
        for key, value in self.__dict__.get("_lowrank_defaults", LOWRANK_DEFAULTS).items():
            param_group.setdefault(key, value)
        super().add_param_group(param_group)
        try:
            check_lowrank_group(type(self).__name__, self.param_groups[-1])
        except ValueError:
            self.param_groups.pop()
            raise

    # -- group views ---------------------------------------------------------------------------------
    def _plain_view(self, group, t):
        """The group the base op steps the non-projected parameters with (at step ``t``)."""
        return group

    def _projected_view(self, group, t):
        """The group the base op steps the low-rank updates with: no weight decay (applied by the
        back-projection, after the update, as galore-torch applies it)."""
        return {**group, "weight_decay": 0.0}

    # -- which parameters ------------------------------------------------------------------------------
    @staticmethod
    def _projects(group, p):
        return group.get("rank") is not None and p.dim() == 2

    def _side(self, group, p):
        return _proj.projection_side(tuple(p.shape), group["proj_type"])

    def _low_shape(self, group, p):
        m, n = p.shape
        return low_rank_shape(self._side(group, p), m, n, group["rank"])

    def _projector_shapes(self, group, p):
        """The shapes of ``p``'s dense projector: [(r, n)] (right), [(m, r)] (left), [(m, r), (r, n)] (full)."""
        m, n = p.shape
        r = min(group["rank"], m, n)
        return {"right": [(r, n)], "left": [(m, r)], "full": [(m, r), (r, n)]}[self._side(group, p)]

    def _check_group(self, group):
        super()._check_group(group)
        # (the base constructors check their defaults before the projection keys are among them)
        check_lowrank_group(type(self).__name__, {**self.__dict__.get("_lowrank_defaults", LOWRANK_DEFAULTS), **group})

    def _check_group_param(self, group, p):
        super()._check_group_param(group, p)
        if not (self._projects(group, p) and _sharded.is_dtensor(p)):
            return
        # NOTE: [projected DTensors] FSDP2's row shards: a refresh gathers the whole gradient (every rank
        # computes the same projector); the step runs on the local rows (right side: G_rows P^T, moments
        # Shard(0) like the parameter; left / full: the partial products summed by one all-reduce over
        # the shard groups, moments replicated), and the back-projection writes the local rows.
        name = type(self).__name__
        if not _sharded.row_sharded(p):
            raise NotImplementedError(
                f"{name}: a projected parameter is a DTensor {_sharded.describe_placement(p)}: the projected step "
                "runs on row shards (Shard(0) or Replicate placements, as fully_shard makes)")
        if group.get("state_bits") is not None:
            raise NotImplementedError(
                f"{name}: low-bit moments (state_bits) of a projected DTensor {_sharded.describe_placement(p)}: "
                "not supported; use state_bits=None for the projected groups under FSDP2")

    # -- state -----------------------------------------------------------------------------------------
    def _low_zeros(self, group, p):
        """fp32 zeros in the low-rank shape of ``p``: for a DTensor ``p`` a DTensor (right side: the
        parameter's row shards; left / full: replicated)."""
        shape = self._low_shape(group, p)
        if not _sharded.is_dtensor(p):
            return torch.zeros(shape, dtype=torch.float32, device=p.device)
        from torch.distributed.tensor import DTensor, Replicate

        mesh = p.device_mesh
        if self._side(group, p) == "right":
            (rows, _), _ = _sharded.local_shape_and_offset(p)
            return DTensor.from_local(torch.zeros((rows, shape[1]), dtype=torch.float32, device=p.device), mesh,
                                      p.placements, run_check=False, shape=torch.Size(shape), stride=(shape[1], 1))
        return DTensor.from_local(torch.zeros(shape, dtype=torch.float32, device=p.device), mesh,
                                  [Replicate()] * mesh.ndim, run_check=False)

    def _init_state(self, group, p, state):
        if not self._projects(group, p):
            super()._init_state(group, p, state)
            state["host_step"] = 0
            return
        low = self._low_zeros(group, p)
        state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
        state["host_step"] = 0
        state["proj_gap"] = int(group["update_proj_gap"])
        state["proj_refreshes"] = 0
        names = self._state_names(group)
        if LowbitStates.uses(group, low):
            LowbitStates.init(group, state, low, names)
        else:
            for name in names:
                state[name] = torch.zeros_like(low)

    def _elementwise_states(self, group, p, state):
        if "proj_gap" in state:  # (checked by _check_projected_state)
            return {}
        return super()._elementwise_states(group, p, state)

    def _check_state_of(self, group, p, state):
        names = super()._check_state_of(group, p, state)
        if not isinstance(state.get("host_step"), int):
            raise ValueError(f"{type(self).__name__}: the state 'host_step' of a parameter must be an int (the "
                             f"step count), got {type(state.get('host_step')).__name__}")
        if "proj_gap" in state:
            self._check_projected_state(group, p, state)
            names = names + [k for k in (*self._state_names(group), *PROJECTOR_KEYS) if k in state]
        return names

    def _check_projected_state(self, group, p, state, where="a projected parameter's state"):
        name = type(self).__name__
        if not self._projects(group, p):
            raise ValueError(f"{name}: {where} holds a low-rank projection but its group does not project it "
                             "(rank None or the parameter is not 2-D)")
        shape = self._low_shape(group, p)
        if not _is_int(state.get("proj_gap")) or state["proj_gap"] < 1 or not _is_int(state.get("proj_refreshes")):
            raise ValueError(f"{name}: {where}: proj_gap and proj_refreshes must be ints (proj_gap >= 1)")
        names = self._state_names(group)
        if LowbitStates.holds(state):
            like = torch.empty(shape, dtype=torch.float32, device=p.device)
            LowbitStates.check_loaded(name, group, names, like, state, where)
        else:
            for key in names:
                v = state.get(key)
                if not (torch.is_tensor(v) and v.dtype == torch.float32 and tuple(v.shape) == shape
                        and v.device == p.device and v.is_contiguous()):
                    what = f"{v.dtype}{tuple(v.shape)} on {v.device}" if torch.is_tensor(v) else type(v).__name__
                    raise ValueError(f"{name}: {where}: state {key!r} is {what}; with rank {group['rank']} and "
                                     f"proj_type {group['proj_type']!r} it must be float32{shape} on {p.device}")
        self._check_projector(group, p, state, where)

    def _check_projector(self, group, p, state, where):
        name = type(self).__name__
        side = self._side(group, p)
        m, n = p.shape
        r = min(group["rank"], m, n)
        shapes = self._projector_shapes(group, p)
        dense_dtype = torch.float32 if Int8Weights.is_weight(p) else p.dtype

        def bad(key, why):
            raise ValueError(f"{name}: {where}: {key} {why} (rank {group['rank']}, proj_type "
                             f"{group['proj_type']!r}, projector {group['projector']!r}, proj_bits "
                             f"{group['proj_bits']!r}); a checkpoint of another configuration?")

        # (only the keys the group's configuration reads; where they are missing -- the group switched
        # projector or proj_bits -- the next step refreshes: _has_projector)
        if group["projector"] == "dct":
            idx = state.get("projector_indices")
            if idx is None:
                return
            if not (torch.is_tensor(idx) and idx.dtype == torch.int64 and tuple(idx.shape) == (r,)):
                bad("projector_indices", f"must be int64 of shape ({r},)")
            size = n if side == "right" else m
            if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= size):
                bad("projector_indices", f"must lie in [0, {size})")
            return
        if group["proj_bits"] is not None:
            numel = shapes[0][0] * shapes[0][1]
            if len(shapes) > 1:
                bad("projector_codes", "quantized full projectors are not supported")
            if "projector_codes" not in state:
                return
            codes, scales, zeros = (state.get(k) for k in ("projector_codes", "projector_scales", "projector_zeros"))
            nbytes = numel // 2 if group["proj_bits"] == 4 else numel
            groups = numel // group["proj_group_size"]
            if not (torch.is_tensor(codes) and codes.dtype == torch.uint8 and codes.numel() == nbytes):
                bad("projector_codes", f"must be uint8 with {nbytes} bytes")
            for key, v in (("projector_scales", scales), ("projector_zeros", zeros)):
                if not (torch.is_tensor(v) and v.dtype == torch.float32 and v.numel() == groups):
                    bad(key, f"must be float32 with {groups} elements")
            return
        if "projector" not in state:
            return
        for key, shape in zip(("projector", "projector_right"), shapes):
            v = state.get(key)
            if not (torch.is_tensor(v) and tuple(v.shape) == shape and v.dtype == dense_dtype):
                bad(key, f"must be {dense_dtype}{shape}")

    @staticmethod
    def _has_projector(group, p, state, side):
        """Whether ``state`` holds the projector the group's configuration reads."""
        if group["projector"] == "dct":
            return "projector_indices" in state
        if group["proj_bits"] is not None:
            return "projector_codes" in state
        return "projector" in state and (side != "full" or "projector_right" in state)

    # -- the step --------------------------------------------------------------------------------------
    @torch.compiler.disable
    def step(self, closure=None):
        """One optimization step (see the class docstring).  It runs eagerly under ``torch.compile``:
        the refresh schedule, the bias corrections and the weight decay are host numbers, and a refresh
        is an SVD / QR / top-k (a compiled training step calls it as one opaque function)."""
        return super().step(closure)

    def _check_bucket(self, group, params, backend):
        plain = [p for p in params if not self._projects(group, p)]
        if plain:
            super()._check_bucket(group, plain, backend)
        proj = [p for p in params if self._projects(group, p)]
        names = self._state_names(group)
        for p in proj:  # low-bit moments: in the low-rank shape
            if p in self.state and LowbitStates.holds(self.state[p]):
                like = torch.empty(self._low_shape(group, p), dtype=torch.float32, device=p.device)
                LowbitStates.check_bucket(type(self).__name__, group, names, [like], {like: self.state[p]}, backend)
        if proj and group.get("proj_bits") is not None:
            size = group["proj_group_size"]
            for p in proj:
                side = self._side(group, p)
                numel = 0 if side == "full" else math.prod(self._projector_shapes(group, p)[0])
                if side == "full" or numel % size or (group["proj_bits"] == 4 and numel % 2):
                    raise ValueError(
                        f"{type(self).__name__}: a {group['proj_bits']}-bit projector of a {tuple(p.shape)} matrix "
                        f"with rank {group['rank']} ({side} side, {numel} elements) must be quantized in groups of "
                        f"proj_group_size={size} consecutive elements: choose a proj_group_size that divides {numel}"
                        + (" (proj_type='full' cannot be quantized)" if side == "full" else ""))

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        if found_inf is not None and float(found_inf) != 0.0:
            return  # AMP skipped the step: nothing is projected, refreshed or counted (one host read)
        proj = [i for i, p in enumerate(params) if self._projects(group, p)]
        plain = [i for i, p in enumerate(params) if not self._projects(group, p)]
        pick = lambda seq, idx: [seq[i] for i in idx]  # noqa: E731
        if plain:
            for t, idx in _by_next_step([self.state[params[i]] for i in plain], plain).items():
                super()._step_bucket(self._plain_view(group, t), pick(params, idx), pick(grads, idx), backend,
                                     grad_scale, None)
                for i in idx:
                    self.state[params[i]]["host_step"] = t
        if not proj:
            return
        params, grads = pick(params, proj), pick(grads, proj)
        states = [self.state[p] for p in params]
        if Int8Weights.is_weight(params[0]):
            # the fp32 copy of each int8 weight is projected and stepped, then requantized
            for p, g, state in zip(params, grads, states):
                Int8Weights.step(lambda g_, w, gr, st, b, gs, _fi, p=p: self._step_projected(g_, w, gr, st, b, gs, [p]),
                                 group, [p], [g], [state], backend, grad_scale, None)
            return
        self._step_projected(group, params, grads, states, backend, grad_scale, params)

    def _param_index(self, p):
        index = self.__dict__.get("_lowrank_index")
        if index is None or id(p) not in index:
            index = {id(q): i for i, q in enumerate(q for g in self.param_groups for q in g["params"])}
            self._lowrank_index = index
        return index[id(p)]

    def _refresh(self, group, p, g, state, owner):
        """A new projector of ``p`` from its gradient ``g`` (every rank of a data-parallel run computes
        the same one from the same reduced gradient; the randomized projector's random stream is keyed
        on the group's seed, the parameter's index and the refresh count, the same on every rank)."""
        side = self._side(group, p)
        rank = min(group["rank"], *p.shape)
        kind = group["projector"]
        prev = None
        if kind == "randomized" and "projector" in state and group["proj_bits"] is None:
            prev = state["projector"] if side != "full" else (state["projector"], state["projector_right"])
        elif kind == "randomized" and "projector_codes" in state:
            prev = self._dense_projector(group, p, state)
        low = None
        if kind == "svd":
            new = _proj.svd_projector(g, rank, side)
        elif kind == "randomized":
            seed = ((int(group.get("seed", 0)) * 1_000_003 + self._param_index(owner)) * 1_000_003
                    + state["proj_refreshes"]) % (2 ** 63)
            # (a cold start -- no previous projector -- takes one more subspace iteration: 1.07x the SVD's
            # subspace error at 4096^2 with one, 1.02x with two; warm starts are at 1.01x with one)
            new = _proj.randomized_projector(g, rank, side, prev, seed=seed, oversample=group["oversample"],
                                             power_iters=group["power_iters"] + (prev is None))
        else:
            idx, low = _proj.dct_select(g, rank, side, norm=group["dct_norm"], method=group["dct_method"])
            new = None
            state["projector_indices"] = idx.to(torch.int64)
        state["proj_refreshes"] += 1
        if group["proj_adaptive"]:
            size = g.shape[1] if side == "right" else g.shape[0]
            dense = new if new is not None else _proj.dct_projector(state["projector_indices"], size, side, g.device,
                                                                    torch.float32)
            first = dense[0] if isinstance(dense, tuple) else dense
            queue, past, gap = _proj.adaptive_gap(
                state.get("proj_queue", torch.zeros(0, dtype=torch.float64)), state.get("proj_past"),
                first, "left" if side == "full" else side, state["proj_gap"],
                queue_size=group["queue_size"], cos_threshold=group["cos_threshold"], gamma_proj=group["gamma_proj"])
            state["proj_queue"], state["proj_past"], state["proj_gap"] = queue, past, int(gap)
        if new is None:
            return low
        if group["proj_bits"] is not None:
            q = _quant.quantize_projector(new, bits=group["proj_bits"], group_size=group["proj_group_size"],
                                          stochastic=group["proj_stochastic"],
                                          seed=(int(group.get("seed", 0)) + state["proj_refreshes"]) % (2 ** 63))
            state["projector_codes"], state["projector_scales"], state["projector_zeros"] = (
                q["codes"], q["scales"], q["zeros"])
        elif side == "full":
            state["projector"], state["projector_right"] = new
        else:
            state["projector"] = new
        return None

    def _dense_projector(self, group, p, state):
        """The projector of ``p`` as dense tensors in the gradient's dtype (dequantized / gathered)."""
        side = self._side(group, p)
        m, n = p.shape
        dtype = torch.float32 if Int8Weights.is_weight(p) else p.dtype
        if group["projector"] == "dct":  # (the indices were checked with the state: no host read per step)
            rows = _proj.dct_basis_rows(n if side == "right" else m, p.device, dtype)
            rows = rows.index_select(0, state["projector_indices"])  # (r whole rows; left: a transposed view)
            return rows if side == "right" else rows.t()
        if group["proj_bits"] is not None:
            q = {"codes": state["projector_codes"], "scales": state["projector_scales"],
                 "zeros": state["projector_zeros"]}
            return _quant.dequantize_projector(q, self._projector_shapes(group, p)[0], dtype)
        if side == "full":
            return state["projector"], state["projector_right"]
        return state["projector"]

    @staticmethod
    def _project(g, P, side):
        if side == "right":
            return g @ P.t()
        if side == "left":
            return P.t() @ g
        L, R = P
        return (L.t() @ g) @ R.t()

    def _project_rows(self, group, p, g, P, side):
        """The projected gradient of DTensor ``p`` from its local rows (NOTE: [projected DTensors])."""
        from torch.distributed.tensor import DTensor

        g_loc = g.to_local()
        like = self._low_zeros(group, p)
        if side == "right":
            return DTensor.from_local(g_loc @ P.to(g_loc.dtype).t(), like.device_mesh, like.placements,
                                      run_check=False, shape=like.shape, stride=like.stride())
        (rows, _), (r0, _) = _sharded.local_shape_and_offset(p)
        L = P if side == "left" else P[0]
        part = L[r0:r0 + rows].to(g_loc.dtype).t() @ g_loc
        if side == "full":
            part = part @ P[1].to(g_loc.dtype).t()
        part = part.float().contiguous()
        for pg in _sharded.shard_groups(p):
            torch.distributed.all_reduce(part, group=pg)
        return DTensor.from_local(part, like.device_mesh, like.placements, run_check=False)

    def _fused_step(self, group, p, g, state, side, backend, grad_scale, decay):
        """Step projected parameter ``p`` in the optimizer's own fused kernels (projection + update in one
        GEMM, back-projection in another); returns False where there are none (the generic path then
        runs the projection, the base op's fused pass and the addmm_)."""
        return False

    def _step_projected(self, group, params, grads, states, backend, grad_scale, owners):
        """One step of the projected parameters ``params`` (fp32 copies of int8 weights included)."""
        lr = float(scalar_lr(group["lr"]))
        decay = 1.0 - lr * float(group["weight_decay"])
        rest = []  # (param index, projected gradient, dense projector) of the generic path
        for i, (p, g, state, owner) in enumerate(zip(params, grads, states, owners)):
            side = self._side(group, p)
            due = state["host_step"] % state["proj_gap"] == 0 or not self._has_projector(group, p, state, side)
            low = self._refresh(group, p, _sharded.whole(g), state, owner) if due else None
            if self._fused_step(group, p, g, state, side, backend, grad_scale, decay):
                state["host_step"] += 1
                continue
            P = self._dense_projector(group, p, state)
            if _sharded.is_dtensor(p):
                low = self._project_rows(group, p, g, P, side)
            elif low is None:
                low = self._project(g, P if side == "full" else P.to(g.dtype), side)
            rest.append((i, low.float() if low.dtype != torch.float32 else low.contiguous(), P))
        alpha = float(group["scale"]) * decay
        for t, entries in _by_next_step([states[entry[0]] for entry in rest], rest).items():
            updates = [torch.zeros_like(low) for _, low, _ in entries]
            self._step_float(self._projected_view(group, t), updates, [low for _, low, _ in entries],
                             [states[i] for i, _, _ in entries], backend, grad_scale, None)
            for u, (i, _, P) in zip(updates, entries):
                p, side = params[i], self._side(group, params[i])
                rows = slice(None)
                if _sharded.is_dtensor(p):
                    (n_rows, _), (r0, _) = _sharded.local_shape_and_offset(p)
                    rows = slice(r0, r0 + n_rows)
                    p, u = p.to_local(), u.to_local()
                if side == "right":
                    p.addmm_(u.to(p.dtype), P.to(p.dtype), beta=decay, alpha=alpha)
                elif side == "left":
                    p.addmm_(P[rows].to(p.dtype), u.to(p.dtype), beta=decay, alpha=alpha)
                else:
                    L, R = P
                    p.addmm_((L[rows].float() @ u).to(p.dtype), R.to(p.dtype), beta=decay, alpha=alpha)
                states[i]["host_step"] = t

    # -- loading ---------------------------------------------------------------------------------------

    @staticmethod
    def _stash_projected(optimizer, state_dict):
        # torch.optim casts every tensor state of a floating-point parameter to its dtype and device on
        # load: the projector codes (uint8), DCT indices (int64), the adaptive queue (fp64) and fp32
        # low-rank moments of bf16 parameters are set aside here and put back as they were saved.
        saved = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        current = [p for g in optimizer.param_groups for p in g["params"]]
        stash = {}
        for pid, p in zip(saved, current):
            s = state_dict["state"].get(pid, {})
            if "proj_gap" in s:  # (only projected states are put back: _restore_projected)
                stash[p] = {k: v for k, v in s.items() if k != "step" and torch.is_tensor(v)}
        optimizer._lowrank_stash = stash
        return None

    @staticmethod
    def _restore_projected(optimizer):
        for p, values in getattr(optimizer, "_lowrank_stash", {}).items():
            state = optimizer.state[p]
            for k, v in values.items():
                state[k] = v.to(device=p.device, copy=v.device == p.device)
        optimizer._lowrank_stash = {}
        for state in optimizer.state.values():  # a checkpoint of an optimizer without host_step
            if "step" in state and "host_step" not in state:
                state["host_step"] = int(float(state["step"]))

    def _check_loaded(self, state_dict, saved_ids):
        current = [(g, p) for g in self.param_groups for p in g["params"]]
        projected = {}
        for i, (pid, (group, p)) in enumerate(zip(saved_ids, current)):
            state = state_dict["state"].get(pid)
            if state and "proj_gap" in state:
                projected[pid] = (group, p, state, f"the state of parameter {pid} (loaded into parameter {i}, "
                                                   f"{p.dtype}{tuple(p.shape)})")
        rest = {**state_dict, "state": {k: v for k, v in state_dict["state"].items() if k not in projected}}
        super()._check_loaded(rest, saved_ids)
        for group, p, state, where in projected.values():
            if group.get("rank") is None:  # (loading into a group that does not project)
                raise ValueError(f"{type(self).__name__}: {where} holds a low-rank projection but the group it is "
                                 "loaded into has rank=None")
            step = state.get("step")
            fixed = {**state, "step": step if torch.is_tensor(step) else torch.tensor(float(step or 0))}
            self._check_projected_state(group, p, {k: (v.to(p.device) if torch.is_tensor(v) and k != "step" else v)
                                                   for k, v in fixed.items()}, where)


def _galore_scalars(group, t):
    """(lr, 1 - b1^t, sqrt(1 - b2^t)) of ``group`` at step ``t``, as host floats."""
    b1, b2 = (float(b) for b in group["betas"])
    return float(scalar_lr(group["lr"])), 1.0 - b1 ** t, math.sqrt(1.0 - b2 ** t)


def _galore_adamw_views(group, t, projected):
    """GaLoreAdamW's group for the fused AdamW op at step ``t``: galore-torch's eps outside the bias
    correction and its weight decay after the update, expressed in the op's own formula
    ``p <- p (1 - lr_k wd_k) - lr_k / bc1 * m / (sqrt(v) / sqrt(bc2) + eps_k)``."""
    lr, bc1, s = _galore_scalars(group, t)
    wd = float(group["weight_decay"])
    # galore: p <- (p - lr sqrt(bc2) / bc1 * m / (sqrt(v) + eps)) (1 - lr wd)   [correct_bias]
    #          p <- (p - lr m / (sqrt(v) + eps)) (1 - lr wd)                      [not correct_bias]
    lr_k = lr if group["correct_bias"] else lr * bc1 / s
    if projected:
        return {**group, "lr": lr_k, "eps": float(group["eps"]) / s, "weight_decay": 0.0}
    lr_k = lr_k * (1.0 - lr * wd)
    return {**group, "lr": lr_k, "eps": float(group["eps"]) / s, "weight_decay": (lr * wd / lr_k) if lr_k else 0.0}


class GaLoreAdamW(_LowRank, ElementwiseAdamW):
    r"""galore-torch 1.0's ``GaLoreAdamW``, fused: AdamW (transformers' formula: eps outside the bias
    correction, weight decay applied after the update) on low-rank projections of the 2-D gradients.

    Every parameter (projected or not)::

        m <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        u <- lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)    (correct_bias; else lr m / (sqrt(v) + eps))
        p <- (p - u) (1 - lr wd)

    with, for a projected parameter, g the projected gradient and ``p - u`` replaced by
    ``p - scale * back(u)`` (see :mod:`fastopt.lowrank.optim`).

    Param-group keys (galore-torch's, plus fastopt's): ``rank`` (None: no projection), ``update_proj_gap``,
    ``scale``, ``proj_type`` ("std", "reverse_std", "left", "right", "full"), ``projector`` ("svd",
    "randomized", "dct"), ``proj_bits`` (None, 4, 8: Q-GaLore's quantized projector, ``proj_group_size``,
    ``proj_stochastic``), ``proj_adaptive`` (Q-GaLore's adaptive refresh: ``queue_size``,
    ``cos_threshold``, ``gamma_proj``), ``dct_norm`` (1 or 2) and ``dct_method`` ("matmul", or "fft": the
    same scores through one real FFT per row), ``oversample`` / ``power_iters`` (the randomized projector).
    Each may also be given to the constructor as the default of every group.

    Args:
        params: parameters or param groups.
        lr, betas, eps, weight_decay, correct_bias: galore-torch's (its defaults: eps 1e-6, weight_decay 0).
        maximize, state_bits, min_quant_size, seed, backend: as :class:`fastopt.lowbit.AdamW8bit` (low-bit
            moments apply to the low-rank moments when they have ``min_quant_size`` elements).

    Differs from galore-torch: the moments are fp32 for bf16 parameters (galore: the parameter's
    dtype); the state is plain tensors and ints (``weights_only=True`` loads it); an AMP step skipped
    by ``GradScaler`` is skipped entirely (no refresh, no count); a tensor ``lr`` is read on the host
    once per step (the weight decay and the bias corrections are host numbers).
    """

    def __init__(self, params: Params, lr: Union[float, torch.Tensor] = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, correct_bias: bool = True, *,
                 rank: Optional[int] = None, update_proj_gap: int = 200, scale: float = 1.0, proj_type: str = "std",
                 projector: str = "svd", proj_bits: Optional[int] = None, proj_group_size: int = 256,
                 proj_stochastic: bool = False, proj_adaptive: bool = False, queue_size: int = 5,
                 cos_threshold: float = 0.4, gamma_proj: float = 2, dct_norm: int = 1, dct_method: str = "matmul",
                 oversample: int = 8, power_iters: int = 1, maximize: bool = False,
                 state_bits: Optional[Union[int, str]] = None,
                 min_quant_size: int = 4096, seed: int = 0, backend: str = "auto") -> None:
        lowrank = dict(rank=rank, update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
                       projector=projector, proj_bits=proj_bits, proj_group_size=proj_group_size,
                       proj_stochastic=proj_stochastic, proj_adaptive=proj_adaptive, queue_size=queue_size,
                       cos_threshold=cos_threshold, gamma_proj=gamma_proj, dct_norm=dct_norm, dct_method=dct_method,
                       oversample=oversample, power_iters=power_iters)
        self._setup_lowrank({**lowrank, "correct_bias": bool(correct_bias)})
        super().__init__(params, lr, betas, eps, weight_decay, maximize=maximize, state_bits=state_bits,
                         min_quant_size=min_quant_size, seed=seed, backend=backend)
        self._finish_lowrank()

    def _plain_view(self, group, t):
        return _galore_adamw_views(group, t, projected=False)

    def _fused_step(self, group, p, g, state, side, backend, grad_scale, decay):
        # The triton backend: one GEMM projects the gradient and runs the Adam update in its epilogue
        # (the projected gradient is never stored), a second writes p = decay p + scale decay back(U);
        # an INT4 projector is dequantized in both GEMMs' loads.  (fp32 moments, left/right sides,
        # not maximize, no DTensor: everything else takes the generic path.)
        if (backend != "triton" or side == "full" or group["maximize"] or LowbitStates.holds(state)
                or _sharded.is_dtensor(p) or group["proj_bits"] == 8 or g.dtype != p.dtype):
            return False
        from ..triton_kernels import lowrank as kernels

        lr, bc1, s = _galore_scalars(group, state["host_step"] + 1)
        step_size = lr * s / bc1 if group["correct_bias"] else lr
        if group["proj_bits"] == 4:
            proj, shape = None, self._projector_shapes(group, p)[0]
            int4 = (state["projector_codes"], state["projector_scales"], state["projector_zeros"],
                    group["proj_group_size"])
        else:
            proj, shape, int4 = self._dense_projector(group, p, state).float().contiguous(), None, None
        b1, b2 = (float(b) for b in group["betas"])
        u = kernels.project_adam(g.contiguous(), proj, side, state["exp_avg"], state["exp_avg_sq"], beta1=b1, beta2=b2,
                                 eps=float(group["eps"]), step_size=step_size, grad_scale=grad_scale, int4=int4,
                                 proj_shape=shape)
        state["step"].add_(1)
        kernels.back_project_(p, u, proj, side, beta=decay, alpha=float(group["scale"]) * decay, int4=int4,
                              proj_shape=shape)
        return True

    def _projected_view(self, group, t):
        return _galore_adamw_views(group, t, projected=True)


def _with_projection(base, name, summary):
    """``base`` (an elementwise optimizer) with the projection: its constructor's arguments plus the
    projection keys (keyword-only), a real signature, and the projected step of :class:`_LowRank`."""
    base_sig = inspect.signature(base.__init__)
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v) for k, v in LOWRANK_DEFAULTS.items()]
    sig = base_sig.replace(parameters=list(base_sig.parameters.values()) + extra)

    def __init__(self, *args, **kwargs):
        sig.bind(self, *args, **kwargs)  # (TypeError for a wrong argument, as a real signature gives)
        lowrank = {k: kwargs.pop(k) for k in LOWRANK_DEFAULTS if k in kwargs}
        self._setup_lowrank(lowrank)
        base.__init__(self, *args, **kwargs)
        self._finish_lowrank()

    __init__.__signature__ = sig
    __init__.__doc__ = f"{name}: the arguments of {base.__module__}.{base.__name__}, plus the projection keys."
    doc = (f"""{summary}

    :class:`{base.__module__}.{base.__name__}` stepped in GaLore's low-rank projection: for a projected
    parameter (a 2-D one in a group with a ``rank``) the base update ``u`` of the projected gradient is
    computed with weight decay 0 in the low-rank space (its states live there), then
    ``p <- (p + scale * back(u)) (1 - lr wd)`` (galore-torch's weight decay, after the update, whatever
    the base's weight-decay options); every other parameter takes the base optimizer's plain step.
    The projection keys are those of :class:`GaLoreAdamW`.
    """)
    return type(name, (_LowRank, base), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


GaLoreLion = _with_projection(Lion, "GaLoreLion", "Lion (Chen et al. 2023) with GaLore's gradient projection.")
GaLoreAdan = _with_projection(Adan, "GaLoreAdan", "Adan (Xie et al. 2022) with GaLore's gradient projection.")
GaLoreAdaBelief = _with_projection(AdaBelief, "GaLoreAdaBelief",
                                   "AdaBelief (Zhuang et al. 2020) with GaLore's gradient projection.")
