"""A stand-in for OpenAI's Chat Completions endpoint, with usage, so the Docker demo runs without
an OpenAI key:

    python -m tests.harness.openai_upstream [--host 0.0.0.0] [--port 8080]

`POST /v1/chat/completions` answers like OpenAI: 401 `invalid_api_key` without `Authorization:
Bearer <key>` (any key is taken: it shows that Kong added the header), 400 for a body that is not
a chat request, else a `chat.completion` with `usage`, or with `"stream": true` an SSE stream of
`chat.completion.chunk` events ending in `data: [DONE]`, whose last chunk carries `usage` only
when the request asked for it with `stream_options.include_usage`, as OpenAI does. Token counts
are made up but consistent: about four characters of the messages a token. `GET /healthz`
answers 200 for the compose health check.
"""

from __future__ import annotations

import argparse
import json
import math
import time
import uuid
from collections.abc import Sequence
from typing import Any, Final

from aiohttp import web

REPLY: Final = "This answer comes from token-meter's demo upstream; no model was called."
CHARS_PER_TOKEN: Final = 4
TOKENS_PER_MESSAGE: Final = 3  # OpenAI's chat format costs a few tokens per message


def _error(status: int, message: str, type_: str, code: str | None) -> web.Response:
    body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
    return web.json_response(body, status=status)


def _text_of(content: Any) -> str:
    """A message's content: a string, or a list of parts of which the text ones count."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def prompt_tokens(messages: Sequence[Any]) -> int:
    total = 0
    for message in messages:
        text = _text_of(message.get("content")) if isinstance(message, dict) else ""
        total += TOKENS_PER_MESSAGE + math.ceil(len(text) / CHARS_PER_TOKEN)
    return total


def completion_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / CHARS_PER_TOKEN))


def usage(prompt: int, completion: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    authorization = request.headers.get("Authorization", "")
    scheme, _, key = authorization.partition(" ")
    if scheme != "Bearer" or not key.strip():
        return _error(
            401,
            "Missing or malformed Authorization header: expected 'Bearer <key>'.",
            "invalid_request_error",
            "invalid_api_key",
        )
    try:
        body = await request.json()
    except ValueError:
        return _error(400, "The body is not valid JSON.", "invalid_request_error", None)
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list) or not messages:
        return _error(400, "'messages' must be a non-empty array.", "invalid_request_error", None)
    model = body.get("model") if isinstance(body.get("model"), str) else "gpt-4o-mini"
    prompt, completion = prompt_tokens(messages), completion_tokens(REPLY)
    completion_id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    if body.get("stream") is True:
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and options.get("include_usage") is True
        return await _stream(
            request, completion_id, created, model, (prompt, completion), include_usage
        )
    return web.json_response(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": REPLY, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": usage(prompt, completion),
            "system_fingerprint": "fp_token_meter_demo",
        }
    )


async def _stream(
    request: web.Request,
    completion_id: str,
    created: int,
    model: str,
    tokens: tuple[int, int],
    include_usage: bool,
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)

    async def send(choices: list[dict[str, Any]], usage_value: Any = None) -> None:
        chunk: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": "fp_token_meter_demo",
            "choices": choices,
        }
        if include_usage:  # OpenAI sends `"usage": null` on every chunk but the last
            chunk["usage"] = usage_value
        await response.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")

    await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
    for word in REPLY.split(" "):
        await send([{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}])
    await send([{"index": 0, "delta": {}, "finish_reason": "stop"}])
    if include_usage:
        await send([], usage(*tokens))
    await response.write(b"data: [DONE]\n\n")
    await response.write_eof()
    return response


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def create_app() -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/healthz", healthz)
    return app


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.openai_upstream",
        description="A stand-in for OpenAI's chat completions endpoint, with usage.",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    web.run_app(create_app(), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
