"""Sealed checkpoints of the global model, the round state and the strategy state.

One file, `checkpoint.sealed`, replaced atomically after every completed round. It is
a sealed stream (hfl_common.sealing.SealedStreamWriter: AES-256-GCM record by record
under the enclave's sealing key, records numbered and the last one marked final, so a
reordered, truncated or extended file is refused): a JSON metadata record (plan hash,
round, history, and the name, dtype and shape of every tensor), then the raw bytes of the
weights and of the strategy's optimizer moments, tensor after tensor. Saving seals
straight from the arrays' memory and loading decrypts straight into freshly allocated
arrays, so neither holds more than one record (1 MiB) beyond the tensors themselves: no
.npz in memory, no copy of the model. The file is written to a temporary name, fsynced,
renamed over the previous checkpoint and the directory fsynced: a crash at any moment
leaves the previous complete checkpoint (stale temporary files are removed at the next
save).

Format 2. Checkpoints of format 1 (a sealed .npz, hfl before this change) are not read:
load() refuses them with a ConfigError that says to move the file away. A checkpoint made
under another federation plan is refused rather than silently resumed.
"""

from __future__ import annotations

import json
import logging
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from hfl_common.errors import ConfigError
from hfl_common.sealing import SealedStreamReader, SealedStreamWriter, SealingKeySource

log = logging.getLogger(__name__)

_PURPOSE = "hfl-aggregator-checkpoint-v2"
_FILE = "checkpoint.sealed"
_FORMAT = 2
_OLD_MAGIC = b"HFLSEAL1"
_META_LEN = struct.Struct(">Q")
# The metadata record is small (names, shapes, history); refuse absurd lengths early.
_MAX_META_BYTES = 64 << 20


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


def _describe(group: str, arrays: Mapping[str, np.ndarray]) -> list[dict[str, Any]]:
    out = []
    for name, arr in arrays.items():
        if arr.dtype.hasobject or arr.dtype.fields is not None:
            raise ConfigError(
                f"cannot checkpoint {group} tensor {name!r} of dtype {arr.dtype}: only plain "
                "numeric arrays are sealed"
            )
        out.append({"group": group, "name": name, "dtype": arr.dtype.str, "shape": arr.shape})
    return out


def _bytes_of(arr: np.ndarray) -> memoryview:
    """The array's bytes in C order, without a copy when it already is contiguous."""
    flat = np.ascontiguousarray(arr).reshape(-1)
    return flat.view(np.uint8).data


class CheckpointStore:
    def __init__(self, directory: Path, keys: SealingKeySource) -> None:
        self.path = directory / _FILE
        self._keys = keys

    def save(self, ckpt: Checkpoint) -> None:
        meta = {
            "format": _FORMAT,
            "plan_sha256": ckpt.plan_sha256,
            "model_version": ckpt.model_version,
            "completed_rounds": ckpt.completed_rounds,
            "history": ckpt.history,
            "schedule_state": ckpt.schedule_state,
            "tensors": _describe("weights", ckpt.weights)
            + _describe("strategy_state", ckpt.strategy_state),
        }
        encoded = json.dumps(meta).encode()
        for stale in self.path.parent.glob(f".{_FILE}.*.tmp"):
            stale.unlink(missing_ok=True)  # left by a crash in the middle of a save
        with SealedStreamWriter(self._keys, _PURPOSE, self.path) as out:
            out.write(_META_LEN.pack(len(encoded)) + encoded)
            for group in (ckpt.weights, ckpt.strategy_state):
                for arr in group.values():
                    out.write(_bytes_of(arr))
        log.info(
            "sealed checkpoint written: round %d, model version %d (%d bytes)",
            ckpt.completed_rounds,
            ckpt.model_version,
            out.bytes_written,
        )

    def load(self, plan_sha256: str) -> Checkpoint | None:
        if not self.path.exists():
            return None
        with self.path.open("rb") as f:
            if f.read(len(_OLD_MAGIC)) == _OLD_MAGIC:
                raise ConfigError(
                    f"checkpoint {self.path} is in format 1 (a sealed .npz, written by an "
                    "older hfl), which this version does not read; move it away to start "
                    "the federation over"
                )
        with SealedStreamReader(self._keys, _PURPOSE, self.path) as reader:
            (length,) = _META_LEN.unpack(reader.read(_META_LEN.size))
            if length > _MAX_META_BYTES:
                raise ConfigError(f"checkpoint {self.path}: metadata of {length} bytes")
            meta = json.loads(reader.read(length).decode())
            if meta.get("format") != _FORMAT:
                raise ConfigError(
                    f"checkpoint {self.path} has format {meta.get('format')!r}; this "
                    f"version reads format {_FORMAT} only"
                )
            if meta["plan_sha256"] != plan_sha256:
                raise ConfigError(
                    f"checkpoint {self.path} belongs to plan {meta['plan_sha256'][:16]}…, "
                    f"not to this plan {plan_sha256[:16]}…; move it away to start a new "
                    "federation"
                )
            groups: dict[str, dict[str, np.ndarray]] = {"weights": {}, "strategy_state": {}}
            for t in meta["tensors"]:
                arr = np.empty(tuple(t["shape"]), dtype=np.dtype(t["dtype"]))
                reader.readinto(arr.reshape(-1).view(np.uint8).data)
                groups[t["group"]][t["name"]] = arr
            reader.finish()
        return Checkpoint(
            plan_sha256=meta["plan_sha256"],
            model_version=int(meta["model_version"]),
            completed_rounds=int(meta["completed_rounds"]),
            weights=groups["weights"],
            strategy_state=groups["strategy_state"],
            history=list(meta["history"]),
            schedule_state=dict(meta.get("schedule_state", {})),
        )
