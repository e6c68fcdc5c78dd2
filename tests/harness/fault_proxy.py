"""A TCP proxy on 127.0.0.1 that a test switches between behaving and failing, to put a network
fault between two real processes (the plugin and the collector, the collector and Stripe).

    with FaultProxy(upstream_port) as proxy:        # forwards, on a port of its own
        url = proxy.url
        proxy.set_mode("refuse")                     # the port is closed: connection refused
        proxy.set_mode("blackhole")                  # accepts, reads, never answers
        proxy.set_mode("lose_answers")               # forwards requests, drops every answer
        proxy.set_mode("forward")                    # the same port again

Modes:

- `forward`: bytes both ways, unchanged.
- `refuse`: the listening socket is closed (a connect gets ECONNREFUSED) and every open
  connection is closed too; `forward` listens again on the same port.
- `blackhole`: connections are accepted and whatever either side sends is discarded, on new and
  open connections alike, so a client only gets out through its own timeout.
- `lose_answers`: what the client sends still reaches the upstream, which does the work; its
  answer is discarded, so the client times out on a request that succeeded.

`accepted` counts the connections taken, `switches` lists the modes set, in order, and
`discarded` counts the bytes a failing mode swallowed: figures for a test's report.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from typing import Literal, Self

Mode = Literal["forward", "refuse", "blackhole", "lose_answers"]
_CHUNK = 65536


class FaultProxy:
    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.mode: Mode = "forward"
        self.port = 0
        self.accepted = 0
        self.discarded = 0
        self.switches: list[Mode] = []
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._open: set[socket.socket] = set()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        self._listen()
        return self

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._stop_listening()
        self._close_open()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.close()

    def set_mode(self, mode: Mode) -> None:
        """Switch now; open connections follow the new mode with their next bytes."""
        with self._lock:
            previous, self.mode = self.mode, mode
            self.switches.append(mode)
        if mode == "refuse":
            self._stop_listening()
            self._close_open()
        elif previous == "refuse":
            self._listen()

    # -- internals ---------------------------------------------------------------------------

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(128)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept, args=(listener,), name="fault-proxy-accept", daemon=True
        )
        self._acceptor.start()

    def _stop_listening(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone may not on Linux.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(5)
            self._acceptor = None

    def _close_open(self) -> None:
        with self._lock:
            sockets, self._open = self._open, set()
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # the listener was closed
            with self._lock:
                if self._closed or self.mode == "refuse":
                    client.close()
                    continue
                self.accepted += 1
                mode = self.mode
            upstream: socket.socket | None = None
            if mode != "blackhole":
                try:
                    upstream = socket.create_connection(self.upstream, timeout=5)
                    upstream.settimeout(None)
                except OSError:
                    client.close()  # what a client sees of a proxy whose upstream is down
                    continue
            with self._lock:
                self._open.add(client)
                if upstream is not None:
                    self._open.add(upstream)
            self._pump(client, upstream, toward_upstream=True)
            if upstream is not None:
                self._pump(upstream, client, toward_upstream=False)

    def _pump(
        self, source: socket.socket, sink: socket.socket | None, *, toward_upstream: bool
    ) -> None:
        def run() -> None:
            try:
                while data := source.recv(_CHUNK):
                    with self._lock:
                        mode = self.mode
                    passes = mode == "forward" or (mode == "lose_answers" and toward_upstream)
                    if sink is None or not passes:
                        with self._lock:
                            self.discarded += len(data)
                        continue
                    sink.sendall(data)
            except OSError:
                pass
            finally:
                for sock in (source, sink):
                    if sock is None:
                        continue
                    with self._lock:
                        self._open.discard(sock)
                    with contextlib.suppress(OSError):
                        sock.shutdown(socket.SHUT_RDWR)
                    sock.close()

        threading.Thread(target=run, name="fault-proxy-pump", daemon=True).start()
