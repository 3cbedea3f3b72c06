"""Round robin: each healthy target in turn, weights ignored."""

import itertools
from collections.abc import Sequence

from nexus_middleware.types import Scope
from sample_gateway.contracts import Target

__all__ = ["RoundRobin"]


class RoundRobin:
    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def __repr__(self) -> str:
        return "RoundRobin()"

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target:
        return candidates[next(self._counter) % len(candidates)]
