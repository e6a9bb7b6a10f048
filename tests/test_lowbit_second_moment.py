"""A positive second moment never decodes to 0 (fastopt.lowbit.codebook, the unsigned
formats' rule), in every format and on every backend, and the low-bit optimizers stay near their
full-precision twins where it used to matter.

Before the fix, nearest rounding stored a second moment far below its block's maximum (v / absmax <
1.6e-7 in dyn8u, < 2.2e-6 in fp8) as exactly 0 while its first moment was not 0, so Adam's step
became m / eps: on the small ReLU MLP below (lr 1e-2, 5 steps) AdamW8bit moved the 64x64 weight by
0.78 and AdamWFp8 by 7.6 in one step, where torch.optim.AdamW moves it by at most 0.05 in all.

* the codec: each format, each backend -- a positive value never gets a code that decodes to 0
  (unsigned formats); signed formats stay nearest (tiny values still round to 0 there);
* the MLP of the issue and a dead-ReLU case (after 3 steps the inputs are 0, so the hidden units
  with a negative first-layer bias get no gradient and their moments decay) for every low-bit
  optimizer class of fastopt.lowbit (AdamW, Adam, Lion, Adan, AdaBelief, DiffGrad, EXAdam x 8bit,
  4bit, Fp8) and AdamW with state_bits="4-rank1", on the cpu and torch backends (AdamW's 8-bit, 4-bit
  and fp8 classes, Adan8bit and AdaBeliefFp8 also on triton under the interpreter): the weights stay near those of
  the same optimizer with full-precision states, no step is much larger than that optimizer's, and
  every non-negative state of an element that has seen a nonzero gradient decodes to a positive value;
* AdamW 8-bit and fp8 on a noisy quadratic whose curvatures span 6 decades (it diverged before);
* the fused step on blocks of one large and many tiny second moments (cpu kernels and reference).
"""
import functools

import pytest
import torch

from fastopt import _backend, lowbit
from fastopt.lowbit import FORMATS, dequantize_blockwise, quantize_blockwise
from fastopt.lowbit.codebook import dequantize_reference, rank1_dequantize_reference
from fastopt.optim.lowbit_presets import _BASES, _SUFFIX
from fastopt.lowbit.state import UNSIGNED_STATES, state_formats

from conftest import DEVICE_BACKENDS

LR = 1e-2
CASES = {"mlp": 5, "dead": 15}  # steps; "dead": inputs 0 from step 3 on
# Every low-bit optimizer class: (name, base class with full-precision states, kwargs for the base).
# (SGD: torch's default momentum 0 keeps no state to quantize; the twins take the same options)
OPTIONS = {"SGD": {"momentum": 0.9}}
LOWBIT = [(base.__name__.replace("Elementwise", "") + suffix, base,
           {"state_bits": bits, **OPTIONS.get(base.__name__, {})})
          for base in _BASES.values() for bits, suffix in _SUFFIX.items()]
LOWBIT.append(("AdamW4rank1", lowbit.ElementwiseAdamW, {"state_bits": "4-rank1"}))
BACKENDS = [b for d, b in DEVICE_BACKENDS if d == "cpu" and b in ("cpu", "torch")]
HAS_TRITON = ("cpu", "triton") in DEVICE_BACKENDS


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 4))


def _batches(case):
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(32, 16, generator=gen), torch.randn(32, 4, generator=gen)
    # "dead": from step 3 on only relu(b1) feeds the 64x64 layer, so its columns of units with b1 < 0
    # get exactly zero gradient (about 70% of the weight), and their m and v decay.
    return [(torch.zeros_like(x) if case == "dead" and s >= 3 else x, y) for s in range(CASES[case])]


def _train(make, case, device="cpu"):
    """(the 64x64 weight after the steps, on the CPU; the largest |change| of one element in one step;
    the optimizer; the elements whose gradient was ever nonzero)."""
    model = _model().to(device)
    opt = make(model.parameters())
    w = model[2].weight
    largest = 0.0
    seen = torch.zeros(w.shape, dtype=torch.bool, device=device)
    for x, y in _batches(case):
        before = w.detach().clone()
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x.to(device)), y.to(device)).backward()
        seen |= w.grad != 0
        opt.step()
        largest = max(largest, (w.detach() - before).abs().max().item())
    return w.detach().cpu(), largest, opt, seen.cpu()


