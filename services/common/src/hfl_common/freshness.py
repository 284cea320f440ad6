"""Freshness of the attestation service's sealed state: a rollback is noticed by clients.

Sealing (hfl_common.sealing) keeps the CA's state confidential and authentic, but not
fresh: the host can put an older sealed file back, and it unseals fine. SGX offers no
usable trusted monotonic counter (Intel deprecated the platform services that had one),
so freshness is checked by the parties that saw a newer state:

1. The CA's sealed state carries a **generation**, raised by one and sealed again at
   every start, before the service serves (`advance_generation`).
2. The service puts the generation into its own RA-TLS certificate's *attested*
   report_data[32:64] (`encode_generation`): the host cannot change it without
   breaking the quote.
3. Every client (aggregator, trainers) reads it when it verifies the service at
   bootstrap and on every re-pin, and keeps the highest generation it saw in its own
   state directory (`GenerationMemory`). A lower one is refused with the reason
   ``attestation_rollback``: "the attestation service's state went back from 7 to 5".

What it stops: a host that restarts the attestation service from an older copy of its
state while any client that saw the newer one is still around, or comes back with its
state directory. What it does not stop: a host that keeps restarting the service from
the old state until the generation passes what clients saw (each restart is one step
and is logged by the service), a rollback nobody saw (a fresh client has no memory),
and a host that rolls back a client's memory file together with the service's state.
The same scheme for the aggregator's model checkpoints is in the round engine.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
from pathlib import Path

from hfl_common.errors import ConfigError, PermissionDeniedError
from hfl_common.sealing import SealingKeySource, read_sealed, write_atomic, write_sealed

logger = logging.getLogger(__name__)

GENERATION_FILE = "state_generation.sealed"
GENERATION_SEAL_PURPOSE = "hfl-attestation/state-generation/v1"
# report_data[32:64] of the attestation service's own certificate: magic, u64 generation.
_MAGIC = b"HFLGEN01"
MEMORY_FILE = "attestation_seen.json"


def advance_generation(state_dir: Path, sealing: SealingKeySource) -> int:
    """Unseal the state generation (0 when there is none yet), raise it by one, seal it
    again, and return the new value. Called once per start, before serving."""
    path = Path(state_dir) / GENERATION_FILE
    previous = 0
    if path.exists():
        try:
            data = json.loads(read_sealed(sealing, GENERATION_SEAL_PURPOSE, path))
            previous = int(data["generation"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path} does not hold a state generation: {exc}") from None
    generation = previous + 1
    write_sealed(
        sealing,
        GENERATION_SEAL_PURPOSE,
        path,
        json.dumps({"generation": generation}).encode(),
    )
    logger.info("attestation state generation %d (was %d)", generation, previous)
    return generation


def encode_generation(generation: int) -> bytes:
    """The 16 bytes of user data that carry `generation` in the service's quote."""
    return _MAGIC + struct.pack(">Q", generation)


def decode_generation(user_data: bytes) -> int | None:
    """The generation in report_data[32:64], or None when it carries none."""
    if len(user_data) < 16 or user_data[:8] != _MAGIC:
        return None
    (generation,) = struct.unpack(">Q", user_data[8:16])
    return int(generation)


class GenerationMemory:
    """The highest attestation-state generation this client saw, kept in its state dir."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def seen(self) -> int:
        try:
            return int(json.loads(self.path.read_text())["generation"])
        except FileNotFoundError:
            return 0
        except (ValueError, KeyError, TypeError, OSError) as exc:
            raise ConfigError(
                f"{self.path} does not hold the attestation generation seen: {exc}"
            ) from None

    def check(self, generation: int | None, who: str) -> None:
        """Refuse a generation lower than one seen before; remember a higher one."""
        with self._lock:
            seen = self.seen()
            if generation is None:
                if seen:
                    raise PermissionDeniedError(
                        f"{who} refused: it attests no state generation, but generation "
                        f"{seen} was seen before",
                        "attestation_rollback",
                    )
                return
            if generation < seen:
                raise PermissionDeniedError(
                    f"{who} refused: its state went back from generation {seen} to "
                    f"{generation} (its sealed state was rolled back, or it is another "
                    f"service); if this is intended, remove {self.path}",
                    "attestation_rollback",
                )
            if generation > seen:
                write_atomic(self.path, json.dumps({"generation": generation}).encode())
