"""Circuit breakers per route, upstream or key, on pybreaker's state machine driven from async code.

pybreaker counts a failure only when the guarded call raises inside its own frame; decorating an `async def`
hands it a coroutine object that never fails there (pybreaker issue #7). Here the inner app is awaited by
the middleware and its outcome is reported to pybreaker afterwards, through `CircuitBreaker.call` on a
synchronous function that succeeds or raises: pybreaker keeps the consecutive-failure count, the half-open
success threshold and the transitions; this module adds what it lacks (an error-ratio window, a cap on
half-open trials, timing on the injected clock, shared state through redis.asyncio, async events).
"""

import asyncio
import contextlib
import json
import logging
import sys
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, Protocol

import pybreaker

from nexus_middleware._resilience import (
    REDUCED_CAPACITY,
    KeySpec,
    PolicyRouter,
    remember_state,
    retry_after_header,
)
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import RequestContext, get_context
from nexus_middleware.errors import (
    ConfigurationError,
    StorageError,
    StorageUnavailableError,
)
from nexus_middleware.paths import RouteEntry
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from redis.asyncio import Redis

__all__ = [
    "BreakerEvent",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerStateName",
    "BreakerStateSync",
    "BreakerStates",
    "CircuitBreakerMiddleware",
    "DEFAULT_FAILURE_STATUSES",
    "RedisBreakerSync",
    "SharedBreakerState",
    "StaticResponse",
]

logger = logging.getLogger(__name__)

BreakerStateName = Literal["closed", "open", "half-open"]
DEFAULT_FAILURE_STATUSES = frozenset(range(500, 600)) - {501}

_CLOSED, _OPEN, _HALF_OPEN = pybreaker.STATE_CLOSED, pybreaker.STATE_OPEN, pybreaker.STATE_HALF_OPEN
_DEFAULT_REASONS = {
    (_CLOSED, _OPEN): "consecutive_failures",
    (_HALF_OPEN, _OPEN): "trial_failed",
    (_OPEN, _HALF_OPEN): "reset_timeout",
    (_HALF_OPEN, _CLOSED): "trials_succeeded",
}
# websocket close codes sent before the handshake that stand for a server-side failure
_FAILED_CLOSE_CODES = frozenset({1011, 1013, 1014})


