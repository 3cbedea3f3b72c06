import asyncio
from dataclasses import replace
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from starlette.websockets import WebSocket

from nexus_middleware import get_context
from nexus_middleware.api_keys import (
    APIKeyManager,
    APIKeyMiddleware,
    APIKeyPolicy,
    APIKeyRecord,
    APIKeyStore,
    MemoryAPIKeyStore,
    RedisAPIKeyStore,
    hash_api_key_secret,
)
from nexus_middleware.clock import ManualClock
from nexus_middleware.context import Principal
from nexus_middleware.errors import (
    ConfigurationError,
    StorageError,
    StorageUnavailableError,
    UnknownAPIKeyError,
)
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import Recorded, make_scope, ok_app, run_asgi
from tests.support.servers import free_port, serve


class PrincipalApp:
    """Answers 200 and keeps the principal and context it saw."""

    def __init__(self) -> None:
        self.principals: list[Principal | None] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.principals.append(get_context(scope).principal)
        await ok_app(scope, receive, send)


async def issue(store: APIKeyStore, clock: ManualClock, **options: Any) -> str:
    manager = APIKeyManager(store, clock=clock)
    options.setdefault("owner", "alice")
    return (await manager.create(**options)).key


def key_scope(*values: str, path: str = "/orders", name: str = "X-API-Key", **options: Any) -> Scope:
    return make_scope(path, headers=[(name, value) for value in values], **options)


def flip(key: str, index: int) -> str:
    replacement = "A" if key[index] != "A" else "B"
    return key[:index] + replacement + key[index + 1 :]


def refusal_bytes(recorded: Recorded) -> tuple[Any, ...]:
    start = recorded.start
    return (start["status"], tuple(start["headers"]), recorded.body)


