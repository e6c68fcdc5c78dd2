"""Usage events as CloudEvents 1.0 (contract 2, ``schema/usage-event.schema.json``).

Pure functions: the phase handler gathers the request's facts and passes them here. Only
counts and identifiers go into an event, never bodies.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Any, Final

from .usage import MAX_TOKENS, Usage

__all__ = ["EVENT_TYPE", "SPECVERSION", "build_usage_event"]

SPECVERSION: Final = "1.0"
EVENT_TYPE: Final = "ai.usage"
DATA_CONTENT_TYPE: Final = "application/json"

# Bounds from the schema.
_MAX_ID: Final = 256
_MAX_SOURCE: Final = 512
_MAX_SUBJECT: Final = 256
_MAX_OPTIONAL_STRING: Final = 256
_MAX_LATENCY_MS: Final = 86_400_000

_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:[Zz]|[+-]\d{2}:\d{2})", re.ASCII
)


def build_usage_event(
    *,
    usage: Usage,
    request_id: str,
    source: str,
    subject: str,
    time: datetime | str | float,
    consumer_id: str | None = None,
    consumer_username: str | None = None,
    consumer_custom_id: str | None = None,
    route_id: str | None = None,
    route_name: str | None = None,
    service_id: str | None = None,
    service_name: str | None = None,
    status: int | None = None,
    latency_ms: float | None = None,
) -> dict[str, Any]:
    """Build the usage event of one request, valid against the event schema.

    Raises ValueError for what the collector would reject and only the caller can fix: an
    empty or over-long ``request_id``/``source``/``subject``, a ``time`` without a UTC offset,
    or a `Usage` whose counts are inconsistent. ``time`` is an aware datetime, POSIX seconds,
    or RFC 3339 text. Descriptive fields are made to fit instead:
    names and model longer than 256 characters are cut to 256, and a ``status`` outside
    100..599 or a ``latency_ms`` that is negative, not finite or over a day becomes null
    (unknown), so a glitch in them never costs the event.
    """
    _require_string("request_id", request_id, _MAX_ID)
    _require_string("source", source, _MAX_SOURCE)
    _require_string("subject", subject, _MAX_SUBJECT)
    _check_usage(usage)
    data: dict[str, Any] = {
        "consumer_id": _fit(consumer_id),
        "consumer_username": _fit(consumer_username),
        "consumer_custom_id": _fit(consumer_custom_id),
        "route_id": _fit(route_id),
        "route_name": _fit(route_name),
        "service_id": _fit(service_id),
        "service_name": _fit(service_name),
        "provider": _fit(usage.provider),
        "model": _fit(usage.model),
        "status": status if _is_status(status) else None,
        "streamed": usage.streamed,
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "cache_write_input_tokens": usage.cache_write_input_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
        "total_tokens": usage.total_tokens,
        "latency_ms": _latency(latency_ms),
        "usage_missing": usage.usage_missing,
    }
    return {
        "specversion": SPECVERSION,
        "id": request_id,
        "source": source,
        "type": EVENT_TYPE,
        "subject": subject,
        "time": format_time(time),
        "datacontenttype": DATA_CONTENT_TYPE,
        "data": data,
    }


def format_time(value: datetime | str | float) -> str:
    """RFC 3339 text of ``value``, in UTC as ``Z`` unless it is already RFC 3339 text.

    Takes an aware datetime, POSIX seconds (what ``ngx.req.start_time()`` gives), or an
    RFC 3339 string, which is checked and passed on as it is.
    """
    if isinstance(value, bool):
        raise ValueError("time must be a datetime, POSIX seconds or RFC 3339 text")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ValueError(f"time is not a finite POSIX timestamp: {value!r}")
        value = datetime.fromtimestamp(value, UTC)
    if isinstance(value, str):
        if _RFC3339.fullmatch(value) is None:
            raise ValueError(f"time is not RFC 3339 with a UTC offset: {value!r}")
        try:
            datetime.fromisoformat(value.upper())  # rejects month 13, hour 25 and the like
        except ValueError:
            raise ValueError(f"time is not a valid date-time: {value!r}") from None
        return value
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("time must be timezone-aware")
    text = value.astimezone(UTC).isoformat(timespec="microseconds")
    return text.removesuffix("+00:00") + "Z"


def _require_string(name: str, value: object, limit: int) -> None:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{name} must be a non-empty string")
    if len(value) > limit:
        raise ValueError(f"{name} is longer than {limit} characters")


def _fit(value: str | None) -> str | None:
    if value is None:
        return None
    # U+0000 (a model name from an upstream's body may hold one) is what the collector's
    # database cannot store: it would refuse the event, and its usage would be lost.
    return value[:_MAX_OPTIONAL_STRING].replace("\x00", "\ufffd")


def _is_status(value: object) -> bool:
    return type(value) is int and 100 <= value <= 599


def _latency(value: float | None) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    number = float(value)
    if not math.isfinite(number) or number < 0 or number > _MAX_LATENCY_MS:
        return None
    return number


def _check_usage(usage: Usage) -> None:
    counts = (
        usage.input_tokens,
        usage.output_tokens,
        usage.cached_input_tokens,
        usage.cache_write_input_tokens,
        usage.reasoning_tokens,
        usage.total_tokens,
    )
    if not all(type(n) is int and 0 <= n <= MAX_TOKENS for n in counts):
        raise ValueError(f"token counts must be integers in 0..{MAX_TOKENS}: {usage!r}")
    if (
        usage.cached_input_tokens + usage.cache_write_input_tokens > usage.input_tokens
        or usage.reasoning_tokens > usage.output_tokens
        or usage.total_tokens != usage.input_tokens + usage.output_tokens
    ):
        raise ValueError(f"inconsistent token counts: {usage!r}")
    if usage.usage_missing and any(counts):
        raise ValueError(f"usage_missing with non-zero counts: {usage!r}")
