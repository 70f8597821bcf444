"""A small HTTP server that tests spawn as a child process in place of a runtime.

It is a test double for process supervision only (readiness, exit, signals, ports);
it generates nothing. Options make it misbehave the ways real servers do.
"""

from __future__ import annotations

import argparse
import http.server
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-after", type=float, default=0.0, help="503 until then")
    parser.add_argument("--exit-code", type=int, help="print an error and exit at once")
    parser.add_argument("--ignore-term", action="store_true")
    parser.add_argument(
        "--exit-on-term-after", type=float, help="on SIGTERM, exit 0 after this many seconds"
    )
    parser.add_argument("--grandchild", help="write the pid of a sleeping grandchild here")
    parser.add_argument("--port-taken-once", help="fail as if the port were taken, once")
    parser.add_argument("--say-ready", action="store_true", help="log a ready line")
    parser.add_argument(
        "--chatter", type=float, default=0.0, help="before listening, log for this long"
    )
    parser.add_argument(
        "--chatter-every", type=float, default=0.2, help="seconds between those log writes"
    )
    parser.add_argument(
        "--dots", action="store_true", help="chatter as dots on one line, like llama.cpp"
    )
    parser.add_argument(
        "--silent", type=float, default=0.0, help="then, before listening, say nothing this long"
    )
    args = parser.parse_args()

    print(f"test server starting on port {args.port}", flush=True)
    chatter_end = time.monotonic() + args.chatter
    while time.monotonic() < chatter_end:
        time.sleep(args.chatter_every)
        if args.dots:
            sys.stderr.write(".")
            sys.stderr.flush()
        else:
            print("loading tensors", flush=True)
    if args.dots and args.chatter:
        print("", file=sys.stderr, flush=True)
    time.sleep(args.silent)
    if args.exit_code is not None:
        print("error: failed to load model 'nope.gguf'", file=sys.stderr, flush=True)
        sys.exit(args.exit_code)
    if args.port_taken_once:
        marker = Path(args.port_taken_once)
        if not marker.exists():
            marker.write_text("1")
            print(
                f"couldn't bind HTTP server socket, port: {args.port}", file=sys.stderr, flush=True
            )
            sys.exit(1)
    if args.ignore_term:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.exit_on_term_after is not None:
        delay = args.exit_on_term_after
        signal.signal(signal.SIGTERM, lambda *_: (time.sleep(delay), os._exit(0)))
    if args.grandchild:
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        Path(args.grandchild).write_text(str(child.pid))

    ready_at = time.monotonic() + args.ready_after

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            ok = time.monotonic() >= ready_at
            body = b'{"status":"ok"}' if ok else b'{"error":"loading"}'
            self.send_response(200 if ok else 503)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer((args.host, args.port), Handler)
    if args.say_ready:
        print(f"server is listening on http://{args.host}:{args.port}", flush=True)
    print(f"pid {os.getpid()} serving", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
