"""The AggregatorService gRPC servicer: wire format in, round engine calls out.

Handlers stay thin. Who the caller is comes from its attested certificate
(`current_peer()`, set by the server's interceptor after the role check and
quote re-verification) and is passed to the engine, which refuses a session
used by another identity; the federation logic lives in `hfl_aggregator.engine`,
which also decides every field of a task. The tensor streams go through
`hfl_common.codec`. An upload is decoded chunk by chunk into one of at most
`upload_slots` reused decode buffers (`DecodeSlots`, each the model's size),
and keeps that slot through validation and the fold into the round's sum,
until the engine says it holds no reference to it any more: so the decoded
updates alive at once are at most `upload_slots`, whatever the number of
trainers (the others wait, their bytes held back by gRPC flow control). An
upload takes its slot only after its header has come (within
`header_timeout_seconds`) and passed admission, so an idle stream holds nothing.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np

from hfl_aggregator.engine import (
    FailureReason,
    Phase,
    PrivacyView,
    RoundEngine,
    RoundState,
    Task,
    TaskKind,
    Ticket,
    TrainerState,
    UpdateMeta,
    party_of,
)
from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.model_cache import DOWNLOAD_CHUNK_BYTES, ModelCache
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.codec import check_specs, collect_stream
from hfl_common.codec.dtypes import native_dtype
from hfl_common.config import FederationPlan
from hfl_common.errors import (
    DeadlineExceededError,
    FailedPreconditionError,
    HflError,
    InvalidArgumentError,
    PermissionDeniedError,
    ResourceExhaustedError,
    StreamError,
    UnauthenticatedError,
)
from hfl_common.server import PeerIdentity, current_peer

log = logging.getLogger(__name__)

SERVICE_NAME = "hfl.v1.AggregatorService"
# Long-polls are held at most this long, so proxies and keepalives stay happy.
MAX_POLL_SECONDS = 30.0

_TASK_KINDS = {
    TaskKind.TRAIN: aggregator_pb2.TASK_KIND_TRAIN,
    TaskKind.EVALUATE: aggregator_pb2.TASK_KIND_EVALUATE,
    TaskKind.WAIT: aggregator_pb2.TASK_KIND_WAIT,
    TaskKind.DONE: aggregator_pb2.TASK_KIND_DONE,
}
_UPDATE_KINDS = {
    aggregator_pb2.UPDATE_KIND_GRADIENT: "gradient",
    aggregator_pb2.UPDATE_KIND_DELTA: "delta",
}
_STATES = {
    Phase.WAITING: aggregator_pb2.FEDERATION_STATE_WAITING_FOR_TRAINERS,
    Phase.TRAINING: aggregator_pb2.FEDERATION_STATE_TRAINING,
    Phase.AGGREGATING: aggregator_pb2.FEDERATION_STATE_AGGREGATING,
    Phase.EVALUATING: aggregator_pb2.FEDERATION_STATE_EVALUATING,
    Phase.DONE: aggregator_pb2.FEDERATION_STATE_DONE,
    Phase.FAILED: aggregator_pb2.FEDERATION_STATE_FAILED,
}
_TRAINER_STATES = {
    TrainerState.ACTIVE: aggregator_pb2.TRAINER_STATE_ACTIVE,
    TrainerState.IDLE: aggregator_pb2.TRAINER_STATE_IDLE,
    TrainerState.LOST: aggregator_pb2.TRAINER_STATE_LOST,
    TrainerState.LEFT: aggregator_pb2.TRAINER_STATE_LEFT,
}
_ROUND_STATES = {
    RoundState.RUNNING: aggregator_pb2.ROUND_STATE_RUNNING,
    RoundState.COMPLETED: aggregator_pb2.ROUND_STATE_COMPLETED,
    RoundState.FAILED: aggregator_pb2.ROUND_STATE_FAILED,
}
_FAILURES = {
    FailureReason.DEADLINE: aggregator_pb2.ROUND_FAILURE_DEADLINE,
    FailureReason.TRAINERS_LOST: aggregator_pb2.ROUND_FAILURE_TRAINERS_LOST,
    FailureReason.AGGREGATION_FAILED: aggregator_pb2.ROUND_FAILURE_AGGREGATION_FAILED,
    FailureReason.AGGREGATE_REFUSED: aggregator_pb2.ROUND_FAILURE_AGGREGATE_REFUSED,
}
_MODES = {
    "sync": aggregator_pb2.AGGREGATION_MODE_SYNC,
    "async": aggregator_pb2.AGGREGATION_MODE_ASYNC,
}
_ENCODINGS = {
    "raw": tensor_pb2.ENCODING_RAW,
    "float16": tensor_pb2.ENCODING_FLOAT16,
    "bfloat16": tensor_pb2.ENCODING_BFLOAT16,
    "int8": tensor_pb2.ENCODING_INT8,
}

# Methods and the roles that may call them: the aggregator's authorization table.
# A relay (hfl_aggregator.relay) takes part in the root's rounds as one participant.
ALLOWED_ROLES: dict[str, frozenset[str]] = {
    f"/{SERVICE_NAME}/{m}": frozenset({"trainer", "relay"})
    for m in (
        "Join",
        "GetTask",
        "KeepAlive",
        "DownloadModel",
        "UploadUpdate",
        "ReportEvaluation",
        "Leave",
    )
}
ALLOWED_ROLES[f"/{SERVICE_NAME}/GetStatus"] = frozenset({"operator"})


def encoding_code(name: str) -> int:
    return _ENCODINGS[name]


class AggregatorServicer(aggregator_pb2_grpc.AggregatorServiceServicer):
    def __init__(
        self,
        engine: RoundEngine,
        plan: FederationPlan,
        metrics: AggregatorMetrics,
        model_spec: Sequence[tensor_pb2.TensorSpec],
        *,
        mrenclave_of: Callable[[PeerIdentity], str],
        simulated_of: Callable[[PeerIdentity], bool] = lambda _peer: False,
        tee_simulated: bool = False,
        federation_id: str = "",
        chunk_bytes: int = DOWNLOAD_CHUNK_BYTES,
        upload_slots: int = 1,
        header_timeout_seconds: float = 10.0,
        join_guard: Callable[[PeerIdentity], None] | None = None,
    ) -> None:
        self._engine = engine
        # A relay refuses trainers beyond its plan's group size (hfl_aggregator.relay).
        self._join_guard = join_guard
        self._plan = plan
        self._metrics = metrics
        self._spec = list(model_spec)
        self._mrenclave_of = mrenclave_of
        # Whose verified evidence is simulated (trainer id -> bool), shown in GetStatus.
        self._simulated_of = simulated_of
        self._simulated: dict[str, bool] = {}
        self._tee_simulated = tee_simulated
        self._federation_id = federation_id or plan.name
        self._chunk_bytes = chunk_bytes
        self._models = ModelCache(chunk_bytes)
        self._uploads = DecodeSlots(self._spec, upload_slots)
        self._header_timeout = header_timeout_seconds
        # An update is at most the model's size at 8 bytes per element (raw encoding of
        # the widest dtype, float64/int64), plus slack for the stream's framing.
        self._max_update_bytes = (
            sum(int(np.prod(s.shape, dtype=np.int64)) * 8 for s in self._spec) + 4096
        )

    # ------------------------------------------------------------------ join

    def Join(  # noqa: N802 (gRPC method name)
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        peer = current_peer()
        caller = _caller()
        check_specs(self._spec, list(request.model_spec), "trainer model vs the plan's model")
        if peer.role == "relay" and self._plan.relays is None:
            raise PermissionDeniedError(
                "a relay cannot join: this federation's plan has no [relays] table, so its "
                "rounds are not meant to take partial aggregates",
                "no_relays",
            )
        if self._join_guard is not None:
            self._join_guard(peer)
        self._simulated[caller] = self._simulated_of(peer)
        session = self._engine.join(
            caller,
            request.label or caller,
            self._mrenclave_of(peer),
            request.plan_sha256,
            int(request.num_examples),
            party=party_of(peer),
        )
        return aggregator_pb2.JoinResponse(
            trainer_id=peer.peer_id,
            session_id=session,
            plan_sha256=self._plan.sha256_hex,
            total_rounds=self._plan.rounds,
            mode=_MODES[self._plan.mode],
        )

    def Leave(  # noqa: N802
        self, request: aggregator_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.LeaveResponse:
        self._engine.leave(request.session_id, _caller())
        return aggregator_pb2.LeaveResponse()

    # ----------------------------------------------------------------- tasks

    def GetTask(  # noqa: N802
        self, request: aggregator_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetTaskResponse:
        wait = min(request.max_wait.ToTimedelta().total_seconds(), MAX_POLL_SECONDS)
        task = self._engine.next_task(request.session_id, _caller(), wait, context.is_active)
        if task.failed:
            raise FailedPreconditionError(
                task.message, "federation_failed", {"round": str(task.round)}
            )
        return aggregator_pb2.GetTaskResponse(task=task_message(task))

    def KeepAlive(  # noqa: N802
        self, request: aggregator_pb2.KeepAliveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.KeepAliveResponse:
        current = self._engine.keep_alive(request.session_id, _caller(), request.task_id)
        return aggregator_pb2.KeepAliveResponse(task_current=current)

    # --------------------------------------------------------------- streams

    def DownloadModel(  # noqa: N802
        self, request: aggregator_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.DownloadModelResponse]:
        self._engine.trainer_of(request.session_id, _caller())
        completed, version, weights = self._engine.model_at(request.model_version)
        # Encoded and hashed once per version, whatever the number of trainers.
        encoded = self._models.get(version, weights)
        yield from encoded.download_messages(completed, self._plan.sha256_hex)
        self._metrics.update_bytes.labels(direction="out").inc(encoded.total_bytes)

    def UploadUpdate(  # noqa: N802
        self,
        request_iterator: Iterator[aggregator_pb2.UploadUpdateRequest],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        caller = _caller()
        parts = self._counted(request_iterator)
        first = self._first_part(parts)
        if first.WhichOneof("part") != "header":
            raise StreamError(
                f"an update stream must start with its header, not a {first.WhichOneof('part')}"
            )
        h = first.header
        # Admission of the header (session, round, replay ...) before any payload is read
        # and before an upload slot is taken.
        ticket = self._check_header(h, caller)
        if h.tensors.total_bytes > self._max_update_bytes:
            oversized = ResourceExhaustedError(
                f"update stream announces {h.tensors.total_bytes} bytes; an update of "
                f"this model is at most {self._max_update_bytes} bytes",
                "oversized",
            )
            self._engine.refuse(ticket.trainer_id, oversized)
            raise oversized
        with self._uploads.slot() as slot:
            try:
                _, arrays = collect_stream(
                    itertools.chain([first], parts),
                    max_total_bytes=self._max_update_bytes,
                    expected=self._spec,
                    out=slot.buffers,
                )
            except HflError as exc:
                self._engine.refuse(ticket.trainer_id, exc)
                raise
            # The slot is handed back as soon as the update is folded (or refused), before
            # a round this update closes is aggregated.
            accepted = self._engine.accept_update(ticket, arrays, stored=slot.release)
        if accepted.applied_version:
            disposition = aggregator_pb2.UPDATE_DISPOSITION_APPLIED
        elif accepted.journaled:
            disposition = aggregator_pb2.UPDATE_DISPOSITION_BUFFERED
        else:
            disposition = aggregator_pb2.UPDATE_DISPOSITION_PENDING
        return aggregator_pb2.UploadUpdateResponse(
            disposition=disposition,
            round=accepted.round,
            base_model_version=accepted.base_model_version,
            model_version=accepted.applied_version,
            staleness=accepted.staleness,
        )

    def _first_part(
        self, parts: Iterator[aggregator_pb2.UploadUpdateRequest]
    ) -> aggregator_pb2.UploadUpdateRequest:
        """The stream's first message, waited for at most `header_timeout_seconds`."""
        box: queue.Queue[tuple[bool, object]] = queue.Queue(1)

        def read() -> None:
            try:
                box.put((True, next(parts)))
            except StopIteration:
                box.put((False, StreamError("the update stream ended before its header")))
            except BaseException as exc:  # handed to the handler thread below
                box.put((False, exc))

        threading.Thread(target=read, name="hfl-upload-header", daemon=True).start()
        try:
            ok, value = box.get(timeout=self._header_timeout)
        except queue.Empty:
            raise DeadlineExceededError(
                f"no update header within {self._header_timeout:.0f} s of opening the "
                "upload stream; send the header first",
                "header_timeout",
            ) from None
        if not ok:
            assert isinstance(value, BaseException)
            raise value
        assert isinstance(value, aggregator_pb2.UploadUpdateRequest)
        return value

    def _check_header(self, h: aggregator_pb2.UpdateHeader, caller: str) -> Ticket:
        kind = _UPDATE_KINDS.get(h.kind)
        if kind is None:
            raise InvalidArgumentError(
                f"update kind {h.kind} is not GRADIENT or DELTA", "wrong_kind"
            )
        relays = self._plan.relays
        if relays is not None:
            # The weight an update claims is bounded (config.RelayPlan): a relay's by its
            # group size times a trainer's bound.
            relay = current_peer().role == "relay"
            bound = relays.max_relay_examples if relay else relays.max_examples_per_trainer
            if h.num_examples > bound:
                exc = InvalidArgumentError(
                    f"update claims {h.num_examples} examples; the plan's [relays] bound for "
                    f"a {'relay' if relay else 'trainer'} is {bound}"
                    + (
                        f" ({relays.max_group_size} trainers x "
                        f"{relays.max_examples_per_trainer} examples)"
                        if relay
                        else ""
                    ),
                    "too_many_examples",
                )
                self._engine.refuse(caller, exc)
                raise exc
        return self._engine.check_update(
            UpdateMeta(
                session_id=h.session_id,
                task_id=h.task_id,
                round=h.round,
                base_model_version=h.base_model_version,
                kind=kind,
                num_examples=h.num_examples,
                nonce=bytes(h.nonce),
                train_loss=h.train_loss,
                train_accuracy=h.train_accuracy,
            ),
            caller,
        )

    def _counted(
        self, parts: Iterator[aggregator_pb2.UploadUpdateRequest]
    ) -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        """Count payload bytes in; a trainer that vanished becomes a clear StreamError."""
        received = 0
        try:
            for part in parts:
                if part.WhichOneof("part") == "chunk":
                    received += len(part.chunk.data)
                    self._metrics.update_bytes.labels(direction="in").inc(len(part.chunk.data))
                yield part
        except grpc.RpcError:
            raise StreamError(
                f"the trainer disconnected mid-stream after {received} bytes; nothing of "
                "this update was kept"
            ) from None

    # ------------------------------------------------------------ evaluation

    def ReportEvaluation(  # noqa: N802
        self, request: aggregator_pb2.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.ReportEvaluationResponse:
        r = request.report
        self._engine.report_evaluation(
            r.session_id, _caller(), r.round, r.model_version, r.num_examples, r.loss, r.accuracy
        )
        return aggregator_pb2.ReportEvaluationResponse()

    # ---------------------------------------------------------------- status

    def GetStatus(  # noqa: N802
        self, request: aggregator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetStatusResponse:
        snap = self._engine.snapshot()
        response = aggregator_pb2.GetStatusResponse(
            federation_id=self._federation_id,
            tee_simulated=self._tee_simulated,
            plan_sha256=self._plan.sha256_hex,
            state=_STATES[snap.phase],
            round=snap.round,
            total_rounds=snap.total_rounds,
            model_version=snap.model_version,
            strategy=self._plan.strategy.name,
            model=self._plan.model.name,
            mode=_MODES[snap.mode],
            buffer_size=snap.buffer_size,
            failure=snap.failure,
            stop_reason=snap.stop_reason,
        )
        if snap.privacy is not None:
            response.privacy.CopyFrom(privacy_message(snap.privacy))
        for t in snap.trainers:
            trainer = response.trainers.add(
                trainer_id=t.trainer_id,
                label=t.label,
                party=t.party,
                mrenclave=t.mrenclave,
                state=_TRAINER_STATES[t.state],
                updates_accepted=t.updates_accepted,
                updates_refused=t.updates_refused,
                num_examples=t.num_examples,
                simulated=self._simulated.get(t.trainer_id, False),
            )
            trainer.last_seen.FromNanoseconds(int(t.last_seen * 1e9))
        for r in snap.rounds:
            summary = response.rounds.add(
                round=r.round,
                attempt=r.attempt,
                state=_ROUND_STATES[r.state],
                updates=r.updates,
                model_version=r.model_version,
                train_loss=r.train_loss,
                eval_loss=r.eval_loss,
                eval_accuracy=r.eval_accuracy,
                eval_examples=r.eval_examples,
                failure=_FAILURES[r.failure] if r.failure is not None else 0,
                failure_message=r.failure_message,
                staleness=r.staleness,
                dp_epsilon=r.dp_epsilon,
            )
            summary.duration.FromNanoseconds(int(r.duration_seconds * 1e9))
        return response


class DecodeSlot:
    """One decode buffer: the model's tensors, overwritten by each upload that holds it."""

    def __init__(self, pool: DecodeSlots, buffers: dict[str, np.ndarray]) -> None:
        self._pool = pool
        self.buffers = buffers
        self._held = True

    def release(self) -> None:
        """Give the buffer back (once; later calls do nothing)."""
        if self._held:
            self._held = False
            self._pool.put_back(self)

    def __enter__(self) -> DecodeSlot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class DecodeSlots:
    """At most `slots` decode buffers of the model, made on first use and then reused.

    The aggregator's memory for uploads is `slots` x the model whatever the number of
    trainers: `slot()` blocks until a buffer is free. Reusing the buffers (rather than
    allocating 100 MB per upload and freeing it) also keeps glibc from spreading freed
    blocks over the malloc arenas of gRPC's handler threads.
    """

    def __init__(self, spec: Sequence[tensor_pb2.TensorSpec], slots: int) -> None:
        if slots < 1:
            raise ValueError(f"upload slots {slots} must be at least 1")
        self._spec = list(spec)
        self._free: list[dict[str, np.ndarray]] = []
        self._sem = threading.BoundedSemaphore(slots)
        self._lock = threading.Lock()

    def slot(self) -> DecodeSlot:
        self._sem.acquire()
        with self._lock:
            buffers = self._free.pop() if self._free else None
        if buffers is None:
            buffers = {
                s.name: np.empty(tuple(s.shape), dtype=native_dtype(s.dtype)) for s in self._spec
            }
        return DecodeSlot(self, buffers)

    def put_back(self, slot: DecodeSlot) -> None:
        with self._lock:
            self._free.append(slot.buffers)
        self._sem.release()


def _caller() -> str:
    """The calling trainer's identity: the hfl://id/ SAN of its attested certificate."""
    peer = current_peer()
    if not peer.peer_id:
        raise UnauthenticatedError("the caller's certificate carries no hfl://id/ SAN")
    return peer.peer_id


def task_message(task: Task) -> aggregator_pb2.Task:
    """The wire form of an engine task: every field comes from the engine."""
    msg = aggregator_pb2.Task(
        task_id=task.task_id,
        kind=_TASK_KINDS[task.kind],
        round=task.round,
        model_version=task.model_version,
        message=task.message,
    )
    if task.heartbeat_seconds:
        msg.keep_alive_interval.FromNanoseconds(int(task.heartbeat_seconds * 1e9))
    p = task.train
    if p is not None:
        msg.train.CopyFrom(
            aggregator_pb2.TrainParams(
                update_kind=(
                    aggregator_pb2.UPDATE_KIND_GRADIENT
                    if p.update_kind == "gradient"
                    else aggregator_pb2.UPDATE_KIND_DELTA
                ),
                local_epochs=p.local_epochs,
                proximal_mu=p.proximal_mu,
                update_encoding=encoding_code(p.encoding),  # type: ignore[arg-type]
                privacy=aggregator_pb2.PrivacyConfig(
                    clip_norm=p.clip_norm, noise_multiplier=p.noise_multiplier
                ),
                seed=p.seed,
                max_staleness=p.max_staleness,
            )
        )
    elif task.kind is TaskKind.EVALUATE:
        msg.evaluate.SetInParent()
    if task.privacy is not None:
        msg.privacy.CopyFrom(privacy_message(task.privacy))
    return msg


def privacy_message(view: PrivacyView) -> aggregator_pb2.PrivacyStatus:
    """The wire form of the engine's privacy view (epsilon from the sealed ledger)."""
    return aggregator_pb2.PrivacyStatus(
        mode=view.mode,
        epsilon=view.epsilon,
        delta=view.delta,
        epsilon_rdp=view.epsilon_rdp,
        epsilon_pld=view.epsilon_pld,
        rounds_accounted=view.rounds,
        max_epsilon=view.max_epsilon,
        clip_norm=view.clip_norm,
        stop_reason=view.stop_reason,
        noise_multiplier=view.noise_multiplier,
        relation=view.relation,
    )
