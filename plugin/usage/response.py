"""`extract_usage`: normalized usage from a provider's response body, JSON or SSE.

Pure functions, run on Kong's request path inside the plugin server: no I/O, no PDK. The body
is decoded (`decode_body`), told JSON from SSE by its first bytes (the Content-Type only when
they do not tell), and read with `Doc` (JSON) or the SSE scan of `sse.py`.
"""

from __future__ import annotations

import logging
from typing import Final

from .. import metrics
from ..compression import BodyError, decode_body
from .counts import DECODE_ERRORS, DOC_DECODER, Reading, Usage
from .sse import BOM, PREFIXES, extract_sse, is_sse_type

logger = logging.getLogger("token_meter_plugin")

DEFAULT_MAX_BODY_SIZE: Final = 32 * 1024 * 1024

_WHITESPACE: Final = b" \t\r\n"


def extract_usage(
    body: bytes,
    *,
    content_type: str | None,
    content_encoding: str | None,
    max_size: int = DEFAULT_MAX_BODY_SIZE,
) -> Usage:
    """Read normalized usage from a provider's response body; never raises.

    Handles OpenAI Chat Completions, Completions, Embeddings and Responses, and Anthropic
    Messages, as JSON or as SSE (``text/event-stream``, or a body that starts like one), plain
    or compressed (`decode_body`). Bodies without usage (errors, streams without
    include_usage, anything undecodable or over ``max_size`` once decoded) give
    ``usage_missing=True`` with zero counts and the model when it is known.
    """
    try:
        return _extract(body, content_type, content_encoding, max_size)
    except Exception:
        # Boundary of the request path: whatever the body, the caller gets a result to record,
        # and a parser bug is seen (logged with its stack, counted), never passed off as a
        # response without usage.
        logger.exception("usage_parse_failed bytes=%s", len(body))
        metrics.count("usage_parse_errors")
        return Usage(usage_missing=True, streamed=is_sse_type(content_type))


def _extract(
    body: bytes, content_type: str | None, content_encoding: str | None, max_size: int
) -> Usage:
    try:
        data = decode_body(body, content_encoding, max_size=max_size)
    except BodyError:
        # Some upstreams label plain bodies as compressed; a body that starts like JSON or SSE
        # is taken as it is (compressed data never starts with these bytes).
        if len(body) <= max_size and _sniff(body) is not None:
            data = body
        else:
            return Usage(usage_missing=True, streamed=is_sse_type(content_type))
    sniffed = _sniff(data)
    is_sse = sniffed if sniffed is not None else is_sse_type(content_type)
    if is_sse:
        return extract_sse(data)
    return _extract_json(data)


def _sniff(data: bytes) -> bool | None:
    """True for an SSE body, False for JSON, None when the first bytes do not tell."""
    head = data[:64]
    if head.startswith(BOM):
        head = head[3:]
    head = head.lstrip(_WHITESPACE)
    if head[:1] in (b"{", b"["):
        return False
    if head.startswith(PREFIXES):
        return True
    return None


def _extract_json(data: bytes) -> Usage:
    reading = Reading()
    try:
        doc = DOC_DECODER.decode(data)
    except DECODE_ERRORS:
        return reading.result(streamed=False)
    reading.add_doc(doc)
    return reading.result(streamed=False)
