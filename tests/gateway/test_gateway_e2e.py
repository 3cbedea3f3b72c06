"""End to end through real uvicorn: the gateway in front of two real upstreams on loopback."""

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from sample_gateway.app import create_app
from sample_gateway.config import parse_config
from tests.support.asgi import make_scope, run_asgi
from tests.support.servers import free_port, serve
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e

KEY = "e2e-admin-key"
HASH_ON_USER = {"strategy": "consistent_hash", "hash_on": "header", "hash_key": "x-user"}
AUTH = {"authorization": f"Bearer {KEY}"}


def config(urls: list[str], **service: Any) -> Any:
    return parse_config(
        {
            "services": [
                {
                    "name": "echo",
                    "targets": [{"url": url, "id": f"t{i}"} for i, url in enumerate(urls)],
                    "health_check": {
                        "path": "/healthz",
                        "interval": 0.05,
                        "timeout": 1,
                        "unhealthy_threshold": 1,
                    },
                    "outlier_detection": {"consecutive_failures": 2, "base_ejection": 30},
                    "retry": {"attempts": 2, "backoff_base": 0.001, "backoff_max": 0.005},
                    **service,
                }
            ],
            "routes": [
                {"path": "/api/*", "methods": ["GET", "POST"], "strip_prefix": "/api", "service": "echo"},
                {"path": "/items/{id}", "methods": ["GET"], "service": "echo"},
            ],
            "admin": {"api_keys": [KEY]},
        }
    )


@contextlib.asynccontextmanager
async def upstream(name: str) -> AsyncIterator[tuple[str, UpstreamApp]]:
    app = UpstreamApp(name=name)
    async with serve(app) as url:
        yield url, app


@pytest.mark.parametrize("client_kind", ["aiohttp", "httpx"])
async def test_round_robin_probes_and_routing(client_kind: str) -> None:
    async with upstream("a") as (url_a, _), upstream("b") as (url_b, app_b):
        gateway = create_app(config([url_a, url_b]).model_copy(update={"upstream_client": client_kind}))
        async with serve(gateway, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).json() == {"status": "ok"}
            assert (await http.get("/readyz")).status_code == 200
            names = [(await http.get("/api/hello")).json()["name"] for _ in range(10)]
            assert Counter(names) == {"a": 5, "b": 5}
            echoed = (await http.get("/api/users/7?x=1")).json()
            assert (echoed["path"], echoed["query_string"]) == ("/users/7", "x=1")  # prefix stripped
            not_allowed = await http.put("/items/3")
            assert not_allowed.status_code == 405 and not_allowed.headers["allow"] == "GET, HEAD"
            assert not_allowed.headers["content-type"] == "application/problem+json"
            missing = await http.get("/elsewhere")
            assert missing.status_code == 404 and missing.json()["title"] == "Not Found"
            services = (await http.get("/_admin/services/echo", headers=AUTH)).json()
            assert all(target["in_flight"] == 0 for target in services["targets"])
            assert all(target["latency_ewma_ms"] is not None for target in services["targets"])
            assert app_b.received


async def test_a_killed_target_is_ejected_and_traffic_shifts_without_client_errors() -> None:
    async with upstream("a") as (url_a, app_a), contextlib.AsyncExitStack() as server_b:
        url_b, _ = await server_b.enter_async_context(upstream("b"))
        # Health checks slow here: the passive outlier detection must do the work.
        gateway = create_app(config([url_a, url_b], health_check={"interval": 60}))
        async with serve(gateway, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
            before = [(await http.get("/api/x")).json()["name"] for _ in range(4)]
            assert Counter(before) == {"a": 2, "b": 2}
            await server_b.aclose()  # b dies mid-run
            statuses = [(await http.get("/api/x")).status_code for _ in range(20)]
            assert statuses == [200] * 20  # idempotent requests retried on a: no client error
            view = (await http.get("/_admin/services/echo", headers=AUTH)).json()
            states = {target["id"]: target for target in view["targets"]}
            assert states["t1"]["ejected"] is True and states["t0"]["healthy"] is True
            received_by_a = len(app_a.received)
            names = [(await http.get("/api/x")).json()["name"] for _ in range(10)]
            assert names == ["a"] * 10 and len(app_a.received) == received_by_a + 10
            ready = await http.get("/readyz")
            assert ready.status_code == 200  # a still serves the required service


async def test_active_checks_mark_a_dead_target_and_readyz_follows() -> None:
    async with upstream("a") as (url_a, _), contextlib.AsyncExitStack() as server_b:
        url_b, _ = await server_b.enter_async_context(upstream("b"))
        gateway = create_app(config([url_b]))
        async with serve(gateway, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/readyz")).status_code == 200
            await server_b.aclose()
            deadline = time.monotonic() + 10
            while (ready := await http.get("/readyz")).status_code == 200:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
            assert ready.status_code == 503 and ready.json()["services"] == ["echo"]
            refused = await http.get("/api/x")
            assert refused.status_code == 503 and "retry-after" in refused.headers
            # Register a live target through the admin API: traffic and readiness recover.
            added = await http.post(
                "/_admin/services/echo/targets", headers=AUTH, json={"url": url_a, "id": "a"}
            )
            assert added.status_code == 201
            assert (await http.get("/api/x")).json()["name"] == "a"
            assert (await http.get("/readyz")).status_code == 200


async def test_readyz_and_websocket_before_start_are_refused() -> None:
    async with upstream("a") as (url_a, _):
        gateway = create_app(config([url_a]))
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=gateway), base_url="http://gw"
        ) as http:
            not_started = await http.get("/readyz")
            starting = await http.get("/api/x")
        assert not_started.status_code == 503
        assert starting.status_code == 503 and starting.headers["retry-after"] == "1"
        websocket = await run_asgi(gateway, make_scope("/api/x", scope_type="websocket"))
        denial = await run_asgi(
            gateway,
            make_scope("/api/x", scope_type="websocket", extensions={"websocket.http.response": {}}),
        )
        assert websocket.messages == [
            {"type": "websocket.close", "code": 1013, "reason": "The gateway is starting."}
        ]
        assert denial.messages[0]["type"] == "websocket.http.response.start"
        assert denial.messages[0]["status"] == 503
        assert (b"retry-after", b"1") in denial.messages[0]["headers"]


