"""Reference rows every middleware benchmark is read against."""

from typing import Any

from starlette.middleware.base import BaseHTTPMiddleware

from benchmarks.conftest import BASELINE, Driver, NoopMiddleware, bare_app, bench


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app)


def test_noop_pure_asgi_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app))


def test_base_http_middleware(benchmark: Any, driver: Driver) -> None:
    async def dispatch(request: Any, call_next: Any) -> Any:
        return await call_next(request)

    bench(
        benchmark, driver, "starlette BaseHTTPMiddleware (reference)", BaseHTTPMiddleware(bare_app, dispatch)
    )
