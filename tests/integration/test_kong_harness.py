"""The Kong-side harness does what Kong 3.9 does, shown with small plugins that rely on the
wrong thing (tests/harness/faulty_plugin.py, served by the project's guarded server or, with
`--vanilla`, by bare kong-pdk).

Each test names the behaviour; the harness cites the Kong source of each (tests/harness/kong.py).
Timings are bounded loosely ("not before 0.9 s"), never asserted tightly.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness.kong import (
    CLIENT_BODY_BUFFER_SIZE,
    HarnessFactory,
    KongHarness,
    Outcome,
    RpcError,
    ScriptedRequest,
)
from tests.harness.paths import FAULTY_PLUGIN, REPO_ROOT

BIG = os.urandom(20 * 1024)  # over client_body_buffer_size: nginx keeps it in a temp file
SMALL = os.urandom(4 * 1024)  # fits the buffer: in memory


def faulty(behaviour: str, **extra: Any) -> dict[str, Any]:
    return {"behaviour": behaviour, **extra}


def assert_500_without_step(outcome: Outcome, *methods: str) -> None:
    """A Lua error: the client got a 500, the handler's last call never got its Step."""
    assert outcome.status == 500
    assert outcome.phases == {"access": "error"}
    assert not outcome.upstream_called
    assert outcome.methods() == list(methods)


# --- request bodies --------------------------------------------------------------------------


def test_a_temp_file_body_is_read_only_with_a_size_and_nil_is_a_500(
    make_harness: HarnessFactory,
) -> None:
    """get_raw_body() answers nil for a body over 8 KiB, which Kong cannot pack: 500, no Step.
    get_raw_body(0) reads it, get_raw_body(max) reads it when it is no larger than max."""
    assert CLIENT_BODY_BUFFER_SIZE == 8 * 1024
    harness = make_harness(FAULTY_PLUGIN)
    read = ("kong.client.get_consumer", "kong.request.get_raw_body")

    def send(body: bytes, config: dict[str, Any], *, chunked: bool = False) -> Outcome:
        return harness.request(ScriptedRequest(body=body, chunked=chunked), config)

    noarg = send(BIG, faulty("read_body_noarg"))
    assert_500_without_step(noarg, *read)
    assert noarg.logged("attempt to get length")
    assert send(BIG, faulty("read_body_max", max=0)).set_body == BIG  # 0: no limit
    assert_500_without_step(send(BIG, faulty("read_body_max", max=4096)), *read)
    assert send(BIG, faulty("read_body_max", max=len(BIG))).set_body == BIG
    assert_500_without_step(send(BIG, faulty("read_body_max", max="big")), *read)
    # in memory: read with or without a size, whatever the size says
    for config in (faulty("read_body_noarg"), faulty("read_body_max", max=10)):
        outcome = send(SMALL, config)
        assert outcome.status == 200 and outcome.set_body == SMALL
    # a chunked body is buffered the same way
    assert_500_without_step(send(BIG, faulty("read_body_noarg"), chunked=True), *read)
    assert send(b"x" * 100, faulty("read_body_noarg"), chunked=True).set_body == b"x" * 100
    assert send(b"", faulty("read_body_noarg")).set_body == b""


def test_request_headers_carry_content_length_or_chunked(make_harness: HarnessFactory) -> None:
    harness = make_harness(FAULTY_PLUGIN)

    def framing(request: ScriptedRequest) -> str:
        outcome = harness.request(request, faulty("echo_length"))
        (call,) = [c for c in outcome.pdk_calls if c.method == "kong.service.request.set_header"]
        return str(call.args[1])

    assert framing(ScriptedRequest(body=b"hello")) == "5|None"
    assert framing(ScriptedRequest(body=BIG, chunked=True)) == "None|chunked"


# --- Lua errors in PDK calls -------------------------------------------------------------------


LUA_ERRORS = [
    ("kong.service.response.get_raw_body", [], "function cannot be called in access phase"),
    ("kong.log.serialize", [], "function cannot be called in access phase"),
    ("kong.request.get_header", [42], "header name must be a string"),
    ("kong.request.get_headers", [5000], "max_headers must be <= 1000"),
    ("kong.request.get_headers", [0], "max_headers must be >= 1"),
    ("kong.service.request.set_raw_body", [None], "body must be a string"),
    ("kong.service.request.set_header", ["x-a", None], "invalid header value"),
    ("kong.response.exit", [99], "code must be a number between 100 and 599"),
    ("kong.response.exit", ["403"], "code must be a number"),
]


