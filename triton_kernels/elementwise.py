"""The generic Triton launcher of fastopt's elementwise optimizer ops (the Triton side of
``csrc/include/fastopt/elementwise.h``).

One launch covers every tensor of a call: an int64 table ``[n_tensors, 2 + NSTATE + 2]`` holds the
addresses of param, grad, the op's state slots, the tensor's stochastic-rounding element offset (an
integer: where it starts in the whole tensor, ``sr_offsets``) and the fp32 step counter
(:mod:`.multi_tensor`); each
program takes one chunk of ``CHUNK`` elements of one tensor.  An op is two ``@triton.jit`` functions
passed as constexprs:

    UPDATE(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3, H0, ..., H15, FLAGS) -> (p, s0, s1, s2, s3)
    REDUCE(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3, H0, ..., H15, FLAGS) -> (s0, s1, s2, s3, a0, a1, a2, a3)

taking fp32 blocks (p, g with maximize and grad scaling applied, the states), fp32 scalars (the step
count after this step, the learning rate, the ``N_HYPER`` op-defined slots) and the row coefficients
``r0..r3`` of each element's row (blocks; zeros when the call has none; both phases get them, so a
reduce pass can use the sums of an earlier one).  Phase 1 calls REDUCE, which may update states, and
adds ``a0..a3`` into per-row sums.  bf16 params may be stored with stochastic rounding: the same
counter-based bits as the C++ kernels (``fmix32``), so CPU and GPU agree exactly.
"""
import torch
import triton
import triton.language as tl

from . import multi_tensor as _mt
from .multi_tensor import (BLOCK, CHUNK, MAX_STATES, _TL_DTYPES, StepArgs, _aptr, _chunk_tables, _fold_step_increment,
                           fmix32, _load_block, _rounded, _sr_offset, _step_scalars, _step_skipped, _store_block, _store_param,
                           aligned16, cached_table, pad_hyper, sr_offset_column, ticket_counter)


