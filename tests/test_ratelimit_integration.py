"""RateLimitMiddleware in FastAPI/Starlette apps and end to end through real uvicorn: the recipes, headers on
framework errors, websocket handshakes and message limits over a real socket."""

from typing import Any

import aiohttp
import httpx
import pytest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from nexus_middleware import ManualClock, RateLimitMiddleware, RateLimitOptions, RateLimitPolicy
from nexus_middleware.structured_fields import parse_list
from recipes.login_fail_closed import create_app as login_app
from recipes.per_plan_limits import create_app as plan_app
from tests.support.servers import serve


def limits_of(response: httpx.Response, field: str = "ratelimit") -> dict[str, dict[str, Any]]:
    return {str(i.value): dict(i.params) for i in parse_list(response.headers.get_list(field))}


async def test_per_plan_recipe_through_uvicorn() -> None:
    # A manual clock: a minute boundary passing mid-test would let the sliding window forgive earlier hits.
    async with serve(plan_app(clock=ManualClock())) as url, httpx.AsyncClient(base_url=url) as client:
        free = {"x-demo-user": "fay; free"}
        statuses = [(await client.get("/items/1", headers=free)).status_code for _ in range(6)]
        assert statuses == [200] * 5 + [429]
        pro = await client.get("/items/1", headers={"x-demo-user": "pat; pro"})
        assert pro.status_code == 200 and pro.json() == {"item": 1, "caller": "pat"}
        assert limits_of(pro, "ratelimit-policy")["plan-60s"]["q"] == 60
        assert limits_of(pro)["plan-86400s"]["r"] == 9999
        enterprise = await client.get("/items/1", headers={"x-demo-user": "eve; enterprise"})
        assert enterprise.status_code == 200 and "ratelimit" not in enterprise.headers
        anonymous = await client.get("/items/1")
        assert limits_of(anonymous, "ratelimit-policy")["plan"]["q"] == 2
        # FastAPI's own errors (422 here) carry the headers too
        invalid = await client.get("/items/not-a-number", headers={"x-demo-user": "pat; pro"})
        assert invalid.status_code == 422 and limits_of(invalid)["plan-60s"]["r"] == 58
        refused = await client.get("/items/1", headers=free)
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["violated-policies"] == ["plan-60s"]


async def test_login_recipe_fails_closed_and_the_rest_open(
    redis_server_factory: Any, redis_prefix: str
) -> None:
    server = redis_server_factory()
    app = login_app(server.url, key_prefix=redis_prefix, breaker_cooldown=30)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        logins = [(await client.post("/login")).status_code for _ in range(6)]
        assert logins == [200] * 5 + [429]
        assert "ratelimit" in (await client.get("/items")).headers
        server.stop()
        down = await client.post("/login")
        assert down.status_code == 503
        assert down.headers["content-type"] == "application/problem+json"
        assert int(down.headers["retry-after"]) >= 1
        items = await client.get("/items")
        assert items.status_code == 200 and "ratelimit" not in items.headers


def _starlette(limit: str = "3/minute", **options: Any) -> Starlette:
    async def ok(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    async def unavailable(request: Request) -> PlainTextResponse:
        raise HTTPException(503, "maintenance")

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        try:
            while True:
                await websocket.send_text(await websocket.receive_text())
        except WebSocketDisconnect:
            return

    app = Starlette(
        routes=[Route("/ok", ok), Route("/down", unavailable), WebSocketRoute("/ws", echo)],
    )
    app.add_middleware(
        RateLimitMiddleware,
        policies=[RateLimitPolicy("api", limit, key="client", strategy="fixed-window")],
        options=RateLimitOptions(**options),
    )
    return app


async def test_headers_on_framework_errors_through_uvicorn() -> None:
    async with (
        serve(_starlette("10/minute", legacy_headers=True)) as url,
        httpx.AsyncClient(base_url=url) as client,
    ):
        missing = await client.get("/nowhere")
        down = await client.get("/down")
        assert missing.status_code == 404 and limits_of(missing)["api"]["r"] == 9
        assert down.status_code == 503 and limits_of(down)["api"]["r"] == 8
        assert down.headers["x-ratelimit-remaining"] == "8"


@pytest.mark.parametrize("ws", ["wsproto"])
async def test_websocket_handshake_and_message_limits_through_uvicorn(ws: str) -> None:
    app = _starlette("2/minute", websocket_messages="3/minute")
    async with serve(app, ws=ws) as url, aiohttp.ClientSession() as session:
        ws_url = url.replace("http", "ws") + "/ws"
        async with session.ws_connect(ws_url) as socket:
            for text in ("a", "b", "c"):
                await socket.send_str(text)
                assert (await socket.receive_str()) == text
            await socket.send_str("d")
            closing = await socket.receive()
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert socket.close_code == 1008 or closing.data == 1008
        async with session.ws_connect(ws_url) as second:
            await second.close()
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(ws_url)
        assert refused.value.status in (403, 429)


async def test_fastapi_per_plan_limits_from_real_jwts() -> None:
    from fastapi import FastAPI
    from joserfc.jwk import ECKey

    from nexus_middleware import JWTAuthMiddleware, JWTIssuer, Quota
    from nexus_middleware.bearer import ClaimMapping
    from tests.support.idp import AUDIENCE, ISSUER, mint

    now = 1_700_000_000.0
    key = ECKey.generate_key("P-256", parameters={"kid": "k1"})
    api = FastAPI()

    @api.get("/orders")
    async def orders() -> dict[str, str]:
        return {"ok": "yes"}

    plans = {"free": "2/minute", "pro": "4/minute"}
    policy = RateLimitPolicy(
        "api",
        quotas=(
            Quota("user", "1/minute", key="principal", plans=plans),
            Quota("org", "5/minute", key="tenant"),
        ),
        strategy="fixed-window",
    )
    api.add_middleware(RateLimitMiddleware, policies=[policy], clock=ManualClock(wall=now))
    issuer = JWTIssuer(
        ISSUER, AUDIENCE, ["ES256"], keys=[key], claims=ClaimMapping(plan="plan", tenant="org")
    )
    api.add_middleware(JWTAuthMiddleware, issuers=[issuer], clock=ManualClock(wall=now))

    def bearer(sub: str, plan: str) -> dict[str, str]:
        return {"authorization": f"Bearer {mint(key, now=now, sub=sub, plan=plan, org='acme')}"}

    async with serve(api) as url, httpx.AsyncClient(base_url=url) as client:
        free = [(await client.get("/orders", headers=bearer("fay", "free"))).status_code for _ in range(3)]
        assert free == [200, 200, 429]
        pro = [await client.get("/orders", headers=bearer("pat", "pro")) for _ in range(4)]
        # the org pool (5) runs out before pat's plan (4): fay's refused third request took nothing from it
        assert [r.status_code for r in pro] == [200, 200, 200, 429]
        assert limits_of(pro[2], "ratelimit-policy")["user"]["q"] == 4
        assert limits_of(pro[2])["org"]["r"] == 0
        assert pro[3].json()["violated-policies"] == ["org"]
        unauthenticated = await client.get("/orders")
        assert unauthenticated.status_code == 401
