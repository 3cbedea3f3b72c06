"""TracingMiddleware on the OpenTelemetry SDK's in-memory exporter, and the upstream propagation helper."""

import hashlib
import hmac
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry import baggage, propagate, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util._once import Once
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from nexus_middleware import ConfigurationError, Principal, TracingMiddleware, inject_trace_headers
from nexus_middleware.context import get_context
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.layers import FakeLayer

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.shutdown()


@pytest.fixture
def provider(exporter: InMemorySpanExporter) -> Iterator[TracerProvider]:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider
    provider.shutdown()


def server_span(exporter: InMemorySpanExporter) -> ReadableSpan:
    spans = exporter.get_finished_spans()
    assert len(spans) == 1, [span.name for span in spans]
    return spans[0]


def user_app() -> Starlette:
    async def user(request: Request) -> Response:
        context = get_context(request.scope)
        headers = inject_trace_headers([(b"traceparent", b"00-stale"), (b"accept", b"*/*")])
        return JSONResponse(
            {
                "trace_id": context.trace_id,
                "tracestate": request.headers.get("tracestate"),
                "upstream_headers": [[k.decode(), v.decode()] for k, v in headers],
            }
        )

    return Starlette(routes=[Route("/users/{user_id}", user)])


async def call(app: Any, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        return await client.get(path, headers=headers or {})


async def test_span_named_by_route_template_with_the_incoming_parent(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = user_app()
    app.add_middleware(TracingMiddleware, tracer_provider=provider)
    response = await call(app, "/users/42", {"traceparent": TRACEPARENT, "tracestate": "vendor=abc"})
    span = server_span(exporter)
    assert span.name == "GET /users/{user_id}"
    assert span.attributes is not None
    assert span.attributes["http.route"] == "/users/{user_id}"
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT_SPAN
    assert span.parent.is_remote
    body = response.json()
    assert body["trace_id"] == TRACE_ID
    assert body["tracestate"] == "vendor=abc"
    # The helper the proxy calls: the server span becomes the upstream's parent, the stale header is gone.
    upstream = dict(body["upstream_headers"])
    assert [k for k, _ in body["upstream_headers"]].count("traceparent") == 1
    assert upstream["traceparent"] == f"00-{TRACE_ID}-{format(span.context.span_id, '016x')}-01"
    assert upstream["tracestate"] == "vendor=abc"
    assert upstream["accept"] == "*/*"


@pytest.mark.parametrize(
    "traceparent",
    [
        "garbage",
        "00-zzzz-00f067aa0ba902b7-01",
        f"00-{'0' * 32}-{PARENT_SPAN}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT_SPAN}-01",
        f"00-{TRACE_ID}-{PARENT_SPAN}-01-extra",
        "x" * 10_000,
    ],
)
async def test_malformed_traceparent_starts_a_new_trace(
    provider: TracerProvider, exporter: InMemorySpanExporter, traceparent: str
) -> None:
    app = user_app()
    app.add_middleware(TracingMiddleware, tracer_provider=provider)
    response = await call(app, "/users/1", {"traceparent": traceparent})
    assert response.status_code == 200
    span = server_span(exporter)
    assert span.parent is None
    assert format(span.context.trace_id, "032x") != TRACE_ID
    assert response.json()["trace_id"] == format(span.context.trace_id, "032x")


def make_tracestate(length: int) -> str:
    """A valid W3C tracestate of exactly `length` characters (members of at most 64 characters)."""
    members: list[str] = []
    used = -1
    while used < length:
        index = len(members)
        room = length - used - 1  # the comma before this member
        size = min(64, room)
        if 0 < room - size < 8:  # leave room for one more valid member
            size = room - 8
        members.append(f"k{index:02d}=" + "a" * (size - 4))
        used += size + 1
    return ",".join(members)


@pytest.mark.parametrize(("length", "kept"), [(40, True), (512, True), (513, False), (5_000, False)])
async def test_oversized_tracestate_is_dropped(
    provider: TracerProvider, exporter: InMemorySpanExporter, length: int, kept: bool
) -> None:
    tracestate = make_tracestate(length)
    assert len(tracestate) == length
    app = user_app()
    app.add_middleware(TracingMiddleware, tracer_provider=provider)
    response = await call(app, "/users/1", {"traceparent": TRACEPARENT, "tracestate": tracestate})
    span = server_span(exporter)
    assert span.parent is not None
    assert format(span.context.trace_id, "032x") == TRACE_ID
    assert response.json()["tracestate"] == (tracestate if kept else None)
    assert bool(span.context.trace_state) is kept


async def test_decisions_and_hashed_principal_become_attributes(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    principal = Principal(subject="alice@example.com", method="jwt")
    app: Any = ok_app
    app = FakeLayer(
        app, layer="proxy", outcome="forwarded", details={"target": "10.0.0.1:8080", "retries": 2}
    )
    app = FakeLayer(app, layer="cache", outcome="miss")
    app = FakeLayer(app, layer="breaker", outcome="allow", details={"key": "users", "state": "closed"})
    app = FakeLayer(app, layer="ratelimit", outcome="allow", rule="per-user", details={"remaining": 9})
    app = FakeLayer(app, layer="auth", outcome="allow", principal=principal, details={"method": "jwt"})
    key = b"k" * 32
    traced = TracingMiddleware(app, tracer_provider=provider, record_principal=True, principal_hash_key=key)
    assert (await run_asgi(traced, make_scope("/anything"))).status == 200
    span = server_span(exporter)
    assert span.name == "GET"  # nothing routed: the method only, never the raw path
    attributes = dict(span.attributes or {})
    assert attributes["nexus.ratelimit.outcome"] == "allow"
    assert attributes["nexus.ratelimit.rule"] == "per-user"
    assert attributes["nexus.ratelimit.remaining"] == 9
    assert attributes["nexus.breaker.state"] == "closed"
    assert attributes["nexus.cache.outcome"] == "miss"
    assert attributes["nexus.proxy.target"] == "10.0.0.1:8080"
    assert attributes["nexus.proxy.retries"] == 2
    expected = hmac.new(key, b"alice@example.com", hashlib.sha256).hexdigest()
    assert attributes["nexus.principal.hash"] == expected
    assert "alice@example.com" not in repr(attributes)


async def test_principal_is_not_recorded_by_default_and_refusals_are_marked(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app: Any = FakeLayer(ok_app, layer="ratelimit", outcome="deny", rule="ip", status=429)
    app = FakeLayer(app, layer="auth", outcome="allow", principal=Principal(subject="bob", method="api_key"))
    app = FakeLayer(app, layer="request_id", outcome="generated")
    traced = TracingMiddleware(app, tracer_provider=provider)

    async def with_request_id(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).request_id = "req-1"
        await traced(scope, receive, send)

    assert (await run_asgi(with_request_id, make_scope("/"))).status == 429
    attributes = dict(server_span(exporter).attributes or {})
    assert "nexus.principal.hash" not in attributes
    assert attributes["nexus.local_response"] == "ratelimit"
    assert attributes["nexus.ratelimit.outcome"] == "deny"
    assert attributes["nexus.request_id"] == "req-1"
    assert attributes["http.status_code"] == 429


async def test_unkeyed_principal_hash_is_plain_sha256(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    app = FakeLayer(ok_app, layer="auth", outcome="allow", principal=Principal(subject="carol", method="jwt"))
    await run_asgi(TracingMiddleware(app, tracer_provider=provider, record_principal=True), make_scope("/"))
    attributes = dict(server_span(exporter).attributes or {})
    assert attributes["nexus.principal.hash"] == hashlib.sha256(b"carol").hexdigest()


async def test_exceptions_mark_the_span_and_propagate(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("kaput")

    with pytest.raises(RuntimeError, match="kaput"):
        await run_asgi(TracingMiddleware(failing, tracer_provider=provider), make_scope("/"))
    span = server_span(exporter)
    assert span.status.status_code is StatusCode.ERROR


async def test_websocket_spans_and_lifespan_pass_through(
    provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    traced = TracingMiddleware(ok_app, tracer_provider=provider)
    recorded = await run_asgi(traced, make_scope("/ws", scope_type="websocket"))
    assert recorded.messages[0]["type"] == "websocket.accept"
    assert server_span(exporter).name == "WEBSOCKET"
    lifespan = await run_asgi(traced, make_scope(scope_type="lifespan"))
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert len(exporter.get_finished_spans()) == 1


async def test_excluded_urls_are_not_traced(provider: TracerProvider, exporter: InMemorySpanExporter) -> None:
    traced = TracingMiddleware(ok_app, tracer_provider=provider, excluded_urls="/healthz")
    assert (await run_asgi(traced, make_scope("/healthz"))).status == 200
    assert exporter.get_finished_spans() == ()


async def test_without_an_sdk_it_is_a_no_op_that_still_propagates() -> None:
    seen: list[tuple[str | None, list[tuple[bytes, bytes]]]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((get_context(scope).trace_id, inject_trace_headers([(b"accept", b"*/*")])))
        await ok_app(scope, receive, send)

    traced = TracingMiddleware(app)
    assert (await run_asgi(traced, make_scope("/"))).status == 200
    incoming = [("traceparent", TRACEPARENT), ("tracestate", "vendor=abc")]
    assert (await run_asgi(traced, make_scope("/", headers=incoming))).status == 200
    assert seen[0] == (None, [(b"accept", b"*/*")])
    # No span of its own: the upstream continues the caller's trace under the caller's span.
    assert seen[1] == (
        TRACE_ID,
        [(b"accept", b"*/*"), (b"traceparent", TRACEPARENT.encode()), (b"tracestate", b"vendor=abc")],
    )


def test_inject_outside_a_span_leaves_headers_unchanged() -> None:
    headers = [(b"traceparent", b"00-keep"), (b"accept", b"*/*")]
    assert inject_trace_headers(headers) == headers


def test_configuration_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="max_tracestate_length"):
        TracingMiddleware(ok_app, max_tracestate_length=0)


class _TraceContext(TraceContextTextMapPropagator):
    """Reads what the W3C propagator reads, but is not a type the no-SDK fast path knows."""


class _Baggage(W3CBaggagePropagator):
    pass


@pytest.fixture
def global_textmap() -> Iterator[Any]:
    previous = propagate.get_global_textmap()
    yield propagate.set_global_textmap
    propagate.set_global_textmap(previous)


async def _propagated(headers: list[tuple[str, str]]) -> tuple[str | None, list[tuple[bytes, bytes]], Any]:
    seen: list[tuple[str | None, list[tuple[bytes, bytes]], Any]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        injected = inject_trace_headers([(b"accept", b"*/*")])
        seen.append((get_context(scope).trace_id, injected, dict(baggage.get_all())))
        await ok_app(scope, receive, send)

    assert (await run_asgi(TracingMiddleware(app), make_scope("/", headers=headers))).status == 200
    return seen[0]


@pytest.mark.parametrize(
    "headers",
    [
        [],
        [("traceparent", TRACEPARENT)],
        [("traceparent", TRACEPARENT), ("tracestate", "a=1"), ("tracestate", "b=2")],
        [("traceparent", TRACEPARENT), ("tracestate", "v=" + "x" * 600)],
        [("traceparent", TRACEPARENT), ("baggage", "tenant=acme,plan=gold")],
        [("baggage", "tenant=acme")],
        [("traceparent", "00-zz-00-01"), ("tracestate", "a=1")],
        [("accept", "*/*"), ("traceparent", TRACEPARENT), ("user-agent", "x")],
    ],
)
@pytest.mark.parametrize(
    "propagators",
    [
        [TraceContextTextMapPropagator(), W3CBaggagePropagator()],  # the default
        [W3CBaggagePropagator(), TraceContextTextMapPropagator()],
        [TraceContextTextMapPropagator()],
        [],
    ],
)
async def test_no_sdk_fast_path_extracts_what_the_propagator_would(
    global_textmap: Any, headers: list[tuple[str, str]], propagators: list[Any]
) -> None:
    # Known propagators get only their header fields, collected in one pass; unknown ones the whole scope.
    global_textmap(CompositePropagator(propagators))
    fast = await _propagated(headers)
    global_textmap(CompositePropagator([_twin(p) for p in propagators]))
    assert fast == await _propagated(headers)


def _twin(propagator: Any) -> Any:
    return _TraceContext() if isinstance(propagator, TraceContextTextMapPropagator) else _Baggage()


async def test_a_global_sdk_installed_before_the_first_request_is_used(
    monkeypatch: pytest.MonkeyPatch, provider: TracerProvider, exporter: InMemorySpanExporter
) -> None:
    traced = TracingMiddleware(ok_app)
    # Installed after the middleware is built (as an app's startup does), before it serves a request; what
    # `trace.set_tracer_provider` does, undone after the test (the real one can be called once per process).
    installed = Once()
    installed.do_once(lambda: None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", installed)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", provider)
    assert (await run_asgi(traced, make_scope("/", headers=[("traceparent", TRACEPARENT)]))).status == 200
    span = server_span(exporter)
    assert span.context is not None and format(span.context.trace_id, "032x") == TRACE_ID
