"""JWTAuthMiddleware: RFC 8725 validation, RFC 6750 refusals, route modes, revocation, websockets."""

import asyncio
import hashlib
import hmac
import json
from typing import Any

import pytest
from joserfc import jwk
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey

from nexus_middleware import (
    ClaimMapping,
    JWTAuthMiddleware,
    JWTIssuer,
    JWTPolicy,
    RevocationList,
    TokenLocation,
)
from nexus_middleware.clock import ManualClock
from nexus_middleware.context import ANONYMOUS, get_context
from nexus_middleware.errors import ConfigurationError, InvalidTokenError
from nexus_middleware.storage import MemoryStore, RedisStore, redis_client_from_url
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send
from tests.support.asgi import make_scope, run_asgi
from tests.support.idp import AUDIENCE, ISSUER, b64, forge, mint
from tests.support.servers import free_port

NOW = 1_700_000_000.0
ES256_HEADER = b64(json.dumps({"alg": "ES256"}).encode())
ISSUER_PAYLOAD = b64(json.dumps({"iss": ISSUER}).encode())
NUMERIC_ALG_HEADER = b64(json.dumps({"alg": 1}).encode())


@pytest.fixture(scope="module")
def rsa_key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "rsa-1"})


@pytest.fixture
def ec_key() -> ECKey:
    return ECKey.generate_key("P-256", parameters={"kid": "ec-1"})


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(wall=NOW)


async def whoami(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] == "websocket":
        await receive()
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": 1000})
        return
    user = scope.get("user")
    body = json.dumps(
        None
        if user is None
        else {
            "subject": user.subject,
            "method": user.method,
            "tenant": user.tenant,
            "roles": sorted(user.roles),
            "scopes": sorted(user.scopes),
            "plan": user.plan,
            "expires_at": user.expires_at,
            "same_in_context": get_context(scope).principal is user,
        }
    ).encode()
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body})


def issuer_for(key: jwk.Key, alg: str = "ES256", **options: Any) -> JWTIssuer:
    return JWTIssuer(ISSUER, AUDIENCE, [alg], keys=[key], **options)


def middleware(issuer: JWTIssuer, clock: ManualClock, **options: Any) -> JWTAuthMiddleware:
    return JWTAuthMiddleware(whoami, issuers=[issuer], clock=clock, **options)


def bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


async def call(app: JWTAuthMiddleware, token: str | None, path: str = "/orders", **scope: Any) -> Any:
    headers = scope.pop("headers", [])
    if token is not None:
        headers = [*headers, *bearer(token)]
    return await run_asgi(app, make_scope(path, headers=headers, **scope))


def assert_invalid_token(response: Any, description: str | None = None) -> None:
    assert response.status == 401
    challenge = response.header("www-authenticate")
    assert challenge.startswith('Bearer error="invalid_token", error_description="')
    assert response.header("content-type") == "application/problem+json"
    body = response.json()
    assert body["status"] == 401
    assert body["error"] == "invalid_token"
    if description is not None:
        assert body["detail"] == description
        assert f'error_description="{description}"' in challenge


async def test_valid_token_publishes_the_mapped_principal(ec_key: ECKey, clock: ManualClock) -> None:
    mapping = ClaimMapping(roles="realm_access.roles", tenant="org", plan="https://example.com/plan")
    app = middleware(issuer_for(ec_key, claims=mapping), clock)
    token = mint(
        ec_key,
        now=NOW,
        realm_access={"roles": ["admin", "viewer"]},
        org="acme",
        scope="orders:read orders:write",
        scp=["extra"],
        **{"https://example.com/plan": "gold"},
    )
    response = await call(app, token)
    assert response.status == 200
    assert response.json() == {
        "subject": "alice",
        "method": "jwt",
        "tenant": "acme",
        "roles": ["admin", "viewer"],
        "scopes": ["extra", "orders:read", "orders:write"],
        "plan": "gold",
        "expires_at": NOW + 600,
        "same_in_context": True,
    }


async def test_allow_and_deny_are_recorded_for_audit(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock)
    scope = make_scope("/orders", headers=bearer(mint(ec_key, now=NOW)))
    await run_asgi(app, scope)
    decision = get_context(scope).decision("auth")
    assert decision is not None
    assert (decision.outcome, decision.details["method"]) == ("allow", "jwt")
    scope = make_scope("/orders", headers=bearer(mint(ec_key, now=NOW - 7200)))
    await run_asgi(app, scope)
    decision = get_context(scope).decision("auth")
    assert decision is not None
    assert (decision.outcome, decision.reason) == ("deny", "expired")
    assert get_context(scope).local_response == "auth"


