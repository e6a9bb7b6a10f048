"""Pure-PyTorch reference of fastopt.comm's fused passes (the spec of csrc/cpu/comm.cpp; also what runs on
CUDA tensors and wherever fastopt._C is missing).  Each function mutates its arguments exactly as the
kernel does and gives the same bits.

* PowerSGD's elementwise parts (the products and the orthogonalization are torch's in both paths):
  :func:`psgd_pre`, :func:`psgd_scatter`, :func:`psgd_error`.
* Top-k with error feedback: :func:`topk_compress`, :func:`topk_decompress`.
* QSGD stochastic quantization (Alistarh et al., 2017), packed: :func:`qsgd_compress`,
  :func:`qsgd_decompress`, :func:`qsgd_uniform` (the counter-based random stream), :func:`pack_bits`,
  :func:`unpack_bits`.
"""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF


def fmix32(h: int) -> int:
    """The murmur3 finalizer (csrc/include/fastopt/elementwise.h ``fmix32``) on a Python int."""
    h &= _M32
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & _M32
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & _M32
    h ^= h >> 16
    return h


def _fmix32_t(h: Tensor) -> Tensor:
    """fmix32 on an int64 tensor holding uint32 values."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def qsgd_key(seed: int, rank: int, tensor: int, step: int) -> int:
    """The 32-bit key of one (seed, rank, tensor, step) QSGD random stream: fastopt's ``sr_key`` with the
    seed mixed with the rank (every rank rounds independently)."""
    s = (seed & _M32) ^ fmix32(((rank & _M32) * 0x9E3779B1 + 0x632BE5AB) & _M32)
    return fmix32(s ^ fmix32(((tensor & _M32) * 0x27D4EB2F + (step & _M32) * 0x165667B1) & _M32))


def qsgd_uniform(key: int, n: int, device=None) -> Tensor:
    """u_i = (fmix32(i * 0x9E3779B1 ^ key) >> 8) * 2^-24 for i < n (fp32, in [0, 1))."""
    i = torch.arange(n, dtype=torch.int64, device=device)
    h = _fmix32_t(((i * 0x9E3779B1) & _M32) ^ key)
    return (h >> 8).to(torch.float32) * (1.0 / 16777216.0)


# ----------------------------------------------------------------------------------------------- PowerSGD
def psgd_pre(x: Tensor, e: Optional[Tensor], segs: Sequence[Tuple[int, int]]) -> Tensor:
    """x += e and e = x (the error-feedback add and torch's ``input_tensor_cp``; e None: skipped); returns
    the (offset, length) segments of x concatenated (torch's ``uncompressed_tensors_memory``)."""
    if e is not None:
        x.add_(e)
        e.copy_(x)
    if not segs:
        return torch.tensor([], device=x.device, dtype=x.dtype)
    return torch.cat([x[o:o + n] for o, n in segs])


def psgd_scatter(x: Tensor, mem: Tensor, segs: Sequence[Tuple[int, int]], world: int) -> None:
    """The segments of x = the all-reduced ``mem`` / world (torch: ``mem.div_(world)``, then copies)."""
    mem = mem / world
    k = 0
    for o, n in segs:
        x[o:o + n].copy_(mem[k:k + n])
        k += n


def psgd_error(x: Tensor, e: Tensor) -> None:
    """e = e - x (the new error: the copy before compression minus the decompressed bucket)."""
    e.sub_(x)


# ----------------------------------------------------------------------------------------------- top-k
def topk_select(x: Tensor, k: int) -> Tensor:
    """The int64 indices (ascending) of the k largest |x|, ties broken by the lower index."""
    keys = x.float().abs().view(torch.int32)  # |x|'s fp32 bits: ordered like |x| (NaN above inf)
    order = torch.sort(keys, descending=True, stable=True).indices[:k]
    return torch.sort(order).values


def topk_compress(g: Tensor, e: Optional[Tensor], k: int, vals: Tensor, idx: Tensor, zero_g: bool = True,
                  phase: int = 3) -> None:
    """x = g + e (into e; without error feedback x is g), vals/idx = the k largest |x| (idx int32, ascending),
    e = x - sent (0 where sent), g = 0 (the bucket then accumulates the decompression).
    phase 1: the add only; 2: the rest (x already in e); 3: both."""
    if phase & 1 and e is not None:
        e.copy_(g + e)
    if not phase & 2:
        return
    x = e if e is not None else g
    sel = topk_select(x, k)
    vals.copy_(x[sel])
    idx.copy_(sel.to(torch.int32))
    if e is not None:
        e[sel] = 0.0
    if zero_g:
        g.zero_()


def topk_decompress(out: Tensor, vals: Tensor, idx: Tensor, world: int) -> None:
    """out (zero) += every rank's (vals[r], idx[r]) in rank order, then out / world."""
    for r in range(world):
        out.index_add_(0, idx[r].long(), vals[r].to(out.dtype))
    out.div_(world)


# ----------------------------------------------------------------------------------------------- QSGD
def qsgd_layout(n: int, chunk: int, bits: int) -> Tuple[int, int, int, int]:
    """(norms offset, magnitudes offset, signs offset, total bytes padded to 4) of one tensor's packed QSGD
    message: fp32 chunk norms, ``bits``-bit magnitudes (LSB first), one sign bit per element."""
    chunks = -(-n // chunk)
    mags = 4 * chunks
    signs = mags + -(-n * bits // 8)
    total = signs + -(-n // 8)
    return 0, mags, signs, -(-total // 4) * 4


def pack_bits(codes: Tensor, bits: int) -> Tensor:
    """uint8 bytes of the ``bits``-bit codes (an int tensor), ``8 // bits`` per byte, the first in the low bits."""
    per = 8 // bits
    n = codes.numel()
    c = torch.zeros(-(-n // per) * per, dtype=torch.int64, device=codes.device)
    c[:n] = codes.reshape(-1).long()
    c = c.view(-1, per) << (torch.arange(per, device=codes.device) * bits)
    return c.sum(1).to(torch.uint8)


def unpack_bits(data: Tensor, bits: int, n: int) -> Tensor:
    """The first ``n`` ``bits``-bit codes (int64) of ``pack_bits``'s bytes."""
    per = 8 // bits
    d = data.long().view(-1, 1) >> (torch.arange(per, device=data.device) * bits)
    return (d & ((1 << bits) - 1)).reshape(-1)[:n]


def qsgd_norms(x: Tensor, chunk: int) -> Tensor:
    """fp32 L2 norms of x's chunks of ``chunk`` elements (sum of squares in fp64)."""
    n = x.numel()
    chunks = -(-n // chunk)
    xd = torch.zeros(chunks * chunk, dtype=torch.float64, device=x.device)
    xd[:n] = x.reshape(-1).double()
    return xd.view(chunks, chunk).square().sum(1).sqrt().float()


def qsgd_quantize(x: Tensor, norms: Tensor, chunk: int, bits: int, key: int) -> Tuple[Tensor, Tensor]:
    """(levels q in 0..s as int64, signs as bool) of x: l = |x| / norm * s, q = floor(l) + (u < l - floor(l))."""
    n = x.numel()
    s = float((1 << bits) - 1)
    nrm = norms.repeat_interleave(chunk)[:n]
    x = x.reshape(-1)
    lev = x.abs() / nrm * s
    fl = torch.floor(lev)
    u = qsgd_uniform(key, n, x.device)
    q = (fl + (u < lev - fl).float()).clamp_(max=s)
    q = torch.where(nrm > 0, q, torch.zeros_like(q)).long()
    return q, torch.signbit(x)


def qsgd_dequantize(q: Tensor, neg: Tensor, norms: Tensor, chunk: int, bits: int) -> Tensor:
    """The values +-(q * (norm / s)) (fp32)."""
    n = q.numel()
    scale = (norms / float((1 << bits) - 1)).repeat_interleave(chunk)[:n]
    a = q.float() * scale
    return torch.where(neg, -a, a)


def qsgd_compress(g: Tensor, e: Optional[Tensor], chunk: int, bits: int, key: int, out: Tensor,
                  phase: int = 3, norms: Optional[Tensor] = None) -> Optional[Tensor]:
    """Phase 1: x = g + e (into e with error feedback) and its chunk norms (returned; also written to the
    message ``out``); phase 2: the codes of x packed into ``out`` (uint8, :func:`qsgd_layout`) and, with
    error feedback, e = x - sent."""
    n = g.numel()
    no, mo, so, _ = qsgd_layout(n, chunk, bits)
    chunks = -(-n // chunk)
    if phase & 1:
        if e is not None:
            e.copy_(g + e)
        x = e if e is not None else g
        norms = qsgd_norms(x, chunk)
        out[no:no + 4 * chunks].view(torch.float32).copy_(norms)
    if not phase & 2:
        return norms
    x = (e if e is not None else g).reshape(-1)
    norms = out[no:no + 4 * chunks].view(torch.float32)
    q, neg = qsgd_quantize(x, norms, chunk, bits, key)
    out[mo:mo + (so - mo)].copy_(pack_bits(q, bits))
    sb = pack_bits(neg.long(), 1)
    out[so:so + sb.numel()].copy_(sb)
    if e is not None:
        e.view(-1).copy_(x - qsgd_dequantize(q, neg, norms, chunk, bits))
    return norms


def qsgd_unpack(msg: Tensor, n: int, chunk: int, bits: int) -> Tensor:
    """The dequantized fp32 values of one packed message (uint8)."""
    no, mo, so, _ = qsgd_layout(n, chunk, bits)
    chunks = -(-n // chunk)
    norms = msg[no:no + 4 * chunks].view(torch.float32)
    q = unpack_bits(msg[mo:so], bits, n)
    neg = unpack_bits(msg[so:so + -(-n // 8)], 1, n).bool()
    return qsgd_dequantize(q, neg, norms, chunk, bits)


def qsgd_decompress(out: Tensor, msgs: List[Tensor], chunk: int, bits: int, world: int) -> None:
    """out = (0 + v_0 + v_1 + ...) / world over the ranks' messages (``msgs[r]``: rank r's bytes of this tensor)."""
    n = out.numel()
    acc = torch.zeros(n, dtype=torch.float32, device=out.device)
    for m in msgs:
        acc += qsgd_unpack(m, n, chunk, bits)
    out.view(-1).copy_(acc / world)
