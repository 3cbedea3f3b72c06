"""FastAPI integration: `requires(...)` over the published Principal; end to end on uvicorn."""

import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from joserfc.jwk import ECKey
from starlette.requests import Request

from nexus_middleware import JWTAuthMiddleware, JWTIssuer
from nexus_middleware.clock import ManualClock
from nexus_middleware.context import Principal
from nexus_middleware.dependencies import install_problem_handler, requires
from nexus_middleware.errors import ConfigurationError
from tests.support.idp import AUDIENCE, ISSUER, JWKSApp, mint
from tests.support.servers import serve

NOW = 1_700_000_000.0


@pytest.fixture
def key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "k1"})


def build_app(issuer: JWTIssuer, clock: ManualClock, *, handler: bool = True, **options: Any) -> Any:
    api = FastAPI()
    if handler:
        install_problem_handler(api)

    @api.get("/catalog")
    async def catalog(request: Request) -> dict[str, Any]:
        return {"user": request.user.display_name, "authenticated": request.user.is_authenticated}

    @api.post("/orders")
    async def create(principal: Principal = Depends(requires("orders:write"))) -> dict[str, str]:  # noqa: B008
        return {"created_by": principal.subject}

    @api.delete("/orders")
    async def purge(
        principal: Principal = Depends(requires("orders:write", "orders:admin")),  # noqa: B008
    ) -> dict[str, str]:
        return {"purged_by": principal.subject}

    @api.websocket("/feed")
    async def feed(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.user.display_name)
        await websocket.close()

    routes = [("/catalog", None, "optional")]
    return JWTAuthMiddleware(api, issuers=[issuer], clock=clock, routes=routes, **options)


@pytest.fixture
async def client(key: ECKey) -> AsyncIterator[httpx.AsyncClient]:
    app = build_app(JWTIssuer(ISSUER, AUDIENCE, ["ES256"], keys=[key]), ManualClock(wall=NOW))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        yield http


def auth(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def test_requires_allows_a_token_with_the_scope(client: httpx.AsyncClient, key: ECKey) -> None:
    response = await client.post(
        "/orders", headers=auth(mint(key, now=NOW, scope="orders:read orders:write"))
    )
    assert response.status_code == 200
    assert response.json() == {"created_by": "alice"}


async def test_requires_refuses_a_missing_scope_with_403_insufficient_scope(
    client: httpx.AsyncClient, key: ECKey
) -> None:
    response = await client.delete("/orders", headers=auth(mint(key, now=NOW, scp=["orders:write"])))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == (
        'Bearer error="insufficient_scope", error_description="The token does not grant the scope this '
        'operation requires", scope="orders:admin orders:write"'
    )
    body = response.json()
    assert body["error"] == "insufficient_scope"
    assert body["required_scopes"] == ["orders:admin", "orders:write"]


async def test_requires_on_an_optional_route_refuses_anonymous_with_401(key: ECKey) -> None:
    api = FastAPI()
    install_problem_handler(api)

    @api.get("/maybe")
    async def maybe(principal: Principal = Depends(requires("read"))) -> str:  # noqa: B008
        return principal.subject

    issuer = JWTIssuer(ISSUER, AUDIENCE, ["ES256"], keys=[key])
    app = JWTAuthMiddleware(api, issuers=[issuer], default="optional", clock=ManualClock(wall=NOW))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        response = await http.get("/maybe")
        assert response.status_code == 401
        assert response.headers["www-authenticate"] == "Bearer"
        assert response.headers["content-type"] == "application/problem+json"
        assert (await http.get("/maybe", headers=auth(mint(key, now=NOW, scope="read")))).text == '"alice"'


async def test_without_the_handler_status_and_challenge_survive(key: ECKey) -> None:
    app = build_app(JWTIssuer(ISSUER, AUDIENCE, ["ES256"], keys=[key]), ManualClock(wall=NOW), handler=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://api") as http:
        response = await http.post("/orders", headers=auth(mint(key, now=NOW)))
        assert response.status_code == 403
        assert response.headers["www-authenticate"].startswith('Bearer error="insufficient_scope"')


async def test_request_user_sees_the_principal_and_anonymous(client: httpx.AsyncClient, key: ECKey) -> None:
    assert (await client.get("/catalog")).json() == {"user": "anonymous", "authenticated": False}
    response = await client.get("/catalog", headers=auth(mint(key, now=NOW)))
    assert response.json() == {"user": "alice", "authenticated": True}


def test_requires_validates_scopes() -> None:
    for bad in ("", "two words", 'quo"te'):
        with pytest.raises(ConfigurationError):
            requires(bad)
    with pytest.raises(ConfigurationError):
        install_problem_handler(object())


async def test_end_to_end_on_uvicorn_with_a_jwks_url(key: ECKey) -> None:
    keys = JWKSApp(keys=[key])
    async with serve(keys) as jwks_url:
        issuer = JWTIssuer(ISSUER, AUDIENCE, ["ES256"], jwks_url=jwks_url, typ="at+jwt")
        clock = ManualClock(wall=time.time())
        app = build_app(issuer, clock)
        async with serve(app) as base, httpx.AsyncClient(base_url=base, trust_env=False) as http:
            token = mint(key, now=clock.time(), header={"typ": "at+jwt"}, scope="orders:write")
            response = await http.post("/orders", headers=auth(token))
            assert (response.status_code, response.json()) == (200, {"created_by": "alice"})
            refused = await http.post("/orders")
            assert refused.status_code == 401
            assert refused.headers["www-authenticate"] == "Bearer"
            # a websocket handshake without a token is refused before accept, as an HTTP denial response
            handshake = {
                "connection": "Upgrade",
                "upgrade": "websocket",
                "sec-websocket-version": "13",
                "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
            }
            denied = await http.get("/feed", headers=handshake)
            assert denied.status_code == 401
            assert denied.headers["content-type"] == "application/problem+json"
            accepted = await http.get("/feed", headers=handshake | auth(token))
            assert accepted.status_code == 101
        await app.aclose()
    assert keys.hits == 1
