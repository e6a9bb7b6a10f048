"""Reference Muon step (Jordan et al. 2024, "Muon: MomentUm Orthogonalized by Newton-schulz",
https://kellerjordan.github.io/posts/muon/).

Matches ``pytorch_optimizer.Muon`` 4.1.0 (``use_muon=True`` groups) op for op: the same torch calls in
the same order and dtypes, so on the same inputs the torch backend reproduces it bit for bit (tests).
In particular, as upstream:

* the Newton–Schulz iteration runs in bf16 (``ns_method="newton_schulz"``; the Gram variant in fp16)
  with fp32 accumulation inside ``torch.mm`` / ``torch.addmm``, on ``X = G^T`` when G has more rows than
  columns, normalized by ``max(||X||_F, eps)`` (the bf16 norm clamped from below; Keller Jordan's
  ``||X|| + eps`` is the same bf16 number for any norm above ~5e-5);
* momentum is ``buf <- lerp(buf, g, 1 - mu)`` and the Nesterov update ``u = lerp(g, buf, mu)``;
* a conv weight (out, in, kh, kw) is orthogonalized as the (out, in*kh*kw) matrix;
* the learning rate is scaled by ``sqrt(max(1, rows / cols))`` (Keller Jordan), or with
  ``use_adjusted_lr=True`` by ``0.2 sqrt(max(rows, cols))`` (Moonlight: matches AdamW's update RMS);
* weight decay uses the unscaled ``lr``: ``p <- p (1 - lr wd)``, or ``g <- g + wd p`` when not
  ``weight_decouple``;
* with ``batched=True`` (upstream's default ``foreach`` path) matrices of one shape are stacked and
  orthogonalized as one batch (``torch.bmm``), bit-identical to one at a time in practice.

Deliberate differences: the gradients are not modified (upstream negates them for ``maximize``, adds the
L2 term and the Nesterov mix into ``p.grad`` in place); a tensor ``lr`` is applied as upstream's foreach
path does (``p += update * -lr``: no host sync; upstream's ``foreach=False`` path passes it as ``alpha``
and can round the last fp32 bit differently); parameters with no elements are skipped (upstream divides
by zero).
"""
import math

import torch

DEFAULT_COEFFS = (3.4445, -4.7750, 2.0315)

