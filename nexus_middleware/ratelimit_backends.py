"""Where rate-limit counters live: in memory (limits strategies over a clocked storage) or in Redis (Lua).

A backend takes every window a request draws on and answers for each whether it admits the request, what
remains and when quota comes back. The request is admitted when every enforced window admits it; then, and
only then, the cost is consumed on every window that admitted it, so a request refused at one level
consumes nothing at the others.

- Memory: `limits.aio.strategies` over `ClockedMemoryStorage`, a storage implementing limits' async storage
  interface on an injected `Clock` (limits' own memory storage reads `time.time()`). Between the tests and
  the hits nothing suspends, so concurrent requests in one loop never interleave.
- Redis: one Lua script (`register_script`, one EVALSHA round trip per request) that tests and hits every
  window atomically, with the same three algorithms and the server's clock, so every instance agrees.
  limits' own Redis primitives are atomic per key only, which cannot give all-or-nothing across keys.
"""

import asyncio
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from limits import RateLimitItem
from limits.aio.storage import MovingWindowSupport, SlidingWindowCounterSupport, Storage
from limits.aio.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    RateLimiter,
    SlidingWindowCounterRateLimiter,
)
from limits.storage.base import TimestampedSlidingWindow

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.errors import ConfigurationError, StorageUnavailableError
from nexus_middleware.ratelimit_policy import Strategy

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "ClockedMemoryStorage",
    "LimiterBackend",
    "MemoryLimiterBackend",
    "RedisLimiterBackend",
    "StoreBreaker",
    "WindowCheck",
    "WindowState",
    "limiter_backend",
]


@dataclass(frozen=True, slots=True)
class WindowCheck:
    """One window a request draws on. `enforce=False` for shadow policies: reported, never refusing."""

    key: str
    item: RateLimitItem
    strategy: Strategy
    cost: int
    enforce: bool = True


@dataclass(frozen=True, slots=True)
class WindowState:
    """The answer for one window: whether it admits the request, what remains after it, and `reset_after`:
    seconds until the refused cost fits (refused) or until one more unit is available (admitted)."""

    allowed: bool
    remaining: int
    reset_after: float


@runtime_checkable
class LimiterBackend(Protocol):
    async def acquire(self, checks: Sequence[WindowCheck]) -> list[WindowState]:
        """Test every window and, when every enforced one admits, consume on all that admit; atomically."""
        ...

    async def aclose(self) -> None: ...


