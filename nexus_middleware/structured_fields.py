"""A small RFC 9651 (Structured Field Values) serializer and parser for Lists of Items with Parameters.

Enough for the fields the suite emits (`RateLimit-Policy`, `RateLimit`, `Cache-Status`): bare items are
Integers, Decimals, Strings, Tokens, Byte Sequences and Booleans. Inner Lists and Dictionaries are not
needed by any nexus field and are rejected by the parser rather than half-supported.
"""

import base64
import binascii
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from types import MappingProxyType

__all__ = [
    "BareItem",
    "SFItem",
    "StructuredFieldError",
    "Token",
    "parse_list",
    "serialize_item",
    "serialize_list",
]


class StructuredFieldError(ValueError):
    """A value cannot be serialized or a field value cannot be parsed as RFC 9651 says."""


class Token(str):
    """A Token bare item (unquoted), as opposed to a String."""

    __slots__ = ()


BareItem = int | Decimal | str | bytes | bool

_KEY = re.compile(r"[a-z*][a-z0-9_\-.*]*\Z")
_TOKEN = re.compile(r"[A-Za-z*][!#$%&'*+\-.^_`|~0-9A-Za-z:/]*\Z")
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz:/")
_MAX_INTEGER = 999_999_999_999_999


@dataclass(frozen=True, slots=True)
class SFItem:
    """An Item: a bare value with ordered Parameters."""

    value: BareItem
    params: Mapping[str, BareItem] = field(default_factory=lambda: MappingProxyType({}))


def _serialize_bare(value: BareItem) -> str:
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        if abs(value) > _MAX_INTEGER:
            raise StructuredFieldError(f"integer {value} is out of range")
        return str(value)
    if isinstance(value, Decimal):
        rounded = round(value, 3)
        if abs(rounded) >= 10**12:
            raise StructuredFieldError(f"decimal {value} is out of range")
        text = f"{rounded:.3f}".rstrip("0")
        return text + "0" if text.endswith(".") else text
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    if isinstance(value, Token):
        if not _TOKEN.match(value):
            raise StructuredFieldError(f"{value!r} is not a valid token")
        return str(value)
    if any(not 0x20 <= ord(char) <= 0x7E for char in value):
        raise StructuredFieldError(f"string {value!r} holds characters outside printable ASCII")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def serialize_item(item: SFItem) -> str:
    out = [_serialize_bare(item.value)]
    for key, value in item.params.items():
        if not _KEY.match(key):
            raise StructuredFieldError(f"{key!r} is not a valid parameter key")
        out.append(f";{key}" if value is True else f";{key}={_serialize_bare(value)}")
    return "".join(out)


def serialize_list(items: Iterable[SFItem]) -> str:
    return ", ".join(serialize_item(item) for item in items)


class _Parser:
    __slots__ = ("pos", "text")

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip(self, chars: str) -> None:
        while self.peek() and self.peek() in chars:
            self.pos += 1

    def fail(self, what: str) -> StructuredFieldError:
        return StructuredFieldError(f"{what} at offset {self.pos} of {self.text!r}")

    def parse_list(self) -> list[SFItem]:
        items: list[SFItem] = []
        self.skip(" ")
        while self.pos < len(self.text):
            if self.peek() == "(":
                raise self.fail("inner lists are not supported")
            items.append(self.parse_item())
            self.skip(" \t")
            if self.pos >= len(self.text):
                return items
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.pos += 1
            self.skip(" \t")
            if self.pos >= len(self.text):
                raise self.fail("trailing comma")
        return items

    def parse_item(self) -> SFItem:
        value = self.parse_bare()
        params: dict[str, BareItem] = {}
        while self.peek() == ";":
            self.pos += 1
            self.skip(" ")
            key = self.parse_key()
            if self.peek() == "=":
                self.pos += 1
                params[key] = self.parse_bare()
            else:
                params[key] = True
        return SFItem(value, MappingProxyType(params))

    def parse_key(self) -> str:
        start = self.pos
        if not (self.peek().islower() or self.peek() == "*"):
            raise self.fail("expected a key")
        while self.peek() and (self.peek().islower() or self.peek() in "0123456789_-.*"):
            self.pos += 1
        return self.text[start : self.pos]

    def parse_bare(self) -> BareItem:
        char = self.peek()
        if char == "-" or char.isdigit():
            return self.parse_number()
        if char == '"':
            return self.parse_string()
        if char == ":":
            return self.parse_bytes()
        if char == "?":
            flag = self.text[self.pos + 1 : self.pos + 2]
            if flag not in ("0", "1"):
                raise self.fail("expected a boolean")
            self.pos += 2
            return flag == "1"
        if char.isalpha() or char == "*":
            start = self.pos
            while self.peek() and self.peek() in _TOKEN_CHARS:
                self.pos += 1
            return Token(self.text[start : self.pos])
        raise self.fail("expected a bare item")

    def parse_number(self) -> int | Decimal:
        match = re.compile(r"-?[0-9]{1,15}(\.[0-9]{1,3})?").match(self.text, self.pos)
        if match is None:
            raise self.fail("expected a number")
        self.pos = match.end()
        if self.peek().isdigit() or self.peek() == ".":
            raise self.fail("number too long")
        text = match.group(0)
        if match.group(1):
            if len(text.lstrip("-").partition(".")[0]) > 12:
                raise self.fail("decimal too long")
            return Decimal(text)
        return int(text)

    def parse_string(self) -> str:
        self.pos += 1
        out: list[str] = []
        while self.pos < len(self.text):
            char = self.text[self.pos]
            self.pos += 1
            if char == "\\":
                escaped = self.peek()
                if escaped not in ('"', "\\") or not escaped:
                    raise self.fail("invalid escape")
                out.append(escaped)
                self.pos += 1
            elif char == '"':
                return "".join(out)
            elif not 0x20 <= ord(char) <= 0x7E:
                raise self.fail("invalid string character")
            else:
                out.append(char)
        raise self.fail("unterminated string")

    def parse_bytes(self) -> bytes:
        end = self.text.find(":", self.pos + 1)
        if end < 0:
            raise self.fail("unterminated byte sequence")
        encoded = self.text[self.pos + 1 : end]
        self.pos = end + 1
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise self.fail("invalid base64") from exc


def parse_list(values: str | bytes | Sequence[str | bytes]) -> list[SFItem]:
    """Parse a List field; several field lines are combined with commas as RFC 9651 §4.2 says."""
    if isinstance(values, str | bytes):
        values = [values]
    lines = [v.decode("latin-1") if isinstance(v, bytes) else v for v in values]
    return _Parser(",".join(lines).strip(" ")).parse_list()
