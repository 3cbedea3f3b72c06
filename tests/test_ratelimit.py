"""RateLimitMiddleware with in-memory storage: strategies at their exact boundaries (manual clock), keys,
hierarchical quotas, headers as RFC 9651 structured fields per draft-ietf-httpapi-ratelimit-headers-11,
shadow mode, exemptions, costs, runtime replacement, events, websocket handshakes and messages."""

import asyncio
import math
from typing import Any

import pytest

from nexus_middleware import ClientAddressResolver, ConfigurationError, ManualClock, Principal
from nexus_middleware.context import get_context, publish_principal
from nexus_middleware.ratelimit import QUOTA_EXCEEDED, RateLimitMiddleware
from nexus_middleware.ratelimit_policy import Quota, RateLimitEvent, RateLimitOptions, RateLimitPolicy
from nexus_middleware.structured_fields import parse_list
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from tests.support.asgi import Recorded, make_scope, ok_app, run_asgi, streaming_app

STRATEGIES = ["sliding-window-counter", "moving-window", "fixed-window"]


def limiter(*policies: RateLimitPolicy, app: ASGIApp = ok_app, **options: Any) -> RateLimitMiddleware:
    clock = options.pop("clock", None) or ManualClock()
    resolver = options.pop("client_resolver", None)
    hook = options.pop("event_hook", None)
    return RateLimitMiddleware(
        app,
        policies=list(policies),
        options=RateLimitOptions(**options),
        clock=clock,
        client_resolver=resolver,
        event_hook=hook,
    )


async def call(
    app: ASGIApp,
    path: str = "/api/items",
    *,
    client: str = "203.0.113.7",
    headers: list[tuple[str, str]] | None = None,
    principal: Principal | None = None,
    method: str = "GET",
) -> Recorded:
    scope = make_scope(path, method=method, headers=headers or [], client=(client, 50000))
    if principal is not None:
        publish_principal(scope, principal)
    return await run_asgi(app, scope)


def service_limits(recorded: Recorded) -> dict[str, dict[str, Any]]:
    return {str(item.value): dict(item.params) for item in parse_list(recorded.header_values("ratelimit"))}


def quota_policies(recorded: Recorded) -> dict[str, dict[str, Any]]:
    return {
        str(item.value): dict(item.params) for item in parse_list(recorded.header_values("ratelimit-policy"))
    }


# Each step: seconds to advance the manual clock, then the expected status. The clock starts on a window
# boundary (1_700_000_000 is a multiple of 10), limit 3 per 10 seconds.
BOUNDARIES = {
    "fixed-window": [(0, 200), (0, 200), (0, 200), (0, 429), (9.999, 429), (0.001, 200), (0, 200)],
    "moving-window": [
        (0, 200),
        (4, 200),
        (4, 200),
        (0, 429),
        (1.999, 429),  # t=9.999: the hit at t=0 still counts
        (0.001, 200),  # t=10: it has left the window
        (0, 429),
        (3.999, 429),  # t=13.999: the hit at t=4 still counts
        (0.001, 200),
    ],
    "sliding-window-counter": [
        (0, 200),
        (0, 200),
        (0, 200),
        (0, 429),
        (9.999, 429),
        (0.001, 429),  # t=10: the previous window still weighs 3 * 10/10
        (0.001, 200),  # weighs 2.9997: floor 2, one request fits
        (0, 429),
        (3.332, 429),  # t=13.334-: 3 * 6.667/10 + 1 = 3.0001
        (0.002, 200),  # t=13.335: 3 * 6.665/10 + 1 = 2.9995
    ],
}


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_each_strategy_at_its_exact_boundaries(strategy: str) -> None:
    clock = ManualClock(wall=1_700_000_000.0)
    app = limiter(RateLimitPolicy("api", "3/10seconds", key="client", strategy=strategy), clock=clock)  # type: ignore[arg-type]
    for step, (advance, expected) in enumerate(BOUNDARIES[strategy]):
        clock.advance(advance)
        recorded = await call(app)
        assert recorded.status == expected, f"step {step} ({strategy})"


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("cost", [1, 2])
async def test_retry_after_is_exact_and_never_earlier_than_t(strategy: str, cost: int) -> None:
    clock = ManualClock(wall=1_700_000_003.0)
    policy = RateLimitPolicy("api", "4/10seconds", key="client", strategy=strategy, cost=cost)  # type: ignore[arg-type]
    app = limiter(policy, clock=clock)
    while (first := await call(app)).status == 200:
        clock.advance(1.5)
    assert first.status == 429
    retry_after = int(first.header("retry-after") or "0")
    limits = service_limits(first)
    assert retry_after >= limits["api"]["t"] >= 0
    assert retry_after >= 1
    # Waiting Retry-After seconds is enough, and (for whole-second answers) not much more than needed.
    clock.advance(retry_after)
    assert (await call(app)).status == 200


