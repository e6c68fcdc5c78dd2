"""The HTTP side of talking to the collector: one keep-alive connection, and backoff."""

from __future__ import annotations

import contextlib
import http.client
import importlib.metadata
import random
import socket
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

try:
    _VERSION = importlib.metadata.version("kong-token-meter")
except importlib.metadata.PackageNotFoundError:  # running from a source tree
    _VERSION = "0"
USER_AGENT: Final = f"token-meter-plugin/{_VERSION}"


@dataclass(frozen=True, slots=True)
class CollectorResponse:
    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes


class CollectorClient:
    """One keep-alive connection to the collector, used by one thread at a time.

    ``token`` may be replaced at any time (a config push); the next request uses it. ``abort``
    may be called from another thread to unblock a request in progress. An ``https://``
    collector is verified (certificate and host name) against ``ca_bundle``, a PEM file, or the
    system's certificate authorities when it is None.
    """

    def __init__(
        self, collector_url: str, collector_token: str, ca_bundle: str | None = None
    ) -> None:
        parts = urlsplit(collector_url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._base_path = parts.path.rstrip("/")
        self.token = collector_token
        self._conn: http.client.HTTPConnection | None = None
        self._aborted = False
        self._ca_bundle = ca_bundle
        self._ssl_context: ssl.SSLContext | None = None

    def trust(self, ca_bundle: str | None) -> None:
        """Verify the collector against ``ca_bundle`` from the next connection on (a config
        push); the kept-alive connection, verified against the previous one, is closed."""
        if ca_bundle != self._ca_bundle:
            self._ca_bundle = ca_bundle
            self._ssl_context = None
            self.close()

    def _tls(self) -> ssl.SSLContext:
        """Made on first use, so a missing or unreadable bundle fails each request (retried,
        logged) instead of the plugin."""
        if self._ssl_context is None:
            try:
                self._ssl_context = ssl.create_default_context(cafile=self._ca_bundle)
            except OSError as exc:  # ssl.SSLError is one: a file without a PEM certificate
                reason = exc.strerror or str(exc)
                raise OSError(f"collector_ca_bundle {self._ca_bundle}: {reason}") from exc
        return self._ssl_context

    def _connection(self, timeout: float) -> tuple[http.client.HTTPConnection, bool]:
        conn = self._conn
        if conn is not None:
            if conn.sock is not None:
                conn.sock.settimeout(timeout)
            conn.timeout = timeout
            return conn, True
        if self._https:
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=timeout, context=self._tls()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
        self._conn = conn
        return conn, False

    def request(
        self,
        method: str,
        path: str,
        *,
        timeout: float,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> CollectorResponse:
        """Send one request; raises OSError or http.client.HTTPException when it fails."""
        all_headers = {
            "Authorization": f"Bearer {self.token}",
            "User-Agent": USER_AGENT,
            **(headers or {}),
        }
        for attempt in (1, 2):
            if self._aborted:
                raise ConnectionAbortedError("collector client closed")
            conn, reused = self._connection(timeout)
            try:
                conn.request(method, self._base_path + path, body=body, headers=all_headers)
                response = conn.getresponse()
                data = response.read()
            except ConnectionError:  # http.client.RemoteDisconnected is one
                self.close()
                # A kept-alive connection the server closed while idle fails on first use; one
                # retry on a fresh one is safe (the collector dedupes, GET is idempotent).
                if reused and attempt == 1:
                    continue
                raise
            except (OSError, http.client.HTTPException):
                self.close()
                raise
            if response.will_close:
                self.close()
            return CollectorResponse(
                response.status, {k.lower(): v for k, v in response.getheaders()}, data
            )
        raise AssertionError("unreachable")  # pragma: no cover

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def abort(self) -> None:
        """Break a request in progress in another thread (it fails with OSError), for good."""
        self._aborted = True
        conn = self._conn
        sock = conn.sock if conn is not None else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class Backoff:
    """Capped exponential backoff with full jitter (AWS architecture blog's 'Full Jitter')."""

    def __init__(
        self, initial: float, maximum: float, rng: Callable[[float, float], float] = random.uniform
    ) -> None:
        self.initial = initial
        self.maximum = maximum
        self.attempts = 0
        self._rng = rng

    def next_delay(self) -> float:
        cap = min(self.maximum, self.initial * 2 ** min(self.attempts, 62))
        self.attempts += 1
        return self._rng(0.0, cap)

    def reset(self) -> None:
        self.attempts = 0
