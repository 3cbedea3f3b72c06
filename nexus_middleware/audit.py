"""One correlated decision record per request that any layer refused or flagged, sent to pluggable sinks.

`AuditLogMiddleware` reads the decisions every layer recorded in the request context. When one of them has a
"refused or flagged" outcome (deny, shadow_deny, reject, shed, queue_timeout, degraded, expired, error), or a
layer answered locally, it builds one record keyed by request id and trace id, with every decision (layer,
outcome, rule id, reason, details), redacts it, and hands it to each sink.

Sinks never slow a request: `emit()` is synchronous and non-blocking. `LoggerSink` logs a JSON line;
`CallbackSink` and `WebhookSink` put the record on a bounded queue (dropped and counted when full) that a
background task drains in batches, with exponential backoff on failure. The task starts on the first
record (or `start()`), and `await sink.aclose()` flushes what it can within a timeout and stops it.
"""

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import httpx

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import SYSTEM_CLOCK, Clock, utc_timestamp
from nexus_middleware.context import RequestContext, peek_context, request_method, route_template
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.exchange import ExchangeMeter
from nexus_middleware.redaction import Redactor
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

__all__ = [
    "AuditLogMiddleware",
    "AuditSink",
    "CallbackSink",
    "FLAGGED_OUTCOMES",
    "LoggerSink",
    "SinkPolicy",
    "WebhookSink",
]

_logger = logging.getLogger(__name__)

FLAGGED_OUTCOMES = frozenset(
    {"deny", "shadow_deny", "reject", "shed", "queue_timeout", "degraded", "expired", "error"}
)

AuditRecord = Mapping[str, Any]
Sleep = Callable[[float], Awaitable[None]]


@runtime_checkable
class AuditSink(Protocol):
    """Where audit records go. `emit` must return at once and never raise for delivery problems."""

    def emit(self, record: AuditRecord) -> None: ...

    async def aclose(self) -> None: ...


class LoggerSink:
    """Logs each record as one JSON line (and as `record.nexus_audit` for structured handlers)."""

    def __init__(self, *, logger: logging.Logger | None = None, level: int = logging.WARNING) -> None:
        self._logger = logger if logger is not None else logging.getLogger("nexus_middleware.audit.records")
        self._level = level

    def __repr__(self) -> str:
        return f"LoggerSink(logger={self._logger.name!r}, level={self._level!r})"

    def emit(self, record: AuditRecord) -> None:
        self._logger.log(
            self._level,
            json.dumps(record, separators=(",", ":"), ensure_ascii=False, default=str),
            extra={"nexus_audit": record},
        )

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class SinkPolicy:
    """Queueing and retry behaviour of a background sink.

    `max_queue` records wait at most (more are dropped and counted); up to `batch_size` records are delivered
    together, after at most `flush_interval` seconds; a failed batch is retried `max_retries` times, waiting
    `backoff * 2**attempt` seconds (capped at `backoff_max`) in between, then dropped and counted.
    `aclose()` waits up to `close_timeout` seconds for the queue to drain.
    """

    max_queue: int = 10_000
    batch_size: int = 100
    flush_interval: float = 1.0
    max_retries: int = 5
    backoff: float = 0.5
    backoff_max: float = 30.0
    close_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.max_queue <= 0 or self.batch_size <= 0:
            raise ConfigurationError("max_queue and batch_size must be positive")
        if min(self.flush_interval, self.backoff, self.backoff_max, self.max_retries, self.close_timeout) < 0:
            raise ConfigurationError("durations and max_retries may not be negative")


