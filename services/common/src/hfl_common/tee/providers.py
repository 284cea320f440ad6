"""Evidence providers: who makes a quote for this process's enclave.

`GramineProvider` asks Gramine's /dev/attestation pseudo-files (inside an SGX
enclave with DCAP attestation); `SimulatedProvider` asks a `SimulatedPlatform`.
Both give byte-exact SGX ECDSA quotes v3 over 64 bytes of report data.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol, runtime_checkable

from hfl_common.errors import EvidenceError, InvalidArgumentError
from hfl_common.tee.sgx import REPORT_DATA_SIZE
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform

logger = logging.getLogger(__name__)


@runtime_checkable
class EvidenceProvider(Protocol):
    """Makes SGX quotes whose report body carries the given report data."""

    kind: str

    def quote(self, report_data: bytes) -> bytes:
        """An SGX DCAP quote v3; `report_data` must be exactly 64 bytes."""
        ...


def _check_report_data(report_data: bytes) -> bytes:
    if not isinstance(report_data, bytes | bytearray) or len(report_data) != REPORT_DATA_SIZE:
        size = len(report_data) if isinstance(report_data, bytes | bytearray) else "not bytes"
        raise InvalidArgumentError(
            f"report_data must be exactly {REPORT_DATA_SIZE} bytes, got {size}"
        )
    return bytes(report_data)


class GramineProvider:
    """Quotes from Gramine's attestation pseudo-filesystem (gramine-sgx, DCAP).

    Gramine's protocol ("Attestation and Secret Provisioning", /dev/attestation):
    `attestation_type` reads "dcap"; writing 64 bytes to `user_report_data` and
    then reading `quote` gives a quote over them.
    """

    kind = "gramine-dcap"

    def __init__(self, root: Path = Path("/dev/attestation")) -> None:
        self.root = Path(root)

    def _not_in_enclave(self, why: str) -> EvidenceError:
        return EvidenceError(
            f"not inside an SGX enclave with DCAP attestation: {why} "
            '(run under gramine-sgx with sgx.remote_attestation = "dcap", '
            "or use the simulated TEE)",
            "no_tee",
        )

    def check(self) -> None:
        """Raise EvidenceError unless Gramine offers DCAP attestation here."""
        type_file = self.root / "attestation_type"
        try:
            kind = type_file.read_text().strip()
        except FileNotFoundError:
            raise self._not_in_enclave(f"{type_file} does not exist") from None
        except OSError as exc:
            raise self._not_in_enclave(f"cannot read {type_file}: {exc.strerror or exc}") from None
        if kind != "dcap":
            raise self._not_in_enclave(f"{type_file} says {kind!r}, expected 'dcap'")

    def quote(self, report_data: bytes) -> bytes:
        data = _check_report_data(report_data)
        self.check()
        try:
            (self.root / "user_report_data").write_bytes(data)
            quote = (self.root / "quote").read_bytes()
        except OSError as exc:
            raise EvidenceError(
                f"Gramine could not produce a quote via {self.root}: {exc.strerror or exc}",
                "quote_failed",
            ) from None
        if not quote:
            raise EvidenceError(
                f"Gramine returned an empty quote from {self.root / 'quote'}", "quote_failed"
            )
        logger.debug("got a %d-byte quote from Gramine", len(quote))
        return quote


class SimulatedProvider:
    """Quotes from a simulated platform for an enclave of the given identity."""

    kind = "simulated"

    def __init__(
        self, platform: SimulatedPlatform, identity: EnclaveIdentity, *, debug: bool = False
    ) -> None:
        self.platform = platform
        self.identity = identity
        self.debug = debug

    def quote(self, report_data: bytes) -> bytes:
        return self.platform.quote(self.identity, _check_report_data(report_data), debug=self.debug)
