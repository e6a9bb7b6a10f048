"""Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz",
https://kellerjordan.github.io/posts/muon/), with AdamW for the parameters that are not hidden matrices.

Drop-in for ``pytorch_optimizer.Muon`` (4.1.0): same constructor arguments in the same order, the same
``use_muon`` param-group flag and group keys, the same state names (``momentum_buffer`` for Muon
parameters; ``exp_avg`` / ``exp_avg_sq`` for AdamW parameters; the step count in ``group["step"]``),
so state dicts load into each other both ways.  Equations: :func:`fastopt.reference.muon.muon_reference`.
``master_weights=True`` adds ``master_param`` (fp32) to the state of bf16/fp16 parameters.
"""
import importlib
import math
import zlib
from collections import defaultdict
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend, _sharded
from ..lowbit.layouts import MasterWeights, StochasticRounding, check_rounding_options
from ..reference import muon as R
from ..reference.adam import adam_reference
from . import functional as F
from .base import FusedOptimizer
from .functional import Params

# The backends a Muon group may name: those of the Newton-Schulz row of the capability table.
MUON_BACKENDS = ("auto",) + _backend.CAPABILITIES["newton_schulz"].kernels + ("torch",)
_ADAMW_STATE = ("exp_avg", "exp_avg_sq")


def _newton_schulz_module():
    _backend.triton_kernels()  # BackendUnavailableError when triton (or fastopt.triton_kernels) is missing
    return importlib.import_module("fastopt.triton_kernels.newton_schulz")


def _check_backend_name(backend):
    if backend not in MUON_BACKENDS:
        raise ValueError(f"unknown Muon backend {backend!r}; expected one of {MUON_BACKENDS}")


def resolve_ns_backend(backend, device):
    """Which Newton–Schulz implementation runs matrices on ``device``: "triton" or "torch"
    (:func:`fastopt._backend.resolve` with the ``newton_schulz`` row of its capability table).

    ``auto``: Triton for CUDA tensors when triton is installed, torch otherwise (on a CPU the Triton
    interpreter is a test vehicle, not a fast path).  ``triton`` raises BackendUnavailableError where it
    cannot run: CPU tensors outside ``TRITON_INTERPRET=1``, or triton missing.
    """
    _check_backend_name(backend)
    # (the kernels take the bf16 copy Newton-Schulz iterates on, whatever the parameter's dtype)
    return _backend.resolve(backend, device, torch.bfloat16, op="newton_schulz", name="Muon")


# -- Newton–Schulz in Triton as a custom op (visible to torch.compile; eager calls skip the dispatcher) --
def _ns_triton(G, steps, eps, coeffs):
    triples = [tuple(coeffs[i:i + 3]) for i in range(0, len(coeffs), 3)]
    return _newton_schulz_module().newton_schulz_triton(G, steps=steps, eps=eps, coeffs=triples)


def _ns_triton_op_impl(G: Tensor, steps: int, eps: float, coeffs: List[float]) -> Tensor:
    return _ns_triton(G, steps, eps, coeffs).contiguous()


newton_schulz_triton_ = torch.library.custom_op("fastopt::newton_schulz_triton", mutates_args=())(_ns_triton_op_impl)


@newton_schulz_triton_.register_fake
def _ns_triton_fake(G, steps, eps, coeffs):
    return G.new_empty(G.shape, dtype=torch.bfloat16)


def newton_schulz_triton(G, steps, coeffs, eps=1e-7):
    """bf16 Newton–Schulz of ``G`` with the Triton kernels (see
    :func:`fastopt.triton_kernels.newton_schulz.newton_schulz_triton`); ``coeffs`` is a list of triples.
    Under ``torch.compile`` this is the custom op ``fastopt::newton_schulz_triton`` (contiguous output)."""
    flat = [float(v) for c in coeffs for v in c]
    if torch.compiler.is_compiling():
        return newton_schulz_triton_(G, int(steps), float(eps), flat)
    return _ns_triton(G, int(steps), float(eps), flat)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Invalid {name}: {value!r} (expected an int >= {low})")


# NOTE: [distributed Muon]
# Newton–Schulz needs whole matrices; everything else in a Muon step is elementwise.  A step therefore
# runs the momentum (R.momentum_updates) and the final update (R.apply_updates) on whatever this rank
# holds -- the local shards of DTensor parameters, which give the bits of the whole tensor element by
# element -- and orthogonalizes each matrix exactly once, on one rank, its owner:
# * FSDP2 (DTensors sharded along a dimension of their matrices): one all_to_all_single per process
#   group sends every shard of a matrix to its owner (which concatenates them: the whole update), the
#   owners run Newton–Schulz on all the matrices they own (same-shape ones in one batch), and a second
#   all_to_all_single sends each rank its rows of the result.  The shard sizes follow from the global
#   shape (DTensor's torch.chunk rule: ceil(n / world) rows per rank, uneven or empty at the end), so
#   every rank knows every split size without asking.
# * A stack of matrices (``flatten=False``) sharded along a batch dimension (the experts of a MoE
#   weight under FSDP2): every shard holds whole matrices; each rank orthogonalizes its own, no
#   communication.
# * DDP (plain tensors, the same on every rank of ``process_group``): each matrix's owner
#   orthogonalizes it, one all_gather_into_tensor gives every rank every result.
# Owners are assigned by a greedy balance of the Newton–Schulz cost (rows * cols * min(rows, cols))
# over the matrices of a step, computed from the global shapes alone, so every rank computes the same
# assignment.  The cautious mask (a sum over the whole matrix) is applied by the owner.  Before the
# first exchange (and whenever this rank's set of exchanged parameters changes) the ranks of each group
# compare a checksum of what they are about to exchange, so that ranks stepping different parameters
# get an error instead of a hang or a wrong result.
_dtensor_class = _sharded.dtensor_type  # (also while compiling: a compiled distributed step is refused)


