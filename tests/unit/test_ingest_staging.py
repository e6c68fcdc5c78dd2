"""Staging a request's rows as it arrives, and joining the staged requests of a transaction:
the same rows and sums as staging them all at once, whatever overlaps or reloads come between."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from tests.factories import usage_event
from token_meter_collector.ingest.events import UsageData, UsageEvent
from token_meter_collector.ingest.fresh import FreshUsage
from token_meter_collector.ingest.store import (
    StagedEvents,
    join_staged,
    stage_events,
    tally_new,
)

AT = datetime(2026, 11, 27, 10, 59, 58, tzinfo=UTC)


class Book:
    """A price book charging `rate` nano-units per token."""

    def __init__(self, version: str, rate: int) -> None:
        self._version, self.rate = version, rate

    @property
    def version(self) -> str:
        return self._version

    def cost_nanos(self, data: UsageData) -> int | None:
        return None if data.model == "unknown" else data.total_tokens * self.rate


def events(*specs: tuple[str, str, int]) -> list[UsageEvent]:
    """(id, consumer, seconds after AT) each."""
    raw = [
        usage_event(i, c, time=(AT + timedelta(seconds=s)).isoformat(), consumer_custom_id=f"x-{i}")
        for i, c, s in specs
    ]
    return msgspec.convert(raw, list[UsageEvent])


def summary(staged: StagedEvents) -> tuple[object, ...]:
    return (
        staged.records,
        staged.owners,
        staged.sizes,
        staged.tally.accepted,
        staged.tally.fresh(),
        staged.keys,
    )


def test_joined_requests_are_staged_as_if_together() -> None:
    book = Book("b1", 3)
    first = events(("a", "ann", 0), ("b", "bob", 1))
    second = events(("c", "ann", 2), ("d", "ann", 3))  # crosses into the next hour
    parts = [stage_events([first], book), stage_events([second], book)]
    joined = join_staged(parts, [first, second], book)
    assert summary(joined) == summary(stage_events([first, second], book))
    fresh = {f.consumer: f for f in joined.tally.fresh()}
    assert fresh["ann"] == FreshUsage(
        "ann",
        3,
        360,
        3 * 360,
        0,
        (AT.replace(minute=0, second=0), AT.replace(minute=0, second=0) + timedelta(hours=1)),
        "x-d",
    )


def test_an_event_in_two_requests_is_counted_once() -> None:
    book = Book("b1", 3)
    first = events(("a", "ann", 0), ("b", "ann", 1))
    second = events(("b", "ann", 1), ("c", "ann", 2))
    joined = join_staged(
        [stage_events([first], book), stage_events([second], book)], [first, second], book
    )
    assert joined.sizes == [2, 2]
    assert joined.tally.accepted == [2, 1]
    assert joined.owners == [0, 0, 1]
    assert [f.events for f in joined.tally.fresh()] == [3]


def test_the_same_id_at_another_time_is_another_event() -> None:
    staged = stage_events([events(("a", "ann", 0), ("a", "ann", 5), ("a", "ann", 0))], Book("b", 1))
    assert len(staged.records) == 2
    assert staged.tally.accepted == [2]


def test_a_reload_between_staging_and_the_transaction_prices_all_with_one_book() -> None:
    old, new = Book("old", 1), Book("new", 1000)
    first, second = events(("a", "ann", 0)), events(("b", "ann", 1))
    parts = [stage_events([first], old), stage_events([second], new)]
    joined = join_staged(parts, [first, second], new)
    assert joined.book is new
    assert joined.tally.fresh()[0].cost_nanos == 2 * 120 * 1000
    assert {r[-1] for r in joined.records} == {"new"}


def test_duplicates_found_in_the_database_leave_the_tally() -> None:
    book = Book("b1", 3)
    batch = events(("a", "ann", 0), ("b", "bob", 1), ("c", "bob", 2))
    staged = stage_events([batch, events(("d", "ann", 3))], book)
    known = {(staged.records[1][0], staged.records[1][1])}  # b's (key, time)
    tally = tally_new(staged, known)  # type: ignore[arg-type]
    assert tally.accepted == [2, 1]
    assert [(f.consumer, f.events) for f in tally.fresh()] == [("ann", 2), ("bob", 1)]


def test_unpriced_events_are_counted_apart() -> None:
    raw = [usage_event("u", "ann", time=AT.isoformat(), model="unknown")]
    staged = stage_events([msgspec.convert(raw, list[UsageEvent])], Book("b", 5))
    (fresh,) = staged.tally.fresh()
    assert (fresh.cost_nanos, fresh.unpriced_events) == (0, 1)