async def test_headers_are_structured_fields_as_draft_11_defines() -> None:
    app = limiter(
        RateLimitPolicy(
            "api", "5/second;100/hour", key="client", quotas=(Quota("site", "1000/day", key="global"),)
        )
    )
    recorded = await call(app)
    assert recorded.status == 200
    policies = quota_policies(recorded)
    limits = service_limits(recorded)
    assert set(policies) == set(limits) == {"api-1s", "api-3600s", "site"}
    for name, params in policies.items():
        items = parse_list(recorded.header_values("ratelimit-policy"))
        assert all(isinstance(item.value, str) and type(item.value) is str for item in items)
        assert isinstance(params["q"], int) and params["q"] >= 0
        assert isinstance(params["w"], int) and params["w"] > 0
        assert set(params) <= {"q", "w", "qu", "pk"}, name
    assert policies["api-1s"]["q"] == 5 and policies["api-1s"]["w"] == 1
    assert policies["api-3600s"]["q"] == 100 and policies["api-3600s"]["w"] == 3600
    assert policies["site"] == {"q": 1000, "w": 86400}  # a global quota has no partition
    assert isinstance(policies["api-1s"]["pk"], bytes) and policies["api-1s"]["pk"] == limits["api-1s"]["pk"]
    assert b"203.0.113.7" not in policies["api-1s"]["pk"]  # the partition key is a hash, never the address
    for name, params in limits.items():
        assert set(params) <= {"r", "t", "pk"}, name
        assert isinstance(params["r"], int) and params["r"] >= 0
        assert isinstance(params["t"], int) and params["t"] >= 0
    assert limits["api-1s"]["r"] == 4 and limits["api-3600s"]["r"] == 99 and limits["site"]["r"] == 999
    assert recorded.header("x-ratelimit-limit") is None


async def test_refusal_is_a_quota_exceeded_problem() -> None:
    app = limiter(RateLimitPolicy("login", "1/minute", key="client"), legacy_headers=True)
    assert (await call(app)).status == 200
    refused = await call(app)
    assert refused.status == 429
    assert refused.header("content-type") == "application/problem+json"
    body = refused.json()
    assert body["type"] == QUOTA_EXCEEDED
    assert body["status"] == 429
    assert body["violated-policies"] == ["login"]
    assert service_limits(refused) == {
        "login": {"r": 0, "t": int(refused.header("retry-after") or 0), "pk": ANY}
    }
    assert refused.header("x-ratelimit-limit") == "1"
    assert refused.header("x-ratelimit-remaining") == "0"
    assert int(refused.header("x-ratelimit-reset") or 0) > 0
    assert refused.complete


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY: Any = _Any()


async def test_headers_are_added_to_errors_and_streams_of_the_inner_app() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 503, "headers": [(b"x-app", b"1")]})
        await send({"type": "http.response.body", "body": b"down"})

    for inner in (failing, streaming_app([b"a", b"b", b"c"])):
        recorded = await call(limiter(RateLimitPolicy("api", "10/minute", key="client"), app=inner))
        assert recorded.header("ratelimit") is not None
        assert recorded.header("ratelimit-policy") is not None
        assert recorded.complete
    assert [m.get("more_body", False) for m in recorded.body_messages] == [True, True, False]


@pytest.mark.parametrize(
    ("resolver", "peer", "forwarded"),
    [
        (None, "203.0.113.7", ["1.1.1.1", "2.2.2.2", "3.3.3.3"]),  # untrusted peer: the header is ignored
        (ClientAddressResolver(trusted_proxies=["10.0.0.0/8"]), "203.0.113.7", ["1.1.1.1", "9.9.9.9"]),
        # behind a trusted proxy, whatever the client writes left of the proxy's own entry is ignored
        (
            ClientAddressResolver(trusted_proxies=["10.0.0.0/8"]),
            "10.0.0.2",
            ["1.1.1.1, 198.51.100.9", "2.2.2.2, 198.51.100.9", "198.51.100.9"],
        ),
    ],
)
async def test_forwarded_for_spoofing_never_creates_a_new_bucket(
    resolver: ClientAddressResolver | None, peer: str, forwarded: list[str]
) -> None:
    app = limiter(RateLimitPolicy("api", "2/minute", key="client"), client_resolver=resolver)
    statuses = [
        (await call(app, client=peer, headers=[("x-forwarded-for", value)])).status for value in forwarded
    ]
    statuses.append((await call(app, client=peer, headers=[("x-forwarded-for", forwarded[-1])])).status)
    assert statuses.count(200) == 2
    assert statuses[2:] == [429] * (len(statuses) - 2)


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (("/api/items", "203.0.113.7"), ("/API//Items/", "203.0.113.7")),  # path case and slashes
        (("/api/items", "203.0.113.7"), ("/api/./x/../items", "::ffff:203.0.113.7")),  # IPv4-mapped IPv6
        (("/api/items", "2001:db8:1:2::1"), ("/api/items", "2001:db8:1:2:ffff::9")),  # one /64
    ],
)
async def test_key_variants_share_a_bucket(first: tuple[str, str], second: tuple[str, str]) -> None:
    app = limiter(
        RateLimitPolicy("api", "1/minute", key="client", quotas=(Quota("paths", "1/minute", key="path"),)),
        app=ok_app,
    )
    assert (await call(app, first[0], client=first[1])).status == 200
    assert (await call(app, second[0], client=second[1])).status == 429


