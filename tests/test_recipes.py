"""Every recipe in recipes/ served by a real uvicorn and asked a real question.

A new recipe adds its rows to CHECKS; a recipe without any row fails `test_every_recipe_is_checked`.
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx
import pytest

import recipes
from tests.support.servers import serve


@dataclass(frozen=True)
class Check:
    module: str
    path: str
    method: str = "GET"
    content: bytes | None = None
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    factory_kwargs: dict[str, str] | None = None  # build with create_app(**factory_kwargs)
    expect: Callable[[httpx.Response], bool] = field(default=lambda response: True)


JWT_RECIPE = {
    "issuer": "https://idp.example.com/",
    "audience": "orders-api",
    "jwks_url": "http://127.0.0.1:9/jwks.json",
}

CHECKS = [
    Check(
        "fastapi_basic",
        "/hello",
        expect=lambda r: (
            r.json() == {"hello": "world"}
            and len(r.headers["x-request-id"]) == 32
            and r.headers["x-content-type-options"] == "nosniff"
        ),
    ),
    Check(
        "fastapi_basic",
        "/stream?count=3",
        expect=lambda r: r.text.count("line ") == 3 and r.headers["x-request-id"] in r.text,
    ),
    Check(
        "fastapi_basic",
        "/hello",
        method="POST",
        content=b"x" * (1024 * 1024 + 1),
        status=413,
        expect=lambda r: r.headers["content-type"] == "application/problem+json",
    ),
    Check(
        "per_plan_limits",
        "/items/1",
        headers={"x-demo-user": "alice; pro"},
        expect=lambda r: "ratelimit-policy" in r.headers and "ratelimit" in r.headers,
    ),
    # GET /items, not POST /login: the shared Redis keeps buckets between runs, and login allows 5/minute.
    Check(
        "login_fail_closed", "/items", expect=lambda r: r.json() == {"items": []} and "ratelimit" in r.headers
    ),
    # Nothing listens at the recipe's default dependency address: the route answers its own 502 problem.
    Check(
        "flaky_dependency",
        "/quotes/ACME",
        status=502,
        expect=lambda r: r.headers["content-type"] == "application/problem+json",
    ),
    # The JWKS URL is never fetched on these paths: /health is exempt and a missing token is refused at once.
    *(
        Check("fastapi_jwt_rbac", path, status=status, factory_kwargs=JWT_RECIPE, expect=expect)
        for path, status, expect in [
            ("/health", 200, lambda r: r.json() == {"status": "ok"}),
            (
                "/orders/1",
                401,
                lambda r: (
                    r.headers["www-authenticate"].startswith("Bearer")
                    and r.headers["content-type"] == "application/problem+json"
                ),
            ),
        ]
    ),
]


def _recipe_modules() -> list[str]:
    return sorted(
        info.name for info in pkgutil.iter_modules(recipes.__path__) if not info.name.startswith("_")
    )


def test_every_recipe_is_checked() -> None:
    assert _recipe_modules(), "recipes/ holds no recipe"
    checked = {check.module for check in CHECKS}
    assert set(_recipe_modules()) <= checked, f"recipes without checks: {set(_recipe_modules()) - checked}"


@pytest.mark.e2e
@pytest.mark.parametrize("check", CHECKS, ids=lambda c: f"{c.module}:{c.method} {c.path}")
async def test_recipe_serves_real_responses(check: Check) -> None:
    module = importlib.import_module(f"recipes.{check.module}")
    if check.factory_kwargs is not None:
        app = module.create_app(**check.factory_kwargs)
    else:
        app = module.app if hasattr(module, "app") else module.create_app()  # factory recipes
    async with serve(app) as base_url, httpx.AsyncClient(base_url=base_url) as client:
        response = await client.request(
            check.method, check.path, content=check.content, headers=check.headers
        )
    assert response.status_code == check.status, response.text
    assert check.expect(response)
