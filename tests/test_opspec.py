"""The op declaration (fastopt/_opspec.py) against everything that must agree with it: the C++
registry and flag bits, the Triton registry and flag constants, the optimizer classes, the test cases
and the benchmark's list."""
import inspect

import pytest
import torch

import fastopt
from fastopt import _backend
from fastopt.optim.base import ElementwiseOptimizer
from fastopt._opspec import FLAGS, MAX_HYPER, MAX_REDUCE, MAX_STATES, OPS, OpSpec, native_args

from zoo_cases import ZOO


def _elementwise_classes():
    """Every public fastopt optimizer class that runs a declared op."""
    seen = {}
    for module in (fastopt, fastopt.lowbit):
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, ElementwiseOptimizer) and obj is not ElementwiseOptimizer:
                seen[obj] = name
    return seen


def test_declarations_are_well_formed():
    assert len(set(FLAGS.values())) == len(FLAGS), "two flags share a bit"
    assert all(v > 0 and v & (v - 1) == 0 for v in FLAGS.values()), "a flag is not one bit"
    for spec in OPS.values():
        assert len(spec.hyper) <= MAX_HYPER and len(spec.states) <= MAX_STATES and 0 <= spec.reduce <= MAX_REDUCE
        assert set(spec.flags) <= set(FLAGS), spec.name
        assert len(set(spec.hyper)) == len(spec.hyper) and len(set(spec.states)) == len(spec.states)


def test_pack_orders_by_name_and_refuses_unknown_names():
    spec = OPS["lion"]
    assert spec.pack(weight_decay=0.1, beta2=0.99, beta1=0.9) == (0.9, 0.99, 0.1)
    with pytest.raises(TypeError, match="missing"):
        spec.pack(beta1=0.9, beta2=0.99)
    with pytest.raises(TypeError, match="unknown"):
        spec.pack(beta1=0.9, beta2=0.99, weight_decay=0.0, eps=1e-8)
    assert spec.flag_bits({"weight_decouple": True, "fixed_decay": False, "cautious": True}) == FLAGS["weight_decouple"]
    with pytest.raises(TypeError):
        spec.flag_bits(nesterov=True)
    assert native_args("sgdp", {"nesterov": True}, momentum=0.9, dampening=0.0) == ((0.9, 0.0), FLAGS["nesterov"])


@pytest.mark.skipif(not _backend.has_cpu(), reason="needs fastopt._C")
def test_cpp_registry_matches_the_declaration():
    native = _backend.native()
    assert native.op_registry() == {name: (len(s.states), s.reduce) for name, s in OPS.items()}
    assert native.flag_bits() == FLAGS
    for name, spec in OPS.items():
        assert tuple(native.op_shape(name)) == (len(spec.states), spec.reduce)


@pytest.mark.skipif(not _backend.has_triton(), reason="needs triton")
def test_triton_registry_matches_the_declaration():
    tk = _backend.triton_kernels()
    from fastopt.triton_kernels import common, multi_tensor

    assert set(tk.OPS) == set(OPS)
    for name, spec in OPS.items():
        top = tk.OPS[name]
        assert top.nreduce == spec.reduce, name
        slots, flags = top.pack(tuple(0.5 for _ in spec.hyper), 0)
        assert len(slots) <= multi_tensor.N_HYPER, name
        with pytest.raises((ValueError, TypeError)):  # one hyperparameter too many is not silently taken
            top.pack(tuple(0.5 for _ in spec.hyper) + (0.5,), 0)
    constants = {"weight_decouple": "DECOUPLE", "fixed_decay": "FIXED_DECAY", "rectify": "RECTIFY",
                 "degenerated_to_sgd": "DEGENERATED_TO_SGD", "adam_debias": "ADAM_DEBIAS", "nesterov": "NESTEROV",
                 "use_gc": "USE_GC", "cautious": "CAUTIOUS", "cautious_pd": "CAUTIOUS_PD", "amsgrad": "AMSGRAD"}
    assert set(constants) == set(FLAGS)
    for flag, const in constants.items():
        assert getattr(common, const).value == FLAGS[flag]


def test_classes_take_their_state_names_and_hyperparameters_from_the_declaration():
    classes = _elementwise_classes()
    p = torch.nn.Parameter(torch.zeros(3))
    ops = set()
    for cls in classes:
        opt = cls([p])
        group = opt.param_groups[0]
        op = opt._op_name(group)
        ops.add(op)
        spec = OPS[op]
        assert tuple(opt._state_names(group)) == spec.states, cls
        hyper, flags = opt._native_hyper(group)
        assert len(hyper) == len(spec.hyper) and all(isinstance(h, float) for h in hyper), cls
        assert flags & ~sum(FLAGS[f] for f in spec.flags) == 0, cls
    assert ops >= {"lion", "adan", "adabelief", "diffgrad", "exadam", "lamb", "sgdsai", "adamp", "sgdp", "adamw"}


def test_test_cases_and_benchmark_cover_the_declared_optimizer_ops():
    from fastopt.bench import SUITES
    from fastopt.bench import classic as bench_classic
    from fastopt.bench import zoo as bench_zoo

    tested = {cls.OP for cls, _ in ZOO.values()}
    benched = {getattr(fastopt, s.fastopt_cls).OP for s in bench_zoo.SPECS}
    benched |= {getattr(fastopt, s.cls).OP for s in bench_classic.SPECS}  # SGD, Adagrad, RMSprop: classic-* suites
    benched |= {fastopt.AdaHessian.OP} if "adahessian" in SUITES else set()  # its own suite (the update alone)
    # gradient passes, not optimizers: use_gc's row sums, clip_grad_norm_, OrthoGrad's projection, SAM's norm
    # and ascent (tests/test_clip.py, tests/test_orthograd.py, tests/test_sam.py)
    helpers = {"grad_rowsum", "clip", "orthograd", "sam", "asam", "asam_norm"}
    base = {name.removesuffix("_pow").removesuffix("_ams").removesuffix("_flat").removesuffix("_plain").removesuffix("_cautious")
            .removesuffix("_momentum").removesuffix("_centered")
            for name in OPS} - helpers - {"adam", "adamw"}  # Adam/AdamW: tests/test_adam.py, bench adamw suite
    assert tested == base
    assert benched == base
    for name, (cls, _) in ZOO.items():
        assert cls.STATE_NAMES == OPS[cls.OP].states, name
    for s in bench_zoo.SPECS:
        op = getattr(fastopt, s.fastopt_cls).OP
        assert s.states in (len(OPS[op].states), len(OPS[op + "_flat"].states) if op + "_flat" in OPS else -1)
