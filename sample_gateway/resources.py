"""The stateful resources the stack's factories open, kept across stack rebuilds and closed once unused.

A factory asks `runtime.resources.get(key, open, close=...)` for what it needs, `key` naming what configures
the resource (a storage URI, a JWKS URL, the metric registry). A reload that rebuilds the stack gets the same
instances back for unchanged keys, so rate-limit counters, breaker states, JWKS caches and API-key stores
survive it; a key the new config no longer asks for is closed.

Each build is one generation. A resource is closed when no served generation uses it any more: a generation
a reload replaced is released when the stacks it served are gone, that is when their last in-flight request
has finished. That moment is found without any per-request cost, by a weak reference on each replaced
stack's outermost layer (every running request holds it through its coroutine frames). Whatever is left is
closed at shutdown (`aclose`, called by the app's lifespan).
"""

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

__all__ = ["ResourcePool"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(eq=False, slots=True)
class _Entry:
    value: Any
    close: Callable[[], Awaitable[None]] | None
    users: int = 0  # served generations using it


class _Replaced:
    """A replaced generation waiting for the stacks it served to be gone."""

    __slots__ = ("keys", "remaining")

    def __init__(self, keys: frozenset[Hashable], remaining: int) -> None:
        self.keys = keys
        self.remaining = remaining


class ResourcePool:
    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}
        self._building: set[Hashable] | None = None
        self._served: frozenset[Hashable] = frozenset()
        self._unclosed: list[_Entry] = []  # released without a running loop: closed at shutdown
        self._closing: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:
        return f"ResourcePool(open={sorted(map(repr, self._entries))})"

    def get(
        self, key: Hashable, open: Callable[[], T], *, close: Callable[[T], Awaitable[None]] | None = None
    ) -> T:
        """The resource for `key`, opened by `open()` the first time. `close(resource)` releases it."""
        entry = self._entries.get(key)
        if entry is None:
            value = open()
            closer = None if close is None else _bind(close, value)
            entry = self._entries[key] = _Entry(value, closer)
        if self._building is not None:
            self._building.add(key)
        return cast(T, entry.value)

    def open_keys(self) -> list[Hashable]:
        """The keys of the resources open now (for the tests and the curious)."""
        return list(self._entries)

    def begin(self) -> None:
        """Start a build: the keys asked for from now on make up its generation."""
        self._building = set()

    def end(self) -> frozenset[Hashable]:
        """End the build; its keys, for `commit` (served) or `discard` (not served)."""
        keys = frozenset(self._building or ())
        self._building = None
        return keys

    def commit(self, keys: frozenset[Hashable], replaced: Sequence[object]) -> None:
        """Serve the generation `keys`. The one it replaces is released once every stack in `replaced` (the
        outermost layers it served) is gone; at shutdown at the latest."""
        for key in keys:
            self._entries[key].users += 1
        previous, self._served = self._served, keys
        if not previous:
            return
        if not replaced:
            self._release(previous)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # committed outside the event loop: nothing can tell when it drains
            return
        waiting = _Replaced(previous, len(replaced))
        for stack in replaced:
            try:
                weakref.finalize(stack, self._gone, loop, waiting)
            except TypeError:  # not weakly referable: kept until shutdown
                return

    def discard(self, keys: Iterable[Hashable]) -> None:
        """Close what a build that is not served opened and no served generation uses."""
        self._close_soon([self._entries.pop(key) for key in keys if self._entries[key].users == 0])

    def _gone(self, loop: asyncio.AbstractEventLoop, waiting: _Replaced) -> None:
        # A weakref callback runs wherever the last reference went: the release runs on the loop's thread.
        waiting.remaining -= 1
        if waiting.remaining == 0 and not loop.is_closed():
            loop.call_soon_threadsafe(self._release, waiting.keys)

    def _release(self, keys: frozenset[Hashable]) -> None:
        unused = []
        for key in keys:
            entry = self._entries.get(key)
            if entry is None:  # closed at shutdown already
                continue
            entry.users -= 1
            if entry.users == 0:
                unused.append(self._entries.pop(key))
        self._close_soon(unused)

    def _close_soon(self, entries: list[_Entry]) -> None:
        closers = [entry for entry in entries if entry.close is not None]
        if not closers:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._unclosed.extend(closers)
            return
        task = loop.create_task(_close(closers), name="nexus-close-resources")
        self._closing.add(task)  # the loop holds tasks weakly
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        """Close everything (shutdown): what is open, and what is still being closed."""
        if self._closing:
            await asyncio.gather(*self._closing)
        entries = [*self._unclosed, *self._entries.values()]
        self._unclosed.clear()
        self._entries.clear()
        self._served = frozenset()
        await _close(entries)


def _bind(close: Callable[[T], Awaitable[None]], value: T) -> Callable[[], Awaitable[None]]:
    return lambda: close(value)


async def _close(entries: Iterable[_Entry]) -> None:
    for entry in entries:
        if entry.close is None:
            continue
        try:
            await entry.close()
        except Exception:  # one failing close must not keep the others open
            logger.exception("closing %r failed", entry.value)