def test_a_lua_error_in_a_pdk_call_is_a_500_and_the_event_gets_no_step(
    make_harness: HarnessFactory,
) -> None:
    """Wrong phase, bad arguments: Kong raises, the client gets a 500, nothing answers Python."""
    harness = make_harness(FAULTY_PLUGIN)
    for method, args, error in LUA_ERRORS:
        outcome = harness.request(ScriptedRequest(), faulty("call", method=method, args=args))
        assert_500_without_step(outcome, "kong.client.get_consumer", method)
        assert outcome.logged(error), (method, args, outcome.error_log)
    wrong_phase = harness.request(ScriptedRequest(), faulty("wrong_phase"))
    assert_500_without_step(
        wrong_phase, "kong.client.get_consumer", "kong.service.response.get_raw_body"
    )
    # the same calls done right: a Step comes back and the handler goes on
    for method, args in (
        ("kong.request.get_headers", [10]),
        ("kong.request.get_header", ["content-type"]),
        ("kong.service.request.set_raw_body", [""]),
    ):
        outcome = harness.request(ScriptedRequest(), faulty("call", method=method, args=args))
        assert outcome.status == 200 and outcome.phases == {"access": "ret"}
        assert outcome.methods()[-1] == "kong.service.request.set_header"  # the call after it
    exited = harness.request(
        ScriptedRequest(), faulty("call", method="kong.response.exit", args=[403])
    )
    assert exited.status == 403 and exited.phases == {"access": "exit"}


def test_an_unknown_pdk_method_answers_nil(make_harness: HarnessFactory) -> None:
    harness = make_harness(FAULTY_PLUGIN)
    outcome = harness.request(ScriptedRequest(), faulty("call", method="kong.no.such_thing"))
    assert outcome.status == 200 and outcome.phases == {"access": "ret"}
    assert outcome.unknown_methods == ["kong.no.such_thing"]
    assert outcome.logged("could not find pdk method: kong.no.such_thing")
    assert outcome.methods()[-1] == "kong.service.request.set_header"


# --- instances --------------------------------------------------------------------------------


def tag_of(outcome: Outcome) -> str:
    (call,) = [c for c in outcome.pdk_calls if c.method == "kong.service.request.set_header"]
    return str(call.args[1])


@pytest.mark.parametrize(
    ("server", "tag_after_respawn"),
    [(("--vanilla",), "B"), ((), "A")],
    ids=["vanilla-kong-pdk", "guarded"],
)
def test_instance_ids_are_kept_across_a_respawn(
    make_harness: HarnessFactory, server: tuple[str, ...], tag_after_respawn: str
) -> None:
    """Worker 0 keeps its id for entity A when the server is SIGKILLed and respawned. Bare
    kong-pdk numbers instances from 0 again: worker 1 starts entity B first on the new server,
    gets that same id, and worker 0's next request for A runs under B's config. The guarded
    server's ids never repeat and it announces its pid: worker 0 starts A afresh."""
    harness = make_harness([*FAULTY_PLUGIN, *server], workers=2)
    config_a, config_b = faulty("tag", tag="A"), faulty("tag", tag="B")
    before = harness.request(ScriptedRequest(), config_a, worker=0)
    assert tag_of(before) == "A"
    held = before.instance_ids["access"]
    old_pid = harness.kill_server()
    harness.wait_for_respawn(old_pid)
    assert list(harness.worker(0).instance_ids().values()) == [held]
    other = harness.request(ScriptedRequest(), config_b, worker=1)
    assert tag_of(other) == "B"
    after = harness.request(ScriptedRequest(), config_a, worker=0)
    assert tag_of(after) == tag_after_respawn
    if tag_after_respawn == "B":
        assert after.instance_ids["access"] == held == other.instance_ids["access"]
    else:
        assert after.instance_ids["access"] != held


