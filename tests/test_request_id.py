import logging
import os
from typing import Any

import httpx
import pytest

from nexus_middleware import ConfigurationError, RequestIDLogFilter, RequestIDMiddleware
from nexus_middleware.context import current_context, current_request_id, get_context
from nexus_middleware.request_id import _RandomIds, parse_traceparent
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import headers_app, make_scope, ok_app, run_asgi, streaming_app

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


def _counter() -> Any:
    count = 0

    def generate() -> str:
        nonlocal count
        count += 1
        return f"gen-{count}"

    return generate


@pytest.mark.parametrize(
    ("incoming", "options", "expected_id", "outcome"),
    [
        (None, {}, "gen-1", "generated"),
        ("abc-123", {}, "abc-123", "accepted"),
        ("A.b_c:d-1", {}, "A.b_c:d-1", "accepted"),
        ("x" * 128, {}, "x" * 128, "accepted"),
        ("x" * 129, {}, "gen-1", "replaced"),
        ("has space", {}, "gen-1", "replaced"),
        ("semi;colon", {}, "gen-1", "replaced"),
        ("", {}, "gen-1", "replaced"),
        ("caf\xe9", {}, "gen-1", "replaced"),
        ("<script>", {}, "gen-1", "replaced"),
        ("abcdef", {"max_length": 5}, "gen-1", "replaced"),
        ("abcde", {"max_length": 5}, "abcde", "accepted"),
        ("abc/def", {"charset": "abcdef/"}, "abc/def", "accepted"),
        ("abc-def", {"charset": "abcdef/"}, "gen-1", "replaced"),
        ("abc-123", {"trust_incoming": False}, "gen-1", "replaced"),
    ],
)
async def test_incoming_id_policy(
    incoming: str | None, options: dict[str, Any], expected_id: str, outcome: str
) -> None:
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(current_request_id())
        await ok_app(scope, receive, send)

    headers = [] if incoming is None else [("x-request-id", incoming)]
    scope = make_scope(headers=headers)
    recorded = await run_asgi(RequestIDMiddleware(app, generator=_counter(), **options), scope)
    assert recorded.status == 200
    assert recorded.header_values("x-request-id") == [expected_id]
    assert seen == [expected_id]
    context = get_context(scope)
    assert context.request_id == expected_id
    decision = context.decision("request_id")
    assert decision is not None
    assert decision.outcome == outcome
    assert current_request_id() is None  # reset after the request


async def test_default_generator_is_32_random_hex_digits() -> None:
    recorded = await run_asgi(RequestIDMiddleware(ok_app), make_scope())
    generated = recorded.header("x-request-id") or ""
    assert len(generated) == 32
    assert int(generated, 16) >= 0
    assert generated == generated.lower()
    other = await run_asgi(RequestIDMiddleware(ok_app), make_scope())
    assert other.header("x-request-id") != generated


async def test_invalid_id_is_rejected_with_problem_when_asked() -> None:
    calls = 0

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await ok_app(scope, receive, send)

    scope = make_scope(headers=[("x-request-id", "bad id\t")])
    recorded = await run_asgi(RequestIDMiddleware(app, on_invalid="reject", generator=_counter()), scope)
    assert calls == 0
    assert recorded.status == 400
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.header("x-request-id") == "gen-1"
    body = recorded.json()
    assert body["status"] == 400
    assert body["request_id"] == "gen-1"
    assert "x-request-id" in body["detail"]
    decision = get_context(scope).decision("request_id")
    assert decision is not None
    assert (decision.outcome, decision.reason) == ("deny", "invalid_request_id")
    assert get_context(scope).local_response == "request_id"


async def test_custom_header_name_is_read_and_echoed() -> None:
    scope = make_scope(headers=[("x-correlation-id", "corr-1"), ("x-request-id", "other")])
    recorded = await run_asgi(RequestIDMiddleware(ok_app, header_name="X-Correlation-ID"), scope)
    assert recorded.header("x-correlation-id") == "corr-1"
    assert recorded.header("x-request-id") is None


