"""RA-TLS certificates: our own round trip, Gramine's layout built by hand, refusals."""

from __future__ import annotations

import datetime as dt
import hashlib
import pickle
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import cast

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hfl_common import ratls
from hfl_common.errors import EvidenceError, InvalidArgumentError
from hfl_common.identity import roles_in
from hfl_common.tee.providers import SimulatedProvider
from hfl_common.tee.simulation import EnclaveIdentity, SimulatedPlatform
from hfl_common.tee.verify import QuoteVerifier

REAL_QUOTE = (Path(__file__).resolve().parents[1] / "data" / "dcap" / "sgx_quote").read_bytes()
# Quote v3: 48-byte header, report body with report_data at body offset 320.
RD = slice(368, 432)
# Offset of MRENCLAVE in the quote (header 48 + report body offset 64).
MRENCLAVE_AT = 48 + 64


class ReportDataProvider:
    """Test-only evidence provider: the real quote with report_data overwritten.

    Overwriting breaks the quote's signature, which does not matter here: these tests
    are about the certificate format and the key binding, not about quote signatures.
    """

    def __init__(self, quote: bytes = REAL_QUOTE) -> None:
        self.base = quote
        self.requests: list[bytes] = []
        self.returned: list[bytes] = []

    def quote(self, report_data: bytes) -> bytes:
        assert len(report_data) == 64
        self.requests.append(report_data)
        out = self.base[: RD.start] + report_data + self.base[RD.stop :]
        self.returned.append(out)
        return out


def quote_with(report_data: bytes, base: bytes = REAL_QUOTE) -> bytes:
    return base[: RD.start] + report_data.ljust(64, b"\x00") + base[RD.stop :]


def check_reason(excinfo: pytest.ExceptionInfo[EvidenceError], reason_code: str) -> None:
    assert excinfo.value.reason_code == reason_code


@pytest.fixture(scope="module")
def key() -> ratls.EnclaveKey:
    return ratls.EnclaveKey.generate()


# --- a hand-written DER and CBOR encoder, independent of the code under test -------------


