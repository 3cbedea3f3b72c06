"""ExchangeMeter: the status and body bytes that metrics and the access log report."""

import pytest

from nexus_middleware.exchange import ExchangeMeter
from nexus_middleware.types import Message, Receive, Scope, Send
from tests.support.asgi import make_scope

HTTP_EXCHANGE: list[Message] = [
    {"type": "http.response.start", "status": 201, "headers": []},
    {"type": "http.response.body", "body": b"abc", "more_body": True},
    {"type": "http.response.body", "body": b"de"},
]


@pytest.mark.parametrize(
    ("incoming", "outgoing", "status", "bytes_in", "bytes_out"),
    [
        ([{"type": "http.request", "body": b"12345"}], HTTP_EXCHANGE, 201, 5, 5),
        ([{"type": "http.request", "body": b"", "more_body": False}], HTTP_EXCHANGE[:1], 201, 0, 0),
        (
            [{"type": "websocket.connect"}, {"type": "websocket.receive", "bytes": b"xyz"}],
            [
                {"type": "websocket.accept"},
                {"type": "websocket.send", "text": "hi"},
                {"type": "websocket.close"},
            ],
            101,
            3,
            2,
        ),
        ([{"type": "websocket.connect"}], [{"type": "websocket.close", "code": 1008}], 403, 0, 0),
        (
            [{"type": "websocket.connect"}],
            [
                {"type": "websocket.http.response.start", "status": 401, "headers": []},
                {"type": "websocket.http.response.body", "body": b"nope"},
            ],
            401,
            0,
            4,
        ),
    ],
)
async def test_meter_counts_what_passes_and_forwards_it_untouched(
    incoming: list[Message], outgoing: list[Message], status: int, bytes_in: int, bytes_out: int
) -> None:
    pending = list(incoming)
    sent: list[Message] = []

    async def receive() -> Message:
        return pending.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    meter = ExchangeMeter(receive, send)
    received = [await meter.receive() for _ in incoming]
    for message in outgoing:
        await meter.send(message)
    assert received == incoming
    assert sent == outgoing
    assert (meter.status, meter.bytes_in, meter.bytes_out) == (status, bytes_in, bytes_out)


async def test_an_app_that_raises_before_the_response_counts_as_500_and_after_it_keeps_the_status() -> None:
    async def send(message: Message) -> None:
        return None

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    async def fails_early(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("before")

    async def fails_late(scope: Scope, receive: Receive, send: Send) -> None:
        await send(HTTP_EXCHANGE[0])
        raise RuntimeError("after")

    before = ExchangeMeter(receive, send)
    after = ExchangeMeter(receive, send)
    with pytest.raises(RuntimeError, match="before"):
        await before.run(fails_early, make_scope())
    with pytest.raises(RuntimeError, match="after"):
        await after.run(fails_late, make_scope())
    assert (before.status, after.status) == (500, 201)
