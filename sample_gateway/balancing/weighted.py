"""Smooth weighted round robin (nginx): weights honoured, picks interleaved (5:1:1 -> a a b a c a a).

Each pick adds every candidate's weight to its running score, takes the highest, and subtracts the total
from the winner. Over any window of `sum(weights)` picks each target gets exactly its weight.
"""

from collections.abc import Sequence

from nexus_middleware.types import Scope
from sample_gateway.contracts import Target

__all__ = ["SmoothWeightedRoundRobin"]


class SmoothWeightedRoundRobin:
    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, int] = {}

    def __repr__(self) -> str:
        return "SmoothWeightedRoundRobin()"

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target:
        current = self._current
        if len(current) > 4 * len(candidates) + 16:
            # Targets come and go; drop scores of those no longer offered so the dict stays small.
            offered = {target.id for target in candidates}
            for target_id in [key for key in current if key not in offered]:
                del current[target_id]
        total = 0
        best = candidates[0]
        best_score = -(2**62)
        for target in candidates:
            score = current.get(target.id, 0) + target.weight
            current[target.id] = score
            total += target.weight
            if score > best_score:
                best, best_score = target, score
        current[best.id] = best_score - total
        return best
