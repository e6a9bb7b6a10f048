"""Projector math of ``fastopt.lowrank``: pure functions on tensors, no optimizer state.

Conventions (galore-torch's). A 2-D gradient ``G`` is ``m x n``; ``side`` says where the projector acts:

=========  ==========================  =====================  ======================
side       projector ``P``             low = project(G)       back = project_back(low)
=========  ==========================  =====================  ======================
"right"    ``r x n`` (orthonormal rows)  ``G @ P.T`` (m x r)   ``low @ P``
"left"     ``m x r`` (orthonormal cols)  ``P.T @ G`` (r x n)   ``P @ low``
"full"     ``(L m x r, R r x n)``        ``L.T @ G @ R.T``     ``L @ low @ R``
=========  ==========================  =====================  ======================

Projectors:

* :func:`svd_projector` -- galore-torch 1.0's ``GaLoreProjector.get_orthogonal_matrix`` (fp32 SVD), bit for bit.
* :func:`randomized_projector` -- a randomized range finder / subspace iteration (Halko, Martinsson & Tropp,
  "Finding structure with randomness", SIAM Review 2011, algorithms 4.3/4.4 and 5.1), optionally warm-started
  from the previous projector; seeded from a CPU ``torch.Generator`` so every rank and device draws the same.
* :func:`dct_select` / :func:`dct_projector` -- the SVD-free method (Modoranu et al., "SVD-Free Low-Rank
  Adaptive Gradient Optimization"; ista-daslab-optimizers' ``DCTAdamW`` / ``FFTLowRankProjector`` with
  ``sim_type="matmul"``): one orthonormal DCT basis per size (:func:`dct_basis`, cached and shared), the
  basis vectors scored by their alignment with the gradient, the top-r kept as indices.
* :func:`adaptive_gap` -- Q-GaLore's adaptive refresh interval (q-galore-torch 1.0), decision for decision.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = [
    "PROJ_TYPES",
    "SIDES",
    "projection_side",
    "svd_projector",
    "randomized_projector",
    "subspace_error",
    "dct_basis",
    "dct_basis_rows",
    "dct_cache_clear",
    "dct_select",
    "dct_projector",
    "adaptive_gap",
]

PROJ_TYPES = ("std", "reverse_std", "right", "left", "full")
#: A projector: one matrix ("right": r x n, "left": m x r) or the ("full") pair (L m x r, R r x n).
Projector = Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]
Device = Union[torch.device, str, int]
SIDES = ("right", "left", "full")


# --------------------------------------------------------------------------------------------- checks
def _check_side(side, allowed=SIDES):
    if side not in allowed:
        raise ValueError(f"side must be one of {', '.join(repr(s) for s in allowed)}; got {side!r}")


def _check_grad(grad, name="grad"):
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor; got {type(grad).__name__}")
    if grad.dim() != 2:
        raise ValueError(f"{name} must be a 2-D (m x n) matrix; got shape {tuple(grad.shape)}")
    if not grad.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor; got {grad.dtype}")
    if grad.is_sparse:
        raise TypeError(f"{name} must be dense; got a sparse tensor")
    if grad.numel() == 0:
        raise ValueError(f"{name} must be non-empty; got shape {tuple(grad.shape)}")


def _check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral):
        raise TypeError(f"rank must be an int >= 1; got {rank!r}")
    if rank < 1:
        raise ValueError(f"rank must be an int >= 1; got {rank}")
    return int(rank)


def _check_seed(seed):
    """A ``torch.Generator.manual_seed`` value: an int in ``[-2**63, 2**64)`` (negatives wrap modulo 2**64)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise TypeError(f"seed must be an int; got {seed!r}")
    if not -(2 ** 63) <= seed < 2 ** 64:
        raise ValueError(f"seed must lie in [-2**63, 2**64); got {seed}")
    return int(seed)


def _check_int(value, name, minimum):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


