"""Collateral sources (directory, file, PCCS) and the cache over them."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from hfl_common.errors import ConfigError, EvidenceError
from hfl_common.tee.collateral import (
    CachedCollateral,
    DirectoryCollateral,
    FileCollateral,
    PccsCollateral,
    collateral_expiry,
    parse_collateral,
    quote_fmspc,
)
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform

REPORT_DATA = bytes(64)


@pytest.fixture(scope="module")
def quote(sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity) -> bytes:
    return sim_platform.quote(trainer_identity, REPORT_DATA)


def test_directory_collateral_is_found_by_fmspc(
    sim_platform: SimulatedPlatform, quote: bytes
) -> None:
    assert quote_fmspc(quote) == sim_platform.fmspc.hex().upper()
    collateral = DirectoryCollateral(sim_platform.collateral_dir).get(quote, int(time.time()))
    assert json.loads(collateral.tcb_info)["fmspc"] == sim_platform.fmspc.hex().upper()


def test_directory_collateral_names_the_missing_file(tmp_path: Path, quote: bytes) -> None:
    fmspc = quote_fmspc(quote)
    with pytest.raises(
        EvidenceError, match=f"no collateral for FMSPC {fmspc}: .*{fmspc}.json"
    ) as e:
        DirectoryCollateral(tmp_path).get(quote, 0)
    assert e.value.reason_code == "collateral_unavailable"


def test_directory_collateral_accepts_a_single_file(
    sim_platform: SimulatedPlatform, quote: bytes
) -> None:
    collateral = DirectoryCollateral(sim_platform.collateral_path).get(quote, 0)
    assert json.loads(collateral.qe_identity)["id"] == "QE"


def test_malformed_collateral_file_is_named(tmp_path: Path, quote: bytes) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"tcb_info": 1}')
    with pytest.raises(EvidenceError, match=f"collateral file {path} is not collateral") as e:
        FileCollateral(path).get(quote, 0)
    assert e.value.reason_code == "collateral_unavailable"


def test_pccs_collateral_refuses_a_non_http_url() -> None:
    with pytest.raises(ConfigError, match="PCCS URL 'ftp://pccs' must start with https://"):
        PccsCollateral("ftp://pccs")


def test_pccs_collateral_reports_an_unreachable_pccs(quote: bytes) -> None:
    # Port 1 on loopback: refused at once, no network involved.
    source = PccsCollateral("http://127.0.0.1:1/", timeout_seconds=5)
    with pytest.raises(
        EvidenceError, match=r"could not fetch collateral from the PCCS at http://127.0.0.1:1: "
    ) as e:
        source.get(quote, 0)
    assert e.value.reason_code == "collateral_unavailable"


def test_collateral_expiry_is_the_earliest_next_update(
    sim_platform: SimulatedPlatform, quote: bytes
) -> None:
    now = int(time.time())
    text = sim_platform.collateral_json(now=now, validity_seconds=1000)
    assert collateral_expiry(parse_collateral(text, "test")) == now - 3600 + 1000


class _CountingSource:
    def __init__(self, inner: FileCollateral) -> None:
        self.inner = inner
        self.calls = 0

    def get(self, quote: bytes, now: int) -> object:
        self.calls += 1
        return self.inner.get(quote, now)


def test_cache_hits_until_next_update_then_refetches(
    tmp_path: Path, sim_platform: SimulatedPlatform, quote: bytes
) -> None:
    now = int(time.time())
    path = tmp_path / "c.json"
    path.write_text(sim_platform.collateral_json(now=now, validity_seconds=7200))
    source = _CountingSource(FileCollateral(path))
    registry = CollectorRegistry()
    cache = CachedCollateral(source, registry=registry)
    first = cache.get(quote, now)
    assert cache.get(quote, now + 60) is first
    assert source.calls == 1
    cache.get(quote, now + 7200)  # past nextUpdate (issued an hour before now)
    assert source.calls == 2

    def count(event: str) -> float | None:
        return registry.get_sample_value("hfl_attestation_collateral_cache_total", {"event": event})

    assert (count("miss"), count("hit"), count("expired")) == (1, 1, 1)


def test_cache_does_not_keep_source_errors(
    tmp_path: Path, quote: bytes, sim_platform: SimulatedPlatform
) -> None:
    path = tmp_path / "c.json"
    cache = CachedCollateral(FileCollateral(path))
    with pytest.raises(EvidenceError, match="cannot read the collateral file"):
        cache.get(quote, 0)
    path.write_text(sim_platform.collateral_json())
    assert json.loads(cache.get(quote, int(time.time())).tcb_info)["id"] == "SGX"
