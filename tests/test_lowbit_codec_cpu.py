"""The CPU kernels' vector codecs (csrc/cpu/quant_cpu.h) give the codes and values of the spec.

On a CPU with AVX2 the cpu backend quantizes every block with quant_cpu.h -- 8-bit formats through
the encoder's own bucket table (FastBook: one gather per value, then an add and a shift), the sorted
4-bit maps by a binary search of the midpoints in registers (lin4u by arithmetic: rank =
clamp(ceil(16 xn - 1.5), 0, 15)) -- and dequantizes 4-bit codes from registers; on a CPU with AVX-512
the same operations run 16 lanes wide.  This file holds them, bit for bit, to the Python reference
(fastopt.lowbit.codebook.quantize_reference / dequantize_reference: torch.bucketize on the fp32
midpoints, ties to the lower value, the unsigned formats' floor rule, poisoned blocks).  The
normalized inputs are exact (each block holds a 1.0, so absmax is 1 and x / absmax = x): a strided
sweep of the fp32 patterns of [-1, 1], every midpoint and its neighbours, then random blocks with
ties, subnormals, zeros, NaN and infinities, a subnormal absmax, and every code.  On an AVX-512 CPU
the file runs a second time in a subprocess with FASTOPT_CPU_ISA=avx2, so both widths are checked.
(Outside CI, a C++ harness compared both widths' encoders with the scalar quantize_code on every fp32
pattern of [-1, 1] -- 2,130,706,434 values per format, both signs, all six formats -- with 0
mismatches.)
"""
import math
import os
import subprocess
import sys

import pytest
import torch

from fastopt import _backend, lowbit
from fastopt.lowbit.codebook import FORMATS, _sorted_finite, dequantize_reference, quantize_reference

pytestmark = pytest.mark.skipif(not _backend.has_cpu(), reason="the C++ extension is not built")

CODEC_FORMATS = ["dyn8s", "dyn8u", "fp8", "fp8u", "dyn4s", "lin4u"]