@pytest.mark.parametrize(
    ("key", "a", "b", "shared"),
    [
        ("principal", Principal("alice", method="jwt"), Principal("alice", method="api_key"), True),
        ("principal", Principal("alice", method="jwt"), Principal("bob", method="jwt"), False),
        (
            "tenant",
            Principal("a", method="jwt", tenant="acme"),
            Principal("b", method="jwt", tenant="acme"),
            True,
        ),
        (
            "api_key",
            Principal("a", method="api_key", key_id="k1"),
            Principal("a", method="api_key", key_id="k2"),
            False,
        ),
        ("principal_or_client", Principal("a", method="jwt"), Principal("anonymous"), False),
        ("global", Principal("a", method="jwt"), Principal("b", method="jwt"), True),
        ("route", Principal("a", method="jwt"), Principal("b", method="jwt"), True),
    ],
)
async def test_key_kinds(key: str, a: Principal, b: Principal, shared: bool) -> None:
    app = limiter(RateLimitPolicy("api", "1/minute", key=key))
    assert (await call(app, principal=a)).status == 200
    assert (await call(app, principal=b, client="198.51.100.1")).status == (429 if shared else 200)


async def test_header_and_callable_keys() -> None:
    async def by_query(scope: Scope) -> str | None:
        return scope["query_string"].decode() or None

    # policies are tried in order: the narrow one first
    app = limiter(
        RateLimitPolicy("fn", "1/minute", key=by_query, paths=("/fn",)),
        RateLimitPolicy("api", "1/minute", key="header:x-client-id"),
    )
    assert (await call(app, headers=[("x-client-id", "c1")])).status == 200
    assert (await call(app, headers=[("x-client-id", "c1")], client="198.51.100.2")).status == 429
    assert (await call(app, headers=[("x-client-id", "c2")])).status == 200
    assert (await call(app, headers=[("x-client-id", "x" * 5000)])).status == 200  # hashed, not stored raw
    # without the header the quota does not apply: no headers, no refusal
    missing = await call(app)
    assert missing.status == 200 and missing.header("ratelimit") is None
    scope = make_scope("/fn", query_string=b"k=1")
    assert (await run_asgi(app, scope)).status == 200
    assert (await run_asgi(app, make_scope("/fn", query_string=b"k=1"))).status == 429


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_hierarchical_quotas_are_all_or_nothing(strategy: str) -> None:
    policy = RateLimitPolicy(
        "api",
        strategy=strategy,  # type: ignore[arg-type]
        quotas=(Quota("user", "2/minute", key="principal"), Quota("org", "3/minute", key="tenant")),
    )
    app = limiter(policy)
    alice = Principal("alice", method="jwt", tenant="acme")
    bob = Principal("bob", method="jwt", tenant="acme")
    assert [(await call(app, principal=alice)).status for _ in range(4)] == [200, 200, 429, 429]
    # alice's refused requests consumed nothing at the org level: bob still finds one unit there
    first = await call(app, principal=bob)
    assert first.status == 200
    assert service_limits(first)["org"]["r"] == 0
    assert service_limits(first)["user"]["r"] == 1
    refused = await call(app, principal=bob)
    assert refused.status == 429 and refused.json()["violated-policies"] == ["org"]
    # and the org refusal consumed nothing at bob's user level
    assert service_limits(refused) == {"org": {"r": 0, "t": ANY, "pk": ANY}}


async def test_limits_follow_the_plan_of_the_principal() -> None:
    async def from_claims(principal: Principal | None, scope: Scope) -> str | None:
        if principal is None:
            return None
        quota = principal.claims.get("quota")
        return quota if isinstance(quota, str) else None

    policy = RateLimitPolicy(
        "api",
        quotas=(
            Quota(
                "plan", "1/minute", key="principal_or_client", plans={"pro": "3/minute", "free": "2/minute"}
            ),
            Quota("custom", "100/minute", key="principal", resolver=from_claims),
        ),
    )
    app = limiter(policy)
    pro = Principal("p", method="jwt", plan="pro")
    free_claim = Principal("f", method="jwt", claims={"plan": "free", "quota": "5/minute"})
    assert [(await call(app, principal=pro)).status for _ in range(4)] == [200, 200, 200, 429]
    recorded = await call(app, principal=free_claim)
    assert quota_policies(recorded)["plan"]["q"] == 2
    assert quota_policies(recorded)["custom"]["q"] == 5
    anonymous = await call(app)
    assert quota_policies(anonymous) == {"plan": {"q": 1, "w": 60, "pk": ANY}}


async def test_shadow_mode_reports_without_refusing() -> None:
    events: list[RateLimitEvent] = []

    async def hook(event: RateLimitEvent) -> None:
        events.append(event)

    app = limiter(RateLimitPolicy("api", "1/minute", key="client", shadow=True), event_hook=hook)
    scopes = [make_scope("/x") for _ in range(3)]
    statuses = [(await run_asgi(app, scope)).status for scope in scopes]
    assert statuses == [200, 200, 200]
    outcomes = [get_context(scope).decision("ratelimit") for scope in scopes]
    assert [d.outcome for d in outcomes if d] == ["allow", "shadow_deny", "shadow_deny"]
    assert [e.outcome for e in events] == ["shadow_deny", "shadow_deny"]
    assert events[0].policy == "api" and events[0].remaining == 0 and events[0].key is not None


