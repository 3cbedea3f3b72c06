from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nexus_middleware import BodySizeLimitMiddleware, ConfigurationError
from nexus_middleware.context import get_context
from nexus_middleware.errors import RequestBodyTooLargeError
from nexus_middleware.types import Message, Receive, Scope, Send
from tests.support.asgi import Recorded, make_scope, ok_app, run_asgi, streaming_app


class EchoApp:
    """Reads the whole body, then answers with its length; records what it saw."""

    def __init__(self) -> None:
        self.calls = 0
        self.chunks: list[bytes] = []
        self.completed = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        self.chunks = []
        more = True
        while more:
            message = await receive()
            self.chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        self.completed = True
        body = str(len(b"".join(self.chunks))).encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})


def _reason(scope: Scope) -> str | None:
    decision = get_context(scope).decision("body_limit")
    assert decision is None or decision.outcome == "deny"
    return None if decision is None else decision.reason


@pytest.mark.parametrize(
    ("options", "headers", "body", "status", "reason"),
    [
        ({"max_body_size": 10}, [("content-length", "10")], [b"x" * 10], 200, None),
        ({"max_body_size": 10}, [("content-length", "11")], [b"x" * 11], 413, "body_too_large"),
        ({"max_body_size": 10}, [("content-length", "99999999999999999999")], [b""], 413, "body_too_large"),
        ({"max_body_size": 0}, [("content-length", "0")], [b""], 200, None),
        ({"max_body_size": 0}, [("content-length", "1")], [b"x"], 413, "body_too_large"),
        ({"max_body_size": 10}, [("content-length", "abc")], [b""], 400, "invalid_request"),
        ({"max_body_size": 10}, [("content-length", "-1")], [b""], 400, "invalid_request"),
        ({"max_body_size": 10}, [("content-length", "+5")], [b""], 400, "invalid_request"),
        ({"max_body_size": 10}, [("content-length", "1, 2")], [b""], 400, "invalid_request"),
        ({"max_body_size": 10}, [("content-length", "\xb3")], [b""], 400, "invalid_request"),
        (
            {"max_body_size": 10},
            [("content-length", "3"), ("content-length", "4")],
            [b""],
            400,
            "invalid_request",
        ),
        ({"max_body_size": 10}, [("content-length", "3"), ("content-length", "3")], [b"abc"], 200, None),
        ({"max_body_size": None}, [("content-length", "999999")], [b"x"], 200, None),
    ],
)
async def test_declared_content_length(
    options: dict[str, Any],
    headers: list[tuple[str, str]],
    body: list[bytes],
    status: int,
    reason: str | None,
) -> None:
    app = EchoApp()
    scope = make_scope("/upload", method="POST", headers=headers)
    recorded = await run_asgi(BodySizeLimitMiddleware(app, **options), scope, body=body)
    assert recorded.status == status
    assert _reason(scope) == reason
    if status != 200:
        assert recorded.received == 0  # refused before a byte of the body was read
        assert app.calls == 0
        assert recorded.header("content-type") == "application/problem+json"
        assert recorded.json()["status"] == status
        assert get_context(scope).local_response == "body_limit"


@pytest.mark.parametrize(
    ("chunks", "status", "delivered"),
    [
        ([b"aaaa", b"bbbb", b"cc"], 200, [b"aaaa", b"bbbb", b"cc"]),
        ([b"aaaa", b"bbbb", b"ccc"], 413, [b"aaaa", b"bbbb"]),
        ([b"x" * 11], 413, []),
        ([b"", b"x" * 10, b""], 200, [b"", b"x" * 10, b""]),
    ],
)
async def test_streamed_body_is_counted_and_cut(
    chunks: list[bytes], status: int, delivered: list[bytes]
) -> None:
    app = EchoApp()
    scope = make_scope("/upload", method="POST", headers=[("transfer-encoding", "chunked")])
    recorded = await run_asgi(BodySizeLimitMiddleware(app, max_body_size=10), scope, body=chunks)
    assert recorded.status == status
    assert app.chunks == delivered
    assert app.completed is (status == 200)  # never an over-limit body seen as complete
    assert recorded.complete
    if status == 413:
        assert recorded.json()["detail"] == "The request body is larger than 10 bytes."
        decision = get_context(scope).decision("body_limit")
        assert decision is not None
        assert decision.details["limit"] == 10


