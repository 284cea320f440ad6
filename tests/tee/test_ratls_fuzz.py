"""Property tests: the RA-TLS parser refuses garbage with EvidenceError and nothing else.

Whatever bytes it is given (random, a valid certificate with bytes changed, PEM with
its base64 changed, well-signed certificates carrying mutated evidence) the parser
either raises EvidenceError or returns exactly the quote the certificate carries.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hfl_common import ratls
from hfl_common.errors import EvidenceError

REAL_QUOTE = (Path(__file__).resolve().parents[1] / "data" / "dcap" / "sgx_quote").read_bytes()
RD = slice(368, 432)

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class ReportDataProvider:
    """The real quote with report_data overwritten (its signature no longer holds)."""

    def quote(self, report_data: bytes) -> bytes:
        return REAL_QUOTE[: RD.start] + report_data + REAL_QUOTE[RD.stop :]


@dataclass(frozen=True)
class Sample:
    der: bytes
    parsed: ratls.RaTlsCertificate


@pytest.fixture(scope="module")
def samples() -> list[Sample]:
    key = ratls.EnclaveKey.generate()
    made = [
        ratls.make_ra_tls_certificate(key, ReportDataProvider(), user_data=b"plan"),
        ratls.make_ra_tls_certificate(key, ReportDataProvider(), legacy_extension=False),
    ]
    return [Sample(der, ratls.parse_ra_tls_certificate(der)) for der in made]


def parse_or_refusal(data: bytes) -> ratls.RaTlsCertificate | EvidenceError:
    """The parsed certificate, or the EvidenceError it was refused with (nothing else)."""
    try:
        return ratls.parse_ra_tls_certificate(data)
    except EvidenceError as exc:
        return exc


def assert_refused_or_unchanged(data: bytes, original: ratls.RaTlsCertificate) -> None:
    """The parser raises EvidenceError (only), or returns the original quotes unchanged."""
    parsed = parse_or_refusal(data)
    if isinstance(parsed, EvidenceError):
        assert parsed.reason_code
        assert str(parsed)
        return
    assert parsed.quote == original.quote
    assert parsed.legacy_quote == original.legacy_quote
    assert parsed.dice_evidence == original.dice_evidence
    assert parsed.spki_sha256 == original.spki_sha256


@st.composite
def mutated(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` with one to three local edits, biased toward the DER structure."""
    out = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        if not out:
            break
        # Half the time hit the first 700 bytes (TBS header, names, key, extension
        # headers), else anywhere (mostly quote bytes inside the extensions).
        limit = min(len(out), 700) if draw(st.booleans()) else len(out)
        at = draw(st.integers(0, limit - 1))
        kind = draw(st.sampled_from(["xor", "set", "delete", "insert", "truncate"]))
        if kind == "xor":
            out[at] ^= draw(st.integers(1, 255))
        elif kind == "set":
            out[at] = draw(st.sampled_from([0x00, 0x01, 0x04, 0x06, 0x30, 0x80, 0x82, 0xFF]))
        elif kind == "delete":
            del out[at : at + draw(st.integers(1, 8))]
        elif kind == "insert":
            out[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del out[at:]
    return bytes(out)


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_refused_with_evidence_error(data: bytes) -> None:
    with pytest.raises(EvidenceError) as excinfo:
        ratls.parse_ra_tls_certificate(data)
    assert excinfo.value.reason_code == "certificate_malformed"


@FUZZ
@given(data=st.binary(max_size=3000))
def test_random_pem_is_refused_with_evidence_error(data: bytes) -> None:
    pem = (
        b"-----BEGIN CERTIFICATE-----\n" + base64.encodebytes(data) + b"-----END CERTIFICATE-----\n"
    )
    with pytest.raises(EvidenceError) as excinfo:
        ratls.parse_ra_tls_certificate(pem)
    assert excinfo.value.reason_code == "certificate_malformed"


@FUZZ
@given(data=st.data())
def test_mutated_der_certificates_are_refused_or_yield_the_same_quote(
    samples: list[Sample], data: st.DataObject
) -> None:
    sample = data.draw(st.sampled_from(samples))
    assert_refused_or_unchanged(data.draw(mutated(sample.der)), sample.parsed)


@FUZZ
@given(data=st.data())
def test_mutated_pem_certificates_are_refused_or_yield_the_same_quote(
    samples: list[Sample], data: st.DataObject
) -> None:
    sample = data.draw(st.sampled_from(samples))
    pem = ratls.certificate_pem(sample.der)
    assert_refused_or_unchanged(data.draw(mutated(pem)), sample.parsed)


@FUZZ
@given(data=st.data())
def test_mutated_base64_in_pem_is_refused_or_yields_the_same_quote(
    samples: list[Sample], data: st.DataObject
) -> None:
    sample = data.draw(st.sampled_from(samples))
    pem = bytearray(ratls.certificate_pem(sample.der))
    body = range(
        len(b"-----BEGIN CERTIFICATE-----\n"), len(pem) - len(b"-----END CERTIFICATE-----\n")
    )
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.sampled_from(body))
        pem[at] = data.draw(
            st.sampled_from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n ")
        )
    assert_refused_or_unchanged(bytes(pem), sample.parsed)


