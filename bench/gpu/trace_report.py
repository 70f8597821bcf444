"""Where a burst's time goes, from the timestamps of bench/gpu/trace/sitecustomize.py.

    python bench/gpu/trace_report.py TRACE.json [--level 32]

Groups the client's requests into bursts (requests sent within 50 ms of the first, to
one base URL), matches each rocmux burst with the server's records, and prints the
medians over bursts of each step, per rank within the burst (0 = first sent).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Sequence
from pathlib import Path


def bursts(client: list[dict], level: int) -> list[list[dict]]:
    done = sorted((c for c in client if "f" in c), key=lambda c: c["s"])
    out: list[list[dict]] = []
    current: list[dict] = []
    for c in done:
        if current and (c["s"] - current[0]["s"] > 0.05 or c["base"] != current[0]["base"]):
            out.append(current)
            current = []
        current.append(c)
    out.append(current)
    return [b for b in out if len(b) == level]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trace", type=Path, help="the server's file; FILE.client beside it")
    parser.add_argument("--level", type=int, default=32, help="streams per burst")
    args = parser.parse_args(argv)
    records = [{**r, "src": "rocmux serve"} for r in json.loads(args.trace.read_text())]
    floor = Path(str(args.trace) + ".asgi")  # bench/passthrough.py asgi, when it ran
    if floor.exists():
        records += [{**r, "src": "asgi floor"} for r in json.loads(floor.read_text())]
    server = [r for r in records if "f" in r and "w" in r]
    collections = [c for r in records for c in r.get("gc", ()) if c[2] is not None]
    client = json.loads(Path(str(args.trace) + ".client").read_text())
    med = statistics.median
    every = bursts(client, args.level)
    for base in sorted({b[0]["base"] for b in every}):
        group = [b for b in every if b[0]["base"] == base]
        ttft = med(med((c["f"] - c["s"]) * 1e3 for c in b) for b in group)
        spread = med((b[-1]["s"] - b[0]["s"]) * 1e3 for b in group)
        ranks = []
        for b in group:
            s0 = b[0]["s"]
            mine = [r for r in server if s0 - 0.001 <= r["a"] <= s0 + 0.05]
            mine.sort(key=lambda r: r["a"])
            if len(mine) == args.level:
                ranks.append((b, mine))
        kind = ranks[0][1][0]["src"] if ranks else "untraced"
        print(
            f"{base} ({kind}): {len(group)} bursts, median TTFT {ttft:.2f} ms, "
            f"send spread {spread:.2f} ms"
        )
        if not ranks:
            continue
        cpu = [(m[-1]["cpu"] - m[0]["cpu"]) * 1e3 for _, m in ranks if "cpu" in m[0]]
        wall = [(m[-1]["a"] - m[0]["a"]) * 1e3 for _, m in ranks]
        line = f"  read: first to last handler start {med(wall):.2f} ms"

        def collected(m: list[dict]) -> tuple[int, float]:
            inside = [c for c in collections if m[0]["a"] <= c[1] <= m[-1]["a"]]
            return len(inside), sum(c[2] - c[1] for c in inside) * 1e3

        if collections:
            gcs = [collected(m) for _, m in ranks]
            line += (
                f", GC in it: {med(n for n, _ in gcs):g} collections, "
                f"{med(t for _, t in gcs):.2f} ms"
            )
        if cpu:
            line += f", CPU of the server meanwhile {med(cpu):.2f} ms"
        print(line)
        print(
            "  rank  sent  handler  at gate  written  head  first byte (server)  "
            "first byte (client)  [ms after the first send]"
        )
        for k in sorted({0, 1, 2, 4, 8, 16, 24, args.level - 1} & set(range(args.level))):

            def at(key: str, k: int = k, ranks: list = ranks) -> float:
                return med((sorted(r[key] for r in m)[k] - b[0]["s"]) * 1e3 for b, m in ranks)

            sent = med((b[k]["s"] - b[0]["s"]) * 1e3 for b, _ in ranks)
            got = med((sorted(c["f"] for c in b)[k] - b[0]["s"]) * 1e3 for b, _ in ranks)
            print(
                f"  {k:4d} {sent:5.2f} {at('a'):8.2f} {at('g'):8.2f} {at('w'):8.2f} "
                f"{at('h'):5.2f} {at('f'):20.2f} {got:20.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
