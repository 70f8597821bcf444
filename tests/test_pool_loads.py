"""Loads that behave, and placement by measured memory.

* A start fails when the runtime shows no progress for a stall timeout (no output, no
  "loading" answer), not after a fixed total (the test server of ``test_supervisor``).
* Under ``rocmux serve`` (real llama-server, tiny model): a load that every waiting
  client leaves is abandoned and its runtime stopped; one waiter leaving does not
  abandon it; SSE comment lines while a streaming request waits for a load.
* Memory: a fake device monitor (``Service(memory_probe=...)``) that returns an
  evicted instance's memory late; busy instances are never evicted; 503 naming them.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from functools import partial
from pathlib import Path

import anyio
import httpx
import pytest
from rocmux import hookimpl
from rocmux.config import Config, Limits, ModelEntry, ServerSettings
from rocmux.errors import StartupFailed
from rocmux.events import LifecycleEvent
from rocmux.launch import HOST, PORT, Launch
from rocmux.manager import PluginManager
from rocmux.pool import Instance, ModelPool, PoolBusy, PoolObserver, measure_free
from rocmux.served import ServedModel
from rocmux.supervisor import ServerProcess, StartupLimits, startup_limits
from rocmux.testing.processes import alive
from rocmux.types import LoadConfig
from test_serve import metric, running, tiny

pytestmark = pytest.mark.anyio

SERVER = str(Path(__file__).parent / "servers" / "rocmux_test_server.py")
MiB = 1 << 20


def _launch(*options: str) -> Launch:
    return Launch(
        backend="test", argv=[sys.executable, SERVER, "--host", HOST, "--port", PORT, *options]
    )


# -- stall-based startup ---------------------------------------------------------------------


async def test_a_start_that_keeps_logging_outlasts_the_stall_timeout():
    server = ServerProcess(_launch("--chatter", "2.5"), stall_timeout=1.0)
    started = time.monotonic()
    await server.start()
    try:
        assert time.monotonic() - started >= 2.5
        assert "loading tensors" in server.output_tail()
    finally:
        await server.stop()


async def test_progress_dots_without_a_newline_count_as_output():
    # llama.cpp draws its load progress as dots on one line.
    server = ServerProcess(_launch("--chatter", "2.0", "--dots"), stall_timeout=1.0)
    await server.start()
    try:
        assert "......" in server.output_tail()
    finally:
        await server.stop()


async def test_a_health_endpoint_answering_loading_counts_as_progress():
    # Listening at once, 503 for 2.5 s, not a line of output meanwhile.
    server = ServerProcess(_launch("--ready-after", "2.5"), stall_timeout=1.0)
    started = time.monotonic()
    await server.start()
    try:
        assert time.monotonic() - started >= 2.5
    finally:
        await server.stop()


async def test_a_silent_start_fails_fast_with_the_output_tail():
    server = ServerProcess(_launch("--silent", "60"), stall_timeout=1.0, startup_timeout=60)
    started = time.monotonic()
    with pytest.raises(StartupFailed) as info:
        await server.start()
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "showed no progress for 1 s" in message
    assert "test server starting on port" in message  # its own last words
    assert not alive(server.pid)


async def test_a_stopped_runtime_that_answered_loading_fails_fast():
    """SIGSTOP mid-load: the health endpoint stops answering "loading"."""
    server = ServerProcess(
        _launch("--ready-after", "60"), stall_timeout=1.0, startup_timeout=60, stop_timeout=0.2
    )

    async def freeze() -> None:
        while server.pid is None:
            await anyio.sleep(0.01)
        await anyio.sleep(0.8)
        os.kill(server.pid, signal.SIGSTOP)

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(freeze)
        with pytest.raises(StartupFailed, match="showed no progress"):
            await server.start()
    assert time.monotonic() - started < 6
    assert not alive(server.pid)


async def test_a_model_closed_while_it_restarts_leaves_no_runtime():
    """The pool drops a model (close) while a request restarts its crashed runtime:
    the restart must not leave a process that nobody will stop."""
    from rocmux.errors import ModelClosed

    spawned: list[int] = []

    class Spawns:
        @hookimpl
        def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
            if event.kind == "spawned" and event.pid is not None:
                spawned.append(event.pid)

    plugins = PluginManager()
    plugins.register(Spawns(), name="spawns")
    model = ServedModel(
        backend="test",
        model_path=Path("m.gguf"),
        make_launch=lambda: _launch("--ready-after", "0.5"),
        plugins=plugins,
    )
    await model.start()
    assert model.server is not None
    os.kill(model.server.pid, signal.SIGKILL)
    await model.server.wait_exit(5)
    outcome: list[BaseException] = []

    async def restart() -> None:
        try:
            await model.ensure_running()
        except BaseException as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tg:
        tg.start_soon(restart)
        await anyio.sleep(0.2)  # the restart is waiting for its new runtime to be ready
        await model.close()
    assert len(spawned) == 2
    assert [type(e) for e in outcome] == [ModelClosed]
    with anyio.fail_after(5):
        while any(alive(pid) for pid in spawned):
            await anyio.sleep(0.02)


async def test_a_runtime_the_monitor_cannot_restart_is_closed_with_its_instance():
    """The health monitor's restart of a dead runtime fails (a spoiled spawn) and the
    pool drops the instance: the model must be closed too, or a request that took the
    instance meanwhile would restart a runtime the pool no longer tracks."""
    from rocmux.errors import ModelClosed

    spoiled = False

    def make_launch() -> Launch:
        return _launch("--exit-code", "3") if spoiled else _launch()

    plugins = PluginManager()
    model = ServedModel(
        backend="test", model_path=Path("m.gguf"), make_launch=make_launch, plugins=plugins
    )
    await model.start()
    assert model.server is not None
    entry = ModelEntry(name="m", path=Path("m.gguf"))
    pool = ModelPool(entries=[entry], limits=Limits(), plugins=plugins)
    instance = Instance(key="k", entry=entry, path=Path("m.gguf"), backend="test")
    instance.model, instance.state = model, "ready"
    pool.instances["k"] = instance
    spoiled = True
    os.kill(model.server.pid, signal.SIGKILL)
    await model.server.wait_exit(5)
    async with anyio.create_task_group() as tg:
        tg.start_soon(partial(pool.monitor_health_forever, interval=0.05))
        with anyio.fail_after(10):
            while pool.instances:
                await anyio.sleep(0.02)
        tg.cancel_scope.cancel()
    assert instance.state == "failed"
    assert "exit" in (instance.error or "")
    spoiled = False  # the next spawn would work: nothing may make one now
    with pytest.raises(ModelClosed):
        await model.ensure_running()
    await pool.aclose()


def test_served_model_takes_the_startup_limits_in_effect():
    token = startup_limits.set(StartupLimits(stall_timeout=7.0, startup_timeout=900.0))
    try:
        model = ServedModel(
            backend="test",
            model_path=Path("m.gguf"),
            make_launch=lambda: _launch(),
            plugins=PluginManager(),
            startup_timeout=300.0,
        )
    finally:
        startup_limits.reset(token)
    assert (model.stall_timeout, model.startup_timeout) == (7.0, 900.0)
    plain = ServedModel(
        backend="test", model_path=Path("m.gguf"), make_launch=_launch, plugins=PluginManager()
    )
    assert (plain.stall_timeout, plain.startup_timeout) == (None, 120.0)


def test_limits_and_settings_from_a_file():
    config = Config.from_mapping(
        {
            "limits": {
                "memory_budget": "6GiB",
                "memory_margin": "1GiB",
                "memory_return_timeout": 5,
                "load_stall_timeout": 30,
                "load_timeout": 3600,
            },
            "server": {"loading_comments": True, "loading_comment_interval": 2},
        }
    )
    assert config.limits.memory_margin == 1 << 30
    assert config.limits.load_stall_timeout == 30
    assert config.server.loading_comments is True
    assert Limits(memory_margin=0).memory_margin == 0


def test_the_default_monitor_reads_the_host_and_knows_no_such_gpu():
    free = measure_free(())
    assert free is not None and free > 0
    assert measure_free(("CUDA97",)) is None


# -- loads under rocmux serve ------------------------------------------------------------------


class SlowStart:
    """Holds each runtime back ``delay`` seconds (silently) before it starts, and
    records the pids of the runtimes spawned."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.pids: list[int] = []

    @hookimpl
    def rocmux_adjust_launch(self, launch: Launch) -> None:
        if self.delay:
            launch.argv = ["sh", "-c", f'sleep {self.delay}; exec "$0" "$@"', *launch.argv]

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind == "spawned" and event.pid is not None:
            self.pids.append(event.pid)