def der(tag: int, content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return bytes([tag]) + length + content


def seq(*parts: bytes) -> bytes:
    return der(0x30, b"".join(parts))


def der_set(*parts: bytes) -> bytes:
    return der(0x31, b"".join(parts))


def oid(content: bytes) -> bytes:
    return der(0x06, content)


def cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 0x100:
        return bytes([major << 5 | 24, n])
    if n < 0x10000:
        return bytes([major << 5 | 25]) + n.to_bytes(2, "big")
    return bytes([major << 5 | 26]) + n.to_bytes(4, "big")


def cbor_bstr(data: bytes) -> bytes:
    return cbor_head(2, len(data)) + data


def cbor_tstr(text: str) -> bytes:
    return cbor_head(3, len(text)) + text.encode()


# Gramine, tools/sgx/ra-tls/ra_tls_common.h: the bytes mbedtls is handed as the OID *content*.
GRAMINE_LEGACY_OID_CONTENT = bytes(
    [0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x8A, 0x39, 0x06]
)
# TCG_DICE_TAGGED_EVIDENCE_OID, 2.23.133.5.4.9.
GRAMINE_DICE_OID_CONTENT = bytes([0x67, 0x81, 0x05, 0x05, 0x04, 0x09])
ECDSA_WITH_SHA256 = bytes.fromhex("2a8648ce3d040302")  # 1.2.840.10045.4.3.2


def gramine_claims(spki: bytes, hash_alg_id: int = 1) -> bytes:
    """{"pubkey-hash": bstr([hash-alg-id, hash(SPKI)])} as Gramine's libcbor writes it."""
    digest = {1: hashlib.sha256, 7: hashlib.sha384, 8: hashlib.sha512}[hash_alg_id](spki).digest()
    hash_entry = cbor_head(4, 2) + cbor_head(0, hash_alg_id) + cbor_bstr(digest)
    return cbor_head(5, 1) + cbor_tstr("pubkey-hash") + cbor_bstr(hash_entry)


def gramine_evidence(quote: bytes, claims: bytes) -> bytes:
    """CBOR tag 60000 (0xD9 0xEA 0x60) over a definite array [bstr quote, bstr claims]."""
    return cbor_head(6, 60000) + cbor_head(4, 2) + cbor_bstr(quote) + cbor_bstr(claims)


def gramine_name() -> bytes:
    # "CN=RATLS,O=GramineDevelopers,C=US", as mbedtls writes it (last RDN first).
    return seq(
        der_set(seq(oid(bytes.fromhex("550406")), der(0x13, b"US"))),
        der_set(seq(oid(bytes.fromhex("55040a")), der(0x0C, b"GramineDevelopers"))),
        der_set(seq(oid(bytes.fromhex("550403")), der(0x0C, b"RATLS"))),
    )


def gramine_certificate(
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    legacy_quote: bytes | None,
    evidence: bytes | None,
    subject_key: ec.EllipticCurvePublicKey | None = None,
    not_after: bytes = b"301231235959Z",
) -> bytes:
    """A certificate laid out as Gramine's ra_tls_attest.c generate_x509() makes it.

    Serial 1, CN=RATLS,O=GramineDevelopers,C=US, 2001-01-01 to 2030-12-31,
    ECDSA-SHA256, basic constraints CA:FALSE, SKI, AKI, then the legacy quote
    extension (Gramine's quirky OID bytes) and the TCG DICE extension, both
    non-critical, each value the raw bytes inside the extnValue OCTET STRING.
    """
    public_key = subject_key or signing_key.public_key()
    spki = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    key_id = hashlib.sha1(point).digest()
    extensions = [
        seq(oid(bytes.fromhex("551d13")), der(0x04, seq())),
        seq(oid(bytes.fromhex("551d0e")), der(0x04, der(0x04, key_id))),
        seq(oid(bytes.fromhex("551d23")), der(0x04, seq(der(0x80, key_id)))),
    ]
    if legacy_quote is not None:
        extensions.append(seq(oid(GRAMINE_LEGACY_OID_CONTENT), der(0x04, legacy_quote)))
    if evidence is not None:
        extensions.append(seq(oid(GRAMINE_DICE_OID_CONTENT), der(0x04, evidence)))
    algorithm = seq(oid(ECDSA_WITH_SHA256))
    tbs = seq(
        der(0xA0, der(0x02, b"\x02")),  # version v3
        der(0x02, b"\x01"),  # serial "1"
        algorithm,
        gramine_name(),
        seq(der(0x17, b"010101000000Z"), der(0x17, not_after)),
        gramine_name(),
        spki,
        der(0xA3, seq(*extensions)),
    )
    signature = signing_key.sign(tbs, ec.ECDSA(hashes.SHA256()))
    return seq(tbs, algorithm, der(0x03, b"\x00" + signature))


def gramine_style(
    *, legacy: bool = True, dice: bool = True, hash_alg_id: int = 1
) -> tuple[bytes, ec.EllipticCurvePrivateKey, bytes, bytes]:
    """(certificate, key, legacy quote, dice quote) made the way Gramine makes them."""
    private_key = ec.generate_private_key(ec.SECP384R1())
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    legacy_quote = quote_with(hashlib.sha256(spki).digest())
    claims = gramine_claims(spki, hash_alg_id)
    dice_quote = quote_with(hashlib.sha256(claims).digest())
    cert = gramine_certificate(
        private_key,
        legacy_quote=legacy_quote if legacy else None,
        evidence=gramine_evidence(dice_quote, claims) if dice else None,
    )
    return cert, private_key, legacy_quote, dice_quote


def rebuild(
    cert: x509.Certificate,
    signing_key: ec.EllipticCurvePrivateKey,
    *,
    public_key: ec.EllipticCurvePublicKey | None = None,
    replace: dict[x509.ObjectIdentifier, bytes] | None = None,
    drop: tuple[x509.ObjectIdentifier, ...] = (),
) -> bytes:
    """Copy `cert` with another key and/or replaced or dropped extensions, re-signed."""
    replace = replace or {}
    public_key = public_key or signing_key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(cert.issuer)
        .public_key(public_key)
        .serial_number(cert.serial_number)
        .not_valid_before(cert.not_valid_before_utc)
        .not_valid_after(cert.not_valid_after_utc)
    )
    for extension in cert.extensions:
        if extension.oid in drop:
            continue
        value = extension.value
        if extension.oid in replace:
            value = x509.UnrecognizedExtension(extension.oid, replace[extension.oid])
        elif isinstance(value, x509.SubjectKeyIdentifier):
            value = x509.SubjectKeyIdentifier.from_public_key(public_key)
        elif isinstance(value, x509.AuthorityKeyIdentifier):
            value = x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key())
        builder = builder.add_extension(value, critical=extension.critical)
    return builder.sign(signing_key, hashes.SHA384()).public_bytes(serialization.Encoding.DER)


# --- our own certificates ---------------------------------------------------------------------


