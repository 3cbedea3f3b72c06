"""The service registry: each service's targets, from the config plus those registered at run time.

Static targets come from the config and change only on reload. Dynamic targets are registered and
deregistered through the admin API and kept in a `RegistryStore`: in memory for one process, or in Redis so
that several gateway instances see the same targets (each instance re-reads the store every
`refresh_interval` seconds; a pub/sub push is the clustering issue's job).

The request path never touches the store: `targets(service)` reads a local snapshot rebuilt only when
something changed, and `generation` tells the health tracker and selectors to re-read it.
"""

import json
from collections.abc import Awaitable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from urllib.parse import urlsplit

from nexus_middleware.errors import ConfigurationError, StorageUnavailableError
from sample_gateway.contracts import Target

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from sample_gateway.config import GatewayConfig, TargetConfig

__all__ = [
    "MemoryRegistryStore",
    "RedisRegistryStore",
    "Registry",
    "RegistryStore",
    "TargetConflictError",
    "UnknownServiceError",
    "registry_store_from_url",
    "target_from_dict",
    "target_to_dict",
]


class UnknownServiceError(ConfigurationError, KeyError):
    """The service is not in the configuration."""


class TargetConflictError(ConfigurationError):
    """The target id is already used, or the target is static and cannot be deregistered."""


def default_target_id(url: str) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def target_to_dict(target: Target) -> dict[str, Any]:
    return {
        "id": target.id,
        "url": target.url,
        "weight": target.weight,
        "version": target.version,
        "zone": target.zone,
        "tags": sorted(target.tags),
        "metadata": dict(target.metadata),
    }


def target_from_dict(data: Mapping[str, Any]) -> Target:
    return Target(
        id=str(data["id"]),
        url=str(data["url"]),
        weight=int(data.get("weight", 1)),
        version=data.get("version"),
        zone=data.get("zone"),
        tags=frozenset(data.get("tags") or ()),
        metadata={str(k): str(v) for k, v in (data.get("metadata") or {}).items()},
    )


@runtime_checkable
class RegistryStore(Protocol):
    """Where dynamically registered targets live."""

    async def put(self, service: str, target: Target) -> None:
        """Add or replace `target` (by id) in `service`."""
        ...

    async def remove(self, service: str, target_id: str) -> bool:
        """Remove a target; False when it was not there."""
        ...

    async def load(self) -> dict[str, list[Target]]:
        """Every dynamic target, by service."""
        ...

    async def aclose(self) -> None: ...


class MemoryRegistryStore:
    """Dynamic targets in this process only."""

    def __init__(self) -> None:
        self._targets: dict[str, dict[str, Target]] = {}

    def __repr__(self) -> str:
        return f"MemoryRegistryStore(services={len(self._targets)})"

    async def put(self, service: str, target: Target) -> None:
        self._targets.setdefault(service, {})[target.id] = target

    async def remove(self, service: str, target_id: str) -> bool:
        return self._targets.get(service, {}).pop(target_id, None) is not None

    async def load(self) -> dict[str, list[Target]]:
        return {service: list(targets.values()) for service, targets in self._targets.items() if targets}

    async def aclose(self) -> None:
        return None


class RedisRegistryStore:
    """Dynamic targets in one Redis hash (`<prefix>registry`), shared by every gateway instance."""

    def __init__(self, client: "Redis", *, prefix: str = "nexus:", owns_client: bool = False) -> None:
        self._client = client
        self._key = f"{prefix}registry"
        self._owns_client = owns_client

    def __repr__(self) -> str:
        return f"RedisRegistryStore(key={self._key!r})"

    @staticmethod
    def _field(service: str, target_id: str) -> str:
        return f"{service}\x1f{target_id}"

    async def put(self, service: str, target: Target) -> None:
        value = json.dumps({"service": service, **target_to_dict(target)})
        await self._call(self._client.hset(self._key, self._field(service, target.id), value))

    async def remove(self, service: str, target_id: str) -> bool:
        removed = await self._call(self._client.hdel(self._key, self._field(service, target_id)))
        return bool(removed)

    async def load(self) -> dict[str, list[Target]]:
        raw = await self._call(self._client.hgetall(self._key))
        result: dict[str, list[Target]] = {}
        for value in raw.values():
            data = json.loads(value)
            result.setdefault(str(data["service"]), []).append(target_from_dict(data))
        for targets in result.values():
            targets.sort(key=lambda target: target.id)
        return result

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @staticmethod
    async def _call(pending: Awaitable[Any]) -> Any:
        from redis.exceptions import RedisError

        try:
            return await pending
        except (RedisError, OSError) as exc:
            raise StorageUnavailableError(f"the registry store failed: {exc}") from exc


