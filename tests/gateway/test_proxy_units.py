"""The proxy's building blocks: target origins, client options, the connection gate, the retry budget."""

import asyncio
from typing import Any

import pytest

from nexus_middleware.clock import ManualClock
from nexus_middleware.errors import ConfigurationError
from sample_gateway.contracts import Target, UpstreamPolicy
from sample_gateway.proxy import RetryBudget, ReverseProxy
from sample_gateway.upstream_client import (
    ConnectionGate,
    Origin,
    UpstreamPoolExhaustedError,
    create_upstream_client,
)
from tests.gateway.support import ListSelector
from tests.support.asgi import make_scope


@pytest.mark.parametrize(
    ("url", "expected", "netloc"),
    [
        ("http://10.0.0.5:8080", Origin("http", "10.0.0.5", 8080), "10.0.0.5:8080"),
        ("http://svc.internal", Origin("http", "svc.internal", 80), "svc.internal"),
        ("https://svc.internal/", Origin("https", "svc.internal", 443), "svc.internal"),
        ("https://svc.internal:8443", Origin("https", "svc.internal", 8443), "svc.internal:8443"),
        ("http://[::1]:9000", Origin("http", "::1", 9000), "[::1]:9000"),
        ("http://bücher.example", Origin("http", "xn--bcher-kva.example", 80), "xn--bcher-kva.example"),
    ],
)
def test_origin_parse(url: str, expected: Origin, netloc: str) -> None:
    origin = Origin.parse(url)
    assert origin == expected
    assert origin.netloc == netloc
    assert origin.host_header == netloc.encode()
    assert origin.base == f"{expected.scheme}://{netloc}"


@pytest.mark.parametrize(
    "url",
    [
        "ftp://svc",
        "svc:8080",
        "http://user:pw@svc",
        "http://svc/base",
        "http://svc?x=1",
        "http://svc#f",
        "http://svc:99999",
        "http://:80",
    ],
)
def test_origin_parse_refuses_anything_but_scheme_host_port(url: str) -> None:
    with pytest.raises(ConfigurationError):
        Origin.parse(url)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "urllib3"},
        {"max_connections": 0},
        {"max_connections_per_host": -1},
        {"keepalive_expiry": -1},
    ],
)
def test_create_upstream_client_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        create_upstream_client(**kwargs)


