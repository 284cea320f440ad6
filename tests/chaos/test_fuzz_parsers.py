"""Fuzzing every parser that reads what a peer or a file sends, at 10,000 cases each:
the tensor-stream decoder, the SGX quote parser, the RA-TLS certificate parser and the
policy parser. Each raises only the project's domain errors, and none accepts garbage.

Derandomized (the same cases every run, no example database), no deadline (a loaded CI
machine is slow, not wrong). `FUZZ_EXAMPLES` is the count; CI runs it as is.
"""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from hfl_common import ratls
from hfl_common.api import tensor_pb2
from hfl_common.codec import decode_stream, encode_tensors
from hfl_common.config import parse_policy
from hfl_common.errors import ConfigError, EvidenceError, HflError
from hfl_common.tee.providers import SimulatedProvider
from hfl_common.tee.sgx import parse_quote
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

FUZZ_EXAMPLES = 10_000
FUZZ = settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
LIMIT = 1 << 20

# --- shared samples (made once per module) ----------------------------------------------


@dataclass(frozen=True)
class Samples:
    quote: bytes
    cert: bytes
    cert_parsed: ratls.RaTlsCertificate


@functools.cache
def samples() -> Samples:
    """A simulated quote and RA-TLS certificate, made once, on first use (not at import:
    collecting this file for `make test-fast` must not build a platform)."""
    platform = SimulatedPlatform.create(Path(tempfile.mkdtemp(prefix="hfl-fuzz-")) / "platform")
    identity = EnclaveIdentity(
        mrenclave=bytes(range(32)), mrsigner=platform.mrsigner, isv_prod_id=3, isv_svn=1
    )
    cert = ratls.make_ra_tls_certificate(
        ratls.EnclaveKey.generate(), SimulatedProvider(platform, identity)
    )
    return Samples(platform.quote(identity, bytes(64)), cert, ratls.parse_ra_tls_certificate(cert))


_TENSORS = {
    "w": np.arange(24, dtype=np.float32).reshape(4, 6),
    "b": np.arange(5, dtype=np.int32),
}
_STREAM = encode_tensors(_TENSORS, chunk_bytes=16)
HEADER = _STREAM.header
CHUNKS = list(_STREAM.chunks())
TRAILER = _STREAM.trailer()

POLICY = f"""
[trust]
root = "simulation"
simulation_root_sha256 = "{"ab" * 32}"
accepted_tcb_statuses = ["UpToDate"]

[roles.trainer]
mrenclave = ["{"cd" * 32}"]
isv_prod_id = 3
min_isv_svn = 1

[operators]
spki_sha256 = ["{"ef" * 32}"]

[certificates]
lifetime_seconds = 3600
"""


def _mutate(data: bytes, edits: list[tuple[int, int]]) -> bytes:
    out = bytearray(data)
    for offset, value in edits:
        out[offset % len(out)] ^= value
    return bytes(out)


edits = st.lists(
    st.tuples(st.integers(min_value=0, max_value=1 << 16), st.integers(1, 255)),
    min_size=1,
    max_size=4,
)


# --- the tensor-stream decoder -----------------------------------------------------------


def test_the_unmutated_stream_decodes() -> None:
    decoded = decode_stream(HEADER, [*CHUNKS, TRAILER], max_total_bytes=LIMIT)
    assert all(np.array_equal(decoded[k], v) for k, v in _TENSORS.items())


@FUZZ
@given(header=st.binary(max_size=400), data=st.binary(max_size=300), offset=st.integers(0, 400))
def test_any_header_and_chunk_bytes_raise_only_domain_errors(
    header: bytes, data: bytes, offset: int
) -> None:
    try:
        parsed = tensor_pb2.TensorStreamHeader.FromString(header)
    except Exception:  # protobuf refuses its own garbage before we see it
        return
    chunk = tensor_pb2.TensorChunk(offset=offset, data=data)
    trailer = tensor_pb2.TensorStreamTrailer(total_bytes=parsed.total_bytes, sha256=bytes(32))
    with pytest.raises(HflError):
        decode_stream(parsed, [chunk, trailer], max_total_bytes=LIMIT)


@FUZZ
@given(which=st.integers(0, 10_000), changes=edits)
def test_any_change_to_a_chunk_is_refused(which: int, changes: list[tuple[int, int]]) -> None:
    index = which % len(CHUNKS)
    mutated = list(CHUNKS)
    chunk = mutated[index]
    data = _mutate(chunk.data, changes)
    assume(data != chunk.data)  # two edits of one byte may cancel out
    mutated[index] = tensor_pb2.TensorChunk(offset=chunk.offset, data=data)
    with pytest.raises(HflError):
        decode_stream(HEADER, [*mutated, TRAILER], max_total_bytes=LIMIT)


# --- the SGX quote parser ------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=6000))
def test_random_bytes_are_never_a_quote(data: bytes) -> None:
    with pytest.raises(EvidenceError) as caught:
        parse_quote(data)
    assert caught.value.reason_code in {"quote_malformed", "not_sgx"}


@FUZZ
@given(changes=edits)
def test_a_mutated_quote_parses_to_the_bytes_given_or_is_refused(
    changes: list[tuple[int, int]],
) -> None:
    data = _mutate(samples().quote, changes)
    try:
        quote = parse_quote(data)
    except EvidenceError as exc:
        assert exc.reason_code in {"quote_malformed", "not_sgx"}  # noqa: PT017
        return
    # parsed: every field the verifier reads is usable, and it is what was sent
    assert quote.raw == data
    for certificate in quote.pck_chain:
        assert certificate.subject is not None
        assert certificate.extensions is not None


# --- the RA-TLS certificate parser -------------------------------------------------------


def _unchanged(data: bytes) -> None:
    try:
        parsed = ratls.parse_ra_tls_certificate(data)
    except EvidenceError as exc:
        assert exc.reason_code  # noqa: PT017
        return
    assert parsed.quote == samples().cert_parsed.quote
    assert parsed.spki_sha256 == samples().cert_parsed.spki_sha256


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_bytes_are_never_an_ra_tls_certificate(data: bytes) -> None:
    with pytest.raises(EvidenceError):
        ratls.parse_ra_tls_certificate(data)


@FUZZ
@given(changes=edits)
def test_a_mutated_ra_tls_certificate_is_refused_or_carries_the_same_quote_and_key(
    changes: list[tuple[int, int]],
) -> None:
    _unchanged(_mutate(samples().cert, changes))


# --- the policy parser ---------------------------------------------------------------------


@FUZZ
@given(text=st.text(max_size=400))
def test_any_text_is_a_policy_or_a_config_error(text: str) -> None:
    try:
        parse_policy(text, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")  # noqa: PT017


@FUZZ
@given(changes=edits)
def test_a_mutated_policy_is_refused_with_a_config_error_or_parses(
    changes: list[tuple[int, int]],
) -> None:
    raw = _mutate(POLICY.encode(), [(o, v & 0x7F or 1) for o, v in changes])
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return
    try:
        policy: Any = parse_policy(text, "fuzz.toml")
    except ConfigError:
        return
    assert policy.roles  # a policy that parses always names at least one role
