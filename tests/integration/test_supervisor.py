"""The supervisor Kong starts (plugin/supervisor.py): the socket outlives the serving process.

Through the Kong-side harness, with requests flowing from several threads while a process is
SIGKILLed (tests/harness/gap.py says which requests count as in flight and which as sent across
the gap): with the supervisor no request sent across the gap is skipped and every request that
ran the plugin is metered exactly once; without it (`--no-supervisor`) Kong skips the plugin for
requests sent across the gap, which is what the supervisor is for.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.harness.collector import FakeCollector, wait_until
from tests.harness.gap import (
    Gap,
    GapTraffic,
    kill_server,
    kill_serving,
    metered_requests,
    serving_pid,
    wait_until_respawned_at_once,
)
from tests.harness.kong import HarnessFactory, KongHarness, ScriptedRequest
from tests.harness.paths import REPO_ROOT, VENV_BIN
from token_meter_plugin import server
from token_meter_plugin.supervisor import BACKOFF_MAX_S, crash_loop_delay, exit_status

MODES = pytest.mark.parametrize("mode", [(), ("-g",)], ids=["threading", "gevent"])
THREADS = 4
OPENAI_JSON = (
    b'{"model":"gpt-4o-mini","usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
)


def _wait_for_log(harness: KongHarness, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while text not in harness.log_text():
        assert time.monotonic() < deadline, f"{text!r} never logged: {harness.log_text()[-3000:]}"
        time.sleep(0.02)
    return harness.log_text()


def _gone(pid: int) -> bool:
    try:
        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _kills(
    harness: KongHarness, traffic: GapTraffic, kill: Any, count: int
) -> Iterator[tuple[Gap, int]]:
    """`count` kills while traffic flows, each once Kong would respawn at once and the plugin
    ran again after the previous one; each gap and the pid of the serving process before it."""
    for _ in range(count):
        wait_until_respawned_at_once(harness)
        traffic.wait_for_requests(20)
        before = serving_pid(harness) if kill is kill_serving else harness.pid
        yield traffic.gap(kill(harness)), before
        traffic.wait_for_requests(20)


@MODES
def test_no_request_is_skipped_across_a_sigkill_of_the_serving_process(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    """Kong's connects wait in the backlog while the supervisor starts the next serving process:
    every request sent across the gap runs the plugin; only requests in flight, whose connection
    died with the process, can be lost. Every request that ran the plugin
    is metered exactly once; Kong never saw the process it started die, and each new serving
    process announces its pid and hands out instance ids above the old ones."""
    harness = make_harness("token-meter-plugin", *mode, workers=2)
    supervisor = harness.pid
    gaps = []
    with GapTraffic(harness, plugin_config, threads=THREADS) as traffic:
        for gap, old_serving in _kills(harness, traffic, kill_serving, 2):
            gaps.append(gap)
            new_serving = serving_pid(harness)
            assert new_serving != old_serving
            assert gap.across, "the request that ended the gap was sent across it"
            assert gap.skipped_across == [], [
                s.outcome.error_log for s in gap.skipped_across[:3] if s.outcome
            ]
            traffic.wait_for_requests(5)
            assert {harness.worker(i).server_pid for i in (0, 1)} == {new_serving}
    assert len(harness.spawns) == 1 and harness.pid == supervisor
    assert "serving_died" in harness.log_text() and "restarted_in_ms=" in harness.log_text()

    sent = traffic.sent
    ran = {s.n for s in sent if s.ran}
    assert wait_until(lambda: ran <= metered_requests(collector.stored.values()).keys(), 30)
    metered = metered_requests(collector.stored.values())
    assert max(metered.values()) == 1  # no request metered twice
    in_flight = {s.n for g in gaps for s in g.in_flight}
    unexplained = metered.keys() - ran - in_flight  # the rest were cut off after their event
    assert not unexplained, [
        (s.n, s.error, s.outcome and (s.outcome.status, s.outcome.phases, s.outcome.error_log))
        for s in sent
        if s.n in unexplained
    ]

    # Instance ids of each serving lifetime are above those of the one before.
    first_kill = gaps[0].kill.sent
    before = [
        i
        for s in sent
        if s.ended < first_kill and s.outcome
        for i in s.outcome.instance_ids.values()
    ]
    after = [
        i
        for s in sent
        if s.started > gaps[-1].back and s.outcome and s.ran
        for i in s.outcome.instance_ids.values()
    ]
    assert before and after and min(after) > max(before)


def test_without_the_supervisor_requests_across_the_gap_are_skipped(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    """The old behaviour, `--no-supervisor`: the socket dies with the server, and a Kong worker
    that holds an instance id proxies unmetered until Kong's respawn listens again."""
    harness = make_harness("token-meter-plugin", "--no-supervisor", workers=2)
    with GapTraffic(harness, plugin_config, threads=THREADS) as traffic:
        ((gap, _),) = list(_kills(harness, traffic, kill_server, 1))
    assert gap.skipped_across
    assert all(s.outcome and s.outcome.skipped for s in gap.skipped_across)
    assert len(harness.spawns) == 2  # Kong respawned the server itself


