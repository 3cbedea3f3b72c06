"""resources.py: what the stack's factories open is reused by key across builds and closed once unused."""

import asyncio
import gc
from collections.abc import Callable

from sample_gateway.resources import ResourcePool


class Resource:
    def __init__(self, name: str, closed: list[str]) -> None:
        self.name, self._closed = name, closed

    async def aclose(self) -> None:
        self._closed.append(self.name)


class Stack:
    """Stands for a served stack's outermost layer: running requests hold it."""


def build(pool: ResourcePool, closed: list[str], *names: str) -> frozenset[object]:
    pool.begin()
    for name in names:
        pool.get(name, opener(name, closed), close=Resource.aclose)
    return pool.end()


def opener(name: str, closed: list[str]) -> Callable[[], Resource]:
    return lambda: Resource(name, closed)


async def test_a_key_is_opened_once_and_reused_by_the_next_build() -> None:
    pool, closed = ResourcePool(), list[str]()
    pool.begin()
    first = pool.get("redis", lambda: Resource("redis", closed), close=Resource.aclose)
    pool.commit(pool.end(), [])
    pool.begin()
    again = pool.get("redis", lambda: Resource("other", closed), close=Resource.aclose)
    pool.commit(pool.end(), [Stack()])
    assert again is first and pool.open_keys() == ["redis"]
    await pool.aclose()
    assert closed == ["redis"]


async def test_a_dropped_key_is_closed_once_the_replaced_stack_is_gone() -> None:
    pool, closed = ResourcePool(), list[str]()
    pool.commit(build(pool, closed, "kept", "dropped"), [])
    running = Stack()  # a request still running on the old stack holds it
    pool.commit(build(pool, closed, "kept", "added"), [running])
    await asyncio.sleep(0)
    assert closed == [] and sorted(map(str, pool.open_keys())) == ["added", "dropped", "kept"]
    del running
    gc.collect()
    for _ in range(3):  # the release is handed to the loop, then the close runs as a task
        await asyncio.sleep(0)
    assert closed == ["dropped"] and sorted(map(str, pool.open_keys())) == ["added", "kept"]
    await pool.aclose()
    assert sorted(closed) == ["added", "dropped", "kept"]


async def test_a_build_that_is_not_served_closes_only_what_it_opened() -> None:
    pool, closed = ResourcePool(), list[str]()
    pool.commit(build(pool, closed, "served"), [])
    pool.discard(build(pool, closed, "served", "new"))
    for _ in range(2):
        await asyncio.sleep(0)
    assert closed == ["new"] and pool.open_keys() == ["served"]
    await pool.aclose()


def test_outside_the_event_loop_releases_wait_for_shutdown() -> None:
    pool, closed = ResourcePool(), list[str]()
    pool.commit(build(pool, closed, "a"), [])
    pool.commit(build(pool, closed, "b"), [])  # nothing served the first generation: released at once
    pool.discard(build(pool, closed, "c"))
    assert closed == [] and pool.open_keys() == ["b"]
    asyncio.run(pool.aclose())
    assert sorted(closed) == ["a", "b", "c"] and "ResourcePool(" in repr(pool)
