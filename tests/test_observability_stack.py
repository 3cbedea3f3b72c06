"""The observability layers together: real uvicorn, FastAPI, two worker processes, and no optional extras."""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from nexus_middleware import (
    AccessLogMiddleware,
    AuditLogMiddleware,
    CallbackSink,
    MetricsApp,
    MetricsMiddleware,
    TracingMiddleware,
)
from tests.support.layers import FakeLayer, path_is
from tests.support.servers import free_port, serve

ROOT = Path(__file__).resolve().parent.parent
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def parse(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


@pytest.mark.e2e
async def test_full_stack_through_real_uvicorn(caplog: pytest.LogCaptureFixture) -> None:
    registry = CollectorRegistry()
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    records: list[Any] = []

    async def collect(record: Any) -> None:
        records.append(record)

    audit_sink = CallbackSink(collect)
    api = FastAPI()

    @api.get("/orders/{order_id}")
    async def order(order_id: int) -> dict[str, int]:
        return {"order": order_id}

    api.add_route("/metrics", MetricsApp(registry=registry))  # type: ignore[arg-type]
    # Added innermost first: the limiter sits inside the observers; tracing, then metrics, outermost.
    api.add_middleware(
        FakeLayer, layer="ratelimit", outcome="deny", status=429, rule="per-ip", applies=path_is("/orders/7")
    )
    api.add_middleware(AuditLogMiddleware, sinks=[audit_sink])
    api.add_middleware(AccessLogMiddleware)
    api.add_middleware(MetricsMiddleware, registry=registry, routes=["/orders/{id}"], exemplars=True)
    api.add_middleware(TracingMiddleware, tracer_provider=provider, excluded_urls="/metrics")

    with caplog.at_level(logging.INFO, logger="nexus_middleware.access_log"):
        async with serve(api) as url, httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/orders/1", headers={"traceparent": TRACEPARENT})).json() == {
                "order": 1
            }
            assert (await client.get("/orders/2")).status_code == 200
            refused = await client.get("/orders/7", headers={"authorization": "Bearer top-secret-token"})
            assert refused.status_code == 429
            assert refused.headers["content-type"] == "application/problem+json"
            scrape = await client.get(
                "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
            )
    await audit_sink.aclose()
    provider.shutdown()

    found = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in parse_openmetrics(scrape.text)
        for sample in family.samples
    }
    assert (
        found[
            (
                "nexus_http_requests_total",
                (("method", "GET"), ("route", "/orders/{order_id}"), ("status_class", "2xx")),
            )
        ]
        == 2
    )
    assert (
        found[
            (
                "nexus_http_requests_total",
                (("method", "GET"), ("route", "/orders/{id}"), ("status_class", "4xx")),
            )
        ]
        == 1
    )
    assert found[("nexus_ratelimit_decisions_total", (("outcome", "deny"), ("policy", "per-ip")))] == 1
    spans = {span.name: span for span in exporter.get_finished_spans()}
    # Exemplars link the latest observation of each series to its trace.
    exemplars = set(re.findall(r'# \{trace_id="([0-9a-f]{32})"\}', scrape.text))
    assert exemplars
    assert exemplars <= {format(span.context.trace_id, "032x") for span in exporter.get_finished_spans()}
    assert set(spans) == {"GET /orders/{order_id}", "GET"}
    traced = [
        s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == TRACEPARENT[3:35]
    ]
    assert len(traced) == 1

    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "nexus_middleware.access_log"]
    lines = [line for line in lines if line["path"].startswith("/orders/")]
    assert [(line["route"], line["status"]) for line in lines] == [
        ("/orders/{order_id}", 200),
        ("/orders/{order_id}", 200),
        (None, 429),
    ]
    assert lines[0]["trace_id"] == TRACEPARENT[3:35]
    assert lines[0]["client"] == "127.0.0.1"
    assert "top-secret-token" not in caplog.text

    [record] = records
    assert record["status"] == 429
    assert record["flagged"] == ["ratelimit"]
    assert record["trace_id"] == lines[2]["trace_id"]
    assert record["trace_id"] is not None


WORKER = textwrap.dedent(
    """
    import os
    import sys

    import uvicorn
    from prometheus_client import CollectorRegistry
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from nexus_middleware import MetricsApp, MetricsMiddleware


    async def work(request):
        return PlainTextResponse(str(os.getpid()))


    # The setup code, not the library, reads the environment.
    multiprocess_dir = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    app = Starlette(
        routes=[Route("/work/{n}", work), Route("/metrics", MetricsApp(multiprocess_dir=multiprocess_dir))]
    )
    app.add_middleware(MetricsMiddleware, registry=CollectorRegistry())
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
    """
)


