"""Native and Triton entry points registered as ``torch.library.custom_op``s.

Each op takes already-validated lists (same device, same dtype, dense, matching layouts; see
``fastopt.optim.functional``) and a resolved kernel backend ('cuda', 'triton' or 'cpu').  The fake
implementations let ``torch.compile`` see the ops; they mutate in place and return nothing.

In eager mode the public callers (``adam_step`` ...) skip the custom-op dispatcher, whose Python layers
cost more than a small kernel, and call the kernel directly, bumping the autograd version
counters of what it mutated themselves; under ``torch.compile`` they call the custom op.
"""
import functools
import inspect
import math
import operator
import weakref
from collections import OrderedDict
from itertools import chain
from typing import List, NamedTuple, Optional, Sequence, Union

import torch
from torch import Tensor

from . import _backend, _sharded, _tickets

# NOTE: [the tensor boundary]
# No call into fastopt._C or a Triton launcher may make a kernel touch memory its tensors do not own.
# Every entry point below therefore checks, before any kernel runs, every tensor it hands over: its
# device, dtype and layout, that it is dense (the kernels walk it as one flat buffer), that its
# storage holds its whole extent (a storage resized after the tensor was made may not), and that the
# element counts of parallel lists agree; and it passes every tensor's numel to C++, which checks the
# agreement again.  The full check of a call is remembered (keyed on every tensor's address, numel
# and dtype, and held by weak references to the very tensor objects) so that a steady-state step
# re-checks only those keys: a tensor whose storage is resized or replaced changes its address, and
# while a checked tensor object is alive nothing else can own its memory.  The tensors a call steps
# concurrently (its params) must also not share memory with one another.
#
# Under torch.compile these checks are not traced (addresses do not exist at trace time): the custom
# ops' implementations below run them at run time, on the very tensors the compiled graph hands to
# the kernel, exactly as in eager mode (see NOTE: [checks under torch.compile] in fastopt/optim/base.py).


class _Call:
    """The tensors of one kernel call, registered list by list with what each must be, then checked
    at once by :meth:`check` (see NOTE: [the tensor boundary])."""

    _checked = OrderedDict()  # call key -> weak references to the tensors it was checked with
    _MAX_CHECKED = 512

    def __init__(self, op, device):
        self.op = op
        self.device = device
        self.lists = {}   # name -> (tensors, dtype, numels, strides like); in registration order
        self.disjoint = []  # names of the lists whose tensors must not share memory

    def add(self, name, tensors, dtype, numels=None, like=None, disjoint=False):
        """Register the tensors ``name`` of ``dtype`` whose numels must equal ``numels`` (a list, or
        None: any) and whose strides must be those of the parallel list ``like`` (or None); with
        ``disjoint``, no two of them may share memory; returns their numels."""
        tensors = list(tensors)
        found = list(map(Tensor.numel, tensors))
        if numels is not None and found != list(numels):
            if len(found) != len(numels):
                raise ValueError(f"fastopt::{self.op}: {name} has {len(found)} tensors, expected {len(numels)}")
            i = next(i for i, (f, want) in enumerate(zip(found, numels)) if f != want)
            raise ValueError(f"fastopt::{self.op}: {name}[{i}] has {found[i]} elements, expected {numels[i]}")
        self.lists[name] = (tensors, dtype, found, like)
        if disjoint:
            self.disjoint.append(name)
        return found

    def add_scalar(self, name, t, dtype=torch.float32, numel=1):
        """An optional buffer ``t`` (None: absent) of at least ``numel`` elements (a device scalar: 1)."""
        if t is None:
            return
        if t.numel() < numel:
            raise ValueError(f"fastopt::{self.op}: {name} has {t.numel()} elements, needs at least {numel}")
        self.add(name, [t], dtype)

    def check(self):
        """Check every registered tensor, or find the same tensors checked before; then
        :meth:`ptrs` / :meth:`numels` give the call's arguments."""
        tensors = list(chain.from_iterable(ts for ts, _, _, _ in self.lists.values()))
        self._ptrs = {name: list(map(Tensor.data_ptr, ts)) for name, (ts, _, _, _) in self.lists.items()}
        # (A checked tensor object whose address and numel are unchanged cannot have changed its dtype
        # to one that reaches past its storage; the dtypes are checked on every miss.)
        key = (self.device, tuple(chain.from_iterable(self._ptrs.values())),
               tuple(chain.from_iterable(ns for _, _, ns, _ in self.lists.values())),
               tuple((name, dtype, len(ts)) for name, (ts, dtype, _, _) in self.lists.items()))
        refs = self._checked.get(key)
        if refs is None or not all(map(operator.is_, map(operator.call, refs), tensors)):
            self._check_all()
            self._checked[key] = [weakref.ref(t) for t in tensors]
            if len(self._checked) > self._MAX_CHECKED:
                self._checked.popitem(last=False)
        else:
            self._checked.move_to_end(key)
        return self

    def ptrs(self, *names):
        """The addresses of the lists ``names``, one after the other (absent optional buffers: 0)."""
        out = []
        for name in names:
            out += self._ptrs.get(name, [0])
        return out

    def ptr(self, name):
        return self.ptrs(name)[0]

    def numels(self, *names):
        return [n for name in names for n in self.lists[name][2]]

    def _check_all(self):
        for name, (tensors, dtype, _, like) in self.lists.items():
            for i, t in enumerate(tensors):
                where = f"fastopt::{self.op}: {name}[{i}]"
                if t.dtype != dtype:
                    raise ValueError(f"{where} is {t.dtype}, expected {dtype}")
                if t.layout != torch.strided:
                    raise ValueError(f"{where} is a {t.layout} tensor; the kernels take strided tensors")
                if t.device != self.device:
                    raise ValueError(f"{where} is on {t.device}, the call on {self.device}")
                if t.numel() == 0:
                    continue
                if t.data_ptr() == 0:
                    raise ValueError(f"{where} has no storage (a null address)")
                if not is_dense(t):
                    raise ValueError(f"{where} is not dense (strides {t.stride()} for shape {tuple(t.shape)}); "
                                     "the kernels walk every tensor as one flat buffer")
                if like is not None and t.numel() > 1 and t.stride() != like[i].stride():
                    raise ValueError(f"{where} has strides {t.stride()}, its parameter {like[i].stride()}")
                extent = (t.storage_offset() + t.numel()) * t.element_size()
                if extent > t.untyped_storage().nbytes():
                    raise ValueError(f"{where}: its storage ({t.untyped_storage().nbytes()} bytes) is smaller "
                                     f"than its extent ({extent} bytes)")
        for name in self.disjoint:
            spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes, i) for i, t in enumerate(self.lists[name][0])
                           if t.numel())
            for (_, end, i), (start, _, j) in zip(spans, spans[1:]):
                if start < end:
                    raise ValueError(f"fastopt::{self.op}: {name}[{i}] and {name}[{j}] share memory (views of one "
                                     "tensor that overlap); the kernels step them concurrently, so each must own "
                                     "its elements")


def _step_call(op, params, grads, lr_tensor, grad_scale, found_inf):
    """A :class:`_Call` of an optimizer step with its params, grads (the params' numels, dtype and
    strides) and optional device scalars registered; returns it and the params' numels."""
    call = _Call(op, params[0].device)
    numels = call.add("params", params, params[0].dtype, disjoint=True)
    call.add("grads", grads, params[0].dtype, numels, like=params)
    for name, t in (("lr_tensor", lr_tensor), ("grad_scale", grad_scale), ("found_inf", found_inf)):
        call.add_scalar(name, t)
    return call, numels


