"""Reference Winner-Take-All Column-Row Sampling (Liu et al., "Winner-Take-All Column Row Sampling for
Memory Efficient Adaptation of Language Model", NeurIPS 2023).

The executable specification of :class:`fastopt.nn.WTACRSLinear` and of its fused row kernel
(``csrc/cpu/wtacrs.cpp``, ``triton_kernels/wtacrs.py``); the ``torch`` backend runs it.

A linear layer's weight gradient is a sum over the rows of its (flattened) input: ``dW = dY^T X =
sum_i dy_i x_i^T``.  WTA-CRS keeps only ``k`` of the ``n`` rows of ``X`` for the backward and estimates
that sum without bias:

- sampling probabilities ``p_i = s_i / sum_j s_j`` with ``s_i = ||x_i|| * ||dy_i||`` (``||dy_i||``: the
  output-gradient norms of the previous backward, the only ones known at forward time; ``||x_i||``
  alone when there are none), every ``p_i`` kept above zero (``s_i + eps``) so that no row is
  impossible;
- the "winners" ``C``: the ``|C|`` rows of largest ``p_i``, kept deterministically with weight 1, where
  ``|C|`` minimizes the variance bound ``(1 - sum_{c in C} p_c) / (k - |C|)`` over ``|C| = 1 .. k - 1``,
  and ``|C| = 0`` (plain column-row sampling) when no ``|C|`` beats ``1 / k`` (the official
  ``k_adaptive_3D``);
- the other ``m = k - |C|`` rows drawn with replacement from the rest with probabilities
  ``p_i / (1 - P_C)``, each draw weighted ``(1 - P_C) / (m p_i)``.

``E[sum_{c in C} dy_c x_c^T + sum_draws w_j dy_{i_j} x_{i_j}^T] = dY^T X``.  A row drawn several
times is stored once, with the sum of its draws' weights (the same estimate, fewer rows).

It follows the official code (github.com/zirui-ray-liu/WTACRS, ``seq2seq/approxlinear/functional.py``:
``subsample_3D_input_by_norm``, ``k_adaptive_3D``, ``topk_selection_3D``, ``sample_with_replacement_3D``)
with ``k = min(max(int(n * budget), min_rows), n)`` (the official ``sample_ratio`` and ``minimal_k = 10``)
and all n rows kept when ``k == n``.  Deliberate differences:

- ``p`` is normalized exactly (``(s_i + eps) / (S + n eps)``; the official ``(s_i + eps) / (S + eps)``
  does not sum to 1, a bias of order ``n eps / S``);
- the stochastic part is dropped only when the rest has no probability mass at all (the official code
  drops it, biased, when ``P_C > 1 - 1e-3``) and is reweighted by ``1 / (m p_i)`` also when there are no
  gradient norms yet (the official code then skips that factor: biased);
- repeated draws are merged (above);
- the output-gradient norms: by default those of the previous backward through the layer, by row
  position (issue 22's choice, needing no example indices); the official code caches them per training
  example and position, from the example's previous epoch, in bf16 on the host: the layer's
  ``grad_norms='example'`` (fp32, on the layer's device).
"""
import torch

__all__ = ["num_rows", "row_scores", "probabilities", "winner_count", "select_rows", "rows_reference",
           "wtacrs_weight_grad_reference", "DEFAULT_BUDGET", "MIN_ROWS", "EPS"]

DEFAULT_BUDGET = 0.3   # the paper's WTA-CRS@0.3 (its main setting; the official scripts use 0.3 and 0.1)
MIN_ROWS = 10          # the official ``minimal_k``
EPS = 1e-8             # the official ``eps`` of the probabilities


def num_rows(n, budget, min_rows=MIN_ROWS):
    """``k``: how many of ``n`` rows are kept (``min(max(int(n * budget), min_rows), n)``)."""
    return min(max(int(n * budget), min_rows), n)


def row_scores(x2d, grad_norms=None):
    """``s_i = ||x_i|| * g_i`` (fp32 (n,)); ``||x_i||`` alone when ``grad_norms`` is None."""
    s = torch.linalg.vector_norm(x2d.float(), dim=1)
    return s if grad_norms is None else s * grad_norms.float()


def probabilities(scores, eps=EPS):
    """``p_i = (s_i + eps) / (sum s + n eps)`` (fp64 (n,): the weights ``1 / p_i`` are taken in fp64)."""
    s = scores.double() + eps
    return s / s.sum()


