"""The ``rocmux`` command.

Imports stay inside the commands: ``rocmux --help`` must not pay for httpx, rich
or any plugin.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rocmux import __version__


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rocmux",
        description="Local LLM inference on AMD GPUs (ROCm) through pluggable runtimes.",
    )
    parser.add_argument("--version", action="version", version=f"rocmux {__version__}")
    parser.add_argument(
        "--backend", help="runtime to use (default: $ROCMUX_BACKEND, rocmux.toml, or detection)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("backends", help="list runtimes and whether they can run here")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("plugins", help="list installed plugins, their hooks and load errors")
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("models", help="list GGUF models: size, quantization, shape, context")
    p.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="folders or files (default: $ROCMUX_MODEL_DIR, rocmux.toml, the default model)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")

    p = sub.add_parser("devices", help="list GPUs (ROCm, NVIDIA) and the CPU, with live memory")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument(
        "--snapshot",
        type=Path,
        metavar="FILE",
        help="also write the files detection read to FILE (JSON) for a bug report; "
        "ROCMUX_SYSFS_ROOT=FILE replays it",
    )

    p = sub.add_parser("run", help="load a model and stream its answer to PROMPT")
    p.add_argument("prompt", metavar="PROMPT")
    p.add_argument("-m", "--model", help="GGUF file (default: rocmux.toml's or SmolLM2-135M)")
    p.add_argument("--backend", dest="run_backend", metavar="BACKEND", help="runtime to use")
    p.add_argument("--chat", action="store_true", help="send PROMPT as a chat message")
    p.add_argument("--system", help="system message (with --chat)")
    p.add_argument("-n", "--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, help="0 for greedy decoding")
    p.add_argument("--seed", type=int)
    p.add_argument("--ctx-size", type=int, dest="context_len", help="context length")
    p.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU")
    p.add_argument("--stats", action="store_true", help="print token counts and speed")

    p = sub.add_parser("serve", help="serve models behind one OpenAI-compatible endpoint")
    p.add_argument(
        "-m",
        "--model",
        action="append",
        type=Path,
        default=[],
        help="GGUF to offer (repeatable; default: rocmux.toml [[models]] or SmolLM2)",
    )
    p.add_argument("--host", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (default 8080)")
    p.add_argument("--max-loaded", type=int, help="models loaded at once")
    p.add_argument("--memory-budget", help="estimated memory all loaded models may use, e.g. 6GiB")
    p.add_argument("--ctx-size", type=int, dest="context_len", help="context length")
    p.add_argument("--parallel", type=int, help="parallel slots per model")

    p = sub.add_parser(
        "bench",
        help="measure TTFT, prefill, decode and total tokens/s and peak memory",
        description="Load each MODEL on each backend and stream greedy completions at each "
        "concurrency level: time to first token, prefill and decode tokens/s, total "
        "tokens/s and peak memory, with what is needed to reproduce them.",
    )
    p.add_argument(
        "models",
        nargs="*",
        type=Path,
        metavar="MODEL",
        help="GGUF files (default: rocmux.toml's model or SmolLM2-135M)",
    )
    p.add_argument(
        "-b",
        "--backend",
        dest="bench_backends",
        action="append",
        metavar="NAME[,NAME]",
        help="backends to measure (repeatable; default: the chosen or best available one)",
    )
    p.add_argument(
        "-c", "--concurrency", default="1,8,32", help="concurrent requests per level (1,8,32)"
    )
    p.add_argument("-p", "--prompt-tokens", type=int, default=512, help="prompt length (512)")
    p.add_argument("-n", "--gen-tokens", type=int, default=128, help="tokens per request (128)")
    p.add_argument("--rounds", type=int, default=1, help="batches per level (1)")
    p.add_argument(
        "--sweep",
        metavar="FIELD=V1,V2",
        help="one load per value of a load setting: flash_attn=on,off, context_len=2048,8192",
    )
    p.add_argument("--ctx-size", type=int, dest="context_len", help="context length")
    p.add_argument("--gpu-layers", type=int, help="layers to offload to the GPU")
    p.add_argument("--parallel", type=int, help="parallel slots (default: the top concurrency)")
    p.add_argument("--flash-attn", choices=("on", "off"), help="flash attention")
    p.add_argument("--threads", type=int, help="CPU threads of the runtime")
    p.add_argument("--json", dest="json_path", metavar="PATH", help="write JSON (- for stdout)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="plot against concurrency (matplotlib)")
    p.add_argument("--compare", type=Path, metavar="OLD.json", help="show the change against OLD")
    p.add_argument("--from-json", type=Path, metavar="PATH", help="show a saved run, do not run")
    p.add_argument("--no-hash", action="store_true", help="skip the SHA-256 of the model files")

    p = sub.add_parser("setup", help="install or build a runtime (e.g. `setup llamacpp_hip`)")
    p.add_argument("name", metavar="BACKEND")
    group = p.add_mutually_exclusive_group()
    for variant in ("cpu", "hip", "cuda", "vulkan"):
        group.add_argument(
            f"--{variant}",
            dest="variant",
            action="store_const",
            const=variant,
            help=f"{variant.upper()} build",
        )
    p.add_argument("--dry-run", action="store_true", help="say what would be done")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.command is None:
        _parser().print_help()
        return 0
    from rocmux.errors import RocmuxError

    try:
        code = int(_COMMANDS[args.command](args) or 0)
    except RocmuxError as exc:
        print(f"rocmux: error: {exc}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        code = 130
    selection = sys.modules.get("rocmux.selection")
    if selection is not None and selection.abandoned_detections:
        # A plugin's detection is still blocked in a thread that the interpreter would
        # wait for at exit; the answer is printed, so leave without waiting.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _cmd_backends(args: argparse.Namespace) -> int:
    import anyio

    from rocmux.manager import get_plugin_manager
    from rocmux.selection import detect_all

    plugins = get_plugin_manager()
    detected = anyio.run(detect_all, plugins)
    rows = [
        {
            "name": d.entry.name,
            "plugin": d.entry.plugin,
            "available": d.availability.ok,
            "priority": d.availability.priority,
            "version": d.availability.version,
            "devices": [dev.id for dev in d.availability.devices],
            "reason": d.availability.reason,
        }
        for d in detected
    ]
    errors = [str(e) for e in plugins.errors]
    if args.json:
        print(json.dumps({"backends": rows, "plugin_errors": errors}, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rocmux backends (best first)")
    for column in ("backend", "plugin", "available", "priority", "reason"):
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(
            row["name"],
            row["plugin"],
            "yes" if row["available"] else "no",
            str(row["priority"]),
            row["reason"],
        )
    console = Console()
    console.print(table)
    for error in errors:
        console.print(f"[red]plugin error:[/red] {error}", markup=True, highlight=False)
    return 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    from rocmux.manager import get_plugin_manager

    plugins = get_plugin_manager()
    plugins.backends()  # surfaces errors raised by register hooks
    rows: list[dict[str, Any]] = [
        {
            "name": info.name,
            "distribution": info.distribution,
            "version": info.version,
            "hooks": list(info.hooks),
            "disabled": info.disabled,
            "error": info.error,
        }
        for info in plugins.infos.values()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="rocmux plugins")
    for column in ("plugin", "distribution", "version", "hooks", "status"):
        table.add_column(column, overflow="fold")
    for row in rows:
        status = "disabled" if row["disabled"] else (row["error"] or "ok")
        table.add_row(
            row["name"],
            row["distribution"] or "",
            row["version"] or "",
            ", ".join(row["hooks"]),
            status,
        )
    Console().print(table)
    return 0


def _model_dirs(args: argparse.Namespace) -> list[Path]:
    if args.dirs:
        return list(args.dirs)
    import os

    from rocmux.config import load_config

    config = load_config()
    places = [
        Path(p).expanduser() for p in os.environ.get("ROCMUX_MODEL_DIR", "").split(os.pathsep) if p
    ]
    places += list(config.model_dirs)
    if config.model is not None:
        places.append(config.model)
    if not places:
        from rocmux.default_model import default_model_path

        places.append(default_model_path())
    return places


def _human(size: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024  # type: ignore[assignment]
    return str(size)


def _cmd_models(args: argparse.Namespace) -> int:
    from rocmux.inventory import scan

    entries = scan(_model_dirs(args))
    if args.json:
        print(json.dumps([e.to_json() for e in entries], indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GGUF models")
    for column in (
        "model",
        "arch",
        "params",
        "quant",
        "size",
        "ctx",
        "layers",
        "heads/kv",
        "embd",
        "chat",
    ):
        table.add_column(column, overflow="fold")
    console = Console()
    errors = []
    for entry in entries:
        info = entry.info
        if info is None:
            errors.append(entry)
            continue
        mix = " ".join(
            f"{t}:{n}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1])[:3]
        )
        params = info.n_params
        table.add_row(
            entry.path.name + (f" (+{info.split_count - 1} parts)" if info.split_count > 1 else ""),
            info.architecture or "?",
            f"{params / 1e9:.1f}B" if params >= 1e9 else f"{params / 1e6:.0f}M",
            f"{info.file_type or '?'} [dim]{mix}[/dim]",
            _human(info.size),
            str(info.context_length or "?"),
            str(info.block_count or "?"),
            f"{info.head_count or '?'}/{info.head_count_kv or '?'}",
            str(info.embedding_length or "?"),
            "yes" if info.has_chat_template else "no",
        )
    console.print(table)
    for entry in errors:
        console.print(f"[red]error[/red] {entry.path}: {entry.error}", highlight=False)
    return 0


def _cmd_devices(args: argparse.Namespace) -> int:
    from rocmux.devices import run_devices_command

    return run_devices_command(args.json, snapshot=args.snapshot)


def _cmd_run(args: argparse.Namespace) -> int:
    import anyio

    return anyio.run(_run_async, args)


async def _run_async(args: argparse.Namespace) -> int:
    from contextlib import aclosing

    from rich.console import Console

    from rocmux.config import load_config
    from rocmux.selection import open_model
    from rocmux.types import GenerateConfig, Message

    config = load_config()
    load = config.load
    overrides = {
        k: getattr(args, k) for k in ("context_len", "gpu_layers") if getattr(args, k) is not None
    }
    if overrides:
        import attrs

        load = attrs.evolve(load, **overrides)
    err = Console(stderr=True)
    with err.status("Loading model…", spinner="dots"):
        model = await open_model(args.model, backend=args.run_backend or args.backend, config=load)
    generate = GenerateConfig(
        max_tokens=args.max_tokens,
        temperature=args.temperature
        if args.temperature is not None
        else config.generate.temperature,
        seed=args.seed if args.seed is not None else config.generate.seed,
    )
    async with model:
        if args.chat:
            messages = [Message("system", args.system)] if args.system else []
            stream = model.chat([*messages, Message("user", args.prompt)], generate)
        else:
            stream = model.generate(args.prompt, generate)
        last = None
        async with aclosing(stream) as tokens:
            async for token in tokens:
                sys.stdout.write(token.text)
                sys.stdout.flush()
                if token.usage or token.timings:
                    last = token
        sys.stdout.write("\n")
        if args.stats and last is not None:
            t = last.timings or {}
            err.print(
                f"[dim]{last.usage.completion_tokens if last.usage else '?'} tokens, "
                f"prefill {t.get('prompt_per_second', 0):.0f} tok/s, "
                f"decode {t.get('predicted_per_second', 0):.1f} tok/s[/dim]"
            )
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import anyio
    import attrs

    from rocmux.config import load_config
    from rocmux.serve import serve

    config = load_config()
    overrides = {
        k: getattr(args, k) for k in ("context_len", "parallel") if getattr(args, k) is not None
    }
    load = attrs.evolve(config.load, **overrides) if overrides else None
    if args.backend:
        import os

        os.environ["ROCMUX_BACKEND"] = args.backend
    if args.memory_budget:
        from rocmux.config import parse_size
        from rocmux.errors import ConfigError

        try:
            budget = parse_size(args.memory_budget)
        except ValueError as exc:
            raise ConfigError(f"--memory-budget: {exc}") from None
        config = attrs.evolve(config, limits=attrs.evolve(config.limits, memory_budget=budget))
    anyio.run(
        lambda: serve(
            config,
            host=args.host,
            port=args.port,
            models=args.model,
            load=load,
            max_loaded=args.max_loaded,
        ),
        backend_options=_event_loop_options(),
    )
    return 0


def _event_loop_options() -> dict[str, object]:
    """uvloop where installed (``rocmux[serve]``): the proxy relays one chunk per token,
    and uvloop's C event loop spends a fraction of asyncio's CPU on each."""
    if os.environ.get("ROCMUX_EVENT_LOOP", "uvloop") == "asyncio":
        return {}
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return {}
    return {"use_uvloop": True}


def _cmd_bench(args: argparse.Namespace) -> int:
    from rocmux.benchmark import BenchUsageError

    try:
        return _bench(args)
    except BenchUsageError as exc:
        print(f"rocmux bench: error: {exc}", file=sys.stderr)
        return 2


def _bench(args: argparse.Namespace) -> int:
    import functools
    import importlib.util

    import anyio
    import attrs
    from rich.console import Console

    from rocmux import benchmark, benchmark_report

    # Piped output gets a wide table rather than rich's 80 columns.
    out = Console(width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
    if args.plot is not None and importlib.util.find_spec("matplotlib") is None:
        from rocmux.errors import ConfigError

        raise ConfigError("--plot needs matplotlib: pip install 'rocmux[bench]'")
    old = benchmark_report.load_document(args.compare) if args.compare else None
    if args.from_json is not None:
        doc = benchmark_report.load_document(args.from_json)
    else:
        from rocmux.config import chosen_backend, load_config
        from rocmux.models import resolve_model

        settings = benchmark.BenchSettings(
            prompt_tokens=args.prompt_tokens,
            gen_tokens=args.gen_tokens,
            concurrency=benchmark.parse_int_list(args.concurrency),
            rounds=args.rounds,
            hash_model=not args.no_hash,
        )
        sweep = benchmark.Sweep.parse(args.sweep) if args.sweep else None
        models = [resolve_model(m) for m in args.models] or [resolve_model(None)]
        names = [n.strip() for item in args.bench_backends or () for n in item.split(",")]
        backends = [n for n in dict.fromkeys(names) if n]
        if not backends:
            chosen = chosen_backend(args.backend)
            if chosen is None:
                from rocmux.selection import choose_backend

                chosen = anyio.run(choose_backend).entry.name
            backends = [chosen]
        fields = ("context_len", "gpu_layers", "parallel", "threads")
        overrides: dict[str, Any] = {k: getattr(args, k) for k in fields if getattr(args, k)}
        if args.flash_attn is not None:
            overrides["flash_attn"] = args.flash_attn == "on"
        load = attrs.evolve(load_config().load, **overrides)
        jobs = benchmark.plan_jobs(models, backends, load, settings, sweep)
        command = ["rocmux", *args.argv]
        path = args.json_path
        # Each finished job is saved at once: an interrupted run keeps what it measured.
        save = None
        if path not in (None, "-"):
            save = functools.partial(benchmark_report.write_json, path=path)
        measure = functools.partial(
            benchmark.run_benchmark, jobs, settings, command=command, on_run=save
        )
        if err.is_terminal:
            with benchmark_report.ProgressReporter(err) as reporter:
                doc = anyio.run(functools.partial(measure, reporter=reporter))
        else:
            doc = anyio.run(functools.partial(measure, reporter=benchmark_report.LineReporter(err)))
        if path is not None:
            benchmark_report.write_json(doc, path)
    table_console = err if args.json_path == "-" else out
    benchmark_report.render_table(doc, table_console)
    if old is not None:
        benchmark_report.render_compare(old, doc, table_console, old_name=args.compare.name)
    if args.plot is not None:
        benchmark_report.plot(doc, args.plot)
        err.print(f"plot written to {args.plot}", markup=False, highlight=False)
    if args.json_path not in (None, "-") and args.from_json is None:
        err.print(f"results written to {args.json_path}", markup=False, highlight=False)
    return 1 if any(run.get("error") for run in doc["runs"]) else 0


def _cmd_setup(args: argparse.Namespace) -> int:
    from rich.console import Console

    from rocmux.manager import get_plugin_manager
    from rocmux.setup import SetupRequest

    console = Console(stderr=True)
    with console.status(f"Setting up {args.name}…") as status:

        def progress(message: str) -> None:
            status.update(f"Setting up {args.name}: {message[:100]}")
            if not message.startswith("["):
                console.print(message, markup=False, highlight=False)

        request = SetupRequest(
            backend=args.name,
            variant=args.variant or "cpu",
            progress=progress,
            dry_run=args.dry_run,
        )
        handled = get_plugin_manager().setup_backend(request)
    if not handled:
        from rocmux.errors import BackendNotFound

        raise BackendNotFound(f"no installed plugin knows how to set up {args.name!r}")
    return 0


_COMMANDS = {
    "backends": _cmd_backends,
    "plugins": _cmd_plugins,
    "run": _cmd_run,
    "serve": _cmd_serve,
    "models": _cmd_models,
    "devices": _cmd_devices,
    "setup": _cmd_setup,
    "bench": _cmd_bench,
}

if __name__ == "__main__":
    sys.exit(main())
