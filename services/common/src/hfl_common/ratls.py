"""RA-TLS certificates in Gramine's format, enclave keys and CSRs.

An RA-TLS certificate is an X.509 certificate whose key was generated inside an
enclave and which carries an SGX DCAP quote binding that key. Gramine's RA-TLS
library (tools/sgx/ra-tls in gramineproject/gramine, v1.8 and later) writes the
quote in two extensions, and this module reads and writes both:

* the legacy, non-standard "SGX quote" extension (Gramine v1.0 on). Its value is
  the raw quote; the quote's report_data[0:32] is SHA-256 of the certificate's
  DER SubjectPublicKeyInfo. Gramine's ra_tls_common.h defines the OID as the
  bytes {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x8A, 0x39, 0x06} and
  hands them to mbedtls as the OID's *content*, with the comment "below OID is
  actually wrong: it shouldn't have the first two bytes (0x06 0x09) ... we don't
  modify it because it is non-standard anyway". Decoded as an OID those eleven
  bytes read 0.6.9.42.840.113741.1337.6: 0x06 as a first byte is "0.6", 0x09 is
  9, and 0x2A, the first-byte encoding of "1.2", reads as the arc 42.

* the TCG DICE "tagged evidence" extension, OID 2.23.133.5.4.9 (Gramine v1.8
  on). Its value is CBOR (ra_tls_attest.c, generate_tcg_dice_tagged_evidence):

      tag 60000 (TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG) ->
        [ bstr quote, bstr serialized-claims ]
      serialized-claims = CBOR map { "pubkey-hash": bstr serialized-hash-entry,
                                     ? "nonce": bstr }
      serialized-hash-entry = CBOR array [ uint hash-alg-id, bstr hash(DER SPKI) ]

  with hash-alg-id from IANA's Named Information Hash Algorithm Registry
  (1 = sha-256, 7 = sha-384, 8 = sha-512). Here the quote's report_data[0:32]
  is SHA-256 of the serialized claims, not of the key: the key is bound through
  the "pubkey-hash" claim. A Gramine certificate therefore carries two
  *different* quotes from the same enclave, one per extension.

Gramine's verifier (ra_tls_verify_common.c, extract_quote_and_verify_claims)
uses the TCG DICE extension when present and the legacy one otherwise; so do we
(`RaTlsCertificate.quote`). When both are present the two quotes must agree on
everything but report_data[0:32] (same header, same enclave identity, same
caller data in report_data[32:64]); a certificate whose two quotes disagree is
refused rather than resolved by picking one.

The certificates made here carry both extensions (or only the TCG DICE one, see
`make_ra_tls_certificate`) exactly as Gramine lays them out, so Gramine's
verifier accepts them, and report_data[32:64] of each quote holds the caller's
user data (the aggregator's federation-plan hash).

Parsing is structural only: it checks the certificate's signature (self-signed,
or by a given issuer) and the evidence layout. The quote itself is verified by
hfl_common.tee (dcap-qvl); afterwards `check_key_binding` ties the verified
report_data to this certificate's key. Every refusal raises
hfl_common.errors.EvidenceError with a reason_code.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import io
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hfl_common.errors import EvidenceError, InvalidArgumentError
from hfl_common.identity import ROLE_SAN_PREFIX, role_san
from hfl_common.identity import spki_der as spki_der  # noqa: PLC0414 (re-exported)

# Kept for callers of the former name; the role URI scheme lives in hfl_common.identity.
ROLE_URI_PREFIX = ROLE_SAN_PREFIX
role_uri = role_san

logger = logging.getLogger(__name__)

# --- Gramine's OIDs (tools/sgx/ra-tls/ra_tls_common.h) ---
# NON_STANDARD_INTEL_SGX_QUOTE_OID {0x06, 0x09, 0x2A, 0x86, 0x48, 0x86, 0xF8, 0x4D, 0x8A, 0x39,
# 0x06}, used as OID content bytes: the dotted form of exactly those bytes.
LEGACY_QUOTE_OID = x509.ObjectIdentifier("0.6.9.42.840.113741.1337.6")
# TCG_DICE_TAGGED_EVIDENCE_OID {0x67, 0x81, 0x05, 0x05, 0x04, 0x09}: TCG DICE Attestation
# Architecture, "tcg-dice-TaggedEvidence".
TCG_DICE_TAGGED_EVIDENCE_OID = x509.ObjectIdentifier("2.23.133.5.4.9")

# ra_tls_common.h: TCG_DICE_TAGGED_EVIDENCE_TEE_QUOTE_CBOR_TAG (IANA CBOR tag registry).
TCG_DICE_TEE_QUOTE_CBOR_TAG = 60000
# ra_tls_attest.c, generate_serialized_claims: the claim binding the certificate key.
PUBKEY_HASH_CLAIM = "pubkey-hash"
# ra_tls_common.h: IANA Named Information Hash Algorithm Registry ids Gramine accepts.
IANA_HASH_SHA256 = 1
IANA_HASH_SHA384 = 7
IANA_HASH_SHA512 = 8
_IANA_HASHES: dict[int, str] = {
    IANA_HASH_SHA256: "sha256",
    IANA_HASH_SHA384: "sha384",
    IANA_HASH_SHA512: "sha512",
}

# --- SGX quote sizes and offsets (Intel DCAP ECDSA Quote Library API, Appendix A) ---
QUOTE_HEADER_SIZE = 48
REPORT_BODY_SIZE = 384
# report_data is at offset 320 of the report body.
REPORT_DATA_OFFSET = QUOTE_HEADER_SIZE + 320
REPORT_DATA_SIZE = 64
KEY_BINDING_SIZE = 32  # report_data[0:32]: the key binding
USER_DATA_SIZE = REPORT_DATA_SIZE - KEY_BINDING_SIZE  # report_data[32:64]: caller's data
# Gramine's sizeof(sgx_quote_t): header + report body + the u32 signature length.
QUOTE_MIN_SIZE = QUOTE_HEADER_SIZE + REPORT_BODY_SIZE + 4
# Gramine's sgx_attest.h SGX_QUOTE_MAX_SIZE ("DCAP SGX quotes ~4K, overapproximate to 8K");
# Gramine's find_oid_in_cert_extensions refuses extension values above it.
QUOTE_MAX_SIZE = 8192
# Gramine's find_oid_in_cert_extensions also wants a two-byte DER length (>= 128 bytes).
_GRAMINE_MIN_EXTENSION_SIZE = 128

# Anything larger than this is not an RA-TLS certificate we will look at.
MAX_CERTIFICATE_SIZE = 64 * 1024
# Nesting allowed in the DICE CBOR (Gramine's evidence is three levels deep).
_CBOR_MAX_DEPTH = 8

# Our certificates: backdate not_before a little for peers whose clocks run behind.
CLOCK_SKEW = dt.timedelta(minutes=5)
DEFAULT_VALIDITY = dt.timedelta(hours=24)


class QuoteProvider(Protocol):
    """Anything that returns an SGX quote over the given 64 bytes of report data."""

    def quote(self, report_data: bytes) -> bytes: ...


class QuoteSource(enum.Enum):
    """Which of Gramine's extensions the certificate's quote was taken from."""

    TCG_DICE = "tcg_dice"
    LEGACY = "legacy"


def _fail(reason_code: str, message: str) -> NoReturn:
    raise EvidenceError(message, reason_code=reason_code)


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class EnclaveKey:
    """An EC P-384 key pair generated in this process (inside the enclave).

    There is deliberately no method that writes the private key anywhere; the one
    export, `private_key_pem_for_grpc`, exists because grpcio takes keys only as PEM
    bytes, and its result must go straight into grpc's credentials. Instances
    refuse to be pickled.
    """

    __slots__ = ("_private_key",)

    CURVE = ec.SECP384R1  # as Gramine's ra_tls_create_key_and_crt_der (NIST P-384)
    SIGNATURE_HASH = hashes.SHA384

    def __init__(self, private_key: ec.EllipticCurvePrivateKey) -> None:
        if not isinstance(private_key, ec.EllipticCurvePrivateKey) or not isinstance(
            private_key.curve, self.CURVE
        ):
            raise InvalidArgumentError("an enclave key must be an EC P-384 (secp384r1) key")
        self._private_key = private_key

    @classmethod
    def generate(cls) -> EnclaveKey:
        """A fresh key from the process's CSPRNG (inside an enclave: the enclave's)."""
        return cls(ec.generate_private_key(cls.CURVE()))

    @property
    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._private_key.public_key()

    @property
    def spki_der(self) -> bytes:
        """DER SubjectPublicKeyInfo of the public key."""
        return spki_der(self.public_key)

    @property
    def spki_sha256(self) -> bytes:
        """SHA-256 of the DER SubjectPublicKeyInfo: what report_data[0:32] binds."""
        return _sha256(self.spki_der)

    def csr(
        self,
        common_name: str,
        dns_sans: Sequence[str],
        role: str,
        extensions: Sequence[x509.ExtensionType] = (),
    ) -> bytes:
        """A PKCS#10 request (DER) for this key, naming `role` as a SAN URI; `extensions`
        are added non-critical (e.g. a party enrolment, hfl_common.enrolment)."""
        general_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_sans]
        general_names.append(x509.UniformResourceIdentifier(role_san(role)))
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .add_extension(x509.SubjectAlternativeName(general_names), critical=False)
        )
        for extension in extensions:
            builder = builder.add_extension(extension, critical=False)
        request = builder.sign(self._private_key, self.SIGNATURE_HASH())
        return request.public_bytes(serialization.Encoding.DER)

    def sign_certificate(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        """Sign a certificate (self-signed RA-TLS, or a leaf when this key is a CA's)."""
        return builder.sign(self._private_key, self.SIGNATURE_HASH())

    def sign(self, data: bytes) -> bytes:
        """An ECDSA (SHA-384, DER) signature over `data`: e.g. an exported model's manifest
        (hfl_common.export_signature), verifiable with this key's federation certificate."""
        return self._private_key.sign(data, ec.ECDSA(self.SIGNATURE_HASH()))

    def private_key_pem_for_grpc(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM, only for grpc.ssl_*_credentials.

        grpcio accepts private keys only as PEM bytes. Hand the result directly to
        grpc.ssl_server_credentials / grpc.ssl_channel_credentials; never write it out.
        """
        return self._private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def __repr__(self) -> str:
        return f"EnclaveKey(P-384, spki_sha256={self.spki_sha256.hex()[:16]}...)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("an EnclaveKey cannot be pickled: the private key never leaves memory")


# --- quote helpers -------------------------------------------------------------------------


def report_data_unverified(quote: bytes) -> bytes:
    """report_data of an SGX quote, read from its bytes WITHOUT verifying anything.

    For diagnostics and for checking what an evidence provider returned; a relying
    party must take report_data from the verifier's verdict instead.
    """
    _check_quote_size(quote, "quote")
    return bytes(quote[REPORT_DATA_OFFSET : REPORT_DATA_OFFSET + REPORT_DATA_SIZE])


def user_data_from_report_data(report_data: bytes) -> bytes:
    """The caller's 32 bytes, report_data[32:64] (the aggregator's plan hash, or zeros)."""
    if len(report_data) != REPORT_DATA_SIZE:
        _fail(
            "report_data_malformed",
            f"report data is {len(report_data)} bytes; an SGX report carries {REPORT_DATA_SIZE}",
        )
    return bytes(report_data[KEY_BINDING_SIZE:])


def _pad_user_data(user_data: bytes) -> bytes:
    if len(user_data) > USER_DATA_SIZE:
        raise InvalidArgumentError(
            f"user data is {len(user_data)} bytes; report_data[32:64] holds at most "
            f"{USER_DATA_SIZE} (pass a hash)"
        )
    return user_data.ljust(USER_DATA_SIZE, b"\x00")


def _check_quote_size(quote: bytes, where: str) -> None:
    if not QUOTE_MIN_SIZE <= len(quote) <= QUOTE_MAX_SIZE:
        _fail(
            "quote_malformed",
            f"the {where} is {len(quote)} bytes; an SGX quote is {QUOTE_MIN_SIZE} to "
            f"{QUOTE_MAX_SIZE} bytes",
        )


def _quote_without_key_binding(quote: bytes) -> bytes:
    """Header and report body with report_data[0:32] cut out: what two quotes must share."""
    return bytes(quote[:REPORT_DATA_OFFSET]) + bytes(
        quote[REPORT_DATA_OFFSET + KEY_BINDING_SIZE : QUOTE_HEADER_SIZE + REPORT_BODY_SIZE]
    )


def _obtain_quote(provider: QuoteProvider, report_data: bytes, what: str) -> bytes:
    quote = bytes(provider.quote(report_data))
    _check_quote_size(quote, f"quote for the {what} extension")
    if report_data_unverified(quote) != report_data:
        _fail(
            "report_data_mismatch",
            f"the evidence provider returned a quote for the {what} extension whose report data "
            "is not the report data asked for",
        )
    return quote


# --- TCG DICE CBOR --------------------------------------------------------------------------


def _cbor_loads(data: bytes, what: str) -> Any:
    """Decode exactly one CBOR item from `data` (definite lengths, no duplicate keys)."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream,
            allow_indefinite=False,
            allow_duplicate_keys=False,
            max_depth=_CBOR_MAX_DEPTH,
        )
        item = decoder.decode()
    # The bytes come from the peer: whatever the decoder trips over (CBORDecodeError,
    # ValueError, OverflowError, RecursionError, ... from a semantic tag), it is malformed.
    except Exception as exc:
        _fail("evidence_malformed", f"the {what} is not valid CBOR: {exc}")
    if stream.tell() != len(data):
        _fail(
            "evidence_malformed",
            f"the {what} has {len(data) - stream.tell()} bytes after its CBOR item",
        )
    return item


