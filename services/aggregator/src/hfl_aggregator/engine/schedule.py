"""When updates are aggregated: synchronous rounds or an asynchronous buffer.

A synchronous round samples parties, gives each sampled trainer one TRAIN task,
collects at most one update per sampled trainer, and closes when every
sampled trainer answered, when the live ones all did (the others were lost),
or at the deadline with at least `min_updates`.

Asynchronous mode has no rounds: every live trainer always has a TRAIN task on
the current model; accepted updates go into a buffer of `buffer_size`, each
scaled by its staleness weight s(tau) (`staleness_weight`), and a full buffer is
applied as one new model version: w + server_lr * sum(n_i s_i d_i) / sum(n_i)
for the FedAvg family (FedBuff, Nguyen et al. 2022; with buffer_size 1 the
asynchronous parameter server, FedAsync-style staleness scaling).
"""

from __future__ import annotations

import hashlib
import math
import random
import threading
from dataclasses import dataclass, field

from hfl_aggregator.collect import RoundCollector
from hfl_aggregator.engine.admission import SyncRoundView, UpdateMeta
from hfl_common.config import AsyncPlan


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
    # Accepted updates being folded into `collector` outside the engine lock (one at a
    # time, under fold_lock); the round is not aggregated or closed while any is.
    folding: int = 0
    fold_lock: threading.Lock = field(default_factory=threading.Lock)
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


def staleness_weight(tau: int, plan: AsyncPlan) -> float:
    """s(tau): constant 1; polynomial (1 + tau)^-a; hinge 1 up to b, then 1/(a(tau - b) + 1)."""
    if plan.staleness == "constant":
        return 1.0
    if plan.staleness == "polynomial":
        return float((1.0 + tau) ** -plan.exponent)
    if tau <= plan.hinge_b:
        return 1.0
    return 1.0 / (plan.hinge_a * (tau - plan.hinge_b) + 1.0)


@dataclass(frozen=True)
class AsyncTask:
    task_id: str
    base_version: int
    seed: int


@dataclass
class AsyncBuffer:
    """Updates waiting to become the next model version, in fold (= journal) order."""

    collector: RoundCollector
    started: float
    first_seq: int
    trainers: list[str] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    losses: list[tuple[int, float]] = field(default_factory=list)
    last_seq: int = -1
    # Set once applied: the version it became (0: its application failed).
    applied_version: int = 0
    done: bool = False

    @property
    def count(self) -> int:
        return len(self.trainers)


@dataclass
class AsyncEval:
    """Federated evaluation of one model version, run beside training."""

    version: int
    weights: dict[str, object]
    selected: list[str]
    deadline: float
    final: bool
    evals: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    lost: set[str] = field(default_factory=set)

    @property
    def task_id(self) -> str:
        return f"v{self.version}.evaluate"

    def waiting_for(self) -> list[str]:
        return [t for t in self.selected if t not in self.evals and t not in self.lost]
