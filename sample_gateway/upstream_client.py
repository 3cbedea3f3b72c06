"""The data plane's upstream HTTP client: one small interface over aiohttp (the default) or httpx.

The proxy never touches a client library directly: it asks an `UpstreamClient` to open one exchange and gets
an `UpstreamResponse` whose body it streams as raw bytes. Both implementations share the same guarantees:
HTTP/1.1 with keep-alive pooling, proxy settings from the environment ignored, redirects never followed,
bodies never decompressed, no default headers added (no `User-Agent`, `Accept`, `Accept-Encoding`), and
library exceptions translated into the `UpstreamError` hierarchy below so the proxy maps causes to statuses
the same way whatever the client.

aiohttp is the default because it measured about 10x httpx's throughput behind a minimal proxy on the same
machine (see docs/performance.md); httpx stays selectable, and is the control plane's client. With aiohttp,
requests without a streamed body use its connector and response parser directly, not its `ClientSession`
(`_AiohttpClient._send_direct`): the session's per-call work is most of a fast exchange's cost.
"""

import asyncio
import collections
import functools
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

from nexus_middleware.errors import ConfigurationError, NexusError
from nexus_middleware.headers import RawHeaders
from sample_gateway.contracts import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    import aiohttp
    import httpx
    import yarl

__all__ = [
    "ClientKind",
    "ConnectionGate",
    "DEFAULT_CLIENT_KIND",
    "GateSlot",
    "Origin",
    "UpstreamClient",
    "UpstreamConnectError",
    "UpstreamDisconnectedError",
    "UpstreamError",
    "UpstreamHandshakeError",
    "UpstreamPoolExhaustedError",
    "UpstreamProtocolError",
    "UpstreamResponse",
    "UpstreamTimeoutError",
    "UpstreamWebSocket",
    "create_upstream_client",
]

ClientKind = Literal["aiohttp", "httpx"]
DEFAULT_CLIENT_KIND: ClientKind = "aiohttp"


class UpstreamError(NexusError):
    """An upstream exchange failed. `sent` is False when the request surely never reached the upstream."""

    sent: bool = True


class UpstreamConnectError(UpstreamError):
    """No connection could be made (refused, unreachable, DNS). Nothing was sent."""

    sent = False


class UpstreamTimeoutError(UpstreamError):
    """The upstream did not connect or answer in time. `phase` is "connect" (nothing sent) or "read"."""

    def __init__(self, message: str, *, phase: Literal["connect", "read"]) -> None:
        super().__init__(message)
        self.phase = phase
        self.sent = phase != "connect"


class UpstreamPoolExhaustedError(UpstreamError):
    """Every pooled connection stayed busy for the whole wait. Nothing was sent."""

    sent = False


class UpstreamDisconnectedError(UpstreamError):
    """The connection broke (reset, closed early). The upstream may have received the request."""


class UpstreamProtocolError(UpstreamError):
    """The upstream answered with something that is not valid HTTP/1.1, or a body cut short."""


