"""RFC 9457 problem details: every error the collector answers is application/problem+json."""

from __future__ import annotations

from typing import Any

import msgspec
from aiohttp import web

PROBLEM_TYPE_BASE = "https://token-meter.dev/problems/"


class Problem(Exception):
    """Raised anywhere in a handler; the error middleware renders it."""

    def __init__(
        self,
        status: int,
        slug: str,
        title: str,
        detail: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(detail or title)
        self.status = status
        self.slug = slug
        self.title = title
        self.detail = detail
        self.headers = headers or {}
        self.extra = extra

    def response(self) -> web.Response:
        body: dict[str, Any] = {
            "type": PROBLEM_TYPE_BASE + self.slug,
            "title": self.title,
            "status": self.status,
        }
        if self.detail:
            body["detail"] = self.detail
        body.update(self.extra)
        return web.Response(
            status=self.status,
            body=msgspec.json.encode(body),
            content_type="application/problem+json",
            headers=self.headers,
        )


def bad_request(detail: str, slug: str = "bad-request", **extra: Any) -> Problem:
    return Problem(400, slug, "Bad request", detail, **extra)


def not_found(detail: str) -> Problem:
    return Problem(404, "not-found", "Not found", detail)
