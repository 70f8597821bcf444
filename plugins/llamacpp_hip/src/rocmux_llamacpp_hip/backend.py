"""The ``llamacpp_hip`` backend: llama-server as a supervised subprocess."""

from __future__ import annotations

import functools
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
from rocmux_llamacpp_hip.placement import device_need, plan_devices

# llama-server logs this once the model is loaded and the socket is open.
READY_LINE = re.compile(r"listening on http")

PRIORITY = {"hip": 100, "cuda": 80, "metal": 80, "vulkan": 60, "cpu": 10}
VISIBLE_DEVICES_VAR = {"hip": "HIP_VISIBLE_DEVICES", "cuda": "CUDA_VISIBLE_DEVICES"}
# The child inherits rocmux's environment (the supervisor starts it with os.environ
# plus Launch.env), so nothing needs copying; this one is named in Launch.env only so
# the launch shows it.
PASS_THROUGH = ("HSA_OVERRIDE_GFX_VERSION",)


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
    """Environment for ``devices`` given as runtime indices (``1``, ``ROCm1``), without
    detection: ``plan_devices`` does this with stable ids. Adds no visibility variable
    when the user's environment has one (two would compose and renumber)."""
    from rocmux.devices import VISIBILITY_VARIABLES

    env = {var: os.environ[var] for var in PASS_THROUGH if var in os.environ}
    if devices and not any(os.environ.get(v) is not None for v in VISIBILITY_VARIABLES):
        indices = [re.sub(r"^[A-Za-z]+", "", d) for d in devices]
        env[VISIBLE_DEVICES_VAR.get(kind, "HIP_VISIBLE_DEVICES")] = ",".join(indices)
    return env


def igpu_exclusion() -> dict[str, str]:
    """``HIP_VISIBLE_DEVICES`` leaving integrated GPUs (and GPUs ROCm does not support)
    out when a discrete one is present; ``{}`` when the user set a visibility variable
    (``rocmux.devices.default_selection`` decides)."""
    from rocmux.devices import default_selection, detect_gpus

    return dict(default_selection(detect_gpus(smi=False)).env)


def choose_settings(
    model: Path,
    config: LoadConfig,
    info: BuildInfo,
    *,
    gpu_free: int | None = None,
    where: str | None = None,
    cpu_only: bool = False,
) -> tuple[LoadConfig, str]:
    """Fill the context length and GPU layers the user left open, from the memory fit.

    The free memory is ``gpu_free`` (the GPUs the model was placed on, ``where``), else
    the build's first device's as llama-server reports it, or the host's available
    memory for a CPU build or when no GPU is left (``cpu_only``).
    """
    from rocmux.devices import cpu_info
    from rocmux.inventory import ModelInfo
    from rocmux.memory import fit

    on_cpu = info.kind == "cpu" or cpu_only
    if config.context_len is not None and (config.gpu_layers is not None or on_cpu):
        return config, "settings given by the user"
    model_info = ModelInfo.from_gguf(model)
    gpu = next((d for d in info.devices if d.memory_free is not None), None)
    if not on_cpu and gpu_free is not None:
        result = fit(model_info, gpu_free, requested=config)
        where = f"{where} ({gpu_free / 2**30:.1f} GiB free)"
    elif not on_cpu and gpu is not None:
        result = fit(model_info, int(gpu.memory_free or 0), requested=config)
        where = f"{gpu.id} ({(gpu.memory_free or 0) / 2**30:.1f} GiB free)"
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

    async def prepare(self, model: Path, config: LoadConfig) -> tuple[Launch, list[str]]:
        """The launch of ``model`` (argv, and the environment rocmux adds to its own)
        and notes on the choices made: GPUs, placement, memory fit."""
        model = check_gguf(model)
        located = await anyio.to_thread.run_sync(locate, self._configured_path())
        known = await anyio.to_thread.run_sync(flags_of, located.path)
        # Validate the user's flags before spending time on the memory fit.
        merge_extra(base_flags(model, config), config.extra_flags, known)
        if self._info is None:
            self._info = await anyio.to_thread.run_sync(probe, located.path)
        info = self._info
        options = load_config().backend_options(self.name)
        plan = await anyio.to_thread.run_sync(
            functools.partial(
                plan_devices,
                info.kind,
                config,
                server=located.path,
                known=known,
                options=options,
                need=functools.partial(device_need, model, config),
            )
        )
        if plan.cpu_only and config.gpu_layers is None:
            config = attrs.evolve(config, gpu_layers=0)
        config, fit_reason = await anyio.to_thread.run_sync(
            functools.partial(
                choose_settings,
                model,
                config,
                info,
                gpu_free=plan.free,
                where=plan.where,
                cpu_only=plan.cpu_only,
            )
        )
        argv = [
            str(located.path),
            *merge_extra([*base_flags(model, config), *plan.flags], config.extra_flags, known),
        ]
        env = {var: os.environ[var] for var in PASS_THROUGH if var in os.environ}
        env.update(plan.env)
        launch = Launch(
            backend=self.name,
            argv=argv,
            env=env,
            ready_pattern=READY_LINE,
            # llama-server keeps nothing that an orderly exit would save, and with
            # streams open it ignores SIGTERM for minutes: a grace period only delays
            # every model swap (an idle one exits in ~40 ms on SIGTERM, ~15 on SIGKILL).
            stop_grace=0.0,
        )
        return launch, [*plan.notes, fit_reason]

    async def load(self, model: Path, config: LoadConfig) -> ServedModel:
        launch, notes = await self.prepare(model, config)
        plugins = self.plugins or get_plugin_manager()

        def make_launch() -> Launch:
            return Launch(
                backend=self.name,
                argv=list(launch.argv),
                env=dict(launch.env),
                ready_pattern=READY_LINE,
                stop_grace=launch.stop_grace,
            )

        served = ServedModel(
            backend=self.name,
            model_path=check_gguf(model),
            make_launch=make_launch,
            plugins=plugins,
            startup_timeout=self.startup_timeout,
            request_defaults={"stream_options": {"include_usage": True}},
        )
        served.notes.extend(notes)
        await served.start()
        return served
