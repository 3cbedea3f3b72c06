"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.body_limit import BodySizeLimitMiddleware
from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import Clock, ManualClock, SystemClock
from nexus_middleware.context import Decision, Principal, RequestContext, current_context, get_context
from nexus_middleware.errors import ConfigurationError, NexusError
from nexus_middleware.paths import PathPattern, RouteTable, normalize_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.request_id import RequestIDLogFilter, RequestIDMiddleware
from nexus_middleware.security_headers import SecurityHeadersMiddleware

__all__ = [
    "BodySizeLimitMiddleware",
    "ClientAddressResolver",
    "Clock",
    "ConfigurationError",
    "Decision",
    "ManualClock",
    "NexusError",
    "PathPattern",
    "Principal",
    "Problem",
    "RequestContext",
    "RequestIDLogFilter",
    "RequestIDMiddleware",
    "RouteTable",
    "SecurityHeadersMiddleware",
    "SystemClock",
    "current_context",
    "get_context",
    "normalize_path",
    "send_problem",
]

__version__ = "0.1.0"
