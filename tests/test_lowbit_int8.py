"""INT8 weights with stochastic rounding (fastopt.lowbit.Int8Linear, the Q-GaLore recipe): the int8
codec, the layer's forward/backward, the optimizer step on every backend against a step composed by
hand, AMP skips, state dicts, errors, and training."""
import copy
import io

import pytest
import torch
import torch.nn.functional as F

import fastopt
from fastopt.lowbit import Int8Linear, dequantize_int8, int8_linear_, quantize_int8

from conftest import DEVICE_BACKENDS


def mlp(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16)).to(device)


# -- the codec ------------------------------------------------------------------------------------

def test_int8_codec_nearest_matches_the_formula():
    """Per group: scale = (max - min) / 255, zero = -round(min / scale), code = round(w / scale) + zero;
    the round trip is within half a step and the group's min and max are (nearly) representable."""
    w = torch.randn(64, 96) * torch.logspace(-3, 1, 64)[:, None]
    codes, scales, zeros = quantize_int8(w, 256)
    g = w.reshape(-1, 256)
    lo, hi = g.min(1).values, g.max(1).values
    torch.testing.assert_close(scales, (hi - lo) / 255, rtol=1e-6, atol=0)
    assert torch.equal(zeros, (-torch.round(lo / scales)).clamp(0, 255))
    expect = (torch.round(g / scales[:, None]) + zeros[:, None]).clamp(0, 255)
    assert torch.equal(codes.reshape(-1, 256).float(), expect)
    back = dequantize_int8(codes, scales, zeros, 256)
    assert back.shape == w.shape
    err = (back - w).reshape(-1, 256).abs().max(1).values
    assert bool((err <= 0.5 * scales * (1 + 1e-5) + 1e-7).all())


def test_int8_stochastic_rounding_is_unbiased_and_seeded():
    w = torch.rand(4096) * 0.3 - 0.1
    w[0::256], w[1::256] = -0.1, 0.2    # every group spans [-0.1, 0.2]: zero point 85 (no clamping bias)
    draws = [dequantize_int8(*quantize_int8(w, 256, stochastic=True, seed=s, index=2, step=7), 256)
             for s in range(400)]
    stack = torch.stack(draws)
    step = 0.3 / 255
    # Each draw is one of the two grid points around w ...
    assert bool(((stack - w).abs() <= step * (1 + 1e-4)).all())
    # ... and the mean over 400 seeds is w up to the sampling error (sd <= step / 2 / sqrt(400)).
    assert float((stack.mean(0) - w).abs().max()) < 5 * step / 2 / 20
    nearest = dequantize_int8(*quantize_int8(w, 256), 256)
    assert float((stack.mean(0) - w).abs().mean()) < 0.25 * float((nearest - w).abs().mean())
    a = quantize_int8(w, 256, stochastic=True, seed=1, index=0, step=3)[0]
    assert torch.equal(a, quantize_int8(w, 256, stochastic=True, seed=1, index=0, step=torch.tensor(3.0))[0])
    for other in (dict(seed=2, index=0, step=3), dict(seed=1, index=1, step=3), dict(seed=1, index=0, step=4)):
        assert not torch.equal(a, quantize_int8(w, 256, stochastic=True, **other)[0])


def test_int8_codec_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize_int8(torch.randn(300), 256)
    with pytest.raises(TypeError, match="floating-point"):
        quantize_int8(torch.ones(256, dtype=torch.int32), 256)
    with pytest.raises(ValueError, match="uint8 codes"):
        dequantize_int8(torch.zeros(256, dtype=torch.uint8), torch.ones(2), torch.zeros(1), 256)
    with pytest.raises(ValueError, match="group_size"):
        Int8Linear(10, 10, group_size=256)


# -- the layer ------------------------------------------------------------------------------------

@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_int8_linear_forward_backward(x_requires_grad):
    lin = torch.nn.Linear(32, 24)
    q = Int8Linear.from_linear(lin)
    w = q.dequantized_weight()
    assert float((w - lin.weight.detach()).abs().max()) <= float(q.weight_scale.max()) * 0.5 + 1e-7
    x = torch.randn(5, 3, 32, requires_grad=x_requires_grad)
    out = q(x)
    wf = w.clone().requires_grad_()
    xf = x.detach().clone().requires_grad_(x_requires_grad)
    ref = F.linear(xf, wf, q.bias.detach().clone().requires_grad_())
    torch.testing.assert_close(out, ref)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    torch.testing.assert_close(q.weight.float_grad, wf.grad)
    assert q.weight.grad is None and not q.weight.requires_grad
    if x_requires_grad:
        torch.testing.assert_close(x.grad, xf.grad)
    # A second backward accumulates, as .grad does.
    q(x).backward(grad_out)
    torch.testing.assert_close(q.weight.float_grad, 2 * wf.grad)
    torch.testing.assert_close(q.bias.grad, 2 * grad_out.sum((0, 1)))


