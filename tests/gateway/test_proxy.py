"""End-to-end behaviour of the reverse proxy through real uvicorn, for both upstream client kinds."""

import asyncio
import contextlib
import gzip
import json
import time
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.types import Receive, Scope, Send
from sample_gateway.contracts import RetryPolicy, Target, UpstreamPolicy
from sample_gateway.proxy import ReverseProxy
from sample_gateway.upstream_client import UpstreamClient
from tests.gateway.support import FirstSelector, ListSelector, RecordingObserver, proxy_app, until
from tests.support.servers import closing_server, free_port, serve
from tests.support.upstream import UpstreamApp

pytestmark = pytest.mark.e2e


@dataclass
class Gateway:
    url: str
    observer: RecordingObserver
    decisions: list[Any]
    client: httpx.AsyncClient


@contextlib.asynccontextmanager
async def gateway(
    client: UpstreamClient,
    targets: list[Target],
    *,
    policy: UpstreamPolicy | None = None,
    selector: ListSelector | None = None,
    resolver: ClientAddressResolver | None = None,
    **options: Any,
) -> AsyncIterator[Gateway]:
    options.setdefault("sleep", _no_sleep)
    proxy = ReverseProxy(client=client, client_resolver=resolver, **options)
    observer = RecordingObserver()
    decisions: list[Any] = []
    app = proxy_app(
        proxy, selector or ListSelector(targets), policy or UpstreamPolicy(service="svc"), observer, decisions
    )
    # uvicorn's own proxy-headers handling would rewrite the peer from X-Forwarded-For: the resolver decides.
    async with serve(app, proxy_headers=False) as url, httpx.AsyncClient(timeout=120) as client:
        yield Gateway(url, observer, decisions, client)


async def _no_sleep(seconds: float) -> None:
    return None


def target(name: str, url: str) -> Target:
    return Target(id=name, url=url)


@contextlib.asynccontextmanager
async def upstreams(*names: str) -> AsyncIterator[list[tuple[UpstreamApp, str]]]:
    async with contextlib.AsyncExitStack() as stack:
        servers = []
        for name in names:
            app = UpstreamApp(name=name)
            servers.append((app, await stack.enter_async_context(serve(app))))
        yield servers


def proxy_decision(gw: Gateway) -> Any:
    return next(d for d in reversed(gw.decisions) if d.layer == "proxy")


# --- forwarding and headers ---


async def test_forwards_method_path_query_and_streamed_body(upstream_client: UpstreamClient) -> None:
    async with upstreams("a") as [(app, url)], gateway(upstream_client, [target("a", url)]) as gw:

        async def body() -> AsyncIterator[bytes]:
            for _ in range(50):
                yield b"z" * 10_000

        async with httpx.AsyncClient() as client:
            response = await client.post(f"{gw.url}/items/%7E1?x=1&y=%20", content=body())
        echo = response.json()
        assert response.status_code == 200
        assert (echo["method"], echo["path"], echo["query_string"]) == ("POST", "/items/~1", "x=1&y=%20")
        assert echo["body_length"] == 500_000
        assert app.received == [("POST", "/items/~1")]
        assert proxy_decision(gw).outcome == "forwarded"
        assert proxy_decision(gw).details == {
            "service": "svc",
            "target": "a",
            "retries": 0,
            "upstream_status": 200,
        }
        assert gw.observer.started == ["a"]
        assert gw.observer.finished == [("a", "success", 200)]