class ClockedMemoryStorage(
    Storage, MovingWindowSupport, SlidingWindowCounterSupport, TimestampedSlidingWindow
):
    """limits' async storage interface in process memory, on an injected clock (wall time, `clock.time()`).

    Expired entries are swept lazily every `sweep_every` writes, so no background task is needed.
    """

    STORAGE_SCHEME = None

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, sweep_every: int = 10_000) -> None:
        super().__init__()
        self._clock = clock
        self.counters: dict[str, int] = {}
        self.expirations: dict[str, float] = {}
        self.events: dict[str, deque[float]] = {}  # moving window: hit times, oldest first
        self.event_expiry: dict[str, float] = {}
        self._sweep_every = sweep_every
        self._writes = 0

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        return ValueError

    def now(self) -> float:
        return self._clock.time()

    def counter(self, key: str) -> int:
        expires = self.expirations.get(key)
        if expires is None:
            return 0
        if expires <= self._clock.time():
            del self.counters[key], self.expirations[key]
            return 0
        return self.counters[key]

    def add(self, key: str, expiry: float, amount: int) -> int:
        value = self.counter(key) + amount
        if key not in self.expirations:
            self.expirations[key] = self._clock.time() + expiry
        self.counters[key] = value
        self._wrote()
        return value

    def _wrote(self) -> None:
        self._writes += 1
        if self._writes % self._sweep_every == 0:
            now = self.now()
            for key in [k for k, at in self.expirations.items() if at <= now]:
                self.counters.pop(key, None)
                self.expirations.pop(key, None)
            for key in [
                k for k, hits in self.events.items() if not hits or hits[-1] <= now - self.event_expiry[k]
            ]:
                self.events.pop(key, None)
                self.event_expiry.pop(key, None)

    async def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        return self.add(key, expiry, amount)

    async def get(self, key: str) -> int:
        return self.counter(key)

    async def get_expiry(self, key: str) -> float:
        return self.expirations.get(key, self.now())

    async def check(self) -> bool:
        return True

    async def reset(self) -> int | None:
        count = len(self.counters) + len(self.events)
        self.counters.clear()
        self.expirations.clear()
        self.events.clear()
        self.event_expiry.clear()
        return count

    async def clear(self, key: str) -> None:
        self.counters.pop(key, None)
        self.expirations.pop(key, None)
        self.events.pop(key, None)
        self.event_expiry.pop(key, None)

    def moving_count(self, key: str, expiry: float) -> tuple[float, int]:
        """(time of the oldest hit still in the window, hits in the window); drops the hits that left it."""
        hits = self.events.get(key)
        now = self.now()
        if not hits:
            return now, 0
        cutoff = now - expiry
        while hits and hits[0] <= cutoff:
            hits.popleft()
        return (hits[0] if hits else now), len(hits)

    async def acquire_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        _, count = self.moving_count(key, expiry)
        if count + amount > limit:
            return False
        hits = self.events.get(key)
        if hits is None:
            hits = self.events[key] = deque(maxlen=limit)
            self.event_expiry[key] = expiry
        hits.extend([self.now()] * amount)
        self._wrote()
        return True

    async def get_moving_window(self, key: str, limit: int, expiry: int) -> tuple[float, int]:
        return self.moving_count(key, expiry)

    def sliding(self, key: str, expiry: float) -> tuple[int, float, int, float]:
        now = self.now()
        previous_key, current_key = self.sliding_window_keys(key, int(expiry), now)
        previous = self.counter(previous_key)
        current = self.counter(current_key)
        into_window = now % expiry
        previous_ttl = expiry - into_window if previous else 0.0
        return previous, previous_ttl, current, 2 * expiry - into_window

    async def acquire_sliding_window_entry(self, key: str, limit: int, expiry: int, amount: int = 1) -> bool:
        if amount > limit:
            return False
        previous, previous_ttl, current, _ = self.sliding(key, expiry)
        if math.floor(previous * previous_ttl / expiry + current) + amount > limit:
            return False
        _, current_key = self.sliding_window_keys(key, expiry, self.now())
        self.add(current_key, 2 * expiry, amount)
        return True

    async def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        return self.sliding(key, expiry)

    async def clear_sliding_window(self, key: str, expiry: int) -> None:
        previous_key, current_key = self.sliding_window_keys(key, expiry, self.now())
        await self.clear(previous_key)
        await self.clear(current_key)

    # The state a window's headers are built from, read without side effects.

    def window_state(self, check: WindowCheck, allowed: bool) -> WindowState:
        item = check.item
        key = item.key_for(check.key)
        expiry = float(item.get_expiry())
        limit = item.amount
        if check.strategy == "fixed-window":
            used = self.counter(key)
            remaining = max(0, limit - used)
            units = _units(allowed, check.cost, remaining, limit)
            ttl = max(0.0, self.expirations.get(key, self.now()) - self.now()) if used else 0.0
            return WindowState(allowed, remaining, 0.0 if remaining >= units else ttl)
        if check.strategy == "moving-window":
            _, count = self.moving_count(key, expiry)
            remaining = max(0, limit - count)
            units = _units(allowed, check.cost, remaining, limit)
            hits = self.events.get(key) or ()
            newest_first = limit - units  # the hit that must leave the window before `units` fit
            wait = 0.0
            if 0 <= newest_first < len(hits):
                wait = max(0.0, hits[len(hits) - 1 - newest_first] + expiry - self.now())
            return WindowState(allowed, remaining, wait)
        previous, previous_ttl, current, _ = self.sliding(key, expiry)
        remaining = max(0, limit - math.floor(previous * previous_ttl / expiry + current))
        units = _units(allowed, check.cost, remaining, limit)
        to_boundary = expiry - self.now() % expiry
        return WindowState(
            allowed, remaining, sliding_wait(previous, current, to_boundary, expiry, limit - units + 1)
        )


