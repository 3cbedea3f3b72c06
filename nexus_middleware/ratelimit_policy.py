"""Rate-limit policies: frozen value objects the middleware is built from and that can be swapped at runtime.

A `RateLimitPolicy` binds route patterns and methods to one or more `Quota`s. Every quota of the matching
policy is drawn on by the request, all or nothing (hierarchical quotas: user within org within plan). A
quota has several windows (`"10/second;1000/hour"`, parsed by `limits.parse_many`), a key saying whose
bucket it is, and optionally per-plan windows or an async resolver that reads them from the Principal.
"""

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from limits import RateLimitItem, parse_many

from nexus_middleware.context import Principal
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.paths import PathPattern, route_host
from nexus_middleware.types import Scope

__all__ = [
    "CostFunction",
    "KeyFunction",
    "LimitsResolver",
    "OutagePolicy",
    "Quota",
    "RateLimitEvent",
    "RateLimitEventHook",
    "RateLimitOptions",
    "RateLimitPolicy",
    "Strategy",
    "parse_windows",
]

Strategy = Literal["sliding-window-counter", "moving-window", "fixed-window"]
OutagePolicy = Literal["fail_open", "fail_closed", "local_fallback"]
KeyKind = Literal[
    "client", "principal", "principal_or_client", "tenant", "plan", "api_key", "route", "path", "global"
]

KeyFunction = Callable[[Scope], Awaitable[str | None]]
"""An async key function: the bucket for the request, or None when the quota does not apply to it."""

LimitsResolver = Callable[[Principal | None, Scope], Awaitable[str | None]]
"""An async resolver of a quota's windows for the caller (e.g. from a plan claim); None: the quota's own."""

CostFunction = Callable[[Scope], Awaitable[int]]

_KEY_KINDS = frozenset(get_args(KeyKind))
_STRATEGIES = frozenset(get_args(Strategy))
_OUTAGE_POLICIES = frozenset(get_args(OutagePolicy))
_UNLIMITED = ("", "unlimited")


def parse_windows(limits: str) -> tuple[RateLimitItem, ...]:
    """`"10/second;1000/hour"` as limits items, shortest window first. Raises `ConfigurationError`."""
    if limits.strip().lower() in _UNLIMITED:
        return ()
    try:
        items = parse_many(limits)
    except ValueError as exc:
        raise ConfigurationError(f"invalid rate limit {limits!r}: {exc}") from exc
    seconds = [item.get_expiry() for item in items]
    if len(set(seconds)) != len(seconds):
        raise ConfigurationError(f"rate limit {limits!r} has two windows of the same length")
    if any(item.amount <= 0 for item in items):
        raise ConfigurationError(f"rate limit {limits!r} must allow at least one request per window")
    return tuple(sorted(items, key=lambda item: item.get_expiry()))


def _check_key(key: object) -> None:
    if callable(key):
        return
    if not isinstance(key, str):
        raise ConfigurationError(f"key must be a key kind, 'header:<name>' or an async callable, not {key!r}")
    if key.startswith("header:"):
        name = key.partition(":")[2].strip()
        if not name or name.lower() != name or " " in name:
            raise ConfigurationError(f"key {key!r}: the header name must be lower-case and non-empty")
        return
    if key not in _KEY_KINDS:
        raise ConfigurationError(f"key {key!r} is not one of {sorted(_KEY_KINDS)} or 'header:<name>'")


def _check_name(name: str, what: str) -> None:
    if not name or any(not 0x21 <= ord(c) <= 0x7E or c in '"\\' for c in name):
        raise ConfigurationError(f"{what} name {name!r} must be non-empty printable ASCII without quotes")


def _only(data: Mapping[str, Any], allowed: set[str], what: str) -> None:
    if not isinstance(data, Mapping):
        raise ConfigurationError(f"a {what} must be a mapping, not {data!r}")
    unknown = set(data) - allowed
    if unknown:
        raise ConfigurationError(f"unknown {what} fields {sorted(unknown)}; allowed: {sorted(allowed)}")


def _describe(key: object) -> str:
    return key if isinstance(key, str) else "<callable>"


