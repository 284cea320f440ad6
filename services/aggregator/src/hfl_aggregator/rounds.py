"""The round engine: the aggregator's federation logic, with no gRPC in it.

One `RoundEngine` owns the global model and drives the federation plan:

    waiting_for_trainers -> training (round r) -> [evaluating] -> training (r+1) ... -> done

* A round starts once `min_trainers` trainers are active; a fraction of them
  (at least `min_updates`) is sampled, deterministically from the plan seed.
* Each sampled trainer gets one TRAIN task and may upload exactly one update
  for it. The update names its round and the model version it was computed
  from; stale, duplicate and replayed (same nonce) updates are refused.
* The round closes as soon as every sampled trainer has answered, or at the
  deadline if at least `min_updates` did; otherwise the attempt fails and is
  retried (re-sampling live trainers) up to `max_round_retries` times, after
  which the federation fails clearly.
* Every update is validated (spec, NaN/Inf, norm bound) before anything
  touches the round state; mean-type strategies fold it into a running sum on
  arrival, so memory does not grow with the number of trainers.
* After aggregation the new global model gets the next version and a sealed
  checkpoint is written; on evaluation rounds every live trainer evaluates the
  new model on its held-out data and the weighted metrics are recorded.

All public methods are thread-safe: gRPC handlers call them from many threads.
"""

from __future__ import annotations

import enum
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.strategies import Strategy
from hfl_aggregator.strategies.central_dp import PrivateStrategy
from hfl_common.config import FederationPlan
from hfl_common.errors import (
    AlreadyExistsError,
    FailedPreconditionError,
    HflError,
    InvalidArgumentError,
    NotFoundError,
)

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]

# A trainer not heard from for this long is shown as "lost" and not sampled.
LIVENESS_SECONDS = 60.0


class Phase(enum.Enum):
    WAITING = "waiting_for_trainers"
    TRAINING = "training"
    AGGREGATING = "aggregating"
    EVALUATING = "evaluating"
    DONE = "done"
    FAILED = "failed"


class TaskKind(enum.Enum):
    TRAIN = "train"
    EVALUATE = "evaluate"
    WAIT = "wait"
    DONE = "done"


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: TaskKind
    round: int
    model_version: int
    deadline: float = 0.0
    seed: int = 0
    message: str = ""


@dataclass
class TrainerRecord:
    trainer_id: str
    label: str
    mrenclave: str
    session_id: str
    num_examples: int
    last_seen: float
    left: bool = False
    updates_accepted: int = 0
    updates_refused: int = 0


@dataclass(frozen=True)
class UpdateMeta:
    """What the header of an uploaded update says about it."""

    session_id: str
    task_id: str
    round: int
    base_model_version: int
    kind: str
    num_examples: int
    nonce: bytes
    train_loss: float = math.nan
    train_accuracy: float = math.nan


@dataclass(frozen=True)
class Ticket:
    """An update header that passed the round checks; its payload may now be read."""

    trainer_id: str
    meta: UpdateMeta


@dataclass
class _Round:
    round: int
    attempt: int
    base_version: int
    selected: list[str]
    started: float
    deadline: float
    collector: RoundCollector
    received: dict[str, UpdateMeta] = field(default_factory=dict)
    nonces: set[bytes] = field(default_factory=set)
    # Evaluation of the model this round produced.
    eval_version: int = -1
    eval_selected: list[str] = field(default_factory=list)
    eval_deadline: float = 0.0
    evals: dict[str, tuple[int, float, float]] = field(default_factory=dict)


