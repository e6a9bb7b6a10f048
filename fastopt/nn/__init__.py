"""Layers whose backward is a kernel of fastopt's.

- :class:`WTACRSLinear` and :func:`convert_linear`: ``nn.Linear`` with Winner-Take-All Column-Row
  Sampling (Liu et al., NeurIPS 2023): the activations for the weight gradient stored only for the
  sampled rows (about ``budget`` of them), an unbiased weight gradient, exact input and bias gradients.
"""
from .wtacrs import WTACRSLinear, convert_linear, set_example_ids, wtacrs_rows

__all__ = ["WTACRSLinear", "convert_linear", "set_example_ids", "wtacrs_rows"]
