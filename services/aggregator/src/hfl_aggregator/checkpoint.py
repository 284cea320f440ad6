"""Sealed checkpoints of the global model, the round state and the strategy state.

One file, `checkpoint.sealed`, replaced atomically after every completed
round: an .npz (no pickles) of the weights, the strategy's optimizer moments
and a JSON metadata record, sealed with AES-GCM under the enclave's sealing
key (see hfl_common.sealing). A checkpoint made under another federation plan
is refused rather than silently resumed.
"""

from __future__ import annotations

import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfl_common.errors import ConfigError
from hfl_common.sealing import SealingKeySource, read_sealed, write_sealed

log = logging.getLogger(__name__)

_PURPOSE = "hfl-aggregator-checkpoint-v1"
_FILE = "checkpoint.sealed"


@dataclass(frozen=True)
class Checkpoint:
    plan_sha256: str
    model_version: int
    completed_rounds: int
    weights: dict[str, np.ndarray]
    strategy_state: dict[str, np.ndarray]
    history: list[dict[str, Any]] = field(default_factory=list)
    # What the aggregation schedule needs to resume (async: the journal watermark).
    schedule_state: dict[str, Any] = field(default_factory=dict)


class CheckpointStore:
    def __init__(self, directory: Path, keys: SealingKeySource) -> None:
        self.path = directory / _FILE
        self._keys = keys

    def save(self, ckpt: Checkpoint) -> None:
        meta = {
            "plan_sha256": ckpt.plan_sha256,
            "model_version": ckpt.model_version,
            "completed_rounds": ckpt.completed_rounds,
            "history": ckpt.history,
            "schedule_state": ckpt.schedule_state,
            "weights": list(ckpt.weights),
            "strategy_state": list(ckpt.strategy_state),
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        }
        for i, arr in enumerate(ckpt.weights.values()):
            arrays[f"w{i}"] = arr
        for i, arr in enumerate(ckpt.strategy_state.values()):
            arrays[f"s{i}"] = arr
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        write_sealed(self._keys, _PURPOSE, self.path, buf.getvalue())
        log.info(
            "sealed checkpoint written: round %d, model version %d",
            ckpt.completed_rounds,
            ckpt.model_version,
        )

    def load(self, plan_sha256: str) -> Checkpoint | None:
        if not self.path.exists():
            return None
        data = read_sealed(self._keys, _PURPOSE, self.path)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta = json.loads(npz["meta"].tobytes().decode())
            weights = {name: npz[f"w{i}"] for i, name in enumerate(meta["weights"])}
            state = {name: npz[f"s{i}"] for i, name in enumerate(meta["strategy_state"])}
        if meta["plan_sha256"] != plan_sha256:
            raise ConfigError(
                f"checkpoint {self.path} belongs to plan {meta['plan_sha256'][:16]}…, "
                f"not to this plan {plan_sha256[:16]}…; move it away to start a new federation"
            )
        return Checkpoint(
            plan_sha256=meta["plan_sha256"],
            model_version=int(meta["model_version"]),
            completed_rounds=int(meta["completed_rounds"]),
            weights=weights,
            strategy_state=state,
            history=list(meta["history"]),
            schedule_state=dict(meta.get("schedule_state", {})),
        )