def _is_dtensor(t):
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def _local(t):
    return t.to_local() if _is_dtensor(t) else t


def _chunk_rows(n, world, rank):
    """The rows (along the sharded dimension) of shard ``rank`` of ``n`` split as DTensor's Shard does
    (torch.chunk: ceil(n / world) each, the last ones shorter or empty); returns (start, length)."""
    size = -(-n // world)
    start = min(n, rank * size)
    return start, min(n, start + size) - start


class _Sharding:
    """How a DTensor parameter is split over the ranks of one process group: along tensor dimension
    ``dim``, ``world`` shards, this rank's index ``rank`` (Replicate mesh dimensions are ignored: the
    ranks along them hold the same shards and do the same work)."""

    __slots__ = ("group", "dim", "world", "rank")

    def __init__(self, group, dim, world, rank):
        self.group, self.dim, self.world, self.rank = group, dim, world, rank

    def local_shape(self, shape, rank):
        shape = list(shape)
        shape[self.dim] = _chunk_rows(shape[self.dim], self.world, rank)[1]
        return shape


def _sharding(p, where="Muon"):
    """The :class:`_Sharding` of DTensor ``p``, or None when every rank holds all of it; raises
    NotImplementedError for placements Muon does not exchange (Partial, several sharded mesh
    dimensions, strided shards of FSDP2 + tensor parallelism, uneven shards other than torch.chunk's)."""
    from torch.distributed.tensor import Shard

    placements = tuple(p.placements)
    sharded = [(i, pl) for i, pl in enumerate(placements) if not pl.is_replicate()]
    if not sharded:
        return None
    if len(sharded) > 1 or type(sharded[0][1]) is not Shard:
        raise NotImplementedError(
            f"{where}: a DTensor parameter {tuple(p.shape)} with placements {placements}: Muon gathers whole "
            "matrices along one sharded mesh dimension (FSDP2's Shard(dim) on a 1-D mesh, or with Replicate "
            "dimensions as in HSDP); Partial placements, several sharded mesh dimensions and the strided "
            "shards of FSDP2 + tensor parallelism are not supported")
    mesh_dim, pl = sharded[0]
    mesh = p.device_mesh
    s = _Sharding(mesh.get_group(mesh_dim), pl.dim % p.ndim, mesh.size(mesh_dim), mesh.get_local_rank(mesh_dim))
    local = tuple(p.to_local().shape)
    if local != tuple(s.local_shape(p.shape, s.rank)):
        raise NotImplementedError(
            f"{where}: a DTensor parameter {tuple(p.shape)} has a local shard {local} on shard {s.rank} of "
            f"{s.world}, not the torch.chunk split Muon assumes ({tuple(s.local_shape(p.shape, s.rank))})")
    return s


def _owners(costs, world):
    """A rank for each item: greedy balance of ``costs`` (largest first; ties to the lower rank).
    Deterministic, so every rank computes the same assignment."""
    load = [0] * world
    owners = [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(world), key=lambda r: (load[r], r))
        owners[i] = r
        load[r] += costs[i]
    return owners


def _ns_cost(shape, flatten):
    rows, cols = R.matrix_shape(shape, flatten)
    return math.prod(shape) * min(rows, cols)


def _all_gather(out, inp, group):
    """``out`` <- every rank's ``inp``, in rank order (all_gather_single where torch has it)."""
    import torch.distributed as dist

    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, inp, group=group)


def _group_rank_world(group):
    import torch.distributed as dist

    return dist.get_rank(group), dist.get_world_size(group)


def _all_to_all(send, in_splits, out_splits, dtype, device, group):
    """``torch.distributed.all_to_all_single`` of the concatenation of ``send`` (``in_splits[r]``
    elements to rank r); returns the received elements (``out_splits[r]`` from rank r, in rank order)."""
    import torch.distributed as dist

    inp = torch.cat(send) if send else torch.empty(0, dtype=dtype, device=device)
    out = torch.empty(sum(out_splits), dtype=dtype, device=device)
    dist.all_to_all_single(out, inp, out_splits, in_splits, group=group)
    return out


def _as_process_group(process_group):
    """``process_group`` (a ProcessGroup, a 1-D DeviceMesh or None) as a ProcessGroup or None."""
    if process_group is None:
        return None
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("Muon: process_group was given but torch.distributed is not initialized "
                         "(call torch.distributed.init_process_group first)")
    if hasattr(process_group, "get_group") and hasattr(process_group, "ndim"):  # a DeviceMesh
        if process_group.ndim != 1:
            raise ValueError(f"Muon: process_group: a {process_group.ndim}-D DeviceMesh; pass a 1-D mesh "
                             "(or its ProcessGroup) over the ranks that hold the same parameters")
        return process_group.get_group()
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError(f"Muon: process_group must be a torch.distributed ProcessGroup or a 1-D DeviceMesh, got "
                        f"{type(process_group).__name__}")
    return process_group


