"""MetricsMiddleware and MetricsApp: exact values from the exposition, bounded labels, suite metrics."""

import itertools
import json
import random
import re
import string
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from nexus_middleware import (
    ClientAddressResolver,
    ConfigurationError,
    MetricsApp,
    MetricsMiddleware,
    register_gauge_source,
)
from nexus_middleware.context import get_context
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.layers import FakeLayer, path_is

RL = "nexus_ratelimit_decisions_total"
AUTH = "nexus_auth_failures_total"
BREAKER = "nexus_breaker_rejections_total"
SHED = "nexus_concurrency_rejections_total"
RETRIES = "nexus_upstream_retries_total"
ERRORS = "nexus_upstream_errors_total"
DECISIONS = "nexus_decisions_total"
BEHIND_LB = ClientAddressResolver(trusted_proxies=["192.168.0.0/16"])

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def stepping_clock(step: float) -> Any:
    ticks = itertools.count(0.0, step)
    return lambda: next(ticks)


async def boom(request: Request) -> Response:
    raise RuntimeError("boom")


def starlette_app() -> Starlette:
    async def user(request: Request) -> Response:
        return PlainTextResponse("user " + request.path_params["user_id"])

    async def upload(request: Request) -> Response:
        body = await request.body()
        return PlainTextResponse(str(len(body)))

    return Starlette(
        routes=[
            Route("/users/{user_id}", user),
            Route("/upload", upload, methods=["POST"]),
            Route("/boom", boom),
        ]
    )


