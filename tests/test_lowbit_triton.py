"""Triton low-bit states (``fastopt.triton_kernels.lowbit``) and the Triton Adam/AdamW elementwise ops.

* ``quantize_blockwise`` vs the reference codec of ``fastopt.lowbit.codebook``: codes and absmax
  identical for every format (wide dynamic range, zero blocks, exact midpoints, +-1, map values),
  dequantization identical.
* ``lowbit_step`` vs an oracle built from the pieces it fuses: dequantize the states with
  ``dequantize_reference``, run the plain Triton ``elementwise_step`` of the same op on fp32 copies,
  requantize with ``quantize_reference``.  Params bit-identical (bf16: round to nearest even or
  stochastic rounding with ``fastopt.reference.rounding``); codes identical under the interpreter (on
  a GPU the two kernels may contract the update's fp32 math differently: >99.9% identical and every
  dequantized value within one code step); absmax to 1e-6.  Also found_inf, steps, lr tensors,
  grad_scale / maximize, plain states mixed with quantized ones, empty tensors.
* the ops "adamw", "adamw_ams", "adam", "adam_ams" of the Triton registry vs ``fastopt.reference.adam``.
"""
import os

import pytest
import torch

from conftest import NEEDS_TRITON, TRITON_DEVICE as DEVICE
from fastopt import _backend
from fastopt.lowbit.codebook import FORMATS, Format, codebook, dequantize_reference, get_format, quantize_reference
from fastopt.reference.adam import adam_reference
from fastopt.reference.rounding import bf16_stochastic

pytestmark = NEEDS_TRITON
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def tk():
    return _backend.triton_kernels()


# -- the codec -----------------------------------------------------------------------------------------

