"""The three foundation middlewares stacked in Starlette and FastAPI apps, in-process and behind uvicorn."""

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import aiohttp
import httpx
import pytest
from fastapi import BackgroundTasks, FastAPI, Request
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request as StarletteRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from nexus_middleware import (
    BodySizeLimitMiddleware,
    RequestIDLogFilter,
    RequestIDMiddleware,
    SecurityHeadersMiddleware,
)
from nexus_middleware.context import current_request_id
from tests.support.servers import serve

LOGGER = "tests.foundation.app"
CHUNKS = [b"alpha-", b"beta-", b"gamma"]
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Seen:
    """What the endpoints observed, and an event set once the background task ran."""

    def __init__(self) -> None:
        self.endpoint: list[tuple[str | None, str | None]] = []  # (request.state id, current_request_id())
        self.background: list[str | None] = []
        self.background_ran = asyncio.Event()

    def record_background(self) -> None:
        self.background.append(current_request_id())
        logging.getLogger(LOGGER).info("background")
        self.background_ran.set()


async def _stream() -> AsyncIterator[bytes]:
    for chunk in CHUNKS:
        await asyncio.sleep(0)
        yield chunk


def starlette_app(seen: Seen) -> Starlette:
    async def hello(request: StarletteRequest) -> Response:
        seen.endpoint.append((request.state.nexus.request_id, current_request_id()))
        logging.getLogger(LOGGER).info("endpoint")
        return JSONResponse({"hello": "world"}, background=BackgroundTask(seen.record_background))

    async def stream(request: StarletteRequest) -> Response:
        return StreamingResponse(_stream(), media_type="text/plain")

    async def upload(request: StarletteRequest) -> Response:
        return PlainTextResponse(str(len(await request.body())))

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(current_request_id() or "")
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/hello", hello),
            Route("/stream", stream),
            Route("/upload", upload, methods=["POST"]),
            Route("/big-upload", upload, methods=["POST"]),
            WebSocketRoute("/ws", echo),
        ]
    )
    _stack(app)
    return app


def fastapi_app(seen: Seen) -> FastAPI:
    app = FastAPI()

    @app.get("/hello")
    async def hello(request: Request, tasks: BackgroundTasks) -> dict[str, str]:
        seen.endpoint.append((request.state.nexus.request_id, current_request_id()))
        logging.getLogger(LOGGER).info("endpoint")
        tasks.add_task(seen.record_background)
        return {"hello": "world"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        return StreamingResponse(_stream(), media_type="text/plain")

    @app.post("/upload")
    @app.post("/big-upload")
    async def upload(request: Request) -> PlainTextResponse:
        return PlainTextResponse(str(len(await request.body())))

    @app.websocket("/ws")
    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(current_request_id() or "")
        await websocket.close()

    _stack(app)
    return app


def _stack(app: Starlette) -> None:
    app.add_middleware(
        BodySizeLimitMiddleware, max_body_size=64, max_header_bytes=8192, routes={"/big-upload": 4096}
    )
    app.add_middleware(SecurityHeadersMiddleware, preset="api")
    app.add_middleware(RequestIDMiddleware)


APPS: list[Callable[[Seen], Starlette]] = [starlette_app, fastapi_app]


@pytest.fixture
def log_output() -> Iterator[io.StringIO]:
    """What a user's handler with the filter and `%(request_id)s` in its format writes."""
    output = io.StringIO()
    handler = logging.StreamHandler(output)
    handler.addFilter(RequestIDLogFilter())
    handler.setFormatter(logging.Formatter("%(message)s id=%(request_id)s trace=%(trace_id)s"))
    logger = logging.getLogger(LOGGER)
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield output
    finally:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)


def _client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.mark.parametrize("factory", APPS)
async def test_request_id_reaches_state_endpoint_background_task_and_logs(
    factory: Callable[[Seen], Starlette], log_output: io.StringIO
) -> None:
    seen = Seen()
    async with _client(factory(seen)) as client:
        response = await client.get("/hello", headers={"X-Request-ID": "req-42", "traceparent": TRACEPARENT})
    await asyncio.wait_for(seen.background_ran.wait(), timeout=10)
    assert response.json() == {"hello": "world"}
    assert response.headers["x-request-id"] == "req-42"
    assert response.headers["content-security-policy"] == "default-src 'none'; frame-ancestors 'none'"
    assert seen.endpoint == [("req-42", "req-42")]
    assert seen.background == ["req-42"]
    logging.getLogger(LOGGER).info("outside")
    assert log_output.getvalue().splitlines() == [
        f"endpoint id=req-42 trace={TRACE_ID}",
        f"background id=req-42 trace={TRACE_ID}",
        "outside id=- trace=-",
    ]


