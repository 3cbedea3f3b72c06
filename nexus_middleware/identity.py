"""Identity forwarding: the headers a gateway sends upstream to say who the caller is.

`IdentityHeaders.apply(headers, principal)` returns the outgoing header list with every client-supplied
identity header removed, including the spellings some servers fold onto the same name (`X_Auth_Subject`,
`x.auth.subject`: CGI/WSGI-style stacks turn `_`, and some proxies `.`, into `-`), then sets the identity of
the authenticated principal. A value that could be misread upstream is never forwarded:

- subject or tenant holding a control character (CR, LF, NUL...) or surrounding whitespace: NO identity header
  is forwarded at all, so the upstream sees an unauthenticated request rather than a forged or partial one;
- a role or scope holding a control character, whitespace or the list separator: that item is left out.

Each drop is recorded in the request context (layer "identity", outcome "dropped") and logged.
"""

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from nexus_middleware.context import Principal, RequestContext
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import contains_ctl

__all__ = [
    "IdentityHeaders",
]

logger = logging.getLogger(__name__)

_TOKEN = re.compile(r"[!#$%&'*+^`|~0-9A-Za-z._-]+")
_FOLD = bytes.maketrans(b"_.ABCDEFGHIJKLMNOPQRSTUVWXYZ", b"--abcdefghijklmnopqrstuvwxyz")


def _canonical(name: bytes) -> bytes:
    return name.translate(_FOLD)


@dataclass(frozen=True, slots=True)
class IdentityHeaders:
    """Names of the forwarded identity headers, and which credential headers to strip before forwarding.

    `key_id`: also forward the API key id under this name (None: not forwarded). `strip_credentials`: header
    names removed from the forwarded request, e.g. `("Authorization", "X-API-Key")`, so the upstream never
    sees the caller's credential.
    """

    subject: str = "X-Auth-Subject"
    tenant: str = "X-Auth-Tenant"
    roles: str = "X-Auth-Roles"
    scopes: str = "X-Auth-Scopes"
    key_id: str | None = None
    strip_credentials: tuple[str, ...] = ()
    _strip: frozenset[bytes] = field(init=False, repr=False, compare=False)
    _strip_lengths: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        given: object = self.strip_credentials  # config files hand over a bare string by mistake
        if isinstance(given, str):
            raise ConfigurationError("strip_credentials must be a list of header names")
        object.__setattr__(self, "strip_credentials", tuple(self.strip_credentials))
        identity = [self.subject, self.tenant, self.roles, self.scopes]
        if self.key_id is not None:
            identity.append(self.key_id)
        for name in (*identity, *self.strip_credentials):
            if not isinstance(name, str) or not _TOKEN.fullmatch(name):
                raise ConfigurationError(f"{name!r} is not a valid header name")
        canonical = [_canonical(name.encode("ascii")) for name in identity]
        if len(set(canonical)) != len(canonical):
            raise ConfigurationError("identity header names must differ (ignoring case, '_' and '.')")
        strip = set(canonical) | {_canonical(name.encode("ascii")) for name in self.strip_credentials}
        object.__setattr__(self, "_strip", frozenset(strip))
        object.__setattr__(self, "_strip_lengths", frozenset(map(len, strip)))

    def apply(
        self,
        headers: Iterable[tuple[bytes, bytes]],
        principal: Principal | None,
        *,
        context: RequestContext | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """The headers to forward: client identity headers (and credentials) removed, the principal's set."""
        strip, lengths = self._strip, self._strip_lengths
        # Runs for every forwarded header of every request: folding keeps the length, so a name of another
        # length than every stripped one is kept without building its folded copy (`_canonical` inlined).
        forwarded = [
            header
            for header in headers
            if len(header[0]) not in lengths or header[0].translate(_FOLD) not in strip
        ]
        if principal is None or not principal.is_authenticated:
            return forwarded
        for name, value in ((self.subject, principal.subject), (self.tenant, principal.tenant)):
            if value is not None and _unsafe(value):
                _dropped(context, name, "unsafe_value")
                return forwarded  # a partial identity could be misread as another one: send none
        identity = [(self.subject, principal.subject)]
        if principal.tenant is not None:
            identity.append((self.tenant, principal.tenant))
        if self.key_id is not None and principal.key_id is not None and not _unsafe(principal.key_id):
            identity.append((self.key_id, principal.key_id))
        for name, items, separator in (
            (self.roles, principal.roles, ","),
            (self.scopes, principal.scopes, " "),
        ):
            kept = []
            for item in sorted(items):
                if _unsafe(item) or separator in item or " " in item or "," in item:
                    _dropped(context, name, "unsafe_item")
                else:
                    kept.append(item)
            if kept:
                identity.append((name, separator.join(kept)))
        forwarded.extend((name.lower().encode("ascii"), value.encode()) for name, value in identity)
        return forwarded


def _unsafe(value: str) -> bool:
    return not value or contains_ctl(value) or value != value.strip()


def _dropped(context: RequestContext | None, header: str, reason: str) -> None:
    logger.warning("identity header %s not forwarded: %s", header, reason)
    if context is not None:
        context.record("identity", "dropped", reason=reason, header=header)
