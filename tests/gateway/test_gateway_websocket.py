"""Routed websockets end to end: a real uvicorn gateway (config, middleware stack, proxy) in front of a real
uvicorn websocket upstream, driven by aiohttp's websocket client. Every refusal must come before accept and
before the upstream is contacted: `UpstreamApp.handshakes` records each handshake the upstream saw."""

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import httpx
import pytest
from joserfc.jwk import ECKey

from nexus_middleware import hash_api_key_secret
from tests.gateway.support import (
    API_KEY,
    KEY_ID,
    KEY_SECRET,
    gateway,
    identity_provider,
    limited,
    settings,
    token,
    until,
    upstream,
)
from tests.support.idp import mint
from tests.support.servers import free_port
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e


@contextlib.asynccontextmanager
async def ws_gateway(
    data: dict[str, Any],
) -> AsyncIterator[tuple[str, aiohttp.ClientSession, httpx.AsyncClient]]:
    """The gateway for `data`: its `ws://` base URL, a websocket client session and an http client."""
    async with gateway(data) as http, aiohttp.ClientSession() as session:
        yield str(http.base_url).rstrip("/").replace("http://", "ws://", 1), session, http


async def refused(session: aiohttp.ClientSession, url: str, **options: Any) -> aiohttp.WSServerHandshakeError:
    with pytest.raises(aiohttp.WSServerHandshakeError) as error:
        await session.ws_connect(url, **options)
    return error.value


async def echoes(session: aiohttp.ClientSession, url: str, **options: Any) -> None:
    """Connects, sees one message echoed, closes: the handshake was admitted all the way to the upstream."""
    async with session.ws_connect(url, **options) as ws:
        await ws.send_str("ping")
        assert await ws.receive_str(timeout=5) == "ping"


def handshake_headers(app: UpstreamApp, index: int, name: str) -> list[str]:
    return [value for key, value in app.handshakes[index]["headers"] if key == name]


async def test_messages_subprotocol_query_and_forwarding_headers_reach_the_other_side() -> None:
    request_id = "ws-request-0123456789"
    async with (
        upstream() as (url, app),
        ws_gateway(settings(url, routes=[{"path": "/ws/*", "strip_prefix": "/ws"}])) as (base, session, _),
        session.ws_connect(
            f"{base}/ws/chat?room=7&x=%20y",
            protocols=["chat.v1", "chat.v2"],
            headers={"x-request-id": request_id},
        ) as ws,
    ):
        assert ws.protocol == "chat.v2"  # the upstream's choice, not the client's first offer
        await ws.send_str("hello")
        assert await ws.receive_str(timeout=5) == "hello"
        await ws.send_bytes(b"\x00\xffbinary")
        assert await ws.receive_bytes(timeout=5) == b"\x00\xffbinary"
        await ws.send_str("again")  # text after binary stays text
        assert await ws.receive_str(timeout=5) == "again"
    [handshake] = app.handshakes
    assert handshake["path"] == "/chat"  # the route's prefix stripped, as for http
    assert handshake["query_string"] == "room=7&x=%20y"
    assert handshake["subprotocols"] == ["chat.v1", "chat.v2"]
    assert handshake_headers(app, 0, "x-forwarded-for") == ["127.0.0.1"]
    assert handshake_headers(app, 0, "x-forwarded-proto") == ["http"]  # the HTTP scheme, as nginx sends it
    assert handshake_headers(app, 0, "x-request-id") == [request_id]
    assert handshake_headers(app, 0, "via") == ["1.1 nexus"]
    assert len(handshake_headers(app, 0, "sec-websocket-key")) == 1  # the upstream handshake's own
    assert app.received == []  # no http request reached the upstream: the handshake was proxied as one


async def test_the_upstream_close_code_reaches_the_client() -> None:
    async with (
        upstream() as (url, _),
        ws_gateway(settings(url, routes=[{"path": "/*"}])) as (base, session, _),
        session.ws_connect(f"{base}/close/4001") as ws,
    ):
        assert await ws.receive_str(timeout=5) == "bye"
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001


async def test_the_client_closing_closes_the_upstream_side_with_its_code() -> None:
    async with (
        upstream() as (url, app),
        ws_gateway(settings(url, routes=[{"path": "/*"}])) as (base, session, _),
    ):
        ws = await session.ws_connect(f"{base}/chat")
        await ws.send_str("before close")
        assert await ws.receive_str(timeout=5) == "before close"
        await ws.close(code=4002)
        await until(lambda: app.websocket_closes != [])
    assert app.websocket_closes == [4002]


