"""Guards against the defects of kong-pdk 0.36 (see docs/architecture.md, "kong-pdk 0.36 defects").

kong-pdk is unmaintained; instead of patching its globals, the plugin server is built from
subclasses of its classes that replace the faulty methods:

- `GuardedPluginServer` (kong_pdk.server.PluginServer): events run in a fresh thread or greenlet
  behind an `EventChannel`, whatever the handler does the server answers Kong (defect 1), nothing
  is kept or left waiting after `kong.response.exit` (defect 2), and no global lock is held while
  a handler works before its first PDK call.
- `GuardedRpcServer` (kong_pdk.listener.UnixStreamServer): `sendall` for every reply (defect 3),
  strings that are not UTF-8 decoded with surrogateescape and re-encoded the same way (defect 4),
  no debug formatting unless debug logging is on (defect 5), a watchdog that ends the whole
  process when the parent (Kong's nginx worker) goes away (defect 6).
- `guard_phase`: the phase handlers' own belt: an exception is logged, never raised into kong-pdk.

`--no-lua-style` (defect 7) is the only mode `server.py` serves in.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import os
import queue
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import msgpack
from gevent import socket as gsocket  # type: ignore[import-untyped]
from gevent import spawn as gspawn
from gevent.queue import Queue as GQueue  # type: ignore[import-untyped]
from gevent.server import StreamServer as GStreamServer  # type: ignore[import-untyped]
from kong_pdk.exception import PDKException, PluginServerException
from kong_pdk.listener import UnixStreamServer
from kong_pdk.pdk import Kong
from kong_pdk.server import PluginServer

log = logging.getLogger("token_meter_plugin")

MSG_RET: Final = "ret"
NOTIFICATION: Final = 2  # MessagePack-RPC message type of a notification: [2, label, args]
TERMINAL_METHODS: Final = frozenset(("kong.response.exit", "kong.response.error"))

# Kong gives up on a plugin-server call after lua_socket_read_timeout (60 s by default) and lets
# the request go on. A handler stuck longer than this is abandoned a little earlier, so Kong gets
# a clean "ret" rather than a timeout on a connection it then has to close.
HANDLER_TIMEOUT_S: Final = 50.0

# msgpack reads from the socket in chunks of this size: large bodies arrive in few recv calls.
READ_SIZE: Final = 1024 * 1024
# Largest single message accepted from Kong (a request or response body travels in one).
MAX_MESSAGE_BYTES: Final = 1024 * 1024 * 1024

WATCHDOG_INTERVAL_S: Final = 0.5

_T = TypeVar("_T")


class PhaseHandler(Protocol):
    def __call__(self, kong: Any) -> None: ...


# --- guard_phase ---------------------------------------------------------------------------------


def guard_phase(fn: Callable[[_T, Any], None]) -> Callable[[_T, Any], None]:
    """Decorate a phase method so that no exception leaves it (defect 1).

    kong-pdk deadlocks the whole server when a handler raises before its first PDK call and leaves
    Kong waiting for a timeout when it raises later. The exception is logged with its traceback
    at error level; Kong then sees a handler that returned, and the request goes on (fail open).
    """

    @functools.wraps(fn)
    def guarded(self: _T, kong: Any) -> None:
        try:
            fn(self, kong)
        except EventAbandoned:
            raise  # Kong has left this event: nothing to log per handler, the server logs it
        except Exception:
            log.exception("phase_failed phase=%s plugin=%s", fn.__name__, type(self).__name__)

    return guarded


# --- Event channels (defects 1 and 2) ------------------------------------------------------------


class EventAbandoned(PDKException):  # type: ignore[misc]
    """A PDK call after the event ended (`kind` "pdk_call_after_exit"), or a Step Kong never
    sent ("event_abandoned")."""

    def __init__(self, message: str, kind: str = "pdk_call_after_exit") -> None:
        super().__init__(message)
        self.kind = kind


class _Queues(Protocol):
    def put(self, item: Any) -> None: ...
    def get(self, block: bool = True, timeout: float | None = None) -> Any: ...


def _thread_queue() -> _Queues:
    q: queue.Queue[Any] = queue.Queue()
    return q


def _gevent_queue() -> _Queues:
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


def _run_event(phase: PhaseHandler, channel: EventChannel) -> None:
    try:
        phase(Kong(channel, False).kong)
    except EventAbandoned as exc:
        log.error("%s error=%s", exc.kind, exc)
    except Exception:  # the handler's own guard failed; the server must still answer (defect 1)
        log.exception("phase_failed_unguarded")
    finally:
        channel.handler_returned()


def _is_terminal(message: Any) -> bool:
    return isinstance(message, dict) and message.get("Method") in TERMINAL_METHODS


# Lua numbers are doubles: an id Kong holds must stay an exact integer, below 2**53.
MAX_LUA_INTEGER: Final = 2**53


class IdSequence:
    """Ids that never repeat across server lifetimes: counting up from the start time in µs.

    Kong keeps the instance ids it holds when the plugin server dies and is respawned
    (Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua, `get_instance_id`). kong-pdk numbers
    instances and events from 0 again, so a stale id could name another plugin entity's instance
    and run a request under its config. Starting at the wall clock in microseconds puts every id
    of a new lifetime above every id of an earlier one, as long as a lifetime hands out fewer
    than a million ids per second on average (events come at thousands per second). Today's
    clock is about 1.8e15 µs: below 2**53 (9.0e15) until the year 2255.
    """

    def __init__(self, now_us: int | None = None) -> None:
        start = time.time_ns() // 1000 if now_us is None else now_us
        if start >= MAX_LUA_INTEGER:
            raise ValueError("the clock is past what a Lua number holds exactly")
        self._count = itertools.count(start)

    def __next__(self) -> int:
        # next() on itertools.count is atomic under the GIL: no lock on the request path.
        return next(self._count)


class GuardedPluginServer(PluginServer):  # type: ignore[misc]
    """kong-pdk's PluginServer with event handling that cannot hang, deadlock or leak."""

    def __init__(
        self, *, name: str, use_gevent: bool, handler_timeout: float = HANDLER_TIMEOUT_S
    ) -> None:
        # Python-style PDK returns (defect 7); never the multiprocessing pool (state lost per
        # event, background threads never see the queue).
        super().__init__(
            loglevel=5, name=name, use_multiprocess=False, use_gevent=use_gevent, lua_style=False
        )
        self._instance_ids = IdSequence()
        self._event_ids = IdSequence()
        self._make_queue = _gevent_queue if use_gevent else _thread_queue
        self._handler_timeout = handler_timeout

    def start_instance(self, cfg: dict[str, Any]) -> dict[str, Any]:
        """kong-pdk's StartInstance with ids from `IdSequence` instead of 0, 1, 2, ..."""
        name = cfg["Name"]
        plugin = self.plugins.get(name)
        if plugin is None:
            raise PluginServerException(f"{name} not initialized")
        config = json.loads(cfg["Config"])
        iid = next(self._instance_ids)
        self.instances[iid] = plugin.new(config)
        log.info("instance_started id=%s plugin=%s", iid, name)
        return {"Name": name, "Id": iid, "Config": config, "StartTime": time.time()}

    def handle_event(self, event: dict[str, Any]) -> dict[str, Any]:
        iid = event["InstanceId"]
        instance = self.instances.get(iid)
        if instance is None:
            # Kong expects the error to start with "no plugin instance": it then restarts it.
            raise PluginServerException(f"no plugin instance #{iid}")
        instance.reset_expire_ts()
        phase = getattr(instance.cls, event["EventName"])
        # No lock held while the handler runs up to its first PDK call (kong-pdk holds one,
        # serializing every request).
        eid = next(self._event_ids)
        events = self.events
        channel = EventChannel(
            self._make_queue, lambda: events.pop(eid, None), timeout=self._handler_timeout
        )
        if self.use_gevent:
            gspawn(_run_event, phase, channel)
        else:
            threading.Thread(target=_run_event, args=(phase, channel), daemon=True).start()
        first = channel.next_message()
        # An event whose first message is "ret" or an exit is over for Kong: keep nothing
        # (kong-python-pdk#59 kept an entry per `exit`-first request).
        if first != MSG_RET and not _is_terminal(first):
            self.events[eid] = channel
        return {"Data": first, "EventId": eid}

    def _step(self, data: dict[str, Any], is_error: bool) -> dict[str, Any]:
        eid = data["EventId"]
        channel = self.events.get(eid)
        if channel is None:
            raise PluginServerException(f"event id {eid} not found")
        result = data.get("Data")
        channel.send_to_handler((None, result) if is_error else (result, None))
        reply = channel.next_message()
        if reply == MSG_RET or _is_terminal(reply):
            self.events.pop(eid, None)
        return {"Data": reply, "EventId": eid}

    def step(self, data: dict[str, Any]) -> dict[str, Any]:
        return self._step(data, False)

    def step_error(self, data: dict[str, Any]) -> dict[str, Any]:
        return self._step(data, True)


