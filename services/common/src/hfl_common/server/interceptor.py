"""The one interceptor every call of every kind goes through.

For each call it: reads the peer certificate into a `PeerIdentity` (anonymous callers,
admitted only where `require_client_auth` is off, reach only the anonymous methods and
are rate-limited per address), asks the `Authorizer` (health and reflection are open to
any authenticated peer), admits the call under the `CallLimits` (refusing at once with
RESOURCE_EXHAUSTED when the peer or the server is full), puts streaming calls under the
`StreamReaper`, makes the peer available through `current_peer()`, maps `HflError`
subclasses to their status with their message, turns any other exception into INTERNAL
with a generic message (the traceback goes to the log, never to the peer), and records
the request metrics of `hfl_common.metrics`.

grpc.health.v1 Watch is refused with UNIMPLEMENTED on every server: in gRPC's
synchronous server each open Watch holds a worker thread for as long as the watcher
likes (16 of them blocked every worker of an aggregator), nothing in hfl watches, and
UNIMPLEMENTED is what the health protocol tells clients to treat as "health checking
not supported" (client-side health checking then falls back to the connection state).
Probes use Check, which answers at once.
"""

from __future__ import annotations

import contextvars
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar, cast

import grpc
from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from hfl_common.errors import (
    ConfigError,
    HflError,
    PermissionDeniedError,
    UnauthenticatedError,
    rich_status,
)
from hfl_common.metrics import GrpcServerMetrics
from hfl_common.server.config import HEALTH_WATCH_METHOD, CallLimits
from hfl_common.server.limits import (
    Admission,
    LimitRefusedError,
    StreamReaper,
    Ticket,
    TokenBuckets,
    WatchedStream,
    address_key,
)
from hfl_common.server.peer import CURRENT_PEER, Authorizer, PeerIdentity

_LOG = logging.getLogger("hfl_common.server")

# Reachable by any mTLS-authenticated peer, whatever the authorizer says: probes and grpcurl.
PUBLIC_SERVICES = frozenset({health.SERVICE_NAME, reflection.SERVICE_NAME})

INTERNAL_ERROR_MESSAGE = "internal error; the server logged the details"
WATCH_REFUSED_MESSAGE = (
    "grpc.health.v1.Health/Watch is not served: an open watch would hold a server worker; "
    "poll Health/Check instead"
)

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


@dataclass
class Guard:
    """What every call of one server shares: limits, their counters and the reaper."""

    limits: CallLimits
    admission: Admission
    anonymous_buckets: TokenBuckets
    reaper: StreamReaper


@dataclass
class _Call:
    """What one call holds while it runs."""

    context: contextvars.Context
    ticket: Ticket | None
    watched: WatchedStream | None

    def end(self, reaper: StreamReaper) -> None:
        if self.watched is not None:
            reaper.forget(self.watched)
        if self.ticket is not None:
            self.ticket.release()


