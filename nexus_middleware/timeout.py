"""An overall deadline per route: 504 before the response starts, an aborted response after.

The deadline is published in the request context (`context.deadline`, on the injected clock's monotonic
scale) so the proxy can cap its own timeouts; nested deadlines keep the earliest. A response that already
started cannot become a 504, and finishing it cleanly would hand the client a truncated body that looks
whole, so the middleware raises `DeadlineExceededError` and the server drops the connection.
"""

import asyncio
from collections.abc import Iterable

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError, DeadlineExceededError, InvalidPathError
from nexus_middleware.paths import INVALID_PATH, RouteEntry, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["TimeoutMiddleware"]

# The deadline a TimeoutMiddleware already enforces: an inner one with a later deadline has nothing to do.
_ENFORCED = "timeout.enforced"


class _Responder:
    """Per-request: tracks whether the response started; ends the deadline of a websocket at its handshake."""

    __slots__ = ("send_downstream", "started", "timer")

    def __init__(self, send: Send, timer: asyncio.Timeout) -> None:
        self.send_downstream = send
        self.timer = timer
        self.started = False

    async def send(self, message: Message) -> None:
        if not self.started:
            kind = message["type"]
            if kind == "websocket.accept":
                self.timer.reschedule(None)  # a deadline bounds the handshake, not the session
            self.started = True
        await self.send_downstream(message)


class TimeoutMiddleware:
    """Bounds the time a request may take: `timeout` seconds, or the first matching route's value.

    `routes` are `(pattern, methods | None, seconds | None)`, with a host as a 4th element for one host's
    requests only (`RouteEntry`).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        timeout: float | None = 30.0,
        routes: Iterable[RouteEntry[float | None]] = (),
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        routes = list(routes)
        for seconds in [timeout, *(entry[2] for entry in routes)]:
            if seconds is not None and (not isinstance(seconds, int | float) or seconds <= 0):
                raise ConfigurationError(f"timeouts must be positive numbers of seconds or None: {seconds!r}")
        self.app = app
        self._timeout = timeout
        self._routes: RouteTable[float | None] | None = RouteTable(routes) or None
        self._clock = clock

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        seconds = self._timeout
        if self._routes is not None:
            try:
                found = self._routes.for_request(scope).match(request_path(scope), scope.get("method", "GET"))
            except InvalidPathError:
                await send_problem(scope, send, INVALID_PATH, layer="timeout")
                return
            if found is not None:
                seconds = found[0]
        context = get_context(scope)
        now = self._clock.monotonic()
        previous = context.deadline
        deadline = None if seconds is None else now + seconds
        if previous is not None and (deadline is None or previous <= deadline):
            if context.extras.get(_ENFORCED) == previous:
                await self.app(scope, receive, send)  # an outer TimeoutMiddleware enforces the earlier one
                return
            deadline = previous
        if deadline is None:
            await self.app(scope, receive, send)
            return
        context.deadline = deadline
        outer_enforced = context.extras.get(_ENFORCED)
        context.extras[_ENFORCED] = deadline
        loop = asyncio.get_running_loop()
        timer = asyncio.timeout_at(loop.time() + (deadline - now))
        responder = _Responder(send, timer)
        try:
            async with timer:
                await self.app(scope, receive, responder.send)
        except TimeoutError:
            if not timer.expired():
                raise
            context.record("timeout", "expired", after_start=responder.started)
            if responder.started:
                raise DeadlineExceededError("the deadline passed while the response was being sent") from None
            # A deadline is the app's or the upstream's failure, as the proxy's 504 is: layer=None lets an
            # outer circuit breaker count it.
            await send_problem(
                scope, send, Problem(504, "The request did not complete within its deadline."), layer=None
            )
        finally:
            context.deadline = previous
            context.extras[_ENFORCED] = outer_enforced

    def __repr__(self) -> str:
        routes = 0 if self._routes is None else len(self._routes)
        return f"TimeoutMiddleware(timeout={self._timeout}, routes={routes})"
