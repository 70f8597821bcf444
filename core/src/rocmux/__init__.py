"""rocmux: local LLM inference on AMD GPUs through pluggable runtimes.

Kept light on purpose: plugins import ``rocmux.hookimpl`` at start-up, so heavy
modules (httpx, the runtimes) load only when used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

__version__ = "0.1.0"

hookimpl = pluggy.HookimplMarker("rocmux")

if TYPE_CHECKING:
    from rocmux.backend import Backend as Backend
    from rocmux.backend import TextModel as TextModel
    from rocmux.blocking import BlockingModel as BlockingModel
    from rocmux.blocking import load as load
    from rocmux.types import (
        Availability as Availability,
    )
    from rocmux.types import (
        Device as Device,
    )
    from rocmux.types import (
        GenerateConfig as GenerateConfig,
    )
    from rocmux.types import (
        LoadConfig as LoadConfig,
    )
    from rocmux.types import (
        Message as Message,
    )
    from rocmux.types import (
        Token as Token,
    )
    from rocmux.types import (
        Usage as Usage,
    )

_LAZY = {
    "Backend": "rocmux.backend",
    "TextModel": "rocmux.backend",
    "BlockingModel": "rocmux.blocking",
    "load": "rocmux.blocking",
    "open_model": "rocmux.selection",
    "Availability": "rocmux.types",
    "Device": "rocmux.types",
    "GenerateConfig": "rocmux.types",
    "LoadConfig": "rocmux.types",
    "Message": "rocmux.types",
    "Token": "rocmux.types",
    "Usage": "rocmux.types",
}

__all__ = ["__version__", "hookimpl", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rocmux' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
