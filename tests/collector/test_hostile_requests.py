"""Hostile requests against the running collector: missing, wrong and swapped tokens on every
route, bodies that trickle in, bodies too large, bodies that are not JSON or not UTF-8, and
requests that are not HTTP. Each is answered with a clear error, the process stays up, nothing
is stored, and no answer names the server's software or version."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import pytest_asyncio
import structlog
import yaml
from yarl import URL

from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.contract.test_openapi import check_response
from tests.factories import usage_event
from tests.harness.stripe.webhooks import DEFAULT_SECRET
from token_meter_collector.accounts.http import MAX_BODY_BYTES as ACCOUNT_BODY_BYTES
from token_meter_collector.billing.webhooks.http import MAX_BODY_BYTES as WEBHOOK_BODY_BYTES
from token_meter_collector.keys import METRICS, SETTINGS

SPEC: dict[str, Any] = yaml.safe_load(
    (resources.files("token_meter_schema") / "openapi.yaml").read_text()
)
BODY_TIMEOUT = 0.5
# Routes that take no bearer token, each with what authenticates it instead.
UNAUTHENTICATED = {
    ("GET", "/healthz"): "nothing: liveness",
    ("GET", "/readyz"): "nothing: readiness",
    ("POST", "/v1/stripe/webhook"): "its Stripe-Signature (tests/billing/test_webhooks.py)",
}
# A body each route would act on, were the token not checked first.
BODIES: dict[tuple[str, str], tuple[str, bytes]] = {
    ("POST", "/v1/events"): (
        "application/cloudevents-batch+json",
        json.dumps([usage_event("hostile-1")]).encode(),
    ),
    ("PUT", "/v1/consumers/{consumer}"): ("application/json", b'{"monthly_token_quota": 5}'),
    ("POST", "/v1/consumers/{consumer}/credits"): (
        "application/json",
        b'{"amount_micros": 1000000, "idempotency_key": "hostile"}',
    ),
    ("POST", "/v1/stripe/webhook"): ("application/json", b'{"id": "evt_1", "object": "event"}'),
}


@pytest_asyncio.fixture(loop_scope="session")
async def hostile(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    """The collector with a short body bound and a webhook secret (so the webhook reads)."""
    settings = make_settings(
        database_url,
        tmp_path,
        TOKEN_METER_BODY_TIMEOUT=str(BODY_TIMEOUT),
        STRIPE_WEBHOOK_SECRET=DEFAULT_SECRET,
    )
    async with run_collector_app(settings) as running:
        yield running


async def row_counts(db: asyncpg.Connection) -> dict[str, int]:
    """Rows of every table of the collector (partitions counted through their parent)."""
    tables = await db.fetch(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
           WHERE n.nspname = 'public' AND c.relkind IN ('r', 'p') AND NOT c.relispartition"""
    )
    return {
        t["relname"]: await db.fetchval(f'SELECT count(*) FROM "{t["relname"]}"') for t in tables
    }


def routes(collector: RunningCollector) -> list[tuple[str, str]]:
    assert collector.app is not None
    found = set()
    for route in collector.app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        found.add((route.method, info.get("formatter") or info.get("path")))
    return sorted(found)


def token_of(method: str, path: str) -> str | None:
    """The spec's security for a route: "ingest", "admin", or None (no bearer token)."""
    operation = SPEC["paths"][path][("get" if method == "HEAD" else method).lower()]
    schemes = {name for requirement in operation["security"] for name in requirement}
    assert len(schemes) <= 1, (method, path)
    return {"ingestToken": "ingest", "adminToken": "admin", None: None}[next(iter(schemes), None)]