def _units(allowed: bool, cost: int, remaining: int, limit: int) -> int:
    if not allowed:
        return min(max(cost, 1), limit)
    return min(remaining + 1, limit)


_EPSILON = 0.001


def sliding_wait(previous: int, current: int, to_boundary: float, expiry: float, target: int) -> float:
    """Seconds until the sliding-window weighted count drops below `target` (the count a request may find)."""
    # The count must fall strictly below `target`: a millisecond past the exact point is the first moment.
    if current < target:
        if previous == 0:
            return 0.0
        # weighted(d) = previous * (to_boundary - d) / expiry + current, decreasing until the boundary.
        wait = to_boundary - (target - current) * expiry / previous
        return wait + _EPSILON if wait >= 0 else 0.0
    # After the boundary the current window becomes the previous one, weighing `current` down over `expiry`.
    return to_boundary + max(0.0, expiry - target * expiry / current) + _EPSILON


_LIMITERS: dict[Strategy, type[RateLimiter]] = {
    "sliding-window-counter": SlidingWindowCounterRateLimiter,
    "moving-window": MovingWindowRateLimiter,
    "fixed-window": FixedWindowRateLimiter,
}


class MemoryLimiterBackend:
    """Counters in this process: the embedded default, and the `local_fallback` of a Redis outage."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, storage: ClockedMemoryStorage | None = None) -> None:
        self.storage = storage if storage is not None else ClockedMemoryStorage(clock=clock)
        self._limiters = {name: cls(self.storage) for name, cls in _LIMITERS.items()}

    def __repr__(self) -> str:
        return "MemoryLimiterBackend()"

    async def acquire(self, checks: Sequence[WindowCheck]) -> list[WindowState]:
        # No await below suspends (the storage is synchronous underneath), so tests and hits of one
        # request are never interleaved with another request's.
        storage = self.storage
        if len(checks) == 1:
            check = checks[0]
            limiter = self._limiters[check.strategy]
            if check.cost:
                allowed = await limiter.hit(check.item, check.key, cost=check.cost)
            else:
                allowed = await limiter.test(check.item, check.key, cost=0)
            return [storage.window_state(check, allowed)]
        verdicts = [
            await self._limiters[check.strategy].test(check.item, check.key, cost=check.cost)
            for check in checks
        ]
        admitted = all(ok for ok, check in zip(verdicts, checks, strict=True) if check.enforce)
        if admitted:
            for ok, check in zip(verdicts, checks, strict=True):
                if ok and check.cost:
                    await self._limiters[check.strategy].hit(check.item, check.key, cost=check.cost)
        return [storage.window_state(check, ok) for ok, check in zip(verdicts, checks, strict=True)]

    async def aclose(self) -> None:
        await self.storage.reset()


_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local st = {}
local admitted = true
for i = 1, n do
  local a = (i - 1) * 5
  local s = {kind = ARGV[a + 1], limit = tonumber(ARGV[a + 2]), expiry = tonumber(ARGV[a + 3]) * 1000,
             cost = tonumber(ARGV[a + 4]), enforce = ARGV[a + 5] == '1', key = KEYS[i]}
  if s.kind == 'f' then
    s.count = tonumber(redis.call('GET', s.key)) or 0
    s.ttl = tonumber(redis.call('PTTL', s.key))
    s.ok = s.cost <= s.limit and s.count + s.cost <= s.limit
  elseif s.kind == 'm' then
    -- a sorted set of hit times: dropping the expired ones changes no answer, and counting is O(1)
    redis.call('ZREMRANGEBYSCORE', s.key, '-inf', now - s.expiry)
    s.count = redis.call('ZCARD', s.key)
    s.ok = s.cost <= s.limit and s.count + s.cost <= s.limit
  else
    local w = math.floor(now / s.expiry)
    s.ckey = s.key .. ':' .. w
    s.prev = tonumber(redis.call('GET', s.key .. ':' .. (w - 1))) or 0
    s.cur = tonumber(redis.call('GET', s.ckey)) or 0
    s.boundary = s.expiry - (now % s.expiry)
    s.ok = s.cost <= s.limit and math.floor(s.prev * s.boundary / s.expiry + s.cur) + s.cost <= s.limit
  end
  if s.enforce and not s.ok then admitted = false end
  st[i] = s
end
if admitted then
  for i = 1, n do
    local s = st[i]
    if s.ok and s.cost > 0 then
      if s.kind == 'f' then
        s.count = redis.call('INCRBY', s.key, s.cost)
        if s.ttl < 0 then redis.call('PEXPIRE', s.key, s.expiry); s.ttl = s.expiry end
      elseif s.kind == 'm' then
        -- members are unique: within one millisecond the count only grows
        for j = 1, s.cost do redis.call('ZADD', s.key, now, now .. ':' .. (s.count + j)) end
        redis.call('PEXPIRE', s.key, s.expiry)
        s.count = s.count + s.cost
      else
        s.cur = redis.call('INCRBY', s.ckey, s.cost)
        if s.cur == s.cost then redis.call('PEXPIRE', s.ckey, 2 * s.expiry) end
      end
    end
  end
end
local out = {}
for i = 1, n do
  local s = st[i]
  local remaining, wait
  if s.kind == 'f' then
    remaining = math.max(0, s.limit - s.count)
  elseif s.kind == 'm' then
    remaining = math.max(0, s.limit - s.count)
  else
    remaining = math.max(0, s.limit - math.floor(s.prev * s.boundary / s.expiry + s.cur))
  end
  local units = math.min(math.max(s.cost, 1), s.limit)
  if s.ok then units = math.min(remaining + 1, s.limit) end
  wait = 0
  if s.kind == 'f' then
    if remaining < units and s.count > 0 then wait = math.max(s.ttl, 0) end
  elseif s.kind == 'm' then
    local newest_first = s.limit - units
    if newest_first < s.count then
      local hit = redis.call('ZREVRANGE', s.key, newest_first, newest_first, 'WITHSCORES')
      wait = math.max(0, tonumber(hit[2]) + s.expiry - now)
    end
  else
    local target = s.limit - units + 1
    if s.cur < target then
      if s.prev > 0 then
        wait = s.boundary - (target - s.cur) * s.expiry / s.prev
        if wait >= 0 then wait = wait + 1 else wait = 0 end
      end
    else
      wait = s.boundary + math.max(0, s.expiry - target * s.expiry / s.cur) + 1
    end
  end
  out[#out + 1] = s.ok and 1 or 0
  out[#out + 1] = remaining
  out[#out + 1] = math.ceil(wait)
end
return out
"""

