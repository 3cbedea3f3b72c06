"""The harness itself: real Redis and a real upstream answer as the fixtures promise."""

import hashlib

import httpx
import pytest

from tests.conftest import Upstream
from tests.support.servers import closing_server


async def test_redis_client_isolates_and_cleans_keys(redis_client, redis_prefix: str) -> None:
    await redis_client.set(redis_prefix + "a", b"1")
    assert await redis_client.get(redis_prefix + "a") == b"1"


async def test_private_redis_server_can_be_killed(redis_server_factory) -> None:
    from redis.asyncio import Redis
    from redis.exceptions import ConnectionError as RedisConnectionError

    server = redis_server_factory()
    client = Redis.from_url(server.url, socket_connect_timeout=0.5)
    try:
        assert await client.ping() is True
        server.stop()
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()


async def test_upstream_echo_reports_method_path_and_body(upstream: Upstream) -> None:
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        response = await client.post("/echo/a%2Fb?x=1", content=b"payload", headers={"x-test": "1"})
    data = response.json()
    assert response.status_code == 200
    assert data["method"] == "POST"
    assert data["raw_path"] == "/echo/a%2Fb"
    assert data["query_string"] == "x=1"
    assert data["body_sha256"] == hashlib.sha256(b"payload").hexdigest()
    assert ["x-test", "1"] in data["headers"]
    assert upstream.app.received == [("POST", "/echo/a%2Fb")]


async def test_upstream_status_stream_gzip_and_reset(upstream: Upstream) -> None:
    async with httpx.AsyncClient(base_url=upstream.url) as client:
        assert (await client.get("/status/503")).status_code == 503
        streamed = await client.get("/stream?chunks=3&size=5")
        assert streamed.content == b"x" * 15
        gz = await client.get("/gzip", headers={"accept-encoding": "identity"})
        assert gz.headers["content-encoding"] == "gzip"
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/reset")


async def test_closing_server_drops_connections() -> None:
    async with closing_server() as url, httpx.AsyncClient() as client:
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(url)
