"""The registry: static targets from the config, dynamic ones through a store (memory and real Redis)."""

from typing import Any

import pytest

from nexus_middleware.errors import ConfigurationError
from sample_gateway.config import parse_config
from sample_gateway.contracts import Target
from sample_gateway.registry import (
    MemoryRegistryStore,
    RedisRegistryStore,
    Registry,
    RegistryStore,
    TargetConflictError,
    UnknownServiceError,
    build_target,
)


def config() -> Any:
    return parse_config(
        {
            "services": [
                {"name": "users", "targets": [{"url": "http://127.0.0.1:9001", "id": "u1", "version": "v1"}]},
                {"name": "orders", "targets": [{"url": "http://127.0.0.1:9002"}]},
            ],
            "admin": {"api_keys": ["k"]},
        }
    )


async def exercise(store: RegistryStore) -> None:
    registry = Registry.from_config(config(), store=store)
    assert [t.id for t in registry.targets("users")] == ["u1"]
    assert [t.id for t in registry.targets("orders")] == ["127.0.0.1:9002"]  # default id: host:port
    generation = registry.generation
    extra = Target(
        id="u2", url="http://127.0.0.1:9003", weight=3, version="v2", zone="b", tags=frozenset({"x"})
    )
    await registry.register("users", extra)
    assert registry.generation > generation
    assert [t.id for t in registry.targets("users")] == ["u1", "u2"]

    # A second instance sharing the store sees the target after a refresh.
    other = Registry.from_config(config(), store=store)
    await other.refresh()
    assert other.targets("users")[1] == extra

    with pytest.raises(TargetConflictError):
        await registry.register("orders", Target(id="u2", url="http://127.0.0.1:9004"))
    with pytest.raises(TargetConflictError):
        await registry.deregister("users", "u1")  # static: change the config instead
    with pytest.raises(UnknownServiceError):
        await registry.register("nope", extra)

    assert await registry.deregister("users", "u2") is True
    assert await registry.deregister("users", "u2") is False
    assert [t.id for t in registry.targets("users")] == ["u1"]
    await other.refresh()
    assert [t.id for t in other.targets("users")] == ["u1"]
    assert registry.targets("unknown") == ()


async def test_memory_store() -> None:
    await exercise(MemoryRegistryStore())


async def test_redis_store_is_shared_between_instances(redis_client: Any, redis_prefix: str) -> None:
    store = RedisRegistryStore(redis_client, prefix=redis_prefix)
    await exercise(store)
    await store.put("users", Target(id="kept", url="http://127.0.0.1:9020"))
    assert await redis_client.hkeys(redis_prefix + "registry") == [b"users\x1fkept"]


async def test_reload_keeps_dynamic_targets() -> None:
    registry = Registry.from_config(config())
    await registry.register("users", Target(id="dyn", url="http://127.0.0.1:9010"))
    registry.replace_static({"users": [Target(id="new", url="http://127.0.0.1:9011")]})
    assert [t.id for t in registry.targets("users")] == ["new", "dyn"]
    assert registry.services() == ["users"]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"url": "http://h:1/x"}, "url"),
        ({"url": "http://h:1", "weight": -1}, "weight"),
        ({"weight": 1}, "url"),
        ({"url": "http://h:1", "colour": "red"}, "colour"),
    ],
)
def test_build_target_validates_like_the_config(body: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigurationError, match=problem):
        build_target(body)


def test_build_target_defaults() -> None:
    target = build_target({"url": "https://h", "tags": ["a"]})
    assert (target.id, target.url, target.weight, target.tags) == ("h:443", "https://h", 1, frozenset({"a"}))


async def test_two_gateway_instances_share_registrations_through_redis(
    redis_client: Any, redis_prefix: str
) -> None:
    from sample_gateway.runtime import GatewayRuntime

    first = GatewayRuntime(config(), registry_store=RedisRegistryStore(redis_client, prefix=redis_prefix))
    second = GatewayRuntime(config(), registry_store=RedisRegistryStore(redis_client, prefix=redis_prefix))
    await first.registry.register("users", Target(id="shared", url="http://127.0.0.1:9030", version="v1"))
    first.sync_targets()
    await second.refresh_registry()
    assert [t.id for t in second.tracker.service("users").healthy()] == ["u1", "shared"]
    await second.registry.deregister("users", "shared")
    await first.refresh_registry()
    assert [t.id for t in first.tracker.service("users").healthy()] == ["u1"]