# Coefficient presets, as pytorch_optimizer.optimizer.utils.matrix.NS_COEFFICIENTS (4.1.0).
NS_COEFFICIENTS = {
    "original": [DEFAULT_COEFFS],  # Keller Jordan's Muon
    "quintic": [  # optimized quintic schedule from modded-nanogpt
        (4.0848, -6.8946, 2.9270),
        (3.9505, -6.3029, 2.6377),
        (3.7418, -5.5913, 2.3037),
        (2.8769, -3.1427, 1.2046),
        (2.8366, -3.0525, 1.2012),
    ],
    "polar_express": [  # Polar Express, safety 1e-2
        (8.237312490495555, -23.157747414558198, 16.680568411445915),
        (4.082441999064835, -2.893047735332586, 0.5252849256975648),
        (3.9263479922546582, -2.8547468034765298, 0.5318022422894988),
        (3.2982187133085143, -2.424541981026706, 0.48632008358844075),
        (2.2970369434552573, -1.63662558125903, 0.4002628455953627),
        (1.8763805351440397, -1.2347896577722228, 0.35891887501668385),
        (1.8564423485617974, -1.2132449880935525, 0.3568003487825883),
        (1.8749994008682747, -1.2499988017229169, 0.3749994008546422),
    ],
    "polar_express_safer": [  # Polar Express, safety 2e-2
        (8.156554524902461, -22.48329292557795, 15.878769915207462),
        (4.0429299351667245, -2.808917465908704, 0.5000178451051299),
        (3.8916678022926563, -2.7724841532176825, 0.5060648178503389),
        (3.285753657755658, -2.3681294933425394, 0.46449024233003117),
        (2.3005307116270983, -1.6111665557258408, 0.3833374427545273),
        (1.8631210546382593, -1.2042160621002727, 0.3421879560523383),
        (1.8382572152247512, -1.1779263289537742, 0.3396513038637379),
        (1.8749999923301852, -1.2499999836060613, 0.374999991275876),
    ],
}
NS_METHODS = ("newton_schulz", "gram_newton_schulz")


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def ns_coefficients(weights):
    """A preset name, one (a, b, c) triple or a sequence of triples -> a list of float triples (as
    upstream's ``get_newton_schulz_weights``; raises ValueError otherwise)."""
    if isinstance(weights, str):
        key = weights.lower()
        if key in NS_COEFFICIENTS:
            return list(NS_COEFFICIENTS[key])
        raise ValueError(f"Invalid ns_coeffs {weights!r}: expected one of {tuple(NS_COEFFICIENTS)}, an (a, b, c) "
                         "tuple or a list of them")
    if isinstance(weights, tuple) and len(weights) == 3 and all(_is_number(w) for w in weights):
        out = [tuple(float(w) for w in weights)]
    else:
        try:
            items = list(weights)
        except TypeError:
            raise ValueError(f"Invalid ns_coeffs {weights!r}: expected a preset name, an (a, b, c) tuple or a "
                             "list of them") from None
        if not items:
            raise ValueError("Invalid ns_coeffs: the schedule must not be empty")
        out = []
        for c in items:
            if not isinstance(c, (tuple, list)) or len(c) != 3 or not all(_is_number(v) for v in c):
                raise ValueError(f"Invalid ns_coeffs entry {c!r}: expected an (a, b, c) tuple of numbers")
            out.append(tuple(float(v) for v in c))
    if not all(math.isfinite(v) for c in out for v in c):
        raise ValueError(f"Invalid ns_coeffs {weights!r}: coefficients must be finite")
    return out


def coefficient_schedule(weights, steps):
    """The (a, b, c) of each of ``steps`` iterations: the schedule, its last triple repeated."""
    sched = ns_coefficients(weights)
    return [sched[min(i, len(sched) - 1)] for i in range(steps)]


def newton_schulz(g, steps=5, eps=1e-7, coeffs=DEFAULT_COEFFS, dtype=torch.bfloat16):
    """Approximate the orthogonal polar factor U V^T of ``g`` = U S V^T (shape (..., rows, cols)) with
    ``steps`` quintic Newton–Schulz iterations in ``dtype``::

        X = g^T if rows > cols else g, cast to dtype;   X <- X / max(||X||_F, eps)
        repeat:  A = X X^T;   B = b A + c A^2;   X <- a X + B X     (X <- a X + b X X^T X + c (X X^T)^2 X)

    Each singular value s of X goes through p(s) = a s + b s^3 + c s^5; the default coefficients
    (3.4445, -4.7750, 2.0315) push every s in (0, 1] into roughly [0.7, 1.2] in five steps.  Same ops as
    pytorch_optimizer's ``zero_power_via_newton_schulz_5``: ``torch.mm`` then ``torch.addmm`` (one bf16
    rounding per product, fp32 accumulation), ``torch.bmm`` / ``baddbmm`` for batches.
    """
    if g.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    schedule = coefficient_schedule(coeffs, steps)
    transpose = g.size(-2) > g.size(-1)
    x = (g.mT if transpose else g).to(dtype=dtype, copy=True, memory_format=torch.contiguous_format)
    norm = x.norm(2, dim=(-2, -1), keepdim=True)
    x.div_(norm.clamp_min_(eps))
    if x.ndim > 2:
        x = x.flatten(0, -3)
    gram_fn, mm_fn = (torch.bmm, torch.baddbmm) if x.ndim > 2 else (torch.mm, torch.addmm)
    for a, b, c in schedule:
        gram = gram_fn(x, x.mT)                          # A = X X^T
        poly = mm_fn(gram, gram, gram, beta=b, alpha=c)  # B = b A + c A A
        x = mm_fn(x, poly, x, beta=a, alpha=1.0)         # X <- a X + B X
    x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    return x.mT if transpose else x


