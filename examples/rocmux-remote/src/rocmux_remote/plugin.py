"""Entry point of the ``remote`` plugin: hook implementations only, no I/O.

The backend module (and httpx) is imported inside the hook, so that ``rocmux --help``
and every command that never asks for backends stay fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from rocmux import hookimpl

if TYPE_CHECKING:
    from rocmux.registry import BackendRegistry


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    from rocmux_remote.backend import RemoteBackend

    registry.add(RemoteBackend(plugins=registry.manager))