@pytest.mark.parametrize(
    ("method", "headers", "http_version"),
    [
        ("GET", [("transfer-encoding", "chunked")], "1.1"),  # framed by chunks: counted
        ("GET", [], "2"),  # HTTP/2 needs no framing header for a body
        ("POST", [], "1.1"),  # only GET and HEAD are trusted to be bodiless without framing
    ],
)
async def test_bodies_that_may_exist_are_still_counted(
    method: str, headers: list[tuple[str, str]], http_version: str
) -> None:
    app = EchoApp()
    scope = make_scope("/upload", method=method, headers=headers)
    scope["http_version"] = http_version
    recorded = await run_asgi(BodySizeLimitMiddleware(app, max_body_size=4), scope, body=[b"abc", b"de"])
    assert recorded.status == 413
    assert app.chunks == [b"abc"]


@pytest.mark.parametrize(("method", "http_version"), [("GET", "1.1"), ("HEAD", "1.1"), ("GET", "1.0")])
async def test_an_unframed_http1_get_keeps_the_server_callables(method: str, http_version: str) -> None:
    seen: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append((receive, send))
        await ok_app(scope, receive, send)

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    scope = make_scope(method=method)
    scope["http_version"] = http_version
    await BodySizeLimitMiddleware(app, max_body_size=4)(scope, receive, send)
    assert seen == [(receive, send)]  # no body can arrive (RFC 9112 §6.3): nothing to wrap
    assert sent[0]["status"] == 200


async def test_app_that_catches_the_cut_cannot_send_its_own_response() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        try:
            while (await receive()).get("more_body"):
                pass
        except RequestBodyTooLargeError:
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"oops"})
            with pytest.raises(RequestBodyTooLargeError):
                await receive()  # the body stays cut
            return
        raise AssertionError("the over-limit body was delivered")

    scope = make_scope(method="POST")
    recorded = await run_asgi(BodySizeLimitMiddleware(app, max_body_size=4), scope, body=[b"abc", b"de"])
    assert recorded.status == 413  # exactly one start: the app's 500 was dropped
    assert recorded.complete
    assert b"oops" not in recorded.body


async def test_cut_after_the_response_started_aborts_instead_of_truncating() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.body", "body": b"end"})

    recorded = Recorded()
    with pytest.raises(RequestBodyTooLargeError):
        recorded = await run_asgi(
            BodySizeLimitMiddleware(app, max_body_size=4), make_scope(method="POST"), body=[b"abc", b"de"]
        )
    assert not recorded.complete


async def test_app_swallowing_the_cut_after_start_still_aborts() -> None:
    sent: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        try:
            await receive()
        except RequestBodyTooLargeError:
            await send({"type": "http.response.body", "body": b"done"})  # dropped

    async def receive() -> Message:
        return {"type": "http.request", "body": b"x" * 10}

    async def send(message: Message) -> None:
        sent.append(message)

    with pytest.raises(RequestBodyTooLargeError):
        await BodySizeLimitMiddleware(app, max_body_size=4)(make_scope(method="POST"), receive, send)
    assert [m["type"] for m in sent] == ["http.response.start"]


async def test_a_body_error_the_middleware_did_not_raise_propagates() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise RequestBodyTooLargeError("from an inner layer")

    with pytest.raises(RequestBodyTooLargeError, match="inner layer"):
        await run_asgi(BodySizeLimitMiddleware(app), make_scope(method="POST"), body=[b"x"])


async def test_nested_limits_the_inner_smaller_one_answers() -> None:
    app = EchoApp()
    middleware = BodySizeLimitMiddleware(BodySizeLimitMiddleware(app, max_body_size=4), max_body_size=100)
    recorded = await run_asgi(middleware, make_scope(method="POST"), body=[b"abc", b"de"])
    assert recorded.status == 413
    assert recorded.json()["detail"] == "The request body is larger than 4 bytes."
    assert app.chunks == [b"abc"]


async def test_other_receive_messages_pass_through() -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        message = await receive()
        assert message == {"type": "http.disconnect"}
        await ok_app(scope, receive, send)

    recorded = await run_asgi(
        BodySizeLimitMiddleware(app, max_body_size=4), make_scope(), incoming=[{"type": "http.disconnect"}]
    )
    assert recorded.status == 200


@pytest.mark.parametrize(
    ("routes", "path", "method", "size", "status"),
    [
        ({"/upload": 100}, "/upload", "POST", 100, 200),
        ({"/upload": 100}, "/upload", "POST", 101, 413),
        ({"/upload": 100}, "/other", "POST", 11, 413),
        ({"/upload": None}, "/upload", "POST", 10_000, 200),
        ({"/files/{name}": None}, "/files/a.bin", "PUT", 10_000, 200),
        ({"/files/*": 50}, "/files/a/b", "PUT", 50, 200),
        ({"/files/*": 50}, "/files/%2E%2E/other", "PUT", 50, 413),  # normalized: /other
        ({"/admin/*": 0}, "/x/../admin/y", "POST", 1, 413),
        ([("/upload", ["PUT"], None)], "/upload", "PUT", 10_000, 200),
        ([("/upload", ["PUT"], None)], "/upload", "POST", 11, 413),
        ([("/upload", None, 20), ("*", None, 5)], "/anything", "POST", 6, 413),
        ([("/upload", None, 20), ("*", None, 5)], "/upload", "POST", 20, 200),
    ],
)
async def test_route_limits(routes: Any, path: str, method: str, size: int, status: int) -> None:
    middleware = BodySizeLimitMiddleware(EchoApp(), max_body_size=10, routes=routes)
    scope = make_scope(path, method=method, headers=[("content-length", str(size))])
    recorded = await run_asgi(middleware, scope, body=[b"x" * size])
    assert recorded.status == status


