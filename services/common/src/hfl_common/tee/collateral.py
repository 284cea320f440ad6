"""Where quote collateral comes from: a directory, a file, a PCCS, and a cache over them.

Collateral (TCB info, QE identity, CRLs and their issuer chains) is what dcap-qvl
verifies a quote against; it is in dcap-qvl's `QuoteCollateralV3` JSON form.
Every source raises EvidenceError with reason code "collateral_unavailable" and
a message naming the file or URL when it cannot give collateral.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import dcap_qvl
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter

from hfl_common.errors import ConfigError, EvidenceError

logger = logging.getLogger(__name__)

UNAVAILABLE = "collateral_unavailable"


class CollateralSource(Protocol):
    """Gives the collateral a quote is verified against, as of Unix time `now`."""

    def get(self, quote: bytes, now: int) -> Any:  # dcap_qvl.QuoteCollateralV3
        ...


def quote_fmspc(quote: bytes) -> str:
    """The FMSPC (upper-case hex) from the PCK certificate inside a quote."""
    try:
        fmspc: str = dcap_qvl.parse_quote(bytes(quote)).fmspc()
    except (ValueError, TypeError) as exc:
        raise EvidenceError(
            f"cannot read the FMSPC from the quote's PCK certificate: {exc}", "quote_malformed"
        ) from None
    return fmspc.upper()


def parse_collateral(text: str, source: str) -> Any:
    """Parse QuoteCollateralV3 JSON; EvidenceError naming `source` when it is not that."""
    try:
        return dcap_qvl.QuoteCollateralV3.from_json(text)
    except (ValueError, TypeError) as exc:
        raise EvidenceError(
            f"{source} is not collateral in dcap-qvl's QuoteCollateralV3 JSON form: {exc}",
            UNAVAILABLE,
        ) from None


def _iso_to_unix(value: str) -> int:
    return int(dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp())


def collateral_expiry(collateral: Any) -> int:
    """The earliest nextUpdate (Unix seconds) of the TCB info, QE identity and CRLs."""
    times = []
    for name in ("tcb_info", "qe_identity"):
        try:
            times.append(_iso_to_unix(json.loads(getattr(collateral, name))["nextUpdate"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            return 0  # unreadable: treat as expired, the verifier will say why
    for name in ("root_ca_crl", "pck_crl"):
        try:
            crl = x509.load_der_x509_crl(bytes(getattr(collateral, name)))
        except (ValueError, TypeError, AttributeError):
            return 0
        if crl.next_update_utc is not None:
            times.append(int(crl.next_update_utc.timestamp()))
    return min(times)


class FileCollateral:
    """Collateral for every quote from one JSON file (re-read on each get)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def get(self, quote: bytes, now: int) -> Any:
        try:
            text = self.path.read_text()
        except OSError as exc:
            raise EvidenceError(
                f"cannot read the collateral file {self.path}: {exc.strerror or exc}", UNAVAILABLE
            ) from None
        return parse_collateral(text, f"collateral file {self.path}")

    def __repr__(self) -> str:
        return f"FileCollateral({str(self.path)!r})"


class DirectoryCollateral:
    """Offline collateral: `<dir>/<FMSPC>.json` (upper-case hex) for each platform family.

    `dir` may also be a single file, used for every quote.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def get(self, quote: bytes, now: int) -> Any:
        if self.directory.is_file():
            return FileCollateral(self.directory).get(quote, now)
        fmspc = quote_fmspc(quote)
        path = self.directory / f"{fmspc}.json"
        if not path.exists():
            lower = self.directory / f"{fmspc.lower()}.json"
            path = lower if lower.exists() else path
        if not path.exists():
            raise EvidenceError(
                f"no collateral for FMSPC {fmspc}: {path} does not exist "
                "(fetch it from your PCCS into that file)",
                UNAVAILABLE,
            )
        return FileCollateral(path).get(quote, now)

    def __repr__(self) -> str:
        return f"DirectoryCollateral({str(self.directory)!r})"


class PccsCollateral:
    """Collateral fetched from a PCCS (or Intel's PCS) by dcap-qvl, for the quote's FMSPC."""

    def __init__(self, url: str, *, timeout_seconds: float = 30.0) -> None:
        if not url.startswith(("https://", "http://")):
            raise ConfigError(f"PCCS URL {url!r} must start with https:// (or http://)")
        if timeout_seconds <= 0:
            raise ConfigError(f"PCCS timeout must be positive, got {timeout_seconds}")
        self.url = url.rstrip("/")
        self.timeout_seconds = timeout_seconds

    def get(self, quote: bytes, now: int) -> Any:
        async def fetch() -> Any:
            return await asyncio.wait_for(
                dcap_qvl.get_collateral(self.url, bytes(quote)), self.timeout_seconds
            )

        try:
            return asyncio.run(fetch())
        except (ValueError, RuntimeError, OSError, TimeoutError) as exc:
            raise EvidenceError(
                f"could not fetch collateral from the PCCS at {self.url}: {exc}", UNAVAILABLE
            ) from None

    def __repr__(self) -> str:
        return f"PccsCollateral({self.url!r})"


@dataclass
class _Entry:
    collateral: Any
    expires: int


class CachedCollateral:
    """Caches a source's collateral per FMSPC until its earliest nextUpdate.

    Counts hfl_attestation_collateral_cache_total{event="hit|miss|expired"}.
    Thread-safe; a source error is not cached.
    """

    def __init__(
        self,
        source: CollateralSource,
        *,
        registry: CollectorRegistry | None = None,
        fmspc_of: Callable[[bytes], str] = quote_fmspc,
    ) -> None:
        self.source = source
        self._fmspc_of = fmspc_of
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._events = Counter(
            "hfl_attestation_collateral_cache_total",
            "Collateral cache lookups, by outcome",
            ["event"],
            registry=registry or CollectorRegistry(),
        )

    def get(self, quote: bytes, now: int) -> Any:
        fmspc = self._fmspc_of(quote)
        with self._lock:
            entry = self._entries.get(fmspc)
        if entry is not None and now <= entry.expires:
            self._events.labels(event="hit").inc()
            return entry.collateral
        event = "miss" if entry is None else "expired"
        self._events.labels(event=event).inc()
        started = time.monotonic()
        collateral = self.source.get(quote, now)
        expires = collateral_expiry(collateral)
        logger.debug(
            "collateral for FMSPC %s from %r (%s), valid until %d, fetched in %.3f s",
            fmspc,
            self.source,
            event,
            expires,
            time.monotonic() - started,
        )
        with self._lock:
            self._entries[fmspc] = _Entry(collateral, expires)
        return collateral

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
