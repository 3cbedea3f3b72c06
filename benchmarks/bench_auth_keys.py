"""API-key authentication, RBAC decisions and identity forwarding, next to the reference rows."""

from collections.abc import Callable
from typing import Any

from benchmarks.conftest import _HEADERS, BASELINE, Driver, NoopMiddleware, bare_app, bench, make_http_scope
from nexus_middleware.api_keys import APIKeyManager, APIKeyMiddleware, APIKeyPolicy, MemoryAPIKeyStore
from nexus_middleware.context import STATE_KEY, Principal, RequestContext
from nexus_middleware.identity import IdentityHeaders
from nexus_middleware.rbac import RBACMiddleware, RBACRule, RoleDef
from nexus_middleware.types import Receive, Scope, Send

PRINCIPAL = Principal("alice", method="jwt", tenant="acme", roles=frozenset({"editor"}))
ROLES = {
    "viewer": RoleDef(permissions=("items:read",)),
    "editor": RoleDef(inherits=("viewer",), permissions=("items:write",)),
    "admin": RoleDef(inherits=("editor",), permissions=("*",)),
}
RULES = [
    RBACRule("health", "/health", public=True),
    RBACRule("admin", "/admin/*", roles=("admin",)),
    RBACRule("orgs", "/orgs/{org_id}/*", tenant_param="org_id"),
    RBACRule("items-write", "/api/items/*", methods=("POST", "PUT", "DELETE"), permissions=("items:write",)),
    RBACRule("items-read", "/api/items/*", methods=("GET",), permissions=("items:read",)),
]


def issue_key(driver: Driver, store: MemoryAPIKeyStore) -> str:
    return driver.loop.run_until_complete(APIKeyManager(store).create(owner="alice", org="acme")).key


def with_key(key: str) -> Callable[[], Scope]:
    headers = [*_HEADERS, (b"x-api-key", key.encode())]
    return lambda: make_http_scope(headers=headers)


def with_principal() -> Scope:
    scope = make_http_scope()
    scope["state"] = {STATE_KEY: RequestContext(principal=PRINCIPAL)}
    return scope


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app)


def test_noop_pure_asgi_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app))


def test_api_key_cached(benchmark: Any, driver: Driver) -> None:
    store = MemoryAPIKeyStore()
    key = issue_key(driver, store)
    app = APIKeyMiddleware(bare_app, store=store)
    bench(benchmark, driver, "api key, memory store, cached", app, scope_factory=with_key(key))


def test_api_key_uncached(benchmark: Any, driver: Driver) -> None:
    store = MemoryAPIKeyStore()
    key = issue_key(driver, store)
    app = APIKeyMiddleware(bare_app, store=store, policy=APIKeyPolicy(cache_ttl=0))
    bench(benchmark, driver, "api key, memory store, uncached", app, scope_factory=with_key(key))


def test_api_key_refused(benchmark: Any, driver: Driver) -> None:
    store = MemoryAPIKeyStore()
    key = issue_key(driver, store)
    app = APIKeyMiddleware(bare_app, store=store)
    bench(benchmark, driver, "api key, wrong secret (401)", app, scope_factory=with_key(key[:-1] + "!"))


def test_rbac_decision(benchmark: Any, driver: Driver) -> None:
    app = RBACMiddleware(bare_app, roles=ROLES, rules=RULES)
    bench(benchmark, driver, "rbac decision (allow, 5 rules, inheritance)", app, scope_factory=with_principal)


def test_api_key_then_rbac(benchmark: Any, driver: Driver) -> None:
    store = MemoryAPIKeyStore()
    key = driver.loop.run_until_complete(APIKeyManager(store).create(owner="alice", roles=["viewer"])).key
    app = APIKeyMiddleware(RBACMiddleware(bare_app, roles=ROLES, rules=RULES), store=store)
    bench(benchmark, driver, "api key (cached) + rbac", app, scope_factory=with_key(key))


def test_identity_forwarding(benchmark: Any, driver: Driver) -> None:
    identity = IdentityHeaders(strip_credentials=("Authorization",))

    async def forwarding(scope: Scope, receive: Receive, send: Send) -> None:
        scope["headers"] = identity.apply(scope["headers"], PRINCIPAL)
        await bare_app(scope, receive, send)

    bench(benchmark, driver, "identity forwarding (IdentityHeaders.apply)", forwarding)
