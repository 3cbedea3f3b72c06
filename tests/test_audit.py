"""AuditLogMiddleware and its sinks: one redacted decision record per refused or flagged request."""

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nexus_middleware import (
    AuditLogMiddleware,
    CallbackSink,
    ConfigurationError,
    LoggerSink,
    ManualClock,
    Principal,
    SinkPolicy,
    WebhookSink,
)
from nexus_middleware.context import get_context
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.layers import FakeLayer
from tests.support.servers import free_port, serve

SECRETS = ("s3cr3t-bearer-token", "qk_123456", "4111111111111111", "alice@example.com")


class Collected:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []
        self.arrived = asyncio.Event()

    async def __call__(self, record: Any) -> None:
        self.records.append(record)
        self.arrived.set()


async def wait_for(predicate: Any) -> None:
    deadline = time.monotonic() + 10.0
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def test_a_refused_request_yields_one_redacted_record(caplog: pytest.LogCaptureFixture) -> None:
    collected = Collected()
    callback_sink = CallbackSink(collected)
    principal = Principal(subject="alice@example.com", method="api_key", tenant="acme", key_id="k1")
    app: Any = FakeLayer(
        ok_app, layer="ratelimit", outcome="deny", status=429, rule="per-key", details={"remaining": 0}
    )
    app = FakeLayer(app, layer="auth", outcome="allow", principal=principal, details={"method": "api_key"})
    audited = AuditLogMiddleware(app, sinks=[LoggerSink(), callback_sink], clock=ManualClock())

    async def with_ids(scope: Scope, receive: Receive, send: Send) -> None:
        context = get_context(scope)
        context.request_id, context.trace_id = "req-1", "cd" * 16
        await audited(scope, receive, send)

    scope = make_scope(
        "/pay",
        method="POST",
        headers=[("authorization", "Bearer s3cr3t-bearer-token")],
        query_string=b"api_key=qk_123456&card=4111111111111111",
    )
    with caplog.at_level(logging.WARNING, logger="nexus_middleware.audit.records"):
        recorded = await run_asgi(with_ids, scope)
    assert recorded.status == 429
    await audited.aclose()  # flushes the queue
    [record] = collected.records
    assert record == {
        "time": "2023-11-14T22:13:20.000Z",
        "request_id": "req-1",
        "trace_id": "cd" * 16,
        "client": "203.0.113.7",
        "method": "POST",
        "route": None,
        "path": "/pay",
        "query": "api_key=[REDACTED]&card=[REDACTED]",
        "status": 429,
        "local_response": "ratelimit",
        "principal": {"subject": "[REDACTED]", "method": "api_key", "tenant": "acme", "key_id": "k1"},
        "flagged": ["ratelimit"],
        "decisions": [
            {
                "layer": "auth",
                "outcome": "allow",
                "rule": None,
                "reason": None,
                "details": {"method": "api_key"},
            },
            {
                "layer": "ratelimit",
                "outcome": "deny",
                "rule": "per-key",
                "reason": None,
                "details": {"remaining": 0},
            },
        ],
    }
    [line] = [r for r in caplog.records if r.name == "nexus_middleware.audit.records"]
    assert json.loads(line.getMessage()) == record
    for secret in SECRETS:
        assert secret not in caplog.text
        assert secret not in json.dumps(record)


@pytest.mark.parametrize(
    ("layer", "outcome", "status", "audited"),
    [
        ("auth", "deny", 401, True),
        ("rbac", "deny", 403, True),
        ("rbac", "shadow_deny", None, True),
        ("ratelimit", "degraded", None, True),
        ("ratelimit", "allow", None, False),
        ("ratelimit", "exempt", None, False),
        ("body_limit", "deny", 413, True),
        ("breaker", "reject", 503, True),
        ("breaker", "allow", None, False),
        ("concurrency", "shed", 503, True),
        ("concurrency", "queue_timeout", 503, True),
        ("timeout", "expired", 504, True),
        ("proxy", "error", None, True),
        ("proxy", "forwarded", None, False),
        ("cache", "hit", None, False),
    ],
)
async def test_which_requests_are_audited(
    layer: str, outcome: str, status: int | None, audited: bool
) -> None:
    collected = Collected()
    app = AuditLogMiddleware(
        FakeLayer(ok_app, layer=layer, outcome=outcome, status=status), sinks=[CallbackSink(collected)]
    )
    assert (await run_asgi(app, make_scope("/x"))).status == (status or 200)
    await app.aclose()
    assert len(collected.records) == int(audited)
    if audited:
        assert collected.records[0]["flagged"] == [layer]


