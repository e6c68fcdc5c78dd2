"""A plugin that misbehaves on purpose, served like ours, to prove the server-level guards.

    python -m tests.harness.faulty_plugin [-dump | -p PREFIX --socket-name NAME [-g]]
    python -m tests.harness.faulty_plugin --vanilla ...   # the same plugin on bare kong-pdk

Its phases are deliberately NOT wrapped in `guard_phase`: what is tested is that the server
itself survives them. The instance config's `behaviour` picks the fault.
"""

from __future__ import annotations

import sys
from typing import Any

NAME = "faulty"


class Faulty:
    def __init__(self, config: dict[str, Any]) -> None:
        self.behaviour = config.get("behaviour", "ok")

    def access(self, kong: Any) -> None:
        behaviour = self.behaviour
        if behaviour == "raise_first":
            raise RuntimeError("fails before its first PDK call")
        if behaviour == "exit_first":
            kong.response.exit(403, b'{"message":"no"}', {"X-Faulty": "exit-first"})
            return
        consumer = kong.client.get_consumer()
        if behaviour == "raise_later":
            raise RuntimeError("fails after a PDK call")
        if behaviour == "call_after_exit":
            kong.response.exit(403, b'{"message":"no"}', {"X-Faulty": "after-exit"})
            kong.log.err("a PDK call after exit")
            return
        if behaviour == "echo_body":
            body = kong.request.get_raw_body()
            kong.service.request.set_raw_body(body)
            return
        if behaviour == "echo_header":
            value = kong.request.get_header("x-bytes")
            kong.service.request.set_header("x-echo", value)
            return
        if behaviour == "echo_consumer":
            kong.service.request.set_header("x-consumer", (consumer or {}).get("username"))


def main() -> None:
    vanilla = "--vanilla" in sys.argv
    if vanilla:
        sys.argv.remove("--vanilla")
        from kong_pdk.cli import start_dedicated_server

        start_dedicated_server(NAME, Faulty, "0.1.0", 100, [])
        return
    from token_meter_plugin.server import serve

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
