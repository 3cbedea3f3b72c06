"""API-key authentication: hashed keys in a pluggable store, one answer for every failure, rotation.

A key reads `<prefix>_<key id>_<secret>` (`nx_3f9a0c1d2b4e5f60_Zx...`). The key id is a public lookup
handle; only a hash of the secret is stored. Every failure (missing, malformed, unknown id, wrong secret,
expired, revoked, duplicated or padded header) gets the same 401 response byte for byte, so a caller learns
nothing about which part was wrong; the reason is recorded in the request context (layer "auth") for audit
and metrics.
"""

import hashlib
import hmac
import json
import logging
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import (
    ANONYMOUS,
    AUTH_MODES,
    AuthMode,
    Principal,
    get_context,
    publish_principal,
)
from nexus_middleware.errors import (
    ConfigurationError,
    InvalidPathError,
    StorageError,
    StorageUnavailableError,
    UnknownAPIKeyError,
)
from nexus_middleware.paths import INVALID_PATH, RouteEntry, RouteTable, request_path, take_query_param
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "APIKeyManager",
    "APIKeyMiddleware",
    "APIKeyPolicy",
    "APIKeyRecord",
    "APIKeyStore",
    "IssuedAPIKey",
    "MemoryAPIKeyStore",
    "RedisAPIKeyStore",
    "hash_api_key_secret",
]

logger = logging.getLogger(__name__)

_EMPTY: Mapping[str, Any] = MappingProxyType({})
_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_PREFIX = re.compile(r"[A-Za-z0-9]{1,16}")
_KEY_ID = re.compile(r"[A-Za-z0-9]{4,64}")
_SECRET = "[A-Za-z0-9_-]{16,256}"
_HASH = re.compile(r"(sha256|hmac-sha256):[0-9a-f]{64}")
_UPDATE_ATTEMPTS = 5
_MAX_KEY_BYTES = 400  # longest well-formed key, checked before the regex runs
# Checked when the key id is unknown, so unknown ids cost the same hash and comparison as wrong secrets.
_DUMMY_HASH = "sha256:" + "0" * 64


@dataclass(frozen=True, slots=True)
class APIKeyPolicy:
    """How keys look, where they are read from and how they are hashed; shared by middleware and manager.

    `pepper`: when set, new secrets are hashed with HMAC-SHA256 under it (a store leak alone then reveals
    nothing checkable). Records hashed with plain SHA-256 keep verifying, so a pepper can be introduced later.
    `cache_ttl`: verified store lookups are reused for this many seconds, which bounds how long a revocation
    or rotation takes to reach this process (0 disables the cache).
    `stale_if_error`: while the store fails, a key verified less than `cache_ttl + stale_if_error` seconds ago
    keeps working (the revocation bound grows by as much during an outage); 0: fail closed at once (503).
    """

    header_name: str = "X-API-Key"
    query_param: str | None = None
    strip_query: bool = True
    key_prefix: str = "nx"
    default: AuthMode = "required"
    cache_ttl: float = 5.0
    cache_size: int = 10_000
    stale_if_error: float = 0.0
    pepper: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not _TOKEN.fullmatch(self.header_name):
            raise ConfigurationError(f"header_name {self.header_name!r} is not a valid header name")
        if self.query_param is not None and not self.query_param:
            raise ConfigurationError("query_param must be a non-empty name or None")
        if not _PREFIX.fullmatch(self.key_prefix):
            raise ConfigurationError("key_prefix must be 1 to 16 ASCII letters or digits")
        if self.default not in AUTH_MODES:
            raise ConfigurationError(f"default must be one of {sorted(AUTH_MODES)}, not {self.default!r}")
        if self.cache_ttl < 0:
            raise ConfigurationError("cache_ttl must be zero or positive")
        if self.cache_size <= 0:
            raise ConfigurationError("cache_size must be positive")
        if self.stale_if_error < 0 or (self.stale_if_error > 0 and self.cache_ttl == 0):
            raise ConfigurationError(
                "stale_if_error must be zero or positive, and needs a cache (cache_ttl > 0)"
            )
        if self.pepper is not None and len(self.pepper) < 16:
            raise ConfigurationError("pepper must be at least 16 bytes")


