"""Which usage field feeds which Stripe billing meter (`TOKEN_METER_STRIPE_METERS`).

Each meter sums one whole-number field of the usage rollups. `FIELDS` gives each field the SQL
that reads it from `usage_hourly` and its scale: tokens are sent as counted; `cost_micros` comes
from the ledger's nano-units, so 1,000 of them make one unit sent, and what is left under a micro
is carried into the next delta (see `docs/billing.md`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True, slots=True)
class Field:
    """One usage field a meter can sum: its SQL over `usage_hourly` and units per value."""

    name: str
    sql: str
    scale: int = 1


FIELDS: Final[Mapping[str, Field]] = {
    field.name: field
    for field in (
        Field("input_tokens", "sum(input_tokens)"),
        Field(
            "uncached_input_tokens",
            "sum(input_tokens - cached_input_tokens - cache_write_input_tokens)",
        ),
        Field("cached_input_tokens", "sum(cached_input_tokens)"),
        Field("cache_write_input_tokens", "sum(cache_write_input_tokens)"),
        Field("output_tokens", "sum(output_tokens)"),
        Field("reasoning_tokens", "sum(reasoning_tokens)"),
        Field("total_tokens", "sum(total_tokens)"),
        Field("cost_micros", "sum(cost_nanos)", scale=1000),
    )
}

DEFAULT_METERS: Final = (
    "token_meter_input_tokens=input_tokens,token_meter_output_tokens=output_tokens"
)
# Stripe's limit on a meter's event_name is 100 characters; we keep to a plain identifier so it
# is safe in logs, metrics labels and the outbox's identifiers.
_EVENT_NAME: Final = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


@dataclass(frozen=True, slots=True)
class Meter:
    """A meter as configured: Stripe's `event_name` and the usage field it sums."""

    event_name: str
    field: str

    @property
    def source(self) -> Field:
        return FIELDS[self.field]


def parse_meters(text: str | None) -> tuple[tuple[Meter, ...], list[str]]:
    """`event_name=field` pairs, comma-separated; returns the meters and every problem found."""
    raw = DEFAULT_METERS if text is None or not text.strip() else text
    meters: list[Meter] = []
    problems: list[str] = []
    for pair in (part.strip() for part in raw.split(",")):
        if not pair:
            continue
        event_name, sep, field = (piece.strip() for piece in pair.partition("="))
        if not sep or not event_name or not field:
            problems.append(f"TOKEN_METER_STRIPE_METERS: {pair!r} is not event_name=field")
            continue
        if not _EVENT_NAME.fullmatch(event_name):
            problems.append(
                f"TOKEN_METER_STRIPE_METERS: event name {event_name!r} must be 1 to 100 of "
                "letters, digits and _ . : -"
            )
        if field not in FIELDS:
            problems.append(
                f"TOKEN_METER_STRIPE_METERS: unknown field {field!r} for {event_name!r}; "
                f"one of {', '.join(FIELDS)}"
            )
        if any(meter.event_name == event_name for meter in meters):
            problems.append(f"TOKEN_METER_STRIPE_METERS: {event_name!r} is listed twice")
        meters.append(Meter(event_name, field))
    if not meters and not problems:
        problems.append("TOKEN_METER_STRIPE_METERS lists no meter")
    return tuple(meters), problems
