"""fastopt.sharpness.SAFLoss (SAF, Du et al., NeurIPS 2022): every backend against the official formula
(written out here in fp64: ``F.kl_div(softmax(out / T).log(), softmax(old / T), reduction="none").sum(-1)
.mean() * T**2 * reinforce``), the bank's contents over epochs, the warm-up, repeated indices, bf16 / fp16
banks, state_dict round trips, bad inputs, and a small training run.

The ``cuda`` backend's cases run on a GPU, or on the CPU through the CUDA-on-CPU module
(``PYTHONPATH=tests python -m pytest -p _cuda_on_cpu tests/test_saf.py -k cuda``); tests/test_cuda_on_cpu.py
compares the CUDA kernel with the CPU kernel in every CI run."""
import io

import pytest
import torch
import torch.nn.functional as F

from fastopt import _backend
from fastopt.sharpness import SAFLoss
from fastopt.sharpness import saf as saf_mod

from conftest import DEVICE_BACKENDS

SAF_BACKENDS = [(d, b) for d, b in DEVICE_BACKENDS if b == "torch" or b in saf_mod._CAPS.kernels]
IDS = [f"{d}-{b}" for d, b in SAF_BACKENDS]


def official(logits, old, temperature, weight):
    """The official SAF_train.py expression, in fp64 (mean over the batch, T^2, the weight)."""
    t = temperature
    out, old = logits.double(), old.double()
    kl = F.kl_div(F.softmax(out / t, dim=-1).log(), F.softmax(old / t, dim=-1), reduction="none")
    return kl.sum(-1).mean() * t ** 2 * weight


def official_and_grad(logits, old, temperature, weight):
    x = logits.detach().double().requires_grad_(True)
    v = official(x, old, temperature, weight)
    (g,) = torch.autograd.grad(v, x)
    return v.detach(), g


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
@pytest.mark.parametrize("classes", [1, 3, 17, 1000])
def test_value_and_gradient_match_the_official_formula(device, backend, classes):
    n, b, t, w = 13, 6, 5.0, 0.3
    saf = SAFLoss(n, classes, weight=w, temperature=t, start_epoch=0, epochs_ago=1, device=device, backend=backend)
    # epoch 1 reads slot 0, writes slot 1
    saf.bank[0] = torch.randn(n, classes, device=device) * 4
    before = saf.bank.clone()
    idx = torch.tensor([4, 0, 12, 7, 4, 9], device=device)  # 4 repeated
    logits = (torch.randn(b, classes, device=device) * 4).requires_grad_(True)
    loss = saf(logits, idx, 1)
    loss.backward()
    want, want_g = official_and_grad(logits, before[0, idx], t, w)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss.double(), want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(logits.grad.double(), want_g, rtol=1e-4, atol=2e-7)
    # the bank: slot 0 unchanged, slot 1 holds the batch's outputs (index 4: its last occurrence, row 4)
    assert torch.equal(saf.bank[0], before[0])
    want_bank = before[1].clone()
    for row, i in enumerate(idx.tolist()):
        want_bank[i] = logits.detach()[row]
    assert torch.equal(saf.bank[1], want_bank)


