"""Entry point of the ``hip_direct`` plugin.

Nothing here imports torch: detection finds it with ``find_spec`` and reads
``torch/version.py`` as text to tell a ROCm build from a CUDA or CPU one; the engine
(and torch) load with the first model.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import anyio
import attrs
from rocmux import hookimpl
from rocmux.backend import Backend, TextModel
from rocmux.errors import BackendUnavailable
from rocmux.models import check_gguf
from rocmux.types import Availability, Device, LoadConfig

if TYPE_CHECKING:
    from rocmux.registry import BackendRegistry

NAME = "hip_direct"
# Below llama.cpp's builds of the same kind: this runtime is the younger one.
PRIORITY = {"rocm": 70, "cuda": 50, "cpu": 5}
INSTALL_HINT = (
    "install a PyTorch build for this machine (ROCm: pip install torch --index-url "
    "https://download.pytorch.org/whl/rocm6.4; or the CPU build) and "
    "`pip install rocmux-hip-direct[torch]`"
)


@attrs.frozen
class TorchBuild:
    """What ``torch/version.py`` says about the installed build."""

    version: str
    hip: str | None
    cuda: str | None

    @property
    def kind(self) -> str:
        return "rocm" if self.hip else "cuda" if self.cuda else "cpu"


def _version_field(text: str, name: str) -> str | None:
    match = re.search(rf"^{name}\s*(?::[^=]*)?=\s*['\"]([^'\"]+)['\"]", text, re.MULTILINE)
    return match[1] if match else None


def torch_build() -> TorchBuild | None:
    """The installed torch build, read without importing torch; None if not installed."""
    spec = importlib.util.find_spec("torch")
    if spec is None:
        return None
    version, hip, cuda = "unknown", None, None
    for location in spec.submodule_search_locations or ():
        path = Path(location) / "version.py"
        if path.is_file():
            text = path.read_text(errors="replace")
            version = _version_field(text, "__version__") or version
            hip = _version_field(text, "hip")
            cuda = _version_field(text, "cuda")
            break
    return TorchBuild(version, hip, cuda)


def _gpus(kind: str) -> tuple[Device, ...]:
    """GPUs visible to this kind of build, from sysfs/device nodes (no torch)."""
    if kind == "rocm":
        from rocmux.devices import amd_gpus

        try:
            found = amd_gpus()
        except OSError:
            return ()
        usable = [gpu for gpu in found if gpu.index is not None]
        return tuple(
            Device(
                id=f"cuda:{gpu.index}", name=gpu.name, kind="rocm", memory_total=gpu.memory_total
            )
            for gpu in usable
        )
    if kind == "cuda" and Path("/dev/nvidiactl").exists():
        nodes = sorted(Path("/dev").glob("nvidia[0-9]*"))
        return tuple(
            Device(id=f"cuda:{i}", name="NVIDIA GPU", kind="cuda") for i in range(len(nodes))
        )
    return ()


def describe(build: TorchBuild | None, gpus: tuple[Device, ...]) -> Availability:
    """Availability from what detection found."""
    if build is None:
        return Availability.unavailable(f"PyTorch is not installed; {INSTALL_HINT}")
    cpu = Device(id="cpu", name="CPU", kind="cpu")
    if importlib.util.find_spec("jinja2") is None:
        return Availability.unavailable(
            "jinja2 (for chat templates) is not installed; `pip install rocmux-hip-direct[torch]`"
        )
    label = {"rocm": f"ROCm (HIP {build.hip})", "cuda": f"CUDA {build.cuda}", "cpu": "CPU"}
    what = f"{label[build.kind]} build of PyTorch {build.version}"
    if build.kind != "cpu" and gpus:
        names = ", ".join(f"{d.id} {d.name}" for d in gpus)
        return Availability(
            ok=True,
            reason=f"{what}; {names}",
            priority=PRIORITY[build.kind],
            devices=(*gpus, cpu),
            version=build.version,
        )
    if build.kind != "cpu":
        reason = f"{what}, but no GPU is visible; it will run on the CPU"
    else:
        reason = f"{what}; runs on the CPU"
    return Availability(
        ok=True, reason=reason, priority=PRIORITY["cpu"], devices=(cpu,), version=build.version
    )


@attrs.define(eq=False)
class HipDirectBackend(Backend):
    """In-process runtime on PyTorch: a paged KV cache and continuous batching."""

    name: ClassVar[str] = NAME

    async def detect(self) -> Availability:
        try:
            build = torch_build()
            gpus = _gpus(build.kind) if build is not None else ()
            return describe(build, gpus)
        except Exception as exc:  # detection must never raise
            return Availability.unavailable(f"hip_direct detection failed: {exc}")

    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        availability = await self.detect()
        if not availability.ok:
            raise BackendUnavailable(availability.reason)
        path = check_gguf(model)
        from rocmux_hip_direct.loader import load_model

        return await anyio.to_thread.run_sync(load_model, path, config)


@hookimpl
def rocmux_register_backends(registry: BackendRegistry) -> None:
    registry.add(HipDirectBackend())
