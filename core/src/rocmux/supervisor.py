"""Supervision of runtime server processes.

A :class:`ServerProcess` spawns one server in its own process group on a free
loopback port, notices readiness quickly, keeps the tail of its output, and stops
the whole group with SIGTERM and then SIGKILL. Children are tied to this process
with ``PR_SET_PDEATHSIG`` so that they die even when it is SIGKILLed.

A model's lifetime is not lexically scoped (``load()`` returns it, ``close()`` ends
it, perhaps from another task), so the child's output is drained by a thread rather
than by a task that would need an enclosing task group.

A start fails when the server shows no progress for ``stall_timeout`` seconds: no new
output (bytes, not lines: llama.cpp draws its load progress as dots on one line) and
no health answer of 503 ("loading"). ``startup_timeout`` is an outer cap only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import IO, TYPE_CHECKING

import anyio
import attrs

from rocmux.errors import BinaryNotFound, LaunchError, ServerCrashed, StartupFailed
from rocmux.events import EventKind, LifecycleEvent

if TYPE_CHECKING:
    from rocmux.launch import Launch
    from rocmux.manager import PluginManager

_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@attrs.frozen
class StartupLimits:
    """Startup limits that the caller of a backend's ``load`` sets for the servers it
    starts (``rocmux serve`` from ``[limits]``), since ``load`` takes no such argument."""

    stall_timeout: float | None = None
    """Seconds without progress before a start fails; None: no stall check."""
    startup_timeout: float | None = None
    """A floor for the outer cap: the backend's own startup timeout is raised to it."""


startup_limits: ContextVar[StartupLimits] = ContextVar(
    "rocmux_startup_limits",
    default=StartupLimits(),  # noqa: B039 (frozen)
)