async def test_request_hop_by_hop_headers_are_stripped_and_gateway_headers_set(
    upstream_client: UpstreamClient,
) -> None:
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        headers = {
            "connection": "keep-alive, x-secret",
            "x-secret": "named in connection",
            "keep-alive": "timeout=5",
            "te": "trailers",
            "trailer": "x-checksum",
            "proxy-authorization": "Basic Zm9vOmJhcg==",
            "proxy-connection": "keep-alive",
            "expect": "100-continue",
            "x-forwarded-for": "6.6.6.6",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "evil.example",
            "via": "1.0 edge",
            "x-request-id": "client-chosen",
            "x-kept": "yes",
        }
        async with httpx.AsyncClient() as client:
            echo = (await client.get(f"{gw.url}/h", headers=headers)).json()
    received = {}
    for name, value in echo["headers"]:
        received.setdefault(name, []).append(value)
    for name in (
        "x-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-authorization",
        "proxy-connection",
        "expect",
    ):
        assert name not in received, name
    assert received.get("connection", ["keep-alive"]) == ["keep-alive"]  # the client library's own, if any
    assert received["x-kept"] == ["yes"]
    # An untrusted peer: its forwarding headers are replaced, not believed.
    assert received["x-forwarded-for"] == ["127.0.0.1"]
    assert received["x-forwarded-proto"] == ["http"]
    assert received["x-forwarded-host"] == [gw.url.removeprefix("http://")]
    assert received["x-forwarded-port"] == [gw.url.rsplit(":", 1)[1]]
    assert received["via"] == ["1.0 edge, 1.1 nexus"]
    assert received["host"] == [url.removeprefix("http://")]
    assert len(received["x-request-id"]) == 1
    assert received["x-request-id"] != ["client-chosen"]  # no request id layer ran: the proxy made one


@pytest.mark.parametrize(("request_line", "body"), [("GET /h HTTP/1.1", b""), ("POST /h HTTP/1.1", b"xyz")])
async def test_the_client_library_adds_no_headers_of_its_own(
    upstream_client: UpstreamClient, request_line: str, body: bytes
) -> None:
    # A client that sends only Host: the upstream sees no Accept, Accept-Encoding, User-Agent or Content-Type
    # that the upstream client library would add by default.
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        raw = await raw_request(gw.url, request_line, "gw.example", body)
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    echo = json.loads(payload)
    names = {name for name, _ in echo["headers"]}
    assert {"host", "x-forwarded-for", "via"} <= names
    assert not names & {"accept", "accept-encoding", "user-agent", "content-type"}, names
    assert echo["body_length"] == len(body)


async def test_forwarding_headers_from_a_trusted_peer_are_kept_and_appended(
    upstream_client: UpstreamClient,
) -> None:
    resolver = ClientAddressResolver(trusted_proxies=["127.0.0.1"])
    policy = UpstreamPolicy(service="svc", preserve_host=True)
    async with (
        upstreams("a") as [(_, url)],
        gateway(upstream_client, [target("a", url)], resolver=resolver, policy=policy) as gw,
    ):
        headers = {
            "x-forwarded-for": "198.51.100.1, 10.0.0.2",
            "x-forwarded-proto": "https",
            "x-forwarded-host": "api.example.com",
            "x-forwarded-port": "443",
            "host": "api.example.com",
        }
        async with httpx.AsyncClient() as client:
            echo = (await client.get(f"{gw.url}/h", headers=headers)).json()
    received = dict(echo["headers"])
    assert received["x-forwarded-for"] == "198.51.100.1, 10.0.0.2, 127.0.0.1"
    assert received["x-forwarded-proto"] == "https"
    assert received["x-forwarded-host"] == "api.example.com"
    assert received["x-forwarded-port"] == "443"
    assert received["host"] == "api.example.com"  # preserve_host


