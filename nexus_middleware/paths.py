"""Path normalization and route patterns: how every route-matching layer sees a request path.

All layers match on `request_path(scope)`, one canonical form of the raw request target, so no layer can be
bypassed with `/%61dmin`, `//admin`, `/x/../admin` or `/admin%2Fusers`. The policy:

- percent-encoded unreserved characters (RFC 3986 §2.3) are decoded; other escapes are kept, upper-cased;
- empty segments (`//`) and `.` segments are dropped, `..` removes the previous segment (never above `/`);
- an encoded slash `%2F` is, by `encoded_slash`: `"decode"` (default; a separator, as Starlette routes it),
  `"keep"` (part of the segment) or `"reject"` (`InvalidPathError`);
- a backslash, literal or `%5C`, is by `backslash`: `"keep"` (default; an ordinary character, kept as `%5C`),
  `"slash"` (a separator, as some servers treat it) or `"reject"`;
- an encoded NUL is always rejected; a stray `%` becomes `%25`; raw non-ASCII bytes are percent-encoded.

Case is kept and a trailing slash is kept: both are the router's business.

Hosts are compared as `normalize_host` makes them (lower-case, port dropped, an IPv6 literal in its brackets),
read from the `Host` header by `request_host`; `RouteTable` entries may name one.
"""

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar
from urllib.parse import unquote_to_bytes

from nexus_middleware.context import get_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.headers import get_header
from nexus_middleware.problem import Problem
from nexus_middleware.types import Scope

__all__ = [
    "INVALID_PATH",
    "PathPattern",
    "RouteEntry",
    "RouteTable",
    "normalize_host",
    "normalize_path",
    "request_host",
    "request_path",
    "route_host",
    "take_query_param",
]

# What every layer answers when `request_path` raises: one text, whichever layer saw the path first.
INVALID_PATH = Problem(400, "The request path is invalid.")

SlashPolicy = Literal["decode", "keep", "reject"]
BackslashPolicy = Literal["keep", "slash", "reject"]

_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_HEX = frozenset(b"0123456789abcdefABCDEF")
# Bytes that may stand literally in a normalized path (RFC 3986 pchar plus "/", minus "%" and "\").
_LITERAL = _UNRESERVED | frozenset(b"!$&'()*+,;=:@/")
_LITERAL_BYTES = bytes(sorted(_LITERAL))
_SEPARATOR = 0x2F  # a path separator in the intermediate form; an encoded slash that is kept is re-escaped
_KEPT_SLASH = -1


def normalize_path(
    raw: str | bytes,
    *,
    encoded_slash: SlashPolicy = "decode",
    backslash: BackslashPolicy = "keep",
) -> str:
    """The canonical form of a raw (percent-encoded) request path. Raises `InvalidPathError`."""
    data = raw.encode("latin-1", "replace") if isinstance(raw, str) else raw
    if _is_clean(data):
        return data.decode("ascii")
    # Decode into a list of "units": a byte value, or _KEPT_SLASH for a %2F kept inside a segment.
    units: list[int] = []
    escaped: list[bool] = []  # whether the unit came from an escape, so it is re-escaped on output
    i, n = 0, len(data)
    while i < n:
        byte = data[i]
        if byte == 0x25 and i + 2 < n and data[i + 1] in _HEX and data[i + 2] in _HEX:
            value = int(data[i + 1 : i + 3], 16)
            i += 3
            if value == 0:
                raise InvalidPathError("the path holds an encoded NUL")
            if value == _SEPARATOR:
                if encoded_slash == "reject":
                    raise InvalidPathError("the path holds an encoded slash")
                if encoded_slash == "keep":
                    units.append(_KEPT_SLASH)
                    escaped.append(True)
                    continue
                units.append(_SEPARATOR)
                escaped.append(False)
                continue
            units.append(value)
            escaped.append(value not in _UNRESERVED)
            continue
        i += 1
        if byte == 0:
            raise InvalidPathError("the path holds a NUL byte")
        units.append(byte)
        escaped.append(byte not in _LITERAL or byte == 0x25)
    segments: list[str] = []
    current: list[str] = []
    for unit, was_escaped in zip(units, escaped, strict=True):
        if unit == 0x5C:
            if backslash == "reject":
                raise InvalidPathError("the path holds a backslash")
            if backslash == "slash":
                unit, was_escaped = _SEPARATOR, False
        if unit == _SEPARATOR and not was_escaped:
            _push(segments, "".join(current))
            current = []
        elif unit == _KEPT_SLASH:
            current.append("%2F")
        elif was_escaped:
            current.append(f"%{unit:02X}")
        else:
            current.append(chr(unit))
    last = "".join(current)
    trailing = last == "" or last in (".", "..")
    _push(segments, last)
    path = "/" + "/".join(segments)
    if trailing and segments:
        path += "/"
    return path


def _push(segments: list[str], segment: str) -> None:
    if segment in ("", "."):
        return
    if segment == "..":
        if segments:
            segments.pop()
        return
    segments.append(segment)


