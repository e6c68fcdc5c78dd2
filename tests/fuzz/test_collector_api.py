"""schemathesis against the collector: requests generated from schema/openapi.yaml, valid and
invalid, each sent with the right token to the app on a fresh database. No answer is a server
error, every status is documented, and every body and header matches its documented schema.

`POST /v1/stripe/webhook` is left to tests/billing/test_webhooks.py: what it takes is a body
signed with the endpoint's secret, which no generated request has. The blocklist's long poll is
held at most 0.2 s here (TOKEN_METER_BLOCKLIST_MAX_WAIT), so `wait` costs no time.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
from collections.abc import Iterator
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

from tests.conftest import make_settings, run_collector_app
from token_meter_collector.settings import Settings

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
def collector_in_a_thread(collector_settings: Settings) -> Iterator[dict[str, str]]:
    """The app on its own event loop in a thread: schemathesis sends with blocking calls."""
    ready: concurrent.futures.Future[dict[str, str]] = concurrent.futures.Future()
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()

    async def serve() -> None:
        async with run_collector_app(collector_settings) as running:
            ready.set_result(
                {
                    "url": running.base_url,
                    "ingest": running.ingest_token,
                    "admin": running.admin_token,
                }
            )
            await stop.wait()

    def run() -> None:
        try:
            loop.run_until_complete(serve())
        except BaseException as exc:
            if not ready.done():
                ready.set_exception(exc)
            raise
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="collector-under-schemathesis", daemon=True)
    thread.start()
    try:
        yield ready.result(timeout=60)
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(30)


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    collector_settings = make_settings(database_url, tmp_path, TOKEN_METER_BLOCKLIST_MAX_WAIT="0.2")
    with collector_in_a_thread(collector_settings) as running:
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
