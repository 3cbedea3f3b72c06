"""Opaque bearer tokens checked by RFC 7662 token introspection.

The token is POSTed to the authorization server's introspection endpoint with client authentication
(`client_secret_basic`, id and secret form-encoded as RFC 6749 §2.3.1 requires, or `client_secret_post`).
Plain httpx is used rather than authlib's `AsyncOAuth2Client`: the request must go through the injected,
shared `httpx.AsyncClient` with the answer's size capped while it streams, which authlib's client (its own
client class, reading the whole body) does not offer, and its basic scheme skips the form-encoding.

Active answers are cached until the token's `exp` (at most `positive_ttl`), inactive ones for
`negative_ttl`; concurrent requests with the same token share one introspection call. An unreachable or
misbehaving endpoint is never taken for "inactive": the request fails closed with 503 and nothing is cached.
"""

import asyncio
import base64
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

import httpx

from nexus_middleware.bearer import (
    AuthMode,
    BearerGate,
    ClaimMapping,
    TokenCache,
    TokenLocation,
    new_http_client,
    read_limited,
    token_digest,
)
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import Principal
from nexus_middleware.errors import ConfigurationError, InvalidTokenError, VerifierUnavailableError
from nexus_middleware.paths import RouteEntry
from nexus_middleware.types import ASGIApp, Scope

__all__ = ["IntrospectionMiddleware", "IntrospectionPolicy"]

logger = logging.getLogger(__name__)

ClientAuthMethod = Literal["client_secret_basic", "client_secret_post"]
_Outcome = Principal | InvalidTokenError | VerifierUnavailableError
_INACTIVE = "The token is not active"


@dataclass(frozen=True, slots=True)
class IntrospectionPolicy:
    """Caching and transport rules. Times in seconds."""

    positive_ttl: float = 300.0  # an active answer is reused this long at most, and never past exp
    negative_ttl: float = 10.0  # an inactive answer is reused this long
    cache_size: int = 10_000
    timeout: float = 5.0
    max_response_bytes: int = 64 * 1024
    max_token_bytes: int = 8192
    leeway: float = 30.0  # on the exp/nbf members of the answer
    auth_method: ClientAuthMethod = "client_secret_basic"
    token_type_hint: str | None = "access_token"
    realm: str | None = None
    location: TokenLocation = field(default_factory=TokenLocation)

    def __post_init__(self) -> None:
        if self.positive_ttl < 0 or self.negative_ttl < 0 or self.cache_size < 0 or self.leeway < 0:
            raise ConfigurationError("TTLs, cache_size and leeway must not be negative")
        if self.timeout <= 0 or self.max_response_bytes <= 0 or self.max_token_bytes <= 0:
            raise ConfigurationError("timeout, max_response_bytes and max_token_bytes must be positive")
        if self.auth_method not in ("client_secret_basic", "client_secret_post"):
            raise ConfigurationError(f"unsupported client auth method {self.auth_method!r}")


