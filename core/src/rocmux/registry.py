"""The registry of backends that plugins fill in ``rocmux_register_backends``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import attrs

from rocmux.backend import Backend
from rocmux.errors import BackendNotFound, PluginError

if TYPE_CHECKING:
    from rocmux.manager import PluginManager


@attrs.frozen
class RegisteredBackend:
    """A backend and the plugin that registered it."""

    backend: Backend
    plugin: str

    @property
    def name(self) -> str:
        return self.backend.name


@attrs.define(eq=False)
class BackendRegistry:
    """Backends by name. Handed to each plugin's ``rocmux_register_backends`` hook."""

    manager: PluginManager | None = None
    """The plugin manager that built this registry; backends that spawn runtimes hand
    it to them so lifecycle events reach the same observers."""
    _entries: dict[str, RegisteredBackend] = attrs.field(factory=dict, init=False)
    _plugin: str = attrs.field(default="?", init=False)

    def add(self, backend: Backend) -> None:
        """Register ``backend`` under ``backend.name``; a name may be taken only once."""
        if not isinstance(backend, Backend):
            raise PluginError(
                f"plugin {self._plugin!r} registered {backend!r}, which is not a rocmux Backend"
            )
        name = backend.name
        if name in self._entries:
            other = self._entries[name].plugin
            raise PluginError(
                f"plugin {self._plugin!r} registered backend {name!r}, "
                f"which plugin {other!r} already registered"
            )
        self._entries[name] = RegisteredBackend(backend, self._plugin)

    def get(self, name: str) -> RegisteredBackend:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise BackendNotFound(
                f"no backend named {name!r} is installed (installed: {known}); "
                "see `rocmux backends` and `rocmux plugins`"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[RegisteredBackend]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)
