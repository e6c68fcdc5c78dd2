"""Kong's side of a Python plugin server, for tests and benchmarks.

Reproduces what Kong 3.x does with an external plugin (KONG-PLUGIN-SERVER.md;
kong/runloop/plugin_servers/{process,plugin}.lua and rpc/mp_rpc.lua):

- query: run `<command> -dump` through the shell, JSON-decode stdout and keep the first plugin,
  refusing what Kong 3.9 refuses (a non "x.y.z" Version, a non-integer Priority, a schema that is
  not a subschema with a `config` record);
- start: `exec <command> -p <prefix> --socket-name <name>.socket` through the shell, stdout and
  stderr joined into one log, then wait for the socket;
- MessagePack RPC on the Unix socket, each message possibly on another pooled connection:
  `plugin.StartInstance` (Config as a JSON string with `__plugin_id`, `__key__`, `__seq__`),
  `plugin.HandleEvent`, and the PDK calls of the handler answered from a `ScriptedRequest` with
  the Step variant Kong uses for the method; `get_raw_body` results as `bin`, `kong.log.serialize`
  as a JSON string, a failed call as nil; no Step after `kong.response.exit`/`error`.

It is not a call of Python functions: the plugin runs in its own process, started as Kong does.
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
LOG_METHODS = frozenset(
    f"kong.log.{level}"
    for level in ("alert", "crit", "err", "warn", "notice", "info", "debug", "inspect")
)
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
DEFAULT_TIMEOUT = 10.0  # generous: only there to turn a hang into a failure


class HarnessError(AssertionError):
    """Kong would refuse this plugin, or the server misbehaved on the wire."""


class RpcTimeout(HarnessError):
    """The plugin server did not answer in time: a hang (Kong would log a timeout)."""


class RpcError(HarnessError):
    """The plugin server answered an RPC with an error."""


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
    MessagePack `str` whatever their bytes)."""

    method: str = "POST"
    path: str = "/v1/chat/completions"
    headers: Mapping[str, str | bytes | list[str]] = field(
        default_factory=lambda: {"content-type": "application/json"}
    )
    body: bytes | None = b'{"model":"gpt-4o-mini","messages":[]}'
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
    # replace the PDK answer of a method (the value is sent as is; None sends nil)
    overrides: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class PdkCall:
    phase: str
    method: str
    args: list[Any]


@dataclass
class Outcome:
    """What Kong saw of one request."""

    phases: dict[str, str] = field(default_factory=dict)  # phase -> "ret" | "exit" | "error: .."
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

    @property
    def round_trips(self) -> int:
        """PDK round trips (Steps Kong sent); an exit is a call Kong answers with no Step."""
        return sum(1 for call in self.pdk_calls if call.method not in TERMINAL_METHODS)

    def methods(self, phase: str | None = None) -> list[str]:
        return [c.method for c in self.pdk_calls if phase is None or c.phase == phase]

    def exit_json(self) -> Any:
        assert self.exit_body is not None, "the plugin did not exit"
        return json.loads(self.exit_body)


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


# --- RPC connections ----------------------------------------------------------------------------


class _Connection:
    def __init__(self, path: str, timeout: float) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.unpacker = msgpack.Unpacker(
            strict_map_key=False,
            unicode_errors="surrogateescape",
            max_buffer_size=1 << 30,
        )
        self.packer = msgpack.Packer(use_bin_type=True, unicode_errors="surrogateescape")

    def call(self, msgid: int, method: str, arg: Any) -> Any:
        self.sock.sendall(self.packer.pack([0, msgid, method, [arg]]))
        while True:
            for message in self.unpacker:
                kind, rid, error, result = message
                if kind != 1 or rid != msgid:
                    raise HarnessError(f"unexpected RPC response {message!r} to #{msgid}")
                if error is not None:
                    raise RpcError(f"{method}: {error}")
                return result
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError as exc:
                raise RpcTimeout(f"no answer to {method} within the timeout") from exc
            if not chunk:
                raise HarnessError(f"plugin server closed the connection during {method}")
            self.unpacker.feed(chunk)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class _Pool:
    """Kong's keepalive pool: any idle connection, least recently used first, so consecutive
    messages of one event go out on different connections."""

    def __init__(self, path: str, size: int, timeout: float) -> None:
        self.path = path
        self.size = size
        self.timeout = timeout
        self._idle: collections.deque[_Connection] = collections.deque()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def connection(self) -> Iterator[_Connection]:
        with self._lock:
            conn = self._idle.popleft() if len(self._idle) >= min(self.size, 2) else None
        if conn is None:
            conn = _Connection(self.path, self.timeout)
        ok = False
        try:
            yield conn
            ok = True
        finally:
            if ok:
                with self._lock:
                    if len(self._idle) < self.size:
                        self._idle.append(conn)
                        conn = None  # type: ignore[assignment]
            if conn is not None:
                conn.close()

    def close(self) -> None:
        with self._lock:
            while self._idle:
                self._idle.popleft().close()


