"""PII and secret redaction for everything the suite writes to logs and audit sinks.

One `Redactor` is shared by the access log and the audit log. It masks, in any string:

- bearer and basic credentials (`Bearer abc.def`, `Basic dXNlcjpw`);
- `key=value` / `"key": "value"` pairs whose key names a secret (`api_key`, `token`, `password`, ...);
- e-mail addresses;
- card numbers: 13 to 19 digits, spaces or dashes allowed, replaced only when the Luhn check passes, so
  order numbers and timestamps stay readable;
- any extra pattern the operator configures.

Mappings are walked recursively; a value whose key names a secret or a credential header is masked whole.
"""

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from nexus_middleware.errors import ConfigurationError

__all__ = ["DEFAULT_SECRET_KEYS", "REDACTED", "Redactor", "luhn_valid"]

REDACTED = "[REDACTED]"

DEFAULT_SECRET_KEYS = frozenset(
    {
        "access_token",
        "api-key",
        "api_key",
        "apikey",
        "authorization",
        "client_secret",
        "cookie",
        "id_token",
        "password",
        "passwd",
        "proxy-authorization",
        "refresh_token",
        "secret",
        "set-cookie",
        "token",
        "x-api-key",
        "x-auth-token",
    }
)

_CREDENTIAL = re.compile(r"\b(Bearer|Basic|Token|ApiKey)\s+[A-Za-z0-9._~+/=\-]+", re.IGNORECASE)
_EMAIL = re.compile(r"[A-Za-z0-9._%+\-]+@[A-Za-z0-9\-]+(?:\.[A-Za-z0-9\-]+)*\.[A-Za-z]{2,}")
_CARD = re.compile(r"(?<![\d])\d(?:[ \-]?\d){12,18}(?![\d])")


def luhn_valid(digits: str) -> bool:
    """True when `digits` (digits only) passes the Luhn checksum used by payment card numbers."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = ord(char) - 48
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _mask_card(match: re.Match[str]) -> str:
    digits = re.sub(r"[ \-]", "", match.group(0))
    return REDACTED if luhn_valid(digits) else match.group(0)


def _mask_credential(match: re.Match[str]) -> str:
    return f"{match.group(1)} {REDACTED}"


def _mask_value(match: re.Match[str]) -> str:
    return match.group(1) + REDACTED


# Necessary conditions for a step's pattern to match: False means the `re.sub` would change nothing. They
# look at the text as it stands before the step, as the pattern does.


def _may_hold_credential(text: str) -> bool:
    if not text.isascii():
        return True  # IGNORECASE folds some non-ASCII letters onto the keywords (U+017F matches "s")
    if " " not in text and text.isprintable():
        return False  # no ASCII whitespace (the others are unprintable): nothing follows a keyword
    lowered = text.lower()
    return "bearer" in lowered or "basic" in lowered or "token" in lowered or "apikey" in lowered


def _may_hold_key_value(text: str) -> bool:
    return "=" in text or ":" in text or "%3" in text  # the separators `=`, `:`, `%3D` / `%3d`


def _may_hold_email(text: str) -> bool:
    return "@" in text


def _may_hold_card(text: str) -> bool:
    # At least 13 digits; then a search, cheaper than a substitution that finds nothing.
    return len(text) >= 13 and _CARD.search(text) is not None


def _always(text: str) -> bool:
    return True


class Redactor:
    """Masks secrets and personal data in strings and nested mappings.

    - `secret_keys`: key, parameter and header names (case-insensitive) whose values are always masked.
    - `patterns`: extra regular expressions; every match is replaced by `[REDACTED]`.
    - `emails`, `cards`, `credentials`: turn the built-in detectors off when a deployment needs the data.
    """

    __slots__ = ("_cards", "_emails", "_key_value", "_patterns", "_secret_keys", "_steps")

    def __init__(
        self,
        *,
        secret_keys: Iterable[str] = DEFAULT_SECRET_KEYS,
        patterns: Iterable[str | re.Pattern[str]] = (),
        emails: bool = True,
        cards: bool = True,
        credentials: bool = True,
    ) -> None:
        keys = frozenset(key.lower() for key in secret_keys)
        compiled: list[re.Pattern[str]] = []
        for pattern in patterns:
            try:
                compiled.append(re.compile(pattern) if isinstance(pattern, str) else pattern)
            except re.error as exc:
                raise ConfigurationError(f"redaction pattern {pattern!r} is invalid: {exc}") from exc
        self._secret_keys = keys
        self._patterns = tuple(compiled)
        self._emails = emails
        self._cards = cards
        self._key_value: re.Pattern[str] | None = None
        if keys:
            names = "|".join(sorted((re.escape(key) for key in keys), key=len, reverse=True))
            # `api_key=v`, `token: v`, `"password": "v"`, `x-api-key%3Dv` in a query string or a JSON text.
            self._key_value = re.compile(
                rf"(?i)(?<![A-Za-z0-9_\-])(\"?(?:{names})\"?\s*(?:=|:|%3D)\s*\"?)([^\s\"&,;}}]+)"
            )
        # Each built-in step runs only when its cheap necessary condition holds: most logged values (paths,
        # plain query strings, subjects) hold no secret, and a skipped `re.sub` is the whole saving.
        steps: list[tuple[re.Pattern[str], Any, Callable[[str], bool]]] = []
        if credentials:
            steps.append((_CREDENTIAL, _mask_credential, _may_hold_credential))
        if self._key_value is not None:
            steps.append((self._key_value, _mask_value, _may_hold_key_value))
        if emails:
            steps.append((_EMAIL, REDACTED, _may_hold_email))
        if cards:
            steps.append((_CARD, _mask_card, _may_hold_card))
        steps.extend((pattern, REDACTED, _always) for pattern in self._patterns)
        self._steps = tuple(steps)

    def __repr__(self) -> str:
        return (
            f"Redactor(secret_keys={sorted(self._secret_keys)!r}, "
            f"patterns={[p.pattern for p in self._patterns]!r}, emails={self._emails!r}, "
            f"cards={self._cards!r})"
        )

    def is_secret_key(self, key: str) -> bool:
        return key.lower() in self._secret_keys

    def redact(self, text: str) -> str:
        """`text` with every secret and personal datum replaced by `[REDACTED]`."""
        for pattern, replacement, may_match in self._steps:
            if may_match(text):
                text = pattern.sub(replacement, text)
        return text

    def redact_value(self, value: Any) -> Any:
        """A redacted copy of a JSON-like value: strings redacted, secret keys masked, containers walked."""
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {
                str(key): REDACTED
                if isinstance(key, str) and key.lower() in self._secret_keys and item is not None
                else self.redact_value(item)
                for key, item in value.items()
            }
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(item) for item in value]
        if isinstance(value, bytes):
            return self.redact(value.decode("latin-1"))
        if value is None or isinstance(value, bool | int | float):
            return value
        return self.redact(str(value))
