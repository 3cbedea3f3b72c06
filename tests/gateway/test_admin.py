"""The admin API: authentication (identical 401s), every endpoint, reload validated first."""

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from nexus_middleware.context import Principal, publish_principal
from nexus_middleware.errors import StorageError
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.app import GatewayEdge, create_app
from sample_gateway.config import GatewayConfig, load_config, parse_config, stack_policy_changes
from sample_gateway.contracts import Target
from sample_gateway.mounts import StackSlot
from sample_gateway.registry import MemoryRegistryStore
from sample_gateway.runtime import GatewayRuntime, Mount
from tests.support.asgi import make_scope, ok_app, run_asgi

KEY = "s3cret-admin-key"
AUTH = {"authorization": f"Bearer {KEY}"}


def config_data(**extra: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "services": [
            {"name": "users", "targets": [{"url": "http://127.0.0.1:9001", "id": "u1"}]},
            {"name": "orders", "targets": [{"url": "http://127.0.0.1:9002", "id": "o1"}], "required": False},
        ],
        "routes": [{"path": "/users/*", "service": "users", "rate_limits": ["basic"]}],
        "rate_limits": {"policies": {"basic": {"limits": ["10/second"]}}},
        "admin": {"api_keys": ["another-key", KEY]},
    }
    data.update(extra)
    return data


def gateway(tmp_path: Path | None = None, **extra: Any) -> tuple[GatewayEdge, GatewayRuntime]:
    config = parse_config(config_data(**extra))
    source = None
    if tmp_path is not None:
        path = tmp_path / "gateway.yaml"
        path.write_text(json.dumps(config_data(**extra)))
        source = lambda: load_config(path, environ={})  # noqa: E731
    runtime = GatewayRuntime(config, registry_store=MemoryRegistryStore(), config_source=source)
    return create_app(config, runtime=runtime), runtime


def client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer wrong"},
        {"authorization": f"Basic {KEY}"},
        {"x-admin-key": KEY[:-1]},
        {"authorization": "Bearer"},
    ],
)
async def test_missing_or_wrong_credentials_get_the_same_401(headers: dict[str, str]) -> None:
    app, _ = gateway()
    async with client(app) as http:
        response = await http.get("/_admin/services", headers=headers)
        reference = await http.get("/_admin/services")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == 'Bearer realm="nexus-admin"'
    # Identical but for the request id, which the admin stack's RequestIDMiddleware gives every answer.
    assert response.json().pop("request_id") != reference.json().pop("request_id")
    assert {k: v for k, v in response.json().items() if k != "request_id"} == {
        k: v for k, v in reference.json().items() if k != "request_id"
    }
    assert response.json()["status"] == 401


@pytest.mark.parametrize("headers", [AUTH, {"x-admin-key": KEY}, {"x-admin-key": "another-key"}])
async def test_a_configured_key_is_accepted(headers: dict[str, str]) -> None:
    app, _ = gateway()
    async with client(app) as http:
        response = await http.get("/_admin/services", headers=headers)
    assert response.status_code == 200
    assert [service["name"] for service in response.json()["services"]] == ["users", "orders"]


@pytest.mark.parametrize(("roles", "status"), [({"gateway-admin"}, 200), ({"reader"}, 401)])
async def test_a_principal_with_an_admin_role_is_accepted(roles: set[str], status: int) -> None:
    app, _ = gateway()

    async def authenticated(scope: Scope, receive: Receive, send: Send) -> None:
        # What a JWT layer in front of the admin API leaves in the request context.
        publish_principal(scope, Principal(subject="ops", method="jwt", roles=frozenset(roles)))
        await app(scope, receive, send)

    async with client(authenticated) as http:
        response = await http.get("/_admin/services")
    assert response.status_code == status


async def test_services_show_health_and_in_flight() -> None:
    app, runtime = gateway()
    runtime.tracker.service("users").attempt_started(runtime.registry.targets("users")[0])
    async with client(app) as http:
        users = (await http.get("/_admin/services/users", headers=AUTH)).json()
        missing = await http.get("/_admin/services/nope", headers=AUTH)
        index = (await http.get("/_admin", headers=AUTH)).json()
    assert users["strategy"] == "round_robin" and users["healthy_targets"] == 1
    (target,) = users["targets"]
    assert target["id"] == "u1" and target["source"] == "config"
    assert target["healthy"] is True and target["in_flight"] == 1
    assert missing.status_code == 404 and missing.headers["content-type"] == "application/problem+json"
    assert index["services"] == ["users", "orders"] and "/reload" in index["endpoints"]


