"""The entropic-OT CPU passes' AVX-512 copy (csrc/cpu/ot_kernels.cpp compiled a third time, isa.h
use_avx512_ot) against the AVX2 copy (FASTOPT_CPU_ISA=avx2, run in a subprocess): every pass (the
log-sum-exp, the point gradient, the weighted soft-minimum) for points of dimension 1..5 (the
compile-time d = 1..4 kernels and the general one), both costs, fp32 and bf16 points, a dense cost
matrix, row counts that leave a partial block of columns, and a whole Sinkhorn solve.  The two copies
run the same formulas, so they agree to fp32 rounding."""
import json
import os
import subprocess
import sys

import pytest
import torch

from fastopt import _backend, _ops

_EPS = (0.02, 1.0, 300.0)


def _cases():
    """(name, tensor) for every pass and shape above, from a fixed seed."""
    g = torch.Generator().manual_seed(7)
    out = []
    for d in (1, 2, 3, 4, 5):
        for dtype in (torch.float32, torch.bfloat16):
            n, m = 37, 300 + d  # two blocks of 256 columns, the second partial
            x = torch.randn(2, n, d, generator=g).to(dtype)
            y = torch.randn(2, m, d, generator=g).to(dtype)
            w = torch.rand(2, m, generator=g) + 0.05
            w[:, 5] = 0.0  # a column without mass
            gpot = torch.randn(2, m, generator=g) * 0.3
            h = torch.randn(2, m, generator=g) * 0.5
            c = torch.randn(2, n, generator=g) * 0.1 - 3.0
            for cost in (0, 1):
                for eps in _EPS:
                    tag = f"d{d}-{str(dtype)[6:]}-c{cost}-e{eps}"
                    o = torch.empty(2, n)
                    _ops.ot_softmin(x, y, None, w, gpot, o, eps, cost, "cpu")
                    out.append(("softmin-" + tag, o))
                    o = torch.empty(2, n)
                    _ops.ot_pass(x, y, None, h, None, o, eps, cost, 0, "cpu")
                    out.append(("lse-" + tag, o))
                    o = torch.empty(2, n, d)
                    _ops.ot_pass(x, y, None, h, c, o, eps, cost, 1, "cpu")
                    out.append(("grad-" + tag, o))
    C = torch.rand(2, 45, 520, generator=g) * 4.0
    w = torch.rand(2, 520, generator=g)
    gpot = torch.randn(2, 520, generator=g)
    for eps in _EPS:
        o = torch.empty(2, 45)
        _ops.ot_softmin(None, None, C, w, gpot, o, eps, 0, "cpu")
        out.append((f"softmin-matrix-e{eps}", o))
        o = torch.empty(2, 45)
        _ops.ot_pass(None, None, C, gpot, None, o, eps, 0, 0, "cpu")
        out.append((f"lse-matrix-e{eps}", o))
    from fastopt.ot import sinkhorn
    x = torch.randn(300, 3, generator=g)
    y = torch.randn(280, 3, generator=g) + 0.5
    r = sinkhorn(x, y, eps=0.1, n_iter=50, tol=0.0, backend="cpu")
    out += [("sinkhorn-f", r.f), ("sinkhorn-g", r.g), ("sinkhorn-value", r.value.reshape(1))]
    return out


def _isa():
    return _backend.build_info()["cpu_isa"]


def test_avx512_and_avx2_ot_copies_agree(tmp_path):
    if os.environ.get("FASTOPT_CPU_ISA") == "avx2" or _isa() != "avx2+avx512-codecs":
        pytest.skip("needs a CPU with AVX-512 F/BW/DQ/VL (then the OT passes run their AVX-512 copy)")
    dump = tmp_path / "avx2.json"
    env = dict(os.environ, FASTOPT_CPU_ISA="avx2")
    code = ("import json, sys; sys.path.insert(0, %r); import test_ot_isa as t; "
            "json.dump({k: v.double().flatten().tolist() for k, v in t._cases()}, open(%r, 'w'))"
            % (os.path.dirname(__file__), str(dump)))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = json.load(open(dump))
    mine = _cases()
    assert sorted(ref) == sorted(k for k, _ in mine)
    differ = 0
    for name, v in mine:
        want = torch.tensor(ref[name], dtype=torch.float64).view(v.shape)
        got = v.double()
        assert torch.isfinite(got).all() == torch.isfinite(want).all(), name
        # rounding only: reductions in another lane order (16 lanes against 8); the |x - y| gradient sums
        # unit vectors of opposite signs, whose cancellation leaves an error relative to the largest output
        scale = 1e-4 if name.startswith("grad-") else 2e-5
        torch.testing.assert_close(got, want, rtol=2e-5, atol=scale * float(want.abs().max()) + 1e-30,
                                   equal_nan=True, msg=lambda s: f"{name}: {s}")
        differ += int(not torch.equal(got, want))
    # the subprocess really ran other code: some results differ in the last bits
    assert differ > 0, "the AVX-512 and AVX2 runs gave bit-identical results everywhere: was the copy used?"
