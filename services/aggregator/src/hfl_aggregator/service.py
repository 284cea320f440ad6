"""The AggregatorService gRPC servicer: wire format in, round engine calls out.

Handlers stay thin. Who the caller is comes from its attested certificate
(`current_peer()`, set by the server's interceptor after the role check and
quote re-verification); the round logic lives in `hfl_aggregator.rounds`; the
tensor streams go through `hfl_common.codec`, so memory per upload is the
decoded update plus one chunk, and at most `upload_slots` uploads are decoded
at a time, whatever the number of trainers.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
import numpy as np

from hfl_aggregator.metrics import AggregatorMetrics
from hfl_aggregator.rounds import RoundEngine, TaskKind, Ticket, UpdateMeta
from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.codec import (
    check_specs,
    collect_stream,
    encode_tensors,
    iter_download_messages,
)
from hfl_common.config import FederationPlan
from hfl_common.errors import (
    HflError,
    InvalidArgumentError,
    NotFoundError,
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
_ENCODINGS = {
    "raw": tensor_pb2.ENCODING_RAW,
    "float16": tensor_pb2.ENCODING_FLOAT16,
    "bfloat16": tensor_pb2.ENCODING_BFLOAT16,
    "int8": tensor_pb2.ENCODING_INT8,
}

# Methods and the roles that may call them: the aggregator's authorization table.
ALLOWED_ROLES: dict[str, frozenset[str]] = {
    f"/{SERVICE_NAME}/{m}": frozenset({"trainer"})
    for m in ("Join", "GetTask", "DownloadModel", "UploadUpdate", "ReportEvaluation", "Leave")
}
ALLOWED_ROLES[f"/{SERVICE_NAME}/GetStatus"] = frozenset({"operator"})


# The round record's fields that RoundSummary carries (the record also has the
# aggregation time and, under differential privacy, dp_epsilon and friends).
_ROUND_FIELDS = frozenset(aggregator_pb2.RoundSummary.DESCRIPTOR.fields_by_name)


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
        federation_id: str = "",
        chunk_bytes: int = 1 << 20,
        upload_slots: int = 1,
    ) -> None:
        self._engine = engine
        self._plan = plan
        self._metrics = metrics
        self._spec = list(model_spec)
        self._mrenclave_of = mrenclave_of
        self._federation_id = federation_id or plan.name
        self._chunk_bytes = chunk_bytes
        self._uploads = threading.BoundedSemaphore(upload_slots)
        # An update is the model's size in float32 at most (raw encoding), plus slack.
        self._max_update_bytes = (
            sum(int(np.prod(s.shape, dtype=np.int64)) * 8 for s in self._spec) + 4096
        )

    # ------------------------------------------------------------------ join

    def Join(  # noqa: N802 (gRPC method name)
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        peer = current_peer()
        if not peer.peer_id:
            raise UnauthenticatedError("trainer certificate carries no hfl://id/ SAN")
        check_specs(self._spec, list(request.model_spec), "trainer model vs the plan's model")
        session = self._engine.join(
            peer.peer_id,
            request.label or peer.peer_id,
            self._mrenclave_of(peer),
            request.plan_sha256,
            int(request.num_examples),
        )
        return aggregator_pb2.JoinResponse(
            trainer_id=peer.peer_id,
            session_id=session,
            plan_sha256=self._plan.sha256_hex,
            total_rounds=self._plan.rounds,
        )

    def Leave(  # noqa: N802
        self, request: aggregator_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.LeaveResponse:
        self._engine.leave(request.session_id)
        return aggregator_pb2.LeaveResponse()

    # ----------------------------------------------------------------- tasks

    def GetTask(  # noqa: N802
        self, request: aggregator_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetTaskResponse:
        wait = min(float(request.wait_seconds), MAX_POLL_SECONDS)
        task = self._engine.next_task(request.session_id, wait, context.is_active)
        t = self._plan.training
        msg = aggregator_pb2.Task(
            task_id=task.task_id,
            kind=_TASK_KINDS[task.kind],
            round=task.round,
            model_version=task.model_version,
            message=task.message,
        )
        if task.kind is TaskKind.TRAIN:
            config = self._engine.strategy.configure_round(task.round)
            msg.update_kind = (
                aggregator_pb2.UPDATE_KIND_GRADIENT
                if self._plan.update_kind == "gradient"
                else aggregator_pb2.UPDATE_KIND_DELTA
            )
            msg.local_epochs = t.local_epochs
            msg.local_steps = 1 if self._plan.update_kind == "gradient" else t.local_steps
            msg.batch_size = t.batch_size
            msg.learning_rate = t.learning_rate
            msg.proximal_mu = float(getattr(config, "proximal_mu", 0.0))
            msg.update_encoding = encoding_code(self._plan.update.encoding)  # type: ignore[assignment]
            msg.privacy.clip_norm = self._plan.privacy.clip_norm
            msg.privacy.noise_multiplier = self._plan.privacy.noise_multiplier
            msg.deadline_unix_ms = int(task.deadline * 1000)
            msg.seed = task.seed
        elif task.kind is TaskKind.EVALUATE:
            msg.deadline_unix_ms = int(task.deadline * 1000)
        return aggregator_pb2.GetTaskResponse(task=msg)

    # --------------------------------------------------------------- streams

    def DownloadModel(  # noqa: N802
        self, request: aggregator_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.DownloadModelResponse]:
        self._engine.trainer_of(request.session_id)
        completed, version, weights = self._engine.model()
        if request.model_version not in (0, version):
            raise NotFoundError(
                f"model version {request.model_version} is not available; the current "
                f"global model is version {version}"
            )
        stream = encode_tensors(weights, tensor_pb2.ENCODING_RAW, chunk_bytes=self._chunk_bytes)
        yield from iter_download_messages(completed, version, self._plan.sha256_hex, stream)
        self._metrics.update_bytes.labels(direction="out").inc(stream.header.total_bytes)

    def UploadUpdate(  # noqa: N802
        self,
        request_iterator: Iterator[aggregator_pb2.UploadUpdateRequest],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        ticket: Ticket | None = None

        def on_header(h: aggregator_pb2.UpdateHeader) -> None:
            # Round checks on the header alone, before any of the payload is read.
            nonlocal ticket
            ticket = self._check_header(h)
            if h.tensors.total_bytes > self._max_update_bytes:
                raise ResourceExhaustedError(
                    f"update stream announces {h.tensors.total_bytes} bytes; an update of "
                    f"this model is at most {self._max_update_bytes} bytes",
                    "oversized",
                )

        try:
            with self._uploads:
                _, arrays = collect_stream(
                    self._counted(request_iterator),
                    max_total_bytes=self._max_update_bytes,
                    expected=self._spec,
                    on_header=on_header,
                )
        except HflError as exc:
            if ticket is not None:
                self._engine.refuse(ticket.trainer_id, exc)
            raise
        assert ticket is not None  # collect_stream returns only after on_header ran
        round_number, version = self._engine.accept_update(ticket, arrays)
        return aggregator_pb2.UploadUpdateResponse(
            accepted=True, round=round_number, model_version=version
        )

    def _check_header(self, h: aggregator_pb2.UpdateHeader) -> Ticket:
        kind = _UPDATE_KINDS.get(h.kind)
        if kind is None:
            raise InvalidArgumentError(f"update kind {h.kind} is not GRADIENT or DELTA")
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
            )
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
            r.session_id, r.round, r.model_version, r.num_examples, r.loss, r.accuracy
        )
        return aggregator_pb2.ReportEvaluationResponse()

    # ---------------------------------------------------------------- status

    def GetStatus(  # noqa: N802
        self, request: aggregator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetStatusResponse:
        snap = self._engine.snapshot()
        return aggregator_pb2.GetStatusResponse(
            federation_id=self._federation_id,
            plan_sha256=self._plan.sha256_hex,
            state=snap["state"],
            round=snap["round"],
            total_rounds=snap["total_rounds"],
            model_version=snap["model_version"],
            strategy=self._plan.strategy.name,
            model=self._plan.model.name,
            trainers=[aggregator_pb2.TrainerStatus(**t) for t in snap["trainers"]],
            rounds=[
                aggregator_pb2.RoundSummary(**{k: v for k, v in r.items() if k in _ROUND_FIELDS})
                for r in snap["rounds"]
            ],
        )
