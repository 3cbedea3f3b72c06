"""OpenTelemetry server spans, built on opentelemetry-instrumentation-asgi's `OpenTelemetryMiddleware`.

The instrumentation starts the server span (honouring incoming `traceparent`/`tracestate` through the global
propagator) and records the HTTP attributes; this layer adds what only the suite knows:

- the span is named `"{method} {route template}"` once the router has matched (`"{method}"` when nothing
  matched), never by raw path, and carries `http.route`;
- the request context's trace id is set (`ctx.trace_id`), so metrics exemplars, logs and audit records
  correlate with the trace;
- every decision recorded by the layers becomes attributes: `nexus.<layer>.outcome`, `.rule`, `.reason`
  and the scalar details (`nexus.breaker.state`, `nexus.proxy.target`, `nexus.proxy.retries`,
  `nexus.cache.outcome`, ...); the principal's subject only with `record_principal=True`, and hashed;
- an oversized `tracestate` (over `max_tracestate_length` bytes) is dropped before extraction; a malformed
  `traceparent` starts a new trace, as the W3C propagator does.

Without an SDK (no `tracer_provider` and no global one at the first request) the instrumentation is skipped:
the layer only extracts the incoming context and makes it current. `inject_trace_headers` is what the proxy
calls to propagate the current context upstream. OpenTelemetry is imported lazily: `import nexus_middleware`
works without the `otel` extra.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from nexus_middleware.context import get_context, request_method, route_template
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from opentelemetry.context import Context
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider

__all__ = ["TracingMiddleware", "inject_trace_headers"]

_TRACESTATE = b"tracestate"
_SCALARS = (str, bool, int, float)


def _trace_id_hex(trace_id: int) -> str:
    return format(trace_id, "032x")


class TracingMiddleware:
    """Server spans named by route template, with the suite's decisions as attributes.

    - `tracer_provider`: the SDK `TracerProvider` to use (default: the global one, a no-op without an SDK;
      whether one is installed is read once, on the first request).
    - `meter_provider`: passed to the instrumentation for its own OTel metrics (default: the global one).
    - `excluded_urls`: comma-separated regexes of URLs not traced (`"/healthz,/metrics"`).
    - `record_principal`: add `nexus.principal.hash`, an HMAC-SHA256 of the principal's subject keyed by
      `principal_hash_key` (plain SHA-256 without a key). The subject itself is never recorded.
    - `max_tracestate_length`: a longer incoming `tracestate` is dropped (W3C recommends 512).
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        excluded_urls: str | None = None,
        record_principal: bool = False,
        principal_hash_key: bytes | None = None,
        max_tracestate_length: int = 512,
    ) -> None:
        if max_tracestate_length <= 0:
            raise ConfigurationError("max_tracestate_length must be positive")
        try:
            from opentelemetry import context as otel_context
            from opentelemetry import propagate, trace
            from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
        except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
            raise ConfigurationError(
                "tracing needs OpenTelemetry: pip install 'nexus-middleware[otel]'"
            ) from exc
        self.app = app
        self._get_current_span = trace.get_current_span
        # Without an SDK every span is non-recording: skip the instrumentation's per-request bookkeeping and
        # only carry the incoming trace context (ids for logs, propagation upstream). Decided on the first
        # request, so an SDK installed as the global provider after the middleware is built (in the app's
        # startup) is still used; an SDK installed after the first request is not.
        self._noop: bool | None = None if tracer_provider is None else False
        self._get_tracer_provider = trace.get_tracer_provider
        self._noop_providers = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
        self._extract = propagate.extract
        self._get_textmap = propagate.get_global_textmap
        self._textmap: Any = None
        self._fields: _Fields | None = None
        self._attach = otel_context.attach
        self._detach = otel_context.detach
        self._record_principal = record_principal
        self._hash_key = principal_hash_key
        self._max_tracestate = max_tracestate_length
        self._instrumented = OpenTelemetryMiddleware(
            self._traced,
            excluded_urls=excluded_urls,
            default_span_details=_initial_span_details,
            tracer_provider=tracer_provider,
            meter_provider=meter_provider,
            exclude_spans=["receive", "send"],
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        noop = self._noop
        if noop is None:
            noop = self._noop = isinstance(self._get_tracer_provider(), self._noop_providers)
        if noop:
            await self._propagate_only(scope, receive, send)
            return
        self._limit_tracestate(scope)
        await self._instrumented(scope, receive, send)

    def _limit_tracestate(self, scope: Scope) -> None:
        headers = scope.get("headers")
        if headers:
            state_length = sum(len(value) + 1 for name, value in headers if name == _TRACESTATE)
            if state_length - 1 > self._max_tracestate:
                scope["headers"] = [(name, value) for name, value in headers if name != _TRACESTATE]

    async def _propagate_only(self, scope: Scope, receive: Receive, send: Send) -> None:
        textmap = self._get_textmap()
        if textmap is not self._textmap:
            self._textmap, self._fields = textmap, _exact_fields(textmap)
        fields = self._fields
        if fields is None:
            # A propagator we do not know may read any header: give it the whole scope.
            self._limit_tracestate(scope)
            incoming = self._extract(scope, getter=_SCOPE_GETTER)
        else:
            # The known propagators read only their fields: collect them in one pass over the headers.
            names, starts_empty = fields
            carrier: dict[str, list[str]] = {}
            for name, value in [pair for pair in scope.get("headers") or () if pair[0] in names]:
                carrier.setdefault(names[name], []).append(value.decode("latin-1"))
            states = carrier.get("tracestate")
            if states is not None and sum(len(state) + 1 for state in states) - 1 > self._max_tracestate:
                self._limit_tracestate(scope)
                del carrier["tracestate"]
            if not carrier and starts_empty:
                # Extraction from nothing yields an empty context: no remote parent, nothing to attach.
                await self.app(scope, receive, send)
                return
            incoming = textmap.extract(carrier, getter=_CARRIER_GETTER)
        span_context = self._get_current_span(incoming).get_span_context()
        if not span_context.is_valid:
            await self.app(scope, receive, send)
            return
        context = get_context(scope)
        if context.trace_id is None:
            context.trace_id = _trace_id_hex(span_context.trace_id)
        token = self._attach(incoming)
        try:
            await self.app(scope, receive, send)
        finally:
            self._detach(token)

    async def _traced(self, scope: Scope, receive: Receive, send: Send) -> None:
        span = self._get_current_span()
        span_context = span.get_span_context()
        context = get_context(scope)
        if span_context.is_valid and context.trace_id is None:
            context.trace_id = _trace_id_hex(span_context.trace_id)
        if not span.is_recording():
            await self.app(scope, receive, send)
            return

        # The instrumentation ends the span with the last body message: name it when the response starts,
        # when the router has matched and the layers have decided.
        async def annotating_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self._annotate(span, scope)
            await send(message)

        try:
            await self.app(scope, receive, annotating_send)
        finally:
            if span.is_recording():
                self._annotate(span, scope)

    def _annotate(self, span: Span, scope: Scope) -> None:
        method = request_method(scope)
        template = route_template(scope)
        if template is not None:
            span.update_name(f"{method} {template}")
            span.set_attribute("http.route", template)
        context = get_context(scope)
        if context.request_id is not None:
            span.set_attribute("nexus.request_id", context.request_id)
        if context.local_response is not None:
            span.set_attribute("nexus.local_response", context.local_response)
        for decision in context.decisions:
            prefix = f"nexus.{decision.layer}."
            span.set_attribute(prefix + "outcome", decision.outcome)
            if decision.rule is not None:
                span.set_attribute(prefix + "rule", decision.rule)
            if decision.reason is not None:
                span.set_attribute(prefix + "reason", decision.reason)
            for key, value in decision.details.items():
                if isinstance(value, _SCALARS):
                    span.set_attribute(prefix + key, value)
        principal = context.principal
        if self._record_principal and principal is not None:
            subject = principal.subject.encode()
            digest = (
                hmac.new(self._hash_key, subject, hashlib.sha256).hexdigest()
                if self._hash_key is not None
                else hashlib.sha256(subject).hexdigest()
            )
            span.set_attribute("nexus.principal.hash", digest)
            span.set_attribute("nexus.principal.method", principal.method)


class _ScopeHeaderGetter:
    """Reads propagation headers straight from the raw ASGI headers (the instrumentation's getter decodes
    every header on every lookup)."""

    def get(self, carrier: Scope, key: str) -> list[str] | None:
        name = key.lower().encode("latin-1")
        values = [value.decode("latin-1") for header, value in carrier.get("headers") or () if header == name]
        return values or None

    def keys(self, carrier: Scope) -> list[str]:
        return [header.decode("latin-1") for header, _ in carrier.get("headers") or ()]


_SCOPE_GETTER: Any = _ScopeHeaderGetter()


class _CarrierGetter:
    """Reads a carrier already reduced to `{field: [values]}`."""

    def get(self, carrier: dict[str, list[str]], key: str) -> list[str] | None:
        return carrier.get(key)

    def keys(self, carrier: dict[str, list[str]]) -> list[str]:  # pragma: no cover - known ones never list
        return list(carrier)


_CARRIER_GETTER: Any = _CarrierGetter()

# Raw header name -> the field a known propagator asks for; and whether extracting from a carrier without
# any of them gives an empty context (the first propagator starts from `Context()`, not the current one).
_Fields = tuple[dict[bytes, str], bool]


def _exact_fields(textmap: Any) -> _Fields | None:
    """The headers `textmap` reads, when it is made only of propagators known to read nothing else."""
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    propagators = (
        getattr(textmap, "_propagators", None) if type(textmap) is CompositePropagator else [textmap]
    )
    if not isinstance(propagators, list | tuple) or not propagators:
        return None
    names: dict[bytes, str] = {}
    for propagator in propagators:
        if type(propagator) not in (TraceContextTextMapPropagator, W3CBaggagePropagator):
            return None
        names.update((field.encode("latin-1"), field) for field in propagator.fields)
    return names, type(propagators[0]) is TraceContextTextMapPropagator


def _initial_span_details(scope: Scope) -> tuple[str, dict[str, Any]]:
    # The route is not known before the app routes: start with the method only, renamed in `_annotate`.
    if scope["type"] == "websocket":
        return "WEBSOCKET", {}
    return str(scope.get("method", "HTTP")), {}


def inject_trace_headers(
    headers: Iterable[tuple[bytes, bytes]], *, context: Context | None = None
) -> list[tuple[bytes, bytes]]:
    """`headers` (raw ASGI pairs) with the current trace context injected, for a request to an upstream.

    Uses the global OpenTelemetry propagator (W3C `traceparent`/`tracestate` by default) and the current
    context (the server span, inside `TracingMiddleware`), or `context`. Incoming propagation headers the
    propagator rewrites are replaced, never duplicated. Without OpenTelemetry installed, or with no active
    span, the headers are returned unchanged.
    """
    result = list(headers)
    try:
        from opentelemetry import propagate
    except ImportError:  # pragma: no cover - exercised in a subprocess without the extra
        return result
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=context)
    if not carrier:
        return result
    names = {name.lower().encode("latin-1") for name in carrier}
    result = [(name, value) for name, value in result if name.lower() not in names]
    result.extend(
        (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in carrier.items()
    )
    return result