def _host_lr(lr, lr_tensor):
    """(lr, lr_tensor) as the kernels take them: a CPU ``lr_tensor`` is read here, on the host, as a
    double (reading a CPU tensor never syncs with a GPU; an fp64 one -- the mirror of a float ``lr``
    that a compiled step reads, see NOTE: [lr under torch.compile] in fastopt/optim/functional.py -- keeps
    every bit of the float, so a compiled step gives the eager step's numbers); a device
    ``lr_tensor`` is read by the kernel as fp32."""
    if lr_tensor is not None and lr_tensor.device.type == "cpu":
        if lr_tensor.numel() != 1:
            raise ValueError(f"fastopt: a tensor lr must have one element, got {lr_tensor.numel()}")
        return float(lr_tensor), None
    return lr, lr_tensor


def is_dense(t):
    """True when ``t`` covers its storage span without gaps or overlaps (any dimension order)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


# The CUDA optimizer steps that fold their step-counter increment into their main launches (issue 18):
# they take the address of the stream's ticket counter (fastopt/_tickets.py) before the stream.
_TICKET_OPS = frozenset(("adam", "elementwise", "lowbit"))


def _run_native(backend, name, device, args, op):
    """``fastopt._C.<name>_cpu(*args)`` or ``<name>_cuda(*args[, ticket], stream)`` on ``device``'s current
    stream (the ticket: :func:`fastopt._tickets.step_ticket`, for the optimizer steps of ``_TICKET_OPS``)."""
    native = _backend.native()
    if backend == "cpu":
        getattr(native, name + "_cpu")(*args)
    elif backend == "cuda":
        with torch.cuda.device(device):
            stream = torch.cuda.current_stream(device)
            ticket = (_tickets.step_ticket(stream.device).data_ptr(),) if name in _TICKET_OPS else ()
            getattr(native, name + "_cuda")(*args, *ticket, stream.cuda_stream)
    else:
        raise ValueError(f"fastopt::{op} has no kernel backend {backend!r}")


def _tensors_of(value):
    if value is None:
        return []
    return [value] if isinstance(value, Tensor) else [t for t in value if t is not None]


def _kernel_op(name, mutates):
    """Register ``kernel`` as the custom op ``fastopt::<name>`` (mutating the arguments ``mutates``,
    returning nothing, with a fake implementation that does nothing) and return ``(op, call)``.

    ``call`` takes the kernel's arguments (positional or by name).  Under ``torch.compile`` it calls
    the custom op, which the graph records; in eager mode it skips the dispatcher, whose Python layers
    cost about as much as a small kernel, calls the kernel directly and bumps the autograd version
    counters of what it mutated, as the dispatcher would."""
    def register(kernel):
        op = torch.library.custom_op(f"fastopt::{name}", mutates_args=mutates)(kernel)
        op.register_fake(_no_output)
        names = tuple(inspect.signature(kernel).parameters)

        def call(*args, **kwargs):
            kwargs.update(zip(names, args))
            if torch.compiler.is_compiling():
                op(**kwargs)
                return
            kernel(**kwargs)
            torch.autograd.graph.increment_version([t for m in mutates for t in _tensors_of(kwargs[m])])

        call.__name__ = call.__qualname__ = name.rstrip("_")
        call.__doc__ = f"``fastopt::{name}`` (same arguments); eager calls skip the dispatcher."
        return op, call
    return register


def _no_output(*args, **kwargs):
    return None


def _adam_kernel(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               max_exp_avg_sqs: List[Tensor], state_steps: List[Tensor], lr: float, lr_tensor: Optional[Tensor],
               beta1: float, beta2: float, eps: float, weight_decay: float, decoupled: bool, amsgrad: bool,
               maximize: bool, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], backend: str) -> None:
    """Fused Adam/AdamW over lists of tensors (see fastopt.optim.functional.adam for the semantics)."""
    if not params:
        return
    lr, lr_tensor = _host_lr(lr, lr_tensor)
    names = ("params", "grads", "exp_avgs", "exp_avg_sqs") + (("max_exp_avg_sqs",) if amsgrad else ())
    call, numels = _step_call("adam_step_", params, grads, lr_tensor, grad_scale, found_inf)
    for name, lst in zip(names[2:], (exp_avgs, exp_avg_sqs, max_exp_avg_sqs)):
        call.add(name, lst, params[0].dtype, numels, like=params)
    call.add("state_steps", state_steps, torch.float32, [1] * len(params))
    call.check()
    if backend == "triton":
        _backend.triton_kernels().adam_step(
            params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps,
            lr=lr_tensor if lr_tensor is not None else lr, beta1=beta1, beta2=beta2, eps=eps,
            weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad, maximize=maximize,
            grad_scale=grad_scale, found_inf=found_inf)
        return
    args = (
        call.ptrs(*names), call.numels(*names), call.ptrs("state_steps"), _backend.dtype_code(params[0].dtype), lr,
        call.ptr("lr_tensor"), beta1, beta2, eps, weight_decay, decoupled, amsgrad, maximize, call.ptr("grad_scale"),
        call.ptr("found_inf"),
    )
    _run_native(backend, "adam", params[0].device, args, "adam_step_")


adam_step_, adam_step = _kernel_op(
    "adam_step_", mutates=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs", "state_steps"))(_adam_kernel)


def _check_sr_offsets(op, sr_offsets, n):
    """The stochastic-rounding element offsets of a call with ``n`` params as a list of ints: [] (every
    offset 0) for None or [], else exactly one non-negative int per param (the index of the param's
    first element in the whole tensor it is a contiguous piece of, e.g. an FSDP2 shard on dim 0), so
    that element ``i`` rounds with the bits of element ``offset + i`` and a tensor stepped as pieces
    rounds exactly as stepped whole.  Raises ValueError before anything is written."""
    from .reference.rounding import check_offsets

    return check_offsets(sr_offsets, n, f"fastopt::{op}: sr_offsets")


def _elementwise_kernel(op: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor],
                        state_steps: List[Tensor], hyper: List[float], flags: int, lr: float,
                        lr_tensor: Optional[Tensor], maximize: bool, grad_scale: Optional[Tensor],
                        found_inf: Optional[Tensor], phase: int, rows: List[int], row_coef: Optional[Tensor],
                        reduce_out: Optional[Tensor], seed: int, stochastic: bool, backend: str,
                        sparse_mask: List[Tensor], sparse_out: List[Tensor], sparse_lambda: float,
                        sparse_beta: float, sr_offsets: Optional[List[int]] = None, sparse_prune: int = 0,
                        sparse_keys: Optional[List[int]] = None, sparse_threshold: int = 0) -> None:
    """One call of a registered elementwise op (``csrc/include/fastopt/ops.h``): ``states`` holds the
    op's state lists one after the other (``k * len(params)`` tensors).  Phase 0 is the update and
    increments ``state_steps``; phase 1 adds per-row sums into ``reduce_out`` (fp32 ``[rows, 4]``).
    ``sparse_mask`` (one bool mask per param, or []) adds the sparse-training epilogue to phase 0:
    the params are dense weights, ``g += sparse_lambda * p`` where the mask is False, and
    ``sparse_out`` (forward weights, or []) gets ``mask ? p : sparse_beta * p`` (see
    ``csrc/include/fastopt/elementwise.h``).  ``sr_offsets`` (None, [], or one non-negative int per
    param): stochastic rounding gives element ``i`` of param ``t`` the bits of element
    ``sr_offsets[t] + i`` -- its index in the whole tensor when ``params[t]`` is a piece (an FSDP2
    shard) starting there (see :func:`_check_sr_offsets`).  ``sparse_prune`` (prune-style unstructured
    sparsity, ``fastopt.sparse.RandomSparsity`` / ``MagnitudeSparsity``; the params hold the sparse
    weights): 1 writes 0 to the param and every state where ``sparse_mask`` is False; 2 where the hash
    mask (``fastopt/reference/unstructured.py``) of key ``sparse_keys[t]`` (one uint32 per param) and
    ``sparse_threshold`` (``floor(density * 2**32)``) drops element ``sr_offsets[t] + i``."""
    if not params:
        return
    lr, lr_tensor = _host_lr(lr, lr_tensor)
    n = len(params)
    sr_offsets = _check_sr_offsets("elementwise_step_", sr_offsets, n)
    sparse_keys = list(sparse_keys or ())
    if sparse_prune not in (0, 1, 2):
        raise ValueError(f"fastopt::elementwise_step_: sparse_prune must be 0, 1 or 2, got {sparse_prune!r}")
    if sparse_prune == 2 and (len(sparse_keys) != n or sparse_mask or sparse_out
                              or any(not 0 <= int(k) < 2 ** 32 for k in sparse_keys)
                              or not 0 <= int(sparse_threshold) < 2 ** 32):
        raise ValueError("fastopt::elementwise_step_: sparse_prune 2 needs one uint32 key per param, a threshold in "
                         "[0, 2**32) and no sparse masks or outputs")
    if sparse_prune == 1 and (not sparse_mask or sparse_out or sparse_lambda or sparse_beta):
        raise ValueError("fastopt::elementwise_step_: sparse_prune 1 needs sparse_mask and no sparse_out, lambda "
                         "or beta")
    if sparse_prune != 2 and sparse_keys:
        raise ValueError("fastopt::elementwise_step_: sparse_keys are for sparse_prune 2")
    nstates = len(states) // n
    if _backend.has_cpu():  # the op registry (without fastopt._C, Triton loads the lists it is given)
        nstates = _backend.native().op_shape(op)[0]
    if len(states) != nstates * n:
        raise ValueError(f"fastopt::elementwise_step_: {len(states)} state tensors for {n} params of op {op!r}")
    dtype = params[0].dtype
    call, numels = _step_call("elementwise_step_", params, grads, lr_tensor, grad_scale, found_inf)
    call.add("states", states, dtype, numels * nstates, like=params * nstates)
    call.add("state_steps", state_steps, torch.float32, [1] * n if state_steps else [])
    if rows:
        if len(rows) != n or any(r < 1 or (m and m % r) for r, m in zip(rows, numels)):
            raise ValueError("fastopt::elementwise_step_: rows must give each tensor a row count >= 1 that divides "
                             "its numel")
    total_rows = sum(rows) if rows else n
    call.add_scalar("row_coef", row_coef, numel=4 * total_rows)
    call.add_scalar("reduce_out", reduce_out, numel=4 * total_rows)
    if sparse_mask:
        call.add("sparse_mask", sparse_mask, sparse_mask[0].dtype, numels, like=params)
        if sparse_mask[0].dtype not in (torch.bool, torch.uint8):
            raise ValueError(f"fastopt::elementwise_step_: sparse masks are bool or uint8, not {sparse_mask[0].dtype}")
        if sparse_out:
            call.add("sparse_out", sparse_out, dtype, numels, like=params)
    elif sparse_out:
        raise ValueError("fastopt::elementwise_step_: sparse_out needs sparse_mask")
    call.check()
    if backend == "triton":
        lists = [params, grads] + [states[k * n:(k + 1) * n] for k in range(nstates)]
        _backend.triton_kernels().elementwise_step(
            op, lists, state_steps, hyper=hyper, flags=flags, lr=lr_tensor if lr_tensor is not None else lr,
            grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0, phase=phase,
            rows=rows or None, row_coef=row_coef, reduce_out=reduce_out, seed=seed, stochastic=stochastic,
            sparse_mask=sparse_mask, sparse_out=sparse_out, sparse_lambda=sparse_lambda, sparse_beta=sparse_beta,
            sr_offsets=sr_offsets, sparse_prune=int(sparse_prune), sparse_keys=sparse_keys,
            sparse_threshold=int(sparse_threshold))
        return
    sparse_names = ("sparse_mask", "sparse_out") if sparse_out else ("sparse_mask",) if sparse_mask else ()
    args = (
        op, call.ptrs("params", "grads", "states"), call.numels("params", "grads", "states"), call.ptrs("state_steps"),
        _backend.dtype_code(dtype), list(hyper), int(flags), float(lr), call.ptr("lr_tensor"),
        call.ptr("grad_scale"), call.ptr("found_inf"), bool(maximize), int(phase), list(rows),
        call.ptr("row_coef"), call.ptr("reduce_out"), int(seed) & 0xFFFFFFFFFFFFFFFF, bool(stochastic),
        call.ptrs("sparse_mask") if sparse_mask else [], call.ptrs("sparse_out") if sparse_out else [],
        call.numels(*sparse_names), float(sparse_lambda), float(sparse_beta), sr_offsets,
        int(sparse_prune), [int(k) for k in sparse_keys], int(sparse_threshold),
    )
    _run_native(backend, "elementwise", params[0].device, args, "elementwise_step_")


elementwise_step_, elementwise_step = _kernel_op(
    "elementwise_step_", mutates=("params", "states", "state_steps", "reduce_out", "sparse_out"))(_elementwise_kernel)


def _lowbit_kernel(op: str, params: List[Tensor], grads: List[Tensor], states: List[Tensor], absmax: List[Tensor],
                   books: List[Tensor], block: int, state_steps: List[Tensor], hyper: List[float], flags: int,
                   lr: float, lr_tensor: Optional[Tensor], maximize: bool, grad_scale: Optional[Tensor],
                   found_inf: Optional[Tensor], seed: int, stochastic: bool, colmax: List[Tensor],
                   rank1: List[bool], rank1_rows: List[int], backend: str,
                   sr_offsets: Optional[List[int]] = None) -> None:
    """One step of a registered elementwise op with low-bit states (``csrc/include/fastopt/quant.h``):
    ``states`` holds the op's state lists one after the other (uint8 codes for a quantized state, the
    params' dtype for a plain one); ``books`` one int32 codebook per state (an empty tensor: plain);
    ``absmax`` the fp32 block maxima of the quantized states, state after state.  Rank-1 normalized
    states (``rank1[k]``; CPU only) hold row maxima in ``absmax`` and column maxima in ``colmax`` (the
    rank-1 states' lists, state after state); ``rank1_rows`` gives each tensor's rows; ``sr_offsets`` as
    for :func:`_elementwise_kernel` (the stochastic rounding of bf16 params keyed on the element's index
    in the whole tensor)."""
    if not params:
        return
    lr, lr_tensor = _host_lr(lr, lr_tensor)
    n = len(params)
    sr_offsets = _check_sr_offsets("lowbit_step_", sr_offsets, n)
    nstates = len(books)
    if len(states) != n * nstates:
        raise ValueError(f"fastopt::lowbit_step_: {len(states)} state tensors for {n} params and {nstates} books")
    dtype = params[0].dtype
    call, numels = _step_call("lowbit_step_", params, grads, lr_tensor, grad_scale, found_inf)
    if block < 2 or block % 2 or any(m % block for m in numels):
        raise ValueError(f"fastopt::lowbit_step_: every numel must be a multiple of an even block, got {block}")
    bits = [_codebook_bits(b, params[0].device) for b in books]
    quantized = [b is not None for b in bits]
    rank1 = (list(rank1) + [False] * nstates)[:nstates]
    any_r1 = any(rank1)
    if any_r1 and backend != "cpu":
        raise _backend.BackendUnavailableError(
            f"rank-1 normalized low-bit states run on the cpu and torch backends only, not {backend!r}")
    if any_r1 and (len(rank1_rows) != n or any(r < 1 or m % r for r, m in zip(rank1_rows, numels))):
        raise ValueError("fastopt::lowbit_step_: rank1_rows must give each tensor a row count >= 1 that divides it")
    absmax_it, colmax_it, per_state = iter(absmax), iter(colmax), []
    scale_names, colmax_names = [], []
    for k in range(nstates):
        chunk = states[k * n:(k + 1) * n]
        if not quantized[k]:
            if rank1[k]:
                raise ValueError(f"fastopt::lowbit_step_: state {k} is rank-1 normalized but has no codebook")
            call.add(f"states[{k}]", chunk, dtype, numels, like=params)
            per_state.append(None)
            continue
        call.add(f"states[{k}]", chunk, torch.uint8, [m * bits[k] // 8 for m in numels])
        scales = [next(absmax_it, None) for _ in range(n)]
        if any(s is None for s in scales):
            raise ValueError("fastopt::lowbit_step_: one absmax tensor per quantized state and param is required")
        want = list(rank1_rows) if rank1[k] else [m // block for m in numels]
        scale_names.append(f"absmax[{k}]")
        call.add(scale_names[-1], scales, torch.float32, want)
        per_state.append(scales)
        if rank1[k]:
            cols = [next(colmax_it, None) for _ in range(n)]
            if any(c is None for c in cols):
                raise ValueError("fastopt::lowbit_step_: one colmax tensor per rank-1 state and param is required")
            colmax_names.append(f"colmax[{k}]")
            call.add(colmax_names[-1], cols, torch.float32, [m // r for m, r in zip(numels, rank1_rows)])
    call.add("state_steps", state_steps, torch.float32, [1] * n)
    call.check()
    if backend == "triton":
        lists = [params, grads] + [states[k * n:(k + 1) * n] for k in range(nstates)]
        _backend.triton_kernels().lowbit_step(
            op, lists, state_steps, books=[b if q else None for b, q in zip(books, quantized)], absmax=per_state,
            block=block, hyper=hyper, flags=flags, lr=lr_tensor if lr_tensor is not None else lr,
            grad_scale=grad_scale, found_inf=found_inf, sign=-1.0 if maximize else 1.0, seed=seed,
            stochastic=stochastic, sr_offsets=sr_offsets)
        return
    state_names = [f"states[{k}]" for k in range(nstates)]
    absmax_addrs, absmax_numels, colmax_addrs, colmax_numels = [], [], [], []
    for k in range(nstates):
        absmax_addrs += call.ptrs(f"absmax[{k}]") if quantized[k] else [0] * n
        absmax_numels += call.numels(f"absmax[{k}]") if quantized[k] else [0] * n
        if any_r1:
            colmax_addrs += call.ptrs(f"colmax[{k}]") if rank1[k] else [0] * n
            colmax_numels += call.numels(f"colmax[{k}]") if rank1[k] else [0] * n
    args = (
        op, call.ptrs("params", "grads", *state_names), call.numels("params", "grads", *state_names),
        call.ptrs("state_steps"), _backend.dtype_code(dtype), list(hyper), int(flags), float(lr),
        call.ptr("lr_tensor"), call.ptr("grad_scale"), call.ptr("found_inf"), bool(maximize), 0, [], 0, 0,
        int(seed) & 0xFFFFFFFFFFFFFFFF, bool(stochastic),
        [b.data_ptr() if q else 0 for b, q in zip(books, quantized)], absmax_addrs, absmax_numels, int(block),
        colmax_addrs, colmax_numels, [int(r) for r in rank1_rows] if any_r1 else [], sr_offsets,
    )
    _run_native(backend, "lowbit", params[0].device, args, "lowbit_step_")


def _add_contiguous(call, name, t, dtype, numel=None, shape=None):
    """Register the single contiguous tensor ``t`` of ``dtype`` (``numel`` elements, ``shape``) with ``call``."""
    if t is None:
        raise ValueError(f"fastopt::{call.op}: {name} is required")
    if not t.is_contiguous() or (shape is not None and tuple(t.shape) != tuple(shape)):
        raise ValueError(f"fastopt::{call.op}: {name} must be a contiguous tensor"
                         + (f" of shape {tuple(shape)}" if shape is not None else "") + f", got {tuple(t.shape)}")
    call.add(name, [t], dtype, None if numel is None else [numel])


def _codebook_bits(book, device):
    """Bits per code of ``book``, or None for an empty tensor (a plain state).  A kernel trusts a
    codebook's header to size its tables, so ``book`` must be one of fastopt's codebooks on ``device``
    (``fastopt.lowbit.codebook``) or an int32 tensor equal to one."""
    if book.numel() == 0:
        return None
    if book.dtype == torch.int32 and book.device == device:
        known = _known_codebooks(device)
        hit = known.get(book.data_ptr())
        if hit is not None:
            return hit[1]
        for fmt_book, bits in known.values():
            if book.shape == fmt_book.shape and torch.equal(book, fmt_book):
                return bits
    raise ValueError(f"fastopt: a codebook must be one of fastopt.lowbit.codebook()'s on the call's device ({device}), "
                     f"got {book.dtype}{tuple(book.shape)} on {book.device}")


@functools.lru_cache(maxsize=None)
def _known_codebooks(device):
    """{address: (codebook, bits per code)} of every codebook fastopt keeps on ``device`` (they live for
    the process)."""
    from .lowbit.codebook import FORMATS, codebook
    books = {name: codebook(name, device) for name in FORMATS}
    return {book.data_ptr(): (book, FORMATS[name].bits) for name, book in books.items()}


lowbit_step_, lowbit_step = _kernel_op(
    "lowbit_step_", mutates=("params", "states", "absmax", "state_steps", "colmax"))(_lowbit_kernel)


def _codec_kernel(x: Tensor, codes: Tensor, absmax: Tensor, book: Tensor, block: int, dequantize: bool,
                  backend: str) -> None:
    """Blockwise quantize (``x`` -> ``codes``, ``absmax``) or dequantize (-> ``x``) of one fp32 buffer."""
    if x.numel() == 0:
        return
    bits = _codebook_bits(book, x.device) if book.numel() else None
    if bits is None or block < 2 or block % 2 or x.numel() % block:
        raise ValueError(f"fastopt::blockwise_codec_: needs one of fastopt's codebooks and a numel ({x.numel()}) that "
                         f"is a multiple of an even block ({block})")
    call = _Call("blockwise_codec_", x.device)
    _add_contiguous(call, "x", x, torch.float32)
    _add_contiguous(call, "codes", codes, torch.uint8, x.numel() * bits // 8)
    _add_contiguous(call, "absmax", absmax, torch.float32, x.numel() // block)
    call.check()
    if backend == "triton":
        _backend.triton_kernels().quantize_blockwise(x, codes, absmax, book, block, dequantize=dequantize)
        return
    args = (call.ptr("x"), call.ptr("codes"), call.ptr("absmax"), x.numel(), codes.numel(), absmax.numel(), int(block),
            book.data_ptr(), bool(dequantize))
    _run_native(backend, "quantize", x.device, args, "blockwise_codec_")


blockwise_codec_, blockwise_codec = _kernel_op("blockwise_codec_", mutates=("x", "codes", "absmax"))(_codec_kernel)


def _nm_mask_kernel(x: Tensor, out: Tensor, outer: int, length: int, inner: int, n: int, m: int,
                    backend: str) -> None:
    """N:M mask of the contiguous ``x`` viewed as [outer, length, inner] into uint8 ``out``."""
    if x.numel() == 0:
        return
    if min(outer, length, inner) < 0 or outer * length * inner != x.numel():
        raise ValueError(f"fastopt::nm_mask_: [{outer}, {length}, {inner}] does not cover x's {x.numel()} elements")
    call = _Call("nm_mask_", x.device)
    _add_contiguous(call, "x", x, x.dtype)
    _add_contiguous(call, "out", out, torch.uint8, x.numel())
    call.check()
    if backend == "triton":
        _backend.triton_kernels().nm_mask(x, out, outer, length, inner, n, m)
        return
    args = (call.ptr("x"), call.ptr("out"), outer, length, inner, n, m, _backend.dtype_code(x.dtype))
    _run_native(backend, "nm_mask", x.device, args, "nm_mask_")


nm_mask_, nm_mask = _kernel_op("nm_mask_", mutates=("out",))(_nm_mask_kernel)


def _transposable_mask_kernel(x: Tensor, out: Tensor, rows: int, cols: int, exact: bool, backend: str) -> None:
    """Transposable 2:4 mask of the contiguous [rows, cols] ``x`` into uint8 ``out``."""
    if x.numel() == 0:
        return
    if min(rows, cols) < 0 or rows * cols != x.numel():
        raise ValueError(f"fastopt::transposable_mask_: [{rows}, {cols}] does not cover x's {x.numel()} elements")
    call = _Call("transposable_mask_", x.device)
    _add_contiguous(call, "x", x, x.dtype)
    _add_contiguous(call, "out", out, torch.uint8, x.numel())
    call.check()
    if backend == "triton":
        _backend.triton_kernels().transposable_mask(x, out, rows, cols, exact)
        return
    args = (call.ptr("x"), call.ptr("out"), rows, cols, _backend.dtype_code(x.dtype), bool(exact))
    _run_native(backend, "transposable_mask", x.device, args, "transposable_mask_")


transposable_mask_, transposable_mask = _kernel_op("transposable_mask_", mutates=("out",))(_transposable_mask_kernel)


def _ot_pass_kernel(x: Optional[Tensor], y: Optional[Tensor], cost_matrix: Optional[Tensor], h: Tensor,
                    c: Optional[Tensor], out: Tensor, eps: float, cost: int, kind: int, backend: str) -> None:
    """One entropic-OT pass (``csrc/include/fastopt/api.h`` OtArgs, ``triton_kernels/ot.py``) into ``out``:
    kind 0 ``out_i = LSE_j(h_j - C_ij / eps)``, kind 1 ``out_i = sum_j exp(c_i + h_j - C_ij / eps) dC_ij/dx_i``
    over contiguous points ``x`` (B, n, d), ``y`` (B, m, d) or a dense ``cost_matrix`` (B, n, m)."""
    if out.numel() == 0:
        return
    ref = cost_matrix if cost_matrix is not None else x
    if ref is None or ref.dim() != 3 or h.dim() != 2:
        raise ValueError("fastopt::ot_pass_: needs points x (B, n, d) and y (B, m, d) or a cost matrix (B, n, m), "
                         "and h (B, m)")
    batch, n, m = ref.shape[0], ref.shape[1], h.shape[1]
    d = 0 if cost_matrix is not None else x.shape[2]
    call = _Call("ot_pass_", ref.device)
    if cost_matrix is not None:
        if x is not None or y is not None or kind != 0:
            raise ValueError("fastopt::ot_pass_: a cost matrix takes no points, and only the log-sum-exp pass")
        _add_contiguous(call, "cost_matrix", cost_matrix, ref.dtype, batch * n * m, (batch, n, m))
    else:
        _add_contiguous(call, "x", x, ref.dtype, batch * n * d, (batch, n, d))
        _add_contiguous(call, "y", y, ref.dtype, batch * m * d, (batch, m, d))
    _add_contiguous(call, "h", h, torch.float32, batch * m, (batch, m))
    if kind == 1:
        _add_contiguous(call, "c", c, torch.float32, batch * n, (batch, n))
    _add_contiguous(call, "out", out, torch.float32, batch * n * (d if kind == 1 else 1))
    call.check()
    if backend == "triton":
        _backend.triton_kernels().ot_pass(x, y, cost_matrix, h, c, out, eps, cost, kind)
        return
    args = (call.ptr("x"), call.ptr("y"), call.ptr("cost_matrix"), call.ptr("h"), call.ptr("c"), call.ptr("out"),
            batch, n, m, d, int(cost), int(kind), float(eps), _backend.dtype_code(ref.dtype))
    _run_native(backend, "ot_pass", ref.device, args, "ot_pass_")


ot_pass_, ot_pass = _kernel_op("ot_pass_", mutates=("out",))(_ot_pass_kernel)


def _sliced_wpp_kernel(x: Tensor, y: Tensor, dirs: Optional[Tensor], wpp: Tensor, cx: Tensor, cy: Tensor,
                       p: float, grad: bool, backend: str) -> None:
    """Sliced-Wasserstein projection + sort + ``W_p^p`` per direction (``triton_kernels/sliced.py``):
    ``x``, ``y`` (B, n, d) points with ``dirs`` (1 or B, L, d), or (B, L, n) projections with ``dirs``
    None, into ``wpp`` (B, L); with ``grad``, ``d wpp / d projection`` into ``cx``, ``cy`` (B, L, n).
    Triton only: there is no C++ kernel."""
    if backend != "triton":
        raise _backend.BackendUnavailableError(f"sliced_wpp has only a triton kernel, got backend {backend!r}")
    _backend.triton_kernels().sliced_wpp(x, y, dirs, wpp, cx, cy, p, grad)


sliced_wpp_, sliced_wpp = _kernel_op("sliced_wpp_", mutates=("wpp", "cx", "cy"))(_sliced_wpp_kernel)


def _sliced_wpp_quantile_kernel(x: Tensor, y: Tensor, dirs: Optional[Tensor], a: Optional[Tensor], b: Optional[Tensor],
                                wpp: Tensor, cx: Tensor, cy: Tensor, gcu: Tensor, gcv: Tensor, perm_x: Tensor,
                                perm_y: Tensor, p: float, grad: bool, backend: str) -> None:
    """Sliced ``W_p^p`` per direction between weighted (``a``, ``b``; None: uniform) measures of any sizes
    (``triton_kernels/sliced.py``, ``sliced_wpp_quantile``): the quantile merge; with ``grad`` the
    derivatives with respect to the projections into ``cx``, ``cy``, and where ``gcu`` / ``gcv`` are not
    empty those with respect to the sorted cumulative weights and the sort permutations. Triton only."""
    if backend != "triton":
        raise _backend.BackendUnavailableError(f"sliced_wpp_quantile has only a triton kernel, got backend {backend!r}")
    _backend.triton_kernels().sliced.sliced_wpp_quantile(x, y, dirs, a, b, wpp, cx, cy, gcu, gcv, perm_x, perm_y,
                                                          p, grad)


sliced_wpp_quantile_, sliced_wpp_quantile = _kernel_op(
    "sliced_wpp_quantile_", mutates=("wpp", "cx", "cy", "gcu", "gcv", "perm_x", "perm_y"))(_sliced_wpp_quantile_kernel)


def _ot_softmin_kernel(x: Optional[Tensor], y: Optional[Tensor], cost_matrix: Optional[Tensor], w: Tensor, g: Tensor,
                       out: Tensor, eps: float, cost: int, backend: str) -> None:
    """The weighted soft-minimum pass (OtArgs mode 2) into ``out`` (B, n) fp32: ``out_i = -eps log(sum_j
    w_j exp((g_j - C_ij) / eps) / sum_j w_j)`` over contiguous points ``x`` (B, n, d), ``y`` (B, m, d) or a
    dense ``cost_matrix`` (B, n, m), with fp32 weights ``w`` >= 0 and potential ``g`` (B, m)
    (:func:`fastopt.reference.ot.softmin_reference`; ``csrc/cpu/ot_kernels.cpp``, ``triton_kernels/ot.py``)."""
    ref = cost_matrix if cost_matrix is not None else x
    if ref is None or ref.dim() != 3 or w.dim() != 2:
        raise ValueError("fastopt::ot_softmin_: needs points x (B, n, d) and y (B, m, d) or a cost matrix (B, n, m), "
                         "and w (B, m)")
    if not (eps > 0.0 and math.isfinite(eps)) or cost not in (0, 1):
        raise ValueError(f"fastopt::ot_softmin_: eps must be positive and finite and cost 0 or 1, got {eps}, {cost}")
    batch, n, m = ref.shape[0], ref.shape[1], w.shape[1]
    call = _Call("ot_softmin_", ref.device)
    if cost_matrix is not None:
        if x is not None or y is not None:
            raise ValueError("fastopt::ot_softmin_: a cost matrix takes no points")
        _add_contiguous(call, "cost_matrix", cost_matrix, ref.dtype, batch * n * m, (batch, n, m))
        d = 0
    else:
        d = x.shape[2]
        if d < 1:
            raise ValueError("fastopt::ot_softmin_: points need d >= 1")
        _add_contiguous(call, "x", x, ref.dtype, batch * n * d, (batch, n, d))
        _add_contiguous(call, "y", y, ref.dtype, batch * m * d, (batch, m, d))
    _add_contiguous(call, "w", w, torch.float32, batch * m, (batch, m))
    _add_contiguous(call, "g", g, torch.float32, batch * m, (batch, m))
    _add_contiguous(call, "out", out, torch.float32, batch * n, (batch, n))
    if out.numel() == 0:
        return
    call.check()
    if backend == "triton":
        _backend.triton_kernels().ot.ot_softmin(x, y, cost_matrix, w, g, out, eps, cost)
        return
    args = (call.ptr("x"), call.ptr("y"), call.ptr("cost_matrix"), call.ptr("w"), call.ptr("g"), call.ptr("out"),
            batch, n, m, d, int(cost), 2, float(eps), _backend.dtype_code(ref.dtype))
    _run_native(backend, "ot_pass", ref.device, args, "ot_softmin_")


ot_softmin_, ot_softmin = _kernel_op("ot_softmin_", mutates=("out",))(_ot_softmin_kernel)


def _mfac_triton():
    """``fastopt.triton_kernels.mfac`` (imported on first use; the package's ``__init__`` does not import it)."""
    import importlib

    _backend.triton_kernels()
    return importlib.import_module("fastopt.triton_kernels.mfac")


def _mfac_call(op, window, params, grads, momentum_buffer, nrows):
    """A :class:`_Call` of one of dense M-FAC's window passes: ``window`` (m, d) fp32/bf16 contiguous with
    d = the params' total numel, contiguous fp32 params and grads, an optional fp32 momentum buffer (d,)."""
    if window.dim() != 2 or not window.is_contiguous() or window.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"fastopt::{op}: window must be a contiguous 2-d fp32 or bf16 tensor, got "
                         f"{window.dtype}{tuple(window.shape)}")
    rows, d = window.shape
    if not 1 <= nrows <= rows:
        raise ValueError(f"fastopt::{op}: nrows must be in [1, {rows}], got {nrows}")
    if len(params) != len(grads):
        raise ValueError(f"fastopt::{op}: {len(params)} params but {len(grads)} grads")
    for name, lst in (("params", params), ("grads", grads)):
        for i, t in enumerate(lst):
            if not t.is_contiguous():
                raise ValueError(f"fastopt::{op}: {name}[{i}] must be contiguous")
    call = _Call(op, window.device)
    numels = call.add("params", params, torch.float32, disjoint=True)
    call.add("grads", grads, torch.float32, numels)
    if sum(numels) != d:
        raise ValueError(f"fastopt::{op}: the params hold {sum(numels)} elements, the window {d} columns")
    call.add("window", [window], window.dtype)
    if momentum_buffer is not None:
        _add_contiguous(call, "momentum_buffer", momentum_buffer, torch.float32, d, (d,))
    return call, numels


def _mfac_dots_kernel(window: Tensor, params: List[Tensor], grads: List[Tensor], dots_x: Tensor,
                      dots_k: Optional[Tensor], slot: int, nrows: int, wd_l2: float, backend: str) -> None:
    """Dense M-FAC pass 1 (:func:`fastopt.reference.mfac.mfac_window_dots_reference`): ``window[slot] <- g =
    grad + wd_l2 p`` (params side by side), ``dots_x[j] = G_j . g`` and, for a bf16 window, ``dots_k[j] =
    G_j . G_slot`` for ``j < nrows`` (fp64 (m,); zero beyond).  ``csrc/cpu/mfac_kernels.cpp``,
    ``triton_kernels/mfac.py``."""
    call, numels = _mfac_call("mfac_dots_", window, params, grads, None, nrows)
    rows = window.shape[0]
    if not 0 <= slot < nrows:
        raise ValueError(f"fastopt::mfac_dots_: slot must be in [0, nrows={nrows}), got {slot}")
    two = window.dtype != torch.float32
    if two != (dots_k is not None):
        raise ValueError("fastopt::mfac_dots_: dots_k is required for a bf16 window and absent for an fp32 one")
    _add_contiguous(call, "dots_x", dots_x, torch.float64, rows, (rows,))
    if two:
        _add_contiguous(call, "dots_k", dots_k, torch.float64, rows, (rows,))
    call.check()
    if backend == "triton":
        _mfac_triton().mfac_dots(window, params, grads, dots_x, dots_k, slot, nrows, wd_l2)
        return
    args = (call.ptr("window"), rows, window.shape[1], nrows, slot, _backend.dtype_code(window.dtype),
            call.ptrs("params"), call.ptrs("grads"), numels, float(wd_l2), call.ptr("dots_x"),
            call.ptr("dots_k") if two else 0)
    _run_native(backend, "mfac_dots", window.device, args, "mfac_dots_")


mfac_dots_, mfac_dots = _kernel_op("mfac_dots_", mutates=("window", "dots_x", "dots_k"))(_mfac_dots_kernel)


def _mfac_update_kernel(window: Tensor, params: List[Tensor], grads: List[Tensor], momentum_buffer: Optional[Tensor],
                        coef: Tensor, nrows: int, lr: float, damp: float, momentum: float, wd_l2: float,
                        wd_decoupled: float, backend: str) -> None:
    """Dense M-FAC pass 2 (:func:`fastopt.reference.mfac.mfac_update_reference`): ``u = g / damp -
    sum_j<nrows coef[j] G_j``, ``v <- momentum v + (1 - momentum) u`` (with a momentum buffer),
    ``p <- p (1 - wd_decoupled) - lr u``.  ``coef`` fp32 (>= nrows,)."""
    if (momentum_buffer is None) != (momentum == 0.0):
        raise ValueError("fastopt::mfac_update_: a momentum buffer goes with momentum > 0, and only then")
    if not damp > 0.0:
        raise ValueError(f"fastopt::mfac_update_: damp must be positive, got {damp}")
    call, numels = _mfac_call("mfac_update_", window, params, grads, momentum_buffer, nrows)
    if coef.dim() != 1:
        raise ValueError("fastopt::mfac_update_: coef must be 1-d")
    _add_contiguous(call, "coef", coef, torch.float32)
    if coef.numel() < nrows:
        raise ValueError(f"fastopt::mfac_update_: coef has {coef.numel()} elements, needs {nrows}")
    call.check()
    if backend == "triton":
        _mfac_triton().mfac_update(window, params, grads, momentum_buffer, coef, nrows, lr, damp,
                                                    momentum, wd_l2, wd_decoupled)
        return
    moms = []
    if momentum_buffer is not None:
        base, size = momentum_buffer.data_ptr(), momentum_buffer.element_size()
        off = 0
        for n in numels:
            moms.append(base + off * size)
            off += n
    args = (call.ptr("window"), window.shape[0], window.shape[1], nrows, _backend.dtype_code(window.dtype),
            call.ptrs("params"), call.ptrs("grads"), numels, moms, call.ptr("coef"), float(wd_l2), float(damp),
            float(momentum), float(lr), float(wd_decoupled))
    _run_native(backend, "mfac_update", window.device, args, "mfac_update_")


mfac_update_, mfac_update = _kernel_op("mfac_update_", mutates=("params", "momentum_buffer"))(
    _mfac_update_kernel)


def _select_triton():
    """``fastopt.triton_kernels.select`` (imported on first use; the package's ``__init__`` does not import it)."""
    import importlib

    _backend.triton_kernels()
    return importlib.import_module("fastopt.triton_kernels.select")


def _magnitude_select_kernel(tensors: List[Tensor], groups: List[int], counts: List[int], thresholds: Tensor,
                             masks: List[Tensor], backend: str) -> None:
    """Magnitude selection (:mod:`fastopt.reference.select`): tensor ``i`` (contiguous fp32/bf16/fp16, dtypes
    may differ) belongs to group ``groups[i]`` (0, 1, ... in list order); group ``g`` prunes ``counts[g]`` of
    its elements; ``thresholds`` (fp32 (groups,)) gets each group's threshold and ``masks`` (uint8, one per
    tensor, or []) the keep-masks.  ``csrc/cpu/select.cpp``, ``triton_kernels/select.py``."""
    op = "magnitude_select_"
    n = len(tensors)
    if n == 0:
        raise ValueError(f"fastopt::{op}: no tensors")
    if len(groups) != n or groups[0] != 0 or any(b - a not in (0, 1) for a, b in zip(groups, groups[1:])):
        raise ValueError(f"fastopt::{op}: groups must give each tensor a group 0, 1, ... in list order")
    ngroups = groups[-1] + 1
    if len(counts) != ngroups:
        raise ValueError(f"fastopt::{op}: {len(counts)} counts for {ngroups} groups")
    sizes = [0] * ngroups
    for t, g in zip(tensors, groups):
        sizes[g] += t.numel()
    for g, (c, size) in enumerate(zip(counts, sizes)):
        if not 0 <= c <= size:
            raise ValueError(f"fastopt::{op}: counts[{g}] = {c} is not in [0, {size}]")
    if masks and len(masks) != n:
        raise ValueError(f"fastopt::{op}: {len(masks)} masks for {n} tensors")
    for name, lst in (("tensors", tensors), ("masks", masks)):
        for i, t in enumerate(lst):
            if not t.is_contiguous():
                raise ValueError(f"fastopt::{op}: {name}[{i}] must be contiguous")
    for i, t in enumerate(tensors):
        if t.dtype not in _backend.KERNEL_DTYPES:
            raise ValueError(f"fastopt::{op}: tensors[{i}] is {t.dtype}; the kernels take fp32, bf16, fp16")
    device = tensors[0].device
    call = _Call(op, device)
    numels = [t.numel() for t in tensors]
    for dtype in dict.fromkeys(t.dtype for t in tensors):
        call.add(f"tensors ({dtype})", [t for t in tensors if t.dtype == dtype], dtype)
    _add_contiguous(call, "thresholds", thresholds, torch.float32, ngroups, (ngroups,))
    if masks:
        call.add("masks", masks, torch.uint8, numels, disjoint=True)
    call.check()
    if masks:  # (the masks are written while the tensors are read)
        spans = [(t.data_ptr(), t.data_ptr() + t.nbytes) for t in tensors + [thresholds] if t.numel()]
        for i, m in enumerate(masks):
            lo, hi = m.data_ptr(), m.data_ptr() + m.nbytes
            if m.numel() and any(lo < e and s < hi for s, e in spans):
                raise ValueError(f"fastopt::{op}: masks[{i}] shares memory with an input or the thresholds")
    if backend == "triton":
        _select_triton().magnitude_select(tensors, groups, counts, thresholds, masks)
        return
    args = ([t.data_ptr() for t in tensors], numels, [_backend.dtype_code(t.dtype) for t in tensors], list(groups),
            list(counts), thresholds.data_ptr(), [m.data_ptr() for m in masks])
    _run_native(backend, "magnitude_select", device, args, op)


magnitude_select_, magnitude_select = _kernel_op("magnitude_select_", mutates=("thresholds", "masks"))(
    _magnitude_select_kernel)


# -- the Python side of the seam: validated lists -> one kernel call ------------------------------
def split_lr(lr, device):
    """(float lr, tensor or None) for a kernel call on ``device``: a CPU tensor lr is read on the host as
    a double (that never syncs with a GPU), in eager mode here and under torch.compile by the custom
    op when the graph runs (``fastopt._ops._host_lr``); a tensor lr on another device is read by the
    kernel as fp32 (no host sync, CUDA-graph safe)."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu":
            if torch.compiler.is_compiling():
                return 0.0, lr
            return float(lr), None
        return 0.0, lr.to(device=device, dtype=torch.float32)
    return float(lr), None


class ElementwiseCall(NamedTuple):
    """One call of the registered elementwise op ``op`` (``csrc/include/fastopt/elementwise.h``) over
    validated lists (one device, one dtype, dense, matching layouts): the record the optimizers build
    and :func:`run_elementwise` hands to the kernel.  ``states`` holds the op's state lists one after
    the other (``fastopt/_opspec.py`` names them), ``hyper``/``flags`` come from
    :meth:`fastopt._opspec.OpSpec.pack` / ``flag_bits``, ``lr`` is a float or a one-element tensor
    (split only at the custom op, :func:`split_lr`), ``backend`` a resolved kernel backend.  Phase 1
    adds per-row sums into ``reduce_out`` (fp32 ``[rows, 4]``); ``row_coef`` carries the row
    coefficients; ``sparse_*`` the N:M sparse-training epilogue."""

    op: str
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    states: Sequence[Tensor]
    state_steps: Sequence[Tensor]
    hyper: Sequence[float]
    flags: int
    lr: Union[float, Tensor]
    maximize: bool
    grad_scale: Optional[Tensor]
    found_inf: Optional[Tensor]
    backend: str
    device: torch.device
    phase: int = 0
    rows: Optional[Sequence[int]] = None
    row_coef: Optional[Tensor] = None
    reduce_out: Optional[Tensor] = None
    seed: int = 0
    stochastic: bool = False
    sparse_mask: Sequence[Tensor] = ()
    sparse_out: Sequence[Tensor] = ()
    sparse_lambda: float = 0.0
    sparse_beta: float = 0.0
    sr_offsets: Sequence[int] = ()  # per param, where it starts in its whole tensor (stochastic rounding)
    sparse_prune: int = 0  # prune-style unstructured sparsity: 1 by sparse_mask, 2 by hash (sparse_keys)
    sparse_keys: Sequence[int] = ()
    sparse_threshold: int = 0


# DTensors (FSDP2): the records below run their kernels over local shards (NOTE: [DTensors] in
# fastopt/_sharded.py).
dtensor_class = _sharded.dtensor_class


def run_elementwise(c: ElementwiseCall) -> None:
    c, finish = _sharded.localize(c, ("params", "grads", "states", "sparse_mask", "sparse_out"), rows_field=True)
    lr, lr_tensor = split_lr(c.lr, c.device)
    elementwise_step(
        op=c.op, params=list(c.params), grads=list(c.grads), states=list(c.states), state_steps=list(c.state_steps),
        hyper=[float(h) for h in c.hyper], flags=int(c.flags), lr=lr, lr_tensor=lr_tensor, maximize=bool(c.maximize),
        grad_scale=c.grad_scale, found_inf=c.found_inf, phase=int(c.phase),
        rows=list(c.rows) if c.rows is not None else [], row_coef=c.row_coef, reduce_out=c.reduce_out,
        seed=int(c.seed), stochastic=bool(c.stochastic), backend=c.backend, sparse_mask=list(c.sparse_mask or ()),
        sparse_out=list(c.sparse_out or ()), sparse_lambda=float(c.sparse_lambda), sparse_beta=float(c.sparse_beta),
        sr_offsets=[int(o) for o in c.sr_offsets], sparse_prune=int(c.sparse_prune),
        sparse_keys=[int(k) for k in c.sparse_keys], sparse_threshold=int(c.sparse_threshold))
    if finish is not None:
        finish()


class LowbitCall(NamedTuple):
    """One fused low-bit-state step of the registered op ``op`` (``csrc/include/fastopt/quant.h``) over
    validated lists: ``states`` holds the op's state lists one after the other (uint8 codes when
    quantized), ``absmax`` the block maxima (rank-1 states: row maxima) of every quantized state in
    the same order, ``books`` each state's int32 codebook (an empty tensor: a plain state),
    ``colmax`` the column maxima of the rank-1 states, ``rank1_rows`` each tensor's rows."""

    op: str
    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    states: Sequence[Tensor]
    absmax: Sequence[Tensor]
    books: Sequence[Tensor]
    block: int
    state_steps: Sequence[Tensor]
    hyper: Sequence[float]
    flags: int
    lr: Union[float, Tensor]
    maximize: bool
    grad_scale: Optional[Tensor]
    found_inf: Optional[Tensor]
    backend: str
    device: torch.device
    seed: int = 0
    stochastic: bool = False
    colmax: Sequence[Tensor] = ()
    rank1: Sequence[bool] = ()
    rank1_rows: Sequence[int] = ()
    sr_offsets: Sequence[int] = ()  # per param, where it starts in its whole tensor (stochastic rounding)


