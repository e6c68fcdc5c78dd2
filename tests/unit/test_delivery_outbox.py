"""Outbox: the journal-backed queue without threads: cursor, cache, acknowledgements, losses."""

from __future__ import annotations

from pathlib import Path

from token_meter_plugin.delivery.answers import Tally
from token_meter_plugin.delivery.outbox import Outbox
from token_meter_plugin.delivery.report import LossLog


def event(i: int) -> bytes:
    return b'{"id":"e-%d"}' % i


def settle(outbox: Outbox, max_events: int = 100) -> list[bytes]:
    batch = outbox.next_batch(max_events)
    assert batch is not None
    outbox.acknowledge(batch, Tally(sent=len(batch.events), accepted=len(batch.events)))
    return batch.events


def test_batches_come_from_disk_until_the_cache_then_from_memory(outbox: Outbox) -> None:
    for i in range(8):
        assert outbox.append(event(i))
    assert outbox.stats()["in_memory"] == 3  # the newest three
    first = outbox.next_batch(100)
    assert first is not None and first.events == [event(i) for i in range(5)]  # disk, up to
    outbox.acknowledge(first, Tally())  # where the cache starts
    assert settle(outbox) == [event(i) for i in range(5, 8)]  # memory
    assert outbox.next_batch(100) is None
    stats = outbox.stats()
    assert (stats["journal_events"], stats["in_memory"], stats["in_flight"]) == (0, 0, 0)


def test_an_unacknowledged_batch_is_read_again_after_a_rewind(outbox: Outbox) -> None:
    for i in range(3):
        outbox.append(event(i))
    batch = outbox.next_batch(2)
    assert batch is not None and batch.events == [event(0), event(1)]
    assert outbox.stats()["in_flight"] == 2
    outbox.rewind()  # the sender lost it (a bug, caught)
    assert settle(outbox) == [event(0), event(1)]  # from disk, up to the cached one
    assert settle(outbox) == [event(2)]


def test_acknowledged_through_tells_when_everything_before_a_position_is_settled(
    outbox: Outbox,
) -> None:
    outbox.append(event(0))
    mark = outbox.end()
    assert mark is not None
    outbox.append(event(1))
    with outbox.lock:
        assert not outbox.acknowledged_through(mark)
    settle(outbox, max_events=1)
    with outbox.lock:
        assert outbox.acknowledged_through(mark)
        assert not outbox.acknowledged_through(outbox.end() or mark)


def test_every_loss_goes_through_one_count(tmp_path: Path) -> None:
    outbox = Outbox(tmp_path / "journal", max_entries=10, max_bytes=60, batch_size=100)
    assert outbox.append(event(0)) is False  # not open yet: nowhere to journal it
    assert outbox.open()
    results = [outbox.append(event(i)) for i in range(1, 6)]
    assert results == [True, True, False, False, False]  # 60 bytes hold two records
    outbox.lose(2, "unbuildable")
    outbox.close()
    assert outbox.append(event(9)) is False
    stats = outbox.stats()
    assert (stats["enqueued"], stats["lost"], stats["journal_events"]) == (7, 7, 2)


def test_loss_lines_are_rate_limited_but_nothing_stays_unlogged() -> None:
    losses = LossLog(interval=3600)
    losses.note(1, "journal full")
    assert losses.due() == {"journal full": 1}  # the first at once
    losses.note(2, "journal full")
    losses.note(1, "disk failed")
    assert losses.due() is None  # within the interval
    assert losses.due(force=True) == {"journal full": 2, "disk failed": 1}
    assert losses.due(force=True) is None
