"""The gRPC server bootstrap every hfl service starts through, and the matching client channel.

`build_server` returns a started `RunningServer` whose `port` is the port actually bound
(port 0 in tests). Every server it builds has:

- **mTLS only.** One secure port whose credentials require a client certificate; there is
  no insecure port and no fallback. The factory refuses to start without credentials, and
  the interceptor refuses any call whose peer presented no certificate (UNAUTHENTICATED),
  so even a misconfigured `grpc.ServerCredentials` cannot serve an anonymous caller.
- **Certificate renewal without restart.** Pass a `CredentialsProvider` (a callable that
  returns the current `ServerCertificate`) instead of fixed credentials: the server is then
  built on `grpc.dynamic_ssl_server_credentials`, gRPC asks the provider before every new
  TLS handshake, and a renewed certificate is used by every connection made after it.
  Established connections keep the certificate they were opened with.
- **The standard health service** (grpc.health.v1), with an entry per registered service
  and the overall entry "". Everything starts NOT_SERVING: the caller flips it with
  `set_serving(True)` once it can serve (e.g. once it holds its attested certificate), and
  shutdown flips it back to NOT_SERVING for good.
- **Server reflection** (grpc.reflection.v1alpha) listing our services, health and
  reflection, so `grpcurl` works (with a client certificate, like every other caller).
- **Deliberate message limits**: 4 MiB each way by default. Models and updates are
  streamed in chunks of 1 MiB (protos/hfl/v1/tensor.proto), so the largest legitimate
  message is a chunk plus its framing; anything larger is refused with RESOURCE_EXHAUSTED
  by gRPC before a handler sees it.
- **One interceptor** that, for every call of every kind (unary/stream in both directions):
  reads the peer certificate from the TLS auth context into a `PeerIdentity`, asks the
  `Authorizer` (health and reflection are open to any authenticated peer), makes the peer
  available to the handler through `current_peer()`, maps `HflError` subclasses to their
  status code with their message, turns any other exception into INTERNAL with a generic
  message (the traceback goes to the log, never to the peer), and records the request
  metrics of `hfl_common.metrics`.

Identity convention (certificates issued by the attestation service, the federation CA):

- URI SAN ``hfl://role/<role>``: the role of the peer (`role_san`), exactly one per cert.
- URI SAN ``hfl://id/<hex>``: a stable id of the peer (`id_san`), at most one.
- DNS SAN ``<role>.hfl.internal`` (`role_dns_name`): the name gRPC checks the server
  certificate against. gRPC's hostname check ignores URI SANs and the services are
  reached by IP or container name, so clients pass
  ``target_name_override=role_dns_name("aggregator")`` to `make_channel`. The
  ``.internal`` top-level domain is reserved for private use (ICANN board resolution
  2024.07.29.06), so the name can never resolve to anyone else's host.
"""

from __future__ import annotations

import contextvars
import hashlib
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field
from importlib import metadata
from types import FrameType
from typing import Any, NoReturn, Protocol, TypeVar, cast

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry

from hfl_common.errors import (
    ConfigError,
    HflError,
    PermissionDeniedError,
    UnauthenticatedError,
    rich_status,
)
from hfl_common.metrics import GrpcServerMetrics, register_build_info

_LOG = logging.getLogger(__name__)

MIB = 1024 * 1024
# Models are streamed in 1 MiB chunks (protos/hfl/v1/tensor.proto); 4 MiB leaves ample room
# for a chunk, its framing and the largest non-chunk message (a model header with its specs).
DEFAULT_MAX_MESSAGE_BYTES = 4 * MIB

ROLE_SAN_PREFIX = "hfl://role/"
ID_SAN_PREFIX = "hfl://id/"
# The `.internal` TLD is reserved for private use (ICANN board resolution 2024.07.29.06).
ROLE_DNS_SUFFIX = ".hfl.internal"

_ROLE_RE = re.compile(r"^[a-z][a-z0-9-]{0,62}$")
_HEX_ID_RE = re.compile(r"^[0-9a-f]{1,128}$")

# Reachable by any mTLS-authenticated peer, whatever the authorizer says: probes and grpcurl.
PUBLIC_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})

INTERNAL_ERROR_MESSAGE = "internal error; the server logged the details"

