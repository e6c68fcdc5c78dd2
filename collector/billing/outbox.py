"""The outbox's arithmetic, pure: which deltas a rollup window's new usage makes.

A rollup window (one consumer, one UTC hour) only grows. For each meter, what the outbox already
accounts for in that window is `covered`; the difference to the rollup's total is new usage. Per
consumer and meter, everything ever covered and sent is kept too, with the rule

    sent == covered // scale

so a meter with a scale (`cost_micros`: 1,000 nano-units make one micro) never loses a remainder
to rounding: the fraction waits and is sent with a later delta. Each delta is immutable, numbered
within its window (`seq`), and has an identifier derived from what it is, so a retry of the same
row, by any collector, is the same meter event to Stripe.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime

from .meters import Meter

IDENTIFIER_PREFIX = "tm1"


@dataclass(frozen=True, slots=True)
class WindowUsage:
    """A rollup window's totals, per usage field (`meters.FIELDS` names)."""

    consumer: str
    window_start: datetime
    totals: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class Coverage:
    """What the outbox accounts for in one window of one meter."""

    covered: int = 0
    deltas: int = 0


@dataclass(frozen=True, slots=True)
class Totals:
    """Everything covered and sent for one consumer and meter."""

    covered: int = 0
    value: int = 0


@dataclass(frozen=True, slots=True)
class Delta:
    consumer: str
    event_name: str
    window_start: datetime
    seq: int
    value: int

    @property
    def identifier(self) -> str:
        return identifier(self.consumer, self.event_name, self.window_start, self.seq)


WindowKey = tuple[str, str, datetime]  # consumer, event name, window start
TotalsKey = tuple[str, str]  # consumer, event name


@dataclass(frozen=True, slots=True)
class Plan:
    deltas: list[Delta]
    coverage: dict[WindowKey, Coverage]
    totals: dict[TotalsKey, Totals]
    # Windows whose rollup total is below what was covered: cannot happen unless rollups were
    # edited by hand; left alone and reported.
    shrunk: list[WindowKey]


def identifier(consumer: str, event_name: str, window_start: datetime, seq: int) -> str:
    """`tm1-<window epoch>-<seq>-<digest>`: at most 100 characters, whatever the consumer."""
    epoch = int(window_start.timestamp())
    digest = hashlib.sha256(f"{consumer}\0{event_name}\0{epoch}\0{seq}".encode()).hexdigest()
    return f"{IDENTIFIER_PREFIX}-{epoch}-{seq}-{digest[:32]}"


_RESEND = re.compile(r"-r([0-9]+)$")


def next_identifier(current: str) -> str:
    """The identifier a delta is sent under again once Stripe reported it dropped: `-r1`, then
    `-r2`..., appended to the delta's own (hex digests never end so). A new one because Stripe
    may keep a dropped event's identifier for its 24-hour dedupe, which would drop the re-send
    as a duplicate; deterministic so that every collector derives the same."""
    found = _RESEND.search(current)
    if found is None:
        return f"{current}-r1"
    return f"{current[: found.start()]}-r{int(found.group(1)) + 1}"


def plan(
    windows: Iterable[WindowUsage],
    meters: Sequence[Meter],
    coverage: Mapping[WindowKey, Coverage],
    totals: Mapping[TotalsKey, Totals],
) -> Plan:
    """The deltas the new usage in `windows` makes, and the coverage and totals after them.
    `coverage` and `totals` hold the current rows for these windows (missing means zero)."""
    new_coverage: dict[WindowKey, Coverage] = {}
    new_totals: dict[TotalsKey, Totals] = {}
    deltas: list[Delta] = []
    shrunk: list[WindowKey] = []
    for window in sorted(windows, key=lambda w: (w.consumer, w.window_start)):
        for meter in meters:
            wkey = (window.consumer, meter.event_name, window.window_start)
            tkey = (window.consumer, meter.event_name)
            seen = new_coverage.get(wkey) or coverage.get(wkey) or Coverage()
            added = window.totals.get(meter.field, 0) - seen.covered
            if added < 0:
                shrunk.append(wkey)
            if added <= 0:
                continue
            before = new_totals.get(tkey) or totals.get(tkey) or Totals()
            covered = before.covered + added
            value = covered // meter.source.scale - before.value
            new_totals[tkey] = Totals(covered, before.value + value)
            seen = replace(seen, covered=seen.covered + added)
            if value > 0:
                seen = replace(seen, deltas=seen.deltas + 1)
                deltas.append(
                    Delta(
                        window.consumer, meter.event_name, window.window_start, seen.deltas, value
                    )
                )
            new_coverage[wkey] = seen
    return Plan(deltas, new_coverage, new_totals, shrunk)
