"""A pool of loaded models: load on demand, share identical configurations, evict the
least recently used idle instance, unload idle ones, count crashes.

With a memory budget, a load must fit both the budget (estimated bytes of the loaded
instances) and the memory a device monitor measures free now, less a margin; idle
instances are unloaded, least recently used first, until it does.

Used by ``rocmux serve``; it knows nothing of HTTP.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import attrs

from rocmux import hookimpl
from rocmux.backend import TextModel
from rocmux.config import Limits, ModelEntry
from rocmux.errors import ModelError, RocmuxError
from rocmux.events import LifecycleEvent
from rocmux.manager import PluginManager
from rocmux.registry import RegisteredBackend
from rocmux.supervisor import StartupLimits, startup_limits
from rocmux.types import LoadConfig

if TYPE_CHECKING:
    from anyio.abc import TaskGroup, TaskStatus

    from rocmux.devices import GpuInfo

State = Literal["loading", "ready", "unloading", "failed"]

MemoryProbe = Callable[[tuple[str, ...]], "int | None"]
"""Free bytes now on the given devices (ids like ``CUDA0``, ``ROCm1``; ``()`` is the
host), or None when unknown. Called in a worker thread."""


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


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if abs(n) >= 2**30 else f"{n / 2**20:.0f} MiB"


def _ordinal(device: str) -> str:
    """``"1"``, ``"ROCm1"``, ``"CUDA1"`` -> ``"1"``: the runtime's device number."""
    return device.lstrip("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def _where(devices: tuple[str, ...]) -> str:
    return "+".join(devices) if devices else "the host"


@functools.cache
def _gpus() -> dict[str, GpuInfo]:
    from rocmux.devices import detect_gpus

    return {gpu.device_id: gpu for gpu in detect_gpus()}


def measure_free(devices: tuple[str, ...]) -> int | None:
    """The default :data:`MemoryProbe`, through ``rocmux.devices``: the host's
    ``MemAvailable`` for ``()``; else the free memory of each device (NVML, sysfs),
    summed. None when a device is not found or its free memory is unknown. Blocking."""
    from rocmux.devices import cpu_info, memory_now

    if not devices:
        return cpu_info().memory_free
    total = 0
    for device in devices:
        gpu = _gpus().get(device)
        if gpu is None:
            return None
        free = memory_now(gpu)[1]
        if free is None:
            return None
        total += free
    return total


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
    waiting: int = 0
    """Requests waiting for this instance's load; they hold it like requests in flight."""
    last_used: float = attrs.field(factory=time.monotonic)
    loaded_at: float | None = None
    load_seconds: float | None = None
    ready: anyio.Event = attrs.field(factory=anyio.Event)
    gone: anyio.Event = attrs.field(factory=anyio.Event)
    error: str | None = None
    crashes: int = 0
    requests: int = 0
    need: int = 0
    """Estimated bytes this instance uses on its device (0 when no memory budget is set)."""
    devices: tuple[str, ...] = ()
    """The GPUs it runs on (``()``: the host), where ``need`` is counted and measured."""
    load: LoadConfig | None = None
    wanted: bool = False
    """A client gave up waiting for the load with a 503 and will retry: load on."""
    load_scope: anyio.CancelScope | None = None
    chunks: int = 0
    """Body chunks its runtime has sent, to any request: a request that stalls while this
    grows met a busy runtime, one that stalls while it stands still a silent one."""
    silent_at: int | None = None
    """``chunks`` at the last silent stall (None: none since the runtime last spoke)."""

    @property
    def slots(self) -> int:
        return self.entry.load.parallel or 4

    @property
    def busy(self) -> bool:
        """Requests in flight, queued at the runtime or waiting for the load."""
        return self.in_flight > 0 or self.waiting > 0

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
            "waiting": self.waiting,
            "requests": self.requests,
            "idle_seconds": round(time.monotonic() - self.last_used, 3),
            "load_seconds": self.load_seconds,
            "pid": getattr(server, "pid", None),
            "url": url,
            "crashes": self.crashes,
            "memory_estimate": self.need or None,
            "devices": list(self.devices) or ["host"],
            "context_len": self.load.context_len if self.load else None,
            "last_error": self.error,
        }

    def holding(self) -> str:
        """``name (bytes, what it is doing)`` for messages about memory."""
        doing = self.state if self.state != "ready" else f"{self.in_flight} in flight"
        if self.waiting:
            doing += f", {self.waiting} waiting"
        return f"{self.entry.name} ({_gib(self.need) + ', ' if self.need else ''}{doing})"


