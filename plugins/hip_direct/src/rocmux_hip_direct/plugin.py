"""Entry point of the ``hip_direct`` plugin."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import attrs
from rocmux import hookimpl
from rocmux.backend import Backend, TextModel
from rocmux.errors import BackendUnavailable
from rocmux.types import Availability, LoadConfig

if TYPE_CHECKING:
    from rocmux.registry import BackendRegistry


@attrs.define(eq=False)
class HipDirectBackend(Backend):
    """In-process runtime on PyTorch. Loading is not implemented yet."""

    name: ClassVar[str] = "hip_direct"

    async def detect(self) -> Availability:
        # find_spec only locates torch; importing it costs about a second.
        if importlib.util.find_spec("torch") is None:
            return Availability.unavailable(
                "PyTorch is not installed; install a ROCm build of torch (or the CPU build)"
            )
        return Availability.unavailable(
            "PyTorch is installed, but this version of rocmux-hip-direct cannot load models yet"
        )

    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        raise BackendUnavailable("the hip_direct backend cannot load models yet")


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    registry.add(HipDirectBackend())
