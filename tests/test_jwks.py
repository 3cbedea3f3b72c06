"""JWKS fetching and caching against a real loopback key server: rotation, single-flight, staleness."""

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from joserfc.jwk import ECKey

from nexus_middleware import JWKSCache, JWKSPolicy, JWTAuthMiddleware, JWTIssuer
from nexus_middleware.clock import ManualClock
from nexus_middleware.errors import ConfigurationError, VerifierUnavailableError
from tests.support.asgi import Recorded, make_scope, ok_app, run_asgi
from tests.support.idp import AUDIENCE, ISSUER, JWKSApp, mint
from tests.support.servers import closing_server, free_port, serve

NOW = 1_700_000_000.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall=NOW)


def new_key(kid: str) -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": kid})


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


def protected(url: str, clock: ManualClock, client: httpx.AsyncClient, **policy: Any) -> JWTAuthMiddleware:
    issuer = JWTIssuer(ISSUER, AUDIENCE, ["ES256"], jwks_url=url)
    return JWTAuthMiddleware(
        ok_app,
        issuers=[issuer],
        jwks_policy=JWKSPolicy(**policy),
        http_client=client,
        clock=clock,
        routes=[("/health", None, "exempt")],
    )


async def call(app: JWTAuthMiddleware, token: str | None, path: str = "/orders") -> Recorded:
    headers = [] if token is None else [("authorization", f"Bearer {token}")]
    return await run_asgi(app, make_scope(path, headers=headers))


async def status(app: JWTAuthMiddleware, token: str | None, path: str = "/orders") -> int:
    return (await call(app, token, path)).status


