"""L-GreCo: layer-wise adaptive gradient compression (Alimohammadi, Markov, Frantar, Alistarh, MLSys 2024).

Every ``every`` steps the policy looks at each layer's gradient (with error feedback added, averaged over
the last ``accumulate`` steps of the period), measures for every candidate setting ``c`` (a PowerSGD
rank, a top-k density, a QSGD bit-width) the compression error ``e[l][c]`` and the bytes ``s[l][c]`` a
rank sends, and picks one candidate per layer minimizing the total bytes subject to

    sum_l e[l][c_l]  <=  alpha * sum_l e[l][default]      (the error of the uniform setting)

by the paper's dynamic program over a discretized error axis (:func:`lgreco_dp`).  The choice is written
into the compression state's per-layer overrides (``state.set_layer_settings``), which the fastopt.comm
hooks read at their next call.

What follows the official code (github.com/LGrCo/L-GreCo, ``hooks/lgreco_hook.py``, PowerSGD):

- the error of a layer is the L2 (Frobenius) norm ``||g - C(g)||`` -- not squared -- and the layer errors
  add up (``squared=True`` uses ``||g - C(g)||^2`` instead, whose sum is the squared error of the whole
  flattened gradient);
- the gradient the errors are measured on is the sum of the last ``accumulate`` (10) steps' gradients
  with error feedback, on rank 0; rank 0 runs the DP and broadcasts the choice, so every rank applies the
  same settings (here: an int64 tensor of candidate indices through ``dist.broadcast``);
- the PowerSGD candidates are every integer rank in ``[floor(r / 2), ceil(2 r)]`` around the uniform rank
  ``r`` (the code's ``gamma = 0.5``, ``beta = 2``; clamped to >= 1 here);
- the budget's scale ``alpha`` defaults to 1 (the code's ``adjust_alpha``); the error axis has 10 000 bins
  of width ``budget / 10 000`` (``DPBUCKETS``) and every error is rounded UP to whole bins (so the total
  error of the DP's answer never exceeds the budget).

What differs (documented): the official code counts a zero error as one bin (an artefact of its array
slicing) and accepts totals of at most ``bins - 1`` bins; here a zero error is zero bins and the total may
reach ``bins`` bins, which is exactly ``budget`` -- and the DP's answer is compared with the uniform
setting, which is returned when the rounding made the DP miss it (so the answer never sends more bytes than
uniform).  Errors whose quotient by the bin width is an integer up to 1e-9 (relative) count as that
integer, and when every error and the budget are integers and the budget is at most ``bins``, the bin
width is 1: the DP is then exact.  The top-k and QSGD candidate sets are not in the official code (which
ships only the PowerSGD policy): top-k takes the uniform density times 2^(k/2), k = -2..2 (clipped to
(0, 1]), QSGD the bit-widths the fastopt.comm hook supports (2, 4, 8).  The errors are those of the hook's
own compression (``fastopt.comm.compress_error``; PowerSGD: one power iteration); of the official code's two
PowerSGD error methods, ``'SVD'`` (the truncated SVD) is :func:`svd_error` (``error_fn=svd_error``), and its
default ``'Power'`` (5 power iterations from a random Q, an approximation of the SVD's error) is not copied.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import numpy as np
import torch

__all__ = ["lgreco_dp", "LGreCoChoice", "LGreCo", "DEFAULT_BINS", "svd_error"]

DEFAULT_BINS = 10_000  # the official code's DPBUCKETS
_SNAP = 1e-9  # a quotient within this relative distance of an integer is that integer


class LGreCoChoice(NamedTuple):
    """The DP's answer: ``choice[l]`` is the candidate index of layer ``l``; ``size`` the total bytes,
    ``error`` the total (real, not discretized) error of that choice."""
    choice: list
    size: float
    error: float


def _table(name, x, what):
    try:
        a = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"lgreco_dp: {what} must be a 2-D table of numbers (layers x candidates)") from exc
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise ValueError(f"lgreco_dp: {what} must be a non-empty 2-D table (layers x candidates), "
                         f"got shape {a.shape}")
    return a


def _bins_of(e, width):
    """Errors in whole bins of ``width``, rounded up (exact when the quotient is an integer up to _SNAP)."""
    q = e / width
    r = np.rint(q)
    snap = np.abs(q - r) <= _SNAP * np.maximum(1.0, np.abs(q))
    return np.where(snap, r, np.ceil(q))


def lgreco_dp(errors, sizes, budget, bins: int = DEFAULT_BINS, default=None) -> LGreCoChoice:
    """Pick one candidate per layer minimizing the total size with the total error at most ``budget``.

    Args:
        errors: ``errors[l][c]`` >= 0, the compression error of layer ``l`` at candidate ``c`` (a nested
            sequence, numpy array or tensor; layers x candidates). ``inf`` / ``nan`` marks a candidate
            that is not available for that layer.
        sizes: ``sizes[l][c]`` >= 0, its compressed size in bytes (same shape).
        budget: the largest allowed total error (>= 0), e.g. the total error of the uniform setting.
        bins: the number of bins of the discretized error axis (the official code's 10 000). Each error
            is rounded up to whole bins of width ``budget / bins``; so the answer is always feasible, and
            it is at least as small as every choice whose total error is <= ``budget - L * width``
            (each layer loses less than one bin). When every error and ``budget`` are integers and
            ``budget <= bins``, the width is 1 and the answer is exactly optimal.
        default: the uniform setting: a candidate index for every layer, or one index for all. When
            given and feasible, the answer never has a larger size than it (the uniform choice is
            returned if the rounding made the DP miss it).

    Returns:
        :class:`LGreCoChoice` ``(choice, size, error)``: the candidate index per layer, the total size and
        the total error of that choice. Among choices of equal size the one with fewer error bins wins.

    Raises:
        ValueError: bad shapes or values, or no choice fits the budget.
    """
    e = _table("errors", errors, "errors")
    s = _table("sizes", sizes, "sizes")
    if e.shape != s.shape:
        raise ValueError(f"lgreco_dp: errors {e.shape} and sizes {s.shape} must have the same shape")
    L, C = e.shape
    bad = np.isnan(e)
    e = np.where(bad, np.inf, e)
    if np.any(e < 0):
        raise ValueError("lgreco_dp: errors must be >= 0")
    if np.any(np.isnan(s)) or np.any(s < 0) or np.any(np.isinf(s)):
        raise ValueError("lgreco_dp: sizes must be finite and >= 0")
    if isinstance(budget, torch.Tensor):
        budget = budget.item()
    try:
        budget = float(budget)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"lgreco_dp: budget must be a number, got {type(budget).__name__}") from exc
    if not math.isfinite(budget) or budget < 0:
        raise ValueError(f"lgreco_dp: budget must be finite and >= 0, got {budget}")
    if isinstance(bins, bool) or not isinstance(bins, (int, np.integer)) or bins < 1:
        raise ValueError(f"lgreco_dp: bins must be an int >= 1, got {bins!r}")
    bins = int(bins)
    if default is not None:
        d = np.asarray(default)
        if d.ndim == 0:
            d = np.full(L, int(d))
        if d.shape != (L,) or not np.issubdtype(d.dtype, np.integer) or np.any(d < 0) or np.any(d >= C):
            raise ValueError(f"lgreco_dp: default must be one candidate index in [0, {C}) or one per layer "
                             f"({L}), got {default!r}")
        default = [int(x) for x in d]

    def total_error(ch):
        return math.fsum(float(e[l, c]) for l, c in enumerate(ch))

    def total_size(ch):
        return math.fsum(float(s[l, c]) for l, c in enumerate(ch))

    finite = np.isfinite(e)
    integral = bool(np.all(e[finite] == np.floor(e[finite]))) and budget == math.floor(budget)
    if budget == 0:
        width, nb = 1.0, 0  # only zero errors fit
        eb = np.where(e == 0, 0.0, np.inf)
    else:
        if integral and budget <= bins:
            width, nb = 1.0, int(budget)
        else:
            width, nb = budget / bins, bins
        eb = np.where(finite, _bins_of(np.where(finite, e, 0.0), width), np.inf)
    eb = np.where(eb > nb, -1, eb).astype(np.int64)  # -1: this candidate alone exceeds the budget

    # dp[b]: the least size of layers 0..l with exactly b error bins; par[l, b]: layer l's candidate there
    dp = np.full(nb + 1, np.inf)
    dp[0] = 0.0
    par = np.full((L, nb + 1), -1, dtype=np.int32)
    for l in range(L):
        new = np.full(nb + 1, np.inf)
        for c in range(C):
            k = eb[l, c]
            if k < 0:
                continue
            cand = dp[: nb + 1 - k] + s[l, c]
            better = cand < new[k:]  # strict: the first candidate wins ties
            new[k:][better] = cand[better]
            par[l, k:][better] = c
        dp = new
    b = int(np.argmin(dp))  # the least size; among equal sizes the fewest bins
    if not math.isfinite(dp[b]):
        if default is not None and total_error(default) <= budget:
            return LGreCoChoice(default, total_size(default), total_error(default))
        raise ValueError(f"lgreco_dp: no choice of candidates has a total error <= budget ({budget})")
    choice = [0] * L
    for l in range(L - 1, -1, -1):
        c = int(par[l, b])
        choice[l] = c
        b -= int(eb[l, c])
    size, err = total_size(choice), total_error(choice)
    if default is not None:
        du_err, du_size = total_error(default), total_size(default)
        if du_err <= budget and du_size < size:
            return LGreCoChoice(default, du_size, du_err)
    return LGreCoChoice(choice, size, err)


def svd_error(kind: str, tensor: torch.Tensor, setting, *, min_compression_rate: float = 2, **_) -> float:
    """The official code's ``error_method='SVD'`` for PowerSGD, usable as ``LGreCo(..., error_fn=svd_error)``:
    the squared error of the BEST rank-``setting`` approximation of the matrix view ``(shape[0], -1)``, the
    sum of its squared singular values past the first ``setting`` (what warm-started PowerSGD approaches over
    steps; fastopt.comm.compress_error's default is one cold power iteration, the hook's single step).
    0 for a vector or a matrix the hook sends whole (rank not worth compressing, as ``bytes_for`` counts)."""
    if kind != "powersgd":
        raise ValueError(f"svd_error: only for kind 'powersgd', got {kind!r}")
    if isinstance(setting, bool) or not isinstance(setting, (int, np.integer)) or setting < 1:
        raise ValueError(f"svd_error: the rank must be an int >= 1, got {setting!r}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"svd_error: tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() < 2:
        return 0.0
    mat = tensor.detach().reshape(tensor.shape[0], -1).double()
    n, m = mat.shape
    r = min(n, m, int(setting))
    if not (n + m) * r * min_compression_rate < n * m:
        return 0.0
    return float(torch.linalg.svdvals(mat)[r:].square().sum())


_KINDS = {"PowerSGDState": "powersgd", "TopKState": "topk", "QSGDState": "qsgd"}


def _default_candidates(kind, uniform):
    if kind == "powersgd":  # the official code: every rank in [floor(r * gamma), ceil(r * beta)], 0.5 and 2
        return list(range(max(1, math.floor(uniform * 0.5)), math.ceil(uniform * 2) + 1))
    if kind == "topk":  # uniform * 2^(k/2), k = -2..2, clipped to (0, 1]
        return sorted({min(1.0, float(uniform) * 2.0 ** (k / 2)) for k in range(-2, 3)})
    if kind == "qsgd":  # the bit-widths of fastopt.comm's packed QSGD
        return sorted({2, 4, 8} | {int(uniform)})
    raise ValueError(f"LGreCo: no default candidates for kind {kind!r}; pass candidates=")


def _check_candidate(kind, c):
    if kind == "powersgd":
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise ValueError(f"LGreCo: a PowerSGD candidate is a rank, an int >= 1, got {c!r}")
        return int(c)
    if kind == "topk":
        if isinstance(c, bool) or not isinstance(c, (int, float, np.floating, np.integer)) or not 0 < c <= 1:
            raise ValueError(f"LGreCo: a top-k candidate is a density in (0, 1], got {c!r}")
        return float(c)
    if kind == "qsgd":
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1:
            raise ValueError(f"LGreCo: a QSGD candidate is a bit-width, an int >= 1, got {c!r}")
        return int(c)
    return c


class LGreCo:
    """L-GreCo's adaptive policy over a fastopt.comm compression state (PowerSGD, top-k or QSGD).

    Every ``every`` steps (counted by :meth:`step`, which the training loop calls once per optimizer
    step) the policy picks each layer's rank / density / bit-width with :func:`lgreco_dp` and writes them
    into ``state.set_layer_settings``; the hooks use them from their next call.

    The statistics: the policy installs itself as ``state.observer``; during the last ``accumulate``
    steps of each period, group rank 0 adds up every observed layer's gradient with error feedback (the
    LOCAL gradient the hook is about to compress), as the official code does. At the period's end rank 0
    measures ``e[l][c]`` with ``error_fn`` (default ``fastopt.comm.compress_error``: the same
    compression the hook runs, in its torch form), the bytes with ``bytes_fn`` (default
    ``fastopt.comm.bytes_for``), runs the DP with the budget ``alpha *`` (the uniform setting's total
    error), and broadcasts the chosen candidate indices to the group: every rank sets identical
    settings (rank 0's decision). Layers the hook never observed in the window (PowerSGD: vectors, the
    uncompressed warm-up phase) keep the uniform setting -- so a matrix the previous decision made PowerSGD's
    hook send whole (a rank not worth compressing: zero error, full bytes) returns to the uniform rank at the
    next decision and is decided again one period later.

    Args:
        state: a ``PowerSGDState``, ``TopKState`` or ``QSGDState`` of fastopt.comm (or any object with
            ``observer``, ``set_layer_settings``, ``uniform_setting`` and ``process_group``; then pass
            ``kind``, ``error_fn`` and ``bytes_fn``).
        model_or_params: the model (an ``nn.Module``, DDP-wrapped or not) or its parameters: the layers
            the policy may set, in an order every rank shares.
        candidates: the settings to choose from (they must include the uniform one); default: see the
            module docstring.
        every: the period in steps (the official code's ``adjust_freq``, 100 by default).
        bins: the DP's error bins (the official code's 10 000).
        accumulate: how many steps at the end of each period feed the statistics (official: 10).
        alpha: the budget as a multiple of the uniform setting's error (official ``adjust_alpha`` = 1).
        squared: measure ``||g - C(g)||^2`` instead of the official ``||g - C(g)||``.
        kind: ``"powersgd"``, ``"topk"`` or ``"qsgd"`` (default: from the state's class).
        error_fn: ``error_fn(kind, tensor, setting, **opts) -> float``, the SQUARED error of one round
            trip (default ``fastopt.comm.compress_error``; for PowerSGD, :func:`svd_error` is the official
            code's ``'SVD'`` error method).
        bytes_fn: ``bytes_fn(kind, shape, setting, world_size=..., **opts) -> int`` (default
            ``fastopt.comm.bytes_for``).
    """

    def __init__(self, state, model_or_params, candidates: Optional[Sequence] = None, every: int = 100,
                 bins: int = DEFAULT_BINS, *, accumulate: int = 10, alpha: float = 1.0, squared: bool = False,
                 kind: Optional[str] = None, error_fn: Optional[Callable] = None,
                 bytes_fn: Optional[Callable] = None):
        for attr in ("observer", "set_layer_settings", "uniform_setting", "process_group"):
            if not hasattr(state, attr):
                raise TypeError(f"LGreCo: state must be a fastopt.comm compression state (it has no {attr!r})")
        if kind is None:
            kind = _KINDS.get(type(state).__name__)
            if kind is None:
                raise TypeError(f"LGreCo: cannot tell the compression of a {type(state).__name__}; pass kind=")
        if not isinstance(kind, str):
            raise TypeError(f"LGreCo: kind must be a str, got {type(kind).__name__}")
        if isinstance(model_or_params, torch.nn.Module):
            params = list(model_or_params.parameters())
        elif isinstance(model_or_params, torch.Tensor):
            params = [model_or_params]
        else:
            try:
                params = list(model_or_params)
            except TypeError as exc:
                raise TypeError("LGreCo: model_or_params must be an nn.Module or an iterable of parameters") from exc
        if not params or not all(isinstance(p, torch.Tensor) for p in params):
            raise TypeError("LGreCo: model_or_params must hold at least one parameter, all tensors")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("LGreCo: a parameter appears twice in model_or_params")
        for name, v, lo in (("every", every, 1), ("bins", bins, 1), ("accumulate", accumulate, 1)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                raise ValueError(f"LGreCo: {name} must be an int >= {lo}, got {v!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (alpha > 0 and math.isfinite(alpha)):
            raise ValueError(f"LGreCo: alpha must be a finite number > 0, got {alpha!r}")
        for name, fn in (("error_fn", error_fn), ("bytes_fn", bytes_fn)):
            if fn is not None and not callable(fn):
                raise TypeError(f"LGreCo: {name} must be callable")
        if state.observer is not None and not callable(state.observer):
            raise TypeError("LGreCo: state.observer is set and not callable")
        uniform = _check_candidate(kind, state.uniform_setting)
        cands = _default_candidates(kind, uniform) if candidates is None else \
            [_check_candidate(kind, c) for c in candidates]
        if not cands:
            raise ValueError("LGreCo: candidates is empty")
        if len(set(cands)) != len(cands):
            raise ValueError(f"LGreCo: candidates has duplicates: {cands}")
        if uniform not in cands:
            raise ValueError(f"LGreCo: candidates {cands} must include the uniform setting {uniform!r}")
        check = getattr(state, "_check_setting", None)  # (fastopt.comm's states: what the hook accepts)
        if callable(check):
            for c in cands:
                try:
                    check(c)
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"LGreCo: candidate {c!r} is not a setting the state accepts: {exc}") from exc
        if error_fn is None or bytes_fn is None:
            from fastopt import comm as _comm  # (the hooks' module; imported late: it imports this file)
            error_fn = error_fn or _comm.compress_error
            bytes_fn = bytes_fn or _comm.bytes_for

        self.state, self.kind, self.params, self.candidates = state, kind, params, cands
        self.every, self.bins, self.accumulate = int(every), int(bins), min(int(accumulate), int(every))
        self.alpha, self.squared = float(alpha), bool(squared)
        self.error_fn, self.bytes_fn = error_fn, bytes_fn
        self.default_index = cands.index(uniform)
        self.steps = 0
        self.last = None  # the last decision: a dict (see _decide), rank 0 only; ``choice`` on every rank
        self.choice = None  # {param index: candidate}, the settings in force (every rank)
        self._index = {id(p): i for i, p in enumerate(params)}
        self._acc, self._count = {}, {}
        self._previous = state.observer
        state.observer = self._observe

    # -- the group ---------------------------------------------------------------------------------
    def _group(self):
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_initialized()):
            return None, 0, 1
        g = self.state.process_group
        return g, dist.get_rank(g), dist.get_world_size(g)

    def _opts(self):
        """The keyword arguments of fastopt.comm's error and byte functions that the state fixes."""
        if self.kind == "qsgd" and hasattr(self.state, "bucket_size"):
            return {"bucket_size": self.state.bucket_size}
        if self.kind == "powersgd" and hasattr(self.state, "min_compression_rate"):
            return {"min_compression_rate": self.state.min_compression_rate}
        return {}

    # -- statistics --------------------------------------------------------------------------------
    def collecting(self) -> bool:
        """Whether the hook calls of the current step feed the statistics (the period's last steps)."""
        return self.steps % self.every >= self.every - self.accumulate

    def _observe(self, param, grad):
        if self._previous is not None:
            self._previous(param, grad)
        i = self._index.get(id(param))
        if i is None or not self.collecting() or self._group()[1] != 0:
            return
        g = grad.detach().to(torch.float32)
        if i in self._acc:
            self._acc[i].add_(g)
            self._count[i] += 1
        else:
            self._acc[i] = g.clone()
            self._count[i] = 1

    def errors_and_sizes(self, tensors, world_size: int = 1):
        """The tables of the DP for ``tensors`` (one per layer): ``(errors, sizes)``, layers x candidates,
        the errors as the policy measures them (norms, or squares with ``squared=True``)."""
        opts = self._opts()
        E = np.empty((len(tensors), len(self.candidates)))
        S = np.empty_like(E)
        for l, t in enumerate(tensors):
            for c, setting in enumerate(self.candidates):
                sq = float(self.error_fn(self.kind, t, setting, **opts))
                if not sq >= 0:  # (nan too)
                    raise ValueError(f"LGreCo: error_fn returned {sq} for a layer of shape {tuple(t.shape)}")
                E[l, c] = sq if self.squared else math.sqrt(sq)
                S[l, c] = float(self.bytes_fn(self.kind, tuple(t.shape), setting, world_size=world_size, **opts))
        return E, S

    def _decide(self, world):
        layers = sorted(self._acc)
        tensors = [self._acc[i] / self._count[i] for i in layers]  # (the official code averages them)
        E, S = self.errors_and_sizes(tensors, world)
        budget = self.alpha * math.fsum(E[:, self.default_index])
        res = lgreco_dp(E, S, budget, bins=self.bins, default=self.default_index)
        self.last = dict(step=self.steps, layers=layers, choice=res.choice, size=res.size, error=res.error,
                         budget=budget, uniform_size=math.fsum(S[:, self.default_index]), errors=E, sizes=S)
        return layers, res.choice

    # -- the period --------------------------------------------------------------------------------
    def step(self):
        """Count one training step (call it once per optimizer step, after the backward); at the end of
        every period decide and apply the layer settings (a collective on the state's group: every rank
        must call it). Returns True when the settings were (re)decided this call."""
        self.steps += 1
        if self.steps % self.every:
            return False
        group, rank, world = self._group()
        idx = torch.full((len(self.params) + 1,), -1, dtype=torch.int64)  # the last entry: 1 decided, 2 failed
        failure = None
        if rank == 0 and self._acc:
            try:
                layers, choice = self._decide(world)
                idx[torch.tensor(layers, dtype=torch.int64)] = torch.tensor(choice, dtype=torch.int64)
                idx[-1] = 1
            except Exception as exc:  # (still broadcast: the other ranks wait in the collective)
                failure, idx[-1] = exc, 2
        self._acc.clear()
        self._count.clear()
        if world > 1:
            import torch.distributed as dist
            src = dist.get_global_rank(group, 0) if group is not None else 0
            dist.broadcast(idx, src=src, group=group)
        if idx[-1] == 2:
            if failure is not None:
                raise failure
            raise RuntimeError("LGreCo.step: the decision failed on group rank 0 (see its error)")
        if idx[-1] != 1:
            return False  # nothing was observed in the window: the settings stay
        self._apply(idx[:-1].tolist())
        return True

    def _apply(self, indices):
        settings = {self.params[i]: self.candidates[c] for i, c in enumerate(indices) if c >= 0}
        old = self.state.layer_settings
        self.state.set_layer_settings(settings)
        if self.kind == "powersgd" and settings != old and hasattr(self.state, "p_memory_dict"):
            # new ranks: new P and Q buffers, Q drawn afresh from the state's rng at the next call, on every
            # rank alike (the official code re-allocates them and redraws Q after every adjustment)
            self.state.p_memory_dict.clear()
            self.state.q_memory_dict.clear()
        self.choice = {i: self.candidates[c] for i, c in enumerate(indices) if c >= 0}

    def state_dict(self):
        """The step counter and the settings in force (candidate indices; -1 for the uniform one)."""
        idx = [-1] * len(self.params)
        for i, v in (self.choice or {}).items():
            idx[i] = self.candidates.index(v)
        return {"steps": self.steps, "choice": idx if self.choice is not None else None,
                "candidates": list(self.candidates)}

    def load_state_dict(self, sd):
        """Restore :meth:`state_dict`'s counter and re-apply its settings to the state."""
        if not isinstance(sd, dict) or not {"steps", "choice", "candidates"} <= set(sd):
            raise ValueError("LGreCo.load_state_dict: expected a dict from LGreCo.state_dict()")
        if list(sd["candidates"]) != list(self.candidates):
            raise ValueError(f"LGreCo.load_state_dict: candidates {sd['candidates']} differ from {self.candidates}")
        ch = sd["choice"]
        if ch is not None and (len(ch) != len(self.params) or any(not -1 <= c < len(self.candidates) for c in ch)):
            raise ValueError("LGreCo.load_state_dict: the saved choice does not fit these parameters")
        self.steps = int(sd["steps"])
        self._acc.clear()
        self._count.clear()
        if ch is not None:
            self._apply(list(ch))

    def remove(self):
        """Give the state its previous observer back (the policy stops collecting)."""
        if self.state.observer == self._observe:
            self.state.observer = self._previous
