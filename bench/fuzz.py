"""Coverage-guided fuzzing (atheris, libFuzzer) of the parsers that read bytes rocmux
does not control:

- ``sse``: an event-stream body -> ``httpx_sse`` -> ``rocmux.openai_dialect.decode_event``;
- ``client``: the same bytes, cut into chunks the fuzzer chooses and answered with a
  status it chooses, through ``OpenAIClient.stream`` over an ``httpx.MockTransport``
  (the whole client path a runtime's reply takes);
- ``gguf``: ``rocmux.inventory.ModelInfo.from_gguf`` on mutated GGUF headers (seeded with
  the header of a generated tiny llama; the file is padded to its original size so that
  tensor extents can be in bounds).

Each target runs in its own process for ``--seconds``. An input "crashes" when it raises
anything but the documented errors (``RocmuxError`` subclasses: ``StreamError``,
``RequestError``, ``InvalidModel``...); crashes are counted by (type, place), saved under
the work directory, and fuzzing goes on. libFuzzer's own limits also apply: an input
taking over 10 s, or memory over 2 GB, is reported as a crash and ends that target.

Needs ``pip install atheris``. Run: ``python bench/fuzz.py --seconds 120`` (a target at
a time; 6 minutes in all). Writes ``bench/results/fuzz.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_JSON = ROOT / "bench" / "results" / "fuzz.json"
TARGETS = ("sse", "client", "gguf")
SSE_SEEDS = [
    ROOT / "tests" / "data" / "llama_server_chat_stream.txt",
    ROOT / "tests" / "data" / "llama_server_completion_stream.txt",
]


# -- the targets (run in the worker process) -------------------------------------------------


def _sse_target() -> tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]:
    import atheris

    with atheris.instrument_imports():
        import httpx
        import httpx_sse
        from rocmux import openai_dialect
        from rocmux.errors import RocmuxError

    def one(data: bytes) -> None:
        response = httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data)
        for event in httpx_sse.EventSource(response).iter_sse():
            if event.data == "[DONE]":
                return
            for token in openai_dialect.decode_event(event):
                assert isinstance(token.text, str)

    return one, (RocmuxError,)


def _client_target() -> tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]:
    import atheris

    with atheris.instrument_imports():
        import httpx
        from rocmux.errors import RocmuxError
        from rocmux.manager import PluginManager
        from rocmux.openai_client import OpenAIClient

    plugins = PluginManager.discover(entry_points=False)
    loop = asyncio.new_event_loop()
    client = OpenAIClient(base_url="http://fuzz", backend="llamacpp_hip", plugins=plugins)
    loop.run_until_complete(client.http.aclose())

    class Chunks(httpx.AsyncByteStream):
        def __init__(self, chunks: list[bytes]) -> None:
            self.chunks = chunks

        async def __aiter__(self) -> AsyncIterator[bytes]:
            for chunk in self.chunks:
                yield chunk

    async def drain(handler: Callable[[httpx.Request], httpx.Response]) -> None:
        client.http = httpx.AsyncClient(
            base_url="http://fuzz", transport=httpx.MockTransport(handler)
        )
        try:
            async for token in client.stream("/v1/chat/completions", {"messages": []}):
                assert isinstance(token.text, str)
        finally:
            await client.http.aclose()

    def one(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        status = fdp.PickValueInList([200, 200, 200, 200, 400, 500, 503])
        kind = fdp.PickValueInList(
            ["text/event-stream", "text/event-stream; charset=utf-8", "application/json"]
        )
        cuts = sorted(fdp.ConsumeIntListInRange(fdp.ConsumeIntInRange(0, 8), 0, 4096))
        body = fdp.ConsumeBytes(fdp.remaining_bytes())
        bounds = [0, *[min(c, len(body)) for c in cuts], len(body)]
        chunks = [body[a:b] for a, b in itertools.pairwise(bounds)]

        def handler(request: httpx.Request) -> httpx.Response:
            return httpx.Response(status, headers={"content-type": kind}, stream=Chunks(chunks))

        loop.run_until_complete(drain(handler))

    return one, (RocmuxError,)


def _gguf_target() -> tuple[Callable[[bytes], None], tuple[type[BaseException], ...]]:
    import atheris

    with atheris.instrument_imports():
        from rocmux.errors import RocmuxError
        from rocmux.inventory import ModelInfo

    work = Path(tempfile.mkdtemp(prefix="rocmux-fuzz-gguf-", dir="/dev/shm"))
    path = work / "fuzz.gguf"
    pad = int(os.environ.get("ROCMUX_FUZZ_GGUF_SIZE", "0"))

    def one(data: bytes) -> None:
        with path.open("wb") as file:
            file.write(data)
            if pad > len(data):
                file.truncate(pad)  # sparse: tensor data may lie in bounds
        info = ModelInfo.from_gguf(path)
        assert info.n_params >= 0

    return one, (RocmuxError,)


def worker(target: str, stats_path: Path, crashes_dir: Path, libfuzzer_args: list[str]) -> None:
    import atheris

    make = {"sse": _sse_target, "client": _client_target, "gguf": _gguf_target}[target]
    one, expected = make()
    stats: dict[str, Any] = {"target": target, "executions": 0, "expected_errors": 0}
    crashes: dict[str, dict[str, Any]] = {}
    started = time.monotonic()
    last_write = [0.0]

    def write() -> None:
        stats["seconds"] = round(time.monotonic() - started, 1)
        stats["crashes"] = list(crashes.values())
        stats_path.write_text(json.dumps(stats, indent=2))

    def test_one_input(data: bytes) -> None:
        stats["executions"] += 1
        try:
            one(data)
        except expected:
            stats["expected_errors"] += 1
        except Exception as exc:  # anything else is a finding
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            key = f"{type(exc).__name__} at {Path(frame.filename).name}:{frame.lineno}"
            entry = crashes.setdefault(
                key, {"kind": key, "count": 0, "message": str(exc)[:300], "input": None}
            )
            entry["count"] += 1
            if entry["input"] is None:
                saved = crashes_dir / f"crash-{target}-{len(crashes)}"
                saved.write_bytes(data)
                entry["input"] = str(saved)
        now = time.monotonic()
        if now - last_write[0] > 1.0:
            last_write[0] = now
            write()

    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input)
    try:
        atheris.Fuzz()
    finally:
        write()


# -- the driver ---------------------------------------------------------------------------


def _seed(target: str, corpus: Path) -> int:
    """Seed inputs; returns the size to pad GGUF inputs to (0 for the others)."""
    corpus.mkdir(parents=True, exist_ok=True)
    if target in ("sse", "client"):
        for i, path in enumerate(SSE_SEEDS):
            body = path.read_bytes()
            (corpus / f"seed-{i}").write_bytes(body if target == "sse" else b"\0\0\0" + body)
        (corpus / "seed-error").write_bytes(b'data: {"error":{"message":"x"}}\n\n')
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from gguf_factory import TinyLlama, write_tiny_llama
    from rocmux.inventory import ModelInfo

    with tempfile.TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf", TinyLlama(n_vocab=300))
        data = model.read_bytes()
        info = ModelInfo.from_gguf(model)
        assert info.n_params
    # The header and tensor infos come first; the rest is tensor data.
    header = data[: min(len(data), 64 * 1024)]
    (corpus / "seed-tiny").write_bytes(header)
    return len(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=int, default=120, help="per target")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--workdir", type=Path, help="corpora and crashes (default: a temp dir)")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--stats", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--crashes", type=Path, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args()
    if args.worker:
        worker(args.worker, args.stats, args.crashes, rest)
        return

    import atheris

    work = args.workdir or Path(tempfile.mkdtemp(prefix="rocmux-fuzz-"))
    results: dict[str, Any] = {
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "atheris": getattr(atheris, "__version__", "?"),
        "seconds_per_target": args.seconds,
        "workdir": str(work),
        "targets": {},
    }
    for target in args.targets.split(","):
        corpus = work / target / "corpus"
        crashes = work / target / "crashes"
        crashes.mkdir(parents=True, exist_ok=True)
        pad = _seed(target, corpus)
        seeds = len(list(corpus.iterdir()))
        stats_path = work / target / "stats.json"
        argv = [
            sys.executable,
            __file__,
            "--worker",
            target,
            "--stats",
            str(stats_path),
            "--crashes",
            str(crashes),
            f"-max_total_time={args.seconds}",
            "-timeout=10",
            "-rss_limit_mb=2048",
            "-max_len=65536" if target == "gguf" else "-max_len=8192",
            "-print_final_stats=1",
            f"-artifact_prefix={crashes}/",
            str(corpus),
        ]
        print(f"fuzzing {target} for {args.seconds} s", flush=True)
        started = time.monotonic()
        env = {**os.environ, "ROCMUX_FUZZ_GGUF_SIZE": str(pad)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
        final = [ln for ln in done.stderr.splitlines() if ln.startswith(("stat::", "#"))]
        stats.update(
            seeds=seeds,
            corpus_after=len(list(corpus.iterdir())),
            wall_seconds=round(time.monotonic() - started, 1),
            libfuzzer_exit=done.returncode,
            libfuzzer_tail=final[-6:],
        )
        if done.returncode not in (0,):
            stats["libfuzzer_stderr_tail"] = done.stderr[-2000:]
        results["targets"][target] = stats
        print(
            f"  {stats.get('executions', 0)} executions, "
            f"{len(stats.get('crashes', []))} distinct crashes, exit {done.returncode}",
            flush=True,
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    bad = any(t.get("crashes") or t["libfuzzer_exit"] for t in results["targets"].values())
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
