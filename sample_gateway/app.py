"""The gateway as one ASGI app: probes and admin at the edge, then the middleware stack, then the proxy.

```
GatewayEdge            /healthz, /readyz, the admin prefix: answered here, before any policy layer
  build_stack(...)     the nexus middlewares chosen by the config (stack.py)
    GatewayApp         lifespan (upstream client, health checks, registry refresh), routing -> proxy
                       (http: forward, websocket: forward_websocket)
```

`create_app(config)` builds it. Everything a request needs is computed when the config is loaded (routing
tables, selectors, policies); a request does one route lookup and one balancer pick before it is forwarded.
"""

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from nexus_middleware.context import get_context
from nexus_middleware.errors import InvalidPathError, StorageError
from nexus_middleware.paths import INVALID_PATH, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.config import (
    GatewayConfig,
    benchmark_upstream_from_environment,
    config_path_from_environment,
    load_config,
    parse_config,
)
from sample_gateway.contracts import AttemptObserver, TargetSelector, UpstreamPolicy
from sample_gateway.health import ActiveHealthChecker
from sample_gateway.proxy import ReverseProxy
from sample_gateway.routing import NoRoute, RouteMatch
from sample_gateway.runtime import GatewayRuntime, Mount
from sample_gateway.upstream_client import UpstreamClient, create_upstream_client

__all__ = [
    "Forwarder",
    "GatewayApp",
    "GatewayEdge",
    "MATCH_EXTRA",
    "UPSTREAM_EXTRA",
    "bench_app",
    "create_app",
    "create_app_from_environment",
    "create_benchmark_app",
    "route_request",
]

logger = logging.getLogger(__name__)

REGISTRY_REFRESH_INTERVAL = 5.0  # seconds between re-reads of a shared (Redis) registry

# The request-context extras the edge fills when it routes a request, before the policy layers run: the
# match itself (read back by GatewayApp) and the chosen service (read by the breakers' `key="upstream"`).
MATCH_EXTRA = "gateway.match"
UPSTREAM_EXTRA = "proxy.service"


def route_request(runtime: GatewayRuntime, scope: Scope, path: str) -> RouteMatch | NoRoute:
    """Resolve the route once per request and publish it in the context for every layer below."""
    match = runtime.router.resolve(scope, path)
    context = get_context(scope)
    context.extras[MATCH_EXTRA] = match
    if not isinstance(match, NoRoute):
        context.route = match.route.pattern
        context.extras[UPSTREAM_EXTRA] = match.choice.backend.service
    return match


class Forwarder(Protocol):
    """The data plane (`sample_gateway.proxy.ReverseProxy`): `forward` for http, `forward_websocket` for
    websocket scopes, both with the same routing results."""

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
    ) -> None: ...

    async def forward_websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        selector: TargetSelector,
        policy: UpstreamPolicy,
        path: str,
        observer: AttemptObserver | None = None,
    ) -> None: ...


def _default_data_plane(runtime: GatewayRuntime) -> tuple[Forwarder, UpstreamClient]:
    config = runtime.config
    pools = [service.pool for service in config.services]
    client = create_upstream_client(
        config.upstream_client,
        # Each service has its own gate of pool.max_connections in the proxy; the client holds them all.
        max_connections=max(100, sum(pool.max_connections for pool in pools)),
        max_connections_per_host=max([0, *(pool.max_connections_per_host for pool in pools)]),
        keepalive_expiry=min([30.0, *(pool.keepalive_expiry for pool in pools)]),
    )
    proxy = ReverseProxy(
        client=client,
        client_resolver=runtime.resolver,
        clock=runtime.clock,
        header_hooks=runtime.header_hooks,
    )
    return proxy, client


DataPlaneFactory = Callable[[GatewayRuntime], tuple[Forwarder, UpstreamClient]]

_NOT_FOUND = Problem(404, "No route matches this request.")
_NOT_STARTED = Problem(503, "The gateway is starting.")


