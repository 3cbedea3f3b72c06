"""Small helpers over ASGI raw header lists: `[(b"lower-case-name", b"value"), ...]`."""

import re
from collections.abc import Iterable, Sequence

from nexus_middleware.types import Message, Scope

__all__ = [
    "RawHeaders",
    "append_header",
    "contains_ctl",
    "get_header",
    "get_headers",
    "header_list",
    "is_header_name",
    "remove_headers",
    "set_header",
]

RawHeaders = list[tuple[bytes, bytes]]

_TOKEN = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.6.2 token


def get_header(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> bytes | None:
    """The first value of header `name` (lower-case bytes), or None."""
    for key, value in headers:
        if key == name:
            return value
    return None


def get_headers(headers: Iterable[tuple[bytes, bytes]], name: bytes) -> list[bytes]:
    """Every value of header `name` in order of arrival."""
    return [value for key, value in headers if key == name]


def header_list(scope_or_message: Scope | Message) -> RawHeaders:
    """The raw headers of a scope or a `http.response.start` message as a fresh mutable list."""
    return list(scope_or_message.get("headers") or ())


def set_header(headers: RawHeaders, name: bytes, value: bytes) -> None:
    """Replace every `name` header in place by one with `value`."""
    headers[:] = [(k, v) for k, v in headers if k != name]
    headers.append((name, value))


def append_header(headers: RawHeaders, name: bytes, value: bytes) -> None:
    headers.append((name, value))


def remove_headers(headers: RawHeaders, names: Sequence[bytes] | frozenset[bytes]) -> None:
    """Remove every header whose name is in `names`, in place."""
    headers[:] = [(k, v) for k, v in headers if k not in names]


def contains_ctl(value: str | bytes) -> bool:
    """True when a would-be header value holds CR, LF, NUL or another control byte (header injection)."""
    data = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return any((byte < 0x20 and byte != 0x09) or byte == 0x7F for byte in data)


def is_header_name(name: object) -> bool:
    """True when `name` is a string that is a valid HTTP field name (an RFC 9110 token)."""
    return isinstance(name, str) and _TOKEN.fullmatch(name) is not None
