"""The generic Triton multi-tensor launcher.

Every tensor of the lists is cut into chunks of ``CHUNK`` elements and one program handles one chunk
of one tensor.  The tensors' addresses travel in an int64 table ``[n_tensors, n_lists]`` (the
per-optimizer lists, then the step counters) that the kernel casts back to pointers, so one launch
covers any number of tensors of any sizes.  The (tensor, chunk) of each program comes from two small
int32/int64 tables that only depend on the tensor sizes and are cached.

The update rule is a ``@triton.jit`` function passed as a ``constexpr``:

    UPDATE(p, g, s1, s2, s3, step, lr, H0, ..., H9, FLAGS) -> (p, s1, s2, s3)

taking and returning fp32 blocks (``s1..s3`` are the optimizer states, ``NSTATE`` of them real) plus
fp32 scalars (the step count after this step, the learning rate, ten hyperparameter slots) and a
``constexpr`` int of flag bits.  Adding an optimizer adds an update function, not a launcher.
"""
import functools
import math

import torch
import triton
import triton.language as tl

CHUNK = 65536
BLOCK = 1024
N_HYPER = 10


@triton.jit
def _ptr(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, DTYPE: tl.constexpr):
    """The address in column ``col`` of row ``row`` of an address table, as a ``DTYPE`` pointer."""
    return tl.load(addr_table + row * NCOL + col).to(tl.pointer_type(DTYPE))


