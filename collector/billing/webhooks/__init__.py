"""Stripe webhooks (`POST /v1/stripe/webhook`): subscriptions set plans and quotas, credit
grants and paid credit checkouts add prepaid credit, failed or overdue invoices block with
`payment_overdue`. `signature` checks who sent it, `events` reads what it says (pure),
`service` applies each event once, `store` holds its SQL and `http` maps it to HTTP.

Other parts handle an event type by registering with the app's `WebhookService`
(`keys.STRIPE_WEBHOOKS`): `register(event_type, handler)`, a `WebhookHandler` run inside the
event's transaction.
"""

from .events import NotApplicable, WebhookEvent
from .service import ERROR_REPORT_TRIGGERED, WebhookHandler, WebhookResult, WebhookService

__all__ = [
    "ERROR_REPORT_TRIGGERED",
    "NotApplicable",
    "WebhookEvent",
    "WebhookHandler",
    "WebhookResult",
    "WebhookService",
]
