"""Injectable clocks: every time-dependent part of the suite takes one, so tests never sleep."""

import time
from datetime import UTC, datetime
from typing import Protocol, runtime_checkable

__all__ = ["Clock", "ManualClock", "SYSTEM_CLOCK", "SystemClock", "utc_timestamp"]


def utc_timestamp(epoch: float) -> str:
    """`epoch` as the suite's log and audit records write it: ISO 8601, UTC, milliseconds, `Z`."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@runtime_checkable
class Clock(Protocol):
    """A source of time: `monotonic()` for durations and deadlines, `time()` for wall-clock epochs."""

    def monotonic(self) -> float:
        """Seconds on a clock that never goes backwards; only differences are meaningful."""
        ...

    def time(self) -> float:
        """Seconds since the Unix epoch (wall clock), for token expiry and header values."""
        ...


class SystemClock:
    """The real clocks of the process."""

    __slots__ = ()

    def monotonic(self) -> float:
        return time.monotonic()

    def time(self) -> float:
        return time.time()

    def __repr__(self) -> str:
        return "SystemClock()"


SYSTEM_CLOCK = SystemClock()


class ManualClock:
    """A clock that moves only when told to; both readings advance together."""

    __slots__ = ("_monotonic", "_wall")

    def __init__(self, *, monotonic: float = 1_000.0, wall: float = 1_700_000_000.0) -> None:
        self._monotonic = monotonic
        self._wall = wall

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock cannot go backwards")
        self._monotonic += seconds
        self._wall += seconds

    def __repr__(self) -> str:
        return f"ManualClock(monotonic={self._monotonic!r}, wall={self._wall!r})"
