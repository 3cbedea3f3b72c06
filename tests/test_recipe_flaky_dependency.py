"""The flaky-dependency recipe, served by real uvicorn in front of a real (flaky) dependency."""

import asyncio
from typing import Any

import httpx

from nexus_middleware import ManualClock
from recipes.flaky_dependency import create_app
from tests.support.servers import serve


class QuoteService:
    """The dependency: answers quotes, or fails with `status`, or hangs for `delay` seconds."""

    def __init__(self) -> None:
        self.status = 200
        self.delay = 0.0
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.calls += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        body = b'{"symbol":"ACME","price":42.5}' if self.status == 200 else b"{}"
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


async def test_the_route_degrades_to_the_fallback_and_recovers(manual_clock: ManualClock) -> None:
    service = QuoteService()
    async with serve(service) as service_url:
        app = create_app(service_url, clock=manual_clock)
        async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
            healthy = await client.get("/quotes/ACME")
            assert (healthy.status_code, healthy.json()["price"]) == (200, 42.5)

            service.status = 503
            for _ in range(3):
                failed = await client.get("/quotes/ACME")
                assert failed.status_code == 502
                assert failed.headers["content-type"] == "application/problem+json"
            calls = service.calls
            fallback = await client.get("/quotes/ACME")
            assert fallback.status_code == 200
            assert fallback.json() == {"price": None, "stale": True}
            assert fallback.headers["x-fallback"] == "quote-service-breaker-open"
            assert service.calls == calls  # the dependency is spared while the breaker is open

            service.status = 200
            manual_clock.advance(10)
            trials = [await client.get("/quotes/ACME") for _ in range(2)]
            assert [r.json().get("price") for r in trials] == [42.5, 42.5]
            assert (await client.get("/quotes/ACME")).json()["price"] == 42.5
            assert service.calls == calls + 3


async def test_the_dependency_call_gets_only_what_is_left_of_the_deadline() -> None:
    service = QuoteService()
    service.delay = 1.0
    async with serve(service) as service_url:
        app = create_app(service_url, deadline=0.3)
        async with serve(app) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
            loop = asyncio.get_running_loop()
            started = loop.time()
            response = await client.get("/quotes/SLOW")
            elapsed = loop.time() - started
    # The route's own call times out as the deadline comes: 502 from the route or 504 from the middleware.
    assert response.status_code in (502, 504)
    assert response.headers["content-type"] == "application/problem+json"
    assert elapsed < 0.9
