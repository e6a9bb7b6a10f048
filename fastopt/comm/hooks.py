"""DDP communication hooks that compress gradients: PowerSGD (torch's ``powerSGD_hook``, bit for bit), top-k
with error feedback, and QSGD stochastic quantization (packed), each with its error feedback and compression
fused in one CPU kernel pass (csrc/cpu/comm.cpp; the torch reference fastopt/reference/comm.py runs CUDA
tensors, other dtypes, and installs without fastopt._C).

Use: ``ddp_model.register_comm_hook(state, hook)``.  Every state has ``layer_settings`` (a per-parameter
override of the uniform rank / density / bits), ``observer`` (called as ``observer(param, grad)`` with the
gradient plus the error feedback, before compression) and ``compression_ratio`` (uncompressed bytes / bytes
this rank sent, over the latest call of every bucket).  The interface is written down in
/tmp/comm-interface.md (the L-GreCo policy, fastopt.comm.lgreco, drives these two hooks' settings).
"""
import logging
import math
from collections import defaultdict
from typing import Any, Callable, Dict, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..reference import comm as ref
from . import _kernels as K

logger = logging.getLogger(__name__)

__all__ = ["PowerSGDState", "powersgd_hook", "TopKState", "topk_hook", "QSGDState", "qsgd_hook", "bytes_for",
           "compress_error"]


def _group(pg):
    return pg if pg is not None else dist.group.WORLD


class _CompressState:
    """What the three states share: layer settings, the observer, the byte counts, the backend."""

    _kind = ""
    _owner = ""

    def __init__(self, process_group, layer_settings, observer, backend):
        if observer is not None and not callable(observer):
            raise TypeError(f"{self._owner}: observer must be callable or None, got {type(observer).__name__}")
        self.process_group = process_group
        self.backend = K.check_backend(self._owner, backend)
        self.observer = observer
        self._layer_settings: Optional[Dict[int, Any]] = None
        self._layer_settings_src = None
        self.set_layer_settings(layer_settings)
        self._bucket_bytes: Dict[int, tuple] = {}  # bucket index -> (uncompressed, sent) of its latest call

    # -- settings
    def _check_setting(self, value):  # pragma: no cover - overridden
        raise NotImplementedError

    @property
    def uniform_setting(self):
        raise NotImplementedError

    @property
    def layer_settings(self):
        """{parameter: setting} overrides of the uniform setting (None: uniform everywhere)."""
        return self._layer_settings_src

    @layer_settings.setter
    def layer_settings(self, value):
        self.set_layer_settings(value)

    def set_layer_settings(self, settings):
        """Replace the per-parameter overrides (a dict {parameter tensor: setting} or None); validated here,
        used from the next hook call on."""
        if settings is None:
            self._layer_settings, self._layer_settings_src = None, None
            return
        if not isinstance(settings, dict):
            raise TypeError(f"{self._owner}: layer_settings must be a dict {{parameter: setting}} or None")
        checked = {}
        for p, v in settings.items():
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"{self._owner}: layer_settings keys must be parameter tensors, got {type(p).__name__}")
            checked[id(p)] = self._check_setting(v)
        self._layer_settings, self._layer_settings_src = checked, dict(settings)

    def setting_of(self, param: Tensor):
        """The setting that compresses ``param`` (its override, else the uniform one)."""
        if self._layer_settings is not None:
            v = self._layer_settings.get(id(param))
            if v is not None:
                return v
        return self.uniform_setting

    # -- statistics
    def _record(self, bucket_index, uncompressed, sent):
        self._bucket_bytes[bucket_index] = (int(uncompressed), int(sent))

    @property
    def bytes_uncompressed(self) -> int:
        return sum(u for u, _ in self._bucket_bytes.values())

    @property
    def bytes_sent(self) -> int:
        return sum(s for _, s in self._bucket_bytes.values())

    @property
    def compression_ratio(self) -> float:
        """Uncompressed bytes / bytes sent by this rank, over the latest hook call of every bucket (1.0 before
        any call)."""
        sent = self.bytes_sent
        return self.bytes_uncompressed / sent if sent else 1.0

    def _native(self, *tensors):
        return K.use_native(self.backend, *tensors)


