"""Bearer tokens: the ingest token (plugins) and the admin token (operators). A missing or
wrong token is 401 with WWW-Authenticate; a valid token of the other kind is 403."""

from __future__ import annotations

import enum
import hmac
from collections.abc import Awaitable, Callable
from functools import wraps

from aiohttp import web

from .keys import SETTINGS
from .problems import Problem

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Role(enum.Enum):
    INGEST = "ingest"
    ADMIN = "admin"


def _presented_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(presented: str, expected: str | None) -> bool:
    return expected is not None and hmac.compare_digest(presented.encode(), expected.encode())


def authenticate(request: web.Request, role: Role) -> None:
    settings = request.app[SETTINGS]
    ingest = settings.ingest_token.value if settings.ingest_token else None
    admin = settings.admin_token.value if settings.admin_token else None
    presented = _presented_token(request)
    challenge = {"WWW-Authenticate": 'Bearer realm="token-meter"'}
    if presented is None:
        raise Problem(
            401,
            "unauthorized",
            "Unauthorized",
            "send the token as 'Authorization: Bearer <token>'",
            headers=challenge,
        )
    wanted, other = (ingest, admin) if role is Role.INGEST else (admin, ingest)
    if _matches(presented, wanted):
        return
    if _matches(presented, other):
        raise Problem(403, "forbidden", "Forbidden", f"this endpoint needs the {role.value} token")
    raise Problem(
        401,
        "unauthorized",
        "Unauthorized",
        "the token is not valid",
        headers={"WWW-Authenticate": 'Bearer realm="token-meter", error="invalid_token"'},
    )


def requires(role: Role) -> Callable[[Handler], Handler]:
    def decorate(handler: Handler) -> Handler:
        @wraps(handler)
        async def guarded(request: web.Request) -> web.StreamResponse:
            authenticate(request, role)
            return await handler(request)

        return guarded

    return decorate
