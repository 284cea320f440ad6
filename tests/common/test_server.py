"""The server factory, end to end: real gRPC over mTLS on 127.0.0.1, a test CA made here."""

from __future__ import annotations

import datetime
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, tensor_pb2
from hfl_common.errors import ConfigError, InvalidArgumentError, UnauthenticatedError
from hfl_common.metrics import start_metrics_http
from hfl_common.server import (
    INTERNAL_ERROR_MESSAGE,
    CallLimits,
    PeerIdentity,
    RoleAuthorizer,
    RunningServer,
    ServerCertificate,
    ServerConfig,
    ServiceRegistration,
    StreamLimits,
    build_server,
    channel_credentials,
    current_peer,
    id_san,
    make_channel,
    role_dns_name,
    role_san,
    server_credentials,
)
from hfl_common.server.running import stream_window_options

AGGREGATOR = "hfl.v1.AggregatorService"
TRAINER_ID = "00a1b2c3"

# --- a test CA ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Issued:
    key_pem: bytes
    cert_pem: bytes


@dataclass(frozen=True)
class LocalCa:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, name: str) -> LocalCa:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
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
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    def issue(self, *, role: str | None, peer_id: str | None = None, dns: bool = False) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        names: list[x509.GeneralName] = []
        if role is not None:
            names.append(x509.UniformResourceIdentifier(role_san(role)))
            if dns:
                names.append(x509.DNSName(role_dns_name(role)))
        if peer_id is not None:
            names.append(x509.UniformResourceIdentifier(id_san(peer_id)))
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, role or "nobody")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(key_pem, cert.public_bytes(serialization.Encoding.PEM))


@dataclass(frozen=True)
class Pki:
    ca: LocalCa
    server: Issued
    trainer: Issued
    operator: Issued

    def server_certificate(self) -> ServerCertificate:
        return ServerCertificate(self.server.key_pem, self.server.cert_pem, self.ca.pem)

    def client(self, issued: Issued, root: bytes | None = None) -> grpc.ChannelCredentials:
        return channel_credentials(
            root_ca_pem=root or self.ca.pem,
            private_key_pem=issued.key_pem,
            certificate_chain_pem=issued.cert_pem,
        )


@pytest.fixture(scope="module")
def pki() -> Pki:
    ca = LocalCa.create("hfl test CA")
    return Pki(
        ca=ca,
        server=ca.issue(role="aggregator", dns=True),
        trainer=ca.issue(role="trainer", peer_id=TRAINER_ID),
        operator=ca.issue(role="operator"),
    )


# --- the service under test ----------------------------------------------------------------


