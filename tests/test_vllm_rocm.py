"""Tests of the vllm_rocm backend.

Three kinds, named so that nobody mistakes one for another:

- ``test_stub_vllm_*``: the plugin drives a STAND-IN for ``vllm serve``
  (``tests/servers/fake_vllm_server.py``: argparse with vLLM's flag names, vLLM's
  endpoints and chunk format, no model, no GPU) through the real supervisor, client and
  ``ServedModel``. They test rocmux's side only; they say nothing about vLLM itself.
- ``test_real_vllm_*``: the real ``vllm serve``; skipped where vLLM is not installed,
  and a skip does not count as passing.
- Unit tests of the argument mapping and of the detection decision; those of the
  decision fake the small detection functions and say so in their names.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from contextlib import aclosing
from importlib.util import find_spec
from pathlib import Path

import anyio
import httpx
import pytest
from rocmux import config as rocmux_config
from rocmux import hookimpl
from rocmux.devices import GpuInfo
from rocmux.errors import (
    BinaryNotFound,
    ConfigError,
    InvalidFlag,
    InvalidModel,
    ModelNotFound,
    ServerCrashed,
    StartupFailed,
)
from rocmux.events import LifecycleEvent
from rocmux.launch import HOST, PORT
from rocmux.manager import PluginManager
from rocmux.types import GenerateConfig, LoadConfig, Message
from rocmux_vllm_rocm import detect
from rocmux_vllm_rocm.args import (
    VllmOptions,
    base_flags,
    canonical,
    device_env,
    merge_extra,
    parse_help_flags,
    serve_args,
)
from rocmux_vllm_rocm.backend import READY_LINE, VllmBackend, VllmModel

pytestmark = pytest.mark.anyio

STAND_IN = Path(__file__).parent / "servers" / "fake_vllm_server.py"
SENTENCE = "Hello from the stand-in vLLM server, which generates this one sentence."


# -- fixtures ----------------------------------------------------------------------------------


class Recorder:
    """A plugin that records lifecycle events."""

    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def plugins(recorder: Recorder) -> PluginManager:
    manager = PluginManager.discover()
    manager.register(recorder, name="recorder")
    return manager


@pytest.fixture
def toml(tmp_path, monkeypatch):
    """Writes the rocmux.toml in use (empty by default) and drops the cached config."""
    path = tmp_path / "rocmux.toml"

    def write(text: str = "") -> Path:
        path.write_text(textwrap.dedent(text))
        monkeypatch.setattr(rocmux_config, "_cached", None)
        return path

    monkeypatch.setenv("ROCMUX_CONFIG", str(write()))
    for var in ("ROCMUX_VLLM", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(var, raising=False)
    return write


class StandIn:
    """The STAND-IN vllm executable: a shell wrapper around fake_vllm_server.py."""

    def __init__(self, root: Path) -> None:
        self.path = root / "bin" / "vllm"
        self.path.parent.mkdir()
        self.path.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{STAND_IN}" "$@"\n')
        self.path.chmod(0o755)
        self.log = root / "stand-in.jsonl"
        self.marker = root / "crashed-once"

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def launches(self) -> list[dict]:
        return [r for r in self.records() if "argv" in r]

    def requests(self) -> list[dict]:
        return [r for r in self.records() if "path" in r]


@pytest.fixture
def stand_in(tmp_path, monkeypatch, toml) -> StandIn:
    """Points the plugin at the STAND-IN through ROCMUX_VLLM."""
    fake = StandIn(tmp_path)
    monkeypatch.setenv("ROCMUX_VLLM", str(fake.path))
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(fake.log))
    return fake


@pytest.fixture
def hf_model(tmp_path) -> Path:
    """A folder shaped like a Hugging Face model (config.json); no weights."""
    folder = tmp_path / "Tiny-Instruct"
    folder.mkdir()
    (folder / "config.json").write_text(
        json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    )
    return folder


async def _load(plugins: PluginManager, model: Path, **config: object) -> VllmModel:
    return await VllmBackend(plugins=plugins).load(model, LoadConfig(**config))  # type: ignore[arg-type]


async def _text(stream: object) -> tuple[str, str | None, list]:
    pieces, finish, tokens = [], None, []
    async with aclosing(stream) as items:  # type: ignore[type-var]
        async for token in items:
            tokens.append(token)
            pieces.append(token.text)
            finish = token.finish_reason or finish
    return "".join(pieces), finish, tokens


async def _running(url: str) -> float:
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"{url}/metrics")).text
    match = re.search(r"^vllm:num_requests_running\{[^}]*\} (\S+)$", text, re.MULTILINE)
    assert match, text
    return float(match[1])


# -- the STAND-IN server, through the plugin ---------------------------------------------------


async def test_stub_vllm_spawn_readiness_and_command_line(stand_in, hf_model, plugins, recorder):
    """STAND-IN: the plugin spawns `vllm serve MODEL ...` with the mapped flags, waits for
    /health, and the server serves the model under its folder name."""
    async with await _load(plugins, hf_model, context_len=2048, parallel=4) as model:
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(f"{model.url}/health")).status_code == 200
            models = (await client.get(f"{model.url}/v1/models")).json()
        pid = model.server.pid
    assert [m["id"] for m in models["data"]] == ["Tiny-Instruct"]
    assert models["data"][0]["max_model_len"] == 2048
    argv = stand_in.launches()[0]["argv"]
    port = model.url.rsplit(":", 1)[1]
    assert argv[:2] == ["serve", str(hf_model)]
    assert argv[2:] == [
        "--host", "127.0.0.1", "--port", port, "--served-model-name", "Tiny-Instruct",
        "--max-model-len", "2048", "--max-num-seqs", "4",
    ]  # fmt: skip
    assert recorder.kinds() == ["spawned", "ready", "stopped"]
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


async def test_stub_vllm_streams_a_completion_with_usage(stand_in, hf_model, plugins):
    """STAND-IN: /v1/completions chunks become tokens; usage arrives at the end."""
    async with await _load(plugins, hf_model) as model:
        text, finish, tokens = await _text(model.generate("Say hi", GenerateConfig(max_tokens=4)))
    assert text == "Hello from the stand-in"
    assert finish == "length"
    assert tokens[-1].usage.completion_tokens == 4
    body = stand_in.requests()[0]["body"]
    assert body["model"] == "Tiny-Instruct"
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


async def test_stub_vllm_streams_a_chat_reply(stand_in, hf_model, plugins):
    """STAND-IN: /v1/chat/completions deltas become tokens; the role chunk adds nothing."""
    async with await _load(plugins, hf_model) as model:
        text, finish, _ = await _text(
            model.chat([Message("user", "Hi")], GenerateConfig(max_tokens=100))
        )
    assert text == SENTENCE
    assert finish == "stop"
    assert stand_in.requests()[0]["path"] == "/v1/chat/completions"


async def test_stub_vllm_sampling_fields_use_vllm_names(stand_in, hf_model, plugins):
    """STAND-IN: repeat_penalty goes out as vLLM's repetition_penalty."""
    config = GenerateConfig(max_tokens=2, temperature=0.0, top_k=5, repeat_penalty=1.1, seed=3)
    async with await _load(plugins, hf_model) as model:
        await _text(model.generate("x", config))
    body = stand_in.requests()[0]["body"]
    assert body["repetition_penalty"] == 1.1
    assert "repeat_penalty" not in body
    assert (body["top_k"], body["seed"], body["temperature"]) == (5, 3, 0.0)


