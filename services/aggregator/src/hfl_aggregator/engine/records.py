"""Typed records of the engine's state: phases, tasks, trainers, rounds, status.

Everything Status and the sealed history show is one of these frozen records;
the service turns them into hfl.v1 messages, the checkpoint into JSON
(`RoundRecord.to_json` / `from_json`).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


class Phase(enum.Enum):
    """Where the federation is. Asynchronous federations are TRAINING until done."""

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
class TrainParams:
    """Everything a trainer needs to run one TRAIN task; decided by the engine alone."""

    update_kind: str  # "gradient" or "delta"
    local_epochs: int
    batch_size: int
    learning_rate: float
    proximal_mu: float
    encoding: str
    clip_norm: float
    noise_multiplier: float
    seed: int
    # Asynchronous mode: the model version the trainer must start from, and how
    # many versions newer the global model may get before the update is refused.
    max_staleness: int = 0


@dataclass(frozen=True)
class Task:
    task_id: str
    kind: TaskKind
    round: int
    model_version: int
    # Unix seconds by which the task's result must arrive (0: none).
    deadline: float = 0.0
    # How often a trainer working on the task must show it is alive (KeepAlive).
    heartbeat_seconds: float = 0.0
    message: str = ""
    train: TrainParams | None = None
    # DONE tasks: True when the federation failed rather than finished.
    failed: bool = False
    # DONE tasks under differential privacy: what the final model spent.
    privacy: PrivacyView | None = None


class TrainerState(enum.Enum):
    ACTIVE = "active"  # sampled for the running round, or training (async)
    IDLE = "idle"
    LOST = "lost"  # not heard from within the liveness window
    LEFT = "left"


@dataclass(frozen=True)
class TrainerView:
    trainer_id: str
    party: str
    label: str
    mrenclave: str
    state: TrainerState
    last_seen: float
    updates_accepted: int
    updates_refused: int
    num_examples: int


class RoundState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"


class FailureReason(enum.Enum):
    """Why a round attempt failed: a bounded label for metrics and Status."""

    DEADLINE = "deadline"  # the deadline passed with too few updates
    TRAINERS_LOST = "trainers_lost"  # sampled trainers vanished; too few left to succeed
    AGGREGATION_FAILED = "aggregation_failed"  # the strategy raised
    AGGREGATE_REFUSED = "aggregate_refused"  # the result was not finite or over the bound


@dataclass(frozen=True)
class RoundRecord:
    """One round attempt (synchronous) or one applied buffer (asynchronous)."""

    round: int
    attempt: int
    state: RoundState
    updates: int
    model_version: int
    duration_seconds: float = 0.0
    aggregation_seconds: float = 0.0
    train_loss: float = math.nan
    eval_loss: float = math.nan
    eval_accuracy: float = math.nan
    eval_examples: int = 0
    failure: FailureReason | None = None
    failure_message: str = ""
    # Asynchronous mode: the staleness of each update applied in this version.
    staleness: tuple[int, ...] = field(default=())
    # Differential privacy (PrivateStrategy.round_record): epsilon spent after this
    # round at dp_delta, the clip norm and noise stddev it ran with, and the clip
    # norm adaptive clipping chose for the next round. NaN without DP.
    dp_epsilon: float = math.nan
    dp_delta: float = math.nan
    dp_clip_norm: float = math.nan
    dp_noise_stddev: float = math.nan
    dp_next_clip_norm: float = math.nan

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["state"] = self.state.value
        out["failure"] = self.failure.value if self.failure is not None else ""
        out["staleness"] = list(self.staleness)
        # JSON has no NaN: absent values are left out.
        return {k: v for k, v in out.items() if not (isinstance(v, float) and math.isnan(v))}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RoundRecord:
        values = dict(data)
        values["state"] = RoundState(values["state"])
        failure = values.pop("failure", "")
        values["failure"] = FailureReason(failure) if failure else None
        values["staleness"] = tuple(values.get("staleness", ()))
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass(frozen=True)
class PrivacyView:
    """The privacy part of Status (PrivateStrategy.status()): what has been spent so far."""

    mode: str  # "central" or "client"
    epsilon: float
    delta: float
    epsilon_rdp: float
    epsilon_pld: float  # NaN where dp-accounting's PLD accountant does not apply
    rounds: int  # rounds accounted
    max_epsilon: float  # the plan's budget (0: none)
    noise_multiplier: float  # the accounted (effective) noise multiplier
    clip_norm: float  # the clip norm in force for the next round
    relation: str  # neighbouring relation epsilon is stated under
    # Why the federation stopped before its last round (the budget), "" if it did not.
    stop_reason: str = ""

    @classmethod
    def from_status(cls, status: Mapping[str, Any], stop_reason: str = "") -> PrivacyView:
        return cls(
            mode=str(status["mode"]),
            epsilon=float(status["epsilon"]),
            delta=float(status["delta"]),
            epsilon_rdp=float(status["epsilon_rdp"]),
            epsilon_pld=float(status["epsilon_pld"]),
            rounds=int(status["rounds"]),
            max_epsilon=float(status["max_epsilon"]),
            noise_multiplier=float(status["noise_multiplier"]),
            clip_norm=float(status["clip_norm"]),
            relation=str(status["relation"]),
            stop_reason=stop_reason,
        )


@dataclass(frozen=True)
class Snapshot:
    """Everything Status shows, read under the engine lock in one go."""

    phase: Phase
    mode: str  # "sync" or "async"
    buffer_size: int
    round: int
    total_rounds: int
    model_version: int
    trainers: tuple[TrainerView, ...]
    rounds: tuple[RoundRecord, ...]
    failure: str
    model_versions_per_second: float = 0.0
    # Why the federation ended before its last round (the privacy budget), "" if not.
    stop_reason: str = ""
    # Differential privacy spent so far; None without DP.
    privacy: PrivacyView | None = None