def test_a_killed_supervisor_takes_its_serving_process_with_it(
    make_harness: HarnessFactory, plugin_config: dict[str, Any]
) -> None:
    """The limit: SIGKILL of the supervisor loses the socket. Its serving process dies with it
    (no orphan serves the old socket) and Kong's respawn brings both back."""
    harness = make_harness("token-meter-plugin")
    request = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
    assert harness.request(request, plugin_config).status == 200
    old_serving = serving_pid(harness)
    old = harness.kill_server()
    deadline = time.monotonic() + 15
    while not _gone(old_serving):
        assert time.monotonic() < deadline, "the serving process outlived its supervisor"
        time.sleep(0.01)
    harness.wait_for_respawn(old)
    again = harness.request(request, plugin_config)
    assert again.phases == {"access": "ret", "response": "ret"}
    assert harness.worker(0).server_pid == serving_pid(harness) != old_serving


def test_the_successor_replays_the_journal_of_a_sigkilled_serving_process(
    make_harness: HarnessFactory, collector: FakeCollector, plugin_config: dict[str, Any]
) -> None:
    """The collector is down; the serving process is SIGKILLed with every event in its journal.
    The kernel released its lock: the successor opens the same directory (no sibling) and
    delivers each event exactly once when the collector is back."""
    harness = make_harness("token-meter-plugin")
    collector.fail_status = 503
    config = plugin_config | {"initial_retry_delay": 0.05, "max_retry_delay": 0.2}
    sent = 30
    for _ in range(sent):
        request = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
        assert harness.request(request, config).status == 200
    old = serving_pid(harness)
    os.kill(old, signal.SIGKILL)
    _wait_for_log(harness, "serving_restarted")
    collector.fail_status = None
    # The successor opens its journal with its first instance: one request starts it.
    harness.request(ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON), config)
    assert collector.wait_stored(sent + 1, timeout=30)
    assert len(collector.stored) == sent + 1
    assert "journal_dir_busy" not in harness.log_text()
    assert Path(plugin_config["spool_dir"]).is_dir()


@MODES
def test_sigterm_is_forwarded_and_the_supervisor_exits_with_its_status(
    make_harness: HarnessFactory,
    collector: FakeCollector,
    plugin_config: dict[str, Any],
    mode: tuple[str, ...],
) -> None:
    """Kong's SIGTERM reaches the serving process, which ships what it holds; the supervisor
    waits for it, removes the socket and exits 0."""
    harness = make_harness("token-meter-plugin", *mode)
    config = plugin_config | {"max_coalescing_delay": 30}  # nothing would leave on its own
    for _ in range(5):
        request = ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON)
        assert harness.request(request, config).phases == {"access": "ret", "response": "ret"}
    serving = serving_pid(harness)
    assert harness.stop() == 0
    assert len(collector.stored) == 5
    assert _gone(serving)
    assert not Path(harness.socket_path).exists()
    log = harness.log_text()
    assert "supervisor_stopping reason=SIGTERM" in log
    assert f"serving_exited pid={serving} exit=0" in log