def slow_plugins(delay: float) -> tuple[PluginManager, SlowStart]:
    slow = SlowStart(delay)
    plugins = PluginManager.discover()
    plugins.register(slow, name="slow-start")
    return plugins, slow


SHORT = {"model": "tiny", "prompt": "x", "max_tokens": 4, "temperature": 0}


async def _spawned(slow: SlowStart) -> int:
    with anyio.fail_after(20):
        while not slow.pids:
            await anyio.sleep(0.02)
    return slow.pids[-1]


async def _gone(pool: ModelPool, pid: int) -> None:
    with anyio.fail_after(10):
        while pool.instances or alive(pid):
            await anyio.sleep(0.02)


async def test_a_load_whose_only_client_disconnects_is_abandoned(tiny_model):
    plugins, slow = slow_plugins(30)
    async with running([tiny(tiny_model)], plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with anyio.create_task_group() as tg:
                tg.start_soon(partial(client.post, "/v1/completions", json=SHORT))
                pid = await _spawned(slow)
                assert alive(pid)
                tg.cancel_scope.cancel()  # the client hangs up
            await _gone(pool, pid)
            metrics = (await client.get("/metrics")).text
            events = (await client.get("/admin/events")).json()["events"]
    assert metric(metrics, "rocmux_model_loads_abandoned_total", model="tiny") == 1
    assert metric(metrics, "rocmux_model_loads_total") == 0
    assert [e["event"] for e in events] == ["load", "abandoned"]


async def test_one_of_two_waiters_leaving_does_not_abandon_the_load(tiny_model):
    plugins, slow = slow_plugins(2)
    async with running([tiny(tiny_model)], plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers: list[httpx.Response] = []

            async def stays() -> None:
                answers.append(await client.post("/v1/completions", json=SHORT))

            async with anyio.create_task_group() as tg:
                tg.start_soon(stays)
                async with anyio.create_task_group() as leaver:
                    leaver.start_soon(partial(client.post, "/v1/completions", json=SHORT))
                    pid = await _spawned(slow)
                    with anyio.fail_after(5):
                        while next(iter(pool.instances.values())).waiting < 2:
                            await anyio.sleep(0.02)
                    leaver.cancel_scope.cancel()
                with anyio.fail_after(5):
                    while next(iter(pool.instances.values())).waiting > 1:
                        await anyio.sleep(0.02)
                assert alive(pid)
            (answer,) = answers
            assert answer.status_code == 200, answer.text
            assert answer.json()["usage"]["completion_tokens"] == 4
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_loads_total", model="tiny") == 1
    assert metric(metrics, "rocmux_model_loads_abandoned_total") == 0


async def test_a_client_that_times_out_does_not_abandon_the_load(tiny_model):
    """A 503 "still loading" is an invitation to retry: the load goes on."""
    plugins, slow = slow_plugins(2)
    async with running([tiny(tiny_model)], Limits(queue_timeout=0.5), plugins=plugins) as (
        url,
        pool,
    ):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post("/v1/completions", json=SHORT)
            assert r.status_code == 503, r.text
            assert "still loading" in r.json()["error"]["message"]
            with anyio.fail_after(20):
                while not pool.is_ready("tiny"):
                    await anyio.sleep(0.05)
            r = await client.post("/v1/completions", json=SHORT)
            assert r.status_code == 200, r.text
    assert len(slow.pids) == 1


async def test_a_runtime_that_hangs_while_starting_fails_at_the_stall_timeout(tiny_model):
    plugins, slow = slow_plugins(60)
    limits = Limits(load_stall_timeout=1.0)
    async with running([tiny(tiny_model)], limits, plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            started = time.monotonic()
            r = await client.post("/v1/completions", json=SHORT)
            assert time.monotonic() - started < 10
    assert r.status_code == 502, r.text
    assert "showed no progress for 1 s" in r.json()["error"]["message"]
    assert not pool.instances
    assert not alive(slow.pids[0])


# -- SSE comments while loading ---------------------------------------------------------------

STREAM = {**SHORT, "max_tokens": 8, "stream": True}


async def _lines(client: httpx.AsyncClient, body: dict[str, object]) -> list[str]:
    async with client.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        return [line async for line in response.aiter_lines() if line]


async def test_loading_comments_keep_a_stream_alive_and_clients_ignore_them(tiny_model):
    import openai

    plugins, _slow = slow_plugins(1.5)
    settings = ServerSettings(loading_comments=True, loading_comment_interval=0.3)
    async with running([tiny(tiny_model)], settings=settings, plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            lines = await _lines(client, STREAM)
            comments = [line for line in lines if line.startswith(":")]
            assert comments[0] == ": loading tiny"
            assert len(comments) >= 3  # 1.5 s at one every 0.3 s
            assert lines[: len(comments)] == comments  # all before the first event
            data = lines[len(comments) :]
            assert all(line.startswith("data: ") for line in data)
            assert data[-1] == "data: [DONE]"
            # Loaded now: no comments.
            lines = await _lines(client, STREAM)
            assert lines[0].startswith("data: {")

            (instance,) = pool.instances.values()
            await pool.unload(instance.key)
            oai = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
            stream = await oai.completions.create(
                model="tiny", prompt="x", max_tokens=8, temperature=0, stream=True
            )
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                    finish = chunk.choices[0].finish_reason or finish
            await oai.close()
    assert text and finish == "length"


async def test_without_the_setting_a_loading_stream_starts_with_its_first_event(tiny_model):
    plugins, _slow = slow_plugins(1.0)
    async with running([tiny(tiny_model)], plugins=plugins) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            lines = await _lines(client, STREAM)
    assert lines[0].startswith("data: {")
    assert not any(line.startswith(":") for line in lines)


async def test_loading_comments_keep_error_statuses_found_before_the_wait(default_model):
    settings = ServerSettings(loading_comments=True, loading_comment_interval=0.3)
    entry = ModelEntry(name="smol", path=default_model, load=LoadConfig(context_len=2048))
    async with running([entry], Limits(memory_budget="100MiB"), settings) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post("/v1/completions", json={**STREAM, "model": "smol"})
            assert r.status_code == 507
            assert r.json()["error"]["code"] == "model_too_large"
            r = await client.post("/v1/completions", json={**STREAM, "model": "nope"})
            assert r.status_code == 404


async def test_a_loading_stream_whose_client_leaves_abandons_the_load(tiny_model):
    plugins, slow = slow_plugins(30)
    settings = ServerSettings(loading_comments=True, loading_comment_interval=0.2)
    async with running([tiny(tiny_model)], settings=settings, plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=STREAM) as response:
                lines = response.aiter_lines()  # held: a collected one closes the connection
                assert await anext(lines) == ": loading tiny"
                pid = await _spawned(slow)  # the runtime is starting: now hang up
            await _gone(pool, pid)
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_loads_abandoned_total", model="tiny") == 1


async def test_a_loading_stream_gets_a_failed_load_as_an_error_event(tiny_model):
    plugins, _slow = slow_plugins(60)
    settings = ServerSettings(loading_comments=True, loading_comment_interval=0.2)
    limits = Limits(load_stall_timeout=1.0)
    async with running([tiny(tiny_model)], limits, settings, plugins) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            lines = await _lines(client, STREAM)
    assert lines[0] == ": loading tiny"
    error = json.loads(lines[-1].removeprefix("data: "))["error"]
    assert "showed no progress" in error["message"]


# -- memory ------------------------------------------------------------------------------


class FakeMonitor:
    """Free host memory as a device monitor would see it: ``capacity`` less the ready
    instances' estimates, less what evicted ones still hold for ``lag`` seconds after
    their eviction, less ``external`` (other processes)."""

    def __init__(self, capacity: int, lag: float = 0.0) -> None:
        self.capacity = capacity
        self.lag = lag
        self.external = 0
        self.pool: ModelPool | None = None

    def __call__(self, devices: tuple[str, ...]) -> int:
        assert devices == ()  # a CPU build: the host
        assert self.pool is not None
        now = time.time()
        held = sum(i.need for i in self.pool.instances.values() if i.state == "ready")
        held += sum(
            e["need"]
            for e in list(self.pool.events)
            if e["event"] == "evict" and now < e["t"] + self.lag
        )
        return self.capacity - held - self.external


def two_tinies(tiny_model: Path) -> list[ModelEntry]:
    # About 2.6 and 4.5 MiB estimated.
    return [
        ModelEntry(name="small", path=tiny_model, load=LoadConfig(context_len=512)),
        ModelEntry(name="large", path=tiny_model, load=LoadConfig(context_len=2048)),
    ]


async def test_measured_memory_evicts_and_waits_for_the_memory_to_return(tiny_model):
    """The budget holds both; the monitor's free memory holds one, and shows an
    unloaded instance's memory free only ``lag`` seconds after its eviction."""
    monitor = FakeMonitor(capacity=6 * MiB, lag=1.0)
    limits = Limits(max_loaded=4, memory_budget="1GiB", memory_margin=0)
    async with running(two_tinies(tiny_model), limits, memory_probe=monitor) as (url, pool):
        monitor.pool = pool
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            answers: dict[str, set[str]] = {"small": set(), "large": set()}
            for name in ("small", "large", "small", "large"):
                r = await client.post("/v1/completions", json={**SHORT, "model": name})
                assert r.status_code == 200, r.text
                answers[name].add(r.json()["choices"][0]["text"])
                assert len(pool.instances) == 1
            metrics = (await client.get("/metrics")).text
            events = (await client.get("/admin/events")).json()["events"]
    assert all(len(texts) == 1 for texts in answers.values())  # greedy: same after reloads
    assert metric(metrics, "rocmux_model_evictions_total", reason="memory") == 3
    kinds = [e["event"] for e in events]
    assert kinds == ["load", "ready"] + ["evict", "returned", "load", "ready"] * 3
    for i, event in enumerate(events):
        if event["event"] == "evict":
            returned, load = events[i + 1], events[i + 2]
            assert returned["seconds"] >= 0.9
            assert load["t"] >= event["t"] + 0.99  # the next load waited for the memory


async def test_memory_held_by_other_processes_waits_then_503_then_loads(tiny_model):
    monitor = FakeMonitor(capacity=64 * MiB)
    monitor.external = 63 * MiB
    limits = Limits(memory_budget="1GiB", memory_margin=0, queue_timeout=1.5)
    entries = two_tinies(tiny_model)
    async with running(entries, limits, memory_probe=monitor) as (url, pool):
        monitor.pool = pool
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            started = time.monotonic()
            r = await client.post("/v1/completions", json={**SHORT, "model": "small"})
            assert time.monotonic() - started >= 1.4
            assert r.status_code == 503
            assert r.headers["retry-after"] == "2"
            message = r.json()["error"]["message"]
            assert "the host has 1 MiB free" in message
            assert "other processes hold the rest" in message
            assert not pool.instances

            async def free_later() -> None:
                await anyio.sleep(0.5)
                monitor.external = 0

            async with anyio.create_task_group() as tg:
                tg.start_soon(free_later)
                r = await client.post("/v1/completions", json={**SHORT, "model": "small"})
            # The load began once the memory showed free; on a slow machine it may
            # outlast the queue timeout: then "still loading", and the retry gets it.
            with anyio.fail_after(20):
                while r.status_code == 503 and "still loading" in r.text:
                    await anyio.sleep(0.2)
                    r = await client.post("/v1/completions", json={**SHORT, "model": "small"})
            assert r.status_code == 200, r.text
            assert [e["event"] for e in pool.events if e["event"] == "load"] == ["load"]


@pytest.fixture(scope="module")
def long_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model trained for 32k tokens: llama-server caps a slot's context at
    the trained one, and a stream here must outlast a queue timeout."""
    from gguf_factory import TinyLlama, write_tiny_llama

    path = tmp_path_factory.mktemp("models") / "tiny-32k.gguf"
    return write_tiny_llama(path, TinyLlama(context_length=32768))


async def test_a_busy_instance_is_never_evicted_the_request_gets_503_naming_it(
    long_model, tiny_model
):
    # About 22 and 2.6 MiB estimated; the budget holds either, not both.
    entries = [
        ModelEntry(name="long", path=long_model, load=LoadConfig(context_len=16384)),
        ModelEntry(name="small", path=tiny_model, load=LoadConfig(context_len=512)),
    ]
    limits = Limits(max_loaded=4, memory_budget="24MiB", queue_timeout=1.5)
    body = {
        "model": "long",
        "prompt": "hi",
        "max_tokens": 100000,
        "stream": True,
        "ignore_eos": True,
    }
    async with running(entries, limits) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            async with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.aiter_lines()
                assert (await anext(lines)).startswith("data: ")
                r = await client.post("/v1/completions", json={**SHORT, "model": "small"})
                assert r.status_code == 503
                assert r.headers["retry-after"] == "2"
                message = r.json()["error"]["message"]
                assert "held by long (22 MiB, 1 in flight), none of them idle" in message
                assert "memory budget" in message
                (instance,) = pool.instances.values()
                assert instance.entry.name == "long" and instance.state == "ready"
                assert (await anext(lines)) == ""
                assert (await anext(lines)).startswith("data: {")  # still streaming
            r = await client.post("/v1/completions", json={**SHORT, "model": "small"})
            assert r.status_code == 200, r.text
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_evictions_total", model="long", reason="memory") == 1


async def test_instances_with_requests_waiting_or_in_flight_are_never_chosen(tiny_model):
    pool = ModelPool(
        [tiny(tiny_model)], Limits(max_loaded=2), PluginManager.discover(entry_points=False)
    )
    entry = pool.entry("tiny")
    try:
        waited = Instance(key="w", entry=entry, path=tiny_model, backend="t", state="ready")
        waited.waiting = 1  # a request woken by its load, not yet counted in flight
        serving = Instance(key="s", entry=entry, path=tiny_model, backend="t", state="ready")
        serving.in_flight = 3
        pool.instances.update(w=waited, s=serving)
        deadline = anyio.current_time() + 0.3
        with pytest.raises(PoolBusy) as info:
            await pool._make_room(deadline, entry, 0, (), lambda: None)
        assert "tiny (0 in flight, 1 waiting)" in str(info.value)
        assert "tiny (3 in flight)" in str(info.value)
        assert set(pool.instances) == {"w", "s"}
        serving.in_flight = 0  # idle now: it goes
        await pool._make_room(anyio.current_time() + 0.3, entry, 0, (), lambda: None)
        assert set(pool.instances) == {"w"}
        assert [e["event"] for e in pool.events] == ["wait", "evict"]
    finally:
        await pool.aclose()


async def test_a_victim_is_out_of_reach_before_the_monitor_is_read(tiny_model):
    """Reading the monitor awaits; a request arriving meanwhile must not take the
    instance being evicted (found by bench/budget.py: an eviction with 2 in flight)."""
    seen: list[str] = []

    def monitor(devices: tuple[str, ...]) -> int:
        seen.append(victim.state)
        return 1 << 30

    limits = Limits(max_loaded=1, memory_budget="1GiB", memory_margin=0)
    plugins = PluginManager.discover(entry_points=False)
    pool = ModelPool([tiny(tiny_model)], limits, plugins, memory_probe=monitor)
    entry = pool.entry("tiny")
    victim = Instance(key="v", entry=entry, path=tiny_model, backend="t", state="ready")
    pool.instances["v"] = victim
    try:
        await pool._make_room(anyio.current_time() + 1, entry, 0, (), lambda: None)
    finally:
        await pool.aclose()
    assert seen and set(seen) == {"unloading"}
    assert not pool.instances


async def test_a_gpu_instance_counts_its_process_overhead(tiny_model):
    """On a GPU the pool counts llama.cpp's buffers plus what the runtime's process
    holds besides (driver context, BLAS workspace): measured 0.6-0.9 GiB on an H100."""
    from rocmux.inventory import ModelInfo
    from rocmux.memory import GPU_PROCESS_OVERHEAD, fit

    limits = Limits(memory_budget=8 << 30)
    pool = ModelPool([tiny(tiny_model)], limits, PluginManager.discover(entry_points=False))
    entry = pool.entry("tiny")
    info = ModelInfo.from_gguf(tiny_model)
    _, on_cpu = await pool._plan(entry, tiny_model)
    pool._on_gpu["tiny"] = True
    load, on_gpu = await pool._plan(entry, tiny_model)
    buffers = fit(info, 8 << 30, margin=0, requested=load).estimate
    assert on_gpu == buffers.device_total + GPU_PROCESS_OVERHEAD
    assert on_cpu < on_gpu  # the tiny model's host estimate has no such overhead


async def test_the_observer_hears_of_an_unload_before_the_runtime_stops():
    """``on_unloading`` comes while the runtime still runs (``rocmux serve`` closes its
    spare connections to it then), ``on_evict`` once it has stopped."""
    plugins = PluginManager()
    model = ServedModel(
        backend="test", model_path=Path("m.gguf"), make_launch=_launch, plugins=plugins
    )
    await model.start()
    seen: list[tuple[str, bool]] = []
    running_now = lambda: model.server is not None and model.server.running  # noqa: E731
    observer = PoolObserver(
        on_unloading=lambda i: seen.append(("unloading", running_now())),
        on_evict=lambda i, reason: seen.append((f"evict {reason}", running_now())),
    )
    entry = ModelEntry(name="m", path=Path("m.gguf"))
    pool = ModelPool(entries=[entry], limits=Limits(), plugins=plugins, observer=observer)
    instance = Instance(key="k", entry=entry, path=Path("m.gguf"), backend="test")
    instance.model, instance.state = model, "ready"
    pool.instances["k"] = instance
    assert await pool.unload("k")
    assert seen == [("unloading", True), ("evict admin", False)]
    await pool.aclose()
