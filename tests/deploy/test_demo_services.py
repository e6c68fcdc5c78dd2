"""The Docker demo's stand-ins: the OpenAI-compatible upstream answers with usage the plugins
read (JSON, and SSE when asked as OpenAI is asked), and both fakes start and stop as compose
runs them."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from bench.stack import free_port
from tests.harness import openai_upstream
from tests.harness.paths import REPO_ROOT
from token_meter_plugin.usage import extract_usage

AUTH = {"Authorization": "Bearer demo-openai-key"}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Say hello, please."}]}


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    async with TestClient(TestServer(openai_upstream.create_app())) as test_client:
        yield test_client


async def test_json_answer_carries_usage_the_plugin_reads(client: TestClient[Any, Any]) -> None:
    response = await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    assert response.status == 200
    body = await response.read()
    answer = json.loads(body)
    assert answer["object"] == "chat.completion" and answer["model"] == "gpt-4o-mini"
    usage = extract_usage(
        body, content_type=response.headers["Content-Type"], content_encoding=None
    )
    assert not usage.usage_missing and not usage.streamed
    assert usage.input_tokens == answer["usage"]["prompt_tokens"] > 0
    assert usage.output_tokens == answer["usage"]["completion_tokens"] > 0
    assert usage.total_tokens == answer["usage"]["total_tokens"]
    assert usage.model == "gpt-4o-mini"


async def test_longer_prompts_cost_more_input_tokens(client: TestClient[Any, Any]) -> None:
    long_chat = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}
    short = await (await client.post("/v1/chat/completions", json=CHAT, headers=AUTH)).json()
    long = await (await client.post("/v1/chat/completions", json=long_chat, headers=AUTH)).json()
    assert long["usage"]["prompt_tokens"] > short["usage"]["prompt_tokens"]


async def test_stream_reports_usage_only_when_asked(client: TestClient[Any, Any]) -> None:
    """As OpenAI: usage in a last chunk with `stream_options.include_usage`, which token-meter
    adds to a streaming request that lacks it; none otherwise."""
    for include_usage in (True, False):
        request: dict[str, Any] = {**CHAT, "stream": True}
        if include_usage:
            request["stream_options"] = {"include_usage": True}
        response = await client.post("/v1/chat/completions", json=request, headers=AUTH)
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        body = await response.read()
        assert body.endswith(b"data: [DONE]\n\n")
        usage = extract_usage(
            body, content_type=response.headers["Content-Type"], content_encoding=None
        )
        assert usage.streamed
        assert usage.usage_missing is not include_usage
        if include_usage:
            assert usage.input_tokens > 0 and usage.output_tokens > 0


@pytest.mark.parametrize("authorization", [None, "Bearer ", "Basic abc", "demo-openai-key"])
async def test_without_a_bearer_key_the_answer_is_openais_401(
    client: TestClient[Any, Any], authorization: str | None
) -> None:
    """What a request gets when Kong did not add the header (an unset OPENAI_AUTHORIZATION
    renders an empty one)."""
    headers = {} if authorization is None else {"Authorization": authorization}
    response = await client.post("/v1/chat/completions", json=CHAT, headers=headers)
    assert response.status == 401
    assert (await response.json())["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("body", [b"not json", b"{}", b'{"messages": []}'])
async def test_a_body_that_is_no_chat_request_is_400(
    client: TestClient[Any, Any], body: bytes
) -> None:
    response = await client.post("/v1/chat/completions", data=body, headers=AUTH)
    assert response.status == 400
    assert (await response.json())["error"]["type"] == "invalid_request_error"


# --- as compose runs them -------------------------------------------------------------------


def serve(module: str, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", module, "--host", "127.0.0.1", "--port", str(port), *args],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield process, f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


def wait_until_answering(url: str, headers: dict[str, str] | None = None) -> Any:
    deadline = time.monotonic() + 20
    while True:
        try:
            request = urllib.request.Request(url, headers=headers or {})  # noqa: S310
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("module", "args", "path", "headers"),
    [
        ("tests.harness.openai_upstream", (), "/healthz", {}),
        (
            "tests.harness.stripe",
            ("--customer", "cus_demo_alice"),
            "/v1/customers/cus_demo_alice",
            {"Authorization": "Bearer sk_test_fake"},
        ),
    ],
)
def test_fake_serves_until_sigterm(
    module: str, args: tuple[str, ...], path: str, headers: dict[str, str]
) -> None:
    """`python -m <fake> --host --port` (the compose commands) serves, and stops on the SIGTERM
    `docker compose stop` sends."""
    for process, url in serve(module, *args):
        answer = wait_until_answering(url + path, headers)
        assert answer.get("status") == "ok" or answer.get("id") == "cus_demo_alice"
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0, process.stderr.read() if process.stderr else ""