async def test_missing_token_is_401_without_error_attribute(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock, policy=JWTPolicy(realm="orders"))
    response = await call(app, None)
    assert response.status == 401
    assert response.header("www-authenticate") == 'Bearer realm="orders"'
    assert response.header("content-type") == "application/problem+json"
    assert "error" not in response.json()
    decision = get_context(make_scope()).decision("auth")
    assert decision is None  # a fresh scope has no decisions: the context lives per request


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
async def test_alg_none_in_any_spelling_is_refused(alg: str, ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": NOW + 600}
    for signature in (b"", b"anything"):
        response = await call(app, forge({"alg": alg, "typ": "JWT"}, claims, signature))
        assert_invalid_token(response, "Unsigned tokens are not accepted")
    response = await call(app, forge({"alg": alg, "kid": "ec-1"}, claims))
    assert_invalid_token(response, "Unsigned tokens are not accepted")


def _hs256_with(secret: bytes, header: dict[str, Any], claims: dict[str, Any]) -> str:
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


@pytest.mark.parametrize("algorithms", [["RS256"], ["RS256", "HS256"]])
async def test_hs256_signed_with_the_rsa_public_key_is_refused(
    algorithms: list[str], rsa_key: RSAKey, clock: ManualClock
) -> None:
    public = RSAKey.import_key(rsa_key.as_dict(private=False))
    app = middleware(JWTIssuer(ISSUER, AUDIENCE, algorithms, keys=[public]), clock)
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "mallory", "exp": NOW + 600}
    pem = public.as_pem(private=False)
    for kid in ("rsa-1", None):
        header = {"alg": "HS256", "typ": "JWT"} | ({} if kid is None else {"kid": kid})
        for secret in (pem, pem.strip(), json.dumps(public.as_dict()).encode()):
            response = await call(app, _hs256_with(secret, header, claims))
            assert response.status == 401
            assert response.json()["error"] == "invalid_token"
    # the genuine RS256 token passes, so the refusals above are about the algorithm, not the key
    assert (await call(app, mint(rsa_key, alg="RS256", now=NOW))).status == 200


CLAIM_CASES = [
    # (case id, claim overrides, header overrides, policy overrides, expected status, expected detail)
    ("valid", {}, {}, {}, 200, None),
    ("expired", {"exp": NOW - 3600}, {}, {}, 401, "The token expired"),
    ("expired within leeway", {"exp": NOW - 30}, {}, {}, 200, None),
    ("expired beyond zero leeway", {"exp": NOW - 1}, {}, {"leeway": 0}, 401, "The token expired"),
    ("missing exp", {"exp": None}, {}, {}, 401, "The token has no exp claim"),
    ("missing exp allowed", {"exp": None}, {}, {"require_exp": False}, 200, None),
    ("exp not a number", {"exp": "tomorrow"}, {}, {}, 401, "The exp claim is not a number"),
    ("exp is a bool", {"exp": True}, {}, {}, 401, "The exp claim is not a number"),
    ("not yet valid", {"nbf": NOW + 3600}, {}, {}, 401, "The token is not valid yet"),
    ("nbf within leeway", {"nbf": NOW + 30}, {}, {}, 200, None),
    ("issued in the future", {"iat": NOW + 3600}, {}, {}, 401, "The token was issued in the future"),
    ("too old", {"iat": NOW - 7200}, {}, {"max_token_age": 3600}, 401, "The token is too old"),
    ("missing iat required", {"iat": None}, {}, {"require_iat": True}, 401, "The token has no iat claim"),
    ("wrong aud", {"aud": "billing-api"}, {}, {}, 401, "The token is not meant for this audience"),
    ("missing aud", {"aud": None}, {}, {}, 401, "The token has no aud claim"),
    ("aud list with ours", {"aud": ["billing-api", AUDIENCE]}, {}, {}, 200, None),
    (
        "aud list without ours",
        {"aud": ["billing-api"]},
        {},
        {},
        401,
        "The token is not meant for this audience",
    ),
    ("wrong iss", {"iss": "https://evil.example.com/"}, {}, {}, 401, "The token issuer is not trusted"),
    ("iss differs by a slash", {"iss": ISSUER.rstrip("/")}, {}, {}, 401, "The token issuer is not trusted"),
    ("missing iss", {"iss": None}, {}, {}, 401, "The token issuer is not trusted"),
    ("missing sub", {"sub": None}, {}, {}, 401, "The token has no sub claim"),
    ("unknown crit", {}, {"crit": ["exp"]}, {}, 401, "The token has critical header parameters"),
    ("unencoded payload", {}, {"b64": False, "crit": ["b64"]}, {}, 401, None),
    ("unknown kid", {}, {"kid": "other"}, {}, 401, "No key matches the token's key id and algorithm"),
    ("jti not a string", {"jti": 42}, {}, {}, 401, "The token has no usable jti claim"),
]


@pytest.mark.parametrize(
    ("claims", "header", "policy", "status", "detail"),
    [case[1:] for case in CLAIM_CASES],
    ids=[case[0] for case in CLAIM_CASES],
)
async def test_claim_validation(
    claims: dict[str, Any],
    header: dict[str, Any],
    policy: dict[str, Any],
    status: int,
    detail: str | None,
    ec_key: ECKey,
    clock: ManualClock,
) -> None:
    app = middleware(issuer_for(ec_key), clock, policy=JWTPolicy(**policy))
    signing_key = ec_key
    if "kid" in header:
        signing_key = ECKey.import_key(ec_key.as_dict(private=True) | {"kid": header["kid"]})
    token = _sign_raw(signing_key, header, claims)
    response = await call(app, token)
    assert response.status == status, response.body
    if status == 401:
        assert_invalid_token(response, detail)


