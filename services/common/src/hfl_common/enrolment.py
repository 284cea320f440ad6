"""Parties, not keys: a trainer proves which enrolled party (organisation) it belongs to.

Enclave keys cost nothing, so counting trainer *certificates* lets one organisation bring
any number of votes. The policy therefore enrols **parties** (``[parties.<name>]`` with
the party's public enrolment key), and a trainer certificate names its party only after
the attestation service checked an **enrolment** the party's key signed.

An enrolment binds the party to one enclave key:

    message   = b"hfl party enrolment v1\\x00" || u16 len(name) || name (UTF-8)
                || SHA-256(trainer enclave key's DER SubjectPublicKeyInfo)
    signature = Sign(party private key, message)
                Ed25519, or ECDSA with SHA-256 for P-256 / P-384 keys

It travels inside the trainer's certificate signing request, as the non-critical
extension `ENROLMENT_OID` whose value is CBOR ``{"v": 1, "party": name, "sig": bytes}``;
the CSR is itself signed by the enclave key, and the quote binds that same key, so the
CA sees one chain: genuine enclave code -> this key -> this party. The CA then writes
``hfl://party/<name>`` (hfl_common.identity.party_san) into the trainer's certificate,
which `PeerIdentity.party` reads.

What it stops: a trainer of one party claiming another party (no signature), and a
copied enrolment reused for another key (it names the key's hash). What it does not:
whoever holds a party's private key can enrol any genuine trainer enclave for that party;
the per-party limits (one active trainer per party, parties counted for quorum and for
robust strategies) bound what that buys. Give the key to the trainer enclave only as a
protected (encrypted, sealed) file; in simulation the host can read it, like everything.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from hfl_common.errors import ConfigError, InvalidArgumentError, PermissionDeniedError
from hfl_common.identity import check_party

# A UUID-derived OID (ITU-T X.667, arc 2.25): needs no registration, cannot collide.
ENROLMENT_OID = x509.ObjectIdentifier("2.25.294670806551855143542399217146164428081")
ENROLMENT_VERSION = 1
_DOMAIN = b"hfl party enrolment v1\x00"
MAX_ENROLMENT_BYTES = 1024

PartyPublicKey = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
PartyPrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def enrolment_message(party: str, enclave_spki_sha256: bytes) -> bytes:
    """The bytes a party signs to enrol the enclave key with this SPKI SHA-256."""
    if len(enclave_spki_sha256) != 32:
        raise InvalidArgumentError(
            f"an enclave key hash is 32 bytes (SHA-256), got {len(enclave_spki_sha256)}"
        )
    name = check_party(party).encode()
    return _DOMAIN + struct.pack(">H", len(name)) + name + enclave_spki_sha256


def load_party_public_key(spki_der: bytes, where: str) -> PartyPublicKey:
    """A party's enrolment key from DER SubjectPublicKeyInfo; ConfigError naming `where`."""
    try:
        key = serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{where} is not a DER SubjectPublicKeyInfo: {exc}") from None
    if isinstance(key, ed25519.Ed25519PublicKey):
        return key
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
        key.curve, ec.SECP256R1 | ec.SECP384R1
    ):
        return key
    raise ConfigError(f"{where} must be an Ed25519, EC P-256 or EC P-384 public key")


def public_key_text(key: PartyPublicKey | PartyPrivateKey) -> str:
    """The policy's `public_key` value for a key: base64 of its DER SubjectPublicKeyInfo."""
    public: PartyPublicKey = (
        key.public_key()
        if isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
        else key
    )
    der = public.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(der).decode()


def parse_public_key_text(text: str, where: str) -> PartyPublicKey:
    try:
        der = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{where} is not base64 (of a DER SubjectPublicKeyInfo)") from None
    return load_party_public_key(der, where)


