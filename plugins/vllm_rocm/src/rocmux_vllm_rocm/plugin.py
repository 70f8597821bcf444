"""Entry point of the ``vllm_rocm`` plugin."""

from __future__ import annotations

import importlib.util
import shutil
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
class VllmBackend(Backend):
    """``vllm serve`` as a subprocess. Loading is not implemented yet."""

    name: ClassVar[str] = "vllm_rocm"

    async def detect(self) -> Availability:
        # find_spec only locates the package: importing vLLM takes seconds.
        if importlib.util.find_spec("vllm") is None and shutil.which("vllm") is None:
            return Availability.unavailable(
                "vLLM is not installed (neither importable nor `vllm` on PATH); "
                "install a ROCm build of vLLM"
            )
        return Availability.unavailable(
            "vLLM is installed, but this version of rocmux-vllm-rocm cannot load models yet"
        )

    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        raise BackendUnavailable("the vllm_rocm backend cannot load models yet")


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    registry.add(VllmBackend())