class GatewayApp:
    """The innermost app: owns the lifespan (clients and background tasks) and forwards routed requests."""

    def __init__(
        self, runtime: GatewayRuntime, /, *, data_plane: DataPlaneFactory = _default_data_plane
    ) -> None:
        self.runtime = runtime
        self._data_plane = data_plane
        self._forwarder: Forwarder | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []
        self._tasks: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"GatewayApp({self.runtime!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope_type != "http" and scope_type != "websocket":
            return
        match = get_context(scope).extras.get(MATCH_EXTRA)
        if match is None:  # served without the edge (tests, embedding): route here
            path = _normalized_path(scope)
            if path is None:
                await send_problem(scope, send, INVALID_PATH, layer="gateway")
                return
            match = route_request(self.runtime, scope, path)
        if isinstance(match, NoRoute):
            await _refuse(scope, send, match)
            return
        forwarder = self._forwarder
        if forwarder is None:  # a websocket is refused before accept: a denial response or a close
            await send_problem(scope, send, _NOT_STARTED, headers=[(b"retry-after", b"1")], layer="gateway")
            return
        choice = match.choice
        # The policy layers above have already decided on the handshake (auth, limits, breakers): only an
        # admitted websocket reaches here, and the proxy accepts it once the upstream has accepted.
        forward = forwarder.forward if scope_type == "http" else forwarder.forward_websocket
        await forward(
            scope,
            receive,
            send,
            selector=choice.backend.selector,
            policy=choice.policy,
            path=match.path,
            observer=choice.backend.observer,
        )

    async def start(self) -> None:
        """Create the clients once per process and start the background tasks."""
        import httpx

        runtime = self.runtime
        forwarder, client = self._data_plane(runtime)
        self._closers.append(client.aclose)
        health_client = httpx.AsyncClient(trust_env=False, follow_redirects=False)
        self._closers.append(health_client.aclose)
        self._closers.append(runtime.registry.aclose)
        self._closers.append(runtime.resources.aclose)  # the middlewares' clients, stores and state
        checker = ActiveHealthChecker(runtime.tracker, runtime.check_policies, client=health_client)
        runtime.checker = checker
        try:
            await runtime.refresh_registry()
        except StorageError as exc:  # serve the config's targets; the refresh task keeps trying
            logger.warning("the registry store is unavailable at start-up: %s", exc)
        self._tasks.append(asyncio.create_task(checker.run(), name="nexus-health-checks"))
        self._tasks.append(asyncio.create_task(self._refresh_registry(), name="nexus-registry-refresh"))
        self._forwarder = forwarder
        runtime.started = True

    async def stop(self) -> None:
        self.runtime.started = False
        self._forwarder = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        for close in reversed(self._closers):
            try:
                await close()
            except Exception:  # one failing close must not keep the others open
                logger.exception("closing %r failed", close)
        self._closers.clear()

    async def _refresh_registry(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_REFRESH_INTERVAL)
            try:
                await self.runtime.refresh_registry()
            except Exception:
                logger.exception("refreshing the registry failed; keeping the targets known so far")

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    logger.exception("gateway start-up failed")
                    await self.stop()
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return


def _normalized_path(scope: Scope) -> str | None:
    """The normalized path (computed once per request, shared by every layer), or None when unusable.

    Plain code, not a coroutine that also sends the 400: it runs on every request at the edge."""
    try:
        return request_path(scope)
    except InvalidPathError:
        return None


async def _refuse(scope: Scope, send: Send, result: NoRoute) -> None:
    if result.status == 405:
        allow = ", ".join(sorted(result.allow))
        problem = Problem(405, f"This path accepts {allow}.", extensions={"allow": sorted(result.allow)})
        await send_problem(scope, send, problem, headers=[(b"allow", allow.encode())], layer="gateway")
        return
    await send_problem(scope, send, _NOT_FOUND, layer="gateway")


def _json_response(status: int, payload: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
    ]
    return (
        {"type": "http.response.start", "status": status, "headers": headers},
        {"type": "http.response.body", "body": body},
    )


