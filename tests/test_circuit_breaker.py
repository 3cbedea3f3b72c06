"""CircuitBreakerMiddleware: pybreaker's state machine driven by awaited outcomes, on an injected clock."""

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import httpx
import pybreaker
import pytest

from nexus_middleware import (
    BreakerEvent,
    BreakerPolicy,
    BreakerStates,
    CircuitBreakerMiddleware,
    ConfigurationError,
    ManualClock,
    Problem,
    RedisBreakerSync,
    StaticResponse,
    get_context,
    send_problem,
)
from nexus_middleware.circuit_breaker import SharedBreakerState
from nexus_middleware.types import Receive, Scope, Send
from tests.support.asgi import make_scope, ok_app, run_asgi

REDUCED = "https://iana.org/assignments/http-problem-types#temporary-reduced-capacity"


class Upstream:
    """An inner app whose behaviour the test sets: `status`, `error`, `latency` (clock), `gate`, `local`."""

    def __init__(self, clock: ManualClock) -> None:
        self.clock = clock
        self.calls = 0
        self.status = 200
        self.error: BaseException | None = None
        self.latency = 0.0
        self.gate: asyncio.Event | None = None
        self.local: str | None = None  # a layer name: answer with a local problem

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.calls += 1
        await asyncio.sleep(0)  # the failure below happens after an await, as in any real async app
        if self.gate is not None:
            await self.gate.wait()
        self.clock.advance(self.latency)
        if self.error is not None:
            raise self.error
        if self.local is not None:
            await send_problem(scope, send, Problem(self.status, "local refusal"), layer=self.local)
            return
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": b"upstream"})


def consecutive(threshold: int = 3, **options: Any) -> BreakerPolicy:
    return BreakerPolicy(failure_threshold=threshold, failure_ratio=None, **options)


async def call(app: Any, path: str = "/api") -> Any:
    return await run_asgi(app, make_scope(path))


async def fail_with_errors(app: Any, count: int) -> None:
    for _ in range(count):
        with pytest.raises(RuntimeError, match="upstream down"):
            await call(app)


def assert_fail_fast(recorded: Any, retry_after: str) -> None:
    assert recorded.status == 503
    assert recorded.header("content-type") == "application/problem+json"
    assert recorded.header("retry-after") == retry_after
    assert recorded.json()["type"] == REDUCED


