"""Faults in runtimes under ``rocmux serve``, with a real llama-server: hung (SIGSTOPped)
runtimes, runtimes that fail at start, a port taken between choice and bind, random
faults under concurrent load, and a graceful shutdown that drains, then cuts.

A runtime SIGKILLed mid-stream is ``test_serve.py::test_instance_killed_mid_stream_then_
next_request_succeeds``; ``bench/faults.py`` runs the random faults for 100 rounds.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import ClassVar

import anyio
import attrs
import httpx
import pytest
from rocmux import hookimpl, supervisor
from rocmux.backend import Backend
from rocmux.config import Limits, ModelEntry
from rocmux.events import LifecycleEvent
from rocmux.launch import PORT, Launch
from rocmux.manager import PluginManager
from rocmux.served import ServedModel
from rocmux.testing.processes import alive
from rocmux.types import Availability, LoadConfig
from test_plugins import Registers
from test_serve import running, tiny

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

# Short limits, so that a hung runtime costs the tests seconds, not minutes.
FAST = Limits(stall_timeout=2.0, health_timeout=0.5)
STREAM = {"prompt": "hi", "max_tokens": 100000, "stream": True, "ignore_eos": True}


def long(tiny_model: Path, **load: object) -> ModelEntry:
    """The tiny model with room for streams that outlast the fault."""
    return ModelEntry(name="tiny", path=tiny_model, load=LoadConfig(context_len=16384, **load))  # type: ignore[arg-type]


class Events:
    def __init__(self) -> None:
        self.events: list[LifecycleEvent] = []

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        self.events.append(event)


async def _data(response: httpx.Response) -> AsyncIterator[str]:
    """The ``data:`` payloads of an SSE response, as they arrive."""
    async for line in response.aiter_lines():
        if line.startswith("data: "):
            yield line[6:]


async def _ok(client: httpx.AsyncClient) -> httpx.Response:
    r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200, r.text
    return r


# -- hung runtimes --------------------------------------------------------------------------


async def test_hung_idle_runtime_is_killed_and_restarted(tiny_model):
    """SIGSTOP: the process lives and holds its port, but answers nothing. The health
    monitor's probe times out twice; the runtime is killed and started again."""
    async with running([tiny(tiny_model)], FAST) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _ok(client)
            (instance,) = pool.instances.values()
            hung = instance.model.server
            os.kill(hung.pid, signal.SIGSTOP)
            started = time.monotonic()
            with anyio.fail_after(10):
                while hung.running:
                    await anyio.sleep(0.05)
            detected = time.monotonic() - started
            # interval 0.5 s + two probes of 0.5 s, with slack for a loaded machine
            assert detected < 5, detected
            with anyio.fail_after(20):
                while instance.model.server is hung:
                    await anyio.sleep(0.05)
            assert "did not answer /health within 0.5 s" in instance.error
            assert instance.crashes == 1
            assert not alive(hung.pid)
            await _ok(client)


async def test_requests_to_a_hung_runtime_fail_within_the_stall_timeout(tiny_model):
    async with running([long(tiny_model)], FAST) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            await _ok(client)
            (instance,) = pool.instances.values()
            # A stream that is cut by the hang: it ends with an error event, in time.
            events: list[str] = []
            async with client.stream(
                "POST", "/v1/completions", json={"model": "tiny", **STREAM}
            ) as response:
                async for data in _data(response):
                    events.append(data)
                    if len(events) == 1:
                        hung = instance.model.server
                        os.kill(hung.pid, signal.SIGSTOP)
                        stopped = time.monotonic()
            took = time.monotonic() - stopped
            error = json.loads(events[-1])["error"]
            assert error["code"] == "runtime_timeout"
            assert "sent nothing for 2 s" in error["message"]
            assert "did not answer /health" in error["message"]
            # stall 2 s + two probes of 0.5 s (+ slack); never the stream's natural end
            assert took < 8, took
            assert not alive(hung.pid)

            # A plain request to a runtime hung before it arrives: 504, not a hang.
            await _ok(client)
            hung = instance.model.server
            os.kill(hung.pid, signal.SIGSTOP)
            started = time.monotonic()
            r = await client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
            )
            assert r.status_code == 504, r.text
            assert r.json()["error"]["code"] == "runtime_timeout"
            assert time.monotonic() - started < 8
            await _ok(client)  # restarted on demand


