"""The process Kong starts for a plugin server: it owns the listening socket and keeps a serving
process (the plugin server proper) running behind it.

Kong connects to `<prefix>/<name>.socket`. When the process listening there dies, a Kong worker
that holds an instance id and cannot connect proxies the request unmetered until Kong's respawn
listens again (docs/architecture.md, "Failure handling"). Here the socket outlives the serving
process: the supervisor binds and listens before the first serving process starts, each serving
process inherits the listening descriptor (`--listen-fd N`, through `pass_fds`) and accepts on it,
and while none runs, Kong's connects wait in the listen backlog until the next one accepts them.

    supervisor (pid Kong knows, holds the socket)
      └─ serving process: `python -c <serving code> <plugin> <Kong's arguments> --listen-fd N`

- A serving process that dies (any reason, SIGKILL included) is started again at once. One that
  dies within YOUNG_S of its start again and again (an import error, a bad flag) is started
  after a doubling delay (`crash_loop_delay`), logged at error level, and the socket is closed
  meanwhile so that Kong fails fast (proxies unmetered) instead of waiting in the backlog for
  its 60 s read timeout.
- SIGTERM and SIGINT are forwarded to the serving process; the supervisor waits for it (it
  flushes its journal and sender, bounded by the server's own grace), SIGKILLs it after
  STOP_TIMEOUT_S, removes the socket and exits with its status (a signal N as 128 + N).
- The parent watchdog: when the process that started it (Kong's nginx worker 0) goes away, it
  stops the same way (kong-pdk's defect 6, here for the supervisor).
- The serving process gets PR_SET_PDEATHSIG(SIGKILL): if the supervisor itself is killed, its
  child dies with it instead of serving an orphaned socket, and Kong's own respawn starts both
  again. That is the limit: killing the supervisor loses the socket and reopens the gap.
- Exit code 127 means to Kong that the start command was not found: the supervisor exits 127
  only when the serving command cannot be executed, never passes a child's 127 on.

It imports only the standard library and no plugin code, so nothing a serving process loads or
does can crash it; it runs one thread and waits on signals through a wakeup pipe.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

log = logging.getLogger("token_meter_plugin")

LISTEN_FD_OPTION: Final = "--listen-fd"
# A serving process that lived less than this is "young": dying young again and again is a
# crash loop (Kong's own respawn uses the same second, Kong@3.9.x:kong/runloop/plugin_servers/
# process.lua).
YOUNG_S: Final = 1.0
BACKOFF_FIRST_S: Final = 0.5
BACKOFF_MAX_S: Final = 10.0
# The serving process runs its shutdown hooks for at most 6 s (server.SHUTDOWN_GRACE_S).
STOP_TIMEOUT_S: Final = 10.0
WATCHDOG_INTERVAL_S: Final = 0.5
EXIT_COMMAND_NOT_FOUND: Final = 127
_PR_SET_PDEATHSIG: Final = 1  # <linux/prctl.h>
_STOP_SIGNALS: Final = frozenset((int(signal.SIGTERM), int(signal.SIGINT)))


def crash_loop_delay(young_deaths: int) -> float:
    """Seconds before the next start after `young_deaths` consecutive deaths of processes that
    lived less than YOUNG_S: none for the first (a kill right after a start), then doubling
    from BACKOFF_FIRST_S up to BACKOFF_MAX_S."""
    if young_deaths <= 1:
        return 0.0
    return float(min(BACKOFF_FIRST_S * 2 ** (young_deaths - 2), BACKOFF_MAX_S))


def exit_status(returncode: int) -> int:
    """The supervisor's exit code for the serving process's `returncode` (negative: a signal)."""
    if returncode < 0:
        return 128 - returncode  # the shell's convention for "killed by signal N"
    if returncode == EXIT_COMMAND_NOT_FOUND:
        return 1  # the start command was found: Kong must not log "command not found"
    return returncode


def _describe(returncode: int) -> str:
    return f"signal={-returncode}" if returncode < 0 else f"exit={returncode}"


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function that makes the child die with SIGKILL when the supervisor dies.

    No library wraps prctl(2) in the standard library; `python-prctl` needs libcap headers to
    build, for one call. ctypes is loaded here, in the supervisor, before any fork."""
    if not sys.platform.startswith("linux"):
        return None  # elsewhere the serving process's parent watchdog ends it within 0.5 s
    import ctypes  # noqa: PLC0415 (only on Linux)

    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    supervisor = os.getpid()

    def in_child() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != supervisor:  # the supervisor died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)

    return in_child


