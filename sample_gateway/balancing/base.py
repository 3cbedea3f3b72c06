"""The interface every balancing strategy implements, and what they may read about targets."""

from collections.abc import Sequence
from typing import Protocol

from nexus_middleware.types import Scope
from sample_gateway.contracts import Target

__all__ = ["Balancer", "LoadStats"]


class LoadStats(Protocol):
    """Live figures the health tracker keeps from the proxy's attempt reports."""

    def in_flight(self, target: Target) -> int: ...

    def latency(self, target: Target) -> float: ...


class Balancer(Protocol):
    """Picks one of `candidates` (healthy, not yet tried, never empty) for the request in `scope`."""

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target: ...
