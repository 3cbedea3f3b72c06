import asyncio

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from nexus_middleware.context import (
    ANONYMOUS,
    Principal,
    RequestContext,
    bind_context,
    current_context,
    current_request_id,
    enter_context,
    exit_context,
    get_context,
    peek_context,
    publish_principal,
    route_template,
)
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, run_asgi


def test_get_context_creates_once_in_scope_state() -> None:
    scope = make_scope()
    assert peek_context(scope) is None
    context = get_context(scope)
    assert get_context(scope) is context
    assert scope["state"]["nexus"] is context
    assert peek_context(scope) is context


def test_record_and_lookup_decisions() -> None:
    context = RequestContext()
    context.record("ratelimit", "allow", rule="default", remaining=4)
    decision = context.record("ratelimit", "deny", rule="default", reason="quota", remaining=0)
    assert context.decision("ratelimit") is decision
    assert decision.details["remaining"] == 0
    assert context.decision("auth") is None
    with pytest.raises(TypeError):
        decision.details["x"] = 1  # type: ignore[index]


async def test_bind_context_resets_even_on_error_and_isolates_tasks() -> None:
    outer = RequestContext(request_id="outer")
    with pytest.raises(RuntimeError), bind_context(outer):
        assert current_request_id() == "outer"
        with bind_context(outer):  # re-binding the same context is a no-op
            assert current_context() is outer
        raise RuntimeError
    assert current_context() is None

    async def handle(request_id: str) -> str | None:
        with bind_context(RequestContext(request_id=request_id)):
            await asyncio.sleep(0)
            return current_request_id()

    assert await asyncio.gather(*(handle(str(i)) for i in range(20))) == [str(i) for i in range(20)]


def test_principal_is_immutable_and_starlette_user_compatible() -> None:
    principal = Principal("alice", method="jwt", roles=frozenset({"admin"}))
    assert principal.is_authenticated and principal.display_name == "alice" and principal.identity == "alice"
    assert not ANONYMOUS.is_authenticated
    with pytest.raises(AttributeError):
        principal.subject = "mallory"  # type: ignore[misc]


async def test_route_template_from_starlette_router_and_mounts() -> None:
    seen: list[str | None] = []

    def capture(app):
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            async def send_wrapper(message):
                if message["type"] == "http.response.start":
                    seen.append(route_template(scope))
                await send(message)

            await app(scope, receive, send_wrapper)

        return middleware

    async def endpoint(request: Request) -> PlainTextResponse:
        context = get_context(request.scope)
        assert request.state.nexus is context
        return PlainTextResponse("ok")

    inner = Starlette(routes=[Route("/items/{item_id}", endpoint)])
    app = capture(Starlette(routes=[Route("/users/{user_id}", endpoint), Mount("/api", app=inner)]))
    await run_asgi(app, make_scope("/users/7"))
    await run_asgi(app, make_scope("/api/items/9"))
    await run_asgi(app, make_scope("/nowhere"))
    assert seen == ["/users/{user_id}", "/api/items/{item_id}", None]


def test_route_template_prefers_the_context() -> None:
    scope = make_scope()
    get_context(scope).route = "/from/context"
    assert route_template(scope) == "/from/context"


async def test_publish_principal_is_seen_by_starlette_request_user_and_requires() -> None:
    from starlette.authentication import requires

    @requires("orders:read")
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(f"{request.user.display_name}:{request.state.nexus.principal.tenant}")

    def authenticate(app, principal: Principal):
        async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
            publish_principal(scope, principal)
            await app(scope, receive, send)

        return middleware

    app = Starlette(routes=[Route("/orders", endpoint)])
    allowed = Principal("alice", method="jwt", tenant="acme", scopes=frozenset({"orders:read"}))
    recorded = await run_asgi(authenticate(app, allowed), make_scope("/orders"))
    assert (recorded.status, recorded.body) == (200, b"alice:acme")
    denied = await run_asgi(authenticate(app, Principal("bob", method="jwt")), make_scope("/orders"))
    assert denied.status == 403


def test_enter_and_exit_context_bind_and_restore_like_bind_context() -> None:
    outer, inner = RequestContext(request_id="outer"), RequestContext(request_id="inner")
    token = enter_context(outer)
    try:
        nested = enter_context(inner)
        assert current_context() is inner
        exit_context(nested)
        assert current_context() is outer
    finally:
        exit_context(token)
    assert current_context() is None
