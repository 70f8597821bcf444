"""Streaming overhead of rocmux over a bare httpx client, against one llama-server.

One llama-server is started through rocmux (``open_model``). Each round streams the
same greedy completion of N tokens twice per prompt: once through ``model.generate``
and once through the thinnest reasonable client (``httpx`` + ``httpx_sse`` +
``json.loads``) posting the very body rocmux sends to ``model.url``. The order
alternates every round (ABBA) so that drift of this shared machine hits both paths
alike; the comparison is made within the one run.

Per run it records the client-side time to the first non-empty token (the clock
starts just before the request is made) and the decode rate, (tokens after the
first) / (time from the first to the last token), plus llama-server's own
``timings.predicted_per_second``.

Run: ``python bench/overhead.py --rounds 30``
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import anyio
import attrs
import httpx
import numpy as np
import rocmux.selection
from httpx_sse import EventSource
from rocmux.served import ServedModel
from rocmux.types import GenerateConfig, LoadConfig

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "overhead.json"
DEFAULT_PLOT = ROOT / "docs" / "img" / "overhead.png"
DOCS = ROOT / "docs" / "benchmarks.md"
SECTION = "## Streaming overhead (bench/overhead.py)"
DOCS_INTRO = (
    "# Benchmarks\n\n"
    "All figures are measured by scripts in bench/; ratios are taken within one run "
    "because these machines are shared and noisy.\n"
)

# Targets from the issue.
TARGET_DECODE_RATIO = 0.99
TARGET_TTFT_ADDED_MS = 0.5

PROMPTS = (
    "The capital of France is",
    "Write a short story about a robot who learns to paint.",
    "List three uses for a paperclip:",
)
assert len(PROMPTS) % 2 == 1, "the schedule needs an odd number of prompts"
WARMUP_RUNS = 3
RUN_TIMEOUT = 120.0  # seconds; a wedged server fails the benchmark instead of hanging it
BOOTSTRAP_RESAMPLES = 5000

PathName = Literal["direct", "rocmux"]
PATHS: tuple[PathName, PathName] = ("direct", "rocmux")


@attrs.define
class Run:
    """One streamed completion, timed on the client."""

    path: PathName
    round: int
    prompt: int
    order: int  # 0 = ran first in its pair, 1 = second
    ttft_s: float
    decode_s: float
    tokens: int  # non-empty text chunks
    completion_tokens: int | None
    server_predicted_per_second: float | None
    server_prompt_ms: float | None
    server_cache_n: int | None
    cpu_ms: float  # CPU time of the event-loop thread over the whole run
    text: str

    @property
    def decode_tps(self) -> float:
        return (self.tokens - 1) / self.decode_s if self.decode_s > 0 else float("nan")


@attrs.define
class Timer:
    """Collects token arrival times from a stream."""

    start: float
    cpu_start: float = attrs.field(factory=time.thread_time)
    first: float | None = None
    last: float | None = None
    tokens: int = 0
    parts: list[str] = attrs.field(factory=list)

    def token(self, text: str, now: float) -> None:
        if not text:
            return
        if self.first is None:
            self.first = now
        self.last = now
        self.tokens += 1
        self.parts.append(text)

    def run(
        self,
        path: PathName,
        round_: int,
        prompt: int,
        order: int,
        usage: Mapping[str, Any] | None,
        timings: Mapping[str, Any] | None,
    ) -> Run:
        if self.first is None or self.last is None:
            raise RuntimeError(f"{path}: the stream carried no text")
        return Run(
            path=path,
            round=round_,
            prompt=prompt,
            order=order,
            ttft_s=self.first - self.start,
            decode_s=self.last - self.first,
            tokens=self.tokens,
            completion_tokens=None if usage is None else int(usage["completion_tokens"]),
            server_predicted_per_second=None
            if timings is None
            else float(timings["predicted_per_second"]),
            server_prompt_ms=None if timings is None else float(timings["prompt_ms"]),
            server_cache_n=None if timings is None else int(timings.get("cache_n", 0)),
            cpu_ms=(time.thread_time() - self.cpu_start) * 1e3,
            text="".join(self.parts),
        )


# -- the two paths ----------------------------------------------------------------------


async def run_direct(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], round_: int, prompt: int, order: int
) -> Run:
    """The thinnest reasonable client: httpx, httpx_sse and json.loads."""
    timer = Timer(time.perf_counter())
    usage: Mapping[str, Any] | None = None
    timings: Mapping[str, Any] | None = None
    async with client.stream("POST", url, json=body) as response:
        response.raise_for_status()
        async for event in EventSource(response).aiter_sse():
            if event.data == "[DONE]":
                break
            chunk = json.loads(event.data)
            now = time.perf_counter()
            for choice in chunk.get("choices") or ():
                timer.token(choice.get("text") or "", now)
            usage = chunk.get("usage", usage)
            timings = chunk.get("timings", timings)
    return timer.run("direct", round_, prompt, order, usage, timings)


async def run_rocmux(
    model: ServedModel,
    prompt_text: str,
    config: GenerateConfig,
    round_: int,
    prompt: int,
    order: int,
) -> Run:
    """rocmux's streaming path, as a script uses it."""
    timer = Timer(time.perf_counter())
    usage: Mapping[str, Any] | None = None
    timings: Mapping[str, Any] | None = None
    async for tok in model.generate(prompt_text, config):
        now = time.perf_counter()
        timer.token(tok.text, now)
        if tok.usage is not None:
            usage = {"completion_tokens": tok.usage.completion_tokens}
        if tok.timings is not None:
            timings = tok.timings
    return timer.run("rocmux", round_, prompt, order, usage, timings)


