"""Prometheus metrics: RED metrics per route template, and the suite's decisions from the request context.

`MetricsMiddleware` belongs OUTERMOST (or right inside the request-id layer), so that 401, 413, 429 and 503
answered by inner layers are counted like any other response. Labels never carry raw paths: the route is the
router's template (`route_template(scope)`), else the first configured pattern that matches, else `unmatched`;
methods outside the standard set are `OTHER`. Cardinality is bounded by the routes you wrote.

State that is not per request (breaker states, target health, cache sizes) is exposed through
`register_gauge_source(registry, name, source, ...)`: the callable is read at scrape time.

`MetricsApp` is the mountable `/metrics` endpoint, restricted to an address allowlist checked against the
client address from the trusted-proxy resolver, with content negotiation (OpenMetrics carries the trace-id
exemplars) and the multiprocess collector for several worker processes.

prometheus-client is imported lazily: `import nexus_middleware` works without the `prometheus` extra.
"""

from __future__ import annotations

import asyncio
import copy
import ipaddress
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from nexus_middleware.client import AddressSet, ClientAddressResolver
from nexus_middleware.context import Decision, peek_context, route_template
from nexus_middleware.errors import ConfigurationError, InvalidPathError
from nexus_middleware.exchange import ExchangeMeter
from nexus_middleware.headers import get_header
from nexus_middleware.paths import RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry
    from prometheus_client.metrics_core import Metric

__all__ = [
    "DEFAULT_DURATION_BUCKETS",
    "DEFAULT_SIZE_BUCKETS",
    "GaugeSource",
    "MetricsApp",
    "MetricsMiddleware",
    "UNMATCHED_ROUTE",
    "register_gauge_source",
]

UNMATCHED_ROUTE = "unmatched"
DEFAULT_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
DEFAULT_SIZE_BUCKETS = (64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0, 1048576.0, 4194304.0)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"})
_STATUS_CLASSES = ("0xx", "1xx", "2xx", "3xx", "4xx", "5xx")

# What a gauge source returns: one value, or values by label values (a tuple, or a str for one label).
GaugeSource = Callable[[], float | Mapping[tuple[str, ...] | str, float]]


def _import_prometheus() -> Any:
    try:
        import prometheus_client
        import prometheus_client.exposition
        import prometheus_client.metrics_core
        import prometheus_client.multiprocess
    except ImportError as exc:  # pragma: no cover - exercised in a subprocess without the extra
        raise ConfigurationError(
            "metrics need prometheus-client: pip install 'nexus-middleware[prometheus]'"
        ) from exc
    return prometheus_client


_RedChildren = tuple[Any, Any, Any, Any]  # requests, duration, request size, response size


def _label(value: Any) -> str:
    return "" if value is None else str(value)


