"""A fake of the collector's two plugin-facing endpoints, for the plugin's unit tests.

``POST /v1/events`` and ``GET /v1/blocklist`` as contract 3 describes them, served by
``http.server`` from a thread on 127.0.0.1. Faults are injected here, never by patching the code
under test: the fake can be stopped and restarted on the same port (a dead collector), made slow,
made to answer a given status, to refuse batches above a size (413) or to reject given events.
"""

from __future__ import annotations

import gzip
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client dropping its connection mid-request is what these tests provoke


@dataclass
class ReceivedBatch:
    """One POST /v1/events as the fake saw it."""

    status: int
    ids: list[str]
    headers: dict[str, str]


@dataclass
class ReceivedPoll:
    """One GET /v1/blocklist as the fake saw it."""

    status: int
    headers: dict[str, str]
    query: dict[str, list[str]]


@dataclass
class FakeCollector:
    token: str = "ingest-token"
    port: int = 0
    # Fault injection, read on every request.
    delay: float = 0.0  # seconds before answering any request
    fail_status: int | None = None  # answer every POST with this status
    fail_next: int = 0  # answer the next N POSTs with fail_status_next
    fail_status_next: int = 500
    max_batch_events: int | None = None  # larger batches get 413
    too_large_ids: set[str] = field(default_factory=set)  # any batch holding one gets 413
    poison_ids: dict[str, int] = field(default_factory=dict)  # any batch holding one: that status
    reject: dict[str, str] = field(default_factory=dict)  # event id -> reason
    blocklist_status: int | None = None  # answer every GET with this status
    honour_wait: bool = True  # False: answer 304 at once, like a collector without long poll
    # What was received.
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    batches: list[ReceivedBatch] = field(default_factory=list)
    polls: list[ReceivedPoll] = field(default_factory=list)
    blocklist_version: int = 1
    blocklist_entries: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stopped = True

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeCollector:
        server = _QuietServer(("127.0.0.1", self.port), _handler_for(self))
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        with self.cond:
            self._stopped = False
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections: the port then refuses connections."""
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for conn in list(self._connections):
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers for tests ------------------------------------------------------------------

    def set_blocklist(self, entries: list[dict[str, Any]]) -> int:
        """Publish a new blocklist version; long polls waiting on the old one answer now."""
        with self.cond:
            self.blocklist_version += 1
            self.blocklist_entries = entries
            self.cond.notify_all()
            return self.blocklist_version

    def stored_ids(self) -> set[str]:
        with self.cond:
            return {event_id for _, event_id in self.stored}

    def accepted_batches(self) -> list[ReceivedBatch]:
        with self.cond:
            return [batch for batch in self.batches if batch.status == 200]

    def wait_stored(self, count: int, timeout: float = 10.0) -> bool:
        return wait_until(lambda: len(self.stored) >= count, timeout)


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


def _handler_for(fake: FakeCollector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            # Headers and body go in two writes: without this, Nagle's algorithm holds the body
            # until the client's delayed ACK, 40 ms per answer.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            fake._connections.add(self.connection)

        def finish(self) -> None:
            fake._connections.discard(self.connection)
            super().finish()

        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _answer(
            self, status: int, body: Any = None, headers: dict[str, str] | None = None
        ) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") == f"Bearer {fake.token}":
                return True
            self._answer(401, {"title": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
            return False

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if fake.delay:
                time.sleep(fake.delay)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if self.path != "/v1/events":
                self._answer(404, {"title": "not found"})
                return
            if headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            events = json.loads(body)
            ids = [str(event.get("id")) for event in events]
            status = self._status_for(events, ids)
            with fake.cond:
                fake.batches.append(ReceivedBatch(status, ids, headers))
            if status != 200:
                if status == 401:
                    self._answer(401, {"title": "unauthorized"}, {"WWW-Authenticate": "Bearer"})
                else:
                    self._answer(status, {"title": f"injected {status}"})
                return
            accepted = duplicates = 0
            rejected = []
            with fake.cond:
                for index, event in enumerate(events):
                    event_id = str(event.get("id"))
                    if event_id in fake.reject:
                        reason = fake.reject[event_id]
                        rejected.append({"index": index, "id": event_id, "reason": reason})
                        continue
                    key = (str(event.get("source")), event_id)
                    if key in fake.stored:
                        duplicates += 1
                    else:
                        fake.stored[key] = event
                        accepted += 1
                fake.cond.notify_all()
            self._answer(
                200, {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}
            )

        def _status_for(self, events: list[dict[str, Any]], ids: list[str]) -> int:
            if self.headers.get("Authorization") != f"Bearer {fake.token}":
                return 401
            with fake.cond:
                if fake.fail_next > 0:
                    fake.fail_next -= 1
                    return fake.fail_status_next
            if fake.fail_status is not None:
                return fake.fail_status
            if fake.max_batch_events is not None and len(events) > fake.max_batch_events:
                return 413
            if fake.too_large_ids.intersection(ids):
                return 413
            for event_id in ids:
                if event_id in fake.poison_ids:
                    return fake.poison_ids[event_id]
            return 200

        def do_GET(self) -> None:
            if fake.delay:
                time.sleep(fake.delay)
            parts = urlsplit(self.path)
            query = parse_qs(parts.query)
            headers = {k.lower(): v for k, v in self.headers.items()}
            if parts.path != "/v1/blocklist":
                self._answer(404, {"title": "not found"})
                return
            if not self._authorized():
                return
            if fake.blocklist_status is not None:
                with fake.cond:
                    fake.polls.append(ReceivedPoll(fake.blocklist_status, headers, query))
                self._answer(fake.blocklist_status, {"title": "injected"})
                return
            wait = min(float(query.get("wait", ["0"])[0]), 60.0)
            known = headers.get("if-none-match")
            deadline = time.monotonic() + (wait if fake.honour_wait else 0.0)
            with fake.cond:
                while (
                    known == f'"{fake.blocklist_version}"'
                    and not fake._stopped
                    and time.monotonic() < deadline
                ):
                    fake.cond.wait(deadline - time.monotonic())
                version = fake.blocklist_version
                entries = list(fake.blocklist_entries)
                status = 304 if known == f'"{version}"' else 200
                fake.polls.append(ReceivedPoll(status, headers, query))
            if fake._stopped:
                self.close_connection = True
                return
            etag = {"ETag": f'"{version}"'}
            if status == 304:
                self._answer(304, None, etag)
            else:
                self._answer(200, {"version": version, "entries": entries}, etag)

    return Handler


def events_in(batches: list[ReceivedBatch]) -> Iterator[str]:
    for batch in batches:
        yield from batch.ids
