"""The main process's side of ``[server] workers``: it starts the front processes
(:mod:`rocmux.front`) and lends them instances of its pool.

The control channel is a Unix socket pair per front, one JSON object a line. A front
asks, the main process answers (``id`` ties them)::

    {"op": "lease", "model": m, "id": i}      -> {"id": i, "url": u, "name": n}
                                                 | {"id": i, "slow": true}
    {"op": "explain", "lease": i, "stall": true | "error": name, "detail": text, "id": j}
                                              -> {"id": j, "message": text, "shutting_down": b}

and tells, without an answer::

    {"op": "ready", "pid": p}                 its server listens
    {"op": "release", "lease": i}             the request is over (its instance is free)
    {"op": "count", "model": m, "endpoint": k, "status": s}
    {"op": "ttft", "model": m, "s": seconds}  {"op": "usage", "model": m, "usage": {...}}

A lease holds the instance as a request of this process would (``ModelPool.use``): it
counts in flight, so the instance is neither evicted nor reaped under it, and the queue
limit counts it. It is granted through the burst gate, which thus sees the requests of
every front. A lease the front does not give back is given back when its channel closes.
``slow`` sends the request to this process's own server instead (not loaded, busy,
failed, not an HTTP runtime), whose answer the front relays.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from contextlib import AbstractAsyncContextManager
from typing import Any

import anyio
import attrs
import httpx
from anyio.abc import Process, TaskStatus

from rocmux.http_api import Api
from rocmux.pool import Instance
from rocmux.supervisor import _death_tie


@attrs.define(eq=False)
class _Channel:
    """One front's channel, as seen from the main process."""

    api: Api
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    leases: dict[int, tuple[AbstractAsyncContextManager[Instance], Instance]] = attrs.field(
        factory=dict
    )
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    _out: list[bytes] = attrs.field(factory=list)

    def post(self, message: dict[str, Any]) -> None:
        """Answers given in one pass of the loop (a burst's leases) leave in one write."""
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(json.dumps(message, separators=(",", ":")).encode() + b"\n")

    def _flush(self) -> None:
        data, self._out = b"".join(self._out), []
        if not self.writer.is_closing():
            self.writer.write(data)

    async def serve(self) -> None:
        """Handle the front's messages until it closes the channel; then give back
        every lease it still holds."""
        try:
            async with anyio.create_task_group() as tg:
                while line := await self.reader.readline():
                    message = json.loads(line)
                    op = message.get("op")
                    if op == "lease":
                        self.api.gate.arrived()
                        tg.start_soon(self._lease, message["id"], message["model"])
                    elif op == "release":
                        await self._release(message["lease"])
                    elif op == "explain":
                        tg.start_soon(self._explain, message)
                    elif op == "count":
                        self.api.metrics.requests.labels(
                            message["model"], message["endpoint"], str(message["status"])
                        ).inc()
                    elif op == "ttft":
                        self.api.metrics.ttft.labels(message["model"]).observe(message["s"])
                    elif op == "usage":
                        self.api.metrics.record_usage(message["model"], message["usage"])
                    elif op == "ready":
                        self.ready.set()
                tg.cancel_scope.cancel()
        finally:
            with anyio.CancelScope(shield=True):
                for lease in list(self.leases):
                    await self._release(lease)
                self.writer.close()

    async def _lease(self, lease: int, model: str) -> None:
        pool = self.api.pool
        try:
            ready = pool.is_ready(model)
        except Exception:  # unknown: the main process answers 404
            ready = False
        if not ready:
            self.post({"id": lease, "slow": True})
            return
        context = pool.use(model)
        try:
            instance = await context.__aenter__()
        except Exception:  # busy, or gone meanwhile: the main process answers
            self.post({"id": lease, "slow": True})
            return
        self.leases[lease] = (context, instance)
        try:
            served = instance.model
            if not (hasattr(served, "url") and hasattr(served, "ensure_running")):
                raise LookupError("not an HTTP runtime")
            await served.ensure_running()
            url = served.url
            if not url.startswith("http://"):
                raise LookupError("the front relays plain HTTP only")
        except Exception:
            await self._release(lease)
            self.post({"id": lease, "slow": True})
            return
        name = instance.entry.name
        await self.api.gate.passage(lambda: self.post({"id": lease, "url": url, "name": name}))

    async def _release(self, lease: int) -> None:
        held = self.leases.pop(lease, None)
        if held is not None:
            await held[0].__aexit__(None, None, None)

    async def _explain(self, message: dict[str, Any]) -> None:
        held = self.leases.get(message["lease"])
        if held is None:
            text = "the request's lease had ended"
        elif message.get("stall"):
            text = await self.api._stalled(held[1])
        else:
            kind = getattr(httpx, str(message.get("error")), None)
            if not (isinstance(kind, type) and issubclass(kind, httpx.TransportError)):
                kind = httpx.TransportError
            text = await self.api._explain(held[1], kind(str(message.get("detail", ""))))
        self.post({"id": message["id"], "message": text, "shutting_down": self.api.shutting_down})