# -- statistics -------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def bootstrap_ci(
    pairs: Sequence[tuple[float, float]],
    stat: Any,
    rng: np.random.Generator,
    level: float = 0.95,
) -> tuple[float, float]:
    """Percentile bootstrap CI of ``stat(a, b)``, resampling (direct, rocmux) pairs."""
    arr = np.asarray(pairs, dtype=float)
    n = len(arr)
    idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
    stats = np.array([stat(arr[i, 0], arr[i, 1]) for i in idx])
    lo, hi = np.percentile(stats, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def summarize(runs: Sequence[Run]) -> dict[str, Any]:
    by_path = {p: [r for r in runs if r.path == p] for p in PATHS}
    per_path: dict[str, dict[str, float]] = {}
    for p, rs in by_path.items():
        ttft_ms = [r.ttft_s * 1e3 for r in rs]
        tps = [r.decode_tps for r in rs]
        server = [r.server_predicted_per_second for r in rs if r.server_predicted_per_second]
        per_path[p] = {
            "runs": len(rs),
            "ttft_ms_median": pct(ttft_ms, 50),
            "ttft_ms_p90": pct(ttft_ms, 90),
            "decode_tps_median": pct(tps, 50),
            "decode_tps_p10": pct(tps, 10),
            "decode_tps_p90": pct(tps, 90),
            "server_tps_median": pct(server, 50) if server else float("nan"),
            "server_prompt_ms_median": pct(
                [r.server_prompt_ms for r in rs if r.server_prompt_ms is not None], 50
            ),
            "cpu_ms_median": pct([r.cpu_ms for r in rs], 50),
        }

    # Pair each rocmux run with the direct run of the same round and prompt.
    direct = {(r.round, r.prompt): r for r in by_path["direct"]}
    pairs = [(direct[(r.round, r.prompt)], r) for r in by_path["rocmux"]]
    ttft_pairs = [(d.ttft_s * 1e3, m.ttft_s * 1e3) for d, m in pairs]
    tps_pairs = [(d.decode_tps, m.decode_tps) for d, m in pairs]
    # Client TTFT less the server's own prompt time: what HTTP and the client add,
    # with most of the server's noise taken out.
    client_pairs = [
        (d.ttft_s * 1e3 - d.server_prompt_ms, m.ttft_s * 1e3 - m.server_prompt_ms)
        for d, m in pairs
        if d.server_prompt_ms is not None and m.server_prompt_ms is not None
    ]
    server_pairs = [
        (d.server_predicted_per_second, m.server_predicted_per_second)
        for d, m in pairs
        if d.server_predicted_per_second and m.server_predicted_per_second
    ]
    rng = np.random.default_rng(0)

    def diff_of_medians(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.median(b) - np.median(a))

    def median_of_diffs(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.median(b - a))

    def ratio_of_medians(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.median(b) / np.median(a))

    ttft_paired = median_of_diffs(*np.asarray(ttft_pairs).T)
    ttft_paired_ci = bootstrap_ci(ttft_pairs, median_of_diffs, rng)
    ttft_added = per_path["rocmux"]["ttft_ms_median"] - per_path["direct"]["ttft_ms_median"]
    ttft_added_ci = bootstrap_ci(ttft_pairs, diff_of_medians, rng)
    client_paired = median_of_diffs(*np.asarray(client_pairs).T)
    client_paired_ci = bootstrap_ci(client_pairs, median_of_diffs, rng)
    ratio = per_path["rocmux"]["decode_tps_median"] / per_path["direct"]["decode_tps_median"]
    ratio_ci = bootstrap_ci(tps_pairs, ratio_of_medians, rng)
    server_ratio = per_path["rocmux"]["server_tps_median"] / per_path["direct"]["server_tps_median"]
    server_ratio_ci = bootstrap_ci(server_pairs, ratio_of_medians, rng)
    paired_tps_ratio = float(np.median([m / d for d, m in tps_pairs]))
    cpu_pairs = [(d.cpu_ms, m.cpu_ms) for d, m in pairs]
    cpu_paired = median_of_diffs(*np.asarray(cpu_pairs).T)
    cpu_paired_ci = bootstrap_ci(cpu_pairs, median_of_diffs, rng)
    events = float(np.median([m.tokens for _, m in pairs])) + 1  # + the final event
    # The pooled TTFT distribution has one mode per prompt (prompt length sets it), so
    # its median can jump between modes; the per-prompt differences do not.
    per_prompt_added = [
        float(
            np.median([m.ttft_s for d, m in pairs if m.prompt == j])
            - np.median([d.ttft_s for d, m in pairs if d.prompt == j])
        )
        * 1e3
        for j in range(len(PROMPTS))
    ]

    def verdict(value: float, ci: tuple[float, float], ok: Any) -> dict[str, Any]:
        lo_ok, hi_ok = ok(ci[0]), ok(ci[1])
        return {
            "pass": bool(ok(value)),
            "resolved": bool(lo_ok == hi_ok),  # the whole 95% CI is on one side
        }

    return {
        "per_path": per_path,
        "pairs": len(pairs),
        "decode_tps_ratio": ratio,
        "decode_tps_ratio_ci95": ratio_ci,
        "decode_tps_ratio_paired_median": paired_tps_ratio,
        "server_tps_ratio": server_ratio,
        "server_tps_ratio_ci95": server_ratio_ci,
        "ttft_added_ms": ttft_added,
        "ttft_added_ms_ci95": ttft_added_ci,
        "ttft_paired_diff_ms_median": ttft_paired,
        "ttft_paired_diff_ms_ci95": ttft_paired_ci,
        "ttft_added_ms_per_prompt": per_prompt_added,
        "cpu_paired_diff_ms_median": cpu_paired,
        "cpu_paired_diff_ms_ci95": cpu_paired_ci,
        "cpu_added_us_per_event": cpu_paired / events * 1e3,
        "client_ms_direct_median": float(np.median([a for a, _ in client_pairs])),
        "client_ms_rocmux_median": float(np.median([b for _, b in client_pairs])),
        "client_paired_diff_ms_median": client_paired,
        "client_paired_diff_ms_ci95": client_paired_ci,
        "targets": {
            "decode_tps_ratio_min": TARGET_DECODE_RATIO,
            "ttft_added_ms_max": TARGET_TTFT_ADDED_MS,
        },
        "verdict": {
            "decode": verdict(ratio, ratio_ci, lambda x: x >= TARGET_DECODE_RATIO),
            "ttft": verdict(ttft_added, ttft_added_ci, lambda x: x <= TARGET_TTFT_ADDED_MS),
            "ttft_client": verdict(
                client_paired, client_paired_ci, lambda x: x <= TARGET_TTFT_ADDED_MS
            ),
            "ttft_paired": verdict(
                ttft_paired, ttft_paired_ci, lambda x: x <= TARGET_TTFT_ADDED_MS
            ),
        },
    }


# -- machine ----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    return {
        "nproc": usable,
        "cpu_model": cpu,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }


