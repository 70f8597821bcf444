"""llama-server flag mapping and build detection, from recorded output (no process)."""

from __future__ import annotations

from pathlib import Path

import pytest
from rocmux.errors import InvalidFlag
from rocmux.types import LoadConfig
from rocmux_llamacpp_hip.backend import describe, device_env
from rocmux_llamacpp_hip.binary import BuildInfo, parse_devices, parse_help_flags, parse_version
from rocmux_llamacpp_hip.flags import base_flags, merge_extra
from rocmux_llamacpp_hip.install import cmake_args

KNOWN = parse_help_flags((Path(__file__).parent / "data" / "llama_server_help.txt").read_text())

ROCM_DEVICES = """\
ggml_cuda_init: found 2 ROCm devices:
  Device 0: AMD Radeon RX 7900 XTX, gfx1100 (0x1100), VMM: no, Wave Size: 32
Available devices:
  ROCm0: AMD Radeon RX 7900 XTX (24560 MiB, 24346 MiB free)
  ROCm1: AMD Radeon Graphics (512 MiB, 400 MiB free)
"""
CUDA_DEVICES = """\
Available devices:
  CUDA0: NVIDIA H100 80GB HBM3 (81559 MiB, 81000 MiB free)
"""
CPU_DEVICES = "Available devices:\n  (none)\n"


def test_help_parsing_groups_aliases():
    assert KNOWN["-c"] == KNOWN["--ctx-size"] == frozenset({"-c", "--ctx-size"})
    assert {"-ngl", "--gpu-layers", "--n-gpu-layers"} <= KNOWN["-ngl"]
    assert "--no-webui" in KNOWN
    assert "--flash-attn" in KNOWN
    assert "print" not in KNOWN and "N" not in KNOWN


def test_base_flags_map_load_config():
    argv = base_flags(
        Path("/m.gguf"),
        LoadConfig(gpu_layers=99, context_len=4096, parallel=4, flash_attn=True, threads=8),
    )
    text = " ".join(argv)
    for piece in (
        "--model /m.gguf",
        "--n-gpu-layers 99",
        "--ctx-size 4096",
        "--parallel 4",
        "--flash-attn on",
        "--threads 8",
        "--port {port}",
        "--host {host}",
    ):
        assert piece in text
    assert "--ctx-size" not in " ".join(base_flags(Path("/m.gguf"), LoadConfig()))


def test_every_flag_rocmux_sets_exists_in_the_binary():
    argv = base_flags(
        Path("/m.gguf"),
        LoadConfig(gpu_layers=1, context_len=1, parallel=1, flash_attn=False, threads=1),
    )
    assert all(item in KNOWN for item in argv if item.startswith("-"))


def test_users_extra_flag_wins_over_rocmux_value_through_aliases():
    base = base_flags(Path("/m.gguf"), LoadConfig(context_len=4096, gpu_layers=10))
    merged = merge_extra(base, ["-c", "8192", "-ngl", "0", "--metrics"], KNOWN)
    assert merged.count("-c") == 1 and "--ctx-size" not in merged
    assert merged[merged.index("-c") + 1] == "8192"
    assert "--n-gpu-layers" not in merged
    assert merged[-1] == "--metrics"


def test_negative_numbers_are_values_not_flags():
    merged = merge_extra([], ["--seed", "-1"], KNOWN)
    assert merged == ["--seed", "-1"]


def test_unknown_extra_flag_is_a_clear_error():
    with pytest.raises(InvalidFlag, match="does not accept '--ctx'.*similar flags"):
        merge_extra([], ["--ctx", "10"], KNOWN)


def test_extra_flags_must_not_move_the_server():
    with pytest.raises(InvalidFlag, match="set by rocmux"):
        merge_extra([], ["--port", "80"], KNOWN)


def test_extra_flags_must_start_with_a_flag():
    with pytest.raises(InvalidFlag, match="must start with a flag"):
        merge_extra([], ["8192"], KNOWN)


@pytest.mark.parametrize(
    ("output", "kind", "ids"),
    [
        (ROCM_DEVICES, "hip", ["ROCm0", "ROCm1"]),
        (CUDA_DEVICES, "cuda", ["CUDA0"]),
        (CPU_DEVICES, "cpu", []),
    ],
)
def test_build_kind_and_devices_from_list_devices(output, kind, ids):
    found_kind, devices = parse_devices(output)
    assert found_kind == kind
    assert [d.id for d in devices] == ids


def test_device_memory_is_read():
    _, devices = parse_devices(ROCM_DEVICES)
    assert devices[0].memory_total == 24560 * 1024 * 1024
    assert devices[0].memory_free == 24346 * 1024 * 1024
    assert devices[0].kind == "rocm"


def test_priority_prefers_hip_with_a_gpu_then_cuda_then_cpu():
    def priority(output: str) -> int:
        kind, devices = parse_devices(output)
        info = BuildInfo(version="v", kind=kind, devices=devices)
        return describe(info, Path("/x"), "PATH").priority

    assert priority(ROCM_DEVICES) > priority(CUDA_DEVICES) > priority(CPU_DEVICES) > 0
    hip_without_gpu = describe(BuildInfo(version="v", kind="hip", devices=()), Path("/x"), "PATH")
    assert hip_without_gpu.ok and "sees no GPU" in hip_without_gpu.reason


def test_version_line():
    assert (
        parse_version("version: 0.6.0-dev (build 0, commit unknown)\nbuilt with GNU")
        == "0.6.0-dev (build 0, commit unknown)"
    )


def test_visible_devices_env(monkeypatch):
    monkeypatch.setenv("HSA_OVERRIDE_GFX_VERSION", "11.0.0")
    monkeypatch.delenv("HIP_VISIBLE_DEVICES", raising=False)
    env = device_env("hip", ("ROCm0", "2"))
    assert env == {"HSA_OVERRIDE_GFX_VERSION": "11.0.0", "HIP_VISIBLE_DEVICES": "0,2"}
    assert device_env("cuda", ("1",))["CUDA_VISIBLE_DEVICES"] == "1"


def test_setup_cmake_args():
    assert "-DGGML_HIP=ON" in cmake_args("hip")
    assert "-DGGML_CUDA=ON" in cmake_args("cuda")
    assert not any("GGML_HIP" in a or "GGML_CUDA" in a for a in cmake_args("cpu"))


def test_igpu_is_left_out_beside_a_discrete_gpu(monkeypatch):
    from pathlib import Path as P

    from rocmux import devices
    from rocmux_llamacpp_hip.backend import igpu_exclusion

    trees = P(__file__).parent / "data" / "sysfs"
    for var in devices.VISIBILITY_VARIABLES:
        monkeypatch.delenv(var, raising=False)
    real = devices.detect_gpus
    monkeypatch.setattr(
        devices, "detect_gpus", lambda smi=True: real(trees / "rdna3_dgpu", smi=False)
    )
    assert igpu_exclusion() == {"HIP_VISIBLE_DEVICES": "0"}
    monkeypatch.setattr(
        devices, "detect_gpus", lambda smi=True: real(trees / "apu_strix_halo", smi=False)
    )
    assert igpu_exclusion() == {}
    monkeypatch.setenv("HIP_VISIBLE_DEVICES", "1")
    monkeypatch.setattr(
        devices, "detect_gpus", lambda smi=True: real(trees / "rdna3_dgpu", smi=False)
    )
    assert igpu_exclusion() == {}