def test_a_server_pid_notification_with_a_new_pid_resets_that_workers_instances(
    make_harness: HarnessFactory, tmp_path: Path
) -> None:
    """The first pid a worker sees is recorded; another pid, read on a new connection before a
    response, drops every id that worker holds (the event in flight keeps its own)."""
    pid_file = tmp_path / "announced-pid"
    pid_file.write_text("1000")
    harness = make_harness(FAULTY_PLUGIN, "--announce-pid", str(pid_file), workers=2)
    ok = faulty("ok")
    a = harness.request(ScriptedRequest(), ok, worker=0).instance_ids["access"]
    b = harness.request(ScriptedRequest(), ok, worker=1).instance_ids["access"]
    assert a != b  # one instance per worker
    assert harness.worker(0).server_pid == harness.worker(1).server_pid == 1000
    again = harness.request(ScriptedRequest(), ok, worker=0)
    assert again.instance_ids["access"] == a  # the same pid changes nothing
    assert harness.worker(0).resets == []

    pid_file.write_text("2000")
    harness.close_connections(worker=0)  # its next message opens a connection: a notification
    in_flight = harness.request(ScriptedRequest(), ok, worker=0)
    assert in_flight.status == 200 and in_flight.instance_ids["access"] == a
    assert harness.worker(0).server_pid == 2000
    assert harness.worker(0).resets == ["serverPid 1000 -> 2000"]
    fresh = harness.request(ScriptedRequest(), ok, worker=0)
    assert fresh.instance_ids["access"] not in (a, b)
    assert not fresh.logged("no plugin instance")  # instance `a` still exists on the server
    untouched = harness.request(ScriptedRequest(), ok, worker=1)
    assert untouched.instance_ids["access"] == b
    assert harness.worker(1).server_pid == 1000 and harness.worker(1).resets == []


def test_no_plugin_instance_resets_this_worker_now_and_every_worker_later(
    make_harness: HarnessFactory,
) -> None:
    """The worker that gets "no plugin instance" starts a new instance and retries the event at
    once; the worker event reaches every worker (the poster too) only later."""
    harness = make_harness(FAULTY_PLUGIN, workers=2, worker_events_delay=3600)
    ok = faulty("ok")
    a = harness.request(ScriptedRequest(), ok, worker=0).instance_ids["access"]
    b = harness.request(ScriptedRequest(), ok, worker=1).instance_ids["access"]
    harness.close_instance(a)  # the server forgets it; worker 0 does not know

    retried = harness.request(ScriptedRequest(), ok, worker=0)
    assert retried.status == 200 and retried.phases == {"access": "ret"}
    assert retried.logged("no plugin instance")
    c = retried.instance_ids["access"]
    assert c not in (a, b)
    assert harness.request(ScriptedRequest(), ok, worker=1).instance_ids["access"] == b

    assert harness.deliver_worker_events() == 2  # one per worker
    d = harness.request(ScriptedRequest(), ok, worker=1).instance_ids["access"]
    e = harness.request(ScriptedRequest(), ok, worker=0).instance_ids["access"]
    assert d not in (a, b, c) and e not in (a, b, c, d)
    assert harness.worker(1).resets == ["worker event reset_instances from worker 0"]


def test_a_new_config_of_the_same_plugin_starts_a_new_instance_and_closes_the_old(
    make_harness: HarnessFactory,
) -> None:
    harness = make_harness(FAULTY_PLUGIN)
    first = harness.request(ScriptedRequest(), faulty("ok", v=1), plugin_id="p1")
    same = harness.request(ScriptedRequest(), faulty("ok", v=1), plugin_id="p1")
    assert same.instance_ids == first.instance_ids
    changed = harness.request(ScriptedRequest(), faulty("ok", v=2), plugin_id="p1")
    assert changed.instance_ids["access"] != first.instance_ids["access"]
    with pytest.raises(RpcError, match="no plugin instance"):
        harness.close_instance(first.instance_ids["access"])  # Kong closed it already


# --- a server down -------------------------------------------------------------------------------


def test_start_instance_failing_is_a_500_and_a_held_id_skips_the_plugin(
    make_harness: HarnessFactory,
) -> None:
    """Server down: the worker that holds an id logs the failure and proxies the request
    unmetered; the worker that must start an instance raises, and its client gets a 500."""
    harness = make_harness(FAULTY_PLUGIN, workers=2, respawn=False)
    ok = faulty("ok")
    assert harness.request(ScriptedRequest(), ok, worker=0).status == 200
    old_pid = harness.kill_server()

    held = harness.request(ScriptedRequest(), ok, worker=0)
    assert held.status == 200 and held.upstream_called
    assert held.skipped and held.phases == {"access": "skipped"}
    assert held.logged("trying to connect")
    fresh = harness.request(ScriptedRequest(), ok, worker=1)
    assert fresh.status == 500 and not fresh.upstream_called and not fresh.skipped
    assert fresh.phases == {"access": "error"}
    assert fresh.logged("starting instance")

    harness.respawn_server()
    harness.wait_for_respawn(old_pid)
    for worker in (0, 1):
        outcome = harness.request(ScriptedRequest(), ok, worker=worker)
        assert outcome.status == 200 and outcome.phases == {"access": "ret"}


