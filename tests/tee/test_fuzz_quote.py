"""Property tests: no input makes the parser or verifier crash, and no mutation is accepted."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from hfl_common.config import AttestationPolicy
from hfl_common.errors import EvidenceError
from hfl_common.tee.collateral import DirectoryCollateral
from hfl_common.tee.sgx import HEADER_SIZE, parse_quote
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform
from hfl_common.tee.verify import REASON_CODES, QuoteVerifier

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def verifier(sim_platform: SimulatedPlatform, make_policy: object) -> QuoteVerifier:
    assert callable(make_policy)
    policy = make_policy()
    assert isinstance(policy, AttestationPolicy)
    return QuoteVerifier(
        policy,
        DirectoryCollateral(sim_platform.collateral_dir),
        simulation_root_der=sim_platform.root_der,
        registry=CollectorRegistry(),
    )


@pytest.fixture(scope="module")
def good_quote(sim_platform: SimulatedPlatform, trainer_identity: EnclaveIdentity) -> bytes:
    return sim_platform.quote(trainer_identity, bytes(range(64)))


def _signed_extent(quote: bytes) -> int:
    """Everything before the PEM certification data: header, body, signature data."""
    return len(quote) - len(parse_quote(quote).cert_data)


def test_the_unmutated_quote_is_accepted(verifier: QuoteVerifier, good_quote: bytes) -> None:
    # The baseline the mutation tests rely on.
    assert verifier.verify_quote(good_quote, "trainer").accepted


@FUZZ
@given(data=st.binary(max_size=6000))
def test_random_bytes_never_crash_the_parser(data: bytes) -> None:
    error: EvidenceError | None = None
    try:
        parse_quote(data)
    except EvidenceError as exc:
        error = exc
    if error is not None:
        assert error.reason_code in {"quote_malformed", "not_sgx"}
        assert str(error)


@FUZZ
@given(data=st.binary(max_size=5000))
def test_random_bytes_are_refused_with_a_reason(verifier: QuoteVerifier, data: bytes) -> None:
    verdict = verifier.verify_quote(data, "trainer")
    assert not verdict.accepted
    assert verdict.reason_code in REASON_CODES
    assert verdict.reason_code != "internal_error", verdict.reason
    assert verdict.reason


@FUZZ
@given(tail=st.binary(max_size=5000), lengths=st.integers(min_value=0, max_value=5000))
def test_random_bytes_behind_a_valid_header_are_refused(
    verifier: QuoteVerifier, good_quote: bytes, tail: bytes, lengths: int
) -> None:
    data = good_quote[:HEADER_SIZE] + tail
    if len(data) >= 436:  # make the length field sometimes consistent, to reach deeper
        data = data[:432] + struct.pack("<I", min(lengths, len(data) - 436)) + data[436:]
    verdict = verifier.verify_quote(data, "trainer")
    assert not verdict.accepted
    assert verdict.reason_code not in {"ok", "internal_error"}, verdict.reason


@FUZZ
@given(st.data())
def test_any_mutation_of_the_signed_regions_is_refused(
    verifier: QuoteVerifier, good_quote: bytes, data: st.DataObject
) -> None:
    extent = _signed_extent(good_quote)
    offsets = data.draw(
        st.lists(
            st.integers(min_value=0, max_value=extent - 1), min_size=1, max_size=4, unique=True
        )
    )
    mutated = bytearray(good_quote)
    for offset in offsets:
        mutated[offset] ^= data.draw(st.integers(min_value=1, max_value=255))
    verdict = verifier.verify_quote(bytes(mutated), "trainer")
    assert not verdict.accepted, offsets
    assert verdict.reason_code not in {"ok", "internal_error"}, verdict.reason


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4999))
def test_truncated_quotes_are_refused(verifier: QuoteVerifier, good_quote: bytes, cut: int) -> None:
    verdict = verifier.verify_quote(good_quote[: cut % len(good_quote)], "trainer")
    assert verdict.reason_code == "quote_malformed", verdict.reason