@triton.jit
def _load_block(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, offs, mask, DTYPE: tl.constexpr):
    return tl.load(_ptr(addr_table, row, col, NCOL, DTYPE) + offs, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def to_bf16_rne(x):
    """fp32 -> bf16, round to nearest even, NaN kept NaN.  Written out because Triton's interpreter
    truncates in ``.to(tl.bfloat16)``; on GPUs this costs a few integer ops in a memory-bound loop."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where(x != x, (u >> 16) | 0x40, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _store_block(addr_table, row, col: tl.constexpr, NCOL: tl.constexpr, offs, mask, val, DTYPE: tl.constexpr):
    ptr = _ptr(addr_table, row, col, NCOL, DTYPE)
    if DTYPE == tl.bfloat16:
        tl.store(ptr + offs, to_bf16_rne(val), mask=mask)
    else:
        tl.store(ptr + offs, val.to(DTYPE), mask=mask)


@triton.jit
def _multi_tensor_kernel(
    addr_table, numels, block_tensor, block_start,
    lr_value, lr_ptr, grad_scale_ptr, found_inf_ptr, sign,
    H0, H1, H2, H3, H4, H5, H6, H7, H8, H9,
    UPDATE: tl.constexpr, NSTATE: tl.constexpr, FLAGS: tl.constexpr, DTYPE: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    NCOL: tl.constexpr = NSTATE + 3  # param, grad, states..., step counter
    pid = tl.program_id(0)
    skip = 0.0
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr)
    if skip == 0.0:
        row = tl.load(block_tensor + pid).to(tl.int64)
        start = tl.load(block_start + pid)
        n = tl.load(numels + row)
        end = tl.minimum(start + CHUNK_SIZE, n)
        lr = lr_value
        if HAS_LR_PTR:
            lr = tl.load(lr_ptr)
        grad_mul = sign
        if HAS_GRAD_SCALE:
            grad_mul = sign / tl.load(grad_scale_ptr)
        step_ptr = tl.load(addr_table + row * NCOL + (NCOL - 1)).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr) + 1.0
        for off in range(start, end, BLOCK_SIZE):
            offs = off + tl.arange(0, BLOCK_SIZE)
            mask = offs < end
            p = _load_block(addr_table, row, 0, NCOL, offs, mask, DTYPE)
            g = _load_block(addr_table, row, 1, NCOL, offs, mask, DTYPE) * grad_mul
            s1 = p
            s2 = p
            s3 = p
            if NSTATE >= 1:
                s1 = _load_block(addr_table, row, 2, NCOL, offs, mask, DTYPE)
            if NSTATE >= 2:
                s2 = _load_block(addr_table, row, 3, NCOL, offs, mask, DTYPE)
            if NSTATE >= 3:
                s3 = _load_block(addr_table, row, 4, NCOL, offs, mask, DTYPE)
            p, s1, s2, s3 = UPDATE(p, g, s1, s2, s3, step, lr, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, FLAGS)
            _store_block(addr_table, row, 0, NCOL, offs, mask, p, DTYPE)
            if NSTATE >= 1:
                _store_block(addr_table, row, 2, NCOL, offs, mask, s1, DTYPE)
            if NSTATE >= 2:
                _store_block(addr_table, row, 3, NCOL, offs, mask, s2, DTYPE)
            if NSTATE >= 3:
                _store_block(addr_table, row, 4, NCOL, offs, mask, s3, DTYPE)


@triton.jit
def _increment_steps_kernel(addr_table, n_tensors, found_inf_ptr, NCOL: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    skip = 0.0
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr)
    if skip == 0.0:
        rows = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
        mask = rows < n_tensors
        addrs = tl.load(addr_table + rows.to(tl.int64) * NCOL + (NCOL - 1), mask=mask, other=0)
        ptrs = addrs.to(tl.pointer_type(tl.float32))
        tl.store(ptrs, tl.load(ptrs, mask=mask) + 1.0, mask=mask)


_TL_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


@functools.lru_cache(maxsize=64)
def _chunk_tables_host(numels):
    tensors, starts = [], []
    for t, n in enumerate(numels):
        for s in range(0, n, CHUNK):
            tensors.append(t)
            starts.append(s)
    return (torch.tensor(tensors, dtype=torch.int32), torch.tensor(starts, dtype=torch.int64))


_device_tables = {}


def _chunk_tables(numels, device):
    key = (numels, str(device))
    tables = _device_tables.get(key)
    if tables is None:
        tables = tuple(t.to(device) for t in _chunk_tables_host(numels))
        if len(_device_tables) > 64:
            _device_tables.clear()
        _device_tables[key] = tables
    return tables



def split_f64(x):
    """``x`` as two fp32 numbers whose sum is ``x`` to ~48 bits: kernels rebuild it in fp64."""
    hi = float(torch.tensor(x, dtype=torch.float32))
    if not math.isfinite(hi):
        return hi, 0.0
    return hi, float(x - hi)


def multi_tensor_apply(update, lists, steps, *, hyper, flags, lr, grad_scale=None, found_inf=None, sign=1.0):
    """Run ``update`` over every element of ``lists`` = [params, grads, state1, ...] in one launch.

    ``steps``: fp32 step counters (one per tensor, read as ``step + 1`` and then incremented unless
    ``found_inf`` is nonzero).  ``hyper``: up to ten floats (fp32 in the kernel); ``flags``: int of flag bits (constexpr);
    ``lr``: float or an fp32 scalar tensor on the tensors' device; ``sign``: -1 for maximize.
    """
    params = lists[0]
    if not params:
        return
    device = params[0].device
    nstate = len(lists) - 2
    if not 0 <= nstate <= 3:
        raise ValueError(f"the Triton multi-tensor launcher takes 0 to 3 state lists, got {nstate}")
    numels = tuple(p.numel() for p in params)
    addrs = [[t.data_ptr() for t in row] + [s.data_ptr()] for row, s in zip(zip(*lists), steps)]
    addr_table = torch.tensor(addrs, dtype=torch.int64).to(device, non_blocking=True)
    numel_t = torch.tensor(numels, dtype=torch.int64).to(device, non_blocking=True)
    block_tensor, block_start = _chunk_tables(numels, device)
    if len(hyper) > N_HYPER:
        raise ValueError(f"at most {N_HYPER} hyperparameters, got {len(hyper)}")
    hyper = tuple(float(h) for h in hyper) + (0.0,) * (N_HYPER - len(hyper))
    lr_is_ptr = isinstance(lr, torch.Tensor)
    dummy = torch.zeros((), dtype=torch.float32, device=device)
    if block_tensor.numel() > 0:
        _multi_tensor_kernel[(block_tensor.numel(),)](
            addr_table, numel_t, block_tensor, block_start,
            0.0 if lr_is_ptr else float(lr), lr if lr_is_ptr else dummy,
            grad_scale if grad_scale is not None else dummy,
            found_inf if found_inf is not None else dummy, float(sign),
            *hyper,
            UPDATE=update, NSTATE=nstate, FLAGS=int(flags), DTYPE=_TL_DTYPES[params[0].dtype],
            HAS_LR_PTR=lr_is_ptr, HAS_GRAD_SCALE=grad_scale is not None, HAS_FOUND_INF=found_inf is not None,
            CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK,
        )
    n = len(params)
    _increment_steps_kernel[(triton.cdiv(n, 256),)](
        addr_table, n, found_inf if found_inf is not None else dummy,
        NCOL=nstate + 3, HAS_FOUND_INF=found_inf is not None, BLOCK_SIZE=256,
    )
