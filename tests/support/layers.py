"""Tiny stand-ins for the suite's other layers: they record decisions in the request context as the real
ones do (BRIEF's vocabulary) and refuse through `send_problem`, so observability is tested on the contract."""

from collections.abc import Callable
from typing import Any

from nexus_middleware.context import Principal, get_context, publish_principal
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send


class FakeLayer:
    """Records `layer`/`outcome` when `applies(scope)`; refuses with `status` when one is given."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        layer: str,
        outcome: str,
        status: int | None = None,
        rule: str | None = None,
        reason: str | None = None,
        applies: Callable[[Scope], bool] = lambda scope: True,
        details: dict[str, Any] | None = None,
        principal: Principal | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        self.app = app
        self.layer = layer
        self.outcome = outcome
        self.status = status
        self.rule = rule
        self.reason = reason
        self.applies = applies
        self.details = details or {}
        self.principal = principal
        self.headers = headers or []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or not self.applies(scope):
            await self.app(scope, receive, send)
            return
        context = get_context(scope)
        if self.principal is not None:
            publish_principal(scope, self.principal)
        context.record(self.layer, self.outcome, rule=self.rule, reason=self.reason, **self.details)
        if self.status is not None:
            await send_problem(
                scope,
                send,
                Problem(self.status, f"{self.layer} says no"),
                headers=self.headers,
                layer=self.layer,
            )
            return
        await self.app(scope, receive, send)


def path_is(*paths: str) -> Callable[[Scope], bool]:
    wanted = frozenset(paths)
    return lambda scope: scope.get("path") in wanted


def path_starts(prefix: str) -> Callable[[Scope], bool]:
    return lambda scope: str(scope.get("path", "")).startswith(prefix)
