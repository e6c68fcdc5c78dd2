"""What Kong hands the plugin, made fit for a usage event: pure functions, no PDK.

The phase handlers (`handler.py`) make the PDK calls and pass their raw answers here.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Mapping
from typing import Any, Final

ANONYMOUS: Final = "anonymous"
SERVICE_NAME_TTL_S: Final = 60.0

_GZIP_MAGIC: Final = b"\x1f\x8b"
_PLAIN_STARTS: Final = frozenset(b"{[ \t\r\n:" + b"deir")  # JSON, SSE field names, a BOM's tail
_UTF8_BOM: Final = b"\xef\xbb\xbf"
_MAX_SERVICE_NAMES: Final = 10_000


def clean_text(value: Any) -> str | None:
    """A string from Kong, fit for JSON: a byte that was not UTF-8 (kept by the RPC layer as a
    lone surrogate, kong-pdk defect 4) becomes U+FFFD. Anything that is not a non-empty string
    is None."""
    if not isinstance(value, str) or not value:
        return None
    if value.isascii():
        return value
    return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def consumer_subject(consumer: Mapping[str, Any] | None, identifier: str) -> str:
    """The customer a request belongs to: the consumer's configured field, else its id."""
    if not consumer:
        return ANONYMOUS
    return clean_text(consumer.get(identifier)) or clean_text(consumer.get("id")) or ANONYMOUS


def header_value(headers: Any, name: str) -> str | None:
    """The first value of a header in what `kong.request.get_headers` answers (a multimap:
    names lower-cased, each value a list of strings)."""
    if not isinstance(headers, Mapping):
        return None
    value = headers.get(name)
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, str) else None


def content_length(headers: Any) -> int | None:
    """The request body's declared size, or None when unknown (chunked, HTTP/2, absent, bad)."""
    value = header_value(headers, "content-length")
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 20 else None


def is_json_content_type(content_type: Any) -> bool:
    if not isinstance(content_type, str):
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or media.endswith("+json")


def sniff_content_encoding(body: bytes) -> str | None:
    """The Content-Encoding a response body was sent with, told from its first bytes."""
    if not body:
        return None
    if body.startswith(_GZIP_MAGIC):
        return "gzip"
    first = body[0]
    # zlib: CM=8 in the low nibble and the 16-bit header a multiple of 31 (RFC 1950)
    if first & 0x0F == 8 and len(body) > 1 and (first << 8 | body[1]) % 31 == 0:
        return "deflate"
    if first in _PLAIN_STARTS or body.startswith(_UTF8_BOM):
        return None
    # Brotli has no magic number. A wrong guess costs nothing: extract_usage falls back to the
    # raw bytes when they look like JSON or SSE, and records usage_missing otherwise.
    return "br"


def new_event_id(now_ns: int | None = None) -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so the collector's indexes stay compact."""
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms & (1 << 48) - 1) << 80 | 0x7 << 76 | (rand >> 62 & 0xFFF) << 64
    value |= 0b10 << 62 | rand & (1 << 62) - 1
    return str(uuid.UUID(int=value))


def as_bytes(value: Any) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return b""


def last_status(upstream_status: Any) -> int | None:
    """Kong's `upstream_status` ("502, 200" after a retry) as the final status code."""
    if isinstance(upstream_status, int):
        return upstream_status
    if isinstance(upstream_status, str) and upstream_status.strip():
        tail = upstream_status.replace(":", ",").split(",")[-1].strip()
        if tail.isdigit():
            return int(tail)
    return None


def entity_ref(entity: Any, key: str) -> str | None:
    """The id of a foreign entity a Kong entity points to (`route.service.id`)."""
    if isinstance(entity, Mapping):
        ref = entity.get(key)
        if isinstance(ref, Mapping):
            return clean_text(ref.get("id"))
    return None


class ServiceNames:
    """Service id → name, process-wide, each entry trusted for SERVICE_NAME_TTL_S."""

    def __init__(self, ttl: float = SERVICE_NAME_TTL_S) -> None:
        self._ttl = ttl
        self._names: dict[str, tuple[str | None, float]] = {}

    def get(self, service_id: str) -> tuple[bool, str | None]:
        entry = self._names.get(service_id)
        if entry is None or entry[1] < time.monotonic():
            return False, None
        return True, entry[0]

    def put(self, service_id: str, name: str | None) -> None:
        if len(self._names) > _MAX_SERVICE_NAMES:  # bounded: a gateway has far fewer services
            self._names.clear()
        self._names[service_id] = (name, time.monotonic() + self._ttl)
