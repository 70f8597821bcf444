"""Three models under a memory budget that holds two, under concurrent load.

``rocmux serve`` runs as a subprocess with three generated llama GGUFs and a
``memory_budget`` of ``--budget-factor`` times the largest estimate (2.5: two fit,
three do not). ``--clients`` clients send requests for ``--duration`` seconds; the
"hot" pair of models moves on every ``--phase`` seconds, (0, 1), (1, 2), (2, 0), ...,
so that each phase change forces an eviction while requests are in flight.

Every ``--interval`` seconds it samples the memory the models really use, by the
device monitor: on a GPU the device's used memory through ``rocmux.devices`` (NVML
for NVIDIA, sysfs for AMD; ``nvidia-smi`` if NVML is missing), less what was used
before the server started; on the CPU the resident memory (VmRSS) of the runtime
processes that ``/admin/instances`` lists. It checks:

* every request is answered 200 with all its tokens, and no load fails;
* no instance is evicted with a request in flight or waiting (``/admin/events``
  records ``in_flight`` and ``waiting`` at each eviction);
* the measured memory, and the pool's estimates, never pass the budget;
* the budget did force evictions.

Shapes: ``tiny`` (CPU; 512 wide, 8 layers, f32, about 128 MiB a file, a different
seed each) and ``1b`` (Llama-3.2-1B's shape in f16, about 2.4 GiB, written once to
``--models-dir`` and hard-linked twice: three paths, three instances). Each model is
loaded with a fixed context (4096) and slots (2 for tiny, 4 for 1b; 1b offloads every
layer).

    python bench/budget.py                       # CPU, writes budget-cpu.json/png
    ROCMUX_LLAMA_SERVER=/path/to/cuda/llama-server python bench/budget.py --shape 1b
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from gguf_factory import TinyLlama, write_tiny_llama  # noqa: E402
from rocmux.devices import GpuInfo, detect_gpus, memory_now  # noqa: E402
from rocmux.inventory import ModelInfo  # noqa: E402
from rocmux.memory import GPU_PROCESS_OVERHEAD, fit  # noqa: E402
from rocmux.supervisor import free_port  # noqa: E402
from rocmux.types import LoadConfig  # noqa: E402

MiB = 1 << 20
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "spec": {
            "n_embd": 384,
            "n_layer": 8,
            "n_head": 6,
            "n_head_kv": 2,
            "n_ff": 1024,
            "n_vocab": 8000,
            "context_length": 8192,
            "dtype": "f32",
        },
        # One thread each: on a small shared CPU, spinning ggml threads of several
        # runtimes starve each other. No prompt cache in RAM: llama-server keeps up to
        # 8 GiB of it per instance by default (--cache-ram), which no estimate counts.
        "load": {
            "context_len": 4096,
            "parallel": 2,
            "threads": 1,
            "extra_flags": ["--cache-ram", "0"],
        },
        "gpu": False,
    },
    "1b": {
        # Llama-3.2-1B (bench/gpu/gpu_checks.py).
        "spec": {
            "n_embd": 2048,
            "n_layer": 16,
            "n_head": 32,
            "n_head_kv": 8,
            "n_ff": 8192,
            "n_vocab": 128256,
            "context_length": 8192,
            "dtype": "f16",
        },
        "load": {"context_len": 4096, "parallel": 4, "gpu_layers": 99},
        "gpu": True,
    },
}
WORDS = ("the", "model", "test", "token", "server", "chat", "user", "answer", "hello", "world")


# -- models and their estimates ------------------------------------------------------------


def write_models(shape: str, where: Path) -> list[Path]:
    """Three GGUF files of ``shape`` in ``where`` (kept between runs)."""
    where.mkdir(parents=True, exist_ok=True)
    spec = SHAPES[shape]["spec"]
    tag = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:8]
    paths = [where / f"{shape}-{tag}-{i}.gguf" for i in range(3)]
    if shape == "tiny":
        for i, path in enumerate(paths):
            if not path.exists():
                write_tiny_llama(path, TinyLlama(**spec, seed=i, name=f"budget-{shape}-{i}"))
        return paths
    if not paths[0].exists():
        started = time.perf_counter()
        tmp = paths[0].with_suffix(".part")
        write_tiny_llama(tmp, TinyLlama(**spec, name="llama-3.2-1b-shape"))
        tmp.rename(paths[0])
        print(f"wrote {paths[0]} in {time.perf_counter() - started:.0f} s", flush=True)
    for path in paths[1:]:
        if not path.exists():
            os.link(paths[0], path)  # another path: another instance; VRAM is per copy
    return paths


def estimate(path: Path, load: LoadConfig, gpu: bool) -> int:
    """The pool's estimate: device bytes on a GPU, host bytes on the CPU."""
    info = ModelInfo.from_gguf(path)
    room: int | GpuInfo = 1 << 40
    if not gpu:
        room = GpuInfo(index=None, vendor="cpu", name="budget", memory_free=1 << 40)
    result = fit(info, room, margin=0, requested=load)
    if gpu:
        return result.estimate.device_total + GPU_PROCESS_OVERHEAD
    return result.estimate.host_total