class _QueuedSink:
    """A bounded queue drained by one background task; subclasses deliver batches."""

    def __init__(self, policy: SinkPolicy, sleep: Sleep) -> None:
        self.policy = policy
        self._sleep = sleep
        self._queue: asyncio.Queue[AuditRecord] = asyncio.Queue(maxsize=policy.max_queue)
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._more = asyncio.Event()  # set when records arrive or the sink closes: a batch need not wait
        self.dropped = 0  # records refused because the queue was full or the sink closed
        self.failed = 0  # records given up on after the retries
        self.delivered = 0

    def emit(self, record: AuditRecord) -> None:
        if self._closed:
            self.dropped += 1
            return
        try:
            self._queue.put_nowait(record)
        except asyncio.QueueFull:
            self.dropped += 1
            return
        self._more.set()
        if self._task is None:
            self.start()

    def start(self) -> None:
        """Start the background task in the running loop (done by the first `emit` otherwise)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"{type(self).__name__}")

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        queue, policy = self._queue, self.policy
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + policy.flush_interval
            while len(batch) < policy.batch_size:
                try:
                    batch.append(queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0 or self._closed:
                    break
                self._more.clear()
                try:
                    await asyncio.wait_for(self._more.wait(), timeout=remaining)
                except TimeoutError:
                    break
            try:
                await self._deliver_with_retries(batch)
            finally:
                for _ in batch:
                    queue.task_done()

    async def _deliver_with_retries(self, batch: list[AuditRecord]) -> None:
        policy = self.policy
        for attempt in range(policy.max_retries + 1):
            try:
                await self._deliver(batch)
            except Exception as exc:
                if attempt == policy.max_retries or not self._retryable(exc):
                    self.failed += len(batch)
                    _logger.warning("%r dropped %d audit records: %s", self, len(batch), exc)
                    return
                await self._sleep(min(policy.backoff * 2**attempt, policy.backoff_max))
            else:
                self.delivered += len(batch)
                return

    def _retryable(self, exc: Exception) -> bool:
        return True

    async def _deliver(self, batch: list[AuditRecord]) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        """Stop accepting records, deliver what is queued within `close_timeout` seconds, stop the task."""
        self._closed = True
        self._more.set()
        task, self._task = self._task, None
        if task is not None:
            try:
                await asyncio.wait_for(self._queue.join(), timeout=self.policy.close_timeout)
            except TimeoutError:
                pending = self._queue.qsize()
                self.dropped += pending
                _logger.warning("%r closed with %d audit records undelivered", self, pending)
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self._close_resources()

    async def _close_resources(self) -> None:
        return None


class CallbackSink(_QueuedSink):
    """Calls `await callback(record)` for each record, in a background task (alerting, custom stores)."""

    def __init__(
        self,
        callback: Callable[[AuditRecord], Awaitable[None]],
        *,
        policy: SinkPolicy = SinkPolicy(max_retries=0),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not callable(callback):
            raise ConfigurationError("callback must be an async callable")
        super().__init__(policy, sleep)
        self._callback = callback

    def __repr__(self) -> str:
        return f"CallbackSink({self._callback!r}, policy={self.policy!r})"

    async def _deliver(self, batch: list[AuditRecord]) -> None:
        for record in batch:
            await self._callback(record)


class WebhookSink(_QueuedSink):
    """POSTs batches as `{"records": [...]}` JSON to `url` with an `httpx.AsyncClient`.

    The client is created on first delivery (or pass `client=`; a client passed in is not closed by
    `aclose`). Network errors, 429 and 5xx answers are retried with backoff; other 4xx answers drop the batch.
    """

    def __init__(
        self,
        url: str,
        *,
        client: httpx.AsyncClient | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float = 5.0,
        policy: SinkPolicy = SinkPolicy(),
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        if not url.startswith(("http://", "https://")):
            raise ConfigurationError("url must be an http:// or https:// URL")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        super().__init__(policy, sleep)
        self._url = url
        self._client = client
        self._owns_client = client is None
        self._headers = dict(headers or {})
        self._timeout = timeout

    def __repr__(self) -> str:
        return f"WebhookSink({self._url!r}, policy={self.policy!r})"

    async def _deliver(self, batch: list[AuditRecord]) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, trust_env=False, follow_redirects=False)
        body = json.dumps({"records": batch}, separators=(",", ":"), default=str).encode()
        response = await self._client.post(
            self._url, content=body, headers={"content-type": "application/json", **self._headers}
        )
        response.raise_for_status()

    def _retryable(self, exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError):
            status = exc.response.status_code
            return status == 429 or status >= 500
        return True

    async def _close_resources(self) -> None:
        if self._owns_client and self._client is not None:
            client, self._client = self._client, None
            await client.aclose()


class AuditLogMiddleware:
    """Emits one redacted decision record per refused or flagged request to every sink.

    - `sinks`: where records go (at least one).
    - `redactor`: masks personal data and secrets before any sink sees the record (default `Redactor()`).
    - `flagged_outcomes`: decision outcomes that make a request auditable (default `FLAGGED_OUTCOMES`).
    - `client_resolver`: the trusted-proxy resolver for the client address; `clock`: the wall clock.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        sinks: Sequence[AuditSink],
        redactor: Redactor | None = None,
        flagged_outcomes: Iterable[str] = FLAGGED_OUTCOMES,
        client_resolver: ClientAddressResolver | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        sink_list = list(sinks)
        if not sink_list:
            raise ConfigurationError("sinks may not be empty")
        for sink in sink_list:
            if not isinstance(sink, AuditSink):
                raise ConfigurationError(f"{sink!r} is not an audit sink (emit, aclose)")
        self.app = app
        self.sinks = tuple(sink_list)
        self._redactor = redactor if redactor is not None else Redactor()
        self._flagged = frozenset(flagged_outcomes)
        self._resolver = client_resolver if client_resolver is not None else ClientAddressResolver()
        self._clock = clock

    async def aclose(self) -> None:
        """Close every sink (call from the app's lifespan shutdown)."""
        for sink in self.sinks:
            await sink.aclose()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        meter = ExchangeMeter(receive, send)
        wall = self._clock.time()
        try:
            await meter.run(self.app, scope)
        finally:
            context = peek_context(scope)  # no context: no layer decided anything, nothing to audit
            if context is not None and (
                context.local_response is not None
                or not self._flagged.isdisjoint([decision.outcome for decision in context.decisions])
            ):
                self._emit(self._record(scope, context, meter.status, wall))

    def _record(self, scope: Scope, context: RequestContext, status: int, wall: float) -> dict[str, Any]:
        principal = context.principal
        record = {
            "time": utc_timestamp(wall),
            "request_id": context.request_id,
            "trace_id": context.trace_id,
            "client": self._resolver.resolve(scope),
            "method": request_method(scope),
            "route": route_template(scope),
            "path": scope.get("path", ""),
            "query": scope.get("query_string", b"").decode("latin-1") or None,
            "status": status,
            "local_response": context.local_response,
            "principal": None
            if principal is None
            else {
                "subject": principal.subject,
                "method": principal.method,
                "tenant": principal.tenant,
                "key_id": principal.key_id,
            },
            "flagged": sorted({d.layer for d in context.decisions if d.outcome in self._flagged}),
            "decisions": [
                {
                    "layer": d.layer,
                    "outcome": d.outcome,
                    "rule": d.rule,
                    "reason": d.reason,
                    "details": dict(d.details),
                }
                for d in context.decisions
            ],
        }
        redacted: dict[str, Any] = self._redactor.redact_value(record)
        return redacted

    def _emit(self, record: AuditRecord) -> None:
        for sink in self.sinks:
            try:
                sink.emit(record)
            except Exception:
                # A broken sink must never turn into a failed request.
                _logger.exception("audit sink %r failed to accept a record", sink)