async def test_exact_values_after_a_scripted_sequence() -> None:
    registry = CollectorRegistry()
    app = starlette_app()
    # An inner limiter refuses /users/3 before routing: the configured pattern still names the route.
    app.add_middleware(
        FakeLayer, layer="ratelimit", outcome="deny", status=429, rule="per-user", applies=path_is("/users/3")
    )
    app.add_middleware(
        MetricsMiddleware, registry=registry, routes=["/users/{id}"], clock=stepping_clock(0.03)
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        assert (await client.get("/users/1")).status_code == 200
        assert (await client.get("/users/22")).status_code == 200
        assert (await client.get("/users/3")).status_code == 429
        assert (await client.post("/upload", content=b"x" * 300)).status_code == 200
        assert (await client.get("/nowhere/123")).status_code == 404
        assert (await client.get("/boom")).status_code == 500

    found = samples(registry)
    requests = "nexus_http_requests_total"
    assert value(found, requests, method="GET", route="/users/{user_id}", status_class="2xx") == 2
    assert value(found, requests, method="GET", route="/users/{id}", status_class="4xx") == 1
    assert value(found, requests, method="POST", route="/upload", status_class="2xx") == 1
    assert value(found, requests, method="GET", route="unmatched", status_class="4xx") == 1
    assert value(found, requests, method="GET", route="/boom", status_class="5xx") == 1
    assert sum(v for (name, _), v in found.items() if name == requests) == 6

    duration = "nexus_http_request_duration_seconds"
    labels = {"method": "GET", "route": "/users/{user_id}", "status_class": "2xx"}
    assert value(found, duration + "_count", **labels) == 2
    assert value(found, duration + "_sum", **labels) == pytest.approx(0.06)
    assert value(found, duration + "_bucket", le="0.025", **labels) == 0
    assert value(found, duration + "_bucket", le="0.05", **labels) == 2

    assert value(found, "nexus_http_request_size_bytes_sum", method="POST", route="/upload") == 300
    assert value(found, "nexus_http_response_size_bytes_sum", method="POST", route="/upload") == 3
    assert value(found, "nexus_http_response_size_bytes_sum", method="GET", route="/users/{user_id}") == len(
        b"user 1user 22"
    )
    assert value(found, "nexus_http_requests_in_flight", method="GET") == 0
    assert value(found, "nexus_ratelimit_decisions_total", policy="per-user", outcome="deny") == 1
    assert value(found, "nexus_decisions_total", layer="ratelimit", outcome="deny") == 1


async def test_wrapping_counts_into_the_same_series_around_another_app() -> None:
    registry = CollectorRegistry()
    first = MetricsMiddleware(ok_app, registry=registry, routes=["/a"])
    await run_asgi(first, make_scope("/a"))
    second = first.wrapping(ok_app)  # a rebuilt stack: no second registration, no reset
    await run_asgi(second, make_scope("/a"))
    assert second.app is ok_app and second.registry is registry
    assert (
        value(samples(registry), "nexus_http_requests_total", method="GET", route="/a", status_class="2xx")
        == 2
    )


async def test_cardinality_stays_bounded_under_random_paths() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(ok_app, registry=registry, routes=["/api/items/{id}"])
    rng = random.Random(7)
    for index in range(10_000):
        segment = "".join(rng.choices(string.ascii_letters + string.digits, k=12))
        path = f"/api/items/{segment}" if index % 2 else f"/{segment}/{index}"
        method = "GET" if index % 3 else rng.choice(["BREW", "PROPFIND", "X" + segment])
        await run_asgi(app, make_scope(path, method=method))
    found = samples(registry)
    series = {labels for (name, labels) in found if name == "nexus_http_requests_total"}
    assert len(series) <= 4
    routes = {dict(labels)["route"] for labels in series}
    assert routes == {"/api/items/{id}", "unmatched"}
    assert {dict(labels)["method"] for labels in series} == {"GET", "OTHER"}
    assert sum(v for (name, _), v in found.items() if name == "nexus_http_requests_total") == 10_000
    assert len(found) < 200


async def test_in_flight_gauge_counts_a_running_request() -> None:
    registry = CollectorRegistry()
    seen: list[float] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(value(samples(registry), "nexus_http_requests_in_flight", method="PUT"))
        await ok_app(scope, receive, send)

    await run_asgi(MetricsMiddleware(app, registry=registry), make_scope("/", method="PUT"))
    assert seen == [1.0]
    assert value(samples(registry), "nexus_http_requests_in_flight", method="PUT") == 0


@pytest.mark.parametrize(
    ("layer", "outcome", "rule", "reason", "details", "status", "metric", "labels"),
    [
        ("ratelimit", "deny", "org", None, {}, 429, RL, {"policy": "org", "outcome": "deny"}),
        ("ratelimit", "shadow_deny", "org", None, {}, None, RL, {"policy": "org", "outcome": "shadow_deny"}),
        ("ratelimit", "degraded", "ip", None, {}, None, RL, {"policy": "ip", "outcome": "degraded"}),
        ("ratelimit", "allow", "ip", None, {"remaining": 3}, None, RL, {"policy": "ip", "outcome": "allow"}),
        ("auth", "deny", None, "expired", {}, 401, AUTH, {"layer": "auth", "reason": "expired"}),
        ("rbac", "deny", "admins-only", None, {}, 403, AUTH, {"layer": "rbac", "reason": "admins-only"}),
        ("breaker", "reject", None, None, {"key": "p", "state": "open"}, 503, BREAKER, {"key": "p"}),
        ("concurrency", "shed", None, None, {"key": "s"}, 503, SHED, {"key": "s", "outcome": "shed"}),
        ("concurrency", "queue_timeout", None, None, {"key": "s"}, 503, SHED,
         {"key": "s", "outcome": "queue_timeout"}),
        ("proxy", "forwarded", None, None, {"service": "u", "target": "a", "retries": 2}, None, RETRIES,
         {"service": "u", "target": "a"}),
        ("proxy", "error", None, "connect", {"service": "u", "target": "b"}, 502, ERRORS,
         {"service": "u", "target": "b"}),
        ("body_limit", "deny", None, "too_large", {}, 413, DECISIONS,
         {"layer": "body_limit", "outcome": "deny"}),
        ("cache", "hit", None, None, {}, None, DECISIONS, {"layer": "cache", "outcome": "hit"}),
    ],
)  # fmt: skip
async def test_suite_metrics_from_decisions(
    layer: str,
    outcome: str,
    rule: str | None,
    reason: str | None,
    details: dict[str, Any],
    status: int | None,
    metric: str,
    labels: dict[str, str],
) -> None:
    registry = CollectorRegistry()
    inner = FakeLayer(
        ok_app, layer=layer, outcome=outcome, rule=rule, reason=reason, details=details, status=status
    )
    app = MetricsMiddleware(inner, registry=registry)
    recorded = await run_asgi(app, make_scope("/x"))
    assert recorded.status == (status or 200)
    found = samples(registry)
    expected = details.get("retries", 1)
    assert value(found, metric, **labels) == expected
    status_class = f"{(status or 200) // 100}xx"
    assert (
        value(found, "nexus_http_requests_total", method="GET", route="unmatched", status_class=status_class)
        == 1
    )


async def test_proxy_decision_counts_upstream_requests_and_latency() -> None:
    registry = CollectorRegistry()
    details = {"service": "u", "target": "a:80", "retries": 0, "upstream_status": 200, "duration": 0.2}
    app = MetricsMiddleware(
        FakeLayer(ok_app, layer="proxy", outcome="forwarded", details=details), registry=registry
    )
    for _ in range(3):
        await run_asgi(app, make_scope("/"))
    found = samples(registry)
    labels = {"service": "u", "target": "a:80"}
    assert value(found, "nexus_upstream_requests_total", outcome="forwarded", **labels) == 3
    assert value(found, "nexus_upstream_retries_total", **labels) == 0
    assert value(found, "nexus_upstream_duration_seconds_sum", **labels) == pytest.approx(0.6)


async def test_exception_before_the_response_counts_500_and_propagates() -> None:
    registry = CollectorRegistry()

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("kaput")

    with pytest.raises(RuntimeError, match="kaput"):
        await run_asgi(MetricsMiddleware(failing, registry=registry), make_scope("/"))
    found = samples(registry)
    assert value(found, "nexus_http_requests_total", method="GET", route="unmatched", status_class="5xx") == 1
    assert value(found, "nexus_http_requests_in_flight", method="GET") == 0


async def test_websocket_handshakes_are_counted_and_lifespan_passes_through() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(ok_app, registry=registry)
    accepted = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert accepted.messages[0]["type"] == "websocket.accept"
    refused = MetricsMiddleware(
        FakeLayer(ok_app, layer="auth", outcome="deny", reason="missing_credentials", status=401),
        registry=CollectorRegistry(),
    )
    denied = await run_asgi(refused, make_scope("/ws", scope_type="websocket"))
    assert denied.messages[0]["type"] == "websocket.close"
    denied_http = await run_asgi(
        refused, make_scope("/ws", scope_type="websocket", extensions={"websocket.http.response": {}})
    )
    assert denied_http.messages[0]["status"] == 401
    lifespan = await run_asgi(app, make_scope(scope_type="lifespan"))
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]

    assert (
        value(samples(registry), "nexus_websocket_connections_total", route="unmatched", outcome="accepted")
        == 1
    )
    found = samples(refused.registry)
    assert value(found, "nexus_websocket_connections_total", route="unmatched", outcome="denied") == 1
    assert value(found, "nexus_websocket_connections_total", route="unmatched", outcome="denied_4xx") == 1
    assert value(found, "nexus_auth_failures_total", layer="auth", reason="missing_credentials") == 2


