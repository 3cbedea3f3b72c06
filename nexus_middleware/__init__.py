"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.bearer import ClaimMapping, TokenLocation
from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import Clock, ManualClock, SystemClock
from nexus_middleware.context import Decision, Principal, RequestContext, current_context, get_context
from nexus_middleware.errors import ConfigurationError, NexusError
from nexus_middleware.exceptions import ProblemDetailsMiddleware
from nexus_middleware.introspection import IntrospectionMiddleware, IntrospectionPolicy
from nexus_middleware.jwks import JWKSCache, JWKSPolicy
from nexus_middleware.jwt_auth import JWTAuthMiddleware, JWTIssuer, JWTPolicy, RevocationList
from nexus_middleware.paths import PathPattern, RouteTable, normalize_path
from nexus_middleware.problem import Problem, send_problem

__all__ = [
    "ClaimMapping",
    "ClientAddressResolver",
    "Clock",
    "ConfigurationError",
    "Decision",
    "IntrospectionMiddleware",
    "IntrospectionPolicy",
    "JWKSCache",
    "JWKSPolicy",
    "JWTAuthMiddleware",
    "JWTIssuer",
    "JWTPolicy",
    "ManualClock",
    "NexusError",
    "PathPattern",
    "Principal",
    "Problem",
    "ProblemDetailsMiddleware",
    "RequestContext",
    "RevocationList",
    "RouteTable",
    "SystemClock",
    "TokenLocation",
    "current_context",
    "get_context",
    "normalize_path",
    "send_problem",
]

__version__ = "0.1.0"
