"""Aggregation rules, server optimizers and strategies, on hand-checked numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from hfl_aggregator.accumulate import (
    Array,
    InMemoryUpdates,
    MeanAccumulator,
    SpillStore,
    Weights,
)
from hfl_aggregator.strategies import (
    STRATEGY_NAMES,
    FedAvg,
    RoundConfig,
    make_strategy,
    resolve_params,
)
from hfl_aggregator.strategies import aggregate as agg
from hfl_common.errors import ConfigError, FailedPreconditionError, InvalidArgumentError


def vec(*values: float) -> Array:
    return np.array(values, dtype=np.float64)


def model(*values: float) -> Weights:
    return {"w": vec(*values)}


# ------------------------------------------------------------------ pure rules


def test_weighted_mean_weights_updates_by_examples() -> None:
    # ([1, 2] * 1 + [3, 6] * 3) / 4 = [1 + 9, 2 + 18] / 4 = [2.5, 5.0]
    result = agg.weighted_mean([model(1, 2), model(3, 6)], [1, 3])
    np.testing.assert_allclose(result["w"], [2.5, 5.0])


def test_weighted_mean_of_no_updates_is_refused() -> None:
    with pytest.raises(InvalidArgumentError, match="a weighted mean needs at least one update"):
        agg.weighted_mean([], [])


def test_weighted_mean_of_mismatched_shapes_is_refused() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"update tensor 'w' has shape \(3,\), the model's is \(2,\)"
    ):
        agg.weighted_mean([model(1, 2), model(1, 2, 3)], [1, 1])


def test_weighted_mean_refuses_a_missing_tensor() -> None:
    with pytest.raises(InvalidArgumentError, match=r"update lacks tensors \['b'\]"):
        agg.weighted_mean([{"w": vec(1), "b": vec(2)}, {"w": vec(1)}], [1, 1])


def test_weighted_mean_refuses_a_weight_count_mismatch() -> None:
    with pytest.raises(InvalidArgumentError, match="a weighted mean of 2 updates was given 1"):
        agg.weighted_mean_tensor(np.zeros((2, 3)), [1.0])


def test_median_resists_one_huge_outlier() -> None:
    # sorted [0.9, 1.0, 1.1, 1.2, 1e6]: the middle one is 1.1 (the mean would be ~2e5)
    updates = [model(1.0), model(1.1), model(0.9), model(1e6), model(1.2)]
    np.testing.assert_allclose(agg.median(updates)["w"], [1.1])


def test_median_of_an_even_count_averages_the_middle_pair() -> None:
    # sorted [1, 2, 4, 100] -> (2 + 4) / 2 = 3, per coordinate
    stack = np.array([[1.0, 10.0], [4.0, 40.0], [100.0, -5.0], [2.0, 20.0]])
    np.testing.assert_allclose(agg.median_tensor(stack), [3.0, 15.0])


def test_median_keeps_the_float32_dtype() -> None:
    stack = np.array([[1.0], [2.0], [3.0]], dtype=np.float32)
    assert agg.median_tensor(stack).dtype == np.float32


def test_trimmed_mean_drops_beta_n_from_each_side() -> None:
    # n = 5, beta = 0.2 -> 1 per side: [-1e6, 1, 2, 3, 1e6] keeps [1, 2, 3] -> 2
    updates = [model(3.0), model(-1e6), model(2.0), model(1e6), model(1.0)]
    np.testing.assert_allclose(agg.trimmed_mean(updates, 0.2)["w"], [2.0])


def test_trimmed_mean_counts_trim_without_float_error() -> None:
    # 0.3 * 10 is 3 exactly, not 2.999...
    assert agg.trim_count(10, 0.3) == 3
    assert agg.trim_count(9, 0.3) == 2  # floor(2.7)


def test_trimmed_mean_with_beta_zero_is_the_plain_mean() -> None:
    # (1 + 2 + 6) / 3 = 3
    np.testing.assert_allclose(
        agg.trimmed_mean([model(1.0), model(2.0), model(6.0)], 0.0)["w"], [3.0]
    )


def test_trimmed_mean_refuses_beta_of_one_half() -> None:
    with pytest.raises(
        InvalidArgumentError, match=r"trimmed mean fraction beta must be in \[0, 0.5\), got 0.5"
    ):
        agg.trimmed_mean([model(1.0), model(2.0)], 0.5)


def test_trimmed_mean_refuses_to_trim_everything() -> None:
    with pytest.raises(InvalidArgumentError, match="drops 1 updates per side and keeps none of 2"):
        agg.trim_count(2, 0.4999999999)


def test_krum_scores_sum_the_nearest_squared_distances() -> None:
    # values 0, 1, 2, 10; f = 0 -> n - f - 2 = 2 nearest
    # 0: {1, 4, 100} -> 1 + 4 = 5     1: {1, 1, 81} -> 2
    # 2: {4, 1, 64}  -> 5             10: {100, 81, 64} -> 145
    updates = [model(0.0), model(1.0), model(2.0), model(10.0)]
    distances = agg.model_sq_distances(updates)
    np.testing.assert_allclose(distances[0], [0.0, 1.0, 4.0, 100.0])
    np.testing.assert_allclose(agg.krum_scores(distances, 0), [5.0, 2.0, 5.0, 145.0])
    np.testing.assert_allclose(agg.krum(updates, 0)["w"], [1.0])


def test_multi_krum_averages_the_m_best() -> None:
    # scores as above: best is 1 (score 2), then 0 (score 5, lower index than 2) -> (1 + 0) / 2
    updates = [model(0.0), model(1.0), model(2.0), model(10.0)]
    assert agg.krum_select(agg.model_sq_distances(updates), 0, 2) == [1, 0]
    np.testing.assert_allclose(agg.multi_krum(updates, 0, 2)["w"], [0.5])


def test_krum_picks_an_honest_update_among_outliers() -> None:
    rng = np.random.default_rng(7)
    honest = [{"w": 1.0 + 0.01 * rng.standard_normal(4)} for _ in range(5)]
    byzantine = [{"w": np.full(4, 100.0)}, {"w": np.full(4, -50.0)}]
    updates = [honest[0], byzantine[0], honest[1], honest[2], byzantine[1], honest[3], honest[4]]
    chosen = agg.krum_select(agg.model_sq_distances(updates), f=2, m=1)[0]
    assert chosen in {0, 2, 3, 5, 6}
    np.testing.assert_allclose(agg.krum(updates, 2)["w"], 1.0, atol=0.05)


def test_krum_refuses_too_few_updates() -> None:
    updates = [model(float(i)) for i in range(5)]
    with pytest.raises(
        InvalidArgumentError, match=r"Krum needs more than 2f\+2 = 6 updates, got 5"
    ):
        agg.krum(updates, 2)


def test_multi_krum_refuses_m_above_n_minus_f() -> None:
    updates = [model(float(i)) for i in range(5)]
    with pytest.raises(
        InvalidArgumentError, match=r"selects m in \[1, n - f\] = \[1, 4\] updates, got m = 5"
    ):
        agg.multi_krum(updates, 1, 5)


# ------------------------------------------- what a Byzantine minority can do

# n = 8 updates of which f are Byzantine and send anything: sign-flipped honest updates
# scaled up to 1e6, or huge values in random directions.
N_UPDATES = 8


def _honest_and_byzantine(
    seed: int, f: int, scale: float, spread: float
) -> tuple[list[Weights], list[Weights]]:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal(16)
    honest = [{"w": centre + spread * rng.standard_normal(16)} for _ in range(N_UPDATES - f)]
    byzantine: list[Weights] = []
    for i in range(f):
        if i % 2 == 0:  # sign flip of an honest update, scaled
            byzantine.append({"w": -scale * honest[i]["w"]})
        else:  # anything large
            byzantine.append({"w": scale * rng.standard_normal(16)})
    return honest, byzantine


def _interleave(honest: list[Weights], byzantine: list[Weights]) -> list[Weights]:
    # Byzantine updates first, as in benchmarks/bench_byzantine.py: order must not matter.
    return byzantine + honest


def _honest_range(honest: list[Weights]) -> tuple[Array, Array]:
    stack = np.stack([u["w"] for u in honest])
    return stack.min(axis=0), stack.max(axis=0)


@settings(max_examples=200, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    f=st.integers(0, N_UPDATES // 2 - 1),
    scale=st.floats(1.0, 1e6),
)
def test_median_stays_in_the_honest_range_whatever_a_minority_sends(
    seed: int, f: int, scale: float
) -> None:
    # Each coordinate of the median is the mean of the 4th and 5th of 8 values; with
    # f <= 3 Byzantine values, both lie between the smallest and largest honest value.
    honest, byzantine = _honest_and_byzantine(seed, f, scale, spread=0.1)
    result = agg.median(_interleave(honest, byzantine))["w"]
    low, high = _honest_range(honest)
    assert np.all(result >= low)
    assert np.all(result <= high)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(1, 3), scale=st.floats(1.0, 1e6))
def test_a_trimmed_mean_trimming_at_least_f_per_side_stays_in_the_honest_range(
    seed: int, f: int, scale: float
) -> None:
    # beta = f / n trims f values per side; the kept ones lie between honest values.
    honest, byzantine = _honest_and_byzantine(seed, f, scale, spread=0.1)
    result = agg.trimmed_mean(_interleave(honest, byzantine), f / N_UPDATES)["w"]
    low, high = _honest_range(honest)
    assert np.all(result >= low - 1e-12)
    assert np.all(result <= high + 1e-12)


def test_a_trimmed_mean_trimming_fewer_than_f_is_dragged_by_the_outliers() -> None:
    # 2 Byzantine values of 1e6 against 6 honest ones of 1; trimming 1 per side keeps
    # one 1e6: the mean of the 6 kept values is (1e6 + 5 * 1) / 6.
    updates = [model(1e6), model(1e6)] + [model(1.0)] * 6
    np.testing.assert_allclose(agg.trimmed_mean(updates, 1 / 8)["w"], [(1e6 + 5.0) / 6])
    np.testing.assert_allclose(agg.trimmed_mean(updates, 2 / 8)["w"], [1.0])


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), f=st.integers(1, 2), scale=st.floats(3.0, 1e6))
def test_multi_krum_drops_far_byzantine_updates_and_returns_the_honest_mean(
    seed: int, f: int, scale: float
) -> None:
    # An honest update's Krum score is at most (n - f - 2) * D, D the largest squared
    # distance between honest updates; a Byzantine one's at least (n - 2f - 1) * d**2,
    # d its distance to the nearest honest update. Far enough, every Byzantine update
    # scores worse than every honest one, and Multi-Krum with m = n - f averages exactly
    # the honest updates.
    honest, byzantine = _honest_and_byzantine(seed, f, scale, spread=0.05)
    stack = np.stack([u["w"] for u in honest])
    worst_honest = max(float(np.sum((a - b) ** 2)) for a in stack for b in stack)
    nearest = min(float(np.sum((b["w"] - h) ** 2)) for b in byzantine for h in stack)
    assume(nearest * (N_UPDATES - 2 * f - 1) > worst_honest * (N_UPDATES - f - 2))
    updates = _interleave(honest, byzantine)
    chosen = agg.krum_select(agg.model_sq_distances(updates), f, N_UPDATES - f)
    assert sorted(chosen) == list(range(f, N_UPDATES))
    np.testing.assert_allclose(
        agg.multi_krum(updates, f, N_UPDATES - f)["w"], stack.mean(axis=0), rtol=1e-12
    )


def test_fedavg_is_moved_without_bound_by_one_sign_flipped_update() -> None:
    # 7 honest updates of 1 and one of -1e6 (weights equal): the mean is (7 - 1e6) / 8.
    updates = [model(-1e6)] + [model(1.0)] * 7
    np.testing.assert_allclose(agg.weighted_mean(updates, [1.0] * 8)["w"], [(7 - 1e6) / 8])


# ----------------------------------------------------------- server optimizers


def test_sgd_momentum_step_by_hand() -> None:
    # v' = 0.9 * 0.2 + 0.5 = 0.68; x' = 1 - 0.1 * 0.68 = 0.932
    x, v = agg.sgd_momentum_step(vec(1.0), vec(0.5), vec(0.2), lr=0.1, momentum=0.9)
    np.testing.assert_allclose(x, [0.932])
    np.testing.assert_allclose(v, [0.68])


def test_adam_step_two_steps_by_hand() -> None:
    # tau = 0.5 -> v_{-1} = 0.25; beta1 = 0.9, beta2 = 0.99, eta = 1; x0 = 1
    # step 1, delta 0.5 (g = -0.5): m = 0.1 * -0.5 = -0.05
    #   v = 0.99 * 0.25 + 0.01 * 0.25 = 0.25; x = 1 + 0.05 / (0.5 + 0.5) = 1.05
    # step 2, delta 2.1 (g = -2.1): m = 0.9 * -0.05 + 0.1 * -2.1 = -0.255
    #   v = 0.2475 + 0.01 * 4.41 = 0.2916 = 0.54**2; x = 1.05 + 0.255 / 1.04 = 1.2951923077
    tau = 0.5
    x0 = vec(1.0)
    m0 = np.zeros(1)
    v0 = agg.initial_second_moment(x0, tau)
    np.testing.assert_allclose(v0, [0.25])
    x1, m1, v1 = agg.adam_step(x0, vec(-0.5), m0, v0, 1.0, 0.9, 0.99, tau)
    np.testing.assert_allclose([x1[0], m1[0], v1[0]], [1.05, -0.05, 0.25])
    x2, m2, v2 = agg.adam_step(x1, vec(-2.1), m1, v1, 1.0, 0.9, 0.99, tau)
    np.testing.assert_allclose([x2[0], m2[0], v2[0]], [1.2951923077, -0.255, 0.2916])


def test_yogi_step_two_steps_by_hand() -> None:
    # tau = 0.5 -> v = 0.25; beta1 = 0.5, beta2 = 0.25 (1 - beta2 = 0.75), eta = 0.3; x0 = 1
    # step 1, delta 1 in both coordinates (g = -1, g^2 = 1 > v): v = 0.25 + 0.75 = 1
    #   m = -0.5; x = 1 + 0.3 * 0.5 / (1 + 0.5) = 1.1
    # step 2, coordinate a: delta 2 (g^2 = 4 > v = 1): v = 1 + 0.75 * 4 = 4
    #   m = 0.5 * -0.5 + 0.5 * -2 = -1.25; x = 1.1 + 0.3 * 1.25 / (2 + 0.5) = 1.25
    # step 2, coordinate b: delta 0.5 (g^2 = 0.25 < v = 1): v = 1 - 0.75 * 0.25 = 0.8125
    #   m = 0.5 * -0.5 + 0.5 * -0.5 = -0.5; x = 1.1 + 0.15 / (0.9013878189 + 0.5) = 1.2070367517
    tau = 0.5
    x0 = vec(1.0, 1.0)
    v0 = agg.initial_second_moment(x0, tau)
    x1, m1, v1 = agg.yogi_step(x0, vec(-1.0, -1.0), np.zeros(2), v0, 0.3, 0.5, 0.25, tau)
    np.testing.assert_allclose(x1, [1.1, 1.1])
    np.testing.assert_allclose(v1, [1.0, 1.0])
    x2, m2, v2 = agg.yogi_step(x1, vec(-2.0, -0.5), m1, v1, 0.3, 0.5, 0.25, tau)
    np.testing.assert_allclose(v2, [4.0, 0.8125])
    np.testing.assert_allclose(m2, [-1.25, -0.5])
    np.testing.assert_allclose(x2, [1.25, 1.2070367517])


def test_adagrad_step_two_steps_by_hand() -> None:
    # tau = 0.6 -> v = 0.36; beta1 = 0.5, eta = 0.3; x0 = 1
    # step 1, delta 0.8 (g^2 = 0.64): v = 1.0; m = -0.4; x = 1 + 0.3 * 0.4 / 1.6 = 1.075
    # step 2, delta 2.4 (g^2 = 5.76): v = 6.76 = 2.6**2; m = -0.2 - 1.2 = -1.4
    #   x = 1.075 + 0.3 * 1.4 / (2.6 + 0.6) = 1.075 + 0.13125 = 1.20625
    tau = 0.6
    x0 = vec(1.0)
    x1, m1, v1 = agg.adagrad_step(
        x0, vec(-0.8), vec(0.0), agg.initial_second_moment(x0, tau), 0.3, 0.5, tau
    )
    np.testing.assert_allclose([x1[0], m1[0], v1[0]], [1.075, -0.4, 1.0])
    x2, m2, v2 = agg.adagrad_step(x1, vec(-2.4), m1, v1, 0.3, 0.5, tau)
    np.testing.assert_allclose([x2[0], m2[0], v2[0]], [1.20625, -1.4, 6.76])


def test_bias_corrected_adam_first_step_moves_by_the_learning_rate() -> None:
    # step 1: m_hat = g, v_hat = g^2 -> x = 1 - 0.1 * 0.5 / (0.5 + 1e-7) ~= 0.9 (Kingma & Ba)
    x, m, v = agg.bias_corrected_adam_step(
        vec(1.0), vec(0.5), vec(0.0), vec(0.0), 1, 0.1, 0.9, 0.999, 1e-7
    )
    np.testing.assert_allclose(x, [0.9], rtol=1e-6)
    np.testing.assert_allclose([m[0], v[0]], [0.05, 0.00025])  # 0.1 * 0.5, 0.001 * 0.25


def test_optimizer_steps_do_not_modify_their_inputs() -> None:
    x, g, m, v = vec(1.0), vec(-0.5), vec(0.1), vec(0.2)
    agg.adam_step(x, g, m, v, 1.0, 0.9, 0.99, 0.1)
    agg.yogi_step(x, g, m, v, 1.0, 0.9, 0.99, 0.1)
    agg.sgd_momentum_step(x, g, m, 1.0, 0.9)
    assert (x[0], g[0], m[0], v[0]) == (1.0, -0.5, 0.1, 0.2)


# ------------------------------------------------------------------ strategies


def source(*updates: tuple[Weights, float]) -> InMemoryUpdates:
    return InMemoryUpdates(list(updates))


def test_fedavg_adds_the_weighted_mean_delta() -> None:
    # mean = ([0.5, -1] * 1 + [1.5, 1] * 3) / 4 = [5, 2] / 4 = [1.25, 0.5]
    # w + mean = [1, 2] + [1.25, 0.5] = [2.25, 2.5]; with server_lr 0.5: [1.625, 2.25]
    updates = source((model(0.5, -1.0), 1), (model(1.5, 1.0), 3))
    assert not make_strategy("fedavg", {}).needs_all_updates
    new = make_strategy("fedavg", {}).aggregate(model(1.0, 2.0), updates)
    np.testing.assert_allclose(new["w"], [2.25, 2.5])
    half = make_strategy("fedavg", {"server_lr": 0.5}).aggregate(model(1.0, 2.0), updates)
    np.testing.assert_allclose(half["w"], [1.625, 2.25])


def test_fedavg_does_not_modify_the_global_weights() -> None:
    global_weights = model(1.0, 2.0)
    FedAvg().aggregate(global_weights, source((model(1.0, 1.0), 1)))
    np.testing.assert_array_equal(global_weights["w"], [1.0, 2.0])


def test_fedavg_from_a_mean_accumulator_keeps_float32() -> None:
    acc = MeanAccumulator({"w": np.zeros(2, dtype=np.float32)})
    acc.add({"w": np.array([1.0, 3.0], dtype=np.float32)}, 2)
    acc.add({"w": np.array([4.0, 0.0], dtype=np.float32)}, 1)
    # mean = ([2, 6] + [4, 0]) / 3 = [2, 2]
    new = FedAvg().aggregate({"w": np.ones(2, dtype=np.float32)}, acc)
    assert new["w"].dtype == np.float32
    np.testing.assert_allclose(new["w"], [3.0, 3.0])


def test_strategy_refuses_updates_of_another_model() -> None:
    with pytest.raises(
        InvalidArgumentError,
        match=r"updates' tensor 'w' has shape \(3,\), the global model's is \(2,\)",
    ):
        FedAvg().aggregate(model(1.0, 2.0), source((model(1.0, 2.0, 3.0), 1)))


def test_fedprox_asks_trainers_for_the_proximal_term() -> None:
    strategy = make_strategy("fedprox", {"proximal_mu": 0.1})
    assert strategy.configure_round(3) == RoundConfig(update_kind="delta", proximal_mu=0.1)
    assert make_strategy("fedavg", {}).configure_round(3).proximal_mu == 0.0


def test_fedsgd_asks_for_gradients_and_descends() -> None:
    strategy = make_strategy("fedsgd", {"server_lr": 0.1})
    assert strategy.configure_round(1).update_kind == "gradient"
    # mean gradient (0.25 * 1 + 0.75 * 3) / 4 = 0.625... with weights 1 and 3:
    # (0.25 + 2.25) / 4 = 0.625; x = 1 - 0.1 * 0.625 = 0.9375
    new = strategy.aggregate(model(1.0), source((model(0.25), 1), (model(0.75), 3)))
    np.testing.assert_allclose(new["w"], [0.9375])


def test_fedavgm_accumulates_momentum_over_rounds() -> None:
    # mean delta 1 each round, momentum 0.9, lr 1; pseudo-gradient -1
    # round 1: v = -1, x = 1 + 1 = 2; round 2: v = 0.9 * -1 - 1 = -1.9, x = 2 + 1.9 = 3.9
    strategy = make_strategy("fedavgm", {"momentum": 0.9})
    x1 = strategy.aggregate(model(1.0), source((model(1.0), 5)))
    x2 = strategy.aggregate(x1, source((model(1.0), 5)))
    np.testing.assert_allclose([x1["w"][0], x2["w"][0]], [2.0, 3.9])


def test_fedadam_strategy_matches_the_hand_computed_step() -> None:
    # as test_adam_step_two_steps_by_hand, the delta 0.5 arriving as the mean of 0 and 1
    strategy = make_strategy("fedadam", {"server_lr": 1.0, "tau": 0.5})
    new = strategy.aggregate(model(1.0), source((model(0.0), 1), (model(1.0), 1)))
    np.testing.assert_allclose(new["w"], [1.05])


def test_median_strategy_reads_a_spill_store(tmp_path: Path) -> None:
    strategy = make_strategy("median", {})
    assert strategy.needs_all_updates
    global_weights = {"w": np.zeros(2, dtype=np.float32)}
    with SpillStore(global_weights, tmp_path) as store:
        for delta in ([1.0, -1.0], [2.0, 1e9], [3.0, 0.0]):
            store.add({"w": np.array(delta, dtype=np.float32)}, 10)
        new = strategy.aggregate(global_weights, store)
    # per coordinate: median(1, 2, 3) = 2, median(-1, 1e9, 0) = 0
    np.testing.assert_allclose(new["w"], [2.0, 0.0])


def test_trimmed_mean_strategy_resists_an_outlier(tmp_path: Path) -> None:
    global_weights = model(10.0)
    updates = source(*[(model(v), 1) for v in (1.0, 2.0, 3.0, -1e8, 1e8)])
    new = make_strategy("trimmed_mean", {"beta": 0.2}).aggregate(global_weights, updates)
    np.testing.assert_allclose(new["w"], [12.0])  # 10 + mean(1, 2, 3)


def test_krum_strategy_keeps_the_honest_update(tmp_path: Path) -> None:
    # deltas 0, 1, 2, 10 (f = 0): Krum keeps 1 (see test_krum_scores...)
    global_weights = model(5.0)
    with SpillStore(global_weights, tmp_path) as store:
        for v in (0.0, 1.0, 2.0, 10.0):
            store.add(model(v), 1)
        new = make_strategy("krum", {"f": 0}).aggregate(global_weights, store)
        multi = make_strategy("multikrum", {"f": 0, "m": 2}).aggregate(global_weights, store)
    np.testing.assert_allclose(new["w"], [6.0])
    np.testing.assert_allclose(multi["w"], [5.5])


def test_krum_strategy_refuses_too_few_updates_before_reading() -> None:
    updates = source(*[(model(float(v)), 1) for v in range(5)])
    with pytest.raises(
        InvalidArgumentError, match=r"Krum needs more than 2f\+2 = 6 updates, got 5"
    ):
        make_strategy("krum", {"f": 2}).aggregate(model(0.0), updates)


def test_robust_strategy_refuses_folded_updates() -> None:
    acc = MeanAccumulator(model(0.0))
    acc.add(model(1.0), 1)
    with pytest.raises(FailedPreconditionError, match="must be given a SpillStore"):
        make_strategy("median", {}).aggregate(model(0.0), acc)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("fedavgm", {}),
        ("fedadam", {}),
        ("fedyogi", {}),
        ("fedadagrad", {}),
        ("fedsgd", {"optimizer": "adam"}),
        ("fedsgd", {"optimizer": "sgd", "momentum": 0.5}),
    ],
)
def test_state_round_trip_gives_the_same_next_aggregate(
    name: str, params: dict[str, float | str]
) -> None:
    rng = np.random.default_rng(3)
    global_weights: Weights = {
        "k": rng.standard_normal((3, 2)).astype(np.float32),
        "b": rng.standard_normal(2).astype(np.float32),
    }

    def round_updates() -> InMemoryUpdates:
        return source(
            *[
                (
                    {
                        n: rng.standard_normal(a.shape).astype(np.float32)
                        for n, a in global_weights.items()
                    },
                    4,
                )
                for _ in range(3)
            ]
        )

    first = make_strategy(name, params)
    after_one = first.aggregate(global_weights, round_updates())
    restored = make_strategy(name, params)
    restored.load_state(first.state())
    assert int(first.state()["step"]) == 1
    second_round = round_updates()
    expected = first.aggregate(after_one, second_round)
    got = restored.aggregate(after_one, second_round)
    fresh = make_strategy(name, params).aggregate(after_one, second_round)
    for n in global_weights:
        np.testing.assert_array_equal(got[n], expected[n])
    assert not all(np.array_equal(fresh[n], expected[n]) for n in global_weights)


def test_load_state_refuses_an_unknown_buffer() -> None:
    with pytest.raises(InvalidArgumentError, match="optimizer state key 'velocity/w' is not"):
        make_strategy("fedadam", {}).load_state({"velocity/w": np.zeros(1)})


def test_loaded_state_of_another_model_is_refused_at_aggregate() -> None:
    strategy = make_strategy("fedavgm", {})
    strategy.load_state({"step": np.array(1), "velocity/w": np.zeros(3)})
    with pytest.raises(
        InvalidArgumentError, match=r"optimizer state velocity/w has shape \(3,\), the model"
    ):
        strategy.aggregate(model(1.0, 2.0), source((model(1.0, 1.0), 1)))


def test_stateless_strategy_refuses_state() -> None:
    with pytest.raises(InvalidArgumentError, match="strategy 'fedavg' keeps no state"):
        make_strategy("fedavg", {}).load_state({"m/w": np.zeros(1)})


# --------------------------------------------------------------------- factory


def test_factory_builds_every_named_strategy() -> None:
    assert set(STRATEGY_NAMES) == {
        "fedsgd", "fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
        "fedprox", "median", "trimmed_mean", "krum", "multikrum",
    }  # fmt: skip
    for name in STRATEGY_NAMES:
        assert make_strategy(name, {}).name == name


def test_factory_refuses_an_unknown_strategy() -> None:
    with pytest.raises(ConfigError, match="unknown strategy 'fedavgg'; known: fedsgd, fedavg"):
        make_strategy("fedavgg", {})


def test_factory_refuses_an_out_of_range_parameter() -> None:
    with pytest.raises(
        ConfigError, match=r"^strategy 'fedadam' parameter 'beta1' must be in \[0, 1\), got 1.5$"
    ):
        make_strategy("fedadam", {"beta1": 1.5})


def test_factory_refuses_an_unknown_parameter() -> None:
    with pytest.raises(
        ConfigError,
        match="strategy 'fedavg' has no parameter 'momentum'; its parameters are server_lr",
    ):
        make_strategy("fedavg", {"momentum": 0.9})


def test_factory_refuses_a_string_for_a_number() -> None:
    with pytest.raises(
        ConfigError, match="strategy 'krum' parameter 'f' must be a number, got '1'"
    ):
        make_strategy("krum", {"f": "1"})


def test_factory_refuses_a_fractional_integer_parameter() -> None:
    with pytest.raises(ConfigError, match=r"parameter 'f' must be an integer, got 1\.5"):
        make_strategy("krum", {"f": 1.5})


def test_factory_refuses_an_unknown_server_optimizer() -> None:
    with pytest.raises(
        ConfigError, match="parameter 'optimizer' must be 'sgd' or 'adam', got 'rmsprop'"
    ):
        make_strategy("fedsgd", {"optimizer": "rmsprop"})


def test_resolve_params_fills_defaults() -> None:
    assert resolve_params("fedadam", {"server_lr": 1}) == {
        "server_lr": 1.0,
        "beta1": 0.9,
        "beta2": 0.99,
        "tau": 1e-3,
    }
