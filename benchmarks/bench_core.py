"""Core layers on the request path: the exception safety net, path normalization and route lookup."""

from typing import Any

from benchmarks.conftest import Driver, bare_app, bench, make_http_scope
from nexus_middleware import ProblemDetailsMiddleware
from nexus_middleware.paths import RouteEntry, RouteTable, normalize_path
from nexus_middleware.types import Scope


def test_problem_details_middleware(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "ProblemDetailsMiddleware", ProblemDetailsMiddleware(bare_app))


def test_normalize_clean_path(benchmark: Any) -> None:
    benchmark.group = "paths"
    benchmark(normalize_path, "/api/v1/users/42/orders")


def test_normalize_hostile_path(benchmark: Any) -> None:
    benchmark.group = "paths"
    benchmark(normalize_path, "/api//v1/./users/%34%32/../42/orders%2Fx")


_ROUTES: list[RouteEntry[str]] = [
    ("/health", None, "health"),
    ("/api/users/{id}", ["GET"], "users-read"),
    ("/api/users/{id}", ["PUT", "DELETE"], "users-write"),
    ("/api/orders/*", None, "orders"),
    ("/api/items/{id:int}", None, "items"),
    ("*", None, "default"),
]
# The same routes, with two hosts' own entries in front: what a gateway with host routes builds.
_HOSTED: list[RouteEntry[str]] = [
    ("/api/items/{id:int}", None, "admin-items", "admin.example.com"),
    ("/api/*", None, "api-only", "api.example.com"),
    *_ROUTES,
]


def _lookup(table: RouteTable[str], scope: Scope) -> str | None:
    # What a layer does per request: pick the request's table, then look the path up in it.
    return table.for_request(scope).lookup("/api/items/42", "GET")


def test_route_lookup_before_hosts(benchmark: Any) -> None:
    # The lookup as layers did it before hosts: the floor the host-less case is compared with.
    benchmark.group = "routes"
    table = RouteTable(_ROUTES)
    benchmark(table.lookup, "/api/items/42", "GET")


def test_route_lookup_without_hosts(benchmark: Any) -> None:
    benchmark.group = "routes"
    table = RouteTable(_ROUTES)
    scope = make_http_scope()
    assert _lookup(table, scope) == "items"
    benchmark(_lookup, table, scope)


def test_route_lookup_with_hosts(benchmark: Any) -> None:
    benchmark.group = "routes"
    table = RouteTable(_HOSTED)
    scope = make_http_scope()  # Host: api.example.com
    assert _lookup(table, scope) == "api-only"
    benchmark(_lookup, table, scope)


def test_route_lookup_with_hosts_for_another_host(benchmark: Any) -> None:
    benchmark.group = "routes"
    table = RouteTable(_HOSTED)
    scope = make_http_scope(headers=[(b"host", b"www.example.com:8443")])
    assert _lookup(table, scope) == "items"
    benchmark(_lookup, table, scope)


def test_scope_factory_is_realistic() -> None:
    assert len(make_http_scope()["headers"]) == 10
