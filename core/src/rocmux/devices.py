"""GPU detection and VRAM monitoring.

AMD GPUs come from the kernel's KFD topology and the amdgpu sysfs files, so no ROCm
user space is needed; ``amd-smi`` (or ``rocm-smi``) fills what sysfs lacks. NVIDIA GPUs
come from NVML (the optional ``nvidia-ml-py``), the CPU from ``/proc``. Every function
that reads the file system takes ``root`` so tests can point it at a recorded tree
(``tests/data/sysfs``). Nothing here does I/O at import time.

Kernel sources this module follows (see also ``tests/data/sysfs/README.md``):

- KFD node properties: drivers/gpu/drm/amd/amdkfd/kfd_topology.c, ``node_show()``
  https://github.com/torvalds/linux/blob/master/drivers/gpu/drm/amd/amdkfd/kfd_topology.c
- ``gfx_target_version`` values: drivers/gpu/drm/amd/amdkfd/kfd_device.c, ``kgd2kfd_probe()``
- amdgpu memory and product files: https://docs.kernel.org/gpu/amdgpu/driver-misc.html
- ``gpu_busy_percent``: https://docs.kernel.org/gpu/amdgpu/thermal.html

``ROCMUX_SYSFS_ROOT`` points every reader at a recorded tree (or a snapshot written by
``rocmux devices --snapshot``) instead of ``/``; see ``default_root``.

Device identity: a GPU is named by ``GpuInfo.stable_id`` (its PCI address), which
survives reboots and other GPUs coming and going; ``index`` is only the runtime's
ordinal today. ``select_gpus`` turns stable ids into the one visibility variable a
runtime gets, ``place`` picks the GPU(s) a model goes to.
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import attrs

from rocmux.errors import ConfigError
from rocmux.types import Device

Vendor = Literal["amd", "nvidia", "cpu"]

AMD_PCI_VENDOR = 0x1002  # KFD reports it in decimal: vendor_id 4098
KFD_NODES = Path("sys/class/kfd/kfd/topology/nodes")
DRM_CLASS = Path("sys/class/drm")
# libdrm's table of marketing names, by PCI device and revision id; ROCm ships its own copy.
AMDGPU_IDS = (
    Path("opt/amdgpu/share/libdrm/amdgpu.ids"),
    Path("usr/share/libdrm/amdgpu.ids"),
)
GENERIC_AMD_NAME = "AMD Radeon Graphics"  # what libdrm and ROCm show for an unlisted id
SMI_TIMEOUT = 10.0

# Variables that already restrict which GPUs a HIP program sees; the user's choice wins.
# https://rocm.docs.amd.com/projects/HIP/en/latest/reference/env_variables.html
VISIBILITY_VARIABLES = (
    "HIP_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "CUDA_VISIBLE_DEVICES",
    "GPU_DEVICE_ORDINAL",
)

# Integrated GPUs (APUs). The kernel's own flag (AMD_IS_APU) reaches user space only
# through the DRM ioctl AMDGPU_INFO_DEV_INFO (ids_flags & AMDGPU_IDS_FLAGS_FUSION), which
# is what ROCm's libhsakmt reads for HsaNodeProperties.Integrated (libhsakmt/src/
# topology.c, topology_get_node_props_from_drm). No sysfs file carries it, and opening a
# render node to ask would wake a runtime-suspended laptop dGPU, so this module decides
# from sysfs, in this order:
#
# 1. A KFD node with both CPU cores and SIMDs is what kfd_topology.c itself logs as an
#    "APU node" (kfd_debug_print_topology). Only older kernels build one (ACPI CRAT with
#    IOMMUv2); current kernels give every GPU, integrated or not, its own node with
#    cpu_cores_count 0, so this alone misses today's APUs.
# 2. The gfx target: these gfx_target_version values belong to APU silicon only. They
#    are the GC versions of the kernel's APU table
#    (https://github.com/torvalds/linux/blob/master/Documentation/gpu/amdgpu/apu-asic-info-table.csv)
#    mapped to gfx_target_version by kgd2kfd_probe() in amdkfd/kfd_device.c, plus chips
#    that amdgpu_drv.c registers with AMD_IS_APU (Kaveri, Carrizo, Cyan Skillfish) and
#    the 9.4.3 APU case of kgd2kfd_probe (90400).
# 3. For a target not in the table: dedicated VRAM of at most 1 GiB, the size of a BIOS
#    carve-out; no GPU that ROCm supports as discrete has that little.
#
# Not used: the node's ``local_mem_size``, which node_show() prints as a literal 0 for
# every GPU, and the capability bits (include/uapi/linux/kfd_sysfs.h), which have no
# APU bit (HSA_CAP_ATS_PRESENT followed IOMMUv2, now gone).
_APU_GFX_TARGET_VERSIONS = frozenset(
    {
        70000,  # Kaveri (gfx700)
        80001,  # Carrizo (gfx801)
        90002,  # Raven, Picasso, Raven2 (gfx902)
        90012,  # Renoir, Cezanne, Lucienne, Barcelo (gfx90c)
        90400,  # MI300A before rev 1 (gfx940)
        100103,  # Cyan Skillfish (gfx1013)
        100303,  # Van Gogh, Steam Deck (gfx1033)
        100305,  # Yellow Carp, Rembrandt (gfx1035)
        100306,  # Raphael, Dragon Range, Mendocino (gfx1036)
        110003,  # Phoenix, Hawk Point (gfx1103)
        110500,  # Strix Point (gfx1150)
        110501,  # Strix Halo (gfx1151)
        110502,  # Krackan Point (gfx1152)
    }
)
_CARVEOUT_MAX = 1 << 30

_BDF = re.compile(r"^(?:([0-9a-fA-F]+):)?([0-9a-fA-F]{2}):([0-9a-fA-F]{2})\.([0-7])$")
_UNIT_BYTES = {
    "B": 1,
    "KB": 1 << 10,
    "KIB": 1 << 10,
    "MB": 1 << 20,
    "MIB": 1 << 20,
    "GB": 1 << 30,
    "GIB": 1 << 30,
}


@attrs.frozen(kw_only=True)
class GpuInfo:
    """A compute device as detection found it.

    ``index`` is the ordinal the runtime gives the device when no ``*_VISIBLE_DEVICES``
    variable is set, i.e. the number to put in ``HIP_VISIBLE_DEVICES``; ``None`` when the
    runtime cannot use it (its render node is missing or not accessible) and for the CPU.
    For NVIDIA it is the NVML index, which is CUDA's ordinal only with
    ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` (CUDA's default order is fastest first).

    Memory is in bytes, ``None`` when unknown. ``memory_*`` is what the device can
    allocate: VRAM on a discrete GPU; on an integrated GPU the BIOS carve-out
    (``vram_total``) plus GTT, system RAM the GPU may map (``gtt_total``), with the free
    GTT capped by the RAM still available; system RAM for the CPU.

    ``pci_bus`` ("0000:03:00.0") and ``unique_id`` ("GPU-<16 hex>", the form ROCm's
    tools print and ``ROCR_VISIBLE_DEVICES`` accepts; NVML's UUID for NVIDIA) stay the
    same across boots, unlike ``index``; ``stable_id`` is the one rocmux names a GPU by.
    ``hive_id`` is KFD's XGMI hive: GPUs with the same non-zero value are joined by XGMI
    (``kfd_topology_add_device`` copies ``adev->gmc.xgmi.hive_id``).
    """

    index: int | None
    vendor: Vendor
    name: str
    gfx_target: str | None = None
    integrated: bool = False
    memory_total: int | None = None
    memory_used: int | None = None
    memory_free: int | None = None
    vram_total: int | None = None
    gtt_total: int | None = None
    busy_percent: int | None = None
    compute_units: int | None = None
    simd_count: int | None = None
    pci_bus: str | None = None
    unique_id: str | None = None
    kfd_node: int | None = None
    drm_render_minor: int | None = None
    hive_id: int | None = None

    @property
    def stable_id(self) -> str | None:
        """The PCI address, else the unique id: what config pins and labels use.

        The PCI address comes first because every GPU has one (KFD's ``location_id``
        and ``domain``, or the sysfs ``device`` link) while amdgpu's ``unique_id`` exists
        only where the SMU reports a serial (driver-misc.rst); it changes only when the
        card moves to another slot.
        """
        if self.vendor == "cpu":
            return None
        return self.pci_bus or self.unique_id

    @property
    def device_id(self) -> str:
        """The id llama.cpp-style runtimes use: ``ROCm0``, ``CUDA1``, ``CPU``."""
        if self.vendor == "cpu":
            return "CPU"
        prefix = "ROCm" if self.vendor == "amd" else "CUDA"
        if self.index is None:
            return f"{prefix}:{self.pci_bus or self.name}"
        return f"{prefix}{self.index}"

    def to_device(self) -> Device:
        """This device as ``rocmux.types.Device``."""
        kind: Literal["rocm", "cuda", "cpu"] = (
            "rocm" if self.vendor == "amd" else "cuda" if self.vendor == "nvidia" else "cpu"
        )
        return Device(
            id=self.device_id,
            name=self.name,
            kind=kind,
            memory_total=self.memory_total,
            memory_free=self.memory_free,
        )


@attrs.frozen(kw_only=True)
class SmiRecord:
    """What ``amd-smi`` or ``rocm-smi`` reports for one GPU, keyed by PCI bus."""

    pci_bus: str
    name: str | None = None
    gfx_target: str | None = None
    compute_units: int | None = None
    memory_total: int | None = None
    memory_used: int | None = None
    busy_percent: int | None = None


# ---------------------------------------------------------------- root and recording

ROOT_ENV = "ROCMUX_SYSFS_ROOT"


@attrs.define
class _Recorder:
    """What detection read under ``root``, for ``rocmux devices --snapshot``."""

    root: Path
    files: dict[str, str] = attrs.field(factory=dict)
    links: dict[str, str] = attrs.field(factory=dict)
    render_nodes: dict[str, bool] = attrs.field(factory=dict)

    def rel(self, path: Path) -> str | None:
        try:
            return Path(path).relative_to(self.root).as_posix()
        except ValueError:
            return None


_RECORDER: contextvars.ContextVar[_Recorder | None] = contextvars.ContextVar(
    "rocmux_sysfs_recorder", default=None
)
_loaded_snapshots: dict[tuple[str, int], Path] = {}


def default_root(env: Mapping[str, str] | None = None) -> Path:
    """``$ROCMUX_SYSFS_ROOT`` (a recorded tree, or a snapshot JSON file), else ``/``.

    A snapshot file is unpacked once per process into a temporary folder.
    """
    value = (os.environ if env is None else env).get(ROOT_ENV)
    if not value:
        return Path("/")
    path = Path(value).expanduser()
    if not path.is_file():
        return path
    key = (str(path.resolve()), path.stat().st_mtime_ns)
    if key not in _loaded_snapshots:
        dest = Path(tempfile.mkdtemp(prefix="rocmux-snapshot-"))
        atexit.register(shutil.rmtree, dest, True)
        _loaded_snapshots[key] = load_snapshot(path, dest)
    return _loaded_snapshots[key]


def _root(root: Path | None) -> Path:
    return default_root() if root is None else Path(root)


# ---------------------------------------------------------------- small readers


def _read_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    recorder = _RECORDER.get()
    if recorder is not None:
        rel = recorder.rel(path)
        if rel is not None:
            recorder.files[rel] = text
    return text.strip()


def _parse_int(text: str | None) -> int | None:
    if not text:
        return None
    try:
        return int(text, 16) if text.lower().startswith("0x") else int(text)
    except ValueError:
        return None


def _read_int(path: Path) -> int | None:
    return _parse_int(_read_text(path))


def _is_live(root: Path) -> bool:
    return Path(root) == Path("/")


def _record_link(device: Path) -> None:
    """Remember where a sysfs ``device`` link points (the PCI device folder)."""
    recorder = _RECORDER.get()
    if recorder is None:
        return
    rel = recorder.rel(device)
    try:
        target = device.resolve()
        target_rel = target.relative_to(recorder.root.resolve()).as_posix()
    except (OSError, ValueError):
        return
    if rel is not None and target_rel != rel:
        recorder.links[rel] = target_rel


def parse_kfd_properties(text: str) -> dict[str, int]:
    """The ``name value`` lines of a KFD ``properties`` file (non-integers skipped)."""
    props: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        number = _parse_int(value.strip())
        if key and number is not None:
            props[key] = number
    return props


def gfx_target_name(version: int | None) -> str | None:
    """``gfx_target_version`` to an LLVM target: 110000 -> gfx1100, 90012 -> gfx90c."""
    if not version or version <= 0:
        return None
    major, minor, step = version // 10000, (version // 100) % 100, version % 100
    return f"gfx{major}{minor:x}{step:x}"


def normalize_pci_bus(text: str | None) -> str | None:
    """``0000:03:00.0`` from forms like ``03:00.0`` or NVML's ``00000000:03:00.0``."""
    if not text:
        return None
    match = _BDF.match(text.strip())
    if match is None:
        return None
    domain, bus, dev, fn = match.groups()
    return f"{int(domain or '0', 16):04x}:{bus.lower()}:{dev.lower()}.{fn}"


def read_meminfo(root: Path | None = None) -> dict[str, int]:
    """``/proc/meminfo`` in bytes (the file counts kB)."""
    text = _read_text(_root(root) / "proc/meminfo") or ""
    info: dict[str, int] = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        fields = rest.split()
        if fields and fields[0].isdigit():
            scale = 1024 if len(fields) > 1 and fields[1] == "kB" else 1
            info[key.strip()] = int(fields[0]) * scale
    return info


def parse_amdgpu_ids(text: str) -> dict[tuple[int, int], str]:
    """libdrm's ``amdgpu.ids``: ``{(device id, revision): marketing name}``.

    Like libdrm, the first line for a (device, revision) pair wins and there is no
    fallback to another revision: the same device id names different products.
    """
    names: dict[tuple[int, int], str] = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split(",", 2)
        if len(parts) != 3:
            continue  # the version line ("1.0.0")
        try:
            key = (int(parts[0].strip(), 16), int(parts[1].strip(), 16))
        except ValueError:
            continue
        names.setdefault(key, parts[2].strip())
    return names


def _amdgpu_ids_file(root: Path) -> Path | None:
    for rel in AMDGPU_IDS:
        path = Path(root) / rel
        if path.is_file():
            return path
    return None


# ---------------------------------------------------------------- AMD via sysfs


def _render_node_usable(root: Path, minor: int | None) -> bool:
    """Whether the runtime could open ``/dev/dri/renderD<minor>``.

    libhsakmt skips GPU nodes whose render node it cannot open (topology.c,
    topology_sysfs_check_node_supported), so they get no HIP ordinal. A recorded tree
    without ``dev/dri`` counts every GPU as usable.
    """
    dri = Path(root) / "dev/dri"
    if not _is_live(root) and not dri.is_dir():
        return True
    if not minor:
        return False
    usable = os.access(dri / f"renderD{minor}", os.R_OK | os.W_OK)
    recorder = _RECORDER.get()
    if recorder is not None:
        recorder.render_nodes[str(minor)] = usable
    return usable


def _amd_memory(
    device: Path | None, integrated: bool, meminfo: Mapping[str, int]
) -> tuple[int | None, int | None, int | None, int | None, int | None]:
    """(total, used, free, vram_total, gtt_total) from the amdgpu ``mem_info_*`` files."""
    if device is None:
        return None, None, None, None, None
    vram_total = _read_int(device / "mem_info_vram_total")
    vram_used = _read_int(device / "mem_info_vram_used")
    gtt_total = _read_int(device / "mem_info_gtt_total")
    gtt_used = _read_int(device / "mem_info_gtt_used")
    vram_free = None if vram_total is None or vram_used is None else vram_total - vram_used
    if (
        not integrated
        or vram_total is None
        or vram_used is None
        or vram_free is None
        or gtt_total is None
        or gtt_used is None
    ):
        return vram_total, vram_used, vram_free, vram_total, gtt_total
    # GTT pages are ordinary RAM: the GPU can take more only while the system has them.
    gtt_free = gtt_total - gtt_used
    if "MemAvailable" in meminfo:
        gtt_free = min(gtt_free, meminfo["MemAvailable"])
    total = vram_total + gtt_total
    return total, vram_used + gtt_used, vram_free + gtt_free, vram_total, gtt_total


def _is_integrated(props: Mapping[str, int], vram_total: int | None) -> bool:
    """Integrated GPU or not; the comment at ``_APU_GFX_TARGET_VERSIONS`` says why."""
    if props.get("cpu_cores_count", 0) > 0 and props.get("simd_count", 0) > 0:
        return True
    version = props.get("gfx_target_version", 0)
    if version in _APU_GFX_TARGET_VERSIONS:
        return True
    return vram_total is not None and 0 < vram_total <= _CARVEOUT_MAX


def _kfd_pci_bus(props: Mapping[str, int], device: Path | None) -> str | None:
    # location_id is pci_dev_id(): bus << 8 | devfn (kfd_topology_add_device).
    location = props.get("location_id")
    if location:
        domain = props.get("domain", 0)
        bus, slot, fn = (location >> 8) & 0xFF, (location >> 3) & 0x1F, location & 0x7
        return f"{domain:04x}:{bus:02x}:{slot:02x}.{fn}"
    if device is not None:
        try:
            return normalize_pci_bus(device.resolve().name)
        except OSError:
            return None
    return None


def _amd_unique_id(props: Mapping[str, int], device: Path | None) -> str | None:
    uid = props.get("unique_id")
    if not uid and device is not None:
        # amdgpu's own unique_id file holds the same number in hex (driver-misc.rst).
        uid = _parse_int("0x" + (_read_text(device / "unique_id") or "").removeprefix("0x"))
    return f"GPU-{uid:016x}" if uid else None


def _amd_name(
    props: Mapping[str, int], device: Path | None, ids: Callable[[], Mapping[tuple[int, int], str]]
) -> str:
    if device is not None:
        # product_name comes from the board's FRU EEPROM; most consumer boards have none.
        product = _read_text(device / "product_name")
        if product:
            return product
        revision = _read_int(device / "revision")
        device_id = props.get("device_id") or _read_int(device / "device")
        if device_id is not None and revision is not None:
            name = ids().get((device_id, revision))
            if name:
                return name
    return GENERIC_AMD_NAME


def amd_gpus(root: Path | None = None) -> list[GpuInfo]:
    """AMD GPUs of the KFD topology, in node order (the order HIP numbers them)."""
    root = _root(root)
    try:
        nodes = sorted(
            (p for p in (root / KFD_NODES).iterdir() if p.name.isdigit()),
            key=lambda p: int(p.name),
        )
    except OSError:
        return []
    meminfo = read_meminfo(root)
    ids_cache: list[Mapping[tuple[int, int], str]] = []

    def ids() -> Mapping[tuple[int, int], str]:
        if not ids_cache:
            path = _amdgpu_ids_file(root)
            ids_cache.append(parse_amdgpu_ids(_read_text(path) or "") if path else {})
        return ids_cache[0]

    gpus: list[GpuInfo] = []
    ordinal = 0
    for node in nodes:
        text = _read_text(node / "properties")
        if text is None:
            continue  # unreadable (a device cgroup): the runtime skips it too
        props = parse_kfd_properties(text)
        gpu_id = _read_int(node / "gpu_id")
        # libhsakmt tells GPU nodes by a non-zero gpu_id; CPU nodes have no SIMDs.
        is_gpu = gpu_id != 0 if gpu_id is not None else props.get("simd_count", 0) > 0
        if not is_gpu:
            continue
        vendor_id = props.get("vendor_id")
        if vendor_id is not None and vendor_id != AMD_PCI_VENDOR:
            continue
        minor = props.get("drm_render_minor") or None
        device = root / DRM_CLASS / f"renderD{minor}" / "device" if minor else None
        if device is not None:
            _record_link(device)
        index: int | None = None
        if _render_node_usable(root, minor):
            index, ordinal = ordinal, ordinal + 1
        vram_total = _read_int(device / "mem_info_vram_total") if device else None
        integrated = _is_integrated(props, vram_total)
        total, used, free, vram_total, gtt_total = _amd_memory(device, integrated, meminfo)
        simds = props.get("simd_count") or None
        per_cu = props.get("simd_per_cu") or None
        gpus.append(
            GpuInfo(
                index=index,
                vendor="amd",
                name=_amd_name(props, device, ids),
                gfx_target=gfx_target_name(props.get("gfx_target_version")),
                integrated=integrated,
                memory_total=total,
                memory_used=used,
                memory_free=free,
                vram_total=vram_total,
                gtt_total=gtt_total,
                busy_percent=_read_int(device / "gpu_busy_percent") if device else None,
                compute_units=simds // per_cu if simds and per_cu else None,
                simd_count=simds,
                pci_bus=_kfd_pci_bus(props, device),
                unique_id=_amd_unique_id(props, device),
                kfd_node=int(node.name),
                drm_render_minor=minor,
                hive_id=props.get("hive_id") or None,
            )
        )
    return gpus


# ---------------------------------------------------------------- amd-smi / rocm-smi


def _smi_number(value: Any) -> float | None:
    """A number from amd-smi JSON: ``5``, ``"5 %"`` or ``{"value": 5, "unit": "%"}``."""
    if isinstance(value, Mapping):
        value = value.get("value")
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        match = re.match(r"\s*(-?\d+(?:\.\d+)?)", value)
        return float(match.group(1)) if match else None
    return None


def _smi_bytes(value: Any, default_unit: str = "MB") -> int | None:
    # amd-smi's "MB" is MiB: amdsmi_commands.py divides byte counts by 1024 * 1024.
    number = _smi_number(value)
    if number is None:
        return None
    unit = default_unit
    if isinstance(value, Mapping) and isinstance(value.get("unit"), str):
        unit = value["unit"]
    elif isinstance(value, str) and value.split()[1:]:
        unit = value.split()[1]
    return int(number * _UNIT_BYTES.get(unit.upper(), 1 << 20))


def _smi_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    value = value.strip()
    return None if not value or value.upper() == "N/A" else value


def _smi_entries(text: str | None) -> list[Mapping[str, Any]]:
    """The per-GPU objects of amd-smi JSON: a bare list, or ``{"gpu_data": [...]}``
    as newer releases print it."""
    if not text:
        return []
    start = min((i for i in (text.find("["), text.find("{")) if i >= 0), default=-1)
    if start < 0:
        return []
    try:
        data = json.loads(text[start:])
    except ValueError:
        return []
    if isinstance(data, Mapping):
        data = data.get("gpu_data", [data])
    if not isinstance(data, list):
        return []
    return [entry for entry in data if isinstance(entry, Mapping)]


def parse_amd_smi(static_json: str, metric_json: str | None = None) -> dict[str, SmiRecord]:
    """``amd-smi static --json`` (plus, optionally, ``amd-smi metric --json``) by PCI bus.

    amd-smi numbers GPUs its own way, so the metric entries are matched to the static
    ones by their ``gpu`` field and everything is keyed by the static ``bus.bdf``.
    """
    metrics = {entry.get("gpu"): entry for entry in _smi_entries(metric_json) if "gpu" in entry}
    records: dict[str, SmiRecord] = {}
    for entry in _smi_entries(static_json):
        bus = entry.get("bus")
        bdf = normalize_pci_bus(_smi_text(bus.get("bdf")) if isinstance(bus, Mapping) else None)
        if bdf is None:
            continue
        asic = entry.get("asic") if isinstance(entry.get("asic"), Mapping) else {}
        vram = entry.get("vram") if isinstance(entry.get("vram"), Mapping) else {}
        metric = metrics.get(entry.get("gpu"), {})
        usage = metric.get("mem_usage") if isinstance(metric.get("mem_usage"), Mapping) else {}
        load = metric.get("usage") if isinstance(metric.get("usage"), Mapping) else {}
        cus = _smi_number(asic.get("num_compute_units"))
        busy = _smi_number(load.get("gfx_activity"))
        gfx = _smi_text(asic.get("target_graphics_version"))
        records[bdf] = SmiRecord(
            pci_bus=bdf,
            name=_smi_text(asic.get("market_name")),
            gfx_target=gfx if gfx and gfx.startswith("gfx") else None,
            compute_units=int(cus) if cus else None,
            memory_total=_smi_bytes(usage.get("total_vram")) or _smi_bytes(vram.get("size")),
            memory_used=_smi_bytes(usage.get("used_vram")),
            busy_percent=int(busy) if busy is not None else None,
        )
    return records


def parse_rocm_smi(text: str) -> dict[str, SmiRecord]:
    """``rocm-smi --showmeminfo vram --showbus --json`` by PCI bus."""
    try:
        data = json.loads(text[text.find("{") :]) if "{" in text else {}
    except ValueError:
        return {}
    records: dict[str, SmiRecord] = {}
    for card, fields in data.items() if isinstance(data, Mapping) else ():
        if not str(card).startswith("card") or not isinstance(fields, Mapping):
            continue
        bdf = normalize_pci_bus(_smi_text(fields.get("PCI Bus")))
        if bdf is None:
            continue
        records[bdf] = SmiRecord(
            pci_bus=bdf,
            memory_total=_smi_bytes(fields.get("VRAM Total Memory (B)"), "B"),
            memory_used=_smi_bytes(fields.get("VRAM Total Used Memory (B)"), "B"),
        )
    return records


def _run_tool(argv: Sequence[str], timeout: float) -> str | None:
    """Stdout of a tool, or ``None`` if it is missing, fails to start or times out."""
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group, so a timeout can end it all
        )
    except OSError:
        return None
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Killing only the tool could leave a child holding the pipe open.
        with contextlib.suppress(OSError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        return None
    # amd-smi may exit non-zero after printing what it could read; keep that output.
    text = out.decode("utf-8", "replace")
    return text if text.strip() else None


def smi_records(timeout: float = SMI_TIMEOUT) -> dict[str, SmiRecord]:
    """What ``amd-smi`` (preferred) or ``rocm-smi`` reports here, by PCI bus."""
    exe = shutil.which("amd-smi")
    if exe:
        static = _run_tool([exe, "static", "--asic", "--bus", "--vram", "--json"], timeout)
        if static:
            metric = _run_tool([exe, "metric", "--mem-usage", "--usage", "--json"], timeout)
            records = parse_amd_smi(static, metric)
            if records:
                return records
    exe = shutil.which("rocm-smi")
    if exe:
        out = _run_tool([exe, "--showmeminfo", "vram", "--showbus", "--json"], timeout)
        if out:
            return parse_rocm_smi(out)
    return {}


def apply_smi(gpus: Iterable[GpuInfo], records: Mapping[str, SmiRecord]) -> list[GpuInfo]:
    """Fill what sysfs left unknown (and the generic name) from SMI records."""
    filled: list[GpuInfo] = []
    for gpu in gpus:
        rec = records.get(gpu.pci_bus or "") if gpu.vendor == "amd" else None
        if rec is None:
            filled.append(gpu)
            continue
        changes: dict[str, Any] = {}
        if gpu.name == GENERIC_AMD_NAME and rec.name:
            changes["name"] = rec.name
        if gpu.memory_total is None and rec.memory_total is not None:
            changes["memory_total"] = changes["vram_total"] = rec.memory_total
            if rec.memory_used is not None:
                changes["memory_used"] = rec.memory_used
                changes["memory_free"] = rec.memory_total - rec.memory_used
        for field in ("gfx_target", "compute_units", "busy_percent"):
            if getattr(gpu, field) is None and getattr(rec, field) is not None:
                changes[field] = getattr(rec, field)
        filled.append(attrs.evolve(gpu, **changes) if changes else gpu)
    return filled


# ---------------------------------------------------------------- NVIDIA via NVML


def _call(fn: Callable[..., Any], *args: Any) -> Any:
    # NVML raises NVMLError_NotSupported for many queries on some boards (e.g. no
    # utilization counters); one missing value must not hide the GPU.
    try:
        return fn(*args)
    except Exception:
        return None


def _str(value: Any) -> str | None:
    if isinstance(value, bytes):  # older nvidia-ml-py returns bytes
        value = value.decode("utf-8", "replace")
    return value if isinstance(value, str) and value else None


def _nvml_gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    mem = _call(nvml.nvmlDeviceGetMemoryInfo, handle)
    util = _call(nvml.nvmlDeviceGetUtilizationRates, handle)
    pci = _call(nvml.nvmlDeviceGetPciInfo, handle)
    total = getattr(mem, "total", None)
    return GpuInfo(
        index=index,
        vendor="nvidia",
        name=_str(_call(nvml.nvmlDeviceGetName, handle)) or "NVIDIA GPU",
        memory_total=total,
        memory_used=getattr(mem, "used", None),
        memory_free=getattr(mem, "free", None),
        vram_total=total,
        busy_percent=getattr(util, "gpu", None),
        pci_bus=normalize_pci_bus(_str(getattr(pci, "busId", None))),
        unique_id=_str(_call(nvml.nvmlDeviceGetUUID, handle)),
    )


def nvidia_gpus() -> list[GpuInfo]:
    """NVIDIA GPUs through NVML; ``[]`` without ``nvidia-ml-py`` or a driver."""
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except Exception:
        return []  # no driver (NVMLError_LibraryNotFound, _DriverNotLoaded, ...)
    try:
        count = _call(pynvml.nvmlDeviceGetCount) or 0
        gpus = []
        for i in range(count):
            gpu = _call(_nvml_gpu, pynvml, i)
            if gpu is not None:
                gpus.append(gpu)
        return gpus
    finally:
        _call(pynvml.nvmlShutdown)


def _nvml_memory(gpu: GpuInfo) -> tuple[int | None, int | None]:
    try:
        import pynvml
    except ImportError:
        return None, None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None, None
    try:
        handle = None
        if gpu.unique_id:
            handle = _call(pynvml.nvmlDeviceGetHandleByUUID, gpu.unique_id)
        if handle is None and gpu.index is not None:
            handle = _call(pynvml.nvmlDeviceGetHandleByIndex, gpu.index)
        mem = _call(pynvml.nvmlDeviceGetMemoryInfo, handle) if handle is not None else None
        return getattr(mem, "used", None), getattr(mem, "free", None)
    finally:
        _call(pynvml.nvmlShutdown)


# ---------------------------------------------------------------- CPU


def _cpu_count() -> int | None:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may run on
    except (AttributeError, OSError):
        return os.cpu_count()


def _cpu_name(root: Path) -> str:
    for line in (_read_text(Path(root) / "proc/cpuinfo") or "").splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware") and value.strip():
            return value.strip()
    return platform.processor() or platform.machine() or "CPU"


def cpu_info(root: Path | None = None) -> GpuInfo:
    """The CPU as a device: system RAM from ``root``'s ``/proc/meminfo``
    (``MemAvailable`` counts as free) and the CPUs this process may run on."""
    root = _root(root)
    meminfo = read_meminfo(root)
    total, available = meminfo.get("MemTotal"), meminfo.get("MemAvailable")
    return GpuInfo(
        index=None,
        vendor="cpu",
        name=_cpu_name(root),
        memory_total=total,
        memory_used=total - available if total is not None and available is not None else None,
        memory_free=available,
        compute_units=_cpu_count(),
    )


# ---------------------------------------------------------------- public entry points


def detect_gpus(root: Path | None = None, *, smi: bool = True) -> list[GpuInfo]:
    """AMD GPUs (KFD order) then NVIDIA GPUs (NVML order).

    ``root`` defaults to ``default_root()``. SMI tools and NVML describe the running
    system, so they are asked only when ``root`` is ``/``; ``amd-smi`` runs only if
    sysfs left a memory size unknown, or a name generic with no ``amdgpu.ids`` to look
    it up in.
    """
    root = _root(root)
    gpus = amd_gpus(root)
    if not _is_live(root):
        return gpus
    if smi and any(
        g.memory_total is None or (g.name == GENERIC_AMD_NAME and _amdgpu_ids_file(root) is None)
        for g in gpus
    ):
        gpus = apply_smi(gpus, smi_records())
    return gpus + nvidia_gpus()


def memory_now(gpu: GpuInfo, root: Path | None = None) -> tuple[int | None, int | None]:
    """(used, free) in bytes, read again now: for watching VRAM while a model loads."""
    root = _root(root)
    if gpu.vendor == "cpu":
        refreshed = cpu_info(root)
        return refreshed.memory_used, refreshed.memory_free
    if gpu.vendor == "nvidia":
        return _nvml_memory(gpu)
    if not gpu.drm_render_minor:
        return None, None
    device = Path(root) / DRM_CLASS / f"renderD{gpu.drm_render_minor}" / "device"
    meminfo = read_meminfo(root) if gpu.integrated else {}
    _, used, free, _, _ = _amd_memory(device, gpu.integrated, meminfo)
    return used, free


def default_visible_devices(
    gpus: Sequence[GpuInfo], env: Mapping[str, str] | None = None
) -> str | None:
    """The ``HIP_VISIBLE_DEVICES`` value rocmux gives a HIP runtime when the config pins
    nothing: integrated GPUs left out beside a discrete one (an RX 7800 XT beside a
    Ryzen iGPU: the iGPU would otherwise take a share of the layers at a fraction of
    the speed), and GPUs whose gfx target ROCm does not support.

    ``None`` (no restriction) when nothing is left out (a Strix Halo APU alone, where
    the iGPU has most of the memory) or when the user already set one of
    ``VISIBILITY_VARIABLES``. See ``select_gpus``.
    """
    return select_gpus(gpus, runtime="hip", env=env).env.get("HIP_VISIBLE_DEVICES")


# ---------------------------------------------------------------- stable ids


_INDEX_REF = re.compile(r"^(?:(?:rocm|hip|cuda|gpu)\s*)?(\d+)$", re.IGNORECASE)
_UUID_REF = re.compile(r"^(?:GPU|MIG)-[0-9a-fA-F-]+$")


def is_index_ref(text: str) -> bool:
    """Whether a ``devices`` entry is an enumeration index (``1``, ``ROCm1``)."""
    return _INDEX_REF.match(text.strip()) is not None


def describe_gpu(gpu: GpuInfo) -> str:
    """``0000:03:00.0 (AMD Radeon RX 7800 XT, gfx1101)``: a GPU for messages."""
    details = ", ".join(x for x in (gpu.name, gpu.gfx_target) if x)
    return f"{gpu.stable_id or gpu.device_id} ({details})"


def _known_ids(gpus: Sequence[GpuInfo]) -> str:
    return "; ".join(describe_gpu(g) for g in gpus) or "none detected"


def find_gpu(ref: str, gpus: Sequence[GpuInfo]) -> GpuInfo | None:
    """The GPU a ``devices`` entry names: a PCI address (``0000:03:00.0``, ``03:00.0``),
    a unique id (``GPU-4f8a2c1d9b3e7a05``, NVIDIA's ``GPU-<uuid>``) or, discouraged, an
    index (``1``, ``ROCm1``: the runtime's ordinal now, which changes when GPUs are
    added, removed or fail to open)."""
    text = ref.strip()
    bus = normalize_pci_bus(text)
    if bus is not None:
        return next((g for g in gpus if g.pci_bus == bus), None)
    if _UUID_REF.match(text):
        return next((g for g in gpus if (g.unique_id or "").lower() == text.lower()), None)
    match = _INDEX_REF.match(text)
    if match is not None:
        return next((g for g in gpus if g.index == int(match[1])), None)
    return None


def resolve_devices(
    refs: Sequence[str], gpus: Sequence[GpuInfo]
) -> tuple[list[GpuInfo], list[str]]:
    """The GPUs ``refs`` name, in HIP order, and warnings for entries given by index.

    ``ConfigError`` names the stable ids to use when an entry matches no GPU or two
    entries name the same GPU.
    """
    chosen: list[GpuInfo] = []
    warnings: list[str] = []
    for ref in refs:
        gpu = find_gpu(ref, gpus)
        if gpu is None:
            raise ConfigError(
                f"devices entry {ref!r} matches no usable GPU; name GPUs by PCI address or "
                f"unique id, as `rocmux devices` lists them: {_known_ids(gpus)}"
            )
        if gpu in chosen:
            raise ConfigError(f"devices names {describe_gpu(gpu)} twice: {list(refs)}")
        if is_index_ref(ref):
            warnings.append(
                f"devices entry {ref!r} is an enumeration index, which changes when GPUs are "
                f"added, removed or reordered; it means {describe_gpu(gpu)} now: write "
                f'"{gpu.stable_id}" instead'
            )
        chosen.append(gpu)
    chosen.sort(key=lambda g: (g.index is None, g.index or 0))
    return chosen, warnings


# ---------------------------------------------------------------- gfx targets

# LLVM targets ROCm supports on Linux: the "GPU / LLVM target" rows of the ROCm 7.1
# compatibility matrix (gfx950, gfx1201, gfx1200, gfx1101, gfx1100, gfx1030, gfx942,
# gfx90a, gfx908; https://rocm.docs.amd.com/en/latest/compatibility/compatibility-matrix.html
# and https://rocm.docs.amd.com/projects/install-on-linux/en/latest/reference/system-requirements.html)
# plus the Ryzen AI Max APUs (gfx1151) of "Use ROCm on Radeon and Ryzen"
# (https://rocm.docs.amd.com/projects/radeon-ryzen/en/latest/). A GPU outside the list
# may still work (ROCm's libraries ship code for more targets than AMD supports): add
# its target to ``[devices] extra_targets`` or set HSA_OVERRIDE_GFX_VERSION.
ROCM_SUPPORTED_TARGETS = frozenset(
    {
        "gfx908",
        "gfx90a",
        "gfx942",
        "gfx950",
        "gfx1030",
        "gfx1100",
        "gfx1101",
        "gfx1151",
        "gfx1200",
        "gfx1201",
    }
)

# LLVM's generic targets and the processors their code objects run on (AMDGPUUsage,
# "AMDGPU Generic Processors": https://llvm.org/docs/AMDGPUUsage.html#amdgpu-generic-processor-table).
GENERIC_TARGETS: Mapping[str, frozenset[str]] = {
    "gfx9-generic": frozenset({"gfx900", "gfx902", "gfx904", "gfx906", "gfx909", "gfx90c"}),
    "gfx9-4-generic": frozenset({"gfx940", "gfx941", "gfx942", "gfx950"}),
    "gfx10-1-generic": frozenset({"gfx1010", "gfx1011", "gfx1012", "gfx1013"}),
    "gfx10-3-generic": frozenset(
        {"gfx1030", "gfx1031", "gfx1032", "gfx1033", "gfx1034", "gfx1035", "gfx1036"}
    ),
    "gfx11-generic": frozenset(
        {"gfx1100", "gfx1101", "gfx1102", "gfx1103", "gfx1150", "gfx1151", "gfx1152", "gfx1153"}
    ),
    "gfx12-generic": frozenset({"gfx1200", "gfx1201"}),
}

# Makes ROCr report every GPU as this version, so code objects built for it load on
# GPUs it was not built for (ROCm environment variables, ROCR-Runtime:
# https://rocm.docs.amd.com/en/latest/reference/env-variables.html).
OVERRIDE_GFX_VAR = "HSA_OVERRIDE_GFX_VERSION"


def base_target(target: str) -> str:
    """``gfx942:sramecc+:xnack-`` -> ``gfx942`` (target id features dropped)."""
    return target.strip().split(":", 1)[0].lower()


def target_covered(target: str, targets: Collection[str]) -> bool:
    """Whether code for ``targets`` (plain or generic) runs on ``target``."""
    target = base_target(target)
    for built in targets:
        built = base_target(built)
        if built == target or target in GENERIC_TARGETS.get(built, ()):
            return True
    return False


def unsupported_reason(
    gpu: GpuInfo,
    *,
    build_targets: Collection[str] | None = None,
    rocm_targets: Collection[str] | None = ROCM_SUPPORTED_TARGETS,
    env: Mapping[str, str] | None = None,
) -> str | None:
    """Why the runtime would fail on ``gpu`` ("invalid device function"), or ``None``.

    ``build_targets``: the gfx targets the runtime was built for (``None``: unknown, not
    checked). ``rocm_targets``: what ROCm supports (``None``: not checked). Neither
    is checked when ``HSA_OVERRIDE_GFX_VERSION`` is set, nor for non-AMD devices.
    """
    env = os.environ if env is None else env
    if gpu.vendor != "amd" or env.get(OVERRIDE_GFX_VAR):
        return None
    if gpu.gfx_target is None:
        return None  # unknown target: nothing to check against
    override = f"set {OVERRIDE_GFX_VAR} to run it anyway"
    if build_targets is not None and not target_covered(gpu.gfx_target, build_targets):
        built = ", ".join(sorted(base_target(t) for t in build_targets)) or "none"
        return f"the runtime was not built for {gpu.gfx_target} (built for {built}); {override}"
    if rocm_targets is not None and not target_covered(gpu.gfx_target, rocm_targets):
        return (
            f"ROCm does not support {gpu.gfx_target}; {override}, or add it to "
            "[devices] extra_targets in rocmux.toml"
        )
    return None


# ---------------------------------------------------------------- visibility

Runtime = Literal["hip", "cuda"]

# The one variable rocmux sets per runtime. HIP numbers the GPUs ROCr exposes (KFD node
# order, skipping nodes whose render node cannot be opened); ROCR_VISIBLE_DEVICES
# filters ROCr first and HIP_VISIBLE_DEVICES then indexes what is left, so the two
# compose and renumber (GPU isolation techniques:
# https://rocm.docs.amd.com/en/latest/conceptual/gpu-isolation.html; PyTorch's handling
# of both: https://github.com/pytorch/pytorch/pull/142292). rocmux never sets
# ROCR_VISIBLE_DEVICES. CUDA_VISIBLE_DEVICES takes UUIDs, which do not depend on
# CUDA_DEVICE_ORDER (https://docs.nvidia.com/cuda/cuda-c-programming-guide/#env-vars).
VISIBILITY_VAR: Mapping[Runtime, str] = {
    "hip": "HIP_VISIBLE_DEVICES",
    "cuda": "CUDA_VISIBLE_DEVICES",
}
_RUNTIME_VENDOR: Mapping[Runtime, Vendor] = {"hip": "amd", "cuda": "nvidia"}
# What each user-set variable filters, for a runtime: ROCr's list first, then HIP's.
_USER_VARS: Mapping[Runtime, tuple[str, ...]] = {
    "hip": (
        "ROCR_VISIBLE_DEVICES",
        "HIP_VISIBLE_DEVICES",
        "CUDA_VISIBLE_DEVICES",
        "GPU_DEVICE_ORDINAL",
    ),
    "cuda": ("CUDA_VISIBLE_DEVICES",),
}


@attrs.frozen(kw_only=True)
class Selection:
    """The GPUs a runtime may use, the environment that limits it to them, and why the
    others are left out.

    ``env`` holds at most one variable, and none when the user's environment already
    has one (``user_variables``): two would compose and renumber the GPUs.
    """

    runtime: Runtime
    gpus: tuple[GpuInfo, ...]
    left_out: tuple[tuple[GpuInfo, str], ...] = ()
    env: Mapping[str, str] = attrs.field(factory=dict)
    notes: tuple[str, ...] = ()
    user_variables: Mapping[str, str] = attrs.field(factory=dict)

    def reason_for(self, gpu: GpuInfo) -> str | None:
        """Why ``gpu`` is left out, ``None`` when it is used."""
        return next((why for g, why in self.left_out if g == gpu), None)


def _split(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def user_visible(
    gpus: Sequence[GpuInfo], runtime: Runtime, env: Mapping[str, str]
) -> list[GpuInfo] | None:
    """The GPUs the user's own visibility variables leave the runtime, in its order;
    ``None`` when a value cannot be followed (a token that names no GPU).

    For HIP, ROCR_VISIBLE_DEVICES (indices or UUIDs) filters first, in the order it
    lists; HIP_VISIBLE_DEVICES (else CUDA_VISIBLE_DEVICES, which HIP also reads) and
    GPU_DEVICE_ORDINAL index what is left.
    """
    order = [g for g in gpus if g.vendor == _RUNTIME_VENDOR[runtime] and g.index is not None]
    if runtime == "hip":
        rocr = env.get("ROCR_VISIBLE_DEVICES")
        if rocr is not None:
            picked: list[GpuInfo] = []
            for token in _split(rocr):
                gpu = find_gpu(token, order)
                if gpu is None:
                    return None
                picked.append(gpu)
            order = picked
        hip = env.get("HIP_VISIBLE_DEVICES", env.get("CUDA_VISIBLE_DEVICES"))
        for value in (hip, env.get("GPU_DEVICE_ORDINAL")):
            if value is None:
                continue
            picked = []
            for token in _split(value):
                if not token.isdigit() or int(token) >= len(order):
                    return None
                picked.append(order[int(token)])
            order = picked
        return order
    value = env.get("CUDA_VISIBLE_DEVICES")
    if value is None:
        return order
    picked = []
    for token in _split(value):
        # An index is NVML's, which is CUDA's only with CUDA_DEVICE_ORDER=PCI_BUS_ID.
        gpu = find_gpu(token, order)
        if gpu is None:
            return None
        picked.append(gpu)
    return picked


def visibility_value(runtime: Runtime, gpus: Sequence[GpuInfo]) -> str:
    """The value of the runtime's visibility variable for ``gpus``: HIP indices in
    ascending order (the order HIP then numbers them 0, 1, ...), CUDA UUIDs."""
    if runtime == "cuda":
        return ",".join(g.unique_id or str(g.index) for g in gpus)
    return ",".join(str(g.index) for g in sorted(gpus, key=lambda g: g.index or 0))


def select_gpus(
    gpus: Sequence[GpuInfo],
    *,
    runtime: Runtime = "hip",
    pinned: Sequence[str] = (),
    build_targets: Collection[str] | None = None,
    rocm_targets: Collection[str] | None = ROCM_SUPPORTED_TARGETS,
    keep_integrated: bool = False,
    env: Mapping[str, str] | None = None,
) -> Selection:
    """Which GPUs a ``runtime`` child process gets, and its one visibility variable.

    - ``pinned`` (stable ids from the config): exactly those; an unknown id, or a
      pinned GPU the runtime cannot run on, is a ``ConfigError``; an index works but
      is warned about in ``notes``.
    - Otherwise every GPU the runtime can open, less those whose gfx target the build
      or ROCm lacks (``unsupported_reason``), less integrated GPUs when a discrete one
      remains (``keep_integrated`` keeps them).
    - When the user's environment has a visibility variable, rocmux adds none: the
      user's choice stands (and must agree with ``pinned``).
    """
    env = os.environ if env is None else env
    vendor = _RUNTIME_VENDOR[runtime]
    usable = [g for g in gpus if g.vendor == vendor and g.index is not None]
    user_vars = {name: env[name] for name in _USER_VARS[runtime] if env.get(name) is not None}
    notes: list[str] = []
    left_out: list[tuple[GpuInfo, str]] = []

    def check(gpu: GpuInfo) -> str | None:
        return unsupported_reason(
            gpu, build_targets=build_targets, rocm_targets=rocm_targets, env=env
        )

    if env.get(OVERRIDE_GFX_VAR) and vendor == "amd":
        notes.append(
            f"{OVERRIDE_GFX_VAR}={env[OVERRIDE_GFX_VAR]} is set: ROCr treats every GPU as that "
            "target, so gfx target checks are skipped"
        )

    if user_vars:
        shown = ", ".join(f"{k}={v}" for k, v in user_vars.items())
        notes.append(
            f"{shown} set in the environment: rocmux adds no visibility variable (a second "
            "one would compose with it and renumber the GPUs)"
        )
        seen = user_visible(gpus, runtime, env)
        if pinned:
            wanted, warnings = resolve_devices(pinned, usable)
            notes += warnings
            if seen is None or {g.stable_id for g in seen} != {g.stable_id for g in wanted}:
                got = "GPUs it cannot resolve" if seen is None else _known_ids(seen)
                raise ConfigError(
                    f"devices pins {_known_ids(wanted)}, but {shown} in the environment "
                    f"selects {got}; unset the variable or make the two agree"
                )
        chosen = usable if seen is None else seen
        for gpu in chosen:
            why = check(gpu)
            if why is not None:
                notes.append(f"{describe_gpu(gpu)} is visible but {why}")
        left_out = [(g, f"hidden by {shown}") for g in usable if g not in chosen]
        return Selection(
            runtime=runtime,
            gpus=tuple(chosen),
            left_out=tuple(left_out),
            env={},
            notes=tuple(notes),
            user_variables=user_vars,
        )

    if pinned:
        chosen, warnings = resolve_devices(pinned, usable)
        notes += warnings
        for gpu in chosen:
            why = check(gpu)
            if why is not None:
                raise ConfigError(f"devices pins {describe_gpu(gpu)}, but {why}")
        left_out = [(g, "not in the model's devices") for g in usable if g not in chosen]
    else:
        chosen = []
        for gpu in usable:
            why = check(gpu)
            if why is None:
                chosen.append(gpu)
            else:
                left_out.append((gpu, why))
        if not keep_integrated and any(not g.integrated for g in chosen):
            for gpu in [g for g in chosen if g.integrated]:
                chosen.remove(gpu)
                left_out.append(
                    (gpu, "integrated GPU left out beside a discrete GPU; pin it to use it")
                )
    selected_env: dict[str, str] = {}
    if chosen and len(chosen) < len(usable):
        selected_env[VISIBILITY_VAR[runtime]] = visibility_value(runtime, chosen)
    return Selection(
        runtime=runtime,
        gpus=tuple(chosen),
        left_out=tuple(left_out),
        env=selected_env,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------- placement


@attrs.frozen(kw_only=True)
class Placement:
    """Where a model goes: ``gpus`` in the runtime's order (the order of its visibility
    variable), ``tensor_split`` the proportions for llama.cpp's ``--tensor-split``
    when it is split, ``fits`` whether the free memory covers the need."""

    gpus: tuple[GpuInfo, ...]
    tensor_split: tuple[int, ...] | None
    fits: bool
    reason: str

    @property
    def free(self) -> int:
        """Free bytes of the chosen GPUs together."""
        return sum(_free(g) for g in self.gpus)


def _free(gpu: GpuInfo) -> int:
    return gpu.memory_free if gpu.memory_free is not None else gpu.memory_total or 0


def _gib_text(n: int) -> str:
    return f"{n / (1 << 30):.1f} GiB"


def place(
    need_bytes: int,
    devices: Sequence[GpuInfo],
    *,
    pinned: Sequence[str] = (),
    split: bool = False,
    reserved: Mapping[str, int] | None = None,
) -> Placement:
    """The GPU(s) a model needing ``need_bytes`` goes to.

    - ``pinned`` stable ids: those GPUs, split across when there are several.
    - ``split``: every GPU in ``devices``, with ``--tensor-split`` proportions equal to
      their free memory in MiB (llama.cpp splits layers in these proportions).
    - Otherwise the one GPU with the most free memory; when none has room for the model
      that one still wins (the memory fit then offloads fewer layers), with a reason.

    ``reserved`` (stable id -> bytes) is memory promised to loads still in progress;
    it counts as used.
    """
    reserved = reserved or {}

    def free(gpu: GpuInfo) -> int:
        return max(_free(gpu) - reserved.get(gpu.stable_id or "", 0), 0)

    if not devices:
        return Placement(gpus=(), tensor_split=None, fits=False, reason="no GPU to place on")
    order = sorted(devices, key=lambda g: (g.index is None, g.index or 0))
    if pinned:
        chosen, _ = resolve_devices(pinned, order)
        split = len(chosen) > 1
    elif split:
        chosen = order
    else:
        best = max(order, key=free)  # max keeps the first (lowest index) on ties
        fits = free(best) >= need_bytes
        others = [g for g in order if g is not best]
        if fits:
            why = (
                f"{describe_gpu(best)} has the most free memory ({_gib_text(free(best))}) "
                f"for {_gib_text(need_bytes)}"
            )
        else:
            total = sum(free(g) for g in order)
            hint = (
                f"; all {len(order)} together have {_gib_text(total)}: set split to use them"
                if others and total >= need_bytes
                else ""
            )
            why = (
                f"no GPU has {_gib_text(need_bytes)} free; {describe_gpu(best)} has the most "
                f"({_gib_text(free(best))}){hint}"
            )
        return Placement(gpus=(best,), tensor_split=None, fits=fits, reason=why)
    total = sum(free(g) for g in chosen)
    proportions = tuple(max(free(g) >> 20, 1) for g in chosen)
    why = (
        f"split over {', '.join(describe_gpu(g) for g in chosen)} in proportions "
        f"{','.join(map(str, proportions))} (free MiB): {_gib_text(total)} free for "
        f"{_gib_text(need_bytes)}"
    )
    return Placement(
        gpus=tuple(chosen),
        tensor_split=proportions if len(chosen) > 1 else None,
        fits=total >= need_bytes,
        reason=why,
    )


def place_model(
    need_bytes: int,
    *,
    pinned: Sequence[str] = (),
    split: bool = False,
    reserved: Mapping[str, int] | None = None,
    gpus: Sequence[GpuInfo] | None = None,
    runtime: Runtime = "hip",
    env: Mapping[str, str] | None = None,
) -> Placement:
    """``select_gpus`` (ROCm's and the configured targets; the build's are the
    plugin's to check) then ``place``: for code that plans loads before they start,
    such as ``rocmux serve``'s pool. Pins its result with
    ``devices = tuple(g.stable_id for g in placement.gpus)`` in the load settings."""
    gpus = detect_gpus(smi=False) if gpus is None else gpus
    targets, keep = configured_targets()
    selection = select_gpus(
        gpus,
        runtime=runtime,
        pinned=pinned,
        rocm_targets=targets if runtime == "hip" else None,
        keep_integrated=keep,
        env=env,
    )
    return place(need_bytes, selection.gpus, split=split or len(pinned) > 1, reserved=reserved)


def runtime_ids(refs: Sequence[str], gpus: Sequence[GpuInfo] | None = None) -> tuple[str, ...]:
    """The runtime-style ids (``ROCm1``, what ``llama-server --list-devices`` prints with
    no visibility variable set) of the GPUs ``refs`` name, for code keyed by those."""
    gpus = detect_gpus(smi=False) if gpus is None else gpus
    usable = [g for g in gpus if g.index is not None]
    return tuple(g.device_id for g in resolve_devices(refs, usable)[0])


def metric_labels(gpu: GpuInfo) -> dict[str, str]:
    """Labels for a per-device metric series: the stable id, never the index."""
    return {"device": gpu.stable_id or gpu.device_id, "name": gpu.name}


# ---------------------------------------------------------------- snapshots

SNAPSHOT_FORMAT = "rocmux-sysfs-snapshot"
SNAPSHOT_VERSION = 1


@contextlib.contextmanager
def recording(root: Path | None = None) -> Iterator[_Recorder]:
    """Record every file detection reads under ``root`` while the block runs."""
    recorder = _Recorder(root=_root(root))
    token = _RECORDER.set(recorder)
    try:
        yield recorder
    finally:
        _RECORDER.reset(token)


def take_snapshot(root: Path | None = None) -> dict[str, Any]:
    """Detect the GPUs and the CPU under ``root`` and return what was read, as the
    JSON-ready document ``rocmux devices --snapshot`` writes (``load_snapshot`` turns
    it back into a tree). SMI tools and NVML are not asked: only files are recorded."""
    root = _root(root)
    with recording(root) as recorder:
        gpus = amd_gpus(root)
        cpu = cpu_info(root)
    from rocmux import __version__

    return {
        "format": SNAPSHOT_FORMAT,
        "version": SNAPSHOT_VERSION,
        "rocmux": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "root": str(root),
        "files": dict(sorted(recorder.files.items())),
        "links": dict(sorted(recorder.links.items())),
        "render_nodes": dict(sorted(recorder.render_nodes.items())),
        "detected": {
            "gpus": [gpu_to_dict(g) for g in gpus],
            "cpu": {"name": cpu.name, "memory_total": cpu.memory_total},
        },
    }


def _safe_rel(rel: object) -> Path:
    if not isinstance(rel, str) or not rel:
        raise ValueError(f"bad path in snapshot: {rel!r}")
    path = Path(rel)
    if path.is_absolute() or any(part in ("", ".", "..") for part in path.parts):
        raise ValueError(f"path outside the snapshot root: {rel!r}")
    return path


def load_snapshot(source: Path | Mapping[str, Any], dest: Path) -> Path:
    """Write a snapshot (a file or its parsed document) out as a tree under ``dest``
    and return ``dest``, ready for ``ROCMUX_SYSFS_ROOT`` or a test's ``root``."""
    doc = (
        json.loads(Path(source).read_text(encoding="utf-8")) if isinstance(source, Path) else source
    )
    if not isinstance(doc, Mapping) or doc.get("format") != SNAPSHOT_FORMAT:
        raise ValueError(f"not a {SNAPSHOT_FORMAT} document")
    if doc.get("version") != SNAPSHOT_VERSION:
        raise ValueError(f"snapshot version {doc.get('version')!r} is not {SNAPSHOT_VERSION}")
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    for rel, target in dict(doc.get("links", {})).items():
        link, where = dest / _safe_rel(rel), dest / _safe_rel(target)
        where.mkdir(parents=True, exist_ok=True)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(where, link.parent), target_is_directory=True)
    for rel, text in dict(doc.get("files", {})).items():
        if not isinstance(text, str):
            raise ValueError(f"bad content for {rel!r} in snapshot")
        path = dest / _safe_rel(rel)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    nodes = dict(doc.get("render_nodes", {}))
    if nodes:
        # A render node the runtime could open becomes a plain file here (readable and
        # writable), one it could not is absent: _render_node_usable decides the same.
        dri = dest / "dev/dri"
        dri.mkdir(parents=True, exist_ok=True)
        for minor, usable in nodes.items():
            if usable and str(minor).isdigit():
                (dri / f"renderD{minor}").touch()
    return dest


def write_snapshot(path: Path, root: Path | None = None) -> dict[str, Any]:
    """``take_snapshot`` written to ``path`` as JSON; returns the document."""
    doc = take_snapshot(root)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return doc


# ---------------------------------------------------------------- `rocmux devices`

DEVICE_COLUMNS = (
    "Device",
    "Index",
    "Name",
    "Arch",
    "Type",
    "Mem used",
    "Mem free",
    "Mem total",
    "Busy",
    "CUs",
    "Unique id",
    "Use",
)
# Dropped on a terminal narrower than 120 columns.
NARROW_DROPPED = ("Busy", "CUs", "Unique id")


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / (1 << 30):.1f} GiB"


def configured_targets() -> tuple[frozenset[str], bool]:
    """ROCm's supported targets plus ``[devices] extra_targets``, and
    ``[devices] keep_integrated``, from the configuration in use (defaults when it
    cannot be read)."""
    from rocmux.config import load_config

    try:
        settings = load_config().devices
    except ConfigError:
        return ROCM_SUPPORTED_TARGETS, False
    return ROCM_SUPPORTED_TARGETS | set(settings.extra_targets), settings.keep_integrated


def default_selection(gpus: Sequence[GpuInfo], env: Mapping[str, str] | None = None) -> Selection:
    """What a HIP runtime gets when nothing is pinned, with the configured targets."""
    targets, keep = configured_targets()
    return select_gpus(gpus, runtime="hip", rocm_targets=targets, keep_integrated=keep, env=env)


def devices_table_rows(
    gpus: Sequence[GpuInfo], cpu: GpuInfo | None = None, selection: Selection | None = None
) -> list[tuple[str, ...]]:
    """One row of ``DEVICE_COLUMNS`` per device, CPU last. ``Use`` says whether a HIP
    runtime gets the GPU by default (``selection``); the reasons are printed below."""
    rows = []
    for dev in [*gpus, *([cpu] if cpu is not None else [])]:
        kind = "cpu" if dev.vendor == "cpu" else "integrated" if dev.integrated else "discrete"
        use = "-"
        if dev.vendor == "amd" and selection is not None:
            use = "yes" if dev in selection.gpus else "no"
        elif dev.vendor == "nvidia":
            use = "yes" if dev.index is not None else "no"
        rows.append(
            (
                dev.stable_id or "CPU",
                "-" if dev.vendor == "cpu" or dev.index is None else dev.device_id,
                dev.name,
                dev.gfx_target or "-",
                kind,
                _gib(dev.memory_used),
                _gib(dev.memory_free),
                _gib(dev.memory_total),
                "-" if dev.busy_percent is None else f"{dev.busy_percent}%",
                "-" if dev.compute_units is None else str(dev.compute_units),
                dev.unique_id or "-",
                use,
            )
        )
    return rows


def gpu_to_dict(gpu: GpuInfo) -> dict[str, Any]:
    """A JSON-ready dict of every field, plus ``stable_id`` and the runtime-style ``id``."""
    return {"id": gpu.device_id, "stable_id": gpu.stable_id, **attrs.asdict(gpu)}


def to_json(
    gpus: Sequence[GpuInfo],
    cpu: GpuInfo | None = None,
    env: Mapping[str, str] | None = None,
    selection: Selection | None = None,
) -> str:
    """The ``rocmux devices --json`` document."""
    selection = selection or select_gpus(gpus, runtime="hip", env=env)
    entries = []
    for gpu in gpus:
        entry = gpu_to_dict(gpu)
        if gpu.vendor == "amd":
            entry["used"] = gpu in selection.gpus
            entry["left_out"] = selection.reason_for(gpu)
        entries.append(entry)
    return json.dumps(
        {
            "gpus": entries,
            "cpu": gpu_to_dict(cpu) if cpu is not None else None,
            "hip_visible_devices": selection.env.get("HIP_VISIBLE_DEVICES"),
            "notes": list(selection.notes),
        },
        indent=2,
    )


def run_devices_command(as_json: bool, snapshot: Path | None = None) -> int:
    """``rocmux devices``: a table of the devices with live memory use, or JSON;
    ``snapshot`` also writes the files detection read (``write_snapshot``)."""
    import sys

    if snapshot is not None:
        doc = write_snapshot(snapshot)
        print(
            f"Recorded {len(doc['files'])} files from {doc['root']} in {snapshot}; "
            "load it with ROCMUX_SYSFS_ROOT=" + str(snapshot),
            file=sys.stderr,
        )
    gpus = detect_gpus()
    cpu = cpu_info()
    selection = default_selection(gpus)
    if as_json:
        print(to_json(gpus, cpu, selection=selection))
        return 0
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console()
    keep = [
        i for i, c in enumerate(DEVICE_COLUMNS) if console.width >= 120 or c not in NARROW_DROPPED
    ]
    table = Table(show_edge=False)
    for i in keep:
        column = DEVICE_COLUMNS[i]
        right = column.startswith(("Mem", "Busy", "CUs"))
        table.add_column(column, justify="right" if right else "left", no_wrap=column != "Name")
    for row in devices_table_rows(gpus, cpu, selection):
        table.add_row(*(Text(row[i]) for i in keep))  # Text: names are not markup
    console.print(table)
    if not gpus:
        console.print("No GPU found (no KFD topology, no NVML); runtimes will use the CPU.")
    for gpu, why in selection.left_out:
        console.print(Text(f"{gpu.stable_id} left out: {why}"))
    for note in selection.notes:
        console.print(Text(note))
    visible = selection.env.get("HIP_VISIBLE_DEVICES")
    if visible is not None:
        console.print(Text(f"HIP runtimes get HIP_VISIBLE_DEVICES={visible} by default"))
    return 0
