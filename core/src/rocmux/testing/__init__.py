"""A conformance suite for rocmux backends, shipped as a pytest plugin.

Subclass :class:`BackendConformance` in a test file, or run the suite against an
installed backend with ``pytest --rocmux-backend NAME --pyargs rocmux.testing``.
See ``docs/plugins.md``.

Kept light: pytest imports the plugin module at start-up in every environment where
rocmux is installed, so the suite itself loads only when it is used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rocmux.testing.conformance import NOT_APPLICABLE as NOT_APPLICABLE
    from rocmux.testing.conformance import NOT_RUN as NOT_RUN
    from rocmux.testing.conformance import BackendConformance as BackendConformance
    from rocmux.testing.processes import alive as alive
    from rocmux.testing.processes import descendants as descendants

_LAZY = {
    "BackendConformance": "rocmux.testing.conformance",
    "NOT_APPLICABLE": "rocmux.testing.conformance",
    "NOT_RUN": "rocmux.testing.conformance",
    "alive": "rocmux.testing.processes",
    "descendants": "rocmux.testing.processes",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rocmux.testing' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
