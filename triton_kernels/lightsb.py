"""Triton kernel of the fused LightSB pass (the GPU side of ``csrc/cpu/lightsb_kernels.cpp``; spec:
``fastopt.reference.lightsb``; used by ``fastopt.ot.LightSB``).

Per row i, ``out_i = LSE_k a_ik`` with ``a_ik = la_k + (sum_j sig_kj q_ikj^2 + 2 cen_k . x_i) / (2 eps)``
(MODE 0, log c) or ``a_ik = la_k - sum_j sig_kj (q_ikj - cen_kj)^2 / (2 eps)`` (MODE 1, log v), where
``q_ik = x_i`` (diagonal S) or ``coords[i, k]`` (FULL), and optionally the gradient of ``sum_i g_i out_i``.

A program owns the row tiles ``pid, pid + nprog, ...`` (BLOCK_N rows each).  Pass 1 walks the components
in tiles of BLOCK_K with the online log-sum-exp (running max m, running sum l rescaled by exp(m_old -
m_new)); pass 2 (with a gradient) recomputes each tile's logits, the weights ``g_i exp(a - lse_i)``, writes
the rows' gradients and adds the tile's parameter-gradient sums into the program's own slice of the
partial buffers (pla (nprog, K), pcen / psig (nprog, K, d); no atomics: deterministic), which the caller
sums over programs and scales (cen by 1 / eps, sig by +-1 / (2 eps)).
"""
import torch
import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def _logits(x, q_ptr, rows, ks, offs_d, rmask, kmask, dmask, la_ptr, cen_ptr, sig_ptr, K, d, inv2e,
            MODE: tl.constexpr, FULL: tl.constexpr):
    """Logits (BLOCK_N, BLOCK_K) of the tile, with the (BLOCK_N, BLOCK_K, BLOCK_D) coordinates q and the
    (1, BLOCK_K, BLOCK_D) parameter tiles it used."""
    kd = ks[:, None] * d + offs_d[None, :]
    pm = kmask[:, None] & dmask[None, :]
    cen = tl.load(cen_ptr + kd, mask=pm, other=0.0)[None, :, :]
    sig = tl.load(sig_ptr + kd, mask=pm, other=0.0)[None, :, :]
    la = tl.load(la_ptr + ks, mask=kmask, other=0.0)
    if FULL:
        qoff = rows[:, None, None] * (K * d) + kd[None, :, :]
        q = tl.load(q_ptr + qoff, mask=rmask[:, None, None] & pm[None, :, :], other=0.0)
    else:
        q = x[:, None, :] + tl.zeros_like(cen)
    if MODE == 0:
        quad = tl.sum(sig * q * q, axis=2)
        lin = tl.sum(cen * x[:, None, :], axis=2)
        a = la[None, :] + (quad + 2.0 * lin) * inv2e
    else:
        t = q - cen
        a = la[None, :] - tl.sum(sig * t * t, axis=2) * inv2e
    a = tl.where(kmask[None, :], a, NEG_INF)
    return a, q, cen, sig


