"""Client-side DP: global L2 clipping, Gaussian noise, accounting with dp-accounting."""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from hfl_common.errors import InvalidArgumentError
from hfl_trainer.privacy import (
    add_gaussian_noise,
    clip_update,
    global_norm,
    local_epsilon,
)

_floats = st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=200, deadline=None)
@given(
    first=hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6), elements=_floats),
    second=hnp.arrays(np.float32, hnp.array_shapes(max_dims=2, max_side=6), elements=_floats),
    clip_norm=st.floats(1e-3, 1e3),
)
def test_clipped_update_norm_never_exceeds_the_bound(
    first: np.ndarray, second: np.ndarray, clip_norm: float
) -> None:
    update = {"a/kernel": first, "b/bias": second}

    clipped, norm = clip_update(update, clip_norm)

    assert global_norm(clipped) <= clip_norm
    assert norm == pytest.approx(global_norm(update))
    assert {k: v.dtype for k, v in clipped.items()} == {k: v.dtype for k, v in update.items()}


def test_update_within_the_bound_is_returned_unchanged() -> None:
    update = {"w": np.array([0.3, -0.4], np.float32), "b": np.array([[0.0]], np.float32)}

    clipped, norm = clip_update(update, 1.0)

    assert norm == pytest.approx(0.5)
    for name, value in update.items():
        np.testing.assert_array_equal(clipped[name], value)
    assert clipped["w"] is not update["w"]


def test_clipping_scales_the_whole_update_by_one_factor() -> None:
    update = {"w": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}

    clipped, norm = clip_update(update, 1.0)

    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.0], rtol=1e-5)
    np.testing.assert_allclose(clipped["b"], [0.8], rtol=1e-5)


def test_clipping_refuses_a_non_finite_update_and_bad_bound() -> None:
    with pytest.raises(InvalidArgumentError, match=r"update has a non-finite L2 norm \(nan\)"):
        clip_update({"w": np.array([np.nan], np.float32)}, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"clip_norm 0\.0 must be positive and finite"):
        clip_update({"w": np.zeros(1, np.float32)}, 0.0)


def test_noise_has_the_gaussian_mechanism_standard_deviation() -> None:
    update = {"w": np.zeros((400, 500), np.float32), "b": np.full((1000,), 2.0, np.float32)}

    noisy = add_gaussian_noise(
        update, noise_multiplier=1.5, clip_norm=0.2, rng=np.random.default_rng(0)
    )

    noise = np.concatenate([noisy["w"].ravel(), noisy["b"].ravel() - 2.0])
    assert noise.std() == pytest.approx(0.3, rel=0.01)
    assert abs(float(noise.mean())) < 0.003
    assert noisy["w"].dtype == np.float32


def test_zero_noise_multiplier_adds_nothing() -> None:
    update = {"w": np.array([1.0, 2.0], np.float32)}

    noisy = add_gaussian_noise(update, 0.0, 1.0, np.random.default_rng(0))

    np.testing.assert_array_equal(noisy["w"], update["w"])


def test_local_epsilon_is_the_exact_gaussian_and_below_the_classic_rdp_bound() -> None:
    # T releases of Gaussian(z) are one Gaussian with noise z / sqrt(T); its exact epsilon
    # is dp-accounting's analytic Gaussian (Balle & Wang 2018), which PLD must match.
    z, releases, delta = 1.0, 20, 1e-5
    exact = dp_accounting.get_epsilon_gaussian(z / math.sqrt(releases), delta)
    # The classic RDP conversion (Mironov 2017, Prop. 3) on the usual order grid, which
    # this module used to compute by hand: dp-accounting's RDP is at least as tight.
    orders = (1.5, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64, 128, 256)
    classic = min(releases * a / (2 * z**2) + math.log(1 / delta) / (a - 1) for a in orders)

    eps = local_epsilon(z, releases, delta)

    assert eps.pld == pytest.approx(exact, rel=2e-3)
    assert exact <= eps.rdp <= classic
    assert eps.epsilon == min(eps.rdp, eps.pld)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    one = local_epsilon(2.0, 1, 1e-5).epsilon
    hundred = local_epsilon(2.0, 100, 1e-5).epsilon
    noisier = local_epsilon(8.0, 100, 1e-5).epsilon

    assert one < hundred
    assert noisier < hundred
    assert local_epsilon(2.0, 0, 1e-5).epsilon == 0.0


def test_accountant_refuses_zero_noise_and_bad_delta() -> None:
    with pytest.raises(InvalidArgumentError, match=r"noise_multiplier 0\.0 must be positive"):
        local_epsilon(0.0, 1, 1e-5)
    with pytest.raises(InvalidArgumentError, match=r"delta 1\.0 must lie strictly between"):
        local_epsilon(1.0, 1, 1.0)
