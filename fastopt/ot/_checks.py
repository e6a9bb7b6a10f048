"""The argument checks of the OT solvers: one rule and one message per kind of argument.

Every check takes ``fn``, the public function's name, which prefixes its message (``"sinkhorn: eps must
be ..."``).  Wrong types raise :class:`ArgumentTypeError`, which is a ``TypeError`` and also a
``ValueError`` (the dense solvers document a ``ValueError`` for every bad input, the others a
``TypeError`` for a wrong type: both hold).

Checks of values (finite, non-negative, positive totals) read a tensor on the host; the solvers that
compile (:func:`fastopt.ot.sinkhorn`) pass ``values=eager()`` so that they run in eager mode only.
"""
import numbers

import torch

# The ground costs of the point-cloud solvers, with the code the kernels take.
COSTS = {"sqeuclidean": 0, "euclidean": 1}


class ArgumentTypeError(TypeError, ValueError):
    """An argument of the wrong type (a TypeError, and a ValueError as the dense solvers document)."""


def eager():
    """Whether value checks may read tensors on the host (not while torch.compile traces)."""
    return not torch.compiler.is_compiling()


def _where(fn):
    return f"{fn}: " if fn else ""


def _interval(low, low_ok, high, high_ok):
    if high is None:
        return f"{'>=' if low_ok else '>'} {low:g}"
    return f"in {'[' if low_ok else '('}{low:g}, {high:g}{']' if high_ok else ')'}"


