"""Health: passive outlier detection on a manual clock, active checks against real upstreams on loopback."""

import contextlib
from typing import Any

import httpx
import pytest

from nexus_middleware.clock import ManualClock
from sample_gateway.contracts import AttemptOutcome, Target
from sample_gateway.health import (
    ActiveCheckPolicy,
    ActiveHealthChecker,
    HealthTracker,
    OutlierPolicy,
    ServiceHealth,
)
from tests.support.servers import serve
from tests.support.upstream import UpstreamApp

TARGETS = [Target(id=f"t{i}", url=f"http://127.0.0.1:{9000 + i}") for i in range(4)]


def service(clock: ManualClock, **policy: Any) -> ServiceHealth:
    health = ServiceHealth("svc", outlier=OutlierPolicy(**{"consecutive_failures": 3, **policy}), clock=clock)
    health.sync(TARGETS)
    return health


def fail(
    health: ServiceHealth, target: Target, times: int, outcome: AttemptOutcome = "connect_error"
) -> None:
    for _ in range(times):
        health.attempt_started(target)
        health.attempt_finished(target, outcome=outcome, status=None, latency=0.01)


def ids(targets: tuple[Target, ...]) -> list[str]:
    return [t.id for t in targets]


def test_consecutive_failures_eject_for_a_growing_time(manual_clock: ManualClock) -> None:
    health = service(manual_clock, base_ejection=10, max_ejection=25)
    fail(health, TARGETS[0], 2)
    assert "t0" in ids(health.healthy())
    fail(health, TARGETS[0], 1)
    assert "t0" not in ids(health.healthy())
    manual_clock.advance(9.9)
    assert "t0" not in ids(health.healthy())
    manual_clock.advance(0.2)
    assert "t0" in ids(health.healthy())  # back after 10 s
    fail(health, TARGETS[0], 3)
    manual_clock.advance(19.9)
    assert "t0" not in ids(health.healthy())  # second ejection: 20 s
    manual_clock.advance(0.2)
    fail(health, TARGETS[0], 3)
    manual_clock.advance(24.9)
    assert "t0" not in ids(health.healthy())  # third: capped at 25 s, not 40
    manual_clock.advance(0.2)
    assert "t0" in ids(health.healthy())


def test_a_success_resets_the_failure_count(manual_clock: ManualClock) -> None:
    health = service(manual_clock)
    fail(health, TARGETS[1], 2)
    health.attempt_started(TARGETS[1])
    health.attempt_finished(TARGETS[1], outcome="success", status=200, latency=0.01)
    fail(health, TARGETS[1], 2)
    assert "t1" in ids(health.healthy())


def test_never_more_than_the_max_share_is_ejected(manual_clock: ManualClock) -> None:
    health = service(manual_clock, max_ejected_share=0.5)
    for target in TARGETS:
        fail(health, target, 3)
    assert ids(health.healthy()) == ["t2", "t3"]  # 2 of 4 ejected, the others keep serving


@pytest.mark.parametrize(
    ("outcome", "status", "counts"),
    [
        ("connect_error", None, True),
        ("timeout", None, True),
        ("protocol_error", None, True),
        ("http_error", 502, True),
        ("http_error", 500, True),
        ("success", 503, True),
        ("http_error", 404, False),
        ("http_error", 429, False),
        ("success", 200, False),
        ("cancelled", None, False),  # the client went away: not the target's fault
    ],
)
def test_which_outcomes_count_as_failures(
    manual_clock: ManualClock, outcome: AttemptOutcome, status: int | None, counts: bool
) -> None:
    health = service(manual_clock)
    for _ in range(3):
        health.attempt_started(TARGETS[0])
        health.attempt_finished(TARGETS[0], outcome=outcome, status=status, latency=0.01)
    assert ("t0" not in ids(health.healthy())) is counts
    assert health.in_flight(TARGETS[0]) == 0


def test_in_flight_and_latency_figures(manual_clock: ManualClock) -> None:
    health = service(manual_clock)
    target = TARGETS[2]
    assert health.latency(target) == 0.0
    health.attempt_started(target)
    health.attempt_started(target)
    assert health.in_flight(target) == 2
    health.attempt_finished(target, outcome="success", status=200, latency=0.2)
    assert health.latency(target) == pytest.approx(0.2)
    manual_clock.advance(100)  # long quiet: the new sample dominates
    health.attempt_finished(target, outcome="success", status=200, latency=0.01)
    assert health.latency(target) < 0.05
    assert health.in_flight(target) == 0
    snapshot = health.state("t2")
    assert snapshot is not None and snapshot.to_dict(manual_clock.monotonic())["in_flight"] == 0


def test_sync_keeps_state_of_remaining_targets(manual_clock: ManualClock) -> None:
    health = service(manual_clock)
    fail(health, TARGETS[0], 3)
    health.sync([TARGETS[0], Target(id="t9", url="http://127.0.0.1:9999")])
    assert ids(health.healthy()) == ["t9"]
    health.attempt_finished(TARGETS[3], outcome="connect_error", status=None, latency=0.1)  # gone: ignored


async def test_active_checks_against_real_upstreams(manual_clock: ManualClock) -> None:
    tracker = HealthTracker(clock=manual_clock)
    policy = ActiveCheckPolicy(path="/healthz", timeout=2.0, healthy_threshold=2, unhealthy_threshold=2)
    bad_policy = ActiveCheckPolicy(path="/status/503", timeout=2.0, unhealthy_threshold=1)
    async with (
        serve(UpstreamApp(name="a")) as url_a,
        httpx.AsyncClient(trust_env=False) as client,
        contextlib.AsyncExitStack() as server_b,
    ):
        url_b = await server_b.enter_async_context(serve(UpstreamApp(name="b")))
        try:
            a, b = Target(id="a", url=url_a), Target(id="b", url=url_b)
            tracker.sync({"svc": [a, b], "bad": [Target(id="c", url=url_a)]}, {})
            checker = ActiveHealthChecker(tracker, {"svc": policy, "bad": bad_policy}, client=client)
            await checker.check_service("svc")
            await checker.check_service("bad")
            assert ids(tracker.service("svc").healthy()) == ["a", "b"]
            assert tracker.service("bad").healthy() == ()  # a 503 health endpoint
        finally:
            await server_b.aclose()
        # b is killed: two failed rounds mark it unhealthy, traffic goes to a only.
        await checker.check_service("svc")
        assert ids(tracker.service("svc").healthy()) == ["a", "b"]
        await checker.check_service("svc")
        assert ids(tracker.service("svc").healthy()) == ["a"]
        state = tracker.service("svc").state("b")
        assert state is not None and state.last_check_error is not None
        # Back on the same port? Not guaranteed; instead, check recovery on a: fail then heal via thresholds.
        health = tracker.service("svc")
        health.record_check("a", False, policy=policy, error="x")
        health.record_check("a", False, policy=policy, error="x")
        assert health.healthy() == ()
        await checker.check_service("svc")
        assert health.healthy() == ()
        await checker.check_service("svc")
        assert ids(health.healthy()) == ["a"]  # two good checks in a row
