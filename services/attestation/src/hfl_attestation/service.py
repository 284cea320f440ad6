"""The attestation service: verifies SGX evidence under the policy and issues certificates.

`start_attestation_service` is the builder main() and the tests use. At start it

1. unseals (or creates and seals) the federation CA key (hfl_attestation.ca), and raises
   its sealed state generation by one (hfl_common.freshness: clients refuse a service
   whose generation went back, i.e. whose sealed state was rolled back);
2. generates its own TLS key in the enclave and a SELF-SIGNED RA-TLS certificate for it
   (quote from the evidence provider, report_data[0:32] = SHA-256(SPKI),
   report_data[32:48] = the state generation, Gramine's
   extensions; DNS SANs ``attestation.hfl.internal`` and the key-pinned name), which
   clients verify and pin (hfl_common.attest_client.bootstrap_attestation_service);
3. serves gRPC over TLS with that certificate. Client certificates are not asked for on
   this port: a fresh enclave has none yet and proves itself in-band with evidence in
   IssueCertificate. TLS is still mandatory; there is no plaintext port.

RPCs (hfl.v1.AttestationService):

- IssueCertificate: the CSR's self-signature must verify. Enclave roles (attestation,
  aggregator, trainer) must send evidence (a raw quote, or an RA-TLS certificate) that
  the QuoteVerifier accepts for that role AND that binds the CSR's key
  (report_data[0:32] = SHA-256(CSR SPKI), or the TCG DICE claims for it). The operator
  role sends no evidence: its SPKI SHA-256 must be in the policy's operator list.
  Refusals: PERMISSION_DENIED with the verdict's reason; unreadable requests or
  evidence: INVALID_ARGUMENT.
- VerifyEvidence: the verdict, accepted or not (a policy refusal is an answer, not an
  error); evidence that cannot be read at all, or none, is INVALID_ARGUMENT with the
  reason, as in IssueCertificate.

Callers without a client certificate (every enclave before its first certificate) reach
only `ANONYMOUS_METHODS`, rate-limited per IP address (hfl_common.server.CallLimits):
reflection and health Watch are closed to them.
- GetTrustBundle: CA certificate, this service's RA-TLS certificate, policy SHA-256.
- GetPolicy: the policy text as loaded, and its SHA-256.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter

from hfl_attestation.ca import FederationCA, csr_spki_der, load_csr
from hfl_common.api import attestation_pb2, attestation_pb2_grpc
from hfl_common.attest_client import (
    ATTESTATION_ROLE,
    OPERATOR_ROLE,
    TRAINER_ROLE,
    role_name,
    verify_ra_tls_certificate,
)
from hfl_common.config import AttestationPolicy
from hfl_common.enrolment import Enrolment
from hfl_common.errors import EvidenceError, InvalidArgumentError, PermissionDeniedError
from hfl_common.freshness import advance_generation, encode_generation
from hfl_common.identity import key_dns_name, role_dns_name, roles_in
from hfl_common.ratls import (
    LEGACY_QUOTE_OID,
    TCG_DICE_TAGGED_EVIDENCE_OID,
    EnclaveKey,
    QuoteProvider,
    QuoteSource,
    RaTlsCertificate,
    certificate_pem,
    make_ra_tls_certificate,
    parse_ra_tls_certificate,
)
from hfl_common.sealing import SealingKeySource
from hfl_common.server import (
    HEALTH_CHECK_METHOD,
    PeerIdentity,
    RunningServer,
    ServerCertificate,
    ServerConfig,
    ServiceRegistration,
    build_server,
)
from hfl_common.tee.verify import QuoteVerifier, Verdict

logger = logging.getLogger(__name__)

SERVICE_NAME = "hfl.v1.AttestationService"
# The service's own RA-TLS certificate; clients re-bootstrap when it changes (restart).
SELF_CERTIFICATE_VALIDITY = dt.timedelta(days=30)
# Evidence that is not readable at all is a malformed request, not a refusal.
_MALFORMED_CODES = frozenset(
    {"quote_malformed", "certificate_malformed", "evidence_malformed", "report_data_malformed"}
)


# What an anonymous caller may call: bootstrap (the trust bundle and policy, a certificate
# for its evidence), checking evidence, and the health probe.
ANONYMOUS_METHODS = frozenset(
    {
        f"/{SERVICE_NAME}/IssueCertificate",
        f"/{SERVICE_NAME}/VerifyEvidence",
        f"/{SERVICE_NAME}/GetTrustBundle",
        f"/{SERVICE_NAME}/GetPolicy",
        HEALTH_CHECK_METHOD,
    }
)


class AttestationMetrics:
    """hfl_attestation_certificates_issued_total{role} and refusals{role,reason}."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.issued = Counter(
            "hfl_attestation_certificates_issued_total",
            "Certificates the federation CA issued, by role",
            ["role"],
            registry=registry,
        )
        self.refused = Counter(
            "hfl_attestation_certificate_refusals_total",
            "Certificate requests refused, by role and reason code",
            ["role", "reason"],
            registry=registry,
        )


