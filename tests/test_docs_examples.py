"""The copy-paste examples in the README and the middleware pages run verbatim and behave as documented."""

import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
BIG = b"x" * (1024 * 1024 + 1)


def _example(page: str) -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), re.DOTALL)
    assert blocks, f"{page} has no python example"
    return str(blocks[0])


EXAMPLES: list[tuple[str, str, str, bytes | None, Callable[[httpx.Response], bool]]] = [
    (
        "README.md",
        "GET",
        "/hello",
        None,
        lambda r: r.json() == {"hello": "world"} and len(r.headers["x-request-id"]) == 32,
    ),
    (
        "docs/request_id.md",
        "GET",
        "/whoami",
        None,
        lambda r: r.json() == {"request_id": r.headers["x-request-id"], "same": r.headers["x-request-id"]},
    ),
    (
        "docs/security_headers.md",
        "GET",
        "/",
        None,
        lambda r: (
            r.headers["cross-origin-resource-policy"] == "cross-origin"
            and "x-frame-options" not in r.headers
            and r.headers["x-content-type-options"] == "nosniff"
        ),
    ),
    ("docs/body_limit.md", "POST", "/elsewhere", BIG, lambda r: r.status_code == 413),
    ("docs/body_limit.md", "POST", "/import", BIG, lambda r: r.status_code == 404),  # no limit, no route
    ("docs/body_limit.md", "POST", "/uploads/a", BIG, lambda r: r.status_code == 404),
    (
        "docs/composition.md",
        "GET",
        "/health",
        None,
        lambda r: (
            r.json() == {"status": "ok"}
            and len(r.headers["x-request-id"]) == 32
            and r.headers["x-content-type-options"] == "nosniff"
            and "ratelimit" in r.headers
        ),
    ),
    (
        "docs/composition.md",
        "GET",
        "/orders",
        None,
        lambda r: (
            r.status_code == 401
            and r.json()["request_id"] == r.headers["x-request-id"]
            and r.headers["www-authenticate"] == "Bearer"
            and r.headers["x-content-type-options"] == "nosniff"
        ),
    ),
    (
        "docs/composition.md",
        "GET",
        "/metrics",
        None,
        lambda r: r.status_code == 200 and "nexus_http_requests_total" in r.text,
    ),
]


@pytest.mark.parametrize(("page", "method", "path", "content", "check"), EXAMPLES)
async def test_example_runs_verbatim(
    page: str, method: str, path: str, content: bytes | None, check: Callable[[httpx.Response], bool]
) -> None:
    namespace: dict[str, Any] = {"__name__": f"docs_example_{Path(page).stem}"}
    root = logging.getLogger()
    root_handlers = list(root.handlers)
    try:
        exec(compile(_example(page), page, "exec"), namespace)
        transport = httpx.ASGITransport(app=namespace["app"])
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            response = await client.request(method, path, content=content)
    finally:
        for handler in root.handlers:
            if handler not in root_handlers:
                root.removeHandler(handler)
    assert check(response), (response.status_code, response.headers, response.text)


def test_index_links_every_middleware_page_once_in_alphabetical_order() -> None:
    import nexus_middleware

    index = (ROOT / "docs/index.md").read_text()
    section = index.split("## Middlewares\n", 1)[1].split("\n## ", 1)[0]
    entries = [line for line in section.splitlines() if line.startswith("- [")]
    assert len(entries) == len(section.strip().splitlines()) - 1  # one line each, below the comment
    titles = [line[3 : line.index("]")] for line in entries]
    assert titles == sorted(titles, key=str.lower)
    for name in nexus_middleware.__all__:
        if name.endswith("Middleware"):
            assert f"`{name}`" in section, f"{name} has no line under Middlewares in docs/index.md"
    linked = re.findall(r"\]\(([\w-]+\.md)\)", index)
    pages = {path.name for path in (ROOT / "docs").glob("*.md")} - {"index.md"}
    assert sorted(linked) == sorted(pages)  # every page linked, and once


def test_composition_table_places_every_exported_middleware() -> None:
    import nexus_middleware

    table = (ROOT / "docs/composition.md").read_text().split("\n\n", 2)[2].split("\n\n", 1)[0]
    for name in nexus_middleware.__all__:
        if name.endswith("Middleware"):
            assert f"`{name}`" in table, f"{name} has no row in docs/composition.md"
