"""Shipper: batching, answers and retries, the journal behind memory, bounds, restarts.

Every test talks HTTP to ``tests.harness.collector.FakeCollector``; faults come from the fake (or
from the journal's files, for corruption).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import usage_event
from tests.harness.collector import FakeCollector, wait_until
from token_meter_plugin.config import FIELDS
from token_meter_plugin.delivery import DeliverySettings, Shipper, get_shipper, shutdown_all
from token_meter_plugin.delivery.journal import collector_key
from token_meter_plugin.delivery.records import decode_record

SOURCE = "kong://dp-test/token-meter"


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def fast_settings(fake: FakeCollector, spool_dir: Path, **overrides: Any) -> DeliverySettings:
    values: dict[str, Any] = {
        "collector_url": fake.url,
        "collector_token": fake.token,
        "max_coalescing_delay": 0.02,
        "initial_retry_delay": 0.01,
        "max_retry_delay": 0.05,
        "timeout": 2.0,
        "spool_dir": str(spool_dir),
    }
    values.update(overrides)
    return DeliverySettings(**values)


MakeShipper = Callable[[DeliverySettings], Shipper]


@pytest.fixture
def make_shipper() -> Iterator[MakeShipper]:
    shippers: list[Shipper] = []

    def make(settings: DeliverySettings) -> Shipper:
        shipper = Shipper(settings)
        shippers.append(shipper)
        return shipper

    yield make
    for shipper in shippers:
        shipper.close(timeout=0.1)


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [usage_event(f"{prefix}-{i}", source=SOURCE) for i in range(count)]


def delivered_ids(fake: FakeCollector) -> list[str]:
    """Every event id the fake took (status 200), in arrival order, repeats included."""
    return [event_id for batch in fake.accepted_batches() for event_id in batch.ids]


def journaled_ids(directory: Path) -> list[str]:
    """The ids of the valid records of every segment in ``directory``, in journal order."""
    ids = []
    for path in sorted(directory.glob("*.journal")):
        for line in path.read_bytes().splitlines():
            payload = decode_record(line)
            if payload is not None:
                ids.append(payload.split(b'"id":"', 1)[1].split(b'"', 1)[0].decode())
    return ids


# -- settings ------------------------------------------------------------------------------------


def test_settings_defaults_need_only_url_token_and_a_directory() -> None:
    """Sub-second batching, and the same journal bound as the Kong schema's default."""
    settings = DeliverySettings("http://collector:8787", "secret", spool_dir="/var/spool/x")
    assert settings.max_batch_size == 1000
    assert settings.max_coalescing_delay < 1
    schema_default = next(f.default for f in FIELDS if f.name == "spool_max_bytes")
    assert settings.spool_max_bytes == schema_default == 8 * 1024**3
    with pytest.raises(TypeError):
        DeliverySettings("http://collector:8787", "secret")  # type: ignore[call-arg]


# -- batching ------------------------------------------------------------------------------------


def test_full_batches_go_without_waiting_for_the_coalescing_delay(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    shipper = make_shipper(
        fast_settings(collector, spool_dir, max_batch_size=10, max_coalescing_delay=60)
    )
    for event in events("e", 25):
        assert shipper.enqueue(event)
    assert wait_until(lambda: len(collector.batches) >= 2)
    assert [len(b.ids) for b in collector.batches] == [10, 10]  # the last 5 wait for more
    assert shipper.flush(5)
    assert [len(b.ids) for b in collector.batches] == [10, 10, 5]
    assert collector.stored_ids() == {f"e-{i}" for i in range(25)}


def test_a_partial_batch_goes_after_the_coalescing_delay(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=0.05))
    for event in events("e", 3):
        shipper.enqueue(event)
    assert collector.wait_stored(3)  # no flush: the delay alone sent them
    assert [b.ids for b in collector.batches] == [["e-0", "e-1", "e-2"]]
    assert wait_until(lambda: shipper.stats()["sent"] == 3)
    stats = shipper.stats()
    assert (stats["enqueued"], stats["sent"], stats["accepted"], stats["lost"]) == (3, 3, 3, 0)
    assert (stats["journal_events"], stats["in_memory"], stats["in_flight"]) == (0, 0, 0)


def test_batches_are_gzip_cloudevents_with_the_bearer_token(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("one", source=SOURCE))
    assert shipper.flush(5)
    headers = collector.batches[0].headers
    assert headers["authorization"] == f"Bearer {collector.token}"
    assert headers["content-type"] == "application/cloudevents-batch+json"
    assert headers["content-encoding"] == "gzip"
    assert collector.stored[(SOURCE, "one")] == usage_event("one", source=SOURCE)


