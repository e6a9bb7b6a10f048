"""The ``lowrank`` benchmark suite: :mod:`fastopt.lowrank` (GaLore projection) beside galore-torch 1.0.

``python -m fastopt.bench --suite lowrank --device cpu`` times three configs (``--quick``: a 512 x 256
layer at rank 32 and a 60-step training run, no bars):

* ``step-4096x4096-r128`` -- one ``opt.step()`` of a 4096 x 4096 fp32 layer at rank 128 (``proj_type``
  "std", ``scale`` 0.25, lr 1e-3, no weight decay) BETWEEN refreshes: ``update_proj_gap`` is 10^9 and the
  projector is made in the setup, so every timed call is a plain projected step (project the gradient,
  Adam update in the 4096 x 128 space, project back into the parameter).  Methods: ``fastopt-svd``
  (``GaLoreAdamW``, cpu backend, a dense fp32 projector), ``fastopt-svd-int4`` (``proj_bits=4``: the
  projector is dequantized in every step), ``fastopt-dct`` (128 DCT column indices; the basis columns are
  gathered in every step), ``fastopt-svd-state8`` (``state_bits=8`` moments), ``galore-torch``
  (``galore_torch.GaLoreAdamW``, the baseline) and ``torch-adamw-full`` (``torch.optim.AdamW(fused=True)``
  on the whole matrix: the full-rank step and its state).  The projector is made beforehand by one cheap
  refresh (fastopt: a first step with ``projector="randomized"``, then the group's ``projector`` is set to
  the method's; galore-torch: its projector object gets that ortho_matrix at step 1): a step between
  refreshes costs the same whatever made the projector, and this spares a 4096^2 SVD per setup.
  Memory: ``state_MB`` counts every tensor in the optimizer's state after the timed steps; the info columns
  ``proj_KB`` / ``mom_KB`` split it (projector: the dense matrix, the INT4 codes + scales + zeros, or the
  DCT indices; galore-torch: its projector's ``ortho_matrix``; moments: ``exp_avg`` + ``exp_avg_sq``, or
  their 8-bit codes + absmax), measured on the real state when the cases are listed (one step of each
  optimizer), and ``basis_KB`` is the DCT basis the dct projector reads (one n x n fp32 matrix per size
  and device, shared by every layer of that size, not in the optimizer state).

* ``refresh-4096x4096-r128`` -- one projector refresh of a 4096 x 4096 fp32 gradient at rank 128:
  ``galore-torch`` (``GaLoreProjector.get_orthogonal_matrix``: a full fp32 SVD; the baseline),
  ``fastopt-svd`` (:func:`~fastopt.lowrank.projectors.svd_projector`, the same SVD), ``fastopt-randomized``
  (:func:`~fastopt.lowrank.projectors.randomized_projector` warm-started from the previous projector, as
  the optimizer's refreshes after the first), ``fastopt-rand-cold`` (the first refresh),
  ``fastopt-dct`` (:func:`~fastopt.lowrank.projectors.dct_select` with its default matmul scoring, what
  the optimizer calls), ``fastopt-dct-fft`` (the same selection through an FFT per row) and
  ``fastopt-int4-quant`` (:func:`~fastopt.lowrank.quant.quantize_projector` of a 128 x 4096 projector,
  the extra work of an INT4 refresh).  The gradient has a decaying spectrum (a sum of 512 random rank-one
  terms with weights 1 / (1 + i / 8), plus 1 % Gaussian noise; the previous projector of the warm start is
  that of a 20 % perturbation of it) and ``sub_err`` is
  :func:`~fastopt.lowrank.projectors.subspace_error` of each method's projector on it (the SVD's is the
  optimum).  The DCT basis is built in the setup (once per size, shared).  Cost: at full size the two SVD
  cases are timed with 2 warm-up and 2 timed calls per round (3 rounds: 12 SVDs of about 12 s each per
  method on the 2-core EPYC), the other refreshes (1 to 3 s each) with 2 + 3, instead of the usual 1 s
  budget and 10 repeats -- the suite sets the shared Context's repeats for them and restores them for the
  next case.

* ``train-mlp-<steps>`` -- a 4-layer MLP (32 -> 128 -> 128 -> 128 -> 8, tanh) fitted to a fixed random
  teacher network (MSE, 1024 samples, batches of 128 in a fixed order), trained :data:`TRAIN_STEPS` steps
  from one init with ``galore-torch`` and with fastopt's ``GaLoreAdamW`` for each projector (the three
  128-row matrices projected at rank 16, gap 50, scale 0.25, lr 1e-2; ``fastopt-svd-adaptive``: Q-GaLore's
  adaptive gap starting at 10).  ``loss`` is the mean loss of the last 10 steps (measured when the cases
  are listed), ``galore/ours`` the reference galore-torch run's loss over it: ``galore-torch`` (gap
  50), or for the adaptive run ``galore-torch-gap10`` (galore-torch at the same starting gap: a refresh
  every 10 steps costs GaLore some loss on this task, which is not the projector's doing).  The timed call
  is one training step (forward, backward, ``opt.step()``; a refresh every gap steps).
  tests/test_lowrank_training.py runs the same task.

On a GPU (``--device cuda``, what ``python -m fastopt.gpucheck`` runs) only the step config runs:
``fastopt-triton`` (``backend="triton"``: the projection with the Adam epilogue and the back-projection as
two Triton GEMMs), ``fastopt-triton-int4`` (the INT4 projector dequantized in the GEMMs' loads),
``fastopt-cuda`` (the generic path: cuBLAS matmuls and the CUDA elementwise kernel), ``galore-torch`` and
full AdamW; no bars (the targets are the CPU's).

Bars (full size, CPU): ``fastopt-svd`` step >= 2x galore-torch; ``fastopt-randomized`` refresh >= 5x and
``fastopt-dct`` refresh >= 10x galore-torch's SVD; every fastopt training run's ``galore/ours``
(its reference galore-torch run's loss / ours) >= 1 / 1.05, i.e. a loss at most 5 % above galore-torch's.
A loss bar is judged "noisy" when the row's timing ran under CPU pressure (the harness's rule for every bar),
although the loss itself does not depend on it.
"""
import copy
import gc
import math
from dataclasses import dataclass