# -- numbers ----------------------------------------------------------------------------------------
def real(value, name, fn, *, low=0.0, low_ok=False, high=None, high_ok=False, finite=True, tensor=False):
    """``value`` as a float: a real number (not a bool) in ``(low, high)`` (ends included with ``low_ok``,
    ``high_ok``; no upper end when ``high`` is None), finite unless ``finite=False``.  ``tensor``: a
    one-element tensor is accepted too (read on the host)."""
    if tensor and isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{_where(fn)}{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    rule = f"{_where(fn)}{name} must be {'a finite' if finite else 'a'} number {_interval(low, low_ok, high, high_ok)}"
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ArgumentTypeError(f"{rule}, got {value!r}")
    v = float(value)
    ok = (not finite or abs(v) < float("inf")) and (low < v or (low_ok and v == low))
    if not ok or (high is not None and not (v < high or (high_ok and v == high))):
        raise ValueError(f"{rule}, got {value!r}")
    return v


def integer(value, name, fn, *, low=1):
    """``value`` as an int: an integer (not a bool) ``>= low``."""
    rule = f"{_where(fn)}{name} must be an integer >= {low}, got {value!r}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ArgumentTypeError(rule)
    if value < low:
        raise ValueError(rule)
    return int(value)


def cost_name(cost, fn):
    if cost not in COSTS:
        raise ValueError(f"{_where(fn)}cost must be one of {tuple(COSTS)}, got {cost!r}")


# -- tensors ----------------------------------------------------------------------------------------
def float_tensor(t, name, fn, *, dtypes=None):
    """A real floating-point tensor (of one of ``dtypes`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise ArgumentTypeError(f"{_where(fn)}{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ArgumentTypeError(f"{_where(fn)}{name} must be {names}, got {t.dtype}")
    if t.is_complex():
        raise ArgumentTypeError(f"{_where(fn)}{name} must be real, got the complex dtype {t.dtype}")
    if not t.is_floating_point():
        raise ArgumentTypeError(f"{_where(fn)}{name} must be a floating-point tensor (float16, bfloat16, float32 or "
                                f"float64), got {t.dtype}")


def same_device(t, name, device, other, fn):
    """``t`` is on ``device``, where ``other`` (what it goes with) is."""
    if t.device != device:
        raise ValueError(f"{_where(fn)}{name} is on {t.device} but {other} is on {device}")


def finite(t, name, fn):
    """No inf or NaN in ``t`` (a host read)."""
    if not bool(torch.isfinite(t.detach()).all()):
        raise ValueError(f"{_where(fn)}{name} has non-finite values (inf or nan): {name} must be finite")


def points(t, name, fn, *, any_batch, nonempty, values):
    """A point cloud ``(n, d)`` or batched: ``(B, n, d)`` (``any_batch=False``) or ``(*batch, n, d)``;
    ``nonempty``: ``n >= 1`` and ``d >= 1``; ``values``: finite (a host read)."""
    float_tensor(t, name, fn)
    if t.dim() < 2 or (not any_batch and t.dim() > 3):
        shapes = "(n, d) or (*batch, n, d)" if any_batch else "(n, d) or (B, n, d)"
        raise ValueError(f"{_where(fn)}{name} must have shape {shapes}, got {tuple(t.shape)}")
    if nonempty and t.shape[-2] == 0:
        raise ValueError(f"{_where(fn)}{name} has no points: shape {tuple(t.shape)}")
    if nonempty and t.shape[-1] == 0:
        raise ValueError(f"{_where(fn)}{name} has dimension d = 0: shape {tuple(t.shape)}")
    if values:
        finite(t, name, fn)


def point_pair(x, y, fn, *, same_dtype):
    """Two clouds ``(*batch, n, d)`` and ``(*batch, m, d)``: the same batch shape, dimension and device
    (and dtype with ``same_dtype``)."""
    need = f"{_where(fn)}x {tuple(x.shape)} and y {tuple(y.shape)} need the same batch and dimension, but"
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(f"{need} do not have the same dimension d ({x.shape[-1]} and {y.shape[-1]})")
    if x.shape[:-2] != y.shape[:-2]:
        raise ValueError(f"{need} do not have the same batch shape ({tuple(x.shape[:-2])} and {tuple(y.shape[:-2])})")
    same_device(y, "y", x.device, "x", fn)
    if same_dtype and x.dtype != y.dtype:
        raise ValueError(f"{_where(fn)}x and y must have the same dtype, got {x.dtype} and {y.dtype}")


def cost_matrix(C, name, fn, *, dtypes=None, any_batch=True, nonempty=True, values=True):
    """A dense cost ``(*batch, n, m)`` (``any_batch``) or ``(n, m)`` / ``(B, n, m)``; ``nonempty``:
    ``n, m >= 1``; ``values``: finite (a host read)."""
    float_tensor(C, name, fn, dtypes=dtypes)
    bad = C.dim() < 2 or (not any_batch and C.dim() > 3) or (nonempty and (C.shape[-1] == 0 or C.shape[-2] == 0))
    if bad:
        shapes = "(..., n, m)" if any_batch else "(n, m) or (B, n, m)"
        raise ValueError(f"{_where(fn)}{name} must have shape {shapes}{' with n, m >= 1' if nonempty else ''}, "
                         f"got {tuple(C.shape)}")
    if C.layout != torch.strided:
        raise ValueError(f"{_where(fn)}{name} must be a dense (strided) tensor, got layout {C.layout}")
    if values:
        finite(C, name, fn)


# -- weights (marginals) ----------------------------------------------------------------------------
def weights(w, name, fn, *, n, batch, ref, ref_shape, device, dtype=None, broadcast=False, positive=False,
            total=True, values=True):
    """Weights of ``n`` points for a problem of batch shape ``batch`` whose points (or cost) ``ref`` (of
    shape ``ref_shape``) are on ``device``: of shape ``(n,)`` or ``(*batch, n)`` (any shape that
    broadcasts to it with ``broadcast``).  With ``values`` (host reads): finite and non-negative
    (``positive``: every weight > 0) with, when ``total``, a positive sum per batch entry.  Returns ``w``
    (converted to ``dtype`` when given, before the value checks)."""
    float_tensor(w, name, fn)
    full = (*batch, n)
    ref_full = f"{ref} {tuple(ref_shape)}"
    if broadcast:
        if w.dim() == 0 or w.shape[-1] != n:
            raise ValueError(f"{_where(fn)}{name} must have shape (..., {n}) to match {ref_full}, "
                             f"got {tuple(w.shape)}")
        try:
            fits = torch.broadcast_shapes(w.shape, full) == full
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"{_where(fn)}{name} of shape {tuple(w.shape)} does not broadcast to the batch shape "
                             f"{tuple(batch)} of {ref_full}")
    elif tuple(w.shape) not in ((n,), full):
        raise ValueError(f"{_where(fn)}{name} must have shape ({n},) or {full} to match {ref_full}, "
                         f"got {tuple(w.shape)}")
    same_device(w, name, device, ref, fn)
    if dtype is not None:
        w = w.to(dtype)
    if not values:
        return w
    wd = w.detach()
    bad = ~torch.isfinite(wd).all() | ((wd <= 0) if positive else (wd < 0)).any()
    if total:
        bad = bad | ~(wd.sum(-1) > 0).all()
    if not bool(bad):  # one host read when the weights are good
        return w
    rule = "weights must be finite and > 0 (drop zero-weight points before calling)" if positive else \
        "weights must be finite and non-negative"
    if not bool(torch.isfinite(wd).all()):
        raise ValueError(f"{_where(fn)}{name} has non-finite weights (inf or nan); {rule}")
    if positive and bool((wd <= 0).any()):
        raise ValueError(f"{_where(fn)}{name} has weights <= 0 (min {wd.min().item():.3g}); {rule}")
    if bool((wd < 0).any()):
        raise ValueError(f"{_where(fn)}{name} has negative weights (min {wd.min().item():.3g}); {rule}")
    positive_total(wd.sum(-1), name, fn)
    return w


def positive_total(total, name, fn):
    """Every batch entry's total weight ``total`` is > 0 (a host read)."""
    if not bool((total > 0).all()):
        raise ValueError(f"{_where(fn)}{name} must sum to a positive value in every batch entry (a positive total "
                         f"mass), got sum {total.min().item():.3g}")


def balanced(mass_a, mass_b, fn, hint=""):
    """Equal total masses per batch entry (relative difference at most 1e-5; a host read)."""
    if bool(((mass_a - mass_b).abs() > 1e-5 * torch.maximum(mass_a, mass_b)).any()):
        raise ValueError(f"{_where(fn)}a and b must have the same total mass (balanced OT needs equal total masses), "
                         f"got sums {mass_a.flatten()[:4].tolist()} and {mass_b.flatten()[:4].tolist()}{hint}")


def dense_marginals(C, a, b, fn, *, positive=False):
    """The weights of a balanced problem on the checked cost ``C`` (..., n, m): ``a`` (..., n) and ``b``
    (..., m) in C's dtype, expanded to C's batch shape (uniform when None), checked (broadcasting shapes,
    ``positive``: every weight > 0), with equal masses; ``b`` is rescaled to ``a``'s mass (a no-op up to
    rounding for consistent inputs: it removes the mismatch that would floor the marginal error)."""
    n, m = C.shape[-2:]
    batch = C.shape[:-2]
    out = []
    for w, name, size in ((a, "a", n), (b, "b", m)):
        if w is None:
            w = torch.full((*batch, size), 1.0 / size, dtype=C.dtype, device=C.device)
        else:
            w = weights(w, name, fn, n=size, batch=batch, ref="C", ref_shape=C.shape, device=C.device, dtype=C.dtype,
                        broadcast=True, positive=positive).expand(*batch, size)
        out.append(w)
    a, b = out
    mass_a, mass_b = a.sum(-1), b.sum(-1)
    balanced(mass_a, mass_b, fn)
    return a, b * (mass_a / mass_b)[..., None]
