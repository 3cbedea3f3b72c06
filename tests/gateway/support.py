"""Helpers of the gateway tests: a minimal gateway for proxy tests (`ReverseProxy.forward` behind the core
path normalization), and the whole gateway built from a config dict behind real uvicorn, with its upstream
and identity provider on loopback."""

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from joserfc.jwk import ECKey

from nexus_middleware.errors import InvalidPathError
from nexus_middleware.paths import INVALID_PATH, request_path
from nexus_middleware.problem import send_problem
from nexus_middleware.types import ASGIApp, Receive, Scope, Send
from sample_gateway.app import create_app
from sample_gateway.config import parse_config
from sample_gateway.contracts import AttemptOutcome, Target, UpstreamPolicy
from sample_gateway.proxy import ReverseProxy
from tests.support.idp import AUDIENCE, ISSUER, JWKSApp, mint
from tests.support.servers import serve
from tests.support.upstream import UpstreamApp


class ListSelector:
    """Round robin over a fixed list of targets, skipping the excluded ones."""

    def __init__(self, targets: list[Target]) -> None:
        self.targets = targets
        self._counter = itertools.count()

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        candidates = [target for target in self.targets if target.id not in exclude]
        if not candidates:
            return None
        return candidates[next(self._counter) % len(candidates)]


class FirstSelector(ListSelector):
    """Always the first target not excluded: every request tries the same target first."""

    async def select(self, scope: Scope, *, exclude: frozenset[str] = frozenset()) -> Target | None:
        return next((target for target in self.targets if target.id not in exclude), None)


@dataclass
class RecordingObserver:
    started: list[str] = field(default_factory=list)
    finished: list[tuple[str, AttemptOutcome, int | None]] = field(default_factory=list)

    def attempt_started(self, target: Target) -> None:
        self.started.append(target.id)

    def attempt_finished(
        self, target: Target, *, outcome: AttemptOutcome, status: int | None, latency: float
    ) -> None:
        assert latency >= 0
        self.finished.append((target.id, outcome, status))


def proxy_app(
    proxy: ReverseProxy,
    selector: ListSelector,
    policy: UpstreamPolicy,
    observer: RecordingObserver | None = None,
    decisions: list[object] | None = None,
) -> ASGIApp:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        try:
            path = request_path(scope)
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer="paths")
            return
        try:
            await proxy.forward(
                scope, receive, send, selector=selector, policy=policy, path=path, observer=observer
            )
        finally:
            if decisions is not None:
                decisions.extend(scope["state"]["nexus"].decisions)

    return app


ADMIN_KEY = "stack-admin-key"
ADMIN = {"x-admin-key": ADMIN_KEY}
KEY_ID = "0123456789abcdef"
KEY_SECRET = "s3cr3t-" + "k" * 36
API_KEY = f"nx_{KEY_ID}_{KEY_SECRET}"


def settings(upstream_url: str, *, routes: list[dict[str, Any]], **sections: Any) -> dict[str, Any]:
    service: dict[str, Any] = {
        "name": "echo",
        "targets": [{"url": upstream_url, "id": "t0"}],
        "health_check": {"enabled": False},
        "outlier_detection": {"enabled": False},
        "retry": {"attempts": 1},
    }
    service.update(sections.pop("service", {}))
    return {
        "services": [service],
        "routes": [{**route, "service": "echo"} for route in routes],
        "admin": {"api_keys": [ADMIN_KEY]},
        **sections,
    }


@contextlib.asynccontextmanager
async def gateway(data: dict[str, Any]) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(parse_config(data, environ={}))
    async with serve(app, lifespan="on") as base, httpx.AsyncClient(base_url=base) as http:
        yield http


@contextlib.asynccontextmanager
async def upstream() -> AsyncIterator[tuple[str, UpstreamApp]]:
    app = UpstreamApp(name="echo")
    async with serve(app) as url:
        yield url, app


@contextlib.asynccontextmanager
async def identity_provider(key: ECKey) -> AsyncIterator[dict[str, Any]]:
    async with serve(JWKSApp(keys=[key])) as url:
        yield {"issuers": [{"issuer": ISSUER, "jwks_url": f"{url}/jwks", "audiences": [AUDIENCE]}]}


def token(key: ECKey, **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {mint(key, now=time.time(), **claims)}"}


def limited(url: str, limit: str, **sections: Any) -> dict[str, Any]:
    return settings(
        url,
        routes=[{"path": "/items/{id}", "rate_limits": ["tight"]}, {"path": "/free/*"}],
        rate_limits={"policies": {"tight": {"limits": [limit], "key": "client"}}},
        **sections,
    )


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    """Poll what a real server exposes (no clock to inject there) until `condition` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)
