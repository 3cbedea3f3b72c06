"""TimeoutMiddleware: 504 before the response starts, an aborted response after, the published deadline."""

import asyncio
from typing import Any

import httpx
import pytest

from nexus_middleware import (
    ConfigurationError,
    DeadlineExceededError,
    ManualClock,
    TimeoutMiddleware,
    get_context,
)
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi

TICK = 0.02  # real seconds: deadlines in these tests are milliseconds


class Stalls:
    """Sends `chunks_before` body chunks (0: nothing at all), then hangs; notes its cancellation."""

    def __init__(self, *, start: bool = False, chunks_before: int = 0) -> None:
        self.start = start
        self.chunks_before = chunks_before
        self.cancelled = False
        self.deadline: float | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.deadline = get_context(scope).deadline
        try:
            if self.start:
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for _ in range(self.chunks_before):
                    await send({"type": "http.response.body", "body": b"chunk", "more_body": True})
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise


async def test_expiry_before_the_response_starts_is_a_504_problem() -> None:
    inner = Stalls()
    app = TimeoutMiddleware(inner, timeout=TICK)
    scope = make_scope("/slow")
    recorded = await run_asgi(app, scope)
    assert recorded.status == 504
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.json()["detail"] == "The request did not complete within its deadline."
    assert inner.cancelled
    context = get_context(scope)
    decision = context.decision("timeout")
    assert decision is not None
    assert (decision.outcome, decision.details["after_start"]) == ("expired", False)
    assert context.local_response is None  # an outer breaker counts a deadline as a failure
    assert context.deadline is None  # restored after the request


@pytest.mark.parametrize("chunks_before", [0, 2])
async def test_expiry_after_the_response_started_aborts_it(chunks_before: int) -> None:
    inner = Stalls(start=True, chunks_before=chunks_before)
    app = TimeoutMiddleware(inner, timeout=TICK)
    scope = make_scope("/stream")
    messages: list[Any] = []

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    async def send(message: Any) -> None:
        messages.append(message)

    with pytest.raises(DeadlineExceededError):
        await app(scope, receive, send)
    assert [m["type"] for m in messages] == ["http.response.start"] + ["http.response.body"] * chunks_before
    assert all(m.get("more_body") for m in messages[1:])  # never a clean end of a truncated body
    assert get_context(scope).decision("timeout").details["after_start"] is True  # type: ignore[union-attr]


async def test_the_deadline_is_published_and_restored(manual_clock: ManualClock) -> None:
    seen: list[float | None] = []

    async def reads_deadline(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context(scope).deadline)
        await ok_app(scope, receive, send)

    app = TimeoutMiddleware(reads_deadline, timeout=2.5, clock=manual_clock)
    scope = make_scope("/")
    assert (await run_asgi(app, scope)).status == 200
    assert seen == [manual_clock.monotonic() + 2.5]
    assert get_context(scope).deadline is None


@pytest.mark.parametrize(("outer", "inner", "expected"), [(1.0, 5.0, 1.0), (5.0, 1.0, 1.0), (3.0, None, 3.0)])
async def test_nested_deadlines_keep_the_earliest(
    manual_clock: ManualClock, outer: float, inner: float | None, expected: float
) -> None:
    seen: list[float | None] = []

    async def reads_deadline(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context(scope).deadline)
        await ok_app(scope, receive, send)

    app = TimeoutMiddleware(
        TimeoutMiddleware(reads_deadline, timeout=inner, clock=manual_clock),
        timeout=outer,
        clock=manual_clock,
    )
    assert (await run_asgi(app, make_scope("/"))).status == 200
    assert seen == [manual_clock.monotonic() + expected]


async def test_an_earlier_deadline_set_by_another_layer_is_enforced() -> None:
    inner = Stalls()
    timed = TimeoutMiddleware(inner, timeout=60)

    async def sets_deadline(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).deadline = asyncio.get_running_loop().time() + TICK  # same scale as SYSTEM_CLOCK
        await timed(scope, receive, send)

    recorded = await run_asgi(sets_deadline, make_scope("/"))
    assert recorded.status == 504


async def test_an_inner_middleware_leaves_an_earlier_outer_deadline_to_the_outer_one() -> None:
    inner = Stalls()
    app = TimeoutMiddleware(TimeoutMiddleware(inner, timeout=60), timeout=TICK)
    scope = make_scope("/")
    recorded = await run_asgi(app, scope)
    assert recorded.status == 504
    assert [d.outcome for d in get_context(scope).decisions] == ["expired"]  # answered once, by the outer


