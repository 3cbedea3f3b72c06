"""Instructions per request of one load-benchmark server, counted by valgrind's callgrind.

Requests per second swing by a fifth or more on a shared machine; instruction counts repeat to about ±1%
whatever else runs, so they show what a change to the request path costs. They understate time where the
code is pure Python (an interpreted instruction is dearer than one of the C parsers'), so report both.

    python -m benchmarks.load.instructions sample_gateway.app:bench_app benchmarks.load.apps:minimal_aiohttp
    python -m benchmarks.load.instructions --loop uvloop --http httptools sample_gateway.app:bench_app

Each app runs under `valgrind --tool=callgrind` as a `uvicorn --factory` target in front of the raw
upstream (`benchmarks.load.apps:upstream`, not under valgrind). After `--warmup` keep-alive GETs, counting
is switched on for `--requests` more, spread over `--connections`, and the total is divided by them. Needs
valgrind (`apt-get install valgrind`). It reports figures; it never asserts them.
"""

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from benchmarks.load.run import APPS, _free_port, _server, uvicorn_command

_REQUEST = b"GET /api/items/42 HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: bench\r\nAccept: */*\r\n\r\n"


async def _drive(port: int, requests: int, connections: int) -> None:
    """`requests` keep-alive GETs over `connections`, each response read whole (Content-Length framed)."""

    async def one(count: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            for _ in range(count):
                writer.write(_REQUEST)
                await writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                if b" 200 " not in head.split(b"\r\n", 1)[0]:
                    raise RuntimeError(f"unexpected response: {head[:200]!r}")
                length = next(
                    int(line.split(b":", 1)[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                )
                await reader.readexactly(length)
        finally:
            writer.close()

    share, extra = divmod(requests, connections)
    await asyncio.gather(*(one(share + (index < extra)) for index in range(connections)))


def _total(path: Path) -> int:
    for line in path.read_text().splitlines():
        if line.startswith(("totals:", "summary:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def measure(
    factory: str,
    upstream_url: str,
    uvicorn_options: list[str],
    *,
    warmup: int,
    requests: int,
    connections: int,
) -> float:
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "callgrind.out"
        valgrind = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={output}"]
        process = subprocess.Popen(
            valgrind + uvicorn_command(factory, port, uvicorn_options),
            env=dict(os.environ, NEXUS_BENCH_UPSTREAM=upstream_url),
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 180  # a Python server starts slowly under valgrind
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{factory} exited with {process.returncode}")
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5):
                        break
                except OSError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"{factory} did not answer within 180 s") from None
                    time.sleep(0.5)  # a script's setup loop, not request-path code
            asyncio.run(_drive(port, warmup, connections))
            pid = str(process.pid)
            subprocess.run(["callgrind_control", "--instr=on", pid], check=True, capture_output=True)
            asyncio.run(_drive(port, requests, connections))
            subprocess.run(["callgrind_control", "--dump", pid], check=True, capture_output=True)
            dumps = sorted(Path(folder).glob("callgrind.out.*"))
            if not dumps:
                raise RuntimeError("callgrind wrote no dump")
            return _total(dumps[-1]) / requests
        finally:
            process.terminate()
            process.wait(timeout=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("factories", nargs="+", help="module:factory of each app to measure")
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--loop", choices=["auto", "asyncio", "uvloop"], default="auto")
    parser.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    args = parser.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("valgrind is not installed (apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.requests < args.connections or args.warmup < 0:
        parser.error("--requests must be at least --connections, and --warmup zero or more")
    options = ["--loop", args.loop, "--http", args.http]
    print(f"# callgrind, uvicorn --loop {args.loop} --http {args.http}, {args.requests} requests", flush=True)
    with _server(f"{APPS}:upstream", None, options) as upstream:
        for factory in args.factories:
            per_request = measure(
                factory,
                upstream.url,
                options,
                warmup=args.warmup,
                requests=args.requests,
                connections=args.connections,
            )
            print(f"{factory:<45} {per_request:12,.0f} instructions/request", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
