"""The round engine: the aggregator's federation logic, with no gRPC in it.

`RoundEngine` holds the global model and drives the plan, using its parts:

* `registry`  — trainer sessions (bound to the caller's identity), parties, liveness;
* `admission` — pure checks of an update's header and values; `Refusals` counts refusals;
* `schedule`  — synchronous rounds: sampling, seeds, the round state;
* `apply`     — strategy application and the check of its result;
* `records`   — the typed tasks, round records and status snapshot it hands out;
* `persist`   — sealed checkpoints, written outside the engine lock.

Synchronous federation:

    waiting_for_trainers -> training (round r) -> [evaluating] -> training (r+1) ... -> done

Asynchronous federation (plan `federation.mode = "async"`, see schedule.py):

    waiting_for_trainers -> training (versions; evaluations run beside) -> evaluating -> done

Every live trainer always has a TRAIN task on the current model; each accepted
update is journaled (sealed) and folded into the buffer, scaled by its staleness
weight; a full buffer becomes the next model version. `rounds` counts versions.

A round starts once `min_trainers` parties are live; `fraction` of them (at least
`min_updates`) is sampled from the plan seed. Each sampled trainer gets one TRAIN
task and may upload exactly one update for it. The round closes when every sampled
trainer answered or was lost (liveness), or at the deadline with at least
`min_updates`; otherwise the attempt fails with its reason (deadline, trainers_lost,
aggregation_failed, aggregate_refused) and is retried, re-sampling live trainers,
up to `max_round_retries` times, after which the federation fails clearly.

All public methods are thread-safe: gRPC handlers call them from many threads.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.engine import admission
from hfl_aggregator.engine.admission import Refusals, Ticket, UpdateMeta
from hfl_aggregator.engine.apply import AggregationFailedError, apply_strategy
from hfl_aggregator.engine.journal import JournalEntry, UpdateJournal
from hfl_aggregator.engine.persist import CheckpointWriter
from hfl_aggregator.engine.records import (
    FailureReason,
    Phase,
    PrivacyView,
    RoundRecord,
    RoundState,
    Snapshot,
    Task,
    TaskKind,
    TrainerState,
    TrainerView,
    TrainParams,
)
from hfl_aggregator.engine.registry import TrainerRecord, TrainerRegistry
from hfl_aggregator.engine.schedule import (
    AsyncBuffer,
    AsyncEval,
    AsyncTask,
    SyncRound,
    derive_seed,
    sample,
    staleness_weight,
)
from hfl_aggregator.heap import trim_heap
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
_Pending = tuple[int, Checkpoint] | None


@dataclass(frozen=True)
class Accepted:
    """What the engine did with an accepted update."""

    round: int
    base_model_version: int
    # The model version the update is now part of; 0 while it waits in a round/buffer.
    applied_version: int = 0
    staleness: int = 0
    # Asynchronous mode: written to the sealed buffer journal (survives a restart).
    journaled: bool = False


class _Once:
    """Calls `fn` (when given) the first time it is called, never again."""

    def __init__(self, fn: Callable[[], None] | None) -> None:
        self._fn = fn

    def __call__(self) -> None:
        fn, self._fn = self._fn, None
        if fn is not None:
            fn()


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
        journal: UpdateJournal | None = None,
        aggregate_in_background: bool = False,
    ) -> None:
        self.plan = plan
        # A relay's aggregation waits for the root's round (hfl_aggregator.relay): it then
        # runs on its own thread, so the last trainer's upload is answered at once.
        self._aggregate_in_background = aggregate_in_background
        self.strategy = strategy
        self.metrics = metrics
        self._clock = clock
        self._new_collector = collector_factory or RoundCollector.for_strategy
        self._cond = threading.Condition()
        self._registry = TrainerRegistry(plan.liveness_seconds, plan.max_trainers_per_party)
        self._refusals = Refusals(metrics)
        self._writer = CheckpointWriter(checkpoints, metrics, clock)
        self._ckpt_seq = 0
        self._weights: Weights = dict(initial_weights)
        self._version = 0
        # The newest model version whose checkpoint write is over (sealed, or failed and
        # logged): a synchronous round trains on a version only once it is, so a crash
        # never resumes a version older than one a trainer was served
        # (hfl_trainer.freshness refuses that as a rollback).
        self._settled_version = 0
        self._completed = 0
        self._history: list[RoundRecord] = []
        self._phase = Phase.WAITING
        self._round: SyncRound | None = None
        self._failure = ""
        # Why the federation ended before its last round (the privacy budget).
        self._stop_reason = ""
        # Differential privacy hooks (synchronous mode): sampling, budget, epsilon.
        self._private = strategy if isinstance(strategy, PrivateStrategy) else None
        self._closing = False
        self._spec = {name: (arr.shape, arr.dtype) for name, arr in initial_weights.items()}
        # Asynchronous mode (schedule.py): tasks, buffer, journal, evaluation.
        self._async = plan.mode == "async"
        self._journal = journal if self._async else None
        self._atasks: dict[str, AsyncTask] = {}
        self._serials: dict[str, int] = {}
        self._last_accepted: dict[str, str] = {}
        self._nonces: dict[bytes, int] = {}
        self._seq = 0
        self._watermark = 0
        self._buffer: AsyncBuffer | None = None
        self._ready: deque[AsyncBuffer] = deque()
        self._apply_lock = threading.Lock()
        self._eval: AsyncEval | None = None
        # Trainers whose last task was an evaluation (their next one trains).
        self._evaluated_last: set[str] = set()
        self._version_times: deque[float] = deque(maxlen=11)
        self._apply_failures = 0
        ckpt = self._writer.load(plan.sha256_hex)
        if ckpt is not None:
            self._restore(ckpt)
        if self._async and self._completed < plan.rounds:
            self._recover_journal()
        if self._completed >= plan.rounds:
            self._phase = Phase.DONE
        elif self._private is not None and (reason := self._private.stop_reason()):
            # The budget was spent before a restart: it stays spent.
            self._stop_for_budget(reason)
        if self._private is not None:
            metrics.dp_epsilon.set(self._private.ledger.epsilon().epsilon)
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
        self._settled_version = ckpt.model_version
        self._completed = ckpt.completed_rounds
        self._history = [RoundRecord.from_json(h) for h in ckpt.history]
        self.strategy.load_state(ckpt.strategy_state)
        self._watermark = int(ckpt.schedule_state.get("journal_watermark", 0))
        self._seq = int(ckpt.schedule_state.get("next_seq", 0))
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

    def _take_checkpoint(self) -> tuple[int, Checkpoint] | None:
        """A consistent checkpoint of the current state (under the lock); written later."""
        if not self._writer.enabled:
            return None
        self._ckpt_seq += 1
        return self._ckpt_seq, Checkpoint(
            plan_sha256=self.plan.sha256_hex,
            model_version=self._version,
            completed_rounds=self._completed,
            weights=dict(self._weights),
            strategy_state=self.strategy.state(),
            history=[h.to_json() for h in self._history],
            schedule_state=(
                {"journal_watermark": self._watermark, "next_seq": self._seq} if self._async else {}
            ),
        )

    def _write(self, pending: _Pending) -> None:
        """Seal a checkpoint taken under the lock; call with the lock released."""
        if pending is None:
            return
        seq, ckpt = pending
        try:
            if self._writer.write(seq, ckpt) and self._journal is not None:
                # Journal files below the sealed watermark are in the model now.
                self._journal.discard_below(int(ckpt.schedule_state.get("journal_watermark", 0)))
        finally:
            with self._cond:
                if ckpt.model_version > self._settled_version:
                    self._settled_version = ckpt.model_version
                    self._cond.notify_all()

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

    def aggregating_updates(self) -> tuple[UpdateMeta, ...]:
        """The headers of the updates of the synchronous round being aggregated (empty in
        any other phase): a relay forwards their training metrics (hfl_aggregator.relay)."""
        with self._cond:
            r = self._round
            if r is None or self._phase is not Phase.AGGREGATING:
                return ()
            return tuple(r.received.values())

    def model_at(self, version: int) -> tuple[int, int, Weights]:
        """(round, version, weights) of model `version` (0: the current one): the current
        model, or one kept for an evaluation that is still running."""
        with self._cond:
            if version in (0, self._version):
                return self._completed, self._version, self._weights
            ev = self._eval
            if ev is not None and version == ev.version:
                return ev.version, ev.version, ev.weights  # type: ignore[return-value]
            raise NotFoundError(
                f"model version {version} is not available; the current global model is "
                f"version {self._version}",
                "no_such_version",
            )

    # --------------------------------------------------------------- trainers

    def join(
        self,
        trainer_id: str,
        label: str,
        mrenclave: str,
        plan_sha256: str,
        num_examples: int,
        party: str = "",
    ) -> str:
        """Open a session for `trainer_id` (its certificate identity); returns the session id."""
        if plan_sha256 != self.plan.sha256_hex:
            raise FailedPreconditionError(
                f"trainer {label!r} was given plan {plan_sha256[:16]}…, but this federation "
                f"runs plan {self.plan.sha256_hex[:16]}…; both sides must use the same plan file",
                "plan_mismatch",
            )
        with self._cond:
            now = self._clock()
            record = self._registry.join(
                trainer_id, party or trainer_id, label, mrenclave, num_examples, now
            )
            # A rejoining trainer starts afresh: its unfinished asynchronous task is void.
            self._atasks.pop(trainer_id, None)
            self._update_liveness(now)
            self._maybe_start_round(now)
            self._cond.notify_all()
            return record.session_id

    def trainer_of(self, session_id: str, caller: str) -> str:
        """The trainer behind a session, refused unless `caller` opened it; marks it alive."""
        with self._cond:
            return self._registry.touch(session_id, caller, self._clock()).trainer_id

    def keep_alive(self, session_id: str, caller: str, task_id: str) -> bool:
        """A trainer working on `task_id` is alive; returns whether the task is still wanted."""
        with self._cond:
            record = self._registry.touch(session_id, caller, self._clock())
            task = self._task_for(record.trainer_id)
            return task.kind in (TaskKind.TRAIN, TaskKind.EVALUATE) and task.task_id == task_id

    def leave(self, session_id: str, caller: str) -> None:
        with self._cond:
            record = self._registry.touch(session_id, caller, self._clock())
            self._registry.leave(record)
            self._cond.notify_all()

    def _update_liveness(self, now: float) -> None:
        self.metrics.connected_trainers.set(len(self._registry.active(now)))

    # ------------------------------------------------------------------ tasks

    def next_task(
        self,
        session_id: str,
        caller: str,
        wait_seconds: float,
        is_active: Callable[[], bool] = lambda: True,
    ) -> Task:
        """The trainer's next task; waits up to `wait_seconds` while there is none.

        Returns WAIT at once when the engine is closing (the server drains) or the caller
        went away (`is_active` False), so no long-poll holds a shutdown. A waiting
        long-poll keeps the trainer alive.
        """
        end = self._clock() + max(0.0, wait_seconds)
        with self._cond:
            while True:
                record = self._registry.touch(session_id, caller, self._clock())
                task = self._task_for(record.trainer_id)
                if (
                    task.kind in (TaskKind.TRAIN, TaskKind.EVALUATE)
                    and not self._async
                    and self._writer.enabled
                    and task.model_version > self._settled_version
                ):
                    # Its checkpoint is being sealed (after the lock was released): no
                    # trainer may see a version a crash now would take back (the
                    # trainers' rollback check would then refuse the restarted aggregator).
                    task = Task("", TaskKind.WAIT, task.round, self._version, message="sealing")
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

    def _train_params(self, round_number: int, seed: int) -> TrainParams:
        config = self.strategy.configure_round(round_number)
        t = self.plan.training
        return TrainParams(
            update_kind=config.update_kind,
            local_epochs=t.local_epochs,
            batch_size=t.batch_size,
            learning_rate=t.learning_rate,
            proximal_mu=config.proximal_mu,
            encoding=self.plan.update.encoding,
            clip_norm=self.plan.privacy.clip_norm,
            noise_multiplier=self.plan.privacy.noise_multiplier,
            seed=seed,
        )

    @property
    def _heartbeat(self) -> float:
        return self.plan.liveness_seconds / 3

    def _task_for(self, trainer_id: str) -> Task:
        if self._async and self._phase not in (Phase.DONE, Phase.FAILED):
            return self._async_task_for(trainer_id)
        if self._phase is Phase.DONE:
            return Task(
                "done",
                TaskKind.DONE,
                self._completed,
                self._version,
                message=self._stop_reason or "done",
                privacy=self._privacy_view(),
            )
        if self._phase is Phase.FAILED:
            return Task(
                "failed",
                TaskKind.DONE,
                self._completed,
                self._version,
                message=f"federation failed: {self._failure}",
                failed=True,
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
        if self._phase is Phase.TRAINING and trainer_id in r.waiting_for:
            return Task(
                r.task_id,
                TaskKind.TRAIN,
                r.round,
                r.base_version,
                deadline=r.deadline,
                heartbeat_seconds=self._heartbeat,
                train=self._train_params(
                    r.round, derive_seed(self.plan.seed, "train", r.round, r.attempt)
                ),
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
                heartbeat_seconds=self._heartbeat,
            )
        return Task("", TaskKind.WAIT, r.round, self._version, message=self._phase.value)

    # ----------------------------------------------------------------- rounds

    def _maybe_start_round(self, now: float) -> None:
        if self._phase is not Phase.WAITING:
            return
        parties = self._registry.active_parties(now)
        if len(parties) < self.plan.min_trainers:
            return
        if self._async:
            self._phase = Phase.TRAINING
            if self._buffer is None:
                self._buffer = self._new_buffer(self._seq)
            log.info(
                "asynchronous training started with %d parties (buffer %d)",
                len(parties),
                self.plan.asynchronous.buffer_size,
            )
            return
        attempt = self._round.attempt + 1 if self._round is not None else 1
        number = self._completed + 1
        if self._private is not None:
            # Differential privacy: stop before a round that would overspend the budget;
            # sample from the OS CSPRNG (amplification needs a sample nobody can predict).
            reason = self._private.stop_reason(len(parties))
            if reason:
                self._stop_for_budget(reason)
                return
            selected = self._private.select(parties)
        else:
            selected = sample(
                parties, self.plan.fraction, self.plan.min_updates, self.plan.seed, number, attempt
            )
        self._round = SyncRound(
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
            "round %d (attempt %d) started with %d of %d parties",
            number,
            attempt,
            len(selected),
            len(parties),
        )

    def tick(self) -> None:
        """Enforce liveness and deadlines and start rounds; called periodically."""
        closing: SyncRound | None = None
        pending: _Pending = None
        with self._cond:
            now = self._clock()
            self._update_liveness(now)
            r = self._round
            finish_eval = False
            if self._phase is Phase.WAITING:
                self._maybe_start_round(now)
            elif self._async:
                finish_eval = self._check_async_eval(now)
            elif self._phase is Phase.TRAINING and r is not None:
                closing = self._check_training(r, now)
            elif self._phase is Phase.EVALUATING and r is not None:
                for t in r.eval_selected:
                    rec = self._registry.get(t)
                    if t not in r.evals and (rec is None or not self._registry.is_live(rec, now)):
                        r.lost.add(t)
                if now >= r.eval_deadline or self._every_evaluator_answered(r):
                    pending = self._finish_evaluation()
            self._cond.notify_all()
        self._write(pending)
        if finish_eval:
            self._checkpoint_async()
        if closing is not None and self._aggregate_in_background:
            threading.Thread(
                target=self._aggregate, args=(closing,), name="hfl-aggregate", daemon=True
            ).start()
        elif closing is not None:
            self._aggregate(closing)

    def _check_training(self, r: SyncRound, now: float) -> SyncRound | None:
        """Liveness and deadline of a training round; the round to aggregate, if it closes."""
        if r.folding:
            return None  # an accepted update is still being stored; decide at the next tick
        for t in r.waiting_for:
            rec = self._registry.get(t)
            if rec is None or not self._registry.is_live(rec, now):
                r.lost.add(t)
                log.warning(
                    "round %d: sampled trainer %s not heard from for %.0f s; going on without it",
                    r.round,
                    t,
                    self.plan.liveness_seconds,
                )
        enough = len(r.received) >= self.plan.min_updates
        if not r.waiting_for and enough:
            return self._begin_aggregation()
        if len(r.received) + len(r.waiting_for) < self.plan.min_updates:
            self._fail_attempt(
                FailureReason.TRAINERS_LOST,
                f"{len(r.lost)} sampled trainer(s) ({', '.join(sorted(r.lost))}) were lost; "
                f"{len(r.received)} update(s) in and {len(r.waiting_for)} still possible, "
                f"below the {self.plan.min_updates} needed",
            )
            return None
        if now >= r.deadline:
            if enough:
                log.info(
                    "round %d deadline: closing with %d of %d updates (stragglers dropped)",
                    r.round,
                    len(r.received),
                    len(r.selected),
                )
                return self._begin_aggregation()
            self._fail_attempt(
                FailureReason.DEADLINE,
                f"deadline passed with {len(r.received)} of the "
                f"{self.plan.min_updates} updates needed",
            )
        return None

    def _fail_attempt(self, reason: FailureReason, message: str) -> None:
        r = self._round
        assert r is not None
        if not r.folding:
            r.collector.close()
        self.metrics.rounds_failed.labels(reason=reason.value).inc()
        self._history.append(
            RoundRecord(
                round=r.round,
                attempt=r.attempt,
                state=RoundState.FAILED,
                updates=len(r.received),
                model_version=self._version,
                duration_seconds=self._clock() - r.started,
                failure=reason,
                failure_message=message,
            )
        )
        if r.attempt > self.plan.max_round_retries:
            self._phase = Phase.FAILED
            self._failure = (
                f"round {r.round} failed {r.attempt} times (the plan allows "
                f"{self.plan.max_round_retries} retries); last: {message}"
            )
            self.metrics.federation_done.set(1)
            log.error("federation failed: %s", self._failure)
            return
        log.warning(
            "round %d attempt %d failed (%s): %s; retrying",
            r.round,
            r.attempt,
            reason.value,
            message,
        )
        self._phase = Phase.WAITING
        self._maybe_start_round(self._clock())

    # ---------------------------------------------------------------- updates

    def check_update(self, meta: UpdateMeta, caller: str) -> Ticket:
        """Admission of an update's header, before its payload is read."""
        with self._cond:
            record = self._registry.touch(meta.session_id, caller, self._clock())
            try:
                self._admit(record.trainer_id, meta)
            except HflError as exc:
                self._refusals.count(record, exc)
                raise
            return Ticket(record.trainer_id, meta)

    def _admit(self, trainer_id: str, meta: UpdateMeta) -> int:
        """Admission of an update against the state; returns its staleness (async)."""
        if self._phase in (Phase.DONE, Phase.FAILED):
            raise admission.ended(meta)
        if self._async:
            if self._phase is Phase.EVALUATING:  # the final version is made
                raise admission.ended(meta)
            tau = admission.check_async_header(
                meta,
                trainer_id,
                outstanding=(
                    (t.task_id, t.base_version)
                    if (t := self._atasks.get(trainer_id)) is not None
                    else None
                ),
                last_accepted=self._last_accepted.get(trainer_id),
                nonces=self._nonces,
                version=self._version,
                max_staleness=self.plan.asynchronous.max_staleness,
            )
            admission.check_common(meta, self.plan.update_kind, self.plan.strategy.name)
            return tau
        r = self._round
        admission.check_sync_header(
            meta,
            trainer_id,
            r.view() if r is not None else None,
            training=self._phase is Phase.TRAINING,
            phase=self._phase.value,
            completed=self._completed,
            version=self._version,
        )
        admission.check_common(meta, self.plan.update_kind, self.plan.strategy.name)
        return 0

    def refuse(self, trainer_id: str, exc: Exception) -> None:
        """Count a refusal found while reading the payload (bad stream, bad values)."""
        with self._cond:
            self._refusals.count(self._registry.get(trainer_id), exc)

    def accept_update(
        self,
        ticket: Ticket,
        arrays: Mapping[str, np.ndarray],
        *,
        stored: Callable[[], None] | None = None,
    ) -> Accepted:
        """Admit a fully received, decoded update's values and fold it in.

        `stored` is called exactly once, as soon as the update was folded (or refused)
        and the engine holds no reference to `arrays` any more: before a round that this
        update closes is aggregated. The caller may then reuse the arrays' memory (the
        upload handler's decode buffers), so the decoded updates alive are bounded by
        its decode slots, not by the number of trainers. A clipped update is folded
        scaled, without a clipped copy.
        """
        done = _Once(stored)
        try:
            try:
                scale = admission.value_scale(
                    arrays, self.plan.update.max_norm, self.plan.update.clip
                )
            except HflError as exc:
                self.refuse(ticket.trainer_id, exc)
                raise
            if self._async:
                return self._accept_async(ticket, arrays, scale, done)
            return self._accept_sync(ticket, arrays, scale, done)
        finally:
            done()

    def _accept_sync(
        self, ticket: Ticket, update: Mapping[str, np.ndarray], scale: float, stored: _Once
    ) -> Accepted:
        closing: SyncRound | None = None
        with self._cond:
            record = self._registry.get(ticket.trainer_id)
            assert record is not None
            record.last_seen = self._clock()
            try:
                # The round may have moved on while the payload streamed in.
                self._admit(ticket.trainer_id, ticket.meta)
            except HflError as exc:
                self._refusals.count(record, exc)
                raise
            r = self._round
            assert r is not None
            # Reserve the update's place (no duplicate or replay can pass now), then fold
            # it in outside the engine lock: a spill to disk must not stall other calls.
            r.received[ticket.trainer_id] = ticket.meta
            r.nonces.add(ticket.meta.nonce)
            r.lost.discard(ticket.trainer_id)
            r.folding += 1
        try:
            with r.fold_lock:
                r.collector.add(update, ticket.meta.num_examples, scale)
        except Exception as exc:
            with self._cond:
                r.folding -= 1
                r.received.pop(ticket.trainer_id, None)
                self._refusals.count(record, exc)
                self._close_if_abandoned(r)
                self._cond.notify_all()
            raise
        del update
        stored()  # folded: the caller may reuse its decode buffers now
        with self._cond:
            r.folding -= 1
            if self._round is not r or self._phase is not Phase.TRAINING:
                # The attempt failed while this update was folded in: it does not count.
                self._close_if_abandoned(r)
                raise FailedPreconditionError(
                    f"round {r.round} attempt {r.attempt} ended while this update was being "
                    "stored; ask for a new task",
                    "stale",
                )
            record.updates_accepted += 1
            self.metrics.updates_received.inc()
            log.info(
                "round %d: update %d of %d accepted from %s",
                r.round,
                len(r.received),
                len(r.selected),
                ticket.trainer_id,
            )
            if not r.waiting_for and len(r.received) >= self.plan.min_updates and not r.folding:
                closing = self._begin_aggregation()
            self._cond.notify_all()
            result = Accepted(r.round, r.base_version)
        if closing is not None and self._aggregate_in_background:
            threading.Thread(
                target=self._aggregate, args=(closing,), name="hfl-aggregate", daemon=True
            ).start()
        elif closing is not None and self._aggregate(closing):
            with self._cond:
                return replace(result, applied_version=self._version_of_round(closing.round))
        return result

    def _close_if_abandoned(self, r: SyncRound) -> None:
        """Free the store of a round that ended while updates were folded into it."""
        if (self._round is not r or self._phase is not Phase.TRAINING) and not r.folding:
            r.collector.close()

    def _version_of_round(self, round_number: int) -> int:
        for h in reversed(self._history):
            if h.round == round_number and h.state is RoundState.COMPLETED:
                return h.model_version
        return 0

    # ------------------------------------------------------------ aggregation

    def _begin_aggregation(self) -> SyncRound:
        r = self._round
        assert r is not None
        self._phase = Phase.AGGREGATING
        return r

    def _aggregate(self, r: SyncRound) -> bool:
        """Aggregate outside the lock (it may take seconds), then install the result."""
        try:
            applied = apply_strategy(
                self.strategy,
                self._weights,
                r.collector.source(),
                self.plan.update.max_aggregate_norm,
            )
        except AggregationFailedError as exc:
            log.error("round %d attempt %d: %s", r.round, r.attempt, exc)
            spent: _Pending = None
            with self._cond:
                self._fail_attempt(exc.reason, str(exc))
                if self._private is not None:
                    # A refused noised aggregate stays in the ledger (apply.py): seal it.
                    self.metrics.dp_epsilon.set(self._private.ledger.epsilon().epsilon)
                    spent = self._take_checkpoint()
                self._cond.notify_all()
            self._write(spent)
            return False
        finally:
            r.collector.close()
        self.metrics.aggregation_seconds.observe(applied.seconds)
        with self._cond:
            now = self._clock()
            self._weights = applied.weights
            self._version += 1
            self._completed = r.round
            losses = [(m.num_examples, m.train_loss) for m in r.received.values()]
            finite = [(k, v) for k, v in losses if math.isfinite(v)]
            n = sum(k for k, _ in finite)
            train_loss = sum(k * v for k, v in finite) / n if n else math.nan
            duration = now - r.started
            dp = self._private.round_record() if self._private is not None else {}
            self._history.append(
                RoundRecord(
                    round=r.round,
                    attempt=r.attempt,
                    state=RoundState.COMPLETED,
                    updates=len(r.received),
                    model_version=self._version,
                    train_loss=train_loss,
                    duration_seconds=duration,
                    aggregation_seconds=applied.seconds,
                    dp_epsilon=dp.get("dp_epsilon", math.nan),
                    dp_delta=dp.get("dp_delta", math.nan),
                    dp_clip_norm=dp.get("dp_clip_norm", math.nan),
                    dp_noise_stddev=dp.get("dp_noise_stddev", math.nan),
                    dp_next_clip_norm=dp.get("dp_next_clip_norm", math.nan),
                )
            )
            if self._private is not None:
                self.metrics.dp_epsilon.set(self._private.ledger.epsilon().epsilon)
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
                applied.seconds,
                self._version,
            )
            evaluate = (
                r.round % self.plan.training.evaluate_every == 0 or r.round == self.plan.rounds
            )
            live = [t.trainer_id for t in self._registry.active(now)]
            if evaluate and live:
                r.eval_version = self._version
                r.eval_selected = live
                r.eval_deadline = now + self.plan.round_timeout_seconds
                r.lost = set()
                self._phase = Phase.EVALUATING
            else:
                self._end_round()
            pending = self._take_checkpoint()
            self._cond.notify_all()
        self._write(pending)
        # The round's freed chunk buffers back to the kernel (hfl_aggregator.heap).
        trimmed = trim_heap()
        self.metrics.heap_trims.labels(
            result="unavailable" if trimmed is None else "released" if trimmed else "none"
        ).inc()
        return True

    def adopt(self, version: int, weights: Weights) -> bool:
        """Install a newer model made elsewhere (a relay catching up with its root).

        Synchronous mode only, where model version v is the model after round v. Whatever
        round is running here is abandoned (its updates are refused as stale and its
        trainers get the new model's task); refused (False) while a round is being
        aggregated, or when `version` is not newer. The state is sealed like a round's.
        """
        if set(weights) != set(self._spec):
            raise InvalidArgumentError(
                f"adopted model has tensors {sorted(weights)}, the plan's model has "
                f"{sorted(self._spec)}"
            )
        with self._cond:
            if (
                self._async
                or version <= self._version
                or self._phase in (Phase.AGGREGATING, Phase.FAILED)
            ):
                return False
            r = self._round
            if r is not None and self._phase is Phase.TRAINING and not r.folding:
                r.collector.close()
            self._round = None
            self._weights = dict(weights)
            self._version = version
            self._completed = min(version, self.plan.rounds)
            self.metrics.model_version.set(version)
            log.info("adopted model version %d from upstream", version)
            if self._completed >= self.plan.rounds:
                self._phase = Phase.DONE
                self.metrics.federation_done.set(1)
            else:
                self._phase = Phase.WAITING
                self._maybe_start_round(self._clock())
            pending = self._take_checkpoint()
            self._cond.notify_all()
        self._write(pending)
        return True

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
        caller: str,
        round_number: int,
        model_version: int,
        num_examples: int,
        loss: float,
        accuracy: float,
    ) -> None:
        if num_examples <= 0 or not (math.isfinite(loss) and 0.0 <= accuracy <= 1.0):
            # Refused, but counted as answered: the evaluation does not wait for it.
            if not self._async:
                self._give_up_evaluation(session_id, caller, round_number, model_version)
            raise InvalidArgumentError(
                "evaluation report needs num_examples > 0, a finite loss and an "
                f"accuracy in [0, 1]; got {num_examples}, {loss}, {accuracy}",
                "bad_evaluation",
            )
        if self._async:
            self._report_async_evaluation(
                session_id, caller, model_version, num_examples, loss, accuracy
            )
            return
        pending: _Pending = None
        with self._cond:
            record = self._registry.touch(session_id, caller, self._clock())
            r = self._evaluation_of(round_number, model_version)
            if r is None:
                raise FailedPreconditionError(
                    f"evaluation of round {round_number} (model version {model_version}) is "
                    f"stale: the federation is at round {self._completed + 1} "
                    f"({self._phase.value})",
                    "stale",
                )
            if record.trainer_id in r.evals:
                raise AlreadyExistsError(
                    f"trainer {record.trainer_id} already reported its evaluation of round "
                    f"{round_number}",
                    "duplicate",
                )
            r.evals[record.trainer_id] = (num_examples, loss, accuracy)
            if self._every_evaluator_answered(r):
                pending = self._finish_evaluation()
            self._cond.notify_all()
        self._write(pending)

    def _give_up_evaluation(
        self, session_id: str, caller: str, round_number: int, model_version: int
    ) -> None:
        """A sampled evaluator reported a refused evaluation (a non-finite loss): stop
        waiting for it, as for a lost one, so the round ends without its deadline."""
        pending: _Pending = None
        with self._cond:
            record = self._registry.touch(session_id, caller, self._clock())
            r = self._evaluation_of(round_number, model_version)
            tid = record.trainer_id
            if r is None or tid not in r.eval_selected or tid in r.evals:
                return
            r.lost.add(record.trainer_id)
            if self._every_evaluator_answered(r):
                pending = self._finish_evaluation()
            self._cond.notify_all()
        self._write(pending)

    def _evaluation_of(self, round_number: int, model_version: int) -> SyncRound | None:
        """The round whose evaluation of `model_version` is running now, else None
        (another phase, another round or another version: a stale report)."""
        r = self._round
        if (
            self._phase is not Phase.EVALUATING
            or r is None
            or round_number != r.round
            or model_version != r.eval_version
        ):
            return None
        return r

    @staticmethod
    def _every_evaluator_answered(r: SyncRound) -> bool:
        return all(t in r.evals or t in r.lost for t in r.eval_selected)

    def _finish_evaluation(self) -> _Pending:
        r = self._round
        assert r is not None
        n = sum(k for k, _, _ in r.evals.values())
        if n:
            loss = sum(k * v for k, v, _ in r.evals.values()) / n
            acc = sum(k * a for k, _, a in r.evals.values()) / n
            self._history[-1] = replace(
                self._history[-1], eval_loss=loss, eval_accuracy=acc, eval_examples=n
            )
            self.metrics.round_eval_loss.set(loss)
            self.metrics.round_eval_accuracy.set(acc)
            log.info(
                "round %d evaluation: loss %.4f, accuracy %.4f on %d held-out examples",
                r.round,
                loss,
                acc,
                n,
            )
        pending = self._take_checkpoint()
        self._end_round()
        return pending

    # ----------------------------------------------------------------- status

    def snapshot(self) -> Snapshot:
        """Everything Status shows."""
        if self._async:
            return self._async_snapshot()
        with self._cond:
            now = self._clock()
            r = self._round
            trainers = []
            for t in sorted(self._registry.records(), key=lambda t: t.label):
                trainers.append(self._trainer_view(t, r, now))
            rounds = list(self._history)
            if r is not None and self._phase in (Phase.TRAINING, Phase.AGGREGATING):
                rounds.append(
                    RoundRecord(
                        round=r.round,
                        attempt=r.attempt,
                        state=RoundState.RUNNING,
                        updates=len(r.received),
                        model_version=self._version,
                        duration_seconds=now - r.started,
                    )
                )
            return Snapshot(
                phase=self._phase,
                mode=self.plan.mode,
                buffer_size=0,
                round=r.round if r is not None else self._completed,
                total_rounds=self.plan.rounds,
                model_version=self._version,
                trainers=tuple(trainers),
                rounds=tuple(rounds),
                failure=self._failure,
                stop_reason=self._stop_reason,
                privacy=self._privacy_view(),
            )

    def _privacy_view(self) -> PrivacyView | None:
        if self._private is None:
            return None
        return PrivacyView.from_status(self._private.status(), self._stop_reason)

    def _trainer_view(self, t: TrainerRecord, r: SyncRound | None, now: float) -> TrainerView:
        if t.left:
            state = TrainerState.LEFT
        elif not self._registry.is_live(t, now):
            state = TrainerState.LOST
        elif (
            r is not None
            and t.trainer_id in r.waiting_for
            and self._phase in (Phase.TRAINING, Phase.AGGREGATING)
        ):
            state = TrainerState.ACTIVE
        else:
            state = TrainerState.IDLE
        return TrainerView(
            trainer_id=t.trainer_id,
            party=t.party,
            label=t.label,
            mrenclave=t.mrenclave,
            state=state,
            last_seen=t.last_seen,
            updates_accepted=t.updates_accepted,
            updates_refused=t.updates_refused,
            num_examples=t.num_examples,
        )

    # ------------------------------------------------------- asynchronous mode

    def _new_buffer(self, first_seq: int) -> AsyncBuffer:
        return AsyncBuffer(
            collector=self._new_collector(self.strategy, self._weights),
            started=self._clock(),
            first_seq=first_seq,
        )

    def _fold(
        self,
        buf: AsyncBuffer,
        seq: int,
        trainer_id: str,
        update: Mapping[str, np.ndarray],
        num_examples: int,
        factor: float,
        tau: int,
        train_loss: float,
        scale: float = 1.0,
    ) -> bool:
        """Fold one update (scaled by its staleness weight and its clip `scale`, as it is
        folded: no scaled copy) into `buf`; True when full."""
        buf.collector.add(update, num_examples, factor * scale)
        buf.trainers.append(trainer_id)
        buf.staleness.append(tau)
        buf.losses.append((num_examples, train_loss))
        buf.last_seq = seq
        return buf.count >= self.plan.asynchronous.buffer_size

    def _recover_journal(self) -> None:
        """Fold back the journaled updates of buffers not yet in the sealed model."""
        if self._journal is None:
            return
        self._journal.discard_below(self._watermark)
        entries = list(self._journal.entries(self._watermark))
        if entries:
            self._seq = max(self._seq, entries[-1].seq + 1)
        buf = self._new_buffer(self._watermark)
        for e in entries:
            if self._fold(
                buf,
                e.seq,
                e.trainer_id,
                e.update,
                e.num_examples,
                e.factor,
                e.staleness,
                e.train_loss,
                e.scale,
            ):
                self._ready.append(buf)
                buf = self._new_buffer(e.seq + 1)
        self._buffer = buf
        if entries:
            log.info(
                "recovered %d journaled update(s) not yet in the model (buffer holds %d)",
                len(entries),
                buf.count,
            )
        self._apply_ready()

    def _async_task_for(self, trainer_id: str) -> Task:
        if self._phase is Phase.WAITING:
            return Task(
                "", TaskKind.WAIT, self._version + 1, self._version, message="waiting for trainers"
            )
        ev = self._eval
        # Evaluation goes first, but never twice in a row while training goes on: with
        # evaluations every few versions a fast trainer would otherwise only evaluate.
        if (
            ev is not None
            and trainer_id in ev.waiting_for()
            and not (self._phase is Phase.TRAINING and trainer_id in self._evaluated_last)
        ):
            return Task(
                ev.task_id,
                TaskKind.EVALUATE,
                ev.version,
                ev.version,
                deadline=ev.deadline,
                heartbeat_seconds=self._heartbeat,
            )
        if self._phase is not Phase.TRAINING:
            return Task("", TaskKind.WAIT, self._version, self._version, message="evaluating")
        task = self._atasks.get(trainer_id)
        if (
            task is not None
            and task.base_version < self._version - self.plan.asynchronous.max_staleness
        ):
            task = None  # whatever it trains from that version would be refused as too stale
        if task is None:
            serial = self._serials.get(trainer_id, 0) + 1
            self._serials[trainer_id] = serial
            task = AsyncTask(
                f"{self._version}.{serial}.async",
                self._version,
                derive_seed(self.plan.seed, "async", trainer_id, serial),
            )
            self._atasks[trainer_id] = task
        params = replace(
            self._train_params(self._version + 1, task.seed),
            max_staleness=self.plan.asynchronous.max_staleness,
        )
        return Task(
            task.task_id,
            TaskKind.TRAIN,
            self._version + 1,
            task.base_version,
            heartbeat_seconds=self._heartbeat,
            train=params,
        )

    def _accept_async(
        self, ticket: Ticket, update: Mapping[str, np.ndarray], scale: float, stored: _Once
    ) -> Accepted:
        meta = ticket.meta
        with self._cond:
            record = self._registry.get(ticket.trainer_id)
            assert record is not None
            record.last_seen = self._clock()
            try:
                tau = self._admit(ticket.trainer_id, meta)
            except HflError as exc:
                self._refusals.count(record, exc)
                raise
            buf = self._buffer
            assert buf is not None
            factor = staleness_weight(tau, self.plan.asynchronous)
            seq = self._seq
            self._seq += 1
            full = self._fold(
                buf,
                seq,
                ticket.trainer_id,
                update,
                meta.num_examples,
                factor,
                tau,
                meta.train_loss,
                scale,
            )
            self._last_accepted[ticket.trainer_id] = meta.task_id
            self._atasks.pop(ticket.trainer_id, None)
            self._evaluated_last.discard(ticket.trainer_id)  # it trained: it may evaluate
            self._nonces[meta.nonce] = self._version
            record.updates_accepted += 1
            self.metrics.updates_received.inc()
            self.metrics.staleness.observe(tau)
            log.info(
                "update from %s accepted: staleness %d (weight %.3g), buffer %d of %d",
                ticket.trainer_id,
                tau,
                factor,
                buf.count,
                self.plan.asynchronous.buffer_size,
            )
            if full:
                self._ready.append(buf)
                self._buffer = self._new_buffer(seq + 1)
            result = Accepted(self._version + 1, meta.base_model_version, staleness=tau)
            self._cond.notify_all()
        journaled = False
        if self._journal is not None:
            try:
                self._journal.append(
                    JournalEntry(
                        seq, ticket.trainer_id, meta.num_examples, tau, factor,
                        meta.train_loss, dict(update), scale,
                    )
                )  # fmt: skip
                journaled = True
            except OSError:
                log.exception("journaling update %d failed; it is kept in memory only", seq)
        del update
        stored()  # folded and journaled: the caller may reuse its decode buffers now
        if full:
            self._apply_ready()
        with self._cond:
            if buf.done:
                return replace(result, applied_version=buf.applied_version)
        return replace(result, journaled=journaled)

    def _apply_ready(self) -> None:
        """Apply full buffers in order, one at a time, outside the engine lock."""
        with self._apply_lock:
            while True:
                with self._cond:
                    if not self._ready:
                        return
                    buf = self._ready.popleft()
                    weights = self._weights
                try:
                    applied = apply_strategy(
                        self.strategy,
                        weights,
                        buf.collector.source(),
                        self.plan.update.max_aggregate_norm,
                    )
                except AggregationFailedError as exc:
                    log.error("buffer of %d updates not applied: %s", buf.count, exc)
                    with self._cond:
                        pending = self._async_failed(buf, exc)
                        self._cond.notify_all()
                    self._write(pending)
                    continue
                finally:
                    buf.collector.close()
                self.metrics.aggregation_seconds.observe(applied.seconds)
                with self._cond:
                    pending = self._install_async(buf, applied.weights, applied.seconds)
                    self._cond.notify_all()
                self._write(pending)

    def _install_async(self, buf: AsyncBuffer, weights: Weights, seconds: float) -> _Pending:
        now = self._clock()
        self._weights = weights
        self._version += 1
        self._completed = self._version
        self._watermark = buf.last_seq + 1
        self._apply_failures = 0
        finite = [(k, v) for k, v in buf.losses if math.isfinite(v)]
        n = sum(k for k, _ in finite)
        train_loss = sum(k * v for k, v in finite) / n if n else math.nan
        self._history.append(
            RoundRecord(
                round=self._version,
                attempt=1,
                state=RoundState.COMPLETED,
                updates=buf.count,
                model_version=self._version,
                train_loss=train_loss,
                duration_seconds=now - buf.started,
                aggregation_seconds=seconds,
                staleness=tuple(buf.staleness),
            )
        )
        buf.applied_version = self._version
        buf.done = True
        self.metrics.rounds_completed.inc()
        self.metrics.model_version.set(self._version)
        self.metrics.current_round.set(self._version)
        self.metrics.round_duration.observe(now - buf.started)
        self.metrics.last_round_completed.set(now)
        if math.isfinite(train_loss):
            self.metrics.round_train_loss.set(train_loss)
        self._version_times.append(now)
        if len(self._version_times) >= 2:
            span = self._version_times[-1] - self._version_times[0]
            if span > 0:
                self.metrics.model_versions_per_second.set((len(self._version_times) - 1) / span)
        horizon = self._version - self.plan.asynchronous.max_staleness - 1
        self._nonces = {k: v for k, v in self._nonces.items() if v >= horizon}
        log.info(
            "model version %d from %d updates (staleness %s, %.3fs)",
            self._version,
            buf.count,
            list(buf.staleness),
            seconds,
        )
        final = self._version >= self.plan.rounds
        if final or self._version % self.plan.training.evaluate_every == 0:
            self._start_async_eval(now, final)
        return self._take_checkpoint()

    def _async_failed(self, buf: AsyncBuffer, exc: AggregationFailedError) -> _Pending:
        self._apply_failures += 1
        self._watermark = buf.last_seq + 1
        buf.done = True
        self.metrics.rounds_failed.labels(reason=exc.reason.value).inc()
        self._history.append(
            RoundRecord(
                round=self._version + 1,
                attempt=self._apply_failures,
                state=RoundState.FAILED,
                updates=buf.count,
                model_version=self._version,
                duration_seconds=self._clock() - buf.started,
                failure=exc.reason,
                failure_message=str(exc),
                staleness=tuple(buf.staleness),
            )
        )
        if self._apply_failures > self.plan.max_round_retries:
            self._phase = Phase.FAILED
            self._failure = (
                f"{self._apply_failures} buffers in a row could not be applied (the plan "
                f"allows {self.plan.max_round_retries} retries); last: {exc}"
            )
            self.metrics.federation_done.set(1)
            log.error("federation failed: %s", self._failure)
        return self._take_checkpoint()

    def _start_async_eval(self, now: float, final: bool) -> None:
        if self._eval is not None:
            self._finish_async_eval()
        live = [t.trainer_id for t in self._registry.active(now)]
        if final:
            self._phase = Phase.EVALUATING
        if not live:
            if final:
                self._end_async()
            return
        self._eval = AsyncEval(
            version=self._version,
            weights=dict(self._weights),
            selected=live,
            deadline=now + self.plan.round_timeout_seconds,
            final=final,
        )

    def _end_async(self) -> None:
        self._phase = Phase.DONE
        self.metrics.federation_done.set(1)
        log.info("federation done: model version %d", self._version)

    def _finish_async_eval(self) -> None:
        ev = self._eval
        assert ev is not None
        self._eval = None
        n = sum(k for k, _, _ in ev.evals.values())
        if n:
            loss = sum(k * v for k, v, _ in ev.evals.values()) / n
            acc = sum(k * a for k, _, a in ev.evals.values()) / n
            for i in range(len(self._history) - 1, -1, -1):
                h = self._history[i]
                if h.model_version == ev.version and h.state is RoundState.COMPLETED:
                    self._history[i] = replace(
                        h, eval_loss=loss, eval_accuracy=acc, eval_examples=n
                    )
                    break
            self.metrics.round_eval_loss.set(loss)
            self.metrics.round_eval_accuracy.set(acc)
            log.info(
                "model version %d evaluation: loss %.4f, accuracy %.4f on %d examples",
                ev.version,
                loss,
                acc,
                n,
            )
        if ev.final:
            self._end_async()

    def _check_async_eval(self, now: float) -> bool:
        """Liveness and deadline of a running evaluation; True when it finished."""
        ev = self._eval
        if ev is None:
            return False
        for t in ev.waiting_for():
            rec = self._registry.get(t)
            if rec is None or not self._registry.is_live(rec, now):
                ev.lost.add(t)
        if now >= ev.deadline or not ev.waiting_for():
            self._finish_async_eval()
            return True
        return False

    def _checkpoint_async(self) -> None:
        """Seal a checkpoint after an evaluation (no buffer is being applied meanwhile)."""
        with self._apply_lock:
            with self._cond:
                pending = self._take_checkpoint()
            self._write(pending)

    def _report_async_evaluation(
        self,
        session_id: str,
        caller: str,
        model_version: int,
        num_examples: int,
        loss: float,
        accuracy: float,
    ) -> None:
        finished = False
        with self._cond:
            record = self._registry.touch(session_id, caller, self._clock())
            ev = self._eval
            if ev is None or model_version != ev.version:
                raise FailedPreconditionError(
                    f"evaluation of model version {model_version} is stale: no evaluation of "
                    f"it is running (the model is at version {self._version})",
                    "stale",
                )
            if record.trainer_id in ev.evals:
                raise AlreadyExistsError(
                    f"trainer {record.trainer_id} already reported its evaluation of model "
                    f"version {model_version}",
                    "duplicate",
                )
            ev.evals[record.trainer_id] = (num_examples, loss, accuracy)
            self._evaluated_last.add(record.trainer_id)
            if not ev.waiting_for():
                self._finish_async_eval()
                finished = True
            self._cond.notify_all()
        if finished:
            self._checkpoint_async()

    def _async_snapshot(self) -> Snapshot:
        with self._cond:
            now = self._clock()
            trainers = []
            for t in sorted(self._registry.records(), key=lambda t: t.label):
                view = self._trainer_view(t, None, now)
                if view.state is TrainerState.IDLE and t.trainer_id in self._atasks:
                    view = replace(view, state=TrainerState.ACTIVE)
                trainers.append(view)
            rounds = list(self._history)
            buf = self._buffer
            if buf is not None and self._phase is Phase.TRAINING:
                rounds.append(
                    RoundRecord(
                        round=self._version + 1,
                        attempt=1,
                        state=RoundState.RUNNING,
                        updates=buf.count,
                        model_version=self._version,
                        duration_seconds=now - buf.started,
                        staleness=tuple(buf.staleness),
                    )
                )
            rate = 0.0
            if len(self._version_times) >= 2:
                span = self._version_times[-1] - self._version_times[0]
                rate = (len(self._version_times) - 1) / span if span > 0 else 0.0
            return Snapshot(
                phase=self._phase,
                mode="async",
                buffer_size=self.plan.asynchronous.buffer_size,
                round=self._version,
                total_rounds=self.plan.rounds,
                model_version=self._version,
                trainers=tuple(trainers),
                rounds=tuple(rounds),
                failure=self._failure,
                model_versions_per_second=rate,
            )
