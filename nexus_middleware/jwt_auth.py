"""JWT bearer authentication (RFC 7519, validated per RFC 8725, RFC 9068 typing optional).

Each trusted issuer is configured with its exact `iss`, its audiences, the algorithms it may use and its keys
(static, or a JWKS URL). The algorithm is never taken on the token's word: it must be in the issuer's list
and fit the key (joserfc's per-algorithm key check), `none` is never accepted, HMAC is only ever verified with
a symmetric key configured as such (never with key material published in a JWKS), and `jku`/`x5u`/`jwk`/`x5c`
headers are never followed: keys come from configuration only. Verified tokens are cached by digest
(bounded, never past `exp`); the `jti` deny list is checked on every request, cached or not.
"""

import binascii
import json
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc import jwk
from joserfc.errors import JoseError
from joserfc.jwa import JWSAlgModel
from joserfc.jws import JWSRegistry
from joserfc.util import urlsafe_b64decode

from nexus_middleware.bearer import (
    AuthMode,
    BearerGate,
    ClaimMapping,
    TokenCache,
    TokenLocation,
    token_digest,
)
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import Principal
from nexus_middleware.errors import (
    ConfigurationError,
    InvalidTokenError,
    StorageError,
    VerifierUnavailableError,
)
from nexus_middleware.jwks import JWKSCache, JWKSPolicy
from nexus_middleware.paths import RouteEntry
from nexus_middleware.storage import KeyValueStore
from nexus_middleware.types import ASGIApp, Scope

__all__ = ["JWTAuthMiddleware", "JWTIssuer", "JWTPolicy", "RevocationList"]

logger = logging.getLogger(__name__)

# Every signing algorithm joserfc implements, except `none`, which is never accepted in any spelling.
_ALGORITHMS: Mapping[str, JWSAlgModel] = {
    name: model for name, model in JWSRegistry.algorithms.items() if name.lower() != "none"
}
_MALFORMED = "The token is malformed"


def _import_key(key: jwk.Key | Mapping[str, Any]) -> jwk.Key:
    if not isinstance(key, Mapping):
        return key
    try:
        return jwk.import_key(dict(key))
    except (JoseError, ValueError, TypeError, KeyError) as exc:
        raise ConfigurationError(f"invalid JWK: {exc}") from exc


def _fits(model: JWSAlgModel, key: jwk.Key) -> bool:
    try:
        model.check_key(key)
    except (JoseError, ValueError):
        return False
    return True