def _is_clean(data: bytes) -> bool:
    # The common case: already canonical, so normalization is one scan and no allocation.
    if not data.startswith(b"/") or b"//" in data or b"/." in data:
        return False
    return not data.translate(None, _LITERAL_BYTES)  # deleting every allowed byte leaves nothing


def request_path(scope: Scope) -> str:
    """The normalized path of the request with the default policy, computed once per request.

    Raises `InvalidPathError`; callers answer `INVALID_PATH` (400).
    """
    context = get_context(scope)
    cached = context.extras.get("nexus.path")
    if cached is not None:
        return cached  # type: ignore[no-any-return]
    raw = scope.get("raw_path")
    if raw is None:
        raw = scope.get("path", "/").encode("utf-8")
    elif b"?" in raw:  # some servers include the query string
        raw = raw.partition(b"?")[0]
    path = normalize_path(raw)
    context.extras["nexus.path"] = path
    return path


def normalize_host(host: str) -> str:
    """How hosts are compared: lower-case and without a port; an IPv6 literal keeps its brackets (`[::1]`)."""
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host if end == -1 else host[: end + 1]
    return host.partition(":")[0]


def route_host(host: str) -> str:
    """A route's host as requests are compared with it; `ConfigurationError` when none could match it."""
    normalized = normalize_host(host)
    if not normalized or normalized != host.lower():
        raise ConfigurationError(
            f"route host {host!r} must be a host name without a port (an IPv6 literal in brackets)"
        )
    return normalized


def request_host(scope: Scope) -> str | None:
    """The request's `Host` header as `normalize_host` makes it, or None when there is none."""
    value = get_header(scope.get("headers") or (), b"host")
    return None if value is None else normalize_host(value.decode("latin-1"))


_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::(str|int|path|uuid))?\}")
_CONVERTERS = {
    "str": "[^/]+",
    "int": "[0-9]+",
    "path": ".*",
    "uuid": "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}",
}


class PathPattern:
    """A route pattern in Starlette's syntax, matched against normalized paths or route templates.

    `/users/{id}` matches one segment, `{id:int}` digits, `{rest:path}` the remainder. A trailing `/*` matches
    the prefix itself and everything below it (`/admin/*` covers `/admin` and `/admin/x/y`); `*` alone
    matches every path. A route template such as `/users/{user_id}` also matches, so the same pattern works
    before and after routing.
    """

    __slots__ = ("_regex", "is_static", "pattern")

    def __init__(self, pattern: str) -> None:
        if not pattern.startswith("/") and pattern != "*":
            raise ConfigurationError(f"path pattern {pattern!r} must start with '/' or be '*'")
        self.pattern = pattern
        self.is_static = pattern != "*" and "{" not in pattern and not pattern.endswith("/*")
        if pattern == "*":
            self._regex = re.compile(r".*", re.DOTALL)
            return
        body = pattern[:-2] if pattern.endswith("/*") else pattern
        regex, position = "", 0
        for match in _PARAM.finditer(body):
            regex += re.escape(body[position : match.start()])
            regex += f"(?P<{match.group(1)}>{_CONVERTERS[match.group(2) or 'str']})"
            position = match.end()
        regex += re.escape(body[position:])
        if pattern.endswith("/*"):
            regex += "(?:/.*)?"
        try:
            self._regex = re.compile(regex, re.DOTALL)
        except re.error as exc:
            raise ConfigurationError(f"path pattern {pattern!r} is invalid: {exc}") from exc

    def match(self, path: str) -> dict[str, str] | None:
        """The path parameters when `path` matches the whole pattern, else None."""
        if self.is_static:
            return {} if path == self.pattern else None
        found = self._regex.fullmatch(path)
        return None if found is None else found.groupdict()

    def matches(self, path: str) -> bool:
        """Whether `path` matches the whole pattern (`match` without building the parameters)."""
        if self.is_static:
            return path == self.pattern
        return self._regex.fullmatch(path) is not None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PathPattern) and other.pattern == self.pattern

    def __hash__(self) -> int:
        return hash(self.pattern)

    def __repr__(self) -> str:
        return f"PathPattern({self.pattern!r})"


T = TypeVar("T")

# `(pattern, methods, value)`, or with a host as a 4th element: that entry matches requests to that host only.
RouteEntry = tuple[str, Iterable[str] | None, T] | tuple[str, Iterable[str] | None, T, str | None]


@dataclass(frozen=True, slots=True)
class _Entry(Generic[T]):
    pattern: PathPattern
    methods: frozenset[str] | None
    value: T
    host: str | None


def _entry(entry: RouteEntry[T]) -> _Entry[T]:
    if len(entry) == 4:
        pattern, methods, value, host = entry
    else:
        (pattern, methods, value), host = entry, None
    method_set = None if methods is None else frozenset(m.upper() for m in methods)
    return _Entry(PathPattern(pattern), method_set, value, None if host is None else route_host(host))


