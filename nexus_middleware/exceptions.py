"""Unhandled exceptions as RFC 9457 problems: a 500 with the request id and nothing internal.

Like Starlette's `ServerErrorMiddleware`, the exception is re-raised after the problem is sent, so the server
still logs it with its traceback: the error is answered, never swallowed. When the response had already
started nothing can be sent any more; the exception propagates and the server aborts the connection, so a
client never mistakes a truncated body for a complete one.
"""

from nexus_middleware.errors import ConfigurationError
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["ProblemDetailsMiddleware"]


class ProblemDetailsMiddleware:
    """Outermost safety net: an exception before the response started becomes a 500 problem+json.

    - `detail`: the public text of the 500 (never the exception message: it may carry internals).
    - `type_uri`: the problem type.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        detail: str = "The server could not complete the request.",
        type_uri: str = "about:blank",
    ) -> None:
        if not detail:
            raise ConfigurationError("detail must be a non-empty string")
        self.app = app
        self._problem = Problem(500, detail, type=type_uri)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            # Websocket errors are the server's to close (1011); lifespan errors must reach the server as-is.
            await self.app(scope, receive, send)
            return
        started = False

        async def send_tracking(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, send_tracking)
        except Exception:
            if not started:
                await send_problem(scope, send, self._problem, layer="exceptions")
            raise
