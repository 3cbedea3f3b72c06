"""A real upstream for proxy tests: echo, delay, status, streaming, gzip and reset endpoints.

Served by uvicorn on loopback through the `upstream` fixture. It records every request it received, so tests
can assert, for example, that a POST reached it exactly once.
"""

import asyncio
import gzip
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

from nexus_middleware.types import Receive, Scope, Send


@dataclass
class UpstreamApp:
    name: str = "upstream"
    received: list[tuple[str, str]] = field(default_factory=list)  # (method, raw path) per request
    in_flight: int = 0
    cancelled: int = 0  # requests whose client went away before the handler finished
    handshakes: list[dict[str, Any]] = field(default_factory=list)  # path, query, headers, subprotocols
    websocket_closes: list[int | None] = field(default_factory=list)  # close code of each client-ended socket

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        raw_path = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
        self.received.append((scope["method"], raw_path))
        self.in_flight += 1
        try:
            await self._http(scope, receive, send)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        path = scope["path"]
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if path.startswith("/delay"):
            if not await _sleep_unless_disconnected(receive, float(query.get("seconds", "0.1"))):
                self.cancelled += 1  # uvicorn never cancels the app: the client leaving is seen in receive()
                return
            await _send_json(send, 200, {"delayed": float(query.get("seconds", "0.1")), "name": self.name})
        elif path.startswith("/status/"):
            status = int(path.rsplit("/", 1)[1])
            await _send_json(send, status, {"status": status, "name": self.name})
        elif path.startswith("/stream"):
            chunks, size = int(query.get("chunks", "10")), int(query.get("size", "1024"))
            delay = float(query.get("delay", "0"))
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/octet-stream")],
                }
            )
            for index in range(chunks):
                if delay and not await _sleep_unless_disconnected(receive, delay):
                    self.cancelled += 1
                    return
                await send(
                    {"type": "http.response.body", "body": b"x" * size, "more_body": index < chunks - 1}
                )
        elif path.startswith("/gzip"):
            payload = gzip.compress(b"hello gzip " * 100, mtime=0)
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        (b"content-type", b"text/plain"),
                        (b"content-encoding", b"gzip"),
                        (b"content-length", str(len(payload)).encode()),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload})
        elif path.startswith("/reset"):
            # Promise a body, send part of it, then fail: uvicorn drops the connection mid-response.
            await send(
                {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"1000")]}
            )
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise RuntimeError("upstream reset on purpose")
        else:
            await _send_json(
                send,
                200,
                {
                    "name": self.name,
                    "method": scope["method"],
                    "path": path,
                    "raw_path": scope.get("raw_path", b"").decode("latin-1"),
                    "query_string": scope.get("query_string", b"").decode("latin-1"),
                    "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
                    "body_sha256": hashlib.sha256(body).hexdigest(),
                    "body_length": len(body),
                    "client": list(scope["client"]) if scope.get("client") else None,
                },
            )

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Echoes messages; accepts the LAST subprotocol offered (a choice the client did not make first);
        `/close/{code}` accepts, says `bye` and closes with that code."""
        path = scope["path"]
        offered = list(scope.get("subprotocols") or ())
        self.handshakes.append(
            {
                "path": path,
                "query_string": scope.get("query_string", b"").decode("latin-1"),
                "headers": [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
                "subprotocols": offered,
            }
        )
        await receive()
        await send({"type": "websocket.accept", "subprotocol": offered[-1] if offered else None})
        if path.startswith("/close/"):
            await send({"type": "websocket.send", "text": "bye"})
            await send({"type": "websocket.close", "code": int(path.rsplit("/", 1)[1])})
            return
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                self.websocket_closes.append(message.get("code"))
                return
            await send({"type": "websocket.send", "text": message.get("text"), "bytes": message.get("bytes")})


async def _sleep_unless_disconnected(receive: Receive, seconds: float) -> bool:
    """Sleep `seconds`; False as soon as the client disconnects instead."""

    async def disconnected() -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({watcher}, timeout=seconds)
    finally:
        watcher.cancel()
    return not done


async def _send_json(send: Send, status: int, payload: Any) -> None:
    body = json.dumps(payload).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