def encode_pubkey_hash_claims(spki_sha256: bytes) -> bytes:
    """Gramine's serialized claims map {"pubkey-hash": bstr([1, SHA-256(SPKI)])}."""
    hash_entry = cbor2.dumps([IANA_HASH_SHA256, spki_sha256])
    return cbor2.dumps({PUBKEY_HASH_CLAIM: hash_entry})


def encode_tcg_dice_evidence(quote: bytes, claims: bytes) -> bytes:
    """Gramine's TCG DICE tagged evidence: tag 60000 over [bstr quote, bstr claims]."""
    return cbor2.dumps(cbor2.CBORTag(TCG_DICE_TEE_QUOTE_CBOR_TAG, [quote, claims]))


@dataclass(frozen=True)
class PubkeyHashClaim:
    """The "pubkey-hash" claim: an IANA hash algorithm id and the hash of the DER SPKI."""

    hash_alg_id: int
    value: bytes

    def matches(self, spki: bytes) -> bool:
        return hashlib.new(_IANA_HASHES[self.hash_alg_id], spki).digest() == self.value


@dataclass(frozen=True)
class TcgDiceEvidence:
    quote: bytes
    claims: bytes  # the serialized claims map, as hashed into the quote's report_data
    pubkey_hash: PubkeyHashClaim