class _CallObserver:
    """Authorization, limits, error mapping and metrics for one call; wraps its behaviour."""

    def __init__(
        self,
        method: str,
        authorizer: Authorizer | None,
        metrics: GrpcServerMetrics,
        guard: Guard,
        allow_anonymous: bool = False,
    ) -> None:
        self.method = method
        self._allow_anonymous = allow_anonymous
        self.service, self.name = _split_method(method)
        self._authorizer = None if self.service in PUBLIC_SERVICES else authorizer
        self._metrics = metrics
        self._guard = guard

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

    def _refuse(self, refusal: LimitRefusedError) -> NoReturn:
        self._metrics.refused(self.service, self.name, refusal.reason)
        raise refusal

    def enter(self, context: grpc.ServicerContext, *, streaming: bool) -> _Call:
        """Identify, authorize and admit the peer; return what the call holds."""
        auth = cast(dict[str, list[bytes]], context.auth_context())
        pems = auth.get("x509_pem_cert")
        limits = self._guard.limits
        call_context = contextvars.copy_context()
        if not pems:
            if not self._allow_anonymous:
                raise UnauthenticatedError(
                    f"{self.method} requires a client certificate (mTLS); the peer presented none"
                )
            # ServerConfig.require_client_auth=False: an anonymous TLS peer, no identity.
            if limits.anonymous_methods is not None and self.method not in limits.anonymous_methods:
                self._metrics.refused(self.service, self.name, "anonymous_method")
                raise PermissionDeniedError(
                    f"{self.method} is not open to callers without a client certificate; "
                    "anonymous callers may call only what bootstrap needs"
                )
            key = address_key(_peer(context))
            if not self._guard.anonymous_buckets.take(key):
                self._refuse(
                    LimitRefusedError(
                        f"{self.method}: too many calls from {key} without a client "
                        f"certificate (at most {limits.anonymous_rate_per_second:g} a second); "
                        "retry with backoff",
                        "rate_limited",
                    )
                )
            anonymous = True
        else:
            peer = PeerIdentity.from_pem(pems[0], context.peer())
            if self._authorizer is not None:
                self._authorizer.authorize(self.method, peer)
            call_context.run(CURRENT_PEER.set, peer)
            key = "cert:" + peer.fingerprint_sha256
            anonymous = False
        try:
            ticket = self._guard.admission.admit(key, self.method, anonymous=anonymous)
        except LimitRefusedError as refusal:
            self._refuse(refusal)
        watched = None
        if streaming:
            watched = self._guard.reaper.watch(
                context, self.method, limits.stream_limits(self.method)
            )
        return _Call(call_context, ticket, watched)

    def fail(
        self,
        err: Exception,
        context: grpc.ServicerContext,
        started: float,
        watched: WatchedStream | None = None,
    ) -> NoReturn:
        """Record and translate an exception; always raises (through context.abort)."""
        if watched is not None and watched.expired is not None:
            # the reaper cut the stream: the client already has DEADLINE_EXCEEDED
            self._done(grpc.StatusCode.DEADLINE_EXCEEDED, started)
            raise err
        if isinstance(err, HflError):
            self._done(err.code, started)
            # Limit refusals come in floods (that is what they stop): counted in the
            # metrics, logged only at debug level so they cannot flood the log too.
            _LOG.log(
                logging.DEBUG if isinstance(err, LimitRefusedError) else logging.INFO,
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

    @staticmethod
    def _touching(requests: Iterator[Any], watched: WatchedStream) -> Iterator[Any]:
        for request in requests:
            watched.touch()
            yield request

    def _arguments(self, request: Any, call: _Call) -> Any:
        if call.watched is not None and hasattr(request, "__next__"):
            return self._touching(request, call.watched)
        return request

    def unary_response(
        self,
        behaviour: Callable[[_Req, grpc.ServicerContext], _Resp],
        *,
        streaming: bool,
    ) -> Callable[[_Req, grpc.ServicerContext], _Resp]:
        def handle(request: _Req, context: grpc.ServicerContext) -> _Resp:
            started = time.perf_counter()
            call: _Call | None = None
            try:
                call = self.enter(context, streaming=streaming)
                response = call.context.run(behaviour, self._arguments(request, call), context)
            except Exception as err:
                self.fail(err, context, started, call.watched if call else None)
            finally:
                if call is not None:
                    call.end(self._guard.reaper)
            if call.watched is not None and call.watched.expired is not None:
                self._done(grpc.StatusCode.DEADLINE_EXCEEDED, started)
            else:
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
            call: _Call | None = None
            try:
                call = self.enter(context, streaming=True)
                responses = iter(
                    call.context.run(behaviour, self._arguments(request, call), context)
                )
                while True:
                    try:
                        response = call.context.run(next, responses)
                    except StopIteration:
                        break
                    yield response
                    if call.watched is not None:
                        call.watched.touch()  # the peer took the message
            except Exception as err:
                finished = True
                self.fail(err, context, started, call.watched if call else None)
            finally:
                if call is not None:
                    call.end(self._guard.reaper)
                if not finished:
                    if call is not None and call.watched is not None and call.watched.expired:
                        self._done(grpc.StatusCode.DEADLINE_EXCEEDED, started)
                    elif _context_active(context) or _context_code(context) is not None:
                        self.succeed(context, started)
                    else:
                        # the generator was closed early: the client went away
                        self._done(grpc.StatusCode.CANCELLED, started)
                    close = getattr(responses, "close", None)
                    if close is not None:
                        close()

        return handle


def _refuse_watch(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
    context.abort(grpc.StatusCode.UNIMPLEMENTED, WATCH_REFUSED_MESSAGE)
    yield from ()  # pragma: no cover - abort raises


class ServerInterceptor(grpc.ServerInterceptor):  # type: ignore[type-arg]
    def __init__(
        self,
        authorizer: Authorizer | None,
        metrics: GrpcServerMetrics,
        guard: Guard,
        allow_anonymous: bool = False,
    ) -> None:
        self._authorizer = authorizer
        self._metrics = metrics
        self._guard = guard
        self._allow_anonymous = allow_anonymous

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            return None  # unknown method: gRPC answers UNIMPLEMENTED
        if method == HEALTH_WATCH_METHOD:
            service, name = _split_method(method)
            self._metrics.finished(service, name, grpc.StatusCode.UNIMPLEMENTED, 0.0)
            return grpc.unary_stream_rpc_method_handler(
                _refuse_watch,
                handler.request_deserializer,
                handler.response_serializer,
            )
        return _wrap_handler(
            handler,
            _CallObserver(
                method, self._authorizer, self._metrics, self._guard, self._allow_anonymous
            ),
        )


def _wrap_handler(
    handler: grpc.RpcMethodHandler[Any, Any], observer: _CallObserver
) -> grpc.RpcMethodHandler[Any, Any]:
    deserializer = observer.wrap_deserializer(handler.request_deserializer)
    serializer = observer.wrap_serializer(handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            observer.unary_response(handler.unary_unary, streaming=False),
            deserializer,
            serializer,
        )
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            observer.stream_response(handler.unary_stream), deserializer, serializer
        )
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            observer.unary_response(handler.stream_unary, streaming=True),
            deserializer,
            serializer,
        )
    if handler.stream_stream is not None:
        return grpc.stream_stream_rpc_method_handler(
            observer.stream_response(handler.stream_stream), deserializer, serializer
        )
    raise ConfigError(f"method {observer.method} has a handler of no known kind")
