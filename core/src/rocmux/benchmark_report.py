"""Showing ``rocmux bench`` results: the table, the comparison with an earlier run, the
plot, and progress while it runs. Everything here reads the JSON document of
``rocmux.benchmark``, so a saved run can be shown again."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs

from rocmux.errors import RocmuxError

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from rocmux.benchmark import Job


def load_document(path: Path) -> dict[str, Any]:
    """A result file written by ``rocmux bench --json``."""
    from rocmux.benchmark import check_document

    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RocmuxError(f"cannot read {path}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise RocmuxError(f"{path} is not JSON: {exc}") from None
    try:
        return check_document(doc)
    except RocmuxError as exc:
        raise RocmuxError(f"{path} is {exc}") from None


@attrs.frozen(kw_only=True)
class Row:
    """One concurrency level of one run, flattened for tables, plots and comparisons."""

    model: str
    backend: str
    setting: str
    concurrency: int | None
    level: Mapping[str, Any]
    memory: Mapping[str, Any]
    error: str | None = None

    @property
    def key(self) -> tuple[str, str, str, int | None]:
        """What identifies this row across two runs."""
        return (self.model, self.backend, self.setting, self.concurrency)

    @property
    def series(self) -> str:
        """The run this row belongs to, as a legend label."""
        parts = [self.model, self.backend] + ([self.setting] if self.setting else [])
        return " · ".join(parts)

    def metric(self, name: str) -> float | None:
        """A number of this row: a level field or ``peak_memory``."""
        if name == "peak_memory":
            return peak_memory(self.level, self.memory)[0]
        value = self.level.get(name)
        return float(value) if isinstance(value, int | float) else None


def rows(doc: Mapping[str, Any]) -> list[Row]:
    """Every level of every run; a run that failed gives one row with its error."""
    out = []
    for run in doc["runs"]:
        model = run["model"].get("file") or Path(run["model"].get("path", "?")).name
        backend = run["backend"]["name"]
        setting = run.get("setting") or ""
        memory = run.get("memory") or {}
        for level in run.get("levels", []):
            out.append(
                Row(
                    model=model,
                    backend=backend,
                    setting=setting,
                    concurrency=level["concurrency"],
                    level=level,
                    memory=memory,
                )
            )
        if run.get("error"):
            out.append(
                Row(
                    model=model,
                    backend=backend,
                    setting=setting,
                    concurrency=None,
                    level={},
                    memory=memory,
                    error=run["error"],
                )
            )
    return out


def peak_memory(level: Mapping[str, Any], memory: Mapping[str, Any]) -> tuple[int | None, str]:
    """What the run added to memory at its peak in this level, over the baseline taken
    before the model was loaded, and where: GPU memory where a GPU monitor ran and
    the GPU memory moved, else the resident memory of this process and its children
    (the runtime server, or an in-process runtime)."""
    gpu_peak, gpu_base = level.get("gpu_peak"), memory.get("gpu_baseline")
    if gpu_peak is not None and gpu_base is not None and gpu_peak - gpu_base > 64 << 20:
        return gpu_peak - gpu_base, "GPU"
    rss_peak, rss_base = level.get("rss_peak"), memory.get("rss_baseline")
    if rss_peak is None or rss_base is None:
        return None, "RSS"
    return rss_peak - rss_base, "RSS"


def human_bytes(value: float | None, mib_digits: int = 1) -> str:
    """``1.2 GiB``, ``190.3 MiB`` (``mib_digits`` decimals for MiB)."""
    if value is None:
        return "-"
    for unit in ("B", "KiB", "MiB"):
        if abs(value) < 1024:
            digits = mib_digits if unit == "MiB" else 0
            return f"{value:.{digits}f} {unit}"
        value /= 1024
    return f"{value:.2f} GiB"


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


# Other processes using this much CPU during a level make its numbers suspect: a quarter
# of a core, or a tenth of the machine's cores where there are many.
BUSY_CORES = 0.25
BUSY_SHARE = 0.1


def busy_threshold(doc: Mapping[str, Any]) -> float:
    """Cores that other processes may use during a level before it is marked."""
    cores = doc.get("environment", {}).get("cpu_count") or 1
    return max(BUSY_CORES, BUSY_SHARE * cores)


def _notes(level: Mapping[str, Any], target: int | None, busy: float = BUSY_CORES) -> str:
    notes = []
    if level.get("errors"):
        notes.append(f"{level['errors']} failed")
    if level.get("short_streams"):
        notes.append(f"{level['short_streams']} stopped early (EOS)")
    other = level.get("other_cpu_cores")
    if other is not None and other >= busy:
        notes.append(f"busy host: others used {other:.1f} cores")
    seen = level.get("prompt_tokens_seen") or []
    if target is not None and seen and seen != [target]:
        notes.append(f"prompt {'/'.join(str(s) for s in seen)} tok")
    return ", ".join(notes)


def device_label(doc: Mapping[str, Any]) -> str:
    """The GPUs, or the CPU, of the machine a document was measured on."""
    env = doc.get("environment", {})
    gpus = [g["name"] for g in env.get("gpus", [])]
    if gpus:
        return ", ".join(dict.fromkeys(gpus))
    cpu = env.get("host_cpu") or "CPU"
    count = env.get("cpu_count")
    return f"{cpu} ({count} cores)" if count else cpu


def summary_line(doc: Mapping[str, Any]) -> str:
    """Settings and machine in one line."""
    s = doc.get("settings", {})
    env = doc.get("environment", {})
    concurrency = ",".join(str(c) for c in s.get("concurrency", []))
    return (
        f"prompt {s.get('prompt_tokens')} tokens, {s.get('gen_tokens')} generated, "
        f"concurrency {concurrency}, {s.get('rounds')} round(s); {device_label(doc)}; "
        f"rocmux {env.get('rocmux')}; {doc.get('created')}"
    )


# (rich header, Markdown header) of the number columns, in order
NUMBER_COLUMNS = (
    ("conc", "concurrency"),
    ("TTFT ms\np50", "TTFT p50 (ms)"),
    ("TTFT ms\np90", "TTFT p90 (ms)"),
    ("prefill\ntok/s", "prefill tok/s"),
    ("decode\ntok/s\n/stream", "decode tok/s per stream (p50)"),
    ("total\ntok/s", "total tok/s"),
    ("peak\nmemory\nadded", "peak memory (added)"),
)


def _cells(row: Row, target: int | None, busy: float = BUSY_CORES) -> tuple[list[str], str]:
    """The number cells of a row (``NUMBER_COLUMNS``) and its notes."""
    if row.error is not None:
        return ["-"] * len(NUMBER_COLUMNS), row.error
    level = row.level
    value, kind = peak_memory(level, row.memory)
    return [
        str(row.concurrency),
        _num(level.get("ttft_ms_median")),
        _num(level.get("ttft_ms_p90")),
        _num(level.get("prefill_tps"), 0),
        _num(level.get("decode_tps_median")),
        _num(level.get("aggregate_tps")),
        f"+{human_bytes(value, 0)} {kind}" if value is not None else "-",
    ], _notes(level, target, busy)


def render_table(doc: Mapping[str, Any], console: Console) -> None:
    """The results as a rich table; numbers are never cut (names fold instead), and a
    narrow terminal loses the p90 column and the borders."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    all_rows = rows(doc)
    target = doc.get("settings", {}).get("prompt_tokens")
    with_setting = any(r.setting for r in all_rows)
    cells = [_cells(row, target, busy_threshold(doc)) for row in all_rows]
    narrow = console.width < 120
    keep = [i for i in range(len(NUMBER_COLUMNS)) if not narrow or i != 2]
    # One model: its name goes to the title rather than onto every row.
    models = list(dict.fromkeys(r.model for r in all_rows))
    one_model = len(models) == 1
    table = Table(
        title=f"rocmux bench: {models[0]}" if one_model else "rocmux bench",
        caption=summary_line(doc),
        caption_justify="left",
        box=box.SIMPLE_HEAD if narrow else box.HEAVY_HEAD,
        pad_edge=not narrow,
    )
    with_notes = any(notes for _, notes in cells)
    if not one_model:
        table.add_column("model", overflow="fold")
    table.add_column("backend", no_wrap=True, min_width=max(len(r.backend) for r in all_rows))
    if with_setting:
        table.add_column("setting", overflow="fold")
    for i in keep:
        header = NUMBER_COLUMNS[i][0]
        width = max([len(part) for part in header.split("\n")] + [len(c[0][i]) for c in cells])
        table.add_column(header, justify="right", no_wrap=True, min_width=width)
    if with_notes:
        table.add_column("notes", overflow="fold")
    for row, (numbers, notes) in zip(all_rows, cells, strict=True):
        names = ([] if one_model else [row.model]) + [row.backend]
        names += [row.setting] if with_setting else []
        style = "red" if row.error is not None else "yellow"
        table.add_row(
            *(Text(n) for n in names),
            *(Text(numbers[i]) for i in keep),
            *([Text(notes, style=style)] if with_notes else []),
        )
    console.print(table)