async def test_refusal_events_and_decisions() -> None:
    events: list[RateLimitEvent] = []

    async def hook(event: RateLimitEvent) -> None:
        events.append(event)
        raise RuntimeError("a failing hook never breaks a request")

    policy = RateLimitPolicy("api", "1/minute", key="client", strategy="fixed-window")
    app = limiter(policy, event_hook=hook, report_hits=True)
    scopes = [make_scope("/x"), make_scope("/x")]
    assert [(await run_asgi(app, s)).status for s in scopes] == [200, 429]
    assert [e.outcome for e in events] == ["allow", "deny"]
    assert events[1].remaining == 0 and events[1].limit == 1 and events[1].retry_after == 60
    assert events[1].key == "nexus:rl:api:ip:203.0.113.7"
    deny = get_context(scopes[1]).decision("ratelimit")
    assert deny is not None and deny.outcome == "deny" and deny.rule == "api"
    assert (
        deny.details["remaining"] == 0 and deny.details["limit"] == 1 and deny.details["key_kind"] == "client"
    )
    assert get_context(scopes[1]).local_response == "ratelimit"


@pytest.mark.parametrize(
    ("options", "request_kwargs"),
    [
        ({"exempt_paths": ("/health",)}, {"path": "/health"}),
        ({"exempt_subjects": frozenset({"ops"})}, {"principal": Principal("ops", method="jwt")}),
        ({"exempt_networks": ("192.0.2.0/24",)}, {"client": "192.0.2.44"}),
        ({"exempt_networks": ("2001:db8::/32",)}, {"client": "2001:db8::1"}),
    ],
)
async def test_exemptions(options: dict[str, Any], request_kwargs: dict[str, Any]) -> None:
    app = limiter(RateLimitPolicy("api", "1/minute", key="client"), **options)
    for _ in range(3):
        recorded = await call(app, **request_kwargs)
        assert recorded.status == 200 and recorded.header("ratelimit") is None
    assert (await call(app)).status == 200
    assert (await call(app)).status == 429


async def test_costs_static_and_async() -> None:
    async def by_size(scope: Scope) -> int:
        return 3 if scope["method"] == "POST" else 1

    app = limiter(
        RateLimitPolicy("static", "5/minute", key="client", cost=2, paths=("/static",)),
        RateLimitPolicy("dynamic", "4/minute", key="client", cost=by_size),
    )
    assert [(await call(app, "/static")).status for _ in range(3)] == [200, 200, 429]
    post = await call(app, "/dyn", method="POST")
    assert service_limits(post)["dynamic"]["r"] == 1
    refused = await call(app, "/dyn", method="POST")
    assert refused.status == 429
    assert (await call(app, "/dyn")).status == 200  # cost 1 still fits


async def test_routes_and_methods_select_the_policy() -> None:
    app = limiter(
        RateLimitPolicy("login", "1/minute", key="client", paths=("/login",), methods=frozenset({"POST"})),
        RateLimitPolicy("users", "2/minute", key="route", paths=("/users/{id}",)),
        RateLimitPolicy("default", "100/minute", key="client"),
    )
    assert quota_policies(await call(app, "/login", method="POST")).keys() == {"login"}
    assert quota_policies(await call(app, "/login")).keys() == {"default"}
    assert (await call(app, "/login", method="POST")).status == 429
    # one bucket for the whole route template, whoever calls and whatever the id
    assert (await call(app, "/users/1")).status == 200
    assert (await call(app, "/users/2", client="198.51.100.3")).status == 200
    assert (await call(app, "/users/3", client="198.51.100.4")).status == 429


async def test_the_host_selects_the_policy() -> None:
    app = limiter(
        RateLimitPolicy(
            "internal", "1/minute", key="client", paths=("/admin/*",), host="Internal.Example.com"
        ),
        RateLimitPolicy("public", "3/minute", key="client", paths=("/admin/*",), host="public.example.com"),
        RateLimitPolicy("default", "100/minute", key="client"),
    )

    def at(host: str) -> list[tuple[str, str]]:
        return [("host", host)]

    assert quota_policies(await call(app, "/admin/x", headers=at("internal.example.com:8443"))).keys() == {
        "internal"
    }
    assert (await call(app, "/admin/x", headers=at("INTERNAL.example.com"))).status == 429
    assert quota_policies(await call(app, "/admin/x", headers=at("public.example.com"))).keys() == {"public"}
    assert (await call(app, "/admin/x", headers=at("public.example.com"))).status == 200
    assert quota_policies(await call(app, "/admin/x", headers=at("other.example.com"))).keys() == {"default"}
    assert quota_policies(await call(app, "/admin/x")).keys() == {"default"}  # no Host header


