"""Verifying and pinning the attestation service (`bootstrap_attestation_service`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import grpc

from hfl_common.api import attestation_pb2_grpc
from hfl_common.attest_client.evidence import (
    _parse_or_refuse,
    _refused,
    fetch_server_certificate,
    verify_ra_tls_certificate,
)
from hfl_common.attest_client.names import ATTESTATION_ROLE, DEFAULT_TIMEOUT_SECONDS, split_target
from hfl_common.errors import (
    UnavailableError,
)
from hfl_common.freshness import GenerationMemory, decode_generation
from hfl_common.identity import (
    KEY_DNS_HEX_DIGITS,
    key_dns_name,
)
from hfl_common.ratls import (
    RaTlsCertificate,
    user_data_from_report_data,
)
from hfl_common.server import (
    make_channel,
)
from hfl_common.tee.verify import QuoteVerifier, Verdict

logger = logging.getLogger("hfl_common.attest_client")


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
