from typing import Any

import pytest

from nexus_middleware.context import ANONYMOUS, Principal, RequestContext
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.identity import IdentityHeaders

ALICE = Principal(
    "alice",
    method="jwt",
    tenant="acme",
    roles=frozenset({"editor", "viewer"}),
    scopes=frozenset({"orders:read", "orders:write"}),
    key_id="k1",
)
CLIENT = [(b"host", b"api.example.com"), (b"accept", b"application/json")]


def names(headers: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [name for name, _ in headers]


def test_sets_identity_from_the_principal() -> None:
    forwarded = IdentityHeaders().apply(CLIENT, ALICE)
    assert forwarded == [
        *CLIENT,
        (b"x-auth-subject", b"alice"),
        (b"x-auth-tenant", b"acme"),
        (b"x-auth-roles", b"editor,viewer"),
        (b"x-auth-scopes", b"orders:read orders:write"),
    ]


@pytest.mark.parametrize(
    "spoofed",
    [
        b"x-auth-subject",
        b"X-Auth-Subject",
        b"x_auth_subject",
        b"x.auth.subject",
        b"X_AUTH.Subject",
        b"x-auth-tenant",
        b"x_auth_roles",
        b"x.auth.scopes",
    ],
)
@pytest.mark.parametrize("principal", [ALICE, None, ANONYMOUS])
def test_client_identity_headers_and_their_aliases_are_removed(
    spoofed: bytes, principal: Principal | None
) -> None:
    forwarded = IdentityHeaders().apply([*CLIENT, (spoofed, b"root")], principal)
    assert (spoofed, b"root") not in forwarded
    assert b"root" not in [value for _, value in forwarded]
    if principal is ALICE:
        assert (b"x-auth-subject", b"alice") in forwarded
    else:
        assert forwarded == CLIENT


@pytest.mark.parametrize(
    "subject",
    [
        "alice\r\nX-Auth-Roles: admin",
        "alice\nx",
        "alice\rx",
        "alice\x00",
        "alice\x7f",
        " alice",
        "alice\t",
        "",
    ],
)
def test_a_subject_with_control_characters_never_becomes_a_header(subject: str) -> None:
    context = RequestContext()
    principal = Principal(subject, method="jwt", tenant="acme", roles=frozenset({"admin"}))
    forwarded = IdentityHeaders().apply([*CLIENT, (b"x-auth-subject", b"spoof")], principal, context=context)
    assert forwarded == CLIENT  # no identity at all: neither the spoofed nor a partial one
    assert all(b"\r" not in value and b"\n" not in value for _, value in forwarded)
    decision = context.decision("identity")
    assert decision is not None
    assert (decision.outcome, decision.reason, decision.details["header"]) == (
        "dropped",
        "unsafe_value",
        "X-Auth-Subject",
    )


def test_a_tenant_with_crlf_drops_the_identity() -> None:
    principal = Principal("alice", method="jwt", tenant="acme\r\nX-Admin: 1")
    assert IdentityHeaders().apply(CLIENT, principal) == CLIENT


def test_unsafe_roles_and_scopes_are_left_out_one_by_one() -> None:
    context = RequestContext()
    principal = Principal(
        "alice",
        method="jwt",
        roles=frozenset({"viewer", "admin,root", "x\r\ny"}),
        scopes=frozenset({"read", "write admin", "ok:1"}),
    )
    forwarded = dict(IdentityHeaders().apply([], principal, context=context))
    assert forwarded[b"x-auth-roles"] == b"viewer"
    assert forwarded[b"x-auth-scopes"] == b"ok:1 read"
    assert [d.details["header"] for d in context.decisions] == [
        "X-Auth-Roles",
        "X-Auth-Roles",
        "X-Auth-Scopes",
    ]


def test_empty_lists_and_missing_tenant_are_not_sent() -> None:
    forwarded = IdentityHeaders().apply([], Principal("svc", method="api_key"))
    assert forwarded == [(b"x-auth-subject", b"svc")]


def test_custom_names_key_id_and_credential_stripping() -> None:
    config = IdentityHeaders(
        subject="X-User",
        tenant="X-Org",
        roles="X-Groups",
        scopes="X-Perms",
        key_id="X-Key-Id",
        strip_credentials=("Authorization", "X-API-Key"),
    )
    incoming = [
        *CLIENT,
        (b"authorization", b"Bearer secret"),
        (b"x-api-key", b"nx_k1_secret"),
        (b"x_api_key", b"nx_k1_secret"),
        (b"x-user", b"spoof"),
        (b"x-auth-subject", b"not ours any more"),
    ]
    forwarded = config.apply(incoming, ALICE)
    assert b"authorization" not in names(forwarded)
    assert b"x-api-key" not in names(forwarded) and b"x_api_key" not in names(forwarded)
    assert (b"x-user", b"alice") in forwarded and (b"x-user", b"spoof") not in forwarded
    assert (b"x-key-id", b"k1") in forwarded
    assert (b"x-org", b"acme") in forwarded
    assert (b"x-auth-subject", b"not ours any more") in forwarded  # only configured names are identity
    assert "strip_credentials=('Authorization', 'X-API-Key')" in repr(config)


def test_non_ascii_values_are_sent_as_utf8() -> None:
    forwarded = dict(IdentityHeaders().apply([], Principal("zoë", method="jwt")))
    assert forwarded[b"x-auth-subject"] == "zoë".encode()


@pytest.mark.parametrize(
    "options",
    [
        {"subject": "X Auth"},
        {"subject": "X-Auth\r\n"},
        {"subject": "X-Auth-Tenant"},
        {"roles": "x_auth.subject"},
        {"key_id": "x.auth.scopes"},
        {"strip_credentials": "Authorization"},
        {"strip_credentials": ("Bad Name",)},
    ],
)
def test_invalid_configuration(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        IdentityHeaders(**options)