def _sign_raw(key: ECKey, header: dict[str, Any], overrides: dict[str, Any]) -> str:
    # Signs any header (joserfc's encoder refuses crit/b64 it does not know), so only our checks can refuse.
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": NOW, "exp": NOW + 600}
    claims.update(overrides)
    claims = {name: value for name, value in claims.items() if value is not None}
    full = {"alg": "ES256", "kid": key.kid} | header
    signing_input = f"{b64(json.dumps(full).encode())}.{b64(json.dumps(claims).encode())}"
    der = key.private_key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr]
    r, s = decode_dss_signature(der)
    return f"{signing_input}.{b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


async def test_embedded_jwk_jku_and_x5u_headers_are_never_followed(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock)
    attacker = ECKey.generate_key("P-256", parameters={"kid": "ec-1"})  # same kid, the attacker's own key
    headers = [
        {"jwk": attacker.as_dict(private=False)},
        {"jku": "https://evil.example.com/jwks.json"},
        {"x5u": "https://evil.example.com/cert.pem"},
    ]
    for header in headers:
        response = await call(app, mint(attacker, now=NOW, header=header))
        assert_invalid_token(response, "The token signature is invalid")


@pytest.mark.parametrize(
    ("token", "detail"),
    [
        ("abc", "The token is not a signed JWT"),
        ("a.b.c.d.e", "The token is not a signed JWT"),
        ("!!!.e30.sig", "The token is malformed"),
        (f"{b64(b'[1]')}.e30.sig", "The token is malformed"),
        (f"{b64(b'{}')}.e30.sig", "The token is malformed"),
        (f"{ES256_HEADER}.{b64(b'not json')}.sig", "The token is malformed"),
        (f"{ES256_HEADER}.{ISSUER_PAYLOAD}.!!", "The token is malformed"),
        (f"{NUMERIC_ALG_HEADER}.e30.sig", "The token is malformed"),
    ],
)
async def test_malformed_tokens_are_refused(
    token: str, detail: str, ec_key: ECKey, clock: ManualClock
) -> None:
    response = await call(middleware(issuer_for(ec_key), clock), token)
    assert_invalid_token(response, detail)


async def test_token_size_is_capped_before_decoding(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock, policy=JWTPolicy(max_token_bytes=512))
    token = mint(ec_key, now=NOW, padding="x" * 600)
    assert_invalid_token(await call(app, token), "The token is too large")
    huge = "A" * 100_000  # never decoded: a decode attempt would answer "malformed"
    assert_invalid_token(await call(app, huge), "The token is too large")


async def test_typ_at_jwt_is_enforced_when_configured(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key, typ="at+jwt"), clock)
    assert (await call(app, mint(ec_key, now=NOW, header={"typ": "at+jwt"}))).status == 200
    assert (await call(app, mint(ec_key, now=NOW, header={"typ": "application/at+jwt"}))).status == 200
    assert_invalid_token(await call(app, mint(ec_key, now=NOW)), "The token type is not accepted")  # typ JWT


async def test_signature_of_another_key_is_refused(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock)
    token = mint(ec_key, now=NOW)
    head, payload, _ = token.split(".")
    other = mint(ECKey.generate_key("P-256", parameters={"kid": "ec-1"}), now=NOW)
    assert_invalid_token(
        await call(app, f"{head}.{payload}.{other.split('.')[2]}"), "The token signature is invalid"
    )
    tampered = mint(ec_key, now=NOW, sub="bob").split(".")[1]
    assert_invalid_token(await call(app, f"{head}.{tampered}.{token.split('.')[2]}"))


@pytest.mark.parametrize(
    ("alg", "make_key"),
    [
        ("HS256", lambda: OctKey.generate_key(256)),
        ("ES384", lambda: ECKey.generate_key("P-384")),
        ("Ed25519", lambda: OKPKey.generate_key("Ed25519")),
        ("PS256", None),
        ("RS256", None),
    ],
)
async def test_static_keys_of_every_family(
    alg: str, make_key: Any, rsa_key: RSAKey, clock: ManualClock
) -> None:
    key = rsa_key if make_key is None else make_key()
    app = middleware(issuer_for(key, alg), clock)
    assert (await call(app, mint(key, alg=alg, now=NOW))).status == 200


async def test_several_issuers_each_with_its_own_keys_and_audience(ec_key: ECKey, clock: ManualClock) -> None:
    partner_key = ECKey.generate_key("P-256", parameters={"kid": "partner"})
    partner = JWTIssuer("https://partner.example.org", ["partner-api"], ["ES256"], keys=[partner_key])
    app = JWTAuthMiddleware(whoami, issuers=[issuer_for(ec_key), partner], clock=clock)
    good = mint(partner_key, now=NOW, iss="https://partner.example.org", aud="partner-api")
    assert (await call(app, good)).status == 200
    # the partner's key cannot vouch for our issuer, nor our audience for the partner
    assert_invalid_token(await call(app, mint(partner_key, now=NOW)))
    assert_invalid_token(await call(app, mint(partner_key, now=NOW, iss="https://partner.example.org")))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"audience": []}, "audience"),
        ({"algorithms": []}, "algorithms"),
        ({"algorithms": "ES256"}, "algorithms"),
        ({"algorithms": ["none"]}, "none"),
        ({"algorithms": ["NONE"]}, "none"),
        ({"algorithms": ["XS999"]}, "unknown algorithm"),
        ({"algorithms": ["HS256"]}, "fits none"),
        ({"keys": []}, "needs keys or a jwks_url"),
        ({"issuer": ""}, "issuer"),
        ({"typ": ""}, "typ"),
        ({"keys": [{"kty": "EC", "crv": "P-256", "x": "junk"}]}, "invalid JWK"),
    ],
)
def test_issuer_configuration_is_validated(options: dict[str, Any], message: str, ec_key: ECKey) -> None:
    arguments: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "algorithms": ["ES256"],
        "keys": [ec_key],
    }
    arguments.update(options)
    with pytest.raises(ConfigurationError, match=message):
        JWTIssuer(**arguments)


