"""GPU checks for the device run: NVML monitoring during a load, CUDA offload and
decode speed through rocmux against the memory-bandwidth limit.

    python3 bench/gpu/gpu_checks.py OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from gguf_factory import LLAMA_3_2_1B_SHAPE, write_tiny_llama
from rocmux.devices import detect_gpus, memory_now
from rocmux.types import GenerateConfig, LoadConfig
from rocmux_llamacpp_hip.backend import LlamaCppBackend

H100_BANDWIDTH = 3.35e12  # bytes/s, SXM datasheet


async def main(out: Path) -> None:
    results: dict[str, object] = {}
    gpus = detect_gpus()
    results["gpus"] = [g.to_device().__repr__() for g in gpus]
    print("GPUs:", results["gpus"])
    spec = LLAMA_3_2_1B_SHAPE
    path = Path("/tmp/llama1b-f16.gguf")
    if not path.exists():
        started = time.perf_counter()
        write_tiny_llama(path, spec)
        print(
            f"wrote {path} ({path.stat().st_size:,} bytes) in {time.perf_counter() - started:.1f} s"
        )
    size = path.stat().st_size
    before = memory_now(gpus[0]) if gpus else None
    backend = LlamaCppBackend()
    availability = await backend.detect()
    print("llamacpp_hip:", availability.reason, "priority", availability.priority)
    results["availability"] = {
        "ok": availability.ok,
        "priority": availability.priority,
        "reason": availability.reason,
    }
    started = time.perf_counter()
    model = await backend.load(
        path, LoadConfig(gpu_layers=99, context_len=4096, parallel=1, flash_attn=True)
    )
    results["load_seconds"] = time.perf_counter() - started
    try:
        during = memory_now(gpus[0]) if gpus else None
        model.request_defaults["ignore_eos"] = True
        runs = []
        for _ in range(4):
            last = None
            async for token in model.generate(
                "Once upon a time", GenerateConfig(max_tokens=256, temperature=0)
            ):
                if token.timings:
                    last = token
            assert last is not None and last.timings is not None
            runs.append(last.timings["predicted_per_second"])
        decode = sorted(runs)[len(runs) // 2]
        bound = H100_BANDWIDTH / size
        results.update(
            {
                "model_bytes": size,
                "decode_tok_s_runs": runs,
                "decode_tok_s_median": decode,
                "bandwidth_bound_tok_s": bound,
                "fraction_of_bound": decode / bound,
                "vram_used_before": before[0] if before else None,
                "vram_used_loaded": during[0] if during else None,
            }
        )
        print(
            f"decode {decode:.0f} tok/s = {decode / bound:.0%} of the {bound:.0f} tok/s "
            f"bandwidth bound; VRAM used {before} -> {during}"
        )
        tail = model.server.output_tail(400)
        results["offload_lines"] = [
            line for line in tail.splitlines() if "offload" in line or "CUDA0" in line
        ][:12]
    finally:
        await model.close()
    after = memory_now(gpus[0]) if gpus else None
    results["vram_used_after_close"] = after[0] if after else None
    print("VRAM used after close:", after)
    (out / "gpu_checks.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    anyio.run(main, Path(sys.argv[1]))
