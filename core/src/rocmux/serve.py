"""``rocmux serve``: the model pool behind one OpenAI-compatible endpoint, on uvicorn."""

from __future__ import annotations

import gc
import ipaddress
import os
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import anyio
import attrs

from rocmux.config import Config, ModelEntry, ServerSettings
from rocmux.manager import PluginManager, get_plugin_manager
from rocmux.types import LoadConfig

if TYPE_CHECKING:
    import uvicorn

    from rocmux.http_api import Api, App
    from rocmux.pool import Instance, MemoryProbe, ModelPool


def model_entries(config: Config, paths: Sequence[Path] = ()) -> tuple[ModelEntry, ...]:
    """Models to offer: ``--model`` paths, else ``[[models]]``, else the default model."""
    if paths:
        entries = []
        for i, path in enumerate(paths):
            aliases = ("default",) if i == 0 else ()
            entries.append(ModelEntry(name=path.stem, path=path, aliases=aliases, load=config.load))
        return tuple(entries)
    if config.models:
        return config.models
    from rocmux.default_model import default_model_path

    path = config.model or default_model_path()
    return (ModelEntry(name=path.stem, path=path, aliases=("default",), load=config.load),)


GC_YOUNG_THRESHOLD = 50_000
"""Young objects the cyclic GC lets accumulate before it collects (Python's default:
700). Each streamed request holds a few hundred objects alive, so at the default a
burst of 32 set off several collections while it was being read, ~0.7 ms of a 2-core
box's time per burst (more on the H100's host), which every request of the burst
waited for. Objects freed by reference counting never reach the threshold; what it
delays is the collection of reference cycles, a few objects per request."""


def keep_gc_out_of_bursts() -> None:
    """Tune the cyclic GC for serving: what exists at start-up (imports, the app) is
    left out of collections (``gc.freeze``: a full collection of it took 12-16 ms), and
    the young generation collects at :data:`GC_YOUNG_THRESHOLD` objects."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def settings_with_env(settings: ServerSettings) -> ServerSettings:
    """``$ROCMUX_API_KEYS`` (comma-separated) adds to the configured keys."""
    extra = tuple(k.strip() for k in os.environ.get("ROCMUX_API_KEYS", "").split(",") if k.strip())
    return attrs.evolve(settings, api_keys=settings.api_keys + extra) if extra else settings


@attrs.define(eq=False)
class Service:
    """Everything ``rocmux serve`` runs: pool, API, background tasks."""

    entries: Sequence[ModelEntry]
    config: Config
    settings: ServerSettings
    plugins: PluginManager = attrs.field(factory=get_plugin_manager)
    memory_probe: MemoryProbe | None = None
    """Free memory on a device now; default: ``rocmux.pool.measure_free`` (NVML, sysfs,
    ``/proc/meminfo``). Tests pass a fake."""

    def build(self) -> tuple[App, Api, ModelPool]:
        from rocmux.http_api import Metrics, create_app
        from rocmux.pool import ModelPool, PoolObserver, measure_free

        metrics = Metrics()

        def unloading(instance: Instance) -> None:
            # The relay's spare connections go first: llama-server exits later while
            # idle connections are open to it.
            url = getattr(instance.model, "url", None)
            if isinstance(url, str) and url.startswith("http://"):
                api.relay.drop(url)

        observer = PoolObserver(
            on_load=metrics.on_load,
            on_unloading=unloading,
            on_evict=metrics.on_evict,
            on_crash=metrics.on_crash,
            on_abandon=metrics.on_abandon,
        )
        pool = ModelPool(
            self.entries,
            self.config.limits,
            self.plugins,
            observer,
            memory_probe=self.memory_probe or measure_free,
        )

        @asynccontextmanager
        async def lifespan(app: object) -> AsyncIterator[None]:
            async with anyio.create_task_group() as tg:
                await tg.start(pool.run)
                try:
                    yield
                finally:
                    tg.cancel_scope.cancel()
                    with anyio.CancelScope(shield=True):
                        try:
                            await api.aclose()
                        finally:
                            # The runtimes are stopped whatever went wrong above.
                            await pool.aclose()

        app, api = create_app(pool, self.settings, metrics, lifespan=lifespan)
        return app, api, pool


async def serve(
    config: Config,
    *,
    host: str | None = None,
    port: int | None = None,
    models: Sequence[Path] = (),
    load: LoadConfig | None = None,
    max_loaded: int | None = None,
) -> None:
    """Run the server until SIGINT/SIGTERM; every runtime is stopped on the way out."""
    import uvicorn

    settings = settings_with_env(config.server)
    settings = attrs.evolve(
        settings, host=host or settings.host, port=settings.port if port is None else port
    )
    if max_loaded is not None:
        config = attrs.evolve(config, limits=attrs.evolve(config.limits, max_loaded=max_loaded))
    if load is not None:
        config = attrs.evolve(config, load=load)
    entries = model_entries(config, models)
    app, api, _pool = Service(entries, config, settings).build()
    if not is_loopback(settings.host) and not settings.api_keys:
        print(
            f"rocmux serve: WARNING: listening on {settings.host} with no API key: anyone "
            "who can reach this address can use the models. Set [server] api_keys or "
            "ROCMUX_API_KEYS.",
            file=sys.stderr,
        )
    names = ", ".join(e.name + (f" ({', '.join(e.aliases)})" if e.aliases else "") for e in entries)
    print(
        f"rocmux serve: http://{settings.host}:{settings.port}/v1  models: {names}",
        file=sys.stderr,
        flush=True,
    )
    server = uvicorn.Server(uvicorn_config(app, settings))
    keep_gc_out_of_bursts()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_drain_deadline, server, api, settings.shutdown_timeout)
        await server.serve()
        tg.cancel_scope.cancel()


CLIENT_KEEPALIVE_S = 75
"""Seconds an idle client connection stays open. Longer than the clients' own idle
expiry (httpx and the ``openai`` client 5 s, aiohttp 15 s): with uvicorn's 5 s, a
client that reused a connection as uvicorn closed it got "Server disconnected" or a
reset instead of an answer (reproduced with plain httpx; the likely cause of the one
stream in 1600 that bench/faults.py saw cut in session 7). 75 s is nginx's default."""


def uvicorn_config(
    app: App, settings: ServerSettings, log_level: str = "warning"
) -> uvicorn.Config:
    """How ``rocmux serve`` runs ``app`` on uvicorn (``rocmux.testing.serving`` too)."""
    import uvicorn

    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        lifespan="on",
        # Forwarded-for headers are not used: skip the middleware that reads them.
        proxy_headers=False,
        # Info-level lines, never shown at "warning", whose arguments uvicorn would
        # still format for every response.
        access_log=False,
        timeout_keep_alive=CLIENT_KEEPALIVE_S,
        # A backstop: at shutdown_timeout the runtimes are stopped, which ends
        # the streams still open, each with an error event.
        timeout_graceful_shutdown=int(settings.shutdown_timeout) + 10,
    )


async def _drain_deadline(server: uvicorn.Server, api: Api, grace: float) -> None:
    """Once a shutdown begins (SIGTERM, Ctrl-C), give in-flight requests ``grace``
    seconds, then stop the runtimes so that the streams left end cleanly."""
    from rocmux.supervisor import poll_until

    await poll_until(lambda: server.should_exit, interval=0.1)
    await anyio.sleep(grace)
    await api.begin_shutdown()
