"""Anonymous callers of the attestation port: only bootstrap, rate-limited, never blocking
IssueCertificate for everyone (issue 11's attacks, against a real service)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry

from hfl_common.api import attestation_pb2
from hfl_common.attest_client import bootstrap_attestation_service, obtain_certificate
from hfl_common.ratls import EnclaveKey
from hfl_common.tee import EnclaveIdentity, SimulatedProvider

from .conftest import Identities, ServiceFactory, VerifierFactory

Providers = Callable[[EnclaveIdentity], SimulatedProvider]


def test_eight_anonymous_watches_do_not_stop_issue_certificate(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    # The attack: 8 Watch streams without a client certificate on a 4-worker service
    # made IssueCertificate time out for everyone.
    service = start_service()
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        health = health_pb2_grpc.HealthStub(pinned.channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(8)
        ]
        for watch in watches:
            with pytest.raises(grpc.RpcError) as caught:
                next(watch)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        key = EnclaveKey.generate()
        issued = obtain_certificate(
            pinned, key, provider_for(identities.trainer), "trainer", "t", timeout=5
        )
        assert issued.certificate is not None


def test_anonymous_callers_get_only_what_bootstrap_needs(
    start_service: ServiceFactory, make_verifier: VerifierFactory
) -> None:
    registry = CollectorRegistry()
    service = start_service(registry=registry)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        health = health_pb2_grpc.HealthStub(pinned.channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == 1
        assert pinned.stub.GetTrustBundle(
            attestation_pb2.GetTrustBundleRequest(), timeout=5
        ).policy_sha256
        reflection = reflection_pb2_grpc.ServerReflectionStub(pinned.channel)
        answers = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        with pytest.raises(grpc.RpcError) as caught:
            next(answers)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "not open to callers without a client certificate" in (caught.value.details() or "")
        refused = registry.get_sample_value(
            "hfl_grpc_refusals_total",
            {
                "service": "grpc.reflection.v1alpha.ServerReflection",
                "method": "ServerReflectionInfo",
                "reason": "anonymous_method",
            },
        )
        assert refused == 1.0


def test_verify_evidence_answers_garbage_with_invalid_argument_and_no_traceback(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    service = start_service()
    with (
        bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned,
        caplog.at_level(logging.INFO),
    ):
        for evidence in (
            attestation_pb2.Evidence(sgx_quote=b"\x03\x00" + bytes(600)),
            attestation_pb2.Evidence(ra_tls_certificate=b"\x30\x82junk"),
            attestation_pb2.Evidence(),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                pinned.stub.VerifyEvidence(
                    attestation_pb2.VerifyEvidenceRequest(
                        evidence=evidence, role=attestation_pb2.ROLE_TRAINER
                    ),
                    timeout=5,
                )
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            details = caught.value.details() or ""
            assert "internal" not in details
            assert any(
                reason in details
                for reason in ("malformed SGX quote", "not a usable RA-TLS", "needs evidence")
            ), details
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_anonymous_calls_are_rate_limited_per_address(
    start_service: ServiceFactory, make_verifier: VerifierFactory
) -> None:
    registry = CollectorRegistry()
    service = start_service(registry=registry)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:
        codes = []
        details = set()
        for _ in range(200):  # far above the burst (40) and rate (20/s)
            try:
                pinned.stub.GetPolicy(attestation_pb2.GetPolicyRequest(), timeout=5)
                codes.append(grpc.StatusCode.OK)
            except grpc.RpcError as err:
                codes.append(err.code())
                details.add(err.details())
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in codes
        assert codes[:30] == [grpc.StatusCode.OK] * 30
        assert {(d or "").split(" without")[0] for d in details} == {
            "/hfl.v1.AttestationService/GetPolicy: too many calls from ipv4:127.0.0.1"
        }
        refused = registry.get_sample_value(
            "hfl_grpc_refusals_total",
            {
                "service": "hfl.v1.AttestationService",
                "method": "GetPolicy",
                "reason": "rate_limited",
            },
        )
        assert refused == codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_many_enclaves_bootstrapping_at_once_all_get_certificates(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    # A 4-worker service admits 2 ordinary calls at once and 4 per address: the others
    # are refused as busy, and obtain_certificate retries them with backoff.
    service = start_service()
    provider = provider_for(identities.trainer)
    with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as pinned:

        def issue(index: int) -> bytes:
            key = EnclaveKey.generate()
            return obtain_certificate(pinned, key, provider, "trainer", f"t{index}").cert_pem

        with ThreadPoolExecutor(max_workers=12) as pool:
            issued = list(pool.map(issue, range(12)))
    assert len({pem for pem in issued}) == 12