# A runtime that stops listening but stays alive, as llama-server can when SIGTERMed with
# streams open (its shutdown waits for them, and they wait for it).
DEAF_SERVER = """
import http.server, signal, sys, threading, time
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
deaf = threading.Event()
signal.signal(signal.SIGUSR1, lambda *_: deaf.set())
print("listening on http://", flush=True)
while not deaf.wait(0.05):
    pass
server.shutdown(); server.server_close()
time.sleep(600)
"""


async def test_runtime_alive_but_no_longer_listening_is_killed():

    def launch() -> Launch:
        return Launch(backend="test", argv=[sys.executable, "-c", DEAF_SERVER, PORT])

    served = ServedModel(
        backend="test",
        model_path=Path("none.gguf"),
        make_launch=launch,
        plugins=PluginManager.discover(entry_points=False),
    )
    await served.start()
    try:
        assert await served.check_health(0.3)
        deaf = served.server
        os.kill(deaf.pid, signal.SIGUSR1)
        with anyio.fail_after(10):
            while await deaf.probe(0.3) is None:
                await anyio.sleep(0.02)
        assert deaf.running
        assert not await served.check_health(0.3)
        assert not deaf.running
        with pytest.raises(Exception, match="refused connections on port"):
            await deaf.check_alive()
        await served.ensure_running()  # a fresh process
        assert served.server is not deaf and await served.check_health(0.3)
    finally:
        await served.close()


# A stand-in runtime, not llama-server: real llama-server reaches this state only by a
# race (about one SIGTERM in a few dozen, with streams open, in bench/faults.py): its HTTP
# threads still answer /health while nothing runs the requests. GET /mute mutes it for
# new requests (a stream already running goes on), GET /unmute makes it answer again.
MUTE_SERVER = """
import http.server, json, sys, threading, time
mute = threading.Event()
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def reply(self, data):
        body = json.dumps(data).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_GET(self):
        if self.path == "/mute":
            mute.set()
        elif self.path == "/unmute":
            mute.clear()
        self.reply({"status": "ok"})
    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["content-length"])))
        while mute.is_set():
            time.sleep(0.05)
        if not request.get("stream"):
            self.reply({"object": "text_completion", "model": "mute",
                        "choices": [{"index": 0, "text": "ok", "finish_reason": "stop"}]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for i in range(40):
            choice = {"index": 0, "text": "x", "finish_reason": "stop" if i == 39 else None}
            self.send_chunk({"object": "text_completion", "choices": [choice]})
            time.sleep(0.1)
        self.send_chunk("[DONE]")
        self.wfile.write(b"0\\r\\n\\r\\n")
    def send_chunk(self, data):
        text = data if isinstance(data, str) else json.dumps(data)
        event = ("data: " + text + "\\n\\n").encode()
        self.wfile.write(b"%x\\r\\n%s\\r\\n" % (len(event), event))
        self.wfile.flush()
    def log_message(self, *args):
        pass
server = http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler)
server.daemon_threads = True
print("listening on http://", flush=True)
server.serve_forever()
"""


@attrs.define(eq=False)
class MuteBackend(Backend):
    """Runs ``MUTE_SERVER``: a stand-in runtime for this one fault, not llama-server."""

    name: ClassVar[str] = "mute"
    plugins: PluginManager

    async def detect(self) -> Availability:
        return Availability(ok=True, reason="a stand-in runtime for a test", priority=0)

    async def load(self, model: Path, config: LoadConfig) -> ServedModel:
        served = ServedModel(
            backend=self.name,
            model_path=model,
            make_launch=lambda: Launch(
                backend=self.name, argv=[sys.executable, "-c", MUTE_SERVER, PORT]
            ),
            plugins=self.plugins,
        )
        await served.start()
        return served


