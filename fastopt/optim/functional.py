"""Functional optimizer steps: validate lists of tensors, pick a backend, run the kernel.

These are the middle layer between the kernels (``fastopt._ops``, ``fastopt.reference``) and the
``torch.optim.Optimizer`` classes; they are usable on their own with tensors you manage yourself.
"""
import math

import torch

from .. import _backend, _ops
from .._ops import is_dense  # noqa: F401  (the optimizers' layout test is the boundary's)
from ..reference import adam_reference


def overlaps_itself(t):
    """Whether two elements of ``t`` share memory (an ``expand()``ed or ``as_strided`` view)."""
    if t.is_contiguous() or t.numel() <= 1:
        return False
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    extent = 0  # the largest offset the dims seen so far reach
    for stride, size in dims:
        if stride <= extent:
            break
        extent += stride * (size - 1)
    else:
        return False
    # Interleaved strides (rare): count the distinct offsets.
    offsets = torch.zeros((), dtype=torch.int64)
    for stride, size in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).flatten()
    return offsets.unique().numel() != offsets.numel()


def check_disjoint(owner, params, last=None):
    """Raise ValueError when two of ``params`` share memory (overlapping views of one buffer): the
    kernels step the tensors of a call concurrently, so each must own its elements.  Adjacent views
    (a flat buffer cut into pieces) are fine.  ``last``: a list holding the spans of the previous call
    that passed; the same spans are not sorted and compared again."""
    spans = [(p.data_ptr(), p.nbytes) for p in params]
    if last is not None and spans == last:
        return
    ordered = sorted(spans)
    for (start, size), (next_start, _) in zip(ordered, ordered[1:]):
        if next_start < start + size:
            raise ValueError(f"{owner}: two parameters share memory (views of one tensor that overlap); fastopt "
                             "steps parameters concurrently, so each must own its elements")
    if last is not None:
        last[:] = spans


def scalar_lr(lr):
    """``lr`` as a scalar: a one-element tensor of any shape (torch.optim accepts ``torch.tensor([[1e-2]])``)
    as a 0-d view (in-place changes to ``lr`` still show), anything else as it is."""
    return lr.reshape(()) if isinstance(lr, torch.Tensor) and lr.dim() != 0 else lr


# torch.optim's names of the hyperparameters that may be tensors, for its "Tensor lr must be 1-element"
_TENSOR_NAMES = {"learning rate": "lr", "beta parameter at index 0": "betas[0]", "beta parameter at index 1": "betas[1]"}


