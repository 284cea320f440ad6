"""Relying parties: re-verifying a peer's attested certificate, server and client side."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Set
from typing import Any

import grpc
from cryptography import x509

from hfl_common.attest_client.certificates import ServiceCredentials
from hfl_common.attest_client.evidence import (
    _parse_or_refuse,
    _refused,
    embedded_evidence,
    fetch_server_certificate,
    verify_ra_tls_certificate,
)
from hfl_common.attest_client.names import (
    DEFAULT_TIMEOUT_SECONDS,
    OPERATOR_ROLE,
    PEER_CACHE_SIZE,
    spki_sha256_of,
    split_target,
)
from hfl_common.errors import (
    EvidenceError,
    PermissionDeniedError,
)
from hfl_common.identity import (
    key_dns_name,
)
from hfl_common.ratls import (
    USER_DATA_SIZE,
    user_data_from_report_data,
)
from hfl_common.server import (
    PeerIdentity,
    RoleAuthorizer,
    make_channel,
)
from hfl_common.tee.verify import QuoteVerifier, Verdict

logger = logging.getLogger("hfl_common.attest_client")


# --- relying parties ------------------------------------------------------------------------------


class PeerVerifier:
    """Re-verifies a TLS peer's embedded quote for the role its certificate names.

    Use as an hfl_common.server `Authorizer` (every method open to every attested peer)
    or inside `AttestedRoleAuthorizer`. Accepted verdicts are cached per certificate
    fingerprint until the certificate expires.
    """

    def __init__(
        self,
        verifier: QuoteVerifier,
        *,
        cache_size: int = PEER_CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.verifier = verifier
        self._clock = clock
        self._cache: OrderedDict[str, tuple[float, Verdict]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def _cached(self, fingerprint: str) -> Verdict | None:
        now = self._clock()
        with self._lock:
            entry = self._cache.get(fingerprint)
            if entry is None:
                return None
            expires, verdict = entry
            if now >= expires:
                del self._cache[fingerprint]
                return None
            self._cache.move_to_end(fingerprint)
            return verdict

    def _remember(self, fingerprint: str, expires: float, verdict: Verdict) -> None:
        with self._lock:
            self._cache[fingerprint] = (expires, verdict)
            self._cache.move_to_end(fingerprint)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._cache.clear()

    def verify_peer(self, peer: PeerIdentity) -> Verdict:
        """Raise PermissionDeniedError unless the peer's evidence holds; return the verdict."""
        fingerprint = peer.fingerprint_sha256
        cached = self._cached(fingerprint)
        if cached is not None:
            return cached
        role = peer.role
        who = f"peer {peer.peer_id or '?'} ({peer.address or 'unknown address'})"
        if role is None:
            raise PermissionDeniedError(f"{who} has no hfl://role/<role> in its certificate")
        if role == OPERATOR_ROLE:
            verdict = self._verify_operator(peer, who)
        else:
            try:
                # TLS verified the chain to the federation CA before this call
                cert = embedded_evidence(peer.certificate, None)
            except EvidenceError as exc:
                raise PermissionDeniedError(
                    f"{who} with role {role}: certificate carries no usable evidence: "
                    f"{exc.reason}: {exc}"
                ) from None
            verdict = verify_ra_tls_certificate(cert, self.verifier, role)
            if not verdict.accepted:
                raise PermissionDeniedError(
                    f"{who} with role {role}: evidence refused: {verdict.reason_code}: "
                    f"{verdict.reason}",
                    verdict.reason_code,
                )
        self._remember(fingerprint, peer.certificate.not_valid_after_utc.timestamp(), verdict)
        return verdict

    def _verify_operator(self, peer: PeerIdentity, who: str) -> Verdict:
        spki_sha = spki_sha256_of(peer.certificate)
        if spki_sha not in self.verifier.policy.operator_spki_sha256:
            raise PermissionDeniedError(
                f"{who}: operator key {spki_sha.hex()} is not in the policy's "
                "[operators] spki_sha256 list",
                "operator_not_allowed",
            )
        return Verdict(True, "ok", "operator key listed in the policy", OPERATOR_ROLE)

    def authorize(self, method: str, peer: PeerIdentity) -> None:
        self.verify_peer(peer)


