"""Recipe: protect a FastAPI route that calls a flaky dependency.

The stack, outermost first:
- `TimeoutMiddleware`: the whole request has 2 s; the route reads the deadline from the request context and
  gives the dependency call only what is left, so it never outlives the client's patience.
- `CircuitBreakerMiddleware`: after 3 consecutive failures (or half the calls of the last 30 s failing, once
  there were 10) the route answers from a fallback at once, without calling the dependency, for 10 s; then one
  trial call at a time probes the dependency, and two successes close the breaker.
- `ConcurrencyLimitMiddleware`: at most 20 calls in flight to the dependency, 50 more may wait 0.5 s.

Run: `uvicorn --factory recipes.flaky_dependency:create_app` with `QUOTES_URL` pointing at the dependency
(only this recipe reads the environment; the library never does).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from nexus_middleware import (
    BreakerPolicy,
    CircuitBreakerMiddleware,
    Clock,
    ConcurrencyLimitMiddleware,
    ConcurrencyPolicy,
    Problem,
    StaticResponse,
    TimeoutMiddleware,
    get_context,
)
from nexus_middleware.clock import SYSTEM_CLOCK

QUOTE_ROUTE = "/quotes/{symbol}"


def _bad_gateway(detail: str) -> JSONResponse:
    problem = Problem(502, detail)
    return JSONResponse(problem.to_dict(), status_code=502, media_type="application/problem+json")


def create_app(
    dependency_url: str | None = None, *, deadline: float = 2.0, clock: Clock = SYSTEM_CLOCK
) -> FastAPI:
    base_url = dependency_url or os.environ.get("QUOTES_URL", "http://127.0.0.1:9000")
    client = httpx.AsyncClient(base_url=base_url, trust_env=False)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await client.aclose()

    app = FastAPI(lifespan=lifespan)

    @app.get(QUOTE_ROUTE)
    async def quote(symbol: str, request: Request) -> JSONResponse:
        until = get_context(request.scope).deadline
        remaining = None if until is None else max(0.001, until - clock.monotonic())
        try:
            response = await client.get(f"/quotes/{symbol}", timeout=remaining)
        except httpx.TransportError as exc:
            return _bad_gateway(f"the quote service failed: {type(exc).__name__}")
        if response.status_code >= 500:
            return _bad_gateway(f"the quote service answered {response.status_code}")
        return JSONResponse(response.json(), status_code=response.status_code)

    # Added innermost first: Starlette makes the last one added the outermost.
    app.add_middleware(
        ConcurrencyLimitMiddleware,
        policy=None,
        routes=[
            (QUOTE_ROUTE, ["GET"], ConcurrencyPolicy(max_concurrent=20, queue_size=50, queue_timeout=0.5))
        ],
        clock=clock,
    )
    app.add_middleware(
        CircuitBreakerMiddleware,
        policy=None,
        routes=[
            (
                QUOTE_ROUTE,
                ["GET"],
                BreakerPolicy(
                    failure_threshold=3,
                    failure_ratio=0.5,
                    minimum_requests=10,
                    window=30,
                    reset_timeout=10,
                    half_open_max_calls=1,
                    success_threshold=2,
                ),
            )
        ],
        fallback=StaticResponse(
            status=200,
            body=b'{"price":null,"stale":true}',
            headers=[("cache-control", "no-store"), ("x-fallback", "quote-service-breaker-open")],
        ),
        clock=clock,
    )
    app.add_middleware(TimeoutMiddleware, timeout=deadline, clock=clock)
    return app
