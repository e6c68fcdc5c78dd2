"""A stateful fake of the Stripe endpoints the product calls, for tests and benchmarks.

    with FakeStripe() as fake:                      # a thread, its own loop, 127.0.0.1:<free>
        fake.add_customer("cus_1")
        meter = fake.create_meter("tokens_in")
        client = fake.sdk_client()                  # or StripeApi(fake.api_key, api_base=fake.url)
        client.v1.billing.meter_events.create(params={...})
        assert fake.total("cus_1", "tokens_in") == 25

Endpoints (route names in `endpoints`): v1 billing meters (create, list, retrieve, update,
deactivate, reactivate, event summaries), v1 meter events, v1 customers (create, list,
retrieve, delete), v2 meter event sessions, the v2 meter event stream, v2 meter events and v2 events
(retrieve: the error report events `error_report_event` made).

Strict as Stripe is (`params`, `state`): unknown, missing, empty or mistyped parameters,
inactive or unknown meters, timestamps over 35 days old or 5 minutes ahead, identifiers reused
within 24 hours, values that are not numbers (or not whole, by default), bad summary ranges;
wrong keys and expired session tokens (401); idempotency keys replayed, misused or in use.

Limits (`limits.RateLimits`): per-second reads and writes (25 each in test mode), meter events
(shared with writes in test mode, 1,000/s live), one concurrent meter-event call per customer
and meter; all 429 `rate_limit` with `Stripe-Rate-Limited-Reason` and `Stripe-Should-Retry:
false`.

Faults (`fake.faults`, `faults.Faults`): `fail_next`, `rate_limit_next`, `timeout_next`,
`drop_next`, `drop_after_work_next`, `random`, before or after the work is applied.

Introspection: `accepted_events`, `totals`, `total`, `event_summaries`, `error_reports`,
`error_report_event`, `requests`, `requests_to`, `call_count`, `call_counts`, and `state` for
everything else; `clock` shifts or freezes the fake's time.
"""

from .endpoints import (
    CREATE_CUSTOMER,
    CREATE_METER,
    CREATE_METER_EVENT,
    CREATE_METER_EVENT_SESSION,
    CREATE_METER_EVENT_STREAM,
    CREATE_V2_METER_EVENT,
    DEACTIVATE_METER,
    DELETE_CUSTOMER,
    LIST_CUSTOMERS,
    LIST_EVENT_SUMMARIES,
    LIST_METERS,
    REACTIVATE_METER,
    RETRIEVE_CUSTOMER,
    RETRIEVE_METER,
    RETRIEVE_V2_EVENT,
    UPDATE_METER,
)
from .faults import Fault, Faults
from .limits import RateLimits
from .server import FakeStripe, RequestRecord
from .state import Clock, ErrorReport, Meter, MeterEvent

__all__ = [
    "CREATE_CUSTOMER",
    "CREATE_METER",
    "CREATE_METER_EVENT",
    "CREATE_METER_EVENT_SESSION",
    "CREATE_METER_EVENT_STREAM",
    "CREATE_V2_METER_EVENT",
    "DEACTIVATE_METER",
    "DELETE_CUSTOMER",
    "LIST_CUSTOMERS",
    "LIST_EVENT_SUMMARIES",
    "LIST_METERS",
    "REACTIVATE_METER",
    "RETRIEVE_CUSTOMER",
    "RETRIEVE_METER",
    "RETRIEVE_V2_EVENT",
    "UPDATE_METER",
    "Clock",
    "ErrorReport",
    "FakeStripe",
    "Fault",
    "Faults",
    "Meter",
    "MeterEvent",
    "RateLimits",
    "RequestRecord",
]
