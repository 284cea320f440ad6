"""The trainer registry: who joined, their sessions, and whether they are alive.

A session is bound to the identity of the certificate that opened it (its
``hfl://id/`` SAN, which a renewed certificate of the same trainer keeps): a
call that presents another trainer's session is refused PERMISSION_DENIED.

Liveness: every call a trainer makes (GetTask, DownloadModel, UploadUpdate,
KeepAlive while it trains) refreshes `last_seen`; a trainer not heard from for
`liveness_seconds` is LOST: it is not sampled, and a round it was sampled for
goes on without it.

The unit of votes is the *party* (`party_of`): at most `max_trainers_per_party`
trainers of one party may be active at once, sampling picks parties (then one
trainer of each), and `min_trainers` counts parties. So a party cannot weigh
more than one vote in a round whatever the number of enclaves it runs, which is
what robust strategies (median, trimmed mean, Krum) assume of their inputs.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass

from hfl_common.errors import (
    FailedPreconditionError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
)

log = logging.getLogger(__name__)


@dataclass
class TrainerRecord:
    trainer_id: str
    party: str
    label: str
    mrenclave: str
    session_id: str
    num_examples: int
    last_seen: float
    left: bool = False
    updates_accepted: int = 0
    updates_refused: int = 0


class TrainerRegistry:
    """Sessions and liveness. Not thread-safe: the engine calls it under its lock."""

    def __init__(self, liveness_seconds: float, max_trainers_per_party: int) -> None:
        self.liveness_seconds = liveness_seconds
        self.max_per_party = max_trainers_per_party
        self._trainers: dict[str, TrainerRecord] = {}
        self._sessions: dict[str, str] = {}

    def join(
        self,
        trainer_id: str,
        party: str,
        label: str,
        mrenclave: str,
        num_examples: int,
        now: float,
    ) -> TrainerRecord:
        """Open a new session for `trainer_id` (a rejoin replaces its old session)."""
        busy = [
            t.trainer_id
            for t in self._trainers.values()
            if t.party == party and t.trainer_id != trainer_id and self.is_live(t, now)
        ]
        if len(busy) >= self.max_per_party:
            raise ResourceExhaustedError(
                f"party {party!r} already has {len(busy)} active trainer(s) "
                f"({', '.join(sorted(busy))}); the plan allows {self.max_per_party} per party. "
                "Stop one of them, or raise federation.max_trainers_per_party",
                "party_limit",
            )
        record = self._trainers.get(trainer_id)
        session = secrets.token_hex(16)
        if record is not None:
            self._sessions.pop(record.session_id, None)
            record.session_id = session
            record.label = label
            record.mrenclave = mrenclave
            record.num_examples = num_examples
            record.last_seen = now
            record.left = False
            log.info("trainer %s (%s) rejoined", trainer_id, label)
        else:
            record = TrainerRecord(trainer_id, party, label, mrenclave, session, num_examples, now)
            self._trainers[trainer_id] = record
            log.info("trainer %s (%s, party %s) joined", trainer_id, label, party)
        self._sessions[session] = trainer_id
        return record

    def touch(self, session_id: str, caller: str, now: float) -> TrainerRecord:
        """The record behind `session_id`, checked against the caller; marks it alive."""
        trainer_id = self._sessions.get(session_id)
        if trainer_id is None:
            raise NotFoundError(
                "unknown session: the aggregator may have restarted; join again",
                "unknown_session",
            )
        if trainer_id != caller:
            raise PermissionDeniedError(
                f"this session belongs to trainer {trainer_id}, not to the caller {caller}: "
                "a session is usable only with the certificate identity that opened it",
                "session_not_yours",
            )
        record = self._trainers[trainer_id]
        if record.left:
            raise FailedPreconditionError(
                f"trainer {trainer_id} left the federation; join again", "left"
            )
        record.last_seen = now
        return record

    def get(self, trainer_id: str) -> TrainerRecord | None:
        return self._trainers.get(trainer_id)

    def leave(self, record: TrainerRecord) -> None:
        record.left = True
        self._sessions.pop(record.session_id, None)
        log.info("trainer %s (%s) left", record.trainer_id, record.label)

    def is_live(self, record: TrainerRecord, now: float) -> bool:
        return not record.left and now - record.last_seen <= self.liveness_seconds

    def active(self, now: float) -> list[TrainerRecord]:
        """Live trainers, by id."""
        return sorted(
            (t for t in self._trainers.values() if self.is_live(t, now)),
            key=lambda t: t.trainer_id,
        )

    def active_parties(self, now: float) -> dict[str, list[str]]:
        """Live trainers by party: the voting units that may take part now."""
        parties: dict[str, list[str]] = {}
        for t in self.active(now):
            parties.setdefault(t.party, []).append(t.trainer_id)
        return parties

    def records(self) -> list[TrainerRecord]:
        return list(self._trainers.values())
