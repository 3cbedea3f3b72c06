"""Per-request cost of the gateway's control plane: edge, routing, traffic split and balancer pick.

The data plane is replaced by an in-process forwarder that asks the selector for a target, reports the
attempt to the observer as the proxy does, and calls the bare app: what remains is everything the gateway
adds around the proxy. The load benchmark (docs/performance.md) measures the whole gateway over sockets.
"""

import asyncio
from collections.abc import AsyncIterable, Awaitable, Callable, Sequence
from typing import Any

import pytest

from benchmarks.conftest import BASELINE, Driver, NoopMiddleware, bare_app, bench
from nexus_middleware.headers import RawHeaders
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send
from sample_gateway.app import Forwarder, create_app
from sample_gateway.config import parse_config
from sample_gateway.contracts import AttemptObserver, TargetSelector, UpstreamPolicy
from sample_gateway.runtime import GatewayRuntime
from sample_gateway.upstream_client import (
    ClientKind,
    Origin,
    UpstreamClient,
    UpstreamResponse,
    UpstreamWebSocket,
)

GROUP = "gateway"


class LocalForwarder:
    # A `Forwarder`: the policy and the upstream path are the proxy's business, not used here.
    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        selector: TargetSelector,
        policy: UpstreamPolicy,
        path: str,
        observer: AttemptObserver | None = None,
    ) -> None:
        target = await selector.select(scope)
        if target is None or observer is None:
            raise RuntimeError("the benchmark config has a healthy target and an observer")
        observer.attempt_started(target)
        await bare_app(scope, receive, send)
        observer.attempt_finished(target, outcome="success", status=200, latency=0.001)

    forward_websocket = forward  # the benchmark sends no websocket; this keeps it a whole `Forwarder`


class NoUpstream:
    # An `UpstreamClient` for the data plane's other half: the local forwarder never opens an exchange.
    kind: ClientKind = "httpx"

    async def open(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        raise RuntimeError("the benchmark's forwarder does not go upstream")

    async def open_websocket(
        self,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        *,
        protocols: Sequence[str],
        connect_timeout: float,
    ) -> UpstreamWebSocket:
        raise RuntimeError("the benchmark's forwarder does not go upstream")

    async def aclose(self) -> None:
        return None


def _local_data_plane(runtime: GatewayRuntime) -> tuple[Forwarder, UpstreamClient]:
    return LocalForwarder(), NoUpstream()


def gateway(strategy: str = "round_robin", **route: Any) -> ASGIApp:
    config = parse_config(
        {
            "services": [
                {
                    "name": "items",
                    "targets": [
                        {"url": "http://10.0.0.1:8000", "version": "v1"},
                        {"url": "http://10.0.0.2:8000", "version": "v1"},
                        {"url": "http://10.0.0.3:8000", "version": "v2"},
                    ],
                    "health_check": {"enabled": False},
                    "load_balancing": {"strategy": strategy},
                }
            ],
            "routes": [
                {"path": "/health/{name}", "methods": ["GET"], "service": "items"},
                {"path": "/api/*", "methods": ["GET", "POST"], "strip_prefix": "/api", **route},
            ],
            "admin": {"api_keys": ["k"]},
        }
    )
    return create_app(config, runtime=GatewayRuntime(config), data_plane=_local_data_plane)


async def _lifespan(app: ASGIApp) -> Callable[[], Awaitable[None]]:
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    # An ASGI app returns an awaitable, not necessarily a coroutine: `ensure_future` takes either.
    task = asyncio.ensure_future(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await outbox.get())["type"] == "lifespan.startup.complete"

    async def stop() -> None:
        await inbox.put({"type": "lifespan.shutdown"})
        await outbox.get()
        await task

    return stop


def run_gateway(benchmark: Any, driver: Driver, name: str, app: ASGIApp) -> None:
    stop = driver.loop.run_until_complete(_lifespan(app))
    try:
        bench(benchmark, driver, name, app, group=GROUP)
    finally:
        driver.loop.run_until_complete(stop())


def test_bare_app(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app, group=GROUP)


def test_noop_wrapper(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app), group=GROUP)


@pytest.mark.parametrize(
    "strategy",
    ["round_robin", "weighted_round_robin", "least_connections", "consistent_hash", "power_of_two"],
)
def test_route_and_pick(benchmark: Any, driver: Driver, strategy: str) -> None:
    run_gateway(benchmark, driver, f"gateway, default stack, {strategy}", gateway(strategy, service="items"))


def test_split_with_canary_rule(benchmark: Any, driver: Driver) -> None:
    app = gateway(
        split=[{"service": "items", "version": "v1", "weight": 9}, {"service": "items", "version": "v2"}],
        canary=[{"header": "x-canary", "equals": "1", "service": "items", "version": "v2"}],
    )
    run_gateway(benchmark, driver, "gateway, default stack, split + canary", app)
