"""Whether ``vllm serve`` can run here: vLLM, a ROCm build of PyTorch, an AMD GPU.

Nothing here imports vLLM or PyTorch (each import takes seconds): vLLM is located with
``importlib.util.find_spec`` or on disk, and PyTorch's build is read from the
``torch/version.py`` file that its wheel generates. The functions block; the backend
calls them from worker threads. ``decide`` holds the logic and does no I/O.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import attrs
from rocmux.devices import GpuInfo
from rocmux.errors import BinaryNotFound
from rocmux.types import Availability

ENV_VAR = "ROCMUX_VLLM"
# `python -m` target when vLLM is importable but its console script is not beside python.
CLI_MODULE = "vllm.entrypoints.cli.main"


@attrs.frozen(kw_only=True)
class VllmInstall:
    """How to run vLLM's CLI: ``argv`` is everything before ``serve``."""

    argv: tuple[str, ...]
    source: str
    python: str | None = None
    """The interpreter that runs it, when known; its PyTorch is the one that matters."""
    version: str | None = None

    def describe(self) -> str:
        version = f"vLLM {self.version}" if self.version else "vLLM"
        return f"{version} ({' '.join(self.argv)}, from {self.source})"


@attrs.frozen(kw_only=True)
class TorchBuild:
    """What ``torch/version.py`` says. ``hip`` is set only in ROCm builds."""

    version: str
    hip: str | None = None
    cuda: str | None = None
    path: str = ""
    python: str = ""

    @property
    def kind(self) -> str:
        return "ROCm" if self.hip else "CUDA" if self.cuda else "CPU-only"


# -- vLLM ---------------------------------------------------------------------------------


def _executable(value: str) -> Path | None:
    path = Path(value).expanduser()
    if path.is_file() and os.access(path, os.X_OK):
        return path
    found = shutil.which(value) if os.sep not in value else None
    return Path(found) if found else None


def interpreter_of(script: Path) -> str | None:
    """The Python named by ``script``'s ``#!`` line, if it names one (pip's console
    scripts do); ``None`` for binaries and shell wrappers."""
    try:
        with script.open("rb") as f:
            first = f.readline(512).decode("utf-8", "replace").strip()
    except OSError:
        return None
    if not first.startswith("#!"):
        return None
    words = first[2:].split()
    if not words:
        return None
    program = words[0]
    if Path(program).name == "env" and len(words) > 1:
        program = shutil.which(words[1]) or words[1]
    return program if Path(program).name.startswith("python") else None


def locate_vllm(configured: str | None = None) -> VllmInstall:
    """Find vLLM: ``$ROCMUX_VLLM``, then ``command`` from rocmux.toml, then a vLLM
    importable by this Python, then ``vllm`` on PATH. ``BinaryNotFound`` lists every
    place that was tried."""
    value = os.environ.get(ENV_VAR)
    if value:
        path = _executable(value)
        if path is None:
            raise BinaryNotFound(
                f"${ENV_VAR} is set to {value!r}, which is not an executable file; fix or unset it"
            )
        return VllmInstall(argv=(str(path),), source=f"${ENV_VAR}", python=interpreter_of(path))
    if configured:
        path = _executable(configured)
        if path is None:
            raise BinaryNotFound(
                f"rocmux.toml [backends.vllm_rocm] command = {configured!r} is not an "
                "executable file; fix the path"
            )
        return VllmInstall(argv=(str(path),), source="rocmux.toml", python=interpreter_of(path))
    if importlib.util.find_spec("vllm") is not None:
        version = _dist_version("vllm")
        script = Path(sys.executable).parent / "vllm"
        argv = (str(script),) if script.is_file() else (sys.executable, "-m", CLI_MODULE)
        return VllmInstall(argv=argv, source="this Python", python=sys.executable, version=version)
    on_path = shutil.which("vllm")
    if on_path:
        path = Path(on_path)
        return VllmInstall(argv=(str(path),), source="PATH", python=interpreter_of(path))
    raise BinaryNotFound(
        "vLLM is not installed (tried $ROCMUX_VLLM (unset), [backends.vllm_rocm] command "
        f"(unset), `import vllm` in {sys.executable} (not found), `vllm` on PATH (not "
        "found)): install a ROCm build of vLLM or point ROCMUX_VLLM at its `vllm`"
    )


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


# -- PyTorch --------------------------------------------------------------------------------


def parse_torch_version(text: str) -> dict[str, str | None]:
    """``__version__``, ``hip`` and ``cuda`` from the text of ``torch/version.py``.

    The file is generated at build time (``tools/generate_torch_version.py`` in
    pytorch/pytorch) as plain assignments, some annotated (``hip: Optional[str] = ...``).
    """
    values: dict[str, str | None] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if (
            isinstance(target, ast.Name)
            and isinstance(value, ast.Constant)
            and (value.value is None or isinstance(value.value, str))
        ):
            values[target.id] = value.value
    return {
        "version": values.get("__version__"),
        "hip": values.get("hip"),
        "cuda": values.get("cuda"),
    }


# Run in vLLM's interpreter: find_spec locates torch without importing it.
_PROBE = (
    "import importlib.util as u, json; s = u.find_spec('torch'); "
    "print(json.dumps(s.origin if s else None))"
)


