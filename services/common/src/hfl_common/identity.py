"""Every name an hfl certificate carries, in one place: roles, ids, parties, DNS names.

A federation certificate (issued by hfl_attestation.ca) and every CSR or self-signed
RA-TLS certificate hfl makes use one scheme:

- URI SAN ``hfl://role/<role>``: the role (exactly one per certificate);
- URI SAN ``hfl://id/<hex>``: a stable id of the key, the first 16 hex digits of
  SHA-256(SPKI) (`peer_id_for`), at most one;
- URI SAN ``hfl://party/<name>``: the enrolled party (organisation) a trainer belongs
  to, at most one; written by the CA only after it checked the party's enrolment
  signature (hfl_common.enrolment);
- DNS SAN ``<role>.hfl.internal`` (`role_dns_name`): the name gRPC checks a server
  certificate against (gRPC's hostname check ignores URI SANs);
- DNS SAN ``k-<first 32 hex of SHA-256(SPKI)>.hfl.internal`` (`key_dns_name`): the
  key-pinned name a client that re-verified a server's quote dials it by.

The ``.internal`` top-level domain is reserved for private use (ICANN board resolution
2024.07.29.06), so these names can never resolve to anyone else's host. Role and party
names are DNS labels (lowercase letters, digits and '-', starting with a letter), so the
one regular expression below serves URIs and DNS names alike.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from hfl_common.errors import InvalidArgumentError, UnauthenticatedError

ROLE_SAN_PREFIX = "hfl://role/"
ID_SAN_PREFIX = "hfl://id/"
PARTY_SAN_PREFIX = "hfl://party/"
# The `.internal` TLD is reserved for private use (ICANN board resolution 2024.07.29.06).
ROLE_DNS_SUFFIX = ".hfl.internal"
KEY_DNS_PREFIX = "k-"
# 128 bits of the key hash in the DNS name: collision-resistant, and fits a DNS label.
KEY_DNS_HEX_DIGITS = 32
PEER_ID_HEX_DIGITS = 16

# One rule for role and party names: a DNS label that starts with a letter.
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
HEX_ID_RE = re.compile(r"^[0-9a-f]{1,128}$")

_NAME_RULE = "lowercase letters, digits and '-', starting with a letter, at most 63 characters"


def check_role(role: str) -> str:
    """`role` if it is a valid role name; ConfigError otherwise."""
    if not NAME_RE.fullmatch(role):
        raise InvalidArgumentError(f"role {role!r} is not a valid role name ({_NAME_RULE})")
    return role


def check_party(party: str) -> str:
    """`party` if it is a valid party name; ConfigError otherwise."""
    if not NAME_RE.fullmatch(party):
        raise InvalidArgumentError(f"party {party!r} is not a valid party name ({_NAME_RULE})")
    return party


def role_san(role: str) -> str:
    """The URI SAN that names a certificate's role: ``hfl://role/<role>``."""
    return ROLE_SAN_PREFIX + check_role(role)


def id_san(peer_id: str) -> str:
    """The URI SAN that names a certificate's stable id: ``hfl://id/<lowercase hex>``."""
    if not HEX_ID_RE.fullmatch(peer_id):
        raise InvalidArgumentError(f"peer id {peer_id!r} is not lowercase hex of 1 to 128 digits")
    return ID_SAN_PREFIX + peer_id


def party_san(party: str) -> str:
    """The URI SAN that names a trainer's enrolled party: ``hfl://party/<name>``."""
    return PARTY_SAN_PREFIX + check_party(party)


def role_dns_name(role: str) -> str:
    """The DNS SAN a server certificate of `role` carries, for gRPC's hostname check."""
    return check_role(role) + ROLE_DNS_SUFFIX