async def test_fastapi_route_templates_label_the_requests() -> None:
    registry = CollectorRegistry()
    api = FastAPI()

    @api.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    api.add_middleware(MetricsMiddleware, registry=registry)
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for item_id in range(5):
            assert (await client.get(f"/items/{item_id}")).json() == {"id": item_id}
        assert (await client.get("/items/not-a-number")).status_code == 422
    found = samples(registry)
    assert (
        value(found, "nexus_http_requests_total", method="GET", route="/items/{item_id}", status_class="2xx")
        == 5
    )
    assert (
        value(found, "nexus_http_requests_total", method="GET", route="/items/{item_id}", status_class="4xx")
        == 1
    )


async def test_exemplars_carry_the_trace_id_in_openmetrics() -> None:
    registry = CollectorRegistry()

    async def traced(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        await ok_app(scope, receive, send)

    await run_asgi(MetricsMiddleware(traced, registry=registry, exemplars=True), make_scope("/"))
    scrape = await run_asgi(
        MetricsApp(registry=registry, allow=["*"]),
        make_scope("/metrics", headers=[("accept", "application/openmetrics-text; version=1.0.0")]),
    )
    assert scrape.header(
        "content-type",
    ).startswith("application/openmetrics-text")
    text = scrape.body.decode()
    assert '# {trace_id="4bf92f3577b34da6a3ce929d0e0e4736"} 1.0' in text
    plain = await run_asgi(MetricsApp(registry=registry, allow=["*"]), make_scope("/metrics"))
    assert "trace_id" not in plain.body.decode()
    assert "nexus_http_requests_total" in plain.body.decode()


@pytest.mark.parametrize(
    ("allow", "client", "forwarded", "resolver", "status"),
    [
        (("127.0.0.1/32", "::1/128"), ("127.0.0.1", 1), None, None, 200),
        (("127.0.0.1/32", "::1/128"), ("::1", 1), None, None, 200),
        (("127.0.0.1/32", "::1/128"), ("203.0.113.7", 1), None, None, 403),
        (("10.0.0.0/8",), ("10.1.2.3", 1), None, None, 200),
        # Spoofed X-Forwarded-For from an untrusted peer is ignored.
        (("10.0.0.0/8",), ("203.0.113.7", 1), "10.0.0.5", None, 403),
        # Behind a trusted proxy, the forwarded client is checked.
        (("10.0.0.0/8",), ("192.168.0.1", 1), "10.0.0.5", BEHIND_LB, 200),
        (("10.0.0.0/8",), ("192.168.0.1", 1), "203.0.113.9", BEHIND_LB, 403),
        (("*",), ("203.0.113.7", 1), None, None, 200),
        (("127.0.0.1",), None, None, None, 403),
    ],
)  # fmt: skip
async def test_metrics_app_allowlist_uses_the_resolver(
    allow: tuple[str, ...],
    client: tuple[str, int] | None,
    forwarded: str | None,
    resolver: ClientAddressResolver | None,
    status: int,
) -> None:
    registry = CollectorRegistry()
    headers = [("x-forwarded-for", forwarded)] if forwarded else []
    app = MetricsApp(registry=registry, allow=allow, client_resolver=resolver)
    recorded = await run_asgi(app, make_scope("/metrics", headers=headers, client=client))
    assert recorded.status == status
    if status == 403:
        assert recorded.header("content-type") == "application/problem+json"


async def test_metrics_app_methods_scopes_and_gauge_sources() -> None:
    registry = CollectorRegistry()
    states = {"payments": 2.0, "search": 0.0}
    collector = register_gauge_source(
        registry, "nexus_breaker_state", lambda: states, labels=["key"], documentation="0 closed, 2 open"
    )
    register_gauge_source(registry, "nexus_cache_entries", lambda: 12)
    register_gauge_source(
        registry,
        "nexus_breaker_transitions",
        lambda: {("payments", "open"): 3},
        labels=["key", "to"],
        kind="counter",
    )
    app = MetricsApp(registry=registry, allow=["*"])
    found = samples(registry)
    assert value(found, "nexus_breaker_state", key="payments") == 2
    assert value(found, "nexus_cache_entries") == 12
    assert value(found, "nexus_breaker_transitions_total", key="payments", to="open") == 3
    states["search"] = 1.0
    body = (await run_asgi(app, make_scope("/metrics"))).body.decode()
    assert 'nexus_breaker_state{key="search"} 1.0' in body
    registry.unregister(collector)
    assert "nexus_breaker_state" not in (await run_asgi(app, make_scope("/metrics"))).body.decode()

    head = await run_asgi(app, make_scope("/metrics", method="HEAD"))
    assert head.status == 200
    assert head.body == b""
    post = await run_asgi(app, make_scope("/metrics", method="POST"))
    assert post.status == 405
    assert post.header("allow") == "GET, HEAD"
    websocket = await run_asgi(app, make_scope("/metrics", scope_type="websocket"))
    assert websocket.messages[0]["type"] == "websocket.close"
    lifespan = await run_asgi(app, make_scope(scope_type="lifespan"))
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda: MetricsMiddleware(ok_app, registry=CollectorRegistry(), namespace="bad-name"), "namespace"),
        (lambda: MetricsMiddleware(ok_app, registry=CollectorRegistry(), buckets=()), "buckets"),
        (lambda: MetricsMiddleware(ok_app, registry=CollectorRegistry(), routes=["no-slash"]), "must start"),
        (lambda: MetricsApp(allow=["not-an-ip"]), "allow"),
        (lambda: MetricsApp(multiprocess_dir=""), "multiprocess_dir"),
        (lambda: register_gauge_source(CollectorRegistry(), "x", lambda: 1, kind="summary"), "kind"),
        (lambda: register_gauge_source(CollectorRegistry(), "x", 3), "callable"),  # type: ignore[arg-type]
    ],
)
def test_configuration_errors(factory: Any, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        factory()


def test_two_middlewares_on_one_registry_explain_the_clash() -> None:
    registry = CollectorRegistry()
    MetricsMiddleware(ok_app, registry=registry)
    with pytest.raises(ConfigurationError, match="own registry or namespace"):
        MetricsMiddleware(ok_app, registry=registry)
    other = MetricsMiddleware(ok_app, registry=registry, namespace="edge")
    assert other.registry is registry


def test_grafana_dashboard_uses_real_metric_names() -> None:
    registry = CollectorRegistry()
    MetricsMiddleware(ok_app, registry=registry)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    produced = {family.name + suffix for family in registry.collect() for suffix in suffixes[family.type]}
    produced |= {
        "nexus_breaker_state",
        "nexus_upstream_target_healthy",
    }  # documented gauge source conventions
    dashboard = json.loads((Path(__file__).parent.parent / "docs" / "grafana-dashboard.json").read_text())
    expressions = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in expressions for name in re.findall(r"\bnexus_[a-z_]+", expr)}
    assert used <= produced, used - produced
    assert {"nexus_http_requests_total", "nexus_ratelimit_decisions_total", "nexus_breaker_state"} <= used


