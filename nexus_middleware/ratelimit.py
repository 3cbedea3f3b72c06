"""Rate limits and quotas, with the IETF `RateLimit-Policy` / `RateLimit` headers of
draft-ietf-httpapi-ratelimit-headers-11.

The first policy whose route patterns, methods and host match the request applies. Every quota of that
policy is drawn on at once, all or nothing; the backend (memory or Redis) answers in one step. Admitted
requests go on with the headers added to whatever response the inner app sends (errors included); refused
ones get a 429 `quota-exceeded` problem with `Retry-After`. When the store fails, each policy's
`on_store_error` decides.
"""

import base64
import hashlib
import ipaddress
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from limits import RateLimitItem

from nexus_middleware.client import AddressSet, ClientAddressResolver
from nexus_middleware.clock import SYSTEM_CLOCK, Clock
from nexus_middleware.context import Principal, RequestContext, get_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError, StorageError
from nexus_middleware.headers import get_header
from nexus_middleware.paths import INVALID_PATH, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.ratelimit_backends import (
    LimiterBackend,
    MemoryLimiterBackend,
    StoreBreaker,
    WindowCheck,
    WindowState,
    limiter_backend,
)
from nexus_middleware.ratelimit_policy import (
    Quota,
    RateLimitEvent,
    RateLimitEventHook,
    RateLimitOptions,
    RateLimitPolicy,
    parse_windows,
)
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["QUOTA_EXCEEDED", "RateLimitMiddleware"]

logger = logging.getLogger(__name__)

QUOTA_EXCEEDED = "https://iana.org/assignments/http-problem-types#quota-exceeded"
LAYER = "ratelimit"

_POLICY_HEADER = b"ratelimit-policy"
_LIMIT_HEADER = b"ratelimit"


@dataclass(frozen=True, slots=True)
class _Window:
    """A window of one request's check, with what its header items need."""

    quota: Quota
    label: str
    key: str
    partition: str  # the serialized `;pk=:...:` parameter, or "" when the quota has no partition
    item: RateLimitItem


class _PolicySet:
    """The policies in force; replaced whole, so a request sees one consistent set."""

    __slots__ = ("policies", "table")

    def __init__(self, policies: Sequence[RateLimitPolicy]) -> None:
        for policy in policies:
            if not isinstance(policy, RateLimitPolicy):
                raise ConfigurationError(f"policies must be RateLimitPolicy objects, not {policy!r}")
        names = [policy.name for policy in policies]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"policy names must be unique: {names}")
        self.policies = tuple(policies)
        # The second item is the route a "route" key counts by: a host's policy counts apart from the others.
        self.table: RouteTable[tuple[RateLimitPolicy, str]] = RouteTable(
            (
                pattern,
                policy.methods,
                (policy, pattern if policy.host is None else policy.host + pattern),
                policy.host,
            )
            for policy in policies
            for pattern in policy.paths
        )


