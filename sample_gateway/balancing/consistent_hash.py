"""Consistent hashing on a request key (client address, header or cookie), with virtual nodes.

Each target owns `virtual_nodes * weight` points on a 64-bit ring; a key goes to the owner of the first point
at or after its hash. When a target leaves, only its keys move. Requests without a key are spread round robin.
"""

import bisect
import hashlib
import itertools
from collections.abc import Callable, Sequence

from nexus_middleware.types import Scope
from sample_gateway.contracts import Target

__all__ = ["ConsistentHash", "hash_key"]


def hash_key(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


class ConsistentHash:
    __slots__ = ("_counter", "_key", "_ring", "_ring_for", "_virtual_nodes")

    def __init__(self, key: Callable[[Scope], str | None], *, virtual_nodes: int = 160) -> None:
        if virtual_nodes < 1:
            raise ValueError("virtual_nodes must be positive")
        self._key = key
        self._virtual_nodes = virtual_nodes
        self._counter = itertools.count()
        self._ring_for: Sequence[Target] | None = None
        self._ring: tuple[list[int], list[Target]] = ([], [])

    def __repr__(self) -> str:
        return f"ConsistentHash(virtual_nodes={self._virtual_nodes})"

    def choose(self, candidates: Sequence[Target], scope: Scope) -> Target:
        key = self._key(scope)
        if key is None:
            return candidates[next(self._counter) % len(candidates)]
        if candidates is not self._ring_for:
            self._ring = self._build(candidates)
            self._ring_for = candidates
        points, owners = self._ring
        index = bisect.bisect_left(points, hash_key(key))
        return owners[index % len(owners)]

    def _build(self, candidates: Sequence[Target]) -> tuple[list[int], list[Target]]:
        entries = sorted(
            (hash_key(f"{target.id}#{replica}"), target.id, target)
            for target in candidates
            for replica in range(self._virtual_nodes * target.weight)
        )
        return [point for point, _, _ in entries], [target for _, _, target in entries]