async def test_header_hooks_see_the_stripped_headers_and_decide_what_goes(
    upstream_client: UpstreamClient,
) -> None:
    seen: list[list[tuple[bytes, bytes]]] = []

    def identity(scope: Scope, headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        seen.append(list(headers))
        return [(k, v) for k, v in headers if k != b"authorization"] + [(b"x-user", b"alice")]

    async with (
        upstreams("a") as [(_, url)],
        gateway(upstream_client, [target("a", url)], header_hooks=[identity]) as gw,
    ):
        headers = {"authorization": "Bearer t", "te": "trailers"}
        echo = (await gw.client.get(f"{gw.url}/h", headers=headers)).json()
    received = dict(echo["headers"])
    assert received["x-user"] == "alice"
    assert "authorization" not in received
    assert b"te" not in dict(seen[0])
    assert dict(seen[0])[b"via"] == b"1.1 nexus"


async def hop_by_hop_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    if scope["type"] != "http":
        return
    await receive()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"connection", b"x-upstream-secret"),
                (b"x-upstream-secret", b"1"),
                (b"keep-alive", b"timeout=5"),
                (b"proxy-authenticate", b"Basic"),
                (b"trailer", b"x-checksum"),
                (b"upgrade", b"h2c"),
                (b"x-kept", b"yes"),
                (b"content-length", b"2"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def test_response_hop_by_hop_headers_are_stripped(upstream_client: UpstreamClient) -> None:
    async with serve(hop_by_hop_upstream) as url, gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        response = await client.get(f"{gw.url}/")
    assert response.text == "ok"
    assert response.headers["x-kept"] == "yes"
    assert "via" not in response.headers  # RFC 9110 §7.6.3: a gateway MAY leave Via out of responses
    for name in ("x-upstream-secret", "keep-alive", "proxy-authenticate", "trailer", "upgrade"):
        assert name not in response.headers, name


async def test_date_and_server_come_once_from_the_server_in_front(upstream_client: UpstreamClient) -> None:
    # uvicorn sets Date and Server on every response, the upstream (uvicorn too) sent its own: one of each.
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        response = await gw.client.get(f"{gw.url}/h")
    assert response.status_code == 200
    assert len(response.headers.get_list("date")) == 1
    assert response.headers.get_list("server") == ["uvicorn"]


async def test_server_set_headers_can_pass_the_upstreams(upstream_client: UpstreamClient) -> None:
    async with (
        upstreams("a") as [(_, url)],
        gateway(upstream_client, [target("a", url)], server_set_headers=()) as gw,
    ):
        response = await gw.client.get(f"{gw.url}/h")
    assert response.headers.get_list("server") == ["uvicorn", "uvicorn"]  # the upstream's, then uvicorn's


# --- streaming ---


async def test_gzip_body_passes_through_byte_identical(upstream_client: UpstreamClient) -> None:
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        direct = await client.get(f"{url}/gzip", headers={"accept-encoding": "gzip"})
        async with client.stream("GET", f"{gw.url}/gzip", headers={"accept-encoding": "gzip"}) as proxied:
            raw = b"".join([chunk async for chunk in proxied.aiter_raw()])
            assert proxied.headers["content-encoding"] == "gzip"
            assert proxied.headers["content-length"] == str(len(raw))
    assert raw == gzip.compress(b"hello gzip " * 100, mtime=0)
    assert raw == direct.content or gzip.decompress(raw) == direct.content


async def test_100_mb_response_streams_with_flat_memory(upstream_client: UpstreamClient) -> None:
    size, chunks = 64 * 1024, 1600  # 100 MiB
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        tracemalloc.start()
        try:
            total = 0
            async with client.stream("GET", f"{gw.url}/stream?chunks={chunks}&size={size}") as response:
                async for chunk in response.aiter_raw():
                    total += len(chunk)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert total == size * chunks
    # Upstream, proxy and client share this process: all three together stay far below the body size.
    assert peak < 16 * 1024 * 1024, f"peak traced memory {peak / 2**20:.1f} MiB"


async def test_client_disconnect_cancels_the_upstream_request(upstream_client: UpstreamClient) -> None:
    async with upstreams("a") as [(app, url)], gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        request = asyncio.ensure_future(client.get(f"{gw.url}/delay?seconds=5"))
        await until(lambda: app.in_flight == 1)
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
        began = time.monotonic()
        await until(lambda: app.cancelled == 1)
        assert time.monotonic() - began < 2
        # The slot went back: the next request through the same client is served.
        assert (await client.get(f"{gw.url}/after")).status_code == 200
        assert gw.decisions[0].reason == "client_disconnect"
        assert gw.observer.finished[0] == ("a", "cancelled", None)


async def test_client_disconnect_mid_response_stops_reading_the_upstream(
    upstream_client: UpstreamClient,
) -> None:
    async with upstreams("a") as [(app, url)], gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        async with client.stream("GET", f"{gw.url}/stream?chunks=200&size=10&delay=0.05") as response:
            async for _ in response.aiter_raw():
                break
        await until(lambda: app.cancelled == 1)
        assert ("a", "cancelled", 200) in gw.observer.finished


# --- errors ---


async def test_connect_failure_is_502_problem(upstream_client: UpstreamClient) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with gateway(upstream_client, [target("dead", dead)]) as gw, httpx.AsyncClient() as client:
        response = await client.post(f"{gw.url}/x", content=b"payload")
    assert response.status_code == 502
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["status"] == 502
    assert proxy_decision(gw).reason == "connect"
    assert gw.observer.finished == [("dead", "connect_error", None)]


async def test_no_target_is_503_with_retry_after(upstream_client: UpstreamClient) -> None:
    async with gateway(upstream_client, []) as gw, httpx.AsyncClient() as client:
        response = await client.get(f"{gw.url}/x")
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json()["detail"] == "service 'svc' has no available target"
    assert proxy_decision(gw).reason == "no_target"


async def test_pool_exhausted_is_503_with_retry_after(upstream_client: UpstreamClient) -> None:
    policy = UpstreamPolicy(service="svc", pool_max_connections=1, connect_timeout=0.2)
    async with (
        upstreams("a") as [(app, url)],
        gateway(upstream_client, [target("a", url)], policy=policy) as gw,
        httpx.AsyncClient() as client,
    ):
        slow = asyncio.ensure_future(client.get(f"{gw.url}/delay?seconds=1"))
        await until(lambda: app.in_flight == 1)
        response = await client.get(f"{gw.url}/x")
        assert (await slow).status_code == 200
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert ("a", "cancelled", None) in gw.observer.finished  # the gateway's own limit never blames the target


async def garbage_upstream_server() -> tuple[asyncio.Server, str]:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"THIS IS NOT HTTP\r\n\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_invalid_upstream_response_is_502(upstream_client: UpstreamClient) -> None:
    server, url = await garbage_upstream_server()
    try:
        async with gateway(upstream_client, [target("bad", url)]) as gw, httpx.AsyncClient() as client:
            response = await client.post(f"{gw.url}/x")
    finally:
        server.close()
        await server.wait_closed()
    assert response.status_code == 502
    assert response.json()["detail"] == "service 'svc' sent an invalid response"
    assert gw.observer.finished == [("bad", "protocol_error", None)]


async def test_failure_after_the_response_started_aborts_the_client_connection(
    upstream_client: UpstreamClient,
) -> None:
    async with upstreams("a") as [(_, url)], gateway(upstream_client, [target("a", url)]) as gw:
        client = gw.client
        with pytest.raises(httpx.RemoteProtocolError):
            await client.get(f"{gw.url}/reset")
    assert proxy_decision(gw).reason == "aborted"


@pytest.mark.parametrize(
    ("policy", "path", "expected_seconds"),
    [
        (UpstreamPolicy(service="svc", read_timeout=0.3), "/delay?seconds=3", 0.3),
        (UpstreamPolicy(service="svc", read_timeout=5, total_timeout=0.4), "/delay?seconds=3", 0.4),
    ],
)
async def test_upstream_timeouts_give_504_within_tolerance(
    upstream_client: UpstreamClient, policy: UpstreamPolicy, path: str, expected_seconds: float
) -> None:
    async with (
        upstreams("a") as [(_, url)],
        gateway(upstream_client, [target("a", url)], policy=policy) as gw,
        httpx.AsyncClient() as client,
    ):
        began = time.monotonic()
        response = await client.get(gw.url + path)
        elapsed = time.monotonic() - began
    assert response.status_code == 504
    assert response.json()["status"] == 504
    assert expected_seconds - 0.05 <= elapsed < expected_seconds + 1.0
    assert proxy_decision(gw).reason == "timeout"


async def test_context_deadline_bounds_the_wait(upstream_client: UpstreamClient) -> None:
    async with upstreams("a") as [(_, url)]:
        proxy = ReverseProxy(client=upstream_client)
        policy = UpstreamPolicy(service="svc")

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                return
            from nexus_middleware.context import get_context

            get_context(scope).deadline = time.monotonic() + 0.3  # what a TimeoutMiddleware leaves
            await proxy.forward(
                scope, receive, send, selector=ListSelector([target("a", url)]), policy=policy, path="/delay"
            )

        async with serve(app) as gw_url, httpx.AsyncClient() as client:
            began = time.monotonic()
            response = await client.get(f"{gw_url}/delay?seconds=3")
    assert response.status_code == 504
    assert time.monotonic() - began < 1.3


# --- retries ---

RETRY_503 = RetryPolicy(attempts=2, on_statuses=frozenset({503}), budget_ratio=1.0)


@pytest.mark.parametrize(
    ("method", "headers", "replayed"),
    [
        ("POST", {}, False),
        ("PATCH", {}, False),
        ("POST", {"idempotency-key": "k-1"}, True),
        ("GET", {}, True),
        ("PUT", {}, True),
        ("DELETE", {}, True),
    ],
)
async def test_only_idempotent_requests_are_replayed(
    upstream_client: UpstreamClient, method: str, headers: dict[str, str], replayed: bool
) -> None:
    policy = UpstreamPolicy(service="svc", retry=RETRY_503)
    async with upstreams("a", "b") as [(a, url_a), (b, url_b)]:
        targets = [target("a", url_a), target("b", url_b)]
        selector = FirstSelector(targets)
        async with (
            gateway(upstream_client, targets, policy=policy, selector=selector) as gw,
            httpx.AsyncClient() as client,
        ):
            response = await client.request(method, f"{gw.url}/status/503", headers=headers, content=b"{}")
    assert response.status_code == 503  # the upstream's own answer passes through
    assert response.json()["name"] == ("b" if replayed else "a")
    assert len(a.received) == 1
    assert len(b.received) == (1 if replayed else 0)
    assert proxy_decision(gw).details["retries"] == (1 if replayed else 0)


async def test_a_large_streamed_body_is_never_replayed(upstream_client: UpstreamClient) -> None:
    policy = UpstreamPolicy(service="svc", retry=RETRY_503)
    async with upstreams("a", "b") as [(a, url_a), (b, url_b)]:
        targets = [target("a", url_a), target("b", url_b)]
        async with (
            gateway(upstream_client, targets, policy=policy, selector=FirstSelector(targets)) as gw,
            httpx.AsyncClient() as client,
        ):
            response = await client.put(f"{gw.url}/status/503", content=b"x" * 200_000)
            small = await client.put(f"{gw.url}/status/503", content=b"x" * 1000)
    assert response.json()["name"] == "a"  # the upstream read the body: nothing left to replay
    assert small.json()["name"] == "b"  # buffered under the replay limit: replayed
    assert len(a.received) == 2
    assert len(b.received) == 1


async def test_idempotent_traffic_shifts_when_a_target_is_killed(upstream_client: UpstreamClient) -> None:
    policy = UpstreamPolicy(service="svc", retry=RetryPolicy(attempts=2, budget_ratio=1.0))
    app_a, app_b = UpstreamApp(name="a"), UpstreamApp(name="b")
    async with serve(app_b) as url_b:
        killer = contextlib.AsyncExitStack()
        url_a = await killer.enter_async_context(serve(app_a))
        targets = [target("a", url_a), target("b", url_b)]
        async with gateway(upstream_client, targets, policy=policy) as gw, httpx.AsyncClient() as client:
            before = [await client.get(f"{gw.url}/r{i}") for i in range(6)]
            await killer.aclose()  # target a goes away mid-run; the selector still offers it
            after = [await client.get(f"{gw.url}/r{i}") for i in range(20)]
    assert {r.json()["name"] for r in before} == {"a", "b"}
    assert [r.status_code for r in after] == [200] * 20
    assert {r.json()["name"] for r in after} == {"b"}
    failed = [entry for entry in gw.observer.finished if entry[1] == "connect_error"]
    assert failed and {entry[0] for entry in failed} == {"a"}


async def test_post_is_not_retried_on_a_connect_failure(upstream_client: UpstreamClient) -> None:
    policy = UpstreamPolicy(service="svc", retry=RetryPolicy(attempts=3, budget_ratio=1.0))
    async with upstreams("b") as [(b, url_b)]:
        targets = [target("dead", f"http://127.0.0.1:{free_port()}"), target("b", url_b)]
        async with (
            gateway(upstream_client, targets, policy=policy, selector=FirstSelector(targets)) as gw,
            httpx.AsyncClient() as client,
        ):
            post = await client.post(f"{gw.url}/x", content=b"{}")
            get = await client.get(f"{gw.url}/x")
    assert post.status_code == 502
    assert get.status_code == 200
    assert b.received == [("GET", "/x")]


async def test_retry_budget_caps_retries(upstream_client: UpstreamClient) -> None:
    retry = RetryPolicy(attempts=2, on_statuses=frozenset({503}), budget_ratio=0.0, budget_min_per_second=2)
    policy = UpstreamPolicy(service="svc", retry=retry)
    async with upstreams("a", "b") as [(a, url_a), (b, url_b)]:
        targets = [target("a", url_a), target("b", url_b)]
        async with (
            gateway(upstream_client, targets, policy=policy, selector=FirstSelector(targets)) as gw,
            httpx.AsyncClient() as client,
        ):
            for _ in range(5):
                await client.get(f"{gw.url}/status/503")
    # Two retries allowed by the reserve within this second; every other request answered from a.
    assert len(a.received) == 5
    assert 2 <= len(b.received) <= 3
    assert sum(d.details.get("retries", 0) for d in gw.decisions if d.layer == "proxy") == len(b.received)


async def test_backoff_uses_full_jitter_within_the_cap(upstream_client: UpstreamClient) -> None:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    retry = RetryPolicy(
        attempts=4, on_statuses=frozenset({503}), backoff_base=0.1, backoff_max=0.3, budget_ratio=1.0
    )
    async with (
        upstreams("a") as [(a, url_a)],
        gateway(
            upstream_client,
            [target("a", url_a)],
            policy=UpstreamPolicy(service="svc", retry=retry),
            sleep=sleep,
            random=lambda: 0.5,
        ) as gw,
        httpx.AsyncClient() as client,
    ):
        response = await client.get(f"{gw.url}/status/503")
    assert response.status_code == 503
    assert slept == [0.05, 0.1, 0.15]  # 0.5 x min(cap, base x 2^n): the single target is tried again
    assert len(a.received) == 4
    assert [entry[1] for entry in gw.observer.finished] == ["http_error"] * 4


# --- SSRF ---


@contextlib.asynccontextmanager
async def canary() -> AsyncIterator[tuple[list[bytes], int]]:
    """A listener that must never be reached: it records every connection's first bytes."""
    hits: list[bytes] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            hits.append(await asyncio.wait_for(reader.read(200), 1))
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    try:
        yield hits, server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()


async def raw_request(base_url: str, request_line: str, host: str, body: bytes = b"") -> bytes:
    port = int(base_url.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    length = f"content-length: {len(body)}\r\n" if body else ""
    head = f"{request_line}\r\nhost: {host}\r\n{length}connection: close\r\n\r\n"
    writer.write(head.encode("latin-1") + body)
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return data


SSRF_TARGETS = [
    "GET //127.0.0.1:{port}/x HTTP/1.1",
    "GET ///127.0.0.1:{port}/x HTTP/1.1",
    "GET http://127.0.0.1:{port}/x HTTP/1.1",
    "GET /@127.0.0.1:{port}/x HTTP/1.1",
    "GET @127.0.0.1:{port}/x HTTP/1.1",
    "GET /%2F%2F127.0.0.1:{port}/x HTTP/1.1",
    "GET /%2f127.0.0.1:{port} HTTP/1.1",
    "GET /\\\\127.0.0.1:{port}/x HTTP/1.1",
    "GET /%5C%5C127.0.0.1:{port}/x HTTP/1.1",
    "GET /..//127.0.0.1:{port}/x HTTP/1.1",
    "GET /x?next=http://127.0.0.1:{port}/ HTTP/1.1",
    "GET /x#@127.0.0.1:{port} HTTP/1.1",
]


@pytest.mark.parametrize("request_line", SSRF_TARGETS)
async def test_no_request_reaches_an_unregistered_host(
    upstream_client: UpstreamClient, request_line: str
) -> None:
    async with (
        canary() as (hits, port),
        upstreams("a") as [(app, url)],
        gateway(
            upstream_client, [target("a", url)], policy=UpstreamPolicy(service="svc", preserve_host=True)
        ) as gw,
    ):
        answer = await raw_request(gw.url, request_line.format(port=port), f"127.0.0.1:{port}")
        await asyncio.sleep(0.05)  # a connection the proxy opened would have landed by now
    assert hits == []
    status = int(answer.split(b" ", 2)[1])
    assert status in (200, 400), answer[:200]
    if status == 200:
        assert len(app.received) == 1
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["name"] == "a"


@pytest.mark.parametrize(
    "path", ["//127.0.0.1:9/x", "relative", "/a b", "/a\\b", "/a?b", "/a#b", "/a\r\nx: y", ""]
)
async def test_unsafe_paths_from_routing_are_refused(upstream_client: UpstreamClient, path: str) -> None:
    async with canary() as (hits, _), upstreams("a") as [(app, url)]:
        proxy = ReverseProxy(client=upstream_client)

        async def app_(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] == "http":
                await proxy.forward(
                    scope,
                    receive,
                    send,
                    selector=ListSelector([target("a", url)]),
                    policy=UpstreamPolicy(service="svc"),
                    path=path,
                )

        async with serve(app_) as gw_url, httpx.AsyncClient() as client:
            response = await client.get(f"{gw_url}/x")
    assert response.status_code == 400
    assert app.received == []
    assert hits == []


async def test_closing_upstream_before_response_is_502_for_post(upstream_client: UpstreamClient) -> None:
    async with closing_server() as url, gateway(upstream_client, [target("c", url)]) as gw:
        client = gw.client
        response = await client.post(f"{gw.url}/x", content=b"data")
    assert response.status_code == 502
    assert len(gw.observer.finished) == 1


async def test_no_retry_when_the_backoff_would_pass_the_deadline(upstream_client: UpstreamClient) -> None:
    retry = RetryPolicy(
        attempts=3, on_statuses=frozenset({503}), backoff_base=10, backoff_max=10, budget_ratio=1
    )
    policy = UpstreamPolicy(service="svc", retry=retry, total_timeout=5)
    async with upstreams("a", "b") as [(a, url_a), (b, url_b)]:
        targets = [target("a", url_a), target("b", url_b)]
        async with gateway(
            upstream_client, targets, policy=policy, selector=FirstSelector(targets), random=lambda: 0.9
        ) as gw:
            response = await gw.client.get(f"{gw.url}/status/503")
    assert response.status_code == 503
    assert (len(a.received), len(b.received)) == (1, 0)  # a 9 s backoff cannot end within 5 s


@pytest.mark.parametrize("method", ["HEAD", "OPTIONS", "DELETE"])
async def test_other_methods_are_forwarded(upstream_client: UpstreamClient, method: str) -> None:
    async with upstreams("a") as [(app, url)], gateway(upstream_client, [target("a", url)]) as gw:
        response = await gw.client.request(method, f"{gw.url}/thing")
    assert response.status_code == 200
    assert app.received == [(method, "/thing")]
    if method == "HEAD":
        assert response.content == b""
        assert int(response.headers["content-length"]) > 0


async def via_upstream(scope: Scope, receive: Receive, send: Send) -> None:
    headers = [(b"content-length", b"2")]
    if scope["path"] == "/via":
        headers.append((b"via", b"1.1 inner"))
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize(
    ("response_via", "path", "expected"),
    [
        (False, "/", None),
        (False, "/via", "1.1 inner"),  # the upstream's own entry passes through untouched
        (True, "/", "1.1 nexus"),
        (True, "/via", "1.1 inner, 1.1 nexus"),
    ],
)
async def test_response_via_is_appended_only_when_asked(
    upstream_client: UpstreamClient, response_via: bool, path: str, expected: str | None
) -> None:
    async with (
        serve(via_upstream) as url,
        gateway(upstream_client, [target("a", url)], response_via=response_via) as gw,
    ):
        response = await gw.client.get(f"{gw.url}{path}")
    assert response.headers.get("via") == expected