def test_fp64_logits_torch_backend_is_exact():
    n, c, t, w = 9, 11, 2.0, 0.8
    saf = SAFLoss(n, c, weight=w, temperature=t, start_epoch=0, epochs_ago=1, backend="torch")
    saf.bank[0] = torch.randn(n, c)
    idx = torch.tensor([1, 8, 3])
    logits = torch.randn(3, c, dtype=torch.float64, requires_grad=True)
    loss = saf(logits, idx, 1)
    loss.backward()
    want, want_g = official_and_grad(logits, saf.bank[0, idx], t, w)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(logits.grad, want_g, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
@pytest.mark.parametrize("logits_dtype,bank_dtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16),
                                                     (torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_low_precision_banks_and_logits(device, backend, logits_dtype, bank_dtype):
    n, c, t, w = 10, 37, 5.0, 0.3
    saf = SAFLoss(n, c, weight=w, temperature=t, start_epoch=0, epochs_ago=2, bank_dtype=bank_dtype, device=device,
                  backend=backend)
    assert saf.bank.dtype == bank_dtype and saf.bank.shape == (3, n, c)
    idx = torch.tensor([3, 9, 0, 5], device=device)
    first = (torch.randn(4, c, device=device) * 3).to(logits_dtype)
    saf(first, idx, 0)  # epoch 0 writes slot 0 (the term is on, its targets are zeros)
    # the bank holds the outputs rounded to nearest even, as torch's conversion
    assert torch.equal(saf.bank[0, idx], first.to(bank_dtype))
    logits = (torch.randn(4, c, device=device) * 3).to(logits_dtype).requires_grad_(True)
    loss = saf(logits, idx, 2)  # epoch 2 reads slot 0
    loss.backward()
    want, want_g = official_and_grad(logits, first.to(bank_dtype), t, w)
    torch.testing.assert_close(loss.double(), want, rtol=1e-5, atol=1e-6)  # fp32 math on the stored values
    assert logits.grad.dtype == logits_dtype
    tol = dict(rtol=1e-2, atol=1e-4) if logits_dtype != torch.float32 else dict(rtol=1e-4, atol=2e-7)
    torch.testing.assert_close(logits.grad.double(), want_g, **tol)
    assert torch.equal(saf.bank[2, idx], logits.detach().to(bank_dtype))


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
def test_warmup_and_end_epoch(device, backend):
    n, c = 8, 5
    saf = SAFLoss(n, c, start_epoch=2, end_epoch=5, epochs_ago=1, device=device, backend=backend)
    idx = torch.arange(n, device=device)
    seen = {}
    for epoch in range(7):
        logits = torch.randn(n, c, device=device, requires_grad=True)
        loss = saf(logits, idx, epoch)
        seen[epoch] = loss
        # the bank is written in every epoch, on or off
        assert torch.equal(saf.bank[epoch % 2], logits.detach()), epoch
        if epoch in (3, 4):  # start_epoch < epoch < end_epoch, as the official code
            assert saf.is_active(epoch) and loss.requires_grad and float(loss.detach()) > 0
            loss.backward()
            assert logits.grad.abs().sum() > 0
        else:
            assert not saf.is_active(epoch) and not loss.requires_grad and float(loss) == 0.0, epoch


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
def test_bank_over_epochs_uses_outputs_from_epochs_ago(device, backend):
    n, c, e_ago, t, w = 9, 6, 2, 3.0, 0.5
    epochs = 6
    table = torch.randn(epochs, n, c, device=device) * 2  # what example i outputs at epoch e
    saf = SAFLoss(n, c, weight=w, temperature=t, start_epoch=1, epochs_ago=e_ago, device=device, backend=backend)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(device)
        for batch in (perm[:5], perm[5:]):  # two batches in a random order
            loss = saf(table[epoch, batch], batch, epoch)
            if epoch > 1:
                old = table[epoch - e_ago, batch] if epoch >= e_ago else torch.zeros(len(batch), c, device=device)
                torch.testing.assert_close(loss.double(), official(table[epoch, batch], old, t, w),
                                           rtol=2e-6, atol=2e-6)
            else:
                assert float(loss) == 0.0
    for epoch in range(epochs - e_ago - 1, epochs):
        assert torch.equal(saf.bank[epoch % (e_ago + 1)], table[epoch])


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
def test_repeated_indices_last_occurrence_writes(device, backend):
    n, c = 7, 33
    saf = SAFLoss(n, c, start_epoch=0, epochs_ago=1, device=device, backend=backend)
    idx = torch.tensor([2, 5, 2, 6, 2, 5], device=device)
    logits = torch.randn(6, c, device=device, requires_grad=True)
    saf(logits, idx, 1).backward()
    assert torch.equal(saf.bank[1, 2], logits.detach()[4])
    assert torch.equal(saf.bank[1, 5], logits.detach()[5])
    assert torch.equal(saf.bank[1, 6], logits.detach()[3])
    assert torch.equal(saf.bank[1, [0, 1, 3, 4]], torch.zeros(4, c, device=device))


def test_backends_agree_with_each_other():
    """The kernels against the torch backend over a few epochs (banks bit-equal, values to fp32 rounding)."""
    n, c = 20, 29
    mods = {b: SAFLoss(n, c, start_epoch=0, epochs_ago=1, backend=b) for d, b in SAF_BACKENDS if d == "cpu"}
    for epoch in range(3):
        logits = torch.randn(8, c) * 3
        idx = torch.randint(0, n, (8,))
        vals = {}
        for b, m in mods.items():
            x = logits.clone().requires_grad_(True)
            v = m(x, idx, epoch)
            if v.requires_grad:
                v.backward()
            vals[b] = (v.detach(), x.grad)
        for b, m in mods.items():
            assert torch.equal(m.bank, mods["torch"].bank), b
            torch.testing.assert_close(vals[b][0], vals["torch"][0], rtol=2e-6, atol=2e-6)
            if vals[b][1] is not None:
                torch.testing.assert_close(vals[b][1], vals["torch"][1], rtol=1e-4, atol=1e-7)


def test_auto_picks_the_cpu_kernel():
    if "cpu" not in _backend.available_backends("cpu"):
        pytest.skip("no cpu backend built")
    assert _backend.resolve("auto", "cpu", torch.float32, op="saf") == "cpu"
    assert _backend.resolve("auto", "cpu", torch.bfloat16, op="saf") == "cpu"


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
def test_state_dict_round_trip(device, backend):
    n, c = 12, 7
    a = SAFLoss(n, c, start_epoch=0, epochs_ago=2, bank_dtype=torch.bfloat16, device=device, backend=backend)
    for epoch in range(3):
        a(torch.randn(n, c, device=device), torch.arange(n, device=device), epoch)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = SAFLoss(n, c, start_epoch=0, epochs_ago=2, bank_dtype=torch.bfloat16, device=device, backend=backend)
    b.load_state_dict(torch.load(buf))
    assert list(a.state_dict()) == ["bank"] and torch.equal(a.bank, b.bank)
    logits = torch.randn(n, c, device=device)
    idx = torch.arange(n, device=device)
    assert torch.equal(a(logits, idx, 3), b(logits, idx, 3))
    assert torch.equal(a.bank, b.bank)
    with pytest.raises(RuntimeError):  # another bank shape
        SAFLoss(n, c, epochs_ago=1, device=device).load_state_dict(a.state_dict())


@pytest.mark.parametrize("device,backend", SAF_BACKENDS, ids=IDS)
def test_bad_inputs_raise_before_anything_changes(device, backend):
    n, c = 6, 4
    saf = SAFLoss(n, c, start_epoch=0, device=device, backend=backend)
    saf.bank.normal_()
    before = saf.bank.clone()
    x = torch.randn(3, c, device=device)
    ok = torch.tensor([0, 1, 2], device=device)
    cases = [
        (ValueError, "indices must be in", (x, torch.tensor([0, 6, 1], device=device), 3)),
        (ValueError, "indices must be in", (x, torch.tensor([0, -1, 1], device=device), 3)),
        (TypeError, "indices must be int64", (x, ok.float(), 3)),
        (TypeError, "indices must be int64", (x, ok.bool(), 3)),
        (ValueError, "indices must have shape", (x, ok[:2], 3)),
        (ValueError, "indices must have shape", (x, ok.view(3, 1), 3)),
        (ValueError, "bank's device", (x, ok.to("meta"), 3)),
        (ValueError, "bank's device", (x.to("meta"), ok, 3)),
        (ValueError, "logits must have shape", (torch.randn(3, c + 1, device=device), ok, 3)),
        (ValueError, "logits must have shape", (torch.randn(3, device=device), ok, 3)),
        (TypeError, "logits must be fp32", (x.to(torch.int32), ok, 3)),
        (TypeError, "indices must be a tensor", (x, [0, 1, 2], 3)),
        (ValueError, "epoch must be >= 0", (x, ok, -1)),
        (TypeError, "epoch must be an integer", (x, ok, 1.0)),
    ]
    for exc, msg, args in cases:
        with pytest.raises(exc, match=msg):
            saf(*args)
        assert torch.equal(saf.bank, before), msg
    # int32 indices are taken
    saf(x, ok.int(), 3)
    assert torch.equal(saf.bank[3 % 3, :3], x)


def test_bad_constructor_arguments():
    for kw, exc in [(dict(temperature=0.0), ValueError), (dict(temperature=float("nan")), ValueError),
                    (dict(weight=-1.0), ValueError), (dict(weight="1"), TypeError), (dict(epochs_ago=0), ValueError),
                    (dict(epochs_ago=1.5), TypeError), (dict(start_epoch=-2), ValueError),
                    (dict(bank_dtype=torch.int32), TypeError), (dict(backend="gpu"), ValueError)]:
        with pytest.raises(exc):
            SAFLoss(4, 3, **kw)
    with pytest.raises(ValueError, match="num_classes"):
        SAFLoss(4, 0)
    with pytest.raises(TypeError, match="num_examples"):
        SAFLoss(4.0, 3)


def test_native_entry_checks_again():
    """The C++ entry point refuses an index out of range and equal read/write slots on its own (the
    wrapper's checks are the first line; these are the second)."""
    if "cpu" not in _backend.available_backends("cpu"):
        pytest.skip("no cpu backend built")
    native = _backend.native()
    logits, bank, row_kl = torch.randn(2, 3), torch.zeros(2, 4, 3), torch.zeros(2)
    for idx, read, write in ((torch.tensor([0, 4]), 0, 1), (torch.tensor([0, -1]), 0, 1), (torch.tensor([0, 1]), 1, 1)):
        with pytest.raises(ValueError):
            native.saf_cpu(logits.data_ptr(), 0, idx.data_ptr(), bank.data_ptr(), 0, row_kl.data_ptr(), 0,
                           2, 4, 3, 2, read, write, True, 1.0, 1.0, 0, 1.0)
    assert not bank.any()
    with pytest.raises(ValueError, match="slots"):  # the Python kernel wrapper
        saf_mod.saf_pass(logits, torch.tensor([0, 1]), bank, row_kl, torch.zeros(0), 1, 1, True, 1.0, 1.0, "cpu")


def _mlp_run(use_saf, epochs=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    n, d, k = 256, 16, 5
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(1)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, 64), torch.nn.ReLU(), torch.nn.Linear(64, k))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    saf = SAFLoss(n, k, start_epoch=1, epochs_ago=1) if use_saf else None
    ce_per_epoch, saf_terms = [], []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        total = 0.0
        for b in range(0, n, 32):
            idx = perm[b:b + 32]
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx])
            total += float(loss.detach()) * len(idx)
            if saf is not None:
                term = saf(logits, idx, epoch)
                saf_terms.append(float(term.detach()))
                loss = loss + term
            opt.zero_grad()
            loss.backward()
            opt.step()
        ce_per_epoch.append(total / n)
    return ce_per_epoch, saf_terms, model


