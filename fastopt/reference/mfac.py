"""Reference dense M-FAC (Frantar, Kurtic, Alistarh, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information", NeurIPS 2021): the sliding-window optimizer, in plain torch ops.

The window holds the last ``m`` gradients as the rows of ``G`` (m, d) (a ring: step t writes row
``(t - 1) % m``; rows not yet written are zero).  The empirical Fisher of the window is

    F = damp I + G^T G / m

with the official codes' scaling: the divisor is always ``m`` (``ngrads``), also while the window is
only partly filled (the zero rows add nothing; IST-DASLab/M-FAC ``optim.py`` ``HInvFastUpMulti`` and
ista-daslab-optimizers' ``DenseCoreMFAC`` both use ``m + D_ii`` as the Sherman-Morrison denominator,
which is this F).  Its inverse applied to a vector is, by the Woodbury identity,

    F^-1 x = x / damp - G^T c,    c = (m damp I + G G^T)^-1 (G x) / damp.

The paper's recursion (its matrices D and B) is an unpivoted LDL^T factorization of
``G G^T / damp + m I``, i.e. of the same m x m system ``A = m damp I + K`` (K = G G^T, the Gram
matrix).  Here ``W = A^-1`` is kept instead, in fp64, and updated when one row of the window is
replaced in O(m^2): remove index s (``W <- W - W[:, s] W[s, :] / W[s, s]``), then add it back with
its new column (a bordered inverse, ``W <- W + v v^T / sigma``); every ``m`` steps (and whenever
``damp`` changes) ``W`` is recomputed from ``K`` in O(m^3), so the cost is O(dm + m^2) per step
amortized and rounding cannot drift.  K is updated one row per step from the dot products of pass 1.

One step over d therefore is two passes over the window:
  pass 1: g <- grad (+ wd p with L2 decay); G[s] <- g (storage dtype); dots_x = G g, dots_k = G G[s]
          (the two differ only when the window is stored in bf16: K is the Gram of the *stored* rows,
          while the product is of the fp32 gradient);
  m x m:  K[s, :] = K[:, s] = dots_k; W updated; c = W dots_x / damp;
  pass 2: u = g / damp - G^T c; v <- mom v + (1 - mom) u (momentum > 0, as M-FAC's optimizer);
          p <- p (1 - wd) - lr v (decoupled decay, as ista's DenseMFAC) or p <- p - lr v.

The functions here are the executable spec of fastopt's kernels (``csrc/cpu/mfac_kernels.cpp``,
``triton_kernels/mfac.py``); the m x m part (:func:`mfac_refresh_inverse`, :func:`mfac_replace_inverse_`,
:func:`mfac_coefficients`) is shared by every backend.
"""
import torch

# columns per chunk of the torch passes (bounds the temporaries: nrows x CHUNK floats)
CHUNK = 1 << 16


def _chunks(numel):
    for start in range(0, numel, CHUNK):
        yield start, min(numel, start + CHUNK)


def _grad_chunk(grad, param, a, b, wd_l2, acc_dtype):
    g = grad.reshape(-1)[a:b].to(acc_dtype) if grad is not None else torch.zeros(b - a, dtype=acc_dtype,
                                                                                 device=param.device)
    if wd_l2:
        g = g + wd_l2 * param.reshape(-1)[a:b].to(acc_dtype)
    return g


def acc_dtype_of(window):
    """The arithmetic dtype of the passes for a window: fp64 for an fp64 window, else fp32."""
    return torch.float64 if window.dtype == torch.float64 else torch.float32


