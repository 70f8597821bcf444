"""hip_direct against llama-server on one GPU: batch-1 decode, time to first token for a
512-token prompt, and aggregate decode throughput at 8, 32 and 64 concurrent requests,
with the memory-bandwidth bound measured in the same run.

    python bench/direct_gpu.py run --out DIR --llama-server PATH [--smollm2 GGUF]
    python bench/direct_gpu.py skeleton OUT.gguf      # SmolLM2's header, for the device
    python bench/direct_gpu.py plot RESULTS.json PNG

Models: the default model (SmolLM2-135M-Instruct Q4_1, or where that file cannot travel,
a copy with its header, tensor names, types and shapes and random weights, made from a
``skeleton`` file) and a random-weight F16 GGUF with Llama-3.2-1B's shapes. Both
runtimes load the same files. Weights are random, so both ignore end-of-generation
tokens (llama-server's ``ignore_eos``; hip_direct's tokenizer is told no token ends
generation) and every request generates exactly its ``max_tokens``.

hip_direct runs in this process through its TextModel (the path rocmux serves);
llama-server (CUDA build) through its HTTP API with non-streamed ``/completion``
requests, so that the client costs it nothing. Decode rates are each runtime's own
count: generated tokens after the first over the time from the first to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

CONCURRENCY = (8, 32, 64)
GEN_TOKENS = 256
TTFT_PROMPT = 512
TTFT_STREAMS = 32  # concurrent 512-token prompts for the loaded TTFT
TTFT_STREAM_TOKENS = 16
CTX = 2048  # per sequence, both runtimes
SKELETON_KEY = "rocmux.skeleton.tensors"


def log(*args: object) -> None:
    print(*args, flush=True)


# -- model files ----------------------------------------------------------------------------


def write_skeleton(src: Path, dst: Path) -> None:
    """A GGUF with ``src``'s metadata and no tensors; the tensor list goes in a key."""
    import gguf

    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    _copy_fields(reader, writer)
    specs = [
        {"name": t.name, "type": t.tensor_type.name, "shape": [int(n) for n in t.shape]}
        for t in reader.tensors
    ]
    writer.add_string(SKELETON_KEY, json.dumps(specs))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()


def _copy_fields(reader: Any, writer: Any) -> None:
    import gguf

    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in ("general.architecture", SKELETON_KEY):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)