def gram_newton_schulz(g, steps=5, eps=1e-7, coeffs=DEFAULT_COEFFS, dtype=torch.float16, reset_steps=(2,)):
    """Gram Newton–Schulz (https://dao-lab.ai/blog/2026/gram-newton-schulz/): the same polynomial
    iteration carried out on the m x m Gram matrix, with the rectangular X rebuilt only at the
    ``reset_steps`` restarts and at the end.  Same ops as pytorch_optimizer's
    ``zero_power_via_gram_newton_schulz`` (normalization in fp32, iteration in ``dtype``)."""
    if g.ndim < 2:
        raise ValueError(f"gram_newton_schulz needs a matrix or a batch of matrices, got shape {tuple(g.shape)}")
    weights = ns_coefficients(coeffs)
    transpose = g.size(-2) > g.size(-1)
    matrix = (g.mT if transpose else g).float()
    norm = matrix.norm(2, dim=(-2, -1), keepdim=True)
    x = torch.empty_like(matrix, dtype=dtype, memory_format=torch.contiguous_format)
    torch.div(matrix, norm.clamp_min_(eps), out=x)
    if steps <= 0:
        return x.mT if transpose else x
    if x.ndim > 2:
        x = x.flatten(0, -3)
    gram_fn, mm_fn = (torch.bmm, torch.baddbmm) if x.ndim > 2 else (torch.mm, torch.addmm)
    gram = gram_fn(x, x.mT)
    factor = None
    for index in range(steps):
        if index in reset_steps and factor is not None:
            x = gram_fn(factor, x)
            gram = gram_fn(x, x.mT)
            factor = None
        w0, w1, w2 = weights[min(index, len(weights) - 1)]
        polynomial = mm_fn(gram, gram, gram, beta=w1, alpha=w2)
        if factor is not None:
            factor = mm_fn(factor, factor, polynomial, beta=w0)
        if index + 1 < steps and index + 1 not in reset_steps:
            scratch = mm_fn(gram, gram, polynomial, beta=w0)
            gram = mm_fn(scratch, polynomial, scratch, beta=w0)
        if factor is None:
            polynomial.diagonal(dim1=-2, dim2=-1).add_(w0)
            factor = polynomial
    x = gram_fn(factor, x)
    x = x.reshape(*g.shape[:-2], *x.shape[-2:])
    return x.mT if transpose else x


def matrix_shape(shape, flatten=True):
    """(rows, cols) of the matrices a parameter is orthogonalized as: (out, prod(rest)) when ``flatten``
    (a conv weight, upstream's rule), else its last two dimensions (a stack of matrices, e.g. the
    (experts, rows, cols) weight of a mixture of experts, each expert its own matrix)."""
    if flatten or len(shape) == 2:
        return shape[0], math.prod(shape[1:])
    return shape[-2], shape[-1]


def as_matrices(t, flatten=True):
    """``t`` as its matrix (rows, cols), or with ``flatten=False`` and more than two dimensions as the
    batch (count, rows, cols) of its matrices (a view when the memory layout allows)."""
    rows, cols = matrix_shape(t.shape, flatten)
    return t.reshape(rows, cols) if flatten or t.ndim == 2 else t.reshape(-1, rows, cols)


def adjusted_lr(lr, shape, use_adjusted_lr=False, flatten=True):
    """``lr * sqrt(max(1, rows / cols))``, or ``lr * 0.2 sqrt(max(rows, cols))`` with ``use_adjusted_lr``
    (upstream's ``get_adjusted_lr``), for the matrices of a parameter of ``shape`` (:func:`matrix_shape`);
    ``lr`` may be a tensor."""
    rows, cols = matrix_shape(shape, flatten)
    ratio = 0.2 * math.sqrt(max(rows, cols)) if use_adjusted_lr else math.pow(max(1.0, rows / cols), 0.5)
    return lr * ratio