@dataclass(frozen=True, slots=True)
class JWTIssuer:
    """One trusted issuer: exact `iss`, accepted audiences, allowed algorithms, and static keys and/or a JWKS.

    `keys` are joserfc keys or JWK dicts (an HMAC secret: `OctKey.import_key(secret)`). `typ`, when set,
    is required in the token header (`"at+jwt"` for RFC 9068 access tokens; `application/` prefix allowed).
    """

    issuer: str
    audience: str | Sequence[str]
    algorithms: Sequence[str]
    keys: Sequence[jwk.Key | Mapping[str, Any]] = field(default=(), repr=False)
    jwks_url: str | None = None
    typ: str | None = None
    claims: ClaimMapping = field(default_factory=ClaimMapping)
    audiences: frozenset[str] = field(init=False, repr=False)
    static_keys: tuple[jwk.Key, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.issuer:
            raise ConfigurationError("issuer must not be empty")
        audiences = frozenset([self.audience] if isinstance(self.audience, str) else self.audience)
        if not audiences or "" in audiences:
            raise ConfigurationError(f"issuer {self.issuer!r}: at least one non-empty audience is required")
        if isinstance(self.algorithms, str) or not self.algorithms:
            raise ConfigurationError(f"issuer {self.issuer!r}: algorithms must be a non-empty list")
        for name in self.algorithms:
            if name.lower() == "none":
                raise ConfigurationError("the 'none' algorithm is never accepted")
            if name not in _ALGORITHMS:
                raise ConfigurationError(f"unknown algorithm {name!r}; known: {sorted(_ALGORITHMS)}")
        if not self.keys and self.jwks_url is None:
            raise ConfigurationError(f"issuer {self.issuer!r} needs keys or a jwks_url")
        static = tuple(_import_key(key) for key in self.keys)
        for key in static:
            if not any(_fits(_ALGORITHMS[name], key) for name in self.algorithms):
                raise ConfigurationError(
                    f"issuer {self.issuer!r}: a {key.key_type} key fits none of {list(self.algorithms)}"
                )
        if self.typ is not None and not self.typ:
            raise ConfigurationError("typ must not be empty")
        object.__setattr__(self, "audiences", audiences)
        object.__setattr__(self, "static_keys", static)


@dataclass(frozen=True, slots=True)
class JWTPolicy:
    """Validation and caching rules shared by every issuer. Times in seconds."""

    leeway: float = 60.0  # clock skew tolerated on exp, nbf and iat
    max_token_bytes: int = 8192  # checked before anything is decoded
    require_exp: bool = True
    require_iat: bool = False
    max_token_age: float | None = None  # reject tokens whose iat is older than this
    require_jti: bool = False  # with a revocation list: a token without jti could never be revoked
    cache_size: int = 10_000  # verified tokens kept (LRU)
    cache_ttl: float = 300.0  # a cached verification is redone after this, and never kept past exp
    revocation_fail_open: bool = False  # when the revocation store is down: allow (True) or 503 (False)
    realm: str | None = None
    location: TokenLocation = field(default_factory=TokenLocation)
    close_expired_websockets: bool = True  # close an accepted websocket (1008) at its token's exp + leeway

    def __post_init__(self) -> None:
        if self.leeway < 0 or self.cache_ttl < 0 or self.cache_size < 0:
            raise ConfigurationError("leeway, cache_ttl and cache_size must not be negative")
        if self.max_token_bytes < 64:
            raise ConfigurationError("max_token_bytes must be at least 64")
        if self.max_token_age is not None and self.max_token_age <= 0:
            raise ConfigurationError("max_token_age must be positive")


class RevocationList:
    """A `jti` deny list on a `KeyValueStore`. Entries expire once the token could no longer be used."""

    def __init__(
        self,
        store: KeyValueStore,
        *,
        prefix: str = "jwt-revoked:",
        retain_after_expiry: float = 300.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if retain_after_expiry < 0:
            raise ConfigurationError("retain_after_expiry must not be negative")
        self._store = store
        self._prefix = prefix
        self._retain = retain_after_expiry
        self._clock = clock

    def __repr__(self) -> str:
        return f"RevocationList({self._store!r}, prefix={self._prefix!r})"

    async def revoke(self, jti: str, *, expires_at: float | None = None) -> None:
        """Deny `jti` until `expires_at` (the token's `exp`) plus a margin for leeway; forever without."""
        if not jti:
            raise ValueError("jti must not be empty")
        ttl = None if expires_at is None else expires_at - self._clock.time() + self._retain
        if ttl is not None and ttl <= 0:
            return
        await self._store.set(self._prefix + jti, b"1", ttl=ttl)

    async def unrevoke(self, jti: str) -> None:
        await self._store.delete(self._prefix + jti)

    async def is_revoked(self, jti: str) -> bool:
        return await self._store.get(self._prefix + jti) is not None


@dataclass(frozen=True, slots=True)
class _Verified:
    principal: Principal
    jti: str | None


def _segment_json(segment: bytes) -> dict[str, Any]:
    try:
        value = json.loads(urlsafe_b64decode(segment))
    except (ValueError, binascii.Error) as exc:
        raise InvalidTokenError("invalid_token", _MALFORMED) from exc
    if not isinstance(value, dict):
        raise InvalidTokenError("invalid_token", _MALFORMED)
    return value


def _number(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidTokenError("invalid_token", f"The {name} claim is not a number")
    return float(value)


def _typ_matches(header: Mapping[str, Any], expected: str) -> bool:
    typ = header.get("typ")
    if not isinstance(typ, str):
        return False
    typ = typ.lower()
    expected = expected.lower()
    return typ == expected or typ == "application/" + expected


class JWTAuthMiddleware(BearerGate):
    """Authenticates `Authorization: Bearer <JWT>` and publishes the `Principal`; see docs/jwt_auth.md."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        issuers: Sequence[JWTIssuer],
        policy: JWTPolicy | None = None,
        routes: Iterable[RouteEntry[AuthMode]] = (),
        default: AuthMode = "required",
        revocation: RevocationList | None = None,
        jwks_policy: JWKSPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
        jwks_caches: Mapping[str, JWKSCache] | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not issuers:
            raise ConfigurationError("at least one issuer is required")
        self._policy = policy = policy or JWTPolicy()
        self._issuers: dict[str, JWTIssuer] = {}
        self._jwks: dict[str, JWKSCache] = {}
        self._owned_jwks: list[JWKSCache] = []  # the caches created here; given ones stay their owner's
        for issuer in issuers:
            if issuer.issuer in self._issuers:
                raise ConfigurationError(f"issuer {issuer.issuer!r} is configured twice")
            self._issuers[issuer.issuer] = issuer
            url = issuer.jwks_url
            if url is not None and url not in self._jwks:
                given = None if jwks_caches is None else jwks_caches.get(url)
                if given is None:
                    given = JWKSCache(url, policy=jwks_policy, http_client=http_client, clock=clock)
                    self._owned_jwks.append(given)
                self._jwks[url] = given
        self._revocation = revocation
        self._clock = clock
        self._cache = TokenCache(policy.cache_size)
        super().__init__(
            app,
            method="jwt",
            routes=routes,
            default=default,
            location=policy.location,
            realm=policy.realm,
            close_expired_websockets=policy.close_expired_websockets,
            leeway=policy.leeway,
            clock=clock,
        )

    def __repr__(self) -> str:
        return f"JWTAuthMiddleware(issuers={list(self._issuers)!r}, policy={self._policy!r})"

    async def aclose(self) -> None:
        """Close the HTTP clients the JWKS caches created (injected clients and caches are their owner's)."""
        for cache in self._owned_jwks:
            await cache.aclose()

    async def _authenticate(self, token: bytes, scope: Scope) -> Principal:
        now = self._clock.time()
        digest = token_digest(token)
        verified: _Verified | None = self._cache.get(digest, now)
        if verified is None:
            verified, until = await self._verify(token, now)
            self._cache.put(digest, verified, until, now)
        if self._revocation is not None and verified.jti is not None:
            await self._check_revoked(verified.jti)
        return verified.principal

    async def _check_revoked(self, jti: str) -> None:
        try:
            revoked = await self._revocation.is_revoked(jti)  # type: ignore[union-attr]
        except StorageError as exc:
            if not self._policy.revocation_fail_open:
                raise VerifierUnavailableError(f"revocation store: {exc}") from exc
            logger.warning("revocation store unavailable, allowing the token (fail-open): %s", exc)
            return
        if revoked:
            raise InvalidTokenError("revoked", "The token has been revoked")

    async def _verify(self, token: bytes, now: float) -> tuple[_Verified, float]:
        policy = self._policy
        if len(token) > policy.max_token_bytes:
            raise InvalidTokenError("invalid_token", "The token is too large")
        parts = token.split(b".")
        if len(parts) != 3:
            raise InvalidTokenError("invalid_token", "The token is not a signed JWT")
        header = _segment_json(parts[0])
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise InvalidTokenError("invalid_token", _MALFORMED)
        if alg.lower() == "none":
            raise InvalidTokenError("invalid_token", "Unsigned tokens are not accepted")
        if "crit" in header or "b64" in header:
            # No extension is understood here, so any critical one must be refused (RFC 7515 §4.1.11).
            raise InvalidTokenError("invalid_token", "The token has critical header parameters")
        claims = _segment_json(parts[1])
        iss = claims.get("iss")
        issuer = self._issuers.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise InvalidTokenError("untrusted_issuer", "The token issuer is not trusted")
        if alg not in issuer.algorithms:
            raise InvalidTokenError("invalid_token", "The token algorithm is not allowed")
        if issuer.typ is not None and not _typ_matches(header, issuer.typ):
            raise InvalidTokenError("invalid_token", "The token type is not accepted")
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise InvalidTokenError("invalid_token", _MALFORMED)
        try:
            signature = urlsafe_b64decode(parts[2])
        except (ValueError, binascii.Error) as exc:
            raise InvalidTokenError("invalid_token", _MALFORMED) from exc
        await self._check_signature(issuer, _ALGORITHMS[alg], kid, parts[0] + b"." + parts[1], signature)
        exp = self._check_times(claims, now)
        self._check_audience(claims, issuer)
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            if jti is not None or (self._revocation is not None and policy.require_jti):
                raise InvalidTokenError("invalid_token", "The token has no usable jti claim")
            jti = None
        principal = issuer.claims.principal(claims, method="jwt", expires_at=exp)
        until = now + policy.cache_ttl if exp is None else min(exp, now + policy.cache_ttl)
        return _Verified(principal, jti), until

    async def _check_signature(
        self, issuer: JWTIssuer, model: JWSAlgModel, kid: str | None, signing_input: bytes, signature: bytes
    ) -> None:
        candidates = [key for key in await self._keys(issuer, kid) if _fits(model, key)]
        if not candidates:
            raise InvalidTokenError("unknown_key", "No key matches the token's key id and algorithm")
        for key in candidates:
            try:
                if model.verify(signing_input, signature, key):
                    return
            except (JoseError, ValueError, TypeError):
                continue
        raise InvalidTokenError("invalid_token", "The token signature is invalid")

    async def _keys(self, issuer: JWTIssuer, kid: str | None) -> list[jwk.Key]:
        static = issuer.static_keys
        if kid is not None:
            # A kid-less static key stands for "any kid": a single configured key needs no kid.
            keys = [key for key in static if key.kid == kid] or [key for key in static if key.kid is None]
        else:
            keys = list(static)
        if issuer.jwks_url is not None and not keys:
            keys.extend(await self._jwks[issuer.jwks_url].get(kid))
        return keys

    def _check_times(self, claims: Mapping[str, Any], now: float) -> float | None:
        policy = self._policy
        leeway = policy.leeway
        exp = _number(claims, "exp")
        if exp is None:
            if policy.require_exp:
                raise InvalidTokenError("invalid_token", "The token has no exp claim")
        elif now > exp + leeway:
            raise InvalidTokenError("expired", "The token expired")
        nbf = _number(claims, "nbf")
        if nbf is not None and now + leeway < nbf:
            raise InvalidTokenError("not_yet_valid", "The token is not valid yet")
        iat = _number(claims, "iat")
        if iat is None:
            if policy.require_iat:
                raise InvalidTokenError("invalid_token", "The token has no iat claim")
        elif iat > now + leeway:
            raise InvalidTokenError("invalid_token", "The token was issued in the future")
        elif policy.max_token_age is not None and now - iat > policy.max_token_age + leeway:
            raise InvalidTokenError("expired", "The token is too old")
        return exp

    @staticmethod
    def _check_audience(claims: Mapping[str, Any], issuer: JWTIssuer) -> None:
        aud = claims.get("aud")
        if isinstance(aud, str):
            presented = {aud}
        elif isinstance(aud, list):
            presented = {item for item in aud if isinstance(item, str)}
        else:
            raise InvalidTokenError("invalid_audience", "The token has no aud claim")
        if presented.isdisjoint(issuer.audiences):
            raise InvalidTokenError("invalid_audience", "The token is not meant for this audience")
