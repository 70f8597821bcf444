"""The hip_direct backend through rocmux's contracts, on the tiny GGUF (CPU)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from contextlib import aclosing
from pathlib import Path

import anyio
import pytest
from rocmux.errors import BackendUnavailable, InvalidFlag, ModelClosed
from rocmux.manager import PluginManager
from rocmux.types import GenerateConfig, LoadConfig, Message
from rocmux_hip_direct import plugin
from rocmux_hip_direct.plugin import HipDirectBackend, TorchBuild, describe

pytestmark = pytest.mark.anyio

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")


# -- detection (no torch needed) ----------------------------------------------------------------


async def test_detection_without_torch_says_why(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        plugin.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name)
    )
    availability = await HipDirectBackend().detect()
    assert not availability.ok
    assert availability.reason.startswith("PyTorch is not installed")
    with pytest.raises(BackendUnavailable, match="PyTorch is not installed"):
        await HipDirectBackend().load(Path("model.gguf"), LoadConfig())


def test_priorities_by_build_and_gpu():
    from rocmux.types import Device

    gpu = (Device(id="cuda:0", name="Radeon RX 7900 XTX", kind="rocm"),)
    rocm = describe(TorchBuild("2.6.0+rocm6.2", hip="6.2.41133", cuda=None), gpu)
    assert rocm.ok and rocm.priority == 70 and "ROCm (HIP 6.2.41133)" in rocm.reason
    no_gpu = describe(TorchBuild("2.6.0+rocm6.2", hip="6.2", cuda=None), ())
    assert no_gpu.ok and no_gpu.priority == 5 and "no GPU is visible" in no_gpu.reason
    cpu = describe(TorchBuild("2.13.0+cpu", hip=None, cuda=None), ())
    assert cpu.ok and cpu.priority < 10  # below llama.cpp's CPU build


def test_version_file_is_read_as_text():
    text = (
        "__version__ = '2.6.0+rocm6.2'\n"
        "cuda: Optional[str] = None\n"
        "hip: Optional[str] = '6.2.41133'\n"
    )
    assert plugin._version_field(text, "__version__") == "2.6.0+rocm6.2"
    assert plugin._version_field(text, "hip") == "6.2.41133"
    assert plugin._version_field(text, "cuda") is None


def test_plugin_import_and_detection_do_not_import_torch():
    code = (
        "import sys, anyio\n"
        "from rocmux_hip_direct.plugin import HipDirectBackend\n"
        "print(anyio.run(HipDirectBackend().detect).ok)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_registered_through_the_entry_point():
    assert "hip_direct" in PluginManager.discover().backends().names()


# -- the loaded model -------------------------------------------------------------------------


@pytest.fixture
async def model(tiny_model):
    pytest.importorskip("torch")
    loaded = await HipDirectBackend().load(
        tiny_model, LoadConfig(context_len=256, parallel=4, threads=1)
    )
    yield loaded
    await loaded.close()


async def _collect(stream):
    tokens = []
    async with aclosing(stream) as events:
        async for token in events:
            tokens.append(token)
    return tokens


async def _text(model, prompt, config):
    tokens = await _collect(model.generate(prompt, config))
    return "".join(t.text for t in tokens), tokens[-1]


@needs_torch
async def test_generate_and_chat_stream_tokens_with_usage(model):
    tokens = await _collect(model.generate("hello world", GenerateConfig.greedy(max_tokens=12)))
    assert len([t for t in tokens if t.text]) >= 2  # streamed, not one blob
    last = tokens[-1]
    assert last.finish_reason == "length"
    assert last.usage.prompt_tokens == 3 and last.usage.completion_tokens == 12
    assert last.timings["predicted_n"] == 12
    chat = await _collect(model.chat([Message("user", "hi there")], GenerateConfig.greedy(8)))
    assert chat[-1].finish_reason == "length" and "".join(t.text for t in chat).strip()
    assert model.err() is None


@needs_torch
async def test_stop_strings_end_the_stream_without_the_stop_text(model):
    full, _ = await _text(model, "hello world", GenerateConfig.greedy(max_tokens=20))
    stop = full[5:9]
    assert stop.strip()
    text, last = await _text(
        model, "hello world", GenerateConfig(max_tokens=20, temperature=0, stop=stop)
    )
    assert last.finish_reason == "stop"
    assert text == full[: full.index(stop)]


@needs_torch
async def test_leaving_the_loop_cancels_and_frees_blocks(model):
    allocator = model.engine.cache.allocator
    async with aclosing(model.generate("hello world", GenerateConfig.greedy(200))) as stream:
        async for token in stream:
            if token.text:
                break
    await model.wait_idle()
    assert allocator.n_free == allocator.n_blocks
    assert not model.engine.scheduler.has_work()
    # the model stays loaded and usable
    text, last = await _text(model, "hello", GenerateConfig.greedy(4))
    assert last.finish_reason == "length" and text


@needs_torch
async def test_two_concurrent_requests_match_each_run_alone(model):
    config = GenerateConfig.greedy(max_tokens=24)
    alone_a, _ = await _text(model, "hello world the model", config)
    alone_b, _ = await _text(model, "chat user assistant", config)
    results = {}

    async def run(name, prompt):
        results[name], _ = await _text(model, prompt, config)

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "a", "hello world the model")
        tg.start_soon(run, "b", "chat user assistant")
    assert results == {"a": alone_a, "b": alone_b}


@needs_torch
async def test_a_request_joining_mid_way_gets_the_same_tokens(model):
    config = GenerateConfig.greedy(max_tokens=30)
    alone_late, _ = await _text(model, "yes ok thanks", config)
    first_started = anyio.Event()
    results = {}

    async def first():
        tokens = []
        async with aclosing(model.generate("hello world", config)) as stream:
            async for token in stream:
                tokens.append(token.text)
                if len(tokens) == 5:
                    first_started.set()
        results["first"] = "".join(tokens)

    async def late():
        await first_started.wait()
        assert model.engine.running(), "the first request should still be running"
        results["late"], _ = await _text(model, "yes ok thanks", config)

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        tg.start_soon(late)
    assert results["late"] == alone_late
    assert model.engine.cache.allocator.n_free == model.engine.cache.allocator.n_blocks


@needs_torch
async def test_seeded_sampling_is_reproducible_in_a_batch(model):
    config = GenerateConfig(max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=7)
    alone, _ = await _text(model, "the model", config)
    results = []

    async def run(prompt, cfg):
        results.append((prompt, (await _text(model, prompt, cfg))[0]))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "the model", config)
        tg.start_soon(run, "hello world", GenerateConfig(max_tokens=16, temperature=1.0, seed=99))
    assert dict(results)["the model"] == alone


@needs_torch
async def test_close_is_idempotent_and_later_calls_fail(tiny_model):
    loaded = await HipDirectBackend().load(tiny_model, LoadConfig(context_len=128, threads=1))
    await loaded.close()
    await loaded.close()
    with pytest.raises(ModelClosed):
        await _collect(loaded.generate("hello", GenerateConfig.greedy(4)))


@needs_torch
async def test_long_prompt_prefilled_in_chunks_gives_the_same_tokens(tiny_model):
    prompt = " ".join(["hello world the model is a test"] * 12)
    outputs = []
    for step_tokens in ("512", "16"):
        loaded = await HipDirectBackend().load(
            tiny_model,
            LoadConfig(context_len=256, threads=1, extra_flags=("--max-batch-tokens", step_tokens)),
        )
        async with loaded:
            outputs.append(await _text(loaded, prompt, GenerateConfig.greedy(max_tokens=10)))
            assert loaded.engine.steps >= (1 if step_tokens == "512" else 5)
    assert outputs[0][0] == outputs[1][0]


@needs_torch
async def test_unknown_extra_flag_is_refused(tiny_model):
    with pytest.raises(InvalidFlag, match="--nope"):
        await HipDirectBackend().load(tiny_model, LoadConfig(extra_flags=("--nope", "1")))


@needs_torch
async def test_llamacpp_numerics_mode_runs(tiny_model):
    loaded = await HipDirectBackend().load(
        tiny_model, LoadConfig(context_len=128, threads=1, extra_flags=("--numerics=llamacpp",))
    )
    async with loaded:
        text, last = await _text(loaded, "hello world", GenerateConfig.greedy(max_tokens=6))
    assert last.finish_reason == "length" and text
