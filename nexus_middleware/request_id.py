"""Request ids: accept a well-formed incoming id, else generate one; echo it; expose it to code and logs.

The id lives in the request context (`get_context(scope).request_id`, `request.state.nexus.request_id`) and,
while the inner app runs, in the context variable behind `current_request_id()`, so streaming bodies,
Starlette background tasks and log records all see it. A valid W3C `traceparent` also yields the trace id
(`context.trace_id`), so logs can be joined with traces.
"""

import logging
import os
import re
from collections.abc import Callable
from typing import Literal

from nexus_middleware.context import (
    Decision,
    bind_context,
    current_context,
    enter_context,
    exit_context,
    get_context,
)
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import contains_ctl, is_header_name
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["DEFAULT_CHARSET", "RequestIDLogFilter", "RequestIDMiddleware", "parse_traceparent"]

DEFAULT_CHARSET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._:-"

# W3C Trace Context §3.2: version-traceid-parentid-flags, lower-case hex. Versions above 00 may append fields.
_TRACEPARENT = re.compile(rb"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(-.*)?", re.DOTALL)
_ZERO_TRACE = b"0" * 32
_ZERO_PARENT = b"0" * 16

OnInvalid = Literal["replace", "reject"]

# What `context.record("request_id", outcome)` would build, built once: a Decision is immutable, and a frozen
# dataclass costs more to construct than the rest of this layer's bookkeeping.
_DECISIONS = {outcome: Decision("request_id", outcome) for outcome in ("accepted", "generated", "replaced")}


_IDS_PER_DRAW = 128
# Bumped in a forked child: a pool filled before the fork must not hand the same ids to two processes.
_forks = [0]
if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork
    os.register_at_fork(after_in_child=lambda: _forks.__setitem__(0, _forks[0] + 1))


class _RandomIds:
    """128 random bits per id as 32 lower-case hex digits (the shape of `uuid4().hex`), from `os.urandom`.

    A call hands out the next 32 digits of a block drawn `_IDS_PER_DRAW` ids at a time: one getrandom system
    call per 128 requests instead of one per request, as Envoy buffers its random bytes for request ids.
    Each middleware owns one; a forked child draws afresh.
    """

    __slots__ = ("_digits", "_fork", "_offset")

    def __init__(self) -> None:
        self._digits = ""
        self._offset = 0
        self._fork = _forks[0]

    def __call__(self) -> str:
        offset = self._offset
        if offset >= len(self._digits) or self._fork != _forks[0]:
            self._digits = os.urandom(16 * _IDS_PER_DRAW).hex()
            self._fork = _forks[0]
            offset = 0
        self._offset = offset + 32
        return self._digits[offset : offset + 32]


def parse_traceparent(value: bytes) -> str | None:
    """The trace id of a valid W3C `traceparent` header value, else None (malformed, version ff, zero ids)."""
    found = _TRACEPARENT.fullmatch(value)
    if found is None:
        return None
    version, trace_id, parent_id, extra = found.groups()
    if version == b"ff" or (version == b"00" and extra is not None):
        return None
    if trace_id == _ZERO_TRACE or parent_id == _ZERO_PARENT:
        return None
    return trace_id.decode("ascii")


class RequestIDMiddleware:
    """Gives every http request and websocket handshake a request id, and echoes it on the response."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        header_name: str = "X-Request-ID",
        max_length: int = 128,
        charset: str = DEFAULT_CHARSET,
        generator: Callable[[], str] | None = None,
        on_invalid: OnInvalid = "replace",
        trust_incoming: bool = True,
        echo: bool = True,
    ) -> None:
        if not is_header_name(header_name):
            raise ConfigurationError(f"header_name {header_name!r} is not a valid HTTP header name")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or not 1 <= max_length <= 1024:
            raise ConfigurationError(f"max_length must be an int between 1 and 1024, not {max_length!r}")
        if not charset or contains_ctl(charset) or not charset.isascii() or "," in charset or " " in charset:
            raise ConfigurationError(
                "charset must be a non-empty string of printable ASCII characters other than ',' and ' '"
            )
        if generator is not None and not callable(generator):
            raise ConfigurationError("generator must be a callable returning a new request id")
        if on_invalid not in ("replace", "reject"):
            raise ConfigurationError(f"on_invalid must be 'replace' or 'reject', not {on_invalid!r}")
        self.app = app
        self._header = header_name.lower().encode("ascii")
        self._valid = re.compile(
            b"[" + re.escape(charset.encode("ascii")) + b"]{1,%d}" % max_length
        ).fullmatch
        self._generate = generator if generator is not None else _RandomIds()
        self._reject = on_invalid == "reject"
        self._invalid = Problem(400, f"The {self._header.decode()} header is not a valid request id.")
        self._trust_incoming = trust_incoming
        self._echo = echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            await self.app(scope, receive, send)
            return
        header = self._header
        incoming: bytes | None = None
        traceparent: bytes | None = None
        traceparents = 0
        for name, value in scope["headers"]:
            if name == header:
                if incoming is None:
                    incoming = value
            elif name == b"traceparent":
                traceparent = value
                traceparents += 1

        context = get_context(scope)
        # Several traceparent headers are ambiguous; Trace Context says to start a new trace then.
        if traceparent is not None and traceparents == 1:
            context.trace_id = parse_traceparent(traceparent)

        if incoming is None:
            request_id = self._generate()
            outcome = "generated"
        elif not self._trust_incoming:
            request_id = self._generate()
            outcome = "replaced"
        elif self._valid(incoming):
            request_id = incoming.decode("ascii")
            outcome = "accepted"
        elif self._reject:
            context.request_id = self._generate()
            context.record("request_id", "deny", reason="invalid_request_id")
            echoed = [(header, context.request_id.encode("latin-1"))] if self._echo else []
            with bind_context(context):
                await send_problem(scope, send, self._invalid, headers=echoed, layer="request_id")
            return
        else:
            request_id = self._generate()
            outcome = "replaced"
        context.request_id = request_id
        context.decisions.append(_DECISIONS[outcome])

        if self._echo:
            send = self._echoing_send(send, request_id.encode("latin-1"))
        token = enter_context(context)
        try:
            await self.app(scope, receive, send)
        finally:
            exit_context(token)

    def _echoing_send(self, send: Send, value: bytes) -> Send:
        header = self._header
        length = len(header)
        starts = _STARTS

        async def echoing_send(message: Message) -> None:
            if message["type"] in starts:
                headers = list(message.get("headers") or ())
                for name, _ in headers:
                    # The app's own value wins: a second, different id would confuse clients. Names of
                    # another length cannot be ours, so most are passed over without lower-casing them.
                    if len(name) == length and name.lower() == header:
                        break
                else:
                    headers.append((header, value))
                    message["headers"] = headers
            await send(message)

        return echoing_send


# The response start on http, and on websocket both the accept and a denial response carry headers.
_STARTS = frozenset({"http.response.start", "websocket.accept", "websocket.http.response.start"})


class RequestIDLogFilter(logging.Filter):
    """Sets `record.request_id` and `record.trace_id` from the current request (`default` outside one).

    Attach it to a handler: `handler.addFilter(RequestIDLogFilter())`, then use `%(request_id)s` in the
    format. It never drops a record.
    """

    def __init__(self, name: str = "", *, default: str = "-") -> None:
        super().__init__(name)
        self.default = default

    def filter(self, record: logging.LogRecord) -> bool:
        context = current_context()
        if context is None:
            record.request_id = self.default
            record.trace_id = self.default
        else:
            record.request_id = context.request_id or self.default
            record.trace_id = context.trace_id or self.default
        return True
