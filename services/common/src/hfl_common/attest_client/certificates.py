"""Our own certificate: evidence, issuance by the federation CA, credentials, renewal."""

from __future__ import annotations

import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from cryptography import x509

from hfl_common.api import attestation_pb2
from hfl_common.attest_client.bootstrap import PinnedAttestationService
from hfl_common.attest_client.names import (
    BUSY_RETRY_SECONDS,
    DEFAULT_TIMEOUT_SECONDS,
    OPERATOR_ROLE,
    RENEW_AT_FRACTION,
    role_proto,
    spki_sha256_of,
)
from hfl_common.enrolment import PartySigner
from hfl_common.errors import (
    HflError,
    InvalidArgumentError,
    PermissionDeniedError,
    UnauthenticatedError,
    UnavailableError,
)
from hfl_common.ratls import (
    USER_DATA_SIZE,
    EnclaveKey,
    QuoteProvider,
)
from hfl_common.server import (
    ServerCertificate,
)

logger = logging.getLogger("hfl_common.attest_client")


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
                lambda: pinned.stub.IssueCertificate(request, timeout=timeout), BUSY_RETRY_SECONDS
            )
        except grpc.RpcError as err:
            if not isinstance(err, grpc.Call) or err.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            # restarted (new key) or unreachable: verify it again and retry once
            logger.info("attestation service %s unavailable; re-verifying it", pinned.target)
            pinned.repin()
            response = _while_busy(
                lambda: pinned.stub.IssueCertificate(request, timeout=timeout), BUSY_RETRY_SECONDS
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
