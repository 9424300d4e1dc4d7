"""The batched NaN/inf check of an aggregation names the same client as the one-by-one check."""
from __future__ import annotations

import pytest
import torch

from fedsim.errors import DivergenceError
from fedsim.executors.base import JobResult
from fedsim.protocols.base import check_all_finite
from fedsim.strategy import ClientOutput


def _result(client: int, update: torch.Tensor) -> JobResult:
    return JobResult(client, client, 0, ClientOutput(update, {}, {}, {}), 10, 1)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_the_first_non_finite_client_is_named(bad):
    ups = [torch.randn(50) for _ in range(20)]
    ups[7][3] = bad
    ups[12][0] = float("nan")
    with pytest.raises(DivergenceError, match="client 7's update has NaN/inf in round 4"):
        check_all_finite([_result(c, u) for c, u in enumerate(ups)], 4, 0)


def test_opposite_infinities_and_overflowing_sums():
    both = torch.zeros(10)
    both[1], both[2] = float("inf"), -float("inf")  # the sum is NaN: still caught
    with pytest.raises(DivergenceError, match="client 1"):
        check_all_finite([_result(0, torch.ones(10)), _result(1, both)], 0, 0)
    big = torch.full((10,), 3e38)  # finite entries whose float32 sum overflows: no error
    assert not torch.isfinite(big.sum())
    check_all_finite([_result(0, big), _result(1, -big)], 0, 0)


def test_mixed_dtypes_and_an_empty_aggregation():
    check_all_finite([], 0, 0)
    check_all_finite([_result(0, torch.ones(3)), _result(1, torch.ones(3, dtype=torch.float64))], 0, 0)
    with pytest.raises(DivergenceError, match="client 1"):
        check_all_finite([_result(0, torch.ones(3)), _result(1, torch.tensor([1.0, float("nan")], dtype=torch.float64))], 0, 0)
