"""A login route that fails closed when the rate-limit store is down; the rest of the API fails open.

Brute-force protection must not silently disappear when Redis does: `/login` answers 503 with
`Retry-After` while the store is unreachable, every other route keeps serving (without rate headers).
Both are limited per client address, as the trusted-proxy resolver sees it (set `trusted_proxies` to the
addresses of your load balancers, never trust `X-Forwarded-For` from anyone else).

Run: `uvicorn recipes.login_fail_closed:app` with Redis on localhost:6379.
"""

from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from nexus_middleware import ClientAddressResolver, RateLimitMiddleware, RateLimitOptions, RateLimitPolicy


async def login(request: Request) -> JSONResponse:
    return JSONResponse({"token": "demo"})


async def items(request: Request) -> JSONResponse:
    return JSONResponse({"items": []})


def create_app(
    redis_url: str = "redis://127.0.0.1:6379/0",
    *,
    trusted_proxies: tuple[str, ...] = (),
    **options: Any,
) -> Starlette:
    app = Starlette(routes=[Route("/login", login, methods=["POST"]), Route("/items", items)])
    policies = [
        RateLimitPolicy(
            "login",
            "5/minute;20/hour",
            key="client",
            paths=("/login",),
            methods=frozenset({"POST"}),
            strategy="moving-window",  # exact: no burst at a window edge
            on_store_error="fail_closed",
        ),
        RateLimitPolicy("api", "100/minute", key="client", on_store_error="fail_open"),
    ]
    app.add_middleware(
        RateLimitMiddleware,
        policies=policies,
        storage=redis_url,
        options=RateLimitOptions(**options),
        client_resolver=ClientAddressResolver(trusted_proxies=trusted_proxies),
    )
    return app


app = create_app()