async def send(
    collector: RunningCollector, method: str, path: str, authorization: str | None
) -> tuple[int, dict[str, str], bytes]:
    content_type, body = BODIES.get((method, path), ("application/json", b""))
    headers = {"Content-Type": content_type}
    if authorization is not None:
        headers["Authorization"] = authorization
    url = collector.base_url + path.replace("{consumer}", "alice")
    async with collector.session.request(method, url, data=body, headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_every_route_refuses_missing_wrong_and_swapped_tokens(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """401 with WWW-Authenticate for no or a wrong token, 403 for the other kind, both as
    problem+json; nothing stored. Every route is covered: the list comes from the router."""
    all_routes = routes(hostile)
    unauthenticated = {(m, p) for m, p in all_routes if token_of(m, p) is None and m != "HEAD"}
    assert unauthenticated == set(UNAUTHENTICATED)
    authenticated = [(m, p) for m, p in all_routes if token_of(m, p) is not None]
    ingest, admin = hostile.ingest_token, hostile.admin_token
    before = await row_counts(db)
    checked = 0
    for method, path in authenticated:
        kind = token_of(method, path)
        right, other = (ingest, admin) if kind == "ingest" else (admin, ingest)
        wrong: list[tuple[str | None, int]] = [
            (None, 401),
            ("Bearer", 401),
            ("Bearer ", 401),
            (f"Basic {right}", 401),
            (f"Token {right}", 401),
            ("Bearer not-the-token-0123456789", 401),
            (f"Bearer {right[:-1]}", 401),  # a prefix: compared in constant time, whole
            (f"Bearer {right}x", 401),
            (f"Bearer {right.upper()}", 401),
            (f"Bearer {other}", 403),
        ]
        for authorization, expected in wrong:
            status, headers, body = await send(hostile, method, path, authorization)
            where = f"{method} {path} with {authorization!r}"
            assert status == expected, where
            assert headers["Content-Type"] == "application/problem+json", where
            if method != "HEAD":
                assert json.loads(body)["status"] == expected, where
            if expected == 401:
                assert headers["WWW-Authenticate"].startswith('Bearer realm="token-meter"'), where
            else:
                assert "WWW-Authenticate" not in headers, where
            checked += 1
    assert checked == 10 * len(authenticated) >= 10 * 14  # GET and HEAD alike
    assert await row_counts(db) == before
    status, _, _ = await send(hostile, "GET", "/healthz", None)
    assert status == 200


async def trickle(writer: asyncio.StreamWriter, body: bytes, chunked: bool) -> None:
    """A byte every 50 ms, in chunks of one byte or as plain bytes."""
    for byte in body:
        piece = bytes([byte])
        writer.write(b"1\r\n" + piece + b"\r\n" if chunked else piece)
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_a_body_slower_than_the_bound_is_cut_off_with_408(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """Each route that reads a body, sent a byte every 50 ms, never the last, with
    Content-Length and chunked: 408 problem+json once TOKEN_METER_BODY_TIMEOUT (0.5 s here)
    has passed, the connection closed, nothing stored."""
    url = URL(hostile.base_url)
    before = await row_counts(db)
    for (method, path), (content_type, body) in BODIES.items():
        token = hostile.admin_token if "consumers" in path else hostile.ingest_token
        for chunked in (False, True):
            where = f"{method} {path} chunked={chunked}"
            reader, writer = await asyncio.open_connection(url.host, url.port)
            framing = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {len(body)}"
            writer.write(
                f"{method} {path.replace('{consumer}', 'alice')} HTTP/1.1\r\n"
                f"Host: {url.host}\r\nAuthorization: Bearer {token}\r\n"
                f"Content-Type: {content_type}\r\n{framing}\r\n\r\n".encode()
            )
            started = time.monotonic()

            sending = asyncio.create_task(trickle(writer, body[:-1], chunked))
            try:
                answer = await asyncio.wait_for(reader.readuntil(b"}"), 5)  # the problem's end
                elapsed = time.monotonic() - started
                # Then the server closes: an end of stream, or a reset if a byte was on its way.
                with contextlib.suppress(ConnectionResetError):
                    assert await asyncio.wait_for(reader.read(), 5) == b""
            finally:
                sending.cancel()
                writer.close()
            head, _, problem = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408 "), (where, head)
            assert b"Content-Type: application/problem+json" in head, where
            assert json.loads(problem)["type"].endswith("/body-timeout"), where
            check_response(method, path, 408, "application/problem+json", problem)
            assert BODY_TIMEOUT <= elapsed < BODY_TIMEOUT + 2, (where, elapsed)
    assert await row_counts(db) == before
    status, _ = await hostile.post_events([usage_event("after-the-trickles")])
    assert status == 200  # the process is up and takes a body sent at speed


async def test_a_body_that_arrives_within_the_bound_is_taken(hostile: RunningCollector) -> None:
    """Slow but within the bound: three pieces over 0.3 s, bound 0.5 s."""
    body = json.dumps([usage_event("slow-but-in-time")]).encode()
    third = len(body) // 3

    async def pieces() -> AsyncIterator[bytes]:
        for start in (0, third, 2 * third):
            yield body[start : start + third] if start < 2 * third else body[start:]
            await asyncio.sleep(0.1)

    headers = {
        "Content-Type": "application/json",
        "Authorization": f"Bearer {hostile.ingest_token}",
    }
    async with hostile.session.post(
        f"{hostile.base_url}/v1/events", data=pieces(), headers=headers
    ) as response:
        assert response.status == 200
        assert (await response.json())["accepted"] == 1


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_an_oversized_body_is_413_on_every_body_route(
    hostile: RunningCollector, db: asyncpg.Connection, framing: str
) -> None:
    """Past each route's bound, declared or not: 413 problem+json, nothing stored. The batch
    bound (TOKEN_METER_MAX_BATCH_BYTES, 16 MiB here) holds for a gzip bomb too."""
    assert hostile.app is not None
    batch_bytes = hostile.app[SETTINGS].max_batch_bytes
    cases = {
        ("POST", "/v1/events", "ingest"): b"[" + b" " * batch_bytes + b"]",
        ("PUT", "/v1/consumers/alice", "admin"): b"{" + b" " * ACCOUNT_BODY_BYTES + b"}",
        ("POST", "/v1/consumers/alice/credits", "admin"): b"{" + b" " * ACCOUNT_BODY_BYTES + b"}",
        ("POST", "/v1/stripe/webhook", "none"): b"{" + b" " * WEBHOOK_BODY_BYTES + b"}",
    }
    before = await row_counts(db)
    for (method, path, kind), body in cases.items():
        token = {"ingest": hostile.ingest_token, "admin": hostile.admin_token}.get(kind)
        headers = {"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"}
        if token:
            headers["Authorization"] = f"Bearer {token}"

        async def chunks(body: bytes = body) -> AsyncIterator[bytes]:
            for start in range(0, len(body), 1024 * 1024):
                yield body[start : start + 1024 * 1024]

        data: Any = chunks() if framing == "chunked" else body
        async with hostile.session.request(
            method, hostile.base_url + path, data=data, headers=headers
        ) as response:
            assert response.status == 413, (method, path)
            assert response.content_type == "application/problem+json"
    bomb = gzip.compress(b"[" + b" " * (batch_bytes + 1024) + b"]")
    status, problem = await hostile.post_events(bomb, headers={"Content-Encoding": "gzip"})
    assert status == 413 and problem["status"] == 413
    assert await row_counts(db) == before


NOT_JSON = {
    # Past msgspec's bound (Python's recursion limit), within the accounts' 64 KiB.
    "nested past the decoder's bound": b"[" * 5_000 + b"]" * 5_000,
    "an object nested past the bound": b'{"a":' * 5_000 + b"1" + b"}" * 5_000,
    "not UTF-8": b'{"monthly_token_quota": 5, "plan": "\x80"}',
    "truncated": b'{"monthly_token_quota": 5',
    "UTF-16": '{"monthly_token_quota": 5}'.encode("utf-16"),
    "not JSON": b"\x00\x01\x02",
}


@pytest.mark.parametrize("label", NOT_JSON)
async def test_a_body_that_is_not_json_is_400_everywhere(
    hostile: RunningCollector, db: asyncpg.Connection, label: str
) -> None:
    body = NOT_JSON[label]
    before = await row_counts(db)
    for method, path, token, content_type in (
        ("PUT", "/v1/consumers/alice", hostile.admin_token, "application/json"),
        ("POST", "/v1/consumers/alice/credits", hostile.admin_token, "application/json"),
        ("POST", "/v1/events", hostile.ingest_token, "application/cloudevents-batch+json"),
    ):
        headers = {"Content-Type": content_type, "Authorization": f"Bearer {token}"}
        async with hostile.session.request(
            method, hostile.base_url + path, data=body, headers=headers
        ) as response:
            answer = await response.read()
            assert response.status == 400, (label, path, answer)
            assert response.content_type == "application/problem+json"
    assert await row_counts(db) == before


async def test_an_event_with_a_string_that_is_not_utf8_is_rejected_alone(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """In a well-formed batch, the valid events are stored and the broken one is listed."""
    good = json.dumps(usage_event("utf8-good")).encode()
    bad = json.dumps(usage_event("utf8-bad", model="MODEL")).encode().replace(b"MODEL", b"\xc3(")
    status, result = await hostile.post_events(b"[" + good + b"," + bad + b"]")
    assert status == 200
    assert result["accepted"] == 1
    assert result["rejected"] == [
        {"index": 1, "id": "utf8-bad", "reason": "a string is not valid UTF-8"}
    ]


RAW_REQUESTS = [
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /no/such/path HTTP/1.1\r\nHost: x\r\n\r\n",
    b"DELETE /v1/events HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /v1/blocklist HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello
    b"BLAH\x00 / HTTP/1.1\r\n\r\n",
    b"GET /" + b"a" * 20_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 20_000 + b"\r\n\r\n",
]


async def test_no_answer_names_the_server_software(hostile: RunningCollector) -> None:
    """Answers of the app (200, 401, 404, 405) and of aiohttp's HTTP parser (400, 431) alike:
    `Server: token-meter`, no software name, no version. And the process stays up."""
    url = URL(hostile.base_url)
    statuses = set()
    for raw in RAW_REQUESTS:
        reader, writer = await asyncio.open_connection(url.host, url.port)
        writer.write(raw)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 5)
        writer.close()
        head = answer.partition(b"\r\n\r\n")[0].decode("latin-1")
        status_line, *lines = head.split("\r\n")
        statuses.add(int(status_line.split()[1]))
        headers = dict(line.split(": ", 1) for line in lines)
        assert headers.get("Server") == "token-meter", (raw[:40], head)
        for value in headers.values():
            assert "aiohttp" not in value.lower() and "python" not in value.lower(), head
    assert {200, 400, 401, 404, 405} <= statuses
    status, _, _ = await send(hostile, "GET", "/healthz", None)
    assert status == 200


async def test_a_body_that_does_not_decode_as_its_encoding_says_is_400(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """Labelled gzip, sent plain (or cut short): aiohttp cannot read it; a 400, not a 500."""
    before = await row_counts(db)
    batch = json.dumps([usage_event("not-gzip")]).encode()
    status, problem = await hostile.post_events(batch, headers={"Content-Encoding": "gzip"})
    assert status == 400 and problem["type"].endswith("/unreadable-body"), problem
    # Cut short, the stream decodes to a part of the batch: not JSON.
    cut = gzip.compress(batch)[:-12]
    status, problem = await hostile.post_events(cut, headers={"Content-Encoding": "gzip"})
    assert status == 400, problem
    assert await row_counts(db) == before


async def test_a_string_holding_u0000_is_refused_not_a_500(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """PostgreSQL text cannot hold U+0000: an event holding one is rejected on its own (else
    its batch would fail whole, and be retried for ever), the admin API answers 400 or 404."""
    nul = "\u0000"
    status, result = await hostile.post_events(
        [
            usage_event("nul-model", model=f"gpt{nul}4"),
            usage_event("nul-subject", consumer=f"al{nul}ice"),
            usage_event("no-nul"),
        ]
    )
    assert status == 200 and result["accepted"] == 1
    assert [(r["index"], r["id"]) for r in result["rejected"]] == [
        (0, "nul-model"),
        (1, "nul-subject"),
    ]
    before = await row_counts(db)
    admin = {"Authorization": f"Bearer {hostile.admin_token}"}
    for method, path, body, expected in (
        ("PUT", "/v1/consumers/al%00ice", {"plan": "p"}, 400),
        ("PUT", "/v1/consumers/alice", {"plan": f"p{nul}"}, 400),
        ("PUT", "/v1/consumers/alice", {"stripe_customer_id": f"cus{nul}"}, 400),
        ("POST", "/v1/consumers/alice/credits", {"amount_micros": 1, "idempotency_key": nul}, 400),
        ("GET", "/v1/consumers/al%00ice/usage", None, 404),
    ):
        async with hostile.session.request(
            method, hostile.base_url + path, json=body, headers=admin
        ) as response:
            assert response.status == expected, (path, body, await response.text())
    assert await row_counts(db) == before


async def test_a_sender_that_hangs_up_mid_body_is_no_server_error(
    hostile: RunningCollector, db: asyncpg.Connection
) -> None:
    """Counted as 499 (nginx's "client closed request"), never logged as a failure."""
    assert hostile.app is not None
    url = URL(hostile.base_url)
    before = await row_counts(db)
    _, writer = await asyncio.open_connection(url.host, url.port)
    writer.write(
        f"POST /v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {hostile.ingest_token}"
        "\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{".encode()
    )
    await writer.drain()
    await asyncio.sleep(0.1)
    with structlog.testing.capture_logs() as logs:
        writer.close()
        for _ in range(50):
            if any(entry["event"] == "http_request" for entry in logs):
                break
            await asyncio.sleep(0.02)
    assert [(e["event"], e.get("status")) for e in logs] == [("http_request", 499)]
    requests = hostile.app[METRICS].registry.get_sample_value(
        "token_meter_http_requests_total",
        {"method": "POST", "route": "/v1/events", "status": "499"},
    )
    assert requests == 1
    assert await row_counts(db) == before