def _codec_input(fmt, nblocks=24, seed=0):
    """Blocks of random values over ~20 decades, an all-zero block, blocks of exact midpoints (absmax 1
    and a power of two), of map values, of +-1, tiny and -0.0 values."""
    gen = torch.Generator().manual_seed(seed)
    b = fmt.block
    x = torch.randn(nblocks, b, generator=gen) * torch.exp(torch.randn(nblocks, b, generator=gen) * 5)
    x[1] = 0.0
    vals = fmt.values[torch.isfinite(fmt.values)].double().unique()
    mids = ((vals[:-1] + vals[1:]) / 2).float()
    for row, scale in ((2, 1.0), (3, 2.0 ** -7), (4, 2.0 ** 9)):
        sel = mids[torch.randint(mids.numel(), (b,), generator=gen)]
        sel[0], sel[1] = 1.0, -1.0
        x[row] = sel * scale  # x / absmax is exactly the midpoint
    x[5] = fmt.values[torch.isfinite(fmt.values)][torch.randint(int(torch.isfinite(fmt.values).sum()), (b,),
                                                                 generator=gen)]
    x[5, 0] = 1.0
    x[6] = torch.where(torch.rand(b, generator=gen) < 0.5, -1.0, 1.0)
    x[7] = torch.randn(b, generator=gen) * 1e-30
    x[7, :8] = -0.0
    x[8, :] = 1e-3
    x[8, 0] = 3e4  # everything else normalizes to ~3e-8: the bottom row of the bucket table
    return x.reshape(-1).to(DEVICE)


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantize_matches_reference(name):
    fmt = get_format(name)
    x = _codec_input(fmt)
    codes = torch.full((fmt.codes_numel(x.numel()),), 0xAB, dtype=torch.uint8, device=DEVICE)
    absmax = torch.full((x.numel() // fmt.block,), -1.0, device=DEVICE)
    out = tk().quantize_blockwise(x, codes, absmax, codebook(name, DEVICE), fmt.block)
    assert out[0] is codes and out[1] is absmax
    ref_codes, ref_absmax = quantize_reference(x.cpu(), name)
    assert torch.equal(absmax.cpu(), ref_absmax)
    mismatch = (codes.cpu() != ref_codes).nonzero().flatten()
    assert mismatch.numel() == 0, f"{mismatch.numel()} codes differ, first at byte {mismatch[:8].tolist()}"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_dequantize_matches_reference(name):
    fmt = get_format(name)
    gen = torch.Generator().manual_seed(1)
    numel = 16 * fmt.block
    codes = torch.randint(0, 256, (fmt.codes_numel(numel),), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(numel // fmt.block, generator=gen) * 10.0 ** torch.randint(-8, 8, (numel // fmt.block,),
                                                                                 generator=gen)
    absmax[0] = 0.0
    x = torch.full((numel,), 7.0, device=DEVICE)
    out = tk().quantize_blockwise(x, codes.to(DEVICE), absmax.to(DEVICE), codebook(name, DEVICE), fmt.block,
                                  dequantize=True)
    assert out is x
    # bit-identical; fp8's NaN codes dequantize to NaN on both sides
    torch.testing.assert_close(x.cpu(), dequantize_reference(codes, absmax, name), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("name", ["dyn8s", "dyn4s", "fp8"])
@pytest.mark.parametrize("block", [96, 2])
def test_codec_any_even_block(name, block):
    """Blocks that are not a power of two (or tiny) quantize like the reference with that block."""
    base = get_format(name)
    fmt = Format(name, base.bits, block, base.values, base.signed)
    x = _codec_input(base, nblocks=12)
    x = x[: x.numel() // block * block].contiguous()
    codes = torch.empty(fmt.codes_numel(x.numel()), dtype=torch.uint8, device=DEVICE)
    absmax = torch.empty(x.numel() // block, device=DEVICE)
    tk().quantize_blockwise(x, codes, absmax, codebook(name, DEVICE), block)
    ref_codes, ref_absmax = quantize_reference(x.cpu(), fmt)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    y = torch.empty_like(x)
    tk().quantize_blockwise(y, codes, absmax, codebook(name, DEVICE), block, dequantize=True)
    assert torch.equal(y.cpu(), dequantize_reference(ref_codes, ref_absmax, fmt))


def test_quantize_roundtrip_and_errors():
    fmt = get_format("dyn4s")
    x = _codec_input(fmt, nblocks=10)
    codes = torch.empty(x.numel() // 2, dtype=torch.uint8, device=DEVICE)
    absmax = torch.empty(10, device=DEVICE)
    book = codebook("dyn4s", DEVICE)
    tk().quantize_blockwise(x, codes, absmax, book, 128)
    y = torch.empty_like(x)
    tk().quantize_blockwise(y, codes, absmax, book, 128, dequantize=True)
    assert torch.equal(y.cpu(), dequantize_reference(codes.cpu(), absmax.cpu(), "dyn4s"))
    # requantize the dequantized values (values on the map times a block scale)
    tk().quantize_blockwise(y, codes, absmax, book, 128)
    c2, a2 = quantize_reference(y.cpu(), "dyn4s")
    assert torch.equal(c2, codes.cpu()) and torch.equal(a2, absmax.cpu())
    with pytest.raises(ValueError, match="multiple of the block"):
        tk().quantize_blockwise(x[:100], codes, absmax, book, 128)
    with pytest.raises(ValueError, match="codes"):
        tk().quantize_blockwise(x, torch.empty(x.numel(), dtype=torch.uint8, device=DEVICE), absmax, book, 128)


# -- lowbit_step vs the oracle -------------------------------------------------------------------------

B1, B2 = 0.9, 0.999
# op -> (native hyper, native flags, per state: "s" signed / "u" non-negative / "p" plain)
OP_CASES = {
    "adamw": ((B1, B2, 1e-8, 0.01), 0, "su"),
    "lion": ((0.9, 0.99, 0.1), 1, "s"),  # weight_decouple
    "adan": ((0.98, 0.92, 0.99, 0.02, 1e-8), 0, "susp"),  # proximal decay; previous_grad kept plain
    "adabelief": ((B1, B2, 0.01, 1e-16, 5.0), 1, "su"),  # weight_decouple
}
# bits -> (signed format, non-negative format, block)
FORMAT_SETS = {"8bit": ("dyn8s", "dyn8u", 256), "4bit": ("dyn4s", "lin4u", 128), "fp8": ("fp8", "fp8", 256)}
SIZES = (4096, 0, 1280, 2048)  # 1280: 5 or 10 blocks, a partly filled program on a GPU; 0: empty


class LowbitCase:
    """Params, grads and states of one call, quantized states as (codes, absmax)."""

    def __init__(self, op, bits, dtype, seed=0, sizes=SIZES):
        self.hyper, self.flags, kinds = OP_CASES[op]
        sfmt, ufmt, self.block = FORMAT_SETS[bits]
        self.op, self.dtype = op, dtype
        self.fmts = [sfmt if k == "s" else ufmt if k == "u" else None for k in kinds]
        gen = torch.Generator().manual_seed(seed)
        self.params = [torch.randn(n, generator=gen).to(DEVICE, dtype) for n in sizes]
        self.steps = [torch.tensor(float(3 * t), device=DEVICE) for t in range(len(sizes))]
        self.states, self.absmax = [], []
        for k, fmt in zip(kinds, self.fmts):
            codes, amaxes = [], []
            for n in sizes:
                mag = torch.exp(torch.randn(n, generator=gen) * 2) * 1e-3
                v = torch.randn(n, generator=gen) * mag if k != "u" else mag * mag
                if fmt is None:
                    codes.append(v.to(DEVICE, dtype))
                else:
                    c, a = quantize_reference(v, fmt)
                    codes.append(c.to(DEVICE))
                    amaxes.append(a.to(DEVICE))
            self.states.append(codes)
            self.absmax.append(amaxes if fmt is not None else None)
        self.books = [codebook(f, DEVICE) if f is not None else None for f in self.fmts]

    def grads(self, seed):
        gen = torch.Generator().manual_seed(seed)
        return [(torch.randn(p.numel(), generator=gen) * 0.1).to(DEVICE, self.dtype) for p in self.params]

    def run(self, grads, **kw):
        tk().lowbit_step(self.op, [self.params, grads, *self.states], self.steps, books=self.books,
                         absmax=self.absmax, block=self.block, hyper=self.hyper, flags=self.flags, **kw)

    def oracle(self, grads, *, seed=0, stochastic=False, **kw):
        """(params, [per state: codes or plain values], [per state: absmax or None], steps) after one step
        computed as dequantize_reference -> elementwise_step (fp32) -> quantize_reference."""
        p32 = [p.float().clone() for p in self.params]
        g32 = [g.float() for g in grads]
        s32 = []
        for k, fmt in enumerate(self.fmts):
            if fmt is None:
                s32.append([s.float().clone() for s in self.states[k]])
            else:
                s32.append([dequantize_reference(c.cpu(), a.cpu(), fmt).to(DEVICE)
                            for c, a in zip(self.states[k], self.absmax[k])])
        steps = [s.clone() for s in self.steps]
        tk().elementwise_step(self.op, [p32, g32, *s32], steps, hyper=self.hyper, flags=self.flags,
                              seed=seed, stochastic=False, **kw)
        params = []
        for t, (p, new) in enumerate(zip(self.params, p32)):
            if self.dtype == torch.bfloat16 and stochastic:
                params.append(bf16_stochastic(new.cpu(), seed, t, float(steps[t])).to(DEVICE))
            else:
                params.append(new.to(self.dtype))
        states, absmax = [], []
        for k, fmt in enumerate(self.fmts):
            if fmt is None:
                states.append([s.to(self.dtype) for s in s32[k]])
                absmax.append(None)
            else:
                qa = [quantize_reference(s.cpu(), fmt) for s in s32[k]]
                states.append([c for c, _ in qa])
                absmax.append([a for _, a in qa])
        return params, states, absmax, steps

    def check(self, expected):
        params, states, absmax, steps = expected
        for t, (a, b) in enumerate(zip(self.params, params)):
            if self.dtype == torch.float32:
                torch.testing.assert_close(a, b, rtol=1e-6, atol=0, msg=lambda m: f"param {t}: {m}")
            else:
                assert torch.equal(a.view(torch.int16), b.view(torch.int16)), f"param {t} differs"
        for k, fmt in enumerate(self.fmts):
            for t in range(len(self.params)):
                if fmt is None:
                    torch.testing.assert_close(self.states[k][t], states[k][t], rtol=1e-6, atol=0)
                    continue
                torch.testing.assert_close(self.absmax[k][t].cpu(), absmax[k][t], rtol=1e-6, atol=0)
                assert_codes_close(self.states[k][t].cpu(), self.absmax[k][t].cpu(), states[k][t], absmax[k][t],
                                   fmt, what=f"state {k} ({fmt}), tensor {t}")
        for a, b in zip(self.steps, steps):
            assert float(a) == float(b)


def assert_codes_close(codes, absmax, ref_codes, ref_absmax, fmt, what):
    if INTERPRET:
        diff = (codes != ref_codes).nonzero().flatten()
        assert diff.numel() == 0, f"{what}: {diff.numel()} code bytes differ (first {diff[:8].tolist()})"
        return
    fmt = get_format(fmt)
    n = codes.numel() * (2 if fmt.bits == 4 else 1)
    if n == 0:
        return
    a = dequantize_reference(codes, absmax, fmt)
    b = dequantize_reference(ref_codes, ref_absmax, fmt)
    same = (a == b).float().mean().item()
    assert same >= 0.999, f"{what}: only {same:.5f} of the values are identical"
    # one code step: the largest gap between neighbouring map values, times the block's absmax
    vals = fmt.values[torch.isfinite(fmt.values)].double().unique()
    gap = float((vals[1:] - vals[:-1]).max())
    tol = (gap * torch.maximum(absmax, ref_absmax)).repeat_interleave(fmt.block) * 1.0001
    assert bool(((a - b).abs() <= tol).all()), f"{what}: a value differs by more than one code step"


DTYPE_CASES = {"fp32": (torch.float32, False), "bf16": (torch.bfloat16, False), "bf16_sr": (torch.bfloat16, True)}
# bf16 with round-to-nearest params only where a plain state is stored too (adan) and for adamw
ORACLE_CASES = [(op, bits, d) for op in sorted(OP_CASES) for bits in sorted(FORMAT_SETS) for d in sorted(DTYPE_CASES)
                if d != "bf16" or op in ("adamw", "adan")]


@pytest.mark.parametrize("op,bits,dtype_case", ORACLE_CASES)
def test_lowbit_step_matches_oracle(op, bits, dtype_case):
    dtype, stochastic = DTYPE_CASES[dtype_case]
    case = LowbitCase(op, bits, dtype)
    for i in range(2):
        grads = case.grads(100 + i)
        kw = dict(lr=1e-2 if i == 0 else torch.tensor([3e-3], device=DEVICE))
        expected = case.oracle(grads, seed=7, stochastic=stochastic, **kw)
        case.run(grads, seed=7, stochastic=stochastic, **kw)
        case.check(expected)


@pytest.mark.parametrize("tile", [256, 1024])
@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_lowbit_step_small_tiles(monkeypatch, tile, bits):
    """Several programs per tensor (the interpreter runs one big tile per tensor by default)."""
    from fastopt.triton_kernels import lowbit

    monkeypatch.setattr(lowbit, "TILE", tile)
    case = LowbitCase("adan", bits, torch.bfloat16, sizes=(3072, 1280))
    grads = case.grads(3)
    expected = case.oracle(grads, lr=1e-2, seed=5, stochastic=True)
    case.run(grads, lr=1e-2, seed=5, stochastic=True)
    case.check(expected)
    fmt = FORMATS[FORMAT_SETS[bits][0]]
    x = _codec_input(fmt, nblocks=13)
    codes = torch.empty(fmt.codes_numel(x.numel()), dtype=torch.uint8, device=DEVICE)
    absmax = torch.empty(13, device=DEVICE)
    tk().quantize_blockwise(x, codes, absmax, codebook(fmt.name, DEVICE), fmt.block)
    ref_codes, ref_absmax = quantize_reference(x.cpu(), fmt)
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)


def test_lowbit_step_grad_scale_maximize_amsgrad():
    """adam_ams (three quantized states), maximize, grad_scale, an lr tensor."""
    case = LowbitCase("adamw", "8bit", torch.float32, seed=3, sizes=(2048, 1280))
    case.op, case.hyper, case.flags = "adam_ams", (B1, B2, 1e-8, 0.05), 0
    v = torch.rand(2048) * 1e-4
    c, a = quantize_reference(v, "dyn8u")
    extra_codes = [c.to(DEVICE)] + [quantize_reference(torch.zeros(1280), "dyn8u")[0].to(DEVICE)]
    extra_absmax = [a.to(DEVICE), torch.zeros(5, device=DEVICE)]
    case.fmts.append("dyn8u")
    case.states.append(extra_codes)
    case.absmax.append(extra_absmax)
    case.books.append(codebook("dyn8u", DEVICE))
    gs = torch.tensor(8.0, device=DEVICE)
    kw = dict(lr=torch.tensor(1e-3, device=DEVICE), grad_scale=gs, sign=-1.0,
              found_inf=torch.zeros((), device=DEVICE))
    for i in range(2):
        grads = case.grads(7 + i)
        expected = case.oracle(grads, **kw)
        case.run(grads, **kw)
        case.check(expected)


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_lowbit_step_found_inf_skips(bits):
    case = LowbitCase("adamw", bits, torch.bfloat16, sizes=(1024, 2048))
    before = ([p.clone() for p in case.params], [[s.clone() for s in st] for st in case.states],
              [[a.clone() for a in am] for am in case.absmax], [s.clone() for s in case.steps])
    grads = case.grads(1)
    case.run(grads, lr=1e-2, found_inf=torch.ones((), device=DEVICE), stochastic=True)
    assert all(torch.equal(a, b) for a, b in zip(case.params, before[0]))
    assert all(torch.equal(a, b) for st, st0 in zip(case.states, before[1]) for a, b in zip(st, st0))
    assert all(torch.equal(a, b) for am, am0 in zip(case.absmax, before[2]) for a, b in zip(am, am0))
    assert [float(s) for s in case.steps] == [float(s) for s in before[3]]
    # found_inf == 0: a normal step, and the steps move on
    expected = case.oracle(grads, lr=1e-2, found_inf=torch.zeros((), device=DEVICE))
    case.run(grads, lr=1e-2, found_inf=torch.zeros((), device=DEVICE))
    case.check(expected)
    assert [float(s) for s in case.steps] == [float(s) + 1.0 for s in before[3]]


def test_lowbit_step_without_steps_reads_step_one():
    """Empty ``steps``: the op sees step 1 (Adam's bias corrections divide by 1 - beta)."""
    case = LowbitCase("adamw", "4bit", torch.float32, sizes=(1024,))
    case.steps = []
    grads = case.grads(5)
    expected = case.oracle(grads, lr=1e-2)
    case.run(grads, lr=1e-2)
    case.check(expected)
    fresh = LowbitCase("adamw", "4bit", torch.float32, sizes=(1024,))
    fresh.steps = [torch.zeros((), device=DEVICE)]  # step 0 + 1 == the implicit step 1
    fresh.run(grads, lr=1e-2)
    assert torch.equal(fresh.params[0], case.params[0])
    assert float(fresh.steps[0]) == 1.0


def test_lowbit_step_stochastic_rounding_is_unbiased_and_seeded():
    """bf16 stochastic rounding: deterministic per seed, different across seeds."""
    runs = {}
    for seed in (1, 1, 2):
        case = LowbitCase("lion", "8bit", torch.bfloat16, sizes=(4096,))
        case.run(case.grads(0), lr=1e-3, seed=seed, stochastic=True)
        runs.setdefault(seed, []).append(case.params[0].view(torch.int16).clone())
    assert torch.equal(runs[1][0], runs[1][1])
    assert not torch.equal(runs[1][0], runs[2][0])


def test_lowbit_step_rejects_bad_inputs():
    case = LowbitCase("adamw", "8bit", torch.float32, sizes=(512,))
    grads = case.grads(0)
    odd = [torch.zeros(300, device=DEVICE)]
    with pytest.raises(ValueError, match="multiple of the block"):
        tk().lowbit_step("adamw", [odd, odd, odd, odd], case.steps, books=[None, None], absmax=[None, None],
                         block=256, hyper=case.hyper, flags=0, lr=1e-3)
    with pytest.raises(ValueError, match="block must be even"):
        tk().lowbit_step("adamw", [case.params, grads, *case.states], case.steps, books=case.books,
                         absmax=case.absmax, block=384, hyper=case.hyper, flags=0, lr=1e-3)
    with pytest.raises(ValueError, match="absmax"):
        tk().lowbit_step("adamw", [case.params, grads, *case.states], case.steps, books=case.books,
                         absmax=[case.absmax[0], None], block=256, hyper=case.hyper, flags=0, lr=1e-3)
    with pytest.raises(ValueError, match="codes"):
        tk().lowbit_step("adamw", [case.params, grads, case.states[0], case.states[1]], case.steps,
                         books=[codebook("dyn4s", DEVICE), case.books[1]], absmax=case.absmax, block=256,
                         hyper=case.hyper, flags=0, lr=1e-3)


# -- the Adam/AdamW ops of the Triton registry ----------------------------------------------------------

@pytest.mark.parametrize("op", ["adamw", "adamw_ams", "adam", "adam_ams"])
@pytest.mark.parametrize("extra", [{}, {"maximize": True, "grad_scale": 4.0, "lr_tensor": True}])
def test_adam_ops_match_reference(op, extra):
    decoupled, amsgrad = op.startswith("adamw"), op.endswith("_ams")
    gen = torch.Generator().manual_seed(11)
    sizes = (4096, 1000, 7)
    hyper = dict(lr=3e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.05)
    params = [torch.randn(n, generator=gen) for n in sizes]
    ref_p = [p.clone() for p in params]
    tri_p = [p.clone().to(DEVICE) for p in params]
    nstate = 3 if amsgrad else 2
    ref_s = [[torch.zeros(n) for n in sizes] for _ in range(nstate)]
    tri_s = [[torch.zeros(n, device=DEVICE) for n in sizes] for _ in range(nstate)]
    ref_steps = [torch.tensor(0.0) for _ in sizes]
    tri_steps = [torch.tensor(0.0, device=DEVICE) for _ in sizes]
    gs = extra.get("grad_scale")
    lr = torch.tensor(hyper["lr"], device=DEVICE) if extra.get("lr_tensor") else hyper["lr"]
    for _ in range(3):
        grads = [torch.randn(n, generator=gen) for n in sizes]
        adam_reference(ref_p, grads, ref_s[0], ref_s[1], ref_s[2] if amsgrad else [], ref_steps,
                       decoupled=decoupled, amsgrad=amsgrad, maximize=extra.get("maximize", False),
                       grad_scale=torch.tensor(gs) if gs else None, **hyper)
        tk().elementwise_step(op, [tri_p, [g.to(DEVICE) for g in grads], *tri_s], tri_steps,
                              hyper=(hyper["beta1"], hyper["beta2"], hyper["eps"], hyper["weight_decay"]), flags=0,
                              lr=lr, grad_scale=torch.tensor(gs, device=DEVICE) if gs else None,
                              sign=-1.0 if extra.get("maximize") else 1.0)
    for a, b in zip(tri_p, ref_p):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
    for st_t, st_r in zip(tri_s, ref_s):
        for a, b in zip(st_t, st_r):
            torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=0)
    assert [float(s) for s in tri_steps] == [3.0] * len(sizes)


def test_adam_op_matches_torch_adamw():
    gen = torch.Generator().manual_seed(5)
    params = [torch.randn(n, generator=gen) for n in (3000, 17)]
    ref = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.AdamW(ref, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, foreach=False)
    tri_p = [p.clone().to(DEVICE) for p in params]
    tri_s = [[torch.zeros_like(p) for p in tri_p] for _ in range(2)]
    steps = [torch.tensor(0.0, device=DEVICE) for _ in params]
    for _ in range(4):
        grads = [torch.randn(p.numel(), generator=gen) for p in params]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        opt.step()
        tk().elementwise_step("adamw", [tri_p, [g.to(DEVICE) for g in grads], *tri_s], steps,
                              hyper=(0.9, 0.999, 1e-8, 0.1), flags=0, lr=1e-2)
    for a, b in zip(tri_p, ref):
        torch.testing.assert_close(a.cpu(), b.detach(), rtol=1e-5, atol=1e-6)


# -- non-finite values: a NaN or an infinity poisons its block (quant.h, every backend) -----------------

@pytest.mark.parametrize("name", sorted(FORMATS))
def test_quantize_nonfinite_poisons_the_block(name):
    fmt = get_format(name)
    x = _codec_input(fmt, nblocks=9).cpu().reshape(9, -1)
    x[0, 5] = float("nan")
    x[2, -1] = float("inf")
    x[3, 0], x[3, 1] = -float("inf"), float("nan")
    bad = [True, False, True, True] + [False] * 5
    x = x.reshape(-1).to(DEVICE)
    codes = torch.full((fmt.codes_numel(x.numel()),), 0xAB, dtype=torch.uint8, device=DEVICE)
    absmax = torch.full((9,), -1.0, device=DEVICE)
    tk().quantize_blockwise(x, codes, absmax, codebook(name, DEVICE), fmt.block)
    ref_codes, ref_absmax = quantize_reference(x.cpu(), name)
    assert torch.isnan(absmax.cpu()).tolist() == bad
    torch.testing.assert_close(absmax.cpu(), ref_absmax, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(codes.cpu(), ref_codes)
    y = torch.empty_like(x)
    tk().quantize_blockwise(y, codes, absmax, codebook(name, DEVICE), fmt.block, dequantize=True)
    y = y.cpu().reshape(9, -1)
    assert y.isnan().all(1).tolist() == bad
    assert not bool(y[~torch.tensor(bad)].isnan().any())


@pytest.mark.parametrize("bits", sorted(FORMAT_SETS))
def test_lowbit_step_nonfinite_grad_matches_oracle(bits):
    """A NaN and an inf gradient element: the same poisoned blocks (absmax NaN, codes of 0) and the same
    NaN params as the oracle (dequantize_reference -> elementwise_step -> quantize_reference)."""
    case = LowbitCase("adamw", bits, torch.float32, sizes=(2048, 1280))
    for i in range(2):
        grads = case.grads(40 + i)
        if i == 0:
            grads[0][700] = float("nan")
            grads[1][5] = float("inf")
        expected = case.oracle(grads, lr=1e-2)
        case.run(grads, lr=1e-2)
        params, states, absmax, _ = expected
        for a, b in zip(case.params, params):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0, equal_nan=True)
        for k, fmt in enumerate(case.fmts):
            for t in range(2):
                torch.testing.assert_close(case.absmax[k][t].cpu(), absmax[k][t], rtol=1e-6, atol=0, equal_nan=True)
                bad = torch.isnan(absmax[k][t])
                assert bad.nonzero().flatten().tolist() == [(700 if t == 0 else 5) // case.block]
                if INTERPRET:
                    assert torch.equal(case.states[k][t].cpu(), states[k][t])
