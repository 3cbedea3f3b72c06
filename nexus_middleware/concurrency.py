"""Bulkheads: a cap on in-flight requests per key, with priority load shedding and an adaptive limit.

Each priority class may use a share of the limit: a request is admitted while fewer than
`share x limit` requests are in flight, so as load grows the classes with the smallest share are shed first
and the first (critical) class keeps the capacity the others may not use. An optional bounded queue holds
requests for up to `queue_timeout`, served in priority order. In adaptive mode the limit follows observed
latency with a gradient, as Netflix's concurrency-limits (Gradient2) and Envoy's adaptive concurrency do:
it shrinks while recent latency exceeds `tolerance x` the long-run baseline and grows back otherwise.
"""

import asyncio
import math
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nexus_middleware._resilience import (
    REDUCED_CAPACITY,
    KeySpec,
    PolicyRouter,
    remember_state,
    retry_after_header,
)
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import RequestContext, get_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.headers import get_header
from nexus_middleware.paths import RouteEntry, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AdaptiveLimit",
    "ConcurrencyLimitMiddleware",
    "ConcurrencyPolicy",
    "ConcurrencySnapshot",
    "PriorityClass",
]

_SHORT_ALPHA = 2 / (10 + 1)  # recent latency: an EWMA over about ten samples


@dataclass(frozen=True, slots=True)
class PriorityClass:
    """A class of requests admitted while fewer than `share x limit` requests are in flight."""

    name: str
    share: float = 1.0

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigurationError("a priority class needs a name")
        if not 0 < self.share <= 1:
            raise ConfigurationError(f"priority class {self.name!r}: share must be in (0, 1]")


@dataclass(frozen=True, slots=True)
class AdaptiveLimit:
    """A limit that follows latency, between `min_limit` and `max_limit` (the policy's limit is the start).

    After each sample: gradient = clamp(tolerance x baseline / recent, 0.5, 1); the limit moves by
    `smoothing` towards `limit x gradient + sqrt(limit)`. `baseline_samples`: how slowly the baseline moves.
    """

    min_limit: int = 1
    max_limit: int = 1000
    tolerance: float = 1.5
    smoothing: float = 0.2
    baseline_samples: int = 500

    def __post_init__(self) -> None:
        if not 1 <= self.min_limit <= self.max_limit:
            raise ConfigurationError("adaptive limits need 1 <= min_limit <= max_limit")
        if self.tolerance < 1:
            raise ConfigurationError("tolerance must be at least 1")
        if not 0 < self.smoothing <= 1:
            raise ConfigurationError("smoothing must be in (0, 1]")
        if self.baseline_samples < 1:
            raise ConfigurationError("baseline_samples must be at least 1")


@dataclass(frozen=True, slots=True)
class ConcurrencyPolicy:
    """The limit of one key. `classes` are listed highest priority first, with non-increasing shares."""

    max_concurrent: int = 100
    queue_size: int = 0
    queue_timeout: float = 1.0
    classes: tuple[PriorityClass, ...] = (PriorityClass("default"),)
    default_class: str = "default"
    adaptive: AdaptiveLimit | None = None
    retry_after: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "classes", tuple(self.classes))
        if self.max_concurrent < 1:
            raise ConfigurationError("max_concurrent must be at least 1")
        if self.queue_size < 0 or self.queue_timeout <= 0 or self.retry_after <= 0:
            raise ConfigurationError("queue_size must be >= 0; queue_timeout and retry_after positive")
        names = [c.name for c in self.classes]
        if not names or len(set(names)) != len(names):
            raise ConfigurationError("classes must be a non-empty sequence of distinct names")
        if any(a.share < b.share for a, b in zip(self.classes, self.classes[1:], strict=False)):
            raise ConfigurationError("class shares must not increase from the highest priority down")
        if self.default_class not in names:
            raise ConfigurationError(f"default_class {self.default_class!r} is not one of {names}")
        adaptive = self.adaptive
        if adaptive is not None and not adaptive.min_limit <= self.max_concurrent <= adaptive.max_limit:
            raise ConfigurationError("max_concurrent (the initial adaptive limit) must be within its bounds")

    def rank(self, name: str | None) -> int | None:
        for index, priority in enumerate(self.classes):
            if priority.name == name:
                return index
        return None


@dataclass(frozen=True, slots=True)
class ConcurrencySnapshot:
    """One key's bulkhead, as `ConcurrencyLimitMiddleware.states()` lists it."""

    key: str
    limit: int
    in_flight: int
    queued: int
    baseline_latency: float | None
    recent_latency: float | None