async def test_valid_key_publishes_principal_and_records_allow(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(
        store,
        manual_clock,
        org="acme",
        scopes=["orders:read"],
        roles=["reader"],
        plan="gold",
        rate_limits={"default": "100/minute"},
        metadata={"team": "payments"},
        expires_in=3600,
    )
    app = PrincipalApp()
    scope = key_scope(key)
    recorded = await run_asgi(APIKeyMiddleware(app, store=store, clock=manual_clock), scope)
    assert recorded.status == 200
    principal = app.principals[0]
    assert principal is not None
    assert principal.method == "api_key"
    assert principal.subject == "alice"
    assert principal.tenant == "acme"
    assert principal.scopes == {"orders:read"}
    assert principal.roles == {"reader"}
    assert principal.plan == "gold"
    assert principal.key_id == key.split("_")[1]
    assert principal.expires_at == manual_clock.time() + 3600
    assert principal.claims["rate_limits"] == {"default": "100/minute"}
    assert principal.claims["metadata"] == {"team": "payments"}
    assert scope["user"] is principal and scope["auth"] is principal
    decision = get_context(scope).decision("auth")
    assert decision is not None
    assert (decision.outcome, decision.details["method"]) == ("allow", "api_key")


async def test_every_failure_gets_a_byte_identical_response(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    manager = APIKeyManager(store, clock=manual_clock)
    good = (await manager.create(owner="alice")).key
    revoked = (await manager.create(owner="bob")).key
    await manager.revoke(revoked.split("_")[1])
    expired = (await manager.create(owner="carol", expires_in=10)).key
    manual_clock.advance(11)
    key_id = good.split("_")[1]
    attempts: dict[str, list[str]] = {
        "first byte wrong": [flip(good, 0)],
        "first secret byte wrong": [flip(good, len(key_id) + 4)],
        "last byte wrong": [flip(good, len(good) - 1)],
        "unknown id": [good.replace(key_id, "0" * len(key_id))],
        "revoked": [revoked],
        "expired": [expired],
        "malformed": ["not-a-key"],
        "empty": [""],
        "truncated": [good[:-20]],
        "too long": [good + "x" * 500],
        "duplicate header": [good, good],
        "padded": [f" {good} "],
        "trailing tab": [good + "\t"],
        "missing": [],
    }
    reasons: dict[str, str | None] = {}
    responses = {}
    for label, values in attempts.items():
        scope = key_scope(*values)
        recorded = await run_asgi(APIKeyMiddleware(ok_app, store=store, clock=manual_clock), scope)
        assert recorded.status == 401, label
        responses[label] = refusal_bytes(recorded)
        decision = get_context(scope).decision("auth")
        assert decision is not None and decision.outcome == "deny"
        reasons[label] = decision.reason
    assert len(set(responses.values())) == 1, responses
    _, headers, body = next(iter(responses.values()))
    assert dict(headers)[b"content-type"] == b"application/problem+json"
    assert dict(headers)[b"www-authenticate"] == b'APIKey header="X-API-Key"'
    assert b"detail" in body
    assert reasons["first byte wrong"] == "malformed"  # the prefix is part of the format
    assert reasons["first secret byte wrong"] == reasons["last byte wrong"] == "invalid_key"
    assert reasons["unknown id"] == "unknown_key"
    assert reasons["revoked"] == "revoked"
    assert reasons["expired"] == "expired"
    assert reasons["duplicate header"] == reasons["padded"] == reasons["empty"] == "malformed"
    assert reasons["missing"] == "missing_credentials"
    # The same key, correctly presented, still works: the failures above were about the presentation.
    assert (
        await run_asgi(APIKeyMiddleware(ok_app, store=store, clock=manual_clock), key_scope(good))
    ).status == 200


@pytest.mark.parametrize(
    ("routes", "path", "method", "present", "expected", "principal"),
    [
        ({"exempt": ["/health"]}, "/health", "GET", False, 200, None),
        ({"exempt": ["/health"]}, "/orders", "GET", False, 401, None),
        ({"optional": ["/catalog/*"]}, "/catalog/1", "GET", False, 200, "anonymous"),
        ({"optional": ["/catalog/*"]}, "/catalog/1", "GET", True, 200, "api_key"),
        ({"routes": [("/items", ["GET"], "exempt")]}, "/items", "GET", False, 200, None),
        ({"routes": [("/items", ["GET"], "exempt")]}, "/items", "POST", False, 401, None),
        (
            {"required": ["/public/secret"], "exempt": ["/public/*"]},
            "/public/secret",
            "GET",
            False,
            401,
            None,
        ),
        ({"required": ["/public/secret"], "exempt": ["/public/*"]}, "/public/x", "GET", False, 200, None),
        ({"exempt": ["/health"]}, "//health/../health", "GET", False, 200, None),
        ({"exempt": ["/health"]}, "/%68ealth", "GET", False, 200, None),
    ],
)
async def test_route_modes(
    manual_clock: ManualClock,
    routes: dict[str, Any],
    path: str,
    method: str,
    present: bool,
    expected: int,
    principal: str | None,
) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    app = PrincipalApp()
    middleware = APIKeyMiddleware(app, store=store, clock=manual_clock, **routes)
    scope = make_scope(path, method=method, headers=[("X-API-Key", key)] if present else [])
    recorded = await run_asgi(middleware, scope)
    assert recorded.status == expected
    if expected == 200:
        seen = app.principals[0]
        assert (None if seen is None else seen.method) == principal


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("public.example.com", 200),
        ("internal.example.com", 401),
        ("INTERNAL.example.com:443", 401),
        (None, 200),
    ],
)
async def test_route_modes_follow_the_host(
    manual_clock: ManualClock, host: str | None, expected: int
) -> None:
    app = PrincipalApp()
    middleware = APIKeyMiddleware(
        app,
        store=MemoryAPIKeyStore(),
        routes=[
            ("/admin/*", None, "exempt", "public.example.com"),
            ("/admin/*", None, "required", "internal.example.com"),
            ("/admin/*", None, "exempt"),
        ],
        clock=manual_clock,
    )
    recorded = await run_asgi(
        middleware, make_scope("/admin/x", headers=[] if host is None else [("host", host)])
    )
    assert recorded.status == expected
    assert len(app.principals) == (1 if expected == 200 else 0)


async def test_optional_route_still_refuses_an_invalid_key(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    middleware = APIKeyMiddleware(ok_app, store=store, optional=["/*"], clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(flip(key, len(key) - 1)))).status == 401


async def test_a_principal_from_an_earlier_authenticator_passes_without_a_key(
    manual_clock: ManualClock,
) -> None:
    async def outer(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).principal = Principal(subject="jwt-user", method="jwt")
        await middleware(scope, receive, send)

    app = PrincipalApp()
    middleware = APIKeyMiddleware(app, store=MemoryAPIKeyStore(), clock=manual_clock)
    assert (await run_asgi(outer, make_scope("/orders"))).status == 200
    assert app.principals[0] is not None and app.principals[0].subject == "jwt-user"