async def test_awaited_failures_trip_then_fail_fast_then_trials_close_it(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    events: list[BreakerEvent] = []

    async def on_event(event: BreakerEvent) -> None:
        events.append(event)

    policy = consecutive(3, reset_timeout=10, half_open_max_calls=2, success_threshold=2)
    app = CircuitBreakerMiddleware(upstream, policy=policy, clock=manual_clock, on_event=on_event)

    upstream.error = RuntimeError("upstream down")
    await fail_with_errors(app, 2)
    assert app.states()["*"].state == "closed"
    assert app.states()["*"].consecutive_failures == 2
    await fail_with_errors(app, 1)
    assert app.states()["*"].state == "open"
    assert [(e.previous, e.state, e.reason) for e in events] == [("closed", "open", "consecutive_failures")]

    calls = upstream.calls
    for _ in range(5):
        assert_fail_fast(await call(app), "10")
    manual_clock.advance(4)
    refused = await call(app)
    assert_fail_fast(refused, "6")
    assert upstream.calls == calls  # zero calls while open
    assert app.states()["*"].retry_after == pytest.approx(6)

    manual_clock.advance(6)
    upstream.error = None
    upstream.gate = asyncio.Event()
    trials = [asyncio.create_task(call(app)) for _ in range(5)]
    for _ in range(5):
        await asyncio.sleep(0)
    done = [t for t in trials if t.done()]
    assert upstream.calls == calls + 2  # exactly the configured trials reach the app
    assert len(done) == 3
    for task in done:
        assert_fail_fast(task.result(), "1")
    assert app.states()["*"].state == "half-open"
    assert app.states()["*"].trials_in_flight == 2
    upstream.gate.set()
    results = await asyncio.gather(*trials)
    assert sorted(r.status for r in results) == [200, 200, 503, 503, 503]
    assert app.states()["*"].state == "closed"
    assert [e.reason for e in events] == ["consecutive_failures", "reset_timeout", "trials_succeeded"]
    upstream.gate = None
    assert (await call(app)).status == 200


async def test_a_failed_trial_reopens_for_another_reset_timeout(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 502
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(2, reset_timeout=5), clock=manual_clock)
    assert [(await call(app)).status for _ in range(2)] == [502, 502]
    manual_clock.advance(5)
    assert (await call(app)).status == 502  # the trial reached the app and failed
    snapshot = app.states()["*"]
    assert snapshot.state == "open"
    assert snapshot.retry_after == pytest.approx(5)
    assert snapshot.open_until == pytest.approx(manual_clock.time() + 5)
    assert_fail_fast(await call(app), "5")
    assert upstream.calls == 3


async def test_success_below_the_threshold_keeps_it_half_open(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    policy = consecutive(1, reset_timeout=1, success_threshold=3)
    app = CircuitBreakerMiddleware(upstream, policy=policy, clock=manual_clock)
    await call(app)
    manual_clock.advance(1)
    upstream.status = 200
    for expected_successes in (1, 2):
        assert (await call(app)).status == 200
        assert app.states()["*"].state == "half-open"
        assert app.states()["*"].trial_successes == expected_successes
    assert (await call(app)).status == 200
    assert app.states()["*"].state == "closed"


async def test_the_error_ratio_trips_over_the_window_with_a_minimum_count(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    events: list[BreakerEvent] = []

    async def on_event(event: BreakerEvent) -> None:
        events.append(event)

    policy = BreakerPolicy(failure_threshold=None, failure_ratio=0.5, minimum_requests=10, window=10)
    app = CircuitBreakerMiddleware(upstream, policy=policy, clock=manual_clock, on_event=on_event)
    # Alternating outcomes never make three consecutive failures; the ratio is what trips.
    for index in range(9):
        upstream.status = 500 if index % 2 else 200
        await call(app)
    snapshot = app.states()["*"]
    assert (snapshot.state, snapshot.window_requests, snapshot.window_failures) == ("closed", 9, 4)
    upstream.status = 500
    await call(app)  # 5 failures of 10
    assert app.states()["*"].state == "open"
    assert events[-1].reason == "error_ratio"


async def test_failures_older_than_the_window_do_not_count(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    policy = BreakerPolicy(failure_threshold=None, failure_ratio=0.5, minimum_requests=5, window=10)
    app = CircuitBreakerMiddleware(upstream, policy=policy, clock=manual_clock)
    for _ in range(4):
        await call(app)
    manual_clock.advance(11)
    await call(app)
    assert app.states()["*"].state == "closed"
    assert app.states()["*"].window_requests == 1


@pytest.mark.parametrize(
    ("status", "layer"), [(429, "ratelimit"), (401, "auth"), (403, "rbac"), (413, "body")]
)
async def test_local_refusals_never_count(manual_clock: ManualClock, status: int, layer: str) -> None:
    upstream = Upstream(manual_clock)
    upstream.status, upstream.local = status, layer
    app = CircuitBreakerMiddleware(
        upstream, policy=consecutive(1, failure_statuses=frozenset({status, 500})), clock=manual_clock
    )
    for _ in range(5):
        assert (await call(app)).status == status
    assert app.states()["*"].state == "closed"
    assert app.states()["*"].consecutive_failures == 0


async def test_a_local_response_is_no_trial_success(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1, reset_timeout=1), clock=manual_clock)
    await call(app)
    manual_clock.advance(1)
    upstream.status, upstream.local = 401, "auth"
    assert (await call(app)).status == 401
    assert app.states()["*"].state == "half-open"  # an unauthenticated trial proves nothing
    upstream.local = None
    upstream.status = 200
    assert (await call(app)).status == 200
    assert app.states()["*"].state == "closed"


@pytest.mark.parametrize(
    ("status", "counted"),
    [
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (599, True),
        (501, False),
        (404, False),
        (200, False),
    ],
)
async def test_default_failure_statuses(manual_clock: ManualClock, status: int, counted: bool) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = status
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), clock=manual_clock)
    await call(app)
    assert app.states()["*"].state == ("open" if counted else "closed")


async def test_an_upstream_problem_sent_with_layer_none_counts(manual_clock: ManualClock) -> None:
    async def proxy(scope: Scope, receive: Receive, send: Send) -> None:
        await send_problem(scope, send, Problem(502, "upstream refused"), layer=None)

    app = CircuitBreakerMiddleware(proxy, policy=consecutive(1), clock=manual_clock)
    assert (await call(app)).status == 502
    assert app.states()["*"].state == "open"


@pytest.mark.parametrize(("latency", "opens"), [(0.5, False), (1.0, False), (1.5, True)])
async def test_slow_responses_count_as_failures(
    manual_clock: ManualClock, latency: float, opens: bool
) -> None:
    upstream = Upstream(manual_clock)
    upstream.latency = latency
    policy = consecutive(1, slow_call_threshold=1.0)
    app = CircuitBreakerMiddleware(upstream, policy=policy, clock=manual_clock)
    assert (await call(app)).status == 200
    assert app.states()["*"].state == ("open" if opens else "closed")


async def test_a_cancelled_call_counts_and_the_cancellation_propagates(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.gate = asyncio.Event()
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), clock=manual_clock)
    task = asyncio.create_task(call(app))
    await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert app.states()["*"].state == "open"
    assert app.states()["*"].in_flight == 0