def hash_api_key_secret(secret: str, *, pepper: bytes | None = None) -> str:
    """The stored form of a key's secret part: `sha256:<hex>`, or `hmac-sha256:<hex>` under a pepper.

    A plain, unsalted SHA-256 is enough here, unlike for passwords: generated secrets carry 256 bits of
    randomness, so there is no dictionary to precompute and brute force is out of reach; a slow KDF would only
    cost latency on every request. Use this to pre-hash keys for configuration files.
    """
    data = secret.encode()
    if pepper is None:
        return "sha256:" + hashlib.sha256(data).hexdigest()
    return "hmac-sha256:" + hmac.new(pepper, data, "sha256").hexdigest()


def _secret_matches(secret: bytes, stored: str, pepper: bytes | None) -> bool:
    algorithm, _, expected = stored.partition(":")
    if algorithm == "hmac-sha256" and pepper is not None:
        digest = hmac.new(pepper, secret, "sha256").hexdigest()
    else:
        # A peppered record checked without a pepper hashes anyway and fails the comparison below.
        digest = hashlib.sha256(secret).hexdigest()
        if algorithm != "sha256":
            expected = "!" * len(digest)
    return hmac.compare_digest(digest.encode(), expected.encode())


@dataclass(frozen=True, slots=True)
class APIKeyRecord:
    """What the store holds for one key. The secret itself is never stored, only its hash."""

    key_id: str
    secret_hash: str = field(repr=False)
    owner: str
    org: str | None = None
    scopes: frozenset[str] = frozenset()
    roles: frozenset[str] = frozenset()
    plan: str | None = None
    rate_limits: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)
    metadata: Mapping[str, Any] = field(default_factory=lambda: _EMPTY, hash=False)
    created_at: float | None = None  # wall-clock epoch seconds, like every time here
    expires_at: float | None = None
    revoked: bool = False
    # After a rotation the previous secret keeps working until `previous_valid_until`.
    previous_secret_hash: str | None = field(default=None, repr=False)
    previous_valid_until: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "key_id": self.key_id,
            "secret_hash": self.secret_hash,
            "owner": self.owner,
            "org": self.org,
            "scopes": sorted(self.scopes),
            "roles": sorted(self.roles),
            "plan": self.plan,
            "rate_limits": dict(self.rate_limits),
            "metadata": dict(self.metadata),
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "revoked": self.revoked,
            "previous_secret_hash": self.previous_secret_hash,
            "previous_valid_until": self.previous_valid_until,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "APIKeyRecord":
        """A record from a config entry or a stored document; raises `ConfigurationError` when invalid."""
        try:
            key_id = data["key_id"]
            secret_hash = data["secret_hash"]
            owner = data["owner"]
        except KeyError as exc:
            raise ConfigurationError(f"an API key entry needs {exc.args[0]!r}") from exc
        if not isinstance(key_id, str) or not _KEY_ID.fullmatch(key_id):
            raise ConfigurationError(f"API key id {key_id!r} must be 4 to 64 ASCII letters or digits")
        for name in ("secret_hash", "previous_secret_hash"):
            value = data.get(name)
            if value is not None and (not isinstance(value, str) or not _HASH.fullmatch(value)):
                raise ConfigurationError(
                    f"API key {key_id}: {name} must be 'sha256:<64 hex>' or 'hmac-sha256:…'"
                )
        if not isinstance(owner, str) or not owner:
            raise ConfigurationError(f"API key {key_id}: owner must be a non-empty string")
        return cls(
            key_id=key_id,
            secret_hash=secret_hash,
            owner=owner,
            org=_optional(data, "org", str, key_id),
            scopes=_names(data.get("scopes"), key_id),
            roles=_names(data.get("roles"), key_id),
            plan=_optional(data, "plan", str, key_id),
            rate_limits=MappingProxyType(dict(_optional(data, "rate_limits", Mapping, key_id) or {})),
            metadata=MappingProxyType(dict(_optional(data, "metadata", Mapping, key_id) or {})),
            created_at=_time(data, "created_at", key_id),
            expires_at=_time(data, "expires_at", key_id),
            revoked=bool(_optional(data, "revoked", bool, key_id)),
            previous_secret_hash=data.get("previous_secret_hash"),
            previous_valid_until=_time(data, "previous_valid_until", key_id),
        )


def _optional(data: Mapping[str, Any], name: str, kind: type, key_id: str) -> Any:
    value = data.get(name)
    if value is not None and not isinstance(value, kind):
        raise ConfigurationError(f"API key {key_id}: {name} must be a {kind.__name__}")
    return value


def _time(data: Mapping[str, Any], name: str, key_id: str) -> float | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(f"API key {key_id}: {name} must be epoch seconds")
    return float(value)