async def test_a_required_jwt_route_refuses_a_handshake_without_credentials_before_the_upstream(
    signing_key: ECKey,
) -> None:
    routes = [{"path": "/secure/*", "auth": "required"}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth=auth)) as (base, session, _),
    ):
        missing = await refused(session, f"{base}/secure/chat")
        bad = await refused(session, f"{base}/secure/chat", headers={"authorization": "Bearer not.a.token"})
        assert app.handshakes == []  # refused before the upstream was contacted
        await echoes(session, f"{base}/secure/chat", headers=token(signing_key))
    assert missing.status == bad.status == 401
    assert missing.headers is not None and missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert bad.headers is not None and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert len(app.handshakes) == 1
    assert handshake_headers(app, 0, "x-auth-subject") == ["alice"]


# (route mode, credentials, refusal status or None when admitted, x-auth-subject the upstream sees)
AUTH_MODES: list[tuple[str, str, int | None, list[str]]] = [
    ("required", "none", 401, []),
    ("required", "valid", None, ["alice"]),
    ("optional", "none", None, []),
    ("optional", "valid", None, ["alice"]),
    ("optional", "invalid", 401, []),
    ("none", "none", None, []),
    ("none", "forged", None, []),  # a client-sent identity header never reaches the upstream
]


@pytest.mark.parametrize(("mode", "credentials", "status", "subject"), AUTH_MODES)
async def test_route_auth_modes_apply_to_the_handshake(
    signing_key: ECKey, mode: str, credentials: str, status: int | None, subject: list[str]
) -> None:
    headers = {
        "none": {},
        "valid": token(signing_key),
        "invalid": {"authorization": "Bearer not.a.token"},
        "forged": {"x-auth-subject": "mallory"},
    }[credentials]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=[{"path": "/*", "auth": mode}], auth=auth)) as (base, session, _),
    ):
        if status is None:
            await echoes(session, f"{base}/chat", headers=headers)
        else:
            assert (await refused(session, f"{base}/chat", headers=headers)).status == status
    if status is None:
        assert len(app.handshakes) == 1 and handshake_headers(app, 0, "x-auth-subject") == subject
    else:
        assert app.handshakes == []


async def test_the_handshake_takes_the_auth_mode_of_the_get_route_it_is_routed_to(signing_key: ECKey) -> None:
    # The router routes a handshake as a GET; the auth layer must take the mode of that same route, not of
    # the first route on the path (a POST-only public one here).
    routes = [
        {"path": "/chat", "methods": ["POST"]},
        {"path": "/chat", "methods": ["GET"], "auth": "required"},
    ]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth=auth)) as (base, session, http),
    ):
        missing = await refused(session, f"{base}/chat")
        post = await http.post("/chat")
    assert missing.status == 401 and app.handshakes == []
    assert post.status_code == 200  # the POST route stays public


async def test_an_api_key_route_authenticates_the_handshake() -> None:
    record = {"key_id": KEY_ID, "secret_hash": hash_api_key_secret(KEY_SECRET), "owner": "billing-bot"}
    auth = {"api_keys": {"header": "x-api-key", "keys": [record]}}
    routes = [{"path": "/billing/*", "auth": "required"}]
    async with (
        upstream() as (url, app),
        ws_gateway(settings(url, routes=routes, auth=auth)) as (base, session, _),
    ):
        missing = await refused(session, f"{base}/billing/feed")
        wrong = await refused(
            session, f"{base}/billing/feed", headers={"x-api-key": f"nx_{KEY_ID}_{'w' * 43}"}
        )
        assert app.handshakes == []
        await echoes(session, f"{base}/billing/feed", headers={"x-api-key": API_KEY})
    assert missing.status == wrong.status == 401
    assert len(app.handshakes) == 1 and handshake_headers(app, 0, "x-auth-subject") == ["billing-bot"]


async def test_rbac_refuses_a_handshake_without_the_routes_role(signing_key: ECKey) -> None:
    routes = [{"path": "/ops/*", "auth": "required", "roles": ["ops"]}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth=auth)) as (base, session, _),
    ):
        role_less = await refused(
            session, f"{base}/ops/console", headers=token(signing_key, roles=["viewer"])
        )
        assert app.handshakes == []
        await echoes(session, f"{base}/ops/console", headers=token(signing_key, roles=["ops"]))
    assert role_less.status == 403
    assert len(app.handshakes) == 1


