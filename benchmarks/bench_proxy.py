"""In-process cost of the proxy's per-request header work (the network legs are in benchmarks/load/)."""

from typing import Any

from benchmarks.conftest import BASELINE, Driver, bare_app, bench
from nexus_middleware.context import get_context
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.proxy import ReverseProxy
from sample_gateway.upstream_client import create_upstream_client

UPSTREAM_HEADERS = [
    (b"content-type", b"application/json"),
    (b"content-length", b"512"),
    (b"connection", b"keep-alive"),
    (b"keep-alive", b"timeout=5"),
    (b"date", b"Sun, 22 Nov 2026 21:00:00 GMT"),
    (b"server", b"upstream"),
    (b"cache-control", b"no-store"),
]


def header_work(proxy: ReverseProxy) -> ASGIApp:
    """What `forward` does to headers on every request, in front of the bare app."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        proxy.request_headers(scope, get_context(scope))
        proxy.response_headers(UPSTREAM_HEADERS)
        await bare_app(scope, receive, send)

    return app


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app, group="proxy")


def test_proxy_header_processing(benchmark: Any, driver: Driver) -> None:
    proxy = ReverseProxy(client=create_upstream_client())
    bench(benchmark, driver, "proxy request + response headers", header_work(proxy), group="proxy")


def test_proxy_header_processing_with_a_hook(benchmark: Any, driver: Driver) -> None:
    def hook(scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        headers.append((b"x-user", b"alice"))
        return headers

    proxy = ReverseProxy(client=create_upstream_client(), header_hooks=[hook])
    bench(benchmark, driver, "proxy headers + one header hook", header_work(proxy), group="proxy")
