"""Per-request cost of the observability layers, read next to the reference rows of bench_reference.py.

Run: `pytest benchmarks/bench_reference.py benchmarks/bench_observability.py --no-cov`.
"""

import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from benchmarks.conftest import BASELINE, Driver, NoopMiddleware, bare_app, bench, make_http_scope
from nexus_middleware import (
    AccessLogMiddleware,
    AuditLogMiddleware,
    LoggerSink,
    MetricsMiddleware,
    TracingMiddleware,
)
from nexus_middleware.context import get_context
from nexus_middleware.types import Receive, Scope, Send


@pytest.fixture
def quiet_access_logger() -> Iterator[logging.Logger]:
    """An access logger that formats every record and discards it (what a file handler costs, minus I/O)."""
    logger = logging.getLogger("benchmarks.access")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = logging.NullHandler()
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)


async def decided_app(scope: Scope, receive: Receive, send: Send) -> None:
    """The bare app behind two layers that recorded their decisions (what metrics reads in a real stack)."""
    context = get_context(scope)
    context.record("ratelimit", "allow", rule="per-user", remaining=9)
    context.record("proxy", "forwarded", service="items", target="10.0.0.1:80", retries=0)
    await bare_app(scope, receive, send)


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app)


def test_noop_pure_asgi_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app))


def test_decided_app(benchmark: Any, driver: Driver) -> None:
    # What the "+ 2 decisions" rows pay before any middleware: subtract it to read the middleware's own cost.
    bench(benchmark, driver, "decided app (bare + 2 recorded decisions)", decided_app)


def test_metrics(benchmark: Any, driver: Driver) -> None:
    app = MetricsMiddleware(bare_app, registry=CollectorRegistry(), routes=["/api/items/{id}"])
    bench(benchmark, driver, "MetricsMiddleware", app)


def test_metrics_with_decisions(benchmark: Any, driver: Driver) -> None:
    app = MetricsMiddleware(decided_app, registry=CollectorRegistry(), routes=["/api/items/{id}"])
    bench(benchmark, driver, "MetricsMiddleware + 2 decisions (app records)", app)


def test_tracing_no_sdk(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "TracingMiddleware (no SDK: no-op)", TracingMiddleware(bare_app))


def test_tracing_no_sdk_without_trace_headers(benchmark: Any, driver: Driver) -> None:
    untraced = [(name, value) for name, value in make_http_scope()["headers"] if name != b"traceparent"]
    bench(
        benchmark,
        driver,
        "TracingMiddleware (no SDK, no trace headers)",
        TracingMiddleware(bare_app),
        scope_factory=lambda: make_http_scope(headers=untraced),
    )


def test_tracing_in_memory_exporter(benchmark: Any, driver: Driver) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = TracingMiddleware(bare_app, tracer_provider=provider)

    def run_and_clear() -> None:
        exporter.clear()

    try:
        bench(benchmark, driver, "TracingMiddleware (SDK, in-memory exporter)", app)
    finally:
        run_and_clear()
        provider.shutdown()


def test_access_log(benchmark: Any, driver: Driver, quiet_access_logger: logging.Logger) -> None:
    bench(
        benchmark,
        driver,
        "AccessLogMiddleware (JSON line, redacted)",
        AccessLogMiddleware(bare_app, logger=quiet_access_logger),
    )


def test_access_log_disabled_logger(benchmark: Any, driver: Driver) -> None:
    quiet = logging.getLogger("benchmarks.access.disabled")
    quiet.setLevel(logging.WARNING)
    bench(
        benchmark,
        driver,
        "AccessLogMiddleware (logger disabled)",
        AccessLogMiddleware(bare_app, logger=quiet),
    )


def test_audit_log_nothing_flagged(benchmark: Any, driver: Driver) -> None:
    app = AuditLogMiddleware(decided_app, sinks=[LoggerSink()])
    bench(benchmark, driver, "AuditLogMiddleware (nothing flagged) + 2 decisions", app)
