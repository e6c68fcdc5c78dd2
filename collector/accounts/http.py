"""PUT /v1/consumers/{consumer} and POST /v1/consumers/{consumer}/credits (admin token)."""

from __future__ import annotations

from typing import TypeVar

import msgspec
from aiohttp import web

from ..auth import Role, requires
from ..keys import ACCOUNTS, LOG_FIELDS
from ..problems import Problem, bad_request
from .model import MAX_CONSUMER_LENGTH, AccountUpdate, CreditGrantRequest, GrantConflict

T = TypeVar("T")
MAX_BODY_BYTES = 64 * 1024


def _consumer(request: web.Request) -> str:
    consumer = request.match_info["consumer"]
    if not 1 <= len(consumer) <= MAX_CONSUMER_LENGTH:
        raise bad_request(f"a consumer is 1 to {MAX_CONSUMER_LENGTH} characters long")
    if "\x00" in consumer:  # PostgreSQL text cannot hold U+0000
        raise bad_request("a consumer has no U+0000 character")
    return consumer


async def _decode(request: web.Request, kind: type[T]) -> T:
    """The body as `kind`, or a 4xx problem before anything changes."""
    if request.content_type != "application/json":
        raise Problem(
            415,
            "unsupported-media-type",
            "Unsupported media type",
            f"send application/json, not {request.content_type or 'nothing'}",
        )
    too_large = Problem(
        413, "payload-too-large", "Payload too large", f"at most {MAX_BODY_BYTES} bytes"
    )
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_large
    # A chunked body declares no length: it is read up to the bound, not up to client_max_size.
    body = await request.content.read(MAX_BODY_BYTES + 1)
    while len(body) <= MAX_BODY_BYTES and not request.content.at_eof():
        body += await request.content.read(MAX_BODY_BYTES + 1 - len(body))
    if len(body) > MAX_BODY_BYTES:
        raise too_large
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        raise bad_request(str(exc), slug="invalid-body") from exc
    except msgspec.DecodeError as exc:
        raise bad_request(f"the body is not valid JSON: {exc}", slug="malformed-body") from exc
    except UnicodeDecodeError:  # msgspec's error for a string that is not UTF-8
        raise bad_request("the body is not valid UTF-8", slug="malformed-body") from None


def _json(body: object, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=msgspec.json.encode(body),
        content_type="application/json",
        headers=headers,
    )


@requires(Role.ADMIN)
async def put_consumer(request: web.Request) -> web.Response:
    consumer = _consumer(request)
    update = await _decode(request, AccountUpdate)
    account, created = await request.app[ACCOUNTS].update_account(consumer, update)
    request[LOG_FIELDS] = {"consumer": consumer, "created": created}
    return _json(account.as_json(), 201 if created else 200)


@requires(Role.ADMIN)
async def post_credits(request: web.Request) -> web.Response:
    consumer = _consumer(request)
    grant_request = await _decode(request, CreditGrantRequest)
    try:
        grant = await request.app[ACCOUNTS].grant(
            consumer, grant_request.amount_micros, grant_request.idempotency_key
        )
    except GrantConflict as conflict:
        raise Problem(
            409,
            "idempotency-key-reused",
            "Idempotency key reused",
            f"idempotency key {grant_request.idempotency_key!r} already granted"
            f" {conflict.first.amount_nanos // 1000} micros to {consumer!r}, not"
            f" {grant_request.amount_micros}",
        ) from None
    request[LOG_FIELDS] = {"consumer": consumer, "replayed": grant.replayed}
    # A replay answers exactly as the first request was answered (status and body), as
    # Stripe's idempotent requests do, and says so in a header.
    headers = {"Idempotent-Replayed": "true"} if grant.replayed else None
    return _json(grant.as_json(), 201, headers)
