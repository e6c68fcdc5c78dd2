"""The plugins as a real Kong runs them: large and chunked request bodies, restarts, a killed
server, many workers interleaving events, Lua errors that leave a handler without its Step.

Each test goes through the Kong-side harness (tests/harness/kong.py), which reproduces what
Kong 3.9 does in these situations; the harness's own tests (test_kong_harness.py) show that it
does, with plugins that rely on the wrong thing.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from typing import Any

import psutil
import pytest

from tests.factories import chat_request_body
from tests.harness.collector import FakeCollector
from tests.harness.gap import metered_requests, serving_pid
from tests.harness.kong import HarnessFactory, Outcome, ScriptedRequest
from tests.harness.traffic import chat_answer

MODES = pytest.mark.parametrize("mode", [(), ("-g",)], ids=["threading", "gevent"])

OPENAI_JSON = json.dumps(
    {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}}],
        "usage": {"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150},
    }
).encode()


def asks_for_usage(body: bytes | None) -> bool:
    assert body is not None
    return json.loads(body).get("stream_options", {}).get("include_usage") is True


@MODES
@pytest.mark.parametrize(
    ("size", "chunked"),
    [(2 * 1024, False), (20 * 1024, False), (2 * 1024 * 1024, False), (20 * 1024, True)],
    ids=["2KiB", "20KiB", "2MiB", "20KiB-chunked"],
)
def test_request_bodies_of_any_size_are_metered_and_get_stream_usage(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
    size: int,
    chunked: bool,
) -> None:
    """Over 8 KiB nginx keeps the body in a temp file: no call of the plugin may make Kong
    answer 500, and the streaming request still asks the upstream for usage."""
    harness = make_harness("token-meter-plugin", *mode)
    request = ScriptedRequest(
        body=chat_request_body(size), chunked=chunked, upstream_body=OPENAI_JSON
    )
    outcome = harness.request(request, plugin_config)
    assert outcome.status == 200, outcome.error_log
    assert outcome.phases == {"access": "ret", "response": "ret"}
    assert not outcome.error_log
    assert asks_for_usage(outcome.upstream_request_body)
    (event,) = collector.wait_for_events(1)
    assert event["data"]["total_tokens"] == 150


def test_a_body_declared_over_max_body_size_is_not_read_and_still_metered(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    config = plugin_config | {"max_body_size": 4096}
    outcome = harness.request(
        ScriptedRequest(body=chat_request_body(20 * 1024), upstream_body=OPENAI_JSON), config
    )
    assert outcome.status == 200
    assert "kong.request.get_raw_body" not in outcome.methods("access")
    assert outcome.set_body is None
    assert len(collector.wait_for_events(1)) == 1


def _subjects_by_request(collector: FakeCollector, count: int) -> dict[str, str]:
    events = collector.wait_for_events(count)
    return {e["data"]["route_name"]: e["subject"] for e in events}


def test_a_restart_never_runs_a_request_under_another_entitys_config(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """Kong keeps its instance ids across a respawn. Two plugin entities (routes) identify
    the customer by different consumer fields; after a SIGKILL and respawn, each route's
    requests still carry its own field, and no instance id of the new server repeats one of
    the old server's."""
    harness = make_harness("token-meter-plugin", workers=2)
    by_username = plugin_config | {"consumer_identifier": "username"}
    by_custom_id = plugin_config | {"consumer_identifier": "custom_id"}

    def run(route: str, config: dict[str, Any], worker: int) -> Outcome:
        request = ScriptedRequest(
            body=b"{}",
            upstream_body=OPENAI_JSON,
            route={"id": f"r-{route}", "name": route, "service": {"id": "s-1"}},
        )
        return harness.request(request, config, worker=worker, plugin_id=f"plugin-{route}")

    before: set[int] = set()
    # Instances started in an order that gives the two entities different ids in each worker.
    for worker, order in ((0, ("users", "customers")), (1, ("customers", "users"))):
        for route in order:
            config = by_username if route == "users" else by_custom_id
            outcome = run(route, config, worker)
            assert outcome.status == 200
            before.update(outcome.instance_ids.values())
    assert _subjects_by_request(collector, 4) == {"users": "alice", "customers": "cus_alice"}

    old_pid = harness.pid
    harness.kill_server()
    harness.wait_for_respawn(old_pid)
    collector.batches.clear()
    after: set[int] = set()
    for worker, order in ((0, ("customers", "users")), (1, ("users", "customers"))):
        for route in order:
            config = by_username if route == "users" else by_custom_id
            outcome = run(route, config, worker)
            assert outcome.status == 200, outcome.error_log
            after.update(outcome.instance_ids.values())
    assert _subjects_by_request(collector, 4) == {"users": "alice", "customers": "cus_alice"}
    assert min(after) > max(before)  # ids never repeat across server lifetimes
    assert max(after) < 2**53  # and stay exact in a Lua number


