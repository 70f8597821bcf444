"""Device detection from recorded sysfs trees, SMI output and a fake NVML.

The trees under tests/data/sysfs were built from the kernel's documentation and source,
not captured from hardware (see their README); the amd-smi samples likewise from AMD's.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import attrs
import pytest
from rocmux import devices
from rocmux.devices import GpuInfo
from rocmux.errors import ConfigError

DATA = Path(__file__).parent / "data"
DGPU = DATA / "sysfs" / "rdna3_dgpu"
APU = DATA / "sysfs" / "apu_strix_halo"
SMI = DATA / "amd_smi"
MIB = 1 << 20
NODES = Path("sys/class/kfd/kfd/topology/nodes")


def copy_tree(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / src.name
    shutil.copytree(src, dst, symlinks=True)  # real sysfs links loop back on themselves
    return dst


def set_property(root: Path, node: int, name: str, value: int) -> None:
    path = root / NODES / str(node) / "properties"
    lines = [
        f"{name} {value}" if line.split()[0] == name else line
        for line in path.read_text().splitlines()
    ]
    path.write_text("\n".join(lines) + "\n")


def write(path: Path, value: object) -> None:
    path.write_text(f"{value}\n")


@pytest.fixture
def no_visibility_env(monkeypatch):
    for name in devices.VISIBILITY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ------------------------------------------------------------------ recorded sysfs trees


def test_dgpu_tree_finds_the_discrete_card_and_the_igpu():
    dgpu, igpu = devices.detect_gpus(DGPU)

    assert (dgpu.index, dgpu.kfd_node, dgpu.drm_render_minor) == (0, 1, 128)
    assert dgpu.vendor == "amd"
    assert dgpu.name == "AMD Radeon RX 7900 XTX"  # amdgpu.ids, 744C rev C8
    assert dgpu.gfx_target == "gfx1100"
    assert not dgpu.integrated
    assert (dgpu.simd_count, dgpu.compute_units) == (192, 96)
    assert dgpu.memory_total == dgpu.vram_total == 25753026560
    assert dgpu.memory_used == 1610612736
    assert dgpu.memory_free == 25753026560 - 1610612736
    assert dgpu.gtt_total == 33736474624
    assert dgpu.busy_percent == 3
    assert dgpu.pci_bus == "0000:03:00.0"  # from location_id 768 and domain 0
    assert dgpu.unique_id == "GPU-4f8a2c1d9b3e7a05"  # KFD's decimal unique_id, as hex

    assert (igpu.index, igpu.kfd_node, igpu.drm_render_minor) == (1, 2, 129)
    assert igpu.name == devices.GENERIC_AMD_NAME  # 164E rev C1 is not in amdgpu.ids
    assert igpu.gfx_target == "gfx1036"
    assert igpu.integrated
    assert igpu.compute_units == 2
    assert igpu.pci_bus == "0000:13:00.0"
    assert igpu.unique_id is None  # unique_id 0 and no amdgpu unique_id file


def test_igpu_memory_is_carveout_plus_gtt():
    igpu = devices.detect_gpus(DGPU)[1]
    vram_total, vram_used = 536870912, 29360128
    gtt_total, gtt_used = 33736474624, 52428800
    assert igpu.vram_total == vram_total
    assert igpu.memory_total == vram_total + gtt_total
    assert igpu.memory_used == vram_used + gtt_used
    # MemAvailable (58214320 kB) exceeds the free GTT here, so GTT is the limit.
    assert igpu.memory_free == (vram_total - vram_used) + (gtt_total - gtt_used)


def test_strix_halo_apu_is_one_integrated_gpu_with_most_of_the_memory():
    (gpu,) = devices.detect_gpus(APU)
    assert gpu.index == 0
    assert gpu.name == "AMD Radeon 8060S Graphics"
    assert gpu.gfx_target == "gfx1151"
    assert gpu.integrated
    assert gpu.compute_units == 40
    assert gpu.pci_bus == "0000:c5:00.0"
    assert gpu.vram_total == 512 * MIB
    assert gpu.memory_total == 512 * MIB + 120 * 1024 * MIB
    # Free GTT (118 GiB) is more than the RAM still available: RAM is the limit.
    mem_available = 121634816 * 1024
    assert mem_available < 120 * 1024 * MIB - 2048 * MIB
    assert gpu.memory_free == (512 * MIB - 96468992) + mem_available
    assert gpu.memory_free > 100 * 1024 * MIB


def test_hip_index_follows_kfd_node_order(tmp_path):
    root = copy_tree(DGPU, tmp_path)
    nodes = root / NODES
    (nodes / "1").rename(nodes / "tmp")
    (nodes / "2").rename(nodes / "1")
    (nodes / "tmp").rename(nodes / "2")

    igpu, dgpu = devices.amd_gpus(root)
    assert (igpu.gfx_target, igpu.index, igpu.kfd_node) == ("gfx1036", 0, 1)
    assert (dgpu.gfx_target, dgpu.index, dgpu.kfd_node) == ("gfx1100", 1, 2)
    assert devices.default_visible_devices([igpu, dgpu], env={}) == "1"


def test_gpu_without_a_usable_render_node_gets_no_index(tmp_path):
    root = copy_tree(DGPU, tmp_path)
    (root / "dev/dri").mkdir(parents=True)
    (root / "dev/dri/renderD129").touch()  # renderD128 is missing, as in a container

    dgpu, igpu = devices.amd_gpus(root)
    assert dgpu.index is None
    assert igpu.index == 0  # the runtime numbers only the GPUs it can open
    assert dgpu.device_id == "ROCm:0000:03:00.0"
    assert devices.default_visible_devices([dgpu, igpu], env={}) is None


def test_cpu_nodes_and_non_numeric_lines_are_skipped(tmp_path):
    root = copy_tree(APU, tmp_path)
    props = root / NODES / "1" / "properties"
    props.write_text(props.read_text() + "gpu_family gfx115X\n")
    assert devices.parse_kfd_properties(props.read_text())["gfx_target_version"] == 110501
    assert "gpu_family" not in devices.parse_kfd_properties(props.read_text())
    assert [g.kfd_node for g in devices.amd_gpus(root)] == [1]


@pytest.mark.parametrize(
    ("change", "integrated"),
    [
        # A KFD "APU node" (CPU cores and SIMDs) on an older kernel, unknown target.
        ({"cpu_cores_count": 16, "gfx_target_version": 120001}, True),
        # A target not in the APU table with a carve-out sized VRAM.
        ({"gfx_target_version": 120001, "vram": 512 * MIB}, True),
        # The same target with real VRAM: discrete.
        ({"gfx_target_version": 120001}, False),
        # An APU target decides even with a large carve-out (96 GiB on Strix Halo).
        ({"vram": 96 * 1024 * MIB}, True),
    ],
)
def test_integrated_gpu_signals(tmp_path, change, integrated):
    root = copy_tree(APU, tmp_path)
    for name, value in change.items():
        if name == "vram":
            write(root / "sys/class/drm/renderD128/device/mem_info_vram_total", value)
        else:
            set_property(root, 1, name, value)
    if "vram" not in change and change.get("gfx_target_version") == 120001:
        write(root / "sys/class/drm/renderD128/device/mem_info_vram_total", 16 * 1024 * MIB)
    (gpu,) = devices.amd_gpus(root)
    assert gpu.integrated is integrated


def test_local_mem_size_is_not_taken_as_a_signal(tmp_path):
    # node_show() prints local_mem_size 0 for every GPU, so 0 must not mean "integrated".
    dgpu = devices.amd_gpus(DGPU)[0]
    text = (DGPU / NODES / "1" / "properties").read_text()
    assert "local_mem_size 0" in text
    assert not dgpu.integrated


def test_no_kfd_topology_means_no_amd_gpu(tmp_path):
    assert devices.amd_gpus(tmp_path) == []
    assert devices.detect_gpus(tmp_path) == []


@pytest.mark.parametrize(
    ("version", "target"),
    [(110000, "gfx1100"), (110001, "gfx1101"), (90012, "gfx90c"), (90010, "gfx90a")]
    + [(100306, "gfx1036"), (110501, "gfx1151"), (120001, "gfx1201"), (0, None)],
)
def test_gfx_target_name(version, target):
    assert devices.gfx_target_name(version) == target


def test_amdgpu_ids_lookup_is_exact_and_first_wins():
    ids = devices.parse_amdgpu_ids(
        "# comment\n\n1.0.0\n744C,\tC8,\tAMD Radeon RX 7900 XTX\n"
        "744C,\tC8,\tsecond entry\n744C,\tCC,\tAMD Radeon RX 7900 XT\n"
    )
    assert ids == {
        (0x744C, 0xC8): "AMD Radeon RX 7900 XTX",
        (0x744C, 0xCC): "AMD Radeon RX 7900 XT",
    }


def test_normalize_pci_bus():
    assert devices.normalize_pci_bus("00000000:01:00.0") == "0000:01:00.0"  # NVML
    assert devices.normalize_pci_bus("03:00.0") == "0000:03:00.0"
    assert devices.normalize_pci_bus("0000:C5:00.1") == "0000:c5:00.1"
    assert devices.normalize_pci_bus("N/A") is None


# ------------------------------------------------------------------ HIP_VISIBLE_DEVICES


def test_default_visible_devices_leaves_the_igpu_out():
    assert devices.default_visible_devices(devices.amd_gpus(DGPU), env={}) == "0"


def test_default_visible_devices_keeps_a_lone_apu():
    assert devices.default_visible_devices(devices.amd_gpus(APU), env={}) is None


@pytest.mark.parametrize("variable", devices.VISIBILITY_VARIABLES)
def test_default_visible_devices_lets_the_user_win(variable):
    gpus = devices.amd_gpus(DGPU)
    assert devices.default_visible_devices(gpus, env={variable: "1"}) is None
    assert devices.default_visible_devices(gpus, env={variable: ""}) is None


def test_default_visible_devices_without_amd_gpus():
    assert devices.default_visible_devices([], env={}) is None
    only_dgpu = devices.amd_gpus(DGPU)[:1]
    assert devices.default_visible_devices(only_dgpu, env={}) is None


# ------------------------------------------------------------------ live re-reads


def test_memory_now_rereads_sysfs(tmp_path):
    root = copy_tree(DGPU, tmp_path)
    dgpu, igpu = devices.amd_gpus(root)
    assert devices.memory_now(dgpu, root) == (dgpu.memory_used, dgpu.memory_free)

    device = root / "sys/class/drm/renderD128/device"
    write(device / "mem_info_vram_used", 20 * 1024 * MIB)
    used, free = devices.memory_now(dgpu, root)
    assert used == 20 * 1024 * MIB
    assert free == 25753026560 - 20 * 1024 * MIB

    write(root / "sys/class/drm/renderD129/device/mem_info_gtt_used", 4 * 1024 * MIB)
    used, free = devices.memory_now(igpu, root)
    assert used == 29360128 + 4 * 1024 * MIB
    assert free == (536870912 - 29360128) + (33736474624 - 4 * 1024 * MIB)


def test_memory_now_of_the_cpu_reads_meminfo():
    used, free = devices.memory_now(devices.cpu_info(APU), APU)
    assert free == 121634816 * 1024
    assert used == (131941232 - 121634816) * 1024


def test_to_device():
    dgpu, igpu = devices.amd_gpus(DGPU)
    device = dgpu.to_device()
    assert (device.id, device.kind, device.name) == ("ROCm0", "rocm", "AMD Radeon RX 7900 XTX")
    assert (device.memory_total, device.memory_free) == (dgpu.memory_total, dgpu.memory_free)
    assert igpu.to_device().id == "ROCm1"
    assert devices.cpu_info().to_device().kind == "cpu"


# ------------------------------------------------------------------ CPU fallback


def test_cpu_info_on_this_machine_is_plausible():
    cpu = devices.cpu_info()
    assert cpu.vendor == "cpu" and cpu.index is None and cpu.name
    assert cpu.compute_units is not None
    assert 1 <= cpu.compute_units <= (os.cpu_count() or 1)
    assert cpu.memory_total is not None and cpu.memory_total > 64 * MIB
    assert cpu.memory_free is not None and 0 < cpu.memory_free <= cpu.memory_total
    assert cpu.memory_used == cpu.memory_total - cpu.memory_free


def test_cpu_info_from_a_recorded_tree():
    cpu = devices.cpu_info(DGPU)
    assert cpu.name == "AMD Ryzen 9 7950X 16-Core Processor"
    assert cpu.memory_total == 65891552 * 1024
    assert cpu.memory_free == 58214320 * 1024


# ------------------------------------------------------------------ amd-smi / rocm-smi


def test_amd_smi_json_from_the_recorded_sample():
    records = devices.parse_amd_smi(
        (SMI / "static.json").read_text(), (SMI / "metric.json").read_text()
    )
    assert set(records) == {"0000:03:00.0", "0000:13:00.0"}
    dgpu = records["0000:03:00.0"]
    assert dgpu.name == "AMD Radeon RX 7900 XTX"
    assert dgpu.gfx_target == "gfx1100"
    assert dgpu.compute_units == 96
    assert dgpu.memory_total == 24560 * MIB  # amd-smi's "MB" is MiB
    assert dgpu.memory_used == 1536 * MIB
    assert dgpu.busy_percent == 3
    igpu = records["0000:13:00.0"]
    assert (igpu.gfx_target, igpu.memory_total, igpu.busy_percent) == ("gfx1036", 512 * MIB, 0)


def test_amd_smi_bare_list_and_metric_matched_by_gpu_field():
    static = json.loads((SMI / "static.json").read_text())["gpu_data"]
    metric = json.loads((SMI / "metric.json").read_text())["gpu_data"]
    records = devices.parse_amd_smi(
        "WARNING: something amd-smi printed first\n" + json.dumps(static),
        json.dumps(list(reversed(metric))),
    )
    assert records["0000:03:00.0"].memory_used == 1536 * MIB
    assert records["0000:13:00.0"].memory_used == 28 * MIB


def test_amd_smi_without_metric_uses_the_static_vram_size():
    records = devices.parse_amd_smi((SMI / "static.json").read_text())
    assert records["0000:03:00.0"].memory_total == 24560 * MIB
    assert records["0000:03:00.0"].memory_used is None
    assert records["0000:03:00.0"].busy_percent is None


@pytest.mark.parametrize("text", ["", "not json", "{", "[1, 2]", '{"gpu_data": 5}'])
def test_amd_smi_garbage_gives_no_records(text):
    assert devices.parse_amd_smi(text, text) == {}


def test_amd_smi_plain_and_na_values():
    static = [
        {
            "gpu": 0,
            "asic": {"market_name": "N/A", "target_graphics_version": "N/A"},
            "bus": {"bdf": "0000:03:00.0"},
            "vram": {"size": "24560 MB"},
        }
    ]
    metric = [{"gpu": 0, "mem_usage": {"used_vram": 100}, "usage": {"gfx_activity": "N/A"}}]
    (record,) = devices.parse_amd_smi(json.dumps(static), json.dumps(metric)).values()
    assert record.name is None and record.gfx_target is None
    assert record.memory_total == 24560 * MIB
    assert record.memory_used == 100 * MIB
    assert record.busy_percent is None


def test_rocm_smi_json_from_the_recorded_sample():
    records = devices.parse_rocm_smi((SMI / "rocm_smi_meminfo.json").read_text())
    assert records["0000:03:00.0"].memory_total == 25753026560
    assert records["0000:13:00.0"].memory_used == 29360128
    assert devices.parse_rocm_smi("garbage") == {}


def test_apply_smi_fills_only_what_sysfs_left_unknown():
    records = devices.parse_amd_smi(
        (SMI / "static.json").read_text(), (SMI / "metric.json").read_text()
    )
    dgpu, igpu = devices.amd_gpus(DGPU)
    bare = GpuInfo(index=0, vendor="amd", name=devices.GENERIC_AMD_NAME, pci_bus="0000:03:00.0")
    filled_bare, filled_dgpu, filled_igpu = devices.apply_smi([bare, dgpu, igpu], records)
    assert filled_bare.name == "AMD Radeon RX 7900 XTX"
    assert filled_bare.memory_total == 24560 * MIB
    assert filled_bare.memory_free == (24560 - 1536) * MIB
    assert (filled_bare.gfx_target, filled_bare.compute_units) == ("gfx1100", 96)
    assert filled_dgpu == dgpu  # sysfs knew everything already
    assert filled_igpu.memory_total == igpu.memory_total  # carve-out + GTT kept


def fake_tool(directory: Path, name: str, body: str) -> None:
    path = directory / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_smi_records_runs_amd_smi(tmp_path, monkeypatch):
    fake_tool(
        tmp_path,
        "amd-smi",
        f'case "$1" in static) cat "{SMI}/static.json";; metric) cat "{SMI}/metric.json";; esac',
    )
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    records = devices.smi_records()
    assert records["0000:03:00.0"].memory_used == 1536 * MIB


def test_smi_records_falls_back_to_rocm_smi(tmp_path, monkeypatch):
    fake_tool(tmp_path, "amd-smi", "exit 1")
    fake_tool(tmp_path, "rocm-smi", f'cat "{SMI}/rocm_smi_meminfo.json"')
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert devices.smi_records()["0000:03:00.0"].memory_total == 25753026560


def test_smi_tool_that_hangs_times_out(tmp_path, monkeypatch):
    # Not exec: the shell's child keeps the pipe open after the shell is gone.
    fake_tool(tmp_path, "amd-smi", "sleep 30\necho '[]'")
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert devices.smi_records(timeout=0.5) == {}


def test_no_smi_tool_installed(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert devices.smi_records() == {}


# ------------------------------------------------------------------ NVIDIA via NVML


def test_nvml_path_is_empty_without_nvidia_ml_py(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    assert devices.nvidia_gpus() == []


def test_nvml_on_this_machine():
    if importlib.util.find_spec("pynvml") is not None:
        pytest.skip("nvidia-ml-py is installed here")
    assert devices.nvidia_gpus() == []


class NotSupported(Exception):
    pass


def fake_pynvml(calls: list[str]) -> types.ModuleType:
    """A stand-in for nvidia-ml-py with two GPUs: a unit test of the parsing only."""
    module = types.ModuleType("pynvml")
    boards = [
        ("NVIDIA GeForce RTX 4090", "GPU-1111", "00000000:01:00.0", (24 << 30, 2 << 30), 37),
        (b"NVIDIA RTX A2000", "GPU-2222", "00000000:C1:00.0", (6 << 30, 1 << 30), None),
    ]

    def util(handle):
        if boards[handle][4] is None:
            raise NotSupported("no utilization counters")
        return types.SimpleNamespace(gpu=boards[handle][4], memory=5)

    def memory(handle):
        total, used = boards[handle][3]
        return types.SimpleNamespace(total=total, used=used, free=total - used)

    module.nvmlInit = lambda: calls.append("init")
    module.nvmlShutdown = lambda: calls.append("shutdown")
    module.nvmlDeviceGetCount = lambda: len(boards)
    module.nvmlDeviceGetHandleByIndex = lambda i: i
    module.nvmlDeviceGetHandleByUUID = lambda uuid: [b[1] for b in boards].index(uuid)
    module.nvmlDeviceGetName = lambda h: boards[h][0]
    module.nvmlDeviceGetUUID = lambda h: boards[h][1]
    module.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(busId=boards[h][2].encode())
    module.nvmlDeviceGetMemoryInfo = memory
    module.nvmlDeviceGetUtilizationRates = util
    return module


def test_nvml_parsing_with_a_fake_module(monkeypatch):
    calls: list[str] = []
    monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(calls))
    first, second = devices.nvidia_gpus()
    assert calls == ["init", "shutdown"]

    assert (first.index, first.vendor, first.name) == (0, "nvidia", "NVIDIA GeForce RTX 4090")
    assert first.unique_id == "GPU-1111"
    assert first.pci_bus == "0000:01:00.0"
    assert (first.memory_total, first.memory_used) == (24 << 30, 2 << 30)
    assert first.memory_free == 22 << 30
    assert first.busy_percent == 37
    assert first.gfx_target is None and not first.integrated
    assert first.to_device().id == "CUDA0" and first.to_device().kind == "cuda"

    assert second.name == "NVIDIA RTX A2000"  # bytes from older nvidia-ml-py
    assert second.pci_bus == "0000:c1:00.0"
    assert second.busy_percent is None  # NotSupported does not drop the GPU

    assert devices.memory_now(second) == (1 << 30, 5 << 30)


def test_nvml_without_a_driver(monkeypatch):
    module = fake_pynvml([])

    def fail():
        raise NotSupported("NVML Shared Library Not Found")

    module.nvmlInit = fail
    monkeypatch.setitem(sys.modules, "pynvml", module)
    assert devices.nvidia_gpus() == []


# ------------------------------------------------------------------ `rocmux devices`


def test_table_rows():
    gpus = devices.amd_gpus(DGPU)
    selection = devices.select_gpus(gpus, env={})
    rows = devices.devices_table_rows(gpus, devices.cpu_info(DGPU), selection)
    assert [len(row) for row in rows] == [len(devices.DEVICE_COLUMNS)] * 3
    columns = devices.DEVICE_COLUMNS
    dgpu = dict(zip(columns, rows[0], strict=True))
    assert dgpu["Device"] == "0000:03:00.0"  # the stable id first, the index beside it
    assert (dgpu["Index"], dgpu["Name"], dgpu["Arch"], dgpu["Type"]) == (
        "ROCm0",
        "AMD Radeon RX 7900 XTX",
        "gfx1100",
        "discrete",
    )
    assert (dgpu["Mem used"], dgpu["Mem free"], dgpu["Mem total"]) == (
        "1.5 GiB",
        "22.5 GiB",
        "24.0 GiB",
    )
    assert (dgpu["Unique id"], dgpu["Use"]) == ("GPU-4f8a2c1d9b3e7a05", "yes")
    igpu = dict(zip(columns, rows[1], strict=True))
    assert (igpu["Device"], igpu["Type"], igpu["Use"]) == ("0000:13:00.0", "integrated", "no")
    cpu = dict(zip(columns, rows[2], strict=True))
    assert (cpu["Device"], cpu["Index"], cpu["Type"], cpu["Use"]) == ("CPU", "-", "cpu", "-")


def test_run_devices_command_json(monkeypatch, capsys, no_visibility_env):
    monkeypatch.setattr(devices, "detect_gpus", lambda *a, **k: devices.amd_gpus(DGPU))
    assert devices.run_devices_command(as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [g["id"] for g in doc["gpus"]] == ["ROCm0", "ROCm1"]
    assert [g["stable_id"] for g in doc["gpus"]] == ["0000:03:00.0", "0000:13:00.0"]
    assert doc["gpus"][1]["integrated"] is True
    assert doc["gpus"][0]["memory_free"] == 25753026560 - 1610612736
    assert [g["used"] for g in doc["gpus"]] == [True, False]
    # gfx1036 (Raphael's iGPU) is not on ROCm's list: that reason comes first.
    assert doc["gpus"][1]["left_out"].startswith("ROCm does not support gfx1036")
    assert doc["cpu"]["vendor"] == "cpu"
    assert doc["hip_visible_devices"] == "0"


def test_run_devices_command_table(monkeypatch, capsys, no_visibility_env):
    monkeypatch.setattr(devices, "detect_gpus", lambda *a, **k: devices.amd_gpus(DGPU))
    monkeypatch.setenv("COLUMNS", "250")
    assert devices.run_devices_command(as_json=False) == 0
    out = capsys.readouterr().out
    assert "AMD Radeon RX 7900 XTX" in out and "gfx1036" in out and "CPU" in out
    assert "0000:03:00.0" in out and "GPU-4f8a2c1d9b3e7a05" in out
    assert "0000:13:00.0 left out: ROCm does not support gfx1036" in out
    assert "HIP_VISIBLE_DEVICES=0" in out


def test_run_devices_command_on_this_machine(capsys):
    assert devices.run_devices_command(as_json=True) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["cpu"]["memory_total"] > 0
    if not Path("/sys/class/kfd").exists():
        assert [g for g in doc["gpus"] if g["vendor"] == "amd"] == []


def test_import_does_no_io():
    # An audit hook records every file the import opens and every process it starts.
    code = (
        "import sys\n"
        "seen = []\n"
        "sys.addaudithook(lambda e, a: seen.append((e, str(a[0]))) "
        "if e in ('open', 'subprocess.Popen', 'os.listdir', 'os.scandir') else None)\n"
        "import rocmux.devices\n"
        "print([s for s in seen if s[0] == 'subprocess.Popen'"
        " or s[1].startswith(('/sys', '/proc', '/dev')) or 'amdgpu.ids' in s[1]])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


# ------------------------------------------------------------------ new recorded trees

RX = DATA / "sysfs" / "rx7800xt_igpu"
MI = DATA / "sysfs" / "mi300x_pair"
GIB = 1 << 30
TREES = [DGPU, APU, RX, MI]
RX_DGPU, RX_IGPU = "0000:03:00.0", "0000:0e:00.0"
MI_0, MI_1 = "0000:0c:00.0", "0000:8c:00.0"


def test_rx7800xt_beside_a_ryzen_igpu():
    dgpu, igpu = devices.detect_gpus(RX)
    assert (dgpu.stable_id, dgpu.index, dgpu.kfd_node) == (RX_DGPU, 0, 1)
    assert (dgpu.name, dgpu.gfx_target, dgpu.compute_units) == (
        "AMD Radeon RX 7800 XT",
        "gfx1101",
        60,
    )
    assert not dgpu.integrated
    assert dgpu.memory_total == dgpu.vram_total == 16368 * MIB
    assert dgpu.unique_id == "GPU-8c3f1b6e2a9d4057"

    assert (igpu.stable_id, igpu.index, igpu.kfd_node) == (RX_IGPU, 1, 2)
    assert (igpu.name, igpu.gfx_target, igpu.compute_units) == (
        "AMD Radeon 780M Graphics",
        "gfx1103",
        12,
    )
    assert igpu.integrated  # gfx1103 is Phoenix, an APU-only target
    assert igpu.unique_id is None
    # Carve-out plus GTT: what the iGPU can really allocate.
    assert igpu.vram_total == 512 * MIB
    assert igpu.memory_total == 512 * MIB + igpu.gtt_total
    assert igpu.memory_total > 15 * GIB


def test_two_mi300x_behind_two_cpu_nodes():
    first, second = devices.detect_gpus(MI)
    # KFD nodes 0 and 1 are the two EPYC sockets: HIP numbers the GPUs 0 and 1 anyway.
    assert [(g.index, g.kfd_node, g.drm_render_minor) for g in (first, second)] == [
        (0, 2, 128),
        (1, 3, 136),
    ]
    assert [g.stable_id for g in (first, second)] == [MI_0, MI_1]
    assert [g.unique_id for g in (first, second)] == [
        "GPU-2f1c5a7be0943d61",
        "GPU-6b08e2d4c17a9f35",
    ]
    for gpu in (first, second):
        assert (gpu.name, gpu.gfx_target, gpu.compute_units) == (
            "AMD Instinct MI300X",
            "gfx942",
            304,
        )
        assert gpu.memory_total == 196592 * MIB and not gpu.integrated
    # Both in one XGMI hive.
    assert first.hive_id == second.hive_id and first.hive_id
    assert second.memory_free > first.memory_free  # the first has a model loaded


def test_pci_address_from_the_sysfs_device_link(tmp_path):
    """Without KFD's location_id, the address comes from where the device link points;
    without KFD's unique_id, from amdgpu's unique_id file (both real links in this tree)."""
    root = copy_tree(MI, tmp_path)
    for node in (2, 3):
        set_property(root, node, "location_id", 0)
        set_property(root, node, "unique_id", 0)
    first, second = devices.amd_gpus(root)
    assert (first.pci_bus, second.pci_bus) == (MI_0, MI_1)
    assert (first.unique_id, second.unique_id) == ("GPU-2f1c5a7be0943d61", "GPU-6b08e2d4c17a9f35")


def test_stable_id_prefers_the_pci_address():
    gpu = devices.amd_gpus(DGPU)[0]
    assert gpu.stable_id == "0000:03:00.0"
    assert attrs.evolve(gpu, pci_bus=None).stable_id == "GPU-4f8a2c1d9b3e7a05"
    assert devices.cpu_info(DGPU).stable_id is None


def test_find_gpu_by_every_accepted_form():
    gpus = devices.amd_gpus(MI)
    for ref in (MI_1, "8c:00.0", "0000:8C:00.0", "GPU-6B08E2D4C17A9F35", "1", "ROCm1"):
        assert devices.find_gpu(ref, gpus) is gpus[1], ref
    for ref in ("0000:99:00.0", "GPU-0000000000000000", "7", "CPU", ""):
        assert devices.find_gpu(ref, gpus) is None, ref


def test_resolve_devices_warns_about_indices_and_names_the_stable_ids():
    gpus = devices.amd_gpus(MI)
    chosen, warnings = devices.resolve_devices([MI_1, "0"], gpus)
    assert [g.stable_id for g in chosen] == [MI_0, MI_1]  # HIP order
    assert len(warnings) == 1
    assert "'0' is an enumeration index" in warnings[0] and f'"{MI_0}"' in warnings[0]

    with pytest.raises(ConfigError) as info:
        devices.resolve_devices(["0000:99:00.0"], gpus)
    assert MI_0 in str(info.value) and MI_1 in str(info.value)
    with pytest.raises(ConfigError, match="twice"):
        devices.resolve_devices([MI_1, "ROCm1"], gpus)


# ------------------------------------------------------------------ gfx targets


@pytest.mark.parametrize(
    ("target", "built", "covered"),
    [
        ("gfx1101", {"gfx1100", "gfx1101"}, True),
        ("gfx1101", {"gfx1100"}, False),
        ("gfx1103", {"gfx11-generic"}, True),
        ("gfx942", {"gfx942:sramecc+:xnack-"}, True),
        ("gfx942", {"gfx9-4-generic"}, True),
        ("gfx942", {"gfx9-generic"}, False),
        ("gfx1036", {"gfx10-3-generic"}, True),
    ],
)
def test_target_covered(target, built, covered):
    assert devices.target_covered(target, built) is covered


def test_unsupported_reason():
    dgpu, igpu = devices.amd_gpus(RX)
    assert devices.unsupported_reason(dgpu, env={}) is None  # gfx1101: on ROCm's list
    assert "ROCm does not support gfx1103" in devices.unsupported_reason(igpu, env={})
    why = devices.unsupported_reason(dgpu, build_targets={"gfx1100"}, env={})
    assert "not built for gfx1101 (built for gfx1100)" in why
    assert "HSA_OVERRIDE_GFX_VERSION" in why
    # The override makes ROCr report another target: nothing is checked then.
    override = {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    assert devices.unsupported_reason(igpu, build_targets={"gfx1100"}, env=override) is None
    assert devices.unsupported_reason(igpu, rocm_targets=None, env={}) is None


# ------------------------------------------------------------------ visibility


def test_default_selection_leaves_the_igpu_out_beside_the_rx7800xt():
    selection = devices.select_gpus(devices.amd_gpus(RX), env={})
    assert [g.stable_id for g in selection.gpus] == [RX_DGPU]
    assert selection.env == {"HIP_VISIBLE_DEVICES": "0"}
    ((left, why),) = selection.left_out
    assert left.stable_id == RX_IGPU and "ROCm does not support gfx1103" in why

    # With gfx1103 accepted, it is left out for being integrated.
    targets = devices.ROCM_SUPPORTED_TARGETS | {"gfx1103"}
    selection = devices.select_gpus(devices.amd_gpus(RX), rocm_targets=targets, env={})
    assert selection.env == {"HIP_VISIBLE_DEVICES": "0"}
    assert "integrated GPU left out beside a discrete GPU" in selection.left_out[0][1]
    kept = devices.select_gpus(
        devices.amd_gpus(RX), rocm_targets=targets, keep_integrated=True, env={}
    )
    assert len(kept.gpus) == 2 and kept.env == {}  # all usable GPUs: no variable needed


def test_a_lone_apu_is_used_with_its_gtt():
    selection = devices.select_gpus(devices.amd_gpus(APU), env={})
    (gpu,) = selection.gpus
    assert gpu.integrated and selection.env == {} and selection.left_out == ()
    assert gpu.memory_total > 100 * GIB  # GTT counted, not the 512 MiB carve-out


def test_pins_are_stable_ids_translated_to_hip_indices(tmp_path):
    """The same stable id gets the right HIP index whatever the KFD node order."""
    root = copy_tree(RX, tmp_path)
    nodes = root / NODES
    (nodes / "1").rename(nodes / "tmp")
    (nodes / "2").rename(nodes / "1")
    (nodes / "tmp").rename(nodes / "2")
    gpus = devices.amd_gpus(root)
    assert [g.stable_id for g in gpus] == [RX_IGPU, RX_DGPU]  # the iGPU is HIP 0 now

    assert devices.select_gpus(gpus, pinned=[RX_DGPU], env={}).env == {"HIP_VISIBLE_DEVICES": "1"}
    assert devices.select_gpus(gpus, env={}).env == {"HIP_VISIBLE_DEVICES": "1"}
    assert devices.select_gpus(devices.amd_gpus(RX), pinned=[RX_DGPU], env={}).env == {
        "HIP_VISIBLE_DEVICES": "0"
    }


def test_pinning_a_gpu_the_runtime_cannot_run_is_an_error_unless_overridden():
    gpus = devices.amd_gpus(RX)
    with pytest.raises(ConfigError, match="ROCm does not support gfx1103"):
        devices.select_gpus(gpus, pinned=[RX_IGPU], env={})
    override = {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    selection = devices.select_gpus(gpus, pinned=[RX_IGPU], env=override)
    assert selection.env == {"HIP_VISIBLE_DEVICES": "1"}
    assert any("HSA_OVERRIDE_GFX_VERSION=11.0.0" in note for note in selection.notes)


def test_the_users_rocr_visible_devices_is_respected_and_nothing_is_added():
    gpus = devices.amd_gpus(RX)
    env = {"ROCR_VISIBLE_DEVICES": "GPU-8c3f1b6e2a9d4057"}
    selection = devices.select_gpus(gpus, env=env)
    assert selection.env == {}
    assert [g.stable_id for g in selection.gpus] == [RX_DGPU]
    assert selection.user_variables == env
    assert "compose" in selection.notes[0]
    # A pin that agrees with the user's variable is fine; one that does not is an error.
    assert devices.select_gpus(gpus, pinned=[RX_DGPU], env=env).env == {}
    with pytest.raises(ConfigError) as info:
        devices.select_gpus(gpus, pinned=[RX_IGPU], env={"ROCR_VISIBLE_DEVICES": "0"})
    assert "ROCR_VISIBLE_DEVICES=0" in str(info.value) and RX_IGPU in str(info.value)


def test_user_variables_compose_rocr_first_then_hip():
    gpus = devices.amd_gpus(RX)
    env = {"ROCR_VISIBLE_DEVICES": "1,0", "HIP_VISIBLE_DEVICES": "0"}
    assert [g.stable_id for g in devices.user_visible(gpus, "hip", env)] == [RX_IGPU]
    assert devices.user_visible(gpus, "hip", {"HIP_VISIBLE_DEVICES": "5"}) is None
    assert devices.user_visible(gpus, "hip", {"ROCR_VISIBLE_DEVICES": "GPU-dead"}) is None
    assert [g.index for g in devices.user_visible(gpus, "hip", {})] == [0, 1]


def test_mi300x_pins():
    gpus = devices.amd_gpus(MI)
    assert devices.select_gpus(gpus, pinned=[MI_1], env={}).env == {"HIP_VISIBLE_DEVICES": "1"}
    assert devices.select_gpus(gpus, pinned=[MI_1, MI_0], env={}).env == {}
    assert devices.select_gpus(gpus, env={}).env == {}


def test_gpus_the_build_lacks_are_skipped_with_a_reason():
    gpus = devices.amd_gpus(MI)
    selection = devices.select_gpus(gpus, build_targets={"gfx90a"}, env={})
    assert selection.gpus == () and selection.env == {}
    assert all("not built for gfx942 (built for gfx90a)" in why for _, why in selection.left_out)
    assert len(devices.select_gpus(gpus, build_targets={"gfx9-4-generic"}, env={}).gpus) == 2
    override = {"HSA_OVERRIDE_GFX_VERSION": "9.4.2"}
    assert len(devices.select_gpus(gpus, build_targets={"gfx90a"}, env=override).gpus) == 2
    # On the RX 7800 XT machine, a gfx1100-only build leaves no GPU at all.
    rx = devices.select_gpus(devices.amd_gpus(RX), build_targets={"gfx1100"}, env={})
    assert rx.gpus == () and len(rx.left_out) == 2


def _nvidia(index: int, bus: str, uuid: str) -> GpuInfo:
    return GpuInfo(
        index=index,
        vendor="nvidia",
        name="NVIDIA H100",
        memory_total=80 * GIB,
        memory_free=(70 - 10 * index) * GIB,
        pci_bus=bus,
        unique_id=uuid,
    )


def test_cuda_runtime_gets_cuda_visible_devices_by_uuid_only():
    gpus = [
        *devices.amd_gpus(RX),
        _nvidia(0, "0000:41:00.0", "GPU-aaaa-0"),
        _nvidia(1, "0000:61:00.0", "GPU-bbbb-1"),
    ]
    selection = devices.select_gpus(gpus, runtime="cuda", pinned=["0000:61:00.0"], env={})
    assert selection.env == {"CUDA_VISIBLE_DEVICES": "GPU-bbbb-1"}
    assert devices.select_gpus(gpus, runtime="cuda", env={}).env == {}
    user = {"CUDA_VISIBLE_DEVICES": "GPU-aaaa-0"}
    assert devices.select_gpus(gpus, runtime="cuda", env=user).env == {}
    assert [g.stable_id for g in devices.select_gpus(gpus, runtime="cuda", env=user).gpus] == [
        "0000:41:00.0"
    ]


# ------------------------------------------------------------------ placement


def test_place_picks_the_gpu_with_the_most_free_memory():
    gpus = devices.amd_gpus(MI)
    placement = devices.place(100 * GIB, gpus)
    assert [g.stable_id for g in placement.gpus] == [MI_1]  # 191.7 GiB free against 143.7
    assert placement.fits and placement.tensor_split is None
    assert "most free memory" in placement.reason
    # 150 GiB fits only the second GPU; still one GPU, no split.
    assert [g.stable_id for g in devices.place(150 * GIB, gpus).gpus] == [MI_1]


def test_place_says_when_only_a_split_fits():
    placement = devices.place(300 * GIB, devices.amd_gpus(MI))
    assert [g.stable_id for g in placement.gpus] == [MI_1] and not placement.fits
    assert "set split" in placement.reason


def test_place_splits_in_proportion_to_free_memory():
    gpus = devices.amd_gpus(MI)
    placement = devices.place(300 * GIB, gpus, split=True)
    assert [g.stable_id for g in placement.gpus] == [MI_0, MI_1] and placement.fits
    assert placement.tensor_split == (gpus[0].memory_free >> 20, gpus[1].memory_free >> 20)
    assert placement.free == gpus[0].memory_free + gpus[1].memory_free


def test_place_honours_pins_and_reservations():
    gpus = devices.amd_gpus(MI)
    assert [g.stable_id for g in devices.place(GIB, gpus, pinned=[MI_0]).gpus] == [MI_0]
    pinned_both = devices.place(GIB, gpus, pinned=[MI_1, MI_0])
    assert len(pinned_both.gpus) == 2 and pinned_both.tensor_split is not None
    # 100 GiB promised to a load in progress on the second GPU: the first wins now.
    reserved = {MI_1: 100 * GIB}
    assert [g.stable_id for g in devices.place(GIB, gpus, reserved=reserved).gpus] == [MI_0]


def test_place_breaks_ties_by_index_and_handles_no_gpu():
    gpu = devices.amd_gpus(MI)[1]
    twins = [attrs.evolve(gpu, index=1, pci_bus=MI_1), attrs.evolve(gpu, index=0, pci_bus=MI_0)]
    assert devices.place(GIB, twins).gpus[0].stable_id == MI_0
    empty = devices.place(GIB, [])
    assert empty.gpus == () and not empty.fits


def test_place_model_selects_then_places(monkeypatch):
    from rocmux import config as rocmux_config

    monkeypatch.setattr(rocmux_config, "_cached", rocmux_config.Config())
    mi = devices.amd_gpus(MI)
    placement = devices.place_model(10 * GIB, gpus=mi, env={})
    assert [g.stable_id for g in placement.gpus] == [MI_1]
    assert len(devices.place_model(10 * GIB, gpus=mi, split=True, env={}).gpus) == 2
    # The iGPU beside the RX 7800 XT is never a candidate, however much GTT it has.
    rx = devices.amd_gpus(RX)
    assert [g.stable_id for g in devices.place_model(GIB, gpus=rx, env={}).gpus] == [RX_DGPU]
    both = devices.place_model(GIB, gpus=mi, pinned=[MI_0, MI_1], env={})
    assert both.tensor_split is not None
    monkeypatch.setattr(rocmux_config, "_cached", None)


def test_runtime_ids_of_stable_ids():
    gpus = devices.amd_gpus(MI)
    assert devices.runtime_ids([MI_1], gpus) == ("ROCm1",)
    assert devices.runtime_ids(["GPU-2f1c5a7be0943d61", MI_1], gpus) == ("ROCm0", "ROCm1")
    with pytest.raises(ConfigError):
        devices.runtime_ids(["0000:99:00.0"], gpus)


def test_metric_labels_use_the_stable_id():
    gpu = devices.amd_gpus(MI)[1]
    assert devices.metric_labels(gpu) == {"device": MI_1, "name": "AMD Instinct MI300X"}


# ------------------------------------------------------------------ ROCMUX_SYSFS_ROOT and snapshots


def test_rocmux_sysfs_root_points_detection_at_a_recorded_tree(monkeypatch):
    monkeypatch.setenv("ROCMUX_SYSFS_ROOT", str(MI))
    assert devices.default_root() == MI
    assert [g.stable_id for g in devices.detect_gpus()] == [MI_0, MI_1]
    assert devices.cpu_info().name == "AMD EPYC 9654 96-Core Processor"
    gpu = devices.detect_gpus()[0]
    assert devices.memory_now(gpu) == (gpu.memory_used, gpu.memory_free)
    monkeypatch.delenv("ROCMUX_SYSFS_ROOT")
    assert devices.default_root() == Path("/")


@pytest.mark.parametrize("tree", TREES, ids=lambda p: p.name)
def test_snapshot_round_trip(tree, tmp_path):
    """A snapshot of a recorded tree, loaded back as a new root, detects the same."""
    doc = devices.take_snapshot(tree)
    assert doc["format"] == "rocmux-sysfs-snapshot" and doc["files"]
    assert "sys/class/kfd/kfd/topology/nodes/1/properties" in doc["files"]
    root = devices.load_snapshot(json.loads(json.dumps(doc)), tmp_path / "replayed")
    assert devices.amd_gpus(root) == devices.amd_gpus(tree)
    before, after = devices.cpu_info(tree), devices.cpu_info(root)
    assert (after.name, after.memory_total, after.memory_free) == (
        before.name,
        before.memory_total,
        before.memory_free,
    )
    assert [g["stable_id"] for g in doc["detected"]["gpus"]] == [
        g.stable_id for g in devices.amd_gpus(tree)
    ]


def test_snapshot_keeps_device_links_and_render_node_access(tmp_path):
    root = copy_tree(MI, tmp_path)
    set_property(root, 2, "location_id", 0)  # the address must come from the link
    (root / "dev/dri").mkdir(parents=True)
    (root / "dev/dri/renderD136").touch()  # renderD128 cannot be opened
    doc = devices.take_snapshot(root)
    assert doc["links"]["sys/class/drm/renderD128/device"].endswith("/0000:0c:00.0")
    assert doc["render_nodes"] == {"128": False, "136": True}
    replayed = devices.load_snapshot(doc, tmp_path / "replayed")
    assert devices.amd_gpus(replayed) == devices.amd_gpus(root)
    first, second = devices.amd_gpus(replayed)
    assert (first.pci_bus, first.index, second.index) == (MI_0, None, 0)


def test_snapshot_command_and_replay_through_the_environment(tmp_path, monkeypatch, capsys):
    from rocmux.cli import main

    monkeypatch.setenv("ROCMUX_SYSFS_ROOT", str(RX))
    snapshot = tmp_path / "my-machine.json"
    assert main(["devices", "--json", "--snapshot", str(snapshot)]) == 0
    captured = capsys.readouterr()
    original = json.loads(captured.out)
    assert f"in {snapshot}" in captured.err and snapshot.is_file()

    monkeypatch.setenv("ROCMUX_SYSFS_ROOT", str(snapshot))  # the JSON file itself
    assert main(["devices", "--json"]) == 0
    replayed = json.loads(capsys.readouterr().out)
    assert replayed["gpus"] == original["gpus"]
    assert replayed["hip_visible_devices"] == "0"


@pytest.mark.parametrize(
    "bad",
    [
        {"format": "something else", "version": 1},
        {"format": "rocmux-sysfs-snapshot", "version": 99},
        {"format": "rocmux-sysfs-snapshot", "version": 1, "files": {"../escape": "x"}},
        {"format": "rocmux-sysfs-snapshot", "version": 1, "files": {"/etc/passwd": "x"}},
        {"format": "rocmux-sysfs-snapshot", "version": 1, "links": {"a": "../../b"}},
    ],
)
def test_load_snapshot_refuses_bad_documents(bad, tmp_path):
    with pytest.raises(ValueError):
        devices.load_snapshot(bad, tmp_path / "out")
    assert not (tmp_path / "escape").exists()


# ------------------------------------------------------------------ [devices] in rocmux.toml


def test_devices_table_in_the_config():
    from rocmux.config import Config

    config = Config.from_mapping(
        {"devices": {"extra_targets": ["GFX1102"], "keep_integrated": True}}
    )
    assert config.devices.extra_targets == ("gfx1102",)
    assert config.devices.keep_integrated is True
    assert Config().devices.extra_targets == ()
    for bad in ({"extra_targets": "gfx1102"}, {"extra_targets": ["1102"]}, {"keep": True}):
        with pytest.raises(ConfigError):
            Config.from_mapping({"devices": bad})


def test_extra_targets_reach_the_default_selection(tmp_path, monkeypatch):
    from rocmux import config as rocmux_config

    toml = tmp_path / "rocmux.toml"
    toml.write_text('[devices]\nextra_targets = ["gfx1103"]\nkeep_integrated = true\n')
    monkeypatch.setenv("ROCMUX_CONFIG", str(toml))
    monkeypatch.setattr(rocmux_config, "_cached", None)
    selection = devices.default_selection(devices.amd_gpus(RX), env={})
    assert len(selection.gpus) == 2 and selection.env == {}
    monkeypatch.setattr(rocmux_config, "_cached", None)


# ------------------------------------------------------------------ runtime launches

HELP = DATA / "llama_server_help.txt"


def fake_llama_server(folder: Path, devices_text: str, library: bytes | None = None) -> Path:
    """A stand-in llama-server that answers --version, --list-devices and --help, with
    an optional libggml-hip.so beside it holding ``library`` (offload bundle ids)."""
    folder.mkdir(parents=True, exist_ok=True)
    server = folder / "llama-server"
    server.write_text(
        "#!/bin/sh\n"
        'case "$1" in\n'
        '  --version) echo "version: 9999 (fake)";;\n'
        f"  --list-devices) printf '%s\\n' 'Available devices:' {devices_text};;\n"
        f'  --help) cat "{HELP}";;\n'
        "esac\n"
    )
    server.chmod(0o755)
    if library is not None:
        (folder / "libggml-hip.so").write_bytes(b"\x7fELF" + b"\0" * 64 + library)
    return server


# `llama-server --list-devices` lines, as shell words for the stand-in's printf.
ROCM_LIST = (
    "'  ROCm0: AMD Radeon RX 7800 XT (16368 MiB, 15088 MiB free)' "
    "'  ROCm1: AMD Radeon 780M (512 MiB, 444 MiB free)'"
)
MI_LIST = (
    "'  ROCm0: AMD Instinct MI300X (196592 MiB, 147130 MiB free)' "
    "'  ROCm1: AMD Instinct MI300X (196592 MiB, 196306 MiB free)'"
)


@pytest.fixture
def launch_env(tmp_path, monkeypatch):
    """A clean environment for building llama-server launches: no visibility variable,
    an empty rocmux.toml, and a tiny model."""
    from gguf_factory import write_tiny_llama
    from rocmux import config as rocmux_config

    for name in (
        *devices.VISIBILITY_VARIABLES,
        "HSA_OVERRIDE_GFX_VERSION",
        "ROCM_LLAMA_SERVER_PATH",
    ):
        monkeypatch.delenv(name, raising=False)
    toml = tmp_path / "rocmux.toml"
    toml.write_text("")
    monkeypatch.setenv("ROCMUX_CONFIG", str(toml))
    monkeypatch.setattr(rocmux_config, "_cached", None)
    model = write_tiny_llama(tmp_path / "tiny.gguf")

    def prepare(
        tree: Path,
        server: Path,
        config: object = None,
        toml_text: str = "",
        env: dict[str, str] | None = None,
    ):
        import anyio
        from rocmux.types import LoadConfig
        from rocmux_llamacpp_hip.backend import LlamaCppBackend

        toml.write_text(toml_text)
        monkeypatch.setattr(rocmux_config, "_cached", None)
        monkeypatch.setenv("ROCMUX_SYSFS_ROOT", str(tree))
        monkeypatch.setenv("ROCMUX_LLAMA_SERVER", str(server))
        for name, value in (env or {}).items():
            monkeypatch.setenv(name, value)
        backend = LlamaCppBackend()
        launch, notes = anyio.run(backend.prepare, model, config or LoadConfig())
        child = {**os.environ, **launch.env}  # what the supervisor gives the process
        return launch, notes, child

    return prepare


def visibility_vars(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k in devices.VISIBILITY_VARIABLES}


def test_launch_leaves_the_igpu_out_with_one_variable(launch_env, tmp_path):
    server = fake_llama_server(tmp_path / "bin", ROCM_LIST)
    launch, notes, child = launch_env(RX, server)
    assert launch.env == {"HIP_VISIBLE_DEVICES": "0"}
    assert visibility_vars(child) == {"HIP_VISIBLE_DEVICES": "0"}  # never ROCR as well
    assert any(RX_IGPU in n and "ROCm does not support gfx1103" in n for n in notes)
    assert any("memory fit on 0000:03:00.0" in n for n in notes)


def test_launch_pins_by_stable_id(launch_env, tmp_path):
    from rocmux.types import LoadConfig

    server = fake_llama_server(tmp_path / "bin", ROCM_LIST)
    override = {"HSA_OVERRIDE_GFX_VERSION": "11.0.0"}
    launch, _, child = launch_env(RX, server, LoadConfig(devices=[RX_IGPU]), env=override)
    assert launch.env == {"HSA_OVERRIDE_GFX_VERSION": "11.0.0", "HIP_VISIBLE_DEVICES": "1"}
    assert visibility_vars(child) == {"HIP_VISIBLE_DEVICES": "1"}
    # Without the override the iGPU's target is refused before anything starts.
    with pytest.raises(ConfigError, match="ROCm does not support gfx1103"):
        launch_env(RX, server, LoadConfig(devices=[RX_IGPU]), env={"HSA_OVERRIDE_GFX_VERSION": ""})


def test_launch_warns_about_an_index_pin(launch_env, tmp_path):
    from rocmux.types import LoadConfig

    server = fake_llama_server(tmp_path / "bin", ROCM_LIST)
    launch, notes, _ = launch_env(RX, server, LoadConfig(devices=["0"]))
    assert launch.env == {"HIP_VISIBLE_DEVICES": "0"}
    assert any("'0' is an enumeration index" in n and f'"{RX_DGPU}"' in n for n in notes)


def test_launch_respects_the_users_rocr_visible_devices(launch_env, tmp_path):
    from rocmux.types import LoadConfig

    server = fake_llama_server(tmp_path / "bin", ROCM_LIST)
    user = {"ROCR_VISIBLE_DEVICES": "GPU-8c3f1b6e2a9d4057"}
    launch, notes, child = launch_env(RX, server, LoadConfig(devices=[RX_DGPU]), env=user)
    assert visibility_vars(launch.env) == {}
    assert visibility_vars(child) == user  # exactly one variable: the user's
    assert any("compose" in n for n in notes)
    with pytest.raises(ConfigError, match="ROCR_VISIBLE_DEVICES=GPU-8c3f1b6e2a9d4057"):
        launch_env(RX, server, LoadConfig(devices=[RX_IGPU]), env=user)


def test_launch_places_on_the_mi300x_with_the_most_free_memory(launch_env, tmp_path):
    server = fake_llama_server(tmp_path / "bin", MI_LIST)
    launch, notes, _ = launch_env(MI, server)
    assert launch.env == {"HIP_VISIBLE_DEVICES": "1"}
    assert "--tensor-split" not in launch.argv
    assert any(MI_1 in n and "most free memory" in n for n in notes)


def test_launch_splits_when_asked(launch_env, tmp_path):
    from rocmux.types import LoadConfig

    server = fake_llama_server(tmp_path / "bin", MI_LIST)
    gpus = devices.amd_gpus(MI)
    split = f"{gpus[0].memory_free >> 20},{gpus[1].memory_free >> 20}"
    launch, _, _ = launch_env(MI, server, toml_text="[backends.llamacpp_hip]\nsplit = true\n")
    assert visibility_vars(launch.env) == {}  # both GPUs: nothing to hide
    assert launch.argv[launch.argv.index("--tensor-split") + 1] == split
    # Pinning two GPUs splits over them too; the user's own --tensor-split wins.
    config = LoadConfig(devices=[MI_0, MI_1], extra_flags=["--tensor-split", "1,3"])
    launch, _, _ = launch_env(MI, server, config)
    assert launch.argv.count("--tensor-split") == 1
    assert launch.argv[launch.argv.index("--tensor-split") + 1] == "1,3"
    # --split-mode none in the extra flags means one GPU, whatever the option says.
    config = LoadConfig(extra_flags=["--split-mode", "none"])
    launch, _, _ = launch_env(
        MI, server, config, toml_text="[backends.llamacpp_hip]\nsplit = true\n"
    )
    assert launch.env == {"HIP_VISIBLE_DEVICES": "1"}


def test_launch_skips_gpus_the_build_lacks(launch_env, tmp_path):
    gfx1100_only = b"__CLANG_OFFLOAD_BUNDLE__\0\0hipv4-amdgcn-amd-amdhsa--gfx1100\0"
    server = fake_llama_server(tmp_path / "bin", ROCM_LIST, library=gfx1100_only)
    launch, notes, child = launch_env(RX, server)
    # Neither gfx1101 nor gfx1103 is in the build: the model stays on the CPU instead of
    # failing at the first kernel with "invalid device function".
    assert launch.argv[launch.argv.index("--device") + 1] == "none"
    assert launch.argv[launch.argv.index("--n-gpu-layers") + 1] == "0"
    assert visibility_vars(child) == {}
    assert any("build targets gfx1100 (from code objects in" in n for n in notes)
    assert any("not built for gfx1101 (built for gfx1100)" in n for n in notes)

    generic = b"hipv4-amdgcn-amd-amdhsa--gfx11-generic\0hipv4-amdgcn-amd-amdhsa--gfx1100\0"
    server = fake_llama_server(tmp_path / "bin2", ROCM_LIST, library=generic)
    launch, _, _ = launch_env(RX, server)
    assert launch.env == {"HIP_VISIBLE_DEVICES": "0"} and "--device" not in launch.argv


def test_build_targets_sources(tmp_path):
    from rocmux_llamacpp_hip.placement import build_targets

    build = tmp_path / "build"
    server = fake_llama_server(build / "bin", ROCM_LIST)
    assert build_targets(server).targets is None
    (build / "CMakeCache.txt").write_text(
        "CMAKE_BUILD_TYPE:STRING=Release\nAMDGPU_TARGETS:STRING=gfx1100;gfx1101\n"
    )
    found = build_targets(server)
    assert found.targets == {"gfx1100", "gfx1101"} and found.source.endswith("CMakeCache.txt")
    assert build_targets(server, ["gfx942"]).targets == {"gfx942"}
    with pytest.raises(ConfigError):
        build_targets(server, "gfx942")


def test_cpu_build_refuses_a_pin(launch_env, tmp_path):
    from rocmux.types import LoadConfig

    server = fake_llama_server(tmp_path / "bin", "")
    with pytest.raises(ConfigError, match="cpu build"):
        launch_env(RX, server, LoadConfig(devices=[RX_DGPU]))
    launch, _, child = launch_env(RX, server)
    assert visibility_vars(child) == {}


def test_vllm_visibility_by_stable_id():
    from rocmux_vllm_rocm.args import visibility

    gpus = devices.amd_gpus(RX)
    env, notes = visibility((), gpus, env={})
    # One filter under the two names HIP reads; vLLM requires them equal.
    assert env == {"HIP_VISIBLE_DEVICES": "0", "CUDA_VISIBLE_DEVICES": "0"}
    assert any(RX_IGPU in n for n in notes)
    assert visibility([RX_DGPU], gpus, env={})[0]["HIP_VISIBLE_DEVICES"] == "0"
    user = {"ROCR_VISIBLE_DEVICES": "0"}
    assert visibility([RX_DGPU], gpus, env=user)[0] == {}
    with pytest.raises(ConfigError):
        visibility([RX_IGPU], gpus, env=user)
    mi = devices.amd_gpus(MI)
    assert visibility([MI_0, MI_1], mi, env={})[0] == {}  # both: nothing to hide
    with pytest.raises(ConfigError, match="no usable GPU"):
        visibility(["0000:99:00.0"], mi, env={})
    with pytest.raises(ConfigError, match="detects no AMD GPU"):
        visibility([MI_0], [], env={})
