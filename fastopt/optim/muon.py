"""Muon (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz",
https://kellerjordan.github.io/posts/muon/), with AdamW for the parameters that are not hidden matrices.

Drop-in for ``pytorch_optimizer.Muon`` (4.1.0): same constructor arguments in the same order, the same
``use_muon`` param-group flag and group keys, the same state names (``momentum_buffer`` for Muon
parameters; ``exp_avg`` / ``exp_avg_sq`` for AdamW parameters; the step count in ``group["step"]``),
so state dicts load into each other both ways.  Equations: :func:`fastopt.reference.muon.muon_reference`.
``master_weights=True`` adds ``master_param`` (fp32) to the state of bf16/fp16 parameters.
"""
import importlib
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .. import _backend
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
                 master_weights: bool = False, seed: int = 0, backend: str = "auto") -> None:
        check_rounding_options("Muon", stochastic_rounding, master_weights)
        _check_backend_name(backend)
        muon = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_steps=ns_steps,
                    ns_coeffs=ns_coeffs, ns_method=ns_method, ns_reset_steps=ns_reset_steps,
                    use_adjusted_lr=use_adjusted_lr)
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
            if F.overlaps_itself(value):
                raise ValueError(f"Muon: state {key!r}{where} of shape {tuple(value.shape)} has elements that "
                                 "share memory, so it cannot be updated in place")

    # -- the step: FusedOptimizer's plan, checks and order, with these hooks ---------------------------
    def _sharded_kernel_reason(self, group, params):
        return "Newton-Schulz orthogonalizes whole matrices" if group["use_muon"] else None

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
        R.muon_reference(
            targets, grads, [s["momentum_buffer"] for s in states],
            lr=F.scalar_lr(group["lr"]), momentum=group["momentum"], nesterov=group["nesterov"],
            weight_decay=weight_decay, weight_decouple=group["weight_decouple"], ns_steps=group["ns_steps"],
            ns_coeffs=group["ns_coeffs"], ns_method=group["ns_method"], ns_reset_steps=group["ns_reset_steps"],
            use_adjusted_lr=group["use_adjusted_lr"], maximize=maximize, cautious=bool(group["cautious"]),
            batched=group["foreach"] is not False, newton_schulz_fn=ns_fn)

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
