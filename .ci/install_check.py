"""What a user gets from `pip install fastopt-*.whl`: run by .ci/wheel with a fresh virtual
environment's python, from a folder outside the source tree.  Exits non-zero on the first failure.

  * fastopt is the installed copy (site-packages), with its native module and every subpackage;
  * every public module imports (fastopt.triton_kernels when triton is installed);
  * each optimizer family steps once on the cpu backend (elementwise, reduce-pass, low-bit states,
    int8 weights, N:M sparse training, Muon on its torch backend, GaLore's projected step, SGD / Adagrad /
    RMSprop, M-FAC's window passes, AdaHessian's probes and update, SAM's two steps) and changes the
    parameters; SAFLoss runs its fused kernel;
  * one Sinkhorn solve agrees with the torch reference, one N:M mask is N:M.
"""
import importlib
import os
import pkgutil
import sys
import sysconfig

import torch
from torch import nn

import fastopt
from fastopt import _backend

here = os.path.realpath(os.path.dirname(fastopt.__file__))
site = os.path.realpath(sysconfig.get_paths()["purelib"])
platsite = os.path.realpath(sysconfig.get_paths()["platlib"])
assert here.startswith((site, platsite)), f"fastopt was imported from {here}, not the installed package ({site})"
info = _backend.build_info()
assert info["native_module"], f"fastopt._C does not import: {info['native_error']}"
print(f"fastopt {fastopt.__version__} from {here}; cpu kernels: {info['cpu_isa']}; "
      f"CUDA kernels built: {info['cuda_kernels_built']}")
if os.environ.get("FASTOPT_EXPECT_CUDA") == "1":
    assert info["cuda_kernels_built"], "nvcc was present at build time, but the wheel has no CUDA kernels"

# every module of the package
have_triton = importlib.util.find_spec("triton") is not None
modules = []
for mod in pkgutil.walk_packages(fastopt.__path__, "fastopt."):
    if (mod.name.startswith("fastopt.triton_kernels") and not have_triton) or mod.name.endswith(".__main__"):
        continue   # (a __main__ module runs its command when imported: `python -m fastopt.bench` is the report)
    importlib.import_module(mod.name)
    modules.append(mod.name)
for sub in ("optim", "lowbit", "sparse", "lowrank", "ot", "sharpness", "reference", "bench", "triton_kernels"):
    assert f"fastopt.{sub}" in modules or (sub == "triton_kernels" and not have_triton), f"fastopt.{sub} missing"
wheel_files = {os.path.relpath(os.path.join(d, f), here) for d, _, fs in os.walk(here) for f in fs}
assert "py.typed" in wheel_files, "fastopt/py.typed is not installed"
kernels = sorted(f for f in wheel_files if f.startswith("triton_kernels" + os.sep) and f.endswith(".py"))
assert len(kernels) >= 10, f"the Triton kernels are not in the installed package: {kernels}"
print(f"imported {len(modules)} modules (triton installed: {have_triton}); {len(kernels)} Triton kernel files")


def model(dtype=torch.float32, int8=False):
    torch.manual_seed(0)
    first = nn.Linear(64, 128)
    first = fastopt.lowbit.Int8Linear.from_linear(first) if int8 else first
    return nn.Sequential(first, nn.ReLU(), nn.Linear(128, 64)).to(dtype)


