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

class TaskKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_KIND_UNSPECIFIED: _ClassVar[TaskKind]
    TASK_KIND_TRAIN: _ClassVar[TaskKind]
    TASK_KIND_EVALUATE: _ClassVar[TaskKind]
    TASK_KIND_WAIT: _ClassVar[TaskKind]
    TASK_KIND_DONE: _ClassVar[TaskKind]
UPDATE_KIND_UNSPECIFIED: UpdateKind
UPDATE_KIND_GRADIENT: UpdateKind
UPDATE_KIND_DELTA: UpdateKind
TASK_KIND_UNSPECIFIED: TaskKind
TASK_KIND_TRAIN: TaskKind
TASK_KIND_EVALUATE: TaskKind
TASK_KIND_WAIT: TaskKind
TASK_KIND_DONE: TaskKind

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
    __slots__ = ("trainer_id", "session_id", "plan_sha256", "total_rounds")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PLAN_SHA256_FIELD_NUMBER: _ClassVar[int]
    TOTAL_ROUNDS_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    session_id: str
    plan_sha256: str
    total_rounds: int
    def __init__(self, trainer_id: _Optional[str] = ..., session_id: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., total_rounds: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("session_id", "last_task_id", "wait_seconds")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    last_task_id: str
    wait_seconds: int
    def __init__(self, session_id: _Optional[str] = ..., last_task_id: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class PrivacyConfig(_message.Message):
    __slots__ = ("clip_norm", "noise_multiplier")
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    clip_norm: float
    noise_multiplier: float
    def __init__(self, clip_norm: _Optional[float] = ..., noise_multiplier: _Optional[float] = ...) -> None: ...

class GetTaskResponse(_message.Message):
    __slots__ = ("task",)
    TASK_FIELD_NUMBER: _ClassVar[int]
    task: Task
    def __init__(self, task: _Optional[_Union[Task, _Mapping]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "kind", "round", "model_version", "update_kind", "local_epochs", "local_steps", "batch_size", "learning_rate", "proximal_mu", "update_encoding", "privacy", "deadline_unix_ms", "seed", "message")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATE_KIND_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    UPDATE_ENCODING_FIELD_NUMBER: _ClassVar[int]
    PRIVACY_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    kind: TaskKind
    round: int
    model_version: int
    update_kind: UpdateKind
    local_epochs: int
    local_steps: int
    batch_size: int
    learning_rate: float
    proximal_mu: float
    update_encoding: _tensor_pb2.Encoding
    privacy: PrivacyConfig
    deadline_unix_ms: int
    seed: int
    message: str
    def __init__(self, task_id: _Optional[str] = ..., kind: _Optional[_Union[TaskKind, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., update_kind: _Optional[_Union[UpdateKind, str]] = ..., local_epochs: _Optional[int] = ..., local_steps: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., proximal_mu: _Optional[float] = ..., update_encoding: _Optional[_Union[_tensor_pb2.Encoding, str]] = ..., privacy: _Optional[_Union[PrivacyConfig, _Mapping]] = ..., deadline_unix_ms: _Optional[int] = ..., seed: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("session_id", "task_id", "round", "base_model_version", "kind", "step", "num_examples", "nonce", "train_loss", "train_accuracy", "tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
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
    step: int
    num_examples: int
    nonce: bytes
    train_loss: float
    train_accuracy: float
    tensors: _tensor_pb2.TensorStreamHeader
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., base_model_version: _Optional[int] = ..., kind: _Optional[_Union[UpdateKind, str]] = ..., step: _Optional[int] = ..., num_examples: _Optional[int] = ..., nonce: _Optional[bytes] = ..., train_loss: _Optional[float] = ..., train_accuracy: _Optional[float] = ..., tensors: _Optional[_Union[_tensor_pb2.TensorStreamHeader, _Mapping]] = ...) -> None: ...

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
    __slots__ = ("accepted", "round", "model_version")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    model_version: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ...) -> None: ...

class EvaluationReport(_message.Message):
    __slots__ = ("session_id", "task_id", "round", "model_version", "num_examples", "loss", "accuracy", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    task_id: str
    round: int
    model_version: int
    num_examples: int
    loss: float
    accuracy: float
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, session_id: _Optional[str] = ..., task_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., loss: _Optional[float] = ..., accuracy: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

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
    __slots__ = ("trainer_id", "label", "mrenclave", "state", "last_seen_unix_ms", "updates_accepted", "updates_refused", "num_examples")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    MRENCLAVE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    UPDATES_ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    UPDATES_REFUSED_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    label: str
    mrenclave: str
    state: str
    last_seen_unix_ms: int
    updates_accepted: int
    updates_refused: int
    num_examples: int
    def __init__(self, trainer_id: _Optional[str] = ..., label: _Optional[str] = ..., mrenclave: _Optional[str] = ..., state: _Optional[str] = ..., last_seen_unix_ms: _Optional[int] = ..., updates_accepted: _Optional[int] = ..., updates_refused: _Optional[int] = ..., num_examples: _Optional[int] = ...) -> None: ...

class RoundSummary(_message.Message):
    __slots__ = ("round", "state", "updates", "model_version", "train_loss", "eval_loss", "eval_accuracy", "eval_examples", "duration_seconds", "attempt", "failure_reason")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EVAL_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: str
    updates: int
    model_version: int
    train_loss: float
    eval_loss: float
    eval_accuracy: float
    eval_examples: int
    duration_seconds: float
    attempt: int
    failure_reason: str
    def __init__(self, round: _Optional[int] = ..., state: _Optional[str] = ..., updates: _Optional[int] = ..., model_version: _Optional[int] = ..., train_loss: _Optional[float] = ..., eval_loss: _Optional[float] = ..., eval_accuracy: _Optional[float] = ..., eval_examples: _Optional[int] = ..., duration_seconds: _Optional[float] = ..., attempt: _Optional[int] = ..., failure_reason: _Optional[str] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("federation_id", "plan_sha256", "state", "round", "total_rounds", "model_version", "strategy", "model", "trainers", "rounds")
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
    federation_id: str
    plan_sha256: str
    state: str
    round: int
    total_rounds: int
    model_version: int
    strategy: str
    model: str
    trainers: _containers.RepeatedCompositeFieldContainer[TrainerStatus]
    rounds: _containers.RepeatedCompositeFieldContainer[RoundSummary]
    def __init__(self, federation_id: _Optional[str] = ..., plan_sha256: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., total_rounds: _Optional[int] = ..., model_version: _Optional[int] = ..., strategy: _Optional[str] = ..., model: _Optional[str] = ..., trainers: _Optional[_Iterable[_Union[TrainerStatus, _Mapping]]] = ..., rounds: _Optional[_Iterable[_Union[RoundSummary, _Mapping]]] = ...) -> None: ...

class TrainerServiceGetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TrainerServiceGetStatusResponse(_message.Message):
    __slots__ = ("trainer_id", "label", "state", "round", "model_version", "last_train_loss", "last_eval_accuracy", "num_examples", "aggregator_mrenclave")
    TRAINER_ID_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    LAST_TRAIN_LOSS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVAL_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_MRENCLAVE_FIELD_NUMBER: _ClassVar[int]
    trainer_id: str
    label: str
    state: str
    round: int
    model_version: int
    last_train_loss: float
    last_eval_accuracy: float
    num_examples: int
    aggregator_mrenclave: str
    def __init__(self, trainer_id: _Optional[str] = ..., label: _Optional[str] = ..., state: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., last_train_loss: _Optional[float] = ..., last_eval_accuracy: _Optional[float] = ..., num_examples: _Optional[int] = ..., aggregator_mrenclave: _Optional[str] = ...) -> None: ...