@triton.jit
def _elementwise_block(addr_table, row, offs, mask, step, lr, grad_mul, r_first, r_len, sr_offset, row_coef, reduce_out,
                       seed, sparse_table, sparse_lambda, sparse_beta,
                       H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                       UPDATE: tl.constexpr, REDUCE: tl.constexpr, NSTATE: tl.constexpr, NREDUCE: tl.constexpr,
                       PHASE: tl.constexpr, FLAGS: tl.constexpr, DTYPE: tl.constexpr, HAS_ROW_COEF: tl.constexpr,
                       ONE_ROW: tl.constexpr, STOCHASTIC: tl.constexpr, SPARSE: tl.constexpr,
                       SPARSE_OUT: tl.constexpr, NCOL: tl.constexpr, ALIGNED: tl.constexpr, PRUNE: tl.constexpr = 0):
    """One block of ``offs`` (``mask``: which lanes exist; an all-true constant in the main loop).
    ``PRUNE`` (prune-style unstructured sparsity, elementwise.h's SPARSE 3 / 4): 1 pruned where the
    tensor's uint8 mask (``sparse_table[row, 0]``) is 0, 2 where the hash of key ``sparse_table[row, 0]``
    and element ``sr_offset + offs`` is not below the threshold ``sparse_table[row, 1]``: the param and
    every state are stored 0 there."""
    p = _load_block(addr_table, row, 0, NCOL, offs, mask, DTYPE, ALIGNED)
    g = _load_block(addr_table, row, 1, NCOL, offs, mask, DTYPE, ALIGNED) * grad_mul
    s0 = p * 0.0
    s1 = s0
    s2 = s0
    s3 = s0
    if NSTATE >= 1:
        s0 = _load_block(addr_table, row, 2, NCOL, offs, mask, DTYPE, ALIGNED)
    if NSTATE >= 2:
        s1 = _load_block(addr_table, row, 3, NCOL, offs, mask, DTYPE, ALIGNED)
    if NSTATE >= 3:
        s2 = _load_block(addr_table, row, 4, NCOL, offs, mask, DTYPE, ALIGNED)
    if NSTATE >= 4:
        s3 = _load_block(addr_table, row, 5, NCOL, offs, mask, DTYPE, ALIGNED)
    rows = r_first + offs // r_len
    r0 = p * 0.0
    r1 = r0
    r2 = r0
    r3 = r0
    if HAS_ROW_COEF:
        r0 = tl.load(row_coef + rows * 4 + 0, mask=mask, other=1.0)  # 1: no 0/0 in masked lanes
        r1 = tl.load(row_coef + rows * 4 + 1, mask=mask, other=0.0)
        r2 = tl.load(row_coef + rows * 4 + 2, mask=mask, other=0.0)
        r3 = tl.load(row_coef + rows * 4 + 3, mask=mask, other=0.0)
    if PHASE == 0:
        if SPARSE:  # the sparse-training epilogue (elementwise.h's op_update_element)
            mptr = tl.load(sparse_table + row * 2).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                mptr = tl.multiple_of(mptr, 16)
            keep = tl.load(mptr + offs, mask=mask, other=1) != 0
            g = tl.where(keep | (sparse_lambda == 0.0), g, g + sparse_lambda * p)
        if PRUNE == 1:
            mptr = tl.load(sparse_table + row * 2).to(tl.pointer_type(tl.uint8))
            if ALIGNED:
                mptr = tl.multiple_of(mptr, 16)
            keep = tl.load(mptr + offs, mask=mask, other=1) != 0
        if PRUNE == 2:
            mkey = tl.load(sparse_table + row * 2).to(tl.uint32)
            threshold = tl.load(sparse_table + row * 2 + 1)
            bits = fmix32((offs + sr_offset).to(tl.uint32) * 0x9E3779B1 ^ mkey)
            keep = (bits.to(tl.int64) & 0xFFFFFFFF) < threshold
        p, s0, s1, s2, s3 = UPDATE(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                                   H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS)
        if PRUNE != 0:
            p = tl.where(keep, p, 0.0)
            s0 = tl.where(keep, s0, 0.0)
            s1 = tl.where(keep, s1, 0.0)
            s2 = tl.where(keep, s2, 0.0)
            s3 = tl.where(keep, s3, 0.0)
        stored = _store_param(_aptr(addr_table, row, 0, NCOL, DTYPE, ALIGNED), offs, mask, p, seed, row, step,
                              sr_offset, STOCHASTIC, DTYPE)
        if SPARSE_OUT:
            optr = tl.load(sparse_table + row * 2 + 1).to(tl.pointer_type(DTYPE))
            if ALIGNED:
                optr = tl.multiple_of(optr, 16)
            ps = stored.to(tl.float32)
            pruned = _rounded(tl.where(sparse_beta == 0.0, 0.0, sparse_beta * ps), DTYPE)
            tl.store(optr + offs, tl.where(keep, stored, pruned), mask=mask)
    else:
        s0, s1, s2, s3, a0, a1, a2, a3 = REDUCE(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3,
                                                H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS)
        if ONE_ROW:
            tl.atomic_add(reduce_out + r_first * 4 + 0, tl.sum(tl.where(mask, a0, 0.0), axis=0))
            if NREDUCE >= 2:
                tl.atomic_add(reduce_out + r_first * 4 + 1, tl.sum(tl.where(mask, a1, 0.0), axis=0))
            if NREDUCE >= 3:
                tl.atomic_add(reduce_out + r_first * 4 + 2, tl.sum(tl.where(mask, a2, 0.0), axis=0))
            if NREDUCE >= 4:
                tl.atomic_add(reduce_out + r_first * 4 + 3, tl.sum(tl.where(mask, a3, 0.0), axis=0))
        else:
            tl.atomic_add(reduce_out + rows * 4 + 0, a0, mask=mask)
            if NREDUCE >= 2:
                tl.atomic_add(reduce_out + rows * 4 + 1, a1, mask=mask)
            if NREDUCE >= 3:
                tl.atomic_add(reduce_out + rows * 4 + 2, a2, mask=mask)
            if NREDUCE >= 4:
                tl.atomic_add(reduce_out + rows * 4 + 3, a3, mask=mask)
    if NSTATE >= 1:
        _store_block(addr_table, row, 2, NCOL, offs, mask, s0, DTYPE, ALIGNED)
    if NSTATE >= 2:
        _store_block(addr_table, row, 3, NCOL, offs, mask, s1, DTYPE, ALIGNED)
    if NSTATE >= 3:
        _store_block(addr_table, row, 4, NCOL, offs, mask, s2, DTYPE, ALIGNED)
    if NSTATE >= 4:
        _store_block(addr_table, row, 5, NCOL, offs, mask, s3, DTYPE, ALIGNED)