async def test_a_local_response_without_a_decision_is_audited_and_lifespan_passes() -> None:
    collected = Collected()

    async def refuse(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).local_response = "security"
        await ok_app(scope, receive, send)

    app = AuditLogMiddleware(refuse, sinks=[CallbackSink(collected)])
    await run_asgi(app, make_scope("/"))
    lifespan = await run_asgi(app, make_scope(scope_type="lifespan"))
    await app.aclose()
    assert [r["local_response"] for r in collected.records] == ["security"]
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(("extensions", "status"), [({}, 403), ({"websocket.http.response": {}}, 401)])
async def test_websocket_handshake_refusals_are_audited(extensions: dict[str, Any], status: int) -> None:
    collected = Collected()
    inner = FakeLayer(ok_app, layer="auth", outcome="deny", reason="missing_credentials", status=401)
    app = AuditLogMiddleware(inner, sinks=[CallbackSink(collected)])
    await run_asgi(app, make_scope("/ws", scope_type="websocket", extensions=extensions))
    await app.aclose()
    [record] = collected.records
    assert (record["method"], record["status"]) == ("WEBSOCKET", status)
    assert record["decisions"][0]["reason"] == "missing_credentials"


async def test_an_exception_is_audited_as_500_and_propagates() -> None:
    collected = Collected()

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).record("proxy", "error", reason="connect", service="users")
        raise RuntimeError("kaput")

    app = AuditLogMiddleware(failing, sinks=[CallbackSink(collected)])
    with pytest.raises(RuntimeError, match="kaput"):
        await run_asgi(app, make_scope("/"))
    await app.aclose()
    assert collected.records[0]["status"] == 500