async def test_stub_vllm_leaving_the_loop_cancels_the_request(
    stand_in, hf_model, plugins, monkeypatch
):
    """STAND-IN: breaking out of the loop closes the connection; the server sees the
    request go (vllm:num_requests_running back to 0) and the model keeps working."""
    monkeypatch.setenv("FAKE_VLLM_TOKEN_DELAY", "0.01")
    async with await _load(plugins, hf_model) as model:
        model.request_defaults["ignore_eos"] = True
        seen = 0
        async with aclosing(model.generate("Count:", GenerateConfig(max_tokens=100_000))) as items:
            async for _token in items:
                seen += 1
                if seen == 3:
                    assert await _running(model.url) == 1
                    break
        # 100000 tokens at 10 ms each would take 17 minutes.
        with anyio.fail_after(5):
            while await _running(model.url) != 0:
                await anyio.sleep(0.02)
        text, finish, _ = await _text(model.generate("Again", GenerateConfig(max_tokens=2)))
    assert (text, finish) == ("Hello from", "length")


async def test_stub_vllm_sigkill_mid_stream_is_reported_then_restarted(
    stand_in, hf_model, plugins, recorder
):
    """STAND-IN: SIGKILL mid-stream gives ServerCrashed with the signal; the next request
    starts a new server."""
    async with await _load(plugins, hf_model) as model:
        model.request_defaults["ignore_eos"] = True
        first_pid = model.server.pid
        with pytest.raises(ServerCrashed) as info:
            async for _token in model.generate("x", GenerateConfig(max_tokens=100_000)):
                os.kill(first_pid, signal.SIGKILL)
        assert info.value.returncode == -signal.SIGKILL
        assert "SIGKILL" in str(info.value)
        assert model.err() is info.value
        text, finish, _ = await _text(model.generate("x", GenerateConfig(max_tokens=3)))
        assert (text, finish) == ("Hello from the", "length")
        assert model.server.pid != first_pid
    kinds = recorder.kinds()
    assert kinds.index("crashed") < kinds.index("restarted")
    assert len(stand_in.launches()) == 2


