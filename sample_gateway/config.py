"""The gateway's configuration: one YAML file, validated at start-up, with environment overrides.

This module is the only place in the gateway that reads files or the environment. Everything else receives
a validated, immutable `GatewayConfig`.

Environment overrides: `NEXUS__SECTION__KEY=value` sets `section.key` (names are case-insensitive; `__`
separates levels). The value is parsed as a YAML scalar or flow collection, so `NEXUS__LISTEN__PORT=9000` is
an integer, `NEXUS__ADMIN__ENABLED=false` a boolean and `NEXUS__TRUSTED_PROXIES=[10.0.0.0/8, 127.0.0.1]`
a list.
Inside a list, a level is either an index (`NEXUS__SERVICES__0__TIMEOUTS__READ=5`) or, for lists of named
items (services, routes), the item's name (`NEXUS__SERVICES__USERS__TIMEOUTS__READ=5`). A whole list is
replaced, never merged, when its key is set.
"""

import copy
import ipaddress
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from nexus_middleware.api_keys import APIKeyRecord
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.paths import PathPattern, route_host

__all__ = [
    "AdminConfig",
    "AdminListenConfig",
    "ApiKeySourceConfig",
    "AuthConfig",
    "BreakerConfig",
    "CanaryRule",
    "ClaimsConfig",
    "ENV_PREFIX",
    "GatewayConfig",
    "GatewayConfigError",
    "HealthCheckConfig",
    "IssuerConfig",
    "ListenConfig",
    "LoadBalancingConfig",
    "MetricsConfig",
    "OutlierConfig",
    "PoolConfig",
    "RateLimitPolicyConfig",
    "RateLimitsConfig",
    "RetryConfig",
    "RouteConfig",
    "ServiceConfig",
    "SplitConfig",
    "StickyConfig",
    "StorageConfig",
    "TargetConfig",
    "TimeoutsConfig",
    "TokenLocationConfig",
    "benchmark_upstream_from_environment",
    "config_from_text",
    "config_path_from_environment",
    "cross_check",
    "export_config_path",
    "format_location",
    "load_config",
    "parse_config",
    "parse_config_text",
    "stack_policy_changes",
]

ENV_PREFIX = "NEXUS__"
CONFIG_PATH_VARIABLE = "NEXUS_GATEWAY_CONFIG"  # how `--workers N` hands the file to each worker process
BENCH_UPSTREAM_VARIABLE = "NEXUS_BENCH_UPSTREAM"  # the upstream of the load benchmark's gateway row

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})

PositiveFloat = Annotated[float, Field(gt=0)]
Name = Annotated[str, Field(pattern=_NAME.pattern)]


class GatewayConfigError(ConfigurationError):
    """A configuration that cannot be used. `problems` holds (key path, problem) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]], *, source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        where = f"{source}: " if source else ""
        lines = [f"{where}{path or '<root>'}: {problem}" for path, problem in self.problems]
        super().__init__("invalid gateway configuration\n  " + "\n  ".join(lines))


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ListenConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080


class AdminListenConfig(_Model):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 9901


class TargetConfig(_Model):
    url: str
    id: Name | None = None
    weight: Annotated[int, Field(ge=1, le=1000)] = 1
    version: str | None = None
    zone: str | None = None
    tags: list[str] = Field(default_factory=list)

    @field_validator("url")
    @classmethod
    def _origin_only(cls, value: str) -> str:
        return validate_origin(value)


def validate_origin(value: str) -> str:
    """`http(s)://host:port` with nothing else; returned without a trailing slash."""
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http:// or https:// URL with a host")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("must be scheme, host and port only (no path, query, credentials)")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValueError(f"has an invalid port: {exc}") from None
    return f"{parts.scheme}://{parts.netloc}"


class HealthCheckConfig(_Model):
    enabled: bool = True
    path: str = "/healthz"
    interval: PositiveFloat = 5.0
    timeout: PositiveFloat = 1.0
    healthy_threshold: Annotated[int, Field(ge=1)] = 2
    unhealthy_threshold: Annotated[int, Field(ge=1)] = 2

    @field_validator("path")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value


class OutlierConfig(_Model):
    enabled: bool = True
    consecutive_failures: Annotated[int, Field(ge=1)] = 5
    base_ejection: PositiveFloat = 30.0
    max_ejection: PositiveFloat = 300.0
    max_ejected_share: Annotated[float, Field(ge=0, le=1)] = 0.5


class TimeoutsConfig(_Model):
    connect: PositiveFloat = 2.0
    read: PositiveFloat = 30.0
    total: PositiveFloat | None = 60.0


class RetryConfig(_Model):
    attempts: Annotated[int, Field(ge=1, le=10)] = 2
    on_statuses: list[Annotated[int, Field(ge=500, le=599)]] = Field(default_factory=lambda: [502, 503, 504])
    on_connect_errors: bool = True
    backoff_base: PositiveFloat = 0.025
    backoff_max: PositiveFloat = 1.0
    budget_ratio: Annotated[float, Field(ge=0, le=1)] = 0.2
    budget_min_per_second: Annotated[float, Field(ge=0)] = 3.0


class PoolConfig(_Model):
    max_connections: Annotated[int, Field(ge=1)] = 100
    max_connections_per_host: Annotated[int, Field(ge=0)] = 0
    keepalive_expiry: PositiveFloat = 30.0


class BreakerConfig(_Model):
    """A service's circuit breaker (`CircuitBreakerMiddleware`, keyed by upstream service in `stack.py`)."""

    enabled: bool = False
    failure_threshold: Annotated[int, Field(ge=1)] = 5
    error_ratio: Annotated[float | None, Field(gt=0, le=1)] = None
    minimum_requests: Annotated[int, Field(ge=1)] = 20
    recovery_timeout: PositiveFloat = 30.0
    half_open_requests: Annotated[int, Field(ge=1)] = 1


