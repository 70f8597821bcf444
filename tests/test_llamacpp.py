"""End-to-end tests of the llamacpp_hip backend against a real llama-server (CPU build)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from contextlib import aclosing
from pathlib import Path

import anyio
import httpx
import pytest
from rocmux import hookimpl
from rocmux.errors import BinaryNotFound, InvalidFlag, InvalidModel, ModelNotFound, ServerCrashed
from rocmux.events import LifecycleEvent
from rocmux.manager import PluginManager
from rocmux.selection import open_model
from rocmux.served import ServedModel
from rocmux.types import GenerateConfig, LoadConfig, Message
from rocmux_llamacpp_hip.backend import LlamaCppBackend

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

QUESTION = "What is the capital of France? Answer briefly."


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


async def _load(
    model: Path, plugins: PluginManager, llama_server: Path, **config: object
) -> ServedModel:
    return await LlamaCppBackend(plugins=plugins).load(model, LoadConfig(**config))  # type: ignore[arg-type]


async def _text(stream: object) -> tuple[str, str | None]:
    text, finish = [], None
    async with aclosing(stream) as tokens:  # type: ignore[type-var]
        async for token in tokens:
            text.append(token.text)
            finish = token.finish_reason or finish
    return "".join(text), finish


async def _slots_busy(url: str) -> bool:
    async with httpx.AsyncClient(trust_env=False) as client:
        slots = (await client.get(f"{url}/slots")).json()
    return any(slot.get("is_processing") for slot in slots)


async def test_chat_answers_with_the_default_model(default_model, plugins, recorder, llama_server):
    async with await _load(default_model, plugins, llama_server, context_len=2048) as model:
        text, finish = await _text(
            model.chat([Message("user", QUESTION)], GenerateConfig.greedy(max_tokens=30))
        )
    assert "Paris" in text
    assert finish == "stop"
    assert recorder.kinds()[:2] == ["spawned", "ready"]
    assert recorder.kinds()[-1] == "stopped"


async def test_greedy_output_equals_a_direct_request(default_model, plugins, llama_server):
    prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    async with await _load(default_model, plugins, llama_server, context_len=2048) as model:
        async with httpx.AsyncClient(trust_env=False, timeout=60) as client:
            for prompt in prompts:
                config = GenerateConfig.greedy(max_tokens=24)
                ours, _ = await _text(model.generate(prompt, config))
                body = {"prompt": prompt, **config.to_openai()}
                direct = (await client.post(f"{model.url}/v1/completions", json=body)).json()
                assert ours == direct["choices"][0]["text"], prompt
            config = GenerateConfig.greedy(max_tokens=24)
            ours, _ = await _text(model.chat([Message("user", QUESTION)], config))
            body = {"messages": [{"role": "user", "content": QUESTION}], **config.to_openai()}
            direct = (await client.post(f"{model.url}/v1/chat/completions", json=body)).json()
            assert ours == direct["choices"][0]["message"]["content"]


async def test_usage_and_timings_arrive_at_the_end(tiny_model, plugins, llama_server):
    async with await _load(tiny_model, plugins, llama_server, context_len=256) as model:
        model.request_defaults["ignore_eos"] = True
        tokens = [t async for t in model.generate("hello", GenerateConfig(max_tokens=16))]
    usage = [t.usage for t in tokens if t.usage]
    assert usage[-1].completion_tokens == 16
    assert tokens[-1].timings is not None
    assert tokens[-1].timings["predicted_n"] == 16
    assert [t.finish_reason for t in tokens if t.finish_reason] == ["length"]


async def test_the_client_lets_an_idle_connection_go_before_llama_server_closes_it(
    tiny_model, plugins, llama_server
):
    """llama-server closes an idle connection after 5 s, httpx's default expiry too: a
    connection reused at that moment fails with no answer. ``OpenAIClient`` lets idle
    connections go after ``KEEPALIVE_S`` and reuses them before."""
    from rocmux.openai_client import KEEPALIVE_S, OpenAIClient

    assert KEEPALIVE_S <= 2.5
    connects: list[str] = []

    async def trace(name: str, info: dict[str, object]) -> None:
        if name.endswith("connect_tcp.complete"):
            connects.append(name)

    async with await _load(tiny_model, plugins, llama_server, context_len=256) as model:
        client = OpenAIClient(model.url, "llamacpp_hip", plugins)
        try:
            for wait, expected in ((0.0, 1), (0.2, 1), (KEEPALIVE_S + 0.5, 2)):
                await anyio.sleep(wait)
                r = await client.http.get("/health", extensions={"trace": trace})
                assert r.status_code == 200
                assert len(connects) == expected, (wait, connects)
        finally:
            await client.aclose()


async def test_leaving_the_loop_cancels_the_request_and_keeps_the_model(
    default_model, plugins, llama_server
):
    async with await _load(
        default_model, plugins, llama_server, context_len=4096, parallel=1
    ) as model:
        model.request_defaults["ignore_eos"] = True
        seen = 0
        async with aclosing(model.generate("Count:", GenerateConfig(max_tokens=3000))) as tokens:
            async for _token in tokens:
                seen += 1
                if seen == 3:
                    break
        # 3000 tokens would take half a minute here; the slot must free up at once.
        with anyio.fail_after(5):
            while await _slots_busy(model.url):
                await anyio.sleep(0.02)
        text, finish = await _text(model.generate("Hello", GenerateConfig.greedy(max_tokens=5)))
        assert finish == "length"
        assert text


async def test_sigkill_mid_stream_is_a_clear_error_then_the_model_restarts(
    tiny_model, plugins, recorder, llama_server
):
    # A long context, so generation cannot end on its own before the kill lands.
    async with await _load(tiny_model, plugins, llama_server, context_len=16384) as model:
        model.request_defaults["ignore_eos"] = True
        first_pid = model.server.pid
        with pytest.raises(ServerCrashed) as info:
            async for _token in model.generate("hello", GenerateConfig(max_tokens=100_000)):
                os.kill(first_pid, signal.SIGKILL)
        assert "SIGKILL" in str(info.value)
        assert info.value.returncode == -signal.SIGKILL
        assert model.err() is info.value
        text, finish = await _text(model.generate("hello", GenerateConfig(max_tokens=4)))
        assert finish == "length"
        assert model.server.pid != first_pid
    kinds = recorder.kinds()
    assert kinds.index("crashed") < kinds.index("restarted")


async def test_two_concurrent_generations_on_one_model(default_model, plugins, llama_server):
    config = GenerateConfig.greedy(max_tokens=20)
    async with await _load(
        default_model, plugins, llama_server, context_len=2048, parallel=2
    ) as model:
        alone = [(await _text(model.generate(p, config)))[0] for p in ("Paris is", "Rome is")]
        results: dict[str, str] = {}

        async def run(prompt: str) -> None:
            results[prompt] = (await _text(model.generate(prompt, config)))[0]

        async with anyio.create_task_group() as tg:
            tg.start_soon(run, "Paris is")
            tg.start_soon(run, "Rome is")
    assert [results["Paris is"], results["Rome is"]] == alone


async def test_close_is_idempotent_and_closed_models_refuse_work(tiny_model, plugins, llama_server):
    model = await _load(tiny_model, plugins, llama_server, context_len=256)
    pid = model.server.pid
    await model.close()
    await model.close()
    assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()
    with pytest.raises(Exception, match="closed"):
        await _text(model.generate("hi"))


# -- bad input -------------------------------------------------------------------------------


async def test_missing_binary_is_named(tiny_model, monkeypatch, plugins):
    monkeypatch.setenv("ROCMUX_LLAMA_SERVER", "/nonexistent/llama-server")
    backend = LlamaCppBackend(plugins=plugins)
    availability = await backend.detect()
    assert not availability.ok
    assert "/nonexistent/llama-server" in availability.reason
    with pytest.raises(BinaryNotFound, match="ROCMUX_LLAMA_SERVER"):
        await backend.load(tiny_model, LoadConfig())


async def test_missing_model_file(plugins, tmp_path):
    with pytest.raises(ModelNotFound, match="does not exist"):
        await open_model(tmp_path / "nope.gguf", backend="llamacpp_hip", plugins=plugins)


async def test_file_that_is_not_gguf(plugins, tmp_path):
    bogus = tmp_path / "weights.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file" * 10)
    with pytest.raises(InvalidModel, match="not a GGUF file"):
        await open_model(bogus, backend="llamacpp_hip", plugins=plugins)


async def test_truncated_gguf_is_named_before_spawning(tiny_model, plugins, recorder, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 3])
    with pytest.raises(InvalidModel, match="truncated"):
        await LlamaCppBackend(plugins=plugins).load(cut, LoadConfig())
    assert "spawned" not in recorder.kinds()


async def test_truncated_gguf_with_settings_given_fails_at_start_with_the_servers_words(
    tiny_model, plugins, tmp_path
):
    from rocmux.errors import StartupFailed

    cut = tmp_path / "cut.gguf"
    cut.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 3])
    with pytest.raises(StartupFailed, match="exited with code") as info:
        await LlamaCppBackend(plugins=plugins).load(cut, LoadConfig(context_len=256))
    assert "Last output" in str(info.value)


async def test_unknown_extra_flag_is_refused_before_spawning(tiny_model, plugins, recorder):
    with pytest.raises(InvalidFlag, match="--no-such-flag"):
        await LlamaCppBackend(plugins=plugins).load(
            tiny_model, LoadConfig(extra_flags=["--no-such-flag", "3"])
        )
    assert "spawned" not in recorder.kinds()


async def test_extra_flag_overrides_rocmux_value(tiny_model, plugins, recorder):
    async with (
        await LlamaCppBackend(plugins=plugins).load(
            tiny_model, LoadConfig(context_len=256, extra_flags=["-c", "512"])
        ) as model,
        httpx.AsyncClient(trust_env=False) as client,
    ):
        props = (await client.get(f"{model.url}/props")).json()
    argv = next(e.detail for e in recorder.events if e.kind == "spawned")
    assert "--ctx-size" not in argv
    assert props["default_generation_settings"]["n_ctx"] == 512


# -- blocking facade and CLI -------------------------------------------------------------


def test_blocking_facade_streams_in_a_plain_loop(tiny_model, llama_server):
    import rocmux

    with rocmux.load(tiny_model, backend="llamacpp_hip", context_len=256) as model:
        tokens = list(model.generate("hello", rocmux.GenerateConfig(max_tokens=6)))
        assert tokens[-1].finish_reason in ("length", "stop")
        text = model.reply("hi", rocmux.GenerateConfig(max_tokens=4))
        assert isinstance(text, str)


def test_cli_run_prints_the_answer(llama_server):
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "run", "--chat", "--temperature", "0", QUESTION],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "Paris" in done.stdout


def test_cli_backends_json_lists_llamacpp_as_available(llama_server):
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)["backends"]}
    assert rows["llamacpp_hip"]["available"] is True
    assert "CPU build" in rows["llamacpp_hip"]["reason"]
    assert rows["vllm_rocm"]["available"] is False
    assert rows["vllm_rocm"]["reason"]


def test_cli_reports_bad_model_path_cleanly(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "run", "-m", str(tmp_path / "x.gguf"), "hi"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "does not exist" in done.stderr
    assert "Traceback" not in done.stderr


async def test_context_is_chosen_by_the_memory_fit_when_not_given(default_model, plugins):
    async with await LlamaCppBackend(plugins=plugins).load(default_model, LoadConfig()) as model:
        async with httpx.AsyncClient(trust_env=False) as client:
            props = (await client.get(f"{model.url}/props")).json()
    # SmolLM2 is trained for 8192 tokens and fits in host memory many times over.
    assert props["default_generation_settings"]["n_ctx"] == 8192
    assert any("memory fit on host memory" in note for note in model.notes)


async def test_a_burst_of_new_connections_is_not_held_behind_idle_ones(
    tiny_model, plugins, llama_server
):
    """``rocmux serve``'s relay holds up to ``max_spares`` idle connections open
    to a llama-server; the plugin gives llama-server HTTP threads for them. With the
    slots all held idle, a burst on new connections still starts at once: every stream
    has its first event before any stream has ended (with llama-server's own thread
    count, some waited for a stream to end)."""
    from rocmux.relay import RelayClient
    from rocmux_llamacpp_hip.flags import http_threads

    slots = 8
    assert http_threads(slots) == slots + 4 + RelayClient().max_spares
    model = await _load(tiny_model, plugins, llama_server, parallel=slots, context_len=4096)
    try:
        assert model.server is not None
        host, port = "127.0.0.1", int(model.url.rsplit(":", 1)[1])
        request = json.dumps(
            {"prompt": "x", "max_tokens": 300, "ignore_eos": True, "stream": True}
        ).encode()

        async def stream(i: int, order: list[str]) -> None:
            async with await anyio.connect_tcp(host, port) as conn:
                await conn.send(
                    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                    b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(request), request)
                )
                seen = b""
                while b"[DONE]" not in seen:
                    seen += await conn.receive()
                    if b"data: {" in seen and f"first {i}" not in order:
                        order.append(f"first {i}")
                order.append(f"end {i}")

        for _ in range(8):  # the wait came in some bursts, not all
            idle = [await anyio.connect_tcp(host, port) for _ in range(slots)]
            await anyio.sleep(0.1)  # each taken by an HTTP thread, waiting for a request
            order: list[str] = []
            with anyio.fail_after(60):
                async with anyio.create_task_group() as tg:
                    for i in range(slots):
                        tg.start_soon(stream, i, order)
            for conn in idle:
                await conn.aclose()
            firsts = [n for n, item in enumerate(order) if item.startswith("first")]
            ends = [n for n, item in enumerate(order) if item.startswith("end")]
            assert len(firsts) == len(ends) == slots
            assert max(firsts) < min(ends), order
    finally:
        await model.close()