def test_sigint_is_forwarded_too(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    command = [str(VENV_BIN / "token-meter-plugin"), "-p", str(tmp_path)]
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "server_started" in line:
                break
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        rest = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "supervisor_stopping reason=SIGINT" in rest and "exit=0" in rest
    assert not (tmp_path / "token-meter.socket").exists()


def test_a_serving_process_that_keeps_dying_young_is_restarted_with_a_growing_delay(
    tmp_path: Path, plugin_config: dict[str, Any]
) -> None:
    """A broken install (kong-pdk fails to import): every serving process dies at once. The
    supervisor, which never imports it, stays up, logs the crash loop at error level with a
    doubling delay and closes the socket meanwhile (Kong fails fast instead of waiting in the
    backlog); once the install is fixed the next serving process serves."""
    broken = tmp_path / "broken"
    (broken / "kong_pdk").mkdir(parents=True)
    (broken / "kong_pdk" / "__init__.py").write_text(
        'raise ImportError("kong_pdk broken for the test")\n'
    )
    env = dict(os.environ, PYTHONPATH=f"{broken}{os.pathsep}{REPO_ROOT}")
    harness = KongHarness([str(VENV_BIN / "token-meter-plugin")], tmp_path / "kong", env=env)
    harness.start()
    try:
        _recovers_from_a_crash_loop(harness, broken, plugin_config)
    finally:
        harness.kill()


def _recovers_from_a_crash_loop(
    harness: KongHarness, broken: Path, plugin_config: dict[str, Any]
) -> None:
    log = _wait_for_log(harness, "serving_crash_loop deaths=4")
    assert "kong_pdk broken for the test" in log
    assert "serving_crash_loop deaths=2 next_start_in_ms=500 listener=closed" in log
    assert "serving_crash_loop deaths=3 next_start_in_ms=1000 listener=closed" in log
    assert "serving_crash_loop deaths=4 next_start_in_ms=2000 listener=closed" in log
    assert harness.process is not None and harness.process.poll() is None
    assert len(harness.spawns) == 1  # Kong saw nothing die

    (broken / "kong_pdk" / "__init__.py").unlink()
    (broken / "kong_pdk").rmdir()
    _wait_for_log(harness, "server_started")
    harness.wait_for_socket()
    outcome = harness.request(ScriptedRequest(body=b"{}", upstream_body=OPENAI_JSON), plugin_config)
    assert outcome.phases == {"access": "ret", "response": "ret"}


def test_the_serving_command_not_found_is_exit_127(tmp_path: Path) -> None:
    """127 tells Kong its start command was not found: only when the serving process cannot be
    executed at all."""
    from token_meter_plugin.supervisor import Supervisor

    supervisor = Supervisor(
        plugin="token-meter",
        socket_path=tmp_path / "token-meter.socket",
        backlog=16,
        serving_argv=[str(tmp_path / "no-such-python")],
    )
    assert supervisor.run() == 127
    assert not (tmp_path / "token-meter.socket").exists()


@pytest.mark.parametrize("script", ["token-meter-plugin", "token-meter-log-plugin"])
def test_dump_prints_only_the_plugin_info(script: str) -> None:
    result = subprocess.run(
        [str(VENV_BIN / script), "-dump", "-v"], capture_output=True, check=True, timeout=60
    )
    (info,) = json.loads(result.stdout)
    assert info["Name"] == script.removesuffix("-plugin")
    assert b"supervisor" not in result.stderr


# --- the supervisor's pure parts -----------------------------------------------------------


def test_the_first_young_death_restarts_at_once_then_the_delay_doubles_up_to_a_cap() -> None:
    assert [crash_loop_delay(n) for n in range(6)] == [0.0, 0.0, 0.5, 1.0, 2.0, 4.0]
    assert crash_loop_delay(50) == BACKOFF_MAX_S


def test_exit_codes_follow_the_shell_and_never_say_command_not_found() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-9) == 137
    assert exit_status(-15) == 143
    assert exit_status(127) == 1


def test_the_supervisor_imports_neither_kong_pdk_nor_gevent_nor_the_plugin() -> None:
    code = (
        "import sys, token_meter_plugin.server\n"
        "heavy = {'kong_pdk', 'gevent', 'msgpack', 'token_meter_plugin.handler'}\n"
        "print(sorted(heavy & set(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True)
    assert result.stdout.strip() == b"[]"


def test_the_handler_timeout_limit_is_the_event_channels() -> None:
    from token_meter_plugin.event_channel import HANDLER_TIMEOUT_S

    assert server.HANDLER_TIMEOUT_S == HANDLER_TIMEOUT_S
