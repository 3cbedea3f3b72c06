"""Request size limits: body (declared and streamed), header count and size, URL length.

A declared `Content-Length` over the limit is refused with 413 before a byte of the body is read. A body
without one (chunked, or HTTP/2 data frames) is counted as it arrives: the chunk that crosses the limit is
never handed to the app; `receive()` raises `RequestBodyTooLargeError` instead, and the client gets a 413 if
the response has not started, or a reset connection if it has (never a clean but truncated response).
"""

import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError, RequestBodyTooLargeError
from nexus_middleware.paths import INVALID_PATH, RouteEntry, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodySizeLimitMiddleware", "RouteLimits"]

RouteLimits = Mapping[str, int | None] | Sequence[RouteEntry[int | None]]

_LAYER = "body_limit"
_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
# The methods the bodiless fast path trusts HTTP/1 framing for: a body on them has no defined meaning
# (RFC 9110 §9.3.1, §9.3.2). Other methods keep the counting receive even without framing headers, as a
# margin against a server that delivers a body anyway.
_BODILESS = frozenset({"GET", "HEAD"})
_HTTP1 = frozenset({"1.0", "1.1"})

Reason = Literal["body_too_large", "headers_too_large", "too_many_headers", "url_too_long", "invalid_request"]


def _limit(name: str, value: object, *, allow_none: bool = True) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a non-negative int{' or None' if allow_none else ''}")
    return value


