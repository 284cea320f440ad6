"""The federation's certificate authority: an EC P-384 key that exists only sealed at rest.

The CA key is generated inside the attestation enclave at its first start and written
only through `hfl_common.sealing` (AES-256-GCM under a key bound to this enclave's
MRENCLAVE on this machine): another enclave, another build of this service, or the
host reading the state directory gets ciphertext. The CA certificate itself is public
and stored in clear beside it. On restart the sealed key is reloaded, so certificates
issued before the restart still chain to the CA.

Leaf certificates (see `FederationCA.issue`) are short-lived and carry:

- URI SAN ``hfl://role/<role>`` and ``hfl://id/<first 16 hex of SHA-256(SPKI)>``
  (hfl_common.identity's convention, read back by `PeerIdentity`), and for a trainer of
  an enrolled party ``hfl://party/<name>``;
- DNS SAN ``<role>.hfl.internal`` (`role_dns_name`) and the key-pinned name
  ``k-<first 32 hex of SHA-256(SPKI)>.hfl.internal`` (`key_dns_name`), which a client
  that has re-verified a server's quote uses as the TLS target name, so its channel
  can only ever reach a certificate for that very key;
- EKU serverAuth and clientAuth (each service is both server and client);
- the verified SGX quote, copied in Gramine's RA-TLS extension that carried it, so
  relying parties can re-check the evidence against policy themselves.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from hfl_common.errors import ConfigError, InvalidArgumentError
from hfl_common.identity import (
    id_san,
    key_dns_name,
    party_san,
    peer_id_for,
    role_dns_name,
    role_san,
)
from hfl_common.ratls import tls_leaf_profile
from hfl_common.sealing import SealingKeySource, read_sealed, write_atomic, write_sealed

logger = logging.getLogger(__name__)

CA_COMMON_NAME = "hfl federation CA"
CA_KEY_FILE = "ca_key.sealed"
CA_CERT_FILE = "ca_cert.pem"
# Associated data of the sealed CA key: a sealed file for another purpose never opens as it.
CA_KEY_SEAL_PURPOSE = "hfl-attestation/federation-ca-key/v1"
CA_VALIDITY = dt.timedelta(days=365)
# Re-issue the CA certificate (same key, same name) when less than this is left.
CA_RENEW_BEFORE = dt.timedelta(days=30)
# Backdate not_before for peers whose clocks run a little behind ours.
CLOCK_SKEW = dt.timedelta(minutes=5)
# Certificate signing requests larger than this are not looked at.
MAX_CSR_BYTES = 16 * 1024
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def load_csr(csr_der: bytes) -> x509.CertificateSigningRequest:
    """Parse a DER PKCS#10 request and check its self-signature (proof of key possession).

    Only EC P-384 and P-256 keys are accepted (the RA-TLS key types Gramine uses).
    """
    if not csr_der:
        raise InvalidArgumentError("the certificate signing request is empty")
    if len(csr_der) > MAX_CSR_BYTES:
        raise InvalidArgumentError(
            f"the certificate signing request is {len(csr_der)} bytes; at most {MAX_CSR_BYTES}"
        )
    try:
        csr = x509.load_der_x509_csr(bytes(csr_der))
        valid = csr.is_signature_valid
        public_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm, x509.InvalidVersion) as exc:
        raise InvalidArgumentError(
            f"the certificate signing request is not DER PKCS#10: {exc}"
        ) from None
    if not valid:
        raise InvalidArgumentError(
            "the certificate signing request's signature does not verify with its own key "
            "(the requester does not hold the private key)"
        )
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not isinstance(
        public_key.curve, ec.SECP384R1 | ec.SECP256R1
    ):
        raise InvalidArgumentError(
            "the certificate signing request's key is not an EC P-384 or P-256 key"
        )
    return csr


def csr_spki_der(csr: x509.CertificateSigningRequest) -> bytes:
    return csr.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_label(label: str) -> str:
    """A label is for logs and the subject CN only; never part of an identity."""
    if not label:
        return ""
    if not _LABEL_RE.fullmatch(label):
        raise InvalidArgumentError(
            f"label {label!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return label


@dataclass(frozen=True)
class IssuedLeaf:
    """A certificate the CA issued, with what callers ask of it most."""

    certificate: x509.Certificate
    peer_id: str

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def not_after(self) -> dt.datetime:
        return self.certificate.not_valid_after_utc


class FederationCA:
    """Issues short-lived leaf certificates for attested keys; see the module docstring."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
        spki = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if key.public_key().public_bytes(der, spki) != certificate.public_key().public_bytes(
            der, spki
        ):
            raise ConfigError("the CA certificate does not belong to the unsealed CA key")
        self._key = key
        self.certificate = certificate

    # -- creation and persistence ---------------------------------------------------

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        sealing: SealingKeySource,
        *,
        validity: dt.timedelta = CA_VALIDITY,
        now: dt.datetime | None = None,
    ) -> FederationCA:
        """Unseal the CA key from `state_dir`, or make and seal a new one at first start."""
        now = now or dt.datetime.now(dt.UTC)
        state_dir = Path(state_dir)
        key_path = state_dir / CA_KEY_FILE
        cert_path = state_dir / CA_CERT_FILE
        if key_path.exists():
            key_der = read_sealed(sealing, CA_KEY_SEAL_PURPOSE, key_path)
            loaded = serialization.load_der_private_key(key_der, password=None)
            if not isinstance(loaded, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{key_path} does not hold an EC private key")
            key = loaded
            try:
                certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            except (OSError, ValueError):
                logger.warning("CA certificate %s missing or unreadable; re-issuing it", cert_path)
                certificate = _self_sign(key, now, validity)
                write_atomic(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
            if certificate.not_valid_after_utc - now < CA_RENEW_BEFORE:
                logger.info(
                    "CA certificate expires %s; re-issuing it", certificate.not_valid_after_utc
                )
                certificate = _self_sign(key, now, validity)
                write_atomic(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
            logger.info("unsealed the federation CA key from %s", key_path)
            return cls(key, certificate)
        state_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP384R1())
        key_der = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_sealed(sealing, CA_KEY_SEAL_PURPOSE, key_path, key_der)
        certificate = _self_sign(key, now, validity)
        write_atomic(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
        logger.info("created the federation CA; its key is sealed in %s", key_path)
        return cls(key, certificate)

    @property
    def pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def fingerprint_sha256(self) -> str:
        return hashlib.sha256(self.certificate.public_bytes(serialization.Encoding.DER)).hexdigest()

    # -- issuing ----------------------------------------------------------------------

    def issue(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        role: str,
        evidence_extensions: Sequence[x509.Extension[x509.ExtensionType]],
        lifetime_seconds: int,
        label: str = "",
        now: dt.datetime | None = None,
        party: str | None = None,
    ) -> IssuedLeaf:
        """Sign a leaf for the CSR's key. The caller has verified the key's evidence (and,
        for `party`, the party's enrolment of the key)."""
        now = now or dt.datetime.now(dt.UTC)
        if lifetime_seconds <= 0:
            raise InvalidArgumentError(f"certificate lifetime {lifetime_seconds} s is not positive")
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidArgumentError("only EC keys get federation certificates")
        spki_sha = hashlib.sha256(csr_spki_der(csr)).digest()
        peer_id = peer_id_for(spki_sha)
        not_after = min(
            now + dt.timedelta(seconds=lifetime_seconds), self.certificate.not_valid_after_utc
        )
        subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hfl federation")]
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, check_label(label) or role))
        builder = tls_leaf_profile(
            x509.CertificateBuilder()
            .subject_name(x509.Name(subject))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.UniformResourceIdentifier(role_san(role)),
                        x509.UniformResourceIdentifier(id_san(peer_id)),
                        *(
                            [x509.UniformResourceIdentifier(party_san(party))]
                            if party is not None
                            else []
                        ),
                        x509.DNSName(role_dns_name(role)),
                        x509.DNSName(key_dns_name(spki_sha)),
                    ]
                ),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        for extension in evidence_extensions:
            builder = builder.add_extension(extension.value, critical=extension.critical)
        certificate = builder.sign(self._key, hashes.SHA384())
        logger.info(
            "issued a %s certificate for key %s (label %r) valid until %s",
            role,
            peer_id,
            label,
            not_after.isoformat(),
        )
        return IssuedLeaf(certificate=certificate, peer_id=peer_id)

    def verify_issued(self, certificate: x509.Certificate) -> None:
        """Raise InvalidArgumentError unless `certificate` was signed by this CA's key."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise InvalidArgumentError(
                f"the certificate was not issued by this federation CA: {exc or 'bad signature'}"
            ) from None


def _self_sign(
    key: ec.EllipticCurvePrivateKey, now: dt.datetime, validity: dt.timedelta
) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hfl federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME),
        ]
    )
    public_key = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    return builder.sign(key, hashes.SHA384())