async def test_first_of_repeated_incoming_headers_wins() -> None:
    scope = make_scope(headers=[("x-request-id", "first"), ("x-request-id", "second")])
    recorded = await run_asgi(RequestIDMiddleware(ok_app), scope)
    assert recorded.header_values("x-request-id") == ["first"]


async def test_app_set_header_is_not_duplicated() -> None:
    app = headers_app([(b"X-Request-ID", b"mine")])
    recorded = await run_asgi(RequestIDMiddleware(app), make_scope(headers=[("x-request-id", "theirs")]))
    assert [(k.lower(), v) for k, v in recorded.headers] == [(b"x-request-id", b"mine")]


async def test_echo_can_be_disabled() -> None:
    scope = make_scope(headers=[("x-request-id", "abc")])
    recorded = await run_asgi(RequestIDMiddleware(ok_app, echo=False), scope)
    assert recorded.header("x-request-id") is None
    assert get_context(scope).request_id == "abc"


async def test_response_headers_of_a_shared_list_are_not_mutated() -> None:
    shared = [(b"content-type", b"text/plain")]
    middleware = RequestIDMiddleware(headers_app(shared))
    await run_asgi(middleware, make_scope())
    recorded = await run_asgi(middleware, make_scope())
    assert shared == [(b"content-type", b"text/plain")]
    assert len(recorded.header_values("x-request-id")) == 1


async def test_streaming_response_passes_chunk_by_chunk_with_id_bound() -> None:
    chunks = [b"one", b"two", b"three"]
    inner = streaming_app(chunks)
    ids: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        async def spying_send(message: Any) -> None:
            ids.append(current_request_id())
            await send(message)

        await inner(scope, receive, spying_send)

    scope = make_scope(headers=[("x-request-id", "stream-1")])
    recorded = await run_asgi(RequestIDMiddleware(app), scope)
    assert [m["body"] for m in recorded.body_messages] == chunks
    assert [m["more_body"] for m in recorded.body_messages] == [True, True, False]
    assert ids == ["stream-1"] * 4
    assert recorded.header("x-request-id") == "stream-1"


