"""Per-request cost of the resilience layers on their fast paths, next to the reference rows."""

from typing import Any

from benchmarks.conftest import BASELINE, Driver, NoopMiddleware, bare_app, bench
from nexus_middleware import (
    BreakerPolicy,
    CircuitBreakerMiddleware,
    ConcurrencyLimitMiddleware,
    ConcurrencyPolicy,
    PriorityClass,
    TimeoutMiddleware,
)


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app)


def test_noop_pure_asgi_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app))


def test_closed_breaker(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "circuit breaker, closed", CircuitBreakerMiddleware(bare_app))


def test_closed_breaker_per_route(benchmark: Any, driver: Driver) -> None:
    app = CircuitBreakerMiddleware(
        bare_app,
        policy=None,
        routes=[("/health", None, None), ("/api/items/{id}", ["GET"], BreakerPolicy(slow_call_threshold=5))],
    )
    bench(benchmark, driver, "circuit breaker, closed, per route", app)


def test_unsaturated_concurrency_limit(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "concurrency limit, unsaturated", ConcurrencyLimitMiddleware(bare_app))


def test_unsaturated_adaptive_limit_with_priorities(benchmark: Any, driver: Driver) -> None:
    from nexus_middleware import AdaptiveLimit

    policy = ConcurrencyPolicy(
        max_concurrent=100,
        classes=(PriorityClass("critical"), PriorityClass("default", 0.8)),
        adaptive=AdaptiveLimit(max_limit=200),
    )
    app = ConcurrencyLimitMiddleware(bare_app, policy=policy, priority_header="x-priority")
    bench(benchmark, driver, "concurrency limit, adaptive + priorities", app)


def test_timeout(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "timeout (deadline)", TimeoutMiddleware(bare_app, timeout=30))


def test_all_three_stacked(benchmark: Any, driver: Driver) -> None:
    app = TimeoutMiddleware(CircuitBreakerMiddleware(ConcurrencyLimitMiddleware(bare_app)), timeout=30)
    bench(benchmark, driver, "timeout + breaker + concurrency", app)
