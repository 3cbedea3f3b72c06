"""Pieces shared by the resilience layers (breaker, concurrency limits): keys, route policies, refusals."""

import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Generic, Literal, TypeVar

from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.paths import INVALID_PATH, RouteEntry, RouteTable, request_path, route_host
from nexus_middleware.problem import send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "KeyFunction",
    "KeySpec",
    "PolicyRouter",
    "REDUCED_CAPACITY",
    "UPSTREAM_EXTRA",
    "remember_state",
    "retry_after_header",
]

REDUCED_CAPACITY = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
# The request-context extra where the gateway's routing names the upstream service before the proxy runs.
UPSTREAM_EXTRA = "proxy.service"
NO_TENANT = "-"

KeyFunction = Callable[[Scope], Awaitable[str | None]]
KeySpec = Literal["route", "upstream", "tenant", "global"] | KeyFunction
_KINDS = frozenset({"route", "upstream", "tenant", "global"})

P = TypeVar("P")
S = TypeVar("S")


def remember_state(
    states: "OrderedDict[str, S]",
    key: str,
    state: S,
    limit: int,
    idle: Callable[[S], bool],
    *,
    evict_busy: bool,
) -> S:
    """Store the new `state` of `key` as the most recently used. Past `limit` states, the least recently used
    idle one is forgotten; when none is idle, the least recently used one if `evict_busy`, else none (busy
    states are bounded by the requests holding them)."""
    states[key] = state
    if len(states) > limit:
        victim = next((k for k, s in states.items() if k != key and idle(s)), None)
        if victim is None and evict_busy:
            victim = next(iter(states))
        if victim is not None:
            del states[victim]
    return state


def retry_after_header(seconds: float) -> tuple[bytes, bytes]:
    return (b"retry-after", str(max(1, math.ceil(seconds))).encode())


def _keyed(entry: RouteEntry[P | None]) -> RouteEntry[tuple[str, P | None]]:
    # A "route" key: two hosts' entries on one pattern must not share a state (nor its policy).
    pattern, methods, policy = entry[0], entry[1], entry[2]
    host = entry[3] if len(entry) == 4 else None
    if host is None:
        return pattern, methods, (pattern, policy)
    return pattern, methods, (route_host(host) + pattern, policy), host


class PolicyRouter(Generic[P]):
    """Finds the policy and the state key of a request.

    The first matching entry of `routes` gives the policy (an entry whose policy is None leaves the route
    unprotected; an entry naming a host as a 4th element matches that host's requests only); other requests
    get `default`. The key names the state the request shares: the matched route pattern, after the entry's
    host if it names one (`api.example.com/admin/*`; "*" for the default), the upstream service, the tenant,
    one global key, or what an async callable returns. A None key leaves the request unprotected.
    `key_policies` override the policy of the keys they name (None: unprotected), so a gateway can give each
    upstream its own policy.
    """

    __slots__ = ("_by_key", "_default", "_function", "_kind", "_routes")

    def __init__(
        self,
        key: KeySpec,
        default: P | None,
        routes: Iterable[RouteEntry[P | None]],
        key_policies: Mapping[str, P | None] | None = None,
        *,
        policy_type: type[P],
    ) -> None:
        routes = list(routes)
        policies = [default, *(entry[2] for entry in routes), *(key_policies or {}).values()]
        if any(policy is not None and not isinstance(policy, policy_type) for policy in policies):
            raise ConfigurationError(f"policies must be {policy_type.__name__} instances or None")
        if isinstance(key, str):
            if key not in _KINDS:
                raise ConfigurationError(f"key must be one of {sorted(_KINDS)} or an async callable: {key!r}")
            self._kind: str | None = key
            self._function: KeyFunction | None = None
        elif callable(key):
            self._kind = None
            self._function = key
        else:
            raise ConfigurationError("key must be a string or an async callable")
        self._default = default
        self._by_key = dict(key_policies or {})
        self._routes: RouteTable[tuple[str, P | None]] | None = (
            RouteTable(_keyed(entry) for entry in routes) or None
        )

    def key_policy(self, key: str) -> tuple[bool, P | None]:
        """`(True, policy)` when `key` alone decides its policy (no route table, or a `key_policies` entry),
        else `(False, None)`: the policy then depends on the request's route."""
        if key in self._by_key:
            return True, self._by_key[key]
        if self._routes is None:
            return True, self._default
        return False, None

    async def route(
        self, scope: Scope, receive: Receive, send: Send, app: ASGIApp, layer: str
    ) -> tuple[str, P] | None:
        """`(key, policy)`, or None when the request was handled: an invalid path gets a 400 problem and an
        unprotected request goes straight to `app`."""
        pattern, policy = "*", self._default
        if self._routes is not None:
            try:
                found = self._routes.for_request(scope).lookup(
                    request_path(scope), scope.get("method", "GET")
                )
            except InvalidPathError:
                await send_problem(scope, send, INVALID_PATH, layer=layer)
                return None
            if found is not None:
                pattern, policy = found
        if policy is not None or self._by_key:
            # On the request path: the built-in kinds are resolved without an extra coroutine.
            function = self._function
            key = await function(scope) if function is not None else self._builtin_key(scope, pattern)
            if key is not None and self._by_key:
                policy = self._by_key.get(key, policy)
            if key is not None and policy is not None:
                return key, policy
        await app(scope, receive, send)
        return None

    def _builtin_key(self, scope: Scope, pattern: str) -> str | None:
        kind = self._kind
        if kind == "route":
            return pattern
        if kind == "upstream":
            service = get_context(scope).extras.get(UPSTREAM_EXTRA)
            return None if service is None else str(service)
        if kind == "tenant":
            principal = get_context(scope).principal
            tenant = None if principal is None else principal.tenant
            return tenant or NO_TENANT
        return "*"