async def test_stub_vllm_engine_death_mid_stream_quotes_its_log(
    stand_in, hf_model, plugins, monkeypatch
):
    """STAND-IN: a server that exits by itself mid-stream (exit code 1 after an EngineCore
    error) gives ServerCrashed with that code and its last log lines."""
    monkeypatch.setenv("FAKE_VLLM_CRASH_AFTER", "3")
    monkeypatch.setenv("FAKE_VLLM_CRASH_MARKER", str(stand_in.marker))
    async with await _load(plugins, hf_model) as model:
        with pytest.raises(ServerCrashed) as info:
            await _text(model.generate("x", GenerateConfig(max_tokens=50)))
        assert info.value.returncode == 1
        assert "EngineCore encountered a fatal error" in info.value.stderr_tail
        assert "exit code 1" in str(info.value)
        # The stand-in crashes once; the restarted one streams to the end.
        text, finish, _ = await _text(model.generate("x", GenerateConfig(max_tokens=5)))
    assert finish == "length"
    assert text == "Hello from the stand-in vLLM"


async def test_stub_vllm_failure_before_ready_quotes_the_output(
    stand_in, hf_model, plugins, monkeypatch
):
    """STAND-IN: a server that dies while loading gives StartupFailed with its output."""
    monkeypatch.setenv("FAKE_VLLM_FAIL_AT_START", "1")
    with pytest.raises(StartupFailed, match="exited with code 1") as info:
        await _load(plugins, hf_model)
    assert "HIP out of memory" in str(info.value)


async def test_stub_vllm_slow_load_hits_the_startup_timeout(
    stand_in, hf_model, plugins, monkeypatch
):
    """STAND-IN: a server still loading at the deadline is killed with a clear error."""
    monkeypatch.setenv("FAKE_VLLM_LOAD_SECONDS", "30")
    backend = VllmBackend(plugins=plugins, startup_timeout=0.5)
    with pytest.raises(StartupFailed, match="not ready within 0.5 s"):
        await backend.load(hf_model, LoadConfig())


async def test_stub_vllm_unknown_extra_flag_is_refused_before_spawning(
    stand_in, hf_model, plugins, recorder
):
    """STAND-IN: extra flags are checked against `vllm serve --help=all`."""
    with pytest.raises(InvalidFlag, match="--tensor-paralel-size") as info:
        await _load(plugins, hf_model, extra_flags=["--tensor-paralel-size", "2"])
    assert "similar flags: " in str(info.value) and "--tensor-parallel-size" in str(info.value)
    assert "spawned" not in recorder.kinds()
    assert stand_in.launches() == []


