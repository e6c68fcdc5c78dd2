"""Requests flowing through the Kong harness while a plugin-server process is killed, and which of
them went unmetered: the measurement of tests/integration/test_supervisor.py and bench/gap.py.

    with GapTraffic(harness, config) as traffic:
        traffic.wait_for_requests(20)
        kill = kill_serving(harness)              # or kill_server(harness), kill_both(harness)
        gap = traffic.gap(kill)                   # waits until the plugin runs again
    gap.across, gap.skipped_across              # requests sent into the gap, those skipped

A few threads send one `token-meter` request after another; request `n`'s upstream answer has
`input_tokens = INPUT_BASE + n` (tests/harness/traffic.py), so `metered_requests` tells from the
collector's events which requests were metered, and how many times. Each is recorded with
when it started and ended on Kong's side and what Kong did with the plugin's phases. A request
`ran` the plugin when every phase ran to its end (`ret`) and the client got the upstream's 200;
any other outcome is "skipped": Kong skipped a phase because the socket refused or dropped the
connection (a skipped `response` phase leaves the request unmetered), or answered 500.

Around a kill (`Kill`: when the signal was sent, when the process was seen dead):

- in flight: started before the process was dead and ended after the signal. Its connection
  may have been cut mid-event: no supervisor can save it, the event's state died with the process.
- across the gap: started once the process was dead, up to `back`, when the first of those
  requests had run the plugin to its end (the respawn time is `back - sent`).

The supervisor's serving process is found as the child of the process Kong started
(`serving_pid`), which the harness knows nothing of, as Kong knows nothing of it.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests.harness.kong import HarnessError, KongHarness, Outcome, ScriptedRequest
from tests.harness.traffic import INPUT_BASE, SenderThreads, chat_answer


@dataclass
class Sent:
    """One request of the traffic, on Kong's side (times from time.monotonic())."""

    n: int
    request_id: str
    started: float
    ended: float
    outcome: Outcome | None  # None: the harness raised (`error`)
    error: str | None = None

    @property
    def ran(self) -> bool:
        return self.outcome is not None and self.outcome.ran_the_plugin


@dataclass(frozen=True)
class Kill:
    target: str  # "server" (no supervisor), "serving" or "supervisor" (and its serving process)
    pids: tuple[int, ...]
    sent: float  # the signal was sent
    dead: float  # every killed process was seen dead


@dataclass(frozen=True)
class Gap:
    kill: Kill
    back: float  # the first request sent after `kill.dead` that ran the plugin ended
    in_flight: list[Sent]
    across: list[Sent]

    @property
    def skipped_across(self) -> list[Sent]:
        return [s for s in self.across if not s.ran]

    @property
    def skipped_in_flight(self) -> list[Sent]:
        return [s for s in self.in_flight if not s.ran]

    @property
    def respawn_s(self) -> float:
        return self.back - self.kill.sent