HOST_LIMITS = [
    ("/upload", None, 100, "uploads.example.com"),
    ("/upload", ["PUT"], None, "internal.example.com"),
    ("/upload", None, 20),
]


@pytest.mark.parametrize(
    ("host", "method", "size", "status"),
    [
        ("uploads.example.com", "POST", 100, 200),
        ("Uploads.Example.com:8080", "POST", 101, 413),
        ("internal.example.com", "PUT", 10_000, 200),
        ("internal.example.com", "POST", 21, 413),  # the method misses its entry: the host-less one
        ("other.example.com", "POST", 21, 413),
        (None, "POST", 20, 200),
    ],
)
async def test_route_limits_follow_the_host(host: str | None, method: str, size: int, status: int) -> None:
    middleware = BodySizeLimitMiddleware(EchoApp(), max_body_size=10, routes=HOST_LIMITS)
    headers = [("content-length", str(size))] + ([] if host is None else [("host", host)])
    recorded = await run_asgi(
        middleware, make_scope("/upload", method=method, headers=headers), body=[b"x" * size]
    )
    assert recorded.status == status


async def test_route_limits_is_a_deprecated_alias_of_routes() -> None:
    with pytest.warns(DeprecationWarning, match=r"route_limits=.*use routes="):
        middleware = BodySizeLimitMiddleware(EchoApp(), max_body_size=10, route_limits={"/upload": 100})
    for size, status in [(100, 200), (101, 413)]:
        scope = make_scope("/upload", method="POST", headers=[("content-length", str(size))])
        assert (await run_asgi(middleware, scope, body=[b"x" * size])).status == status
    other = make_scope("/other", method="POST", headers=[("content-length", "11")])
    assert (await run_asgi(middleware, other, body=[b"x" * 11])).status == 413


def test_routes_alone_does_not_warn() -> None:
    # filterwarnings=error turns any warning into a failure here
    BodySizeLimitMiddleware(ok_app, routes={"/upload": 100})


@pytest.mark.parametrize("route_limits", [{"/upload": 100}, {}])
def test_routes_and_route_limits_together_raise(route_limits: dict[str, int]) -> None:
    with pytest.raises(ConfigurationError, match="routes= only"):
        BodySizeLimitMiddleware(ok_app, routes={"/upload": 100}, route_limits=route_limits)


async def test_unlimited_route_streams_any_size() -> None:
    app = EchoApp()
    middleware = BodySizeLimitMiddleware(app, max_body_size=1, routes={"/upload": None})
    recorded = await run_asgi(middleware, make_scope("/upload", method="POST"), body=[b"x" * 1000] * 5)
    assert recorded.body == b"5000"


async def test_path_that_fails_normalization_is_400_when_routes_are_matched() -> None:
    app = EchoApp()
    middleware = BodySizeLimitMiddleware(app, routes={"/upload": None})
    scope = make_scope("/up", method="POST", raw_path=b"/up%00load")
    recorded = await run_asgi(middleware, scope)
    assert recorded.status == 400
    assert _reason(scope) == "invalid_request"
    assert app.calls == 0


@pytest.mark.parametrize(
    ("options", "path", "query", "headers", "status", "reason"),
    [
        ({"max_url_length": 10}, "/123456789", b"", [], 200, None),
        ({"max_url_length": 10}, "/1234567890", b"", [], 414, "url_too_long"),
        ({"max_url_length": 10}, "/12345", b"a=123", [], 414, "url_too_long"),
        ({"max_url_length": 10}, "/123", b"a=123", [], 200, None),
        ({"max_url_length": None}, "/" + "x" * 100_000, b"", [], 200, None),
        ({"max_header_count": 2}, "/", b"", [("a", "1"), ("b", "2")], 200, None),
        ({"max_header_count": 2}, "/", b"", [("a", "1"), ("b", "2"), ("c", "3")], 431, "too_many_headers"),
        ({"max_header_bytes": 10}, "/", b"", [("abcd", "123456")], 200, None),
        ({"max_header_bytes": 10}, "/", b"", [("abcd", "1234567")], 431, "headers_too_large"),
        (
            {"max_header_bytes": 10},
            "/",
            b"",
            [("ab", "12"), ("cd", "34"), ("e", "56")],
            431,
            "headers_too_large",
        ),
        (
            {"max_header_bytes": None, "max_header_count": None},
            "/",
            b"",
            [("a", "x" * 99_999)] * 300,
            200,
            None,
        ),
    ],
)
async def test_head_limits(
    options: dict[str, Any],
    path: str,
    query: bytes,
    headers: list[tuple[str, str]],
    status: int,
    reason: str | None,
) -> None:
    app = EchoApp()
    scope = make_scope(path, headers=headers, query_string=query)
    recorded = await run_asgi(BodySizeLimitMiddleware(app, **options), scope)
    assert recorded.status == status
    assert _reason(scope) == reason
    assert app.calls == (1 if status == 200 else 0)
    if status != 200:
        assert recorded.received == 0