async def test_stub_vllm_extra_flags_override_rocmux_values(stand_in, hf_model, plugins):
    """STAND-IN: the user's flag wins over rocmux's, in any spelling vLLM accepts."""
    async with await _load(
        plugins,
        hf_model,
        context_len=2048,
        devices=("0", "1"),
        extra_flags=["--max_model_len", "512", "-tp", "1", "--enable-prefix-caching"],
    ) as model:
        async with httpx.AsyncClient(trust_env=False) as client:
            models = (await client.get(f"{model.url}/v1/models")).json()
    argv = stand_in.launches()[0]["argv"]
    assert "--max-model-len" not in argv and "--tensor-parallel-size" not in argv
    assert argv[-5:] == ["--max_model_len", "512", "-tp", "1", "--enable-prefix-caching"]
    assert models["data"][0]["max_model_len"] == 512


async def test_stub_vllm_older_help_style_is_read_too(stand_in, hf_model, plugins, monkeypatch):
    """STAND-IN, legacy mode: where `--help=all` is an error and `--help` lists every
    flag (vLLM before 0.10), the flags are still read and checked."""
    monkeypatch.setenv("FAKE_VLLM_HELP_STYLE", "legacy")
    with pytest.raises(InvalidFlag, match="--no-such-flag"):
        await _load(plugins, hf_model, extra_flags=["--no-such-flag"])
    async with await _load(plugins, hf_model, extra_flags=["--enforce-eager"]):
        pass
    assert stand_in.launches()[0]["argv"][-1] == "--enforce-eager"


