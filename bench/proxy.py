"""Proxy overhead of ``rocmux serve`` (and of LiteLLM's proxy) over direct llama-server
requests, and the latency of a model swap under ``--max-loaded 1``.

Part 1 (proxy overhead). ``rocmux serve`` runs as a subprocess and starts one
llama-server (SmolLM2, ``--ctx-size 4096 --parallel 32``); LiteLLM's proxy, from its
own venv (``bench/.venv-litellm``), forwards to that very llama-server as an
OpenAI-compatible endpoint. At each concurrency level N, N streaming
``/v1/completions`` requests (greedy, ``max_tokens`` 64, ``ignore_eos``, so each
generates exactly 64 tokens) go out at once on one path, then on the next: direct to
llama-server, through rocmux, through LiteLLM. The order of the paths rotates every
round. Per request: time to first token (first non-empty text chunk, clock started
just before the request). Per round: aggregate tokens/s = tokens of all N streams /
(last stream's end - first request sent), and the CPU time every process used.

Part 2 (swaps). A second ``rocmux serve --max-loaded 1`` offers two models (SmolLM2
and a tiny generated llama) through a ``rocmux.toml``; requests alternate between
them, so each one evicts the loaded model and loads its own. Per swap: request sent
-> first token, when the old llama-server exited (pidfd), llama-server's own load
time (its log clock at the ``listening`` line, from ``--log-file``), rocmux's
``load_seconds`` (spawn -> ready) and the server's ``prompt_ms``. The orchestration
share is the swap latency less llama-server's own load time.

Run: ``python bench/proxy.py`` (about 10 minutes on a 2-core box).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import attrs
import httpx
import numpy as np
from rocmux.config import ServerSettings
from rocmux.default_model import default_model_path
from rocmux.relay import RelayClient
from rocmux.supervisor import free_port

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gguf_factory import TinyLlama, write_tiny_llama  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "proxy.json"
DEFAULT_PLOT = ROOT / "docs" / "img" / "proxy.png"
DEFAULT_LITELLM = ROOT / "bench" / ".venv-litellm" / "bin" / "litellm"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Proxy overhead and swaps (bench/proxy.py)"

# Targets from the issue.
TARGET_TPS_RATIO = 0.99  # rocmux aggregate tok/s vs direct, at 32 streams
TARGET_TTFT_ADDED_MS = 1.0  # added to the median TTFT
TARGET_SWAP_ORCHESTRATION_MS = 50.0
# Published comparison points (added TTFT of other proxies).
PUBLISHED_ADDED_MS = {"LiteLLM proxy (published)": 4.34, "Rust pass-through (published)": 0.45}
# llama-swap proxy/process.go (commit 026ab8d): 250 ms sleep after spawn before the
# first health check, then one check every healthCheckLoopInterval (5 s).
LLAMA_SWAP_FIRST_CHECK_MS = 250.0
LLAMA_SWAP_LOOP_MS = 5000.0

LITELLM_PIN = "litellm[proxy]==1.80.17"
PATHS = ("direct", "rocmux", "litellm", "asgi", "tcp")
FLOORS = ("asgi", "tcp")  # bench/passthrough.py: the bare stacks under rocmux serve
LEVELS = (1, 8, 32)
DEFAULT_ROUNDS = (100, 20, 10)
TOKENS = 64
PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "List three uses for a paperclip:",
    "Once upon a time, in a small village,",
)
SWAP_MODELS = ("smol", "tiny")
ROCMUX = (sys.executable, "-m", "rocmux.cli")  # how `rocmux serve` is started
STREAM_TIMEOUT = 300.0
BOOTSTRAP_RESAMPLES = 2000
LISTENING = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*listening on http")
CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes ---------------------------------------------------------------------------


@attrs.define(eq=False)
class Proc:
    """A server this script started; ``stop`` ends it."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (graceful: rocmux stops its runtimes), then SIGKILL the group."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{self.name} ignored SIGTERM for {timeout:g} s; killing", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)


def start(name: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path) -> Proc:
    """Start ``argv`` in its own process group, tied to this process's life (setpriv)."""
    setpriv = shutil.which("setpriv")
    full = [setpriv, "--pdeathsig", "TERM", "--", *argv] if setpriv else list(argv)
    log = workdir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            full,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=workdir,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def base_env(workdir: Path) -> dict[str, str]:
    """This environment without rocmux/user configuration that could change the servers."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("ROCMUX_CONFIG", "ROCMUX_API_KEYS", "ROCMUX_BACKEND")
        and not k.lower().endswith("_proxy")
    }
    env["XDG_CONFIG_HOME"] = str(workdir / "xdg")
    env["PYTHONUNBUFFERED"] = "1"
    return env


async def wait_http(proc: Proc, url: str, limit: float) -> None:
    """Wait until GET ``url`` answers 200."""
    with anyio.fail_after(limit):
        async with httpx.AsyncClient(trust_env=False, timeout=5.0) as client:
            while True:
                if proc.popen.poll() is not None:
                    raise RuntimeError(
                        f"{proc.name} exited with {proc.popen.returncode}:\n{proc.tail()}"
                    )
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get(url)).status_code == 200:
                        return
                await anyio.sleep(0.05)


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of process ``pid`` (all threads), 0 when it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def pid_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


# -- streaming client ---------------------------------------------------------------------


@attrs.define
class Stream:
    """One streamed completion, timed on the client."""

    sent: float
    first: float
    end: float
    tokens: int  # non-empty text chunks
    completion_tokens: int | None
    prompt_ms: float | None

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.sent) * 1e3


TEXT = re.compile(rb'"text": ?"(?!")')
"""A non-empty ``text`` field (llama-server writes ``"text":"x"``, LiteLLM ``"text": "x"``)."""


def split_url(url: str) -> tuple[str, str]:
    """``http://host:port/v1/x`` -> (``http://host:port``, ``/v1/x``)."""
    scheme, _, rest = url.partition("://")
    host, _, path = rest.partition("/")
    return f"{scheme}://{host}", "/" + path


async def stream_one(client: RelayClient, url: str, body: bytes) -> Stream:
    """POST ``body`` and read its event stream; raises unless it carried text.

    The load generator must cost little per token: with httpx and a JSON parse per
    event it spent ~0.3 ms of CPU per token on the H100 host, enough to delay its own
    later requests while the first streams already flowed. Here events are counted in
    the raw bytes (rocmux's own lean client), and only the events that carry ``usage``,
    ``timings`` or ``error`` are parsed.
    """
    first: float | None = None
    tokens = 0
    completion: int | None = None
    prompt_ms: float | None = None
    base, path = split_url(url)
    sent = time.perf_counter()
    response = await client.post(base, path, body, STREAM_TIMEOUT)
    try:
        if response.status_code != 200:
            content = await response.aread()
            raise RuntimeError(f"{url}: HTTP {response.status_code}: {content[:300]!r}")
        rest = b""
        async for data in response.aiter_raw():
            now = time.perf_counter()
            *events, rest = (rest + data).split(b"\n\n")
            for event in events:
                event = event.strip()
                if not event.startswith(b"data: {"):
                    continue
                if TEXT.search(event):
                    if first is None:
                        first = now
                    tokens += 1
                if b'"usage"' in event or b'"timings"' in event or b'"error"' in event:
                    chunk = json.loads(event[6:])
                    if "error" in chunk:
                        raise RuntimeError(f"{url}: error event {chunk['error']}")
                    usage = chunk.get("usage")
                    if isinstance(usage, dict) and usage.get("completion_tokens"):
                        completion = int(usage["completion_tokens"])
                    timings = chunk.get("timings")
                    if isinstance(timings, dict) and "prompt_ms" in timings:
                        prompt_ms = float(timings["prompt_ms"])
    finally:
        await response.aclose()
    end = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url}: the stream carried no text")
    return Stream(sent, first, end, tokens, completion, prompt_ms)


