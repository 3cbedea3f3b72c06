from typing import Any

import httpx
import pytest

from nexus_middleware import ClientAddressResolver, ConfigurationError, SecurityHeadersMiddleware
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import headers_app, make_scope, ok_app, run_asgi, streaming_app

API_HEADERS = {
    "strict-transport-security": "max-age=31536000; includeSubDomains",
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "cross-origin-resource-policy": "same-origin",
}


def https_scope(**kwargs: Any) -> Scope:
    scope = make_scope(**kwargs)
    scope["scheme"] = "https"
    return scope


def _security(recorded: Any) -> dict[str, str]:
    return {
        k.decode(): v.decode()
        for k, v in recorded.headers
        if k.decode() in API_HEADERS or k.decode() == "x-extra"
    }


async def test_api_preset_is_the_default() -> None:
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app), https_scope())
    assert _security(recorded) == API_HEADERS
    assert not {k.decode() for k, _ in recorded.headers} & set(DOCUMENT_ONLY)  # nothing for documents
    assert recorded.header("content-type") == "text/plain"
    assert recorded.body == b"ok"


DOCUMENT_ONLY = {
    "permissions-policy": (
        "accelerometer=(), camera=(), geolocation=(), gyroscope=(), magnetometer=(), microphone=(), "
        "payment=(), usb=()"
    ),
    "cross-origin-opener-policy": "same-origin",
}


async def test_html_preset() -> None:
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app, preset="html"), https_scope())
    headers = {k.decode(): v.decode() for k, v in recorded.headers}
    assert {k: headers.get(k) for k in DOCUMENT_ONLY} == DOCUMENT_ONLY
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert headers["referrer-policy"] == "strict-origin-when-cross-origin"
    assert headers["content-security-policy"].startswith("default-src 'self'")
    assert "frame-ancestors 'self'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["strict-transport-security"] == "max-age=31536000; includeSubDomains"


@pytest.mark.parametrize(
    ("options", "changed"),
    [
        (
            {"headers": {"Content-Security-Policy": "default-src 'self'"}},
            {"content-security-policy": "default-src 'self'"},
        ),
        ({"headers": {"X-Frame-Options": None}}, {"x-frame-options": None}),
        ({"headers": {"x-frame-options": False}}, {"x-frame-options": None}),
        ({"headers": {"Strict-Transport-Security": None}}, {"strict-transport-security": None}),
        (
            {"headers": {"Strict-Transport-Security": "max-age=60"}},
            {"strict-transport-security": "max-age=60"},
        ),
        ({"headers": {"X-Extra": "1"}}, {"x-extra": "1"}),
        ({"headers": {"Not-Set-Anyway": None}}, {}),
        ({"hsts_max_age": 0}, {"strict-transport-security": "max-age=0; includeSubDomains"}),
        ({"hsts_include_subdomains": False}, {"strict-transport-security": "max-age=31536000"}),
        (
            {"hsts_max_age": 63072000, "hsts_preload": True},
            {"strict-transport-security": "max-age=63072000; includeSubDomains; preload"},
        ),
    ],
)
async def test_overrides_and_removals(options: dict[str, Any], changed: dict[str, str | None]) -> None:
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app, **options), https_scope())
    expected = {**API_HEADERS, **changed}
    assert _security(recorded) == {k: v for k, v in expected.items() if v is not None}
    assert len(recorded.headers) == len(set(recorded.headers))


async def test_headers_the_app_set_win_and_are_not_duplicated() -> None:
    app = headers_app(
        [(b"Content-Security-Policy", b"default-src 'self'"), (b"x-frame-options", b"SAMEORIGIN")]
    )
    recorded = await run_asgi(SecurityHeadersMiddleware(app), make_scope())
    names = [k.lower() for k, _ in recorded.headers]
    assert names.count(b"content-security-policy") == 1
    assert names.count(b"x-frame-options") == 1
    assert recorded.header("x-frame-options") == "SAMEORIGIN"
    assert recorded.header("x-content-type-options") == "nosniff"


async def test_every_header_removed_is_a_pass_through() -> None:
    removed: dict[str, None] = dict.fromkeys(API_HEADERS)
    middleware = SecurityHeadersMiddleware(ok_app, headers=removed)
    assert middleware.headers == ()
    recorded = await run_asgi(middleware, make_scope())
    assert recorded.headers == [(b"content-type", b"text/plain")]


async def test_problem_responses_from_inner_layers_get_the_headers() -> None:
    async def refusing(scope: Scope, receive: Receive, send: Send) -> None:
        await send_problem(scope, send, Problem(429, "slow down"), layer="ratelimit")

    recorded = await run_asgi(SecurityHeadersMiddleware(refusing), https_scope())
    assert recorded.status == 429
    assert recorded.header("content-type") == "application/problem+json"
    assert _security(recorded) == API_HEADERS


