"""The JWT + RBAC recipe end to end: real uvicorn for the app, a real JWKS server on loopback."""

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey

from recipes.fastapi_jwt_rbac import create_app
from tests.support.idp import AUDIENCE, ISSUER, JWKSApp, mint
from tests.support.servers import serve


@dataclass
class Deployment:
    client: httpx.AsyncClient
    url: str
    key: ECKey
    jwks: JWKSApp

    def token(self, *, roles: list[str], scope: str = "", org: str = "acme", **claims: Any) -> dict[str, str]:
        token = mint(self.key, now=time.time(), roles=roles, scope=scope or None, org=org, **claims)
        return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def deployment() -> AsyncIterator[Deployment]:
    key = ECKey.generate_key("P-256", parameters={"kid": "signing-1"})
    jwks = JWKSApp(keys=[key], cache_control="max-age=600")
    async with serve(jwks) as idp:
        app = create_app(issuer=ISSUER, audience=AUDIENCE, jwks_url=f"{idp}/.well-known/jwks.json")
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            yield Deployment(client, url, key, jwks)


async def raw_get(url: str, target: str, headers: dict[str, str]) -> int:
    """A GET with the request target sent exactly as given (httpx would normalize dot segments)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()
    return int(status_line.split()[1])


async def test_public_and_unauthenticated(deployment: Deployment) -> None:
    client = deployment.client
    assert (await client.get("/health")).json() == {"status": "ok"}
    assert (await client.get("/openapi.json")).status_code == 200
    refused = await client.get("/orders/1")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert refused.headers["content-type"] == "application/problem+json"
    assert deployment.jwks.hits == 0  # no token, no key fetch


async def test_roles_scopes_and_tenants(deployment: Deployment) -> None:
    client, token = deployment.client, deployment.token
    viewer = token(roles=["viewer"], scope="orders:read")
    me = await client.get("/me", headers=viewer)
    assert me.json() == {"subject": "alice", "tenant": "acme", "roles": ["viewer"], "scopes": ["orders:read"]}
    assert (await client.get("/orders/7", headers=viewer)).json() == {"id": 7, "owner": "alice"}

    # RBAC: a viewer may not write, whatever the method-override header says.
    denied = await client.post("/orders", headers={**viewer, "X-HTTP-Method-Override": "GET"})
    assert denied.status_code == 403
    assert denied.headers["content-type"] == "application/problem+json"

    # requires(): the clerk role may write, but this token lacks the orders:write scope.
    unscoped = await client.post("/orders", headers=token(roles=["clerk"], scope="orders:read"))
    assert unscoped.status_code == 403
    assert unscoped.headers["content-type"] == "application/problem+json"
    assert unscoped.json()["error"] == "insufficient_scope"
    assert 'error="insufficient_scope"' in unscoped.headers["www-authenticate"]
    clerk = token(roles=["clerk"], scope="orders:read orders:write")
    created = await client.post("/orders", headers=clerk)
    assert (created.status_code, created.json()) == (201, {"created_by": "alice", "tenant": "acme"})

    # Tenant scoping: the token's org must be the path's.
    assert (await client.get("/orgs/acme/reports", headers=viewer)).status_code == 200
    assert (await client.get("/orgs/globex/reports", headers=viewer)).status_code == 403

    # Inheritance: admin -> clerk -> viewer.
    admin = token(roles=["admin"], scope="orders:read")
    assert (await client.get("/admin/stats", headers=admin)).status_code == 200
    assert (await client.get("/orders/1", headers=admin)).status_code == 200
    assert (await client.get("/admin/stats", headers=clerk)).status_code == 403
    assert (await client.get("/unknown", headers=admin)).status_code == 404  # "*" lets admin reach the router
    assert (await client.get("/unknown", headers=viewer)).status_code == 403  # unknown routes are closed
    assert deployment.jwks.hits == 1  # one key fetch, then the cached key set


@pytest.mark.parametrize("target", ["/%61dmin/stats", "//admin/stats", "/x/../admin/stats", "/admin%2Fstats"])
async def test_bypass_attempts_through_the_recipe(deployment: Deployment, target: str) -> None:
    clerk = deployment.token(roles=["clerk"], scope="orders:read")
    assert await raw_get(deployment.url, target, clerk) == 403


async def test_forged_and_expired_tokens(deployment: Deployment) -> None:
    stranger = ECKey.generate_key("P-256", parameters={"kid": "signing-1"})  # same kid, wrong key
    forged = mint(stranger, now=time.time(), roles=["admin"], org="acme")
    assert (
        await deployment.client.get("/me", headers={"Authorization": f"Bearer {forged}"})
    ).status_code == 401
    expired = mint(deployment.key, now=time.time() - 7200, roles=["admin"], org="acme")
    assert (
        await deployment.client.get("/me", headers={"Authorization": f"Bearer {expired}"})
    ).status_code == 401
