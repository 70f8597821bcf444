"""Every hook rocmux calls, in one module.

Plugins implement these with ``@rocmux.hookimpl`` and are found through the
entry-point group ``rocmux``. The built-in behaviour is itself a plugin, registered
the same way and marked ``trylast`` where a plugin may take over.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from httpx_sse import ServerSentEvent

    from rocmux.events import LifecycleEvent
    from rocmux.launch import Launch
    from rocmux.registry import BackendRegistry
    from rocmux.setup import SetupRequest
    from rocmux.types import Token

hookspec = pluggy.HookspecMarker("rocmux")


@hookspec
def rocmux_register_backends(registry: BackendRegistry) -> None:
    """Add this plugin's backends with ``registry.add(backend)``.

    Called once, when the plugin manager first needs the backends. It must do no
    I/O: detection happens later, in ``Backend.detect``, only for backends that are
    asked about. Returns nothing.
    """


@hookspec
def rocmux_adjust_launch(launch: Launch) -> None:
    """Change a runtime server's command line or environment before it is spawned.

    Called for every spawn (first start, port retry, restart), after the backend
    built ``launch.argv`` and ``launch.env`` and before the process starts. Mutate
    ``launch`` in place (``launch.argv``, ``launch.env``); ``launch.backend`` says
    whose server it is. Returns nothing.
    """


@hookspec(firstresult=True)
def rocmux_decode_event(backend: str, event: ServerSentEvent) -> Sequence[Token] | None:
    """Turn one server-sent event of a runtime's stream into tokens.

    Called for every event of every stream, except OpenAI's ``[DONE]`` terminator,
    which ends the stream. Return the tokens it carries (possibly none), or ``None``
    to leave the event to the next implementation. The core's OpenAI-style decoder is
    ``trylast``, so a plugin for a runtime with its own dialect runs first. Raise
    ``rocmux.errors.StreamError`` for an event that cannot be decoded.
    """


@hookspec
def rocmux_lifecycle(event: LifecycleEvent) -> None:
    """Observe a runtime process: spawned, ready, exited, crashed, restarted, stopped.

    Called on the event loop when rocmux notices the change. Observers must be
    quick and must not raise; an exception is reported and otherwise ignored.
    Returns nothing.
    """


@hookspec(firstresult=True)
def rocmux_setup_backend(request: SetupRequest) -> bool | None:
    """Install or build what backend ``request.backend`` needs (``rocmux setup NAME``).

    Return ``True`` when this plugin handled the request, ``None`` when the name is
    not this plugin's. Report progress through ``request.progress``.
    """
