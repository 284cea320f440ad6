"""Who is calling: `PeerIdentity` from the client certificate, `current_peer()` in handlers,
and the `Authorizer` that decides whether a peer may call a method."""

from __future__ import annotations

import contextvars
import hashlib
from dataclasses import dataclass, field
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from hfl_common.errors import PermissionDeniedError, UnauthenticatedError
from hfl_common.identity import ROLE_SAN_PREFIX, SanNames


@dataclass(frozen=True)
class PeerIdentity:
    """Who is calling: the peer's verified TLS client certificate and what it says.

    `role`, `peer_id` and `party` come from the ``hfl://role/``, ``hfl://id/`` and
    ``hfl://party/`` URI SANs (hfl_common.identity); `party` is set only in trainer
    certificates whose party enrolment the attestation service checked. `address` is
    gRPC's peer string ("ipv4:127.0.0.1:53210"), for logs and anonymous limits only.
    """

    certificate: x509.Certificate = field(repr=False)
    role: str | None
    peer_id: str | None
    address: str
    party: str | None = None

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(Encoding.DER)

    @property
    def fingerprint_sha256(self) -> str:
        return hashlib.sha256(self.certificate_der).hexdigest()

    @classmethod
    def from_pem(cls, pem: bytes, address: str = "") -> PeerIdentity:
        """Parse a peer certificate; raise UnauthenticatedError if its hfl SANs are unusable."""
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as err:
            raise UnauthenticatedError(
                f"peer certificate is not a parsable X.509 PEM: {err}"
            ) from err
        role, peer_id, party = SanNames.of(certificate).single()
        return cls(
            certificate=certificate, role=role, peer_id=peer_id, address=address, party=party
        )


def party_of(peer: PeerIdentity) -> str:
    """The unit that per-party rules count: the enrolled party ("party:<name>") when the
    certificate names one, else the key itself ("key:<peer id or fingerprint>"), so a
    federation whose policy enrols no parties counts keys, as before."""
    if peer.party is not None:
        return f"party:{peer.party}"
    return f"key:{peer.peer_id or peer.fingerprint_sha256}"


CURRENT_PEER: contextvars.ContextVar[PeerIdentity] = contextvars.ContextVar("hfl_current_peer")


def current_peer() -> PeerIdentity:
    """The authenticated peer of the call this handler is serving.

    Set by the server interceptor for the whole call, streaming responses included (each
    step of a response generator runs in the call's context). Raises UnauthenticatedError
    when called outside a call served by `build_server`.
    """
    try:
        return CURRENT_PEER.get()
    except LookupError:
        raise UnauthenticatedError(
            "current_peer() called outside an RPC served by hfl_common.server"
        ) from None


class Authorizer(Protocol):
    """Decides whether `peer` may call `method` ("/hfl.v1.AggregatorService/Join").

    Returns None to allow; raises PermissionDeniedError (authenticated but not allowed) or
    UnauthenticatedError (identity unusable) with a message that names the method and role.
    """

    def authorize(self, method: str, peer: PeerIdentity) -> None: ...


@dataclass(frozen=True)
class RoleAuthorizer:
    """Allow-list of roles per full method name; every method not listed is refused."""

    allowed_roles: dict[str, frozenset[str]]

    def authorize(self, method: str, peer: PeerIdentity) -> None:
        allowed = self.allowed_roles.get(method)
        if allowed is None:
            raise PermissionDeniedError(f"method {method} is not open to any role")
        if peer.role is None:
            raise PermissionDeniedError(
                f"peer certificate has no {ROLE_SAN_PREFIX}<role> URI SAN; "
                f"{method} requires role {' or '.join(sorted(allowed))}"
            )
        if peer.role not in allowed:
            raise PermissionDeniedError(
                f"role {peer.role} may not call {method}; allowed: {', '.join(sorted(allowed))}"
            )
