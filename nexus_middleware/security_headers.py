"""Security response headers (HSTS, CSP, nosniff, framing, referrer, permissions, cross-origin policies).

Two presets: `api` (the default, for JSON APIs: nothing may be loaded, framed, referred or embedded) and
`html` (sane defaults for server-rendered pages, with the document-only policies too). Any header can be
overridden with a string or removed with None/False, and headers the preset does not know can be added the
same way. A header the app already set is left alone: the app knows its response better than a blanket
policy.

HSTS goes only on responses to https requests (RFC 6797 §7.2: never over plain http): the scope's scheme,
or the `X-Forwarded-Proto` (or `Forwarded: proto=`) of a peer the `client_resolver` trusts, since TLS usually
ends at a proxy in front. `force_hsts=True` sends it on every response, for a terminator that says nothing.
"""

from collections.abc import Mapping
from types import MappingProxyType
from typing import Literal

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import contains_ctl, is_header_name
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["PRESETS", "SecurityHeadersMiddleware"]

Preset = Literal["api", "html"]

_PERMISSIONS = (
    "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), "
    "payment=(), usb=()"
)

# HSTS is composed from the hsts_* options unless overridden, so it is not part of the presets.
PRESETS: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        # What acts on an API response (OWASP REST Security Cheat Sheet). Permissions-Policy and
        # Cross-Origin-Opener-Policy govern documents that run script or open windows: a response under
        # `default-src 'none'` runs none, so they would only be bytes on every response.
        "api": MappingProxyType(
            {
                "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "DENY",
                "Referrer-Policy": "no-referrer",
                "Cross-Origin-Resource-Policy": "same-origin",
            }
        ),
        "html": MappingProxyType(
            {
                "Content-Security-Policy": (
                    "default-src 'self'; base-uri 'self'; form-action 'self'; frame-ancestors 'self'; "
                    "object-src 'none'"
                ),
                "X-Content-Type-Options": "nosniff",
                "X-Frame-Options": "SAMEORIGIN",
                "Referrer-Policy": "strict-origin-when-cross-origin",
                "Permissions-Policy": _PERMISSIONS,
                "Cross-Origin-Opener-Policy": "same-origin",
                "Cross-Origin-Resource-Policy": "same-origin",
            }
        ),
    }
)

_HSTS = "strict-transport-security"
_HSTS_BYTES = _HSTS.encode("ascii")
_PRELOAD_MIN_AGE = 31_536_000  # hstspreload.org refuses shorter max-ages


class SecurityHeadersMiddleware:
    """Adds the preset's security headers to every http response the app did not set them on."""

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        preset: Preset = "api",
        headers: Mapping[str, str | Literal[False] | None] | None = None,
        hsts_max_age: int = 31_536_000,
        hsts_include_subdomains: bool = True,
        hsts_preload: bool = False,
        force_hsts: bool = False,
        client_resolver: ClientAddressResolver | None = None,
    ) -> None:
        if preset not in PRESETS:
            raise ConfigurationError(f"preset must be one of {sorted(PRESETS)}, not {preset!r}")
        if isinstance(hsts_max_age, bool) or not isinstance(hsts_max_age, int) or hsts_max_age < 0:
            raise ConfigurationError(f"hsts_max_age must be a non-negative int, not {hsts_max_age!r}")
        if hsts_preload and (not hsts_include_subdomains or hsts_max_age < _PRELOAD_MIN_AGE):
            raise ConfigurationError(
                f"hsts_preload needs hsts_include_subdomains=True and hsts_max_age >= {_PRELOAD_MIN_AGE}"
            )
        hsts = f"max-age={hsts_max_age}"
        if hsts_include_subdomains:
            hsts += "; includeSubDomains"
        if hsts_preload:
            hsts += "; preload"

        chosen: dict[str, str] = {_HSTS: hsts}
        chosen.update((name.lower(), value) for name, value in PRESETS[preset].items())
        for name, value in (headers or {}).items():
            if not is_header_name(name):
                raise ConfigurationError(f"{name!r} is not a valid header name")
            if value is None or value is False:
                chosen.pop(name.lower(), None)
            elif not isinstance(value, str) or not value or contains_ctl(value) or not value.isascii():
                raise ConfigurationError(f"the value of {name} must be a non-empty printable ASCII string")
            else:
                chosen[name.lower()] = value

        self.app = app
        self.headers: tuple[tuple[bytes, bytes], ...] = tuple(
            (name.encode("ascii"), value.encode("ascii")) for name, value in chosen.items()
        )
        # Both header sets computed once: a request picks one by its scheme.
        self._plain_headers = (
            self.headers if force_hsts else tuple(h for h in self.headers if h[0] != _HSTS_BYTES)
        )
        self._names = frozenset(name for name, _ in self.headers)
        # A response header whose name has none of these lengths cannot be one of ours: most are passed over
        # without lower-casing them (a response carries several headers, and this runs on every one).
        self._lengths = frozenset(len(name) for name in self._names)
        # A resolver that trusts no proxy would only ever answer the scope's own scheme.
        self._resolver = (
            client_resolver if client_resolver is not None and client_resolver.trusts_proxies else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Websocket handshakes pass untouched: these headers govern how a browser treats a loaded document
        # or resource, and an upgraded connection is neither.
        if scope["type"] != "http" or not self.headers:
            await self.app(scope, receive, send)
            return
        resolver = self._resolver
        secure = scope.get("scheme") == "https" or (
            resolver is not None and resolver.scheme(scope) == "https"
        )
        ours = self.headers if secure else self._plain_headers
        if not ours:  # HSTS was all there was to send
            await self.app(scope, receive, send)
            return
        names = self._names
        lengths = self._lengths

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or ())
                present: set[bytes] | None = None
                for name, _ in headers:
                    if len(name) in lengths:
                        lowered = name.lower()
                        if lowered in names:
                            if present is None:
                                present = set()
                            present.add(lowered)
                if present is None:  # the usual case: the app set none of ours, no filtering
                    headers.extend(ours)
                else:
                    headers.extend(header for header in ours if header[0] not in present)
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def __repr__(self) -> str:
        names = ", ".join(name.decode() for name, _ in self.headers)
        return f"SecurityHeadersMiddleware(headers=[{names}])"
