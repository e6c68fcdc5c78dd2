"""Regression tests for the defects of kong-pdk 0.36 (unmaintained since 2023), one section each:
an exception in a handler, leaks around kong.response.exit, truncated large replies, bytes that
are not UTF-8, eager debug formatting, an orphaned server, Lua-style returns.

Faults are injected by a plugin that misbehaves on purpose (tests/harness/faulty_plugin.py, its
phases not wrapped in guard_phase, so the server's own guards are what is tested) and by the fake
Kong sending what real Kong sends. A control test runs the same fault on bare kong-pdk, to show
the harness does detect the defect. Timeouts only detect hangs; nothing here is timed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness.collector import FakeCollector
from tests.harness.kong import HarnessFactory, KongHarness, RpcTimeout, ScriptedRequest
from tests.harness.paths import FAULTY_PLUGIN, REPO_ROOT, VENV_BIN

MODES = pytest.mark.parametrize("mode", [(), ("-g",)], ids=["threading", "gevent"])


def faulty(behaviour: str) -> dict[str, Any]:
    return {"behaviour": behaviour}


# --- defect 1: an exception in a handler --------------------------------------------------------


@MODES
@pytest.mark.parametrize("behaviour", ["raise_first", "raise_later"])
def test_raising_handler_neither_hangs_nor_blocks_the_next_request(
    make_harness: HarnessFactory, mode: tuple[str, ...], behaviour: str
) -> None:
    harness = make_harness(FAULTY_PLUGIN, *mode)
    for _ in range(3):  # kong-pdk deadlocks the whole server on the first one
        outcome = harness.request(ScriptedRequest(), faulty(behaviour))
        assert outcome.phases == {"access": "ret"}
    ok = harness.request(ScriptedRequest(), faulty("ok"))
    assert ok.phases == {"access": "ret"}
    assert "RuntimeError" in harness.log_text()  # logged with its traceback


def test_control_bare_kong_pdk_deadlocks_on_an_early_exception(tmp_path: Path) -> None:
    """Without the guards the harness sees the hang (so the test above can fail)."""
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    harness = KongHarness([*FAULTY_PLUGIN, "--vanilla"], tmp_path, env=env, timeout=3)
    harness.start()
    try:
        with pytest.raises(RpcTimeout):
            harness.request(ScriptedRequest(), faulty("raise_first"))
    finally:
        harness.kill()


def test_token_meter_survives_malformed_kong_data(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """A PDK answer of the wrong shape makes the handler raise: logged, request goes on."""
    harness = make_harness("token-meter-log-plugin")
    bad = ScriptedRequest(overrides={"kong.log.serialize": "{not json"})
    outcome = harness.request(bad, plugin_config)
    assert outcome.phases == {"access": "ret", "log": "ret"}
    assert "phase_failed" in harness.log_text()
    good = harness.request(ScriptedRequest(upstream_body=b'{"usage":{}}'), plugin_config)
    assert good.phases == {"access": "ret", "log": "ret"}


# --- defect 2: leaks around kong.response.exit ------------------------------------------------


def _threads_and_rss(harness: KongHarness) -> tuple[int, int]:
    status = harness.proc_status()
    return int(status["Threads"]), int(status["VmRSS"].split()[0]) * 1024


@MODES
@pytest.mark.parametrize("behaviour", ["exit_first", "call_after_exit"])
def test_a_thousand_exits_leak_no_thread_or_memory(
    make_harness: HarnessFactory, mode: tuple[str, ...], behaviour: str
) -> None:
    harness = make_harness(FAULTY_PLUGIN, *mode)
    for _ in range(200):  # warm up: allocator pools, caches
        harness.request(ScriptedRequest(), faulty(behaviour))
    threads_before, rss_before = _threads_and_rss(harness)
    for _ in range(1000):
        outcome = harness.request(ScriptedRequest(), faulty(behaviour))
        assert outcome.exit_status == 403
    time.sleep(0.2)  # let finished handler threads end
    threads_after, rss_after = _threads_and_rss(harness)
    # kong-pdk leaks a thread or a greenlet (~10 KB) and a server entry per exit
    assert threads_after <= threads_before + 2
    assert rss_after - rss_before < 4 * 1024 * 1024
    if behaviour == "call_after_exit":
        assert "pdk_call_after_exit" in harness.log_text()


def test_a_thousand_blocked_requests_leak_nothing(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    collector.block("alice", "quota_exceeded")
    deadline = time.monotonic() + 15
    while harness.request(ScriptedRequest(), plugin_config).exit_status is None:
        assert time.monotonic() < deadline
    for _ in range(200):
        harness.request(ScriptedRequest(), plugin_config)
    threads_before, rss_before = _threads_and_rss(harness)
    for _ in range(1000):
        assert harness.request(ScriptedRequest(), plugin_config).exit_status == 429
    time.sleep(0.2)
    threads_after, rss_after = _threads_and_rss(harness)
    assert threads_after <= threads_before + 2
    assert rss_after - rss_before < 4 * 1024 * 1024


# --- defect 3: large replies ----------------------------------------------------------------


@MODES
def test_two_megabyte_body_round_trips_intact(
    make_harness: HarnessFactory, mode: tuple[str, ...]
) -> None:
    """Kong → Python (get_raw_body) and Python → Kong (set_raw_body), 2 MB each way."""
    harness = make_harness(FAULTY_PLUGIN, *mode)
    body = os.urandom(2 * 1024 * 1024)
    outcome = harness.request(ScriptedRequest(body=body), faulty("echo_body"))
    assert outcome.set_body == body


@MODES
def test_token_meter_injects_into_a_two_megabyte_stream_request(
    make_harness: HarnessFactory, plugin_config: dict[str, Any], mode: tuple[str, ...]
) -> None:
    harness = make_harness("token-meter-plugin", *mode)
    content = "x" * (2 * 1024 * 1024)
    body = json.dumps(
        {"model": "gpt-4o", "stream": True, "messages": [{"role": "user", "content": content}]}
    ).encode()
    outcome = harness.request(ScriptedRequest(body=body), plugin_config)
    assert outcome.set_body is not None
    sent = json.loads(outcome.set_body)
    assert sent["messages"][0]["content"] == content
    assert sent["stream_options"] == {"include_usage": True}


# --- defect 4: bytes that are not UTF-8 -----------------------------------------------------


@MODES
def test_header_with_byte_ff_keeps_the_connection_and_round_trips(
    make_harness: HarnessFactory, mode: tuple[str, ...]
) -> None:
    harness = make_harness(FAULTY_PLUGIN, *mode, pool_size=1)  # one connection: it must live
    raw = b"caf\xe9 \xff end"
    headers = {"x-bytes": raw, "content-type": "application/json"}
    outcome = harness.request(ScriptedRequest(headers=headers), faulty("echo_header"))
    (call,) = [c for c in outcome.pdk_calls if c.method == "kong.service.request.set_header"]
    assert call.args[1].encode("utf-8", "surrogateescape") == raw
    again = harness.request(ScriptedRequest(), faulty("ok"))
    assert again.phases == {"access": "ret"}


def test_consumer_name_with_byte_ff_is_metered(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    harness = make_harness("token-meter-plugin")
    consumer = {"id": "c1", "username": b"ali\xffce".decode("utf-8", "surrogateescape")}
    body = b'{"model":"m","usage":{"prompt_tokens":1,"completion_tokens":1,"total_tokens":2}}'
    outcome = harness.request(ScriptedRequest(consumer=consumer, upstream_body=body), plugin_config)
    assert outcome.phases == {"access": "ret", "response": "ret"}
    (event,) = collector.wait_for_events(1)
    assert event["subject"] == "ali\ufffdce"


# --- defect 5: eager debug formatting -------------------------------------------------------


def test_debug_log_does_not_format_rpc_arguments(make_harness: HarnessFactory) -> None:
    """With -v the RPC line names the method only: a body is never formatted into it."""
    harness = make_harness(FAULTY_PLUGIN, "-v")
    marker = "MARKER-" + "z" * 64
    harness.request(ScriptedRequest(body=marker.encode()), faulty("echo_body"))
    log = harness.log_text()
    assert "rpc_call" in log
    assert marker not in log


# --- defect 6: orphaned server -------------------------------------------------------------


@MODES
def test_server_exits_when_its_parent_goes_away(tmp_path: Path, mode: tuple[str, ...]) -> None:
    """Kong's worker dies: the server it spawned must not live on as an orphan."""
    socket_path = tmp_path / "token-meter.socket"
    command = [
        str(VENV_BIN / "token-meter-plugin"),
        "-p",
        str(tmp_path),
        "--socket-name",
        "token-meter.socket",
        *mode,
    ]
    parent_code = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen(sys.argv[1:])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(3600)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", parent_code, *command], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    server_pid = int(parent.stdout.readline())
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists():
            assert time.monotonic() < deadline, "server never listened"
            time.sleep(0.05)
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 15
        while _alive(server_pid):
            assert time.monotonic() < deadline, "server outlived its parent"
            time.sleep(0.1)
        assert not socket_path.exists()
    finally:
        if _alive(server_pid):
            os.kill(server_pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- defect 7: Lua-style returns --------------------------------------------------------------


def test_pdk_results_are_python_style(make_harness: HarnessFactory) -> None:
    """A PDK call returns its value, not a (value, err) tuple: served as with --no-lua-style."""
    harness = make_harness(FAULTY_PLUGIN)
    outcome = harness.request(ScriptedRequest(), faulty("echo_consumer"))
    (call,) = [c for c in outcome.pdk_calls if c.method == "kong.service.request.set_header"]
    assert call.args == ["x-consumer", "alice"]
