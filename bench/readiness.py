"""How soon after llama-server is ready does the supervisor notice it?

llama-server stamps each log line with the time since it started; the line
``listening on http://...`` marks readiness. The supervisor's start() returns after a
successful /health. The gap between the two (both measured from spawn) is the
readiness latency the supervisor adds (negative when /health answers before the
line is written). Target (issue 2): under 20 ms.

    python bench/readiness.py --runs 20
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from rocmux.default_model import default_model_path
from rocmux.launch import HOST, PORT, Launch
from rocmux.supervisor import ServerProcess
from rocmux_llamacpp_hip.backend import READY_LINE
from rocmux_llamacpp_hip.binary import locate

STAMP = re.compile(r"^(\d+)\.(\d+)\.(\d+)\.(\d+) .*listening on http")


def _listening_ms(output: str) -> float:
    for line in output.splitlines():
        match = STAMP.match(line)
        if match:
            # llama.cpp stamps minutes.seconds.milliseconds.microseconds since start.
            minutes, seconds, millis, micros = (int(x) for x in match.groups())
            return (minutes * 60 + seconds) * 1000 + millis + micros / 1000
    raise RuntimeError("no 'listening' line in the server's output:\n" + output)


async def _once(server_path: Path, model: Path, use_log: bool) -> dict[str, float]:
    launch = Launch(
        backend="llamacpp_hip",
        argv=[
            str(server_path),
            "-m",
            str(model),
            "--host",
            HOST,
            "--port",
            PORT,
            "--no-webui",
            "-c",
            "512",
            "-np",
            "1",
        ],
        ready_pattern=READY_LINE if use_log else None,
    )
    server = ServerProcess(launch)
    line_seen: list[float] = []

    async def watch() -> None:
        # A passive observer: when did the listening line reach this process?
        while not line_seen:
            if any("listening on http" in line for line in list(server._lines)[-5:]):
                line_seen.append(time.perf_counter())
            await anyio.sleep(0.0005)

    started = time.perf_counter()
    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        await server.start()
        noticed = time.perf_counter()
        noticed_ms = (noticed - started) * 1000
        with anyio.move_on_after(1.0):
            while not line_seen:
                await anyio.sleep(0.001)
        tg.cancel_scope.cancel()
    try:
        listening_ms = _listening_ms(server.output_tail(200))
    finally:
        await server.stop()
    return {
        "noticed_ms": noticed_ms,
        "listening_ms": listening_ms,
        # from the server's own clock: includes exec and library loading before it starts
        "latency_vs_server_clock_ms": noticed_ms - listening_ms,
        # from the moment the line was read here: what the supervisor itself adds
        "latency_ms": (noticed - line_seen[0]) * 1000 if line_seen else float("nan"),
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=Path("bench/results/readiness.json"))
    args = parser.parse_args()
    model = args.model or default_model_path()
    server_path = locate().path
    results: dict[str, list[dict[str, float]]] = {"log_line": [], "polling_only": []}
    for _ in range(args.runs):
        results["log_line"].append(await _once(server_path, model, True))
        results["polling_only"].append(await _once(server_path, model, False))
    summary = {}
    for mode, runs in results.items():
        lat = sorted(r["latency_ms"] for r in runs)
        summary[mode] = {
            "median_ms": statistics.median(lat),
            "p90_ms": lat[int(0.9 * (len(lat) - 1))],
            "max_ms": lat[-1],
            "spawn_to_ready_median_ms": statistics.median(r["noticed_ms"] for r in runs),
            "vs_server_clock_median_ms": statistics.median(
                r["latency_vs_server_clock_ms"] for r in runs
            ),
        }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"summary": summary, "runs": results}, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    anyio.run(main)
