"""The gateway's data plane: a streaming reverse proxy over an `UpstreamClient`.

`ReverseProxy.forward` sends one request to a target chosen by the control plane's `TargetSelector`, streams
the request body up and the response body down as raw bytes, and answers upstream failures with problem
details. The upstream URL is built only from the chosen `Target.url` and the path the router produced, so no
request can make the gateway connect anywhere else. See docs/proxy.md for the header, timeout and retry rules.
"""

import asyncio
import logging
import os
import random
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import MappingProxyType
from typing import Literal

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import RequestContext, get_context
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.headers import RawHeaders, contains_ctl, get_header
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import Message, Receive, Scope, Send
from sample_gateway.contracts import (
    IDEMPOTENT_METHODS,
    AttemptObserver,
    AttemptOutcome,
    RetryPolicy,
    Target,
    TargetSelector,
    UpstreamPolicy,
)
from sample_gateway.upstream_client import (
    ConnectionGate,
    Origin,
    UpstreamClient,
    UpstreamConnectError,
    UpstreamDisconnectedError,
    UpstreamError,
    UpstreamHandshakeError,
    UpstreamPoolExhaustedError,
    UpstreamProtocolError,
    UpstreamResponse,
    UpstreamTimeoutError,
    UpstreamWebSocket,
)

__all__ = [
    "HOP_BY_HOP_HEADERS",
    "HeaderHook",
    "IDEMPOTENT_METHODS",
    "REPLAY_BUFFER_LIMIT",
    "RetryBudget",
    "ReverseProxy",
]

logger = logging.getLogger(__name__)

HeaderHook = Callable[[Scope, RawHeaders], RawHeaders]

# RFC 9110 §7.6.1, plus the non-standard Proxy-Connection that old clients still send.
HOP_BY_HOP_HEADERS = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"proxy-authenticate",
        b"proxy-authorization",
    }
)
# A request body up to this size, with a declared Content-Length, is read before the first attempt of a
# retryable request so that it can be replayed; larger or chunked bodies are streamed and never replayed once
# the upstream started reading them.
REPLAY_BUFFER_LIMIT = 64 * 1024
# An exchange still running after this long starts watching for the client going away (see _Sweeper).
DISCONNECT_WATCH_DELAY = 0.1
# How often the in-flight exchanges are checked for a passed deadline or a due disconnect watch: the most
# either can be late by.
SWEEP_INTERVAL = 0.05

# The gateway sets these itself; what the client sent is believed only from a trusted proxy.
_FORWARDED_NAMES = (b"x-forwarded-proto", b"x-forwarded-host", b"x-forwarded-port")
_KEPT_FROM_TRUSTED = frozenset({*_FORWARDED_NAMES, b"forwarded"})
# A path the router produced: absolute, printable, no query, fragment or backslash, no authority-like `//`.
_SAFE_PATH = re.compile(rb"/(?!/)[\x21-\x7e]*")
_UNSAFE_PATH_BYTES = re.compile(rb"[?#\\]")
_SAFE_QUERY = re.compile(rb"[\x21-\x7e]*")
_UNSAFE_QUERY_BYTES = re.compile(rb"[#\\]")
_DEFAULT_PORTS = {"http": b"80", "https": b"443", "ws": b"80", "wss": b"443"}
# X-Forwarded-Proto names the HTTP scheme, also for a websocket handshake (as nginx and Envoy send it;
# uvicorn's proxy-headers handling maps it back to ws/wss).
_FORWARDED_PROTOS = {"http": b"http", "https": b"https", "ws": b"http", "wss": b"https"}
_NOTHING_CLAIMED: Mapping[bytes, bytes] = MappingProxyType({})
_MAX_CACHED = 1024
_ONE_TOKEN = 1 - 1e-9  # ten deposits of 0.1 make one retry, whatever the float rounding