# Kong picks the Step variant by PDK method; all of them carry the same {EventId, Data}.
for _variant in (
    "step_credential",
    "step_consumer",
    "step_route",
    "step_service",
    "step_plugin",
    "step_memory_stats",
    "step_multi_map",
):
    setattr(GuardedPluginServer, _variant, GuardedPluginServer.step)


# --- RPC over the Unix socket (defects 3, 4, 5, 6) -----------------------------------------------


class _SocketReader:
    """The `read(n)` msgpack.Unpacker wants, over a socket."""

    __slots__ = ("_recv",)

    def __init__(self, conn: Any) -> None:
        self._recv = conn.recv

    def read(self, n: int) -> bytes:
        data: bytes = self._recv(n)
        return data


def _rpc_method_name(method: str) -> str:
    """ "plugin.HandleEvent" -> "handle_event"."""
    _, _, cmd = method.partition(".")
    out = []
    for i, char in enumerate(cmd):
        if char.isupper() and i:
            out.append("_")
        out.append(char.lower())
    return "".join(out)


class _ThreadingUnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True  # connection threads never delay an exit
    block_on_close = False


class GuardedRpcServer(UnixStreamServer):  # type: ignore[misc]
    """kong-pdk's MessagePack-RPC listener with the transport defects fixed."""

    def __init__(
        self,
        plugin_server: GuardedPluginServer,
        prefix: str,
        *,
        socket_name: str,
        use_gevent: bool,
        listen_queue_size: int,
        on_parent_exit: Callable[[str], None],
    ) -> None:
        super().__init__(
            plugin_server,
            prefix,
            sock_name=socket_name,
            use_gevent=use_gevent,
            listen_queue_size=listen_queue_size,
        )
        self._methods: dict[str, Callable[..., Any]] = {}
        self._on_parent_exit = on_parent_exit

    def _method(self, name: str) -> Callable[..., Any] | None:
        fn = self._methods.get(name)
        if fn is None and name.startswith("plugin."):
            fn = getattr(self.ps, _rpc_method_name(name), None)
            if fn is not None:
                self._methods[name] = fn
        return fn

    def handle(self, conn: Any, *_: Any) -> None:
        """Serve one of Kong's pooled connections until Kong closes it."""
        # surrogateescape both ways: a header with a byte that is not UTF-8 reaches the handler as
        # a str with a lone surrogate and goes back to Kong as the same bytes (defect 4).
        unpacker = msgpack.Unpacker(
            _SocketReader(conn),
            strict_map_key=False,
            unicode_errors="surrogateescape",
            read_size=READ_SIZE,
            max_buffer_size=MAX_MESSAGE_BYTES,
        )
        packer = msgpack.Packer(unicode_errors="surrogateescape")
        debug = log.isEnabledFor(logging.DEBUG)
        try:
            # Announce this process on every connection, before any answer: a worker that saw
            # another pid resets the instance ids it holds (Kong@3.9.x:kong/runloop/
            # plugin_servers/plugin.lua, `rpc_notifications:serverPid`; mp_rpc.lua reads
            # notifications before each response). kong-pdk never sends it.
            conn.sendall(packer.pack([NOTIFICATION, "serverPid", os.getpid()]))
            for message in unpacker:
                reply = self._dispatch(message, debug)
                if reply is not None:
                    # sendall, never send: a reply of a megabyte or more is not cut (defect 3)
                    conn.sendall(packer.pack(reply))
        except (OSError, ValueError) as exc:
            log.warning("rpc_connection_closed error=%s", exc)

    def _dispatch(self, message: Any, debug: bool) -> list[Any] | None:
        try:
            _kind, msgid, method, args = message
        except (TypeError, ValueError):
            log.error("rpc_malformed_message")
            return None
        # No eager "%s" of the arguments: formatting an 8 MB body took 32 ms per call (defect 5).
        if debug:
            log.debug("rpc_call msgid=%s method=%s", msgid, method)
        fn = self._method(method)
        if fn is None:
            return [1, msgid, f"RPC for {method} is not supported", None]
        try:
            result = fn(*args)
        except (PluginServerException, PDKException) as exc:
            log.warning("rpc_error msgid=%s method=%s error=%s", msgid, method, exc)
            return [1, msgid, str(exc), None]
        except Exception as exc:
            log.exception("rpc_exception msgid=%s method=%s", msgid, method)
            return [1, msgid, str(exc), None]
        return [1, msgid, None, result]

    def serve_forever(self) -> None:
        Path(self.path).unlink(missing_ok=True)
        start_parent_watchdog(self._on_parent_exit)
        if self.use_gevent:
            listener = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
            listener.bind(self.path)
            listener.listen(self.listen_queue_size)
            log.info("server_started mode=gevent path=%s", self.path)
            GStreamServer(listener, self.handle).serve_forever()
        else:
            # socketserver calls its "handler class" with (request, address, server): a method
            # does, as in kong-pdk.
            server = _ThreadingUnixServer(
                self.path,
                self.handle,  # type: ignore[arg-type]
                bind_and_activate=False,
            )
            server.server_bind()
            server.socket.listen(self.listen_queue_size)
            log.info("server_started mode=threading path=%s", self.path)
            server.serve_forever(poll_interval=0.5)


def start_parent_watchdog(on_parent_exit: Callable[[str], None]) -> threading.Thread:
    """End the process when the parent that started it (Kong's nginx worker 0) is gone.

    kong-pdk's watchdog calls sys.exit() in a thread, which ends only that thread, and compares
    the parent pid with 1, which misses reparenting to a subreaper (defect 6). This compares with
    the pid of the parent at start and is a real OS thread in both modes (gevent does not patch
    `threading` here), so it runs even while the gevent hub is busy.
    """
    original = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(WATCHDOG_INTERVAL_S)
            if os.getppid() != original:
                on_parent_exit(f"parent {original} exited")
                return

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread
