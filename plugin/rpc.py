"""MessagePack-RPC over the Unix socket Kong connects to: kong-pdk's listener, transport fixed.

`GuardedRpcServer` subclasses kong_pdk.listener.UnixStreamServer (see docs/architecture.md,
"kong-pdk 0.36 defects"): `sendall` for every reply (defect 3), strings that are not UTF-8
decoded with surrogateescape and re-encoded the same way (defect 4), no debug formatting unless
debug logging is on (defect 5), and a watchdog that ends the whole process when the parent
(Kong's nginx worker) goes away (defect 6). It also announces the server's pid on every
connection, which kong-pdk never does. A method `plugin.HandleEvent` is dispatched to the
plugin server's `handle_event`, and so on.

With `listen_fd` (a serving process under the supervisor, plugin/supervisor.py) it accepts on the
listening socket it inherited instead of binding one, in both modes, and leaves the socket file
alone: the supervisor made it and removes it.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import msgpack
from gevent import socket as gsocket  # type: ignore[import-untyped]
from gevent.server import StreamServer as GStreamServer  # type: ignore[import-untyped]
from kong_pdk.exception import PDKException, PluginServerException
from kong_pdk.listener import UnixStreamServer

from .plugin_server import GuardedPluginServer

log = logging.getLogger("token_meter_plugin")

NOTIFICATION: Final = 2  # MessagePack-RPC message type of a notification: [2, label, args]

# msgpack reads from the socket in chunks of this size: large bodies arrive in few recv calls.
READ_SIZE: Final = 1024 * 1024
# Largest single message accepted from Kong (a request or response body travels in one).
MAX_MESSAGE_BYTES: Final = 1024 * 1024 * 1024

WATCHDOG_INTERVAL_S: Final = 0.5


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
        listen_fd: int | None = None,
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
        self._listen_fd = listen_fd

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
        inherited = self._listen_fd is not None
        if self._listen_fd is None:
            Path(self.path).unlink(missing_ok=True)
        else:
            # Nothing this process starts gets the supervisor's socket.
            os.set_inheritable(self._listen_fd, False)
        start_parent_watchdog(self._on_parent_exit)
        if self.use_gevent:
            if self._listen_fd is None:
                listener = gsocket.socket(gsocket.AF_UNIX, gsocket.SOCK_STREAM)
                listener.bind(self.path)
                listener.listen(self.listen_queue_size)
            else:
                listener = gsocket.socket(
                    gsocket.AF_UNIX, gsocket.SOCK_STREAM, fileno=self._listen_fd
                )
            log.info(
                "server_started mode=gevent path=%s pid=%s inherited=%s",
                self.path,
                os.getpid(),
                inherited,
            )
            GStreamServer(listener, self.handle).serve_forever()
        else:
            # socketserver calls its "handler class" with (request, address, server): a method
            # does, as in kong-pdk.
            server = _ThreadingUnixServer(
                self.path,
                self.handle,  # type: ignore[arg-type]
                bind_and_activate=False,
            )
            if self._listen_fd is None:
                server.server_bind()
                server.socket.listen(self.listen_queue_size)
            else:
                server.socket.close()  # the unbound one socketserver made
                server.socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_STREAM, fileno=self._listen_fd
                )
            log.info(
                "server_started mode=threading path=%s pid=%s inherited=%s",
                self.path,
                os.getpid(),
                inherited,
            )
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
