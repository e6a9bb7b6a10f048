"""Gradient compression for data-parallel training: DDP communication hooks (see fastopt/comm/hooks.py).

* :func:`powersgd_hook` / :class:`PowerSGDState`: PowerSGD, torch's ``powerSGD_hook`` bit for bit;
* :func:`topk_hook` / :class:`TopKState`: top-k sparsification with error feedback;
* :func:`qsgd_hook` / :class:`QSGDState`: QSGD stochastic quantization, packed;
* :func:`bytes_for`, :func:`compress_error`: a setting's bytes and error (for layer-wise policies);
* :class:`LGreCo` / :func:`lgreco_dp`: L-GreCo's layer-wise adaptive policy (fastopt/comm/lgreco.py).
"""
from .hooks import (PowerSGDState, QSGDState, TopKState, bytes_for, compress_error, powersgd_hook,  # noqa: F401
                    qsgd_hook, topk_hook)
from .lgreco import LGreCo, LGreCoChoice, lgreco_dp  # noqa: F401

__all__ = ["PowerSGDState", "powersgd_hook", "TopKState", "topk_hook", "QSGDState", "qsgd_hook", "bytes_for",
           "compress_error", "LGreCo", "LGreCoChoice", "lgreco_dp"]
