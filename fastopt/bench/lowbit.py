"""The low-bit AdamW suite (``lowbit-adamw``): one ``opt.step()`` of AdamW with 8-bit, 4-bit and fp8
states -- fastopt's kernel backends beside torchao's ``AdamW8bit`` / ``AdamW4bit`` / ``AdamWFp8``,
bitsandbytes' ``AdamW8bit`` and torch's fused fp32 ``AdamW``, in the same run -- and the optimizer
state's memory per parameter.

Configs hold tensors of 2**20 elements (20 x 2**20 on CPU, 16 x 2**24 on CUDA): a block multiple, so
every library quantizes every tensor (torchao and fastopt keep full-precision states for tensors that
are not block multiples; a 1,000,000-element tensor is not).

Bytes moved per parameter (the ideal fused kernel's traffic): fp32 param read + write, grad read, and
the states' codes read + write -- 8-bit: 4 + 4 + 4 + 2 * 2 = 16 bytes (absmax adds 2 * 2 * 4 / 256);
4-bit: 14 bytes; torch fp32 AdamW: 28 bytes.  Bars: on CPU fastopt's 8-bit AdamW >= 3x
torchao AdamW8bit and >= 1.0x torch fused fp32 AdamW; on CUDA >= 1.3x bitsandbytes AdamW8bit and
>= 1.4x torch fused fp32.
"""
import torch

from .adamw import Config, make_params
from .harness import Bar, Case, Suite, Unsupported, Workload, register

C_CPU = Config("20x1Mi", (1 << 20,) * 20)
C_CPU_SMALL = Config("4x64Ki", (1 << 16,) * 4)
C_CUDA = Config("256Mi", (1 << 24,) * 16)

FASTOPT_BITS = {"8bit": 8, "4bit": 4, "fp8": "fp8"}
OTHERS = ("torch-fused-fp32", "torchao-8bit", "torchao-4bit", "torchao-fp8", "bnb-8bit")
BYTES_PER_PARAM = {"8bit": 16, "4bit": 14, "fp8": 16, "fp32": 28}


def _nbytes(t):
    """Bytes of a state tensor, including torchao's quantized-state subclasses (codes + scales)."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(_nbytes(getattr(t, n)) for n in names)
    return t.nbytes


def state_bytes(opt):
    return sum(_nbytes(t) for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _methods(device):
    from fastopt._backend import available_backends

    ours = [f"fastopt-{b}-{bits}" for b in available_backends(device) if b != "torch" for bits in FASTOPT_BITS]
    return ours + list(OTHERS)


def make_optimizer(method, params, device):
    kw = dict(lr=1e-3, weight_decay=1e-2)
    if method.startswith("fastopt-"):
        from fastopt import lowbit
        from fastopt._backend import available_backends

        _, backend, bits = method.split("-")
        if backend not in available_backends(device) or (backend == "triton" and device.type == "cpu"):
            raise Unsupported(f"backend {backend!r} is not benchmarked on {device.type}")
        return lowbit.ElementwiseAdamW(params, backend=backend, state_bits=FASTOPT_BITS[bits], **kw)
    if method == "torch-fused-fp32":
        return torch.optim.AdamW(params, fused=True, **kw)
    if method.startswith("torchao-"):
        try:
            import torchao.optim as ao
        except ImportError as e:
            raise Unsupported(f"torchao is not installed: {e}") from e
        cls = {"8bit": ao.AdamW8bit, "4bit": ao.AdamW4bit, "fp8": ao.AdamWFp8}[method.split("-")[1]]
        return cls(params, **kw)
    if method == "bnb-8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as e:
            raise Unsupported(f"bitsandbytes is not installed: {e}") from e
        return bnb.optim.AdamW8bit(params, **kw)
    raise ValueError(method)


def _bytes(method, numel):
    kind = method.rsplit("-", 1)[-1]
    return BYTES_PER_PARAM.get(kind, 16) * numel


def configs(device, quick):
    if device.type == "cuda":
        return [C_CUDA] if not quick else [C_CPU_SMALL]
    return [C_CPU] if not quick else [C_CPU_SMALL]


def _cases(ctx):
    def setup(c, m):
        opt = make_optimizer(m, make_params(c, ctx.device), ctx.device)
        opt.step()  # the first step allocates states (and compiles torchao's step)
        return Workload(fn=opt.step, state_bytes=lambda: state_bytes(opt))

    return [Case(config=c.name, method=m, items=c.numel, bytes_moved=_bytes(m, c.numel),
                 setup=lambda c=c, m=m: setup(c, m),
                 info={"dtype": "float32", "tensors": len(c.sizes)})
            for c in configs(ctx.device, ctx.quick) for m in _methods(ctx.device)]


def _bars(ctx):
    if ctx.device.type == "cuda":
        return [Bar(C_CUDA.name, "fastopt-cuda-8bit", "speedup_vs_bnb_8bit", 1.3),
                Bar(C_CUDA.name, "fastopt-cuda-8bit", "speedup_vs_torch_fused_fp32", 1.4)]
    return [Bar(C_CPU.name, "fastopt-cpu-8bit", "speedup_vs_torchao_8bit", 3.0),
            Bar(C_CPU.name, "fastopt-cpu-8bit", "speedup_vs_torch_fused_fp32", 1.0)]


SUITE = register(Suite(name="lowbit-adamw", cases=_cases, unit="params", baseline="torch-fused-fp32", bars=_bars,
                       other_baselines=("torchao-8bit", "bnb-8bit"), what="one opt.step()"))