# Keepalive suited to long-polls (GetTask may hold a call for a minute without data):
# clients ping every 30 s, also between calls, so a dead NAT mapping or peer is noticed;
# servers accept pings that often (the gRPC default refuses pings closer than 5 minutes
# without data and closes the connection with ENHANCE_YOUR_CALM "too_many_pings").
# Option names: gRPC core channel arguments, doc/keepalive.md.
CLIENT_KEEPALIVE_TIME_MS = 30_000
KEEPALIVE_TIMEOUT_MS = 10_000
SERVER_MIN_PING_INTERVAL_MS = 10_000
SERVER_KEEPALIVE_TIME_MS = 60_000


def _package_version() -> str:
    try:
        return metadata.version("hfl-common")
    except metadata.PackageNotFoundError:
        return "0+unknown"


@dataclass(frozen=True)
class ServerConfig:
    """How a service's gRPC server listens. Built once in main() and passed down.

    `service` names the process in logs and in `hfl_build_info` ("aggregator");
    `grace_seconds` is how long in-flight calls may run on after SIGTERM before they are
    cancelled; `max_concurrent_rpcs` (None: unlimited) refuses calls beyond it with
    RESOURCE_EXHAUSTED instead of queueing them behind busy workers.
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
    # current_peer(), so every method of such a server must be open to anyone.
    require_client_auth: bool = True

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
        if self.grace_seconds < 0:
            raise ConfigError(f"server.grace_seconds {self.grace_seconds} is negative")
        if self.max_concurrent_rpcs is not None and self.max_concurrent_rpcs < 1:
            raise ConfigError(
                f"server.max_concurrent_rpcs {self.max_concurrent_rpcs} must be at least 1"
            )


@dataclass(frozen=True)
class ServerCertificate:
    """What a TLS server needs: its key and chain, and the roots its clients must chain to."""

    private_key_pem: bytes = field(repr=False)
    certificate_chain_pem: bytes
    client_ca_pem: bytes


CredentialsProvider = Callable[[], ServerCertificate]
"""Returns the server's current certificate; asked before every new TLS handshake.

It must be cheap (return what it holds in memory) and thread-safe: gRPC calls it from its
own threads. Returning an equal `ServerCertificate` keeps the current configuration.
"""


def server_credentials(certificate: ServerCertificate) -> grpc.ServerCredentials:
    """Fixed mTLS server credentials that require a client certificate chained to the CA."""
    return grpc.ssl_server_credentials(
        [(certificate.private_key_pem, certificate.certificate_chain_pem)],
        root_certificates=certificate.client_ca_pem,
        require_client_auth=True,
    )


def _certificate_configuration(cert: ServerCertificate) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration(
        [(cert.private_key_pem, cert.certificate_chain_pem)],
        root_certificates=cert.client_ca_pem,
    )


class _RotatingCredentials:
    """Adapts a CredentialsProvider to grpc's certificate-configuration fetcher."""

    def __init__(self, provider: CredentialsProvider, *, require_client_auth: bool = True) -> None:
        self._provider = provider
        self._require_client_auth = require_client_auth
        self._lock = threading.Lock()
        self._current = provider()

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            _certificate_configuration(self._current),
            # the stubs say the fetcher may not return None; gRPC documents None as "no change"
            cast(Callable[[], grpc.ServerCertificateConfiguration], self._fetch),
            require_client_authentication=self._require_client_auth,
        )

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
        # Called by gRPC before every new handshake; None keeps the current configuration.
        try:
            latest = self._provider()
        except Exception:
            _LOG.exception("the credentials provider failed; keeping the current certificate")
            return None
        with self._lock:
            if latest == self._current:
                return None
            self._current = latest
        _LOG.info("server certificate renewed; new connections use the new certificate")
        return _certificate_configuration(latest)


# --- peer identity -------------------------------------------------------------------------


