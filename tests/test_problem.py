import json

import pytest

from nexus_middleware.context import get_context
from nexus_middleware.problem import Problem, send_problem, websocket_close_code
from tests.support.asgi import Recorded, make_scope


async def _send(scope, problem: Problem, **kwargs) -> Recorded:
    recorded = Recorded()

    async def send(message) -> None:
        recorded.messages.append(message)

    await send_problem(scope, send, problem, **kwargs)
    return recorded


async def test_http_problem_is_problem_json_with_all_members() -> None:
    scope = make_scope()
    get_context(scope).request_id = "req-1"
    problem = Problem(429, "slow down", type="https://example.com/p", instance="/x", extensions={"a": 1})
    recorded = await _send(scope, problem, headers=[(b"retry-after", b"3")])
    assert recorded.status == 429
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.header("retry-after") == "3"
    assert recorded.header("cache-control") == "no-store"
    assert int(recorded.header("content-length") or 0) == len(recorded.body)
    assert recorded.json() == {
        "type": "https://example.com/p",
        "title": "Too Many Requests",
        "status": 429,
        "detail": "slow down",
        "instance": "/x",
        "a": 1,
        "request_id": "req-1",
    }
    assert get_context(scope).local_response == "nexus"
    assert recorded.complete


async def test_upstream_failures_are_not_marked_local() -> None:
    scope = make_scope()
    await _send(scope, Problem(502), layer=None)
    assert get_context(scope).local_response is None


async def test_default_title_and_type() -> None:
    body = json.loads(Problem(404).body())
    assert body == {"type": "about:blank", "title": "Not Found", "status": 404}
    assert Problem(599).to_dict()["title"] == "Error"


@pytest.mark.parametrize("kwargs", [{"status": 200}, {"status": 400, "extensions": {"status": 1}}])
def test_invalid_problem(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Problem(**kwargs)  # type: ignore[arg-type]


async def test_websocket_refusal_uses_http_denial_extension_when_offered() -> None:
    scope = make_scope(scope_type="websocket", extensions={"websocket.http.response": {}})
    recorded = await _send(scope, Problem(401, "no token"))
    assert [m["type"] for m in recorded.messages] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert recorded.messages[0]["status"] == 401
    assert json.loads(recorded.messages[1]["body"])["detail"] == "no token"


async def test_websocket_refusal_closes_before_accept_otherwise() -> None:
    scope = make_scope(scope_type="websocket")
    recorded = await _send(scope, Problem(403, "forbidden"))
    assert recorded.messages == [{"type": "websocket.close", "code": 1008, "reason": "forbidden"}]


@pytest.mark.parametrize(
    ("status", "code"),
    [(401, 1008), (403, 1008), (413, 1009), (431, 1009), (429, 1013), (503, 1013), (500, 1011)],
)
def test_websocket_close_codes(status: int, code: int) -> None:
    assert websocket_close_code(status) == code
