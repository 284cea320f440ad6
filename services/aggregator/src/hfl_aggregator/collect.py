"""Where a round's accepted updates go until the round is aggregated.

Mean-type strategies (FedAvg family, FedSGD) fold each update into a running
weighted sum as it arrives (`MeanAccumulator`): memory is one model-sized sum
whatever the number of trainers. Strategies that need every update (median,
trimmed mean, Krum) get a `SpillStore`: updates encrypted to disk under a key
held only in memory, read back a tensor at a time.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from hfl_aggregator.accumulate import MeanAccumulator, SpillStore, UpdateSource
from hfl_aggregator.strategies import Strategy


class RoundCollector:
    def __init__(self, store: MeanAccumulator | SpillStore) -> None:
        self._store = store

    @classmethod
    def for_strategy(
        cls, strategy: Strategy, template: Mapping[str, np.ndarray], spill_dir: Path | None = None
    ) -> RoundCollector:
        if strategy.needs_all_updates:
            directory = spill_dir or Path(tempfile.gettempdir())
            directory.mkdir(parents=True, exist_ok=True)
            return cls(SpillStore(template, directory))
        return cls(MeanAccumulator(template))

    def add(self, update: Mapping[str, np.ndarray], weight: float, scale: float = 1.0) -> None:
        """Store one validated update: `weight` is its num_examples, `scale` multiplies its
        values (clip, staleness) without a scaled copy."""
        self._store.add(update, weight, scale)

    def source(self) -> UpdateSource:
        return self._store

    def close(self) -> None:
        if isinstance(self._store, SpillStore):
            self._store.close()