def _describe_statuses(statuses: frozenset[int]) -> str:
    ordered = sorted(statuses)
    parts: list[str] = []
    index = 0
    while index < len(ordered):
        end = index
        while end + 1 < len(ordered) and ordered[end + 1] == ordered[end] + 1:
            end += 1
        first, last = ordered[index], ordered[end]
        parts.append(str(first) if first == last else f"{first}-{last}")
        index = end + 1
    return ",".join(parts)


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When a breaker trips and how it recovers.

    It trips after `failure_threshold` consecutive failures, or when at least `minimum_requests` requests in
    the last `window` seconds failed in a share of `failure_ratio` or more (either trigger may be None, not
    both). It stays open `reset_timeout` seconds, then admits `half_open_max_calls` concurrent trials and
    closes after `success_threshold` successful ones; a failed trial opens it again.
    """

    failure_threshold: int | None = 5
    failure_ratio: float | None = 0.5
    minimum_requests: int = 20
    window: float = 10.0
    reset_timeout: float = 30.0
    half_open_max_calls: int = 1
    success_threshold: int = 1
    failure_statuses: frozenset[int] = DEFAULT_FAILURE_STATUSES
    slow_call_threshold: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "failure_statuses", frozenset(self.failure_statuses))
        if self.failure_threshold is None and self.failure_ratio is None:
            raise ConfigurationError("a breaker needs failure_threshold, failure_ratio or both")
        if self.failure_threshold is not None and self.failure_threshold < 1:
            raise ConfigurationError("failure_threshold must be at least 1")
        if self.failure_ratio is not None and not 0 < self.failure_ratio <= 1:
            raise ConfigurationError("failure_ratio must be in (0, 1]")
        if self.minimum_requests < 1:
            raise ConfigurationError("minimum_requests must be at least 1")
        if self.window <= 0 or self.reset_timeout <= 0:
            raise ConfigurationError("window and reset_timeout must be positive")
        if self.half_open_max_calls < 1 or self.success_threshold < 1:
            raise ConfigurationError("half_open_max_calls and success_threshold must be at least 1")
        if any(not 100 <= status <= 599 for status in self.failure_statuses):
            raise ConfigurationError("failure_statuses must be HTTP statuses")
        if self.slow_call_threshold is not None and self.slow_call_threshold <= 0:
            raise ConfigurationError("slow_call_threshold must be positive")

    def __repr__(self) -> str:
        return (
            f"BreakerPolicy(failure_threshold={self.failure_threshold}, failure_ratio={self.failure_ratio}, "
            f"minimum_requests={self.minimum_requests}, window={self.window}, "
            f"reset_timeout={self.reset_timeout}, half_open_max_calls={self.half_open_max_calls}, "
            f"success_threshold={self.success_threshold}, "
            f"failure_statuses='{_describe_statuses(self.failure_statuses)}', "
            f"slow_call_threshold={self.slow_call_threshold})"
        )


@dataclass(frozen=True, slots=True)
class BreakerEvent:
    """A state transition, for audit and metrics. `at` and `open_until` are wall-clock epoch seconds.

    `reason`: consecutive_failures, error_ratio, trial_failed, reset_timeout, trials_succeeded, remote
    (adopted from another instance), manual (`reset` / `force_open`).
    """

    key: str
    previous: BreakerStateName
    state: BreakerStateName
    reason: str
    at: float
    open_until: float | None = None


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """The current state of one breaker, as `CircuitBreakerMiddleware.states()` lists it."""

    key: str
    state: BreakerStateName
    consecutive_failures: int
    window_requests: int
    window_failures: int
    in_flight: int
    trials_in_flight: int
    trial_successes: int
    retry_after: float | None  # seconds until half-open, while open
    open_until: float | None  # wall-clock epoch seconds, while open


@dataclass(frozen=True, slots=True)
class SharedBreakerState:
    """What instances share about a breaker: its last transition, in wall-clock epoch seconds."""

    state: BreakerStateName
    changed_at: float
    open_until: float | None = None


class BreakerStateSync(Protocol):
    """Shares breaker transitions between instances. `staleness`: how old a local view may get (seconds)."""

    @property
    def staleness(self) -> float: ...

    async def publish(self, key: str, state: SharedBreakerState) -> None:
        """Record the last transition of breaker `key`; raises `StorageError` when the store fails."""
        ...

    async def fetch(self, key: str) -> SharedBreakerState | None:
        """The last transition any instance published for `key`; raises `StorageError` on failure."""
        ...


class RedisBreakerSync:
    """Breaker transitions shared through Redis with `redis.asyncio`; never a blocking call on the loop.

    Each transition is written to `<prefix><key>` (JSON, expiring after `ttl`); each instance reads a
    breaker's record at most once per `staleness` seconds, on the request path, bounded by `timeout`.
    """

    def __init__(
        self,
        client: "Redis",
        *,
        prefix: str = "nexus:breaker:",
        staleness: float = 1.0,
        timeout: float = 0.25,
        ttl: float = 86_400.0,
    ) -> None:
        if staleness < 0 or timeout <= 0 or ttl <= 0:
            raise ConfigurationError("staleness must be >= 0; timeout and ttl positive")
        from redis.exceptions import RedisError

        self._client = client
        self._prefix = prefix
        self._staleness = staleness
        self._timeout = timeout
        self._ttl_ms = int(ttl * 1000)
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)

    @property
    def staleness(self) -> float:
        return self._staleness

    def __repr__(self) -> str:
        return f"RedisBreakerSync(prefix={self._prefix!r}, staleness={self._staleness})"

    async def publish(self, key: str, state: SharedBreakerState) -> None:
        payload = json.dumps(
            {"state": state.state, "changed_at": state.changed_at, "open_until": state.open_until}
        )
        try:
            async with asyncio.timeout(self._timeout):
                await self._client.set(self._prefix + key, payload, px=self._ttl_ms)
        except self._errors as exc:
            raise StorageUnavailableError(f"cannot publish breaker state: {exc!r}") from exc

    async def fetch(self, key: str) -> SharedBreakerState | None:
        try:
            async with asyncio.timeout(self._timeout):
                raw = await self._client.get(self._prefix + key)
        except self._errors as exc:
            raise StorageUnavailableError(f"cannot read breaker state: {exc!r}") from exc
        if raw is None:
            return None
        try:
            data = json.loads(raw)
            state = data["state"]
            if state not in (_CLOSED, _OPEN, _HALF_OPEN):
                raise ValueError(state)
            open_until = data.get("open_until")
            return SharedBreakerState(
                state, float(data["changed_at"]), None if open_until is None else float(open_until)
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StorageError(f"malformed breaker state for {key!r}") from exc


class BreakerStates:
    """Breakers that outlive one middleware instance, for an app that rebuilds its stack (a gateway's reload).

    Give the same instance to a middleware and to the one that replaces it: a breaker whose key keeps an equal
    policy keeps its state and counts; a key whose policy changed starts a new, closed breaker. While the
    replaced middleware finishes its last requests, they never reset a breaker the newer one created.
    """

    __slots__ = ("circuits", "epoch")

    def __init__(self) -> None:
        self.circuits: OrderedDict[str, _Circuit] = OrderedDict()
        self.epoch = 0  # bumped by each middleware built on these states: the newest one owns a key

    def __repr__(self) -> str:
        return f"BreakerStates(breakers={len(self.circuits)})"


class StaticResponse:
    """A fixed response usable as a breaker fallback (any ASGI app is too). Headers are computed once."""

    __slots__ = ("_body", "_headers", "_status")

    def __init__(
        self,
        *,
        status: int = 200,
        body: bytes = b"",
        content_type: str = "application/json",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        if not 200 <= status <= 599:
            raise ConfigurationError("status must be an HTTP status")
        self._status = status
        self._body = body
        self._headers = [
            (b"content-type", content_type.encode("latin-1")),
            (b"content-length", str(len(body)).encode()),
            *((name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers),
        ]

    def __repr__(self) -> str:
        return f"StaticResponse(status={self._status}, body={self._body[:40]!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self._status, "headers": list(self._headers)})
        await send({"type": "http.response.body", "body": self._body})


class _ReportedFailure(Exception):
    """Raised inside pybreaker's guarded call to count one failure."""


def _fail() -> None:
    raise _ReportedFailure


def _succeed() -> None:
    return None


class _Window:
    """Requests and failures over the last `window` seconds, in ten buckets on the injected clock."""

    __slots__ = ("_buckets", "_count", "_width")

    def __init__(self, window: float, count: int = 10) -> None:
        self._count = count
        self._width = window / count
        self._buckets = [[-1, 0, 0] for _ in range(count)]  # [bucket number, requests, failures]

    def add(self, now: float, failed: bool) -> None:
        number = int(now // self._width)
        bucket = self._buckets[number % self._count]
        if bucket[0] != number:
            bucket[0], bucket[1], bucket[2] = number, 0, 0
        bucket[1] += 1
        if failed:
            bucket[2] += 1

    def totals(self, now: float) -> tuple[int, int]:
        oldest = int(now // self._width) - self._count + 1
        requests = failures = 0
        for number, bucket_requests, bucket_failures in self._buckets:
            if number >= oldest:
                requests += bucket_requests
                failures += bucket_failures
        return requests, failures

    def clear(self) -> None:
        for bucket in self._buckets:
            bucket[0], bucket[1], bucket[2] = -1, 0, 0


class _Transitions(pybreaker.CircuitBreakerListener):
    def __init__(self, circuit: "_Circuit") -> None:
        self._circuit = circuit

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        self._circuit.transitioned(_CLOSED if old_state is None else old_state.name, new_state.name)


class _Circuit:
    """One breaker: pybreaker's state machine plus the window, the trial cap and the open-until time."""

    __slots__ = (
        "breaker",
        "changed_at",
        "clock",
        "epoch",
        "events",
        "generation",
        "in_flight",
        "key",
        "next_open_until",
        "next_reason",
        "open_until",
        "policy",
        "remote",
        "state",
        "synced_at",
        "trials",
        "window",
    )

    def __init__(self, key: str, policy: BreakerPolicy, clock: Clock, epoch: int = 0) -> None:
        self.key = key
        self.policy = policy
        self.clock = clock
        self.epoch = epoch  # the `BreakerStates` epoch of the middleware that created or adopted it
        self.state: str = _CLOSED
        self.generation = 0  # bumped on every transition: outcomes of an earlier state are not reported
        self.open_until = 0.0  # monotonic
        self.changed_at = 0.0  # wall clock of the last transition, to order shared records
        self.in_flight = 0
        self.trials = 0
        self.synced_at = -float("inf")
        self.events: list[tuple[BreakerEvent, bool]] = []  # (event, to publish)
        self.next_reason: str | None = None
        self.next_open_until: float | None = None
        self.remote = False
        self.window = None if policy.failure_ratio is None else _Window(policy.window)
        self.breaker = pybreaker.CircuitBreaker(
            fail_max=policy.failure_threshold or sys.maxsize,
            reset_timeout=policy.reset_timeout,
            success_threshold=policy.success_threshold,
            listeners=[_Transitions(self)],
            name=key,
            throw_new_error_on_trip=False,  # keep our marker exception; we never let pybreaker raise its own
        )

    def transitioned(self, previous: str, state: str) -> None:
        now, wall = self.clock.monotonic(), self.clock.time()
        self.generation += 1
        self.state = state
        self.trials = 0
        reason = self.next_reason or _DEFAULT_REASONS.get((previous, state), "manual")
        self.next_reason = None
        open_until_wall = None
        if state == _OPEN:
            scheduled = self.next_open_until
            self.open_until = now + self.policy.reset_timeout if scheduled is None else scheduled
            open_until_wall = wall + (self.open_until - now)
        self.next_open_until = None
        if state != _HALF_OPEN and self.window is not None:
            self.window.clear()
        if not self.remote:
            self.changed_at = wall
        event = BreakerEvent(self.key, previous, state, reason, wall, open_until_wall)  # type: ignore[arg-type]
        self.events.append((event, not self.remote))
        logger.info("breaker %r: %s -> %s (%s)", self.key, previous, state, reason)

    def admit(self, now: float) -> str:
        """allow, trial or reject; counts the request in flight unless rejected."""
        if self.state == _CLOSED:
            self.in_flight += 1
            return "allow"
        if self.state == _OPEN:
            if now < self.open_until:
                return "reject"
            self.breaker.half_open()
        if self.trials < self.policy.half_open_max_calls:
            self.trials += 1
            self.in_flight += 1
            return "trial"
        return "reject"

    def finish(self, generation: int, trial: bool, failure: bool | None) -> None:
        """Report one outcome: failure True/False, None when neither (a local response)."""
        self.in_flight -= 1
        if generation != self.generation:
            return
        if trial:
            self.trials -= 1
        if failure is None:
            return
        if failure or self.state != _CLOSED or self.breaker.fail_counter:
            with contextlib.suppress(_ReportedFailure):
                self.breaker.call(_fail if failure else _succeed)
        window = self.window
        if window is None or generation != self.generation or self.state != _CLOSED:
            return
        now = self.clock.monotonic()
        window.add(now, failure)
        if failure and self.policy.failure_ratio is not None:
            requests, failures = window.totals(now)
            if requests >= self.policy.minimum_requests and failures >= self.policy.failure_ratio * requests:
                self.next_reason = "error_ratio"
                self.breaker.open()

    def adopt(self, shared: SharedBreakerState) -> None:
        """Apply a transition another instance published, when it is newer than ours."""
        if shared.changed_at <= self.changed_at:
            return
        now, wall = self.clock.monotonic(), self.clock.time()
        self.remote = True
        try:
            if shared.state == _OPEN and shared.open_until is not None and shared.open_until > wall:
                open_until = now + (shared.open_until - wall)
                if self.state == _OPEN:
                    self.open_until = open_until
                else:
                    self.next_reason, self.next_open_until = "remote", open_until
                    self.breaker.open()
            elif shared.state == _CLOSED and self.state != _CLOSED:
                self.next_reason = "remote"
                self.breaker.close()
        finally:
            self.remote = False
        self.changed_at = shared.changed_at

    def snapshot(self) -> BreakerSnapshot:
        now = self.clock.monotonic()
        requests, failures = (0, 0) if self.window is None else self.window.totals(now)
        is_open = self.state == _OPEN
        return BreakerSnapshot(
            key=self.key,
            state=self.state,  # type: ignore[arg-type]
            consecutive_failures=self.breaker.fail_counter,
            window_requests=requests,
            window_failures=failures,
            in_flight=self.in_flight,
            trials_in_flight=self.trials if self.state == _HALF_OPEN else 0,
            trial_successes=self.breaker.success_counter if self.state == _HALF_OPEN else 0,
            retry_after=max(0.0, self.open_until - now) if is_open else None,
            open_until=self.clock.time() + (self.open_until - now) if is_open else None,
        )


class _Probe:
    """Per-request: forwards messages and notes the status, when it started and whether it was local."""

    __slots__ = ("close_code", "context", "local", "send_downstream", "started", "status")

    def __init__(self, send: Send, context: RequestContext) -> None:
        self.send_downstream = send
        self.context = context
        self.status: int | None = None
        self.close_code: int | None = None
        self.started = 0.0
        self.local = False

    async def send(self, message: Message) -> None:
        if self.status is None:
            kind = message["type"]
            if kind == "http.response.start" or kind == "websocket.http.response.start":
                self.status = message["status"]
                self.local = self.context.local_response is not None
            elif kind == "websocket.accept":
                self.status = 101
            elif kind == "websocket.close":
                self.status = 0
                self.close_code = message.get("code", 1000)
                self.local = self.context.local_response is not None
        await self.send_downstream(message)


def _idle(circuit: _Circuit) -> bool:
    return circuit.state == _CLOSED and not circuit.in_flight


class CircuitBreakerMiddleware:
    """Fails fast while a route's or an upstream's breaker is open, and lets trials probe its recovery."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        policy: BreakerPolicy | None = BreakerPolicy(),
        key: KeySpec = "route",
        routes: Iterable[RouteEntry[BreakerPolicy | None]] = (),
        key_policies: Mapping[str, BreakerPolicy | None] | None = None,
        fallback: ASGIApp | None = None,
        sync: BreakerStateSync | None = None,
        on_event: Callable[[BreakerEvent], Awaitable[None]] | None = None,
        max_breakers: int = 1024,
        shared: BreakerStates | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if max_breakers < 1:
            raise ConfigurationError("max_breakers must be at least 1")
        if fallback is not None and not callable(fallback):
            raise ConfigurationError("fallback must be an ASGI app")
        self.app = app
        self._router = PolicyRouter(key, policy, routes, key_policies, policy_type=BreakerPolicy)
        self._fallback = fallback
        self._sync = sync
        self._staleness = 0.0 if sync is None else sync.staleness
        self._on_event = on_event
        self._max_breakers = max_breakers
        self._clock = clock
        states = shared if shared is not None else BreakerStates()
        states.epoch += 1
        self._epoch = states.epoch
        self._circuits = states.circuits
        for name, circuit in list(self._circuits.items()):
            # Forget now the breakers whose key alone says the policy changed, so `states()` shows them
            # closed at once; route-dependent keys are compared on their next request instead.
            known, expected = self._router.key_policy(name)
            if known and expected != circuit.policy:
                del self._circuits[name]

    def states(self) -> Mapping[str, BreakerSnapshot]:
        """Every live breaker's state, by key (the admin API lists these)."""
        return MappingProxyType({key: circuit.snapshot() for key, circuit in self._circuits.items()})

    async def reset(self, key: str) -> bool:
        """Close breaker `key` now (an operator's override). False when no such breaker is live."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return False
        if circuit.state != _CLOSED:
            circuit.next_reason = "manual"
            circuit.breaker.close()
            await self._flush(circuit)
        return True

    async def force_open(self, key: str, *, duration: float | None = None) -> bool:
        """Open breaker `key` for `duration` seconds (default: its reset timeout). False when not live."""
        circuit = self._circuits.get(key)
        if circuit is None:
            return False
        circuit.next_reason = "manual"
        if duration is not None:
            circuit.next_open_until = self._clock.monotonic() + duration
        circuit.breaker.open()
        await self._flush(circuit)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        resolved = await self._router.route(scope, receive, send, self.app, "breaker")
        if resolved is None:
            return
        key, policy = resolved
        circuit = self._circuit(key, policy)
        sync = self._sync
        if sync is not None and self._clock.monotonic() - circuit.synced_at >= self._staleness:
            await self._pull(sync, circuit)
        started = self._clock.monotonic()
        admission = circuit.admit(started)
        if circuit.events:
            await self._flush(circuit)
        context = get_context(scope)
        context.record("breaker", admission, key=key, state=circuit.state)
        if admission == "reject":
            await self._refuse(scope, receive, send, circuit, context, started)
            return
        generation = circuit.generation
        probe = _Probe(send, context)
        failure: bool | None = True  # an exception or a cancellation (an outer deadline) is a failure
        try:
            await self.app(scope, receive, probe.send)
            failure = self._judge(probe, policy, started)
        finally:
            circuit.finish(generation, admission == "trial", failure)
            if circuit.events:
                await self._flush(circuit)

    def _judge(self, probe: _Probe, policy: BreakerPolicy, started: float) -> bool | None:
        if probe.local:
            return None
        status = probe.status
        if status is None:
            return True  # the app returned without answering
        if status == 0:
            return probe.close_code in _FAILED_CLOSE_CODES
        if status in policy.failure_statuses:
            return True
        slow = policy.slow_call_threshold
        return slow is not None and self._clock.monotonic() - started > slow

    def _circuit(self, key: str, policy: BreakerPolicy) -> _Circuit:
        circuits = self._circuits
        circuit = circuits.get(key)
        if circuit is not None:
            if circuit.policy is policy:  # the steady state: one identity check per request
                circuits.move_to_end(key)
                return circuit
            if circuit.policy == policy:
                if self._epoch > circuit.epoch:  # adopted from the middleware this one replaced
                    circuit.policy, circuit.epoch = policy, self._epoch
                circuits.move_to_end(key)
                return circuit
            if circuit.epoch > self._epoch:
                # A newer middleware owns this key under another policy: this one is being replaced, and its
                # last requests use a breaker of their own rather than resetting the newer one's.
                return _Circuit(key, policy, self._clock, self._epoch)
        # An open or busy breaker is forgotten only when no closed, idle one is left to forget.
        return remember_state(
            circuits,
            key,
            _Circuit(key, policy, self._clock, self._epoch),
            self._max_breakers,
            _idle,
            evict_busy=True,
        )

    async def _refuse(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        circuit: _Circuit,
        context: RequestContext,
        now: float,
    ) -> None:
        if self._fallback is not None and scope["type"] == "http":
            if context.local_response is None:
                context.local_response = "breaker"
            await self._fallback(scope, receive, send)
            return
        is_open = circuit.state == _OPEN
        retry_after = circuit.open_until - now if is_open else 1.0
        detail = (
            "The service is temporarily unavailable; its circuit breaker is open."
            if is_open
            else "The service is recovering; only trial requests are let through."
        )
        await send_problem(
            scope,
            send,
            Problem(503, detail, type=REDUCED_CAPACITY),
            headers=[retry_after_header(retry_after)],
            layer="breaker",
        )

    async def _pull(self, sync: BreakerStateSync, circuit: _Circuit) -> None:
        circuit.synced_at = self._clock.monotonic()  # one reader per period: the others keep the local view
        try:
            shared = await sync.fetch(circuit.key)
        except StorageError as exc:
            logger.warning("breaker %r: shared state unavailable, using local state: %s", circuit.key, exc)
            return
        if shared is not None:
            circuit.adopt(shared)

    async def _flush(self, circuit: _Circuit) -> None:
        events, circuit.events = circuit.events, []
        if self._sync is not None:
            own = [event for event, publish in events if publish]
            if own:
                last = own[-1]
                try:
                    await self._sync.publish(
                        circuit.key, SharedBreakerState(last.state, last.at, last.open_until)
                    )
                except StorageError as exc:
                    logger.warning("breaker %r: cannot share its state: %s", circuit.key, exc)
        if self._on_event is not None:
            for event, _ in events:
                try:
                    await self._on_event(event)
                except Exception:
                    logger.exception("breaker %r: the on_event hook failed", circuit.key)

    def __repr__(self) -> str:
        return f"CircuitBreakerMiddleware(breakers={len(self._circuits)}, sync={self._sync!r})"