@functools.lru_cache(maxsize=None)
def _twin(name, case):
    """The same optimizer with full-precision states (backend torch: the reference)."""
    _, base, _ = next(entry for entry in LOWBIT if entry[0] == name)
    options = OPTIONS.get(base.__name__, {})
    w, largest, _, _ = _train(lambda p: base(p, lr=LR, backend="torch", **options), case)
    return w, largest


def _decoded_unsigned_states(opt, w):
    """{name: fp32 values} of the quantized non-negative states of weight ``w``."""
    state = opt.state[w]
    group = opt.param_groups[0]
    names = opt._state_names(group)
    out = {}
    for name, fmt in zip(names, state_formats(group["state_bits"], names, w.shape)):
        if name not in UNSIGNED_STATES:
            continue
        if FORMATS[fmt].rank1:
            out[name] = rank1_dequantize_reference(state[name], state[name + "_row"], state[name + "_col"], fmt)
        else:
            out[name] = dequantize_reference(state[name], state[name + "_absmax"], fmt)
    return out


def _check_against_twin(name, base, kwargs, case, backend, device="cpu"):
    w, largest, opt, seen = _train(lambda p: base(p, lr=LR, backend=backend, **kwargs), case, device)
    assert "state_format" in opt.state[opt.param_groups[0]["params"][2]]  # the 64x64 weight is quantized
    w_twin, largest_twin = _twin(name, case)
    steps = CASES[case]
    # Bounds, from measurement (cpu and torch give the same numbers; triton the same on these cases).
    # One step: at most 2.5x the twin's largest step.  Measured with the fix: <= 1.9x (AdamW 4-rank1 on
    # the MLP; 8-bit and fp8 <= 1.15x); before it: 69x (AdamW8bit), 750x (AdamWFp8), 110x (Adan8bit),
    # 3200x (EXAdam8bit), 4.3x (AdaBeliefFp8), 5x (DiffGradFp8).
    assert largest <= 2.5 * largest_twin, (largest, largest_twin)
    # The weights: within 1 (Lion: 2) of the twin's largest step per step.  Measured with the fix, as a
    # fraction of steps * the twin's largest step: <= 0.78 (DiffGrad4bit and AdamW4bit, MLP), <= 0.58
    # (dead-ReLU); 8-bit and fp8 <= 0.26; Lion up to 1.73 on the dead-ReLU case (its quantized m of a
    # dead unit rounds to 0 and stops, where the fp32 m keeps its sign and keeps stepping lr: Lion's
    # steps are +-lr, so 2 lr apart at most per step).  Before the fix: 16 (AdamW8bit, MLP), 150
    # (AdamWFp8, MLP), 290 (AdamWFp8, dead).
    scale = (2.0 if name.startswith("Lion") else 1.0) * steps * largest_twin
    diff = (w - w_twin).abs().max().item()
    assert diff <= scale, (diff, scale)
    # Every non-negative state of an element that has seen a nonzero gradient is positive (so it
    # decodes positive): its step is bounded by m / sqrt(v_hat), never m / eps.
    for state_name, v in _decoded_unsigned_states(opt, opt.param_groups[0]["params"][2]).items():
        v = v.reshape(w.shape).cpu()
        assert (v[seen] > 0).all(), (state_name, int((v[seen] <= 0).sum()))
    return diff


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name,base,kwargs", LOWBIT, ids=[entry[0] for entry in LOWBIT])
def test_lowbit_optimizers_track_full_precision(name, base, kwargs, case, backend):
    _check_against_twin(name, base, kwargs, case, backend)


@pytest.mark.skipif(not HAS_TRITON, reason="triton cannot run here (no TRITON_INTERPRET)")
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "AdamWFp8", "Adan8bit", "AdaBeliefFp8"])
def test_lowbit_optimizers_track_full_precision_triton(name, case):
    _, base, kwargs = next(entry for entry in LOWBIT if entry[0] == name)
    _check_against_twin(name, base, kwargs, case, "triton")


GPU_KERNELS = [b for d, b in DEVICE_BACKENDS if d == "cuda" and b != "torch"]


@pytest.mark.skipif(not GPU_KERNELS, reason="needs a GPU")
@pytest.mark.parametrize("backend", GPU_KERNELS or ["cuda"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "AdamWFp8", "Adan8bit", "AdaBeliefFp8", "EXAdam8bit"])
def test_lowbit_optimizers_track_full_precision_gpu(name, case, backend):
    """The same checks on CUDA tensors (cuda and triton kernels); the twin runs on the CPU."""
    _, base, kwargs = next(entry for entry in LOWBIT if entry[0] == name)
    _check_against_twin(name, base, kwargs, case, backend, "cuda")


