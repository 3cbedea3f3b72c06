"""A reload that changes stack policies rebuilds the middleware stack and swaps it in, end to end: real
uvicorn, real upstreams and real Redis. State whose resource is unchanged survives; a request in flight
finishes on the stack it started with; what a reload dropped is closed once nothing uses it."""

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from nexus_middleware import hash_api_key_secret
from nexus_middleware.types import Receive, Scope, Send
from sample_gateway.app import GatewayEdge, create_app
from sample_gateway.config import parse_config
from tests.gateway.support import ADMIN, API_KEY, KEY_ID, KEY_SECRET, settings, until, upstream
from tests.support.servers import serve

pytestmark = pytest.mark.e2e

RECORD = {"key_id": KEY_ID, "secret_hash": hash_api_key_secret(KEY_SECRET), "owner": "billing-bot"}
API_KEYS = {"api_keys": {"header": "x-api-key", "keys": [RECORD]}}


@contextlib.asynccontextmanager
async def served(data: dict[str, Any]) -> AsyncIterator[tuple[httpx.AsyncClient, GatewayEdge]]:
    app = create_app(parse_config(data, environ={}))
    async with serve(app, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
        yield http, app


async def reload(http: httpx.AsyncClient, data: dict[str, Any]) -> httpx.Response:
    return await http.post("/_admin/reload", headers=ADMIN, content=json.dumps(data))


def upstream_headers(response: httpx.Response, name: str) -> list[str]:
    return [value for key, value in response.json()["headers"] if key.lower() == name]


async def test_a_route_turns_from_open_to_authenticated_and_back() -> None:
    async with upstream() as (url, app):
        open_data = settings(url, routes=[{"path": "/billing/*"}], auth=API_KEYS)
        secured = settings(url, routes=[{"path": "/billing/*", "auth": "required"}], auth=API_KEYS)
        async with served(open_data) as (http, _):
            before = await http.get("/billing/a")
            tightened = await reload(http, secured)
            refused = await http.get("/billing/b")
            allowed = await http.get("/billing/c", headers={"x-api-key": API_KEY})
            loosened = await reload(http, open_data)
            after = await http.get("/billing/d")
    assert before.status_code == 200
    assert tightened.status_code == 200 and tightened.json()["rebuilt"] == ["routes"]
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert allowed.status_code == 200 and upstream_headers(allowed, "x-auth-subject") == ["billing-bot"]
    assert loosened.status_code == 200 and after.status_code == 200
    assert [path for _, path in app.received] == ["/billing/a", "/billing/c", "/billing/d"]


async def test_a_rate_limit_change_applies_and_unchanged_counters_survive_in_memory() -> None:
    await rate_limits_across_a_reload({})


async def test_a_rate_limit_change_applies_and_unchanged_counters_survive_in_redis(
    redis_url: str, redis_client: object, redis_prefix: str
) -> None:
    await rate_limits_across_a_reload({"storage": {"rate_limits": redis_url, "prefix": redis_prefix}})


async def rate_limits_across_a_reload(sections: dict[str, Any]) -> None:
    sections = {"auth": API_KEYS, **sections}
    policies = {"tight": {"limits": ["5/minute"]}, "solo": {"limits": ["1/minute"]}}

    def config(free: dict[str, Any]) -> dict[str, Any]:
        routes = [
            {"name": "items", "path": "/items/*", "rate_limits": ["tight"]},
            {"path": "/free/*", **free},
        ]
        return settings(url, routes=routes, rate_limits={"policies": policies}, **sections)

    async with upstream() as (url, _), served(config({})) as (http, _):
        used = [(await http.get("/items/1")).status_code for _ in range(4)]
        # Another route's auth and limits change; the tight policy of /items is untouched.
        changed = await reload(http, config({"auth": "optional", "rate_limits": ["solo"]}))
        left = [(await http.get("/items/1")).status_code for _ in range(2)]
        solo = [(await http.get("/free/x")).status_code for _ in range(2)]
        # The admin API's hook reaches the rebuilt limiter: a wider solo limit applies to the same counter.
        widened = await http.put(
            "/_admin/rate-limits",
            headers=ADMIN,
            json={"policies": {**policies, "solo": {"limits": ["2/minute"]}}},
        )
        again = [(await http.get("/free/x")).status_code for _ in range(3)]
    assert used == [200] * 4
    assert changed.status_code == 200 and changed.json()["rebuilt"] == ["routes"]
    assert left == [200, 429]  # one request left of five, as before the reload
    assert solo == [200, 429]  # the new limit is in force at once
    assert widened.status_code == 200 and widened.json()["enforced"] is True
    assert again == [200, 200, 429]  # limits keys a window by its limit: a new limit counts afresh


async def test_a_breaker_change_applies_and_an_open_breaker_of_an_unchanged_service_stays_open() -> None:
    def config(url: str, other_threshold: int) -> dict[str, Any]:
        def service(name: str, threshold: int) -> dict[str, Any]:
            return {
                "name": name,
                "targets": [{"url": url, "id": name}],
                "health_check": {"enabled": False},
                "outlier_detection": {"enabled": False},
                "retry": {"attempts": 1},
                "breaker": {"enabled": True, "failure_threshold": threshold, "recovery_timeout": 60},
            }

        return {
            "services": [service("echo", 1), service("other", other_threshold)],
            "routes": [
                {"path": "/a/*", "service": "echo", "strip_prefix": "/a"},
                {"path": "/b/*", "service": "other", "strip_prefix": "/b"},
            ],
            "admin": {"api_keys": [ADMIN["x-admin-key"]]},
        }

    async with upstream() as (url, app), served(config(url, 3)) as (http, _):
        assert (await http.get("/a/status/500")).status_code == 500
        assert (await http.get("/b/status/500")).status_code == 500
        changed = await reload(http, config(url, 1))
        states = (await http.get("/_admin/breakers", headers=ADMIN)).json()["breakers"]
        still_open = await http.get("/a/status/200")
        assert (await http.get("/b/status/500")).status_code == 500
        tripped = await http.get("/b/status/200")
    assert changed.json()["rebuilt"] == ["services.breaker"]
    # echo's breaker kept its state; other's policy changed, so it started closed under the new one
    assert [(state["key"], state["state"]) for state in states] == [("echo", "open")]
    assert still_open.status_code == 503 and tripped.status_code == 503  # threshold 1 is in force
    assert len(app.received) == 3


class GatedUpstream:
    """Answers once `release` is set, so a test holds a request in flight without sleeping."""

    def __init__(self) -> None:
        self.arrived = asyncio.Event()
        self.release = asyncio.Event()
        self.paths: list[str] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        self.paths.append(scope["path"])
        if scope["path"].startswith("/slow"):
            self.arrived.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


async def test_a_request_in_flight_finishes_on_the_stack_it_started_with() -> None:
    gated = GatedUpstream()
    async with serve(gated, lifespan="off") as url:
        keys = {"api_keys": {"keys": [RECORD]}}
        other_key = {**RECORD, "owner": "ops-bot"}
        open_data = settings(
            url, routes=[{"path": "/slow/*"}, {"path": "/other/*", "auth": "required"}], auth=keys
        )
        secured = settings(
            url,
            routes=[{"path": "/slow/*", "auth": "required"}, {"path": "/other/*", "auth": "required"}],
            auth={"api_keys": {"keys": [other_key]}},
        )
        async with served(open_data) as (http, app):
            resources = app.runtime.resources
            old_store = next(key for key in resources.open_keys() if key[0] == "api_keys")
            in_flight = asyncio.create_task(http.get("/slow/1"))
            await gated.arrived.wait()
            changed = await reload(http, secured)
            refused = await http.get("/slow/2")
            assert old_store in resources.open_keys()  # the old stack still serves the request in flight
            gated.release.set()
            finished = await in_flight
            await until(lambda: old_store not in resources.open_keys())
    assert changed.status_code == 200 and changed.json()["rebuilt"] == ["auth", "routes"]
    assert finished.status_code == 200 and finished.text == "done"  # no credential: the old stack's rules
    assert refused.status_code == 401
    assert gated.paths == ["/slow/1"]


async def test_a_failing_rebuild_keeps_the_running_stack() -> None:
    async with upstream() as (url, _):
        data = settings(url, routes=[{"path": "/open/*"}])
        broken = settings(
            url,
            routes=[{"path": "/open/*", "auth": "required"}],
            auth={"issuers": [{"issuer": "https://idp", "jwks_url": "ftp://idp/jwks", "audiences": ["api"]}]},
        )
        async with served(data) as (http, app):
            stack = app.app
            refused = await reload(http, broken)
            still = await http.get("/open/x")
            index = (await http.get("/_admin", headers=ADMIN)).json()
    assert refused.status_code == 400 and refused.headers["content-type"] == "application/problem+json"
    assert (
        refused.json()["layer"] == "auth"
        and "JWKS URL must be http(s)" in refused.json()["errors"][0]["problem"]
    )
    assert app.app is stack and still.status_code == 200
    assert app.runtime.config.auth.issuers == [] and "auth" not in index["stack"]


async def test_rebuilds_register_no_duplicate_hooks_or_collectors_and_keep_counting() -> None:
    trusted = {
        "trusted_proxies": ["127.0.0.1/32"],
        "metrics": {"enabled": True, "tracing": True, "allow": ["*"]},
    }

    def config(auth: str) -> dict[str, Any]:
        return settings(url, routes=[{"path": "/items/{id}", "auth": auth}], auth=API_KEYS, **trusted)

    async with upstream() as (url, _), served(config("optional")) as (http, app):
        hooks = len(app.runtime.header_hooks)
        first = await http.get("/items/1", headers={"x-api-key": API_KEY, "x-auth-subject": "mallory"})
        for mode in ("required", "optional", "required"):
            assert (await reload(http, config(mode))).json()["rebuilt"] == ["routes"]
        incoming = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
        last = await http.get(
            "/items/2", headers={"x-api-key": API_KEY, "x-auth-subject": "mallory", **incoming}
        )
        scrape = (await http.get("/metrics")).text
    assert len(app.runtime.header_hooks) == hooks == 2  # identity and traceparent, once each
    assert (
        upstream_headers(first, "x-auth-subject")
        == upstream_headers(last, "x-auth-subject")
        == ["billing-bot"]
    )
    assert len(upstream_headers(last, "traceparent")) == 1
    line = next(
        line
        for line in scrape.splitlines()
        if line.startswith("nexus_http_requests_total{") and 'route="/items/{id}"' in line
    )
    assert line.endswith(" 2.0")  # one series, counted across the rebuilds