def role_san(role: str) -> str:
    """The URI SAN that names a certificate's role: ``hfl://role/<role>``."""
    if not _ROLE_RE.fullmatch(role):
        raise ConfigError(
            f"role {role!r} is not a valid role name (lowercase letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )
    return ROLE_SAN_PREFIX + role


def id_san(peer_id: str) -> str:
    """The URI SAN that names a certificate's stable id: ``hfl://id/<lowercase hex>``."""
    if not _HEX_ID_RE.fullmatch(peer_id):
        raise ConfigError(f"peer id {peer_id!r} is not lowercase hex of 1 to 128 digits")
    return ID_SAN_PREFIX + peer_id


def role_dns_name(role: str) -> str:
    """The DNS SAN a server certificate of `role` carries, for gRPC's hostname check."""
    role_san(role)  # validates
    return role + ROLE_DNS_SUFFIX


@dataclass(frozen=True)
class PeerIdentity:
    """Who is calling: the peer's verified TLS client certificate and what it says.

    `role` and `peer_id` come from the ``hfl://role/`` and ``hfl://id/`` URI SANs;
    `address` is gRPC's peer string ("ipv4:127.0.0.1:53210"), for logs only.
    """

    certificate: x509.Certificate = field(repr=False)
    role: str | None
    peer_id: str | None
    address: str

    @property
    def certificate_der(self) -> bytes:
        return self.certificate.public_bytes(Encoding.DER)

    @property
    def fingerprint_sha256(self) -> str:
        return hashlib.sha256(self.certificate_der).hexdigest()

    @classmethod
    def from_pem(cls, pem: bytes, address: str = "") -> PeerIdentity:
        """Parse a peer certificate; raise UnauthenticatedError if its hfl SANs are unusable."""
        try:
            certificate = x509.load_pem_x509_certificate(pem)
        except ValueError as err:
            raise UnauthenticatedError(
                f"peer certificate is not a parsable X.509 PEM: {err}"
            ) from err
        try:
            san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        roles = [u.removeprefix(ROLE_SAN_PREFIX) for u in uris if u.startswith(ROLE_SAN_PREFIX)]
        ids = [u.removeprefix(ID_SAN_PREFIX) for u in uris if u.startswith(ID_SAN_PREFIX)]
        if len(roles) > 1:
            raise UnauthenticatedError(
                f"peer certificate carries {len(roles)} role SANs ({', '.join(roles)}); "
                "exactly one hfl://role/<role> URI is allowed"
            )
        if len(ids) > 1:
            raise UnauthenticatedError(
                f"peer certificate carries {len(ids)} id SANs; at most one hfl://id/<hex>"
            )
        if roles and not _ROLE_RE.fullmatch(roles[0]):
            raise UnauthenticatedError(f"peer certificate role SAN {roles[0]!r} is malformed")
        if ids and not _HEX_ID_RE.fullmatch(ids[0]):
            raise UnauthenticatedError(f"peer certificate id SAN {ids[0]!r} is not lowercase hex")
        return cls(
            certificate=certificate,
            role=roles[0] if roles else None,
            peer_id=ids[0] if ids else None,
            address=address,
        )


_CURRENT_PEER: contextvars.ContextVar[PeerIdentity] = contextvars.ContextVar("hfl_current_peer")


def current_peer() -> PeerIdentity:
    """The authenticated peer of the call this handler is serving.

    Set by the server interceptor for the whole call, streaming responses included (each
    step of a response generator runs in the call's context). Raises UnauthenticatedError
    when called outside a call served by `build_server`.
    """
    try:
        return _CURRENT_PEER.get()
    except LookupError:
        raise UnauthenticatedError(
            "current_peer() called outside an RPC served by hfl_common.server"
        ) from None


class Authorizer(Protocol):
    """Decides whether `peer` may call `method` ("/hfl.v1.AggregatorService/Join").

    Returns None to allow; raises PermissionDeniedError (authenticated but not allowed) or
    UnauthenticatedError (identity unusable) with a message that names the method and role.
    """

    def authorize(self, method: str, peer: PeerIdentity) -> None: ...


@dataclass(frozen=True)
class RoleAuthorizer:
    """Allow-list of roles per full method name; every method not listed is refused."""

    allowed_roles: dict[str, frozenset[str]]

    def authorize(self, method: str, peer: PeerIdentity) -> None:
        allowed = self.allowed_roles.get(method)
        if allowed is None:
            raise PermissionDeniedError(f"method {method} is not open to any role")
        if peer.role is None:
            raise PermissionDeniedError(
                f"peer certificate has no {ROLE_SAN_PREFIX}<role> URI SAN; "
                f"{method} requires role {' or '.join(sorted(allowed))}"
            )
        if peer.role not in allowed:
            raise PermissionDeniedError(
                f"role {peer.role} may not call {method}; allowed: {', '.join(sorted(allowed))}"
            )


# --- the interceptor -------------------------------------------------------------------------

_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


def _context_code(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    # ServicerContext.code() exists since grpcio 1.38; the stubs lack it.
    code = getattr(context, "code", None)
    if code is None:
        return None
    return cast(grpc.StatusCode | None, code())


def _split_method(method: str) -> tuple[str, str]:
    # "/package.Service/Method" -> ("package.Service", "Method")
    _, _, rest = method.partition("/")
    service, _, name = rest.partition("/")
    return service or "unknown", name or "unknown"


class _CallObserver:
    """Authorization, error mapping and metrics for one method; wraps its behaviours."""

    def __init__(
        self,
        method: str,
        authorizer: Authorizer | None,
        metrics: GrpcServerMetrics,
        allow_anonymous: bool = False,
    ) -> None:
        self.method = method
        self._allow_anonymous = allow_anonymous
        self.service, self.name = _split_method(method)
        self._authorizer = None if self.service in PUBLIC_SERVICES else authorizer
        self._metrics = metrics

    # serialized sizes, counted per message (streamed ones included)
    def wrap_deserializer(
        self, deserializer: Callable[[bytes], Any] | None
    ) -> Callable[[bytes], Any]:
        def counted(data: bytes) -> Any:
            self._metrics.received(self.service, self.name, len(data))
            return deserializer(data) if deserializer is not None else data

        return counted

    def wrap_serializer(self, serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes]:
        def counted(message: Any) -> bytes:
            data = serializer(message) if serializer is not None else cast(bytes, message)
            self._metrics.sent(self.service, self.name, len(data))
            return data

        return counted

    def enter(self, context: grpc.ServicerContext) -> contextvars.Context:
        """Identify and authorize the peer; return the context the handler runs in."""
        auth = cast(dict[str, list[bytes]], context.auth_context())
        pems = auth.get("x509_pem_cert")
        if not pems and self._allow_anonymous:
            # ServerConfig.require_client_auth=False: an anonymous TLS peer, no identity.
            return contextvars.copy_context()
        if not pems:
            raise UnauthenticatedError(
                f"{self.method} requires a client certificate (mTLS); the peer presented none"
            )
        peer = PeerIdentity.from_pem(pems[0], context.peer())
        if self._authorizer is not None:
            self._authorizer.authorize(self.method, peer)
        call_context = contextvars.copy_context()
        call_context.run(_CURRENT_PEER.set, peer)
        return call_context

    def fail(self, err: Exception, context: grpc.ServicerContext, started: float) -> NoReturn:
        """Record and translate an exception; always raises (through context.abort)."""
        if isinstance(err, HflError):
            self._done(err.code, started)
            _LOG.info(
                "%s refused with %s: %s",
                self.method,
                err.code.name,
                err,
                extra={"peer": _peer(context)},
            )
            context.abort_with_status(rich_status(err))  # code, message and ErrorInfo
        code = _context_code(context)
        if code is not None and code != grpc.StatusCode.OK:
            # the handler called context.abort() itself: its status stands
            self._done(code, started)
            raise err
        if not _context_active(context):
            # the client cancelled or the deadline passed: the request iterator raised
            self._done(grpc.StatusCode.CANCELLED, started)
            _LOG.debug("%s ended early: the call is no longer active", self.method)
            raise err
        self._done(grpc.StatusCode.INTERNAL, started)
        _LOG.error("unexpected error in %s", self.method, exc_info=err)
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_ERROR_MESSAGE)

    def succeed(self, context: grpc.ServicerContext, started: float) -> None:
        self._done(_context_code(context) or grpc.StatusCode.OK, started)

    def _done(self, code: grpc.StatusCode, started: float) -> None:
        self._metrics.finished(self.service, self.name, code, time.perf_counter() - started)

    def unary_response(
        self, behaviour: Callable[[_Req, grpc.ServicerContext], _Resp]
    ) -> Callable[[_Req, grpc.ServicerContext], _Resp]:
        def handle(request: _Req, context: grpc.ServicerContext) -> _Resp:
            started = time.perf_counter()
            try:
                call_context = self.enter(context)
                response = call_context.run(behaviour, request, context)
            except Exception as err:
                self.fail(err, context, started)
            self.succeed(context, started)
            return response

        return handle

    def stream_response(
        self, behaviour: Callable[[_Req, grpc.ServicerContext], Iterator[_Resp]]
    ) -> Callable[[_Req, grpc.ServicerContext], Iterator[_Resp]]:
        def handle(request: _Req, context: grpc.ServicerContext) -> Iterator[_Resp]:
            started = time.perf_counter()
            finished = False
            responses: Iterator[_Resp] | None = None
            try:
                call_context = self.enter(context)
                responses = iter(call_context.run(behaviour, request, context))
                while True:
                    try:
                        response = call_context.run(next, responses)
                    except StopIteration:
                        break
                    yield response
            except Exception as err:
                finished = True
                self.fail(err, context, started)
            finally:
                if not finished:
                    if _context_active(context) or _context_code(context) is not None:
                        self.succeed(context, started)
                    else:
                        # the generator was closed early: the client went away
                        self._done(grpc.StatusCode.CANCELLED, started)
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()

        return handle


def _context_active(context: grpc.ServicerContext) -> bool:
    try:
        return bool(context.is_active())
    except Exception:
        return False


def _peer(context: grpc.ServicerContext) -> str:
    try:
        return context.peer()
    except Exception:
        return "unknown"


class _ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        authorizer: Authorizer | None,
        metrics: GrpcServerMetrics,
        allow_anonymous: bool = False,
    ) -> None:
        self._authorizer = authorizer
        self._metrics = metrics
        self._allow_anonymous = allow_anonymous

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        return _wrap_handler(
            handler,
            _CallObserver(
                handler_call_details.method,
                self._authorizer,
                self._metrics,
                self._allow_anonymous,
            ),
        )


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], observer: _CallObserver
) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = observer.wrap_deserializer(handler.request_deserializer)
    serializer = observer.wrap_serializer(handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            observer.unary_response(handler.unary_unary), deserializer, serializer
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            observer.stream_response(handler.unary_stream), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            observer.unary_response(handler.stream_unary), deserializer, serializer
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            observer.stream_response(handler.stream_stream), deserializer, serializer
        )
    raise ConfigError(f"method {observer.method} has a handler of no known kind")


