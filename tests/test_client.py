import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_middleware.client import AddressSet, ClientAddressResolver, normalize_ip
from nexus_middleware.errors import ConfigurationError
from tests.support.asgi import make_scope

TRUSTED = ["10.0.0.0/8", "::1"]


@pytest.mark.parametrize(
    ("peer", "xff", "trusted", "expected"),
    [
        # Untrusted peer: forwarding headers are ignored, whatever they say.
        ("203.0.113.7", ["1.1.1.1"], TRUSTED, "203.0.113.7"),
        ("203.0.113.7", ["1.1.1.1"], [], "203.0.113.7"),
        # Trusted peer: the right-most untrusted hop wins; spoofed left entries are ignored.
        ("10.0.0.1", ["198.51.100.1"], TRUSTED, "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.1"], TRUSTED, "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.1, 10.0.0.9"], TRUSTED, "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6", "198.51.100.1, 10.0.0.9"], TRUSTED, "198.51.100.1"),  # several header lines
        # Junk is skipped without errors.
        ("10.0.0.1", ["198.51.100.1, unknown, garbage"], TRUSTED, "198.51.100.1"),
        ("10.0.0.1", ["junk"], TRUSTED, "10.0.0.1"),
        ("10.0.0.1", [], TRUSTED, "10.0.0.1"),
        # Ports, brackets and IPv4-mapped IPv6 are normalized.
        ("10.0.0.1", ["198.51.100.1:4711"], TRUSTED, "198.51.100.1"),
        ("10.0.0.1", ["[2001:db8::1]:443"], TRUSTED, "2001:db8::1"),
        ("::1", ["::ffff:198.51.100.1"], TRUSTED, "198.51.100.1"),
        ("::ffff:203.0.113.7", [], TRUSTED, "203.0.113.7"),
        # Every hop trusted: the left-most one is the client.
        ("10.0.0.1", ["10.1.1.1, 10.2.2.2"], TRUSTED, "10.1.1.1"),
        # "*" trusts every peer (only behind a proxy that always overwrites the header).
        ("203.0.113.7", ["198.51.100.1"], ["*"], "198.51.100.1"),
    ],
)
def test_x_forwarded_for(peer: str, xff: list[str], trusted: list[str], expected: str) -> None:
    resolver = ClientAddressResolver(trusted_proxies=trusted)
    scope = make_scope(headers=[("x-forwarded-for", v) for v in xff], client=(peer, 1234))
    assert resolver.resolve(scope) == expected


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ('for=198.51.100.1;proto=https, for="[2001:db8::2]:8080"', "2001:db8::2"),
        ("for=198.51.100.1, for=10.0.0.5", "198.51.100.1"),
        ("for=_hidden, for=198.51.100.3", "198.51.100.3"),
        ("for=unknown", "10.0.0.1"),
        ("proto=https", "10.0.0.1"),
    ],
)
def test_forwarded_header(header: str, expected: str) -> None:
    resolver = ClientAddressResolver(trusted_proxies=TRUSTED, header="forwarded")
    scope = make_scope(headers=[("forwarded", header)], client=("10.0.0.1", 1))
    assert resolver.resolve(scope) == expected


def test_forwarded_is_ignored_when_xff_is_configured() -> None:
    # Believing a header the proxy never writes would let a client pick its own address.
    resolver = ClientAddressResolver(trusted_proxies=TRUSTED)
    scope = make_scope(headers=[("forwarded", "for=6.6.6.6")], client=("10.0.0.1", 1))
    assert resolver.resolve(scope) == "10.0.0.1"


@pytest.mark.parametrize(
    ("hops", "xff", "expected"),
    [
        (0, "1.1.1.1, 2.2.2.2", "203.0.113.7"),
        (1, "1.1.1.1, 2.2.2.2", "2.2.2.2"),
        (2, "1.1.1.1, 2.2.2.2", "1.1.1.1"),
        (5, "1.1.1.1, 2.2.2.2", "1.1.1.1"),
        (1, "junk", "203.0.113.7"),
        (1, None, "203.0.113.7"),
    ],
)
def test_trusted_hops(hops: int, xff: str | None, expected: str) -> None:
    resolver = ClientAddressResolver(trusted_hops=hops)
    headers = [("x-forwarded-for", xff)] if xff else []
    assert resolver.resolve(make_scope(headers=headers)) == expected


def test_no_peer_resolves_to_none() -> None:
    assert ClientAddressResolver().resolve(make_scope(client=None)) is None
    assert ClientAddressResolver().resolve(make_scope(client=("not-an-ip", 0))) is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"trusted_proxies": ["nonsense"]},
        {"trusted_proxies": ["10.0.0.0/8"], "trusted_hops": 1},
        {"trusted_hops": -1},
        {"header": "x-real-ip"},
    ],
)
def test_invalid_configuration(kwargs: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError):
        ClientAddressResolver(**kwargs)  # type: ignore[arg-type]


def test_repr_and_normalize_ip() -> None:
    assert "10.0.0.0/8" in repr(ClientAddressResolver(trusted_proxies=["10.0.0.0/8", "*"]))
    assert normalize_ip("[::ffff:1.2.3.4]:80") == "1.2.3.4"
    assert normalize_ip("fe80::1%eth0") == "fe80::1"
    assert normalize_ip("") is None
    assert normalize_ip("[broken") is None


