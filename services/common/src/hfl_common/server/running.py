"""Building, starting and stopping a server: `build_server`, `RunningServer`."""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from hfl_common.errors import ConfigError
from hfl_common.metrics import GrpcServerMetrics, register_build_info
from hfl_common.server.config import (
    KEEPALIVE_TIMEOUT_MS,
    SERVER_KEEPALIVE_TIME_MS,
    SERVER_MAX_CONCURRENT_STREAMS,
    SERVER_MAX_CONNECTION_AGE_GRACE_MS,
    SERVER_MAX_CONNECTION_AGE_MS,
    SERVER_MAX_CONNECTION_IDLE_MS,
    SERVER_MAX_PING_STRIKES,
    SERVER_MIN_PING_INTERVAL_MS,
    ServerConfig,
)
from hfl_common.server.interceptor import Guard, ServerInterceptor
from hfl_common.server.limits import Admission, StreamReaper, TokenBuckets
from hfl_common.server.peer import Authorizer
from hfl_common.server.tls import CredentialsProvider, RotatingCredentials

_LOG = logging.getLogger("hfl_common.server")


@dataclass(frozen=True)
class ServiceRegistration:
    """One gRPC service to serve: its full name and how to add its servicer to a server.

    Example::

        ServiceRegistration(
            name="hfl.v1.AggregatorService",
            servicer=servicer,
            add_to_server=aggregator_pb2_grpc.add_AggregatorServiceServicer_to_server,
        )
    """

    name: str
    servicer: object
    add_to_server: Callable[[Any, grpc.Server], None]