async def test_stub_vllm_tensor_parallel_over_four_gpus_reaches_the_server(
    stand_in, hf_model, plugins
):
    """STAND-IN: four chosen GPUs become --tensor-parallel-size 4 and the server's
    HIP_VISIBLE_DEVICES (the stand-in has no GPUs; it only records what it got)."""
    async with await _load(plugins, hf_model, devices=("0", "1", "2", "3")):
        pass
    launch = stand_in.launches()[0]
    argv = launch["argv"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert launch["env"] == {"HIP_VISIBLE_DEVICES": "0,1,2,3", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}


async def test_stub_vllm_options_from_rocmux_toml(
    tmp_path, toml, hf_model, plugins, tiny_model, monkeypatch
):
    """STAND-IN, configured only through rocmux.toml (`command`, not ROCMUX_VLLM): the
    backend options reach the command line, and a GGUF model gets its tokenizer."""
    fake = StandIn(tmp_path)
    toml(
        f"""
        [backends.vllm_rocm]
        command = "{fake.path}"
        gpu_memory_utilization = 0.85
        dtype = "bfloat16"
        quantization = "gguf"
        enforce_eager = true
        served_model_name = "tiny"
        tokenizer = "{hf_model}"
        """
    )
    monkeypatch.setenv("FAKE_VLLM_RECORD", str(fake.log))
    async with await _load(plugins, tiny_model) as model:
        text, _, _ = await _text(model.generate("x", GenerateConfig(max_tokens=1)))
    argv = fake.launches()[0]["argv"]
    assert argv[1] == str(tiny_model)
    assert argv[argv.index("--served-model-name") + 1] == "tiny"
    assert argv[argv.index("--tokenizer") + 1] == str(hf_model)
    assert argv[argv.index("--gpu-memory-utilization") + 1] == "0.85"
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
    assert argv[argv.index("--quantization") + 1] == "gguf"
    assert "--enforce-eager" in argv
    assert fake.requests()[0]["body"]["model"] == "tiny"
    assert text == "Hello"


# -- the real vllm serve -----------------------------------------------------------------------


@pytest.mark.skipif(
    find_spec("vllm") is None,
    reason="vLLM is not installed here: the real vllm serve integration test did not run",
)
async def test_real_vllm_serve_generates_and_chats(plugins, toml):
    """The real `vllm serve` on this machine's GPUs, with a small Hugging Face model
    ($ROCMUX_VLLM_TEST_MODEL, else Qwen/Qwen2.5-0.5B-Instruct from the Hugging Face cache
    or downloaded). A skip (vLLM not installed) does not count as passing: it means the
    plugin was not tested against vLLM at all."""
    folder = os.environ.get("ROCMUX_VLLM_TEST_MODEL")
    if folder is None:
        from huggingface_hub import snapshot_download

        folder = snapshot_download("Qwen/Qwen2.5-0.5B-Instruct")
    install = detect.locate_vllm()
    flags = detect.help_flags(install.argv, detect.stamp(install))
    assert flags["-tp"] >= {"--tensor-parallel-size"}
    availability = await VllmBackend(plugins=plugins).detect()
    assert availability.ok, availability.reason
    config = GenerateConfig.greedy(max_tokens=16)
    async with await _load(
        plugins, Path(folder), context_len=2048, extra_flags=["--enforce-eager"]
    ) as model:
        text, finish, tokens = await _text(model.generate("The capital of France is", config))
        assert "Paris" in text
        assert finish in ("length", "stop")
        assert tokens[-1].usage is not None
        text, _, _ = await _text(
            model.chat([Message("user", "What is the capital of France?")], config)
        )
        assert "Paris" in text


# -- argument mapping (unit) -------------------------------------------------------------------


def test_base_flags_map_load_config_and_options():
    options = VllmOptions(
        gpu_memory_utilization=0.8, dtype="bfloat16", quantization="awq", enforce_eager=True
    )
    config = LoadConfig(context_len=8192, parallel=16, gpu_layers=99, threads=4)
    assert base_flags(config, options, "m") == [
        "--host", HOST, "--port", PORT, "--served-model-name", "m",
        "--max-model-len", "8192", "--max-num-seqs", "16",
        "--gpu-memory-utilization", "0.8", "--dtype", "bfloat16",
        "--quantization", "awq", "--enforce-eager",
    ]  # fmt: skip


def test_multi_gpu_tensor_parallel_from_four_devices():
    config = LoadConfig(devices=("0", "1", "2", "3"))
    argv = serve_args("/m", config, VllmOptions(), "m", known=None)
    assert argv[:2] == ["serve", "/m"]
    assert argv[argv.index("--tensor-parallel-size") + 1] == "4"
    assert device_env(config.devices) == {
        "HIP_VISIBLE_DEVICES": "0,1,2,3",
        "CUDA_VISIBLE_DEVICES": "0,1,2,3",
    }


def test_devices_named_like_runtimes_and_an_explicit_tensor_parallel_size():
    assert device_env(("ROCm1", "ROCm3"))["HIP_VISIBLE_DEVICES"] == "1,3"
    argv = base_flags(LoadConfig(devices=("ROCm1", "ROCm3")), VllmOptions(), "m")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    argv = base_flags(LoadConfig(devices=("0", "1")), VllmOptions(tensor_parallel_size=1), "m")
    assert argv[argv.index("--tensor-parallel-size") + 1] == "1"
    assert "--tensor-parallel-size" not in base_flags(LoadConfig(), VllmOptions(), "m")
    assert device_env(()) == {}


@pytest.mark.parametrize("devices", [("CPU",), ("CUDA0",), ("0", "ROCm0")])
def test_devices_vllm_cannot_take(devices):
    with pytest.raises(ConfigError):
        device_env(devices)


# Built the way vLLM builds its parser (argparse, vLLM's flag spellings and aliases), so
# the text has the layout of `vllm serve --help=all`.
def _help_text() -> str:
    import argparse

    parser = argparse.ArgumentParser(
        prog="vllm serve",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog='JSON tip:\n   --json-arg \'{"key1": "value1"}\'\n   --json-arg.key1 value1',
    )
    parser.add_argument("model_tag", nargs="?")
    group = parser.add_argument_group(
        "ParallelConfig", "Configuration for the distributed execution."
    )
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, help="Number of " * 20)
    group.add_argument("--enforce-eager", action=argparse.BooleanOptionalAction, default=False)
    group.add_argument("--compilation-config", "-O", help="- a list item\n--not-a-flag here")
    group.add_argument(
        "--tool-call-parser", metavar="{a,b} or name registered in --tool-parser-plugin"
    )
    group.add_argument("--tool-parser-plugin", default="")
    group.add_argument("--dtype", choices=["auto", "half"], default="auto")
    return parser.format_help()


def test_help_parsing_finds_flags_and_their_aliases():
    flags = parse_help_flags(_help_text())
    assert flags["-tp"] == flags["--tensor-parallel-size"] == {"-tp", "--tensor-parallel-size"}
    assert flags["--no-enforce-eager"] == {"--enforce-eager", "--no-enforce-eager"}
    assert flags["--tool-call-parser"] == {"--tool-call-parser"}
    assert flags["--tool-parser-plugin"] == {"--tool-parser-plugin"}
    assert flags["-O"] == {"-O", "--compilation-config"}
    assert "--json-arg" not in flags and "--not-a-flag" not in flags and "model_tag" not in flags
    assert flags["--dtype"] == {"--dtype"}


