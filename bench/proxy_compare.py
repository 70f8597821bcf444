"""Compare runs of bench/proxy.py: one table row per result file and concurrency level.

For each: rocmux serve's added median TTFT over direct llama-server (95% CI), its
aggregate tokens/s ratio (95% CI, paired median), the client's send spread per round,
and how many releases of the burst gate each round took (1: the burst reached the
runtime together; "split": rounds that took more than one).

Run: ``python bench/proxy_compare.py bench/results/gpu/burst/*.json``
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from proxy import Round, summarize_proxy
from rocmux.config import ServerSettings


def rows(path: Path) -> list[str]:
    result = json.loads(path.read_text())
    runs = [Round(**{k: v for k, v in r.items() if k != "agg_tps"}) for r in result["runs"]]
    window = result["meta"].get("proxy_servers", {}).get("burst_window")
    shown = f"{ServerSettings().burst_window * 1e3:g} ms (default)" if window is None else None
    out = []
    for level, by_path in summarize_proxy(runs, result["meta"]["paths"]).items():
        r, d = by_path["rocmux"], by_path["direct"]
        lo, hi = r["ttft_added_ms_ci95"]
        rlo, rhi = r["tps_ratio_ci95"]
        releases = (
            f"{r['releases_per_round_median']:g} ({r['rounds_split']}/{r['rounds']} split)"
            if "releases_per_round_median" in r
            else "-"
        )
        spread = d.get("send_spread_ms_median")
        out.append(
            f"| {path.name} | {shown or f'{window * 1e3:g} ms'} "
            f"| {level} | {d['ttft_ms_median']:.2f} | **{r['ttft_added_ms']:+.2f}** "
            f"[{lo:+.2f}, {hi:+.2f}] | {r['tps_ratio']:.3f} [{rlo:.3f}, {rhi:.3f}] "
            f"({r['tps_ratio_paired_median']:.3f}) "
            f"| {'-' if spread is None else f'{spread:.2f}'} | {releases} |"
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="+", type=Path, help="bench/proxy.py --json files")
    args = parser.parse_args(argv)
    print(
        "| run | burst_window | streams | direct TTFT median, ms | added, ms [95% CI] "
        "| tok/s ratio [95% CI] (paired) | direct send spread, ms | releases per round |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for path in args.results:
        for row in rows(path):
            print(row)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
