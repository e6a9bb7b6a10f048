"""What fastopt's Triton multi-tensor launchers share (:mod:`.elementwise`, :mod:`.lowbit`).

Every launch covers every tensor of a call: the tensors' addresses travel in an int64 table
``[n_tensors, n_columns]`` (param, grad, the op's state slots 0, 1, ... in columns 2, 3, ..., then
what the launcher adds, the fp32 step counter last) that the kernel casts back to pointers, and each
program finds its (tensor, first element) in two small tables that only depend on the tensor sizes
and are cached.  Every launcher passes an op the same scalars: ``N_HYPER`` fp32 hyperparameter slots
``H0 .. H15`` (:func:`pad_hyper`), ``FLAGS`` (constexpr int), the learning rate (a float, or an fp32
tensor read on the device: no host sync) and the step count after this step; gradients arrive with
maximize and the AMP grad scale applied, and a nonzero ``found_inf`` makes the whole call, step
counters included, a no-op.

Launch-time state lives on the device, cached (:class:`DeviceCache`, a bounded LRU keyed on what each
table holds, per device and stream): in the steady state a launcher copies nothing host-to-device and
allocates nothing, and the step counters are incremented by the launch's last program
(:func:`_fold_step_increment`), not by a second launch.
"""
import collections
import math
import struct

import torch
import triton
import triton.language as tl

from .._tickets import step_ticket

CHUNK = 65536
BLOCK = 1024
N_HYPER = 16    # the H0 .. H15 of every op's UPDATE / REDUCE
MAX_STATES = 4  # state slots s0 .. s3

_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


# -- device helpers ----------------------------------------------------------------------------------

