"""Building usage events, and the requests that cause them, for tests and benchmarks."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any


def this_hour() -> str:
    """A time inside the current UTC hour (hence month), as RFC 3339."""
    now = datetime.now(UTC).replace(minute=0, second=1, microsecond=0)
    return now.isoformat().replace("+00:00", "Z")


def usage_event(
    event_id: str,
    consumer: str = "alice",
    *,
    source: str = "kong://dp-test/token-meter",
    time: str | None = None,
    **data: Any,
) -> dict[str, Any]:
    """A valid event; `data` overrides or adds data fields. total_tokens follows the others
    unless given."""
    body: dict[str, Any] = {
        "model": "gpt-4o",
        "provider": "openai",
        "input_tokens": 100,
        "output_tokens": 20,
        "status": 200,
        "streamed": False,
        "latency_ms": 123.4,
    }
    body.update(data)
    if "total_tokens" not in body:
        body["total_tokens"] = body["input_tokens"] + body["output_tokens"]
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": "ai.usage",
        "subject": consumer,
        "time": time or this_hour(),
        "data": body,
    }


def chat_request_body(size: int, *, stream: bool = True) -> bytes:
    """An OpenAI chat request of about `size` bytes: a long conversation."""
    turn = {"role": "user", "content": "Tell me more about the history of the printing press."}
    messages = [turn] * max(1, size // 80)
    return json.dumps({"model": "gpt-4o-mini", "stream": stream, "messages": messages}).encode()
