"""The gateway's middleware stack, built from the config in ONE place: the ordered `STACK` table below.

Each entry is `(name, factory)`; a factory takes the app it wraps, the config and the runtime, and returns the
wrapped app, or None to leave the layer out (not configured, or its middleware has not landed yet). Entries
are listed outermost first, in the order docs/composition.md explains (`ProblemDetailsMiddleware`, the
safety net, outside everything). To wire a middleware, fill in its factory; nothing else changes:

- `problem_details`: `ProblemDetailsMiddleware`, always on (outermost safety net).
- `request_id`: `RequestIDMiddleware`; `security.request_id`.
- `metrics`: the Prometheus / OpenTelemetry middlewares; `metrics.*`. The gateway records the matched route
  pattern in `ctx.route` and every layer's decisions in `ctx.decisions`.
- `security_headers`: `SecurityHeadersMiddleware`; `security.security_headers` (a preset, or "off").
- `body_limit`: `BodySizeLimitMiddleware`; `security.max_body_size`, per route
  `route_table(config, "max_body_size")`.
- `auth`: the JWT and API-key middlewares; `auth.issuers`, `auth.api_keys`, `auth.leeway`, `storage`; per
  route `route_table(config, "auth")` ("required" | "optional" | "none") and `route_table(config, "roles")`.
- `rate_limits`: the rate limiter; `rate_limits.policies`, `rate_limits.default`,
  `rate_limits.on_storage_error`, `storage.uri_for("rate_limits")`; per route
  `route_table(config, "rate_limits")` (policy names).
- `rbac`: role checks; per route `route_table(config, "roles")`.
- `breakers`: the circuit breakers; `services[].breaker`, `storage.uri_for("breakers")`; the proxy records the
  service in the `proxy` decision.
- `overload`: concurrency limits and load shedding (no config keys yet: add them under `routes[]`).

The admin API has its own, shorter table, `ADMIN_STACK`: fill its `auth` entry with the JWT middleware in
optional mode (it publishes the principal, never refuses) and `AdminApp` accepts a principal holding one of
`admin.roles` in addition to the API keys.

Every layer that needs the client address takes `runtime.resolver` (built from `trusted_proxies`). The
admin API exposes two hooks a layer fills when it is wired: `runtime.breaker_states` (a callable returning
one dict per breaker) and `runtime.rate_limit_policies` (an object with `get()` and `replace(policies)`).

Probes (`/healthz`, `/readyz`) and the admin prefix are answered by `GatewayEdge` outside this stack, so a
policy layer can never lock operators out; the admin API has its own credential check.
"""

from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import nexus_middleware
from nexus_middleware.types import ASGIApp
from sample_gateway.config import GatewayConfig
from sample_gateway.runtime import GatewayRuntime

__all__ = ["ADMIN_STACK", "Factory", "STACK", "build_stack", "route_table", "wired"]

Factory = Callable[[ASGIApp, GatewayConfig, GatewayRuntime], ASGIApp | None]

T = TypeVar("T")


def _middleware(name: str) -> Any:
    """The middleware class when it is part of this nexus_middleware, else None (it lands later)."""
    return getattr(nexus_middleware, name, None)


def route_table(config: GatewayConfig, field: str) -> list[tuple[str, list[str] | None, Any]]:
    """`(pattern, methods, value)` entries of one per-route policy, for a layer's own `RouteTable`."""
    return [(route.path, route.methods, getattr(route, field)) for route in config.routes]


def _problem_details(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    middleware = _middleware("ProblemDetailsMiddleware")
    return None if middleware is None else middleware(app)


def _request_id(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    middleware = _middleware("RequestIDMiddleware")
    if middleware is None or not config.security.request_id:
        return None
    return middleware(app)  # type: ignore[no-any-return]


def _metrics(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire the observability middlewares here when `config.metrics.enabled`


def _security_headers(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    middleware = _middleware("SecurityHeadersMiddleware")
    if middleware is None or config.security.security_headers == "off":
        return None
    return middleware(app, preset=config.security.security_headers)  # type: ignore[no-any-return]


def _body_limit(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    middleware = _middleware("BodySizeLimitMiddleware")
    routes = [entry for entry in route_table(config, "max_body_size") if entry[2] is not None]
    if middleware is None or (config.security.max_body_size is None and not routes):
        return None
    return middleware(app, max_body_size=config.security.max_body_size, route_limits=routes or None)  # type: ignore[no-any-return]


def _auth(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire JWT (config.auth.issuers) and API keys (config.auth.api_keys) here


def _rate_limits(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire the rate limiter (config.rate_limits) here; set runtime.rate_limit_policies


def _rbac(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire RBAC (route_table(config, "roles")) here


def _breakers(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire the breakers (services[].breaker) here; set runtime.breaker_states


def _overload(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire concurrency limits / load shedding here


STACK: Sequence[tuple[str, Factory]] = (
    ("problem_details", _problem_details),
    ("request_id", _request_id),
    ("metrics", _metrics),
    ("security_headers", _security_headers),
    ("body_limit", _body_limit),
    ("auth", _auth),
    ("rate_limits", _rate_limits),
    ("rbac", _rbac),
    ("breakers", _breakers),
    ("overload", _overload),
)


def _admin_auth(app: ASGIApp, config: GatewayConfig, runtime: GatewayRuntime) -> ASGIApp | None:
    return None  # wire JWT authentication (optional mode) for admin principals with admin.roles here


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
    for _, factory in reversed(list(entries)):
        wrapped = factory(app, config, runtime)
        if wrapped is not None:
            app = wrapped
    return app


def wired(config: GatewayConfig, runtime: GatewayRuntime) -> list[str]:
    """The names of the layers the config turns on with the middlewares available now (for the admin API)."""
    from sample_gateway.app import GatewayApp

    probe = GatewayApp(runtime)
    return [name for name, factory in STACK if factory(probe, config, runtime) is not None]
