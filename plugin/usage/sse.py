"""Usage from a streamed (``text/event-stream``) response body, found without decoding every event.

An SSE body is not decoded chunk by chunk: every provider puts its final usage in the last
event that has a ``"usage"`` key (OpenAI's include_usage chunk, Responses' terminal
``response.*`` event, Anthropic's cumulative ``message_delta``), and Anthropic's input counts
in the first one (``message_start``). So at most three lines are decoded: those two, found with
``bytes.find``/``rfind`` (inside a JSON string a quote is escaped, so ``"usage"`` only occurs as
a real key), and the first data line for the model. Usage events between the first and the last
are not read: no provider puts counts there that the last one does not repeat. When a usage
line does not decode (an event split over several ``data:`` lines, CR-only line ends), the body
is parsed event by event as the SSE specification says.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from .counts import DECODE_ERRORS, DOC_DECODER, Doc, Reading, Usage

BOM: Final = b"\xef\xbb\xbf"
PREFIXES: Final = (b"data:", b"event:", b"id:", b"retry:", b":")
_USAGE_KEY: Final = b'"usage"'


def is_sse_type(content_type: str | None) -> bool:
    if not isinstance(content_type, str):
        return False
    return content_type.split(";", 1)[0].strip().lower() == "text/event-stream"


def extract_sse(data: bytes) -> Usage:
    if data.startswith(BOM):
        data = data[3:]
    # At most three lines are decoded, in body order: the first data line (the model, even in
    # a stream without usage), and the first and last lines with a "usage" key (Anthropic's
    # message_start and final message_delta; for the others the last one is all that counts).
    first_usage = data.find(_USAGE_KEY)
    spans = {
        span
        for span in (
            _first_data_line(data),
            _line_around(data, first_usage) if first_usage >= 0 else None,
            _line_around(data, data.rfind(_USAGE_KEY)) if first_usage >= 0 else None,
        )
        if span is not None
    }
    reading = Reading()
    for start, end in sorted(spans):
        payload = _data_payload(data, start, end)
        doc = _decode_event(payload) if payload is not None else None
        if doc is not None:
            reading.add_doc(doc)
        elif data.find(_USAGE_KEY, start, end) >= 0 or data.find(b"\r", start, end - 1) >= 0:
            # Usage we cannot read line by line (an event over several data lines), or lines
            # that end in a lone CR: parse every event instead.
            return _extract_sse_events(data)
    return reading.result(streamed=True)


def _first_data_line(data: bytes) -> tuple[int, int] | None:
    if data.startswith(b"data:"):
        start = 0
    else:
        at = data.find(b"\ndata:")
        if at < 0:
            return None
        start = at + 1
    end = data.find(b"\n", start)
    return start, len(data) if end < 0 else end


def _line_around(data: bytes, at: int) -> tuple[int, int]:
    start = data.rfind(b"\n", 0, at) + 1
    end = data.find(b"\n", at)
    return start, len(data) if end < 0 else end


def _data_payload(data: bytes, start: int, end: int) -> memoryview | None:
    """The value of a ``data:`` line (one leading space dropped, CR stripped), else None."""
    if not data.startswith(b"data:", start, end):
        return None
    start += 5
    if start < end and data[start] == 0x20:
        start += 1
    if end > start and data[end - 1] == 0x0D:
        end -= 1
    return memoryview(data)[start:end]


def _decode_event(payload: memoryview | bytes) -> Doc | None:
    try:
        return DOC_DECODER.decode(payload)
    except DECODE_ERRORS:
        return None


def _extract_sse_events(data: bytes) -> Usage:
    """Slow, exact path: every event assembled as the SSE specification says."""
    reading = Reading()
    got_first = False
    for payload in _iter_sse_data(data):
        if not got_first or _USAGE_KEY in payload:
            doc = _decode_event(payload)
            if doc is not None:
                got_first = True
                reading.add_doc(doc)
    return reading.result(streamed=True)


def _iter_sse_data(data: bytes) -> Iterator[bytes]:
    """Yield each event's data (``data:`` lines joined by LF), per the HTML SSE parser."""
    lines: list[bytes] = []
    for line in data.splitlines():
        if not line:
            if lines:
                yield b"\n".join(lines)
                lines = []
            continue
        if line.startswith(b"data:"):
            value = line[5:]
            lines.append(value[1:] if value.startswith(b" ") else value)
    if lines:
        yield b"\n".join(lines)
