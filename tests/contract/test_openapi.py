"""schema/openapi.yaml describes the running collector: the same routes, and every answer the
tests provoke has a documented status and a body that matches its documented schema."""

from __future__ import annotations

import gzip
import json
import tempfile
from importlib import resources
from pathlib import Path
from typing import Any

import asyncpg
import jsonschema
import pytest
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import RunningCollector, make_settings, run_collector_app
from tests.factories import usage_event
from tests.harness.stripe.webhooks import DEFAULT_SECRET, credit_grant, encode, event, signature
from token_meter_collector.app import create_app
from token_meter_collector.blocklist.reasons import REASON_PRECEDENCE, BlockReason

SPEC_URI = "urn:token-meter:openapi"
SPEC: dict[str, Any] = yaml.safe_load(
    (resources.files("token_meter_schema") / "openapi.yaml").read_text()
)
REGISTRY: Registry[Any] = Registry().with_resource(
    SPEC_URI, Resource.from_contents(SPEC, default_specification=DRAFT202012)
)


def _pointer(*parts: str) -> str:
    return "/" + "/".join(p.replace("~", "~0").replace("/", "~1") for p in parts)


def _resolve(node: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Follow a local $ref (one level, as the spec uses them); returns node and its path."""
    ref = node.get("$ref")
    if ref is None:
        return node, []
    parts = ref.removeprefix("#/").split("/")
    target: Any = SPEC
    for part in parts:
        target = target[part]
    return target, parts


def check_response(method: str, path: str, status: int, content_type: str, body: bytes) -> None:
    operation = SPEC["paths"][path][method.lower()]
    responses = operation["responses"]
    assert str(status) in responses, f"{method} {path} answered undocumented {status}"
    response, base = _resolve(responses[str(status)])
    base = base or ["paths", path, method.lower(), "responses", str(status)]
    content = response.get("content")
    if not content:
        assert not body, f"{method} {path} {status} documents no body"
        return
    assert content_type in content, f"{method} {path} {status}: undocumented {content_type}"
    if not content_type.endswith("json"):
        return
    pointer = _pointer(*base, "content", content_type, "schema")
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"{SPEC_URI}#{pointer}"}, registry=REGISTRY
    )
    validator.validate(json.loads(body))


def test_the_spec_lists_the_collectors_block_reasons_in_precedence_order() -> None:
    """The reason codes live once in the collector; the spec's enums are copies of them."""
    entry = SPEC["components"]["schemas"]["BlocklistEntry"]["properties"]
    assert entry["reason"]["enum"] == list(REASON_PRECEDENCE) == list(BlockReason)
    assert entry["reasons"]["items"]["enum"] == list(REASON_PRECEDENCE)


def test_spec_and_app_have_the_same_routes(collector_routes: set[tuple[str, str]]) -> None:
    documented = {
        (method.upper(), path)
        for path, item in SPEC["paths"].items()
        for method in item
        if method in ("get", "post", "put", "delete", "patch")
    }
    assert documented == collector_routes


@pytest.fixture
def collector_routes() -> set[tuple[str, str]]:
    """The routes of an app that is built but never started (no database needed)."""
    app = create_app(make_settings("postgresql://unused/x", Path(tempfile.gettempdir())))
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }


async def test_every_answer_matches_the_spec(
    collector: RunningCollector, db: asyncpg.Connection
) -> None:
    session, base = collector.session, collector.base_url
    ingest = {"Authorization": f"Bearer {collector.ingest_token}"}
    admin = {"Authorization": f"Bearer {collector.admin_token}"}
    batch = json.dumps([usage_event("o1"), usage_event("o1"), {"id": 7}]).encode()
    ce = {"Content-Type": "application/cloudevents-batch+json"}
    admin_json = {**admin, "Content-Type": "application/json"}
    ingest_json = {**ingest, "Content-Type": "application/json"}
    credits = "/v1/consumers/{consumer}/credits"
    grant = b'{"amount_micros": 5000000, "idempotency_key": "k1"}'
    regrant = b'{"amount_micros": 7000000, "idempotency_key": "k1"}'
    calls: list[tuple[str, str, str, dict[str, str], bytes | None]] = [
        ("POST", "/v1/events", "/v1/events", {**ingest, **ce}, batch),
        ("POST", "/v1/events", "/v1/events", {**ingest, **ce}, b"{"),
        ("POST", "/v1/events", "/v1/events", ce, batch),
        ("POST", "/v1/events", "/v1/events", {**admin, **ce}, batch),
        ("POST", "/v1/events", "/v1/events", {**ingest, "Content-Type": "text/csv"}, b"a,b"),
        (
            "POST",
            "/v1/events",
            "/v1/events",
            {**ingest, **ce, "Content-Encoding": "gzip"},
            gzip.compress(b"[" + b" " * (17 * 1024 * 1024) + b"]"),
        ),
        ("GET", "/v1/blocklist", "/v1/blocklist", ingest, None),
        (
            "GET",
            "/v1/blocklist?wait=0.1",
            "/v1/blocklist",
            {**ingest, "If-None-Match": '"1"'},
            None,
        ),
        ("GET", "/v1/blocklist?wait=soon", "/v1/blocklist", ingest, None),
        ("GET", "/v1/blocklist", "/v1/blocklist", admin, None),
        ("GET", "/v1/consumers/alice/usage", "/v1/consumers/{consumer}/usage", admin, None),
        ("GET", "/v1/consumers/zed/usage", "/v1/consumers/{consumer}/usage", admin, None),
        ("GET", "/v1/consumers/alice/usage?from=x", "/v1/consumers/{consumer}/usage", admin, None),
        ("GET", "/v1/consumers/alice/usage", "/v1/consumers/{consumer}/usage", {}, None),
        ("GET", "/v1/consumers/alice/usage", "/v1/consumers/{consumer}/usage", ingest, None),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", admin_json, b'{"plan": "pro"}'),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", admin_json, b'{"plan": "x"}'),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", admin_json, b'{"nope": 1}'),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", admin, b'{"plan": "x"}'),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", {}, b"{}"),
        ("PUT", "/v1/consumers/carol", "/v1/consumers/{consumer}", ingest_json, b"{}"),
        ("POST", "/v1/consumers/carol/credits", credits, admin_json, grant),
        ("POST", "/v1/consumers/carol/credits", credits, admin_json, grant),
        ("POST", "/v1/consumers/carol/credits", credits, admin_json, regrant),
        ("POST", "/v1/consumers/carol/credits", credits, admin_json, b'{"amount_micros": 0}'),
        ("POST", "/v1/consumers/carol/credits", credits, admin, grant),
        ("POST", "/v1/consumers/carol/credits", credits, {}, grant),
        ("POST", "/v1/consumers/carol/credits", credits, ingest_json, grant),
        ("GET", "/v1/stripe/status", "/v1/stripe/status", admin, None),
        ("GET", "/v1/stripe/status", "/v1/stripe/status", ingest, None),
        ("GET", "/v1/stripe/status", "/v1/stripe/status", {}, None),
        ("POST", "/v1/stripe/webhook", "/v1/stripe/webhook", {}, b"{}"),  # 503: no secret
        ("GET", "/healthz", "/healthz", {}, None),
        ("GET", "/readyz", "/readyz", {}, None),
        ("GET", "/metrics", "/metrics", admin, None),
        ("GET", "/metrics", "/metrics", ingest, None),
    ]
    seen: set[tuple[str, int]] = set()
    for method, url, path, headers, data in calls:
        async with session.request(method, base + url, headers=headers, data=data) as r:
            body = await r.read()
            check_response(method, path, r.status, r.content_type, body)
            seen.add((path, r.status))
    assert ("/v1/events", 413) in seen and ("/v1/blocklist", 304) in seen
    for path, status in [("/v1/consumers/{consumer}", s) for s in (200, 201, 400, 415, 401, 403)]:
        assert (path, status) in seen
    for status in (201, 409, 400, 415, 401, 403):
        assert (credits, status) in seen
    assert ("/v1/stripe/webhook", 503) in seen
    await db.execute("INSERT INTO blocklist (consumer, reason) VALUES ('alice', 'quota_exceeded')")
    async with session.get(
        base + "/v1/blocklist?wait=5", headers={**ingest, "If-None-Match": '"1"'}
    ) as r:
        check_response("GET", "/v1/blocklist", r.status, r.content_type, await r.read())
        assert r.status == 200


async def test_webhook_answers_match_the_spec(database_url: str, tmp_path: Path) -> None:
    settings = make_settings(database_url, tmp_path, STRIPE_WEBHOOK_SECRET=DEFAULT_SECRET)
    async with run_collector_app(settings) as running:
        path = "/v1/stripe/webhook"
        grant = encode(event("billing.credit_grant.created", credit_grant("cus_1", 100)))
        huge = b"{" + b" " * (1024 * 1024) + b"}"
        deliveries = [
            (grant, signature(grant)),  # 200 (an unknown customer)
            (grant, signature(grant)),  # 200, replayed
            (grant, signature(grant, "whsec_other")),  # 400
            (b"[]", signature(b"[]")),  # 400: signed, but not an event
            (huge, signature(huge)),  # 413
        ]
        statuses = []
        for body, header in deliveries:
            headers = {"Content-Type": "application/json", "Stripe-Signature": header}
            async with running.session.post(
                running.base_url + path, data=body, headers=headers
            ) as r:
                check_response("POST", path, r.status, r.content_type, await r.read())
                statuses.append(r.status)
        assert statuses == [200, 200, 400, 400, 413]
