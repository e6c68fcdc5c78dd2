"""The outbox's hold: events whose journal write fails (a full disk) are kept in memory, up to a
bound, and journaled in order once the disk takes writes again.

The full disk is ``os.write`` on a segment file (``*.journal``) failing as a filling disk does:
the first write of a record takes what fits, the next one fails with ENOSPC. Every other write
(logs, ack files use ``pwrite``) goes through.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import usage_event
from tests.harness.collector import FakeCollector, wait_until
from token_meter_plugin.delivery import DeliverySettings, Shipper
from token_meter_plugin.delivery.answers import Tally
from token_meter_plugin.delivery.outbox import MAX_HELD_BYTES, MAX_HELD_EVENTS, Outbox
from token_meter_plugin.delivery.records import decode_record, encode_record

SOURCE = "kong://dp-test/token-meter"


class FullDisk:
    """``os.write`` to a journal segment failing while ``full`` is set."""

    def __init__(self) -> None:
        self.full = False
        self.refused = 0  # failed writes
        self._real = os.write
        self._cut = False  # a short write was just given: the next one fails

    def write(self, fd: int, data: Any) -> int:
        if not self.full or Path(f"/proc/self/fd/{fd}").readlink().suffix != ".journal":
            return self._real(fd, data)
        if not self._cut and len(data) > 1:
            self._cut = True
            return self._real(fd, bytes(data[: len(data) // 2]))  # what fits
        self._cut = False
        self.refused += 1
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> FullDisk:
    fake = FullDisk()
    monkeypatch.setattr(os, "write", fake.write)
    return fake


def event(i: int, size: int = 0) -> bytes:
    return b'{"id":"e-%d","pad":"%s"}' % (i, b"x" * size)


def journaled(directory: Path) -> list[bytes]:
    """The payloads of every segment in ``directory``, in journal order; no torn record."""
    payloads = []
    for path in sorted(directory.glob("*.journal")):
        data = path.read_bytes()
        assert not data or data.endswith(b"\n")  # a cut record was undone
        for line in data.splitlines():
            payload = decode_record(line)
            assert payload is not None
            payloads.append(payload)
    return payloads


def settle_all(outbox: Outbox) -> list[bytes]:
    """Every unsent event, taken and acknowledged batch after batch, in order."""
    delivered: list[bytes] = []
    while (batch := outbox.next_batch(100)) is not None:
        outbox.acknowledge(batch, Tally(sent=len(batch.events), accepted=len(batch.events)))
        delivered += batch.events
    return delivered


def messages(caplog: pytest.LogCaptureFixture, name: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(name + " ")]


# -- the outbox ----------------------------------------------------------------------------------


def test_an_event_the_disk_refuses_is_held_not_lost_and_journaled_first_when_it_takes_writes(
    outbox: Outbox, disk: FullDisk, caplog: pytest.LogCaptureFixture
) -> None:
    assert outbox.append(event(0))
    disk.full = True
    with caplog.at_level(logging.INFO, logger="token_meter_plugin"):
        assert outbox.append(event(1)) is True  # held: not lost
        assert outbox.append(event(2)) is True  # behind it, without a write of its own
        stats = outbox.stats()
        assert (stats["lost"], stats["held_events"], stats["held_total"]) == (0, 2, 2)
        assert stats["held_bytes"] == len(event(1)) + len(event(2))
        assert stats["journal_events"] == 1
        assert journaled(outbox.directory) == [event(0)]
        disk.full = False
        assert outbox.append(event(3))  # the held ones first, then it
    assert journaled(outbox.directory) == [event(i) for i in range(4)]
    stats = outbox.stats()
    assert (stats["enqueued"], stats["lost"], stats["journal_events"]) == (4, 0, 4)
    assert (stats["held_events"], stats["held_bytes"], stats["held_total"]) == (0, 0, 2)
    assert settle_all(outbox) == [event(i) for i in range(4)]
    [warning] = messages(caplog, "spool_unwritable_holding_in_memory")
    assert "No space left on device" in warning and "held_events=1" in warning
    [drained] = messages(caplog, "spool_writable_again")
    assert "held=2" in drained and "held_events=0" in drained
    assert not messages(caplog, "events_lost")


def test_maintain_journals_held_events_without_a_new_request(
    outbox: Outbox, disk: FullDisk
) -> None:
    disk.full = True
    for i in range(3):
        assert outbox.append(event(i))
    outbox.maintain()  # still full: they stay held
    assert (outbox.stats()["held_events"], outbox.unsent) == (3, 0)
    assert outbox.next_batch(100) is None
    disk.full = False
    outbox.maintain()
    assert (outbox.stats()["held_events"], outbox.unsent) == (0, 3)
    assert journaled(outbox.directory) == [event(i) for i in range(3)]
    assert settle_all(outbox) == [event(i) for i in range(3)]
    assert outbox.stats()["lost"] == 0


def test_past_the_hold_bound_of_events_each_event_is_lost_counted_exactly(
    outbox: Outbox, disk: FullDisk, caplog: pytest.LogCaptureFixture
) -> None:
    disk.full = True
    over = 7
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        results = [outbox.append(event(i)) for i in range(MAX_HELD_EVENTS + over)]
    assert results == [True] * MAX_HELD_EVENTS + [False] * over  # the newest are the lost ones
    stats = outbox.stats()
    assert (stats["held_events"], stats["held_total"], stats["lost"]) == (
        MAX_HELD_EVENTS,
        MAX_HELD_EVENTS,
        over,
    )
    [line] = messages(caplog, "events_lost")  # rate-limited: the first at once
    assert "memory hold full" in line and "No space left on device" in line
    disk.full = False
    assert outbox.append(event(-1))
    expected = [event(i) for i in range(MAX_HELD_EVENTS)] + [event(-1)]
    assert settle_all(outbox) == expected
    assert outbox.stats()["lost"] == over


def test_past_the_hold_bound_of_bytes_each_event_is_lost_counted_exactly(
    outbox: Outbox, disk: FullDisk
) -> None:
    size = 1024 * 1024  # 8 of these, with their JSON around, are over MAX_HELD_BYTES
    fit = MAX_HELD_BYTES // len(event(0, size))
    disk.full = True
    results = [outbox.append(event(i, size)) for i in range(fit + 2)]
    assert results == [True] * fit + [False, False]
    assert outbox.append(event(99)) is True  # a small one still fits
    stats = outbox.stats()
    assert (stats["held_events"], stats["lost"]) == (fit + 1, 2)
    assert stats["held_bytes"] == fit * len(event(0, size)) + len(event(99)) <= MAX_HELD_BYTES
    disk.full = False
    outbox.maintain()
    assert settle_all(outbox) == [event(i, size) for i in range(fit)] + [event(99)]


def test_a_held_event_the_journal_refuses_as_full_is_lost_as_if_on_its_first_try(
    tmp_path: Path, disk: FullDisk
) -> None:
    two = 2 * len(encode_record(event(0)))
    outbox = Outbox(tmp_path / "journal", max_entries=10, max_bytes=two, batch_size=100)
    assert outbox.open()
    disk.full = True
    assert [outbox.append(event(i)) for i in range(4)] == [True] * 4
    disk.full = False
    outbox.maintain()  # room for two records
    stats = outbox.stats()
    assert (stats["held_events"], stats["journal_events"], stats["lost"]) == (0, 2, 2)
    assert settle_all(outbox) == [event(0), event(1)]
    outbox.close()


def test_close_tries_once_more_then_counts_the_events_still_held_as_lost(
    outbox: Outbox, disk: FullDisk, caplog: pytest.LogCaptureFixture
) -> None:
    disk.full = True
    for i in range(3):
        assert outbox.append(event(i))
    refused = disk.refused
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        outbox.close()
    assert disk.refused == refused + 1  # the last try
    stats = outbox.stats()
    assert (stats["held_events"], stats["held_bytes"], stats["lost"]) == (0, 0, 3)
    [line] = messages(caplog, "events_lost")
    assert "spool unwritable at shutdown" in line and "count=3" in line


def test_close_journals_what_the_disk_takes_again(outbox: Outbox, disk: FullDisk) -> None:
    disk.full = True
    assert outbox.append(event(0))
    disk.full = False
    outbox.close()
    assert outbox.stats()["lost"] == 0
    assert journaled(outbox.directory) == [event(0)]  # for the next process


# -- the shipper ---------------------------------------------------------------------------------


def settings(fake: FakeCollector, spool_dir: Path) -> DeliverySettings:
    return DeliverySettings(
        fake.url,
        fake.token,
        spool_dir=str(spool_dir),
        max_coalescing_delay=0.02,
        initial_retry_delay=0.01,
        max_retry_delay=0.05,
        timeout=2.0,
    )


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


def delivered_ids(fake: FakeCollector) -> list[str]:
    return [event_id for batch in fake.accepted_batches() for event_id in batch.ids]


def test_held_events_are_delivered_in_order_once_the_disk_takes_them_and_flush_waits(
    collector: FakeCollector, tmp_path: Path, disk: FullDisk
) -> None:
    shipper = Shipper(settings(collector, tmp_path / "spool"))
    try:
        assert shipper.enqueue(usage_event("e-0", source=SOURCE))
        assert shipper.flush(5)
        disk.full = True
        for i in range(1, 6):
            assert shipper.enqueue(usage_event(f"e-{i}", source=SOURCE))  # held
        assert shipper.flush(0.3) is False  # not complete while events are held
        assert delivered_ids(collector) == ["e-0"]
        disk.full = False  # no request comes: the sender's housekeeping journals them
        assert wait_until(lambda: shipper.stats()["held_events"] == 0)
        assert shipper.flush(5)
        assert delivered_ids(collector) == [f"e-{i}" for i in range(6)]
        stats = shipper.stats()
        assert (stats["enqueued"], stats["sent"], stats["lost"], stats["held_total"]) == (
            6,
            6,
            0,
            5,
        )
    finally:
        shipper.close(timeout=0.5)


def test_close_with_events_held_counts_them_lost_in_the_closing_stats(
    collector: FakeCollector,
    tmp_path: Path,
    disk: FullDisk,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipper = Shipper(settings(collector, tmp_path / "spool"))
    assert shipper.enqueue(usage_event("e-0", source=SOURCE))
    assert shipper.flush(5)
    disk.full = True
    for i in range(1, 4):
        assert shipper.enqueue(usage_event(f"e-{i}", source=SOURCE))
    with caplog.at_level(logging.INFO, logger="token_meter_plugin"):
        shipper.close(timeout=0.3)
    [closed] = messages(caplog, "shipper_closed")
    assert " lost=3 " in closed and " held_events=0 " in closed and " held_total=3 " in closed
    assert any("spool unwritable at shutdown" in m for m in messages(caplog, "events_lost"))
    assert delivered_ids(collector) == ["e-0"]


def test_events_are_held_while_the_journal_cannot_be_opened_then_delivered(
    collector: FakeCollector, tmp_path: Path
) -> None:
    """The disk refuses the journal at start (here its directory's place is taken by a file):
    events are held, not lost, and delivered once the sender's retry of `open` succeeds."""
    spool = tmp_path / "spool"
    spool.write_bytes(b"")  # not a directory: the journal's directory cannot be made
    shipper = Shipper(settings(collector, spool))
    try:
        for i in range(3):
            assert shipper.enqueue(usage_event(f"e-{i}", source=SOURCE))
        stats = shipper.stats()
        assert (stats["lost"], stats["held_events"], stats["held_total"]) == (0, 3, 3)
        spool.unlink()
        spool.mkdir()
        assert wait_until(lambda: shipper.stats()["held_events"] == 0, timeout=10)
        assert shipper.flush(5)
        assert delivered_ids(collector) == ["e-0", "e-1", "e-2"]
        assert shipper.stats()["lost"] == 0
    finally:
        shipper.close(timeout=0.5)