@pytest.mark.parametrize(
    ("traceparents", "expected"),
    [
        ([TRACEPARENT], TRACE_ID),
        ([f"01-{TRACE_ID}-00f067aa0ba902b7-01-future-field"], TRACE_ID),
        ([f"01-{TRACE_ID}-00f067aa0ba902b7-01"], TRACE_ID),
        ([f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra"], None),
        ([f"ff-{TRACE_ID}-00f067aa0ba902b7-01"], None),
        ([f"00-{'0' * 32}-00f067aa0ba902b7-01"], None),
        ([f"00-{TRACE_ID}-{'0' * 16}-01"], None),
        ([f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01"], None),
        ([f"00-{TRACE_ID[:-1]}-00f067aa0ba902b7-01"], None),
        ([f"00-{TRACE_ID}-00f067aa0ba902b7"], None),
        ([f"00-{TRACE_ID}-00f067aa0ba902b7-1"], None),
        (["garbage"], None),
        ([TRACEPARENT, TRACEPARENT], None),
        ([], None),
    ],
)
async def test_trace_id_from_traceparent(traceparents: list[str], expected: str | None) -> None:
    scope = make_scope(headers=[("traceparent", value) for value in traceparents])
    await run_asgi(RequestIDMiddleware(ok_app), scope)
    assert get_context(scope).trace_id == expected


def test_parse_traceparent_directly() -> None:
    assert parse_traceparent(TRACEPARENT.encode()) == TRACE_ID
    assert parse_traceparent(TRACEPARENT.encode() + b"\n") is None


async def test_websocket_handshake_gets_an_id_and_echoes_it_on_accept() -> None:
    seen: list[str | None] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(current_request_id())
        await ok_app(scope, receive, send)

    scope = make_scope(scope_type="websocket", headers=[("x-request-id", "ws-1")])
    recorded = await run_asgi(RequestIDMiddleware(app), scope)
    accept = recorded.messages[0]
    assert accept["type"] == "websocket.accept"
    assert accept["headers"] == [(b"x-request-id", b"ws-1")]
    assert recorded.messages[1] == {"type": "websocket.close", "code": 1000}
    assert seen == ["ws-1"]


async def test_websocket_invalid_id_rejected_before_accept() -> None:
    scope = make_scope(
        scope_type="websocket",
        headers=[("x-request-id", "bad id")],
        extensions={"websocket.http.response": {}},
    )
    middleware = RequestIDMiddleware(ok_app, on_invalid="reject", generator=_counter())
    recorded = await run_asgi(middleware, scope)
    start = recorded.messages[0]
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 400
    assert (b"x-request-id", b"gen-1") in start["headers"]
    assert all(m["type"] != "websocket.accept" for m in recorded.messages)


async def test_lifespan_passes_through_untouched() -> None:
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    recorded = await run_asgi(RequestIDMiddleware(ok_app), scope)
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert "state" not in scope


async def test_context_var_is_reset_when_the_app_raises() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await run_asgi(RequestIDMiddleware(app), make_scope())
    assert current_context() is None


@pytest.mark.parametrize(
    "options",
    [
        {"header_name": "X Request"},
        {"header_name": ""},
        {"header_name": "x-id\r\n"},
        {"max_length": 0},
        {"max_length": 2000},
        {"max_length": True},
        {"max_length": "10"},
        {"charset": ""},
        {"charset": "abc\n"},
        {"charset": "ab,c"},
        {"charset": "ab c"},
        {"charset": "abcé"},
        {"generator": "uuid"},
        {"on_invalid": "drop"},
    ],
)
def test_invalid_options_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RequestIDMiddleware(ok_app, **options)


def test_log_filter_sets_ids_inside_and_default_outside_a_request() -> None:
    log_filter = RequestIDLogFilter(default="none")
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "msg", None, None)
    assert log_filter.filter(record)
    assert (record.request_id, record.trace_id) == ("none", "none")


async def test_log_filter_reads_the_current_request(caplog: pytest.LogCaptureFixture) -> None:
    logger = logging.getLogger("tests.request_id.filter")
    caplog.handler.addFilter(RequestIDLogFilter())
    caplog.set_level(logging.INFO, logger=logger.name)

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        logger.info("handling")
        await ok_app(scope, receive, send)

    scope = make_scope(headers=[("x-request-id", "log-1"), ("traceparent", TRACEPARENT)])
    await run_asgi(RequestIDMiddleware(app), scope)
    logger.info("after")
    inside, after = caplog.records
    assert (inside.request_id, inside.trace_id) == ("log-1", TRACE_ID)  # type: ignore[attr-defined]
    assert (after.request_id, after.trace_id) == ("-", "-")  # type: ignore[attr-defined]


async def test_over_httpx_transport() -> None:
    transport = httpx.ASGITransport(app=RequestIDMiddleware(ok_app))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        kept = await client.get("/", headers={"X-Request-ID": "client-chosen"})
        fresh = await client.get("/", headers={"X-Request-ID": "no\x7fgood"})
        absent = await client.get("/")
    assert kept.headers["x-request-id"] == "client-chosen"
    assert len(fresh.headers["x-request-id"]) == 32
    assert len(absent.headers["x-request-id"]) == 32
    assert fresh.headers["x-request-id"] != absent.headers["x-request-id"]


def test_random_ids_are_unique_hex_across_refills() -> None:
    ids = _RandomIds()
    drawn = [ids() for _ in range(1000)]  # several draws of the pool
    assert len(set(drawn)) == 1000
    assert all(len(value) == 32 and int(value, 16) >= 0 and value == value.lower() for value in drawn)


def test_random_ids_drawn_before_a_fork_are_not_handed_out_again_in_the_child() -> None:
    ids = _RandomIds()
    ids()  # the pool is filled in the parent
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its next id and leave at once
        os.write(write, ids().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert len(child) == 32
    assert child != ids()  # the parent's next id, from the pool the child must not have reused