nm = fastopt.sparse.NMSparsity(2, 4)
families = {
    "AdamW (multi-tensor Adam)": (model(), lambda m: fastopt.AdamW(m.parameters(), lr=1e-2, backend="cpu")),
    "Lion (elementwise)": (model(), lambda m: fastopt.Lion(m.parameters(), lr=1e-3, backend="cpu")),
    "Adan/AdaBelief/DiffGrad/EXAdam (zoo)": (model(), lambda m: fastopt.Adan(m.parameters(), backend="cpu")),
    "Lamb (reduce pass)": (model(), lambda m: fastopt.Lamb(m.parameters(), lr=1e-2, backend="cpu")),
    "AdamP (reduce pass)": (model(), lambda m: fastopt.AdamP(m.parameters(), lr=1e-2, backend="cpu")),
    "SGDSaI (reduce pass)": (model(), lambda m: fastopt.SGDSaI(m.parameters(), lr=1e-2, backend="cpu")),
    "AdamW8bit (low-bit states)": (model(), lambda m: fastopt.lowbit.AdamW8bit(m.parameters(), backend="cpu")),
    "Lion bf16 master weights": (model(torch.bfloat16), lambda m: fastopt.Lion(
        m.parameters(), lr=1e-3, master_weights=True, backend="cpu")),
    "Lion int8 weights": (model(int8=True), lambda m: fastopt.Lion(m.parameters(), lr=1e-2, backend="cpu")),
    "Lion N:M sparse": (model(), lambda m: fastopt.Lion(fastopt.sparse.nm_param_groups(m, nm), lr=1e-3,
                                                        backend="cpu")),
    "Muon": (model(), lambda m: fastopt.Muon(m.parameters(), lr=1e-2)),
    "GaLoreAdamW (low-rank projection)": (model(), lambda m: fastopt.lowrank.GaLoreAdamW(
        [{"params": [p for p in m.parameters() if p.dim() != 2]},
         {"params": [p for p in m.parameters() if p.dim() == 2], "rank": 8, "proj_bits": 4, "proj_group_size": 64}],
        lr=1e-2, backend="cpu")),
    "SGD (torch.optim drop-in, momentum)": (model(), lambda m: fastopt.SGD(m.parameters(), lr=1e-2, momentum=0.9,
                                                                           backend="cpu")),
    "Adagrad": (model(), lambda m: fastopt.Adagrad(m.parameters(), lr=1e-2, backend="cpu")),
    "RMSprop (centered, momentum)": (model(), lambda m: fastopt.RMSprop(m.parameters(), lr=1e-3, momentum=0.9,
                                                                         centered=True, backend="cpu")),
    "RMSprop8bit (low-bit states)": (model(), lambda m: fastopt.lowbit.RMSprop8bit(m.parameters(), lr=1e-3,
                                                                                   backend="cpu")),
    "MFAC (dense M-FAC window)": (model(), lambda m: fastopt.MFAC(m.parameters(), lr=1e-2, ngrads=4, backend="cpu")),
}
for name, (m, make) in families.items():
    opt = make(m)
    before = [p.detach().clone() for p in m.parameters()]
    x = torch.randn(8, 64, dtype=next(p for p in m.parameters() if p.is_floating_point()).dtype)
    m(x).float().square().mean().backward()
    opt.step()
    changed = [not torch.equal(a, p) for a, p in zip(before, m.parameters())]
    moved = sum(changed)
    assert changed[0] and moved > 0, f"{name}: one step left the first layer's weight unchanged"
    print(f"step ok: {name} ({moved} tensors changed)")

# AdaHessian: the Hutchinson probes need the double backward (create_graph=True)
m = model()
opt = fastopt.AdaHessian(m.parameters(), lr=1e-2, backend="cpu")
before = [p.detach().clone() for p in m.parameters()]
m(torch.randn(8, 64)).tanh().square().mean().backward(create_graph=True)
opt.step()
assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters())), "AdaHessian: a parameter did not move"
print("step ok: AdaHessian (Hutchinson probes + fused update)")

# SAM: first_step moves the weights, second_step restores them and steps the base optimizer
m = model()
opt = fastopt.SAM(m.parameters(), fastopt.AdamW, rho=0.05, lr=1e-2, backend="cpu")
x = torch.randn(8, 64)
before = [p.detach().clone() for p in m.parameters()]
m(x).square().mean().backward()
opt.first_step(zero_grad=True)
assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters())), "SAM: first_step did not perturb"
m(x).square().mean().backward()
opt.second_step(zero_grad=True)
assert all(not torch.equal(a, p) for a, p in zip(before, m.parameters())), "SAM: second_step did not step"
print("step ok: SAM (fused ascent, restore, base step)")

# SAFLoss: the fused gather / softmax-KL / scatter kernel against its torch reference
logits, idx = torch.randn(6, 10, requires_grad=True), torch.tensor([0, 3, 5, 7, 8, 9])
saf = {b: fastopt.sharpness.SAFLoss(10, 10, start_epoch=0, epochs_ago=1, backend=b) for b in ("cpu", "torch")}
for b in saf.values():
    b(torch.randn(6, 10, generator=torch.Generator().manual_seed(1)), idx, 0)  # epoch 0 fills the bank
vals = {b: s(logits, idx, 1).detach() for b, s in saf.items()}
assert float(vals["torch"]) > 0 and torch.allclose(vals["cpu"], vals["torch"], rtol=1e-5, atol=1e-7), vals
print(f"SAFLoss ok: {float(vals['cpu']):.6f} (torch reference {float(vals['torch']):.6f})")