def run_lowbit(c: LowbitCall) -> None:
    c, _ = _sharded.localize(c, ("params", "grads", "states", "absmax", "colmax"))
    lr, lr_tensor = split_lr(c.lr, c.device)
    lowbit_step(
        op=c.op, params=list(c.params), grads=list(c.grads), states=list(c.states), absmax=list(c.absmax),
        books=list(c.books), block=int(c.block), state_steps=list(c.state_steps), hyper=[float(h) for h in c.hyper],
        flags=int(c.flags), lr=lr, lr_tensor=lr_tensor, maximize=bool(c.maximize), grad_scale=c.grad_scale,
        found_inf=c.found_inf, seed=int(c.seed), stochastic=bool(c.stochastic), colmax=list(c.colmax),
        rank1=[bool(r) for r in c.rank1], rank1_rows=[int(r) for r in c.rank1_rows], backend=c.backend,
        sr_offsets=[int(o) for o in c.sr_offsets])


class AdamCall(NamedTuple):
    """One fused Adam/AdamW step (``csrc/include/fastopt/functors/adam.h``) over validated lists."""

    params: Sequence[Tensor]
    grads: Sequence[Tensor]
    exp_avgs: Sequence[Tensor]
    exp_avg_sqs: Sequence[Tensor]
    max_exp_avg_sqs: Sequence[Tensor]
    state_steps: Sequence[Tensor]
    lr: Union[float, Tensor]
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool
    amsgrad: bool
    maximize: bool
    grad_scale: Optional[Tensor]
    found_inf: Optional[Tensor]
    backend: str
    device: torch.device