def test_int8_linear_bf16_activations_and_no_grad():
    q = Int8Linear.from_linear(torch.nn.Linear(32, 16, bias=False))
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        out = q(x)
    assert out.dtype == torch.bfloat16 and getattr(q.weight, "float_grad", None) is None
    q(x).float().sum().backward()
    assert q.weight.float_grad.dtype == torch.bfloat16


def test_int8_linear_conversion_filter_and_module_state_dict():
    # model[1] has 1152 weights, not a multiple of 256: it stays float; the filter keeps model[2] float.
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Linear(128, 9), torch.nn.Linear(128, 64))
    int8_linear_(model, filter=lambda name, lin: name != "2")
    assert isinstance(model[0], Int8Linear)
    assert type(model[1]) is torch.nn.Linear and type(model[2]) is torch.nn.Linear
    sd = model[0].state_dict()
    assert sd["weight"].dtype == torch.uint8 and set(sd) == {"weight", "weight_scale", "weight_zero", "bias"}
    fresh = Int8Linear(64, 128)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.dequantized_weight(), model[0].dequantized_weight())
    assert isinstance(int8_linear_(torch.nn.Linear(16, 16)), Int8Linear)


# -- the optimizer step ------------------------------------------------------------------------------

def _loss(model, x, y):
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
@pytest.mark.parametrize("opt_name", ["AdamW8bit", "Lion", "AdamWfp32"])
@pytest.mark.parametrize("stochastic", [True, False])
def test_int8_step_is_dequantize_step_requantize(device, backend, opt_name, stochastic):
    """One step on an int8 weight = dequantize it, step an fp32 copy with the same optimizer and
    backend, requantize with the layer's rounding (seed, index in the group, step 1)."""
    def make(params):
        if opt_name == "AdamW8bit":
            return fastopt.lowbit.AdamW8bit(params, lr=1e-2, min_quant_size=0, seed=5, backend=backend)
        if opt_name == "Lion":
            return fastopt.Lion(params, lr=1e-3, seed=5, backend=backend)
        return fastopt.lowbit.ElementwiseAdamW(params, lr=1e-2, seed=5, backend=backend)

    model = int8_linear_(mlp(device=device), stochastic_rounding=stochastic)
    x, y = torch.randn(32, 64, device=device), torch.randint(0, 16, (32,), device=device)
    _loss(model, x, y).backward()
    lin = model[2]
    w0 = lin.dequantized_weight().clone().requires_grad_(False)
    g = lin.weight.float_grad.clone()
    opt = make(model.parameters())
    opt.step()

    copy_w = w0.clone()
    copy_w.grad = g
    make([copy_w]).step()
    index = [id(p) for p in opt.param_groups[0]["params"]].index(id(lin.weight))
    codes, scales, zeros = quantize_int8(copy_w, 256, stochastic=stochastic, seed=5, index=index, step=1)
    assert torch.equal(lin.weight, codes)
    assert torch.equal(lin.weight_scale, scales) and torch.equal(lin.weight_zero, zeros)
    assert not torch.equal(lin.weight_scale, torch.ones_like(lin.weight_scale))
    state = opt.state[lin.weight]
    assert float(state["step"]) == 1.0
    assert ("state_format" in state) == (opt_name == "AdamW8bit")


@pytest.mark.parametrize("device,backend", DEVICE_BACKENDS)
def test_int8_amp_found_inf_skips_the_step(device, backend):
    model = int8_linear_(mlp(device=device))
    x, y = torch.randn(32, 64, device=device), torch.randint(0, 16, (32,), device=device)
    opt = fastopt.lowbit.AdamW8bit(model.parameters(), lr=1e-2, min_quant_size=0, backend=backend)
    _loss(model, x, y).backward()
    opt.step()
    before = copy.deepcopy(model.state_dict())
    state_before = copy.deepcopy(opt.state_dict()["state"])
    opt.zero_grad()
    _loss(model, x, y).backward()
    opt.grad_scale = torch.tensor(1.0, device=device)
    opt.found_inf = torch.tensor(1.0, device=device)
    opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for pid, s in opt.state_dict()["state"].items():
        for k, v in s.items():
            assert (v == state_before[pid][k]) if isinstance(v, str) else torch.equal(v, state_before[pid][k])


