"""The per-request context every layer reads and writes.

One `RequestContext` lives in `scope["state"]["nexus"]` (so Starlette's `request.state.nexus` and FastAPI
dependencies see it) and, while a nexus middleware is running the request, in a context variable (so logging
and code without the scope see it too). Layers never import each other: they meet here. The authenticator
leaves a `Principal`, the rate limiter reads it; every layer appends a `Decision` that metrics and audit read.
"""

from collections.abc import Mapping
from contextlib import AbstractContextManager
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal, get_args

from nexus_middleware.types import Scope

__all__ = [
    "ANONYMOUS",
    "AUTH_MODES",
    "AuthMethod",
    "AuthMode",
    "Decision",
    "Principal",
    "RequestContext",
    "STATE_KEY",
    "bind_context",
    "current_context",
    "current_request_id",
    "enter_context",
    "exit_context",
    "get_context",
    "peek_context",
    "publish_principal",
    "request_method",
    "route_template",
]

STATE_KEY = "nexus"

AuthMethod = Literal["jwt", "api_key", "introspection", "anonymous"]

# How an authentication layer treats a route: credentials required, optional (anonymous passes), or not read.
AuthMode = Literal["required", "optional", "exempt"]
AUTH_MODES: frozenset[str] = frozenset(get_args(AuthMode))

_EMPTY: Mapping[str, Any] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by an authentication layer. Immutable; safe to share."""

    subject: str
    method: AuthMethod = "anonymous"
    tenant: str | None = None
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()
    plan: str | None = None
    expires_at: float | None = None  # wall-clock epoch seconds
    key_id: str | None = None  # API key id, when authenticated by key
    claims: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)  # raw token claims or key metadata

    # Starlette's `request.user` protocol, so `scope["user"] = principal` works with its auth helpers.
    @property
    def is_authenticated(self) -> bool:
        return self.method != "anonymous"

    @property
    def display_name(self) -> str:
        return self.subject

    @property
    def identity(self) -> str:
        return self.subject


ANONYMOUS = Principal(subject="anonymous")


@dataclass(frozen=True, slots=True)
class Decision:
    """What one layer decided about the request, for metrics, audit and tracing.

    `outcome` is a short verb such as "allow", "deny", "shadow_deny", "degraded", "hit", "miss", "shed".
    """

    layer: str
    outcome: str
    rule: str | None = None
    reason: str | None = None
    details: Mapping[str, Any] = field(default_factory=lambda: _EMPTY)


@dataclass(slots=True, eq=False)
class RequestContext:
    """Mutable per-request state shared by the nexus layers of one request."""

    request_id: str | None = None
    trace_id: str | None = None
    principal: Principal | None = None
    client: str | None = None  # client address from the trusted-proxy resolver, once resolved
    route: str | None = None  # route template, when a layer or the router resolved one
    deadline: float | None = None  # monotonic time by which the response must have started
    local_response: str | None = None  # the layer that answered locally (401, 413, 429, ...), if any
    decisions: list[Decision] = field(default_factory=list)
    extras: dict[str, Any] = field(default_factory=dict)  # namespaced by layer: "ratelimit.headers"

    def record(
        self,
        layer: str,
        outcome: str,
        *,
        rule: str | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> Decision:
        decision = Decision(layer, outcome, rule, reason, MappingProxyType(details) if details else _EMPTY)
        self.decisions.append(decision)
        return decision

    def decision(self, layer: str) -> Decision | None:
        """The last decision `layer` recorded, if any."""
        for decision in reversed(self.decisions):
            if decision.layer == layer:
                return decision
        return None


_current: ContextVar[RequestContext | None] = ContextVar("nexus_request_context", default=None)


def get_context(scope: Scope) -> RequestContext:
    """The request's context, created on first use. Every nexus layer calls this, in any order."""
    # Called several times per request by every layer. No try/except: the first call of every request
    # misses, and a raised KeyError costs more than all the found cases' method calls together.
    state = scope.get("state")
    if state is not None:
        context: RequestContext | None = state.get(STATE_KEY)
        if context is not None:
            return context
    else:
        state = scope["state"] = {}
    context = state[STATE_KEY] = RequestContext()
    return context


def peek_context(scope: Scope) -> RequestContext | None:
    """The request's context if a layer created one, without creating it."""
    state = scope.get("state")
    return None if state is None else state.get(STATE_KEY)


class _Binding:
    # A plain context manager rather than @contextmanager: it runs on every request of every layer that
    # binds, and a generator-based one costs several times more.
    __slots__ = ("_context", "_token")

    def __init__(self, context: RequestContext) -> None:
        self._context = context
        self._token: Token[RequestContext | None] | None = None

    def __enter__(self) -> RequestContext:
        if _current.get() is not self._context:
            self._token = _current.set(self._context)
        return self._context

    def __exit__(self, *exc_info: object) -> None:
        if self._token is not None:
            _current.reset(self._token)
            self._token = None


def bind_context(context: RequestContext) -> AbstractContextManager[RequestContext]:
    """Make `context` the current one for the code inside, restoring the previous one after, always."""
    return _Binding(context)


def enter_context(context: RequestContext) -> Token[RequestContext | None]:
    """`bind_context` for a layer's per-request path: make `context` current and return the token that
    `exit_context` takes in a `finally`. Half the cost of the `with` block, which calls two methods of an
    object built for the purpose."""
    return _current.set(context)


def exit_context(token: Token[RequestContext | None]) -> None:
    _current.reset(token)


def publish_principal(scope: Scope, principal: Principal) -> None:
    """Publish who is calling: in the request context, and as `scope["user"]` and `scope["auth"]`.

    Starlette's `request.user` reads `scope["user"]` (Principal has `is_authenticated`, `display_name`)
    and its `requires()` checks `scope in request.auth.scopes`, which `Principal.scopes` answers.
    """
    get_context(scope).principal = principal
    scope["user"] = principal
    scope["auth"] = principal


def current_context() -> RequestContext | None:
    """The context of the request being handled in this task, or None outside a request."""
    return _current.get()


def current_request_id() -> str | None:
    context = _current.get()
    return None if context is None else context.request_id


def request_method(scope: Scope) -> str:
    """The method logs, audit records and spans report: the http method, `WEBSOCKET` for a websocket."""
    return scope.get("method", "WEBSOCKET") if scope["type"] == "http" else "WEBSOCKET"


def route_template(scope: Scope) -> str | None:
    """The route template the router matched (e.g. `/users/{id}`), or None before routing or when unmatched.

    Starlette and FastAPI store the matched route in `scope["route"]` on the same scope dict a middleware
    holds, so this is meaningful once the inner app has started its response. A template recorded in the
    request context by a layer wins.
    """
    context = peek_context(scope)
    if context is not None and context.route is not None:
        return context.route
    route = scope.get("route")
    if route is None:  # not routed (yet): skip the attribute probes, each a caught AttributeError on None
        return None
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    # Under a Mount the route path is relative to the mount: root_path then holds the app's own root plus
    # the matched mount prefix, and app_root_path (set only by a Mount) the app's own root.
    app_root = scope.get("app_root_path")
    root_path = scope.get("root_path", "")
    if isinstance(app_root, str) and isinstance(root_path, str) and root_path.startswith(app_root):
        return root_path[len(app_root) :] + path
    return path
