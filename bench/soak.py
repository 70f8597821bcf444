"""Load and soak of ``rocmux serve``: 256 concurrent streaming clients, then a soak with
mixed requests, watching the server's memory (RSS slope) and open file descriptors.

``rocmux serve`` runs as a subprocess (the real CLI, 127.0.0.1 only) over one CPU
llama-server with a tiny generated llama (``--parallel 8``). The clients run in this
process.

1. Burst: ``--clients`` (256) streaming completions at once (``max_tokens`` 32,
   ``ignore_eos``). Each must end whole: HTTP 200, a finish reason, ``[DONE]``.
   Reported: outcomes, time to first byte (p50/p95/max), wall time, tokens/s.
2. Soak for ``--minutes``: ``--workers`` loops sending mixed requests (streamed and
   plain completions and chats, clients hanging up mid-stream, bad JSON, unknown
   models, over-large bodies, ``/v1/models``, ``/metrics``, ``/health``). Every 5 s: the
   RSS, open fds and threads of ``rocmux serve`` and of llama-server.
   Reported: the RSS slope (least squares over the samples after the first fifth) in
   MiB per minute and over the whole soak, and the fds of ``rocmux serve`` at baseline
   (after warm-up), after the burst, and after the soak (each after 10 s idle and
   one request, which lets the connection pool drop expired keep-alive connections).

Run: ``python bench/soak.py --minutes 10``. Writes ``bench/results/soak.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gguf_factory import TinyLlama, write_tiny_llama  # noqa: E402
from rocmux.supervisor import free_port  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "soak.json"
MODEL = "tiny"


# -- process figures --------------------------------------------------------------------------


def proc_figures(pid: int | None) -> dict[str, int] | None:
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {
        "rss_kib": int(fields["VmRSS"].split()[0]),
        "fds": fds,
        "threads": int(fields["Threads"].strip()),
    }


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (x, y)."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    if var == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / var


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))]


# -- clients ------------------------------------------------------------------------------


async def stream(
    client: httpx.AsyncClient, path: str, body: dict[str, Any], leave_after: int | None = None
) -> tuple[str, float | None, int]:
    """(outcome, seconds to first byte, tokens)."""
    started = time.monotonic()
    first = None
    tokens, finish, done = 0, None, False
    async with client.stream("POST", path, json={**body, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return _note(r), None, 0
        async for line in r.aiter_lines():
            if first is None:
                first = time.monotonic() - started
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            data = json.loads(line[6:])
            if "error" in data:
                return "error event", first, tokens
            for choice in data.get("choices") or ():
                tokens += bool(choice.get("text") or (choice.get("delta") or {}).get("content"))
                finish = choice.get("finish_reason") or finish
            if leave_after is not None and tokens >= leave_after:
                return "left", first, tokens
    return ("whole" if finish and done else "cut"), first, tokens


def completion(i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "prompt": f"request {i}",
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
    }


def chat(i: int, tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": f"request {i}"}],
        "max_tokens": tokens,
        "temperature": 0,
    }


UNEXPECTED: list[str] = []


def _note(r: httpx.Response) -> str:
    if len(UNEXPECTED) < 20:
        UNEXPECTED.append(f"{time.strftime('%H:%M:%S')} {r.status_code} {r.text[:400]}")
    return f"http {r.status_code}"


async def mixed_request(client: httpx.AsyncClient, rng: random.Random, i: int) -> str:
    """One request of a random kind; returns 'kind: outcome'."""
    kind = rng.choice(
        [
            "stream",
            "stream",
            "stream_chat",
            "complete",
            "chat",
            "leave",
            "bad_json",
            "unknown_model",
            "too_large",
            "models",
            "metrics",
            "health",
        ]
    )
    if kind == "stream":
        outcome = (await stream(client, "/v1/completions", completion(i, 24)))[0]
    elif kind == "stream_chat":
        outcome = (await stream(client, "/v1/chat/completions", chat(i, 24)))[0]
    elif kind == "leave":
        outcome = (await stream(client, "/v1/completions", completion(i, 400), leave_after=3))[0]
    elif kind == "complete":
        r = await client.post("/v1/completions", json=completion(i, 16))
        outcome = "whole" if r.status_code == 200 else _note(r)
    elif kind == "chat":
        r = await client.post("/v1/chat/completions", json=chat(i, 16))
        outcome = "whole" if r.status_code == 200 else _note(r)
    elif kind == "bad_json":
        r = await client.post("/v1/completions", content=b'{"model": "tiny", "prompt": ')
        outcome = "expected" if r.status_code == 400 else f"http {r.status_code}"
    elif kind == "unknown_model":
        r = await client.post("/v1/completions", json={"model": "../nope", "prompt": "x"})
        outcome = "expected" if r.status_code == 404 else f"http {r.status_code}"
    elif kind == "too_large":
        r = await client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * (2 << 20)})
        outcome = "expected" if r.status_code == 413 else f"http {r.status_code}"
    else:
        path = {"models": "/v1/models", "metrics": "/metrics", "health": "/health"}[kind]
        r = await client.get(path)
        outcome = "whole" if r.status_code == 200 else _note(r)
    return f"{kind}: {outcome}"


# -- the run --------------------------------------------------------------------------------


class Serve:
    def __init__(self, model: Path, workdir: Path, parallel: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = workdir / "rocmux.toml"
        config.write_text(
            f"""