import torch

from .harness import Bar, Case, Suite, Unsupported, Workload, register, speedup_key

BASELINE = "galore-torch"
SLOW_REPEATS = 2  # timed calls per round of the full-size SVD cases (plus the harness's 2 warm-ups)
REFRESH_REPEATS = 3  # timed calls per round of the other full-size refresh cases (about 1 to 3 s each)
LR = 1e-3
SCALE = 0.25
HUGE_GAP = 10 ** 9

STEP_METHODS = ("fastopt-svd", "fastopt-svd-int4", "fastopt-dct", "fastopt-svd-state8", BASELINE, "torch-adamw-full")
GPU_STEP_METHODS = ("fastopt-triton", "fastopt-triton-int4", "fastopt-cuda", BASELINE, "torch-adamw-full")
GPU_BACKENDS = {"fastopt-triton": "triton", "fastopt-triton-int4": "triton", "fastopt-cuda": "cuda"}
REFRESH_METHODS = (BASELINE, "fastopt-svd", "fastopt-randomized", "fastopt-rand-cold", "fastopt-dct",
                   "fastopt-dct-fft", "fastopt-int4-quant")
GALORE_SHORT_GAP = "galore-torch-gap10"  # galore-torch at the adaptive run's starting gap: its reference
TRAIN_METHODS = (BASELINE, "fastopt-svd", "fastopt-randomized", "fastopt-dct", "fastopt-svd-int4", GALORE_SHORT_GAP,
                 "fastopt-svd-adaptive")
# the galore-torch run each fastopt training run is compared with (the same starting refresh gap)
TRAIN_REFERENCE = {"fastopt-svd-adaptive": GALORE_SHORT_GAP}
LOSS_TOLERANCE = 1.05  # a fastopt run's final loss may be at most 5 % above galore-torch's
RATIO = "galore/ours"  # the training rows' bar metric: the reference galore-torch loss / the run's loss

