import httpx
import pytest
from fastapi import FastAPI

from nexus_middleware import ProblemDetailsMiddleware
from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi


async def failing_app(scope: Scope, receive: Receive, send: Send) -> None:
    raise RuntimeError("database password is hunter2")


async def fails_mid_body(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"part", "more_body": True})
    raise RuntimeError("broke mid-stream")


async def test_exception_before_start_becomes_500_problem_and_is_reraised() -> None:
    scope = make_scope()
    get_context(scope).request_id = "req-42"
    sent = []

    async def send(message) -> None:
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    with pytest.raises(RuntimeError, match="hunter2"):
        await ProblemDetailsMiddleware(failing_app)(scope, receive, send)
    assert sent[0]["status"] == 500
    assert (b"content-type", b"application/problem+json") in sent[0]["headers"]
    body = sent[1]["body"]
    assert b"hunter2" not in body
    assert b'"request_id":"req-42"' in body
    assert get_context(scope).local_response == "exceptions"


async def test_exception_after_start_propagates_without_second_start() -> None:
    sent = []

    async def send(message) -> None:
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b""}

    with pytest.raises(RuntimeError):
        await ProblemDetailsMiddleware(fails_mid_body)(make_scope(), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]


async def test_passes_success_websocket_and_lifespan_through() -> None:
    app = ProblemDetailsMiddleware(ok_app)
    assert (await run_asgi(app, make_scope())).body == b"ok"
    ws = await run_asgi(app, make_scope(scope_type="websocket"))
    assert ws.messages[0] == {"type": "websocket.accept"}
    lifespan = await run_asgi(app, {"type": "lifespan"})
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_in_fastapi_through_httpx() -> None:
    # add_middleware puts it inside Starlette's own ServerErrorMiddleware, which then sees a started response
    # and only re-raises: the client gets our problem, the server still logs the traceback.
    api = FastAPI()
    api.add_middleware(ProblemDetailsMiddleware)

    @api.get("/boom")
    async def boom() -> None:
        raise ValueError("secret internals")

    transport = httpx.ASGITransport(app=api, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["title"] == "Internal Server Error"
    assert "secret" not in response.text


def test_rejects_empty_detail() -> None:
    with pytest.raises(ConfigurationError):
        ProblemDetailsMiddleware(ok_app, detail="")
