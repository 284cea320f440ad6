"""Central DP in the aggregator: clipping, noise, adaptive clipping, the dp-accounting ledger,
the plan's refusals, and the round engine's budget stop across a restart."""

from __future__ import annotations

import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from dp_accounting import pld, rdp
from prometheus_client import CollectorRegistry
from scipy import optimize, stats

from hfl_aggregator import privacy as dp
from hfl_aggregator.accumulate import InMemoryUpdates
from hfl_aggregator.checkpoint import CheckpointStore
from hfl_aggregator.engine import Phase, RoundEngine, TaskKind, UpdateMeta
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.strategies import make_strategy
from hfl_aggregator.strategies.central_dp import (
    PrivateStrategy,
    privacy_provenance,
    private_strategy,
)
from hfl_common.config import FederationPlan, parse_plan
from hfl_common.errors import ConfigError, InvalidArgumentError
from hfl_common.sealing import SimulatedSealingKeys


def make_plan(
    privacy: str = "",
    *,
    strategy: str = "fedavg",
    rounds: int = 3,
    min_trainers: int = 2,
    min_updates: int = 0,
    fraction: float = 1.0,
    non_trainable: str = "",
    mode: str = "sync",
) -> FederationPlan:
    return parse_plan(
        f"""
[federation]
mode = "{mode}"
rounds = {rounds}
min_trainers = {min_trainers}
min_updates = {min_updates or min_trainers}
fraction = {fraction}
round_timeout_seconds = 30
[model]
name = "small_cnn"
input_shape = [2]
num_classes = 2
initial_weights = "w.npz"
initial_weights_sha256 = "{"00" * 32}"
non_trainable = [{non_trainable}]
[training]
evaluate_every = 1000
[strategy]
name = "{strategy}"
{privacy}
"""
    )


CENTRAL = """
[privacy]
max_epsilon = {max_epsilon}
delta = 1e-5
[privacy.central]
noise_multiplier = {z}
clip_norm = {clip}
"""


def central_plan(
    z: float = 1.0,
    clip: float = 1.0,
    max_epsilon: float = 0.0,
    *,
    strategy: str = "fedavg",
    rounds: int = 3,
    min_trainers: int = 2,
    min_updates: int = 0,
    fraction: float = 1.0,
    non_trainable: str = "",
) -> FederationPlan:
    return make_plan(
        CENTRAL.format(z=z, clip=clip, max_epsilon=max_epsilon),
        strategy=strategy,
        rounds=rounds,
        min_trainers=min_trainers,
        min_updates=min_updates,
        fraction=fraction,
        non_trainable=non_trainable,
    )


# ------------------------------------------------------------------ pure functions


def test_clipping_scales_the_whole_update_by_one_factor() -> None:
    update = {"w": np.array([3.0, 0.0], np.float32), "b": np.array([4.0], np.float32)}

    clipped, norm = dp.clip_update(update, 1.0)

    assert norm == pytest.approx(5.0)
    np.testing.assert_allclose(clipped["w"], [0.6, 0.0])
    np.testing.assert_allclose(clipped["b"], [0.8])
    assert dp.global_norm(clipped) == pytest.approx(1.0)


def test_update_within_the_clip_norm_is_unchanged() -> None:
    update = {"w": np.array([0.3, -0.4], np.float32)}

    clipped, norm = dp.clip_update(update, 1.0)

    assert norm == pytest.approx(0.5)
    np.testing.assert_allclose(clipped["w"], [0.3, -0.4], rtol=1e-7)


def test_clipping_refuses_integer_tensors_and_non_finite_norms() -> None:
    with pytest.raises(InvalidArgumentError, match="tensor 'step' is int64"):
        dp.clip_update({"step": np.array([3])}, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"non-finite L2 norm \(inf\)"):
        dp.clip_update({"w": np.array([np.inf], np.float32)}, 1.0)
    with pytest.raises(InvalidArgumentError, match=r"clip_norm 0\.0 must be positive"):
        dp.clip_update({"w": np.zeros(2, np.float32)}, 0.0)


def test_adaptive_clip_norm_follows_andrew_et_al_geometric_update() -> None:
    # 8 of 10 updates fit under C = 2: b = 0.8 above the target 0.5, so C shrinks by
    # exp(-0.2 * 0.3).
    assert dp.adaptive_clip_norm(2.0, 8.0, 10, 0.5, 0.2) == pytest.approx(2.0 * math.exp(-0.06))
    # none fits: C grows by exp(0.2 * 0.5)
    assert dp.adaptive_clip_norm(2.0, 0.0, 10, 0.5, 0.2) == pytest.approx(2.0 * math.exp(0.1))