# -- the benchmark ----------------------------------------------------------------------


async def bench(rounds: int, n_tokens: int) -> tuple[list[Run], dict[str, Any]]:
    model = await rocmux.selection.open_model(
        None, backend="llamacpp_hip", config=LoadConfig(parallel=1, context_len=2048)
    )
    try:
        if not isinstance(model, ServedModel):
            raise TypeError(f"expected a ServedModel, got {type(model).__name__}")
        # Every run generates exactly n_tokens.
        model.request_defaults["ignore_eos"] = True
        config = GenerateConfig(max_tokens=n_tokens, temperature=0, seed=0)
        # The very body ServedModel.generate and OpenAIClient.stream build.
        bodies = [
            {**model.request_defaults, "prompt": p, **config.to_openai(), "stream": True}
            for p in PROMPTS
        ]
        url = f"{model.url}/v1/completions"
        info: dict[str, Any] = {
            "url": model.url,
            "argv": list(model.server.launch.argv) if model.server is not None else [],
            "request_body": bodies[0],
        }
        print(f"llama-server at {model.url}; body {json.dumps(bodies[0])}", file=sys.stderr)

        async with httpx.AsyncClient(
            trust_env=False, timeout=httpx.Timeout(None, connect=10.0)
        ) as client:

            async def one(r: int, slot: int) -> Run:
                # Slot s runs prompt s % P on path order[s % 2]; with P odd each prompt
                # meets both paths in a round, and no run follows a run of its own
                # prompt, so the server's prompt cache helps no run more than another.
                order = PATHS if r % 2 == 0 else PATHS[::-1]
                j, path, k = slot % len(PROMPTS), order[slot % 2], slot // len(PROMPTS)
                with anyio.fail_after(RUN_TIMEOUT):
                    if path == "direct":
                        return await run_direct(client, url, bodies[j], r, j, k)
                    return await run_rocmux(model, PROMPTS[j], config, r, j, k)

            for i in range(WARMUP_RUNS):
                for slot in range(2 * len(PROMPTS)):
                    await one(-1 - i, slot)
                print(f"warm-up {i + 1}/{WARMUP_RUNS}", file=sys.stderr)

            runs: list[Run] = []
            started = time.monotonic()
            for r in range(rounds):
                for slot in range(2 * len(PROMPTS)):
                    runs.append(await one(r, slot))
                print(
                    f"round {r + 1}/{rounds} ({time.monotonic() - started:.0f} s)",
                    file=sys.stderr,
                )
        check_outputs(runs, n_tokens)
        return runs, info
    except BaseException:
        server = getattr(model, "server", None)
        if server is not None:
            print(
                f"llama-server (exit status {server.returncode}) said, last:\n"
                f"{server.output_tail()}",
                file=sys.stderr,
            )
        raise
    finally:
        await model.close()


