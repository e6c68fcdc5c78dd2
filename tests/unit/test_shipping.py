"""Shipper: batching, retries, 413 splits, rejections, the spool path and fork safety.

Every test talks HTTP to ``tests.fake_collector.FakeCollector``; faults come from the fake.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.factories import usage_event
from tests.fake_collector import FakeCollector, wait_until
from token_meter_plugin import shipping
from token_meter_plugin.shipping import (
    Backoff,
    SettingsError,
    Shipper,
    ShippingSettings,
    get_shipper,
    shutdown_all,
)
from token_meter_plugin.spool import Spool

SOURCE = "kong://dp-test/token-meter"


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        yield fake


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def fast_settings(fake: FakeCollector, spool_dir: Path, **overrides: Any) -> ShippingSettings:
    values: dict[str, Any] = {
        "collector_url": fake.url,
        "collector_token": fake.token,
        "max_coalescing_delay": 0.02,
        "initial_retry_delay": 0.01,
        "max_retry_delay": 0.05,
        "timeout": 2.0,
        "spool_dir": str(spool_dir),
        "shutdown_timeout": 2.0,
    }
    values.update(overrides)
    return ShippingSettings(**values)


@pytest.fixture
def make_shipper() -> Iterator[Callable[[ShippingSettings], Shipper]]:
    shippers: list[Shipper] = []

    def make(settings: ShippingSettings) -> Shipper:
        shipper = Shipper(settings)
        shippers.append(shipper)
        return shipper

    yield make
    for shipper in shippers:
        shipper.close(timeout=0.5)


def events(prefix: str, count: int) -> list[dict[str, Any]]:
    return [usage_event(f"{prefix}-{i}", source=SOURCE) for i in range(count)]


def spooled_ids(directory: Path) -> list[list[str]]:
    """The event ids of each batch file in ``directory``, in file-name order."""
    return [
        [event["id"] for event in json.loads(gzip.decompress(path.read_bytes()))]
        for path in sorted(directory.glob("*.json.gz"))
    ]


# -- settings ------------------------------------------------------------------------------------


def test_settings_defaults_need_only_url_and_token() -> None:
    """A config of just collector_url and collector_token works, with sub-second batching."""
    settings = ShippingSettings("http://collector:8787", "secret")
    assert settings.max_batch_size == 1000
    assert settings.max_coalescing_delay < 1
    assert settings.spool_max_bytes == 2 * 1024**3
    assert settings.spool_path().parts[-2:] == ("token-meter-spool", "token-meter")


def test_settings_report_every_error_at_once() -> None:
    with pytest.raises(SettingsError) as raised:
        ShippingSettings(
            "ftp://collector",
            "",
            max_batch_size=0,
            max_retry_delay=0.01,
            initial_retry_delay=0.1,
            timeout=0,
        )
    assert len(raised.value.errors) == 5
    for name in ("collector_url", "collector_token", "max_batch_size", "max_retry_delay"):
        assert name in str(raised.value)


def test_backoff_is_capped_exponential_with_full_jitter() -> None:
    caps: list[float] = []

    def highest(low: float, high: float) -> float:
        caps.append(high)
        return high

    backoff = Backoff(0.1, 1.0, rng=highest)
    for _ in range(6):
        backoff.next_delay()
    assert caps == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    backoff.reset()
    assert backoff.next_delay() == 0.1
    assert 0 <= Backoff(0.1, 1.0).next_delay() <= 0.1


# -- batching ------------------------------------------------------------------------------------


def test_full_batches_go_without_waiting_for_the_coalescing_delay(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    shipper = make_shipper(
        fast_settings(collector, spool_dir, max_batch_size=10, max_coalescing_delay=60)
    )
    for event in events("e", 25):
        shipper.enqueue(event)
    assert wait_until(lambda: len(collector.batches) >= 2)
    assert [len(b.ids) for b in collector.batches] == [10, 10]  # the last 5 wait for more
    assert shipper.flush(5)
    assert [len(b.ids) for b in collector.batches] == [10, 10, 5]
    assert collector.stored_ids() == {f"e-{i}" for i in range(25)}


def test_a_partial_batch_goes_after_the_coalescing_delay(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=0.05))
    for event in events("e", 3):
        shipper.enqueue(event)
    assert collector.wait_stored(3)  # no flush: the delay alone sent them
    assert [b.ids for b in collector.batches] == [["e-0", "e-1", "e-2"]]
    assert wait_until(lambda: shipper.stats()["sent"] == 3)
    stats = shipper.stats()
    assert (stats["enqueued"], stats["sent"], stats["accepted"], stats["lost"]) == (3, 3, 3, 0)


def test_batches_are_gzip_cloudevents_with_the_bearer_token(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("one", source=SOURCE))
    assert shipper.flush(5)
    headers = collector.batches[0].headers
    assert headers["authorization"] == f"Bearer {collector.token}"
    assert headers["content-type"] == "application/cloudevents-batch+json"
    assert headers["content-encoding"] == "gzip"
    assert collector.stored[(SOURCE, "one")] == usage_event("one", source=SOURCE)


def test_gzip_can_be_turned_off(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir, gzip=False))
    shipper.enqueue(usage_event("plain", source=SOURCE))
    assert shipper.flush(5)
    assert "content-encoding" not in collector.batches[0].headers
    assert collector.stored_ids() == {"plain"}


def test_source_is_stamped_only_into_events_without_one(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
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
    make_shipper: Callable[[ShippingSettings], Shipper],
    caplog: pytest.LogCaptureFixture,
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        shipper.enqueue({"id": "bad", "data": object()})
    assert shipper.stats()["lost"] == 1
    assert any("events_lost" in r.getMessage() for r in caplog.records)


# -- answers from the collector ------------------------------------------------------------------


def test_server_errors_are_retried_until_delivered(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.fail_next, collector.fail_status_next = 3, 500
    shipper = make_shipper(fast_settings(collector, spool_dir))
    for event in events("e", 5):
        shipper.enqueue(event)
    assert collector.wait_stored(5)
    assert [b.status for b in collector.batches[:3]] == [500, 500, 500]
    assert wait_until(lambda: shipper.stats()["replayed"] == 5)
    stats = shipper.stats()
    assert stats["retries"] == 3
    assert stats["accepted"] == 5
    assert stats["lost"] == 0
    # The failed batch waited in the spool and was replayed from there.
    assert stats["spooled"] == stats["replayed"] == 5


def test_a_dead_collector_port_is_retried_until_it_comes_back(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir))
    for event in events("e", 4):
        shipper.enqueue(event)
    assert wait_until(lambda: shipper.stats()["retries"] >= 3)
    assert shipper.stats()["accepted"] == 0
    collector.start()
    assert collector.wait_stored(4)
    assert shipper.stats()["lost"] == 0


def test_auth_failures_keep_the_events_and_log_errors(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: Callable[[ShippingSettings], Shipper],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A wrong token is a config error: it must not cost usage once it is fixed."""
    collector.token = "rotated"
    shipper = make_shipper(fast_settings(collector, spool_dir, collector_token="old"))
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 3):
            shipper.enqueue(event)
        assert wait_until(lambda: any(b.status == 401 for b in collector.batches))
        assert wait_until(lambda: shipper.stats()["retries"] >= 2)
    assert any("collector_refused_token" in r.getMessage() for r in caplog.records)
    assert collector.stored_ids() == set()
    collector.token = "old"
    assert collector.wait_stored(3)
    assert shipper.stats()["lost"] == 0


