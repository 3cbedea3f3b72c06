"""The gateway's default stack wired from the config, end to end: real uvicorn, real upstreams, a real JWKS
server and real Redis, each layer seen through what the client and the upstream receive."""

import asyncio
import logging

import httpx
import pytest
import redis.asyncio
from joserfc.jwk import ECKey

from nexus_middleware import hash_api_key_secret
from sample_gateway.app import create_app
from sample_gateway.config import parse_config
from tests.gateway.support import (
    ADMIN,
    API_KEY,
    KEY_ID,
    KEY_SECRET,
    gateway,
    identity_provider,
    limited,
    settings,
    token,
    upstream,
)
from tests.support.servers import serve

pytestmark = pytest.mark.e2e


def upstream_headers(response: httpx.Response, name: str) -> list[str]:
    return [value for key, value in response.json()["headers"] if key.lower() == name]


async def test_a_jwt_route_refuses_without_a_token_and_forwards_only_the_principals_identity(
    signing_key: ECKey,
) -> None:
    forged = [("X-Auth-Subject", "mallory"), ("x_auth_subject", "mallory"), ("X-Auth-Roles", "admin")]
    routes = [{"path": "/secure/*", "auth": "required"}, {"path": "/open/*"}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        gateway(settings(url, routes=routes, auth=auth)) as http,
    ):
        missing = await http.get("/secure/orders")
        bad = await http.get("/secure/orders", headers={"authorization": "Bearer not.a.token"})
        allowed = await http.get("/secure/orders", headers=[*token(signing_key).items(), *forged])
        public = await http.get("/open/page", headers=forged)
        admin = await http.get("/_admin/breakers", headers=token(signing_key, roles=["gateway-admin"]))
        not_admin = await http.get("/_admin/breakers", headers=token(signing_key, roles=["user"]))
    assert missing.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert bad.status_code == 401 and 'error="invalid_token"' in bad.headers["www-authenticate"]
    assert allowed.status_code == 200
    assert upstream_headers(allowed, "x-auth-subject") == ["alice"]
    assert upstream_headers(allowed, "x_auth_subject") == upstream_headers(allowed, "x-auth-roles") == []
    assert upstream_headers(public, "x-auth-subject") == upstream_headers(public, "x_auth_subject") == []
    assert [path for _, path in app.received] == ["/secure/orders", "/open/page"]  # refusals never forwarded
    assert admin.status_code == 200 and not_admin.status_code == 401


async def test_an_api_key_route_admits_a_valid_key_only() -> None:
    record = {"key_id": KEY_ID, "secret_hash": hash_api_key_secret(KEY_SECRET), "owner": "billing-bot"}
    auth = {"api_keys": {"header": "x-api-key", "keys": [record]}}
    async with (
        upstream() as (url, app),
        gateway(settings(url, routes=[{"path": "/billing/*", "auth": "required"}], auth=auth)) as http,
    ):
        missing = await http.get("/billing/invoices")
        wrong = await http.get("/billing/invoices", headers={"x-api-key": f"nx_{KEY_ID}_{'w' * 43}"})
        allowed = await http.get("/billing/invoices", headers={"x-api-key": API_KEY})
    assert missing.status_code == wrong.status_code == 401
    assert missing.headers["content-type"] == "application/problem+json"
    assert allowed.status_code == 200 and upstream_headers(allowed, "x-auth-subject") == ["billing-bot"]
    assert len(app.received) == 1


async def test_rbac_refuses_a_principal_without_the_routes_role(signing_key: ECKey) -> None:
    routes = [{"path": "/ops/*", "auth": "required", "roles": ["ops"]}]
    async with (
        upstream() as (url, app),
        identity_provider(signing_key) as auth,
        gateway(settings(url, routes=routes, auth=auth)) as http,
    ):
        role_less = await http.get("/ops/deploy", headers=token(signing_key))
        other_role = await http.get("/ops/deploy", headers=token(signing_key, roles=["viewer"]))
        operator = await http.get("/ops/deploy", headers=token(signing_key, roles=["ops"]))
    assert role_less.status_code == other_role.status_code == 403
    assert role_less.headers["content-type"] == "application/problem+json"
    assert operator.status_code == 200 and len(app.received) == 1