async def test_register_and_deregister_targets() -> None:
    app, runtime = gateway()
    body = {
        "url": "http://127.0.0.1:9010",
        "id": "u2",
        "weight": 3,
        "version": "v2",
        "zone": "b",
        "tags": ["x"],
    }
    async with client(app) as http:
        created = await http.post("/_admin/services/users/targets", headers=AUTH, json=body)
        duplicate = await http.post("/_admin/services/orders/targets", headers=AUTH, json=body)
        unknown = await http.post("/_admin/services/nope/targets", headers=AUTH, json=body)
        invalid = await http.post("/_admin/services/users/targets", headers=AUTH, json={"url": "http://h/p"})
        not_json = await http.post("/_admin/services/users/targets", headers=AUTH, content=b"{")
        listed = (await http.get("/_admin/services/users", headers=AUTH)).json()
        healthy = [t.id for t in runtime.tracker.service("users").healthy()]
        static = await http.delete("/_admin/services/users/targets/u1", headers=AUTH)
        removed = await http.delete("/_admin/services/users/targets/u2", headers=AUTH)
        again = await http.delete("/_admin/services/users/targets/u2", headers=AUTH)
    assert created.status_code == 201 and created.json()["weight"] == 3
    assert duplicate.status_code == 409
    assert unknown.status_code == 404
    assert invalid.status_code == 400 and "url" in invalid.json()["detail"]
    assert not_json.status_code == 400
    assert [(t["id"], t["source"]) for t in listed["targets"]] == [("u1", "config"), ("u2", "dynamic")]
    assert healthy == ["u1", "u2"]  # the balancer sees it at once
    assert static.status_code == 409
    assert removed.status_code == 200 and again.status_code == 404
    assert [t.id for t in runtime.registry.targets("users")] == ["u1"]


class DownStore(MemoryRegistryStore):
    async def put(self, service: str, target: Target) -> None:
        raise StorageError("registry store down")

    async def remove(self, service: str, target_id: str) -> bool:
        raise StorageError("registry store down")


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/_admin/services/{service}/targets"), ("DELETE", "/_admin/services/{service}/targets/u2")],
)
async def test_registry_writes_refuse_unknown_services_and_store_outages_alike(
    method: str, path: str
) -> None:
    body = {"url": "http://127.0.0.1:9010", "id": "u2"}
    app, _ = gateway()
    config = parse_config(config_data())
    down = create_app(config, runtime=GatewayRuntime(config, registry_store=DownStore()))
    async with client(app) as http, client(down) as http_down:
        unknown = await http.request(method, path.format(service="nope"), headers=AUTH, json=body)
        outage = await http_down.request(method, path.format(service="users"), headers=AUTH, json=body)
    assert unknown.status_code == 404
    assert unknown.json()["detail"] == "No service named 'nope'."
    assert outage.status_code == 503
    assert outage.json()["detail"] == "The registry store is unavailable; try again."


async def test_breakers_hook() -> None:
    app, runtime = gateway()
    async with client(app) as http:
        assert (await http.get("/_admin/breakers", headers=AUTH)).json() == {"breakers": [], "wired": False}
        runtime.breaker_states = lambda: [{"key": "users", "state": "open"}]
        assert (await http.get("/_admin/breakers", headers=AUTH)).json()["breakers"] == [
            {"key": "users", "state": "open"}
        ]