def test_start_instance_answered_with_an_error_is_a_500(make_harness: HarnessFactory) -> None:
    harness = make_harness(FAULTY_PLUGIN)
    outcome = harness.request(ScriptedRequest(), faulty("raise_in_init"))
    assert outcome.status == 500 and outcome.phases == {"access": "error"}
    assert outcome.logged("starting instance") and outcome.logged("cannot start an instance")


def test_a_hang_is_skipped_after_the_timeout_when_not_strict(tmp_path: Path) -> None:
    """Kong gives up on a read after its timeout, logs it and goes on without the plugin (the
    default, strict harness raises RpcTimeout instead: a control test relies on it)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    harness = KongHarness(
        [*FAULTY_PLUGIN, "--vanilla"], tmp_path, env=env, timeout=1, raise_on_timeout=False
    )
    harness.start()
    try:
        outcome = harness.request(ScriptedRequest(), faulty("raise_first"))  # deadlocks it
        assert outcome.status == 200 and outcome.skipped
        assert outcome.phases == {"access": "skipped"} and outcome.logged("timeout")
    finally:
        harness.kill()


# --- process management -------------------------------------------------------------------------


@pytest.mark.parametrize("code", [3, 127])
def test_a_server_that_dies_young_is_respawned_a_second_after_its_start(
    tmp_path: Path, code: int
) -> None:
    """Exit 127 is logged as "command not found"; Kong 3.9's loop spawns it again all the same
    (its `break` leaves only the wait loop, Kong@3.9.x:kong/runloop/plugin_servers/process.lua)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    harness = KongHarness(FAULTY_PLUGIN, tmp_path, env=env, extra_args=["--exit-with", str(code)])
    harness.start(wait=False)
    try:
        deadline = time.monotonic() + 10
        while len(harness.spawns) < 2:
            assert time.monotonic() < deadline, harness.kong_log_text()
            time.sleep(0.05)
    finally:
        harness.kill()
    first, second = harness.spawns[:2]
    assert first.returncode == code
    assert first.exited_at is not None and first.exited_at - first.started_at < 0.9
    assert second.started_at - first.started_at >= 0.9  # not before a second after the start
    assert ('exited with "command not found"' in harness.kong_log_text()) == (code == 127)


def test_a_server_that_lived_over_a_second_is_respawned_at_once(
    make_harness: HarnessFactory,
) -> None:
    harness = make_harness(FAULTY_PLUGIN)
    first = harness.spawns[0]
    time.sleep(max(0.0, first.started_at + 1.1 - time.monotonic()))
    old_pid = harness.kill_server()
    new_pid = harness.wait_for_respawn(old_pid)
    second = harness.spawns[1]
    assert second.pid == new_pid != old_pid and first.returncode == -9
    assert first.exited_at is not None and second.started_at - first.exited_at < 0.9
    assert harness.request(ScriptedRequest(), faulty("ok")).status == 200


# --- workers and connections -------------------------------------------------------------------


def test_concurrent_requests_of_two_workers_interleave_over_many_connections(
    make_harness: HarnessFactory,
) -> None:
    """2 workers x 8 concurrent requests: each worker starts one instance of its own, the
    events hold connections at the same time, and one event's messages change connection."""
    harness = make_harness(FAULTY_PLUGIN, workers=2)
    outcomes: list[Outcome] = []
    lock = threading.Lock()

    def one(worker: int) -> None:
        outcome = harness.request(ScriptedRequest(), faulty("slow", seconds=0.3), worker=worker)
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=one, args=(i % 2,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert len(outcomes) == 16
    assert all(o.status == 200 and o.phases == {"access": "ret"} for o in outcomes)
    assert all(not o.error_log for o in outcomes)
    ids = {w: {o.instance_ids["access"] for o in outcomes if o.worker == w} for w in (0, 1)}
    assert len(ids[0]) == len(ids[1]) == 1 and ids[0] != ids[1]
    for worker in (0, 1):
        connections = {c for o in outcomes if o.worker == worker for c in o.connections}
        assert len(connections) >= 4
    assert any(len(set(o.connections)) > 1 for o in outcomes)
    assert not set(outcomes[0].connections) & {  # each worker has its own pool
        c for o in outcomes if o.worker != outcomes[0].worker for c in o.connections
    }
