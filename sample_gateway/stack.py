"""The gateway's middleware stack, built from the config in ONE place: the ordered `STACK` table below.

Each entry is `(name, factory)`; a factory takes the app it wraps, the config and the runtime, and returns the
wrapped app, or None to leave the layer out (not configured). Entries are listed outermost first, in the order
docs/composition.md explains (`ProblemDetailsMiddleware`, the safety net, outside everything). Optional
layers are off unless the config turns them on, so the default stack stays lean (docs/performance.md):

- `problem_details`: `ProblemDetailsMiddleware`, always on.
- `request_id`: `RequestIDMiddleware`; `security.request_id`.
- `tracing`: `TracingMiddleware`; `metrics.tracing`. Adds `inject_trace_headers` as a proxy header hook, so
  `traceparent` reaches upstreams.
- `metrics`: `MetricsMiddleware` on a registry of its own; `metrics.enabled`. `MetricsApp` at `metrics.path`
  (answered by the edge, restricted to `metrics.allow` through `runtime.resolver`), with the
  `nexus_breaker_state{key}` and `nexus_upstream_target_healthy{service,target}` gauge sources.
- `access_log`: `AccessLogMiddleware`; `metrics.access_log`.
- `security_headers`: `SecurityHeadersMiddleware`; `security.security_headers` (a preset, or "off").
- `body_limit`: `BodySizeLimitMiddleware`; `security.max_body_size`, per route `routes[].max_body_size`.
- `auth`: `JWTAuthMiddleware` (`auth.issuers`, `auth.leeway`, `auth.location` as a `TokenLocation` whose
  cookie and query token are stripped once read, `auth.close_expired_websockets`) and `APIKeyMiddleware`
  (`auth.api_keys`: a `MemoryAPIKeyStore` of pre-hashed `keys`, or a `RedisAPIKeyStore` for a Redis
  `storage`); per route
  `routes[].auth`. With both, the JWT layer is optional and the key layer answers for the route (it lets a
  JWT principal through). `IdentityHeaders` is always a proxy header hook: client-sent identity headers are
  stripped, the principal's set.
- `rate_limits`: `RateLimitMiddleware`; `rate_limits.*` (`rate_limits.websocket_messages` is the
  middleware-wide `RateLimitOptions.websocket_messages`), `storage.uri_for("rate_limits")`, per route
  `routes[].rate_limits`. Fills `runtime.rate_limit_policies` (admin view and `replace_policies`).
- `rbac`: `RBACMiddleware`; per route `routes[].roles` (any one of them).
- `breakers`: `CircuitBreakerMiddleware(key="upstream")`, one policy per service with `services[].breaker`;
  `storage.uri_for("breakers")` on Redis shares states (`RedisBreakerSync`). Fills `runtime.breaker_states`.
- `overload`: `ConcurrencyLimitMiddleware`; per route `routes[].max_concurrent` and `routes[].queue_size`.
Route timeouts (`routes[].timeout`) are enforced once, by the proxy's deadline: no `TimeoutMiddleware`.

The edge (`GatewayEdge`) routes each request before this stack runs, leaving the route pattern in
`ctx.route` and the chosen service in `ctx.extras["proxy.service"]` for the metrics and the breakers.

The admin API has its own, shorter table, `ADMIN_STACK`, whose `auth` entry is the JWT middleware in optional
mode (it publishes the principal, never refuses): `AdminApp` accepts a principal holding one of `admin.roles`
in addition to the API keys.

Every layer that needs the client address takes `runtime.resolver` (built from `trusted_proxies`). Clients,
stores and state a layer opens come from `runtime.resources`, keyed by what configures them, so a stack
rebuilt on reload reuses them (rate-limit storage, breaker states, JWKS caches, API-key stores, the metric
registry); the pool closes those no stack uses any more, and the rest at shutdown.

A reload whose config changes what the stack reads (`stack_policy_changes`) builds the stacks again from these
tables and swaps them in (mounts.py). Factories publish on the runtime (header hooks, `/metrics` endpoint,
admin views); mounts.py gives each build empty outputs and swaps them in with the stacks.

Probes (`/healthz`, `/readyz`), `/metrics` and the admin prefix are answered by `GatewayEdge` outside this
stack, so a policy layer can never lock operators out; the admin API has its own credential check.
"""

