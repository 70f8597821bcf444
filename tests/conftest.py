"""Shared fixtures: the real llama-server, real GGUF models, and a check that no
runtime process outlives the test session."""

from __future__ import annotations

import os
import signal
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


# Children inherit the environment, so this marks every process the session starts,
# including ones orphaned by a bug; processes of other sessions are left alone.
SESSION_MARK = f"ROCMUX_TEST_SESSION={uuid.uuid4().hex}".encode()
os.environ["ROCMUX_TEST_SESSION"] = SESSION_MARK.split(b"=", 1)[1].decode()


def _session_pids() -> set[int]:
    """Live processes (other than this one) started by this test session."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        if SESSION_MARK in environ.split(b"\0"):
            pids.add(int(entry.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_leftover_runtimes() -> Iterator[None]:
    """Fails the session if a process it started (a runtime server, a test server, a
    helper script) is still alive at its end."""
    yield
    import time

    deadline = time.monotonic() + 5.0
    while (left := _session_pids()) and time.monotonic() < deadline:
        time.sleep(0.05)
    described = {
        pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:200]
        for pid in left
        if Path(f"/proc/{pid}/cmdline").exists()
    }
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"processes left behind after the tests: {described}"


@pytest.fixture(scope="session")
def llama_server() -> Path:
    """The llama-server binary. CI builds it; a missing one fails, it is never skipped."""
    from rocmux_llamacpp_hip.binary import locate

    return locate().path


@pytest.fixture(scope="session")
def default_model() -> Path:
    from rocmux.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few-MB llama GGUF with random weights: fast to load, for counts not content."""
    from gguf_factory import TinyLlama, write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("models") / "tiny.gguf", TinyLlama())