async def test_a_rate_limited_route_sends_ratelimit_headers_and_429_after_the_limit() -> None:
    async with upstream() as (url, app), gateway(limited(url, "3/minute")) as http:
        answers = [await http.get(f"/items/{n}") for n in range(4)]
        free = await http.get("/free/x")
    assert [answer.status_code for answer in answers] == [200, 200, 200, 429]
    assert all("ratelimit" in answer.headers for answer in answers[:3])
    assert answers[3].headers["content-type"] == "application/problem+json"
    assert int(answers[3].headers["retry-after"]) > 0
    assert free.status_code == 200 and "ratelimit" not in free.headers
    assert len(app.received) == 4  # three limited ones and the free one


async def test_the_rate_limit_counters_live_in_redis_under_the_storage_prefix(
    redis_url: str, redis_client: "redis.asyncio.Redis", redis_prefix: str
) -> None:
    storage = {"rate_limits": redis_url, "prefix": redis_prefix}
    async with upstream() as (url, _), gateway(limited(url, "2/minute", storage=storage)) as http:
        statuses = [(await http.get(f"/items/{n}")).status_code for n in range(3)]
    keys = [key.decode() if isinstance(key, bytes) else key async for key in redis_client.scan_iter("*")]
    ours = [key for key in keys if key.startswith(redis_prefix)]
    assert statuses == [200, 200, 429]
    assert ours and all(key.startswith(redis_prefix + "rl:") for key in ours)


async def test_admin_replaces_rate_limit_policies_without_a_restart() -> None:
    async with upstream() as (url, _), gateway(limited(url, "100/minute")) as http:
        before = [(await http.get("/items/1")).status_code for _ in range(3)]
        replaced = await http.put(
            "/_admin/rate-limits", headers=ADMIN, json={"policies": {"tight": {"limits": ["1/minute"]}}}
        )
        view = (await http.get("/_admin/rate-limits", headers=ADMIN)).json()
        after = [(await http.get("/items/1")).status_code for _ in range(2)]
    assert before == [200, 200, 200]
    assert replaced.status_code == 200 and view["enforced"] is True
    assert view["policies"]["tight"]["limits"] == ["1/minute"]
    assert after == [200, 429]  # a fresh quota size: the new policy is in force at once


async def test_the_breaker_opens_on_upstream_failures_and_answers_503_without_calling_it() -> None:
    breaker = {"breaker": {"enabled": True, "failure_threshold": 3, "recovery_timeout": 60}}
    data = settings("http://unused", routes=[{"path": "/*"}], service=breaker)
    async with upstream() as (url, app):
        data["services"][0]["targets"][0]["url"] = url
        async with gateway(data) as http:
            failing = [(await http.get("/status/500")).status_code for _ in range(3)]
            refused = await http.get("/status/200")
            states = (await http.get("/_admin/breakers", headers=ADMIN)).json()
    assert failing == [500, 500, 500]
    assert refused.status_code == 503 and "retry-after" in refused.headers
    assert refused.headers["content-type"] == "application/problem+json"
    assert len(app.received) == 3  # the open breaker never called the upstream
    assert states["wired"] is True
    assert [(state["key"], state["state"]) for state in states["breakers"]] == [("echo", "open")]