async def test_benchmark_factory_serves_through_the_default_stack() -> None:
    from sample_gateway.app import create_benchmark_app

    async with upstream("bench") as (url, app):
        async with (
            serve(create_benchmark_app(url), lifespan="on") as base,
            httpx.AsyncClient(base_url=base) as http,
        ):
            response = await http.get("/anything?q=1")
        assert response.status_code == 200 and response.json()["path"] == "/anything"
        assert app.received == [("GET", "/anything")]


async def test_a_registry_store_outage_keeps_the_config_targets_serving() -> None:
    dead_redis = f"redis://127.0.0.1:{free_port()}/0"
    async with upstream("a") as (url_a, _):
        settings = config([url_a]).model_dump(mode="json")
        settings["storage"]["registry"] = dead_redis
        settings["admin"]["api_keys"] = [KEY]
        gateway = create_app(parse_config(settings))
        async with serve(gateway, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/api/x")).json()["name"] == "a"
            register = await http.post(
                "/_admin/services/echo/targets", headers=AUTH, json={"url": "http://127.0.0.1:1", "id": "x"}
            )
            deregister = await http.delete("/_admin/services/echo/targets/x", headers=AUTH)
    assert register.status_code == 503 and register.headers["content-type"] == "application/problem+json"
    assert deregister.status_code == 503


STRATEGIES: list[tuple[dict[str, Any], tuple[int, int], str | None, Callable[[Counter[str]], bool]]] = [
    ({"strategy": "round_robin"}, (3, 1), None, lambda counts: counts == {"a": 10, "b": 10}),
    ({"strategy": "weighted_round_robin"}, (3, 1), None, lambda counts: counts == {"a": 15, "b": 5}),
    ({"strategy": "least_connections"}, (1, 1), None, lambda counts: counts == {"a": 10, "b": 10}),
    # One user always reaches the same target; many users reach both.
    (HASH_ON_USER, (1, 1), "same", lambda counts: len(counts) == 1 and sum(counts.values()) == 20),
    (HASH_ON_USER, (1, 1), "varied", lambda counts: set(counts) == {"a", "b"}),
    ({"strategy": "power_of_two"}, (1, 1), None, lambda counts: set(counts) == {"a", "b"}),
]


@pytest.mark.parametrize(("load_balancing", "weights", "user", "check"), STRATEGIES)
async def test_each_strategy_distributes_real_traffic(
    load_balancing: dict[str, Any],
    weights: tuple[int, int],
    user: str | None,
    check: Callable[[Counter[str]], bool],
) -> None:
    async with upstream("a") as (url_a, _), upstream("b") as (url_b, _):
        settings = config([url_a, url_b]).model_dump(mode="json")
        settings["admin"]["api_keys"] = [KEY]
        service = settings["services"][0]
        service["load_balancing"] = load_balancing
        for target, weight in zip(service["targets"], weights, strict=True):
            target["weight"] = weight
        gateway = create_app(parse_config(settings))
        async with serve(gateway, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
            names = []
            for index in range(20):
                headers = {} if user is None else {"x-user": user if user == "same" else f"user-{index}"}
                response = await http.get("/api/x", headers=headers)
                assert response.status_code == 200
                names.append(response.json()["name"])
    counts = Counter(names)
    assert check(counts), counts


def test_benchmark_factory_reads_the_upstream_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from sample_gateway.app import bench_app

    monkeypatch.setenv("NEXUS_BENCH_UPSTREAM", "http://127.0.0.1:8123")
    app = bench_app()
    assert [target.url for target in app.runtime.registry.targets("bench")] == ["http://127.0.0.1:8123"]


async def test_a_route_timeout_overrides_the_service_deadline() -> None:
    async with upstream("a") as (url_a, _):
        settings = config([url_a]).model_dump(mode="json")
        settings["admin"]["api_keys"] = [KEY]
        settings["routes"].insert(
            0, {"path": "/fast/*", "strip_prefix": "/fast", "service": "echo", "timeout": 0.3}
        )
        gateway = create_app(parse_config(settings))
        async with (
            serve(gateway, lifespan="on") as base,
            httpx.AsyncClient(base_url=base, timeout=10) as http,
        ):
            began = time.monotonic()
            fast = await http.get("/fast/delay?seconds=3")
            elapsed = time.monotonic() - began
            slow = await http.get("/api/delay?seconds=0.5")  # the service's 60 s deadline
    assert fast.status_code == 504 and fast.headers["content-type"] == "application/problem+json"
    assert 0.25 < elapsed < 2.0
    assert slow.status_code == 200


async def test_an_unusable_path_is_the_shared_400_problem_and_never_routed() -> None:
    async with upstream("a") as (url_a, app_a):
        gateway = create_app(config([url_a]))
        recorded = await run_asgi(gateway, make_scope("/api/x%00", raw_path=b"/api/x%00"))
    assert recorded.status == 400
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.json()["detail"] == "The request path is invalid."
    assert app_a.received == []