class AttestedRoleAuthorizer:
    """Role allow-list per method (hfl_common.server.RoleAuthorizer) plus quote re-verification.

    ``AttestedRoleAuthorizer({"/hfl.v1.AggregatorService/GetStatus": {"operator", "trainer"}},
    peer_verifier)``: the role check runs first (cheap), then the peer's evidence.
    """

    def __init__(self, allowed_roles: Mapping[str, Set[str]], peer_verifier: PeerVerifier) -> None:
        self.roles = RoleAuthorizer({m: frozenset(r) for m, r in allowed_roles.items()})
        self.peer_verifier = peer_verifier

    def authorize(self, method: str, peer: PeerIdentity) -> None:
        self.roles.authorize(method, peer)
        self.peer_verifier.verify_peer(peer)


def connect_verified(
    target: str,
    credentials: ServiceCredentials,
    verifier: QuoteVerifier,
    role: str | tuple[str, ...],
    *,
    expected_user_data: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    options: tuple[tuple[str, Any], ...] = (),
    on_verdict: Callable[[Verdict], None] | None = None,
) -> grpc.Channel:
    """A channel to `target` after re-verifying the server's attested certificate.

    Reads the server's certificate (presenting ours, as mTLS peers require), checks it
    was issued by our federation CA and names `role` (or one of a tuple of roles: a
    trainer accepts the aggregator or a relay), verifies its quote for that role
    bound to its key, and, when `expected_user_data` is given, that report_data[32:64]
    equals it (zero-padded; the trainer passes its plan hash). The channel then trusts
    the federation CA and checks the key-pinned name of that certificate's key, so it
    can only ever talk to a certificate for that same key. `on_verdict` is given the
    accepted verdict (e.g. to show that the server's enclave is simulated).
    """
    host, port = split_target(target)
    cert_pem, key_pem = credentials.client_pem_pair()
    der = fetch_server_certificate(
        host, port, client_cert_pem=cert_pem, client_key_pem=key_pem, timeout=timeout
    )
    roles = (role,) if isinstance(role, str) else role
    who = f"{' or '.join(roles)} at {target}"
    ca = x509.load_pem_x509_certificates(credentials.current.ca_pem)[0]
    cert = _parse_or_refuse(der, who, issuer=ca)
    peer = PeerIdentity.from_pem(cert.pem, target)
    if peer.role not in roles:
        raise PermissionDeniedError(
            f"{who} refused: its certificate is for role {peer.role or 'none'}, not "
            f"{' or '.join(roles)}",
            "role_mismatch",
        )
    role = peer.role
    who = f"{role} at {target}"
    verdict = verify_ra_tls_certificate(cert, verifier, role)
    if not verdict.accepted or verdict.measurements is None:
        raise _refused(who, verdict)
    if expected_user_data is not None:
        expected = expected_user_data.ljust(USER_DATA_SIZE, b"\x00")
        attested = user_data_from_report_data(verdict.measurements.report_data)
        if attested != expected:
            raise PermissionDeniedError(
                f"{role}'s attested plan hash {attested.hex()} differs from this "
                f"{credentials_role(credentials)}'s plan {expected.hex()}",
                "user_data_mismatch",
            )
    if on_verdict is not None:
        on_verdict(verdict)
    return make_channel(
        target,
        credentials.channel_credentials(),
        target_name_override=key_dns_name(cert.spki_sha256),
        options=options,
    )


def credentials_role(credentials: ServiceCredentials) -> str:
    """The role our own current certificate names ("trainer"), for messages."""
    peer = PeerIdentity.from_pem(credentials.current.cert_pem)
    return peer.role or "service"