class BodySizeLimitMiddleware:
    """Refuses requests whose body, headers or URL are larger than configured (413, 431, 414)."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        max_body_size: int | None = 1_048_576,
        routes: RouteLimits | None = None,
        max_header_count: int | None = 100,
        max_header_bytes: int | None = 32_768,
        max_url_length: int | None = 8_192,
        route_limits: RouteLimits | None = None,
    ) -> None:
        if route_limits is not None:  # the old name of `routes`, before every middleware said `routes`
            if routes is not None:
                raise ConfigurationError("pass routes= only (route_limits= is its deprecated alias)")
            warnings.warn(
                "BodySizeLimitMiddleware(route_limits=...) is deprecated; use routes=...",
                DeprecationWarning,
                stacklevel=2,
            )
            routes = route_limits
        self.app = app
        self._max_body = _limit("max_body_size", max_body_size)
        self._max_header_count = _limit("max_header_count", max_header_count)
        self._max_header_bytes = _limit("max_header_bytes", max_header_bytes)
        self._max_url = _limit("max_url_length", max_url_length)
        self._routes: RouteTable[int | None] | None = None
        if routes:
            entries: list[RouteEntry[int | None]] = []
            if isinstance(routes, Mapping):
                items: Iterable[object] = ((pattern, None, limit) for pattern, limit in routes.items())
            else:
                items = routes
            for entry in items:
                if not isinstance(entry, tuple) or len(entry) not in (3, 4):
                    raise ConfigurationError(
                        "routes entries must be (pattern, methods or None, limit[, host])"
                    )
                pattern, methods, limit, *host = entry
                if isinstance(methods, str):
                    raise ConfigurationError(f"methods for {pattern!r} must be a list of methods, not a str")
                entries.append((pattern, methods, _limit(f"the limit for {pattern!r}", limit), *host))
            self._routes = RouteTable(entries)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            await self.app(scope, receive, send)
            return
        # One pass over the headers for both the head limits and the body's framing: this runs on every
        # request, and a plain loop costs half of sum(map(len, chain(...))) plus a second loop.
        headers = scope["headers"]
        size = 0
        declared: bytes | None = None
        conflicting = chunked = False
        for name, value in headers:
            size += len(name) + len(value)
            if name == _CONTENT_LENGTH:
                value = value.strip()
                conflicting = conflicting or (declared is not None and value != declared)
                declared = value
            elif name == _TRANSFER_ENCODING:
                chunked = True
        refusal = self._head_refusal(scope, len(headers), size)
        if refusal is not None:
            await self._refuse(scope, send, *refusal)
            return
        if scope_type == "websocket":
            await self.app(scope, receive, send)
            return

        limit = self._max_body
        if self._routes is not None:
            try:
                path = request_path(scope)
            except InvalidPathError:
                get_context(scope).record(_LAYER, "deny", reason="invalid_request")
                await send_problem(scope, send, INVALID_PATH, layer=_LAYER)
                return
            found = self._routes.for_request(scope).match(path, scope["method"])
            if found is not None:
                limit = found[0]
        if limit is None:
            await self.app(scope, receive, send)
            return

        if declared is not None:
            # RFC 9110 §8.6: digits only, and repeated values must agree.
            if conflicting or not declared.isdigit() or not declared.isascii():
                await self._refuse(
                    scope, send, 400, "invalid_request", "The Content-Length header is invalid."
                )
                return
            length = int(declared)
            if length > limit:
                await self._refuse(
                    scope, send, 413, "body_too_large", _too_large(limit), limit=limit, declared=length
                )
                return
            # The server frames the body by Content-Length (h11, httptools and HTTP/2 servers all refuse a
            # body longer than declared), so there is nothing left to count.
            await self.app(scope, receive, send)
            return
        if not chunked and scope["method"] in _BODILESS and scope.get("http_version") in _HTTP1:
            # The common GET: an HTTP/1 request with neither Content-Length nor Transfer-Encoding has no
            # body (RFC 9112 §6.3), so there is nothing to count and no receive or send wrapper to pay for.
            await self.app(scope, receive, send)
            return
        await _LimitedBody(self, scope, receive, send, limit).run()

    def _head_refusal(self, scope: Scope, count: int, size: int) -> tuple[int, Reason, str] | None:
        # Plain code, not a coroutine: it runs on every request and almost always finds nothing to refuse.
        if self._max_url is not None:
            query = scope.get("query_string") or b""
            raw_path = scope.get("raw_path") or scope["path"].encode("utf-8")
            length = len(raw_path) + (len(query) + 1 if query else 0)
            if length > self._max_url:
                return 414, "url_too_long", f"The URL is longer than {self._max_url} bytes."
        if self._max_header_count is not None and count > self._max_header_count:
            return 431, "too_many_headers", f"The request has more than {self._max_header_count} headers."
        if self._max_header_bytes is not None and size > self._max_header_bytes:
            detail = f"The request headers are larger than {self._max_header_bytes} bytes."
            return 431, "headers_too_large", detail
        return None

    async def _refuse(
        self, scope: Scope, send: Send, status: int, reason: Reason, detail: str, **details: Any
    ) -> None:
        get_context(scope).record(_LAYER, "deny", reason=reason, **details)
        await send_problem(scope, send, Problem(status, detail), layer=_LAYER)


def _too_large(limit: int) -> str:
    return f"The request body is larger than {limit} bytes."


class _LimitedBody:
    """One request whose body is counted as it arrives and cut when it crosses the limit."""

    __slots__ = ("cut", "limit", "middleware", "receive", "received", "scope", "send", "started")

    def __init__(
        self, middleware: BodySizeLimitMiddleware, scope: Scope, receive: Receive, send: Send, limit: int
    ) -> None:
        self.middleware = middleware
        self.scope = scope
        self.receive = receive
        self.send = send
        self.limit = limit
        self.received = 0
        self.started = False
        self.cut = False

    async def run(self) -> None:
        try:
            await self.middleware.app(self.scope, self.receive_limited, self.send_unless_cut)
        except RequestBodyTooLargeError:
            if self.started or not self.cut:
                # Under way: only an aborted connection tells the client it failed. Not ours (an inner
                # layer's, or the app's own): not ours to swallow.
                raise
            # Otherwise the 413 went out from receive_limited; the app merely let the error through.
            return
        if self.cut and self.started:
            # The app swallowed the error and returned: the response must not look complete.
            raise RequestBodyTooLargeError(_too_large(self.limit))

    async def receive_limited(self) -> Message:
        if self.cut:
            raise RequestBodyTooLargeError(_too_large(self.limit))
        message = await self.receive()
        if message["type"] != "http.request":
            return message
        self.received += len(message.get("body", b""))
        if self.received <= self.limit:
            return message
        self.cut = True
        if not self.started:
            # Answer now rather than when the exception surfaces: an app (or Starlette's error middleware
            # inside it) may catch it and try to send its own response, which send_unless_cut then drops.
            await self.middleware._refuse(
                self.scope, self.send, 413, "body_too_large", _too_large(self.limit), limit=self.limit
            )
        raise RequestBodyTooLargeError(_too_large(self.limit))

    async def send_unless_cut(self, message: Message) -> None:
        if self.cut:
            return
        if message["type"] == "http.response.start":
            self.started = True
        await self.send(message)
