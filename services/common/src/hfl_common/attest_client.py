"""The client side of the federation's attestation: bootstrap, pinning, credentials, re-checks.

How a service comes to talk mutual, attested TLS (DESIGN.md, "Trust model"):

1. `bootstrap_attestation_service`: read the attestation service's self-signed RA-TLS
   certificate with a bare TLS handshake (`fetch_server_certificate`, no verification
   there), verify the quote in it for role "attestation" under the agreed policy and
   check that it binds the certificate's key, then open a gRPC channel that trusts
   exactly that certificate (it is the only root) and checks the key-pinned name in it.
   From then on the channel can only reach the enclave whose quote was verified.
2. `obtain_certificate`: generate evidence for our own enclave key (a quote with
   report_data = SHA-256(SPKI) || user data) and have the attestation service, the
   federation CA, issue a short-lived certificate for that key.
3. `ServiceCredentials`: our key and current certificate, as gRPC server credentials
   (mTLS, client certificates required, chained to the federation CA; renewable without
   restart) and channel credentials. `Renewer` re-issues the certificate at about 2/3
   of its lifetime with fresh evidence.
4. Relying parties do not stop at "the CA signed it": `PeerVerifier` (server side, as
   an `Authorizer`) re-verifies the quote copied into the peer's certificate for the
   role its SAN names, bound to that certificate's key; `connect_verified` (client side)
   does the same for the server before a channel is used, checks its attested user
   data (the aggregator's plan hash), and pins the channel to that key's name.

Names in federation certificates (issued by hfl_attestation.ca): URI SANs
``hfl://role/<role>`` and ``hfl://id/<peer_id_for(spki)>``, DNS SANs
``<role>.hfl.internal`` and ``key_dns_name(spki)`` = ``k-<32 hex>.hfl.internal``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import os
import random
import socket
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Set
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization

from hfl_common.api import attestation_pb2, attestation_pb2_grpc
from hfl_common.enrolment import PartySigner
from hfl_common.errors import (
    EvidenceError,
    HflError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from hfl_common.freshness import GenerationMemory, decode_generation
from hfl_common.identity import KEY_DNS_HEX_DIGITS, spki_sha256

# Re-exported from their former home; the names scheme lives in hfl_common.identity.
from hfl_common.identity import KEY_DNS_PREFIX as KEY_DNS_PREFIX  # noqa: PLC0414
from hfl_common.identity import PEER_ID_HEX_DIGITS as PEER_ID_HEX_DIGITS  # noqa: PLC0414
from hfl_common.identity import key_dns_name as key_dns_name  # noqa: PLC0414
from hfl_common.identity import peer_id_for as peer_id_for  # noqa: PLC0414
from hfl_common.ratls import (
    LEGACY_QUOTE_OID,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    USER_DATA_SIZE,
    EnclaveKey,
    QuoteProvider,
    QuoteSource,
    RaTlsCertificate,
    TcgDiceEvidence,
    check_key_binding,
    check_validity,
    decode_tcg_dice_evidence,
    parse_ra_tls_certificate,
    report_data_unverified,
    user_data_from_report_data,
)
from hfl_common.server import (
    PeerIdentity,
    RoleAuthorizer,
    ServerCertificate,
    make_channel,
)
from hfl_common.tee.verify import QuoteVerifier, Verdict

logger = logging.getLogger(__name__)

ATTESTATION_ROLE = "attestation"
OPERATOR_ROLE = "operator"
TRAINER_ROLE = "trainer"
ENCLAVE_ROLES = ("attestation", "aggregator", "trainer")


DEFAULT_TIMEOUT_SECONDS = 10.0
# Renew at this fraction of a certificate's lifetime.
RENEW_AT_FRACTION = 2 / 3
# Peer verdicts kept in a PeerVerifier's cache (each until its certificate expires).
PEER_CACHE_SIZE = 4096

_PROTO_BY_ROLE: Mapping[str, attestation_pb2.Role] = {
    "attestation": attestation_pb2.ROLE_ATTESTATION,
    "aggregator": attestation_pb2.ROLE_AGGREGATOR,
    "trainer": attestation_pb2.ROLE_TRAINER,
    "operator": attestation_pb2.ROLE_OPERATOR,
}
_ROLE_BY_PROTO: Mapping[int, str] = {int(value): name for name, value in _PROTO_BY_ROLE.items()}


# --- names ------------------------------------------------------------------------------------


def role_name(role: int) -> str:
    """The role's name for an hfl.v1.Role value; InvalidArgumentError for UNSPECIFIED/unknown."""
    name = _ROLE_BY_PROTO.get(int(role))
    if name is None:
        raise InvalidArgumentError(
            f"role {role} is not one of ROLE_ATTESTATION, ROLE_AGGREGATOR, ROLE_TRAINER, "
            "ROLE_OPERATOR"
        )
    return name