def check_outputs(runs: Iterable[Run], n_tokens: int) -> None:
    """Both paths must have produced the same text and N tokens, or the comparison is off."""
    texts: dict[int, set[str]] = {}
    for r in runs:
        texts.setdefault(r.prompt, set()).add(r.text)
        if r.completion_tokens is not None and r.completion_tokens != n_tokens:
            raise RuntimeError(f"{r.path} run generated {r.completion_tokens}, not {n_tokens}")
    for prompt, found in texts.items():
        if len(found) != 1:
            print(f"warning: prompt {prompt} gave {len(found)} distinct outputs", file=sys.stderr)


# -- output -----------------------------------------------------------------------------


def plot(runs: Sequence[Run], summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"direct": "#4C72B0", "rocmux": "#DD8452"}
    markers = ("o", "s", "^", "D", "v")
    fig, axes = plt.subplots(2, 2, figsize=(13, 10), constrained_layout=True)
    jitter = random.Random(0)

    def panel(ax: Any, value: Callable[[Run], float], ylabel: str, heading: str, fmt: str) -> None:
        values = {p: [value(r) for r in runs if r.path == p] for p in PATHS}
        data = [values[p] for p in PATHS]
        ax.boxplot(data, widths=0.5, showfliers=False, medianprops={"color": "black"})
        for i, p in enumerate(PATHS, start=1):
            for j in range(len(PROMPTS)):
                ys = [value(r) for r in runs if r.path == p and r.prompt == j]
                xs = [i + jitter.uniform(-0.2, 0.2) for _ in ys]
                ax.scatter(
                    xs, ys, s=14, alpha=0.55, color=colors[p], marker=markers[j % 5], zorder=3
                )
        labels = [f"{p}\nmedian {np.median(values[p]):{fmt}}" for p in PATHS]
        ax.set_xticks([1, 2], labels)
        ax.set_ylabel(ylabel)
        ax.set_title(heading)
        ax.grid(axis="y", alpha=0.3)

    panel(
        axes[0, 0],
        lambda r: r.ttft_s * 1e3,
        "time to first token (ms)",
        "TTFT per run, client clock (marker = prompt)",
        ".2f",
    )
    panel(
        axes[0, 1],
        lambda r: r.decode_tps,
        "decode rate (tokens/s)",
        "Decode tokens/s per run, client clock",
        ".1f",
    )
    panel(
        axes[1, 1],
        lambda r: r.cpu_ms,
        f"client CPU time per run of {runs[0].tokens} tokens (ms)",
        "Client CPU per run (event-loop thread)",
        ".2f",
    )

    ax = axes[1, 0]
    direct = {(r.round, r.prompt): r.ttft_s * 1e3 for r in runs if r.path == "direct"}
    diffs = np.array(
        [r.ttft_s * 1e3 - direct[(r.round, r.prompt)] for r in runs if r.path == "rocmux"]
    )
    lim = 5.0
    inside = diffs[np.abs(diffs) <= lim]
    ax.hist(inside, bins=np.linspace(-lim, lim, 41), color=colors["rocmux"], alpha=0.8)
    med = summary["ttft_paired_diff_ms_median"]
    lo, hi = summary["ttft_paired_diff_ms_ci95"]
    ax.axvspan(lo, hi, color="grey", alpha=0.25, label=f"95% CI [{lo:+.2f}, {hi:+.2f}] ms")
    ax.axvline(med, color="black", lw=2, label=f"median {med:+.2f} ms")
    ax.axvline(
        TARGET_TTFT_ADDED_MS, color="red", ls="--", label=f"target +{TARGET_TTFT_ADDED_MS} ms"
    )
    ax.set_xlim(-lim, lim)
    ax.set_xlabel("rocmux - direct TTFT, same round and prompt (ms)")
    ax.set_ylabel("pairs")
    outside = len(diffs) - len(inside)
    note = f" ({outside} pairs beyond ±{lim:g} ms not shown)" if outside else ""
    ax.set_title("Paired TTFT difference" + note)
    ax.legend(loc="upper left")

    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def docs_section(summary: dict[str, Any], meta: dict[str, Any], plot_path: Path) -> str:
    d, m = summary["per_path"]["direct"], summary["per_path"]["rocmux"]
    v = summary["verdict"]

    def word(verdict: dict[str, Any]) -> str:
        text = "PASS" if verdict["pass"] else "FAIL"
        return (
            text if verdict["resolved"] else f"{text} (within noise: the 95% CI spans the target)"
        )

    def ci(pair: Sequence[float], fmt: str) -> str:
        return f"[{pair[0]:{fmt}}, {pair[1]:{fmt}}]"

    def row(label: str, key: str, fmt: str, rel: str) -> str:
        a, b = d[key], m[key]
        change = f"{b - a:+.2f} ms" if rel == "diff" else f"{b / a:.4f}"
        return f"| {label} | {a:{fmt}} | {b:{fmt}} | {change} |"

    table = "\n".join(
        [
            "| | direct (httpx) | rocmux | rocmux vs direct |",
            "|---|---:|---:|---:|",
            row("TTFT median (ms)", "ttft_ms_median", ".2f", "diff"),
            row("TTFT p90 (ms)", "ttft_ms_p90", ".2f", "diff"),
            row("decode tok/s median", "decode_tps_median", ".1f", "ratio"),
            row("decode tok/s p10", "decode_tps_p10", ".1f", "ratio"),
            row("decode tok/s p90", "decode_tps_p90", ".1f", "ratio"),
            row("server `predicted_per_second` median", "server_tps_median", ".1f", "ratio"),
            row("server `prompt_ms` median (ms)", "server_prompt_ms_median", ".2f", "diff"),
            row("client CPU per run median (ms)", "cpu_ms_median", ".2f", "diff"),
            f"| runs | {d['runs']} | {m['runs']} | {summary['pairs']} pairs |",
        ]
    )
    per_prompt = ", ".join(f"{x:+.2f}" for x in summary["ttft_added_ms_per_prompt"])
    mach = meta["machine"]
    try:
        img = plot_path.resolve().relative_to(DOCS.parent.resolve()).as_posix()
    except ValueError:
        img = "img/overhead.png"
    return f"""{SECTION}

How much rocmux's streaming path (`ServedModel.generate` → `OpenAIClient.stream` →
`rocmux_decode_event` hook → `Token`) costs over the thinnest reasonable client
(`httpx` + `httpx_sse` + `json.loads`) posting the same body to the same llama-server.
One server ({mach["model"]}, `parallel=1`, `context_len=2048`) serves both paths;
every run is a greedy completion of exactly {meta["tokens"]} tokens (`ignore_eos`).
{meta["rounds"]} rounds x {len(PROMPTS)} short prompts x 2 paths, the order of the two
paths alternating each round (ABBA), prompts rotated so that no run follows a run of
its own prompt (the server's prompt cache favours neither path), after {WARMUP_RUNS}
warm-up rounds. TTFT is timed from just before the request;
decode rate is (tokens after the first) / (time from first to last token).

Reproduce:

```
python bench/overhead.py --rounds {meta["rounds"]} --tokens {meta["tokens"]}
```

Machine: {mach["nproc"]} CPU cores ({mach["cpu_model"]}), {mach["platform"]},
Python {mach["python"]}, llama-server CPU build; measured {mach["date"]}.
Raw runs: `bench/results/overhead.json`.

{table}

Targets: decode tokens/s at least {TARGET_DECODE_RATIO} x direct; no more than
{TARGET_TTFT_ADDED_MS} ms added to the median TTFT. 95% CIs are percentile bootstraps
over the {summary["pairs"]} (direct, rocmux) pairs; "within noise" means the CI spans the target.

- **Decode**: median rocmux / median direct = **{summary["decode_tps_ratio"]:.4f}**,
  CI {ci(summary["decode_tps_ratio_ci95"], ".4f")} (median of per-pair ratios
  {summary["decode_tps_ratio_paired_median"]:.4f}; server-reported
  {summary["server_tps_ratio"]:.4f}). **{word(v["decode"])}**.
- **Added median TTFT**, median rocmux - median direct: **{summary["ttft_added_ms"]:+.3f} ms**,
  CI {ci(summary["ttft_added_ms_ci95"], "+.3f")} ms. **{word(v["ttft"])}**.
  This statistic is fragile here: the pooled TTFTs have one mode per prompt (prompt
  length sets it), so the pooled median can sit between modes; per prompt the
  differences of medians are {per_prompt} ms.
- **Paired TTFT difference** (median over pairs of the same round and prompt):
  **{summary["ttft_paired_diff_ms_median"]:+.3f} ms**,
  CI {ci(summary["ttft_paired_diff_ms_ci95"], "+.3f")} ms. **{word(v["ttft_paired"])}**.
- TTFT less the server's own `prompt_ms` (what HTTP and the client add, most of the
  server's noise removed): medians direct {summary["client_ms_direct_median"]:.3f} ms,
  rocmux {summary["client_ms_rocmux_median"]:.3f} ms; paired difference
  **{summary["client_paired_diff_ms_median"]:+.3f} ms**,
  CI {ci(summary["client_paired_diff_ms_ci95"], "+.3f")} ms ({word(v["ttft_client"])}).
- Client CPU (event-loop thread) per run: direct {d["cpu_ms_median"]:.2f} ms,
  rocmux {m["cpu_ms_median"]:.2f} ms; paired difference
  {summary["cpu_paired_diff_ms_median"]:+.2f} ms,
  CI {ci(summary["cpu_paired_diff_ms_ci95"], "+.2f")} ms, i.e. about
  {summary["cpu_added_us_per_event"]:.0f} µs more per streamed event. On a CPU-only
  server that CPU is taken from the machine llama-server decodes on.

![Streaming overhead: TTFT and decode tokens/s, direct httpx vs rocmux]({img})
"""


