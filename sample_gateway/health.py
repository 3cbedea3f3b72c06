"""Target health: active checks on a schedule, passive outlier detection, and live load figures.

A target is served when its active checks say healthy (it starts healthy, becomes unhealthy after
`unhealthy_threshold` failed checks in a row and healthy again after `healthy_threshold` good ones) and it is
not ejected. Passive outlier detection watches real traffic through the `AttemptObserver` the proxy calls:
`consecutive_failures` upstream failures in a row eject the target for `base_ejection` seconds, doubling on
each new ejection up to `max_ejection`, and never more than `max_ejected_share` of the pool at once. Only
upstream failures count (connect errors, timeouts, invalid responses, 5xx statuses): a client that went away
(`cancelled`) and every answer the gateway gave itself (401, 429, 503 from a breaker...) never reach the
observer as failures, because the proxy only reports what the upstream did.

The same observer keeps the in-flight count and a decaying (EWMA) latency per target for the balancers.
The request path only reads a cached tuple of healthy targets; the cache is rebuilt when a state changes or
an ejection expires.
"""

import asyncio
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from sample_gateway.contracts import AttemptOutcome, Target

if TYPE_CHECKING:
    import httpx

    from sample_gateway.config import HealthCheckConfig, OutlierConfig

__all__ = [
    "ActiveCheckPolicy",
    "ActiveHealthChecker",
    "HealthTracker",
    "OutlierPolicy",
    "ServiceHealth",
    "TargetState",
]

logger = logging.getLogger(__name__)

_FAILURES: frozenset[str] = frozenset({"connect_error", "timeout", "protocol_error"})
_FAILURE_LATENCY_PENALTY = 1.0  # seconds: a failed attempt must not make a target look fast


@dataclass(frozen=True, slots=True)
class OutlierPolicy:
    enabled: bool = True
    consecutive_failures: int = 5
    base_ejection: float = 30.0
    max_ejection: float = 300.0
    max_ejected_share: float = 0.5
    ewma_decay: float = 10.0

    @classmethod
    def from_config(cls, config: "OutlierConfig", *, ewma_decay: float = 10.0) -> "OutlierPolicy":
        return cls(
            enabled=config.enabled,
            consecutive_failures=config.consecutive_failures,
            base_ejection=config.base_ejection,
            max_ejection=config.max_ejection,
            max_ejected_share=config.max_ejected_share,
            ewma_decay=ewma_decay,
        )


@dataclass(frozen=True, slots=True)
class ActiveCheckPolicy:
    enabled: bool = True
    path: str = "/healthz"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 2

    @classmethod
    def from_config(cls, config: "HealthCheckConfig") -> "ActiveCheckPolicy":
        return cls(
            enabled=config.enabled,
            path=config.path,
            interval=config.interval,
            timeout=config.timeout,
            healthy_threshold=config.healthy_threshold,
            unhealthy_threshold=config.unhealthy_threshold,
        )


class TargetState:
    """What the gateway knows about one target right now."""

    __slots__ = (
        "active_healthy",
        "check_failures",
        "check_successes",
        "ejected_until",
        "ejections",
        "ewma",
        "ewma_at",
        "in_flight",
        "last_check_error",
        "passive_failures",
        "target",
    )

    def __init__(self, target: Target) -> None:
        self.target = target
        self.active_healthy = True  # optimistic: a new target serves until checks say otherwise
        self.check_successes = 0
        self.check_failures = 0
        self.last_check_error: str | None = None
        self.passive_failures = 0
        self.ejected_until: float | None = None
        self.ejections = 0
        self.in_flight = 0
        self.ewma: float | None = None
        self.ewma_at = 0.0

    def ejected(self, now: float) -> bool:
        return self.ejected_until is not None and now < self.ejected_until

    def to_dict(self, now: float) -> dict[str, Any]:
        ejected = self.ejected(now)
        return {
            "healthy": self.active_healthy and not ejected,
            "active_check": "healthy" if self.active_healthy else "unhealthy",
            "last_check_error": self.last_check_error,
            "ejected": ejected,
            "ejected_for": round(self.ejected_until - now, 3) if ejected and self.ejected_until else 0.0,
            "ejections": self.ejections,
            "consecutive_failures": self.passive_failures,
            "in_flight": self.in_flight,
            "latency_ewma_ms": None if self.ewma is None else round(self.ewma * 1000, 3),
        }


