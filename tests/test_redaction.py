"""The shared Redactor: secrets and personal data masked, everything else left readable."""

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_middleware import ConfigurationError, Redactor
from nexus_middleware.redaction import REDACTED, luhn_valid


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Bearer eyJhbGciOi.eyJzdWIi.sig", f"Bearer {REDACTED}"),
        ("basic dXNlcjpwYXNz", f"basic {REDACTED}"),
        ("api_key=sk_live_abc123&page=2", f"api_key={REDACTED}&page=2"),
        ("x-api-key: k-123456", f"x-api-key: {REDACTED}"),
        ('{"password": "hunter2", "name": "x"}', f'{{"password": "{REDACTED}", "name": "x"}}'),
        ("token%3Dabc", f"token%3D{REDACTED}"),
        ("mail bob.smith+tag@mail.example.co.uk now", f"mail {REDACTED} now"),
        ("card 4111 1111 1111 1111 ok", f"card {REDACTED} ok"),
        ("card 4111-1111-1111-1111", f"card {REDACTED}"),
        ("pan=5555555555554444", f"pan={REDACTED}"),
        ("amex 378282246310005", f"amex {REDACTED}"),
        # Not Luhn-valid: order numbers, timestamps and ids stay readable.
        ("order 4111111111111112", "order 4111111111111112"),
        ("ts 1700000000123", "ts 1700000000123"),
        ("short 411111111111", "short 411111111111"),
        ("tokenizer=fine", "tokenizer=fine"),
        ("/users/42/orders", "/users/42/orders"),
    ],
)
def test_default_redaction(text: str, expected: str) -> None:
    assert Redactor().redact(text) == expected


def test_nested_values_and_secret_keys() -> None:
    redactor = Redactor()
    value = {
        "Authorization": "Bearer abc",
        "cookie": None,
        "user": {"email": "a@example.com", "ids": [1, 2.5, True, None, b"x-api-key=zzz"]},
        "set": frozenset({"4111111111111111"}),
        "other": object,
    }
    redacted = redactor.redact_value(value)
    assert redacted["Authorization"] == REDACTED
    assert redacted["cookie"] is None
    assert redacted["user"] == {"email": REDACTED, "ids": [1, 2.5, True, None, f"x-api-key={REDACTED}"]}
    assert redacted["set"] == [REDACTED]
    assert redacted["other"] == str(object)
    assert redactor.is_secret_key("X-API-KEY")


def test_configurable_patterns_and_switches() -> None:
    redactor = Redactor(
        patterns=[r"\bACME-\d{6}\b", re.compile(r"ssn:\s*\d{3}-\d{2}-\d{4}")],
        emails=False,
        cards=False,
        credentials=False,
        secret_keys=["session"],
    )
    text = "ACME-123456 ssn: 123-45-6789 a@b.io 4111111111111111 Bearer x session=abc api_key=k"
    assert redactor.redact(text) == (
        f"{REDACTED} {REDACTED} a@b.io 4111111111111111 Bearer x session={REDACTED} api_key=k"
    )
    assert "ACME" in repr(redactor)
    assert Redactor(secret_keys=()).redact("token=abc") == "token=abc"


def test_invalid_pattern_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="invalid"):
        Redactor(patterns=["(unclosed"])


@pytest.mark.parametrize(
    ("digits", "valid"),
    [("4111111111111111", True), ("79927398713", True), ("79927398710", False), ("0", True)],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


def _every_step(redactor: Redactor, text: str) -> str:
    # The redactor without its pre-checks: every pattern applied, in order.
    for pattern, replacement, _ in redactor._steps:
        text = pattern.sub(replacement, text)
    return text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "/api/items/42",
        "page=2&sort=name",
        "TOKEN abc.def",
        "ApiKey k-1",
        "Ba\u017fic dXNlcjpw",  # non-ASCII letters that IGNORECASE folds onto a keyword
        "KEY bearer\tabc",
        "Bearer\x1cabc",  # an unprintable ASCII separator that \s matches
        "Bearer\nabc",
        "api_key%3dzzz",
        'x: {"Password":"p"}',
        "a@b.io",
        "4111111111111111",
        "\u0664" + "\u0661" * 15,  # Arabic-Indic digits are digits to the card pattern too
        "x" * 12 + "@",
    ],
)
def test_pre_checks_never_skip_a_match(text: str) -> None:
    for redactor in (Redactor(), Redactor(patterns=[r"items/\d+"], secret_keys=["page"])):
        assert redactor.redact(text) == _every_step(redactor, text)


@given(
    st.text(
        alphabet=st.sampled_from(
            "aAbBeEkKrRsStTcCiInNyYpPoO \t\n\x1c=:%3dD@.-_/&0123456789\u017f\u212a\u0661"
        ),
        max_size=60,
    )
)
def test_pre_checks_agree_with_every_step(text: str) -> None:
    redactor = Redactor()
    assert redactor.redact(text) == _every_step(redactor, text)
