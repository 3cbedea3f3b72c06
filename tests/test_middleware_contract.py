"""The contract every middleware of the suite keeps, checked across all of them at once.

- A lifespan scope reaches the inner app untouched: the same scope, receive and send objects, nothing added.
- A streamed response passes through chunk by chunk: each body message reaches the server before the app
  sends the next one, with its bytes and `more_body` unchanged (nothing is buffered).
- A websocket handshake the layer admits reaches the app, and the session's accept and close reach the server.
- Every route-matching layer answers an unusable path with the same 400 problem, before the app runs.

Each middleware is built with its default options, plus only what it cannot run without (issuers, policies,
sinks, an endpoint) and a private metrics registry.
"""

import copy
import time
from collections.abc import Callable
from typing import Any

import pytest
from joserfc.jwk import OctKey
from prometheus_client import CollectorRegistry

import nexus_middleware
from nexus_middleware import (
    AccessLogMiddleware,
    APIKeyMiddleware,
    AuditLogMiddleware,
    BodySizeLimitMiddleware,
    CircuitBreakerMiddleware,
    ConcurrencyLimitMiddleware,
    IntrospectionMiddleware,
    JWTAuthMiddleware,
    JWTIssuer,
    MetricsMiddleware,
    ProblemDetailsMiddleware,
    RateLimitMiddleware,
    RateLimitPolicy,
    RBACMiddleware,
    RequestIDMiddleware,
    SecurityHeadersMiddleware,
    TimeoutMiddleware,
    TracingMiddleware,
)
from nexus_middleware.api_keys import APIKeyRecord, MemoryAPIKeyStore, hash_api_key_secret
from nexus_middleware.audit import LoggerSink
from nexus_middleware.context import Principal, publish_principal
from nexus_middleware.rbac import RoleDef
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.idp import AUDIENCE, ISSUER, mint

SIGNING_KEY = OctKey.generate_key(256)
API_KEY_SECRET = "contract-secret-0123456789abcdef"
API_KEYS = [APIKeyRecord("contract1", hash_api_key_secret(API_KEY_SECRET), owner="contract")]