async def test_a_broken_sink_never_breaks_the_request(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def emit(self, record: Any) -> None:
            raise ValueError("sink exploded")

        async def aclose(self) -> None:
            return None

    collected = Collected()
    app = AuditLogMiddleware(
        FakeLayer(ok_app, layer="auth", outcome="deny", status=401), sinks=[Broken(), CallbackSink(collected)]
    )
    with caplog.at_level(logging.ERROR, logger="nexus_middleware.audit"):
        assert (await run_asgi(app, make_scope("/"))).status == 401
    await app.aclose()
    assert len(collected.records) == 1
    assert "sink exploded" in caplog.text


async def test_callback_sink_queue_is_bounded_and_failures_are_counted() -> None:
    release = asyncio.Event()
    delivered: list[Any] = []

    async def slow(record: Any) -> None:
        await release.wait()
        delivered.append(record)

    sink = CallbackSink(slow, policy=SinkPolicy(max_queue=3, batch_size=1, max_retries=0, close_timeout=5))
    for index in range(10):
        sink.emit({"n": index})
    await asyncio.sleep(0)  # the worker takes the first record
    assert sink.dropped == 7
    release.set()
    await sink.aclose()
    assert [r["n"] for r in delivered] == [0, 1, 2]
    assert sink.delivered == 3
    sink.emit({"n": 99})
    assert sink.dropped == 8

    async def failing(record: Any) -> None:
        raise RuntimeError("nope")

    broken = CallbackSink(failing)
    broken.emit({"n": 1})
    await broken.aclose()
    assert (broken.failed, broken.delivered) == (1, 0)


@contextlib.asynccontextmanager
async def webhook_receiver(status: int = 200) -> AsyncIterator[tuple[str, list[list[Any]]]]:
    batches: list[list[Any]] = []

    async def hook(request: Request) -> Response:
        batches.append((await request.json())["records"])
        return JSONResponse({}, status_code=status)

    async with serve(Starlette(routes=[Route("/hook", hook, methods=["POST"])])) as url:
        yield url + "/hook", batches


async def test_webhook_sink_batches_records_to_a_real_server() -> None:
    async with webhook_receiver() as (url, batches):
        sink = WebhookSink(
            url, policy=SinkPolicy(batch_size=3, flush_interval=0.05), headers={"x-token": "t"}
        )
        assert "WebhookSink" in repr(sink)
        app = AuditLogMiddleware(
            FakeLayer(ok_app, layer="ratelimit", outcome="deny", status=429), sinks=[sink]
        )
        for _ in range(5):
            await run_asgi(app, make_scope("/"))
        await wait_for(lambda: sum(map(len, batches)) == 5)
        await app.aclose()
    assert sorted(map(len, batches), reverse=True)[0] == 3
    assert all(record["status"] == 429 for batch in batches for record in batch)
    assert (sink.delivered, sink.failed, sink.dropped) == (5, 0, 0)


@pytest.mark.parametrize(("status", "attempts"), [(500, 4), (429, 4), (400, 1)])
async def test_webhook_retries_with_capped_backoff(status: int, attempts: int) -> None:
    waits: list[float] = []

    async def no_wait(seconds: float) -> None:
        waits.append(seconds)

    async with webhook_receiver(status) as (url, batches):
        policy = SinkPolicy(batch_size=10, flush_interval=0, max_retries=3, backoff=1.0, backoff_max=3.0)
        sink = WebhookSink(url, policy=policy, sleep=no_wait)
        sink.emit({"n": 1})
        await wait_for(lambda: sink.failed == 1)
        await sink.aclose()
    assert len(batches) == attempts
    assert waits == [1.0, 2.0, 3.0][: attempts - 1]


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[str]:
    """Accepts connections and never answers: the slowest possible sink."""
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/hook"
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def timed_requests(app: Any, count: int) -> list[float]:
    durations = []
    for _ in range(count):
        start = time.perf_counter()
        assert (await run_asgi(app, make_scope("/"))).status == 401
        durations.append(time.perf_counter() - start)
    return durations


@pytest.mark.parametrize("kind", ["dead port", "black hole"])
async def test_a_dead_or_slow_webhook_never_slows_requests(kind: str) -> None:
    inner = FakeLayer(ok_app, layer="auth", outcome="deny", reason="invalid_token", status=401)
    baseline = await timed_requests(AuditLogMiddleware(inner, sinks=[LoggerSink()]), 200)
    async with contextlib.AsyncExitStack() as stack:
        if kind == "dead port":
            url = f"http://127.0.0.1:{free_port()}/hook"
        else:
            url = await stack.enter_async_context(black_hole())
        policy = SinkPolicy(max_queue=20, batch_size=5, flush_interval=0.01, backoff=0.05, close_timeout=0.2)
        sink = WebhookSink(url, policy=policy, timeout=30.0)
        app = AuditLogMiddleware(inner, sinks=[sink])
        durations = await timed_requests(app, 200)
        started = time.perf_counter()
        await app.aclose()
        closing = time.perf_counter() - started
    assert sink.delivered == 0
    assert sink.dropped >= 200 - 20 - 5  # the queue is bounded: what does not fit is dropped and counted
    assert closing < 5
    # Requests cost the same as with a log-only sink: no request waited for the webhook.
    assert sorted(durations)[len(durations) // 2] < max(5 * sorted(baseline)[len(baseline) // 2], 0.002)
    assert max(durations) < 0.25


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="sinks"):
        AuditLogMiddleware(ok_app, sinks=[])
    with pytest.raises(ConfigurationError, match="not an audit sink"):
        AuditLogMiddleware(ok_app, sinks=[object()])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError, match="positive"):
        SinkPolicy(max_queue=0)
    with pytest.raises(ConfigurationError, match="negative"):
        SinkPolicy(backoff=-1)
    with pytest.raises(ConfigurationError, match="url"):
        WebhookSink("ftp://x")
    with pytest.raises(ConfigurationError, match="timeout"):
        WebhookSink("http://x", timeout=0)
    with pytest.raises(ConfigurationError, match="callable"):
        CallbackSink(None)  # type: ignore[arg-type]
    assert "CallbackSink" in repr(CallbackSink(Collected()))
    assert "LoggerSink" in repr(LoggerSink())
