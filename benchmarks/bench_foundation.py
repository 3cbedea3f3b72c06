"""Per-request cost of the three foundation middlewares, alone and stacked, against the reference rows."""

from typing import Any

from benchmarks.conftest import Driver, bare_app, bench, make_http_scope
from nexus_middleware import BodySizeLimitMiddleware, RequestIDMiddleware, SecurityHeadersMiddleware


def test_request_id(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "RequestIDMiddleware", RequestIDMiddleware(bare_app))


def test_security_headers(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "SecurityHeadersMiddleware", SecurityHeadersMiddleware(bare_app))


def test_body_limit(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "BodySizeLimitMiddleware", BodySizeLimitMiddleware(bare_app))


def test_body_limit_unframed_get(benchmark: Any, driver: Driver) -> None:
    # The gateway's common request: a GET with neither Content-Length nor Transfer-Encoding, no body to count.
    headers = [(b"host", b"api.example.com"), (b"accept", b"application/json")]
    app = BodySizeLimitMiddleware(bare_app)
    bench(
        benchmark,
        driver,
        "BodySizeLimitMiddleware (GET, no body)",
        app,
        scope_factory=lambda: make_http_scope(headers=headers),
    )


def test_body_limit_with_route_limits(benchmark: Any, driver: Driver) -> None:
    app = BodySizeLimitMiddleware(bare_app, routes={"/upload": None, "/api/items/{id}": 4096})
    bench(benchmark, driver, "BodySizeLimitMiddleware (route limits)", app)


def test_foundation_stack(benchmark: Any, driver: Driver) -> None:
    app = RequestIDMiddleware(SecurityHeadersMiddleware(BodySizeLimitMiddleware(bare_app)))
    bench(benchmark, driver, "request id + security headers + body limit", app)