def authenticated(app: ASGIApp) -> ASGIApp:
    """Stands for the authentication layer RBAC sits behind: publishes a principal holding role "reader"."""

    async def publish(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            publish_principal(scope, Principal("alice", method="jwt", roles=frozenset({"reader"})))
        await app(scope, receive, send)

    return publish


def rbac(app: ASGIApp, **options: Any) -> ASGIApp:
    roles = {"reader": RoleDef(permissions=["GET /*"])}
    return authenticated(RBACMiddleware(app, roles=roles, **options))


BUILDERS: dict[str, Callable[[ASGIApp], ASGIApp]] = {
    "APIKeyMiddleware": lambda app: APIKeyMiddleware(app, store=MemoryAPIKeyStore(API_KEYS)),
    "AccessLogMiddleware": lambda app: AccessLogMiddleware(app),
    "AuditLogMiddleware": lambda app: AuditLogMiddleware(app, sinks=[LoggerSink()]),
    "BodySizeLimitMiddleware": lambda app: BodySizeLimitMiddleware(app),
    "CircuitBreakerMiddleware": lambda app: CircuitBreakerMiddleware(app),
    "ConcurrencyLimitMiddleware": lambda app: ConcurrencyLimitMiddleware(app),
    "IntrospectionMiddleware": lambda app: IntrospectionMiddleware(
        app, endpoint="https://idp.example.com/introspect", client_id="gateway", client_secret="s3cret"
    ),
    "JWTAuthMiddleware": lambda app: JWTAuthMiddleware(
        app, issuers=[JWTIssuer(ISSUER, AUDIENCE, ["HS256"], keys=[SIGNING_KEY])]
    ),
    "MetricsMiddleware": lambda app: MetricsMiddleware(app, registry=CollectorRegistry()),
    "ProblemDetailsMiddleware": lambda app: ProblemDetailsMiddleware(app),
    "RBACMiddleware": rbac,
    "RateLimitMiddleware": lambda app: RateLimitMiddleware(
        app, policies=[RateLimitPolicy("api", "1000/minute", key="client")]
    ),
    "RequestIDMiddleware": lambda app: RequestIDMiddleware(app),
    "SecurityHeadersMiddleware": lambda app: SecurityHeadersMiddleware(app),
    "TimeoutMiddleware": lambda app: TimeoutMiddleware(app),
    "TracingMiddleware": lambda app: TracingMiddleware(app),
}

# What an authenticator in its default ("required") mode needs to let a request through.
CREDENTIALS: dict[str, Callable[[], list[tuple[str, str]]]] = {
    "APIKeyMiddleware": lambda: [("x-api-key", f"nx_contract1_{API_KEY_SECRET}")],
    "JWTAuthMiddleware": lambda: [
        ("authorization", f"Bearer {mint(SIGNING_KEY, alg='HS256', now=time.time())}")
    ],
}
# Introspection in its default mode would have to call a real endpoint; unauthenticated routes are exempt.
ROUTE_OPTIONS: dict[str, Callable[[ASGIApp], ASGIApp]] = {
    "IntrospectionMiddleware": lambda app: IntrospectionMiddleware(
        app,
        endpoint="https://idp.example.com/introspect",
        client_id="gateway",
        client_secret="s3cret",
        routes=[("/stream", None, "exempt")],
    ),
}

CHUNKS = [b"first chunk ", b"", b"second chunk ", b"x" * 70_000, b"last"]


def test_every_exported_middleware_is_in_the_contract_table() -> None:
    exported = {name for name in nexus_middleware.__all__ if name.endswith("Middleware")}
    assert exported == set(BUILDERS)


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_lifespan_reaches_the_inner_app_untouched(name: str) -> None:
    seen: list[tuple[Scope, Receive, Send]] = []

    async def lifespan_app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((scope, receive, send))
        assert (await receive())["type"] == "lifespan.startup"
        await send({"type": "lifespan.startup.complete"})
        assert (await receive())["type"] == "lifespan.shutdown"
        await send({"type": "lifespan.shutdown.complete"})

    scope = make_scope(scope_type="lifespan")
    scope.pop("method", None)
    before = copy.deepcopy(scope)
    incoming: list[Message] = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[Message] = []

    async def receive() -> Message:
        return incoming.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    await BUILDERS[name](lifespan_app)(scope, receive, send)

    assert seen == [(scope, receive, send)]
    assert seen[0][0] is scope and seen[0][1] is receive and seen[0][2] is send
    assert scope == before
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_streamed_chunks_pass_through_one_by_one(name: str) -> None:
    sent: list[Message] = []
    delivered_before_next: list[bool] = []

    async def streaming(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for index, chunk in enumerate(CHUNKS):
            message = {"type": "http.response.body", "body": chunk, "more_body": index < len(CHUNKS) - 1}
            await send(message)
            bodies = [m for m in sent if m["type"] == "http.response.body"]
            delivered_before_next.append(len(bodies) == index + 1 and bodies[-1]["body"] == chunk)

    build = ROUTE_OPTIONS.get(name, BUILDERS[name])
    headers = CREDENTIALS.get(name, list)()
    incoming: list[Message] = [{"type": "http.request", "body": b"", "more_body": False}]

    async def receive() -> Message:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await build(streaming)(make_scope("/stream", headers=headers), receive, send)

    starts = [m for m in sent if m["type"] == "http.response.start"]
    bodies_sent = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["status"] for m in starts] == [200]
    assert [m["body"] for m in bodies_sent] == CHUNKS
    assert [m.get("more_body", False) for m in bodies_sent] == [True] * (len(CHUNKS) - 1) + [False]
    assert delivered_before_next == [True] * len(CHUNKS)


# Every layer that matches routes answers an unusable path the same way, whichever sees it first.
ORDERS_UNPROTECTED = [("/orders", None, None)]
ROUTED: dict[str, Callable[[ASGIApp], ASGIApp]] = {
    "APIKeyMiddleware": lambda app: APIKeyMiddleware(
        app, store=MemoryAPIKeyStore(API_KEYS), exempt=["/health"]
    ),
    "RBACMiddleware": rbac,
    "BodySizeLimitMiddleware": lambda app: BodySizeLimitMiddleware(app, routes={"/uploads/*": 10}),
    "CircuitBreakerMiddleware": lambda app: CircuitBreakerMiddleware(app, routes=ORDERS_UNPROTECTED),
    "ConcurrencyLimitMiddleware": lambda app: ConcurrencyLimitMiddleware(
        app, routes=[("/orders", None, None)]
    ),
    "IntrospectionMiddleware": ROUTE_OPTIONS["IntrospectionMiddleware"],
    "JWTAuthMiddleware": lambda app: JWTAuthMiddleware(
        app,
        issuers=[JWTIssuer(ISSUER, AUDIENCE, ["HS256"], keys=[SIGNING_KEY])],
        routes=[("/health", None, "exempt")],
    ),
    "RateLimitMiddleware": BUILDERS["RateLimitMiddleware"],
    "TimeoutMiddleware": lambda app: TimeoutMiddleware(app, routes=[("/slow", None, 60.0)]),
}


@pytest.mark.parametrize("name", sorted(ROUTED))
async def test_an_invalid_path_is_the_same_400_problem_everywhere(name: str) -> None:
    reached: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        reached.append(scope)

    recorded = await run_asgi(ROUTED[name](app), make_scope("/orders%00", raw_path=b"/orders%00"))
    assert reached == []
    assert recorded.status == 400
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.json()["detail"] == "The request path is invalid."


@pytest.mark.parametrize("name", sorted(BUILDERS))
async def test_an_admitted_websocket_session_passes_through(name: str) -> None:
    build = ROUTE_OPTIONS.get(name, BUILDERS[name])
    headers = CREDENTIALS.get(name, list)()
    recorded = await run_asgi(build(ok_app), make_scope("/stream", scope_type="websocket", headers=headers))
    assert [m["type"] for m in recorded.messages] == ["websocket.accept", "websocket.close"]
    assert recorded.messages[1] == {"type": "websocket.close", "code": 1000}