def _torch_origin(python: str | None) -> str | None:
    # Not realpath: every venv's python links to the same binary, with other packages.
    if python is None or os.path.abspath(python) == os.path.abspath(sys.executable):
        spec = importlib.util.find_spec("torch")
        return spec.origin if spec is not None else None
    done = subprocess.run(
        [python, "-c", _PROBE],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=30,
        check=True,
    )
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if not lines:
        raise ValueError(f"{python} printed nothing when asked where torch is")
    origin = json.loads(lines[-1])
    return origin if isinstance(origin, str) else None


def torch_build(python: str | None = None) -> TorchBuild | None:
    """PyTorch of ``python`` (default: this interpreter); ``None`` when not installed.

    Raises ``OSError``, ``subprocess.SubprocessError`` or ``ValueError`` when it cannot
    be read.
    """
    python = python or sys.executable
    origin = _torch_origin(python)
    if origin is None:
        return None
    path = Path(origin).parent / "version.py"
    fields = parse_torch_version(path.read_text(encoding="utf-8"))
    return TorchBuild(
        version=fields["version"] or "unknown",
        hip=fields["hip"],
        cuda=fields["cuda"],
        path=str(path),
        python=python,
    )


# -- GPUs -----------------------------------------------------------------------------------


def amd_gpus() -> list[GpuInfo]:
    """AMD GPUs from sysfs (no amd-smi: detection must stay fast)."""
    from rocmux.devices import detect_gpus

    return [gpu for gpu in detect_gpus(smi=False) if gpu.vendor == "amd"]


# -- the decision ---------------------------------------------------------------------------


def _gpu_name(gpu: GpuInfo) -> str:
    target = f" ({gpu.gfx_target})" if gpu.gfx_target else ""
    return f"{gpu.device_id} {gpu.name}{target}"


def decide(
    vllm: VllmInstall | BinaryNotFound,
    torch: TorchBuild | Exception | None,
    gpus: Sequence[GpuInfo] | Exception,
    priority: int = 90,
) -> Availability:
    """Available only with all three; otherwise the reason lists every missing part,
    separated by ``"; "``."""
    missing: list[str] = []
    if isinstance(vllm, BinaryNotFound):
        missing.append(str(vllm))
    where = f" in {torch.python}" if isinstance(torch, TorchBuild) and torch.python else ""
    if isinstance(torch, Exception):
        missing.append(f"could not read PyTorch's build ({torch})")
    elif torch is None:
        missing.append("PyTorch is not installed (vLLM needs a ROCm build of PyTorch)")
    elif not torch.hip:
        detail = f"CUDA {torch.cuda}" if torch.cuda else "no GPU support"
        missing.append(
            f"PyTorch {torch.version}{where} is a {torch.kind} build ({detail}, "
            "torch.version.hip is None), but vLLM on AMD GPUs needs a ROCm build of PyTorch"
        )
    usable: list[GpuInfo] = []
    if isinstance(gpus, Exception):
        missing.append(f"GPU detection failed ({gpus})")
    else:
        usable = [g for g in gpus if g.index is not None]
        if not gpus:
            missing.append("no AMD GPU found (no amdgpu device in the KFD topology)")
        elif not usable:
            missing.append(
                f"{len(gpus)} AMD GPU(s) found but none is accessible (no permission on "
                "/dev/kfd or /dev/dri/renderD*: add the user to the render and video groups)"
            )
    if missing:
        return Availability.unavailable("; ".join(missing))
    assert isinstance(vllm, VllmInstall)
    assert isinstance(torch, TorchBuild)
    reason = (
        f"{vllm.describe()} with PyTorch {torch.version}{where} (HIP {torch.hip}) on "
        + ", ".join(_gpu_name(g) for g in usable)
    )
    return Availability(
        ok=True,
        reason=reason,
        priority=priority,
        devices=tuple(g.to_device() for g in usable),
        version=vllm.version,
    )


# -- vllm serve --help ------------------------------------------------------------------------


def _run(argv: Sequence[str], timeout: float) -> tuple[int, str]:
    done = subprocess.run(
        list(argv),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return done.returncode, (done.stdout + done.stderr).decode("utf-8", "replace")


@functools.lru_cache(maxsize=8)
def help_flags(
    argv: tuple[str, ...], stamp: int, timeout: float = 180.0
) -> dict[str, frozenset[str]]:
    """Flags of ``vllm serve``, cached per executable version (``stamp``).

    Since vLLM 0.10 ``serve --help`` lists only the option groups and ``--help=all``
    every flag; older versions reject ``--help=all`` and print every flag for ``--help``.
    """
    from rocmux.errors import LaunchError

    from rocmux_vllm_rocm.args import parse_help_flags

    outputs = []
    for option in ("--help=all", "--help"):
        code, text = _run([*argv, "serve", option], timeout)
        flags = parse_help_flags(text)
        if code == 0 and "--tensor-parallel-size" in flags:
            return flags
        outputs.append(f"$ {' '.join(argv)} serve {option} (exit {code})\n{text[-1500:]}")
    raise LaunchError(
        "could not read the flags of vllm serve to check the extra flags:\n" + "\n".join(outputs)
    )


def stamp(install: VllmInstall) -> int:
    """Changes when the vLLM behind ``install`` is replaced (for the help cache)."""
    target = Path(install.argv[-1] if install.argv[-1] != CLI_MODULE else install.argv[0])
    try:
        stat = target.stat()
    except OSError:
        return 0
    return stat.st_mtime_ns ^ stat.st_size ^ hash(install.version)