def _refusal(verdict: Verdict) -> EvidenceError:
    message = f"evidence refused for role {verdict.role}: {verdict.reason}"
    if verdict.reason_code in _MALFORMED_CODES:
        return _MalformedEvidenceError(message, verdict.reason_code)
    return EvidenceError(message, verdict.reason_code)


class _MalformedEvidenceError(EvidenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


def _parse_evidence_certificate(der: bytes, role: str) -> RaTlsCertificate:
    try:
        return parse_ra_tls_certificate(der)
    except EvidenceError as exc:
        raise _MalformedEvidenceError(
            f"evidence for role {role} is not a usable RA-TLS certificate: {exc}", exc.reason_code
        ) from None


class AttestationServicer(attestation_pb2_grpc.AttestationServiceServicer):
    """The gRPC handlers; errors are hfl_common.errors, mapped to status codes at the edge."""

    def __init__(
        self,
        *,
        ca: FederationCA,
        verifier: QuoteVerifier,
        policy: AttestationPolicy,
        own_certificate_pem: bytes,
        metrics: AttestationMetrics,
    ) -> None:
        self._ca = ca
        self._verifier = verifier
        self._policy = policy
        self._own_pem = own_certificate_pem
        self._own_lock = threading.Lock()
        self._metrics = metrics

    # -- IssueCertificate -------------------------------------------------------------

    @property
    def own_certificate_pem(self) -> bytes:
        with self._own_lock:
            return self._own_pem

    def replace_own_certificate(self, pem: bytes) -> None:
        with self._own_lock:
            self._own_pem = pem

    def IssueCertificate(  # noqa: N802 - gRPC method name
        self, request: attestation_pb2.IssueCertificateRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.IssueCertificateResponse:
        role = role_name(request.role)
        try:
            return self._issue(request, role)
        except EvidenceError as exc:
            self._metrics.refused.labels(role=role, reason=exc.reason_code).inc()
            raise
        except PermissionDeniedError as exc:
            self._metrics.refused.labels(role=role, reason=exc.reason).inc()
            raise

    def _issue(
        self, request: attestation_pb2.IssueCertificateRequest, role: str
    ) -> attestation_pb2.IssueCertificateResponse:
        csr = load_csr(request.csr)
        csr_roles = roles_in(csr)
        if csr_roles and csr_roles != [role]:
            raise InvalidArgumentError(
                f"the CSR names role {', '.join(csr_roles)} but the request asks for {role}"
            )
        spki_sha = hashlib.sha256(csr_spki_der(csr)).digest()
        party = self._enrolled_party(csr, role, spki_sha)
        extensions: list[x509.Extension[x509.ExtensionType]] = []
        if role == OPERATOR_ROLE:
            if spki_sha not in self._policy.operator_spki_sha256:
                raise PermissionDeniedError(
                    f"operator key {spki_sha.hex()} is not in the policy's [operators] "
                    "spki_sha256 list",
                    "operator_not_allowed",
                )
            verdict = Verdict(True, "ok", "operator key listed in the policy", role)
        else:
            verdict, extensions = self._verify_enclave_evidence(request.evidence, role, spki_sha)
        leaf = self._ca.issue(
            csr,
            role=role,
            evidence_extensions=extensions,
            lifetime_seconds=self._policy.certificate_lifetime_seconds,
            label=request.label,
            party=party,
        )
        self._metrics.issued.labels(role=role).inc()
        response = attestation_pb2.IssueCertificateResponse(
            certificate_pem=leaf.pem.decode(),
            ca_certificates_pem=self._ca.pem.decode(),
            verdict=verdict.to_proto(),
        )
        response.not_after.FromDatetime(leaf.not_after)
        return response

    def _enrolled_party(
        self, csr: x509.CertificateSigningRequest, role: str, spki_sha: bytes
    ) -> str | None:
        """The party a trainer's CSR proves it belongs to (hfl_common.enrolment), or None
        when the policy enrols no parties; refusals say what is missing."""
        enrolment = Enrolment.from_csr(csr)
        parties = self._policy.parties
        if role != TRAINER_ROLE:
            if enrolment is not None:
                raise InvalidArgumentError(
                    f"only trainers enrol in a party; the {role} CSR carries an enrolment"
                )
            return None
        if enrolment is None:
            if parties:
                raise PermissionDeniedError(
                    "this federation's policy enrols parties "
                    f"({', '.join(sorted(parties))}); a trainer must present an enrolment "
                    "signed by its party's key (trainer flags --party NAME --party-key FILE)",
                    "party_enrolment_missing",
                )
            return None
        party = parties.get(enrolment.party)
        if party is None:
            raise PermissionDeniedError(
                f"party {enrolment.party} is not enrolled in this federation's policy "
                f"(enrolled: {', '.join(sorted(parties)) or 'none'})",
                "party_not_enrolled",
            )
        enrolment.verify(party.public_key, spki_sha)
        return party.name

    def _verify_enclave_evidence(
        self, evidence: attestation_pb2.Evidence, role: str, spki_sha: bytes
    ) -> tuple[Verdict, list[x509.Extension[x509.ExtensionType]]]:
        """Verify evidence binding the CSR key; return the verdict and the extension(s)
        carrying the verified quote, to be copied into the leaf."""
        kind = evidence.WhichOneof("kind")
        if kind == "sgx_quote":
            quote = bytes(evidence.sgx_quote)
            verdict = self._verifier.verify_quote(quote, role, report_data_prefix=spki_sha)
            if not verdict.accepted:
                raise _refusal(verdict)
            return verdict, [
                x509.Extension(
                    LEGACY_QUOTE_OID, False, x509.UnrecognizedExtension(LEGACY_QUOTE_OID, quote)
                )
            ]
        if kind == "ra_tls_certificate":
            cert = _parse_evidence_certificate(bytes(evidence.ra_tls_certificate), role)
            if cert.spki_sha256 != spki_sha:
                raise PermissionDeniedError(
                    f"evidence refused for role {role}: the RA-TLS certificate is for key "
                    f"{cert.spki_sha256.hex()}, not the CSR's key {spki_sha.hex()}",
                    "report_data_mismatch",
                )
            verdict = verify_ra_tls_certificate(cert, self._verifier, role)
            if not verdict.accepted:
                raise _refusal(verdict)
            # Copy the extension whose quote was verified (and only it): a relying party
            # re-verifies exactly that evidence, bound to this same key.
            oid = (
                TCG_DICE_TAGGED_EVIDENCE_OID
                if cert.quote_source is QuoteSource.TCG_DICE
                else LEGACY_QUOTE_OID
            )
            original = cert.certificate.extensions.get_extension_for_oid(oid)
            return verdict, [x509.Extension(oid, False, original.value)]
        raise PermissionDeniedError(
            f"evidence refused for role {role}: no evidence was sent; enclave roles must send "
            "an SGX quote or an RA-TLS certificate binding the CSR's key",
            "evidence_missing",
        )

    # -- VerifyEvidence ---------------------------------------------------------------

    def VerifyEvidence(  # noqa: N802 - gRPC method name
        self, request: attestation_pb2.VerifyEvidenceRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.VerifyEvidenceResponse:
        role = role_name(request.role)
        at = request.at.seconds if request.HasField("at") else None
        kind = request.evidence.WhichOneof("kind")
        if kind == "sgx_quote":
            verdict = self._verifier.verify_quote(bytes(request.evidence.sgx_quote), role, at=at)
        elif kind == "ra_tls_certificate":
            cert = _parse_evidence_certificate(bytes(request.evidence.ra_tls_certificate), role)
            verdict = verify_ra_tls_certificate(cert, self._verifier, role, at=at)
        else:
            raise InvalidArgumentError(
                "VerifyEvidence needs evidence: an sgx_quote or an ra_tls_certificate"
            )
        if not verdict.accepted and verdict.reason_code in _MALFORMED_CODES:
            # Unreadable evidence is a malformed request, as in IssueCertificate.
            raise _refusal(verdict)
        return attestation_pb2.VerifyEvidenceResponse(verdict=verdict.to_proto())

    # -- trust bundle and policy ------------------------------------------------------

    def GetTrustBundle(  # noqa: N802 - gRPC method name
        self, request: attestation_pb2.GetTrustBundleRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.GetTrustBundleResponse:
        return attestation_pb2.GetTrustBundleResponse(
            ca_certificates_pem=self._ca.pem.decode(),
            attestation_certificate_pem=self.own_certificate_pem.decode(),
            policy_sha256=self._policy.sha256.hex(),
        )

    def GetPolicy(  # noqa: N802 - gRPC method name
        self, request: attestation_pb2.GetPolicyRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.GetPolicyResponse:
        return attestation_pb2.GetPolicyResponse(
            policy_toml=self._policy.text, policy_sha256=self._policy.sha256.hex()
        )


class OpenAuthorizer:
    """Every method of the attestation service is open: evidence is checked in-band."""

    def authorize(self, method: str, peer: PeerIdentity) -> None:
        return None


@dataclass(frozen=True)
class AttestationServiceConfig:
    """How the attestation service runs. Built once in main() and passed down."""

    server: ServerConfig
    state_dir: Path
    self_certificate_validity: dt.timedelta = field(default=SELF_CERTIFICATE_VALIDITY)


@dataclass
class RunningAttestationService:
    """A started attestation service: its server, CA and own RA-TLS certificate."""

    server: RunningServer
    ca: FederationCA
    key_dns_name: str
    servicer: AttestationServicer
    own_certificate: OwnCertificate
    generation: int = 0  # the sealed state's generation, attested (hfl_common.freshness)

    @property
    def certificate_pem(self) -> bytes:
        """Our current self-signed RA-TLS certificate (renewed before it expires)."""
        return self.servicer.own_certificate_pem

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def target(self) -> str:
        return self.server.address

    def stop(self, grace: float | None = None) -> None:
        self.server.stop(grace)


def start_attestation_service(
    config: AttestationServiceConfig,
    *,
    policy: AttestationPolicy,
    verifier: QuoteVerifier,
    provider: QuoteProvider,
    sealing: SealingKeySource,
    registry: CollectorRegistry,
) -> RunningAttestationService:
    """Unseal/create the CA, make our RA-TLS certificate, serve; SERVING when done."""
    if config.server.require_client_auth:
        raise InvalidArgumentError(
            "the attestation service's ServerConfig must set require_client_auth=False: "
            "enclaves without a certificate prove themselves in-band"
        )
    ca = FederationCA.load_or_create(config.state_dir, sealing)
    # Raised and sealed before serving; attested in our own certificate (freshness).
    generation = advance_generation(config.state_dir, sealing)
    key = EnclaveKey.generate()
    pinned_name = key_dns_name(key.spki_sha256)
    own = OwnCertificate(
        key,
        provider,
        verifier,
        config.self_certificate_validity,
        user_data=encode_generation(generation),
    )
    own_pem = own.renew()
    servicer = AttestationServicer(
        ca=ca,
        verifier=verifier,
        policy=policy,
        own_certificate_pem=own_pem,
        metrics=AttestationMetrics(registry),
    )
    key_pem = key.private_key_pem_for_grpc()

    def credentials() -> ServerCertificate:
        # Re-read before every handshake: a renewed certificate needs no restart. Client
        # certificates are optional here; those presented must chain to the federation CA.
        return ServerCertificate(key_pem, servicer.own_certificate_pem, ca.pem)

    server_config = config.server
    if server_config.limits.anonymous_methods is None:
        server_config = dataclasses.replace(
            server_config,
            limits=dataclasses.replace(server_config.limits, anonymous_methods=ANONYMOUS_METHODS),
        )
    server = build_server(
        server_config,
        services=[
            ServiceRegistration(
                name=SERVICE_NAME,
                servicer=servicer,
                add_to_server=attestation_pb2_grpc.add_AttestationServiceServicer_to_server,
            )
        ],
        credentials=credentials,
        registry=registry,
        authorizer=OpenAuthorizer(),
    )
    own.start(servicer.replace_own_certificate)
    server.add_shutdown_hook(own.stop)
    server.set_serving(True)
    logger.info(
        "attestation service serving on %s (CA %s, own key name %s, policy %s)",
        server.address,
        ca.fingerprint_sha256[:16],
        pinned_name,
        policy.sha256.hex()[:16],
    )
    return RunningAttestationService(
        server=server,
        ca=ca,
        key_dns_name=pinned_name,
        servicer=servicer,
        own_certificate=own,
        generation=generation,
    )


class OwnCertificate:
    """The attestation service's self-signed RA-TLS certificate, re-made with fresh
    evidence for the same enclave key at two thirds of its validity, without a restart.

    Clients pin the exact certificate (grpcio accepts only root certificates), so a new
    connection through an old pin fails; `obtain_certificate` then re-verifies the service
    (the renewed certificate's fresh quote) and pins again, once, by itself.
    """

    def __init__(
        self,
        key: EnclaveKey,
        provider: QuoteProvider,
        verifier: QuoteVerifier,
        validity: dt.timedelta,
        *,
        user_data: bytes = b"",
    ) -> None:
        self._user_data = user_data
        self._key = key
        self._provider = provider
        self._verifier = verifier
        self._validity = validity
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.renewals = 0
        self.not_after = dt.datetime.now(dt.UTC)

    def renew(self) -> bytes:
        """Make a new certificate (a fresh quote); return its PEM."""
        der = make_ra_tls_certificate(
            self._key,
            self._provider,
            common_name="hfl attestation service",
            dns_names=(role_dns_name(ATTESTATION_ROLE), key_dns_name(self._key.spki_sha256)),
            role=ATTESTATION_ROLE,
            validity=self._validity,
            user_data=self._user_data,
        )
        parsed = parse_ra_tls_certificate(der)
        verdict = verify_ra_tls_certificate(parsed, self._verifier, ATTESTATION_ROLE)
        if not verdict.accepted:
            logger.warning(
                "this attestation service's own evidence is refused by its policy "
                "(%s: %s); clients holding the same policy will refuse it too",
                verdict.reason_code,
                verdict.reason,
            )
        self.not_after = parsed.certificate.not_valid_after_utc
        return certificate_pem(der)

    def seconds_until_renewal(self) -> float:
        due = self.not_after - self._validity / 3
        return max(0.0, (due - dt.datetime.now(dt.UTC)).total_seconds())

    def start(self, install: Callable[[bytes], None]) -> None:
        def run() -> None:
            while not self._stop.wait(self.seconds_until_renewal()):
                try:
                    install(self.renew())
                    self.renewals += 1
                    logger.info(
                        "own RA-TLS certificate renewed; valid until %s",
                        self.not_after.isoformat(),
                    )
                except Exception:
                    logger.exception("renewing the own RA-TLS certificate failed; retrying")
                    if self._stop.wait(min(60.0, self._validity.total_seconds() / 10)):
                        return

        self._thread = threading.Thread(target=run, name="hfl-own-cert-renewer", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
