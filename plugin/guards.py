"""`guard_phase`: the phase handlers' own belt against kong-pdk 0.36 defects 1 and 2.

The server-level guards live with what they guard (docs/architecture.md, "kong-pdk 0.36
defects"): `event_channel.py` (each event in its own thread or greenlet, defects 1 and 2),
`plugin_server.py` (instances and events, ids across respawns, defect 7) and `rpc.py` (the
socket transport and the parent watchdog, defects 3 to 6). This one is for the handlers: an
exception is logged, never raised into kong-pdk.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

from .event_channel import EventAbandoned

log = logging.getLogger("token_meter_plugin")

_T = TypeVar("_T")


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