class _Bulkhead:
    __slots__ = ("baseline", "in_flight", "key", "limit", "policy", "queued", "recent", "waiters")

    def __init__(self, key: str, policy: ConcurrencyPolicy) -> None:
        self.key = key
        self.policy = policy
        self.limit = float(policy.max_concurrent)
        self.in_flight = 0
        self.queued = 0
        self.waiters: list[deque[asyncio.Future[bool]]] = [deque() for _ in policy.classes]
        self.baseline: float | None = None
        self.recent: float | None = None

    def threshold(self, rank: int) -> int:
        return max(1, math.floor(self.policy.classes[rank].share * int(self.limit) + 1e-9))

    def try_acquire(self, rank: int) -> bool:
        if self.in_flight >= self.threshold(rank):
            return False
        if self.queued and any(self.waiters[r] for r in range(rank + 1)):
            return False  # equal or higher priority requests are already waiting: queue behind them
        self.in_flight += 1
        return True

    def displace(self, rank: int) -> bool:
        """Make room in a full queue by shedding the newest waiter of a lower class than `rank`."""
        for lower in range(len(self.waiters) - 1, rank, -1):
            queue = self.waiters[lower]
            while queue:
                future = queue.pop()
                self.queued -= 1
                if not future.done():  # a done one was cancelled: its waiter is leaving
                    future.set_result(False)
                    return True
        return False

    def enqueue(self, rank: int) -> "asyncio.Future[bool]":
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.waiters[rank].append(future)
        self.queued += 1
        return future

    def abandon(self, future: "asyncio.Future[bool]", rank: int) -> None:
        if future.done() and not future.cancelled():
            if future.result():
                self.release(None)  # the slot was handed over as the wait ended: pass it on
            return
        future.cancel()
        try:
            self.waiters[rank].remove(future)
            self.queued -= 1
        except ValueError:
            pass

    def release(self, latency: float | None) -> None:
        self.in_flight -= 1
        if latency is not None and self.policy.adaptive is not None:
            self._adapt(latency, self.policy.adaptive)
        if self.queued:
            self._wake()

    def _wake(self) -> None:
        for rank, queue in enumerate(self.waiters):
            threshold = self.threshold(rank)
            while queue and self.in_flight < threshold:
                future = queue.popleft()
                self.queued -= 1
                if not future.done():  # a done one was cancelled: its waiter is leaving
                    self.in_flight += 1
                    future.set_result(True)
            if queue:
                return  # lower classes never overtake a waiting higher class

    def _adapt(self, latency: float, adaptive: AdaptiveLimit) -> None:
        latency = max(latency, 1e-6)
        baseline = self.baseline
        recent = self.recent
        if baseline is None or recent is None:
            self.baseline = self.recent = latency
            return
        baseline += (latency - baseline) * 2 / (adaptive.baseline_samples + 1)
        recent += (latency - recent) * _SHORT_ALPHA
        self.baseline, self.recent = baseline, recent
        gradient = max(0.5, min(1.0, adaptive.tolerance * baseline / recent))
        limit = self.limit
        target = limit * gradient + math.sqrt(limit)
        limit += (target - limit) * adaptive.smoothing
        self.limit = min(float(adaptive.max_limit), max(float(adaptive.min_limit), limit))

    def snapshot(self) -> ConcurrencySnapshot:
        return ConcurrencySnapshot(
            self.key, int(self.limit), self.in_flight, self.queued, self.baseline, self.recent
        )


class _Slot:
    """Per-request: holds the slot and gives it back once the final response message is sent."""

    __slots__ = ("admitted", "bulkhead", "clock", "context", "released", "send_downstream")

    def __init__(self, bulkhead: _Bulkhead, send: Send, context: RequestContext, clock: Clock) -> None:
        self.bulkhead = bulkhead
        self.send_downstream = send
        self.context = context
        self.clock = clock
        self.admitted = clock.monotonic()
        self.released = False

    async def send(self, message: Message) -> None:
        await self.send_downstream(message)
        kind = message["type"]
        if kind == "http.response.body":
            if not message.get("more_body", False):
                self.release(True)
        elif kind == "websocket.accept" or kind == "websocket.close":
            self.release(False)  # a websocket holds a slot during its handshake only

    def release(self, sample: bool) -> None:
        if self.released:
            return
        self.released = True
        latency = None
        if sample and self.context.local_response is None:
            latency = self.clock.monotonic() - self.admitted
        self.bulkhead.release(latency)


