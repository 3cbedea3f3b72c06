import re
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.paths import (
    PathPattern,
    RouteTable,
    _is_clean,
    normalize_host,
    normalize_path,
    request_host,
    request_path,
)
from tests.support.asgi import make_scope


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("/", "/"),
        ("", "/"),
        ("/admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/%2561dmin", "/%2561dmin"),  # double encoding is not decoded twice
        ("//admin", "/admin"),
        ("///admin//users", "/admin/users"),
        ("/x/../admin", "/admin"),
        ("/x/%2e%2e/admin", "/admin"),
        ("/x/%2E%2E/admin", "/admin"),
        ("/./admin/.", "/admin/"),
        ("/../../admin", "/admin"),
        ("/a/b/..", "/a/"),
        ("/admin/", "/admin/"),
        ("/admin%2Fusers", "/admin/users"),
        ("/a%20b", "/a%20b"),
        ("/a%2fb%3f", "/a/b%3F"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/100%", "/100%25"),
        ("/%zz", "/%25zz"),
        ("/a\\b", "/a%5Cb"),
        ("/a%5cb", "/a%5Cb"),
        ("/a;b=c,d@e:f", "/a;b=c,d@e:f"),
        ("@host/x", "/@host/x"),
        ("/.well-known/x", "/.well-known/x"),
        ("/ADMIN", "/ADMIN"),
    ],
)
def test_normalize_path_default_policy(raw: str, expected: str) -> None:
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "options", "expected"),
    [
        ("/admin%2Fusers", {"encoded_slash": "keep"}, "/admin%2Fusers"),
        ("/a%2F..%2Fadmin", {"encoded_slash": "keep"}, "/a%2F..%2Fadmin"),
        ("/a%2F..%2Fadmin", {"encoded_slash": "decode"}, "/admin"),
        ("/a\\..\\admin", {"backslash": "slash"}, "/admin"),
        ("/a%5C..%5Cadmin", {"backslash": "slash"}, "/admin"),
    ],
)
def test_normalize_path_policies(raw: str, options: dict[str, str], expected: str) -> None:
    assert normalize_path(raw, **options) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("raw", "options"),
    [
        ("/a%00b", {}),
        (b"/a\x00b", {}),
        ("/a%2Fb", {"encoded_slash": "reject"}),
        ("/a\\b", {"backslash": "reject"}),
        ("/a%5cb", {"backslash": "reject"}),
    ],
)
def test_normalize_path_rejects(raw: str | bytes, options: dict[str, str]) -> None:
    with pytest.raises(InvalidPathError):
        normalize_path(raw, **options)  # type: ignore[arg-type]


def test_raw_non_ascii_bytes_are_percent_encoded() -> None:
    assert normalize_path("/café".encode()) == "/caf%C3%A9"


@given(st.text(alphabet="/.%2aAfF\\x", max_size=30))
def test_normalization_is_idempotent_and_rooted(raw: str) -> None:
    try:
        once = normalize_path(raw)
    except InvalidPathError:
        return
    assert once.startswith("/")
    assert "//" not in once
    assert "/../" not in once + "/" and "/./" not in once + "/"
    assert normalize_path(once) == once


def test_request_path_uses_raw_path_and_caches_in_context() -> None:
    scope = make_scope("/admin", raw_path=b"/x/../%61dmin")
    assert request_path(scope) == "/admin"
    scope["raw_path"] = b"/changed"
    assert request_path(scope) == "/admin"


def test_request_path_without_raw_path_and_with_query() -> None:
    scope = make_scope("/a//b")
    del scope["raw_path"]
    assert request_path(scope) == "/a/b"
    assert request_path(make_scope("/q", raw_path=b"/q?x=1")) == "/q"


PATTERN_CASES = [
    ("/users", "/users", {}),
    ("/users", "/users/", None),
    ("/users/{id}", "/users/42", {"id": "42"}),
    ("/users/{id}", "/users/42/x", None),
    ("/users/{id:int}", "/users/abc", None),
    ("/users/{id:int}", "/users/7", {"id": "7"}),
    ("/files/{rest:path}", "/files/a/b/c", {"rest": "a/b/c"}),
    (
        "/u/{id:uuid}",
        "/u/12345678-1234-1234-1234-1234567890ab",
        {"id": "12345678-1234-1234-1234-1234567890ab"},
    ),
    ("/admin/*", "/admin", {}),
    ("/admin/*", "/admin/x/y", {}),
    ("/admin/*", "/administrator", None),
    ("*", "/anything/at/all", {}),
    ("/users/{id}", "/users/{user_id}", {"id": "{user_id}"}),  # a route template matches too
    ("/a.b", "/aXb", None),  # regex characters are literal
]


