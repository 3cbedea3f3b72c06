"""Storage backends for state that outgrows one process.

A small async key-value protocol, with an in-memory store (the embedded default) and a Redis store on
redis-py's `redis.asyncio` (the one Redis client of the suite, an optional dependency imported lazily).
Layers with richer needs (rate limits through `limits`, breaker state) build on the same Redis client.
Redis failures surface as `StorageUnavailableError`, so every layer applies its own outage policy.
"""

from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.errors import ConfigurationError, StorageError, StorageUnavailableError

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "KeyValueStore",
    "MemoryStore",
    "RedisStore",
    "redis_client_from_url",
    "store_from_url",
]


@runtime_checkable
class KeyValueStore(Protocol):
    """An async byte store with optional per-key expiry (seconds)."""

    async def get(self, key: str) -> bytes | None:
        """The value, or None when absent or expired."""
        ...

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        """Store `value`, expiring after `ttl` seconds when given."""
        ...

    async def delete(self, key: str) -> None:
        """Remove `key`; absent keys are not an error."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used after this."""
        ...


class MemoryStore:
    """A bounded in-process store: least recently written entries are evicted beyond `max_entries`."""

    def __init__(self, *, max_entries: int = 100_000, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_entries <= 0:
            raise ConfigurationError("max_entries must be positive")
        self._max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[bytes, float | None]] = OrderedDict()

    def __repr__(self) -> str:
        return f"MemoryStore(max_entries={self._max_entries}, entries={len(self._data)})"

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        if item is None:
            return None
        value, expires = item
        if expires is not None and expires <= self._clock.monotonic():
            del self._data[key]
            return None
        return value

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        expires = None if ttl is None else self._clock.monotonic() + ttl
        self._data[key] = (value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._max_entries:
            self._data.popitem(last=False)

    async def delete(self, key: str) -> None:
        self._data.pop(key, None)

    async def aclose(self) -> None:
        self._data.clear()


def redis_client_from_url(url: str, **options: Any) -> "Redis":
    """A `redis.asyncio` client for `url` (`redis://`, `rediss://`, `unix://`); needs the `redis` extra."""
    try:
        from redis.asyncio import Redis
    except ImportError as exc:  # pragma: no cover - exercised only without the extra installed
        raise ConfigurationError(
            "Redis storage needs redis-py: pip install 'nexus-middleware[redis]'"
        ) from exc
    options.setdefault("socket_connect_timeout", 1.0)
    options.setdefault("socket_timeout", 1.0)
    return Redis.from_url(url, **options)


class RedisStore:
    """A `KeyValueStore` on Redis. Keys are prefixed so several stores share one database safely."""

    def __init__(self, client: "Redis", *, prefix: str = "nexus:", owns_client: bool = False) -> None:
        self._client = client
        self._prefix = prefix
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "nexus:") -> "RedisStore":
        return cls(redis_client_from_url(url), prefix=prefix, owns_client=True)

    def __repr__(self) -> str:
        return f"RedisStore(prefix={self._prefix!r})"

    @property
    def client(self) -> "Redis":
        return self._client

    async def get(self, key: str) -> bytes | None:
        value = await self._call("get", self._prefix + key)
        return None if value is None else bytes(value)

    async def set(self, key: str, value: bytes, *, ttl: float | None = None) -> None:
        if ttl is None:
            await self._call("set", self._prefix + key, value)
        else:
            await self._call("set", self._prefix + key, value, px=max(1, int(ttl * 1000)))

    async def delete(self, key: str) -> None:
        await self._call("delete", self._prefix + key)

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    async def _call(self, command: str, *args: Any, **kwargs: Any) -> Any:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        try:
            return await getattr(self._client, command)(*args, **kwargs)
        except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
            raise StorageUnavailableError(f"redis {command} failed: {exc}") from exc
        except RedisError as exc:
            raise StorageError(f"redis {command} failed: {exc}") from exc


def store_from_url(url: str, *, prefix: str = "nexus:", clock: Clock = SYSTEM_CLOCK) -> KeyValueStore:
    """`memory://` or a Redis URL, as a `KeyValueStore`."""
    if url in ("memory://", "memory"):
        return MemoryStore(clock=clock)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisStore.from_url(url, prefix=prefix)
    raise ConfigurationError(f"unsupported storage URL {url!r}: use memory:// or redis://")