class LoadBalancingConfig(_Model):
    strategy: Literal[
        "round_robin", "weighted_round_robin", "least_connections", "consistent_hash", "power_of_two"
    ] = "round_robin"
    hash_on: Literal["client", "header", "cookie"] = "client"
    hash_key: str | None = None  # the header or cookie name when hash_on is header/cookie
    virtual_nodes: Annotated[int, Field(ge=1, le=10_000)] = 160
    ewma_decay: PositiveFloat = 10.0  # seconds: how quickly old latencies are forgotten

    @model_validator(mode="after")
    def _key_given(self) -> "LoadBalancingConfig":
        if self.strategy == "consistent_hash" and self.hash_on != "client" and not self.hash_key:
            raise ValueError(f"hash_key is required when hash_on is {self.hash_on!r}")
        return self


class ServiceConfig(_Model):
    name: Name
    targets: list[TargetConfig] = Field(default_factory=list)
    required: bool = True  # /readyz waits for a healthy target of every required service
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    outlier_detection: OutlierConfig = Field(default_factory=OutlierConfig)
    timeouts: TimeoutsConfig = Field(default_factory=TimeoutsConfig)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    pool: PoolConfig = Field(default_factory=PoolConfig)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)
    load_balancing: LoadBalancingConfig = Field(default_factory=LoadBalancingConfig)


class SplitConfig(_Model):
    service: Name
    version: str | None = None
    weight: Annotated[int, Field(ge=0, le=10_000)] = 1


class CanaryRule(_Model):
    """Requests whose header matches go to `service`/`version` instead of the route's split."""

    header: str
    equals: str | None = None
    matches: str | None = None  # a regular expression, searched in the value
    service: Name | None = None  # default: the route's (single) service
    version: str | None = None

    @model_validator(mode="after")
    def _valid(self) -> "CanaryRule":
        if self.equals is not None and self.matches is not None:
            raise ValueError("set equals or matches, not both")
        if self.matches is not None:
            try:
                re.compile(self.matches)
            except re.error as exc:
                raise ValueError(f"matches is not a valid regular expression: {exc}") from None
        if self.service is None and self.version is None:
            raise ValueError("a canary rule needs a service or a version")
        return self


class StickyConfig(_Model):
    """Keeps a client on the same side of a split: the key is hashed instead of drawing a random number."""

    source: Literal["client", "header", "cookie"]
    name: str | None = None

    @model_validator(mode="after")
    def _name_given(self) -> "StickyConfig":
        if self.source != "client" and not self.name:
            raise ValueError(f"name is required when sticky.source is {self.source!r}")
        return self


