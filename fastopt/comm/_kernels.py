"""The tensor boundary of fastopt.comm's fused passes: validation, then csrc/cpu/comm.cpp (fp32 CPU tensors,
fastopt._C built) or the torch reference (fastopt/reference/comm.py: CUDA tensors, other dtypes, no _C).

Every function here checks dtypes, devices, contiguity and sizes before a raw address reaches native code.
"""
import functools
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .. import _backend
from ..reference import comm as ref

BACKENDS = ("auto", "cpu", "torch")


@functools.lru_cache(maxsize=None)
def _native_or_none():
    if not _backend.has_cpu():
        return None
    mod = _backend.native()
    return mod if hasattr(mod, "comm_topk_compress") else None


def check_backend(owner: str, backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"{owner}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "cpu" and _native_or_none() is None:
        raise _backend.BackendUnavailableError(
            f"{owner}: backend='cpu' needs fastopt._C with the comm kernels ({_backend.BUILD_HINT})")
    return backend


def use_native(backend: str, *tensors: Optional[Tensor]) -> bool:
    """Whether the fused CPU kernels run these tensors (all fp32, on the CPU, contiguous)."""
    if backend == "torch" or _native_or_none() is None:
        return False
    ok = all(t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())
             for t in tensors)
    if backend == "cpu" and not ok:
        raise ValueError("fastopt.comm: backend='cpu' runs contiguous fp32 CPU tensors only")
    return ok


def _check(op, name, t, dtype, numel=None):
    if t.dtype != dtype:
        raise ValueError(f"fastopt.comm.{op}: {name} must be {dtype}, got {t.dtype}")
    if t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"fastopt.comm.{op}: {name} must be a contiguous CPU tensor")
    if numel is not None and t.numel() < numel:
        raise ValueError(f"fastopt.comm.{op}: {name} has {t.numel()} elements, needs {numel}")


def _segs_ok(op, segs, n):
    for o, m in segs:
        if o < 0 or m < 0 or o + m > n:
            raise ValueError(f"fastopt.comm.{op}: segment ({o}, {m}) outside a buffer of {n} elements")


# ----------------------------------------------------------------------------------------------- PowerSGD
def psgd_pre(x: Tensor, e: Optional[Tensor], segs: Sequence[Tuple[int, int]], native: bool) -> Tensor:
    """x += e, e = x (e None: skipped); returns the segments of x concatenated (see the reference)."""
    if not native:
        return ref.psgd_pre(x, e, segs)
    n = x.numel()
    _check("psgd_pre", "x", x, torch.float32)
    if e is not None:
        _check("psgd_pre", "e", e, torch.float32, n)
    _segs_ok("psgd_pre", segs, n)
    mem = torch.empty(sum(m for _, m in segs), dtype=x.dtype)
    _native_or_none().comm_psgd_pre(x.data_ptr(), 0 if e is None else e.data_ptr(), n, mem.data_ptr(),
                                    [o for o, _ in segs], [m for _, m in segs])
    return mem


def psgd_scatter(x: Tensor, mem: Tensor, segs, world: int, native: bool) -> None:
    if not native:
        return ref.psgd_scatter(x, mem, segs, world)
    _check("psgd_scatter", "x", x, torch.float32)
    _check("psgd_scatter", "mem", mem, torch.float32, sum(m for _, m in segs))
    _segs_ok("psgd_scatter", segs, x.numel())
    _native_or_none().comm_psgd_scatter(x.data_ptr(), mem.data_ptr(), [o for o, _ in segs],
                                        [m for _, m in segs], float(world))


def psgd_error(x: Tensor, e: Tensor, native: bool) -> None:
    if not native:
        return ref.psgd_error(x, e)
    _check("psgd_error", "x", x, torch.float32)
    _check("psgd_error", "e", e, torch.float32, x.numel())
    _native_or_none().comm_psgd_error(x.data_ptr(), e.data_ptr(), x.numel())


# ----------------------------------------------------------------------------------------------- top-k
def topk_compress(g: Tensor, e: Optional[Tensor], k: int, vals: Tensor, idx: Tensor, native: bool,
                  phase: int = 3) -> None:
    """See fastopt.reference.comm.topk_compress (g flat fp32; vals fp32 and idx int32 of k elements)."""
    n = g.numel()
    if not 0 <= k <= n or n >= 2 ** 31:
        raise ValueError(f"fastopt.comm.topk_compress: need 0 <= k <= n < 2^31, got k={k}, n={n}")
    if not native:
        return ref.topk_compress(g, e, k, vals, idx, phase=phase)
    _check("topk_compress", "g", g, torch.float32)
    if e is not None:
        _check("topk_compress", "e", e, torch.float32, n)
    _check("topk_compress", "vals", vals, torch.float32, k)
    _check("topk_compress", "idx", idx, torch.int32, k)
    _native_or_none().comm_topk_compress(g.data_ptr(), 0 if e is None else e.data_ptr(), n, k, vals.data_ptr(),
                                         idx.data_ptr(), phase, True)


