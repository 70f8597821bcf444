"""A front process of ``rocmux serve`` (``[server] workers``): it reads requests and
relays answers, while the main process keeps the pool.

One event loop reads a burst of requests one after another: at 32 concurrent streams
the last request of a burst reaches its runtime a millisecond or more after the first
(docs/benchmarks.md). Front processes share the listening socket, so a burst is read on
several cores at once.

For a completion request the front asks the main process for a *lease* on the model's
instance (:mod:`rocmux.leases`). The main process holds the instance for the request
(its in-flight count, its queue limit, its LRU time), lets the lease go when the burst
the request came with has been read (its burst gate sees every front's requests), and
answers with the runtime's URL; the front then sends the request to the runtime and
relays the answer itself. Everything else is forwarded to the main process over
loopback: other endpoints, and a completion whose model is not loaded, is busy or
failed (the main process loads it, or answers the error), so that every answer is the
one ``rocmux serve`` would give without fronts.

Run by the main process (:class:`rocmux.leases.Fronts`), never by hand::

    python -m rocmux.front --listen-fd N --control-fd M --main http://127.0.0.1:P \\
        --settings JSON
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import attrs
import httpx
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from rocmux.config import ServerSettings
from rocmux.http_api import (
    COMPLETION_PATHS,
    BadRequest,
    Proxy,
    _limit_tokens,
    _validate,
    authorized,
    error_response,
    read_json_body,
    unauthorized,
)
from rocmux.relay import RelayClient

_HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"trailer",
        b"upgrade",
        b"host",
        b"content-length",
        b"proxy-connection",
    }
)


class MainGone(Exception):
    """The main process closed the control channel (it is exiting)."""


@attrs.define(eq=False)
class Control:
    """This front's end of the control channel: one JSON object a line each way.

    Messages written in one pass of the event loop leave in one write: the lease
    requests of a burst read in that pass reach the main process together.
    """

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    _ids: itertools.count[int] = attrs.field(factory=itertools.count, init=False)
    _waiting: dict[int, asyncio.Future[dict[str, Any]]] = attrs.field(factory=dict, init=False)
    _abandoned: set[int] = attrs.field(factory=set, init=False)
    _out: list[bytes] = attrs.field(factory=list, init=False)
    _closed: bool = attrs.field(default=False, init=False)

    @classmethod
    async def open(cls, sock: socket.socket) -> Control:
        reader, writer = await asyncio.open_unix_connection(sock=sock)
        return cls(reader, writer)

    def post(self, message: dict[str, Any]) -> None:
        """Send ``message``, with the others of this pass of the loop."""
        if self._closed:
            return
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if not self._closed and not self.writer.is_closing():
            self.writer.write(data)

    async def ask(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send ``message`` and wait for its answer."""
        if self._closed:
            raise MainGone("rocmux serve's main process has gone")
        rid = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = future
        self.post({**message, "id": rid})
        try:
            return await future
        except asyncio.CancelledError:
            if message.get("op") == "lease":
                # Granted later, the lease must still be given back.
                self._abandoned.add(rid)
            self._waiting.pop(rid, None)
            raise

    async def read_forever(self) -> None:
        """Deliver answers until the main process closes the channel."""
        try:
            while line := await self.reader.readline():
                answer = json.loads(line)
                rid = answer["id"]
                future = self._waiting.pop(rid, None)
                if future is not None and not future.done():
                    future.set_result(answer)
                elif rid in self._abandoned:
                    self._abandoned.discard(rid)
                    if "url" in answer:
                        self.post({"op": "release", "lease": rid})
        finally:
            self._closed = True
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(MainGone("rocmux serve's main process has gone"))
            self._waiting.clear()


@attrs.define(eq=False)
class _LeasedRuntime:
    """An instance leased from the main process, as a :class:`rocmux.http_api.Runtime`."""

    control: Control
    lease: int
    base_url: str
    name: str
    front: Front

    async def url(self) -> str:
        return self.base_url

    def running(self) -> bool:
        # Asked only to decide whether to send a lost request again: a fresh connection
        # to a runtime that died fails to connect, which is then explained.
        return True

    async def stalled(self) -> str:
        return await self._explain({"stall": True})

    async def explain(self, exc: BaseException) -> str:
        return await self._explain({"error": type(exc).__name__, "detail": str(exc)})

    async def _explain(self, fields: dict[str, Any]) -> str:
        try:
            answer = await self.control.ask({"op": "explain", "lease": self.lease, **fields})
        except MainGone:
            self.front.shutting_down = True
            return "rocmux serve is shutting down"
        self.front.shutting_down = bool(answer.get("shutting_down"))
        return str(answer["message"])

    def first_byte(self, seconds: float) -> None:
        self.control.post({"op": "ttft", "model": self.name, "s": seconds})

    def usage(self, usage: object) -> None:
        if isinstance(usage, dict):
            self.control.post({"op": "usage", "model": self.name, "usage": usage})