@pytest.mark.parametrize(
    ("flag", "name"),
    [
        ("--max_model_len", "--max-model-len"),
        ("--max-model-len=512", "--max-model-len"),
        ("--compilation-config.level", "--compilation-config"),
        ("--compilation_config.cudagraph_capture_sizes+", "--compilation-config"),
        ("-O3", "-O"),
        ("-tp", "-tp"),
    ],
)
def test_flag_names_are_read_as_vllm_reads_them(flag, name):
    assert canonical(flag) == name


def test_merge_extra_dedupes_by_alias_and_validates():
    known = parse_help_flags(_help_text())
    base = ["--host", HOST, "--tensor-parallel-size", "4", "--enforce-eager"]
    merged = merge_extra(base, ["-tp", "2", "--no-enforce-eager", "-O3"], known)
    assert merged == ["--host", HOST, "-tp", "2", "--no-enforce-eager", "-O3"]
    assert merge_extra(base, ["--compilation-config.level", "3"], known)[-2:] == [
        "--compilation-config.level",
        "3",
    ]
    with pytest.raises(InvalidFlag, match=r"'--no-such-flag'.*vllm serve --help=all"):
        merge_extra(base, ["--no-such-flag"], known)
    with pytest.raises(InvalidFlag, match="must start with a flag"):
        merge_extra(base, ["4", "-tp"], known)


@pytest.mark.parametrize("flag", ["--port", "--host=0.0.0.0", "--api-key", "--served_model_name"])
def test_flags_rocmux_owns_are_refused_even_without_help(flag):
    with pytest.raises(InvalidFlag, match="set by rocmux"):
        merge_extra(["--host", HOST], [flag, "x"], None)


def test_without_help_the_extra_flags_pass_and_still_override():
    merged = merge_extra(
        ["--max-model-len", "8", "--dtype", "auto"], ["--max_model_len", "9"], None
    )
    assert merged == ["--dtype", "auto", "--max_model_len", "9"]


def test_options_table_is_checked():
    options = VllmOptions.from_table({"gpu_memory_utilization": 1, "enforce_eager": False})
    assert options.gpu_memory_utilization == 1.0
    assert options.startup_timeout == 900.0 and options.priority == 90
    with pytest.raises(ConfigError, match=r"unknown key backends.vllm_rocm.tp"):
        VllmOptions.from_table({"tp": 2})
    with pytest.raises(ConfigError, match="tensor_parallel_size must be an integer"):
        VllmOptions.from_table({"tensor_parallel_size": True})
    with pytest.raises(ConfigError, match="gpu_memory_utilization must be in"):
        VllmOptions.from_table({"gpu_memory_utilization": 1.5})


def test_ready_line_matches_uvicorn_startup_lines():
    assert READY_LINE.search("INFO:     Application startup complete.")
    assert READY_LINE.search("INFO:     Uvicorn running on http://0.0.0.0:8000 (Press CTRL+C)")
    assert not READY_LINE.search("INFO:     Waiting for application startup.")


async def test_models_vllm_cannot_load_are_refused_before_spawning(
    toml, plugins, recorder, tmp_path
):
    with pytest.raises(ModelNotFound, match="does not exist"):
        await _load(plugins, tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InvalidModel, match="without config.json"):
        await _load(plugins, tmp_path / "empty")
    (tmp_path / "w.bin").write_bytes(b"PK\x03\x04" * 10)
    with pytest.raises(InvalidModel, match="not a GGUF"):
        await _load(plugins, tmp_path / "w.bin")
    assert recorder.kinds() == []


# -- detection: the decision logic (unit tests with faked inputs) ------------------------------