def registry_store_from_url(url: str, *, prefix: str = "nexus:") -> RegistryStore:
    if url in ("memory://", "memory"):
        return MemoryRegistryStore()
    from nexus_middleware.storage import redis_client_from_url

    return RedisRegistryStore(redis_client_from_url(url), prefix=prefix, owns_client=True)


class Registry:
    """Targets by service: static ones from the config, dynamic ones from the store."""

    def __init__(
        self,
        static: Mapping[str, Sequence[Target]],
        *,
        store: RegistryStore | None = None,
    ) -> None:
        self._store: RegistryStore = store if store is not None else MemoryRegistryStore()
        self._static: dict[str, tuple[Target, ...]] = {}
        self._dynamic: dict[str, tuple[Target, ...]] = {}
        self._snapshot: dict[str, tuple[Target, ...]] = {}
        self.generation = 0
        self.replace_static(static)

    @classmethod
    def from_config(cls, config: "GatewayConfig", *, store: RegistryStore | None = None) -> "Registry":
        return cls(static_targets(config), store=store)

    def __repr__(self) -> str:
        return f"Registry(services={sorted(self._static)}, store={self._store!r})"

    @property
    def store(self) -> RegistryStore:
        return self._store

    def services(self) -> list[str]:
        return list(self._static)

    def targets(self, service: str) -> tuple[Target, ...]:
        """Static then dynamic targets of `service` (empty for an unknown service)."""
        return self._snapshot.get(service, ())

    def is_static(self, service: str, target_id: str) -> bool:
        return any(target.id == target_id for target in self._static.get(service, ()))

    def replace_static(self, static: Mapping[str, Sequence[Target]]) -> None:
        """Adopt a new config's services and targets (on start-up and reload)."""
        self._static = {service: tuple(targets) for service, targets in static.items()}
        self._rebuild()

    async def refresh(self) -> None:
        """Re-read the dynamic targets from the store (other instances may have changed them)."""
        loaded = await self._store.load()
        dynamic = {service: tuple(targets) for service, targets in loaded.items() if service in self._static}
        if dynamic != self._dynamic:
            self._dynamic = dynamic
            self._rebuild()

    async def register(self, service: str, target: Target) -> None:
        if service not in self._static:
            raise UnknownServiceError(f"unknown service {service!r}")
        for name in self._static:
            for existing in self.targets(name):
                if existing.id == target.id and (name != service or self.is_static(name, target.id)):
                    raise TargetConflictError(f"target id {target.id!r} is already used by service {name!r}")
        await self._store.put(service, target)
        current = [t for t in self._dynamic.get(service, ()) if t.id != target.id]
        self._dynamic = {**self._dynamic, service: (*current, target)}
        self._rebuild()

    async def deregister(self, service: str, target_id: str) -> bool:
        if service not in self._static:
            raise UnknownServiceError(f"unknown service {service!r}")
        if self.is_static(service, target_id):
            raise TargetConflictError(
                f"target {target_id!r} comes from the config; change the config instead"
            )
        removed = await self._store.remove(service, target_id)
        remaining = tuple(t for t in self._dynamic.get(service, ()) if t.id != target_id)
        if len(remaining) != len(self._dynamic.get(service, ())):
            removed = True
        self._dynamic = {**self._dynamic, service: remaining}
        self._rebuild()
        return removed

    async def aclose(self) -> None:
        await self._store.aclose()

    def _rebuild(self) -> None:
        self._snapshot = {
            service: (*targets, *self._dynamic.get(service, ())) for service, targets in self._static.items()
        }
        self.generation += 1


def static_targets(config: "GatewayConfig") -> dict[str, list[Target]]:
    result: dict[str, list[Target]] = {}
    for service in config.services:
        result[service.name] = [_target(target) for target in service.targets]
    return result


def _target(config: "TargetConfig") -> Target:
    return Target(
        id=config.id or default_target_id(config.url),
        url=config.url,
        weight=config.weight,
        version=config.version,
        zone=config.zone,
        tags=frozenset(config.tags),
    )


def build_target(data: Mapping[str, Any]) -> Target:
    """A target from an admin request body, validated like a config target."""
    from pydantic import ValidationError

    from sample_gateway.config import TargetConfig, format_location

    try:
        parsed = TargetConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigurationError(f"{format_location(first['loc'])}: {first['msg']}") from None
    return _target(parsed)