def role_proto(name: str) -> attestation_pb2.Role:
    """The hfl.v1.Role value for a role name ("trainer" -> ROLE_TRAINER)."""
    value = _PROTO_BY_ROLE.get(name)
    if value is None:
        raise InvalidArgumentError(
            f"role {name!r} is not one of {', '.join(sorted(_PROTO_BY_ROLE))}"
        )
    return value


def spki_sha256_of(certificate: x509.Certificate) -> bytes:
    """SHA-256 of a certificate's DER SubjectPublicKeyInfo (hfl_common.identity)."""
    return spki_sha256(certificate)


def split_target(target: str) -> tuple[str, int]:
    """ "host:port" (or "[v6]:port") -> (host, port); InvalidArgumentError otherwise."""
    host, sep, port_text = target.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidArgumentError(f"target {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


# --- raw TLS ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _in_memory_pem(data: bytes) -> Iterator[str | None]:
    """A path to `data` held in anonymous memory (memfd), never on disk; None if unsupported.

    Python's ssl module loads certificate chains and keys only from paths; a memfd's
    /proc/self/fd path gives it the bytes without writing the private key to a file.
    """
    create = getattr(os, "memfd_create", None)
    if create is None:
        yield None
        return
    try:
        fd = create("hfl-tls-client", getattr(os, "MFD_CLOEXEC", 0))
    except OSError:
        yield None
        return
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def fetch_server_certificate(
    host: str,
    port: int,
    *,
    client_cert_pem: bytes | None = None,
    client_key_pem: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
) -> bytes:
    """Read a TLS server's leaf certificate (DER) with a bare handshake, verifying NOTHING.

    The caller verifies the certificate next, by attestation (its quote, bound to its
    key), and then pins it; that is why no chain or name check happens here. Presenting
    a client certificate (peers that require mTLS) is optional: with TLS 1.3 the server's
    certificate arrives before ours is looked at. The client key is handed to OpenSSL
    through an in-memory file (memfd), never written to disk.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # verified by attestation afterwards; see above
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["h2"])
    with contextlib.ExitStack() as stack:
        if client_cert_pem is not None and client_key_pem is not None:
            path = stack.enter_context(_in_memory_pem(client_cert_pem + b"\n" + client_key_pem))
            if path is not None:
                try:
                    context.load_cert_chain(path)
                except (ssl.SSLError, OSError) as exc:
                    logger.warning("cannot present the client certificate: %s", exc)
        try:
            with (
                socket.create_connection((host, port), timeout=timeout) as sock,
                context.wrap_socket(sock, server_hostname=None) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError) as exc:
            raise UnavailableError(
                f"cannot read the TLS certificate of {host}:{port}: {exc}", "tls_unreachable"
            ) from None
    if not der:
        raise UnavailableError(f"{host}:{port} presented no TLS certificate", "tls_no_certificate")
    return bytes(der)


# --- evidence checks ----------------------------------------------------------------------------


def verify_ra_tls_certificate(
    cert: RaTlsCertificate,
    verifier: QuoteVerifier,
    role: str,
    *,
    at: int | None = None,
) -> Verdict:
    """Verify a parsed RA-TLS certificate's quote for `role` and its binding to the key.

    Returns the verifier's Verdict; a quote that does not bind the certificate's key
    comes back as a refusal with reason code "report_data_mismatch".
    """
    verdict = verifier.verify_quote(
        cert.quote, role, report_data_prefix=cert.expected_key_binding, at=at
    )
    if not verdict.accepted or verdict.measurements is None:
        return verdict
    try:
        check_key_binding(cert, verdict.measurements.report_data)
    except EvidenceError as exc:
        return Verdict(
            False,
            exc.reason_code,
            str(exc),
            role,
            verdict.tcb_status,
            verdict.advisory_ids,
            verdict.measurements,
            verdict.simulated,
        )
    return verdict


def embedded_evidence(
    certificate: x509.Certificate, issuer: x509.Certificate | None
) -> RaTlsCertificate:
    """The evidence the federation CA copied into a leaf it issued, as a RaTlsCertificate.

    `parse_ra_tls_certificate` expects self-signed RA-TLS certificates; a federation leaf
    is signed by the CA instead. With `issuer` given its signature is checked here;
    without, the caller vouches that TLS already verified the chain (a server reading
    its peer's certificate from the auth context). The CA copies exactly one evidence
    extension (the one whose quote it verified); two are refused.
    """
    if issuer is not None:
        try:
            certificate.verify_directly_issued_by(issuer)
        except (InvalidSignature, ValueError, TypeError) as exc:
            raise EvidenceError(
                f"the certificate is not issued by the federation CA: {exc or 'bad signature'}",
                "certificate_signature_invalid",
            ) from None
    try:
        extensions = list(certificate.extensions)
        spki = certificate.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    except (ValueError, x509.DuplicateExtension) as exc:
        raise EvidenceError(
            f"the certificate cannot be read: {exc}", "certificate_malformed"
        ) from None
    legacy: bytes | None = None
    dice: TcgDiceEvidence | None = None
    for extension in extensions:
        value = extension.value
        if not isinstance(value, x509.UnrecognizedExtension):
            continue
        if extension.oid == LEGACY_QUOTE_OID:
            legacy = bytes(value.value)
            report_data_unverified(legacy)  # size check: EvidenceError("quote_malformed")
        elif extension.oid == TCG_DICE_TAGGED_EVIDENCE_OID:
            dice = decode_tcg_dice_evidence(bytes(value.value))
    if legacy is not None and dice is not None:
        raise EvidenceError(
            "the certificate carries two evidence extensions; a federation certificate "
            "carries the one quote the CA verified",
            "quote_extensions_disagree",
        )
    if dice is not None:
        quote, source = dice.quote, QuoteSource.TCG_DICE
    elif legacy is not None:
        quote, source = legacy, QuoteSource.LEGACY
    else:
        raise EvidenceError(
            "the certificate carries no SGX quote (neither Gramine's legacy nor its TCG DICE "
            "evidence extension)",
            "no_quote_extension",
        )
    return RaTlsCertificate(
        certificate=certificate,
        der=certificate.public_bytes(serialization.Encoding.DER),
        quote=quote,
        quote_source=source,
        legacy_quote=legacy,
        dice_evidence=dice,
        spki_der=spki,
        spki_sha256=hashlib.sha256(spki).digest(),
    )


def _refused(who: str, verdict: Verdict) -> PermissionDeniedError:
    return EvidenceError(
        f"{who} refused: {verdict.reason_code}: {verdict.reason}", verdict.reason_code
    )


def _parse_or_refuse(der: bytes, who: str, issuer: x509.Certificate | None) -> RaTlsCertificate:
    """Self-signed RA-TLS (issuer None) or a federation leaf (issuer = the CA); valid now."""
    try:
        if issuer is None:
            cert = parse_ra_tls_certificate(der)
        else:
            try:
                leaf = x509.load_der_x509_certificate(der)
            except ValueError as exc:
                raise EvidenceError(
                    f"not a DER X.509 certificate: {exc}", "certificate_malformed"
                ) from None
            cert = embedded_evidence(leaf, issuer)
        check_validity(cert, dt.datetime.now(dt.UTC))
    except EvidenceError as exc:
        raise EvidenceError(f"{who} refused: {exc.reason_code}: {exc}", exc.reason_code) from None
    return cert


# --- bootstrap ----------------------------------------------------------------------------------


@dataclass
class PinnedAttestationService:
    """A channel to an attestation service whose RA-TLS certificate was verified and pinned.

    The attestation service makes a new TLS key at every start, so after its restart the
    pin no longer matches and calls fail with UNAVAILABLE. `repin` verifies the service
    at the same target again (its new certificate, its quote, under the same policy)
    and pins the new key; `obtain_certificate` does that once by itself, so certificate
    renewal survives a restart of the attestation service.
    """

    target: str
    channel: grpc.Channel
    certificate: RaTlsCertificate
    verdict: Verdict
    verifier: QuoteVerifier | None = None
    timeout: float = DEFAULT_TIMEOUT_SECONDS
    memory: GenerationMemory | None = None

    @property
    def stub(self) -> attestation_pb2_grpc.AttestationServiceStub:
        return attestation_pb2_grpc.AttestationServiceStub(self.channel)

    def repin(self) -> None:
        """Re-verify the service at `target` and pin its current key (see the class doc)."""
        if self.verifier is None:
            raise UnavailableError(f"attestation service {self.target}: no verifier to re-pin")
        fresh = bootstrap_attestation_service(
            self.target, self.verifier, timeout=self.timeout, memory=self.memory
        )
        old = self.channel
        self.channel, self.certificate, self.verdict = (
            fresh.channel,
            fresh.certificate,
            fresh.verdict,
        )
        old.close()

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> PinnedAttestationService:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def bootstrap_attestation_service(
    target: str,
    verifier: QuoteVerifier,
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    memory: GenerationMemory | None = None,
) -> PinnedAttestationService:
    """Verify the attestation service at `target` by its RA-TLS certificate, then pin it.

    With `memory`, the state generation the service attests must not be lower than the
    highest this client saw (hfl_common.freshness); a lower one is refused with reason
    ``attestation_rollback``.

    Raises EvidenceError (a PermissionDeniedError) with the reason when its evidence is
    refused ("attestation service 127.0.0.1:7400 refused: mrenclave_mismatch: ..."),
    before anything is sent to it; UnavailableError when it cannot be reached.
    """
    host, port = split_target(target)
    who = f"attestation service {target}"
    der = fetch_server_certificate(host, port, timeout=timeout)
    cert = _parse_or_refuse(der, who, issuer=None)
    verdict = verify_ra_tls_certificate(cert, verifier, ATTESTATION_ROLE)
    if not verdict.accepted:
        raise _refused(who, verdict)
    if memory is not None and verdict.measurements is not None:
        attested = user_data_from_report_data(verdict.measurements.report_data)
        memory.check(decode_generation(attested), who)
    # The only root is the certificate just verified, and the name checked is the one
    # derived from its key: the channel reaches that enclave key or nothing.
    credentials = grpc.ssl_channel_credentials(root_certificates=cert.pem)
    channel = make_channel(target, credentials, target_name_override=key_dns_name(cert.spki_sha256))
    logger.info(
        "attestation service %s verified (MRENCLAVE %s) and pinned to key %s",
        target,
        verdict.measurements.mrenclave.hex() if verdict.measurements else "?",
        cert.spki_sha256.hex()[:KEY_DNS_HEX_DIGITS],
    )
    return PinnedAttestationService(
        target=target,
        channel=channel,
        certificate=cert,
        verdict=verdict,
        verifier=verifier,
        timeout=timeout,
        memory=memory,
    )


# --- certificates ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the federation CA issued for our key, and that CA."""

    cert_pem: bytes
    ca_pem: bytes
    not_after: dt.datetime
    issued_at: dt.datetime

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def lifetime(self) -> dt.timedelta:
        return self.not_after - self.issued_at


def _error_from_status(err: grpc.RpcError, what: str) -> HflError:
    code = err.code() if isinstance(err, grpc.Call) else None
    details = err.details() if isinstance(err, grpc.Call) else str(err)
    message = f"{what}: {details}"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return PermissionDeniedError(message)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidArgumentError(message)
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return UnauthenticatedError(message)
    return UnavailableError(f"{what}: {code.name if code else 'error'}: {details}")


_T = TypeVar("_T")


def _while_busy(call: Callable[[], _T], budget_seconds: float) -> _T:
    """Run `call`, retrying with backoff while the server answers RESOURCE_EXHAUSTED (its
    per-address or overall limits: many enclaves bootstrapping at once), for at most
    `budget_seconds`; then the last refusal is raised."""
    deadline = time.monotonic() + budget_seconds
    delay = 0.1
    while True:
        try:
            return call()
        except grpc.RpcError as err:
            busy = isinstance(err, grpc.Call) and err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            if not busy or time.monotonic() + delay > deadline:
                raise
            logger.info("attestation service busy (%s); retrying in %.1f s", err.details(), delay)
        time.sleep(delay * (0.5 + random.random() / 2))
        delay = min(delay * 2, 2.0)


def evidence_quote(key: EnclaveKey, provider: QuoteProvider, user_data: bytes = b"") -> bytes:
    """A quote binding `key`: report_data = SHA-256(SPKI) || user_data (zero-padded)."""
    if len(user_data) > USER_DATA_SIZE:
        raise InvalidArgumentError(
            f"user data is {len(user_data)} bytes; report_data[32:64] holds {USER_DATA_SIZE}"
        )
    return provider.quote(key.spki_sha256 + user_data.ljust(USER_DATA_SIZE, b"\x00"))


def obtain_certificate(
    pinned: PinnedAttestationService,
    key: EnclaveKey,
    provider: QuoteProvider | None,
    role: str,
    label: str = "",
    user_data: bytes = b"",
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    party: PartySigner | None = None,
) -> IssuedCertificate:
    """Ask the federation CA for a certificate for `key` in `role`, with fresh evidence.

    Enclave roles send a quote from `provider` binding the key (and `user_data`, e.g. the
    aggregator's plan hash, in report_data[32:64]); the operator role sends none (its key
    must be listed in the policy). A trainer of an enrolled party passes its `party`
    signer: the CSR then carries the party's enrolment of `key` (hfl_common.enrolment)
    and the certificate names the party. Refusals raise PermissionDeniedError with the
    reason.
    """
    role_value = role_proto(role)
    extensions = [party.extension(key.spki_sha256)] if party is not None else []
    request = attestation_pb2.IssueCertificateRequest(
        csr=key.csr(label or role, (), role, extensions), role=role_value, label=label
    )
    if role != OPERATOR_ROLE:
        if provider is None:
            raise InvalidArgumentError(f"role {role} needs an evidence provider for its quote")
        request.evidence.sgx_quote = evidence_quote(key, provider, user_data)
    try:
        try:
            response = _while_busy(
                lambda: pinned.stub.IssueCertificate(request, timeout=timeout), timeout
            )
        except grpc.RpcError as err:
            if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            # restarted (new key) or unreachable: verify it again and retry once
            logger.info("attestation service %s unavailable; re-verifying it", pinned.target)
            pinned.repin()
            response = _while_busy(
                lambda: pinned.stub.IssueCertificate(request, timeout=timeout), timeout
            )
    except grpc.RpcError as err:
        raise _error_from_status(err, f"certificate for role {role} refused") from None
    cert_pem = response.certificate_pem.encode()
    ca_pem = response.ca_certificates_pem.encode()
    try:
        certificate = x509.load_pem_x509_certificate(cert_pem)
        ca_cert = x509.load_pem_x509_certificates(ca_pem)[0]
        certificate.verify_directly_issued_by(ca_cert)
    except Exception as exc:
        raise InvalidArgumentError(
            f"the attestation service returned an unusable certificate: {exc}"
        ) from None
    if spki_sha256_of(certificate) != key.spki_sha256:
        raise InvalidArgumentError("the attestation service returned a certificate for another key")
    issued = IssuedCertificate(
        cert_pem=cert_pem,
        ca_pem=ca_pem,
        not_after=certificate.not_valid_after_utc,
        issued_at=dt.datetime.now(dt.UTC),
    )
    logger.info("obtained a %s certificate valid until %s", role, issued.not_after.isoformat())
    return issued


class ServiceCredentials:
    """Our enclave key and current federation certificate, as gRPC credentials.

    Thread-safe; `update` swaps the certificate (the Renewer calls it). Servers built
    with `server_credentials()` pick a renewed certificate up for every new connection;
    `channel_credentials()` reflects the certificate current when it is called.
    """

    def __init__(self, key: EnclaveKey, issued: IssuedCertificate) -> None:
        self.key = key
        self._lock = threading.Lock()
        self._issued = issued
        # grpcio takes the key only as PEM bytes: made once, kept in memory only.
        self._key_pem = key.private_key_pem_for_grpc()

    @property
    def current(self) -> IssuedCertificate:
        with self._lock:
            return self._issued

    def update(self, issued: IssuedCertificate) -> None:
        if spki_sha256_of(issued.certificate) != self.key.spki_sha256:
            raise InvalidArgumentError("a renewed certificate must be for the same enclave key")
        with self._lock:
            self._issued = issued

    def server_certificate(self) -> ServerCertificate:
        """The current certificate as hfl_common.server wants it (a CredentialsProvider)."""
        issued = self.current
        return ServerCertificate(
            private_key_pem=self._key_pem,
            certificate_chain_pem=issued.cert_pem,
            client_ca_pem=issued.ca_pem,
        )

    def server_credentials(self) -> Callable[[], ServerCertificate]:
        """For build_server(credentials=...): mTLS with client certificates REQUIRED,
        chained to the federation CA, re-read before every new handshake (renewal)."""
        return self.server_certificate

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Trust the federation CA; present our current certificate as the client cert."""
        issued = self.current
        return grpc.ssl_channel_credentials(
            root_certificates=issued.ca_pem,
            private_key=self._key_pem,
            certificate_chain=issued.cert_pem,
        )

    def client_pem_pair(self) -> tuple[bytes, bytes]:
        """(certificate PEM, private key PEM) for a raw TLS handshake; memory only."""
        return self.current.cert_pem, self._key_pem


class Renewer:
    """Re-issues our certificate at ~2/3 of its lifetime with fresh evidence, no restart.

    `renew` is whatever obtains a new certificate (usually a closure over
    `obtain_certificate`); failures are logged and retried with backoff, and the
    current certificate stays in use until it expires.
    """

    def __init__(
        self,
        credentials: ServiceCredentials,
        renew: Callable[[], IssuedCertificate],
        *,
        fraction: float = RENEW_AT_FRACTION,
        min_retry_seconds: float = 1.0,
        on_renewed: Callable[[IssuedCertificate], None] | None = None,
    ) -> None:
        if not 0 < fraction < 1:
            raise InvalidArgumentError(f"renewal fraction {fraction} must be in (0, 1)")
        self._credentials = credentials
        self._renew = renew
        self._fraction = fraction
        self._min_retry = min_retry_seconds
        self._on_renewed = on_renewed
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.failures = 0

    def renew_now(self) -> IssuedCertificate:
        """Obtain a new certificate now and install it; raises what `renew` raises."""
        with self._lock:
            issued = self._renew()
            self._credentials.update(issued)
        logger.info("certificate renewed; valid until %s", issued.not_after.isoformat())
        if self._on_renewed is not None:
            self._on_renewed(issued)
        return issued

    def seconds_until_renewal(self) -> float:
        issued = self._credentials.current
        due = issued.issued_at + issued.lifetime * self._fraction
        return max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds())

    def _run(self) -> None:
        while not self._stop.wait(self.seconds_until_renewal()):
            try:
                self.renew_now()
                self.failures = 0
            except Exception as exc:
                self.failures += 1
                not_after = self._credentials.current.not_after
                left = (not_after - dt.datetime.now(dt.UTC)).total_seconds()
                delay = max(self._min_retry, min(60.0, left / 10))
                logger.warning(
                    "certificate renewal failed (%d in a row, %.0f s of validity left): %s; "
                    "retrying in %.0f s",
                    self.failures,
                    left,
                    exc,
                    delay,
                )
                if self._stop.wait(delay):
                    return

    def start(self) -> Renewer:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hfl-cert-renewer", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


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
    role: str,
    *,
    expected_user_data: bytes | None = None,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    options: tuple[tuple[str, Any], ...] = (),
    on_verdict: Callable[[Verdict], None] | None = None,
) -> grpc.Channel:
    """A channel to `target` after re-verifying the server's attested certificate.

    Reads the server's certificate (presenting ours, as mTLS peers require), checks it
    was issued by our federation CA and names `role`, verifies its quote for `role`
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
    who = f"{role} at {target}"
    ca = x509.load_pem_x509_certificates(credentials.current.ca_pem)[0]
    cert = _parse_or_refuse(der, who, issuer=ca)
    peer = PeerIdentity.from_pem(cert.pem, target)
    if peer.role != role:
        raise PermissionDeniedError(
            f"{who} refused: its certificate is for role {peer.role or 'none'}, not {role}",
            "role_mismatch",
        )
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