class RetryBudget:
    """Caps retries as a share of requests, per service: a token bucket in the manner of Finagle.

    Every request deposits `ratio` tokens (kept up to the allowance of the last 100 requests); a retry spends
    one. A reserve refilled at `min_per_second` lets a quiet service retry at all. So over any busy period
    retries stay near `ratio` of requests, and a failing service cannot triple its own load with retries.
    """

    __slots__ = ("_capacity", "_clock", "_min_per_second", "_ratio", "_refilled_at", "_reserve", "_tokens")

    def __init__(self, *, ratio: float, min_per_second: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ConfigurationError("retry budget ratio and min_per_second must be zero or more")
        self._ratio = ratio
        self._min_per_second = min_per_second
        self._capacity = ratio * 100
        self._clock = clock
        self._tokens = 0.0
        self._reserve = min_per_second
        self._refilled_at = clock.monotonic()

    def __repr__(self) -> str:
        return f"RetryBudget(ratio={self._ratio!r}, min_per_second={self._min_per_second!r})"

    def deposit(self) -> None:
        self._tokens = min(self._tokens + self._ratio, self._capacity)

    def try_spend(self) -> bool:
        """Take the allowance for one retry; False when the budget is spent."""
        if self._tokens >= _ONE_TOKEN:
            self._tokens = max(self._tokens - 1, 0.0)
            return True
        now = self._clock.monotonic()
        elapsed, self._refilled_at = now - self._refilled_at, now
        self._reserve = min(self._reserve + elapsed * self._min_per_second, self._min_per_second)
        if self._reserve >= _ONE_TOKEN:
            self._reserve = max(self._reserve - 1, 0.0)
            return True
        return False


def _validate_header_name(name: str, option: str) -> bytes:
    raw = name.lower().encode("latin-1")
    if not raw or not re.fullmatch(rb"[!#$%&'*+\-.^_`|~0-9a-z]+", raw):
        raise ConfigurationError(f"{option} must be a header name token, not {name!r}")
    return raw


class ReverseProxy:
    """Forwards requests to the targets a `TargetSelector` picks. One instance per gateway process.

    - `client`: the `UpstreamClient` created in the lifespan (`create_upstream_client()`).
    - `client_resolver`: decides whether the peer is a trusted proxy whose `X-Forwarded-*` headers are kept.
    - `via`: this hop's `Via` entry, appended on every forwarded request (RFC 9110 §7.6.3).
    - `request_id_header`: carries `get_context(scope).request_id` upstream (generated when absent).
    - `header_hooks`: called in order with the scope and the outgoing request headers, after hop-by-hop
      stripping and the gateway's own headers; each returns the list to send (identity, `traceparent`).
      The sequence is kept, not copied: the gateway replaces its content in place when a reload rebuilds
      the middleware stack (no await between the hooks, so a request never sees half a replacement).
    - `server_set_headers`: response headers the ASGI server in front sets on every response itself (uvicorn
      and hypercorn add `Date` and `Server`); the upstream's are dropped so the client gets one of each,
      as nginx does. Pass `()` behind a server that adds neither.
    - `response_via`: append this hop to `Via` on responses too. Off by default: RFC 9110 §7.6.3 lets a
      gateway leave it out (only requests MUST carry it), nginx, Envoy and HAProxy do, and it tells clients
      about the infrastructure behind the edge. An upstream's own `Via` passes through either way.
    - `replay_buffer_limit`: largest request body buffered so a retryable request can be replayed.
    - `retry_after`: seconds in `Retry-After` on the 503s for no target and pool exhaustion.
    - `random`, `sleep`: the jitter source and the backoff sleep, injectable so tests never wait.
    """

    def __init__(
        self,
        *,
        client: UpstreamClient,
        client_resolver: ClientAddressResolver | None = None,
        clock: Clock = SYSTEM_CLOCK,
        via: str = "1.1 nexus",
        request_id_header: str = "x-request-id",
        header_hooks: Sequence[HeaderHook] = (),
        server_set_headers: Sequence[str] = ("date", "server"),
        response_via: bool = False,
        replay_buffer_limit: int = REPLAY_BUFFER_LIMIT,
        retry_after: int = 1,
        random: Callable[[], float] = random.random,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if not via or contains_ctl(via) or "," in via:
            raise ConfigurationError("via must be one `protocol pseudonym` entry without commas or controls")
        if replay_buffer_limit < 0:
            raise ConfigurationError("replay_buffer_limit must be zero or more")
        if retry_after < 0:
            raise ConfigurationError("retry_after must be zero or more seconds")
        self._client = client
        self._resolver = client_resolver or ClientAddressResolver()
        self._clock = clock
        self._via = via.encode("latin-1")
        self._via_header = (b"via", self._via)
        self._request_id_header = _validate_header_name(request_id_header, "request_id_header")
        self._hooks = header_hooks
        self._response_via = response_via
        self._dropped_response_names = HOP_BY_HOP_HEADERS | {
            _validate_header_name(name, "server_set_headers") for name in server_set_headers
        }
        self._replay_limit = replay_buffer_limit
        self._retry_after = ((b"retry-after", str(retry_after).encode()),)
        self._random = random
        self._sleep = sleep
        self._gateway_names = HOP_BY_HOP_HEADERS | {
            b"expect",  # the server in front already answered 100-continue; the body is coming anyway
            b"host",
            b"via",
            b"x-forwarded-for",
            b"forwarded",
            self._request_id_header,
            *_FORWARDED_NAMES,
        }
        self._origins: dict[str, Origin] = {}
        self._budgets: dict[tuple[str, float, float], RetryBudget] = {}
        self._service_gates: dict[tuple[str, int], ConnectionGate] = {}
        self._sweeper = _Sweeper(clock)

    def __repr__(self) -> str:
        return (
            f"ReverseProxy(client={self._client!r}, client_resolver={self._resolver!r}, "
            f"via={self._via.decode()!r}, request_id_header={self._request_id_header.decode()!r}, "
            f"header_hooks={len(self._hooks)}, replay_buffer_limit={self._replay_limit})"
        )

    async def forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        selector: TargetSelector,
        policy: UpstreamPolicy,
        path: str,
        observer: AttemptObserver | None = None,
    ) -> None:
        """Forward the request in `scope` to a target of `policy.service`, and stream the answer back.

        `path` is the upstream path, already normalized and rewritten by routing; the query string is the
        request's own. Returns once the response was sent, or the client went away; raises when the upstream
        failed after the response had started, so the server aborts the connection.
        """
        if scope["type"] != "http":
            raise ValueError("ReverseProxy.forward handles http scopes only")
        target = self._request_target(path, scope.get("query_string", b""))
        if target is None:
            await self._refuse_unsafe_path(scope, send, policy)
            return
        exchange = _Exchange(self, scope, receive, send, selector, policy, target, observer)
        await exchange.run()

    async def forward_websocket(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        selector: TargetSelector,
        policy: UpstreamPolicy,
        path: str,
        observer: AttemptObserver | None = None,
    ) -> None:
        """Relay the websocket in `scope` to a target of `policy.service`, messages both ways, until either
        side closes. The handshake is refused with a problem (denial response, or a close before accept)
        when no target can be reached; the upstream's subprotocol choice is passed on at accept.
        """
        if scope["type"] != "websocket":
            raise ValueError("ReverseProxy.forward_websocket handles websocket scopes only")
        target_path = self._request_target(path, scope.get("query_string", b""))
        if target_path is None:
            await self._refuse_unsafe_path(scope, send, policy)
            return
        if (await receive())["type"] != "websocket.connect":
            return
        relay = _WebSocketRelay(self, scope, receive, send, policy, observer)
        upstream = await relay.connect(selector, target_path)
        if upstream is not None:
            await relay.run(upstream)

    # --- per-request helpers used by _Exchange ---

    @staticmethod
    async def _refuse_unsafe_path(scope: Scope, send: Send, policy: UpstreamPolicy) -> None:
        get_context(scope).record("proxy", "error", reason="unsafe_path", service=policy.service)
        problem = Problem(400, "the request path cannot be forwarded")
        await send_problem(scope, send, problem, layer="proxy")

    @staticmethod
    def _request_target(path: str, query: bytes) -> str | None:
        raw = path.encode("latin-1", "replace")
        if not _SAFE_PATH.fullmatch(raw) or _UNSAFE_PATH_BYTES.search(raw):
            return None
        if not query:
            return path
        if not _SAFE_QUERY.fullmatch(query) or _UNSAFE_QUERY_BYTES.search(query):
            return None
        return f"{path}?{query.decode('ascii')}"

    def _origin(self, target: Target) -> Origin:
        origin = self._origins.get(target.url)
        if origin is None:
            origin = Origin.parse(target.url)
            if len(self._origins) >= _MAX_CACHED:
                self._origins.clear()
            self._origins[target.url] = origin
        return origin

    def _budget(self, service: str, retry: RetryPolicy) -> RetryBudget:
        key = (service, retry.budget_ratio, retry.budget_min_per_second)
        budget = self._budgets.get(key)
        if budget is None:
            if len(self._budgets) >= _MAX_CACHED:
                self._budgets.clear()
            budget = self._budgets[key] = RetryBudget(
                ratio=retry.budget_ratio, min_per_second=retry.budget_min_per_second, clock=self._clock
            )
        return budget

    def _service_gate(self, policy: UpstreamPolicy) -> ConnectionGate:
        key = (policy.service, policy.pool_max_connections)
        gate = self._service_gates.get(key)
        if gate is None:
            gate = self._service_gates[key] = ConnectionGate(policy.pool_max_connections)
        return gate

    def request_headers(self, scope: Scope, context: RequestContext) -> RawHeaders:
        """The outgoing request headers, without `host` (set per target by the exchange)."""
        # One pass over the incoming headers: this runs for every request.
        gateway_names = self._gateway_names
        out: RawHeaders = []
        host = None
        connection: list[bytes] = []
        prior_for: list[bytes] = []
        prior_via: list[bytes] = []
        claimed: dict[bytes, bytes] | None = None  # forwarding headers, believed from a trusted peer only
        for header in scope.get("headers") or ():
            name = header[0]
            if name not in gateway_names:
                out.append(header)
            elif name == b"host":
                host = header[1]
            elif name == b"connection":
                connection.append(header[1])
            elif name == b"x-forwarded-for":
                prior_for.append(header[1])
            elif name == b"via":
                prior_via.append(header[1])
            elif name in _KEPT_FROM_TRUSTED:
                if claimed is None:
                    claimed = {}
                claimed.setdefault(name, header[1])
        if connection:  # rare: the headers it names are hop-by-hop too
            named = _connection_tokens(connection)
            out = [header for header in out if header[0] not in named]
        trusted = bool(prior_for or claimed) and self._resolver.trusts_peer(scope)
        forwarded = claimed if trusted and claimed else _NOTHING_CLAIMED
        if not trusted:
            prior_for = []
        client = scope.get("client")
        if client:
            prior_for.append(client[0].encode("latin-1"))
        if prior_for:
            out.append((b"x-forwarded-for", b", ".join(prior_for)))
        if b"forwarded" in forwarded:
            out.append((b"forwarded", forwarded[b"forwarded"]))
        scheme: str = scope.get("scheme", "http")
        out.append(
            (
                b"x-forwarded-proto",
                forwarded.get(b"x-forwarded-proto") or _FORWARDED_PROTOS.get(scheme) or scheme.encode(),
            )
        )
        host = forwarded.get(b"x-forwarded-host") or host
        if host:
            out.append((b"x-forwarded-host", host))
        port = forwarded.get(b"x-forwarded-port")
        if port is None:
            server = scope.get("server")
            port = str(server[1]).encode() if server and server[1] else _DEFAULT_PORTS.get(scheme, b"80")
        out.append((b"x-forwarded-port", port))
        if prior_via:
            prior_via.append(self._via)
            out.append((b"via", b", ".join(prior_via)))
        else:
            out.append(self._via_header)
        request_id = context.request_id
        if not request_id:
            request_id = context.request_id = os.urandom(16).hex()  # as unique as uuid4().hex, far cheaper
        out.append((self._request_id_header, request_id.encode("latin-1")))
        for hook in self._hooks:
            out = hook(scope, out)
        return out

    def response_headers(self, upstream: RawHeaders) -> RawHeaders:
        """The upstream's response headers as sent to the client: hop-by-hop ones and `server_set_headers`
        removed, and with `response_via`, this hop appended to `Via`."""
        out: RawHeaders = []
        connection: list[bytes] = []
        prior_via: list[bytes] | None = [] if self._response_via else None
        for header in upstream:
            name = header[0]
            if name in self._dropped_response_names:
                if name == b"connection":
                    connection.append(header[1])
            elif name == b"via" and prior_via is not None:
                prior_via.append(header[1])
            else:
                out.append(header)
        if connection:
            named = _connection_tokens(connection)
            out = [header for header in out if header[0] not in named]
        if prior_via is None:
            return out
        if not prior_via:
            out.append(self._via_header)
        else:
            prior_via.append(self._via)
            out.append((b"via", b", ".join(prior_via)))
        return out


class _Sweeper:
    """Checks every exchange in flight about every SWEEP_INTERVAL, instead of arming timers per exchange.

    A deadline timer and a disconnect-watch timer per exchange cost more than the rest of a fast exchange's
    bookkeeping (uvloop allocates a libuv timer for each `call_later`); one periodic check costs a dict
    insertion per exchange, and runs only while exchanges are in flight. The price: a deadline or a watch
    can be up to SWEEP_INTERVAL late.
    """

    __slots__ = ("_clock", "_exchanges", "_handle", "_loop")

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._exchanges: dict[_Exchange, None] = {}
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def add(self, exchange: "_Exchange") -> None:
        self._exchanges[exchange] = None
        loop = asyncio.get_running_loop()
        if self._handle is None or self._loop is not loop:  # a closed loop's timer never fires
            self._loop = loop
            self._handle = loop.call_later(SWEEP_INTERVAL, self._sweep)

    def discard(self, exchange: "_Exchange") -> None:
        self._exchanges.pop(exchange, None)

    def _sweep(self) -> None:
        now = self._clock.monotonic()
        for exchange in list(self._exchanges):
            try:
                exchange.sweep(now)
            except Exception:  # one broken exchange must not stop the others' deadlines
                logger.exception("checking an exchange in flight failed")
        if self._exchanges and self._loop is not None:
            self._handle = self._loop.call_later(SWEEP_INTERVAL, self._sweep)
        else:
            self._handle = None


def _connection_tokens(values: Sequence[bytes]) -> frozenset[bytes]:
    """The header names listed in `Connection` header values (RFC 9110 §7.6.1)."""
    return frozenset(token.strip().lower() for value in values for token in value.split(b","))


class _RequestBody:
    """The request body of one exchange: empty, buffered (replayable), or streamed (replayable until read)."""

    __slots__ = ("_buffered", "_complete", "_empty", "_on_disconnect", "_receive", "consumed")

    def __init__(self, receive: Receive) -> None:
        self._receive = receive
        self._empty = False
        self._buffered: bytes | None = None
        self._complete = False
        self.consumed = False
        self._on_disconnect: Callable[[], None] = _nothing

    def needs_buffer(self, headers: Sequence[tuple[bytes, bytes]], buffer_limit: int) -> bool:
        """Decide how the body travels: True when it must be buffered (`buffer()`) to be replayable."""
        length_header = get_header(headers, b"content-length")
        chunked = get_header(headers, b"transfer-encoding") is not None
        length = int(length_header) if length_header and length_header.isdigit() else None
        if not chunked and (length_header is None or length == 0):
            self._empty = True
            return False
        return not chunked and length is not None and length <= buffer_limit

    async def buffer(self) -> bool:
        """Read the whole body; False when the client went away meanwhile."""
        body = bytearray()
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                return False
            body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        self._buffered = bytes(body)
        self._complete = True
        return True

    @property
    def complete(self) -> bool:
        """True once nothing is left to read from the client (so `receive` is free for disconnects)."""
        return self._empty or self._complete

    @property
    def replayable(self) -> bool:
        return self._empty or self._buffered is not None or not self.consumed

    def watch(self, on_disconnect: Callable[[], None]) -> None:
        self._on_disconnect = on_disconnect

    def payload(self) -> bytes | AsyncIterator[bytes] | None:
        if self._empty:
            return None
        if self._buffered is not None:
            return self._buffered
        return self._stream()

    async def _stream(self) -> AsyncIterator[bytes]:
        self.consumed = True
        while True:
            message = await self._receive()
            if message["type"] == "http.disconnect":
                self._on_disconnect()
                return
            chunk = message.get("body", b"")
            if chunk:
                yield chunk
            if not message.get("more_body", False):
                break
        self._complete = True


def _nothing() -> None:
    return None


_Cause = Literal["connect", "timeout", "protocol", "disconnected", "pool"]


class _Forwarding:
    """What every forwarded call (an http exchange, a websocket relay) holds for its whole life."""

    __slots__ = ("_context", "_observer", "_policy", "_proxy", "_receive", "_retries", "_scope", "_send")

    def __init__(
        self,
        proxy: ReverseProxy,
        scope: Scope,
        receive: Receive,
        send: Send,
        policy: UpstreamPolicy,
        observer: AttemptObserver | None,
    ) -> None:
        self._proxy = proxy
        self._scope = scope
        self._receive = receive
        self._send = send
        self._policy = policy
        self._observer = observer
        self._context = get_context(scope)
        self._retries = 0

    def _host_header(self, origin: Origin) -> bytes:
        host = get_header(self._scope.get("headers") or (), b"host") if self._policy.preserve_host else None
        return host or origin.host_header

    def _observe(self, target: Target, outcome: AttemptOutcome, status: int | None, began: float) -> None:
        if self._observer is not None:
            self._observer.attempt_finished(
                target, outcome=outcome, status=status, latency=self._proxy._clock.monotonic() - began
            )

    def _record_error(self, reason: str, target: Target, upstream_status: int | None) -> None:
        self._context.record(
            "proxy",
            "error",
            reason=reason,
            service=self._policy.service,
            target=target.id,
            retries=self._retries,
            upstream_status=upstream_status,
        )

    async def _no_target(self, **details: str | None) -> None:
        policy = self._policy
        self._context.record(
            "proxy", "error", reason="no_target", service=policy.service, retries=self._retries, **details
        )
        problem = Problem(503, f"service {policy.service!r} has no available target")
        await send_problem(self._scope, self._send, problem, headers=self._proxy._retry_after, layer="proxy")


class _Exchange(_Forwarding):
    """The state of one forwarded request: attempts, retries, the response once it started."""

    __slots__ = (
        "_body",
        "_deadline",
        "_deadline_hit",
        "_disconnected",
        "_done_sending",
        "_opening",
        "_selector",
        "_target",
        "_task",
        "_watch_after",
        "_watcher",
    )

    def __init__(
        self,
        proxy: ReverseProxy,
        scope: Scope,
        receive: Receive,
        send: Send,
        selector: TargetSelector,
        policy: UpstreamPolicy,
        target: str,
        observer: AttemptObserver | None,
    ) -> None:
        super().__init__(proxy, scope, receive, send, policy, observer)
        self._selector = selector
        self._target = target
        self._body = _RequestBody(receive)
        self._disconnected = False
        self._task: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._watch_after = 0.0
        self._done_sending = False
        self._opening = False
        self._deadline_hit = False
        self._deadline: float | None = None

    async def run(self) -> None:
        proxy, scope, policy = self._proxy, self._scope, self._policy
        method: str = scope["method"]
        headers: Sequence[tuple[bytes, bytes]] = scope.get("headers") or ()
        retryable = policy.retry.attempts > 1 and (
            method in IDEMPOTENT_METHODS or get_header(headers, b"idempotency-key") is not None
        )
        body = self._body
        if body.needs_buffer(headers, proxy._replay_limit if retryable else 0) and not await body.buffer():
            self._context.record("proxy", "error", reason="client_disconnect", service=policy.service)
            return
        outgoing = proxy.request_headers(scope, self._context)
        budget = proxy._budget(policy.service, policy.retry)
        budget.deposit()
        now = proxy._clock.monotonic()
        deadline = self._context.deadline
        if policy.total_timeout is not None:
            own = now + policy.total_timeout
            deadline = own if deadline is None else min(deadline, own)
        self._deadline = deadline
        self._watch_after = now + DISCONNECT_WATCH_DELAY
        # The exchange runs in the request's own task (a child task would cost two more loop iterations per
        # request); a client disconnect cancels that task, and only a cancel of our own is absorbed here.
        self._task = asyncio.current_task()
        body.watch(self._client_gone)
        sweeper = proxy._sweeper
        sweeper.add(self)
        try:
            await self._attempts(method, outgoing, retryable, budget)
        except asyncio.CancelledError:
            task = self._task
            if not self._disconnected or task is None or task.uncancel() > 0:
                raise
            self._context.record(
                "proxy", "error", reason="client_disconnect", service=policy.service, retries=self._retries
            )
        finally:
            self._done_sending = True
            sweeper.discard(self)
            if self._watcher is not None:
                self._watcher.cancel()

    def sweep(self, now: float) -> None:
        """Called by the sweeper about every SWEEP_INTERVAL while the exchange is in flight."""
        if (
            self._watcher is None
            and now >= self._watch_after
            and self._body.complete
            and not self._done_sending
        ):
            # Watching `receive` costs a task and, in uvicorn, a resume of socket reading per request: a
            # measurable share of a fast exchange. Only exchanges still running after a delay pay for it.
            self._watcher = asyncio.ensure_future(self._watch())
        if self._deadline is not None and now >= self._deadline:
            self._deadline_passed()

    async def _watch(self) -> None:
        # Once the last body message was received, an ASGI server's receive() waits until the client goes
        # away. A bodiless request's one (empty) body message may still be pending, so it is skipped; any
        # further message answered at once (a wrapper replaying the body) ends the watch, since calling
        # again would spin the event loop.
        final_seen = False
        try:
            while True:
                message = await self._receive()
                if message["type"] == "http.disconnect":
                    self._client_gone()
                    return
                if final_seen or message["type"] != "http.request":
                    logger.debug("receive answered %r while watching for a disconnect", message["type"])
                    return
                final_seen = not message.get("more_body", False)
        except Exception:  # a broken receive is the server's business; the exchange goes on
            logger.debug("receive failed while watching for a disconnect", exc_info=True)

    def _client_gone(self) -> None:
        task = self._task
        # After the last body message, uvicorn's receive answers http.disconnect: no client left then.
        if task is not None and not self._done_sending and not self._disconnected:
            self._disconnected = True
            task.cancel()

    def _remaining(self) -> float | None:
        if self._deadline is None:
            return None
        return self._deadline - self._proxy._clock.monotonic()

    async def _attempts(
        self, method: str, outgoing: RawHeaders, retryable: bool, budget: RetryBudget
    ) -> None:
        proxy, policy = self._proxy, self._policy
        retry = policy.retry
        tried: frozenset[str] = frozenset()
        last: Target | None = None
        attempt = 0
        while True:
            attempt += 1
            target = await self._selector.select(self._scope, exclude=tried)
            if target is None and tried:
                target = await self._selector.select(self._scope)  # every target tried: any will do
            if target is None:
                await self._no_target(target=None if last is None else last.id, upstream_status=None)
                return
            last = target
            result = await self._attempt(method, target, outgoing)
            if isinstance(result, UpstreamError):
                retry_on = retry.on_connect_errors and (not result.sent or _before_response(result))
            else:
                retry_on = result.response.status in retry.on_statuses
            if retryable and retry_on and attempt < retry.attempts and self._body.replayable:
                delay = self._backoff_delay(attempt)
                if delay is not None and budget.try_spend():
                    if not isinstance(result, UpstreamError):
                        await self._finish(target, result, "http_error")
                    if delay > 0:
                        await proxy._sleep(delay)
                    self._retries += 1
                    tried = tried | {target.id}
                    continue
            if isinstance(result, UpstreamError):
                await self._fail(target, result)
                return
            await self._stream(target, result)
            return

    def _backoff_delay(self, attempt: int) -> float | None:
        """The full-jitter delay before retry number `attempt`, or None when the deadline forbids a retry."""
        retry = self._policy.retry
        delay: float = self._proxy._random() * min(
            retry.backoff_max, retry.backoff_base * 2.0 ** (attempt - 1)
        )
        remaining = self._remaining()
        if remaining is not None and delay >= remaining:
            return None
        return delay

    async def _attempt(self, method: str, target: Target, outgoing: RawHeaders) -> "_Attempt | UpstreamError":
        proxy, policy, observer = self._proxy, self._policy, self._observer
        clock = proxy._clock
        origin = proxy._origin(target)
        headers = [(b"host", self._host_header(origin)), *outgoing]
        connect_timeout = policy.connect_timeout
        if observer is not None:
            observer.attempt_started(target)
        began = clock.monotonic()
        if self._deadline is not None:
            remaining = self._deadline - began
            if remaining <= 0:
                self._observe(target, "cancelled", None, began)  # never contacted: not the target's fault
                return UpstreamTimeoutError("the deadline passed before the attempt", phase="read")
            connect_timeout = min(connect_timeout, remaining)
        gate = proxy._service_gate(policy)
        service = policy.service
        self._opening = True  # the deadline timer (see _deadline_passed) may cancel the task only now
        try:
            if not gate.try_acquire(service):
                await gate.acquire(service, connect_timeout)
            try:
                response = await proxy._client.open(
                    method,
                    origin,
                    self._target,
                    headers,
                    self._body.payload(),
                    connect_timeout=connect_timeout,
                    read_timeout=policy.read_timeout,
                )
            except BaseException:
                gate.release(service)
                raise
        except UpstreamError as exc:
            self._observe(target, _outcome_of(exc), None, began)
            return exc
        except asyncio.CancelledError:
            task = self._task
            if self._deadline_hit and task is not None and task.uncancel() == 0:
                self._deadline_hit = False
                self._observe(target, "timeout", None, began)
                return UpstreamTimeoutError("the upstream did not answer before the deadline", phase="read")
            self._observe(target, "cancelled", None, began)
            raise
        finally:
            self._opening = False
        return _Attempt(response, gate, service, clock.monotonic() - began)

    def _deadline_passed(self) -> None:
        # The request's own task is cancelled, as asyncio.timeout would, but only while an attempt waits for
        # a response head; elsewhere the next attempt sees the deadline gone and stops by itself.
        task = self._task
        if self._opening and not self._deadline_hit and not self._disconnected and task is not None:
            self._deadline_hit = True
            task.cancel()

    async def _finish(self, target: Target, attempt: "_Attempt", outcome: AttemptOutcome) -> None:
        try:
            await attempt.response.aclose()
        finally:
            attempt.release()
            if self._observer is not None:
                self._observer.attempt_finished(
                    target, outcome=outcome, status=attempt.response.status, latency=attempt.latency
                )

    async def _stream(self, target: Target, attempt: "_Attempt") -> None:
        response = attempt.response
        status = response.status
        policy, send = self._policy, self._send
        outcome: AttemptOutcome = "http_error" if status >= 500 else "success"
        self._context.record(
            "proxy",
            "forwarded",
            service=policy.service,
            target=target.id,
            retries=self._retries,
            upstream_status=status,
        )
        try:
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": self._proxy.response_headers(response.headers),
                }
            )
            # One chunk of look-ahead, so the last chunk goes out with more_body=False in the same message.
            read = response.read
            pending = await read()
            while pending:
                chunk = await read()
                if not chunk:
                    break
                await send({"type": "http.response.body", "body": pending, "more_body": True})
                pending = chunk
            message: Message = {"type": "http.response.body", "body": pending, "more_body": False}
            self._done_sending = True
            await send(message)
        except UpstreamError as exc:
            outcome = _outcome_of(exc)
            self._record_error("aborted", target, status)
            logger.warning("upstream %s failed after the response started: %s", target.id, exc)
            raise
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            await self._finish(target, attempt, outcome)

    async def _fail(self, target: Target, error: UpstreamError) -> None:
        policy = self._policy
        cause = _cause_of(error)
        self._record_error(cause, target, None)
        if cause == "pool":
            problem = Problem(503, f"no connection to service {policy.service!r} became free in time")
            retry_after = self._proxy._retry_after
            await send_problem(self._scope, self._send, problem, headers=retry_after, layer="proxy")
            return
        if cause == "timeout":
            problem = Problem(504, f"service {policy.service!r} did not answer in time")
        elif cause == "protocol":
            problem = Problem(502, f"service {policy.service!r} sent an invalid response")
        else:
            problem = Problem(502, f"service {policy.service!r} could not be reached")
        await send_problem(self._scope, self._send, problem, layer=None)