# seed == 1 must not become a constexpr (seed.to in _store_param); n_tensors: no variant per count
@triton.jit(do_not_specialize=["seed", "n_tensors"])
def _elementwise_kernel(
    addr_table, numels, row_offset, row_len, block_tensor, block_start, ticket, n_tensors,
    lr_value, lr_ptr, grad_scale_ptr, found_inf_ptr, sign, row_coef, reduce_out, seed,
    sparse_table, sparse_lambda, sparse_beta,
    H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
    UPDATE: tl.constexpr, REDUCE: tl.constexpr, NSTATE: tl.constexpr, NREDUCE: tl.constexpr,
    PHASE: tl.constexpr, FLAGS: tl.constexpr, DTYPE: tl.constexpr,
    HAS_LR_PTR: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
    HAS_ROW_COEF: tl.constexpr, ONE_ROW: tl.constexpr, STOCHASTIC: tl.constexpr, HAS_STEPS: tl.constexpr,
    SPARSE: tl.constexpr, SPARSE_OUT: tl.constexpr,
    CHUNK_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, ALIGNED: tl.constexpr = False,
    FOLD_STEPS: tl.constexpr = False, PRUNE: tl.constexpr = 0, READ_OFFSET: tl.constexpr = False,
):
    NCOL: tl.constexpr = NSTATE + 4  # param, grad, states..., stochastic-rounding offset, step counter
    pid = tl.program_id(0)
    if _step_skipped(found_inf_ptr, HAS_FOUND_INF) == 0.0:
        row = tl.load(block_tensor + pid).to(tl.int64)
        start = tl.multiple_of(tl.load(block_start + pid), CHUNK_SIZE)  # chunks start at multiples of CHUNK
        n = tl.load(numels + row)
        end = tl.minimum(start + CHUNK_SIZE, n)
        lr, grad_mul, step = _step_scalars(addr_table, row, NCOL, lr_value, lr_ptr, grad_scale_ptr, sign,
                                           HAS_LR_PTR, HAS_GRAD_SCALE, HAS_STEPS)
        r_first = tl.load(row_offset + row)
        r_len = tl.load(row_len + row)
        sr_offset = _sr_offset(addr_table, row, NSTATE + 2, NCOL, READ_OFFSET)  # stochastic rounding or PRUNE 2
        # whole blocks unmasked (a constant all-true mask: 128-bit accesses when ALIGNED), then the tail
        full_end = start + (end - start) // BLOCK_SIZE * BLOCK_SIZE
        for off in range(start, full_end, BLOCK_SIZE):
            offs = off + tl.arange(0, BLOCK_SIZE)
            _elementwise_block(addr_table, row, offs, tl.full([BLOCK_SIZE], 1, tl.int1), step, lr, grad_mul, r_first,
                               r_len, sr_offset, row_coef, reduce_out, seed, sparse_table, sparse_lambda, sparse_beta,
                               H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                               UPDATE, REDUCE, NSTATE, NREDUCE, PHASE, FLAGS, DTYPE, HAS_ROW_COEF, ONE_ROW,
                               STOCHASTIC, SPARSE, SPARSE_OUT, NCOL, ALIGNED, PRUNE)
        if full_end < end:
            offs = full_end + tl.arange(0, BLOCK_SIZE)
            _elementwise_block(addr_table, row, offs, offs < end, step, lr, grad_mul, r_first,
                               r_len, sr_offset, row_coef, reduce_out, seed, sparse_table, sparse_lambda, sparse_beta,
                               H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15,
                               UPDATE, REDUCE, NSTATE, NREDUCE, PHASE, FLAGS, DTYPE, HAS_ROW_COEF, ONE_ROW,
                               STOCHASTIC, SPARSE, SPARSE_OUT, NCOL, ALIGNED, PRUNE)
        if FOLD_STEPS:  # the last program increments every step counter (multi_tensor._fold_step_increment)
            _fold_step_increment(ticket, addr_table, n_tensors, NCOL)