class _Metrics:
    """The metric families of one middleware, with label children cached per label tuple."""

    def __init__(
        self,
        registry: CollectorRegistry,
        namespace: str,
        buckets: Sequence[float],
        size_buckets: Sequence[float],
    ) -> None:
        prom = _import_prometheus()
        common: dict[str, Any] = {"namespace": namespace, "registry": registry}
        red = ("method", "route", "status_class")
        try:
            self.requests = prom.Counter("http_requests", "HTTP requests answered.", red, **common)
            self.duration = prom.Histogram(
                "http_request_duration_seconds",
                "Time from the request to the end of the response.",
                red,
                buckets=buckets,
                **common,
            )
            self.request_size = prom.Histogram(
                "http_request_size_bytes",
                "Request body bytes read.",
                ("method", "route"),
                buckets=size_buckets,
                **common,
            )
            self.response_size = prom.Histogram(
                "http_response_size_bytes",
                "Response body bytes sent.",
                ("method", "route"),
                buckets=size_buckets,
                **common,
            )
            self.in_flight = prom.Gauge(
                "http_requests_in_flight",
                "Requests being handled.",
                ("method",),
                multiprocess_mode="livesum",
                **common,
            )
            self.websocket = prom.Counter(
                "websocket_connections", "WebSocket handshakes by outcome.", ("route", "outcome"), **common
            )
            self.decisions = prom.Counter(
                "decisions", "Decisions recorded by the nexus layers.", ("layer", "outcome"), **common
            )
            self.ratelimit = prom.Counter(
                "ratelimit_decisions", "Rate-limit decisions per policy.", ("policy", "outcome"), **common
            )
            self.auth_failures = prom.Counter(
                "auth_failures", "Authentication and authorization refusals.", ("layer", "reason"), **common
            )
            self.breaker_rejections = prom.Counter(
                "breaker_rejections", "Requests refused by an open circuit breaker.", ("key",), **common
            )
            self.concurrency_rejections = prom.Counter(
                "concurrency_rejections",
                "Requests shed or timed out waiting for a concurrency slot.",
                ("key", "outcome"),
                **common,
            )
            self.upstream_requests = prom.Counter(
                "upstream_requests",
                "Requests forwarded upstream by outcome.",
                ("service", "target", "outcome"),
                **common,
            )
            self.upstream_errors = prom.Counter(
                "upstream_errors", "Upstream failures (no usable answer).", ("service", "target"), **common
            )
            self.upstream_retries = prom.Counter(
                "upstream_retries", "Retries made towards upstreams.", ("service", "target"), **common
            )
            self.upstream_duration = prom.Histogram(
                "upstream_duration_seconds",
                "Upstream latency, when the proxy reports it.",
                ("service", "target"),
                buckets=buckets,
                **common,
            )
        except ValueError as exc:
            raise ConfigurationError(
                f"{exc}: each MetricsMiddleware needs its own registry or namespace "
                "(pass registry=CollectorRegistry())"
            ) from exc
        # method -> route -> the RED children of each status class (indexed like _STATUS_CLASSES), filled
        # on first use: a request finds its children with two dict lookups and an index, allocating nothing.
        self.red: dict[str, dict[str, list[_RedChildren | None]]] = {
            method: {} for method in (*_METHODS, "OTHER")
        }
        self.in_flight_children = {method: self.in_flight.labels(method) for method in (*_METHODS, "OTHER")}
        self.children: dict[tuple[Any, ...], Any] = {}
        self.decision_counters: dict[tuple[Any, ...], tuple[Any, ...]] = {}

    def child(self, family: Any, *labels: str) -> Any:
        key = (family, *labels)
        found = self.children.get(key)
        if found is None:
            found = self.children[key] = family.labels(*labels)
        return found

    def red_children(self, method: str, route: str, status_index: int) -> _RedChildren:
        by_class = self.red[method].get(route)
        if by_class is None:
            by_class = self.red[method][route] = [None] * len(_STATUS_CLASSES)
        found = by_class[status_index]
        if found is None:
            status_class = _STATUS_CLASSES[status_index]
            found = by_class[status_index] = (
                self.requests.labels(method, route, status_class),
                self.duration.labels(method, route, status_class),
                self.request_size.labels(method, route),
                self.response_size.labels(method, route),
            )
        return found

    def record_decision(self, decision: Decision) -> None:
        layer, outcome, details = decision.layer, decision.outcome, decision.details
        # The signature holds exactly the label values this decision feeds, so the cache is bounded by the
        # label sets themselves.
        signature: tuple[Any, ...]
        if layer == "proxy":
            signature = (layer, outcome, details.get("service"), details.get("target"))
        elif layer == "ratelimit":
            signature = (layer, outcome, decision.rule)
        elif layer in ("auth", "rbac"):
            signature = (layer, outcome, decision.reason or decision.rule)
        elif layer in ("breaker", "concurrency"):
            signature = (layer, outcome, details.get("key"))
        else:
            signature = (layer, outcome)
        counters = self.decision_counters.get(signature)
        if counters is None:
            counters = self.decision_counters[signature] = self._decision_counters(signature)
        for counter in counters:
            counter.inc()
        if layer == "proxy":
            retries = details.get("retries")
            if isinstance(retries, int) and retries > 0:
                self.child(self.upstream_retries, *map(_label, signature[2:])).inc(retries)
            duration = details.get("duration")
            if isinstance(duration, int | float):
                self.child(self.upstream_duration, *map(_label, signature[2:])).observe(duration)

    def _decision_counters(self, signature: tuple[Any, ...]) -> tuple[Any, ...]:
        layer, outcome, *rest = signature
        labels = [_label(value) for value in rest]
        counters = [self.decisions.labels(layer, outcome)]
        if layer == "ratelimit":
            counters.append(self.ratelimit.labels(labels[0], outcome))
        elif layer in ("auth", "rbac") and outcome == "deny":
            counters.append(self.auth_failures.labels(layer, labels[0]))
        elif layer == "breaker" and outcome == "reject":
            counters.append(self.breaker_rejections.labels(labels[0]))
        elif layer == "concurrency" and outcome in ("shed", "queue_timeout"):
            counters.append(self.concurrency_rejections.labels(labels[0], outcome))
        elif layer == "proxy":
            counters.append(self.upstream_requests.labels(labels[0], labels[1], outcome))
            if outcome == "error":
                counters.append(self.upstream_errors.labels(labels[0], labels[1]))
        return tuple(counters)


