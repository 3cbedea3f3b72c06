"""A small closed-loop HTTP load generator for when wrk is not installed; runs in its own process.

`python -m benchmarks.load.loadgen URL --connections 64 --duration 5` prints one JSON line:
requests, errors, seconds, requests_per_second, p50_ms, p99_ms. Loopback only: anything but 127.0.0.1,
::1 or localhost is refused.
"""

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit

import aiohttp

LOOPBACK = {"127.0.0.1", "::1", "localhost"}


async def _worker(
    session: aiohttp.ClientSession, url: str, stop_at: float, latencies: list[float], errors: list[int]
) -> None:
    while time.perf_counter() < stop_at:
        began = time.perf_counter()
        try:
            async with session.get(url) as response:
                await response.read()
                if response.status >= 400:
                    errors[0] += 1
        except aiohttp.ClientError:
            errors[0] += 1
            continue
        latencies.append(time.perf_counter() - began)


async def run(url: str, connections: int, duration: float) -> dict[str, float]:
    connector = aiohttp.TCPConnector(limit=connections)
    latencies: list[float] = []
    errors = [0]
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as session:
        began = time.perf_counter()
        stop_at = began + duration
        await asyncio.gather(*(_worker(session, url, stop_at, latencies, errors) for _ in range(connections)))
        seconds = time.perf_counter() - began
    latencies.sort()

    def percentile(share: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(share * len(latencies)))] * 1000

    return {
        "requests": len(latencies),
        "errors": errors[0],
        "seconds": seconds,
        "requests_per_second": len(latencies) / seconds,
        "p50_ms": percentile(0.50),
        "p99_ms": percentile(0.99),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=5.0)
    args = parser.parse_args()
    if urlsplit(args.url).hostname not in LOOPBACK:
        parser.error("the load generator only targets loopback addresses")
    if not 0 < args.duration <= 120 or not 0 < args.connections <= 1024:
        parser.error("duration must be in (0, 120] seconds and connections in (0, 1024]")
    print(json.dumps(asyncio.run(run(args.url, args.connections, args.duration))))


if __name__ == "__main__":
    main()
