"""AdaHessian in Triton: the update functions of the elementwise ops ``adahessian`` / ``adahessian_plain``
(same equations as ``csrc/include/fastopt/functors/adahessian.h``), and the two probe kernels of the
Hutchinson estimate (same bits as ``csrc/cpu/probe.cpp`` and ``fastopt/reference/adahessian.py``):
``probe_fill`` writes the Rademacher probe z of each tensor (the grad_outputs of the double backward),
``probe_consume`` turns a Hessian-vector product Hz into the estimate, regenerating z instead of
reading it back: ``acc = [acc +] scale * (z Hz)`` or ``[acc +] scale * |Hz|``.
"""
import triton
import triton.language as tl

from .common import bias_correction, decay, log_pair
from .multi_tensor import fmix32


@triton.jit
def _adahessian_step(p, g, m, v, d, step, lr, omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, half, use_sqrt,
                     UPDATE: tl.constexpr, FLAGS: tl.constexpr):
    bc1 = bias_correction(step, l1_hi, l1_lo)
    bc2 = bias_correction(step, l2_hi, l2_lo).to(tl.float32)
    step_size = (tl.cast(lr, tl.float64) / bc1).to(tl.float32)
    p, g = decay(p, g, lr, wd, FLAGS)
    m = m + omb1 * (g - m)
    if UPDATE:
        v = b2 * v + omb2 * d * d
    x = v / bc2
    if use_sqrt != 0.0:
        root = tl.sqrt_rn(x)
    else:
        root = tl.exp2(half * tl.log2(x))
    p = p - step_size * (m / (root + eps))
    return p, m, v


@triton.jit
def adahessian_update(p, g, m, v, d, s3, step, lr, r0, r1, r2, r3,
                      omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, half, use_sqrt, H11, H12, H13, H14, H15,
                      FLAGS: tl.constexpr):
    p, m, v = _adahessian_step(p, g, m, v, d, step, lr, omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, half,
                               use_sqrt, True, FLAGS)
    return p, m, v, d, s3


@triton.jit
def adahessian_plain_update(p, g, m, v, s2, s3, step, lr, r0, r1, r2, r3,
                            omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, half, use_sqrt, H11, H12, H13, H14,
                            H15, FLAGS: tl.constexpr):
    p, m, v = _adahessian_step(p, g, m, v, v, step, lr, omb1, b2, omb2, wd, eps, l1_hi, l1_lo, l2_hi, l2_lo, half,
                               use_sqrt, False, FLAGS)
    return p, m, v, s2, s3


def adahessian_pack(hyper, flags):
    """Native (beta1, beta2, weight_decay, eps, hessian_power) -> the Triton slots."""
    b1, b2, wd, eps, power = hyper
    return (1.0 - b1, b2, 1.0 - b2, wd, eps, *log_pair(b1), *log_pair(b2), power / 2.0,
            1.0 if power == 1.0 else 0.0), flags


# -- the probes -----------------------------------------------------------------------------------

@triton.jit
def _probe_sign(offs, offset, key):
    """+1.0 / -1.0 for the elements ``offset + offs`` (low 32 bits) of stream ``key``."""
    j = (offs.to(tl.int64) + offset).to(tl.uint32)
    h = fmix32(j * 0x9E3779B1 ^ key.to(tl.uint32))
    return 1.0 - 2.0 * (h >> 31).to(tl.float32)


@triton.jit
def _probe_fill_kernel(out_ptr, numel, key, offset, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    z = _probe_sign(offs, offset, key)
    tl.store(out_ptr + offs, z.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _probe_consume_kernel(hz_ptr, acc_ptr, numel, key, offset, scale, USE_Z: tl.constexpr,
                          ACCUMULATE: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    h = tl.load(hz_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if USE_Z:
        term = (scale * h) * _probe_sign(offs, offset, key)
    else:
        term = scale * tl.abs(h)
    if ACCUMULATE:
        term = tl.load(acc_ptr + offs, mask=mask, other=0.0).to(tl.float32) + term
    tl.store(acc_ptr + offs, term.to(acc_ptr.dtype.element_ty), mask=mask)


PROBE_BLOCK = 1024


def probe_fill(out, key, offset):
    """Write the probe of stream ``key`` (element ``offset + i``) into the contiguous tensor ``out``."""
    n = out.numel()
    if n:
        _probe_fill_kernel[(triton.cdiv(n, PROBE_BLOCK),)](out, n, int(key), int(offset) & 0xFFFFFFFF,
                                                          BLOCK=PROBE_BLOCK, enable_fp_fusion=False)


def probe_consume(hz, acc, key, offset, scale, use_z, accumulate):
    """``acc = [acc +] scale * (use_z ? z Hz : |Hz|)`` (contiguous tensors of one shape; fp32 math)."""
    n = hz.numel()
    if n:
        _probe_consume_kernel[(triton.cdiv(n, PROBE_BLOCK),)](hz, acc, n, int(key), int(offset) & 0xFFFFFFFF,
                                                             float(scale), USE_Z=bool(use_z),
                                                             ACCUMULATE=bool(accumulate), BLOCK=PROBE_BLOCK,
                                                             enable_fp_fusion=False)


def audit_exercise():
    """Every variant fastopt.AdaHessian launches on the triton backend (for ``compile_audit``, on CPU
    tensors: nothing runs): the update ops ``adahessian`` / ``adahessian_plain`` and the probe kernels
    (fill; consume with and without z, first sample and accumulating) over fp32, bf16 and fp16 tensors,
    16-byte aligned and not (views one element into their storage)."""
    import torch

    from .ops import elementwise_step

    shapes = [(96, 1000), (64, 64), (33, 7)]
    hyper = (0.9, 0.999, 0.01, 1e-16, 1.0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for unaligned in (False, True):
            def make(s, dt=dtype):
                n = torch.Size(s).numel()
                return torch.randn(n + 1, dtype=dt)[1:].view(s) if unaligned else torch.randn(s, dtype=dt)
            ps, gs = [make(s) for s in shapes], [make(s) for s in shapes]
            ms, vs, ds = [make(s) for s in shapes], [make(s) for s in shapes], [make(s) for s in shapes]
            steps = [torch.zeros(()) for _ in shapes]
            for power in (1.0, 0.5):
                h = hyper[:4] + (power,)
                elementwise_step("adahessian", [ps, gs, ms, vs, ds], steps, hyper=h, flags=1, lr=1e-3)
                elementwise_step("adahessian_plain", [ps, gs, ms, vs], steps, hyper=h, flags=1, lr=1e-3)
            for p in ps:
                probe_fill(p, 12345, 7)
                acc = make(p.shape, torch.float32)
                for use_z in (True, False):
                    for accumulate in (False, True):
                        probe_consume(p, acc, 12345, 7, 0.5, use_z, accumulate)
