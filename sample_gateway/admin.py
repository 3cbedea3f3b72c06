"""The admin API: services, targets and their health, registration, breakers, rate-limit policies, reload.

Mounted under `admin.prefix` on the main listener (answered by `GatewayEdge` before the policy layers) or
served on its own listener (`admin.listen`). Every request needs an admin credential: one of `admin.api_keys`
(as `Authorization: Bearer <key>` or `X-Admin-Key: <key>`, compared in constant time), or an authenticated
principal holding one of `admin.roles`, as left in the request context by an authentication layer in front
of this app. A missing and a wrong credential get the same 401.

| method | path | what |
|---|---|---|
| GET | `/` | what the admin API offers, and the layers wired in the stack |
| GET | `/services`, `/services/{name}` | targets with health, ejection and in-flight counts |
| POST | `/services/{name}/targets` | register a target (`url`, `id`, `weight`, `version`, `zone`, `tags`) |
| DELETE | `/services/{name}/targets/{id}` | deregister a dynamic target |
| GET | `/breakers` | breaker states, one per service with `services[].breaker` (`wired: false` without any) |
| GET, PUT | `/rate-limits` | view and replace the rate-limit policies |
| POST | `/reload` | reload the config: the body (YAML or JSON) or, empty, the file; validated first |
| GET | `/status` | a small live status page (HTML) |

A reload applies services, targets and routes, and rebuilds the middleware stack when the policies it reads
changed (`stack_policy_changes`): state whose resource is unchanged survives (rate-limit counters, breaker
states, JWKS caches, API-key stores, target health). `RESTART_KEYS` keep their running values until a restart.
"""

import hashlib
import hmac
import html
import json
import logging
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from nexus_middleware.context import peek_context
from nexus_middleware.errors import ConfigurationError, InvalidPathError, StorageError
from nexus_middleware.headers import get_header
from nexus_middleware.paths import INVALID_PATH, RouteTable, request_path
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import Receive, Scope, Send
from sample_gateway.config import (
    GatewayConfigError,
    RateLimitsConfig,
    config_from_text,
    cross_check,
    format_location,
    stack_policy_changes,
)
from sample_gateway.registry import TargetConflictError, UnknownServiceError, build_target, target_to_dict
from sample_gateway.runtime import GatewayRuntime

__all__ = ["AdminApp"]

logger = logging.getLogger(__name__)

MAX_BODY = 1024 * 1024
# Keys whose change only takes effect at the next start: the listeners and the admin API's own settings, the
# storage URIs (the registry store, the limiter and breaker storage), the upstream client, and the trusted
# proxies every layer resolves client addresses with. A reload keeps the running values of these.
RESTART_KEYS = ("listen", "admin", "storage", "upstream_client", "trusted_proxies")

_UNAUTHORIZED = Problem(401, "An admin credential is required.")
_STORE_DOWN = Problem(503, "The registry store is unavailable; try again.")
_NO_WEBSOCKET = Problem(404, "The admin API has no websocket.")
_CHALLENGE = [(b"www-authenticate", b'Bearer realm="nexus-admin"')]


@dataclass(frozen=True, slots=True)
class _Request:
    scope: Scope
    params: Mapping[str, str]
    body: bytes

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise _Refusal(Problem(400, f"The body is not valid JSON: {exc}")) from None


class _Refusal(Exception):
    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        self.problem = problem


@contextmanager
def _registry_refusals(service: str) -> Iterator[None]:
    # How the registry's write errors are answered, the same for every endpoint that writes to it.
    try:
        yield
    except UnknownServiceError:
        raise _Refusal(Problem(404, f"No service named {service!r}.")) from None
    except TargetConflictError as exc:
        raise _Refusal(Problem(409, str(exc))) from None
    except StorageError:
        raise _Refusal(_STORE_DOWN) from None


_Response = tuple[int, Any]
_Handler = Callable[["AdminApp", _Request], Awaitable[_Response]]