def test_effective_noise_multiplier_combines_sum_and_count_noise() -> None:
    # z = 1, sigma_b = 0.5: (1 + (2 * 0.5)^-2)^-1/2 = 1/sqrt(2)
    assert dp.effective_noise_multiplier(1.0, 0.5) == pytest.approx(1 / math.sqrt(2))
    assert dp.effective_noise_multiplier(1.3, 0.0) == 1.3


def test_secure_normal_is_standard_normal() -> None:
    sample = dp.secure_normal(200_001)

    assert sample.shape == (200_001,)
    # 200k draws: the standard error of the mean is 0.0022 and of the std 0.0016, so
    # these bounds are more than 6 standard errors wide.
    assert abs(float(sample.mean())) < 0.015
    assert float(sample.std()) == pytest.approx(1.0, abs=0.01)
    # and the shape is Gaussian: Kolmogorov-Smirnov against N(0, 1)
    assert stats.kstest(sample, "norm").pvalue > 1e-6
    # two draws never coincide
    assert not np.array_equal(dp.secure_normal(8), dp.secure_normal(8))


# ---------------------------------------------------------------------- accountant


def analytic_gaussian_epsilon(sigma: float, delta: float) -> float:
    """Balle & Wang 2018, Theorem 8: the exact epsilon of the Gaussian mechanism with
    sensitivity 1 and noise sigma, solved from delta(eps) = Phi(1/(2s) - eps s) -
    e^eps Phi(-1/(2s) - eps s)."""

    def gap(eps: float) -> float:
        a = stats.norm.cdf(1 / (2 * sigma) - eps * sigma)
        b = math.exp(eps) * stats.norm.cdf(-1 / (2 * sigma) - eps * sigma)
        return float(a - b - delta)

    return float(optimize.brentq(gap, 0.0, 500.0))


@pytest.mark.parametrize(
    ("z", "rounds", "delta"), [(1.0, 30, 1e-5), (2.0, 10, 1e-3), (0.8, 1, 0.05)]
)
def test_full_participation_epsilon_is_the_exact_composed_gaussian(
    z: float, rounds: int, delta: float
) -> None:
    # T rounds of Gaussian(z) are exactly one Gaussian with noise z / sqrt(T).
    exact = analytic_gaussian_epsilon(z / math.sqrt(rounds), delta)

    eps = dp.compute_epsilon(z, [(dp.Sampling(10, 10), rounds)], delta)

    assert eps.pld == pytest.approx(exact, rel=2e-3)
    assert exact <= eps.rdp  # RDP is a valid, looser bound
    assert eps.epsilon == min(eps.rdp, eps.pld)
    assert eps.relation == "add_or_remove_one"


def test_poisson_accounting_meets_abadi_et_al_published_bound() -> None:
    # Abadi et al. 2016, section 3.1: q = 0.01, sigma = 4, T = 10000, delta = 1e-5 give
    # epsilon 1.26 with the moments accountant (9.34 with strong composition). Today's
    # RDP and PLD accountants are tighter, never looser.
    eps = dp.compute_epsilon(4.0, [(dp.Sampling(60_000, 600, poisson=True), 10_000)], 1e-5)

    assert 0.8 < eps.epsilon <= eps.rdp <= 1.26
    assert math.isfinite(eps.pld)


def test_fixed_size_sampling_is_accounted_as_sampling_without_replacement() -> None:
    ledger = dp.PrivacyLedger(noise_multiplier=1.2, delta=1e-4)
    for n, m in [(20, 5), (20, 5), (18, 5), (20, 5)]:
        ledger.record(dp.Sampling(n, m))

    # The same rounds, written out for dp-accounting directly: replace-one, z / 2.
    def wor(n: int) -> dp_accounting.DpEvent:
        return dp_accounting.SampledWithoutReplacementDpEvent(
            n, 5, dp_accounting.GaussianDpEvent(0.6)
        )

    reference = rdp.RdpAccountant(
        neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE
    )
    reference.compose(dp_accounting.ComposedDpEvent([wor(20), wor(20), wor(18), wor(20)]))

    eps = ledger.epsilon()
    assert eps.rounds == 4
    assert eps.relation == "replace_one"
    assert eps.epsilon == pytest.approx(reference.get_epsilon(1e-4), rel=1e-9)
    assert math.isnan(eps.pld)  # dp-accounting's PLD has no sampling without replacement