@attrs.define(eq=False)
class Front:
    """The handlers of a front process."""

    settings: ServerSettings
    stall_timeout: float
    main_url: str
    control: Control | None = None
    shutting_down: bool = False
    relay: RelayClient = attrs.field(factory=RelayClient, init=False)
    proxy: Proxy = attrs.field(
        default=attrs.Factory(
            lambda self: Proxy(self.relay, self.stall_timeout, None, self._cut_code),
            takes_self=True,
        ),
        init=False,
    )
    _main: httpx.AsyncClient = attrs.field(
        default=attrs.Factory(
            lambda self: httpx.AsyncClient(
                base_url=self.main_url,
                trust_env=False,
                timeout=httpx.Timeout(None, connect=10.0),
                limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
            ),
            takes_self=True,
        ),
        init=False,
    )

    def _cut_code(self) -> str:
        return "server_shutdown" if self.shutting_down else "runtime_failed"

    def _count(self, model: str, kind: str, response: Response) -> Response:
        if self.control is not None:
            self.control.post(
                {"op": "count", "model": model, "endpoint": kind, "status": response.status_code}
            )
        return response

    async def completion(
        self, scope: Scope, receive: Receive, send: Send, path: str, kind: str
    ) -> None:
        arrived = time.perf_counter()
        request = Request(scope, receive)
        if not authorized(self.settings.api_keys, request):
            await unauthorized()(scope, receive, send)
            return
        model = "?"
        try:
            raw, body = await read_json_body(request, self.settings.max_body_bytes)
            model = _validate(body, kind)
            if kind != "embedding" and self.settings.max_tokens_limit is not None:
                raw, body = _limit_tokens(raw, body, self.settings.max_tokens_limit)
        except ClientDisconnect:
            return
        except BadRequest as exc:
            response = error_response(exc.status, str(exc), param=exc.param)
            await self._count(model, kind, response)(scope, receive, send)
            return
        assert self.control is not None
        try:
            answer = await self.control.ask({"op": "lease", "model": model})
        except MainGone:
            answer = {}
        url = answer.get("url")
        if not isinstance(url, str):
            # Not loaded, busy, failed, unknown: the main process answers as it would.
            await self._forward(scope, receive, send, content=raw)
            return
        lease = int(answer["id"])
        model = str(answer.get("name", model))  # an alias's model, as metrics name it
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.control.post({"op": "release", "lease": lease})  # type: ignore[union-attr]

        runtime = _LeasedRuntime(self.control, lease, url, model, self)
        try:
            response = await self.proxy.forward(
                runtime, path, raw, bool(body.get("stream", False)), arrived, release
            )
            await self._count(model, kind, response)(scope, receive, send)
        finally:
            await release()

    async def _forward(
        self, scope: Scope, receive: Receive, send: Send, content: bytes | None = None
    ) -> None:
        """Send the request to the main process and its answer back, streamed."""
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP_BY_HOP]
        target = scope["raw_path"] if scope.get("raw_path") else scope["path"].encode()
        if scope.get("query_string"):
            target += b"?" + scope["query_string"]
        if content is None:
            content = await Request(scope, receive).body()
        upstream_request = self._main.build_request(
            scope["method"], target.decode("latin-1"), headers=headers, content=content
        )
        try:
            upstream = await self._main.send(upstream_request, stream=True)
        except httpx.HTTPError as exc:
            response: Response = error_response(
                502, f"rocmux serve's main process did not answer: {exc}", "server_error"
            )
            await response(scope, receive, send)
            return
        try:
            out_headers = {
                k: v for k, v in upstream.headers.items() if k.encode() not in _HOP_BY_HOP
            }
            response = StreamingResponse(
                upstream.aiter_raw(), status_code=upstream.status_code, headers=out_headers
            )
            await response(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await upstream.aclose()

    async def aclose(self) -> None:
        await self.proxy.aclose()
        await self._main.aclose()


@attrs.define(eq=False)
class FrontApp:
    """The front's ASGI app: completions are leased and relayed; the rest forwarded."""

    front: Front
    starlette: Starlette

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            kind = COMPLETION_PATHS.get(scope["path"]) if scope["method"] == "POST" else None
            if kind is not None:
                await self.front.completion(scope, receive, send, scope["path"], kind)
            else:
                await self.front._forward(scope, receive, send)
            return
        await self.starlette(scope, receive, send)


def create_front_app(front: Front, control_sock: socket.socket) -> FrontApp:
    """The app; its lifespan opens the control channel and says "ready" on it."""

    @asynccontextmanager
    async def lifespan(app: object) -> AsyncIterator[None]:
        front.control = await Control.open(control_sock)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_read_then_exit, front.control)
            front.control.post({"op": "ready", "pid": os.getpid()})
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                with anyio.CancelScope(shield=True):
                    await front.aclose()

    return FrontApp(front, Starlette(lifespan=lifespan))


async def _read_then_exit(control: Control) -> None:
    try:
        await control.read_forever()
    except Exception as exc:
        print(f"rocmux front {os.getpid()}: control channel failed: {exc!r}", file=sys.stderr)
    # The main process has gone, or is about to: nothing here can be served without it.
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    import uvicorn

    from rocmux.cli import _event_loop_options
    from rocmux.serve import uvicorn_config

    parser = argparse.ArgumentParser(prog="python -m rocmux.front")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--control-fd", type=int, required=True)
    parser.add_argument("--main", required=True, help="the main process's internal URL")
    parser.add_argument("--settings", required=True, help="[server] settings, as JSON")
    parser.add_argument("--stall-timeout", type=float, required=True)
    args = parser.parse_args(argv)
    raw = json.loads(args.settings)
    settings = ServerSettings(**{**raw, "api_keys": tuple(raw.get("api_keys", ()))})
    listen = socket.socket(fileno=args.listen_fd)
    control_sock = socket.socket(fileno=args.control_fd)
    front = Front(settings, args.stall_timeout, args.main)
    server = uvicorn.Server(uvicorn_config(create_front_app(front, control_sock), settings))  # type: ignore[arg-type]
    anyio.run(lambda: server.serve(sockets=[listen]), backend_options=_event_loop_options())
    return 0


if __name__ == "__main__":
    sys.exit(main())
