"""Lifecycle events of runtime processes, as handed to ``rocmux_lifecycle``."""

from __future__ import annotations

from typing import Literal

import attrs

EventKind = Literal["spawned", "ready", "exited", "crashed", "restarted", "stopped"]


@attrs.frozen(kw_only=True)
class LifecycleEvent:
    """Something happened to a runtime process.

    ``returncode`` and ``stderr_tail`` are set for ``exited`` and ``crashed``.
    """

    kind: EventKind
    backend: str
    pid: int | None = None
    url: str | None = None
    returncode: int | None = None
    stderr_tail: str = ""
    detail: str = ""
