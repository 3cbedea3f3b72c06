"""The apps the load benchmark serves with uvicorn, each in its own process (`uvicorn --factory ...`).

- `upstream`: a raw ASGI app answering a small JSON body: the ceiling every other row is read against.
- `minimal_aiohttp`, `minimal_httpx2`, `minimal_httpx`: the smallest raw-ASGI proxy one can write with each
  client library (pooled client from the lifespan, request streamed, response streamed raw, timeouts set).
  They are the issue's comparison: the cost of the client library alone.
- `gateway_proxy_aiohttp`, `gateway_proxy_httpx`: `sample_gateway.proxy.ReverseProxy` in a minimal app (one
  target, path normalization, everything the data plane does per request, no middleware).

Every factory reads the upstream base URL from `NEXUS_BENCH_UPSTREAM`; a `--gateway-app` factory given to
`run.py` is served the same way and must read it too.
"""

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from nexus_middleware.paths import request_path
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.contracts import Target, UpstreamPolicy
from sample_gateway.proxy import ReverseProxy
from sample_gateway.upstream_client import ClientKind, UpstreamClient, create_upstream_client

BODY = b'{"id":42,"name":"widget","tags":["a","b","c"],"price":9.99}'
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"transfer-encoding", b"te", b"trailer", b"upgrade"})


def _upstream_url() -> str:
    return os.environ.get("NEXUS_BENCH_UPSTREAM", "http://127.0.0.1:8001")


def upstream() -> ASGIApp:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})

    return _served(handle)


def _served(
    handle: ASGIApp,
    startup: Callable[[], Awaitable[None]] | None = None,
    shutdown: Callable[[], Awaitable[None]] | None = None,
) -> ASGIApp:
    """`handle` for http requests; `startup`/`shutdown` run by the lifespan (the pooled client's life)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await handle(scope, receive, send)
            return
        if scope["type"] != "lifespan":
            return
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                if startup is not None:
                    await startup()
                await send({"type": "lifespan.startup.complete"})
            else:
                if shutdown is not None:
                    await shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    return app


async def _send_response(send: Send, status: int, raw_headers: Any, body: AsyncIterator[bytes]) -> None:
    """The upstream response streamed back as it comes, as the minimal proxies all do."""
    await send({"type": "http.response.start", "status": status, "headers": _response_headers(raw_headers)})
    async for chunk in body:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def _request_body(receive: Receive) -> Any:
    while True:
        message = await receive()
        body = message.get("body", b"")
        if body:
            yield body
        if not message.get("more_body", False):
            return


def _request_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in scope["headers"] if k not in _HOP_BY_HOP and k != b"host"]


def _response_headers(raw: Any) -> list[tuple[bytes, bytes]]:
    return [(k.lower(), v) for k, v in raw if k.lower() not in _HOP_BY_HOP]


def minimal_aiohttp() -> ASGIApp:
    import aiohttp

    base = _upstream_url()
    state: dict[str, aiohttp.ClientSession] = {}

    async def startup() -> None:
        state["session"] = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=100),
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(sock_connect=2, sock_read=30),
        )

    async def shutdown() -> None:
        await state["session"].close()

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        url = base + scope["raw_path"].decode("latin-1")
        has_body = scope["method"] not in ("GET", "HEAD")
        async with state["session"].request(
            scope["method"],
            url,
            headers=[(k.decode("latin-1"), v.decode("latin-1")) for k, v in _request_headers(scope)],
            data=_request_body(receive) if has_body else None,
            allow_redirects=False,
        ) as response:
            await _send_response(send, response.status, response.raw_headers, response.content.iter_any())

    return _served(handle, startup, shutdown)


def _minimal_httpx_like(module: Any) -> ASGIApp:
    base = _upstream_url()
    state: dict[str, Any] = {}

    async def startup() -> None:
        state["client"] = module.AsyncClient(
            limits=module.Limits(max_connections=100, max_keepalive_connections=100),
            timeout=module.Timeout(connect=2, read=30, write=30, pool=2),
            trust_env=False,
            follow_redirects=False,
        )

    async def shutdown() -> None:
        await state["client"].aclose()

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        client = state["client"]
        has_body = scope["method"] not in ("GET", "HEAD")
        request = client.build_request(
            scope["method"],
            base + scope["raw_path"].decode("latin-1"),
            headers=_request_headers(scope),
            content=_request_body(receive) if has_body else None,
        )
        response = await client.send(request, stream=True)
        try:
            await _send_response(send, response.status_code, response.headers.raw, response.aiter_raw())
        finally:
            await response.aclose()

    return _served(handle, startup, shutdown)


def minimal_httpx() -> ASGIApp:
    import httpx

    return _minimal_httpx_like(httpx)


def minimal_httpx2() -> ASGIApp:
    import httpx2  # type: ignore[import-not-found,unused-ignore]

    return _minimal_httpx_like(httpx2)


class _OneTarget:
    def __init__(self, url: str) -> None:
        self._target = Target(id="bench", url=url)

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        return self._target


def _gateway_proxy(kind: ClientKind) -> ASGIApp:
    selector = _OneTarget(_upstream_url())
    policy = UpstreamPolicy(service="bench")
    state: dict[str, Any] = {}

    async def startup() -> None:
        client: UpstreamClient = create_upstream_client(kind)
        state["client"] = client
        state["proxy"] = ReverseProxy(client=client)

    async def shutdown() -> None:
        await state["client"].aclose()

    async def handle(scope: Scope, receive: Receive, send: Send) -> None:
        proxy: ReverseProxy = state["proxy"]
        await proxy.forward(scope, receive, send, selector=selector, policy=policy, path=request_path(scope))

    return _served(handle, startup, shutdown)


def gateway_proxy_aiohttp() -> ASGIApp:
    return _gateway_proxy("aiohttp")


def gateway_proxy_httpx() -> ASGIApp:
    return _gateway_proxy("httpx")
