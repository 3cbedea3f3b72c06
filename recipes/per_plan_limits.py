"""Per-plan rate limits on a FastAPI app, read from the caller's Principal.

The limiter reads the Principal an authentication layer put in the request context: its `plan`, or the
`plan` claim of its token. Here a tiny stand-in authenticator publishes it from a demo header so the recipe
runs on its own; in production, `JWTAuthMiddleware` replaces `DemoAuthMiddleware` (same place in the stack,
same Principal), with `claims=ClaimMapping(plan="plan")` so the token's `plan` claim becomes
`Principal.plan`. The limiter reads either `Principal.plan` or the `plan` claim.

Run: `uvicorn recipes.per_plan_limits:app`, then
`curl -i -H 'x-demo-user: alice; pro' localhost:8000/items/1` and read the `RateLimit` headers.
"""

from typing import Any

from fastapi import FastAPI, Request

from nexus_middleware import Principal, Quota, RateLimitMiddleware, RateLimitOptions, RateLimitPolicy
from nexus_middleware.context import get_context, publish_principal
from nexus_middleware.headers import get_header
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

PLAN_LIMITS = {
    "free": "5/minute;100/day",
    "pro": "60/minute;10000/day",
    "enterprise": "unlimited",
}
ANONYMOUS_LIMITS = "2/minute"


class DemoAuthMiddleware:
    """Stand-in authentication for the recipe: trusts `x-demo-user: <subject>; <plan>`. NEVER deploy this:
    `JWTAuthMiddleware` replaces it and publishes the same Principal, with the plan from a token claim."""

    def __init__(self, app: ASGIApp, /) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            raw = get_header(scope.get("headers") or (), b"x-demo-user")
            if raw:
                subject, _, plan = raw.decode("latin-1").partition(";")
                claims = {"sub": subject.strip(), "plan": plan.strip()}
                publish_principal(scope, Principal(subject.strip(), method="jwt", claims=claims))
        await self.app(scope, receive, send)


def create_app(*, storage: object = "memory://", **limiter: Any) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        principal = get_context(request.scope).principal
        return {"item": item_id, "caller": principal.subject if principal else None}

    policy = RateLimitPolicy(
        "api",
        # One quota per caller (subject when authenticated, else client address), sized by plan.
        quotas=(Quota("plan", ANONYMOUS_LIMITS, key="principal_or_client", plans=PLAN_LIMITS),),
    )
    # Added last = outermost: the authenticator runs first, so the limiter sees the Principal.
    app.add_middleware(
        RateLimitMiddleware, policies=[policy], storage=storage, options=RateLimitOptions(), **limiter
    )
    app.add_middleware(DemoAuthMiddleware)
    return app


app = create_app()
