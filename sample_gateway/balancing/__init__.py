"""Load balancing: one small module per strategy behind `Balancer`, and the `TargetSelector` the proxy calls.

`ServiceSelector` keeps, per service (and version, for version routing), the healthy targets the health
tracker reports, removes those already tried, and lets the service's strategy pick one.
"""

import random
from collections.abc import Callable

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.types import Scope
from sample_gateway.balancing.base import Balancer, LoadStats
from sample_gateway.balancing.consistent_hash import ConsistentHash
from sample_gateway.balancing.keys import key_extractor
from sample_gateway.balancing.least_connections import LeastConnections
from sample_gateway.balancing.power_of_two import PowerOfTwoChoices
from sample_gateway.balancing.round_robin import RoundRobin
from sample_gateway.balancing.weighted import SmoothWeightedRoundRobin
from sample_gateway.config import LoadBalancingConfig
from sample_gateway.contracts import Target
from sample_gateway.health import ServiceHealth

__all__ = [
    "Balancer",
    "ConsistentHash",
    "LeastConnections",
    "LoadStats",
    "PowerOfTwoChoices",
    "RoundRobin",
    "ServiceSelector",
    "SmoothWeightedRoundRobin",
    "create_balancer",
]


def create_balancer(
    config: LoadBalancingConfig,
    stats: LoadStats,
    *,
    resolver: ClientAddressResolver | None = None,
    rng: random.Random | None = None,
) -> Balancer:
    strategy = config.strategy
    if strategy == "round_robin":
        return RoundRobin()
    if strategy == "weighted_round_robin":
        return SmoothWeightedRoundRobin()
    if strategy == "least_connections":
        return LeastConnections(stats)
    if strategy == "power_of_two":
        return PowerOfTwoChoices(stats, rng=rng)
    key = key_extractor(config.hash_on, config.hash_key, resolver=resolver)
    return ConsistentHash(key, virtual_nodes=config.virtual_nodes)


class ServiceSelector:
    """The `TargetSelector` of one service, optionally restricted to one version of it."""

    __slots__ = ("_balancer", "_filtered", "_filtered_for", "_health", "_version_filter", "version")

    def __init__(self, health: ServiceHealth, balancer: Balancer, *, version: str | None = None) -> None:
        self._health = health
        self._balancer = balancer
        self.version = version
        self._version_filter: Callable[[Target], bool] | None = (
            None if version is None else (lambda target: target.version == version)
        )
        self._filtered_for: tuple[Target, ...] | None = None
        self._filtered: tuple[Target, ...] = ()

    def __repr__(self) -> str:
        return f"ServiceSelector({self._health.service!r}, version={self.version!r}, {self._balancer!r})"

    @property
    def service(self) -> str:
        return self._health.service

    def candidates(self) -> tuple[Target, ...]:
        healthy = self._health.healthy()
        if self._version_filter is None:
            return healthy
        if healthy is not self._filtered_for:
            self._filtered = tuple(filter(self._version_filter, healthy))
            self._filtered_for = healthy
        return self._filtered

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        candidates = self.candidates()
        if exclude:
            candidates = tuple(target for target in candidates if target.id not in exclude)
        if not candidates:
            return None
        return self._balancer.choose(candidates, scope)
