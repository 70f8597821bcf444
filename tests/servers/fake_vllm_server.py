"""STAND-IN for ``vllm serve``: not vLLM, no model, no GPU.

It imitates the outside of vLLM's OpenAI-compatible server closely enough to test
rocmux's ``vllm_rocm`` plugin where vLLM cannot run (no ROCm GPU, vLLM not installed):

- the command line: ``serve MODEL --host H --port P ...`` parsed by argparse with real
  ``vllm serve`` flag names (a subset of vllm/engine/arg_utils.py and
  vllm/entrypoints/openai/cli_args.py); an unknown flag exits 2 as argparse does;
  ``serve --help`` lists option groups only and ``serve --help=all`` every flag, as
  vLLM 0.10 and later do (``FAKE_VLLM_HELP_STYLE=legacy``: the older behaviour, where
  ``--help`` prints every flag and ``--help=all`` is an error);
- the log lines uvicorn prints at startup (``Application startup complete.``);
- the endpoints ``/health`` (200, empty body), ``/v1/models``, ``/metrics``
  (``vllm:num_requests_running``) and streaming ``/v1/completions`` and
  ``/v1/chat/completions`` in vLLM's chunk format, with the final usage chunk when
  ``stream_options.include_usage`` is set.

The text it "generates" is a fixed sentence, one word per token. Environment variables
make it misbehave:

- ``FAKE_VLLM_TOKEN_DELAY``: seconds between tokens (default 0.002);
- ``FAKE_VLLM_LOAD_SECONDS``: wait this long before listening, like weight loading;
- ``FAKE_VLLM_FAIL_AT_START``: print an engine error and exit 1 before listening;
- ``FAKE_VLLM_CRASH_AFTER`` (tokens) with ``FAKE_VLLM_CRASH_MARKER`` (a file): die
  mid-stream with exit code 1 after an EngineCore error, once (the marker records it);
- ``FAKE_VLLM_RECORD``: append JSON lines with the argv, the GPU environment and every
  request body to this file.

Standard library only (http.server and threads).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

VERSION = "0.0.0+stand-in"
SENTENCE = "Hello from the stand-in vLLM server, which generates this one sentence."
GROUPS = {
    "Frontend": "Arguments for the OpenAI-compatible frontend server.",
    "ModelConfig": "Configuration for the model.",
    "ParallelConfig": "Configuration for the distributed execution.",
    "CacheConfig": "Configuration for the KV cache.",
    "SchedulerConfig": "Scheduler configuration.",
}


def build_parser() -> argparse.ArgumentParser:
    """A parser with real ``vllm serve`` flag names, grouped as vLLM groups them."""
    parser = argparse.ArgumentParser(
        prog="vllm serve",
        usage="vllm serve [model_tag] [options]",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        # Like vLLM's own: its JSON tip is indented by three spaces.
        epilog=(
            "When passing JSON CLI arguments, the following sets of arguments are "
            'equivalent:\n   --json-arg \'{"key1": "value1"}\'\n   --json-arg.key1 value1'
        ),
    )
    parser.add_argument("model_tag", nargs="?", default="Qwen/Qwen3-0.6B")
    parser.add_argument("--headless", action="store_true")
    parser.add_argument("--api-server-count", "-asc", type=int, default=None)
    parser.add_argument("--config", default=None, help="Read CLI options from a config file.")
    front = parser.add_argument_group("Frontend", GROUPS["Frontend"])
    front.add_argument("--host", default=None, help="Host name.")
    front.add_argument("--port", type=int, default=8000, help="Port number.")
    front.add_argument("--uds", default=None, help="Unix domain socket path.")
    front.add_argument("--api-key", nargs="+", default=None)
    front.add_argument("--chat-template", default=None)
    front.add_argument(
        "--tool-call-parser",
        metavar="{hermes,llama3_json,mistral} or name registered in --tool-parser-plugin",
        default=None,
    )
    front.add_argument("--tool-parser-plugin", default="")
    front.add_argument("--enable-auto-tool-choice", action=argparse.BooleanOptionalAction)
    front.add_argument(
        "--uvicorn-log-level",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
        default="info",
    )
    model = parser.add_argument_group("ModelConfig", GROUPS["ModelConfig"])
    model.add_argument("--model", default=None, help="Name or path of the model to use.")
    model.add_argument("--served-model-name", nargs="+", default=None)
    model.add_argument("--tokenizer", default=None)
    model.add_argument("--trust-remote-code", action=argparse.BooleanOptionalAction)
    model.add_argument(
        "--dtype",
        choices=["auto", "bfloat16", "float", "float16", "float32", "half"],
        default="auto",
    )
    model.add_argument("--max-model-len", type=int, default=None, help="Model context length.")
    model.add_argument("--quantization", "-q", default=None)
    model.add_argument(
        "--enforce-eager",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="Always use eager-mode PyTorch.",
    )
    model.add_argument("--seed", type=int, default=0)
    model.add_argument("--generation-config", default="auto")
    model.add_argument("--hf-overrides", default=None)
    parallel = parser.add_argument_group("ParallelConfig", GROUPS["ParallelConfig"])
    parallel.add_argument("--tensor-parallel-size", "-tp", type=int, default=1)
    parallel.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1)
    parallel.add_argument("--data-parallel-size", "-dp", type=int, default=1)
    parallel.add_argument(
        "--distributed-executor-backend",
        choices=["external_launcher", "mp", "ray", "uni"],
        default=None,
    )
    cache = parser.add_argument_group("CacheConfig", GROUPS["CacheConfig"])
    cache.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    cache.add_argument("--kv-cache-dtype", default="auto")
    cache.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction)
    cache.add_argument("--block-size", type=int, default=None)
    sched = parser.add_argument_group("SchedulerConfig", GROUPS["SchedulerConfig"])
    sched.add_argument("--max-num-seqs", type=int, default=None)
    sched.add_argument("--max-num-batched-tokens", type=int, default=None)
    sched.add_argument("--compilation-config", "-O", default=None)
    return parser


def compact_help() -> str:
    """What ``vllm serve --help`` prints since vLLM 0.10: the groups, not the flags."""
    lines = [
        "usage: vllm serve [model_tag] [options]",
        "",
        "Search by using: `--help=<ConfigGroup>` to explore options by section",
        "  Use `--help=all` to show all available flags at once.",
        "",
        "Config Groups:",
    ]
    lines += [f"  {name:<16}{text}" for name, text in GROUPS.items()]
    lines += ["", "For full list:            vllm serve --help=all"]
    return "\n".join(lines)


def normalize(argv: list[str]) -> list[str]:
    """vLLM's ``FlexibleArgumentParser`` rewrites: underscores to dashes before the first
    dot, ``--flag.key value`` to the JSON flag, ``-O3`` to ``-O 3``."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg.partition("=")
            key = "--" + key[2:].split(".", 1)[0].replace("_", "-")
            out.append(key + eq + value)
        elif arg.startswith("-O") and arg != "-O":
            out += ["-O", arg[2:].lstrip("=")]
        else:
            out.append(arg)
    return out


