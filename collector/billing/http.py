"""GET /v1/stripe/status (admin token): what the Stripe sync has sent, holds and last failed."""

from __future__ import annotations

import msgspec
from aiohttp import web

from ..auth import Role, requires
from ..keys import POOL, SETTINGS
from . import store


@requires(Role.ADMIN)
async def get_stripe_status(request: web.Request) -> web.Response:
    stripe = request.app[SETTINGS].stripe
    body: dict[str, object] = {"enabled": stripe is not None, "transport": "meter_events"}
    if stripe is None:
        body.update(
            meters=[],
            pending_rows=0,
            oldest_pending_seconds=None,
            held_consumers=0,
            held=[],
            unbillable_rows=0,
            last_sent_at=None,
            errors=[],
            leader=None,
            last_cycle_at=None,
        )
    else:
        body["transport"] = stripe.transport
        body.update(await store.status(request.app[POOL], stripe.meters))
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")