async def test_a_route_key_counts_each_host_apart() -> None:
    shared = Quota("per-route", "1/minute", key="route")
    app = limiter(
        RateLimitPolicy("a", quotas=(shared,), paths=("/admin/*",), host="a.example.com"),
        RateLimitPolicy("b", quotas=(shared,), paths=("/admin/*",), host="b.example.com"),
    )
    assert (await call(app, "/admin/x", headers=[("host", "a.example.com")])).status == 200
    assert (await call(app, "/admin/x", headers=[("host", "b.example.com")])).status == 200
    assert (await call(app, "/admin/y", headers=[("host", "a.example.com")])).status == 429


async def test_an_unlimited_policy_keeps_its_routes_from_later_policies() -> None:
    app = limiter(
        RateLimitPolicy("health", "unlimited", paths=("/api/health",)),
        RateLimitPolicy("api", "1/minute", key="client", paths=("/api/*",)),
    )
    for _ in range(3):
        recorded = await call(app, "/api/health")
        assert recorded.status == 200 and recorded.header("ratelimit") is None
    assert (await call(app, "/api/items")).status == 200
    assert (await call(app, "/api/items")).status == 429
    with pytest.raises(ConfigurationError, match="no limits"):
        Quota("empty", "")


async def test_unmatched_requests_pass_untouched() -> None:
    app = limiter(RateLimitPolicy("api", "1/minute", paths=("/api/*",)))
    for _ in range(3):
        recorded = await call(app, "/public")
        assert recorded.status == 200 and recorded.header("ratelimit") is None


async def test_policies_are_replaced_at_runtime() -> None:
    app = limiter(RateLimitPolicy("api", "1/minute", key="client"))
    assert (await call(app)).status == 200
    assert (await call(app)).status == 429
    app.replace_policies([RateLimitPolicy("api", "5/minute", key="client")])
    assert [p.name for p in app.policies] == ["api"]
    recorded = await call(app)
    assert recorded.status == 200  # the same bucket, now read against the new limit
    assert quota_policies(recorded)["api"]["q"] == 5
    app.replace_policies([])
    assert (await call(app)).header("ratelimit") is None
    with pytest.raises(ConfigurationError):
        app.replace_policies([RateLimitPolicy("a", "1/second"), RateLimitPolicy("a", "2/second")])
    assert app.policies == ()  # a rejected replacement leaves the previous set in force


