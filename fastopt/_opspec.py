"""The declaration of every elementwise optimizer op: its name, its hyperparameters in the order the
kernels read them (``h[0], h[1], ...``), its state slots (slot 0 first, after param and grad), the
flag bits it reads and the number of sums its reduce phase accumulates.

This table is the contract between the layers.  The C++ registry (``FASTOPT_FOR_EACH_OP`` in
``csrc/include/fastopt/ops.h``, flag bits in ``csrc/include/fastopt/flags.h``) and the Triton registry
(``triton_kernels/ops.py``) are checked against it by ``tests/test_opspec.py``; the Triton flag
constants are made from :data:`FLAGS`; the optimizer classes pack their hyperparameters through
:meth:`OpSpec.pack` (by name) and take their state names from :attr:`OpSpec.states`; the test cases
(``tests/zoo_cases.py``) and the benchmark (``fastopt/bench/zoo.py``) are checked against it.

This module imports nothing from fastopt (the Triton kernels import it too).
"""
from typing import Any, Dict, Mapping, NamedTuple, Tuple

# The flag bits, one numbering for every op.  A flag is named after the param-group option that
# sets it; ``cautious_pd`` and ``amsgrad`` are set by the callers that need them, not by an option.
FLAGS: Dict[str, int] = {
    "weight_decouple": 1,      # decoupled weight decay (else L2 added to the gradient)
    "fixed_decay": 2,          # decoupled decay not scaled by lr
    "rectify": 4,              # RAdam rectification
    "degenerated_to_sgd": 8,   # below RAdam's threshold: a momentum-SGD step (else none)
    "adam_debias": 16,         # no 1 / (1 - b1^t) on the step size
    "nesterov": 32,            # Nesterov momentum
    "use_gc": 64,              # gradient centralization (row means in rc[0])
    "cautious": 128,           # the cautious mask (its scale in a row coefficient)
    "cautious_pd": 256,        # AdamP's second reduce pass of the cautious mode (sums p.d only)
    "amsgrad": 512,            # the running maximum of the second moment (Triton's own Adam launcher)
}

MAX_HYPER = 16    # kMaxHyper in csrc/include/fastopt/elementwise.h
MAX_STATES = 4    # kMaxStates
MAX_REDUCE = 4    # kMaxReduce


class OpSpec(NamedTuple):
    """One elementwise op (see the module docstring)."""

    name: str
    hyper: Tuple[str, ...]
    states: Tuple[str, ...]
    flags: Tuple[str, ...] = ()
    reduce: int = 0

    def pack(self, **values: Any) -> Tuple[float, ...]:
        """The op's hyperparameters as the kernels take them: ``values`` by name, in declared order.
        Every declared name must be given, and nothing else."""
        if set(values) != set(self.hyper):
            missing = [h for h in self.hyper if h not in values]
            extra = sorted(set(values) - set(self.hyper))
            raise TypeError(f"op {self.name!r} takes hyperparameters {self.hyper}; missing {missing}, unknown {extra}")
        return tuple(float(values[h]) for h in self.hyper)

    def flag_bits(self, options: Mapping[str, Any] = None, **on: Any) -> int:
        """The flag word: the bits of the declared flags that ``options`` (a param group; missing keys
        are off) or the keywords ``on`` set to a true value."""
        for name in on:
            if name not in self.flags:
                raise TypeError(f"op {self.name!r} has flags {self.flags}, not {name!r}")
        bits = 0
        for name in self.flags:
            value = on[name] if name in on else (options or {}).get(name)
            if value:
                bits |= FLAGS[name]
        return bits


def _adam(name, amsgrad):
    states = ("exp_avg", "exp_avg_sq") + (("max_exp_avg_sq",) if amsgrad else ())
    return OpSpec(name, ("beta1", "beta2", "eps", "weight_decay"), states)


_DECAY = ("weight_decouple", "fixed_decay")
_RECTIFIED = _DECAY + ("rectify", "degenerated_to_sgd", "adam_debias")
_RECTIFIED_HYPER = ("beta1", "beta2", "weight_decay", "eps", "n_sma_threshold")
_PROJECTED_FLAGS = ("nesterov", "adam_debias", "use_gc", "cautious", "cautious_pd")

