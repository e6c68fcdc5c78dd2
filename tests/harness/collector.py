"""A fake collector (contract 3, the plugin's side of it) for plugin-server tests and benches."""

from __future__ import annotations

import gzip
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VENV_BIN = Path(sys.executable).parent
REPO_ROOT = Path(__file__).resolve().parents[2]
TOKEN = "ingest-token-for-tests"
FAULTY_PLUGIN = [sys.executable, "-m", "tests.harness.faulty_plugin"]


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a plugin closing its long poll at exit is not an error here


class FakeCollector:
    """Just enough of the collector (contract 3) for the plugin: POST /v1/events records each
    batch; GET /v1/blocklist serves a settable list with ETag and long poll."""

    def __init__(self) -> None:
        self.batches: list[list[dict[str, Any]]] = []
        self.auth_headers: list[str | None] = []
        self.version = 1
        self.entries: list[dict[str, str]] = []
        self.changed = threading.Condition()
        # answer every POST /v1/events with this status and store nothing (a collector down)
        self.failing_status: int | None = None
        collector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None):
                self.send_response(status)
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                events = json.loads(raw)
                if collector.failing_status is not None:
                    self._send(collector.failing_status)
                    return
                with collector.changed:
                    collector.batches.append(events)
                    collector.auth_headers.append(self.headers.get("Authorization"))
                    collector.changed.notify_all()
                answer = {"accepted": len(events), "duplicates": 0, "rejected": []}
                self._send(200, json.dumps(answer).encode(), {"Content-Type": "application/json"})

            def do_GET(self) -> None:
                if not self.path.startswith("/v1/blocklist"):
                    self._send(404)
                    return
                wait = 0.0
                if "wait=" in self.path:
                    wait = float(self.path.split("wait=", 1)[1].split("&", 1)[0])
                etag = self.headers.get("If-None-Match")
                deadline = time.monotonic() + min(wait, 2.0)
                with collector.changed:
                    while etag == f'"{collector.version}"' and time.monotonic() < deadline:
                        collector.changed.wait(deadline - time.monotonic())
                    if etag == f'"{collector.version}"':
                        self._send(304, headers={"ETag": etag})
                        return
                    body = {"version": collector.version, "entries": list(collector.entries)}
                    version = collector.version
                self._send(
                    200,
                    json.dumps(body).encode(),
                    {"Content-Type": "application/json", "ETag": f'"{version}"'},
                )

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def block(self, consumer: str, reason: str) -> None:
        with self.changed:
            self.entries.append({"consumer": consumer, "reason": reason})
            self.version += 1
            self.changed.notify_all()

    def events(self) -> list[dict[str, Any]]:
        with self.changed:
            return [event for batch in self.batches for event in batch]

    def wait_for_events(self, count: int, timeout: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while sum(map(len, self.batches)) < count and time.monotonic() < deadline:
                self.changed.wait(deadline - time.monotonic())
        return self.events()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
