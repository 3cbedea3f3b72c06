"""RateLimitMiddleware on a real Redis: shared limits across apps, atomic hierarchical quotas, concurrency,
one round trip per request, and a Redis killed mid-run under each outage policy (with the store breaker)."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from nexus_middleware import ManualClock, Principal
from nexus_middleware.context import get_context
from nexus_middleware.ratelimit import RateLimitMiddleware
from nexus_middleware.ratelimit_policy import Quota, RateLimitEvent, RateLimitOptions, RateLimitPolicy
from nexus_middleware.structured_fields import parse_list
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.test_ratelimit import (
    STRATEGIES,
    HeldApp,
    call,
    hundred_against_fifty,
    quota_policies,
    service_limits,
)


def redis_limiter(
    storage: Any, prefix: str, *policies: RateLimitPolicy, **options: Any
) -> RateLimitMiddleware:
    clock = options.pop("clock", None) or ManualClock()
    hook = options.pop("event_hook", None)
    return RateLimitMiddleware(
        ok_app,
        policies=list(policies),
        storage=storage,
        options=RateLimitOptions(key_prefix=prefix, **options),
        clock=clock,
        event_hook=hook,
    )


async def test_two_apps_share_one_limit(redis_url: str, redis_client: Any, redis_prefix: str) -> None:
    policy = RateLimitPolicy("api", "5/hour", key="client")
    first = redis_limiter(redis_url, redis_prefix, policy)
    second = redis_limiter(redis_url, redis_prefix, policy)
    try:
        statuses = [(await call(app)).status for app in [first, second] * 4]
        assert statuses == [200] * 5 + [429] * 3
        keys = [key async for key in redis_client.scan_iter(match=redis_prefix + "*")]
        assert keys and all(key.decode().startswith(redis_prefix + "api:ip:203.0.113.7:") for key in keys)
    finally:
        await first.aclose()
        await second.aclose()


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_strategies_on_redis(redis_client: Any, redis_prefix: str, strategy: str) -> None:
    app = redis_limiter(
        redis_client, redis_prefix, RateLimitPolicy("api", "3/hour;10/day", strategy=strategy)
    )  # type: ignore[arg-type]
    recorded = [await call(app) for _ in range(4)]
    assert [r.status for r in recorded] == [200, 200, 200, 429]
    assert [service_limits(r)["api-3600s"]["r"] for r in recorded[:3]] == [2, 1, 0]
    assert service_limits(recorded[2])["api-86400s"]["r"] == 7
    refused = recorded[3]
    assert refused.json()["violated-policies"] == ["api-3600s"]
    t = service_limits(refused)["api-3600s"]["t"]
    assert 0 < t <= int(refused.header("retry-after") or 0) <= 3601
    if (
        strategy != "sliding-window-counter"
    ):  # the first hit leaves the window (or the window ends) in an hour
        assert t >= 3599
    # the refusal consumed nothing: the hour window still shows 7
    assert quota_policies(refused)["api-86400s"]["q"] == 10
    keys = [key async for key in redis_client.scan_iter(match=redis_prefix + "*")]
    assert keys


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_hierarchical_all_or_nothing_is_atomic_in_redis(
    redis_client: Any, redis_prefix: str, strategy: str
) -> None:
    policy = RateLimitPolicy(
        "api",
        strategy=strategy,  # type: ignore[arg-type]
        quotas=(Quota("user", "2/hour", key="principal"), Quota("org", "3/hour", key="tenant")),
    )
    app = redis_limiter(redis_client, redis_prefix, policy)
    alice = Principal("alice", method="jwt", tenant="acme")
    bob = Principal("bob", method="jwt", tenant="acme")
    assert [(await call(app, principal=alice)).status for _ in range(4)] == [200, 200, 429, 429]
    first = await call(app, principal=bob)
    assert (
        first.status == 200
        and service_limits(first)["org"]["r"] == 0
        and service_limits(first)["user"]["r"] == 1
    )
    refused = await call(app, principal=bob)
    assert refused.status == 429 and refused.json()["violated-policies"] == ["org"]
    carol = Principal("carol", method="jwt", tenant="other")
    assert service_limits(await call(app, principal=carol))["user"]["r"] == 1


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_hundred_concurrent_requests_admit_exactly_fifty(
    redis_client: Any, redis_prefix: str, strategy: str
) -> None:
    held = HeldApp(50)
    app = RateLimitMiddleware(
        held,
        policies=[RateLimitPolicy("api", "50/hour", key="client", strategy=strategy)],  # type: ignore[arg-type]
        storage=redis_client,
        options=RateLimitOptions(key_prefix=redis_prefix, store_timeout=5.0),
    )
    await hundred_against_fifty(app, held)


async def _evalsha_calls(client: Any) -> int:
    stats = await client.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval"))


async def test_one_round_trip_per_request(redis_server_factory: Any, redis_prefix: str) -> None:
    from redis.asyncio import Redis

    server = redis_server_factory()  # a private server, so the command counts are ours alone
    client = Redis.from_url(server.url)
    try:
        app = redis_limiter(
            server.url,
            redis_prefix,
            RateLimitPolicy("api", "100/second;1000/hour", quotas=(Quota("org", "5000/hour", key="global"),)),
        )
        await call(app)  # loads the script
        await client.config_resetstat()
        for _ in range(20):
            assert (await call(app)).status == 200
        stats = await client.info("commandstats")
        scripted = {name: int(value["calls"]) for name, value in stats.items() if name.startswith("cmdstat_")}
        assert scripted.pop("cmdstat_evalsha") == 20
        # Everything else ran inside the script (Redis counts those too) or is this test's own INFO/CONFIG.
        inside_script = {
            "time",
            "get",
            "incrby",
            "pttl",
            "pexpire",
            "zremrangebyscore",
            "zcard",
            "zadd",
            "zrevrange",
        }
        assert {name.removeprefix("cmdstat_") for name in scripted} <= inside_script | {
            "info",
            "config|resetstat",
        }
        assert not {"cmdstat_eval", "cmdstat_script|load"} & set(scripted)
        await app.aclose()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("mode", "while_down"),
    [("fail_open", 200), ("fail_closed", 503), ("local_fallback", 200)],
)
async def test_redis_killed_mid_run(
    redis_server_factory: Any, redis_prefix: str, mode: str, while_down: int
) -> None:
    server = redis_server_factory()
    clock = ManualClock()
    events: list[RateLimitEvent] = []

    async def hook(event: RateLimitEvent) -> None:
        events.append(event)

    policy = RateLimitPolicy("api", "4/minute", key="client", strategy="fixed-window", on_store_error=mode)  # type: ignore[arg-type]
    app = redis_limiter(
        server.url, redis_prefix, policy, clock=clock, event_hook=hook, instances=2, breaker_cooldown=10
    )
    try:
        healthy = await call(app)
        assert healthy.status == 200 and service_limits(healthy)["api"]["r"] == 3
        server.stop()
        scope = make_scope("/api/items")
        down = await run_asgi(app, scope)
        assert down.status == while_down
        decision = get_context(scope).decision("ratelimit")
        assert decision is not None and decision.outcome == "degraded" and decision.details["mode"] == mode
        assert events[-1].outcome == "degraded" and events[-1].details["mode"] == mode
        if mode == "fail_open":
            assert down.header("ratelimit") is None
        elif mode == "fail_closed":
            assert down.header("content-type") == "application/problem+json"
            assert int(down.header("retry-after") or 0) == 10
        else:
            # an in-memory limiter with the limit shared between 2 instances: 4 / 2 = 2 per instance
            assert quota_policies(down)["api"]["q"] == 2 and service_limits(down)["api"]["r"] == 1
            assert (await call(app)).status == 200
            assert (await call(app)).status == 429
        server.start()
        clock.advance(10)  # the breaker lets one trial through after its cooldown
        recovered = await call(app)
        assert recovered.status == 200 and service_limits(recovered)["api"]["r"] >= 0
        assert quota_policies(recovered)["api"]["q"] == 4
    finally:
        await app.aclose()


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server that accepts and reads but never answers; counts the connections clients open."""
    seen = [0]
    writers: list[asyncio.StreamWriter] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen[0] += 1
        writers.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0", seen
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_slow_redis_costs_one_timeout_per_cooldown(redis_prefix: str) -> None:
    clock = ManualClock()
    async with black_hole() as (url, seen):
        app = redis_limiter(
            url,
            redis_prefix,
            RateLimitPolicy("api", "4/minute"),
            clock=clock,
            store_timeout=0.2,
            breaker_cooldown=30,
        )
        started = time.monotonic()
        first = await call(app)
        assert first.status == 200 and first.header("ratelimit") is None  # fail_open
        assert time.monotonic() - started >= 0.2
        started = time.monotonic()
        for _ in range(20):
            assert (await call(app)).status == 200
        assert time.monotonic() - started < 0.2 * 5  # no store call while the breaker is open
        assert seen[0] == 1
        clock.advance(30)
        await asyncio.gather(*(call(app) for _ in range(5)))  # one trial; the other four fail fast
        assert seen[0] == 2
        await app.aclose()


async def test_limits_storage_from_string_is_accepted(redis_url: str, redis_prefix: str) -> None:
    from limits.storage import storage_from_string

    storage = storage_from_string("async+" + redis_url, implementation="redispy")
    app = redis_limiter(storage, redis_prefix, RateLimitPolicy("api", "1/hour"))
    try:
        assert [(await call(app)).status for _ in range(2)] == [200, 429]
        assert "RedisLimiterBackend" in repr(app)
        items = parse_list((await call(app)).header_values("ratelimit"))
        assert items[0].params["r"] == 0
    finally:
        client = storage.bridge.get_connection()  # type: ignore[attr-defined]
        keys = [key async for key in client.scan_iter(match=redis_prefix + "*")]
        await client.delete(*keys)
        await client.aclose()
