"""A JSON Web Key Set fetched over HTTP and cached (RFC 7517), for verifying tokens of one issuer.

- The set is fetched on first use (never at construction), with the injected `httpx.AsyncClient` or one the
  cache creates then and closes in `aclose()`.
- It is kept for the response's `Cache-Control: max-age`, clamped to `[min_ttl, max_ttl]` (`default_ttl`
  without one).
- A token whose `kid` is not in the set triggers one refetch (key rotation), at most once per
  `min_refetch_interval`; concurrent misses share that one fetch (single-flight).
- When a refresh fails, the last good keys keep working for `max_stale` seconds past their expiry; after
  that, and when the first fetch fails, `get()` raises `VerifierUnavailableError` (callers fail closed).
- The response body is capped while it streams (`max_bytes`), the whole fetch has a deadline (`timeout`),
  and junk (not JSON, no `keys`, no usable public signing key) is a failed fetch, never a crash.
"""

import asyncio
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from joserfc import jwk
from joserfc.errors import JoseError

from nexus_middleware.bearer import new_http_client, read_limited
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.errors import ConfigurationError, VerifierUnavailableError

__all__ = ["JWKSCache", "JWKSPolicy"]

logger = logging.getLogger(__name__)

_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d+)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|[,\s])(?:no-cache|no-store)(?:$|[,\s=])", re.IGNORECASE)
_ACCEPT = {"accept": "application/jwk-set+json, application/json"}


@dataclass(frozen=True, slots=True)
class JWKSPolicy:
    """How a key set is cached and fetched. Times in seconds."""

    min_ttl: float = 60.0
    max_ttl: float = 86_400.0
    default_ttl: float = 300.0
    min_refetch_interval: float = 30.0  # between refetches triggered by unknown `kid`s
    error_retry_interval: float = 5.0  # after a failed fetch, before the next attempt
    max_stale: float = 86_400.0  # how long past expiry last-good keys serve while refreshes fail
    timeout: float = 5.0  # the whole fetch: connect, headers and body
    max_bytes: int = 256 * 1024
    max_keys: int = 64

    def __post_init__(self) -> None:
        if not 0 < self.min_ttl <= self.default_ttl <= self.max_ttl:
            raise ConfigurationError("JWKS TTLs must satisfy 0 < min_ttl <= default_ttl <= max_ttl")
        for name in ("min_refetch_interval", "error_retry_interval", "max_stale"):
            if getattr(self, name) < 0:
                raise ConfigurationError(f"{name} must not be negative")
        if self.timeout <= 0 or self.max_bytes <= 0 or self.max_keys <= 0:
            raise ConfigurationError("timeout, max_bytes and max_keys must be positive")


class _JunkError(Exception):
    """The endpoint answered, but not with a usable key set."""


@dataclass(frozen=True, slots=True)
class _KeySet:
    by_kid: dict[str | None, tuple[jwk.Key, ...]]
    keys: tuple[jwk.Key, ...]
    expires_at: float  # monotonic


