"""The round engine on its own: rounds, refusals, deadlines, retries, resume."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from hfl_aggregator.accumulate import InMemoryUpdates, UpdateSource
from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.engine import (
    Accepted,
    FailureReason,
    Phase,
    RoundEngine,
    Task,
    TaskKind,
    UpdateMeta,
)
from hfl_aggregator.engine.schedule import derive_seed
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.strategies import RoundConfig, make_strategy
from hfl_common.config import FederationPlan, parse_plan
from hfl_common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
)
from hfl_common.sealing import SimulatedSealingKeys


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_plan(**fed: object) -> FederationPlan:
    values = {"rounds": 2, "min_trainers": 2, "round_timeout_seconds": 30, **fed}
    lines = "\n".join(f"{k} = {v}" for k, v in values.items())
    return parse_plan(
        f"""
[federation]
{lines}
[model]
name = "small_cnn"
input_shape = [2]
num_classes = 2
initial_weights = "w.npz"
initial_weights_sha256 = "{"00" * 32}"
[training]
evaluate_every = 1000
[update]
max_norm = 100.0
"""
    )


def weights() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


def make_engine(
    plan: FederationPlan | None = None,
    store: CheckpointStore | None = None,
    clock: Clock | None = None,
) -> tuple[RoundEngine, Clock, CollectorRegistry]:
    plan = plan or make_plan()
    clock = clock or Clock()
    registry = CollectorRegistry()
    engine = RoundEngine(
        plan,
        make_strategy("fedavg", {}),
        weights(),
        AggregatorMetrics.create(registry),
        checkpoints=store,
        clock=clock,
    )
    return engine, clock, registry


SESSIONS: dict[str, str] = {}


def join(engine: RoundEngine, name: str) -> str:
    session = engine.join(name, name, "ab" * 32, engine.plan.sha256_hex, 10)
    SESSIONS[session] = name
    return session


def task_of(engine: RoundEngine, session: str) -> Task:
    return engine.next_task(session, SESSIONS[session], 0)


def send(
    engine: RoundEngine,
    session: str,
    value: float,
    *,
    nonce: bytes | None = None,
    round_: int = 1,
    version: int = 0,
    examples: int = 10,
) -> Accepted:
    task = task_of(engine, session)
    meta = UpdateMeta(
        session_id=session,
        task_id=task.task_id or f"{round_}.1.train",
        round=round_,
        base_model_version=version,
        kind="delta",
        num_examples=examples,
        nonce=nonce or f"{session}-{round_}-{value}".encode(),
        train_loss=1.0,
    )
    ticket = engine.check_update(meta, SESSIONS[session])
    update = {"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)}
    return engine.accept_update(ticket, update)


def refused(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("hfl_aggregator_updates_refused_total", {"reason": reason})
    return value or 0.0


def test_round_starts_once_enough_trainers_join_and_closes_with_the_weighted_mean() -> None:
    engine, _, registry = make_engine()
    a = join(engine, "a")
    assert task_of(engine, a).kind is TaskKind.WAIT
    b = join(engine, "b")
    task = task_of(engine, a)
    assert task.kind is TaskKind.TRAIN
    assert (task.round, task.model_version) == (1, 0)
    send(engine, a, 1.0, examples=10)
    assert engine.phase is Phase.TRAINING
    send(engine, b, 4.0, examples=30)
    _, version, w = engine.model()
    assert version == 1
    # (10 * 1 + 30 * 4) / 40 = 3.25
    np.testing.assert_array_equal(w["w"], np.full((2, 2), 3.25, np.float32))
    assert registry.get_sample_value("hfl_aggregator_rounds_completed_total") == 1.0
    assert task_of(engine, a).round == 2


def test_stale_round_update_is_rejected_and_the_model_is_unchanged() -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    send(engine, b, 1.0)
    _, version, before = engine.model()
    with pytest.raises(FailedPreconditionError) as err:
        send(engine, a, 9.0, round_=1, version=0)
    assert "update for round 1 (model version 0) is stale" in str(err.value)
    assert "round 2" in str(err.value)
    _, version_after, after = engine.model()
    assert version_after == version
    np.testing.assert_array_equal(after["w"], before["w"])
    assert refused(registry, "stale") == 1.0


def test_duplicate_update_is_rejected() -> None:
    engine, _, registry = make_engine(make_plan(min_trainers=2))
    a, _ = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    with pytest.raises(AlreadyExistsError, match="duplicate update: trainer a already sent"):
        send(engine, a, 2.0)
    assert refused(registry, "duplicate") == 1.0


def test_replayed_nonce_is_rejected_even_from_another_trainer() -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0, nonce=b"same")
    with pytest.raises(FailedPreconditionError, match="replayed update"):
        send(engine, b, 1.0, nonce=b"same")
    assert refused(registry, "replayed") == 1.0


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_update_is_rejected_and_round_state_unchanged(bad: float) -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    with pytest.raises(InvalidArgumentError, match="tensor 'w' contains 4 NaN or infinite"):
        send(engine, a, bad)
    assert refused(registry, "nan") == 1.0
    # The trainer can still send a good update for the same round afterwards.
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    np.testing.assert_array_equal(engine.model()[2]["b"], np.full(2, 2.0, np.float32))


def test_update_over_the_norm_bound_is_rejected() -> None:
    engine, _, registry = make_engine()
    a, _ = join(engine, "a"), join(engine, "b")
    with pytest.raises(
        InvalidArgumentError, match=r"update L2 norm 122\.5 exceeds the plan.s bound 100"
    ):
        send(engine, a, 50.0)
    assert refused(registry, "norm") == 1.0


def test_join_with_another_plan_is_refused() -> None:
    engine, _, _ = make_engine()
    with pytest.raises(FailedPreconditionError, match="both sides must use the same plan file"):
        engine.join("x", "x", "", "ff" * 32, 1)


def test_deadline_closes_round_with_enough_updates_dropping_stragglers() -> None:
    engine, clock, _ = make_engine(make_plan(min_trainers=3, min_updates=2))
    a, b, _ = join(engine, "a"), join(engine, "b"), join(engine, "c")
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    clock.now += 31
    engine.tick()
    _, version, w = engine.model()
    assert version == 1
    np.testing.assert_array_equal(w["b"], np.full(2, 2.0, np.float32))


def test_round_without_enough_updates_fails_retries_and_then_fails_the_federation() -> None:
    engine, clock, registry = make_engine(make_plan(max_round_retries=1, liveness_seconds=1000))
    a, _ = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    clock.now += 31
    engine.tick()
    task = task_of(engine, a)
    assert task.kind is TaskKind.TRAIN
    assert task.task_id == "1.2.train"
    clock.now += 31
    engine.tick()
    assert engine.phase is Phase.FAILED
    done = task_of(engine, a)
    assert done.kind is TaskKind.DONE
    assert "round 1 failed 2 times" in done.message
    assert (
        registry.get_sample_value("hfl_aggregator_rounds_failed_total", {"reason": "deadline"})
        == 2.0
    )
    assert engine.model()[1] == 0


def test_last_round_is_evaluated_then_the_federation_ends() -> None:
    engine, _, registry = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    for r in (1, 2):
        send(engine, a, 1.0, round_=r, version=r - 1)
        send(engine, b, 1.0, round_=r, version=r - 1)
    assert engine.phase is Phase.EVALUATING
    task = task_of(engine, a)
    assert (task.kind, task.round, task.model_version) == (TaskKind.EVALUATE, 2, 2)
    engine.report_evaluation(a, "a", 2, 2, 100, 0.5, 0.9)
    with pytest.raises(AlreadyExistsError, match="already reported its evaluation of round 2"):
        engine.report_evaluation(a, "a", 2, 2, 100, 0.5, 0.9)
    engine.report_evaluation(b, "b", 2, 2, 300, 0.1, 0.5)
    assert engine.done
    last = engine.snapshot().rounds[-1]
    # (100 * 0.9 + 300 * 0.5) / 400 = 0.6; (100 * 0.5 + 300 * 0.1) / 400 = 0.2
    assert last.eval_accuracy == pytest.approx(0.6)
    assert last.eval_loss == pytest.approx(0.2)
    assert registry.get_sample_value("hfl_aggregator_round_eval_accuracy") == pytest.approx(0.6)
    assert task_of(engine, a).kind is TaskKind.DONE
    assert registry.get_sample_value("hfl_aggregator_federation_done") == 1.0


def test_a_non_finite_evaluation_is_refused_and_the_evaluation_does_not_wait_for_it() -> None:
    engine, clock, _ = make_engine()
    a, b = join(engine, "a"), join(engine, "b")
    for r in (1, 2):
        send(engine, a, 1.0, round_=r, version=r - 1)
        send(engine, b, 1.0, round_=r, version=r - 1)
    assert engine.phase is Phase.EVALUATING
    with pytest.raises(InvalidArgumentError, match="a finite loss"):
        engine.report_evaluation(a, "a", 2, 2, 100, math.nan, 0.9)
    assert not engine.done
    engine.report_evaluation(b, "b", 2, 2, 300, 0.1, 0.5)
    # No deadline passed: the refused evaluator was not waited for.
    assert clock.now == 1000.0
    assert engine.done
    last = engine.snapshot().rounds[-1]
    assert last.eval_accuracy == pytest.approx(0.5)
    assert last.eval_examples == 300


def test_restart_resumes_from_the_sealed_checkpoint(tmp_path: Path) -> None:
    keys = SimulatedSealingKeys(b"s" * 32, b"m" * 32)
    engine, _, _ = make_engine(store=CheckpointStore(tmp_path, keys))
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    blob = (tmp_path / "checkpoint.sealed").read_bytes()
    assert np.full(2, 2.0, np.float32).tobytes() not in blob
    resumed, _, _ = make_engine(store=CheckpointStore(tmp_path, keys))
    _, version, w = resumed.model()
    assert version == 1
    np.testing.assert_array_equal(w["b"], np.full(2, 2.0, np.float32))
    a2 = join(resumed, "a")
    join(resumed, "b")
    assert task_of(resumed, a2).round == 2


def test_sampled_trainer_that_vanishes_is_dropped_long_before_the_deadline() -> None:
    plan = make_plan(min_trainers=3, min_updates=2, liveness_seconds=5, round_timeout_seconds=300)
    engine, clock, _ = make_engine(plan)
    a, b = join(engine, "a"), join(engine, "b")
    join(engine, "c")
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    # c stops polling; a and b keep long-polling (each poll shows they are alive)
    for _ in range(3):
        clock.now += 2
        task_of(engine, a), task_of(engine, b)
        engine.tick()
    _, version, w = engine.model()
    assert version == 1, "the round should have closed without the vanished trainer"
    np.testing.assert_array_equal(w["b"], np.full(2, 2.0, np.float32))
    assert clock.now - 1000.0 < 30, "well before the 300 s deadline"
    c_view = next(t for t in engine.snapshot().trainers if t.trainer_id == "c")
    assert c_view.state.value == "lost"


def test_round_fails_as_trainers_lost_when_too_few_sampled_trainers_remain() -> None:
    plan = make_plan(liveness_seconds=5, round_timeout_seconds=300, max_round_retries=0)
    engine, clock, registry = make_engine(plan)
    a, _ = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    clock.now += 6
    task_of(engine, a)
    engine.tick()
    assert engine.phase is Phase.FAILED
    failed = engine.snapshot().rounds[-1]
    assert failed.failure is FailureReason.TRAINERS_LOST
    assert "(b) were lost" in failed.failure_message
    labels = {"reason": "trainers_lost"}
    assert registry.get_sample_value("hfl_aggregator_rounds_failed_total", labels) == 1.0


def test_a_session_used_by_another_identity_is_permission_denied() -> None:
    engine, _, _ = make_engine()
    a, _ = join(engine, "a"), join(engine, "b")
    with pytest.raises(PermissionDeniedError, match="belongs to trainer a, not to the caller b"):
        engine.next_task(a, "b", 0)
    meta = UpdateMeta(a, "1.1.train", 1, 0, "delta", 10, b"n")
    with pytest.raises(PermissionDeniedError) as err:
        engine.check_update(meta, "b")
    assert err.value.reason == "session_not_yours"
    with pytest.raises(PermissionDeniedError):
        engine.leave(a, "b")


def test_a_second_active_trainer_of_one_party_is_refused() -> None:
    engine, _, _ = make_engine()
    engine.join("a1", "a1", "", engine.plan.sha256_hex, 10, party="acme")
    with pytest.raises(ResourceExhaustedError, match="party 'acme' already has 1 active") as err:
        engine.join("a2", "a2", "", engine.plan.sha256_hex, 10, party="acme")
    assert err.value.reason == "party_limit"


def test_min_trainers_counts_parties_not_trainers() -> None:
    engine, _, _ = make_engine(make_plan(max_trainers_per_party=2))
    s1 = engine.join("a1", "a1", "", engine.plan.sha256_hex, 10, party="acme")
    engine.join("a2", "a2", "", engine.plan.sha256_hex, 10, party="acme")
    assert engine.next_task(s1, "a1", 0).kind is TaskKind.WAIT
    engine.join("z", "z", "", engine.plan.sha256_hex, 10, party="zeta")
    tasks = [engine.phase]
    assert tasks == [Phase.TRAINING]
    r = engine.snapshot().trainers
    active = sorted(t.party for t in r if t.state.value == "active")
    assert active == ["acme", "zeta"], "one trainer per party is sampled"


def test_retry_seeds_never_repeat() -> None:
    seeds = {derive_seed(7, "train", 1, attempt) for attempt in range(1, 2000)}
    seeds |= {derive_seed(7, "train", 2, attempt) for attempt in range(1, 2000)}
    assert len(seeds) == 3998


def test_non_finite_aggregate_fails_the_attempt_not_the_federation() -> None:
    class Exploding:
        name = "exploding"
        needs_all_updates = False

        def __init__(self) -> None:
            self.inner = make_strategy("fedavg", {})
            self.calls = 0

        def configure_round(self, round: int) -> RoundConfig:
            return self.inner.configure_round(round)

        def aggregate(self, w: dict[str, np.ndarray], u: UpdateSource) -> dict[str, np.ndarray]:
            self.calls += 1
            new = self.inner.aggregate(w, u)
            if self.calls == 1:
                new["b"] = np.full(2, np.inf, np.float32)
            return new

        def state(self) -> dict[str, np.ndarray]:
            return {}

        def load_state(self, state: Mapping[str, np.ndarray]) -> None:
            pass

    registry = CollectorRegistry()
    engine = RoundEngine(
        make_plan(liveness_seconds=1000),
        Exploding(),
        weights(),
        AggregatorMetrics.create(registry),
        clock=Clock(),
    )
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    send(engine, b, 1.0)
    assert engine.model()[1] == 0, "the refused aggregate must not replace the model"
    failed = engine.snapshot().rounds[0]
    assert failed.failure is FailureReason.AGGREGATE_REFUSED
    assert "aggregate tensor 'b' contains 2 NaN or infinite values" in failed.failure_message
    assert task_of(engine, a).task_id == "1.2.train"
    send(engine, a, 1.0)
    accepted = send(engine, b, 1.0)
    assert accepted.applied_version == 1
    np.testing.assert_array_equal(engine.model()[2]["b"], np.ones(2, np.float32))


def test_aggregate_over_the_plans_bound_is_refused() -> None:
    plan = make_plan(liveness_seconds=1000)
    plan = replace(plan, update=replace(plan.update, max_aggregate_norm=1.0))
    engine, _, registry = make_engine(plan)
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 2.0)
    send(engine, b, 2.0)
    assert engine.model()[1] == 0
    failed = engine.snapshot().rounds[0]
    assert "moves the model by L2 norm 4.899" in failed.failure_message
    labels = {"reason": "aggregate_refused"}
    assert registry.get_sample_value("hfl_aggregator_rounds_failed_total", labels) == 1.0


def test_fedsgd_sets_non_trainable_variables_to_their_weighted_mean() -> None:
    strategy = make_strategy("fedsgd", {"server_lr": 0.5}, non_trainable=("stat",))
    model = {"w": np.ones(2, np.float32), "stat": np.zeros(2, np.float32)}
    updates = InMemoryUpdates(
        [
            ({"w": np.full(2, 2.0, np.float32), "stat": np.full(2, 4.0, np.float32)}, 1.0),
            ({"w": np.full(2, 6.0, np.float32), "stat": np.full(2, 8.0, np.float32)}, 3.0),
        ]
    )
    new = strategy.aggregate(model, updates)
    # w: 1 - 0.5 * (2 * 1 + 6 * 3) / 4 = -1.5; stat: (4 + 24) / 4 = 7 (a value, not a step)
    np.testing.assert_array_equal(new["w"], np.full(2, -1.5, np.float32))
    np.testing.assert_array_equal(new["stat"], np.full(2, 7.0, np.float32))


def test_checkpoint_is_written_after_the_engine_lock_is_released(tmp_path: Path) -> None:
    keys = SimulatedSealingKeys(b"s" * 32, b"m" * 32)
    engine_box: list[RoundEngine] = []
    held: list[bool] = []

    class Probe(CheckpointStore):
        def save(self, ckpt: Checkpoint) -> None:
            lock = engine_box[0]._cond
            free = lock.acquire(blocking=False)
            if free:
                lock.release()
            held.append(not free)
            super().save(ckpt)

    engine, _, _ = make_engine(store=Probe(tmp_path, keys))
    engine_box.append(engine)
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    assert held == [False]


def test_updates_are_stored_after_the_engine_lock_is_released(tmp_path: Path) -> None:
    engine_box: list[RoundEngine] = []
    held: list[bool] = []

    class Probe(RoundCollector):
        def add(self, update: Mapping[str, np.ndarray], weight: float, scale: float = 1.0) -> None:
            lock = engine_box[0]._cond
            free = lock.acquire(blocking=False)
            if free:
                lock.release()
            held.append(not free)
            super().add(update, weight, scale)

    engine = RoundEngine(
        make_plan(),
        make_strategy("median", {}),
        weights(),
        AggregatorMetrics.create(CollectorRegistry()),
        clock=Clock(),
        collector_factory=lambda s, w: Probe(
            RoundCollector.for_strategy(s, w, tmp_path).source()  # type: ignore[arg-type]
        ),
    )
    engine_box.append(engine)
    a, b = join(engine, "a"), join(engine, "b")
    send(engine, a, 1.0)
    send(engine, b, 3.0)
    assert held == [False, False], "a spill to disk must not hold the engine lock"
    np.testing.assert_array_equal(engine.model()[2]["b"], np.full(2, 2.0, np.float32))
