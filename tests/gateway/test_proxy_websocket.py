"""Websocket proxying end to end: a real uvicorn gateway relaying to a real upstream's websocket echo."""

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.contracts import RetryPolicy, Target, UpstreamPolicy
from sample_gateway.proxy import ReverseProxy
from sample_gateway.upstream_client import UpstreamClient
from tests.gateway.support import FirstSelector, ListSelector, RecordingObserver, until
from tests.support.servers import free_port, serve
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e


def ws_gateway(
    proxy: ReverseProxy,
    selector: ListSelector,
    observer: RecordingObserver,
    decisions: list[Any],
    policy: UpstreamPolicy | None = None,
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        try:
            await proxy.forward_websocket(
                scope,
                receive,
                send,
                selector=selector,
                policy=policy or UpstreamPolicy(service="ws"),
                path=scope["path"],
                observer=observer,
            )
        finally:
            decisions.extend(scope["state"]["nexus"].decisions)

    return app


@contextlib.asynccontextmanager
async def gateway(
    client: UpstreamClient, targets: list[Target], policy: UpstreamPolicy | None = None
) -> AsyncIterator[tuple[str, RecordingObserver, list[Any]]]:
    observer, decisions = RecordingObserver(), []
    app = ws_gateway(ReverseProxy(client=client), FirstSelector(targets), observer, decisions, policy)
    async with serve(app, proxy_headers=False) as url:
        yield url.replace("http://", "ws://"), observer, decisions


async def test_messages_are_relayed_both_ways(upstream_client: UpstreamClient) -> None:
    upstream = UpstreamApp(name="a")
    async with (
        serve(upstream) as url,
        gateway(upstream_client, [Target("a", url)]) as (ws_url, observer, decisions),
        aiohttp.ClientSession() as session,
    ):
        async with session.ws_connect(f"{ws_url}/chat?room=1") as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=5) == "hello"
            await ws.send_bytes(b"\x00\x01binary")
            assert await ws.receive_bytes(timeout=5) == b"\x00\x01binary"
        await until(lambda: len(observer.finished) == 1)
    assert observer.started == ["a"]
    assert observer.finished == [("a", "success", 101)]
    assert decisions[-1].outcome == "forwarded"
    assert decisions[-1].details["upstream_status"] == 101


async def test_unreachable_upstream_refuses_the_handshake(upstream_client: UpstreamClient) -> None:
    dead = Target("dead", f"http://127.0.0.1:{free_port()}")
    async with (
        gateway(upstream_client, [dead]) as (ws_url, observer, decisions),
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{ws_url}/chat")
    assert refused.value.status == 502
    assert decisions[-1].reason == "connect"
    assert observer.finished == [("dead", "connect_error", None)] * 2  # tried again: the only target


async def test_handshake_shifts_to_another_target_on_connect_failure(upstream_client: UpstreamClient) -> None:
    upstream = UpstreamApp(name="b")
    policy = UpstreamPolicy(service="ws", retry=RetryPolicy(attempts=2))
    async with serve(upstream) as url:
        targets = [Target("dead", f"http://127.0.0.1:{free_port()}"), Target("b", url)]
        async with (
            gateway(upstream_client, targets, policy) as (ws_url, observer, decisions),
            aiohttp.ClientSession() as session,
            session.ws_connect(f"{ws_url}/chat") as ws,
        ):
            await ws.send_str("again")
            assert await ws.receive_str(timeout=5) == "again"
    assert observer.started == ["dead", "b"]
    assert decisions[-1].details["retries"] == 1


async def test_no_target_refuses_with_503(upstream_client: UpstreamClient) -> None:
    async with (
        gateway(upstream_client, []) as (ws_url, _, decisions),
        aiohttp.ClientSession() as session,
    ):
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(f"{ws_url}/chat")
    assert refused.value.status == 503
    assert decisions[-1].reason == "no_target"


async def test_forward_websocket_refuses_http_scopes(upstream_client: UpstreamClient) -> None:
    proxy = ReverseProxy(client=upstream_client)

    async def receive() -> Any:
        return {"type": "http.request"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(ValueError, match="websocket scopes"):
        await proxy.forward_websocket(
            {"type": "http"},
            receive,
            send,
            selector=ListSelector([]),
            policy=UpstreamPolicy(service="s"),
            path="/",
        )


async def closing_ws_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "websocket":
        return
    await receive()
    await send({"type": "websocket.accept", "subprotocol": "chat.v2"})
    await send({"type": "websocket.send", "text": "bye"})
    await send({"type": "websocket.close", "code": 4001})


async def test_upstream_close_code_and_subprotocol_reach_the_client(upstream_client: UpstreamClient) -> None:
    async with (
        serve(closing_ws_upstream) as url,
        gateway(upstream_client, [Target("a", url)]) as (ws_url, observer, _),
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{ws_url}/chat", protocols=["chat.v1", "chat.v2"]) as ws,
    ):
        assert ws.protocol == "chat.v2"
        assert await ws.receive_str(timeout=5) == "bye"
        closing = await ws.receive(timeout=5)
        assert closing.type == aiohttp.WSMsgType.CLOSE
        assert ws.close_code == 4001
        await until(lambda: len(observer.finished) == 1)


async def test_client_close_closes_the_upstream_websocket(upstream_client: UpstreamClient) -> None:
    closed = asyncio.Event()

    async def upstream(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            return
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] != "websocket.disconnect":
            pass
        closed.set()

    async with (
        serve(upstream) as url,
        gateway(upstream_client, [Target("a", url)]) as (ws_url, _, _),
        aiohttp.ClientSession() as session,
    ):
        ws = await session.ws_connect(f"{ws_url}/chat")
        await ws.close(code=4002)
        await asyncio.wait_for(closed.wait(), 5)