x, y = torch.randn(40, 3), torch.randn(50, 3)
got = fastopt.ot.sinkhorn(x, y, eps=0.5, backend="cpu")
ref = fastopt.ot.sinkhorn(x, y, eps=0.5, backend="torch")
cost, ref = got.value, ref.value
assert bool(got.converged) and torch.allclose(cost, ref, rtol=1e-4, atol=1e-6), (cost, ref)
print(f"sinkhorn ok: {float(cost):.6f} (torch reference {float(ref):.6f})")
# issue 21's OT: semi-relaxed Sinkhorn, entropic partial OT, the Monge gap, the symmetric divergence and
# LightSB's fused pass, each on the wheel's C++ kernels against the torch reference
for name, run in (
        ("semi-relaxed sinkhorn", lambda b: fastopt.ot.sinkhorn(x, y, eps=0.5, rho=(float("inf"), 1.0), backend=b).value),
        ("partial_wasserstein", lambda b: fastopt.ot.partial_wasserstein(x, y, mass=0.5, eps=0.5, backend=b).value),
        ("monge_gap", lambda b: fastopt.ot.monge_gap(x, x + 0.1, eps=0.5, backend=b)),
        ("sinkhorn_divergence", lambda b: fastopt.ot.sinkhorn_divergence(x, y, eps=0.5, backend=b))):
    got, ref = run("cpu"), run("torch")
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-5), (name, got, ref)
    print(f"{name} ok: {float(got):.6f} (torch reference {float(ref):.6f})")
torch.manual_seed(0)
sb = fastopt.ot.LightSB(dim=3, n_potentials=5, epsilon=0.5, backend="cpu")
sb_ref = fastopt.ot.LightSB(dim=3, n_potentials=5, epsilon=0.5, backend="torch")
sb_ref.load_state_dict(sb.state_dict())
got, ref = sb.loss(x, y), sb_ref.loss(x, y)
assert torch.allclose(got, ref, rtol=1e-5, atol=1e-6), (got, ref)
print(f"LightSB ok: loss {float(got.detach()):.6f} (torch reference {float(ref.detach()):.6f})")
w = torch.randn(16, 32)
mask = fastopt.sparse.nm_mask(w, 2, 4, backend="cpu")
assert fastopt.sparse.is_nm_sparse(w * mask, 2, 4) and int(mask.sum()) == 16 * 32 // 2
print("nm_mask ok")
# WTA-CRS (fastopt.nn.WTACRSLinear): the wheel's C++ row pass against the torch reference, same seed
xw, gw = torch.randn(4, 30, 16), torch.randn(4, 30, 8)
wgrads = {}
for b in ("cpu", "torch"):
    torch.manual_seed(0)
    layer = fastopt.nn.WTACRSLinear(16, 8, seed=0, backend=b)
    layer(xw).backward(gw)
    wgrads[b] = layer.weight.grad
assert torch.allclose(wgrads["cpu"], wgrads["torch"], rtol=1e-5, atol=1e-5), wgrads
print("WTACRSLinear ok")
# issue 22: the unstructured prune epilogue (RandomSparsity's hash mask in the kernel) against the torch
# backend, magnitude masks against torch.nn.utils.prune, the top-k hook's fused compress against its reference
from torch.nn.utils import prune  # noqa: E402

from fastopt.lowbit import ElementwiseAdamW  # noqa: E402

steps = {}
for b in ("cpu", "torch"):
    ps = [torch.nn.Parameter(torch.linspace(-1, 1, 600).view(20, 30) + i) for i in range(2)]
    opt = ElementwiseAdamW([{"params": ps, "sparsity": fastopt.sparse.RandomSparsity(0.25, seed=3)}], lr=1e-2,
                           backend=b)
    for p in ps:
        p.grad = torch.cos(p.detach())
    opt.step()
    steps[b] = [p.detach().clone() for p in ps] + [opt.state[p]["exp_avg"] for p in ps]
for got, want in zip(steps["cpu"], steps["torch"]):
    assert torch.equal(got == 0, want == 0) and torch.allclose(got, want, rtol=1e-6, atol=1e-7), (got, want)
kept = float((steps["cpu"][0] != 0).float().mean())
assert 0.1 < kept < 0.4, kept
print(f"RandomSparsity step ok (kept {kept:.3f} of 0.25)")
w = torch.randn(64, 48, generator=torch.Generator().manual_seed(5))
lin = torch.nn.Linear(48, 64, bias=False)
lin.weight.data.copy_(w)
prune.l1_unstructured(lin, "weight", amount=0.7)
assert torch.equal(fastopt.sparse.magnitude_masks([w], 0.3, backend="cpu")[0], lin.weight_mask.bool())
print("magnitude_masks ok (= torch.nn.utils.prune.l1_unstructured)")
from fastopt.comm import _kernels as comm_kernels  # noqa: E402

xg = torch.randn(1000, generator=torch.Generator().manual_seed(6))
outs = {}
for native in (True, False):
    g, e = xg.clone(), torch.full((1000,), 0.01)
    vals, idx = torch.empty(37), torch.empty(37, dtype=torch.int32)
    comm_kernels.topk_compress(g, e, 37, vals, idx, native=native)
    outs[native] = (vals, idx, e)
assert all(torch.equal(a, b) for a, b in zip(outs[True], outs[False]))
print("comm top-k compress ok (kernel = reference)")
print("install check passed")
sys.exit(0)