class UpstreamHandshakeError(UpstreamError):
    """The upstream refused a websocket handshake with an HTTP `status`."""

    def __init__(self, status: int) -> None:
        super().__init__(f"the upstream refused the websocket handshake with {status}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Origin:
    """Scheme, host and port of a registered target: the only place an upstream URL's authority comes from."""

    scheme: Literal["http", "https"]
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> "Origin":
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ConfigurationError(f"target url {url!r}: the scheme must be http or https")
        if parts.username is not None or parts.password is not None:
            raise ConfigurationError(f"target url {url!r}: credentials are not allowed in a target url")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ConfigurationError(f"target url {url!r}: a target is scheme, host and port only")
        try:
            port = parts.port
        except ValueError as exc:
            raise ConfigurationError(f"target url {url!r}: invalid port") from exc
        hostname = parts.hostname
        if not hostname:
            raise ConfigurationError(f"target url {url!r}: no host")
        if not hostname.isascii():
            try:
                hostname = hostname.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise ConfigurationError(f"target url {url!r}: invalid host name") from exc
        scheme: Literal["http", "https"] = "https" if parts.scheme == "https" else "http"
        return cls(scheme, hostname, port or (443 if scheme == "https" else 80))

    netloc: str = field(init=False, repr=False, compare=False)  # host[:port], as in a Host header
    host_header: bytes = field(init=False, repr=False, compare=False)  # netloc, encoded once
    base: str = field(init=False, repr=False, compare=False)  # scheme://netloc, for request URLs

    def __post_init__(self) -> None:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        netloc = host if self.port == default else f"{host}:{self.port}"
        object.__setattr__(self, "netloc", netloc)
        object.__setattr__(self, "host_header", netloc.encode("ascii"))
        object.__setattr__(self, "base", f"{self.scheme}://{netloc}")


class UpstreamResponse(Protocol):
    """An upstream response whose head has arrived; the body is read with `read()` until it returns b""."""

    status: int
    headers: RawHeaders  # lower-case names, in order, transfer coding already removed from the body

    async def read(self) -> bytes:
        """The next body bytes as received (still content-encoded), never empty before the end; b"" at the
        end. Raises `UpstreamError` on failure. (A method, not an async generator: the event loop tracks
        every async generator in a WeakSet, a cost per response.)"""
        ...

    async def aclose(self) -> None:
        """Release the connection: back to the pool when the body was read to its end, else closed."""
        ...


class UpstreamWebSocket(Protocol):
    """An open websocket to an upstream. `receive()` returns None once the upstream closed (`close_code`)."""

    protocol: str | None
    close_code: int | None

    async def send(self, data: str | bytes) -> None: ...

    async def receive(self) -> str | bytes | None: ...

    async def aclose(self, code: int = 1000) -> None: ...


class UpstreamClient(Protocol):
    """Opens exchanges with registered targets. Create one per process; `aclose()` it at shutdown."""

    kind: ClientKind

    async def open(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        """Send the request and wait for the response head. `target` is the encoded path and query.

        `headers` are sent as given: the caller sets `host`, and `content-length` when the length is known
        (else the body goes chunked). Waiting for a pooled connection counts against `connect_timeout`.
        """
        ...

    async def open_websocket(
        self,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        *,
        protocols: Sequence[str],
        connect_timeout: float,
    ) -> UpstreamWebSocket:
        """Open a websocket (the handshake headers are the client library's; `headers` add to them)."""
        ...

    async def aclose(self) -> None: ...


class _Slots:
    """A counting gate whose free slot is taken without an await; waiters are served first come, first served.

    `asyncio.Semaphore` would do, but it has no synchronous acquire and its `locked()` scans the waiters: two
    coroutine calls and a generator per gate per request on the proxy's hot path.
    """

    __slots__ = ("_free", "_waiters")

    def __init__(self, size: int) -> None:
        self._free = size
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    def free(self) -> bool:
        return self._free > 0 and not self._waiters

    def take(self) -> None:
        self._free -= 1

    async def wait(self) -> None:
        """Take a slot, waiting for one; a cancelled wait takes nothing and passes on a slot it was handed."""
        if self.free():
            self._free -= 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.give()  # handed a slot just as the wait was cancelled: the next waiter gets it
            elif waiter in self._waiters:  # `give` may have dropped it already
                self._waiters.remove(waiter)
            raise

    def give(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes straight to the first waiter
                return
        self._free += 1


class ConnectionGate:
    """Bounds connections in use, in total and per origin; a wait past its timeout is pool exhaustion.

    The client libraries' own pool waits cannot be told apart from a slow TCP connect, so the gate sits in
    front of them and the libraries' limits are only a backstop.
    """

    __slots__ = ("_per_key", "_per_key_limit", "_total")

    def __init__(self, max_connections: int, max_per_key: int = 0) -> None:
        self._total = _Slots(max_connections) if max_connections > 0 else None
        self._per_key_limit = max_per_key
        self._per_key: dict[str, _Slots] = {}

    def _key_slots(self, key: str) -> _Slots | None:
        if self._per_key_limit <= 0:
            return None
        per_key = self._per_key.get(key)
        if per_key is None:
            per_key = self._per_key[key] = _Slots(self._per_key_limit)
        return per_key

    def try_acquire(self, key: str) -> bool:
        """Take one slot for `key` if one is free right now, without waiting (the common case)."""
        total = self._total
        per_key = self._key_slots(key)
        if (total is None or total.free()) and (per_key is None or per_key.free()):
            if total is not None:
                total.take()
            if per_key is not None:
                per_key.take()
            return True
        return False

    async def acquire(self, key: str, wait: float) -> None:
        """Take one slot for `key`; raises `UpstreamPoolExhaustedError` when none frees in `wait` s."""
        if self.try_acquire(key):
            return  # no timer armed when slots are free
        taken: list[_Slots] = []
        try:
            async with asyncio.timeout(wait):
                for slots in (self._total, self._key_slots(key)):
                    if slots is not None:
                        await slots.wait()
                        taken.append(slots)
        except TimeoutError:
            for slots in taken:
                slots.give()
            raise UpstreamPoolExhaustedError("no upstream connection became free in time") from None
        except BaseException:
            for slots in taken:
                slots.give()
            raise

    def release(self, key: str) -> None:
        if self._total is not None:
            self._total.give()
        per_key = self._per_key.get(key)
        if per_key is not None:
            per_key.give()


def create_upstream_client(
    kind: ClientKind = DEFAULT_CLIENT_KIND,
    *,
    max_connections: int = 100,
    max_connections_per_host: int = 0,
    keepalive_expiry: float = 30.0,
) -> UpstreamClient:
    """The data plane's client. No I/O here: the library session is created on first use, in the loop."""
    if max_connections <= 0:
        raise ConfigurationError("max_connections must be positive")
    if max_connections_per_host < 0:
        raise ConfigurationError("max_connections_per_host must be zero (no limit) or more")
    if keepalive_expiry < 0:
        raise ConfigurationError("keepalive_expiry must be zero or more")
    if kind == "aiohttp":
        return _AiohttpClient(max_connections, max_connections_per_host, keepalive_expiry)
    if kind == "httpx":
        return _HttpxClient(max_connections, max_connections_per_host, keepalive_expiry)
    raise ConfigurationError(f"kind must be 'aiohttp' or 'httpx', not {kind!r}")


class GateSlot:
    """One slot taken from a `ConnectionGate`, released exactly once however often `release()` is called."""

    __slots__ = ("_gate", "_key", "_released")

    def __init__(self, gate: ConnectionGate, key: str) -> None:
        self._gate = gate
        self._key = key
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._gate.release(self._key)


_Classes = tuple[type[BaseException], ...]


@dataclass(frozen=True, slots=True)
class _LibraryErrors:
    """A client library's exception classes per cause, checked in this order; any other broke the link."""

    base: type[BaseException]  # what the library raises for its own failures
    connect_timeout: _Classes
    pool_timeout: _Classes
    read_timeout: _Classes
    connect: _Classes
    protocol: _Classes

    def translate(self, exc: BaseException) -> UpstreamError:
        if isinstance(exc, self.connect_timeout):
            return UpstreamTimeoutError(f"connecting to the upstream timed out: {exc}", phase="connect")
        if isinstance(exc, self.pool_timeout):
            return UpstreamPoolExhaustedError(f"no upstream connection became free in time: {exc}")
        if isinstance(exc, self.read_timeout):
            return UpstreamTimeoutError(f"the upstream did not answer in time: {exc}", phase="read")
        if isinstance(exc, self.connect):
            # aiohttp's connector error carries the OS error apart; its own text repeats the host and port.
            return UpstreamConnectError(f"cannot connect to the upstream: {getattr(exc, 'os_error', exc)}")
        if isinstance(exc, self.protocol):
            return UpstreamProtocolError(f"invalid upstream response: {exc}")
        return UpstreamDisconnectedError(f"the upstream connection broke: {exc!r}")


class _GatedResponse:
    """Common part of both responses: the head, and the gate slot held until the response is closed."""

    __slots__ = ("_slot", "headers", "status")

    def __init__(
        self, gate: ConnectionGate, key: str, status: int, raw_headers: Iterable[tuple[bytes, bytes]]
    ) -> None:
        self._slot = GateSlot(gate, key)
        self.status = status
        self.headers: RawHeaders = [(name.lower(), value) for name, value in raw_headers]


_Pool = TypeVar("_Pool")
_LibraryTimeout = TypeVar("_LibraryTimeout")
_Body = AsyncIterable[bytes] | bytes | None
_LibraryResponse = TypeVar("_LibraryResponse")


class _BaseClient(Generic[_Pool, _LibraryTimeout, _LibraryResponse]):
    """What both kinds share: the gate around every exchange, the error translation, the timeout cache.

    A kind supplies `_request` (a plain method returning the library's awaitable, so no coroutine frame is
    added on the hot path), `_upstream_error`, `_make_timeout`, `_response_type`, `_new_pool` and `_close`.
    """

    kind: ClientKind
    _response_type: Callable[[ConnectionGate, str, _LibraryResponse], UpstreamResponse]

    def __init__(self, max_connections: int, max_per_host: int, keepalive_expiry: float) -> None:
        self._max_connections = max_connections
        self._max_per_host = max_per_host
        self._keepalive_expiry = keepalive_expiry
        self._gate = ConnectionGate(max_connections, max_per_host)
        self._ws_session: aiohttp.ClientSession | None = None
        self._timeouts: dict[tuple[float, float], _LibraryTimeout] = {}
        self._pool: _Pool | None = None

    def _get_pool(self) -> _Pool:
        pool = self._pool
        if pool is None:
            pool = self._pool = self._new_pool()
        return pool

    def _new_pool(self) -> _Pool:
        """The library's pooled session, created on first use (in the loop, never in `__init__`)."""
        raise NotImplementedError

    async def _close(self, pool: _Pool) -> None:
        raise NotImplementedError

    async def open(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: AsyncIterable[bytes] | bytes | None,
        *,
        connect_timeout: float,
        read_timeout: float,
    ) -> UpstreamResponse:
        key = origin.netloc
        if not self._gate.try_acquire(key):
            await self._gate.acquire(key, connect_timeout)
        try:
            response = await self._request(
                method, origin, target, headers, body, self._timeout(connect_timeout, read_timeout)
            )
        except BaseException as exc:
            self._gate.release(key)
            error = self._upstream_error(exc)
            if error is None:
                raise
            raise error from exc
        return self._response_type(self._gate, key, response)

    def _request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: _Body,
        timeout: _LibraryTimeout,
    ) -> Awaitable[_LibraryResponse]:
        raise NotImplementedError

    def _upstream_error(self, exc: BaseException) -> UpstreamError | None:
        """The `UpstreamError` for a library failure while opening; None for what is not the library's."""
        raise NotImplementedError

    def _make_timeout(self, connect: float, read: float) -> _LibraryTimeout:
        raise NotImplementedError

    def _timeout(self, connect: float, read: float) -> _LibraryTimeout:
        timeout = self._timeouts.get((connect, read))
        if timeout is None:
            if len(self._timeouts) > 256:  # routes have few distinct pairs; never grow without bound
                self._timeouts.clear()
            timeout = self._timeouts[(connect, read)] = self._make_timeout(connect, read)
        return timeout

    async def aclose(self) -> None:
        await self._close_ws_session()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            await self._close(pool)

    async def open_websocket(
        self,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        *,
        protocols: Sequence[str],
        connect_timeout: float,
    ) -> UpstreamWebSocket:
        # Both kinds relay websockets with aiohttp, on a session of their own: a websocket holds its
        # connection for its whole life and must not take the pooled HTTP connections' places.
        import aiohttp
        from yarl import URL

        if self._ws_session is None:
            self._ws_session = _aiohttp_session(aiohttp.TCPConnector(limit=0))
        path, _, query = target.partition("?")
        url = URL.build(
            scheme="wss" if origin.scheme == "https" else "ws",
            host=origin.host,
            port=origin.port,
            path=path,
            query_string=query,
            encoded=True,
        )
        try:
            async with asyncio.timeout(connect_timeout):
                websocket = await self._ws_session.ws_connect(
                    url,
                    headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
                    protocols=tuple(protocols),
                    autoclose=False,
                    autoping=True,
                    max_msg_size=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            raise UpstreamHandshakeError(exc.status) from exc
        except aiohttp.ClientError as exc:
            raise _aiohttp_error(exc) from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError(
                "the upstream websocket did not open in time", phase="connect"
            ) from exc
        return _AiohttpWebSocket(websocket)

    async def _close_ws_session(self) -> None:
        if self._ws_session is not None:
            session, self._ws_session = self._ws_session, None
            await session.close()

    def __repr__(self) -> str:
        return (
            f"UpstreamClient(kind={self.kind!r}, max_connections={self._max_connections}, "
            f"max_connections_per_host={self._max_per_host}, keepalive_expiry={self._keepalive_expiry})"
        )


# --- aiohttp ---


class _AiohttpExchange(Protocol):
    """What `_AiohttpResponse` reads: an `aiohttp.ClientResponse`, or a `_DirectExchange`."""

    status: int
    content: "aiohttp.StreamReader"

    @property
    def raw_headers(self) -> "aiohttp.typedefs.RawHeaders": ...

    def release(self) -> Any: ...

    def close(self) -> None: ...


class _AiohttpResponse(_GatedResponse):
    __slots__ = ("_done", "_response")

    def __init__(self, gate: ConnectionGate, key: str, response: _AiohttpExchange) -> None:
        super().__init__(gate, key, response.status, response.raw_headers)
        self._response = response
        self._done = False

    async def read(self) -> bytes:
        try:
            chunk = await self._response.content.readany()
        except _aiohttp_errors().base as exc:
            raise _aiohttp_error(exc) from exc
        except TimeoutError as exc:
            raise UpstreamTimeoutError("the upstream stopped sending", phase="read") from exc
        if not chunk:
            self._done = True
        return chunk

    async def aclose(self) -> None:
        try:
            if self._done:
                self._response.release()
            else:
                self._response.close()  # a half-read connection can never be reused
        finally:
            self._slot.release()


@functools.cache
def _aiohttp_errors() -> _LibraryErrors:
    import aiohttp

    return _LibraryErrors(
        base=aiohttp.ClientError,
        connect_timeout=(aiohttp.ConnectionTimeoutError,),
        pool_timeout=(),
        read_timeout=(aiohttp.ServerTimeoutError,),
        connect=(aiohttp.ClientConnectorError,),
        protocol=(aiohttp.ClientResponseError, aiohttp.ClientPayloadError),
    )


@functools.cache
def _yarl_url() -> "type[yarl.URL]":
    # Imported on first use, like aiohttp itself; cached so the request path does no import per call.
    from yarl import URL

    return URL


def _aiohttp_error(exc: BaseException) -> UpstreamError:
    return _aiohttp_errors().translate(exc)


@functools.cache
def _transparent_request() -> "type[aiohttp.ClientRequest]":
    import aiohttp
    from multidict import CIMultiDict

    class TransparentRequest(aiohttp.ClientRequest):
        """A request that adds none of aiohttp's default headers: a proxy sends what the client sent.

        `skip_auto_headers` says the same, but costs a sorted copy of every request's headers; this class
        skips the defaults outright. `_skip_auto_headers` still keeps aiohttp from adding a Content-Type.
        """

        _skip_auto_headers = CIMultiDict(
            (name, None) for name in ("Accept", "Accept-Encoding", "Content-Type", "User-Agent")
        )

        def update_auto_headers(self, skip_auto_headers: Iterable[str] | None) -> None:
            return None

    return TransparentRequest


class _DirectExchange:
    """A response read straight off an aiohttp pooled connection (see `_AiohttpClient._send_direct`)."""

    __slots__ = ("_connection", "content", "raw_headers", "status")

    def __init__(
        self,
        connection: "aiohttp.connector.Connection",
        message: "aiohttp.http.RawResponseMessage",
        payload: "aiohttp.StreamReader",
    ) -> None:
        self._connection = connection
        self.status = message.code
        self.raw_headers = message.raw_headers
        self.content = payload

    def release(self) -> None:
        self._connection.release()  # back to the pool, unless the protocol says it must close

    def close(self) -> None:
        self._connection.close()


def _request_head(method: str, target: str, headers: RawHeaders) -> bytes:
    """The request line and header block, as bytes. `method` and `target` were checked by the server in front
    and by the proxy (a token; printable ASCII without spaces)."""
    parts = [f"{method} {target} HTTP/1.1\r\n".encode("latin-1")]
    for name, value in headers:
        parts += (name, b": ", value, b"\r\n")
    parts.append(b"\r\n")
    head = b"".join(parts)
    # Every line break must be one written here: a CR or LF inside a name or value would split a header
    # (response splitting, smuggling). aiohttp's own writer refuses them the same way.
    lines = len(headers) + 2
    if head.count(b"\n") != lines or head.count(b"\r") != lines:
        raise ValueError("a request header contains a line break")
    return head


def _aiohttp_session(connector: "aiohttp.TCPConnector") -> "aiohttp.ClientSession":
    import aiohttp

    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        trust_env=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        request_class=_transparent_request(),
        version=aiohttp.HttpVersion11,
        timeout=aiohttp.ClientTimeout(total=None),
    )


class _AiohttpWebSocket:
    __slots__ = ("_websocket", "close_code", "protocol")

    def __init__(self, websocket: "aiohttp.ClientWebSocketResponse[bool]") -> None:
        self._websocket = websocket
        self.protocol = websocket.protocol
        self.close_code: int | None = None

    async def send(self, data: str | bytes) -> None:
        try:
            if isinstance(data, str):
                await self._websocket.send_str(data)
            else:
                await self._websocket.send_bytes(data)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp's reset errors are ConnectionErrors
            raise UpstreamDisconnectedError(f"the upstream websocket went away: {exc!r}") from exc

    async def receive(self) -> str | bytes | None:
        import aiohttp

        while True:
            message = await self._websocket.receive()
            if message.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY):
                data: str | bytes = message.data
                return data
            if message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSING, aiohttp.WSMsgType.CLOSED):
                self.close_code = self._websocket.close_code or (
                    message.data if isinstance(message.data, int) else 1000
                )
                return None
            if message.type == aiohttp.WSMsgType.ERROR:
                self.close_code = 1011
                return None

    async def aclose(self, code: int = 1000) -> None:
        await self._websocket.close(code=code)