@pytest.mark.parametrize(
    "build",
    [
        lambda issuer: JWTAuthMiddleware(whoami, issuers=[]),
        lambda issuer: JWTAuthMiddleware(whoami, issuers=[issuer, issuer]),
        lambda issuer: JWTAuthMiddleware(whoami, issuers=[issuer], default="maybe"),  # type: ignore[arg-type]
        lambda issuer: JWTAuthMiddleware(whoami, issuers=[issuer], routes=[("/x", None, "sometimes")]),
        lambda issuer: JWTAuthMiddleware(whoami, issuers=[issuer], policy=JWTPolicy(realm='a"b')),
        lambda issuer: JWTPolicy(leeway=-1),
        lambda issuer: JWTPolicy(max_token_bytes=10),
        lambda issuer: JWTPolicy(max_token_age=0),
        lambda issuer: TokenLocation(cookie=""),
        lambda issuer: TokenLocation(query=""),
        lambda issuer: ClaimMapping(subject=""),
        lambda issuer: ClaimMapping(scopes="scope"),  # type: ignore[arg-type]
        lambda issuer: RevocationList(MemoryStore(), retain_after_expiry=-1),
    ],
)
def test_middleware_configuration_is_validated(build: Any, ec_key: ECKey) -> None:
    with pytest.raises(ConfigurationError):
        build(issuer_for(ec_key))


async def test_route_modes_required_optional_exempt(ec_key: ECKey, clock: ManualClock) -> None:
    routes = [
        ("/health", None, "exempt"),
        ("/catalog/*", ["GET"], "optional"),
        ("/public/*", None, "optional"),
    ]
    app = middleware(issuer_for(ec_key), clock, routes=routes)
    token = mint(ec_key, now=NOW)

    exempt = await call(app, None, "/health")
    assert (exempt.status, exempt.json()) == (200, None)  # exempt: no principal at all
    exempt_with_junk = await call(app, "junk", "/health")
    assert exempt_with_junk.status == 200  # exempt routes never look at the credential

    anonymous_scope = make_scope("/catalog/items")
    anonymous = await run_asgi(app, anonymous_scope)
    assert anonymous.status == 200
    assert anonymous.json()["method"] == "anonymous"
    assert anonymous_scope["user"] is ANONYMOUS
    assert not anonymous_scope["user"].is_authenticated
    assert (await call(app, token, "/catalog/items")).json()["subject"] == "alice"
    assert_invalid_token(await call(app, "junk", "/catalog/items"))  # a bad token is never anonymous

    assert (await call(app, None, "/catalog/items", method="POST")).status == 401  # method-bound
    assert (await call(app, None, "/orders")).status == 401  # default: required
    encoded = await run_asgi(app, make_scope("/health/../orders", raw_path=b"/health/%2E%2E/orders"))
    assert encoded.status == 401  # matched on the normalized path: no bypass through dot segments


HOST_ROUTES: list[tuple[str, list[str] | None, str, str | None]] = [
    ("/admin/*", None, "exempt", "public.example.com"),
    ("/admin/*", None, "required", "internal.example.com"),
    ("/admin/*", None, "optional", None),
]


@pytest.mark.parametrize(
    ("host", "status", "method"),
    [
        ("public.example.com", 200, None),  # exempt: no principal
        ("internal.example.com", 401, None),
        ("Internal.Example.com:8443", 401, None),
        ("other.example.com", 200, "anonymous"),  # the host-less entry
    ],
)
async def test_route_modes_follow_the_host(
    ec_key: ECKey, clock: ManualClock, host: str, status: int, method: str | None
) -> None:
    app = middleware(issuer_for(ec_key), clock, routes=HOST_ROUTES, default="exempt")
    response = await call(app, None, "/admin/x", headers=[("host", host)])
    assert response.status == status
    if status == 200:
        assert (None if response.json() is None else response.json()["method"]) == method


async def test_default_optional_and_invalid_path(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock, default="optional", routes=[("/admin/*", None, "required")])
    assert (await call(app, None, "/")).json()["method"] == "anonymous"
    assert (await call(app, None, "/admin/x")).status == 401
    bad = await run_asgi(app, make_scope("/x", raw_path=b"/x%00"))
    assert bad.status == 400
    assert bad.header("content-type") == "application/problem+json"


