"""Kong's side of a Python plugin server, for tests and benchmarks.

The harness starts the real plugin-server process as Kong 3.9 starts it and plays Kong's part of
the MessagePack RPC over the Unix socket. It is not a call of Python functions. Each behaviour
below names the Kong source it follows (tags 3.9.0 to 3.9.3, `Kong@3.9.x:path`):

- Query (`Kong@3.9.x:kong/runloop/plugin_servers/process.lua`, `query_external_plugin_info`):
  `<command> -dump` through the shell, stdout JSON-decoded, the first plugin kept, refused where
  Kong 3.9 refuses it (a Version that is not "x.y.z", a Priority that is not an integer, a schema
  that is not a subschema with a `config` record).
- Process management (process.lua, `pluginserver_timer`): worker 0 spawns
  `exec <command> -p <prefix> --socket-name <name>.socket` through /bin/sh, stdout and stderr
  joined into one log; a server that dies is spawned again at once if it lived more than 1 s,
  else 1 s after its previous start; shutdown sends SIGTERM. `kill_server()` SIGKILLs it and the
  supervisor respawns it with that timing (`respawn=False` leaves respawning to
  `respawn_server()`).
- Workers (`workers=N`): each has its own Rpc object (message ids, the server pid it saw), its own
  cache of instance ids and its own keepalive pool (`lua_socket_pool_size` 256 idle connections,
  `Kong@3.9.x:kong/templates/kong_defaults.lua`). Every RPC message takes a pooled connection
  (`Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua`, `Rpc:call`): one event's messages may
  go out on different connections. `request()` is thread-safe: one thread per request.
- Instances (`Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua`, `get_instance_id`): one per
  worker and plugin entity (`__plugin_id`, `__seq__` in the Config JSON); a new `__seq__` starts
  a new instance and closes the old one. Ids are kept when the server dies and is respawned; they
  are dropped on an error containing "no plugin instance" (here at once, in every worker through
  a worker event, then the event is retried) and on a `serverPid` notification with a new pid.
- PDK calls answered from a `ScriptedRequest`, with Kong's phase and argument checks; a Lua error
  (a call in the wrong phase, bad arguments, a nil raw body that cannot be packed) is a 500 and the
  event gets no further Step; an RPC failure is logged and the plugin is skipped for that request;
  a failed `plugin.StartInstance` is a 500.
- Request bodies: beyond `client_body_buffer_size` (8 KiB) nginx keeps the body in a temp file,
  which `kong.request.get_raw_body()` reads only when given a size
  (`Kong@3.9.x:kong/pdk/request.lua`).

Two choices of the harness: the log phase runs right after the response phase, in the request's
thread (Kong runs it from a timer, so errors there change no status); and the keepalive pool hands
out its least recently used connection whenever two are idle, so that consecutive messages of one
event use different connections even without concurrency (nginx reuses the most recent one).
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

KONG_PHASES = ("certificate", "rewrite", "access", "response", "preread", "log")
TERMINAL_METHODS = frozenset(("kong.response.exit", "kong.response.error"))
# Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `get_step_method`
STEP_BY_METHOD = {
    "kong.client.get_credential": "plugin.StepCredential",
    "kong.client.load_consumer": "plugin.StepConsumer",
    "kong.client.get_consumer": "plugin.StepConsumer",
    "kong.client.authenticate": "plugin.StepCredential",
    "kong.node.get_memory_stats": "plugin.StepMemoryStats",
    "kong.router.get_route": "plugin.StepRoute",
    "kong.router.get_service": "plugin.StepService",
    "kong.request.get_query": "plugin.StepMultiMap",
    "kong.request.get_headers": "plugin.StepMultiMap",
    "kong.response.get_headers": "plugin.StepMultiMap",
    "kong.service.response.get_headers": "plugin.StepMultiMap",
}
# Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `must_fix`: these results are wrapped
# by `fix_raw` and packed as MessagePack bin, which fails on nil (`#nil` in MessagePack.lua).
RAW_BODY_METHODS = frozenset(
    (
        "kong.request.get_raw_body",
        "kong.response.get_raw_body",
        "kong.service.response.get_raw_body",
    )
)
LOG_METHODS = frozenset(
    f"kong.log.{level}"
    for level in ("alert", "crit", "err", "warn", "notice", "info", "debug", "inspect")
)
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
DEFAULT_TIMEOUT = 10.0  # generous: only there to turn a hang into a failure

# Kong@3.9.x:kong/templates/kong_defaults.lua: client_body_buffer_size = 8k
CLIENT_BODY_BUFFER_SIZE = 8 * 1024
# Kong@3.9.x:kong/templates/kong_defaults.lua: lua_socket_pool_size = 256 (idle connections kept
# per worker; more may be open at once, the surplus is closed when released)
LUA_SOCKET_POOL_SIZE = 256
# Kong@3.9.x:kong/runloop/plugin_servers/process.lua: `next_spawn = ngx.now() + 1`
RESPAWN_INTERVAL = 1.0
# Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua, `get_instance_id`: SLEEP_STEP, WAIT_TIME
CLAIM_SLEEP_STEP = 0.1
CLAIM_WAIT_TIME = 10.0
# How long a worker event takes to reach every worker: the harness's figure (lua-resty-events
# delivers through a broker, asynchronously; milliseconds on an idle machine).
WORKER_EVENTS_DELAY = 0.05
# Kong retries "no plugin instance" without bound (mp_rpc.lua `handle_event` calls itself);
# the harness stops, as a stack overflow would, after this many.
MAX_EVENT_RETRIES = 50
# Kong@3.9.x:kong/templates/kong_defaults.lua: log_level = notice
_ERROR_LOG_LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice")
_KONG_LOG_LEVEL = {"err": "error"}  # kong.log.<x> -> nginx level name
_DEFAULT_WORKSPACE = "f3a9e7c0-5a4c-4c53-9e47-2c9d5d0c0d00"
_ENTITY_NAMESPACE = uuid.UUID("4f2f0a52-7c3b-4d1e-9b7e-2f6a0f6b9c10")


class HarnessError(AssertionError):
    """Kong would refuse this plugin, or the server misbehaved on the wire."""


class RpcTimeout(HarnessError):
    """The plugin server did not answer in time: a hang (Kong would log a timeout)."""


class RpcError(HarnessError):
    """The plugin server answered an RPC with an error."""


class _KongLuaError(Exception):
    """A Lua error while Kong runs the plugin's phase: nothing in mp_rpc.lua catches it."""


class _RpcFailure(Exception):
    """`Rpc:call` returned `nil, err`: Kong logs it and goes on without the plugin."""

    def __init__(self, err: Any, *, answered: bool) -> None:
        super().__init__(str(err))
        self.err = err
        self.answered = answered  # the server answered with an error (not a transport failure)


# --- Kong's PDK: phases and argument checks ----------------------------------------------------

# Kong@3.9.x:kong/pdk/private/phases.lua: phase names in the order of their bits, which is the
# order Kong lists them in "function cannot be called in X phase (only in: ...)".
_PHASE_ORDER = (
    "init_worker",
    "certificate",
    "client_hello",
    "rewrite",
    "access",
    "balancer",
    "response",
    "cluster_listener",
    "header_filter",
    "body_filter",
    "log",
    "preread",
    "error",
    "admin_api",
)
# phases.lua, the `request` alias
_REQUEST = frozenset(
    (
        "rewrite",
        "access",
        "balancer",
        "response",
        "header_filter",
        "body_filter",
        "log",
        "error",
        "admin_api",
        "cluster_listener",
    )
)
# Kong@3.9.x:kong/pdk/request.lua, `before_content` (its @phases line omits `error`)
_BEFORE_CONTENT = frozenset(("rewrite", "access", "response", "error", "admin_api"))
# Kong@3.9.x:kong/pdk/client.lua `AUTH_AND_LATER`; Kong@3.9.x:kong/pdk/router.lua `ROUTER_PHASES`
_AUTH_AND_LATER = frozenset(("access", "header_filter", "response", "body_filter", "log"))
# Kong@3.9.x:kong/pdk/service/request.lua, `access_rewrite_balancer`
_SERVICE_REQUEST = frozenset(("rewrite", "access", "balancer"))
# Kong@3.9.x:kong/pdk/service/response.lua, `header_body_log` (its @phases lines omit `response`)
_SERVICE_RESPONSE = frozenset(("response", "header_filter", "body_filter", "log"))
# Kong@3.9.x:kong/pdk/response.lua, `header_body_log`
_RESPONSE_READ = frozenset(
    ("response", "header_filter", "body_filter", "log", "error", "admin_api")
)
# Kong@3.9.x:kong/pdk/response.lua, `rewrite_access_header`: what `exit`, `error` and the setters
# check (their @phases lines say less: preread, rewrite, access, admin_api, header_filter)
_RESPONSE_WRITE = frozenset(
    ("rewrite", "access", "response", "balancer", "header_filter", "error", "admin_api")
)

