"""The plugin server's event channel and id sequences, without a server."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from token_meter_plugin.event_channel import MSG_RET, EventAbandoned, EventChannel
from token_meter_plugin.plugin_server import MAX_LUA_INTEGER, IdSequence


def _queue() -> queue.Queue[object]:
    return queue.Queue()


def test_ids_of_a_later_lifetime_are_above_every_id_of_an_earlier_one() -> None:
    """A lifetime that handed out fewer ids than microseconds passed stays below the next one
    (Kong respawns a server at least a second after the previous start)."""
    earlier = IdSequence(now_us=1_000_000)
    handed_out = [next(earlier) for _ in range(999_999)]
    later = IdSequence(now_us=2_000_000)
    assert next(later) > max(handed_out)
    assert len(set(handed_out)) == len(handed_out)
    clocked = IdSequence()
    first = [next(clocked) for _ in range(1000)]
    time.sleep(0.002)  # 2000 µs: more than the ids handed out
    assert next(IdSequence()) > max(first)


def test_ids_fit_a_lua_number() -> None:
    assert next(IdSequence()) < MAX_LUA_INTEGER
    with pytest.raises(ValueError, match="Lua"):
        IdSequence(now_us=MAX_LUA_INTEGER)


def test_a_handler_waiting_for_a_step_that_never_comes_gives_up_and_is_released() -> None:
    released = threading.Event()
    channel = EventChannel(_queue, released.set, timeout=0.05)
    channel.put({"Method": "kong.request.get_raw_body", "Args": []})
    with pytest.raises(EventAbandoned, match="no Step"):
        channel.get()
    assert released.is_set()
    # Nothing more reaches the server for that event, not even its "ret".
    channel.handler_returned()
    with pytest.raises(EventAbandoned):
        channel.put({"Method": "kong.log.err", "Args": ["late"]})


def test_a_step_that_comes_in_time_is_handed_to_the_handler() -> None:
    channel = EventChannel(_queue, timeout=5)
    channel.send_to_handler(("answer", None))
    assert channel.get() == ("answer", None)


def test_the_server_side_stops_waiting_for_a_stuck_handler() -> None:
    released = threading.Event()
    channel = EventChannel(_queue, released.set, timeout=0.05)
    assert channel.next_message() == MSG_RET
    assert released.is_set()
