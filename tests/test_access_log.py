"""AccessLogMiddleware: one JSON line per request through stdlib logging, redacted."""

import json
import logging
import math
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from nexus_middleware import (
    AccessLogMiddleware,
    ClientAddressResolver,
    ConfigurationError,
    ManualClock,
    Principal,
    Redactor,
)
from nexus_middleware.access_log import _UtcMillis, build_access_record
from nexus_middleware.context import get_context
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi
from tests.support.layers import FakeLayer

LOGGER = "nexus_middleware.access_log"
SECRETS = ("s3cr3t-bearer-token", "key_live_abcdef", "qk_123456", "4111111111111111", "4111 1111 1111 1111")


def lines(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    records = [r for r in caplog.records if r.name == LOGGER]
    parsed = [json.loads(r.getMessage()) for r in records]
    assert [getattr(r, "nexus_access", None) for r in records] == parsed
    return parsed


async def test_one_json_line_with_every_field(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(wall=1_700_000_000.25)

    async def echo(request: Request) -> Response:
        body = await request.body()
        clock.advance(0.125)
        get_context(request.scope).record(
            "proxy", "forwarded", service="users", target="10.0.0.9:80", retries=0
        )
        return PlainTextResponse(body.upper())

    app = Starlette(routes=[Route("/users/{user_id}", echo, methods=["POST"])])
    app.add_middleware(
        FakeLayer, layer="auth", outcome="allow", principal=Principal(subject="svc-7", method="jwt")
    )
    app.add_middleware(
        AccessLogMiddleware,
        clock=clock,
        client_resolver=ClientAddressResolver(trusted_proxies=["127.0.0.0/8"]),
    )

    async def with_ids(scope: Scope, receive: Receive, send: Send) -> None:
        context = get_context(scope)
        context.request_id, context.trace_id = "req-9", "ab" * 16
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=with_ids)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.post(
                "/users/5?page=2", content=b"hello", headers={"x-forwarded-for": "198.51.100.4"}
            )
    assert response.text == "HELLO"
    [line] = lines(caplog)
    assert line == {
        "time": "2023-11-14T22:13:20.250Z",
        "request_id": "req-9",
        "trace_id": "ab" * 16,
        "client": "198.51.100.4",
        "method": "POST",
        "route": "/users/{user_id}",
        "path": "/users/5",
        "query": "page=2",
        "status": 200,
        "duration_ms": 125.0,
        "bytes_in": 5,
        "bytes_out": 5,
        "principal": "svc-7",
        "local_response": None,
        "upstream": "10.0.0.9:80",
    }


async def test_no_secret_from_headers_query_or_body_reaches_the_log(caplog: pytest.LogCaptureFixture) -> None:
    principal = Principal(subject="alice@example.com", method="jwt")
    app = AccessLogMiddleware(
        FakeLayer(ok_app, layer="ratelimit", outcome="shadow_deny", rule="ip", principal=principal)
    )
    scope = make_scope(
        "/pay",
        method="POST",
        headers=[("authorization", "Bearer s3cr3t-bearer-token"), ("x-api-key", "key_live_abcdef")],
        query_string=b"api_key=qk_123456&card=4111111111111111&email=alice@example.com",
    )
    with caplog.at_level(logging.INFO, logger=LOGGER):
        recorded = await run_asgi(app, scope, body=[b'{"card": "4111 1111 1111 1111"}'])
    assert recorded.status == 200
    [line] = lines(caplog)
    text = caplog.text
    for secret in (*SECRETS, "alice@example.com"):
        assert secret not in text
    assert line["query"] == "api_key=[REDACTED]&card=[REDACTED]&email=[REDACTED]"
    assert line["principal"] == "[REDACTED]"
    assert line["status"] == 200
    assert line["bytes_in"] == len(b'{"card": "4111 1111 1111 1111"}')


async def test_exceptions_are_logged_as_500_and_propagate(caplog: pytest.LogCaptureFixture) -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("kaput")

    with caplog.at_level(logging.INFO, logger=LOGGER), pytest.raises(RuntimeError, match="kaput"):
        await run_asgi(AccessLogMiddleware(failing), make_scope("/"))
    assert lines(caplog)[0]["status"] == 500


@pytest.mark.parametrize(
    ("extensions", "inner", "status"),
    [
        ({}, ok_app, 101),
        ({}, FakeLayer(ok_app, layer="auth", outcome="deny", status=401), 403),
        ({"websocket.http.response": {}}, FakeLayer(ok_app, layer="auth", outcome="deny", status=401), 401),
    ],
)
async def test_websocket_sessions_are_logged(
    caplog: pytest.LogCaptureFixture, extensions: dict[str, Any], inner: Any, status: int
) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        await run_asgi(
            AccessLogMiddleware(inner), make_scope("/ws", scope_type="websocket", extensions=extensions)
        )
    [line] = lines(caplog)
    assert line["method"] == "WEBSOCKET"
    assert line["status"] == status


async def test_disabled_logger_skip_and_lifespan(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.access.quiet")
    with caplog.at_level(logging.WARNING, logger="tests.access.quiet"):
        assert (await run_asgi(AccessLogMiddleware(ok_app, logger=logger), make_scope("/"))).status == 200
    with caplog.at_level(logging.INFO, logger=LOGGER):
        skipping = AccessLogMiddleware(ok_app, skip=lambda scope: scope["path"] == "/healthz")
        await run_asgi(skipping, make_scope("/healthz"))
        lifespan = await run_asgi(skipping, make_scope(scope_type="lifespan"))
        await run_asgi(skipping, make_scope("/logged"))
    assert [line["path"] for line in lines(caplog)] == ["/logged"]
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert not [r for r in caplog.records if r.name == "tests.access.quiet"]


def test_level_is_validated() -> None:
    with pytest.raises(ConfigurationError, match="level"):
        AccessLogMiddleware(ok_app, level=0)


def _reference_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@given(st.floats(min_value=-1e10, max_value=4e10, allow_nan=False))
def test_cached_timestamps_match_datetime(epoch: float) -> None:
    stamp = _UtcMillis()
    assert stamp(epoch) == _reference_time(epoch)
    # Rounding edges: half a microsecond either side of a millisecond and of a second.
    for nearby in (epoch + 0.0009995, epoch + 0.0000005, math.floor(epoch) + 0.9999995, math.floor(epoch)):
        assert stamp(nearby) == _reference_time(nearby)


async def test_timestamps_across_seconds_and_the_record_origin(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(wall=1_700_000_000.998)
    app = AccessLogMiddleware(ok_app, clock=clock)
    with caplog.at_level(logging.INFO, logger=LOGGER):
        for step in (0.0, 0.001, 0.0015, 0.5, 86_400.0):
            clock.advance(step)
            await run_asgi(app, make_scope("/"))
    assert [line["time"] for line in lines(caplog)] == [
        "2023-11-14T22:13:20.998Z",
        "2023-11-14T22:13:20.999Z",
        "2023-11-14T22:13:21.000Z",
        "2023-11-14T22:13:21.500Z",
        "2023-11-15T22:13:21.500Z",
    ]
    # The record points at the middleware, as `logger.log` would have made it.
    origins = {(r.module, r.funcName) for r in caplog.records if r.name == LOGGER}
    assert origins == {("access_log", "_log")}


async def test_a_logger_silenced_during_the_request_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.access.silenced")

    async def silencing(scope: Scope, receive: Receive, send: Send) -> None:
        logger.setLevel(logging.WARNING)
        await ok_app(scope, receive, send)

    with caplog.at_level(logging.INFO, logger="tests.access.silenced"):
        recorded = await run_asgi(AccessLogMiddleware(silencing, logger=logger), make_scope("/"))
        logged = [r for r in caplog.records if r.name == "tests.access.silenced"]
    logger.setLevel(logging.NOTSET)
    assert recorded.status == 200
    assert logged == []


async def test_build_access_record_is_what_the_middleware_logs(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock(wall=1_700_000_000.0005)
    app = AccessLogMiddleware(
        FakeLayer(ok_app, layer="auth", outcome="allow", principal=Principal(subject="bob@example.com")),
        clock=clock,
    )
    scope = make_scope("/a", query_string=b"token=abc&x=1")
    with caplog.at_level(logging.INFO, logger=LOGGER):
        recorded = await run_asgi(app, scope)
    [line] = lines(caplog)
    rebuilt = build_access_record(
        scope,
        status=recorded.status,
        duration=0.0,
        bytes_in=line["bytes_in"],
        bytes_out=line["bytes_out"],
        wall_time=1_700_000_000.0005,
        client=line["client"],
        redactor=Redactor(),
    )
    assert rebuilt == line
    assert line["time"] == "2023-11-14T22:13:20.000Z"  # 500 µs: half to even at the microsecond, then cut
    assert line["query"] == "token=[REDACTED]&x=1"
    assert line["principal"] == "[REDACTED]"