_SPECS = (
    _adam("adamw", False), _adam("adamw_ams", True), _adam("adam", False), _adam("adam_ams", True),
    OpSpec("lion", ("beta1", "beta2", "weight_decay"), ("exp_avg",), _DECAY + ("use_gc",)),
    OpSpec("lion_cautious", ("beta1", "beta2", "weight_decay"), ("exp_avg",), _DECAY + ("use_gc", "cautious"), 1),
    OpSpec("grad_rowsum", (), (), (), 1),       # the row sums of the gradient (use_gc's means)
    OpSpec("clip", (), (), (), 1),              # sum of g^2 (phase 1); g *= rc[0] (phase 0)
    OpSpec("adan", ("beta1", "beta2", "beta3", "weight_decay", "eps"),
           ("exp_avg", "exp_avg_sq", "exp_avg_diff", "previous_grad"), ("weight_decouple", "use_gc")),
    OpSpec("adabelief", _RECTIFIED_HYPER, ("exp_avg", "exp_avg_var"), _RECTIFIED),
    OpSpec("adabelief_ams", _RECTIFIED_HYPER, ("exp_avg", "exp_avg_var", "max_exp_avg_var"), _RECTIFIED),
    OpSpec("diffgrad", _RECTIFIED_HYPER, ("exp_avg", "exp_avg_sq", "previous_grad"), _RECTIFIED),
    OpSpec("diffgrad_ams", _RECTIFIED_HYPER, ("exp_avg", "exp_avg_sq", "previous_grad", "max_exp_avg_sq"),
           _RECTIFIED),
    OpSpec("exadam", ("beta1", "beta2", "weight_decay", "eps"), ("exp_avg", "exp_avg_sq"), _DECAY + ("adam_debias",)),
    # AdaHessian: slot 2 of "adahessian" is the step's Hutchinson estimate D (fastopt/optim/adahessian.py)
    OpSpec("adahessian", ("beta1", "beta2", "weight_decay", "eps", "hessian_power"),
           ("exp_avg", "exp_hessian_diag_sq", "hessian"), _DECAY),
    OpSpec("adahessian_plain", ("beta1", "beta2", "weight_decay", "eps", "hessian_power"),
           ("exp_avg", "exp_hessian_diag_sq"), _DECAY),
    # (the same for any hessian_power; the two above: its value 1, the default, with sqrt -- CPU loops vectorize)
    OpSpec("adahessian_pow", ("beta1", "beta2", "weight_decay", "eps", "hessian_power"),
           ("exp_avg", "exp_hessian_diag_sq", "hessian"), _DECAY),
    OpSpec("adahessian_plain_pow", ("beta1", "beta2", "weight_decay", "eps", "hessian_power"),
           ("exp_avg", "exp_hessian_diag_sq"), _DECAY),
    OpSpec("lamb", ("beta1", "beta2", "beta3", "weight_decay", "eps"), ("exp_avg", "exp_avg_sq"), _DECAY, 2),
    OpSpec("sgdsai", ("momentum", "weight_decay"), ("momentum_buffer",), ("weight_decouple",)),
    OpSpec("sgdsai_plain", ("momentum", "weight_decay"), (), ("weight_decouple",)),
    OpSpec("adamp", ("beta1", "beta2", "eps"), ("exp_avg", "exp_avg_sq"), _PROJECTED_FLAGS, 4),
    OpSpec("sgdp", ("momentum", "dampening"), ("momentum",), ("nesterov",), 4),
    OpSpec("adamp_flat", ("beta1", "beta2", "eps"), ("exp_avg", "exp_avg_sq"), _PROJECTED_FLAGS),
    OpSpec("sgdp_flat", ("momentum", "dampening"), ("momentum",), ("nesterov",)),
    OpSpec("sam", (), ("old_p",)),              # SAM's ascent: old_p <- w, w += rc[0] g (norm: "clip")
    OpSpec("asam", (), ("old_p",)),             # ASAM's: old_p <- w, w += rc[0] w^2 g
    OpSpec("asam_norm", (), (), (), 1),         # ASAM's norm: sum (|w| g)^2 (phase 1 only)
    # torch.optim's SGD, Adagrad, RMSprop (fastopt/optim/{sgd,adagrad,rmsprop}.py)
    OpSpec("sgd", ("momentum", "dampening", "weight_decay"), ("momentum_buffer",), ("nesterov",)),
    OpSpec("sgd_plain", ("momentum", "dampening", "weight_decay"), (), ("nesterov",)),
    OpSpec("adagrad", ("lr_decay", "weight_decay", "eps"), ("sum",)),
    OpSpec("rmsprop", ("alpha", "eps", "weight_decay", "momentum"), ("square_avg",)),
    OpSpec("rmsprop_momentum", ("alpha", "eps", "weight_decay", "momentum"), ("square_avg", "momentum_buffer")),
    OpSpec("rmsprop_centered", ("alpha", "eps", "weight_decay", "momentum"), ("square_avg", "grad_avg")),
    OpSpec("rmsprop_centered_momentum", ("alpha", "eps", "weight_decay", "momentum"),
           ("square_avg", "momentum_buffer", "grad_avg")),
    OpSpec("orthograd", (), (), (), 4),         # ⊥Grad: w.g, w.w, g.g, ||g - rc[0] w||^2; g <- (g - rc[0] w) rc[1]
)

OPS: Dict[str, OpSpec] = {spec.name: spec for spec in _SPECS}


def native_args(op: str, options: Mapping[str, Any], **hyper: Any) -> Tuple[Tuple[float, ...], int]:
    """``(hyper, flags)`` of one call of ``op``: the hyperparameters ``hyper`` packed in declared
    order, and the flags ``options`` (a param group) sets."""
    spec = OPS[op]
    return spec.pack(**hyper), spec.flag_bits(options)
