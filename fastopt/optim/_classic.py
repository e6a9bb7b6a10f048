"""What fastopt's drop-ins for torch.optim's SGD, Adagrad and RMSprop share: the checks of torch's
path-selection arguments (``foreach``, ``fused``, ``differentiable``, ``capturable``) and of a
hyperparameter that torch 2.13 allows to be a tensor (``weight_decay`` of SGD)."""
import torch

from . import functional as F

def path_args_doc(fused=True):
    """The meaning of torch's path-selection arguments here (for the classes' docstrings)."""
    if fused:
        head = """foreach, fused: accepted for torch's signature; every fastopt backend is one fused
            multi-tensor kernel whatever they say (``fused=True`` with ``foreach=True`` raises
            RuntimeError, as torch)."""
    else:
        head = """foreach: accepted for torch's signature; every fastopt backend is one fused multi-tensor
            kernel whatever it says."""
    return head + """
        differentiable: must be False: the kernels update in place outside autograd, so
            ``differentiable=True`` raises ValueError (use torch.optim's class to differentiate through
            the step)."""


def check_path_args(name, group, has_fused=True):
    """torch's errors for the path-selection arguments of a group (``name``: the class)."""
    if group.get("differentiable"):
        raise ValueError(f"{name}: differentiable=True is not supported (fastopt's kernels update the parameters "
                         f"in place outside autograd); use torch.optim.{name}(..., differentiable=True) to "
                         "differentiate through the optimizer step")
    if has_fused and group.get("fused") and group.get("foreach"):
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


def hyper_value(name, value):
    """A hyperparameter that may be a one-element tensor (no grad) as a float, after torch's check
    ``0 <= value``; ``name`` as torch's message says it ("weight_decay value")."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor must have one element, got shape {tuple(value.shape)}")
        if value.requires_grad:
            raise ValueError(f"Invalid {name}: a tensor that requires grad (differentiable steps are not supported)")
    F.check_hyper(name, value)
    return float(value)


def check_lr(lr):
    """torch's checks of ``lr``: a float, or a one-element tensor; not negative."""
    if isinstance(lr, torch.Tensor) and lr.numel() != 1:
        raise ValueError("Tensor lr must be 1-element")
    F.check_hyper("learning rate", lr)