async def test_view_and_replace_rate_limit_policies() -> None:
    app, runtime = gateway()
    replaced: list[dict[str, Any]] = []

    class Hook:
        def get(self) -> dict[str, Any]:
            return {"from": "hook"}

        def replace(self, policies: dict[str, Any]) -> None:
            replaced.append(policies)

    new = {"basic": {"limits": ["5/second"]}, "gold": {"limits": ["100/second"], "key": "principal"}}
    async with client(app) as http:
        before = (await http.get("/_admin/rate-limits", headers=AUTH)).json()
        ok = await http.put("/_admin/rate-limits", headers=AUTH, json={"policies": new})
        bad = await http.put(
            "/_admin/rate-limits", headers=AUTH, json={"policies": {"x": {"limits": ["lots"]}}}
        )
        dangling = await http.put("/_admin/rate-limits", headers=AUTH, json={"policies": {}})
        shape = await http.put("/_admin/rate-limits", headers=AUTH, json=[1])
        runtime.rate_limit_policies = Hook()
        hooked = await http.put("/_admin/rate-limits", headers=AUTH, json={"policies": new})
        view = (await http.get("/_admin/rate-limits", headers=AUTH)).json()
    assert before["policies"]["basic"]["limits"] == ["10/second"] and before["enforced"] is True
    assert ok.status_code == 200 and ok.json()["policies"]["gold"]["key"] == "principal"
    assert runtime.config.rate_limits.policies["basic"].limits == ["5/second"]
    assert bad.status_code == 400 and "rate_limits.policies.x.limits" in bad.json()["detail"]
    assert dangling.status_code == 400 and "unknown rate-limit policy 'basic'" in dangling.json()["detail"]
    assert shape.status_code == 400
    assert hooked.json()["enforced"] is True and replaced[0]["gold"]["limits"] == ["100/second"]
    assert view == {"policies": {"from": "hook"}, "enforced": True}


async def test_reload_validates_first_and_keeps_the_running_config(tmp_path: Path) -> None:
    app, runtime = gateway(tmp_path)
    running = runtime.config
    bad = json.dumps(config_data(routes=[{"path": "/x", "service": "ghost"}]))
    new_routes = [{"path": "/orders/*", "service": "orders"}, {"path": "/users/*", "service": "users"}]
    good = json.dumps(config_data(routes=new_routes, listen={"port": 9999}))
    async with client(app) as http:
        refused = await http.post("/_admin/reload", headers=AUTH, content=bad)
        assert runtime.config is running
        not_yaml = await http.post("/_admin/reload", headers=AUTH, content=b"listen: [")
        accepted = await http.post("/_admin/reload", headers=AUTH, content=good)
        from_file = await http.post("/_admin/reload", headers=AUTH)
    assert refused.status_code == 400
    assert refused.json()["errors"] == [{"key": "routes[0].service", "problem": "unknown service 'ghost'"}]
    assert not_yaml.status_code == 400 and "not valid YAML" in not_yaml.json()["errors"][0]["problem"]
    assert accepted.status_code == 200
    assert accepted.json()["routes"] == 2 and accepted.json()["restart_required_for"] == ["listen"]
    assert from_file.status_code == 200 and from_file.json()["routes"] == 1
    assert len(runtime.router.routes) == 1


async def test_reload_without_a_file_needs_a_body() -> None:
    app, _ = gateway()
    async with client(app) as http:
        response = await http.post("/_admin/reload", headers=AUTH)
    assert response.status_code == 400 and "no config file" in response.json()["detail"]


async def test_status_page_and_unknown_paths() -> None:
    app, _ = gateway()
    async with client(app) as http:
        page = await http.get("/_admin/status", headers=AUTH)
        wrong_method = await http.delete("/_admin/services", headers=AUTH)
        unknown = await http.get("/_admin/nothing", headers=AUTH)
        too_big = await http.post("/_admin/reload", headers=AUTH, content=b"x" * (1024 * 1024 + 1))
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<td>u1</td>" in page.text and "<td>healthy</td>" in page.text
    assert wrong_method.status_code == 405 and wrong_method.headers["allow"] == "GET"
    assert unknown.status_code == 404
    assert too_big.status_code == 413


async def test_admin_websocket_is_refused_before_accept() -> None:
    app, _ = gateway()
    scope = make_scope(
        "/_admin/services", scope_type="websocket", headers=[("authorization", f"Bearer {KEY}")]
    )
    recorded = await run_asgi(app, scope)
    assert recorded.messages[0]["type"] == "websocket.close"


async def test_admin_disabled_leaves_the_prefix_to_routing() -> None:
    app, _ = gateway(admin={"enabled": False})
    async with client(app) as http:
        response = await http.get("/_admin/services", headers=AUTH)
    assert response.status_code == 404
    assert response.json()["detail"] == "No route matches this request."