class GapTraffic(SenderThreads):
    """`threads` senders of scripted `token-meter` requests through `harness`."""

    thread_name = "gap-traffic"

    def __init__(
        self,
        harness: KongHarness,
        config: Mapping[str, Any],
        *,
        threads: int = 4,
        pause: float = 0.005,
    ) -> None:
        self.harness = harness
        self.config = dict(config)
        self.threads = threads
        self.pause = pause
        self._numbers = itertools.count()
        self._lock = threading.Lock()
        self._sent: list[Sent] = []
        self._stopping = threading.Event()
        self._workers: list[threading.Thread] = []

    def _run(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                n = next(self._numbers)
            request = ScriptedRequest(
                headers={"content-type": "text/plain"},  # no stream-usage injection
                body=b"hello",
                upstream_headers={"content-type": "application/json"},
                upstream_body=chat_answer(n),
                request_id=f"gap-{n}",
            )
            started = time.monotonic()
            outcome: Outcome | None = None
            error = None
            try:
                outcome = self.harness.request(request, self.config)
            except Exception as exc:  # the harness's own errors, a timeout: unmetered
                error = repr(exc)
            sent = Sent(n, request.request_id, started, time.monotonic(), outcome, error)
            with self._lock:
                self._sent.append(sent)
            self._stopping.wait(self.pause)

    # -- what was sent -------------------------------------------------------------------------

    @property
    def sent(self) -> list[Sent]:
        with self._lock:
            return list(self._sent)

    def wait_for_requests(self, count: int, timeout: float = 60.0) -> None:
        """Until `count` more requests ran the plugin to its end."""
        start = sum(s.ran for s in self.sent)
        deadline = time.monotonic() + timeout
        while sum(s.ran for s in self.sent) - start < count:
            if time.monotonic() > deadline:
                raise HarnessError(f"fewer than {count} metered requests within {timeout} s")
            time.sleep(0.01)

    def gap(self, kill: Kill, timeout: float = 30.0) -> Gap:
        """Once a request sent after the kill ran the plugin: the requests around it."""
        deadline = time.monotonic() + timeout
        while True:
            done = [s for s in self.sent if s.started >= kill.dead and s.ran]
            if done:
                back = min(s.ended for s in done)
                break
            if time.monotonic() > deadline:
                raise HarnessError(f"the plugin did not run again within {timeout} s")
            time.sleep(0.01)
        sent = self.sent
        in_flight = [s for s in sent if s.started < kill.dead and s.ended > kill.sent]
        across = [s for s in sent if kill.dead <= s.started <= back]
        return Gap(kill, back, in_flight, across)


def metered_requests(events: Iterable[Mapping[str, Any]]) -> collections.Counter[int]:
    """Request number -> how many of `events` meter it."""
    return collections.Counter(int(e["data"]["input_tokens"]) - INPUT_BASE for e in events)


# --- processes ----------------------------------------------------------------------------------


def serving_pid(harness: KongHarness, timeout: float = 30.0) -> int:
    """The supervisor's serving process: the only child of the process Kong started."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(psutil.NoSuchProcess):
            children = [c for c in psutil.Process(harness.pid).children() if c.status() != "zombie"]
            if len(children) == 1:
                return int(children[0].pid)
        if time.monotonic() > deadline:
            raise HarnessError(f"no serving process under {harness.pid}")
        time.sleep(0.005)


def _dead(pid: int) -> bool:
    """Whether every thread of `pid` is gone, and with them its descriptors. A process's main
    thread shows as a zombie while its other threads still exit, holding the sockets open."""
    try:
        process = psutil.Process(pid)
        return bool(process.status() == psutil.STATUS_ZOMBIE and process.num_threads() <= 1)
    except psutil.NoSuchProcess:
        return True


def _wait_dead(pids: tuple[int, ...], timeout: float = 15.0) -> float:
    deadline = time.monotonic() + timeout
    while not all(_dead(pid) for pid in pids):
        if time.monotonic() > deadline:
            raise HarnessError(f"processes {pids} survived SIGKILL")
        time.sleep(0.001)
    return time.monotonic()


def kill_server(harness: KongHarness) -> Kill:
    """SIGKILL the process Kong started (the server itself, without a supervisor); Kong's
    supervisor respawns it."""
    pid = harness.pid
    sent = time.monotonic()
    harness.kill_server()
    return Kill("server", (pid,), sent, time.monotonic())


def kill_serving(harness: KongHarness) -> Kill:
    """SIGKILL the supervisor's serving process; the supervisor starts another."""
    pid = serving_pid(harness)
    sent = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    return Kill("serving", (pid,), sent, _wait_dead((pid,)))


def kill_both(harness: KongHarness) -> Kill:
    """SIGKILL the supervisor and its serving process at once (a kill of the process group, of
    the container, the OOM killer's choice of the supervisor); Kong respawns the supervisor."""
    child = serving_pid(harness)
    supervisor = harness.pid
    sent = time.monotonic()
    os.kill(child, signal.SIGKILL)
    harness.kill_server()
    return Kill("supervisor", (supervisor, child), sent, _wait_dead((child,)))


def wait_until_respawned_at_once(harness: KongHarness) -> None:
    """Until the process Kong started, and the supervisor's serving process if there is one,
    have lived over a second: Kong then respawns the one, the supervisor the other, at once when
    it dies (not a second after its start, nor after a crash-loop delay), the case the
    measurements compare."""
    started = harness.spawns[-1].started_at
    time.sleep(max(0.0, started + 1.1 - time.monotonic()))
    with contextlib.suppress(psutil.NoSuchProcess, FileNotFoundError):
        for child in psutil.Process(harness.pid).children():
            time.sleep(max(0.0, 1.1 - _age(child.pid)))


def _age(pid: int) -> float:
    """Seconds since `pid` started, to the clock tick (psutil's create_time is off by up to a
    second: it adds the boot time, which /proc/stat gives in whole seconds)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")


__all__ = [
    "Gap",
    "GapTraffic",
    "Kill",
    "Sent",
    "kill_both",
    "kill_server",
    "kill_serving",
    "metered_requests",
    "serving_pid",
    "wait_until_respawned_at_once",
]
