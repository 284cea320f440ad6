"""Relay mode: an aggregator that serves a group of trainers and is one participant upstream.

`hfl-aggregator --relay-upstream ROOT:PORT` runs the aggregator's own code (same
server, same `RoundEngine`, same refusals, same sealed checkpoints) with two
differences, both here:

* `RelayStrategy` replaces the plan's strategy. When the relay's round closes,
  its `aggregate` hands the weighted mean of the group's updates (the round's
  `MeanAccumulator`) to the `Uplink`, which uploads it to the root as ONE
  update carrying the group's combined example count, then waits for the
  root's next model and returns it: the relay installs exactly the root's model,
  at the root's model version. The root's strategy (FedAvg, FedAvgM, FedAdam,
  ...) runs once, at the root, over the relays' means, which is the flat
  federation's mean (a weighted mean of weighted means).
* `Uplink` is the relay's trainer-side loop against the root: it joins with
  the relay's attested `relay` certificate (the root checks its MRENCLAVE and
  ISV_PROD_ID against the policy), re-verifies the root (role `aggregator`, the
  plan's hash in its report data), watches the root's tasks, adopts a newer
  root model the relay missed (`RoundEngine.adopt`: a relay that died
  mid-round resumes from its sealed checkpoint and catches up), and reports its
  group's evaluation as the relay's.

The engine runs the relay's rounds with the `[relays]` group thresholds
(`relay_engine_plan`) and aggregates on its own thread, so the last trainer's
upload is answered at once while the relay waits for the root.
"""

from __future__ import annotations

import logging
import math
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from hfl_aggregator.accumulate import UpdateSource
from hfl_aggregator.engine.admission import UpdateMeta
from hfl_aggregator.engine.records import Phase, RoundState
from hfl_aggregator.strategies import Strategy
from hfl_aggregator.strategies.strategy import RoundConfig
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.codec import collect_stream, encode_tensors, iter_upload_messages
from hfl_common.config import FederationPlan
from hfl_common.errors import (
    ConfigError,
    FailedPreconditionError,
    HflError,
    ResourceExhaustedError,
    UnavailableError,
    error_reason,
)
from hfl_common.server import PeerIdentity

if TYPE_CHECKING:
    from hfl_aggregator.engine import RoundEngine

log = logging.getLogger(__name__)

Weights = dict[str, np.ndarray]

_POLL_SECONDS = 10
# How long a starting relay tries to reach the root before it serves its group anyway.
START_SYNC_SECONDS = 10.0
_RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)
_ACTIVE = (
    aggregator_pb2.TASK_KIND_TRAIN,
    aggregator_pb2.TASK_KIND_EVALUATE,
    aggregator_pb2.TASK_KIND_DONE,
)


def relay_engine_plan(plan: FederationPlan) -> FederationPlan:
    """The plan a relay's engine runs: the group thresholds of `[relays]`, every live
    trainer of the group in each round. The plan's identity (canonical form, hash) is
    unchanged: trainers, relay and root all check the one agreed plan."""
    relays = plan.relays
    if relays is None:
        raise ConfigError(
            "--relay-upstream needs a plan with a [relays] table (group_min_trainers, "
            "max_group_size, max_examples_per_trainer); this plan has none"
        )
    return replace(
        plan,
        min_trainers=relays.group_min_trainers,
        min_updates=relays.group_min_updates,
        fraction=1.0,
    )


def group_train_metrics(updates: Iterable[UpdateMeta]) -> tuple[float, float]:
    """(loss, accuracy): the example-weighted means of a group's reported training metrics,
    each over the updates that reported a finite value (NaN when none did).

    The root weights a participant's reported loss by its example count, as it does a
    trainer's, so forwarding the group's weighted mean with the group's total gives the
    root the flat federation's weighted mean over all trainers.
    """
    metas = list(updates)

    def mean(values: list[tuple[int, float]]) -> float:
        finite = [(k, v) for k, v in values if math.isfinite(v) and k > 0]
        total = sum(k for k, _ in finite)
        return sum(k * v for k, v in finite) / total if total else math.nan

    return (
        mean([(m.num_examples, m.train_loss) for m in metas]),
        mean([(m.num_examples, m.train_accuracy) for m in metas]),
    )