def _idle(bulkhead: _Bulkhead) -> bool:
    return not (bulkhead.in_flight or bulkhead.queued)


class ConcurrencyLimitMiddleware:
    """Caps in-flight requests per key, queueing briefly and shedding the lowest priority classes first."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        policy: ConcurrencyPolicy | None = ConcurrencyPolicy(),
        key: KeySpec = "route",
        routes: Iterable[RouteEntry[ConcurrencyPolicy | None]] = (),
        key_policies: Mapping[str, ConcurrencyPolicy | None] | None = None,
        classify: Callable[[Scope], str | None] | None = None,
        route_classes: Iterable[RouteEntry[str]] = (),
        priority_header: str | None = None,
        max_keys: int = 1024,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_keys < 1:
            raise ConfigurationError("max_keys must be at least 1")
        if classify is not None and not callable(classify):
            raise ConfigurationError("classify must be a callable")
        self.app = app
        self._router = PolicyRouter(key, policy, routes, key_policies, policy_type=ConcurrencyPolicy)
        self._classify = classify
        self._route_classes: RouteTable[str] | None = RouteTable(route_classes) or None
        self._priority_header = None if priority_header is None else priority_header.lower().encode("latin-1")
        self._max_keys = max_keys
        self._clock = clock
        self._bulkheads: OrderedDict[str, _Bulkhead] = OrderedDict()

    def states(self) -> Mapping[str, ConcurrencySnapshot]:
        """Every live bulkhead by key: its current limit, in-flight and queued requests."""
        return MappingProxyType({key: bulkhead.snapshot() for key, bulkhead in self._bulkheads.items()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        resolved = await self._router.route(scope, receive, send, self.app, "concurrency")
        if resolved is None:
            return
        key, policy = resolved
        bulkhead = self._bulkhead(key, policy)
        name = self._class_name(scope, policy)
        rank = policy.rank(name)
        if rank is None:
            name = policy.default_class
            rank = policy.rank(name) or 0
        context = get_context(scope)
        if not bulkhead.try_acquire(rank):
            outcome = await self._wait(bulkhead, policy, rank)
            if outcome != "allow":
                context.record("concurrency", outcome, key=key, priority=name)
                await send_problem(
                    scope,
                    send,
                    Problem(503, _DETAILS[outcome], type=REDUCED_CAPACITY),
                    headers=[retry_after_header(policy.retry_after)],
                    layer="concurrency",
                )
                return
        context.record("concurrency", "allow", key=key, priority=name)
        slot = _Slot(bulkhead, send, context, self._clock)
        try:
            await self.app(scope, receive, slot.send)
        finally:
            slot.release(False)

    async def _wait(self, bulkhead: _Bulkhead, policy: ConcurrencyPolicy, rank: int) -> str:
        if policy.queue_size == 0:
            return "shed"
        if bulkhead.queued >= policy.queue_size and not bulkhead.displace(rank):
            return "shed"
        future = bulkhead.enqueue(rank)
        try:
            async with asyncio.timeout(policy.queue_timeout):
                admitted = await future
        except TimeoutError:
            bulkhead.abandon(future, rank)
            return "queue_timeout"
        except BaseException:
            bulkhead.abandon(future, rank)
            raise
        return "allow" if admitted else "shed"

    def _class_name(self, scope: Scope, policy: ConcurrencyPolicy) -> str | None:
        if self._classify is not None:
            name = self._classify(scope)
            if name is not None:
                return name
        if self._route_classes is not None:
            try:
                path = request_path(scope)
                name = self._route_classes.for_request(scope).lookup(path, scope.get("method", "GET"))
            except InvalidPathError:
                name = None
            if name is not None:
                return name
        if self._priority_header is not None:
            value = get_header(scope["headers"], self._priority_header)
            if value is not None:
                return value.decode("latin-1").strip()
        return None

    def _bulkhead(self, key: str, policy: ConcurrencyPolicy) -> _Bulkhead:
        bulkheads = self._bulkheads
        bulkhead = bulkheads.get(key)
        if bulkhead is not None:
            bulkheads.move_to_end(key)
            return bulkhead
        return remember_state(bulkheads, key, _Bulkhead(key, policy), self._max_keys, _idle, evict_busy=False)

    def __repr__(self) -> str:
        return f"ConcurrencyLimitMiddleware(keys={len(self._bulkheads)})"


_DETAILS = {
    "shed": "The service is at capacity; the request was shed.",
    "queue_timeout": "The service is at capacity; the request waited too long for a slot.",
}