# the projector keys of each fastopt method (step and training configs)
FASTOPT_KEYS = {
    "fastopt-svd": dict(projector="svd"),
    "fastopt-randomized": dict(projector="randomized"),
    "fastopt-dct": dict(projector="dct"),
    "fastopt-svd-int4": dict(projector="svd", proj_bits=4),
    "fastopt-svd-state8": dict(projector="svd"),
    "fastopt-svd-adaptive": dict(projector="svd", proj_adaptive=True),
    # on a GPU (the step config only): the triton backend's fused GEMMs, the cuda backend's generic path
    "fastopt-triton": dict(projector="svd"),
    "fastopt-triton-int4": dict(projector="svd", proj_bits=4),
    "fastopt-cuda": dict(projector="svd"),
}


@dataclass(frozen=True)
class Layer:
    """One m x n fp32 layer projected at ``rank``."""

    m: int
    n: int
    rank: int

    @property
    def shape(self):
        """``"<m>x<n>-r<rank>"``, the configs' suffix."""
        return f"{self.m}x{self.n}-r{self.rank}"

    @property
    def side(self):
        """The side galore's ``proj_type="std"`` projects this layer on (the suite's proj_type)."""
        from ..lowrank.projectors import projection_side

        return projection_side((self.m, self.n), "std")


FULL_LAYER = Layer(4096, 4096, 128)
QUICK_LAYER = Layer(512, 256, 32)
TRAIN_STEPS = 300
QUICK_TRAIN_STEPS = 60


# -- helpers ------------------------------------------------------------------------------------------------
def _release():
    gc.collect()


def _require_lowrank():
    try:
        from .. import lowrank  # noqa: F401
        from ..lowrank import projectors, quant  # noqa: F401
    except ImportError as e:  # pragma: no cover - the package is part of fastopt
        raise Unsupported(f"fastopt.lowrank cannot be imported ({e})") from e


def _galore_torch():
    try:
        import galore_torch
        from galore_torch.galore_projector import GaLoreProjector
    except ImportError as e:
        raise Unsupported(f"galore-torch is not installed ({e})") from e
    return galore_torch, GaLoreProjector


def _galore_adamw(groups, **kw):
    galore_torch, _ = _galore_torch()
    return galore_torch.GaLoreAdamW(groups, lr=kw.pop("lr", LR), no_deprecation_warning=True, **kw)


def state_breakdown(opt):
    """Bytes of every tensor in ``opt.state``, split into ``projector`` (fastopt's projector keys, or
    galore-torch's ``GaLoreProjector.ortho_matrix``), ``moments`` (every other tensor with more than one
    element: exp_avg, exp_avg_sq or their low-bit codes and scales) and ``other`` (scalars: step
    counters; the adaptive refresh's queue and last vector)."""
    from ..lowrank.optim import PROJECTOR_KEYS

    out = {"projector": 0, "moments": 0, "other": 0}
    for state in opt.state.values():
        for key, value in state.items():
            if torch.is_tensor(value):
                kind = ("projector" if key in PROJECTOR_KEYS else
                        "other" if value.numel() <= 1 or key in ("proj_queue", "proj_past") else "moments")
                out[kind] += value.nbytes
            elif hasattr(value, "ortho_matrix"):  # galore-torch's projector object
                mats = value.ortho_matrix
                mats = [] if mats is None else list(mats) if isinstance(mats, (list, tuple)) else [mats]
                out["projector"] += sum(t.nbytes for t in mats)
    out["total"] = sum(out.values())
    return out


