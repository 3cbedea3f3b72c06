"""Per-request cost of the three foundation middlewares, alone and stacked, against the reference rows."""

from typing import Any

from benchmarks.conftest import Driver, bare_app, bench
from nexus_middleware import BodySizeLimitMiddleware, RequestIDMiddleware, SecurityHeadersMiddleware


def test_request_id(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "RequestIDMiddleware", RequestIDMiddleware(bare_app))


def test_security_headers(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "SecurityHeadersMiddleware", SecurityHeadersMiddleware(bare_app))


def test_body_limit(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "BodySizeLimitMiddleware", BodySizeLimitMiddleware(bare_app))


def test_body_limit_with_route_limits(benchmark: Any, driver: Driver) -> None:
    app = BodySizeLimitMiddleware(bare_app, route_limits={"/upload": None, "/api/items/{id}": 4096})
    bench(benchmark, driver, "BodySizeLimitMiddleware (route limits)", app)


def test_foundation_stack(benchmark: Any, driver: Driver) -> None:
    app = RequestIDMiddleware(SecurityHeadersMiddleware(BodySizeLimitMiddleware(bare_app)))
    bench(benchmark, driver, "request id + security headers + body limit", app)
