"""RFC 9457 problem details: the one way every nexus layer refuses a request.

On an http scope the problem is sent as `application/problem+json`. On a websocket scope the handshake is
refused before it is accepted: with an HTTP denial response when the server supports the
`websocket.http.response` extension, else with a `websocket.close` whose code matches the status.
"""

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from types import MappingProxyType
from typing import Any

from nexus_middleware.context import get_context
from nexus_middleware.types import Scope, Send

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "Problem",
    "send_problem",
    "websocket_close_code",
]

PROBLEM_CONTENT_TYPE = b"application/problem+json"

_RESERVED_MEMBERS = frozenset({"type", "title", "status", "detail", "instance"})
_NO_STORE = (b"cache-control", b"no-store")


@dataclass(frozen=True, slots=True)
class Problem:
    """An RFC 9457 problem. `title` defaults to the status phrase; extension members go in `extensions`."""

    status: int
    detail: str | None = None
    type: str = "about:blank"
    title: str | None = None
    instance: str | None = None
    extensions: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        if not 400 <= self.status <= 599:
            raise ValueError(f"a problem status must be 4xx or 5xx, not {self.status}")
        clash = _RESERVED_MEMBERS.intersection(self.extensions)
        if clash:
            raise ValueError(f"extension members may not redefine {sorted(clash)}")

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": self.type,
            "title": self.title or _phrase(self.status),
            "status": self.status,
        }
        if self.detail is not None:
            body["detail"] = self.detail
        if self.instance is not None:
            body["instance"] = self.instance
        body.update(self.extensions)
        return body

    def body(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def websocket_close_code(status: int) -> int:
    """The websocket close code that best carries an HTTP refusal status (RFC 6455 §7.4.1)."""
    if status in (413, 414, 431):
        return 1009  # message too big
    if status in (429, 503):
        return 1013  # try again later
    if status >= 500:
        return 1011  # internal error
    return 1008  # policy violation


async def send_problem(
    scope: Scope,
    send: Send,
    problem: Problem,
    *,
    headers: Iterable[tuple[bytes, bytes]] = (),
    layer: str | None = "nexus",
) -> None:
    """Send `problem` as the whole response (http) or as the handshake refusal (websocket).

    `layer` marks the response as produced locally in the request context, so that layers such as the circuit
    breaker never count it as an upstream failure. Pass `layer=None` for problems that stand for an upstream
    failure (the proxy's 502 and 504).
    """
    if layer is not None:
        context = get_context(scope)
        if context.local_response is None:
            context.local_response = layer
    request_id = get_context(scope).request_id
    if request_id and "request_id" not in problem.extensions:
        problem = replace(
            problem, extensions=MappingProxyType({**problem.extensions, "request_id": request_id})
        )
    body = problem.body()
    raw_headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE),
        (b"content-length", str(len(body)).encode()),
        _NO_STORE,
        *headers,
    ]
    if scope["type"] == "websocket":
        if "websocket.http.response" in scope.get("extensions", {}):
            await send(
                {"type": "websocket.http.response.start", "status": problem.status, "headers": raw_headers}
            )
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            reason = (problem.detail or problem.title or _phrase(problem.status))[:120]
            await send(
                {"type": "websocket.close", "code": websocket_close_code(problem.status), "reason": reason}
            )
        return
    await send({"type": "http.response.start", "status": problem.status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})