class RouteTable(Generic[T]):
    """An ordered table of `(pattern, methods) -> value`; the first matching entry wins.

    `methods=None` matches every method. An entry may name a host as a 4th element (`RouteEntry`): it then
    matches requests to that host only (compared as `normalize_host` makes it), and host-less entries match
    every host. `for_request(scope)` (or `for_host(host)`) gives the table a request sees: the entries with
    its host or none, in their order, as the gateway's router tries routes. The table's own `lookup`,
    `match` and `allowed_methods` see the host-less entries only, as a request without a `Host` header.
    Static patterns without a method filter are found by one dict lookup.
    """

    __slots__ = ("_entries", "_hosts", "_raw_hosts", "_size", "_static")

    def __init__(self, entries: Iterable[RouteEntry[T]] = ()) -> None:
        compiled = [_entry(entry) for entry in entries]
        self._index([entry for entry in compiled if entry.host is None])
        self._size = len(compiled)
        # One table per host, built here so that a request only picks one: no filtering per request.
        self._hosts: dict[str, RouteTable[T]] = {}
        for host in dict.fromkeys(entry.host for entry in compiled if entry.host is not None):
            table: RouteTable[T] = RouteTable()
            table._index([entry for entry in compiled if entry.host is None or entry.host == host])
            self._hosts[host] = table
        # The Host header as clients usually send it, already in normal form: one dict lookup, no decoding.
        # A normal form is its own normal form, so a hit here is what normalizing would have found.
        self._raw_hosts = {
            host.encode("ascii"): table for host, table in self._hosts.items() if host.isascii()
        }

    def _index(self, entries: list[_Entry[T]]) -> None:
        self._entries = entries
        self._size = len(entries)
        # Index the leading run of static, method-less entries: ordering semantics are preserved because
        # a path found there is matched by no earlier entry.
        self._static: dict[str, T] = {}
        for entry in entries:
            if not entry.pattern.is_static or entry.methods is not None:
                break
            self._static.setdefault(entry.pattern.pattern, entry.value)

    def __len__(self) -> int:
        return self._size

    @property
    def hosts(self) -> frozenset[str]:
        """The hosts entries name (normalized); empty when every entry matches every host."""
        return frozenset(self._hosts)

    def for_host(self, host: str | None) -> "RouteTable[T]":
        """The table a request to `host` sees (None: no `Host` header): its entries and the host-less ones."""
        if host is None or not self._hosts:
            return self
        return self._hosts.get(normalize_host(host), self)

    def for_request(self, scope: Scope) -> "RouteTable[T]":
        """The table this request sees, by its `Host` header, read only when some entry has a host."""
        if not self._hosts:
            return self
        raw = get_header(scope.get("headers") or (), b"host")
        if raw is None:
            return self
        table = self._raw_hosts.get(raw)
        if table is not None:
            return table
        return self._hosts.get(normalize_host(raw.decode("latin-1")), self)

    def lookup(self, path: str, method: str | None = None) -> T | None:
        """The first matching value, or None (`match` without the path parameters: per-request hot path)."""
        static = self._static.get(path)
        if static is not None:
            return static
        for entry in self._entries:
            if entry.methods is not None and method is not None and method.upper() not in entry.methods:
                continue
            if entry.pattern.matches(path):
                return entry.value
        return None

    def match(self, path: str, method: str | None = None) -> tuple[T, Mapping[str, str]] | None:
        """The first matching value with its path parameters, or None."""
        static = self._static.get(path)
        if static is not None:
            return static, {}
        for entry in self._entries:
            if entry.methods is not None and method is not None and method.upper() not in entry.methods:
                continue
            params = entry.pattern.match(path)
            if params is not None:
                return entry.value, params
        return None

    def allowed_methods(self, path: str) -> frozenset[str] | None:
        """The union of methods of entries matching `path` (None: any method), for 405 `Allow` headers."""
        methods: set[str] = set()
        matched = False
        for entry in self._entries:
            if entry.pattern.match(path) is None:
                continue
            matched = True
            if entry.methods is None:
                return None
            methods |= entry.methods
        return frozenset(methods) if matched else frozenset()


def take_query_param(query: bytes, name: str) -> tuple[list[bytes], bytes | None]:
    """The non-empty values of query parameter `name` (percent-decoded), and the raw query without it (None
    when it is absent): a credential taken from a URL must not travel on to the upstream or the logs."""
    wanted = name.encode("latin-1")
    found: list[bytes] = []
    kept: list[bytes] = []
    pairs = query.split(b"&")
    for pair in pairs:
        key, sep, content = pair.partition(b"=")
        if unquote_to_bytes(key.replace(b"+", b" ")) != wanted:
            kept.append(pair)
        elif sep and content:
            found.append(unquote_to_bytes(content.replace(b"+", b" ")))
    return found, b"&".join(kept) if len(kept) < len(pairs) else None