@pytest.mark.parametrize("backend", ["torch"] + BACKENDS[:1])
@pytest.mark.parametrize("cls,bound", [(torch.optim.AdamW, "AdamW"), (torch.optim.Adam, "Adam")])
@pytest.mark.parametrize("case", sorted(CASES))
def test_adam_classes_track_torch(cls, bound, case, backend):
    """fastopt.lowbit.{Adam,AdamW}{8bit,4bit,Fp8} vs torch.optim.{Adam,AdamW} (the issue's comparison).
    Measured with the fix: 8-bit <= 0.013 (MLP; bitsandbytes' AdamW8bit on CPU: 0.013), fp8 <= 0.017,
    4-bit <= 0.085 (dead-ReLU); before: 0.78 and 1.8 (8-bit), 7.7 and 44 (fp8).  Bounds: 0.03 for 8-bit
    and fp8, 0.12 for 4-bit (lr 1e-2, so 3 and 12 lr)."""
    w_torch, _, _, _ = _train(lambda p: cls(p, lr=LR), case)
    for suffix, tol in (("8bit", 0.03), ("Fp8", 0.03), ("4bit", 0.12)):
        low = getattr(lowbit, bound + suffix)
        w, _, _, _ = _train(lambda p: low(p, lr=LR, backend=backend), case)
        diff = (w - w_torch).abs().max().item()
        assert diff <= tol, (bound + suffix, diff)


# -- the codec -------------------------------------------------------------------------------------

def _positive_blocks(fmt):
    """Non-negative blocks whose ratios to their block's maximum span 1 .. 1e-37: each value between
    0 and the smallest positive map value, the midpoint and its neighbours, exact zeros."""
    f = FORMATS[fmt]
    gen = torch.Generator().manual_seed(3)
    vals = torch.sort(f.values[torch.isfinite(f.values)]).values
    smallest = vals[vals > 0][0].item()
    ratios = torch.cat([torch.logspace(-37, 0, 4 * f.block, dtype=torch.float64).float(),
                        torch.tensor([smallest / 2, smallest / 4, smallest, smallest * 0.999, smallest * 1e-3]),
                        torch.nextafter(torch.tensor([smallest / 2] * 2), torch.tensor([0.0, 1.0])),
                        torch.zeros(7)])
    ratios = ratios[torch.randperm(ratios.numel(), generator=gen)]
    per = f.block - 1
    ratios = torch.cat([ratios, torch.zeros((-ratios.numel()) % per)]).reshape(-1, per)
    blocks = torch.cat([torch.ones(ratios.shape[0], 1), ratios], dim=1)
    scales = torch.tensor([1.0, 3e-12, 7e5])  # the same ratios under block maxima of other sizes
    return (blocks[None] * scales[:, None, None]).reshape(-1)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_positive_value_never_decodes_to_zero(device, backend, fmt):
    """Unsigned formats: every positive value decodes to a positive value, those nearer 0 than the
    smallest positive map value to exactly that value times absmax, exact zeros to 0.  Signed formats
    stay nearest.  The same codes on every backend as the torch reference."""
    f = FORMATS[fmt]
    x = _positive_blocks(fmt).to(device)
    codes, absmax = quantize_blockwise(x, fmt, backend=backend)
    ref_codes, ref_absmax = quantize_blockwise(x.cpu(), fmt, backend="torch")
    assert torch.equal(codes.cpu(), ref_codes) and torch.equal(absmax.cpu(), ref_absmax)
    back = dequantize_blockwise(codes, absmax, fmt, backend=backend).cpu()
    x = x.cpu()
    scale = ref_absmax.repeat_interleave(f.block)
    ratio = x / scale
    vals = torch.sort(f.values[torch.isfinite(f.values)]).values
    smallest = vals[vals > 0][0]
    low = (ratio > 0) & (ratio < smallest / 2)
    assert low.sum() > 100
    if f.signed:
        # Signed formats (first moments) stay nearest: a value nearer 0 than the smallest positive map
        # value decodes to 0 (a first moment rounded to 0 only makes the step 0).
        assert (back[low] == 0).all() and (back[x == 0] == 0).all()
        return
    assert (back[x > 0] > 0).all(), int(((x > 0) & (back <= 0)).sum())
    assert torch.equal(back[low], (smallest * scale)[low])
    if (f.values == 0).any():
        assert (back[x == 0] == 0).all()  # exact zeros keep the code of 0


