"""One event's handoff between the plugin server and its handler (kong-pdk 0.36 defects 1 and 2).

kong-pdk runs a handler behind a global lock until its first PDK call, so a handler that raises
before that call deadlocks the server, and one that raises later leaves Kong waiting for its
timeout (defect 1). It keeps a server entry for an event whose first PDK call is
`kong.response.exit`, strands a greenlet on every `exit` in `-g` mode, and leaks a thread on any
PDK call after `exit` (defect 2; see docs/architecture.md, "kong-pdk 0.36 defects").

Here every event runs in a fresh thread or greenlet (`run_event`) and talks to the server through
an `EventChannel`: no lock, a "ret" whatever the handler does, unbounded queues, and a PDK call
after the event ended raises `EventAbandoned` in the handler at once.
"""

from __future__ import annotations

import logging
import queue
from collections.abc import Callable
from typing import Any, Final, Protocol

from gevent.queue import Queue as GQueue  # type: ignore[import-untyped]
from kong_pdk.exception import PDKException
from kong_pdk.pdk import Kong

log = logging.getLogger("token_meter_plugin")

MSG_RET: Final = "ret"
TERMINAL_METHODS: Final = frozenset(("kong.response.exit", "kong.response.error"))

# Kong gives up on a plugin-server call after lua_socket_read_timeout (60 s by default) and lets
# the request go on. A handler stuck longer than this is abandoned a little earlier, so Kong gets
# a clean "ret" rather than a timeout on a connection it then has to close.
HANDLER_TIMEOUT_S: Final = 50.0


class PhaseHandler(Protocol):
    def __call__(self, kong: Any) -> None: ...


class EventAbandoned(PDKException):  # type: ignore[misc]
    """A PDK call after the event ended (`kind` "pdk_call_after_exit"), or a Step Kong never
    sent ("event_abandoned")."""

    def __init__(self, message: str, kind: str = "pdk_call_after_exit") -> None:
        super().__init__(message)
        self.kind = kind


class _Queues(Protocol):
    def put(self, item: Any) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


def thread_queue() -> _Queues:
    q: queue.Queue[Any] = queue.Queue()
    return q


def gevent_queue() -> _Queues:
    # An unbounded gevent Queue, not kong-pdk's Channel: a put never waits for a reader, so the
    # "ret" a handler posts after `exit` cannot strand its greenlet (defect 2 in -g mode).
    q: _Queues = GQueue()
    return q


class EventChannel:
    """The two one-way queues between the server (Kong's side) and one event's handler.

    The handler side refuses any message after a terminal method (`kong.response.exit`/`error`):
    Kong sends no Step after those, so a further PDK call would wait forever and leak its thread
    or greenlet (kong-python-pdk#137); instead it raises `EventAbandoned` in the handler at once.

    A handler also stops waiting for a Step after HANDLER_TIMEOUT_S. Kong never sends the next
    Step of an event whose PDK call failed in Lua (a call in the wrong phase, bad arguments, a
    nil raw body it cannot pack): the client got a 500 and Kong moved on
    (Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `bridge_loop`). Without the bound
    that handler's thread or greenlet, and the server's entry for the event, would live for ever.
    """

    __slots__ = ("_abandoned", "_finished", "_release", "_timeout", "_to_handler", "_to_server")

    def __init__(
        self,
        make_queue: Callable[[], _Queues],
        release: Callable[[], None] = lambda: None,
        timeout: float = HANDLER_TIMEOUT_S,
    ) -> None:
        self._to_server = make_queue()
        self._to_handler = make_queue()
        self._finished = False
        self._abandoned = False
        self._release = release
        self._timeout = timeout

    # handler side: what kong_pdk.pdk.Kong expects of its `ch`
    def put(self, message: Any) -> None:
        if self._finished or self._abandoned:
            method = message.get("Method") if isinstance(message, dict) else message
            raise EventAbandoned(f"PDK call {method} after the event ended")
        if isinstance(message, dict) and message.get("Method") in TERMINAL_METHODS:
            self._finished = True
        self._to_server.put(message)

    def get(self) -> Any:
        """The answer to the handler's PDK call; EventAbandoned when Kong never sends it."""
        try:
            return self._to_handler.get(timeout=self._timeout)
        except queue.Empty:  # gevent.queue.Empty is the same class
            self._abandoned = True
            self._release()
            raise EventAbandoned(
                f"no Step from Kong within {self._timeout} s", "event_abandoned"
            ) from None

    def handler_returned(self) -> None:
        """The handler is done: tell the server, unless Kong already stopped listening."""
        if not self._finished and not self._abandoned:
            self._finished = True
            self._to_server.put(MSG_RET)

    # server side
    def send_to_handler(self, item: Any) -> None:
        self._to_handler.put(item)

    def next_message(self) -> Any:
        """The handler's next PDK call or "ret"; "ret" for a handler stuck past the timeout."""
        try:
            return self._to_server.get(timeout=self._timeout)
        except queue.Empty:
            self._abandoned = True
            self._release()
            log.error("handler_timeout seconds=%s", self._timeout)
            return MSG_RET


def run_event(phase: PhaseHandler, channel: EventChannel) -> None:
    """The body of an event's thread or greenlet: the handler, then "ret" whatever happened."""
    try:
        phase(Kong(channel, False).kong)
    except EventAbandoned as exc:
        log.error("%s error=%s", exc.kind, exc)
    except Exception:  # the handler's own guard failed; the server must still answer (defect 1)
        log.exception("phase_failed_unguarded")
    finally:
        channel.handler_returned()


def is_terminal(message: Any) -> bool:
    """A PDK call after which Kong sends no Step: the event is over."""
    return isinstance(message, dict) and message.get("Method") in TERMINAL_METHODS
