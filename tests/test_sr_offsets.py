"""Stochastic rounding keyed on the element's index in the whole tensor (issue 17): a kernel call's
``sr_offsets`` give, per tensor, the index of its first element in the whole tensor, so element ``i``
of a piece (an FSDP2 shard) rounds with the bits of element ``offset + i``.

For every backend here (the torch reference, the cpu kernels, Triton under the interpreter; the cuda
backend where a GPU is present): stepping tensors whole equals stepping them as contiguous pieces --
each "rank" calling the kernel on its pieces with their start indices -- bit for bit, for an
elementwise op (bf16 params, stochastic rounding), for the low-bit path (8-bit states, bf16 params)
and for ``quantize_int8``'s stochastic mode; without the offsets the pieces differ.  The ABI refuses
a wrong-length or negative offsets list before anything is written.
"""
import pytest
import torch

import fastopt
from fastopt import _backend, _ops
from fastopt.lowbit import dequantize_int8, quantize_int8
from fastopt.lowbit.layouts import StochasticRounding
from fastopt.reference.rounding import bf16_stochastic, sr_bits

from conftest import KERNEL_DEVICE_BACKENDS

SEED = 1234567


# -- helpers ---------------------------------------------------------------------------------------------

def bits(t):
    """The raw bits of a tensor (bf16 as int16), so comparisons are bit for bit (NaN == NaN)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16) if t.dtype == torch.bfloat16 else t


def same_bits(a, b):
    return torch.equal(bits(a), bits(b))


def capture(monkeypatch, opt, runner):
    """The kernel-call records (``_ops.run_elementwise`` or ``_ops.run_lowbit``) one ``opt.step()`` would
    run, with every tensor they hold cloned; nothing is run."""
    calls = []

    def record(c):
        calls.append(c._replace(**{f: [t.clone() for t in getattr(c, f)] for f in TENSOR_LISTS[runner]
                                   if getattr(c, f)}))
    with monkeypatch.context() as m:
        m.setattr(_ops, runner, record)
        opt.step()
    assert calls, f"the step made no {runner} call"
    return calls


# The tensor lists of each record, and how a list's tensor j maps to its param and element scale:
# (field, elements of the tensor per param element, or None for per-block lists (absmax)).
TENSOR_LISTS = {
    "run_elementwise": ("params", "grads", "states", "state_steps"),
    "run_lowbit": ("params", "grads", "states", "absmax", "state_steps"),
}


def piece_call(call, bounds, ranks, rank, offsets, block=None):
    """The record of ``rank``'s call: every param's piece ``[bounds[t][rank], bounds[t][rank + 1])`` (a
    contiguous range of its flat elements), its states' pieces, a fresh copy of its step counter, and
    ``sr_offsets = offsets`` (the pieces' starts, or () to leave them out)."""
    n = len(call.params)

    def cut(t, j, per_block=False):
        lo, hi = bounds[j % n][rank], bounds[j % n][rank + 1]
        flat = t.reshape(-1)
        if per_block:  # absmax: one value per block
            return flat[lo // block:hi // block].clone()
        scale = flat.numel() / call.params[j % n].numel()  # 1, or 1/2 for packed 4-bit codes
        return flat[int(lo * scale):int(hi * scale)].clone()

    fields = dict(params=[cut(t, j) for j, t in enumerate(call.params)],
                  grads=[cut(t, j) for j, t in enumerate(call.grads)],
                  states=[cut(t, j) for j, t in enumerate(call.states)],
                  state_steps=[s.clone() for s in call.state_steps], sr_offsets=tuple(offsets))
    if hasattr(call, "absmax"):
        fields["absmax"] = [cut(t, j, per_block=True) for j, t in enumerate(call.absmax)]
    return call._replace(**fields)


def whole_call(call):
    return call._replace(**{f: [t.clone() for t in getattr(call, f)]
                            for f in ("params", "grads", "states", "state_steps") + (
                                ("absmax",) if hasattr(call, "absmax") else ())})


def run_pieces(runner, call, bounds, with_offsets, block=None):
    """Run ``call`` as len(bounds[0]) - 1 ranks, each on its pieces; returns the glued params, states
    (and absmax) in the whole call's order."""
    n = len(call.params)
    ranks = len(bounds[0]) - 1
    outs = []
    for r in range(ranks):
        offsets = [bounds[t][r] for t in range(n)] if with_offsets else ()
        c = piece_call(call, bounds, ranks, r, offsets, block)
        runner(c)
        outs.append(c)
    glue = lambda field: [torch.cat([o.__getattribute__(field)[j].reshape(-1) for o in outs])  # noqa: E731
                          for j in range(len(getattr(call, field)))]
    return {f: glue(f) for f in ("params", "states") + (("absmax",) if hasattr(call, "absmax") else ())}, outs


def check_whole_equals_pieces(runner, call, bounds, block=None):
    whole = whole_call(call)
    runner(whole)
    glued, outs = run_pieces(runner, call, bounds, with_offsets=True, block=block)
    for field, tensors in glued.items():
        for j, (a, b) in enumerate(zip(getattr(whole, field), tensors)):
            assert same_bits(a.reshape(-1), b), f"{field}[{j}]: pieces with sr_offsets differ from the whole"
    for o in outs:  # every rank stepped its own counters once, as the whole call did
        for s, w in zip(o.state_steps, whole.state_steps):
            assert float(s) == float(w)
    # The same pieces without their offsets round with other bits: the test above can fail.
    unkeyed, _ = run_pieces(runner, call, bounds, with_offsets=False, block=block)
    assert not all(same_bits(a.reshape(-1), b) for a, b in zip(whole.params, unkeyed["params"])), \
        "pieces without sr_offsets rounded like the whole tensor: the offsets are not exercised"
    # The whole call's params really were rounded stochastically (not to nearest).
    return whole


# -- the torch reference ------------------------------------------------------------------------------

def test_reference_bf16_stochastic_pieces_equal_whole():
    x = torch.randn(5000) * 3
    whole = bf16_stochastic(x, SEED, 3, 17)
    assert same_bits(whole, bf16_stochastic(x, SEED, 3, 17, offset=0))
    for cuts in ([0, 1234, 5000], [0, 1, 2500, 5000], [0, 4999, 5000]):
        keyed = torch.cat([bf16_stochastic(x[a:b], SEED, 3, 17, offset=a) for a, b in zip(cuts, cuts[1:])])
        assert same_bits(keyed, whole)
        unkeyed = torch.cat([bf16_stochastic(x[a:b], SEED, 3, 17) for a, b in zip(cuts, cuts[1:])])
        assert not same_bits(unkeyed, whole)
    # Offsets past 2**32 keep the low 32 bits, as the kernels' uint32 index arithmetic does.
    assert torch.equal(sr_bits(10, "cpu", SEED, 0, 1, offset=2**32 + 5), sr_bits(10, "cpu", SEED, 0, 1, offset=5))
    # The bits of element i are fmix32(i * 0x9E3779B1 ^ key), computed here in Python ints.
    from fastopt.reference.rounding import fmix32, sr_key
    key = sr_key(SEED, 3, 17)
    got = sr_bits(4, "cpu", SEED, 3, 17, offset=3_000_000_000)
    want = [fmix32(((3_000_000_000 + i) * 0x9E3779B1 & 0xFFFFFFFF) ^ key) for i in range(4)]
    assert got.tolist() == want


def test_reference_write_takes_offsets_and_checks_them():
    values = [torch.randn(300) * 5, torch.randn(64) * 5]
    whole = [torch.empty(300, dtype=torch.bfloat16), torch.empty(64, dtype=torch.bfloat16)]
    StochasticRounding.write(whole, values, SEED, [0, 1], [4, 4])
    pieces = [[torch.empty(b - a, dtype=torch.bfloat16) for a, b in ((0, 100), (0, 10))],
              [torch.empty(b - a, dtype=torch.bfloat16) for a, b in ((100, 300), (10, 64))]]
    StochasticRounding.write(pieces[0], [values[0][:100], values[1][:10]], SEED, [0, 1], [4, 4], offsets=[0, 0])
    StochasticRounding.write(pieces[1], [values[0][100:], values[1][10:]], SEED, [0, 1], [4, 4], offsets=[100, 10])
    for t in range(2):
        assert same_bits(torch.cat([pieces[0][t], pieces[1][t]]), whole[t])
    unkeyed = torch.empty(200, dtype=torch.bfloat16)
    StochasticRounding.write([unkeyed], [values[0][100:]], SEED, [0], [4])
    assert not same_bits(unkeyed, whole[0][100:])
    target = torch.zeros(10, dtype=torch.bfloat16)
    for bad in ([0, 0], [-1], [1.5], [True]):
        with pytest.raises(ValueError, match="offset"):
            StochasticRounding.write([target], [torch.ones(10)], SEED, [0], [1], offsets=bad)
    assert torch.equal(target, torch.zeros(10, dtype=torch.bfloat16))


def test_quantize_int8_stochastic_pieces_equal_whole():
    group = 64
    w = torch.randn(group * 21) * 0.1
    whole = quantize_int8(w, group, stochastic=True, seed=SEED, index=2, step=5)
    assert not torch.equal(whole[0], quantize_int8(w, group)[0])  # stochastic differs from nearest
    for cuts in ([0, group * 7, group * 21], [0, group, group * 12, group * 21]):
        parts = [quantize_int8(w[a:b], group, stochastic=True, seed=SEED, index=2, step=5, offset=a)
                 for a, b in zip(cuts, cuts[1:])]
        for k in range(3):
            assert torch.equal(torch.cat([p[k] for p in parts]), whole[k])
        unkeyed = torch.cat([quantize_int8(w[a:b], group, stochastic=True, seed=SEED, index=2, step=5)[0]
                             for a, b in zip(cuts, cuts[1:])])
        assert not torch.equal(unkeyed, whole[0])
    # offset 0 is the historical stream, and dequantizing still works on the glued codes
    assert torch.equal(quantize_int8(w, group, stochastic=True, seed=SEED, index=2, step=5, offset=0)[0], whole[0])
    assert dequantize_int8(*whole, group).shape == w.shape
    with pytest.raises(ValueError, match="offset"):
        quantize_int8(w, group, stochastic=True, offset=-group)


# -- the kernel backends --------------------------------------------------------------------------------

def _bf16_params(device, sizes):
    return [torch.nn.Parameter((torch.randn(n) * 0.5).to(device=device, dtype=torch.bfloat16)) for n in sizes]


def _set_grads(params):
    for p in params:
        p.grad = (torch.randn(p.shape) * 0.1).to(device=p.device, dtype=p.dtype)


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("cls", ["Lion", "Adan"])
def test_elementwise_pieces_equal_whole(monkeypatch, device, backend, cls):
    """Two params stepped in one call whole == the same call made by 3 "ranks" on uneven contiguous
    pieces of both with sr_offsets = the pieces' starts (tensor indices unchanged, as under FSDP2)."""
    sizes = (3001, 777)
    params = _bf16_params(device, sizes)
    opt = getattr(fastopt, cls)(params, lr=1e-2, weight_decay=0.1, stochastic_rounding=True, seed=SEED,
                                backend=backend)
    _set_grads(params)
    opt.step()  # states are no longer zero
    _set_grads(params)
    (call,) = capture(monkeypatch, opt, "run_elementwise")
    assert call.stochastic and call.backend == backend and len(call.params) == 2
    bounds = [[0, 1000, 1001, 3001], [0, 400, 700, 777]]  # uneven, one piece of a single element
    whole = check_whole_equals_pieces(_ops.run_elementwise, call, bounds)
    # rounding was stochastic: the stored params are not all the nearest rounding of one fp32 value
    assert not same_bits(whole.params[0], call.params[0])


@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
@pytest.mark.parametrize("make", [lambda ps, **kw: fastopt.lowbit.AdamW8bit(ps, **kw),
                                  lambda ps, **kw: fastopt.Lion(ps, state_bits=8, **kw)], ids=["AdamW8bit", "Lion8"])
def test_lowbit_pieces_equal_whole(monkeypatch, device, backend, make):
    """8-bit states on bf16 params (stochastic rounding): the fused low-bit call whole == 2 or 3 ranks
    on pieces that are whole blocks, with their sr_offsets."""
    block = 256
    sizes = (block * 20, block * 17)
    params = _bf16_params(device, sizes)
    opt = make(params, lr=1e-2, stochastic_rounding=True, seed=SEED, backend=backend)
    _set_grads(params)
    opt.step()
    _set_grads(params)
    (call,) = capture(monkeypatch, opt, "run_lowbit")
    assert call.stochastic and call.block == block and len(call.params) == 2
    for bounds in ([[0, block * 7, block * 20], [0, block * 16, block * 17]],
                   [[0, block, block * 11, block * 20], [0, block * 5, block * 9, block * 17]]):
        check_whole_equals_pieces(_ops.run_lowbit, call, bounds, block=block)


@pytest.mark.skipif(not (_backend.has_cpu() and _backend.has_triton() and _backend.triton_interpret()
                         or torch.cuda.is_available() and _backend.has_triton()),
                    reason="needs the cpu kernels and Triton")
def test_triton_pieces_round_with_the_cpu_kernels_bits():
    """The same piece with the same offset gets the same bits from the Triton and the C++ kernels: the
    offset enters the hash identically (an op whose fp32 update is exact: sign descent, lr a power of 2)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = (torch.randn(2048) * 3).to(device=device, dtype=torch.bfloat16)
    g = torch.randn(2048, device=device).to(torch.bfloat16)
    out = {}
    for backend in ("cpu", "triton"):
        p, m = x.clone(), torch.zeros_like(x)
        step = torch.zeros((), device=device)
        if backend == "cpu":
            p, m, g_, step = p.cpu(), m.cpu(), g.cpu(), step.cpu()
        else:
            g_ = g
        # lion with beta1 = beta2 = 0 and no decay: p - lr * sign(g), exact in fp32
        _ops.elementwise_unchecked("lion", [p], [g_], [m], [step], [0.0, 0.0, 0.0], 1, lr=2.0**-7, maximize=False,
                                   grad_scale=None, found_inf=None, backend=backend, device=p.device, seed=SEED,
                                   stochastic=True, sr_offsets=[123456789])
        out[backend] = p.cpu()
    assert same_bits(out["cpu"], out["triton"])
    value = x.float().cpu() - 2.0**-7 * torch.sign(g.float().cpu())
    assert same_bits(out["cpu"], bf16_stochastic(value, SEED, 0, 1, offset=123456789))


# -- the ABI refuses bad offsets before any write ------------------------------------------------------

@pytest.mark.parametrize("device,backend", KERNEL_DEVICE_BACKENDS)
def test_ops_refuse_bad_sr_offsets(device, backend):
    from fastopt.lowbit import codebook

    p = torch.randn(512, device=device).to(torch.bfloat16)
    g, m = torch.randn_like(p), torch.zeros_like(p)
    step = torch.zeros((), device=device)
    before = p.clone()
    for bad, match in (([0, 0], "2 stochastic-rounding element offsets for 1 tensors"), ([-3], "non-negative")):
        with pytest.raises(ValueError, match=match):
            _ops.elementwise_step_("lion", [p], [g], [m], [step], [0.9, 0.99, 0.0], 1, 1e-3, None, False, None,
                                   None, 0, [], None, None, SEED, True, backend, [], [], 0.0, 0.0, bad)
        with pytest.raises(ValueError, match=match):
            _ops.elementwise_unchecked("lion", [p], [g], [m], [step], [0.9, 0.99, 0.0], 1, lr=1e-3, maximize=False,
                                       grad_scale=None, found_inf=None, backend=backend, device=p.device, seed=SEED,
                                       stochastic=True, sr_offsets=bad)
    books = [codebook("dyn8s", device), codebook("dyn8u", device)]
    codes = [torch.zeros(512, dtype=torch.uint8, device=device) for _ in range(2)]
    absmax = [torch.zeros(2, device=device) for _ in range(2)]
    with pytest.raises(ValueError, match="2 stochastic-rounding element offsets for 1 tensors"):
        _ops.lowbit_step_("adamw", [p], [g], codes, absmax, books, 256, [step], [0.9, 0.999, 1e-8, 0.01], 0, 1e-3,
                          None, False, None, None, SEED, True, [], [], [], backend, [0, 256])
    assert same_bits(p, before) and float(step) == 0.0
    assert not any(c.any() for c in codes) and not any(a.any() for a in absmax)
    # one offset per param is accepted, and [0] is the default stream
    q = p.clone()
    _ops.elementwise_step_("lion", [p], [g], [m.clone()], [step.clone()], [0.9, 0.99, 0.0], 1, 1e-3, None, False,
                           None, None, 0, [], None, None, SEED, True, backend, [], [], 0.0, 0.0, [0])
    _ops.elementwise_step_("lion", [q], [g], [m.clone()], [step.clone()], [0.9, 0.99, 0.0], 1, 1e-3, None, False,
                           None, None, 0, [], None, None, SEED, True, backend, [], [], 0.0, 0.0)
    assert same_bits(p, q)


@pytest.mark.skipif(not _backend.has_cpu(), reason="needs fastopt._C")
def test_native_abi_refuses_bad_sr_offsets():
    """fastopt._C's entry points check sr_offsets themselves (size 0 or n, each >= 0) before running."""
    native = _backend.native()
    p = torch.zeros(256, dtype=torch.bfloat16)
    step = torch.zeros(())
    base = dict(op="lion", ptrs=[p.data_ptr()] * 3, numels=[256] * 3, steps=[step.data_ptr()], dtype=2,
                hyper=[0.9, 0.99, 0.0], flags=1, lr=1e-3, lr_ptr=0, grad_scale_ptr=0, found_inf_ptr=0,
                maximize=False, phase=0, rows=[], row_coef_ptr=0, reduce_out_ptr=0, seed=SEED, stochastic=True,
                sparse_mask=[], sparse_out=[], sparse_numels=[], sparse_lambda=0.0, sparse_beta=0.0)
    for offsets, match in (([0, 0], "sr_offsets: one stochastic-rounding element offset per tensor .*got 2 for 1"),
                           ([-1], "must be >= 0")):
        with pytest.raises(ValueError, match=match):
            native.elementwise_cpu(**base, sr_offsets=offsets)
        with pytest.raises(ValueError, match=match):  # positionally, last
            native.elementwise_cpu(*base.values(), offsets)
    codes = torch.zeros(256, dtype=torch.uint8)
    book = fastopt.lowbit.codebook("dyn8s")
    absmax = torch.zeros(1)
    low = dict(base, op="lion", ptrs=[p.data_ptr(), p.data_ptr(), codes.data_ptr()], numels=[256, 256, 256])
    for key in ("sparse_mask", "sparse_out", "sparse_numels", "sparse_lambda", "sparse_beta"):
        del low[key]
    low.update(books=[book.data_ptr()], absmax=[absmax.data_ptr()], absmax_numels=[1], block=256, colmax=[],
               colmax_numels=[], rank1_rows=[])
    with pytest.raises(ValueError, match="got 3 for 1"):
        native.lowbit_cpu(**low, sr_offsets=[0, 1, 2])
    assert float(step) == 0.0 and not p.float().any() and not codes.any()
    # A valid call with and without offsets runs (and increments the counter once each).
    native.elementwise_cpu(**base, sr_offsets=[5])
    native.elementwise_cpu(**base)
    assert float(step) == 2.0
