"""RateLimitMiddleware per-request cost under its limit: memory storage and a real Redis (a private
redis-server on loopback), next to the reference rows. The Redis row also checks the round trips: one
EVALSHA per request, counted with `INFO commandstats` on the private server."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks.conftest import BASELINE, BATCH, Driver, NoopMiddleware, bare_app, bench, make_http_scope
from nexus_middleware import Quota, RateLimitMiddleware, RateLimitPolicy
from nexus_middleware.types import Message
from tests.support.servers import RedisServer

UNDER_LIMIT = "1000000000/hour"


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    try:
        server = RedisServer(tmp_path)
        server.start()
    except RuntimeError as exc:
        pytest.skip(f"no redis-server: {exc}")
    try:
        yield server
    finally:
        server.stop()


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app)


def test_noop_pure_asgi_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app))


@pytest.mark.parametrize("strategy", ["sliding-window-counter", "moving-window", "fixed-window"])
def test_ratelimit_memory(benchmark: Any, driver: Driver, strategy: str) -> None:
    policy = RateLimitPolicy("api", UNDER_LIMIT, key="client", strategy=strategy)  # type: ignore[arg-type]
    bench(benchmark, driver, f"ratelimit memory {strategy}", RateLimitMiddleware(bare_app, policies=[policy]))


def test_ratelimit_memory_hierarchical(benchmark: Any, driver: Driver) -> None:
    policy = RateLimitPolicy(
        "api",
        f"{UNDER_LIMIT};1000000000/day",
        key="client",
        quotas=(Quota("site", UNDER_LIMIT, key="global"),),
    )
    bench(
        benchmark,
        driver,
        "ratelimit memory 2 quotas, 3 windows",
        RateLimitMiddleware(bare_app, policies=[policy]),
    )


def test_ratelimit_redis(benchmark: Any, driver: Driver, private_redis: RedisServer) -> None:
    from redis.asyncio import Redis

    policy = RateLimitPolicy("api", UNDER_LIMIT, key="client")
    app = RateLimitMiddleware(bare_app, policies=[policy], storage=private_redis.url)
    bench(benchmark, driver, "ratelimit redis sliding-window-counter", app)

    async def round_trips() -> int:
        client = Redis.from_url(private_redis.url)
        try:
            await client.config_resetstat()
            for _ in range(BATCH):
                await app(make_http_scope(), receive, send)
            stats = await client.info("commandstats")
            return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))
        finally:
            await client.aclose()

    calls = driver.loop.run_until_complete(round_trips())
    benchmark.extra_info["redis_round_trips_per_request"] = calls / BATCH
    assert calls == BATCH  # one script call per request, never more
    driver.loop.run_until_complete(app.aclose())


async def receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def send(message: Message) -> None:
    return None