@attrs.define(eq=False)
class PoolObserver:
    """Callbacks the HTTP layer uses for metrics."""

    on_load: Callable[[Instance], None] = lambda i: None
    on_unloading: Callable[[Instance], None] = lambda i: None
    """Called as an instance starts to unload, before its runtime is stopped."""
    on_evict: Callable[[Instance, str], None] = lambda i, reason: None
    on_crash: Callable[[Instance], None] = lambda i: None
    on_abandon: Callable[[Instance], None] = lambda i: None


@attrs.frozen
class _Shortfall:
    kind: Literal["count", "budget", "measured"]
    why: str


class Use:
    """``ModelPool.use(name)``: holds one instance for one request.

    A class, not an ``asynccontextmanager``: a request for a loaded model (nearly all
    of them) enters without a generator, an await or a clock read of anyio's, and every
    microsecond of that is waited for by the later requests of a burst.
    """

    __slots__ = ("_instance", "_name", "_on_wait", "_pool")

    def __init__(self, pool: ModelPool, name: str, on_wait: Callable[[], None] | None) -> None:
        self._pool = pool
        self._name = name
        self._on_wait = on_wait
        self._instance: Instance | None = None

    async def __aenter__(self) -> Instance:
        pool = self._pool
        entry = pool.entry(self._name)
        instance = pool._take_ready(entry)
        if instance is None:
            instance = await pool._acquire(entry, self._on_wait or (lambda: None))
        self._instance = instance
        return instance

    async def __aexit__(self, *exc_info: object) -> None:
        instance, self._instance = self._instance, None
        if instance is not None:
            self._pool._count_out(instance)