async def test_an_app_that_returns_without_answering_fails(manual_clock: ManualClock) -> None:
    async def silent(scope: Scope, receive: Receive, send: Send) -> None:
        return None

    app = CircuitBreakerMiddleware(silent, policy=consecutive(1), clock=manual_clock)
    assert (await call(app)).messages == []
    assert app.states()["*"].state == "open"


async def test_pybreaker_decorating_an_async_def_never_counts_which_is_why_outcomes_are_reported() -> None:
    breaker = pybreaker.CircuitBreaker(fail_max=1)

    @breaker
    async def failing() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("boom")

    for _ in range(3):
        with pytest.raises(RuntimeError):
            await failing()
    assert breaker.current_state == "closed"  # pybreaker issue #7


async def test_static_fallback_while_open(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    fallback = StaticResponse(status=200, body=b'{"items":[]}', headers=[("x-fallback", "1")])
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), fallback=fallback, clock=manual_clock)
    await call(app)
    scope = make_scope("/api")
    recorded = await run_asgi(app, scope)
    assert (recorded.status, recorded.body, recorded.header("x-fallback")) == (200, b'{"items":[]}', "1")
    context = get_context(scope)
    assert context.local_response == "breaker"
    assert context.decision("breaker") is not None
    assert context.decision("breaker").outcome == "reject"  # type: ignore[union-attr]
    assert upstream.calls == 1


async def test_an_asgi_app_fallback_sees_the_request(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.error = RuntimeError("upstream down")

    async def fallback(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": f"cached {scope['path']}".encode()})

    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), fallback=fallback, clock=manual_clock)
    await fail_with_errors(app, 1)
    assert (await call(app, "/api")).body == b"cached /api"