ROCM_TORCH = detect.TorchBuild(version="2.5.1+rocm6.2", hip="6.2.41133-dd7f95766", python="py")
CUDA_TORCH = detect.TorchBuild(version="2.5.1+cu124", cuda="12.4", python="py")
CPU_TORCH = detect.TorchBuild(version="2.5.1+cpu", python="py")
VLLM = detect.VllmInstall(argv=("/opt/vllm/bin/vllm",), source="PATH", version="0.9.2")
RX7900 = GpuInfo(index=0, vendor="amd", name="AMD Radeon RX 7900 XTX", gfx_target="gfx1100")
NVIDIA = GpuInfo(index=0, vendor="nvidia", name="NVIDIA H100")
NOT_FOUND = BinaryNotFound("vLLM is not installed (tried ...)")


@pytest.fixture
def faked(monkeypatch, toml):
    """Replaces the three small detection functions with the given results."""

    def fake(vllm=VLLM, torch=ROCM_TORCH, gpus=(RX7900,)) -> VllmBackend:
        def locate(configured=None):
            if isinstance(vllm, Exception):
                raise vllm
            return vllm

        monkeypatch.setattr(detect, "locate_vllm", locate)
        monkeypatch.setattr(detect, "torch_build", lambda python=None: torch)
        monkeypatch.setattr(detect, "amd_gpus", lambda: [g for g in gpus if g.vendor == "amd"])
        return VllmBackend()

    return fake


async def test_decision_logic_unit_vllm_missing(faked):
    availability = await faked(vllm=NOT_FOUND).detect()
    assert not availability.ok
    assert availability.reason == "vLLM is not installed (tried ...)"


async def test_decision_logic_unit_torch_missing(faked):
    availability = await faked(torch=None).detect()
    assert not availability.ok
    assert availability.reason == "PyTorch is not installed (vLLM needs a ROCm build of PyTorch)"


async def test_decision_logic_unit_cuda_torch_is_not_rocm(faked):
    reason = (await faked(torch=CUDA_TORCH).detect()).reason
    assert reason == (
        "PyTorch 2.5.1+cu124 in py is a CUDA build (CUDA 12.4, torch.version.hip is None), "
        "but vLLM on AMD GPUs needs a ROCm build of PyTorch"
    )


async def test_decision_logic_unit_cpu_torch_is_not_rocm(faked):
    reason = (await faked(torch=CPU_TORCH).detect()).reason
    assert "PyTorch 2.5.1+cpu in py is a CPU-only build (no GPU support," in reason


async def test_decision_logic_unit_no_amd_gpu(faked):
    availability = await faked(gpus=(NVIDIA,)).detect()
    assert not availability.ok
    assert availability.reason == "no AMD GPU found (no amdgpu device in the KFD topology)"


async def test_decision_logic_unit_amd_gpu_without_access(faked):
    hidden = GpuInfo(index=None, vendor="amd", name="AMD Radeon RX 7900 XTX")
    reason = (await faked(gpus=(hidden,)).detect()).reason
    assert "1 AMD GPU(s) found but none is accessible" in reason
    assert "render and video groups" in reason


async def test_decision_logic_unit_everything_missing_is_listed(faked):
    reason = (await faked(vllm=NOT_FOUND, torch=CUDA_TORCH, gpus=()).detect()).reason
    parts = reason.split("; ")
    assert len(parts) == 3
    assert parts[0] == "vLLM is not installed (tried ...)"
    assert parts[1].startswith("PyTorch 2.5.1+cu124")
    assert parts[2].startswith("no AMD GPU found")


async def test_decision_logic_unit_all_present(faked):
    availability = await faked().detect()
    assert availability.ok
    assert availability.priority == 90
    assert availability.version == "0.9.2"
    assert availability.reason == (
        "vLLM 0.9.2 (/opt/vllm/bin/vllm, from PATH) with PyTorch 2.5.1+rocm6.2 in py "
        "(HIP 6.2.41133-dd7f95766) on ROCm0 AMD Radeon RX 7900 XTX (gfx1100)"
    )
    assert [d.id for d in availability.devices] == ["ROCm0"]


async def test_decision_logic_unit_priority_is_below_hip_llamacpp_unless_raised(faked, toml):
    assert (await faked().detect()).priority < 100
    toml("[backends.vllm_rocm]\npriority = 110\n")
    assert (await faked().detect()).priority == 110
    toml("[backends.vllm_rocm]\npriority = 'high'\n")
    availability = await faked().detect()
    assert not availability.ok and "priority must be an integer" in availability.reason


