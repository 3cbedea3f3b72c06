"""Per-request overhead benchmarks, driven in-process with realistic ASGI messages.

Each benchmark runs `BATCH` requests per round through one app and records the round's time; the summary at
the end prints, per group, the median cost per request in microseconds and the overhead over the bare app,
next to the reference rows (a no-op pure-ASGI wrapper and Starlette's `BaseHTTPMiddleware`). Read the
ratios, not the absolute times: this machine is shared and noisy.

Run: `pytest benchmarks --no-cov`; CI runs a quick mode
(`--benchmark-max-time=0.05 --benchmark-min-rounds=3`).
"""

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

BATCH = 200
BASELINE = "bare app"

_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"application/json"),
    (b"accept-encoding", b"gzip, br"),
    (b"authorization", b"Bearer abc.def.ghi"),
    (b"x-request-id", b"0f6c1f0e-6a48-4e3a-9d6a-3e0b7a1d2c4f"),
    (b"traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    (b"content-type", b"application/json"),
    (b"content-length", b"2"),
    (b"x-forwarded-for", b"198.51.100.1"),
]


def make_http_scope(
    path: str = "/api/items/42", *, headers: list[tuple[bytes, bytes]] | None = None
) -> Scope:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": list(_HEADERS if headers is None else headers),
        "client": ("203.0.113.7", 51234),
        "server": ("127.0.0.1", 8000),
        "extensions": {},
    }


async def bare_app(scope: Scope, receive: Receive, send: Send) -> None:
    await receive()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": b"{}"})


class NoopMiddleware:
    """The reference pure-ASGI wrapper: what any middleware costs at minimum."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, send)


class Driver:
    """Runs `BATCH` requests through an app per call, on one event loop kept for the whole benchmark."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def runner(
        self, app: ASGIApp, scope_factory: Callable[[], Scope] = make_http_scope
    ) -> Callable[[], None]:
        body: Message = {"type": "http.request", "body": b"{}", "more_body": False}

        async def receive() -> Message:
            return body

        async def send(message: Message) -> None:
            return None

        async def batch() -> None:
            for _ in range(BATCH):
                await app(scope_factory(), receive, send)

        def run() -> None:
            self.loop.run_until_complete(batch())

        return run


@pytest.fixture
def driver() -> Iterator[Driver]:
    loop = asyncio.new_event_loop()
    try:
        yield Driver(loop)
    finally:
        loop.close()


def bench(benchmark: Any, driver: Driver, name: str, app: ASGIApp, **kwargs: Any) -> None:
    """Benchmark `app` under `name` in the "middleware" group (the summary reads these)."""
    benchmark.group = kwargs.pop("group", "middleware")
    benchmark.name = name
    benchmark.extra_info["label"] = name
    benchmark.extra_info["batch"] = BATCH
    run = driver.runner(app, **kwargs)
    run()  # warm caches and lazy initialisation before timing
    benchmark.pedantic(run, rounds=kwargs.get("rounds", 20), iterations=1, warmup_rounds=1)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups: dict[str, dict[str, float]] = {}
    for item in session.benchmarks:
        label = item.extra_info.get("label")
        batch = item.extra_info.get("batch")
        if not label or not batch or not item.stats:
            continue
        groups.setdefault(item.group or "", {})[label] = item.stats.median / batch * 1e6
    for group, rows in sorted(groups.items()):
        baseline = rows.get(BASELINE)
        noop = rows.get("no-op pure-ASGI wrapper")
        terminalreporter.write_sep("-", f"per-request cost, group {group!r} (median of rounds of {BATCH})")
        noop_overhead = None if baseline is None or noop is None else noop - baseline
        for label, micros in sorted(rows.items(), key=lambda item: item[1]):
            line = f"{label:<48} {micros:8.2f} µs/request"
            if baseline is not None:
                overhead = micros - baseline
                line += f"   +{overhead:7.2f} µs over bare"
                if noop_overhead and noop_overhead > 0:
                    line += f"   ({overhead / noop_overhead:5.1f}x the no-op wrapper)"
            terminalreporter.write_line(line)