@pytest.mark.parametrize(
    "peer",
    [
        "203.0.113.7",
        "0.0.0.0",
        "255.255.255.255",
        "256.1.1.1",
        "01.2.3.4",
        "1.2.3.04",
        "1.2.3",
        "1.2.3.4.5",
        "1.2.3.4:8080",
        " 1.2.3.4",
        '"1.2.3.4"',
        "\u0661.2.3.4",  # a non-ASCII digit
        "::ffff:1.2.3.4",
        "2001:DB8::1",
        "not-an-ip",
    ],
)
@pytest.mark.parametrize("kwargs", [{}, {"trusted_hops": 0}, {"trusted_proxies": ["10.0.0.0/8"]}])
def test_peer_address_is_canonical_on_every_path(peer: str, kwargs: dict[str, object]) -> None:
    # Without trusted proxies a canonical dotted quad is returned as is; everything else is parsed.
    resolver = ClientAddressResolver(**kwargs)  # type: ignore[arg-type]
    assert resolver.resolve(make_scope(client=(peer, 1))) == normalize_ip(peer)


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=4, max_size=4), st.booleans())
def test_any_dotted_quad_resolves_like_the_parser(octets: list[int], padded: bool) -> None:
    peer = ".".join(f"{octet:03d}" if padded else str(octet) for octet in octets)
    assert ClientAddressResolver().resolve(make_scope(client=(peer, 1))) == normalize_ip(peer)


@pytest.mark.parametrize(
    ("entries", "address", "inside"),
    [
        (["10.0.0.0/8"], "10.1.2.3", True),
        (["10.0.0.0/8"], "11.0.0.1", False),
        (["::1"], "::1", True),
        (["10.0.0.0/8"], "::ffff:10.0.0.1", False),  # no cross-version match: callers unwrap mapped IPv6
        (["*"], "2001:db8::1", True),
        ([], "127.0.0.1", False),
    ],
)
def test_address_set_membership(entries: list[str], address: str, inside: bool) -> None:
    assert (ipaddress.ip_address(address) in AddressSet(entries, option="allow")) is inside
    assert bool(AddressSet(entries, option="allow")) is bool(entries)


def test_address_set_names_the_option_and_can_refuse_the_wildcard() -> None:
    with pytest.raises(ConfigurationError, match="exempt_networks: '\\*' is not an address or CIDR"):
        AddressSet(["*"], option="exempt_networks", wildcard=False)
    with pytest.raises(ConfigurationError, match="allow: 'nope'"):
        AddressSet(["nope"], option="allow")


@pytest.mark.parametrize(
    ("kwargs", "peer", "expected"),
    [
        ({}, "10.0.0.1", False),
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", True),
        ({"trusted_proxies": TRUSTED}, "203.0.113.7", False),
        ({"trusted_proxies": ["*"]}, "203.0.113.7", True),
        ({"trusted_hops": 0}, "10.0.0.1", False),
        ({"trusted_hops": 1}, "203.0.113.7", True),
        ({"trusted_proxies": TRUSTED}, None, False),
    ],
)
def test_trusts_peer(kwargs: dict[str, Any], peer: str | None, expected: bool) -> None:
    scope = make_scope(client=(peer, 1234) if peer else None)
    assert ClientAddressResolver(**kwargs).trusts_peer(scope) is expected


@pytest.mark.parametrize(
    ("kwargs", "peer", "headers", "own", "expected"),
    [
        # Nothing trusted: the scope's scheme, whatever the client claims.
        ({}, "10.0.0.1", [("x-forwarded-proto", "https")], "http", "http"),
        ({}, "10.0.0.1", [], "https", "https"),
        # A trusted proxy's word wins, in both directions.
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", [("x-forwarded-proto", "https")], "http", "https"),
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", [("x-forwarded-proto", "HTTP")], "https", "http"),
        ({"trusted_proxies": TRUSTED}, "203.0.113.7", [("x-forwarded-proto", "https")], "http", "http"),
        # The first proxy's value is the client's; junk and absence leave the scope's.
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", [("x-forwarded-proto", "https, http")], "http", "https"),
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", [("x-forwarded-proto", "gopher")], "http", "http"),
        ({"trusted_proxies": TRUSTED}, "10.0.0.1", [], "http", "http"),
        ({"trusted_hops": 1}, "203.0.113.7", [("x-forwarded-proto", "https")], "http", "https"),
        # With header="forwarded", RFC 7239's proto of the first element, and X-Forwarded-Proto is ignored.
        (
            {"trusted_proxies": TRUSTED, "header": "forwarded"},
            "10.0.0.1",
            [("forwarded", 'for=198.51.100.1;proto="https", for=10.0.0.2;proto=http')],
            "http",
            "https",
        ),
        (
            {"trusted_proxies": TRUSTED, "header": "forwarded"},
            "10.0.0.1",
            [("x-forwarded-proto", "https"), ("forwarded", "for=198.51.100.1")],
            "http",
            "http",
        ),
    ],
)
def test_scheme_believes_trusted_proxies_only(
    kwargs: dict[str, Any], peer: str, headers: list[tuple[str, str]], own: str, expected: str
) -> None:
    scope = make_scope(headers=headers, client=(peer, 1234))
    scope["scheme"] = own
    assert ClientAddressResolver(**kwargs).scheme(scope) == expected
