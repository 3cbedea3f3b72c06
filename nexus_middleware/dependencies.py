"""FastAPI/Starlette dependency helpers over the `Principal` an authentication layer published.

```python
from nexus_middleware.dependencies import install_problem_handler, requires

install_problem_handler(app)  # refusals as application/problem+json

@app.post("/orders")
async def create(principal: Principal = Depends(requires("orders:write"))) -> ...
```

Needs starlette (FastAPI brings it); this module is not imported by `nexus_middleware` itself.
"""

from collections.abc import Callable, Mapping
from types import MappingProxyType

from starlette.exceptions import HTTPException
from starlette.requests import HTTPConnection, Request
from starlette.responses import Response

from nexus_middleware.context import Principal, get_context
from nexus_middleware.errors import ConfigurationError
from nexus_middleware.problem import Problem, send_problem
from nexus_middleware.types import Receive, Scope, Send

__all__ = ["AuthorizationProblem", "install_problem_handler", "problem_exception_handler", "requires"]

_LAYER = "auth"


class AuthorizationProblem(HTTPException):
    """A refusal raised by a dependency. With `install_problem_handler(app)` it is sent as problem+json;
    without it, the framework's HTTPException handler still answers the right status and headers."""

    def __init__(self, problem: Problem, headers: Mapping[str, str]) -> None:
        super().__init__(problem.status, problem.detail, dict(headers))
        self.problem = problem


def requires(*scopes: str) -> Callable[[HTTPConnection], Principal]:
    """A dependency returning the caller's Principal when it holds every one of `scopes`.

    No authenticated principal: 401 with `WWW-Authenticate: Bearer`. A scope missing: 403 with
    `WWW-Authenticate: Bearer error="insufficient_scope", scope="..."` (RFC 6750 §3.1).
    """
    for scope in scopes:
        if not scope or any(char in scope for char in ' "\\'):
            raise ConfigurationError(f"invalid scope {scope!r}")
    wanted = frozenset(scopes)
    listed = " ".join(sorted(wanted))
    unauthenticated = AuthorizationProblem(
        Problem(401, "Authentication is required"), MappingProxyType({"WWW-Authenticate": "Bearer"})
    )
    forbidden_problem = Problem(
        403,
        "The token does not grant the scope this operation requires",
        extensions=MappingProxyType({"error": "insufficient_scope", "required_scopes": sorted(wanted)}),
    )
    challenge = (
        f'Bearer error="insufficient_scope", error_description="{forbidden_problem.detail}", scope="{listed}"'
    )

    def dependency(connection: HTTPConnection) -> Principal:
        context = get_context(connection.scope)
        principal = context.principal
        if principal is None or not principal.is_authenticated:
            context.record(_LAYER, "deny", reason="missing_credentials", method="anonymous")
            raise AuthorizationProblem(unauthenticated.problem, unauthenticated.headers or {})
        if not wanted <= principal.scopes:
            context.record(_LAYER, "deny", reason="insufficient_scope", method=principal.method)
            raise AuthorizationProblem(forbidden_problem, {"WWW-Authenticate": challenge})
        return principal

    dependency.__name__ = f"requires({listed})"
    return dependency


class _ProblemResponse(Response):
    def __init__(self, problem: Problem, headers: Mapping[str, str]) -> None:
        super().__init__(status_code=problem.status)
        self._problem = problem
        self._extra = [
            (name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in headers.items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send_problem(scope, send, self._problem, headers=self._extra, layer=_LAYER)


async def problem_exception_handler(request: Request, exc: Exception) -> Response:
    """Starlette/FastAPI exception handler sending an `AuthorizationProblem` as problem+json."""
    if not isinstance(exc, AuthorizationProblem):
        raise exc
    return _ProblemResponse(exc.problem, exc.headers or {})


def install_problem_handler(app: object) -> None:
    """Register `problem_exception_handler` for `AuthorizationProblem` on a Starlette or FastAPI app."""
    add = getattr(app, "add_exception_handler", None)
    if add is None:
        raise ConfigurationError("install_problem_handler needs a Starlette or FastAPI application")
    add(AuthorizationProblem, problem_exception_handler)
