"""ConcurrencyLimitMiddleware: bulkheads, priority shedding, queueing and the adaptive limit."""

import asyncio
from typing import Any

import httpx
import pytest

from nexus_middleware import (
    AdaptiveLimit,
    ConcurrencyLimitMiddleware,
    ConcurrencyPolicy,
    ConfigurationError,
    ManualClock,
    Principal,
    PriorityClass,
    get_context,
)
from nexus_middleware.context import publish_principal
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi

REDUCED = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"
TIERS = (PriorityClass("critical", 1.0), PriorityClass("normal", 0.8), PriorityClass("low", 0.5))


class Held:
    """An inner app whose requests wait on a gate; counts those that entered and those in it now."""

    def __init__(self, clock: ManualClock | None = None) -> None:
        self.gate = asyncio.Event()
        self.entered = 0
        self.inside = 0
        self.clock = clock
        self.latency = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.entered += 1
        self.inside += 1
        try:
            await self.gate.wait()
            if self.clock is not None:
                self.clock.advance(self.latency)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"done"})
        finally:
            self.inside -= 1


def request(priority: str | None = None, path: str = "/api") -> Scope:
    return make_scope(path, headers=[] if priority is None else [("x-priority", priority)])


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def test_admits_exactly_n_under_ten_times_n_concurrent_requests() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(inner, policy=ConcurrencyPolicy(max_concurrent=4, retry_after=3))
    tasks = [asyncio.create_task(run_asgi(app, request())) for _ in range(40)]
    await settle()
    assert inner.entered == 4
    shed = [t.result() for t in tasks if t.done()]
    assert len(shed) == 36
    for recorded in shed:
        assert recorded.status == 503
        assert recorded.header("retry-after") == "3"
        assert recorded.header("content-type") == "application/problem+json"
        assert recorded.json()["type"] == REDUCED
    assert app.states()["*"].in_flight == 4
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert sum(r.status == 200 for r in results) == 4
    assert app.states()["*"].in_flight == 0
    assert (await run_asgi(app, request())).status == 200  # capacity is back


async def test_lower_classes_are_shed_first_and_critical_keeps_its_reserve() -> None:
    inner = Held()
    policy = ConcurrencyPolicy(max_concurrent=10, classes=TIERS, default_class="normal")
    app = ConcurrencyLimitMiddleware(inner, policy=policy, priority_header="x-priority")
    admitted: dict[str, int] = {}
    tasks = []
    for tier in ("low", "normal", "critical"):
        before = inner.entered
        tasks += [asyncio.create_task(run_asgi(app, request(tier))) for _ in range(10)]
        await settle()
        admitted[tier] = inner.entered - before
    assert admitted == {
        "low": 5,
        "normal": 3,
        "critical": 2,
    }  # 50% for low, up to 80% normal, the rest critical
    shed = [t.result() for t in tasks if t.done()]
    assert len(shed) == 20
    inner.gate.set()
    await asyncio.gather(*tasks)


async def test_decisions_name_the_key_and_the_class() -> None:
    inner = Held()
    policy = ConcurrencyPolicy(max_concurrent=1, classes=TIERS, default_class="normal")
    app = ConcurrencyLimitMiddleware(inner, policy=policy, priority_header="x-priority")
    first = request("critical")
    task = asyncio.create_task(run_asgi(app, first))
    await settle()
    second = request("unknown-class")
    await run_asgi(app, second)
    inner.gate.set()
    await task
    allow, shed = get_context(first).decision("concurrency"), get_context(second).decision("concurrency")
    assert allow is not None and shed is not None
    assert (allow.outcome, dict(allow.details)) == ("allow", {"key": "*", "priority": "critical"})
    assert (shed.outcome, dict(shed.details)) == ("shed", {"key": "*", "priority": "normal"})
    assert get_context(second).local_response == "concurrency"


async def test_classify_by_principal_and_by_route() -> None:
    inner = Held()

    def by_plan(scope: Scope) -> str | None:
        principal = get_context(scope).principal
        return "critical" if principal is not None and principal.plan == "enterprise" else None

    policy = ConcurrencyPolicy(max_concurrent=2, classes=TIERS, default_class="normal")
    app = ConcurrencyLimitMiddleware(
        inner, policy=policy, classify=by_plan, route_classes=[("/reports/*", None, "low")]
    )
    report = asyncio.create_task(run_asgi(app, request(path="/reports/daily")))  # low: 1 of 2
    await settle()
    assert (await run_asgi(app, request(path="/reports/weekly"))).status == 503
    normal = asyncio.create_task(run_asgi(app, request()))  # normal may use floor(0.8 * 2) = 1 slot: taken
    await settle()
    assert normal.done() and normal.result().status == 503
    enterprise = request(path="/reports/monthly")
    publish_principal(enterprise, Principal("acme", method="api_key", plan="enterprise"))
    vip = asyncio.create_task(run_asgi(app, enterprise))  # the classifier wins over the route class
    await settle()
    assert inner.entered == 2
    inner.gate.set()
    assert [(await t).status for t in (report, vip)] == [200, 200]