async def test_streaming_response_passes_chunk_by_chunk() -> None:
    chunks = [b"a", b"bb", b"ccc"]
    recorded = await run_asgi(SecurityHeadersMiddleware(streaming_app(chunks)), make_scope())
    assert [(m["body"], m["more_body"]) for m in recorded.body_messages] == [
        (b"a", True),
        (b"bb", True),
        (b"ccc", False),
    ]
    assert recorded.header("x-content-type-options") == "nosniff"


async def test_shared_header_list_of_the_app_is_not_mutated() -> None:
    shared = [(b"content-type", b"text/plain")]
    middleware = SecurityHeadersMiddleware(headers_app(shared))
    await run_asgi(middleware, https_scope())
    recorded = await run_asgi(middleware, https_scope())
    assert shared == [(b"content-type", b"text/plain")]
    assert len(recorded.headers) == 1 + len(API_HEADERS)


@pytest.mark.parametrize("scope_type", ["websocket", "lifespan"])
async def test_websocket_and_lifespan_pass_through_untouched(scope_type: str) -> None:
    scope = make_scope(scope_type=scope_type)
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app), scope)
    bare = await run_asgi(ok_app, make_scope(scope_type=scope_type))
    assert recorded.messages == bare.messages
    assert recorded.messages  # the app did run


def test_repr_lists_header_names() -> None:
    text = repr(SecurityHeadersMiddleware(ok_app, headers={"X-Frame-Options": None}))
    assert "content-security-policy" in text
    assert "x-frame-options" not in text


@pytest.mark.parametrize(
    "options",
    [
        {"preset": "strict"},
        {"hsts_max_age": -1},
        {"hsts_max_age": 1.5},
        {"hsts_max_age": True},
        {"hsts_preload": True, "hsts_max_age": 600},
        {"hsts_preload": True, "hsts_include_subdomains": False},
        {"headers": {"Bad Name": "x"}},
        {"headers": {"X-Frame-Options": "DENY\r\nSet-Cookie: a=b"}},
        {"headers": {"X-Frame-Options": ""}},
        {"headers": {"X-Frame-Options": True}},
        {"headers": {"X-Frame-Options": "ñ"}},
    ],
)
def test_invalid_options_raise_configuration_error(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        SecurityHeadersMiddleware(ok_app, **options)


async def test_over_httpx_transport() -> None:
    transport = httpx.ASGITransport(app=SecurityHeadersMiddleware(ok_app, preset="html"))
    async with httpx.AsyncClient(transport=transport, base_url="https://test") as client:
        response = await client.get("/")
    assert response.status_code == 200
    assert response.headers["x-frame-options"] == "SAMEORIGIN"
    assert response.headers["strict-transport-security"].startswith("max-age=31536000")


async def test_hsts_is_never_sent_over_plain_http() -> None:
    # RFC 6797 §7.2: an HSTS host MUST NOT send the header over non-secure transport.
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app), make_scope())
    assert _security(recorded) == {k: v for k, v in API_HEADERS.items() if k != "strict-transport-security"}


async def test_force_hsts_sends_it_over_plain_http_too() -> None:
    recorded = await run_asgi(SecurityHeadersMiddleware(ok_app, force_hsts=True), make_scope())
    assert _security(recorded) == API_HEADERS


@pytest.mark.parametrize(
    ("peer", "proto", "hsts"),
    [
        ("10.0.0.1", "https", True),  # TLS ended at a trusted proxy
        ("10.0.0.1", "http", False),
        ("203.0.113.7", "https", False),  # a client claiming https is not believed
    ],
)
async def test_hsts_follows_a_trusted_proxys_forwarded_proto(peer: str, proto: str, hsts: bool) -> None:
    middleware = SecurityHeadersMiddleware(
        ok_app, client_resolver=ClientAddressResolver(trusted_proxies=["10.0.0.0/8"])
    )
    scope = make_scope(headers=[("x-forwarded-proto", proto)], client=(peer, 1234))
    recorded = await run_asgi(middleware, scope)
    assert (recorded.header("strict-transport-security") is not None) is hsts
    assert recorded.header("x-content-type-options") == "nosniff"


async def test_only_hsts_configured_passes_plain_http_through() -> None:
    others: dict[str, None] = dict.fromkeys(k for k in API_HEADERS if k != "strict-transport-security")
    middleware = SecurityHeadersMiddleware(ok_app, headers=others)
    assert (await run_asgi(middleware, make_scope())).headers == [(b"content-type", b"text/plain")]
    assert (await run_asgi(middleware, https_scope())).header("strict-transport-security") is not None


async def test_a_mixed_case_header_of_ours_the_app_set_is_not_duplicated() -> None:
    # Names are compared case-insensitively even though most are passed over by their length alone.
    app = headers_app([(b"X-Content-Type-Options", b"nosniff"), (b"Referrer-Policy", b"origin")])
    recorded = await run_asgi(SecurityHeadersMiddleware(app), make_scope())
    names = [k.lower() for k, _ in recorded.headers]
    assert names.count(b"x-content-type-options") == 1
    assert names.count(b"referrer-policy") == 1
    assert recorded.header("x-frame-options") == "DENY"
