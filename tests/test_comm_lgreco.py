"""L-GreCo (fastopt.comm.lgreco): the DP against a brute force over every choice, the policy's error and
size tables against direct computation, and the policy on 2 gloo ranks with fastopt.comm's hooks."""
import datetime
import itertools
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fastopt.comm.lgreco import LGreCo, lgreco_dp


def _brute(e, s, budget):
    """The least total size over every choice with total error <= budget (None: nothing fits)."""
    best = None
    for ch in itertools.product(range(e.shape[1]), repeat=e.shape[0]):
        if math.fsum(e[l, c] for l, c in enumerate(ch)) <= budget:
            size = math.fsum(s[l, c] for l, c in enumerate(ch))
            best = size if best is None else min(best, size)
    return best


def _check(e, s, res, budget):
    assert len(res.choice) == e.shape[0]
    assert res.error == pytest.approx(math.fsum(e[l, c] for l, c in enumerate(res.choice)), rel=1e-12)
    assert res.size == math.fsum(s[l, c] for l, c in enumerate(res.choice))
    assert res.error <= budget  # always feasible


def test_dp_exact_on_integer_errors():
    rng = np.random.default_rng(0)
    for _ in range(150):
        L, C = int(rng.integers(3, 6)), int(rng.integers(3, 5))
        e = rng.integers(0, 40, (L, C)).astype(float)
        s = rng.integers(1, 200, (L, C)).astype(float)
        d = int(rng.integers(C))
        budget = math.fsum(e[:, d])  # the uniform setting's error
        res = lgreco_dp(e, s, budget, default=d)
        _check(e, s, res, budget)
        assert res.size == _brute(e, s, budget)  # exact: the same least size
        assert res.size <= math.fsum(s[:, d])  # never worse than uniform
        # the same integers on a coarser grid (width 1/4 of an error unit: still on the grid) stay exact
        res = lgreco_dp(e / 4, s, budget / 4, bins=int(budget) if budget else 1, default=d)
        assert res.size == _brute(e, s, budget)
        # any budget, not only the uniform one
        b = float(rng.integers(0, int(e.sum()) + 1))
        want = _brute(e, s, b)
        if want is None:
            with pytest.raises(ValueError, match="lgreco_dp: no choice"):
                lgreco_dp(e, s, b)
        else:
            assert lgreco_dp(e, s, b).size == want


def test_dp_within_a_bin_per_layer_on_real_errors():
    rng = np.random.default_rng(1)
    for trial in range(150):
        L, C = int(rng.integers(3, 6)), int(rng.integers(3, 5))
        e = rng.random((L, C)) * rng.choice([1e-3, 1.0, 1e3])
        s = rng.integers(1, 1000, (L, C)).astype(float)
        d = int(rng.integers(C))
        budget = math.fsum(e[:, d])
        bins = int(rng.choice([10, 50, 10_000]))
        res = lgreco_dp(e, s, budget, bins=bins, default=d)
        _check(e, s, res, budget)
        assert res.size >= _brute(e, s, budget)  # (feasible, so no better than the optimum)
        assert res.size <= math.fsum(s[:, d])  # the uniform setting is feasible: never worse
        # each layer's error rounds up by less than one bin: at least as good as the optimum of the budget
        # shrunk by one bin per layer
        tight = _brute(e, s, budget - L * budget / bins)
        if tight is not None:
            assert res.size <= tight
    # fine bins give the exact optimum on these tables (checked, not assumed: the brute force decides)
    e = rng.random((4, 4))
    s = rng.integers(1, 1000, (4, 4)).astype(float)
    gaps = sorted({abs(math.fsum(e[l, c] for l, c in enumerate(ch)) - math.fsum(e[:, 1]))
                   for ch in itertools.product(range(4), repeat=4)} - {0.0})
    res = lgreco_dp(e, s, math.fsum(e[:, 1]), bins=int(8 * math.fsum(e[:, 1]) / gaps[0]) + 10, default=1)
    assert res.size == _brute(e, s, math.fsum(e[:, 1]))


def test_dp_ties_and_inputs():
    # equal sizes: the smaller error wins; unavailable candidates (inf / nan) are never picked
    e = np.array([[3.0, 1.0, np.inf], [2.0, 2.0, np.nan]])
    s = np.array([[5.0, 5.0, 0.0], [1.0, 7.0, 0.0]])
    res = lgreco_dp(e, s, 10.0)
    assert res.choice == [1, 0] and res.size == 6.0 and res.error == 3.0
    assert lgreco_dp(torch.tensor(e), torch.tensor(s), torch.tensor(10.0)).choice == [1, 0]
    with pytest.raises(ValueError, match="lgreco_dp: errors .* same shape"):
        lgreco_dp(e, s[:, :2], 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: errors must be >= 0"):
        lgreco_dp(-e, s, 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: sizes must be finite"):
        lgreco_dp(np.ones((2, 2)), np.full((2, 2), np.inf), 1.0)
    with pytest.raises(ValueError, match="lgreco_dp: budget"):
        lgreco_dp(e, s, -1.0)
    with pytest.raises(ValueError, match="lgreco_dp: bins"):
        lgreco_dp(e, s, 1.0, bins=0)
    with pytest.raises(ValueError, match="lgreco_dp: default"):
        lgreco_dp(e, s, 1.0, default=3)
    with pytest.raises(ValueError, match="non-empty 2-D"):
        lgreco_dp([1.0, 2.0], [1.0, 2.0], 1.0)
    # a zero budget: only zero errors fit
    assert lgreco_dp([[0.0, 1.0], [2.0, 0.0]], [[9, 1], [1, 9]], 0).choice == [0, 1]