@pytest.mark.parametrize(
    ("headers", "query", "status"),
    [
        ([("authorization", "Basic Zm9vOmJhcg==")], b"", 401),  # another scheme is "no bearer token"
        ([("authorization", "Bearer ")], b"", 400),
        ([("authorization", "Bearer a"), ("authorization", "Bearer b")], b"", 400),
        ([("cookie", "session=1; at=TOKEN")], b"", 200),
        ([], b"access_token=TOKEN", 200),
        ([("cookie", "at=TOKEN")], b"access_token=TOKEN", 400),  # two ways at once (RFC 6750 §2)
        ([("authorization", "bearer TOKEN")], b"", 200),  # the scheme is case-insensitive
    ],
)
async def test_token_locations(
    headers: list[tuple[str, str]], query: bytes, status: int, ec_key: ECKey, clock: ManualClock
) -> None:
    token = mint(ec_key, now=NOW)
    policy = JWTPolicy(location=TokenLocation(cookie="at", query="access_token"))
    app = middleware(issuer_for(ec_key), clock, policy=policy)
    headers = [(name, value.replace("TOKEN", token)) for name, value in headers]
    response = await run_asgi(
        app, make_scope("/", headers=headers, query_string=query.replace(b"TOKEN", token.encode()))
    )
    assert response.status == status
    if status == 400:
        assert response.header("www-authenticate").startswith('Bearer error="invalid_request"')


async def test_cookie_and_query_are_ignored_unless_configured(ec_key: ECKey, clock: ManualClock) -> None:
    token = mint(ec_key, now=NOW)
    app = middleware(issuer_for(ec_key), clock)
    scope = make_scope(
        "/", headers=[("cookie", f"at={token}")], query_string=f"access_token={token}".encode()
    )
    response = await run_asgi(app, scope)
    assert response.status == 401
    assert response.header("www-authenticate") == "Bearer"


async def test_cached_token_never_outlives_exp(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock, policy=JWTPolicy(leeway=0))
    token = mint(ec_key, now=NOW, ttl=120)
    assert (await call(app, token)).status == 200
    clock.advance(119)
    assert (await call(app, token)).status == 200
    clock.advance(2)
    assert_invalid_token(await call(app, token), "The token expired")


async def test_cache_is_bounded_and_disabled_cache_still_verifies(ec_key: ECKey, clock: ManualClock) -> None:
    for size in (0, 2):
        app = middleware(issuer_for(ec_key), clock, policy=JWTPolicy(cache_size=size, cache_ttl=60))
        tokens = [mint(ec_key, now=NOW, sub=f"user-{n}") for n in range(5)]
        for _ in range(2):
            for n, token in enumerate(tokens):
                assert (await call(app, token)).json()["subject"] == f"user-{n}"


async def _revocation_flow(revocation: RevocationList, ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock, revocation=revocation)
    token = mint(ec_key, now=NOW, jti="token-1")
    other = mint(ec_key, now=NOW, jti="token-2")
    assert (await call(app, token)).status == 200  # now cached
    await revocation.revoke("token-1", expires_at=NOW + 600)
    response = await call(app, token)
    assert_invalid_token(response, "The token has been revoked")
    assert (await call(app, other)).status == 200
    await revocation.unrevoke("token-1")
    assert (await call(app, token)).status == 200


async def test_revoked_jti_in_memory(ec_key: ECKey, clock: ManualClock) -> None:
    await _revocation_flow(RevocationList(MemoryStore(clock=clock), clock=clock), ec_key, clock)


async def test_revoked_jti_in_redis(
    ec_key: ECKey, clock: ManualClock, redis_client: Any, redis_prefix: str
) -> None:
    revocation = RevocationList(RedisStore(redis_client, prefix=redis_prefix), clock=clock)
    await _revocation_flow(revocation, ec_key, clock)
    await revocation.revoke("token-9", expires_at=NOW + 100)
    ttl = await redis_client.pttl(f"{redis_prefix}jwt-revoked:token-9")
    assert 0 < ttl <= (100 + 300) * 1000  # kept until exp plus the leeway margin, not forever


async def test_revoking_an_expired_token_writes_nothing(clock: ManualClock) -> None:
    store = MemoryStore(clock=clock)
    revocation = RevocationList(store, clock=clock, retain_after_expiry=0)
    await revocation.revoke("old", expires_at=NOW - 1)
    assert not await revocation.is_revoked("old")
    await revocation.revoke("forever")
    clock.advance(10**7)
    assert await revocation.is_revoked("forever")
    with pytest.raises(ValueError, match="jti"):
        await revocation.revoke("")


@pytest.mark.parametrize(("fail_open", "status"), [(False, 503), (True, 200)])
async def test_revocation_store_outage(
    fail_open: bool, status: int, ec_key: ECKey, clock: ManualClock
) -> None:
    client = redis_client_from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=0.5)
    try:
        revocation = RevocationList(RedisStore(client), clock=clock)
        policy = JWTPolicy(revocation_fail_open=fail_open)
        app = middleware(issuer_for(ec_key), clock, revocation=revocation, policy=policy)
        response = await call(app, mint(ec_key, now=NOW, jti="t"))
        assert response.status == status
        if status == 503:
            assert response.header("content-type") == "application/problem+json"
            assert response.header("retry-after") == "5"
    finally:
        await client.aclose()


async def test_require_jti_with_revocation(ec_key: ECKey, clock: ManualClock) -> None:
    revocation = RevocationList(MemoryStore(clock=clock), clock=clock)
    app = middleware(issuer_for(ec_key), clock, revocation=revocation, policy=JWTPolicy(require_jti=True))
    assert_invalid_token(await call(app, mint(ec_key, now=NOW)), "The token has no usable jti claim")
    assert (await call(app, mint(ec_key, now=NOW, jti="j"))).status == 200


