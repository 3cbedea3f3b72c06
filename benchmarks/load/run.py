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
    python -m benchmarks.load.run --gateway-app sample_gateway.app:bench_app

It reports figures; it never asserts them.
"""

import argparse
import contextlib
import importlib.util
import json
import os
import re
import shutil
import socket
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _server(factory: str, upstream: str | None) -> Iterator[str]:
    port = _free_port()
    env = dict(os.environ)
    if upstream is not None:
        env["NEXUS_BENCH_UPSTREAM"] = upstream
    process = subprocess.Popen(
        [
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
        ],
        env=env,
    )
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
        yield url
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
        "| row | requests/s | p50 ms | p99 ms | errors | vs upstream | vs minimal proxy, same client |",
        "|---|---:|---:|---:|---:|---:|---:|",
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
        lines.append(
            f"| {result.row.label} | {result.requests_per_second:,.0f} | {result.p50_ms:.2f} | "
            f"{result.p99_ms:.2f} | {result.errors} | {vs_upstream} | {vs_minimal} |"
        )
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.connections = 1.0, 0.5, 16
    if not 0 < args.duration <= 120 or not 0 < args.connections <= 1024:
        parser.error("duration must be in (0, 120] seconds and connections in (0, 1024]")
    generator = args.generator
    if generator == "auto":
        generator = "wrk" if shutil.which("wrk") else "python"
    print(
        f"# load: {generator}, {args.connections} connections, {args.duration:g} s per row "
        f"(+{args.warmup:g} s warm-up), python {sys.version.split()[0]}",
        flush=True,
    )
    results: list[Result] = []
    with _server(f"{APPS}:upstream", None) as upstream_url:
        for row in _rows(args.quick, args.gateway_app):
            context = (
                contextlib.nullcontext(upstream_url)
                if row.library is None
                else _server(row.factory, upstream_url)
            )
            with context as url:
                target = url + "/api/items/42"
                if args.warmup > 0:
                    _load(target, connections=args.connections, duration=args.warmup, generator=generator)
                figures = _load(
                    target, connections=args.connections, duration=args.duration, generator=generator
                )
            result = Result(
                row,
                figures["requests_per_second"],
                figures["p50_ms"],
                figures["p99_ms"],
                int(figures.get("errors", 0)),
            )
            results.append(result)
            print(
                f"{row.label:<36} {result.requests_per_second:9,.0f} req/s   p50 {result.p50_ms:7.2f} ms   "
                f"p99 {result.p99_ms:7.2f} ms   errors {result.errors}",
                flush=True,
            )
    print()
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
