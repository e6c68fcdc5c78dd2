"""GET /v1/consumers/{consumer}/usage."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
from aiohttp import web

from ..accounts.rules import micros_down
from ..accounts.store import balance_nanos
from ..auth import Role, requires
from ..keys import POOL
from ..problems import bad_request, not_found
from .store import COUNTED, load_account, month_bounds, month_total_tokens, usage_by_model


def _parse_instant(name: str, value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise bad_request(f"{name} must be an RFC 3339 timestamp, got {value!r}") from None
    if parsed.tzinfo is None:
        raise bad_request(f"{name} must carry a time zone offset (e.g. Z)")
    parsed = parsed.astimezone(UTC)
    if parsed.minute or parsed.second or parsed.microsecond:
        raise bad_request(f"{name} must fall on a whole hour (UTC): usage is kept per hour")
    return parsed


def _period(request: web.Request, now: datetime) -> tuple[datetime, datetime]:
    start, end = month_bounds(now)
    if "from" in request.query:
        start = _parse_instant("from", request.query["from"])
    if "to" in request.query:
        end = _parse_instant("to", request.query["to"])
    if start >= end:
        raise bad_request("from must be earlier than to")
    return start, end


@requires(Role.ADMIN)
async def get_usage(request: web.Request) -> web.Response:
    consumer = request.match_info["consumer"]
    if "\x00" in consumer:  # PostgreSQL text cannot hold U+0000: no such consumer is stored
        raise not_found(f"no consumer {consumer!r} has been seen")
    now = datetime.now(UTC)
    start, end = _period(request, now)
    async with request.app[POOL].acquire() as conn, conn.transaction(readonly=True):
        account = await load_account(conn, consumer)
        if account is None:
            raise not_found(f"no consumer {consumer!r} has been seen")
        models = await usage_by_model(conn, consumer, start, end)
        month_used = await month_total_tokens(conn, consumer, now)
        balance = await balance_nanos(conn, consumer) if account.prepaid else None
    totals = {k: sum(int(m[k] or 0) for m in models) for k in COUNTED}
    quota = account.monthly_token_quota
    body = {
        "consumer": consumer,
        "from": start.isoformat().replace("+00:00", "Z"),
        "to": end.isoformat().replace("+00:00", "Z"),
        **totals,
        "balance_micros": None if balance is None else micros_down(balance),
        "monthly_token_quota": quota,
        "quota_remaining_tokens": None if quota is None else quota - month_used,
        "by_model": models,
        "by_kind": {
            "uncached_input_tokens": totals["input_tokens"]
            - totals["cached_input_tokens"]
            - totals["cache_write_input_tokens"],
            "cached_input_tokens": totals["cached_input_tokens"],
            "cache_write_input_tokens": totals["cache_write_input_tokens"],
            "output_tokens_excluding_reasoning": totals["output_tokens"]
            - totals["reasoning_tokens"],
            "reasoning_tokens": totals["reasoning_tokens"],
        },
    }
    return web.Response(body=msgspec.json.encode(body), content_type="application/json")