[server]
max_body_bytes = 1048576

[limits]
queue_length = 512
idle_ttl = 0

[[models]]
name = "{MODEL}"
path = "{model}"
[models.load]
context_len = {parallel * 1024}
parallel = {parallel}
"""
        )
        self.log = (workdir / "serve.log").open("wb")
        env = {**os.environ, "ROCMUX_CONFIG": str(config)}
        env.pop("ROCMUX_API_KEYS", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "rocmux.cli", "serve", "--port", str(self.port)],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_up(self, client: httpx.AsyncClient) -> None:
        with anyio.fail_after(60):
            while True:
                assert self.proc.poll() is None, "rocmux serve exited"
                try:
                    if (await client.get("/health")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await anyio.sleep(0.1)

    async def runtime_pid(self, client: httpx.AsyncClient) -> int | None:
        rows = (await client.get("/admin/instances")).json()["instances"]
        return rows[0]["pid"] if rows else None

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


async def settle(client: httpx.AsyncClient, seconds: float) -> None:
    await anyio.sleep(seconds)
    r = await client.post("/v1/completions", json=completion(0, 2))
    assert r.status_code == 200, r.text


async def burst(client: httpx.AsyncClient, clients: int) -> dict[str, Any]:
    results: list[tuple[str, float | None, int]] = []

    async def one(i: int) -> None:
        try:
            results.append(await stream(client, "/v1/completions", completion(i, 32)))
        except httpx.HTTPError as exc:
            results.append((f"transport {type(exc).__name__}", None, 0))

    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        for i in range(clients):
            tg.start_soon(one, i)
    wall = time.monotonic() - started
    firsts = [f for _, f, _ in results if f is not None]
    tokens = sum(t for _, _, t in results)
    return {
        "clients": clients,
        "outcomes": dict(Counter(o for o, _, _ in results)),
        "first_byte_p50_s": round(percentile(firsts, 0.5) or 0, 3),
        "first_byte_p95_s": round(percentile(firsts, 0.95) or 0, 3),
        "first_byte_max_s": round(max(firsts, default=0), 3),
        "wall_s": round(wall, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / wall, 1),
    }


async def soak(
    client: httpx.AsyncClient, serve: Serve, runtime: int | None, minutes: float, workers: int
) -> dict[str, Any]:
    rng = random.Random(0)
    outcomes: Counter[str] = Counter()
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    stop_at = started + minutes * 60
    counter = [0]

    async def work(seed: int) -> None:
        local = random.Random(seed)
        while time.monotonic() < stop_at:
            counter[0] += 1
            try:
                outcomes[await mixed_request(client, local, counter[0])] += 1
            except httpx.HTTPError as exc:
                outcomes[f"transport {type(exc).__name__}"] += 1

    async def sample() -> None:
        while time.monotonic() < stop_at:
            samples.append(
                {
                    "t_s": round(time.monotonic() - started, 1),
                    "serve": proc_figures(serve.proc.pid),
                    "runtime": proc_figures(runtime),
                    "requests": counter[0],
                }
            )
            await anyio.sleep(5)

    async with anyio.create_task_group() as tg:
        tg.start_soon(sample)
        for _ in range(workers):
            tg.start_soon(work, rng.randrange(1 << 30))

    def fit(who: str) -> dict[str, Any]:
        points = [(s["t_s"] / 60, s[who]["rss_kib"] / 1024) for s in samples if s[who] is not None]
        tail = [p for p in points if p[0] >= minutes / 5]
        per_min = slope(tail)
        return {
            "rss_mib_first": round(points[0][1], 1) if points else None,
            "rss_mib_last": round(points[-1][1], 1) if points else None,
            "rss_mib_max": round(max(p[1] for p in points), 1) if points else None,
            "rss_slope_mib_per_min": None if per_min is None else round(per_min, 3),
            "fds_min": min(s[who]["fds"] for s in samples if s[who]),
            "fds_max": max(s[who]["fds"] for s in samples if s[who]),
        }

    return {
        "minutes": minutes,
        "workers": workers,
        "requests": counter[0],
        "outcomes": dict(sorted(outcomes.items())),
        "unexpected": UNEXPECTED,
        "serve": fit("serve"),
        "runtime": fit("runtime"),
        "samples": samples,
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model = write_tiny_llama(workdir / "tiny.gguf", TinyLlama())
    serve = Serve(model, workdir, args.parallel)
    limits = httpx.Limits(max_connections=args.clients + 64, max_keepalive_connections=64)
    result: dict[str, Any] = {}
    try:
        async with httpx.AsyncClient(
            base_url=serve.url, timeout=120, limits=limits, trust_env=False
        ) as client:
            await serve.wait_up(client)
            # Warm-up: the model loads, every kind of request once.
            rng = random.Random(1)
            for i in range(60):
                await mixed_request(client, rng, i)
            runtime = await serve.runtime_pid(client)
            await settle(client, 10)
            result["baseline"] = {
                "serve": proc_figures(serve.proc.pid),
                "runtime": proc_figures(runtime),
            }
            print("baseline", result["baseline"], flush=True)
            result["burst"] = await burst(client, args.clients)
            print("burst", result["burst"], flush=True)
            await settle(client, 10)
            result["after_burst"] = {
                "serve": proc_figures(serve.proc.pid),
                "runtime": proc_figures(runtime),
            }
            print("after burst", result["after_burst"], flush=True)
            result["soak"] = await soak(client, serve, runtime, args.minutes, args.workers)
            summary = {k: v for k, v in result["soak"].items() if k != "samples"}
            print("soak", json.dumps(summary, indent=1), flush=True)
            await settle(client, 10)
            result["after_soak"] = {
                "serve": proc_figures(serve.proc.pid),
                "runtime": proc_figures(runtime),
            }
            print("after soak", result["after_soak"], flush=True)
            result["same_runtime_pid"] = runtime == await serve.runtime_pid(client)
    finally:
        result["serve_exit"] = serve.stop()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=256)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--parallel", type=int, default=8)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rocmux-soak-") as tmp:
        result = anyio.run(run, args, Path(tmp))
    result["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    result["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    result["args"] = {k: str(v) for k, v in vars(args).items()}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    burst_ok = result["burst"]["outcomes"] == {"whole": args.clients}
    print("burst all whole:", burst_ok)
    sys.exit(0 if burst_ok else 1)


if __name__ == "__main__":
    main()