class RelayStrategy:
    """The strategy of a relay's engine: forward the group's mean, install the root's model.

    Training parameters come from the plan's own strategy (so a relay's trainers train
    exactly as the root's would); its optimizer state lives at the root only.
    """

    name = "relay"
    needs_all_updates = False

    def __init__(self, inner: Strategy, uplink: Uplink) -> None:
        self._inner = inner
        self._uplink = uplink

    def configure_round(self, round: int) -> RoundConfig:
        return self._inner.configure_round(round)

    def aggregate(self, global_weights: Weights, updates: UpdateSource) -> Weights:
        return self._uplink.contribute(updates)

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        return None


def group_guard(engine: RoundEngine, max_group_size: int) -> Callable[[PeerIdentity], None]:
    """A Join check for a relay: at most `max_group_size` distinct trainers in its group
    (the bound the root's example-count check relies on); a trainer may rejoin."""

    def guard(peer: PeerIdentity) -> None:
        known = {t.trainer_id for t in engine.snapshot().trainers}
        if peer.peer_id not in known and len(known) >= max_group_size:
            raise ResourceExhaustedError(
                f"this relay's group is full: the plan's [relays] max_group_size is "
                f"{max_group_size}; join another relay",
                "group_full",
            )

    return guard


class Uplink:
    """The relay's participation in the root's federation (see the module doc)."""

    def __init__(
        self,
        plan: FederationPlan,
        connect: Callable[[], grpc.Channel],
        model_spec: Iterable[tensor_pb2.TensorSpec],
        *,
        label: str,
        give_up_after: float = 300.0,
    ) -> None:
        self._plan = plan
        self._connect = connect
        self._spec = list(model_spec)
        self._label = label
        self._give_up_after = give_up_after
        self._max_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * 8 for s in self._spec) + 4096
        self._engine: RoundEngine | None = None
        self._channel: grpc.Channel | None = None
        self._stub: aggregator_pb2_grpc.AggregatorServiceStub | None = None
        self._session = ""
        self._cond = threading.Condition()
        self._task: aggregator_pb2.Task | None = None
        self._contributing = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.done = threading.Event()
        # Why the uplink stopped before the root's federation was done ("" if it did not).
        self.failure = ""

    # ------------------------------------------------------------ lifecycle

    def bind(self, engine: RoundEngine) -> None:
        self._engine = engine

    def start(self) -> None:
        """Catch up with the root once (so a restarted relay does not start its group on
        a version the root has left), then follow it on a thread."""
        try:
            self._join(give_up_after=START_SYNC_SECONDS)
            task = self._call(
                "ask the root for its state",
                lambda s: s.GetTask(
                    aggregator_pb2.GetTaskRequest(
                        session_id=self._session, max_wait=Duration(seconds=0)
                    ),
                    timeout=15,
                ),
                START_SYNC_SECONDS,
            ).task
            if task.kind in _ACTIVE and task.model_version > self.engine.model()[1]:
                got, weights = self._download(task.model_version)
                self.engine.adopt(got, weights)
        except (HflError, grpc.RpcError) as exc:
            # Not fatal: the thread below joins (and catches up) when the root answers.
            log.warning("relay could not reach the root at start (%s); will keep trying", exc)
            self._session = ""
        self._thread = threading.Thread(target=self._run, name="hfl-relay-uplink", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._channel is not None:
            self._channel.close()

    @property
    def engine(self) -> RoundEngine:
        assert self._engine is not None, "Uplink.bind(engine) first"
        return self._engine

    # ----------------------------------------------------------- plumbing

    def _call(
        self,
        what: str,
        fn: Callable[[aggregator_pb2_grpc.AggregatorServiceStub], Any],
        give_up_after: float | None = None,
    ) -> Any:
        """Run `fn` against the root, reconnecting (and re-attesting it) while unreachable."""
        limit = self._give_up_after if give_up_after is None else give_up_after
        started = time.monotonic()
        delay = 0.2
        while True:
            if self._stop.is_set():
                raise UnavailableError(f"relay stopping; did not {what}")
            try:
                if self._stub is None:
                    if self._channel is not None:
                        self._channel.close()
                    self._channel = self._connect()
                    self._stub = aggregator_pb2_grpc.AggregatorServiceStub(self._channel)
                return fn(self._stub)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code not in _RETRYABLE:
                    raise
                failure = f"{code.name if code else 'error'}"
            except UnavailableError as err:
                failure = str(err)
            if time.monotonic() - started > limit:
                raise UnavailableError(f"root unreachable while trying to {what}: {failure}")
            log.warning("relay: %s failed (%s); retrying in %.1f s", what, failure, delay)
            self._stub = None
            self._stop.wait(delay)
            delay = min(5.0, delay * 2)

    def _join(self, give_up_after: float | None = None) -> None:
        response = self._call(
            "join the root",
            lambda s: s.Join(
                aggregator_pb2.JoinRequest(
                    label=self._label,
                    plan_sha256=self._plan.sha256_hex,
                    model_spec=self._spec,
                ),
                timeout=30,
            ),
            give_up_after,
        )
        self._session = response.session_id
        log.info("relay joined the root as %s", response.trainer_id)

    def _download(self, version: int) -> tuple[int, Weights]:
        def check_plan(header: aggregator_pb2.ModelHeader) -> None:
            if header.plan_sha256 != self._plan.sha256_hex:
                raise FailedPreconditionError(
                    f"the root serves a model for plan {header.plan_sha256[:16]}…, not this "
                    f"relay's plan {self._plan.sha256_hex[:16]}…"
                )

        def fetch(s: aggregator_pb2_grpc.AggregatorServiceStub) -> tuple[int, Weights]:
            stream = s.DownloadModel(
                aggregator_pb2.DownloadModelRequest(
                    session_id=self._session, model_version=version
                ),
                timeout=600,
            )
            header, arrays = collect_stream(
                stream, max_total_bytes=self._max_bytes, expected=self._spec, on_header=check_plan
            )
            return int(header.model_version), arrays

        result: tuple[int, Weights] = self._call(f"download model version {version}", fetch)
        return result

    # ------------------------------------------------------------- the loop

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self._session:
                    self._join()
                try:
                    response = self._call(
                        "poll the root for a task",
                        lambda s: s.GetTask(
                            aggregator_pb2.GetTaskRequest(
                                session_id=self._session,
                                max_wait=Duration(seconds=_POLL_SECONDS),
                            ),
                            timeout=_POLL_SECONDS + 15,
                        ),
                    )
                except grpc.RpcError as err:
                    reason = error_reason(err)
                    if reason == "UNKNOWN_SESSION":
                        self._session = ""
                        continue
                    if reason == "FEDERATION_FAILED":
                        self.failure = f"the root's federation failed: {err.details()}"
                        log.error("%s", self.failure)
                        return
                    raise
                task = response.task
                with self._cond:
                    self._task = task
                    self._cond.notify_all()
                try:
                    self._follow(task)
                except grpc.RpcError as err:
                    if error_reason(err) == "UNKNOWN_SESSION":
                        self._session = ""
                    else:
                        log.warning("relay: task %s overtaken: %s", task.task_id, err.details())
                if task.kind == aggregator_pb2.TASK_KIND_DONE:
                    log.info("the root's federation is done (model version %d)", task.model_version)
                    return
        except (HflError, grpc.RpcError) as exc:
            if not self._stop.is_set():
                if isinstance(exc, grpc.Call):
                    self.failure = f"{exc.code().name}: {exc.details()}"
                else:
                    self.failure = str(exc)
                log.error("relay uplink stopped: %s", self.failure)
        finally:
            self.done.set()
            with self._cond:
                self._cond.notify_all()

    def _follow(self, task: aggregator_pb2.Task) -> None:
        """Catch up with a newer root model; answer an evaluation for the group."""
        if task.kind in _ACTIVE:
            with self._cond:
                busy = self._contributing
            _, version, _ = self.engine.model()
            if not busy and task.model_version > version:
                got, weights = self._download(task.model_version)
                if self.engine.adopt(got, weights):
                    log.info("relay caught up with the root at model version %d", got)
        if task.kind == aggregator_pb2.TASK_KIND_EVALUATE:
            self._report_evaluation(task)

    def _report_evaluation(self, task: aggregator_pb2.Task) -> None:
        """Report the group's evaluation of the root's model (the relay evaluates the same
        version with its trainers, as the plan says); keeps the root's session alive while
        the group evaluates. A group with no evaluation sends 0 examples, which the root
        refuses but counts as answered, so its evaluation does not wait for us."""
        interval = max(1.0, task.keep_alive_interval.ToTimedelta().total_seconds())
        deadline = time.monotonic() + self._plan.round_timeout_seconds
        record = None
        while not self._stop.is_set() and time.monotonic() < deadline:
            snap = self.engine.snapshot()
            done = [
                r
                for r in snap.rounds
                if r.round == task.round
                and r.state is RoundState.COMPLETED
                and r.model_version == task.model_version
            ]
            if done and snap.phase is not Phase.EVALUATING:
                record = done[-1]
                break
            if snap.model_version > task.model_version:
                break
            self._call(
                "keep the root's session alive",
                lambda s: s.KeepAlive(
                    aggregator_pb2.KeepAliveRequest(session_id=self._session, task_id=task.task_id),
                    timeout=10,
                ),
            )
            self._stop.wait(min(interval, 1.0))
        examples = record.eval_examples if record is not None else 0
        report = aggregator_pb2.EvaluationReport(
            session_id=self._session,
            round=task.round,
            model_version=task.model_version,
            num_examples=examples,
            loss=record.eval_loss if record is not None and examples else math.nan,
            accuracy=record.eval_accuracy if record is not None and examples else 0.0,
        )
        try:
            self._call(
                "report the group's evaluation",
                lambda s: s.ReportEvaluation(
                    aggregator_pb2.ReportEvaluationRequest(report=report), timeout=30
                ),
            )
        except grpc.RpcError as err:
            if examples:
                raise
            log.info("relay had no evaluation of round %d: %s", task.round, err.details())

    # ------------------------------------------------------- contributions

    def _wait_task(
        self, ready: Callable[[aggregator_pb2.Task], bool], timeout: float, what: str
    ) -> aggregator_pb2.Task:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                task = self._task
                if task is not None and ready(task):
                    return task
                if self.done.is_set() or self._stop.is_set():
                    raise UnavailableError(f"the relay's uplink ended while waiting for {what}")
                remaining = end - time.monotonic()
                if remaining <= 0:
                    raise UnavailableError(f"no {what} from the root within {timeout:.0f} s")
                self._cond.wait(min(remaining, 1.0))

    def contribute(self, updates: UpdateSource) -> Weights:
        """Upload the group's weighted mean to the root's round on the relay's model
        version; return the root's next model (the relay's round result). Raises (the
        relay's attempt fails and its engine retries or catches up) when the root is on
        another version, refuses the upload, or does not finish its round in time."""
        mean = updates.mean()
        examples = round(updates.total_weight)
        count = updates.count
        train_loss, train_accuracy = group_train_metrics(self.engine.aggregating_updates())
        _, base, _ = self.engine.model()
        timeout = self._plan.round_timeout_seconds * (self._plan.max_round_retries + 1)
        with self._cond:
            self._contributing = True
        try:
            task = self._wait_task(
                lambda t: (
                    t.model_version > base
                    or (t.kind == aggregator_pb2.TASK_KIND_TRAIN and t.model_version == base)
                ),
                timeout,
                f"training task on model version {base}",
            )
            if task.model_version != base or task.kind != aggregator_pb2.TASK_KIND_TRAIN:
                raise FailedPreconditionError(
                    f"the root moved on to model version {task.model_version} while this "
                    f"relay's group trained version {base}; the relay catches up",
                    "stale",
                )
            header = aggregator_pb2.UpdateHeader(
                session_id=self._session,
                task_id=task.task_id,
                round=task.round,
                base_model_version=base,
                kind=task.train.update_kind,
                num_examples=examples,
                train_loss=train_loss,
                train_accuracy=train_accuracy,
            )

            def send(s: aggregator_pb2_grpc.AggregatorServiceStub) -> Any:
                header.nonce = secrets.token_bytes(16)
                # Raw: a lossy encoding of the partial aggregate would be a second rounding.
                stream = encode_tensors(mean, tensor_pb2.ENCODING_RAW)
                return s.UploadUpdate(iter_upload_messages(header, stream), timeout=600)

            self._call("upload the group's partial aggregate", send)
            log.info(
                "relay: round %d partial aggregate of %d updates (%d examples) sent to the root",
                task.round,
                count,
                examples,
            )
            nxt = self._wait_task(
                lambda t: t.model_version > base and t.kind in _ACTIVE,
                timeout,
                f"the model after version {base}",
            )
            version, weights = self._download(nxt.model_version)
            if version != base + 1:
                raise FailedPreconditionError(
                    f"the root is at model version {version}, not {base + 1}; the relay catches up",
                    "stale",
                )
            return weights
        finally:
            with self._cond:
                self._contributing = False