@pytest.mark.parametrize(("pattern", "path", "expected"), PATTERN_CASES)
def test_path_pattern(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert PathPattern(pattern).match(path) == expected


def test_path_pattern_validation_and_identity() -> None:
    with pytest.raises(ConfigurationError):
        PathPattern("users")
    assert PathPattern("/a") == PathPattern("/a")
    assert hash(PathPattern("/a")) == hash(PathPattern("/a"))
    assert PathPattern("/a") != "/a"
    assert repr(PathPattern("/a")) == "PathPattern('/a')"


def test_route_table_first_match_methods_and_allow() -> None:
    table = RouteTable[str](
        [
            ("/health", None, "health"),
            ("/users/{id}", ["get"], "read"),
            ("/users/{id}", ["PUT", "DELETE"], "write"),
            ("/admin/*", None, "admin"),
            ("*", None, "default"),
        ]
    )
    assert len(table) == 5
    assert table.lookup("/health") == "health"
    assert table.lookup("/users/1", "GET") == "read"
    assert table.lookup("/users/1", "PUT") == "write"
    assert table.lookup("/users/1", "POST") == "default"
    assert table.match("/users/1", "GET") == ("read", {"id": "1"})
    assert table.lookup("/admin/x") == "admin"
    assert table.allowed_methods("/health") is None
    assert RouteTable[str]([("/u/{id}", ["GET"], "r"), ("/u/{id}", ["PUT"], "w")]).allowed_methods(
        "/u/1"
    ) == {
        "GET",
        "PUT",
    }
    assert RouteTable[str]([("/u", ["GET"], "r")]).allowed_methods("/x") == frozenset()
    assert RouteTable[str]([("/u", ["GET"], "r")]).lookup("/x") is None


@pytest.mark.parametrize(("pattern", "path", "expected"), PATTERN_CASES)
def test_matches_agrees_with_match(pattern: str, path: str, expected: dict[str, str] | None) -> None:
    assert PathPattern(pattern).matches(path) is (expected is not None)


@pytest.mark.parametrize("method", [None, "GET", "get", "PUT", "POST"])
@pytest.mark.parametrize("path", ["/health", "/users/1", "/users/1/x", "/admin", "/admin/x", "/other", "/u"])
def test_lookup_is_the_value_match_finds(path: str, method: str | None) -> None:
    table = RouteTable[str](
        [
            ("/health", None, "health"),
            ("/users/{id}", ["get"], "read"),
            ("/users/{id}", ["PUT"], "write"),
            ("/admin/*", None, "admin"),
            ("/u", ["POST"], "u"),
        ]
    )
    found = table.match(path, method)
    assert table.lookup(path, method) == (None if found is None else found[0])


def _hosted_table() -> RouteTable[str]:
    return RouteTable[str](
        [
            ("/health", None, "health"),
            ("/docs", None, "internal-docs", "internal.example.com"),  # in the static run: a dict lookup
            ("/docs", None, "docs"),
            ("/admin/*", None, "public-admin", "public.example.com"),
            ("/admin/*", None, "internal-admin", "Internal.Example.COM"),
            ("/admin/*", None, "any-admin"),
            ("/ui", None, "v6-ui", "[::1]"),
            ("/ui", None, "ui"),
            ("/users/{id}", ["PUT"], "internal-write", "internal.example.com"),
            ("/users/{id}", None, "users"),
            ("/late", None, "late"),  # a host-less entry before a host's one wins for that host too
            ("/late", None, "internal-late", "internal.example.com"),
            ("/hooks", ["POST"], "internal-hooks", "internal.example.com"),
        ]
    )


@pytest.mark.parametrize(
    ("host", "method", "path", "expected"),
    [
        ("public.example.com", "GET", "/admin/x", "public-admin"),
        ("internal.example.com", "GET", "/admin/x", "internal-admin"),
        ("INTERNAL.example.com", "GET", "/admin", "internal-admin"),  # case-insensitive, entry's case too
        ("internal.example.com:8443", "GET", "/admin/x", "internal-admin"),  # port ignored
        ("other.example.com", "GET", "/admin/x", "any-admin"),  # no entry for the host: host-less ones
        (None, "GET", "/admin/x", "any-admin"),  # no Host header: host-less entries only
        ("", "GET", "/admin/x", "any-admin"),
        ("[::1]", "GET", "/ui", "v6-ui"),
        ("[::1]:8080", "GET", "/ui", "v6-ui"),  # IPv6 literal kept in its brackets, port dropped
        ("[::2]:8080", "GET", "/ui", "ui"),
        ("::1", "GET", "/ui", "ui"),  # not a bracketed literal: never the [::1] entry
        ("internal.example.com", "PUT", "/users/7", "internal-write"),
        ("internal.example.com", "GET", "/users/7", "users"),  # method filter, then the host-less entry
        ("public.example.com", "PUT", "/users/7", "users"),
        ("internal.example.com", "GET", "/docs", "internal-docs"),  # static fast path, per host
        ("public.example.com", "GET", "/docs", "docs"),
        (None, "GET", "/docs", "docs"),
        ("internal.example.com", "GET", "/health", "health"),
        ("internal.example.com", "GET", "/late", "late"),  # first match wins across host and host-less
        ("internal.example.com", "POST", "/hooks", "internal-hooks"),
        ("public.example.com", "POST", "/hooks", None),
        ("internal.example.com", "GET", "/nowhere", None),
    ],
)
def test_route_table_hosts(host: str | None, method: str, path: str, expected: str | None) -> None:
    table = _hosted_table()
    headers = [] if host is None else [("host", host)]
    chosen = table.for_request(make_scope(path, method=method, headers=headers))
    assert chosen.lookup(path, method) == expected
    found = chosen.match(path, method)
    assert (None if found is None else found[0]) == expected
    assert table.for_host(host).lookup(path, method) == expected


def test_route_table_host_allowed_methods_and_size() -> None:
    table = _hosted_table()
    assert len(table) == 13
    assert table.hosts == {"internal.example.com", "public.example.com", "[::1]"}
    assert table.for_host("internal.example.com").allowed_methods("/hooks") == {"POST"}
    assert table.for_host("public.example.com").allowed_methods("/hooks") == frozenset()  # a 404, not a 405
    assert table.allowed_methods("/hooks") == frozenset()
    assert table.for_host("internal.example.com").match("/users/7", "PUT") == ("internal-write", {"id": "7"})


class _Untouchable(list[tuple[bytes, bytes]]):
    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        raise AssertionError("the headers were read")


def test_route_table_without_hosts_never_reads_the_host() -> None:
    table = RouteTable[str]([("/admin/*", None, "admin")])
    scope = make_scope("/admin")
    scope["headers"] = _Untouchable()
    assert table.hosts == frozenset()
    assert table.for_request(scope) is table
    assert table.for_host("example.com") is table


def test_route_table_non_ascii_host_is_matched_on_the_decoded_header() -> None:
    table = RouteTable[str]([("/x", None, "umlaut", "Bücher.example"), ("/x", None, "any")])

    def seen(raw: bytes) -> str | None:
        return table.for_request({"type": "http", "headers": [(b"host", raw)]}).lookup("/x")

    assert seen("bücher.example".encode("latin-1")) == "umlaut"
    assert seen(b"b?cher.example") == "any"
    assert seen("bücher.example".encode()) == "any"  # UTF-8 on the wire is another name


@pytest.mark.parametrize("host", ["example.com:80", "", "::1", "[::1]:443", " example.com"])
def test_route_table_rejects_a_host_it_could_never_match(host: str) -> None:
    with pytest.raises(ConfigurationError, match="without a port"):
        RouteTable[str]([("/x", None, "x", host)])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("Example.COM", "example.com"),
        ("example.com:8080", "example.com"),
        ("[2001:DB8::1]:443", "[2001:db8::1]"),
        ("[::1]", "[::1]"),
        ("[::1", "[::1"),
        ("", ""),
    ],
)
def test_normalize_host(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected
    assert request_host(make_scope(headers=[("host", raw)])) == expected


def test_request_host_without_header() -> None:
    assert request_host(make_scope()) is None


@given(st.text(alphabet="/.a%2F5\\:@-_~", max_size=12))
def test_clean_paths_are_their_own_normal_form(text: str) -> None:
    raw = text.encode()
    # The fast path (one regex) decides "already canonical" exactly as the literal-only, no `//`, no `/.`
    # rule does, and a path it accepts is indeed unchanged by the full normalization.
    literal_only = re.fullmatch(rb"/[A-Za-z0-9\-._~!$&'()*+,;=:@/]*", raw) is not None
    assert _is_clean(raw) is (literal_only and b"//" not in raw and b"/." not in raw)
    if _is_clean(raw):
        assert normalize_path(raw) == text