class Aggregator(aggregator_pb2_grpc.AggregatorServiceServicer):
    """Enough of AggregatorService to exercise the edge: errors, streams, the peer."""

    def Join(
        self, request: aggregator_pb2.JoinRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.JoinResponse:
        if request.label == "invalid":
            raise InvalidArgumentError("label 'invalid' is reserved; choose another label")
        if request.label == "crash":
            raise RuntimeError("secret internal detail: /enclave/keys/tls.key")
        peer = current_peer()
        return aggregator_pb2.JoinResponse(trainer_id=peer.peer_id or "", session_id="s1")

    def DownloadModel(
        self, request: aggregator_pb2.DownloadModelRequest, context: grpc.ServicerContext
    ) -> Iterator[aggregator_pb2.DownloadModelResponse]:
        # current_peer() must work in every step of a streaming response, not only the first
        for offset in range(3):
            yield aggregator_pb2.DownloadModelResponse(
                chunk=tensor_pb2.TensorChunk(
                    offset=offset, data=(current_peer().role or "").encode() * (offset + 1)
                )
            )

    def UploadUpdate(
        self,
        request_iterator: Iterator[aggregator_pb2.UploadUpdateRequest],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        count = sum(1 for _ in request_iterator)
        return aggregator_pb2.UploadUpdateResponse(
            disposition=aggregator_pb2.UPDATE_DISPOSITION_PENDING, round=count
        )

    def KeepAlive(
        self, request: aggregator_pb2.KeepAliveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.KeepAliveResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this test")

    def GetTask(
        self, request: aggregator_pb2.GetTaskRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetTaskResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this test")

    def ReportEvaluation(
        self, request: aggregator_pb2.ReportEvaluationRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.ReportEvaluationResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not part of this test")

    def Leave(
        self, request: aggregator_pb2.LeaveRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.LeaveResponse:
        context.abort(grpc.StatusCode.NOT_FOUND, f"session {request.session_id} is unknown")

    def GetStatus(
        self, request: aggregator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetStatusResponse:
        return aggregator_pb2.GetStatusResponse(state=aggregator_pb2.FEDERATION_STATE_TRAINING)


AUTHORIZER = RoleAuthorizer(
    {
        f"/{AGGREGATOR}/Join": frozenset({"trainer"}),
        f"/{AGGREGATOR}/DownloadModel": frozenset({"trainer"}),
        f"/{AGGREGATOR}/UploadUpdate": frozenset({"trainer"}),
        f"/{AGGREGATOR}/Leave": frozenset({"trainer"}),
        f"/{AGGREGATOR}/GetStatus": frozenset({"operator"}),
    }
)


def registration() -> ServiceRegistration:
    return ServiceRegistration(
        name=AGGREGATOR,
        servicer=Aggregator(),
        add_to_server=aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server,
    )


CONFIG = ServerConfig(service="aggregator", host="127.0.0.1", port=0, max_workers=8)


@dataclass
class Served:
    running: RunningServer
    registry: CollectorRegistry
    pki: Pki

    def channel(
        self, issued: Issued | None = None, *, root: bytes | None = None, **kwargs: object
    ) -> grpc.Channel:
        credentials = self.pki.client(issued or self.pki.trainer, root)
        options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
        return make_channel(
            f"127.0.0.1:{self.running.port}",
            credentials,
            target_name_override=role_dns_name("aggregator"),
            options=options,
            **kwargs,  # type: ignore[arg-type]
        )

    def stub(self, issued: Issued | None = None) -> aggregator_pb2_grpc.AggregatorServiceStub:
        return aggregator_pb2_grpc.AggregatorServiceStub(self.channel(issued))

    def running_in_flight(self) -> float:
        return self.registry.get_sample_value("hfl_grpc_calls_in_flight") or 0.0

    def requests(self, method: str, code: str) -> float:
        value = self.registry.get_sample_value(
            "hfl_grpc_requests_total", {"service": AGGREGATOR, "method": method, "code": code}
        )
        return value or 0.0


@pytest.fixture
def served(pki: Pki) -> Iterator[Served]:
    registry = CollectorRegistry()
    running = build_server(
        CONFIG,
        services=[registration()],
        credentials=server_credentials(pki.server_certificate()),
        registry=registry,
        authorizer=AUTHORIZER,
    )
    with running:
        yield Served(running, registry, pki)


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(response.status)


# --- tests -----------------------------------------------------------------------------------


def test_health_is_not_serving_until_set_serving(served: Served) -> None:
    channel = served.channel()
    for name in ("", AGGREGATOR):
        assert health_status(channel, name) == health_pb2.HealthCheckResponse.NOT_SERVING
    served.running.set_serving(True)
    for name in ("", AGGREGATOR):
        assert health_status(channel, name) == health_pb2.HealthCheckResponse.SERVING


def test_health_is_open_to_a_role_the_authorizer_does_not_know(served: Served, pki: Pki) -> None:
    stranger = pki.ca.issue(role="auditor")
    served.running.set_serving(True)
    assert health_status(served.channel(stranger), "") == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_hfl_services_health_and_reflection(served: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(served.channel())
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    responses = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
    names = {s.name for s in responses[0].list_services_response.service}
    assert names == {
        AGGREGATOR,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    }
    # the stream-stream handler went through the interceptor too
    value = served.registry.get_sample_value(
        "hfl_grpc_requests_total",
        {
            "service": "grpc.reflection.v1alpha.ServerReflection",
            "method": "ServerReflectionInfo",
            "code": "OK",
        },
    )
    assert value == 1.0


def test_request_is_counted_on_the_metrics_endpoint_with_its_code(served: Served) -> None:
    port, stop = start_metrics_http(served.registry, "127.0.0.1", 0)
    served.running.add_shutdown_hook(stop)
    request = aggregator_pb2.JoinRequest(label="t1", plan_sha256="ab" * 32)
    served.stub().Join(request, timeout=5)
    with pytest.raises(grpc.RpcError):
        served.stub(served.pki.trainer).GetStatus(aggregator_pb2.GetStatusRequest(), timeout=5)

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }

    def sample(name: str, **labels: str) -> float | None:
        return samples.get((name, tuple(sorted(labels.items()))))

    joined = {"service": AGGREGATOR, "method": "Join"}
    assert sample("hfl_grpc_requests_total", code="OK", **joined) == 1.0
    assert (
        sample(
            "hfl_grpc_requests_total",
            service=AGGREGATOR,
            method="GetStatus",
            code="PERMISSION_DENIED",
        )
        == 1.0
    )
    assert sample("hfl_grpc_received_bytes_total", **joined) == request.ByteSize()
    assert sample("hfl_grpc_request_duration_seconds_count", **joined) == 1.0
    assert sample("hfl_build_info", service="aggregator", version=CONFIG.version) == 1.0


def test_every_streamed_message_is_counted_in_bytes(served: Served) -> None:
    stub = served.stub()
    responses = list(stub.DownloadModel(aggregator_pb2.DownloadModelRequest(), timeout=5))
    uploads = [
        aggregator_pb2.UploadUpdateRequest(
            chunk=tensor_pb2.TensorChunk(offset=i * 10, data=bytes(10))
        )
        for i in range(4)
    ]
    result = stub.UploadUpdate(iter(uploads), timeout=5)

    assert result.round == 4
    sent = served.registry.get_sample_value(
        "hfl_grpc_sent_bytes_total", {"service": AGGREGATOR, "method": "DownloadModel"}
    )
    received = served.registry.get_sample_value(
        "hfl_grpc_received_bytes_total", {"service": AGGREGATOR, "method": "UploadUpdate"}
    )
    assert sent == sum(r.ByteSize() for r in responses)
    assert received == sum(u.ByteSize() for u in uploads)
    assert served.requests("DownloadModel", "OK") == 1.0
    assert served.requests("UploadUpdate", "OK") == 1.0


def test_upload_cancelled_by_the_client_is_counted_as_cancelled_not_internal(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()

    def uploads() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        yield aggregator_pb2.UploadUpdateRequest(chunk=tensor_pb2.TensorChunk(data=b"x"))
        release.wait(10)

    with caplog.at_level(logging.ERROR, logger="hfl_common.server"):
        call = served.stub().UploadUpdate.future(uploads(), timeout=10)
        deadline = time.monotonic() + 5
        while (
            served.registry.get_sample_value(
                "hfl_grpc_received_bytes_total", {"service": AGGREGATOR, "method": "UploadUpdate"}
            )
            is None
            and time.monotonic() < deadline
        ):
            time.sleep(0.01)
        call.cancel()  # type: ignore[no-untyped-call]  # grpc-stubs leaves it untyped
        release.set()
        while served.requests("UploadUpdate", "CANCELLED") == 0 and time.monotonic() < deadline:
            time.sleep(0.01)

    assert served.requests("UploadUpdate", "CANCELLED") == 1.0
    assert served.requests("UploadUpdate", "INTERNAL") == 0.0
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_handlers_see_the_peer_identity_from_the_certificate(served: Served) -> None:
    stub = served.stub()
    joined = stub.Join(aggregator_pb2.JoinRequest(label="t1"), timeout=5)
    chunks = list(stub.DownloadModel(aggregator_pb2.DownloadModelRequest(), timeout=5))

    assert joined.trainer_id == TRAINER_ID
    assert [c.chunk.data for c in chunks] == [b"trainer", b"trainer" * 2, b"trainer" * 3]


def test_authorizer_refusing_a_role_gives_permission_denied_with_its_message(
    served: Served,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub(served.pki.operator).Join(aggregator_pb2.JoinRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == (
        f"role operator may not call /{AGGREGATOR}/Join; allowed: trainer"
    )


def test_authorizer_refuses_a_certificate_without_a_role(served: Served, pki: Pki) -> None:
    anonymous = pki.ca.issue(role=None, peer_id="ff")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub(anonymous).GetStatus(aggregator_pb2.GetStatusRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert caught.value.details() == (
        "peer certificate has no hfl://role/<role> URI SAN; "
        f"/{AGGREGATOR}/GetStatus requires role operator"
    )


def test_invalid_argument_error_maps_to_invalid_argument_with_its_message(
    served: Served,
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub().Join(aggregator_pb2.JoinRequest(label="invalid"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.details() == "label 'invalid' is reserved; choose another label"
    assert served.requests("Join", "INVALID_ARGUMENT") == 1.0


def test_unexpected_exception_gives_internal_with_a_generic_message(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.ERROR, logger="hfl_common.server"),
        pytest.raises(grpc.RpcError) as caught,
    ):
        served.stub().Join(aggregator_pb2.JoinRequest(label="crash"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_ERROR_MESSAGE
    assert "secret" not in (caught.value.details() or "")
    logged = [r for r in caplog.records if r.exc_info]
    assert len(logged) == 1
    assert logged[0].getMessage() == f"unexpected error in /{AGGREGATOR}/Join"
    assert "secret internal detail" in str(logged[0].exc_info[1])  # type: ignore[index]
    assert served.requests("Join", "INTERNAL") == 1.0


def test_a_handler_abort_keeps_its_own_status(served: Served) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        served.stub().Leave(aggregator_pb2.LeaveRequest(session_id="s9"), timeout=5)

    assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    assert caught.value.details() == "session s9 is unknown"
    assert served.requests("Leave", "NOT_FOUND") == 1.0


def test_client_without_a_certificate_cannot_complete_a_call(served: Served, pki: Pki) -> None:
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.ca.pem)
    channel = make_channel(
        f"127.0.0.1:{served.running.port}",
        credentials,
        target_name_override=role_dns_name("aggregator"),
    )
    with pytest.raises(grpc.RpcError) as caught:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_credentials_without_client_auth_still_serve_no_anonymous_call(pki: Pki) -> None:
    # a misconfigured ServerCredentials lets the handshake through; the interceptor does not
    lax = grpc.ssl_server_credentials(
        [(pki.server.key_pem, pki.server.cert_pem)], root_certificates=pki.ca.pem
    )
    with build_server(
        CONFIG,
        services=[registration()],
        credentials=lax,
        registry=CollectorRegistry(),
        authorizer=AUTHORIZER,
    ) as running:
        channel = make_channel(
            f"127.0.0.1:{running.port}",
            grpc.ssl_channel_credentials(root_certificates=pki.ca.pem),
            target_name_override=role_dns_name("aggregator"),
        )
        with pytest.raises(grpc.RpcError) as caught:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.details() == (
        "/grpc.health.v1.Health/Check requires a client certificate (mTLS); the peer presented none"
    )


def test_client_with_a_certificate_of_another_ca_cannot_complete_a_call(
    served: Served,
) -> None:
    outsider = LocalCa.create("another CA").issue(role="trainer")
    with pytest.raises(grpc.RpcError) as caught:
        served.stub(outsider).Join(aggregator_pb2.JoinRequest(), timeout=5)

    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_server_name_is_checked_against_the_role_dns_name(served: Served, pki: Pki) -> None:
    # the certificate names a role, not 127.0.0.1: without the override the check fails
    plain = grpc.secure_channel(f"127.0.0.1:{served.running.port}", pki.client(pki.trainer))
    wrong = make_channel(
        f"127.0.0.1:{served.running.port}",
        pki.client(pki.trainer),
        target_name_override=role_dns_name("attestation"),
    )
    for channel in (plain, wrong):
        with pytest.raises(grpc.RpcError) as caught:
            aggregator_pb2_grpc.AggregatorServiceStub(channel).Join(
                aggregator_pb2.JoinRequest(), timeout=5
            )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


def test_oversized_request_is_resource_exhausted(served: Served) -> None:
    channel = served.channel(max_message_bytes=16 * 1024 * 1024)
    huge = aggregator_pb2.JoinRequest(label="x" * (5 * 1024 * 1024))
    with pytest.raises(grpc.RpcError) as caught:
        aggregator_pb2_grpc.AggregatorServiceStub(channel).Join(huge, timeout=10)

    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4194304" in (caught.value.details() or "")


def test_build_server_refuses_to_start_without_credentials() -> None:
    with pytest.raises(ConfigError) as caught:
        build_server(
            CONFIG,
            services=[registration()],
            credentials=None,  # type: ignore[arg-type]
            registry=CollectorRegistry(),
            authorizer=None,
        )
    assert str(caught.value) == (
        "aggregator: refusing to start without TLS credentials; hfl serves mTLS only"
    )


def test_build_server_refuses_a_service_name_unknown_to_protobuf(pki: Pki) -> None:
    with pytest.raises(ConfigError) as caught:
        build_server(
            CONFIG,
            services=[replace(registration(), name="AggregatorService")],
            credentials=server_credentials(pki.server_certificate()),
            registry=CollectorRegistry(),
            authorizer=None,
        )
    assert str(caught.value) == (
        "service 'AggregatorService' is not in the protobuf descriptor pool; "
        "register it with its full name, e.g. 'hfl.v1.AggregatorService'"
    )


def test_server_config_refuses_a_tiny_message_limit() -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig(service="aggregator", max_receive_message_bytes=1000)
    assert str(caught.value) == (
        "server.max_receive_message_bytes 1000 is below 65536; "
        "messages carry 1 MiB tensor chunks, use the default 4194304"
    )


def test_renewed_certificate_is_used_by_new_connections(pki: Pki) -> None:
    renewed_ca = LocalCa.create("hfl renewed CA")
    first = pki.server_certificate()
    issued = renewed_ca.issue(role="aggregator", dns=True)
    second = ServerCertificate(issued.key_pem, issued.cert_pem, pki.ca.pem)
    current = [first]

    def provider() -> ServerCertificate:
        return current[0]

    registry = CollectorRegistry()
    with build_server(
        CONFIG,
        services=[registration()],
        credentials=provider,
        registry=registry,
        authorizer=AUTHORIZER,
    ) as running:
        served = Served(running, registry, pki)
        old = served.channel()
        assert health_status(old, "") == health_pb2.HealthCheckResponse.NOT_SERVING

        current[0] = second

        # a new connection gets the renewed certificate: trusted only through the new CA
        with pytest.raises(grpc.RpcError) as caught:
            health_status(served.channel(), "")
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        renewed = served.channel(root=renewed_ca.pem)
        assert health_status(renewed, "") == health_pb2.HealthCheckResponse.NOT_SERVING
        # the connection opened before the renewal goes on with the certificate it had
        assert health_status(old, "") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_failing_credentials_provider_keeps_the_current_certificate(pki: Pki) -> None:
    calls = [0]

    def provider() -> ServerCertificate:
        calls[0] += 1
        if calls[0] > 1:
            raise OSError("certificate store unreachable")
        return pki.server_certificate()

    registry = CollectorRegistry()
    with build_server(
        CONFIG,
        services=[registration()],
        credentials=provider,
        registry=registry,
        authorizer=AUTHORIZER,
    ) as running:
        channel = Served(running, registry, pki).channel()
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.NOT_SERVING
    assert calls[0] >= 2


def test_peer_identity_refuses_a_certificate_with_two_roles(pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "two")]))
        .issuer_name(pki.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(role_san("trainer")),
                    x509.UniformResourceIdentifier(role_san("aggregator")),
                ]
            ),
            critical=False,
        )
        .sign(pki.ca.key, hashes.SHA256())
    )
    with pytest.raises(UnauthenticatedError) as caught:
        PeerIdentity.from_pem(cert.public_bytes(serialization.Encoding.PEM))
    assert str(caught.value) == (
        "peer certificate carries 2 role SANs (trainer, aggregator); "
        "exactly one hfl://role/<role> URI is allowed"
    )


def test_peer_identity_reads_role_and_id_from_the_uri_sans(pki: Pki) -> None:
    peer = PeerIdentity.from_pem(pki.trainer.cert_pem, "ipv4:127.0.0.1:1")
    assert (peer.role, peer.peer_id, peer.address) == ("trainer", TRAINER_ID, "ipv4:127.0.0.1:1")
    assert len(peer.fingerprint_sha256) == 64


def test_role_san_refuses_a_malformed_role() -> None:
    assert role_san("trainer") == "hfl://role/trainer"
    with pytest.raises(InvalidArgumentError) as caught:
        role_san("Trainer/1")
    assert str(caught.value) == (
        "role 'Trainer/1' is not a valid role name (lowercase letters, digits and '-', "
        "starting with a letter, at most 63 characters)"
    )


def test_current_peer_outside_a_call_is_an_error() -> None:
    with pytest.raises(UnauthenticatedError) as caught:
        current_peer()
    assert str(caught.value) == "current_peer() called outside an RPC served by hfl_common.server"


def test_sigterm_stops_serving_then_exits_zero(pki: Pki, tmp_path: Path) -> None:
    (tmp_path / "server.key").write_bytes(pki.server.key_pem)
    (tmp_path / "server.pem").write_bytes(pki.server.cert_pem)
    (tmp_path / "ca.pem").write_bytes(pki.ca.pem)
    script = Path(__file__).with_name("sigterm_server.py")
    process = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path), "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("PORT "), process.stderr.read() if process.stderr else line
        port = int(line.split()[1])
        channel = make_channel(
            f"127.0.0.1:{port}",
            pki.client(pki.trainer),
            target_name_override=role_dns_name("aggregator"),
        )
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING

        process.send_signal(signal.SIGTERM)

        # Draining: health says NOT_SERVING, or new calls are no longer accepted at all.
        deadline = time.monotonic() + 15
        seen: object = health_pb2.HealthCheckResponse.SERVING
        while seen == health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
            try:
                seen = health_status(channel, "")
            except grpc.RpcError as err:
                seen = err.code()
            time.sleep(0.05)
        # gRPC answers a call that arrives while the server shuts down with CANCELLED or
        # UNAVAILABLE, depending on how far the shutdown is: both are refusals.
        refused = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        assert seen == health_pb2.HealthCheckResponse.NOT_SERVING or seen in refused
        assert process.wait(timeout=15) == 0
        assert (tmp_path / "hook-ran").read_text() == "yes"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


# --- bounded resources: the attacks of issue 11, against a real server ----------------------


def _serve(pki: Pki, config: ServerConfig) -> tuple[RunningServer, CollectorRegistry]:
    registry = CollectorRegistry()
    running = build_server(
        config,
        services=[registration()],
        credentials=server_credentials(pki.server_certificate()),
        registry=registry,
        authorizer=AUTHORIZER,
    )
    running.set_serving(True)
    return running, registry


def _served(pki: Pki, config: ServerConfig) -> Served:
    running, registry = _serve(pki, config)
    return Served(running, registry, pki)


class IdleUploads:
    """Client streams that open UploadUpdate and then send nothing, until closed."""

    def __init__(self) -> None:
        self._release = threading.Event()
        self.calls: list[grpc.Future] = []  # type: ignore[type-arg]

    def requests(self) -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        self._release.wait(60)
        return
        yield  # a generator that yields nothing until released

    def open(self, stub: aggregator_pb2_grpc.AggregatorServiceStub, timeout: float = 60) -> None:
        self.calls.append(stub.UploadUpdate.future(self.requests(), timeout=timeout))

    def close(self) -> None:
        self._release.set()
        for call in self.calls:
            call.cancel()


def _refusals(registry: CollectorRegistry, method: str, reason: str) -> float:
    value = registry.get_sample_value(
        "hfl_grpc_refusals_total", {"service": AGGREGATOR, "method": method, "reason": reason}
    )
    return value or 0.0


def _wait_for(predicate: Callable[[], bool], seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


def test_sixteen_health_watches_with_the_operator_certificate_leave_get_status_answering(
    pki: Pki,
) -> None:
    # The attack: 16 Watch streams blocked every worker of a 16-worker aggregator.
    served = _served(pki, replace(CONFIG, max_workers=16))
    with served.running:
        channel = served.channel(pki.operator)
        health = health_pb2_grpc.HealthStub(channel)
        watches = [
            health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=30) for _ in range(16)
        ]
        for watch in watches:
            with pytest.raises(grpc.RpcError) as caught:
                next(watch)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
            assert "poll Health/Check instead" in (caught.value.details() or "")
        status = served.stub(pki.operator).GetStatus(aggregator_pb2.GetStatusRequest(), timeout=2)
        assert status.state == aggregator_pb2.FEDERATION_STATE_TRAINING
        assert health_status(channel, "") == health_pb2.HealthCheckResponse.SERVING


def test_idle_streams_beyond_the_per_peer_limit_are_refused_at_once(pki: Pki) -> None:
    limits = CallLimits(per_peer=3)
    served = _served(pki, replace(CONFIG, max_workers=8, limits=limits))
    idle = IdleUploads()
    with served.running:
        stub = served.stub(pki.trainer)
        try:
            for _ in range(3):
                idle.open(stub)
            assert _wait_for(lambda: served.running_in_flight() == 3)
            with pytest.raises(grpc.RpcError) as caught:
                stub.UploadUpdate(iter([aggregator_pb2.UploadUpdateRequest()]), timeout=5)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "already has 3 calls in flight" in (caught.value.details() or "")
            assert _refusals(served.registry, "UploadUpdate", "peer_limit") == 1.0
            # another peer, and the operator's status poll, are not affected
            status = served.stub(pki.operator).GetStatus(
                aggregator_pb2.GetStatusRequest(), timeout=2
            )
            assert status.state == aggregator_pb2.FEDERATION_STATE_TRAINING
        finally:
            idle.close()


def test_ordinary_calls_never_take_the_workers_kept_for_status_and_health(pki: Pki) -> None:
    limits = CallLimits(per_peer=10, control_reserve=2)
    served = _served(pki, replace(CONFIG, max_workers=4, limits=limits))
    trainers = [pki.ca.issue(role="trainer", peer_id=f"{i:02x}") for i in range(3)]
    idle = IdleUploads()
    with served.running:
        try:
            idle.open(served.stub(trainers[0]))
            idle.open(served.stub(trainers[1]))
            assert _wait_for(lambda: served.running_in_flight() == 2)
            with pytest.raises(grpc.RpcError) as caught:
                served.stub(trainers[2]).UploadUpdate(
                    iter([aggregator_pb2.UploadUpdateRequest()]), timeout=5
                )
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "server is busy" in (caught.value.details() or "")
            assert _refusals(served.registry, "UploadUpdate", "server_busy") == 1.0
            operator = served.stub(pki.operator)
            assert operator.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=2).state
            assert health_status(served.channel(pki.operator), "") == 1
        finally:
            idle.close()


def test_an_idle_stream_is_cut_by_the_idle_deadline_and_frees_its_worker(pki: Pki) -> None:
    limits = CallLimits(streams=StreamLimits(idle_seconds=0.5, max_seconds=30))
    served = _served(pki, replace(CONFIG, max_workers=4, limits=limits))
    idle = IdleUploads()
    with served.running:
        try:
            idle.open(served.stub(pki.trainer))
            with pytest.raises(grpc.RpcError) as caught:
                idle.calls[0].result(timeout=10)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no message for 0.5 s" in (caught.value.details() or "")
            assert _wait_for(lambda: served.running_in_flight() == 0)
            assert _refusals(served.registry, "UploadUpdate", "stream_idle") == 1.0
            assert _wait_for(lambda: served.requests("UploadUpdate", "DEADLINE_EXCEEDED") == 1)
        finally:
            idle.close()


def test_a_stream_that_keeps_sending_is_cut_at_the_whole_stream_deadline(pki: Pki) -> None:
    limits = CallLimits(streams=StreamLimits(idle_seconds=0.5, max_seconds=1.0))
    served = _served(pki, replace(CONFIG, max_workers=4, limits=limits))
    stop = threading.Event()

    def trickle() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
        while not stop.wait(0.1):
            yield aggregator_pb2.UploadUpdateRequest(chunk=tensor_pb2.TensorChunk(data=b"x"))

    with served.running:
        try:
            with pytest.raises(grpc.RpcError) as caught:
                served.stub().UploadUpdate(trickle(), timeout=20)
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert "the longest the server allows" in (caught.value.details() or "")
            assert _refusals(served.registry, "UploadUpdate", "stream_max") == 1.0
        finally:
            stop.set()


def test_limits_refuse_nonsense_configuration() -> None:
    with pytest.raises(ConfigError, match="control_reserve 4 leaves no worker"):
        ServerConfig(service="x", max_workers=4, limits=CallLimits(control_reserve=4))
    with pytest.raises(ConfigError, match="idle_seconds 5 must be positive and at most"):
        StreamLimits(idle_seconds=5, max_seconds=1)


def test_a_fixed_stream_window_turns_bdp_probing_off_and_sets_the_window() -> None:
    fixed = ServerConfig(service="aggregator", stream_window_bytes=1 << 20)
    assert stream_window_options(fixed) == [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", 1 << 20),
    ]
    assert stream_window_options(ServerConfig(service="aggregator")) == []


def test_uploads_larger_than_a_fixed_stream_window_arrive_whole(pki: Pki) -> None:
    registry = CollectorRegistry()
    running = build_server(
        replace(CONFIG, stream_window_bytes=65535),
        services=[registration()],
        credentials=server_credentials(pki.server_certificate()),
        registry=registry,
        authorizer=AUTHORIZER,
    )
    with running:
        stub = Served(running, registry, pki).stub()
        uploads = [
            aggregator_pb2.UploadUpdateRequest(
                chunk=tensor_pb2.TensorChunk(offset=i << 18, data=bytes(1 << 18))
            )
            for i in range(16)
        ]
        result = stub.UploadUpdate(iter(uploads), timeout=30)
    assert result.round == 16
    received = registry.get_sample_value(
        "hfl_grpc_received_bytes_total", {"service": AGGREGATOR, "method": "UploadUpdate"}
    )
    assert received == sum(u.ByteSize() for u in uploads)


@pytest.mark.parametrize("window", [1000, 1 << 31])
def test_server_config_refuses_a_stream_window_outside_http2s_range(window: int) -> None:
    with pytest.raises(ConfigError) as caught:
        ServerConfig(service="aggregator", stream_window_bytes=window)
    assert str(caught.value) == (
        f"server.stream_window_bytes {window} is outside 65535..2147483647; e.g. 1048576, "
        "or leave it unset for gRPC's BDP probing"
    )
