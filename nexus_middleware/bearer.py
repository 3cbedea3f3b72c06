"""What every bearer-token authenticator shares: where the token is read, per-route modes, RFC 6750 refusals,
claim mapping to the `Principal`, and a bounded cache of verified tokens.

`JWTAuthMiddleware` and `IntrospectionMiddleware` differ only in how a token becomes a `Principal`; both
subclass `BearerGate`, so a route is required/optional/exempt, a token is found, and a refusal looks the same
whichever of them is in front.
"""

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx

from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import (
    ANONYMOUS,
    AUTH_MODES,
    AuthMethod,
    AuthMode,
    Decision,
    Principal,
    get_context,
    publish_principal,
)
from nexus_middleware.errors import (
    ConfigurationError,
    InvalidPathError,
    InvalidTokenError,
    VerifierUnavailableError,
)
from nexus_middleware.headers import get_headers
from nexus_middleware.paths import INVALID_PATH, RouteEntry, RouteTable, request_path, take_query_param
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = [
    "AuthMode",
    "BearerGate",
    "ClaimMapping",
    "TokenCache",
    "TokenLocation",
    "claim_at",
    "new_http_client",
    "read_limited",
    "token_digest",
]

logger = logging.getLogger(__name__)

_LAYER = "auth"
_UNAVAILABLE_RETRY_AFTER = b"5"
_ANONYMOUS_DETAILS: Mapping[str, Any] = MappingProxyType({"method": "anonymous"})


def claim_at(claims: Mapping[str, Any], path: str) -> Any:
    """The claim named `path`, else the value at its dotted path (`realm_access.roles`), else None.

    The exact name wins so claim names that hold dots (`https://example.com/roles`) still work.
    """
    if path in claims:
        return claims[path]
    value: Any = claims
    for part in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _strings(value: Any) -> frozenset[str]:
    """A space-separated string or a list of strings, as a set; anything else is empty."""
    if isinstance(value, str):
        return frozenset(value.split())
    if isinstance(value, list | tuple):
        return frozenset(item for item in value if isinstance(item, str) and item)
    return frozenset()


def _optional_string(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True, slots=True)
class ClaimMapping:
    """Which claims become which `Principal` fields. Paths may be dotted (`realm_access.roles`).

    Scopes are read from every claim in `scopes` (a space-separated string, RFC 8693 `scope`, or a list,
    the `scp` habit) and merged. Roles accept the same two shapes.
    """

    subject: str = "sub"
    roles: str | None = "roles"
    tenant: str | None = None
    plan: str | None = None
    scopes: tuple[str, ...] = ("scope", "scp")

    def __post_init__(self) -> None:
        if not self.subject:
            raise ConfigurationError("the subject claim name must not be empty")
        scopes: object = self.scopes
        if isinstance(scopes, str):
            raise ConfigurationError("scopes is a tuple of claim names, not a string")

    def principal(
        self,
        claims: Mapping[str, Any],
        *,
        method: AuthMethod,
        expires_at: float | None,
        fallback_subject: str | None = None,
    ) -> Principal:
        """The Principal these claims describe. Raises `InvalidTokenError` without a usable subject."""
        subject = _optional_string(claim_at(claims, self.subject))
        if subject is None and fallback_subject is not None:
            subject = _optional_string(claim_at(claims, fallback_subject))
        if subject is None:
            raise InvalidTokenError("invalid_token", f"The token has no {self.subject} claim")
        scopes: frozenset[str] = frozenset()
        for name in self.scopes:
            scopes |= _strings(claim_at(claims, name))
        return Principal(
            subject=subject,
            method=method,
            tenant=None if self.tenant is None else _optional_string(claim_at(claims, self.tenant)),
            roles=frozenset() if self.roles is None else _strings(claim_at(claims, self.roles)),
            scopes=scopes,
            plan=None if self.plan is None else _optional_string(claim_at(claims, self.plan)),
            expires_at=expires_at,
            claims=MappingProxyType(dict(claims)),
        )


@dataclass(frozen=True, slots=True)
class TokenLocation:
    """Where a bearer token is read. `Authorization: Bearer` always; a cookie or a query parameter only when
    named here (query parameters end up in logs and browser history: RFC 6750 §5.3).

    With `strip` (the default), the named cookie and query parameter are removed from the scope before
    anything else happens, on every http and websocket scope the authenticator sees: the app, a proxy
    behind it and the server's access log never see the credential. `strip=False` leaves them in place.
    """

    cookie: str | None = None
    query: str | None = None
    strip: bool = True

    def __post_init__(self) -> None:
        if self.cookie is not None and not self.cookie:
            raise ConfigurationError("the token cookie name must not be empty")
        if self.query is not None and not self.query:
            raise ConfigurationError("the token query parameter name must not be empty")


