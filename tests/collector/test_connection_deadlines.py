"""What a client can make the collector wait for before any handler runs: its request head and
an idle keep-alive connection, both bounded by TOKEN_METER_BODY_TIMEOUT (1 s here) through
aiohttp's keep-alive timer (`app.connection_deadlines`); and what aiohttp's own parser answers
to a request it cannot read. Raw sockets, so the client sends
exactly the bytes it chooses; each wait for the server is bounded, and the checks are on what
the server did (closed the connection, answered), not on how long it took."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest_asyncio
from yarl import URL

from tests.conftest import RunningCollector, make_settings, run_collector_app

BOUND = 1.0
# How long a test waits for the server to act: the bound with room for a loaded machine.
PATIENCE = BOUND + 9.0


@pytest_asyncio.fixture(loop_scope="session")
async def bounded(database_url: str, tmp_path: Path) -> AsyncIterator[RunningCollector]:
    settings = make_settings(database_url, tmp_path, TOKEN_METER_BODY_TIMEOUT=str(BOUND))
    async with run_collector_app(settings) as running:
        yield running


async def connect(collector: RunningCollector) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    url = URL(collector.base_url)
    return await asyncio.open_connection(url.host, url.port)


async def closed_by_server(reader: asyncio.StreamReader) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    try:
        return await asyncio.wait_for(reader.read(), PATIENCE)
    except ConnectionResetError:
        return b""


async def test_half_a_request_line_is_cut_off(bounded: RunningCollector) -> None:
    """A client that sends half a request line and waits: the server closes the connection,
    without an answer, and the collector goes on serving."""
    reader, writer = await connect(bounded)
    try:
        writer.write(b"GET /heal")
        await writer.drain()
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()
    status, _, _ = await bounded.get("/healthz")
    assert status == 200


async def test_headers_trickled_byte_by_byte_are_cut_off(bounded: RunningCollector) -> None:
    """Slowloris: a header byte every 50 ms, never the blank line that ends the head. Bytes
    arriving do not extend the deadline: the server closes while the client is still sending."""
    reader, writer = await connect(bounded)

    async def trickle() -> None:
        writer.write(b"POST /v1/events HTTP/1.1\r\nHost: x\r\n")
        while True:
            writer.write(b"X-Slow: a\r\n"[:1])
            await writer.drain()
            await asyncio.sleep(0.05)

    sending = asyncio.create_task(trickle())
    try:
        assert await closed_by_server(reader) == b""
        assert not sending.done() or isinstance(sending.exception(), ConnectionError)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()


async def test_an_idle_keep_alive_connection_is_closed_after_its_answer(
    bounded: RunningCollector,
) -> None:
    """Two requests back to back on one connection are both answered (keep-alive works); then
    the connection is left idle, and the server closes it."""
    reader, writer = await connect(bounded)
    try:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
        for _ in range(2):
            writer.write(request)
            await writer.drain()
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PATIENCE)
            assert head.startswith(b"HTTP/1.1 200 "), head
            assert b"Connection: close" not in head
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await asyncio.wait_for(reader.readexactly(length), PATIENCE)
        assert await closed_by_server(reader) == b""
    finally:
        writer.close()


async def test_what_aiohttps_parser_refuses_is_a_plain_400_and_a_closed_connection(
    bounded: RunningCollector,
) -> None:
    """The one answer that is not problem+json, as the README's API section says: a request
    line, a header line too long or too many header fields are refused by aiohttp's parser
    before any middleware, in text/plain, and the connection is closed."""
    refused = [
        b"BLAH\x00 / HTTP/1.1\r\n\r\n",
        b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\nX: " + b"y" * 9000 + b"\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(200)) + b"\r\n",
    ]
    for raw in refused:
        reader, writer = await connect(bounded)
        try:
            writer.write(raw)
            await writer.drain()
            answer = await closed_by_server(reader)
        finally:
            writer.close()
        head = answer.partition(b"\r\n\r\n")[0]
        assert head.split(b" ", 2)[1] == b"400", (raw[:30], head)
        assert b"Content-Type: text/plain" in head, (raw[:30], head)
