"""Light Schrödinger Bridge (Korotin, Gushchin, Burnaev, "Light Schrödinger Bridge", ICLR 2024), fused.

    sb = fastopt.ot.LightSB(dim=2, n_potentials=10, epsilon=0.1)
    opt = torch.optim.Adam(sb.parameters(), lr=1e-3)
    for step in range(steps):
        loss = sb.loss(x_batch, y_batch)        # mean log c(x) - mean log v(y), one fused pass per side
        opt.zero_grad(); loss.backward(); opt.step()
    y = sb(x)                                    # samples of the learned bridge's y | x

The parameters, their names and the formulas are those of the official class (github.com/ngushchin/LightSB,
``src/light_sb.py``; the spec is :mod:`fastopt.reference.lightsb`).  What runs fused: the two log-sum-exps
over the K mixture components, ``log c(x)`` and ``log v(y)``, with their gradients, one pass per side
(``csrc/cpu/lightsb_kernels.cpp`` with OpenMP over rows; ``triton_kernels/lightsb.py`` one program per
tile of rows), each an online log-sum-exp over tiles of components (the streaming max / rescale of the
Sinkhorn tiles).  The parameter-sized glue (``log_alpha_raw / epsilon``, ``exp(s)``, the Gaussian
normalizing constants and, for a full S, the rotated coordinates ``R_k^T x``) is plain torch with
autograd, so the gradients reach every parameter exactly as the official code's autograd does.
"""
import importlib
import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .. import _backend, _ops
from ..reference import lightsb as ref
from . import _checks

__all__ = ["LightSB", "lightsb_pass"]

_FN = "LightSB"


def _triton_lightsb():
    _backend.triton_kernels()  # (a clear error when triton is missing)
    return importlib.import_module("fastopt.triton_kernels.lightsb")


def _lightsb_pass_kernel(pts: Tensor, coords: Optional[Tensor], la: Tensor, cen: Tensor, sig: Tensor, out: Tensor,
                         row_w: Optional[Tensor], dpts: Optional[Tensor], dcoords: Optional[Tensor],
                         dla: Optional[Tensor], dcen: Optional[Tensor], dsig: Optional[Tensor], side: int, eps: float,
                         w_scale: float, backend: str) -> None:
    """One fused LightSB pass (``csrc/cpu/lightsb.h``): ``out_i = LSE_k a_ik`` over the K components, with
    ``a_ik = la_k + (sum_j sig_kj q_ikj^2 + 2 cen_k . pts_i) / (2 eps)`` (side 0, log c) or
    ``a_ik = la_k - sum_j sig_kj (q_ikj - cen_kj)^2 / (2 eps)`` (side 1, log v), where ``q_ik = pts_i``
    (``coords`` None: diagonal S) or ``coords[i, k]`` (full S); and, into the optional fp32 buffers, the
    gradient of ``sum_i g_i out_i`` (``g = row_w``, or ``w_scale`` for every row) with respect to ``pts``
    (n, d), ``coords`` (n, K, d), ``la`` (K,), ``cen`` and ``sig`` (K, d) (the last three together).  Every
    tensor is fp32, contiguous and on one device (checked here)."""
    if pts.dim() != 2 or cen.dim() != 2:
        raise ValueError("fastopt::lightsb_pass_: pts must be (n, d) and cen (K, d)")
    n, d = pts.shape
    k = cen.shape[0]
    if side not in (0, 1) or not (eps > 0.0 and math.isfinite(eps)) or k < 1 or d < 1 or cen.shape[1] != d:
        raise ValueError(f"fastopt::lightsb_pass_: bad side {side}, eps {eps} or sizes (n {n}, K {k}, d {d})")
    params = [t is not None for t in (dla, dcen, dsig)]
    if any(params) and not all(params):
        raise ValueError("fastopt::lightsb_pass_: dla, dcen and dsig go together")
    if dcoords is not None and coords is None:
        raise ValueError("fastopt::lightsb_pass_: dcoords needs coords")
    call = _ops._Call("lightsb_pass_", pts.device)
    f32 = torch.float32
    _ops._add_contiguous(call, "pts", pts, f32, n * d, (n, d))
    if coords is not None:
        _ops._add_contiguous(call, "coords", coords, f32, n * k * d, (n, k, d))
    _ops._add_contiguous(call, "la", la, f32, k, (k,))
    _ops._add_contiguous(call, "cen", cen, f32, k * d, (k, d))
    _ops._add_contiguous(call, "sig", sig, f32, k * d, (k, d))
    _ops._add_contiguous(call, "out", out, f32, n, (n,))
    for name, t, shape in (("row_w", row_w, (n,)), ("dpts", dpts, (n, d)), ("dcoords", dcoords, (n, k, d)),
                           ("dla", dla, (k,)), ("dcen", dcen, (k, d)), ("dsig", dsig, (k, d))):
        if t is not None:
            _ops._add_contiguous(call, name, t, f32, math.prod(shape), shape)
    call.check()
    if backend == "triton":
        _triton_lightsb().lightsb_pass(pts, coords, la, cen, sig, out, row_w, dpts, dcoords, dla, dcen, dsig,
                                       int(side), float(eps), float(w_scale))
        return
    if backend != "cpu":
        raise _backend.BackendUnavailableError(f"fastopt::lightsb_pass_: no kernel backend {backend!r}")
    p = call.ptr
    _backend.native().lightsb_cpu(p("pts"), p("coords"), p("la"), p("cen"), p("sig"), p("out"), p("row_w"),
                                  p("dpts"), p("dcoords"), p("dla"), p("dcen"), p("dsig"), n, k, d, int(side),
                                  float(eps), float(w_scale))