def token_digest(token: bytes) -> bytes:
    """The cache key of a token: never the token itself, so a memory dump shows no usable credential."""
    return hashlib.blake2b(token, digest_size=16).digest()


class TokenCache:
    """A bounded LRU of answers per token digest; an entry is dropped at its wall-clock `until`."""

    __slots__ = ("_data", "_max_entries")

    def __init__(self, max_entries: int) -> None:
        if max_entries < 0:
            raise ConfigurationError("cache size must not be negative")
        self._max_entries = max_entries
        self._data: OrderedDict[bytes, tuple[Any, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: bytes, now: float) -> Any:
        item = self._data.get(key)
        if item is None:
            return None
        if item[1] <= now:
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return item[0]

    def put(self, key: bytes, value: Any, until: float, now: float) -> None:
        if self._max_entries == 0 or until <= now:
            return
        self._data[key] = (value, until)
        self._data.move_to_end(key)
        if len(self._data) > self._max_entries:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


def _quoted(value: str) -> str:
    # RFC 6750 attribute values are quoted-strings; our texts are fixed, but never let one break the header.
    return value.replace("\\", "").replace('"', "'")


class BearerGate:
    """The base of the bearer authenticators: mode, token, authenticate, publish or refuse.

    A subclass says how a token becomes a `Principal` (`_authenticate`); everything a client can see (route
    modes, token locations, RFC 6750 refusals, websocket handling, decisions) is decided here, once.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        method: AuthMethod,
        routes: Iterable[RouteEntry[AuthMode]],
        default: AuthMode,
        location: TokenLocation,
        realm: str | None,
        close_expired_websockets: bool = False,
        leeway: float = 0.0,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        if default not in AUTH_MODES:
            raise ConfigurationError(f"default must be one of {sorted(AUTH_MODES)}, not {default!r}")
        entries = list(routes)
        for entry in entries:
            if entry[2] not in AUTH_MODES:
                raise ConfigurationError(f"route mode must be one of {sorted(AUTH_MODES)}, not {entry[2]!r}")
        if realm is not None and (not realm or '"' in realm or "\\" in realm):
            raise ConfigurationError("realm must be a non-empty string without quotes or backslashes")
        self.app = app
        self._method = method
        self._routes: RouteTable[AuthMode] | None = RouteTable(entries) if entries else None
        self._default = default
        self._location = location
        self._strip = location.strip and (location.cookie is not None or location.query is not None)
        self._close_expired = close_expired_websockets
        self._leeway = leeway
        self._session_clock = clock  # not `_clock`: a subclass keeps its own
        self._scheme = "Bearer" if realm is None else f'Bearer realm="{realm}"'
        # Decisions are immutable, so the hot path appends one built here instead of building one per request.
        self._allow = Decision(_LAYER, "allow", details=MappingProxyType({"method": method}))
        self._anonymous = Decision(_LAYER, "allow", reason="anonymous", details=_ANONYMOUS_DETAILS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" and scope["type"] != "websocket":
            await self.app(scope, receive, send)
            return
        await self._handle(scope, receive, send)

    async def _authenticate(self, token: bytes, scope: Scope) -> Principal:
        """The Principal `token` stands for; raises `InvalidTokenError` or `VerifierUnavailableError`."""
        raise NotImplementedError

    def _www_authenticate(
        self, error: str | None = None, description: str | None = None, **params: str
    ) -> bytes:
        """An RFC 6750 `WWW-Authenticate` value; no `error` when no token was presented (§3.1)."""
        parts = [] if error is None else [f'error="{error}"']
        if description is not None:
            parts.append(f'error_description="{_quoted(description)}"')
        parts.extend(f'{name}="{_quoted(value)}"' for name, value in params.items())
        if not parts:
            return self._scheme.encode("latin-1")
        separator = ", " if " " in self._scheme else " "
        return (self._scheme + separator + ", ".join(parts)).encode("latin-1", "replace")

    def _mode(self, scope: Scope) -> AuthMode:
        if self._routes is None:
            return self._default
        # A websocket handshake is a GET (RFC 6455 §4.1), as the router, RBAC and the limiters match it: a
        # method-less lookup would take the first route on the path, perhaps a public POST-only one.
        found = self._routes.for_request(scope).lookup(request_path(scope), scope.get("method", "GET"))
        return self._default if found is None else found

    def _token(self, scope: Scope, taken: list[bytes] | None) -> bytes | None:
        """The presented token, or None. Raises `InvalidTokenError("invalid_request")` when ambiguous.

        `taken` holds the cookie and query tokens `_take` already removed from the scope (None: not stripped).
        """
        headers = scope["headers"]
        found: list[bytes] = []
        values = get_headers(headers, b"authorization")
        if values:
            if len(values) > 1:
                raise InvalidTokenError("invalid_request", "More than one Authorization header")
            scheme, _, credentials = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer":
                credentials = credentials.strip()
                if not credentials:
                    raise InvalidTokenError("invalid_request", "The Bearer credentials are empty")
                found.append(credentials)
        location = self._location
        if taken is not None:
            found.extend(taken)
        elif location.cookie is None and location.query is None:
            return found[0] if found else None
        else:
            if location.cookie is not None:
                found.extend(_split_cookies(headers, location.cookie)[0])
            if location.query is not None:
                found.extend(take_query_param(scope.get("query_string", b""), location.query)[0])
        if not found:
            return None
        if len(found) > 1:  # RFC 6750 §2: a client must not use more than one method
            raise InvalidTokenError("invalid_request", "The token was presented more than once")
        return found[0]

    def _take(self, scope: Scope) -> list[bytes]:
        """The cookie and query tokens, removed from the scope (in place, so the server's own access log
        sees the stripped query too) before any refusal or route lookup can happen."""
        location = self._location
        found: list[bytes] = []
        if location.cookie is not None:
            values, headers = _split_cookies(scope["headers"], location.cookie)
            if headers is not None:
                scope["headers"] = headers
                found.extend(values)
        if location.query is not None:
            query = scope.get("query_string", b"")
            if query:
                values, rest = take_query_param(query, location.query)
                if rest is not None:
                    scope["query_string"] = rest
                    found.extend(values)
        return found

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        taken = self._take(scope) if self._strip else None
        try:
            mode = self._mode(scope)
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer=_LAYER)
            return
        if mode == "exempt":
            await self.app(scope, receive, send)
            return
        context = get_context(scope)
        try:
            token = self._token(scope, taken)
            # The app runs outside this try: its own exceptions must propagate, never become a refusal.
            principal = None if token is None else await self._authenticate(token, scope)
        except InvalidTokenError as exc:
            context.record(_LAYER, "deny", reason=exc.reason, method=self._method)
            if exc.reason == "invalid_request":
                challenge = self._www_authenticate("invalid_request", exc.description)
                await self._refuse(scope, send, 400, exc.description, challenge)
            else:
                challenge = self._www_authenticate("invalid_token", exc.description)
                await self._refuse(scope, send, 401, exc.description, challenge, error="invalid_token")
            return
        except VerifierUnavailableError as exc:
            logger.warning("token check unavailable: %s", exc)
            context.record(_LAYER, "deny", reason="verifier_unavailable", method=self._method)
            await send_problem(
                scope,
                send,
                Problem(503, "Authentication is temporarily unavailable"),
                headers=[(b"retry-after", _UNAVAILABLE_RETRY_AFTER)],
                layer=_LAYER,
            )
            return
        if principal is not None:
            publish_principal(scope, principal)
            context.decisions.append(self._allow)
        elif mode == "optional":
            publish_principal(scope, ANONYMOUS)
            context.decisions.append(self._anonymous)
        else:
            context.record(_LAYER, "deny", reason="missing_credentials", method=self._method)
            await self._refuse(scope, send, 401, "Authentication is required", self._www_authenticate())
            return
        if scope["type"] == "websocket" and self._close_expired and principal is not None:
            expires_at = principal.expires_at
            if expires_at is not None:
                session = _ExpiringSession(
                    self.app, expires_at + self._leeway, self._session_clock, self._method
                )
                await session(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _refuse(
        self,
        scope: Scope,
        send: Send,
        status: int,
        detail: str,
        challenge: bytes,
        *,
        error: str | None = None,
    ) -> None:
        extensions: Mapping[str, Any] = MappingProxyType({} if error is None else {"error": error})
        await send_problem(
            scope,
            send,
            Problem(status, detail, extensions=extensions),
            headers=[(b"www-authenticate", challenge)],
            layer=_LAYER,
        )


_EXPIRED_REASON = "The token expired"


class _ExpiringSession:
    """One accepted websocket whose credential expires at `deadline` (wall clock, leeway included).

    At the deadline the client gets `websocket.close` 1008 and the app gets `websocket.disconnect` from
    `receive` (a relay ends and closes its upstream side); whatever the app sends afterwards is dropped.
    Nothing is sent once the app closed or the client left, and the timer goes with the session.
    """

    __slots__ = (
        "_app",
        "_clock",
        "_closer",
        "_deadline",
        "_ended",
        "_expired",
        "_method",
        "_pending",
        "_timer",
        "_wake",
    )

    def __init__(self, app: ASGIApp, deadline: float, clock: Clock, method: AuthMethod) -> None:
        self._app = app
        self._deadline = deadline
        self._clock = clock
        self._method = method
        self._timer: asyncio.TimerHandle | None = None
        self._wake: asyncio.Future[None] | None = None  # armed at accept, resolved at expiry
        self._pending: asyncio.Future[Message] | None = None  # a receive() that outlived its caller
        self._closer: asyncio.Task[None] | None = None
        self._ended = False  # the app closed or refused, or the client left: never send our close
        self._expired = False  # we closed: the app's later messages are dropped

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_watched(message: Message) -> None:
            if self._expired:
                return  # we closed the connection for the app; it learns so from receive
            kind = message["type"]
            if kind == "websocket.accept":
                await send(message)
                self._arm(scope, send)
                return
            if kind == "websocket.close" or kind == "websocket.http.response.start":
                self._end()
            await send(message)

        async def receive_watched() -> Message:
            wake = self._wake
            if wake is None:  # not accepted yet (or already ended): nothing to race
                return await receive()
            if wake.done():  # resolved at expiry only
                return {"type": "websocket.disconnect", "code": 1008}
            pending = self._pending
            if pending is None:
                pending = self._pending = asyncio.ensure_future(receive())
            if not pending.done():
                await asyncio.wait((pending, wake), return_when=asyncio.FIRST_COMPLETED)
            if wake.done():  # a message that raced the expiry is dropped with the session
                return {"type": "websocket.disconnect", "code": 1008}
            self._pending = None
            message = pending.result()
            if message["type"] == "websocket.disconnect":
                self._end()
            return message

        try:
            await self._app(scope, receive_watched, send_watched)
        finally:
            self._end()
            pending = self._pending
            if pending is not None and not pending.cancel() and not pending.cancelled():
                pending.exception()  # retrieved: a receive that failed after the app stopped listening
            if self._closer is not None:
                await self._closer

    def _arm(self, scope: Scope, send: Send) -> None:
        if self._ended or self._wake is not None:
            return
        loop = asyncio.get_running_loop()
        self._wake = loop.create_future()
        delay = max(0.0, self._deadline - self._clock.time())
        self._timer = loop.call_later(delay, self._expire, scope, send, loop)

    def _end(self) -> None:
        self._ended = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, scope: Scope, send: Send, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        if self._ended:
            return
        self._ended = self._expired = True
        get_context(scope).record(_LAYER, "deny", reason="expired", method=self._method)
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        self._closer = loop.create_task(self._close(send))

    @staticmethod
    async def _close(send: Send) -> None:
        try:
            await send({"type": "websocket.close", "code": 1008, "reason": _EXPIRED_REASON})
        except Exception as exc:  # the client left meanwhile: the server refuses the send
            logger.debug("closing an expired websocket failed: %r", exc)


def _split_cookies(
    headers: Iterable[tuple[bytes, bytes]], name: str
) -> tuple[list[bytes], list[tuple[bytes, bytes]] | None]:
    """The non-empty values of cookie `name`, and the headers without it (None when it is absent)."""
    wanted = name.encode("latin-1")
    found: list[bytes] = []
    rest: list[tuple[bytes, bytes]] = []
    removed = False
    for header in headers:
        if header[0] != b"cookie":
            rest.append(header)
            continue
        kept: list[bytes] = []
        for pair in header[1].split(b";"):
            key, sep, content = pair.strip().partition(b"=")
            if key != wanted:
                kept.append(pair.strip())
                continue
            removed = True
            if sep and content:
                found.append(content.strip(b'"'))
        if kept:
            rest.append((b"cookie", b"; ".join(kept)))
    return found, rest if removed else None


def new_http_client(timeout: float) -> httpx.AsyncClient:
    """The client an authenticator creates on first use when none was injected: no redirects, no proxy
    settings from the environment (the library reads no environment)."""
    return httpx.AsyncClient(timeout=timeout, follow_redirects=False, trust_env=False)


async def read_limited(response: httpx.Response, limit: int) -> bytes:
    """The (decoded) body of a streamed 200 response, refused as soon as it grows past `limit` bytes."""
    if response.status_code != 200:
        raise ValueError(f"status {response.status_code}")
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ValueError(f"a body of {declared} bytes exceeds {limit}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise ValueError(f"the body exceeds {limit} bytes")
    return bytes(body)