async def test_stand_in_runtime_answering_health_but_no_request_is_killed_at_the_second_stall(
    tiny_model,
):
    """With a stand-in runtime (``MUTE_SERVER``, a Python script, not llama-server): its
    health check passes, so only stalls can show it hung. Stalls while it streams to
    another client are a busy runtime; one silent stall may be a slow prompt; a second,
    with nothing sent to anyone since the first, gets it killed and restarted."""
    plugins = PluginManager.discover()
    plugins.register(Registers(MuteBackend(plugins)), name="mute")
    entry = ModelEntry(name="mute", path=tiny_model, backend="mute")
    body = {"model": "mute", "prompt": "x", "max_tokens": 2}
    async with running([entry], FAST, plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:

            async def stalled() -> str:
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 504, r.text
                assert r.json()["error"]["code"] == "runtime_timeout"
                return r.json()["error"]["message"]

            assert (await client.post("/v1/completions", json=body)).status_code == 200
            (instance,) = pool.instances.values()
            first = instance.model.server

            # Busy: two requests stall together while a stream runs. Not killed.
            events: list[str] = []
            messages: list[str] = []

            async def one_stall() -> None:
                messages.append(await stalled())

            async def two_stalls() -> None:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(one_stall)
                    tg.start_soon(one_stall)

            async with client.stream(
                "POST", "/v1/completions", json={**body, "stream": True}
            ) as response:
                async for data in _data(response):
                    events.append(data)
                    if len(events) == 1:
                        await client.get(first.url + "/mute")
                        await two_stalls()
            assert len(messages) == 2 and all("killed" not in m for m in messages), messages
            assert events[-1] == "[DONE]" and len(events) == 41
            assert first.running

            # Silent: the first stall is not enough.
            message = await stalled()
            assert "sent nothing for 2 s" in message and "killed" not in message
            # An answer in between: the next stall is a first one again.
            await client.get(first.url + "/unmute")
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            await client.get(first.url + "/mute")
            assert "killed" not in await stalled()
            assert first.running
            message = await stalled()
            assert (
                "2 requests in a row got nothing while it still answered its health check, "
                "so it was killed"
            ) in message
            assert "was killed (signal SIGKILL)" in message
            assert not alive(first.pid)
            assert (await client.post("/v1/completions", json=body)).status_code == 200
            assert instance.model.server is not first


# -- failing at start -----------------------------------------------------------------------


class Spoiler:
    """Spoils the next spawn the way broken deployments do."""

    def __init__(self) -> None:
        self.mode: str | None = None

    @hookimpl
    def rocmux_adjust_launch(self, launch: Launch) -> None:
        if self.mode == "bad_flag":
            launch.argv.append("--no-such-flag")
        elif self.mode == "oom":
            # A 4 GiB KV cache under a 3 GB address-space limit: a real allocation failure
            # (2 GB was too little for the stacks of the HTTP threads rocmux now asks for).
            argv = launch.argv
            argv[argv.index("--ctx-size") + 1] = str(1 << 24)
            launch.argv = ["prlimit", "--as=3000000000", "--", *argv]


async def test_runtime_failing_at_start_is_a_clear_error_then_recovers(tiny_model):
    spoiler = Spoiler()
    plugins = PluginManager.discover()
    plugins.register(spoiler, name="spoiler")
    async with running([tiny(tiny_model)], plugins=plugins) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for mode, quoted in (
                ("bad_flag", "--no-such-flag"),
                ("oom", "failed to allocate"),
            ):
                spoiler.mode = mode
                r = await client.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                )
                assert r.status_code == 502, r.text
                message = r.json()["error"]["message"]
                assert "exited with code" in message and "before it was ready" in message
                assert quoted in message  # the runtime's own words
                assert not pool.instances  # a failed load is not kept
                spoiler.mode = None
                await _ok(client)
                (instance,) = pool.instances.values()
                await pool.unload(instance.key)