async def test_url_length_falls_back_to_path_without_raw_path() -> None:
    scope = make_scope("/" + "é" * 10)
    del scope["raw_path"]
    recorded = await run_asgi(BodySizeLimitMiddleware(ok_app, max_url_length=15), scope)
    assert recorded.status == 414  # 21 bytes once UTF-8 encoded


async def test_streaming_response_passes_chunk_by_chunk() -> None:
    chunks = [b"1", b"22", b"333"]
    middleware = BodySizeLimitMiddleware(streaming_app(chunks), max_body_size=10)
    recorded = await run_asgi(middleware, make_scope())
    assert [(m["body"], m["more_body"]) for m in recorded.body_messages] == [
        (b"1", True),
        (b"22", True),
        (b"333", False),
    ]


@pytest.mark.parametrize(
    ("extensions", "first"),
    [
        ({}, {"type": "websocket.close", "code": 1009}),
        ({"websocket.http.response": {}}, {"type": "websocket.http.response.start", "status": 431}),
    ],
)
async def test_websocket_handshake_over_header_limits_is_refused(
    extensions: dict[str, Any], first: dict[str, Any]
) -> None:
    scope = make_scope(scope_type="websocket", headers=[("a", "1")] * 5, extensions=extensions)
    recorded = await run_asgi(BodySizeLimitMiddleware(ok_app, max_header_count=4), scope)
    assert first.items() <= recorded.messages[0].items()
    assert all(m["type"] != "websocket.accept" for m in recorded.messages)
    assert _reason(scope) == "too_many_headers"


async def test_websocket_handshake_with_long_url_is_refused() -> None:
    scope = make_scope("/" + "x" * 20, scope_type="websocket")
    recorded = await run_asgi(BodySizeLimitMiddleware(ok_app, max_url_length=10), scope)
    assert recorded.messages[0]["type"] == "websocket.close"
    assert _reason(scope) == "url_too_long"


async def test_websocket_within_limits_and_lifespan_pass_through() -> None:
    middleware = BodySizeLimitMiddleware(ok_app, max_body_size=0)
    websocket = await run_asgi(middleware, make_scope(scope_type="websocket"))
    assert [m["type"] for m in websocket.messages] == ["websocket.accept", "websocket.close"]
    lifespan: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}
    recorded = await run_asgi(middleware, lifespan)
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize(
    "options",
    [
        {"max_body_size": -1},
        {"max_body_size": 1.5},
        {"max_body_size": True},
        {"max_header_count": -5},
        {"max_header_bytes": "1k"},
        {"max_url_length": -1},
        {"routes": {"upload": 10}},
        {"routes": {"/upload": -1}},
        {"routes": [("/upload", 10)]},
        {"routes": [("/upload", "POST", 10)]},
        {"routes": ["/upload"]},
    ],
)
def test_invalid_options_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        BodySizeLimitMiddleware(ok_app, **options)


async def test_over_httpx_transport() -> None:
    app = EchoApp()
    transport = httpx.ASGITransport(app=BodySizeLimitMiddleware(app, max_body_size=8))

    async def chunked(parts: list[bytes]) -> AsyncIterator[bytes]:
        for part in parts:
            yield part

    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        small = await client.post("/", content=b"12345678")
        declared = await client.post("/", content=b"123456789")
        streamed_ok = await client.post("/", content=chunked([b"1234", b"5678"]))
        streamed_big = await client.post("/", content=chunked([b"1234", b"5678", b"9"]))
    assert (small.status_code, small.text) == (200, "8")
    assert declared.status_code == 413
    assert declared.headers["content-type"] == "application/problem+json"
    assert (streamed_ok.status_code, streamed_ok.text) == (200, "8")
    assert streamed_big.status_code == 413
    assert streamed_big.json()["status"] == 413