def decode_tcg_dice_evidence(evidence: bytes) -> TcgDiceEvidence:
    """Read Gramine's TCG DICE tagged evidence; refuse anything else with EvidenceError."""
    what = "TCG DICE tagged evidence"
    tagged = _cbor_loads(evidence, what)
    if not isinstance(tagged, cbor2.CBORTag) or tagged.tag != TCG_DICE_TEE_QUOTE_CBOR_TAG:
        _fail(
            "evidence_malformed",
            f"the {what} is not CBOR tag {TCG_DICE_TEE_QUOTE_CBOR_TAG} (TEE quote)",
        )
    items = tagged.value
    if (
        not isinstance(items, list | tuple)
        or len(items) != 2
        or not all(isinstance(item, bytes) for item in items)
    ):
        _fail("evidence_malformed", f"the {what} is not an array [bstr quote, bstr claims]")
    quote, claims = bytes(items[0]), bytes(items[1])
    _check_quote_size(quote, f"quote in the {what}")
    claims_map = _cbor_loads(claims, "claims map of the TCG DICE evidence")
    if not isinstance(claims_map, Mapping) or not claims_map:
        _fail("evidence_malformed", "the TCG DICE claims are not a non-empty CBOR map")
    if not all(isinstance(key, str) and key for key in claims_map):
        _fail("evidence_malformed", "a TCG DICE claim name is not a non-empty text string")
    entry_bytes = claims_map.get(PUBKEY_HASH_CLAIM)
    if entry_bytes is None:
        _fail(
            "evidence_malformed",
            f"the TCG DICE claims have no {PUBKEY_HASH_CLAIM!r} claim binding the key",
        )
    if not isinstance(entry_bytes, bytes) or not entry_bytes:
        _fail("evidence_malformed", f"the {PUBKEY_HASH_CLAIM!r} claim is not a CBOR bstr")
    entry = _cbor_loads(entry_bytes, f"{PUBKEY_HASH_CLAIM!r} hash entry")
    if (
        not isinstance(entry, list | tuple)
        or len(entry) != 2
        or type(entry[0]) is not int
        or not isinstance(entry[1], bytes)
    ):
        _fail(
            "evidence_malformed",
            f"the {PUBKEY_HASH_CLAIM!r} claim is not a hash entry [uint alg-id, bstr value]",
        )
    alg_id, value = entry[0], bytes(entry[1])
    if alg_id not in _IANA_HASHES:
        _fail(
            "evidence_malformed",
            f"the {PUBKEY_HASH_CLAIM!r} claim uses hash algorithm id {alg_id}; "
            "supported are 1 (sha-256), 7 (sha-384), 8 (sha-512)",
        )
    expected = hashlib.new(_IANA_HASHES[alg_id]).digest_size
    if len(value) != expected:
        _fail(
            "evidence_malformed",
            f"the {PUBKEY_HASH_CLAIM!r} claim holds {len(value)} bytes for "
            f"{_IANA_HASHES[alg_id]}, which has {expected}",
        )
    return TcgDiceEvidence(quote, claims, PubkeyHashClaim(alg_id, value))