# --- Kong's plugin-info checks ----------------------------------------------------------------


def validate_plugin_info(dump: Any) -> dict[str, Any]:
    """What Kong 3.9 does with the query command's output; returns the plugin it keeps."""
    if not isinstance(dump, list | dict):
        raise HarnessError(f"not a plugin info table: {dump!r}")
    plugins = dump.get("Plugins", dump) if isinstance(dump, dict) else dump
    if not plugins:
        raise HarnessError("no plugin in the dump")
    info = plugins[0]  # Kong/kong#14701: only the first plugin of a server is loaded
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


# --- The harness --------------------------------------------------------------------------------


class KongHarness:
    """Starts a plugin server as Kong does and plays Kong's part for scripted requests."""

    def __init__(
        self,
        command: Sequence[str],
        prefix: Path,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        pool_size: int = 4,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.command = list(command)
        self.prefix = Path(prefix)
        self.extra_args = list(extra_args)
        self.env = dict(os.environ if env is None else env)
        self.pool_size = pool_size
        self.timeout = timeout
        self.info: dict[str, Any] | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._pool: _Pool | None = None
        self._msgids = itertools.count(1)
        self._instances: dict[str, int] = {}
        self._seq = itertools.count(1)
        self._instance_lock = threading.Lock()
        self.log_path = self.prefix / "plugin-server.log"

    # -- process ---------------------------------------------------------------------------------

    @property
    def name(self) -> str:
        if self.info is None:
            self.query()
        assert self.info is not None
        return str(self.info["Name"])

    @property
    def socket_path(self) -> str:
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

    def start(self) -> None:
        """Kong's start command (ngx.pipe.spawn "exec <cmd>"), then wait for the socket."""
        if self.info is None:
            self.query()
        self.prefix.mkdir(parents=True, exist_ok=True)
        Path(self.socket_path).unlink(missing_ok=True)
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            ["/bin/sh", "-c", "exec " + shlex.join(self.start_command())],
            stdin=subprocess.PIPE,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        log.close()
        self.wait_for_socket()
        self._pool = _Pool(self.socket_path, self.pool_size, self.timeout)
        self._instances.clear()

    def wait_for_socket(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
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
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill(self) -> None:
        if self._pool is not None:
            self._pool.close()
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def restart(self) -> None:
        """What Kong does when the server dies: spawn it again (instances restart on demand)."""
        self.kill()
        self.start()

    def stop(self) -> int | None:
        """Kong's shutdown: SIGTERM, then wait."""
        if self._pool is not None:
            self._pool.close()
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

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

    # -- RPC -------------------------------------------------------------------------------------

    def call(self, method: str, arg: Any) -> Any:
        assert self._pool is not None, "start() first"
        with self._pool.connection() as conn:
            return conn.call(next(self._msgids), method, arg)

    def start_instance(self, config: Mapping[str, Any], *, key: str | None = None) -> int:
        """plugin.StartInstance as get_instance_id does it; returns the instance id."""
        key = key or str(uuid.uuid4())
        seq = next(self._seq)
        conf = dict(config) | {"__plugin_id": key, "__key__": key, "__seq__": seq}
        status = self.call("plugin.StartInstance", {"Name": self.name, "Config": json.dumps(conf)})
        if not isinstance(status, dict) or not isinstance(status.get("Id"), int):
            raise HarnessError(f"bad StartInstance answer {status!r}")
        return int(status["Id"])

    def instance(self, config: Mapping[str, Any]) -> int:
        """The running instance for this config (one per config, like Kong's per plugin id)."""
        cache_key = json.dumps(config, sort_keys=True)
        with self._instance_lock:
            iid = self._instances.get(cache_key)
            if iid is None:
                iid = self.start_instance(config)
                self._instances[cache_key] = iid
            return iid

    def close_instance(self, iid: int) -> Any:
        return self.call("plugin.CloseInstance", iid)

    def request(self, scripted: ScriptedRequest, config: Mapping[str, Any]) -> Outcome:
        """Run one request through the plugin's phases, as Kong's runloop would."""
        outcome = Outcome()
        ctx_shared: dict[str, Any] = {}
        phases = list(self.info["Phases"]) if self.info else []
        if "access" in phases:
            self._phase(scripted, config, "access", outcome, ctx_shared)
        if outcome.exit_status is None:
            outcome.upstream_called = True
            outcome.upstream_request_body = (
                outcome.set_body if outcome.set_body is not None else scripted.body
            )
            if "response" in phases:
                self._phase(scripted, config, "response", outcome, ctx_shared)
        if "log" in phases:  # the log phase runs for every request, exited or not
            self._phase(scripted, config, "log", outcome, ctx_shared)
        return outcome

    def _phase(
        self,
        scripted: ScriptedRequest,
        config: Mapping[str, Any],
        phase: str,
        outcome: Outcome,
        ctx_shared: dict[str, Any],
    ) -> None:
        iid = self.instance(config)
        try:
            step = self.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": phase})
        except RpcError as exc:
            if "no plugin instance" not in str(exc).lower():
                raise
            # mp_rpc.lua: reset the instance and handle the event again
            with self._instance_lock:
                self._instances.clear()
            iid = self.instance(config)
            step = self.call("plugin.HandleEvent", {"InstanceId": iid, "EventName": phase})
        event_id = step["EventId"]
        while True:
            data = step["Data"]
            if data == "ret":
                outcome.phases[phase] = "ret"
                return
            method = data["Method"]
            args = list(data.get("Args") or [])
            outcome.pdk_calls.append(PdkCall(phase, method, args))
            if method in TERMINAL_METHODS:
                # kong.response.exit ends the request: Kong sends no further Step.
                outcome.phases[phase] = "exit"
                outcome.exit_status = args[0] if args else None
                body = args[1] if len(args) > 1 else None
                outcome.exit_body = body.encode() if isinstance(body, str) else body
                outcome.exit_headers = dict(args[2]) if len(args) > 2 and args[2] else {}
                return
            result = self._answer(scripted, phase, method, args, outcome, ctx_shared)
            step = self.call(
                STEP_BY_METHOD.get(method, "plugin.Step"), {"EventId": event_id, "Data": result}
            )

    # -- PDK answers -----------------------------------------------------------------------------

    def _answer(  # noqa: PLR0917 (Kong's state of one request, passed along)
        self,
        req: ScriptedRequest,
        phase: str,
        method: str,
        args: list[Any],
        outcome: Outcome,
        ctx_shared: dict[str, Any],
    ) -> Any:
        if method in req.overrides:
            return req.overrides[method]
        upstream_done = phase in ("response", "log") and outcome.upstream_called
        arg0 = args[0] if args else None
        if method in LOG_METHODS:
            outcome.logs.append((method.rsplit(".", 1)[1], args))
            return None
        simple: dict[str, Any] = {
            "kong.client.get_consumer": req.consumer,
            "kong.router.get_route": req.route,
            "kong.router.get_service": req.service,
            "kong.request.get_method": req.method,
            "kong.request.get_path": req.path,
            "kong.request.get_headers": _lower_multimap(req.headers),
            "kong.request.get_query": {},
            "kong.nginx.req_start_time": req.start_time,
        }
        if method in simple:
            return simple[method]
        if method == "kong.request.get_header":
            values = _lower_multimap(req.headers).get(str(arg0).lower())
            return values[0] if values else None
        if method == "kong.request.get_raw_body":
            return req.body  # bytes travel as MessagePack bin; None (a file body) as nil
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
            values = _lower_multimap(req.upstream_headers).get(str(arg0).lower())
            return values[0] if values else None
        if method == "kong.service.response.get_raw_body":
            return req.upstream_body if upstream_done else None
        if method == "kong.response.get_status":
            return outcome.exit_status or (req.upstream_status if upstream_done else 200)
        if method == "kong.nginx.get_var":
            return {"kong_request_id": req.request_id, "request_id": req.request_id}.get(arg0)
        if method == "kong.ctx.shared.get":
            return ctx_shared.get(arg0)
        if method == "kong.ctx.shared.set":
            ctx_shared[arg0] = args[1] if len(args) > 1 else None
            return None
        if method == "kong.log.serialize":
            if phase != "log":
                return None  # kong.log.serialize is log-phase only: nil, err
            outcome.serialized = self.serialize(req, outcome)
            return json.dumps(outcome.serialized)  # cjson.encode on Kong's side
        outcome.unknown_methods.append(method)
        return None  # Kong: "could not find pdk method", nil

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
        snapshot: dict[str, Any] = {
            "request": {
                "id": req.request_id,
                "method": req.method,
                "uri": req.path,
                "headers": {k: v[0] for k, v in _lower_multimap(req.headers).items()},
                "size": len(req.body or b""),
            },
            "upstream_status": "" if exited else str(req.upstream_status),
            "response": {
                "status": outcome.exit_status if exited else req.upstream_status,
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