@attrs.define(eq=False)
class ModelPool:
    """Instances by key, with the names that reach them.

    ``run()`` (``rocmux serve`` runs it for its lifetime) gives loads a task of their
    own, so that a load outlives the request that started it and is abandoned only
    when every request waiting for it has gone; without it a load runs in the task of
    the request that started it.
    """

    entries: Sequence[ModelEntry]
    limits: Limits
    plugins: PluginManager
    observer: PoolObserver = attrs.field(factory=PoolObserver)
    memory_probe: MemoryProbe = measure_free
    instances: dict[str, Instance] = attrs.field(factory=dict, init=False)
    events: deque[dict[str, Any]] = attrs.field(factory=lambda: deque(maxlen=500), init=False)
    """Recent loads, evictions and waits, newest last (``/admin/events``)."""
    _names: dict[str, ModelEntry] = attrs.field(factory=dict, init=False)
    _lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _changed: anyio.Event = attrs.field(factory=anyio.Event, init=False)
    _closed: bool = attrs.field(default=False, init=False)
    _resolved: dict[str, tuple[Path, RegisteredBackend]] = attrs.field(factory=dict, init=False)
    _watcher_name: str = attrs.field(default="", init=False)
    _resolve_lock: anyio.Lock = attrs.field(factory=anyio.Lock, init=False)
    _on_gpu: dict[str, bool] = attrs.field(factory=dict, init=False)
    _devices: dict[str, tuple[str, ...]] = attrs.field(factory=dict, init=False)
    _keys: dict[str, str] = attrs.field(factory=dict, init=False)
    _tg: TaskGroup | None = attrs.field(default=None, init=False)

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

    def is_ready(self, name: str) -> bool:
        """Whether a request for ``name`` would find its instance loaded now."""
        return self._ready(self.entry(name)) is not None

    def _ready(self, entry: ModelEntry) -> Instance | None:
        """``entry``'s instance if it is loaded and ready."""
        key = self._keys.get(entry.name)
        instance = self.instances.get(key) if key is not None else None
        return instance if instance is not None and instance.state == "ready" else None

    # -- use ----------------------------------------------------------------------------

    def use(self, name: str, on_wait: Callable[[], None] | None = None) -> Use:
        """Hold an instance of model ``name`` for one request, loading it if needed
        (``async with pool.use(name) as instance``).

        ``on_wait`` is called (perhaps more than once) when the request starts to wait:
        for a load, for memory, for a busy pool.
        """
        return Use(self, name, on_wait)

    def _take_ready(self, entry: ModelEntry) -> Instance | None:
        """``entry``'s instance, counted in, if it is loaded: no await, nothing to wait
        for. None when the request must go the long way (:meth:`_acquire`)."""
        instance = self._ready(entry)
        if instance is not None:
            self._count_in(instance, entry)
        return instance

    def _count_in(self, instance: Instance, entry: ModelEntry) -> None:
        if instance.in_flight >= instance.slots + self.limits.queue_length:
            raise PoolBusy(
                f"model {entry.name!r} has {instance.in_flight} requests in flight "
                f"and queued (limit {instance.slots + self.limits.queue_length})",
                retry_after=1.0,
            )
        instance.in_flight += 1
        instance.requests += 1
        instance.last_used = time.monotonic()

    def _count_out(self, instance: Instance) -> None:
        instance.in_flight -= 1
        instance.last_used = time.monotonic()
        if instance.in_flight == 0:
            self._notify()

    def _notify(self) -> None:
        """Wake the requests waiting for room: an instance went idle, loaded or left."""
        self._changed.set()
        self._changed = anyio.Event()

    def _event(self, kind: str, instance: Instance | None = None, **fields: object) -> None:
        event: dict[str, Any] = {"t": round(time.time(), 3), "event": kind}
        if instance is not None:
            event.update(model=instance.entry.name, key=instance.key, need=instance.need)
        event.update(fields)
        self.events.append(event)

    async def _acquire(self, entry: ModelEntry, on_wait: Callable[[], None]) -> Instance:
        deadline = anyio.current_time() + self.limits.queue_timeout
        while True:
            instance, joined = await self._instance_for(entry, deadline, on_wait)
            if joined:
                on_wait()
                await self._wait_for_load(instance, deadline)
            if instance.state == "ready":
                self._count_in(instance, entry)
                return instance
            if instance.state == "failed":
                raise RocmuxError(f"model {entry.name!r} failed to load: {instance.error}")
            if anyio.current_time() >= deadline:
                raise PoolBusy(f"model {entry.name!r} is still loading", retry_after=2.0)
            # "unloading": it is going away; ask again for a fresh instance once it has.
            with anyio.move_on_at(deadline):
                await instance.gone.wait()

    async def _wait_for_load(self, instance: Instance, deadline: float) -> None:
        """Wait for ``instance``'s load (``waiting`` was counted by ``_instance_for``).
        The last waiter to go away (a client that disconnected) abandons the load."""
        try:
            with anyio.move_on_at(deadline) as scope:
                await instance.ready.wait()
            if scope.cancelled_caught:
                instance.wanted = True  # its client gets 503 and Retry-After
        finally:
            instance.waiting -= 1
            if instance.waiting == 0 and instance.state == "loading" and not instance.wanted:
                self._abandon(instance)

    def _abandon(self, instance: Instance) -> None:
        if instance.load_scope is None:
            return
        instance.state = "unloading"
        instance.error = "load abandoned: every request waiting for it went away"
        instance.load_scope.cancel()

    async def _instance_for(
        self, entry: ModelEntry, deadline: float, on_wait: Callable[[], None]
    ) -> tuple[Instance, bool]:
        """The instance for ``entry``, its load started if new; True when the caller
        was counted among those waiting for its load."""
        path, registered = await self._resolve(entry)
        backend = registered.name
        key = self._keys[entry.name]
        existing = self.instances.get(key)
        if existing is not None:
            return existing, self._join(existing)
        if self._lock.locked():
            on_wait()
        with anyio.move_on_at(deadline) as scope:
            await self._lock.acquire()
        if scope.cancelled_caught:
            raise PoolBusy(
                f"model {entry.name!r} waited {self.limits.queue_timeout:g} s for other loads "
                "and unloads to finish",
                retry_after=2.0,
            )
        try:
            existing = self.instances.get(key)
            if existing is not None:
                return existing, self._join(existing)
            load, need = await self._plan(entry, path)
            devices = self._devices.get(entry.name, ())
            await self._make_room(deadline, entry, need, devices, on_wait)
            # The requester counts as waiting from the start: a load is never seen idle.
            instance = Instance(
                key=key,
                entry=entry,
                path=path,
                backend=backend,
                need=need,
                devices=devices,
                load=load,
                waiting=1,
            )
            self.instances[key] = instance
            self._event("load", instance, devices=list(devices) or ["host"])
            if self._tg is not None:
                await self._tg.start(self._load, instance, registered)
        finally:
            self._lock.release()
        if self._tg is None:
            await self._load(instance, registered)  # no task group: load in this task
        return instance, True

    @staticmethod
    def _join(instance: Instance) -> bool:
        if instance.state != "loading":
            return False
        instance.waiting += 1
        return True

    async def _load(
        self,
        instance: Instance,
        registered: RegisteredBackend,
        *,
        task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Load ``instance``; every outcome ends with ``ready`` set. Never raises but
        for the cancellation of an enclosing scope."""
        model: TextModel | None = None
        started = time.monotonic()
        limits = StartupLimits(self.limits.load_stall_timeout, self.limits.load_timeout)
        token = startup_limits.set(limits)
        try:
            with anyio.CancelScope() as scope:
                instance.load_scope = scope
                task_status.started()
                try:
                    model = await registered.backend.load(
                        instance.path, instance.load or instance.entry.load
                    )
                except Exception as exc:
                    instance.error = str(exc)
        finally:
            startup_limits.reset(token)
            if model is not None and instance.state != "loading":
                # Abandoned as it finished: nobody wants it.
                with anyio.CancelScope(shield=True):
                    await model.close()
                model = None
            self._finish_load(instance, model, time.monotonic() - started)

    def _finish_load(self, instance: Instance, model: TextModel | None, seconds: float) -> None:
        if model is None:
            abandoned = instance.state == "unloading" or instance.error is None
            instance.state = "failed"
            instance.error = instance.error or "load cancelled"
            self._remove(instance)
            instance.ready.set()
            if abandoned:
                self._event("abandoned", instance, seconds=round(seconds, 3))
                self.observer.on_abandon(instance)
            else:
                self._event("failed", instance, error=instance.error[:500])
            return
        instance.model = model
        if hasattr(model, "max_restarts"):
            model.max_restarts = self.limits.max_restarts  # type: ignore[attr-defined]
            model.restart_window = self.limits.restart_window  # type: ignore[attr-defined]
        instance.load_seconds = seconds
        instance.loaded_at = instance.last_used = time.monotonic()
        instance.state = "ready"
        instance.load_scope = None
        instance.ready.set()
        self._event("ready", instance, seconds=round(seconds, 3))
        self.observer.on_load(instance)
        self._notify()

    def _remove(self, instance: Instance) -> None:
        if self.instances.get(instance.key) is instance:
            del self.instances[instance.key]
        instance.gone.set()
        self._notify()

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
                self._keys[entry.name] = instance_key(path, detected.entry.name, entry.load)
                devices = tuple(d.id for d in detected.availability.devices if d.kind != "cpu")
                if entry.load.devices:
                    from rocmux.devices import runtime_ids

                    # Pins are stable ids (PCI address, UUID) or indices; the pool keys
                    # memory by the runtime's own device ids.
                    chosen = {_ordinal(d) for d in runtime_ids(entry.load.devices)}
                    devices = tuple(d for d in devices if _ordinal(d) in chosen)
                if entry.load.gpu_layers == 0:
                    devices = ()
                self._on_gpu[entry.name] = bool(devices)
                self._devices[entry.name] = devices
            return resolved

    async def _plan(self, entry: ModelEntry, path: Path) -> tuple[LoadConfig, int]:
        """Settings and estimated bytes on its device for a load under the memory budget.

        With a budget, the context the user left open is chosen to fit it, and a model
        that cannot fit even alone is refused here, before any process starts.
        """
        budget = self.limits.memory_budget
        if budget is None:
            return entry.load, 0
        from rocmux.inventory import ModelInfo
        from rocmux.memory import GPU_PROCESS_OVERHEAD, fit

        info = await anyio.to_thread.run_sync(ModelInfo.from_gguf, path)
        on_gpu = self._on_gpu.get(entry.name, False)
        room: int | GpuInfo = budget
        if not on_gpu:
            # A CPU runtime keeps everything in host memory: fit the whole estimate.
            from rocmux.devices import GpuInfo

            room = GpuInfo(index=None, vendor="cpu", name="budget", memory_free=budget)
        # A GPU runtime's process holds memory of its own beyond llama.cpp's buffers.
        overhead = GPU_PROCESS_OVERHEAD if on_gpu else 0
        result = fit(info, room, margin=overhead, requested=entry.load)
        need = result.estimate.device_total + overhead if on_gpu else result.estimate.host_total
        if not result.fits:
            raise ModelTooLarge(
                f"model {entry.name!r} needs about {_gib(need)} on "
                f"{_where(self._devices.get(entry.name, ()))} ({result.estimate.describe()}), "
                f"more than the whole memory budget of {_gib(budget)}; raise "
                "limits.memory_budget or lower its context_len"
            )
        return result.config, need

    async def _free(self, devices: tuple[str, ...]) -> int | None:
        try:
            return await anyio.to_thread.run_sync(self.memory_probe, devices)
        except Exception as exc:  # a broken monitor must not stop the server
            self._event("probe_failed", error=repr(exc)[:200])
            return None

    async def _usable(self, devices: tuple[str, ...]) -> tuple[int, int] | None:
        """(measured free bytes on ``devices``, what a new load may use of them): less the
        margin and the estimates of loads still allocating there."""
        free = await self._free(devices)
        if free is None:
            return None
        pending = sum(
            i.need for i in self.instances.values() if i.state == "loading" and i.devices == devices
        )
        return free, free - self.limits.memory_margin - pending

    async def _shortfall(self, need: int, devices: tuple[str, ...]) -> _Shortfall | None:
        """Why one more instance of ``need`` bytes on ``devices`` does not fit now."""
        count = len(self.instances)
        if count >= self.limits.max_loaded:
            return _Shortfall("count", f"{count} instance(s) loaded (limits.max_loaded)")
        budget = self.limits.memory_budget
        if budget is None:
            return None
        reserved = sum(i.need for i in self.instances.values())
        if reserved + need > budget:
            return _Shortfall(
                "budget",
                f"{_gib(budget - reserved)} of the memory budget of {_gib(budget)} is left "
                "(limits.memory_budget)",
            )
        usable = await self._usable(devices)
        if usable is not None and need > usable[1]:
            free, room = usable
            return _Shortfall(
                "measured",
                f"{_where(devices)} has {_gib(free)} free, {_gib(max(room, 0))} usable "
                f"less the margin of {_gib(self.limits.memory_margin)} "
                "(limits.memory_margin) and loads in progress",
            )
        return None

    async def _make_room(
        self,
        deadline: float,
        entry: ModelEntry,
        need: int,
        devices: tuple[str, ...],
        on_wait: Callable[[], None],
    ) -> None:
        """Unload least recently used idle instances, one at a time, until one more fits
        by count, budget and measured free memory; after each, wait until the monitor
        shows its memory back. Busy instances are never unloaded: wait (up to
        ``deadline``) for one to go idle, or for memory to free, then give up."""
        logged = False
        while (short := await self._shortfall(need, devices)) is not None:
            idle = [i for i in self.instances.values() if i.state == "ready" and not i.busy]
            if short.kind == "measured":
                # Only an instance on the same devices gives that memory back.
                idle = [i for i in idle if set(i.devices) & set(devices) or i.devices == devices]
            if idle:
                victim = min(idle, key=lambda i: i.last_used)
                on_wait()
                reason = "lru" if short.kind == "count" else "memory"
                await self._evict(victim, reason, need, devices)
                continue
            now = anyio.current_time()
            if now >= deadline:
                raise PoolBusy(self._no_room(entry, need, devices, short), retry_after=2.0)
            on_wait()
            if not logged:
                logged = True
                self._event("wait", model=entry.name, need=need, reason=short.why)
            changed = self._changed
            # Memory that other processes hold shows no event: look again now and then.
            poll = 0.5 if short.kind == "measured" else deadline - now
            with anyio.move_on_at(min(deadline, now + poll)):
                await changed.wait()

    def _no_room(
        self, entry: ModelEntry, need: int, devices: tuple[str, ...], short: _Shortfall
    ) -> str:
        size = f"{_gib(need)} on {_where(devices)}" if need else _where(devices)
        message = (
            f"cannot load {entry.name!r} ({size}) within {self.limits.queue_timeout:g} s "
            f"(limits.queue_timeout): {short.why}"
        )
        if short.kind != "measured":
            held = ", ".join(i.holding() for i in self.instances.values())
            return f"{message}; held by {held}, none of them idle"
        ours = [i for i in self.instances.values() if i.devices == devices]
        if ours:
            held = ", ".join(i.holding() for i in ours)
            message += f"; held by {held}, none of them idle"
        return message + "; other processes hold the rest"

    async def _evict(
        self, victim: Instance, reason: str, need: int, devices: tuple[str, ...]
    ) -> None:
        """Unload ``victim``; with a budget, then wait until the monitor shows its memory
        back (half its estimate: what a runtime really frees varies, and mmapped weights
        stay in the page cache on the CPU), or shows room for the load to come."""
        # Out of reach before the first await: a request that arrives while the monitor
        # is read must not take an instance that is about to go.
        victim.state = "unloading"
        before = await self._free(victim.devices) if self.limits.memory_budget else None
        started = anyio.current_time()
        await self._unload(victim, reason)
        if before is None:
            return
        free: int | None = before
        with anyio.move_on_after(self.limits.memory_return_timeout):
            while True:
                free = await self._free(victim.devices)
                if free is None or free - before >= victim.need // 2:
                    break
                usable = await self._usable(devices)
                if usable is not None and usable[1] >= need:
                    break
                await anyio.sleep(0.05)
        self._event(
            "returned",
            victim,
            seconds=round(anyio.current_time() - started, 3),
            free_before=before,
            free_after=free,
        )

    async def _unload(self, instance: Instance, reason: str) -> None:
        self._event(
            "evict", instance, reason=reason, in_flight=instance.in_flight, waiting=instance.waiting
        )
        instance.state = "unloading"
        try:
            self.observer.on_unloading(instance)
            if instance.model is not None:
                await instance.model.close()
        finally:
            self._remove(instance)
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

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The pool's background work until cancelled: the task group loads run in,
        the idle reaper and the health monitor. Cancelling it cancels loads under way
        (their runtimes are stopped)."""
        async with anyio.create_task_group() as tg:
            self._tg = tg
            try:
                tg.start_soon(self.reap_idle_forever)
                tg.start_soon(self.monitor_health_forever)
                task_status.started()
                await anyio.sleep_forever()
            finally:
                self._tg = None

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
                    and not instance.busy
                    and now - instance.last_used >= self.limits.idle_ttl
                ):
                    async with self._lock:
                        if instance.state == "ready" and not instance.busy:
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
                    self._remove(instance)
                    # A request that took the instance while the restart failed would
                    # restart it again, outside the pool: close it so nothing can.
                    with anyio.CancelScope(shield=True):
                        await instance.model.close()  # type: ignore[union-attr]

    async def aclose(self) -> None:
        """Unload everything. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.plugins.pm.unregister(name=self._watcher_name)
        with anyio.CancelScope(shield=True):
            for instance in list(self.instances.values()):
                if instance.load_scope is not None:
                    instance.load_scope.cancel()  # its task stops the runtime
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