class RouteConfig(_Model):
    name: Name | None = None
    path: str
    methods: list[str] | None = None
    host: str | None = None
    strip_prefix: str | None = None
    rewrite: str | None = None  # a path template using the pattern's parameters: "/v2/users/{id}"
    preserve_host: bool = False
    service: Name | None = None
    version: str | None = None
    split: list[SplitConfig] | None = None
    canary: list[CanaryRule] = Field(default_factory=list)
    sticky: StickyConfig | None = None
    # Per-route policies, read by the layers wired in stack.py.
    auth: Literal["required", "optional", "none"] = "none"
    roles: list[str] = Field(default_factory=list)
    rate_limits: list[str] = Field(default_factory=list)  # names of rate_limits.policies
    max_body_size: Annotated[int | None, Field(ge=0)] = None
    timeout: PositiveFloat | None = None  # overrides the service's total timeout
    max_concurrent: Annotated[int | None, Field(ge=1)] = None  # in-flight cap (load shedding), None: none
    queue_size: Annotated[int, Field(ge=0)] = 0  # requests waiting for a slot beyond max_concurrent

    @field_validator("path")
    @classmethod
    def _pattern(cls, value: str) -> str:
        try:
            PathPattern(value)
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("methods")
    @classmethod
    def _methods(cls, value: list[str] | None) -> list[str] | None:
        if value is None:
            return None
        upper = [method.upper() for method in value]
        unknown = sorted(set(upper) - _HTTP_METHODS)
        if unknown:
            raise ValueError(f"unknown HTTP methods {unknown}")
        if not upper:
            raise ValueError("must list at least one method (omit the key for every method)")
        if "GET" in upper and "HEAD" not in upper:
            upper.append("HEAD")  # as Starlette does: a GET route answers HEAD
        return upper

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            return route_host(value)
        except ConfigurationError:
            # Request hosts are compared without their port, so a route host with one could never match.
            raise ValueError("must be a host name without a port (an IPv6 literal in brackets)") from None

    @field_validator("strip_prefix", "rewrite")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must start with '/'")
        return value

    @model_validator(mode="after")
    def _one_backend(self) -> "RouteConfig":
        if (self.service is None) == (self.split is None):
            raise ValueError("set exactly one of service or split")
        if self.split is not None and not self.split:
            raise ValueError("split must list at least one service")
        if self.split is not None and sum(part.weight for part in self.split) == 0:
            raise ValueError("split weights must not all be zero")
        if self.strip_prefix is not None and self.rewrite is not None:
            raise ValueError("set strip_prefix or rewrite, not both")
        return self


class ClaimsConfig(_Model):
    """Where the Principal's fields are read in a token: claim names or dotted paths."""

    subject: str = "sub"
    roles: str = "roles"
    tenant: str | None = None
    plan: str | None = None


class IssuerConfig(_Model):
    issuer: str
    jwks_url: str
    audiences: list[str] = Field(default_factory=list, validate_default=True)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256"])
    claims: ClaimsConfig = Field(default_factory=ClaimsConfig)

    @field_validator("audiences")
    @classmethod
    def _audiences(cls, value: list[str]) -> list[str]:
        if not value or "" in value:
            raise ValueError("must list at least one non-empty audience (RFC 8725 requires aud)")
        return value


