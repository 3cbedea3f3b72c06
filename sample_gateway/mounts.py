"""Where the middleware stacks are served, and how a build of them is swapped in, at start-up and on reload.

A `Mount` (runtime.py) is one place a stack is served: stack.py's `entries` wrapped around an inner app, held
by an object that reads `app` on every request (`GatewayEdge` for the main stack, a `StackSlot` for the admin
API).
`build_stacks` builds every mount's stack for a config without serving it; `StackBuild.commit()` serves it:
one assignment per mount, and the factories' outputs (header hooks, `/metrics` endpoint, admin views)
with them, in plain code, so a request sees the old stacks or the new ones, never a mix. A request already
running finishes on the stack it started with; resources only it used are closed once it is done
(resources.py). The swap adds nothing per request: the edge reads `app` as it always did.
"""

from collections.abc import Callable, Hashable
from dataclasses import dataclass

from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.config import GatewayConfig
from sample_gateway.runtime import BreakerStatesHook, GatewayRuntime, RateLimitPoliciesHook
from sample_gateway.stack import build_stack

__all__ = ["StackBuild", "StackSlot", "build_stacks"]


class StackSlot:
    """Serves the latest committed build of a stack that the edge does not hold itself (the admin API)."""

    def __init__(self, app: ASGIApp, /) -> None:
        self.app = app

    def __repr__(self) -> str:
        return f"StackSlot({self.app!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


_HeaderHook = Callable[[Scope, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]


@dataclass(frozen=True, eq=False)
class StackBuild:
    """The stacks of every mount for one config, and what their factories published: built, not served."""

    runtime: GatewayRuntime
    apps: list[ASGIApp]
    keys: frozenset[Hashable]  # the resources this build uses
    layers: list[str]
    header_hooks: list[_HeaderHook]
    metrics_endpoint: ASGIApp | None
    breaker_states: BreakerStatesHook | None
    rate_limit_policies: RateLimitPoliciesHook | None

    def commit(self) -> None:
        """Serve this build. Plain code, no await: no request runs between the assignments, so each sees
        the old stacks and outputs or the new ones. Requests already running finish on the old stacks;
        the resources only they used are closed once those stacks are gone."""
        runtime = self.runtime
        replaced = [mount.holder.app for mount in runtime.mounts]
        runtime.header_hooks[:] = self.header_hooks  # in place: the proxy holds this list
        runtime.metrics_endpoint = self.metrics_endpoint
        runtime.breaker_states = self.breaker_states
        runtime.rate_limit_policies = self.rate_limit_policies
        runtime.layers = self.layers
        for mount, app in zip(runtime.mounts, self.apps, strict=True):
            mount.holder.app = app
        runtime.resources.commit(self.keys, replaced)

    def discard(self) -> None:
        """Give up this build (the reload failed after it): close what only it opened."""
        self.runtime.resources.discard(self.keys)


def build_stacks(config: GatewayConfig, runtime: GatewayRuntime) -> StackBuild:
    """Every mount's stack for `config`, not served yet; raises `StackBuildError` when a factory refuses it.

    The factories publish their outputs on the runtime (hooks, endpoint, admin views): they are given empty
    ones here and the running stack's are put back before returning, all without an await, so requests keep
    seeing the running outputs until `commit()`."""
    saved = (
        runtime.header_hooks,
        runtime.metrics_endpoint,
        runtime.breaker_states,
        runtime.rate_limit_policies,
        runtime.layers,
    )
    runtime.header_hooks, runtime.metrics_endpoint = [], None
    runtime.breaker_states = runtime.rate_limit_policies = None
    resources = runtime.resources
    resources.begin()
    try:
        apps = [build_stack(mount.inner, config, runtime, entries=mount.entries) for mount in runtime.mounts]
        build = StackBuild(
            runtime,
            apps,
            resources.end(),
            runtime.layers,
            runtime.header_hooks,
            runtime.metrics_endpoint,
            runtime.breaker_states,
            runtime.rate_limit_policies,
        )
    except BaseException:
        resources.discard(resources.end())
        raise
    finally:
        (
            runtime.header_hooks,
            runtime.metrics_endpoint,
            runtime.breaker_states,
            runtime.rate_limit_policies,
            runtime.layers,
        ) = saved
    return build
