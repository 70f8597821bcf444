"""The description of a server process that a backend wants spawned."""

from __future__ import annotations

import re

import attrs

PORT = "{port}"
HOST = "{host}"


@attrs.define(eq=False, kw_only=True)
class Launch:
    """Command line and environment of a runtime server, before spawn.

    ``argv`` may contain the placeholders ``{host}`` and ``{port}`` as whole items;
    the supervisor fills them with the address it chose. Plugins may edit ``argv``
    and ``env`` in ``rocmux_adjust_launch``.
    """

    backend: str
    argv: list[str]
    env: dict[str, str] = attrs.field(factory=dict)
    health_path: str = "/health"
    ready_pattern: re.Pattern[str] | None = None
    """A line of the runtime's output that says it listens. Before it, a health answer
    counts only from a socket held by the runtime's process group (Linux), so a runtime
    that listens from elsewhere (a container's port forward) needs this pattern."""
    stop_grace: float | None = None
    """Seconds between SIGTERM and SIGKILL when stopping; None: the supervisor's
    ``stop_timeout``. A runtime with no state to save on exit can take 0."""
    address_in_use_pattern: re.Pattern[str] = re.compile(
        r"address already in use|couldn't bind|failed to bind|EADDRINUSE", re.IGNORECASE
    )

    def render(self, host: str, port: int) -> list[str]:
        """``argv`` with the address placeholders filled in."""
        return [str(port) if item == PORT else host if item == HOST else item for item in self.argv]
