"""What FSDP2's bit-for-bit results rest on, in one process: a kernel's result for an element does not
depend on where in its tensor the element sits (the CPU kernels are built with -ffp-contract=off: with
contraction, the vectorized body and the scalar tail of a loop rounded differently, and Lion fp32 moved
by one ulp when a tensor was cut in two).  A tensor stepped whole equals the same tensor stepped as two
pieces, for every elementwise optimizer, every cut (inside a vector, at a cache line, past a block)."""
import pytest
import torch

import fastopt

pytestmark = pytest.mark.skipif(not fastopt._backend.has_cpu(), reason="needs fastopt._C")

N = 203
CUTS = (1, 3, 7, 8, 17, 64, 100, 202)
OPTIMIZERS = {"AdamW": dict(weight_decay=0.1), "Adam": dict(amsgrad=True), "Lion": dict(weight_decay=0.1),
              "Adan": dict(weight_decay=0.02), "AdaBelief": dict(), "DiffGrad": dict(), "EXAdam": dict()}


def _run(name, kwargs, w0, grads, pieces):
    params = [torch.nn.Parameter(w.clone()) for w in w0.split(pieces)]
    opt = getattr(fastopt, name)(params, lr=1e-2, backend="cpu", **kwargs)
    for g in grads:
        for p, piece in zip(params, g.split(pieces)):
            p.grad = piece.clone()
        opt.step()
    return torch.cat([p.detach() for p in params])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_an_elements_update_does_not_depend_on_its_position(name, dtype):
    torch.manual_seed(0)
    w0 = torch.randn(N).to(dtype)
    grads = [torch.randn(N).to(dtype) for _ in range(3)]
    whole = _run(name, OPTIMIZERS[name], w0, grads, [N])
    for cut in CUTS:
        assert torch.equal(_run(name, OPTIMIZERS[name], w0, grads, [cut, N - cut]), whole), (name, dtype, cut)


def test_low_bit_pieces_of_whole_blocks_equal_the_whole():
    """8-bit states: pieces cut at block boundaries (256) hold the same blocks, so the same bits."""
    torch.manual_seed(0)
    w0 = torch.randn(4 * 256)
    grads = [torch.randn(4 * 256) for _ in range(3)]

    def run(pieces):
        params = [torch.nn.Parameter(w.clone()) for w in w0.split(pieces)]
        opt = fastopt.lowbit.AdamW8bit(params, lr=1e-2, min_quant_size=0, backend="cpu")
        for g in grads:
            for p, piece in zip(params, g.split(pieces)):
                p.grad = piece.clone()
            opt.step()
        return torch.cat([p.detach() for p in params])

    whole = run([1024])
    assert torch.equal(run([256, 768]), whole)
    assert torch.equal(run([512, 256, 256]), whole)
