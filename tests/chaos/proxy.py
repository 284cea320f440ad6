"""A TCP proxy the test controls: forward, stall (hold bytes without forwarding), or cut
every connection after a number of bytes from the client."""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading


class ControlledProxy:
    """Listens on 127.0.0.1:<port> and forwards to `target`.

    `stall()`: from now on bytes are read but not forwarded (a peer that went silent);
    `cut_after(n)`: each connection is closed once `n` client bytes were forwarded
    (a connection cut mid-stream); `forward()`: back to normal.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._stalled = threading.Event()
        self._cut_after: int | None = None
        self._cut_more: int | None = None
        self._stop = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self.connections = 0
        threading.Thread(target=self._accept, name="chaos-proxy", daemon=True).start()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stall(self) -> None:
        self._stalled.set()

    def cut_after(self, client_bytes: int) -> None:
        self._cut_after = client_bytes

    def cut_after_more(self, client_bytes: int) -> None:
        """Cut each connection once `client_bytes` more client bytes were forwarded (counted
        from the connection's next bytes): cuts a call in the middle of an open channel."""
        self._cut_more = client_bytes

    def forward(self) -> None:
        self._stalled.clear()
        self._cut_after = None
        self._cut_more = None

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.close()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            with self._lock:
                self._sockets += [client, upstream]
                self.connections += 1
            threading.Thread(
                target=self._pump, args=(client, upstream), name="chaos-pump", daemon=True
            ).start()

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ, upstream)
        selector.register(upstream, selectors.EVENT_READ, client)
        sent_up = 0
        base: int | None = None  # where cut_after_more counts from, on this connection
        try:
            while not self._stop.is_set():
                for key, _ in selector.select(timeout=0.1):
                    source: socket.socket = key.fileobj  # type: ignore[assignment]
                    data = source.recv(65536)
                    if not data:
                        return
                    if self._stalled.is_set():
                        continue  # swallowed: the other side hears nothing more
                    if source is client:
                        limit = self._cut_after
                        more = self._cut_more
                        if more is None:
                            base = None
                        else:
                            base = sent_up if base is None else base
                            limit = base + more if limit is None else min(limit, base + more)
                        if limit is not None and sent_up + len(data) > limit:
                            key.data.sendall(data[: max(0, limit - sent_up)])
                            return  # cut mid-stream
                        sent_up += len(data)
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