# The phases each modelled PDK method accepts (`check_phase` at the top of each function).
PDK_PHASES: dict[str, frozenset[str]] = {
    # Kong@3.9.x:kong/pdk/request.lua
    "kong.request.get_method": _REQUEST,
    "kong.request.get_path": _REQUEST,
    "kong.request.get_query": _REQUEST,
    "kong.request.get_header": _REQUEST,
    "kong.request.get_headers": _REQUEST,
    "kong.request.get_raw_body": _BEFORE_CONTENT,
    "kong.request.get_body": _BEFORE_CONTENT,
    # Kong@3.9.x:kong/pdk/client.lua, Kong@3.9.x:kong/pdk/router.lua
    "kong.client.get_consumer": _AUTH_AND_LATER,
    "kong.client.get_credential": _AUTH_AND_LATER,
    "kong.router.get_route": _AUTH_AND_LATER,
    "kong.router.get_service": _AUTH_AND_LATER,
    # Kong@3.9.x:kong/pdk/service/request.lua
    "kong.service.request.set_header": _SERVICE_REQUEST,
    "kong.service.request.set_raw_body": _SERVICE_REQUEST,
    "kong.service.request.enable_buffering": _SERVICE_REQUEST,
    # Kong@3.9.x:kong/pdk/service/response.lua
    "kong.service.response.get_status": _SERVICE_RESPONSE,
    "kong.service.response.get_headers": _SERVICE_RESPONSE,
    "kong.service.response.get_header": _SERVICE_RESPONSE,
    "kong.service.response.get_raw_body": _SERVICE_RESPONSE,
    # Kong@3.9.x:kong/pdk/response.lua
    "kong.response.get_status": _RESPONSE_READ,
    "kong.response.get_headers": _RESPONSE_READ,
    "kong.response.get_header": _RESPONSE_READ,
    "kong.response.get_raw_body": frozenset(("body_filter",)),
    "kong.response.set_header": _RESPONSE_WRITE,
    "kong.response.exit": _RESPONSE_WRITE,
    "kong.response.error": _RESPONSE_WRITE,
    # Kong@3.9.x:kong/pdk/log.lua, `serialize`: PHASES_LOG
    "kong.log.serialize": frozenset(("log",)),
}

# Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua, `exposed_api`: in the log phase (a timer)
# these answer from the data saved at the end of the request, with no phase or argument check.
_SAVED_FOR_LOG = frozenset(
    (
        "kong.log.serialize",
        "kong.request.get_headers",
        "kong.request.get_header",
        "kong.response.get_status",
        "kong.response.get_headers",
        "kong.response.get_header",
        "kong.nginx.req_start_time",
    )
)


def _phase_error(phase: str, accepted: frozenset[str]) -> str:
    names = ", ".join(name for name in _PHASE_ORDER if name in accepted)
    return f"function cannot be called in {phase} phase (only in: {names})"


def _lua_type(value: Any) -> str:
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str | bytes):
        return "string"
    return "table"


def _is_number(value: Any) -> bool:
    return _lua_type(value) == "number"


def _is_string(value: Any) -> bool:
    return _lua_type(value) == "string"


def _validate_header(name: Any, value: Any) -> None:
    """Kong@3.9.x:kong/pdk/private/checks.lua, `validate_header`."""
    if not _is_string(name):
        raise _KongLuaError(f"invalid header name {name!r}: got {_lua_type(name)}, expected string")
    kind = _lua_type(value)
    if kind == "table":
        items = value if isinstance(value, list) else []
        for item in items:
            if not _is_string(item):
                raise _KongLuaError(
                    f"invalid header value in array {name!r}: got {_lua_type(item)}, "
                    "expected string"
                )
    elif kind not in ("string", "number", "boolean"):
        raise _KongLuaError(
            f"invalid header value for {name!r}: got {kind}, expected array of string, string, "
            "number or boolean"
        )


def _validate_headers(headers: Any) -> None:
    """Kong@3.9.x:kong/pdk/private/checks.lua, `validate_headers` (a MessagePack array is a Lua
    table with integer keys: not header names)."""
    items = headers.items() if isinstance(headers, dict) else enumerate(headers, 1)
    for name, value in items:
        if not _is_string(name):
            raise _KongLuaError(
                f"invalid header name {name!r}: got {_lua_type(name)}, expected string"
            )
        _validate_header(name, value)


def _check_args(method: str, args: list[Any]) -> None:
    """The argument checks of the modelled PDK functions (each raises a Lua error)."""
    arg0: Any = args[0] if args else None
    if method == "kong.request.get_header" and not _is_string(arg0):
        raise _KongLuaError("header name must be a string")  # Kong@3.9.x:kong/pdk/request.lua
    if method == "kong.request.get_headers" and arg0 is not None:
        # Kong@3.9.x:kong/pdk/request.lua: MIN_HEADERS = 1, MAX_HEADERS = 1000
        if not _is_number(arg0):
            raise _KongLuaError("max_headers must be a number")
        if arg0 < 1:
            raise _KongLuaError("max_headers must be >= 1")
        if arg0 > 1000:
            raise _KongLuaError("max_headers must be <= 1000")
    if method == "kong.service.request.set_raw_body" and not _is_string(arg0):
        raise _KongLuaError("body must be a string")  # Kong@3.9.x:kong/pdk/service/request.lua
    if method in ("kong.service.request.set_header", "kong.response.set_header"):
        _validate_header(arg0, args[1] if len(args) > 1 else None)
    if method in TERMINAL_METHODS:
        # Kong@3.9.x:kong/pdk/response.lua: MIN_STATUS_CODE 100 (MIN_ERR_STATUS_CODE 400 for
        # `error`), MAX_STATUS_CODE 599
        low = 100 if method == "kong.response.exit" else 400
        if not _is_number(arg0):
            raise _KongLuaError("code must be a number")
        if not low <= arg0 <= 599:
            raise _KongLuaError(f"code must be a number between {low} and 599")
        body = args[1] if len(args) > 1 else None
        if method == "kong.response.exit" and _lua_type(body) not in ("nil", "string", "table"):
            raise _KongLuaError("body must be a nil, string or table")
        headers = args[2] if len(args) > 2 else None
        if headers is not None:
            if _lua_type(headers) != "table":
                raise _KongLuaError("headers must be a nil or table")
            _validate_headers(headers)


# --- Scripted request and outcome -------------------------------------------------------------


def _default_route() -> dict[str, Any]:
    return {
        "id": "3f0c6c3a-8a4e-4b8f-9a51-0d6f6b3c6a11",
        "name": "openai-chat",
        "paths": ["/v1"],
        "protocols": ["http", "https"],
        "service": {"id": "b1d7c3de-52f2-4f55-8f0e-6a3c1f9c2a22"},
    }


def _default_service() -> dict[str, Any]:
    return {
        "id": "b1d7c3de-52f2-4f55-8f0e-6a3c1f9c2a22",
        "name": "openai",
        "host": "api.openai.com",
        "port": 443,
        "protocol": "https",
    }


