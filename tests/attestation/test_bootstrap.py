"""The client library: bootstrap and pinning, restart, renewal, mutual attested TLS."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from prometheus_client import CollectorRegistry

from hfl_attestation.ca import FederationCA, load_csr
from hfl_common.api import attestation_pb2, attestation_pb2_grpc
from hfl_common.attest_client import (
    AttestedRoleAuthorizer,
    PeerVerifier,
    PinnedAttestationService,
    Renewer,
    ServiceCredentials,
    bootstrap_attestation_service,
    connect_verified,
    embedded_evidence,
    fetch_server_certificate,
    obtain_certificate,
)
from hfl_common.errors import EvidenceError, PermissionDeniedError
from hfl_common.ratls import EnclaveKey
from hfl_common.sealing import SimulatedSealingKeys
from hfl_common.server import (
    PeerIdentity,
    RunningServer,
    ServerConfig,
    ServiceRegistration,
    build_server,
    current_peer,
)
from hfl_common.tee import EnclaveIdentity, SimulatedProvider

from .conftest import CredentialsFactory, Identities, ServiceFactory, VerifierFactory

Providers = Callable[[EnclaveIdentity], SimulatedProvider]
GET_POLICY = "/hfl.v1.AttestationService/GetPolicy"
PLAN_HASH = hashlib.sha256(b"plan: 3 rounds of fedavg").digest()


class _EchoRole(attestation_pb2_grpc.AttestationServiceServicer):
    """A stand-in aggregator endpoint: answers with the caller's attested role."""

    def GetPolicy(
        self, request: attestation_pb2.GetPolicyRequest, context: grpc.ServicerContext
    ) -> attestation_pb2.GetPolicyResponse:
        peer = current_peer()
        return attestation_pb2.GetPolicyResponse(policy_toml=peer.role or "", policy_sha256="")


@pytest.fixture
def pinned(
    start_service: ServiceFactory, make_verifier: VerifierFactory
) -> Iterator[PinnedAttestationService]:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as p:
        yield p


@pytest.fixture
def aggregator_server(
    pinned: PinnedAttestationService,
    identities: Identities,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
) -> Iterator[tuple[RunningServer, ServiceCredentials, PeerVerifier]]:
    """A server with aggregator credentials (plan hash attested) and the role+quote check."""
    creds = credentials_for(pinned, identities.aggregator, "aggregator", PLAN_HASH)
    peers = PeerVerifier(make_verifier())
    server = build_server(
        ServerConfig(service="aggregator", port=0, max_workers=4, grace_seconds=0),
        services=[
            ServiceRegistration(
                "hfl.v1.AttestationService",
                _EchoRole(),  # type: ignore[abstract]  # only GetPolicy is served
                attestation_pb2_grpc.add_AttestationServiceServicer_to_server,
            )
        ],
        credentials=creds.server_credentials(),
        registry=CollectorRegistry(),
        authorizer=AttestedRoleAuthorizer({GET_POLICY: {"trainer"}}, peers),
    )
    server.set_serving(True)
    yield server, creds, peers
    server.stop(0)


def _call(channel: grpc.Channel) -> str:
    stub = attestation_pb2_grpc.AttestationServiceStub(channel)
    return stub.GetPolicy(attestation_pb2.GetPolicyRequest(), timeout=5).policy_toml


def test_bootstrap_pins_the_verified_attestation_service(
    start_service: ServiceFactory, make_verifier: VerifierFactory, identities: Identities
) -> None:
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as p:
        assert p.verdict.accepted
        assert p.verdict.measurements is not None
        assert p.verdict.measurements.mrenclave == identities.attestation.mrenclave
        assert p.certificate.pem == service.certificate_pem
        bundle = p.stub.GetTrustBundle(attestation_pb2.GetTrustBundleRequest(), timeout=5)
        assert bundle.ca_certificates_pem.encode() == service.ca.pem


