"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import Clock, ManualClock, SystemClock
from nexus_middleware.context import Decision, Principal, RequestContext, current_context, get_context
from nexus_middleware.errors import ConfigurationError, NexusError
from nexus_middleware.paths import PathPattern, RouteTable, normalize_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.ratelimit import RateLimitMiddleware
from nexus_middleware.ratelimit_policy import Quota, RateLimitEvent, RateLimitOptions, RateLimitPolicy

__all__ = [
    "ClientAddressResolver",
    "Clock",
    "ConfigurationError",
    "Decision",
    "ManualClock",
    "NexusError",
    "PathPattern",
    "Principal",
    "Problem",
    "Quota",
    "RateLimitEvent",
    "RateLimitMiddleware",
    "RateLimitOptions",
    "RateLimitPolicy",
    "RequestContext",
    "RouteTable",
    "SystemClock",
    "current_context",
    "get_context",
    "normalize_path",
    "send_problem",
]

__version__ = "0.1.0"
