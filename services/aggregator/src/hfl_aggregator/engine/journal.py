"""The sealed buffer journal of asynchronous mode: accepted updates not yet applied.

An update accepted into an asynchronous buffer is written here (sealed like the
checkpoint, one atomic file per update, numbered by a sequence that follows the
order updates were folded in) before its upload is acknowledged as BUFFERED.
The checkpoint written after a buffer is applied records the sequence number
below which every update is in the model (`watermark`). On start the engine
loads the checkpoint, deletes journal files below its watermark (they were
applied; a crash came before their deletion) and folds the rest back into the
buffer in order, so an acknowledged update is neither lost nor applied twice.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from hfl_common.sealing import SealingKeySource, read_sealed, write_sealed

log = logging.getLogger(__name__)

_PURPOSE = "hfl-aggregator-journal-v1"
_NAME = re.compile(r"^update-(\d{12})\.sealed$")


@dataclass(frozen=True)
class JournalEntry:
    seq: int
    trainer_id: str
    num_examples: int
    staleness: int
    # The staleness weight the update was folded with.
    factor: float
    train_loss: float
    update: dict[str, np.ndarray]
    # The norm clip's factor (1.0: not clipped): the update is journaled as received and
    # folded multiplied by factor * scale, on acceptance and on recovery alike.
    scale: float = 1.0


class UpdateJournal:
    def __init__(self, directory: Path, keys: SealingKeySource) -> None:
        self.directory = directory
        self._keys = keys

    def path_of(self, seq: int) -> Path:
        return self.directory / f"update-{seq:012d}.sealed"

    def append(self, entry: JournalEntry) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {
            "seq": entry.seq,
            "trainer_id": entry.trainer_id,
            "num_examples": entry.num_examples,
            "staleness": entry.staleness,
            "factor": entry.factor,
            "scale": entry.scale,
            "train_loss": entry.train_loss if np.isfinite(entry.train_loss) else None,
            "tensors": list(entry.update),
        }
        arrays: dict[str, np.ndarray] = {
            "meta": np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
        }
        for i, arr in enumerate(entry.update.values()):
            arrays[f"t{i}"] = arr
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=False, **arrays)
        write_sealed(self._keys, _PURPOSE, self.path_of(entry.seq), buf.getvalue())

    def seqs(self) -> list[int]:
        if not self.directory.exists():
            return []
        found = (_NAME.match(name) for name in os.listdir(self.directory))
        return sorted(int(m.group(1)) for m in found if m)

    def entries(self, from_seq: int) -> Iterator[JournalEntry]:
        """Entries with seq >= from_seq, in order."""
        for seq in self.seqs():
            if seq >= from_seq:
                yield self._read(seq)

    def discard_below(self, watermark: int) -> None:
        """Delete the files of updates that are in the model (seq < watermark)."""
        for seq in self.seqs():
            if seq < watermark:
                self.path_of(seq).unlink(missing_ok=True)

    def _read(self, seq: int) -> JournalEntry:
        data = read_sealed(self._keys, _PURPOSE, self.path_of(seq))
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            meta: Mapping[str, Any] = json.loads(npz["meta"].tobytes().decode())
            update = {name: npz[f"t{i}"] for i, name in enumerate(meta["tensors"])}
        loss = meta["train_loss"]
        return JournalEntry(
            seq=int(meta["seq"]),
            trainer_id=str(meta["trainer_id"]),
            num_examples=int(meta["num_examples"]),
            staleness=int(meta["staleness"]),
            factor=float(meta["factor"]),
            train_loss=float(loss) if loss is not None else float("nan"),
            update=update,
            scale=float(meta.get("scale", 1.0)),
        )