class _Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'{"status":"ok"}')

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("thief_kind", ["silent", "answers_health"])
async def test_port_taken_between_choice_and_bind_is_retried(tiny_model, monkeypatch, thief_kind):
    """Another process binds the chosen port before llama-server does: llama-server
    fails to bind and exits; the supervisor spawns it again on another port. A thief
    that answers ``/health`` with 200 is not taken for llama-server: the socket is not
    the child's (``holds_listening_port``)."""
    if thief_kind == "silent":
        thief = socket.socket()
        thief.bind(("127.0.0.1", 0))
        thief.listen(1)
        taken = thief.getsockname()[1]
    else:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        thief = server.socket
        taken = server.server_address[1]
    real = supervisor.free_port
    ports = iter([taken])
    monkeypatch.setattr(
        supervisor, "free_port", lambda host="127.0.0.1": next(ports, None) or real(host)
    )
    events = Events()
    plugins = PluginManager.discover()
    plugins.register(events, name="events")
    try:
        async with running([tiny(tiny_model)], plugins=plugins) as (url, pool):
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                await _ok(client)
                (instance,) = pool.instances.values()
                assert instance.model.server.port != taken
    finally:
        if thief_kind != "silent":
            server.shutdown()
        thief.close()
    kinds = [(e.kind, e.detail) for e in events.events if e.kind != "stopped"]
    assert kinds[:4] == [
        ("spawned", kinds[0][1]),
        ("exited", "port taken; retrying"),
        ("spawned", kinds[2][1]),
        ("ready", ""),
    ]
    assert f"--port {taken}" in kinds[0][1]


# -- random faults under load ---------------------------------------------------------------


async def test_random_faults_under_concurrent_load(tiny_model):
    """15 rounds of ``bench/faults.py``: every fault kind at least twice."""
    import faults

    summary = await faults.run(
        tiny_model,
        rounds=15,
        clients=6,
        seed=7,
        deadline=20.0,
        limits=Limits(stall_timeout=2.0, health_timeout=0.5, max_restarts=10, restart_window=10),
    )
    assert set(summary["faults"]) == set(faults.FAULTS)
    assert summary["failures"] == [], summary["failures"]
    assert summary["hung"] == 0
    assert summary["outcomes"].get("error", 0) > 0  # the faults did land on clients
    assert summary["client_seconds_max"] < 20.0
    assert summary["unrecovered_rounds"] == 0
    assert all(summary["spawns_spoiled"].get(f, 0) >= 2 for f in ("bad_flag", "oom", "port_taken"))
    assert summary["orphans_during"] == []
    assert summary["left_at_end"] == {}
    (final,) = summary["final_instances"]
    assert final["state"] == "ready"


async def test_256_concurrent_streaming_clients_all_get_whole_answers(tiny_model):
    """``bench/soak.py`` does the same against a ``rocmux serve`` subprocess."""
    async with running([tiny(tiny_model, parallel=8)]) as (url, pool):
        outcomes: list[str] = []
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=32)
        # 256 requests share 8 slots: the last wait for 31 rounds of the first, which
        # takes minutes on a busy 2-core box. Whole answers are the point, not latency.
        async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:

            async def one(i: int) -> None:
                body = {"model": "tiny", "prompt": f"hi {i}", "max_tokens": 16, "stream": True}
                finish, done = None, False
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for line in r.aiter_lines():
                        if line == "data: [DONE]":
                            done = True
                        elif line.startswith("data: "):
                            for choice in json.loads(line[6:])["choices"]:
                                finish = choice["finish_reason"] or finish
                outcomes.append("whole" if finish and done else f"cut {finish} {done}")

            async with anyio.create_task_group() as tg:
                for i in range(256):
                    tg.start_soon(one, i)
        assert outcomes == ["whole"] * 256
        (instance,) = pool.instances.values()
        assert instance.in_flight == 0 and instance.requests == 256