def mfac_window_dots_reference(window, slot, nrows, params, grads, wd_l2=0.0):
    """Pass 1 in torch ops.  ``window`` (m, d) holds the params' gradients side by side (param i's
    columns follow param i-1's, each flattened); writes ``g = grad (+ wd_l2 p)`` into row ``slot`` (a
    None grad is zero) and returns ``(dots_x, dots_k)``, fp64 (m,): ``dots_x[j] = G_j . g`` and
    ``dots_k[j] = G_j . G_slot`` for the rows ``j < nrows`` (zero beyond; row ``slot`` already holds
    the new ``g``).  Products in fp32 per chunk of columns (fp64 for an fp64 window), summed in fp64."""
    m = window.shape[0]
    acc = acc_dtype_of(window)
    two = window.dtype not in (torch.float32, torch.float64)
    dots_x = torch.zeros(m, dtype=torch.float64, device=window.device)
    dots_k = torch.zeros(m, dtype=torch.float64, device=window.device) if two else dots_x
    off = 0
    for p, grad in zip(params, grads):
        n = p.numel()
        for a, b in _chunks(n):
            g = _grad_chunk(grad, p, a, b, wd_l2, acc)
            window[slot, off + a:off + b] = g.to(window.dtype)
            rows = window[:nrows, off + a:off + b].to(acc)
            dots_x[:nrows] += (rows @ g).double()
            if two:
                dots_k[:nrows] += (rows @ rows[slot]).double()
        off += n
    return dots_x, dots_k


def mfac_update_reference(window, nrows, coef, params, grads, momentum_buffer, *, lr, damp, momentum=0.0,
                          wd_l2=0.0, wd_decoupled=0.0):
    """Pass 2 in torch ops: for every column, ``u = g / damp - sum_j<nrows coef[j] G[j]`` with
    ``g = grad (+ wd_l2 p)`` as in pass 1; with ``momentum`` > 0 ``v <- momentum v + (1 - momentum) u``
    into ``momentum_buffer`` (d,) and ``u = v``; then ``p <- p (1 - wd_decoupled) - lr u``.
    ``coef`` (>= nrows,) in the passes' arithmetic dtype (:func:`acc_dtype_of`)."""
    acc = acc_dtype_of(window)
    c = coef[:nrows].to(acc)
    off = 0
    for p, grad in zip(params, grads):
        n = p.numel()
        flat = p.view(-1) if p.is_contiguous() else None
        for a, b in _chunks(n):
            g = _grad_chunk(grad, p, a, b, wd_l2, acc)
            u = g / damp - c @ window[:nrows, off + a:off + b].to(acc)
            if momentum > 0:
                v = momentum_buffer[off + a:off + b]
                v.copy_(momentum * v.to(acc) + (1.0 - momentum) * u)
                u = v.to(acc)
            new = p.reshape(-1)[a:b].to(acc) * (1.0 - wd_decoupled) - lr * u
            if flat is not None:
                flat[a:b] = new.to(p.dtype)
            else:  # a non-contiguous param: write through a view of the whole tensor
                whole = p.reshape(-1).clone()
                whole[a:b] = new.to(p.dtype)
                p.copy_(whole.view_as(p))
        off += n


def mfac_refresh_inverse(gram, m, damp):
    """``W = (m damp I + K)^-1`` in fp64 from the Gram matrix ``K`` (m, m) fp64 (symmetrized)."""
    a = gram + (m * damp) * torch.eye(m, dtype=gram.dtype, device=gram.device)
    w = torch.linalg.inv(a)
    return 0.5 * (w + w.T)


def mfac_replace_inverse_(inv, gram, slot, m, damp):
    """Update ``inv = (m damp I + K_old)^-1`` in place, O(m^2), to the inverse for ``gram`` (K with
    row/column ``slot`` replaced): remove index ``slot`` (Schur complement), then border it back."""
    # (one m x m op per rank-1 term: torch.addr; the scalings are on m-vectors)
    ws = inv[:, slot].clone()
    inv.addr_(ws, ws / -ws[slot])
    inv[slot, :] = 0
    inv[:, slot] = 0
    b = gram[:, slot].clone()
    b[slot] = 0
    w = inv @ b
    sigma = gram[slot, slot] + m * damp - b @ w
    w[slot] = -1.0
    inv.addr_(w, w / sigma)
    return inv


def mfac_coefficients(inv, dots_x, damp):
    """``c = W (G x) / damp`` (fp64 (m,)): the window's coefficients in ``F^-1 x = x / damp - G^T c``."""
    return (inv @ dots_x) / damp


def mfac_ifvp_explicit(window, x, damp):
    """``(damp I + G^T G / m)^-1 x`` by a dense fp64 solve (d x d; small d only, for tests)."""
    g = window.double()
    m, d = g.shape
    f = damp * torch.eye(d, dtype=torch.float64, device=g.device) + g.T @ g / m
    return torch.linalg.solve(f, x.double())
