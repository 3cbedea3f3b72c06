from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st

from nexus_middleware import get_context
from nexus_middleware.api_keys import APIKeyManager, APIKeyMiddleware, MemoryAPIKeyStore
from nexus_middleware.context import Principal, publish_principal
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.rbac import RBACMiddleware, RBACRule, RoleDef
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.servers import serve

ROLES = {
    "viewer": RoleDef(permissions=("orders:read",)),
    "editor": RoleDef(inherits=("viewer",), permissions=("orders:write",)),
    "admin": RoleDef(inherits=("editor",), permissions=("*",)),
    "billing": RoleDef(permissions=("invoices:*",)),
    "reporter": RoleDef(permissions=("GET,HEAD /reports/*", "/exports/{name}")),
}
RULES = [
    RBACRule("health", "/health", public=True),
    RBACRule("admin", "/admin/*", roles=("admin",)),
    RBACRule("orders-read", "/orders/*", methods=("GET",), permissions=("orders:read",)),
    RBACRule("orders-write", "/orders/*", methods=("POST", "PUT", "DELETE"), permissions=("orders:write",)),
    RBACRule("invoices", "/invoices/*", permissions=("invoices:read",)),
    RBACRule("org", "/orgs/{org_id}/*", tenant_param="org_id"),
    RBACRule("tenant-header", "/tenant-data", tenant_header="X-Tenant-ID"),
    RBACRule("scoped", "/scoped", scopes=("orders:export",)),
    RBACRule("me", "/me"),
]


def with_principal(app: ASGIApp, principal: Principal | None) -> ASGIApp:
    """Stands in for an authentication layer: publishes `principal` before the app runs."""

    async def authenticated(scope: Scope, receive: Receive, send: Send) -> None:
        if principal is not None and scope["type"] != "lifespan":
            publish_principal(scope, principal)
        await app(scope, receive, send)

    return authenticated


def user(*roles: str, tenant: str | None = None, scopes: tuple[str, ...] = ()) -> Principal:
    return Principal("u1", method="jwt", roles=frozenset(roles), tenant=tenant, scopes=frozenset(scopes))


def rbac(**options: Any) -> RBACMiddleware:
    options.setdefault("roles", ROLES)
    options.setdefault("rules", RULES)
    return RBACMiddleware(ok_app, **options)


async def call(
    principal: Principal | None,
    path: str,
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    raw_path: bytes | None = None,
    **options: Any,
) -> tuple[int, Scope]:
    scope = make_scope(path, method=method, headers=headers or [], raw_path=raw_path)
    recorded = await run_asgi(with_principal(rbac(**options), principal), scope)
    return recorded.status, scope


@pytest.mark.parametrize(
    ("roles", "method", "path", "expected", "rule"),
    [
        ((), "GET", "/health", 200, "health"),
        (("viewer",), "GET", "/orders/1", 200, "orders-read"),
        (("viewer",), "HEAD", "/orders/1", 200, "orders-read"),  # HEAD follows GET, as in routers
        ((), "HEAD", "/health", 200, "health"),
        (("viewer",), "POST", "/orders/1", 403, "orders-write"),
        (("editor",), "POST", "/orders/1", 200, "orders-write"),  # inherits viewer, adds write
        (("editor",), "GET", "/orders/1", 200, "orders-read"),
        (("editor",), "GET", "/admin/users", 403, "admin"),
        (("admin",), "GET", "/admin/users", 200, "admin"),
        (("admin",), "DELETE", "/orders/1", 200, "orders-write"),  # admin -> editor -> viewer
        (("admin",), "GET", "/invoices/9", 200, "invoices"),  # "*" grants every named permission
        (("billing",), "GET", "/invoices/9", 200, "invoices"),  # "invoices:*" grants invoices:read
        (("viewer",), "GET", "/invoices/9", 403, "invoices"),
        (("reporter",), "GET", "/reports/q3", 200, "role:reporter"),  # route-bound permission
        (("reporter",), "POST", "/reports/q3", 403, None),
        (("reporter",), "HEAD", "/reports/q3", 200, "role:reporter"),
        (("reporter",), "DELETE", "/exports/q3", 200, "role:reporter"),
        (("viewer",), "GET", "/reports/q3", 403, None),  # unmatched: default deny
        (("admin",), "PATCH", "/anything/else", 200, "role:admin"),  # "*" covers unmatched routes too
        (("viewer", "unknown-role"), "GET", "/me", 200, "me"),
        ((), "GET", "/me", 200, "me"),  # a rule without requirements needs only authentication
    ],
)
async def test_roles_inheritance_and_permissions(
    roles: tuple[str, ...], method: str, path: str, expected: int, rule: str | None
) -> None:
    principal = user(*roles) if roles or path == "/me" else None
    status, scope = await call(principal, path, method=method)
    assert status == expected
    decision = get_context(scope).decision("rbac")
    assert decision is not None
    assert decision.outcome == ("allow" if expected == 200 else "deny")
    assert decision.rule == rule


