"""The gateway's live control-plane state: config, registry, health, selectors and router, swapped on reload.

`GatewayRuntime` is built once per process from a validated config and shared by the proxying app, the
probes and the admin API. A reload builds the new router and policies first and swaps them in one
assignment, so a request sees either the old config or the new one, never a mix; target health survives a
reload for targets that stay.
"""

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.types import ASGIApp, Scope
from sample_gateway.balancing import ServiceSelector, create_balancer
from sample_gateway.config import GatewayConfig, RouteConfig, ServiceConfig
from sample_gateway.contracts import RetryPolicy, UpstreamPolicy
from sample_gateway.health import ActiveCheckPolicy, ActiveHealthChecker, HealthTracker, OutlierPolicy
from sample_gateway.registry import Registry, RegistryStore, registry_store_from_url, static_targets
from sample_gateway.resources import ResourcePool
from sample_gateway.routing import Backend, Router, build_router

__all__ = [
    "BreakerStatesHook",
    "GatewayRuntime",
    "Holder",
    "Mount",
    "RateLimitPoliciesHook",
    "upstream_policy",
]


class BreakerStatesHook(Protocol):
    """What the resilience layer provides to the admin API: one dict per breaker (key, state, counts)."""

    def __call__(self) -> list[dict[str, Any]]: ...


class RateLimitPoliciesHook(Protocol):
    """What the rate-limit layer provides to the admin API: read and atomically replace its policies."""

    def get(self) -> dict[str, Any]: ...

    def replace(self, policies: dict[str, Any]) -> None: ...


class Holder(Protocol):
    """What serves a middleware stack: reads `app` on every request (`GatewayEdge`, a `StackSlot`)."""

    app: ASGIApp


@dataclass(frozen=True, eq=False)
class Mount:
    """One place a stack is served: stack.py's `entries` wrapped around `inner`, assigned to `holder.app`
    when a build is committed (mounts.py)."""

    entries: Sequence[tuple[str, Callable[[ASGIApp, GatewayConfig, "GatewayRuntime"], ASGIApp | None]]]
    inner: ASGIApp
    holder: Holder


def upstream_policy(service: ServiceConfig, route: RouteConfig | None = None) -> UpstreamPolicy:
    retry = service.retry
    total = service.timeouts.total
    if route is not None and route.timeout is not None:
        total = route.timeout
    return UpstreamPolicy(
        service=service.name,
        connect_timeout=service.timeouts.connect,
        read_timeout=service.timeouts.read,
        total_timeout=total,
        retry=RetryPolicy(
            attempts=retry.attempts,
            on_statuses=frozenset(retry.on_statuses),
            on_connect_errors=retry.on_connect_errors,
            backoff_base=retry.backoff_base,
            backoff_max=retry.backoff_max,
            budget_ratio=retry.budget_ratio,
            budget_min_per_second=retry.budget_min_per_second,
        ),
        preserve_host=route.preserve_host if route is not None else False,
        pool_max_connections=service.pool.max_connections,
    )


class GatewayRuntime:
    def __init__(
        self,
        config: GatewayConfig,
        *,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
        registry_store: RegistryStore | None = None,
        config_source: Callable[[], GatewayConfig] | None = None,
    ) -> None:
        self.clock = clock
        self._rng = rng if rng is not None else random.Random()
        store = registry_store
        if store is None:
            store = registry_store_from_url(config.storage.uri_for("registry"), prefix=config.storage.prefix)
        self.registry = Registry.from_config(config, store=store)
        self.tracker = HealthTracker(clock=clock)
        # Fixed for the process: the proxy and the middlewares hold it from start-up (a reload reports
        # `trusted_proxies` as needing a restart rather than trusting different peers in different layers).
        self.resolver = ClientAddressResolver(trusted_proxies=config.trusted_proxies)
        self.config_source = config_source  # re-reads the config file for an admin reload without a body
        self.started = False
        self.checker: ActiveHealthChecker | None = None  # set by the app's lifespan
        self.breaker_states: BreakerStatesHook | None = None
        self.rate_limit_policies: RateLimitPoliciesHook | None = None
        # Filled by stack.py's factories while the middleware stack is built, and replaced together with the
        # stack when a reload rebuilds it: the proxy's outgoing header hooks (identity, traceparent; the list
        # object is the proxy's, its content is replaced), the `/metrics` endpoint the edge answers, and the
        # resources the layers opened (storages, clients, key stores), closed by the app's lifespan.
        self.header_hooks: list[Callable[[Scope, list[tuple[bytes, bytes]]], list[tuple[bytes, bytes]]]] = []
        self.metrics_endpoint: ASGIApp | None = None
        self.layers: list[str] = []  # the stack's layers, outermost first
        self.resources = ResourcePool()
        self.mounts: list[Mount] = []  # where the stacks are served, set by create_app
        self._apply(config)

    def __repr__(self) -> str:
        return f"GatewayRuntime(services={self.registry.services()}, routes={len(self.router.routes)})"

    def _apply(self, config: GatewayConfig) -> None:
        self.registry.replace_static(static_targets(config))
        services = {service.name: service for service in config.services}
        self.tracker.sync(
            {name: self.registry.targets(name) for name in services},
            {
                name: OutlierPolicy.from_config(
                    service.outlier_detection, ewma_decay=service.load_balancing.ewma_decay
                )
                for name, service in services.items()
            },
        )
        selectors: dict[tuple[str, str | None], Backend] = {}

        def backend(service: str, version: str | None) -> Backend:
            found = selectors.get((service, version))
            if found is None:
                health = self.tracker.service(service)
                balancer = create_balancer(
                    services[service].load_balancing, health, resolver=self.resolver, rng=self._rng
                )
                found = Backend(service, version, ServiceSelector(health, balancer, version=version), health)
                selectors[(service, version)] = found
            return found

        router = build_router(
            config,
            backend,
            lambda service, route: upstream_policy(services[service], route),
            resolver=self.resolver,
            rng=self._rng,
        )
        self.check_policies = {
            name: ActiveCheckPolicy.from_config(service.health_check) for name, service in services.items()
        }
        self.registry_generation = self.registry.generation
        # Swap last, in one assignment each: requests in flight keep the objects they already hold.
        self.router: Router = router
        self.config = config

    def reload(self, config: GatewayConfig) -> None:
        """Adopt an already validated config (services, targets, routes, upstream policies). The caller
        rebuilds the middleware stack (`mounts.build_stacks`) and commits it right after, with no await."""
        self._apply(config)
        if self.checker is not None:
            self.checker.set_policies(self.check_policies)

    def sync_targets(self) -> None:
        """Tell the health tracker about registry changes (dynamic registration, store refresh)."""
        if self.registry.generation == self.registry_generation:
            return
        for name in self.registry.services():
            self.tracker.service(name).sync(self.registry.targets(name))
        self.registry_generation = self.registry.generation

    async def refresh_registry(self) -> None:
        await self.registry.refresh()
        self.sync_targets()

    def unready_services(self) -> list[str]:
        """Required services that have no healthy target right now."""
        return [
            service.name
            for service in self.config.services
            if service.required and not self.tracker.service(service.name).healthy()
        ]
