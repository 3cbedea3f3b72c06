"""nexus-middleware: composable pure-ASGI middlewares for an API gateway edge."""

from nexus_middleware.access_log import AccessLogMiddleware
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
from nexus_middleware.audit import (
    AuditLogMiddleware,
    AuditSink,
    CallbackSink,
    LoggerSink,
    SinkPolicy,
    WebhookSink,
)
from nexus_middleware.bearer import ClaimMapping, TokenLocation
from nexus_middleware.body_limit import BodySizeLimitMiddleware
from nexus_middleware.circuit_breaker import (
    BreakerEvent,
    BreakerPolicy,
    BreakerSnapshot,
    BreakerStates,
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
from nexus_middleware.errors import ConfigurationError, DeadlineExceededError, NexusError, UnknownAPIKeyError
from nexus_middleware.exceptions import ProblemDetailsMiddleware
from nexus_middleware.identity import IdentityHeaders
from nexus_middleware.introspection import IntrospectionMiddleware, IntrospectionPolicy
from nexus_middleware.jwks import JWKSCache, JWKSPolicy
from nexus_middleware.jwt_auth import JWTAuthMiddleware, JWTIssuer, JWTPolicy, RevocationList
from nexus_middleware.metrics import MetricsApp, MetricsMiddleware, register_gauge_source
from nexus_middleware.paths import PathPattern, RouteEntry, RouteTable, normalize_host, normalize_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.ratelimit import RateLimitMiddleware
from nexus_middleware.ratelimit_policy import Quota, RateLimitEvent, RateLimitOptions, RateLimitPolicy
from nexus_middleware.rbac import RBACMiddleware, RBACRule, RoleDef
from nexus_middleware.redaction import Redactor
from nexus_middleware.request_id import RequestIDLogFilter, RequestIDMiddleware
from nexus_middleware.security_headers import SecurityHeadersMiddleware
from nexus_middleware.timeout import TimeoutMiddleware
from nexus_middleware.tracing import TracingMiddleware, inject_trace_headers

__all__ = [
    "APIKeyManager",
    "APIKeyMiddleware",
    "APIKeyPolicy",
    "APIKeyRecord",
    "APIKeyStore",
    "AccessLogMiddleware",
    "AdaptiveLimit",
    "AuditLogMiddleware",
    "AuditSink",
    "BodySizeLimitMiddleware",
    "BreakerEvent",
    "BreakerPolicy",
    "BreakerSnapshot",
    "BreakerStates",
    "CallbackSink",
    "CircuitBreakerMiddleware",
    "ClaimMapping",
    "ClientAddressResolver",
    "Clock",
    "ConcurrencyLimitMiddleware",
    "ConcurrencyPolicy",
    "ConcurrencySnapshot",
    "ConfigurationError",
    "DeadlineExceededError",
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
    "LoggerSink",
    "ManualClock",
    "MemoryAPIKeyStore",
    "MetricsApp",
    "MetricsMiddleware",
    "NexusError",
    "PathPattern",
    "Principal",
    "PriorityClass",
    "Problem",
    "ProblemDetailsMiddleware",
    "Quota",
    "RBACMiddleware",
    "RBACRule",
    "RateLimitEvent",
    "RateLimitMiddleware",
    "RateLimitOptions",
    "RateLimitPolicy",
    "Redactor",
    "RedisAPIKeyStore",
    "RedisBreakerSync",
    "RequestContext",
    "RequestIDLogFilter",
    "RequestIDMiddleware",
    "RevocationList",
    "RoleDef",
    "RouteEntry",
    "RouteTable",
    "SecurityHeadersMiddleware",
    "SinkPolicy",
    "StaticResponse",
    "SystemClock",
    "TimeoutMiddleware",
    "TokenLocation",
    "TracingMiddleware",
    "UnknownAPIKeyError",
    "WebhookSink",
    "current_context",
    "get_context",
    "hash_api_key_secret",
    "inject_trace_headers",
    "normalize_host",
    "normalize_path",
    "register_gauge_source",
    "send_problem",
]

__version__ = "0.1.0"