@pytest.mark.parametrize(
    ("principal", "path", "expected", "reason"),
    [
        (None, "/me", 401, "unauthenticated"),
        (Principal("anonymous"), "/me", 401, "unauthenticated"),
        (None, "/unknown", 401, "no_rule"),
        (user("viewer"), "/unknown", 403, "no_rule"),
        (user("viewer"), "/orders/1", 200, None),
    ],
)
async def test_401_without_principal_and_403_when_denied(
    principal: Principal | None, path: str, expected: int, reason: str | None
) -> None:
    scope = make_scope(path)
    recorded = await run_asgi(with_principal(rbac(challenge='Bearer realm="api"'), principal), scope)
    assert recorded.status == expected
    decision = get_context(scope).decision("rbac")
    assert decision is not None and decision.reason == reason
    if expected == 401:
        assert recorded.header("www-authenticate") == 'Bearer realm="api"'
    if expected >= 400:
        assert recorded.header("content-type") == "application/problem+json"
        assert recorded.json()["status"] == expected
        assert get_context(scope).local_response == "rbac"


async def test_default_allow_for_unmatched_routes() -> None:
    status, scope = await call(None, "/unknown", default="allow")
    assert status == 200
    decision = get_context(scope).decision("rbac")
    assert decision is not None and (decision.outcome, decision.reason) == ("allow", "default")
    assert (await call(None, "/me", default="allow"))[0] == 401  # matched rules still apply


@pytest.mark.parametrize(
    ("principal", "path", "headers", "expected"),
    [
        (user(tenant="acme"), "/orgs/acme/projects", [], 200),
        (user(tenant="acme"), "/orgs/globex/projects", [], 403),
        (user(), "/orgs/acme/projects", [], 403),  # no tenant at all
        (user(tenant="acme corp"), "/orgs/acme%20corp/x", [], 200),
        (user(tenant="acme"), "/orgs/%61cme/x", [], 200),  # normalized before comparing
        (user(tenant="acme"), "/tenant-data", [("X-Tenant-ID", "acme")], 200),
        (user(tenant="acme"), "/tenant-data", [("X-Tenant-ID", "globex")], 403),
        (user(tenant="acme"), "/tenant-data", [], 403),
        (user(tenant="acme"), "/tenant-data", [("X-Tenant-ID", "acme"), ("X-Tenant-ID", "globex")], 403),
        (
            user(tenant="acme"),
            "/tenant-data",
            [
                ("X-Tenant-ID", "acme "),
            ],
            403,
        ),
    ],
)
async def test_tenant_scoping(
    principal: Principal, path: str, headers: list[tuple[str, str]], expected: int
) -> None:
    status, scope = await call(principal, path, headers=headers, raw_path=path.encode())
    assert status == expected
    if expected == 403:
        decision = get_context(scope).decision("rbac")
        assert decision is not None and decision.reason == "tenant_mismatch"


async def test_scopes_are_required() -> None:
    assert (await call(user("viewer"), "/scoped"))[0] == 403
    assert (await call(user("viewer", scopes=("orders:export",)), "/scoped"))[0] == 200


@pytest.mark.parametrize("header", ["X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override"])
@pytest.mark.parametrize(("method", "override"), [("POST", "GET"), ("GET", "DELETE")])
async def test_method_override_headers_never_change_a_decision(
    header: str, method: str, override: str
) -> None:
    # A viewer may GET but not POST orders; an editor may do both. The override never helps or hurts.
    for roles in (("viewer",), ("editor",)):
        plain, _ = await call(user(*roles), "/orders/1", method=method)
        overridden, _ = await call(user(*roles), "/orders/1", method=method, headers=[(header, override)])
        assert plain == overridden
    assert (await call(user("viewer"), "/orders/1", method="POST", headers=[(header, "GET")]))[0] == 403


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/%61dmin/users",
        b"//admin/users",
        b"/x/../admin/users",
        b"/admin%2Fusers",
        b"/%2561dmin/../admin",
        b"/./admin",
        b"/admin",
        b"/health/../admin/x",
        b"/%2e%2e/admin/x",
    ],
)
async def test_encoded_and_dotted_bypass_attempts_are_denied(raw_path: bytes) -> None:
    # A catch-all public rule after /admin/*: a path that escaped the admin rule would be allowed.
    rules = [*RULES[:2], RBACRule("public", "*", public=True)]
    status, scope = await call(user("editor"), "/ignored", raw_path=raw_path, rules=rules)
    assert status == 403
    decision = get_context(scope).decision("rbac")
    assert decision is not None and decision.rule == "admin"
    assert (await call(user("admin"), "/ignored", raw_path=raw_path, rules=rules))[0] == 200