_KINDS: dict[Strategy, str] = {"fixed-window": "f", "moving-window": "m", "sliding-window-counter": "s"}


class RedisLimiterBackend:
    """Counters in Redis, shared by every instance: one atomic script call per request.

    `client` is a `redis.asyncio.Redis`. Every key starts with the middleware's key prefix. With Redis
    Cluster every key of one request must hash to one slot, so give the prefix a hash tag (`{rl}:`).
    """

    def __init__(self, client: "Redis", *, timeout: float = 0.25, owns_client: bool = False) -> None:
        self.client = client
        self._timeout = timeout
        self._owns_client = owns_client
        self._script = client.register_script(_SCRIPT)

    @classmethod
    def from_url(cls, url: str, *, timeout: float = 0.25) -> "RedisLimiterBackend":
        from nexus_middleware.storage import redis_client_from_url

        if url.startswith("async+"):
            url = url[len("async+") :]
        client = redis_client_from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
        return cls(client, timeout=timeout, owns_client=True)

    def __repr__(self) -> str:
        return f"RedisLimiterBackend(timeout={self._timeout!r})"

    async def acquire(self, checks: Sequence[WindowCheck]) -> list[WindowState]:
        from redis.exceptions import RedisError

        args: list[Any] = []
        for check in checks:
            args += [
                _KINDS[check.strategy],
                check.item.amount,
                check.item.get_expiry(),
                check.cost,
                1 if check.enforce else 0,
            ]
        keys = [
            f"{check.key}:{_KINDS[check.strategy]}:{check.item.amount}:{check.item.get_expiry()}"
            for check in checks
        ]
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._script(keys=keys, args=args)
        except (TimeoutError, RedisError, OSError) as exc:
            raise StorageUnavailableError(f"rate-limit store failed: {exc!r}") from exc
        return [
            WindowState(bool(raw[i]), int(raw[i + 1]), int(raw[i + 2]) / 1000) for i in range(0, len(raw), 3)
        ]

    async def aclose(self) -> None:
        if self._owns_client:
            await self.client.aclose()