class HeldApp:
    """Holds every admitted request until `expected` have arrived, so all of them overlap in flight."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.gate = asyncio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.arrived += 1
        if self.arrived >= self.expected:
            self.gate.set()
        await self.gate.wait()
        await ok_app(scope, receive, send)


async def hundred_against_fifty(app: ASGIApp, held: HeldApp) -> None:
    async with asyncio.timeout(30):  # fewer than 50 admitted would hold the gate shut
        statuses = [r.status for r in await asyncio.gather(*(call(app) for _ in range(100)))]
    assert statuses.count(200) == 50 and statuses.count(429) == 50
    assert held.arrived == 50


@pytest.mark.parametrize("strategy", STRATEGIES)
async def test_hundred_concurrent_requests_against_fifty_in_memory(strategy: str) -> None:
    held = HeldApp(50)
    policy = RateLimitPolicy("api", "50/minute", key="client", strategy=strategy)  # type: ignore[arg-type]
    await hundred_against_fifty(limiter(policy, app=held), held)


async def test_invalid_path_is_a_400_problem() -> None:
    app = limiter(RateLimitPolicy("api", "1/minute"))
    recorded = await run_asgi(app, make_scope("/a", raw_path=b"/a%00b"))
    assert recorded.status == 400 and recorded.header("content-type") == "application/problem+json"


async def test_lifespan_passes_through() -> None:
    recorded = await run_asgi(limiter(RateLimitPolicy("api", "1/minute")), make_scope(scope_type="lifespan"))
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_websocket_handshakes_are_limited_like_requests() -> None:
    app = limiter(RateLimitPolicy("ws", "1/minute", key="client", strategy="fixed-window"))
    accepted = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    accept = accepted.messages[0]
    assert accept["type"] == "websocket.accept"
    assert dict(accept["headers"])[b"ratelimit"].startswith(b'"ws";r=0;t=')
    refused = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert refused.messages == [{"type": "websocket.close", "code": 1013, "reason": ANY}]
    denial = await run_asgi(
        app, make_scope("/ws", scope_type="websocket", extensions={"websocket.http.response": {}})
    )
    assert denial.messages[0]["type"] == "websocket.http.response.start"
    assert denial.messages[0]["status"] == 429
    assert (b"retry-after", b"60") in denial.messages[0]["headers"]


async def test_websocket_message_limit_closes_with_1008() -> None:
    clock = ManualClock()
    received: list[str] = []

    async def echo(scope: Scope, receive: Receive, send: Send) -> None:
        await receive()
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                received.append(f"disconnect {message.get('code')}")
                await send({"type": "websocket.send", "text": "late"})  # dropped: the socket is closed
                return
            received.append(message["text"])
            await send({"type": "websocket.send", "text": message["text"]})

    app = limiter(RateLimitPolicy("ws", "100/minute"), app=echo, websocket_messages="3/second", clock=clock)
    incoming = [{"type": "websocket.connect"}] + [
        {"type": "websocket.receive", "text": str(i)} for i in range(5)
    ]
    scope = make_scope("/ws", scope_type="websocket")
    recorded = await run_asgi(app, scope, incoming=incoming)
    assert received == ["0", "1", "2", "disconnect 1008"]
    sent = [m for m in recorded.messages if m["type"] != "websocket.accept"]
    assert sent[-1] == {"type": "websocket.close", "code": 1008, "reason": "message rate limit exceeded"}
    assert [m.get("text") for m in sent[:-1]] == ["0", "1", "2"]
    decision = get_context(scope).decision("ratelimit")
    assert decision is not None and decision.outcome == "deny" and decision.reason == "message_rate"


async def test_websocket_messages_spread_over_time_pass() -> None:
    clock = ManualClock()
    count = 0

    async def counting(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal count
        await receive()
        await send({"type": "websocket.accept"})
        while (await receive())["type"] == "websocket.receive":
            count += 1
            clock.advance(0.5)

    app = limiter(
        RateLimitPolicy("ws", "100/minute"), app=counting, websocket_messages="2/second", clock=clock
    )
    incoming = [{"type": "websocket.connect"}] + [{"type": "websocket.receive", "text": "m"}] * 6
    await run_asgi(app, make_scope("/ws", scope_type="websocket"), incoming=incoming)
    assert count == 6


def _limits_memory_storage() -> object:
    from limits.aio.storage import MemoryStorage

    return MemoryStorage()


@pytest.mark.parametrize(
    "build",
    [
        lambda: RateLimitPolicy("api"),
        lambda: RateLimitPolicy("api", "ten per second"),
        lambda: RateLimitPolicy("api", "1/second;2/second"),
        lambda: RateLimitPolicy("api", "1/second", key="ip"),
        lambda: RateLimitPolicy("api", "1/second", key="header:X-Upper"),
        lambda: RateLimitPolicy("api", "1/second", strategy="token-bucket"),  # type: ignore[arg-type]
        lambda: RateLimitPolicy("api", "1/second", on_store_error="ignore"),  # type: ignore[arg-type]
        lambda: RateLimitPolicy("api", "1/second", cost=-1),
        lambda: RateLimitPolicy("api", "1/second", paths=("no-slash",)),
        lambda: RateLimitPolicy('a"b', "1/second"),
        lambda: RateLimitPolicy("api", "1/second", quotas=(Quota("api", "1/second"),)),
        lambda: Quota("q"),
        lambda: RateLimitOptions(store_timeout=0),
        lambda: RateLimitOptions(instances=0),
        lambda: RateLimitOptions(ipv6_prefix=0),
        lambda: RateLimitOptions(exempt_paths=("bad",)),
        lambda: RateLimitOptions(websocket_messages="unlimited"),
        lambda: RateLimitMiddleware(ok_app, policies=[], options=RateLimitOptions(exempt_networks=("x",))),
        lambda: RateLimitMiddleware(ok_app, policies=[], storage="mongodb://x"),
        lambda: RateLimitMiddleware(ok_app, policies=[], storage=42),
        lambda: RateLimitMiddleware(ok_app, policies=[], storage=_limits_memory_storage()),
        lambda: RateLimitMiddleware(ok_app, policies=["api"]),  # type: ignore[list-item]
        lambda: RateLimitMiddleware(ok_app, policies=[], options={}),  # type: ignore[arg-type]
        lambda: RateLimitMiddleware(ok_app, policies=[], event_hook=3),  # type: ignore[arg-type]
    ],
)
def test_invalid_configuration_is_refused_at_construction(build: Any) -> None:
    with pytest.raises(ConfigurationError):
        build()


def test_reprs_are_readable() -> None:
    policy = RateLimitPolicy("api", "10/second", key="client")
    assert "RateLimitPolicy(name='api', limits='10/second', key='client'" in repr(policy)
    middleware = RateLimitMiddleware(ok_app, policies=[policy])
    assert "policies=['api']" in repr(middleware) and "MemoryLimiterBackend" in repr(middleware)


async def test_unlimited_plan_and_zero_cost() -> None:
    policy = RateLimitPolicy(
        "api", cost=0, quotas=(Quota("plan", "1/minute", key="principal", plans={"enterprise": "unlimited"}),)
    )
    app = limiter(policy)
    enterprise = Principal("e", method="jwt", plan="enterprise")
    for _ in range(3):
        assert (await call(app, principal=enterprise)).header("ratelimit") is None
    basic = Principal("b", method="jwt")
    assert [(await call(app, principal=basic)).status for _ in range(3)] == [200, 200, 200]  # cost 0


def test_sliding_wait_formula_matches_the_weighted_count() -> None:
    from nexus_middleware.ratelimit_backends import sliding_wait

    # previous window held 9 of 10, current holds 2: count = 9 * (4 - d) / 10 + 2 must drop below 5
    wait = sliding_wait(9, 2, 4.0, 10.0, 5)
    assert math.isclose(wait, 4.0 - 3 * 10 / 9 + 0.001)
    assert sliding_wait(0, 2, 4.0, 10.0, 5) == 0.0
    assert sliding_wait(1, 2, 4.0, 10.0, 5) == 0.0  # already below
    assert math.isclose(sliding_wait(3, 8, 4.0, 10.0, 5), 4.0 + 10.0 - 5 * 10 / 8 + 0.001)


@pytest.mark.parametrize(
    ("limiter_class", "strategy_storage_calls"),
    [
        ("FixedWindowRateLimiter", 3),
        ("MovingWindowRateLimiter", 3),
        ("SlidingWindowCounterRateLimiter", 3),
    ],
)
async def test_clocked_storage_serves_limits_strategies(
    limiter_class: str, strategy_storage_calls: int
) -> None:
    from limits import parse
    from limits.aio import strategies

    from nexus_middleware.ratelimit_backends import ClockedMemoryStorage

    clock = ManualClock(wall=1_700_000_000.0)
    storage = ClockedMemoryStorage(clock=clock, sweep_every=2)
    strategy = getattr(strategies, limiter_class)(storage)
    item = parse("3/10seconds")
    assert await storage.check()
    results = [await strategy.hit(item, "k") for _ in range(4)]
    assert results == [True, True, True, False]
    assert not await strategy.test(item, "k")
    stats = await strategy.get_window_stats(item, "k")
    assert stats.remaining == 0
    assert await strategy.hit(item, "k", cost=5) is False
    await strategy.clear(item, "k")
    assert await strategy.test(item, "k")
    assert await strategy.hit(item, "k")
    clock.advance(20)
    assert (await strategy.get_window_stats(item, "k")).remaining == 3
    assert await storage.incr("plain", 10) == 1
    assert await storage.get("plain") == 1
    assert await storage.get_expiry("plain") == clock.time() + 10
    clock.advance(11)
    await storage.incr("other", 10)  # a write sweeps what expired
    assert "plain" not in storage.counters
    assert await storage.reset() is not None
    assert storage.counters == {} and storage.events == {}


async def test_failing_or_invalid_resolvers_fall_back_to_the_quota_defaults(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answers: list[Any] = [RuntimeError("identity provider down"), "not a limit", "2/minute", "2/minute"]

    async def resolver(principal: Principal | None, scope: Scope) -> str | None:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return str(answer)

    app = limiter(RateLimitPolicy("api", quotas=(Quota("q", "7/minute", key="client", resolver=resolver),)))
    assert quota_policies(await call(app))["q"]["q"] == 7
    assert quota_policies(await call(app))["q"]["q"] == 7
    assert quota_policies(await call(app))["q"]["q"] == 2
    assert quota_policies(await call(app))["q"]["q"] == 2
    assert "resolver of quota 'q' failed" in caplog.text
    assert "resolver gave invalid limits 'not a limit'" in caplog.text


async def test_breaker_lets_one_trial_through_and_survives_a_cancelled_trial() -> None:
    from nexus_middleware.errors import StorageUnavailableError
    from nexus_middleware.ratelimit_backends import WindowState

    class FlakyBackend:
        """A store that fails, then hangs, then answers: the three states a real Redis goes through."""

        def __init__(self) -> None:
            self.calls = 0
            self.mode = "fail"
            self.release = asyncio.Event()
            self.entered = asyncio.Event()

        async def acquire(self, checks: Any) -> list[WindowState]:
            self.calls += 1
            if self.mode == "fail":
                raise StorageUnavailableError("down")
            if self.mode == "hang":
                self.entered.set()
                await self.release.wait()
            return [WindowState(True, 1, 1.0) for _ in checks]

        async def aclose(self) -> None:
            return None

    clock = ManualClock()
    backend = FlakyBackend()
    app = RateLimitMiddleware(
        ok_app,
        policies=[RateLimitPolicy("api", "5/minute", on_store_error="fail_closed")],
        storage=backend,
        options=RateLimitOptions(breaker_cooldown=5),
        clock=clock,
    )
    assert app.store_available
    assert (await call(app)).status == 503
    assert not app.store_available
    assert (await call(app)).status == 503 and backend.calls == 1  # open: no call
    clock.advance(5)
    backend.mode = "hang"
    trial = asyncio.create_task(call(app))
    await backend.entered.wait()
    assert (await call(app)).status == 503 and backend.calls == 2  # the trial is in flight: fail fast
    trial.cancel()
    with pytest.raises(asyncio.CancelledError):
        await trial
    backend.mode = "ok"
    recovered = await call(app)
    assert recovered.status == 200 and backend.calls == 3 and app.store_available
    await app.aclose()


async def test_websocket_without_policy_passes_through() -> None:
    app = limiter(RateLimitPolicy("api", "1/minute", paths=("/api/*",)))
    for _ in range(2):
        recorded = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
        assert recorded.messages[0] == {"type": "websocket.accept"}


def test_policies_from_and_to_plain_config() -> None:
    config = {
        "name": "api",
        "limits": "10/second",
        "key": "client",
        "quotas": [{"name": "org", "limits": "100/minute", "key": "tenant", "plans": {"pro": "1000/minute"}}],
        "paths": ["/api/*"],
        "methods": ["get", "POST"],
        "strategy": "moving-window",
        "cost": 2,
        "shadow": True,
        "on_store_error": "fail_closed",
    }
    policy = RateLimitPolicy.from_config(config)
    assert policy.methods == frozenset({"GET", "POST"})
    assert [q.name for q in policy.all_quotas] == ["api", "org"]
    assert policy.all_quotas[1].plan_windows["pro"][0].amount == 1000
    assert RateLimitPolicy.from_config(policy.to_config()) == policy
    assert policy.to_config()["methods"] == ["GET", "POST"]
    hosted = RateLimitPolicy.from_config({**config, "host": "API.example.com"})
    assert hosted.host == "api.example.com"
    assert hosted.to_config()["host"] == "api.example.com"
    assert RateLimitPolicy.from_config(hosted.to_config()) == hosted
    minimal = RateLimitPolicy.from_config({"name": "all", "limits": "5/minute"})
    assert minimal.to_config() == {
        "name": "all",
        "limits": "5/minute",
        "key": "principal_or_client",
        "paths": ["*"],
        "methods": None,
        "strategy": "sliding-window-counter",
        "cost": 1,
        "shadow": False,
        "on_store_error": "fail_open",
    }

    async def key(scope: Scope) -> str | None:
        return None

    async def resolver(principal: Principal | None, scope: Scope) -> str | None:
        return None

    dynamic = RateLimitPolicy("d", cost=key, quotas=(Quota("q", key=key, resolver=resolver),))  # type: ignore[arg-type]
    assert dynamic.to_config()["cost"] == "<callable>"
    assert dynamic.to_config()["quotas"] == [
        {"name": "q", "limits": "", "key": "<callable>", "resolver": "<callable>"}
    ]


@pytest.mark.parametrize(
    "config",
    [
        {"name": "api", "limits": "1/second", "burst": 3},
        {"name": "api", "quotas": [{"name": "q", "limits": "1/second", "scope": "x"}]},
        {"name": "api", "quotas": ["1/second"]},
        {"name": "api", "limits": "1/second", "strategy": "leaky"},
        {"name": "api", "limits": "1/second", "host": "api.example.com:443"},  # a host no request matches
    ],
)
def test_invalid_plain_config_is_refused(config: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        RateLimitPolicy.from_config(config)


async def test_a_backend_failing_unexpectedly_degrades_instead_of_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenBackend:
        async def acquire(self, checks: Any) -> Any:
            raise ValueError("bug in a custom backend")

        async def aclose(self) -> None:
            return None

    app = RateLimitMiddleware(ok_app, policies=[RateLimitPolicy("api", "1/second")], storage=BrokenBackend())
    scope = make_scope("/x")
    recorded = await run_asgi(app, scope)
    assert recorded.status == 200
    decision = get_context(scope).decision("ratelimit")
    assert decision is not None and decision.outcome == "degraded"
    assert "rate-limit backend failed" in caplog.text


async def test_a_clocked_storage_instance_is_shared_by_two_middlewares() -> None:
    from nexus_middleware.ratelimit_backends import ClockedMemoryStorage

    storage = ClockedMemoryStorage(clock=ManualClock())
    first = RateLimitMiddleware(
        ok_app, policies=[RateLimitPolicy("api", "1/hour", key="client")], storage=storage
    )
    second = RateLimitMiddleware(
        ok_app, policies=[RateLimitPolicy("api", "1/hour", key="client")], storage=storage
    )
    assert (await call(first)).status == 200
    assert (await call(second)).status == 429


@pytest.mark.parametrize(
    ("url", "client_class"),
    [
        ("redis+sentinel://127.0.0.1:1/mymaster", "Redis"),
        ("async+redis+cluster://127.0.0.1:1,127.0.0.1:2", "RedisCluster"),
    ],
)
def test_sentinel_and_cluster_uris_are_accepted_without_io(url: str, client_class: str) -> None:
    from nexus_middleware.ratelimit_backends import RedisLimiterBackend

    app = RateLimitMiddleware(ok_app, policies=[RateLimitPolicy("api", "1/second")], storage=url)
    assert isinstance(app.backend, RedisLimiterBackend)
    assert type(app.backend.client).__name__ == client_class


async def test_windows_from_api_key_metadata_claim() -> None:
    policy = RateLimitPolicy(
        "api",
        quotas=(Quota("key", "1/minute", key="api_key", claim="rate_limit", plans={"pro": "2/minute"}),),
    )
    app = limiter(policy)
    custom = Principal("k", method="api_key", key_id="k1", plan="pro", claims={"rate_limit": "3/minute"})
    assert quota_policies(await call(app, principal=custom))["key"]["q"] == 3  # the claim beats the plan
    broken = Principal("k", method="api_key", key_id="k2", plan="pro", claims={"rate_limit": "lots"})
    assert quota_policies(await call(app, principal=broken))["key"]["q"] == 2  # invalid: next source
    plain = Principal("k", method="api_key", key_id="k3")
    assert quota_policies(await call(app, principal=plain))["key"]["q"] == 1
    assert Quota.from_config({"name": "key", "claim": "rate_limit"}).to_config() == {
        "name": "key",
        "limits": "",
        "key": "principal_or_client",
        "claim": "rate_limit",
    }