def batch_key(shape, use_adjusted_lr=False, flatten=True):
    """Updates with the same key are orthogonalized in one batch: their matrices' (rows, cols), or
    (min, max) with ``use_adjusted_lr`` (where both orientations get the same learning rate)."""
    rows, cols = matrix_shape(shape, flatten)
    return (min(rows, cols), max(rows, cols)) if use_adjusted_lr else (rows, cols)


def ns_output_dtype(ns_method="newton_schulz"):
    """The dtype :func:`orthogonalize` returns: bf16 (Newton–Schulz, torch or Triton), fp16 (Gram)."""
    return torch.float16 if ns_method == "gram_newton_schulz" else torch.bfloat16


def orthogonalize(updates, *, ns_steps=5, ns_coeffs=DEFAULT_COEFFS, ns_method="newton_schulz", ns_reset_steps=(2,),
                  use_adjusted_lr=False, batched=True, newton_schulz_fn=None, flatten=True):
    """Orthogonalize each update as its (rows, cols) matrix -- or with ``flatten=False`` each matrix of
    its stack (:func:`matrix_shape`); returns tensors of the updates' shapes.

    ``batched``: updates with one :func:`batch_key` are stacked (each matrix transposed to rows <= cols)
    and run as one batch, as upstream's foreach path; a stack of matrices (``flatten=False``) is one
    batch even without it.  ``newton_schulz_fn(x, steps, coeffs)`` replaces the torch Newton–Schulz
    (the Triton backend); the Gram method always runs :func:`gram_newton_schulz`.
    """
    def run(x):
        if ns_method == "gram_newton_schulz":
            return gram_newton_schulz(x, steps=ns_steps, coeffs=ns_coeffs, reset_steps=tuple(ns_reset_steps))
        if newton_schulz_fn is not None:
            return newton_schulz_fn(x, ns_steps, ns_coeffs)
        return newton_schulz(x, steps=ns_steps, coeffs=ns_coeffs)

    out = [None] * len(updates)
    keyed = {}
    for i, u in enumerate(updates):
        keyed.setdefault(batch_key(u.shape, use_adjusted_lr, flatten) if batched else i, []).append(i)
    for idx in keyed.values():
        mats = [as_matrices(updates[i], flatten) for i in idx]
        if len(mats) == 1:
            results = [run(mats[0])]
        else:
            flips = [m.size(-2) > m.size(-1) for m in mats]
            pieces = [m.mT if f else m for m, f in zip(mats, flips)]
            pieces = [x.reshape(-1, *x.shape[-2:]) for x in pieces]
            stacked = run(torch.cat(pieces))
            results = [(r.mT if f else r).reshape(m.shape)
                       for m, f, r in zip(mats, flips, stacked.split([x.size(0) for x in pieces]))]
        for i, r in zip(idx, results):
            out[i] = r.reshape(updates[i].shape)
    return out


def _scalar(lr):
    return lr.reshape(()) if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


def momentum_updates(params, grads, momentum_buffers, *, lr, momentum=0.95, nesterov=True, weight_decay=0.0,
                     weight_decouple=True, maximize=False):
    """The elementwise first half of a Muon step (:func:`muon_reference`), in place on ``params``
    (decoupled weight decay) and ``momentum_buffers``; returns (the updates Newton–Schulz takes, the
    tensors the cautious mask compares them with).  Every element needs only its own inputs, so the
    local shards of a sharded parameter give the bits of the whole tensor."""
    lr = _scalar(lr)
    updates, refs = [], []
    for p, g, buf in zip(params, grads, momentum_buffers):
        if maximize:
            g = -g
        if weight_decay != 0.0:
            if weight_decouple:
                p.mul_(1.0 - weight_decay * lr)
            elif weight_decay > 0.0:
                g = g.add(p, alpha=weight_decay)
        buf.lerp_(g, 1.0 - momentum)
        u = g.lerp(buf, momentum) if nesterov else buf
        updates.append(u)
        refs.append(u if nesterov else g)
    return updates, refs