# --- the server ----------------------------------------------------------------------------


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
        # one process per port: never share a port with a stale server by accident
        ("grpc.so_reuseport", 0),
    ]
    executor = futures.ThreadPoolExecutor(
        max_workers=config.max_workers, thread_name_prefix=f"hfl-{config.service}-grpc"
    )
    server = grpc.server(
        executor,
        interceptors=[
            _ServerInterceptor(authorizer, metrics, allow_anonymous=not config.require_client_auth)
        ],
        options=options,
        maximum_concurrent_rpcs=config.max_concurrent_rpcs,
    )

    # Health Watch runs in blocking mode: the interceptor wraps its behaviour, so gRPC's
    # experimental non-blocking path does not apply; each open Watch holds one worker.
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
        server_creds = _RotatingCredentials(
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
    return RunningServer(
        server, config=config, port=port, health_servicer=health_servicer, service_names=names
    )


# --- the client side -----------------------------------------------------------------------


def channel_credentials(
    *, root_ca_pem: bytes, private_key_pem: bytes, certificate_chain_pem: bytes
) -> grpc.ChannelCredentials:
    """mTLS client credentials: trust `root_ca_pem`, present our key and chain."""
    return grpc.ssl_channel_credentials(
        root_certificates=root_ca_pem,
        private_key=private_key_pem,
        certificate_chain=certificate_chain_pem,
    )


def make_channel(
    target: str,
    credentials: grpc.ChannelCredentials,
    *,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    target_name_override: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
) -> grpc.Channel:
    """A secure channel with the server's message limits and keepalive for long-polls.

    `target_name_override` is the name the server certificate is checked against, e.g.
    ``role_dns_name("aggregator")``: certificates carry role names, not IP addresses, so a
    client dialling "10.0.0.7:50051" must say which name it expects. `options` are added
    last and win over the defaults.
    """
    merged: dict[str, Any] = {
        "grpc.max_receive_message_length": max_message_bytes,
        "grpc.max_send_message_length": max_message_bytes,
        "grpc.keepalive_time_ms": CLIENT_KEEPALIVE_TIME_MS,
        "grpc.keepalive_timeout_ms": KEEPALIVE_TIMEOUT_MS,
        "grpc.keepalive_permit_without_calls": 1,
        # allow keepalive pings while a long-poll sends no data (gRPC core default: 2)
        "grpc.http2.max_pings_without_data": 0,
    }
    if target_name_override is not None:
        merged["grpc.ssl_target_name_override"] = target_name_override
    merged.update(dict(options))
    return grpc.secure_channel(target, credentials, options=list(merged.items()))
