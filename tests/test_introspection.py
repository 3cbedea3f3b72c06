"""IntrospectionMiddleware against a real RFC 7662 endpoint on loopback: client auth, caching."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nexus_middleware import ClaimMapping
from nexus_middleware.clock import ManualClock
from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.introspection import IntrospectionMiddleware, IntrospectionPolicy
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, run_asgi
from tests.support.idp import IntrospectionApp
from tests.support.servers import free_port, serve

NOW = 1_700_000_000.0
ACTIVE = {
    "active": True,
    "sub": "alice",
    "client_id": "web",
    "scope": "orders:read orders:write",
    "iss": "https://idp.example.com/",
    "aud": ["orders-api"],
    "exp": NOW + 600,
    "org": "acme",
}


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall=NOW)


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


@pytest.fixture
async def idp() -> AsyncIterator[tuple[IntrospectionApp, str]]:
    server = IntrospectionApp(tokens={"good": dict(ACTIVE), "svc": {"active": True, "client_id": "batch"}})
    async with serve(server) as url:
        yield server, f"{url}/introspect"


async def whoami(scope: Scope, receive: Receive, send: Send) -> None:
    user = scope["user"]
    body = json.dumps(
        {"subject": user.subject, "method": user.method, "scopes": sorted(user.scopes), "tenant": user.tenant}
    )
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body.encode()})


def middleware(
    endpoint: str, clock: ManualClock, client: httpx.AsyncClient | None, **options: Any
) -> IntrospectionMiddleware:
    options.setdefault("client_id", "gateway")
    options.setdefault("client_secret", "s3cret:with%chars")
    return IntrospectionMiddleware(whoami, endpoint=endpoint, http_client=client, clock=clock, **options)


async def call(app: IntrospectionMiddleware, token: str) -> Any:
    return await run_asgi(app, make_scope("/orders", headers=[("authorization", f"Bearer {token}")]))


async def test_active_token_maps_to_a_principal_with_client_authentication(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    app = middleware(endpoint, clock, http_client, claims=ClaimMapping(tenant="org"), audience="orders-api")
    scope = make_scope("/orders", headers=[("authorization", "Bearer good")])
    response = await run_asgi(app, scope)
    assert response.status == 200
    assert response.json() == {
        "subject": "alice",
        "method": "introspection",
        "scopes": ["orders:read", "orders:write"],
        "tenant": "acme",
    }
    assert server.requests[0]["token"] == ["good"]
    assert server.requests[0]["token_type_hint"] == ["access_token"]
    decision = get_context(scope).decision("auth")
    assert decision is not None
    assert decision.details["method"] == "introspection"
    # a client-credentials token without sub: the client is the subject
    assert (await call(app, "svc")).status == 401  # no audience in the answer
    plain = middleware(endpoint, clock, http_client)
    assert (await call(plain, "svc")).json()["subject"] == "batch"


async def test_client_secret_post(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    app = middleware(
        endpoint,
        clock,
        http_client,
        policy=IntrospectionPolicy(auth_method="client_secret_post", token_type_hint=None),
    )
    assert (await call(app, "good")).status == 200
    assert server.requests[0]["client_id"] == ["gateway"]
    assert "token_type_hint" not in server.requests[0]


async def test_inactive_token_is_401_and_cached_briefly(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    app = middleware(endpoint, clock, http_client, policy=IntrospectionPolicy(negative_ttl=10))
    for _ in range(3):
        response = await call(app, "stolen")
        assert response.status == 401
        assert (
            response.header("www-authenticate")
            == 'Bearer error="invalid_token", error_description="The token is not active"'
        )
    assert server.hits == 1
    clock.advance(10)
    assert (await call(app, "stolen")).status == 401
    assert server.hits == 2


async def test_active_answer_cached_until_exp_and_bounded(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    app = middleware(endpoint, clock, http_client, policy=IntrospectionPolicy(positive_ttl=120, leeway=0))
    assert (await call(app, "good")).status == 200
    clock.advance(119)
    assert (await call(app, "good")).status == 200
    assert server.hits == 1
    clock.advance(1)  # positive_ttl reached before exp
    assert (await call(app, "good")).status == 200
    assert server.hits == 2
    clock.advance(481)  # past exp: the cached answer is gone and the answer's exp is enforced
    response = await call(app, "good")
    assert response.json()["detail"] == "The token expired"
    assert server.hits == 3


async def test_concurrent_requests_share_one_introspection(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    server.delay = 0.2
    app = middleware(endpoint, clock, http_client)
    responses = await asyncio.gather(
        *(call(app, "good") for _ in range(50)), *(call(app, "bad") for _ in range(50))
    )
    assert [r.status for r in responses] == [200] * 50 + [401] * 50
    assert server.hits == 2  # one per distinct token


@pytest.mark.parametrize(
    ("claims", "options", "detail"),
    [
        ({"exp": NOW - 3600}, {}, "The token expired"),
        ({"nbf": NOW + 3600}, {}, "The token is not valid yet"),
        (
            {"iss": "https://evil.example.com/"},
            {"issuer": "https://idp.example.com/"},
            "The token issuer is not trusted",
        ),
        ({"aud": "billing"}, {"audience": ["orders-api"]}, "The token is not meant for this audience"),
        ({"aud": [{"x": 1}]}, {"audience": "orders-api"}, "The token is not meant for this audience"),
        ({"sub": None, "client_id": None}, {}, "The token has no sub claim"),
        ({"active": "true"}, {}, None),  # not a boolean: a broken endpoint, answered 503
    ],
)
async def test_active_answers_are_still_validated(
    claims: dict[str, Any],
    options: dict[str, Any],
    detail: str | None,
    clock: ManualClock,
    http_client: httpx.AsyncClient,
) -> None:
    answer = {name: value for name, value in (ACTIVE | claims).items() if value is not None}
    server = IntrospectionApp(tokens={"t": answer})
    async with serve(server) as url:
        response = await call(middleware(url, clock, http_client, **options), "t")
    if detail is None:
        assert response.status == 503
    else:
        assert response.status == 401
        assert response.json()["detail"] == detail


@pytest.mark.parametrize(
    "failure",
    [
        {"status": 500},
        {"body": b"<html>oops</html>"},
        {"body": b"[true]"},
        {"body": b'{"active": true, "sub": "x", "pad": "' + b"x" * 100_000 + b'"}'},
        {"client_secret": "rotated"},  # our credentials are refused: a configuration problem, not the user's
    ],
)
async def test_endpoint_failures_fail_closed_and_are_not_cached(
    failure: dict[str, Any], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server = IntrospectionApp(tokens={"good": dict(ACTIVE)})
    for name, value in failure.items():
        setattr(server, name, value)
    async with serve(server) as url:
        app = middleware(url, clock, http_client)
        for expected_hits in (1, 2):
            response = await call(app, "good")
            assert response.status == 503
            assert response.header("content-type") == "application/problem+json"
            assert server.hits == expected_hits  # failures are never cached as "inactive"


async def test_unreachable_endpoint_and_own_client(clock: ManualClock) -> None:
    app = middleware(
        f"http://127.0.0.1:{free_port()}/introspect", clock, None, policy=IntrospectionPolicy(timeout=2)
    )
    assert (await call(app, "good")).status == 503
    await app.aclose()
    assert "IntrospectionMiddleware(endpoint=" in repr(app)


async def test_oversized_token_is_refused_without_a_call(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    server, endpoint = idp
    app = middleware(endpoint, clock, http_client, policy=IntrospectionPolicy(max_token_bytes=100))
    assert (await call(app, "x" * 101)).json()["detail"] == "The token is too large"
    assert server.hits == 0


async def test_websocket_and_lifespan(
    idp: tuple[IntrospectionApp, str], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    _, endpoint = idp
    app = middleware(endpoint, clock, http_client)
    refused = await run_asgi(
        app, make_scope("/ws", scope_type="websocket", headers=[("authorization", "Bearer bad")])
    )
    assert [m["type"] for m in refused.messages] == ["websocket.close"]
    seen: list[str] = []

    async def inner(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    await run_asgi(
        IntrospectionMiddleware(inner, endpoint=endpoint, client_id="a", client_secret="b"),
        make_scope(scope_type="lifespan"),
    )
    assert seen == ["lifespan"]


@pytest.mark.parametrize(
    "options",
    [
        {"endpoint": "ftp://idp/introspect"},
        {"client_id": ""},
        {"audience": []},
        {"audience": [""]},
        {"policy": "bad-method"},
        {"policy": "negative"},
        {"policy": "timeout"},
    ],
)
def test_configuration_is_validated(options: dict[str, Any]) -> None:
    arguments: dict[str, Any] = {"endpoint": "https://idp/introspect", "client_id": "a", "client_secret": "b"}
    policies = {
        "bad-method": {"auth_method": "private_key_jwt"},
        "negative": {"negative_ttl": -1},
        "timeout": {"timeout": 0},
    }
    with pytest.raises(ConfigurationError):
        if "policy" in options:
            IntrospectionPolicy(**policies[options["policy"]])
        else:
            IntrospectionMiddleware(whoami, **(arguments | options))