class MetricsMiddleware:
    """Counts every request by method, route template and status class, and the suite's decisions.

    - `registry`: the `CollectorRegistry` to register on (default: prometheus-client's global one). Give each
      middleware instance its own, or a distinct `namespace`.
    - `namespace`: metric name prefix (`nexus_http_requests_total`).
    - `routes`: route patterns (`"/users/{id}"`, `"/static/*"`) used as labels when no router resolved a
      template, e.g. for requests an inner layer refused before routing or a bare proxy.
    - `buckets`, `size_buckets`: histogram buckets for durations (seconds) and body sizes (bytes).
    - `exemplars`: attach the trace id (set in the request context by `TracingMiddleware`) as an exemplar to
      the request counter and the duration histogram; exposed by OpenMetrics scrapes.
    - `clock`: a zero-argument monotonic timer.
    """

    def __init__(
        self,
        app: ASGIApp,
        /,
        *,
        registry: CollectorRegistry | None = None,
        namespace: str = "nexus",
        routes: Iterable[str] = (),
        buckets: Sequence[float] = DEFAULT_DURATION_BUCKETS,
        size_buckets: Sequence[float] = DEFAULT_SIZE_BUCKETS,
        exemplars: bool = False,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if not namespace.replace("_", "").isalnum() or namespace[0].isdigit():
            raise ConfigurationError(f"namespace {namespace!r} must be letters, digits and underscores")
        if not buckets or not size_buckets:
            raise ConfigurationError("buckets and size_buckets may not be empty")
        prom = _import_prometheus()
        self.app = app
        self.registry: CollectorRegistry = prom.REGISTRY if registry is None else registry
        self._metrics = _Metrics(self.registry, namespace, buckets, size_buckets)
        route_list = list(routes)
        self._routes: RouteTable[str] | None = (
            RouteTable([(pattern, None, pattern) for pattern in route_list]) if route_list else None
        )
        self._exemplars = exemplars
        self._clock = clock

    def wrapping(self, app: ASGIApp) -> MetricsMiddleware:
        """This middleware's metrics (registry, series, options) around another app. An app that rebuilds
        its stack (the gateway's reload) keeps counting into the same series: a second middleware on the
        registry would clash, and a new registry would reset every counter."""
        twin = copy.copy(self)
        twin.app = app
        return twin

    def _route(self, scope: Scope) -> str:
        template = route_template(scope)
        if template is not None:
            return template
        if self._routes is not None:
            try:
                matched = self._routes.lookup(request_path(scope))
            except InvalidPathError:
                return UNMATCHED_ROUTE
            if matched is not None:
                return matched
        return UNMATCHED_ROUTE

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await self._websocket(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        metrics = self._metrics
        method = scope["method"]
        if method not in _METHODS:
            method = "OTHER"
        in_flight = metrics.in_flight_children[method]
        in_flight.inc()
        meter = ExchangeMeter(receive, send)
        start = self._clock()
        try:
            await meter.run(self.app, scope)
        finally:
            elapsed = self._clock() - start
            in_flight.dec()
            self._observe(scope, method, meter.status, elapsed, meter.bytes_in, meter.bytes_out)

    def _observe(
        self, scope: Scope, method: str, status: int, elapsed: float, bytes_in: int, bytes_out: int
    ) -> None:
        metrics = self._metrics
        route = self._route(scope)
        by_class = metrics.red[method].get(route)
        status_index = status // 100 if 100 <= status < 600 else 0
        children = None if by_class is None else by_class[status_index]
        if children is None:
            children = metrics.red_children(method, route, status_index)
        requests, duration, request_size, response_size = children
        context = peek_context(scope)
        trace_id = context.trace_id if context is not None and self._exemplars else None
        if trace_id:
            exemplar = {"trace_id": trace_id}
            requests.inc(1, exemplar)
            duration.observe(elapsed, exemplar)
        else:
            requests.inc()
            duration.observe(elapsed)
        request_size.observe(bytes_in)
        response_size.observe(bytes_out)
        if context is not None and context.decisions:
            record_decision = metrics.record_decision
            for decision in context.decisions:
                record_decision(decision)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        outcome = "closed"

        async def watching_send(message: Message) -> None:
            nonlocal outcome
            kind = message["type"]
            if outcome == "closed":
                if kind == "websocket.accept":
                    outcome = "accepted"
                elif kind == "websocket.http.response.start":
                    outcome = f"denied_{_STATUS_CLASSES[message['status'] // 100]}"
                elif kind == "websocket.close":
                    outcome = "denied"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        finally:
            metrics = self._metrics
            metrics.child(metrics.websocket, self._route(scope), outcome).inc()
            context = peek_context(scope)
            if context is not None:
                for decision in context.decisions:
                    metrics.record_decision(decision)


class _CallableCollector:
    """A collector whose samples come from a callable at scrape time."""

    def __init__(
        self, name: str, documentation: str, labels: tuple[str, ...], source: GaugeSource, kind: str
    ) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = labels
        self._source = source
        self._kind = kind

    def describe(self) -> list[Metric]:
        return [self._family()]

    def _family(self) -> Any:
        core = _import_prometheus().metrics_core
        family_type = core.CounterMetricFamily if self._kind == "counter" else core.GaugeMetricFamily
        return family_type(self._name, self._documentation, labels=self._labels)

    def collect(self) -> Iterator[Metric]:
        family = self._family()
        values = self._source()
        if isinstance(values, Mapping):
            for key, value in values.items():
                label_values = [key] if isinstance(key, str) else list(key)
                family.add_metric(label_values, float(value))
        else:
            family.add_metric([], float(values))
        yield family


def register_gauge_source(
    registry: CollectorRegistry,
    name: str,
    source: GaugeSource,
    *,
    documentation: str = "",
    labels: Sequence[str] = (),
    kind: str = "gauge",
) -> Any:
    """Expose state that is not per request, read from `source()` at every scrape.

    `source` returns a number, or a mapping from label values to numbers (`{("payments",): 2}`, or
    `{"payments": 2}` for one label). `kind="counter"` for cumulative counts (breaker transitions). Returns
    the collector, so `registry.unregister(collector)` removes it. Conventions for the suite:
    `nexus_breaker_state{key}` (0 closed, 1 half-open, 2 open), `nexus_breaker_transitions_total{key,to}`,
    `nexus_upstream_target_healthy{service,target}` (0/1), `nexus_cache_entries`.
    """
    if kind not in ("gauge", "counter"):
        raise ConfigurationError("kind must be 'gauge' or 'counter'")
    if not callable(source):
        raise ConfigurationError("source must be callable")
    collector = _CallableCollector(name, documentation or name, tuple(labels), source, kind)
    registry.register(cast(Any, collector))
    return collector


class _RegistryCollector:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        yield from self._registry.collect()


class MetricsApp:
    """The `/metrics` endpoint as an ASGI app: mount it, or route to it.

    - `registry`: what to expose (default: the global registry). With `multiprocess_dir`, the metrics come
      from the worker files in that directory, and `registry` (if given) adds collectors that are not per
      process, such as gauge sources; it must not be the registry the middleware writes to.
    - `multiprocess_dir`: the `PROMETHEUS_MULTIPROC_DIR` of the workers (read the environment in your setup
      code and pass it here; the library never reads the environment).
    - `allow`: addresses or CIDRs allowed to scrape (default loopback only; `"*"` for everyone), checked
      against `client_resolver.resolve(scope)`.
    """

    def __init__(
        self,
        *,
        registry: CollectorRegistry | None = None,
        multiprocess_dir: str | None = None,
        allow: Iterable[str] = ("127.0.0.1/32", "::1/128"),
        client_resolver: ClientAddressResolver | None = None,
    ) -> None:
        prom = _import_prometheus()
        allowlist = AddressSet(allow, option="allow")
        if multiprocess_dir is not None and not multiprocess_dir:
            raise ConfigurationError("multiprocess_dir may not be empty")
        self._prom = prom
        self._registry = registry
        self._multiprocess_dir = multiprocess_dir
        self._allowlist = allowlist
        self._resolver = client_resolver if client_resolver is not None else ClientAddressResolver()

    def _allowed(self, scope: Scope) -> bool:
        address = self._resolver.resolve(scope)
        return address is not None and ipaddress.ip_address(address) in self._allowlist

    def _render(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = self._prom.exposition.choose_encoder(accept)
        if self._multiprocess_dir is None:
            registry = self._registry if self._registry is not None else self._prom.REGISTRY
        else:
            registry = self._prom.CollectorRegistry()
            self._prom.multiprocess.MultiProcessCollector(registry, path=self._multiprocess_dir)
            if self._registry is not None:
                registry.register(_RegistryCollector(self._registry))
        return encoder(registry), content_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send_problem(scope, send, Problem(404, "metrics are served over HTTP"), layer="metrics")
            if scope["type"] == "lifespan":  # served on its own: nothing to start or stop
                while (await receive())["type"] != "lifespan.shutdown":
                    await send({"type": "lifespan.startup.complete"})
                await send({"type": "lifespan.shutdown.complete"})
            return
        if not self._allowed(scope):
            await send_problem(
                scope, send, Problem(403, "metrics are not exposed to this client"), layer="metrics"
            )
            return
        method = scope["method"]
        if method not in ("GET", "HEAD"):
            await send_problem(
                scope, send, Problem(405, "use GET"), headers=[(b"allow", b"GET, HEAD")], layer="metrics"
            )
            return
        accept = (get_header(scope.get("headers") or (), b"accept") or b"").decode("latin-1")
        if self._multiprocess_dir is None:
            body, content_type = self._render(accept)
        else:
            # Reading the worker files is file I/O: keep it off the event loop.
            body, content_type = await asyncio.to_thread(self._render, accept)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode("latin-1")),
                    (b"content-length", str(len(body)).encode()),
                    (b"cache-control", b"no-store"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
