"""Shared fixtures: a real Redis (never a mock), private redis-servers, a real upstream, a manual clock."""

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from nexus_middleware.clock import ManualClock
from tests.support.servers import RedisServer, redis_ping, serve
from tests.support.upstream import UpstreamApp

IN_CI = os.environ.get("CI", "").lower() == "true"


def _unavailable(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"Redis is required under CI=true: {reason}", pytrace=False)
    pytest.skip(reason)


def _answers(url: str) -> bool:
    parts = urlsplit(url)
    return redis_ping(parts.hostname or "127.0.0.1", parts.port or 6379)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL: NEXUS_TEST_REDIS_URL, else 127.0.0.1:6379, else a redis-server started for the session."""
    configured = os.environ.get("NEXUS_TEST_REDIS_URL")
    if configured:
        if not _answers(configured):
            _unavailable(f"NEXUS_TEST_REDIS_URL={configured} does not answer PING")
        yield configured
        return
    if redis_ping("127.0.0.1", 6379):
        yield "redis://127.0.0.1:6379/0"
        return
    try:
        server = RedisServer(tmp_path_factory.mktemp("redis"))
        server.start()
    except RuntimeError as exc:
        _unavailable(f"no Redis at 127.0.0.1:6379 and none could be started: {exc}")
        return
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to the test; everything under it is deleted afterwards."""
    return f"nexus-test:{uuid.uuid4().hex}:"


@pytest.fixture
async def redis_client(redis_url: str, redis_prefix: str) -> AsyncIterator["object"]:
    """A redis.asyncio client on the test Redis. Tests write only keys starting with `redis_prefix`."""
    from redis.asyncio import Redis

    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        keys = [key async for key in client.scan_iter(match=redis_prefix + "*", count=500)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[type[RedisServer] | object]:
    """Starts private redis-servers on free ports (for tests that kill Redis); all stopped afterwards."""
    servers: list[RedisServer] = []

    def start() -> RedisServer:
        try:
            server = RedisServer(tmp_path)
        except RuntimeError as exc:
            _unavailable(str(exc))
            raise
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


@dataclass
class Upstream:
    url: str
    app: UpstreamApp


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    """A real upstream served by uvicorn on a free loopback port."""
    app = UpstreamApp()
    async with serve(app) as url:
        yield Upstream(url, app)


@pytest.fixture
def manual_clock() -> ManualClock:
    return ManualClock()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        if {"redis_url", "redis_client", "redis_server_factory"} & set(fixtures):
            item.add_marker(pytest.mark.redis)
        if "upstream" in fixtures:
            item.add_marker(pytest.mark.e2e)