async def test_a_rate_limited_route_refuses_handshakes_over_the_limit() -> None:
    async with upstream() as (url, app), ws_gateway(limited(url, "2/minute")) as (base, session, _):
        for item in (1, 2):
            await echoes(session, f"{base}/items/{item}")
        over = await refused(session, f"{base}/items/3")
        await echoes(session, f"{base}/free/x")  # another route, not limited
    assert over.status == 429
    assert over.headers is not None and int(over.headers["retry-after"]) > 0
    assert [handshake["path"] for handshake in app.handshakes] == ["/items/1", "/items/2", "/free/x"]


async def test_no_healthy_target_refuses_the_handshake_with_503() -> None:
    checks = {"path": "/healthz", "interval": 0.05, "timeout": 1, "unhealthy_threshold": 1}
    dead = f"http://127.0.0.1:{free_port()}"
    data = settings(dead, routes=[{"path": "/*"}], service={"health_check": checks})
    async with ws_gateway(data) as (base, session, http):
        await until_unready(http)
        answer = await refused(session, f"{base}/chat")
    assert answer.status == 503
    assert answer.headers is not None and answer.headers["retry-after"] == "1"
    assert answer.headers["content-type"] == "application/problem+json"


async def until_unready(http: httpx.AsyncClient) -> None:
    # The active checks run on the gateway's own schedule: poll the readiness probe they drive.
    deadline = time.monotonic() + 10
    while (await http.get("/readyz")).status_code != 503:
        assert time.monotonic() < deadline, "the dead target was never marked unhealthy"
        await asyncio.sleep(0.05)


async def test_an_open_breaker_refuses_the_handshake_without_calling_the_upstream() -> None:
    breaker = {"breaker": {"enabled": True, "failure_threshold": 2, "recovery_timeout": 60}}
    async with upstream() as (url, app):
        data = settings(url, routes=[{"path": "/*"}], service=breaker)
        async with ws_gateway(data) as (base, session, http):
            failing = [(await http.get("/status/500")).status_code for _ in range(2)]
            answer = await refused(session, f"{base}/chat")
    assert failing == [500, 500]
    assert answer.status == 503 and app.handshakes == []


async def test_an_open_websocket_does_not_hold_the_routes_concurrency_slot() -> None:
    routes = [{"path": "/*", "max_concurrent": 1}]
    async with (
        upstream() as (url, app),
        ws_gateway(settings(url, routes=routes)) as (base, session, _),
        session.ws_connect(f"{base}/first") as first,
    ):
        await echoes(session, f"{base}/second")  # the slot was released when the first was accepted
        await first.send_str("still open")
        assert await first.receive_str(timeout=5) == "still open"
    assert [handshake["path"] for handshake in app.handshakes] == ["/first", "/second"]


async def test_a_route_whose_methods_exclude_get_does_not_route_websockets() -> None:
    routes = [{"path": "/hooks/*", "methods": ["POST"]}, {"path": "/feed/*", "methods": ["GET"]}]
    async with upstream() as (url, app), ws_gateway(settings(url, routes=routes)) as (base, session, _):
        missing = await refused(session, f"{base}/hooks/x")
        await echoes(session, f"{base}/feed/x")
    assert missing.status == 404
    assert [handshake["path"] for handshake in app.handshakes] == ["/feed/x"]


def browser_auth(auth: dict[str, Any], **location: str) -> dict[str, Any]:
    return {**auth, "location": location}