def test_int8_sr_trains_where_nearest_rounding_stalls():
    """Updates (lr 1e-4) ten times smaller than one quantization step (~1e-3): nearest rounding never
    moves the weight, stochastic rounding follows the fp32 trajectory on average."""
    target = torch.randn(64, 64)
    x = torch.eye(64)
    start = torch.nn.Linear(64, 64, bias=False)
    drop = {}
    for name in ("fp32", "nearest", "sr"):
        if name == "fp32":
            lin = copy.deepcopy(start)
            lin.weight.data = Int8Linear.from_linear(start).dequantized_weight()   # same starting point
            param, weight = lin.weight, lambda: lin.weight.detach()
        else:
            lin = Int8Linear.from_linear(start, stochastic_rounding=name == "sr")
            param, weight = lin.weight, lin.dequantized_weight
        codes0 = param.detach().clone()
        init = float(((weight() - target) ** 2).mean())
        opt = fastopt.lowbit.ElementwiseAdamW([param], lr=1e-4, weight_decay=0.0)
        for _ in range(150):
            loss = ((lin(x) - target.t()) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        drop[name] = init - float(((weight() - target) ** 2).mean())
        if name == "nearest":
            assert torch.equal(param, codes0)   # every update rounds back to the same code
    # (nearest still moves a little: the group scales follow the groups' min and max each step)
    assert drop["fp32"] > 0.01 and abs(drop["nearest"]) < 0.1 * drop["fp32"], drop
    assert 0.6 * drop["fp32"] < drop["sr"] < 1.4 * drop["fp32"], drop


def test_int8_training_tracks_fp32():
    """An MLP trained 300 steps with int8 weights (SR) + 8-bit AdamW states ends within 35% of the
    fp32 AdamW loss.  Measured on this config: fp32 0.0199; int8 + SR + 8-bit states 0.0179 (-10%);
    int8 + SR + fp32 states 0.0203 (+2%); int8 with nearest rounding 0.0329 (+65%, would fail)."""
    x, y = torch.randn(256, 64), torch.randint(0, 16, (256,))
    fp = mlp()
    q = int8_linear_(copy.deepcopy(fp))
    final = {}
    for name, model, opt in (("fp32", fp, torch.optim.AdamW(fp.parameters(), lr=1e-3)),
                             ("int8", q, fastopt.lowbit.AdamW8bit(q.parameters(), lr=1e-3, min_quant_size=0))):
        for _ in range(300):
            loss = _loss(model, x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        final[name] = float(loss.detach())
    assert torch.isfinite(torch.tensor(final["int8"]))
    assert abs(final["int8"] - final["fp32"]) <= 0.35 * final["fp32"] + 0.02, final


# -- state dicts and errors ---------------------------------------------------------------------------

def test_int8_state_dict_round_trip_continues_identically():
    x, y = torch.randn(64, 64), torch.randint(0, 16, (64,))
    model = int8_linear_(mlp())
    opt = fastopt.lowbit.AdamW8bit(model.parameters(), lr=1e-3, min_quant_size=0, seed=2)
    for _ in range(3):
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    twin = int8_linear_(mlp(seed=1))
    twin.load_state_dict(saved["model"])
    twin_opt = fastopt.lowbit.AdamW8bit(twin.parameters(), lr=1e-3, min_quant_size=0, seed=2)
    twin_opt.load_state_dict(saved["opt"])
    for m, o in ((model, opt), (twin, twin_opt)):
        for _ in range(2):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


def test_int8_model_pickles_and_deepcopies_and_keeps_training():
    model = int8_linear_(mlp())
    start = model[0].weight.clone()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 64), torch.randint(0, 16, (16,))
    results = []
    for m in (model, loaded, twin):
        assert fastopt.lowbit.is_int8_weight(m[0].weight)       # found before any forward
        opt = fastopt.lowbit.AdamW8bit(m.parameters(), lr=1e-2, min_quant_size=0)
        _loss(m, x, y).backward()
        opt.step()
        results.append(m.state_dict())
    for other in results[1:]:
        for k, v in results[0].items():
            assert torch.equal(v, other[k]), k
    assert not torch.equal(results[0]["0.weight"], start)     # the step did move the int8 weight


def test_int8_errors_before_any_state_change():
    model = int8_linear_(mlp())
    x, y = torch.randn(8, 64), torch.randint(0, 16, (8,))
    _loss(model, x, y).backward()
    before = copy.deepcopy(model.state_dict())
    opt = fastopt.AdamW(model.parameters(), lr=1e-2)      # the issue-2 launcher: no int8 weights
    with pytest.raises(TypeError, match="int8 weights"):
        opt.step()
    assert not opt.state
    opt = fastopt.lowbit.AdamW8bit(model.parameters(), lr=1e-2)
    model[0].weight.float_grad = torch.zeros(3, 3)
    with pytest.raises(ValueError, match="float_grad"):
        opt.step()
    assert not opt.state
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_int8_zero_grad_clears_float_grad():
    model = int8_linear_(mlp())
    opt = fastopt.Lion(model.parameters(), lr=1e-4)
    _loss(model, torch.randn(8, 64), torch.randint(0, 16, (8,))).backward()
    opt.zero_grad(set_to_none=False)
    assert float(model[0].weight.float_grad.abs().sum()) == 0.0
    opt.zero_grad()
    assert model[0].weight.float_grad is None and model[0].bias.grad is None
