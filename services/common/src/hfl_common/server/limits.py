"""Bounded resources: who may hold how many workers, for how long.

gRPC's synchronous server runs each call on a worker thread of a fixed pool; a call that
waits for its peer (a stream with no message, a reader that stops reading) holds its
worker for as long as the peer likes, and calls beyond the pool queue behind it. Three
pieces keep any one peer from starving the others:

- `Admission` counts calls in flight per peer (certificate fingerprint, or IP address
  for anonymous callers) and in total, and refuses beyond `CallLimits` at once with
  RESOURCE_EXHAUSTED, before the handler runs. Ordinary calls never take the workers
  kept for control calls (health Check, GetStatus), so a full server still answers its
  probes and its operator.
- `TokenBuckets` rate-limit anonymous calls per IP address.
- `StreamReaper` cancels streaming calls idle or open for longer than their
  `StreamLimits` with DEADLINE_EXCEEDED; cancelling wakes the worker blocked on the
  peer, so the worker is freed at once.

A handler blocked in *server* code (a long-poll waiting for the next round) is bounded
by that handler; the reaper only covers waiting for the peer, which a peer controls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc

from hfl_common.errors import ResourceExhaustedError
from hfl_common.server.config import ServerConfig, StreamLimits

_LOG = logging.getLogger("hfl_common.server")

# Anonymous addresses remembered by the rate limiter (least recently seen dropped first).
MAX_TRACKED_ADDRESSES = 4096


class LimitRefusedError(ResourceExhaustedError):
    """A call refused by a resource limit; `reason` labels the refusal metric."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def address_key(peer: str) -> str:
    """The IP address of gRPC's peer string ("ipv4:127.0.0.1:5000" -> "ipv4:127.0.0.1")."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        return f"{kind}:{rest.rsplit(':', 1)[0]}"
    return peer or "unknown"


@dataclass
class Ticket:
    """One admitted call; `release` it exactly once when the call ends."""

    admission: Admission
    key: str
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.admission.release(self.key)


class Admission:
    """Counts calls in flight per peer key and in total; refuses beyond the limits."""

    def __init__(self, config: ServerConfig, on_change: Callable[[int], None]) -> None:
        self._config = config
        self._limits = config.limits
        self._lock = threading.Lock()
        self._per_key: dict[str, int] = {}
        self._total = 0
        self._on_change = on_change

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._total

    def admit(self, key: str, method: str, *, anonymous: bool) -> Ticket:
        control = method in self._limits.control_methods
        per_key = self._limits.per_anonymous_address if anonymous else self._limits.per_peer
        with self._lock:
            held = self._per_key.get(key, 0)
            if held >= per_key:
                who = f"address {key}" if anonymous else "this client certificate"
                raise LimitRefusedError(
                    f"{method}: {who} already has {held} calls in flight, the most allowed "
                    f"per {'address' if anonymous else 'peer'}; retry once one has finished",
                    "peer_limit",
                )
            capacity = self._config.max_workers if control else self._config.data_plane_capacity
            if self._total >= capacity:
                raise LimitRefusedError(
                    f"{method}: the {self._config.service} server is busy ({self._total} calls "
                    f"in flight, {self._config.max_workers} workers of which "
                    f"{self._limits.control_reserve} are kept for status and health); retry "
                    "with backoff",
                    "server_busy",
                )
            self._per_key[key] = held + 1
            self._total += 1
            total = self._total
        self._on_change(total)
        return Ticket(self, key)

    def release(self, key: str) -> None:
        with self._lock:
            held = self._per_key.get(key, 0) - 1
            if held <= 0:
                self._per_key.pop(key, None)
            else:
                self._per_key[key] = held
            self._total -= 1
            total = self._total
        self._on_change(total)


class TokenBuckets:
    """A token bucket per key: `rate` tokens a second, at most `burst` saved up."""

    def __init__(
        self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, key: str) -> bool:
        """Take a token for `key`; False when its bucket is empty."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self._burst, now))
            tokens = min(self._burst, tokens + (now - last) * self._rate)
            allowed = tokens >= 1.0
            if allowed:
                tokens -= 1.0
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > MAX_TRACKED_ADDRESSES:
                self._buckets.popitem(last=False)
            return allowed


@dataclass
class WatchedStream:
    """A streaming call under the reaper's eye; `touch` on every message."""

    context: grpc.ServicerContext
    method: str
    limits: StreamLimits
    started: float
    last: float
    expired: str | None = None  # "stream_idle" / "stream_max" once cancelled
    lock: threading.Lock = field(default_factory=threading.Lock)

    def touch(self) -> None:
        self.last = time.monotonic()


def _cancel(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """End a call from another thread with a status the client sees, waking its worker.

    grpcio's ServicerContext can only `cancel()` (the client then sees CANCELLED with no
    reason); its underlying call can be cancelled with a status and details, which is
    what the client should read. Fall back to the public cancel if that is not there.
    """
    call = getattr(getattr(context, "_rpc_event", None), "call", None)
    try:
        if call is not None:
            call.cancel(code.value[0], details)
            return
    except Exception:  # pragma: no cover - a grpcio without the private call object
        _LOG.debug("cancelling with a status failed; cancelling plainly", exc_info=True)
    context.cancel()  # type: ignore[no-untyped-call]


class StreamReaper:
    """One thread per server that cancels streams past their idle or whole-stream limit."""

    def __init__(self, service: str, on_expired: Callable[[WatchedStream], None]) -> None:
        self._service = service
        self._on_expired = on_expired
        self._lock = threading.Lock()
        self._streams: dict[int, WatchedStream] = {}
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None

    def watch(
        self, context: grpc.ServicerContext, method: str, limits: StreamLimits
    ) -> WatchedStream:
        now = time.monotonic()
        stream = WatchedStream(context, method, limits, now, now)
        with self._lock:
            self._streams[id(stream)] = stream
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name=f"hfl-{self._service}-stream-reaper", daemon=True
                )
                self._thread.start()
        self._wake.set()
        return stream

    def forget(self, stream: WatchedStream) -> None:
        with self._lock:
            self._streams.pop(id(stream), None)

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped.is_set():
            now = time.monotonic()
            next_check = 1.0
            with self._lock:
                streams = list(self._streams.values())
            for stream in streams:
                idle_left = stream.last + stream.limits.idle_seconds - now
                total_left = stream.started + stream.limits.max_seconds - now
                if idle_left <= 0 or total_left <= 0:
                    self._expire(stream, "stream_idle" if idle_left <= 0 else "stream_max")
                else:
                    next_check = min(next_check, idle_left, total_left)
            self._wake.wait(max(0.02, next_check))
            self._wake.clear()

    def _expire(self, stream: WatchedStream, reason: str) -> None:
        with stream.lock:
            if stream.expired is not None:
                return
            stream.expired = reason
        self.forget(stream)
        if reason == "stream_idle":
            details = (
                f"{stream.method}: no message for {stream.limits.idle_seconds:g} s; the server "
                "ends streams idle that long (send or read messages steadily, or reconnect)"
            )
        else:
            details = (
                f"{stream.method}: the stream lasted {stream.limits.max_seconds:g} s, the "
                "longest the server allows; reconnect and resume"
            )
        _LOG.info("%s", details)
        self._on_expired(stream)
        _cancel(stream.context, grpc.StatusCode.DEADLINE_EXCEEDED, details)
