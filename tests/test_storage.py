import pytest

from nexus_middleware.clock import ManualClock, SystemClock
from nexus_middleware.errors import ConfigurationError, StorageUnavailableError
from nexus_middleware.storage import KeyValueStore, MemoryStore, RedisStore, store_from_url


async def test_memory_store_expiry_and_bound(manual_clock: ManualClock) -> None:
    store = MemoryStore(max_entries=2, clock=manual_clock)
    assert isinstance(store, KeyValueStore)
    await store.set("a", b"1", ttl=10)
    await store.set("b", b"2")
    assert await store.get("a") == b"1"
    manual_clock.advance(10)
    assert await store.get("a") is None
    await store.set("c", b"3")
    await store.set("d", b"4")
    assert await store.get("b") is None  # evicted: oldest write beyond max_entries
    assert await store.get("d") == b"4"
    await store.delete("d")
    await store.delete("missing")
    assert await store.get("d") is None
    assert "entries=1" in repr(store)
    await store.aclose()
    assert await store.get("c") is None
    with pytest.raises(ConfigurationError):
        MemoryStore(max_entries=0)


async def test_redis_store_round_trip_and_ttl(redis_url: str, redis_prefix: str, redis_client) -> None:
    store = RedisStore(redis_client, prefix=redis_prefix)
    await store.set("k", b"v")
    await store.set("t", b"x", ttl=60)
    assert await store.get("k") == b"v"
    assert 0 < await redis_client.pttl(redis_prefix + "t") <= 60_000
    await store.delete("k")
    assert await store.get("k") is None
    assert redis_prefix in repr(store)
    assert store.client is redis_client


async def test_redis_store_from_url_owns_its_client(redis_url: str, redis_prefix: str, redis_client) -> None:
    store = store_from_url(redis_url, prefix=redis_prefix)
    assert isinstance(store, RedisStore)
    await store.set("k", b"v", ttl=5)
    assert await redis_client.get(redis_prefix + "k") == b"v"
    await store.aclose()


async def test_redis_store_outage_raises_storage_unavailable(redis_server_factory) -> None:
    server = redis_server_factory()
    store = RedisStore.from_url(server.url)
    await store.set("k", b"v")
    server.stop()
    with pytest.raises(StorageUnavailableError):
        await store.get("k")
    await store.aclose()


def test_store_from_url_memory_and_errors() -> None:
    assert isinstance(store_from_url("memory://"), MemoryStore)
    with pytest.raises(ConfigurationError):
        store_from_url("mongodb://x")


def test_system_clock_and_manual_clock() -> None:
    clock = SystemClock()
    assert clock.monotonic() > 0 and clock.time() > 1_600_000_000
    assert repr(clock) == "SystemClock()"
    manual = ManualClock(monotonic=5, wall=10)
    manual.advance(1.5)
    assert (manual.monotonic(), manual.time()) == (6.5, 11.5)
    assert "6.5" in repr(manual)
    with pytest.raises(ValueError):
        manual.advance(-1)
