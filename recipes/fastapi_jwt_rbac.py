"""Recipe: a FastAPI app protected by JWTs from a JWKS URL, with RBAC rules and a `requires(...)` dependency.

The stack, outermost first:

1. `JWTAuthMiddleware` verifies `Authorization: Bearer <JWT>` against the issuer's JWKS (fetched, cached,
   refreshed on key rotation) and publishes the caller's `Principal` (roles from the `roles` claim, tenant
   from `org`, scopes from `scope`).
2. `RBACMiddleware` decides per route on the principal's roles (with inheritance) and tenant; unknown routes
   are closed.
3. The handlers add per-operation checks on the token's scopes with `Depends(requires(...))`.

Every refusal is `application/problem+json`. Run it against your identity provider:

    NEXUS_ISSUER=https://idp.example.com/ NEXUS_AUDIENCE=orders-api \\
    NEXUS_JWKS_URL=https://idp.example.com/.well-known/jwks.json python -m recipes.fastapi_jwt_rbac
"""

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
from fastapi import Depends, FastAPI, Request

from nexus_middleware import (
    ClaimMapping,
    JWTAuthMiddleware,
    JWTIssuer,
    Principal,
    RBACMiddleware,
    RBACRule,
    RoleDef,
)
from nexus_middleware.dependencies import install_problem_handler, requires

ROLES = {
    "viewer": RoleDef(permissions=["orders:read"]),
    "clerk": RoleDef(inherits=["viewer"], permissions=["orders:write"]),
    "admin": RoleDef(inherits=["clerk"], permissions=["*"]),
}

RULES = [
    # Public routes: no token needed (the JWT layer exempts them too, see PUBLIC below).
    RBACRule("health", "/health", public=True),
    RBACRule("docs", "/docs", public=True),
    RBACRule("openapi", "/openapi.json", public=True),
    RBACRule("admin", "/admin/*", roles=["admin"]),
    RBACRule("orders-read", "/orders/*", methods=["GET"], permissions=["orders:read"]),
    RBACRule("orders-write", "/orders/*", methods=["POST", "PUT", "DELETE"], permissions=["orders:write"]),
    # A caller only sees its own organisation's reports: the token's `org` must equal the path's.
    RBACRule("org-reports", "/orgs/{org_id}/reports", methods=["GET"], tenant_param="org_id"),
    RBACRule("me", "/me"),  # any authenticated caller
]

PUBLIC = ["/health", "/docs", "/openapi.json"]

# Per-operation checks on the token's scopes (RFC 6750 403 insufficient_scope when one is missing).
OrderReader = Annotated[Principal, Depends(requires("orders:read"))]
OrderWriter = Annotated[Principal, Depends(requires("orders:write"))]


def create_app(
    *,
    issuer: str,
    audience: str,
    jwks_url: str,
    algorithms: Sequence[str] = ("RS256", "ES256"),
    shadow: bool = False,
) -> FastAPI:
    """The protected app. `shadow=True` records RBAC refusals (`shadow_deny`) without enforcing them."""
    # One HTTP client for JWKS fetches, closed with the app; no proxy settings read from the environment.
    jwks_client = httpx.AsyncClient(trust_env=False, follow_redirects=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await jwks_client.aclose()

    app = FastAPI(title="Orders", lifespan=lifespan)
    install_problem_handler(app)  # requires() refusals as problem+json, like the middlewares' own

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/me")
    async def me(request: Request) -> dict[str, Any]:
        principal: Principal = request.user
        return {
            "subject": principal.subject,
            "tenant": principal.tenant,
            "roles": sorted(principal.roles),
            "scopes": sorted(principal.scopes),
        }

    @app.get("/orders/{order_id}")
    async def read_order(order_id: int, principal: OrderReader) -> dict[str, Any]:
        return {"id": order_id, "owner": principal.subject}

    @app.post("/orders", status_code=201)
    async def create_order(principal: OrderWriter) -> dict[str, Any]:
        return {"created_by": principal.subject, "tenant": principal.tenant}

    @app.get("/orgs/{org_id}/reports")
    async def reports(org_id: str) -> dict[str, Any]:
        return {"org": org_id, "reports": []}

    @app.get("/admin/stats")
    async def stats() -> dict[str, int]:
        return {"orders": 0}

    # Added last runs first: authenticate, then authorize.
    app.add_middleware(
        RBACMiddleware,
        roles=ROLES,
        rules=RULES,
        shadow=shadow,
        challenge=f'Bearer realm="{audience}"',
    )
    app.add_middleware(
        JWTAuthMiddleware,
        issuers=[
            JWTIssuer(
                issuer,
                audience,
                list(algorithms),
                jwks_url=jwks_url,
                claims=ClaimMapping(roles="roles", tenant="org"),
            )
        ],
        routes=[(path, None, "exempt") for path in PUBLIC],
        http_client=jwks_client,
    )
    return app


if __name__ == "__main__":
    import uvicorn

    uvicorn.run(
        create_app(
            issuer=os.environ["NEXUS_ISSUER"],
            audience=os.environ["NEXUS_AUDIENCE"],
            jwks_url=os.environ["NEXUS_JWKS_URL"],
        ),
        host="127.0.0.1",
        port=int(os.environ.get("PORT", "8000")),
    )