def structured_grad(m, n, seed=0, *, terms=512, noise=0.01, like=None, perturb=0.0):
    """An m x n fp32 "gradient" with a decaying spectrum: ``sum_i w_i x_i y_i^T`` over ``terms`` random
    unit-ish Gaussian vectors with ``w_i = 1 / (1 + i / 8)``, plus ``noise`` times Gaussian noise of the
    same Frobenius scale; ``perturb`` > 0 adds that fraction of fresh terms to ``like`` instead (the next
    refresh's gradient: a related one)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(terms, m, n)
    w = 1.0 / (1.0 + torch.arange(k, dtype=torch.float32) / 8.0)
    X = torch.randn(m, k, generator=gen) / math.sqrt(m)
    Y = torch.randn(n, k, generator=gen) / math.sqrt(n)
    G = (X * w) @ Y.T
    G += noise * w.norm() / math.sqrt(m * n) * torch.randn(m, n, generator=gen)
    if like is not None:
        G = like + perturb * (like.norm() / G.norm()) * G
    return G


# -- step between refreshes -------------------------------------------------------------------------------
def _step_optimizer(method, layer, seed=0, device=torch.device("cpu")):
    """(optimizer, parameter) with its gradient set and the projector already made (see the module doc)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.nn.Parameter((torch.randn(layer.m, layer.n, generator=gen) * 0.02).to(device))
    W.grad = torch.randn(layer.m, layer.n, generator=gen).to(device)
    group = dict(params=[W], rank=layer.rank, update_proj_gap=HUGE_GAP, scale=SCALE, proj_type="std")
    if method == "torch-adamw-full":
        opt = torch.optim.AdamW([W], lr=LR, weight_decay=0.0, eps=1e-6, fused=True)
        opt.step()
        return opt, W
    if method == BASELINE:
        _, GaLoreProjector = _galore_torch()
        from ..lowrank.projectors import randomized_projector

        opt = _galore_adamw([group])
        proj = GaLoreProjector(layer.rank, update_proj_gap=HUGE_GAP, scale=SCALE, proj_type="std")
        side = layer.side
        proj.ortho_matrix = randomized_projector(W.grad, layer.rank, side, seed=seed)
        opt.state[W]["projector"] = proj
        opt.state[W]["step"] = 1  # (iter 1: no refresh at any later step of the run)
        opt.step()
        return opt, W
    from ..lowrank import GaLoreAdamW

    keys = dict(FASTOPT_KEYS[method])
    extra = dict(state_bits=8) if method == "fastopt-svd-state8" else {}
    backend = GPU_BACKENDS.get(method, "cpu")
    if backend not in _available_backends(W.device):
        raise Unsupported(f"the {backend} backend is not available on {W.device}")
    if keys["projector"] == "svd":  # the first refresh by the randomized projector, same storage
        opt = GaLoreAdamW([{**group, **keys, "projector": "randomized"}], lr=LR, backend=backend, **extra)
        opt.step()
        opt.param_groups[0]["projector"] = keys["projector"]
    else:
        opt = GaLoreAdamW([{**group, **keys}], lr=LR, backend=backend, **extra)
        opt.step()
    opt.step()
    return opt, W


def _available_backends(device):
    from .._backend import available_backends

    return available_backends(device.type)


def _step_setup(method, layer, device=torch.device("cpu")):
    _require_lowrank()
    from ..lowrank import projectors

    projectors.dct_cache_clear()
    _release()
    opt, W = _step_optimizer(method, layer, device=device)
    return Workload(fn=opt.step, state_bytes=lambda: state_breakdown(opt)["total"])


def _step_info(method, layer, device=torch.device("cpu")):
    """The measured state split of ``method`` on ``layer`` (one optimizer built, stepped, freed)."""
    from ..lowrank import projectors

    info = {"dtype": "float32"}
    try:
        _require_lowrank()
        opt, W = _step_optimizer(method, layer, device=device)
    except Unsupported:
        return info
    parts = state_breakdown(opt)
    del opt, W
    info.update(proj_KB=round(parts["projector"] / 1e3, 1), mom_KB=round(parts["moments"] / 1e3, 1))
    if method == "fastopt-dct":
        info["basis_KB"] = round(min(layer.m, layer.n) ** 2 * 4 / 1e3, 1)
        projectors.dct_cache_clear()
    _release()
    return info


# -- refresh ------------------------------------------------------------------------------------------------
def _refresh_fn(method, layer, G, prev):
    from ..lowrank import projectors, quant

    side = layer.side
    r = layer.rank
    if method == BASELINE:
        _, GaLoreProjector = _galore_torch()
        proj = GaLoreProjector(r, update_proj_gap=HUGE_GAP, scale=SCALE, proj_type="std")
        return lambda: proj.get_orthogonal_matrix(G, r, side)
    if method == "fastopt-svd":
        return lambda: projectors.svd_projector(G, r, side)
    if method == "fastopt-randomized":
        return lambda: projectors.randomized_projector(G, r, side, prev, seed=1)
    if method == "fastopt-rand-cold":
        return lambda: projectors.randomized_projector(G, r, side, seed=1)
    if method == "fastopt-dct":
        return lambda: projectors.dct_select(G, r, side)
    if method == "fastopt-dct-fft":
        return lambda: projectors.dct_select(G, r, side, method="fft")
    if method == "fastopt-int4-quant":
        return lambda: quant.quantize_projector(prev, bits=4, group_size=256)
    raise ValueError(f"unknown refresh method {method!r}")