def _before_response(error: UpstreamError) -> bool:
    """A broken connection before any response byte: safe to replay for an idempotent request."""
    return isinstance(error, UpstreamDisconnectedError)


def _cause_of(error: UpstreamError) -> _Cause:
    if isinstance(error, UpstreamPoolExhaustedError):
        return "pool"
    if isinstance(error, UpstreamTimeoutError):
        return "timeout"
    if isinstance(error, UpstreamProtocolError):
        return "protocol"
    if isinstance(error, UpstreamConnectError):
        return "connect"
    return "disconnected"


_OUTCOMES: dict[_Cause, AttemptOutcome] = {
    "pool": "cancelled",  # the gateway's own limit: the target never saw the attempt, so it is not to blame
    "timeout": "timeout",
    "protocol": "protocol_error",
    "connect": "connect_error",
    "disconnected": "connect_error",
}


def _outcome_of(error: UpstreamError) -> AttemptOutcome:
    return _OUTCOMES[_cause_of(error)]


class _Attempt:
    """An attempt whose response head arrived: the response, and the service gate slot it holds."""

    __slots__ = ("_gate", "_service", "latency", "response")

    def __init__(
        self, response: UpstreamResponse, gate: ConnectionGate, service: str, latency: float
    ) -> None:
        self.response = response
        self._gate: ConnectionGate | None = gate
        self._service = service
        self.latency = latency

    def release(self) -> None:
        """Give the gate slot back, once however often called."""
        gate, self._gate = self._gate, None
        if gate is not None:
            gate.release(self._service)


