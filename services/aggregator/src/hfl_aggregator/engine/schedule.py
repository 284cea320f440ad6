"""When updates are aggregated: synchronous rounds (and their sampling and seeds).

A synchronous round samples parties, gives each sampled trainer one TRAIN task,
collects at most one update per sampled trainer, and closes when every
sampled trainer answered, when the live ones all did (the others were lost),
or at the deadline with at least `min_updates`.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass, field

from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.engine.admission import SyncRoundView, UpdateMeta


def derive_seed(plan_seed: int, *parts: object) -> int:
    """A 63-bit seed for (plan seed, parts): distinct inputs give unrelated seeds.

    (A linear formula such as seed * K + round * 101 + attempt repeats after
    101 attempts; a hash does not.)
    """
    text = ":".join(str(p) for p in (plan_seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") >> 1


def sample(
    parties: dict[str, list[str]], fraction: float, min_updates: int, seed: int, *key: object
) -> list[str]:
    """Sample ceil(fraction * parties) parties (at least min_updates), one trainer each."""
    rng = random.Random(derive_seed(seed, "sample", *key))
    units = sorted(parties)
    count = min(len(units), max(min_updates, math.ceil(fraction * len(units))))
    chosen = sorted(rng.sample(units, count))
    return sorted(rng.choice(sorted(parties[p])) for p in chosen)


@dataclass
class SyncRound:
    round: int
    attempt: int
    base_version: int
    selected: list[str]
    started: float
    deadline: float
    collector: RoundCollector
    received: dict[str, UpdateMeta] = field(default_factory=dict)
    nonces: set[bytes] = field(default_factory=set)
    lost: set[str] = field(default_factory=set)
    # Evaluation of the model this round produced.
    eval_version: int = -1
    eval_selected: list[str] = field(default_factory=list)
    eval_deadline: float = 0.0
    evals: dict[str, tuple[int, float, float]] = field(default_factory=dict)

    @property
    def task_id(self) -> str:
        return f"{self.round}.{self.attempt}.train"

    @property
    def waiting_for(self) -> list[str]:
        """Sampled trainers that are neither done nor lost."""
        return [t for t in self.selected if t not in self.received and t not in self.lost]

    def view(self) -> SyncRoundView:
        return SyncRoundView(
            round=self.round,
            attempt=self.attempt,
            base_version=self.base_version,
            task_id=self.task_id,
            selected=frozenset(self.selected),
            received=frozenset(self.received),
            nonces=frozenset(self.nonces),
        )