# --- making certificates --------------------------------------------------------------------


def tls_leaf_profile(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    """The extensions every hfl TLS leaf carries (RA-TLS and federation-issued alike):
    not a CA, digital signature only, usable as both server and client certificate."""
    return (
        builder.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )


def make_ra_tls_certificate(
    key: EnclaveKey,
    provider: QuoteProvider,
    *,
    user_data: bytes = b"",
    common_name: str = "hfl",
    dns_names: Sequence[str] = (),
    role: str | None = None,
    validity: dt.timedelta = DEFAULT_VALIDITY,
    now: dt.datetime | None = None,
    legacy_extension: bool = True,
) -> bytes:
    """A self-signed RA-TLS certificate (DER) for `key`, with quotes from `provider`.

    Two quotes are taken, as Gramine does: one for the legacy extension with
    report_data = SHA-256(SPKI) || user_data, one for the TCG DICE extension with
    report_data = SHA-256(claims) || user_data where the claims carry
    "pubkey-hash" = SHA-256(SPKI). `user_data` (at most 32 bytes) is zero-padded.

    With `legacy_extension=False` only the TCG DICE extension is written (one quote,
    about half the size; Gramine v1.8+ verifiers need no more). Use that for a
    certificate presented as a gRPC *client* certificate: grpcio (1.85) fails the
    mutual-TLS handshake ("Socket closed") when the client certificate is larger
    than about 8 KB, and two DCAP quotes make it about 10 KB. Server certificates
    are not affected.
    """
    if validity <= dt.timedelta(0):
        raise InvalidArgumentError(f"certificate validity must be positive, not {validity}")
    padded = _pad_user_data(user_data)
    general_names: list[x509.GeneralName] = [x509.DNSName(dns) for dns in dns_names]
    if role is not None:
        general_names.append(x509.UniformResourceIdentifier(role_san(role)))
    now = now or dt.datetime.now(dt.UTC)

    legacy_quote = (
        _obtain_quote(provider, key.spki_sha256 + padded, "legacy SGX quote")
        if legacy_extension
        else None
    )
    claims = encode_pubkey_hash_claims(key.spki_sha256)
    dice_quote = _obtain_quote(provider, _sha256(claims) + padded, "TCG DICE")
    evidence = encode_tcg_dice_evidence(dice_quote, claims)
    if len(evidence) > QUOTE_MAX_SIZE:
        # Gramine's verifier refuses extension values above SGX_QUOTE_MAX_SIZE.
        _fail(
            "quote_malformed",
            f"the TCG DICE evidence is {len(evidence)} bytes; Gramine accepts at most "
            f"{QUOTE_MAX_SIZE}",
        )

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    public_key = key.public_key
    builder = tls_leaf_profile(
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key), critical=False
        )
        # Gramine writes both non-critical (ra_tls_attest.c, generate_x509), and its
        # verifier refuses critical ones.
        .add_extension(
            x509.UnrecognizedExtension(TCG_DICE_TAGGED_EVIDENCE_OID, evidence), critical=False
        )
    )
    if legacy_quote is not None:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(LEGACY_QUOTE_OID, legacy_quote), critical=False
        )
    if general_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(general_names), critical=False)
    certificate = key.sign_certificate(builder)
    logger.debug(
        "made RA-TLS certificate for key %s with %s",
        key.spki_sha256.hex(),
        "TCG DICE and legacy quotes" if legacy_quote is not None else "a TCG DICE quote",
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def certificate_pem(der: bytes) -> bytes:
    """PEM of a DER certificate."""
    try:
        certificate = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        _fail("certificate_malformed", f"not a DER X.509 certificate: {exc}")
    return certificate.public_bytes(serialization.Encoding.PEM)


# --- reading certificates -------------------------------------------------------------------


@dataclass(frozen=True)
class RaTlsCertificate:
    """A parsed RA-TLS certificate. `quote` is the one to verify (DICE if present)."""

    certificate: x509.Certificate
    der: bytes
    quote: bytes
    quote_source: QuoteSource
    legacy_quote: bytes | None
    dice_evidence: TcgDiceEvidence | None
    spki_der: bytes
    spki_sha256: bytes

    @property
    def has_legacy_extension(self) -> bool:
        return self.legacy_quote is not None

    @property
    def has_tcg_dice_extension(self) -> bool:
        return self.dice_evidence is not None

    @property
    def expected_key_binding(self) -> bytes:
        """What the verified quote's report_data[0:32] must be for this certificate.

        SHA-256(SPKI) for a legacy quote; SHA-256(serialized claims) for a TCG DICE
        quote (whose "pubkey-hash" claim `check_key_binding` checks against the key).
        """
        if self.dice_evidence is not None:
            return _sha256(self.dice_evidence.claims)
        return self.spki_sha256

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)