async def test_the_queue_holds_requests_until_a_slot_frees() -> None:
    inner = Held()
    policy = ConcurrencyPolicy(max_concurrent=1, queue_size=2, queue_timeout=5)
    app = ConcurrencyLimitMiddleware(inner, policy=policy)
    tasks = [asyncio.create_task(run_asgi(app, request())) for _ in range(4)]
    await settle()
    assert inner.entered == 1
    assert app.states()["*"].queued == 2
    overflow = [t for t in tasks if t.done()]
    assert len(overflow) == 1
    assert overflow[0].result().status == 503
    inner.gate.set()
    results = await asyncio.gather(*tasks)
    assert sorted(r.status for r in results) == [200, 200, 200, 503]
    assert inner.entered == 3
    assert app.states()["*"].queued == 0
    assert app.states()["*"].in_flight == 0


async def test_a_queued_request_times_out_with_503() -> None:
    inner = Held()
    policy = ConcurrencyPolicy(max_concurrent=1, queue_size=1, queue_timeout=0.01)
    app = ConcurrencyLimitMiddleware(inner, policy=policy)
    holder = asyncio.create_task(run_asgi(app, request()))
    await settle()
    scope = request()
    waited = await run_asgi(app, scope)
    assert waited.status == 503
    assert "waited too long" in waited.json()["detail"]
    assert get_context(scope).decision("concurrency").outcome == "queue_timeout"  # type: ignore[union-attr]
    assert app.states()["*"].queued == 0
    inner.gate.set()
    await holder
    assert app.states()["*"].in_flight == 0


async def test_the_queue_serves_higher_classes_first_and_displaces_lower_ones() -> None:
    inner = Held()
    policy = ConcurrencyPolicy(
        max_concurrent=1, queue_size=2, queue_timeout=5, classes=TIERS, default_class="normal"
    )
    app = ConcurrencyLimitMiddleware(inner, policy=policy, priority_header="x-priority")
    order: list[str] = []

    async def tracked(tier: str) -> int:
        recorded = await run_asgi(app, request(tier))
        order.append(tier)
        return recorded.status

    holder = asyncio.create_task(tracked("critical"))
    await settle()
    low = asyncio.create_task(tracked("low"))
    normal = asyncio.create_task(tracked("normal"))
    await settle()
    critical = asyncio.create_task(tracked("critical"))  # queue full: displaces the low waiter
    await settle()
    assert low.done() and low.result() == 503
    inner.gate.set()
    assert [await holder, await normal, await critical] == [200, 200, 200]
    assert order == ["low", "critical", "critical", "normal"]


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(inner, policy=ConcurrencyPolicy(max_concurrent=1, queue_size=1))
    holder = asyncio.create_task(run_asgi(app, request()))
    await settle()
    waiter = asyncio.create_task(run_asgi(app, request()))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert app.states()["*"].queued == 0
    inner.gate.set()
    await holder
    assert app.states()["*"].in_flight == 0


async def test_a_waiter_cancelled_as_its_slot_frees_passes_the_slot_on() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(inner, policy=ConcurrencyPolicy(max_concurrent=1, queue_size=2))
    holder = asyncio.create_task(run_asgi(app, request()))
    await settle()
    cancelled = asyncio.create_task(run_asgi(app, request()))
    patient = asyncio.create_task(run_asgi(app, request()))
    await settle()
    inner.gate.set()  # the holder finishes in the same loop turn as the first waiter's cancellation
    cancelled.cancel()
    with pytest.raises(asyncio.CancelledError):
        await cancelled
    assert [(await holder).status, (await patient).status] == [200, 200]
    assert (app.states()["*"].in_flight, app.states()["*"].queued) == (0, 0)


async def test_the_slot_is_released_when_the_app_raises() -> None:
    async def failing(scope: Scope, receive: Receive, send: Send) -> None:
        raise RuntimeError("boom")

    app = ConcurrencyLimitMiddleware(failing, policy=ConcurrencyPolicy(max_concurrent=1))
    for _ in range(3):
        with pytest.raises(RuntimeError, match="boom"):
            await run_asgi(app, request())
    assert app.states()["*"].in_flight == 0


