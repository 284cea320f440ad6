"""update_norm: the update's L2 norm in float64, NaN/inf named per tensor."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from hfl_aggregator.validation import BLOCK_ELEMENTS, update_norm
from hfl_common.errors import InvalidArgumentError


def test_the_norm_is_the_float64_norm_of_all_float_tensors_across_blocks() -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, npt.NDArray[Any]] = {
        "big": rng.standard_normal(BLOCK_ELEMENTS * 2 + 17).astype(np.float32),
        "matrix": rng.standard_normal((30, 7)),
        "half": rng.standard_normal(9).astype(np.float16),
        "steps": np.array([10**6], dtype=np.int64),  # not a float: not part of the norm
    }
    expected = math.sqrt(
        sum(
            float(np.sum(a.astype(np.float64) ** 2))
            for name, a in arrays.items()
            if name != "steps"
        )
    )
    assert update_norm(arrays) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_value_is_refused_naming_the_tensor_and_the_count(bad: float) -> None:
    second = np.ones(BLOCK_ELEMENTS + 5, dtype=np.float32)
    second[3] = bad
    second[-1] = bad
    with pytest.raises(InvalidArgumentError, match="tensor 'second' contains 2 NaN") as err:
        update_norm({"first": np.ones(4, dtype=np.float32), "second": second})
    assert err.value.reason == "nan"


def test_a_huge_but_finite_float64_is_not_called_nan() -> None:
    assert update_norm({"w": np.array([1e200, 1.0])}) == math.inf


def test_an_update_without_float_tensors_has_norm_zero() -> None:
    assert update_norm({"ids": np.arange(5)}) == 0.0