def _check_int(owner, name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{owner}: {name} must be an int >= {lo}, got {v!r}")
    return v


# ================================================================================================ PowerSGD
class PowerSGDState(_CompressState):
    """The state of :func:`powersgd_hook`: torch's ``PowerSGDState`` (same constructor, same semantics and
    attributes: ``error_dict``, ``p_memory_dict``, ``q_memory_dict``, ``iter``, ``rng``,
    ``compression_stats()``), plus ``layer_settings`` ({parameter: rank}), ``observer`` and ``backend``
    ('auto', 'cpu' (the fused kernels), 'torch')."""

    _kind = "powersgd"
    _owner = "PowerSGDState"

    def __init__(self, process_group, matrix_approximation_rank=1, start_powerSGD_iter=1_000, min_compression_rate=2,
                 use_error_feedback=True, warm_start=True, orthogonalization_epsilon=0, random_seed=0,
                 compression_stats_logging_frequency=10_000, batch_tensors_with_same_shape: bool = False, *,
                 layer_settings=None, observer=None, backend="auto"):
        _check_int("PowerSGDState", "matrix_approximation_rank", matrix_approximation_rank, 1)
        _check_int("PowerSGDState", "start_powerSGD_iter", start_powerSGD_iter, 0)
        if not isinstance(min_compression_rate, (int, float)) or min_compression_rate < 0:
            raise ValueError(f"PowerSGDState: min_compression_rate must be a number >= 0, got {min_compression_rate!r}")
        if not isinstance(orthogonalization_epsilon, (int, float)) or orthogonalization_epsilon < 0:
            raise ValueError("PowerSGDState: orthogonalization_epsilon must be a number >= 0, "
                             f"got {orthogonalization_epsilon!r}")
        if (use_error_feedback or warm_start) and start_powerSGD_iter <= 1:
            raise ValueError("PowerSGDState: expect start_powerSGD_iter > 1 if use_error_feedback or warm_start is "
                             "enabled, because PowerSGD can only be applied after the first two iterations in DDP.")
        self.matrix_approximation_rank = matrix_approximation_rank
        super().__init__(process_group, layer_settings, observer, backend)
        import numpy as np

        self.start_powerSGD_iter = start_powerSGD_iter
        self.min_compression_rate = min_compression_rate
        self.use_error_feedback = bool(use_error_feedback)
        self.warm_start = bool(warm_start)
        self.orthogonalization_epsilon = orthogonalization_epsilon
        self.rng = np.random.RandomState(random_seed)
        self.error_dict: Dict[int, Tensor] = {}
        self.p_memory_dict: Dict[int, Tensor] = {}
        self.q_memory_dict: Dict[int, Tensor] = {}
        self.iter = 0
        self.total_numel_before_compression = 0
        self.total_numel_after_compression = 0
        self.compression_stats_logging_frequency = max(1, compression_stats_logging_frequency)
        self.next_stats_report = 0
        self.batch_tensors_with_same_shape = bool(batch_tensors_with_same_shape)

    def _check_setting(self, v):
        return _check_int("PowerSGDState", "a layer_settings rank", v, 1)

    @property
    def uniform_setting(self):
        return self.matrix_approximation_rank

    def maybe_increase_iter(self, bucket):
        if bucket.is_last():
            self.iter += 1
        if self.iter == self.start_powerSGD_iter:
            logger.info("Start to apply PowerSGD after %s iterations.", self.iter)

    def compression_stats(self):
        """(rate, numel before, numel after) since the start, as torch's ``PowerSGDState.compression_stats``."""
        after = self.total_numel_after_compression
        return (self.total_numel_before_compression / after if after > 0 else 0,
                self.total_numel_before_compression, after)


def _orthogonalize(m: Tensor, eps) -> None:
    """Orthonormal columns of every matrix of the batch ``m`` (b, n, r), in place: Gram-Schmidt for r <= 2 or
    half precision, else a QR (the same operations as torch's PowerSGD, so the same bits)."""
    b, _, r = m.shape
    if r <= 2 or m.dtype in (torch.float16, torch.bfloat16):
        for i in range(r):
            col = m[:, :, i:i + 1]
            if eps == 0:
                col /= torch.norm(col, dim=1, keepdim=True)
            else:
                col /= torch.norm(col, dim=1, keepdim=True) + eps
            if i + 1 < r:
                rest = m[:, :, i + 1:]
                rest -= torch.sum(col * rest, dim=1, keepdim=True) * col
    else:
        torch.linalg.qr(m, out=(m, torch.empty(b, r, r, device=m.device, dtype=m.dtype)))


def _offset(buf: Tensor, t: Tensor) -> int:
    off = (t.data_ptr() - buf.data_ptr()) // buf.element_size()
    if off < 0 or off + t.numel() > buf.numel():
        raise RuntimeError("fastopt.comm: a bucket gradient is not a view of the bucket buffer")
    return off


def _observe(state, params, views):
    if state.observer is not None:
        for p, v in zip(params, views):
            state.observer(p, v)


def powersgd_hook(state: PowerSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD (Vogels et al., 2019) as torch's ``powerSGD_hook``: the same result bit for bit at the same
    rank and seed (vanilla averaging before ``start_powerSGD_iter``; rank-1 tensors and tensors not worth
    compressing averaged uncompressed; P = M Q, all-reduce, orthogonalize, Q = M^T P, all-reduce / world,
    M = P Q^T; error feedback and warm start), with the error-feedback add, torch's copy of the bucket, the
    gather and scatter of the uncompressed tensors and the new error fused into kernel passes.  Per-parameter
    ranks from ``state.layer_settings``."""
    if not isinstance(state, PowerSGDState):
        raise TypeError(f"powersgd_hook: state must be a PowerSGDState, got {type(state).__name__}")
    group = _group(state.process_group)
    world = group.size()
    x = bucket.buffer()
    bi = bucket.index()
    if state.iter < state.start_powerSGD_iter:
        state.maybe_increase_iter(bucket)
        state._record(bi, x.numel() * x.element_size(), x.numel() * x.element_size())
        x.div_(world)
        return dist.all_reduce(x, group=group, async_op=True).get_future().then(lambda f: f.value()[0])
    native = state._native(x)
    device, dtype = x.device, x.dtype
    tensors = bucket.gradients()
    params = bucket.parameters() if (state._layer_settings is not None or state.observer is not None) else None

    comp, comp_params, unc = [], [], []
    ranks = {}
    tp = tq = 0
    for j, t in enumerate(tensors):
        mat = t.view(t.shape[0], -1)
        n, m = mat.shape
        r_set = state.setting_of(params[j]) if params is not None else state.matrix_approximation_rank
        r = min(n, m, r_set)
        csize = (n + m) * r
        state.total_numel_before_compression += n * m
        if csize * state.min_compression_rate < n * m:
            comp.append(mat)
            comp_params.append(params[j] if params is not None else None)
            ranks[id(mat)] = r
            tp += n * r
            tq += m * r
            state.total_numel_after_compression += csize
        else:
            unc.append(t)
            state.total_numel_after_compression += n * m
    if bucket.is_last() and state.iter >= state.next_stats_report:
        stats = state.compression_stats()
        logger.info("Compression stats: iter %s, total before compression %s, total after compression %s, rate %s",
                    state.iter, stats[1], stats[2], stats[0])
        state.next_stats_report = state.iter + state.compression_stats_logging_frequency

    segs = [(_offset(x, t), t.numel()) for t in unc]
    e = None
    if state.use_error_feedback:
        e = state.error_dict.get(bi)
        if e is None or e.shape != x.shape:
            e = x.detach().clone()  # the first step: no error yet (torch adds nothing), the copy only
            state.error_dict[bi] = e
            mem = K.psgd_pre(x, None, segs, native)
        else:
            mem = K.psgd_pre(x, e, segs, native)
    else:
        mem = K.psgd_pre(x, None, segs, native)
    if state.observer is not None:
        _observe(state, comp_params, [c.view_as(p) for c, p in zip(comp, comp_params)])
    # the bytes this rank sends: the uncompressed tensors, then P and Q
    esz = x.element_size()
    state._record(bi, x.numel() * esz, (mem.numel() + tp + tq) * esz)

    need_random = (not state.warm_start or bi not in state.p_memory_dict
                   # (layer settings changed a rank: the stored P and Q no longer fit, start them afresh)
                   or state.p_memory_dict[bi].numel() != tp or state.q_memory_dict[bi].numel() != tq)
    if need_random:
        state.p_memory_dict[bi] = torch.empty(tp, device=device, dtype=dtype)
        state.q_memory_dict[bi] = torch.empty(tq, device=device, dtype=dtype)
    by_shape = defaultdict(list)
    for mat in comp:
        by_shape[mat.shape].append(mat)
    batched, ps, qs = [], [], []
    pi = qi = 0
    for mats in by_shape.values():
        if state.batch_tensors_with_same_shape:
            items = [mats[0].unsqueeze(0) if len(mats) == 1 else torch.stack(mats)]
            rs = [ranks[id(mats[0])]] if len(set(ranks[id(mm)] for mm in mats)) == 1 else None
            if rs is None:  # per-layer ranks differ inside a shape: no batching for this shape
                items, rs = [mm.unsqueeze(0) for mm in mats], [ranks[id(mm)] for mm in mats]
        else:
            items, rs = [mm.unsqueeze(0) for mm in mats], [ranks[id(mm)] for mm in mats]
        for t, r in zip(items, rs):
            b, n, m = t.shape
            batched.append(t)
            ps.append(state.p_memory_dict[bi][pi:pi + b * n * r].view(b, n, r))
            qs.append(state.q_memory_dict[bi][qi:qi + b * m * r].view(b, m, r))
            pi += b * n * r
            qi += b * m * r
    eps = state.orthogonalization_epsilon
    if not need_random:
        for q in qs:
            _orthogonalize(q, eps)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(state.rng.randint(1_000_000_000))
            for q in qs:
                q.copy_(torch.randn(*q.shape, device="cpu", dtype=dtype))
                _orthogonalize(q, eps)
    for t, q, p in zip(batched, qs, ps):
        torch.bmm(t, q, out=p)

    fut = dist.all_reduce(mem, group=group, async_op=True).get_future()

    def scatter_then_ps(f):
        K.psgd_scatter(x, f.value()[0], segs, world, native)
        return dist.all_reduce(state.p_memory_dict[bi], group=group, async_op=True).get_future().wait()[0]

    def compute_qs(f):
        state.p_memory_dict[bi] = f.value()
        for p in ps:
            _orthogonalize(p, eps)
        for t, p, q in zip(batched, ps, qs):
            torch.bmm(t.transpose(1, 2), p, out=q)
        return dist.all_reduce(state.q_memory_dict[bi], group=group, async_op=True).get_future().wait()[0]

    def decompress(f):
        state.q_memory_dict[bi] = f.value().div_(world)
        for p, q, t in zip(ps, qs, batched):
            torch.bmm(p, q.transpose(1, 2), out=t)
        if state.batch_tensors_with_same_shape:
            for t in batched:
                if t.shape[0] == 1:
                    continue
                for i, orig in enumerate(by_shape[t.shape[1:]]):
                    orig.copy_(t[i])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if state.use_error_feedback:
            K.psgd_error(x, e, native)
        if not state.warm_start:
            state.p_memory_dict.clear()
            state.q_memory_dict.clear()
        state.maybe_increase_iter(bucket)
        return x

    return fut.then(scatter_then_ps).then(compute_qs).then(decompress)


# ================================================================================================ top-k
class TopKState(_CompressState):
    """The state of :func:`topk_hook`: per parameter, the ``density`` fraction (k = max(1, ceil(density *
    numel))) of largest |g + e| is sent (fp32 values + int32 indices, all-gathered); with
    ``use_error_feedback`` the rest is kept as the residual e.  ``layer_settings``: {parameter: density}."""

    _kind = "topk"
    _owner = "TopKState"

    def __init__(self, process_group=None, density=0.01, use_error_feedback=True, *, layer_settings=None,
                 observer=None, backend="auto"):
        self.density = self._check_setting(density)
        super().__init__(process_group, layer_settings, observer, backend)
        self.use_error_feedback = bool(use_error_feedback)
        self.error_dict: Dict[int, Tensor] = {}  # id(param) -> residual (flat fp32)
        self.iter = 0

    def _check_setting(self, v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
            raise ValueError(f"TopKState: density must be in (0, 1], got {v!r}")
        return float(v)

    @property
    def uniform_setting(self):
        return self.density


def topk_k(numel: int, density: float) -> int:
    """The number of elements a tensor of ``numel`` elements sends at ``density``."""
    return min(numel, max(1, math.ceil(density * numel))) if numel else 0


def _residual(state, p, g):
    e = state.error_dict.get(id(p))
    if e is None or e.numel() != g.numel() or e.device != g.device or e.dtype != g.dtype:
        e = torch.zeros(g.numel(), device=g.device, dtype=g.dtype)
        state.error_dict[id(p)] = e
    return e


def _topk_compress(state: TopKState, params, grads, native):
    """Compress one bucket's gradients (error-feedback add, observer, selection, residual; the gradients are
    zeroed): returns (the message: K values then K int32 indices as one fp32 buffer, the per-tensor k)."""
    ks = [topk_k(g.numel(), state.setting_of(p)) for p, g in zip(params, grads)]
    Ktot = sum(ks)
    dev = grads[0].device if grads else "cpu"
    send = torch.empty(2 * Ktot, device=dev, dtype=torch.float32)
    vals, idx = send[:Ktot], send[Ktot:].view(torch.int32)
    koff = 0
    for p, g, k in zip(params, grads, ks):
        gf = g.view(-1)
        e = _residual(state, p, gf) if state.use_error_feedback else None
        v, i = vals[koff:koff + k], idx[koff:koff + k]
        if state.observer is not None:
            if e is not None:
                K.topk_compress(gf, e, k, v, i, native, phase=1)
                state.observer(p, e.view_as(p))
                K.topk_compress(gf, e, k, v, i, native, phase=2)
            else:
                state.observer(p, g)
                K.topk_compress(gf, None, k, v, i, native)
        else:
            K.topk_compress(gf, e, k, v, i, native)
        koff += k
    return send, ks


def _topk_decompress(grads, gathered, ks, world, native):
    """Every gradient = the average of the ranks' sparse messages (``gathered``: (world, 2K))."""
    Ktot, koff = sum(ks), 0
    for g, k in zip(grads, ks):
        K.topk_decompress(g.view(-1), gathered, koff, k, Ktot, world, native)
        koff += k


def topk_hook(state: TopKState, bucket) -> torch.futures.Future[torch.Tensor]:
    """Top-k sparsification with error feedback: per parameter x = g + e, the k largest |x| (values and int32
    indices) are all-gathered, the bucket becomes sum over ranks / world of the sparse messages, e = x - sent.
    One fused pass per tensor (the add, a radix select of the threshold on |x|'s bits, the packing and the
    residual); ties go to the lower index."""
    if not isinstance(state, TopKState):
        raise TypeError(f"topk_hook: state must be a TopKState, got {type(state).__name__}")
    group = _group(state.process_group)
    x = bucket.buffer()
    grads, params = bucket.gradients(), bucket.parameters()
    native = state._native(x)
    send, ks = _topk_compress(state, params, grads, native)
    return _gather_then_unpack(state, bucket, group, grads, send,
                               lambda out: _topk_decompress(grads, out, ks, group.size(), native))


# ================================================================================================ QSGD
class QSGDState(_CompressState):
    """The state of :func:`qsgd_hook`: QSGD (Alistarh et al., 2017) with ``bits``-bit magnitudes (s = 2^bits - 1
    levels) plus a sign bit per element and one fp32 L2 norm per ``bucket_size`` elements of each parameter;
    stochastic rounding from fastopt's counter-based hash of (seed, rank, tensor, step, index), so runs are
    reproducible.  ``use_error_feedback`` keeps e = x - sent.  ``layer_settings``: {parameter: bits}."""

    _kind = "qsgd"
    _owner = "QSGDState"

    def __init__(self, process_group=None, bits=4, bucket_size=512, use_error_feedback=False, seed=0, *,
                 layer_settings=None, observer=None, backend="auto"):
        self.bits = self._check_setting(bits)
        _check_int("QSGDState", "bucket_size", bucket_size, 8)
        if bucket_size % 8:
            raise ValueError(f"QSGDState: bucket_size must be a multiple of 8, got {bucket_size}")
        _check_int("QSGDState", "seed", seed, 0)
        super().__init__(process_group, layer_settings, observer, backend)
        self.bucket_size = bucket_size
        self.use_error_feedback = bool(use_error_feedback)
        self.seed = seed
        self.error_dict: Dict[int, Tensor] = {}
        self.iter = 0

    def _check_setting(self, v):
        if v not in (2, 4, 8) or isinstance(v, bool):
            raise ValueError(f"QSGDState: bits must be 2, 4 or 8, got {v!r}")
        return int(v)

    @property
    def uniform_setting(self):
        return self.bits


def _qsgd_compress(state: QSGDState, params, grads, native, rank, tensor_base):
    """Compress one bucket's gradients: returns (the uint8 message, per-tensor bits, per-tensor byte offsets)."""
    chunk = state.bucket_size
    bits = [state.setting_of(p) for p in params]
    offs, T = [], 0
    for g, b in zip(grads, bits):
        offs.append(T)
        T += ref.qsgd_layout(g.numel(), chunk, b)[3]
    dev = grads[0].device if grads else "cpu"
    send = torch.empty(T, device=dev, dtype=torch.uint8)
    for j, (p, g, b, off) in enumerate(zip(params, grads, bits, offs)):
        gf = g.view(-1)
        msg = send[off:off + ref.qsgd_layout(gf.numel(), chunk, b)[3]]
        key = ref.qsgd_key(state.seed, rank, tensor_base + j, state.iter)
        e = _residual(state, p, gf) if state.use_error_feedback else None
        if state.observer is not None:
            K.qsgd_compress(gf, e, chunk, b, key, msg, native, phase=1)
            state.observer(p, (e if e is not None else gf).view_as(p))
            K.qsgd_compress(gf, e, chunk, b, key, msg, native, phase=2)
        else:
            K.qsgd_compress(gf, e, chunk, b, key, msg, native)
    return send, bits, offs


def _qsgd_decompress(state: QSGDState, grads, gathered, bits, offs, world, native):
    for g, b, off in zip(grads, bits, offs):
        K.qsgd_decompress(g.view(-1), gathered, off, state.bucket_size, b, world, native)


def qsgd_hook(state: QSGDState, bucket) -> torch.futures.Future[torch.Tensor]:
    """QSGD stochastic quantization: per parameter x = g + e (e only with error feedback), per chunk of
    ``bucket_size`` the norm, then levels q = floor(|x| / norm * s) + Bernoulli(frac) packed with the signs;
    the messages are all-gathered and the bucket becomes sum over ranks / world of the dequantized values.
    Fused: the add and the norms (one pass), the quantization, packing and residual (a second), and the
    unpack and average (one pass).  The random stream of tensor j of bucket b at step t on rank r is
    ``fastopt.reference.comm.qsgd_key(seed, r, b * 65536 + j, t)``."""
    if not isinstance(state, QSGDState):
        raise TypeError(f"qsgd_hook: state must be a QSGDState, got {type(state).__name__}")
    group = _group(state.process_group)
    x = bucket.buffer()
    grads, params = bucket.gradients(), bucket.parameters()
    native = state._native(x)
    send, bits, offs = _qsgd_compress(state, params, grads, native, group.rank(), bucket.index() * 65536)
    return _gather_then_unpack(state, bucket, group, grads, send,
                               lambda out: _qsgd_decompress(state, grads, out, bits, offs, group.size(), native))


def _gather_then_unpack(state, bucket, group, grads, send, unpack) -> torch.futures.Future[torch.Tensor]:
    """The common tail of :func:`topk_hook` and :func:`qsgd_hook`: zero the bucket's padding (nothing in it
    is sent), count the bytes, all-gather every rank's message ``send`` into ``out`` (world x message) and,
    when it arrives, ``unpack(out)`` into the gradients (the bucket's views), then count the step on the last
    bucket."""
    x = bucket.buffer()
    if x.numel() != sum(g.numel() for g in grads):
        x.zero_()
    state._record(bucket.index(), x.numel() * x.element_size(), send.numel() * send.element_size())
    out = torch.empty(group.size(), send.numel(), device=x.device, dtype=send.dtype)
    fut = dist.all_gather(list(out.unbind(0)), send, group=group, async_op=True).get_future()

    def decompress(f):
        unpack(out)
        if bucket.is_last():
            state.iter += 1
        return x

    return fut.then(decompress)


# ================================================================================================ costs
def bytes_for(kind: str, shape, setting, world_size: int = 1, *, bucket_size: int = 512,
              min_compression_rate: float = 2, element_size: int = 4) -> int:
    """The bytes one rank sends for one parameter of ``shape`` at ``setting`` (PowerSGD rank, top-k density,
    QSGD bits), as the hooks count them (``world_size`` is accepted for symmetry; the counts do not depend
    on it)."""
    numel = math.prod(shape) if len(shape) else 1
    if kind == "powersgd":
        r = _check_int("bytes_for", "rank", setting, 1)
        if len(shape) == 0:
            return numel * element_size
        n = shape[0]
        m = numel // n if n else 0
        r = min(n, m, r)
        return ((n + m) * r if (n + m) * r * min_compression_rate < n * m else n * m) * element_size
    if kind == "topk":
        return 8 * topk_k(numel, TopKState._check_setting(None, setting))
    if kind == "qsgd":
        return ref.qsgd_layout(numel, bucket_size, QSGDState._check_setting(None, setting))[3]
    raise ValueError(f"bytes_for: kind must be 'powersgd', 'topk' or 'qsgd', got {kind!r}")


def compress_error(kind: str, tensor: Tensor, setting, *, bucket_size: int = 512, seed: int = 0,
                   min_compression_rate: float = 2) -> float:
    """||x - decompress(compress(x))||^2 of one tensor compressed alone on one rank: PowerSGD the rank-r
    approximation from one power iteration with a Q drawn from ``seed`` (0 for an uncompressed tensor), top-k
    exact, QSGD the expected error sum over elements of (norm / s)^2 p (1 - p) (no randomness)."""
    x = tensor.detach().float()
    if kind == "powersgd":
        r = _check_int("compress_error", "rank", setting, 1)
        if x.dim() < 2:
            return 0.0
        mat = x.reshape(x.shape[0], -1)
        n, m = mat.shape
        r = min(n, m, r)
        if not (n + m) * r * min_compression_rate < n * m:
            return 0.0
        gen = torch.Generator(device="cpu").manual_seed(seed)
        q = torch.randn(1, m, r, generator=gen).to(x.device)
        _orthogonalize(q, 1e-8)
        p = torch.bmm(mat.unsqueeze(0), q)
        _orthogonalize(p, 1e-8)
        q = torch.bmm(mat.unsqueeze(0).transpose(1, 2), p)
        return float((mat - torch.bmm(p, q.transpose(1, 2))[0]).square().sum())
    if kind == "topk":
        flat = x.reshape(-1)
        k = topk_k(flat.numel(), TopKState._check_setting(None, setting))
        sel = ref.topk_select(flat, k)
        return float(flat.square().sum() - flat[sel].square().sum())
    if kind == "qsgd":
        bits = QSGDState._check_setting(None, setting)
        flat = x.reshape(-1)
        s = float((1 << bits) - 1)
        norms = ref.qsgd_norms(flat, bucket_size)
        nrm = norms.repeat_interleave(bucket_size)[:flat.numel()].double()
        lev = flat.double().abs() / nrm * s
        frac = torch.nan_to_num(lev - torch.floor(lev))
        return float(((nrm / s) ** 2 * frac * (1 - frac)).sum())
    raise ValueError(f"compress_error: kind must be 'powersgd', 'topk' or 'qsgd', got {kind!r}")
