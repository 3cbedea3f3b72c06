"""Load benchmark of the data plane: upstream, minimal proxies per client library, the gateway's proxy.

Every server is its own uvicorn process on loopback; the load comes from wrk when installed, else from
`benchmarks/load/loadgen.py` in its own process. All rows run in one invocation, so their ratios compare
like with like on this (shared, noisy) machine:

  (a) the upstream directly;
  (b) a minimal raw-ASGI proxy with each client library (aiohttp, httpx2 when installed, httpx);
  (c) the gateway's `ReverseProxy` in a minimal app, per client kind;
  (d) with `--gateway-app module:factory`, the full gateway app (a `uvicorn --factory` target that reads
      the upstream URL from `NEXUS_BENCH_UPSTREAM` and proxies every path to it).

    python -m benchmarks.load.run                       # 64 connections, 10 s per row
    python -m benchmarks.load.run --quick               # a few seconds: what CI runs so it cannot rot
    python -m benchmarks.load.run --gateway-app sample_gateway.app:bench_app --rounds 3
    python -m benchmarks.load.run --loop uvloop --http httptools   # uvicorn's compiled event loop and parser

Every server starts once; with `--rounds N` the rows are measured N times in turn and each figure is the
median of its rounds, so a burst of load from elsewhere on the machine hits one round of every row rather
than all rounds of one. Next to requests/s it reports the CPU time each server process spent per request
(utime + stime from /proc, Linux only): on a saturated machine throughput is its inverse, and it moves far
less between runs than requests/s. It reports figures; it never asserts them.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

APPS = "benchmarks.load.apps"


@dataclass(frozen=True)
class Row:
    label: str
    factory: str
    library: str | None  # the client library, to compare with the minimal proxy on the same one


@dataclass(frozen=True)
class Result:
    row: Row
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float  # nan where /proc is missing, and for the upstream row's shared server


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (nan elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def uvicorn_command(factory: str, port: int, uvicorn_options: list[str]) -> list[str]:
    """How every benchmark server runs: a `uvicorn --factory` target on loopback, no access log."""
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        factory,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
        "--no-access-log",
        "--no-proxy-headers",
        *uvicorn_options,
    ]


@contextlib.contextmanager
def _server(factory: str, upstream: str | None, uvicorn_options: list[str]) -> Iterator[Server]:
    port = _free_port()
    env = dict(os.environ)
    if upstream is not None:
        env["NEXUS_BENCH_UPSTREAM"] = upstream
    process = subprocess.Popen(uvicorn_command(factory, port, uvicorn_options), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{factory} exited with {process.returncode}")
            try:
                with urllib.request.urlopen(url + "/ready", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{factory} did not answer within 30 s")
            time.sleep(0.1)  # a script's setup loop, not request-path code
        yield Server(url, process.pid)
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _wrk_millis(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if match is None:
        return float("nan")
    return float(match.group(1)) * _UNITS[match.group(2)]


def _load(url: str, *, connections: int, duration: float, generator: str) -> dict[str, float]:
    if generator == "wrk":
        output = subprocess.run(
            ["wrk", "-t2", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", url],
            capture_output=True,
            text=True,
            timeout=duration + 60,
            check=True,
        ).stdout
        rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
        p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
        p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
        non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
        socket_errors = re.search(
            r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
        )
        errors = int(non_2xx.group(1)) if non_2xx else 0
        if socket_errors:
            errors += sum(int(group) for group in socket_errors.groups())
        return {
            "requests_per_second": float(rps.group(1)) if rps else float("nan"),
            "p50_ms": _wrk_millis(p50.group(1)) if p50 else float("nan"),
            "p99_ms": _wrk_millis(p99.group(1)) if p99 else float("nan"),
            "errors": errors,
        }
    command = [sys.executable, "-m", "benchmarks.load.loadgen", url]
    command += ["--connections", str(connections), "--duration", str(duration)]
    output = subprocess.run(command, capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    result: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return result


def _rows(quick: bool, gateway_app: str | None) -> list[Row]:
    rows = [Row("(a) upstream direct", f"{APPS}:upstream", None)]
    libraries = ["aiohttp"] if quick else ["aiohttp", "httpx2", "httpx"]
    for library in libraries:
        if importlib.util.find_spec(library) is None:
            print(f"skipping the minimal {library} proxy: {library} is not installed", file=sys.stderr)
            continue
        rows.append(Row(f"(b) minimal proxy, {library}", f"{APPS}:minimal_{library}", library))
    for kind in ["aiohttp"] if quick else ["aiohttp", "httpx"]:
        rows.append(Row(f"(c) gateway proxy only, {kind}", f"{APPS}:gateway_proxy_{kind}", kind))
    if gateway_app:
        rows.append(Row("(d) gateway, default stack", gateway_app, "aiohttp"))
    return rows


def _table(results: list[Result]) -> str:
    upstream = next((r for r in results if r.row.library is None), None)
    minimal = {r.row.library: r for r in results if r.row.label.startswith("(b)")}
    lines = [
        "| row | requests/s | p50 ms | p99 ms | errors | vs upstream | vs minimal proxy, same client "
        "| CPU µs/request | minimal's CPU/request over this row's |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        vs_upstream = (
            f"{result.requests_per_second / upstream.requests_per_second:.2f}" if upstream else "n/a"
        )
        base = minimal.get(result.row.library)
        vs_minimal = (
            f"{result.requests_per_second / base.requests_per_second:.2f}"
            if base is not None and not result.row.label.startswith(("(a)", "(b)"))
            else ""
        )
        cpu = result.cpu_us_per_request
        cpu_base = base.cpu_us_per_request if base is not None else float("nan")
        cpu_ratio = f"{cpu_base / cpu:.2f}" if vs_minimal and cpu_base == cpu_base and cpu == cpu else ""
        lines.append(
            f"| {result.row.label} | {result.requests_per_second:,.0f} | {result.p50_ms:.2f} | "
            f"{result.p99_ms:.2f} | {result.errors} | {vs_upstream} | {vs_minimal} | "
            f"{'' if cpu != cpu else f'{cpu:,.0f}'} | {cpu_ratio} |"
        )
    return "\n".join(lines)


def _median(row: Row, results: list[Result]) -> Result:
    middle = statistics.median
    return Result(
        row,
        middle([r.requests_per_second for r in results]),
        middle([r.p50_ms for r in results]),
        middle([r.p99_ms for r in results]),
        sum(r.errors for r in results),
        middle([r.cpu_us_per_request for r in results]),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="1 s rows, 16 connections, aiohttp only")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of load per row")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of unmeasured load per row")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--generator", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--gateway-app", help="module:factory of the gateway app for row (d)")
    parser.add_argument("--rounds", type=int, default=1, help="measure every row this many times, in turn")
    parser.add_argument(
        "--loop", choices=["auto", "asyncio", "uvloop"], default="auto", help="uvicorn --loop"
    )
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto", help="uvicorn --http")
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.connections = 1.0, 0.5, 16
    if not 0 < args.duration <= 120 or not 0 < args.connections <= 1024 or not 0 < args.rounds <= 20:
        parser.error("duration must be in (0, 120] s, connections in (0, 1024] and rounds in (0, 20]")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    uvicorn_options = ["--loop", args.loop, "--http", args.http]
    print(
        f"# load: {generator}, {args.connections} connections, {args.duration:g} s per row "
        f"(+{args.warmup:g} s warm-up), {args.rounds} round(s), python {sys.version.split()[0]}, "
        f"uvicorn --loop {args.loop} --http {args.http}",
        flush=True,
    )
    rows = _rows(args.quick, args.gateway_app)
    measured: dict[Row, list[Result]] = {row: [] for row in rows}
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(_server(f"{APPS}:upstream", None, uvicorn_options))
        servers = {
            row: upstream
            if row.library is None
            else stack.enter_context(_server(row.factory, upstream.url, uvicorn_options))
            for row in rows
        }
        for round_number in range(1, args.rounds + 1):
            for row in rows:
                server = servers[row]
                target = server.url + "/api/items/42"
                if args.warmup > 0:
                    _load(target, connections=args.connections, duration=args.warmup, generator=generator)
                cpu_before = _cpu_seconds(server.pid)
                figures = _load(
                    target, connections=args.connections, duration=args.duration, generator=generator
                )
                cpu = _cpu_seconds(server.pid) - cpu_before
                served = figures["requests_per_second"] * args.duration
                result = Result(
                    row,
                    figures["requests_per_second"],
                    figures["p50_ms"],
                    figures["p99_ms"],
                    int(figures.get("errors", 0)),
                    cpu / served * 1e6 if served > 0 and row.library is not None else float("nan"),
                )
                measured[row].append(result)
                print(
                    f"round {round_number}  {row.label:<36} {result.requests_per_second:9,.0f} req/s   "
                    f"p50 {result.p50_ms:7.2f} ms   p99 {result.p99_ms:7.2f} ms   errors {result.errors}   "
                    f"CPU {result.cpu_us_per_request:6.0f} µs/request",
                    flush=True,
                )
    results = [_median(row, measured[row]) for row in rows]
    print()
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
