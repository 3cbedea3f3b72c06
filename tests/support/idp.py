"""A tiny identity provider for auth tests: a JWKS endpoint and an RFC 7662 introspection endpoint, served by
real uvicorn through `serve()`, counting what they receive. Plus helpers to mint tokens."""

import asyncio
import base64
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote

from joserfc import jwt
from joserfc.jwk import Key

from nexus_middleware.types import Message, Receive, Scope, Send
from tests.support.asgi import ok_app

ISSUER = "https://idp.example.com/"
AUDIENCE = "orders-api"


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(
    key: Key,
    *,
    alg: str = "ES256",
    header: Mapping[str, Any] | None = None,
    now: float = 1_700_000_000.0,
    ttl: float = 600.0,
    **claims: Any,
) -> str:
    """A signed JWT with sensible claims (iss, aud, sub, iat, exp); `claims` override, None removes."""
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(now),
        "exp": int(now + ttl),
    }
    body.update(claims)
    body = {name: value for name, value in body.items() if value is not None}
    full_header: dict[str, Any] = {"alg": alg}
    if key.kid is not None:
        full_header["kid"] = key.kid
    full_header.update(header or {})
    return jwt.encode(full_header, body, key, algorithms=[alg])


def forge(header: Mapping[str, Any], claims: Mapping[str, Any], signature: bytes = b"") -> str:
    """A token assembled by hand, for attacks the signing library refuses to produce."""
    return ".".join([b64(json.dumps(header).encode()), b64(json.dumps(claims).encode()), b64(signature)])


@dataclass
class JWKSApp:
    """Serves `keys` (public JWKs) at any path; `body`, `status`, `chunks`, `delay` simulate failures."""

    keys: list[Key] = field(default_factory=list)
    cache_control: str | None = None
    status: int = 200
    body: bytes | None = None
    chunks: Sequence[bytes] | None = None
    declared_length: bool = True
    delay: float = 0.0
    hits: int = 0

    def document(self) -> bytes:
        if self.body is not None:
            return self.body
        return json.dumps({"keys": [key.as_dict(private=False) for key in self.keys]}).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await ok_app(scope, receive, send)
            return
        self.hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        headers = [(b"content-type", b"application/json")]
        if self.cache_control is not None:
            headers.append((b"cache-control", self.cache_control.encode()))
        if self.chunks is not None:
            await send({"type": "http.response.start", "status": self.status, "headers": headers})
            for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})
            return
        body = self.document()
        headers.append((b"content-length", str(len(body)).encode()))
        await send({"type": "http.response.start", "status": self.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


@dataclass
class IntrospectionApp:
    """RFC 7662 endpoint: `tokens` maps a token to its introspection answer; others are inactive.

    Requires client authentication with `client_id`/`client_secret`, by HTTP Basic (both form-encoded, RFC
    6749 §2.3.1) or in the form body; 401 otherwise.
    """

    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    client_id: str = "gateway"
    client_secret: str = "s3cret:with%chars"
    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    hits: int = 0
    requests: list[dict[str, list[str]]] = field(default_factory=list)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await ok_app(scope, receive, send)
            return
        self.hits += 1
        raw = b""
        while True:
            message: Message = await receive()
            raw += message.get("body", b"")
            if not message.get("more_body"):
                break
        form = parse_qs(raw.decode())
        self.requests.append(form)
        if self.delay:
            await asyncio.sleep(self.delay)
        authorization = dict(scope["headers"]).get(b"authorization", b"")
        posted = form.get("client_id") == [self.client_id] and form.get("client_secret") == [
            self.client_secret
        ]
        if authorization != basic(self.client_id, self.client_secret) and not posted:
            await _json(send, 401, {"error": "invalid_client"})
            return
        if self.body is not None:
            await _raw(send, self.status, self.body)
            return
        token = form.get("token", [""])[0]
        answer = self.tokens.get(token, {"active": False})
        await _json(send, self.status, answer)


def basic(client_id: str, secret: str) -> bytes:
    pair = f"{quote(client_id, safe='')}:{quote(secret, safe='')}".encode()
    return b"Basic " + base64.b64encode(pair)


async def _json(send: Send, status: int, payload: Any) -> None:
    await _raw(send, status, json.dumps(payload).encode())


async def _raw(send: Send, status: int, body: bytes) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