def request_body(model: str, prompt: str, max_tokens: int) -> bytes:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "seed": 0,
        "ignore_eos": True,
        "stream": True,
    }
    return json.dumps(body).encode()


# -- part 1: proxy overhead ---------------------------------------------------------------


@attrs.define
class Round:
    """N concurrent streams on one path."""

    level: int
    round: int
    path: str
    order: int  # position of this path within its round
    wall_s: float
    ttft_ms: list[float]
    tokens: list[int]
    completion_tokens: list[int | None]
    cpu_s: dict[str, float]  # process -> CPU seconds during the round
    errors: list[str]  # failed streams of earlier attempts at this round (then re-run)
    send_spread_ms: float | None = None  # first request sent -> last request sent
    releases: int | None = None  # rocmux's burst-window releases during the round

    @property
    def agg_tps(self) -> float:
        return sum(self.tokens) / self.wall_s


@attrs.define(eq=False)
class Target:
    """Where one path sends its requests."""

    url: str
    model: str
    client: RelayClient


async def run_round(
    target: Target, level: int, round_: int, path: str, order: int, pids: Mapping[str, int | None]
) -> Round:
    """The round; one whose streams fail is recorded (``errors``) and run again."""
    errors: list[str] = []
    for _attempt in range(3):
        run = await _attempt_round(target, level, round_, path, order, pids)
        if isinstance(run, Round):
            run.errors = errors
            return run
        errors += run
        print(f"{path}, {level} streams, round {round_}: {run[0]}", file=sys.stderr)
    raise RuntimeError(f"{path}: round {round_} at {level} streams failed 3 times: {errors[-1]}")


async def _attempt_round(
    target: Target, level: int, round_: int, path: str, order: int, pids: Mapping[str, int | None]
) -> Round | list[str]:
    bodies = [
        request_body(target.model, PROMPTS[(round_ + i) % len(PROMPTS)], TOKENS)
        for i in range(level)
    ]
    results: list[Stream | None] = [None] * level
    failed: list[str] = []

    async def one(i: int) -> None:
        try:
            results[i] = await stream_one(target.client, target.url, bodies[i])
        except (httpx.HTTPError, RuntimeError, ValueError) as exc:
            failed.append(f"{type(exc).__name__}: {exc}"[:400])

    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    cpu0["bench"] = time.process_time()
    with anyio.fail_after(STREAM_TIMEOUT):
        async with anyio.create_task_group() as tg:
            for i in range(level):
                tg.start_soon(one, i)
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    cpu["bench"] = time.process_time() - cpu0["bench"]
    if failed:
        return failed
    streams = [s for s in results if s is not None]
    wall = max(s.end for s in streams) - min(s.sent for s in streams)
    return Round(
        level=level,
        round=round_,
        path=path,
        order=order,
        wall_s=wall,
        ttft_ms=[s.ttft_ms for s in streams],
        tokens=[s.tokens for s in streams],
        completion_tokens=[s.completion_tokens for s in streams],
        cpu_s=cpu,
        errors=[],
        send_spread_ms=(max(s.sent for s in streams) - min(s.sent for s in streams)) * 1e3,
    )


async def burst_releases(client: httpx.AsyncClient, base: str) -> float:
    """How many times rocmux serve has let held forwards go (``burst_window``)."""
    text = (await client.get(base + "/metrics")).text
    for line in text.splitlines():
        if line.startswith("rocmux_burst_forwards_count "):
            return float(line.split()[1])
    return 0.0


