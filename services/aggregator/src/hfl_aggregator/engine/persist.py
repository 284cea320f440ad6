"""Sealed checkpoints written outside the engine lock.

The engine takes a consistent `Checkpoint` under its lock (references to
arrays that are replaced, never modified in place) and a sequence number; the
writer seals it after the lock is released, so trainers' calls never wait on
disk. Writes are serialised and a checkpoint older than the one on disk is
skipped: the file only moves forward. Each write is atomic (write_sealed
replaces the file), so a crash leaves the previous or the new checkpoint.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from hfl_aggregator.checkpoint import Checkpoint, CheckpointStore
from hfl_aggregator.metrics import AggregatorMetrics

log = logging.getLogger(__name__)


class CheckpointWriter:
    def __init__(
        self,
        store: CheckpointStore | None,
        metrics: AggregatorMetrics,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._metrics = metrics
        self._clock = clock
        self._lock = threading.Lock()
        self._written = 0

    @property
    def enabled(self) -> bool:
        return self._store is not None

    def load(self, plan_sha256: str) -> Checkpoint | None:
        return self._store.load(plan_sha256) if self._store is not None else None

    def write(self, seq: int, ckpt: Checkpoint) -> bool:
        """Seal checkpoint number `seq` unless a newer one is already on disk."""
        if self._store is None:
            return False
        with self._lock:
            if seq <= self._written:
                return False
            try:
                self._store.save(ckpt)
            except OSError:
                self._metrics.checkpoint_writes.labels(result="error").inc()
                log.exception("writing the sealed checkpoint failed")
                return False
            self._written = seq
        self._metrics.checkpoint_writes.labels(result="ok").inc()
        self._metrics.last_checkpoint.set(self._clock())
        return True