async def test_clients_do_no_io_until_used_and_close_cleanly() -> None:
    for kind in ("aiohttp", "httpx"):
        client = create_upstream_client(kind, max_connections=7)  # type: ignore[arg-type]
        assert client.kind == kind
        assert repr(client) == (
            f"UpstreamClient(kind={kind!r}, max_connections=7, max_connections_per_host=0, "
            "keepalive_expiry=30.0)"
        )
        await client.aclose()
        await client.aclose()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"via": ""},
        {"via": "1.1 a, 1.1 b"},
        {"via": "1.1 x\r\n"},
        {"request_id_header": "x id"},
        {"replay_buffer_limit": -1},
        {"server_set_headers": ["bad name"]},
        {"retry_after": -1},
    ],
)
def test_reverse_proxy_validates(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        ReverseProxy(client=create_upstream_client(), **kwargs)


def test_reverse_proxy_repr() -> None:
    proxy = ReverseProxy(client=create_upstream_client("httpx"), via="1.1 edge", request_id_header="X-Req")
    assert "via='1.1 edge'" in repr(proxy)
    assert "request_id_header='x-req'" in repr(proxy)


async def test_forward_refuses_websocket_scopes() -> None:
    proxy = ReverseProxy(client=create_upstream_client())

    async def receive() -> Any:
        return {"type": "websocket.connect"}

    async def send(message: Any) -> None:
        raise AssertionError("nothing may be sent")

    with pytest.raises(ValueError, match="http scopes"):
        await proxy.forward(
            make_scope(scope_type="websocket"),
            receive,
            send,
            selector=ListSelector([]),
            policy=UpstreamPolicy(service="s"),
            path="/",
        )


class _SilentUpstream:
    """An upstream client whose responses never come: only the proxy's deadline ends an attempt."""

    async def open(self, *args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    async def open_websocket(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None


@pytest.mark.parametrize("receive_waits", [True, False], ids=["receive-waits", "receive-answers-at-once"])
def test_deadlines_hold_on_every_event_loop_the_proxy_serves(receive_waits: bool) -> None:
    # Deadlines are enforced by one periodic sweep per proxy, on the loop of the exchanges in flight. A proxy
    # that outlives its loop (tests, a restarted server) must not wait for the closed loop's timer. And the
    # disconnect watch, started meanwhile, must not spin on a receive() that answers without waiting.
    proxy = ReverseProxy(client=_SilentUpstream())  # type: ignore[arg-type]
    policy = UpstreamPolicy(service="svc", total_timeout=0.2)

    async def forward_once() -> list[Any]:
        sent: list[Any] = []
        calls = 0

        async def receive() -> Any:
            nonlocal calls
            calls += 1
            if receive_waits and calls > 1:  # a server: the pending empty body message, then a wait
                await asyncio.Event().wait()
            await asyncio.sleep(0)  # a watch that called again would show in `calls`, not hang the test
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            sent.append(message)

        selector = ListSelector([Target(id="a", url="http://127.0.0.1:9")])
        began = asyncio.get_running_loop().time()
        await asyncio.wait_for(
            proxy.forward(make_scope("/x"), receive, send, selector=selector, policy=policy, path="/x"), 5
        )
        assert 0.2 <= asyncio.get_running_loop().time() - began < 1.0
        assert calls == 2  # both the disconnect watch's: the pending empty body, then a wait or the end
        return sent

    for _ in range(2):
        sent = asyncio.run(forward_once())
        assert sent[0]["type"] == "http.response.start"
        assert sent[0]["status"] == 504


async def test_connection_gate_bounds_total_and_per_key() -> None:
    gate = ConnectionGate(3, 1)
    await gate.acquire("a", 1)
    with pytest.raises(UpstreamPoolExhaustedError):
        await gate.acquire("a", 0.01)  # per-key limit of 1
    await gate.acquire("b", 1)
    await gate.acquire("c", 1)
    with pytest.raises(UpstreamPoolExhaustedError):
        await gate.acquire("d", 0.01)  # total limit of 3
    gate.release("a")
    waiter = asyncio.ensure_future(gate.acquire("a", 1))
    await asyncio.sleep(0)
    assert not waiter.done() or waiter.exception() is None
    await waiter
    with pytest.raises(UpstreamPoolExhaustedError):
        await gate.acquire("e", 0.01)


async def test_connection_gate_gives_slots_back_when_a_wait_fails() -> None:
    gate = ConnectionGate(1, 0)
    await gate.acquire("a", 1)
    for _ in range(3):
        with pytest.raises(UpstreamPoolExhaustedError):
            await gate.acquire("a", 0.01)
    gate.release("a")
    await gate.acquire("a", 0.01)


def test_retry_budget_is_a_share_of_requests_plus_a_reserve(manual_clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.2, min_per_second=1, clock=manual_clock)
    assert budget.try_spend()  # the reserve: one retry per second for a quiet service
    assert not budget.try_spend()
    for _ in range(10):
        budget.deposit()
    assert budget.try_spend()
    assert budget.try_spend()  # 10 requests x 0.2 = 2 retries
    assert not budget.try_spend()
    manual_clock.advance(0.5)
    assert not budget.try_spend()
    manual_clock.advance(0.5)
    assert budget.try_spend()  # the reserve refilled after a second
    assert "ratio=0.2" in repr(budget)


def test_retry_budget_caps_what_a_long_quiet_spell_accumulates(manual_clock: ManualClock) -> None:
    budget = RetryBudget(ratio=0.1, min_per_second=0, clock=manual_clock)
    for _ in range(10_000):
        budget.deposit()
    spent = 0
    while budget.try_spend():
        spent += 1
    assert spent == 10  # the allowance of the last 100 requests, not of 10,000
    with pytest.raises(ConfigurationError):
        RetryBudget(ratio=-1, min_per_second=0)