async def test_the_slot_is_released_when_the_request_is_cancelled() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(inner, policy=ConcurrencyPolicy(max_concurrent=1))
    task = asyncio.create_task(run_asgi(app, request()))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app.states()["*"].in_flight == 0
    assert inner.inside == 0


async def test_the_slot_is_released_when_the_response_completes_not_after_background_work() -> None:
    background = asyncio.Event()

    async def with_background_task(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"a", "more_body": True})
        await send({"type": "http.response.body", "body": b"b"})
        await background.wait()  # Starlette runs background tasks here, after the response

    app = ConcurrencyLimitMiddleware(with_background_task, policy=ConcurrencyPolicy(max_concurrent=1))
    first = asyncio.create_task(run_asgi(app, request()))
    await settle()
    assert app.states()["*"].in_flight == 0
    second = asyncio.create_task(run_asgi(app, request()))
    await settle()
    background.set()
    assert [(await t).body for t in (first, second)] == [b"ab", b"ab"]


async def test_a_client_disconnect_releases_the_slot() -> None:
    async def reads_until_disconnect(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    app = ConcurrencyLimitMiddleware(reads_until_disconnect, policy=ConcurrencyPolicy(max_concurrent=1))
    recorded = await run_asgi(app, request())
    assert recorded.messages == []
    assert app.states()["*"].in_flight == 0


async def test_adaptive_limit_shrinks_under_latency_and_recovers(manual_clock: ManualClock) -> None:
    inner = Held(manual_clock)
    inner.gate.set()
    adaptive = AdaptiveLimit(min_limit=2, max_limit=40, tolerance=1.5, smoothing=0.2)
    policy = ConcurrencyPolicy(max_concurrent=20, adaptive=adaptive)
    app = ConcurrencyLimitMiddleware(inner, policy=policy, clock=manual_clock)

    async def phase(latency: float, requests: int) -> int:
        inner.latency = latency
        for _ in range(requests):
            assert (await run_asgi(app, request())).status == 200
        return app.states()["*"].limit

    healthy = await phase(0.010, 50)
    assert healthy == 40  # at the baseline latency the limit climbs to its maximum
    degraded = await phase(0.100, 40)
    assert degraded <= 8
    floor = await phase(0.400, 60)
    assert floor <= degraded
    assert floor >= 2
    recovered = await phase(0.010, 200)
    assert recovered == 40
    snapshot = app.states()["*"]
    assert snapshot.recent_latency == pytest.approx(0.010, rel=0.05)
    assert snapshot.baseline_latency is not None and snapshot.baseline_latency > 0.010


async def test_a_shrunken_adaptive_limit_sheds(manual_clock: ManualClock) -> None:
    inner = Held(manual_clock)
    inner.gate.set()
    adaptive = AdaptiveLimit(min_limit=1, max_limit=10, smoothing=1.0)
    app = ConcurrencyLimitMiddleware(
        inner, policy=ConcurrencyPolicy(max_concurrent=10, adaptive=adaptive), clock=manual_clock
    )
    inner.latency = 0.01
    await run_asgi(app, request())
    inner.latency = 1.0
    for _ in range(30):
        await run_asgi(app, request())
    limit = app.states()["*"].limit
    assert limit < 10
    inner.gate.clear()
    tasks = [asyncio.create_task(run_asgi(app, request())) for _ in range(10)]
    await settle()
    assert sum(t.done() for t in tasks) == 10 - limit
    inner.gate.set()
    await asyncio.gather(*tasks)


async def test_local_responses_are_not_latency_samples(manual_clock: ManualClock) -> None:
    from nexus_middleware import Problem, send_problem

    async def refuses(scope: Scope, receive: Receive, send: Send) -> None:
        manual_clock.advance(5)
        await send_problem(scope, send, Problem(401, "no"), layer="auth")

    adaptive = AdaptiveLimit(min_limit=1, max_limit=10)
    app = ConcurrencyLimitMiddleware(
        refuses, policy=ConcurrencyPolicy(max_concurrent=5, adaptive=adaptive), clock=manual_clock
    )
    await run_asgi(app, request())
    assert app.states()["*"].baseline_latency is None


async def test_limits_per_tenant_and_per_route() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(
        inner,
        key="tenant",
        policy=ConcurrencyPolicy(max_concurrent=1),
        routes=[("/health", None, None)],
    )
    scopes = []
    for tenant in ("acme", "acme", "globex", None):
        scope = request()
        if tenant is not None:
            publish_principal(scope, Principal("u", method="jwt", tenant=tenant))
        scopes.append(scope)
    tasks = [asyncio.create_task(run_asgi(app, scope)) for scope in scopes]
    await settle()
    assert inner.entered == 3  # one per tenant, and one for requests without a tenant
    assert set(app.states()) == {"acme", "globex", "-"}
    health = asyncio.create_task(run_asgi(app, request(path="/health")))  # unlimited
    await settle()
    assert inner.entered == 4
    inner.gate.set()
    results = await asyncio.gather(*tasks, health)
    assert [r.status for r in results] == [200, 503, 200, 200, 200]


async def test_host_entries_get_their_own_policy_and_bulkhead() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(
        inner,
        policy=None,
        routes=[
            ("/api", None, ConcurrencyPolicy(max_concurrent=1), "internal.example.com"),
            ("/api", None, ConcurrencyPolicy(max_concurrent=4, classes=TIERS, default_class="normal")),
        ],
        route_classes=[("/api", None, "low", "batch.example.com")],
    )

    def at(host: str) -> Scope:
        return make_scope("/api", headers=[("host", host)])

    internal = [asyncio.create_task(run_asgi(app, at("Internal.example.com:443"))) for _ in range(2)]
    public = [asyncio.create_task(run_asgi(app, at("public.example.com"))) for _ in range(2)]
    await settle()
    assert inner.entered == 3  # one internal (its own limit of 1), two public (the host-less policy)
    assert set(app.states()) == {"internal.example.com/api", "/api"}
    assert app.states()["internal.example.com/api"].limit == 1
    batch = at("batch.example.com")
    assert (await run_asgi(app, batch)).status == 503  # "low" may use 2 of the 4 slots: its host's class
    decision = get_context(batch).decision("concurrency")
    assert decision is not None and dict(decision.details) == {"key": "/api", "priority": "low"}
    inner.gate.set()
    results = await asyncio.gather(*internal, *public)
    assert [r.status for r in results] == [200, 503, 200, 200]


async def test_key_policies_give_a_tenant_its_own_limit() -> None:
    inner = Held()
    app = ConcurrencyLimitMiddleware(
        inner,
        key="tenant",
        policy=ConcurrencyPolicy(max_concurrent=1),
        key_policies={"acme": ConcurrencyPolicy(max_concurrent=3), "internal": None},
    )
    scopes = []
    for tenant in ["acme"] * 4 + ["globex"] * 2 + ["internal"] * 5:
        scope = request()
        publish_principal(scope, Principal("u", method="jwt", tenant=tenant))
        scopes.append(scope)
    tasks = [asyncio.create_task(run_asgi(app, scope)) for scope in scopes]
    await settle()
    assert inner.entered == 3 + 1 + 5
    assert {k: v.limit for k, v in app.states().items()} == {"acme": 3, "globex": 1}
    inner.gate.set()
    await asyncio.gather(*tasks)


async def test_idle_bulkheads_are_forgotten_beyond_max_keys() -> None:
    async def by_path(scope: Scope) -> str:
        return str(scope["path"])

    app = ConcurrencyLimitMiddleware(ok_app, key=by_path, max_keys=2)
    for path in ("/a", "/b", "/c"):
        await run_asgi(app, request(path=path))
    assert list(app.states()) == ["/b", "/c"]


async def test_busy_bulkheads_are_kept_beyond_max_keys() -> None:
    inner = Held()

    async def by_path(scope: Scope) -> str:
        return str(scope["path"])

    app = ConcurrencyLimitMiddleware(inner, key=by_path, max_keys=1)
    busy = asyncio.create_task(run_asgi(app, request(path="/busy")))
    await settle()
    also_busy = asyncio.create_task(run_asgi(app, request(path="/also-busy")))
    await settle()
    assert list(app.states()) == ["/busy", "/also-busy"]  # neither holds a slot it could lose
    inner.gate.set()
    await asyncio.gather(busy, also_busy)


async def test_websocket_handshakes_count_while_pending_and_lifespan_passes() -> None:
    inner = Held()

    async def ws(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            await inner.gate.wait()
            await send({"type": "websocket.close", "code": 1000})
            return
        await inner(scope, receive, send)

    app = ConcurrencyLimitMiddleware(ws, policy=ConcurrencyPolicy(max_concurrent=1))
    session = asyncio.create_task(run_asgi(app, make_scope("/ws", scope_type="websocket")))
    await settle()
    assert app.states()["*"].in_flight == 0  # an accepted socket does not hold a request slot
    held = asyncio.create_task(run_asgi(app, request()))
    await settle()
    refused = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert refused.messages[0]["type"] == "websocket.close"
    assert refused.messages[0]["code"] == 1013
    inner.gate.set()
    await asyncio.gather(session, held)
    lifespan = await run_asgi(ConcurrencyLimitMiddleware(ok_app), make_scope(scope_type="lifespan"))
    assert [m["type"] for m in lifespan.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]


async def test_an_invalid_path_is_a_400_problem() -> None:
    app = ConcurrencyLimitMiddleware(ok_app, routes=[("/a", None, ConcurrencyPolicy())])
    assert (await run_asgi(app, make_scope("/a", raw_path=b"/a%00"))).status == 400


async def test_an_invalid_path_only_classified_by_route_gets_the_default_class() -> None:
    app = ConcurrencyLimitMiddleware(ok_app, route_classes=[("/a", None, "default")])
    scope = make_scope("/a", raw_path=b"/a%00")
    assert (await run_asgi(app, scope)).status == 200  # the router behind answers for the path
    assert get_context(scope).decision("concurrency").details["priority"] == "default"  # type: ignore[union-attr]


async def test_fastapi_integration() -> None:
    from fastapi import FastAPI

    api = FastAPI()
    gate = asyncio.Event()

    @api.get("/slow")
    async def slow() -> dict[str, str]:
        await gate.wait()
        return {"ok": "yes"}

    api.add_middleware(ConcurrencyLimitMiddleware, policy=ConcurrencyPolicy(max_concurrent=2))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://t") as client:
        tasks = [asyncio.create_task(client.get("/slow")) for _ in range(6)]
        await asyncio.sleep(0.01)
        gate.set()
        responses = await asyncio.gather(*tasks)
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503, 503]


@pytest.mark.parametrize(
    "options",
    [
        {"max_concurrent": 0},
        {"queue_size": -1},
        {"queue_timeout": 0},
        {"retry_after": 0},
        {"classes": ()},
        {"classes": (PriorityClass("a"), PriorityClass("a"))},
        {"classes": (PriorityClass("a", 0.5), PriorityClass("default", 1.0))},
        {"default_class": "missing"},
        {"max_concurrent": 50, "adaptive": AdaptiveLimit(max_limit=10)},
    ],
)
def test_policy_validation(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ConcurrencyPolicy(**options)


@pytest.mark.parametrize(
    ("factory", "options"),
    [
        (PriorityClass, {"name": ""}),
        (PriorityClass, {"name": "x", "share": 0}),
        (AdaptiveLimit, {"min_limit": 0}),
        (AdaptiveLimit, {"min_limit": 5, "max_limit": 4}),
        (AdaptiveLimit, {"tolerance": 0.5}),
        (AdaptiveLimit, {"smoothing": 0}),
        (AdaptiveLimit, {"baseline_samples": 0}),
        (ConcurrencyLimitMiddleware, {"app": ok_app, "policy": 10}),
        (ConcurrencyLimitMiddleware, {"app": ok_app, "max_keys": 0}),
        (ConcurrencyLimitMiddleware, {"app": ok_app, "classify": "header"}),
    ],
)
def test_option_validation(factory: Any, options: dict[str, Any]) -> None:
    app = options.pop("app", None)
    with pytest.raises(ConfigurationError):
        factory(app, **options) if app is not None else factory(**options)


def test_reprs() -> None:
    assert repr(ConcurrencyLimitMiddleware(ok_app)) == "ConcurrencyLimitMiddleware(keys=0)"
    assert "max_concurrent=100" in repr(ConcurrencyPolicy())
    assert repr(PriorityClass("low", 0.5)) == "PriorityClass(name='low', share=0.5)"


async def test_end_to_end_through_uvicorn() -> None:
    from tests.support.servers import serve

    inner = Held()
    app = ConcurrencyLimitMiddleware(inner, policy=ConcurrencyPolicy(max_concurrent=2, retry_after=2))
    async with serve(app, lifespan="off") as url, httpx.AsyncClient(base_url=url) as client:
        tasks = [asyncio.create_task(client.get("/work")) for _ in range(6)]
        for _ in range(200):
            if sum(t.done() for t in tasks) == 4:
                break
            await asyncio.sleep(0.005)
        assert inner.entered == 2
        inner.gate.set()
        responses = await asyncio.gather(*tasks)
    assert sorted(r.status_code for r in responses) == [200, 200, 503, 503, 503, 503]
    assert {r.headers.get("retry-after") for r in responses if r.status_code == 503} == {"2"}
    assert app.states()["*"].in_flight == 0