def config_text(paths: list[Path], load: dict[str, Any], budget: int, queue: float) -> str:
    lines = [
        "[limits]",
        f"memory_budget = {budget}",
        "max_loaded = 3",
        "idle_ttl = 0",
        f"queue_timeout = {queue:g}",
        "",
    ]
    for i, path in enumerate(paths):
        lines += ["[[models]]", f'name = "m{i}"', f'path = "{path}"', "[models.load]"]
        lines += [f"{k} = {json.dumps(v)}" for k, v in load.items()]
        lines.append("")
    return "\n".join(lines)


# -- the memory monitor ----------------------------------------------------------------------


def gpu_monitor() -> tuple[str, Callable[[], int | None]] | None:
    """(what, used bytes now) for the first GPU, or None without one."""
    gpus = detect_gpus()
    if gpus:
        gpu = gpus[0]
        return f"{gpu.name} ({gpu.device_id}) through rocmux.devices", lambda: memory_now(gpu)[0]
    if shutil.which("nvidia-smi"):

        def smi() -> int | None:
            query = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"]
            out = subprocess.run(
                [*query, "-i", "0"], capture_output=True, text=True, timeout=5, check=False
            ).stdout
            return int(out.split()[0]) * MiB if out.strip() else None

        return "GPU 0 through nvidia-smi (no NVML in this Python)", smi
    return None


def rss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


# -- the run ---------------------------------------------------------------------------------