async def test_websocket_handshake_refused_before_accept(ec_key: ECKey, clock: ManualClock) -> None:
    app = middleware(issuer_for(ec_key), clock)
    refused = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert [m["type"] for m in refused.messages] == ["websocket.close"]
    assert refused.messages[0]["code"] == 1008

    denial = await run_asgi(
        app, make_scope("/ws", scope_type="websocket", extensions={"websocket.http.response": {}})
    )
    start = denial.messages[0]
    assert start["type"] == "websocket.http.response.start"
    assert start["status"] == 401
    assert (b"www-authenticate", b"Bearer") in start["headers"]

    expired = mint(ec_key, now=NOW - 7200)
    refused_expired = await run_asgi(app, make_scope("/ws", scope_type="websocket", headers=bearer(expired)))
    assert refused_expired.messages[0]["type"] == "websocket.close"

    accepted = await run_asgi(
        app, make_scope("/ws", scope_type="websocket", headers=bearer(mint(ec_key, now=NOW)))
    )
    assert [m["type"] for m in accepted.messages] == ["websocket.accept", "websocket.close"]


async def test_a_websocket_handshake_takes_the_mode_of_the_get_routes(
    ec_key: ECKey, clock: ManualClock
) -> None:
    routes = [("/ws", ["POST"], "exempt"), ("/ws", ["GET"], "required")]
    app = middleware(issuer_for(ec_key), clock, routes=routes, default="exempt")
    refused = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert refused.messages == [
        {"type": "websocket.close", "code": 1008, "reason": "Authentication is required"}
    ]
    assert (await call(app, None, "/ws", method="POST")).status == 200  # the POST route stays exempt


async def test_lifespan_passes_through(ec_key: ECKey, clock: ManualClock) -> None:
    seen: list[str] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope["type"])

    wrapped = JWTAuthMiddleware(app, issuers=[issuer_for(ec_key)], clock=clock)
    await run_asgi(wrapped, make_scope(scope_type="lifespan"))
    assert seen == ["lifespan"]
    assert "JWTAuthMiddleware(issuers=" in repr(wrapped)