def topk_decompress(out: Tensor, gathered: Tensor, koff: int, k: int, K: int, world: int, native: bool) -> None:
    """out (zeroed by topk_compress) = the average of the ranks' sparse messages.  ``gathered`` is the
    all-gathered fp32 buffer (world, 2K): per rank K values then K int32 indices (bit views); this tensor's
    are at [koff, koff + k)."""
    n = out.numel()
    if gathered.shape != (world, 2 * K) or not 0 <= koff <= koff + k <= K:
        raise ValueError("fastopt.comm.topk_decompress: the gathered buffer does not fit the message")
    if not native:
        vals = gathered[:, koff:koff + k]
        idx = gathered[:, K + koff:K + koff + k].contiguous().view(torch.int32)
        if idx.numel() and (idx.min() < 0 or idx.max() >= n):
            raise ValueError("fastopt.comm.topk_decompress: an index is out of range")
        return ref.topk_decompress(out, vals, idx, world)
    _check("topk_decompress", "out", out, torch.float32)
    _check("topk_decompress", "gathered", gathered, torch.float32)
    base = gathered.data_ptr()
    _native_or_none().comm_topk_decompress(out.data_ptr(), n, base + 4 * koff, base + 4 * (K + koff), k, 2 * K,
                                           world)


# ----------------------------------------------------------------------------------------------- QSGD
def qsgd_compress(g: Tensor, e: Optional[Tensor], chunk: int, bits: int, key: int, msg: Tensor, native: bool,
                  phase: int = 3) -> None:
    """See fastopt.reference.comm.qsgd_compress; ``msg`` is this tensor's uint8 message (qsgd_layout bytes)."""
    n = g.numel()
    no, mo, so, total = ref.qsgd_layout(n, chunk, bits)
    if msg.dtype != torch.uint8 or msg.numel() < total or not msg.is_contiguous():
        raise ValueError(f"fastopt.comm.qsgd_compress: msg must be contiguous uint8 of >= {total} bytes")
    if not native:
        ref.qsgd_compress(g, e, chunk, bits, key, msg, phase=phase)
        return
    _check("qsgd_compress", "g", g, torch.float32)
    if e is not None:
        _check("qsgd_compress", "e", e, torch.float32, n)
    _check("qsgd_compress", "msg", msg, torch.uint8, total)
    b = msg.data_ptr()
    if b % 4:
        raise ValueError("fastopt.comm.qsgd_compress: msg must be 4-byte aligned")
    _native_or_none().comm_qsgd_compress(g.data_ptr(), 0 if e is None else e.data_ptr(), n, chunk, bits,
                                         key & 0xFFFFFFFF, b + no, b + mo, b + so, phase, e is not None)


def qsgd_decompress(out: Tensor, gathered: Tensor, off: int, chunk: int, bits: int, world: int,
                    native: bool) -> None:
    """out = the average of the ranks' messages of this tensor; ``gathered`` (world, T) uint8, this tensor's
    message at bytes [off, off + qsgd_layout(...)[3])."""
    n = out.numel()
    no, mo, so, total = ref.qsgd_layout(n, chunk, bits)
    if gathered.dim() != 2 or gathered.shape[0] != world or not 0 <= off <= off + total <= gathered.shape[1]:
        raise ValueError("fastopt.comm.qsgd_decompress: the gathered buffer does not fit the message")
    if not native:
        return ref.qsgd_decompress(out, [gathered[r, off:off + total] for r in range(world)], chunk, bits, world)
    _check("qsgd_decompress", "out", out, torch.float32)
    _check("qsgd_decompress", "gathered", gathered, torch.uint8)
    if (gathered.data_ptr() + off) % 4 or gathered.shape[1] % 4:
        raise ValueError("fastopt.comm.qsgd_decompress: messages must be 4-byte aligned")
    _native_or_none().comm_qsgd_decompress(out.data_ptr(), n, chunk, bits, gathered.data_ptr() + off,
                                           gathered.shape[1], no, mo, so, world)