def _refresh_inputs(layer):
    """The gradient and the previous projector (the randomized projector of a perturbed gradient)."""
    from ..lowrank import projectors

    side = layer.side
    G = structured_grad(layer.m, layer.n, seed=1)
    G_prev = structured_grad(layer.m, layer.n, seed=2, like=G, perturb=0.2)
    prev = projectors.randomized_projector(G_prev, layer.rank, side, seed=0)
    return G, prev


class _Repeats:
    """Per-case repeats through the shared :class:`~fastopt.bench.harness.Context` (the harness has one
    setting per run): at full size the SVD refresh cases take :data:`SLOW_REPEATS` timed calls and no time
    budget, the other refreshes but the quantization :data:`REFRESH_REPEATS`; every other case gets the
    run's own settings back from its setup."""

    def __init__(self, ctx):
        self.ctx, self.saved = ctx, (ctx.min_repeats, ctx.budget_s)

    def apply(self, timed=None):
        """``timed``: at most this many timed calls per round and no time budget; None: the run's settings."""
        self.ctx.min_repeats, self.ctx.budget_s = (
            self.saved if timed is None or self.ctx.quick else (min(self.saved[0], timed), 0.0))


def _refresh_setup(method, layer, repeats):
    repeats.apply(SLOW_REPEATS if method in (BASELINE, "fastopt-svd") else
                  None if method == "fastopt-int4-quant" else REFRESH_REPEATS)
    _require_lowrank()
    from ..lowrank import projectors

    projectors.dct_cache_clear()
    _release()
    G, prev = _refresh_inputs(layer)
    if method.startswith("fastopt-dct"):  # the basis: once per size, shared (not part of a refresh)
        projectors.dct_basis(layer.n if layer.m >= layer.n else layer.m, G.device, G.dtype)
    return Workload(fn=_refresh_fn(method, layer, G, prev))


def _refresh_info(layer):
    """Each refresh method's subspace error on the suite's gradient (one SVD, freed)."""
    from ..lowrank import projectors, quant

    side = layer.side
    G, prev = _refresh_inputs(layer)
    r = layer.rank
    svd = projectors.svd_projector(G, r, side)
    n = G.shape[1] if side == "right" else G.shape[0]
    q = quant.quantize_projector(svd, bits=4, group_size=256)
    shape = (r, layer.n) if side == "right" else (layer.m, r)
    err = {
        BASELINE: svd,
        "fastopt-svd": svd,
        "fastopt-randomized": projectors.randomized_projector(G, r, side, prev, seed=1),
        "fastopt-rand-cold": projectors.randomized_projector(G, r, side, seed=1),
        "fastopt-dct": projectors.dct_projector(projectors.dct_select(G, r, side)[0], n, side, G.device, G.dtype),
        "fastopt-dct-fft": projectors.dct_projector(projectors.dct_select(G, r, side, method="fft")[0], n, side,
                                                    G.device, G.dtype),
        "fastopt-int4-quant": quant.dequantize_projector(q, shape, torch.float32),
    }
    out = {m: {"sub_err": round(projectors.subspace_error(G, P, side), 4)} for m, P in err.items()}
    projectors.dct_cache_clear()
    del G, prev, svd, err
    _release()
    return out


# -- training -----------------------------------------------------------------------------------------------
IN, HIDDEN, OUT, SAMPLES, BATCH = 32, 128, 8, 1024, 128
TRAIN_RANK, TRAIN_GAP, ADAPTIVE_GAP = 16, 50, 10
TRAIN_LR = 1e-2


