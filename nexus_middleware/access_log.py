"""One JSON access-log line per request, through stdlib logging (the library installs no handlers).

Each line holds: time (UTC, ISO 8601), request id, trace id, client address (from the trusted-proxy resolver),
method, route template, path and query (redacted), status, duration in milliseconds, request and response
body bytes, the principal's subject, the layer that answered locally (if any) and the upstream target when
the proxy forwarded the request. The record also rides on the `LogRecord` as `record.nexus_access` (a dict)
for structured handlers. Everything passes through the shared `Redactor` first.
"""

import json
import logging
import math
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.clock import SYSTEM_CLOCK, Clock, utc_timestamp
from nexus_middleware.context import get_context, request_method, route_template
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.exchange import ExchangeMeter
from nexus_middleware.redaction import Redactor
from nexus_middleware.types import ASGIApp, Receive, Scope, Send

__all__ = ["AccessLogMiddleware", "build_access_record"]

_DEFAULT_LOGGER = logging.getLogger(__name__)


class _UtcMillis:
    """`utc_timestamp(epoch)`, with the date and time of day formatted once per second, not once per request.

    The rounding is `datetime.fromtimestamp`'s (microseconds rounded half to even, then truncated to
    milliseconds by `isoformat`), so both give the same text for every timestamp.
    """

    __slots__ = ("_cached",)

    def __init__(self) -> None:
        self._cached: tuple[float, str] = (math.nan, "")  # (whole second, its "YYYY-MM-DDTHH:MM:SS")

    def __call__(self, epoch: float) -> str:
        fraction, second = math.modf(epoch)
        micros = round(fraction * 1e6)
        if micros >= 1_000_000:
            second += 1.0
            micros -= 1_000_000
        elif micros < 0:
            second -= 1.0
            micros += 1_000_000
        cached_second, prefix = self._cached
        if second != cached_second:
            prefix = datetime.fromtimestamp(second, UTC).isoformat()[:-6]  # drop "+00:00"
            self._cached = (second, prefix)
        return f"{prefix}.{micros // 1000:03d}Z"


def build_access_record(
    scope: Scope,
    *,
    status: int,
    duration: float,
    bytes_in: int,
    bytes_out: int,
    wall_time: float,
    client: str | None,
    redactor: Redactor,
) -> dict[str, Any]:
    """The access-log record of a finished request, redacted."""
    return _record(scope, status, duration, bytes_in, bytes_out, utc_timestamp(wall_time), client, redactor)


def _record(
    scope: Scope,
    status: int,
    duration: float,
    bytes_in: int,
    bytes_out: int,
    time_text: str,
    client: str | None,
    redactor: Redactor,
) -> dict[str, Any]:
    context = get_context(scope)
    principal = context.principal
    proxy = context.decision("proxy") if context.decisions else None
    query = scope.get("query_string", b"")
    record: dict[str, Any] = {
        "time": time_text,
        "request_id": context.request_id,
        "trace_id": context.trace_id,
        "client": client,
        "method": request_method(scope),
        "route": route_template(scope),
        "path": redactor.redact(scope.get("path", "")),
        "query": redactor.redact(query.decode("latin-1")) if query else None,
        "status": status,
        "duration_ms": round(duration * 1000, 3),
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "principal": None if principal is None else redactor.redact(principal.subject),
        "local_response": context.local_response,
        "upstream": None if proxy is None else proxy.details.get("target"),
    }
    return record


class AccessLogMiddleware:
    """Logs one JSON line per http request and websocket session.

    - `logger`: where to log (default `logging.getLogger("nexus_middleware.access_log")`); `level`: INFO.
    - `client_resolver`: the trusted-proxy resolver (default: the TCP peer).
    - `redactor`: masks secrets and personal data (default `Redactor()`).
    - `clock`: wall-clock time for the timestamp and monotonic time for the duration.
    - `skip`: a predicate on the scope; requests it accepts are not logged (health checks).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        logger: logging.Logger | None = None,
        level: int = logging.INFO,
        client_resolver: ClientAddressResolver | None = None,
        redactor: Redactor | None = None,
        clock: Clock = SYSTEM_CLOCK,
        skip: Callable[[Scope], bool] | None = None,
    ) -> None:
        if not isinstance(level, int) or level <= 0:
            raise ConfigurationError("level must be a positive logging level")
        self.app = app
        self._logger = logger if logger is not None else _DEFAULT_LOGGER
        self._level = level
        self._resolver = client_resolver if client_resolver is not None else ClientAddressResolver()
        self._redactor = redactor if redactor is not None else Redactor()
        self._clock = clock
        self._skip = skip
        self._time_text = _UtcMillis()
        self._encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str).encode

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket") or not self._logger.isEnabledFor(self._level):
            await self.app(scope, receive, send)
            return
        if self._skip is not None and self._skip(scope):
            await self.app(scope, receive, send)
            return
        meter = ExchangeMeter(receive, send)
        wall = self._clock.time()
        start = self._clock.monotonic()
        try:
            await meter.run(self.app, scope)
        finally:
            duration = self._clock.monotonic() - start
            self._log(scope, meter.status, duration, meter.bytes_in, meter.bytes_out, wall)

    def _log(
        self, scope: Scope, status: int, duration: float, bytes_in: int, bytes_out: int, wall: float
    ) -> None:
        logger, level = self._logger, self._level
        if not logger.isEnabledFor(level):  # the level may have changed while the request ran
            return
        record = _record(
            scope,
            status,
            duration,
            bytes_in,
            bytes_out,
            self._time_text(wall),
            self._resolver.resolve(scope),
            self._redactor,
        )
        # What `logger.log` does, minus `findCaller`'s walk up the stack: the caller is always this line.
        frame = sys._getframe()
        log_record = logger.makeRecord(
            logger.name,
            level,
            frame.f_code.co_filename,
            frame.f_lineno,
            self._encode(record),
            (),
            None,
            frame.f_code.co_name,
            {"nexus_access": record},
        )
        logger.handle(log_record)
