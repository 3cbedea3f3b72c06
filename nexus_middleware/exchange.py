"""What an observing layer learns by watching one ASGI exchange: the status and the body bytes each way.

Metrics and the access log both need it; it lives here so the two concerns count the same way.
"""

from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ExchangeMeter"]

_BODY = frozenset({"http.response.body", "websocket.http.response.body", "websocket.send"})
_START = frozenset({"http.response.start", "websocket.http.response.start"})


class ExchangeMeter:
    """Wraps `receive` and `send` of one request (`run(app, scope)`, or pass `meter.receive` and `meter.send`
    yourself), counting body bytes and remembering the status.

    `status` is the response status (http, or a websocket denial response), 101 once a websocket is accepted,
    403 when it is closed before accept (what the server answers the handshake), and 0 while nothing was sent.
    Bytes are those of `body` (http) or `bytes`/`text` (websocket frames).
    """

    __slots__ = ("_receive", "_send", "bytes_in", "bytes_out", "status")

    def __init__(self, receive: Receive, send: Send) -> None:
        self._receive = receive
        self._send = send
        self.status = 0
        self.bytes_in = 0
        self.bytes_out = 0

    async def receive(self) -> Message:
        message = await self._receive()
        body = message.get("body") or message.get("bytes") or message.get("text")
        if body:
            self.bytes_in += len(body)
        return message

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind in _BODY:
            body = message.get("body") or message.get("bytes") or message.get("text")
            if body:
                self.bytes_out += len(body)
        elif kind in _START:
            self.status = message["status"]
        elif kind == "websocket.accept":
            self.status = 101
        elif kind == "websocket.close" and self.status == 0:
            self.status = 403
        await self._send(message)

    async def run(self, app: ASGIApp, scope: Scope) -> None:
        """Run `app` through the meter. When it raises before a response started, the server answers 500:
        so does `status`."""
        try:
            await app(scope, self.receive, self.send)
        except BaseException:
            if self.status == 0:
                self.status = 500
            raise
