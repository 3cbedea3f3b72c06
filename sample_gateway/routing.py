"""Routing: from a request to a backend (service and version), an upstream policy and an upstream path.

Routes are matched in config order on the normalized path (`request_path`) with the core `RouteTable`, after
choosing the table of the request's `Host` (routes with that host, plus host-less ones, keep their order). A
path that matches only with another method is a 405 with `Allow`; no match is a 404. Then:

1. header-match canary rules, first match wins, send the request to their service/version;
2. otherwise the route's weighted split picks a side: by a hash of the sticky key when the route has one and
   the request carries it (the same client stays on the same side), else by a random draw;
3. the upstream path is the normalized path with the prefix stripped or rewritten from a template.

Everything is compiled once, when the config is loaded; a lookup allocates only its result.
"""

import bisect
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from nexus_middleware.client import ClientAddressResolver
from nexus_middleware.headers import get_header
from nexus_middleware.paths import RouteTable
from nexus_middleware.types import Scope
from sample_gateway.balancing.consistent_hash import hash_key
from sample_gateway.balancing.keys import key_extractor
from sample_gateway.config import GatewayConfig, RouteConfig
from sample_gateway.contracts import AttemptObserver, TargetSelector, UpstreamPolicy

__all__ = [
    "Backend",
    "Choice",
    "CompiledRoute",
    "NoRoute",
    "RouteMatch",
    "Router",
    "build_router",
]


@dataclass(frozen=True, slots=True)
class Backend:
    """A service, or one version of it, with the selector and observer the proxy uses for it."""

    service: str
    version: str | None
    selector: TargetSelector
    observer: AttemptObserver


@dataclass(frozen=True, slots=True)
class Choice:
    """One side of a route: a backend and the policy this route forwards to it with."""

    backend: Backend
    policy: UpstreamPolicy


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    name: str
    pattern: str
    config: RouteConfig
    choices: tuple[Choice, ...]
    cumulative: tuple[int, ...]  # cumulative split weights, for bisect
    canaries: tuple[tuple[bytes, Callable[[str], bool], Choice], ...]
    sticky: Callable[[Scope], str | None] | None
    rewrite: Callable[[str, Mapping[str, str]], str] | None


# A NamedTuple rather than a frozen dataclass: as immutable, and built once per request, where a frozen
# dataclass's __init__ (object.__setattr__ per field) costs about twice as much.
# As a tuple it equals a plain tuple of the same fields; nothing compares matches (isinstance, attributes).
class RouteMatch(NamedTuple):
    route: CompiledRoute
    choice: Choice
    path: str  # the upstream path
    reason: Literal["single", "split", "sticky", "canary"]


@dataclass(frozen=True, slots=True)
class NoRoute:
    status: Literal[404, 405]
    allow: frozenset[str] = frozenset()


_NOT_FOUND = NoRoute(404)


class Router:
    def __init__(self, routes: Sequence[CompiledRoute], *, rng: random.Random | None = None) -> None:
        self._rng = rng if rng is not None else random.Random()
        self.routes = tuple(routes)
        # One table for every host: it picks, per request, the routes with the request's host or none.
        self._table: RouteTable[CompiledRoute] = RouteTable(
            (route.pattern, route.config.methods, route, route.config.host) for route in self.routes
        )

    def __repr__(self) -> str:
        return f"Router(routes={len(self.routes)}, hosts={sorted(self._table.hosts)})"

    def resolve(self, scope: Scope, path: str) -> RouteMatch | NoRoute:
        table = self._table.for_request(scope)
        method = scope.get("method", "GET")
        found = table.match(path, method)
        if found is None:
            if scope["type"] == "http":
                allowed = table.allowed_methods(path)
                if allowed:
                    return NoRoute(405, allowed)
            return _NOT_FOUND
        route, params = found
        choice, reason = self._choose(route, scope)
        return RouteMatch(route, choice, self._upstream_path(route, path, params), reason)

    def _choose(
        self, route: CompiledRoute, scope: Scope
    ) -> tuple[Choice, Literal["single", "split", "sticky", "canary"]]:
        if route.canaries:
            headers = scope.get("headers") or ()
            for name, matches, choice in route.canaries:
                value = get_header(headers, name)
                if value is not None and matches(value.decode("latin-1")):
                    return choice, "canary"
        if len(route.choices) == 1:
            return route.choices[0], "single"
        total = route.cumulative[-1]
        key = route.sticky(scope) if route.sticky is not None else None
        if key is not None:
            return route.choices[bisect.bisect_right(route.cumulative, hash_key(key) % total)], "sticky"
        return route.choices[bisect.bisect_right(route.cumulative, self._rng.randrange(total))], "split"

    @staticmethod
    def _upstream_path(route: CompiledRoute, path: str, params: Mapping[str, str]) -> str:
        if route.rewrite is not None:
            return route.rewrite(path, params)
        return path


def _strip(prefix: str) -> Callable[[str, Mapping[str, str]], str]:
    prefix = prefix.rstrip("/")

    def strip(path: str, params: Mapping[str, str]) -> str:
        if path == prefix:
            return "/"
        if path.startswith(prefix + "/"):
            return path[len(prefix) :]
        return path

    return strip


_TEMPLATE_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _rewrite(template: str) -> Callable[[str, Mapping[str, str]], str]:
    def rewrite(path: str, params: Mapping[str, str]) -> str:
        result = _TEMPLATE_PARAM.sub(lambda match: params.get(match.group(1), ""), template)
        return "/" + result.lstrip("/") if result.startswith("//") else result

    return rewrite


def _header_matcher(equals: str | None, matches: str | None) -> Callable[[str], bool]:
    if equals is not None:
        return lambda value: value == equals
    if matches is not None:
        regex = re.compile(matches)
        return lambda value: regex.search(value) is not None
    return lambda value: True


def build_router(
    config: GatewayConfig,
    backend: Callable[[str, str | None], Backend],
    policy: Callable[[str, RouteConfig], UpstreamPolicy],
    *,
    resolver: ClientAddressResolver | None = None,
    rng: random.Random | None = None,
) -> Router:
    """Compile the routes; `backend(service, version)` and `policy(service, route)` supply the rest."""
    routes = []
    for index, route in enumerate(config.routes):

        def choice(service: str, version: str | None, route: RouteConfig = route) -> Choice:
            return Choice(backend(service, version), policy(service, route))

        if route.split is not None:
            parts = [part for part in route.split if part.weight > 0]
            choices = tuple(choice(part.service, part.version) for part in parts)
            weights = [part.weight for part in parts]
        else:
            choices = (choice(route.service or "", route.version),)
            weights = [1]
        cumulative = []
        running = 0
        for weight in weights:
            running += weight
            cumulative.append(running)
        canaries = tuple(
            (
                rule.header.lower().encode("latin-1"),
                _header_matcher(rule.equals, rule.matches),
                choice(rule.service or route.service or "", rule.version),
            )
            for rule in route.canary
        )
        sticky = (
            None
            if route.sticky is None
            else key_extractor(route.sticky.source, route.sticky.name, resolver=resolver)
        )
        rewrite = None
        if route.rewrite is not None:
            rewrite = _rewrite(route.rewrite)
        elif route.strip_prefix is not None:
            rewrite = _strip(route.strip_prefix)
        routes.append(
            CompiledRoute(
                name=route.name or f"route-{index}",
                pattern=route.path,
                config=route,
                choices=choices,
                cumulative=tuple(cumulative),
                canaries=canaries,
                sticky=sticky,
                rewrite=rewrite,
            )
        )
    return Router(routes, rng=rng)