def limiter_backend(storage: object, *, clock: Clock, timeout: float) -> LimiterBackend:
    """A backend from a URL (`memory://`, `redis://`, `async+redis://`), a redis.asyncio client, a limits
    async Redis storage (its connection is reused), a `ClockedMemoryStorage`, or a `LimiterBackend`."""
    if isinstance(storage, str):
        if storage in ("memory://", "async+memory://", "memory"):
            return MemoryLimiterBackend(clock=clock)
        if storage.startswith(("redis://", "rediss://", "unix://", "async+redis://", "async+rediss://")):
            return RedisLimiterBackend.from_url(storage, timeout=timeout)
        if storage.removeprefix("async+").startswith(("redis+sentinel://", "redis+cluster://")):
            # limits parses these URIs (sentinel service names, cluster node lists); its connection is reused
            from limits.storage import storage_from_string

            limits_storage = storage_from_string(
                "async+" + storage.removeprefix("async+"), implementation="redispy"
            )
            connection = getattr(limits_storage, "bridge").get_connection()  # noqa: B009 - not in limits' types
            return RedisLimiterBackend(connection, timeout=timeout)
        raise ConfigurationError(f"unsupported rate-limit storage {storage!r}: use memory:// or redis://")
    if isinstance(storage, LimiterBackend):
        return storage
    if isinstance(storage, ClockedMemoryStorage):
        return MemoryLimiterBackend(storage=storage)
    if isinstance(storage, Storage) and not hasattr(storage, "bridge"):
        raise ConfigurationError(
            f"{type(storage).__name__} is not supported: use 'memory://' (a ClockedMemoryStorage) or Redis"
        )
    if hasattr(storage, "register_script"):
        return RedisLimiterBackend(storage, timeout=timeout)  # type: ignore[arg-type]
    bridge = getattr(storage, "bridge", None)
    if bridge is not None and hasattr(bridge, "get_connection"):
        return RedisLimiterBackend(bridge.get_connection(), timeout=timeout)
    raise ConfigurationError(f"unsupported rate-limit storage {storage!r}")


class StoreBreaker:
    """Keeps a dead or slow store from costing a timeout per request: after a failure the store is left
    alone for `cooldown` seconds, then one trial call is let through (others still fail fast)."""

    __slots__ = ("_clock", "_cooldown", "_open_until", "_trial", "failures")

    def __init__(self, *, cooldown: float, clock: Clock = SYSTEM_CLOCK) -> None:
        self._cooldown = cooldown
        self._clock = clock
        self._open_until = 0.0
        self._trial = False
        self.failures = 0

    @property
    def is_open(self) -> bool:
        return self._open_until > self._clock.monotonic() or self._trial

    def retry_after(self) -> int:
        return max(1, math.ceil(self._open_until - self._clock.monotonic()))

    def allow(self) -> bool:
        """Whether a store call may be attempted now; claims the trial slot after a cooldown."""
        if self._open_until == 0.0:
            return True
        if self._trial or self._open_until > self._clock.monotonic():
            return False
        self._trial = True
        return True

    def abandoned(self) -> None:
        """A trial call ended without an answer (cancelled): let the next caller try."""
        self._trial = False

    def succeeded(self) -> None:
        self._open_until = 0.0
        self._trial = False

    def failed(self) -> None:
        self.failures += 1
        self._trial = False
        self._open_until = self._clock.monotonic() + self._cooldown
