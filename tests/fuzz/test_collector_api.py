"""schemathesis against the collector: requests generated from schema/openapi.yaml, valid and
invalid, each sent with the right token to the app on a fresh database. No answer is a server
error, every status is documented, and every body and header matches its documented schema.

`POST /v1/stripe/webhook` is left to tests/billing/test_webhooks.py: what it takes is a body
signed with the endpoint's secret, which no generated request has. The blocklist's long poll is
held at most 0.2 s here (TOKEN_METER_BLOCKLIST_MAX_WAIT), so `wait` costs no time. Stripe
billing is off here; test_collector_api_stripe.py runs the Stripe routes with it on.
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable, Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.conftest import CollectorProcess

SPEC = Path(str(resources.files("token_meter_schema") / "openapi.yaml"))
schema = schemathesis.openapi.from_path(SPEC).exclude(path="/v1/stripe/webhook")
# The right token goes with every request (the token matrix is tests/collector/
# test_hostile_requests.py); query parameters the document does not name are ignored by the
# collector, as by most APIs, so none are generated to be refused.
schema.config.generation.update(allow_extra_parameters=False, with_security_parameters=False)
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
]


@contextlib.contextmanager
def collector_in_a_process(
    factory: Callable[..., CollectorProcess], database_url: str, **env: str
) -> Iterator[dict[str, str]]:
    """`token-meter-collector` as a process of its own, on `database_url`, with `env`.

    Not a thread of this process: CPython 3.11 counts the depth of AST construction per
    interpreter, not per thread, so two `ast.parse` at once (hypothesis describing a strategy
    while it generates; a traceback the collector formats, which parses the failing line to
    place its carets) can fail one with "SystemError: AST constructor recursion depth mismatch"
    (python/cpython#106905), a failure of neither the collector nor the test."""
    tokens = {
        "ingest": "ingest-" + secrets.token_hex(16),
        "admin": "admin-" + secrets.token_hex(16),
    }
    collector = factory(
        database_url,
        TOKEN_METER_INGEST_TOKEN=tokens["ingest"],
        TOKEN_METER_ADMIN_TOKEN=tokens["admin"],
        TOKEN_METER_LOG_LEVEL="warning",
        **env,
    )
    collector.start()
    try:
        yield {"url": collector.base_url, **tokens}
    finally:
        assert collector.stop() == 0, collector.log()[-3000:]


@pytest.fixture
def api(
    database_url: str, collector_process_factory: Callable[..., CollectorProcess]
) -> Iterator[dict[str, str]]:
    with collector_in_a_process(
        collector_process_factory, database_url, TOKEN_METER_BLOCKLIST_MAX_WAIT="0.2"
    ) as running:
        yield running


def token_for(case: Any, api: dict[str, str]) -> dict[str, str]:
    security = case.operation.definition.raw.get("security", [])
    names = {name for requirement in security for name in requirement}
    if "ingestToken" in names:
        return {"Authorization": f"Bearer {api['ingest']}"}
    if "adminToken" in names:
        return {"Authorization": f"Bearer {api['admin']}"}
    return {}


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    # One database and app per operation, shared by its examples, as a running collector is.
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
    ],
)
def test_the_collector_answers_as_its_openapi_document_says(case: Any, api: dict[str, str]) -> None:
    response = case.call(base_url=api["url"], headers=token_for(case, api))
    if case.operation.path != "/v1/events":
        case.validate_response(response, checks=CHECKS)
        return
    # Contract 3: a JSON array is a batch, and an item that is not an event is rejected on its
    # own in a 200 (the valid ones stored), not the whole batch refused as the check expects.
    case.validate_response(response, checks=[c for c in CHECKS if c is not negative_data_rejection])
    if response.status_code == 200 and isinstance(case.body, list):
        rejected = {item["index"] for item in response.json()["rejected"]}
        assert {i for i, event in enumerate(case.body) if not isinstance(event, dict)} <= rejected