class RateLimitMiddleware:
    """Limits http requests and websocket handshakes (and optionally websocket messages) per policy.

    - `policies`: `RateLimitPolicy` objects, first match wins; `replace_policies()` swaps them at runtime.
    - `storage`: `"memory://"` (default), a Redis URL, a `redis.asyncio.Redis`, a limits async Redis storage
      (`storage_from_string("async+redis://...", implementation="redispy")`), or a `LimiterBackend`.
    - `options`: `RateLimitOptions` (prefix, exemptions, headers, breaker, websocket message limit).
    - `client_resolver`: the trusted-proxy-aware `ClientAddressResolver` (default: the TCP peer).
    - `event_hook`: an async callable receiving a `RateLimitEvent` for every refusal, shadow refusal and
      store outage (and every hit with `options.report_hits`).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        policies: Sequence[RateLimitPolicy],
        storage: object = "memory://",
        options: RateLimitOptions | None = None,
        client_resolver: ClientAddressResolver | None = None,
        clock: Clock = SYSTEM_CLOCK,
        event_hook: RateLimitEventHook | None = None,
    ) -> None:
        options = options if options is not None else RateLimitOptions()
        if not isinstance(options, RateLimitOptions):
            raise ConfigurationError("options must be a RateLimitOptions")
        if event_hook is not None and not callable(event_hook):
            raise ConfigurationError("event_hook must be an async callable")
        self.app = app
        self.options = options
        self._policies = _PolicySet(policies)
        self._backend: LimiterBackend = limiter_backend(storage, clock=clock, timeout=options.store_timeout)
        self._local = isinstance(self._backend, MemoryLimiterBackend)
        self._fallback = MemoryLimiterBackend(clock=clock)
        self._breaker = StoreBreaker(cooldown=options.breaker_cooldown, clock=clock)
        self._resolver = client_resolver if client_resolver is not None else ClientAddressResolver()
        self._clock = clock
        self._hook = event_hook
        self._prefix = options.key_prefix
        self._exempt_paths: RouteTable[bool] | None = (
            RouteTable((pattern, None, True) for pattern in options.exempt_paths)
            if options.exempt_paths
            else None
        )
        self._exempt_networks = AddressSet(options.exempt_networks, option="exempt_networks", wildcard=False)
        self._ws_windows = parse_windows(options.websocket_messages) if options.websocket_messages else ()
        self._parsed: dict[str, tuple[RateLimitItem, ...]] = {}
        self._scaled: dict[RateLimitItem, RateLimitItem] = {}
        self._partitions: dict[str, str] = {}

    def __repr__(self) -> str:
        names = [policy.name for policy in self._policies.policies]
        return f"RateLimitMiddleware(policies={names!r}, backend={self._backend!r}, options={self.options!r})"

    @property
    def policies(self) -> tuple[RateLimitPolicy, ...]:
        return self._policies.policies

    @property
    def backend(self) -> LimiterBackend:
        return self._backend

    @property
    def store_available(self) -> bool:
        """False while the store breaker is open after a failure (for status pages and health checks)."""
        return not self._breaker.is_open

    def replace_policies(self, policies: Sequence[RateLimitPolicy]) -> None:
        """Put `policies` in force for every request that starts from now on; validated before the swap."""
        self._policies = _PolicySet(policies)

    async def aclose(self) -> None:
        await self._backend.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        context = get_context(scope)
        try:
            path = request_path(scope)
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer=LAYER)
            return
        method = scope.get("method", "GET")
        found = self._policies.table.for_request(scope).lookup(path, method)
        if found is None:
            await self._forward(scope, receive, send)
            return
        policy, route = found
        if self._exempt_paths is not None and self._exempt_paths.lookup(path) is not None:
            context.record(LAYER, "exempt", rule=policy.name, reason="path")
            await self._forward(scope, receive, send)
            return
        principal = context.principal
        if (
            principal is not None
            and principal.is_authenticated
            and principal.subject in self.options.exempt_subjects
        ):
            context.record(LAYER, "exempt", rule=policy.name, reason="principal")
            await self._forward(scope, receive, send)
            return
        client = self._client(scope, context)
        if self._exempt_networks and client is not None and self._in_exempt_network(client):
            context.record(LAYER, "exempt", rule=policy.name, reason="network")
            await self._forward(scope, receive, send)
            return
        cost = policy.cost if isinstance(policy.cost, int) else await policy.cost(scope)
        windows, checks = await self._checks(
            policy, scope, principal, client, f"{method} {route}", path, cost
        )
        if not checks:
            await self._forward(scope, receive, send)
            return
        states = await self._acquire(checks)
        degraded = states is None
        if states is None:
            states = await self._degraded(policy, scope, send, context, path, windows, checks)
            if states is None:
                if policy.on_store_error == "fail_open":
                    await self._forward(scope, receive, send)
                return
            windows = [_Window(w.quota, w.label, w.key, w.partition, self._scale(w.item)) for w in windows]
        await self._decide(policy, scope, receive, send, context, path, windows, states, degraded)

    async def _decide(
        self,
        policy: RateLimitPolicy,
        scope: Scope,
        receive: Receive,
        send: Send,
        context: RequestContext,
        path: str,
        windows: list[_Window],
        states: list[WindowState],
        degraded: bool,
    ) -> None:
        violated = [i for i, state in enumerate(states) if not state.allowed]
        if violated:
            index = violated[0]
            retry_after = max(1, max(math.ceil(states[i].reset_after) for i in violated))
        else:
            index = min(
                range(len(states)), key=lambda i: (states[i].remaining, -windows[i].item.get_expiry())
            )
            retry_after = None
        window, state = windows[index], states[index]
        outcome = ("shadow_deny" if policy.shadow else "deny") if violated else "allow"
        if outcome != "allow" or not degraded:  # in local fallback an admitted request stays "degraded"
            context.record(
                LAYER,
                outcome,
                rule=policy.name,
                reason="quota_exceeded" if violated else None,
                remaining=state.remaining,
                limit=window.item.amount,
                key_kind=_key_kind(window.quota),
                quota=window.quota.name,
            )
        if violated or self.options.report_hits:
            await self._emit(outcome, policy, window, state, path, retry_after)
        if outcome == "deny":
            labels = list(dict.fromkeys(windows[i].label for i in violated))
            headers = self._headers(windows, states, only=violated)
            headers.append((b"retry-after", str(retry_after).encode()))
            problem = Problem(
                429,
                f"Quota exceeded for {', '.join(labels)}; retry in {retry_after} s.",
                type=QUOTA_EXCEEDED,
                title="Quota Exceeded",
                extensions=MappingProxyType({"violated-policies": labels}),
            )
            await send_problem(scope, send, problem, headers=headers, layer=LAYER)
            return
        # A shadow policy reports its would-be refusal but advertises nothing the client could act on.
        headers = [] if policy.shadow else self._headers(windows, states)
        await self._forward(scope, receive, send, headers)

    async def _checks(
        self,
        policy: RateLimitPolicy,
        scope: Scope,
        principal: Principal | None,
        client: str | None,
        route: str,
        path: str,
        cost: int,
    ) -> tuple[list[_Window], list[WindowCheck]]:
        windows: list[_Window] = []
        checks: list[WindowCheck] = []
        enforce = not policy.shadow
        for quota in policy.all_quotas:
            value = await self._key_value(quota, scope, principal, client, route, path)
            if value is None:
                continue
            items = await self._windows(quota, principal, scope)
            key = f"{self._prefix}{quota.name}:{value}"
            partition = ""
            if self.options.partition_keys and quota.key != "global":
                partition = self._partitions.get(key) or self._partition(key)
            for item in items:
                label = quota.name if len(items) == 1 else f"{quota.name}-{item.get_expiry()}s"
                windows.append(_Window(quota, label, key, partition, item))
                checks.append(WindowCheck(key, item, policy.strategy, cost, enforce))
        return windows, checks

    async def _key_value(
        self,
        quota: Quota,
        scope: Scope,
        principal: Principal | None,
        client: str | None,
        route: str,
        path: str,
    ) -> str | None:
        key = quota.key
        authenticated = principal is not None and principal.is_authenticated
        value: str | None
        if callable(key):
            value = await key(scope)
            return None if value is None else "fn:" + _bounded(value)
        if key == "principal_or_client":
            if authenticated and principal is not None:
                return "sub:" + _bounded(principal.subject)
            return "ip:" + (client or "unknown")
        if key == "client":
            return "ip:" + (client or "unknown")
        if key == "principal":
            return "sub:" + _bounded(principal.subject) if authenticated and principal is not None else None
        if key == "tenant":
            value = principal.tenant if principal is not None else None
            return None if value is None else "tenant:" + _bounded(value)
        if key == "plan":
            plan = None if principal is None else principal.plan or principal.claims.get("plan")
            return "plan:" + _bounded(plan) if isinstance(plan, str) and plan else None
        if key == "api_key":
            value = principal.key_id if principal is not None else None
            return None if value is None else "key:" + _bounded(value)
        if key == "route":
            return "route:" + route
        if key == "path":
            return "path:" + _bounded(path.lower())
        if key == "global":
            return "global"
        raw = get_header(scope.get("headers") or (), key[len("header:") :].encode("latin-1"))
        if raw is None:
            return None
        text = raw.decode("latin-1").strip()
        return "hdr:" + _bounded(text) if text else None

    async def _windows(
        self, quota: Quota, principal: Principal | None, scope: Scope
    ) -> tuple[RateLimitItem, ...]:
        if quota.resolver is not None:
            try:
                text = await quota.resolver(principal, scope)
            except Exception:
                logger.exception(
                    "rate-limit resolver of quota %r failed; using its default limits", quota.name
                )
                text = None
            parsed = self._parse(quota, text, "resolver")
            if parsed is not None:
                return parsed
        if quota.claim is not None and principal is not None:
            value = principal.claims.get(quota.claim)
            parsed = self._parse(quota, value if isinstance(value, str) else None, f"claim {quota.claim!r}")
            if parsed is not None:
                return parsed
        if quota.plan_windows and principal is not None:
            plan = principal.plan or principal.claims.get("plan")
            if isinstance(plan, str) and plan in quota.plan_windows:
                return quota.plan_windows[plan]
        return quota.windows

    def _parse(self, quota: Quota, text: str | None, source: str) -> tuple[RateLimitItem, ...] | None:
        if text is None:
            return None
        parsed = self._parsed.get(text)
        if parsed is None:
            try:
                parsed = parse_windows(text)
            except ConfigurationError:
                logger.error("quota %r: %s gave invalid limits %r", quota.name, source, text)
                return None
            if len(self._parsed) >= 1024:  # bounded: plans and key tiers are few
                self._parsed.clear()
            self._parsed[text] = parsed
        return parsed

    def _client(self, scope: Scope, context: RequestContext) -> str | None:
        address = context.client
        if address is None:
            address = self._resolver.resolve(scope)
            if address is None:
                return None
            context.client = address
        if ":" in address and self.options.ipv6_prefix < 128:
            network = ipaddress.ip_network(f"{address}/{self.options.ipv6_prefix}", strict=False)
            return str(network)
        return address

    def _in_exempt_network(self, client: str) -> bool:
        try:
            address = ipaddress.ip_address(client.partition("/")[0])
        except ValueError:
            return False
        return address in self._exempt_networks

    async def _acquire(self, checks: list[WindowCheck]) -> list[WindowState] | None:
        if self._local:
            return await self._backend.acquire(checks)
        breaker = self._breaker
        if not breaker.allow():
            return None
        settled = False
        try:
            states = await self._backend.acquire(checks)
            breaker.succeeded()
            settled = True
            return states
        except Exception as exc:  # any backend failure is an outage, never a 500
            if isinstance(exc, StorageError):
                logger.warning("rate-limit store unavailable: %s", exc)
            else:
                logger.exception("rate-limit backend failed")
            breaker.failed()
            settled = True
            return None
        finally:
            if not settled:
                breaker.abandoned()

    async def _degraded(
        self,
        policy: RateLimitPolicy,
        scope: Scope,
        send: Send,
        context: RequestContext,
        path: str,
        windows: list[_Window],
        checks: list[WindowCheck],
    ) -> list[WindowState] | None:
        mode = policy.on_store_error
        context.record(LAYER, "degraded", rule=policy.name, reason="store_unavailable", mode=mode)
        await self._emit("degraded", policy, windows[0], None, path, None, mode=mode)
        if mode == "local_fallback":
            scaled = [WindowCheck(c.key, self._scale(c.item), c.strategy, c.cost, c.enforce) for c in checks]
            return await self._fallback.acquire(scaled)
        if mode == "fail_closed":
            retry_after = self._breaker.retry_after()
            problem = Problem(503, "The rate-limit store is unavailable; retry later.")
            await send_problem(
                scope, send, problem, headers=[(b"retry-after", str(retry_after).encode())], layer=LAYER
            )
        return None

    def _partition(self, key: str) -> str:
        digest = hashlib.blake2b(key.encode(), digest_size=9).digest()
        partition = ";pk=:" + base64.b64encode(digest).decode("ascii") + ":"
        if len(self._partitions) >= 4096:  # bounded: one entry per recently seen bucket
            self._partitions.clear()
        self._partitions[key] = partition
        return partition

    def _scale(self, item: RateLimitItem) -> RateLimitItem:
        scaled = self._scaled.get(item)
        if scaled is None:
            amount = max(1, item.amount // self.options.instances)
            scaled = type(item)(amount, item.multiples, item.namespace)
            self._scaled[item] = scaled
        return scaled

    def _headers(
        self, windows: list[_Window], states: list[WindowState], only: list[int] | None = None
    ) -> list[tuple[bytes, bytes]]:
        # Names are validated printable ASCII without quotes or backslashes at construction, so each item
        # is a valid RFC 9651 String with Integer and Byte Sequence parameters as written here.
        policy_items: list[str] = []
        limit_items: list[str] = []
        for index, (window, state) in enumerate(zip(windows, states, strict=True)):
            item = window.item
            policy_items.append(f'"{window.label}";q={item.amount};w={item.get_expiry()}{window.partition}')
            if only is not None and index not in only:
                continue
            limit_items.append(
                f'"{window.label}";r={state.remaining};t={math.ceil(state.reset_after)}{window.partition}'
            )
        headers = [
            (_POLICY_HEADER, ", ".join(policy_items).encode("ascii")),
            (_LIMIT_HEADER, ", ".join(limit_items).encode("ascii")),
        ]
        if self.options.legacy_headers:
            index = min(
                range(len(states)), key=lambda i: (states[i].remaining, -windows[i].item.get_expiry())
            )
            headers += [
                (b"x-ratelimit-limit", str(windows[index].item.amount).encode()),
                (b"x-ratelimit-remaining", str(states[index].remaining).encode()),
                (b"x-ratelimit-reset", str(math.ceil(states[index].reset_after)).encode()),
            ]
        return headers

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, headers: list[tuple[bytes, bytes]] | None = None
    ) -> None:
        if scope["type"] == "websocket":
            if headers or self._ws_windows:
                responder = _WebsocketResponder(self.app, self._ws_windows, self._clock, headers or [])
                await responder(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        if not headers:
            await self.app(scope, receive, send)
            return
        extra = headers

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)

    async def _emit(
        self,
        outcome: Any,
        policy: RateLimitPolicy,
        window: _Window,
        state: WindowState | None,
        path: str,
        retry_after: int | None,
        **details: Any,
    ) -> None:
        if self._hook is None:
            return
        event = RateLimitEvent(
            outcome=outcome,
            policy=policy.name,
            quota=window.quota.name,
            key=window.key,
            remaining=None if state is None else state.remaining,
            limit=window.item.amount,
            retry_after=retry_after,
            path=path,
            details=MappingProxyType(details),
        )
        try:
            await self._hook(event)
        except Exception:
            logger.exception("rate-limit event hook failed")


class _WebsocketResponder:
    """Adds the rate headers to the handshake accept and enforces the per-connection message limit."""

    __slots__ = ("app", "clock", "closed", "headers", "hits", "windows")

    def __init__(
        self,
        app: ASGIApp,
        windows: tuple[RateLimitItem, ...],
        clock: Clock,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        self.app = app
        self.windows = windows
        self.clock = clock
        self.headers = headers
        self.closed = False
        self.hits: list[deque[float]] = [deque() for _ in windows]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if self.closed:
                return  # we closed the connection for the app; it learns so on its next receive
            if message["type"] == "websocket.accept" and self.headers:
                message["headers"] = [*message.get("headers", ()), *self.headers]
            await send(message)

        async def receive_limited() -> Message:
            message = await receive()
            if message["type"] != "websocket.receive" or not self.windows or self.closed:
                return message
            if self._admit():
                return message
            self.closed = True
            get_context(scope).record(LAYER, "deny", rule="websocket_messages", reason="message_rate")
            await send({"type": "websocket.close", "code": 1008, "reason": "message rate limit exceeded"})
            return {"type": "websocket.disconnect", "code": 1008}

        await self.app(scope, receive_limited, send_with_headers)

    def _admit(self) -> bool:
        now = self.clock.monotonic()
        exceeded = False
        for item, hits in zip(self.windows, self.hits, strict=True):
            cutoff = now - item.get_expiry()
            while hits and hits[0] <= cutoff:
                hits.popleft()
            if len(hits) >= item.amount:
                exceeded = True
        if exceeded:
            return False
        for hits in self.hits:
            hits.append(now)
        return True


def _bounded(value: str) -> str:
    # Long or odd values (headers, subjects) are hashed so a client cannot blow up key sizes.
    if len(value) <= 96 and value.isprintable():
        return value
    return "h:" + base64.urlsafe_b64encode(hashlib.blake2b(value.encode(), digest_size=18).digest()).decode()


def _key_kind(quota: Quota) -> str:
    return quota.key if isinstance(quota.key, str) else "callable"
