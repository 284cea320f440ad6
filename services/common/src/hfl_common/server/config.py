"""How a server listens and what it lets each peer hold: `ServerConfig`, `CallLimits`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from types import MappingProxyType

from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from hfl_common.errors import ConfigError

MIB = 1024 * 1024
# Models are streamed in 1 MiB chunks (protos/hfl/v1/tensor.proto); 4 MiB leaves ample room
# for a chunk, its framing and the largest non-chunk message (a model header with its specs).
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB

# Keepalive suited to long-polls (GetTask may hold a call for a minute without data):
# clients ping every 30 s, also between calls, so a dead NAT mapping or peer is noticed;
# servers accept pings that often (the gRPC default refuses pings closer than 5 minutes
# without data and closes the connection with ENHANCE_YOUR_CALM "too_many_pings").
# Option names: gRPC core channel arguments, doc/keepalive.md.
CLIENT_KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000
# Connections: an idle one (no call for 5 minutes) is closed, any one is re-made after an
# hour (a renewed certificate then reaches every peer; calls in flight get 15 more
# minutes), and one connection multiplexes at most 32 calls (gRPC's default: unlimited).
SERVER_MAX_CONNECTION_IDLE_MS = 5 * 60_000
SERVER_MAX_CONNECTION_AGE_MS = 60 * 60_000
SERVER_MAX_CONNECTION_AGE_GRACE_MS = 15 * 60_000
SERVER_MAX_CONCURRENT_STREAMS = 32
# Pings closer than the minimum interval tolerated before the connection is closed.
SERVER_MAX_PING_STRIKES = 2

HEALTH_CHECK_METHOD = f"/{health.SERVICE_NAME}/Check"
HEALTH_WATCH_METHOD = f"/{health.SERVICE_NAME}/Watch"
REFLECTION_METHOD = f"/{reflection.SERVICE_NAME}/ServerReflectionInfo"

# Calls that must get an answer while ordinary calls fill the server: probes and status
# polls. They may use the workers `CallLimits.control_reserve` keeps back.
DEFAULT_CONTROL_METHODS = frozenset(
    {
        HEALTH_CHECK_METHOD,
        "/hfl.v1.AggregatorService/GetStatus",
        "/hfl.v1.TrainerService/GetStatus",
        "/hfl.v1.AttestationService/GetTrustBundle",
    }
)


def _package_version() -> str:
    try:
        return metadata.version("hfl-common")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class StreamLimits:
    """How long a streaming call may hold a worker.

    `idle_seconds`: longest time without a message received or sent (a peer that opens a
    stream and sends nothing, or stops reading what we send); `max_seconds`: longest time
    the whole stream may last. A stream over either is cancelled by the server with
    DEADLINE_EXCEEDED and a message that says which limit it hit.
    """

    idle_seconds: float = 60.0
    max_seconds: float = 900.0

    def __post_init__(self) -> None:
        if not 0 < self.idle_seconds <= self.max_seconds:
            raise ConfigError(
                f"stream limits: idle_seconds {self.idle_seconds} must be positive and at "
                f"most max_seconds {self.max_seconds}"
            )


def _default_stream_overrides() -> Mapping[str, StreamLimits]:
    # grpcurl's listing is a request and an answer or two: never a long stream
    return MappingProxyType({REFLECTION_METHOD: StreamLimits(idle_seconds=10.0, max_seconds=60.0)})


@dataclass(frozen=True)
class CallLimits:
    """What one peer, and everyone together, may hold of a server.

    - `per_peer`: calls in flight at once per client certificate (by its SHA-256
      fingerprint: every key counts alone, whatever its role);
    - `per_anonymous_address`: the same for callers without a certificate (only the
      attestation port admits them), counted by IP address;
    - `control_reserve`: workers that ordinary calls may not take, kept for
      `control_methods` (health Check, GetStatus): ordinary calls are refused once
      `max_workers - control_reserve` of them are in flight, so a full server still
      answers its probes and its operator;
    - `streams` / `stream_overrides`: idle and whole-stream deadlines of streaming calls,
      by full method name ("/hfl.v1.AggregatorService/UploadUpdate");
    - `anonymous_rate_per_second` / `anonymous_burst`: a token bucket per IP address for
      anonymous calls;
    - `anonymous_methods`: the only methods an anonymous caller may call (None: all).

    Every refusal is RESOURCE_EXHAUSTED (PERMISSION_DENIED for a method closed to
    anonymous callers) with a message naming the limit, counted in
    ``hfl_grpc_refusals_total{service,method,reason}``.
    """

    per_peer: int = 4
    per_anonymous_address: int = 4
    control_reserve: int = 2
    control_methods: frozenset[str] = DEFAULT_CONTROL_METHODS
    streams: StreamLimits = field(default_factory=StreamLimits)
    stream_overrides: Mapping[str, StreamLimits] = field(default_factory=_default_stream_overrides)
    anonymous_rate_per_second: float = 20.0
    anonymous_burst: int = 40
    anonymous_methods: frozenset[str] | None = None

    def __post_init__(self) -> None:
        for name in ("per_peer", "per_anonymous_address", "anonymous_burst"):
            if getattr(self, name) < 1:
                raise ConfigError(f"server.limits.{name} {getattr(self, name)} must be at least 1")
        if self.control_reserve < 0:
            raise ConfigError(f"server.limits.control_reserve {self.control_reserve} is negative")
        if self.anonymous_rate_per_second <= 0:
            raise ConfigError(
                f"server.limits.anonymous_rate_per_second {self.anonymous_rate_per_second} "
                "must be positive"
            )

    def stream_limits(self, method: str) -> StreamLimits:
        return self.stream_overrides.get(method, self.streams)


# HTTP/2's default window (RFC 9113) and its largest (2^31 - 1).
MIN_STREAM_WINDOW_BYTES = 65535
MAX_STREAM_WINDOW_BYTES = (1 << 31) - 1


@dataclass(frozen=True)
class ServerConfig:
    """How a service's gRPC server listens. Built once in main() and passed down.

    `service` names the process in logs and in `hfl_build_info` ("aggregator");
    `grace_seconds` is how long in-flight calls may run on after SIGTERM before they are
    cancelled; `max_concurrent_rpcs` (None: four per worker) bounds the calls gRPC
    accepts at all, those waiting for a worker included, and refuses the rest with
    RESOURCE_EXHAUSTED before any handler runs; `limits` bounds what each peer may hold
    (see `CallLimits`).
    """

    service: str
    host: str = "127.0.0.1"
    port: int = 0
    max_workers: int = 16
    max_receive_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_send_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 10.0
    max_concurrent_rpcs: int | None = None
    version: str = field(default_factory=_package_version)
    # False only for the attestation service: a fresh enclave has no certificate yet and
    # proves itself in-band (evidence in IssueCertificate). TLS stays mandatory; calls
    # from peers without a certificate then skip the authorizer and have no
    # current_peer(), and reach only `limits.anonymous_methods`.
    require_client_auth: bool = True
    limits: CallLimits = field(default_factory=CallLimits)
    # HTTP/2 receive window of each stream in bytes: how much of an upload gRPC takes in
    # before the handler reads it. None: gRPC's BDP probing grows it with the measured
    # bandwidth-delay product (on loopback, megabytes per stream, held for every
    # connected uploader). A number turns the probing off and fixes it (docs/performance.md).
    stream_window_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.service:
            raise ConfigError("server.service must name the service, e.g. 'aggregator'")
        if not self.host:
            raise ConfigError("server.host is empty; use e.g. '127.0.0.1' or '0.0.0.0'")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"server.port {self.port} is outside 0..65535")
        if self.max_workers < 1:
            raise ConfigError(f"server.max_workers {self.max_workers} must be at least 1")
        for name in ("max_receive_message_bytes", "max_send_message_bytes"):
            value = getattr(self, name)
            if value < 64 * 1024:
                raise ConfigError(
                    f"server.{name} {value} is below 65536; "
                    "messages carry 1 MiB tensor chunks, use the default 4194304"
                )
        if self.stream_window_bytes is not None and not (
            MIN_STREAM_WINDOW_BYTES <= self.stream_window_bytes <= MAX_STREAM_WINDOW_BYTES
        ):
            raise ConfigError(
                f"server.stream_window_bytes {self.stream_window_bytes} is outside "
                f"{MIN_STREAM_WINDOW_BYTES}..{MAX_STREAM_WINDOW_BYTES}; e.g. 1048576, or "
                "leave it unset for gRPC's BDP probing"
            )
        if self.grace_seconds < 0:
            raise ConfigError(f"server.grace_seconds {self.grace_seconds} is negative")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ConfigError(
                f"server.max_concurrent_rpcs {self.max_concurrent_rpcs} must be at least 1"
            )
        if self.limits.control_reserve >= self.max_workers:
            raise ConfigError(
                f"server.limits.control_reserve {self.limits.control_reserve} leaves no worker "
                f"of {self.max_workers} for ordinary calls; reserve fewer or add workers"
            )

    @property
    def data_plane_capacity(self) -> int:
        """Ordinary calls in flight at once: every worker but the control reserve."""
        return self.max_workers - self.limits.control_reserve

    @property
    def queue_limit(self) -> int:
        """gRPC's own bound on calls accepted (running or waiting for a worker)."""
        if self.max_concurrent_rpcs is not None:
            return self.max_concurrent_rpcs
        return 4 * self.max_workers