async def test_metrics_count_requests_by_route_template_and_refuse_other_addresses() -> None:
    metrics = {"enabled": True, "allow": ["10.0.0.0/8"]}
    data = settings(
        "http://unused",
        routes=[{"path": "/items/{id}"}],
        metrics=metrics,
        trusted_proxies=["127.0.0.1/32"],
    )
    async with upstream() as (url, _):
        data["services"][0]["targets"][0]["url"] = url
        async with gateway(data) as http:
            for item in ("1", "2", "3"):
                assert (await http.get(f"/items/{item}")).status_code == 200
            refused = await http.get("/metrics", headers={"x-forwarded-for": "203.0.113.9"})
            direct = await http.get("/metrics")
            scrape = await http.get("/metrics", headers={"x-forwarded-for": "10.1.2.3"})
    assert refused.status_code == direct.status_code == 403
    assert scrape.status_code == 200
    text = scrape.text
    assert 'route="/items/{id}"' in text and 'route="/items/1"' not in text
    requests_line = next(
        line
        for line in text.splitlines()
        if line.startswith("nexus_http_requests_total{") and 'route="/items/{id}"' in line
    )
    assert requests_line.endswith(" 3.0")
    assert 'nexus_upstream_target_healthy{service="echo",target="t0"} 1.0' in text


async def test_traceparent_reaches_the_upstream() -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    incoming = {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"}
    async with upstream() as (url, _):
        data = settings(url, routes=[{"path": "/*"}], metrics={"tracing": True})
        async with gateway(data) as http:
            answer = await http.get("/traced", headers=incoming)
            fresh = await http.get("/traced")
    forwarded = upstream_headers(answer, "traceparent")
    assert len(forwarded) == 1 and forwarded[0].split("-")[1] == trace_id
    assert len(upstream_headers(fresh, "traceparent")) <= 1


async def test_a_route_over_its_concurrency_limit_sheds_with_503() -> None:
    routes = [{"path": "/delay", "max_concurrent": 1}, {"path": "/*"}]
    async with upstream() as (url, app), gateway(settings(url, routes=routes)) as http:
        slow = asyncio.create_task(http.get("/delay", params={"seconds": "0.5"}))
        while app.in_flight == 0:  # noqa: ASYNC110 - the real upstream only exposes a counter
            await asyncio.sleep(0.01)
        shed = await http.get("/delay", params={"seconds": "0"})
        other = await http.get("/elsewhere")
        held = await slow
    assert held.status_code == 200 and other.status_code == 200
    assert shed.status_code == 503 and "retry-after" in shed.headers
    assert shed.headers["content-type"] == "application/problem+json"
    assert len(app.received) == 2  # the shed request never reached the upstream


async def test_the_access_log_writes_one_line_per_request_with_the_status_sent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="nexus_middleware.access_log")
    routes = [{"path": "/items/{id}", "methods": ["GET"]}]
    async with (
        upstream() as (url, _),
        gateway(settings(url, routes=routes, metrics={"access_log": True})) as http,
    ):
        assert (await http.get("/items/1")).status_code == 200
        assert (await http.post("/items/1")).status_code == 405
    lines = [record.getMessage() for record in caplog.records if record.name == "nexus_middleware.access_log"]
    assert len(lines) == 2
    assert "200" in lines[0] and "/items/1" in lines[0] and "405" in lines[1]


@pytest.mark.parametrize(
    ("section", "hsts"),
    [
        ({"trusted_proxies": ["127.0.0.1"]}, True),  # TLS ended at a trusted proxy: HSTS
        ({}, False),  # the same claim from a peer nobody trusts: never over plain http
        ({"security": {"force_hsts": True}}, True),
    ],
)
async def test_hsts_only_when_a_trusted_proxy_says_the_client_used_https(
    section: dict[str, object], hsts: bool
) -> None:
    async with upstream() as (url, _):
        app = create_app(parse_config(settings(url, routes=[{"path": "/*"}], **section), environ={}))
        # uvicorn's own proxy-header handling off: the gateway's trusted_proxies decide.
        async with serve(app, lifespan="on", proxy_headers=False) as base, httpx.AsyncClient() as http:
            claimed = await http.get(base + "/x", headers={"x-forwarded-proto": "https"})
            plain = await http.get(base + "/x")
    assert ("strict-transport-security" in claimed.headers) is hsts
    assert ("strict-transport-security" in plain.headers) is (section == {"security": {"force_hsts": True}})
    assert claimed.headers["x-content-type-options"] == plain.headers["x-content-type-options"] == "nosniff"