@dataclass
class ScriptedRequest:
    """One request through Kong: what the client sent, who it is, what the upstream answers.

    Header values may be `bytes` to send bytes that are not UTF-8 (Kong sends Lua strings as
    MessagePack `str` whatever their bytes). Kong's request headers also hold `content-length`
    (unless the scripted headers set it), or `transfer-encoding: chunked` and none when `chunked`.
    A body larger than the harness's `client_body_buffer_size` is in nginx's temp file."""

    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: Mapping[str, str | bytes | list[str]] = field(
        default_factory=lambda: {"content-type": "application/json"}
    )
    body: bytes | None = b'{"model":"gpt-4o-mini","messages":[]}'
    chunked: bool = False  # sent with Transfer-Encoding: chunked, no Content-Length
    consumer: Mapping[str, Any] | None = field(
        default_factory=lambda: {
            "id": "5a1c2b3d-0000-4000-8000-00000000a11c",
            "username": "alice",
            "custom_id": "cus_alice",
            "created_at": 1700000000,
        }
    )
    route: Mapping[str, Any] | None = field(default_factory=_default_route)
    service: Mapping[str, Any] | None = field(default_factory=_default_service)
    upstream_status: int = 200
    upstream_headers: Mapping[str, str | bytes | list[str]] = field(
        default_factory=lambda: {"content-type": "application/json"}
    )
    upstream_body: bytes = b"{}"
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    start_time: float = field(default_factory=time.time)
    # extra keys merged into the kong.log.serialize() snapshot (e.g. {"ai": {...}})
    serialize_extra: Mapping[str, Any] = field(default_factory=dict)
    # replace the PDK answer of a method (the value is sent as is; None sends nil, and a nil raw
    # body fails in Kong's packer as a real one would)
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PdkCall:
    phase: str
    method: str
    args: list[Any]


@dataclass
class Outcome:
    """What Kong saw of one request, and what its client got.

    `phases` maps each phase that ran to "ret" (the handler returned), "exit" (it called
    kong.response.exit/error), "error" (a Lua error: a 500 unless in log, no further Step),
    "skipped" (an RPC failure Kong only logged: the request went on without the plugin) or
    "empty" (the server answered HandleEvent or a Step with nil, which Kong takes as done)."""

    phases: dict[str, str] = field(default_factory=dict)
    pdk_calls: list[PdkCall] = field(default_factory=list)
    exit_status: int | None = None
    exit_body: bytes | None = None
    exit_headers: dict[str, Any] | None = None
    upstream_called: bool = False
    upstream_request_body: bytes | None = None
    set_body: bytes | None = None
    logs: list[tuple[str, list[Any]]] = field(default_factory=list)
    unknown_methods: list[str] = field(default_factory=list)
    serialized: dict[str, Any] | None = None
    # the HTTP status the client got: the exit status, 500 for a Lua error or a failed
    # StartInstance, else the upstream's status
    status: int | None = None
    skipped: bool = False  # some phase of the plugin did not run to its end (RPC failure)
    error_log: list[str] = field(default_factory=list)  # Kong's error-log lines of this request
    worker: int = 0
    instance_ids: dict[str, int] = field(default_factory=dict)  # phase -> id of HandleEvent
    connections: list[int] = field(default_factory=list)  # connection id of each RPC message
    elapsed: float = 0.0  # seconds on Kong's side: a figure for benchmarks, never an assertion

    @property
    def ran_the_plugin(self) -> bool:
        """Every phase of the plugin ran to its end ("ret") and the client got a 200: a
        request the plugin metered."""
        return (
            bool(self.phases)
            and all(state == "ret" for state in self.phases.values())
            and self.status == 200
        )

    @property
    def round_trips(self) -> int:
        """PDK round trips (Steps Kong sent); an exit is a call Kong answers with no Step."""
        return sum(1 for call in self.pdk_calls if call.method not in TERMINAL_METHODS)

    def methods(self, phase: str | None = None) -> list[str]:
        return [c.method for c in self.pdk_calls if phase is None or c.phase == phase]

    def exit_json(self) -> Any:
        assert self.exit_body is not None, "the plugin did not exit"
        return json.loads(self.exit_body)

    def logged(self, text: str) -> bool:
        """Whether some error-log line of this request contains `text`."""
        return any(text in line for line in self.error_log)