def test_certificate_round_trip_carries_both_quotes_bound_to_the_key(
    key: ratls.EnclaveKey,
) -> None:
    provider = ReportDataProvider()
    plan_hash = hashlib.sha256(b"federation plan").digest()

    der_cert = ratls.make_ra_tls_certificate(key, provider, user_data=plan_hash)
    cert = ratls.parse_ra_tls_certificate(der_cert)

    assert cert.has_legacy_extension
    assert cert.has_tcg_dice_extension
    assert cert.quote_source is ratls.QuoteSource.TCG_DICE
    legacy_quote, dice_quote = provider.returned
    assert cert.legacy_quote == legacy_quote
    assert cert.dice_evidence is not None
    assert cert.quote == dice_quote == cert.dice_evidence.quote
    assert cert.spki_sha256 == key.spki_sha256 == hashlib.sha256(key.spki_der).digest()
    # Legacy quote: report_data = SHA-256(SPKI) || user data.
    assert legacy_quote[RD] == key.spki_sha256 + plan_hash
    # DICE quote: report_data = SHA-256(claims) || user data; claims bind the key.
    claims = cert.dice_evidence.claims
    assert claims == gramine_claims(key.spki_der)
    assert dice_quote[RD] == hashlib.sha256(claims).digest() + plan_hash
    assert cert.dice_evidence.pubkey_hash == ratls.PubkeyHashClaim(1, key.spki_sha256)
    # Everything but report_data is the provider's quote, byte for byte.
    assert dice_quote[: RD.start] == REAL_QUOTE[: RD.start]
    assert dice_quote[RD.stop :] == REAL_QUOTE[RD.stop :]

    report_data = ratls.report_data_unverified(cert.quote)
    ratls.check_key_binding(cert, report_data)
    assert ratls.user_data_from_report_data(report_data) == plan_hash
    public_key = cert.certificate.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert public_key.public_numbers() == key.public_key.public_numbers()


def test_short_user_data_is_zero_padded_and_empty_user_data_gives_zeros(
    key: ratls.EnclaveKey,
) -> None:
    for user_data, expected in ((b"plan", b"plan" + bytes(28)), (b"", bytes(32))):
        cert = ratls.parse_ra_tls_certificate(
            ratls.make_ra_tls_certificate(key, ReportDataProvider(), user_data=user_data)
        )
        report_data = ratls.report_data_unverified(cert.quote)
        assert ratls.user_data_from_report_data(report_data) == expected


def test_certificate_without_legacy_extension_carries_one_bound_dice_quote(
    key: ratls.EnclaveKey,
) -> None:
    provider = ReportDataProvider()

    der_cert = ratls.make_ra_tls_certificate(key, provider, legacy_extension=False)
    cert = ratls.parse_ra_tls_certificate(der_cert)

    assert len(provider.requests) == 1
    assert not cert.has_legacy_extension
    assert cert.quote_source is ratls.QuoteSource.TCG_DICE
    assert cert.quote == provider.returned[0]
    ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))
    # Small enough for grpcio to present as a client certificate.
    assert len(der_cert) < 8000


def test_pem_and_der_of_one_certificate_parse_to_the_same_quote(key: ratls.EnclaveKey) -> None:
    der_cert = ratls.make_ra_tls_certificate(key, ReportDataProvider())
    pem = ratls.certificate_pem(der_cert)

    assert pem.startswith(b"-----BEGIN CERTIFICATE-----")
    from_pem = ratls.parse_ra_tls_certificate(pem)
    from_der = ratls.parse_ra_tls_certificate(der_cert)
    assert from_pem.quote == from_der.quote
    assert from_pem.der == der_cert
    assert from_der.pem == pem