def litellm_config(path: Path, upstream: str) -> None:
    path.write_text(
        "model_list:\n"
        "  - model_name: smol\n"
        "    litellm_params:\n"
        "      model: openai/smol\n"
        f"      api_base: {upstream}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )


def litellm_version(exe: Path) -> str | None:
    python = exe.parent / "python"
    try:
        out = subprocess.run(
            [str(python), "-c", "import importlib.metadata as m; print(m.version('litellm'))"],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


async def start_litellm(
    exe: Path, upstream: str, workdir: Path, env: Mapping[str, str]
) -> tuple[Proc | None, dict[str, Any]]:
    """LiteLLM's proxy in front of ``upstream``, or None and the reason it is missing."""
    info: dict[str, Any] = {"executable": str(exe), "pin": LITELLM_PIN}
    if not exe.exists():
        info["skipped"] = (
            f"{exe} not found; install it with `python3 -m venv bench/.venv-litellm && "
            f"bench/.venv-litellm/bin/pip install '{LITELLM_PIN}'`"
        )
        return None, info
    info["version"] = litellm_version(exe)
    cfg = workdir / "litellm.yaml"
    litellm_config(cfg, upstream)
    port = free_port()
    lenv = {
        **env,
        "LITELLM_TELEMETRY": "False",
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "NO_PROXY": "*",
    }
    lenv.pop("DATABASE_URL", None)
    argv = [str(exe), "--config", str(cfg), "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--num_workers", "1", "--telemetry", "False"]
    info["argv"] = argv
    proc = start("litellm", argv, lenv, workdir)
    try:
        await wait_http(proc, f"http://127.0.0.1:{port}/health/liveliness", 180)
    except (RuntimeError, TimeoutError) as exc:
        info["skipped"] = f"LiteLLM did not start: {exc}\n{proc.tail()}"
        proc.stop()
        return None, info
    info["url"] = f"http://127.0.0.1:{port}"
    return proc, info


async def proxy_part(
    smol: Path,
    levels: Sequence[int],
    rounds: Sequence[int],
    litellm_exe: Path,
    workdir: Path,
    launcher: Sequence[str] = ROCMUX,
    burst_window: float | None = None,
    floors: bool = False,
) -> tuple[list[Round], dict[str, Any]]:
    env = base_env(workdir)
    port = free_port()
    argv = [*launcher, "serve", "--port", str(port), "-m", str(smol)]
    argv += ["--ctx-size", "4096", "--parallel", "32"]
    info: dict[str, Any] = {"rocmux_argv": argv, "burst_window": burst_window}
    if burst_window is not None:
        config = workdir / "rocmux-proxy.toml"
        config.write_text(f"[server]\nburst_window = {burst_window!r}\n")
        env["ROCMUX_CONFIG"] = str(config)
    serve = start("rocmux-serve", argv, env, workdir)
    litellm: Proc | None = None
    passthroughs: dict[str, Proc] = {}
    runtime_pid: int | None = None
    admin_client: httpx.AsyncClient | None = None
    streamers: list[RelayClient] = []
    try:
        base = f"http://127.0.0.1:{port}"
        await wait_http(serve, base + "/health", 60)
        timeout = httpx.Timeout(STREAM_TIMEOUT, connect=10.0)

        def client() -> RelayClient:
            c = RelayClient()
            streamers.append(c)
            return c

        admin_client = httpx.AsyncClient(trust_env=False, timeout=timeout)
        rocmux_target = Target(base + "/v1/completions", "default", client())
        await stream_one(rocmux_target.client, rocmux_target.url, request_body("default", "Hi", 4))
        admin = await admin_client.get(base + "/admin/instances")
        (row,) = admin.json()["instances"]
        upstream, runtime_pid = str(row["url"]), int(row["pid"])
        info["llama_server"] = {
            "url": upstream,
            "pid": runtime_pid,
            "argv": Path(f"/proc/{runtime_pid}/cmdline").read_bytes().split(b"\0")[:-1],
            "load_seconds": row["load_seconds"],
        }
        info["llama_server"]["argv"] = [a.decode() for a in info["llama_server"]["argv"]]
        print(f"rocmux serve at {base}, llama-server at {upstream}", file=sys.stderr)
        targets: dict[str, Target] = {
            "direct": Target(upstream + "/v1/completions", "smol", client()),
            "rocmux": rocmux_target,
        }
        litellm, info["litellm"] = await start_litellm(litellm_exe, upstream, workdir, env)
        if litellm is not None:
            targets["litellm"] = Target(
                info["litellm"]["url"] + "/v1/completions", "smol", client()
            )
            print(f"LiteLLM {info['litellm']['version']} at {info['litellm']['url']}")
        else:
            print(f"LiteLLM skipped: {info['litellm']['skipped']}", file=sys.stderr)
        if floors:
            window = ServerSettings().burst_window if burst_window is None else burst_window
            for kind in FLOORS:
                fport = free_port()
                fargv = [sys.executable, str(ROOT / "bench" / "passthrough.py"), kind]
                fargv += ["--port", str(fport), "--upstream", upstream]
                if kind == "asgi":
                    fargv += ["--burst-window", str(window)]
                passthroughs[kind] = start(kind, fargv, env, workdir)
                fbase = f"http://127.0.0.1:{fport}"
                await wait_http(passthroughs[kind], fbase + "/health", 30)
                targets[kind] = Target(fbase + "/v1/completions", "smol", client())
            info["floors"] = {k: [str(a) for a in v.popen.args] for k, v in passthroughs.items()}
        paths = [p for p in PATHS if p in targets]
        pids = {
            "llama-server": runtime_pid,
            "rocmux": serve.pid,
            "litellm": None if litellm is None else litellm.pid,
            **{k: v.pid for k, v in passthroughs.items()},
        }

        runs: list[Round] = []
        started = time.monotonic()
        for level, n_rounds in zip(levels, rounds, strict=True):
            for r in range(-1, n_rounds):  # round -1 is a warm-up
                k = r % len(paths)
                order = paths[k:] + paths[:k]
                for j, path in enumerate(order):
                    before = await burst_releases(admin_client, base) if path == "rocmux" else 0
                    run = await run_round(targets[path], level, r, path, j, pids)
                    if path == "rocmux":
                        run.releases = round(await burst_releases(admin_client, base) - before)
                    if r >= 0:
                        runs.append(run)
                if r >= 0 and (r + 1) % max(1, n_rounds // 4) == 0:
                    print(
                        f"{level} streams: round {r + 1}/{n_rounds} "
                        f"({time.monotonic() - started:.0f} s)",
                        file=sys.stderr,
                    )
        info["paths"] = paths
        return runs, info
    except BaseException:
        print(f"rocmux serve said, last:\n{serve.tail()}", file=sys.stderr)
        if litellm is not None:
            print(f"LiteLLM said, last:\n{litellm.tail()}", file=sys.stderr)
        raise
    finally:
        with anyio.CancelScope(shield=True):
            if admin_client is not None:
                await admin_client.aclose()
            for r in streamers:
                await r.aclose()
        if litellm is not None:
            litellm.stop()
        for proc in passthroughs.values():
            proc.stop()
        serve.stop()
        if runtime_pid is not None:
            await wait_gone(runtime_pid, "llama-server")


async def wait_gone(pid: int, what: str, limit: float = 10.0) -> None:
    deadline = time.monotonic() + limit
    while not pid_gone(pid):
        if time.monotonic() > deadline:
            print(f"warning: {what} {pid} still running; killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            return
        await anyio.sleep(0.05)


# -- part 2: swaps ------------------------------------------------------------------------


@attrs.define
class Swap:
    """One request that evicted the other model and loaded its own."""

    index: int
    model: str
    swap_ms: float  # request sent -> first token
    stop_ms: float  # request sent -> the old llama-server exited
    own_load_ms: float  # llama-server's log clock at its "listening" line
    rocmux_load_ms: float  # rocmux's load_seconds: backend.load, spawn -> ready
    prompt_ms: float | None  # llama-server's prompt processing for this request
    warm_ttft_ms: float  # the next request to the same (now loaded) model

    @property
    def orchestration_ms(self) -> float:
        """Swap latency less llama-server's own load time (the issue's definition)."""
        return self.swap_ms - self.own_load_ms

    @property
    def rest_ms(self) -> float:
        """Less also the old server's exit and the new server's prompt processing."""
        return self.swap_ms - self.stop_ms - self.own_load_ms - (self.prompt_ms or 0.0)


def listening_ms(log: Path) -> float:
    for line in log.read_text(errors="replace").splitlines():
        match = LISTENING.match(line)
        if match:
            minutes, seconds, millis, micros = (int(x) for x in match.groups())
            return (minutes * 60 + seconds) * 1000 + millis + micros / 1000
    raise RuntimeError(f"no 'listening' line in {log}")


def toml_str(value: object) -> str:
    return json.dumps(str(value))


def swap_config(path: Path, smol: Path, tiny: Path, logs: Mapping[str, Path]) -> None:
    models = {"smol": (smol, 2048), "tiny": (tiny, 512)}
    parts = ["[limits]", "max_loaded = 1", "idle_ttl = 0", ""]
    for name, (model, ctx) in models.items():
        parts += [
            "[[models]]",
            f"name = {toml_str(name)}",
            f"path = {toml_str(model)}",
            "[models.load]",
            f"context_len = {ctx}",
            "parallel = 1",
            f"extra_flags = [{toml_str('--log-file')}, {toml_str(logs[name])}]",
            "",
        ]
    path.write_text("\n".join(parts))


async def wait_exit(pid: int, out: list[float]) -> None:
    """Record when process ``pid`` exits (pidfd readable), on the perf_counter clock."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        out.append(time.perf_counter())
        return
    try:
        await anyio.wait_readable(fd)
        out.append(time.perf_counter())
    finally:
        os.close(fd)


async def swap_part(
    smol: Path, n_swaps: int, workdir: Path, launcher: Sequence[str] = ROCMUX
) -> tuple[list[Swap], dict[str, Any]]:
    tiny = write_tiny_llama(workdir / "tiny.gguf", TinyLlama())
    logs = {name: workdir / f"llama-server-{name}.log" for name in SWAP_MODELS}
    cfg = workdir / "rocmux-swap.toml"
    swap_config(cfg, smol, tiny, logs)
    env = {**base_env(workdir), "ROCMUX_CONFIG": str(cfg)}
    port = free_port()
    argv = [*launcher, "serve", "--port", str(port), "--max-loaded", "1"]
    info: dict[str, Any] = {"rocmux_argv": argv, "config": cfg.read_text()}
    serve = start("rocmux-serve-swap", argv, env, workdir)
    base = f"http://127.0.0.1:{port}"
    seen_pids: set[int] = set()
    swaps: list[Swap] = []
    errors: list[str] = []
    streamer = RelayClient()
    try:
        await wait_http(serve, base + "/health", 60)
        async with httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(STREAM_TIMEOUT, connect=10.0)
        ) as client:
            url = base + "/v1/completions"

            async def instances() -> list[dict[str, Any]]:
                rows = (await client.get(base + "/admin/instances")).json()["instances"]
                seen_pids.update(int(r["pid"]) for r in rows if r.get("pid"))
                return list(rows)

            def body(model: str) -> bytes:
                return request_body(model, PROMPTS[0], 8)

            for _ in range(2):  # warm-up: load each model twice
                for name in SWAP_MODELS:
                    await stream_one(streamer, url, body(name))
            attempts = 0
            while len(swaps) < n_swaps:
                attempts += 1
                if attempts > 2 * n_swaps:
                    raise RuntimeError(f"too many failed swaps: {errors[-3:]}")
                (old,) = await instances()
                # The model that is not loaded: this request must evict the other one.
                name = next(n for n in SWAP_MODELS if n != old["model"])
                logs[name].unlink(missing_ok=True)
                exited: list[float] = []
                result: list[Stream] = []

                async def request(
                    scope: anyio.CancelScope, model: str = name, out: list[Stream] = result
                ) -> None:
                    try:
                        out.append(await stream_one(streamer, url, body(model)))
                    except (httpx.HTTPError, RuntimeError) as exc:
                        errors.append(f"swap to {model}: {type(exc).__name__}: {exc}"[:400])
                        print(errors[-1], file=sys.stderr)
                        scope.cancel()

                with anyio.fail_after(STREAM_TIMEOUT):
                    async with anyio.create_task_group() as tg:
                        tg.start_soon(wait_exit, int(old["pid"]), exited)
                        # the pidfd is open before the request goes
                        await anyio.lowlevel.checkpoint()
                        tg.start_soon(request, tg.cancel_scope)
                if not result or not exited:
                    continue
                (stream,) = result
                (new,) = await instances()
                warm: Stream | None = None
                for _ in range(3):
                    try:
                        warm = await stream_one(streamer, url, body(name))
                        break
                    except (httpx.HTTPError, RuntimeError) as exc:
                        errors.append(f"warm request to {name}: {type(exc).__name__}: {exc}"[:400])
                        print(errors[-1], file=sys.stderr)
                swaps.append(
                    Swap(
                        index=len(swaps),
                        model=name,
                        swap_ms=stream.ttft_ms,
                        stop_ms=(exited[0] - stream.sent) * 1e3,
                        own_load_ms=listening_ms(logs[name]),
                        rocmux_load_ms=float(new["load_seconds"]) * 1e3,
                        prompt_ms=stream.prompt_ms,
                        warm_ttft_ms=float("nan") if warm is None else warm.ttft_ms,
                    )
                )
                sw = swaps[-1]
                print(
                    f"swap {len(swaps)}/{n_swaps} -> {name}: {sw.swap_ms:.1f} ms (old exited "
                    f"{sw.stop_ms:.1f}, own load {sw.own_load_ms:.1f}, prompt "
                    f"{sw.prompt_ms or 0:.1f}; orchestration {sw.orchestration_ms:.1f} ms)",
                    file=sys.stderr,
                )
        info["errors"] = errors
        info["tiny_model"] = attrs.asdict(TinyLlama())
        return swaps, info
    except BaseException:
        print(f"rocmux serve (swaps) said, last:\n{serve.tail()}", file=sys.stderr)
        raise
    finally:
        await streamer.aclose()
        serve.stop()
        for pid in seen_pids:
            await wait_gone(pid, "llama-server")


# -- statistics ---------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


def summarize_proxy(runs: Sequence[Round], paths: Sequence[str]) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    out: dict[str, Any] = {}
    for level in sorted({r.level for r in runs}):
        at = [r for r in runs if r.level == level]
        n_rounds = max(r.round for r in at) + 1
        by = {(r.path, r.round): r for r in at}
        idx = rng.integers(0, n_rounds, size=(BOOTSTRAP_RESAMPLES, n_rounds))

        def ttfts(path: str, rounds: Sequence[int], by: Mapping[Any, Round] = by) -> np.ndarray:
            return np.concatenate([by[(path, int(k))].ttft_ms for k in rounds])

        def tps(path: str, rounds: Sequence[int], by: Mapping[Any, Round] = by) -> np.ndarray:
            return np.array([by[(path, int(k))].agg_tps for k in rounds])

        level_out: dict[str, Any] = {}
        all_rounds = list(range(n_rounds))
        d_ttft_med = float(np.median(ttfts("direct", all_rounds)))
        d_tps_med = float(np.median(tps("direct", all_rounds)))
        for path in paths:
            rs = [by[(path, k)] for k in all_rounds]
            t = ttfts(path, all_rounds)
            agg = tps(path, all_rounds)
            tokens = sum(sum(r.tokens) for r in rs)
            s: dict[str, Any] = {
                "rounds": n_rounds,
                "streams": len(t),
                "failed_streams_rerun": sum(len(r.errors) for r in rs),
                "ttft_ms_median": float(np.median(t)),
                "ttft_ms_p90": pct(list(t), 90),
                "ttft_ms_p99": pct(list(t), 99),
                "agg_tps_median": float(np.median(agg)),
                "agg_tps_mean": float(np.mean(agg)),
                "agg_tps_p10": pct(list(agg), 10),
                "agg_tps_p90": pct(list(agg), 90),
                "tokens_per_stream": sorted({x for r in rs for x in r.tokens}),
                "completion_tokens": sorted(
                    {x for r in rs for x in r.completion_tokens if x is not None}
                ),
                # CPU per 1000 tokens, by process, during this path's rounds
                "cpu_ms_per_1k_tokens": {
                    name: sum(r.cpu_s.get(name, 0.0) for r in rs) / tokens * 1e6
                    for name in rs[0].cpu_s
                },
            }
            spreads = [r.send_spread_ms for r in rs if r.send_spread_ms is not None]
            if spreads:
                s["send_spread_ms_median"] = float(np.median(spreads))
            releases = [r.releases for r in rs if r.releases is not None]
            if releases:
                # One release per round: the whole burst went to the runtime together.
                s["releases_per_round_median"] = float(np.median(releases))
                s["rounds_split"] = sum(n > 1 for n in releases)
            if path != "direct":
                ratios = agg / tps("direct", all_rounds)
                boot_ratio = [
                    float(np.median(tps(path, k)) / np.median(tps("direct", k))) for k in idx
                ]
                boot_added = [
                    float(np.median(ttfts(path, k)) - np.median(ttfts("direct", k))) for k in idx
                ]
                s |= {
                    "tps_ratio": s["agg_tps_median"] / d_tps_med,
                    "tps_ratio_ci95": [pct(boot_ratio, 2.5), pct(boot_ratio, 97.5)],
                    "tps_ratio_paired_median": float(np.median(ratios)),
                    "ttft_added_ms": s["ttft_ms_median"] - d_ttft_med,
                    "ttft_added_ms_ci95": [pct(boot_added, 2.5), pct(boot_added, 97.5)],
                    "ttft_p99_added_ms": s["ttft_ms_p99"]
                    - pct(list(ttfts("direct", all_rounds)), 99),
                }
            level_out[path] = s
        out[str(level)] = level_out
    return out


def summarize_swaps(swaps: Sequence[Swap]) -> dict[str, Any]:
    def stats(values: Sequence[float]) -> dict[str, float]:
        values = [v for v in values if v == v]  # without NaN (a failed warm request)
        return {
            "median": pct(values, 50),
            "p90": pct(values, 90),
            "min": float(min(values)),
            "max": float(max(values)),
        }

    def block(ss: Sequence[Swap]) -> dict[str, Any]:
        llama_swap = [
            llama_swap_ready_ms(s.own_load_ms) - s.own_load_ms for s in ss
        ]  # modelled: readiness floor only
        return {
            "swaps": len(ss),
            "swap_ms": stats([s.swap_ms for s in ss]),
            "stop_ms": stats([s.stop_ms for s in ss]),
            "own_load_ms": stats([s.own_load_ms for s in ss]),
            "rocmux_load_ms": stats([s.rocmux_load_ms for s in ss]),
            "prompt_ms": stats([s.prompt_ms or 0.0 for s in ss]),
            "warm_ttft_ms": stats([s.warm_ttft_ms for s in ss]),
            "orchestration_ms": stats([s.orchestration_ms for s in ss]),
            "swap_less_rocmux_load_ms": stats([s.swap_ms - s.rocmux_load_ms for s in ss]),
            "rest_ms": stats([s.rest_ms for s in ss]),
            "llama_swap_readiness_floor_ms": stats(llama_swap),
        }

    out = {"all": block(swaps)}
    for name in SWAP_MODELS:
        out[name] = block([s for s in swaps if s.model == name])
    return out


def llama_swap_ready_ms(own_load_ms: float) -> float:
    """When llama-swap would first see a server ready ``own_load_ms`` after spawn."""
    if own_load_ms <= LLAMA_SWAP_FIRST_CHECK_MS:
        return LLAMA_SWAP_FIRST_CHECK_MS
    late = own_load_ms - LLAMA_SWAP_FIRST_CHECK_MS
    return LLAMA_SWAP_FIRST_CHECK_MS + np.ceil(late / LLAMA_SWAP_LOOP_MS) * LLAMA_SWAP_LOOP_MS


def verdicts(proxy: Mapping[str, Any], swaps: Mapping[str, Any]) -> dict[str, Any]:
    top = str(max(int(k) for k in proxy))
    m = proxy[top]["rocmux"]
    out: dict[str, Any] = {
        "tps_ratio_at_max_level": {
            "level": int(top),
            "value": m["tps_ratio"],
            "ci95": m["tps_ratio_ci95"],
            "target": f">= {TARGET_TPS_RATIO}",
            "pass": m["tps_ratio"] >= TARGET_TPS_RATIO,
            "resolved": (m["tps_ratio_ci95"][0] >= TARGET_TPS_RATIO)
            == (m["tps_ratio_ci95"][1] >= TARGET_TPS_RATIO),
        },
        "swap_orchestration": {
            "value_median": swaps["all"]["orchestration_ms"]["median"],
            "value_p90": swaps["all"]["orchestration_ms"]["p90"],
            "target": f"< {TARGET_SWAP_ORCHESTRATION_MS} ms",
            "pass": swaps["all"]["orchestration_ms"]["median"] < TARGET_SWAP_ORCHESTRATION_MS,
        },
    }
    for level, paths in proxy.items():
        v = paths["rocmux"]
        out[f"ttft_added_{level}"] = {
            "value": v["ttft_added_ms"],
            "ci95": v["ttft_added_ms_ci95"],
            "target": f"<= {TARGET_TTFT_ADDED_MS} ms",
            "pass": v["ttft_added_ms"] <= TARGET_TTFT_ADDED_MS,
            "resolved": (v["ttft_added_ms_ci95"][0] <= TARGET_TTFT_ADDED_MS)
            == (v["ttft_added_ms_ci95"][1] <= TARGET_TTFT_ADDED_MS),
        }
    return out


# -- machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- output -------------------------------------------------------------------------------

COLORS = {"direct": "#4C72B0", "rocmux": "#DD8452", "litellm": "#55A868"}


def ci_bars(
    ax: Any,
    proxy: Mapping[str, Any],
    paths: Sequence[str],
    levels: Sequence[int],
    key: str,
    label: str,
) -> None:
    """One bar per proxy path and level: ``key``, with its ``key_ci95`` as error bars."""
    width = 0.8 / max(1, len(paths) - 1)
    for j, p in enumerate([p for p in paths if p != "direct"]):
        xs = np.arange(len(levels)) + (j - (len(paths) - 2) / 2) * width
        values = [proxy[str(n)][p][key] for n in levels]
        ci = np.array([proxy[str(n)][p][f"{key}_ci95"] for n in levels])
        yerr = [np.subtract(values, ci[:, 0]), np.subtract(ci[:, 1], values)]
        bars = ax.bar(xs, values, width * 0.9, color=COLORS[p], label=p, yerr=yerr, capsize=4)
        ax.bar_label(bars, [label.format(v) for v in values], padding=2, fontsize=8)


def plot(result: Mapping[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxy = result["summary"]["proxy"]
    paths = result["meta"]["paths"]
    levels = sorted(int(k) for k in proxy)
    fig, axes = plt.subplots(2, 2, figsize=(14, 10.5), constrained_layout=True)

    ax = axes[0, 0]
    for p in paths:
        med = [proxy[str(n)][p]["agg_tps_median"] for n in levels]
        lo = [proxy[str(n)][p]["agg_tps_p10"] for n in levels]
        hi = [proxy[str(n)][p]["agg_tps_p90"] for n in levels]
        err = [np.subtract(med, lo), np.subtract(hi, med)]
        ax.errorbar(levels, med, yerr=err, marker="o", capsize=4, color=COLORS[p], label=p)
    ax.set_xscale("log", base=2)
    ax.set_xticks(levels, [str(n) for n in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate decode rate (tokens/s)")
    ax.set_title("Aggregate tokens/s per round (median, bars p10-p90)")
    ax.grid(alpha=0.3)
    ax.legend()

    ax = axes[0, 1]
    ci_bars(ax, proxy, paths, levels, "tps_ratio", "{:.3f}")
    ax.axhline(1.0, color="black", lw=1)
    ax.axhline(TARGET_TPS_RATIO, color="red", ls="--", label=f"target {TARGET_TPS_RATIO}")
    ax.set_xticks(np.arange(len(levels)), [str(n) for n in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s relative to direct (median ratio)")
    ax.set_title("Throughput vs direct (bars: 95% bootstrap CI over rounds)")
    all_r = [proxy[str(n)][p]["tps_ratio"] for n in levels for p in paths if p != "direct"]
    ax.set_ylim(min(0.9, min(all_r) - 0.03), 1.04)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left")

    ax = axes[1, 0]
    ci_bars(ax, proxy, paths, levels, "ttft_added_ms", "{:+.2f}")
    ax.axhline(0, color="black", lw=1)
    ax.axhline(
        TARGET_TTFT_ADDED_MS, color="red", ls="--", label=f"target +{TARGET_TTFT_ADDED_MS:g} ms"
    )
    for (label, value), style in zip(PUBLISHED_ADDED_MS.items(), (":", "-."), strict=True):
        ax.axhline(value, color="grey", ls=style, label=f"{label}: +{value} ms")
    ax.set_xticks(np.arange(len(levels)), [str(n) for n in levels])
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("added median TTFT vs direct (ms)")
    ax.set_title("Added time to first token (bars: 95% bootstrap CI over rounds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1, 1]
    swaps = result["swaps"]
    names = list(SWAP_MODELS)
    parts = [
        ("old server exits", lambda s: s["stop_ms"], "#8172B2"),
        ("llama-server own load (log clock)", lambda s: s["own_load_ms"], "#64B5CD"),
        ("prompt + first token (server)", lambda s: s["prompt_ms"] or 0.0, "#CCB974"),
        ("rest (rocmux, exec, HTTP)", lambda s: s["rest_ms"], "#C44E52"),
    ]
    bottom = np.zeros(len(names))
    for label, get, color in parts:
        vals = np.array([np.median([get(s) for s in swaps if s["model"] == n]) for n in names])
        ax.bar(names, vals, 0.5, bottom=bottom, color=color, label=label)
        bottom += vals
    totals = [np.median([s["swap_ms"] for s in swaps if s["model"] == n]) for n in names]
    for i, (t, n) in enumerate(zip(totals, names, strict=True)):
        orch = np.median([s["orchestration_ms"] for s in swaps if s["model"] == n])
        ax.text(
            i,
            max(t, bottom[i]) + 5,
            f"swap {t:.0f} ms\norchestration {orch:.0f} ms",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    ax.axhline(
        LLAMA_SWAP_FIRST_CHECK_MS,
        color="grey",
        ls=":",
        label="llama-swap's first health check (250 ms after spawn)",
    )
    ax.set_ylabel("median time from request to first token (ms)")
    ax.set_xlabel("model loaded by the swap (the other one is evicted)")
    ax.set_title("Swap latency under --max-loaded 1, split into its parts (medians)")
    ax.set_ylim(0, max(max(totals), LLAMA_SWAP_FIRST_CHECK_MS) * 1.3)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")

    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def fmt_ci(pair: Sequence[float], f: str) -> str:
    return f"[{pair[0]:{f}}, {pair[1]:{f}}]"


def word(v: Mapping[str, Any]) -> str:
    text = "PASS" if v["pass"] else "FAIL"
    if v.get("resolved") is False:
        text += " (within noise: the 95% CI spans the target)"
    return text


def docs_section(result: Mapping[str, Any], plot_path: Path) -> str:
    meta, summary = result["meta"], result["summary"]
    proxy, swaps, v = summary["proxy"], summary["swaps"], summary["verdicts"]
    paths = meta["paths"]
    levels = sorted(int(k) for k in proxy)
    mach = meta["machine"]
    rows = [
        "| streams | path | TTFT median (ms) | TTFT p99 (ms) | added median TTFT vs direct "
        "| aggregate tok/s (median) | vs direct | proxy CPU per 1k tokens |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n in levels:
        for p in paths:
            s = proxy[str(n)][p]
            added = (
                ""
                if p == "direct"
                else (f"{s['ttft_added_ms']:+.2f} ms {fmt_ci(s['ttft_added_ms_ci95'], '+.2f')}")
            )
            ratio = (
                "1"
                if p == "direct"
                else (f"{s['tps_ratio']:.4f} {fmt_ci(s['tps_ratio_ci95'], '.3f')}")
            )
            cpu = s["cpu_ms_per_1k_tokens"].get(p)
            cpu_text = "" if p == "direct" or cpu is None else f"{cpu:.0f} ms"
            rows.append(
                f"| {n} | {p} | {s['ttft_ms_median']:.2f} | {s['ttft_ms_p99']:.2f} | {added} "
                f"| {s['agg_tps_median']:.1f} | {ratio} | {cpu_text} |"
            )
    table = "\n".join(rows)

    def srow(label: str, key: str) -> str:
        cells = [
            f"{swaps[name][key]['median']:.1f} / {swaps[name][key]['p90']:.1f}"
            for name in ("all", *SWAP_MODELS)
        ]
        return f"| {label} | " + " | ".join(cells) + " |"

    swap_table = "\n".join(
        [
            "| median / p90 (ms) | all swaps | to SmolLM2 | to tiny |",
            "|---|---:|---:|---:|",
            srow("swap latency: request sent → first token", "swap_ms"),
            srow("old llama-server exited (after request sent)", "stop_ms"),
            srow("llama-server's own load (its log clock, `listening`)", "own_load_ms"),
            srow("rocmux `load_seconds` (spawn → ready)", "rocmux_load_ms"),
            srow("llama-server `prompt_ms` of the swap request", "prompt_ms"),
            srow("**orchestration share** = swap - own load", "orchestration_ms"),
            srow("swap - rocmux `load_seconds`", "swap_less_rocmux_load_ms"),
            srow("rest = swap - exit - own load - prompt", "rest_ms"),
            srow("warm TTFT of the next request (same model)", "warm_ttft_ms"),
            srow(
                "llama-swap readiness floor (modelled: 250 ms - own load)",
                "llama_swap_readiness_floor_ms",
            ),
        ]
    )
    lite = meta["litellm"]
    if "skipped" in lite:
        lite_text = f"LiteLLM was not measured: {lite['skipped']}"
    else:
        lite_text = (
            f"LiteLLM {lite['version']} (`{meta['litellm_pin']}`, own venv "
            "`bench/.venv-litellm`, one uvicorn worker, its default logging, "
            "`LITELLM_TELEMETRY=False`, `LITELLM_LOCAL_MODEL_COST_MAP=True`, no database) "
            "forwards to the same llama-server as `openai/smol` with "
            "`api_base: <llama-server>/v1`."
        )
    rl = v["tps_ratio_at_max_level"]
    ttft_lines = "\n".join(
        f"  - {n} stream{'s' if n > 1 else ''}: "
        f"**{proxy[str(n)]['rocmux']['ttft_added_ms']:+.2f} ms** "
        f"{fmt_ci(proxy[str(n)]['rocmux']['ttft_added_ms_ci95'], '+.2f')} → "
        f"**{word(v[f'ttft_added_{n}'])}**"
        + (
            f" (LiteLLM: {proxy[str(n)]['litellm']['ttft_added_ms']:+.2f} ms)"
            if "litellm" in paths
            else ""
        )
        for n in levels
    )
    so = v["swap_orchestration"]
    failed = {p: sum(proxy[str(n)][p]["failed_streams_rerun"] for n in levels) for p in paths}
    failed_text = (
        "Failed streams (their round was discarded and run again): "
        + ", ".join(f"{p} {k}" for p, k in failed.items())
        + ".\n\n"
        if any(failed.values())
        else "No stream failed.\n\n"
    )
    whole = [
        f"{r['rounds'] - r['rounds_split']} of {r['rounds']} at {n} streams"
        for n in levels
        if n > 1 and "rounds_split" in (r := proxy[str(n)]["rocmux"])
    ]
    if whole:
        failed_text += (
            "Bursts that `rocmux serve` sent to llama-server in one release of its burst "
            f"gate (`[server] burst_window`, docs/serve.md): {', '.join(whole)}.\n\n"
        )
    try:
        img = plot_path.resolve().relative_to(DOCS.parent.resolve()).as_posix()
    except ValueError:
        img = "img/proxy.png"
    rounds = ",".join(str(r) for r in meta["rounds"])
    levels_arg = ",".join(str(n) for n in levels)
    return f"""{SECTION}

What `rocmux serve`'s proxy costs over sending the same requests straight to
llama-server, next to LiteLLM's proxy, and how long a model swap takes beyond
llama-server's own start-up. Issue 4's benchmark.

**Proxy overhead.** One `rocmux serve` (subprocess: `rocmux serve -m
{mach["model"]} --ctx-size 4096 --parallel 32`) starts one llama-server; every path
talks to that same llama-server: *direct* (its URL from `GET /admin/instances`),
*rocmux* (through `rocmux serve`), *litellm* (through LiteLLM's proxy).
{lite_text}
Each request is a streaming `/v1/completions` with a short prompt, temperature 0,
`max_tokens` {meta["tokens"]}, `ignore_eos` (so exactly {meta["tokens"]} tokens each). At
each level N, N streams start at once on one path, then on the next; the order of
the paths rotates every round; one warm-up round per level. TTFT is timed per
request from just before it is sent to its first non-empty text chunk; aggregate
tokens/s per round = all streams' tokens / (last stream's end - first request
sent). Rounds per level: {rounds} for {levels_arg} streams. CIs are 95% percentile
bootstraps over rounds. The client runs on the same machine, one event loop, on
rocmux's own lean HTTP/1.1 client (`rocmux.relay`), counting events in the raw bytes:
with httpx and a JSON parse per event it spent ~0.3 ms of CPU per token, enough on a
GPU host to delay its own later requests of a burst while the first streams flowed
(direct TTFT at 8 streams on the H100: 14.2 ms with that client, 5.9 ms with this one).

**Swaps.** A second `rocmux serve --max-loaded 1` offers two models through a
`rocmux.toml` (`ROCMUX_CONFIG`): `smol` (SmolLM2-135M, `context_len` 2048,
`parallel` 1) and `tiny` (a 2-layer random llama from `tests/gguf_factory.py`,
`context_len` 512). Requests alternate, so each evicts the loaded model and loads
its own ({swaps["all"]["swaps"]} swaps after two warm-up loads of each). Swap latency =
request sent → first token. llama-server's own load time is read from its log clock
(`--log-file`; the `listening on` line, time since its logger started, i.e. after
exec and shared-library loading, which therefore count against rocmux). The old
server's exit is timed with a pidfd.

Reproduce:

```
python3 -m venv bench/.venv-litellm && bench/.venv-litellm/bin/pip install '{meta["litellm_pin"]}'
python bench/proxy.py --levels {levels_arg} --rounds {rounds} --swaps {meta["swaps"]}
```

Machine: {mach["nproc"]} CPU cores ({mach["cpu_model"]}), {mach["platform"]},
Python {mach["python"]}, llama-server CPU build; measured {mach["date"]}.
Raw rounds and swaps: `bench/results/proxy.json`.

{table}

{failed_text}"proxy CPU per 1k tokens" is the CPU time of the `rocmux serve` (or LiteLLM) process
during that path's rounds per 1000 streamed tokens; on this CPU-only box it is taken
from the cores llama-server decodes on.

Targets (issue 4):

- rocmux aggregate tokens/s ≥ {TARGET_TPS_RATIO} x direct at {rl["level"]} streams:
  **{rl["value"]:.4f}** {fmt_ci(rl["ci95"], ".4f")} → **{word(rl)}**.
- ≤ {TARGET_TTFT_ADDED_MS:g} ms added to the median TTFT (median rocmux - median direct):
{ttft_lines}
  Published comparison points: LiteLLM proxy +4.34 ms, a Rust pass-through proxy +0.45 ms.
- Swap orchestration share (swap latency - llama-server's own load time)
  < {TARGET_SWAP_ORCHESTRATION_MS:g} ms:
  median **{so["value_median"]:.1f} ms**, p90 {so["value_p90"]:.1f} ms → **{word(so)}**.

{swap_table}

For comparison, llama-swap (`proxy/process.go`) sleeps {LLAMA_SWAP_FIRST_CHECK_MS:g} ms after
spawning a server before its first health check and then checks every
{LLAMA_SWAP_LOOP_MS / 1000:g} s: with these load times its readiness alone would add the
"llama-swap readiness floor" row (a model of its code, not a measurement), and a
server that needs more than 250 ms would wait for the next check 5 s later.

![Proxy overhead: aggregate tokens/s and added TTFT per path; swap latency parts]({img})
"""


def update_docs(section: str) -> None:
    """Replace this script's section of docs/benchmarks.md (or append it), keeping the rest,
    its hand-written ``###`` subsections (the H100 runs) included."""
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    lines = text.splitlines(keepends=True)
    start_i = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start_i is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start_i + 1, len(lines)) if lines[i].startswith(("## ", "### "))),
            len(lines),
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start_i]) + section + ("\n" + tail if tail else "")
    DOCS.write_text(new)


def print_summary(summary: Mapping[str, Any], paths: Sequence[str]) -> None:
    for level, by_path in summary["proxy"].items():
        for p in paths:
            s = by_path[p]
            extra = (
                ""
                if p == "direct"
                else f" | added TTFT {s['ttft_added_ms']:+.2f} ms, tok/s x{s['tps_ratio']:.4f}"
            )
            print(
                f"{level:>3} streams {p:>7}: TTFT median {s['ttft_ms_median']:.2f} ms p99 "
                f"{s['ttft_ms_p99']:.2f} ms | {s['agg_tps_median']:.1f} tok/s{extra}"
            )
    sw = summary["swaps"]["all"]
    print(
        f"swaps: {sw['swap_ms']['median']:.1f} ms median; own load "
        f"{sw['own_load_ms']['median']:.1f} ms; orchestration "
        f"{sw['orchestration_ms']['median']:.1f} / p90 {sw['orchestration_ms']['p90']:.1f} ms"
    )
    for name, v in summary["verdicts"].items():
        print(f"{name}: {word(v)}")


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="e.g. 1,8,32")
    parser.add_argument(
        "--rounds",
        default=",".join(map(str, DEFAULT_ROUNDS)),
        help="rounds per level (one number for all, or one per level)",
    )
    parser.add_argument("--swaps", type=int, default=30, help="swaps (alternating models)")
    parser.add_argument("--model", type=Path, default=None, help="GGUF (default: SmolLM2)")
    parser.add_argument("--litellm", type=Path, default=DEFAULT_LITELLM, help="litellm CLI")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT)
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--render-only", action="store_true", help="re-draw plot and docs from --json; no runs"
    )
    parser.add_argument(
        "--burst-window",
        type=float,
        default=None,
        help="rocmux serve's [server] burst_window, seconds (default: its default)",
    )
    parser.add_argument(
        "--floors",
        action="store_true",
        help="also run bench/passthrough.py's bare tcp and asgi proxies as paths",
    )
    parser.add_argument(
        "--only",
        choices=("proxy", "swaps"),
        help="run one part; the other part's results are kept from --json",
    )
    args = parser.parse_args(argv)
    if args.render_only:
        result = json.loads(args.json.read_text())
        render(result, args.plot, args.no_docs)
        return 0
    levels = parse_ints(args.levels)
    rounds = parse_ints(args.rounds)
    if len(rounds) == 1:
        rounds *= len(levels)
    if len(rounds) != len(levels) or min(rounds) < 2 or args.swaps < 2:
        parser.error("--rounds needs one value (>= 2) or one per level; --swaps >= 2")
    smol = (args.model or default_model_path()).resolve()
    # SIGTERM unwinds like Ctrl-C, so that the finally blocks stop every server.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    # Each part is saved as soon as it ends; --only re-runs one part and keeps the other.
    previous: dict[str, Any] = {}
    if args.only and args.json.exists():
        previous = json.loads(args.json.read_text())
    runs = [
        Round(**{k: v for k, v in r.items() if k != "agg_tps"}) for r in previous.get("runs", [])
    ]
    swaps = [
        Swap(**{k: v for k, v in w.items() if k in SWAP_FIELDS}) for w in previous.get("swaps", [])
    ]
    meta: dict[str, Any] = dict(previous.get("meta", {}))
    meta |= {
        "tokens": TOKENS,
        "prompts": list(PROMPTS),
        "litellm_pin": LITELLM_PIN,
        "targets": {
            "tps_ratio_min_at_32": TARGET_TPS_RATIO,
            "ttft_added_ms_max": TARGET_TTFT_ADDED_MS,
            "swap_orchestration_ms_max": TARGET_SWAP_ORCHESTRATION_MS,
        },
        "published_added_ttft_ms": PUBLISHED_ADDED_MS,
    }
    with tempfile.TemporaryDirectory(prefix="rocmux-bench-proxy-") as tmp:
        workdir = Path(tmp)
        (workdir / "xdg").mkdir()
        if args.only != "swaps":
            runs, proxy_info = anyio.run(
                functools.partial(
                    proxy_part,
                    smol,
                    levels,
                    rounds,
                    args.litellm,
                    workdir,
                    burst_window=args.burst_window,
                    floors=args.floors,
                )
            )
            meta |= {
                "levels": levels,
                "rounds": rounds,
                "paths": proxy_info["paths"],
                "machine": {**machine(), "model": smol.name},
                "litellm": proxy_info.get("litellm", {}),
                "proxy_servers": {k: v for k, v in proxy_info.items() if k != "litellm"},
            }
            save(args.json, meta, runs, swaps)
        if args.only != "proxy":
            swaps, swap_info = anyio.run(swap_part, smol, args.swaps, workdir)
            meta |= {"swaps": args.swaps, "swap_servers": swap_info, "swap_machine": machine()}
            save(args.json, meta, runs, swaps)
    if not runs or not swaps:
        print("one part has no results yet; run the other with --only", file=sys.stderr)
        return 1
    render(save(args.json, meta, runs, swaps), args.plot, args.no_docs)
    return 0