# --- well-signed certificates with mutated evidence ------------------------------------------


@dataclass(frozen=True)
class Signed:
    signer: ec.EllipticCurvePrivateKey
    spki: bytes
    claims: bytes
    evidence: bytes


@functools.cache
def signed_setup() -> Signed:
    """A key, Gramine's claims for it, and TCG DICE evidence binding it (made once)."""
    signer = ec.generate_private_key(ec.SECP384R1())
    spki = signer.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = cbor2.dumps({"pubkey-hash": cbor2.dumps([1, hashlib.sha256(spki).digest()])})
    report_data = hashlib.sha256(claims).digest() + bytes(32)
    quote = REAL_QUOTE[: RD.start] + report_data + REAL_QUOTE[RD.stop :]
    evidence = cbor2.dumps(cbor2.CBORTag(60000, [quote, claims]))
    return Signed(signer, spki, claims, evidence)


def signed_with_evidence(evidence: bytes) -> bytes:
    """A validly self-signed certificate whose TCG DICE extension holds `evidence`."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "RATLS")])
    signer = signed_setup().signer
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(signer.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2030, 12, 31, tzinfo=dt.UTC))
        .add_extension(
            x509.UnrecognizedExtension(ratls.TCG_DICE_TAGGED_EVIDENCE_OID, evidence),
            critical=False,
        )
    )
    return builder.sign(signer, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


@st.composite
def mutated_evidence(draw: st.DrawFn) -> bytes:
    """The signed setup's evidence with edits concentrated on the CBOR structure and the claims."""
    setup = signed_setup()
    out = bytearray(setup.evidence)
    structure = list(range(0, 8)) + list(range(len(out) - len(setup.claims) - 4, len(out)))
    for _ in range(draw(st.integers(1, 3))):
        at = (
            draw(st.sampled_from(structure))
            if draw(st.booleans())
            else draw(st.integers(0, len(out) - 1))
        )
        if at >= len(out):
            continue
        if draw(st.booleans()):
            out[at] ^= draw(st.integers(1, 255))
        else:
            del out[at : at + draw(st.integers(1, 4))]
    return bytes(out)


def test_unmutated_signed_evidence_parses_and_binds() -> None:
    cert = ratls.parse_ra_tls_certificate(signed_with_evidence(signed_setup().evidence))
    ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))


@FUZZ
@given(evidence=mutated_evidence())
def test_signed_mutated_evidence_is_refused_or_read_exactly(evidence: bytes) -> None:
    cert = parse_or_refusal(signed_with_evidence(evidence))
    if isinstance(cert, EvidenceError):
        assert cert.reason_code in {"evidence_malformed", "quote_malformed"}
        return
    # Parsed: the quote and claims are exactly what the extension's CBOR holds...
    tagged = cbor2.loads(evidence)
    assert isinstance(tagged, cbor2.CBORTag)
    assert tagged.tag == 60000
    assert cert.dice_evidence is not None
    assert (cert.quote, cert.dice_evidence.claims) == tuple(tagged.value)
    # ...and the key binding holds only if the claims and report data still bind the key.
    report_data = ratls.report_data_unverified(cert.quote)
    binds = report_data[:32] == hashlib.sha256(cert.dice_evidence.claims).digest() and (
        cert.dice_evidence.pubkey_hash.matches(signed_setup().spki)
    )
    if binds:
        ratls.check_key_binding(cert, report_data)
    else:
        with pytest.raises(EvidenceError) as excinfo:
            ratls.check_key_binding(cert, report_data)
        assert excinfo.value.reason_code == "report_data_mismatch"


# --- the CBOR decoder on its own ---------------------------------------------------------------

cbor_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.binary(max_size=64)
    | st.text(max_size=16),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
        | st.builds(cbor2.CBORTag, st.sampled_from([60000, 0, 1, 2, 24, 258, 55799]), children)
    ),
    max_leaves=12,
)


@FUZZ
@given(value=cbor_values)
def test_arbitrary_cbor_evidence_is_refused_with_evidence_error(value: object) -> None:
    try:
        encoded = cbor2.dumps(value)
    except (cbor2.CBOREncodeError, TypeError, ValueError):
        return
    with pytest.raises(EvidenceError) as excinfo:
        ratls.decode_tcg_dice_evidence(encoded)
    assert excinfo.value.reason_code in {"evidence_malformed", "quote_malformed"}


@FUZZ
@given(data=st.binary(max_size=2048))
def test_random_bytes_as_evidence_are_refused_with_evidence_error(data: bytes) -> None:
    with pytest.raises(EvidenceError) as excinfo:
        ratls.decode_tcg_dice_evidence(data)
    assert excinfo.value.reason_code in {"evidence_malformed", "quote_malformed"}
