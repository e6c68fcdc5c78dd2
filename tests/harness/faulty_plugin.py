"""A plugin that misbehaves on purpose, served like ours, to prove the server-level guards and the
Kong-side harness.

    python -m tests.harness.faulty_plugin [-dump | -p PREFIX --socket-name NAME [-g]]
    python -m tests.harness.faulty_plugin --vanilla ...   # the same plugin on bare kong-pdk
    ... --exit-with CODE          # when serving: exit at once with CODE (a server that dies young)
    ... --announce-pid FILE       # announce the pid written in FILE on each connection

Its phases are deliberately NOT wrapped in `guard_phase`: what is tested is that the server
itself survives them. The instance config's `behaviour` picks the fault.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

NAME = "faulty"


class Faulty:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.behaviour = config.get("behaviour", "ok")
        if self.behaviour == "raise_in_init":
            raise RuntimeError("this config cannot start an instance")

    def access(self, kong: Any) -> None:
        behaviour = self.behaviour
        if behaviour == "raise_first":
            raise RuntimeError("fails before its first PDK call")
        if behaviour == "exit_first":
            kong.response.exit(403, b'{"message":"no"}', {"X-Faulty": "exit-first"})
            return
        if behaviour == "tag":  # which instance (config) ran this request
            kong.service.request.set_header("x-tag", str(self.config.get("tag")))
            return
        consumer = kong.client.get_consumer()
        if behaviour == "raise_later":
            raise RuntimeError("fails after a PDK call")
        if behaviour == "call_after_exit":
            kong.response.exit(403, b'{"message":"no"}', {"X-Faulty": "after-exit"})
            kong.log.err("a PDK call after exit")
            return
        if behaviour == "echo_body":
            # 0: no size limit, so Kong reads a body nginx buffered to a temp file too
            body = kong.request.get_raw_body(0)
            kong.service.request.set_raw_body(body)
            return
        if behaviour == "read_body_noarg":  # nil (a 500 in Kong) for a temp-file body
            kong.service.request.set_raw_body(kong.request.get_raw_body())
            return
        if behaviour == "read_body_max":
            kong.service.request.set_raw_body(kong.request.get_raw_body(self.config["max"]))
            return
        if behaviour == "wrong_phase":  # the upstream's body does not exist in access
            kong.service.response.get_raw_body()
            kong.service.request.set_header("x-after", "1")
            return
        if behaviour == "call":  # any PDK call, then one more to show whether a Step came back
            fn = kong
            for part in self.config["method"].split(".")[1:]:
                fn = getattr(fn, part)
            fn(*self.config.get("args", []))
            kong.service.request.set_header("x-after", "1")
            return
        if behaviour == "echo_length":  # the framing headers Kong presents
            length = kong.request.get_header("content-length")
            encoding = kong.request.get_header("transfer-encoding")
            kong.service.request.set_header("x-length", f"{length}|{encoding}")
            return
        if behaviour == "slow":  # holds its event open: concurrent requests need connections
            time.sleep(float(self.config.get("seconds", 0.3)))
            kong.client.get_consumer()
            return
        if behaviour == "echo_header":
            value = kong.request.get_header("x-bytes")
            kong.service.request.set_header("x-echo", value)
            return
        if behaviour == "echo_consumer":
            kong.service.request.set_header("x-consumer", (consumer or {}).get("username"))


def _take_option(name: str) -> str | None:
    """Remove `name VALUE` from sys.argv (the servers' own parsers do not know it)."""
    if name not in sys.argv:
        return None
    at = sys.argv.index(name)
    value = sys.argv[at + 1]
    del sys.argv[at : at + 2]
    return value


def _install_announcing_server(pid_file: str) -> None:
    """Serve with a GuardedRpcServer that announces `[2, "serverPid", <pid in pid_file>]` first
    on each connection, and only that: any serverPid the server itself sends is dropped, so the
    test decides which pid Kong sees."""
    import msgpack

    from token_meter_plugin import rpc, server

    class OwnAnnouncementOnly:
        def __init__(self, conn: Any) -> None:
            self._conn = conn

        def sendall(self, data: bytes) -> Any:
            try:
                message = msgpack.unpackb(data, strict_map_key=False)
            except ValueError:  # not exactly one message (msgpack's errors are ValueErrors)
                message = None
            if isinstance(message, list) and message[:2] == [2, "serverPid"]:
                return None
            return self._conn.sendall(data)

        def __getattr__(self, name: str) -> Any:
            return getattr(self._conn, name)

    class AnnouncingRpcServer(rpc.GuardedRpcServer):  # type: ignore[misc]
        def handle(self, conn: Any, *rest: Any) -> None:
            text = Path(pid_file).read_text().strip()
            pid = int(text) if text else os.getpid()
            conn.sendall(msgpack.packb([2, "serverPid", pid]))
            super().handle(OwnAnnouncementOnly(conn), *rest)

    # `serve` builds its RPC server from these names: a subclass, not a change of the code.
    server.GuardedRpcServer = AnnouncingRpcServer  # type: ignore[misc]
    rpc.GuardedRpcServer = AnnouncingRpcServer  # type: ignore[misc]


def main() -> None:
    exit_with = _take_option("--exit-with")
    if exit_with is not None and "-dump" not in sys.argv:
        os._exit(int(exit_with))
    pid_file = _take_option("--announce-pid")
    vanilla = "--vanilla" in sys.argv
    if vanilla:
        sys.argv.remove("--vanilla")
        from kong_pdk.cli import start_dedicated_server

        start_dedicated_server(NAME, Faulty, "0.1.0", 100, [])
        return
    from token_meter_plugin.server import serve

    if pid_file is not None:
        _install_announcing_server(pid_file)
    info = {
        "Name": NAME,
        "Phases": ["access"],
        "Priority": 100,
        "Version": "0.1.0",
        "Schema": {"name": NAME, "fields": [{"config": {"type": "record", "fields": []}}]},
    }
    serve(NAME, Faulty, phases=["access"], info=info)


if __name__ == "__main__":
    main()