@dataclass(frozen=True, slots=True)
class Quota:
    """One scope a request draws on: windows, whose bucket (`key`), and where its windows come from.

    - `limits`: the windows, `"10/second;1000/hour"`; `""` or `"unlimited"` means no limit. A quota needs
      windows, plans, a resolver or a claim, unless its limits say `"unlimited"` outright: a policy of such
      quotas matches its routes and never limits them (it keeps them from later, broader policies).
    - `key`: `"client"` (address from the trusted-proxy resolver), `"principal"` (subject),
      `"principal_or_client"`, `"tenant"`, `"api_key"` (`Principal.key_id`), `"route"` (method and matched
      pattern, the pattern after the policy's host if it has one), `"path"` (normalized, case-folded path),
      `"global"`, `"header:<name>"`, or an async `KeyFunction`. A key that resolves to None (no tenant,
      anonymous caller) leaves the quota out.
    - `claim`: a claim of the Principal (token claim or API-key metadata) holding this caller's windows,
      e.g. `"rate_limit": "100/minute"`; absent or invalid: the next source.
    - `plans`: windows per plan (`Principal.plan`, else the `plan` claim), overriding `limits`.
    - `resolver`: an async `LimitsResolver` consulted first; it returns windows or None for the defaults.
    Where windows come from, first found: `resolver`, `claim`, `plans`, `limits`.
    Quotas with the same name share buckets, whichever policy draws on them.
    """

    name: str
    limits: str = ""
    key: str | KeyFunction = "principal_or_client"
    plans: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    resolver: LimitsResolver | None = None
    claim: str | None = None
    windows: tuple[RateLimitItem, ...] = field(init=False, repr=False, compare=False)
    plan_windows: Mapping[str, tuple[RateLimitItem, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "quota")
        _check_key(self.key)
        object.__setattr__(self, "plans", MappingProxyType(dict(self.plans)))
        object.__setattr__(self, "windows", parse_windows(self.limits))
        plan_windows = {plan: parse_windows(limits) for plan, limits in self.plans.items()}
        object.__setattr__(self, "plan_windows", MappingProxyType(plan_windows))
        explicit = self.limits.strip().lower() == "unlimited"
        if (
            not self.windows
            and not explicit
            and not self.plans
            and self.resolver is None
            and self.claim is None
        ):
            raise ConfigurationError(f"quota {self.name!r} has no limits, plans or resolver")

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> "Quota":
        """From plain config: `{"name": "user", "limits": "10/second", "key": "principal", "plans": {}}`."""
        _only(data, {"name", "limits", "key", "plans", "claim"}, "quota")
        return cls(
            str(data.get("name", "")),
            str(data.get("limits", "")),
            key=str(data.get("key", "principal_or_client")),
            plans={str(plan): str(limits) for plan, limits in dict(data.get("plans") or {}).items()},
            claim=None if data.get("claim") is None else str(data["claim"]),
        )

    def to_config(self) -> dict[str, Any]:
        """Plain data for an admin API; a callable key or a resolver shows as `"<callable>"`."""
        data: dict[str, Any] = {"name": self.name, "limits": self.limits, "key": _describe(self.key)}
        if self.plans:
            data["plans"] = dict(self.plans)
        if self.claim is not None:
            data["claim"] = self.claim
        if self.resolver is not None:
            data["resolver"] = "<callable>"
        return data


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """Which requests are limited, and how.

    - `paths` / `methods`: route patterns (`/users/{id}`, `/admin/*`, `*`) and methods the policy applies to;
      the middleware uses the first policy that matches, in order.
    - `limits` + `key`: shorthand for one quota named after the policy; `quotas`: further quotas drawn on by
      the same request, all or nothing.
    - `strategy`: `"sliding-window-counter"` (default), `"moving-window"` (exact), `"fixed-window"`.
    - `cost`: units per request, an int or an async `CostFunction`.
    - `shadow`: count and report would-be refusals without refusing.
    - `on_store_error`: `"fail_open"` (default), `"fail_closed"` (503), `"local_fallback"` (in-memory limits
      divided by `RateLimitOptions.instances`).
    - `host`: the policy applies to requests to that host only (case-insensitive, port ignored); policies
      without one apply to every host, and a request meets its host's policies and those, in order.
    """

    name: str
    limits: str = ""
    key: str | KeyFunction = "principal_or_client"
    quotas: tuple[Quota, ...] = ()
    paths: tuple[str, ...] = ("*",)
    methods: frozenset[str] | None = None
    strategy: Strategy = "sliding-window-counter"
    cost: int | CostFunction = 1
    shadow: bool = False
    on_store_error: OutagePolicy = "fail_open"
    host: str | None = None
    all_quotas: tuple[Quota, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_name(self.name, "policy")
        paths: Any = self.paths
        object.__setattr__(self, "paths", (paths,) if isinstance(paths, str) else tuple(paths))
        object.__setattr__(self, "quotas", tuple(self.quotas))
        for pattern in self.paths:
            PathPattern(pattern)
        if self.methods is not None:
            object.__setattr__(self, "methods", frozenset(m.upper() for m in self.methods))
        if self.host is not None:
            object.__setattr__(self, "host", route_host(self.host))
        if self.strategy not in _STRATEGIES:
            raise ConfigurationError(f"strategy must be one of {sorted(_STRATEGIES)}, not {self.strategy!r}")
        if self.on_store_error not in _OUTAGE_POLICIES:
            raise ConfigurationError(
                f"on_store_error must be one of {sorted(_OUTAGE_POLICIES)}, not {self.on_store_error!r}"
            )
        if not callable(self.cost) and (
            not isinstance(self.cost, int) or isinstance(self.cost, bool) or self.cost < 0
        ):
            raise ConfigurationError(
                f"cost must be a non-negative int or an async callable, not {self.cost!r}"
            )
        quotas = list(self.quotas)
        if self.limits:
            quotas.insert(0, Quota(self.name, self.limits, key=self.key))
        else:
            _check_key(self.key)
        if not quotas:
            raise ConfigurationError(f"policy {self.name!r} needs limits or quotas")
        names = [quota.name for quota in quotas]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"policy {self.name!r} draws twice on one quota: {names}")
        object.__setattr__(self, "all_quotas", tuple(quotas))

    @classmethod
    def from_config(cls, data: Mapping[str, Any]) -> "RateLimitPolicy":
        """From plain config (YAML/JSON): the fields of the class, `quotas` as a list of quota mappings,
        `paths` and `methods` as lists. Unknown fields raise `ConfigurationError`."""
        _only(
            data,
            {
                "name",
                "limits",
                "key",
                "quotas",
                "paths",
                "methods",
                "strategy",
                "cost",
                "shadow",
                "on_store_error",
                "host",
            },
            "policy",
        )
        methods = data.get("methods")
        return cls(
            str(data.get("name", "")),
            str(data.get("limits", "")),
            key=str(data.get("key", "principal_or_client")),
            quotas=tuple(Quota.from_config(quota) for quota in data.get("quotas") or ()),
            paths=tuple(data.get("paths") or ("*",)),
            methods=None if methods is None else frozenset(methods),
            strategy=data.get("strategy", "sliding-window-counter"),
            cost=data.get("cost", 1),
            shadow=bool(data.get("shadow", False)),
            on_store_error=data.get("on_store_error", "fail_open"),
            host=data.get("host"),
        )

    def to_config(self) -> dict[str, Any]:
        """Plain data for an admin API (`from_config(policy.to_config())` rebuilds it, callables aside)."""
        data: dict[str, Any] = {"name": self.name}
        if self.limits:
            data["limits"] = self.limits
            data["key"] = _describe(self.key)
        if self.quotas:
            data["quotas"] = [quota.to_config() for quota in self.quotas]
        data.update(
            paths=list(self.paths),
            methods=None if self.methods is None else sorted(self.methods),
            strategy=self.strategy,
            cost=self.cost if isinstance(self.cost, int) else "<callable>",
            shadow=self.shadow,
            on_store_error=self.on_store_error,
        )
        if self.host is not None:
            data["host"] = self.host
        return data


@dataclass(frozen=True, slots=True)
class RateLimitOptions:
    """Middleware-wide options.

    - `key_prefix`: prefix of every storage key.
    - `exempt_paths`, `exempt_subjects`, `exempt_networks`: never limited (patterns, principal subjects,
      client CIDRs).
    - `legacy_headers`: also send `X-RateLimit-Limit/Remaining/Reset` (for the tightest window).
    - `partition_keys`: send `pk` (a hash of the bucket key, never the key itself) for keyed quotas.
    - `report_hits`: call the event hook for admitted requests too, not only refusals and outages.
    - `store_timeout`: seconds a store call may take; `breaker_cooldown`: seconds the store is left alone
      after a failure (one trial call per cooldown).
    - `instances`: how many instances share the store, to scale limits in `local_fallback`.
    - `ipv6_prefix`: IPv6 clients are keyed by this prefix length (one host owns a /64).
    - `websocket_messages`: per-connection message limit (`"20/second"`); close 1008 when exceeded.
    """

    key_prefix: str = "nexus:rl:"
    exempt_paths: tuple[str, ...] = ()
    exempt_subjects: frozenset[str] = frozenset()
    exempt_networks: tuple[str, ...] = ()
    legacy_headers: bool = False
    partition_keys: bool = True
    report_hits: bool = False
    store_timeout: float = 0.25
    breaker_cooldown: float = 5.0
    instances: int = 1
    ipv6_prefix: int = 64
    websocket_messages: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "exempt_paths", tuple(self.exempt_paths))
        object.__setattr__(self, "exempt_subjects", frozenset(self.exempt_subjects))
        object.__setattr__(self, "exempt_networks", tuple(self.exempt_networks))
        for pattern in self.exempt_paths:
            PathPattern(pattern)
        if self.store_timeout <= 0 or self.breaker_cooldown <= 0:
            raise ConfigurationError("store_timeout and breaker_cooldown must be positive")
        if self.instances < 1:
            raise ConfigurationError("instances must be at least 1")
        if not 0 < self.ipv6_prefix <= 128:
            raise ConfigurationError("ipv6_prefix must be between 1 and 128")
        if self.websocket_messages is not None and not parse_windows(self.websocket_messages):
            raise ConfigurationError("websocket_messages must define at least one window")


@dataclass(frozen=True, slots=True)
class RateLimitEvent:
    """What the event hook receives: a refusal, a shadow refusal, an outage, or (optionally) a hit."""

    outcome: Literal["allow", "deny", "shadow_deny", "degraded"]
    policy: str
    quota: str | None
    key: str | None
    remaining: int | None
    limit: int | None
    retry_after: int | None
    path: str
    details: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


RateLimitEventHook = Callable[[RateLimitEvent], Awaitable[None]]