# -- graceful shutdown ----------------------------------------------------------------------


def _serve(port: int, config: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "rocmux.cli", "serve", "--port", str(port), *extra],
        env={**os.environ, "ROCMUX_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _wait_up(url: str, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        assert time.monotonic() < deadline, "rocmux serve did not start"
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)


@pytest.fixture
def serve_config(tmp_path: Path, default_model: Path) -> tuple[Path, int]:
    config = tmp_path / "rocmux.toml"
    config.write_text(
        f"""
[server]
shutdown_timeout = 8

[[models]]
name = "smol"
path = "{default_model}"
[models.load]
context_len = 4096
parallel = 2
"""
    )
    return config, supervisor.free_port()


def _read_stream(url: str, body: dict[str, object], out: dict[str, object]) -> None:
    events: list[str] = []
    out["events"] = events
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
    except httpx.HTTPError as exc:
        out["transport_error"] = repr(exc)
    out["ended"] = time.monotonic()


def test_sigterm_drains_streams_then_cuts_them_and_stops_every_runtime(serve_config):
    """SIGTERM: a short stream in flight completes; a stream still running at the drain
    deadline (8 s) ends with an error event, cleanly; the runtime is stopped; a restart
    on the same port finds nothing left."""
    import threading

    config, port = serve_config
    url = f"http://127.0.0.1:{port}"
    proc = _serve(port, config)
    try:
        _wait_up(url, proc)
        assert (
            httpx.post(
                url + "/v1/completions",
                json={"model": "smol", "prompt": "x", "max_tokens": 2},
                timeout=60,
            ).status_code
            == 200
        )
        (row,) = httpx.get(url + "/admin/instances").json()["instances"]
        runtime = row["pid"]
        short: dict[str, object] = {}
        endless: dict[str, object] = {}
        threads = [
            threading.Thread(
                target=_read_stream,
                args=(
                    url,
                    {
                        "model": "smol",
                        "prompt": "Once",
                        # Long enough to be in flight when the signal comes, even when
                        # the first events of both streams take a while to arrive.
                        "max_tokens": 64,
                        "stream": True,
                        "ignore_eos": True,
                    },
                    short,
                ),
            ),
            threading.Thread(
                target=_read_stream,
                args=(
                    url,
                    {
                        "model": "smol",
                        "prompt": "Twice",
                        "max_tokens": 3000,
                        "stream": True,
                        "ignore_eos": True,
                    },
                    endless,
                ),
            ),
        ]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while not (short.get("events") and endless.get("events")):
            assert time.monotonic() < deadline, "the streams never started"
            time.sleep(0.01)
        assert "ended" not in short  # in flight when the signal comes
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        for t in threads:
            t.join(timeout=30)
        proc.wait(timeout=30)
        exited = time.monotonic()
        assert proc.returncode in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The short stream was drained: whole, with its finish reason and [DONE].
    assert "transport_error" not in short, short
    assert short["events"][-1] == "[DONE]"
    assert json.loads(short["events"][-2])["choices"][0]["finish_reason"] == "length"
    # The endless one was cut at the deadline with an error event, not a torn connection.
    assert "transport_error" not in endless, endless
    error = json.loads(endless["events"][-1])["error"]
    assert error["code"] == "server_shutdown", error
    assert 7.5 < endless["ended"] - signalled < 8 + 4
    assert exited - signalled < 8 + 10
    assert not alive(runtime)
    # A restart on the same port: it binds, and no instance or runtime is left over.
    again = _serve(port, config)
    try:
        _wait_up(url, again)
        assert httpx.get(url + "/admin/instances").json()["instances"] == []
        again.send_signal(signal.SIGTERM)
        again.wait(timeout=30)
    finally:
        if again.poll() is None:
            again.kill()
            again.wait()
    # uvicorn re-raises the signal once it has shut down gracefully.
    assert again.returncode in (0, -signal.SIGTERM)