class Muon(FusedOptimizer):
    r"""Muon for hidden matrices, AdamW for everything else (Jordan et al. 2024).

    For a parameter P of a ``use_muon=True`` group, viewed as the matrix (rows, cols) = (out,
    in * kh * kw ...), with gradient G, momentum mu, learning rate lr and weight decay wd::

        G <- -G                            (maximize)
        P <- P (1 - lr wd)                 (weight_decouple; else G <- G + wd P)
        M <- mu M + (1 - mu) G             (state "momentum_buffer")
        U <- (1 - mu) G + mu M             (nesterov; else U <- M)
        O <- NS_5(U) ~= U' V'^T for U = U' S V'^T   (bf16 quintic Newton-Schulz, below)
        P <- P - lr * s * O,   s = sqrt(max(1, rows / cols))   or, use_adjusted_lr, 0.2 sqrt(max(rows, cols))

    where NS_5 transposes U to rows <= cols, sets X = U / max(||U||_F, 1e-7) in bf16 and repeats
    ``ns_steps`` times ``A = X X^T; X <- a X + (b A + c A^2) X`` with (a, b, c) = (3.4445, -4.7750,
    2.0315) (or a schedule: ``ns_coeffs`` = "quintic", "polar_express", "polar_express_safer", a triple
    or a list of triples).  The 0.2 sqrt(max(rows, cols)) scale (Moonlight, Liu et al. 2025) gives the
    update the RMS of a typical AdamW update, so AdamW learning rates and weight decays carry over.

    Parameters of ``use_muon=False`` groups (embeddings, output heads, biases, norm gains) take a fused
    AdamW step (:func:`fastopt.optim.functional.adam`, bias-corrected, decoupled weight decay unless
    ``weight_decouple=False``) with the group's ``lr`` / ``betas`` / ``eps`` / ``weight_decay``
    (defaults ``adamw_lr`` / ``adamw_betas`` / ``adamw_eps`` / ``adamw_wd``).

    Args: as ``pytorch_optimizer.Muon`` -- ``params`` is a list of dicts, each with a ``use_muon`` flag
    (upstream's API; a plain iterable of tensors is also accepted and split: tensors with >= 2
    dimensions into a Muon group, the rest into an AdamW group -- put embeddings and output heads in an
    AdamW group yourself); ``ns_method="gram_newton_schulz"`` (fp16 Gram iteration) always runs in
    torch; ``foreach`` (None/True: stack same-shape matrices into one batched Newton–Schulz, False: one
    at a time); ``cautious`` (keyword, upstream's ``**kwargs`` option: zero the update entries whose
    sign disagrees with the gradient, rescaled).  ``backend``: "auto" (Triton Newton–Schulz kernels
    for CUDA tensors when triton is installed, torch otherwise), "triton" (on CPUs only under
    ``TRITON_INTERPRET=1``; else BackendUnavailableError at ``step``) or "torch".  AdamW groups use
    the fused AdamW kernels under "auto"/"triton" and the reference under "torch".

    Parameters may be fp32, bf16 or fp16 (the states take the parameter dtype, as upstream).  For
    low-precision parameters, as every fastopt optimizer (keyword-only, group keys; not both at once):

    * ``master_weights=True`` (bf16/fp16 params): keeps an fp32 copy of each parameter in
      ``state["master_param"]`` (made from ``p.float()`` at the parameter's first step), with fp32
      ``momentum_buffer`` / ``exp_avg`` / ``exp_avg_sq``; the step runs on the copy with the gradients cast
      to fp32 -- exactly what this optimizer does on fp32 parameters fed those gradients -- and the
      parameter gets the copy rounded to nearest.
    * ``stochastic_rounding=True`` (bf16 params; others are unaffected): the step computes the new
      parameter in fp32 from ``p.float()`` and stores it with seeded, counter-based stochastic rounding,
      :func:`fastopt.reference.rounding.bf16_stochastic` ``(new, seed, index, step)`` (``index``: the
      parameter's position in its group's list of bf16 parameters with a gradient on its device;
      ``step``: the group's step count after the step), unbiased and the same bits for the same seed.
      The states stay bf16.  Muon groups: the momentum buffer, the Newton–Schulz input and the gradient
      terms are computed in bf16 exactly as without the option (the L2 term ``g + wd p`` of
      ``weight_decouple=False`` included), only the weight decay and the update ``p - lr s O`` are
      carried in fp32.  AdamW groups: the step runs in :func:`fastopt.reference.adam.adam_reference`
      (the fused kernels take one dtype per call), which does all of its math in fp32 and stores
      ``exp_avg`` / ``exp_avg_sq`` rounded to nearest, as the kernels do.
    * ``seed`` (int): the stochastic-rounding seed.

    ``lr`` (either kind of group) may be a float or a tensor with one element, used as a scalar whatever
    its shape (as torch.optim does).

    ``flatten`` (keyword, also a group key; default True): a Muon parameter with more than two
    dimensions is the matrix (out, in * kh * kw ...), as upstream.  ``flatten=False`` makes it a stack
    of matrices over its last two dimensions -- the (experts, rows, cols) weight of a mixture of experts
    -- each orthogonalized, scaled (by its own rows and cols) and cautious-masked on its own, all of
    them in one batched Newton–Schulz call.

    Distributed training (NOTE: [distributed Muon] in this file): each matrix is orthogonalized once per
    step, on whole matrices, and the result equals the single-process result bit for bit (the same
    matrix goes through the same Newton–Schulz code; everything else is elementwise).

    * FSDP2 (``fully_shard``; DTensor parameters, gradients and states, automatic): the momentum and
      the update run on the local shards; the shards of each matrix are sent to one owner rank (an
      ``all_to_all`` per process group and step), which runs Newton–Schulz on all the matrices it
      owns and sends each rank its rows back.  Owners balance the Newton–Schulz work.  Uneven and empty
      shards work.  A stack of expert matrices (``flatten=False``) sharded along the experts needs no
      exchange: each rank orthogonalizes its own experts.  Supported placements: one ``Shard(dim)``
      mesh dimension (plus Replicate ones, as HSDP); several sharded mesh dimensions, Partial and the
      strided shards of FSDP2 + tensor parallelism raise NotImplementedError, as do stochastic
      rounding (keyed on the index in the whole tensor) and a compiled step.  The AdamW groups step
      the local shards with the fused kernels.
    * DDP: pass ``process_group`` (keyword: a ProcessGroup such as ``torch.distributed.group.WORLD``,
      or a 1-D DeviceMesh) over the ranks that hold the same parameters and gradients: each matrix is
      orthogonalized by one rank and an ``all_gather`` gives every rank every update (the momentum
      stays on every rank, so checkpoints are unchanged).  Without it every rank orthogonalizes every
      matrix -- correct, redundant.  It is not automatic because Muon cannot tell a DDP job (every rank
      steps the same parameters) from pipeline parallelism (each rank steps its own).
    * At the first step (and when a rank's set of exchanged parameters changes) the ranks of each
      group compare what they are about to exchange and raise RuntimeError, before anything is
      written, when they differ (another model, a gradient missing on some ranks).

    Unlike upstream, ``step`` never modifies ``p.grad``, and invalid hyperparameters, sparse or complex
    gradients, non-floating-point parameters, parameters whose elements share memory (``expand()``-ed
    views: an in-place update of them is undefined), < 2-D parameters in a Muon group, states whose
    shape is not their parameter's and unavailable backends raise before anything is written (in any
    group).  ``load_state_dict`` keeps the fp32 states of ``master_weights`` groups fp32 (torch.optim
    would cast them to the parameter's dtype), so a run resumed from a checkpoint is bit-identical to
    an uninterrupted one, and refuses a checkpoint whose states do not fit the parameters' shapes.
    """

    # GradScaler unscales the gradients itself (the steps here are torch ops and F.adam without AMP's scale)
    _step_supports_amp_scaling = False

    def __init__(self, params: Params, lr: Union[float, Tensor] = 2e-2, momentum: float = 0.95,
                 weight_decay: float = 0.0, weight_decouple: bool = True, nesterov: bool = True, ns_steps: int = 5,
                 ns_coeffs: Union[str, Tuple[float, float, float], Sequence[Tuple[float, float, float]]] = "original",
                 use_adjusted_lr: bool = False, adamw_lr: Union[float, Tensor] = 3e-4,
                 adamw_betas: Tuple[float, float] = (0.9, 0.95), adamw_wd: float = 0.0, adamw_eps: float = 1e-10,
                 maximize: bool = False, foreach: Optional[bool] = None, ns_method: str = "newton_schulz",
                 ns_reset_steps: Sequence[int] = (2,), *, cautious: bool = False, stochastic_rounding: bool = False,
                 master_weights: bool = False, seed: int = 0, backend: str = "auto", flatten: bool = True,
                 process_group: Any = None) -> None:
        check_rounding_options("Muon", stochastic_rounding, master_weights)
        _check_backend_name(backend)
        self._process_group = _as_process_group(process_group)
        if self._process_group is not None and _group_rank_world(self._process_group)[0] < 0:
            raise ValueError("Muon: this rank is not a member of process_group")
        muon = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                    ns_coeffs=ns_coeffs, ns_method=ns_method, ns_reset_steps=ns_reset_steps,
                    use_adjusted_lr=use_adjusted_lr, flatten=flatten)
        self._check_muon_hyper(muon, "")
        muon["ns_coeffs"] = R.ns_coefficients(ns_coeffs)
        muon["ns_reset_steps"] = tuple(ns_reset_steps)
        adamw = dict(lr=adamw_lr, betas=tuple(adamw_betas), eps=adamw_eps, weight_decay=adamw_wd)
        self._check_adamw_hyper(adamw, names=("adamw_lr", "adamw_betas", "adamw_eps", "adamw_wd"))
        self._group_defaults = {True: muon, False: adamw}
        # lr and momentum are in the defaults too (schedulers read them: OneCycleLR(cycle_momentum=True)
        # needs "momentum" there); a group takes them from its kind's defaults (_shared_defaults)
        defaults = dict(lr=lr, momentum=momentum, weight_decouple=weight_decouple, maximize=maximize, foreach=foreach,
                        cautious=cautious,
                        stochastic_rounding=stochastic_rounding, master_weights=master_weights, seed=seed,
                        backend=backend)
        super().__init__(self._as_groups(params), defaults)

    # -- param groups -----------------------------------------------------------------------------
    def _shared_defaults(self):
        """The defaults every group gets (``lr`` and ``momentum`` come from the group's kind)."""
        return {k: v for k, v in self.defaults.items() if k not in ("lr", "momentum")}

    @staticmethod
    def _as_groups(params):
        if isinstance(params, torch.Tensor):
            raise TypeError("params must be an iterable of param-group dicts (with a `use_muon` flag) or of "
                            f"Tensors, got {torch.typename(params)}")
        params = list(params)
        if not params or all(isinstance(p, dict) for p in params):
            return params
        if any(isinstance(p, dict) for p in params):
            raise TypeError("Muon: params mixes param-group dicts and tensors")
        matrices = [p for p in params if isinstance(p, torch.Tensor) and p.ndim >= 2]
        rest = [p for p in params if not (isinstance(p, torch.Tensor) and p.ndim >= 2)]
        return ([dict(params=matrices, use_muon=True)] if matrices else []) + \
               ([dict(params=rest, use_muon=False)] if rest else [])

    def add_param_group(self, param_group):
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {torch.typename(param_group)}")
        if "use_muon" not in param_group:
            raise ValueError("Muon: every param group needs a `use_muon` flag: True for hidden weight matrices "
                             "(orthogonalized momentum), False for embeddings, heads, biases and gains (AdamW), "
                             "e.g. dict(params=[...], use_muon=True)")
        kind = bool(param_group["use_muon"])
        for key, value in {**self._group_defaults[kind], **self._shared_defaults()}.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        if kind:
            param_group["ns_coeffs"] = R.ns_coefficients(param_group["ns_coeffs"])
            param_group["ns_reset_steps"] = tuple(param_group["ns_reset_steps"])
            ps = param_group["params"]
            ps = [ps] if isinstance(ps, torch.Tensor) else ps if isinstance(ps, (list, tuple)) else list(ps)
            param_group["params"] = ps
            for p in ps:
                if isinstance(p, torch.Tensor):
                    self._check_matrix(p)
        super().add_param_group(param_group)

    def __setstate__(self, state):
        super().__setstate__(state)
        kinds = getattr(self, "_group_defaults", None)
        for group in self.param_groups:
            if kinds is not None and "use_muon" in group:
                for key, value in kinds[bool(group["use_muon"])].items():
                    group.setdefault(key, value)

    # -- checkpoints (FusedOptimizer's load hooks keep the fp32 states of master_weights groups fp32) --------
    def _check_loaded(self, state_dict, saved_ids):
        """Refuse (ValueError, before anything is loaded) a checkpoint whose states do not have their
        parameters' shapes; groups of other sizes are left to torch's own error."""
        if [len(g["params"]) for g in state_dict["param_groups"]] != [len(g["params"]) for g in self.param_groups]:
            return
        current = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, current):
            state = state_dict["state"].get(pid)
            if state:
                self._check_state(p, state, f" of parameter {pid} in the checkpoint")

    # -- validation (raises before anything is written) ----------------------------------------------
    @staticmethod
    def _check_muon_hyper(group, where):
        F.check_hyper("learning rate" + where, group["lr"])
        F.check_hyper("momentum" + where, group["momentum"], high=1.0, high_open=True)
        F.check_hyper("weight_decay value" + where, group["weight_decay"])
        _check_int("ns_steps" + where, group["ns_steps"], 1)
        R.ns_coefficients(group["ns_coeffs"])
        if group["ns_method"] not in R.NS_METHODS:
            raise ValueError(f"Invalid ns_method{where}: {group['ns_method']!r} (expected one of {R.NS_METHODS})")
        try:
            resets = tuple(group["ns_reset_steps"])
        except TypeError:
            raise ValueError(f"Invalid ns_reset_steps{where}: {group['ns_reset_steps']!r} (expected a tuple of ints)") \
                from None
        for r in resets:
            _check_int("ns_reset_steps entry" + where, r, 0)
        if not isinstance(group.get("flatten", True), bool):
            raise ValueError(f"Invalid flatten{where}: {group['flatten']!r} (expected a bool)")

    @staticmethod
    def _check_adamw_hyper(group, names=("learning rate", "betas", "epsilon value", "weight_decay value"), where=""):
        F.check_hyper(names[0] + where, group["lr"])
        betas = group["betas"]
        if len(betas) != 2:
            raise ValueError(f"Invalid {names[1]}{where}: expected two values, got {betas!r}")
        for i, b in enumerate(betas):
            F.check_hyper(f"{names[1]}{where} at index {i}", b, high=1.0, high_open=True)
        F.check_hyper(names[2] + where, group["eps"])
        F.check_hyper(names[3] + where, group["weight_decay"])

    def _check_group(self, group):
        check_rounding_options("Muon", group.get("stochastic_rounding"), group.get("master_weights"))
        seed = group.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"Invalid seed: {seed!r} (expected an int)")
        _check_backend_name(group.get("backend", "auto"))
        if group["use_muon"]:
            self._check_muon_hyper(group, "")
        else:
            self._check_adamw_hyper(group, where=" (use_muon=False group)")

    @staticmethod
    def _check_matrix(p):
        if p.ndim < 2:
            raise ValueError(f"Muon: a use_muon=True group holds a {p.ndim}-D parameter of shape {tuple(p.shape)}; "
                             "Newton-Schulz orthogonalizes matrices: put biases, gains and other < 2-D parameters "
                             "in a use_muon=False (AdamW) group")

    def _check_group_param(self, group, p):
        if group["use_muon"]:
            self._check_matrix(p)
        if _is_dtensor(p):
            self._check_dtensor_param(group, p)
        elif self._ddp() is not None and torch.compiler.is_compiling():
            raise NotImplementedError("Muon: a compiled step with process_group (the Newton-Schulz updates are "
                                      "exchanged between ranks); step this optimizer eagerly")

    @staticmethod
    def _check_dtensor_param(group, p):
        """A DTensor parameter (FSDP2) with a gradient: what the step cannot do raises here, before
        anything is written (NOTE: [distributed Muon])."""
        if torch.compiler.is_compiling():
            raise NotImplementedError("Muon: a compiled step of DTensor (FSDP2) parameters (Newton-Schulz gathers "
                                      "whole matrices between ranks); step this optimizer eagerly")
        if StochasticRounding.uses(group, p):
            raise NotImplementedError("Muon: stochastic rounding of DTensor (FSDP2) parameters: it is keyed on the "
                                      "element's index in the whole tensor; use master_weights=True")
        g = p.grad
        if not _is_dtensor(g) or tuple(g.placements) != tuple(p.placements) or g.device_mesh != p.device_mesh:
            what = f"placements {tuple(g.placements)}" if _is_dtensor(g) else f"a {type(g).__name__}"
            raise ValueError(f"Muon: the gradient of a DTensor parameter {tuple(p.shape)} with placements "
                             f"{tuple(p.placements)} has {what}; it must be a DTensor with the parameter's mesh "
                             "and placements")
        if group["use_muon"]:
            _sharding(p)

    def _check_state_of(self, group, p, state):
        self._check_state(p, state)
        return [key for key in (MasterWeights.KEY, "momentum_buffer") + _ADAMW_STATE if key in state]

    @staticmethod
    def _check_state(p, state, where=""):
        """Raise ValueError when a state tensor that the step writes does not fit parameter ``p``."""
        for key in (MasterWeights.KEY, "momentum_buffer") + _ADAMW_STATE:
            value = (state or {}).get(key)
            if value is None:
                continue
            if not isinstance(value, Tensor) or value.shape != p.shape or not value.is_floating_point():
                what = f"{value.dtype}{tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
                raise ValueError(f"Muon: state {key!r}{where} is {what}, its parameter {p.dtype}{tuple(p.shape)} "
                                 "(a checkpoint of other parameters, or of these in another order?)")
            if _is_dtensor(p) and not (_is_dtensor(value) and tuple(value.placements) == tuple(p.placements)):
                what = f"placements {tuple(value.placements)}" if _is_dtensor(value) else "a plain tensor"
                raise ValueError(f"Muon: state {key!r}{where} of a DTensor parameter with placements "
                                 f"{tuple(p.placements)} is {what}; it must be a DTensor with the parameter's "
                                 "placements (load sharded optimizer states with torch.distributed.checkpoint, "
                                 "e.g. set_optimizer_state_dict)")
            if F.overlaps_itself(value):
                raise ValueError(f"Muon: state {key!r}{where} of shape {tuple(value.shape)} has elements that "
                                 "share memory, so it cannot be updated in place")

    # -- the step: FusedOptimizer's plan, checks and order, with these hooks ---------------------------
    def _ddp(self):
        """(process_group, rank, world) when the plain-tensor Muon matrices are shared out over ranks,
        else None (no process_group, or a group of one rank)."""
        pg = self.__dict__.get("_process_group")
        if pg is None:
            return None
        rank, world = _group_rank_world(pg)
        return (pg, rank, world) if world > 1 else None

    def _plan(self):
        plan = super()._plan()
        if not torch.compiler.is_compiling():
            self._check_ranks_agree()
        return plan

    def _exchange_signatures(self):
        """{process group: (device, [what this rank exchanges over it])}: every Muon parameter that is a
        DTensor sharded over the group, or a plain tensor under ``process_group``, with its group's
        options that change the exchange, its shape, dtype, placements and whether it has a gradient."""
        sigs = {}
        ddp = self._ddp()
        if ddp is None and _dtensor_class() is None:
            return sigs
        for gi, group in enumerate(self.param_groups):
            if not group["use_muon"]:
                continue
            head = (gi, bool(group["cautious"]), bool(group["nesterov"]), bool(group["flatten"]), group["ns_method"])
            for pi, p in enumerate(group["params"]):
                if not isinstance(p, Tensor):
                    continue
                if _is_dtensor(p):
                    dims = [i for i, pl in enumerate(p.placements) if not pl.is_replicate()]
                    if not dims:
                        continue
                    pg, device = p.device_mesh.get_group(dims[0]), p.to_local().device
                elif ddp is not None:
                    pg, device = ddp[0], p.device
                else:
                    continue
                entry = sigs.setdefault(pg, (device, []))
                entry[1].append(head + (pi, tuple(p.shape), str(p.dtype), p.grad is not None,
                                        str(tuple(getattr(p, "placements", ())))))
        return sigs

    def _check_ranks_agree(self):
        """Raise (on every rank, before anything is written) when the ranks of a process group would
        exchange different matrices; checked at the first step and whenever this rank's set changes."""
        agreed = self.__dict__.setdefault("_agreed", {})
        for pg, (device, entries) in self._exchange_signatures().items():
            crc = zlib.crc32(repr(entries).encode())
            if agreed.get(id(pg), (None, None))[1] == crc:
                continue
            rank, world = _group_rank_world(pg)
            mine = torch.tensor([crc, len(entries)], dtype=torch.int64, device=device)
            everyone = torch.empty(2 * world, dtype=torch.int64, device=device)
            _all_gather(everyone, mine, pg)
            rows = everyone.view(world, 2).tolist()
            differ = [r for r, row in enumerate(rows) if row != rows[rank]]
            if differ:
                raise RuntimeError(
                    f"Muon: ranks {differ} of a process group of {world} would exchange other Muon matrices than "
                    f"rank {rank} this step (other parameters, shapes, dtypes, placements or options, or gradients "
                    "on some ranks only); every rank of the group must step the same parameters")
            agreed[id(pg)] = (pg, crc)

    def _resolve_backend(self, group, device, dtype, dense):
        """Muon groups: the Newton–Schulz backend; AdamW groups: what :func:`F.adam` is asked for."""
        if group["use_muon"]:
            return resolve_ns_backend(group["backend"], device)
        return "torch" if group["backend"] == "torch" else "auto"

    def _step_view(self, group):
        return group  # (the group's step count advances in _begin_group; the lr is read per bucket)

    def _begin_group(self, group):
        return F.advance_group_step(group)  # (compiled: the step count and lr as tensors)

    def _ensure_state(self, group, p):
        self._init_state(group, p, self.state[p])

    def _init_state(self, group, p, state):
        """Create missing state of ``p``.  The states take the dtype of what the step updates: fp32 next to
        an fp32 master copy, else the parameter's (states of another dtype -- an option switched after
        some steps, or a checkpoint saved without it -- are converted)."""
        like = p
        if MasterWeights.uses(group, p):
            master = state.get(MasterWeights.KEY)
            if master is None:
                master = MasterWeights.create(p)
            elif master.dtype != torch.float32:
                master = master.float()
            state[MasterWeights.KEY] = like = master
        for key in (("momentum_buffer",) if group["use_muon"] else _ADAMW_STATE):
            if key not in state:
                state[key] = torch.zeros_like(like, memory_format=torch.preserve_format)
            elif state[key].dtype != like.dtype:
                state[key] = state[key].to(like.dtype)

    def state_dict(self):
        F.sync_group_steps(self.param_groups)  # (group['step'] after compiled steps)
        return super().state_dict()

    def _step_bucket(self, group, params, grads, backend, grad_scale, found_inf):
        """``backend``: the Newton–Schulz backend of a Muon group, what F.adam is asked for in an AdamW
        group.  (``grad_scale`` / ``found_inf`` stay None: GradScaler unscales for Muon itself.)"""
        states = [self.state[p] for p in params]
        master = MasterWeights.uses(group, params[0])
        sr = StochasticRounding.uses(group, params[0])
        if master:  # step the fp32 copies with fp32 gradients, as on fp32 params
            targets, grads = MasterWeights.redirect(grads, states)
        elif sr:  # step fp32 copies (grads and states stay bf16), then round them stochastically
            targets = [p.float() for p in params]
        else:
            targets = params
        if group["use_muon"]:
            self._muon_bucket(group, targets, grads, states, backend, params if sr else None)
        else:
            self._adamw_bucket(group, targets, grads, states, params[0].device, sr, backend)
        if master:
            MasterWeights.write_back(params, targets)
        elif sr:
            StochasticRounding.write(params, targets, group["seed"], range(len(params)), [group["step"]] * len(params))

    def _muon_bucket(self, group, targets, grads, states, ns_backend, sr_params=None):
        """``targets``: the tensors updated (the params, or fp32 copies); ``sr_params``: the bf16 params
        under stochastic rounding (``targets`` are then their fp32 copies)."""
        ns_fn = None
        if ns_backend == "triton":
            def ns_fn(x, steps, coeffs):
                return newton_schulz_triton(x, steps, coeffs)
        maximize, weight_decay = bool(group["maximize"]), group["weight_decay"]
        if sr_params is not None and not group["weight_decouple"] and weight_decay > 0.0:
            # The L2 term, in bf16 as the reference computes it on bf16 params: g + wd p on the fp32
            # copy would make g fp32, and the bf16 momentum buffer's lerp_ needs one dtype.
            grads = [(g.neg() if maximize else g).add(p, alpha=weight_decay) for g, p in zip(grads, sr_params)]
            maximize, weight_decay = False, 0.0
        bufs = [s["momentum_buffer"] for s in states]
        hyper = dict(lr=F.scalar_lr(group["lr"]), momentum=group["momentum"], nesterov=group["nesterov"],
                     weight_decay=weight_decay, weight_decouple=group["weight_decouple"], maximize=maximize)
        ortho = dict(ns_steps=group["ns_steps"], ns_coeffs=group["ns_coeffs"], ns_method=group["ns_method"],
                     ns_reset_steps=group["ns_reset_steps"], use_adjusted_lr=group["use_adjusted_lr"],
                     batched=group["foreach"] is not False, newton_schulz_fn=ns_fn, flatten=group["flatten"])
        if self._ddp() is None and not any(_is_dtensor(t) for t in targets):
            R.muon_reference(targets, grads, bufs, cautious=bool(group["cautious"]), **hyper, **ortho)
            return
        keep = [i for i, t in enumerate(targets) if t.numel() > 0]  # (global sizes: the same on every rank)
        if not keep:
            return
        targets, shapes = [targets[i] for i in keep], [tuple(targets[i].shape) for i in keep]
        local = [_local(targets[i]) for i in keep]
        updates, refs = R.momentum_updates(local, [_local(grads[i]) for i in keep], [_local(bufs[i]) for i in keep],
                                           **hyper)
        results = self._orthogonalize_across_ranks(group, targets, shapes, updates, refs, ortho)
        R.apply_updates(local, results, lr=hyper["lr"], use_adjusted_lr=group["use_adjusted_lr"],
                        flatten=group["flatten"], shapes=shapes)

    def _orthogonalize_across_ranks(self, group, targets, shapes, updates, refs, ortho):
        """The orthogonalized (and cautious-masked) update of each of ``targets`` (global ``shapes``),
        as this rank holds it: its local shard of a sharded DTensor, the whole tensor otherwise.
        ``updates`` / ``refs``: this rank's part of each update and of what the cautious mask compares
        it with.  Each matrix goes through Newton–Schulz once, on its owner (NOTE: [distributed Muon])."""
        flatten, cautious = bool(group["flatten"]), bool(group["cautious"])
        send_refs = cautious and not group["nesterov"]  # (nesterov: the reference is the update itself)
        out_dtype = R.ns_output_dtype(ortho["ns_method"])
        dtype, device = updates[0].dtype, updates[0].device
        if any(u.dtype != dtype or r.dtype != dtype for u, r in zip(updates, refs)):
            raise RuntimeError("Muon: the updates of one bucket have several dtypes")
        whole = {}  # index -> (whole update, whole reference): the matrices this rank orthogonalizes
        here = []  # indices this rank holds whole matrices of and orthogonalizes itself
        sharded = {}  # process group -> [(index, _Sharding)]: gathered to owners
        ddp, replicated = self._ddp(), []
        for i, t in enumerate(targets):
            s = _sharding(t) if _is_dtensor(t) else None
            if _is_dtensor(t):
                if s is None or s.world == 1 or (not flatten and t.ndim > 2 and s.dim < t.ndim - 2):
                    here.append(i)  # replicated, or shards of whole matrices (a stack split along its batch)
                else:
                    sharded.setdefault(s.group, []).append((i, s))
            elif ddp is not None:
                replicated.append(i)
            else:
                here.append(i)
        for i in here:
            whole[i] = (updates[i], refs[i])
        # 1. every shard of a matrix to its owner: one all_to_all per process group
        exchanges = []
        k = 2 if send_refs else 1
        for pg, items in sharded.items():
            world, rank = items[0][1].world, items[0][1].rank
            owners = _owners([_ns_cost(shapes[i], flatten) for i, _ in items], world)
            size = lambda i, s, r: math.prod(s.local_shape(shapes[i], r))  # noqa: E731
            send, in_splits = [], [0] * world
            for dst in range(world):
                for (i, s), o in zip(items, owners):
                    if o == dst:
                        send += [updates[i].reshape(-1)] + ([refs[i].reshape(-1)] if send_refs else [])
                        in_splits[dst] += k * size(i, s, rank)
            out_splits = [sum(k * size(i, s, src) for (i, s), o in zip(items, owners) if o == rank)
                          for src in range(world)]
            recv = _all_to_all(send, in_splits, out_splits, dtype, device, pg)
            pieces, pos = defaultdict(lambda: ([], [])), 0
            for src in range(world):
                for (i, s), o in zip(items, owners):
                    if o == rank:
                        shape, n = s.local_shape(shapes[i], src), size(i, s, src)
                        for j in range(k):
                            pieces[i][j].append(recv[pos:pos + n].view(shape))
                            pos += n
            for (i, s), o in zip(items, owners):
                if o == rank:
                    u = torch.cat(pieces[i][0], dim=s.dim)
                    whole[i] = (u, torch.cat(pieces[i][1], dim=s.dim) if send_refs else u)
            exchanges.append((pg, items, owners, world, rank))
        if replicated:
            owners = _owners([_ns_cost(shapes[i], flatten) for i in replicated], ddp[2])
            for i, o in zip(replicated, owners):
                if o == ddp[1]:
                    whole[i] = (updates[i], refs[i])
        # 2. Newton-Schulz once per matrix, on its owner (same-shape matrices in one batch)
        mine = sorted(whole)
        done = R.orthogonalize([whole[i][0] for i in mine], **ortho)
        if cautious:
            done = [R.cautious_update(o, whole[i][1], flatten) for o, i in zip(done, mine)]
        done = dict(zip(mine, done))
        results = [done.get(i) for i in range(len(targets))]
        # 3. each rank its rows of each result (all_to_all), or every result to every rank (all_gather)
        for pg, items, owners, world, rank in exchanges:
            send, in_splits = [], [0] * world
            for dst in range(world):
                for (i, s), o in zip(items, owners):
                    if o == rank:
                        start, length = _chunk_rows(shapes[i][s.dim], world, dst)
                        part = done[i].narrow(s.dim, start, length)
                        send.append(part.reshape(-1).to(out_dtype))
                        in_splits[dst] += part.numel()
            out_splits = [sum(math.prod(s.local_shape(shapes[i], rank)) for (i, s), o in zip(items, owners)
                              if o == src) for src in range(world)]
            recv, pos = _all_to_all(send, in_splits, out_splits, out_dtype, device, pg), 0
            for src in range(world):
                for (i, s), o in zip(items, owners):
                    if o == src:
                        shape = s.local_shape(shapes[i], rank)
                        results[i] = recv[pos:pos + math.prod(shape)].view(shape)
                        pos += math.prod(shape)
        if replicated:
            pg, rank, world = ddp
            totals = [sum(math.prod(shapes[i]) for i, o in zip(replicated, owners) if o == r) for r in range(world)]
            width = max(totals)
            mine = [done[i].reshape(-1).to(out_dtype) for i, o in zip(replicated, owners) if o == rank]
            buf = torch.cat(mine + [torch.zeros(width - totals[rank], dtype=out_dtype, device=device)])
            gathered = torch.empty(world * width, dtype=out_dtype, device=device)
            _all_gather(gathered, buf, pg)
            for r in range(world):
                pos = r * width
                for i, o in zip(replicated, owners):
                    if o == r:
                        results[i] = gathered[pos:pos + math.prod(shapes[i])].view(shapes[i])
                        pos += math.prod(shapes[i])
        return results

    def _adamw_bucket(self, group, targets, grads, states, device, sr, backend):
        # The step count is per group (as upstream); the fused kernel reads and increments per-tensor fp32
        # counters, so hand it throwaway ones holding step - 1.
        step = group["step"]
        if torch.is_tensor(step):  # compiled (F.advance_group_step)
            steps = list((step.to(device=device, dtype=torch.float32) - 1).expand(len(targets)).clone().unbind(0))
        else:
            steps = list(torch.full((len(targets),), float(step - 1), dtype=torch.float32, device=device).unbind(0))
        beta1, beta2 = (float(b) for b in group["betas"])
        kwargs = dict(lr=F.scalar_lr(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], decoupled=bool(group["weight_decouple"]), amsgrad=False,
                      maximize=bool(group["maximize"]))
        exp_avgs, exp_avg_sqs = [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states]
        if sr:  # fp32 copies of bf16 params with bf16 grads and states: F.adam takes one dtype per call
            adam_reference(targets, grads, exp_avgs, exp_avg_sqs, [], steps, **kwargs)
        else:
            F.adam(targets, grads, exp_avgs, exp_avg_sqs, [], steps, backend=backend, **kwargs)