async def test_breakers_per_route_pattern_and_unprotected_routes(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    app = CircuitBreakerMiddleware(
        upstream,
        policy=None,
        routes=[
            ("/users/{id}", None, consecutive(2)),
            ("/health", None, None),
            ("/orders/*", None, consecutive(1)),
        ],
        clock=manual_clock,
    )
    await call(app, "/users/1")
    await call(app, "/users/2")
    await call(app, "/orders/9/items")
    for _ in range(3):
        assert (await call(app, "/health")).status == 500  # unprotected
        assert (await call(app, "/other")).status == 500  # no default policy
    states = app.states()
    assert set(states) == {"/users/{id}", "/orders/*"}
    assert states["/users/{id}"].state == "open"
    assert states["/orders/*"].state == "open"


async def test_a_global_breaker_spans_every_route(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    app = CircuitBreakerMiddleware(
        upstream,
        key="global",
        policy=None,
        routes=[("/a", None, consecutive(2)), ("/b", None, consecutive(2))],
        clock=manual_clock,
    )
    await call(app, "/a")
    await call(app, "/b")
    assert list(app.states()) == ["*"]
    assert (await call(app, "/a")).status == 503


async def test_breakers_keyed_by_an_async_callable_are_bounded(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)

    async def by_tenant(scope: Scope) -> str | None:
        return dict(scope["headers"]).get(b"x-tenant", b"").decode() or None

    app = CircuitBreakerMiddleware(upstream, key=by_tenant, max_breakers=2, clock=manual_clock)
    for tenant in ("a", "b", "c"):
        await run_asgi(app, make_scope("/", headers=[("x-tenant", tenant)]))
    await run_asgi(app, make_scope("/"))  # no key: unprotected
    assert list(app.states()) == ["b", "c"]


async def test_eviction_prefers_idle_closed_breakers(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500

    async def by_header(scope: Scope) -> str | None:
        return dict(scope["headers"])[b"x-key"].decode()

    app = CircuitBreakerMiddleware(
        upstream, key=by_header, policy=consecutive(1), max_breakers=2, clock=manual_clock
    )
    await run_asgi(app, make_scope("/", headers=[("x-key", "open-one")]))
    upstream.status = 200
    await run_asgi(app, make_scope("/", headers=[("x-key", "closed-one")]))
    await run_asgi(app, make_scope("/", headers=[("x-key", "new")]))
    assert set(app.states()) == {"open-one", "new"}
    upstream.status = 500
    await run_asgi(app, make_scope("/", headers=[("x-key", "new")]))
    # Both breakers are open now: with no idle one left, the least recently used goes.
    await run_asgi(app, make_scope("/", headers=[("x-key", "third")]))
    assert list(app.states()) == ["new", "third"]


async def test_upstream_key_reads_the_service_from_the_context(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 503

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).extras["proxy.service"] = dict(scope["headers"])[b"x-service"].decode()
        await breaker(scope, receive, send)

    breaker = CircuitBreakerMiddleware(upstream, key="upstream", policy=consecutive(1), clock=manual_clock)
    await run_asgi(router, make_scope("/", headers=[("x-service", "billing")]))
    assert (await run_asgi(router, make_scope("/", headers=[("x-service", "billing")]))).status == 503
    assert (await run_asgi(router, make_scope("/", headers=[("x-service", "users")]))).status == 503
    assert {k: v.state for k, v in breaker.states().items()} == {"billing": "open", "users": "open"}
    assert upstream.calls == 2
    assert (await run_asgi(breaker, make_scope("/"))).status == 503  # no service named: unprotected
    assert upstream.calls == 3


async def test_per_upstream_policies_for_a_gateway(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 503

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).extras["proxy.service"] = scope["path"].strip("/")
        await breaker(scope, receive, send)

    breaker = CircuitBreakerMiddleware(
        upstream,
        key="upstream",
        policy=None,  # only the upstreams configured below are protected
        key_policies={"billing": consecutive(1), "search": consecutive(3), "legacy": None},
        clock=manual_clock,
    )
    for path in ("/billing", "/search", "/legacy", "/other"):
        await run_asgi(router, make_scope(path))
    assert {k: v.state for k, v in breaker.states().items()} == {"billing": "open", "search": "closed"}
    assert (await run_asgi(router, make_scope("/billing"))).status == 503
    assert upstream.calls == 4


async def test_shared_states_keep_unchanged_breakers_across_a_replacement(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 503
    shared = BreakerStates()
    current: list[CircuitBreakerMiddleware] = []

    async def router(scope: Scope, receive: Receive, send: Send) -> None:
        get_context(scope).extras["proxy.service"] = scope["path"].strip("/")
        await current[-1](scope, receive, send)

    def build(search: BreakerPolicy) -> CircuitBreakerMiddleware:
        policies = {"billing": consecutive(1), "search": search}
        return CircuitBreakerMiddleware(
            upstream, key="upstream", policy=None, key_policies=policies, shared=shared, clock=manual_clock
        )

    current.append(build(consecutive(1)))
    for path in ("/billing", "/search"):
        await run_asgi(router, make_scope(path))
    current.append(build(consecutive(5)))  # equal policy for billing (a new object), another for search
    assert {k: v.state for k, v in current[-1].states().items()} == {"billing": "open"}
    assert (await run_asgi(router, make_scope("/billing"))).status == 503
    assert upstream.calls == 2  # the inherited open breaker refused without calling
    for _ in range(4):
        await run_asgi(router, make_scope("/search"))
    assert current[-1].states()["search"].state == "closed"  # four failures under the new threshold of 5


async def test_route_keyed_breakers_are_compared_on_their_next_request(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    shared = BreakerStates()

    def build(orders: BreakerPolicy) -> CircuitBreakerMiddleware:
        routes = [("/users/*", None, consecutive(1)), ("/orders/*", None, orders)]
        return CircuitBreakerMiddleware(
            upstream, policy=None, routes=routes, shared=shared, clock=manual_clock
        )

    old = build(consecutive(1))
    await call(old, "/users/1")
    await call(old, "/orders/1")
    new = build(consecutive(3))  # the route decides the policy: nothing is forgotten before a request
    assert {k: v.state for k, v in new.states().items()} == {"/users/*": "open", "/orders/*": "open"}
    assert (await call(new, "/users/2")).status == 503  # unchanged: still open
    assert (await call(new, "/orders/2")).status == 500  # changed: a new breaker under the new policy
    assert new.states()["/orders/*"].state == "closed"


async def test_a_replaced_middleware_never_resets_the_newer_ones_breaker(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 503
    shared = BreakerStates()
    old = CircuitBreakerMiddleware(
        upstream, key="global", policy=consecutive(5), shared=shared, clock=manual_clock
    )
    new = CircuitBreakerMiddleware(
        upstream, key="global", policy=consecutive(1), shared=shared, clock=manual_clock
    )
    await call(new)
    assert new.states()["*"].state == "open"
    assert (await call(old)).status == 503  # a request still on the old stack: its own breaker, counted apart
    assert new.states()["*"].state == "open" and upstream.calls == 2


async def test_decisions_record_allow_trial_and_reject(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1, reset_timeout=1), clock=manual_clock)
    outcomes = []
    for advance in (0, 0, 1):
        manual_clock.advance(advance)
        scope = make_scope("/")
        await run_asgi(app, scope)
        decision = get_context(scope).decision("breaker")
        assert decision is not None
        outcomes.append((decision.outcome, decision.details["key"], decision.details["state"]))
    assert outcomes == [("allow", "*", "closed"), ("reject", "*", "open"), ("trial", "*", "half-open")]


async def test_websocket_handshakes_are_refused_while_open(manual_clock: ManualClock) -> None:
    calls = 0

    async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
        nonlocal calls
        calls += 1
        await receive()
        await send({"type": "websocket.close", "code": 1011})

    app = CircuitBreakerMiddleware(ws_app, policy=consecutive(1), clock=manual_clock)
    await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert app.states()["*"].state == "open"  # a 1011 close before accept is a server failure
    refused = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert refused.messages == [
        {"type": "websocket.close", "code": 1013, "reason": refused.messages[0]["reason"]}
    ]
    denial = await run_asgi(
        app, make_scope("/ws", scope_type="websocket", extensions={"websocket.http.response": {}})
    )
    assert denial.messages[0]["type"] == "websocket.http.response.start"
    assert denial.messages[0]["status"] == 503
    assert calls == 1


async def test_an_accepted_websocket_is_a_success(manual_clock: ManualClock) -> None:
    app = CircuitBreakerMiddleware(ok_app, policy=consecutive(1), clock=manual_clock)
    recorded = await run_asgi(app, make_scope("/ws", scope_type="websocket"))
    assert recorded.messages[0] == {"type": "websocket.accept"}
    assert app.states()["*"].state == "closed"


async def test_lifespan_passes_through(manual_clock: ManualClock) -> None:
    app = CircuitBreakerMiddleware(ok_app, clock=manual_clock)
    recorded = await run_asgi(app, make_scope(scope_type="lifespan"))
    assert [m["type"] for m in recorded.messages] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert app.states() == {}


async def test_an_invalid_path_is_a_400_problem(manual_clock: ManualClock) -> None:
    app = CircuitBreakerMiddleware(ok_app, routes=[("/a", None, consecutive())], clock=manual_clock)
    recorded = await run_asgi(app, make_scope("/a", raw_path=b"/a%00b"))
    assert recorded.status == 400
    assert recorded.header("content-type") == "application/problem+json"


async def test_reset_and_force_open_for_operators(manual_clock: ManualClock) -> None:
    upstream = Upstream(manual_clock)
    events: list[BreakerEvent] = []

    async def on_event(event: BreakerEvent) -> None:
        events.append(event)

    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), clock=manual_clock, on_event=on_event)
    assert not await app.reset("*")
    assert not await app.force_open("*")
    await call(app)
    assert await app.force_open("*", duration=120)
    assert_fail_fast(await call(app), "120")
    assert await app.reset("*")
    assert (await call(app)).status == 200
    assert [(e.state, e.reason) for e in events] == [("open", "manual"), ("closed", "manual")]


async def test_a_failing_event_hook_is_logged_not_raised(
    manual_clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    upstream = Upstream(manual_clock)
    upstream.status = 500

    async def on_event(event: BreakerEvent) -> None:
        raise ValueError("metrics backend down")

    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), clock=manual_clock, on_event=on_event)
    with caplog.at_level(logging.ERROR, logger="nexus_middleware.circuit_breaker"):
        assert (await call(app)).status == 500
    assert "on_event hook failed" in caplog.text


@pytest.mark.parametrize(
    "options",
    [
        {"failure_threshold": None, "failure_ratio": None},
        {"failure_threshold": 0},
        {"failure_ratio": 0.0},
        {"failure_ratio": 1.5},
        {"minimum_requests": 0},
        {"window": 0},
        {"reset_timeout": -1},
        {"half_open_max_calls": 0},
        {"success_threshold": 0},
        {"failure_statuses": frozenset({42})},
        {"slow_call_threshold": 0},
    ],
)
def test_policy_validation(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        BreakerPolicy(**options)


@pytest.mark.parametrize(
    "options",
    [
        {"policy": "strict"},
        {"key_policies": {"a": 5}},
        {"routes": [("/a", None, 3)]},
        {"max_breakers": 0},
        {"fallback": "503"},
        {"key": "ip"},
        {"key": 42},
    ],
)
def test_middleware_validation(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        CircuitBreakerMiddleware(ok_app, **options)


def test_reprs_are_readable() -> None:
    policy = BreakerPolicy(failure_statuses=frozenset({500, 502, 503, 504, 429}))
    assert repr(policy) == (
        "BreakerPolicy(failure_threshold=5, failure_ratio=0.5, minimum_requests=20, window=10.0, "
        "reset_timeout=30.0, half_open_max_calls=1, success_threshold=1, "
        "failure_statuses='429,500,502-504', slow_call_threshold=None)"
    )
    assert "500,502-599" in repr(BreakerPolicy())
    assert repr(StaticResponse(status=200, body=b"{}")) == "StaticResponse(status=200, body=b'{}')"
    assert repr(CircuitBreakerMiddleware(ok_app)) == "CircuitBreakerMiddleware(breakers=0, sync=None)"


# --- shared state through real Redis ---------------------------------------------------------------------


def two_instances(
    clock: ManualClock, sync_a: Any, sync_b: Any, policy: BreakerPolicy
) -> tuple[Upstream, CircuitBreakerMiddleware, Upstream, CircuitBreakerMiddleware]:
    upstream_a, upstream_b = Upstream(clock), Upstream(clock)
    a = CircuitBreakerMiddleware(upstream_a, policy=policy, sync=sync_a, clock=clock)
    b = CircuitBreakerMiddleware(upstream_b, policy=policy, sync=sync_b, clock=clock)
    return upstream_a, a, upstream_b, b


async def test_redis_shares_an_open_breaker_across_instances(
    manual_clock: ManualClock, redis_client: Any, redis_prefix: str
) -> None:
    sync = RedisBreakerSync(redis_client, prefix=redis_prefix, staleness=0)
    upstream_a, a, upstream_b, b = two_instances(manual_clock, sync, sync, consecutive(2, reset_timeout=30))
    assert (await call(b)).status == 200
    upstream_a.status = 503
    await call(a)
    await call(a)
    assert a.states()["*"].state == "open"
    stored = await redis_client.get(redis_prefix + "*")
    assert b'"state": "open"' in stored

    manual_clock.advance(10)
    refused = await call(b)
    assert_fail_fast(refused, "20")  # the open-until time travels, not just the state
    assert upstream_b.calls == 1
    assert b.states()["*"].state == "open"

    assert await a.reset("*")
    assert (await call(b)).status == 200  # the close travels too
    assert b.states()["*"].state == "closed"


async def test_redis_reads_are_bounded_by_staleness(
    manual_clock: ManualClock, redis_client: Any, redis_prefix: str
) -> None:
    sync_a = RedisBreakerSync(redis_client, prefix=redis_prefix, staleness=0)
    sync_b = RedisBreakerSync(redis_client, prefix=redis_prefix, staleness=5)
    upstream_a, a, upstream_b, b = two_instances(
        manual_clock, sync_a, sync_b, consecutive(1, reset_timeout=60)
    )
    assert (await call(b)).status == 200  # b read the (empty) shared state now
    upstream_a.status = 500
    await call(a)
    assert (await call(b)).status == 200  # within its staleness b still uses its local view
    manual_clock.advance(5)
    assert (await call(b)).status == 503
    assert upstream_b.calls == 2


async def test_records_older_than_the_local_state_are_ignored(
    manual_clock: ManualClock, redis_client: Any, redis_prefix: str
) -> None:
    sync = RedisBreakerSync(redis_client, prefix=redis_prefix, staleness=0)
    await sync.publish("*", SharedBreakerState("open", manual_clock.time() - 100, manual_clock.time() - 50))
    upstream = Upstream(manual_clock)
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), sync=sync, clock=manual_clock)
    assert (await call(app)).status == 200  # an expired open record does not open it
    await redis_client.set(redis_prefix + "*", b"not json")
    with pytest.raises(Exception, match="malformed"):
        await sync.fetch("*")
    assert (await call(app)).status == 200  # a malformed record is logged and ignored


async def test_redis_down_keeps_the_local_breaker_working(
    manual_clock: ManualClock, redis_server_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    from redis.asyncio import Redis

    server = redis_server_factory()
    client = Redis.from_url(server.url)
    server.stop()
    try:
        sync = RedisBreakerSync(client, staleness=0, timeout=0.5)
        upstream = Upstream(manual_clock)
        upstream.status = 500
        app = CircuitBreakerMiddleware(upstream, policy=consecutive(1), sync=sync, clock=manual_clock)
        with caplog.at_level(logging.WARNING, logger="nexus_middleware.circuit_breaker"):
            assert (await call(app)).status == 500
            assert_fail_fast(await call(app), "30")
        assert "shared state unavailable" in caplog.text
        assert "cannot share its state" in caplog.text
    finally:
        await client.aclose()


def test_redis_sync_validation_and_repr(redis_prefix: str) -> None:
    from redis.asyncio import Redis

    client = Redis()
    with pytest.raises(ConfigurationError):
        RedisBreakerSync(client, timeout=0)
    assert repr(RedisBreakerSync(client, prefix="p:")) == "RedisBreakerSync(prefix='p:', staleness=1.0)"


# --- frameworks and servers --------------------------------------------------------------------------------


async def test_fastapi_route_behind_the_breaker(manual_clock: ManualClock) -> None:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    api = FastAPI()
    calls: list[str] = []

    @api.get("/items/{item_id}")
    async def item(item_id: str) -> JSONResponse:
        calls.append(item_id)
        return JSONResponse({"error": "dependency down"}, status_code=502)

    api.add_middleware(
        CircuitBreakerMiddleware,
        policy=None,
        routes=[("/items/{item_id}", ["GET"], consecutive(2, reset_timeout=15))],
        clock=manual_clock,
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api), base_url="http://test") as client:
        statuses = [(await client.get(f"/items/{n}")).status_code for n in range(4)]
        refused = await client.get("/items/9")
    assert statuses == [502, 502, 503, 503]
    assert calls == ["0", "1"]
    assert refused.headers["retry-after"] == "15"
    assert refused.json()["type"] == REDUCED


async def test_end_to_end_through_uvicorn(manual_clock: ManualClock) -> None:
    from tests.support.servers import serve

    upstream = Upstream(manual_clock)
    upstream.status = 500
    app = CircuitBreakerMiddleware(upstream, policy=consecutive(2), clock=manual_clock)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        statuses: Sequence[int] = [(await client.get("/x")).status_code for _ in range(4)]
        refused = await client.get("/x")
    assert statuses == [500, 500, 503, 503]
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "30"


# --- composition with the other resilience layers ----------------------------------------------------------


@pytest.mark.parametrize("timeout_outside", [True, False])
async def test_an_expired_deadline_counts_wherever_the_timeout_sits(
    manual_clock: ManualClock, timeout_outside: bool
) -> None:
    from nexus_middleware import TimeoutMiddleware

    upstream = Upstream(manual_clock)
    upstream.gate = asyncio.Event()  # never set: the deadline always passes
    if timeout_outside:
        breaker = CircuitBreakerMiddleware(upstream, policy=consecutive(1), clock=manual_clock)
        app: Any = TimeoutMiddleware(breaker, timeout=0.01)
    else:
        app = breaker = CircuitBreakerMiddleware(
            TimeoutMiddleware(upstream, timeout=0.01), policy=consecutive(1), clock=manual_clock
        )
    assert (await call(app)).status == 504
    assert breaker.states()["*"].state == "open"


async def test_a_concurrency_refusal_inside_the_breaker_is_neutral(manual_clock: ManualClock) -> None:
    from nexus_middleware import ConcurrencyLimitMiddleware, ConcurrencyPolicy

    upstream = Upstream(manual_clock)
    upstream.gate = asyncio.Event()
    limited = ConcurrencyLimitMiddleware(upstream, policy=ConcurrencyPolicy(max_concurrent=1))
    app = CircuitBreakerMiddleware(limited, policy=consecutive(1), clock=manual_clock)
    holder = asyncio.create_task(call(app))
    await asyncio.sleep(0.001)
    for _ in range(3):
        assert (await call(app)).status == 503  # shed by the bulkhead
    assert app.states()["*"].state == "closed"
    upstream.gate.set()
    assert (await holder).status == 200
