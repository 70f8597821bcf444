"""Process supervision against real child processes (``sys.executable`` scripts)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anyio
import httpx
import pytest
from rocmux import hookimpl
from rocmux.errors import BinaryNotFound, ServerCrashed, StartupFailed
from rocmux.events import LifecycleEvent
from rocmux.launch import HOST, PORT, Launch
from rocmux.manager import PluginManager
from rocmux.supervisor import ServerProcess
from rocmux.testing.processes import alive

pytestmark = pytest.mark.anyio

SERVER = str(Path(__file__).parent / "servers" / "rocmux_test_server.py")


def _launch(*options: str, ready: bool = False) -> Launch:
    return Launch(
        backend="test",
        argv=[sys.executable, SERVER, "--host", HOST, "--port", PORT, *options],
        ready_pattern=re.compile("server is listening") if ready else None,
    )


class Events:
    def __init__(self) -> None:
        self.kinds: list[str] = []

    @hookimpl
    def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
        self.kinds.append(event.kind)


async def test_starts_reports_ready_and_stops():
    server = ServerProcess(_launch())
    await server.start()
    try:
        async with httpx.AsyncClient(trust_env=False) as client:
            assert (await client.get(server.url + "/health")).status_code == 200
        assert server.url.startswith("http://127.0.0.1:")
        pid = server.pid
        assert os.getpgid(pid) == pid, "the server must lead its own process group"
    finally:
        await server.stop()
    assert not alive(pid)
    await server.stop()  # idempotent


async def test_waits_while_health_says_loading():
    server = ServerProcess(_launch("--ready-after", "0.4"))
    started = time.monotonic()
    await server.start()
    try:
        assert time.monotonic() - started >= 0.4
    finally:
        await server.stop()


async def test_ready_line_in_the_log_is_acted_on():
    server = ServerProcess(_launch("--say-ready", ready=True), probe_interval=5.0)
    with anyio.fail_after(4.0):
        # The probe interval alone would wait 5 s; the log line makes it immediate.
        await server.start()
    await server.stop()


async def test_exit_before_ready_quotes_the_output():
    server = ServerProcess(_launch("--exit-code", "3"))
    with pytest.raises(StartupFailed) as info:
        await server.start()
    message = str(info.value)
    assert "exited with code 3" in message
    assert "failed to load model 'nope.gguf'" in message


async def test_deadline_is_enforced_and_the_child_is_killed():
    server = ServerProcess(_launch("--ready-after", "600"), startup_timeout=0.5)
    with pytest.raises(StartupFailed, match="not ready within 0.5 s"):
        await server.start()
    assert not alive(server.pid)


async def test_cancelled_start_leaves_no_child():
    """A load given up before it is ready (the caller's scope cancelled) kills the child."""
    events = Events()
    plugins = PluginManager()
    plugins.register(events, name="events")
    server = ServerProcess(_launch("--ready-after", "30"), plugins=plugins)
    with anyio.move_on_after(0.5) as scope:
        await server.start()
    assert scope.cancelled_caught
    assert server.pid is not None
    assert not alive(server.pid)
    assert events.kinds[0] == "spawned"
    assert not server.running


async def test_missing_executable():
    launch = Launch(backend="test", argv=["/nonexistent/server", "--port", PORT])
    with pytest.raises(BinaryNotFound, match="/nonexistent/server"):
        await ServerProcess(launch).start()


async def test_port_taken_is_retried_on_another_port(tmp_path):
    events = Events()
    plugins = PluginManager.discover(entry_points=False)
    plugins.register(events, name="events")
    server = ServerProcess(_launch("--port-taken-once", str(tmp_path / "m")), plugins=plugins)
    await server.start()
    await server.stop()
    assert events.kinds == ["spawned", "exited", "spawned", "ready", "stopped"]


async def test_sigterm_ignored_then_sigkill_of_the_whole_group(tmp_path):
    pidfile = tmp_path / "grandchild"
    server = ServerProcess(_launch("--ignore-term", "--grandchild", str(pidfile)), stop_timeout=0.3)
    await server.start()
    grandchild = int(pidfile.read_text())
    assert alive(grandchild)
    started = time.monotonic()
    await server.stop()
    assert time.monotonic() - started >= 0.3
    assert not alive(server.pid)
    with anyio.fail_after(2):
        while alive(grandchild):
            await anyio.sleep(0.01)


async def test_stop_grace_of_the_launch_overrides_the_supervisors():
    """A runtime that says it needs no grace is SIGKILLed right after SIGTERM; the
    others are given the supervisor's stop_timeout to exit by themselves."""
    graceful = ServerProcess(_launch("--exit-on-term-after", "0.2"), stop_timeout=5.0)
    await graceful.start()
    await graceful.stop()
    assert graceful.returncode == 0

    launch = _launch("--exit-on-term-after", "0.2")
    launch.stop_grace = 0.0
    impatient = ServerProcess(launch, stop_timeout=5.0)
    await impatient.start()
    await impatient.stop()
    assert impatient.returncode == -signal.SIGKILL
    assert not alive(impatient.pid)


async def test_crash_after_ready_is_reported_with_exit_status():
    events = Events()
    plugins = PluginManager.discover(entry_points=False)
    plugins.register(events, name="events")
    server = ServerProcess(_launch(), plugins=plugins)
    await server.start()
    os.kill(server.pid, signal.SIGKILL)
    await server.wait_exit(2.0)
    with pytest.raises(ServerCrashed, match="SIGKILL") as info:
        await server.check_alive()
    assert "serving" in info.value.stderr_tail
    await server.stop()
    assert events.kinds == ["spawned", "ready", "crashed"]


async def test_output_ring_buffer_keeps_the_tail():
    script = "import sys\nfor i in range(5000): print('line', i)\nsys.exit(1)"
    launch = Launch(backend="test", argv=[sys.executable, "-c", script, PORT])
    server = ServerProcess(launch, ring_lines=50)
    with pytest.raises(StartupFailed) as info:
        await server.start()
    assert "line 4999" in str(info.value)
    assert len(server.output_tail(10_000).splitlines()) == 50


def test_children_die_with_a_sigkilled_parent(tmp_path):
    """A parent killed with SIGKILL runs no cleanup; the parent-death signal must act."""
    pidfile = tmp_path / "child"
    parent_script = textwrap.dedent(
        f"""
        import anyio, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from pathlib import Path
        from rocmux.supervisor import ServerProcess
        from test_supervisor import _launch

        async def main():
            server = ServerProcess(_launch())
            await server.start()
            Path({str(pidfile)!r}).write_text(str(server.pid))
            await anyio.sleep(600)

        anyio.run(main)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_script])
    deadline = time.monotonic() + 20
    while not pidfile.exists() or not pidfile.read_text():
        assert time.monotonic() < deadline, "the parent never started its server"
        assert parent.poll() is None, "the parent died"
        time.sleep(0.02)
    child = int(pidfile.read_text())
    assert alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 5
    while alive(child):
        assert time.monotonic() < deadline, f"server {child} outlived its SIGKILLed parent"
        time.sleep(0.02)


def test_holds_listening_port_tells_the_child_s_socket_from_another_process_s():
    import socket

    from rocmux.supervisor import holds_listening_port

    if not Path("/proc/net/tcp").exists():
        pytest.skip("needs Linux /proc")
    # The leader forks and closes its copy: only a non-leader of the group holds it.
    listener = (
        "import os, socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen()\n"
        "if os.fork() == 0:\n"
        "    print(s.getsockname()[1], flush=True)\n"
        "else:\n"
        "    s.close()\n"
        "time.sleep(60)\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", listener], stdout=subprocess.PIPE, start_new_session=True
    )
    mine = socket.socket()
    try:
        assert child.stdout is not None
        port = int(child.stdout.readline())
        mine.bind(("127.0.0.1", 0))
        mine.listen()
        assert holds_listening_port(child.pid, port) is True
        assert holds_listening_port(child.pid, mine.getsockname()[1]) is False
        assert holds_listening_port(os.getpgid(0), port) is False
    finally:
        mine.close()
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