def test_our_extensions_use_gramines_exact_bytes(key: ratls.EnclaveKey) -> None:
    der_cert = ratls.make_ra_tls_certificate(key, ReportDataProvider())
    cert = x509.load_der_x509_certificate(der_cert)

    # Gramine's verifier memmem()s for its OID bytes and then wants "04 82 <len16>"
    # (non-critical, OCTET STRING with a two-byte length) right after them.
    legacy = cert.extensions.get_extension_for_oid(ratls.LEGACY_QUOTE_OID)
    legacy_value = legacy.value
    assert isinstance(legacy_value, x509.UnrecognizedExtension)
    legacy_quote = legacy_value.value
    legacy_tlv = (
        oid(GRAMINE_LEGACY_OID_CONTENT) + b"\x04\x82" + len(legacy_quote).to_bytes(2, "big")
    )
    assert legacy_tlv + legacy_quote in der_cert
    assert ratls.LEGACY_QUOTE_OID.dotted_string == "0.6.9.42.840.113741.1337.6"

    dice = cert.extensions.get_extension_for_oid(ratls.TCG_DICE_TAGGED_EVIDENCE_OID)
    dice_value = dice.value
    assert isinstance(dice_value, x509.UnrecognizedExtension)
    evidence = dice_value.value
    assert (
        oid(GRAMINE_DICE_OID_CONTENT) + b"\x04\x82" + len(evidence).to_bytes(2, "big") in der_cert
    )
    assert not legacy.critical
    assert not dice.critical
    # Our CBOR is byte-identical to the hand-built Gramine layout.
    dice_quote = ratls.parse_ra_tls_certificate(der_cert).quote
    assert evidence == gramine_evidence(dice_quote, gramine_claims(key.spki_der))
    assert len(evidence) <= ratls.QUOTE_MAX_SIZE


def test_our_certificate_is_p384_self_signed_with_role_and_dns_names(
    key: ratls.EnclaveKey,
) -> None:
    der_cert = ratls.make_ra_tls_certificate(
        key,
        ReportDataProvider(),
        common_name="aggregator",
        dns_names=("localhost",),
        role="aggregator",
    )
    cert = x509.load_der_x509_certificate(der_cert)

    public_key = cert.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP384R1)
    cert.verify_directly_issued_by(cert)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "aggregator"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert roles_in(cert) == ["aggregator"]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False


# --- certificates made by Gramine's library ----------------------------------------------------


def test_gramine_certificate_with_both_extensions_parses_and_binds() -> None:
    cert_der, private_key, legacy_quote, dice_quote = gramine_style()

    cert = ratls.parse_ra_tls_certificate(cert_der)

    assert cert.has_legacy_extension
    assert cert.has_tcg_dice_extension
    # Like Gramine's verifier, the TCG DICE quote is the one to verify.
    assert cert.quote_source is ratls.QuoteSource.TCG_DICE
    assert cert.quote == dice_quote
    assert cert.legacy_quote == legacy_quote
    assert (
        cert.spki_sha256
        == hashlib.sha256(
            private_key.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ).digest()
    )
    assert cert.certificate.subject.rfc4514_string() == "CN=RATLS,O=GramineDevelopers,C=US"
    ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))
    assert ratls.user_data_from_report_data(ratls.report_data_unverified(cert.quote)) == bytes(32)


def test_gramine_certificate_before_v1_8_with_only_the_legacy_extension_parses_and_binds() -> None:
    cert_der, _, legacy_quote, _ = gramine_style(dice=False)

    cert = ratls.parse_ra_tls_certificate(cert_der)

    assert cert.quote_source is ratls.QuoteSource.LEGACY
    assert cert.quote == legacy_quote
    assert not cert.has_tcg_dice_extension
    assert cert.expected_key_binding == cert.spki_sha256
    ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))


@pytest.mark.parametrize("hash_alg_id", [1, 7, 8])
def test_gramine_certificate_with_only_tcg_dice_evidence_binds_with_any_iana_hash(
    hash_alg_id: int,
) -> None:
    cert_der, _, _, dice_quote = gramine_style(legacy=False, hash_alg_id=hash_alg_id)

    cert = ratls.parse_ra_tls_certificate(cert_der)

    assert cert.quote_source is ratls.QuoteSource.TCG_DICE
    assert not cert.has_legacy_extension
    assert cert.quote == dice_quote
    assert cert.dice_evidence is not None
    assert cert.dice_evidence.pubkey_hash.hash_alg_id == hash_alg_id
    ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))