async def test_invalid_path_is_a_400() -> None:
    status, _ = await call(user("admin"), "/x", raw_path=b"/admin%00")
    assert status == 400


async def test_shadow_mode_records_but_never_blocks() -> None:
    status, scope = await call(user("viewer"), "/admin/users", shadow=True)
    assert status == 200
    decision = get_context(scope).decision("rbac")
    assert decision is not None
    assert (decision.outcome, decision.rule, decision.reason) == ("shadow_deny", "admin", "missing_role")
    status, scope = await call(None, "/me", shadow=True)
    assert status == 200
    assert get_context(scope).decision("rbac").outcome == "shadow_deny"  # type: ignore[union-attr]
    status, scope = await call(user("admin"), "/admin/users", shadow=True)
    assert get_context(scope).decision("rbac").outcome == "allow"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("host", "roles", "expected", "rule"),
    [
        ("internal.example.com", (), 403, "internal-admin"),
        ("internal.example.com", ("admin",), 200, "internal-admin"),
        ("Internal.Example.com:8443", ("viewer",), 403, "internal-admin"),
        ("public.example.com", (), 200, "public-admin"),
        ("other.example.com", ("viewer",), 200, "any-admin"),
        (None, (), 200, "any-admin"),
    ],
)
async def test_rules_follow_the_host(
    host: str | None, roles: tuple[str, ...], expected: int, rule: str
) -> None:
    rules = [
        RBACRule("public-admin", "/admin/*", public=True, host="public.example.com"),
        RBACRule("internal-admin", "/admin/*", roles=("admin",), host="internal.example.com"),
        RBACRule("any-admin", "/admin/*"),
    ]
    status, scope = await call(
        user(*roles), "/admin/users", headers=[] if host is None else [("host", host)], rules=rules
    )
    assert status == expected
    assert get_context(scope).decision("rbac").rule == rule  # type: ignore[union-attr]


async def test_template_match_takes_tenant_from_the_real_path() -> None:
    async def routed(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).route = "/orgs/{org_id}/items"  # as a router-aware layer would record it
        await middleware(scope, receive, send)

    middleware = with_principal(
        rbac(rules=[RBACRule("org-items", "/orgs/{org_id}/items", tenant_param="org_id")]),
        user(tenant="acme"),
    )
    scope = make_scope("/orgs/acme/items")
    assert (await run_asgi(routed, scope)).status == 200
    assert get_context(scope).decision("rbac").rule == "org-items"  # type: ignore[union-attr]
    assert (await run_asgi(routed, make_scope("/orgs/globex/items"))).status == 403


