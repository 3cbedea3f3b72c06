"""The self-contained demo: two instances of a tiny upstream, and the config that puts the gateway in front.

`python -m sample_gateway` without `--config` serves both upstream instances on free loopback ports in the
same process, and the gateway on 127.0.0.1:8080, with in-memory state and an admin key printed at start.
"""

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs

from nexus_middleware.types import Receive, Scope, Send
from sample_gateway.config import GatewayConfig, parse_config

__all__ = ["DEMO_ADMIN_KEY", "DemoUpstream", "demo_config", "demo_instructions"]

DEMO_ADMIN_KEY = "demo-admin-key"  # the demo only listens on loopback; real configs set their own


class DemoUpstream:
    """A small JSON service: `/hello`, `/echo` (any method), `/slow?seconds=`, `/healthz`."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"DemoUpstream({self.name!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if not message.get("more_body", False):
                break
        path = scope["path"]
        query = {key: values[-1] for key, values in parse_qs(scope.get("query_string", b"").decode()).items()}
        payload: dict[str, Any]
        if path == "/healthz":
            payload = {"status": "ok", "instance": self.name}
        elif path == "/slow":
            seconds = min(float(query.get("seconds", "1")), 30.0)
            await asyncio.sleep(seconds)
            payload = {"slept": seconds, "instance": self.name}
        elif path == "/hello":
            payload = {"hello": query.get("name", "world"), "instance": self.name}
        else:
            payload = {
                "instance": self.name,
                "method": scope["method"],
                "path": path,
                "query": scope.get("query_string", b"").decode("latin-1"),
                "body_bytes": size,
                "headers": {
                    key.decode("latin-1"): value.decode("latin-1") for key, value in scope["headers"]
                },
            }
        body = json.dumps(payload, indent=2).encode() + b"\n"
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def demo_config(upstream_urls: list[str], *, host: str = "127.0.0.1", port: int = 8080) -> GatewayConfig:
    return parse_config(
        {
            "listen": {"host": host, "port": port},
            "services": [
                {
                    "name": "demo",
                    "targets": [
                        {"url": url, "id": f"demo-{index + 1}", "version": "v1" if index == 0 else "v2"}
                        for index, url in enumerate(upstream_urls)
                    ],
                    "health_check": {"path": "/healthz", "interval": 2, "timeout": 1},
                    "load_balancing": {"strategy": "round_robin"},
                }
            ],
            "routes": [
                {
                    "name": "api",
                    "path": "/api/*",
                    "strip_prefix": "/api",
                    "service": "demo",
                    "canary": [{"header": "x-canary", "equals": "1", "version": "v2"}],
                },
            ],
            "admin": {"prefix": "/_admin", "api_keys": [DEMO_ADMIN_KEY]},
        }
    )


def demo_instructions(base_url: str) -> str:
    return f"""
nexus gateway demo: the gateway on {base_url}, in front of two demo upstream instances (in-memory state).

  curl -i {base_url}/api/hello                 # round robin over demo-1 and demo-2
  curl -i {base_url}/api/hello -H 'x-canary: 1' # canary header: always demo-2 (version v2)
  curl -i -X POST {base_url}/api/echo -d hi    # see the forwarded headers
  curl -i {base_url}/nowhere                   # 404 problem+json
  curl -i {base_url}/readyz
  curl -s {base_url}/_admin/services -H 'authorization: Bearer {DEMO_ADMIN_KEY}'

Your own config: python -m sample_gateway --config gateway.yaml  (see docs/getting-started.md)
Press Ctrl+C to stop.
"""