def test_413_splits_the_batch_until_it_fits(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.max_batch_events = 3
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    for event in events("e", 10):
        shipper.enqueue(event)
    assert shipper.flush(5)
    assert collector.stored_ids() == {f"e-{i}" for i in range(10)}
    assert all(len(b.ids) <= 3 for b in collector.accepted_batches())
    assert collector.batches[0].status == 413
    stats = shipper.stats()
    assert (stats["accepted"], stats["duplicates"], stats["retries"], stats["lost"]) == (
        10,
        0,
        0,
        0,
    )


def test_an_event_too_large_on_its_own_is_rejected_and_the_rest_delivered(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.too_large_ids = {"e-2"}
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    for event in events("e", 5):
        shipper.enqueue(event)
    assert shipper.flush(5)
    assert collector.stored_ids() == {"e-0", "e-1", "e-3", "e-4"}
    assert shipper.stats()["rejected"] == 1


def test_rejected_events_are_logged_with_reasons_and_not_retried(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: Callable[[ShippingSettings], Shipper],
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
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    shipper = make_shipper(fast_settings(collector, spool_dir))
    shipper.enqueue(usage_event("same", source=SOURCE))
    assert shipper.flush(5)
    shipper.enqueue(usage_event("same", source=SOURCE))
    assert shipper.flush(5)
    stats = shipper.stats()
    assert (stats["accepted"], stats["duplicates"]) == (1, 1)


# -- the spool path ------------------------------------------------------------------------------


def test_a_down_collector_sends_batches_to_the_spool_and_replays_them_oldest_first(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.stop()
    shipper = make_shipper(fast_settings(collector, spool_dir, max_coalescing_delay=60))
    for group in ("a", "b", "c"):
        for event in events(group, 4):
            shipper.enqueue(event)
        assert shipper.flush(5)  # the collector is failing: memory goes to disk
    assert shipper.stats()["in_memory"] == 0
    on_disk = spooled_ids(spool_dir)
    assert sorted(id_ for batch in on_disk for id_ in batch) == sorted(
        f"{g}-{i}" for g in "abc" for i in range(4)
    )
    collector.start()
    assert collector.wait_stored(12)
    assert wait_until(lambda: shipper.stats()["replayed"] == 12)
    delivered = [b.ids[0][0] for b in collector.accepted_batches()]
    assert delivered == sorted(delivered)  # a's batch, then b's, then c's
    stats = shipper.stats()
    assert stats["spooled"] == stats["replayed"] == 12
    assert (stats["accepted"], stats["duplicates"], stats["lost"]) == (12, 0, 0)
    assert list(spool_dir.glob("*.json.gz")) == []


def test_memory_overflow_goes_to_the_spool_while_the_sender_is_stuck(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.delay = 1.0
    shipper = make_shipper(
        fast_settings(collector, spool_dir, max_batch_size=5, max_entries=10, timeout=5)
    )
    for event in events("a", 5):
        shipper.enqueue(event)
    assert wait_until(lambda: shipper.stats()["queued"] == 0)  # taken: a slow POST
    for event in events("b", 11):  # the 11th finds memory full
        shipper.enqueue(event)
    assert wait_until(lambda: shipper.stats()["spooled"] == 10)
    assert shipper.stats()["lost"] == 0
    assert spooled_ids(spool_dir) == [
        [f"b-{i}" for i in range(5)],
        [f"b-{i}" for i in range(5, 10)],
    ]
    collector.delay = 0
    assert collector.wait_stored(16)
    assert wait_until(lambda: shipper.stats()["replayed"] == 10)
    stats = shipper.stats()
    assert (stats["lost"], stats["replayed"], stats["accepted"]) == (0, 10, 16)


def test_past_the_spool_bound_every_lost_event_is_counted_and_logged(
    collector: FakeCollector,
    spool_dir: Path,
    make_shipper: Callable[[ShippingSettings], Shipper],
    caplog: pytest.LogCaptureFixture,
) -> None:
    collector.stop()
    shipper = make_shipper(
        fast_settings(collector, spool_dir, max_batch_size=5, max_entries=10, spool_max_bytes=1)
    )
    with caplog.at_level(logging.ERROR, logger="token_meter_plugin"):
        for event in events("e", 50):
            shipper.enqueue(event)
            stats = shipper.stats()
            assert stats["lost"] + stats["in_memory"] == stats["enqueued"]  # none unaccounted
        assert wait_until(lambda: shipper.stats()["in_memory"] <= 15)
    stats = shipper.stats()
    assert stats["lost"] >= 35
    assert stats["spooled"] == 0
    assert stats["lost"] + stats["in_memory"] == 50
    messages = [r.getMessage() for r in caplog.records]
    assert any("spool_full" in m for m in messages)
    assert any("events_lost" in m for m in messages)
    collector.start()
    assert collector.wait_stored(50 - stats["lost"])
    assert wait_until(lambda: shipper.stats()["in_memory"] == 0)
    assert len(collector.stored) == 50 - stats["lost"]


def test_close_spools_what_a_hung_collector_did_not_take(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.delay = 3
    shipper = make_shipper(fast_settings(collector, spool_dir, timeout=10))
    for event in events("e", 7):
        shipper.enqueue(event)
    assert wait_until(lambda: shipper.stats()["in_flight"] == 7)  # the POST hangs
    shipper.close(timeout=0.3)
    assert sorted(i for batch in spooled_ids(spool_dir) for i in batch) == sorted(
        f"e-{i}" for i in range(7)
    )


def test_a_spool_left_by_a_crashed_process_is_replayed_by_the_next(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    """A process that spooled events and died without closing loses nothing."""
    script = textwrap.dedent(
        f"""
        import os
        from token_meter_plugin.shipping import Shipper, ShippingSettings
        settings = ShippingSettings(
            "http://127.0.0.1:9", "t", spool_dir={str(spool_dir)!r},
            initial_retry_delay=0.01, max_retry_delay=0.02, max_coalescing_delay=0.01,
        )
        shipper = Shipper(settings)
        for i in range(6):
            shipper.enqueue({{"id": f"crash-{{i}}", "source": "s", "subject": "alice"}})
        assert shipper.flush(10), shipper.stats()
        os._exit(0)  # no close, no atexit: like a crash
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    assert spooled_ids(spool_dir)
    shipper = make_shipper(fast_settings(collector, spool_dir))
    assert collector.wait_stored(6)
    assert collector.stored_ids() == {f"crash-{i}" for i in range(6)}
    assert wait_until(lambda: shipper.stats()["replayed"] == 6)
    assert list(spool_dir.glob("*.json.gz")) == []


def test_a_second_shipper_on_the_same_spool_dir_uses_a_sibling(
    collector: FakeCollector, spool_dir: Path, make_shipper: Callable[[ShippingSettings], Shipper]
) -> None:
    collector.stop()
    first = make_shipper(fast_settings(collector, spool_dir))
    first.enqueue(usage_event("first", source=SOURCE))
    assert first.flush(5)  # spooled: the first shipper holds the directory
    second = make_shipper(fast_settings(collector, spool_dir))
    second.enqueue(usage_event("second", source=SOURCE))
    assert second.flush(5)
    assert spooled_ids(spool_dir) == [["first"]]
    assert spooled_ids(spool_dir.with_name("spool.1")) == [["second"]]


# -- one shipper per process ---------------------------------------------------------------------


@pytest.fixture
def clean_registry() -> Iterator[None]:
    shutdown_all(timeout=0.5)
    yield
    shutdown_all(timeout=0.5)


def test_get_shipper_returns_one_shipper_per_collector_and_token(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    settings = fast_settings(collector, spool_dir)
    shipper = get_shipper(settings)
    assert get_shipper(settings) is shipper
    pushed = fast_settings(collector, spool_dir, max_batch_size=7)  # a config push
    assert get_shipper(pushed) is shipper
    assert shipper.settings is pushed
    other = get_shipper(
        fast_settings(collector, spool_dir.with_name("other"), collector_token="other")
    )
    assert other is not shipper


def test_a_forked_child_gets_its_own_shipper_that_delivers(
    collector: FakeCollector, spool_dir: Path, clean_registry: None
) -> None:
    settings = fast_settings(collector, spool_dir)
    parent = get_shipper(settings)
    parent.enqueue(usage_event("from-parent", source=SOURCE))
    assert parent.flush(5)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report through the pipe, never return into pytest
        status = 1
        try:
            child = get_shipper(settings)
            parent.enqueue(usage_event("via-stale-reference", source=SOURCE))
            child.enqueue(usage_event("from-child", source=SOURCE))
            ok = child is not parent and child.pid == os.getpid() and child.flush(5)
            os.write(write_end, b"ok" if ok else b"no")
            status = 0
        finally:
            os._exit(status)
    os.close(write_end)
    _, status = os.waitpid(pid, 0)
    answer = os.read(read_end, 2)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"ok"
    assert {"from-parent", "from-child", "via-stale-reference"} <= collector.stored_ids()
    assert get_shipper(settings) is parent  # the parent's own is untouched


def test_pid_change_recreates_the_shipper(
    collector: FakeCollector,
    spool_dir: Path,
    clean_registry: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = fast_settings(collector, spool_dir)
    first = get_shipper(settings)
    monkeypatch.setattr(shipping, "_registry_pid", -1)  # as if this were a forked child
    second = get_shipper(settings)
    assert second is not first
    assert get_shipper(settings) is second
    first.close(timeout=0.5)


def test_spool_module_is_what_shipper_uses(spool_dir: Path) -> None:
    """The shipper's batch files are plain spool batches (gzip'd JSON arrays)."""
    spool = Spool.open(spool_dir, 1024)
    try:
        batch = spool.write(gzip.compress(b'[{"id": "x"}]'), 1)
        assert batch is not None
        assert spooled_ids(spool_dir) == [["x"]]
    finally:
        spool.close()


# -- shutdown ------------------------------------------------------------------------------------


def run_python(script: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        timeout=60,
        capture_output=True,
        text=True,
        check=False,
    )


def enqueue_script(fake: FakeCollector, spool_dir: Path, ending: str) -> str:
    return f"""
        import os, signal, time
        from token_meter_plugin.shipping import (
            ShippingSettings, get_shipper, install_sigterm_handler,
        )
        assert install_sigterm_handler()
        settings = ShippingSettings(
            {fake.url!r}, {fake.token!r}, spool_dir={str(spool_dir)!r},
            max_coalescing_delay=60, initial_retry_delay=0.01, max_retry_delay=0.02,
        )
        shipper = get_shipper(settings)
        for i in range(3):
            shipper.enqueue({{"id": f"bye-{{i}}", "source": "s", "subject": "alice"}})
        {ending}
        """


def test_events_in_memory_are_delivered_when_the_interpreter_exits(
    collector: FakeCollector, spool_dir: Path
) -> None:
    result = run_python(enqueue_script(collector, spool_dir, "pass"))
    assert result.returncode == 0, result.stderr
    assert collector.stored_ids() == {"bye-0", "bye-1", "bye-2"}
    assert result.stdout == ""  # stdout belongs to Kong's -dump


@pytest.mark.parametrize("collector_up", [True, False])
def test_sigterm_delivers_or_spools_memory_then_ends_the_process(
    collector: FakeCollector, spool_dir: Path, collector_up: bool
) -> None:
    if not collector_up:
        collector.stop()
    ending = "os.kill(os.getpid(), signal.SIGTERM); time.sleep(30); os._exit(3)"
    result = run_python(enqueue_script(collector, spool_dir, ending))
    assert result.returncode == -15, result.stderr  # the default action still ends it
    ids = {"bye-0", "bye-1", "bye-2"}
    if collector_up:
        assert collector.stored_ids() == ids
    else:
        assert {i for batch in spooled_ids(spool_dir) for i in batch} == ids
