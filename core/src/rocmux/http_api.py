"""The OpenAI-compatible HTTP API of ``rocmux serve`` (starlette).

Runtimes that serve HTTP themselves (llama-server, vLLM) are proxied byte for byte:
no re-encoding on the hot path. Other runtimes are driven through ``TextModel`` and
their tokens encoded as OpenAI chunks here.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import attrs
import httpx
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from rocmux.burst import BurstGate
from rocmux.config import ServerSettings
from rocmux.errors import RocmuxError, ServerCrashed
from rocmux.pool import Instance, ModelPool, ModelTooLarge, ModelUnknown, PoolBusy
from rocmux.relay import RelayClient, RelayResponse
from rocmux.types import GenerateConfig, Message

SSE_HEADERS = {"cache-control": "no-cache", "x-accel-buffering": "no"}


def error_response(
    status: int,
    message: str,
    kind: str = "invalid_request_error",
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """An error in OpenAI's JSON shape."""
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@attrs.define(eq=False, slots=False)
class Metrics:
    """Prometheus metrics of one server (own registry, so tests can run several)."""

    registry: CollectorRegistry = attrs.field(factory=CollectorRegistry)

    def __attrs_post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "rocmux_requests", "HTTP requests answered", ["model", "endpoint", "status"], registry=r
        )
        self.tokens = Counter("rocmux_tokens", "Tokens processed", ["model", "kind"], registry=r)
        self.ttft = Histogram(
            "rocmux_time_to_first_token_seconds",
            "Request arrival to first streamed byte",
            ["model"],
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.loads = Counter("rocmux_model_loads", "Model loads", ["model"], registry=r)
        self.load_seconds = Histogram(
            "rocmux_model_load_seconds", "Time to load a model", ["model"], registry=r
        )
        self.evictions = Counter(
            "rocmux_model_evictions", "Models unloaded", ["model", "reason"], registry=r
        )
        self.crashes = Counter(
            "rocmux_runtime_crashes", "Runtime processes that died", ["model"], registry=r
        )
        self.abandoned = Counter(
            "rocmux_model_loads_abandoned",
            "Loads cancelled because every request waiting for them went away",
            ["model"],
            registry=r,
        )
        self.queue_depth = Gauge(
            "rocmux_queue_depth", "Requests waiting beyond the slots", ["model"], registry=r
        )
        self.in_flight = Gauge(
            "rocmux_requests_in_flight", "Requests being served", ["model"], registry=r
        )
        self.loaded = Gauge("rocmux_models_loaded", "Instances loaded", registry=r)
        self.burst = Histogram(
            "rocmux_burst_forwards",
            "Requests sent to runtimes together after a burst_window hold",
            registry=r,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
        )
        self.reserved = Gauge(
            "rocmux_memory_reserved_bytes", "Estimated memory of the loaded instances", registry=r
        )

    def on_load(self, instance: Instance) -> None:
        self.loads.labels(instance.entry.name).inc()
        if instance.load_seconds is not None:
            self.load_seconds.labels(instance.entry.name).observe(instance.load_seconds)

    def on_evict(self, instance: Instance, reason: str) -> None:
        self.evictions.labels(instance.entry.name, reason).inc()

    def on_crash(self, instance: Instance) -> None:
        self.crashes.labels(instance.entry.name).inc()

    def on_abandon(self, instance: Instance) -> None:
        self.abandoned.labels(instance.entry.name).inc()

    def record_usage(self, model: str, usage: object) -> None:
        if isinstance(usage, dict):
            for kind in ("prompt_tokens", "completion_tokens"):
                value = usage.get(kind)
                if isinstance(value, int) and value >= 0:
                    self.tokens.labels(model, kind.removesuffix("_tokens")).inc(value)


class _Stream(StreamingResponse):
    """A streaming response whose cleanup runs even if the body never starts
    (a client that disconnects at once).

    With ``on_disconnect`` (relayed runtime streams), a plain asyncio task watches for
    the client leaving and calls it, which stops the upstream and so ends the body:
    starlette's own way, a task group with a second task and a cancel scope whose
    message formats a task's repr, costs ~0.1 ms of CPU per request, which every later
    request of a burst waits for.
    """

    def __init__(
        self,
        body: AsyncIterator[bytes],
        cleanup: Callable[[], Awaitable[None]],
        on_disconnect: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(body, media_type="text/event-stream", headers=SSE_HEADERS)
        self._cleanup = cleanup
        self._cleaned = False
        self._on_disconnect = on_disconnect

    async def cleanup(self) -> None:
        """Release what the stream holds (the upstream response, the instance). Once."""
        if not self._cleaned:
            self._cleaned = True
            await self._cleanup()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            if self._on_disconnect is None:
                await super().__call__(scope, receive, send)
            else:
                await self._stream_watched(self._on_disconnect, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.cleanup()

    async def _stream_watched(
        self, on_disconnect: Callable[[], None], receive: Receive, send: Send
    ) -> None:
        async def watch() -> None:
            await _until_disconnect(receive)
            on_disconnect()

        # Cancelled before it can run after the final send (which also wakes receive()),
        # so only a client that leaves mid-stream reaches on_disconnect.
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await self.stream_response(send)
        finally:
            watcher.cancel()


def _usage_from_tail(tail: bytes) -> object:
    """The last ``usage`` object in the tail of an OpenAI event stream, if any."""
    for line in reversed(tail.split(b"\n")):
        if line.startswith(b"data: {") and b'"usage"' in line:
            try:
                return json.loads(line[6:]).get("usage")
            except (ValueError, AttributeError):
                return None
    return None


def _sse(data: object) -> bytes:
    return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"


def _upstream_error(status: int, content: bytes) -> JSONResponse:
    """A runtime's error answer in OpenAI's shape (llama-server's lacks ``param`` and has
    a numeric ``code``). 501, a feature the runtime was not started with (embeddings),
    is the client's to fix: 400."""
    try:
        data = json.loads(content)
    except (ValueError, RecursionError):
        data = None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        error = {"message": error} if isinstance(error, str) else {}
    message = error.get("message")
    if not isinstance(message, str) or not message:
        message = content.decode("utf-8", "replace")[:1000] or f"the runtime answered {status}"
    kind = error.get("type")
    if not isinstance(kind, str):
        kind = "invalid_request_error" if status < 500 else "server_error"
    code, param = error.get("code"), error.get("param")
    if status == 501:
        status, code = 400, "unsupported"
    return error_response(
        status,
        message,
        kind,
        code=None if code is None else str(code),
        param=param if isinstance(param, str) else None,
    )


def _sse_error(message: str, code: str) -> bytes:
    error = {"message": message, "type": "server_error", "param": None, "code": code}
    return _sse({"error": error})


def _error_for(exc: BaseException) -> JSONResponse:
    """The HTTP answer to a request the pool could not serve."""
    if isinstance(exc, BadRequest):
        return error_response(exc.status, str(exc), param=exc.param)
    if isinstance(exc, ModelUnknown):
        return error_response(404, str(exc), param="model", code="model_not_found")
    if isinstance(exc, PoolBusy):
        return error_response(
            503,
            str(exc),
            "server_error",
            code="overloaded",
            headers={"retry-after": str(max(1, round(exc.retry_after)))},
        )
    if isinstance(exc, ModelTooLarge):
        return error_response(507, str(exc), "server_error", param="model", code="model_too_large")
    return error_response(502, str(exc), "server_error")


async def _until_disconnect(receive: Receive) -> None:
    """Return when the client has gone (its body was read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _enter(
    context: AbstractAsyncContextManager[Instance], request: Request
) -> Instance | None:
    """Enter the pool while watching the client: one that disconnects stops waiting
    (the pool abandons a load nobody waits for); None then."""
    instance: Instance | None = None
    error: Exception | None = None
    gone = False
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal gone
            await _until_disconnect(request.receive)
            gone = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            instance = await context.__aenter__()
        except Exception as exc:  # kept out of the task group's exception group
            error = exc
        tg.cancel_scope.cancel()
    if error is not None:
        raise error
    if gone and instance is not None:
        with anyio.CancelScope(shield=True):
            await context.__aexit__(None, None, None)
        return None
    return instance


@attrs.frozen
class _Call:
    """One completion request, parsed."""

    model: str
    kind: str
    path: str
    raw: bytes
    body: dict[str, Any]
    stream: bool
    arrived: float


class _LoadingStream(Response):
    """A streaming answer for a model that is not loaded: once the request has to
    wait (for a load, for memory), the response starts and an SSE comment line
    (``: loading MODEL``) goes out every ``loading_comment_interval`` seconds until the
    runtime's stream begins. OpenAI clients skip comments; proxies see bytes moving.

    Errors found before the wait (unknown model, too large) keep their status; later
    ones become an ``error`` event. A client that disconnects stops waiting.
    """

    def __init__(self, api: Api, call: _Call) -> None:
        super().__init__(status_code=200)
        self.api = api
        self.call = call
        self.started = False
        self.waiting = anyio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        api, call = self.api, self.call
        context = api.pool.use(call.model, on_wait=self.waiting.set)
        instance: Instance | None = None
        error: Exception | None = None
        response: Response | None = None
        gone = handed = False
        try:
            async with anyio.create_task_group() as tg:

                async def watch() -> None:
                    nonlocal gone
                    await _until_disconnect(receive)
                    gone = True
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                comments = anyio.CancelScope()
                comments_done = anyio.Event()
                tg.start_soon(self._comments, send, comments, comments_done)
                try:
                    instance = await context.__aenter__()
                except Exception as exc:  # kept out of the task group's exception group
                    error = exc
                comments.cancel()
                await comments_done.wait()
                if instance is not None:
                    held, instance = instance, None  # the response releases it from here
                    response = await api._respond(held, context, call)
                if self.started:
                    await self._pipe(response, error, send)
                tg.cancel_scope.cancel()
            if gone:
                api._count(call.model, call.kind, Response(status_code=499))
            elif self.started:
                api._count(call.model, call.kind, self)
            else:
                assert response is not None or error is not None
                answer = response if response is not None else _error_for(error)  # type: ignore[arg-type]
                api._count(call.model, call.kind, answer)
                handed = True
                await answer(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                if instance is not None:
                    await context.__aexit__(None, None, None)
                if isinstance(response, _Stream) and not handed:
                    await response.cleanup()

    async def _comments(self, send: Send, scope: anyio.CancelScope, done: anyio.Event) -> None:
        line = f": loading {self.call.model}\n\n".encode()
        try:
            with scope:
                await self.waiting.wait()
                self.started = True
                await send(
                    {
                        "type": "http.response.start",
                        "status": 200,
                        "headers": [
                            (b"content-type", b"text/event-stream; charset=utf-8"),
                            *((k.encode(), v.encode()) for k, v in SSE_HEADERS.items()),
                        ],
                    }
                )
                while True:
                    await send({"type": "http.response.body", "body": line, "more_body": True})
                    await anyio.sleep(self.api.settings.loading_comment_interval)
        finally:
            done.set()

    async def _pipe(self, response: Response | None, error: Exception | None, send: Send) -> None:
        """Finish the started stream: the runtime's events, or its error as one."""
        if isinstance(response, _Stream):
            body = response.body_iterator
            try:
                async for chunk in body:
                    data = chunk if isinstance(chunk, bytes) else str(chunk).encode()
                    await send({"type": "http.response.body", "body": data, "more_body": True})
            finally:
                with anyio.CancelScope(shield=True):
                    aclose = getattr(body, "aclose", None)
                    if aclose is not None:
                        await aclose()
                    await response.cleanup()
        else:
            if response is not None:
                failed = json.loads(bytes(response.body))
            else:
                assert error is not None
                failed = json.loads(bytes(_error_for(error).body))
            await send({"type": "http.response.body", "body": _sse(failed), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@attrs.define(eq=False)
class Api:
    """Request handlers over a pool."""

    pool: ModelPool
    settings: ServerSettings
    metrics: Metrics
    relay: RelayClient = attrs.field(factory=lambda: RelayClient(spares=True), init=False)
    """Runtimes on plain-HTTP URLs (loopback): the lean streaming client, with
    connections opened ahead of the requests (llama-server closes each one after a
    stream)."""
    gate: BurstGate = attrs.field(
        default=attrs.Factory(
            lambda self: BurstGate(self.settings.burst_window, self.metrics.burst.observe),
            takes_self=True,
        ),
        init=False,
    )
    """Holds forwards to runtimes until a burst of requests has been read."""
    _https: httpx.AsyncClient | None = attrs.field(default=None, init=False)
    shutting_down: bool = attrs.field(default=False, init=False)
    """Set when the drain deadline of a graceful shutdown has passed."""

    # -- plumbing -------------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if not self.settings.api_keys:
            return True
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        # Every key is compared, in constant time, so timing says nothing about them.
        matched = False
        for key in self.settings.api_keys:
            matched |= hmac.compare_digest(token.encode(), key.encode())
        return matched

    def _unauthorized(self) -> JSONResponse:
        return error_response(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )

    async def _json_body(self, request: Request) -> tuple[bytes, dict[str, Any]]:
        # Straight from the ASGI messages: starlette's Headers and body stream cost a few
        # microseconds a request, which every later request of a burst waits for.
        limit = self.settings.max_body_bytes
        for name, value in request.scope["headers"]:
            if name == b"content-length":
                if value.isdigit() and int(value) > limit:
                    raise BadRequest(f"request body over the limit of {limit} bytes", status=413)
                break
        chunks: list[bytes] = []
        size = 0
        receive = request.receive
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientDisconnect()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise BadRequest(f"request body over the limit of {limit} bytes", status=413)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        raw = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            raise BadRequest("request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("request body must be a JSON object")
        return raw, body

    # -- endpoints --------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "instances": len(self.pool.instances)})

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "rocmux"}
            for name in self.pool.names()
        ]
        return JSONResponse({"object": "list", "data": data})

    async def metrics_endpoint(self, request: Request) -> Response:
        loaded = 0
        for instance in self.pool.instances.values():
            name = instance.entry.name
            self.metrics.in_flight.labels(name).set(instance.in_flight)
            self.metrics.queue_depth.labels(name).set(max(0, instance.in_flight - instance.slots))
            loaded += instance.state == "ready"
        self.metrics.loaded.set(loaded)
        self.metrics.reserved.set(sum(i.need for i in self.pool.instances.values()))
        return Response(
            generate_latest(self.metrics.registry), media_type="text/plain; version=0.0.4"
        )

    async def admin_instances(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        return JSONResponse({"instances": [i.describe() for i in self.pool.instances.values()]})

    async def admin_events(self, request: Request) -> Response:
        """The pool's recent loads, evictions, waits and memory readings, oldest first."""
        if not self._authorized(request):
            return self._unauthorized()
        return JSONResponse({"events": list(self.pool.events)})

    async def admin_unload(self, request: Request) -> Response:
        if not self._authorized(request):
            return self._unauthorized()
        key = request.path_params["key"]
        if not await self.pool.unload(key):
            return error_response(404, f"no loaded instance {key!r}", code="instance_not_found")
        return JSONResponse({"unloaded": key})

    async def _completion(self, request: Request, path: str, kind: str) -> Response:
        arrived = time.perf_counter()
        if not self._authorized(request):
            return self._unauthorized()
        model = "?"
        try:
            raw, body = await self._json_body(request)
            model = _validate(body, kind)
            if kind != "embedding" and self.settings.max_tokens_limit is not None:
                raw, body = _limit_tokens(raw, body, self.settings.max_tokens_limit)
            stream = bool(body.get("stream", False))
            if self.pool.is_ready(model):
                # The hot path: nothing to wait for, no disconnect to watch.
                context = self.pool.use(model)
                instance: Instance | None = await context.__aenter__()
            elif stream and self.settings.loading_comments:
                call = _Call(model, kind, path, raw, body, stream, arrived)
                return _LoadingStream(self, call)
            else:
                context = self.pool.use(model)
                instance = await _enter(context, request)
        except ClientDisconnect:
            return Response(status_code=499)
        except (BadRequest, RocmuxError) as exc:
            return self._count(model, kind, _error_for(exc))
        if instance is None:  # the client went away while it waited
            return self._count(model, kind, Response(status_code=499))
        call = _Call(model, kind, path, raw, body, stream, arrived)
        response = await self._respond(instance, context, call)
        return self._count(instance.entry.name, kind, response)

    async def _respond(
        self, instance: Instance, context: AbstractAsyncContextManager[Instance], call: _Call
    ) -> Response:
        """The answer to ``call`` from ``instance``, which ``context`` holds until the
        answer is complete (a stream's cleanup releases it)."""
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await context.__aexit__(None, None, None)

        try:
            if hasattr(instance.model, "url") and hasattr(instance.model, "ensure_running"):
                return await self._proxy(
                    instance, call.path, call.raw, call.stream, call.arrived, release
                )
            if call.kind == "embedding":
                await release()
                return error_response(400, f"model {call.model!r} does not serve embeddings")
            return await self._generate(
                instance, call.body, call.kind, call.stream, call.arrived, release
            )
        except BaseException:
            with anyio.CancelScope(shield=True):
                await release()
            raise

    def _count(self, model: str, kind: str, response: Response) -> Response:
        self.metrics.requests.labels(model, kind, str(response.status_code)).inc()
        return response

    # -- proxy to an HTTP runtime ------------------------------------------------------------

    async def _proxy(
        self,
        instance: Instance,
        path: str,
        raw: bytes,
        stream: bool,
        arrived: float,
        release: Callable[[], Awaitable[None]],
    ) -> Response:
        model = instance.entry.name
        seen = instance.chunks
        try:
            # Each read (the first byte, every later chunk) must come within stall_timeout.
            upstream = await self._send(instance, path, raw, self.pool.limits.stall_timeout)
        except httpx.ReadTimeout:
            await release()
            message = await self._stalled(instance, seen)
            return error_response(504, message, "server_error", code="runtime_timeout")
        except (httpx.TransportError, RocmuxError) as exc:
            await release()
            return error_response(502, await self._explain(instance, exc), "server_error")
        if not stream or upstream.status_code != 200:
            try:
                content = await upstream.aread()
            except httpx.ReadTimeout:
                message = await self._stalled(instance, seen)
                return error_response(504, message, "server_error", code="runtime_timeout")
            except httpx.TransportError as exc:
                return error_response(502, await self._explain(instance, exc), "server_error")
            finally:
                await upstream.aclose()
                await release()
            instance.chunks += 1
            if upstream.status_code >= 400:
                return _upstream_error(upstream.status_code, content)
            if upstream.status_code == 200:
                try:
                    self.metrics.record_usage(model, json.loads(content).get("usage"))
                except (ValueError, AttributeError):
                    pass
            return Response(
                content,
                status_code=upstream.status_code,
                media_type=upstream.headers.get("content-type", "application/json"),
            )

        gone = False

        def client_gone() -> None:
            nonlocal gone
            gone = True
            upstream.abort()  # type: ignore[union-attr]

        async def body() -> AsyncIterator[bytes]:
            first = True
            tail = b""
            mark = seen  # instance.chunks at this stream's last chunk
            try:
                async for chunk in upstream.aiter_raw():
                    instance.chunks = mark = instance.chunks + 1
                    if first:
                        first = False
                        self.metrics.ttft.labels(model).observe(time.perf_counter() - arrived)
                    tail = (tail + chunk)[-4096:]
                    yield chunk
            except httpx.ReadTimeout:
                if not gone:
                    yield _sse_error(await self._stalled(instance, mark), "runtime_timeout")
                return
            except httpx.TransportError as exc:
                if not gone:
                    yield _sse_error(await self._explain(instance, exc), self._cut_code())
                return
            sse = upstream.headers.get("content-type", "").startswith("text/event-stream")
            if sse and b"data: [DONE]" not in tail:
                # The runtime closed the stream cleanly but early (it was stopped).
                lost = httpx.RemoteProtocolError("the stream ended without [DONE]")
                yield _sse_error(await self._explain(instance, lost), self._cut_code())
                return
            self.metrics.record_usage(model, _usage_from_tail(tail))

        async def cleanup() -> None:
            # Closing the upstream response drops the connection: the runtime stops
            # generating for a client that went away.
            await upstream.aclose()
            await release()

        relayed = isinstance(upstream, RelayResponse)
        return _Stream(body(), cleanup, client_gone if relayed else None)

    async def _send(
        self, instance: Instance, path: str, raw: bytes, read_timeout: float | None
    ) -> RelayResponse | httpx.Response:
        """POST to the runtime; the response head is read, the body left to stream."""
        for attempt in range(2):
            await instance.model.ensure_running()  # type: ignore[union-attr]
            url: str = instance.model.url  # type: ignore[union-attr]
            # A retry goes at once: the burst it came with has gone already.
            hold = self.gate.passage if attempt == 0 else None
            try:
                if url.startswith("http://"):
                    return await self.relay.post(
                        url, path, raw, read_timeout, fresh=attempt > 0, hold=hold
                    )
                if hold is not None:
                    await hold(None)
                http = self._tls_client()
                request = http.build_request(
                    "POST",
                    url + path,
                    content=raw,
                    headers={"content-type": "application/json"},
                    timeout=httpx.Timeout(None, connect=10.0, read=read_timeout),
                )
                return await http.send(request, stream=True)
            except httpx.RemoteProtocolError:
                # "Server disconnected without sending a response": a pooled connection
                # that llama-server closed as it was reused (about 1 request in 1000,
                # after a stream). The request never reached it: send it once more, on a
                # new connection (the next pooled one may be as stale), if the runtime is
                # still running (else it crashed, which is reported).
                server = getattr(instance.model, "server", None)
                if attempt or server is None or not server.running:
                    raise
        raise AssertionError("unreachable")

    def _tls_client(self) -> httpx.AsyncClient:
        """A client that verifies certificates, for a runtime behind an https URL."""
        if self._https is None:
            self._https = httpx.AsyncClient(
                trust_env=False, timeout=httpx.Timeout(None, connect=10.0)
            )
        return self._https

    def _cut_code(self) -> str:
        return "server_shutdown" if self.shutting_down else "runtime_failed"

    async def _stalled(self, instance: Instance, seen: int) -> str:
        """Why a request saw no byte for ``stall_timeout``; a hung runtime is killed.

        ``seen`` is ``instance.chunks`` when the request's silence began. Hung is: it
        fails its health check, or two requests in a row stalled while it sent nothing
        to anyone. The second catches a runtime whose HTTP threads still answer
        ``/health`` while its inference loop is stuck (llama-server caught mid-shutdown
        by a SIGTERM; a GPU kernel that never ends), and spares a busy one whose queued
        requests wait for a slot while its streams run. One silent stall alone may be a
        prompt slower than the stall timeout.
        """
        limits = self.pool.limits
        silent = instance.chunks == seen
        again = silent and instance.silent_at == instance.chunks
        instance.silent_at = instance.chunks if silent and not again else None
        message = (
            f"the {instance.backend} runtime of {instance.entry.name!r} sent nothing for "
            f"{limits.stall_timeout:g} s (limits.stall_timeout)"
        )
        check = getattr(instance.model, "check_health", None)
        server = getattr(instance.model, "server", None)
        if check is not None and not await check(limits.health_timeout):
            instance.silent_at = None
            message += "; it did not answer its health check either, so it was killed"
        elif again and server is not None and server.running:
            await server.kill_hung(
                f"2 requests in a row got nothing for {limits.stall_timeout:g} s "
                "while its health check still answered (hung)"
            )
            message += (
                "; 2 requests in a row got nothing while it still answered its "
                "health check, so it was killed"
            )
        if server is not None:
            try:
                await server.check_alive()
            except ServerCrashed as crashed:
                message += f". {crashed}"
        return message

    async def begin_shutdown(self) -> None:
        """The drain deadline passed: stop every runtime, which ends the open streams
        with an error event instead of a cut connection."""
        self.shutting_down = True
        for instance in list(self.pool.instances.values()):
            server = getattr(instance.model, "server", None)
            if server is not None and instance.in_flight:
                # llama-server does not exit on SIGTERM while it streams: no grace.
                server.stop_timeout = 0.0
        await self.pool.aclose()

    async def _explain(self, instance: Instance, exc: BaseException) -> str:
        if self.shutting_down:
            return (
                "rocmux serve is shutting down: the stream was cut at the drain deadline "
                f"({self.settings.shutdown_timeout:g} s)"
            )
        server = getattr(instance.model, "server", None)
        if server is not None:
            await server.wait_exit(0.5)
            try:
                await server.check_alive()
            except ServerCrashed as crashed:
                return str(crashed)
        if isinstance(exc, RocmuxError):
            return str(exc)
        return f"lost the connection to the {instance.backend} runtime: {exc!r}"

    # -- drive a TextModel ---------------------------------------------------------------------

    async def _generate(
        self,
        instance: Instance,
        body: dict[str, Any],
        kind: str,
        stream: bool,
        arrived: float,
        release: Callable[[], Awaitable[None]],
    ) -> Response:
        model = instance.model
        assert model is not None
        try:
            config = _generate_config(body)
        except BadRequest as exc:
            await release()
            return error_response(400, str(exc), param=exc.param)
        if kind == "chat":
            tokens = model.chat(
                [Message(m["role"], m["content"]) for m in body["messages"]], config
            )
        else:
            tokens = model.generate(body["prompt"], config)
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        name = instance.entry.name

        def chunk(text: str, finish: str | None, usage: object = None) -> dict[str, Any]:
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if kind == "chat":
                choice["delta"] = {"content": text} if text else {}
            else:
                choice["text"] = text
            data: dict[str, Any] = {
                "id": rid,
                "created": created,
                "model": name,
                "choices": [choice],
                "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            }
            if usage is not None:
                data["usage"] = usage
            return data

        if not stream:
            try:
                text: list[str] = []
                finish, usage = None, None
                async for token in tokens:
                    text.append(token.text)
                    finish = token.finish_reason or finish
                    if token.usage is not None:
                        usage = {
                            "prompt_tokens": token.usage.prompt_tokens,
                            "completion_tokens": token.usage.completion_tokens,
                            "total_tokens": token.usage.total_tokens,
                        }
            except RocmuxError as exc:
                return error_response(502, str(exc), "server_error")
            finally:
                await release()
            self.metrics.record_usage(name, usage)
            joined = "".join(text)
            choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": joined}
            else:
                choice["text"] = joined
            return JSONResponse(
                {
                    "id": rid,
                    "created": created,
                    "model": name,
                    "choices": [choice],
                    "object": "chat.completion" if kind == "chat" else "text_completion",
                    "usage": usage,
                }
            )

        async def body_iter() -> AsyncIterator[bytes]:
            first = True
            try:
                async for token in tokens:
                    if first:
                        first = False
                        self.metrics.ttft.labels(name).observe(time.perf_counter() - arrived)
                    usage = None
                    if token.usage is not None:
                        usage = {
                            "prompt_tokens": token.usage.prompt_tokens,
                            "completion_tokens": token.usage.completion_tokens,
                            "total_tokens": token.usage.total_tokens,
                        }
                        self.metrics.record_usage(name, usage)
                    if token.text or token.finish_reason or usage:
                        yield _sse(chunk(token.text, token.finish_reason, usage))
            except RocmuxError as exc:
                yield _sse(
                    {
                        "error": {
                            "message": str(exc),
                            "type": "server_error",
                            "param": None,
                            "code": "runtime_failed",
                        }
                    }
                )
                return
            yield b"data: [DONE]\n\n"

        async def cleanup() -> None:
            aclose = getattr(tokens, "aclose", None)
            if aclose is not None:
                await aclose()
            await release()

        return _Stream(body_iter(), cleanup)

    async def aclose(self) -> None:
        await self.relay.aclose()
        if self._https is not None:
            await self._https.aclose()


def _validate(body: dict[str, Any], kind: str) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required and must be a string", "model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise BadRequest("'messages' must be a non-empty array", "messages")
        for i, message in enumerate(messages):
            if not isinstance(message, dict) or not isinstance(message.get("role"), str):
                raise BadRequest(f"messages[{i}] must be an object with a 'role'", "messages")
            _validate_message(message, i)
        _validate_tools(body.get("tools"))
    elif kind == "completion":
        prompt = body.get("prompt")
        if not isinstance(prompt, str | list):
            raise BadRequest("'prompt' must be a string or an array", "prompt")
    elif "input" not in body:
        raise BadRequest("'input' is required", "input")
    max_tokens = body.get("max_tokens", body.get("max_completion_tokens"))
    if max_tokens is not None and (
        isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1
    ):
        raise BadRequest("'max_tokens' must be a positive integer", "max_tokens")
    for name in ("temperature", "top_p"):
        value = body.get(name)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or value < 0
        ):
            raise BadRequest(f"'{name}' must be a non-negative number", name)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be true or false", "stream")
    return model


def _validate_message(message: dict[str, Any], i: int) -> None:
    """OpenAI's types for a chat message's fields (runtimes answer 500 to some others)."""
    content = message.get("content")
    if isinstance(content, list):
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise BadRequest(
                    f"messages[{i}].content parts must be objects with a 'type'", "messages"
                )
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise BadRequest(f"messages[{i}].content text parts need a 'text'", "messages")
    elif content is not None and not isinstance(content, str):
        raise BadRequest(f"messages[{i}].content must be a string or an array", "messages")
    for name in ("name", "tool_call_id", "reasoning_content"):
        if name in message and not isinstance(message[name], str):
            raise BadRequest(f"messages[{i}].{name} must be a string", "messages")
    calls = message.get("tool_calls")
    if calls is not None and not (
        isinstance(calls, list) and all(_is_function(call) for call in calls)
    ):
        raise BadRequest(
            f"messages[{i}].tool_calls must be an array of "
            '{"type": "function", "function": {"name": ...}} objects',
            "messages",
        )


def _validate_tools(tools: object) -> None:
    if tools is not None and not (
        isinstance(tools, list) and all(_is_function(tool) for tool in tools)
    ):
        raise BadRequest(
            '\'tools\' must be an array of {"type": "function", "function": {"name": ...}} objects',
            "tools",
        )


def _is_function(item: object) -> bool:
    if not isinstance(item, dict) or item.get("type", "function") != "function":
        return False
    function = item.get("function")
    return isinstance(function, dict) and isinstance(function.get("name"), str)


def _limit_tokens(raw: bytes, body: dict[str, Any], limit: int) -> tuple[bytes, dict[str, Any]]:
    """Refuse a token budget over ``limit``; give a request that names none ``limit``.

    llama-server also reads ``n_predict`` (where -1 means no end), so it is held to
    the same limit.
    """
    asked = {
        name: body[name]
        for name in ("max_tokens", "max_completion_tokens", "n_predict")
        if body.get(name) is not None
    }
    for name, value in asked.items():
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= limit:
            raise BadRequest(
                f"'{name}' must be a positive integer of at most {limit} on this server "
                "([server] max_tokens_limit)",
                name,
            )
    if asked:
        return raw, body
    body = {**body, "max_tokens": limit}
    return json.dumps(body).encode(), body


def _generate_config(body: dict[str, Any]) -> GenerateConfig:
    fields = {
        "max_tokens": body.get("max_tokens", body.get("max_completion_tokens", 256)),
        "temperature": body.get("temperature"),
        "top_p": body.get("top_p"),
        "top_k": body.get("top_k"),
        "min_p": body.get("min_p"),
        "seed": body.get("seed"),
        "stop": body.get("stop") or (),
        "repeat_penalty": body.get("repeat_penalty"),
    }
    try:
        return GenerateConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"bad sampling settings: {exc}") from None


COMPLETION_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completion",
    "/v1/embeddings": "embedding",
}
"""The endpoints :class:`App` sends straight to :class:`Api`, and their kind."""


@attrs.define(eq=False)
class App:
    """``rocmux serve``'s ASGI app: POSTs to :data:`COMPLETION_PATHS` go straight to
    the handler; everything else (other routes, other methods, lifespan) to starlette.

    In a burst of requests one event loop reads them one after another, so every
    request's CPU before its forward delays the later ones (``rocmux.burst`` holds
    the forwards until the burst has been read). Starlette's router, its two exception
    middlewares and its request wrapper are part of that CPU, and these three routes
    need none of them.
    """

    starlette: Starlette
    api: Api

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            path = scope["path"]
            kind = COMPLETION_PATHS.get(path)
            if kind is not None:
                self.api.gate.arrived()
                response = await self.api._completion(Request(scope, receive), path, kind)
                await response(scope, receive, send)
                return
        await self.starlette(scope, receive, send)


def create_app(
    pool: ModelPool,
    settings: ServerSettings,
    metrics: Metrics | None = None,
    lifespan: Callable[[Starlette], Any] | None = None,
) -> tuple[App, Api]:
    """The ASGI app and its handler object."""
    api = Api(pool, settings, metrics or Metrics())
    routes = [
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics_endpoint, methods=["GET"]),
        Route("/v1/models", api.models, methods=["GET"]),
        # App answers their POSTs; the routes are here so other methods get a 405.
        *(Route(path, _not_reached, methods=["POST"]) for path in COMPLETION_PATHS),
        Route("/admin/instances", api.admin_instances, methods=["GET"]),
        Route("/admin/events", api.admin_events, methods=["GET"]),
        Route("/admin/instances/{key}/unload", api.admin_unload, methods=["POST"]),
    ]
    handlers = {HTTPException: _http_exception}
    starlette = Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)
    return App(starlette, api), api


async def _not_reached(request: Request) -> Response:
    raise AssertionError("App handles POSTs to the completion paths before starlette")


async def _http_exception(request: Request, exc: Exception) -> Response:
    """Unknown paths (404) and wrong methods (405) in OpenAI's error shape too."""
    status = getattr(exc, "status_code", 400)
    detail = getattr(exc, "detail", "")
    message = f"{request.method} {request.url.path}: {detail}"
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return error_response(status, message, code=code, headers=getattr(exc, "headers", None))
