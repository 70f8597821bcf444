"""``[server] workers``: front processes read requests and relay answers while the main
process keeps the pool (``rocmux.front``, ``rocmux.leases``). Each test runs ``rocmux
serve`` as a subprocess with two fronts and a real llama-server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rocmux import supervisor
from rocmux.testing.processes import alive, descendants
from test_serve import metric

pytestmark = pytest.mark.llama_server


@pytest.fixture
def fronts(tmp_path: Path, tiny_model: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """(base URL, process) of ``rocmux serve`` with 2 fronts and the tiny model."""
    yield from _serve(tmp_path, tiny_model)


@pytest.fixture
def fronts_smol(
    tmp_path: Path, default_model: Path
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """The same with SmolLM2 (slow enough on a CPU for a stream to outlast a second)."""
    yield from _serve(tmp_path, default_model)


def _serve(tmp_path: Path, model: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    config = tmp_path / "rocmux.toml"
    config.write_text(
        f"""
[server]
workers = 2
shutdown_timeout = 5
api_keys = ["sk-test"]

[limits]
stall_timeout = 5

[[models]]
name = "tiny"
path = "{model}"
aliases = ["t"]
[models.load]
context_len = 4096
parallel = 4
"""
    )
    port = supervisor.free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rocmux.cli", "serve", "--port", str(port)],
        env={**os.environ, "ROCMUX_CONFIG": str(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    try:
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, "rocmux serve did not start"
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


AUTH = {"authorization": "Bearer sk-test"}


def front_pids(proc: subprocess.Popen[bytes]) -> set[int]:
    return {
        pid
        for pid in descendants(proc.pid, zombies=False)
        if b"rocmux.front" in Path(f"/proc/{pid}/cmdline").read_bytes()
    }


def stream(url: str, body: dict[str, object]) -> list[str]:
    """The ``data:`` payloads of one streamed completion."""
    with httpx.stream(
        "POST", url + "/v1/completions", json=body, headers=AUTH, timeout=60
    ) as response:
        assert response.status_code == 200, response.read()
        return [line[6:] for line in response.iter_lines() if line.startswith("data: ")]


def test_fronts_serve_every_endpoint_and_the_main_process_counts_their_requests(fronts):
    url, proc = fronts
    assert len(front_pids(proc)) == 2
    # Not loaded: the front hands the request to the main process, which loads the model.
    body = {"model": "t", "prompt": "hi", "max_tokens": 4, "ignore_eos": True}
    first = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["completion_tokens"] == 4
    # Loaded: 24 streams over new connections, spread over both fronts, leased.
    results: list[list[str]] = []

    def one() -> None:
        results.append(stream(url, {**body, "stream": True}))

    threads = [threading.Thread(target=one) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 24
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
    plain = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert plain.json()["usage"]["completion_tokens"] == 4
    # Everything else is the main process's answer, relayed.
    assert httpx.get(url + "/v1/models", headers=AUTH).json()["data"][0]["id"] == "tiny"
    assert httpx.get(url + "/v1/models").status_code == 401
    unknown = httpx.post(url + "/v1/completions", json={**body, "model": "nope"}, headers=AUTH)
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    bad = httpx.post(url + "/v1/completions", content=b"{", headers=AUTH)
    assert bad.status_code == 400
    assert "not valid JSON" in bad.json()["error"]["message"]
    wrong_method = httpx.get(url + "/v1/completions", headers=AUTH)
    assert wrong_method.status_code == 405
    # The main process's metrics count the fronts' requests under the model's name.
    text = httpx.get(url + "/metrics").text
    assert metric(text, "rocmux_requests_total", model="tiny", status="200") == 26
    assert metric(text, "rocmux_requests_total", status="400") == 1
    assert metric(text, "rocmux_tokens_total", model="tiny", kind="completion") == 26 * 4
    assert metric(text, "rocmux_time_to_first_token_seconds_count", model="tiny") >= 24
    # Leases went through the burst gate of the main process.
    assert metric(text, "rocmux_burst_forwards_sum") >= 25
    (row,) = httpx.get(url + "/admin/instances", headers=AUTH).json()["instances"]
    assert row["in_flight"] == 0  # every lease was given back


def test_a_runtime_killed_mid_stream_through_a_front_is_an_error_event_then_recovers(
    fronts_smol,
):
    url, proc = fronts_smol
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).is_success
    (row,) = httpx.get(url + "/admin/instances", headers=AUTH).json()["instances"]
    events: list[str] = []
    with httpx.stream(
        "POST",
        url + "/v1/completions",
        json={**body, "max_tokens": 3000, "ignore_eos": True, "stream": True},
        headers=AUTH,
        timeout=60,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 3:
                    os.kill(row["pid"], signal.SIGKILL)
    error = json.loads(events[-1])["error"]
    assert error["code"] == "runtime_failed"
    # The main process's explanation: the runtime died, by which signal.
    assert "SIGKILL" in error["message"] or "killed" in error["message"], error
    again = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert again.status_code == 200, again.text
    text = httpx.get(url + "/metrics").text
    assert metric(text, "rocmux_runtime_crashes_total", model="tiny") == 1


def test_a_front_that_dies_is_replaced(fronts):
    url, proc = fronts
    before = front_pids(proc)
    victim = min(before)
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    while True:
        now = front_pids(proc)
        if victim not in now and len(now) == 2:
            break
        assert time.monotonic() < deadline, now
        time.sleep(0.1)
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    for _ in range(4):  # new connections: some reach the new front
        assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).is_success


def test_sigkill_of_the_main_process_leaves_no_front_and_no_runtime(fronts):
    url, proc = fronts
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).is_success
    children = descendants(proc.pid, zombies=False)
    assert len(children) >= 3  # two fronts, one llama-server
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children):
        assert time.monotonic() < deadline, [p for p in children if alive(p)]
        time.sleep(0.05)


def test_sigterm_drains_a_fronts_stream_then_stops_fronts_and_runtime(fronts_smol):
    url, proc = fronts_smol
    body = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
    assert httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60).is_success
    children = descendants(proc.pid, zombies=False)
    out: dict[str, object] = {}

    def endless() -> None:
        try:
            out["events"] = stream(
                url, {**body, "max_tokens": 3000, "ignore_eos": True, "stream": True}
            )
        except httpx.HTTPError as exc:
            out["error"] = repr(exc)

    reader = threading.Thread(target=endless)
    reader.start()
    time.sleep(1.0)
    assert not out  # still streaming
    proc.send_signal(signal.SIGTERM)
    signalled = time.monotonic()
    reader.join(30)
    proc.wait(timeout=30)
    assert proc.returncode in (0, -signal.SIGTERM)
    # Cut at the drain deadline (5 s) with an error event, not a torn connection.
    assert "error" not in out, out
    events = out["events"]
    assert isinstance(events, list)
    assert json.loads(events[-1])["error"]["code"] == "server_shutdown"
    assert time.monotonic() - signalled < 5 + 15
    assert not any(alive(pid) for pid in children)