lightsb_pass_, lightsb_pass = _ops._kernel_op(
    "lightsb_pass_", mutates=("out", "dpts", "dcoords", "dla", "dcen", "dsig"))(_lightsb_pass_kernel)


def _grads(ctx_needs, pts, coords, la, cen):
    """Fresh fp32 gradient buffers for what needs one (None for the rest)."""
    n, d = pts.shape
    k = cen.shape[0]
    dev, f32 = pts.device, torch.float32
    need_pts, need_coords, need_la, need_cen, need_sig = ctx_needs
    dpts = torch.empty(n, d, dtype=f32, device=dev) if need_pts else None
    dcoords = torch.empty(n, k, d, dtype=f32, device=dev) if (need_coords and coords is not None) else None
    params = need_la or need_cen or need_sig
    dla = torch.empty(k, dtype=f32, device=dev) if params else None
    dcen = torch.empty(k, d, dtype=f32, device=dev) if params else None
    dsig = torch.empty(k, d, dtype=f32, device=dev) if params else None
    return dpts, dcoords, dla, dcen, dsig


class _FusedMean(torch.autograd.Function):
    """``weight * sum_i out_i`` of one side, its gradient computed in the same pass (the forward saves the
    gradients, the backward scales them by the incoming scalar)."""

    @staticmethod
    def forward(ctx, pts, coords, la, cen, sig, mode, eps, weight, backend):
        needs = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[2],
                 ctx.needs_input_grad[3], ctx.needs_input_grad[4])
        out = torch.empty(pts.shape[0], dtype=torch.float32, device=pts.device)
        bufs = _grads(needs, pts, coords, la, cen) if any(needs) else (None,) * 5
        lightsb_pass(pts, coords, la, cen, sig, out, None, *bufs, mode, eps, weight, backend)
        ctx.save_for_backward(*[b if b is not None else torch.empty(0) for b in bufs])
        ctx.present = tuple(b is not None for b in bufs)
        return out.sum() * weight

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        g = [s * grad_out if p else None for s, p in zip(saved, ctx.present)]
        return g[0], g[1], g[2], g[3], g[4], None, None, None, None


class _FusedRows(torch.autograd.Function):
    """The per-row values ``out`` (n,) of one side; the backward runs the pass again with the incoming
    gradient as row weights (the forward stores nothing but its inputs)."""

    @staticmethod
    def forward(ctx, pts, coords, la, cen, sig, mode, eps, backend):
        out = torch.empty(pts.shape[0], dtype=torch.float32, device=pts.device)
        lightsb_pass(pts, coords, la, cen, sig, out, None, None, None, None, None, None, mode, eps, 1.0, backend)
        ctx.save_for_backward(pts, coords if coords is not None else torch.empty(0), la, cen, sig)
        ctx.has_coords = coords is not None
        ctx.mode, ctx.eps, ctx.backend = mode, eps, backend
        return out

    @staticmethod
    def backward(ctx, grad_out):
        pts, coords, la, cen, sig = ctx.saved_tensors
        coords = coords if ctx.has_coords else None
        needs = tuple(ctx.needs_input_grad[:5])
        bufs = _grads(needs, pts, coords, la, cen)
        out = torch.empty(pts.shape[0], dtype=torch.float32, device=pts.device)
        lightsb_pass(pts, coords, la, cen, sig, out, grad_out.float().contiguous(), *bufs, ctx.mode, ctx.eps, 1.0,
                     ctx.backend)
        return bufs[0], bufs[1], bufs[2], bufs[3], bufs[4], None, None, None