@pytest.mark.parametrize(
    ("roles", "rules", "message"),
    [
        ({"a": RoleDef(inherits=("a",))}, [], "cycle"),
        (
            {"a": RoleDef(inherits=("b",)), "b": RoleDef(inherits=("c",)), "c": RoleDef(inherits=("a",))},
            [],
            "cycle",
        ),
        ({"a": RoleDef(inherits=("missing",))}, [], "undefined"),
        (
            {"a": RoleDef(permissions=("orders:read",))},
            [RBACRule("r", "/x", permissions=("ordres:read",))],
            "grants",
        ),
        ({"a": RoleDef(permissions=("GET orders",))}, [], "neither"),
        ({}, [RBACRule("r", "/x"), RBACRule("r", "/y")], "unique"),
        ({"a": {"permissions": []}}, [], "RoleDef"),
    ],
)
def test_invalid_role_graphs_and_rules(roles: Any, rules: list[RBACRule], message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RBACMiddleware(ok_app, roles=roles, rules=rules)


@pytest.mark.parametrize(
    "build",
    [
        lambda: RBACRule("", "/x"),
        lambda: RBACRule("r", "/x", public=True, roles=("a",)),
        lambda: RBACRule("r", "/x", tenant_param="org"),
        lambda: RBACRule("r", "/x", tenant_header=""),
        lambda: RBACRule("r", "/x", roles="admin"),
        lambda: RBACRule("r", "x"),
        lambda: RoleDef(permissions=("",)),
        lambda: RBACMiddleware(ok_app, default="maybe"),
        lambda: RBACMiddleware(ok_app, challenge="Bearer\r\nX: y"),
    ],
)
def test_invalid_options(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        rbac_rule = build()
        RBACMiddleware(ok_app, rules=[rbac_rule] if isinstance(rbac_rule, RBACRule) else [])


def test_repr_is_readable() -> None:
    assert repr(rbac(shadow=True)) == (
        "RBACMiddleware(roles=['admin', 'billing', 'editor', 'reporter', 'viewer'], rules=9, "
        "default='deny', shadow=True)"
    )


async def test_lifespan_passes_through() -> None:
    recorded = await run_asgi(rbac(), make_scope(scope_type="lifespan"))
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(("roles", "accepted"), [(("admin",), True), (("viewer",), False)])
async def test_websocket_handshake(roles: tuple[str, ...], accepted: bool) -> None:
    scope = make_scope("/admin/live", scope_type="websocket")
    recorded = await run_asgi(with_principal(rbac(), user(*roles)), scope)
    types = [message["type"] for message in recorded.messages]
    assert ("websocket.accept" in types) is accepted
    if not accepted:
        assert recorded.messages == [
            {"type": "websocket.close", "code": 1008, "reason": "You are not allowed to do this."}
        ]


def secured_app(store: MemoryAPIKeyStore) -> FastAPI:
    app = FastAPI()

    @app.get("/orders/{order_id}")
    async def read(order_id: str) -> dict[str, str]:
        return {"order": order_id}

    @app.post("/orders/{order_id}")
    async def write(order_id: str) -> dict[str, str]:
        return {"written": order_id}

    @app.get("/orgs/{org_id}/report")
    async def report(org_id: str) -> dict[str, str]:
        return {"org": org_id}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # Added last is outermost: API keys authenticate, then RBAC decides.
    app.add_middleware(RBACMiddleware, roles=ROLES, rules=RULES)
    app.add_middleware(APIKeyMiddleware, store=store, exempt=["/health"])
    return app


async def check_secured(client: httpx.AsyncClient, viewer: str, editor: str) -> None:
    assert (await client.get("/health")).status_code == 200
    assert (await client.get("/orders/1", headers={"X-API-Key": viewer})).json() == {"order": "1"}
    denied = await client.post("/orders/1", headers={"X-API-Key": viewer, "X-HTTP-Method-Override": "GET"})
    assert denied.status_code == 403
    assert denied.headers["content-type"] == "application/problem+json"
    assert (await client.post("/orders/1", headers={"X-API-Key": editor})).json() == {"written": "1"}
    assert (await client.get("/orgs/acme/report", headers={"X-API-Key": viewer})).status_code == 200
    assert (await client.get("/orgs/globex/report", headers={"X-API-Key": viewer})).status_code == 403
    assert (await client.get("/orders/1")).status_code == 401


async def keys() -> tuple[MemoryAPIKeyStore, str, str]:
    store = MemoryAPIKeyStore()
    manager = APIKeyManager(store)
    viewer = await manager.create(owner="vera", org="acme", roles=["viewer"])
    editor = await manager.create(owner="ed", org="acme", roles=["editor"])
    return store, viewer.key, editor.key


async def test_fastapi_with_api_keys_and_rbac() -> None:
    store, viewer, editor = await keys()
    transport = httpx.ASGITransport(app=secured_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        await check_secured(client, viewer, editor)


async def test_end_to_end_through_uvicorn() -> None:
    store, viewer, editor = await keys()
    async with serve(secured_app(store)) as url, httpx.AsyncClient(base_url=url) as client:
        await check_secured(client, viewer, editor)
        # httpx normalizes dot segments; a raw request target keeps them, as an attacker would send it.
        response = await client.get(f"{url}/x/%2e%2e/admin/users", headers={"X-API-Key": editor})
        assert response.status_code == 403


def encoded(segment: str, choices: list[bool]) -> str:
    return "".join(
        f"%{ord(char):02X}" if pick else char for char, pick in zip(segment, choices, strict=False)
    )


@settings(max_examples=150, deadline=None)
@given(
    admin_encoding=st.lists(st.booleans(), min_size=5, max_size=5),
    prefix=st.sampled_from(["", "/", "/.", "/x/..", "/./x/y/../..", "/%2e", "/x/%2E%2E"]),
    separator=st.sampled_from(["/", "//", "/./", "%2F", "%2f", "/x/../"]),
    lower_hex=st.booleans(),
)
async def test_no_spelling_of_an_admin_path_escapes_the_admin_rule(
    admin_encoding: list[bool], prefix: str, separator: str, lower_hex: bool
) -> None:
    admin = encoded("admin", admin_encoding)
    if lower_hex:
        admin = admin.lower()
    raw = f"{prefix}/{admin}{separator}users".encode()
    rules = [*RULES[:2], RBACRule("public", "*", public=True)]
    status, scope = await call(user("editor"), "/ignored", raw_path=raw, rules=rules)
    assert status == 403, raw
    assert get_context(scope).decision("rbac").rule == "admin"  # type: ignore[union-attr]


class Boom(Exception):
    pass


async def test_app_exceptions_propagate() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise Boom

    middleware = with_principal(RBACMiddleware(failing, roles=ROLES, rules=RULES), user("viewer"))
    with pytest.raises(Boom):
        await run_asgi(middleware, make_scope("/orders/1"))