class _AiohttpClient(_BaseClient["aiohttp.ClientSession", "aiohttp.ClientTimeout", _AiohttpExchange]):
    kind: ClientKind = "aiohttp"
    _response_type = _AiohttpResponse

    def __init__(self, max_connections: int, max_per_host: int, keepalive_expiry: float) -> None:
        super().__init__(max_connections, max_per_host, keepalive_expiry)
        self._connection_requests: dict[Origin, aiohttp.ClientRequest] = {}

    def _new_pool(self) -> "aiohttp.ClientSession":
        import aiohttp

        self._connection_requests.clear()  # they hold the event loop of the session they were made for

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            limit_per_host=self._max_per_host,
            keepalive_timeout=self._keepalive_expiry,
        )
        return _aiohttp_session(connector)

    async def _close(self, pool: "aiohttp.ClientSession") -> None:
        await pool.close()

    def _make_timeout(self, connect: float, read: float) -> "aiohttp.ClientTimeout":
        import aiohttp

        return aiohttp.ClientTimeout(total=None, sock_connect=connect, sock_read=read)

    def _request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: _Body,
        timeout: "aiohttp.ClientTimeout",
    ) -> Awaitable[_AiohttpExchange]:
        if body is None or isinstance(body, bytes):
            return self._send_direct(method, origin, target, headers, body, timeout)
        # A streamed body goes through the session: its writer task sends the body while the response is
        # read, so an upstream that answers early (a 413 before reading) is heard.
        # encoded=True: the proxy checked the target is printable ASCII, and it must reach the upstream as is.
        url = _yarl_url()(origin.base + target, encoded=True)
        return self._get_pool().request(
            method,
            url,
            headers=[(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers],
            data=body,
            allow_redirects=False,
            timeout=timeout,
            auto_decompress=False,
            compress=None,
        )

    async def _send_direct(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: bytes | None,
        limits: "aiohttp.ClientTimeout",
    ) -> _DirectExchange:
        """One exchange on aiohttp's pool and response parser, without its session layer.

        `ClientSession.request` builds a URL, two header multidicts, a cookie filter, a timer and a
        `ClientRequest` per call: about 40% of a minimal aiohttp proxy's instructions (docs/performance.md),
        for features a reverse proxy turns off (redirects, cookies, default headers, decompression). Here the
        request head is written as the bytes the proxy prepared, with the connector's pooling, limits and
        connect timeout, and the protocol's C parser, read timeout and keep-alive bookkeeping, as the
        session uses them. The body, when there is one, is already in memory and goes in the same write.
        """
        import aiohttp
        from aiohttp.http import HttpProcessingError

        head = _request_head(method, target, headers)
        data = head if not body else head + body
        connector, connection_request = self._connection_request(origin)
        # aiohttp's session sends an idempotent request again, once, when a pooled keep-alive connection turns
        # out to be closed by the upstream before any response byte (RFC 9112 §9.3.1); so does this path.
        replay = method in IDEMPOTENT_METHODS
        while True:
            try:
                connection = await connector.connect(connection_request, [], limits)
            except aiohttp.ClientError:
                raise  # its ServerTimeoutError is a TimeoutError too, and already named
            except TimeoutError as exc:  # the session names it the same way
                raise aiohttp.ConnectionTimeoutError(f"Connection timeout to host {origin.base}") from exc
            protocol = connection.protocol
            transport = connection.transport
            try:
                if protocol is None or transport is None:
                    raise aiohttp.ServerDisconnectedError()
                protocol.set_response_params(
                    skip_payload=method == "HEAD",
                    read_until_eof=True,
                    auto_decompress=False,
                    read_timeout=limits.sock_read,
                )
                transport.write(data)
                protocol.start_timeout()
                while True:
                    message, payload = await protocol.read()
                    code = message.code
                    if not 100 <= code < 200 or code == 101:  # interim responses (100, 103) are skipped
                        return _DirectExchange(connection, message, payload)
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                connection.close()
                if not replay:
                    raise
                replay = False  # a stale pooled connection: once more, as the session would
            except HttpProcessingError as exc:
                connection.close()
                raise UpstreamProtocolError(f"invalid upstream response: {exc.message}") from exc
            except BaseException:
                connection.close()  # cancelled or failed mid-exchange: never reused
                raise

    def _connection_request(self, origin: Origin) -> "tuple[aiohttp.BaseConnector, aiohttp.ClientRequest]":
        """The connector, and a `ClientRequest` for `origin` that only names the pool key and TLS settings
        (`BaseConnector.connect` takes one); built once per origin, not per request."""
        session = self._get_pool()
        connector = session.connector
        if connector is None:
            raise RuntimeError("the aiohttp session is closed")
        cached = self._connection_requests.get(origin)
        if cached is None:
            import aiohttp

            if len(self._connection_requests) >= 256:  # targets come and go; never grow without bound
                self._connection_requests.clear()
            url = _yarl_url()(origin.base + "/", encoded=True)
            cached = aiohttp.ClientRequest("GET", url, loop=asyncio.get_running_loop(), ssl=True)
            self._connection_requests[origin] = cached
        return connector, cached

    def _upstream_error(self, exc: BaseException) -> UpstreamError | None:
        if isinstance(exc, UpstreamError):
            return exc
        errors = _aiohttp_errors()
        if isinstance(exc, errors.base):
            return errors.translate(exc)
        if isinstance(exc, TimeoutError):
            return UpstreamTimeoutError("the upstream did not answer in time", phase="read")
        return None


# --- httpx ---


class _HttpxResponse(_GatedResponse):
    __slots__ = ("_chunks", "_response")

    def __init__(self, gate: ConnectionGate, key: str, response: "httpx.Response") -> None:
        super().__init__(gate, key, response.status_code, response.headers.raw)
        self._response = response
        self._chunks: AsyncIterator[bytes] | None = None

    async def read(self) -> bytes:
        import httpx

        if self._chunks is None:
            self._chunks = self._response.aiter_raw()
        try:
            async for chunk in self._chunks:
                if chunk:
                    return chunk
        except httpx.TransportError as exc:
            raise _httpx_error(exc) from exc
        return b""

    async def aclose(self) -> None:
        try:
            await self._response.aclose()
        finally:
            self._slot.release()


@functools.cache
def _httpx_errors() -> _LibraryErrors:
    import httpx

    return _LibraryErrors(
        base=httpx.TransportError,
        connect_timeout=(httpx.ConnectTimeout,),
        pool_timeout=(httpx.PoolTimeout,),
        read_timeout=(httpx.TimeoutException,),
        connect=(httpx.ConnectError,),
        protocol=(httpx.ProtocolError, httpx.DecodingError),
    )


def _httpx_error(exc: BaseException) -> UpstreamError:
    return _httpx_errors().translate(exc)


class _HttpxClient(_BaseClient["httpx.AsyncClient", dict[str, Any], "httpx.Response"]):
    kind: ClientKind = "httpx"
    _response_type = _HttpxResponse

    def _new_pool(self) -> "httpx.AsyncClient":
        import httpx

        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
            keepalive_expiry=self._keepalive_expiry,
        )
        transport = httpx.AsyncHTTPTransport(limits=limits, http1=True, http2=False, trust_env=False)
        return httpx.AsyncClient(transport=transport, trust_env=False, follow_redirects=False)

    async def _close(self, pool: "httpx.AsyncClient") -> None:
        await pool.aclose()

    def _make_timeout(self, connect: float, read: float) -> dict[str, Any]:
        # The gate already bounded the pool wait; httpx's own pool timeout is a backstop.
        return {"connect": connect, "read": read, "write": read, "pool": connect}

    def _request(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: RawHeaders,
        body: _Body,
        timeout: dict[str, Any],
    ) -> Awaitable["httpx.Response"]:
        import httpx

        url = httpx.URL(scheme=origin.scheme, host=origin.host, port=origin.port, raw_path=target.encode())
        # A Request built directly, not with client.build_request: the client's default headers stay out.
        request = httpx.Request(method, url, headers=headers, content=body, extensions={"timeout": timeout})
        return self._get_pool().send(request, stream=True, follow_redirects=False)

    def _upstream_error(self, exc: BaseException) -> UpstreamError | None:
        import httpx

        return _httpx_error(exc) if isinstance(exc, httpx.TransportError) else None
