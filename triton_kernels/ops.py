"""The registry of Triton elementwise ops: name -> (update, reduce, number of sums, pack).

``pack(hyper, flags)`` maps the op's hyperparameters as declared in ``fastopt/_opspec.py`` (the tuple
the C++ kernels take) to the Triton slots.  ``tests/test_opspec.py`` checks this table, and the C++
registry ``FASTOPT_FOR_EACH_OP``, against the declaration.
"""
from collections import namedtuple

from .adam import adam_l2_ams_pack, adam_l2_pack, adam_op_update, adamw_ams_pack, adamw_pack
from .adahessian import adahessian_pack, adahessian_plain_update, adahessian_update
from .adamp import (adamp_flat_update, adamp_pack, adamp_reduce, adamp_update, sgdp_flat_update, sgdp_pack,
                    sgdp_reduce, sgdp_update)
from .adan import adan_pack, adan_update
from .adabelief import adabelief_update
from .diffgrad import diffgrad_update
from .exadam import exadam_pack, exadam_update
from .clip import clip_pack, clip_reduce, clip_update
from .lamb import lamb_pack, lamb_reduce, lamb_update
from .orthograd import orthograd_pack, orthograd_reduce, orthograd_update
from .sam import asam_norm_reduce, asam_norm_update, asam_update, sam_pack, sam_update
from .classic import (adagrad_pack, adagrad_update, rmsprop_centered_momentum_pack, rmsprop_centered_pack,
                      rmsprop_momentum_pack, rmsprop_pack, rmsprop_update, sgd_pack, sgd_plain_pack, sgd_update)
from .sgdsai import sgdsai_pack, sgdsai_plain_pack, sgdsai_update
from .elementwise import elementwise_apply, no_reduce
from .lion import lion_cautious_pack, lion_cautious_reduce, lion_pack, lion_update
from .common import grad_rowsum_pack, grad_rowsum_reduce, grad_rowsum_update, rectified_pack, rectified_pack_ams

TritonOp = namedtuple("TritonOp", "update reduce nreduce pack")

OPS = {
    "adamw": TritonOp(adam_op_update, no_reduce, 0, adamw_pack),
    "adamw_ams": TritonOp(adam_op_update, no_reduce, 0, adamw_ams_pack),
    "adam": TritonOp(adam_op_update, no_reduce, 0, adam_l2_pack),
    "adam_ams": TritonOp(adam_op_update, no_reduce, 0, adam_l2_ams_pack),
    "lion": TritonOp(lion_update, no_reduce, 0, lion_pack),
    "lion_cautious": TritonOp(lion_update, lion_cautious_reduce, 1, lion_cautious_pack),
    "grad_rowsum": TritonOp(grad_rowsum_update, grad_rowsum_reduce, 1, grad_rowsum_pack),
    "clip": TritonOp(clip_update, clip_reduce, 1, clip_pack),
    "adan": TritonOp(adan_update, no_reduce, 0, adan_pack),
    "adabelief": TritonOp(adabelief_update, no_reduce, 0, rectified_pack),
    "adabelief_ams": TritonOp(adabelief_update, no_reduce, 0, rectified_pack_ams),
    "diffgrad": TritonOp(diffgrad_update, no_reduce, 0, rectified_pack),
    "diffgrad_ams": TritonOp(diffgrad_update, no_reduce, 0, rectified_pack_ams),
    "exadam": TritonOp(exadam_update, no_reduce, 0, exadam_pack),
    "adahessian": TritonOp(adahessian_update, no_reduce, 0, adahessian_pack),
    "adahessian_plain": TritonOp(adahessian_plain_update, no_reduce, 0, adahessian_pack),
    "adahessian_pow": TritonOp(adahessian_update, no_reduce, 0, adahessian_pack),
    "adahessian_plain_pow": TritonOp(adahessian_plain_update, no_reduce, 0, adahessian_pack),
    "lamb": TritonOp(lamb_update, lamb_reduce, 2, lamb_pack),
    "sgdsai": TritonOp(sgdsai_update, no_reduce, 0, sgdsai_pack),
    "sgdsai_plain": TritonOp(sgdsai_update, no_reduce, 0, sgdsai_plain_pack),
    "adamp": TritonOp(adamp_update, adamp_reduce, 4, adamp_pack),
    "sgdp": TritonOp(sgdp_update, sgdp_reduce, 4, sgdp_pack),
    "adamp_flat": TritonOp(adamp_flat_update, no_reduce, 0, adamp_pack),
    "sgdp_flat": TritonOp(sgdp_flat_update, no_reduce, 0, sgdp_pack),
    "orthograd": TritonOp(orthograd_update, orthograd_reduce, 4, orthograd_pack),
    "sgd": TritonOp(sgd_update, no_reduce, 0, sgd_pack),
    "sgd_plain": TritonOp(sgd_update, no_reduce, 0, sgd_plain_pack),
    "adagrad": TritonOp(adagrad_update, no_reduce, 0, adagrad_pack),
    "rmsprop": TritonOp(rmsprop_update, no_reduce, 0, rmsprop_pack),
    "rmsprop_momentum": TritonOp(rmsprop_update, no_reduce, 0, rmsprop_momentum_pack),
    "rmsprop_centered": TritonOp(rmsprop_update, no_reduce, 0, rmsprop_centered_pack),
    "rmsprop_centered_momentum": TritonOp(rmsprop_update, no_reduce, 0, rmsprop_centered_momentum_pack),
    "sam": TritonOp(sam_update, no_reduce, 0, sam_pack),
    "asam": TritonOp(asam_update, no_reduce, 0, sam_pack),
    "asam_norm": TritonOp(asam_norm_update, asam_norm_reduce, 1, sam_pack),
}


def elementwise_step(op, lists, steps, *, hyper, flags, **kwargs):
    """Run the registered op ``op`` (see :func:`.elementwise.elementwise_apply` for the arguments)."""
    spec = OPS[op]
    thyper, tflags = spec.pack(tuple(hyper), int(flags))
    elementwise_apply(spec.update, spec.reduce, spec.nreduce, lists, steps, hyper=thyper, flags=tflags, **kwargs)
