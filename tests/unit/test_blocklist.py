"""Blocklist: long poll with ETags, atomic swaps, staleness policy, and the blocked answer."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.fake_collector import FakeCollector, wait_until
from token_meter_plugin import blocklist as blocklist_module
from token_meter_plugin.blocklist import (
    BLOCKLIST_UNAVAILABLE,
    INSUFFICIENT_CREDITS,
    PAYMENT_OVERDUE,
    QUOTA_EXCEEDED,
    Blocklist,
    BlocklistSettings,
    SettingsError,
    block_response,
    close_all,
    get_blocklist,
    is_anthropic_path,
)


@pytest.fixture
def collector() -> Iterator[FakeCollector]:
    with FakeCollector() as fake:
        fake.blocklist_entries = [{"consumer": "broke", "reason": INSUFFICIENT_CREDITS}]
        yield fake


def fast_settings(fake: FakeCollector, **overrides: Any) -> BlocklistSettings:
    values: dict[str, Any] = {
        "collector_url": fake.url,
        "collector_token": fake.token,
        "blocklist_wait": 2,
        "blocklist_max_stale": 5.0,
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


def test_settings_reject_a_staleness_shorter_than_the_long_poll() -> None:
    with pytest.raises(SettingsError) as raised:
        BlocklistSettings("http://c:8787", "t", blocklist_wait=30, blocklist_max_stale=20)
    assert "blocklist_max_stale" in str(raised.value)
    defaults = BlocklistSettings("http://c:8787", "t")
    assert (defaults.blocklist_wait, defaults.blocklist_max_stale, defaults.fail_open) == (
        30,
        60.0,
        True,
    )


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
    assert first.query["wait"] == ["2"]


def test_the_long_poll_sends_the_known_version_and_sees_changes_at_once(
    collector: FakeCollector, make_blocklist: Callable[[BlocklistSettings], Blocklist]
) -> None:
    blocklist = make_blocklist(fast_settings(collector, blocklist_wait=30, blocklist_max_stale=60))
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
    blocklist = make_blocklist(fast_settings(collector, blocklist_wait=0, blocklist_max_stale=1))
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
    make_blocklist(fast_settings(collector, blocklist_wait=30, blocklist_max_stale=60))
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
        fast_settings(collector, blocklist_wait=0, blocklist_max_stale=0.3, fail_open=fail_open)
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


def test_pid_change_recreates_the_blocklist_with_the_last_known_list(
    collector: FakeCollector, clean_registry: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = fast_settings(collector)
    first = get_blocklist(settings)
    assert wait_until(lambda: first.check("broke") == INSUFFICIENT_CREDITS)
    monkeypatch.setattr(blocklist_module, "_registry_pid", -1)  # as if in a forked child
    second = get_blocklist(settings)
    assert second is not first
    assert second.check("broke") == INSUFFICIENT_CREDITS  # inherited until its own poll
    first.close()


def test_a_forked_child_polls_for_itself(collector: FakeCollector, clean_registry: None) -> None:
    settings = fast_settings(collector)
    parent = get_blocklist(settings)
    assert wait_until(lambda: parent.check("broke") == INSUFFICIENT_CREDITS)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child = get_blocklist(settings)
            ok = (
                child is not parent
                and child.pid == os.getpid()
                and wait_until(lambda: parent.check("child-only") == QUOTA_EXCEEDED, 5)
            )
            os.write(write_end, b"ok" if ok else b"no")
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    # The fake serves from this process: change the list here; the child must see it by itself.
    collector.set_blocklist([{"consumer": "child-only", "reason": QUOTA_EXCEEDED}])
    _, status = os.waitpid(pid, 0)
    answer = os.read(read_end, 2)
    os.close(read_end)
    assert os.waitstatus_to_exitcode(status) == 0
    assert answer == b"ok"


# -- the answer to a blocked consumer ------------------------------------------------------------


@pytest.mark.parametrize(
    ("reason", "status", "error_type"),
    [
        (INSUFFICIENT_CREDITS, 402, "insufficient_quota"),
        (QUOTA_EXCEEDED, 429, "insufficient_quota"),
    ],
)
def test_block_response_is_an_openai_error_the_sdk_does_not_retry(
    reason: str, status: int, error_type: str
) -> None:
    code, body, headers = block_response(reason)
    assert code == status
    error = json.loads(body)["error"]
    assert error["type"] == error_type
    assert error["code"] == reason
    assert error["param"] is None
    assert len(error["message"]) > 20
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Token-Meter-Reason"] == reason
    assert headers["x-should-retry"] == "false"


def test_an_unavailable_blocklist_answers_503_that_may_be_retried() -> None:
    code, body, headers = block_response(BLOCKLIST_UNAVAILABLE)
    assert code == 503
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", BLOCKLIST_UNAVAILABLE)
    assert headers["X-Token-Meter-Reason"] == BLOCKLIST_UNAVAILABLE
    assert headers["x-should-retry"] == "true"
    assert headers["Retry-After"] == "5"


def test_an_unknown_reason_still_blocks_with_402_and_cannot_inject_headers() -> None:
    """Contract 1: a reason the plugin does not know yet gets 402 with that code."""
    code, body, headers = block_response("account_suspended")
    assert code == 402
    assert json.loads(body)["error"]["code"] == "account_suspended"
    code, body, headers = block_response("evil\r\nSet-Cookie: x=1")
    assert code == 402
    assert headers["X-Token-Meter-Reason"] == "blocked"
    assert "\n" not in json.loads(body)["error"]["message"]


@pytest.mark.parametrize(
    ("reason", "status", "error_type"),
    [
        (INSUFFICIENT_CREDITS, 402, "billing_error"),
        (PAYMENT_OVERDUE, 402, "billing_error"),
        (QUOTA_EXCEEDED, 429, "rate_limit_error"),
        (BLOCKLIST_UNAVAILABLE, 503, "api_error"),
        ("account_suspended", 402, "billing_error"),
    ],
)
def test_block_response_on_an_anthropic_route_has_anthropics_error_shape(
    reason: str, status: int, error_type: str
) -> None:
    code, body, headers = block_response(reason, anthropic=True)
    assert code == status
    document = json.loads(body)
    assert set(document) == {"type", "error"}
    assert document["type"] == "error"
    assert document["error"]["type"] == error_type
    assert len(document["error"]["message"]) > 20
    assert headers["X-Token-Meter-Reason"] == reason


@pytest.mark.parametrize(
    ("path", "anthropic"),
    [
        ("/v1/messages", True),
        ("/anthropic/v1/messages", True),
        ("/v1/messages?beta=true", True),
        ("/v1/messages/count_tokens", True),
        ("/v1/chat/completions", False),
        ("/v1/threads/thread_1/messages", False),
        ("/v1/messages/batches", False),
        (None, False),
    ],
)
def test_anthropic_routes_are_told_by_their_path(path: object, anthropic: bool) -> None:
    assert is_anthropic_path(path) is anthropic