def spki_der(public_key: PublicKeyTypes | x509.Certificate) -> bytes:
    """DER SubjectPublicKeyInfo of a public key (or of a certificate's key)."""
    key = public_key.public_key() if isinstance(public_key, x509.Certificate) else public_key
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def spki_sha256(public_key: PublicKeyTypes | x509.Certificate) -> bytes:
    """SHA-256 of the DER SubjectPublicKeyInfo: what report_data[0:32] binds."""
    return hashlib.sha256(spki_der(public_key)).digest()


def peer_id_for(spki_sha256: bytes) -> str:
    """A peer's stable id: the first 16 hex digits of SHA-256 of its key's SPKI."""
    return spki_sha256.hex()[:PEER_ID_HEX_DIGITS]


def key_dns_name(spki_sha256: bytes) -> str:
    """The key-pinned DNS name ``k-<first 32 hex of SHA-256(SPKI)>.hfl.internal``.

    A client that verified a server's quote for key K dials it with this name as the TLS
    target name, so its channel only ever accepts a certificate issued for K.
    """
    if len(spki_sha256) != 32:
        raise InvalidArgumentError(f"an SPKI SHA-256 is 32 bytes, got {len(spki_sha256)}")
    return KEY_DNS_PREFIX + spki_sha256.hex()[:KEY_DNS_HEX_DIGITS] + ROLE_DNS_SUFFIX


@dataclass(frozen=True)
class SanNames:
    """The hfl names in a certificate's or CSR's SubjectAlternativeName, unvalidated."""

    roles: tuple[str, ...]
    ids: tuple[str, ...]
    parties: tuple[str, ...]
    dns: tuple[str, ...]

    @classmethod
    def of(cls, cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> SanNames:
        try:
            san = cert_or_csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        except x509.ExtensionNotFound:
            return cls((), (), (), ())
        except ValueError:  # a malformed extension: no names to trust
            raise UnauthenticatedError(
                "the certificate's SubjectAlternativeName extension is malformed"
            ) from None
        uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.value.get_values_for_type(x509.DNSName)

        def with_prefix(prefix: str) -> tuple[str, ...]:
            return tuple(u.removeprefix(prefix) for u in uris if u.startswith(prefix))

        return cls(
            roles=with_prefix(ROLE_SAN_PREFIX),
            ids=with_prefix(ID_SAN_PREFIX),
            parties=with_prefix(PARTY_SAN_PREFIX),
            dns=tuple(dns),
        )

    def single(self) -> tuple[str | None, str | None, str | None]:
        """(role, id, party), each validated; UnauthenticatedError when any is unusable."""
        if len(self.roles) > 1:
            raise UnauthenticatedError(
                f"peer certificate carries {len(self.roles)} role SANs ({', '.join(self.roles)}); "
                f"exactly one {ROLE_SAN_PREFIX}<role> URI is allowed"
            )
        if len(self.ids) > 1:
            raise UnauthenticatedError(
                f"peer certificate carries {len(self.ids)} id SANs; "
                f"at most one {ID_SAN_PREFIX}<hex>"
            )
        if len(self.parties) > 1:
            raise UnauthenticatedError(
                f"peer certificate carries {len(self.parties)} party SANs "
                f"({', '.join(self.parties)}); at most one {PARTY_SAN_PREFIX}<name>"
            )
        role = self.roles[0] if self.roles else None
        peer_id = self.ids[0] if self.ids else None
        party = self.parties[0] if self.parties else None
        if role is not None and not NAME_RE.fullmatch(role):
            raise UnauthenticatedError(f"peer certificate role SAN {role!r} is malformed")
        if peer_id is not None and not HEX_ID_RE.fullmatch(peer_id):
            raise UnauthenticatedError(f"peer certificate id SAN {peer_id!r} is not lowercase hex")
        if party is not None and not NAME_RE.fullmatch(party):
            raise UnauthenticatedError(f"peer certificate party SAN {party!r} is malformed")
        return role, peer_id, party


def roles_in(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    """The roles named by ``hfl://role/`` URIs in a certificate's or CSR's SAN."""
    return list(SanNames.of(cert_or_csr).roles)
