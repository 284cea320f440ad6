"""The aggregator's federation logic in named parts (see engine.py for the map)."""

from hfl_aggregator.engine.admission import Ticket, UpdateMeta
from hfl_aggregator.engine.engine import Accepted, RoundEngine
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
from hfl_common.server import party_of

__all__ = [
    "Accepted",
    "FailureReason",
    "Phase",
    "PrivacyView",
    "RoundEngine",
    "RoundRecord",
    "RoundState",
    "Snapshot",
    "Task",
    "TaskKind",
    "Ticket",
    "TrainParams",
    "TrainerState",
    "TrainerView",
    "UpdateMeta",
    "party_of",
]
