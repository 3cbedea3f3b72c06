"""JWTAuthMiddleware per-request cost: a cached token (the hot path) and a full verification, RS256 and ES256.

"verify every request" rows run with the verified-token cache off (`cache_size=0`): each request decodes,
checks claims and verifies the signature with a warm key set, which is what a token's first request costs.
"""

import time
from typing import Any

import pytest
from joserfc.jwk import ECKey, Key, RSAKey

from benchmarks.conftest import BASELINE, Driver, NoopMiddleware, bare_app, bench, make_http_scope
from nexus_middleware import JWTAuthMiddleware, JWTIssuer, JWTPolicy, RevocationList
from nexus_middleware.storage import MemoryStore
from nexus_middleware.types import ASGIApp, Scope
from tests.support.idp import AUDIENCE, ISSUER, mint

GROUP = "auth-jwt"


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa"})


@pytest.fixture(scope="module")
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec"})


def scope_with(token: str) -> Any:
    headers = [(b"host", b"api.example.com"), (b"authorization", f"Bearer {token}".encode())]

    def factory() -> Scope:
        return make_http_scope(headers=headers)

    return factory


def protected(key: Key, alg: str, **options: Any) -> ASGIApp:
    issuer = JWTIssuer(ISSUER, AUDIENCE, [alg], keys=[key])
    return JWTAuthMiddleware(bare_app, issuers=[issuer], **options)


def token_for(key: Key, alg: str) -> str:
    return mint(key, alg=alg, now=time.time(), ttl=3600, jti="bench", scope="orders:read orders:write")


def test_bare(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, BASELINE, bare_app, group=GROUP)


def test_noop(benchmark: Any, driver: Driver) -> None:
    bench(benchmark, driver, "no-op pure-ASGI wrapper", NoopMiddleware(bare_app), group=GROUP)


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_cached_token(alg: str, benchmark: Any, driver: Driver, rsa_key: RSAKey, ec_key: ECKey) -> None:
    key = rsa_key if alg == "RS256" else ec_key
    app = protected(key, alg)
    bench(
        benchmark,
        driver,
        f"JWT {alg} cached token",
        app,
        group=GROUP,
        scope_factory=scope_with(token_for(key, alg)),
    )


def test_cached_token_with_revocation_check(benchmark: Any, driver: Driver, ec_key: ECKey) -> None:
    app = protected(ec_key, "ES256", revocation=RevocationList(MemoryStore()))
    bench(
        benchmark,
        driver,
        "JWT ES256 cached token + jti deny-list",
        app,
        group=GROUP,
        scope_factory=scope_with(token_for(ec_key, "ES256")),
    )


@pytest.mark.parametrize("alg", ["ES256", "RS256"])
def test_verify_every_request(
    alg: str, benchmark: Any, driver: Driver, rsa_key: RSAKey, ec_key: ECKey
) -> None:
    key = rsa_key if alg == "RS256" else ec_key
    app = protected(key, alg, policy=JWTPolicy(cache_size=0))
    bench(
        benchmark,
        driver,
        f"JWT {alg} verify every request",
        app,
        group=GROUP,
        scope_factory=scope_with(token_for(key, alg)),
    )