def test_training_with_saf_decreases_the_loss_like_plain_training():
    plain, _, m_plain = _mlp_run(False)
    with_saf, terms, m_saf = _mlp_run(True)
    # both learn: the cross-entropy falls to under 40 % of the first epoch's
    assert plain[-1] < 0.4 * plain[0] and with_saf[-1] < 0.4 * with_saf[0], (plain, with_saf)
    # and SAF's curve follows plain training's (same data, init and order)
    assert abs(with_saf[-1] - plain[-1]) < 0.25 * plain[0], (plain, with_saf)
    # the term was on from epoch 2 (0 before) and changed the training
    per_epoch = len(terms) // 8
    assert all(t == 0.0 for t in terms[:2 * per_epoch]) and all(t > 0.0 for t in terms[2 * per_epoch:])
    assert not torch.equal(m_plain[0].weight, m_saf[0].weight)


def test_under_torch_compile():
    """A compiled step (the custom op fastopt::saf_pass_ in the graph) gives the eager torch backend's numbers."""
    if "cpu" not in _backend.available_backends("cpu"):
        pytest.skip("no cpu backend built")
    saf = SAFLoss(30, 7, start_epoch=0, epochs_ago=1, backend="cpu")
    ref = SAFLoss(30, 7, start_epoch=0, epochs_ago=1, backend="torch")
    torch._dynamo.reset()

    def term(logits, idx, epoch, m):
        return m(logits, idx, epoch) * 2.0

    compiled = torch.compile(term)
    for epoch in range(2):  # off (a bank write), then on
        logits = torch.randn(6, 7)
        idx = torch.randperm(30)[:6]
        a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
        va, vb = compiled(a, idx, epoch, saf), term(b, idx, epoch, ref)
        torch.testing.assert_close(va.detach(), vb.detach(), rtol=2e-6, atol=2e-6)
        assert torch.equal(saf.bank, ref.bank)
        if vb.requires_grad:
            va.backward()
            vb.backward()
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("device,backend", [p for p in SAF_BACKENDS if p[1] != "torch"],
                         ids=[i for p, i in zip(SAF_BACKENDS, IDS) if p[1] != "torch"])
