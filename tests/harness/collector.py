"""A fake of the collector's two plugin-facing endpoints, for every test and benchmark.

``POST /v1/events`` and ``GET /v1/blocklist`` as contract 3 describes them, served by
``http.server`` from a thread on 127.0.0.1. Faults are injected here, never by patching the code
under test: the fake can be stopped and restarted on the same port (a dead collector), made slow,
made to answer given statuses, to refuse batches above a size (413) or to reject given events.
Use it as ``with FakeCollector() as fake:`` or ``fake = FakeCollector().start()`` ... ``stop()``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

TOKEN = "ingest-token-for-tests"
MAX_WAIT = 60.0  # the longest long poll the fake holds, whatever the client asks

Answer = tuple[int, Any, dict[str, str]]  # status, JSON body (None: no body), extra headers


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client dropping its connection mid-request is what these tests provoke


@dataclass
class ReceivedBatch:
    """One POST /v1/events as the fake saw it (header names in lower case)."""

    status: int
    headers: dict[str, str]
    events: list[dict[str, Any]]

    @property
    def ids(self) -> list[str]:
        return [str(event.get("id")) for event in self.events]


@dataclass
class ReceivedPoll:
    """One GET /v1/blocklist as the fake saw it (header names in lower case)."""

    status: int
    headers: dict[str, str]
    query: dict[str, list[str]]


@dataclass
class FakeCollector:
    token: str = TOKEN
    port: int = 0  # 0 until started; then kept, so a restart listens on the same port
    # Faults, read on every request.
    delay: float = 0.0  # seconds before answering any request
    fail_next: list[int] = field(default_factory=list)  # answers of the next POSTs, one each
    fail_status: int | None = None  # then answer every POST with this status
    max_batch_events: int | None = None  # larger batches get 413
    too_large_ids: set[str] = field(default_factory=set)  # any batch holding one gets 413
    poison_ids: dict[str, int] = field(default_factory=dict)  # any batch holding one: that status
    reject: dict[str, str] = field(default_factory=dict)  # event id -> reason, in a 200 answer
    blocklist_status: int | None = None  # answer every GET with this status
    honour_wait: bool = True  # False: answer 304 at once, like a collector without long poll
    blocklist_version: int = 1
    blocklist_entries: list[dict[str, Any]] = field(default_factory=list)
    # What was received: every batch whatever its answer, every poll, and what a collector
    # keeps, deduplicated by (source, id) as contract 3 says.
    batches: list[ReceivedBatch] = field(default_factory=list)
    polls: list[ReceivedPoll] = field(default_factory=list)
    stored: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.cond = threading.Condition()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._stopped = True

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeCollector:
        server = _QuietServer(("127.0.0.1", self.port), _handler_for(self))
        self.port = server.server_address[1]
        self._server = server
        with self.cond:
            self._stopped = False
        self._thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop listening and drop open connections (parked long polls included): the port then
        refuses connections until ``start``."""
        with self.cond:
            self._stopped = True
            self.cond.notify_all()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        for conn in list(self._connections):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if self._thread is not None:
            self._thread.join(5)

    def __enter__(self) -> FakeCollector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- for tests ------------------------------------------------------------------------------

    def set_blocklist(self, entries: list[dict[str, Any]]) -> int:
        """Publish a new blocklist version; long polls waiting on the old one answer now."""
        with self.cond:
            self.blocklist_version += 1
            self.blocklist_entries = entries
            self.cond.notify_all()
            return self.blocklist_version

    def block(self, consumer: str, reason: str) -> int:
        """Publish the current list plus one entry."""
        entry = {"consumer": consumer, "reason": reason}
        with self.cond:
            return self.set_blocklist([*self.blocklist_entries, entry])

    def accepted_batches(self) -> list[ReceivedBatch]:
        with self.cond:
            return [batch for batch in self.batches if batch.status == 200]

    def events(self) -> list[dict[str, Any]]:
        """Every event of the batches answered 200, in arrival order, repeats included."""
        return [event for batch in self.accepted_batches() for event in batch.events]

    def stored_ids(self) -> set[str]:
        with self.cond:
            return {event_id for _, event_id in self.stored}

    def wait_for_events(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        """``events()`` once it holds ``count`` (or when ``timeout`` passes)."""
        wait_until(lambda: len(self.events()) >= count, timeout)
        return self.events()

    def wait_stored(self, count: int, timeout: float = 10.0) -> bool:
        """Whether ``count`` distinct events are stored within ``timeout``."""
        return wait_until(lambda: len(self.stored) >= count, timeout)

    # -- the two endpoints (the handler below only speaks HTTP) --------------------------------

    def _take_batch(self, headers: dict[str, str], events: list[dict[str, Any]]) -> Answer:
        batch = ReceivedBatch(200, headers, events)
        with self.cond:
            batch.status = self._batch_status(batch)
            self.batches.append(batch)
            self.cond.notify_all()
            if batch.status != 200:
                return batch.status, {"title": f"injected {batch.status}"}, {}
            accepted = duplicates = 0
            rejected = []
            for index, (event_id, event) in enumerate(zip(batch.ids, events, strict=True)):
                key, reason = (str(event.get("source")), event_id), self.reject.get(event_id)
                if reason is not None:
                    rejected.append({"index": index, "id": event_id, "reason": reason})
                elif key in self.stored:
                    duplicates += 1
                else:
                    self.stored[key] = event
                    accepted += 1
        return 200, {"accepted": accepted, "duplicates": duplicates, "rejected": rejected}, {}

    def _batch_status(self, batch: ReceivedBatch) -> int:
        if batch.headers.get("authorization") != f"Bearer {self.token}":
            return 401
        if self.fail_next:
            return self.fail_next.pop(0)
        if self.fail_status is not None:
            return self.fail_status
        too_many = self.max_batch_events is not None and len(batch.ids) > self.max_batch_events
        if too_many or self.too_large_ids.intersection(batch.ids):
            return 413
        return next((self.poison_ids[i] for i in batch.ids if i in self.poison_ids), 200)

    def _poll(self, headers: dict[str, str], query: dict[str, list[str]]) -> Answer | None:
        """The answer to one poll, after the long wait; None if the fake stopped meanwhile."""
        if headers.get("authorization") != f"Bearer {self.token}":
            return 401, None, {}
        if self.blocklist_status is not None:
            with self.cond:
                self.polls.append(ReceivedPoll(self.blocklist_status, headers, query))
            return self.blocklist_status, {"title": "injected"}, {}
        wait = min(float(query.get("wait", ["0"])[0]), MAX_WAIT) if self.honour_wait else 0
        known = headers.get("if-none-match")
        with self.cond:
            self.cond.wait_for(
                lambda: known != f'"{self.blocklist_version}"' or self._stopped, timeout=wait
            )
            if self._stopped:
                return None
            version, entries = self.blocklist_version, list(self.blocklist_entries)
            status = 304 if known == f'"{version}"' else 200
            self.polls.append(ReceivedPoll(status, headers, query))
        body = None if status == 304 else {"version": version, "entries": entries}
        return status, body, {"ETag": f'"{version}"'}


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

        def do_GET(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if fake.delay:
                time.sleep(fake.delay)
            parts = urlsplit(self.path)
            headers = {k.lower(): v for k, v in self.headers.items()}
            answer: Answer | None = 404, {"title": "not found"}, {}
            if (self.command, parts.path) == ("POST", "/v1/events"):
                if headers.get("content-encoding") == "gzip":
                    body = gzip.decompress(body)
                answer = fake._take_batch(headers, json.loads(body))
            elif (self.command, parts.path) == ("GET", "/v1/blocklist"):
                answer = fake._poll(headers, parse_qs(parts.query))
            if answer is None:
                self.close_connection = True
            else:
                self._answer(*answer)

        do_POST = do_GET

        def _answer(self, status: int, body: Any, headers: dict[str, str]) -> None:
            if status == 401:
                body, headers = {"title": "unauthorized"}, {"WWW-Authenticate": "Bearer"}
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    return Handler
