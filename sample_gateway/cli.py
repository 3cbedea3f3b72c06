"""`python -m sample_gateway`: the gateway from a config file, or the self-contained demo without one."""

import argparse
import asyncio
import contextlib
import logging
import socket
import sys
from collections.abc import Generator, Sequence
from pathlib import Path

import uvicorn

from nexus_middleware.types import ASGIApp
from sample_gateway.app import create_app
from sample_gateway.config import GatewayConfig, GatewayConfigError, export_config_path, load_config
from sample_gateway.demo import DemoUpstream, demo_config, demo_instructions
from sample_gateway.runtime import GatewayRuntime

__all__ = ["main"]

logger = logging.getLogger(__name__)


class _SecondaryServer(uvicorn.Server):
    """A server that leaves signals to the primary one; several share one event loop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def _server(app: ASGIApp, *, log_level: str, primary: bool) -> uvicorn.Server:
    # The proxy drops the upstream's Date and Server (`server_set_headers`): uvicorn sets the one Date a
    # response must carry (RFC 9110 §6.6.1), and no Server, so the gateway does not advertise its software.
    config = uvicorn.Config(
        app,
        log_level=log_level,
        lifespan="on" if primary else "auto",
        access_log=False,
        server_header=False,
    )
    return uvicorn.Server(config) if primary else _SecondaryServer(config)


async def _serve(
    primary: tuple[ASGIApp, socket.socket], others: Sequence[tuple[ASGIApp, socket.socket]], log_level: str
) -> None:
    servers = [(_server(app, log_level=log_level, primary=False), sock) for app, sock in others]
    tasks = [asyncio.create_task(server.serve(sockets=[sock])) for server, sock in servers]
    main = _server(primary[0], log_level=log_level, primary=True)
    try:
        await main.serve(sockets=[primary[1]])
    finally:
        for server, _ in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sample_gateway",
        description="The nexus reference gateway. Without --config: a self-contained demo on 127.0.0.1:8080.",
    )
    parser.add_argument("--config", type=Path, help="the gateway's YAML config file")
    parser.add_argument("--host", help="listen address (overrides listen.host)")
    parser.add_argument("--port", type=int, help="listen port (overrides listen.port)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--check", action="store_true", help="validate the config and exit")
    parser.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"]
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workers < 1:
        print("--workers must be 1 or more", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if args.config is None:
        if args.workers != 1 or args.check:
            print("the demo runs in one process; pass --config for --workers or --check", file=sys.stderr)
            return 2
        return _run_demo(args.host or "127.0.0.1", 8080 if args.port is None else args.port, args.log_level)
    try:
        config = load_config(args.config)
    except GatewayConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(f"{args.config}: valid ({len(config.services)} services, {len(config.routes)} routes)")
        return 0
    host = args.host or config.listen.host
    port = config.listen.port if args.port is None else args.port
    if args.workers > 1:
        if config.admin.enabled and config.admin.listen is not None:
            print(
                "error: admin.listen needs --workers 1; use admin.prefix with several workers",
                file=sys.stderr,
            )
            return 2
        if config.storage.uri_for("registry").startswith("memory"):
            print(
                "warning: with several workers and storage.registry in memory, a target registered through "
                "the admin API reaches only the worker that answered; use redis:// (docs/deployment.md)",
                file=sys.stderr,
            )
        export_config_path(args.config.resolve())
        uvicorn.run(
            "sample_gateway.app:create_app_from_environment",
            factory=True,
            host=host,
            port=port,
            workers=args.workers,
            lifespan="on",
            log_level=args.log_level,
            access_log=False,
            server_header=False,  # and uvicorn's Date on, as in _server
        )
        return 0
    return _run_config(config, args.config, host, port, args.log_level)


def _run_config(config: GatewayConfig, path: Path, host: str, port: int, log_level: str) -> int:
    runtime = GatewayRuntime(config, config_source=lambda: load_config(path))
    app = create_app(config, runtime=runtime)
    try:
        main_socket = _bind(host, port)
        others: list[tuple[ASGIApp, socket.socket]] = []
        if app.admin_listener is not None and config.admin.listen is not None:
            others.append((app.admin_listener, _bind(config.admin.listen.host, config.admin.listen.port)))
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 1
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((app, main_socket), others, log_level))
    return 0


def _run_demo(host: str, port: int, log_level: str) -> int:
    upstream_sockets = [_bind("127.0.0.1", 0), _bind("127.0.0.1", 0)]
    urls = [f"http://127.0.0.1:{sock.getsockname()[1]}" for sock in upstream_sockets]
    config = demo_config(urls, host=host, port=port)
    try:
        main_socket = _bind(host, port)
    except OSError as exc:
        print(f"error: cannot listen on {host}:{port}: {exc} (try --port)", file=sys.stderr)
        return 1
    app = create_app(config)
    others: list[tuple[ASGIApp, socket.socket]] = [
        (DemoUpstream(f"demo-{index + 1}"), sock) for index, sock in enumerate(upstream_sockets)
    ]
    shown = f"[{host}]" if ":" in host else host
    print(demo_instructions(f"http://{shown}:{main_socket.getsockname()[1]}"), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve((app, main_socket), others, log_level))
    return 0