import json
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict
from typing import Any, Protocol

from nexus_middleware import (
    AccessLogMiddleware,
    APIKeyMiddleware,
    APIKeyPolicy,
    APIKeyStore,
    BodySizeLimitMiddleware,
    BreakerPolicy,
    BreakerStates,
    CircuitBreakerMiddleware,
    ClaimMapping,
    ConcurrencyLimitMiddleware,
    ConcurrencyPolicy,
    IdentityHeaders,
    JWKSCache,
    JWTAuthMiddleware,
    JWTIssuer,
    JWTPolicy,
    MemoryAPIKeyStore,
    MetricsApp,
    MetricsMiddleware,
    ProblemDetailsMiddleware,
    Quota,
    RateLimitMiddleware,
    RateLimitOptions,
    RateLimitPolicy,
    RBACMiddleware,
    RBACRule,
    Redactor,
    RedisAPIKeyStore,
    RedisBreakerSync,
    RequestIDMiddleware,
    SecurityHeadersMiddleware,
    TokenLocation,
    TracingMiddleware,
    get_context,
    inject_trace_headers,
    register_gauge_source,
)
from nexus_middleware.bearer import AuthMode
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.ratelimit_backends import LimiterBackend, limiter_backend
from nexus_middleware.ratelimit_policy import OutagePolicy
from nexus_middleware.redaction import DEFAULT_SECRET_KEYS
from nexus_middleware.storage import redis_client_from_url
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.config import ApiKeySourceConfig, GatewayConfig, RateLimitPolicyConfig
from sample_gateway.runtime import GatewayRuntime

__all__ = ["ADMIN_STACK", "Factory", "STACK", "StackBuildError", "build_stack", "route_table", "wired"]

Factory = Callable[[ASGIApp, GatewayConfig, GatewayRuntime], ASGIApp | None]


def route_table(config: GatewayConfig, field: str) -> list[tuple[str, list[str] | None, Any, str | None]]:
    """`(pattern, methods, value, host)` entries of one per-route policy, for a layer's own `RouteTable`.

    One entry per route, in config order and with the route's host, so the entry a layer finds for a request
    is the route the router chose: a layer must keep the entries of routes without a policy of its own too,
    or a request to such a route would meet the next matching route's policy.
    """
    return [(route.path, route.methods, getattr(route, field), route.host) for route in config.routes]