async def test_invalid_path_is_a_400(manual_clock: ManualClock) -> None:
    middleware = APIKeyMiddleware(ok_app, store=MemoryAPIKeyStore(), exempt=["/health"])
    recorded = await run_asgi(middleware, make_scope("/x", raw_path=b"/a%00b"))
    assert recorded.status == 400
    assert recorded.header("content-type") == "application/problem+json"


async def test_query_parameter_only_when_configured(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    query = f"api_key={key}".encode()
    plain = APIKeyMiddleware(ok_app, store=store, clock=manual_clock)
    assert (await run_asgi(plain, make_scope("/x", query_string=query))).status == 401
    policy = APIKeyPolicy(query_param="api_key")
    configured = APIKeyMiddleware(ok_app, store=store, policy=policy, clock=manual_clock)
    assert (await run_asgi(configured, make_scope("/x", query_string=query))).status == 200
    twice = query + b"&" + query
    assert (await run_asgi(configured, make_scope("/x", query_string=twice))).status == 401
    both = make_scope("/x", query_string=query, headers=[("X-API-Key", key)])
    assert (await run_asgi(configured, both)).status == 401  # header and query: ambiguous, refused


async def test_custom_header_name(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    middleware = APIKeyMiddleware(ok_app, store=store, policy=APIKeyPolicy(header_name="X-Key"))
    assert (await run_asgi(middleware, key_scope(key, name="X-Key"))).status == 200
    refused = await run_asgi(middleware, key_scope(key))
    assert refused.status == 401
    assert refused.header("www-authenticate") == 'APIKey header="X-Key"'


async def test_manager_create_list_revoke_rotate_with_overlap(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    await lifecycle(store, manual_clock)


async def test_redis_store_lifecycle(redis_client: Any, redis_prefix: str, manual_clock: ManualClock) -> None:
    store = RedisAPIKeyStore(redis_client, prefix=redis_prefix + "keys:")
    await lifecycle(store, manual_clock)
    written = [key async for key in redis_client.scan_iter(match="*" + redis_prefix[-12:] + "*")]
    assert written and all(key.decode().startswith(redis_prefix) for key in written)


async def lifecycle(store: APIKeyStore, clock: ManualClock) -> None:
    manager = APIKeyManager(store, clock=clock)
    policy = APIKeyPolicy(cache_ttl=0)  # every request reads the store: no cache in this test

    async def status(key: str) -> int:
        middleware = APIKeyMiddleware(ok_app, store=store, policy=policy, clock=clock)
        return (await run_asgi(middleware, key_scope(key))).status

    first = await manager.create(owner="alice", org="acme", scopes=["a", "b"], plan="free")
    clock.advance(1)
    second = await manager.create(owner="bob", org="globex")
    assert "sha256:" in first.record.secret_hash
    secret = first.key.split("_", 2)[2]  # token_urlsafe: the secret itself may hold underscores
    assert secret not in repr(first) + repr(first.record)  # the secret never shows in reprs
    assert [record.key_id for record in await manager.list()] == [first.key_id, second.key_id]
    assert [record.key_id for record in await manager.list(org="acme")] == [first.key_id]
    assert [record.key_id for record in await manager.list(owner="bob")] == [second.key_id]
    assert await status(first.key) == 200
    assert (await manager.get(first.key_id)).scopes == {"a", "b"}

    rotated = await manager.rotate(first.key_id, overlap=60)
    assert rotated.key_id == first.key_id and rotated.key != first.key
    assert await status(rotated.key) == 200
    clock.advance(59)
    assert await status(first.key) == 200  # inside the overlap the old secret still works
    clock.advance(1)
    assert await status(first.key) == 401
    assert await status(rotated.key) == 200

    immediate = await manager.rotate(second.key_id)
    assert await status(second.key) == 401
    assert await status(immediate.key) == 200

    revoked = await manager.revoke(first.key_id)
    assert revoked.revoked
    assert await status(rotated.key) == 401
    assert [record.key_id for record in await manager.list(include_revoked=False)] == [second.key_id]
    with pytest.raises(UnknownAPIKeyError):
        await manager.rotate(first.key_id)
    with pytest.raises(UnknownAPIKeyError):
        await manager.revoke("doesnotexist")
    await store.aclose()


async def test_revoking_during_an_overlap_also_kills_the_old_secret(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    manager = APIKeyManager(store, clock=manual_clock)
    first = await manager.create(owner="alice")
    await manager.rotate(first.key_id, overlap=300)
    await manager.revoke(first.key_id)
    middleware = APIKeyMiddleware(ok_app, store=store, policy=APIKeyPolicy(cache_ttl=0), clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(first.key))).status == 401


async def test_cache_bounds_how_long_a_revocation_takes(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    manager = APIKeyManager(store, clock=manual_clock)
    issued = await manager.create(owner="alice")
    middleware = APIKeyMiddleware(ok_app, store=store, policy=APIKeyPolicy(cache_ttl=5), clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(issued.key))).status == 200
    await manager.revoke(issued.key_id)
    manual_clock.advance(4.9)
    assert (await run_asgi(middleware, key_scope(issued.key))).status == 200  # cached: inside the bound
    manual_clock.advance(0.1)
    assert (await run_asgi(middleware, key_scope(issued.key))).status == 401


async def test_cache_is_bounded(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    manager = APIKeyManager(store, clock=manual_clock)
    keys = [(await manager.create(owner=f"user{i}")).key for i in range(5)]
    calls: list[str] = []

    class CountingStore(MemoryAPIKeyStore):
        async def get(self, key_id: str) -> APIKeyRecord | None:
            calls.append(key_id)
            return await store.get(key_id)

    policy = APIKeyPolicy(cache_size=2)
    middleware = APIKeyMiddleware(ok_app, store=CountingStore(), policy=policy, clock=manual_clock)
    for key in keys + keys[-2:]:
        assert (await run_asgi(middleware, key_scope(key))).status == 200
    assert len(calls) == 5  # the last two stayed cached; the cache never held more than two
    assert (await run_asgi(middleware, key_scope(keys[0]))).status == 200
    assert len(calls) == 6


async def test_config_entries_of_prehashed_keys(manual_clock: ManualClock) -> None:
    secret = "s" * 43
    pepper = b"p" * 32
    store = MemoryAPIKeyStore.from_config(
        [
            {
                "key_id": "cfg1",
                "secret_hash": hash_api_key_secret(secret),
                "owner": "ops",
                "org": "acme",
                "scopes": "read write",
                "roles": ["admin"],
                "rate_limits": {"default": "10/second"},
            },
            {
                "key_id": "cfg2",
                "secret_hash": hash_api_key_secret(secret, pepper=pepper),
                "owner": "ops",
                "expires_at": manual_clock.time() + 5,
            },
        ]
    )
    app = PrincipalApp()
    plain = APIKeyMiddleware(app, store=store, clock=manual_clock)
    assert (await run_asgi(plain, key_scope(f"nx_cfg1_{secret}"))).status == 200
    assert app.principals[0] is not None and app.principals[0].scopes == {"read", "write"}
    assert (await run_asgi(plain, key_scope(f"nx_cfg2_{secret}"))).status == 401  # peppered, no pepper here
    peppered = APIKeyMiddleware(ok_app, store=store, policy=APIKeyPolicy(pepper=pepper), clock=manual_clock)
    assert (await run_asgi(peppered, key_scope(f"nx_cfg2_{secret}"))).status == 200
    assert (
        await run_asgi(peppered, key_scope(f"nx_cfg1_{secret}"))
    ).status == 200  # plain hashes still verify
    manual_clock.advance(5)
    assert (await run_asgi(peppered, key_scope(f"nx_cfg2_{secret}"))).status == 401


async def test_manager_with_pepper_writes_hmac_hashes(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    policy = APIKeyPolicy(pepper=b"k" * 32, key_prefix="acme")
    issued = await APIKeyManager(store, policy=policy, clock=manual_clock).create(owner="alice")
    assert issued.key.startswith("acme_")
    assert issued.record.secret_hash.startswith("hmac-sha256:")
    assert "pepper" not in repr(policy)
    middleware = APIKeyMiddleware(ok_app, store=store, policy=policy, clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(issued.key))).status == 200


@pytest.mark.parametrize(
    "entry",
    [
        {"secret_hash": "sha256:" + "0" * 64, "owner": "x"},
        {"key_id": "a", "secret_hash": "sha256:" + "0" * 64, "owner": "x"},
        {"key_id": "abcd", "secret_hash": "md5:00", "owner": "x"},
        {"key_id": "abcd", "secret_hash": "sha256:" + "0" * 64, "owner": ""},
        {"key_id": "abcd", "secret_hash": "sha256:" + "0" * 64, "owner": "x", "org": 5},
        {"key_id": "abcd", "secret_hash": "sha256:" + "0" * 64, "owner": "x", "expires_at": "soon"},
        {"key_id": "abcd", "secret_hash": "sha256:" + "0" * 64, "owner": "x", "scopes": [1]},
    ],
)
def test_invalid_config_entries(entry: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        MemoryAPIKeyStore.from_config([entry])


def test_duplicate_config_ids_rejected() -> None:
    entry = {"key_id": "abcd", "secret_hash": "sha256:" + "0" * 64, "owner": "x"}
    with pytest.raises(ConfigurationError, match="twice"):
        MemoryAPIKeyStore.from_config([entry, entry])


@pytest.mark.parametrize(
    "options",
    [
        {"header_name": "X API Key"},
        {"query_param": ""},
        {"key_prefix": "nx_"},
        {"default": "sometimes"},
        {"cache_ttl": -1},
        {"cache_size": 0},
        {"pepper": b"short"},
    ],
)
def test_invalid_policy(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        APIKeyPolicy(**options)


def test_invalid_middleware_options() -> None:
    with pytest.raises(ConfigurationError):
        APIKeyMiddleware(ok_app, store=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        APIKeyMiddleware(ok_app, store=MemoryAPIKeyStore(), routes=[("/x", None, "maybe")])  # type: ignore[list-item]
    with pytest.raises(ConfigurationError):
        RedisAPIKeyStore(object(), prefix="")  # type: ignore[arg-type]


async def test_manager_rejects_bad_arguments(manual_clock: ManualClock) -> None:
    manager = APIKeyManager(MemoryAPIKeyStore(), clock=manual_clock)
    with pytest.raises(ValueError, match="owner"):
        await manager.create(owner="")
    with pytest.raises(ValueError, match="expires_in"):
        await manager.create(owner="x", expires_in=0)
    issued = await manager.create(owner="x")
    with pytest.raises(ValueError, match="overlap"):
        await manager.rotate(issued.key_id, overlap=-1)


async def test_redis_middleware_and_outage(
    redis_client: Any, redis_prefix: str, manual_clock: ManualClock
) -> None:
    store = RedisAPIKeyStore(redis_client, prefix=redis_prefix)
    key = await issue(store, manual_clock, org="acme")
    app = PrincipalApp()
    middleware = APIKeyMiddleware(app, store=store, clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(key))).status == 200
    assert app.principals[0] is not None and app.principals[0].tenant == "acme"

    down = RedisAPIKeyStore.from_url(f"redis://127.0.0.1:{free_port()}/0", prefix=redis_prefix)
    scope = key_scope(key)
    recorded = await run_asgi(APIKeyMiddleware(ok_app, store=down, clock=manual_clock), scope)
    assert recorded.status == 503
    assert recorded.header("retry-after") == "1"
    decision = get_context(scope).decision("auth")
    assert decision is not None and decision.reason == "store_unavailable"
    with pytest.raises(StorageError):
        await down.records()
    await down.aclose()


async def test_corrupt_redis_record_is_a_storage_error(redis_client: Any, redis_prefix: str) -> None:
    store = RedisAPIKeyStore(redis_client, prefix=redis_prefix)
    await redis_client.set(redis_prefix + "key:abcd", b"{not json")
    with pytest.raises(StorageError, match="corrupt"):
        await store.get("abcd")


async def test_lifespan_passes_through() -> None:
    recorded = await run_asgi(
        APIKeyMiddleware(ok_app, store=MemoryAPIKeyStore()), make_scope(scope_type="lifespan")
    )
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


@pytest.mark.parametrize("denial_extension", [True, False])
async def test_websocket_handshake_refused_before_accept(
    manual_clock: ManualClock, denial_extension: bool
) -> None:
    extensions = {"websocket.http.response": {}} if denial_extension else {}
    middleware = APIKeyMiddleware(ok_app, store=MemoryAPIKeyStore(), clock=manual_clock)
    recorded = await run_asgi(middleware, make_scope("/ws", scope_type="websocket", extensions=extensions))
    types = [message["type"] for message in recorded.messages]
    assert "websocket.accept" not in types
    if denial_extension:
        assert recorded.messages[0]["status"] == 401
    else:
        assert recorded.messages == [
            {"type": "websocket.close", "code": 1008, "reason": "A valid API key is required."}
        ]


async def test_websocket_handshake_with_a_valid_key_is_accepted(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    scope = make_scope("/ws", scope_type="websocket", headers=[("X-API-Key", key)])
    recorded = await run_asgi(APIKeyMiddleware(ok_app, store=store, clock=manual_clock), scope)
    assert recorded.messages[0]["type"] == "websocket.accept"
    assert scope["user"].method == "api_key"


def fastapi_app(store: APIKeyStore) -> FastAPI:
    app = FastAPI()

    @app.get("/me")
    async def me(request: Request) -> dict[str, Any]:
        return {
            "subject": request.user.display_name,
            "tenant": request.auth.tenant,
            "key": request.user.key_id,
        }

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text(websocket.user.display_name)
        await websocket.close()

    app.add_middleware(APIKeyMiddleware, store=store, exempt=["/health"])
    return app


async def test_fastapi_integration(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    issued = await APIKeyManager(store).create(owner="alice", org="acme")
    transport = httpx.ASGITransport(app=fastapi_app(store))
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/me", headers={"X-API-Key": issued.key})
        assert response.json() == {"subject": "alice", "tenant": "acme", "key": issued.key_id}
        assert (await client.get("/health")).status_code == 200
        refused = await client.get("/me")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"


async def test_end_to_end_through_uvicorn() -> None:
    store = MemoryAPIKeyStore()
    issued = await APIKeyManager(store).create(owner="alice", org="acme")
    async with serve(fastapi_app(store)) as url, httpx.AsyncClient(base_url=url) as client:
        ok = await client.get("/me", headers={"X-API-Key": issued.key})
        assert ok.status_code == 200 and ok.json()["subject"] == "alice"
        first = await client.get("/me", headers={"X-API-Key": flip(issued.key, len(issued.key) - 1)})
        unknown = await client.get("/me", headers={"X-API-Key": "nx_0000000000000000_" + "a" * 43})
        assert first.status_code == unknown.status_code == 401
        assert first.content == unknown.content
        strip = {"date", "server"}
        assert [h for h in first.headers.items() if h[0] not in strip] == [
            h for h in unknown.headers.items() if h[0] not in strip
        ]


async def websocket_handshake(base_url: str, path: str, headers: dict[str, str]) -> bytes:
    """The response head uvicorn answers a raw websocket upgrade with."""
    host, port = base_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        *(f"{name}: {value}" for name, value in headers.items()),
    ]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    try:
        return await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


async def test_websocket_end_to_end_through_uvicorn() -> None:
    store = MemoryAPIKeyStore()
    issued = await APIKeyManager(store).create(owner="alice")
    async with serve(fastapi_app(store)) as url:
        accepted = await websocket_handshake(url, "/ws", {"X-API-Key": issued.key})
        refused = await websocket_handshake(url, "/ws", {"X-API-Key": flip(issued.key, len(issued.key) - 1)})
        missing = await websocket_handshake(url, "/ws", {})
    assert accepted.startswith(b"HTTP/1.1 101")
    assert refused.startswith(b"HTTP/1.1 401")
    assert missing.startswith(b"HTTP/1.1 401")
    assert b"application/problem+json" in refused


class RacingStore(MemoryAPIKeyStore):
    """Another admin revokes the key between the manager's read and its write."""

    raced = False

    async def swap(self, current: APIKeyRecord | None, new: APIKeyRecord) -> bool:
        if not self.raced and current is not None:
            self.raced = True
            await APIKeyManager(self).revoke(new.key_id)
        return await super().swap(current, new)


async def test_a_rotation_racing_a_revocation_never_unrevokes(manual_clock: ManualClock) -> None:
    store = RacingStore()
    manager = APIKeyManager(store, clock=manual_clock)
    issued = await manager.create(owner="alice")
    with pytest.raises(UnknownAPIKeyError, match="revoked"):
        await manager.rotate(issued.key_id, overlap=60)
    assert (await manager.get(issued.key_id)).revoked


async def test_updates_give_up_when_the_record_keeps_changing(manual_clock: ManualClock) -> None:
    class Contended(MemoryAPIKeyStore):
        async def swap(self, current: APIKeyRecord | None, new: APIKeyRecord) -> bool:
            return current is None and await super().swap(current, new)

    manager = APIKeyManager(Contended(), clock=manual_clock)
    issued = await manager.create(owner="alice")
    with pytest.raises(StorageError, match="concurrent"):
        await manager.revoke(issued.key_id)


async def test_memory_swap_is_compare_and_set() -> None:
    await compare_and_set(MemoryAPIKeyStore())


async def test_redis_swap_is_compare_and_set(redis_client: Any, redis_prefix: str) -> None:
    await compare_and_set(RedisAPIKeyStore(redis_client, prefix=redis_prefix))


async def compare_and_set(store: APIKeyStore) -> None:
    first = APIKeyRecord("abcd", hash_api_key_secret("x" * 20), "alice")
    revoked = replace(first, revoked=True)
    assert await store.swap(None, first)
    assert not await store.swap(None, first)  # exists already
    assert not await store.swap(revoked, first)  # stale expectation
    assert await store.swap(first, revoked)
    assert await store.get("abcd") == revoked
    assert [record.key_id for record in await store.records()] == ["abcd"]


class FlakyStore(MemoryAPIKeyStore):
    down = False

    async def get(self, key_id: str) -> APIKeyRecord | None:
        if self.down:
            raise StorageUnavailableError("store down")
        return await super().get(key_id)


@pytest.mark.parametrize(("stale_if_error", "still_ok_after"), [(0.0, 4.0), (60.0, 64.0)])
async def test_store_outage_serves_known_keys_stale_within_the_allowance(
    manual_clock: ManualClock, stale_if_error: float, still_ok_after: float
) -> None:
    store = FlakyStore()
    manager = APIKeyManager(store, clock=manual_clock)
    known = (await manager.create(owner="alice")).key
    never_seen = (await manager.create(owner="bob")).key
    policy = APIKeyPolicy(cache_ttl=5, stale_if_error=stale_if_error)
    middleware = APIKeyMiddleware(ok_app, store=store, policy=policy, clock=manual_clock)
    assert (await run_asgi(middleware, key_scope(known))).status == 200
    store.down = True
    manual_clock.advance(still_ok_after)
    scope = key_scope(known)
    assert (await run_asgi(middleware, scope)).status == 200
    decision = get_context(scope).decision("auth")
    assert decision is not None and decision.details.get("store") == ("stale" if stale_if_error else None)
    assert (await run_asgi(middleware, key_scope(never_seen))).status == 503
    manual_clock.advance(1)
    assert (await run_asgi(middleware, key_scope(known))).status == 503
    store.down = False
    assert (await run_asgi(middleware, key_scope(known))).status == 200


def test_stale_if_error_needs_a_cache() -> None:
    with pytest.raises(ConfigurationError, match="stale_if_error"):
        APIKeyPolicy(cache_ttl=0, stale_if_error=10)


async def test_app_exceptions_propagate(manual_clock: ManualClock) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)

    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise LookupError("from the app")

    with pytest.raises(LookupError, match="from the app"):
        await run_asgi(APIKeyMiddleware(failing, store=store, clock=manual_clock), key_scope(key))


@pytest.mark.parametrize(
    ("strip", "route", "query", "status", "seen"),
    [
        (True, "/x", "a=1&api_key={key}&b=2", 200, b"a=1&b=2"),  # admitted: the key never reaches the app
        (True, "/health", "api_key={key}", 200, b""),  # exempt route: stripped all the same
        (True, "/x", "api_key=nx_bad&b=2", 401, None),  # refused: the app is not called
        (True, "/x", "b=2", 401, None),
        (False, "/x", "api_key={key}&b=2", 200, b"api_key={key}&b=2"),
    ],
)
async def test_a_query_key_is_taken_out_of_the_scope(
    manual_clock: ManualClock, strip: bool, route: str, query: str, status: int, seen: bytes | None
) -> None:
    store = MemoryAPIKeyStore()
    key = await issue(store, manual_clock)
    queries: list[bytes] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        queries.append(scope["query_string"])
        await ok_app(scope, receive, send)

    policy = APIKeyPolicy(query_param="api_key", strip_query=strip)
    middleware = APIKeyMiddleware(app, store=store, policy=policy, exempt=["/health"], clock=manual_clock)
    recorded = await run_asgi(middleware, make_scope(route, query_string=query.format(key=key).encode()))
    assert recorded.status == status
    assert queries == ([] if seen is None else [seen.replace(b"{key}", key.encode())])