class RoundEngine:
    def __init__(
        self,
        plan: FederationPlan,
        strategy: Strategy,
        initial_weights: Weights,
        metrics: AggregatorMetrics,
        checkpoints: CheckpointStore | None = None,
        clock: Callable[[], float] = time.time,
        collector_factory: Callable[[Strategy, Weights], RoundCollector] | None = None,
    ) -> None:
        self.plan = plan
        self.strategy = strategy
        self.metrics = metrics
        self._checkpoints = checkpoints
        self._clock = clock
        self._new_collector = collector_factory or RoundCollector.for_strategy
        self._cond = threading.Condition()
        self._weights: Weights = dict(initial_weights)
        self._version = 0
        self._completed = 0
        self._history: list[dict[str, Any]] = []
        self._trainers: dict[str, TrainerRecord] = {}
        self._sessions: dict[str, str] = {}
        self._phase = Phase.WAITING
        self._round: _Round | None = None
        self._failure = ""
        # Why the federation ended before its last round (the privacy budget).
        self._stop_reason = ""
        # Differential privacy hooks: sampling, budget, per-round epsilon.
        self._private = strategy if isinstance(strategy, PrivateStrategy) else None
        self._closing = False
        self._spec = {name: (arr.shape, arr.dtype) for name, arr in initial_weights.items()}
        if checkpoints is not None:
            ckpt = checkpoints.load(plan.sha256_hex)
            if ckpt is not None:
                self._restore(ckpt)
        if self._completed >= plan.rounds:
            self._phase = Phase.DONE
        elif self._private is not None and (reason := self._private.stop_reason()):
            # The budget was spent before a restart: it stays spent.
            self._stop_for_budget(reason)
        if self._private is not None:
            metrics.dp_epsilon.set(self._private.status()["epsilon"])
        metrics.total_rounds.set(plan.rounds)
        metrics.model_version.set(self._version)
        metrics.federation_done.set(1 if self._phase is Phase.DONE else 0)

    # ------------------------------------------------------------------ state

    def _restore(self, ckpt: Checkpoint) -> None:
        if set(ckpt.weights) != set(self._spec):
            raise FailedPreconditionError(
                "the sealed checkpoint's model does not match the plan's model spec"
            )
        self._weights = dict(ckpt.weights)
        self._version = ckpt.model_version
        self._completed = ckpt.completed_rounds
        self._history = list(ckpt.history)
        self.strategy.load_state(ckpt.strategy_state)
        log.info(
            "resumed from sealed checkpoint: %d of %d rounds complete, model version %d",
            self._completed,
            self.plan.rounds,
            self._version,
        )

    def _stop_for_budget(self, reason: str) -> None:
        self._phase = Phase.DONE
        self._stop_reason = reason
        self._round = None
        self.metrics.federation_done.set(1)
        log.warning("federation stopped after round %d: %s", self._completed, reason)

    def _checkpoint(self) -> None:
        if self._checkpoints is None:
            return
        try:
            self._checkpoints.save(
                Checkpoint(
                    plan_sha256=self.plan.sha256_hex,
                    model_version=self._version,
                    completed_rounds=self._completed,
                    weights=self._weights,
                    strategy_state=self.strategy.state(),
                    history=self._history,
                )
            )
        except OSError:
            self.metrics.checkpoint_writes.labels(result="error").inc()
            log.exception("writing the sealed checkpoint failed")
            return
        self.metrics.checkpoint_writes.labels(result="ok").inc()
        self.metrics.last_checkpoint.set(self._clock())

    @property
    def phase(self) -> Phase:
        with self._cond:
            return self._phase

    @property
    def done(self) -> bool:
        with self._cond:
            return self._phase in (Phase.DONE, Phase.FAILED)

    def wait_done(self, timeout: float | None = None) -> bool:
        with self._cond:
            return self._cond.wait_for(
                lambda: self._phase in (Phase.DONE, Phase.FAILED), timeout=timeout
            )

    def model(self) -> tuple[int, int, Weights]:
        """(round, model version, weights) of the current global model."""
        with self._cond:
            return self._completed, self._version, self._weights

    # --------------------------------------------------------------- trainers

    def join(
        self, trainer_id: str, label: str, mrenclave: str, plan_sha256: str, num_examples: int
    ) -> str:
        if plan_sha256 != self.plan.sha256_hex:
            raise FailedPreconditionError(
                f"trainer {label!r} was given plan {plan_sha256[:16]}…, but this federation "
                f"runs plan {self.plan.sha256_hex[:16]}…; both sides must use the same plan file"
            )
        with self._cond:
            now = self._clock()
            record = self._trainers.get(trainer_id)
            session = secrets.token_hex(16)
            if record is not None:
                self._sessions.pop(record.session_id, None)
                record.session_id = session
                record.label = label
                record.num_examples = num_examples
                record.last_seen = now
                record.left = False
                log.info("trainer %s (%s) rejoined", trainer_id, label)
            else:
                self._trainers[trainer_id] = TrainerRecord(
                    trainer_id, label, mrenclave, session, num_examples, now
                )
                log.info("trainer %s (%s) joined", trainer_id, label)
            self._sessions[session] = trainer_id
            self._update_liveness(now)
            self._maybe_start_round(now)
            self._cond.notify_all()
            return session

    def trainer_of(self, session_id: str) -> str:
        with self._cond:
            return self._touch(session_id).trainer_id

    def _touch(self, session_id: str) -> TrainerRecord:
        trainer_id = self._sessions.get(session_id)
        if trainer_id is None:
            raise NotFoundError("unknown session: the aggregator may have restarted; join again")
        record = self._trainers[trainer_id]
        record.last_seen = self._clock()
        return record

    def leave(self, session_id: str) -> None:
        with self._cond:
            record = self._touch(session_id)
            record.left = True
            self._sessions.pop(session_id, None)
            log.info("trainer %s (%s) left", record.trainer_id, record.label)
            self._cond.notify_all()

    def _active(self, now: float) -> list[str]:
        return sorted(
            t.trainer_id
            for t in self._trainers.values()
            if not t.left and now - t.last_seen <= LIVENESS_SECONDS
        )

    def _update_liveness(self, now: float) -> None:
        self.metrics.connected_trainers.set(len(self._active(now)))

    # ------------------------------------------------------------------ tasks

    def next_task(
        self,
        session_id: str,
        wait_seconds: float,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Task:
        """The trainer's next task; waits up to `wait_seconds` while there is none.

        Returns WAIT at once when the engine is closing (the server drains) or the caller
        went away (`is_active` False), so no long-poll holds a shutdown.
        """
        end = self._clock() + max(0.0, wait_seconds)
        with self._cond:
            while True:
                record = self._touch(session_id)
                task = self._task_for(record.trainer_id)
                remaining = end - self._clock()
                if (
                    task.kind is not TaskKind.WAIT
                    or remaining <= 0
                    or self._closing
                    or not is_active()
                ):
                    return task
                self._cond.wait(timeout=min(remaining, 1.0))

    def close(self) -> None:
        """Stop holding long-polls (called as the server begins to drain)."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()

    def _task_for(self, trainer_id: str) -> Task:
        if self._phase is Phase.DONE:
            return Task(
                "done",
                TaskKind.DONE,
                self._completed,
                self._version,
                message=self._stop_reason or "done",
            )
        if self._phase is Phase.FAILED:
            return Task(
                "failed",
                TaskKind.DONE,
                self._completed,
                self._version,
                message=f"federation failed: {self._failure}",
            )
        r = self._round
        if r is None:
            return Task(
                "",
                TaskKind.WAIT,
                self._completed + 1,
                self._version,
                message="waiting for trainers",
            )
        if (
            self._phase is Phase.TRAINING
            and trainer_id in r.selected
            and trainer_id not in r.received
        ):
            return Task(
                f"{r.round}.{r.attempt}.train",
                TaskKind.TRAIN,
                r.round,
                r.base_version,
                deadline=r.deadline,
                seed=self.plan.seed * 1_000_003 + r.round * 101 + r.attempt,
            )
        if (
            self._phase is Phase.EVALUATING
            and trainer_id in r.eval_selected
            and trainer_id not in r.evals
        ):
            return Task(
                f"{r.round}.{r.attempt}.evaluate",
                TaskKind.EVALUATE,
                r.round,
                r.eval_version,
                deadline=r.eval_deadline,
            )
        return Task("", TaskKind.WAIT, r.round, self._version, message=self._phase.value)

    # ----------------------------------------------------------------- rounds

    def _maybe_start_round(self, now: float) -> None:
        if self._phase is not Phase.WAITING:
            return
        active = self._active(now)
        if len(active) < self.plan.min_trainers:
            return
        attempt = self._round.attempt + 1 if self._round is not None else 1
        number = self._completed + 1
        if self._private is not None:
            reason = self._private.stop_reason(len(active))
            if reason:
                self._stop_for_budget(reason)
                return
            selected = self._private.select(active)
        else:
            count = max(self.plan.min_updates, math.ceil(self.plan.fraction * len(active)))
            rng = random.Random(f"{self.plan.seed}:{number}:{attempt}")
            selected = sorted(rng.sample(active, min(count, len(active))))
        self._round = _Round(
            round=number,
            attempt=attempt,
            base_version=self._version,
            selected=selected,
            started=now,
            deadline=now + self.plan.round_timeout_seconds,
            collector=self._new_collector(self.strategy, self._weights),
        )
        self._phase = Phase.TRAINING
        self.metrics.rounds_started.inc()
        self.metrics.current_round.set(number)
        log.info(
            "round %d (attempt %d) started with %d of %d trainers",
            number,
            attempt,
            len(selected),
            len(active),
        )

    def tick(self) -> None:
        """Enforce deadlines and start rounds; called periodically by the service."""
        closing: _Round | None = None
        with self._cond:
            now = self._clock()
            self._update_liveness(now)
            r = self._round
            if self._phase is Phase.WAITING:
                self._maybe_start_round(now)
            elif self._phase is Phase.TRAINING and r is not None and now >= r.deadline:
                if len(r.received) >= self.plan.min_updates:
                    log.info(
                        "round %d deadline: closing with %d of %d updates (stragglers dropped)",
                        r.round,
                        len(r.received),
                        len(r.selected),
                    )
                    closing = self._begin_aggregation()
                else:
                    self._fail_attempt(
                        f"deadline passed with {len(r.received)} of the "
                        f"{self.plan.min_updates} updates needed"
                    )
            elif self._phase is Phase.EVALUATING and r is not None and now >= r.eval_deadline:
                self._finish_evaluation()
            self._cond.notify_all()
        if closing is not None:
            self._aggregate(closing)

    def _fail_attempt(self, reason: str) -> None:
        r = self._round
        assert r is not None
        r.collector.close()
        self.metrics.rounds_failed.labels(reason="deadline").inc()
        self._history.append(
            {
                "round": r.round,
                "attempt": r.attempt,
                "state": "failed",
                "updates": len(r.received),
                "model_version": self._version,
                "failure_reason": reason,
                "duration_seconds": self._clock() - r.started,
            }
        )
        if r.attempt > self.plan.max_round_retries:
            self._phase = Phase.FAILED
            self._failure = (
                f"round {r.round} failed {r.attempt} times (the plan allows "
                f"{self.plan.max_round_retries} retries); last: {reason}"
            )
            self.metrics.federation_done.set(1)
            log.error("federation failed: %s", self._failure)
            return
        log.warning("round %d attempt %d failed: %s; retrying", r.round, r.attempt, reason)
        self._phase = Phase.WAITING
        self._maybe_start_round(self._clock())

    # ---------------------------------------------------------------- updates

    def check_update(self, meta: UpdateMeta) -> Ticket:
        """Round checks on an update's header, before its payload is read."""
        with self._cond:
            record = self._touch(meta.session_id)
            try:
                self._check_header(record.trainer_id, meta)
            except Exception as exc:
                self._refused(record, exc)
                raise
            return Ticket(record.trainer_id, meta)

    def _check_header(self, trainer_id: str, meta: UpdateMeta) -> None:
        r = self._round
        if self._phase in (Phase.DONE, Phase.FAILED):
            raise FailedPreconditionError(
                f"update for round {meta.round} refused: the federation has ended", "ended"
            )
        current = r.round if r is not None else self._completed + 1
        if r is None or self._phase is not Phase.TRAINING or meta.round != r.round:
            raise FailedPreconditionError(
                f"update for round {meta.round} (model version {meta.base_model_version}) "
                f"is stale: the federation is at round {current} "
                f"(model version {self._version}, {self._phase.value})",
                "stale",
            )
        if meta.base_model_version != r.base_version:
            raise FailedPreconditionError(
                f"update for round {meta.round} was computed from model version "
                f"{meta.base_model_version}, but this round trains version {r.base_version}",
                "stale",
            )
        if meta.task_id != f"{r.round}.{r.attempt}.train":
            raise FailedPreconditionError(
                f"update names task {meta.task_id!r}, which is not the current task of round "
                f"{r.round} (attempt {r.attempt})",
                "wrong_task",
            )
        if trainer_id not in r.selected:
            raise FailedPreconditionError(
                f"trainer {trainer_id} was not selected for round {r.round}", "not_selected"
            )
        if meta.nonce in r.nonces or not meta.nonce:
            raise FailedPreconditionError(
                "replayed update: its nonce was already used (or is empty)", "replayed"
            )
        if trainer_id in r.received:
            raise AlreadyExistsError(
                f"duplicate update: trainer {trainer_id} already sent its update for round "
                f"{r.round}",
                "duplicate",
            )
        if meta.kind != self.plan.update_kind:
            raise InvalidArgumentError(
                f"update kind {meta.kind!r} does not match the plan's {self.plan.update_kind!r} "
                f"(strategy {self.plan.strategy.name})",
                "wrong_kind",
            )
        if meta.num_examples <= 0:
            raise InvalidArgumentError("update must report num_examples > 0")

    def refuse(self, trainer_id: str, exc: Exception) -> None:
        """Count a refusal found while reading the payload (bad stream, bad values)."""
        with self._cond:
            record = self._trainers.get(trainer_id)
            if record is not None:
                self._refused(record, exc)

    def _refused(self, record: TrainerRecord, exc: Exception) -> None:
        record.updates_refused += 1
        self.metrics.updates_refused.labels(reason=_reason(exc)).inc()
        log.warning("update from %s refused: %s", record.trainer_id, exc)

    def validate_values(self, arrays: Mapping[str, np.ndarray]) -> Weights:
        """NaN/Inf and norm checks; returns the (possibly clipped) update."""
        total = 0.0
        for name, arr in arrays.items():
            if arr.dtype.kind == "f":
                if not np.isfinite(arr).all():
                    bad = int(np.size(arr) - np.count_nonzero(np.isfinite(arr)))
                    raise InvalidArgumentError(
                        f"tensor {name!r} contains {bad} NaN or infinite values", "nan"
                    )
                total += float(np.dot(arr.ravel().astype(np.float64), arr.ravel()))
        norm = math.sqrt(total)
        bound = self.plan.update.max_norm
        if bound > 0 and norm > bound:
            if not self.plan.update.clip:
                raise InvalidArgumentError(
                    f"update L2 norm {norm:.4g} exceeds the plan's bound {bound:.4g}", "norm"
                )
            scale = bound / norm
            return {
                n: (a * scale).astype(a.dtype) if a.dtype.kind == "f" else a
                for n, a in arrays.items()
            }
        return dict(arrays)

    def accept_update(self, ticket: Ticket, arrays: Mapping[str, np.ndarray]) -> tuple[int, int]:
        """Fold a fully received, decoded update into its round."""
        try:
            update = self.validate_values(arrays)
        except HflError as exc:
            self.refuse(ticket.trainer_id, exc)
            raise
        closing: _Round | None = None
        with self._cond:
            record = self._trainers[ticket.trainer_id]
            try:
                # The round may have moved on while the payload streamed in.
                self._check_header(ticket.trainer_id, ticket.meta)
            except Exception as exc:
                self._refused(record, exc)
                raise
            r = self._round
            assert r is not None
            r.collector.add(update, ticket.meta.num_examples)
            r.received[ticket.trainer_id] = ticket.meta
            r.nonces.add(ticket.meta.nonce)
            record.updates_accepted += 1
            self.metrics.updates_received.inc()
            log.info(
                "round %d: update %d of %d accepted from %s",
                r.round,
                len(r.received),
                len(r.selected),
                ticket.trainer_id,
            )
            if len(r.received) == len(r.selected):
                closing = self._begin_aggregation()
            self._cond.notify_all()
            result = (r.round, r.base_version)
        if closing is not None:
            self._aggregate(closing)
        return result

    # ------------------------------------------------------------ aggregation

    def _begin_aggregation(self) -> _Round:
        r = self._round
        assert r is not None
        self._phase = Phase.AGGREGATING
        return r

    def _aggregate(self, r: _Round) -> None:
        """Aggregate outside the lock (it may take seconds), then install the result."""
        started = time.perf_counter()
        try:
            source = r.collector.source()
            new_weights = self.strategy.aggregate(self._weights, source)
            if self.plan.update_kind == "gradient" and self.plan.model.non_trainable:
                # FedSGD: non-trainable variables (BatchNorm statistics) carry values,
                # not gradients; the new global value is their weighted mean.
                mean = source.mean()
                for name in self.plan.model.non_trainable:
                    new_weights[name] = mean[name].astype(self._weights[name].dtype)
        except Exception as exc:
            log.exception("aggregation of round %d failed", r.round)
            with self._cond:
                self._fail_attempt(f"aggregation failed: {exc}")
                self._cond.notify_all()
            return
        finally:
            r.collector.close()
        elapsed = time.perf_counter() - started
        self.metrics.aggregation_seconds.observe(elapsed)
        with self._cond:
            now = self._clock()
            self._weights = new_weights
            self._version += 1
            self._completed = r.round
            losses = [(m.num_examples, m.train_loss) for m in r.received.values()]
            n = sum(k for k, _ in losses)
            train_loss = sum(k * v for k, v in losses if math.isfinite(v)) / n if n else math.nan
            duration = now - r.started
            self._history.append(
                {
                    "round": r.round,
                    "attempt": r.attempt,
                    "state": "completed",
                    "updates": len(r.received),
                    "model_version": self._version,
                    "train_loss": train_loss,
                    "duration_seconds": duration,
                    "aggregation_seconds": elapsed,
                    **(self._private.round_record() if self._private is not None else {}),
                }
            )
            if self._private is not None:
                self.metrics.dp_epsilon.set(self._private.status()["epsilon"])
            self.metrics.rounds_completed.inc()
            self.metrics.model_version.set(self._version)
            self.metrics.round_duration.observe(duration)
            self.metrics.last_round_completed.set(now)
            if math.isfinite(train_loss):
                self.metrics.round_train_loss.set(train_loss)
            log.info(
                "round %d aggregated (%s, %d updates, %.3fs): model version %d",
                r.round,
                self.strategy.name,
                len(r.received),
                elapsed,
                self._version,
            )
            evaluate = (
                r.round % self.plan.training.evaluate_every == 0 or r.round == self.plan.rounds
            )
            if evaluate and self._active(now):
                r.eval_version = self._version
                r.eval_selected = self._active(now)
                r.eval_deadline = now + self.plan.round_timeout_seconds
                self._phase = Phase.EVALUATING
            else:
                self._end_round()
            self._checkpoint()
            self._cond.notify_all()

    def _end_round(self) -> None:
        if self._completed >= self.plan.rounds:
            self._phase = Phase.DONE
            self.metrics.federation_done.set(1)
            log.info("federation done: %d rounds, model version %d", self._completed, self._version)
        else:
            self._phase = Phase.WAITING
            self._round = None
            self._maybe_start_round(self._clock())

    # ------------------------------------------------------------- evaluation

    def report_evaluation(
        self,
        session_id: str,
        round_number: int,
        model_version: int,
        num_examples: int,
        loss: float,
        accuracy: float,
    ) -> None:
        with self._cond:
            record = self._touch(session_id)
            r = self._round
            if (
                self._phase is not Phase.EVALUATING
                or r is None
                or round_number != r.round
                or model_version != r.eval_version
            ):
                raise FailedPreconditionError(
                    f"evaluation of round {round_number} (model version {model_version}) is "
                    f"stale: the federation is at round {self._completed + 1} "
                    f"({self._phase.value})"
                )
            if record.trainer_id in r.evals:
                raise AlreadyExistsError(
                    f"trainer {record.trainer_id} already reported its evaluation of round "
                    f"{round_number}"
                )
            if num_examples <= 0 or not (math.isfinite(loss) and 0.0 <= accuracy <= 1.0):
                raise InvalidArgumentError(
                    "evaluation report needs num_examples > 0, a finite loss and an "
                    f"accuracy in [0, 1]; got {num_examples}, {loss}, {accuracy}"
                )
            r.evals[record.trainer_id] = (num_examples, loss, accuracy)
            if set(r.eval_selected) <= set(r.evals):
                self._finish_evaluation()
            self._cond.notify_all()

    def _finish_evaluation(self) -> None:
        r = self._round
        assert r is not None
        n = sum(k for k, _, _ in r.evals.values())
        summary = self._history[-1]
        if n:
            loss = sum(k * v for k, v, _ in r.evals.values()) / n
            acc = sum(k * a for k, _, a in r.evals.values()) / n
            summary.update(eval_loss=loss, eval_accuracy=acc, eval_examples=n)
            self.metrics.round_eval_loss.set(loss)
            self.metrics.round_eval_accuracy.set(acc)
            log.info(
                "round %d evaluation: loss %.4f, accuracy %.4f on %d held-out examples",
                r.round,
                loss,
                acc,
                n,
            )
        self._checkpoint()
        self._end_round()

    # ----------------------------------------------------------------- status

    def snapshot(self) -> dict[str, Any]:
        """Everything Status shows, as plain values."""
        with self._cond:
            now = self._clock()
            r = self._round
            trainers = []
            for t in sorted(self._trainers.values(), key=lambda t: t.label):
                if t.left:
                    state = "left"
                elif now - t.last_seen > LIVENESS_SECONDS:
                    state = "lost"
                elif (
                    r is not None
                    and t.trainer_id in r.selected
                    and self._phase in (Phase.TRAINING, Phase.AGGREGATING)
                ):
                    state = "active"
                else:
                    state = "idle"
                trainers.append(
                    {
                        "trainer_id": t.trainer_id,
                        "label": t.label,
                        "mrenclave": t.mrenclave,
                        "state": state,
                        "last_seen_unix_ms": int(t.last_seen * 1000),
                        "updates_accepted": t.updates_accepted,
                        "updates_refused": t.updates_refused,
                        "num_examples": t.num_examples,
                    }
                )
            rounds = list(self._history)
            if r is not None and self._phase in (Phase.TRAINING, Phase.AGGREGATING):
                rounds.append(
                    {
                        "round": r.round,
                        "attempt": r.attempt,
                        "state": "running",
                        "updates": len(r.received),
                        "model_version": self._version,
                        "duration_seconds": now - r.started,
                    }
                )
            return {
                "state": self._phase.value,
                "round": r.round if r is not None else self._completed,
                "total_rounds": self.plan.rounds,
                "model_version": self._version,
                "trainers": trainers,
                "rounds": rounds,
                "failure": self._failure,
                "stop_reason": self._stop_reason,
                "privacy": self._private.status() if self._private is not None else {},
            }


def _reason(exc: Exception) -> str:
    """A bounded metric label for a refusal."""
    return exc.reason if isinstance(exc, HflError) else "internal"