async def wait_until_up(client: httpx.AsyncClient, url: str, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            await client.get(url + "/work/0")
            return
        except httpx.TransportError:
            if process.returncode is not None or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


WORK = ("nexus_http_requests_total", (("method", "GET"), ("route", "/work/{n}"), ("status_class", "2xx")))
UNMATCHED = (
    "nexus_http_requests_total",
    (("method", "GET"), ("route", "unmatched"), ("status_class", "4xx")),
)
IN_FLIGHT = ("nexus_http_requests_in_flight", (("method", "GET"),))


async def scrape_when_settled(
    client: httpx.AsyncClient, url: str, *, work: int, unmatched: int
) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    # MetricsMiddleware counts a request in its `finally`, after the response went out: the client can hold
    # a worker's response before that worker has written its count, so one scrape from the other worker may
    # not see it yet. Scrape until every count has arrived (counters only grow; the caller then asserts the
    # exact values), or the deadline passes and the caller's assertions report the last scrape.
    deadline = time.monotonic() + 30
    while True:
        found = parse((await client.get(url + "/metrics")).text)
        settled = (
            found.get(WORK, 0) >= work
            and found.get(UNMATCHED, 0) >= unmatched
            and found.get(IN_FLIGHT, 0) <= 1  # only the scrape itself
        )
        if settled or time.monotonic() > deadline:
            return found
        await asyncio.sleep(0.05)  # a poll interval, not a synchronization


@pytest.mark.e2e
async def test_multiprocess_mode_aggregates_two_worker_processes(tmp_path: Path) -> None:
    multiprocess_dir = tmp_path / "prometheus"
    multiprocess_dir.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(multiprocess_dir), "PYTHONPATH": str(ROOT)}
    ports = [free_port(), free_port()]
    workers = [
        await asyncio.create_subprocess_exec(sys.executable, str(script), str(port), env=env, cwd=ROOT)
        for port in ports
    ]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        async with httpx.AsyncClient(timeout=30) as client:
            for url, worker in zip(urls, workers, strict=True):
                await wait_until_up(client, url, worker)
            pids = set()
            for _ in range(3):
                pids.add((await client.get(urls[0] + "/work/1")).text)
            for _ in range(5):
                pids.add((await client.get(urls[1] + "/work/2")).text)
            assert (await client.get(urls[1] + "/nope")).status_code == 404
            # Each worker also answered one readiness probe on /work/0.
            found = await scrape_when_settled(client, urls[0], work=3 + 5 + 2, unmatched=1)
    finally:
        for worker in workers:
            worker.terminate()
        for worker in workers:
            await asyncio.wait_for(worker.wait(), timeout=30)
    assert pids == {str(worker.pid) for worker in workers}
    assert found[WORK] == 3 + 5 + 2
    assert found[UNMATCHED] == 1
    assert found[IN_FLIGHT] == 1  # the scrape itself
    assert len(list(multiprocess_dir.glob("*.db"))) >= 2


def test_import_without_the_optional_extras() -> None:
    code = textwrap.dedent(
        """
        import sys
        for name in ("prometheus_client", "opentelemetry"):
            sys.modules[name] = None  # as if the extras were not installed
        import nexus_middleware
        from nexus_middleware import (
            AccessLogMiddleware, AuditLogMiddleware, ConfigurationError, LoggerSink, MetricsApp,
            MetricsMiddleware, TracingMiddleware, inject_trace_headers,
        )

        async def app(scope, receive, send):
            pass

        AccessLogMiddleware(app)
        AuditLogMiddleware(app, sinks=[LoggerSink()])
        for factory in (lambda: MetricsMiddleware(app), lambda: MetricsApp(), lambda: TracingMiddleware(app)):
            try:
                factory()
            except ConfigurationError as exc:
                print("refused:", exc)
        print(inject_trace_headers([(b"traceparent", b"keep")]))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[:3] == [
        "refused: metrics need prometheus-client: pip install 'nexus-middleware[prometheus]'",
        "refused: metrics need prometheus-client: pip install 'nexus-middleware[prometheus]'",
        "refused: tracing needs OpenTelemetry: pip install 'nexus-middleware[otel]'",
    ]
    assert lines[3] == "[(b'traceparent', b'keep')]"
