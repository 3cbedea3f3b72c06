"""RFC 9651 serializer and parser: round trips, the RFC's own examples, and refusals."""

import base64
from decimal import Decimal

import pytest

from nexus_middleware.structured_fields import (
    SFItem,
    StructuredFieldError,
    Token,
    parse_list,
    serialize_item,
    serialize_list,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"default";q=100;w=10', [SFItem("default", {"q": 100, "w": 10})]),
        (
            '"permin";q=50;w=60,"perhr";q=1000;w=3600',
            [SFItem("permin", {"q": 50, "w": 60}), SFItem("perhr", {"q": 1000, "w": 3600})],
        ),
        ('"peruser";q=100;w=60;pk=:cHsdsRa894==:', None),
        ("sugar, tea, rum", [SFItem(Token("sugar")), SFItem(Token("tea")), SFItem(Token("rum"))]),
        ("abc;a=1;b=2;cde_456", [SFItem(Token("abc"), {"a": 1, "b": 2, "cde_456": True})]),
        ("1.5, -7, ?0", [SFItem(Decimal("1.5")), SFItem(-7), SFItem(False)]),
        ('"a \\"q\\" \\\\"', [SFItem('a "q" \\')]),
        ("", []),
    ],
)
def test_parse_examples(text: str, expected: list[SFItem] | None) -> None:
    items = parse_list(text)
    if expected is None:
        assert items[0].value == "peruser"
        assert items[0].params == {"q": 100, "w": 60, "pk": base64.b64decode("cHsdsRa894==")}
        return
    assert [(i.value, dict(i.params)) for i in items] == [(e.value, dict(e.params)) for e in expected]
    assert [type(i.value) for i in items] == [type(e.value) for e in expected]


def test_several_field_lines_are_one_list() -> None:
    items = parse_list([b'"a";r=1', b'"b";r=2'])
    assert [i.value for i in items] == ["a", "b"]


@pytest.mark.parametrize(
    "item",
    [
        SFItem("default", {"q": 100, "w": 10, "pk": b"\x00\xffpartition"}),
        SFItem(Token("tok/en:1"), {"flag": True, "d": Decimal("0.25"), "s": "x y"}),
        SFItem(0, {"neg": -999_999_999_999_999}),
    ],
)
def test_round_trip(item: SFItem) -> None:
    text = serialize_list([item, item])
    assert parse_list(text) == [item, item]


@pytest.mark.parametrize(
    "bad",
    [
        '"unterminated',
        "a,",
        "a;B=1",
        '"\\x"',
        ":not base64!:",
        "(inner list)",
        "1234567890123456",
        "a b",
        "@",
    ],
)
def test_malformed_fields_are_refused(bad: str) -> None:
    with pytest.raises(StructuredFieldError):
        parse_list(bad)


@pytest.mark.parametrize(
    "item",
    [
        SFItem("caf\u00e9"),
        SFItem(10**16),
        SFItem(Token("1bad")),
        SFItem("x", {"Bad": 1}),
        SFItem(Decimal("1e13")),
    ],
)
def test_unserializable_values_are_refused(item: SFItem) -> None:
    with pytest.raises(StructuredFieldError):
        serialize_item(item)
