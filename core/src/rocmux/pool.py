"""A pool of loaded models: load on demand, share identical configurations, evict the
least recently used idle instance, unload idle ones, count crashes.

Used by ``rocmux serve``; it knows nothing of HTTP.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import anyio
import attrs

from rocmux import hookimpl
from rocmux.backend import TextModel
from rocmux.config import Limits, ModelEntry
from rocmux.errors import ModelError, RocmuxError
from rocmux.events import LifecycleEvent
from rocmux.manager import PluginManager
from rocmux.registry import RegisteredBackend
from rocmux.types import LoadConfig

if TYPE_CHECKING:
    from rocmux.devices import GpuInfo

State = Literal["loading", "ready", "unloading", "failed"]


class ModelUnknown(ModelError):
    """The requested model name is neither configured nor discovered."""


class ModelTooLarge(RocmuxError):
    """The model cannot fit the memory budget even alone: no load is attempted."""


class PoolBusy(RocmuxError):
    """No room for the request before its deadline; carries a retry hint."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def instance_key(path: Path, backend: str, config: LoadConfig) -> str:
    """Identical (model, backend, effective flags) share one instance."""
    raw = f"{path.resolve()}\0{backend}\0{attrs.asdict(config)!r}".encode()
    return hashlib.sha256(raw).hexdigest()[:12]


@attrs.define(eq=False)
class Instance:
    """One loaded (or loading) model."""

    key: str
    entry: ModelEntry
    path: Path
    backend: str
    state: State = "loading"
    model: TextModel | None = None
    in_flight: int = 0
    last_used: float = attrs.field(factory=time.monotonic)
    loaded_at: float | None = None
    load_seconds: float | None = None
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    error: str | None = None
    crashes: int = 0
    requests: int = 0
    need: int = 0
    """Estimated bytes this instance uses (0 when no memory budget is set)."""
    load: LoadConfig | None = None

    @property
    def slots(self) -> int:
        return self.entry.load.parallel or 4

    def describe(self) -> dict[str, object]:
        url = getattr(self.model, "url", None) if self.state == "ready" else None
        server = getattr(self.model, "server", None)
        return {
            "key": self.key,
            "model": self.entry.name,
            "path": str(self.path),
            "backend": self.backend,
            "state": self.state,
            "in_flight": self.in_flight,
            "requests": self.requests,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
            "load_seconds": self.load_seconds,
            "pid": getattr(server, "pid", None),
            "url": url,
            "crashes": self.crashes,
            "memory_estimate": self.need or None,
            "context_len": self.load.context_len if self.load else None,
            "last_error": self.error,
        }


@attrs.define(eq=False)
class PoolObserver:
    """Callbacks the HTTP layer uses for metrics."""

    on_load: Callable[[Instance], None] = lambda i: None
    on_evict: Callable[[Instance, str], None] = lambda i, reason: None
    on_crash: Callable[[Instance], None] = lambda i: None