class JWKSCache:
    """The keys published at `url`, cached; see the module docstring for the refresh rules."""

    def __init__(
        self,
        url: str,
        *,
        policy: JWKSPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not url.startswith(("https://", "http://")):
            raise ConfigurationError(f"JWKS URL must be http(s), not {url!r}")
        self.url = url
        self._policy = policy or JWKSPolicy()
        self._client = http_client
        self._owns_client = http_client is None
        self._clock = clock
        self._keys: _KeySet | None = None
        self._last_attempt: float | None = None
        self._last_ok = False
        self._inflight: asyncio.Task[bool] | None = None

    def __repr__(self) -> str:
        return f"JWKSCache({self.url!r}, policy={self._policy!r})"

    async def get(self, kid: str | None) -> Sequence[jwk.Key]:
        """The keys for `kid` (every key when None); empty when the set has none, even after a refetch."""
        if self._inflight is not None:
            await asyncio.shield(self._inflight)
        now = self._clock.monotonic()
        keys = self._keys
        if keys is None or now >= keys.expires_at:
            if self._may_fetch(now):
                await self._fetch()
                now = self._clock.monotonic()
            keys = self._keys
            if keys is None or now >= keys.expires_at + self._policy.max_stale:
                raise VerifierUnavailableError(f"no usable keys from {self.url}")
        found = _select(keys, kid)
        if found or kid is None or not self._may_fetch(now):
            return found
        await self._fetch()
        keys = self._keys
        return () if keys is None else _select(keys, kid)

    async def refresh(self) -> bool:
        """Fetch now (sharing a fetch under way); True when the set was replaced."""
        return await self._fetch()

    async def aclose(self) -> None:
        if self._inflight is not None and not self._inflight.done():
            self._inflight.cancel()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    def _may_fetch(self, now: float) -> bool:
        if self._last_attempt is None:
            return True
        interval = self._policy.min_refetch_interval if self._last_ok else self._policy.error_retry_interval
        return now - self._last_attempt >= interval

    async def _fetch(self) -> bool:
        task = self._inflight
        if task is None or task.done():
            self._last_attempt = self._clock.monotonic()
            task = self._inflight = asyncio.ensure_future(self._load())
        # shield: a cancelled request must not cancel the fetch its neighbours are waiting for
        return await asyncio.shield(task)

    async def _load(self) -> bool:
        try:
            async with asyncio.timeout(self._policy.timeout):
                body, cache_control = await self._download()
            keys = self._parse(body)
        except Exception as exc:  # any failure, including an endpoint's junk, leaves the last good keys
            logger.warning("JWKS fetch from %s failed: %s", self.url, exc or type(exc).__name__)
            self._last_ok = False
            return False
        finally:
            self._inflight = None
        now = self._clock.monotonic()
        by_kid: dict[str | None, tuple[jwk.Key, ...]] = {}
        for key in keys:
            by_kid[key.kid] = (*by_kid.get(key.kid, ()), key)
        self._keys = _KeySet(by_kid, tuple(keys), now + self._ttl(cache_control))
        self._last_ok = True
        return True

    async def _download(self) -> tuple[bytes, str]:
        if self._client is None:
            self._client = new_http_client(self._policy.timeout)
        async with self._client.stream("GET", self.url, headers=_ACCEPT) as response:
            body = await read_limited(response, self._policy.max_bytes)
            return body, response.headers.get("cache-control", "")

    def _parse(self, body: bytes) -> list[jwk.Key]:
        try:
            document: Any = json.loads(body)
        except ValueError as exc:
            raise _JunkError("not JSON") from exc
        entries = document.get("keys") if isinstance(document, dict) else None
        if not isinstance(entries, list):
            raise _JunkError("no keys array")
        keys: list[jwk.Key] = []
        for entry in entries[: self._policy.max_keys]:
            key = _public_signing_key(entry)
            if key is not None:
                keys.append(key)
        if not keys:
            raise _JunkError("no usable public signing key")
        return keys

    def _ttl(self, cache_control: str) -> float:
        policy = self._policy
        if _NO_CACHE.search(cache_control):
            return policy.min_ttl
        match = _MAX_AGE.search(cache_control)
        if match is None:
            return policy.default_ttl
        return min(max(float(match.group(1)), policy.min_ttl), policy.max_ttl)


def _public_signing_key(entry: Any) -> jwk.Key | None:
    # A published set is public: symmetric keys there would let anyone mint tokens, so they are skipped.
    if not isinstance(entry, dict) or entry.get("kty") not in ("RSA", "EC", "OKP"):
        return None
    if entry.get("use", "sig") != "sig" or not isinstance(entry.get("kid", ""), str):
        return None
    try:
        return jwk.import_key(entry)
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        logger.info("skipping an unusable JWK: %s", exc)
        return None


def _select(keys: _KeySet, kid: str | None) -> tuple[jwk.Key, ...]:
    if kid is None:
        return keys.keys
    return keys.by_kid.get(kid, ())