def check_hyper(name, value, low=0.0, high=math.inf, high_open=False):
    """torch.optim-style validation of one hyperparameter (raises ValueError, with torch's messages)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Tensor {_TENSOR_NAMES.get(name, name)} must be 1-element")
        value = float(value)
    ok = low <= value < high if high_open else low <= value <= high
    if not ok:
        raise ValueError(f"Invalid {name}: {value}")


def check_adam_hyper(lr, betas, eps, weight_decay):
    check_hyper("learning rate", lr)
    check_hyper("epsilon value", eps)
    if len(betas) != 2:
        raise ValueError(f"Invalid betas: expected two values, got {betas!r}")
    check_hyper("beta parameter at index 0", betas[0], high=1.0, high_open=True)
    check_hyper("beta parameter at index 1", betas[1], high=1.0, high_open=True)
    check_hyper("weight_decay value", weight_decay)
    if isinstance(betas[0], torch.Tensor) != isinstance(betas[1], torch.Tensor):  # torch.optim.Adam's rule
        raise ValueError("betas must be either both floats or both Tensors")


def check_lists(names, lists, state_steps=None):
    """Validate parallel tensor lists for one kernel call; returns (device, dtype, dense) of the call.

    Every list must have the same length; tensor i of every list must have the shape, dtype, device
    and strides of ``lists[0][i]``; the whole call must be on one device and of one dtype; tensors
    must be strided (not sparse) and real.  ``dense`` tells whether the kernels can walk every tensor
    as one flat buffer (else only the torch backend can run the call).
    """
    n = len(lists[0])
    for name, lst in zip(names, lists):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} tensors, {names[0]} has {n}")
    if n == 0:
        return None, None, True
    first = lists[0][0]
    device, dtype = first.device, first.dtype
    if first.is_complex():
        raise TypeError(f"fastopt does not support complex tensors ({names[0]}[0] is {dtype})")
    dense = True
    for i in range(n):
        ref = lists[0][i]
        want = (torch.strided, device, dtype, ref.shape)
        for name, lst in zip(names, lists):
            t = lst[i]
            if (t.layout, t.device, t.dtype, t.shape) != want:
                _explain_mismatch(name, i, t, names[0], ref, device, dtype)
            if t is not ref and t.stride() != ref.stride() and t.numel() > 1:
                dense = False
        dense = dense and is_dense(ref)
    if state_steps is not None:
        if len(state_steps) != n:
            raise ValueError(f"state_steps has {len(state_steps)} tensors, {names[0]} has {n}")
        for i, s in enumerate(state_steps):
            if s.numel() != 1 or s.dtype != torch.float32 or s.device != device:
                raise ValueError(f"state_steps[{i}] must be a one-element float32 tensor on {device} "
                                 f"(got {s.dtype} with {s.numel()} elements on {s.device})")
    return device, dtype, dense


def _explain_mismatch(name, i, t, ref_name, ref, device, dtype):
    if t.layout != torch.strided:
        raise RuntimeError(f"fastopt does not support sparse tensors ({name}[{i}] is {t.layout})")
    if t.is_complex():
        raise TypeError(f"fastopt does not support complex tensors ({name}[{i}] is {t.dtype})")
    if t.device != device:
        raise ValueError(f"all tensors of one call must be on one device: {name}[{i}] is on {t.device}, "
                         f"{ref_name}[0] on {device}")
    if t.dtype != dtype:
        raise ValueError(f"all tensors of one call must have one dtype: {name}[{i}] is {t.dtype}, "
                         f"{ref_name}[0] is {dtype}")
    raise ValueError(f"{name}[{i}] has shape {tuple(t.shape)}, {ref_name}[{i}] has {tuple(ref.shape)}")


def scalar_on(t, device, name):
    if t is None:
        return None
    if t.numel() != 1:
        raise ValueError(f"{name} must be a one-element tensor")
    return t.to(device=device, dtype=torch.float32)


def adam(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
         weight_decay, decoupled=True, amsgrad=False, maximize=False, grad_scale=None, found_inf=None,
         backend="auto"):
    """One fused Adam (``decoupled=False``) or AdamW (``decoupled=True``) step, in place.

    Equations: see :func:`fastopt.reference.adam_reference`.  All tensors of one call share one device
    and one dtype (fp32, fp16 or bf16 for the kernel backends); ``state_steps`` are one-element fp32
    tensors on that device, incremented by the call unless ``found_inf`` (AMP) is nonzero.  ``lr`` is
    a float or a one-element tensor (read on the device: no host sync, CUDA-graph safe).
    Everything is validated before anything is written.
    """
    names = ["params", "grads", "exp_avgs", "exp_avg_sqs"] + (["max_exp_avg_sqs"] if amsgrad else [])
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if amsgrad else [])
    check_adam_hyper(lr, (beta1, beta2), eps, weight_decay)
    device, dtype, dense = check_lists(names, lists, state_steps)
    if device is None:
        return
    chosen = _backend.resolve(backend, device, dtype, dense)
    grad_scale = scalar_on(grad_scale, device, "grad_scale")
    found_inf = scalar_on(found_inf, device, "found_inf")
    adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                   beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                   maximize=maximize, grad_scale=grad_scale, found_inf=found_inf, backend=chosen, device=device)


def adam_unchecked(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, *, lr, beta1, beta2, eps,
                   weight_decay, decoupled, amsgrad, maximize, grad_scale, found_inf, backend, device):
    """:func:`adam` for lists already validated (the optimizer classes validate once per step):
    ``backend`` is resolved, ``grad_scale``/``found_inf`` are None or fp32 scalars on ``device``."""
    if backend == "torch":
        adam_reference(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, state_steps, lr=lr, beta1=beta1,
                       beta2=beta2, eps=eps, weight_decay=weight_decay, decoupled=decoupled, amsgrad=amsgrad,
                       maximize=maximize, grad_scale=grad_scale, found_inf=found_inf)
        return
    lr_tensor = None
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu" and device.type != "cpu":
            lr = float(lr)  # a CPU scalar: reading it does not sync with the GPU
        else:
            lr_tensor = lr.to(device=device, dtype=torch.float32)
            lr = 0.0
    _ops.adam_step(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs),
                    list(max_exp_avg_sqs) if amsgrad else [], list(state_steps), float(lr), lr_tensor,
                    float(beta1), float(beta2), float(eps), float(weight_decay), bool(decoupled), bool(amsgrad),
                    bool(maximize), grad_scale, found_inf, backend)


def _lr_args(lr, device):
    """(float lr, fp32 device tensor or None): a CPU tensor lr for GPU tensors is read on the host
    (that does not sync with the GPU); any other tensor lr is read by the kernel."""
    if isinstance(lr, torch.Tensor):
        if lr.device.type == "cpu" and device.type != "cpu":
            return float(lr), None
        return 0.0, lr.to(device=device, dtype=torch.float32)
    return float(lr), None


def elementwise_unchecked(op, params, grads, states, state_steps, hyper, flags, *, lr, maximize, grad_scale,
                          found_inf, backend, device, phase=0, rows=None, row_coef=None, reduce_out=None,
                          seed=0, stochastic=False, sparse_mask=None, sparse_out=None, sparse_lambda=0.0,
                          sparse_beta=0.0):
    """One kernel call of the registered elementwise op ``op`` over validated lists (one device, one
    dtype, dense, matching layouts); ``states`` holds the op's state lists one after the other and
    ``backend`` is a resolved kernel backend.  ``sparse_mask``/``sparse_out``/``sparse_lambda``/
    ``sparse_beta``: the sparse-training epilogue.  See ``csrc/include/fastopt/elementwise.h``."""
    lr, lr_tensor = _lr_args(lr, device)
    args = (op, list(params), list(grads), list(states), list(state_steps), [float(h) for h in hyper], int(flags),
            lr, lr_tensor, bool(maximize), grad_scale, found_inf, int(phase), list(rows) if rows is not None else [],
            row_coef, reduce_out, int(seed), bool(stochastic), backend, list(sparse_mask or ()),
            list(sparse_out or ()), float(sparse_lambda), float(sparse_beta))
    _ops.elementwise_step(*args)


def lowbit_unchecked(op, params, grads, states, absmax, books, block, state_steps, hyper, flags, *, lr, maximize,
                     grad_scale, found_inf, backend, device, seed=0, stochastic=False, colmax=(), rank1=(),
                     rank1_rows=()):
    """One fused low-bit-state step of the registered op ``op`` over validated lists: ``states`` holds
    the op's state lists one after the other (uint8 codes when quantized), ``absmax`` the block maxima
    of every state in the same order, ``books`` each state's int32 codebook.  See
    ``csrc/include/fastopt/quant.h``."""
    lr, lr_tensor = _lr_args(lr, device)
    _ops.lowbit_step(op, list(params), list(grads), list(states), list(absmax), list(books), int(block),
                     list(state_steps), [float(h) for h in hyper], int(flags), lr, lr_tensor, bool(maximize),
                     grad_scale, found_inf, int(seed), bool(stochastic), list(colmax), [bool(r) for r in rank1],
                     [int(r) for r in rank1_rows], backend)
