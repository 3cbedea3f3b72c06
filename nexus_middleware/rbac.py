"""Role-based access control on the principal an authentication layer published.

Roles inherit from other roles (cycles are refused at construction) and grant permissions: named ones
(`"orders:read"`, `"orders:*"`, `"*"`) or route-bound ones (`"GET,POST /orders/{id}"`, `"/reports/*"`).
Rules bind a route pattern (and methods) to what the principal must hold. A request is matched on the router's
route template when one is known, else on the shared normalized path (`request_path`), so `/%61dmin`,
`//admin` and `/x/../admin` all meet the `/admin/*` rule. Decisions use `scope["method"]` only:
method-override headers never change them.
"""

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import unquote

from nexus_middleware.context import Principal, get_context, route_template
from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.headers import contains_ctl
from nexus_middleware.paths import INVALID_PATH, PathPattern, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "RBACMiddleware",
    "RBACRule",
    "RoleDef",
]

logger = logging.getLogger(__name__)

_GRANTS_CACHE_SIZE = 1024


def _strings(value: Iterable[str] | str, name: str) -> tuple[str, ...]:
    if isinstance(value, str):
        raise ConfigurationError(f"{name} must be a list of strings, not the string {value!r}")
    items = tuple(value)
    if not all(isinstance(item, str) and item for item in items):
        raise ConfigurationError(f"{name} must hold non-empty strings")
    return items


def _with_head(methods: Iterable[str]) -> frozenset[str]:
    # Routers answer HEAD wherever they answer GET; a GET rule that left HEAD to the default would deny it.
    found = frozenset(methods)
    return found | {"HEAD"} if "GET" in found else found


@dataclass(frozen=True, slots=True)
class RoleDef:
    """A role: the roles it inherits from and the permissions it grants.

    A permission is named (`"orders:read"`; `"orders:*"` grants every `orders:` permission; `"*"` grants
    everything, routes included) or route-bound: `"/reports/*"` (any method), `"GET /orders/{id}"`,
    `"GET,POST /orders/*"`. A route-bound permission allows matching requests that no rule covers.
    """

    inherits: Sequence[str] = ()
    permissions: Sequence[str] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "inherits", _strings(self.inherits, "inherits"))
        object.__setattr__(self, "permissions", _strings(self.permissions, "permissions"))


@dataclass(frozen=True, slots=True)
class RBACRule:
    """What a request to `path` (with one of `methods`, None for any) requires.

    `roles`: any one of them (inheritance counts); `permissions` and `scopes`: all of them (scopes are the
    principal's token or key scopes). `tenant_param` / `tenant_header`: the principal's tenant must equal that
    path parameter / header. `public`: no principal needed. A rule with no requirement needs authentication.
    `host`: the rule covers requests to that host only (case-insensitive, port ignored); rules without one
    cover every host, and a request is matched against its host's rules and those, in order.
    """

    id: str
    path: str
    methods: Sequence[str] | None = None
    roles: Sequence[str] = ()
    permissions: Sequence[str] = ()
    scopes: Sequence[str] = ()
    tenant_param: str | None = None
    tenant_header: str | None = None
    public: bool = False
    host: str | None = None

    def __post_init__(self) -> None:
        if not self.id:
            raise ConfigurationError("a rule needs an id")
        if self.methods is not None:
            methods = _with_head(
                method.upper() for method in _strings(self.methods, f"rule {self.id}: methods")
            )
            object.__setattr__(self, "methods", tuple(sorted(methods)))
        for name in ("roles", "permissions", "scopes"):
            object.__setattr__(self, name, _strings(getattr(self, name), f"rule {self.id}: {name}"))
        if self.public and (
            self.roles or self.permissions or self.scopes or self.tenant_param or self.tenant_header
        ):
            raise ConfigurationError(f"rule {self.id}: a public rule cannot require anything")
        if self.tenant_param is not None and "{" + self.tenant_param not in self.path:
            raise ConfigurationError(
                f"rule {self.id}: tenant_param {self.tenant_param!r} is not in {self.path!r}"
            )
        if self.tenant_header is not None and (not self.tenant_header or contains_ctl(self.tenant_header)):
            raise ConfigurationError(f"rule {self.id}: tenant_header is not a header name")