def test_ledger_state_round_trips_and_gives_the_same_epsilon() -> None:
    ledger = dp.PrivacyLedger(noise_multiplier=1.0, delta=1e-5)
    for _ in range(7):
        ledger.record(dp.Sampling(4, 4))
    again = dp.PrivacyLedger(noise_multiplier=1.0, delta=1e-5)

    again.load_state(ledger.state())

    assert again.rounds == 7
    assert again.epsilon() == ledger.epsilon()
    reference = pld.PLDAccountant(value_discretization_interval=1e-3)
    reference.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.0), 7))
    assert again.epsilon().pld == pytest.approx(reference.get_epsilon(1e-5))


def test_ledger_refuses_a_round_that_would_exceed_the_budget() -> None:
    budget = dp.compute_epsilon(2.0, [(dp.Sampling(5, 5), 3)], 1e-5).epsilon
    ledger = dp.PrivacyLedger(noise_multiplier=2.0, delta=1e-5, max_epsilon=budget * 1.0001)
    for _ in range(3):
        assert ledger.stop_reason(dp.Sampling(5, 5)) == ""
        ledger.record(dp.Sampling(5, 5))

    reason = ledger.stop_reason(dp.Sampling(5, 5))

    assert reason.startswith("privacy budget reached: after 3 rounds epsilon is")
    assert f"above the plan's max_epsilon {budget * 1.0001:g}" in reason


# ------------------------------------------------------------ the strategy wrapper


def test_the_aggregate_carries_noise_of_the_planned_spread() -> None:
    z, clip, parties, size = 1.5, 0.5, 4, 20_000
    plan = central_plan(z=z, clip=clip, min_trainers=parties)
    strategy = PrivateStrategy(make_strategy("fedavg", {}), plan)
    zeros = {"w": np.zeros(size, np.float32)}
    # each update has norm 0.2 * sqrt(size) >> clip: clipped to norm `clip` exactly
    updates = [
        ({"w": np.full(size, 0.2 * (i + 1), np.float32)}, 10.0 * (i + 1)) for i in range(parties)
    ]
    noiseless = np.full(size, clip / math.sqrt(size), np.float64)  # every clipped update, same

    new = strategy.aggregate(zeros, InMemoryUpdates(updates))["w"].astype(np.float64)

    # noise on the sum has std z * C; on the mean (divided by the 4 parties) z * C / 4.
    expected_std = z * clip / parties
    ratio = float(np.mean((new - noiseless) ** 2)) / expected_std**2
    # The mean of 20000 squared N(0, s^2) / s^2 has std sqrt(2/20000) = 0.01: 0.9 .. 1.1
    # is ten standard deviations wide, and a noiseless aggregate gives 0.
    assert 0.9 < ratio < 1.1
    assert abs(float(np.mean(new - noiseless))) < 5 * expected_std / math.sqrt(size)
    record = strategy.round_record()
    assert record["dp_noise_stddev"] == pytest.approx(z * clip)
    assert record["dp_epsilon"] == pytest.approx(
        dp.compute_epsilon(z, [(dp.Sampling(4, 4), 1)], 1e-5).epsilon
    )


def test_central_dp_ignores_example_counts_so_no_party_outweighs_the_clip() -> None:
    # Without noise worth the name, the result is the plain mean of the clipped updates,
    # whatever num_examples each party reported.
    plan = central_plan(z=1e-6, clip=1.0, min_trainers=2)
    strategy = PrivateStrategy(make_strategy("fedavg", {}), plan)
    zeros = {"w": np.zeros(2, np.float32)}
    updates = [
        ({"w": np.array([3.0, 4.0], np.float32)}, 1000.0),
        ({"w": np.array([0.0, 0.5], np.float32)}, 1.0),
    ]

    new = strategy.aggregate(zeros, InMemoryUpdates(updates))

    # clipped: [0.6, 0.8] and [0, 0.5]; equal weights. The noise has std 1e-6 / 2 per
    # coordinate: 1e-5 is 20 of them (1e-6 failed now and then).
    np.testing.assert_allclose(new["w"], [0.3, 0.65], atol=1e-5)