def markdown_table(doc: Mapping[str, Any]) -> str:
    """The results as a Markdown table (for docs)."""
    target = doc.get("settings", {}).get("prompt_tokens")
    all_rows = rows(doc)
    with_setting = any(r.setting for r in all_rows)
    names = ["model", "backend"] + (["setting"] if with_setting else [])
    head = [*names, *(md for _, md in NUMBER_COLUMNS), "notes"]
    rule = ["---"] * len(names) + ["---:"] * len(NUMBER_COLUMNS) + ["---"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(rule) + "|"]
    for row in all_rows:
        numbers, notes = _cells(row, target, busy_threshold(doc))
        parts = [row.model, row.backend] + ([row.setting] if with_setting else [])
        lines.append("| " + " | ".join([*parts, *numbers, notes]) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------- comparison

# (column, level field, True when higher is better)
COMPARED = (
    ("TTFT p50", "ttft_ms_median", False),
    ("prefill tok/s", "prefill_tps", True),
    ("decode tok/s", "decode_tps_median", True),
    ("total tok/s", "aggregate_tps", True),
    ("peak mem", "peak_memory", False),
)


def change(old: float | None, new: float | None) -> float | None:
    """Relative change in percent; ``None`` when either is missing or old is 0."""
    if old is None or new is None or old == 0:
        return None
    return (new - old) / old * 100.0


@attrs.frozen(kw_only=True)
class Compared:
    """One row in both documents (or in one of them)."""

    key: tuple[str, str, str, int | None]
    old: Row | None
    new: Row | None

    def changes(self) -> dict[str, float | None]:
        """Percent change of every compared metric."""
        if self.old is None or self.new is None:
            return {}
        return {
            field: change(self.old.metric(field), self.new.metric(field))
            for _, field, _ in COMPARED
        }


def compare(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[Compared]:
    """Rows of ``new`` matched to ``old`` by model file, backend, setting, concurrency;
    rows of only one side come last."""
    old_rows = {r.key: r for r in rows(old) if r.error is None}
    new_rows = {r.key: r for r in rows(new) if r.error is None}
    out = [Compared(key=k, old=old_rows.get(k), new=r) for k, r in new_rows.items()]
    out += [Compared(key=k, old=r, new=None) for k, r in old_rows.items() if k not in new_rows]
    return out


def settings_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Settings that differ between the two runs (the numbers then compare less well)."""
    a, b = old.get("settings", {}), new.get("settings", {})
    diffs = [
        f"{k}: {a.get(k)} -> {b.get(k)}"
        for k in ("prompt_tokens", "gen_tokens", "rounds")
        if a.get(k) != b.get(k)
    ]
    if device_label(old) != device_label(new):
        diffs.append(f"device: {device_label(old)} -> {device_label(new)}")
    return diffs


def render_compare(
    old: Mapping[str, Any], new: Mapping[str, Any], console: Console, old_name: str = "old"
) -> None:
    """A table of the new values with their change against ``old`` in percent."""
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"change against {old_name} ({old.get('created')})")
    for name in ("model", "backend", "setting", "conc"):
        table.add_column(name, overflow="fold")
    for name, _, _ in COMPARED:
        table.add_column(name, justify="right")
    for item in compare(old, new):
        model, backend, setting, conc = item.key
        cells = [Text(model), Text(backend), Text(setting), Text(str(conc))]
        if item.old is None or item.new is None:
            side = "new" if item.new is not None else old_name
            cells += [Text(f"only in {side}", style="dim")] + [Text("")] * (len(COMPARED) - 1)
            table.add_row(*cells)
            continue
        changes = item.changes()
        for _, field, higher_better in COMPARED:
            value = item.new.metric(field)
            delta = changes[field]
            shown = human_bytes(value) if field == "peak_memory" else _num(value)
            if delta is None:
                cells.append(Text(shown))
                continue
            better = delta > 0 if higher_better else delta < 0
            style = "" if abs(delta) < 2 else "green" if better else "red"
            cells.append(Text.assemble(shown, " ", (f"{delta:+.1f}%", style)))
        table.add_row(*cells)
    console.print(table)
    for diff in settings_differences(old, new):
        console.print(Text(f"note: the runs differ in {diff}", style="yellow"))


# ---------------------------------------------------------------- plot


def plot(doc: Mapping[str, Any], path: Path) -> None:
    """A PNG of aggregate tokens/s, per-stream decode tokens/s and TTFT against
    concurrency, one line per model x backend x setting (matplotlib, no display)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import FixedLocator, NullLocator
    except ImportError:
        raise RocmuxError(
            "--plot needs matplotlib: pip install 'rocmux[bench]' (or matplotlib)"
        ) from None
    series: dict[str, list[Row]] = {}
    for row in rows(doc):
        if row.error is None:
            series.setdefault(row.series, []).append(row)
    if not series:
        raise RocmuxError("nothing to plot: every run failed")
    fig = Figure(figsize=(15, 5.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    panels = (
        ("aggregate_tps", "Total throughput", "generated tokens/s (all streams)"),
        ("decode_tps_median", "Decode speed per stream", "tokens/s per stream (median)"),
        ("ttft_ms_median", "Time to first token", "TTFT, ms (median)"),
    )
    levels = sorted({r.concurrency for rs in series.values() for r in rs if r.concurrency})
    markers = "osD^vP*X"
    for ax, (field, title, ylabel) in zip(axes, panels, strict=True):
        for i, (label, rs) in enumerate(series.items()):
            points = sorted((r.concurrency, r.metric(field)) for r in rs if r.concurrency)
            xs = [x for x, y in points if y is not None]
            ys = [y for _, y in points if y is not None]
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=label, linewidth=2)
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator(levels))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([str(c) for c in levels])
        ax.set_xlabel("concurrent requests")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    s = doc.get("settings", {})
    fig.suptitle(
        f"rocmux bench on {device_label(doc)}: prompt {s.get('prompt_tokens')} tokens, "
        f"{s.get('gen_tokens')} generated per request ({doc.get('created', '')[:10]})"
    )
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(len(labels), 3), frameon=False
    )
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------- progress


def level_line(level: Mapping[str, Any]) -> str:
    """One level's results in a line."""
    parts = [
        f"c={level['concurrency']}",
        f"TTFT {_num(level.get('ttft_ms_median'))} ms",
        f"prefill {_num(level.get('prefill_tps'), 0)} tok/s",
        f"decode {_num(level.get('decode_tps_median'))} tok/s per stream",
        f"total {_num(level.get('aggregate_tps'))} tok/s",
    ]
    if level.get("errors"):
        parts.append(f"{level['errors']} failed")
    return ", ".join(parts)


class LineReporter:
    """Progress as plain lines on a console (for logs and pipes)."""

    def __init__(self, console: Console) -> None:
        self.console = console

    def phase(self, text: str) -> None:
        self.console.print(text, markup=False, highlight=False)

    def level_started(self, text: str, tokens: int) -> None:
        self.console.print(f"{text}: {tokens} tokens to generate", markup=False, highlight=False)

    def level_progress(self, tokens: int) -> None:
        pass

    def level_finished(self, job: Job, level: Mapping[str, Any]) -> None:
        self.console.print(f"  {level_line(level)}", markup=False, highlight=False)

    def job_failed(self, job: Job, error: str) -> None:
        self.console.print(f"  failed: {error}", markup=False, highlight=False, style="red")


class ProgressReporter(LineReporter):
    """A rich progress bar of the tokens of the running level, a line per level."""

    def __init__(self, console: Console) -> None:
        super().__init__(console)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def __enter__(self) -> ProgressReporter:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("tokens"),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        )
        self._progress.__enter__()
        self._task = self._progress.add_task("starting", total=None)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.__exit__(None, None, None)

    def phase(self, text: str) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text, total=None, completed=0)

    def level_started(self, text: str, tokens: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, description=text, total=tokens, completed=0)

    def level_progress(self, tokens: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.update(self._task, completed=tokens)

    def level_finished(self, job: Job, level: Mapping[str, Any]) -> None:
        label = f"{job.model.name} · {job.backend}" + (f" · {job.setting}" if job.setting else "")
        self.console.print(f"{label}: {level_line(level)}", markup=False, highlight=False)


def write_json(doc: Mapping[str, Any], path: str) -> None:
    """The document as indented JSON to ``path`` (``-``: stdout)."""
    import sys

    text = json.dumps(doc, indent=1) + "\n"
    if path == "-":
        sys.stdout.write(text)
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text, encoding="utf-8")
