"""Shared helpers (slsg.utils)."""
from __future__ import annotations

import pytest
import torch

from slsg.utils import all_finite


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_all_finite_finds_one_bad_value_anywhere(dtype, bad):
    x = torch.randn(37, 11).to(dtype)
    assert all_finite(x)
    for where in [(0, 0), (18, 5), (36, 10)]:
        y = x.clone()
        y[where] = bad
        assert not all_finite(y)
        assert not all_finite(y.t())  # non-contiguous
        assert all_finite(y[:, :5] if where[1] >= 5 else y[:, 5:])  # a view without it


def test_all_finite_edge_cases():
    assert all_finite(torch.empty(0, 3))
    assert all_finite(torch.arange(5))  # integers are always finite
    assert all_finite(torch.tensor(3.0))
    assert not all_finite(torch.tensor(float("nan")))
    big = torch.finfo(torch.float32).max
    assert all_finite(torch.tensor([big, -big]))
