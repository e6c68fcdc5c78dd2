"""The endpoints the product calls: their parameters, as Stripe checks them, and their answers.

Each handler takes the parsed parameters and answers a body (always 200) or raises: a
`ParamError` (validation, never saved for an idempotency key) or an `ApiError`. Parameter specs
follow stripe-python@v16.1.0:stripe/params/billing/ (`_meter_create_params.py`,
`_meter_event_create_params.py`, `_meter_list_params.py`, `_meter_event_summary_list_params.py`)
and stripe/params/v2/billing/ (`_meter_event_stream_create_params.py`), with the maximum
lengths of Stripe's OpenAPI spec (event names and identifiers 100 characters).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import params as p
from .errors import invalid
from .limits import METER_EVENTS, READ, STREAM, WRITE
from .state import StripeState, check_summary_range, parse_rfc3339, rfc3339

# Route names, as FakeStripe.call_count() and the faults' `route=` take them.
CREATE_METER = "POST /v1/billing/meters"
LIST_METERS = "GET /v1/billing/meters"
RETRIEVE_METER = "GET /v1/billing/meters/{id}"
UPDATE_METER = "POST /v1/billing/meters/{id}"
DEACTIVATE_METER = "POST /v1/billing/meters/{id}/deactivate"
REACTIVATE_METER = "POST /v1/billing/meters/{id}/reactivate"
LIST_EVENT_SUMMARIES = "GET /v1/billing/meters/{id}/event_summaries"
CREATE_METER_EVENT = "POST /v1/billing/meter_events"
CREATE_CUSTOMER = "POST /v1/customers"
LIST_CUSTOMERS = "GET /v1/customers"
RETRIEVE_CUSTOMER = "GET /v1/customers/{id}"
DELETE_CUSTOMER = "DELETE /v1/customers/{id}"
CREATE_METER_EVENT_SESSION = "POST /v2/billing/meter_event_session"
CREATE_METER_EVENT_STREAM = "POST /v2/billing/meter_event_stream"
CREATE_V2_METER_EVENT = "POST /v2/billing/meter_events"
RETRIEVE_V2_EVENT = "GET /v2/core/events/{id}"

_EXPAND: dict[str, p.Spec] = {"expand": p.List(p.String())}
_PAGE: dict[str, p.Spec] = {
    "limit": p.Integer(minimum=1, maximum=100),
    "starting_after": p.String(),
    "ending_before": p.String(),
    **_EXPAND,
}
METER_CREATE = p.Object(
    {
        "display_name": p.String(required=True, max_length=250),
        "event_name": p.String(required=True, max_length=100),
        "default_aggregation": p.Object(
            {"formula": p.Enum(("count", "last", "sum"), required=True)}, required=True
        ),
        "customer_mapping": p.Object(
            {
                "event_payload_key": p.String(required=True, max_length=100),
                "type": p.Enum(("by_id",), required=True),
            }
        ),
        "value_settings": p.Object({"event_payload_key": p.String(required=True, max_length=100)}),
        "event_time_window": p.Enum(("day", "hour")),
        **_EXPAND,
    }
)
METER_UPDATE = p.Object({"display_name": p.String(max_length=250), **_EXPAND})
METER_LIST = p.Object({"status": p.Enum(("active", "inactive")), **_PAGE})
EXPAND_ONLY = p.Object(_EXPAND)
SUMMARY_LIST = p.Object(
    {
        "customer": p.String(required=True),
        "start_time": p.Integer(required=True),
        "end_time": p.Integer(required=True),
        "value_grouping_window": p.Enum(("day", "hour")),
        **_PAGE,
    }
)
METER_EVENT = p.Object(
    {
        "event_name": p.String(required=True, max_length=100),
        "payload": p.Map(required=True),
        "identifier": p.String(max_length=100),
        "timestamp": p.Integer(),
        **_EXPAND,
    }
)
CUSTOMER_CREATE = p.Object(
    {
        "name": p.String(max_length=256),
        "email": p.String(max_length=512),
        "description": p.String(max_length=350),
        "phone": p.String(max_length=20),
        "metadata": p.Map(),
        **_EXPAND,
    }
)
CUSTOMER_LIST = p.Object({"email": p.String(max_length=512), **_PAGE})
V2_EVENT_FIELDS: dict[str, p.Spec] = {
    "event_name": p.String(required=True, max_length=100),
    "identifier": p.String(max_length=100),
    "payload": p.Map(required=True),
    "timestamp": p.String(),
}
V2_METER_EVENT = p.Object(V2_EVENT_FIELDS)
SESSION_CREATE = p.Object({})
STREAM_CREATE = p.Object(
    {"events": p.List(p.Object(V2_EVENT_FIELDS), required=True, max_items=100)}
)


@dataclass(frozen=True, slots=True)
class Call:
    params: dict[str, Any]
    path_args: dict[str, str]
    idempotency_key: str | None


def _page(items: list[dict[str, Any]], query: dict[str, Any], url: str) -> dict[str, Any]:
    """Stripe's list object over `items` (already in Stripe's order), cursor by object id."""
    limit = query.get("limit", 10)
    ids = [item["id"] for item in items]
    after, before = query.get("starting_after"), query.get("ending_before")
    for cursor, name in ((after, "starting_after"), (before, "ending_before")):
        if cursor is not None and cursor not in ids:
            raise invalid(f"No such object: '{cursor}'", param=name)
    if after is not None:
        start = ids.index(after) + 1
        page, has_more = items[start : start + limit], start + limit < len(items)
    elif before is not None:
        end = ids.index(before)
        page, has_more = items[max(0, end - limit) : end], end - limit > 0
    else:
        page, has_more = items[:limit], len(items) > limit
    return {"object": "list", "data": page, "has_more": has_more, "url": url}


def _timestamp(text: str | None, param: str) -> int | None:
    if text is None:
        return None
    try:
        return int(parse_rfc3339(text))
    except ValueError:
        raise p.ParamError(f"Invalid timestamp: {text}", param) from None


class Endpoints:
    def __init__(self, state: StripeState) -> None:
        self.state = state

    # -- billing meters --------------------------------------------------------------------

    def create_meter(self, call: Call) -> Any:
        query = p.check(METER_CREATE, call.params)
        mapping = query.get("customer_mapping", {})
        meter = self.state.create_meter(
            query["event_name"],
            query["display_name"],
            formula=query["default_aggregation"]["formula"],
            customer_key=mapping.get("event_payload_key", "stripe_customer_id"),
            value_key=query.get("value_settings", {}).get("event_payload_key", "value"),
            event_time_window=query.get("event_time_window"),
        )
        return meter.to_api(self.state.livemode)

    def list_meters(self, call: Call) -> Any:
        query = p.check(METER_LIST, call.params)
        with self.state.lock:
            meters = list(reversed(self.state.meters.values()))  # newest first
            items = [
                m.to_api(self.state.livemode)
                for m in meters
                if query.get("status") in (None, m.status)
            ]
        return _page(items, query, "/v1/billing/meters")

    def retrieve_meter(self, call: Call) -> Any:
        p.check(EXPAND_ONLY, call.params)
        return self.state.meter(call.path_args["id"]).to_api(self.state.livemode)

    def update_meter(self, call: Call) -> Any:
        query = p.check(METER_UPDATE, call.params)
        meter = self.state.meter(call.path_args["id"])
        if "display_name" in query:
            meter = self.state.rename_meter(meter.id, query["display_name"])
        return meter.to_api(self.state.livemode)

    def deactivate_meter(self, call: Call) -> Any:
        p.check(EXPAND_ONLY, call.params)
        return self.state.deactivate_meter(call.path_args["id"]).to_api(self.state.livemode)

    def reactivate_meter(self, call: Call) -> Any:
        p.check(EXPAND_ONLY, call.params)
        return self.state.reactivate_meter(call.path_args["id"]).to_api(self.state.livemode)

    def list_event_summaries(self, call: Call) -> Any:
        query = p.check(SUMMARY_LIST, call.params)
        meter = self.state.meter(call.path_args["id"])
        self.state.customer(query["customer"])
        window = query.get("value_grouping_window")
        check_summary_range(query["start_time"], query["end_time"], window)
        items = self.state.summaries(
            meter.id, query["customer"], query["start_time"], query["end_time"], window
        )
        return _page(items, query, f"/v1/billing/meters/{meter.id}/event_summaries")

    # -- meter events ----------------------------------------------------------------------

    def create_meter_event(self, call: Call) -> Any:
        query = p.check(METER_EVENT, call.params)
        return self.state.create_meter_event(
            event_name=query["event_name"],
            payload=query["payload"],
            identifier=query.get("identifier"),
            timestamp=query.get("timestamp"),
            idempotency_key=call.idempotency_key,
        )

    def create_v2_meter_event(self, call: Call) -> Any:
        query = p.check(V2_METER_EVENT, call.params, typed=True)
        event = self.state.create_meter_event(
            event_name=query["event_name"],
            payload=query["payload"],
            identifier=query.get("identifier"),
            timestamp=_timestamp(query.get("timestamp"), "timestamp"),
            idempotency_key=call.idempotency_key,
            api="v2",
        )
        return {
            **event,
            "object": "v2.billing.meter_event",
            "created": rfc3339(event["created"]),
            "timestamp": rfc3339(event["timestamp"]),
        }

    def create_meter_event_session(self, call: Call) -> Any:
        p.check(SESSION_CREATE, call.params, typed=True)
        return self.state.create_session().to_api(self.state.livemode)

    def create_meter_event_stream(self, call: Call) -> Any:
        query = p.check(STREAM_CREATE, call.params, typed=True)
        for i, event in enumerate(query["events"]):
            _timestamp(event.get("timestamp"), f"events[{i}][timestamp]")
        self.state.stream_meter_events(query["events"])
        return {}

    def retrieve_v2_event(self, call: Call) -> Any:
        p.check(p.Object({}), call.params, typed=True)
        return self.state.v2_event(call.path_args["id"])

    # -- customers -------------------------------------------------------------------------

    def create_customer(self, call: Call) -> Any:
        query = p.check(CUSTOMER_CREATE, call.params)
        query.pop("expand", None)
        return self.state.add_customer(**query)

    def list_customers(self, call: Call) -> Any:
        query = p.check(CUSTOMER_LIST, call.params)
        with self.state.lock:
            items = [
                c
                for c in reversed(self.state.customers.values())
                if not c.get("deleted") and query.get("email") in (None, c.get("email"))
            ]
        return _page(items, query, "/v1/customers")

    def retrieve_customer(self, call: Call) -> Any:
        p.check(EXPAND_ONLY, call.params)
        return self.state.customer(call.path_args["id"])

    def delete_customer(self, call: Call) -> Any:
        p.check(p.Object({}), call.params)
        return self.state.delete_customer(call.path_args["id"])


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    kind: str  # which rate limit it counts toward
    handler: Callable[[Endpoints, Call], Any]
    session_auth: bool = False  # authenticated by a meter event session token, not the key

    @property
    def method(self) -> str:
        return self.name.split(" ", 1)[0]

    @property
    def v2(self) -> bool:
        return self.name.split(" ", 1)[1].startswith("/v2/")

    def match(self, method: str, path: str) -> dict[str, str] | None:
        template = self.name.split(" ", 1)[1]
        pattern = "^" + re.escape(template).replace(r"\{id\}", "(?P<id>[^/]+)") + "$"
        found = re.match(pattern, path)
        return found.groupdict() if found and method == self.method else None


ROUTES = (
    Route(CREATE_METER, WRITE, Endpoints.create_meter),
    Route(LIST_METERS, READ, Endpoints.list_meters),
    Route(LIST_EVENT_SUMMARIES, READ, Endpoints.list_event_summaries),
    Route(DEACTIVATE_METER, WRITE, Endpoints.deactivate_meter),
    Route(REACTIVATE_METER, WRITE, Endpoints.reactivate_meter),
    Route(RETRIEVE_METER, READ, Endpoints.retrieve_meter),
    Route(UPDATE_METER, WRITE, Endpoints.update_meter),
    Route(CREATE_METER_EVENT, METER_EVENTS, Endpoints.create_meter_event),
    Route(CREATE_CUSTOMER, WRITE, Endpoints.create_customer),
    Route(LIST_CUSTOMERS, READ, Endpoints.list_customers),
    Route(RETRIEVE_CUSTOMER, READ, Endpoints.retrieve_customer),
    Route(DELETE_CUSTOMER, WRITE, Endpoints.delete_customer),
    Route(CREATE_METER_EVENT_SESSION, WRITE, Endpoints.create_meter_event_session),
    Route(
        CREATE_METER_EVENT_STREAM, STREAM, Endpoints.create_meter_event_stream, session_auth=True
    ),
    Route(CREATE_V2_METER_EVENT, METER_EVENTS, Endpoints.create_v2_meter_event),
    Route(RETRIEVE_V2_EVENT, READ, Endpoints.retrieve_v2_event),
)