def _int(value, name, low):
    return _checks.integer(value, name, _FN, low=low)


class LightSB(nn.Module):
    """Light Schrödinger Bridge (Korotin, Gushchin, Burnaev, ICLR 2024) with fused kernels: the official class
    (github.com/ngushchin/LightSB, ``src/light_sb.py``) with the same constructor, parameters and methods.

    The Schrödinger potential is the unnormalized Gaussian mixture ``v(y) = sum_k alpha_k N(y | r_k, eps S_k)``
    and the bridge's conditional law is ``pi(y | x) = (1 / c(x)) exp(x^T y / eps) v(y)``: the mixture with
    weights ``softmax_k((x^T S_k x + 2 r_k^T x) / (2 eps) + log alpha_k)``, means ``r_k + S_k x`` and
    covariances ``eps S_k``.  Parameters (the official names):

    - ``log_alpha_raw`` (K,): ``log alpha = log_alpha_raw / epsilon`` (:meth:`get_log_alpha`), initialized to
      ``epsilon * log(1 / K)``;
    - ``r`` (K, dim): the means, standard normal at init (:meth:`init_r_by_samples` sets them to samples);
    - ``S_log_diagonal_matrix`` (K, dim): ``log`` of S's eigenvalues, ``log(S_diagonal_init)`` at init;
    - ``S_rotation_matrix`` (K, dim, dim): S's eigenvectors, kept orthogonal by
      ``torch.nn.utils.parametrizations.orthogonal`` (the official code uses ``geotorch.orthogonal``: the same
      constraint, another parametrization, so the trainable tensor is
      ``parametrizations.S_rotation_matrix.original``).  ``S_k = R_k diag(exp(s_k)) R_k^T``, or
      ``diag(exp(s_k))`` when ``is_diagonal`` (then R is unused, as in the official code).
    - ``epsilon``: a buffer (a 0-d fp32 tensor); change it with :meth:`set_epsilon`.

    Methods: :meth:`loss` ``(x, y) = mean log c(x) - mean log v(y)`` (the official notebooks' ``D_loss``, x a
    source batch, y a target batch; the batch sizes may differ); :meth:`get_log_C` and
    :meth:`get_log_potential` (per row); :meth:`forward` (one sample of y | x per row, no gradient, in
    sub-batches of ``sampling_batch_size`` rows); :meth:`get_S`, :meth:`get_r`, :meth:`get_log_alpha`,
    :meth:`init_r_by_samples`, :meth:`set_epsilon`, :meth:`sample_at_time_moment`.

    ``backend``: ``"auto"`` runs the fused C++ kernel on CPU tensors and the Triton kernel on CUDA tensors
    (fp32 parameters and inputs; anything else runs ``"torch"``), ``"cpu"`` / ``"triton"`` force one, and
    ``"torch"`` runs the official formulas (:mod:`fastopt.reference.lightsb`, autograd through torch ops).
    Fused, :meth:`loss` is one kernel pass per side that also writes the gradients (saved for the backward,
    which scales them); :meth:`get_log_C` / :meth:`get_log_potential` run the pass without gradients and
    again in the backward with the incoming gradient as row weights.  Full S (``is_diagonal=False``): torch
    forms the rotated coordinates ``R_k^T x`` (an (N, K, dim) tensor per side) and ``R_k^T r_k``; the kernel
    consumes them as diagonal quadratic forms (``x^T S_k x = sum_j exp(s_kj) (R_k^T x)_j^2``, and
    ``(y - r_k)^T S_k^{-1} (y - r_k)`` likewise), and autograd carries their gradients to R, x, y and r.
    The gradient with respect to ``S_rotation_matrix`` itself then differs from the official autograd's
    outside the tangent space of the orthogonal group (the two formulas agree only on orthogonal R);
    the gradient of the trainable ``...original`` tensor, which is what the optimizer sees, is the same.
    """

    def __init__(self, dim: int = 2, n_potentials: int = 5, epsilon: Union[float, Tensor] = 1,
                 is_diagonal: bool = True, sampling_batch_size: int = 1, S_diagonal_init: float = 0.1, *,
                 backend: str = "auto") -> None:
        super().__init__()
        self.dim = _int(dim, "dim", 1)
        self.n_potentials = _int(n_potentials, "n_potentials", 1)
        eps = _checks.real(epsilon, "epsilon", _FN, tensor=True)
        if not isinstance(is_diagonal, bool):
            raise _checks.ArgumentTypeError(f"{_FN}: is_diagonal must be a bool, got {is_diagonal!r}")
        self.is_diagonal = is_diagonal
        self.sampling_batch_size = _int(sampling_batch_size, "sampling_batch_size", 1)
        s0 = _checks.real(S_diagonal_init, "S_diagonal_init", _FN)
        _backend.check_backend_name(backend)
        self.backend = backend
        self.register_buffer("epsilon", torch.tensor(eps, dtype=torch.float32))
        self._eps = float(self.epsilon)
        K, d = self.n_potentials, self.dim
        self.log_alpha_raw = nn.Parameter(self.epsilon * torch.log(torch.ones(K) / K))
        self.r = nn.Parameter(torch.randn(K, d))
        self.S_log_diagonal_matrix = nn.Parameter(torch.log(s0 * torch.ones(K, d)))
        self.S_rotation_matrix = nn.Parameter(torch.randn(K, d, d))
        torch.nn.utils.parametrizations.orthogonal(self, "S_rotation_matrix")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, n_potentials={self.n_potentials}, epsilon={self._eps:g}, "
                f"is_diagonal={self.is_diagonal}, sampling_batch_size={self.sampling_batch_size}, "
                f"backend={self.backend!r}")

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._eps = float(self.epsilon)

    # -- the official accessors ----------------------------------------------------------------------
    def get_S(self) -> Tensor:
        """``exp(s)`` (K, dim) when diagonal, else ``R diag(exp(s)) R^T`` (K, dim, dim)."""
        return ref.get_S(self.S_log_diagonal_matrix, None if self.is_diagonal else self.S_rotation_matrix,
                         self.is_diagonal)

    def get_r(self) -> Tensor:
        return self.r

    def get_log_alpha(self) -> Tensor:
        """``log_alpha_raw / epsilon``."""
        return (1 / self.epsilon) * self.log_alpha_raw

    @torch.no_grad()
    def init_r_by_samples(self, samples: Tensor) -> None:
        """Set the means ``r`` to ``samples`` (n_potentials, dim), e.g. target samples."""
        if not isinstance(samples, Tensor) or tuple(samples.shape) != (self.n_potentials, self.dim):
            raise ValueError(f"{_FN}.init_r_by_samples: samples must be a tensor of shape "
                             f"({self.n_potentials}, {self.dim}), got {getattr(samples, 'shape', type(samples))}")
        self.r.data = torch.clone(samples.to(device=self.r.device, dtype=self.r.dtype))

    def set_epsilon(self, new_epsilon: Union[float, Tensor]) -> None:
        """Set ``epsilon`` (log_alpha_raw is kept: log alpha changes with it, as in the official code)."""
        eps = _checks.real(new_epsilon, "epsilon", f"{_FN}.set_epsilon", tensor=True)
        self.epsilon = torch.tensor(eps, dtype=torch.float32, device=self.epsilon.device)
        self._eps = eps

    # -- checks and backends ---------------------------------------------------------------------------
    def _params(self):
        R = None if self.is_diagonal else self.S_rotation_matrix
        return (self.log_alpha_raw, self.r, self.S_log_diagonal_matrix, R, self._eps, self.is_diagonal)

    def _check_points(self, t, name, fn):
        _checks.float_tensor(t, name, fn)
        if t.dim() != 2 or t.shape[1] != self.dim:
            raise ValueError(f"{fn}: {name} must have shape (N, {self.dim}), got {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"{fn}: {name} has no rows: shape {tuple(t.shape)}")
        if t.layout != torch.strided:
            raise ValueError(f"{fn}: {name} must be a dense (strided) tensor, got layout {t.layout}")
        _checks.same_device(t, name, self.r.device, "the module's parameters", fn)

    def _resolve(self, fn, *pts):
        dtypes = {t.dtype for t in pts} | {self.r.dtype, self.log_alpha_raw.dtype, self.S_log_diagonal_matrix.dtype}
        reason = None if dtypes == {torch.float32} else f"dtypes {sorted(map(str, dtypes))} (the kernels take fp32)"
        return _backend.resolve(self.backend, self.r.device, torch.float32, op="lightsb", reason=reason, name=fn)

    def _rotation(self):
        """R (K, dim, dim) for a full S (computed once per call: the parametrization is not free), else None."""
        return None if self.is_diagonal else self.S_rotation_matrix

    def _side(self, pts, mode, R):
        """The kernel inputs of one side: (pts, coords, la, cen, sig) with autograd to the parameters."""
        eps, d = self._eps, self.dim
        la = self.log_alpha_raw / eps
        s = self.S_log_diagonal_matrix
        if mode == 1:
            la = la - 0.5 * s.sum(-1) - 0.5 * d * math.log(2 * math.pi * eps)
        sig = torch.exp(s) if mode == 0 else torch.exp(-s)
        pts = pts.contiguous()
        if R is None:
            return pts, None, la.contiguous(), self.r.contiguous(), sig.contiguous()
        coords = torch.einsum("nj,kjl->nkl", pts, R).contiguous()
        cen = self.r if mode == 0 else torch.einsum("kj,kjl->kl", self.r, R)
        return pts, coords, la.contiguous(), cen.contiguous(), sig.contiguous()

    # -- the LightSB quantities ----------------------------------------------------------------------
    def loss(self, x: Tensor, y: Tensor) -> Tensor:
        """The training loss ``mean_i log c(x_i) - mean_j log v(y_j)`` (x (N, dim) source samples, y (M, dim)
        target samples): a 0-dim tensor, differentiable with respect to the parameters and x, y."""
        fn = f"{_FN}.loss"
        self._check_points(x, "x", fn)
        self._check_points(y, "y", fn)
        backend = self._resolve(fn, x, y)
        if backend == "torch":
            return ref.loss_reference(x, y, *self._params())
        R = self._rotation()
        a = _FusedMean.apply(*self._side(x, 0, R), 0, self._eps, 1.0 / x.shape[0], backend)
        b = _FusedMean.apply(*self._side(y, 1, R), 1, self._eps, -1.0 / y.shape[0], backend)
        return a + b

    def get_log_C(self, x: Tensor) -> Tensor:
        """``log c_theta(x) = LSE_k [(x^T S_k x + 2 r_k^T x) / (2 eps) + log alpha_k]`` per row of x (N, dim)."""
        fn = f"{_FN}.get_log_C"
        self._check_points(x, "x", fn)
        backend = self._resolve(fn, x)
        if backend == "torch":
            return ref.log_C_reference(x, *self._params())
        return _FusedRows.apply(*self._side(x, 0, self._rotation()), 0, self._eps, backend)

    def get_log_potential(self, y: Tensor) -> Tensor:
        """``log v_theta(y) = log sum_k alpha_k N(y | r_k, eps S_k)`` per row of y (N, dim)."""
        fn = f"{_FN}.get_log_potential"
        self._check_points(y, "y", fn)
        backend = self._resolve(fn, y)
        if backend == "torch":
            return ref.log_potential_reference(y, *self._params())
        return _FusedRows.apply(*self._side(y, 1, self._rotation()), 1, self._eps, backend)

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """One sample of ``y | x`` per row of x (N, dim): the mixture with weights
        ``softmax_k((x^T S_k x + 2 r_k^T x) / (2 eps) + log alpha_k)``, means ``r_k + S_k x`` and covariances
        ``eps S_k``, drawn in sub-batches of ``sampling_batch_size`` rows (torch's global generator)."""
        fn = f"{_FN}.forward"
        self._check_points(x, "x", fn)
        eps = self._eps
        log_alpha = self.log_alpha_raw / eps
        s = self.S_log_diagonal_matrix
        sig = torch.exp(s)
        r = self.r
        R = None if self.is_diagonal else self.S_rotation_matrix
        out = []
        for i in range(0, x.shape[0], self.sampling_batch_size):
            xb = x[i:i + self.sampling_batch_size].to(r.dtype)
            if R is None:
                q = xb[:, None, :].expand(-1, self.n_potentials, -1)       # (b, K, d)
            else:
                q = torch.einsum("nj,kjl->nkl", xb, R)                       # R_k^T x
            logits = log_alpha + ((q * q * sig).sum(-1) + 2 * xb @ r.T) / (2 * eps)
            k = torch.multinomial(torch.softmax(logits, dim=-1), 1)[:, 0]   # (b,)
            z = torch.randn_like(xb) * torch.sqrt(eps * sig[k])
            if R is None:
                y = r[k] + sig[k] * xb + z
            else:
                # r_k + R_k diag(sig_k) R_k^T x + R_k z
                qk = q[torch.arange(q.shape[0], device=q.device), k]
                y = r[k] + torch.einsum("njl,nl->nj", R[k], sig[k] * qk + z)
            out.append(y)
        return torch.cat(out, dim=0)

    @torch.no_grad()
    def sample_at_time_moment(self, x: Tensor, t: Union[float, Tensor]) -> Tensor:
        """The bridge at time t: ``t y + (1 - t) x + sqrt(t (1 - t) eps) z`` with ``y = self(x)`` (official)."""
        t = torch.as_tensor(t, device=x.device)
        y = self(x)
        return t * y + (1 - t) * x + torch.sqrt(t * (1 - t) * self.epsilon) * torch.randn_like(x)