class ApiKeySourceConfig(_Model):
    header: str = "x-api-key"
    storage: str | None = None  # a storage URI for hashed keys; None: storage.default
    keys: list[dict[str, Any]] = Field(default_factory=list)  # pre-hashed records for a memory:// store

    @field_validator("keys")
    @classmethod
    def _records(cls, value: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for entry in value:
            APIKeyRecord.from_dict(entry)  # a ConfigurationError is a ValueError: reported with its key
        return value


_COOKIE_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")  # an RFC 6265 cookie-name (an RFC 9110 token)
_QUERY_NAME = re.compile(r"^[A-Za-z0-9._~-]+$")  # unreserved characters: the same encoded and decoded
_LOCATION_NAMES = {
    "cookie": (_COOKIE_NAME, "a cookie name (letters, digits and !#$%&'*+-.^_`|~)"),
    "query": (_QUERY_NAME, "a query parameter name (letters, digits and ._~-)"),
}


class TokenLocationConfig(_Model):
    """Where the JWT layer also reads a token (`TokenLocation`); `Authorization: Bearer` is always read.

    Whatever is named here is removed before the request goes further: never forwarded, never logged.
    """

    cookie: str | None = None
    query: str | None = None

    @field_validator("cookie", "query")
    @classmethod
    def _name(cls, value: str | None, info: ValidationInfo) -> str | None:
        pattern, what = _LOCATION_NAMES[str(info.field_name)]
        if value is not None and not pattern.fullmatch(value):
            raise ValueError(f"{value!r} is not {what}")
        return value


class AuthConfig(_Model):
    """The authentication layers: JWT issuers and API keys (wired in stack.py)."""

    issuers: list[IssuerConfig] = Field(default_factory=list)
    api_keys: ApiKeySourceConfig | None = None
    leeway: Annotated[float, Field(ge=0)] = 30.0
    location: TokenLocationConfig = Field(default_factory=TokenLocationConfig)
    close_expired_websockets: bool = True  # close an accepted websocket (1008) when its JWT expires


class StorageConfig(_Model):
    default: str = "memory://"
    registry: str | None = None
    rate_limits: str | None = None
    breakers: str | None = None
    cache: str | None = None
    prefix: str = "nexus:"

    @field_validator("default", "registry", "rate_limits", "breakers", "cache")
    @classmethod
    def _uri(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError("must be memory:// or a redis://, rediss:// or unix:// URL")
        return value

    def uri_for(self, concern: Literal["registry", "rate_limits", "breakers", "cache"]) -> str:
        value: str | None = getattr(self, concern)
        return value if value is not None else self.default


class AdminConfig(_Model):
    enabled: bool = True
    prefix: str = "/_admin"  # on the main listener, unless `listen` gives the admin its own listener
    listen: AdminListenConfig | None = None
    api_keys: list[SecretStr] = Field(default_factory=list)
    roles: list[str] = Field(default_factory=lambda: ["gateway-admin"])  # a JWT principal with one of them

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        if not value.startswith("/") or value == "/" or value.endswith("/"):
            raise ValueError("must start with '/', not end with '/', and not be '/'")
        return value


class RateLimitPolicyConfig(_Model):
    """One named rate-limit policy: `limits` strings such as "100/minute", its key, cost and shadow mode."""

    limits: list[str]
    key: Literal["client", "principal", "tenant", "api_key", "route"] = "client"
    cost: Annotated[int, Field(ge=1)] = 1
    shadow: bool = False

    @field_validator("limits")
    @classmethod
    def _parse(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must list at least one limit")
        return _limit_strings(value)


def _limit_strings(value: list[str]) -> list[str]:
    for item in value:
        if not re.fullmatch(r"\s*\d+\s*(/|per)\s*\d*\s*[a-z]+\s*", item):
            raise ValueError(f"{item!r} is not a limit such as '100/minute'")
    return value


class RateLimitsConfig(_Model):
    policies: dict[Name, RateLimitPolicyConfig] = Field(default_factory=dict)
    default: list[str] = Field(default_factory=list)  # policies applied to routes that name none
    on_storage_error: Literal["open", "closed", "local"] = "open"
    # Messages each websocket connection may send, per window ("20/second"); beyond: close 1008.
    websocket_messages: list[str] = Field(default_factory=list)

    @field_validator("websocket_messages")
    @classmethod
    def _windows(cls, value: list[str]) -> list[str]:
        return _limit_strings(value)


class MetricsConfig(_Model):
    """The observability layers: Prometheus metrics and their endpoint, tracing, the access log."""

    enabled: bool = False
    path: str = "/metrics"
    tracing: bool = False
    access_log: bool = False
    allow: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])  # who may scrape

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        if not value.startswith("/") or value == "/":
            raise ValueError("must start with '/' and not be '/'")
        return value

    @field_validator("allow")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            if item == "*":
                continue
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an address, a CIDR or '*'") from None
        return value


class SecurityConfig(_Model):
    """Options of the foundation layers, on by default."""

    request_id: bool = True
    security_headers: Literal["api", "html", "off"] = "api"
    force_hsts: bool = (
        False  # HSTS on plain-http responses too (a TLS terminator that is not trusted_proxies)
    )
    max_body_size: Annotated[int | None, Field(ge=0)] = 10 * 1024 * 1024


class GatewayConfig(_Model):
    listen: ListenConfig = Field(default_factory=ListenConfig)
    services: list[ServiceConfig] = Field(default_factory=list)
    routes: list[RouteConfig] = Field(default_factory=list)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    storage: StorageConfig = Field(default_factory=StorageConfig)
    admin: AdminConfig = Field(default_factory=AdminConfig)
    trusted_proxies: list[str] = Field(default_factory=list)
    rate_limits: RateLimitsConfig = Field(default_factory=RateLimitsConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    security: SecurityConfig = Field(default_factory=SecurityConfig)
    upstream_client: Literal["aiohttp", "httpx"] = "aiohttp"

    def service(self, name: str) -> ServiceConfig:
        for service in self.services:
            if service.name == name:
                return service
        raise KeyError(name)


def format_location(location: Sequence[int | str]) -> str:
    text = ""
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text


def cross_check(config: GatewayConfig) -> list[tuple[str, str]]:
    problems: list[tuple[str, str]] = []
    names: dict[str, int] = {}
    target_ids: dict[str, str] = {}
    for index, service in enumerate(config.services):
        if service.name in names:
            problems.append((f"services[{index}].name", f"duplicate service name {service.name!r}"))
        names[service.name] = index
        for position, target in enumerate(service.targets):
            if target.id is None:
                continue
            where = f"services[{index}].targets[{position}].id"
            if target.id in target_ids:
                problems.append(
                    (where, f"duplicate target id {target.id!r} (also in {target_ids[target.id]})")
                )
            target_ids[target.id] = service.name
    route_names: set[str] = set()
    for index, route in enumerate(config.routes):
        where = f"routes[{index}]"
        if route.name is not None:
            if route.name in route_names:
                problems.append((f"{where}.name", f"duplicate route name {route.name!r}"))
            route_names.add(route.name)
        referenced: list[tuple[str, str | None]] = [("service", route.service)] if route.service else []
        referenced += [(f"split[{i}].service", part.service) for i, part in enumerate(route.split or ())]
        referenced += [(f"canary[{i}].service", rule.service) for i, rule in enumerate(route.canary)]
        for key, service_name in referenced:
            if service_name is not None and service_name not in names:
                problems.append((f"{where}.{key}", f"unknown service {service_name!r}"))
        if route.canary and route.service is None:
            for i, rule in enumerate(route.canary):
                if rule.service is None:
                    problems.append((f"{where}.canary[{i}].service", "required when the route has a split"))
        if route.auth != "none" and not config.auth.issuers and config.auth.api_keys is None:
            problems.append((f"{where}.auth", f"is {route.auth!r} but auth has no issuers and no api_keys"))
        if route.roles and route.auth == "none":
            problems.append((f"{where}.roles", "needs auth 'required' or 'optional' to know the caller"))
        for i, policy in enumerate(route.rate_limits):
            if policy not in config.rate_limits.policies:
                problems.append((f"{where}.rate_limits[{i}]", f"unknown rate-limit policy {policy!r}"))
        if route.rewrite is not None:
            parameters = set(re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)", route.path))
            for used in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", route.rewrite):
                if used not in parameters:
                    problems.append((f"{where}.rewrite", f"uses {{{used}}}, which the path does not define"))
        if config.admin.enabled and config.admin.listen is None:
            prefix = config.admin.prefix
            if route.path == prefix or route.path.startswith(prefix + "/"):
                problems.append((f"{where}.path", f"overlaps the admin prefix {prefix!r}"))
    location = config.auth.location
    if (location.cookie is not None or location.query is not None) and not config.auth.issuers:
        problems.append(("auth.location", "needs auth.issuers: the JWT layer is what reads the token there"))
    for i, policy in enumerate(config.rate_limits.default):
        if policy not in config.rate_limits.policies:
            problems.append((f"rate_limits.default[{i}]", f"unknown rate-limit policy {policy!r}"))
    for i, entry in enumerate(config.trusted_proxies):
        if entry != "*":
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                problems.append((f"trusted_proxies[{i}]", f"{entry!r} is not an address or CIDR"))
    if config.admin.enabled and not config.admin.api_keys and not config.admin.roles:
        problems.append(("admin", "an enabled admin API needs api_keys or roles"))
    return problems


# What the middleware stack reads of a route: the policies, and the name, pattern, methods and host that
# place them in the layers' route tables (their order matters too: first match wins).
_ROUTE_POLICIES = (
    "name",
    "path",
    "methods",
    "host",
    "auth",
    "roles",
    "rate_limits",
    "max_body_size",
    "max_concurrent",
    "queue_size",
)
_STACK_SECTIONS = ("auth", "rate_limits", "metrics", "security")


def stack_policy_changes(previous: GatewayConfig, new: GatewayConfig) -> list[str]:
    """What the middleware stack reads that differs from `previous` to `new`, as config keys.

    A reload rebuilds the stack when this is not empty (mounts.py's `build_stacks`), and otherwise keeps it:
    a change of targets, services' upstream settings or a route's backend only swaps the routing.
    """
    changed = [section for section in _STACK_SECTIONS if getattr(previous, section) != getattr(new, section)]

    def route_policies(config: GatewayConfig) -> list[tuple[Any, ...]]:
        return [tuple(getattr(route, field) for field in _ROUTE_POLICIES) for route in config.routes]

    if route_policies(previous) != route_policies(new):
        changed.append("routes")

    def breakers(config: GatewayConfig) -> dict[str, BreakerConfig]:
        return {service.name: service.breaker for service in config.services if service.breaker.enabled}

    if breakers(previous) != breakers(new):
        changed.append("services.breaker")
    return changed


def parse_config(
    data: Any, *, environ: Mapping[str, str] | None = None, source: str | None = None
) -> GatewayConfig:
    """Validate `data` (the parsed YAML) after applying `NEXUS__*` overrides from `environ`."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise GatewayConfigError([("", "the configuration must be a mapping of sections")], source=source)
    if environ:
        data = apply_environment(data, environ)
    try:
        config = GatewayConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            message = error["msg"]
            if error["type"] == "extra_forbidden":
                message = "unknown key"
            elif message.startswith("Value error, "):
                message = message[len("Value error, ") :]
            problems.append((format_location(error["loc"]), message))
        raise GatewayConfigError(problems, source=source) from None
    problems = cross_check(config)
    if problems:
        raise GatewayConfigError(problems, source=source)
    return config


def load_config(path: str | Path, *, environ: Mapping[str, str] | None = None) -> GatewayConfig:
    """Read, override from the environment (`os.environ` unless given) and validate a YAML config file."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise GatewayConfigError(
            [("", f"cannot read the file: {exc.strerror or exc}")], source=source
        ) from None
    return parse_config_text(text, environ=os.environ if environ is None else environ, source=source)


def parse_config_text(
    text: str, *, environ: Mapping[str, str] | None = None, source: str | None = None
) -> GatewayConfig:
    """Validate YAML (or JSON) text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise GatewayConfigError([("", f"not valid YAML: {where}{problem}")], source=source) from None
    return parse_config(data, environ=environ, source=source)


def config_from_text(text: str, *, source: str | None = None) -> GatewayConfig:
    """Validate YAML text with the process environment's overrides, as at start-up (admin reload)."""
    return parse_config_text(text, environ=os.environ, source=source)


def benchmark_upstream_from_environment(environ: Mapping[str, str] | None = None) -> str:
    """The upstream URL `benchmarks/load/run.py` gives the gateway it serves (row d)."""
    return (os.environ if environ is None else environ).get(BENCH_UPSTREAM_VARIABLE, "http://127.0.0.1:8001")


def export_config_path(path: str | Path) -> None:
    """Hand the config file to the worker processes that `--workers N` starts."""
    os.environ[CONFIG_PATH_VARIABLE] = str(path)


def config_path_from_environment(environ: Mapping[str, str] | None = None) -> str | None:
    """The config file handed to worker processes by `python -m sample_gateway --workers N`."""
    return (os.environ if environ is None else environ).get(CONFIG_PATH_VARIABLE)


def apply_environment(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """A copy of `data` with every `NEXUS__A__B=value` applied; raises `GatewayConfigError` on a bad key."""
    result = copy.deepcopy(data)
    problems: list[tuple[str, str]] = []
    for variable in sorted(environ):
        if not variable.upper().startswith(ENV_PREFIX):
            continue
        parts = [part.lower() for part in variable[len(ENV_PREFIX) :].split("__")]
        if not all(parts):
            problems.append((variable, "empty key segment in the variable name"))
            continue
        try:
            value = yaml.safe_load(environ[variable])
        except yaml.YAMLError:
            value = environ[variable]
        problem = _set_path(result, parts, value)
        if problem:
            problems.append((variable, problem))
    if problems:
        raise GatewayConfigError(problems, source="environment")
    return result


def _set_path(node: Any, parts: list[str], value: Any) -> str | None:
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part)
            if index is None:
                return f"{part!r} is neither an index nor the name of an item of the list"
            if last:
                node[index] = value
                return None
            node = node[index]
            continue
        if not isinstance(node, dict):
            return f"{'.'.join(parts[:depth])} is not a section"
        if last:
            node[part] = value
            return None
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        node = child
    return None


def _list_index(items: list[Any], part: str) -> int | None:
    if part.isdigit():
        index = int(part)
        return index if index < len(items) else None
    for index, item in enumerate(items):
        if isinstance(item, dict) and str(item.get("name", "")).lower() == part:
            return index
    return None