def update_docs(section: str) -> None:
    """Replace this script's section of docs/benchmarks.md (or add it), keeping the rest."""
    text = DOCS.read_text() if DOCS.exists() else DOCS_INTRO
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        new = text.rstrip("\n") + "\n\n" + section
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        tail = "".join(lines[end:])
        new = "".join(lines[:start]) + section + ("\n" + tail if tail else "")
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(new)


def print_summary(summary: dict[str, Any]) -> None:
    for p in PATHS:
        s = summary["per_path"][p]
        print(
            f"{p:>7}: TTFT median {s['ttft_ms_median']:.2f} ms p90 {s['ttft_ms_p90']:.2f} ms | "
            f"decode median {s['decode_tps_median']:.1f} tok/s p90 {s['decode_tps_p90']:.1f} | "
            f"server {s['server_tps_median']:.1f} tok/s"
        )
    v = summary["verdict"]
    print(
        f"decode ratio {summary['decode_tps_ratio']:.4f} "
        f"CI {summary['decode_tps_ratio_ci95'][0]:.4f}..{summary['decode_tps_ratio_ci95'][1]:.4f}"
        f" -> {'PASS' if v['decode']['pass'] else 'FAIL'} (target >= {TARGET_DECODE_RATIO})"
    )
    print(
        f"added median TTFT {summary['ttft_added_ms']:+.3f} ms "
        f"CI {summary['ttft_added_ms_ci95'][0]:+.3f}..{summary['ttft_added_ms_ci95'][1]:+.3f}; "
        f"paired median {summary['ttft_paired_diff_ms_median']:+.3f} ms "
        f"CI {summary['ttft_paired_diff_ms_ci95'][0]:+.3f}.."
        f"{summary['ttft_paired_diff_ms_ci95'][1]:+.3f}"
        f" -> {'PASS' if v['ttft']['pass'] else 'FAIL'} (target <= {TARGET_TTFT_ADDED_MS} ms)"
    )
    print(
        f"TTFT - server prompt_ms: direct {summary['client_ms_direct_median']:.3f} ms, "
        f"rocmux {summary['client_ms_rocmux_median']:.3f} ms; paired median "
        f"{summary['client_paired_diff_ms_median']:+.3f} ms CI "
        f"{summary['client_paired_diff_ms_ci95'][0]:+.3f}.."
        f"{summary['client_paired_diff_ms_ci95'][1]:+.3f}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30, help="ABBA rounds (default 30)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per run (default 128)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help="results JSON path")
    parser.add_argument("--plot", type=Path, default=DEFAULT_PLOT, help="PNG plot path")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/benchmarks.md")
    args = parser.parse_args(argv)
    if args.rounds < 2 or args.tokens < 2:
        parser.error("--rounds and --tokens must be at least 2")

    runs, info = anyio.run(bench, args.rounds, args.tokens)
    summary = summarize(runs)
    model_name = Path(info["argv"][info["argv"].index("--model") + 1]).name
    meta = {
        "rounds": args.rounds,
        "tokens": args.tokens,
        "prompts": list(PROMPTS),
        "warmup_rounds": WARMUP_RUNS,
        "machine": {**machine(), "model": model_name},
        "server": info,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "runs": [
                    {
                        **attrs.asdict(r, filter=lambda a, _: a.name != "text"),
                        "decode_tps": r.decode_tps,
                    }
                    for r in runs
                ],
            },
            indent=2,
        )
        + "\n"
    )
    title = (
        f"rocmux streaming overhead vs direct httpx — {model_name}, {args.tokens} tokens, "
        f"{args.rounds} rounds x {len(PROMPTS)} prompts, {meta['machine']['nproc']} CPU cores"
    )
    plot(runs, summary, args.plot, title)
    if not args.no_docs:
        update_docs(docs_section(summary, meta, args.plot))
    print_summary(summary)
    print(f"wrote {args.json}, {args.plot}" + ("" if args.no_docs else f", {DOCS}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
