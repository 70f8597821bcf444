"""hip_direct beside llama-server on the CPU, same model: batch-1 decode and aggregate
decode throughput at 16 concurrent requests.

    python bench/direct.py                              # default model, both numerics
    python bench/direct.py --modes fast --tokens 32 --json /tmp/direct.json

Both runtimes load the default model (SmolLM2-135M-Instruct Q4_1) with the same thread
count and generate exactly ``--tokens`` greedy tokens per request, end-of-generation
tokens ignored (llama-server's ``ignore_eos``; hip_direct's tokenizer is told no token
ends generation). llama-server runs as rocmux's llamacpp_hip backend starts it (CPU
build, flash attention "auto"), one slot per concurrent request; requests are plain
``/completion`` calls. hip_direct runs in this process through its engine, once per
numerics mode (``fast``; ``llamacpp``, which reproduces llama.cpp's CPU rounding).

Batch 1: each runtime's own decode rate (generated tokens after the first over the
time from the first to the last), median of three requests. Concurrent: all requests
sent at once; aggregate = tokens generated over the wall time from the first request
to the last answer. The machine's load average is recorded before and after each
measurement: figures taken beside other work are marked as such, not trusted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "Water boils at",
    "The quick brown fox",
    "In 1492, Christopher Columbus",
    "The best way to learn a new language is",
]
RESULTS = Path(__file__).resolve().parent / "results" / "direct.json"


def log(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def load() -> float:
    """The 1-minute load average."""
    return round(os.getloadavg()[0], 2)


async def llama_server(
    model_path: Path, threads: int, concurrency: int, tokens: int
) -> dict[str, Any]:
    from rocmux.types import LoadConfig
    from rocmux_llamacpp_hip.backend import LlamaCppBackend

    per_slot = 256
    config = LoadConfig(
        context_len=per_slot * concurrency, parallel=concurrency, threads=threads, gpu_layers=0
    )
    served = await LlamaCppBackend().load(model_path, config)
    res: dict[str, Any] = {}
    async with (
        served,
        httpx.AsyncClient(base_url=served.url, timeout=600, trust_env=False) as client,
    ):

        async def one(prompt: str) -> dict[str, Any]:
            body = {
                "prompt": prompt,
                "n_predict": tokens,
                "temperature": 0,
                "ignore_eos": True,
                "cache_prompt": False,
            }
            response = await client.post("/completion", json=body)
            response.raise_for_status()
            return response.json()["timings"]

        await one(PROMPTS[0])  # warm-up
        before = load()
        rates = [(await one(PROMPTS[i]))["predicted_per_second"] for i in range(3)]
        res["decode_b1_tps"] = statistics.median(rates)
        res["decode_b1_runs"] = [round(r, 2) for r in rates]
        res["decode_b1_load"] = [before, load()]
        before = load()
        t0 = time.perf_counter()
        timings = await asyncio.gather(
            *(one(PROMPTS[i % len(PROMPTS)]) for i in range(concurrency))
        )
        wall = time.perf_counter() - t0
        generated = sum(int(t["predicted_n"]) for t in timings)
        res[f"concurrent_{concurrency}"] = {
            "generated": generated,
            "wall_s": round(wall, 3),
            "aggregate_tps": generated / wall,
            "per_request_decode_tps": statistics.median(t["predicted_per_second"] for t in timings),
            "load": [before, load()],
        }
    return res


async def hip_direct(
    model_path: Path, numerics: str, threads: int, concurrency: int, tokens: int
) -> dict[str, Any]:
    from rocmux.types import GenerateConfig, LoadConfig
    from rocmux_hip_direct.plugin import HipDirectBackend
    from rocmux_hip_direct.tokenizer import Tokenizer

    original = Tokenizer.is_eog
    Tokenizer.is_eog = lambda self, token: False  # type: ignore[method-assign]  # ignore_eos
    try:
        config = LoadConfig(
            gpu_layers=0,
            context_len=256,
            parallel=concurrency,
            threads=threads,
            extra_flags=("--numerics", numerics),
        )
        t0 = time.perf_counter()
        model = await HipDirectBackend().load(model_path, config)
        res: dict[str, Any] = {"load_s": round(time.perf_counter() - t0, 2)}
        greedy = GenerateConfig(max_tokens=tokens, temperature=0)
        engine = model.engine

        async def one(prompt: str) -> Any:
            ids = model.tokenizer.encode(prompt, add_special=True, parse_special=True)
            seq = model._submit(ids, greedy)
            async for _ in model._run(seq):
                pass
            return seq

        async with model:
            await one(PROMPTS[0])  # warm-up
            before = load()
            seqs = [await one(PROMPTS[i]) for i in range(3)]
            rates = [engine.timings(s)["predicted_per_second"] for s in seqs]
            res["decode_b1_tps"] = statistics.median(rates)
            res["decode_b1_runs"] = [round(r, 2) for r in rates]
            res["decode_b1_load"] = [before, load()]
            before = load()
            t0 = time.perf_counter()
            seqs = await asyncio.gather(
                *(one(PROMPTS[i % len(PROMPTS)]) for i in range(concurrency))
            )
            wall = time.perf_counter() - t0
            generated = sum(s.n_generated for s in seqs)
            res[f"concurrent_{concurrency}"] = {
                "generated": generated,
                "wall_s": round(wall, 3),
                "aggregate_tps": generated / wall,
                "per_request_decode_tps": statistics.median(
                    engine.timings(s)["predicted_per_second"] for s in seqs
                ),
                "load": [before, load()],
            }
    finally:
        Tokenizer.is_eog = original  # type: ignore[method-assign]
    return res


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    from rocmux.default_model import default_model_path

    model_path = Path(args.model) if args.model else default_model_path()
    report: dict[str, Any] = {
        "model": model_path.name,
        "device": "cpu",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "tokens": args.tokens,
        "concurrency": args.concurrency,
        "runtimes": {},
    }
    log("llama-server ...")
    report["runtimes"]["llama-server"] = await llama_server(
        model_path, args.threads, args.concurrency, args.tokens
    )
    for mode in args.modes:
        log(f"hip_direct numerics={mode} ...")
        report["runtimes"][f"hip_direct ({mode})"] = await hip_direct(
            model_path, mode, args.threads, args.concurrency, args.tokens
        )
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=["fast", "llamacpp"])
    # One thread each by default: on a small shared machine torch's OpenMP threads
    # stall when another process takes a core (16 concurrent fell from 149 to 7.5
    # tok/s on 2 cores here), which would measure the neighbours, not the runtime.
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--model", default=None)
    parser.add_argument("--json", default=str(RESULTS))
    args = parser.parse_args(argv)
    report = asyncio.run(main_async(args))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    key = f"concurrent_{args.concurrency}"
    for name, res in report["runtimes"].items():
        print(
            f"{name}: batch 1 {res['decode_b1_tps']:.1f} tok/s, "
            f"{args.concurrency} concurrent {res[key]['aggregate_tps']:.1f} tok/s aggregate "
            f"(load {res['decode_b1_load']} / {res[key]['load']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
