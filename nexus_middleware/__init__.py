"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.api_keys import (
    APIKeyManager,
    APIKeyMiddleware,
    APIKeyPolicy,
    APIKeyRecord,
    APIKeyStore,
    IssuedAPIKey,
    MemoryAPIKeyStore,
    RedisAPIKeyStore,
    hash_api_key_secret,
)
from nexus_middleware.bearer import ClaimMapping, TokenLocation
from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import Clock, ManualClock, SystemClock
from nexus_middleware.context import Decision, Principal, RequestContext, current_context, get_context
from nexus_middleware.errors import ConfigurationError, NexusError, UnknownAPIKeyError
from nexus_middleware.identity import IdentityHeaders
from nexus_middleware.introspection import IntrospectionMiddleware, IntrospectionPolicy
from nexus_middleware.jwks import JWKSCache, JWKSPolicy
from nexus_middleware.jwt_auth import JWTAuthMiddleware, JWTIssuer, JWTPolicy, RevocationList
from nexus_middleware.paths import PathPattern, RouteTable, normalize_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.rbac import RBACMiddleware, RBACRule, RoleDef

__all__ = [
    "APIKeyManager",
    "APIKeyMiddleware",
    "APIKeyPolicy",
    "APIKeyRecord",
    "APIKeyStore",
    "ClaimMapping",
    "ClientAddressResolver",
    "Clock",
    "ConfigurationError",
    "Decision",
    "IdentityHeaders",
    "IntrospectionMiddleware",
    "IntrospectionPolicy",
    "IssuedAPIKey",
    "JWKSCache",
    "JWKSPolicy",
    "JWTAuthMiddleware",
    "JWTIssuer",
    "JWTPolicy",
    "ManualClock",
    "MemoryAPIKeyStore",
    "NexusError",
    "PathPattern",
    "Principal",
    "Problem",
    "RBACMiddleware",
    "RBACRule",
    "RedisAPIKeyStore",
    "RequestContext",
    "RevocationList",
    "RoleDef",
    "RouteTable",
    "SystemClock",
    "TokenLocation",
    "UnknownAPIKeyError",
    "current_context",
    "get_context",
    "hash_api_key_secret",
    "normalize_path",
    "send_problem",
]

__version__ = "0.1.0"
