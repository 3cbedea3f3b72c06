"""Power of two choices on latency: draw two targets at random, keep the one with the lower cost.

The cost is the decayed (EWMA) latency times one plus the in-flight count, as in Finagle's peak-EWMA: a slow
target or a busy one loses the draw, and a target never measured costs nothing so it is tried quickly.
"""

import random
from collections.abc import Sequence

from nexus_middleware.types import Scope
from sample_gateway.balancing.base import LoadStats
from sample_gateway.contracts import Target

__all__ = ["PowerOfTwoChoices"]


class PowerOfTwoChoices:
    __slots__ = ("_rng", "_stats")

    def __init__(self, stats: LoadStats, *, rng: random.Random | None = None) -> None:
        self._stats = stats
        self._rng = rng if rng is not None else random.Random()

    def __repr__(self) -> str:
        return "PowerOfTwoChoices()"

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        first = self._rng.randrange(count)
        second = self._rng.randrange(count - 1)
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        return a if self._cost(a) <= self._cost(b) else b

    def _cost(self, target: Target) -> float:
        return self._stats.latency(target) * (self._stats.in_flight(target) + 1) / target.weight