def _load_certificate(data: bytes) -> x509.Certificate:
    if len(data) > MAX_CERTIFICATE_SIZE:
        _fail(
            "certificate_malformed",
            f"the certificate is {len(data)} bytes; more than the {MAX_CERTIFICATE_SIZE} accepted",
        )
    if data.lstrip().startswith(b"-----BEGIN"):
        try:
            certificates = x509.load_pem_x509_certificates(data)
        except (ValueError, x509.InvalidVersion) as exc:
            _fail("certificate_malformed", f"not a PEM X.509 certificate: {exc}")
        if len(certificates) != 1:
            _fail(
                "certificate_malformed",
                f"the PEM holds {len(certificates)} certificates; an RA-TLS certificate is one",
            )
        return certificates[0]
    try:
        return x509.load_der_x509_certificate(data)
    except (ValueError, x509.InvalidVersion) as exc:
        _fail("certificate_malformed", f"not a DER X.509 certificate: {exc}")


def _check_signature(certificate: x509.Certificate, issuer: x509.Certificate | None) -> None:
    signer = certificate if issuer is None else issuer
    what = "its own key (self-signed)" if issuer is None else "the given issuer"
    try:
        certificate.verify_directly_issued_by(signer)
    except InvalidSignature:
        _fail(
            "certificate_signature_invalid",
            f"the certificate's signature does not verify with {what}",
        )
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        _fail("certificate_signature_invalid", f"the certificate is not issued by {what}: {exc}")


