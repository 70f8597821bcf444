"""The plugin manager: finds plugins, isolates their failures, calls their hooks.

pluggy's ``load_setuptools_entrypoints`` stops at the first plugin that fails to
import, so the entry points are walked here one by one: a broken plugin is recorded
with its error and every other plugin keeps working.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import TYPE_CHECKING, Any

import attrs
import pluggy

from rocmux import hookspecs
from rocmux.errors import PluginError

if TYPE_CHECKING:
    from httpx_sse import ServerSentEvent

    from rocmux.events import LifecycleEvent
    from rocmux.launch import Launch
    from rocmux.registry import BackendRegistry
    from rocmux.setup import SetupRequest
    from rocmux.types import Token

GROUP = "rocmux"
BUILTIN_PLUGINS = ("rocmux.openai_dialect",)


@attrs.frozen(kw_only=True)
class PluginInfo:
    """What ``rocmux plugins`` shows about one plugin."""

    name: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...]
    error: str | None = None
    disabled: bool = False


def _disabled_names() -> set[str]:
    raw = os.environ.get("ROCMUX_DISABLE_PLUGINS", "")
    return {name.strip() for name in raw.split(",") if name.strip()}


def _trace_enabled() -> bool:
    return os.environ.get("ROCMUX_TRACE_PLUGINS", "") not in ("", "0")


def _trace(message: str) -> None:
    print(f"[rocmux trace] {message}", file=sys.stderr, flush=True)


@attrs.define(eq=False)
class PluginManager:
    """A typed wrapper around ``pluggy.PluginManager("rocmux")``."""

    pm: pluggy.PluginManager = attrs.field(factory=lambda: PluginManager._new_pm())
    infos: dict[str, PluginInfo] = attrs.field(factory=dict)
    errors: list[PluginError] = attrs.field(factory=list)
    _registry: BackendRegistry | None = attrs.field(default=None, init=False)

    @staticmethod
    def _new_pm() -> pluggy.PluginManager:
        pm = pluggy.PluginManager("rocmux")
        pm.add_hookspecs(hookspecs)
        return pm

    @classmethod
    def discover(cls, *, entry_points: bool = True) -> PluginManager:
        """Load the built-in plugins and, unless told not to, every ``rocmux`` entry point."""
        manager = cls()
        if _trace_enabled():
            manager.pm.add_hookcall_monitoring(_before_hook, _after_hook)
        for module_name in BUILTIN_PLUGINS:
            manager.register_module(module_name, name=module_name)
        if entry_points:
            manager.load_entry_points()
        return manager

    def register_module(self, module_name: str, *, name: str) -> None:
        import importlib

        self.register(importlib.import_module(module_name), name=name, distribution="rocmux")

    def register(
        self,
        plugin: object,
        *,
        name: str,
        distribution: str | None = None,
        version: str | None = None,
    ) -> None:
        """Register an already imported plugin object (a module or an instance)."""
        self.pm.register(plugin, name=name)
        hooks = tuple(sorted(hc.name for hc in self.pm.get_hookcallers(plugin) or ()))
        self.infos[name] = PluginInfo(
            name=name, distribution=distribution, version=version, hooks=hooks
        )
        self._registry = None

    def load_entry_points(self) -> None:
        disabled = _disabled_names()
        for ep in metadata.entry_points(group=GROUP):
            dist = ep.dist.name if ep.dist is not None else None
            version = ep.dist.version if ep.dist is not None else None
            if ep.name in disabled or self.pm.has_plugin(ep.name):
                self.infos.setdefault(
                    ep.name,
                    PluginInfo(
                        name=ep.name,
                        distribution=dist,
                        version=version,
                        hooks=(),
                        disabled=ep.name in disabled,
                    ),
                )
                if ep.name in disabled:
                    self.pm.set_blocked(ep.name)
                continue
            # A broken plugin must not take the others down: an import that raises (even
            # SystemExit) or hooks pluggy rejects are recorded against its name.
            try:
                plugin = ep.load()
            except (Exception, SystemExit) as exc:
                self._record_broken(ep.name, dist, version, f"failed to import: {exc!r}")
                continue
            try:
                self.register(plugin, name=ep.name, distribution=dist, version=version)
            except Exception as exc:
                if self.pm.is_registered(plugin):
                    self.pm.unregister(plugin)
                self.pm.set_blocked(ep.name)
                self._record_broken(ep.name, dist, version, f"was rejected: {exc}")

    def _record_broken(
        self, name: str, dist: str | None, version: str | None, problem: str
    ) -> None:
        message = f"plugin {name!r} ({dist}) {problem}"
        self.errors.append(PluginError(message))
        self.infos[name] = PluginInfo(
            name=name, distribution=dist, version=version, hooks=(), error=message
        )

    def _record_error(self, plugin: str, message: str) -> PluginError:
        error = PluginError(message)
        self.errors.append(error)
        info = self.infos.get(plugin)
        if info is not None:
            joined = message if info.error is None else f"{info.error}; {message}"
            self.infos[plugin] = attrs.evolve(info, error=joined)
        return error

    def _each_impl(self, hook_name: str) -> list[tuple[str, Callable[..., Any]]]:
        caller = getattr(self.pm.hook, hook_name)
        # pluggy calls the last item first; keep its order.
        return [(impl.plugin_name, impl.function) for impl in reversed(caller.get_hookimpls())]

    # -- typed hook calls -------------------------------------------------------------

    def backends(self) -> BackendRegistry:
        """Every registered backend, built once; a plugin whose hook raises is skipped."""
        if self._registry is not None:
            return self._registry
        from rocmux.registry import BackendRegistry

        registry = BackendRegistry(manager=self)
        for plugin, function in self._each_impl("rocmux_register_backends"):
            registry._plugin = plugin
            snapshot = dict(registry._entries)
            if _trace_enabled():
                _trace(f"rocmux_register_backends -> {plugin}")
            try:
                function(registry=registry)
            except Exception as exc:
                registry._entries = snapshot
                self._record_error(
                    plugin, f"plugin {plugin!r} failed in rocmux_register_backends: {exc!r}"
                )
        registry._plugin = "?"
        self._registry = registry
        return registry

    def adjust_launch(self, launch: Launch) -> None:
        """Let every plugin edit ``launch``; a plugin that raises stops the spawn."""
        for plugin, function in self._each_impl("rocmux_adjust_launch"):
            if _trace_enabled():
                _trace(f"rocmux_adjust_launch -> {plugin}: argv={launch.argv}")
            try:
                function(launch=launch)
            except Exception as exc:
                raise self._record_error(
                    plugin, f"plugin {plugin!r} failed in rocmux_adjust_launch: {exc!r}"
                ) from exc

    def event_decoder(self, backend: str) -> Callable[[ServerSentEvent], Sequence[Token]]:
        """The decoder for one stream of ``backend``, resolved once per stream.

        When the built-in OpenAI decoder is the only implementation (and tracing is
        off) it is called directly: the hook dispatch would cost about a microsecond
        per token for nothing.
        """
        impls = self.pm.hook.rocmux_decode_event.get_hookimpls()
        if not _trace_enabled() and [i.plugin_name for i in impls] == [BUILTIN_PLUGINS[0]]:
            from rocmux.openai_dialect import decode_event

            return decode_event
        return lambda event: self.decode_event(backend, event)

    def decode_event(self, backend: str, event: ServerSentEvent) -> Sequence[Token]:
        """Tokens carried by one SSE event, from the first decoder that claims it."""
        result = self.pm.hook.rocmux_decode_event(backend=backend, event=event)
        return () if result is None else result

    def lifecycle(self, event: LifecycleEvent) -> None:
        """Tell observers about ``event``; their errors are recorded, never raised."""
        for plugin, function in self._each_impl("rocmux_lifecycle"):
            if _trace_enabled():
                _trace(f"rocmux_lifecycle -> {plugin}: {event.kind} ({event.backend})")
            try:
                function(event=event)
            except Exception as exc:
                self._record_error(plugin, f"plugin {plugin!r} failed in rocmux_lifecycle: {exc!r}")

    def setup_backend(self, request: SetupRequest) -> bool:
        """Ask plugins to set up ``request.backend``; False when none handles it."""
        return bool(self.pm.hook.rocmux_setup_backend(request=request))


def _before_hook(hook_name: str, impls: Sequence[pluggy.HookImpl], kwargs: dict[str, Any]) -> None:
    names = ", ".join(impl.plugin_name for impl in reversed(impls))
    _trace(f"{hook_name}({', '.join(sorted(kwargs))}) -> [{names}]")


def _after_hook(
    outcome: pluggy.Result[Any],
    hook_name: str,
    impls: Sequence[pluggy.HookImpl],
    kwargs: dict[str, Any],
) -> None:
    if outcome.exception is not None:
        _trace(f"{hook_name} raised {outcome.exception!r} at {time.monotonic():.6f}")
    else:
        _trace(f"{hook_name} returned {outcome.get_result()!r} at {time.monotonic():.6f}")


_default: PluginManager | None = None


def get_plugin_manager() -> PluginManager:
    """The process-wide plugin manager, discovered on first use."""
    global _default
    if _default is None:
        _default = PluginManager.discover()
    return _default


def reset_plugin_manager(manager: PluginManager | None = None) -> None:
    """Replace the process-wide manager (tests use this)."""
    global _default
    _default = manager
