"""The usage event (contract 2, schema/usage-event.schema.json) and the batch parser.

The parser is the hot path of the collector: a batch is split into raw JSON slices without
building Python objects, then each slice is decoded straight into a typed msgspec Struct (in C),
so a valid event costs one allocation and an invalid one gets its own precise reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_TOKENS = 100_000_000  # no single AI request comes near this; larger is a broken sender
MAX_FUTURE_SKEW = timedelta(hours=24)
# Dedupe keys are kept this long after they arrive; an event older than that is refused rather
# than risk counting a replay twice (see prune_event_keys). Far longer than a plugin's spool holds.
DEFAULT_DEDUPE_HORIZON = timedelta(days=90)

Tokens = Annotated[int, Meta(ge=0, le=MAX_TOKENS)]
OptionalText = Annotated[str, Meta(max_length=256)] | None


class UsageData(msgspec.Struct, forbid_unknown_fields=True):
    input_tokens: Tokens
    output_tokens: Tokens
    total_tokens: Tokens
    cached_input_tokens: Tokens = 0
    cache_write_input_tokens: Tokens = 0
    reasoning_tokens: Tokens = 0
    consumer_id: OptionalText = None
    consumer_username: OptionalText = None
    consumer_custom_id: OptionalText = None
    route_id: OptionalText = None
    route_name: OptionalText = None
    service_id: OptionalText = None
    service_name: OptionalText = None
    provider: OptionalText = None
    model: OptionalText = None
    status: Annotated[int, Meta(ge=100, le=599)] | None = None
    streamed: bool = False
    latency_ms: Annotated[float, Meta(ge=0, le=86_400_000)] | None = None
    usage_missing: bool = False

    def __post_init__(self) -> None:
        # Contract 2's consistency rules; msgspec reports a ValueError as a validation error.
        if self.cached_input_tokens + self.cache_write_input_tokens > self.input_tokens:
            raise ValueError(
                "cached_input_tokens + cache_write_input_tokens must not exceed input_tokens"
            )
        if self.reasoning_tokens > self.output_tokens:
            raise ValueError("reasoning_tokens must not exceed output_tokens")
        if self.total_tokens != self.input_tokens + self.output_tokens:
            raise ValueError("total_tokens must equal input_tokens + output_tokens")


class UsageEvent(msgspec.Struct):
    """A CloudEvents 1.0 usage event. Unknown top-level attributes are CloudEvents extensions:
    allowed, and not stored."""

    specversion: Literal["1.0"]
    id: Annotated[str, Meta(min_length=1, max_length=256)]
    source: Annotated[str, Meta(min_length=1, max_length=512)]
    type: Literal["ai.usage"]
    subject: Annotated[str, Meta(min_length=1, max_length=256)]
    time: Annotated[datetime, Meta(tz=True)]
    data: UsageData
    datacontenttype: Literal["application/json"] | None = None
    dataschema: Annotated[str, Meta(max_length=512)] | None = None


class _IdOnly(msgspec.Struct):
    id: Any = None


class BatchError(Exception):
    """The body as a whole is not a batch: nothing is stored."""


@dataclass(frozen=True, slots=True)
class Rejection:
    index: int
    id: str | None
    reason: str


@dataclass(slots=True)
class ParsedBatch:
    events: list[UsageEvent]
    rejected: list[Rejection]
    size: int


_split = msgspec.json.Decoder(list[msgspec.Raw])
_decode_event = msgspec.json.Decoder(UsageEvent)
_decode_id = msgspec.json.Decoder(_IdOnly)


def parse_batch(
    body: bytes, *, max_events: int, now: datetime, horizon: timedelta = DEFAULT_DEDUPE_HORIZON
) -> ParsedBatch:
    """Split a JSON array of events and validate each one on its own. Raises BatchError when the
    body is not a JSON array, and BatchTooLarge when it holds more than `max_events`."""
    try:
        raws = _split.decode(body)
    except msgspec.ValidationError as exc:
        raise BatchError("the body must be a JSON array of CloudEvents") from exc
    except msgspec.DecodeError as exc:
        raise BatchError(f"the body is not valid JSON: {exc}") from exc
    if len(raws) > max_events:
        raise BatchTooLarge(f"a batch holds at most {max_events} events, this one {len(raws)}")
    events: list[UsageEvent] = []
    rejected: list[Rejection] = []
    latest = now + MAX_FUTURE_SKEW
    oldest = now - horizon
    for index, raw in enumerate(raws):
        try:
            event = _decode_event.decode(raw)
        except msgspec.ValidationError as exc:
            rejected.append(Rejection(index, _event_id(raw), str(exc)))
            continue
        if event.time > latest:
            rejected.append(Rejection(index, event.id, "time is more than 24 hours in the future"))
            continue
        if event.time < oldest:
            reason = f"time is older than the {horizon.days}-day dedupe horizon"
            rejected.append(Rejection(index, event.id, reason))
            continue
        events.append(event)
    return ParsedBatch(events=events, rejected=rejected, size=len(raws))


class BatchTooLarge(BatchError):
    pass


def _event_id(raw: msgspec.Raw) -> str | None:
    try:
        value = _decode_id.decode(raw).id
    except msgspec.MsgspecError:
        return None
    return value if isinstance(value, str) else None