@pytest.mark.parametrize("factory", APPS)
async def test_streaming_response_arrives_chunk_by_chunk(factory: Callable[[Seen], Starlette]) -> None:
    messages: list[dict[str, Any]] = []

    requests = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> dict[str, Any]:
        if requests:
            return requests.pop()
        await asyncio.Event().wait()  # the client stays connected; the response ends the request
        raise AssertionError("unreachable")

    async def send(message: Any) -> None:
        messages.append(dict(message))

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/stream",
        "raw_path": b"/stream",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", b"test")],
        "client": ("127.0.0.1", 1),
        "server": ("test", 80),
    }
    await factory(Seen())(scope, receive, send)
    bodies = [(m["body"], m.get("more_body", False)) for m in messages if m["type"] == "http.response.body"]
    assert [b for b in bodies if b[0]] == [(b"alpha-", True), (b"beta-", True), (b"gamma", True)]
    assert bodies[-1] == (b"", False)
    start = messages[0]
    names = [k for k, _ in start["headers"]]
    assert b"x-request-id" in names
    assert b"x-content-type-options" in names


@pytest.mark.parametrize("factory", APPS)
async def test_refusals_carry_request_id_and_security_headers(factory: Callable[[Seen], Starlette]) -> None:
    async with _client(factory(Seen())) as client:
        response = await client.post("/upload", content=b"x" * 65, headers={"X-Request-ID": "big-1"})
        allowed = await client.post("/big-upload", content=b"x" * 4096)
    assert response.status_code == 413
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["x-request-id"] == "big-1"
    assert response.headers["x-frame-options"] == "DENY"
    assert response.json()["request_id"] == "big-1"
    assert (allowed.status_code, allowed.text) == (200, "4096")


async def _chunks(count: int, size: int) -> AsyncIterator[bytes]:
    for _ in range(count):
        yield b"x" * size


@pytest.mark.e2e
@pytest.mark.parametrize("factory", APPS)
async def test_end_to_end_through_uvicorn(factory: Callable[[Seen], Starlette]) -> None:
    seen = Seen()
    async with serve(factory(seen)) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        # uvicorn believes X-Forwarded-Proto from 127.0.0.1 (its default --forwarded-allow-ips): TLS ended
        # at a proxy in front, so HSTS is sent; over plain http it never is (RFC 6797 §7.2).
        hello = await client.get("/hello", headers={"x-forwarded-proto": "https"})
        await asyncio.wait_for(seen.background_ran.wait(), timeout=10)
        async with client.stream("GET", "/stream") as streamed:
            received = [chunk async for chunk in streamed.aiter_raw()]
        under = await client.post("/upload", content=_chunks(4, 16))
        over = await client.post("/upload", content=_chunks(4, 17))
        declared = await client.post("/big-upload", content=b"x" * 5000)

    generated = hello.headers["x-request-id"]
    assert len(generated) == 32
    assert seen.endpoint == [(generated, generated)]
    assert seen.background == [generated]
    assert hello.headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"
    assert "strict-transport-security" not in streamed.headers
    assert streamed.headers["x-content-type-options"] == "nosniff"
    assert b"".join(received) == b"".join(CHUNKS)
    assert streamed.headers["transfer-encoding"] == "chunked"
    assert (under.status_code, under.text) == (200, "64")
    assert over.status_code == 413  # a real chunked upload, cut as it arrived
    assert over.headers["content-type"] == "application/problem+json"
    assert over.json()["detail"] == "The request body is larger than 64 bytes."
    assert declared.status_code == 413


@pytest.mark.e2e
@pytest.mark.parametrize("factory", APPS)
async def test_websocket_handshake_end_to_end(factory: Callable[[Seen], Starlette]) -> None:
    async with serve(factory(Seen())) as base_url, aiohttp.ClientSession() as session:
        ws_url = base_url.replace("http://", "ws://") + "/ws"
        async with session.ws_connect(ws_url, headers={"X-Request-ID": "ws-77"}) as websocket:
            handshake_id = websocket._response.headers.get("x-request-id")
            message = await websocket.receive_str(timeout=10)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url, headers={"X-Big": "x" * 10_000, "X-Request-ID": "ws-78"})
    assert handshake_id == "ws-77"
    assert message == "ws-77"
    assert refused.value.status == 431  # refused by the body limit layer before accept, as a problem
    assert refused.value.headers is not None
    assert refused.value.headers["content-type"] == "application/problem+json"
    assert refused.value.headers["x-request-id"] == "ws-78"
