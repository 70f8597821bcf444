"""How fast this machine runs Python: clock reads, a syscall, one pass of an idle
uvloop and asyncio event loop, and a pure-Python recursion. Compares hosts whose proxy
benchmarks differ (docs/benchmarks.md). Prints one JSON line."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import uvloop


def per_call_ns(f: Callable[[], object], n: int = 200_000) -> float:
    start = time.perf_counter()
    for _ in range(n):
        f()
    return (time.perf_counter() - start) / n * 1e9


async def loop_pass_ns(seconds: float = 0.5) -> float:
    """Nanoseconds per pass of the running loop with one callback always ready."""
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    end = time.monotonic() + seconds
    passes = 0

    def again() -> None:
        nonlocal passes
        passes += 1
        if time.monotonic() < end:
            loop.call_soon(again)
        else:
            done.set_result(None)

    loop.call_soon(again)
    await done
    return seconds / passes * 1e9


def fib(n: int) -> int:
    return n if n < 2 else fib(n - 1) + fib(n - 2)


def main() -> None:
    out: dict[str, object] = {
        "python": sys.version.split()[0],
        "monotonic_ns": per_call_ns(time.monotonic),
        "getppid_ns": per_call_ns(os.getppid),
        "uvloop_pass_ns": uvloop.run(loop_pass_ns()),
        "asyncio_pass_ns": asyncio.run(loop_pass_ns()),
    }
    start = time.perf_counter()
    fib(24)
    out["fib24_ms"] = (time.perf_counter() - start) * 1e3
    source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    try:
        out["clocksource"] = source.read_text().strip()
    except OSError as exc:
        out["clocksource"] = str(exc)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