def cautious_update(o, ref, flatten=True):
    """``o`` with the entries whose sign disagrees with ``ref`` zeroed, rescaled by numel / (kept + 1)
    over each matrix (a sum over the whole matrix: whole matrices only) -- the whole parameter, or with
    ``flatten=False`` each matrix of a stack."""
    mask = (o * ref > 0).to(ref.dtype)
    if flatten or o.ndim == 2:
        mask.mul_(mask.numel() / (mask.sum() + 1))
    else:
        mask.mul_(o.size(-2) * o.size(-1) / (mask.sum(dim=(-2, -1), keepdim=True) + 1))
    return o.mul(mask).to(o.dtype)  # upstream: update.mul_(mask), rounded to the update's dtype


def apply_updates(params, ortho, *, lr, use_adjusted_lr=False, flatten=True, shapes=None):
    """``p <- p - lr * scale * O`` (:func:`adjusted_lr` of ``shapes[i]``, default the parameters' own
    shapes: pass the whole tensors' shapes when ``params`` are shards)."""
    lr = _scalar(lr)
    for i, (p, o) in enumerate(zip(params, ortho)):
        step = adjusted_lr(lr, p.shape if shapes is None else shapes[i], use_adjusted_lr, flatten)
        if isinstance(step, torch.Tensor):
            p.add_(o.to(torch.promote_types(p.dtype, step.dtype)) * -step)
        else:
            p.add_(o, alpha=-step)


def muon_reference(params, grads, momentum_buffers, *, lr, momentum=0.95, nesterov=True, weight_decay=0.0,
                   weight_decouple=True, ns_steps=5, ns_coeffs=DEFAULT_COEFFS, ns_method="newton_schulz",
                   ns_reset_steps=(2,), use_adjusted_lr=False, maximize=False, cautious=False, batched=True,
                   newton_schulz_fn=None, flatten=True):
    """One Muon step, in place, over matrices (ndim >= 2) of one device and dtype.  With g the gradient::

        g <- -g                                              if maximize
        p <- p (1 - lr wd)     if weight_decouple,   else  g <- g + wd p
        buf <- buf + (1 - mu)(g - buf)                       (torch.lerp)
        u <- g + mu (buf - g)  if nesterov,          else  u <- buf
        O <- NewtonSchulz(u as a (rows, cols) matrix)        (bf16; see :func:`newton_schulz`)
        O <- O * mask * numel / (sum(mask) + 1),  mask = [O * v > 0]    if cautious (v: u if nesterov else g;
                                                             sums and numel per matrix)
        p <- p - lr * scale(rows, cols) * O                  (see :func:`adjusted_lr`)

    ``flatten=False``: a parameter with more than two dimensions is a stack of (rows, cols) matrices
    (its last two dimensions), each orthogonalized (scaled, cautious-masked) on its own, in one batch.
    ``params``/``grads``/``momentum_buffers`` are parallel lists; ``lr`` is a float or a one-element tensor
    (of any shape, used as a scalar).  The three phases are :func:`momentum_updates`,
    :func:`orthogonalize` (+ :func:`cautious_update`) and :func:`apply_updates`.
    Parameters without elements are left alone.  ``grads`` are not modified.
    """
    keep = [i for i, p in enumerate(params) if p.numel() > 0]
    params = [params[i] for i in keep]
    grads = [grads[i] for i in keep]
    bufs = [momentum_buffers[i] for i in keep]
    if not params:
        return
    updates, refs = momentum_updates(params, grads, bufs, lr=lr, momentum=momentum, nesterov=nesterov,
                                     weight_decay=weight_decay, weight_decouple=weight_decouple, maximize=maximize)
    ortho = orthogonalize(updates, ns_steps=ns_steps, ns_coeffs=ns_coeffs, ns_method=ns_method,
                          ns_reset_steps=ns_reset_steps, use_adjusted_lr=use_adjusted_lr, batched=batched,
                          newton_schulz_fn=newton_schulz_fn, flatten=flatten)
    if cautious:
        ortho = [cautious_update(o, ref, flatten) for o, ref in zip(ortho, refs)]
    apply_updates(params, ortho, lr=lr, use_adjusted_lr=use_adjusted_lr, flatten=flatten)
