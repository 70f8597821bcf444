"""A lean HTTP/1.1 client for the hot path of ``rocmux serve``: requests to runtimes
on plain-HTTP URLs (loopback), answers streamed back chunk by chunk.

httpx relays a server-sent event in about 60 µs of CPU (h11's pure-Python parsing, a
cancel scope per read, the connection pool's scans); at 32 streams on a GPU that one
event loop is the bottleneck. Here an :class:`asyncio.Protocol` feeds llhttp (through
``httptools``, uvicorn's parser) and wakes the reader once for whatever arrived, so
events that queued up while the loop was busy leave in one write.

Errors are httpx's exception types, so callers handle one tree::

    httpx.TransportError
    ├── httpx.ConnectError        cannot connect (nothing listens, refused)
    ├── httpx.ConnectTimeout      no connection within the connect timeout
    ├── httpx.ReadTimeout         nothing received for the read (stall) timeout
    └── httpx.RemoteProtocolError the peer closed early or sent something not HTTP

llama-server closes the connection after every streamed answer, so each request of a
burst would open a new one: a connect and one more pass of the event loop per request,
which every later request of the burst waits for. With ``spares``, the client keeps as
many connections open ahead, per address, as it has seen requests in flight there at
once (Envoy's "preconnect"), opened in the background as answers end.

Used only under an asyncio loop (uvicorn's); TLS URLs stay with httpx.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import attrs
import httptools
import httpx

from rocmux.openai_client import KEEPALIVE_S

_PAUSE_AT = 1 << 20
"""Buffered body bytes at which reading from the runtime pauses (a slow client)."""


class _Connection(asyncio.Protocol):
    """One keep-alive connection; one request at a time."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        key: tuple[str, int],
        forget: Callable[[_Connection], None],
    ) -> None:
        self.loop = loop
        self.key = key
        self.forget = forget
        self.transport: asyncio.Transport | None = None
        self.parser: httptools.HttpResponseParser | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.head_done = False
        self.complete = False
        self.closed = False
        self.keep_alive = True
        self.error: Exception | None = None
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.paused = False
        self.waiter: asyncio.Future[None] | None = None
        self.stall_timer: asyncio.TimerHandle | None = None
        self.last_data = 0.0
        self.idle_since = 0.0

    # -- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.last_data = self.loop.time()
        if self.parser is None:
            # Bytes with no request out: the runtime is closing this idle connection.
            self.closed = True
            self._close()
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(httpx.RemoteProtocolError(f"the runtime sent something not HTTP: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.forget(self)
        if self.parser is not None and not self.complete:
            if not self.head_done:
                message = "Server disconnected without sending a response."
            else:
                message = "peer closed connection without sending complete message body"
            self._fail(httpx.RemoteProtocolError(message))

    # -- httptools callbacks ------------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        assert self.parser is not None
        self.status = self.parser.get_status_code()
        self.keep_alive = self.parser.should_keep_alive()
        self.head_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered >= _PAUSE_AT and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self._wake()

    # -- for the response ---------------------------------------------------------------

    def begin(self, request: bytes) -> None:
        assert self.transport is not None
        self._disarm()
        self.parser = httptools.HttpResponseParser(self)
        self.status, self.headers, self.head_done, self.complete = 0, [], False, False
        self.chunks, self.buffered, self.error = [], 0, None
        self.last_data = self.loop.time()
        if self.closed or self.transport.is_closing():
            # The runtime closed it after checkout, while the request was held (burst
            # gate): a write now would be dropped without a word and the request would
            # wait out the stall timeout. Failing it like a lost request lets the
            # caller retry on a new connection.
            self._fail(httpx.RemoteProtocolError("Server disconnected without sending a response."))
            return
        self.transport.write(request)

    def take(self) -> bytes:
        data = self.chunks[0] if len(self.chunks) == 1 else b"".join(self.chunks)
        self.chunks, self.buffered = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return data

    async def wait(self, stall: float | None) -> None:
        """Until something arrives (head, body, end, error); ReadTimeout after
        ``stall`` seconds without a byte."""
        waiter = self.waiter = self.loop.create_future()
        if stall is not None and self.stall_timer is None:
            # One timer for the whole response, re-armed when it fires early, not one
            # per wait: a stream waits once per chunk, and a timer costs ~1.5 µs.
            self.stall_timer = self.loop.call_at(self.last_data + stall, self._check_stall, stall)
        try:
            await waiter
        finally:
            self.waiter = None

    def _check_stall(self, timeout: float) -> None:
        self.stall_timer = None
        waiter = self.waiter
        if waiter is None or waiter.done():
            return  # nobody waits: the next wait() arms the timer again
        quiet = self.loop.time() - self.last_data
        if quiet >= timeout:
            self._fail(httpx.ReadTimeout(f"the runtime sent nothing for {timeout:g} s"))
        else:
            self.stall_timer = self.loop.call_at(
                self.last_data + timeout, self._check_stall, timeout
            )

    def _disarm(self) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self._close()
        self._wake()

    def _close(self) -> None:
        self._disarm()
        self.keep_alive = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def reusable(self, now: float, expiry: float) -> bool:
        return (
            not self.closed
            and self.transport is not None
            and not self.transport.is_closing()
            and now - self.idle_since < expiry
        )


@attrs.define(eq=False)
class RelayResponse:
    """An answer whose head has arrived; its body is read with :meth:`aiter_raw` or
    :meth:`aread`. :meth:`aclose` must follow (it returns the connection to the pool,
    or drops it, which makes the runtime stop generating)."""

    status_code: int
    headers: httpx.Headers
    _conn: _Connection
    _client: RelayClient
    _timeout: float | None
    _closed: bool = False

    async def aiter_raw(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive, everything buffered at each wake-up joined."""
        conn = self._conn
        while True:
            if conn.chunks:
                yield conn.take()
                continue
            if conn.error is not None:
                raise conn.error
            if conn.complete:
                return
            await conn.wait(self._timeout)

    async def aread(self) -> bytes:
        return b"".join([chunk async for chunk in self.aiter_raw()])

    def abort(self) -> None:
        """Drop the connection now (the client went away): the runtime stops generating,
        and a reader waiting in :meth:`aiter_raw` gets ``httpx.ReadError``."""
        if not self._conn.complete:
            self._conn._fail(httpx.ReadError("the stream was aborted"))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._client._release(self._conn)


_Key = tuple[str, int]

MAX_SPARES = 32
"""The most spare connections per address, by default. Each idle one holds one of
llama-server's HTTP threads; rocmux_llamacpp_hip gives llama-server this many threads
more than its own sizing, or a burst of new connections would queue behind them."""


@attrs.define(eq=False)
class RelayClient:
    """Keep-alive connections per runtime address.

    ``keepalive_expiry`` stays below llama-server's own idle timeout (5 s): a request
    sent on a connection the runtime is closing fails before it reaches it.
    """

    keepalive_expiry: float = KEEPALIVE_S
    connect_timeout: float = 10.0
    spares: bool = False
    """Keep connections open ahead of requests (the module's docstring says why)."""
    spare_for: float = 30.0
    """Seconds after an address's last request that its spares are still renewed."""
    max_spares: int = MAX_SPARES
    """The most spares per address (see :data:`MAX_SPARES`)."""
    _idle: dict[_Key, deque[_Connection]] = attrs.field(factory=dict, init=False)
    _addresses: dict[str, tuple[str, int, bytes]] = attrs.field(factory=dict, init=False)
    _open: set[_Connection] = attrs.field(factory=set, init=False)
    _busy: dict[_Key, int] = attrs.field(factory=dict, init=False)
    """Connections checked out, per address."""
    _peak: dict[_Key, int] = attrs.field(factory=dict, init=False)
    """The most checked out at once per address: how many spares it gets."""
    _last_use: dict[_Key, float] = attrs.field(factory=dict, init=False)
    _keepers: dict[_Key, tuple[asyncio.Task[None], asyncio.Event]] = attrs.field(
        factory=dict, init=False
    )

    def _address(self, base: str) -> tuple[str, int, bytes]:
        known = self._addresses.get(base)
        if known is None:
            parts = urlsplit(base)
            if parts.scheme != "http" or parts.hostname is None:
                raise ValueError(f"the relay speaks plain HTTP only, not {base!r}")
            port = parts.port or 80
            known = self._addresses[base] = (parts.hostname, port, parts.netloc.encode())
        return known

    async def post(
        self,
        base: str,
        path: str,
        body: bytes,
        read_timeout: float | None,
        *,
        fresh: bool = False,
        hold: Callable[[Callable[[], None]], Awaitable[None]] | None = None,
    ) -> RelayResponse:
        """POST ``body`` (JSON) to ``base + path``; returns once the head arrived.
        ``fresh``: on a new connection, not a pooled one (to retry a request that a
        pooled connection lost because the runtime had just closed it). ``hold``: given
        the write of the request, ready to go, does it when it sees fit
        (:meth:`rocmux.burst.BurstGate.passage`)."""
        host, port, netloc = self._address(base)
        conn = await self._checkout(host, port, fresh)
        if self.spares:
            key = conn.key
            busy = self._busy[key] = self._busy.get(key, 0) + 1
            if busy > self._peak.get(key, 0):
                self._peak[key] = min(busy, self.max_spares)
            self._last_use[key] = time.monotonic()
        request = b"".join(
            (
                b"POST ",
                path.encode(),
                b" HTTP/1.1\r\nHost: ",
                netloc,
                b"\r\nAccept: */*\r\nContent-Type: application/json\r\nContent-Length: ",
                str(len(body)).encode(),
                b"\r\n\r\n",
                body,
            )
        )
        try:
            if hold is None:
                conn.begin(request)
            else:
                await hold(functools.partial(conn.begin, request))
            while not conn.head_done:
                if conn.error is not None:
                    raise conn.error
                await conn.wait(read_timeout)
        except BaseException:
            self._discard(conn)
            self._returned(conn.key)
            raise
        headers = httpx.Headers(
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in conn.headers]
        )
        return RelayResponse(conn.status, headers, conn, self, read_timeout)

    async def _checkout(self, host: str, port: int, fresh: bool) -> _Connection:
        idle = None if fresh else self._idle.get((host, port))
        now = time.monotonic()
        while idle:
            conn = idle.pop()
            if conn.reusable(now, self.keepalive_expiry):
                return conn
            self._discard(conn)
        try:
            return await self._connect((host, port))
        except TimeoutError:
            raise httpx.ConnectTimeout(f"no connection to {host}:{port} in time") from None
        except OSError as exc:
            raise httpx.ConnectError(f"cannot connect to {host}:{port}: {exc}") from exc

    async def _connect(self, key: _Key) -> _Connection:
        """A new connection to ``key``, counted as open; OSError or TimeoutError."""
        loop = asyncio.get_running_loop()
        _, conn = await asyncio.wait_for(
            loop.create_connection(lambda: _Connection(loop, key, self._forget), *key),
            self.connect_timeout,
        )
        self._open.add(conn)
        return conn

    def _forget(self, conn: _Connection) -> None:
        # A closed connection leaves the pool at once: a burst's worth of them must not
        # wait in the idle list for checkouts that take the newest first.
        self._open.discard(conn)
        idle = self._idle.get(conn.key)
        if idle is not None and conn in idle:
            idle.remove(conn)
            self._keep_spares(conn.key)

    def _discard(self, conn: _Connection) -> None:
        conn._close()
        self._open.discard(conn)

    def _release(self, conn: _Connection) -> None:
        conn._disarm()
        self._returned(conn.key)
        if conn.complete and conn.keep_alive and not conn.closed and conn.error is None:
            conn.parser = None
            conn.idle_since = time.monotonic()
            self._idle.setdefault(conn.key, deque()).append(conn)
            return
        self._discard(conn)
        self._keep_spares(conn.key)

    # -- spares -------------------------------------------------------------------------

    def _returned(self, key: _Key) -> None:
        if self.spares:
            self._busy[key] -= 1

    def _keep_spares(self, key: _Key) -> None:
        """Wake the task that tops up ``key``'s spares, or start it."""
        if not self.spares:
            return
        keeper = self._keepers.get(key)
        if keeper is not None:
            keeper[1].set()
            return
        wake = asyncio.Event()
        task = asyncio.get_running_loop().create_task(self._keeper(key, wake))
        self._keepers[key] = (task, wake)
        task.add_done_callback(functools.partial(self._keeper_done, key))

    def _keeper_done(self, key: _Key, task: asyncio.Task[None]) -> None:
        # Only its own entry: drop() may have put a new keeper there meanwhile.
        if self._keepers.get(key, (None,))[0] is task:
            del self._keepers[key]

    async def _keeper(self, key: _Key, wake: asyncio.Event) -> None:
        """Open connections to ``key`` until it has as many idle and checked out as its
        peak; renew idle ones before they expire; end once the address has had no
        request for ``spare_for`` seconds, or cannot be reached (a stopped runtime)."""
        # Spares are renewed when this much of their life is left, so that a checkout
        # never finds them expired.
        margin = min(0.25, self.keepalive_expiry / 4)
        while time.monotonic() - self._last_use.get(key, 0.0) < self.spare_for:
            idle = self._idle.setdefault(key, deque())
            now = time.monotonic()
            for conn in [c for c in idle if now - c.idle_since >= self.keepalive_expiry - margin]:
                idle.remove(conn)
                self._discard(conn)
            if len(idle) + self._busy.get(key, 0) < self._peak.get(key, 0):
                try:
                    conn = await self._connect(key)
                except (OSError, TimeoutError):
                    self._peak.pop(key, None)
                    return
                conn.idle_since = time.monotonic()
                idle.append(conn)
                continue
            oldest = min((c.idle_since for c in idle), default=now)
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(
                    wake.wait(), max(0.01, oldest + self.keepalive_expiry - margin - now)
                )

    def drop(self, base: str) -> None:
        """Close ``base``'s idle connections and stop keeping spares for it, before its
        runtime is stopped: llama-server takes ~0.1 s longer to exit while idle
        connections are open to it, and a model swap waits for that exit."""
        key = self._address(base)[:2]
        self._peak.pop(key, None)
        self._last_use.pop(key, None)
        keeper = self._keepers.pop(key, None)
        if keeper is not None:
            keeper[0].cancel()
        for conn in self._idle.pop(key, ()):
            self._discard(conn)

    async def aclose(self) -> None:
        for task, _ in list(self._keepers.values()):
            task.cancel()
        for conn in list(self._open):
            conn._close()
        self._open.clear()
        self._idle.clear()