@dataclass(frozen=True, slots=True)
class _RoutePermission:
    role: str
    pattern: PathPattern
    methods: frozenset[str] | None

    def allows(self, path: str, method: str) -> bool:
        return (self.methods is None or method in self.methods) and self.pattern.match(path) is not None


@dataclass(frozen=True, slots=True)
class _Grants:
    """Everything a set of roles adds up to, with inheritance expanded."""

    roles: frozenset[str]
    permissions: frozenset[str]
    prefixes: tuple[str, ...]  # from "orders:*"
    everything: str | None  # the role granting "*", if any
    routes: tuple[_RoutePermission, ...]

    def has(self, permission: str) -> bool:
        return (
            self.everything is not None
            or permission in self.permissions
            or permission.startswith(self.prefixes)
        )


@dataclass(frozen=True, slots=True)
class _CompiledRule:
    rule: RBACRule
    pattern: PathPattern = field(compare=False)


_Outcome = tuple[Literal["allow", "unauthenticated", "forbidden"], str | None, str | None]


class RBACMiddleware:
    """Allows or refuses each request and websocket handshake by the published `Principal`'s roles.

    `default` decides requests no rule and no route-bound permission covers: "deny" (the default: unknown
    routes are closed) or "allow". `shadow=True` evaluates and records would-be refusals as `shadow_deny`
    without blocking. `challenge` is sent as `WWW-Authenticate` on 401 (e.g. `'Bearer realm="api"'`).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        roles: Mapping[str, RoleDef] | None = None,
        rules: Iterable[RBACRule] = (),
        default: Literal["deny", "allow"] = "deny",
        shadow: bool = False,
        challenge: str | None = None,
    ) -> None:
        if default not in ("deny", "allow"):
            raise ConfigurationError(f"default must be 'deny' or 'allow', not {default!r}")
        if challenge is not None and (not challenge or contains_ctl(challenge)):
            raise ConfigurationError("challenge must be a header value without control characters")
        self.app = app
        self._roles: dict[str, RoleDef] = dict(roles or {})
        for name, role in self._roles.items():
            if not isinstance(role, RoleDef):
                raise ConfigurationError(f"role {name!r} must be a RoleDef")
        self._closure = {name: self._expand(name, ()) for name in self._roles}
        self._role_named: dict[str, frozenset[str]] = {}
        self._role_routes: dict[str, tuple[_RoutePermission, ...]] = {}
        for name in self._roles:
            self._role_named[name], self._role_routes[name] = self._parse_permissions(name)
        self._grants_cache: dict[frozenset[str], _Grants] = {}
        rule_list = list(rules)
        ids = [rule.id for rule in rule_list]
        if len(ids) != len(set(ids)):
            raise ConfigurationError("rule ids must be unique")
        self._check_permissions_exist(rule_list)
        self._rules: RouteTable[_CompiledRule] = RouteTable(
            (rule.path, rule.methods, _CompiledRule(rule, PathPattern(rule.path)), rule.host)
            for rule in rule_list
        )
        self._default = default
        self._shadow = shadow
        self._unauthenticated = Problem(401, "Authentication is required.")
        self._forbidden = Problem(403, "You are not allowed to do this.")
        self._challenge = [] if challenge is None else [(b"www-authenticate", challenge.encode("latin-1"))]

    def __repr__(self) -> str:
        return (
            f"RBACMiddleware(roles={sorted(self._roles)}, rules={len(self._rules)}, "
            f"default={self._default!r}, shadow={self._shadow!r})"
        )

    def _expand(self, name: str, path: tuple[str, ...]) -> frozenset[str]:
        if name in path:
            raise ConfigurationError(f"role inheritance cycle: {' -> '.join((*path, name))}")
        role = self._roles.get(name)
        if role is None:
            raise ConfigurationError(f"role {path[-1]!r} inherits from undefined role {name!r}")
        found = {name}
        for parent in role.inherits:
            found |= self._expand(parent, (*path, name))
        return frozenset(found)

    def _parse_permissions(self, name: str) -> tuple[frozenset[str], tuple[_RoutePermission, ...]]:
        named: set[str] = set()
        routes = []
        for permission in self._roles[name].permissions:
            methods_part, _, path = permission.rpartition(" ")
            if not path.startswith("/"):
                if methods_part:
                    raise ConfigurationError(f"role {name!r}: {permission!r} is neither a name nor a route")
                named.add(permission)
                continue
            methods = None
            if methods_part.strip() not in ("", "*"):
                methods = _with_head(method.strip().upper() for method in methods_part.split(","))
            routes.append(_RoutePermission(name, PathPattern(path), methods))
        return frozenset(named), tuple(routes)

    def _check_permissions_exist(self, rules: list[RBACRule]) -> None:
        # A permission no role can grant is a typo that would deny everyone silently.
        every = self._grants(frozenset(self._roles))
        for rule in rules:
            for permission in rule.permissions:
                if not every.has(permission):
                    raise ConfigurationError(f"rule {rule.id}: no role grants permission {permission!r}")

    def _grants(self, held: frozenset[str]) -> _Grants:
        cached = self._grants_cache.get(held)
        if cached is not None:
            return cached
        roles: set[str] = set()
        for name in held:
            roles |= self._closure.get(name, {name})
        named = frozenset().union(*(self._role_named.get(name, ()) for name in roles))
        grants = _Grants(
            roles=frozenset(roles),
            permissions=named,
            prefixes=tuple(p[:-1] for p in named if p.endswith(":*")),
            everything=min((name for name in roles if "*" in self._role_named.get(name, ())), default=None),
            routes=tuple(route for name in sorted(roles) for route in self._role_routes.get(name, ())),
        )
        if len(self._grants_cache) >= _GRANTS_CACHE_SIZE:
            self._grants_cache.clear()  # role sets are few in practice; never let odd tokens grow this
        self._grants_cache[held] = grants
        return grants

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        try:
            path = request_path(scope)
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer="rbac")
            return
        context = get_context(scope)
        outcome, rule_id, reason = self._decide(scope, path, context.principal)
        if outcome == "allow":
            context.record("rbac", "allow", rule=rule_id, reason=reason)
            await self.app(scope, receive, send)
            return
        if self._shadow:
            context.record("rbac", "shadow_deny", rule=rule_id, reason=reason)
            await self.app(scope, receive, send)
            return
        context.record("rbac", "deny", rule=rule_id, reason=reason)
        if outcome == "unauthenticated":
            await send_problem(scope, send, self._unauthenticated, headers=self._challenge, layer="rbac")
        else:
            await send_problem(scope, send, self._forbidden, layer="rbac")

    def _decide(self, scope: Scope, path: str, principal: Principal | None) -> _Outcome:
        # Only the request line's method counts: X-HTTP-Method-Override and kin are never read.
        method = scope.get("method", "GET")
        rules = self._rules.for_request(scope)
        template = route_template(scope)
        found = rules.match(template, method) if template is not None else None
        via_template = found is not None
        if found is None:
            found = rules.match(path, method)
        authenticated = principal is not None and principal.is_authenticated
        if found is None:
            if authenticated and principal is not None:
                grants = self._grants(principal.roles)
                if grants.everything is not None:
                    return "allow", f"role:{grants.everything}", None
                for route in grants.routes:
                    if route.allows(path, method):
                        return "allow", f"role:{route.role}", None
            if self._default == "allow":
                return "allow", None, "default"
            return ("forbidden" if authenticated else "unauthenticated"), None, "no_rule"
        compiled, params = found
        rule = compiled.rule
        if rule.public:
            return "allow", rule.id, None
        if not authenticated or principal is None:
            return "unauthenticated", rule.id, "unauthenticated"
        grants = self._grants(principal.roles)
        if rule.roles and grants.roles.isdisjoint(rule.roles):
            return "forbidden", rule.id, "missing_role"
        if not all(grants.has(permission) for permission in rule.permissions):
            return "forbidden", rule.id, "missing_permission"
        if not principal.scopes.issuperset(rule.scopes):
            return "forbidden", rule.id, "missing_scope"
        if rule.tenant_param is not None:
            if via_template:
                params = compiled.pattern.match(path) or scope.get("path_params") or {}
            value = params.get(rule.tenant_param)
            if value is None or principal.tenant is None or unquote(str(value)) != principal.tenant:
                return "forbidden", rule.id, "tenant_mismatch"
        if rule.tenant_header is not None:
            header = rule.tenant_header.lower().encode("latin-1")
            values = [v for k, v in scope.get("headers") or () if k == header]
            if len(values) != 1 or principal.tenant is None or values[0] != principal.tenant.encode():
                return "forbidden", rule.id, "tenant_mismatch"
        return "allow", rule.id, None