def parse_ra_tls_certificate(
    data: bytes, *, issuer: x509.Certificate | None = None
) -> RaTlsCertificate:
    """Parse an RA-TLS certificate (DER or PEM), ours or one made by Gramine's library.

    Checks the signature (self-signed unless `issuer` is given), reads the quote from
    the TCG DICE and/or legacy extension, and when both are present checks that their
    quotes agree. Does not verify the quote, the key binding or the validity period:
    see hfl_common.tee, `check_key_binding` and `check_validity`.
    """
    data = bytes(data)
    certificate = _load_certificate(data)
    try:
        # Parses every extension (DuplicateExtension, malformed known extensions) and every
        # field read later: cryptography parses lazily and raises its own errors.
        extensions = certificate.extensions
        public_key = certificate.public_key()
        der = certificate.public_bytes(serialization.Encoding.DER)
        _ = (certificate.version, certificate.subject, certificate.issuer)
        _ = (certificate.not_valid_before_utc, certificate.not_valid_after_utc)
        _ = (certificate.signature_hash_algorithm, certificate.tbs_certificate_bytes)
    except (
        ValueError,
        TypeError,
        UnsupportedAlgorithm,
        x509.InvalidVersion,
        x509.DuplicateExtension,
        x509.UnsupportedGeneralNameType,
    ) as exc:
        _fail("certificate_malformed", f"the certificate cannot be read: {exc}")
    # Gramine's verifier (fill_crt_pk_der) accepts EC P-384 and P-256 keys only.
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1 | ec.SECP256R1
    ):
        _fail(
            "certificate_malformed",
            "the certificate key is not an EC P-384 or P-256 key, as RA-TLS requires",
        )
    _check_signature(certificate, issuer)

    legacy_quote: bytes | None = None
    dice: TcgDiceEvidence | None = None
    for extension in extensions:
        if extension.oid not in (LEGACY_QUOTE_OID, TCG_DICE_TAGGED_EVIDENCE_OID):
            continue
        value = extension.value
        if not isinstance(value, x509.UnrecognizedExtension):  # pragma: no cover - defensive
            _fail("certificate_malformed", f"extension {extension.oid.dotted_string} is unreadable")
        raw = bytes(value.value)
        if extension.oid == LEGACY_QUOTE_OID:
            if extension.critical:
                # Gramine's find_oid_in_cert_extensions refuses a critical quote extension.
                _fail("certificate_malformed", "the legacy SGX quote extension is marked critical")
            _check_quote_size(raw, "quote in the legacy SGX quote extension")
            legacy_quote = raw
        else:
            if not _GRAMINE_MIN_EXTENSION_SIZE <= len(raw) <= 2 * QUOTE_MAX_SIZE:
                _fail(
                    "evidence_malformed",
                    f"the TCG DICE evidence extension is {len(raw)} bytes; expected "
                    f"{_GRAMINE_MIN_EXTENSION_SIZE} to {2 * QUOTE_MAX_SIZE}",
                )
            dice = decode_tcg_dice_evidence(raw)

    if legacy_quote is None and dice is None:
        _fail(
            "no_quote_extension",
            "the certificate has neither Gramine's TCG DICE evidence extension "
            f"({TCG_DICE_TAGGED_EVIDENCE_OID.dotted_string}) nor its legacy SGX quote extension "
            f"({LEGACY_QUOTE_OID.dotted_string})",
        )
    if (
        legacy_quote is not None
        and dice is not None
        and _quote_without_key_binding(legacy_quote) != _quote_without_key_binding(dice.quote)
    ):
        _fail(
            "quote_extensions_disagree",
            "the quotes in the TCG DICE and legacy extensions differ in more than the key "
            "binding (report_data[0:32]): they do not come from one enclave with one user data",
        )

    spki = spki_der(public_key)
    if dice is not None:
        quote, source = dice.quote, QuoteSource.TCG_DICE
    else:
        assert legacy_quote is not None
        quote, source = legacy_quote, QuoteSource.LEGACY
    return RaTlsCertificate(
        certificate=certificate,
        der=der,
        quote=quote,
        quote_source=source,
        legacy_quote=legacy_quote,
        dice_evidence=dice,
        spki_der=spki,
        spki_sha256=_sha256(spki),
    )


