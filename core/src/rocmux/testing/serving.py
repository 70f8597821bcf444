"""``rocmux serve`` inside the calling process, on a free port: for tests and benches
that need the real pool and HTTP API without a subprocess."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from rocmux.config import Limits, ModelEntry, ServerSettings
    from rocmux.manager import PluginManager
    from rocmux.pool import MemoryProbe, ModelPool


@asynccontextmanager
async def serve_in_process(
    entries: Sequence[ModelEntry],
    limits: Limits | None = None,
    settings: ServerSettings | None = None,
    plugins: PluginManager | None = None,
    memory_probe: MemoryProbe | None = None,
    *,
    log_level: str = "warning",
    start_timeout: float = 20.0,
) -> AsyncIterator[tuple[str, ModelPool]]:
    """Yield (base URL, pool) while uvicorn serves the app; stop it on exit.

    Plugins default to the installed ones (entry points), settings to 127.0.0.1 on a
    port the OS picks, bound here before uvicorn starts (no window for another process
    to take it).
    """
    import functools
    import socket

    import attrs
    import uvicorn

    from rocmux.config import Config, Limits, ServerSettings
    from rocmux.manager import PluginManager
    from rocmux.serve import Service, uvicorn_config
    from rocmux.supervisor import poll_until

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", settings.port if settings else 0))
        port = sock.getsockname()[1]  # the one the OS picked, for a port of 0
        settings = attrs.evolve(settings, port=port) if settings else ServerSettings(port=port)
        service = Service(
            list(entries),
            Config(limits=limits or Limits()),
            settings,
            plugins or PluginManager.discover(),
            memory_probe,
        )
        app, _api, pool = service.build()
        server = uvicorn.Server(uvicorn_config(app, settings, log_level))
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(server.serve, sockets=[sock]))
            with anyio.fail_after(start_timeout):
                await poll_until(lambda: server.started, interval=0.01)
            try:
                yield f"http://127.0.0.1:{settings.port}", pool
            finally:
                server.should_exit = True
    finally:
        sock.close()