async def test_app_exceptions_propagate(ec_key: ECKey, clock: ManualClock) -> None:
    async def boom(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("app failure")

    app = JWTAuthMiddleware(boom, issuers=[issuer_for(ec_key)], clock=clock)
    with pytest.raises(RuntimeError, match="app failure"):
        await call(app, mint(ec_key, now=NOW))


@pytest.mark.parametrize("default", ["required", "optional"])
async def test_app_auth_errors_are_never_turned_into_refusals(
    default: str, ec_key: ECKey, clock: ManualClock
) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        raise InvalidTokenError("invalid_token", "raised by the app")

    wrapped = JWTAuthMiddleware(app, issuers=[issuer_for(ec_key)], clock=clock, default=default)  # type: ignore[arg-type]
    token = mint(ec_key, now=NOW) if default == "required" else None
    scope = make_scope("/", headers=[] if token is None else bearer(token))
    with pytest.raises(InvalidTokenError, match="raised by the app"):
        await run_asgi(wrapped, scope)
    decision = get_context(scope).decision("auth")
    assert decision is not None
    assert decision.outcome == "allow"
    assert decision.reason == (None if token else "anonymous")


@pytest.mark.parametrize(
    ("headers", "query", "seen_cookies", "seen_query"),
    [
        ([("cookie", "a=1; at=TOKEN; b=2")], b"", [b"a=1; b=2"], b""),
        ([("cookie", "at=TOKEN"), ("cookie", "c=3")], b"", [b"c=3"], b""),  # a cookie header of its own goes
        ([], b"room=7&access_token=TOKEN&x=%20y", [], b"room=7&x=%20y"),
        ([], b"access%5Ftoken=TOKEN", [], b""),  # the name is compared decoded, as it is read
        ([], b"room=7&access_token=", [], b"room=7"),  # an empty one is no token, and still removed
    ],
)
async def test_a_cookie_or_query_token_is_stripped_before_the_app(
    headers: list[tuple[str, str]],
    query: bytes,
    seen_cookies: list[bytes],
    seen_query: bytes,
    ec_key: ECKey,
    clock: ManualClock,
) -> None:
    token = mint(ec_key, now=NOW)
    seen: list[Scope] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        seen.append(scope)
        await whoami(scope, receive, send)

    policy = JWTPolicy(location=TokenLocation(cookie="at", query="access_token"))
    wrapped = JWTAuthMiddleware(
        app, issuers=[issuer_for(ec_key)], policy=policy, clock=clock, default="optional"
    )
    scope = make_scope(
        "/",
        headers=[(name, value.replace("TOKEN", token)) for name, value in headers],
        query_string=query.replace(b"TOKEN", token.encode()),
    )
    response = await run_asgi(wrapped, scope)
    assert response.status == 200
    [inner] = seen
    assert inner is scope  # edited in place: the server's own access log sees the stripped query too
    assert [value for name, value in inner["headers"] if name == b"cookie"] == seen_cookies
    assert inner["query_string"] == seen_query
    assert token.encode() not in repr(inner).encode()


async def test_a_stripped_token_is_gone_on_exempt_routes_and_refusals_too(
    ec_key: ECKey, clock: ManualClock
) -> None:
    policy = JWTPolicy(location=TokenLocation(query="access_token"))
    app = middleware(issuer_for(ec_key), clock, policy=policy, routes=[("/public", None, "exempt")])
    exempt = make_scope("/public", query_string=b"access_token=abc&q=1")
    assert (await run_asgi(app, exempt)).status == 200
    assert exempt["query_string"] == b"q=1"
    refused = make_scope("/orders", query_string=b"access_token=not-a-jwt")
    assert (await run_asgi(app, refused)).status == 401
    assert refused["query_string"] == b""


async def test_strip_false_leaves_the_credential_in_place(ec_key: ECKey, clock: ManualClock) -> None:
    token = mint(ec_key, now=NOW)
    policy = JWTPolicy(location=TokenLocation(cookie="at", query="access_token", strip=False))
    app = middleware(issuer_for(ec_key), clock, policy=policy)
    scope = make_scope("/", headers=[("cookie", f"at={token}")], query_string=b"x=1")
    assert (await run_asgi(app, scope)).status == 200
    assert scope["headers"] == [(b"cookie", f"at={token}".encode())]
    scope = make_scope("/", query_string=f"access_token={token}".encode())
    assert (await run_asgi(app, scope)).status == 200
    assert scope["query_string"] == f"access_token={token}".encode()


class Peer:
    """The server side of one websocket: the test feeds `incoming`, and reads what the app sent in `sent`."""

    def __init__(self) -> None:
        self.incoming: asyncio.Queue[Message] = asyncio.Queue()
        self.sent: asyncio.Queue[Message] = asyncio.Queue()

    async def receive(self) -> Message:
        return await self.incoming.get()

    async def send(self, message: Message) -> None:
        await self.sent.put(message)

    def drained(self) -> list[Message]:
        messages = []
        while not self.sent.empty():
            messages.append(self.sent.get_nowait())
        return messages


class Skew:
    """Moves the manual clock and the running loop's clock together: a loop timer fires without a wait."""

    def __init__(self, clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> None:
        self.clock = clock
        self.offset = 0.0
        loop = asyncio.get_running_loop()
        real = loop.time
        monkeypatch.setattr(loop, "time", lambda: real() + self.offset)

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.offset += seconds


@pytest.fixture
async def skew(clock: ManualClock, monkeypatch: pytest.MonkeyPatch) -> Skew:
    return Skew(clock, monkeypatch)


async def echo_until_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
    """A relay in miniature: accept, echo until a disconnect, then try to send more (it must be dropped)."""
    await receive()
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            scope["state"]["test.disconnect"] = message
            break
        await send({"type": "websocket.send", "text": message["text"]})
    await send({"type": "websocket.send", "text": "late"})
    await send({"type": "websocket.close", "code": 1000})


def start_session(app: ASGIApp, token: str, peer: Peer) -> tuple[Scope, asyncio.Task[None]]:
    scope = make_scope("/ws", scope_type="websocket", headers=bearer(token))
    scope["state"] = {}
    peer.incoming.put_nowait({"type": "websocket.connect"})
    return scope, asyncio.ensure_future(app(scope, peer.receive, peer.send))


async def echoed(peer: Peer, text: str) -> None:
    await peer.incoming.put({"type": "websocket.receive", "text": text})
    assert await asyncio.wait_for(peer.sent.get(), 5) == {"type": "websocket.send", "text": text}


async def test_an_accepted_websocket_is_closed_when_its_token_expires(
    ec_key: ECKey, clock: ManualClock, skew: Skew
) -> None:
    app = JWTAuthMiddleware(
        echo_until_disconnect, issuers=[issuer_for(ec_key)], policy=JWTPolicy(leeway=5), clock=clock
    )
    peer = Peer()
    scope, session = start_session(app, mint(ec_key, now=NOW, ttl=120), peer)
    assert await asyncio.wait_for(peer.sent.get(), 5) == {"type": "websocket.accept"}
    await echoed(peer, "hello")
    skew.advance(124)  # exp + leeway is 125 s away
    await echoed(peer, "still open")
    skew.advance(1)
    await asyncio.wait_for(session, 5)
    assert peer.drained() == [{"type": "websocket.close", "code": 1008, "reason": "The token expired"}]
    assert scope["state"]["test.disconnect"] == {"type": "websocket.disconnect", "code": 1008}
    assert peer.incoming.empty()  # the receive left pending at expiry was cancelled, nothing was lost
    decision = get_context(scope).decisions[-1]
    assert (decision.layer, decision.outcome, decision.reason) == ("auth", "deny", "expired")


async def test_a_token_that_expires_before_accept_closes_right_after_it(
    ec_key: ECKey, clock: ManualClock
) -> None:
    async def slow_accept(scope: Scope, receive: Receive, send: Send) -> None:
        clock.advance(700)  # the app took its time: the token expired between the check and the accept
        await echo_until_disconnect(scope, receive, send)

    app = JWTAuthMiddleware(slow_accept, issuers=[issuer_for(ec_key)], clock=clock)
    peer = Peer()
    _, session = start_session(app, mint(ec_key, now=NOW, ttl=600), peer)
    await asyncio.wait_for(session, 5)
    assert [m["type"] for m in peer.drained()] == ["websocket.accept", "websocket.close"]


@pytest.mark.parametrize("ending", ["app_closes", "client_leaves", "app_refuses"])
async def test_a_session_that_ends_first_is_never_closed_again(
    ending: str, ec_key: ECKey, clock: ManualClock, skew: Skew
) -> None:
    ended, done = asyncio.Event(), asyncio.Event()

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        if ending == "app_refuses":
            await send({"type": "websocket.http.response.start", "status": 403, "headers": []})
            await send({"type": "websocket.http.response.body", "body": b""})
        else:
            await send({"type": "websocket.accept"})
            if ending == "app_closes":
                await send({"type": "websocket.close", "code": 1000})
            else:
                assert (await receive())["type"] == "websocket.disconnect"
        ended.set()
        await done.wait()  # still running when the token expires

    wrapped = JWTAuthMiddleware(app, issuers=[issuer_for(ec_key)], clock=clock)
    peer = Peer()
    _, session = start_session(wrapped, mint(ec_key, now=NOW), peer)
    if ending == "client_leaves":
        peer.incoming.put_nowait({"type": "websocket.disconnect", "code": 1001})
    await asyncio.wait_for(ended.wait(), 5)
    skew.advance(3600)  # a timer left armed would be due now, and fire while the app waits
    done.set()
    await asyncio.wait_for(session, 5)
    sent = [message["type"] for message in peer.drained()]
    assert (
        sent
        == {
            "app_closes": ["websocket.accept", "websocket.close"],
            "client_leaves": ["websocket.accept"],
            "app_refuses": ["websocket.http.response.start", "websocket.http.response.body"],
        }[ending]
    )


async def test_a_receive_the_app_gave_up_on_keeps_its_message(
    ec_key: ECKey, clock: ManualClock, skew: Skew
) -> None:
    got: list[Message] = []

    async def impatient(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(receive(), 0)  # cancelled while the server had nothing yet
        await send({"type": "websocket.send", "text": "ready"})
        got.append(await receive())

    app = JWTAuthMiddleware(impatient, issuers=[issuer_for(ec_key)], clock=clock)
    peer = Peer()
    _, session = start_session(app, mint(ec_key, now=NOW), peer)
    assert (await asyncio.wait_for(peer.sent.get(), 5))["type"] == "websocket.accept"
    assert (await asyncio.wait_for(peer.sent.get(), 5))["text"] == "ready"
    await peer.incoming.put({"type": "websocket.receive", "text": "kept"})
    await asyncio.wait_for(session, 5)
    assert got == [{"type": "websocket.receive", "text": "kept"}]


async def test_expiry_close_can_be_turned_off(ec_key: ECKey, clock: ManualClock, skew: Skew) -> None:
    policy = JWTPolicy(close_expired_websockets=False)
    app = JWTAuthMiddleware(echo_until_disconnect, issuers=[issuer_for(ec_key)], policy=policy, clock=clock)
    peer = Peer()
    _, session = start_session(app, mint(ec_key, now=NOW), peer)
    assert await asyncio.wait_for(peer.sent.get(), 5) == {"type": "websocket.accept"}
    skew.advance(3600)
    await echoed(peer, "long after exp")
    await peer.incoming.put({"type": "websocket.disconnect", "code": 1000})
    await asyncio.wait_for(session, 5)


@pytest.mark.parametrize("scope_type", ["http", "websocket"])
async def test_only_websockets_with_an_expiring_token_are_watched(
    scope_type: str, ec_key: ECKey, clock: ManualClock
) -> None:
    # http requests, and websockets whose token has no exp, reach the app with the server's own callables.
    calls: list[tuple[Receive, Send]] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        calls.append((receive, send))

    policy = JWTPolicy(require_exp=False)
    wrapped = JWTAuthMiddleware(app, issuers=[issuer_for(ec_key)], policy=policy, clock=clock)
    peer = Peer()
    scope = make_scope("/", scope_type=scope_type, headers=bearer(mint(ec_key, now=NOW, exp=None)))
    await wrapped(scope, peer.receive, peer.send)
    assert calls == [(peer.receive, peer.send)]
    if scope_type == "http":
        await wrapped(make_scope("/", headers=bearer(mint(ec_key, now=NOW))), peer.receive, peer.send)
        assert calls[1] == (peer.receive, peer.send)


async def test_after_expiry_receive_keeps_answering_disconnect_and_a_failed_close_is_swallowed(
    ec_key: ECKey, clock: ManualClock, skew: Skew
) -> None:
    after: list[Message] = []

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        after.append(await receive())
        after.append(await receive())  # asked again: the session is still over

    class GonePeer(Peer):
        async def send(self, message: Message) -> None:
            if message["type"] == "websocket.close":
                raise OSError("the client left meanwhile")  # what a server raises on a dead connection
            await super().send(message)

    wrapped = JWTAuthMiddleware(app, issuers=[issuer_for(ec_key)], clock=clock)
    peer = GonePeer()
    _, session = start_session(wrapped, mint(ec_key, now=NOW), peer)
    assert await asyncio.wait_for(peer.sent.get(), 5) == {"type": "websocket.accept"}
    skew.advance(3600)
    await asyncio.wait_for(session, 5)  # the failed close does not fail the session
    assert after == [{"type": "websocket.disconnect", "code": 1008}] * 2
    assert peer.drained() == []