def _digest(value: str | bytes) -> bytes:
    return hashlib.sha256(value.encode() if isinstance(value, str) else value).digest()


class AdminApp:
    """The admin API as a pure ASGI app. `prefix` is stripped from the path (None on its own listener)."""

    def __init__(self, runtime: GatewayRuntime, /, *, prefix: str | None = None) -> None:
        self.runtime = runtime
        self._prefix = prefix or ""
        admin = runtime.config.admin
        # Digests of equal length: comparing them takes the same time whatever the key's length.
        self._key_digests = tuple(_digest(key.get_secret_value()) for key in admin.api_keys)
        self._roles = frozenset(admin.roles)
        self._routes: RouteTable[_Handler] = RouteTable(
            [
                ("/", ["GET"], AdminApp._index),
                ("/services", ["GET"], AdminApp._services),
                ("/services/{name}", ["GET"], AdminApp._service),
                ("/services/{name}/targets", ["POST"], AdminApp._register),
                ("/services/{name}/targets/{target_id}", ["DELETE"], AdminApp._deregister),
                ("/breakers", ["GET"], AdminApp._breakers),
                ("/rate-limits", ["GET"], AdminApp._rate_limits),
                ("/rate-limits", ["PUT"], AdminApp._replace_rate_limits),
                ("/reload", ["POST"], AdminApp._reload),
                ("/status", ["GET"], AdminApp._status),
            ]
        )

    def __repr__(self) -> str:
        return f"AdminApp(prefix={self._prefix!r}, roles={sorted(self._roles)})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            if scope["type"] == "websocket":
                await send_problem(
                    scope, send, Problem(404, "The admin API has no websocket."), layer="admin"
                )
            return
        if not self._authorized(scope):
            await send_problem(scope, send, _UNAUTHORIZED, headers=_CHALLENGE, layer="admin")
            return
        try:
            path = request_path(scope)[len(self._prefix) :] or "/"
        except InvalidPathError:
            await send_problem(scope, send, INVALID_PATH, layer="admin")
            return
        found = self._routes.match(path, scope["method"])
        if found is None:
            allowed = self._routes.allowed_methods(path)
            if allowed:
                allow = ", ".join(sorted(allowed))
                problem = Problem(405, f"This path accepts {allow}.")
                await send_problem(scope, send, problem, headers=[(b"allow", allow.encode())], layer="admin")
            else:
                await send_problem(scope, send, Problem(404, "No such admin resource."), layer="admin")
            return
        handler, params = found
        try:
            body = await _read_body(receive)
            status, payload = await handler(self, _Request(scope, params, body))
        except _Refusal as refusal:
            await send_problem(scope, send, refusal.problem, layer="admin")
            return
        await _respond(send, status, payload)

    def _authorized(self, scope: Scope) -> bool:
        headers = scope.get("headers") or ()
        given = get_header(headers, b"x-admin-key")
        if given is None:
            authorization = get_header(headers, b"authorization")
            if authorization is not None and authorization[:7].lower() == b"bearer ":
                given = authorization[7:].strip()
        if given is not None:
            digest = _digest(given)
            matched = False
            for expected in self._key_digests:  # no early exit: every key is compared
                matched |= hmac.compare_digest(digest, expected)
            if matched:
                return True
        context = peek_context(scope)
        principal = None if context is None else context.principal
        return bool(principal is not None and principal.is_authenticated and principal.roles & self._roles)

    # -- handlers -----------------------------------------------------------------------------------------

    async def _index(self, request: _Request) -> _Response:
        from sample_gateway.stack import wired

        runtime = self.runtime
        return 200, {
            "services": runtime.registry.services(),
            "routes": [route.name for route in runtime.router.routes],
            "stack": wired(runtime.config, runtime),
            "started": runtime.started,
            "endpoints": ["/services", "/breakers", "/rate-limits", "/reload", "/status"],
        }

    def _service_view(self, name: str) -> dict[str, Any]:
        runtime = self.runtime
        if name not in runtime.registry.services():
            raise _Refusal(Problem(404, f"No service named {name!r}."))
        runtime.sync_targets()
        health = runtime.tracker.service(name)
        now = runtime.tracker.now()
        config = runtime.config.service(name)
        targets = []
        for target in runtime.registry.targets(name):
            state = health.state(target.id)
            view = target_to_dict(target)
            view["source"] = "config" if runtime.registry.is_static(name, target.id) else "dynamic"
            if state is not None:
                view.update(state.to_dict(now))
            targets.append(view)
        return {
            "name": name,
            "strategy": config.load_balancing.strategy,
            "required": config.required,
            "healthy_targets": len(health.healthy()),
            "targets": targets,
        }

    async def _services(self, request: _Request) -> _Response:
        return 200, {"services": [self._service_view(name) for name in self.runtime.registry.services()]}

    async def _service(self, request: _Request) -> _Response:
        return 200, self._service_view(request.params["name"])

    async def _register(self, request: _Request) -> _Response:
        data = request.json()
        if not isinstance(data, dict):
            raise _Refusal(Problem(400, "The body must be a JSON object describing the target."))
        name = request.params["name"]
        try:
            with _registry_refusals(name):
                target = build_target(data)
                await self.runtime.registry.register(name, target)
        except ConfigurationError as exc:  # an invalid target; the registry's errors are _registry_refusals'
            raise _Refusal(Problem(400, str(exc))) from None
        self.runtime.sync_targets()
        return 201, target_to_dict(target)

    async def _deregister(self, request: _Request) -> _Response:
        name, target_id = request.params["name"], request.params["target_id"]
        with _registry_refusals(name):
            removed = await self.runtime.registry.deregister(name, target_id)
        if not removed:
            raise _Refusal(Problem(404, f"No dynamic target {target_id!r} in {name!r}."))
        self.runtime.sync_targets()
        return 200, {"deregistered": target_id}

    async def _breakers(self, request: _Request) -> _Response:
        hook = self.runtime.breaker_states
        return 200, {"breakers": [] if hook is None else hook(), "wired": hook is not None}

    async def _rate_limits(self, request: _Request) -> _Response:
        hook = self.runtime.rate_limit_policies
        if hook is not None:
            return 200, {"policies": hook.get(), "enforced": True}
        return 200, {"policies": _dump(self.runtime.config.rate_limits)["policies"], "enforced": False}

    async def _replace_rate_limits(self, request: _Request) -> _Response:
        data = request.json()
        current = _dump(self.runtime.config.rate_limits)
        if not isinstance(data, dict) or "policies" not in data:
            raise _Refusal(Problem(400, 'The body must be {"policies": {name: policy, ...}}.'))
        try:
            replaced = RateLimitsConfig.model_validate({**current, "policies": data["policies"]})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = format_location(("rate_limits", *first["loc"]))
            raise _Refusal(Problem(400, f"{where}: {first['msg']}")) from None
        config = self.runtime.config.model_copy(update={"rate_limits": replaced})
        missing = [
            problem
            for problem in cross_check(config)
            if ".rate_limits" in problem[0] or problem[0].startswith("rate_limits")
        ]
        if missing:
            raise _Refusal(Problem(400, "; ".join(f"{key}: {text}" for key, text in missing)))
        hook = self.runtime.rate_limit_policies
        if hook is not None:
            hook.replace(_dump(replaced)["policies"])
        self.runtime.config = config
        return 200, {"policies": _dump(replaced)["policies"], "enforced": hook is not None}

    async def _reload(self, request: _Request) -> _Response:
        from sample_gateway.mounts import build_stacks
        from sample_gateway.stack import StackBuildError

        runtime = self.runtime
        try:
            if request.body.strip():
                config = config_from_text(request.body.decode("utf-8", "replace"), source="request body")
            elif runtime.config_source is not None:
                config = runtime.config_source()
            else:
                raise _Refusal(Problem(400, "The gateway has no config file: send the config as the body."))
        except GatewayConfigError as exc:
            problem = Problem(
                400,
                "The new configuration is invalid; the running one is kept.",
                extensions={"errors": [{"key": key, "problem": text} for key, text in exc.problems]},
            )
            raise _Refusal(problem) from None
        previous = runtime.config
        restart = [key for key in RESTART_KEYS if getattr(previous, key) != getattr(config, key)]
        # What needs a restart keeps its running value, so the runtime's config says what is in force.
        config = config.model_copy(update={key: getattr(previous, key) for key in restart})
        changed = stack_policy_changes(previous, config)
        build = None
        if changed and runtime.mounts:
            try:
                build = build_stacks(config, runtime)
            except StackBuildError as exc:
                problem = Problem(
                    400,
                    "The middleware stack refuses the new configuration; the running one is kept.",
                    extensions={"layer": exc.layer, "errors": [{"key": exc.layer, "problem": str(exc)}]},
                )
                raise _Refusal(problem) from None
            except Exception as exc:
                logger.exception("building the middleware stack for a reload failed")
                problem = Problem(
                    500,
                    "Building the middleware stack failed; the running configuration is kept.",
                    extensions={"error": f"{type(exc).__name__}: {exc}"},
                )
                raise _Refusal(problem) from None
        try:
            runtime.reload(config)
        except BaseException:
            if build is not None:
                build.discard()
            raise
        if build is not None:
            build.commit()  # right after the routing swap, no await between: one config in force
        return 200, {
            "reloaded": True,
            "services": runtime.registry.services(),
            "routes": len(runtime.router.routes),
            "rebuilt": changed if build is not None else [],
            "restart_required_for": restart,
        }

    async def _status(self, request: _Request) -> _Response:
        rows = []
        for name in self.runtime.registry.services():
            view = self._service_view(name)
            for target in view["targets"]:
                state = (
                    "healthy" if target.get("healthy") else ("ejected" if target.get("ejected") else "down")
                )
                rows.append(
                    "<tr>"
                    + "".join(
                        f"<td>{html.escape(str(cell))}</td>"
                        for cell in (
                            name,
                            target["id"],
                            target["url"],
                            target["version"] or "",
                            target["weight"],
                            state,
                            target.get("in_flight", 0),
                            target.get("latency_ewma_ms") or "",
                        )
                    )
                    + "</tr>"
                )
        page = _STATUS_PAGE.replace("{rows}", "\n".join(rows))
        return 200, _Html(page)