def test_source_is_stamped_only_into_events_without_one(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir, source="kong://dp-7"))
    bare = usage_event("bare")
    del bare["source"]
    shipper.enqueue(bare)
    shipper.enqueue(usage_event("own", source="kong://elsewhere"))
    assert shipper.flush(5)
    assert set(collector.stored) == {("kong://dp-7", "bare"), ("kong://elsewhere", "own")}
    assert "source" not in bare  # the caller's dict is not modified


def test_an_unencodable_event_is_counted_lost_and_logged_not_raised(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        assert shipper.enqueue({"id": "bad", "data": object()}) is False
    assert shipper.stats()["lost"] == 1
    assert any("events_lost" in r.getMessage() for r in caplog.records)


def test_events_the_handler_could_not_build_are_counted_lost_and_logged(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        shipper.lose(2, "usage event invalid")
    assert shipper.stats()["lost"] == 2
    assert any(
        "events_lost" in r.getMessage() and "usage event invalid" in r.getMessage()
        for r in caplog.records
    )


# -- answers from the collector ------------------------------------------------------------------


@pytest.mark.parametrize("status", [500, 503, 429])
def test_server_errors_and_429_are_retried_with_backoff_until_delivered(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper, status: int
) -> None:
    collector.fail_next = [status] * 3
    shipper = make_shipper(fast_settings(collector, spool_dir))
    for event in events("e", 5):
        shipper.enqueue(event)
    assert collector.wait_stored(5)
    assert [b.status for b in collector.batches[:3]] == [status] * 3
    assert wait_until(lambda: shipper.stats()["accepted"] == 5)
    stats = shipper.stats()
    assert (stats["retries"], stats["lost"], stats["journal_events"]) == (3, 0, 0)


def test_a_collector_down_for_a_while_gets_every_event_exactly_once_when_it_is_back(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir, max_batch_size=50))
    for event in events("e", 400):
        assert shipper.enqueue(event)
    assert wait_until(lambda: shipper.stats()["retries"] >= 3)
    assert shipper.stats()["collector_failing"] == 1
    assert shipper.stats()["journal_events"] == 400
    collector.start()
    assert shipper.flush(10)
    counts = collections.Counter(delivered_ids(collector))
    assert counts == {f"e-{i}": 1 for i in range(400)}
    stats = shipper.stats()
    assert (stats["accepted"], stats["duplicates"], stats["lost"]) == (400, 0, 0)
    assert stats["collector_failing"] == 0


@pytest.mark.parametrize("status", [401, 403])
def test_a_refused_token_keeps_the_events_and_logs_errors(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    """A wrong token is a config error: it must not cost usage once it is fixed."""
    collector.fail_status = status
    shipper = make_shipper(fast_settings(collector, spool_dir))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 3):
            shipper.enqueue(event)
        assert wait_until(lambda: shipper.stats()["retries"] >= 2)
    assert any("collector_refused_token" in r.getMessage() for r in caplog.records)
    assert collector.stored_ids() == set()
    assert shipper.stats()["journal_events"] == 3
    collector.fail_status = None
    assert collector.wait_stored(3)
    assert shipper.stats()["lost"] == 0


def test_a_url_that_is_not_the_collector_keeps_the_events_rather_than_rejecting_them(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A 404 for every batch is a wrong URL, not a poison event in each."""
    collector.fail_status = 404
    shipper = make_shipper(fast_settings(collector, spool_dir))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 4):
            shipper.enqueue(event)
        assert wait_until(lambda: shipper.stats()["retries"] >= 2)
    assert any("collector_misconfigured" in r.getMessage() for r in caplog.records)
    assert shipper.stats()["rejected"] == 0
    collector.fail_status = None
    assert collector.wait_stored(4)


def test_the_token_of_a_config_push_is_used_by_the_next_request(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    collector.token = "rotated"
    shipper = get_shipper(fast_settings(collector, spool_dir, collector_token="old"))
    shipper.enqueue(usage_event("e-0", source=SOURCE))
    assert wait_until(lambda: any(b.status == 401 for b in collector.batches))
    pushed = fast_settings(collector, spool_dir, collector_token="rotated", max_batch_size=7)
    assert get_shipper(pushed) is shipper
    assert shipper.settings is pushed
    assert collector.wait_stored(1)
    assert collector.accepted_batches()[0].headers["authorization"] == "Bearer rotated"


def test_413_splits_the_batch_until_it_fits(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.max_batch_events = 3
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    for event in events("e", 10):
        shipper.enqueue(event)
    assert shipper.flush(5)
    assert collector.stored_ids() == {f"e-{i}" for i in range(10)}
    assert all(len(b.ids) <= 3 for b in collector.accepted_batches())
    assert delivered_ids(collector) == [f"e-{i}" for i in range(10)]  # in order, once each
    assert collector.batches[0].status == 413
    stats = shipper.stats()
    assert (stats["accepted"], stats["duplicates"], stats["retries"], stats["lost"]) == (
        10,
        0,
        0,
        0,
    )


def test_an_event_too_large_on_its_own_is_rejected_and_the_rest_delivered(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.too_large_ids = {"e-2"}
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 5):
            shipper.enqueue(event)
        assert shipper.flush(5)
    assert collector.stored_ids() == {"e-0", "e-1", "e-3", "e-4"}
    assert shipper.stats()["rejected"] == 1
    assert any(
        "event_rejected" in r.getMessage() and "e-2" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize("status", [400, 422])
def test_a_poison_event_is_isolated_and_rejected_and_cannot_stall_the_journal(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
    status: int,
) -> None:
    collector.poison_ids = {"e-5": status}
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 12):
            shipper.enqueue(event)
        assert shipper.flush(5)
        for event in events("after", 3):  # the journal moves on
            shipper.enqueue(event)
        assert shipper.flush(5)
    assert collector.stored_ids() == {f"e-{i}" for i in range(12) if i != 5} | {
        f"after-{i}" for i in range(3)
    }
    stats = shipper.stats()
    assert (stats["rejected"], stats["retries"], stats["lost"], stats["journal_events"]) == (
        1,
        0,
        0,
        0,
    )
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("event_rejected" in m and "e-5" in m for m in errors)


def test_rejected_events_are_logged_with_reasons_and_not_retried(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.reject = {"e-1": "subject is required", "e-3": "output_tokens must be >= 0"}
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 5):
            shipper.enqueue(event)
        assert shipper.flush(5)
    assert len(collector.batches) == 1
    stats = shipper.stats()
    assert (stats["sent"], stats["accepted"], stats["rejected"], stats["retries"]) == (5, 3, 2, 0)
    messages = [r.getMessage() for r in caplog.records]
    assert any("e-1" in m and "subject is required" in m for m in messages)
    assert any("e-3" in m and "output_tokens must be >= 0" in m for m in messages)


def test_duplicates_reported_by_the_collector_are_counted(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("same", source=SOURCE))
    assert shipper.flush(5)
    shipper.enqueue(usage_event("same", source=SOURCE))
    assert shipper.flush(5)
    stats = shipper.stats()
    assert (stats["accepted"], stats["duplicates"]) == (1, 1)


# -- the journal behind memory -------------------------------------------------------------------


def test_every_event_is_in_the_journal_when_enqueue_returns(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir))
    for i, event in enumerate(events("e", 5)):
        assert shipper.enqueue(event)
        assert journaled_ids(shipper.directory) == [f"e-{j}" for j in range(i + 1)]


def test_past_max_entries_events_are_read_back_from_disk_in_order(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir, max_batch_size=7, max_entries=10))
    for event in events("e", 100):
        assert shipper.enqueue(event)
    stats = shipper.stats()
    assert stats["in_memory"] == 10  # the newest; the others are on disk only
    assert stats["journal_events"] == 100
    collector.start()
    assert shipper.flush(10)
    assert delivered_ids(collector) == [f"e-{i}" for i in range(100)]
    stats = shipper.stats()
    assert (stats["accepted"], stats["in_memory"], stats["journal_events"]) == (100, 0, 0)
    assert stats["journal_segments"] == 1  # the one appended to


def test_past_the_journal_bound_every_lost_event_is_counted_and_logged(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir, spool_max_bytes=8000))
    kept = []
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 50):
            if shipper.enqueue(event):
                kept.append(event["id"])
            stats = shipper.stats()
            assert stats["lost"] + stats["journal_events"] == stats["enqueued"]  # none unaccounted
    stats = shipper.stats()
    assert 0 < len(kept) < 50
    assert stats["lost"] == 50 - len(kept)
    assert stats["journal_bytes"] <= 8000
    assert any(
        "events_lost" in r.getMessage() and "journal full" in r.getMessage() for r in caplog.records
    )
    collector.start()
    assert shipper.flush(10)
    assert delivered_ids(collector) == kept
    assert shipper.enqueue(usage_event("room-again", source=SOURCE))  # acknowledged: room


def test_flush_is_false_while_the_collector_is_down(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("e-0", source=SOURCE))
    assert shipper.flush(0.2) is False
    assert shipper.stats()["journal_events"] == 1


# -- restarts ------------------------------------------------------------------------------------


def test_close_leaves_undelivered_events_in_the_journal_for_the_next_shipper(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    settings = fast_settings(collector, spool_dir)
    first = make_shipper(settings)
    for event in events("e", 20):
        first.enqueue(event)
    first.close(timeout=0.1)
    assert first.enqueue(usage_event("late", source=SOURCE)) is False  # counted lost
    assert journaled_ids(first.directory) == [f"e-{i}" for i in range(20)]
    collector.start()
    second = make_shipper(settings)  # no enqueue: a backlog starts the sender
    assert collector.wait_stored(20)
    assert delivered_ids(collector) == [f"e-{i}" for i in range(20)]
    assert wait_until(lambda: second.stats()["replayed"] == 20)
    assert second.stats()["journal_events"] == 0


def test_close_gives_up_on_a_hung_collector_and_keeps_its_batch(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.delay = 1.0
    settings = fast_settings(collector, spool_dir, timeout=10)
    first = make_shipper(settings)
    for event in events("e", 7):
        first.enqueue(event)
    assert wait_until(lambda: first.stats()["in_flight"] == 7)  # the POST hangs
    first.close(timeout=0.2)
    assert first.stats()["journal_events"] == 7
    collector.delay = 0
    second = make_shipper(settings)
    assert wait_until(lambda: second.stats()["replayed"] == 7)
    assert collector.stored_ids() == {f"e-{i}" for i in range(7)}


def test_a_torn_tail_and_a_corrupt_record_are_skipped_counted_and_logged(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: MakeShipper,
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.stop()
    settings = fast_settings(collector, spool_dir)
    first = make_shipper(settings)
    for event in events("e", 5):
        first.enqueue(event)
    first.close(timeout=0.1)
    [segment] = first.directory.glob("*.journal")
    data = bytearray(segment.read_bytes())
    data[data.index(b'"e-2"') + 2] ^= 0x01  # one bit of the third record
    segment.write_bytes(bytes(data) + b'0badf00d {"id":"torn')  # and a write cut by a crash
    collector.start()
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        second = make_shipper(settings)
        assert collector.wait_stored(4)
        assert wait_until(lambda: second.stats()["journal_events"] == 0)
        # The loss line is written just after the acknowledgement's critical section.
        assert wait_until(lambda: any("events_lost" in r.getMessage() for r in caplog.records))
    assert delivered_ids(collector) == ["e-0", "e-1", "e-3", "e-4"]
    stats = second.stats()
    assert (stats["replayed"], stats["lost"]) == (4, 2)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("journal_records_skipped" in m for m in messages)
    assert any("events_lost" in m for m in messages)


def test_a_second_shipper_on_the_same_directory_uses_a_sibling_later_adopted(
    collector: FakeCollector, spool_dir: Path, make_shipper: MakeShipper
) -> None:
    collector.stop()
    settings = fast_settings(collector, spool_dir)
    first = make_shipper(settings)
    second = make_shipper(settings)  # e.g. a successor overlapping a plugin server's drain
    assert second.directory == first.directory
    first.enqueue(usage_event("first", source=SOURCE))
    second.enqueue(usage_event("second", source=SOURCE))
    key = collector_key(collector.url)
    assert journaled_ids(spool_dir / key) == ["first"]
    assert journaled_ids(spool_dir / f"{key}.1") == ["second"]
    first.close(timeout=0.1)
    second.close(timeout=0.1)
    collector.start()
    third = make_shipper(settings)
    assert collector.wait_stored(2)
    assert delivered_ids(collector) == ["first", "second"]
    assert wait_until(lambda: third.stats()["replayed"] == 2)


# -- one shipper per collector and process -------------------------------------------------------


@pytest.fixture
def clean_registry() -> Iterator[None]:
    shutdown_all(timeout=0.1)
    yield
    shutdown_all(timeout=0.1)


def test_get_shipper_returns_one_shipper_per_collector_url(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    settings = fast_settings(collector, spool_dir)
    shipper = get_shipper(settings)
    assert get_shipper(settings) is shipper
    pushed = fast_settings(collector, spool_dir, max_batch_size=7, collector_token="other")
    assert get_shipper(pushed) is shipper  # a config push reconfigures it
    assert shipper.settings is pushed


def test_two_collectors_get_two_journal_directories(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    with FakeCollector() as other:
        a = get_shipper(fast_settings(collector, spool_dir))
        b = get_shipper(fast_settings(other, spool_dir))
        assert a is not b
        a.enqueue(usage_event("for-a", source=SOURCE))
        b.enqueue(usage_event("for-b", source=SOURCE))
        assert a.flush(5) and b.flush(5)
        assert (collector.stored_ids(), other.stored_ids()) == ({"for-a"}, {"for-b"})
        assert sorted(p.name for p in spool_dir.iterdir()) == sorted(
            [collector_key(collector.url), collector_key(other.url)]
        )


def test_shutdown_all_closes_every_shipper_and_leaves_the_rest_in_the_journal(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    collector.stop()
    shipper = get_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("kept", source=SOURCE))
    shutdown_all(timeout=0.2)
    assert shipper.enqueue(usage_event("after", source=SOURCE)) is False
    assert journaled_ids(shipper.directory) == ["kept"]
    assert get_shipper(fast_settings(collector, spool_dir)) is not shipper