def _names(value: Any, key_id: str) -> frozenset[str]:
    if value is None:
        return frozenset()
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, Iterable) and all(isinstance(item, str) for item in value):
        return frozenset(value)
    raise ConfigurationError(f"API key {key_id}: scopes and roles must be strings")


@dataclass(frozen=True, slots=True)
class IssuedAPIKey:
    """A newly created or rotated key. `key` is the only time the full secret exists: hand it over once."""

    key: str = field(repr=False)
    record: APIKeyRecord

    @property
    def key_id(self) -> str:
        return self.record.key_id


@runtime_checkable
class APIKeyStore(Protocol):
    """Where key records live. A failing backend raises `StorageError` or `StorageUnavailableError`."""

    async def get(self, key_id: str) -> APIKeyRecord | None:
        """The record for `key_id`, or None."""
        ...

    async def put(self, record: APIKeyRecord) -> None:
        """Create or replace the record for `record.key_id`."""
        ...

    async def swap(self, current: APIKeyRecord | None, new: APIKeyRecord) -> bool:
        """Atomically store `new` if the stored record still equals `current` (None: absent); else False.

        The manager's read-modify-write goes through this, so a rotation racing a revocation on another
        instance can never write the key back as not revoked.
        """
        ...

    async def records(self) -> list[APIKeyRecord]:
        """Every record, in no particular order."""
        ...

    async def aclose(self) -> None:
        """Release connections; the store is not used after this."""
        ...


class MemoryAPIKeyStore:
    """Records in this process: the embedded default, and the form configuration files load into."""

    def __init__(self, records: Iterable[APIKeyRecord] = ()) -> None:
        self._records: dict[str, APIKeyRecord] = {}
        for record in records:
            if record.key_id in self._records:
                raise ConfigurationError(f"API key id {record.key_id!r} appears twice")
            self._records[record.key_id] = record

    @classmethod
    def from_config(cls, entries: Iterable[Mapping[str, Any]]) -> "MemoryAPIKeyStore":
        """A store from config entries of pre-hashed keys (see `hash_api_key_secret`)."""
        return cls(APIKeyRecord.from_dict(entry) for entry in entries)

    def __repr__(self) -> str:
        return f"MemoryAPIKeyStore(keys={len(self._records)})"

    async def get(self, key_id: str) -> APIKeyRecord | None:
        return self._records.get(key_id)

    async def put(self, record: APIKeyRecord) -> None:
        self._records[record.key_id] = record

    async def swap(self, current: APIKeyRecord | None, new: APIKeyRecord) -> bool:
        if self._records.get(new.key_id) != current:
            return False
        self._records[new.key_id] = new
        return True

    async def records(self) -> list[APIKeyRecord]:
        return list(self._records.values())

    async def aclose(self) -> None:
        return None


class RedisAPIKeyStore:
    """Records as JSON documents in Redis under `prefix`, with a set of key ids for listing."""

    def __init__(self, client: "Redis", *, prefix: str = "nexus:apikeys:", owns_client: bool = False) -> None:
        if not prefix:
            raise ConfigurationError("prefix must not be empty")
        self._client = client
        self._prefix = prefix
        self._index = prefix + "index"
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, *, prefix: str = "nexus:apikeys:") -> "RedisAPIKeyStore":
        from nexus_middleware.storage import redis_client_from_url

        return cls(redis_client_from_url(url), prefix=prefix, owns_client=True)

    def __repr__(self) -> str:
        return f"RedisAPIKeyStore(prefix={self._prefix!r})"

    def _key(self, key_id: str) -> str:
        return f"{self._prefix}key:{key_id}"

    async def get(self, key_id: str) -> APIKeyRecord | None:
        async with _RedisErrors("get"):
            raw = await self._client.get(self._key(key_id))
        return None if raw is None else _decode(raw)

    async def put(self, record: APIKeyRecord) -> None:
        document = json.dumps(record.to_dict(), separators=(",", ":"))
        async with _RedisErrors("put"), self._client.pipeline(transaction=True) as pipe:
            pipe.set(self._key(record.key_id), document)
            pipe.sadd(self._index, record.key_id)
            await pipe.execute()

    async def swap(self, current: APIKeyRecord | None, new: APIKeyRecord) -> bool:
        from redis.exceptions import WatchError

        key = self._key(new.key_id)
        document = json.dumps(new.to_dict(), separators=(",", ":"))
        async with _RedisErrors("swap"), self._client.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(key)
                raw = await pipe.get(key)
                if (None if raw is None else _decode(raw)) != current:
                    return False  # leaving the pipeline block resets it, which unwatches
                pipe.multi()  # type: ignore[no-untyped-call]
                pipe.set(key, document)
                pipe.sadd(self._index, new.key_id)
                await pipe.execute()
            except WatchError:
                return False  # written by someone else between WATCH and EXEC
        return True

    async def records(self) -> list[APIKeyRecord]:
        async with _RedisErrors("list"):
            key_ids = sorted(_text(member) for member in await self._client.smembers(self._index))
            raws = await self._client.mget([self._key(key_id) for key_id in key_ids]) if key_ids else []
        return [_decode(raw) for raw in raws if raw is not None]

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