async def test_a_browser_websocket_authenticates_with_a_query_token_the_upstream_never_sees(
    signing_key: ECKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    jwt = token(signing_key)["authorization"].removeprefix("Bearer ")
    routes = [{"path": "/secure/*", "auth": "required"}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(
            settings(
                url,
                routes=routes,
                auth=browser_auth(auth, query="access_token"),
                metrics={"access_log": True},
            )
        ) as (base, session, http),
    ):
        await echoes(session, f"{base}/secure/chat?room=7&access_token={jwt}&x=1")
        missing = await refused(session, f"{base}/secure/chat?room=7")
        answer = await http.get(f"/secure/items?access_token={jwt}&q=1")
    assert missing.status == 401
    [handshake] = app.handshakes
    assert handshake["query_string"] == "room=7&x=1"
    assert handshake_headers(app, 0, "x-auth-subject") == ["alice"]
    assert answer.status_code == 200
    assert answer.json()["query_string"] == "q=1"  # plain http requests lose it too
    gateway_logs = [record.getMessage() for record in caplog.records if record.name != "httpx"]  # not ours
    assert all(jwt not in message for message in gateway_logs)
    assert any('"query":"q=1"' in message for message in gateway_logs)  # the access log did run


async def test_a_browser_websocket_authenticates_with_a_cookie_the_upstream_never_sees(
    signing_key: ECKey,
) -> None:
    jwt = token(signing_key)["authorization"].removeprefix("Bearer ")
    cookies = {"cookie": f"theme=dark; access_token={jwt}; lang=en"}
    # An `auth: none` route reads no token, and still never forwards the credential cookie.
    routes = [{"path": "/secure/*", "auth": "required"}, {"path": "/public/*"}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth=browser_auth(auth, cookie="access_token"))) as (
            base,
            session,
            _,
        ),
    ):
        await echoes(session, f"{base}/secure/chat", headers=cookies)
        await echoes(session, f"{base}/public/chat", headers=cookies)
        twice = await refused(session, f"{base}/secure/chat", headers={**cookies, **token(signing_key)})
    assert twice.status == 400  # one token, two ways at once (RFC 6750 §2)
    assert [handshake["path"] for handshake in app.handshakes] == ["/secure/chat", "/public/chat"]
    for index, subject in ((0, ["alice"]), (1, [])):
        assert handshake_headers(app, index, "cookie") == ["theme=dark; lang=en"]
        assert handshake_headers(app, index, "x-auth-subject") == subject


async def test_a_websocket_is_closed_with_1008_when_its_token_expires_and_its_upstream_side_too(
    signing_key: ECKey,
) -> None:
    # A short-lived token (exp is a float claim) and no leeway: the session is closed about 1 s after exp.
    expiring = {"authorization": f"Bearer {mint(signing_key, now=time.time(), exp=time.time() + 1.0)}"}
    routes = [{"path": "/secure/*", "auth": "required"}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth={**auth, "leeway": 0})) as (base, session, _),
        session.ws_connect(f"{base}/secure/chat", headers=expiring) as ws,
    ):
        await ws.send_str("while valid")
        assert await ws.receive_str(timeout=5) == "while valid"
        closing = await ws.receive(timeout=10)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 1008
        assert closing.extra == "The token expired"
        await until(lambda: app.websocket_closes != [])
    assert app.websocket_closes == [1008]


async def test_expiry_close_can_be_turned_off_in_the_config(signing_key: ECKey) -> None:
    expiring = {"authorization": f"Bearer {mint(signing_key, now=time.time(), exp=time.time() + 1.0)}"}
    routes = [{"path": "/secure/*", "auth": "required"}]
    auth_off = {"leeway": 0, "close_expired_websockets": False}
    async with (
        upstream() as (url, _),
        identity_provider(signing_key) as auth,
        ws_gateway(settings(url, routes=routes, auth={**auth, **auth_off})) as (base, session, _),
        session.ws_connect(f"{base}/secure/chat", headers=expiring) as ws,
    ):
        await ws.send_str("now")
        assert await ws.receive_str(timeout=5) == "now"
        deadline = time.time() + 1.0
        await until(lambda: time.time() > deadline)  # past exp: the session stays open
        await ws.send_str("after exp")
        assert await ws.receive_str(timeout=5) == "after exp"


async def test_a_websocket_over_its_message_rate_is_closed_with_1008_and_its_upstream_side_too() -> None:
    limits = {"websocket_messages": ["3/minute"]}
    async with (
        upstream() as (url, app),
        ws_gateway(settings(url, routes=[{"path": "/*"}], rate_limits=limits)) as (base, session, http),
    ):
        async with session.ws_connect(f"{base}/chat") as ws:
            for index in range(3):
                await ws.send_str(f"message {index}")
                assert await ws.receive_str(timeout=5) == f"message {index}"
            await ws.send_str("one too many")
            closing = await ws.receive(timeout=5)
            assert closing.type == aiohttp.WSMsgType.CLOSE
            assert ws.close_code == 1008
            assert closing.extra == "message rate limit exceeded"
            await until(lambda: app.websocket_closes != [])
        await echoes(session, f"{base}/chat")  # each connection has a budget of its own
        assert (await http.get("/items")).status_code == 200  # http requests are not counted
    assert app.websocket_closes[0] == 1008