def test_gramine_certificate_is_refused_after_2030_by_the_validity_check() -> None:
    cert = ratls.parse_ra_tls_certificate(gramine_style()[0])

    ratls.check_validity(cert, dt.datetime(2026, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(EvidenceError, match=r"expired at 2030-12-31T23:59:59") as excinfo:
        ratls.check_validity(cert, dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    check_reason(excinfo, "certificate_expired")


# --- refusals ---------------------------------------------------------------------------------


def test_certificate_with_swapped_key_fails_the_binding_check(key: ratls.EnclaveKey) -> None:
    original = x509.load_der_x509_certificate(
        ratls.make_ra_tls_certificate(key, ReportDataProvider())
    )
    thief = ec.generate_private_key(ec.SECP384R1())
    swapped = ratls.parse_ra_tls_certificate(rebuild(original, thief))

    # It is a well-formed, validly self-signed certificate with the victim's quotes...
    assert (
        swapped.quote
        == ratls.parse_ra_tls_certificate(original.public_bytes(serialization.Encoding.DER)).quote
    )
    # ...but the quotes bind the victim's key, not the thief's.
    with pytest.raises(EvidenceError, match=r"pubkey-hash.*is not the hash of") as excinfo:
        ratls.check_key_binding(swapped, ratls.report_data_unverified(swapped.quote))
    check_reason(excinfo, "report_data_mismatch")
    assert str(excinfo.value).startswith(
        "the quote's report data does not bind this certificate's public key"
    )


def test_legacy_only_certificate_with_swapped_key_fails_the_binding_check() -> None:
    victim = ec.generate_private_key(ec.SECP384R1())
    victim_spki = victim.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    thief = ec.generate_private_key(ec.SECP384R1())
    cert_der = gramine_certificate(
        thief, legacy_quote=quote_with(hashlib.sha256(victim_spki).digest()), evidence=None
    )
    cert = ratls.parse_ra_tls_certificate(cert_der)

    with pytest.raises(
        EvidenceError, match=r"expected SHA-256 of the certificate's Subject"
    ) as excinfo:
        ratls.check_key_binding(cert, ratls.report_data_unverified(cert.quote))
    check_reason(excinfo, "report_data_mismatch")
    assert hashlib.sha256(victim_spki).hexdigest() in str(excinfo.value)


def test_report_data_from_another_quote_fails_the_binding_check(key: ratls.EnclaveKey) -> None:
    cert = ratls.parse_ra_tls_certificate(ratls.make_ra_tls_certificate(key, ReportDataProvider()))

    with pytest.raises(EvidenceError, match="report_data\\[0:32\\] is 48656c6c6f") as excinfo:
        ratls.check_key_binding(cert, ratls.report_data_unverified(REAL_QUOTE))
    check_reason(excinfo, "report_data_mismatch")
    with pytest.raises(EvidenceError, match="report data is 32 bytes") as excinfo:
        ratls.check_key_binding(cert, bytes(32))
    check_reason(excinfo, "report_data_malformed")


def test_expired_and_not_yet_valid_certificates_are_refused(key: ratls.EnclaveKey) -> None:
    issued = dt.datetime(2025, 3, 1, 12, 0, tzinfo=dt.UTC)
    cert = ratls.parse_ra_tls_certificate(
        ratls.make_ra_tls_certificate(
            key, ReportDataProvider(), now=issued, validity=dt.timedelta(hours=1)
        )
    )

    ratls.check_validity(cert, issued + dt.timedelta(minutes=59))
    ratls.check_validity(cert, issued - dt.timedelta(minutes=4))  # clock skew allowance
    with pytest.raises(EvidenceError, match="expired at 2025-03-01T13:00:00") as excinfo:
        ratls.check_validity(cert, issued + dt.timedelta(hours=2))
    check_reason(excinfo, "certificate_expired")
    with pytest.raises(EvidenceError, match="not valid before 2025-03-01T11:55:00") as excinfo:
        ratls.check_validity(cert.certificate, issued - dt.timedelta(hours=1))
    check_reason(excinfo, "certificate_not_yet_valid")
    with pytest.raises(InvalidArgumentError, match="timezone-aware"):
        ratls.check_validity(cert, dt.datetime(2025, 3, 1, 12, 0))


@pytest.mark.parametrize(
    ("what", "offset", "new_byte"),
    [
        ("another enclave (MRENCLAVE)", MRENCLAVE_AT, None),
        ("other user data (report_data[32:64])", RD.start + 40, None),
        ("another quote header", 10, None),
    ],
)
def test_certificate_whose_two_quotes_disagree_is_refused(
    what: str, offset: int, new_byte: int | None
) -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    claims = gramine_claims(spki)
    dice_quote = bytearray(quote_with(hashlib.sha256(claims).digest()))
    dice_quote[offset] ^= 0x01
    cert_der = gramine_certificate(
        private_key,
        legacy_quote=quote_with(hashlib.sha256(spki).digest()),
        evidence=gramine_evidence(bytes(dice_quote), claims),
    )

    with pytest.raises(EvidenceError, match="differ in more than the key binding") as excinfo:
        ratls.parse_ra_tls_certificate(cert_der)
    check_reason(excinfo, "quote_extensions_disagree")


def test_certificate_without_a_quote_extension_is_refused(key: ratls.EnclaveKey) -> None:
    original = x509.load_der_x509_certificate(
        ratls.make_ra_tls_certificate(key, ReportDataProvider())
    )
    plain = rebuild(
        original,
        ec.generate_private_key(ec.SECP384R1()),
        drop=(ratls.LEGACY_QUOTE_OID, ratls.TCG_DICE_TAGGED_EVIDENCE_OID),
    )

    with pytest.raises(
        EvidenceError, match=r"neither Gramine's TCG DICE.*2\.23\.133\.5\.4\.9"
    ) as excinfo:
        ratls.parse_ra_tls_certificate(plain)
    check_reason(excinfo, "no_quote_extension")


def test_certificate_whose_quote_was_altered_fails_its_signature(key: ratls.EnclaveKey) -> None:
    der_cert = bytearray(ratls.make_ra_tls_certificate(key, ReportDataProvider()))
    mrenclave = REAL_QUOTE[MRENCLAVE_AT : MRENCLAVE_AT + 32]
    at = der_cert.index(mrenclave)
    der_cert[at] ^= 0xFF

    with pytest.raises(EvidenceError, match="does not verify with its own key") as excinfo:
        ratls.parse_ra_tls_certificate(bytes(der_cert))
    check_reason(excinfo, "certificate_signature_invalid")


def test_ca_issued_certificate_parses_only_against_its_issuer(key: ratls.EnclaveKey) -> None:
    ca_key = ratls.EnclaveKey.generate()
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hfl federation CA")])
    ca_cert = ca_key.sign_certificate(
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key)
        .serial_number(1)
        .not_valid_before(dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2035, 1, 1, tzinfo=dt.UTC))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
    )
    self_signed = ratls.parse_ra_tls_certificate(
        ratls.make_ra_tls_certificate(key, ReportDataProvider())
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(self_signed.certificate.subject)
        .issuer_name(ca_name)
        .public_key(key.public_key)
        .serial_number(2)
        .not_valid_before(dt.datetime(2025, 1, 1, tzinfo=dt.UTC))
        .not_valid_after(dt.datetime(2035, 1, 1, tzinfo=dt.UTC))
    )
    for extension in self_signed.certificate.extensions:
        if extension.oid in (ratls.LEGACY_QUOTE_OID, ratls.TCG_DICE_TAGGED_EVIDENCE_OID):
            builder = builder.add_extension(extension.value, critical=False)
    leaf = ca_key.sign_certificate(builder).public_bytes(serialization.Encoding.DER)

    issued = ratls.parse_ra_tls_certificate(leaf, issuer=ca_cert)
    assert issued.quote == self_signed.quote
    ratls.check_key_binding(issued, ratls.report_data_unverified(issued.quote))
    with pytest.raises(EvidenceError, match="not issued by its own key") as excinfo:
        ratls.parse_ra_tls_certificate(leaf)
    check_reason(excinfo, "certificate_signature_invalid")


@pytest.mark.parametrize(
    ("evidence", "fragment", "reason_code"),
    [
        (
            b"\xd9\xea\x61\x82" + cbor_bstr(REAL_QUOTE) + cbor_bstr(b"\xa0"),
            "is not CBOR tag 60000",
            "evidence_malformed",
        ),
        (
            cbor_head(6, 60000) + cbor_head(4, 1) + cbor_bstr(REAL_QUOTE),
            "not an array",
            "evidence_malformed",
        ),
        (gramine_evidence(REAL_QUOTE, b"\xa0"), "not a non-empty CBOR map", "evidence_malformed"),
        (
            gramine_evidence(REAL_QUOTE, cbor_head(5, 1) + cbor_tstr("nonce") + cbor_bstr(b"n")),
            "no 'pubkey-hash' claim",
            "evidence_malformed",
        ),
        (
            gramine_evidence(
                REAL_QUOTE,
                cbor_head(5, 1)
                + cbor_tstr("pubkey-hash")
                + cbor_bstr(cbor_head(4, 2) + cbor_head(0, 9) + cbor_bstr(bytes(32))),
            ),
            "hash algorithm id 9",
            "evidence_malformed",
        ),
        (
            gramine_evidence(
                REAL_QUOTE,
                cbor_head(5, 1)
                + cbor_tstr("pubkey-hash")
                + cbor_bstr(cbor_head(4, 2) + cbor_head(0, 1) + cbor_bstr(bytes(48))),
            ),
            "holds 48 bytes for sha256",
            "evidence_malformed",
        ),
        (gramine_evidence(REAL_QUOTE[:400], b"\xa0"), "is 400 bytes", "quote_malformed"),
        (
            gramine_evidence(REAL_QUOTE, gramine_claims(b"k")) + b"\x00",
            "1 bytes after",
            "evidence_malformed",
        ),
        (
            b"\xd9\xea\x60\x9f" + cbor_bstr(REAL_QUOTE) + b"\xff",
            "not valid CBOR",
            "evidence_malformed",
        ),
    ],
)
def test_malformed_tcg_dice_evidence_is_refused(
    evidence: bytes, fragment: str, reason_code: str
) -> None:
    private_key = ec.generate_private_key(ec.SECP384R1())
    cert_der = gramine_certificate(private_key, legacy_quote=None, evidence=evidence)

    with pytest.raises(EvidenceError, match=fragment) as excinfo:
        ratls.parse_ra_tls_certificate(cert_der)
    check_reason(excinfo, reason_code)


def test_non_certificates_are_refused_as_malformed() -> None:
    cases = [
        (b"", "not a DER X.509 certificate"),
        (REAL_QUOTE, "not a DER X.509 certificate"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a PEM"),
        (bytes(ratls.MAX_CERTIFICATE_SIZE + 1), "more than the 65536 accepted"),
    ]
    for data, fragment in cases:
        with pytest.raises(EvidenceError, match=fragment) as excinfo:
            ratls.parse_ra_tls_certificate(data)
        check_reason(excinfo, "certificate_malformed")


def test_two_pem_certificates_are_refused(key: ratls.EnclaveKey) -> None:
    pem = ratls.certificate_pem(ratls.make_ra_tls_certificate(key, ReportDataProvider()))

    with pytest.raises(EvidenceError, match="holds 2 certificates") as excinfo:
        ratls.parse_ra_tls_certificate(pem + pem)
    check_reason(excinfo, "certificate_malformed")


# --- making certificates: what the provider returns is checked ---------------------------------


def test_provider_quote_over_other_report_data_is_refused(key: ratls.EnclaveKey) -> None:
    class Liar:
        def quote(self, report_data: bytes) -> bytes:
            return REAL_QUOTE

    with pytest.raises(EvidenceError, match="not the report data asked for") as excinfo:
        ratls.make_ra_tls_certificate(key, Liar())
    check_reason(excinfo, "report_data_mismatch")


def test_provider_returning_a_truncated_quote_is_refused(key: ratls.EnclaveKey) -> None:
    class Truncating:
        def quote(self, report_data: bytes) -> bytes:
            return quote_with(report_data)[:435]

    with pytest.raises(EvidenceError, match="is 435 bytes; an SGX quote is 436 to 8192") as excinfo:
        ratls.make_ra_tls_certificate(key, Truncating())
    check_reason(excinfo, "quote_malformed")


def test_bad_arguments_to_make_are_invalid_argument_errors(key: ratls.EnclaveKey) -> None:
    with pytest.raises(InvalidArgumentError, match="user data is 33 bytes"):
        ratls.make_ra_tls_certificate(key, ReportDataProvider(), user_data=bytes(33))
    with pytest.raises(InvalidArgumentError, match="validity must be positive"):
        ratls.make_ra_tls_certificate(key, ReportDataProvider(), validity=dt.timedelta(0))
    with pytest.raises(InvalidArgumentError, match="'Trainer!' is not a valid role"):
        ratls.make_ra_tls_certificate(key, ReportDataProvider(), role="Trainer!")


# --- the enclave key ---------------------------------------------------------------------------


def test_csr_names_the_role_and_dns_names_and_is_signed_by_the_key(key: ratls.EnclaveKey) -> None:
    csr = x509.load_der_x509_csr(key.csr("trainer-1", ["trainer-1.hfl.internal"], "trainer"))

    assert csr.is_signature_valid
    assert ratls.spki_der(csr.public_key()) == key.spki_der
    assert csr.subject.rfc4514_string() == "CN=trainer-1"
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["trainer-1.hfl.internal"]
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["hfl://role/trainer"]
    assert roles_in(csr) == ["trainer"]
    with pytest.raises(InvalidArgumentError, match="'' is not a valid role name"):
        key.csr("x", [], "")


def test_enclave_key_is_p384_and_refuses_other_curves_and_pickling(key: ratls.EnclaveKey) -> None:
    assert isinstance(key.public_key.curve, ec.SECP384R1)
    with pytest.raises(InvalidArgumentError, match="must be an EC P-384"):
        ratls.EnclaveKey(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(key)
    assert "PRIVATE" not in repr(key)
    assert key.spki_sha256.hex()[:16] in repr(key)


def test_private_key_pem_for_grpc_is_the_same_key(key: ratls.EnclaveKey) -> None:
    pem = key.private_key_pem_for_grpc()

    loaded = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.public_key().public_numbers() == key.public_key.public_numbers()


def test_grpc_mutual_tls_with_pinned_ra_tls_certificates_and_peer_binding() -> None:
    """Real gRPC on 127.0.0.1: each side pins the other's self-signed RA-TLS certificate.

    The server reads the client's certificate from the auth context, parses it and
    checks that its quote binds the key the client used on this very channel.
    """
    server_key, client_key = ratls.EnclaveKey.generate(), ratls.EnclaveKey.generate()
    server_cert = ratls.certificate_pem(
        ratls.make_ra_tls_certificate(server_key, ReportDataProvider(), dns_names=("localhost",))
    )
    # A client certificate carries the TCG DICE quote only: grpcio fails the handshake
    # on client certificates above about 8 KB (see make_ra_tls_certificate).
    client_cert = ratls.certificate_pem(
        ratls.make_ra_tls_certificate(
            client_key, ReportDataProvider(), role="trainer", legacy_extension=False
        )
    )
    seen: list[ratls.RaTlsCertificate] = []

    class Health(health.HealthServicer):
        def Check(
            self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext
        ) -> health_pb2.HealthCheckResponse:
            # grpc-stubs types the values as bytes; grpcio gives a list of bytes.
            peer_pems = cast("list[bytes]", context.auth_context()["x509_pem_cert"])
            seen.append(ratls.parse_ra_tls_certificate(peer_pems[0]))
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    health_pb2_grpc.add_HealthServicer_to_server(Health(), server)
    credentials = grpc.ssl_server_credentials(
        [(server_key.private_key_pem_for_grpc(), server_cert)],
        root_certificates=client_cert,
        require_client_auth=True,
    )
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    try:
        channel_credentials = grpc.ssl_channel_credentials(
            root_certificates=server_cert,
            private_key=client_key.private_key_pem_for_grpc(),
            certificate_chain=client_cert,
        )
        with grpc.secure_channel(
            f"127.0.0.1:{port}",
            channel_credentials,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
    finally:
        server.stop(grace=None)

    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    (peer,) = seen
    assert peer.spki_sha256 == client_key.spki_sha256
    ratls.check_key_binding(peer, ratls.report_data_unverified(peer.quote))
    assert roles_in(peer.certificate) == ["trainer"]


# --- end to end with the simulated TEE and the real verifier (dcap-qvl) ------------------------


def test_simulated_enclave_certificate_verifies_and_binds_end_to_end(
    sim_platform: SimulatedPlatform,
    trainer_identity: EnclaveIdentity,
    make_verifier: Callable[..., QuoteVerifier],
) -> None:
    key = ratls.EnclaveKey.generate()
    plan_hash = hashlib.sha256(b"federation plan v1").digest()
    provider = SimulatedProvider(sim_platform, trainer_identity)
    cert = ratls.parse_ra_tls_certificate(
        ratls.make_ra_tls_certificate(key, provider, user_data=plan_hash, role="trainer")
    )
    verifier = make_verifier()

    verdict = verifier.verify_quote(
        cert.quote, "trainer", report_data_prefix=cert.expected_key_binding
    )
    assert verdict.accepted, verdict.reason
    assert verdict.measurements is not None
    assert verdict.measurements.mrenclave == trainer_identity.mrenclave
    ratls.check_key_binding(cert, verdict.measurements.report_data)
    assert ratls.user_data_from_report_data(verdict.measurements.report_data) == plan_hash
    # The legacy quote is a genuine quote of the same enclave, bound to the key directly.
    assert cert.legacy_quote is not None
    legacy = verifier.verify_quote(cert.legacy_quote, "trainer", report_data_prefix=key.spki_sha256)
    assert legacy.accepted, legacy.reason

    # A thief re-signing the same verified evidence with its own key is caught.
    thief = ec.generate_private_key(ec.SECP384R1())
    stolen = ratls.parse_ra_tls_certificate(rebuild(cert.certificate, thief))
    stolen_verdict = verifier.verify_quote(stolen.quote, "trainer")
    assert stolen_verdict.accepted  # the quote itself is genuine...
    assert stolen_verdict.measurements is not None
    with pytest.raises(
        EvidenceError, match="does not bind this certificate's public key"
    ) as excinfo:
        ratls.check_key_binding(stolen, stolen_verdict.measurements.report_data)
    check_reason(excinfo, "report_data_mismatch")
