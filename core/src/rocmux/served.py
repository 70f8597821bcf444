"""A :class:`TextModel` backed by a supervised OpenAI-compatible server process.

Runtimes that serve HTTP (llama-server, vLLM) differ in how they are launched,
not in how they are driven; this class is the part they share.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx

from rocmux.backend import TextModel
from rocmux.errors import ModelClosed, RocmuxError, ServerCrashed, StreamError
from rocmux.launch import Launch
from rocmux.manager import PluginManager
from rocmux.openai_client import OpenAIClient
from rocmux.supervisor import ServerProcess, startup_limits
from rocmux.types import GenerateConfig, Message, Token


@attrs.define(eq=False)
class ServedModel(TextModel):
    """Streams from a server process that this object owns.

    A server that crashed is restarted on the next request, at most
    ``max_restarts`` times within ``restart_window`` seconds.

    ``stall_timeout`` and a floor for ``startup_timeout`` come from the
    ``rocmux.supervisor.startup_limits`` in effect where the model is made (the pool
    sets them around a backend's ``load``); restarts keep them.
    """

    backend: str
    model_path: Path
    make_launch: Callable[[], Launch]
    plugins: PluginManager
    startup_timeout: float = 120.0
    stall_timeout: float | None = attrs.field(factory=lambda: startup_limits.get().stall_timeout)
    max_restarts: int = 3
    restart_window: float = 60.0
    request_defaults: dict[str, Any] = attrs.field(factory=dict)
    notes: list[str] = attrs.field(factory=list)
    """What the backend decided while loading (for example the memory fit), for users."""

    server: ServerProcess | None = attrs.field(default=None, init=False)
    _client: OpenAIClient | None = attrs.field(default=None, init=False)
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _error: BaseException | None = attrs.field(default=None, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _restarts: list[float] = attrs.field(factory=list, init=False)

    def __attrs_post_init__(self) -> None:
        floor = startup_limits.get().startup_timeout
        if floor is not None:
            self.startup_timeout = max(self.startup_timeout, floor)

    @property
    def url(self) -> str:
        if self.server is None:
            raise ModelClosed(f"the {self.backend} model {self.model_path.name} is not running")
        return self.server.url

    async def start(self) -> None:
        """Start the server; called by the backend's ``load``."""
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> None:
        server = ServerProcess(
            self.make_launch(),
            plugins=self.plugins,
            startup_timeout=self.startup_timeout,
            stall_timeout=self.stall_timeout,
        )
        try:
            await server.start()
        except BaseException as exc:
            self._error = exc
            raise
        if self._closed:
            # Closed while it started (the pool dropped this model): nothing would ever
            # stop this process.
            await server.stop()
            raise ModelClosed(
                f"the {self.backend} model {self.model_path.name} was closed while it started"
            )
        old_client = self._client
        self.server = server
        self._client = OpenAIClient(server.url, self.backend, self.plugins)
        if old_client is not None:
            await old_client.aclose()

    async def ensure_running(self) -> None:
        """Restart the server if it died (bounded by ``max_restarts``); no-op if running."""
        await self._ensure_running()

    async def check_health(self, limit: float) -> bool:
        """Probe the running server; one that fails two probes ``limit`` seconds apart
        is hung: it is killed (restarted by the next ``ensure_running``), False returned.
        """
        server = self.server
        if server is None or not server.running:
            return True
        started = anyio.current_time()
        problem = await server.probe(limit)
        if problem is None:
            return True
        await anyio.sleep(max(0.0, started + limit - anyio.current_time()))
        if not server.running or await server.probe(limit) is None:
            return True  # recovered, or died: a crash, which check_alive reports
        await server.kill_hung(f"{problem}, twice (hung)")
        return False

    async def _ensure_running(self) -> OpenAIClient:
        if self._closed:
            raise ModelClosed(
                f"the {self.backend} model {self.model_path.name} was closed; load it again"
            )
        server, client = self.server, self._client
        if server is not None and client is not None and server.running:
            return client
        async with self._lock:
            if self.server is not None and self.server.running and self._client is not None:
                return self._client
            if self._closed:
                # close() came while this waited for the lock: restarting would leave
                # a process that nobody stops.
                raise ModelClosed(
                    f"the {self.backend} model {self.model_path.name} was closed; load it again"
                )
            now = time.monotonic()
            self._restarts = [t for t in self._restarts if now - t < self.restart_window]
            if len(self._restarts) >= self.max_restarts:
                raise ServerCrashed(
                    f"the {self.backend} server crashed {len(self._restarts)} times within "
                    f"{self.restart_window:g} s; not restarting it again. "
                    f"Last error: {self._error}",
                    returncode=None if self.server is None else self.server.returncode,
                    stderr_tail="" if self.server is None else self.server.output_tail(),
                )
            self._restarts.append(now)
            if self.server is not None:
                await self.server.stop()
            await self._start_locked()
            assert self.server is not None
            assert self._client is not None
            self.plugins.lifecycle(
                _restarted(self.backend, self.server.pid, self.server.url, len(self._restarts))
            )
            return self._client

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Token]:
        client = await self._ensure_running()
        server = self.server
        assert server is not None
        finished = False
        try:
            async with contextlib.aclosing(client.stream(path, body)) as tokens:
                async for token in tokens:
                    if token.finish_reason is not None:
                        finished = True
                    yield token
            if not finished:
                await server.check_alive()
                raise StreamError(
                    f"the {self.backend} server ended the stream without a finish reason"
                )
        except httpx.TransportError as exc:
            error: BaseException = exc
            try:
                await self._await_exit(server)
                await server.check_alive()
            except ServerCrashed as crashed:
                error = crashed
            else:
                error = StreamError(f"lost the connection to the {self.backend} server: {exc!r}")
            self._error = error
            raise error from exc
        except RocmuxError as exc:
            self._error = exc
            raise

    async def _await_exit(self, server: ServerProcess) -> None:
        # A dropped connection usually means the process is dying; give it a moment
        # so the error can carry its exit status instead of a bare network error.
        await server.wait_exit(0.5)

    def generate(self, prompt: str, config: GenerateConfig | None = None) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        body = {**self.request_defaults, "prompt": prompt, **config.to_openai()}
        return self._stream("/v1/completions", body)

    def chat(
        self, messages: Sequence[Message], config: GenerateConfig | None = None
    ) -> AsyncIterator[Token]:
        config = config or GenerateConfig()
        body = {
            **self.request_defaults,
            "messages": [m.to_openai() for m in messages],
            **config.to_openai(),
        }
        return self._stream("/v1/chat/completions", body)

    def err(self) -> BaseException | None:
        return self._error

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            if self._client is not None:
                await self._client.aclose()
            if self.server is not None:
                await self.server.stop()


def _restarted(backend: str, pid: int | None, url: str, count: int) -> Any:
    from rocmux.events import LifecycleEvent

    return LifecycleEvent(
        kind="restarted", backend=backend, pid=pid, url=url, detail=f"restart {count}"
    )