def test_adaptive_clipping_moves_the_clip_norm_and_survives_the_checkpoint_state() -> None:
    plan = make_plan(
        """
[privacy]
delta = 1e-5
[privacy.central]
noise_multiplier = 1.0
clip_norm = 10.0
adaptive_clipping = true
target_quantile = 0.5
clip_learning_rate = 0.5
clipped_count_stddev = 0.5
""",
        strategy="fedadam",
        min_trainers=100,
    )
    strategy = PrivateStrategy(make_strategy("fedadam", {}), plan)
    zeros = {"w": np.zeros(3, np.float32)}
    small = [({"w": np.full(3, 0.1, np.float32)}, 1.0) for _ in range(100)]

    strategy.aggregate(zeros, InMemoryUpdates(small))

    # All 100 updates fit under C = 10 (b = 1 + N(0, 0.5^2) / 100): C shrinks by
    # exp(-0.5 * (b - 0.5)); the count noise moves the factor by 0.25% per standard
    # deviation, so 2% is 8 of them.
    assert strategy.clip_norm == pytest.approx(10.0 * math.exp(-0.25), rel=2e-2)
    # the accounted noise: the sum's z = 1 and the count's 2 * sigma_b = 1 together
    assert strategy.ledger.noise_multiplier == pytest.approx(1 / math.sqrt(2))
    restored = PrivateStrategy(make_strategy("fedadam", {}), plan)
    restored.load_state(strategy.state())
    assert restored.clip_norm == strategy.clip_norm
    assert restored.ledger.rounds == 1
    assert set(strategy.state()) >= {"m/w", "v/w", "step", "central_dp/ledger"}


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedsgd"]
)
def test_central_dp_drives_every_mean_type_strategy(strategy: str) -> None:
    plan = central_plan(z=0.5, clip=1.0, strategy=strategy)
    wrapped = private_strategy(make_strategy(strategy, {}), plan)
    zeros = {"w": np.zeros(4, np.float32)}
    updates = [
        ({"w": np.full(4, 0.1, np.float32)}, 5.0),
        ({"w": np.full(4, -0.2, np.float32)}, 7.0),
    ]

    first = wrapped.aggregate(zeros, InMemoryUpdates(updates))
    second = wrapped.aggregate(first, InMemoryUpdates(updates))

    assert first["w"].dtype == np.float32
    assert not np.array_equal(first["w"], second["w"])
    assert wrapped.state()["central_dp/ledger"].tolist() == [[2, 2, 2]]


def test_without_privacy_in_the_plan_the_strategy_is_not_wrapped() -> None:
    inner = make_strategy("fedavg", {})
    assert private_strategy(inner, make_plan()) is inner
    assert privacy_provenance(inner) == {"mode": "none"}
    wrapped = private_strategy(inner, central_plan(z=1.3, clip=0.7))
    assert isinstance(wrapped, PrivateStrategy)
    provenance = privacy_provenance(wrapped)
    assert provenance["mode"] == "central"
    assert (provenance["epsilon"], provenance["rounds"]) == (0.0, 0)
    assert (provenance["noise_multiplier"], provenance["clip_norm"]) == (1.3, 0.7)
    assert provenance["accountant"].startswith("dp-accounting ")


# ----------------------------------------------------------------- plan refusals


@pytest.mark.parametrize("strategy", ["median", "trimmed_mean", "krum", "multikrum"])
def test_plan_refuses_central_dp_with_a_robust_rule(strategy: str) -> None:
    with pytest.raises(ConfigError) as err:
        central_plan(strategy=strategy, min_trainers=5)
    assert f"cannot be accounted with strategy {strategy!r}" in str(err.value)
    assert "do not aggregate by a sum" in str(err.value)


def test_plan_refuses_fedsgd_central_dp_with_non_trainable_variables() -> None:
    with pytest.raises(ConfigError, match="non-trainable variables \\(bn/moving_mean\\)"):
        central_plan(strategy="fedsgd", non_trainable='"bn/moving_mean"')
    assert central_plan(strategy="fedsgd").privacy.mode == "central"


def test_plan_refuses_central_dp_in_asynchronous_mode_saying_why() -> None:
    with pytest.raises(ConfigError) as err:
        make_plan(CENTRAL.format(z=1.0, clip=1.0, max_epsilon=0.0), mode="async")
    message = str(err.value)
    assert '[privacy.central] noise_multiplier central DP needs federation.mode = "sync"' in (
        message
    )
    assert "not that mechanism, so no epsilon could be stated" in message
    assert make_plan(CENTRAL.format(z=1.0, clip=1.0, max_epsilon=0.0)).privacy.mode == "central"