def record(entry: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_VLLM_RECORD")
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")


def log(message: str) -> None:
    print(message, flush=True)


class State:
    """What the handlers share: the served names and the requests in flight."""

    def __init__(self, names: list[str], root: str, max_model_len: int) -> None:
        self.names = names
        self.root = root
        self.max_model_len = max_model_len
        self.running = 0
        self.lock = threading.Lock()
        self.token_delay = float(os.environ.get("FAKE_VLLM_TOKEN_DELAY", "0.002"))
        crash = os.environ.get("FAKE_VLLM_CRASH_AFTER")
        self.crash_after = int(crash) if crash else None
        self.crash_marker = os.environ.get("FAKE_VLLM_CRASH_MARKER")


def make_handler(state: State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            pass

        def _json(self, status: int, body: object) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _error(self, status: int, message: str, kind: str, param: str | None = None) -> None:
            self._json(
                status,
                {"error": {"message": message, "type": kind, "param": param, "code": status}},
            )

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                created = int(time.time())
                data = [
                    {
                        "id": name,
                        "object": "model",
                        "created": created,
                        "owned_by": "vllm",
                        "root": state.root,
                        "parent": None,
                        "max_model_len": state.max_model_len,
                    }
                    for name in state.names
                ]
                self._json(200, {"object": "list", "data": data})
            elif self.path == "/metrics":
                body = (
                    "# TYPE vllm:num_requests_running gauge\n"
                    f'vllm:num_requests_running{{model_name="{state.names[0]}"}} '
                    f"{float(state.running)}\n"
                ).encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain; version=0.0.4")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self._error(404, "Not Found", "NotFoundError")

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", "0"))
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
            except json.JSONDecodeError as exc:
                self._error(400, f"invalid JSON: {exc}", "BadRequestError")
                return
            record({"path": self.path, "body": body})
            if self.path not in ("/v1/completions", "/v1/chat/completions"):
                self._error(404, "Not Found", "NotFoundError")
                return
            model = body.get("model")
            if model is not None and model not in state.names:
                self._error(404, f"The model `{model}` does not exist.", "NotFoundError", "model")
                return
            if not body.get("stream"):
                self._error(400, "the stand-in serves streaming requests only", "BadRequestError")
                return
            self._stream(body, self.path == "/v1/chat/completions", model or state.names[0])

        def _chunk(self, payload: str) -> None:
            data = payload.encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()

        def _event(self, obj: object) -> None:
            self._chunk(f"data: {json.dumps(obj)}\n\n")

        def _maybe_crash(self, sent: int) -> None:
            if state.crash_after is None or sent < state.crash_after:
                return
            marker = Path(state.crash_marker) if state.crash_marker else None
            if marker is not None and marker.exists():
                return
            if marker is not None:
                marker.write_text("crashed")
            log("ERROR [core.py] EngineCore encountered a fatal error (stand-in crash).")
            os._exit(1)

        def _stream(self, body: dict[str, Any], chat: bool, model: str) -> None:
            words = SENTENCE.split(" ")
            pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
            max_tokens = body.get("max_tokens") or 16
            ignore_eos = bool(body.get("ignore_eos"))
            usage_on = bool((body.get("stream_options") or {}).get("include_usage"))
            prompt = (
                " ".join(str(m.get("content", "")) for m in body.get("messages", []))
                if chat
                else str(body.get("prompt", ""))
            )
            rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
            created = int(time.time())
            kind = "chat.completion.chunk" if chat else "text_completion"

            def chunk(text: str | None, finish: str | None, first: bool = False) -> dict[str, Any]:
                if chat:
                    delta: dict[str, Any] = {"content": text or ""}
                    if first:
                        delta = {"role": "assistant", "content": ""}
                    choice: dict[str, Any] = {
                        "index": 0,
                        "delta": delta,
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                else:
                    choice = {
                        "index": 0,
                        "text": text or "",
                        "logprobs": None,
                        "finish_reason": finish,
                    }
                if finish is not None:
                    choice["stop_reason"] = None
                return {"id": rid, "object": kind, "created": created, "model": model,
                        "choices": [choice]}  # fmt: skip

            self.send_response(200)
            self.send_header("content-type", "text/event-stream; charset=utf-8")
            self.send_header("transfer-encoding", "chunked")
            self.end_headers()
            with state.lock:
                state.running += 1
            sent = 0
            try:
                if chat:
                    self._event(chunk(None, None, first=True))
                while sent < max_tokens:
                    piece = pieces[sent % len(pieces)]
                    sent += 1
                    # The sentence's last word is the end of sequence, unless ignored.
                    eos = sent % len(pieces) == 0 and not ignore_eos
                    done = eos or sent >= max_tokens
                    self._event(chunk(piece, ("stop" if eos else "length") if done else None))
                    self._maybe_crash(sent)
                    if done:
                        break
                    time.sleep(state.token_delay)
                if usage_on:
                    prompt_tokens = len(prompt.split())
                    usage = {
                        "prompt_tokens": prompt_tokens,
                        "total_tokens": prompt_tokens + sent,
                        "completion_tokens": sent,
                    }
                    final = {"id": rid, "object": kind, "created": created, "model": model,
                             "choices": [], "usage": usage}  # fmt: skip
                    self._event(final)
                self._chunk("data: [DONE]\n\n")
                self.wfile.write(b"0\r\n\r\n")
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                # The client left: vLLM aborts the request; so does the stand-in.
                self.close_connection = True
            finally:
                with state.lock:
                    state.running -= 1

    return Handler


def serve(argv: list[str]) -> None:
    parser = build_parser()
    legacy = os.environ.get("FAKE_VLLM_HELP_STYLE") == "legacy"
    if "--help=all" in argv:
        if legacy:
            parser.error("argument -h/--help: ignored explicit argument 'all'")
        print(parser.format_help())
        return
    if "--help" in argv or "-h" in argv:
        print(parser.format_help() if legacy else compact_help())
        return
    args = parser.parse_args(normalize(argv))
    model = args.model or args.model_tag
    names = args.served_model_name or [model]
    record(
        {
            "argv": sys.argv[1:],
            "env": {k: os.environ.get(k) for k in ("HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")},
        }
    )
    log(f"INFO [api_server.py] vLLM API server version {VERSION}")
    log(f"INFO [utils.py] non-default args: {vars(args)}")
    if os.environ.get("FAKE_VLLM_FAIL_AT_START"):
        log("ERROR [core.py] EngineCore failed to start: HIP out of memory (stand-in failure)")
        sys.exit(1)
    if not Path(model).exists():
        log(f"ERROR OSError: {model} is not a local folder and the stand-in cannot download")
        sys.exit(1)
    time.sleep(float(os.environ.get("FAKE_VLLM_LOAD_SECONDS", "0")))
    state = State(names, model, args.max_model_len or 4096)
    server = ThreadingHTTPServer((args.host or "0.0.0.0", args.port), make_handler(state))
    server.daemon_threads = True
    log(f"INFO [api_server.py] Starting vLLM API server 0 on http://{args.host}:{args.port}")
    log(f"INFO:     Started server process [{os.getpid()}]")
    log("INFO:     Waiting for application startup.")
    log("INFO:     Application startup complete.")
    server.serve_forever()


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] in (["--version"], ["-v"]):
        print(VERSION)
        return
    if argv[:1] != ["serve"]:
        print("usage: vllm [-h] [-v] {serve} ... (the stand-in knows only serve)", file=sys.stderr)
        sys.exit(2)
    serve(argv[1:])


if __name__ == "__main__":
    main()