def _lower_multimap(headers: Mapping[str, Any]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for name, value in headers.items():
        values = value if isinstance(value, list) else [value]
        out.setdefault(name.lower(), []).extend(_wire_str(v) for v in values)
    return out


def _wire_str(value: Any) -> Any:
    """A Lua string as Kong's MessagePack sends it: `str`, even when not UTF-8."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return value


def request_headers(req: ScriptedRequest) -> dict[str, list[Any]]:
    """The request headers as nginx holds them: lower-case names, framing headers added."""
    headers = _lower_multimap(req.headers)
    if req.chunked:
        headers.pop("content-length", None)
        headers.setdefault("transfer-encoding", ["chunked"])
    elif req.body is not None:
        headers.setdefault("content-length", [str(len(req.body))])
    return headers


def _header_value(headers: Mapping[str, list[Any]], name: Any) -> Any:
    """nginx's lookup: case-insensitive, `_` as `-`; the first value."""
    key = _wire_str(name).lower().replace("_", "-") if _is_string(name) else name
    values = headers.get(key)
    return values[0] if values else None


# --- RPC connections ----------------------------------------------------------------------------


class _Connection:
    _ids = itertools.count(1)

    def __init__(self, path: str, timeout: float) -> None:
        self.id = next(self._ids)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(path)
        except OSError:
            self.sock.close()
            raise
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")

    def send(self, message: Any) -> None:
        self.sock.sendall(self.packer.pack(message))

    def reader(self) -> Iterator[Any]:
        """The MessagePack objects that arrive, one at a time. Kong makes a new unpacker for
        each call (mp_rpc.lua, `Rpc:call`): bytes left over from an earlier call are not read."""
        unpacker = msgpack.Unpacker(
            strict_map_key=False, unicode_errors="surrogateescape", max_buffer_size=1 << 30
        )
        while True:
            yield from unpacker
            chunk = self.sock.recv(1 << 20)  # TimeoutError propagates
            if not chunk:
                raise EOFError("closed")
            unpacker.feed(chunk)

    def idle_alive(self) -> bool:
        """nginx closes an idle keepalive connection as soon as it reads EOF or any byte on it
        (lua-nginx-module's keepalive close handler): such a connection is never reused."""
        # A socket with a timeout waits for readability before recv, whatever the flags: look
        # without waiting, then restore the timeout.
        timeout = self.sock.gettimeout()
        self.sock.setblocking(False)
        try:
            self.sock.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return True
        except OSError:
            return False
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(timeout)
        return False  # EOF, or bytes nobody asked for: either way nginx closed it

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Pool:
    """A worker's keepalive pool of connections to the server's socket."""

    def __init__(self, path: str, size: int, timeout: float) -> None:
        self.path = path
        self.size = size
        self.timeout = timeout
        self.opened = 0
        self._idle: collections.deque[_Connection] = collections.deque()
        self._lock = threading.Lock()

    def acquire(self) -> _Connection:
        """An idle connection (the least recently used one while at least two are idle, so that
        consecutive messages of one event change connection), else a new one (OSError)."""
        with self._lock:
            for conn in [c for c in self._idle if not c.idle_alive()]:
                self._idle.remove(conn)
                conn.close()
            if len(self._idle) >= min(self.size, 2):
                return self._idle.popleft()
        conn = _Connection(self.path, self.timeout)
        with self._lock:
            self.opened += 1
        return conn

    def release(self, conn: _Connection) -> None:
        """setkeepalive(): back into the pool; a full pool closes its least recently used."""
        with self._lock:
            if len(self._idle) >= self.size:
                self._idle.popleft().close()
            self._idle.append(conn)

    def close(self) -> None:
        with self._lock:
            while self._idle:
                self._idle.popleft().close()


def _socket_error(exc: OSError) -> str:
    """The error text nginx's cosocket gives for a failed connect or send."""
    if exc.errno is not None:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


def _tonumber(value: Any) -> int | float | None:
    """Lua's tonumber for what a notification may carry."""
    if _is_number(value):
        return value  # type: ignore[no-any-return]
    if isinstance(value, str):
        with contextlib.suppress(ValueError):
            number = float(value)
            return int(number) if number.is_integer() else number
    return None


def _index(value: Any, key: str) -> Any:
    """`value.key` in Lua: indexing something that is not a table is a Lua error."""
    if not isinstance(value, dict):
        raise _KongLuaError(f"attempt to index a {_lua_type(value)} value (field '{key}')")
    return value.get(key)


# --- Kong's plugin-info checks ----------------------------------------------------------------


def validate_plugin_info(dump: Any) -> dict[str, Any]:
    """What Kong 3.9 does with the query command's output; returns the plugin it keeps."""
    if not isinstance(dump, list | dict):
        raise HarnessError(f"not a plugin info table: {dump!r}")
    plugins = dump.get("Plugins", dump) if isinstance(dump, dict) else dump
    if not plugins:
        raise HarnessError("no plugin in the dump")
    # Kong@3.9.x:kong/runloop/plugin_servers/process.lua: `(dump.Plugins or dump)[1]`, only the
    # first plugin of a server is loaded (Kong/kong#14701)
    info = plugins[0]
    for key in ("Name", "Phases", "Priority", "Version", "Schema"):
        if key not in info:
            raise HarnessError(f"plugin info lacks {key}")
    if not isinstance(info["Name"], str) or not info["Name"]:
        raise HarnessError("Name must be a non-empty string")
    if not isinstance(info["Priority"], int) or isinstance(info["Priority"], bool):
        raise HarnessError(f"Priority must be an integer, got {info['Priority']!r}")
    if not isinstance(info["Version"], str) or not VERSION_RE.match(info["Version"]):
        raise HarnessError(f'Version must be an "x.y.z" string, got {info["Version"]!r}')
    phases = info["Phases"]
    if not isinstance(phases, list) or not set(phases) <= set(KONG_PHASES):
        raise HarnessError(f"unknown phases {phases!r}")
    validate_subschema(info["Schema"], info["Name"])
    return dict(info)


_FIELD_TYPES = {
    "string",
    "integer",
    "number",
    "boolean",
    "set",
    "array",
    "map",
    "record",
    "foreign",
    "function",
    "json",
}


def validate_subschema(schema: Any, name: str) -> None:
    """The parts of Kong's MetaSubSchema a plugin schema can get wrong."""
    if not isinstance(schema, dict) or schema.get("name") != name:
        raise HarnessError("Schema must be a table named after the plugin")
    fields = schema.get("fields")
    if not isinstance(fields, list):
        raise HarnessError("Schema.fields must be an array")
    names = []
    for entry in fields:
        if not isinstance(entry, dict) or len(entry) != 1:
            raise HarnessError(f"each schema field is a one-key table, got {entry!r}")
        ((field_name, attrs),) = entry.items()
        names.append(field_name)
        _validate_field(field_name, attrs)
    if "config" not in names:
        raise HarnessError("a plugin schema needs a config record")


def _validate_field(name: str, attrs: Any) -> None:
    if not isinstance(attrs, dict) or attrs.get("type") not in _FIELD_TYPES:
        raise HarnessError(f"field {name}: bad type in {attrs!r}")
    description = attrs.get("description")
    if description is not None and not 10 <= len(description) <= 500:
        raise HarnessError(f"field {name}: description must be 10 to 500 characters")
    if attrs["type"] == "record":
        for entry in attrs.get("fields", []):
            ((sub_name, sub_attrs),) = entry.items()
            _validate_field(f"{name}.{sub_name}", sub_attrs)
    if attrs["type"] in ("set", "array") and "elements" not in attrs:
        raise HarnessError(f"field {name}: {attrs['type']} needs elements")
    default = attrs.get("default")
    if attrs["type"] == "integer" and (not isinstance(default, int | None) or default is True):
        raise HarnessError(f"field {name}: integer default expected")


# --- Plugin entities, instances, workers ---------------------------------------------------------


@dataclass(frozen=True)
class _EntityVersion:
    """A plugin entity as one configuration push left it."""

    plugin_id: str
    version: int
    config: Mapping[str, Any]


@dataclass
class _InstanceInfo:
    """An entry of plugin.lua's `running_instances` (one worker's cache, keyed by plugin id)."""

    conf: dict[str, Any]
    seq: Any
    id: int | None = None  # None: a request of this worker is starting it (a claim)
    # Kong fills `plugin_name` and `rpc` in only once StartInstance answered; the resets drop
    # only entries that have them.
    started: bool = False


@dataclass
class ServerSpawn:
    """One plugin-server process the supervisor started (times from time.monotonic())."""

    pid: int
    started_at: float
    exited_at: float | None = None
    returncode: int | None = None  # negative: killed by that signal


@dataclass
class _RequestState:
    scripted: ScriptedRequest
    outcome: Outcome
    headers: dict[str, list[Any]]
    body_in_file: bool
    buffered: bool  # ngx.ctx.buffered_proxying
    ctx_shared: dict[str, Any] = field(default_factory=dict)


class KongWorker:
    """One nginx worker's view of the plugin server: its Rpc object (message ids, the server
    pid it saw last), its `running_instances`, its keepalive pool and its queue of worker events.

    `resets` records why this worker dropped its instance ids (for tests to read)."""

    def __init__(self, harness: KongHarness, index: int) -> None:
        self.harness = harness
        self.index = index
        self.server_pid: int | float | None = None
        self.resets: list[str] = []
        self.pool = _Pool(harness.socket_path, harness.pool_size, harness.timeout)
        self._msg_ids = itertools.count(1)
        self._instances: dict[str, _InstanceInfo] = {}
        self._confs: dict[tuple[str, int], dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._events: list[tuple[float, str, int]] = []  # (due, plugin name, posted by)

    def instance_ids(self) -> dict[str, int]:
        """plugin id -> instance id this worker holds."""
        with self._cond:
            return {k: v.id for k, v in self._instances.items() if v.id is not None}

    # -- Rpc:call ------------------------------------------------------------------------------

    def rpc(
        self, method: str, arg: Any, st: _RequestState | None = None, *, strict: bool = False
    ) -> Any:
        """Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `Rpc:call`: a pooled
        connection, the request, then notifications handled until the response."""
        harness = self.harness
        msg_id = next(self._msg_ids)
        try:
            conn = self.pool.acquire()
        except OSError as exc:
            err = _socket_error(exc)
            harness.log(st, "error", f"trying to connect: {err}")
            raise _RpcFailure(err, answered=False) from exc
        if st is not None:
            st.outcome.connections.append(conn.id)
        try:
            conn.send([0, msg_id, method, [arg]])
            for message in conn.reader():
                if isinstance(message, list) and message and message[0] == 2:
                    # notification: [2, label, args]
                    self.notification(
                        message[1] if len(message) > 1 else None,
                        message[2] if len(message) > 2 else None,
                    )
                    continue
                if not (isinstance(message, list) and len(message) == 4 and message[0] == 1):
                    raise _KongLuaError("RPC response expected from Go plugin server")
                if message[1] != msg_id:
                    raise _KongLuaError("unexpected RPC response ID from Go plugin server")
                self.pool.release(conn)
                conn = None  # type: ignore[assignment]
                if message[2] is not None:
                    raise _RpcFailure(message[2], answered=True)
                return message[3]
        except TimeoutError as exc:
            if strict or harness.raise_on_timeout:
                raise RpcTimeout(f"no answer to {method} within {harness.timeout} s") from exc
            raise _RpcFailure("timeout", answered=False) from exc
        except (EOFError, OSError) as exc:
            # Kong's reader fails: "no data"
            raise _RpcFailure("no data", answered=False) from exc
        finally:
            if conn is not None:
                conn.close()  # Kong drops a connection it could not read to the end
        raise AssertionError("unreachable")

    def notification(self, label: Any, args: Any) -> None:
        """Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua `Rpc:notification`: only the
        labels Kong knows; plugin.lua `rpc_notifications:serverPid`: a pid other than the one
        this worker's Rpc saw before drops every instance id it holds; the first is recorded."""
        if label != "serverPid":
            return
        pid = _tonumber(args)
        with self._cond:
            if self.server_pid is not None and pid != self.server_pid:
                self._drop_started(f"serverPid {self.server_pid} -> {pid}")
            self.server_pid = pid

    # -- instances -----------------------------------------------------------------------------

    def conf_for(self, entity: _EntityVersion) -> dict[str, Any]:
        """The config this worker's plugins iterator built for the entity.

        Kong@3.9.x:kong/runloop/plugins_iterator.lua, `get_plugin_config`: `__plugin_id`, a
        `__key__`, and a `__seq__` from a counter shared by the workers (each worker builds its
        own iterator, so each gets its own `__seq__`), renewed at each configuration change."""
        key = (entity.plugin_id, entity.version)
        with self._cond:
            conf = self._confs.get(key)
            if conf is None:
                conf = dict(entity.config) | {
                    "__plugin_id": entity.plugin_id,
                    "__key__": f"plugins:{self.harness.name}:{entity.plugin_id}::::",
                    "__seq__": self.harness.next_seq(),
                    "__ws_id": _DEFAULT_WORKSPACE,
                }
                self._confs[key] = conf
            return conf

    def get_instance_id(self, entity: _EntityVersion, st: _RequestState | None) -> int:
        """Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua, `get_instance_id`.

        Raises _KongLuaError when StartInstance fails (`error(err)`), _RpcFailure when another
        request of this worker held the claim for too long (`return nil, err`)."""
        self.deliver_worker_events()
        conf = self.conf_for(entity)
        key = entity.plugin_id
        deadline = time.monotonic() + CLAIM_WAIT_TIME
        with self._cond:
            info = self._instances.get(key)
            while info is not None and info.id is None:
                # another request of this worker is starting it: wait (Kong sleeps 0.1 s steps)
                if time.monotonic() > deadline:
                    del self._instances[key]
                    raise _RpcFailure(
                        f"Could not claim instance_id for {self.harness.name} (key: {key})",
                        answered=False,
                    )
                self._cond.wait(CLAIM_SLEEP_STEP)
                info = self._instances.get(key)
            if (
                info is not None
                and info.id is not None
                and info.seq == conf["__seq__"]
                and info.conf.get("__plugin_id") == key
            ):
                return info.id
            old_id = info.id if info is not None else None
            if info is None:
                info = _InstanceInfo(conf=conf, seq=conf["__seq__"])
                self._instances[key] = info
            else:
                info.id = None  # "make it evident that we're changing it"
        config_json = json.dumps(conf)  # cjson.encode
        try:
            status = self.rpc(
                "plugin.StartInstance", {"Name": self.harness.name, "Config": config_json}, st
            )
        except _RpcFailure as exc:
            self.harness.log(st, "error", f"starting instance: {exc.err}")
            with self._cond:
                if self._instances.get(key) is info:
                    del self._instances[key]  # remove the claim, some other request may succeed
                self._cond.notify_all()
            raise _KongLuaError(f"kong/runloop/plugin_servers/plugin.lua: {exc.err}") from exc
        iid = _index(status, "Id")
        if not _is_number(iid):
            raise _KongLuaError(f"StartInstance answered no instance id: {status!r}")
        with self._cond:
            info.id = int(iid)
            info.conf = conf
            info.seq = conf["__seq__"]
            info.started = True
            self._cond.notify_all()
        if old_id is not None:
            # there was a previous instance with the same key: close it, ignoring errors
            with contextlib.suppress(_RpcFailure, _KongLuaError):
                self.rpc("plugin.CloseInstance", old_id, st)
        return int(iid)

    def reset_plugin(self, reason: str) -> None:
        """plugin.lua `reset_instances_for_plugin`: this worker forgets every started instance
        of the plugin (one plugin per server: all of them)."""
        with self._cond:
            self._drop_started(reason)

    def _drop_started(self, reason: str) -> None:
        dropped = [key for key, info in self._instances.items() if info.started]
        for key in dropped:
            del self._instances[key]
        self.resets.append(reason)
        self._cond.notify_all()

    def post_event(self, due: float, plugin_name: str, posted_by: int) -> None:
        with self._cond:
            self._events.append((due, plugin_name, posted_by))

    def deliver_worker_events(self, *, force: bool = False) -> int:
        """Handle the worker events due by now (all of them with `force`); how many."""
        now = time.monotonic()
        with self._cond:
            due = [e for e in self._events if force or e[0] <= now]
            self._events = [e for e in self._events if e not in due]
            for _, plugin_name, posted_by in due:
                # Kong@3.9.x:kong/runloop/plugin_servers/init.lua, `start`: the handler of
                # "plugin_server" / "reset_instances" calls reset_instances_for_plugin
                if plugin_name == self.harness.name:
                    self._drop_started(f"worker event reset_instances from worker {posted_by}")
        return len(due)


# --- The harness --------------------------------------------------------------------------------


class KongHarness:
    """Starts a plugin server as Kong does and plays Kong's part for scripted requests.

    `workers`: nginx workers, each with its own instance ids and pool; `request(worker=None)`
    takes them in turn (round robin). `respawn`: the supervisor spawns a dead server again with
    Kong's timing; False leaves it dead until `respawn_server()`. `raise_on_timeout`: a server
    that does not answer within `timeout` raises RpcTimeout (a hang fails the test at once);
    False does what Kong does after its read timeout: log it and go on without the plugin.
    `worker_events_delay`: seconds before a worker event reaches the workers (the poster
    included); `deliver_worker_events()` delivers them at once."""

    def __init__(
        self,
        command: Sequence[str],
        prefix: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pool_size: int = LUA_SOCKET_POOL_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
        workers: int = 1,
        client_body_buffer_size: int = CLIENT_BODY_BUFFER_SIZE,
        respawn: bool = True,
        raise_on_timeout: bool = True,
        worker_events_delay: float = WORKER_EVENTS_DELAY,
    ) -> None:
        if workers < 1:
            raise ValueError("at least one worker")
        self.command = list(command)
        self.prefix = Path(prefix)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ if env is None else env)
        self.pool_size = pool_size
        self.timeout = timeout
        self.worker_count = workers
        self.client_body_buffer_size = client_body_buffer_size
        self.respawn = respawn
        self.raise_on_timeout = raise_on_timeout
        self.worker_events_delay = worker_events_delay
        self.info: dict[str, Any] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self.spawns: list[ServerSpawn] = []
        self.error_log: list[str] = []  # Kong's error.log (at its default level, notice)
        self.workers: list[KongWorker] = []
        self.log_path = self.prefix / "plugin-server.log"
        self._lock = threading.Lock()
        self._proc_lock = threading.Condition()
        self._stopping = threading.Event()
        self._respawn_requested = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._seq = itertools.count(1)
        self._round_robin = itertools.count()
        self._entities: dict[str, _EntityVersion] = {}

    # -- process ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        if self.info is None:
            self.query()
        assert self.info is not None
        return str(self.info["Name"])

    @property
    def socket_path(self) -> str:
        # Kong@3.9.x:kong/conf_loader/init.lua: the default socket is <prefix>/<name>.socket
        return str(self.prefix / f"{self.name}.socket")

    def query(self) -> dict[str, Any]:
        """Kong's query command (io.popen): `<command> -dump`, stdout JSON-decoded."""
        result = subprocess.run(
            ["/bin/sh", "-c", shlex.join([*self.command, "-dump"])],
            capture_output=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise HarnessError(f"query failed ({result.returncode}): {result.stderr.decode()}")
        try:
            dump = json.loads(result.stdout)
        except ValueError as exc:
            raise HarnessError(f"failed decoding plugin info: {result.stdout[:200]!r}") from exc
        self.info = validate_plugin_info(dump)
        return self.info

    def start_command(self) -> list[str]:
        return [
            *self.command,
            "-p",
            str(self.prefix),
            "--socket-name",
            f"{self.name}.socket",
            *self.extra_args,
        ]

    def start(self, *, wait: bool = True) -> None:
        """Kong's start: the workers, then worker 0's supervisor spawns the server; with `wait`,
        until its socket answers."""
        if self.info is None:
            self.query()
        if self._supervisor is not None and self._supervisor.is_alive():
            raise HarnessError("already started")
        self.prefix.mkdir(parents=True, exist_ok=True)
        Path(self.socket_path).unlink(missing_ok=True)
        self.workers = [KongWorker(self, i) for i in range(self.worker_count)]
        self._stopping.clear()
        self._respawn_requested.clear()
        spawned = len(self.spawns)
        self._supervisor = threading.Thread(
            target=self._supervise, name=f"pluginserver-{self.name}", daemon=True
        )
        self._supervisor.start()
        with self._proc_lock:
            while len(self.spawns) == spawned:
                self._proc_lock.wait(1)
        if wait:
            self.wait_for_socket()

    def _supervise(self) -> None:
        """Kong@3.9.x:kong/runloop/plugin_servers/process.lua, `pluginserver_timer` (run by
        worker 0 only, `start_pluginservers`)."""
        next_spawn = 0.0
        first = True
        while not self._stopping.is_set():
            if first or self.respawn:
                delay = next_spawn - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    break
            else:
                self._respawn_requested.wait()
                self._respawn_requested.clear()
                if self._stopping.is_set():
                    break
            first = False
            self.log(
                None, "notice", f"[pluginserver] starting pluginserver process for {self.name}"
            )
            proc = self._spawn()
            if proc is None:
                break
            next_spawn = time.monotonic() + RESPAWN_INTERVAL
            self.log(None, "notice", f"[pluginserver] started, pid {proc.pid}")
            returncode = proc.wait()
            if proc.stdin is not None:
                proc.stdin.close()
            with self._proc_lock:
                spawn = self.spawns[-1]
                spawn.exited_at = time.monotonic()
                spawn.returncode = returncode
                self._proc_lock.notify_all()
            if returncode == 127:
                # Kong logs it at error level; its `break` leaves only the inner wait loop, so
                # the outer loop spawns the command again (1 s after the previous start).
                self.log(
                    None,
                    "error",
                    f'[pluginserver] external pluginserver "{self.name}" start command '
                    f'"{shlex.join(self.start_command())}" exited with "command not found"',
                )
            else:
                reason, status = ("signal", -returncode) if returncode < 0 else ("exit", returncode)
                self.log(
                    None,
                    "notice",
                    f"external pluginserver '{self.name}' terminated: {reason} {status}",
                )
        self.log(
            None, "notice", f"[pluginserver] exiting: pluginserver '{self.name}' not respawned."
        )

    def _spawn(self) -> subprocess.Popen[bytes] | None:
        """ngx.pipe.spawn("exec <start command>", {merge_stderr = true})."""
        with self._proc_lock:
            if self._stopping.is_set():
                return None
            with self.log_path.open("ab") as log:
                proc = subprocess.Popen(
                    ["/bin/sh", "-c", "exec " + shlex.join(self.start_command())],
                    stdin=subprocess.PIPE,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self.env,
                )
            self.process = proc
            self.spawns.append(ServerSpawn(proc.pid, time.monotonic()))
            self._proc_lock.notify_all()
            return proc

    def wait_for_socket(self, process: subprocess.Popen[bytes] | None = None) -> None:
        """Until the server (the current one by default) accepts connections on the socket."""
        process = process or self.process
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise HarnessError(f"plugin server exited: {self.log_text()[-2000:]}")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                    probe.connect(self.socket_path)
                return
            except OSError:
                time.sleep(0.02)
        raise HarnessError(f"socket {self.socket_path} never appeared")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def log_text(self) -> str:
        """What the server printed (Kong writes it to its error.log at info level)."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kong_log_text(self) -> str:
        """Kong's own error-log lines so far (supervisor and requests)."""
        with self._lock:
            return "\n".join(self.error_log)

    def log(self, st: _RequestState | None, level: str, message: str) -> None:
        """One line of Kong's error log, kept if at `notice` or above (Kong's default)."""
        if level not in _ERROR_LOG_LEVELS:
            return
        line = f"[{level}] {message}"
        with self._lock:
            self.error_log.append(line)
        if st is not None:
            st.outcome.error_log.append(line)

    def kill_server(self, sig: int = signal.SIGKILL) -> int:
        """Send `sig` to the running server and wait until it is dead; its pid. The supervisor
        then respawns it with Kong's timing (unless `respawn` is off)."""
        with self._proc_lock:
            if not self.spawns or self.spawns[-1].exited_at is not None or self.process is None:
                raise HarnessError("no plugin server running")
            spawn = self.spawns[-1]
            self.process.send_signal(sig)
            deadline = time.monotonic() + 15
            while spawn.exited_at is None:
                if time.monotonic() > deadline:
                    raise HarnessError(f"server {spawn.pid} survived signal {sig}")
                self._proc_lock.wait(0.5)
        return spawn.pid

    def respawn_server(self) -> None:
        """With `respawn=False`: spawn the dead server again now (the supervisor's job)."""
        with self._proc_lock:
            if self.spawns and self.spawns[-1].exited_at is None:
                raise HarnessError("the plugin server is still running")
        self._respawn_requested.set()

    def wait_for_respawn(self, old_pid: int, timeout: float = 15.0) -> int:
        """Until a server other than `old_pid` runs and listens; its pid."""
        deadline = time.monotonic() + timeout
        with self._proc_lock:
            while not (self.spawns and self.spawns[-1].pid != old_pid):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise HarnessError(f"server {old_pid} was not respawned within {timeout} s")
                self._proc_lock.wait(remaining)
            process = self.process
        self.wait_for_socket(process)
        assert process is not None
        return process.pid

    def restart(self) -> None:
        """The server dies (SIGKILL) and is respawned as Kong would; the workers keep the
        instance ids they hold."""
        old = self.kill_server()
        if not self.respawn:
            self.respawn_server()
        self.wait_for_respawn(old)

    def _shutdown(self, sig: int) -> int | None:
        with self._proc_lock:
            self._stopping.set()
            self._respawn_requested.set()
            process = self.process
        returncode = None
        if process is not None:
            if process.poll() is None:
                process.send_signal(sig)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(timeout=10)
            returncode = process.returncode
        if self._supervisor is not None:
            self._supervisor.join(timeout=15)
        for worker in self.workers:
            worker.pool.close()
        return returncode

    def kill(self) -> None:
        """Everything ends now: SIGKILL, no respawn (a test's teardown)."""
        self._shutdown(signal.SIGKILL)

    def stop(self) -> int | None:
        """Kong's shutdown (process.lua `stop_pluginservers`): SIGTERM, then wait; the exit code."""
        return self._shutdown(signal.SIGTERM)

    def __enter__(self) -> KongHarness:
        self.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def proc_status(self) -> dict[str, str]:
        """/proc/<pid>/status of the server (Threads, VmRSS, ...)."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            out[key] = value.strip()
        return out

    # -- workers and entities --------------------------------------------------------------------

    def worker(self, index: int) -> KongWorker:
        assert self.workers, "start() first"
        return self.workers[index]

    def next_seq(self) -> int:
        """`ngx.shared.kong:incr("plugins_iterator:__seq__", 1, 0, 0)`: shared by the workers."""
        with self._lock:
            return next(self._seq)

    def _entity(self, config: Mapping[str, Any], plugin_id: str | None) -> _EntityVersion:
        """The plugin entity of a request: `plugin_id`, or one entity per distinct config. The
        same id with another config is a configuration change (a new `__seq__` everywhere)."""
        config_json = json.dumps(config, sort_keys=True)
        key = plugin_id or str(uuid.uuid5(_ENTITY_NAMESPACE, config_json))
        with self._lock:
            entity = self._entities.get(key)
            if entity is None or json.dumps(entity.config, sort_keys=True) != config_json:
                version = 1 if entity is None else entity.version + 1
                entity = _EntityVersion(key, version, json.loads(config_json))
                self._entities[key] = entity
            return entity

    def deliver_worker_events(self) -> int:
        """Every worker handles its pending worker events now; how many in all."""
        return sum(w.deliver_worker_events(force=True) for w in self.workers)

    def close_connections(self, worker: int | None = None) -> None:
        """Close the idle pooled connections (of one worker, or all), as when they reach
        lua_socket_keepalive_timeout: the next messages open new ones."""
        for w in self.workers if worker is None else [self.workers[worker]]:
            w.pool.close()

    # -- RPC -------------------------------------------------------------------------------------

    def call(self, method: str, arg: Any, *, worker: int = 0) -> Any:
        """One RPC as Kong sends it, through a worker's pool (notifications handled)."""
        assert self.workers, "start() first"
        try:
            return self.workers[worker].rpc(method, arg, strict=True)
        except _RpcFailure as exc:
            if exc.answered:
                raise RpcError(f"{method}: {exc.err}") from exc
            raise HarnessError(f"{method}: {exc.err}") from exc
        except _KongLuaError as exc:
            raise HarnessError(f"{method}: {exc}") from exc

    def start_instance(
        self, config: Mapping[str, Any], *, key: str | None = None, worker: int = 0
    ) -> int:
        """plugin.StartInstance with a config as Kong builds it, not cached; the instance id."""
        key = key or str(uuid.uuid4())
        conf = dict(config) | {"__plugin_id": key, "__key__": key, "__seq__": self.next_seq()}
        status = self.call(
            "plugin.StartInstance", {"Name": self.name, "Config": json.dumps(conf)}, worker=worker
        )
        if not isinstance(status, dict) or not isinstance(status.get("Id"), int):
            raise HarnessError(f"bad StartInstance answer {status!r}")
        return int(status["Id"])

    def instance(
        self, config: Mapping[str, Any], *, worker: int = 0, plugin_id: str | None = None
    ) -> int:
        """The instance id the worker holds for this plugin entity (started on demand)."""
        assert self.workers, "start() first"
        try:
            return self.workers[worker].get_instance_id(self._entity(config, plugin_id), None)
        except (_RpcFailure, _KongLuaError) as exc:
            raise HarnessError(f"get_instance_id: {exc}") from exc

    def close_instance(self, iid: int, *, worker: int = 0) -> Any:
        return self.call("plugin.CloseInstance", iid, worker=worker)

    # -- one request -----------------------------------------------------------------------------

    def request(
        self,
        scripted: ScriptedRequest,
        config: Mapping[str, Any],
        *,
        worker: int | None = None,
        plugin_id: str | None = None,
    ) -> Outcome:
        """Run one request through the plugin's phases, as Kong's runloop would, in `worker`
        (default: the next one, round robin) for the plugin entity `plugin_id` (default: one
        entity per distinct config)."""
        assert self.workers, "start() first"
        index = next(self._round_robin) % len(self.workers) if worker is None else worker
        w = self.workers[index]
        w.deliver_worker_events()
        entity = self._entity(config, plugin_id)
        phases = list(self.info["Phases"]) if self.info else []
        body_len = len(scripted.body) if scripted.body is not None else 0
        st = _RequestState(
            scripted=scripted,
            outcome=Outcome(worker=index),
            headers=request_headers(scripted),
            body_in_file=body_len > self.client_body_buffer_size,
            # Kong@3.9.x:kong/runloop/plugins_iterator.lua: a plugin with a `response` handler
            # turns on buffered proxying
            buffered="response" in phases,
        )
        outcome = st.outcome
        started = time.perf_counter()
        decided = False  # the client's response was settled before proxying (exit or 500)
        for phase in ("rewrite", "access"):
            if phase in phases and not decided:
                decided = self._run_phase(w, entity, phase, st)
        if not decided:
            outcome.upstream_called = True
            outcome.upstream_request_body = (
                outcome.set_body if outcome.set_body is not None else scripted.body
            )
            outcome.status = scripted.upstream_status
            if "response" in phases:
                self._run_phase(w, entity, "response", st)
        if "log" in phases:  # the log phase runs for every request, exited or not
            self._run_phase(w, entity, "log", st)
        outcome.elapsed = time.perf_counter() - started
        return outcome

    def _run_phase(
        self, w: KongWorker, entity: _EntityVersion, phase: str, st: _RequestState
    ) -> bool:
        """One phase of the plugin; whether it settled the client's response."""
        try:
            self._handle_event(w, entity, phase, st)
        except _KongLuaError as exc:
            st.outcome.phases[phase] = "error"
            if phase == "log":
                # Kong@3.9.x:kong/runloop/plugin_servers/plugin.lua: the log phase runs in a
                # timer after the response: the error ends that timer, the client saw nothing
                self.log(st, "error", f"lua entry thread aborted: runtime error: {exc}")
                return False
            # Kong@3.9.x:kong/init.lua, `execute_collecting_plugins_iterator` (and the response
            # phase's iterator): the plugin's error is logged and the client gets a 500
            self.log(st, "error", f"[{self.name}] {exc}")
            st.outcome.status = 500
            return True
        return st.outcome.phases.get(phase) == "exit"

    def _handle_event(
        self, w: KongWorker, entity: _EntityVersion, phase: str, st: _RequestState, depth: int = 0
    ) -> None:
        """Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `Rpc:handle_event`."""
        err: Any = None
        try:
            iid = w.get_instance_id(entity, st)  # a failed StartInstance raises: a Lua error
            self._bridge_loop(w, iid, phase, st)
        except _RpcFailure as exc:
            err = exc.err
        if err is None:
            return
        if not isinstance(err, str):
            raise _KongLuaError(f"attempt to index a {_lua_type(err)} value (err:lower())")
        if "no plugin instance" in err.lower():
            # plugin.lua `reset_instance`: this worker's instances of the plugin at once, every
            # worker's (this one included) through the worker event; then the event again
            w.reset_plugin("no plugin instance")
            self._post_reset_event(w.index)
            self.log(st, "warn", err)
            if depth >= MAX_EVENT_RETRIES:
                raise _KongLuaError("stack overflow (no plugin instance, again and again)")
            self._handle_event(w, entity, phase, st, depth + 1)
            return
        self.log(st, "error", err)
        st.outcome.phases[phase] = "skipped"
        st.outcome.skipped = True

    def _post_reset_event(self, posted_by: int) -> None:
        """kong.worker_events.post("plugin_server", "reset_instances", ...): Kong 3.9's worker
        events (resty.events.compat, Kong@3.9.x:kong/global.lua) publish to "all" workers,
        the poster included, asynchronously."""
        due = time.monotonic() + self.worker_events_delay
        for worker in self.workers:
            worker.post_event(due, self.name, posted_by)

    def _bridge_loop(self, w: KongWorker, iid: int, phase: str, st: _RequestState) -> None:
        """Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `bridge_loop`."""
        outcome = st.outcome
        outcome.instance_ids[phase] = iid
        step = w.rpc("plugin.HandleEvent", {"InstanceId": iid, "EventName": phase}, st)
        if step is None:
            outcome.phases[phase] = "empty"
            return
        event_id = _index(step, "EventId")
        while True:
            data = _index(step, "Data")
            if data == "ret":
                outcome.phases[phase] = "ret"
                return
            method = _index(data, "Method")
            raw_args = _index(data, "Args")
            args = list(raw_args) if isinstance(raw_args, list) else [raw_args]
            outcome.pdk_calls.append(PdkCall(phase, method, args))
            if method in TERMINAL_METHODS:
                self._exit(phase, method, args, st)
                # the handler's coroutine yields for good (delayed response): no further Step
                outcome.phases[phase] = "exit"
                return
            result = self._pdk(phase, method, args, st)
            if method in RAW_BODY_METHODS:
                if result is None:
                    raise _KongLuaError(
                        "MessagePack.lua: attempt to get length of local 'str' (a nil value)"
                    )
                if isinstance(result, str):
                    result = result.encode("utf-8", "surrogateescape")
            step = w.rpc(
                STEP_BY_METHOD.get(method, "plugin.Step"), {"EventId": event_id, "Data": result}, st
            )
            if step is None:
                outcome.phases[phase] = "empty"
                return

    # -- PDK answers -----------------------------------------------------------------------------

    def _exit(self, phase: str, method: str, args: list[Any], st: _RequestState) -> None:
        """kong.response.exit / kong.response.error, with their checks (Kong@3.9.x:kong/pdk/
        response.lua)."""
        self._check(phase, method, args)
        outcome = st.outcome
        status = int(args[0])
        body = args[1] if len(args) > 1 else None
        if method == "kong.response.error":
            body = json.dumps({"message": body if body is not None else "An error occurred"})
        if isinstance(body, dict | list):
            body = json.dumps(body)  # a table body is sent as JSON
        outcome.exit_status = status
        outcome.exit_body = body.encode() if isinstance(body, str) else body
        headers = args[2] if len(args) > 2 else None
        outcome.exit_headers = dict(headers) if isinstance(headers, dict) else {}
        outcome.status = status

    def _check(self, phase: str, method: str, args: list[Any]) -> None:
        accepted = PDK_PHASES.get(method)
        if accepted is not None and phase not in accepted:
            raise _KongLuaError(_phase_error(phase, accepted))
        if phase == "log" and (
            method == "kong.nginx.get_var"
            or (method.startswith("kong.request.") and method not in _SAVED_FOR_LOG)
        ):
            # the log phase runs in a timer: ngx.var and ngx.req have no request there
            raise _KongLuaError("no request found")
        _check_args(method, args)

    def _pdk(self, phase: str, method: str, args: list[Any], st: _RequestState) -> Any:
        req, outcome = st.scripted, st.outcome
        if method in req.overrides:
            return req.overrides[method]
        arg0: Any = args[0] if args else None
        if method in LOG_METHODS:
            level = method.rsplit(".", 1)[1]
            outcome.logs.append((level, args))
            text = "".join(str(a) for a in args)  # kong.log concatenates its arguments
            self.log(st, _KONG_LOG_LEVEL.get(level, level), f"[{self.name}] {text}")
            return None
        if phase == "log" and method in _SAVED_FOR_LOG:
            return self._saved_answer(method, arg0, st)
        self._check(phase, method, args)
        upstream_done = phase in ("response", "log") and outcome.upstream_called
        simple: dict[str, Any] = {
            "kong.client.get_consumer": req.consumer,
            "kong.router.get_route": req.route,
            "kong.router.get_service": req.service,
            "kong.request.get_method": req.method,
            "kong.request.get_path": req.path,
            "kong.request.get_headers": st.headers,
            "kong.request.get_query": {},
            "kong.nginx.req_start_time": req.start_time,
        }
        if method in simple:
            return simple[method]
        if method == "kong.request.get_header":
            return _header_value(st.headers, arg0)
        if method == "kong.request.get_raw_body":
            return self._raw_body(arg0, st)
        if method == "kong.service.request.enable_buffering":
            st.buffered = True
            return None
        if method == "kong.service.request.set_raw_body":
            outcome.set_body = arg0 if isinstance(arg0, bytes) else str(arg0).encode()
            return None
        if method.startswith("kong.service.request.set_") or method.startswith(
            "kong.response.set_"
        ):
            return None
        if method == "kong.service.response.get_status":
            return req.upstream_status if upstream_done else None
        if method == "kong.service.response.get_headers":
            return _lower_multimap(req.upstream_headers) if upstream_done else None
        if method == "kong.service.response.get_header":
            if not upstream_done:
                return None
            return _header_value(_lower_multimap(req.upstream_headers), arg0)
        if method == "kong.service.response.get_raw_body":
            if not st.buffered:
                # Kong@3.9.x:kong/pdk/service/response.lua
                raise _KongLuaError(
                    "service body is only available with buffered proxying "
                    "(see: kong.service.request.enable_buffering function)"
                )
            return req.upstream_body if upstream_done else b""
        if method == "kong.response.get_status":
            return outcome.status if outcome.status is not None else 200
        if method in ("kong.response.get_headers", "kong.response.get_header"):
            headers = self._response_headers(st)
            return headers if method.endswith("get_headers") else _header_value(headers, arg0)
        if method == "kong.nginx.get_var":
            return {"kong_request_id": req.request_id, "request_id": req.request_id}.get(arg0)
        if method == "kong.ctx.shared.get":
            return st.ctx_shared.get(arg0)
        if method == "kong.ctx.shared.set":
            st.ctx_shared[arg0] = args[1] if len(args) > 1 else None
            return None
        # Kong@3.9.x:kong/runloop/plugin_servers/rpc/mp_rpc.lua, `call_pdk_method`
        outcome.unknown_methods.append(method)
        self.log(st, "error", f"could not find pdk method: {method}")
        return None

    def _raw_body(self, max_size: Any, st: _RequestState) -> bytes | None:
        """Kong@3.9.x:kong/pdk/request.lua, `get_raw_body(max_allowed_file_size)`."""
        body = st.scripted.body
        if not st.body_in_file:
            return body if body is not None else b""  # in memory (or none: "")
        assert body is not None
        if max_size is None or max_size is False:
            return None  # "request body did not fit into client body buffer, ..."
        if not _is_number(max_size):
            raise _KongLuaError(f"attempt to compare {_lua_type(max_size)} with number")
        if max_size < 0:
            return None
        if max_size > 0 and len(body) > max_size:
            return None  # "request body file too big: %d > %d"
        return body

    def _response_headers(self, st: _RequestState) -> dict[str, list[Any]]:
        if st.outcome.exit_status is not None:
            return _lower_multimap(st.outcome.exit_headers or {})
        return _lower_multimap(st.scripted.upstream_headers) if st.outcome.upstream_called else {}

    def _saved_answer(self, method: str, arg0: Any, st: _RequestState) -> Any:
        """plugin.lua `exposed_api` with `get_saved()`: the log phase's snapshot of the request."""
        req = st.scripted
        if method == "kong.log.serialize":
            st.outcome.serialized = self.serialize(req, st.outcome)
            return json.dumps(st.outcome.serialized)  # cjson.encode on Kong's side
        if method == "kong.request.get_headers":
            return st.headers
        if method == "kong.request.get_header":
            return _header_value(st.headers, arg0)
        if method == "kong.response.get_status":
            return st.outcome.status
        if method == "kong.response.get_headers":
            return self._response_headers(st)
        if method == "kong.response.get_header":
            return _header_value(self._response_headers(st), arg0)
        return req.start_time  # kong.nginx.req_start_time

    @staticmethod
    def serialize(req: ScriptedRequest, outcome: Outcome) -> dict[str, Any]:
        """The parts of kong.log.serialize() a plugin may read."""
        exited = outcome.exit_status is not None
        response_headers = (
            {k.lower(): v for k, v in (outcome.exit_headers or {}).items()}
            if exited
            else {k: v[0] for k, v in _lower_multimap(req.upstream_headers).items()}
        )
        latency_ms = max(0.0, (time.time() - req.start_time) * 1000)
        status = outcome.status if outcome.status is not None else req.upstream_status
        snapshot: dict[str, Any] = {
            "request": {
                "id": req.request_id,
                "method": req.method,
                "uri": req.path,
                "headers": {k: v[0] for k, v in request_headers(req).items()},
                "size": len(req.body or b""),
            },
            "upstream_status": str(req.upstream_status) if outcome.upstream_called else "",
            "response": {
                "status": status,
                "headers": response_headers,
                "size": len(outcome.exit_body or b"") if exited else len(req.upstream_body),
            },
            "latencies": {"kong": 1, "proxy": latency_ms, "request": latency_ms},
            "started_at": int(req.start_time * 1000),
            "client_ip": "127.0.0.1",
            "route": req.route,
            "service": req.service,
            "consumer": req.consumer,
        }
        snapshot.update(req.serialize_extra)
        return snapshot

    def close(self) -> None:
        self.stop()


HarnessFactory = Callable[..., KongHarness]

__all__ = [
    "CLIENT_BODY_BUFFER_SIZE",
    "DEFAULT_TIMEOUT",
    "PDK_PHASES",
    "HarnessError",
    "HarnessFactory",
    "KongHarness",
    "KongWorker",
    "Outcome",
    "PdkCall",
    "RpcError",
    "RpcTimeout",
    "ScriptedRequest",
    "ServerSpawn",
    "request_headers",
    "validate_plugin_info",
]