def make_task(seed=0):
    """The fixed regression task: inputs X (SAMPLES x IN), targets Y (SAMPLES x OUT) of a random tanh
    teacher MLP plus 1 % noise, and the student's initial state dict (a 4-layer tanh MLP)."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(SAMPLES, IN, generator=gen)
    teacher = [torch.randn(IN, HIDDEN, generator=gen) / math.sqrt(IN),
               torch.randn(HIDDEN, HIDDEN, generator=gen) / math.sqrt(HIDDEN),
               torch.randn(HIDDEN, OUT, generator=gen) / math.sqrt(HIDDEN)]
    h = torch.tanh(X @ teacher[0])
    h = torch.tanh(h @ teacher[1])
    Y = h @ teacher[2]
    Y = Y + 0.01 * Y.std() * torch.randn(Y.shape, generator=gen)
    torch.manual_seed(seed + 1)
    model = make_model()
    return X, Y, copy.deepcopy(model.state_dict())


def make_model():
    """The student: Linear(IN, H) tanh Linear(H, H) tanh Linear(H, H) tanh Linear(H, OUT)."""
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN),
                               torch.nn.Tanh(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.Tanh(),
                               torch.nn.Linear(HIDDEN, OUT))


def train_optimizer(method, model):
    """The optimizer of ``method`` for ``model``: the three matrices with HIDDEN rows projected at
    TRAIN_RANK (gap TRAIN_GAP, scale 0.25, "std"), every other parameter in a plain group."""
    matrices = [p for p in model.parameters() if p.dim() == 2 and p.shape[0] == HIDDEN]
    others = [p for p in model.parameters() if all(p is not q for q in matrices)]
    proj = dict(params=matrices, rank=TRAIN_RANK, update_proj_gap=TRAIN_GAP, scale=SCALE, proj_type="std")
    if method in (BASELINE, GALORE_SHORT_GAP):
        if method == GALORE_SHORT_GAP:
            proj["update_proj_gap"] = ADAPTIVE_GAP
        return _galore_adamw([dict(params=others), proj], lr=TRAIN_LR)
    from ..lowrank import GaLoreAdamW

    keys = dict(FASTOPT_KEYS[method])
    if keys.get("proj_adaptive"):
        proj["update_proj_gap"] = ADAPTIVE_GAP
    if keys.get("proj_bits"):
        keys["proj_group_size"] = 128  # (16 x 128 projectors: 2048 elements)
    return GaLoreAdamW([dict(params=others), {**proj, **keys}], lr=TRAIN_LR, backend="cpu")


def _batches(steps, seed=0):
    gen = torch.Generator().manual_seed(seed + 2)
    order = []
    while len(order) < steps * BATCH:
        order += torch.randperm(SAMPLES, generator=gen).tolist()
    return [torch.tensor(order[i * BATCH:(i + 1) * BATCH]) for i in range(steps)]


def train(method, steps=TRAIN_STEPS, seed=0, task=None):
    """Train the task's student ``steps`` steps with ``method``; returns (per-step losses, optimizer)."""
    X, Y, init = task or make_task(seed)
    model = make_model()
    model.load_state_dict(init)
    opt = train_optimizer(method, model)
    losses = []
    for idx in _batches(steps, seed):
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, opt


def final_loss(losses):
    """The mean of the last 10 losses."""
    return sum(losses[-10:]) / len(losses[-10:])


def _train_info(steps):
    """The final loss of each training method and its ratio to galore-torch's (trained here, once)."""
    task = make_task(0)
    out = {}
    for m in TRAIN_METHODS:
        try:
            _require_lowrank()
            losses, _ = train(m, steps, task=task)
        except Unsupported:
            out[m] = {}
            continue
        out[m] = {"loss": final_loss(losses)}
    for m, info in out.items():
        ref = TRAIN_REFERENCE.get(m, BASELINE)
        base = out.get(ref, {}).get("loss")
        if "loss" in info and base and m.startswith("fastopt-"):
            info[RATIO] = round(base / info["loss"], 4)
        if "loss" in info:
            info["loss"] = round(info["loss"], 6)
    _release()
    return out