class _RedisErrors:
    """Maps redis-py failures onto the suite's storage errors, as the core `RedisStore` does."""

    __slots__ = ("_operation",)

    def __init__(self, operation: str) -> None:
        self._operation = operation

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        if isinstance(exc, RedisConnectionError | RedisTimeoutError | OSError):
            raise StorageUnavailableError(f"API key store {self._operation} failed: {exc}") from exc
        if isinstance(exc, RedisError):
            raise StorageError(f"API key store {self._operation} failed: {exc}") from exc


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _decode(raw: bytes | str) -> APIKeyRecord:
    try:
        return APIKeyRecord.from_dict(json.loads(raw))
    except (ValueError, TypeError) as exc:
        raise StorageError(f"an API key record is corrupt: {exc}") from exc


class APIKeyManager:
    """The async management API the gateway's admin API calls: create, list, revoke, rotate."""

    def __init__(
        self, store: APIKeyStore, /, *, policy: APIKeyPolicy = APIKeyPolicy(), clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._store = store
        self._policy = policy
        self._clock = clock

    def __repr__(self) -> str:
        return f"APIKeyManager({self._store!r}, policy={self._policy!r})"

    async def create(
        self,
        *,
        owner: str,
        org: str | None = None,
        scopes: Iterable[str] = (),
        roles: Iterable[str] = (),
        plan: str | None = None,
        rate_limits: Mapping[str, Any] | None = None,
        metadata: Mapping[str, Any] | None = None,
        expires_in: float | None = None,
    ) -> IssuedAPIKey:
        """A new key. The returned `key` is the only copy of the secret: it cannot be recovered later."""
        if not owner:
            raise ValueError("owner must not be empty")
        if expires_in is not None and expires_in <= 0:
            raise ValueError("expires_in must be positive")
        now = self._clock.time()
        secret = secrets.token_urlsafe(32)
        record = APIKeyRecord(
            key_id=secrets.token_hex(8),
            secret_hash=hash_api_key_secret(secret, pepper=self._policy.pepper),
            owner=owner,
            org=org,
            scopes=frozenset(scopes),
            roles=frozenset(roles),
            plan=plan,
            rate_limits=MappingProxyType(dict(rate_limits or {})),
            metadata=MappingProxyType(dict(metadata or {})),
            created_at=now,
            expires_at=None if expires_in is None else now + expires_in,
        )
        while not await self._store.swap(None, record):  # an id that exists already: draw another
            record = replace(record, key_id=secrets.token_hex(8))
        return IssuedAPIKey(self._format(record.key_id, secret), record)

    async def get(self, key_id: str) -> APIKeyRecord:
        record = await self._store.get(key_id)
        if record is None:
            raise UnknownAPIKeyError(f"no API key with id {key_id!r}")
        return record

    async def revoke(self, key_id: str) -> APIKeyRecord:
        """Revoke the key (and any previous secret still in its overlap window)."""
        return await self._update(
            key_id,
            lambda current: replace(
                current, revoked=True, previous_secret_hash=None, previous_valid_until=None
            ),
        )

    async def rotate(self, key_id: str, *, overlap: float = 0.0) -> IssuedAPIKey:
        """A new secret for the same key id; the old secret keeps working for `overlap` seconds."""
        if overlap < 0:
            raise ValueError("overlap must be zero or positive")
        secret = secrets.token_urlsafe(32)
        secret_hash = hash_api_key_secret(secret, pepper=self._policy.pepper)

        def rotated(current: APIKeyRecord) -> APIKeyRecord:
            if current.revoked:
                raise UnknownAPIKeyError(f"API key {key_id!r} is revoked and cannot be rotated")
            return replace(
                current,
                secret_hash=secret_hash,
                previous_secret_hash=current.secret_hash if overlap > 0 else None,
                previous_valid_until=self._clock.time() + overlap if overlap > 0 else None,
            )

        return IssuedAPIKey(self._format(key_id, secret), await self._update(key_id, rotated))

    async def _update(self, key_id: str, change: Callable[[APIKeyRecord], APIKeyRecord]) -> APIKeyRecord:
        for _ in range(_UPDATE_ATTEMPTS):
            current = await self.get(key_id)
            record = change(current)
            if await self._store.swap(current, record):
                return record
        raise StorageError(f"API key {key_id!r} kept changing under concurrent updates; retry")

    async def list(
        self, *, owner: str | None = None, org: str | None = None, include_revoked: bool = True
    ) -> tuple[APIKeyRecord, ...]:
        records = await self._store.records()
        return tuple(
            sorted(
                (
                    record
                    for record in records
                    if (owner is None or record.owner == owner)
                    and (org is None or record.org == org)
                    and (include_revoked or not record.revoked)
                ),
                key=lambda record: (record.created_at or 0.0, record.key_id),
            )
        )

    def _format(self, key_id: str, secret: str) -> str:
        return f"{self._policy.key_prefix}_{key_id}_{secret}"


_MALFORMED = b""  # a credential that was present but unusable (duplicated, empty)
_CacheEntry = tuple[float, APIKeyRecord | None, Principal | None]


class APIKeyMiddleware:
    """Authenticates requests and websocket handshakes by API key and publishes the key's `Principal`.

    Route modes come from `routes` (`(pattern, methods | None, mode)`, or with a host as a 4th element: see
    `RouteEntry`; first match among the request host's and the host-less entries wins), then the
    `required`, `optional` and `exempt` pattern lists, in that order, then `policy.default`. On an optional
    route a missing key passes as anonymous; a key that is present must be valid everywhere.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        store: APIKeyStore,
        policy: APIKeyPolicy = APIKeyPolicy(),
        routes: Iterable[RouteEntry[AuthMode]] = (),
        required: Iterable[str] = (),
        optional: Iterable[str] = (),
        exempt: Iterable[str] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not isinstance(store, APIKeyStore):
            raise ConfigurationError("store must implement APIKeyStore (get, put, swap, records, aclose)")
        entries: list[RouteEntry[AuthMode]] = list(routes)
        for entry in entries:
            if entry[2] not in AUTH_MODES:
                raise ConfigurationError(f"route mode must be one of {sorted(AUTH_MODES)}, not {entry[2]!r}")
        entries += [(pattern, None, "required") for pattern in required]
        entries += [(pattern, None, "optional") for pattern in optional]
        entries += [(pattern, None, "exempt") for pattern in exempt]
        self.app = app
        self._store = store
        self._policy = policy
        self._clock = clock
        self._routes: RouteTable[AuthMode] | None = RouteTable(entries) if entries else None
        self._header = policy.header_name.lower().encode("latin-1")
        self._query_param = policy.query_param
        self._key_regex = re.compile(
            rf"{re.escape(policy.key_prefix)}_({_KEY_ID.pattern})_({_SECRET})".encode(), re.ASCII
        )
        self._challenge = [(b"www-authenticate", f'APIKey header="{policy.header_name}"'.encode("latin-1"))]
        self._refusal = Problem(401, "A valid API key is required.")
        self._unavailable = Problem(503, "API keys cannot be verified right now; retry later.")
        self._cache: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._dummy_hash = _DUMMY_HASH if policy.pepper is None else "hmac-" + _DUMMY_HASH

    def __repr__(self) -> str:
        return f"APIKeyMiddleware(store={self._store!r}, policy={self._policy!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        # A key in the URL is taken out of the scope before anything else runs, on every route: the app, a
        # proxied upstream and the access log never see it (`strip_query=False` leaves it in place).
        from_query = self._take_query(scope) if self._query_param is not None else None
        mode = self._policy.default
        if self._routes is not None:
            try:
                path = request_path(scope)
            except InvalidPathError:
                await send_problem(scope, send, INVALID_PATH, layer="auth")
                return
            mode = self._routes.for_request(scope).lookup(path, scope.get("method", "GET")) or mode
        if mode == "exempt":
            await self.app(scope, receive, send)
            return
        context = get_context(scope)
        presented = self._credential(scope, from_query)
        if presented is None:
            if mode == "optional" or (context.principal is not None and context.principal.is_authenticated):
                # Optional route, or another authenticator already vouched for the caller.
                if context.principal is None:
                    publish_principal(scope, ANONYMOUS)
                await self.app(scope, receive, send)
                return
            context.record("auth", "deny", reason="missing_credentials", method="api_key")
            await send_problem(scope, send, self._refusal, headers=self._challenge, layer="auth")
            return
        try:
            principal, reason, details = await self._authenticate(presented)
        except StorageError as exc:
            logger.warning("API key store failed; refusing the request: %s", exc)
            context.record("auth", "deny", reason="store_unavailable", method="api_key")
            await send_problem(scope, send, self._unavailable, headers=[(b"retry-after", b"1")], layer="auth")
            return
        if principal is None:
            context.record("auth", "deny", reason=reason, method="api_key", **details)
            await send_problem(scope, send, self._refusal, headers=self._challenge, layer="auth")
            return
        context.record("auth", "allow", method="api_key", **details)
        publish_principal(scope, principal)
        await self.app(scope, receive, send)

    def _take_query(self, scope: Scope) -> list[bytes]:
        """The values of `query_param`, taken out of the query string unless `strip_query` is off."""
        query = scope.get("query_string") or b""
        if not query or self._query_param is None:
            return []
        values, rest = take_query_param(query, self._query_param)
        if rest is not None and self._policy.strip_query:
            scope["query_string"] = rest
        return values

    def _credential(self, scope: Scope, from_query: list[bytes] | None) -> bytes | None:
        header = self._header
        values = [value for name, value in scope.get("headers") or () if name == header]
        if from_query:
            values += from_query
        if not values:
            return None
        if len(values) > 1:
            return _MALFORMED  # two keys: which one is meant is ambiguous, so neither is tried
        return values[0] or _MALFORMED

    async def _authenticate(self, presented: bytes) -> tuple[Principal | None, str, dict[str, Any]]:
        if len(presented) > _MAX_KEY_BYTES:
            return None, "malformed", {}
        # fullmatch: surrounding whitespace, a trailing newline or any stray byte makes the key malformed.
        found = self._key_regex.fullmatch(presented)
        if found is None:
            return None, "malformed", {}
        key_id = found.group(1).decode("ascii")
        secret = found.group(2)
        details: dict[str, Any] = {"key_id": key_id}
        record, principal = await self._lookup(key_id, details)
        pepper = self._policy.pepper
        if record is None:
            _secret_matches(secret, self._dummy_hash, pepper)  # same work as a wrong secret
            return None, "unknown_key", details
        now = self._clock.time()
        if not _secret_matches(secret, record.secret_hash, pepper):
            previous = record.previous_secret_hash
            until = record.previous_valid_until
            if (
                previous is None
                or until is None
                or now >= until
                or not _secret_matches(secret, previous, pepper)
            ):
                return None, "invalid_key", details
            details["secret"] = "previous"
        if record.revoked:
            return None, "revoked", details
        if record.expires_at is not None and now >= record.expires_at:
            return None, "expired", details
        return principal, "", details

    async def _lookup(
        self, key_id: str, details: dict[str, Any]
    ) -> tuple[APIKeyRecord | None, Principal | None]:
        ttl = self._policy.cache_ttl
        cached = self._cache.get(key_id) if ttl > 0 else None
        now = self._clock.monotonic()
        if cached is not None and now - cached[0] < ttl:
            return cached[1], cached[2]
        try:
            record = await self._store.get(key_id)
        except StorageError:
            # Only keys known to exist are served stale, and only within the configured outage allowance.
            if cached is None or cached[1] is None or now - cached[0] >= ttl + self._policy.stale_if_error:
                raise
            details["store"] = "stale"
            return cached[1], cached[2]
        principal = None if record is None else _principal(record)
        if ttl > 0:
            self._cache[key_id] = (now, record, principal)
            self._cache.move_to_end(key_id)
            while len(self._cache) > self._policy.cache_size:
                self._cache.popitem(last=False)
        return record, principal


def _principal(record: APIKeyRecord) -> Principal:
    return Principal(
        subject=record.owner,
        method="api_key",
        tenant=record.org,
        roles=record.roles,
        scopes=record.scopes,
        plan=record.plan,
        expires_at=record.expires_at,
        key_id=record.key_id,
        claims=MappingProxyType(
            {
                "key_id": record.key_id,
                "owner": record.owner,
                "org": record.org,
                "plan": record.plan,
                "rate_limits": record.rate_limits,
                "metadata": record.metadata,
            }
        ),
    )