# --------------------------------------------------------------------------------------------- side
def projection_side(shape: Sequence[int], proj_type: str) -> str:
    """Which side galore-torch 1.0 projects a ``shape = (m, n)`` gradient on, for its ``proj_type``.

    ``"std"``: ``"right"`` if ``m >= n`` else ``"left"`` (the projector sits on the smaller dimension);
    ``"reverse_std"``: ``"left"`` if ``m >= n`` else ``"right"``; ``"right"``, ``"left"``, ``"full"``: as named.
    Any other ``proj_type`` is a ``ValueError`` naming the valid values.
    """
    shape = tuple(shape)
    if len(shape) != 2:
        raise ValueError(f"shape must be 2-D (m, n); got {shape}")
    m, n = shape
    if proj_type == "std":
        return "right" if m >= n else "left"
    if proj_type == "reverse_std":
        return "left" if m >= n else "right"
    if proj_type in ("right", "left", "full"):
        return proj_type
    raise ValueError(f"proj_type must be one of {', '.join(repr(p) for p in PROJ_TYPES)}; got {proj_type!r}")


# --------------------------------------------------------------------------------------------- SVD
def svd_projector(grad: torch.Tensor, rank: int, side: str) -> Projector:
    """galore-torch 1.0's projector: ``GaLoreProjector.get_orthogonal_matrix(grad, rank, type=side)``.

    ``grad``: ``m x n``, any float dtype. The SVD is ``torch.linalg.svd(full_matrices=False)`` of ``grad`` in
    fp32 (``grad.float()`` when it is not fp32). Returns, cast back to ``grad.dtype`` when that is not fp32
    (as galore does): ``"right"``: ``Vh[:rank]`` (``min(rank, m, n) x n``); ``"left"``: ``U[:, :rank]``
    (``m x min(rank, m, n)``); ``"full"``: the tuple ``(U[:, :rank], Vh[:rank])``. Tensors are contiguous and
    bit-identical to galore's (which returns views; ``full`` is a list there).
    Cost: one full SVD, ``O(m n min(m, n))``.
    """
    _check_grad(grad)
    rank = _check_rank(rank)
    _check_side(side)
    matrix = grad if grad.dtype == torch.float32 else grad.float()
    U, _, Vh = torch.linalg.svd(matrix, full_matrices=False)
    left = U[:, :rank]
    right = Vh[:rank, :]
    if grad.dtype != torch.float32:
        left = left.to(device=grad.device, dtype=grad.dtype)
        right = right.to(device=grad.device, dtype=grad.dtype)
    if side == "right":
        return right.contiguous()
    if side == "left":
        return left.contiguous()
    return left.contiguous(), right.contiguous()


# --------------------------------------------------------------------------------------------- randomized
def _orth(Y):
    """Orthonormal basis of the columns of ``Y`` (reduced Householder QR)."""
    return torch.linalg.qr(Y, mode="reduced").Q


