"""POST /v1/stripe/webhook: Stripe's events, authenticated by their signature alone.

No bearer token is asked for (`auth.requires` is not applied): Stripe cannot send one, and the
`Stripe-Signature` HMAC over the exact body, made with the endpoint's secret, is a stronger
proof of origin than a token would be. Without STRIPE_WEBHOOK_SECRET nothing can be verified,
so every call is 503 (Stripe keeps retrying, for up to three days, until one is set).
"""

from __future__ import annotations

import msgspec
from aiohttp import web

from ...keys import LOG_FIELDS, STRIPE_WEBHOOKS
from ...problems import Problem, bad_request
from .events import MalformedEvent
from .signature import SignatureRefused

# Stripe's events are a few kB (a subscription with many items some tens); 1 MiB leaves room
# and bounds what an unauthenticated caller can make us read before the signature check.
MAX_BODY_BYTES = 1024 * 1024


async def post_stripe_webhook(request: web.Request) -> web.Response:
    service = request.app[STRIPE_WEBHOOKS]
    if not service.configured:
        raise Problem(
            503,
            "webhooks-not-configured",
            "Webhooks not configured",
            "set STRIPE_WEBHOOK_SECRET to the endpoint's signing secret (whsec_...)",
        )
    body = await _body(request)
    try:
        receipt = await service.receive(body, request.headers.get("Stripe-Signature"))
    except SignatureRefused as refused:
        service.refused(str(refused))
        request[LOG_FIELDS] = {"refused": str(refused)}
        raise bad_request(f"signature check failed: {refused}", slug="invalid-signature") from None
    except MalformedEvent as malformed:
        request[LOG_FIELDS] = {"refused": str(malformed)}
        raise bad_request(str(malformed), slug="not-a-stripe-event") from None
    request[LOG_FIELDS] = {
        "stripe_event": receipt.event.id,
        "type": receipt.event.type,
        "outcome": receipt.outcome,
    }
    answer = {"received": True, "replayed": receipt.replayed, "outcome": receipt.outcome}
    return web.Response(body=msgspec.json.encode(answer), content_type="application/json")


async def _body(request: web.Request) -> bytes:
    """The body as sent (the signature covers these bytes), at most MAX_BODY_BYTES."""
    too_large = Problem(
        413, "payload-too-large", "Payload too large", f"at most {MAX_BODY_BYTES} bytes"
    )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)