class ServiceHealth:
    """The health of one service's targets; the `AttemptObserver` the proxy calls for that service."""

    def __init__(
        self, service: str, *, outlier: OutlierPolicy = OutlierPolicy(), clock: Clock = SYSTEM_CLOCK
    ):
        self.service = service
        self._outlier = outlier
        self._clock = clock
        self._states: dict[str, TargetState] = {}
        self._healthy: tuple[Target, ...] = ()
        self._valid_until = math.inf
        self._dirty = True
        self.generation = 0  # bumped whenever the healthy set may have changed

    def __repr__(self) -> str:
        return f"ServiceHealth({self.service!r}, targets={len(self._states)})"

    @property
    def outlier(self) -> OutlierPolicy:
        return self._outlier

    def set_outlier_policy(self, policy: OutlierPolicy) -> None:
        self._outlier = policy

    def sync(self, targets: Iterable[Target]) -> None:
        """Adopt the registry's current targets, keeping the state of those that stay."""
        states: dict[str, TargetState] = {}
        for target in targets:
            state = self._states.get(target.id)
            if state is None:
                state = TargetState(target)
            else:
                state.target = target
            states[target.id] = state
        self._states = states
        self._invalidate()

    def state(self, target_id: str) -> TargetState | None:
        return self._states.get(target_id)

    def states(self) -> list[TargetState]:
        return list(self._states.values())

    def targets(self) -> tuple[Target, ...]:
        return tuple(state.target for state in self._states.values())

    def healthy(self) -> tuple[Target, ...]:
        """The targets to balance over, in registry order. Cheap: cached between state changes."""
        # No clock read while nothing is ejected (valid_until is infinite): this runs on every request.
        if self._dirty or (self._valid_until != math.inf and self._clock.monotonic() >= self._valid_until):
            self._recompute()
        return self._healthy

    # -- load figures for the balancers ---------------------------------------------------------------

    def in_flight(self, target: Target) -> int:
        state = self._states.get(target.id)
        return 0 if state is None else state.in_flight

    def latency(self, target: Target) -> float:
        """Decayed latency in seconds; 0.0 for a target never measured, so new targets get traffic."""
        state = self._states.get(target.id)
        if state is None or state.ewma is None:
            return 0.0
        return state.ewma

    # -- AttemptObserver ------------------------------------------------------------------------------

    def attempt_started(self, target: Target) -> None:
        state = self._states.get(target.id)
        if state is not None:
            state.in_flight += 1

    def attempt_finished(
        self, target: Target, *, outcome: AttemptOutcome, status: int | None, latency: float
    ) -> None:
        state = self._states.get(target.id)
        if state is None:
            return  # deregistered while the attempt ran
        # Plain comparisons rather than max()/min() here and in _observe_latency: this runs once per attempt.
        if state.in_flight > 0:
            state.in_flight -= 1
        if outcome == "cancelled":
            return  # the client went away: says nothing about the target
        failed = outcome in _FAILURES or (status is not None and status >= 500)
        now = self._clock.monotonic()
        if failed and latency < _FAILURE_LATENCY_PENALTY:
            latency = _FAILURE_LATENCY_PENALTY
        self._observe_latency(state, latency, now)
        if not failed:
            state.passive_failures = 0
            return
        state.passive_failures += 1
        policy = self._outlier
        if not policy.enabled or state.passive_failures < policy.consecutive_failures or state.ejected(now):
            return
        ejected_now = sum(1 for other in self._states.values() if other.ejected(now))
        if ejected_now + 1 > math.floor(policy.max_ejected_share * len(self._states)):
            return  # ejecting it would leave too small a pool: keep serving, keep counting
        if state.ejected_until is not None and now - state.ejected_until > policy.max_ejection:
            state.ejections = 0  # well-behaved for long enough: forgive earlier ejections
        duration = min(policy.base_ejection * (2**state.ejections), policy.max_ejection)
        state.ejections += 1
        state.ejected_until = now + duration
        state.passive_failures = 0
        logger.warning(
            "ejected %s of %s for %.1fs after repeated failures", target.id, self.service, duration
        )
        self._invalidate()

    def _observe_latency(self, state: TargetState, latency: float, now: float) -> None:
        if state.ewma is None:
            state.ewma = latency
        else:
            elapsed = now - state.ewma_at
            weight = math.exp(-elapsed / self._outlier.ewma_decay) if elapsed > 0.0 else 1.0
            # Faster decay than a fixed alpha when requests are rare; at least 10% for the newest sample.
            if weight > 0.9:
                weight = 0.9
            state.ewma = state.ewma * weight + latency * (1 - weight)
        state.ewma_at = now

    # -- active checks ----------------------------------------------------------------------------------

    def record_check(
        self, target_id: str, ok: bool, *, policy: ActiveCheckPolicy, error: str | None = None
    ) -> None:
        state = self._states.get(target_id)
        if state is None:
            return
        if ok:
            state.check_successes += 1
            state.check_failures = 0
            state.last_check_error = None
            if not state.active_healthy and state.check_successes >= policy.healthy_threshold:
                state.active_healthy = True
                logger.info("target %s of %s is healthy again", target_id, self.service)
                self._invalidate()
            return
        state.check_failures += 1
        state.check_successes = 0
        state.last_check_error = error
        if state.active_healthy and state.check_failures >= policy.unhealthy_threshold:
            state.active_healthy = False
            logger.warning("target %s of %s failed its health checks: %s", target_id, self.service, error)
            self._invalidate()

    def _invalidate(self) -> None:
        self._dirty = True
        self.generation += 1

    def _recompute(self) -> None:
        now = self._clock.monotonic()
        healthy = []
        valid_until = math.inf
        for state in self._states.values():
            if state.ejected(now):
                valid_until = min(valid_until, state.ejected_until or math.inf)
            elif state.active_healthy:
                healthy.append(state.target)
        if tuple(healthy) != self._healthy:
            self.generation += 1
        self._healthy = tuple(healthy)
        self._valid_until = valid_until
        self._dirty = False