# -- detection: the small functions, for real ----------------------------------------------------

ROCM_VERSION_PY = """\
from typing import Optional

__all__ = ['__version__', 'debug', 'cuda', 'git_version', 'hip', 'xpu']
__version__ = '2.5.1+rocm6.2'
debug = False
cuda: Optional[str] = None
git_version = 'a8d6afb511a69687bbb2b7e88a3cf67917e1697e'
hip: Optional[str] = '6.2.41133-dd7f95766'
xpu: Optional[str] = None
"""


def test_torch_version_file_is_parsed_without_importing():
    assert detect.parse_torch_version(ROCM_VERSION_PY) == {
        "version": "2.5.1+rocm6.2",
        "hip": "6.2.41133-dd7f95766",
        "cuda": None,
    }
    old_style = "__version__ = '2.1.0+cu121'\ndebug = False\ncuda = '12.1'\nhip = None\n"
    assert detect.parse_torch_version(old_style)["cuda"] == "12.1"


def test_torch_build_of_this_python_reads_the_installed_file_and_imports_nothing():
    code = textwrap.dedent("""
        import json, sys
        from rocmux_vllm_rocm.detect import torch_build
        build = torch_build()
        print(json.dumps([None if build is None else [build.version, build.hip, build.path],
                          "torch" in sys.modules, "vllm" in sys.modules]))
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    build, imported_torch, imported_vllm = json.loads(done.stdout.strip().splitlines()[-1])
    assert not imported_torch and not imported_vllm
    spec = find_spec("torch")
    if spec is None:
        assert build is None
    else:
        assert build[2] == str(Path(spec.origin).parent / "version.py")
        assert build[0] == detect.parse_torch_version(Path(build[2]).read_text())["version"]


def test_torch_build_of_another_python_asks_that_python(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    assert detect.torch_build(str(venv / "bin" / "python")) is None


def test_locate_vllm_from_the_environment_and_the_config(tmp_path, monkeypatch):
    monkeypatch.delenv("ROCMUX_VLLM", raising=False)
    script = tmp_path / "vllm"
    script.write_text(f"#!{sys.executable}\nprint('hi')\n")
    script.chmod(0o755)
    found = detect.locate_vllm(str(script))
    assert (found.argv, found.source, found.python) == (
        (str(script),),
        "rocmux.toml",
        sys.executable,
    )
    monkeypatch.setenv("ROCMUX_VLLM", str(StandIn(tmp_path).path))
    found = detect.locate_vllm(str(script))
    assert found.source == "$ROCMUX_VLLM" and found.python is None
    monkeypatch.setenv("ROCMUX_VLLM", str(tmp_path / "missing"))
    with pytest.raises(BinaryNotFound, match=r"\$ROCMUX_VLLM is set to .*missing"):
        detect.locate_vllm()
    monkeypatch.delenv("ROCMUX_VLLM")
    with pytest.raises(BinaryNotFound, match=r"command = .*nope.* is not an executable"):
        detect.locate_vllm(str(tmp_path / "nope"))


async def test_detect_here_says_what_is_missing(toml):
    """No fakes: detection on this machine, whatever it has."""
    availability = await VllmBackend().detect()
    has_vllm = find_spec("vllm") is not None or shutil.which("vllm") is not None
    if not has_vllm:
        assert not availability.ok
        assert availability.reason.startswith("vLLM is not installed (tried $ROCMUX_VLLM (unset)")
    spec = find_spec("torch")
    if spec is not None:
        build = detect.torch_build()
        if not build.hip:
            assert f"PyTorch {build.version}" in availability.reason
    if not detect.amd_gpus():
        assert "no AMD GPU found" in availability.reason


def test_plugin_import_is_light():
    code = textwrap.dedent("""
        import sys
        import rocmux_vllm_rocm.plugin
        light = [m for m in ("vllm", "torch", "rocmux_vllm_rocm.backend") if m in sys.modules]
        import rocmux_vllm_rocm.backend
        heavy = [m for m in ("vllm", "torch") if m in sys.modules]
        print(light, heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[] []"