def check_key_binding(cert: RaTlsCertificate, report_data: bytes) -> None:
    """Refuse unless `report_data` (from the verified `cert.quote`) binds the certificate key.

    Legacy quote: report_data[0:32] must be SHA-256(SPKI). TCG DICE quote:
    report_data[0:32] must be SHA-256(claims) and the claims' "pubkey-hash" must be
    the hash of the SPKI.
    """
    if len(report_data) != REPORT_DATA_SIZE:
        _fail(
            "report_data_malformed",
            f"report data is {len(report_data)} bytes; an SGX report carries {REPORT_DATA_SIZE}",
        )
    binding = bytes(report_data[:KEY_BINDING_SIZE])
    if binding != cert.expected_key_binding:
        what = (
            "SHA-256 of the TCG DICE claims"
            if cert.quote_source is QuoteSource.TCG_DICE
            else "SHA-256 of the certificate's SubjectPublicKeyInfo"
        )
        _fail(
            "report_data_mismatch",
            "the quote's report data does not bind this certificate's public key: "
            f"report_data[0:32] is {binding.hex()}, expected {what} "
            f"{cert.expected_key_binding.hex()}",
        )
    if cert.dice_evidence is not None and not cert.dice_evidence.pubkey_hash.matches(cert.spki_der):
        _fail(
            "report_data_mismatch",
            "the quote's report data does not bind this certificate's public key: the TCG DICE "
            f"{PUBKEY_HASH_CLAIM!r} claim {cert.dice_evidence.pubkey_hash.value.hex()} is not "
            "the hash of the certificate's SubjectPublicKeyInfo",
        )


def check_validity(cert: RaTlsCertificate | x509.Certificate, at: dt.datetime) -> None:
    """Refuse a certificate outside its validity period at `at` (timezone-aware)."""
    if at.tzinfo is None:
        raise InvalidArgumentError("check_validity needs a timezone-aware time")
    certificate = cert.certificate if isinstance(cert, RaTlsCertificate) else cert
    not_before = certificate.not_valid_before_utc
    not_after = certificate.not_valid_after_utc
    if at < not_before:
        _fail(
            "certificate_not_yet_valid",
            f"the certificate is not valid before {not_before.isoformat()}; "
            f"checked at {at.isoformat()}",
        )
    if at > not_after:
        _fail(
            "certificate_expired",
            f"the certificate expired at {not_after.isoformat()}; checked at {at.isoformat()}",
        )