def _winners(p, k):
    """``(c, top, mass)``: the winner count of :func:`winner_count`, the ``k - 1`` largest probabilities'
    indices in descending order (the winners are the first ``c``), and ``1 - P_C`` (one host sync)."""
    top_v, top_i = torch.topk(p, k - 1, largest=True, sorted=True)
    csum = torch.cumsum(top_v, 0)
    c = torch.arange(1, k, device=p.device, dtype=p.dtype)
    score = (1.0 - csum).clamp_min(0.0) / (k - c)
    best = torch.argmin(score)
    best_i, best_score, best_mass = torch.stack([best.to(p.dtype), score[best], 1.0 - csum[best]]).tolist()
    if not best_score < 1.0 / k:
        return 0, top_i, 1.0
    return int(best_i) + 1, top_i, best_mass


def winner_count(p, k):
    """``|C|``: the number of deterministic rows for a budget of ``k`` rows (the official ``k_adaptive_3D``):
    the ``c`` in ``1 .. k - 1`` minimizing ``(1 - sum of the c largest p) / (k - c)``, or 0 when that
    minimum is not below ``1 / k``."""
    if k <= 1:
        return 0
    return _winners(p, k)[0]


def select_rows(p, k, generator=None, winners=True):
    """The rows kept and their weights: ``(idx, weight)``, ``idx`` int64 sorted ascending and distinct,
    ``weight`` fp64, for probabilities ``p`` (n,) (all > 0) and a budget of ``k`` rows (``k >= n``: every
    row, weight 1).  ``winners=False``: plain column-row sampling (all ``k`` rows drawn from ``p``)."""
    n = p.numel()
    if k >= n:
        return torch.arange(n, device=p.device), torch.ones(n, dtype=torch.float64, device=p.device)
    c, top, mass = _winners(p, k) if (winners and k > 1) else (0, None, 1.0)
    m = k - c  # >= 1: c <= k - 1, and the rest (n - c > 0 rows, each p > 0) has mass
    rest = p
    if c:
        det = top[:c]
        rest = p.clone()
        rest[det] = 0.0
    draws = torch.multinomial(rest.float(), m, replacement=True, generator=generator)
    w = torch.zeros(n, dtype=torch.float64, device=p.device)
    w.index_add_(0, draws, mass / (m * p[draws]))
    if c:
        w[det] = 1.0
    idx = torch.nonzero(w).flatten()
    return idx, w[idx]


def rows_reference(src, pos=None, weight=None, grad_norms=None, norms=True):
    """The fused row pass (the spec of the kernels): over ``src`` (n, d), returns ``(out, s)`` with
    ``out[pos[i]] = src_i * weight[pos[i]]`` (rounded to ``src``'s dtype; fp32 product) for every ``i`` with
    ``pos[i] >= 0`` (``out``: (max pos + 1, d), None without ``pos``), and ``s_i = ||src_i|| * g_i`` (fp32
    (n,); ``g`` = ``grad_norms`` or 1; None unless ``norms``)."""
    s = row_scores(src, grad_norms) if norms else None
    out = None
    if pos is not None:
        sel = torch.nonzero(pos >= 0).flatten()
        k = weight.numel()
        out = torch.zeros(k, src.shape[1], dtype=src.dtype, device=src.device)
        out[pos[sel]] = (src[sel].float() * weight.float()[pos[sel], None]).to(src.dtype)
    return out, s


def wtacrs_weight_grad_reference(x, dy, budget=DEFAULT_BUDGET, *, grad_norms=None, generator=None, winners=True,
                                 min_rows=MIN_ROWS):
    """One WTA-CRS estimate of ``dW = dy^T x`` for ``x`` (..., in) and ``dy`` (..., out) (leading dims
    flattened to rows), with the previous output-gradient norms ``grad_norms`` (n,) or None: fp32
    (out, in).  ``winners=False``: plain column-row sampling with the same probabilities."""
    x2 = x.reshape(-1, x.shape[-1])
    dy2 = dy.reshape(-1, dy.shape[-1])
    n = x2.shape[0]
    k = num_rows(n, budget, min_rows)
    p = probabilities(row_scores(x2, grad_norms))
    idx, w = select_rows(p, k, generator, winners)
    xs = (x2[idx].float() * w.float()[:, None]).to(x.dtype)
    return dy2[idx].float().t() @ xs.float()