class HealthTracker:
    """`ServiceHealth` for every service of the registry."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self._services: dict[str, ServiceHealth] = {}

    def __repr__(self) -> str:
        return f"HealthTracker(services={sorted(self._services)})"

    @property
    def clock(self) -> Clock:
        return self._clock

    def service(self, name: str) -> ServiceHealth:
        return self._services[name]

    def services(self) -> dict[str, ServiceHealth]:
        return dict(self._services)

    def sync(self, targets: Mapping[str, Iterable[Target]], policies: Mapping[str, OutlierPolicy]) -> None:
        """Adopt the registry's services and targets, keeping state where ids stay the same."""
        services: dict[str, ServiceHealth] = {}
        for name, service_targets in targets.items():
            health = self._services.get(name)
            policy = policies.get(name, OutlierPolicy())
            if health is None:
                health = ServiceHealth(name, outlier=policy, clock=self._clock)
            else:
                health.set_outlier_policy(policy)
            health.sync(service_targets)
            services[name] = health
        self._services = services

    def now(self) -> float:
        return self._clock.monotonic()


class ActiveHealthChecker:
    """Probes every target of every service with `GET <path>`; 2xx and 3xx are healthy.

    `check_service()` runs one round for one service (tests call it directly, no sleeping); `run()` is the
    background loop the app's lifespan owns, probing each service every `interval` seconds.
    """

    def __init__(
        self,
        tracker: HealthTracker,
        policies: Mapping[str, ActiveCheckPolicy],
        *,
        client: "httpx.AsyncClient",
    ) -> None:
        self._tracker = tracker
        self._policies = dict(policies)
        self._client = client

    def __repr__(self) -> str:
        return f"ActiveHealthChecker(services={sorted(self._policies)})"

    def set_policies(self, policies: Mapping[str, ActiveCheckPolicy]) -> None:
        self._policies = dict(policies)

    async def check_service(self, name: str) -> None:
        policy = self._policies.get(name)
        if policy is None or not policy.enabled:
            return
        health = self._tracker.service(name)
        targets = health.targets()
        results = await asyncio.gather(*(self._probe(target, policy) for target in targets))
        for target, error in zip(targets, results, strict=True):
            health.record_check(target.id, error is None, policy=policy, error=error)

    async def _probe(self, target: Target, policy: ActiveCheckPolicy) -> str | None:
        import httpx

        try:
            response = await self._client.get(target.url + policy.path, timeout=policy.timeout)
        except httpx.TimeoutException:
            return "timeout"
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        if 200 <= response.status_code < 400:
            return None
        return f"status {response.status_code}"

    async def run(self) -> None:
        """Check each service on its own interval until cancelled."""
        clock = self._tracker.clock
        due: dict[str, float] = {}
        while True:
            now = clock.monotonic()
            names = []
            for name, policy in list(self._policies.items()):
                if policy.enabled and due.get(name, now) <= now:
                    due[name] = now + policy.interval
                    names.append(name)
            # Services are checked side by side: one with slow targets never delays the others' rounds.
            results = await asyncio.gather(
                *(self.check_service(name) for name in names), return_exceptions=True
            )
            for name, result in zip(names, results, strict=True):
                # A KeyError means the service went away in a reload; anything else is a bug to log.
                if isinstance(result, Exception) and not isinstance(result, KeyError):
                    logger.error("health checks of %s failed", name, exc_info=result)
            upcoming = [due[name] for name in due if name in self._policies]
            delay = (min(upcoming) - clock.monotonic()) if upcoming else 1.0
            await asyncio.sleep(min(max(delay, 0.01), 1.0))