@contextlib.contextmanager
def serve(config: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "ROCMUX_CONFIG": str(config)}
    log = open(config.with_suffix(".log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "rocmux.cli", "serve", "--port", str(port)],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shape = SHAPES[args.shape]
    load = LoadConfig(**shape["load"])
    models_dir = Path(args.models_dir or Path(tempfile.gettempdir()) / "rocmux-budget")
    paths = await anyio.to_thread.run_sync(write_models, args.shape, models_dir)
    needs = [estimate(p, load, shape["gpu"]) for p in paths]
    budget = int(args.budget_factor * max(needs))
    assert 2 * max(needs) <= budget < sum(needs), "the budget must hold two models, not three"

    monitor = gpu_monitor() if shape["gpu"] else None
    if shape["gpu"] and monitor is None:
        raise SystemExit("--shape 1b needs a GPU that rocmux.devices or nvidia-smi can see")
    what = monitor[0] if monitor else "VmRSS of the runtime processes (/proc/PID/status)"
    baseline = monitor[1]() if monitor else 0
    print(
        f"{args.shape}: estimates {[round(n / MiB) for n in needs]} MiB, budget "
        f"{budget / MiB:.0f} MiB; monitor: {what}",
        flush=True,
    )

    work = Path(tempfile.mkdtemp(prefix="rocmux-budget-"))
    config = work / "rocmux.toml"
    config.write_text(config_text(paths, shape["load"], budget, args.queue_timeout))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    samples: list[dict[str, Any]] = []
    requests: list[dict[str, Any]] = []
    events: dict[tuple[Any, ...], dict[str, Any]] = {}

    with serve(config, port) as proc:
        async with httpx.AsyncClient(base_url=url, timeout=args.queue_timeout + 120) as client:
            with anyio.fail_after(60):
                while True:
                    assert proc.poll() is None, (work / "rocmux.log").read_text()[-2000:]
                    with contextlib.suppress(httpx.TransportError):
                        if (await client.get("/health")).status_code == 200:
                            break
                    await anyio.sleep(0.1)
            t0 = time.monotonic()
            stop = t0 + args.duration

            async def pull_events() -> None:
                for event in (await client.get("/admin/events")).json()["events"]:
                    events[(event["t"], event["event"], event.get("key"))] = event

            async def sample() -> None:
                next_at = time.monotonic()
                while True:
                    rows = (await client.get("/admin/instances")).json()["instances"]
                    used = (monitor[1]() or 0) - baseline if monitor else None
                    if used is None:
                        used = sum(rss(r["pid"]) for r in rows if r["pid"])
                    samples.append(
                        {
                            "t": round(time.monotonic() - t0, 3),
                            "measured": used,
                            "reserved": sum(r["memory_estimate"] or 0 for r in rows),
                            "instances": [
                                {k: r[k] for k in ("model", "state", "in_flight", "waiting")}
                                for r in rows
                            ],
                        }
                    )
                    if len(samples) % 10 == 0:
                        await pull_events()
                    next_at += args.interval
                    await anyio.sleep(max(0.0, next_at - time.monotonic()))

            async def user(i: int) -> None:
                rng = random.Random(i)
                stream = i % 2 == 1
                while (now := time.monotonic()) < stop:
                    phase = int((now - t0) / args.phase)
                    model = f"m{rng.choice((phase % 3, (phase + 1) % 3))}"
                    body = {
                        "model": model,
                        "prompt": " ".join(rng.choices(WORDS, k=8)),
                        "max_tokens": args.max_tokens,
                        "temperature": 0,
                        "ignore_eos": True,
                        "stream": stream,
                    }
                    record: dict[str, Any] = {
                        "client": i,
                        "model": model,
                        "stream": stream,
                        "start": round(now - t0, 3),
                    }
                    try:
                        tokens, status, error = await _request(client, body)
                    except httpx.HTTPError as exc:
                        tokens, status, error = 0, None, repr(exc)
                    record.update(
                        end=round(time.monotonic() - t0, 3),
                        status=status,
                        tokens=tokens,
                        ok=status == 200 and tokens == args.max_tokens and error is None,
                        error=error,
                    )
                    requests.append(record)

            async with anyio.create_task_group() as tg:
                tg.start_soon(sample)
                async with anyio.create_task_group() as users:
                    for i in range(args.clients):
                        users.start_soon(user, i)
                tg.cancel_scope.cancel()
            await pull_events()
            metrics = (await client.get("/metrics")).text
    log_tail = (work / "rocmux.log").read_text(errors="replace")[-3000:]
    shutil.rmtree(work, ignore_errors=True)

    ordered = sorted(events.values(), key=lambda e: e["t"])
    return summarize(args, needs, budget, what, baseline, samples, requests, ordered, metrics) | {
        "server_log_tail": log_tail
    }


async def _request(client: httpx.AsyncClient, body: dict[str, Any]) -> tuple[int, int, str | None]:
    """(completion tokens, status, error) of one request."""
    if not body["stream"]:
        r = await client.post("/v1/completions", json=body)
        if r.status_code != 200:
            return 0, r.status_code, r.text[:300]
        return r.json()["usage"]["completion_tokens"], 200, None
    tokens, error = 0, None
    async with client.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return 0, r.status_code, (await r.aread()).decode()[:300]
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                data = json.loads(line[6:])
                if "error" in data:
                    error = data["error"]["message"][:300]
                elif data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
    return tokens, 200, error


def _metric(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def summarize(
    args: argparse.Namespace,
    needs: list[int],
    budget: int,
    monitor: str,
    baseline: int,
    samples: list[dict[str, Any]],
    requests: list[dict[str, Any]],
    events: list[dict[str, Any]],
    metrics: str,
) -> dict[str, Any]:
    evictions = [e for e in events if e["event"] == "evict"]
    busy = [e for e in evictions if e.get("in_flight") or e.get("waiting")]
    failed_loads = [e for e in events if e["event"] == "failed"]
    bad = [r for r in requests if not r["ok"]]
    peak = max((s["measured"] for s in samples), default=0)
    peak_reserved = max((s["reserved"] for s in samples), default=0)
    most = max((len(s["instances"]) for s in samples), default=0)
    returned = [e for e in events if e["event"] == "returned"]
    checks = {
        "every request answered in full": not bad,
        "no load failed": not failed_loads,
        "no busy instance evicted": not busy,
        "measured memory within the budget": peak <= budget,
        "estimates within the budget": peak_reserved <= budget,
        "the budget forced evictions": len(evictions) > 0,
    }
    latencies = sorted(r["end"] - r["start"] for r in requests if r["ok"])
    return {
        "schema": "rocmux-bench-budget/1",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "shape": SHAPES[args.shape],
        "monitor": monitor,
        "monitor_baseline_bytes": baseline,
        "estimates_bytes": needs,
        "budget_bytes": budget,
        "summary": {
            "requests": len(requests),
            "requests_ok": len(requests) - len(bad),
            "requests_failed": len(bad),
            "failures": bad[:10],
            "request_seconds_p50": latencies[len(latencies) // 2] if latencies else None,
            "request_seconds_max": latencies[-1] if latencies else None,
            "loads": int(_metric(metrics, "rocmux_model_loads_total")),
            "evictions": len(evictions),
            "evictions_by_reason": {
                reason: sum(e["reason"] == reason for e in evictions)
                for reason in sorted({e["reason"] for e in evictions})
            },
            "evictions_metric": int(_metric(metrics, "rocmux_model_evictions_total")),
            "busy_evictions": busy,
            "failed_loads": failed_loads,
            "memory_return_seconds_max": max((e["seconds"] for e in returned), default=None),
            "pool_measured_memory": any(e.get("free_before") is not None for e in returned),
            "peak_measured_bytes": peak,
            "peak_reserved_bytes": peak_reserved,
            "peak_measured_fraction_of_budget": round(peak / budget, 4),
            "most_instances_at_once": most,
        },
        "checks": checks,
        "passed": all(checks.values()),
        "samples": samples,
        "requests": requests,
        "events": events,
    }


# -- the plot --------------------------------------------------------------------------------


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = result["samples"]
    t = [s["t"] for s in samples]
    budget = result["budget_bytes"] / MiB
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1.4]}
    )
    top.plot(
        t,
        [s["measured"] / MiB for s in samples],
        color="#1f77b4",
        lw=1.4,
        label=f"measured ({result['monitor']})",
    )
    top.step(
        t,
        [s["reserved"] / MiB for s in samples],
        where="post",
        color="#ff7f0e",
        lw=1.2,
        ls="-",
        alpha=0.8,
        label="pool's estimates of loaded instances",
    )
    top.axhline(budget, color="#d62728", ls="--", lw=1.5, label=f"memory_budget {budget:.0f} MiB")
    top.set_ylabel("MiB")
    top.set_ylim(0, budget * 1.25)
    s = result["summary"]
    settings = result["settings"]
    top.set_title(
        f"bench/budget.py --shape {settings['shape']}: 3 models, a budget for 2, "
        f"{settings['clients']} clients · {s['requests_ok']}/{s['requests']} requests ok, "
        f"{s['evictions']} evictions, {len(s['busy_evictions'])} of them busy, peak "
        f"{s['peak_measured_fraction_of_budget']:.0%} of the budget",
        fontsize=10,
    )
    top.legend(loc="lower right", fontsize=8)
    top.grid(alpha=0.3)

    colors = ["#2ca02c", "#9467bd", "#8c564b"]
    for m in range(3):
        name = f"m{m}"
        spans, begin = [], None
        for sample in samples:
            loaded = any(i["model"] == name for i in sample["instances"])
            if loaded and begin is None:
                begin = sample["t"]
            elif not loaded and begin is not None:
                spans.append((begin, sample["t"] - begin))
                begin = None
        if begin is not None and samples:
            spans.append((begin, samples[-1]["t"] - begin))
        bottom.broken_barh(spans, (m - 0.35, 0.7), color=colors[m], alpha=0.55)
        done = [r["end"] for r in result["requests"] if r["model"] == name and r["ok"]]
        bottom.plot(done, [m] * len(done), "|", color="black", ms=6, alpha=0.5)
    bottom.set_yticks(range(3), [f"m{m}" for m in range(3)])
    bottom.set_ylim(-0.6, 2.6)
    bottom.set_xlabel("seconds (bars: instance loaded; ticks: requests answered)")
    bottom.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _shown(value: object) -> object:
    """Paths in the repository relative to it, for results that read the same anywhere."""
    if isinstance(value, Path):
        return str(value.relative_to(ROOT)) if value.is_relative_to(ROOT) else str(value)
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--phase", type=float, default=6.0, help="seconds per hot pair")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--budget-factor", type=float, default=2.5)
    parser.add_argument("--interval", type=float, default=0.1, help="sampling period, s")
    parser.add_argument("--queue-timeout", type=float, default=300.0)
    parser.add_argument("--models-dir", help="where the GGUFs are written (kept)")
    parser.add_argument("--json", type=Path, help="default bench/results/budget-{cpu,gpu}.json")
    parser.add_argument("--plot", type=Path, help="default docs/img/budget-{cpu,gpu}.png")
    parser.add_argument("--render-only", action="store_true", help="redraw --plot from --json")
    args = parser.parse_args()
    kind = "gpu" if SHAPES[args.shape]["gpu"] else "cpu"
    args.json = args.json or ROOT / "bench" / "results" / f"budget-{kind}.json"
    args.plot = args.plot or ROOT / "docs" / "img" / f"budget-{kind}.png"
    if args.render_only:
        plot(json.loads(args.json.read_text()), args.plot)
        return
    result = anyio.run(run, args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result["settings"] = {k: _shown(v) for k, v in vars(args).items()}
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    try:
        plot(result, args.plot)
    except ImportError as exc:  # a bare GPU machine: draw it elsewhere with --render-only
        print(f"no plot ({exc}); run with --render-only where matplotlib is installed")
    s = result["summary"]
    print(json.dumps({k: v for k, v in s.items() if k not in ("failures",)}, indent=1))
    for check, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {check}")
    print(f"wrote {args.json} and {args.plot}")
    sys.exit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
