"""Issue 11's attacks against real servers over real TLS, each shown to do no harm:
thousands of idle streams, a stalled connection, a connection cut mid-request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import grpc
import pytest
from prometheus_client import CollectorRegistry

from hfl_common.api import aggregator_pb2, aggregator_pb2_grpc, attestation_pb2, tensor_pb2
from hfl_common.attest_client import bootstrap_attestation_service, evidence_quote
from hfl_common.ratls import EnclaveKey
from hfl_common.server import (
    CallLimits,
    RoleAuthorizer,
    RunningServer,
    ServerCertificate,
    ServerConfig,
    ServiceRegistration,
    StreamLimits,
    build_server,
    channel_credentials,
    make_channel,
    role_dns_name,
    server_credentials,
)
from hfl_common.tee import EnclaveIdentity, SimulatedProvider
from tests.attestation.conftest import Identities, ServiceFactory, VerifierFactory

from .pki import ChaosCa, Issued
from .proxy import ControlledProxy

pytestmark = [pytest.mark.chaos, pytest.mark.slow]

AGGREGATOR = "hfl.v1.AggregatorService"
Providers = Callable[[EnclaveIdentity], SimulatedProvider]


class Uploads(aggregator_pb2_grpc.AggregatorServiceServicer):
    """Enough of AggregatorService for the edge: uploads that read every chunk, status."""

    def UploadUpdate(
        self,
        request_iterator: Iterator[aggregator_pb2.UploadUpdateRequest],
        context: grpc.ServicerContext,
    ) -> aggregator_pb2.UploadUpdateResponse:
        return aggregator_pb2.UploadUpdateResponse(
            disposition=aggregator_pb2.UPDATE_DISPOSITION_PENDING,
            round=sum(1 for _ in request_iterator),
        )

    def GetStatus(
        self, request: aggregator_pb2.GetStatusRequest, context: grpc.ServicerContext
    ) -> aggregator_pb2.GetStatusResponse:
        return aggregator_pb2.GetStatusResponse(state=aggregator_pb2.FEDERATION_STATE_TRAINING)


@dataclass
class Edge:
    ca: ChaosCa
    server: RunningServer
    registry: CollectorRegistry
    trainer: Issued
    operator: Issued

    def credentials(self, issued: Issued) -> grpc.ChannelCredentials:
        return channel_credentials(
            root_ca_pem=self.ca.pem,
            private_key_pem=issued.key_pem,
            certificate_chain_pem=issued.cert_pem,
        )

    def channel(self, issued: Issued, target: str | None = None) -> grpc.Channel:
        return make_channel(
            target or f"127.0.0.1:{self.server.port}",
            self.credentials(issued),
            target_name_override=role_dns_name("aggregator"),
            options=[("grpc.use_local_subchannel_pool", 1)],
        )

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        return self.registry.get_sample_value(name, labels or {}) or 0.0

    def refusals(self, method: str, reason: str) -> float:
        return self.sample(
            "hfl_grpc_refusals_total", {"service": AGGREGATOR, "method": method, "reason": reason}
        )


def _edge(limits: CallLimits, max_workers: int = 16) -> Edge:
    ca = ChaosCa()
    server_cert = ca.issue("aggregator", server=True)
    registry = CollectorRegistry()
    server = build_server(
        ServerConfig(service="aggregator", max_workers=max_workers, limits=limits),
        services=[
            ServiceRegistration(
                AGGREGATOR,
                Uploads(),  # type: ignore[abstract]  # the other methods answer UNIMPLEMENTED
                aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server,
            )
        ],
        credentials=server_credentials(
            ServerCertificate(server_cert.key_pem, server_cert.cert_pem, ca.pem)
        ),
        registry=registry,
        authorizer=RoleAuthorizer(
            {
                f"/{AGGREGATOR}/UploadUpdate": frozenset({"trainer"}),
                f"/{AGGREGATOR}/GetStatus": frozenset({"operator"}),
            }
        ),
    )
    server.set_serving(True)
    return Edge(ca, server, registry, ca.issue("trainer"), ca.issue("operator"))


def _wait_for(predicate: Callable[[], bool], seconds: float = 20.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def test_two_thousand_idle_upload_streams_leave_the_server_answering() -> None:
    # The attack: 2,000 UploadUpdate streams that never send made the aggregator
    # unresponsive. Opened over 64 connections (32 calls each at most) without threads.
    edge = _edge(CallLimits())
    streams, connections = 2000, 64
    target = f"127.0.0.1:{edge.server.port}"

    async def attack() -> tuple[dict[str, int], float]:
        release = asyncio.Event()

        async def silent() -> AsyncIterator[aggregator_pb2.UploadUpdateRequest]:
            await release.wait()
            return
            yield  # an async generator that sends nothing until released

        channels = [
            grpc.aio.secure_channel(
                target,
                edge.credentials(edge.trainer),
                options=[
                    ("grpc.ssl_target_name_override", role_dns_name("aggregator")),
                    ("grpc.use_local_subchannel_pool", 1),
                ],
            )
            for _ in range(connections)
        ]
        calls = [
            aggregator_pb2_grpc.AggregatorServiceStub(channels[i % connections]).UploadUpdate(
                silent(), timeout=120
            )
            for i in range(streams)
        ]
        # while they are open, the operator's status poll still answers at once
        await asyncio.sleep(3)
        started = time.monotonic()
        operator = grpc.aio.secure_channel(
            target,
            edge.credentials(edge.operator),
            options=[("grpc.ssl_target_name_override", role_dns_name("aggregator"))],
        )
        status = await aggregator_pb2_grpc.AggregatorServiceStub(operator).GetStatus(
            aggregator_pb2.GetStatusRequest(), timeout=10
        )
        assert status.state == aggregator_pb2.FEDERATION_STATE_TRAINING
        status_seconds = time.monotonic() - started
        release.set()
        codes: dict[str, int] = {}
        for call in calls:
            try:
                await call
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as err:
                codes[err.code().name] = codes.get(err.code().name, 0) + 1
        for channel in [*channels, operator]:
            await channel.close(None)
        return codes, status_seconds

    try:
        codes, _status_seconds = asyncio.run(attack())
        # The per-peer limit admitted 4 at a time; everything else was refused at once,
        # by the interceptor (peer_limit) or, beyond four calls per worker, by gRPC itself
        # before any worker ran (RESOURCE_EXHAUSTED, or CANCELLED when it reset a stream
        # the client had not finished sending).
        assert codes.get("OK", 0) <= 4, codes
        assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED", "CANCELLED"}, codes
        assert codes.get("RESOURCE_EXHAUSTED", 0) + codes.get("CANCELLED", 0) >= streams - 4
        assert edge.refusals("UploadUpdate", "peer_limit") > 0
        assert _wait_for(lambda: edge.sample("hfl_grpc_calls_in_flight") == 0)
    finally:
        edge.server.stop(0)


def test_a_stalled_upload_through_a_proxy_is_cut_by_the_idle_deadline() -> None:
    edge = _edge(CallLimits(streams=StreamLimits(idle_seconds=1.0, max_seconds=60.0)))
    proxy = ControlledProxy("127.0.0.1", edge.server.port)
    try:
        stub = aggregator_pb2_grpc.AggregatorServiceStub(edge.channel(edge.trainer, proxy.target))
        stop = time.monotonic() + 30

        def chunks() -> Iterator[aggregator_pb2.UploadUpdateRequest]:
            yield aggregator_pb2.UploadUpdateRequest(chunk=tensor_pb2.TensorChunk(data=b"x"))
            # once the server holds the call, the connection goes silent
            assert _wait_for(lambda: edge.sample("hfl_grpc_calls_in_flight") == 1, 10)
            proxy.stall()
            while time.monotonic() < stop:
                time.sleep(0.1)
                yield aggregator_pb2.UploadUpdateRequest(chunk=tensor_pb2.TensorChunk(data=b"x"))

        with pytest.raises(grpc.RpcError) as caught:
            stub.UploadUpdate(chunks(), timeout=20)
        # the server cut the stream after 1 s without a message and freed its worker; the
        # client may hear it (DEADLINE_EXCEEDED) or only its own deadline (stalled link)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert _wait_for(lambda: edge.refusals("UploadUpdate", "stream_idle") == 1.0)
        assert _wait_for(lambda: edge.sample("hfl_grpc_calls_in_flight") == 0)
        # and it serves others meanwhile
        operator = aggregator_pb2_grpc.AggregatorServiceStub(edge.channel(edge.operator))
        assert operator.GetStatus(aggregator_pb2.GetStatusRequest(), timeout=5).state
    finally:
        proxy.close()
        edge.server.stop(0)


def _issue_request(
    key: EnclaveKey, provider: SimulatedProvider
) -> attestation_pb2.IssueCertificateRequest:
    request = attestation_pb2.IssueCertificateRequest(
        csr=key.csr("t", (), "trainer"), role=attestation_pb2.ROLE_TRAINER, label="t"
    )
    request.evidence.sgx_quote = evidence_quote(key, provider)
    return request


def test_attestation_through_a_stalled_proxy_hits_the_deadline_and_others_are_served(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    service = start_service()
    proxy = ControlledProxy("127.0.0.1", service.port)
    provider = provider_for(identities.trainer)
    try:
        with (
            bootstrap_attestation_service(proxy.target, make_verifier()) as through_proxy,
            bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as direct,
        ):
            proxy.stall()
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as caught:
                through_proxy.stub.IssueCertificate(
                    _issue_request(EnclaveKey.generate(), provider), timeout=2
                )
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 15
            issued = direct.stub.IssueCertificate(
                _issue_request(EnclaveKey.generate(), provider), timeout=10
            )
            assert issued.certificate_pem
    finally:
        proxy.close()


def test_attestation_cut_mid_request_is_refused_not_corrupted(
    start_service: ServiceFactory,
    make_verifier: VerifierFactory,
    identities: Identities,
    provider_for: Providers,
) -> None:
    registry = CollectorRegistry()
    service = start_service(registry=registry)
    proxy = ControlledProxy("127.0.0.1", service.port)
    provider = provider_for(identities.trainer)
    try:
        with bootstrap_attestation_service(proxy.target, make_verifier()) as through_proxy:
            # TLS handshake and HTTP/2 preface fit in 3 kB; the request (CSR and a
            # ~4.5 kB quote) does not: the connection is cut in the middle of it.
            proxy.cut_after(3000)
            with pytest.raises(grpc.RpcError) as caught:
                through_proxy.stub.IssueCertificate(
                    _issue_request(EnclaveKey.generate(), provider), timeout=10
                )
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        issued = registry.get_sample_value(
            "hfl_attestation_certificates_issued_total", {"role": "trainer"}
        )
        assert not issued  # nothing was issued from half a request
        internal = registry.get_sample_value(
            "hfl_grpc_requests_total",
            {
                "service": "hfl.v1.AttestationService",
                "method": "IssueCertificate",
                "code": "INTERNAL",
            },
        )
        assert not internal
        # the service and its CA state are intact: a whole request is served
        with bootstrap_attestation_service(f"127.0.0.1:{service.port}", make_verifier()) as direct:
            response = direct.stub.IssueCertificate(
                _issue_request(EnclaveKey.generate(), provider), timeout=10
            )
            assert response.certificate_pem.startswith("-----BEGIN CERTIFICATE-----")
    finally:
        proxy.close()