# Close codes that describe a connection, never sent in a close frame (RFC 6455 §7.4.1).
_RESERVED_CLOSE_CODES = frozenset({1005, 1006, 1015})


def _close_code(code: object) -> int:
    if isinstance(code, int) and 1000 <= code < 5000 and code not in _RESERVED_CLOSE_CODES:
        return code
    return 1000


class _WebSocketRelay(_Forwarding):
    """One proxied websocket: the handshake attempts, then the two relay loops."""

    __slots__ = ()

    async def connect(
        self, selector: TargetSelector, target_path: str
    ) -> tuple[Target, UpstreamWebSocket, float] | None:
        proxy, scope, policy, observer = self._proxy, self._scope, self._policy, self._observer
        headers = [
            (name, value)
            for name, value in proxy.request_headers(scope, self._context)
            if not name.startswith(b"sec-websocket-")
        ]
        protocols: Sequence[str] = scope.get("subprotocols") or ()
        budget = proxy._budget(policy.service, policy.retry)
        budget.deposit()
        tried: frozenset[str] = frozenset()
        attempt = 0
        while True:
            attempt += 1
            target = await selector.select(scope, exclude=tried)
            if target is None and tried:
                target = await selector.select(scope)  # every target tried: any will do
            if target is None:
                await self._no_target()
                return None
            origin = proxy._origin(target)
            if observer is not None:
                observer.attempt_started(target)
            began = proxy._clock.monotonic()
            try:
                upstream = await proxy._client.open_websocket(
                    origin,
                    target_path,
                    [(b"host", self._host_header(origin)), *headers],
                    protocols=protocols,
                    connect_timeout=policy.connect_timeout,
                )
            except UpstreamError as exc:
                status = exc.status if isinstance(exc, UpstreamHandshakeError) else None
                outcome: AttemptOutcome = "http_error" if status is not None else _outcome_of(exc)
                self._observe(target, outcome, status, began)
                if (
                    not exc.sent
                    and policy.retry.on_connect_errors
                    and attempt < policy.retry.attempts
                    and budget.try_spend()
                ):
                    tried = tried | {target.id}
                    self._retries += 1
                    continue
                await self._refuse(target, exc, status)
                return None
            return target, upstream, proxy._clock.monotonic() - began

    async def _refuse(self, target: Target, error: UpstreamError, status: int | None) -> None:
        policy = self._policy
        self._record_error("handshake" if status is not None else _cause_of(error), target, status)
        if status is not None and 400 <= status < 500:
            problem = Problem(status, f"service {policy.service!r} refused the websocket")
        elif isinstance(error, UpstreamTimeoutError):
            problem = Problem(504, f"service {policy.service!r} did not answer in time")
        else:
            problem = Problem(502, f"service {policy.service!r} could not be reached")
        await send_problem(self._scope, self._send, problem, layer=None)

    async def run(self, connected: tuple[Target, UpstreamWebSocket, float]) -> None:
        target, upstream, latency = connected
        self._context.record(
            "proxy",
            "forwarded",
            service=self._policy.service,
            target=target.id,
            retries=self._retries,
            upstream_status=101,
        )
        outcome: AttemptOutcome = "success"
        close_code = 1000
        downstream = None
        try:
            await self._send({"type": "websocket.accept", "subprotocol": upstream.protocol})
            downstream = asyncio.ensure_future(self._upstream_to_client(upstream))
            close_code = await self._client_to_upstream(upstream)
        except asyncio.CancelledError:
            outcome = "cancelled"
            raise
        finally:
            if downstream is not None:
                downstream.cancel()
            try:
                await upstream.aclose(close_code)
            finally:
                if self._observer is not None:
                    self._observer.attempt_finished(target, outcome=outcome, status=101, latency=latency)

    async def _client_to_upstream(self, upstream: UpstreamWebSocket) -> int:
        while True:
            message = await self._receive()
            if message["type"] == "websocket.disconnect":
                return _close_code(message.get("code"))
            if message["type"] != "websocket.receive":
                continue
            text = message.get("text")
            data = text if text is not None else message.get("bytes")
            if data is None:
                continue
            try:
                await upstream.send(data)
            except UpstreamError:
                return 1011  # the upstream is gone; its close reaches the client through the other loop

    async def _upstream_to_client(self, upstream: UpstreamWebSocket) -> None:
        while True:
            data = await upstream.receive()
            if data is None:
                await self._send({"type": "websocket.close", "code": _close_code(upstream.close_code)})
                return
            if isinstance(data, str):
                await self._send({"type": "websocket.send", "text": data})
            else:
                await self._send({"type": "websocket.send", "bytes": data})
