"""Which GPUs llama-server gets: the build's gfx targets, the GPU selection, the
placement of the model and the one visibility variable of the child's environment.

The rules themselves live in ``rocmux.devices`` (``select_gpus``, ``place``); this
module feeds them what only the llama.cpp plugin knows: the build kind, the gfx targets
the HIP build carries, its flags, and the memory the model needs.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
from rocmux.devices import (
    VISIBILITY_VAR,
    VISIBILITY_VARIABLES,
    GpuInfo,
    Runtime,
    Selection,
    configured_targets,
    describe_gpu,
    detect_gpus,
    is_index_ref,
    place,
    select_gpus,
    visibility_value,
)
from rocmux.errors import ConfigError, RocmuxError
from rocmux.types import LoadConfig

from rocmux_llamacpp_hip.flags import split_flags

RUNTIME_OF_KIND: Mapping[str, Runtime] = {"hip": "hip", "cuda": "cuda"}

# A clang offload bundle entry id: "<kind>-<triple>-<target id>", e.g.
# "hipv4-amdgcn-amd-amdhsa--gfx1100" or "hipv4-amdgcn-amd-amdhsa--gfx942:sramecc+:xnack-".
# Uncompressed bundles keep these ids as plain bytes in the bundle header, which is
# what `roc-obj-ls` lists (Clang Offload Bundler, "Bundle Entry ID":
# https://clang.llvm.org/docs/ClangOffloadBundler.html). Compressed bundles ("CCOB")
# hide them; then the build's targets come from elsewhere or stay unknown.
_BUNDLE_ID = re.compile(rb"hip(?:v4)?-amdgcn-amd-amdhsa-[a-z0-9]*-(gfx[0-9a-z-]+)")
_CMAKE_TARGETS = re.compile(
    r"^(?:AMDGPU_TARGETS|GPU_TARGETS|CMAKE_HIP_ARCHITECTURES)(?::[A-Z]+)?=(.*)$", re.MULTILINE
)
_CHUNK = 8 << 20


@attrs.frozen(kw_only=True)
class BuildTargets:
    """The gfx targets a HIP llama-server carries (``None``: unknown) and where they
    were read."""

    targets: frozenset[str] | None
    source: str


def _clean(targets: Collection[str]) -> frozenset[str]:
    return frozenset(t.strip().split(":", 1)[0].lower() for t in targets if t.strip())


@functools.lru_cache(maxsize=16)
def _bundle_targets(path: str, mtime_ns: int, size: int) -> frozenset[str]:
    found: set[bytes] = set()
    tail = b""
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            data = tail + chunk
            found.update(m.group(1) for m in _BUNDLE_ID.finditer(data))
            tail = data[-128:]
    return frozenset(t.decode("ascii").rstrip("-") for t in found)


def bundle_targets(path: Path) -> frozenset[str]:
    """gfx targets of the HIP code objects bundled in an executable or library."""
    stat = path.stat()
    return _bundle_targets(str(path), stat.st_mtime_ns, stat.st_size)


def _hip_libraries(server: Path) -> list[Path]:
    """Where a llama.cpp build keeps its HIP kernels: the ggml-hip library beside the
    binary or in ../lib (shared builds), else the binary itself (static builds)."""
    where = [server.parent, server.parent.parent / "lib", server.parent.parent / "lib64"]
    found = [p for d in where if d.is_dir() for p in sorted(d.glob("libggml-hip.so*"))]
    return [p for p in found if p.is_file() and not p.is_symlink()] or [server]


def build_targets(server: Path, configured: object = None) -> BuildTargets:
    """The gfx targets a HIP llama-server was built for, first found:

    1. ``[backends.llamacpp_hip] gpu_targets`` (for binaries rocmux cannot read);
    2. the offload bundle ids in the ggml-hip library or the binary (what is really in
       the build, whoever built it);
    3. ``AMDGPU_TARGETS``/``GPU_TARGETS`` in the CMakeCache.txt of the build tree the
       binary sits in (``build/bin/llama-server``), as ``rocmux setup`` and llama.cpp's
       own instructions build it;
    4. unknown: only ROCm's list is checked.

    ``llama-server --list-devices`` is no help: ggml-hip lists every GPU HIP
    enumerates, built for or not, and fails later at the first kernel launch.
    """
    if configured is not None:
        if isinstance(configured, str) or not isinstance(configured, list | tuple):
            raise ConfigError(
                f"[backends.llamacpp_hip] gpu_targets must be a list like ['gfx1100'], "
                f"got {configured!r}"
            )
        return BuildTargets(targets=_clean(map(str, configured)), source="rocmux.toml")
    for library in _hip_libraries(server):
        try:
            targets = bundle_targets(library)
        except OSError:
            continue
        if targets:
            return BuildTargets(targets=_clean(targets), source=f"code objects in {library}")
    cache = server.parent.parent / "CMakeCache.txt"
    try:
        text = cache.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for match in _CMAKE_TARGETS.finditer(text):
        targets = _clean(re.split(r"[;,\s]+", match[1]))
        if targets:
            return BuildTargets(targets=targets, source=str(cache))
    return BuildTargets(targets=None, source="unknown (no readable code objects or CMakeCache)")


def split_asked(config: LoadConfig, option: object = False) -> bool:
    """Whether the model is to be split over several GPUs: ``--split-mode`` or
    ``--tensor-split`` in its extra flags (``--split-mode none``: no), else the
    ``[backends.llamacpp_hip] split`` option, else whether it is pinned to several."""
    for group in split_flags(config.extra_flags):
        name, _, inline = group[0].partition("=")
        value = inline or (group[1] if len(group) > 1 else "")
        if name in ("-sm", "--split-mode"):
            return value.lower() != "none"
        if name in ("-ts", "--tensor-split"):
            return True
    if not isinstance(option, bool):
        raise ConfigError(f"[backends.llamacpp_hip] split must be true or false, got {option!r}")
    return option or len(config.devices) > 1


@attrs.frozen(kw_only=True)
class DevicePlan:
    """What the launch gets: ``env`` (at most one visibility variable), extra base
    ``flags`` (``--tensor-split``, ``--device none``), the GPUs the model goes to, their
    free memory for the memory fit (``None``: use llama-server's own report) and notes."""

    env: dict[str, str] = attrs.field(factory=dict)
    flags: list[str] = attrs.field(factory=list)
    gpus: tuple[GpuInfo, ...] = ()
    free: int | None = None
    where: str | None = None
    cpu_only: bool = False
    notes: list[str] = attrs.field(factory=list)


def plan_devices(
    kind: str,
    config: LoadConfig,
    *,
    server: Path,
    known: Mapping[str, frozenset[str]],
    options: Mapping[str, Any],
    need: Callable[[], int] | None = None,
    gpus: Sequence[GpuInfo] | None = None,
    env: Mapping[str, str] | None = None,
) -> DevicePlan:
    """Select the GPUs for a ``kind`` build, place the model on them and build the
    child's visibility variable. ``need()`` gives the bytes the model needs on the GPU
    (asked only when there is a choice to make); ``gpus`` defaults to detection."""
    env = os.environ if env is None else env
    runtime = RUNTIME_OF_KIND.get(kind)
    if runtime is None:
        if config.devices:
            raise ConfigError(
                f"devices pins GPUs, which needs a HIP or CUDA build of llama-server; this "
                f"one is a {kind} build (use extra_flags = ['--device', ...] instead)"
            )
        return DevicePlan()
    if gpus is None:
        gpus = detect_gpus(smi=False)
    vendor = "amd" if runtime == "hip" else "nvidia"
    usable = [g for g in gpus if g.vendor == vendor and g.index is not None]
    if not usable:
        return _undetected(runtime, config, env)
    notes: list[str] = []
    targets = None
    if runtime == "hip":
        built = build_targets(server, options.get("gpu_targets"))
        targets = built.targets
        if targets is not None:
            notes.append(f"build targets {', '.join(sorted(targets))} (from {built.source})")
    rocm_targets, keep_integrated = configured_targets()
    selection = select_gpus(
        gpus,
        runtime=runtime,
        pinned=config.devices,
        build_targets=targets,
        rocm_targets=rocm_targets if runtime == "hip" else None,
        keep_integrated=keep_integrated,
        env=env,
    )
    notes += selection.notes
    notes += [f"{describe_gpu(g)} left out: {why}" for g, why in selection.left_out]
    if not selection.gpus:
        flags = ["--device", "none"] if "--device" in known else []
        notes.append("no usable GPU is left: the model runs on the CPU")
        return DevicePlan(flags=flags, cpu_only=True, notes=notes)
    if selection.user_variables:
        # The user's variable decides and llama.cpp spreads over what it leaves visible.
        return _plan(selection, list(selection.gpus), None, notes, usable)
    split = split_asked(config, options.get("split", False))
    if len(selection.gpus) == 1:
        return _plan(selection, list(selection.gpus), None, notes, usable)
    need_bytes = need() if need is not None else 0
    placement = place(need_bytes, selection.gpus, split=split)
    notes.append(placement.reason)
    flags: list[str] = []
    if placement.tensor_split and "--tensor-split" in known:
        flags = ["--tensor-split", ",".join(map(str, placement.tensor_split))]
    return _plan(selection, list(placement.gpus), flags, notes, usable)


def _plan(
    selection: Selection,
    chosen: list[GpuInfo],
    flags: list[str] | None,
    notes: list[str],
    usable: Sequence[GpuInfo],
) -> DevicePlan:
    env: dict[str, str] = {}
    if not selection.user_variables and len(chosen) < len(usable):
        env[VISIBILITY_VAR[selection.runtime]] = visibility_value(selection.runtime, chosen)
    free = [g.memory_free for g in chosen]
    return DevicePlan(
        env=env,
        flags=flags or [],
        gpus=tuple(chosen),
        free=sum(f for f in free if f is not None) if all(f is not None for f in free) else None,
        where=", ".join(g.stable_id or g.device_id for g in chosen),
        notes=notes,
    )


def _undetected(runtime: Runtime, config: LoadConfig, env: Mapping[str, str]) -> DevicePlan:
    """No GPU of the build's kind in sysfs/NVML: pins by index still work (with a
    warning), stable ids cannot be resolved."""
    if not config.devices:
        return DevicePlan()
    stable = [d for d in config.devices if not is_index_ref(d)]
    if stable:
        raise ConfigError(
            f"devices pins {', '.join(stable)}, but rocmux detects no "
            f"{'AMD' if runtime == 'hip' else 'NVIDIA'} GPU here to match them against"
        )
    notes = [
        f"devices {list(config.devices)} are enumeration indices and rocmux detects no GPU "
        "to check them against; they are passed on as they are"
    ]
    if any(env.get(v) is not None for v in VISIBILITY_VARIABLES):
        notes.append("a visibility variable is set in the environment: rocmux adds none")
        return DevicePlan(notes=notes)
    indices = ",".join(re.sub(r"^[A-Za-z]+", "", d.strip()) for d in config.devices)
    return DevicePlan(env={VISIBILITY_VAR[runtime]: indices}, notes=notes)


def device_need(model: Path, config: LoadConfig) -> int:
    """GPU bytes the model needs with every layer offloaded at the smallest context the
    memory fit would choose (the user's, else 2048 or the trained one if smaller), plus
    the fit's margin: what "fits on a GPU" means for placement. 0 when the model's
    shape cannot be estimated."""
    from rocmux.inventory import ModelInfo
    from rocmux.memory import DEFAULT_CONTEXT, DEFAULT_MARGIN, MIN_CONTEXT, fit

    try:
        info = ModelInfo.from_gguf(model)
        trained = info.context_length or DEFAULT_CONTEXT
        floor = min(MIN_CONTEXT, 1 << (trained.bit_length() - 1))
        requested = attrs.evolve(config, context_len=config.context_len or floor)
        result = fit(info, 1 << 62, margin=0, requested=requested)
    except (RocmuxError, OSError, ValueError, KeyError):
        return 0  # an unknown shape: place by free memory alone
    return result.estimate.device_total + DEFAULT_MARGIN
