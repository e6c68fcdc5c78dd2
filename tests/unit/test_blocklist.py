"""Blocklist: long poll with ETags, atomic swaps, staleness policy, one per process."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.harness.collector import FakeCollector, wait_until
from token_meter_plugin.block_answer import (
    BLOCKLIST_UNAVAILABLE,
    INSUFFICIENT_CREDITS,
    QUOTA_EXCEEDED,
)
from token_meter_plugin.blocklist import (
    MAX_POLL_RETRY_DELAY,
    Blocklist,
    BlocklistSettings,
    close_all,
    get_blocklist,
)
from token_meter_plugin.config import TOKEN_METER, PluginConfig


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        fake.blocklist_entries = [{"consumer": "broke", "reason": INSUFFICIENT_CREDITS}]
        yield fake


def fast_settings(fake: FakeCollector, **overrides: Any) -> BlocklistSettings:
    values: dict[str, Any] = {
        "collector_url": fake.url,
        "collector_token": fake.token,
        "blocklist_max_stale": 4.0,  # polls held 2 s
        "timeout": 2.0,
        "initial_retry_delay": 0.01,
        "max_retry_delay": 0.05,
    }
    values.update(overrides)
    return BlocklistSettings(**values)


@pytest.fixture
def make_blocklist() -> Iterator[Callable[[BlocklistSettings], Blocklist]]:
    made: list[Blocklist] = []

    def make(settings: BlocklistSettings) -> Blocklist:
        blocklist = Blocklist(settings)
        made.append(blocklist)
        return blocklist

    yield make
    for blocklist in made:
        blocklist.close()


def test_settings_are_the_configs_with_the_long_poll_derived_from_the_staleness_bound() -> None:
    """No rules of their own: any staleness bound works, the poll held half as long (at most
    30 s), so a poll that sees no change renews the list before it is stale."""
    config = PluginConfig.from_kong(
        TOKEN_METER, {"collector_url": "http://c:8787", "collector_token": "t"}
    )
    settings = BlocklistSettings.of(config)
    assert settings == BlocklistSettings("http://c:8787", "t")  # defaults: the config's
    assert (settings.blocklist_max_stale, settings.fail_open, settings.wait) == (60.0, True, 30.0)
    assert BlocklistSettings("u", "t", blocklist_max_stale=3).wait == 1.5
    assert BlocklistSettings("u", "t", blocklist_max_stale=600).wait == 30
    # A failed poll is retried soon whatever the delivery backoff allows.
    assert settings.poll_retry_cap == MAX_POLL_RETRY_DELAY < config.max_retry_delay
    assert BlocklistSettings("u", "t", max_retry_delay=0.5).poll_retry_cap == 0.5


def test_check_returns_the_reason_of_a_listed_consumer_only(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    blocklist = make_blocklist(fast_settings(collector))
    assert wait_until(lambda: blocklist.snapshot().version == 1)
    assert blocklist.check("broke") == INSUFFICIENT_CREDITS
    assert blocklist.check("rich") is None
    first = collector.polls[0]
    assert first.headers["authorization"] == f"Bearer {collector.token}"
    assert "if-none-match" not in first.headers
    assert first.query["wait"] == ["2"]  # half of blocklist_max_stale


def test_the_long_poll_sends_the_known_version_and_sees_changes_at_once(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    blocklist = make_blocklist(fast_settings(collector, blocklist_max_stale=60))
    assert wait_until(lambda: blocklist.snapshot().version == 1)
    assert wait_until(lambda: len(collector.polls) == 1 and blocklist.check("broke") is not None)
    time.sleep(0.1)  # the second poll is now parked in the fake, waiting for a change
    version = collector.set_blocklist([{"consumer": "heavy", "reason": QUOTA_EXCEEDED}])
    # Well before the 30 s wait ends: the parked poll answered as soon as the version moved.
    assert wait_until(lambda: blocklist.check("heavy") == QUOTA_EXCEEDED, timeout=5)
    assert blocklist.check("broke") is None
    assert blocklist.snapshot().version == version
    assert collector.polls[1].headers["if-none-match"] == '"1"'


def test_a_304_keeps_the_list_and_refreshes_its_age(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    blocklist = make_blocklist(fast_settings(collector, blocklist_max_stale=0.4))
    assert wait_until(lambda: any(p.status == 304 for p in collector.polls))
    first = blocklist.snapshot()
    assert wait_until(lambda: (blocklist.snapshot().refreshed_at or 0) > (first.refreshed_at or 0))
    assert blocklist.snapshot().entries is first.entries
    assert blocklist.check("broke") == INSUFFICIENT_CREDITS
    assert blocklist.stats()["unchanged"] >= 1


def test_a_collector_that_answers_304_at_once_is_not_hammered(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    collector.honour_wait = False
    make_blocklist(fast_settings(collector, blocklist_max_stale=60))
    time.sleep(0.5)
    assert 1 <= len(collector.polls) <= 3


def test_readers_always_see_one_whole_version(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    """Updates swap the whole list: never half of one version and half of another."""
    both = [
        {"consumer": "a", "reason": QUOTA_EXCEEDED},
        {"consumer": "b", "reason": QUOTA_EXCEEDED},
    ]
    collector.blocklist_entries = both
    blocklist = make_blocklist(fast_settings(collector))
    assert wait_until(lambda: blocklist.check("a") is not None)
    torn: list[Any] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            entries = blocklist.snapshot().entries
            if ("a" in entries) != ("b" in entries):
                torn.append(dict(entries))

    reader = threading.Thread(target=read)
    reader.start()
    seen: set[int] = set()
    for i in range(20):
        version = collector.set_blocklist([] if i % 2 == 0 else both)

        def caught_up(wanted: int = version) -> bool:
            return blocklist.snapshot().version == wanted

        assert wait_until(caught_up, timeout=5)
        seen.add(len(blocklist.snapshot().entries))
    stop.set()
    reader.join()
    assert torn == []
    assert seen == {0, 2}
    with pytest.raises(TypeError):
        blocklist.snapshot().entries["c"] = QUOTA_EXCEEDED  # type: ignore[index]  # immutable


def test_errors_are_retried_with_backoff_until_the_list_arrives(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    collector.blocklist_status = 500
    blocklist = make_blocklist(fast_settings(collector))
    assert wait_until(lambda: len(collector.polls) >= 3)
    assert blocklist.check("broke") is None  # fail-open, nothing known yet
    collector.blocklist_status = None
    assert wait_until(lambda: blocklist.check("broke") == INSUFFICIENT_CREDITS)
    assert blocklist.stats()["errors"] >= 3


def test_before_the_first_list_fail_open_lets_through_and_fail_closed_blocks(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    collector.stop()
    open_ = make_blocklist(fast_settings(collector))
    closed = make_blocklist(fast_settings(collector, fail_open=False))
    assert open_.check("broke") is None
    assert closed.check("broke") == BLOCKLIST_UNAVAILABLE
    assert closed.check("anyone") == BLOCKLIST_UNAVAILABLE


@pytest.mark.parametrize("fail_open", [True, False])
def test_a_stale_list(
    collector: FakeCollector,
    make_blocklist: Callable[[BlocklistSettings], Blocklist],
    fail_open: bool,
) -> None:
    """Stale: fail-open keeps the last list (no one else blocked); fail-closed blocks all."""
    blocklist = make_blocklist(
        fast_settings(collector, blocklist_max_stale=0.3, fail_open=fail_open)
    )
    assert wait_until(lambda: blocklist.check("broke") == INSUFFICIENT_CREDITS)
    assert blocklist.check("rich") is None
    collector.stop()
    assert wait_until(blocklist.is_stale)
    if fail_open:
        assert blocklist.check("broke") == INSUFFICIENT_CREDITS
        assert blocklist.check("rich") is None
    else:
        assert blocklist.check("broke") == BLOCKLIST_UNAVAILABLE
        assert blocklist.check("rich") == BLOCKLIST_UNAVAILABLE
    collector.start()
    assert wait_until(lambda: not blocklist.is_stale())
    assert blocklist.check("rich") is None


# -- one blocklist per process -------------------------------------------------------------------


@pytest.fixture
def clean_registry() -> Iterator[None]:
    close_all()
    yield
    close_all()


def test_get_blocklist_is_one_per_collector_and_token_and_takes_config_pushes(
    collector: FakeCollector, clean_registry: None
) -> None:
    settings = fast_settings(collector)
    blocklist = get_blocklist(settings)
    assert get_blocklist(settings) is blocklist
    pushed = fast_settings(collector, fail_open=False)
    assert get_blocklist(pushed) is blocklist
    assert blocklist.settings is pushed
    assert get_blocklist(fast_settings(collector, collector_token="other")) is not blocklist
