"""The ``llamacpp_hip`` backend: llama-server as a supervised subprocess."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path
from typing import ClassVar

import anyio
import attrs
from rocmux.backend import Backend
from rocmux.config import load_config
from rocmux.errors import BinaryNotFound
from rocmux.launch import Launch
from rocmux.manager import PluginManager, get_plugin_manager
from rocmux.models import check_gguf
from rocmux.served import ServedModel
from rocmux.types import Availability, LoadConfig

from rocmux_llamacpp_hip.binary import BuildInfo, flags_of, locate, probe
from rocmux_llamacpp_hip.flags import base_flags, merge_extra

# llama-server logs this once the model is loaded and the socket is open.
READY_LINE = re.compile(r"listening on http")

PRIORITY = {"hip": 100, "cuda": 80, "metal": 80, "vulkan": 60, "cpu": 10}
VISIBLE_DEVICES_VAR = {"hip": "HIP_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
PASS_THROUGH = ("HSA_OVERRIDE_GFX_VERSION", "HIP_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES")


def describe(info: BuildInfo, path: Path, source: str) -> Availability:
    """Availability of a probed binary: priority by build kind and devices."""
    names = ", ".join(f"{d.id} {d.name}" for d in info.devices)
    where = f"{path} (from {source})"
    if info.kind == "cpu":
        reason = f"CPU build of llama-server {info.version} at {where}"
        priority = PRIORITY["cpu"]
    elif info.devices:
        reason = f"{info.kind.upper()} build of llama-server {info.version} at {where}; {names}"
        priority = PRIORITY[info.kind]
    else:
        reason = (
            f"{info.kind.upper()} build of llama-server {info.version} at {where}, but it "
            "sees no GPU; it will run on the CPU"
        )
        priority = PRIORITY["cpu"] + 5
    return Availability(
        ok=True, reason=reason, priority=priority, devices=info.devices, version=info.version
    )


def device_env(kind: str, devices: tuple[str, ...]) -> dict[str, str]:
    """Environment that limits the runtime to ``devices`` (indices or names like ROCm1)."""
    env = {var: os.environ[var] for var in PASS_THROUGH if var in os.environ}
    if devices:
        indices = [re.sub(r"^[A-Za-z]+", "", d) for d in devices]
        env[VISIBLE_DEVICES_VAR.get(kind, "HIP_VISIBLE_DEVICES")] = ",".join(indices)
    return env


def igpu_exclusion() -> dict[str, str]:
    """``HIP_VISIBLE_DEVICES`` leaving integrated GPUs out when a discrete one is present
    (rocmux.devices decides, and stands aside when the user set a visibility variable)."""
    from rocmux.devices import default_visible_devices, detect_gpus

    value = default_visible_devices(detect_gpus(smi=False))
    return {"HIP_VISIBLE_DEVICES": value} if value is not None else {}


def choose_settings(model: Path, config: LoadConfig, info: BuildInfo) -> tuple[LoadConfig, str]:
    """Fill the context length and GPU layers the user left open, from the memory fit.

    The free memory is the build's first device's (as llama-server reports it), or the
    host's available memory for a CPU build.
    """
    from rocmux.devices import cpu_info
    from rocmux.inventory import ModelInfo
    from rocmux.memory import fit

    if config.context_len is not None and (config.gpu_layers is not None or info.kind == "cpu"):
        return config, "settings given by the user"
    model_info = ModelInfo.from_gguf(model)
    gpu = next((d for d in info.devices if d.memory_free is not None), None)
    if info.kind != "cpu" and gpu is not None:
        result = fit(model_info, int(gpu.memory_free or 0), requested=config)
        where = f"{gpu.id} ({gpu.memory_free / 2**30:.1f} GiB free)"
    else:
        result = fit(model_info, cpu_info(), requested=config)
        where = "host memory"
    return result.config, f"memory fit on {where}: {result.reason}"


@attrs.define(eq=False)
class LlamaCppBackend(Backend):
    """llama.cpp's llama-server: HIP builds first, CUDA, Vulkan and CPU builds too."""

    name: ClassVar[str] = "llamacpp_hip"
    plugins: PluginManager | None = None
    startup_timeout: float = 300.0
    _info: BuildInfo | None = attrs.field(default=None, init=False)

    def _configured_path(self) -> str | None:
        value = load_config().backend_options(self.name).get("server")
        return str(value) if value else None

    async def detect(self) -> Availability:
        try:
            located = await anyio.to_thread.run_sync(locate, self._configured_path())
        except BinaryNotFound as exc:
            return Availability.unavailable(str(exc))
        try:
            info = await anyio.to_thread.run_sync(probe, located.path)
        except (OSError, subprocess.SubprocessError) as exc:
            return Availability.unavailable(f"{located.path} failed to run: {exc}")
        self._info = info
        return describe(info, located.path, located.source)

    async def load(self, model: Path, config: LoadConfig) -> ServedModel:
        model = check_gguf(model)
        located = await anyio.to_thread.run_sync(locate, self._configured_path())
        known = await anyio.to_thread.run_sync(flags_of, located.path)
        # Validate the user's flags before spending time on the memory fit.
        merge_extra(base_flags(model, config), config.extra_flags, known)
        if self._info is None:
            self._info = await anyio.to_thread.run_sync(probe, located.path)
        config, fit_reason = await anyio.to_thread.run_sync(
            choose_settings, model, config, self._info
        )
        argv = [
            str(located.path),
            *merge_extra(base_flags(model, config), config.extra_flags, known),
        ]
        env = device_env(self._info.kind, config.devices)
        if self._info.kind == "hip" and not config.devices:
            env.update(await anyio.to_thread.run_sync(igpu_exclusion))
        plugins = self.plugins or get_plugin_manager()

        def make_launch() -> Launch:
            return Launch(
                backend=self.name, argv=list(argv), env=dict(env), ready_pattern=READY_LINE
            )

        served = ServedModel(
            backend=self.name,
            model_path=model,
            make_launch=make_launch,
            plugins=plugins,
            startup_timeout=self.startup_timeout,
            request_defaults={"stream_options": {"include_usage": True}},
        )
        served.notes.append(fit_reason)
        await served.start()
        return served