def _train_setup(method, steps):
    _require_lowrank()
    from ..lowrank import projectors

    projectors.dct_cache_clear()
    _release()
    X, Y, init = make_task(0)
    model = make_model()
    model.load_state_dict(init)
    opt = train_optimizer(method, model)
    batches = _batches(steps)
    k = [0]

    def fn():
        idx = batches[k[0] % len(batches)]
        k[0] += 1
        loss = torch.nn.functional.mse_loss(model(X[idx]), Y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return Workload(fn=fn, state_bytes=lambda: state_breakdown(opt)["total"])


# -- the suite ----------------------------------------------------------------------------------------------
def configs(quick):
    """The config names of a run (``{"step", "refresh", "train"} -> name``), its layer and training steps."""
    layer = QUICK_LAYER if quick else FULL_LAYER
    steps = QUICK_TRAIN_STEPS if quick else TRAIN_STEPS
    return {"step": f"step-{layer.shape}", "refresh": f"refresh-{layer.shape}", "train": f"train-mlp-{steps}"}, \
        layer, steps


def cases(ctx):
    """Every (config, method) case for ``ctx``; lists the measured state split, subspace errors and
    training losses as they are built (see the module docstring).  Off the CPU every case is unsupported."""
    if ctx.device.type != "cpu":
        # a GPU: the step between refreshes (the triton backend's fused GEMMs, the cuda backend's generic
        # path, galore-torch, full AdamW); the refresh and training configs are CPU targets
        why = "the lowrank suite's refresh and training configs run on the CPU"

        def refuse():
            raise Unsupported(why)
        names, layer, steps = configs(ctx.quick)
        numel = layer.m * layer.n
        return ([Case(config=names["step"], method=m, items=numel, bytes_moved=0,
                      setup=lambda m=m: _step_setup(m, layer, ctx.device), info=_step_info(m, layer, ctx.device))
                 for m in GPU_STEP_METHODS]
                + [Case(config=names[c], method=m, items=1, bytes_moved=0, setup=refuse)
                   for c, ms in (("refresh", REFRESH_METHODS), ("train", TRAIN_METHODS)) for m in ms])
    names, layer, steps = configs(ctx.quick)
    repeats = _Repeats(ctx)
    out = []

    def normal(setup):  # every non-SVD case restores the run's repeats first
        def run():
            repeats.apply()
            return setup()
        return run

    numel = layer.m * layer.n
    for m in STEP_METHODS:
        out.append(Case(config=names["step"], method=m, items=numel, bytes_moved=0,
                        setup=normal(lambda m=m: _step_setup(m, layer)), info=_step_info(m, layer)))
    try:
        _require_lowrank()
        refresh_info = _refresh_info(layer)
    except Unsupported:
        refresh_info = {}
    for m in REFRESH_METHODS:
        items = layer.rank * layer.n if m == "fastopt-int4-quant" else numel
        out.append(Case(config=names["refresh"], method=m, items=items, bytes_moved=0,
                        setup=lambda m=m: _refresh_setup(m, layer, repeats),
                        info={"dtype": "float32", **refresh_info.get(m, {})}))
    train_info = _train_info(steps)
    model_numel = sum(p.numel() for p in make_model().parameters())
    for m in TRAIN_METHODS:
        out.append(Case(config=names["train"], method=m, items=model_numel, bytes_moved=0,
                        setup=normal(lambda m=m: _train_setup(m, steps)),
                        info={"dtype": "float32", **train_info.get(m, {})}))
    return out


def bars(ctx):
    """The issue-19 targets, at full size on the CPU only (none for --quick or CUDA)."""
    if ctx.device.type != "cpu" or ctx.quick:
        return []
    names, _, _ = configs(False)
    key = speedup_key(BASELINE)
    out = [Bar(names["step"], "fastopt-svd", key, 2.0),
           Bar(names["refresh"], "fastopt-randomized", key, 5.0),
           Bar(names["refresh"], "fastopt-dct", key, 10.0)]
    out += [Bar(names["train"], m, RATIO, round(1 / LOSS_TOLERANCE, 4))
            for m in TRAIN_METHODS if m.startswith("fastopt-")]
    return out


SUITE = register(Suite(name="lowrank", cases=cases, unit="params", baseline=BASELINE, bars=bars,
                       other_baselines=("fastopt-svd",), memory_bound=False,
                       what="a GaLore step between refreshes, a projector refresh, a training step"))