class RunningServer:
    """A started server: its bound port, its health, and its orderly shutdown."""

    def __init__(
        self,
        server: grpc.Server,
        *,
        config: ServerConfig,
        port: int,
        health_servicer: health.HealthServicer,
        service_names: Sequence[str],
    ) -> None:
        self._server = server
        self._config = config
        self._port = port
        self._health = health_servicer
        self._service_names = tuple(service_names)
        self._hooks: list[Callable[[], None]] = []
        self._drain_hooks: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._stopping = False
        self._serving = False
        self._stopped = threading.Event()

    @property
    def port(self) -> int:
        """The port actually bound (the configured one, or the one the OS chose for 0)."""
        return self._port

    @property
    def address(self) -> str:
        return f"{self._config.host}:{self._port}"

    @property
    def service_names(self) -> tuple[str, ...]:
        return self._service_names

    @property
    def serving(self) -> bool:
        """Whether the last set_serving() said SERVING (False while draining)."""
        return self._serving and not self._stopping

    def set_serving(self, serving: bool) -> None:
        """Set every registered service and the overall entry "" to SERVING or NOT_SERVING.

        Ignored once shutdown began: a draining server stays NOT_SERVING.
        """
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *self._service_names):
            self._health.set(name, status)
        self._serving = serving
        _LOG.info(
            "health of %s set to %s", self._config.service, "SERVING" if serving else "NOT_SERVING"
        )

    def add_drain_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` as draining begins, before in-flight calls are waited for (e.g. wake
        long-polls so they answer at once instead of holding the grace period)."""
        with self._lock:
            self._drain_hooks.append(hook)

    def add_shutdown_hook(self, hook: Callable[[], None]) -> None:
        """Run `hook` once the server stopped (flush checkpoints, stop metrics); LIFO order."""
        with self._lock:
            self._hooks.append(hook)

    def stop(self, grace: float | None = None) -> None:
        """Drain and stop: NOT_SERVING, stop accepting calls, let in-flight calls run for
        `grace` seconds (default: the config's), cancel the rest, run the shutdown hooks.

        Blocks until done. A second call while stopping waits for the first to finish.
        """
        with self._lock:
            already = self._stopping
            self._stopping = True
        if already:
            self._stopped.wait()
            return
        grace = self._config.grace_seconds if grace is None else grace
        _LOG.info("stopping %s: draining for up to %.1f s", self._config.service, grace)
        self._health.enter_graceful_shutdown()
        stopped = self._server.stop(grace)
        for hook in self._drain_hooks:
            try:
                hook()
            except Exception:
                _LOG.exception("drain hook %r failed", hook)
        stopped.wait()
        for hook in reversed(self._hooks):
            try:
                hook()
            except Exception:
                _LOG.exception("shutdown hook %r failed", hook)
        _LOG.info("%s stopped", self._config.service)
        self._stopped.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the server stopped and its hooks ran; False if `timeout` passed first.

        Waits in short slices: a signal delivered to another thread (gRPC's, TensorFlow's)
        does not interrupt a blocking wait, and Python runs signal handlers only when the
        main thread executes bytecode.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if slice_ <= 0:
                return self._stopped.is_set()
            if self._stopped.wait(slice_):
                return True

    def install_signal_handlers(self) -> None:
        """On SIGTERM or SIGINT, stop gracefully in a background thread; `wait()` then returns.

        A second signal while draining cancels the in-flight calls at once. Must be called
        from the main thread (a rule of Python's signal module).
        """

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            name = signal.Signals(signum).name
            with self._lock:
                stopping = self._stopping
            if stopping:
                _LOG.warning("%s again while draining: cancelling in-flight calls", name)
                self._server.stop(0)
                return
            _LOG.info("%s received: shutting down", name)
            threading.Thread(target=self.stop, name="hfl-shutdown", daemon=False).start()

        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop(0)


def stream_window_options(config: ServerConfig) -> list[tuple[str, int]]:
    """gRPC arguments for `config.stream_window_bytes` (none when unset: BDP probing)."""
    if config.stream_window_bytes is None:
        return []
    return [
        ("grpc.http2.bdp_probe", 0),
        ("grpc.http2.lookahead_bytes", config.stream_window_bytes),
    ]


def build_server(
    config: ServerConfig,
    *,
    services: Sequence[ServiceRegistration],
    credentials: grpc.ServerCredentials | CredentialsProvider,
    registry: CollectorRegistry,
    authorizer: Authorizer | None,
) -> RunningServer:
    """Build, bind and start a gRPC server; every service starts NOT_SERVING.

    `credentials` is either fixed `grpc.ServerCredentials` (build them with
    `server_credentials`, which requires client certificates) or a `CredentialsProvider`
    for renewal without restart. `authorizer` None lets every authenticated peer call every
    method (logged as a warning). Metrics go to `registry`; use one server per registry.
    """
    if credentials is None:
        raise ConfigError(
            f"{config.service}: refusing to start without TLS credentials; hfl serves mTLS only"
        )
    names = [s.name for s in services]
    if len(set(names)) != len(names):
        raise ConfigError(f"{config.service}: a service is registered twice in {names}")
    pool = descriptor_pool.Default()
    for name in names:
        try:
            pool.FindServiceByName(name)
        except KeyError:
            raise ConfigError(
                f"service {name!r} is not in the protobuf descriptor pool; "
                "register it with its full name, e.g. 'hfl.v1.AggregatorService'"
            ) from None
    if authorizer is None:
        _LOG.warning(
            "%s has no authorizer: every mTLS-authenticated peer may call every method",
            config.service,
        )

    metrics = GrpcServerMetrics(registry)
    register_build_info(registry, config.service, config.version)

    options: list[tuple[str, Any]] = [
        ("grpc.max_receive_message_length", config.max_receive_message_bytes),
        ("grpc.max_send_message_length", config.max_send_message_bytes),
        ("grpc.keepalive_time_ms", SERVER_KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", SERVER_MIN_PING_INTERVAL_MS),
        ("grpc.http2.max_ping_strikes", SERVER_MAX_PING_STRIKES),
        ("grpc.max_connection_idle_ms", SERVER_MAX_CONNECTION_IDLE_MS),
        ("grpc.max_connection_age_ms", SERVER_MAX_CONNECTION_AGE_MS),
        ("grpc.max_connection_age_grace_ms", SERVER_MAX_CONNECTION_AGE_GRACE_MS),
        ("grpc.max_concurrent_streams", SERVER_MAX_CONCURRENT_STREAMS),
        # one process per port: never share a port with a stale server by accident
        ("grpc.so_reuseport", 0),
        *stream_window_options(config),
    ]
    executor = futures.ThreadPoolExecutor(
        max_workers=config.max_workers, thread_name_prefix=f"hfl-{config.service}-grpc"
    )
    limits = config.limits

    def expired(stream: Any) -> None:
        service, _, name = stream.method.lstrip("/").partition("/")
        metrics.refused(service, name, stream.expired or "stream")

    guard = Guard(
        limits=limits,
        admission=Admission(config, metrics.in_flight.set),
        anonymous_buckets=TokenBuckets(limits.anonymous_rate_per_second, limits.anonymous_burst),
        reaper=StreamReaper(config.service, expired),
    )
    server = grpc.server(
        executor,
        interceptors=[
            ServerInterceptor(
                authorizer, metrics, guard, allow_anonymous=not config.require_client_auth
            )
        ],
        options=options,
        # calls beyond this (running or queued for a worker) are refused by gRPC itself
        maximum_concurrent_rpcs=config.queue_limit,
    )

    # Health Check is served; Watch is refused by the interceptor (see its module doc).
    health_servicer = health.HealthServicer(experimental_non_blocking=False)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for registration in services:
        registration.add_to_server(registration.servicer, server)
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )

    for name in ("", *names):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)

    if isinstance(credentials, grpc.ServerCredentials):
        server_creds = credentials
    else:
        server_creds = RotatingCredentials(
            credentials, require_client_auth=config.require_client_auth
        ).credentials()
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_secure_port(address, server_creds)
    except RuntimeError as err:
        executor.shutdown(wait=False)
        raise ConfigError(f"{config.service}: cannot bind {address}: {err}") from err
    if port == 0:
        executor.shutdown(wait=False)
        raise ConfigError(f"{config.service}: cannot bind {address} (in use or not local?)")
    server.start()
    _LOG.info(
        "%s listening on %s:%d (mTLS), services: %s",
        config.service,
        config.host,
        port,
        ", ".join(names),
    )
    running = RunningServer(
        server, config=config, port=port, health_servicer=health_servicer, service_names=names
    )
    running.add_shutdown_hook(guard.reaper.stop)
    return running