def test_asynchronous_client_dp_is_not_accounted_by_the_aggregator() -> None:
    client = "[privacy]\nclip_norm = 1.0\nnoise_multiplier = 1.0\n"
    with pytest.raises(ConfigError, match=r'max_epsilon needs federation\.mode = "sync"'):
        make_plan(client + "max_epsilon = 8.0", mode="async")
    plan = make_plan(client, mode="async")
    inner = make_strategy("fedavg", {})
    # Each trainer accounts its own releases; the aggregator keeps no ledger it cannot state.
    assert private_strategy(inner, plan) is inner
    assert isinstance(private_strategy(inner, make_plan(client)), PrivateStrategy)


def test_a_plan_without_dp_keeps_its_canonical_privacy_section() -> None:
    # Plans written before accounting existed keep their hash: delta, population and
    # max_epsilon join the canonical form only when there is differential privacy.
    plan = make_plan("[privacy]\nclip_norm = 2.0\npopulation = 9")
    assert plan.canonical["privacy"] == {"clip_norm": 2.0, "noise_multiplier": 0.0}
    assert set(central_plan().canonical["privacy"]) == {
        "clip_norm",
        "noise_multiplier",
        "delta",
        "population",
        "max_epsilon",
        "central",
    }


def test_plan_refuses_poisson_sampling_and_a_budget_without_noise() -> None:
    with pytest.raises(ConfigError, match=r'\[privacy\.central\] sampling "poisson" cannot be run'):
        make_plan(
            '[privacy.central]\nnoise_multiplier = 1.0\nclip_norm = 1.0\nsampling = "poisson"'
        )
    with pytest.raises(ConfigError, match="max_epsilon needs differential privacy to account"):
        make_plan("[privacy]\nmax_epsilon = 8.0")
    with pytest.raises(ConfigError, match="noise_multiplier must be above 0"):
        make_plan("[privacy.central]\nnoise_multiplier = 0.0\nclip_norm = 1.0")


def test_every_central_dp_setting_changes_the_plan_hash() -> None:
    base = central_plan(z=1.0, clip=1.0)
    assert base.privacy.delta == 1e-5
    others = [
        central_plan(z=1.1, clip=1.0),
        central_plan(z=1.0, clip=0.9),
        central_plan(z=1.0, clip=1.0, max_epsilon=8.0),
        make_plan(CENTRAL.format(z=1.0, clip=1.0, max_epsilon=0.0) + "adaptive_clipping = true"),
    ]
    hashes = {p.sha256_hex for p in others}
    assert base.sha256_hex not in hashes
    assert len(hashes) == len(others)


def test_default_delta_is_one_over_the_population_to_the_1_1() -> None:
    plan = make_plan(
        "[privacy]\npopulation = 20\n[privacy.central]\nnoise_multiplier = 1.0\nclip_norm = 1.0"
    )
    assert plan.privacy.delta == pytest.approx(20**-1.1)
    assert plan.privacy.population == 20


# ------------------------------------------------- round engine: the budget stop


def engine_for(
    plan: FederationPlan, store: CheckpointStore
) -> tuple[RoundEngine, CollectorRegistry]:
    registry = CollectorRegistry()
    engine = RoundEngine(
        plan,
        private_strategy(make_strategy(plan.strategy.name, {}), plan),
        {"w": np.zeros((2, 2), np.float32)},
        AggregatorMetrics.create(registry),
        checkpoints=store,
    )
    return engine, registry


def run_round(engine: RoundEngine, sessions: list[tuple[str, str]], round_number: int) -> None:
    for i, (session, caller) in enumerate(sessions):
        task = engine.next_task(session, caller, 0)
        assert task.kind is TaskKind.TRAIN, task
        meta = UpdateMeta(
            session,
            task.task_id,
            round_number,
            task.model_version,
            "delta",
            10,
            f"{session}{round_number}".encode(),
        )
        engine.accept_update(
            engine.check_update(meta, caller), {"w": np.full((2, 2), 0.1 * (i + 1), np.float32)}
        )