def _problem_details(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return ProblemDetailsMiddleware(app)


def _request_id(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return RequestIDMiddleware(app) if config.security.request_id else None


def _metrics(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if not config.metrics.enabled:
        return None
    # Registered once per app and kept across rebuilds: each build wraps its stack in the same series.
    metrics = runtime.resources.get(("metrics",), lambda: _metric_series(runtime))
    runtime.metrics_endpoint = MetricsApp(
        registry=metrics.registry, allow=config.metrics.allow, client_resolver=runtime.resolver
    )
    return metrics.wrapping(app)


async def _unwired(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("the metric series' own middleware is never served: builds use wrapping(app)")


def _metric_series(runtime: GatewayRuntime) -> MetricsMiddleware:
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()  # one per gateway app: never prometheus-client's global registry
    register_gauge_source(
        registry,
        "nexus_breaker_state",
        lambda: _breaker_gauge(runtime),
        documentation="Circuit breaker state per upstream service: 0 closed, 1 half-open, 2 open.",
        labels=["key"],
    )
    register_gauge_source(
        registry,
        "nexus_upstream_target_healthy",
        lambda: _health_gauge(runtime),
        documentation="1 when the target receives traffic (healthy, not ejected), else 0.",
        labels=["service", "target"],
    )
    return MetricsMiddleware(_unwired, registry=registry)


_BREAKER_CODES = {"closed": 0, "half-open": 1, "open": 2}


def _breaker_gauge(runtime: GatewayRuntime) -> Mapping[tuple[str, ...] | str, float]:
    hook = runtime.breaker_states
    return {} if hook is None else {state["key"]: _BREAKER_CODES[state["state"]] for state in hook()}


def _health_gauge(runtime: GatewayRuntime) -> Mapping[tuple[str, ...] | str, float]:
    values: dict[tuple[str, ...] | str, float] = {}
    for name, health in runtime.tracker.services().items():
        healthy = {target.id for target in health.healthy()}
        for target in health.targets():
            values[(name, target.id)] = 1.0 if target.id in healthy else 0.0
    return values


def _tracing(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if not config.metrics.tracing:
        return None
    runtime.header_hooks.append(lambda scope, headers: inject_trace_headers(headers))
    return TracingMiddleware(app)


def _access_log(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if not config.metrics.access_log:
        return None
    # The JWT layer strips a query token, but a request refused before it (a 414 from the body-limit layer)
    # still carries one: its parameter is masked like the usual secret names.
    query = config.auth.location.query
    redactor = None if query is None else Redactor(secret_keys=DEFAULT_SECRET_KEYS | {query})
    return AccessLogMiddleware(app, client_resolver=runtime.resolver, redactor=redactor)


def _security_headers(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if config.security.security_headers == "off":
        return None
    return SecurityHeadersMiddleware(
        app,
        preset=config.security.security_headers,
        force_hsts=config.security.force_hsts,
        client_resolver=runtime.resolver,  # HSTS when a trusted proxy says the client used https
    )


def _body_limit(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    default = config.security.max_body_size
    limits = route_table(config, "max_body_size")
    if all(limit is None for _, _, limit, _ in limits):
        return None if default is None else BodySizeLimitMiddleware(app, max_body_size=default)
    # A route without a limit of its own keeps its entry, with the global limit.
    routes = [
        (path, methods, default if limit is None else limit, host) for path, methods, limit, host in limits
    ]
    return BodySizeLimitMiddleware(app, max_body_size=default, routes=routes)


_AUTH_MODES: dict[str, AuthMode] = {"required": "required", "optional": "optional", "none": "exempt"}


def _issuers(config: GatewayConfig) -> list[JWTIssuer]:
    return [
        JWTIssuer(
            issuer.issuer,
            issuer.audiences,
            issuer.algorithms,
            jwks_url=issuer.jwks_url,
            claims=ClaimMapping(
                subject=issuer.claims.subject,
                roles=issuer.claims.roles,
                tenant=issuer.claims.tenant,
                plan=issuer.claims.plan,
            ),
        )
        for issuer in config.auth.issuers
    ]


def _jwt(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime, **options: Any) -> ASGIApp:
    # One cache per key set, shared by the main and admin stacks and kept across rebuilds.
    caches = {
        issuer.jwks_url: runtime.resources.get(
            ("jwks", issuer.jwks_url), _jwks_cache(issuer.jwks_url), close=JWKSCache.aclose
        )
        for issuer in config.auth.issuers
    }
    location = config.auth.location
    policy = JWTPolicy(
        leeway=config.auth.leeway,
        location=TokenLocation(cookie=location.cookie, query=location.query),  # stripped once read
        close_expired_websockets=config.auth.close_expired_websockets,
    )
    return JWTAuthMiddleware(app, issuers=_issuers(config), policy=policy, jwks_caches=caches, **options)


def _jwks_cache(url: str) -> Callable[[], JWKSCache]:
    return lambda: JWKSCache(url)


def _api_key_store(config: GatewayConfig, source: ApiKeySourceConfig, runtime: GatewayRuntime) -> APIKeyStore:
    uri = source.storage or config.storage.default
    prefix = config.storage.prefix + "apikeys:"
    if uri.startswith("memory://"):
        key: Hashable = ("api_keys", uri, json.dumps(source.keys, sort_keys=True, default=str))
        return runtime.resources.get(key, lambda: MemoryAPIKeyStore.from_config(source.keys), close=_aclose)
    return runtime.resources.get(
        ("api_keys", uri, prefix), lambda: RedisAPIKeyStore.from_url(uri, prefix=prefix), close=_aclose
    )


class _Closable(Protocol):
    async def aclose(self) -> None: ...


async def _aclose(resource: _Closable) -> None:
    await resource.aclose()


def _auth(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    # Always on, authenticated or not: a client-forged X-Auth-Subject (or x_auth_subject) never reaches an
    # upstream; the principal's identity replaces it.
    identity = IdentityHeaders()
    runtime.header_hooks.append(lambda scope, headers: identity.apply(headers, get_context(scope).principal))
    modes = [
        (path, methods, _AUTH_MODES[mode], host) for path, methods, mode, host in route_table(config, "auth")
    ]
    if all(mode == "exempt" for _, _, mode, _ in modes):
        location = config.auth.location
        if location.cookie is None and location.query is None:
            return None
        # No route authenticates, yet a configured token cookie or query parameter is still removed: a
        # browser sends the cookie to every path, and an upstream must never receive the credential.
        return _jwt(app, config, runtime, routes=modes, default="exempt")
    source = config.auth.api_keys
    if source is not None:
        store = _api_key_store(config, source, runtime)
        policy = APIKeyPolicy(header_name=source.header, default="exempt")
        app = APIKeyMiddleware(app, store=store, policy=policy, routes=modes)
    if config.auth.issuers:
        if source is not None:
            # Outside the API-key layer, the JWT layer never refuses a missing token: the key layer below
            # answers for the route (it lets an authenticated JWT principal through untouched).
            modes = [
                (path, methods, "exempt" if mode == "exempt" else "optional", host)
                for path, methods, mode, host in modes
            ]
        app = _jwt(app, config, runtime, routes=modes, default="exempt")
    return app


def _rate_limit_policies(
    config: GatewayConfig, policies: dict[str, RateLimitPolicyConfig]
) -> list[RateLimitPolicy]:
    """One limiter policy per route, with the route's host, each named policy one shared quota.

    A route that draws on none gets an unlimited policy while another route draws on some: a request to it
    must not meet the next matching route's limits.
    """
    outage = _OUTAGE[config.rate_limits.on_storage_error]
    drawn = [route.rate_limits or config.rate_limits.default for route in config.routes]
    if not any(drawn):
        return []
    result: list[RateLimitPolicy] = []
    for index, (route, names) in enumerate(zip(config.routes, drawn, strict=True)):
        label = route.name or f"route-{index}"
        methods = None if route.methods is None else frozenset(route.methods)
        if not names:
            result.append(
                RateLimitPolicy(label, "unlimited", paths=(route.path,), methods=methods, host=route.host)
            )
            continue
        chosen = [policies[name] for name in names]
        result.append(
            RateLimitPolicy(
                label,
                quotas=tuple(
                    Quota(name, ";".join(policy.limits), key=policy.key)
                    for name, policy in zip(names, chosen, strict=True)
                ),
                paths=(route.path,),
                methods=methods,
                cost=max(policy.cost for policy in chosen),
                shadow=all(policy.shadow for policy in chosen),
                on_store_error=outage,
                host=route.host,
            )
        )
    return result


_OUTAGE: dict[str, OutagePolicy] = {"open": "fail_open", "closed": "fail_closed", "local": "local_fallback"}


class _RateLimitHook:
    """The admin API's view of the limiter: the named policies, replaced without a restart."""

    def __init__(self, middleware: RateLimitMiddleware, runtime: GatewayRuntime) -> None:
        self._middleware = middleware
        self._runtime = runtime

    def get(self) -> dict[str, Any]:
        return {
            name: policy.model_dump() for name, policy in self._runtime.config.rate_limits.policies.items()
        }

    def replace(self, policies: dict[str, Any]) -> None:
        parsed = {name: RateLimitPolicyConfig.model_validate(policy) for name, policy in policies.items()}
        self._middleware.replace_policies(_rate_limit_policies(self._runtime.config, parsed))


def _limiter_backend(config: GatewayConfig, runtime: GatewayRuntime) -> LimiterBackend:
    # The counters live here (in memory or behind the Redis client): kept across rebuilds, so a reload
    # never hands a client a fresh quota. Closed by the pool, never by a middleware.
    uri = config.storage.uri_for("rate_limits")
    timeout = RateLimitOptions().store_timeout
    return runtime.resources.get(
        ("rate_limits", uri),
        lambda: limiter_backend(uri, clock=runtime.clock, timeout=timeout),
        close=_aclose,
    )


def _rate_limits(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    messages = config.rate_limits.websocket_messages
    if not config.rate_limits.policies and not messages:
        return None
    options = RateLimitOptions(
        key_prefix=config.storage.prefix + "rl:",
        websocket_messages=";".join(messages) if messages else None,  # every websocket, on any route
    )
    middleware = RateLimitMiddleware(
        app,
        policies=_rate_limit_policies(config, config.rate_limits.policies),
        storage=_limiter_backend(config, runtime),
        options=options,
        client_resolver=runtime.resolver,
        clock=runtime.clock,
    )
    runtime.rate_limit_policies = _RateLimitHook(middleware, runtime)
    return middleware


def _rbac(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if not any(route.roles for route in config.routes):
        return None
    # A route without roles is a public rule, not a missing one: else it would meet the next route's roles.
    rules = [
        RBACRule(
            route.name or f"routes[{index}]",
            route.path,
            methods=route.methods,
            roles=route.roles,
            public=not route.roles,
            host=route.host,
        )
        for index, route in enumerate(config.routes)
    ]
    return RBACMiddleware(app, rules=rules, default="allow")


def _breakers(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    policies = {
        service.name: BreakerPolicy(
            failure_threshold=service.breaker.failure_threshold,
            failure_ratio=service.breaker.error_ratio,
            minimum_requests=service.breaker.minimum_requests,
            reset_timeout=service.breaker.recovery_timeout,
            half_open_max_calls=service.breaker.half_open_requests,
        )
        for service in config.services
        if service.breaker.enabled
    }
    if not policies:
        return None
    sync = None
    uri = config.storage.uri_for("breakers")
    if not uri.startswith("memory://"):
        client = runtime.resources.get(("redis", uri), lambda: redis_client_from_url(uri), close=_aclose)
        sync = RedisBreakerSync(client, prefix=config.storage.prefix + "breaker:")
    middleware = CircuitBreakerMiddleware(
        app,
        key="upstream",
        policy=None,
        key_policies=policies,
        sync=sync,
        shared=runtime.resources.get(("breakers",), BreakerStates),  # states survive a rebuild
        clock=runtime.clock,
    )
    runtime.breaker_states = lambda: [asdict(snapshot) for snapshot in middleware.states().values()]
    return middleware


def _overload(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if all(route.max_concurrent is None for route in config.routes):
        return None
    # A route without a cap keeps its entry, unprotected (None), rather than share the next route's bulkhead.
    routes = [
        (
            route.path,
            route.methods,
            None
            if route.max_concurrent is None
            else ConcurrencyPolicy(max_concurrent=route.max_concurrent, queue_size=route.queue_size),
            route.host,
        )
        for route in config.routes
    ]
    return ConcurrencyLimitMiddleware(app, policy=None, key="route", routes=routes, clock=runtime.clock)


STACK: Sequence[tuple[str, Factory]] = (
    ("problem_details", _problem_details),
    ("request_id", _request_id),
    ("tracing", _tracing),
    ("metrics", _metrics),
    ("access_log", _access_log),
    ("security_headers", _security_headers),
    ("body_limit", _body_limit),
    ("auth", _auth),
    ("rate_limits", _rate_limits),
    ("rbac", _rbac),
    ("breakers", _breakers),
    ("overload", _overload),
)


def _admin_auth(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    if not config.auth.issuers:
        return None
    # Publishes the principal, never refuses: AdminApp accepts one holding an admin role, or an admin key.
    return _jwt(app, config, runtime, default="optional")


ADMIN_STACK: Sequence[tuple[str, Factory]] = (
    ("problem_details", _problem_details),
    ("request_id", _request_id),
    ("auth", _admin_auth),
)


def build_stack(
    app: ASGIApp,
    config: GatewayConfig,
    runtime: GatewayRuntime,
    *,
    entries: Iterable[tuple[str, Factory]] = STACK,
) -> ASGIApp:
    """Wrap `app` in the configured layers, the first entry outermost."""
    layers: list[str] = []
    for name, factory in reversed(list(entries)):
        try:
            wrapped = factory(app, config, runtime)
        except (ConfigurationError, ValueError, ImportError, OSError) as exc:
            raise StackBuildError(name, exc) from exc
        if wrapped is not None:
            app = wrapped
            layers.insert(0, name)
    if entries is STACK:
        runtime.layers = layers
    return app


class StackBuildError(ConfigurationError):
    """A factory refused the config: `layer` names its `STACK` entry."""

    def __init__(self, layer: str, error: Exception) -> None:
        super().__init__(f"the {layer!r} layer cannot be built: {error}")
        self.layer = layer


def wired(config: GatewayConfig, runtime: GatewayRuntime) -> list[str]:
    """The names of the layers the running stack holds, outermost first (for the admin API)."""
    return list(runtime.layers)