@attrs.define(eq=False)
class Fronts:
    """``count`` front processes reading requests from ``listen``; each that exits
    before :meth:`stop` is started again (after a second)."""

    count: int
    listen: socket.socket
    main_url: str
    api: Api
    _processes: dict[int, Process] = attrs.field(factory=dict, init=False)
    _stopping: bool = attrs.field(default=False, init=False)

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Start the fronts; report readiness when every one listens; keep them."""
        async with anyio.create_task_group() as tg:
            for slot in range(self.count):
                await tg.start(self._keep, slot)
            task_status.started()

    async def _keep(
        self, slot: int, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        while not self._stopping:
            parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            settings = self.api.settings
            payload = {k: v for k, v in attrs.asdict(settings).items() if k not in ("host", "port")}
            argv = [
                sys.executable,
                "-m",
                "rocmux.front",
                "--listen-fd",
                str(self.listen.fileno()),
                "--control-fd",
                str(child.fileno()),
                "--main",
                self.main_url,
                "--settings",
                json.dumps(payload),
                "--stall-timeout",
                repr(self.api.pool.limits.stall_timeout),
            ]
            process = await anyio.open_process(
                _death_tie(argv),
                stdin=subprocess.DEVNULL,
                stdout=None,
                stderr=None,
                pass_fds=(self.listen.fileno(), child.fileno()),
            )
            child.close()
            self._processes[slot] = process
            reader, writer = await asyncio.open_unix_connection(sock=parent)
            channel = _Channel(self.api, reader, writer)
            async with anyio.create_task_group() as tg:
                tg.start_soon(channel.serve)
                if not started:
                    with anyio.fail_after(60):
                        await channel.ready.wait()
                    started = True
                    task_status.started()
            # The channel closed: the front has exited, or is about to.
            with anyio.CancelScope(shield=True):
                await process.wait()
            if not self._stopping:
                print(
                    f"rocmux serve: front process {process.pid} exited "
                    f"({process.returncode}); starting another",
                    file=sys.stderr,
                    flush=True,
                )
                await anyio.sleep(1.0)

    def terminate(self) -> None:
        """Ask every front to stop taking connections and finish its requests."""
        self._stopping = True
        for process in self._processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)

    async def stop(self, grace: float) -> None:
        """Stop the fronts: SIGTERM, then SIGKILL after ``grace`` seconds."""
        self.terminate()
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(grace):
                for process in list(self._processes.values()):
                    await process.wait()
            for process in self._processes.values():
                if process.returncode is None:
                    process.kill()
                    await process.wait()

    @property
    def pids(self) -> list[int]:
        """The front processes running now."""
        return [p.pid for p in self._processes.values() if p.returncode is None]
