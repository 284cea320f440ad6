import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from hfl_common.gen.hfl.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class UpdateKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_KIND_UNSPECIFIED: _ClassVar[UpdateKind]
    UPDATE_KIND_GRADIENT: _ClassVar[UpdateKind]
    UPDATE_KIND_DELTA: _ClassVar[UpdateKind]

class AggregationMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    AGGREGATION_MODE_UNSPECIFIED: _ClassVar[AggregationMode]
    AGGREGATION_MODE_SYNC: _ClassVar[AggregationMode]
    AGGREGATION_MODE_ASYNC: _ClassVar[AggregationMode]

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_DONE: _ClassVar[TaskKind]

class UpdateDisposition(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    UPDATE_DISPOSITION_UNSPECIFIED: _ClassVar[UpdateDisposition]
    UPDATE_DISPOSITION_PENDING: _ClassVar[UpdateDisposition]
    UPDATE_DISPOSITION_APPLIED: _ClassVar[UpdateDisposition]
    UPDATE_DISPOSITION_BUFFERED: _ClassVar[UpdateDisposition]

class FederationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEDERATION_STATE_UNSPECIFIED: _ClassVar[FederationState]
    FEDERATION_STATE_WAITING_FOR_TRAINERS: _ClassVar[FederationState]
    FEDERATION_STATE_TRAINING: _ClassVar[FederationState]
    FEDERATION_STATE_AGGREGATING: _ClassVar[FederationState]
    FEDERATION_STATE_EVALUATING: _ClassVar[FederationState]
    FEDERATION_STATE_DONE: _ClassVar[FederationState]
    FEDERATION_STATE_FAILED: _ClassVar[FederationState]

class TrainerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINER_STATE_UNSPECIFIED: _ClassVar[TrainerState]
    TRAINER_STATE_ACTIVE: _ClassVar[TrainerState]
    TRAINER_STATE_IDLE: _ClassVar[TrainerState]
    TRAINER_STATE_LOST: _ClassVar[TrainerState]
    TRAINER_STATE_LEFT: _ClassVar[TrainerState]

class RoundState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_STATE_UNSPECIFIED: _ClassVar[RoundState]
    ROUND_STATE_RUNNING: _ClassVar[RoundState]
    ROUND_STATE_COMPLETED: _ClassVar[RoundState]
    ROUND_STATE_FAILED: _ClassVar[RoundState]

class RoundFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUND_FAILURE_UNSPECIFIED: _ClassVar[RoundFailure]
    ROUND_FAILURE_DEADLINE: _ClassVar[RoundFailure]
    ROUND_FAILURE_TRAINERS_LOST: _ClassVar[RoundFailure]
    ROUND_FAILURE_AGGREGATION_FAILED: _ClassVar[RoundFailure]
    ROUND_FAILURE_AGGREGATE_REFUSED: _ClassVar[RoundFailure]

class TrainerPhase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRAINER_PHASE_UNSPECIFIED: _ClassVar[TrainerPhase]
    TRAINER_PHASE_BOOTSTRAPPING: _ClassVar[TrainerPhase]
    TRAINER_PHASE_JOINING: _ClassVar[TrainerPhase]
    TRAINER_PHASE_TRAINING: _ClassVar[TrainerPhase]
    TRAINER_PHASE_EVALUATING: _ClassVar[TrainerPhase]
    TRAINER_PHASE_WAITING: _ClassVar[TrainerPhase]
    TRAINER_PHASE_DONE: _ClassVar[TrainerPhase]
    TRAINER_PHASE_FAILED: _ClassVar[TrainerPhase]
UPDATE_KIND_UNSPECIFIED: UpdateKind
UPDATE_KIND_GRADIENT: UpdateKind
UPDATE_KIND_DELTA: UpdateKind
AGGREGATION_MODE_UNSPECIFIED: AggregationMode
AGGREGATION_MODE_SYNC: AggregationMode
AGGREGATION_MODE_ASYNC: AggregationMode
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_DONE: TaskKind
UPDATE_DISPOSITION_UNSPECIFIED: UpdateDisposition
UPDATE_DISPOSITION_PENDING: UpdateDisposition
UPDATE_DISPOSITION_APPLIED: UpdateDisposition
UPDATE_DISPOSITION_BUFFERED: UpdateDisposition
FEDERATION_STATE_UNSPECIFIED: FederationState
FEDERATION_STATE_WAITING_FOR_TRAINERS: FederationState
FEDERATION_STATE_TRAINING: FederationState
FEDERATION_STATE_AGGREGATING: FederationState
FEDERATION_STATE_EVALUATING: FederationState
FEDERATION_STATE_DONE: FederationState
FEDERATION_STATE_FAILED: FederationState
TRAINER_STATE_UNSPECIFIED: TrainerState
TRAINER_STATE_ACTIVE: TrainerState
TRAINER_STATE_IDLE: TrainerState
TRAINER_STATE_LOST: TrainerState
TRAINER_STATE_LEFT: TrainerState
ROUND_STATE_UNSPECIFIED: RoundState
ROUND_STATE_RUNNING: RoundState
ROUND_STATE_COMPLETED: RoundState
ROUND_STATE_FAILED: RoundState
ROUND_FAILURE_UNSPECIFIED: RoundFailure
ROUND_FAILURE_DEADLINE: RoundFailure
ROUND_FAILURE_TRAINERS_LOST: RoundFailure
ROUND_FAILURE_AGGREGATION_FAILED: RoundFailure
ROUND_FAILURE_AGGREGATE_REFUSED: RoundFailure
TRAINER_PHASE_UNSPECIFIED: TrainerPhase
TRAINER_PHASE_BOOTSTRAPPING: TrainerPhase
TRAINER_PHASE_JOINING: TrainerPhase
TRAINER_PHASE_TRAINING: TrainerPhase
TRAINER_PHASE_EVALUATING: TrainerPhase
TRAINER_PHASE_WAITING: TrainerPhase
TRAINER_PHASE_DONE: TrainerPhase
TRAINER_PHASE_FAILED: TrainerPhase

class JoinRequest(_message.Message):
    __slots__ = ("label", "plan_sha256", "model_spec", "num_examples")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    MODEL_SPEC_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    label: str
    plan_sha256: str
    model_spec: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    num_examples: int
    def __init__(self, label: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., model_spec: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., num_examples: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("trainer_id", "session_id", "plan_sha256", "total_rounds", "mode")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    session_id: str
    plan_sha256: str
    total_rounds: int
    mode: AggregationMode
    def __init__(self, trainer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., total_rounds: _Optional[int] = ..., mode: _Optional[_Union[AggregationMode, str]] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("session_id", "max_wait")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_wait: _duration_pb2.Duration
    def __init__(self, session_id: _Optional[str] = ..., max_wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class PrivacyConfig(_message.Message):
    __slots__ = ("clip_norm", "noise_multiplier")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    noise_multiplier: float
    def __init__(self, clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ...) -> None: ...

class TrainParams(_message.Message):
    __slots__ = ("update_kind", "local_epochs", "proximal_mu", "update_encoding", "privacy", "seed", "max_staleness")
    UPDATE_KIND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    update_kind: UpdateKind
    local_epochs: int
    proximal_mu: float
    update_encoding: _tensor_pb2.Encoding
    privacy: PrivacyConfig
    seed: int
    max_staleness: int
    def __init__(self, update_kind: _Optional[_Union[UpdateKind, str]] = ..., local_epochs: _Optional[int] = ..., proximal_mu: _Optional[float] = ..., update_encoding: _Optional[_Union[_tensor_pb2.Encoding, str]] = ..., privacy: _Optional[_Union[PrivacyConfig, _Mapping]] = ..., seed: _Optional[int] = ..., max_staleness: _Optional[int] = ...) -> None: ...

class EvaluateParams(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "round", "model_version", "keep_alive_interval", "message", "train", "evaluate", "privacy")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEEP_ALIVE_INTERVAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    round: int
    model_version: int
    keep_alive_interval: _duration_pb2.Duration
    message: str
    train: TrainParams
    evaluate: EvaluateParams
    privacy: PrivacyStatus
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., keep_alive_interval: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., message: _Optional[str] = ..., train: _Optional[_Union[TrainParams, _Mapping]] = ..., evaluate: _Optional[_Union[EvaluateParams, _Mapping]] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class KeepAliveRequest(_message.Message):
    __slots__ = ("session_id", "task_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ...) -> None: ...

class KeepAliveResponse(_message.Message):
    __slots__ = ("task_current",)
    TASK_CURRENT_FIELD_NUMBER: _ClassVar[int]
    task_current: bool
    def __init__(self, task_current: _Optional[bool] = ...) -> None: ...

class DownloadModelRequest(_message.Message):
    __slots__ = ("session_id", "model_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_version: int
    def __init__(self, session_id: _Optional[str] = ..., model_version: _Optional[int] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("round", "model_version", "plan_sha256", "tensors")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    round: int
    model_version: int
    plan_sha256: str
    tensors: _tensor_pb2.TensorStreamHeader
    def __init__(self, round: _Optional[int] = ..., model_version: _Optional[int] = ..., plan_sha256: _Optional[str] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorStreamHeader, _Mapping]] = ...) -> None: ...

class DownloadModelResponse(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    chunk: _tensor_pb2.TensorChunk
    trailer: _tensor_pb2.TensorStreamTrailer
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[_tensor_pb2.TensorStreamTrailer, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("session_id", "task_id", "round", "base_model_version", "kind", "num_examples", "nonce", "train_loss", "train_accuracy", "tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    round: int
    base_model_version: int
    kind: UpdateKind
    num_examples: int
    nonce: bytes
    train_loss: float
    train_accuracy: float
    tensors: _tensor_pb2.TensorStreamHeader
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., base_model_version: _Optional[int] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., num_examples: _Optional[int] = ..., nonce: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorStreamHeader, _Mapping]] = ...) -> None: ...

class UploadUpdateRequest(_message.Message):
    __slots__ = ("header", "chunk", "trailer")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    TRAILER_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    chunk: _tensor_pb2.TensorChunk
    trailer: _tensor_pb2.TensorStreamTrailer
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., chunk: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ..., trailer: _Optional[_Union[_tensor_pb2.TensorStreamTrailer, _Mapping]] = ...) -> None: ...

class UploadUpdateResponse(_message.Message):
    __slots__ = ("disposition", "round", "base_model_version", "model_version", "staleness")
    DISPOSITION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    disposition: UpdateDisposition
    round: int
    base_model_version: int
    model_version: int
    staleness: int
    def __init__(self, disposition: _Optional[_Union[UpdateDisposition, str]] = ..., round: _Optional[int] = ..., base_model_version: _Optional[int] = ..., model_version: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("session_id", "task_id", "round", "model_version", "num_examples", "loss", "accuracy")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    round: int
    model_version: int
    num_examples: int
    loss: float
    accuracy: float
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ...) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: EvaluationReport
    def __init__(self, report: _Optional[_Union[EvaluationReport, _Mapping]] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerStatus(_message.Message):
    __slots__ = ("trainer_id", "label", "party", "mrenclave", "state", "last_seen", "updates_accepted", "updates_refused", "num_examples", "simulated")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    PARTY_FIELD_NUMBER: _ClassVar[int]
    MRENCLAVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SIMULATED_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    label: str
    party: str
    mrenclave: str
    state: TrainerState
    last_seen: _timestamp_pb2.Timestamp
    updates_accepted: int
    updates_refused: int
    num_examples: int
    simulated: bool
    def __init__(self, trainer_id: _Optional[str] = ..., label: _Optional[str] = ..., party: _Optional[str] = ..., mrenclave: _Optional[str] = ..., state: _Optional[_Union[TrainerState, str]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., updates_accepted: _Optional[int] = ..., updates_refused: _Optional[int] = ..., num_examples: _Optional[int] = ..., simulated: _Optional[bool] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "attempt", "state", "updates", "model_version", "train_loss", "eval_loss", "eval_accuracy", "eval_examples", "duration", "failure", "failure_message", "staleness", "dp_epsilon")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    DP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    state: RoundState
    updates: int
    model_version: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    eval_examples: int
    duration: _duration_pb2.Duration
    failure: RoundFailure
    failure_message: str
    staleness: _containers.RepeatedScalarFieldContainer[int]
    dp_epsilon: float
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., state: _Optional[_Union[RoundState, str]] = ..., updates: _Optional[int] = ..., model_version: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., eval_examples: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., failure: _Optional[_Union[RoundFailure, str]] = ..., failure_message: _Optional[str] = ..., staleness: _Optional[_Iterable[int]] = ..., dp_epsilon: _Optional[float] = ...) -> None: ...

class PrivacyStatus(_message.Message):
    __slots__ = ("mode", "epsilon", "delta", "epsilon_rdp", "epsilon_pld", "rounds_accounted", "max_epsilon", "clip_norm", "stop_reason", "noise_multiplier", "relation")
    MODE_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    EPSILON_RDP_FIELD_NUMBER: _ClassVar[int]
    EPSILON_PLD_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_ACCOUNTED_FIELD_NUMBER: _ClassVar[int]
    MAX_EPSILON_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    RELATION_FIELD_NUMBER: _ClassVar[int]
    mode: str
    epsilon: float
    delta: float
    epsilon_rdp: float
    epsilon_pld: float
    rounds_accounted: int
    max_epsilon: float
    clip_norm: float
    stop_reason: str
    noise_multiplier: float
    relation: str
    def __init__(self, mode: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., epsilon_rdp: _Optional[float] = ..., epsilon_pld: _Optional[float] = ..., rounds_accounted: _Optional[int] = ..., max_epsilon: _Optional[float] = ..., clip_norm: _Optional[float] = ..., stop_reason: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., relation: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation_id", "plan_sha256", "state", "round", "total_rounds", "model_version", "strategy", "model", "trainers", "rounds", "mode", "buffer_size", "failure", "privacy", "stop_reason", "tee_simulated")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TRAINERS_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TEE_SIMULATED_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    plan_sha256: str
    state: FederationState
    round: int
    total_rounds: int
    model_version: int
    strategy: str
    model: str
    trainers: _containers.RepeatedCompositeFieldContainer[TrainerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    mode: AggregationMode
    buffer_size: int
    failure: str
    privacy: PrivacyStatus
    stop_reason: str
    tee_simulated: bool
    def __init__(self, federation_id: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., state: _Optional[_Union[FederationState, str]] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model_version: _Optional[int] = ..., strategy: _Optional[str] = ..., model: _Optional[str] = ..., trainers: _Optional[_Iterable[_Union[TrainerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ..., mode: _Optional[_Union[AggregationMode, str]] = ..., buffer_size: _Optional[int] = ..., failure: _Optional[str] = ..., privacy: _Optional[_Union[PrivacyStatus, _Mapping]] = ..., stop_reason: _Optional[str] = ..., tee_simulated: _Optional[bool] = ...) -> None: ...

class TrainerServiceGetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerServiceGetStatusResponse(_message.Message):
    __slots__ = ("trainer_id", "label", "state", "round", "model_version", "last_train_loss", "last_eval_accuracy", "num_examples", "aggregator_mrenclave", "tee_simulated")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_MRENCLAVE_FIELD_NUMBER: _ClassVar[int]
    TEE_SIMULATED_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    label: str
    state: TrainerPhase
    round: int
    model_version: int
    last_train_loss: float
    last_eval_accuracy: float
    num_examples: int
    aggregator_mrenclave: str
    tee_simulated: bool
    def __init__(self, trainer_id: _Optional[str] = ..., label: _Optional[str] = ..., state: _Optional[_Union[TrainerPhase, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., last_train_loss: _Optional[float] = ..., last_eval_accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ..., aggregator_mrenclave: _Optional[str] = ..., tee_simulated: _Optional[bool] = ...) -> None: ...