async def test_per_route_deadlines() -> None:
    app = TimeoutMiddleware(
        Stalls(), timeout=None, routes=[("/fast/*", None, TICK), ("/reports", ["POST"], TICK)]
    )
    assert (await run_asgi(app, make_scope("/fast/x"))).status == 504
    assert (await run_asgi(app, make_scope("/reports", method="POST"))).status == 504
    unbounded = asyncio.create_task(run_asgi(app, make_scope("/reports")))  # GET: no deadline
    await asyncio.sleep(TICK * 2)
    assert not unbounded.done()
    unbounded.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unbounded


async def test_per_route_deadlines_follow_the_host() -> None:
    app = TimeoutMiddleware(Stalls(), timeout=None, routes=[("/reports", None, TICK, "internal.example.com")])
    internal = make_scope("/reports", headers=[("host", "internal.example.com:8443")])
    assert (await run_asgi(app, internal)).status == 504
    unbounded = asyncio.create_task(run_asgi(app, make_scope("/reports", headers=[("host", "example.com")])))
    await asyncio.sleep(TICK * 2)
    assert not unbounded.done()
    unbounded.cancel()
    with pytest.raises(asyncio.CancelledError):
        await unbounded


async def test_the_apps_own_timeout_error_is_not_a_deadline() -> None:
    async def raises_timeout(scope: Scope, receive: Receive, send: Send) -> None:
        raise TimeoutError("database timeout")

    app = TimeoutMiddleware(raises_timeout, timeout=60)
    with pytest.raises(TimeoutError, match="database timeout"):
        await run_asgi(app, make_scope("/"))


async def test_no_deadline_at_all_passes_through() -> None:
    seen: list[float | None] = []

    async def reads_deadline(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(get_context(scope).deadline)
        await ok_app(scope, receive, send)

    assert (await run_asgi(TimeoutMiddleware(reads_deadline, timeout=None), make_scope("/"))).status == 200
    assert seen == [None]


async def test_a_completed_response_is_untouched() -> None:
    app = TimeoutMiddleware(ok_app, timeout=60)
    recorded = await run_asgi(app, make_scope("/"))
    assert (recorded.status, recorded.body, recorded.complete) == (200, b"ok", True)


async def test_websocket_deadline_bounds_the_handshake_only() -> None:
    async def slow_handshake(scope: Scope, receive: Receive, send: Send) -> None:
        await asyncio.Event().wait()

    refused = await run_asgi(
        TimeoutMiddleware(slow_handshake, timeout=TICK), make_scope("/ws", scope_type="websocket")
    )
    assert refused.messages[0]["type"] == "websocket.close"
    assert refused.messages[0]["code"] == 1011

    async def long_session(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        await asyncio.sleep(TICK * 3)
        await send({"type": "websocket.close", "code": 1000})

    session = await run_asgi(
        TimeoutMiddleware(long_session, timeout=TICK), make_scope("/ws", scope_type="websocket")
    )
    assert [m["type"] for m in session.messages] == ["websocket.accept", "websocket.close"]


async def test_lifespan_passes_through() -> None:
    recorded = await run_asgi(TimeoutMiddleware(ok_app, timeout=TICK), make_scope(scope_type="lifespan"))
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_an_invalid_path_is_a_400_problem() -> None:
    app = TimeoutMiddleware(ok_app, routes=[("/a", None, 1.0)])
    assert (await run_asgi(app, make_scope("/a", raw_path=b"/a%00"))).status == 400


@pytest.mark.parametrize("options", [{"timeout": 0}, {"timeout": -1}, {"routes": [("/a", None, "5")]}])
def test_validation(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        TimeoutMiddleware(ok_app, **options)


def test_repr() -> None:
    assert (
        repr(TimeoutMiddleware(ok_app, routes=[("/a", None, 1)]))
        == "TimeoutMiddleware(timeout=30.0, routes=1)"
    )


async def test_fastapi_route_exceeding_its_deadline() -> None:
    from fastapi import FastAPI

    api = FastAPI()

    @api.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(1)
        return {"late": "yes"}

    api.add_middleware(TimeoutMiddleware, timeout=TICK)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client:
        response = await client.get("/slow")
    assert response.status_code == 504
    assert response.headers["content-type"] == "application/problem+json"


async def test_end_to_end_a_real_client_sees_the_abort_as_a_broken_response() -> None:
    from starlette.applications import Starlette
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    from tests.support.servers import serve

    async def chunks() -> Any:
        yield b"first chunk\n"
        await asyncio.sleep(1)
        yield b"never sent\n"

    async def stream(request: Any) -> StreamingResponse:
        return StreamingResponse(chunks(), media_type="text/plain")

    async def stall(request: Any) -> StreamingResponse:
        await asyncio.sleep(1)
        return StreamingResponse(chunks())

    app = TimeoutMiddleware(Starlette(routes=[Route("/stream", stream), Route("/stall", stall)]), timeout=0.2)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        gateway_timeout = await client.get("/stall")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get("/stream")
    assert gateway_timeout.status_code == 504
