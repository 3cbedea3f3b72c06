"""The upstream client's exchange against scripted HTTP/1.1 servers on loopback: pooling, interim responses,
stale keep-alive connections, cancellation, header safety.

aiohttp's requests without a streamed body take the direct path (`_AiohttpClient._send_direct`: aiohttp's
connector and parser without its session layer); these tests pin what that path promises, and where httpx
behaves the same, that it does.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from sample_gateway.upstream_client import (
    Origin,
    UpstreamClient,
    UpstreamDisconnectedError,
    UpstreamProtocolError,
    create_upstream_client,
)

pytestmark = pytest.mark.e2e

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Scripted:
    """A TCP server whose `handler(reader, writer, n)` plays connection number `n` (from 0)."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def read_request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                head += await reader.readexactly(int(line.split(b":")[1]))
        self.requests.append(head)
        return head

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = self.connections
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(Exception):
            await self.handler(reader, writer, number)
        writer.close()


@contextlib.asynccontextmanager
async def scripted(handler: Handler) -> AsyncIterator[tuple[Scripted, Origin]]:
    script = Scripted(handler)
    server = await asyncio.start_server(script._handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield script, Origin("http", "127.0.0.1", port)
    finally:
        server.close()
        for writer in script.writers:  # connections still open end with the test, not at garbage collection
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await server.wait_closed()


async def exchange(
    client: UpstreamClient, origin: Origin, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    headers = [(b"host", origin.host_header)]
    if body is not None:
        headers.append((b"content-length", str(len(body)).encode()))
    response = await client.open(method, origin, "/x", headers, body, connect_timeout=5, read_timeout=5)
    try:
        chunks = []
        while chunk := await response.read():
            chunks.append(chunk)
        return response.status, b"".join(chunks)
    finally:
        await response.aclose()


@pytest.fixture
async def aiohttp_client() -> AsyncIterator[UpstreamClient]:
    client = create_upstream_client("aiohttp")
    yield client
    await client.aclose()


async def test_a_connection_is_reused_for_requests_in_turn(upstream_client: UpstreamClient) -> None:
    async def keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            await script.read_request(reader)
            writer.write(OK)

    async with scripted(keep_alive) as (script, origin):
        results = [await exchange(upstream_client, origin) for _ in range(3)]
        results.append(await exchange(upstream_client, origin, "PUT", b"in memory"))
    assert results == [(200, b"ok")] * 4
    assert script.connections == 1
    assert script.requests[3].startswith(b"PUT /x HTTP/1.1\r\n")
    assert script.requests[3].endswith(b"\r\ncontent-length: 9\r\n\r\nin memory")


async def test_interim_responses_are_skipped(upstream_client: UpstreamClient) -> None:
    async def early_hints(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n" + OK)
        await writer.drain()
        await reader.read()

    async with scripted(early_hints) as (script, origin):
        assert await exchange(upstream_client, origin) == (200, b"ok")


@pytest.mark.parametrize(
    ("method", "body", "connections"),
    [("GET", None, 2), ("PUT", b"replayable", 2), ("POST", b"maybe processed", 1)],
)
async def test_a_stale_keep_alive_connection_is_replayed_once_for_idempotent_methods(
    aiohttp_client: UpstreamClient, method: str, body: bytes | None, connections: int
) -> None:
    # The first connection answers one request, then takes the next and closes without a word: the race of
    # an upstream's keep-alive timeout against a pooled connection's reuse.
    async def closes_after_one(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int
    ) -> None:
        await script.read_request(reader)
        writer.write(OK)
        if number == 0:
            await script.read_request(reader)
            return
        while True:
            await script.read_request(reader)
            writer.write(OK)

    async with scripted(closes_after_one) as (script, origin):
        assert await exchange(aiohttp_client, origin) == (200, b"ok")
        if connections == 1:
            with pytest.raises(UpstreamDisconnectedError):
                await exchange(aiohttp_client, origin, method, body)
        else:
            assert await exchange(aiohttp_client, origin, method, body) == (200, b"ok")
    assert script.connections == connections
    assert [request.split(b" ")[0] for request in script.requests[1:]] == [method.encode()] * connections


async def test_a_cancelled_exchange_never_returns_its_connection_to_the_pool(
    upstream_client: UpstreamClient,
) -> None:
    first_request = asyncio.Event()

    async def slow_then_fast(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        while True:
            await script.read_request(reader)
            if number == 0:
                first_request.set()
                await reader.read()  # never answers; a late answer must not reach the next request
                return
            writer.write(OK)

    async with scripted(slow_then_fast) as (script, origin):
        pending = asyncio.ensure_future(exchange(upstream_client, origin))
        await asyncio.wait_for(first_request.wait(), 5)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert await exchange(upstream_client, origin) == (200, b"ok")
    assert script.connections == 2


async def test_an_invalid_response_head_is_a_protocol_error(upstream_client: UpstreamClient) -> None:
    async def garbage(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n")
        await writer.drain()
        await reader.read()

    async with scripted(garbage) as (script, origin):
        with pytest.raises(UpstreamProtocolError):
            await exchange(upstream_client, origin)


@pytest.mark.parametrize("body", [None, b"in memory"])
@pytest.mark.parametrize("value", [b"1\r\nx-injected: 2", b"1\nx-injected: 2", b"1\r"])
async def test_a_header_with_a_line_break_is_refused_before_connecting(
    aiohttp_client: UpstreamClient, value: bytes, body: bytes | None
) -> None:
    async def answers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, number: int) -> None:
        await script.read_request(reader)
        writer.write(OK)

    async with scripted(answers) as (script, origin):
        headers = [(b"host", origin.host_header), (b"x-value", value)]
        with pytest.raises(ValueError, match="line break"):
            await aiohttp_client.open("GET", origin, "/x", headers, body, connect_timeout=5, read_timeout=5)
        assert await exchange(aiohttp_client, origin) == (200, b"ok")  # the gate slot was given back
    assert script.connections == 1
    assert b"x-injected" not in b"".join(script.requests)