def run_adam(c: AdamCall) -> None:
    c, _ = _sharded.localize(c, ("params", "grads", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))
    lr, lr_tensor = split_lr(c.lr, c.device)
    adam_step(
        params=list(c.params), grads=list(c.grads), exp_avgs=list(c.exp_avgs), exp_avg_sqs=list(c.exp_avg_sqs),
        max_exp_avg_sqs=list(c.max_exp_avg_sqs) if c.amsgrad else [], state_steps=list(c.state_steps), lr=lr,
        lr_tensor=lr_tensor, beta1=float(c.beta1), beta2=float(c.beta2), eps=float(c.eps),
        weight_decay=float(c.weight_decay), decoupled=bool(c.decoupled), amsgrad=bool(c.amsgrad),
        maximize=bool(c.maximize), grad_scale=c.grad_scale, found_inf=c.found_inf, backend=c.backend)


def elementwise_unchecked(op, params, grads, states, state_steps, hyper, flags, **fields) -> None:
    """:func:`run_elementwise` of an :class:`ElementwiseCall` with these fields."""
    run_elementwise(ElementwiseCall(op, params, grads, states, state_steps, hyper, flags, **fields))


def lowbit_unchecked(op, params, grads, states, absmax, books, block, state_steps, hyper, flags, **fields) -> None:
    """:func:`run_lowbit` of a :class:`LowbitCall` with these fields."""
    run_lowbit(LowbitCall(op, params, grads, states, absmax, books, block, state_steps, hyper, flags, **fields))