SWAP_FIELDS = {a.name for a in attrs.fields(Swap)}


def save(path: Path, meta: dict[str, Any], runs: list[Round], swaps: list[Swap]) -> dict[str, Any]:
    """Write what there is so far; with both parts, the summary and verdicts too."""
    result: dict[str, Any] = {"meta": meta, "summary": {}}
    if runs:
        result["summary"]["proxy"] = summarize_proxy(runs, meta["paths"])
    if swaps:
        result["summary"]["swaps"] = summarize_swaps(swaps)
    if runs and swaps:
        result["summary"]["verdicts"] = verdicts(
            result["summary"]["proxy"], result["summary"]["swaps"]
        )
    result["runs"] = [{**attrs.asdict(r), "agg_tps": r.agg_tps} for r in runs]
    result["swaps"] = [
        {**attrs.asdict(s), "orchestration_ms": s.orchestration_ms, "rest_ms": s.rest_ms}
        for s in swaps
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {path}", file=sys.stderr)
    return result


def render(result: Mapping[str, Any], plot_path: Path, no_docs: bool) -> None:
    meta = result["meta"]
    title = (
        f"rocmux serve vs direct llama-server vs LiteLLM — {meta['machine']['model']}, "
        f"{meta['tokens']} tokens per stream, {meta['machine']['nproc']} CPU cores"
    )
    plot(result, plot_path, title)
    if not no_docs:
        update_docs(docs_section(result, plot_path))
    print_summary(result["summary"], meta["paths"])
    print(f"wrote {plot_path}" + ("" if no_docs else f", {DOCS}"))


if __name__ == "__main__":
    raise SystemExit(main())