class _Html(str):
    pass


_STATUS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5"><title>nexus gateway</title>
<style>body{font:14px system-ui;margin:2em}table{border-collapse:collapse}td,th{padding:4px 10px;
border-bottom:1px solid #ddd;text-align:left}</style></head>
<body><h1>nexus gateway</h1><table>
<tr><th>service</th><th>target</th><th>url</th><th>version</th><th>weight</th><th>state</th>
<th>in flight</th><th>latency (ms)</th></tr>
{rows}
</table></body></html>
"""


def _dump(model: Any) -> dict[str, Any]:
    dumped: dict[str, Any] = model.model_dump(mode="json")
    return dumped


async def _read_body(receive: Receive) -> bytes:
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        body += message.get("body", b"")
        if len(body) > MAX_BODY:
            raise _Refusal(Problem(413, f"The admin API accepts bodies up to {MAX_BODY} bytes."))
        if not message.get("more_body", False):
            break
    return bytes(body)


async def _respond(send: Send, status: int, payload: Any) -> None:
    if isinstance(payload, _Html):
        body, content_type = payload.encode(), b"text/html; charset=utf-8"
    else:
        body, content_type = json.dumps(payload, separators=(",", ":")).encode(), b"application/json"
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                (b"cache-control", b"no-store"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
