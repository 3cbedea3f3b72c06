"""The seam between the gateway's control plane and its data plane.

The control plane (config, registry, health, balancing, routing) decides *where* a request may go and *how*
(timeouts, retries); the data plane (`sample_gateway.proxy`) forwards it. They meet only through these
types, so either side can change without the other.
"""

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

from nexus_middleware.types import Scope

__all__ = [
    "AttemptObserver",
    "AttemptOutcome",
    "IDEMPOTENT_METHODS",
    "RetryPolicy",
    "Target",
    "TargetSelector",
    "UpstreamPolicy",
]

# RFC 9110 §9.2.2: a request with one of these methods may be sent again without changing the outcome.
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

AttemptOutcome = Literal["success", "http_error", "connect_error", "timeout", "protocol_error", "cancelled"]


@dataclass(frozen=True, slots=True)
class Target:
    """One upstream instance. `url` is scheme, host and port only (`http://10.0.0.5:8080`), never a path."""

    id: str
    url: str
    weight: int = 1
    version: str | None = None
    zone: str | None = None
    tags: frozenset[str] = frozenset()
    metadata: Mapping[str, str] = field(default_factory=dict)


class TargetSelector(Protocol):
    """Chooses the target of one attempt among the healthy targets of a service (the balancer)."""

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        """A target whose id is not in `exclude` (targets already tried), or None when none is available."""
        ...


class AttemptObserver(Protocol):
    """Told of every upstream attempt: feeds least-connections counts, EWMA latency, outlier detection."""

    def attempt_started(self, target: Target) -> None: ...

    def attempt_finished(
        self, target: Target, *, outcome: AttemptOutcome, status: int | None, latency: float
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt may be tried again (on another target where there is one).

    Only idempotent methods, or requests carrying `Idempotency-Key`, are ever retried; a request the upstream
    may have processed is replayed only when idempotent. `budget_ratio` caps retries as a share of requests.
    """

    attempts: int = 2  # total attempts, the first included
    on_statuses: frozenset[int] = frozenset({502, 503, 504})
    on_connect_errors: bool = True
    backoff_base: float = 0.025  # seconds; exponential with full jitter
    backoff_max: float = 1.0
    budget_ratio: float = 0.2
    budget_min_per_second: float = 3.0


@dataclass(frozen=True, slots=True)
class UpstreamPolicy:
    """How one route forwards: the service's timeouts, retries and header handling."""

    service: str
    connect_timeout: float = 2.0
    read_timeout: float = 30.0
    total_timeout: float | None = 60.0
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    preserve_host: bool = False
    pool_max_connections: int = 100
