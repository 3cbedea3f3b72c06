"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.circuit_breaker import (
    BreakerEvent,
    BreakerPolicy,
    BreakerSnapshot,
    CircuitBreakerMiddleware,
    RedisBreakerSync,
    StaticResponse,
)
from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import Clock, ManualClock, SystemClock
from nexus_middleware.concurrency import (
    AdaptiveLimit,
    ConcurrencyLimitMiddleware,
    ConcurrencyPolicy,
    ConcurrencySnapshot,
    PriorityClass,
)
from nexus_middleware.context import Decision, Principal, RequestContext, current_context, get_context
from nexus_middleware.errors import ConfigurationError, DeadlineExceededError, NexusError
from nexus_middleware.paths import PathPattern, RouteTable, normalize_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.timeout import TimeoutMiddleware

__all__ = [
    "AdaptiveLimit",
    "BreakerEvent",
    "BreakerPolicy",
    "BreakerSnapshot",
    "CircuitBreakerMiddleware",
    "ClientAddressResolver",
    "Clock",
    "ConcurrencyLimitMiddleware",
    "ConcurrencyPolicy",
    "ConcurrencySnapshot",
    "ConfigurationError",
    "DeadlineExceededError",
    "Decision",
    "ManualClock",
    "NexusError",
    "PathPattern",
    "Principal",
    "PriorityClass",
    "Problem",
    "RedisBreakerSync",
    "RequestContext",
    "RouteTable",
    "StaticResponse",
    "SystemClock",
    "TimeoutMiddleware",
    "current_context",
    "get_context",
    "normalize_path",
    "send_problem",
]

__version__ = "0.1.0"