async def test_unknown_kid_under_100_concurrent_requests_fetches_once(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    old, new = new_key("2024"), new_key("2025")
    keys = JWKSApp(keys=[old])
    async with serve(keys) as url:
        app = protected(url, clock, http_client)
        cold = await asyncio.gather(*(status(app, mint(old, now=NOW)) for _ in range(100)))
        assert cold == [200] * 100
        assert keys.hits == 1  # cold start: one fetch shared by all
        clock.advance(31)  # past the minimum refetch interval, within the TTL
        keys.keys = [old, new]  # the issuer rotates
        rotated = await asyncio.gather(*(status(app, mint(new, now=NOW, jti=str(n))) for n in range(100)))
        assert rotated == [200] * 100
        assert keys.hits == 2  # exactly one refetch for 100 concurrent misses


async def test_unknown_kid_refetch_is_rate_limited(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    known, stranger = new_key("known"), new_key("stranger")
    keys = JWKSApp(keys=[known])
    async with serve(keys) as url:
        app = protected(url, clock, http_client, min_refetch_interval=30)
        assert await status(app, mint(known, now=NOW)) == 200
        clock.advance(30)
        assert await status(app, mint(stranger, now=NOW)) == 401
        assert keys.hits == 2  # one refetch for the unknown kid
        for _ in range(20):
            assert await status(app, mint(stranger, now=NOW, jti="x")) == 401
        assert keys.hits == 2  # a flood of random kids cannot hammer the IdP
        clock.advance(30)
        assert await status(app, mint(stranger, now=NOW, jti="y")) == 401
        assert keys.hits == 3


async def test_jwks_down_after_warm_up_keeps_last_good_keys(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key], cache_control="max-age=600")
    async with serve(keys) as url:
        app = protected(url, clock, http_client, max_stale=3600, error_retry_interval=5)
        assert await status(app, mint(key, now=NOW)) == 200
    # the server is gone; keys expire in 600 s, then serve stale for up to an hour
    clock.advance(700)
    assert await status(app, mint(key, now=NOW + 700, jti="a")) == 200
    clock.advance(2800)
    assert await status(app, mint(key, now=NOW + 3500, jti="b")) == 200
    clock.advance(800)  # 600 + 3600 exceeded: staleness is bounded, fail closed
    response = await call(app, mint(key, now=NOW + 4300, jti="c"))
    assert response.status == 503
    assert response.header("content-type") == "application/problem+json"
    assert await status(app, None, "/health") == 200  # the app stays up


async def test_jwks_down_at_cold_start_fails_closed_then_recovers(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    key = new_key("k1")
    port = free_port()
    url = f"http://127.0.0.1:{port}/jwks.json"
    app = protected(url, clock, http_client, error_retry_interval=5)
    response = await call(app, mint(key, now=NOW))
    assert response.status == 503
    assert response.json()["detail"] == "Authentication is temporarily unavailable"
    assert response.header("retry-after") == "5"
    assert await status(app, None, "/health") == 200
    assert await status(app, None) == 401  # no token: still an ordinary 401
    keys = JWKSApp(keys=[key], status=503)  # the IdP answers, but with errors
    async with serve(keys) as up:
        app = protected(up, clock, http_client, error_retry_interval=5)
        assert await status(app, mint(key, now=NOW, jti="1")) == 503
        keys.status = 200  # the IdP recovers
        assert await status(app, mint(key, now=NOW, jti="2")) == 503  # retried only after the interval
        assert keys.hits == 1
        clock.advance(5)
        assert await status(app, mint(key, now=NOW, jti="3")) == 200
        assert keys.hits == 2


async def test_connection_closed_by_the_jwks_server(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    async with closing_server() as url:
        app = protected(url, clock, http_client)
        assert await status(app, mint(new_key("k"), now=NOW)) == 503


JUNK = [
    ("not json", {"body": b"<html>hello</html>"}),
    ("a json list", {"body": b"[1, 2]"}),
    ("keys not a list", {"body": b'{"keys": "all of them"}'}),
    (
        "no usable key",
        {"body": json.dumps({"keys": [{"kty": "EC", "crv": "P-256", "x": "?", "y": "?"}, 7]}).encode()},
    ),
    ("symmetric keys only", {"body": b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "k1"}]}'}),
    ("encryption keys only", {"use": "enc"}),
    ("server error", {"status": 500}),
    ("huge declared body", {"body": b'{"keys": [' + b" " * 300_000 + b"]}"}),
    ("huge streamed body", {"chunks": [b'{"keys": ['] + [b" " * 65_536] * 8}),
]


@pytest.mark.parametrize("junk", [case[1] for case in JUNK], ids=[case[0] for case in JUNK])
async def test_junk_answers_are_rejected_without_crashing(
    junk: dict[str, Any], clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key])
    if "use" in junk:
        keys.body = json.dumps({"keys": [key.as_dict(private=False) | {"use": "enc"}]}).encode()
    else:
        for name, value in junk.items():
            setattr(keys, name, value)
    async with serve(keys) as url:
        app = protected(url, clock, http_client)
        assert await status(app, mint(key, now=NOW)) == 503
        assert await status(app, None, "/health") == 200


async def test_a_slow_jwks_server_hits_the_fetch_timeout(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key], delay=1.0)
    async with serve(keys) as url:
        app = protected(url, clock, http_client, timeout=0.1)
        loop = asyncio.get_running_loop()
        started = loop.time()
        assert await status(app, mint(key, now=NOW)) == 503
        assert loop.time() - started < 0.9


@pytest.mark.parametrize(
    ("cache_control", "fresh_for"),
    [
        ("max-age=120", 120),
        ("public, max-age=1", 60),  # clamped up to min_ttl
        ("max-age=999999", 3600),  # clamped down to max_ttl
        ("no-cache", 60),
        (None, 300),  # default_ttl
    ],
)
async def test_cache_control_is_honoured_within_bounds(
    cache_control: str | None, fresh_for: int, clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key], cache_control=cache_control)
    async with serve(keys) as url:
        cache = JWKSCache(
            url, policy=JWKSPolicy(min_ttl=60, max_ttl=3600), http_client=http_client, clock=clock
        )
        assert [k.kid for k in await cache.get("k1")] == ["k1"]
        clock.advance(fresh_for - 1)
        await cache.get("k1")
        assert keys.hits == 1
        clock.advance(1)
        await cache.get("k1")
        assert keys.hits == 2