def two_services(public_url: str, internal_url: str, **sections: object) -> dict[str, object]:
    """The bypass scenario: one path on two hosts, each routed to its own service with its own auth."""
    data = settings(
        public_url,
        routes=[
            {"path": "/admin/*", "host": "public.example.com", "auth": "none"},
            {"path": "/admin/*", "host": "internal.example.com", "auth": "required"},
        ],
        **sections,
    )
    internal = {**data["services"][0], "name": "internal", "targets": [{"url": internal_url, "id": "t1"}]}
    data["services"].append(internal)
    data["routes"][1]["service"] = "internal"
    return data


PUBLIC_HOST = {"host": "public.example.com"}
INTERNAL_HOST = {"host": "Internal.Example.com:8443"}  # the router's spelling rules: case and port ignored


async def test_an_internal_host_route_keeps_its_api_key_auth_on_a_path_a_public_host_leaves_open() -> None:
    record = {"key_id": KEY_ID, "secret_hash": hash_api_key_secret(KEY_SECRET), "owner": "billing-bot"}
    auth = {"api_keys": {"header": "x-api-key", "keys": [record]}}
    async with (
        upstream() as (public_url, public),
        upstream() as (internal_url, internal),
        gateway(two_services(public_url, internal_url, auth=auth)) as http,
    ):
        refused = await http.get("/admin/x", headers=INTERNAL_HOST)
        opened = await http.get("/admin/x", headers=PUBLIC_HOST)
        keyed = await http.get("/admin/y", headers={**INTERNAL_HOST, "x-api-key": API_KEY})
    assert refused.status_code == 401 and refused.headers["content-type"] == "application/problem+json"
    assert opened.status_code == 200 and keyed.status_code == 200
    assert public.received == [("GET", "/admin/x")]
    assert internal.received == [("GET", "/admin/y")]  # the refused request never reached it


async def test_an_internal_host_route_keeps_its_jwt_auth_on_a_path_a_public_host_leaves_open(
    signing_key: ECKey,
) -> None:
    async with (
        upstream() as (public_url, public),
        upstream() as (internal_url, internal),
        identity_provider(signing_key) as auth,
        gateway(two_services(public_url, internal_url, auth=auth)) as http,
    ):
        refused = await http.get("/admin/x", headers=INTERNAL_HOST)
        opened = await http.get("/admin/x", headers=PUBLIC_HOST)
        signed = await http.get("/admin/y", headers={**INTERNAL_HOST, **token(signing_key)})
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert opened.status_code == 200 and signed.status_code == 200
    assert public.received == [("GET", "/admin/x")]
    assert internal.received == [("GET", "/admin/y")]


async def test_rate_and_body_limits_follow_the_host_the_route_was_chosen_by() -> None:
    routes = [
        {"path": "/api/*", "host": "internal.example.com", "rate_limits": ["internal"], "max_body_size": 10},
        {"path": "/api/*", "host": "public.example.com"},  # no limits: never the next route's
        {"path": "/api/*", "rate_limits": ["rest"], "max_body_size": 12},
    ]
    policies = {"internal": {"limits": ["1/minute"], "key": "client"}, "rest": {"limits": ["2/minute"]}}
    async with (
        upstream() as (url, app),
        gateway(settings(url, routes=routes, rate_limits={"policies": policies})) as http,
    ):

        async def run(host: str) -> tuple[list[int], int, bool]:
            body = await http.post("/api/upload", headers={"host": host}, content=b"x" * 15)
            answers = [await http.get("/api/items", headers={"host": host}) for _ in range(3)]
            return (
                [answer.status_code for answer in answers],
                body.status_code,
                "ratelimit" in answers[0].headers,
            )

        internal = await run("internal.example.com")
        public = await run("PUBLIC.example.com")
        other = await run("other.example.com")
    assert internal == ([200, 429, 429], 413, True)
    assert public == ([200, 200, 200], 200, False)
    assert other == ([200, 200, 429], 413, True)
    assert len(app.received) == 1 + (1 + 3) + 2  # refusals never reach the upstream
