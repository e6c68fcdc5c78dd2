"""Plugin instances and events: kong-pdk's PluginServer with its faulty methods replaced.

kong-pdk is unmaintained; instead of patching its globals, `GuardedPluginServer` subclasses
kong_pdk.server.PluginServer (see docs/architecture.md, "kong-pdk 0.36 defects"):

- events run in a fresh thread or greenlet behind an `EventChannel`, and whatever the handler
  does the server answers Kong (defect 1); nothing is kept or left waiting after
  `kong.response.exit` (defect 2); no global lock is held while a handler works before its
  first PDK call;
- instance and event ids come from `IdSequence`, so an id Kong kept across a respawn never names
  an instance of the new lifetime;
- handlers get Python-style PDK returns (defect 7), never the multiprocessing pool.
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
import time
from typing import Any, Final

from gevent import spawn as gspawn  # type: ignore[import-untyped]
from kong_pdk.exception import PluginServerException
from kong_pdk.server import PluginServer

from .event_channel import (
    HANDLER_TIMEOUT_S,
    MSG_RET,
    EventChannel,
    gevent_queue,
    is_terminal,
    run_event,
    thread_queue,
)

log = logging.getLogger("token_meter_plugin")

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
        self._make_queue = gevent_queue if use_gevent else thread_queue
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
            gspawn(run_event, phase, channel)
        else:
            threading.Thread(target=run_event, args=(phase, channel), daemon=True).start()
        first = channel.next_message()
        # An event whose first message is "ret" or an exit is over for Kong: keep nothing
        # (kong-python-pdk#59 kept an entry per `exit`-first request).
        if first != MSG_RET and not is_terminal(first):
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
        if reply == MSG_RET or is_terminal(reply):
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