def test_client_refuses_an_attestation_service_not_in_the_policy_before_sending_anything(
    start_service: ServiceFactory, make_verifier: VerifierFactory, identities: Identities
) -> None:
    registry = CollectorRegistry()
    rogue = start_service(identity=identities.rogue_attestation, registry=registry)
    with pytest.raises(EvidenceError) as info:
        bootstrap_attestation_service(f"127.0.0.1:{rogue.port}", make_verifier())
    assert isinstance(info.value, PermissionDeniedError)
    assert str(info.value).startswith(
        f"attestation service 127.0.0.1:{rogue.port} refused: mrenclave_mismatch: quote MRENCLAVE "
        f"{identities.rogue_attestation.mrenclave.hex()}"
    )
    # no gRPC call reached the rogue service
    assert registry.get_sample_value(
        "hfl_grpc_requests_total",
        {"service": "hfl.v1.AttestationService", "method": "IssueCertificate", "code": "OK"},
    ) in (None, 0.0)


def test_pinned_channel_does_not_follow_a_different_server_on_the_same_address(
    start_service: ServiceFactory, make_verifier: VerifierFactory, tmp_path: Path
) -> None:
    first = start_service(state_dir=tmp_path / "a")
    pinned = bootstrap_attestation_service(f"127.0.0.1:{first.port}", make_verifier())
    first.stop(0)
    # another genuine instance (new key): the pin is for the old key, the channel refuses
    second = start_service(state_dir=tmp_path / "b")
    assert second.certificate_pem != first.certificate_pem
    stub = attestation_pb2_grpc.AttestationServiceStub(
        grpc.secure_channel(
            f"127.0.0.1:{second.port}",
            grpc.ssl_channel_credentials(root_certificates=first.certificate_pem),
            options=[("grpc.ssl_target_name_override", first.key_dns_name)],
        )
    )
    with pytest.raises(grpc.RpcError) as info:
        stub.GetPolicy(attestation_pb2.GetPolicyRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    pinned.close()


def test_certificate_issued_before_a_restart_still_verifies_after_it(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    before = start_service(state_dir=state)
    with bootstrap_attestation_service(f"127.0.0.1:{before.port}", make_verifier()) as p:
        issued = obtain_certificate(
            p, EnclaveKey.generate(), provider_for(identities.trainer), "trainer"
        )
    before.stop(0)
    after = start_service(state_dir=state)
    with bootstrap_attestation_service(f"127.0.0.1:{after.port}", make_verifier()) as p:
        bundle = p.stub.GetTrustBundle(attestation_pb2.GetTrustBundleRequest(), timeout=5)
    ca_after = x509.load_pem_x509_certificate(bundle.ca_certificates_pem.encode())
    issued.certificate.verify_directly_issued_by(ca_after)
    assert after.certificate_pem != before.certificate_pem  # a fresh TLS key per start


def test_renewal_survives_a_restart_of_the_attestation_service(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
    tmp_path: Path,
) -> None:
    first = start_service(state_dir=tmp_path / "state")
    pinned = bootstrap_attestation_service(f"127.0.0.1:{first.port}", make_verifier())
    key = EnclaveKey.generate()
    obtain_certificate(pinned, key, provider_for(identities.trainer), "trainer")
    old_pin = pinned.certificate.spki_sha256
    first.stop(0)
    second = start_service(state_dir=tmp_path / "state", port=first.port)
    issued = obtain_certificate(pinned, key, provider_for(identities.trainer), "trainer")
    assert pinned.certificate.spki_sha256 != old_pin
    assert pinned.certificate.pem == second.certificate_pem
    issued.certificate.verify_directly_issued_by(second.ca.certificate)
    pinned.close()


def test_renewal_gives_new_connections_a_new_certificate_without_restart(
    pinned: PinnedAttestationService,
    aggregator_server: tuple[RunningServer, ServiceCredentials, PeerVerifier],
    identities: Identities,
    provider_for: Providers,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
) -> None:
    server, creds, _ = aggregator_server
    old_der = fetch_server_certificate("127.0.0.1", server.port)
    key = creds.key
    renewer = Renewer(
        creds,
        lambda: obtain_certificate(
            pinned, key, provider_for(identities.aggregator), "aggregator", "agg", PLAN_HASH
        ),
    )
    issued = renewer.renew_now()
    new_der = fetch_server_certificate("127.0.0.1", server.port)
    assert new_der != old_der
    assert new_der == issued.certificate.public_bytes(Encoding.DER)
    # and a verified trainer connection works with the renewed certificate
    trainer = credentials_for(pinned, identities.trainer, "trainer")
    channel = connect_verified(
        f"127.0.0.1:{server.port}",
        trainer,
        make_verifier(),
        "aggregator",
        expected_user_data=PLAN_HASH,
    )
    assert _call(channel) == "trainer"
    channel.close()


def test_renewer_thread_renews_at_its_schedule(
    pinned: PinnedAttestationService,
    identities: Identities,
    provider_for: Providers,
    credentials_for: CredentialsFactory,
) -> None:
    creds = credentials_for(pinned, identities.trainer, "trainer")
    first = creds.current
    key = creds.key
    renewed: list[object] = []
    renewer = Renewer(
        creds,
        lambda: obtain_certificate(pinned, key, provider_for(identities.trainer), "trainer"),
        fraction=1e-9,  # due at once
        on_renewed=renewed.append,
    ).start()
    try:
        deadline = time.monotonic() + 10
        while not renewed and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        renewer.stop()
    assert renewed
    assert creds.current.cert_pem != first.cert_pem


def test_trainer_with_attested_certificate_may_call(
    pinned: PinnedAttestationService,
    aggregator_server: tuple[RunningServer, ServiceCredentials, PeerVerifier],
    identities: Identities,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
) -> None:
    server, _, peers = aggregator_server
    registry = CollectorRegistry()
    peers.verifier = make_verifier(registry)  # count this test's verifications only
    trainer = credentials_for(pinned, identities.trainer, "trainer")
    channel = connect_verified(
        f"127.0.0.1:{server.port}",
        trainer,
        make_verifier(),
        "aggregator",
        expected_user_data=PLAN_HASH,
    )
    assert _call(channel) == "trainer"
    assert _call(channel) == "trainer"
    channel.close()
    # the second call was answered from the verdict cache: one quote verification
    accepted = {"role": "trainer", "result": "accepted", "reason": "ok"}
    assert registry.get_sample_value("hfl_attestation_verifications_total", accepted) == 1
    peers.clear()
    assert peers.verify_peer(PeerIdentity.from_pem(trainer.current.cert_pem)).accepted
    assert registry.get_sample_value("hfl_attestation_verifications_total", accepted) == 2


def test_client_with_a_certificate_for_another_role_is_refused(
    pinned: PinnedAttestationService,
    aggregator_server: tuple[RunningServer, ServiceCredentials, PeerVerifier],
    identities: Identities,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
) -> None:
    server, _, _ = aggregator_server
    other = credentials_for(pinned, identities.aggregator, "aggregator", PLAN_HASH)
    channel = connect_verified(f"127.0.0.1:{server.port}", other, make_verifier(), "aggregator")
    with pytest.raises(grpc.RpcError) as info:
        _call(channel)
    channel.close()
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert info.value.details() == f"role aggregator may not call {GET_POLICY}; allowed: trainer"


def test_client_without_a_certificate_cannot_complete_the_handshake(
    aggregator_server: tuple[RunningServer, ServiceCredentials, PeerVerifier],
) -> None:
    server, creds, _ = aggregator_server
    channel = grpc.secure_channel(
        f"127.0.0.1:{server.port}",
        grpc.ssl_channel_credentials(root_certificates=creds.current.ca_pem),
        options=[("grpc.ssl_target_name_override", "aggregator.hfl.internal")],
    )
    with pytest.raises(grpc.RpcError) as info:
        _call(channel)
    channel.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_connect_verified_refuses_a_server_attesting_another_plan(
    pinned: PinnedAttestationService,
    aggregator_server: tuple[RunningServer, ServiceCredentials, PeerVerifier],
    identities: Identities,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
) -> None:
    server, _, _ = aggregator_server
    trainer = credentials_for(pinned, identities.trainer, "trainer")
    my_plan = hashlib.sha256(b"plan: 30 rounds of fedprox").digest()
    with pytest.raises(PermissionDeniedError) as info:
        connect_verified(
            f"127.0.0.1:{server.port}",
            trainer,
            make_verifier(),
            "aggregator",
            expected_user_data=my_plan,
        )
    assert str(info.value) == (
        f"aggregator's attested plan hash {PLAN_HASH.hex()} differs from this trainer's plan "
        f"{my_plan.hex()}"
    )
    with pytest.raises(
        PermissionDeniedError, match="its certificate is for role aggregator, not trainer"
    ):
        connect_verified(f"127.0.0.1:{server.port}", trainer, make_verifier(), "trainer")


def test_a_quote_copied_into_another_keys_certificate_is_refused(
    pinned: PinnedAttestationService,
    start_service: ServiceFactory,
    identities: Identities,
    credentials_for: CredentialsFactory,
    make_verifier: VerifierFactory,
    tmp_path: Path,
) -> None:
    # The CA is the only one who could mint such a certificate; do it with a CA object
    # directly to check the relying party does not trust the CA's signature alone.
    victim = credentials_for(pinned, identities.trainer, "trainer")
    ca = FederationCA.load_or_create(tmp_path / "ca", SimulatedSealingKeys(b"s" * 32, b"m" * 32))
    thief = EnclaveKey.generate()
    stolen = [
        ext
        for ext in victim.current.certificate.extensions
        if ext.oid.dotted_string == "0.6.9.42.840.113741.1337.6"
    ]
    forged = ca.issue(
        load_csr(thief.csr("t", (), "trainer")),
        role="trainer",
        evidence_extensions=stolen,
        lifetime_seconds=600,
    )
    peers = PeerVerifier(make_verifier())
    with pytest.raises(PermissionDeniedError, match="evidence refused: report_data_mismatch"):
        peers.verify_peer(PeerIdentity.from_pem(forged.pem, "ipv4:127.0.0.1:1"))
    # while the genuine one passes
    genuine = PeerIdentity.from_pem(victim.current.cert_pem)
    assert peers.verify_peer(genuine).accepted
    assert embedded_evidence(genuine.certificate, None).spki_sha256 != thief.spki_sha256


def test_peer_verifier_admits_listed_operators_only(
    pinned: PinnedAttestationService,
    operator_key: EnclaveKey,
    make_verifier: VerifierFactory,
    tmp_path: Path,
) -> None:
    issued = obtain_certificate(pinned, operator_key, None, "operator", "alice")
    peers = PeerVerifier(make_verifier())
    verdict = peers.verify_peer(PeerIdentity.from_pem(issued.cert_pem))
    assert verdict.accepted
    assert verdict.role == "operator"
    ca = FederationCA.load_or_create(tmp_path, SimulatedSealingKeys(b"s" * 32, b"m" * 32))
    stranger = EnclaveKey.generate()
    leaf = ca.issue(
        load_csr(stranger.csr("t", (), "operator")),
        role="operator",
        evidence_extensions=[],
        lifetime_seconds=600,
    )
    with pytest.raises(
        PermissionDeniedError, match=f"operator key {stranger.spki_sha256.hex()} is not in"
    ):
        peers.verify_peer(PeerIdentity.from_pem(leaf.pem))