@triton.jit
def _lightsb_kernel(x_ptr, q_ptr, la_ptr, cen_ptr, sig_ptr, out_ptr, roww_ptr, dx_ptr, dq_ptr, pla_ptr, pcen_ptr,
                    psig_ptr, N, K, d, nprog, inv2e, inv_e, w_scale,
                    MODE: tl.constexpr, FULL: tl.constexpr, GRAD: tl.constexpr, ROW_W: tl.constexpr,
                    DX: tl.constexpr, DQ: tl.constexpr, PARAMS: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < d
    n_tiles = tl.cdiv(N, BLOCK_N)
    for tile in range(pid, n_tiles, nprog):
        rows = tile * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < N
        x = tl.load(x_ptr + rows[:, None] * d + offs_d[None, :], mask=rmask[:, None] & dmask[None, :], other=0.0)
        m = tl.full((BLOCK_N,), NEG_INF, tl.float32)
        l = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < K
            a, q, cen, sig = _logits(x, q_ptr, rows, ks, offs_d, rmask, kmask, dmask, la_ptr, cen_ptr, sig_ptr, K,
                                     d, inv2e, MODE, FULL)
            m_new = tl.maximum(m, tl.max(a, axis=1))
            scale = tl.where(m == NEG_INF, 0.0, tl.exp(m - m_new))
            e = tl.where(m_new[:, None] == NEG_INF, 0.0, tl.exp(a - m_new[:, None]))
            l = l * scale + tl.sum(e, axis=1)
            m = m_new
        lse = tl.where(m == NEG_INF, NEG_INF, m + tl.log(l))
        tl.store(out_ptr + rows, lse, mask=rmask)
        if GRAD:
            if ROW_W:
                g = tl.load(roww_ptr + rows, mask=rmask, other=0.0)
            else:
                g = tl.zeros((BLOCK_N,), tl.float32) + w_scale
            g = tl.where(rmask & (lse != NEG_INF), g, 0.0)
            dx = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                ks = k0 + tl.arange(0, BLOCK_K)
                kmask = ks < K
                a, q, cen, sig = _logits(x, q_ptr, rows, ks, offs_d, rmask, kmask, dmask, la_ptr, cen_ptr, sig_ptr,
                                         K, d, inv2e, MODE, FULL)
                w = tl.where(kmask[None, :], tl.exp(a - lse[:, None]), 0.0) * g[:, None]
                w3 = w[:, :, None]
                kd = ks[:, None] * d + offs_d[None, :]
                pm = kmask[:, None] & dmask[None, :]
                if MODE == 0:
                    if DX:
                        if FULL:
                            dx += tl.sum(w3 * cen, axis=1) * inv_e
                        else:
                            dx += tl.sum(w3 * (sig * q + cen), axis=1) * inv_e
                    if DQ:
                        qoff = rows[:, None, None] * (K * d) + kd[None, :, :]
                        tl.store(dq_ptr + qoff, w3 * sig * q * inv_e, mask=rmask[:, None, None] & pm[None, :, :])
                    if PARAMS:
                        c_part = tl.sum(w3 * x[:, None, :], axis=0)
                        s_part = tl.sum(w3 * q * q, axis=0)
                else:
                    df = q - cen
                    t = w3 * sig * df
                    if DX:
                        if not FULL:
                            dx -= tl.sum(t, axis=1) * inv_e
                    if DQ:
                        qoff = rows[:, None, None] * (K * d) + kd[None, :, :]
                        tl.store(dq_ptr + qoff, -t * inv_e, mask=rmask[:, None, None] & pm[None, :, :])
                    if PARAMS:
                        c_part = tl.sum(t, axis=0)
                        s_part = tl.sum(w3 * df * df, axis=0)
                if PARAMS:
                    poff = pid * (K * d) + kd
                    tl.store(pcen_ptr + poff, tl.load(pcen_ptr + poff, mask=pm, other=0.0) + c_part, mask=pm)
                    tl.store(psig_ptr + poff, tl.load(psig_ptr + poff, mask=pm, other=0.0) + s_part, mask=pm)
                    loff = pid * K + ks
                    tl.store(pla_ptr + loff, tl.load(pla_ptr + loff, mask=kmask, other=0.0) + tl.sum(w, axis=0),
                             mask=kmask)
            if DX:
                tl.store(dx_ptr + rows[:, None] * d + offs_d[None, :], dx, mask=rmask[:, None] & dmask[None, :])


MAX_D = 1024


def _config(n, k, d, grad=False):
    block_d = triton.next_power_of_2(max(d, 1))
    block_n = 16 if block_d <= 64 else 8 if grad else 4
    # (BLOCK_N, BLOCK_K, BLOCK_D) tiles of at most 2048 elements (16 fp32 per thread and temporary at 4 warps)
    # for the value; the gradient variants keep several tiles alive, so theirs hold 1024 (with 2048 the
    # compile audit found 8-16 B of stack per thread on sm_90), and at BLOCK_D 128 as 8 rows x 1 component
    # (4 x 2 kept an 8-byte stack frame in the row-weighted log v gradient; 8 x 1, 4 x 1, 2 x 4 none)
    budget = 1024 if grad else 2048
    block_k = max(1, min(triton.next_power_of_2(k), budget // (block_n * block_d)))
    return block_n, block_k, block_d


def lightsb_pass(pts, coords, la, cen, sig, out, row_w, dpts, dcoords, dla, dcen, dsig, mode, eps, w_scale):
    """The fused pass (module doc) on checked fp32 contiguous tensors (``fastopt.ot.lightsb`` checks them):
    writes ``out`` and whichever of ``dpts``, ``dcoords`` and (``dla``, ``dcen``, ``dsig``) are given."""
    n, d = pts.shape
    k = cen.shape[0]
    if d > MAX_D:
        raise ValueError(f"fastopt::lightsb_pass_: the triton kernel takes d <= {MAX_D}, got {d}")
    params = dla is not None
    grad = params or dpts is not None or dcoords is not None
    block_n, block_k, block_d = _config(n, k, d, grad)
    n_tiles = triton.cdiv(n, block_n) if n else 0
    nprog = max(1, min(n_tiles, 1024))
    dev = pts.device
    if params:
        pla = torch.zeros(nprog, k, dtype=torch.float32, device=dev)
        pcen = torch.zeros(nprog, k, d, dtype=torch.float32, device=dev)
        psig = torch.zeros(nprog, k, d, dtype=torch.float32, device=dev)
    else:
        pla = pcen = psig = out
    if n_tiles:
        _lightsb_kernel[(nprog,)](
            pts, coords if coords is not None else pts, la, cen, sig, out, row_w if row_w is not None else out,
            dpts if dpts is not None else out, dcoords if dcoords is not None else out, pla, pcen, psig,
            n, k, d, nprog, 0.5 / eps, 1.0 / eps, float(w_scale),
            MODE=int(mode), FULL=coords is not None, GRAD=grad, ROW_W=row_w is not None, DX=dpts is not None,
            DQ=dcoords is not None, PARAMS=params, BLOCK_N=block_n, BLOCK_K=block_k, BLOCK_D=block_d,
            num_warps=4, enable_fp_fusion=False,
        )
    if params:
        dla.copy_(pla.sum(0))
        dcen.copy_(pcen.sum(0) * (1.0 / eps))
        dsig.copy_(psig.sum(0) * ((0.5 if mode == 0 else -0.5) / eps))


def audit_exercise():
    """Every variant :func:`lightsb_pass` launches (for ``compile_audit``): both modes, diagonal and full S,
    value only, with row weights, with every gradient."""
    for n, k, d in ((37, 9, 5), (300, 64, 16), (9, 5, 100)):
        _audit_sizes(n, k, d)


def _audit_sizes(n, k, d):
    for mode in (0, 1):
        for full in (False, True):
            x = torch.randn(n, d)
            q = torch.randn(n, k, d) if full else None
            la, cen, sig = torch.randn(k), torch.randn(k, d), torch.rand(k, d) + 0.1
            out = torch.empty(n)
            lightsb_pass(x, q, la, cen, sig, out, None, None, None, None, None, None, mode, 0.5, 1.0)
            bufs = (torch.empty(n, d), torch.empty(n, k, d) if full else None, torch.empty(k), torch.empty(k, d),
                    torch.empty(k, d))
            lightsb_pass(x, q, la, cen, sig, out, None, *bufs, mode, 0.5, 0.1)
            lightsb_pass(x, q, la, cen, sig, out, torch.randn(n), *bufs, mode, 0.5, 1.0)