@triton.jit
def no_reduce(p, g, s0, s1, s2, s3, step, lr, r0, r1, r2, r3, H0, H1, H2, H3, H4, H5, H6, H7, H8, H9, H10, H11, H12, H13, H14, H15, FLAGS):
    z = p * 0.0
    return s0, s1, s2, s3, z, z, z, z


def elementwise_apply(update, reduce, nreduce, lists, steps, *, hyper, flags, lr, grad_scale=None,
                      found_inf=None, sign=1.0, phase=0, rows=None, row_coef=None, reduce_out=None,
                      seed=0, stochastic=False, sparse_mask=None, sparse_out=None, sparse_lambda=0.0,
                      sparse_beta=0.0, sr_offsets=None, sparse_prune=0, sparse_keys=None, sparse_threshold=0):
    """Run an op over ``lists`` = [params, grads, state 0, ...] in one launch (see the module doc).

    ``rows``: rows per tensor (or None: one row each); ``row_coef``: fp32 ``[total rows, 4]`` read by
    both phases; ``reduce_out``: fp32 ``[total rows, 4]`` added to by phase 1.  Phase 0 increments the
    ``steps`` unless ``found_inf`` is nonzero.  ``sparse_mask`` (bool/uint8 per param) switches on the
    sparse-training epilogue of phase 0: ``g += sparse_lambda * p`` where the mask is 0, and, with
    ``sparse_out``, the forward weights ``mask ? p : sparse_beta * p`` (see ``fastopt/elementwise.h``).
    ``sr_offsets`` (None, empty, or one non-negative int per tensor): stochastic rounding gives element
    ``i`` of tensor ``t`` the bits of element ``sr_offsets[t] + i`` (the C++ kernels' ``sr_offsets``).
    ``sparse_prune`` 1 (by ``sparse_mask``) or 2 (by the hash of ``sparse_keys[t]`` and element
    ``sr_offsets[t] + i``, kept below ``sparse_threshold``): prune-style unstructured sparsity, the
    param and every state stored 0 where pruned (the C++ kernels' ``sparse_prune``).
    """
    params = lists[0]
    if not params:
        return
    device = params[0].device
    nstate = len(lists) - 2
    if not 0 <= nstate <= MAX_STATES:
        raise ValueError(f"the Triton elementwise launcher takes 0 to {MAX_STATES} state lists, got {nstate}")
    hyper = pad_hyper(hyper)
    if stochastic and params[0].dtype != torch.bfloat16:
        raise ValueError("stochastic rounding is for bf16 params")  # as the C++ launchers check
    n = len(params)
    ncol = nstate + 4
    numels = tuple(p.numel() for p in params)
    sr_column = tuple(sr_offset_column(sr_offsets, n))
    rows = tuple(rows) if rows is not None else (1,) * n
    has_steps = bool(steps)
    step_addrs = tuple(s.data_ptr() for s in steps) if has_steps else (0,) * n
    addrs = tuple(t.data_ptr() for lst in lists for t in lst)
    # one cached device buffer: the address table [n, ncol] (param, grad, states, sr offset, step), then
    # numels, first row and row length per tensor; keyed on everything it holds
    addr_table, numel_t, offset_t, len_t = cached_table(
        ("elementwise", ncol, numels, rows, sr_column, step_addrs, addrs), device,
        lambda: _table_values(lists, numels, rows, sr_column, step_addrs))
    block_tensor, block_start = _chunk_tables(numels, device)
    scalars = StepArgs(device, lr, grad_scale, found_inf, sign)
    prune = int(sparse_prune)
    sparse = bool(sparse_mask) and prune == 0
    if (sparse or prune) and (phase != 0 or nreduce):
        raise ValueError("the sparse epilogue is for the update of ops without a reduce phase")
    sparse_table = scalars.dummy
    if prune == 1:
        masks = tuple(m.data_ptr() for m in sparse_mask)
        sparse_table, = cached_table(("prune", masks), device,
                                     lambda: ([v for m in masks for v in (m, 0)], [2 * n]))
    elif prune == 2:
        keys = tuple(int(k) for k in sparse_keys)
        if len(keys) != n:
            raise ValueError("sparse_prune 2 needs one mask key per tensor")
        thr = int(sparse_threshold)
        sparse_table, = cached_table(("prune-hash", keys, thr), device,
                                     lambda: ([v for k in keys for v in (k, thr)], [2 * n]))
    elif sparse:
        outs = tuple(o.data_ptr() for o in sparse_out) if sparse_out else (0,) * n
        masks = tuple(m.data_ptr() for m in sparse_mask)
        sparse_table, = cached_table(("sparse", masks, outs), device,
                                     lambda: ([v for pair in zip(masks, outs) for v in pair], [2 * n]))
    programs = block_tensor.numel()
    fold = phase == 0 and has_steps and programs > 0 and _mt.FOLD_STEPS
    if programs > 0:
        _elementwise_kernel[(programs,)](
            addr_table, numel_t, offset_t, len_t, block_tensor, block_start,
            ticket_counter(device) if fold else scalars.dummy, n, *scalars.args,
            scalars.or_dummy(row_coef), scalars.or_dummy(reduce_out),
            int(seed) & 0xFFFFFFFF, sparse_table, float(sparse_lambda), float(sparse_beta), *hyper,
            UPDATE=update, REDUCE=reduce, NSTATE=nstate, NREDUCE=max(int(nreduce), 1), PHASE=int(phase),
            FLAGS=int(flags), DTYPE=_TL_DTYPES[params[0].dtype], **scalars.constexprs,
            HAS_ROW_COEF=row_coef is not None, ONE_ROW=all(r == 1 for r in rows), STOCHASTIC=bool(stochastic),
            HAS_STEPS=has_steps, SPARSE=sparse, SPARSE_OUT=sparse and bool(sparse_out),
            ALIGNED=aligned16(*lists, sparse_mask or (), sparse_out or ()), CHUNK_SIZE=CHUNK, BLOCK_SIZE=BLOCK,
            FOLD_STEPS=fold, PRUNE=prune, READ_OFFSET=bool(stochastic) or prune == 2, enable_fp_fusion=False,
        )
    if phase == 0 and has_steps and not fold:
        scalars.increment_steps(addr_table, n, ncol)


def _table_values(lists, numels, rows, sr_column, step_addrs):
    """(the flat int64 values of the launch buffer, the sizes of its parts: the address table, numels,
    first rows, row lengths)."""
    n = len(numels)
    values = []
    for t, row in enumerate(zip(*lists)):
        values += [x.data_ptr() for x in row]
        values += [sr_column[t], step_addrs[t]]
    offsets, lens, acc = [], [], 0
    for nel, r in zip(numels, rows):
        offsets.append(acc)
        lens.append(max(nel // r, 1))
        acc += r
    values += list(numels) + offsets + lens
    return values, [len(values) - 3 * n, n, n, n]