async def test_cache_creates_its_own_client_lazily_and_closes_it(clock: ManualClock) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key, new_key("k2")])
    async with serve(keys) as url:
        cache = JWKSCache(url, clock=clock)
        assert keys.hits == 0  # nothing fetched at construction
        assert {k.kid for k in await cache.get(None)} == {"k1", "k2"}
        assert await cache.get("missing") == ()
        assert await cache.refresh() is True
        await cache.aclose()
        assert "JWKSCache(" in repr(cache)


async def test_middleware_aclose_closes_created_clients(clock: ManualClock) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key])
    async with serve(keys) as url:
        app = JWTAuthMiddleware(
            ok_app, issuers=[JWTIssuer(ISSUER, AUDIENCE, ["ES256"], jwks_url=url)], clock=clock
        )
        assert await status(app, mint(key, now=NOW)) == 200
        await app.aclose()


async def test_given_caches_are_shared_and_left_to_their_owner(clock: ManualClock) -> None:
    key = new_key("k1")
    keys = JWKSApp(keys=[key])
    async with serve(keys) as url:
        cache = JWKSCache(url, clock=clock)
        issuers = [JWTIssuer(ISSUER, AUDIENCE, ["ES256"], jwks_url=url)]
        first = JWTAuthMiddleware(ok_app, issuers=issuers, jwks_caches={url: cache}, clock=clock)
        assert await status(first, mint(key, now=NOW)) == 200
        await first.aclose()  # not the given cache's to close: a rebuilt stack keeps using it
        second = JWTAuthMiddleware(ok_app, issuers=issuers, jwks_caches={url: cache}, clock=clock)
        assert await status(second, mint(key, now=NOW, jti="2")) == 200
        assert keys.hits == 1  # the keys fetched for the first middleware served the second
        await cache.aclose()


async def test_cold_cache_raises_unavailable(clock: ManualClock) -> None:
    cache = JWKSCache(f"http://127.0.0.1:{free_port()}/", clock=clock)
    with pytest.raises(VerifierUnavailableError):
        await cache.get("k1")
    await cache.aclose()


@pytest.mark.parametrize(
    "options",
    [
        {"min_ttl": 0},
        {"min_ttl": 100, "default_ttl": 50},
        {"max_ttl": 10, "default_ttl": 300},
        {"max_stale": -1},
        {"timeout": 0},
        {"max_bytes": 0},
    ],
)
def test_policy_is_validated(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        JWKSPolicy(**options)


def test_url_is_validated() -> None:
    with pytest.raises(ConfigurationError):
        JWKSCache("file:///etc/passwd")


async def test_jku_and_x5u_headers_are_never_fetched(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    genuine, attacker = new_key("k1"), new_key("k1")
    trusted = JWKSApp(keys=[genuine])
    evil = JWKSApp(keys=[attacker])
    async with serve(trusted) as url, serve(evil) as evil_url:
        app = protected(url, clock, http_client)
        for header in ({"jku": evil_url}, {"x5u": evil_url}, {"jwk": attacker.as_dict(private=False)}):
            assert await status(app, mint(attacker, now=NOW, header=header)) == 401
        assert evil.hits == 0
        assert trusted.hits == 1


async def test_token_without_kid_tries_every_published_key(
    clock: ManualClock, http_client: httpx.AsyncClient
) -> None:
    first, second = new_key("a"), new_key("b")
    keys = JWKSApp(keys=[first, second])
    kidless = ECKey.import_key({k: v for k, v in second.as_dict(private=True).items() if k != "kid"})
    async with serve(keys) as url:
        app = protected(url, clock, http_client)
        assert await status(app, mint(kidless, now=NOW)) == 200
        assert await status(app, mint(ECKey.generate_key("P-256"), now=NOW)) == 401