def _blocks_of(values, fmt):
    """Lay `values` (fp32, flat) into blocks whose first element is 1.0 (absmax 1, so every other
    value is its own normalized value); pads with 0."""
    fmt = FORMATS[fmt]
    per = fmt.block - 1
    n = -(-values.numel() // per)
    x = torch.zeros(n, fmt.block)
    x[:, 0] = 1.0
    flat = torch.zeros(n * per)
    flat[:values.numel()] = values
    x[:, 1:] = flat.view(n, per)
    return x.reshape(-1)


def _check(x, fmt):
    codes, absmax = lowbit.quantize_blockwise(x, fmt, backend="cpu")
    rc, ra = quantize_reference(x, fmt)
    bad = (codes != rc).nonzero().flatten()
    assert bad.numel() == 0, (f"{fmt}: {bad.numel()} codes differ, first at value "
                              f"{x.view(-1)[bad[0]].item() if FORMATS[fmt].bits == 8 else bad[0].item()!r}")
    assert torch.equal(absmax.view(torch.int32), ra.view(torch.int32))
    return codes, absmax


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_sweep_of_normalized_values(fmt):
    # Every 509th fp32 pattern of [0, 1], both signs (~4.2M values), plus the ends.
    pos = torch.arange(0, 0x3F800000 + 1, 509, dtype=torch.int64)
    pos = torch.cat([pos, torch.tensor([0x3F800000, 1, 0x00800000, 0x007FFFFF])]).to(torch.int32).view(torch.float32)
    _check(_blocks_of(torch.cat([pos, -pos]), fmt), fmt)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_midpoints_and_neighbours(fmt):
    svals, _ = _sorted_finite(FORMATS[fmt].values)
    mids = ((svals[:-1] + svals[1:]) / 2).float()
    bits = mids.view(torch.int32).to(torch.int64)
    near = torch.cat([bits + d for d in range(-6, 7)])
    near = near[(near >= 0) & (near < (1 << 32))]
    v = near.to(torch.int64)
    v = torch.where(v >= 1 << 31, v - (1 << 32), v).to(torch.int32).view(torch.float32)
    v = v[v.abs() <= 1]
    _check(_blocks_of(torch.cat([v, -v, svals.float(), -svals.float()]), fmt), fmt)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_random_blocks_with_special_values(fmt):
    g = torch.Generator().manual_seed(7)
    block = FORMATS[fmt].block
    nb = 64
    x = torch.randn(nb, block, generator=g) * torch.exp(torch.randn(nb, 1, generator=g) * 8)
    x[1] = 0.0                                                            # all-zero block
    x[2, ::3] = -0.0
    x[3] = torch.randint(-(1 << 23), 1 << 23, (block,), generator=g, dtype=torch.int32).view(torch.float32)  # subnormals
    x[4, 5] = math.nan                                                    # poisoned blocks
    x[5, 7] = math.inf
    x[6, 9] = -math.inf
    x[7] = torch.randint(-(1 << 31), (1 << 31) - 1, (block,), generator=g).to(torch.int32).view(torch.float32)
    x[8] = torch.randint(-(1 << 22), 1 << 22, (block,), generator=g, dtype=torch.int32).view(torch.float32)
    x[8, 0] = 2.0 ** -130                                                 # subnormal absmax: 1/absmax = inf
    x[8, 1] = 0.0
    svals, _ = _sorted_finite(FORMATS[fmt].values)
    mids = ((svals[:-1] + svals[1:]) / 2).float()
    idx = torch.randint(0, mids.numel(), (block,), generator=g)
    x[9] = mids[idx] * torch.where(torch.rand(block, generator=g) < 0.5, -1.0, 1.0)   # exact ties
    x[9, 0] = 1.0
    x[10] = x[9] * 3.5                                                    # ties scaled (absmax 3.5)
    _check(x.reshape(-1), fmt)


@pytest.mark.parametrize("fmt", CODEC_FORMATS)
def test_every_code_dequantizes_as_the_reference(fmt):
    f = FORMATS[fmt]
    per = f.block * f.bits // 8                     # code bytes per block: 256 (8-bit) or 64 (4-bit)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).repeat(5)  # every byte, 5 times
    nblocks = codes.numel() // per
    absmax = torch.tensor([1.0, 0.37, 0.0, 2.0 ** -130, 3.0e38, math.nan] * nblocks)[:nblocks]
    out = lowbit.dequantize_blockwise(codes, absmax, fmt, backend="cpu")
    ref = dequantize_reference(codes, absmax, fmt)
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    keep = ~torch.isnan(ref)
    assert torch.equal(out[keep].view(torch.int32), ref[keep].view(torch.int32))


@pytest.mark.parametrize("bits,fmts", [(8, ("dyn8s", "dyn8u")), (4, ("dyn4s", "lin4u")), ("fp8", ("fp8", "fp8u"))])
def test_fused_adamw_step_is_the_spec(bits, fmts):
    """One fused AdamW step of the cpu backend, bit for bit: states decoded by the reference, the
    AdamW update in separately rounded fp32 operations (the kernel's order, quant.h / adam.h), states
    encoded by the reference.  Gradients span nine decades, so the states cover the maps' range."""
    g = torch.Generator().manual_seed(3)
    p = torch.randn(8192, generator=g).requires_grad_(True)
    lr, wd, (b1, b2), eps = 1e-2, 1e-2, (0.9, 0.999), 1e-8
    opt = lowbit.ElementwiseAdamW([p], backend="cpu", state_bits=bits, lr=lr, weight_decay=wd)
    p.grad = torch.randn(8192, generator=g) * torch.exp(torch.randn(8192, generator=g) * 5)
    opt.step()
    st = opt.state[p]
    assert st["state_format"].endswith(",".join(FORMATS[f].storage for f in fmts))
    m = dequantize_reference(st["exp_avg"], st["exp_avg_absmax"], fmts[0])
    v = dequantize_reference(st["exp_avg_sq"], st["exp_avg_sq_absmax"], fmts[1])
    p0 = p.detach().clone()
    grad = torch.randn(8192, generator=g) * torch.exp(torch.randn(8192, generator=g) * 5)
    p.grad = grad.clone()
    opt.step()
    f32 = lambda x: torch.tensor(x, dtype=torch.float32)  # noqa: E731
    t = 2.0
    pe = p0 * f32(1.0 - lr * wd)
    m = m + f32(1.0 - b1) * (grad - m)
    v = f32(b2) * v + f32(1.0 - b2) * grad * grad
    denom = torch.sqrt(v) / f32(math.sqrt(1.0 - b2 ** t)) + f32(eps)
    pe = pe - f32(lr / (1.0 - b1 ** t)) * (m / denom)
    for key, x, fmt in (("exp_avg", m, fmts[0]), ("exp_avg_sq", v, fmts[1])):
        codes, absmax = quantize_reference(x, fmt)
        assert torch.equal(st[key], codes), key
        assert torch.equal(st[key + "_absmax"].view(torch.int32), absmax.view(torch.int32)), key
    # The parameter: torch's fp32 ops may differ from the kernel's in the last bit (the kernel divides
    # by the bias correction where torch may not round the same); the states above are exact.
    torch.testing.assert_close(p.detach(), pe, rtol=2e-6, atol=0)


def _cpu_isa():
    return _backend.build_info()["cpu_isa"]


def test_cpu_isa_follows_the_environment():
    # FASTOPT_CPU_ISA=avx2 turns the AVX-512 codecs off (how the test below reaches the 8-lane ones).
    if os.environ.get("FASTOPT_CPU_ISA") == "avx2":
        assert _cpu_isa() in ("avx2", "baseline")
    else:
        assert _cpu_isa() in ("avx2", "avx2+avx512-codecs", "baseline")


def test_8_lane_codecs_on_an_avx512_cpu():
    """Where the AVX-512 codecs run, this whole file again with them off (the AVX2 codecs)."""
    if os.environ.get("FASTOPT_CPU_ISA") == "avx2" or _cpu_isa() != "avx2+avx512-codecs":
        pytest.skip("the tests above already ran the 8-lane codecs (or this is the subprocess)")
    env = dict(os.environ, FASTOPT_CPU_ISA="avx2")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout, r.stdout[-2000:]
