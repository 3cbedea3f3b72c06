"""Least connections: the target with the fewest in-flight requests relative to its weight.

Ties (an idle pool) rotate, so light traffic still spreads evenly instead of piling on the first target.
"""

import itertools
from collections.abc import Sequence

from nexus_middleware.types import Scope
from sample_gateway.balancing.base import LoadStats
from sample_gateway.contracts import Target

__all__ = ["LeastConnections"]


class LeastConnections:
    __slots__ = ("_counter", "_stats")

    def __init__(self, stats: LoadStats) -> None:
        self._stats = stats
        self._counter = itertools.count()

    def __repr__(self) -> str:
        return "LeastConnections()"

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target:
        count = len(candidates)
        start = next(self._counter) % count
        best = candidates[start]
        best_load = self._stats.in_flight(best) / best.weight
        for offset in range(1, count):
            target = candidates[(start + offset) % count]
            load = self._stats.in_flight(target) / target.weight
            if load < best_load:
                best, best_load = target, load
        return best
