"""Runtime choice: detect backends concurrently, pick by priority or by request."""

from __future__ import annotations

import os
from pathlib import Path

import anyio
import attrs

from rocmux.backend import Backend, TextModel
from rocmux.config import chosen_backend, load_config
from rocmux.errors import BackendUnavailable
from rocmux.manager import PluginManager, get_plugin_manager
from rocmux.registry import RegisteredBackend
from rocmux.types import Availability, LoadConfig


def _detect_timeout() -> float:
    """Seconds one backend's detection may take: 10, or ``$ROCMUX_DETECT_TIMEOUT``
    (tests of a hanging plugin set a short one; a bad value keeps the default)."""
    try:
        value = float(os.environ.get("ROCMUX_DETECT_TIMEOUT", ""))
    except ValueError:
        return 10.0
    return value if value > 0 else 10.0


DETECT_TIMEOUT = _detect_timeout()


@attrs.frozen
class Detected:
    """A backend with the result of its detection."""

    entry: RegisteredBackend
    availability: Availability


abandoned_detections: list[str] = []
"""Backends whose detection was cut off; its thread may still be blocked (see cli.main)."""


def _detect_blocking(backend: Backend) -> Availability:
    return anyio.run(backend.detect)


async def detect_one(entry: RegisteredBackend, limit: float = DETECT_TIMEOUT) -> Detected:
    """Detect one backend; a hang or an exception becomes an unavailable reason."""
    try:
        with anyio.fail_after(limit):
            # On its own event loop in a worker thread, abandoned at the deadline: a
            # detection that blocks without awaiting must not hang `rocmux backends`.
            availability = await anyio.to_thread.run_sync(
                _detect_blocking, entry.backend, abandon_on_cancel=True
            )
    except TimeoutError:
        abandoned_detections.append(entry.name)
        availability = Availability.unavailable(f"detection did not finish within {limit:g} s")
    except Exception as exc:  # detection must never take the others down
        availability = Availability.unavailable(f"detection raised {exc!r}")
    if not isinstance(availability, Availability):
        availability = Availability.unavailable(
            f"detection returned {availability!r}, not an Availability"
        )
    return Detected(entry, availability)


async def detect_all(
    plugins: PluginManager | None = None, limit: float = DETECT_TIMEOUT
) -> list[Detected]:
    """Every registered backend, detected concurrently, best first."""
    plugins = plugins or get_plugin_manager()
    entries = list(plugins.backends())
    results: list[Detected | None] = [None] * len(entries)

    async def run(i: int, entry: RegisteredBackend) -> None:
        results[i] = await detect_one(entry, limit)

    async with anyio.create_task_group() as tg:
        for i, entry in enumerate(entries):
            tg.start_soon(run, i, entry)
    done = [r for r in results if r is not None]
    done.sort(key=lambda d: (not d.availability.ok, -d.availability.priority, d.entry.name))
    return done


async def choose_backend(name: str | None = None, plugins: PluginManager | None = None) -> Detected:
    """The backend to use: the one asked for (``--backend``, ``ROCMUX_BACKEND``,
    ``rocmux.toml``) if available, else the available one of highest priority."""
    plugins = plugins or get_plugin_manager()
    name = chosen_backend(name)
    if name is not None:
        detected = await detect_one(plugins.backends().get(name))
        if not detected.availability.ok:
            raise BackendUnavailable(
                f"backend {name!r} is not available: {detected.availability.reason}"
            )
        return detected
    everything = await detect_all(plugins)
    if everything and everything[0].availability.ok:
        return everything[0]
    reasons = "; ".join(f"{d.entry.name}: {d.availability.reason}" for d in everything)
    raise BackendUnavailable(
        "no backend is available"
        + (f" ({reasons})" if reasons else " (no plugin installed)")
        + ". Run `rocmux setup llamacpp_hip` to build llama-server, or see `rocmux backends`."
    )


async def open_model(
    model: str | Path | None = None,
    *,
    backend: str | None = None,
    config: LoadConfig | None = None,
    plugins: PluginManager | None = None,
) -> TextModel:
    """Resolve the model, choose a backend, and load: the one call scripts need."""
    from rocmux.models import resolve_model

    path = resolve_model(model)
    detected = await choose_backend(backend, plugins)
    return await detected.entry.backend.load(path, config or load_config().load)
