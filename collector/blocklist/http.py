"""GET /v1/blocklist: the plugins' view of whom to stop, with ETag and long poll."""

from __future__ import annotations

from aiohttp import web

from ..auth import Role, requires
from ..keys import BLOCKLIST, SETTINGS
from ..problems import bad_request


def _parse_etag(value: str | None) -> int | None:
    if not value:
        return None
    tag = value.strip()
    if tag.startswith("W/"):
        tag = tag[2:]
    tag = tag.strip('"')
    return int(tag) if tag.isdigit() else None


@requires(Role.INGEST)
async def get_blocklist(request: web.Request) -> web.Response:
    feed = request.app[BLOCKLIST]
    max_wait = request.app[SETTINGS].blocklist_max_wait
    wait_text = request.query.get("wait")
    wait = 0.0
    if wait_text is not None:
        try:
            wait = float(wait_text)
        except ValueError:
            raise bad_request("wait must be a number of seconds") from None
        if not 0 <= wait <= 60:
            raise bad_request("wait must be between 0 and 60 seconds")
        wait = min(wait, max_wait)
    known = _parse_etag(request.headers.get("If-None-Match"))
    snapshot = feed.snapshot
    if known is not None and wait > 0:
        snapshot = await feed.wait_for_change(known, wait)
    headers = {"ETag": snapshot.etag, "Cache-Control": "no-cache"}
    if known is not None and snapshot.version == known:
        return web.Response(status=304, headers=headers)
    return web.Response(body=snapshot.body, content_type="application/json", headers=headers)
