"""Tier 1 of the harness: drive an ASGI app with raw messages and record everything it sends."""

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexus_middleware.types import ASGIApp, Message, Scope


def make_scope(
    path: str = "/",
    *,
    method: str = "GET",
    headers: Iterable[tuple[str, str]] = (),
    query_string: bytes = b"",
    raw_path: bytes | None = None,
    client: tuple[str, int] | None = ("203.0.113.7", 50000),
    scope_type: str = "http",
    extensions: dict[str, Any] | None = None,
) -> Scope:
    scope: Scope = {
        "type": scope_type,
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "scheme": "http" if scope_type == "http" else "ws",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode(),
        "query_string": query_string,
        "root_path": "",
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        "client": client,
        "server": ("testserver", 80),
        "extensions": extensions if extensions is not None else {},
    }
    if scope_type == "http":
        scope["method"] = method
    return scope


@dataclass
class Recorded:
    """What an app sent, with accessors for the usual questions."""

    messages: list[Message] = field(default_factory=list)
    received: int = 0  # how many receive() calls the app made

    @property
    def start(self) -> Message:
        starts = [m for m in self.messages if m["type"] == "http.response.start"]
        assert len(starts) == 1, f"expected exactly one response start, got {self.messages!r}"
        return starts[0]

    @property
    def status(self) -> int:
        return int(self.start["status"])

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return list(self.start.get("headers", []))

    def header(self, name: str) -> str | None:
        values = self.header_values(name)
        return values[0] if values else None

    def header_values(self, name: str) -> list[str]:
        key = name.lower().encode()
        return [v.decode("latin-1") for k, v in self.headers if k == key]

    @property
    def body_messages(self) -> list[Message]:
        return [m for m in self.messages if m["type"] == "http.response.body"]

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.body_messages)

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def complete(self) -> bool:
        bodies = self.body_messages
        return bool(bodies) and not bodies[-1].get("more_body", False)


async def run_asgi(
    app: ASGIApp,
    scope: Scope,
    *,
    body: Sequence[bytes] = (b"",),
    incoming: Sequence[Message] | None = None,
) -> Recorded:
    """Run one request. The request body arrives in `body` chunks; `incoming` overrides the messages."""
    if incoming is None:
        if scope["type"] == "websocket":
            incoming = [{"type": "websocket.connect"}]
        elif scope["type"] == "lifespan":
            incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        else:
            incoming = [
                {"type": "http.request", "body": chunk, "more_body": i < len(body) - 1}
                for i, chunk in enumerate(body)
            ]
    queue = list(incoming)
    recorded = Recorded()

    async def receive() -> Message:
        recorded.received += 1
        if queue:
            return queue.pop(0)
        return {"type": "http.disconnect"} if scope["type"] == "http" else {"type": "websocket.disconnect"}

    async def send(message: Message) -> None:
        recorded.messages.append(message)

    await app(scope, receive, send)
    return recorded


async def ok_app(scope: Scope, receive: Any, send: Any) -> None:
    """A bare app: 200 text/plain 'ok' on http, accept-and-close on websocket, lifespan handled."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


def streaming_app(chunks: Sequence[bytes]) -> ASGIApp:
    """An app that streams `chunks` as separate body messages with `more_body=True` until the last."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]}
        )
        for index, chunk in enumerate(chunks):
            await send({"type": "http.response.body", "body": chunk, "more_body": index < len(chunks) - 1})

    return app


def headers_app(headers: list[tuple[bytes, bytes]]) -> ASGIApp:
    """An app answering 200 with exactly this header list object (not a copy) and an empty body."""

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b""})

    return app
