"""The billing endpoints (admin token): `GET /v1/stripe/status`, what the Stripe sync has sent,
holds and last failed; `GET /v1/stripe/reconcile`, the outbox against Stripe's meter event
summaries; `POST /v1/stripe/reconcile/resend`, the same, handing what Stripe lacks back to the
sync."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import msgspec
from aiohttp import web

from ..auth import Role, requires
from ..keys import LOG_FIELDS, POOL, SETTINGS, STRIPE_SYNC
from ..problems import Problem, bad_request
from . import store
from .reconcile import DEFAULT_SETTLE, Period, parse_instant, period
from .reconciler import ReconcileFailed, Reconciler


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


# -- GET /v1/stripe/reconcile, POST /v1/stripe/reconcile/resend (admin token) ----------------


def _reconciler(request: web.Request) -> Reconciler:
    if request.app[SETTINGS].stripe is None or STRIPE_SYNC not in request.app:
        raise Problem(
            409,
            "stripe-disabled",
            "Stripe billing is off",
            "the collector has no STRIPE_API_KEY: there is nothing to reconcile",
        )
    sync = request.app[STRIPE_SYNC]
    return Reconciler(request.app[POOL], sync.api, wake_sync=sync.wake)


def _period(request: web.Request) -> Period:
    """`from`, `to` (a date or an RFC 3339 time) and `settle` (seconds) from the query."""
    query = request.query
    settle = DEFAULT_SETTLE
    if "settle" in query:
        try:
            settle = float(query["settle"])
        except ValueError:
            settle = math.nan
        if not math.isfinite(settle):
            raise bad_request(f"settle must be a number of seconds, not {query['settle']!r}")
    try:
        start = parse_instant("from", query["from"]) if "from" in query else None
        end = parse_instant("to", query["to"]) if "to" in query else None
        return period(datetime.now(UTC), start, end, settle)
    except ValueError as exc:
        raise bad_request(str(exc)) from None


def _stripe_unavailable(exc: ReconcileFailed) -> Problem:
    return Problem(502, "stripe-unavailable", "Stripe did not answer", str(exc))


@requires(Role.ADMIN)
async def get_stripe_reconcile(request: web.Request) -> web.Response:
    reconciler = _reconciler(request)
    try:
        report = await reconciler.report(_period(request))
    except ReconcileFailed as exc:
        raise _stripe_unavailable(exc) from None
    request[LOG_FIELDS] = {"differences": len(report.differences)}
    return web.Response(body=msgspec.json.encode(report.as_json()), content_type="application/json")


@requires(Role.ADMIN)
async def post_stripe_reconcile_resend(request: web.Request) -> web.Response:
    reconciler = _reconciler(request)
    try:
        result = await reconciler.resend(_period(request))
    except ReconcileFailed as exc:
        raise _stripe_unavailable(exc) from None
    request[LOG_FIELDS] = {
        "differences": len(result.report.differences),
        "resent": len(result.resent),
        "unrepaired": result.unrepaired,
    }
    return web.Response(body=msgspec.json.encode(result.as_json()), content_type="application/json")
