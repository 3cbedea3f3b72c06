"""A minimal gateway for proxy tests: `ReverseProxy.forward` behind the core path normalization."""

import itertools
from dataclasses import dataclass, field

from nexus_middleware.errors import InvalidPathError
from nexus_middleware.paths import INVALID_PATH, request_path
from nexus_middleware.problem import send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.contracts import AttemptOutcome, Target, UpstreamPolicy
from sample_gateway.proxy import ReverseProxy


class ListSelector:
    """Round robin over a fixed list of targets, skipping the excluded ones."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self._counter = itertools.count()

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        candidates = [target for target in self.targets if target.id not in exclude]
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


class FirstSelector(ListSelector):
    """Always the first target not excluded: every request tries the same target first."""

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        return next((target for target in self.targets if target.id not in exclude), None)


@dataclass
class RecordingObserver:
    started: list[str] = field(default_factory=list)
    finished: list[tuple[str, AttemptOutcome, int | None]] = field(default_factory=list)

    def attempt_started(self, target: Target) -> None:
        self.started.append(target.id)

    def attempt_finished(
        self, target: Target, *, outcome: AttemptOutcome, status: int | None, latency: float
    ) -> None:
        assert latency >= 0
        self.finished.append((target.id, outcome, status))


def proxy_app(
    proxy: ReverseProxy,
    selector: ListSelector,
    policy: UpstreamPolicy,
    observer: RecordingObserver | None = None,
    decisions: list[object] | None = None,
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        try:
            path = request_path(scope)
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer="paths")
            return
        try:
            await proxy.forward(
                scope, receive, send, selector=selector, policy=policy, path=path, observer=observer
            )
        finally:
            if decisions is not None:
                decisions.extend(scope["state"]["nexus"].decisions)

    return app