class Supervisor:
    """Keeps one serving process running on a listening socket it owns (`run`)."""

    def __init__(
        self, *, plugin: str, socket_path: Path, backlog: int, serving_argv: Sequence[str]
    ) -> None:
        self.plugin = plugin
        self.socket_path = socket_path
        self.backlog = backlog
        self.serving_argv = list(serving_argv)
        self._listener: socket.socket | None = None
        self._inode: int | None = None
        self._child: subprocess.Popen[bytes] | None = None
        self._started_at = 0.0
        self._died_at: float | None = None
        self._previous_pid: int | None = None
        self._young_deaths = 0
        self._start_at: float | None = None  # when the next serving process is due
        self._stop_deadline: float | None = None  # set once stopping
        self._status = 0
        self._parent = os.getppid()
        self._preexec = _parent_death_signal()

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serve until stopped; the exit code."""
        wakeup_r, wakeup_w = os.pipe()
        os.set_blocking(wakeup_r, False)
        os.set_blocking(wakeup_w, False)
        # The handlers only make Python write each signal's number to the wakeup pipe; the loop
        # reads them in order, with no work in a handler.
        signal.set_wakeup_fd(wakeup_w)
        for sig in (signal.SIGCHLD, *_STOP_SIGNALS):
            signal.signal(sig, lambda *_: None)
        try:
            self._listen()
            log.info(
                "supervisor_started pid=%s plugin=%s path=%s backlog=%s",
                os.getpid(),
                self.plugin,
                self.socket_path,
                self.backlog,
            )
            self._start_at = time.monotonic()
            while True:
                self._start_due()
                if self._child is None and self._stop_deadline is not None:
                    return self._status
                with contextlib.suppress(InterruptedError):
                    select.select([wakeup_r], [], [], self._timeout())
                for number in self._signals(wakeup_r):
                    if number in _STOP_SIGNALS:
                        self._stop(signal.Signals(number).name, number)
                if os.getppid() != self._parent and self._stop_deadline is None:
                    self._stop(f"parent {self._parent} exited", signal.SIGTERM)
                self._reap()
                self._enforce_stop_deadline()
        except _CommandNotFound:
            return EXIT_COMMAND_NOT_FOUND
        finally:
            signal.set_wakeup_fd(-1)
            os.close(wakeup_r)
            os.close(wakeup_w)
            if self._child is not None and self._child.poll() is None:
                self._child.kill()  # an error in this loop: never leave an orphan
                self._child.wait()
            self._close_listener()

    def _timeout(self) -> float:
        now = time.monotonic()
        due = [now + WATCHDOG_INTERVAL_S]
        if self._child is None and self._start_at is not None:
            due.append(self._start_at)
        if self._stop_deadline is not None:
            due.append(self._stop_deadline)
        return max(0.0, min(due) - now)

    @staticmethod
    def _signals(wakeup_r: int) -> list[int]:
        try:
            return list(os.read(wakeup_r, 512))
        except BlockingIOError:
            return []

    # -- the listening socket ------------------------------------------------------------------

    def _listen(self) -> None:
        # The kernel caps the backlog at net.core.somaxconn (4096 on current Linux): Kong keeps up
        # to 256 connections per worker, and every one may connect while no process accepts.
        self.socket_path.unlink(missing_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(str(self.socket_path))
            listener.listen(self.backlog)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._inode = self.socket_path.stat().st_ino

    def _close_listener(self) -> None:
        if self._listener is None:
            return
        self._listener.close()
        self._listener = None
        # Only our own socket file: never one a successor has bound meanwhile.
        with contextlib.suppress(FileNotFoundError):
            if self.socket_path.stat().st_ino == self._inode:
                self.socket_path.unlink()

    # -- the serving process -------------------------------------------------------------------

    def _start_due(self) -> None:
        if self._child is not None or self._stop_deadline is not None or self._start_at is None:
            return
        if time.monotonic() < self._start_at:
            return
        self._start_at = None
        if self._listener is None:
            self._listen()
            log.info("supervisor_listening path=%s", self.socket_path)
        assert self._listener is not None
        fd = self._listener.fileno()
        try:
            child = subprocess.Popen(
                [*self.serving_argv, LISTEN_FD_OPTION, str(fd)],
                pass_fds=(fd,),
                stdin=subprocess.DEVNULL,
                preexec_fn=self._preexec,  # noqa: PLW1509 (one thread here: fork is safe)
            )
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES):
                log.error("serving_command_not_found command=%s error=%s", self.serving_argv, exc)
                raise _CommandNotFound from exc
            log.error("serving_start_failed error=%s", exc)
            self._died(time.monotonic(), young=True)
            return
        self._child = child
        self._started_at = time.monotonic()
        if self._died_at is None:
            log.info("serving_started pid=%s", child.pid)
        else:
            log.info(
                "serving_restarted pid=%s previous_pid=%s restarted_in_ms=%.1f",
                child.pid,
                self._previous_pid,
                (self._started_at - self._died_at) * 1000,
            )

    def _reap(self) -> None:
        child = self._child
        if child is None:
            return
        returncode = child.poll()
        if returncode is None:
            return
        now = time.monotonic()
        self._child = None
        self._previous_pid = child.pid
        lived_ms = (now - self._started_at) * 1000
        if self._stop_deadline is not None:
            self._status = exit_status(returncode)
            log.info(
                "serving_exited pid=%s %s lived_ms=%.0f", child.pid, _describe(returncode), lived_ms
            )
            return
        log.warning(
            "serving_died pid=%s %s lived_ms=%.0f", child.pid, _describe(returncode), lived_ms
        )
        self._died(now, young=now - self._started_at < YOUNG_S)

    def _died(self, now: float, *, young: bool) -> None:
        self._died_at = now
        self._young_deaths = self._young_deaths + 1 if young else 0
        delay = crash_loop_delay(self._young_deaths)
        self._start_at = now + delay
        if delay > 0:
            # Kong would wait in the backlog for its read timeout (60 s): refuse instead, so
            # that it proxies at once (unmetered) until a serving process stays up.
            self._close_listener()
            log.error(
                "serving_crash_loop deaths=%s next_start_in_ms=%.0f listener=closed",
                self._young_deaths,
                delay * 1000,
            )

    # -- stopping ------------------------------------------------------------------------------

    def _stop(self, reason: str, sig: int) -> None:
        if self._stop_deadline is None:
            log.info("supervisor_stopping reason=%s", reason)
            self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                self._child.send_signal(sig)

    def _enforce_stop_deadline(self) -> None:
        if self._child is None or self._stop_deadline is None:
            return
        if time.monotonic() >= self._stop_deadline:
            log.error("serving_stop_timeout pid=%s seconds=%s", self._child.pid, STOP_TIMEOUT_S)
            self._child.kill()
            self._stop_deadline = time.monotonic() + STOP_TIMEOUT_S


class _CommandNotFound(Exception):
    """The serving command cannot be executed."""


__all__ = [
    "LISTEN_FD_OPTION",
    "Supervisor",
    "crash_loop_delay",
    "exit_status",
]
