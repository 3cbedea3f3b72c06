"""The request keys that hashing and sticky routing use: client address, a header, or a cookie."""

from collections.abc import Callable
from http.cookies import CookieError, SimpleCookie
from typing import Literal

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.context import get_context
from nexus_middleware.headers import get_header
from nexus_middleware.types import Scope

__all__ = ["KeySource", "key_extractor"]

KeySource = Literal["client", "header", "cookie"]


def key_extractor(
    source: KeySource, name: str | None = None, *, resolver: ClientAddressResolver | None = None
) -> Callable[[Scope], str | None]:
    """A function returning the request's key, or None when the request has none."""
    if source == "client":
        client_resolver = resolver if resolver is not None else ClientAddressResolver()

        def client_key(scope: Scope) -> str | None:
            context = get_context(scope)
            if context.client is None:
                context.client = client_resolver.resolve(scope)
            return context.client

        return client_key
    if not name:
        raise ValueError(f"a {source} key needs a name")
    if source == "header":
        header = name.lower().encode("latin-1")

        def header_key(scope: Scope) -> str | None:
            value = get_header(scope.get("headers") or (), header)
            return None if value is None else value.decode("latin-1")

        return header_key
    cookie_name = name

    def cookie_key(scope: Scope) -> str | None:
        raw = get_header(scope.get("headers") or (), b"cookie")
        if raw is None:
            return None
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(raw.decode("latin-1"))
        except CookieError:
            return None
        morsel = cookies.get(cookie_name)
        return None if morsel is None else morsel.value

    return cookie_key