@pytest.mark.parametrize(
    "change",
    [
        {
            "path": "/users/*",
            "service": "users",
            "rate_limits": ["basic"],
            "auth": "optional",
            "roles": ["ops"],
        },
        {"path": "/new/*", "service": "users", "auth": "required"},
        {"path": "/users/*", "service": "users", "rate_limits": ["basic"], "max_concurrent": 5},
    ],
)
async def test_a_reload_that_changes_a_stack_policy_rebuilds_the_stack(change: dict[str, Any]) -> None:
    auth = {"api_keys": {"keys": []}}
    app, runtime = gateway(auth=auth)
    stack = app.app
    body = json.dumps(config_data(routes=[change], auth=auth))
    async with client(app) as http:
        rebuilt = await http.post("/_admin/reload", headers=AUTH, content=body)
    assert rebuilt.status_code == 200 and rebuilt.json()["rebuilt"] == ["routes"]
    assert app.app is not stack and runtime.config.routes[0].path == change["path"]


async def test_a_reload_without_policy_changes_keeps_the_stack() -> None:
    app, runtime = gateway()
    stack, hooks = app.app, list(runtime.header_hooks)
    data = config_data()
    data["services"][0]["targets"] = [{"url": "http://127.0.0.1:9011", "id": "u9"}]
    async with client(app) as http:
        reloaded = await http.post("/_admin/reload", headers=AUTH, content=json.dumps(data))
    assert reloaded.status_code == 200 and reloaded.json()["rebuilt"] == []
    assert app.app is stack and runtime.header_hooks == hooks
    assert [target.id for target in runtime.registry.targets("users")] == ["u9"]


async def test_a_rebuild_that_fails_keeps_the_running_stack_and_config() -> None:
    app, runtime = gateway()
    stack, running = app.app, runtime.config

    def broken(inner: ASGIApp, config: Any, runtime: GatewayRuntime) -> ASGIApp:
        raise RuntimeError("the factory failed")

    # A stack served elsewhere whose factory fails: nothing of the build is served, the edge included.
    runtime.mounts.append(Mount([("broken", broken)], ok_app, StackSlot(ok_app)))
    body = json.dumps(config_data(routes=[{"path": "/users/*", "service": "users", "max_body_size": 10}]))
    async with client(app) as http:
        failed = await http.post("/_admin/reload", headers=AUTH, content=body)
    assert failed.status_code == 500 and failed.headers["content-type"] == "application/problem+json"
    assert failed.json()["error"] == "RuntimeError: the factory failed"
    assert "running configuration is kept" in failed.json()["detail"]
    assert app.app is stack and runtime.config is running


async def test_restart_keys_keep_their_running_values() -> None:
    app, runtime = gateway()
    body = json.dumps(config_data(listen={"port": 9999}, storage={"default": "redis://127.0.0.1:1/0"}))
    async with client(app) as http:
        reloaded = await http.post("/_admin/reload", headers=AUTH, content=body)
    assert reloaded.json()["restart_required_for"] == ["listen", "storage"]
    assert runtime.config.listen.port == 8080 and runtime.config.storage.default == "memory://"
    assert reloaded.json()["rebuilt"] == []


def _routes(*routes: dict[str, Any]) -> GatewayConfig:
    return parse_config(config_data(routes=list(routes), auth={"api_keys": {"keys": []}}), environ={})


INTERNAL = {"path": "/admin/*", "host": "internal.example.com", "service": "users", "auth": "required"}
PUBLIC = {"path": "/admin/*", "host": "public.example.com", "service": "users"}
CATCH_ALL = {"path": "/*", "service": "users", "auth": "required"}
OPEN = {"path": "/open", "service": "users"}


@pytest.mark.parametrize(
    ("running", "new", "changed"),
    [
        ([INTERNAL], [INTERNAL], []),
        ([INTERNAL], [INTERNAL, PUBLIC], ["routes"]),  # every route has an entry in the stack's tables
        ([INTERNAL], [{**INTERNAL, "host": "public.example.com"}], ["routes"]),  # the guard moves host
        ([PUBLIC, INTERNAL], [{**PUBLIC, "auth": "required"}, INTERNAL], ["routes"]),
        ([OPEN, CATCH_ALL], [CATCH_ALL], ["routes"]),  # the stack must stop answering for /open
        ([OPEN, CATCH_ALL], [CATCH_ALL, OPEN], ["routes"]),  # first match wins: order is a policy
    ],
)
def test_stack_policy_changes_see_hosts_and_route_order(
    running: list[dict[str, Any]], new: list[dict[str, Any]], changed: list[str]
) -> None:
    assert stack_policy_changes(_routes(*running), _routes(*new)) == changed