def test_fp8_family_formats():
    """fp8 states: the first moment nearest (fp8), the second moment with the rule (fp8u), both
    stored and tagged as fp8 (the same codes and values), so fp8 checkpoints keep loading."""
    assert state_formats("fp8", ("exp_avg", "exp_avg_sq")) == ("fp8", "fp8u")
    assert torch.equal(FORMATS["fp8"].values.view(torch.int32), FORMATS["fp8u"].values.view(torch.int32))
    p = torch.nn.Parameter(torch.randn(64, 64))
    opt = lowbit.AdamWFp8([p], lr=1e-3)
    p.grad = torch.randn(64, 64)
    opt.step()
    assert opt.state[p]["state_format"] == "fastopt.lowbit/1:fp8,fp8"
    again = lowbit.AdamWFp8([torch.nn.Parameter(p.detach().clone())], lr=1e-3)
    again.load_state_dict(opt.state_dict())
    assert torch.equal(again.state[again.param_groups[0]["params"][0]]["exp_avg_sq"], opt.state[p]["exp_avg_sq"])


@pytest.mark.skipif(not _backend.has_cpu(), reason="needs fastopt._C")
def test_tiny_second_moment_in_fused_step():
    """The fused step (cpu kernels and torch reference): in blocks with one large gradient (10) and
    many small ones (1e-4), the small second moments (1e-11, 1e-12 of the block maximum) stay positive
    after requantization, and when their gradients stop the step is at most lr -- before the fix v
    decoded to 0 while m (1e-5 of its maximum) did not, and the step was m / eps ~ 5000 lr."""
    g1 = torch.full((4096,), 1e-4)
    g1[::256] = 10.0
    g2 = torch.where(g1 > 1, g1, torch.zeros_like(g1))
    out = {}
    for backend in ("cpu", "torch"):
        for cls, fmt in ((lowbit.AdamW8bit, "dyn8u"), (lowbit.AdamWFp8, "fp8u"), (lowbit.AdamW4bit, "lin4u")):
            p = torch.nn.Parameter(torch.zeros(4096))
            opt = cls([p], lr=1e-3, weight_decay=0.0, backend=backend)
            for g in (g1, g2):
                before = p.detach().clone()
                p.grad = g.clone()
                opt.step()
                st = opt.state[p]
                v = dequantize_reference(st["exp_avg_sq"], st["exp_avg_sq_absmax"], fmt)
                assert (v > 0).all(), (cls.__name__, backend)
                step = (p.detach() - before).abs().max().item()
                assert step <= 1e-3 * (1 + 1e-5), (cls.__name__, backend, step)
            out[backend, fmt] = (p.detach().clone(), st["exp_avg_sq"].clone())
    for fmt in ("dyn8u", "fp8u", "lin4u"):
        torch.testing.assert_close(out["cpu", fmt][0], out["torch", fmt][0], rtol=1e-6, atol=0)
        assert torch.equal(out["cpu", fmt][1], out["torch", fmt][1])


@pytest.mark.parametrize("bits", [8, "fp8"])
def test_wide_curvature_quadratic(bits):
    """AdamW (lr 1e-3) on 0.5 * sum(h x^2) with noisy gradients and curvatures h over 6 decades,
    shuffled, 1000 steps.  Before the fix the small second moments of a block quantized to 0 and their
    elements stepped m / eps: the loss went from 3.0e5 to 1.6e7 (8-bit) / 3.8e7 (fp8), where fp32
    states reach 6.4e4.  Measured with the fix: 6.4e4 (8-bit), 6.1e4 (fp8).  Bound: within 20 %."""
    losses = {}
    for b in (None, bits):
        gen = torch.Generator().manual_seed(3)
        h = torch.logspace(-3, 3, 8192)[torch.randperm(8192, generator=gen)]
        x = torch.nn.Parameter(torch.randn(8192, generator=gen))
        opt = lowbit.ElementwiseAdamW([x], lr=1e-3, weight_decay=0.0, state_bits=b)
        for _ in range(1000):
            x.grad = h * x.detach() + 0.1 * torch.randn(8192, generator=gen)
            opt.step()
        losses[b] = float((0.5 * h * x.detach() ** 2).sum())
    assert abs(losses[bits] - losses[None]) <= 0.2 * losses[None], losses
