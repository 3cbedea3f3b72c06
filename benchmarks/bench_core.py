"""Core layers on the request path: the exception safety net and path normalization."""

from typing import Any

from benchmarks.conftest import Driver, bare_app, bench, make_http_scope
from nexus_middleware import ProblemDetailsMiddleware
from nexus_middleware.paths import normalize_path


def test_problem_details_middleware(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "ProblemDetailsMiddleware", ProblemDetailsMiddleware(bare_app))


def test_normalize_clean_path(benchmark: Any) -> None:
    benchmark.group = "paths"
    benchmark(normalize_path, "/api/v1/users/42/orders")


def test_normalize_hostile_path(benchmark: Any) -> None:
    benchmark.group = "paths"
    benchmark(normalize_path, "/api//v1/./users/%34%32/../42/orders%2Fx")


def test_scope_factory_is_realistic() -> None:
    assert len(make_http_scope()["headers"]) == 10