def _gaussian(rows, cols, seed, device):
    """A ``rows x cols`` fp32 standard normal matrix from a CPU generator seeded with ``seed``, on ``device``."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed)
    return torch.randn(rows, cols, generator=gen, dtype=torch.float32).to(device)


def randomized_projector(grad: torch.Tensor, rank: int, side: str, previous: Optional[Projector] = None, *,
                         seed: int = 0, oversample: int = 8, power_iters: int = 1) -> Projector:
    """Randomized range finder / subspace iteration projector (Halko-Martinsson-Tropp 2011).

    Returns a projector of the same shape, orientation and dtype as :func:`svd_projector`'s for the same
    arguments: ``"right"``: ``r x n`` with orthonormal rows; ``"left"``: ``m x r`` with orthonormal columns;
    ``"full"``: ``(L m x r, R r x n)``; ``r = min(rank, m, n)``; vectors ordered by decreasing singular value
    (signs are arbitrary, as an SVD's are). Computed in fp32 whatever ``grad.dtype``; cast back at the end.

    Algorithm, with ``A = G`` for "left"/"full" and ``A = G.T`` for "right", ``k = min(rank + oversample, m, n)``:

    * start block ``Y`` (the range side of ``A``): cold, ``Y = A @ Omega`` with ``Omega`` a Gaussian
      ``cols(A) x k`` matrix; warm (``previous`` given: the last projector of this side and shape),
      ``Y = [previous-as-columns, A @ Omega_extra]`` with ``k - r`` extra Gaussian directions;
    * ``power_iters`` subspace iterations ``Y <- A @ orth(A.T @ orth(Y))``;
    * ``Q = orth(Y)``, then a small SVD of the ``k x cols(A)`` sketch ``B = Q.T @ A = Ub S Vbh``; the range
      vectors are ``Q @ Ub[:, :r]`` (and for "full", ``R = Vbh[:r]``).

    ``Omega`` is drawn from a CPU ``torch.Generator`` seeded with ``seed`` (an int; the caller derives it from
    (group seed, parameter index, refresh count)) and moved to ``grad.device``: the same numbers on every rank
    and every device. Cost: ``2 (power_iters + 1)`` products of ``G`` with an ``n x k`` / ``m x k`` block
    (``O(m n k)`` each) plus QRs of ``max(m,n) x k`` blocks and an SVD of a ``k x min``-side sketch, against
    the full SVD's ``O(m n min(m, n))``.
    """
    _check_grad(grad)
    rank = _check_rank(rank)
    _check_side(side)
    oversample = _check_int(oversample, "oversample", 0)
    power_iters = _check_int(power_iters, "power_iters", 0)
    seed = _check_seed(seed)
    m, n = grad.shape
    r = min(rank, m, n)
    k = min(r + oversample, m, n)
    G = grad if grad.dtype == torch.float32 else grad.float()
    A = G.T if side == "right" else G          # the range we look for is the column space of A
    rows, cols = A.shape

    start = None
    if previous is not None:
        if side == "full":
            if not (isinstance(previous, (tuple, list)) and len(previous) == 2):
                raise TypeError("previous must be the (L, R) pair of the last 'full' projector")
            prev: object = previous[0]
            expect = (m, r)
        else:
            prev = previous
            expect = (r, n) if side == "right" else (m, r)
        if not isinstance(prev, torch.Tensor):
            raise TypeError(f"previous must be a tensor (the last projector); got {type(prev).__name__}")
        if tuple(prev.shape) != expect:
            raise ValueError(f"previous has shape {tuple(prev.shape)}; a {side!r} projector of a {m}x{n} "
                             f"gradient at rank {rank} has shape {expect}")
        start = prev.to(device=grad.device, dtype=torch.float32)
        if side == "right":
            start = start.T                     # rows -> columns of the range side (n x r)

    if start is None:
        Y = A @ _gaussian(cols, k, seed, grad.device)
    elif k > r:
        Y = torch.cat([start, A @ _gaussian(cols, k - r, seed, grad.device)], dim=1)
    else:
        Y = start
    for _ in range(power_iters):
        Z = _orth(A.T @ _orth(Y))
        Y = A @ Z
    Q = _orth(Y)                                # rows x k
    B = Q.T @ A                                 # k x cols
    Ub, _, Vbh = torch.linalg.svd(B, full_matrices=False)
    U = Q @ Ub[:, :r]                           # rows x r, ordered by singular value

    def _cast(t):
        t = t.contiguous()
        return t if grad.dtype == torch.float32 else t.to(grad.dtype)

    if side == "right":
        return _cast(U.T)
    if side == "left":
        return _cast(U)
    return _cast(U), _cast(Vbh[:r])


def subspace_error(grad: torch.Tensor, proj: Projector, side: str) -> float:
    """Relative residual of projecting ``grad`` onto ``proj``'s subspace: ``||G - back(low(G))||_F / ||G||_F``.

    ``proj`` is a projector in the module's orientation for ``side`` (e.g. from :func:`svd_projector`,
    :func:`randomized_projector` or :func:`dct_projector`). Computed in fp32; returns a Python float
    (0.0 for a zero gradient). For the same rank, the SVD projector's value is the optimum (Eckart-Young).
    """
    _check_grad(grad)
    _check_side(side)
    G = grad.float()
    if side == "full":
        if not (isinstance(proj, (tuple, list)) and len(proj) == 2):
            raise TypeError("a 'full' proj must be the (L, R) pair")
        L, R = (t.float() for t in proj)
        back = L @ (L.T @ G @ R.T) @ R
    else:
        if not isinstance(proj, torch.Tensor):
            raise TypeError(f"proj must be a tensor for side {side!r}")
        P = proj.float()
        back = (G @ P.T) @ P if side == "right" else P @ (P.T @ G)
    denom = torch.linalg.norm(G)
    if denom == 0:
        return 0.0
    return float(torch.linalg.norm(G - back) / denom)


# --------------------------------------------------------------------------------------------- DCT
_DCT_CACHE: dict = {}
_TWIDDLE_CACHE: dict = {}


def _norm_device(device):
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def dct_cache_clear() -> None:
    """Drop every cached DCT basis (and FFT twiddle vector) built by :func:`dct_basis` / ``method="fft"``."""
    _DCT_CACHE.clear()
    _TWIDDLE_CACHE.clear()


def dct_basis(n: int, device: Device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal ``n x n`` DCT matrix ``Q[k, j] = sqrt(2/n) cos(pi k (2j + 1) / (2n))``, row 0 times
    ``sqrt(1/2)``.

    The same matrix as ista-daslab-optimizers' ``dct3_matrix(n, dtype, device)``; its COLUMNS are the basis
    the DCT projector picks from (``G @ Q`` applies the orthonormal DCT-III to every row of ``G``). Computed
    in fp64 and cast once (ista computes it in fp32, whose cosine arguments lose accuracy for large ``n``).

    Cached per ``(n, device, dtype)`` in a module-level dict: ONE tensor shared by every layer of that size
    (``n*n*itemsize`` bytes each, e.g. 64 MiB for n = 4096 in fp32). Treat it as read-only.
    :func:`dct_cache_clear` frees it.  The matrix is stored with its columns as contiguous rows
    (:func:`dct_basis_rows`; this function returns the transposed view of that storage), so that a
    projector's r basis vectors are gathered as whole rows.
    """
    return _dct_cached(n, device, dtype)[1]