def fill_skeleton(skeleton: Path, dst: Path, seed: int = 0) -> Path:
    """The model ``skeleton`` describes, with random weights of the same types."""
    import gguf
    from gguf import GGMLQuantizationType as Q

    if dst.exists():
        return dst
    reader = gguf.GGUFReader(skeleton)
    specs = json.loads(str(reader.fields[SKELETON_KEY].contents()))
    writer = gguf.GGUFWriter(dst, str(reader.fields["general.architecture"].contents()))
    _copy_fields(reader, writer)
    rng = np.random.default_rng(seed)
    for spec in specs:
        qtype = Q[spec["type"]]
        cols, *rest = spec["shape"]  # GGUF order: the row length first
        rows = int(np.prod(rest)) if rest else 1
        if qtype == Q.F32:
            writer.add_tensor(spec["name"], np.ones((rows, cols), np.float32).squeeze(0))
            continue
        data = (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(np.float32)
        packed = gguf.quants.quantize(data, qtype)
        writer.add_tensor(spec["name"], packed, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dst


def llama_1b(path: Path) -> Path:
    """A random-weight F16 GGUF with Llama-3.2-1B's shapes (output head untied)."""
    from gguf_factory import LLAMA_3_2_1B_SHAPE, write_tiny_llama

    if not path.exists():
        write_tiny_llama(path, LLAMA_3_2_1B_SHAPE)
    return path


# -- measurements shared by both runtimes ----------------------------------------------------


def copy_bandwidth() -> dict[str, float]:
    """Device-to-device copy of 2 GiB, bytes read plus written over the median time."""
    import torch

    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    a.random_(0, 255)
    b = torch.empty_like(a)
    times = []
    for i in range(25):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        b.copy_(a)
        stop.record()
        stop.synchronize()
        if i >= 5:
            times.append(start.elapsed_time(stop) / 1000)
    t = statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return {"bytes": 2 * n, "median_s": t, "bandwidth_Bps": 2 * n / t}


def prompt_ids(vocab: int, n: int, seed: int) -> list[int]:
    """``n`` token ids from the middle of the vocabulary (no special tokens)."""
    rng = np.random.default_rng(seed)
    lo = min(1000, vocab // 4)
    return [int(x) for x in rng.integers(lo, vocab - 1000 if vocab > 4000 else vocab, n)]


def gpu_memory_used() -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        return int(out.stdout.split()[0]) * 2**20
    except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
        return None


# -- hip_direct --------------------------------------------------------------------------------


async def hip_direct(path: Path, vocab: int, profile: bool) -> dict[str, Any]:
    import torch
    from rocmux.types import GenerateConfig, LoadConfig
    from rocmux_hip_direct.fast import bytes_per_decode_token
    from rocmux_hip_direct.plugin import HipDirectBackend
    from rocmux_hip_direct.tokenizer import Tokenizer

    Tokenizer.is_eog = lambda self, token: False  # type: ignore[method-assign]  # ignore_eos
    res: dict[str, Any] = {}
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    model = await HipDirectBackend().load(
        path, LoadConfig(gpu_layers=99, context_len=CTX, parallel=max(CONCURRENCY))
    )
    res["load_s"] = time.perf_counter() - started
    engine = model.engine
    fast = engine.fast
    res["fast_path"] = fast is not None
    res["graphs"] = bool(fast and fast.use_graphs)
    res["buckets"] = list(fast.buckets) if fast else []
    weights = sum(
        t.numel() * t.element_size()
        for t in [engine.model.tok_embd, engine.model.output_norm]
        + [
            x
            for layer in engine.model.layers
            for x in (
                layer.attn_norm,
                layer.ffn_norm,
                layer.wq.weight,
                layer.wk.weight,
                layer.wv.weight,
                layer.wo.weight,
                layer.w_gate.weight,
                layer.w_up.weight,
                layer.w_down.weight,
            )
        ]
    )
    if engine.model.output.weight.data_ptr() != engine.model.tok_embd.data_ptr():
        weights += engine.model.output.weight.numel() * engine.model.output.weight.element_size()
    res["weight_bytes"] = weights
    res["kv_cache_bytes"] = engine.cache.nbytes()
    res["bytes_per_token"] = bytes_per_decode_token(engine.model)
    res["dtype"] = str(engine.model.dtype)
    res["memory_allocated"] = torch.cuda.memory_allocated() if cuda else None
    greedy = GenerateConfig(max_tokens=GEN_TOKENS, temperature=0)

    async def run(ids: list[int], config: GenerateConfig) -> Any:
        seq = model._submit(ids, config)
        async for _ in model._run(seq):
            pass
        return seq

    # warm-up: every bucket once
    await asyncio.gather(*(run(prompt_ids(vocab, 8, i), greedy) for i in range(max(CONCURRENCY))))

    # batch-1 decode: steps launched ahead of their tokens (the default), then each
    # step waited for (ROCMUX_HIP_DIRECT_OVERLAP=0), then sampled (llama-server's chain)
    async def b1(config: GenerateConfig, seed: int) -> list[float]:
        rates = []
        for rep in range(3):
            seq = await run(prompt_ids(vocab, 8, seed + rep), config)
            rates.append(engine.timings(seq)["predicted_per_second"])
        return rates

    overlap = engine.overlap
    launched = fast.launched_steps if fast is not None else 0
    rates = await b1(greedy, 100)
    res["decode_b1_tps"] = statistics.median(rates)
    res["decode_b1_runs"] = rates
    res["overlap"] = overlap
    res["decode_b1_launched_steps"] = (fast.launched_steps - launched) if fast else 0
    engine.overlap = False
    rates = await b1(greedy, 100)
    engine.overlap = overlap
    res["decode_b1_no_overlap_tps"] = statistics.median(rates)
    res["decode_b1_no_overlap_runs"] = rates
    sampled = GenerateConfig(max_tokens=GEN_TOKENS, seed=7)  # temperature 0.8, top-k 40, ...
    rates = await b1(sampled, 100)
    res["decode_b1_sampled_tps"] = statistics.median(rates)
    res["decode_b1_sampled_runs"] = rates
    if fast is not None and fast.use_graphs:
        res["graph_step_ms"] = graph_step_ms(fast)

    # time to first token, 512-token prompt
    ttfts = []
    one = GenerateConfig(max_tokens=1, temperature=0)
    for rep in range(6):
        seq = await run(prompt_ids(vocab, TTFT_PROMPT, 200 + rep), one)
        ttfts.append((seq.t_first_token - seq.t_arrival) * 1000)
    res["ttft_512_ms"] = statistics.median(ttfts[1:])
    res["ttft_512_runs_ms"] = ttfts

    # time to first token of 32 concurrent 512-token prompts (16 tokens each), twice
    few = GenerateConfig(max_tokens=TTFT_STREAM_TOKENS, temperature=0)
    loaded = []
    for rep in range(2):
        seqs = await asyncio.gather(
            *(
                run(prompt_ids(vocab, TTFT_PROMPT, 5000 + 100 * rep + i), few)
                for i in range(TTFT_STREAMS)
            )
        )
        loaded.append(sorted((s.t_first_token - s.t_arrival) * 1000 for s in seqs))
    res[f"ttft_512_c{TTFT_STREAMS}"] = ttft_stats(loaded)

    # concurrency
    for n in CONCURRENCY:
        t0 = time.perf_counter()
        seqs = await asyncio.gather(
            *(run(prompt_ids(vocab, 16, 1000 * n + i), greedy) for i in range(n))
        )
        wall = time.perf_counter() - t0
        generated = sum(s.n_generated for s in seqs)
        res[f"concurrent_{n}"] = {
            "generated": generated,
            "wall_s": wall,
            "aggregate_tps": generated / wall,
            "per_request_decode_tps": statistics.median(
                engine.timings(s)["predicted_per_second"] for s in seqs
            ),
        }
    res["peak_memory_allocated"] = torch.cuda.max_memory_allocated() if cuda else None
    if fast is not None:
        res["steps"] = {
            "graph": fast.graph_steps,
            "eager": fast.eager_steps,
            "staged": fast.staged_steps,
            "launched": fast.launched_steps,
        }
    if profile and fast is not None:
        res["profile"] = kernel_profile(model, vocab)
    await model.close()
    if cuda:
        torch.cuda.empty_cache()
    return res


def ttft_stats(rounds: list[list[float]]) -> dict[str, Any]:
    """Median and p90 over the streams of the last round (the first warms up)."""
    last = sorted(rounds[-1])
    return {
        "p50_ms": statistics.median(last),
        "p90_ms": last[int(0.9 * (len(last) - 1))],
        "max_ms": last[-1],
        "rounds_ms": rounds,
    }


def graph_step_ms(fast: Any) -> dict[str, float]:
    """GPU time of one decode-graph replay per bucket (inputs as left by the last step)."""
    import torch

    out = {}
    for bucket, (graph, _) in sorted(fast._graphs.items()):
        d = fast._dev[:bucket]
        d[:, 2] = -1  # no KV writes
        d[:, 3] = 300  # context of 300 positions, blocks 0..
        d[:, 4:] = torch.arange(d.shape[1] - 4, device=d.device, dtype=d.dtype)
        for _ in range(3):
            graph.replay()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            graph.replay()
        stop.record()
        stop.synchronize()
        out[str(bucket)] = start.elapsed_time(stop) / 50
    return out


def kernel_profile(model: Any, vocab: int) -> list[dict[str, Any]]:
    """Per-kernel GPU time of one batch-1 decode step run eagerly (torch.profiler)."""
    import torch
    from rocmux_hip_direct.sampling import SamplingParams
    from torch.profiler import ProfilerActivity, profile

    engine = model.engine
    fast = engine.fast
    seq = engine.submit(prompt_ids(vocab, 300, 5), SamplingParams(temperature=0.0), 4)
    while not seq.done and seq.n_generated < 1:
        engine.step()
    engine.apply_pending()
    chunks = engine.scheduler.schedule()
    fast.decode_eager(chunks)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fast.decode_eager(chunks)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0)
        if dev_us:
            rows.append({"name": e.key[:90], "calls": e.count // 5, "us_per_step": dev_us / 5})
    engine.scheduler.finish(seq, "cancelled")
    return sorted(rows, key=lambda r: -r["us_per_step"])[:25]


# -- llama-server ----------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    def __init__(self, binary: Path, model: Path, parallel: int, log_path: Path) -> None:
        self.port = free_port()
        self.argv = [
            str(binary),
            "-m",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-ngl",
            "99",
            "-c",
            str(CTX * parallel),
            "--parallel",
            str(parallel),
            "--flash-attn",
            "on",
        ]
        self.log = open(log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(self.argv, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, client: Any, limit_s: float = 180) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < limit_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.proc.returncode}")
            try:
                r = await client.get(f"http://127.0.0.1:{self.port}/health")
                if r.status_code == 200:
                    return time.perf_counter() - t0
            except Exception:
                pass
            await asyncio.sleep(0.1)
        raise TimeoutError("llama-server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def _greedy_body(ids: list[int], n: int, stream: bool) -> dict[str, Any]:
    """llama-server's native /completion: greedy, exactly ``n`` tokens, no prompt cache."""
    return {
        "prompt": ids,
        "n_predict": n,
        "temperature": 0,
        "ignore_eos": True,
        "cache_prompt": False,
        "stream": stream,
    }


async def _complete(client: Any, port: int, ids: list[int], n: int) -> dict[str, Any]:
    body = _greedy_body(ids, n, stream=False)
    r = await client.post(f"http://127.0.0.1:{port}/completion", json=body)
    r.raise_for_status()
    return r.json()


async def _first_token_ms(client: Any, port: int, ids: list[int], n: int) -> float:
    """A streamed request: milliseconds from sending it to its first token's event."""
    body = _greedy_body(ids, n, stream=True)
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", f"http://127.0.0.1:{port}/completion", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if first is None and line.startswith("data:"):
                first = (time.perf_counter() - t0) * 1000
    assert first is not None
    return first


async def llama_server(binary: Path, path: Path, vocab: int, out: Path) -> dict[str, Any]:
    import httpx

    res: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=128)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        # batch 1 and TTFT on a one-slot server: llama.cpp's best case for one stream
        before = gpu_memory_used()
        server = LlamaServer(binary, path, 1, out / f"llama-server-{path.stem}-np1.log")
        try:
            res["load_s_np1"] = await server.wait_ready(client)
            res["argv_np1"] = server.argv
            res["gpu_memory_np1"] = (gpu_memory_used() or 0) - (before or 0)
            await _complete(client, server.port, prompt_ids(vocab, 8, 1), 32)  # warm-up
            rates = []
            for rep in range(3):
                ids = prompt_ids(vocab, 8, 100 + rep)
                j = await _complete(client, server.port, ids, GEN_TOKENS)
                rates.append(j["timings"]["predicted_per_second"])
            res["decode_b1_tps"] = statistics.median(rates)
            res["decode_b1_runs"] = rates
            walls, prompt_ms = [], []
            for rep in range(6):
                ids = prompt_ids(vocab, TTFT_PROMPT, 200 + rep)
                t0 = time.perf_counter()
                j = await _complete(client, server.port, ids, 1)
                walls.append((time.perf_counter() - t0) * 1000)
                prompt_ms.append(j["timings"]["prompt_ms"])
            res["ttft_512_ms"] = statistics.median(walls[1:])
            res["ttft_512_runs_ms"] = walls
            res["prompt_512_ms"] = statistics.median(prompt_ms[1:])
        finally:
            server.stop()
        # the loaded TTFT and the concurrency on a 64-slot server
        # concurrency on a 64-slot server
        par = max(CONCURRENCY)
        server = LlamaServer(binary, path, par, out / f"llama-server-{path.stem}-np{par}.log")
        try:
            res["load_s_np64"] = await server.wait_ready(client)
            res["argv_np64"] = server.argv
            await asyncio.gather(
                *(_complete(client, server.port, prompt_ids(vocab, 8, i), 16) for i in range(par))
            )
            j = await _complete(client, server.port, prompt_ids(vocab, 8, 7), GEN_TOKENS)
            res["decode_b1_np64_tps"] = j["timings"]["predicted_per_second"]
            loaded = []
            for rep in range(2):
                loaded.append(
                    sorted(
                        await asyncio.gather(
                            *(
                                _first_token_ms(
                                    client,
                                    server.port,
                                    prompt_ids(vocab, TTFT_PROMPT, 5000 + 100 * rep + i),
                                    TTFT_STREAM_TOKENS,
                                )
                                for i in range(TTFT_STREAMS)
                            )
                        )
                    )
                )
            res[f"ttft_512_c{TTFT_STREAMS}"] = ttft_stats(loaded)
            for n in CONCURRENCY:
                t0 = time.perf_counter()
                outs = await asyncio.gather(
                    *(
                        _complete(
                            client, server.port, prompt_ids(vocab, 16, 1000 * n + i), GEN_TOKENS
                        )
                        for i in range(n)
                    )
                )
                wall = time.perf_counter() - t0
                generated = sum(int(o["tokens_predicted"]) for o in outs)
                res[f"concurrent_{n}"] = {
                    "generated": generated,
                    "wall_s": wall,
                    "aggregate_tps": generated / wall,
                    "per_request_decode_tps": statistics.median(
                        o["timings"]["predicted_per_second"] for o in outs
                    ),
                }
        finally:
            server.stop()
    return res


# -- driver ------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> None:
    import torch

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = Path(args.log_dir) if args.log_dir else out
    logs.mkdir(parents=True, exist_ok=True)
    global CONCURRENCY, GEN_TOKENS
    CONCURRENCY = tuple(args.concurrency)
    GEN_TOKENS = args.gen_tokens
    cuda = torch.cuda.is_available()
    results: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if cuda else "cpu",
        "concurrency": list(CONCURRENCY),
        "gen_tokens": GEN_TOKENS,
        "ctx_per_sequence": CTX,
    }
    try:
        import triton

        results["triton"] = triton.__version__
    except ImportError:
        results["triton"] = None
    dump = out / args.json

    def save() -> None:
        dump.write_text(json.dumps(results, indent=1))

    results["copy_bandwidth"] = copy_bandwidth() if cuda else {"bandwidth_Bps": float("nan")}
    log("copy bandwidth", results["copy_bandwidth"])
    models: dict[str, Path] = {}
    if args.smollm2:
        src = Path(args.smollm2)
        import gguf

        reader = gguf.GGUFReader(src)
        if SKELETON_KEY in reader.fields:
            models["smollm2-135m-q4_1"] = fill_skeleton(src, Path("/tmp/smollm2-like.gguf"))
            results["smollm2_file"] = "random weights, SmolLM2-135M-Instruct.Q4_1 header/types"
        else:
            models["smollm2-135m-q4_1"] = src
            results["smollm2_file"] = str(src)
    if not args.no_1b:
        models["llama-3.2-1b-shape-f16"] = llama_1b(Path("/tmp/llama1b-f16.gguf"))
    bw = results["copy_bandwidth"]["bandwidth_Bps"]
    vocabs: dict[str, int] = {}
    for name, path in models.items():
        import gguf

        reader = gguf.GGUFReader(path)
        vocabs[name] = len(reader.fields["tokenizer.ggml.tokens"].data)
        results[name] = {
            "file": str(path),
            "file_bytes": path.stat().st_size,
            "arch": str(reader.fields["general.architecture"].contents()),
            "vocab": vocabs[name],
        }
        del reader
    # All hip_direct runs first, then all llama-server runs: the device script starts
    # the measurements while llama-server may still be building.
    for name, path in models.items() if not args.skip_hip else ():
        log("hip_direct", name)
        entry = results[name]
        try:
            entry["hip_direct"] = await hip_direct(path, vocabs[name], args.profile)
        except Exception as exc:
            import traceback

            entry["hip_direct"] = {"error": traceback.format_exc()}
            log("hip_direct failed:", exc)
        h = entry["hip_direct"]
        if "bytes_per_token" in h:
            h["bandwidth_bound_tps"] = bw / h["bytes_per_token"]
            h["fraction_of_bound"] = h["decode_b1_tps"] / h["bandwidth_bound_tps"]
        log(json.dumps(h, indent=1)[:4000])
        save()
    binary = Path(args.llama_server) if args.llama_server and not args.skip_llama else None
    if binary is not None:
        deadline = time.time() + args.wait_build
        while not binary.exists() and time.time() < deadline:
            await asyncio.sleep(5)
    for name, path in models.items() if binary is not None else ():
        entry = results[name]
        if not binary.exists():
            entry["llama_server"] = {"error": f"{binary} not built"}
            continue
        log("llama-server", name)
        try:
            entry["llama_server"] = await llama_server(binary, path, vocabs[name], logs)
        except Exception:
            import traceback

            entry["llama_server"] = {"error": traceback.format_exc()}
        log(json.dumps(entry["llama_server"], indent=1)[:2000])
        save()
    save()
    summary(results)


def summary(results: dict[str, Any]) -> None:
    """A short table on stdout."""
    bw = results["copy_bandwidth"]["bandwidth_Bps"]
    log(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    for name, entry in results.items():
        if not isinstance(entry, dict) or "file_bytes" not in entry:
            continue
        h, lc = entry.get("hip_direct", {}), entry.get("llama_server", {})
        log(f"== {name}")
        for key in ("decode_b1_tps", "ttft_512_ms"):
            a, b = h.get(key, float("nan")), lc.get(key, float("nan"))
            log(f"  {key:16} hip_direct {a:9.1f}  llama {b:9.1f}")
        if "decode_b1_no_overlap_tps" in h:
            log(
                f"  batch-1 without overlap {h['decode_b1_no_overlap_tps']:.1f}, "
                f"sampled {h.get('decode_b1_sampled_tps', float('nan')):.1f} tok/s"
            )
        key = f"ttft_512_c{TTFT_STREAMS}"
        a, b = h.get(key, {}), lc.get(key, {})
        nan = float("nan")
        log(
            f"  TTFT {TTFT_STREAMS}x512 p50/p90 hip_direct {a.get('p50_ms', nan):.1f}/"
            f"{a.get('p90_ms', nan):.1f}  llama {b.get('p50_ms', nan):.1f}/"
            f"{b.get('p90_ms', nan):.1f}"
        )
        for n in CONCURRENCY:
            a = h.get(f"concurrent_{n}", {}).get("aggregate_tps", float("nan"))
            b = lc.get(f"concurrent_{n}", {}).get("aggregate_tps", float("nan"))
            ratio = a / b if b else float("nan")
            log(f"  concurrent {n:3}   hip_direct {a:9.1f}  llama {b:9.1f}  ratio {ratio:5.2f}")
        if "bandwidth_bound_tps" in h:
            log(
                f"  bound {h['bandwidth_bound_tps']:.0f} tok/s "
                f"({h['bytes_per_token'] / 1e6:.1f} MB/token); "
                f"hip_direct at {100 * h['fraction_of_bound']:.0f}%"
            )


def merge(parts: list[Path], dst: Path) -> None:
    """Results of separate phases (``--skip-llama`` / ``--skip-hip``) in one file; each
    phase keeps the copy bandwidth it measured."""
    merged: dict[str, Any] = {}
    for part in parts:
        data = json.loads(part.read_text())
        for key, value in data.items():
            if isinstance(value, dict) and "file_bytes" in value and key in merged:
                merged[key].update({k: v for k, v in value.items() if k not in merged[key]})
            elif key == "copy_bandwidth":
                merged.setdefault("copy_bandwidth_phases", []).append(value)
                merged.setdefault(key, value)
            else:
                merged.setdefault(key, value)
    dst.write_text(json.dumps(merged, indent=1))


def plot(results_path: Path, png: Path) -> None:
    """Bars: batch-1 decode (with the bound), TTFT and aggregate throughput per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(results_path.read_text())
    conc = results.get("concurrency", CONCURRENCY)
    names = [k for k, v in results.items() if isinstance(v, dict) and "file_bytes" in v]
    fig, axes = plt.subplots(len(names), 3, figsize=(13, 3.6 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        h = results[name].get("hip_direct", {})
        lc = results[name].get("llama_server", {})
        ax = axes[row][0]
        vals = [h.get("decode_b1_tps", 0), lc.get("decode_b1_tps", 0)]
        ax.bar(["hip_direct", "llama-server"], vals, color=["tab:red", "tab:blue"])
        if "bandwidth_bound_tps" in h:
            ax.axhline(h["bandwidth_bound_tps"], ls="--", c="k", lw=1, label="bandwidth bound")
            ax.axhline(0.6 * h["bandwidth_bound_tps"], ls=":", c="k", lw=1, label="60% of it")
            ax.legend(fontsize=8)
        ax.set_title(f"{name}\nbatch-1 decode (tokens/s)", fontsize=9)
        ax = axes[row][1]
        key = f"ttft_512_c{TTFT_STREAMS}"
        labels = ["1 prompt", f"{TTFT_STREAMS} at once (p50)"]
        x = np.arange(len(labels))
        for off, res, name, color in (
            (-0.2, h, "hip_direct", "tab:red"),
            (0.2, lc, "llama-server", "tab:blue"),
        ):
            vals = [res.get("ttft_512_ms", 0), res.get(key, {}).get("p50_ms", 0)]
            ax.bar(x + off, vals, 0.4, label=name, color=color)
        ax.set_xticks(x, labels)
        ax.set_yscale("log")
        ax.legend(fontsize=8, loc="upper left")
        ax.set_title("time to first token, 512-token prompts (ms, log scale)", fontsize=9)
        ax = axes[row][2]
        x = np.arange(len(conc))
        a = [h.get(f"concurrent_{n}", {}).get("aggregate_tps", 0) for n in conc]
        b = [lc.get(f"concurrent_{n}", {}).get("aggregate_tps", 0) for n in conc]
        ax.bar(x - 0.2, a, 0.4, label="hip_direct", color="tab:red")
        ax.bar(x + 0.2, b, 0.4, label="llama-server --parallel 64", color="tab:blue")
        ax.set_xticks(x, [str(n) for n in conc])
        ax.set_xlabel("concurrent requests")
        ax.set_title("aggregate decode (tokens/s)", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{results['gpu']}, {results['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run")
    p.add_argument("--out", default=os.environ.get("OUT", "bench/results/gpu"))
    p.add_argument("--llama-server")
    p.add_argument("--smollm2", help="the default model's GGUF or a skeleton of it")
    p.add_argument("--skip-hip", action="store_true")
    p.add_argument("--skip-llama", action="store_true")
    p.add_argument("--profile", action="store_true", help="per-kernel times of a decode step")
    p.add_argument("--wait-build", type=float, default=0, help="seconds to wait for the binary")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--gen-tokens", type=int, default=GEN_TOKENS)
    p.add_argument("--no-1b", action="store_true", help="skip the Llama-3.2-1B-shaped model")
    p.add_argument("--json", default="direct_gpu.json", help="results file name in --out")
    p.add_argument("--log-dir", help="llama-server logs (default: --out)")
    s = sub.add_parser("skeleton")
    s.add_argument("dst")
    s.add_argument("--src", help="default: the installed default model")
    m = sub.add_parser("merge", help="one results file from the hip and llama phases")
    m.add_argument("parts", nargs="+")
    m.add_argument("dst")
    q = sub.add_parser("plot")
    q.add_argument("results")
    q.add_argument("png")
    args = parser.parse_args()
    if args.cmd == "run":
        asyncio.run(run(args))
    elif args.cmd == "skeleton":
        from rocmux.default_model import default_model_path

        write_skeleton(Path(args.src) if args.src else default_model_path(), Path(args.dst))
    elif args.cmd == "merge":
        merge([Path(p) for p in args.parts], Path(args.dst))
    else:
        plot(Path(args.results), Path(args.png))


if __name__ == "__main__":
    main()
