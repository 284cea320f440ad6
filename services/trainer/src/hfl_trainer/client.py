"""The trainer's side of the federation: join, poll for tasks, train or evaluate, upload.

`FederationClient.run()` is the whole loop. It talks to the aggregator only
through channels made by `connect()`, which re-attests the aggregator every
time (its measurement under the policy and the plan hash in its evidence),
so after an aggregator restart (a new enclave key) the client verifies the new
instance before it sends it anything. Calls that fail with UNAVAILABLE are
retried with exponential backoff and full jitter; a lost session (aggregator
restarted) means joining again. Refusals are told apart by their
google.rpc.ErrorInfo reason (`hfl_common.errors.error_reason`), never by
their message. While it trains or evaluates, the client calls KeepAlive as
often as the task asks, so the aggregator knows it is alive.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
import numpy as np
from google.protobuf.duration_pb2 import Duration

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.codec import collect_stream, encode_tensors, iter_upload_messages, specs_of
from hfl_common.config import FederationPlan
from hfl_common.errors import (
    FailedPreconditionError,
    HflError,
    UnavailableError,
    error_reason,
)
from hfl_trainer.freshness import ModelVersionMemory
from hfl_trainer.metrics import TrainerMetrics
from hfl_trainer.privacy import add_gaussian_noise, clip_update, local_epsilon
from hfl_trainer.progress import BatchProgress, ProgressReporter
from hfl_trainer.training import LocalTrainer

log = logging.getLogger(__name__)

T = TypeVar("T")

# CANCELLED: a draining aggregator (SIGTERM, restart) cancels the calls still in flight,
# long polls included; it is back (or replaced) after a restart, so retry like UNAVAILABLE.
# RESOURCE_EXHAUSTED: the server's per-peer or overall call limits (hfl_common.server
# CallLimits) refused the call at once because it is busy; retry with the same backoff.
_RETRYABLE = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
)
_POLL_SECONDS = 20


@dataclass
class TrainerState:
    """What the trainer's own Status shows."""

    trainer_id: str = ""
    state: str = "bootstrapping"
    round: int = 0
    model_version: int = 0
    last_train_loss: float = math.nan
    last_eval_accuracy: float = math.nan
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with full jitter ("Exponential Backoff And Jitter", AWS, 2015)."""

    base: float = 0.5
    cap: float = 10.0
    give_up_after: float = 300.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        return rng.uniform(0, min(self.cap, self.base * (2**attempt)))


class FederationClient:
    def __init__(
        self,
        plan: FederationPlan,
        trainer: LocalTrainer,
        get_weights: Callable[[], dict[str, np.ndarray]],
        connect: Callable[[], grpc.Channel],
        *,
        label: str,
        progress: ProgressReporter | None = None,
        backoff: Backoff | None = None,
        state: TrainerState | None = None,
        on_round: Callable[[int], None] | None = None,
        metrics: TrainerMetrics | None = None,
        step_delay: float = 0.0,
        on_done: Callable[[int, int, dict[str, np.ndarray]], None] | None = None,
        versions: ModelVersionMemory | None = None,
    ) -> None:
        self._plan = plan
        # The highest model version served per plan (hfl_trainer.freshness): an aggregator
        # restarted from an older checkpoint is refused.
        self._versions = versions
        # Called with (rounds completed, model version, final weights) when the
        # federation is done, before leaving (hfl_trainer.export takes the model home).
        self._on_done = on_done
        self._trainer = trainer
        self._connect = connect
        self._label = label
        self._progress = progress
        self._backoff = backoff or Backoff()
        self._rng = random.Random(secrets.randbits(64))
        self.state = state or TrainerState()
        self._on_round = on_round
        self._metrics = metrics
        self._spec = specs_of(get_weights())
        self._channel: grpc.Channel | None = None
        self._stub: aggregator_pb2_grpc.AggregatorServiceStub | None = None
        self._session = ""
        self._stop = threading.Event()
        # Asynchronous federations: train on whatever model is current (JoinResponse.mode).
        self._async = False
        # Seconds slept after every local batch: an injected slow machine (benchmarks).
        self._step_delay = step_delay
        # Client-side DP: noised updates this trainer has released (for its epsilon).
        self.dp_releases = 0
        # The privacy the aggregator accounted for the final model (its DONE task).
        self.final_privacy: aggregator_pb2.PrivacyStatus | None = None

    def stop(self) -> None:
        """Ask run() to return at its next step (a call in flight is not interrupted)."""
        self._stop.set()

    # ------------------------------------------------------------ plumbing

    def _set(self, **values: object) -> None:
        with self.state.lock:
            for k, v in values.items():
                setattr(self.state, k, v)

    def _reconnect(self) -> aggregator_pb2_grpc.AggregatorServiceStub:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._connect()
        self._stub = aggregator_pb2_grpc.AggregatorServiceStub(self._channel)
        return self._stub

    def _call(self, what: str, fn: Callable[[aggregator_pb2_grpc.AggregatorServiceStub], T]) -> T:
        """Run `fn` against the aggregator, retrying while it is unreachable."""
        attempt = 0
        started = time.monotonic()
        while True:
            try:
                stub = self._stub or self._reconnect()
                return fn(stub)
            except grpc.RpcError as err:
                code = err.code() if isinstance(err, grpc.Call) else None
                if code not in _RETRYABLE:
                    raise
                failure = f"{code.name if code else 'error'}: {_details(err)}"
            except UnavailableError as err:
                # connect() could not reach or fetch the aggregator's certificate.
                failure = str(err)
            waited = time.monotonic() - started
            if waited > self._backoff.give_up_after:
                raise UnavailableError(
                    f"aggregator unreachable for {waited:.0f} s while trying to {what}: {failure}"
                )
            delay = self._backoff.delay(attempt, self._rng)
            if self._metrics is not None:
                self._metrics.retries.inc()
            log.warning("%s failed (%s); retrying in %.1f s", what, failure, delay)
            attempt += 1
            # Re-attest: the aggregator may have restarted with a new enclave key.
            self._stub = None
            if self._stop.wait(delay):
                raise UnavailableError(f"stopped while trying to {what}")

    # ---------------------------------------------------------------- loop

    def run(self) -> None:
        """Take part in the federation until it is done. Raises on a fatal error.

        Returns quietly when stop() was called (SIGTERM): an error that follows a stop is
        a consequence of shutting down, not a failure of the federation.
        """
        try:
            self._run()
        except (HflError, grpc.RpcError) as err:
            if not self._stop.is_set():
                raise
            log.info("stopped before the federation finished (%s)", _describe(err))

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._session:
                self._join()
            try:
                response = self._call(
                    "poll for a task",
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
                    log.info("aggregator lost our session (it restarted?); joining again")
                    self._session = ""
                    continue
                if reason == "FEDERATION_FAILED":
                    self._finish(failure=_details(err))
                    return
                raise
            task = response.task
            kind = task.kind
            if kind == aggregator_pb2.TASK_KIND_TRAIN and not self._async:
                self._saw(task.model_version)
            if kind == aggregator_pb2.TASK_KIND_DONE:
                if task.HasField("privacy"):
                    self.final_privacy = task.privacy
                    log.info(
                        "the aggregator accounted %s DP: epsilon %.4f at delta %.3g%s",
                        task.privacy.mode,
                        task.privacy.epsilon,
                        task.privacy.delta,
                        f" ({task.privacy.stop_reason})" if task.privacy.stop_reason else "",
                    )
                self._finish(rounds=task.round)
                return
            if kind == aggregator_pb2.TASK_KIND_WAIT:
                self._set(state="waiting")
                continue
            try:
                with self._keep_alive(task):
                    if kind == aggregator_pb2.TASK_KIND_TRAIN:
                        self._train(task)
                    elif kind == aggregator_pb2.TASK_KIND_EVALUATE:
                        self._evaluate(task)
            except grpc.RpcError as err:
                code = _code(err)
                reason = error_reason(err)
                if reason == "UNKNOWN_SESSION":
                    self._session = ""
                elif reason == "NO_SUCH_VERSION":
                    # The model the task named is gone (its evaluation ended, the round
                    # moved on): the task was overtaken; ask for the next one.
                    log.info("task %s overtaken: %s", task.task_id, _details(err))
                elif code in (
                    grpc.StatusCode.FAILED_PRECONDITION,
                    grpc.StatusCode.ALREADY_EXISTS,
                ):
                    # The round moved on while we worked (deadline, restart): not fatal.
                    log.warning("task %s overtaken: %s", task.task_id, _details(err))
                else:
                    raise

    @contextlib.contextmanager
    def _keep_alive(self, task: aggregator_pb2.Task) -> Iterator[None]:
        """Call KeepAlive every `task.keep_alive_interval` while the body runs."""
        interval = task.keep_alive_interval.ToTimedelta().total_seconds()
        if interval <= 0:
            yield
            return
        done = threading.Event()
        session = self._session

        def beat() -> None:
            while not done.wait(interval):
                stub = self._stub
                if stub is None:
                    continue
                try:
                    response = stub.KeepAlive(
                        aggregator_pb2.KeepAliveRequest(session_id=session, task_id=task.task_id),
                        timeout=max(1.0, interval),
                    )
                except grpc.RpcError as err:
                    log.debug("keep-alive failed: %s", _describe(err))
                    continue
                if not response.task_current:
                    log.info("task %s was overtaken while it ran", task.task_id)

        thread = threading.Thread(target=beat, name="hfl-keep-alive", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()

    def _join(self) -> None:
        self._set(state="joining")
        spec = self._spec
        response = self._call(
            "join the federation",
            lambda s: s.Join(
                aggregator_pb2.JoinRequest(
                    label=self._label,
                    plan_sha256=self._plan.sha256_hex,
                    model_spec=spec,
                    num_examples=self._trainer.num_examples,
                ),
                timeout=30,
            ),
        )
        self._session = response.session_id
        self._async = response.mode == aggregator_pb2.AGGREGATION_MODE_ASYNC
        self._set(trainer_id=response.trainer_id, state="waiting")
        log.info(
            "joined as %s (%s); %d rounds planned",
            response.trainer_id,
            self._label,
            response.total_rounds,
        )

    def _finish(self, failure: str = "", rounds: int = 0) -> None:
        """The federation ended: done after `rounds`, or failed (`failure` is the
        aggregator's reason). When done, `on_done` gets the final model first."""
        failed = bool(failure)
        if not failed and self._on_done is not None:
            version, weights = self._download(0)
            self._on_done(rounds, version, weights)
        self._set(state="failed" if failed else "done")
        try:
            self._call(
                "leave",
                lambda s: s.Leave(
                    aggregator_pb2.LeaveRequest(session_id=self._session), timeout=10
                ),
            )
        except (grpc.RpcError, HflError) as err:
            log.debug("leave failed: %s", err)
        if failed:
            raise FailedPreconditionError(failure, "federation_failed")
        log.info("federation done")

    # --------------------------------------------------------------- model

    def _saw(self, version: int) -> None:
        """A current model version the aggregator served: refuse a regression."""
        if self._versions is not None:
            self._versions.check(self._plan.sha256_hex, self._plan.name, version)

    def _download(self, version: int) -> tuple[int, dict[str, np.ndarray]]:
        def fetch(
            s: aggregator_pb2_grpc.AggregatorServiceStub,
        ) -> tuple[int, dict[str, np.ndarray]]:
            stream = s.DownloadModel(
                aggregator_pb2.DownloadModelRequest(
                    session_id=self._session, model_version=version
                ),
                timeout=600,
            )
            return _receive_model(stream, self._spec, self._plan.sha256_hex)

        got = self._call("download the global model", fetch)
        if version == 0:
            self._saw(got[0])
        return got

    def _train(self, task: aggregator_pb2.Task) -> None:
        params = task.train
        self._set(state="training", round=task.round)
        # Asynchronous mode has no barrier: train on the newest model there is (its
        # version goes into the update header, and the aggregator weighs its staleness).
        version, weights = self._download(0 if self._async else task.model_version)
        self._set(model_version=version)
        if params.update_kind == aggregator_pb2.UPDATE_KIND_GRADIENT:
            g = self._trainer.compute_gradient(weights, int(params.seed))
            # Gradients for trainable variables; the new values of non-trainable ones
            # (BatchNorm statistics), which the aggregator averages rather than steps.
            update = self._privatize(params.privacy, g.gradients)
            update.update(g.non_trainable)
            update = {name: update[name] for name in weights}
            num_examples, loss, accuracy = g.num_examples, g.loss, math.nan
        else:
            result = self._trainer.train_delta(
                weights,
                epochs=max(1, params.local_epochs),
                proximal_mu=params.proximal_mu,
                on_batch=self._on_batch,
            )
            update = result.delta
            num_examples, loss, accuracy = result.num_examples, result.loss, result.accuracy
            if self._metrics is not None:
                self._metrics.examples_per_second.set(result.examples_per_second)
                self._metrics.examples.inc(result.num_examples * max(1, params.local_epochs))
            if self._progress is not None:
                self._progress.round_finished(task.round, result)
            update = self._privatize(params.privacy, update)
        self._set(last_train_loss=loss)
        self._upload(task, version, update, num_examples, loss, accuracy)
        if self._metrics is not None:
            self._metrics.rounds_completed.inc()
            if math.isfinite(loss):
                self._metrics.train_loss.set(loss)
        if self._on_round is not None:
            self._on_round(task.round)

    def _on_batch(self, progress: BatchProgress) -> None:
        if self._progress is not None:
            self._progress.on_batch(progress)
        if self._step_delay > 0:
            time.sleep(self._step_delay)

    def _privatize(
        self, privacy: aggregator_pb2.PrivacyConfig, update: dict[str, np.ndarray]
    ) -> dict[str, np.ndarray]:
        """Client-side DP as the plan asks: clip the update's L2 norm, add Gaussian noise."""
        if privacy.clip_norm <= 0:
            return dict(update)
        clipped, norm = clip_update(update, privacy.clip_norm)
        log.debug("update L2 norm %.4g clipped to %.4g", norm, privacy.clip_norm)
        if privacy.noise_multiplier <= 0:
            return clipped
        rng = np.random.default_rng(secrets.randbits(128))
        noised = add_gaussian_noise(clipped, privacy.noise_multiplier, privacy.clip_norm, rng)
        self.dp_releases += 1
        eps = local_epsilon(privacy.noise_multiplier, self.dp_releases, self._plan.privacy.delta)
        log.info(
            "client-side DP: %d noised updates sent, epsilon %.4f at delta %.3g",
            eps.releases,
            eps.epsilon,
            eps.delta,
        )
        return noised

    def _upload(
        self,
        task: aggregator_pb2.Task,
        version: int,
        update: Mapping[str, np.ndarray],
        num_examples: int,
        loss: float,
        accuracy: float,
    ) -> None:
        header = aggregator_pb2.UpdateHeader(
            session_id=self._session,
            task_id=task.task_id,
            round=task.round,
            base_model_version=version,
            kind=task.train.update_kind,
            num_examples=num_examples,
            train_loss=loss,
            train_accuracy=accuracy,
        )
        encoding = task.train.update_encoding or tensor_pb2.ENCODING_RAW
        metrics = self._metrics

        def send(
            s: aggregator_pb2_grpc.AggregatorServiceStub,
        ) -> aggregator_pb2.UploadUpdateResponse:
            # A fresh nonce per attempt: a retry after UNAVAILABLE is a new upload, and
            # the aggregator refuses the same nonce twice.
            header.nonce = secrets.token_bytes(16)
            stream = encode_tensors(update, encoding)
            response = s.UploadUpdate(iter_upload_messages(header, stream), timeout=600)
            if metrics is not None:
                metrics.upload_bytes.inc(stream.header.total_bytes)
            return response

        response = self._call("upload the update", send)
        log.info(
            "round %d: update %s (base model version %d, model version %d, staleness %d)",
            response.round,
            aggregator_pb2.UpdateDisposition.Name(response.disposition)
            .removeprefix("UPDATE_DISPOSITION_")
            .lower(),
            response.base_model_version,
            response.model_version,
            response.staleness,
        )

    def _evaluate(self, task: aggregator_pb2.Task) -> None:
        self._set(state="evaluating", round=task.round)
        version, weights = self._download(task.model_version)
        result = self._trainer.evaluate(weights)
        self._set(last_eval_accuracy=result.accuracy, model_version=version)
        if self._metrics is not None:
            self._metrics.eval_accuracy.set(result.accuracy)
        report = aggregator_pb2.EvaluationReport(
            session_id=self._session,
            task_id=task.task_id,
            round=task.round,
            model_version=version,
            num_examples=result.num_examples,
            loss=result.loss,
            accuracy=result.accuracy,
        )
        if not (math.isfinite(result.loss) and 0.0 <= result.accuracy <= 1.0):
            # A poisoned or diverged model: say so, and let the aggregator refuse the
            # report with its reason; the federation goes on without this evaluation.
            log.error(
                "round %d: evaluation of model version %d is not finite (loss %s, "
                "accuracy %s): reporting it",
                task.round,
                version,
                result.loss,
                result.accuracy,
            )
        try:
            self._call(
                "report the evaluation",
                lambda s: s.ReportEvaluation(
                    aggregator_pb2.ReportEvaluationRequest(report=report), timeout=30
                ),
            )
        except grpc.RpcError as err:
            code = err.code() if isinstance(err, grpc.Call) else None
            if code is not grpc.StatusCode.INVALID_ARGUMENT:
                raise
            log.error(
                "round %d: the aggregator refused the evaluation of model version %d: %s",
                task.round,
                version,
                _details(err),
            )
            return
        log.info(
            "round %d: evaluated model version %d: loss %.4f, accuracy %.4f on %d examples",
            task.round,
            version,
            result.loss,
            result.accuracy,
            result.num_examples,
        )


def _receive_model(
    stream: Iterable[aggregator_pb2.DownloadModelResponse],
    spec: list[tensor_pb2.TensorSpec],
    plan_sha256: str,
) -> tuple[int, dict[str, np.ndarray]]:
    def check_plan(header: aggregator_pb2.ModelHeader) -> None:
        if header.plan_sha256 != plan_sha256:
            raise FailedPreconditionError(
                f"the aggregator serves a model for plan {header.plan_sha256[:16]}…, "
                f"not this trainer's plan {plan_sha256[:16]}…"
            )

    max_bytes = sum(int(np.prod(s.shape, dtype=np.int64)) * 8 for s in spec) + 4096
    header, arrays = collect_stream(
        stream, max_total_bytes=max_bytes, expected=spec, on_header=check_plan
    )
    return int(header.model_version), arrays


def _describe(err: BaseException) -> str:
    if isinstance(err, grpc.RpcError):
        code = _code(err)
        return f"{code.name if code else 'error'}: {_details(err)}"
    return str(err)


def _code(err: grpc.RpcError) -> grpc.StatusCode | None:
    return err.code() if isinstance(err, grpc.Call) else None


def _details(err: grpc.RpcError) -> str:
    return (err.details() or "") if isinstance(err, grpc.Call) else str(err)
