"""Shared fixtures: the real llama-server, real GGUF models, and a check that no
runtime process outlives the test session."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


def _runtime_pids() -> set[int]:
    """PIDs of llama-server (and test-server) processes on this machine."""
    pids: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[-1].split()[0] == "Z":
            continue
        if b"llama-server" in cmdline or b"rocmux_test_server" in cmdline:
            pids.add(int(entry.name))
    return pids


@pytest.fixture(scope="session", autouse=True)
def no_leftover_runtimes() -> Iterator[None]:
    """Fails the session if a runtime process started during it is still alive."""
    before = _runtime_pids()
    yield
    import time

    deadline = time.monotonic() + 5.0
    while (left := _runtime_pids() - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert not left, f"runtime processes left behind after the tests: {sorted(left)}"


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