@dataclass(frozen=True)
class PartySigner:
    """A party's private enrolment key, able to enrol enclave keys for that party."""

    party: str
    key: PartyPrivateKey = field(repr=False)

    def __post_init__(self) -> None:
        check_party(self.party)

    @classmethod
    def load(cls, party: str, path: Path) -> PartySigner:
        """The party's private key from a PEM (PKCS#8) file; ConfigError when unusable."""
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read the party key {path}: {exc.strerror or exc}") from None
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"{path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey):
            raise ConfigError(f"{path}: a party key is Ed25519 or EC P-256/P-384")
        return cls(party, key)

    @classmethod
    def generate(cls, party: str) -> PartySigner:
        return cls(party, ed25519.Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def sign(self, enclave_spki_sha256: bytes) -> bytes:
        message = enrolment_message(self.party, enclave_spki_sha256)
        if isinstance(self.key, ed25519.Ed25519PrivateKey):
            return self.key.sign(message)
        return self.key.sign(message, ec.ECDSA(hashes.SHA256()))

    def extension(self, enclave_spki_sha256: bytes) -> x509.UnrecognizedExtension:
        """The CSR extension carrying this party's enrolment of the enclave key."""
        value = cbor2.dumps(
            {"v": ENROLMENT_VERSION, "party": self.party, "sig": self.sign(enclave_spki_sha256)}
        )
        return x509.UnrecognizedExtension(ENROLMENT_OID, value)


@dataclass(frozen=True)
class Enrolment:
    """An enrolment as read from a CSR, not yet verified."""

    party: str
    signature: bytes

    @classmethod
    def from_csr(cls, csr: x509.CertificateSigningRequest) -> Enrolment | None:
        """The CSR's enrolment, None when it carries none; InvalidArgumentError if garbled."""
        try:
            ext = csr.extensions.get_extension_for_oid(ENROLMENT_OID)
        except x509.ExtensionNotFound:
            return None
        except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
            raise InvalidArgumentError(f"the CSR's extensions are malformed: {exc}") from None
        value = ext.value
        raw = value.value if isinstance(value, x509.UnrecognizedExtension) else b""
        return cls.decode(raw)

    @classmethod
    def decode(cls, raw: bytes) -> Enrolment:
        if not raw or len(raw) > MAX_ENROLMENT_BYTES:
            raise InvalidArgumentError(
                f"the party enrolment is {len(raw)} bytes; expected 1 to {MAX_ENROLMENT_BYTES}"
            )
        try:
            data: Any = cbor2.loads(raw)
        except Exception as exc:  # cbor2 raises several types on garbage
            raise InvalidArgumentError(f"the party enrolment is not CBOR: {exc}") from None
        if (
            not isinstance(data, dict)
            or set(data) != {"v", "party", "sig"}
            or data["v"] != ENROLMENT_VERSION
            or not isinstance(data["party"], str)
            or not isinstance(data["sig"], bytes)
        ):
            raise InvalidArgumentError(
                'the party enrolment must be CBOR {"v": 1, "party": text, "sig": bytes}'
            )
        try:
            party = check_party(data["party"])
        except InvalidArgumentError as exc:
            raise InvalidArgumentError(f"the party enrolment: {exc}") from None
        return cls(party, data["sig"])

    def verify(self, key: PartyPublicKey, enclave_spki_sha256: bytes) -> None:
        """PermissionDeniedError("party_enrolment_invalid") unless the party's key signed
        this enrolment for exactly this enclave key."""
        message = enrolment_message(self.party, enclave_spki_sha256)
        try:
            if isinstance(key, ed25519.Ed25519PublicKey):
                key.verify(self.signature, message)
            else:
                key.verify(self.signature, message, ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            raise PermissionDeniedError(
                f"the enrolment for party {self.party} is not signed by that party's key for "
                f"this enclave key ({hashlib.sha256(message).hexdigest()[:16]}); an enrolment "
                "is valid only for the key it names",
                "party_enrolment_invalid",
            ) from None