async def test_an_unnormalizable_path_is_unmatched() -> None:
    registry = CollectorRegistry()
    app = MetricsMiddleware(ok_app, registry=registry, routes=["/files/{name}"])
    await run_asgi(app, make_scope("/files/x", raw_path=b"/files/a%00b"))
    found = samples(registry)
    assert value(found, "nexus_http_requests_total", method="GET", route="unmatched", status_class="2xx") == 1


async def test_multiprocess_exposition_adds_the_gauge_sources_registry(tmp_path: Path) -> None:
    # An empty worker directory: only the per-scrape collectors of the given registry show up.
    sources = CollectorRegistry()
    register_gauge_source(
        sources, "nexus_upstream_target_healthy", lambda: {("users", "a:80"): 1}, labels=["service", "target"]
    )
    app = MetricsApp(registry=sources, multiprocess_dir=str(tmp_path), allow=["*"])
    scrape = await run_asgi(app, make_scope("/metrics"))
    assert scrape.status == 200
    assert 'nexus_upstream_target_healthy{service="users",target="a:80"} 1.0' in scrape.body.decode()


@pytest.mark.parametrize(
    ("status", "status_class"),
    [
        (None, "0xx"),
        (99, "0xx"),
        (100, "1xx"),
        (204, "2xx"),
        (399, "3xx"),
        (404, "4xx"),
        (599, "5xx"),
        (600, "0xx"),
    ],
)
async def test_status_classes_and_cached_children(status: int | None, status_class: str) -> None:
    async def answering(scope: Scope, receive: Receive, send: Send) -> None:
        if status is not None:  # None: the app returns without starting a response
            await send({"type": "http.response.start", "status": status, "headers": []})
            await send({"type": "http.response.body", "body": b"abc"})

    registry = CollectorRegistry()
    app = MetricsMiddleware(answering, registry=registry, routes=["/items/{id}"])
    for path, method in [("/items/1", "GET"), ("/items/2", "GET"), ("/items/3", "PURGE"), ("/other", "GET")]:
        await run_asgi(app, make_scope(path, method=method))
    found = samples(registry)
    labels = {"route": "/items/{id}", "status_class": status_class}
    assert value(found, "nexus_http_requests_total", method="GET", **labels) == 2
    assert value(found, "nexus_http_requests_total", method="OTHER", **labels) == 1
    assert (
        value(found, "nexus_http_requests_total", method="GET", route="unmatched", status_class=status_class)
        == 1
    )
    sizes = "nexus_http_response_size_bytes_sum"
    assert value(found, sizes, method="GET", route="/items/{id}") == (0 if status is None else 6)