@triton.jit
def _ptr(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, DTYPE: tl.constexpr):
    """The address in column ``col`` of row ``row`` of an address table, as a ``DTYPE`` pointer."""
    return tl.load(addr_table + row * NCOL + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _aptr(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """:func:`_ptr`, declared 16-byte aligned when ``ALIGNED`` (the launcher checked every address of
    the table: :func:`aligned16`), so that whole blocks load and store as 128-bit vectors."""
    ptr = _ptr(addr_table, row, col, NCOL, DTYPE)
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load_block(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, offs, mask, DTYPE: tl.constexpr,
                ALIGNED: tl.constexpr = False):
    return tl.load(_aptr(addr_table, row, col, NCOL, DTYPE, ALIGNED) + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN kept NaN.  Written out because Triton's interpreter
    truncates in ``.to(tl.bfloat16)``; on GPUs this costs a few integer ops in a memory-bound loop."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, (u >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _rounded(x, DTYPE: tl.constexpr):
    """fp32 ``x`` in the storage dtype (bf16: round to nearest even)."""
    if DTYPE == tl.bfloat16:
        r = to_bf16_rne(x)
    else:
        r = x.to(DTYPE)
    return r


@triton.jit
def _store_block(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, offs, mask, val, DTYPE: tl.constexpr,
                 ALIGNED: tl.constexpr = False):
    tl.store(_aptr(addr_table, row, col, NCOL, DTYPE, ALIGNED) + offs, _rounded(val, DTYPE), mask=mask)


@triton.jit
def fmix32(h):
    h ^= h >> 16
    h *= 0x85EBCA6B
    h ^= h >> 13
    h *= 0xC2B2AE35
    h ^= h >> 16
    return h


@triton.jit
def _bf16_stochastic(x, rnd):
    u = x.to(tl.uint32, bitcast=True)
    r = ((u + (rnd & 0xFFFF)) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return tl.where((u & 0x7F800000) == 0x7F800000, to_bf16_rne(x), r)


@triton.jit
def _step_skipped(found_inf_ptr, HAS_FOUND_INF: tl.constexpr):
    """Nonzero when the call is an AMP-skipped step (``found_inf`` set)."""
    skip = 0.0
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr)
    return skip


@triton.jit
def _step_scalars(addr_table, row, NCOL: tl.constexpr, lr_value, lr_ptr, grad_scale_ptr, sign,
                  HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_STEPS: tl.constexpr):
    """(lr, the gradient multiplier sign / grad_scale, the step count after this step: the tensor's
    counter in the table's last column + 1, or 1 without counters)."""
    lr = lr_value
    if HAS_LR_PTR:
        lr = tl.load(lr_ptr)
    grad_mul = sign
    if HAS_GRAD_SCALE:
        grad_mul = sign / tl.load(grad_scale_ptr)
    step = tl.full([], 1.0, tl.float32)
    if HAS_STEPS:
        step = tl.load(_ptr(addr_table, row, NCOL - 1, NCOL, tl.float32)) + 1.0
    return lr, grad_mul, step


@triton.jit
def _sr_offset(addr_table, row, COL: tl.constexpr, NCOL: tl.constexpr, STOCHASTIC: tl.constexpr):
    """The stochastic-rounding element offset of tensor ``row`` (column ``COL`` of the address table:
    :func:`sr_offset_column`), read only when ``STOCHASTIC``."""
    off = tl.full([], 0, tl.int64)
    if STOCHASTIC:
        off = tl.load(addr_table + row * NCOL + COL)
    return off


@triton.jit
def _store_param(ptr, offs, mask, p, seed, row, step, sr_offset, STOCHASTIC: tl.constexpr, DTYPE: tl.constexpr):
    """Store the fp32 param ``p``; with ``STOCHASTIC`` (bf16) round with the counter-based bits of the
    C++ kernels (``fmix32``; tensor ``row``, the step count, element ``sr_offset + offs``: its index in
    the whole tensor), so CPU and GPU agree exactly.  Returns the stored values."""
    if STOCHASTIC:
        key = fmix32(seed.to(tl.uint32) ^ fmix32(row.to(tl.uint32) * 0x27D4EB2F + step.to(tl.uint32) * 0x165667B1))
        stored = _bf16_stochastic(p, fmix32((offs + sr_offset).to(tl.uint32) * 0x9E3779B1 ^ key))
    else:
        stored = _rounded(p, DTYPE)
    tl.store(ptr + offs, stored, mask=mask)
    return stored


@triton.jit
def _increment_steps_kernel(addr_table, n_tensors, found_inf_ptr, NCOL: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF) == 0.0:
        rows = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = rows < n_tensors
        addrs = tl.load(addr_table + rows.to(tl.int64) * NCOL + (NCOL - 1), mask=mask, other=0)
        ptrs = addrs.to(tl.pointer_type(tl.float32))
        tl.store(ptrs, tl.load(ptrs, mask=mask) + 1.0, mask=mask)


@triton.jit
def _fold_step_increment(ticket_ptr, addr_table, n_tensors, NCOL: tl.constexpr):
    """The step increment of a launch, folded into its last program (call it once per program, after
    every read of the step counters, in programs that are not AMP-skipped).

    Every program reads its tensor's counter as ``step + 1``, so none may increment it while another
    could still read it.  Each program takes a ticket from the launch's int32 counter (zero before the
    launch: :func:`ticket_counter`) after a barrier (all its threads are past their reads) with an
    acquire-release atomic add; the program that draws the last ticket (``num_programs - 1``) has
    therefore seen every other program's reads complete: it adds 1 to every step counter of the table's
    last column (all ``n_tensors`` rows, empty tensors included) and puts the counter back to zero for
    the next launch on the stream."""
    tl.debug_barrier()
    ticket = tl.atomic_add(ticket_ptr, 1, sem="acq_rel")
    if ticket == tl.num_programs(0) - 1:
        for r0 in range(0, n_tensors, 256):
            rows = r0 + tl.arange(0, 256)
            mask = rows < n_tensors
            addrs = tl.load(addr_table + rows.to(tl.int64) * NCOL + (NCOL - 1), mask=mask, other=0)
            ptrs = addrs.to(tl.pointer_type(tl.float32))
            tl.store(ptrs, tl.load(ptrs, mask=mask) + 1.0, mask=mask)
        tl.atomic_xchg(ticket_ptr, 0, sem="relaxed")


# -- host side -----------------------------------------------------------------------------------------

def pad_hyper(hyper):
    """An op's packed hyperparameters as the ``N_HYPER`` fp32 kernel slots (zeros after them)."""
    if len(hyper) > N_HYPER:
        raise ValueError(f"at most {N_HYPER} hyperparameters, got {len(hyper)}")
    return tuple(float(h) for h in hyper) + (0.0,) * (N_HYPER - len(hyper))


# -- launch-time caches: the steady state (the same tensors step after step) copies nothing to the
# device and allocates nothing there.

FOLD_STEPS = True  # increment the step counters in the main launch (False: a second launch, as before)

launch_stats = collections.Counter()
"""What the launchers did on the device, by kind: ``"tables"`` (an int64/int32 table built on the host
and copied to the device: one host-to-device copy each), ``"allocs"`` (a device buffer allocated: a
dummy argument, a ticket counter), ``"step_launches"`` (a separate step-increment launch).  Only the
cache misses count; tests read it (tests/test_triton_launch_cache.py)."""


class DeviceCache:
    """A bounded LRU of device tensors, keyed on what they encode.

    At most ``max_entries`` entries and about ``max_bytes`` bytes (the newest entry is always kept), so
    a caller that builds new tensors every step (new addresses: new keys) holds a bounded number of
    stale tables.  Keys include the device and, on CUDA, the current stream (:func:`stream_key`): a
    table is only used on the stream it was copied on, so freeing an evicted one is ordered after every
    launch that read it."""

    def __init__(self, max_entries=1024, max_bytes=32 << 20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries = collections.OrderedDict()
        self._bytes = 0

    def __len__(self):
        return len(self._entries)

    def clear(self):
        self._entries.clear()
        self._bytes = 0

    def get(self, key, make):
        """The cached value of ``key`` (a tuple of tensors), or ``make()``'s, stored.  ``key[-1]`` is the
        :func:`stream_key`: a value used while that CUDA stream is being captured into a graph is also
        kept outside the LRU for good (the graph holds its address; eviction must not free it)."""
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
            _keep_if_captured(key[-1], hit[0])
            return hit[0]
        value = make()
        _keep_if_captured(key[-1], value)
        size = sum(t.numel() * t.element_size() for t in value)
        self._entries[key] = (value, size)
        self._bytes += size
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= old
        return value


_graph_refs = {}  # id -> value: tensors baked into captured CUDA graphs (never freed)


def _keep_if_captured(skey, value):
    if isinstance(skey, tuple) and skey[:1] == ("cuda",) and torch.cuda.is_current_stream_capturing():
        _graph_refs[id(value)] = value


def stream_key(device):
    """(device type, index, stream): where a launch on ``device`` runs (the stream: None off CUDA)."""
    if device.type == "cuda":
        return ("cuda", device.index, torch.cuda.current_stream(device).cuda_stream)
    return (device.type, device.index, None)


def to_device_table(values, dtype, device):
    """A 1-D ``dtype`` table of the ints ``values`` on ``device`` (one host-to-device copy)."""
    launch_stats["tables"] += 1
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)


_buffers = DeviceCache(max_entries=64)


def _device_buffer(kind, device, make):
    def alloc():
        launch_stats["allocs"] += 1
        return (make(),)
    return _buffers.get((kind, stream_key(device)), alloc)[0]


def dummy(device, dtype=torch.float32):
    """A 4-element zero tensor standing in for an absent tensor argument (never read nor written by a
    kernel: its HAS_* constexpr is off), one per (device, stream, dtype)."""
    return _device_buffer(("dummy", dtype), device, lambda: torch.zeros(4, dtype=dtype, device=device))


def ticket_counter(device):
    """The int32 ticket counter of :func:`_fold_step_increment` for launches on ``device``'s current
    stream (zeroed once, put back to zero by the last program of every launch): the one the CUDA
    backend's fold uses too, :func:`fastopt._tickets.step_ticket` (one per stream; a fresh one per call
    captured into a CUDA graph)."""
    return step_ticket(device)


class StepArgs:
    """The per-call scalars as every launcher's kernel takes them: ``args`` = (lr_value, lr_ptr,
    grad_scale_ptr, found_inf_ptr, sign), ``constexprs`` = HAS_LR_PTR, HAS_GRAD_SCALE, HAS_FOUND_INF;
    ``dummy`` stands in for an absent tensor argument (cached per device and stream)."""

    def __init__(self, device, lr, grad_scale, found_inf, sign):
        self.device = device
        self.dummy = dummy(device)
        self.found_inf = found_inf
        lr_is_ptr = isinstance(lr, torch.Tensor)
        self.args = (0.0 if lr_is_ptr else float(lr), lr if lr_is_ptr else self.dummy,
                     self.or_dummy(grad_scale), self.or_dummy(found_inf), float(sign))
        self.constexprs = dict(HAS_LR_PTR=lr_is_ptr, HAS_GRAD_SCALE=grad_scale is not None,
                               HAS_FOUND_INF=found_inf is not None)

    def or_dummy(self, t):
        return t if t is not None else self.dummy

    def increment_steps(self, addr_table, n, ncol):
        """Add 1 to the step counters in the last column of the ``n``-row table (unless ``found_inf``), in
        a launch of its own (launchers fold it into the main launch: :func:`_fold_step_increment`)."""
        launch_stats["step_launches"] += 1
        _increment_steps_kernel[(triton.cdiv(n, 256),)](
            addr_table, n, self.or_dummy(self.found_inf),
            NCOL=ncol, HAS_FOUND_INF=self.found_inf is not None, BLOCK_SIZE=256, enable_fp_fusion=False,
        )


def sr_offset_column(sr_offsets, n):
    """The per-tensor stochastic-rounding element offsets of a launch (each tensor's first element's
    index in the whole tensor it is a piece of, e.g. an FSDP2 shard; the C++ ``sr_offsets``): a list
    of ``n`` non-negative ints (zeros when ``sr_offsets`` is None or empty), for a column of the
    launch's address table (read by :func:`_sr_offset`)."""
    from ..reference.rounding import check_offsets

    return check_offsets(sr_offsets, n) or [0] * n


def aligned16(*tensor_lists):
    """Whether every tensor of the lists starts on a 16-byte boundary (the kernels' vector path; a
    tensor that does not -- a view at an odd offset -- sends the whole launch down the scalar path)."""
    return all(t.data_ptr() % 16 == 0 for lst in tensor_lists for t in lst if t is not None)


# 1024 entries: OptimizerInBackward launches once per parameter (one small table each), so a model
# with up to ~1000 parameters per device still steps with no copy; a table is n_tensors * (columns + 3)
# int64s, and the byte budget bounds the big ones.
_tables = DeviceCache()


def cached_table(key, device, make_values):
    """Cached int64 device tables: ``make_values()`` returns (a flat list of ints, the sizes of its
    parts), copied to ``device`` as one buffer once per ``(key, device, stream)``; returns the parts
    (views of that buffer).  ``key`` must determine the values: it is what they encode (addresses,
    sizes), so a hit is exactly the table a rebuild would give."""
    def make():
        values, sizes = make_values()
        return tuple(to_device_table(values, torch.int64, device).split(sizes))

    return _tables.get((key, stream_key(device)), make)


def cached_on_device(cache, key, device, make_host_tables):
    """``make_host_tables()`` (CPU tensors) copied to ``device`` once per ``(key, device, stream)``;
    ``cache``: a :class:`DeviceCache`, or None for the module's table cache."""
    if cache is None:
        cache = _tables

    def make():
        launch_stats["tables"] += 1
        return tuple(t.to(device) for t in make_host_tables())

    return cache.get((key, stream_key(device)), make)


def _chunk_tables_host(numels):
    tensors, starts = [], []
    for t, n in enumerate(numels):
        for s in range(0, n, CHUNK):
            tensors.append(t)
            starts.append(s)
    return (torch.tensor(tensors, dtype=torch.int32), torch.tensor(starts, dtype=torch.int64))


_chunk_cache = DeviceCache()


def _chunk_tables(numels, device):
    """(tensor of each program int32, its first element int64) for chunks of ``CHUNK`` elements."""
    return cached_on_device(_chunk_cache, ("chunks", numels), device, lambda: _chunk_tables_host(numels))


def clear_caches():
    """Drop every cached device table and buffer (tests; or to free their memory)."""
    for c in (_tables, _chunk_cache, _buffers):
        c.clear()


def _to_f32(x):
    """``float(x)`` rounded to fp32 (nearest even, as torch's cast; overflow: +-inf), on the host."""
    try:
        return struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def split_f64(x):
    """``x`` as two fp32 numbers whose sum is ``x`` to ~48 bits: kernels rebuild it in fp64."""
    hi = _to_f32(x)
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(x - hi)


def multi_tensor_apply(update, lists, steps, *, hyper, flags, lr, grad_scale=None, found_inf=None, sign=1.0):
    """Run ``update`` (an UPDATE of :mod:`.elementwise`) over every element of ``lists`` = [params, grads,
    state 0, ...] in one launch: :func:`.elementwise.elementwise_apply` with no reduce phase.

    ``steps``: fp32 step counters (one per tensor, read as ``step + 1`` and then incremented unless
    ``found_inf`` is nonzero).  ``hyper``: up to ``N_HYPER`` floats (fp32 in the kernel); ``flags``:
    int of flag bits (constexpr); ``lr``: float or an fp32 scalar tensor on the tensors' device;
    ``sign``: -1 for maximize.
    """
    from .elementwise import elementwise_apply, no_reduce  # elementwise.py builds on this module

    elementwise_apply(update, no_reduce, 0, lists, steps, hyper=hyper, flags=flags, lr=lr, grad_scale=grad_scale,
                      found_inf=found_inf, sign=sign)