def dct_basis_rows(n: int, device: Device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dct_basis(n, device, dtype).T``, contiguous: row ``j`` is basis vector ``j`` (the cached storage).

    The DCT projector's r vectors are ``dct_basis_rows(n).index_select(0, indices)``: r contiguous rows
    (a gather of whole rows, where ``dct_basis(n)[:, indices]`` reads one element per row of the matrix).
    """
    return _dct_cached(n, device, dtype)[0]


def _dct_cached(n, device, dtype):
    """(rows, rows.t()) of the cached basis of size ``n``: the storage and the one view :func:`dct_basis`
    returns (the same object every call)."""
    n = _check_int(n, "n", 1)
    device = _norm_device(device)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype; got {dtype!r}")
    key = (n, device, dtype)
    hit = _DCT_CACHE.get(key)
    if hit is None:
        k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
        j = torch.arange(n, dtype=torch.float64).unsqueeze(0)
        Q = math.sqrt(2.0 / n) * torch.cos(math.pi * k * (2.0 * j + 1.0) / (2.0 * n))
        Q[0, :] *= math.sqrt(0.5)
        rows = Q.t().to(device=device, dtype=dtype).contiguous()  # row j: basis vector j
        hit = _DCT_CACHE[key] = (rows, rows.t())
    return hit


def _dct3_rows_fft(X: torch.Tensor) -> torch.Tensor:
    """``X @ dct_basis(N)`` for a ``rows x N`` matrix through one real FFT of length N per row (Makhoul 1980).

    ``y[j] = sum_k w_k x_k cos(pi k (2j+1) / (2N))`` with ``w_0 = sqrt(1/N)``, ``w_k = sqrt(2/N)``. With
    ``d_0 = w_0 x_0``, ``d_k = w_k x_k / 2`` and ``V[k] = exp(i pi k / 2N) (d_k - i d_{N-k})`` (``d_N = 0``), ``V``
    is Hermitian and ``v = irfft(V, norm="forward")`` holds the outputs in Makhoul's order:
    ``y[2t] = v[t]``, ``y[2t+1] = v[N-1-t]``. ``O(rows N log N)``; computed in fp32 (fp64 for fp64 input).
    """
    rows, N = X.shape
    cdtype = torch.float64 if X.dtype == torch.float64 else torch.float32
    X = X.to(cdtype)
    h = N // 2 + 1
    key = (N, _norm_device(X.device), cdtype)
    cached = _TWIDDLE_CACHE.get(key)
    if cached is None:
        w = torch.full((h,), 1.0 / math.sqrt(2.0 * N), dtype=torch.float64)   # w_k / 2 for k >= 1
        w[0] = math.sqrt(1.0 / N)
        angle = math.pi * torch.arange(h, dtype=torch.float64) / (2.0 * N)
        phase = torch.polar(torch.ones(h, dtype=torch.float64), angle)
        ctype = torch.complex128 if cdtype == torch.float64 else torch.complex64
        cached = (w.to(device=X.device, dtype=cdtype), phase.to(device=X.device, dtype=ctype))
        _TWIDDLE_CACHE[key] = cached
    w, phase = cached
    d = X[:, :h] * w                                 # d_k, k = 0 .. N//2
    d_rev = torch.zeros(rows, h, dtype=cdtype, device=X.device)
    d_rev[:, 1:] = X[:, N - h + 1:].flip(-1)         # x[N - k] for k = 1 .. N//2 (d_N = 0 at k = 0)
    d_rev.mul_(1.0 / math.sqrt(2.0 * N))             # d_{N-k}, N - k >= 1
    V = torch.complex(d, d_rev.neg_()).mul_(phase)
    v = torch.fft.irfft(V, n=N, dim=-1, norm="forward")
    y = torch.empty_like(v)
    ne = (N + 1) // 2
    y[:, 0::2] = v[:, :ne]
    y[:, 1::2] = v[:, ne:].flip(-1)
    return y


def dct_select(grad: torch.Tensor, rank: int, side: str, *, norm: float = 1,
               method: str = "matmul") -> Tuple[torch.Tensor, torch.Tensor]:
    """Score the DCT basis vectors against ``grad`` and keep the top ``rank`` (the SVD-free projector's refresh).

    ``"right"``: ``S = G @ Q`` (``Q = dct_basis(n)``), ``scores = S.norm(p=norm, dim=0)``; ``"left"``:
    ``S = Q.T @ G`` (``Q = dct_basis(m)``), ``scores = S.norm(p=norm, dim=1)``. ``indices =
    torch.topk(scores, k, sorted=False).indices`` (int64, ``k = min(rank, basis size)``); the projected
    gradient is read off ``S`` (``S[:, indices]``, ``m x k``, or ``S[indices, :]``, ``k x n``): one matmul, no
    second one. This is ista-daslab-optimizers' ``FFTLowRankProjector.change_subspace`` with
    ``sim_type="matmul"`` (``use_th_sim=False``), same indices in the same order. ``"full"`` is not supported.

    ``method="matmul"`` (default): the product in ``grad.dtype`` (ista's choice), ``O(m n size)``.
    ``method="fft"``: the same ``S`` through a length-``size`` real FFT per row/column (Makhoul's algorithm for
    the DCT-III, see ``_dct3_rows_fft``), ``O(m n log size)``, computed in fp32 and returned in ``grad.dtype``.
    Its ``S`` equals the matmul's to fp32 rounding (tests: max abs diff <= 1e-5 * max|S|); where two scores are
    that close, the two methods may keep different indices.
    """
    _check_grad(grad)
    rank = _check_rank(rank)
    _check_side(side, ("right", "left"))
    if method not in ("matmul", "fft"):
        raise ValueError(f"method must be 'matmul' or 'fft'; got {method!r}")
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not norm > 0:
        raise ValueError(f"norm must be a positive number (the p of the score's p-norm); got {norm!r}")
    m, n = grad.shape
    size = n if side == "right" else m
    k = min(rank, size)
    if method == "matmul":
        Q = dct_basis(size, grad.device, grad.dtype)
        S = grad @ Q if side == "right" else Q.T @ grad
    else:
        if side == "right":
            S = _dct3_rows_fft(grad).to(grad.dtype)
        else:
            S = _dct3_rows_fft(grad.T).T.to(grad.dtype)
    scores = S.norm(p=norm, dim=0 if side == "right" else 1)
    indices = torch.topk(scores, k=k, sorted=False).indices
    low = S[:, indices] if side == "right" else S[indices, :]
    return indices, low.contiguous()


def dct_projector(indices: torch.Tensor, n: int, side: str, device: Device, dtype: torch.dtype) -> torch.Tensor:
    """The dense DCT projector for the kept ``indices``, in this module's orientation.

    ``n``: the basis size (the gradient's ``n`` for "right", its ``m`` for "left"). ``"right"``:
    ``Q[:, indices].T`` (``r x n``); ``"left"``: ``Q[:, indices]`` (``n x r``), with ``Q = dct_basis(n, device,
    dtype)``. So ``low = G @ P.T`` / ``P.T @ G`` and ``back = low @ P`` / ``P @ low`` equal ista's
    ``from_higher_to_lower_dimensions`` / ``from_lower_to_higher_dimensions``. ``"full"``: ``ValueError``.
    """
    _check_side(side, ("right", "left"))
    n = _check_int(n, "n", 1)
    if not isinstance(indices, torch.Tensor) or indices.dim() != 1 or indices.dtype.is_floating_point \
            or indices.dtype.is_complex or indices.dtype == torch.bool:
        raise TypeError("indices must be a 1-D integer tensor (from dct_select)")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n):
        raise ValueError(f"indices must lie in [0, {n}); got values in [{int(indices.min())}, {int(indices.max())}]")
    rows = dct_basis_rows(n, device, dtype).index_select(0, indices.to(device=device, dtype=torch.long))
    return rows if side == "right" else rows.t().contiguous()


# --------------------------------------------------------------------------------------------- Q-GaLore
def adaptive_gap(queue: torch.Tensor, past_vector: Optional[torch.Tensor], new_projector: Projector, side: str,
                 gap: int, *, queue_size: int = 5, cos_threshold: float = 0.4,
                 gamma_proj: float = 2) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Q-GaLore's adaptive projector refresh interval (q-galore-torch 1.0 ``GaLoreProjector.project``).

    Call once per refresh with the NEW (unquantized) projector. ``queue``: float64 1-D tensor of the last
    ``<= queue_size`` cosine similarities (empty at first); ``past_vector``: the previous projector's first
    vector (``None`` at the first refresh); ``gap``: the current ``update_proj_gap`` (int).

    The new vector is ``new_projector[:1, :].flatten()`` for "right" and ``new_projector[:, :1].flatten()`` for
    "left" (for "full", an extension q-galore does not have: the first column of ``L``). If ``past_vector`` is
    given: ``F.cosine_similarity(past_vector, vector, dim=0).item()`` is appended to the FIFO (the oldest
    dropped when full), and when the queue is full and ``sum(queue) / queue_size >= cos_threshold`` (summed in
    Python, in queue order, exactly as q-galore does) ``gap = int(gap * gamma_proj)``. The first refresh only
    records the vector. Returns ``(queue, past_vector, gap)``: a new float64 tensor, a clone of the new vector
    (dtype of the projector) and an int. Nothing is modified in place.
    """
    _check_side(side)
    if not isinstance(queue, torch.Tensor) or queue.dim() != 1:
        raise TypeError("queue must be a 1-D float64 tensor (empty at the first refresh)")
    queue_size = _check_int(queue_size, "queue_size", 1)
    gap = _check_int(gap, "gap", 1)
    if queue.numel() > queue_size:
        raise ValueError(f"queue holds {queue.numel()} values; queue_size is {queue_size}")
    if side == "full":
        if not (isinstance(new_projector, (tuple, list)) and len(new_projector) == 2):
            raise TypeError("a 'full' new_projector must be the (L, R) pair")
        vec = new_projector[0][:, :1].clone().flatten()
    else:
        if not isinstance(new_projector, torch.Tensor) or new_projector.dim() != 2:
            raise TypeError("new_projector must be a 2-D tensor")
        vec = new_projector[:1, :].clone().flatten() if side == "right" else new_projector[:, :1].clone().flatten()
    values = [float(v) for v in queue.tolist()]
    if past_vector is not None:
        if past_vector.shape != vec.shape:
            raise ValueError(f"past_vector has shape {tuple(past_vector.shape)}; the new projector's first "
                             f"vector has shape {tuple(vec.shape)}")
        if len(values) == queue_size:
            values.pop(0)
        values.append(F.cosine_similarity(past_vector, vec, dim=0).item())
        if len(values) == queue_size and sum(values) / queue_size >= cos_threshold:
            gap = int(gap * gamma_proj)
    return torch.tensor(values, dtype=torch.float64), vec, gap