# Used when util-linux's setpriv is missing: set the parent-death signal, then exec.
_PDEATHSIG_LAUNCHER = (
    "import ctypes,os,signal,sys;"
    "ctypes.CDLL(None,use_errno=True).prctl(1,signal.SIGKILL);"
    "os.getppid()==int(sys.argv[1]) or os._exit(1);"
    "os.execvp(sys.argv[2],sys.argv[2:])"
)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` now (another process may still take it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def holds_listening_port(pgid: int, port: int) -> bool | None:
    """Whether a process of group ``pgid`` holds the socket listening on TCP ``port``;
    None where ``/proc`` cannot tell (not Linux, or another process's fds are hidden).

    A health answer alone does not prove that the server answering is the child:
    another process may have taken the port between ``free_port`` and the child's bind.
    """
    inodes: set[str] = set()
    readable = False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as rows:
                next(rows)
                for row in rows:
                    fields = row.split()
                    # state 0A is LISTEN; local address is HEX_IP:HEX_PORT
                    if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                        inodes.add(f"socket:[{fields[9]}]")
            readable = True
        except (OSError, StopIteration, IndexError, ValueError):
            continue
    if not readable:
        return None
    if not inodes:
        return False
    for pid in _group_pids(pgid):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except FileNotFoundError:
            continue
        except OSError:
            return None
        for fd in fds:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") in inodes:
                    return True
    return False


def _group_pids(pgid: int) -> Iterator[int]:
    """The leader first (it usually holds the socket), then the rest of its group."""
    yield pgid
    with contextlib.suppress(OSError):
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == pgid:
                continue
            with (
                contextlib.suppress(OSError, IndexError, ValueError),
                open(f"/proc/{entry}/stat") as stat,
            ):
                # after the command name in parentheses: state, ppid, pgrp
                if int(stat.read().rpartition(")")[2].split()[2]) == pgid:
                    yield int(entry)


def _death_tie(argv: list[str]) -> list[str]:
    """``argv`` wrapped so that the child gets SIGKILL when this process dies."""
    if not sys.platform.startswith("linux"):
        return argv
    setpriv = shutil.which("setpriv")
    if setpriv is not None:
        return [setpriv, "--pdeathsig", "KILL", "--", *argv]
    return [sys.executable, "-c", _PDEATHSIG_LAUNCHER, str(os.getpid()), *argv]


async def poll_until(predicate: Callable[[], bool], interval: float = 0.005) -> None:
    """Wait until ``predicate()`` is true.

    A child's exit and a drain thread's end are not anyio events, so they are polled;
    the interval is short because stop and restart latency add to every model swap.
    """
    while not predicate():  # noqa: ASYNC110
        await anyio.sleep(interval)


async def wait_for_exit(proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``proc`` has exited (and is reaped).

    A pidfd becomes readable the moment the process exits (Linux 5.3+), so a stop
    that precedes a load costs no polling delay; elsewhere the exit is polled.
    """
    if proc.poll() is not None:
        return
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        await poll_until(lambda: proc.poll() is not None)
        return
    try:
        while proc.poll() is None:
            with anyio.move_on_after(0.25):  # a guard, should the wakeup be missed
                await anyio.wait_readable(pidfd)
    finally:
        os.close(pidfd)


def _kill_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.kill_now()


@attrs.define(eq=False)
class ServerProcess:
    """One runtime server process, from spawn to stop."""

    launch: Launch
    plugins: PluginManager | None = None
    host: str = "127.0.0.1"
    startup_timeout: float = 120.0
    stall_timeout: float | None = None
    """Fail a start that shows no progress for this many seconds; None: never."""
    stop_timeout: float = 5.0
    port_retries: int = 5
    probe_interval: float = 0.010
    ring_lines: int = 400

    port: int | None = attrs.field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = attrs.field(default=None, init=False)
    _lines: deque[str] = attrs.field(init=False)
    _ready_line: threading.Event = attrs.field(factory=threading.Event, init=False)
    _reader: threading.Thread | None = attrs.field(default=None, init=False)
    _stopping: bool = attrs.field(default=False, init=False)
    _exit_reported: bool = attrs.field(default=False, init=False)
    _killed_because: str | None = attrs.field(default=None, init=False)
    _partial: bytes = attrs.field(default=b"", init=False)
    _last_output: float = attrs.field(default=0.0, init=False)

    @_lines.default
    def _lines_default(self) -> deque[str]:
        return deque(maxlen=self.ring_lines)

    # -- state --------------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def url(self) -> str:
        if self.port is None:
            raise LaunchError(f"the {self.launch.backend} server has not been started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def output_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines the server wrote (stdout and stderr together), with
        the unfinished last one."""
        tail = list(self._lines)
        partial = self._partial
        if partial:
            tail.append(partial.decode("utf-8", "replace").rstrip())
        return "\n".join(tail[-lines:])

    def _emit(self, kind: EventKind, **fields: object) -> None:
        if self.plugins is not None:
            event = LifecycleEvent(kind=kind, backend=self.launch.backend, pid=self.pid, **fields)
            self.plugins.lifecycle(event)

    # -- start ----------------------------------------------------------------------

    async def start(self) -> None:
        """Spawn the server and return once it answers its health check.

        Raises ``StartupFailed`` (with the tail of its output) when it exits first,
        shows no progress for ``stall_timeout`` or misses ``startup_timeout``, and
        ``BinaryNotFound`` when the executable is missing.
        """
        if self.running:
            return
        deadline = time.monotonic() + self.startup_timeout
        for _attempt in range(self.port_retries):
            self._spawn(free_port(self.host))
            try:
                await self._wait_ready(deadline)
            except StartupFailed:
                if self._lost_port_race():
                    self._emit("exited", returncode=self.returncode, detail="port taken; retrying")
                    continue
                await self.stop()
                raise
            except BaseException:
                # Cancelled (every caller gave up on the load) or broken: the child must
                # not outlive the attempt that started it. stop() is shielded.
                await self.stop()
                raise
            self._emit("ready", url=self.url)
            return
        raise StartupFailed(
            f"the {self.launch.backend} server could not bind a port on {self.host} "
            f"after {self.port_retries} attempts. Last output:\n{self.output_tail()}"
        )

    def _lost_port_race(self) -> bool:
        if self.running:
            return False
        return any(self.launch.address_in_use_pattern.search(line) for line in self._lines)

    def _spawn(self, port: int) -> None:
        if self.plugins is not None:
            self.plugins.adjust_launch(self.launch)
        self.port = port
        argv = self.launch.render(self.host, port)
        env = {**os.environ, **self.launch.env}
        # The death-tie wrapper would turn a missing binary into a bare exit 127.
        if shutil.which(argv[0]) is None:
            raise BinaryNotFound(
                f"cannot run {argv[0]!r}: no such executable. Install the runtime "
                f"(`rocmux setup {self.launch.backend}`) or point rocmux at it."
            )
        self._lines.clear()
        self._partial = b""
        self._last_output = time.monotonic()
        self._ready_line.clear()
        self._stopping = False
        self._exit_reported = False
        self._killed_because = None
        try:
            proc = subprocess.Popen(
                _death_tie(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except FileNotFoundError:
            raise BinaryNotFound(
                f"cannot run {argv[0]!r}: no such file. Install the runtime "
                f"(`rocmux setup {self.launch.backend}`) or point rocmux at it."
            ) from None
        except PermissionError:
            raise LaunchError(
                f"cannot run {argv[0]!r}: permission denied (is it executable?)"
            ) from None
        self._proc = proc
        _LIVE.add(self)
        assert proc.stdout is not None
        self._reader = threading.Thread(
            target=self._drain,
            args=(proc.stdout,),
            name=f"rocmux-drain-{proc.pid}",
            daemon=True,
        )
        self._reader.start()
        self._emit("spawned", url=self.url, detail=" ".join(argv))

    def _drain(self, stream: IO[bytes]) -> None:
        pattern = self.launch.ready_pattern
        read = getattr(stream, "read1", stream.read)
        with stream:
            # Chunks rather than lines: output without a newline (progress dots) is
            # progress too, and shows in the tail.
            while chunk := read(65536):
                self._last_output = time.monotonic()
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for raw in lines:
                    line = raw.decode("utf-8", "replace").rstrip()
                    self._lines.append(line)
                    if pattern is not None and pattern.search(line):
                        self._ready_line.set()
                if len(self._partial) > 65536:  # a runaway line: keep its end
                    self._partial = self._partial[-4096:]
            if self._partial:
                self._lines.append(self._partial.decode("utf-8", "replace").rstrip())
                self._partial = b""

    async def _wait_ready(self, deadline: float) -> None:
        import httpx

        health = self.url + self.launch.health_path
        next_probe = 0.0
        stall = self.stall_timeout
        progress = time.monotonic()
        # A stopped server accepts the connection and never answers: the probe must
        # give up well within the stall timeout.
        timeout = 2.0 if stall is None else min(2.0, max(0.05, stall / 4))
        # Plain HTTP: no TLS context, whose CA bundle takes ~50 ms to read on each load.
        async with httpx.AsyncClient(trust_env=False, timeout=timeout, verify=False) as client:
            while True:
                returncode = self.returncode
                if returncode is not None:
                    await self._join_reader()
                    raise StartupFailed(
                        f"the {self.launch.backend} server exited with code {returncode} "
                        f"before it was ready. Last output:\n{self.output_tail()}"
                    )
                now = time.monotonic()
                progress = max(progress, self._last_output)
                if now >= deadline:
                    raise StartupFailed(
                        f"the {self.launch.backend} server was not ready within "
                        f"{self.startup_timeout:g} s. Last output:\n{self.output_tail()}"
                    )
                if stall is not None and now - progress >= stall:
                    raise StartupFailed(
                        f"the {self.launch.backend} server showed no progress for {stall:g} s "
                        "while starting (no output, and its health endpoint did not answer "
                        f"'loading'), so it was stopped. Last output:\n{self.output_tail()}"
                    )
                if self._ready_line.is_set() or now >= next_probe:
                    with contextlib.suppress(httpx.TransportError):
                        status = (await client.get(health)).status_code
                        if status == 200 and self._answered_by_child():
                            return
                        if status == 503:  # "loading": alive and working on it
                            progress = time.monotonic()
                    next_probe = time.monotonic() + self.probe_interval
                # Short sleeps so a ready line in the log is acted on at once.
                await anyio.sleep(0.002)

    def _answered_by_child(self) -> bool:
        """False when the port is provably another process's (a port thief)."""
        if self._ready_line.is_set():
            return True  # the child said it listens: the bind succeeded
        proc = self._proc
        if proc is None or self.port is None:
            return True
        return holds_listening_port(proc.pid, self.port) is not False

    async def _join_reader(self) -> None:
        reader = self._reader
        if reader is not None and reader.is_alive():
            with anyio.move_on_after(1.0):
                await poll_until(lambda: not reader.is_alive())

    # -- failure ----------------------------------------------------------------------

    async def probe(self, limit: float) -> str | None:
        """Why the running server is unresponsive (its health endpoint sent nothing
        within ``limit`` seconds, or its port refuses connections), or None.

        Any answer, even an error status, means it is responsive. A bare socket, not an
        HTTP client: building one costs ~25 ms of CPU (its TLS context), and idle
        instances are probed every half second.
        """
        if not self.running or self.port is None:
            return None
        request = f"GET {self.launch.health_path} HTTP/1.0\r\nHost: {self.host}\r\n\r\n"
        with anyio.move_on_after(limit):
            try:
                async with await anyio.connect_tcp(self.host, self.port) as stream:
                    await stream.send(request.encode())
                    await stream.receive()
                return None
            except OSError as exc:
                # anyio wraps the refusal: "All connection attempts failed".
                if isinstance(exc, ConnectionRefusedError) or isinstance(
                    exc.__cause__, ConnectionRefusedError
                ):
                    # Alive but no longer listening (llama-server stuck in its shutdown).
                    return f"it refused connections on port {self.port}"
                return None
            except (anyio.EndOfStream, anyio.BrokenResourceError):
                return None
        return f"it did not answer {self.launch.health_path} within {limit:g} s"

    async def kill_hung(self, reason: str) -> None:
        """SIGKILL a server that stopped answering; ``check_alive`` then names ``reason``."""
        proc = self._proc
        if proc is None or proc.poll() is not None or self._stopping:
            return
        self._killed_because = reason
        # SIGKILL acts on a stopped (SIGSTOPped) process too; SIGTERM would stay pending.
        _kill_group(proc.pid, signal.SIGKILL)
        with anyio.CancelScope(shield=True), anyio.move_on_after(5.0):
            await wait_for_exit(proc)

    async def wait_exit(self, limit: float) -> None:
        """Wait up to ``limit`` seconds for the process to exit."""
        with anyio.move_on_after(limit):
            await poll_until(lambda: not self.running)

    async def check_alive(self) -> None:
        """Raise ``ServerCrashed`` (exit code, output tail) if the server died."""
        returncode = self.returncode
        if returncode is None or self._stopping:
            return
        await self._join_reader()
        tail = self.output_tail()
        if not self._exit_reported:
            self._exit_reported = True
            self._emit("crashed", returncode=returncode, stderr_tail=tail)
        how = f"died with {_describe_exit(returncode)}"
        if self._killed_because is not None:
            how = f"was killed ({_describe_exit(returncode)}): {self._killed_because}"
        raise ServerCrashed(
            f"the {self.launch.backend} server (pid {self.pid}) {how}. Last output:\n{tail}",
            returncode=returncode,
            stderr_tail=tail,
        )

    # -- stop ---------------------------------------------------------------------------

    async def stop(self) -> None:
        """SIGTERM the process group, wait ``stop_timeout``, then SIGKILL it. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        with anyio.CancelScope(shield=True):
            self._stopping = True
            grace = self.stop_timeout
            if self.launch.stop_grace is not None:
                grace = min(grace, self.launch.stop_grace)
            if proc.poll() is None:
                _kill_group(proc.pid, signal.SIGTERM)
                with anyio.move_on_after(grace):
                    await wait_for_exit(proc)
            # The group may hold children that outlived the leader: kill it regardless.
            _kill_group(proc.pid, signal.SIGKILL)
            await wait_for_exit(proc)
            await self._join_reader()
            _LIVE.discard(self)
            if not self._exit_reported:
                self._exit_reported = True
                self._emit("stopped", returncode=proc.returncode)

    def kill_now(self) -> None:
        """SIGKILL the group at once, without waiting (interpreter exit)."""
        proc = self._proc
        if proc is not None:
            self._stopping = True
            _kill_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
        _LIVE.discard(self)


def _describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"signal {signal.Signals(-returncode).name}"
        except ValueError:
            return f"signal {-returncode}"
    return f"exit code {returncode}"