class GatewayEdge:
    """The outermost layer: answers the probes and routes the admin prefix before the policy layers.

    `app` is read once per request: a reload that rebuilds the middleware stack assigns it (mounts.py's
    `StackBuild.commit`). The lifespan goes straight to the app given here (GatewayApp in `create_app`), so
    its long-running call never keeps a replaced stack alive."""

    def __init__(self, app: ASGIApp, /, *, runtime: GatewayRuntime, admin: ASGIApp | None = None) -> None:
        self.app = app
        self.runtime = runtime
        self._lifespan = app
        self._admin = admin
        self._admin_prefix = runtime.config.admin.prefix if admin is not None else None
        self.admin_listener: ASGIApp | None = None  # the admin API on its own listener (`admin.listen`)

    def __repr__(self) -> str:
        return f"GatewayEdge(admin_prefix={self._admin_prefix!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope_type = scope["type"]
        if scope_type != "http" and scope_type != "websocket":
            await self._lifespan(scope, receive, send)  # no layer of the stack acts on the lifespan
            return
        path = _normalized_path(scope)
        if path is None:
            await send_problem(scope, send, INVALID_PATH, layer="gateway")
            return
        if scope_type == "http":
            if path == "/healthz":
                for message in _json_response(200, {"status": "ok"}):
                    await send(message)
                return
            if path == "/readyz":
                await self._ready(scope, send)
                return
        prefix = self._admin_prefix
        if (
            prefix is not None
            and self._admin is not None
            and (path == prefix or path.startswith(prefix + "/"))
        ):
            await self._admin(scope, receive, send)
            return
        metrics = self.runtime.metrics_endpoint
        if metrics is not None and path == self.runtime.config.metrics.path and scope_type == "http":
            await metrics(scope, receive, send)
            return
        route_request(self.runtime, scope, path)
        await self.app(scope, receive, send)

    async def _ready(self, scope: Scope, send: Send) -> None:
        if not self.runtime.started:
            await send_problem(scope, send, Problem(503, "The gateway has not started."), layer="gateway")
            return
        missing = self.runtime.unready_services()
        if missing:
            problem = Problem(
                503, "Some required services have no healthy target.", extensions={"services": missing}
            )
            await send_problem(scope, send, problem, headers=[(b"retry-after", b"5")], layer="gateway")
            return
        for message in _json_response(200, {"status": "ready"}):
            await send(message)


def create_app(
    config: GatewayConfig,
    *,
    runtime: GatewayRuntime | None = None,
    config_source: Callable[[], GatewayConfig] | None = None,
    data_plane: DataPlaneFactory = _default_data_plane,
) -> GatewayEdge:
    """The gateway for `config`: edge, middleware stack, proxy. Serve it with uvicorn (lifespan on)."""
    from sample_gateway.admin import AdminApp
    from sample_gateway.mounts import StackSlot, build_stacks
    from sample_gateway.stack import ADMIN_STACK, STACK

    if runtime is None:
        runtime = GatewayRuntime(config, config_source=config_source)
    app = GatewayApp(runtime, data_plane=data_plane)
    on_edge = config.admin.enabled and not config.admin.listen
    admin = (
        StackSlot(AdminApp(runtime, prefix=config.admin.prefix if on_edge else None))
        if config.admin.enabled
        else None
    )
    edge = GatewayEdge(app, runtime=runtime, admin=admin if on_edge else None)
    # The stacks are built and swapped in by the same code at start-up and on reload (mounts.py).
    runtime.mounts = [Mount(STACK, app, edge)]
    if admin is not None:
        runtime.mounts.append(Mount(ADMIN_STACK, admin.app, admin))
        if not on_edge:
            edge.admin_listener = admin
    build_stacks(config, runtime).commit()
    return edge


def create_app_from_environment() -> GatewayEdge:
    """The uvicorn factory each worker process calls under `--workers N` (the CLI passes the file path)."""
    path = config_path_from_environment()
    if path is None:
        raise RuntimeError("NEXUS_GATEWAY_CONFIG is not set; start the gateway with python -m sample_gateway")
    return create_app(load_config(path), config_source=lambda: load_config(path))


def create_benchmark_app(upstream_url: str | None = None, *, client: str = "aiohttp") -> GatewayEdge:
    """The gateway with its default middleware stack in front of one upstream, for the load benchmark.

    A `uvicorn --factory` target: `python -m benchmarks.load.run --gateway-app
    sample_gateway.app:create_benchmark_app` (the upstream comes from `NEXUS_BENCH_UPSTREAM` then).
    """
    config = parse_config(
        {
            "upstream_client": client,
            "services": [
                {
                    "name": "bench",
                    "targets": [{"url": upstream_url or benchmark_upstream_from_environment()}],
                    "health_check": {"enabled": False},
                    "retry": {"attempts": 1},
                }
            ],
            "routes": [{"path": "*", "service": "bench"}],
            "admin": {"enabled": False},
        }
    )
    return create_app(config)


def bench_app() -> GatewayEdge:
    """Row (d) of the load benchmark: `--gateway-app sample_gateway.app:bench_app` (docs/performance.md)."""
    return create_benchmark_app()
