"""Random runtime faults under concurrent load against ``rocmux serve``.

``rocmux serve`` runs in this process (uvicorn on 127.0.0.1, the real pool, a real CPU
llama-server with a tiny generated llama). Every round starts ``--clients`` concurrent
clients (streaming and non-streaming completions and chats, some of which hang up
mid-stream), then injects one random fault into the runtime while they run:

- ``kill``: SIGKILL of the runtime (mid-stream when streams are open);
- ``term``: SIGTERM of the runtime (it exits on its own terms);
- ``stop``: SIGSTOP of the runtime: a hung process that still holds its port;
- ``bad_flag``: the next spawn gets an unknown flag and exits at start, then a SIGKILL
  makes the pool respawn it;
- ``oom``: the next spawn asks for a 4 GiB KV cache under a 3 GB address-space limit
  (``prlimit --as``), so llama-server fails to allocate at start, then a SIGKILL;
- ``port_taken``: the next spawn's port is one another process holds (bound and
  listening) between choice and bind, then a SIGKILL.

Checked, for every client: it gets either a whole answer (HTTP 200 with a finish
reason; a stream with a finish reason and ``[DONE]``) or a clear error (an OpenAI error
JSON with a message, or a stream whose last event is such an error), and never runs
past its deadline. After every round: the pool answers again (time to recover), and no
runtime process other than the pool's live one exists (every process this run starts
carries a marker in its environment). At the end the pool is closed and no process of
the run may remain.

Run: ``python bench/faults.py --rounds 100`` (about 10 minutes on a 2-core box); the
summary goes to ``bench/results/faults.json``. ``tests/test_reliability.py`` runs 15
rounds of the same code.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import signal
import socket
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import anyio
import attrs
import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from rocmux import hookimpl, supervisor  # noqa: E402
from rocmux.config import Limits, ModelEntry  # noqa: E402
from rocmux.launch import Launch  # noqa: E402
from rocmux.manager import PluginManager  # noqa: E402
from rocmux.pool import ModelPool  # noqa: E402
from rocmux.testing.serving import serve_in_process  # noqa: E402
from rocmux.types import LoadConfig  # noqa: E402

DEFAULT_JSON = ROOT / "bench" / "results" / "faults.json"
FAULTS = ("kill", "term", "stop", "bad_flag", "oom", "port_taken")
MARK_VAR = "ROCMUX_FAULTS_RUN"
MODEL = "tiny"


# -- processes ------------------------------------------------------------------------------


def _state(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (OSError, IndexError):
        return None


def marked_runtimes(mark: str) -> dict[int, str]:
    """Live runtime processes carrying ``mark``: pid -> state letter (R, S, T...)."""
    found: dict[int, str] = {}
    needle = f"{MARK_VAR}={mark}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        state = _state(int(entry.name))
        if state is None or state == "Z":
            continue
        if b"llama-server" in cmdline or b"prlimit" in cmdline or b"setpriv" in cmdline:
            found[int(entry.name)] = state
    return found


def live_server_pids(pool: ModelPool) -> set[int]:
    pids = set()
    for instance in pool.instances.values():
        server = getattr(instance.model, "server", None)
        if server is not None and server.running and server.pid is not None:
            pids.add(server.pid)
    return pids


# -- fault injection ------------------------------------------------------------------------


@attrs.define(eq=False)
class Injector:
    """A plugin that spoils the next spawn, and a ``free_port`` that can lie once."""

    armed: str | None = None
    held: socket.socket | None = None
    spoiled: Counter[str] = attrs.field(factory=Counter)
    _real_free_port: Callable[[str], int] = supervisor.free_port

    @hookimpl
    def rocmux_adjust_launch(self, launch: Launch) -> None:
        if self.armed == "bad_flag":
            launch.argv.append("--no-such-flag")
        elif self.armed == "oom":
            argv = launch.argv
            argv[argv.index("--ctx-size") + 1] = str(1 << 24)
            launch.argv = ["prlimit", "--as=3000000000", "--", *argv]
        else:
            return
        self.spoiled[self.armed] += 1
        self.armed = None

    def free_port(self, host: str = "127.0.0.1") -> int:
        if self.armed == "port_taken":
            self.armed = None
            self.spoiled["port_taken"] += 1
            sock = socket.socket()
            sock.bind((host, 0))
            sock.listen(1)
            # Another process got there first: bound and listening, never answering.
            if self.held is not None:
                self.held.close()
            self.held = sock
            return int(sock.getsockname()[1])
        return self._real_free_port(host)

    def close(self) -> None:
        if self.held is not None:
            self.held.close()
            self.held = None


# -- the server -----------------------------------------------------------------------------


def serving(
    model: Path, limits: Limits, plugins: PluginManager
) -> AbstractAsyncContextManager[tuple[str, ModelPool]]:
    entry = ModelEntry(
        name=MODEL, path=model, load=LoadConfig(context_len=16384, parallel=4, threads=1)
    )
    return serve_in_process([entry], limits, plugins=plugins, log_level="critical")


# -- clients --------------------------------------------------------------------------------


def _error_message(data: object) -> str | None:
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return error["message"] or None
    return None


async def one_client(
    client: httpx.AsyncClient, kind: str, i: int, deadline: float
) -> tuple[str, float, str]:
    """(outcome, seconds, detail); outcome: whole, error, left, cut, malformed, hung."""
    started = time.monotonic()
    outcome, detail = "hung", ""
    with anyio.move_on_after(deadline):
        try:
            outcome, detail = await _request(client, kind, i)
        except httpx.HTTPError as exc:
            outcome, detail = "cut", repr(exc)
    return outcome, time.monotonic() - started, detail


async def _request(client: httpx.AsyncClient, kind: str, i: int) -> tuple[str, str]:
    chat = kind.startswith("chat")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body: dict[str, Any] = {"model": MODEL, "temperature": 0, "seed": i}
    if chat:
        body["messages"] = [{"role": "user", "content": f"hello {i}"}]
    else:
        body["prompt"] = f"hello {i}"
    if kind in ("complete", "chat"):
        body["max_tokens"] = 16
        r = await client.post(path, json=body)
        if r.status_code == 200:
            choices = r.json().get("choices")
            if choices and choices[0].get("finish_reason"):
                return "whole", ""
            return "malformed", r.text[:200]
        message = _error_message(r.json())
        return ("error", f"{r.status_code} {message[:120]}") if message else ("malformed", r.text)
    body.update(stream=True, ignore_eos=True, max_tokens=random.choice((64, 1000, 3500)))
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            message = _error_message(r.json())
            if message:
                return "error", f"{r.status_code} {message[:120]}"
            return "malformed", r.text[:200]
        finish, done, last, events = None, False, None, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                continue
            last = json.loads(data)
            events += 1
            for choice in last.get("choices") or ():
                finish = choice.get("finish_reason") or finish
            if kind == "stream_leave" and events >= 3:
                return "left", ""
        message = _error_message(last)
        if message:
            return "error", f"stream: {message[:120]}"
        if finish and done:
            return "whole", ""
        return "cut", f"finish={finish} done={done} events={events}"


KINDS = ("complete", "chat", "stream", "stream", "chat_stream", "stream_leave")


# -- rounds ---------------------------------------------------------------------------------


async def inject(fault: str, pool: ModelPool, injector: Injector) -> str:
    pids = sorted(live_server_pids(pool))
    if not pids:
        return "no runtime running"
    pid = pids[0]
    if fault in ("bad_flag", "oom", "port_taken"):
        injector.armed = fault
        os.kill(pid, signal.SIGKILL)
    else:
        sig = {"kill": signal.SIGKILL, "term": signal.SIGTERM, "stop": signal.SIGSTOP}[fault]
        os.kill(pid, sig)
    return f"pid {pid}"


async def recover(client: httpx.AsyncClient, limit: float, errors: Counter[str]) -> float | None:
    """Seconds until a plain request succeeds again, or None past ``limit``; the errors
    met meanwhile (a respawn that fails at start, say) are tallied in ``errors``."""
    started = time.monotonic()
    with anyio.move_on_after(limit):
        while True:
            try:
                r = await client.post(
                    "/v1/completions", json={"model": MODEL, "prompt": "ok", "max_tokens": 2}
                )
            except httpx.HTTPError as exc:
                errors[f"transport: {type(exc).__name__}"] += 1
            else:
                if r.status_code == 200:
                    return time.monotonic() - started
                errors[_error_class(f"{r.status_code} {_error_message(r.json())}")] += 1
            await anyio.sleep(0.1)
    return None


async def run(
    model: Path,
    *,
    rounds: int,
    clients: int,
    seed: int = 0,
    deadline: float = 30.0,
    limits: Limits | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> dict[str, Any]:
    """Run the rounds; return a summary (see the module docstring)."""
    rng = random.Random(seed)
    random.seed(seed)
    mark = uuid.uuid4().hex
    os.environ[MARK_VAR] = mark
    limits = limits or Limits(
        stall_timeout=3.0, health_timeout=1.0, max_restarts=10, restart_window=10.0
    )
    injector = Injector()
    plugins = PluginManager.discover()
    plugins.register(injector, name="fault-injector")
    real_free_port = supervisor.free_port
    supervisor.free_port = injector.free_port  # type: ignore[assignment]
    outcomes: Counter[str] = Counter()
    injected: Counter[str] = Counter()
    by_fault: dict[str, Counter[str]] = {f: Counter() for f in FAULTS}
    failures: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    recovery_errors: Counter[str] = Counter()
    recoveries: list[float] = []
    durations: list[float] = []
    orphans: list[dict[str, Any]] = []
    unrecovered = 0
    started = time.monotonic()
    try:
        async with (
            serving(model, limits, plugins) as (url, pool),
            httpx.AsyncClient(base_url=url, timeout=None, trust_env=False) as client,
        ):
            first = await recover(client, 120, Counter())
            assert first is not None, "the model never loaded"
            # Random order, but every fault as often as the others (give or take one).
            plan = [
                f for _ in range(rounds // len(FAULTS) + 1) for f in rng.sample(FAULTS, len(FAULTS))
            ]
            for n in range(rounds):
                fault = plan[n]
                injected[fault] += 1
                kinds = [rng.choice(KINDS) for _ in range(clients)]
                results: list[tuple[str, float, str]] = []

                async def go(kind: str, i: int, results: list[tuple[str, float, str]]) -> None:
                    results.append(await one_client(client, kind, i, deadline))

                async with anyio.create_task_group() as tg:
                    for i, kind in enumerate(kinds):
                        tg.start_soon(go, kind, n * clients + i, results)
                    await anyio.sleep(rng.uniform(0.02, 0.4))
                    target = await inject(fault, pool, injector)
                for (outcome, seconds, detail), kind in zip(results, kinds, strict=True):
                    outcomes[outcome] += 1
                    by_fault[fault][outcome] += 1
                    durations.append(seconds)
                    if outcome == "error":
                        errors[_error_class(detail)] += 1
                    if outcome not in ("whole", "error", "left"):
                        failures.append(
                            dict(round=n, fault=fault, kind=kind, outcome=outcome, detail=detail)
                        )
                seconds = await recover(client, 60, recovery_errors)
                injector.armed = None
                if seconds is None:
                    unrecovered += 1
                else:
                    recoveries.append(seconds)
                live = live_server_pids(pool)
                extra = {p: s for p, s in marked_runtimes(mark).items() if p not in live}
                if extra:
                    # A process on its way out may need a moment to be reaped.
                    await anyio.sleep(1.0)
                    live = live_server_pids(pool)
                    extra = {p: s for p, s in marked_runtimes(mark).items() if p not in live}
                if extra:
                    orphans.append({"round": n, "fault": fault, "processes": extra})
                counts = Counter(r[0] for r in results)
                tally = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                log(
                    f"round {n + 1:3d}/{rounds} {fault:10s} {target:12s} {tally}; "
                    f"recovered in {seconds if seconds is None else round(seconds, 2)} s"
                )
            instances = [i.describe() for i in pool.instances.values()]
    finally:
        supervisor.free_port = real_free_port  # type: ignore[assignment]
        injector.close()
    with anyio.move_on_after(10):
        while marked_runtimes(mark):
            await anyio.sleep(0.1)
    left_at_end = marked_runtimes(mark)
    durations.sort()
    return {
        "rounds": rounds,
        "clients_per_round": clients,
        "seed": seed,
        "client_deadline_s": deadline,
        "limits": {
            "stall_timeout": limits.stall_timeout,
            "health_timeout": limits.health_timeout,
            "max_restarts": limits.max_restarts,
            "restart_window": limits.restart_window,
        },
        "faults": dict(injected),
        "outcomes": dict(outcomes),
        "outcomes_by_fault": {f: dict(c) for f, c in by_fault.items() if c},
        "error_classes": dict(errors),
        "recovery_error_classes": dict(recovery_errors),
        "failures": failures[:50],
        "failure_count": len(failures),
        "hung": outcomes["hung"],
        "client_seconds_max": round(durations[-1], 3) if durations else None,
        "client_seconds_p99": round(durations[int(0.99 * (len(durations) - 1))], 3)
        if durations
        else None,
        "recover_seconds_max": round(max(recoveries), 3) if recoveries else None,
        "recover_seconds_median": round(sorted(recoveries)[len(recoveries) // 2], 3)
        if recoveries
        else None,
        "unrecovered_rounds": unrecovered,
        "spawns_spoiled": dict(injector.spoiled),
        "orphans_during": orphans,
        "left_at_end": left_at_end,
        "final_instances": instances,
        "seconds": round(time.monotonic() - started, 1),
    }


def _error_class(detail: str) -> str:
    """A short label for an error message, for the tally."""
    text = detail.lower()
    for needle, label in (
        ("no-such-flag", "start failed: bad flag"),
        ("failed to allocate", "start failed: out of memory"),
        ("could not bind", "start failed: port"),
        ("before it was ready", "start failed"),
        ("crashed", "restart limit"),
        ("sent nothing for", "stall timeout (hung runtime)"),
        ("was killed", "killed as hung"),
        ("sigkill", "runtime died: SIGKILL"),
        ("sigterm", "runtime died: SIGTERM"),
        ("exit code", "runtime exited"),
        ("lost the connection", "connection lost"),
        ("overloaded", "overloaded (503)"),
        ("loading", "still loading (503)"),
    ):
        if needle in text:
            return label
    return detail[:60]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=30.0, help="per-client seconds")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()

    from gguf_factory import TinyLlama, write_tiny_llama

    with __import__("tempfile").TemporaryDirectory() as tmp:
        model = write_tiny_llama(Path(tmp) / "tiny.gguf", TinyLlama())
        summary = anyio.run(
            lambda: run(
                model,
                rounds=args.rounds,
                clients=args.clients,
                seed=args.seed,
                deadline=args.deadline,
                log=lambda line: print(line, flush=True),
            )
        )
    summary["when"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    summary["machine"] = f"{platform.machine()}, {os.cpu_count()} CPUs"
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps({k: v for k, v in summary.items() if k != "final_instances"}, indent=2))
    ok = (
        not summary["failure_count"]
        and not summary["unrecovered_rounds"]
        and not summary["orphans_during"]
        and not summary["left_at_end"]
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
