"""stack.py: the ordered table that wires middlewares around the gateway, first entry outermost."""

import json
import logging
from typing import Any

import pytest

from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.config import GatewayConfig, parse_config
from sample_gateway.registry import MemoryRegistryStore
from sample_gateway.runtime import GatewayRuntime
from sample_gateway.stack import STACK, build_stack, route_table
from tests.support.asgi import make_scope, ok_app, run_asgi


def config() -> GatewayConfig:
    return parse_config(
        {
            "services": [{"name": "s", "targets": [{"url": "http://127.0.0.1:9001"}]}],
            "routes": [
                {
                    "path": "/upload",
                    "methods": ["POST"],
                    "service": "s",
                    "max_body_size": 100,
                    "auth": "required",
                },
                {"path": "/*", "service": "s"},
            ],
            "admin": {"api_keys": ["k"]},
            "auth": {"api_keys": {"keys": []}},
        }
    )


class Tagging:
    def __init__(self, app: ASGIApp, name: str, seen: list[str]) -> None:
        self.app, self.name, self.seen = app, name, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen.append(self.name)
        await self.app(scope, receive, send)


async def test_entries_wrap_in_order_and_none_leaves_a_layer_out() -> None:
    seen: list[str] = []
    cfg = config()
    runtime = GatewayRuntime(cfg, registry_store=MemoryRegistryStore())

    def tag(name: str) -> Any:
        return lambda app, config, runtime: Tagging(app, name, seen)

    entries = [
        ("outer", tag("outer")),
        ("skipped", lambda app, config, runtime: None),
        ("inner", tag("inner")),
    ]
    app = build_stack(ok_app, cfg, runtime, entries=entries)
    recorded = await run_asgi(app, make_scope("/"))
    assert recorded.status == 200 and seen == ["outer", "inner"]


def test_the_table_lists_every_concern_outermost_first() -> None:
    assert [name for name, _ in STACK] == [
        "problem_details",
        "request_id",
        "tracing",
        "metrics",
        "access_log",
        "security_headers",
        "body_limit",
        "auth",
        "rate_limits",
        "rbac",
        "breakers",
        "overload",
    ]


def test_route_table_feeds_per_route_policies() -> None:
    cfg = config()
    assert route_table(cfg, "max_body_size") == [("/upload", ["POST"], 100, None), ("/*", None, None, None)]
    assert route_table(cfg, "auth") == [("/upload", ["POST"], "required", None), ("/*", None, "none", None)]


async def test_a_route_without_policies_never_meets_the_next_matching_routes() -> None:
    cfg = parse_config(
        {
            "services": [{"name": "s", "targets": [{"url": "http://127.0.0.1:9001"}]}],
            "routes": [
                {"path": "/ops/status", "service": "s"},
                {
                    "path": "/ops/*",
                    "service": "s",
                    "auth": "required",
                    "roles": ["ops"],
                    "max_body_size": 5,
                    "max_concurrent": 1,
                    "rate_limits": ["tight"],
                },
            ],
            "admin": {"api_keys": ["k"]},
            "auth": {"api_keys": {"keys": []}},
            "rate_limits": {"policies": {"tight": {"limits": ["1/minute"], "key": "client"}}},
        },
        environ={},
    )
    runtime = GatewayRuntime(cfg, registry_store=MemoryRegistryStore())
    app = build_stack(ok_app, cfg, runtime)
    for _ in range(3):
        scope = make_scope("/ops/status", method="POST", headers=[("content-length", "10")])
        recorded = await run_asgi(app, scope, body=[b"x" * 10])
        assert recorded.status == 200  # no 413, 401, 403 or 429 from /ops/*'s policies
        assert recorded.header("ratelimit") is None
    assert (await run_asgi(app, make_scope("/ops/deploy"))).status == 401
    big = make_scope("/ops/deploy", method="POST", headers=[("content-length", "10")])
    assert (await run_asgi(app, big, body=[b"x" * 10])).status == 413


def _layers(**sections: Any) -> list[str]:
    cfg = parse_config(
        {
            "services": [{"name": "s", "targets": [{"url": "http://127.0.0.1:9001"}]}],
            "routes": [{"path": "/*", "service": "s"}],
            "admin": {"api_keys": ["k"]},
            **sections,
        },
        environ={},
    )
    runtime = GatewayRuntime(cfg, registry_store=MemoryRegistryStore())
    build_stack(ok_app, cfg, runtime)
    return runtime.layers


def test_a_token_location_keeps_the_jwt_layer_even_when_no_route_authenticates() -> None:
    issuers = [{"issuer": "https://i/", "jwks_url": "https://i/jwks", "audiences": ["a"]}]
    assert "auth" not in _layers(auth={"issuers": issuers})  # nothing to read, nothing to strip
    assert "auth" in _layers(auth={"issuers": issuers, "location": {"cookie": "access_token"}})


def test_a_websocket_message_limit_alone_turns_the_limiter_on() -> None:
    assert "rate_limits" not in _layers()
    assert "rate_limits" in _layers(rate_limits={"websocket_messages": ["5/second"]})


async def test_a_query_token_refused_before_the_jwt_layer_is_masked_in_the_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    issuers = [{"issuer": "https://i/", "jwks_url": "https://i/jwks", "audiences": ["a"]}]
    cfg = parse_config(
        {
            "services": [{"name": "s", "targets": [{"url": "http://127.0.0.1:9001"}]}],
            "routes": [{"path": "/*", "service": "s"}],
            "admin": {"api_keys": ["k"]},
            "auth": {"issuers": issuers, "location": {"query": "at"}},
            "metrics": {"access_log": True},
        },
        environ={},
    )
    app = build_stack(ok_app, cfg, GatewayRuntime(cfg, registry_store=MemoryRegistryStore()))
    caplog.set_level(logging.INFO, logger="nexus_middleware.access_log")
    long_url = b"at=SECRET.TOKEN&pad=" + b"x" * 9000  # over the body-limit layer's URL cap: 414, before auth
    assert (await run_asgi(app, make_scope("/", query_string=long_url))).status == 414
    assert (await run_asgi(app, make_scope("/", query_string=b"at=SECRET.TOKEN&q=1"))).status == 200
    [refused, stripped] = [json.loads(record.getMessage()) for record in caplog.records]
    assert refused["query"].startswith("at=[REDACTED]&pad=")
    assert stripped["query"] == "q=1"
