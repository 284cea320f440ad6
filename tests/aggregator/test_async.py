"""Asynchronous aggregation in the engine: the async parameter server (buffer 1) and
FedBuff (buffer K), staleness weighting and refusal, no barrier, evaluation every N
versions, and resume from the sealed checkpoint plus the sealed buffer journal."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from hfl_aggregator.checkpoint import CheckpointStore
from hfl_aggregator.engine import Accepted, Phase, RoundEngine, RoundState, TaskKind, UpdateMeta
from hfl_aggregator.engine.journal import UpdateJournal
from hfl_aggregator.engine.schedule import staleness_weight
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.strategies import make_strategy
from hfl_common.config import AsyncPlan, FederationPlan, parse_plan
from hfl_common.errors import AlreadyExistsError, FailedPreconditionError
from hfl_common.sealing import SimulatedSealingKeys

KEYS = SimulatedSealingKeys(b"s" * 32, b"m" * 32)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_plan(
    buffer_size: int = 1,
    rounds: int = 10,
    staleness: str = "polynomial",
    max_staleness: int = 4,
    evaluate_every: int = 1000,
    strategy: str = "fedavg",
) -> FederationPlan:
    return parse_plan(
        f"""
[federation]
rounds = {rounds}
min_trainers = 2
mode = "async"
liveness_seconds = 1000
[model]
name = "small_cnn"
input_shape = [2]
num_classes = 2
initial_weights = "w.npz"
initial_weights_sha256 = "{"00" * 32}"
[training]
evaluate_every = {evaluate_every}
[strategy]
name = "{strategy}"
[async]
buffer_size = {buffer_size}
staleness = "{staleness}"
exponent = 1.0
max_staleness = {max_staleness}
"""
    )


def weights() -> dict[str, np.ndarray]:
    return {"w": np.zeros((2, 2), np.float32), "b": np.zeros(2, np.float32)}


class Fed:
    def __init__(
        self,
        plan: FederationPlan,
        state: Path | None = None,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.clock = Clock()
        self.engine = RoundEngine(
            plan,
            make_strategy(plan.strategy.name, plan.strategy.params),
            weights(),
            AggregatorMetrics.create(self.registry),
            checkpoints=CheckpointStore(state, KEYS) if state else None,
            journal=UpdateJournal(state / "journal", KEYS) if state else None,
            clock=self.clock,
        )
        self.sessions: dict[str, str] = {}

    def join(self, name: str) -> str:
        e = self.engine
        self.sessions[name] = e.join(name, name, "", e.plan.sha256_hex, 10)
        return name

    def task(self, name: str):  # type: ignore[no-untyped-def]
        return self.engine.next_task(self.sessions[name], name, 0)

    def send(
        self,
        name: str,
        value: float,
        *,
        base: int | None = None,
        task_id: str | None = None,
        nonce: bytes | None = None,
        examples: int = 10,
        kind: str = "delta",
    ) -> Accepted:
        # An explicit task id is an upload of work started earlier: no new poll first.
        task = self.task(name) if task_id is None else None
        meta = UpdateMeta(
            session_id=self.sessions[name],
            task_id=task.task_id if task is not None else str(task_id),
            round=task.round if task is not None else 0,
            base_model_version=(
                base if base is not None else task.model_version if task is not None else 0
            ),
            kind=kind,
            num_examples=examples,
            nonce=nonce or np.random.default_rng().bytes(16),
            train_loss=1.0,
        )
        ticket = self.engine.check_update(meta, name)
        update = {"w": np.full((2, 2), value, np.float32), "b": np.full(2, value, np.float32)}
        return self.engine.accept_update(ticket, update)

    def b(self) -> float:
        return float(self.engine.model()[2]["b"][0])


def test_staleness_weights_follow_the_three_rules() -> None:
    poly = AsyncPlan(staleness="polynomial", exponent=0.5)
    assert staleness_weight(0, poly) == 1.0
    assert staleness_weight(3, poly) == pytest.approx(0.5)  # (1 + 3) ** -0.5
    hinge = AsyncPlan(staleness="hinge", hinge_a=10.0, hinge_b=4)
    assert staleness_weight(4, hinge) == 1.0
    assert staleness_weight(6, hinge) == pytest.approx(1 / 21)  # 1 / (10 * 2 + 1)
    assert staleness_weight(50, AsyncPlan(staleness="constant")) == 1.0


def test_buffer_of_one_applies_each_update_as_it_arrives_weighted_by_staleness() -> None:
    fed = Fed(make_plan(buffer_size=1))
    a, b = fed.join("a"), fed.join("b")
    assert fed.task(a).model_version == 0
    assert fed.task(b).model_version == 0
    first = fed.send(a, 1.0)
    assert (first.applied_version, first.staleness) == (1, 0)
    assert fed.b() == 1.0
    # b trained on version 0; the model is at 1: staleness 1, weight (1 + 1) ** -1 = 0.5
    second = fed.send(b, 1.0)
    assert (second.applied_version, second.staleness) == (2, 1)
    assert fed.b() == 1.5


def test_trainers_never_wait_for_each_other() -> None:
    fed = Fed(make_plan(buffer_size=1))
    a, b = fed.join("a"), fed.join("b")
    fed.task(b)  # b is busy with version 0 for a long time
    for version in range(1, 4):
        fed.send(a, 1.0)
        task = fed.task(a)
        assert task.kind is TaskKind.TRAIN
        assert task.model_version == version
    assert fed.engine.phase is Phase.TRAINING


def test_fedbuff_applies_k_updates_together_weighted_by_examples_and_staleness() -> None:
    fed = Fed(make_plan(buffer_size=3, staleness="constant"))
    a, b, c = fed.join("a"), fed.join("b"), fed.join("c")
    assert fed.send(a, 1.0, examples=10).applied_version == 0
    assert fed.send(b, 2.0, examples=10).applied_version == 0
    assert fed.b() == 0.0, "nothing is applied before the buffer is full"
    done = fed.send(c, 6.0, examples=20)
    assert done.applied_version == 1
    # (10 * 1 + 10 * 2 + 20 * 6) / 40 = 3.75
    assert fed.b() == 3.75
    applied, running = fed.engine.snapshot().rounds
    assert (applied.model_version, applied.updates, applied.staleness) == (1, 3, (0, 0, 0))
    assert (running.state, running.updates) == (RoundState.RUNNING, 0)


def test_update_beyond_max_staleness_is_refused_with_its_own_reason() -> None:
    fed = Fed(make_plan(buffer_size=1, max_staleness=2))
    a, b = fed.join("a"), fed.join("b")
    old = fed.task(b)
    for _ in range(3):
        fed.send(a, 1.0)
    with pytest.raises(FailedPreconditionError, match="3 versions stale; the plan allows 2") as err:
        fed.send(b, 1.0, task_id=old.task_id, base=0)
    assert err.value.reason == "too_stale"
    labels = {"reason": "too_stale"}
    assert fed.registry.get_sample_value("hfl_aggregator_updates_refused_total", labels) == 1.0
    assert fed.engine.model()[1] == 3
    # the trainer simply takes a fresh task on the current version
    assert fed.task(b).model_version == 3


def test_the_same_task_twice_is_a_duplicate_and_a_reused_nonce_a_replay() -> None:
    fed = Fed(make_plan(buffer_size=3))
    a, b = fed.join("a"), fed.join("b")
    task = fed.task(a)
    fed.send(a, 1.0, nonce=b"n1")
    with pytest.raises(AlreadyExistsError, match="already sent its update for task"):
        fed.send(a, 1.0, task_id=task.task_id, base=0)
    with pytest.raises(FailedPreconditionError, match="replayed update"):
        fed.send(b, 1.0, nonce=b"n1")


def test_staleness_histogram_and_version_rate_are_exported() -> None:
    fed = Fed(make_plan(buffer_size=1))
    a, b = fed.join("a"), fed.join("b")
    fed.task(b)
    fed.send(a, 1.0)
    fed.clock.now += 2
    fed.send(b, 1.0)
    r = fed.registry
    assert r.get_sample_value("hfl_aggregator_staleness_count") == 2.0
    assert r.get_sample_value("hfl_aggregator_staleness_sum") == 1.0
    assert r.get_sample_value("hfl_aggregator_model_versions_per_second") == pytest.approx(0.5)
    snap = fed.engine.snapshot()
    assert (snap.mode, snap.buffer_size) == ("async", 1)


def test_evaluation_runs_every_n_versions_without_stopping_training() -> None:
    fed = Fed(make_plan(buffer_size=1, evaluate_every=2, rounds=4))
    a, b = fed.join("a"), fed.join("b")
    fed.task(b)
    fed.send(a, 1.0)
    fed.send(a, 1.0)
    task = fed.task(a)
    assert (task.kind, task.model_version) == (TaskKind.EVALUATE, 2)
    e = fed.engine
    e.report_evaluation(fed.sessions[a], a, task.round, 2, 100, 0.5, 0.75)
    # a trains on while b has not evaluated yet
    assert fed.task(a).kind is TaskKind.TRAIN
    eval_b = fed.task(b)
    assert eval_b.kind is TaskKind.EVALUATE
    e.report_evaluation(fed.sessions[b], b, eval_b.round, 2, 300, 1.5, 0.25)
    record = next(r for r in e.snapshot().rounds if r.model_version == 2)
    assert record.eval_accuracy == pytest.approx(0.375)
    assert record.eval_examples == 400


def test_federation_ends_after_the_planned_versions_and_a_final_evaluation() -> None:
    fed = Fed(make_plan(buffer_size=1, rounds=2))
    a, b = fed.join("a"), fed.join("b")
    fed.send(a, 1.0)
    fed.send(b, 1.0)
    assert fed.engine.phase is Phase.EVALUATING
    with pytest.raises(FailedPreconditionError, match="the federation has ended"):
        fed.send(a, 1.0, task_id="late", base=2)
    for name in (a, b):
        t = fed.task(name)
        assert t.kind is TaskKind.EVALUATE
        fed.engine.report_evaluation(fed.sessions[name], name, t.round, 2, 10, 0.1, 0.9)
    assert fed.engine.snapshot().phase is Phase.DONE
    assert fed.task(a).kind is TaskKind.DONE


def test_buffered_updates_survive_a_crash_and_are_applied_exactly_once(tmp_path: Path) -> None:
    state = tmp_path / "state"
    fed = Fed(make_plan(buffer_size=3, staleness="constant"), state)
    a, b, c = fed.join("a"), fed.join("b"), fed.join("c")
    fed.send(a, 1.0)
    fed.send(b, 2.0)
    fed.send(c, 3.0)  # version 1: b = 2.0
    assert fed.b() == 2.0
    journal = state / "journal"
    before_apply = tmp_path / "journal-copy"
    first = fed.send(a, 4.0)
    assert first.journaled
    assert not first.applied_version
    # the journal now holds the one pending update; keep a copy of what was on disk
    shutil.copytree(journal, before_apply)
    fed.send(b, 8.0)
    del fed  # crash: nothing is flushed on the way out

    resumed = Fed(make_plan(buffer_size=3, staleness="constant"), state)
    assert resumed.engine.model()[1] == 1
    for name in ("a", "b", "c"):
        resumed.join(name)
    # both buffered updates (4 and 8) came back: one more fills the buffer
    assert resumed.send("c", 0.0).applied_version == 2
    assert resumed.b() == pytest.approx(2.0 + 4.0)  # (4 + 8 + 0) / 3 = 4
    # A journal file of an applied buffer found again (crash before its deletion)
    # must not be applied a second time.
    for f in before_apply.iterdir():
        shutil.copy(f, journal / f.name)
    again = Fed(make_plan(buffer_size=3, staleness="constant"), state)
    assert again.engine.model()[1] == 2
    assert again.b() == pytest.approx(6.0)
    assert again.engine.snapshot().rounds[-1].model_version == 2


def test_a_trainer_is_not_asked_to_evaluate_twice_in_a_row_while_training_goes_on() -> None:
    fed = Fed(make_plan(buffer_size=1, evaluate_every=1, rounds=10))
    a, b = fed.join("a"), fed.join("b")
    b_task = fed.task(b)  # b is busy training, so each evaluation stays open
    fed.send(a, 1.0)  # version 1, evaluated
    ev = fed.task(a)
    assert (ev.kind, ev.model_version) == (TaskKind.EVALUATE, 1)
    fed.engine.report_evaluation(fed.sessions[a], a, ev.round, 1, 10, 0.5, 0.5)
    fed.send(b, 1.0, task_id=b_task.task_id, base=0)  # version 2: a new evaluation
    task = fed.task(a)
    assert task.kind is TaskKind.TRAIN, "after an evaluation, a trains before evaluating again"
    fed.send(a, 1.0)
    assert fed.task(a).kind is TaskKind.EVALUATE


def test_fedsgd_in_async_mode_steps_on_each_staleness_weighted_gradient() -> None:
    fed = Fed(make_plan(buffer_size=1, strategy="fedsgd"))  # server_lr 0.01, polynomial 1
    a, b = fed.join("a"), fed.join("b")
    fed.task(b)
    params = fed.task(a).train
    assert params is not None
    assert params.update_kind == "gradient"
    fed.send(a, 100.0, kind="gradient")  # w = 0 - 0.01 * 100 = -1
    assert fed.b() == pytest.approx(-1.0)
    fed.send(b, 100.0, kind="gradient")  # staleness 1: gradient weighted 1/2
    assert fed.b() == pytest.approx(-1.5)