def test_the_server_announces_its_pid_so_kong_resets_its_instances(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    """After a respawn the first message on each new connection names the new pid, and the
    worker records it (and drops the ids it held). The event already sent under a stale id is
    answered "no plugin instance" and retried on a new instance, as Kong does."""
    harness = make_harness("token-meter-plugin")
    request = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
    first = harness.request(request, plugin_config, worker=0)
    assert harness.worker(0).instance_ids
    old_pid = harness.pid
    harness.kill_server()
    new_pid = harness.wait_for_respawn(old_pid)
    again = harness.request(request, plugin_config, worker=0)
    assert again.status == 200
    assert again.phases == {"access": "ret", "response": "ret"}
    assert set(again.instance_ids.values()).isdisjoint(first.instance_ids.values())
    # the pid announced is the serving process's, the child of the supervisor Kong started
    assert new_pid != old_pid and harness.worker(0).server_pid == serving_pid(harness)


@MODES
def test_a_sigkilled_server_loses_no_event_it_accepted(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    """The collector is down; every request's handler returned (the event is journaled); the
    server is SIGKILLed; its successor delivers every event exactly once when the collector is
    back."""
    harness = make_harness("token-meter-plugin", *mode)
    collector.fail_status = 503
    config = plugin_config | {"initial_retry_delay": 0.05, "max_retry_delay": 0.2}
    sent = 60
    for n in range(sent):
        request = ScriptedRequest(body=b"{}", upstream_body=chat_answer(n))
        outcome = harness.request(request, config)
        assert outcome.ran_the_plugin, outcome.error_log
    old_pid = harness.pid
    harness.kill_server()
    harness.wait_for_respawn(old_pid)
    collector.fail_status = None
    # The successor opens its journal with its first instance: a request that runs the plugin
    # starts it. Not always the first one sent: a request can still meet a connection to the
    # dead server, and Kong then proxies it without the plugin ("skipped"), as it would.
    after = sent
    for _ in range(50):
        outcome = harness.request(
            ScriptedRequest(body=b"{}", upstream_body=chat_answer(after)), config
        )
        after += 1
        if outcome.ran_the_plugin:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"the plugin did not run again: {outcome.phases}, {outcome.error_log}")
    events = collector.wait_for_events(sent + 1, timeout=30)
    metered = metered_requests(events)
    assert set(range(sent)) <= metered.keys()  # every event journaled before the kill
    assert max(metered.values()) == 1  # each once
    assert max(Counter(e["id"] for e in events).values()) == 1


@MODES
def test_four_workers_with_eight_concurrent_requests_each_are_metered_exactly(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    """Kong's real interleaving: an instance per worker, every RPC message on its own pooled
    connection, 32 requests in flight at once, half with bodies in temp files."""
    harness = make_harness("token-meter-plugin", *mode, workers=4)
    per_thread = 6
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def client(worker: int, index: int) -> None:
        for n in range(per_thread):
            size = 20 * 1024 if (index + n) % 2 else 2 * 1024
            request = ScriptedRequest(body=chat_request_body(size), upstream_body=OPENAI_JSON)
            outcome = harness.request(request, plugin_config, worker=worker)
            with lock:
                outcomes.append(outcome)

    threads = [
        threading.Thread(target=client, args=(worker, index))
        for worker in range(4)
        for index in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    total = 4 * 8 * per_thread
    assert len(outcomes) == total
    assert Counter(o.status for o in outcomes) == {200: total}
    assert all(asks_for_usage(o.upstream_request_body) for o in outcomes)
    assert len({c for o in outcomes for c in o.connections}) > 8  # really many connections
    events = collector.wait_for_events(total, timeout=30)
    assert len({e["id"] for e in events}) == total == len(events)
    assert sum(e["data"]["total_tokens"] for e in events) == 150 * total
    instance_ids = {o.worker: o.instance_ids["access"] for o in outcomes}
    assert len(set(instance_ids.values())) == 4  # one instance per worker


def test_a_handler_left_without_its_step_gives_up_and_frees_its_thread(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    """A PDK answer Kong cannot pack (a nil raw body) fails the request with a 500 and Kong
    sends no further Step: the handler stops waiting after --handler-timeout."""
    harness = make_harness("token-meter-plugin", "--handler-timeout", "1")
    request = ScriptedRequest(
        body=b"{}",
        upstream_body=OPENAI_JSON,
        overrides={"kong.service.response.get_raw_body": None},
    )
    good = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
    for _ in range(5):  # instance, sender, poller and pooled connections' threads all started
        harness.request(good, plugin_config)
    serving = psutil.Process(serving_pid(harness))  # not the supervisor Kong started
    idle = serving.num_threads()
    for _ in range(5):
        outcome = harness.request(request, plugin_config)
        assert outcome.status == 500
        assert outcome.phases["response"] == "error"
    deadline = time.monotonic() + 15
    while "event_abandoned" not in harness.log_text():
        assert time.monotonic() < deadline, harness.log_text()[-2000:]
        time.sleep(0.1)
    while serving.num_threads() > idle + 1:
        assert time.monotonic() < deadline, "handler threads were never freed"
        time.sleep(0.1)
    ok = harness.request(good, plugin_config)
    assert ok.status == 200


@pytest.mark.parametrize(
    ("path", "shape"),
    [("/anthropic/v1/messages", "anthropic"), ("/v1/chat/completions", "openai")],
)
def test_a_blocked_consumer_gets_the_error_shape_of_the_api_it_called(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    path: str,
    shape: str,
) -> None:
    harness = make_harness("token-meter-plugin")
    collector.block("alice", "insufficient_credits")
    request = ScriptedRequest(path=path, body=b"{}", upstream_body=OPENAI_JSON)
    deadline = time.monotonic() + 15
    outcome = harness.request(request, plugin_config)
    while outcome.exit_status is None and time.monotonic() < deadline:
        time.sleep(0.05)
        outcome = harness.request(request, plugin_config)
    assert outcome.status == 402
    assert not outcome.upstream_called
    body = outcome.exit_json()
    if shape == "anthropic":
        assert body["type"] == "error"
        assert body["error"]["type"] == "billing_error"
    else:
        assert body["error"]["code"] == "insufficient_credits"
    assert outcome.exit_headers is not None
    assert outcome.exit_headers["x-should-retry"] == "false"


def test_an_event_that_cannot_be_built_is_counted_and_logged_as_lost(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """A consumer name over the collector's 256 characters: never cut to fit, never swallowed
    by a generic handler error."""
    harness = make_harness("token-meter-plugin")
    long_name = {"id": "c-long", "username": "x" * 300}
    outcome = harness.request(
        ScriptedRequest(body=b"{}", consumer=long_name, upstream_body=OPENAI_JSON), plugin_config
    )
    assert outcome.status == 200
    harness.request(ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON), plugin_config)
    (event,) = collector.wait_for_events(1)
    assert event["subject"] == "alice"
    log = harness.log_text()
    assert "events_lost" in log and "subject is longer than 256" in log
    assert "phase_failed" not in log


def test_while_the_server_is_down_a_new_entity_gets_500_and_a_held_id_skips_the_plugin(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """What Kong does, and why a killed server must come back fast: a worker that holds an id
    proxies unmetered; a worker that must start an instance answers 500."""
    harness = make_harness("token-meter-plugin", workers=2, respawn=False)
    request = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
    assert harness.request(request, plugin_config, worker=0).status == 200
    old_pid = harness.pid
    harness.kill_server()
    held = harness.request(request, plugin_config, worker=0)
    assert held.status == 200 and held.skipped and held.upstream_called
    fresh = harness.request(request, plugin_config, worker=1)
    assert fresh.status == 500 and not fresh.upstream_called
    harness.respawn_server()
    harness.wait_for_respawn(old_pid)
    for worker in (0, 1):
        assert harness.request(request, plugin_config, worker=worker).status == 200
    # the first request and the two after the respawn; the skipped one was never seen
    deadline = time.monotonic() + 15
    while len({e["id"] for e in collector.events()}) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
