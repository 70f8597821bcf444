"""The ``vllm_rocm`` backend: ``vllm serve`` as a supervised subprocess."""

from __future__ import annotations

import re
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, ClassVar

import anyio
import attrs
from rocmux.backend import Backend
from rocmux.config import load_config
from rocmux.devices import GpuInfo, configured_targets
from rocmux.errors import BinaryNotFound, InvalidModel, ModelNotFound
from rocmux.launch import Launch
from rocmux.manager import PluginManager, get_plugin_manager
from rocmux.models import check_gguf
from rocmux.served import ServedModel
from rocmux.types import Availability, LoadConfig, Token

from rocmux_vllm_rocm import detect
from rocmux_vllm_rocm.args import NAME, VllmOptions, serve_args, visibility

# Uvicorn logs the first once the app is up (vLLM 0.6 and later pass it a bound socket,
# so it no longer logs the second); either way /health decides.
READY_LINE = re.compile(r"Application startup complete|Uvicorn running on")

# GenerateConfig speaks llama.cpp's name; vLLM's sampling parameter is
# `repetition_penalty` and it ignores unknown fields with only a log warning.
_RENAMED = {"repeat_penalty": "repetition_penalty"}


def options() -> VllmOptions:
    """The ``[backends.vllm_rocm]`` table of the configuration in use."""
    return VllmOptions.from_table(load_config().backend_options(NAME))


def check_model(model: Path) -> Path:
    """A Hugging Face model folder (with ``config.json``) or a GGUF file, resolved."""
    model = Path(model).expanduser()
    if not model.exists():
        raise ModelNotFound(
            f"model {model} does not exist; vllm_rocm loads a local Hugging Face model folder "
            "(e.g. from `hf download Qwen/Qwen2.5-0.5B-Instruct --local-dir DIR`) or a GGUF file"
        )
    if model.is_dir():
        if not (model / "config.json").is_file():
            raise InvalidModel(
                f"{model} is a folder without config.json, so not a Hugging Face model folder"
            )
        return model.resolve()
    return check_gguf(model)


def served_name(model: Path, opts: VllmOptions) -> str:
    """The name vLLM serves the model under: the option, else the folder or file name."""
    if opts.served_model_name:
        return opts.served_model_name
    return model.name if model.is_dir() else model.stem


@attrs.define(eq=False)
class VllmModel(ServedModel):
    """A ``ServedModel`` that speaks vLLM's names for sampling fields."""

    def _stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[Token]:
        body = {_RENAMED.get(key, key): value for key, value in body.items()}
        return super()._stream(path, body)


@attrs.define(eq=False)
class VllmBackend(Backend):
    """vLLM's OpenAI-compatible server on ROCm, one ``vllm serve`` per loaded model.

    Priority 90 by default: below a HIP build of llama.cpp (100), which loads rocmux's
    GGUF models natively and starts in seconds; vLLM is the high-throughput choice for
    Hugging Face models. Ask for it with ``backend = "vllm_rocm"`` or raise ``priority``
    in ``[backends.vllm_rocm]``.
    """

    name: ClassVar[str] = NAME
    plugins: PluginManager | None = None
    startup_timeout: float | None = None
    """Seconds to wait for readiness; ``None`` takes the option (default 900)."""

    async def detect(self) -> Availability:
        try:
            opts = options()
        except Exception as exc:  # a bad table must read as a reason, not an exception
            return Availability.unavailable(str(exc))
        vllm: detect.VllmInstall | BinaryNotFound
        try:
            vllm = await anyio.to_thread.run_sync(detect.locate_vllm, opts.command)
        except BinaryNotFound as exc:
            vllm = exc
        python = vllm.python if isinstance(vllm, detect.VllmInstall) else None
        torch: detect.TorchBuild | Exception | None
        try:
            torch = await anyio.to_thread.run_sync(detect.torch_build, python)
        except (OSError, ValueError, SyntaxError, subprocess.SubprocessError) as exc:
            torch = exc
        gpus: list[GpuInfo] | Exception
        try:
            gpus = await anyio.to_thread.run_sync(detect.amd_gpus)
        except OSError as exc:
            gpus = exc
        return detect.decide(vllm, torch, gpus, opts.priority)

    async def load(self, model: Path, config: LoadConfig) -> VllmModel:
        model = check_model(model)
        opts = options()
        install = await anyio.to_thread.run_sync(detect.locate_vllm, opts.command)
        # Reading the flags runs vLLM's CLI (seconds); only extra flags need them.
        known = None
        if config.extra_flags:
            known = await anyio.to_thread.run_sync(
                detect.help_flags, install.argv, detect.stamp(install)
            )
        name = served_name(model, opts)
        argv = [*install.argv, *serve_args(str(model), config, opts, name, known)]
        gpus = await anyio.to_thread.run_sync(detect.amd_gpus)
        env, device_notes = visibility(
            config.devices, gpus, keep_integrated=configured_targets()[1]
        )
        plugins = self.plugins or get_plugin_manager()

        def make_launch() -> Launch:
            return Launch(
                backend=self.name, argv=list(argv), env=dict(env), ready_pattern=READY_LINE
            )

        served = VllmModel(
            backend=self.name,
            model_path=model,
            make_launch=make_launch,
            plugins=plugins,
            startup_timeout=self.startup_timeout or opts.startup_timeout,
            # vLLM checks `model` against --served-model-name; usage comes only on request.
            request_defaults={"model": name, "stream_options": {"include_usage": True}},
        )
        served.notes.extend(device_notes)
        await served.start()
        return served
