"""``rocmux serve``: the pool behind the OpenAI-compatible API, with real llama-servers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import anyio
import httpx
import pytest
from rocmux.config import Limits, ModelEntry, ServerSettings
from rocmux.supervisor import free_port
from rocmux.testing.serving import serve_in_process as running
from rocmux.types import LoadConfig

pytestmark = [pytest.mark.anyio, pytest.mark.llama_server]

QUESTION = "What is the capital of France? Answer briefly."


def smol(default_model: Path, **load: object) -> ModelEntry:
    return ModelEntry(
        name="smol",
        path=default_model,
        aliases=("default",),
        load=LoadConfig(context_len=2048, **load),
    )  # type: ignore[arg-type]


def tiny(tiny_model: Path, **load: object) -> ModelEntry:
    return ModelEntry(name="tiny", path=tiny_model, load=LoadConfig(context_len=512, **load))  # type: ignore[arg-type]


def metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if not (line.startswith(name + "{") or line.startswith(name + " ")):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def test_openai_client_streaming_and_not(default_model):
    import openai

    async with running([smol(default_model)]) as (url, _pool):
        client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused")
        reply = await client.chat.completions.create(
            model="smol",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=30,
        )
        assert "Paris" in reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0
        pieces = []
        stream = await client.chat.completions.create(
            model="default",
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=30,
            stream=True,
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
        assert "".join(pieces) == reply.choices[0].message.content
        models = await client.models.list()
        assert [m.id for m in models.data] == ["smol"]
        await client.close()


async def test_two_models_alternating_under_a_limit_of_one(default_model, tiny_model):
    async with running([smol(default_model), tiny(tiny_model)], Limits(max_loaded=1)) as (
        url,
        pool,
    ):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            answers: dict[str, list[str]] = {"smol": [], "tiny": []}
            for _ in range(3):
                for name in ("smol", "tiny"):
                    r = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": name,
                            "messages": [{"role": "user", "content": QUESTION}],
                            "temperature": 0,
                            "max_tokens": 16,
                        },
                    )
                    assert r.status_code == 200, r.text
                    answers[name].append(r.json()["choices"][0]["message"]["content"])
                    assert len(pool.instances) == 1
            metrics = (await client.get("/metrics")).text
    assert all("Paris" in a for a in answers["smol"])
    assert len(set(answers["tiny"])) == 1  # greedy: the same answer after every reload
    assert answers["tiny"][0]
    assert metric(metrics, "rocmux_model_loads_total", model="smol") == 3
    assert metric(metrics, "rocmux_model_loads_total", model="tiny") == 3
    assert metric(metrics, "rocmux_model_evictions_total", reason="lru") == 5


async def test_instance_killed_mid_stream_then_next_request_succeeds(tiny_model):
    # A long context, so generation cannot end on its own before the kill lands.
    entry = ModelEntry(name="tiny", path=tiny_model, load=LoadConfig(context_len=16384))
    async with running([entry]) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {
                "model": "tiny",
                "prompt": "hello",
                "max_tokens": 5000,
                "stream": True,
                "ignore_eos": True,
            }
            events = []
            async with client.stream("POST", "/v1/completions", json=body) as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    events.append(line[6:])
                    if len(events) == 1:
                        (instance,) = pool.instances.values()
                        os.kill(instance.model.server.pid, signal.SIGKILL)
            error = json.loads(events[-1])["error"]
            assert "SIGKILL" in error["message"]
            r = await client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "hello", "max_tokens": 4}
            )
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] == 4
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_runtime_crashes_total", model="tiny") == 1


async def test_64_concurrent_streaming_clients_get_whole_answers(tiny_model):
    async with running([tiny(tiny_model, parallel=8)]) as (url, _pool):
        results: list[tuple[int, str | None]] = []

        async def client_run(i: int) -> None:
            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                body = {
                    "model": "tiny",
                    "prompt": f"hello {i}",
                    "max_tokens": 24,
                    "stream": True,
                    "temperature": 0,
                }
                count, finish = 0, None
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        if line.startswith("data: {"):
                            choice = json.loads(line[6:])["choices"][0]
                            count += bool(choice["text"])
                            finish = choice["finish_reason"] or finish
                results.append((count, finish))

        async with anyio.create_task_group() as tg:
            for i in range(64):
                tg.start_soon(client_run, i)
    assert len(results) == 64
    assert all(finish == "length" for _, finish in results)
    assert all(count >= 20 for count, _ in results)  # a token may span two chunks' text


@pytest.mark.parametrize("window", [0.2, 0.0])
async def test_a_burst_of_requests_goes_to_the_runtime_together(tiny_model, window):
    """With a ``burst_window``, 8 streams sent at once are forwarded in one release,
    after a lone first request (which loads the model) went in its own; with 0 nothing
    is held. ``rocmux_burst_forwards`` in /metrics counts the releases."""
    settings = ServerSettings(burst_window=window)
    async with running([tiny(tiny_model, parallel=8)], settings=settings) as (url, _pool):
        limits = httpx.Limits(max_connections=16)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:

            async def one(i: int) -> str:
                body = {"model": "tiny", "prompt": f"hi {i}", "max_tokens": 4, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    assert response.status_code == 200
                    return (await response.aread()).decode()

            await one(-1)
            answers: list[str] = []

            async def collect(i: int) -> None:
                answers.append(await one(i))

            async with anyio.create_task_group() as tg:
                for i in range(8):
                    tg.start_soon(collect, i)
            text = (await client.get("/metrics")).text
    assert len(answers) == 8 and all(a.rstrip().endswith("data: [DONE]") for a in answers)
    releases = metric(text, "rocmux_burst_forwards_count")
    forwarded = metric(text, "rocmux_burst_forwards_sum")
    assert (releases, forwarded) == ((2, 9) if window else (0, 0))


async def test_client_disconnect_cancels_the_upstream_request(tiny_model):
    async with running([tiny(tiny_model, parallel=1)]) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {
                "model": "tiny",
                "prompt": "hi",
                "max_tokens": 100000,
                "stream": True,
                "ignore_eos": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _line in response.aiter_lines():
                    break
            (instance,) = pool.instances.values()
            with anyio.fail_after(5):
                while True:
                    slots = (await client.get(instance.model.url + "/slots")).json()
                    if not any(s["is_processing"] for s in slots) and instance.in_flight == 0:
                        break
                    await anyio.sleep(0.02)


async def test_queue_limit_answers_503_with_retry_after(tiny_model):
    async with running([tiny(tiny_model, parallel=1)], Limits(queue_length=0)) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            body = {
                "model": "tiny",
                "prompt": "hi",
                "max_tokens": 100000,
                "stream": True,
                "ignore_eos": True,
            }
            async with client.stream("POST", "/v1/completions", json=body) as response:
                async for _line in response.aiter_lines():
                    break
                busy = await client.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                )
            assert busy.status_code == 503
            assert busy.headers["retry-after"] == "1"
            assert busy.json()["error"]["code"] == "overloaded"


async def test_idle_instances_are_unloaded_after_their_ttl(tiny_model):
    async with running([tiny(tiny_model)], Limits(idle_ttl=0.3)) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            r = await client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
            )
            assert r.status_code == 200
            (instance,) = pool.instances.values()
            pid = instance.model.server.pid
            with anyio.fail_after(5):
                while pool.instances:
                    await anyio.sleep(0.05)
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_evictions_total", model="tiny", reason="idle") == 1
    assert (
        not Path(f"/proc/{pid}/cmdline").exists() or not Path(f"/proc/{pid}/cmdline").read_bytes()
    )


async def test_identical_configurations_share_one_instance(tiny_model):
    entries = [
        tiny(tiny_model),
        ModelEntry(name="same", path=tiny_model, load=LoadConfig(context_len=512)),
    ]
    async with running(entries) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            for name in ("tiny", "same", "tiny"):
                r = await client.post(
                    "/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 2}
                )
                assert r.status_code == 200
            assert len(pool.instances) == 1


async def test_concurrent_first_requests_load_once(tiny_model):
    async with running([tiny(tiny_model)]) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:

            async def one() -> None:
                r = await client.post(
                    "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
                )
                assert r.status_code == 200

            async with anyio.create_task_group() as tg:
                for _ in range(8):
                    tg.start_soon(one)
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_loads_total", model="tiny") == 1


async def test_bad_requests_get_openai_errors(tiny_model):
    settings = ServerSettings(max_body_bytes=10_000)
    async with running([tiny(tiny_model)], settings=settings) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            cases = [
                (b"{not json", 400, None),
                (b"[1, 2]", 400, None),
                (json.dumps({"prompt": "x"}).encode(), 400, "model"),
                (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
                (
                    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -1}).encode(),
                    400,
                    "max_tokens",
                ),
                (
                    json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "9"}).encode(),
                    400,
                    "max_tokens",
                ),
                (json.dumps({"model": "../../etc/passwd", "prompt": "x"}).encode(), 404, "model"),
                (json.dumps({"model": "tiny", "prompt": "x" * 20_000}).encode(), 413, None),
            ]
            for raw, status, param in cases:
                r = await client.post(
                    "/v1/completions", content=raw, headers={"content-type": "application/json"}
                )
                assert r.status_code == status, (raw[:40], r.text)
                error = r.json()["error"]
                assert error["message"]
                assert error["param"] == param
            r = await client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
            assert r.status_code == 400


async def test_api_keys_guard_the_api_and_admin_but_not_health(tiny_model):
    settings = ServerSettings(api_keys=("sk-one", "sk-two"))
    async with running([tiny(tiny_model)], settings=settings) as (url, _pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            assert (await client.get("/health")).status_code == 200
            for path in ("/v1/models", "/admin/instances"):
                assert (await client.get(path)).status_code == 401
                bad = await client.get(path, headers={"authorization": "Bearer sk-three"})
                assert bad.status_code == 401
                good = await client.get(path, headers={"authorization": "Bearer sk-two"})
                assert good.status_code == 200
            r = await client.post("/v1/completions", json={"model": "tiny", "prompt": "x"})
            assert r.status_code == 401
            assert r.json()["error"]["code"] == "invalid_api_key"


async def test_admin_lists_and_unloads_instances(tiny_model):
    async with running([tiny(tiny_model)]) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await client.post(
                "/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 2}
            )
            (row,) = (await client.get("/admin/instances")).json()["instances"]
            assert row["model"] == "tiny"
            assert row["state"] == "ready"
            assert row["pid"]
            r = await client.post(f"/admin/instances/{row['key']}/unload")
            assert r.status_code == 200
            assert not pool.instances
            assert (await client.post("/admin/instances/nope/unload")).status_code == 404


def _serve_process(tmp_path: Path, tiny_model: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "rocmux.cli",
            "serve",
            "--port",
            str(port),
            "-m",
            str(tiny_model),
            "--ctx-size",
            "512",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, "rocmux serve did not start"
        try:
            r = httpx.post(
                url + "/v1/completions",
                json={"model": "tiny", "prompt": "x", "max_tokens": 2},
                timeout=30,
            )
            if r.status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.05)
    return proc, url


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_stopping_serve_leaves_no_runtime_behind(tmp_path, tiny_model, sig):
    proc, url = _serve_process(tmp_path, tiny_model)
    try:
        (row,) = httpx.get(url + "/admin/instances").json()["instances"]
        runtime = row["pid"]
        assert Path(f"/proc/{runtime}").exists()
        proc.send_signal(sig)
        proc.wait(timeout=30)
        deadline = time.monotonic() + 5
        while (
            Path(f"/proc/{runtime}").exists()
            and "Z" not in Path(f"/proc/{runtime}/stat").read_text().split(")")[-1].split()[0]
        ):
            assert time.monotonic() < deadline, f"runtime {runtime} outlived rocmux serve ({sig!r})"
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_memory_budget_holding_one_of_two_models_evicts_by_memory(default_model):
    # SmolLM2 at 2048 and 4096 tokens: about 155 and 202 MiB estimated; 300 MiB holds one.
    entries = [
        ModelEntry(name="smol2k", path=default_model, load=LoadConfig(context_len=2048)),
        ModelEntry(name="smol4k", path=default_model, load=LoadConfig(context_len=4096)),
    ]
    limits = Limits(max_loaded=4, memory_budget="300MiB")
    async with running(entries, limits) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            for _ in range(2):
                for name in ("smol2k", "smol4k"):
                    r = await client.post(
                        "/v1/chat/completions",
                        json={
                            "model": name,
                            "messages": [{"role": "user", "content": QUESTION}],
                            "temperature": 0,
                            "max_tokens": 16,
                        },
                    )
                    assert r.status_code == 200, r.text
                    assert "Paris" in r.json()["choices"][0]["message"]["content"]
                    assert sum(i.need for i in pool.instances.values()) <= 300 * 2**20
                    assert len(pool.instances) == 1
            metrics = (await client.get("/metrics")).text
    assert metric(metrics, "rocmux_model_evictions_total", reason="memory") == 3
    assert 0 < metric(metrics, "rocmux_memory_reserved_bytes") <= 300 * 2**20


async def test_model_that_cannot_fit_the_budget_alone_is_refused_at_once(default_model):
    entry = ModelEntry(name="smol", path=default_model, load=LoadConfig(context_len=2048))
    async with running([entry], Limits(memory_budget="100MiB")) as (url, pool):
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            started = time.monotonic()
            r = await client.post("/v1/completions", json={"model": "smol", "prompt": "x"})
            assert time.monotonic() - started < 5  # no load attempt: no runtime started
            metrics = (await client.get("/metrics")).text
            events = (await client.get("/admin/events")).json()["events"]
    assert r.status_code == 507
    assert events == []
    error = r.json()["error"]
    assert error["code"] == "model_too_large"
    assert "memory budget" in error["message"]
    assert not pool.instances
    assert metric(metrics, "rocmux_model_loads_total") == 0


async def test_the_runtimes_are_stopped_even_when_closing_the_api_fails(tiny_model, monkeypatch):
    """Shutdown closes the API's clients, then the pool; an error in the first must not
    leave the runtimes running (it once left a llama-server behind)."""
    from rocmux.config import Config
    from rocmux.http_api import Api
    from rocmux.serve import Service

    app, _api, pool = Service([tiny(tiny_model)], Config(), ServerSettings()).build()

    async def broken(self: Api) -> None:
        raise RuntimeError("closing the clients failed")

    monkeypatch.setattr(Api, "aclose", broken)
    failed = False
    try:
        async with app.starlette.router.lifespan_context(app.starlette):
            async with pool.use("tiny") as instance:
                server = instance.model.server  # type: ignore[union-attr]
                assert server.running
    except* RuntimeError as group:
        failed = any("closing the clients failed" in str(e) for e in group.exceptions)
    assert failed
    assert pool._closed
    assert not server.running


def test_serving_keeps_start_up_objects_out_of_gc_and_collects_young_objects_late():
    # Process-wide settings: checked in a child, not in the test process.
    code = (
        "import gc; from rocmux.serve import keep_gc_out_of_bursts, GC_YOUNG_THRESHOLD\n"
        "before = gc.get_threshold()\n"
        "keep_gc_out_of_bursts()\n"
        "print(gc.get_freeze_count() > 1000, gc.get_threshold()[0] == GC_YOUNG_THRESHOLD,"
        " gc.get_threshold()[1:] == before[1:], GC_YOUNG_THRESHOLD > before[0])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True"] * 4


def test_serve_drops_the_relays_spares_for_a_runtime_as_it_starts_to_unload(tmp_path):
    """The pool's ``on_unloading`` reaches the relay with the runtime's URL (only for
    plain-HTTP runtimes: the relay does not carry the others)."""
    from types import SimpleNamespace

    from rocmux.config import Config
    from rocmux.serve import Service

    entry = ModelEntry(name="m", path=tmp_path / "m.gguf")
    _app, api, pool = Service([entry], Config(), ServerSettings()).build()
    # As if streams had gone to two runtimes: the relay would keep spares for both.
    for key in (("127.0.0.1", 8123), ("127.0.0.1", 8124)):
        api.relay._peak[key] = 4
    for url in ("http://127.0.0.1:8123", "https://runtime.example", None):
        pool.observer.on_unloading(SimpleNamespace(model=SimpleNamespace(url=url)))  # type: ignore[arg-type]
    pool.observer.on_unloading(SimpleNamespace(model=None))  # type: ignore[arg-type]
    assert api.relay._peak == {("127.0.0.1", 8124): 4}
    assert api.relay.spares


async def test_an_idle_client_connection_outlives_the_clients_own_keepalive(tiny_model):
    """httpx (and so the ``openai`` client) reuses an idle connection for up to 5 s.
    Had the server closed it at 5 s too (uvicorn's default), a request sent then met a
    closed connection; the server keeps it longer, so a reuse after 6 s is answered."""
    from rocmux.serve import CLIENT_KEEPALIVE_S

    assert CLIENT_KEEPALIVE_S > 6
    async with running([tiny(tiny_model)]) as (url, _pool):
        host, port = url.removeprefix("http://").split(":")
        request = f"GET /health HTTP/1.1\r\nhost: {host}\r\n\r\n".encode()
        async with await anyio.connect_tcp(host, int(port)) as conn:
            for wait in (0, 6):
                await anyio.sleep(wait)
                await conn.send(request)
                with anyio.fail_after(5):
                    head = await conn.receive()
                assert head.startswith(b"HTTP/1.1 200"), head
