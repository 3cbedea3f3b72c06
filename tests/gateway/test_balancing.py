"""Each balancing strategy's distribution, through the `TargetSelector` the proxy calls."""

import random
from collections import Counter
from typing import Any

import pytest

from nexus_middleware.clock import ManualClock
from sample_gateway.balancing import ServiceSelector, create_balancer
from sample_gateway.config import LoadBalancingConfig
from sample_gateway.contracts import Target
from sample_gateway.health import OutlierPolicy, ServiceHealth
from tests.support.asgi import make_scope

TARGETS = (
    Target(id="a", url="http://127.0.0.1:9001", weight=5, version="v1"),
    Target(id="b", url="http://127.0.0.1:9002", weight=1, version="v1"),
    Target(id="c", url="http://127.0.0.1:9003", weight=1, version="v2"),
)


def selector(
    strategy: str, *, version: str | None = None, **options: Any
) -> tuple[ServiceSelector, ServiceHealth]:
    health = ServiceHealth("svc", outlier=OutlierPolicy(consecutive_failures=1), clock=ManualClock())
    health.sync(TARGETS)
    config = LoadBalancingConfig.model_validate({"strategy": strategy, **options})
    balancer = create_balancer(config, health, rng=random.Random(7))
    return ServiceSelector(health, balancer, version=version), health


async def picks(sel: ServiceSelector, count: int, scope: Any = None, **kwargs: Any) -> list[str]:
    result = []
    for _ in range(count):
        target = await sel.select(scope if scope is not None else make_scope("/"), **kwargs)
        assert target is not None
        result.append(target.id)
    return result


async def test_round_robin_is_even_and_ignores_weights() -> None:
    sel, _ = selector("round_robin")
    assert await picks(sel, 6) == ["a", "b", "c", "a", "b", "c"]


async def test_smooth_weighted_round_robin_is_nginx_order() -> None:
    sel, _ = selector("weighted_round_robin")
    order = await picks(sel, 14)
    assert order[:7] == ["a", "a", "b", "a", "c", "a", "a"]  # nginx's documented sequence for 5:1:1
    assert Counter(order) == {"a": 10, "b": 2, "c": 2}


async def test_least_connections_prefers_idle_targets() -> None:
    sel, health = selector("least_connections")
    # Idle pool: rotates evenly.
    assert Counter(await picks(sel, 30)) == {"a": 10, "b": 10, "c": 10}
    # a holds 2 requests per weight unit less than b: b and c are busy, so a wins every time.
    for _ in range(3):
        health.attempt_started(TARGETS[1])
        health.attempt_started(TARGETS[2])
    assert set(await picks(sel, 10)) == {"a"}
    # Weight counts: a at 5 in flight (load 1.0) still beats b and c at 3 (load 3.0).
    for _ in range(5):
        health.attempt_started(TARGETS[0])
    assert set(await picks(sel, 5)) == {"a"}


async def test_consistent_hash_keeps_a_client_and_moves_few_keys() -> None:
    sel, health = selector("consistent_hash", hash_on="header", hash_key="x-user")
    scopes = [make_scope("/", headers=[("x-user", f"user-{i}")]) for i in range(600)]
    first = [(await sel.select(scope)) for scope in scopes]
    again = [(await sel.select(scope)) for scope in scopes]
    assert first == again  # sticky
    counts = Counter(t.id for t in first if t is not None)
    # Weighted virtual nodes: a (weight 5) gets roughly 5/7 of the keys.
    assert 0.6 < counts["a"] / 600 < 0.8 and counts["b"] > 40 and counts["c"] > 40
    # Eject b: only b's keys move.
    health.attempt_finished(TARGETS[1], outcome="connect_error", status=None, latency=0.1)
    after = [(await sel.select(scope)) for scope in scopes]
    moved = [i for i in range(600) if first[i] != after[i]]
    assert all(first[i] is not None and first[i].id == "b" for i in moved)  # type: ignore[union-attr]
    assert len(moved) == counts["b"]


@pytest.mark.parametrize(
    ("options", "scope"),
    [
        ({"hash_on": "client"}, make_scope("/", client=("203.0.113.9", 5000))),
        ({"hash_on": "cookie", "hash_key": "sid"}, make_scope("/", headers=[("cookie", "a=1; sid=xyz")])),
    ],
)
async def test_consistent_hash_on_client_and_cookie(options: dict[str, Any], scope: Any) -> None:
    sel, _ = selector("consistent_hash", **options)
    assert len(set(await picks(sel, 20, scope))) == 1


async def test_consistent_hash_without_a_key_spreads() -> None:
    sel, _ = selector("consistent_hash", hash_on="cookie", hash_key="sid")
    assert set(await picks(sel, 3, make_scope("/", headers=[("cookie", "bad cookie ;;= ")]))) == {
        "a",
        "b",
        "c",
    }


async def test_power_of_two_avoids_slow_targets() -> None:
    sel, health = selector("power_of_two")
    for target, latency in zip(TARGETS, (0.5, 0.01, 0.01), strict=True):
        health.attempt_started(target)
        health.attempt_finished(target, outcome="success", status=200, latency=latency)
    counts = Counter(await picks(sel, 3000))
    # a is slow: it only wins when both draws are a, which never happens (two distinct targets are drawn).
    assert counts["a"] == 0
    assert abs(counts["b"] - counts["c"]) < 300


async def test_version_filter_and_exclude() -> None:
    sel, _ = selector("round_robin", version="v1")
    assert set(await picks(sel, 4)) == {"a", "b"}
    assert set(await picks(sel, 4, exclude=frozenset({"a"}))) == {"b"}
    assert await sel.select(make_scope("/"), exclude=frozenset({"a", "b"})) is None
    v3, _ = selector("round_robin", version="v3")
    assert await v3.select(make_scope("/")) is None