class IntrospectionMiddleware(BearerGate):
    """Authenticates opaque bearer tokens by RFC 7662 introspection; see docs/introspection.md."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        endpoint: str,
        client_id: str,
        client_secret: str,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        claims: ClaimMapping | None = None,
        policy: IntrospectionPolicy | None = None,
        routes: Iterable[RouteEntry[AuthMode]] = (),
        default: AuthMode = "required",
        http_client: httpx.AsyncClient | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if not endpoint.startswith(("https://", "http://")):
            raise ConfigurationError(f"introspection endpoint must be http(s), not {endpoint!r}")
        if not client_id:
            raise ConfigurationError("client_id must not be empty")
        audiences = (
            None if audience is None else frozenset([audience] if isinstance(audience, str) else audience)
        )
        if audiences is not None and (not audiences or "" in audiences):
            raise ConfigurationError("audience must hold non-empty strings")
        self._endpoint = endpoint
        self._policy = policy = policy or IntrospectionPolicy()
        self._issuer = issuer
        self._audiences = audiences
        self._claims = claims or ClaimMapping()
        self._client = http_client
        self._owns_client = http_client is None
        self._clock = clock
        self._cache = TokenCache(policy.cache_size)
        self._inflight: dict[bytes, asyncio.Task[_Outcome]] = {}
        self._form: dict[str, str] = {}
        self._headers = {"accept": "application/json"}
        if policy.token_type_hint is not None:
            self._form["token_type_hint"] = policy.token_type_hint
        if policy.auth_method == "client_secret_basic":
            pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}".encode()
            self._headers["authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        else:
            self._form |= {"client_id": client_id, "client_secret": client_secret}
        super().__init__(
            app,
            method="introspection",
            routes=routes,
            default=default,
            location=policy.location,
            realm=policy.realm,
        )

    def __repr__(self) -> str:
        return f"IntrospectionMiddleware(endpoint={self._endpoint!r}, policy={self._policy!r})"

    async def aclose(self) -> None:
        for task in self._inflight.values():
            task.cancel()
        if self._owns_client and self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _authenticate(self, token: bytes, scope: Scope) -> Principal:
        if len(token) > self._policy.max_token_bytes:
            raise InvalidTokenError("invalid_token", "The token is too large")
        digest = token_digest(token)
        outcome: _Outcome | None = self._cache.get(digest, self._clock.time())
        if outcome is None:
            task = self._inflight.get(digest)
            if task is None:
                task = self._inflight[digest] = asyncio.ensure_future(self._introspect(token, digest))
            # shield: one cancelled request must not cancel the call its neighbours wait for
            outcome = await asyncio.shield(task)
        # A fresh exception each time: re-raising a cached instance would grow its traceback forever.
        if isinstance(outcome, InvalidTokenError):
            raise InvalidTokenError(outcome.reason, outcome.description)
        if isinstance(outcome, VerifierUnavailableError):
            raise VerifierUnavailableError(*outcome.args)
        return outcome

    async def _introspect(self, token: bytes, digest: bytes) -> _Outcome:
        try:
            answer = await self._call(token)
        except Exception as exc:  # any transport or protocol failure is "unavailable", never "inactive"
            logger.warning("token introspection at %s failed: %s", self._endpoint, exc or type(exc).__name__)
            return VerifierUnavailableError(f"introspection failed: {exc}")
        finally:
            self._inflight.pop(digest, None)
        now = self._clock.time()
        try:
            principal, exp = self._principal(answer, now)
        except InvalidTokenError as exc:
            self._cache.put(digest, exc, now + self._policy.negative_ttl, now)
            return exc
        until = now + self._policy.positive_ttl
        self._cache.put(digest, principal, until if exp is None else min(until, exp), now)
        return principal

    async def _call(self, token: bytes) -> dict[str, Any]:
        if self._client is None:
            self._client = new_http_client(self._policy.timeout)
        form = {"token": token.decode("latin-1"), **self._form}
        async with (
            asyncio.timeout(self._policy.timeout),
            self._client.stream("POST", self._endpoint, data=form, headers=self._headers) as response,
        ):
            body = await read_limited(response, self._policy.max_response_bytes)
        answer = json.loads(body)
        if not isinstance(answer, dict) or not isinstance(answer.get("active"), bool):
            raise ValueError("the answer has no boolean 'active' member")
        return answer

    def _principal(self, answer: dict[str, Any], now: float) -> tuple[Principal, float | None]:
        if answer["active"] is not True:
            raise InvalidTokenError("invalid_token", _INACTIVE)
        leeway = self._policy.leeway
        exp = _number(answer.get("exp"))
        if exp is not None and now > exp + leeway:
            raise InvalidTokenError("expired", "The token expired")
        nbf = _number(answer.get("nbf"))
        if nbf is not None and now + leeway < nbf:
            raise InvalidTokenError("not_yet_valid", "The token is not valid yet")
        if self._issuer is not None and answer.get("iss") != self._issuer:
            raise InvalidTokenError("untrusted_issuer", "The token issuer is not trusted")
        if self._audiences is not None:
            aud = answer.get("aud")
            listed = aud if isinstance(aud, list) else [aud]
            presented = {item for item in listed if isinstance(item, str)}
            if presented.isdisjoint(self._audiences):
                raise InvalidTokenError("invalid_audience", "The token is not meant for this audience")
        principal = self._claims.principal(
            answer, method="introspection", expires_at=exp, fallback_subject="client_id"
        )
        return principal, exp


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)