def test_checked_entry_point(device, backend):
    """fastopt.sharpness.saf.saf_pass (the custom op) checks every tensor before its kernel runs."""
    b, n, c = 4, 6, 9
    logits = torch.randn(b, c, device=device)
    bank = torch.randn(2, n, c, device=device)
    before = bank.clone()
    row_kl, grad = torch.zeros(b, device=device), torch.zeros(b, c, device=device)
    idx = torch.tensor([5, 0, 2, 0], device=device)
    bad = [
        (dict(indices=torch.tensor([5, 0, 6, 0], device=device)), "indices must be in"),
        (dict(indices=idx.int()), "int64"),
        (dict(indices=idx[:3]), "do not agree"),
        (dict(logits=logits.t().contiguous().t()), "contiguous"),
        (dict(logits=logits.double()), "float64"),
        (dict(row_kl=torch.zeros(b - 1, device=device)), "row_kl"),
        (dict(grad=torch.zeros(b, c - 1, device=device)), "grad"),
        (dict(bank=bank.to(torch.int32)), "bank"),
    ]
    for override, msg in bad:
        args = dict(logits=logits, indices=idx, bank=bank, row_kl=row_kl, grad=grad)
        args.update(override)
        with pytest.raises(ValueError, match=msg):
            saf_mod.saf_pass(args["logits"], args["indices"], args["bank"], args["row_kl"], args["grad"], 0, 1, True,
                             0.5, 1.0, backend)
        assert torch.equal(bank, before), msg
    saf_mod.saf_pass(logits, idx, bank, row_kl, grad, 0, 1, True, 0.5, 1.0, backend)
    want, want_g = official_and_grad(logits, before[0, idx], 2.0, 1.0)  # T = 2, weight 1: T^2 mean / T B
    torch.testing.assert_close(row_kl.double().mean() * 4.0, want, rtol=2e-6, atol=2e-6)
    # grad_scale 1: grad = q - p, and d(T^2 mean KL)/dz = T / B (q - p)
    torch.testing.assert_close(grad.double(), want_g * b / 2.0, rtol=1e-4, atol=1e-7)
    assert torch.equal(bank[1, [2, 0, 5]], logits[[2, 3, 0]])
