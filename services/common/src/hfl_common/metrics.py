"""Prometheus metrics of the gRPC edge, and the HTTP endpoint that serves a registry.

Everything is registered on a `CollectorRegistry` the caller passes in (tests use a fresh
one; a service builds one in main()), never on prometheus_client's global registry.

Metrics are served over plain HTTP on their own port, the Prometheus norm. They carry no
secrets: counts, durations and sizes per gRPC method and status code, and the build
version; never a peer identity, a model value, a key or a message. Bind the port to an
interface only the monitoring network reaches.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app

from hfl_common.errors import ConfigError

_LOG = logging.getLogger(__name__)

# From a 1 ms health check to a 10-minute long model stream.
DURATION_BUCKETS_SECONDS = (
    0.001,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
)


class GrpcServerMetrics:
    """Per-method request counts, durations and message bytes of one gRPC server.

    Labels: `service` is the full gRPC service name ("hfl.v1.AggregatorService"), `method`
    the method name ("Join"), `code` the status code name ("OK", "PERMISSION_DENIED").
    Bytes are serialized message sizes, every streamed message counted.
    """

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "hfl_grpc_requests_total",
            "gRPC calls finished, by final status code.",
            ("service", "method", "code"),
            registry=registry,
        )
        self.duration = Histogram(
            "hfl_grpc_request_duration_seconds",
            "Time from the start of a gRPC call to its last response message.",
            ("service", "method"),
            buckets=DURATION_BUCKETS_SECONDS,
            registry=registry,
        )
        self.received_bytes = Counter(
            "hfl_grpc_received_bytes_total",
            "Serialized size of the request messages received.",
            ("service", "method"),
            registry=registry,
        )
        self.sent_bytes = Counter(
            "hfl_grpc_sent_bytes_total",
            "Serialized size of the response messages sent.",
            ("service", "method"),
            registry=registry,
        )
        self.refusals = Counter(
            "hfl_grpc_refusals_total",
            "Calls refused by a resource limit before their handler ran, by reason "
            "(peer_limit, server_busy, rate_limited, anonymous_method) or cut by a stream "
            "deadline (stream_idle, stream_max).",
            ("service", "method", "reason"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "hfl_grpc_calls_in_flight",
            "Calls admitted and not yet finished.",
            registry=registry,
        )

    def refused(self, service: str, method: str, reason: str) -> None:
        self.refusals.labels(service, method, reason).inc()

    def received(self, service: str, method: str, size: int) -> None:
        self.received_bytes.labels(service, method).inc(size)

    def sent(self, service: str, method: str, size: int) -> None:
        self.sent_bytes.labels(service, method).inc(size)

    def finished(
        self, service: str, method: str, code: grpc.StatusCode, duration_seconds: float
    ) -> None:
        self.requests.labels(service, method, code.name).inc()
        self.duration.labels(service, method).observe(duration_seconds)


def register_build_info(registry: CollectorRegistry, service: str, version: str) -> Gauge:
    """`hfl_build_info{service,version} 1`: which build of which service is running."""
    gauge = Gauge(
        "hfl_build_info",
        "Always 1; the labels say which service and version is running.",
        ("service", "version"),
        registry=registry,
    )
    gauge.labels(service, version).set(1)
    return gauge


def register_tee_simulated(registry: CollectorRegistry, simulated: bool) -> Gauge:
    """`hfl_tee_simulated 1` when this process runs on the simulated TEE, 0 on real SGX.

    A simulated enclave protects nothing from its host (docs/security.md); alert on 1 in
    any deployment that is meant to be production.
    """
    gauge = Gauge(
        "hfl_tee_simulated",
        "1 when this service's enclave is simulated (no hardware protection), 0 on SGX.",
        registry=registry,
    )
    gauge.set(1 if simulated else 0)
    return gauge


def start_metrics_http(
    registry: CollectorRegistry,
    host: str,
    port: int,
    *,
    ready: Callable[[], bool] | None = None,
) -> tuple[int, Callable[[], None]]:
    """Serve `registry` at http://host:port/metrics; return the bound port and a stop function.

    Also serves `/healthz` (200 while the process runs) and `/readyz` (200 when `ready()`
    says so, e.g. the gRPC health is SERVING; 503 otherwise) for container healthchecks,
    which cannot speak mTLS. Port 0 picks a free port. The stop function shuts the server
    down, closes its socket and joins its thread; calling it twice is harmless. Plain
    HTTP: see the module doc.
    """
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path in ("/healthz", "/readyz"):
            ok = path == "/healthz" or ready is None or ready()
            start_response(
                "200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")]
            )
            return [b"ok\n" if ok else b"not ready\n"]
        result: Iterable[bytes] = metrics_app(environ, start_response)
        return result

    try:
        httpd = make_server(host, port, app, ThreadingWSGIServer, handler_class=_SilentHandler)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    thread = threading.Thread(
        target=lambda: httpd.serve_forever(poll_interval=0.05), name="hfl-metrics-http", daemon=True
    )
    thread.start()
    bound = int(httpd.server_port)
    stopped = False

    def stop() -> None:
        nonlocal stopped
        if stopped:
            return
        stopped = True
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5.0)
        _LOG.info("metrics endpoint on %s:%d stopped", host, bound)

    _LOG.info("metrics on http://%s:%d/metrics", host, bound)
    return bound, stop


class ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _SilentHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        _LOG.debug("metrics http: " + format, *args)