def test_budget_stops_the_federation_before_the_round_that_would_exceed_it_even_after_restart(
    tmp_path: Path,
) -> None:
    # z = 2 at delta 1e-5: 2 rounds fit under the budget, a third would not.
    two = dp.compute_epsilon(2.0, [(dp.Sampling(2, 2), 2)], 1e-5).epsilon
    three = dp.compute_epsilon(2.0, [(dp.Sampling(2, 2), 3)], 1e-5).epsilon
    budget = (two + three) / 2
    plan = central_plan(z=2.0, clip=1.0, max_epsilon=budget, rounds=10)
    store = CheckpointStore(tmp_path, SimulatedSealingKeys(b"k" * 32, b"m" * 32))
    engine, registry = engine_for(plan, store)
    sessions = [(engine.join(n, n, "ab" * 32, plan.sha256_hex, 10), n) for n in ("a", "b")]
    run_round(engine, sessions, 1)
    run_round(engine, sessions, 2)

    assert engine.phase is Phase.DONE
    snap = engine.snapshot()
    assert snap.round == 2
    assert snap.stop_reason.startswith("privacy budget reached: after 2 rounds epsilon is")
    assert snap.privacy is not None
    assert snap.privacy.epsilon == pytest.approx(two)
    assert snap.privacy.stop_reason == snap.stop_reason
    assert [r.dp_epsilon for r in snap.rounds] == pytest.approx(
        [dp.compute_epsilon(2.0, [(dp.Sampling(2, 2), 1)], 1e-5).epsilon, two]
    )
    assert registry.get_sample_value("hfl_aggregator_dp_epsilon") == pytest.approx(two)
    task = engine.next_task(*sessions[0], 0)
    assert task.kind is TaskKind.DONE
    assert "privacy budget reached" in task.message
    # The DONE task carries what the final model spent (it goes into exported provenance).
    assert task.privacy is not None
    assert task.privacy.epsilon == pytest.approx(two)
    assert task.privacy.rounds == 2

    # A restarted aggregator (same sealed state) stays stopped, before anyone joins.
    again, registry2 = engine_for(plan, store)
    assert again.phase is Phase.DONE
    again_snap = again.snapshot()
    assert "privacy budget reached" in again_snap.stop_reason
    assert again_snap.privacy is not None
    assert again_snap.privacy.rounds == 2
    assert registry2.get_sample_value("hfl_aggregator_dp_epsilon") == pytest.approx(two)


def test_a_sampled_round_is_accounted_as_m_of_n_without_replacement(tmp_path: Path) -> None:
    plan = central_plan(z=1.0, clip=1.0, rounds=2, min_trainers=4, min_updates=2, fraction=0.5)
    keys = SimulatedSealingKeys(b"k" * 32, b"m" * 32)
    engine, _ = engine_for(plan, CheckpointStore(tmp_path, keys))
    sessions = {n: engine.join(n, n, "ab" * 32, plan.sha256_hex, 10) for n in "abcd"}
    chosen = [
        (s, n) for n, s in sessions.items() if engine.next_task(s, n, 0).kind is TaskKind.TRAIN
    ]
    assert len(chosen) == 2

    run_round(engine, chosen, 1)

    snap = engine.snapshot()
    assert snap.privacy is not None
    assert snap.privacy.rounds == 1
    assert snap.privacy.relation == "replace_one"
    expected = dp.compute_epsilon(1.0, [(dp.Sampling(4, 2), 1)], 1e-5).epsilon
    assert snap.rounds[0].dp_epsilon == pytest.approx(expected)
    assert snap.privacy.epsilon == pytest.approx(expected)


def test_a_refused_noised_aggregate_still_spends_privacy_and_the_ledger_is_sealed(
    tmp_path: Path,
) -> None:
    # Every aggregate moves the model by more than 1e-9: each attempt is refused after
    # the noised sum was computed, and the refusal is a function of it.
    plan = make_plan(
        CENTRAL.format(z=1.0, clip=1.0, max_epsilon=0.0) + "[update]\nmax_aggregate_norm = 1e-9"
    )
    store = CheckpointStore(tmp_path, SimulatedSealingKeys(b"k" * 32, b"m" * 32))
    engine, registry = engine_for(plan, store)
    sessions = [(engine.join(n, n, "ab" * 32, plan.sha256_hex, 10), n) for n in ("a", "b")]

    run_round(engine, sessions, 1)

    snap = engine.snapshot()
    assert snap.rounds[0].failure_message.startswith("aggregate refused")
    assert snap.model_version == 0  # nothing installed
    one = dp.compute_epsilon(1.0, [(dp.Sampling(2, 2), 1)], 1e-5).epsilon
    assert snap.privacy is not None
    assert snap.privacy.rounds == 1
    assert snap.privacy.epsilon == pytest.approx(one)
    assert registry.get_sample_value("hfl_aggregator_dp_epsilon") == pytest.approx(one)
    again, _ = engine_for(plan, store)
    again_snap = again.snapshot()
    assert again_snap.privacy is not None
    assert again_snap.privacy.rounds == 1