@attrs.define(eq=False)
class ModelPool:
    """Instances by key, with the names that reach them."""

    entries: Sequence[ModelEntry]
    limits: Limits
    plugins: PluginManager
    observer: PoolObserver = attrs.field(factory=PoolObserver)
    instances: dict[str, Instance] = attrs.field(factory=dict, init=False)
    _names: dict[str, ModelEntry] = attrs.field(factory=dict, init=False)
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _idle: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _resolved: dict[str, tuple[Path, RegisteredBackend]] = attrs.field(factory=dict, init=False)
    _watcher_name: str = attrs.field(default="", init=False)
    _resolve_lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _on_gpu: dict[str, bool] = attrs.field(factory=dict, init=False)

    def __attrs_post_init__(self) -> None:
        for entry in self.entries:
            for name in (entry.name, *entry.aliases):
                self._names[name] = entry
        self._watcher_name = f"rocmux.pool.{id(self):x}"
        self.plugins.register(_CrashWatcher(self), name=self._watcher_name)

    # -- names --------------------------------------------------------------------------

    def names(self) -> list[str]:
        return [entry.name for entry in self.entries]

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._names[name]
        except KeyError:
            known = ", ".join(sorted(self._names)) or "none"
            raise ModelUnknown(f"model {name!r} does not exist here; available: {known}") from None

    # -- use ----------------------------------------------------------------------------

    @asynccontextmanager
    async def use(self, name: str) -> AsyncIterator[Instance]:
        """Hold an instance of model ``name`` for one request, loading it if needed."""
        entry = self.entry(name)
        instance = await self._acquire(entry)
        try:
            yield instance
        finally:
            instance.in_flight -= 1
            instance.last_used = time.monotonic()
            if instance.in_flight == 0:
                self._idle.set()

    async def _acquire(self, entry: ModelEntry) -> Instance:
        deadline = anyio.current_time() + self.limits.queue_timeout
        while True:
            instance = await self._instance_for(entry, deadline)
            if instance.state == "loading":
                with anyio.move_on_at(deadline):
                    await instance.ready.wait()
            if instance.state == "ready":
                if instance.in_flight >= instance.slots + self.limits.queue_length:
                    raise PoolBusy(
                        f"model {entry.name!r} has {instance.in_flight} requests in flight "
                        f"and queued (limit {instance.slots + self.limits.queue_length})",
                        retry_after=1.0,
                    )
                instance.in_flight += 1
                instance.requests += 1
                instance.last_used = time.monotonic()
                return instance
            if instance.state == "failed":
                raise RocmuxError(f"model {entry.name!r} failed to load: {instance.error}")
            if anyio.current_time() >= deadline:
                raise PoolBusy(f"model {entry.name!r} is still loading", retry_after=2.0)
            # "unloading": it is going away; ask again for a fresh instance.
            await anyio.sleep(0.01)

    async def _instance_for(self, entry: ModelEntry, deadline: float) -> Instance:
        path, registered = await self._resolve(entry)
        backend = registered.name
        key = instance_key(path, backend, entry.load)
        existing = self.instances.get(key)
        if existing is not None and existing.state in ("loading", "ready"):
            return existing
        async with self._lock:
            existing = self.instances.get(key)
            if existing is not None and existing.state in ("loading", "ready"):
                return existing
            load, need = await self._plan(entry, path)
            await self._make_room(deadline, entry.name, need)
            instance = Instance(
                key=key, entry=entry, path=path, backend=backend, need=need, load=load
            )
            self.instances[key] = instance
        # Loading happens outside the lock: other models stay reachable meanwhile.
        started = time.monotonic()
        try:
            instance.model = await registered.backend.load(path, instance.load or entry.load)
        except Exception as exc:
            instance.state = "failed"
            instance.error = str(exc)
            self.instances.pop(key, None)
            instance.ready.set()
            raise
        if hasattr(instance.model, "max_restarts"):
            instance.model.max_restarts = self.limits.max_restarts  # type: ignore[attr-defined]
            instance.model.restart_window = self.limits.restart_window  # type: ignore[attr-defined]
        instance.load_seconds = time.monotonic() - started
        instance.loaded_at = instance.last_used = time.monotonic()
        instance.state = "ready"
        instance.ready.set()
        self.observer.on_load(instance)
        return instance

    async def _resolve(self, entry: ModelEntry) -> tuple[Path, RegisteredBackend]:
        # Detection runs binaries; do it once per model, not once per request.
        resolved = self._resolved.get(entry.name)
        if resolved is not None:
            return resolved
        async with self._resolve_lock:
            resolved = self._resolved.get(entry.name)
            if resolved is None:
                from rocmux.models import resolve_model
                from rocmux.selection import choose_backend

                path = resolve_model(entry.path)
                detected = await choose_backend(entry.backend, self.plugins)
                resolved = self._resolved[entry.name] = (path, detected.entry)
                self._on_gpu[entry.name] = bool(detected.availability.devices)
            return resolved

    def _loaded(self) -> list[Instance]:
        return [i for i in self.instances.values() if i.state in ("loading", "ready")]

    async def _plan(self, entry: ModelEntry, path: Path) -> tuple[LoadConfig, int]:
        """Settings and estimated bytes for a load under the memory budget.

        With a budget, the context the user left open is chosen to fit it, and a model
        that cannot fit even alone is refused here, before any process starts.
        """
        budget = self.limits.memory_budget
        if budget is None:
            return entry.load, 0
        from rocmux.inventory import ModelInfo
        from rocmux.memory import fit

        info = await anyio.to_thread.run_sync(ModelInfo.from_gguf, path)
        room: int | GpuInfo = budget
        if not self._on_gpu.get(entry.name, False):
            # A CPU runtime keeps everything in host memory: fit the whole estimate.
            from rocmux.devices import GpuInfo

            room = GpuInfo(index=None, vendor="cpu", name="budget", memory_free=budget)
        result = fit(info, room, margin=0, requested=entry.load)
        if not result.fits:
            raise ModelTooLarge(
                f"model {entry.name!r} needs about {result.estimate.total / 2**30:.2f} GiB "
                f"({result.estimate.describe()}), more than the whole memory budget of "
                f"{budget / 2**30:.2f} GiB; raise limits.memory_budget or lower its context_len"
            )
        need = result.estimate.total if isinstance(room, int) else result.estimate.host_total
        return result.config, max(need, result.estimate.total)

    def _fits(self, need: int) -> bool:
        budget = self.limits.memory_budget
        if budget is None:
            return True
        reserved = sum(i.need for i in self._loaded())
        return reserved + need <= budget

    async def _make_room(self, deadline: float, wanted: str, need: int = 0) -> None:
        """Unload least recently used idle instances until one more fits, by count and
        by estimated memory; wait (up to ``deadline``) while the rest are busy."""
        while len(self._loaded()) >= self.limits.max_loaded or not self._fits(need):
            idle = [i for i in self._loaded() if i.state == "ready" and i.in_flight == 0]
            if idle:
                victim = min(idle, key=lambda i: i.last_used)
                await self._unload(victim, "lru" if self._fits(need) else "memory")
                continue
            self._idle = anyio.Event()
            with anyio.move_on_at(deadline) as scope:
                await self._idle.wait()
            if scope.cancelled_caught:
                busy = ", ".join(
                    f"{i.entry.name} ({i.in_flight} in flight)" for i in self._loaded()
                )
                raise PoolBusy(
                    f"cannot load {wanted!r}: {self.limits.max_loaded} model(s) already "
                    f"loaded and busy: {busy}",
                    retry_after=2.0,
                )

    async def _unload(self, instance: Instance, reason: str) -> None:
        instance.state = "unloading"
        try:
            if instance.model is not None:
                await instance.model.close()
        finally:
            self.instances.pop(instance.key, None)
            self.observer.on_evict(instance, reason)

    async def unload(self, key: str) -> bool:
        """Unload instance ``key`` now (admin); False when there is no such instance."""
        instance = self.instances.get(key)
        if instance is None or instance.state != "ready":
            return False
        async with self._lock:
            await self._unload(instance, "admin")
        return True

    # -- background work ----------------------------------------------------------------

    async def reap_idle_forever(self, interval: float = 1.0) -> None:
        """Unload instances idle longer than ``limits.idle_ttl``."""
        if self.limits.idle_ttl <= 0:
            return
        while True:
            await anyio.sleep(min(interval, self.limits.idle_ttl))
            now = time.monotonic()
            for instance in list(self.instances.values()):
                if (
                    instance.state == "ready"
                    and instance.in_flight == 0
                    and now - instance.last_used >= self.limits.idle_ttl
                ):
                    async with self._lock:
                        if instance.state == "ready" and instance.in_flight == 0:
                            await self._unload(instance, "idle")

    async def monitor_health_forever(self, interval: float = 0.5) -> None:
        """Restart crashed idle instances, with the backend's bounded retries.

        A running idle instance is probed too: one whose health check times out is
        hung (stopped, deadlocked); it is killed and restarted like a crashed one.
        Busy instances are not probed, since a runtime whose HTTP threads are all
        serving streams may be slow to answer while healthy; their requests are
        bounded by ``limits.stall_timeout`` instead.
        """
        while True:
            await anyio.sleep(interval)
            for instance in list(self.instances.values()):
                server = getattr(instance.model, "server", None)
                restart = getattr(instance.model, "ensure_running", None)
                if instance.state != "ready" or server is None or restart is None:
                    continue
                if instance.in_flight:
                    continue
                if server.running:
                    check = getattr(instance.model, "check_health", None)
                    if check is None or await check(self.limits.health_timeout):
                        continue
                    if self.instances.get(instance.key) is not instance:
                        continue
                try:
                    await server.check_alive()
                except RocmuxError as exc:
                    instance.error = str(exc)
                try:
                    await restart()
                except RocmuxError as exc:
                    instance.error = str(exc)
                    instance.state = "failed"
                    self.instances.pop(instance.key, None)

    async def aclose(self) -> None:
        """Unload everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.plugins.pm.unregister(name=self._watcher_name)
        with anyio.CancelScope(shield=True):
            for instance in list(self.instances.values()):
                if instance.model is not None:
                    await instance.model.close()
            self.instances.clear()


@attrs.define(eq=False)
class _CrashWatcher:
    """Counts crashes of the pool's instances from the lifecycle hook."""

    pool: ModelPool

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind != "crashed":
            return
        for instance in self.pool.instances.values():
            server = getattr(instance.model, "server", None)
            if server is not None and server.pid == event.pid:
                instance.crashes += 1
                instance.error = f"crashed: exit {event.returncode}"
                self.pool.observer.on_crash(instance)
