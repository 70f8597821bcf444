"""The backend conformance suite (``rocmux.testing``) run against every backend of the
workspace, and the suite itself checked against backends that break its rules.

Per backend:

- llamacpp_hip: run, on the tiny model, against the real llama-server.
- remote (examples/rocmux-remote): run against a llama-server this file starts, with
  an API key; its crash check kills that server.
- hip_direct: run when its detection (the one `rocmux backends` runs) says it is
  available; else every check but detection is skipped as "not run" with its reason.
- vllm_rocm: vLLM is not installed here, so the same: not run, with vLLM's reason.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from rocmux.backend import Backend, TextModel
from rocmux.supervisor import free_port
from rocmux.testing import BackendConformance
from rocmux.types import LoadConfig

pytest_plugins = ["pytester"]

ROOT = Path(__file__).parent.parent
API_KEY = "sk-conformance"


async def _slots_busy(url: str, api_key: str | None = None) -> bool:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(trust_env=False, headers=headers) as client:
        slots = (await client.get(f"{url}/slots")).json()
    return any(slot.get("is_processing") for slot in slots)


# -- llamacpp_hip ------------------------------------------------------------------------------


@pytest.mark.llama_server
class TestLlamaCppHip(BackendConformance):
    backend_name = "llamacpp_hip"
    load_config = LoadConfig(context_len=4096, parallel=2)

    @pytest.fixture
    def conformance_model_path(self, tiny_model: Path) -> Path:
        return tiny_model

    async def conformance_busy(self, model: TextModel) -> bool | None:
        return await _slots_busy(model.url)  # type: ignore[attr-defined]


# -- remote, in front of a llama-server started here ------------------------------------------


class RemoteServer:
    """A llama-server standing in for a server on another host."""

    def __init__(self, binary: Path, model: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        argv = [
            str(binary),
            *("--model", str(model), "--host", "127.0.0.1", "--port", str(self.port)),
            *("--ctx-size", "4096", "--parallel", "2", "--api-key", API_KEY, "--no-webui"),
        ]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(trust_env=False, timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                try:
                    if client.get(f"{self.url}/health").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"llama-server did not start: {self.log.read_text()[-2000:]}")

    def kill(self) -> None:
        """SIGKILL and reap it (a crash of the remote end)."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


@pytest.fixture
def remote_server(llama_server: Path, tiny_model: Path, tmp_path: Path) -> Iterator[RemoteServer]:
    server = RemoteServer(llama_server, tiny_model, tmp_path / "llama-server.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.kill()


@pytest.mark.llama_server
class TestRemote(BackendConformance):
    backend_name = "remote"

    @pytest.fixture
    def conformance_backend(self, remote_server: RemoteServer) -> Backend:
        from rocmux_remote.backend import RemoteBackend

        self.server = remote_server
        return RemoteBackend(url=remote_server.url, api_key=API_KEY)

    @pytest.fixture
    def conformance_model_path(self, tiny_model: Path) -> Path:
        return tiny_model  # a label only: the remote end chose its model

    def conformance_kill(self, model: TextModel) -> bool:
        self.server.kill()
        return True

    async def conformance_busy(self, model: TextModel) -> bool | None:
        return await _slots_busy(self.server.url, API_KEY)


def test_the_remote_plugin_s_own_tests_pass():
    """The example distribution's tests (settings, detection reasons, errors), as its
    author runs them; its conformance class is the one above, so it is left out."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-k",
            "not Conformance",
            str(ROOT / "examples" / "rocmux-remote" / "tests"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " passed" in done.stdout


# -- hip_direct and vllm_rocm: run where detection says they can -----------------------------


class TestHipDirect(BackendConformance):
    """Run only when hip_direct's detection says it is available here (a PyTorch
    build is installed); otherwise skipped as "not run" with its own reason."""

    backend_name = "hip_direct"
    load_config = LoadConfig(context_len=512, parallel=2)

    @pytest.fixture
    def conformance_model_path(self, tiny_model: Path) -> Path:
        return tiny_model


class TestVllmRocm(BackendConformance):
    """vLLM is not installed on the test machines: every check but detection is
    skipped as "not run" with vllm_rocm's reason. Skips are not passes."""

    backend_name = "vllm_rocm"

    @pytest.fixture
    def conformance_model_path(self, tiny_model: Path) -> Path:
        return tiny_model


# -- the suite fails backends that break the contract ---------------------------------------

BROKEN_BACKENDS = textwrap.dedent(
    """
    from collections.abc import AsyncIterator
    from pathlib import Path
    from typing import ClassVar

    import pytest
    from rocmux.backend import Backend, TextModel
    from rocmux.testing import BackendConformance
    from rocmux.types import Availability, Token


    class Sloppy(TextModel):
        # No finish reason, close() raises the second time, works after close.
        def __init__(self):
            self.closes = 0

        async def _words(self):
            for word in ("a", "b", "c"):
                yield Token(word)

        def generate(self, prompt, config=None):
            return self._words()

        def chat(self, messages, config=None):
            return self._words()

        def err(self):
            return None

        async def close(self):
            self.closes += 1
            if self.closes > 1:
                raise RuntimeError("already closed")


    class SloppyBackend(Backend):
        name: ClassVar[str] = "sloppy"

        async def detect(self):
            return Availability(ok=True, reason="always", priority=1)

        async def load(self, model, config):
            return Sloppy()


    class RaisingBackend(Backend):
        name: ClassVar[str] = "raising"

        async def detect(self):
            raise OSError("sysfs exploded")

        async def load(self, model, config):
            raise AssertionError("never loaded")


    class TestSloppy(BackendConformance):
        model_path = "unused.gguf"

        @pytest.fixture
        def conformance_backend(self):
            return SloppyBackend()


    class TestRaising(BackendConformance):
        model_path = "unused.gguf"

        @pytest.fixture
        def conformance_backend(self):
            return RaisingBackend()
    """
)


def test_the_suite_fails_a_backend_that_breaks_the_contract(pytester: pytest.Pytester):
    pytester.makepyfile(test_broken=BROKEN_BACKENDS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-rs")
    outcomes = result.parseoutcomes()
    # sloppy: detection passes; every check that streams fails; its crash check is not
    # applicable (no process). raising: detection fails; the rest are not run.
    assert outcomes.get("passed") == 1
    assert outcomes.get("failed") == 7
    assert outcomes.get("skipped") == 8
    result.stdout.fnmatch_lines(
        [
            "*rocmux conformance*",
            "raising: 1 failed, 7 not run (of 8 checks)",
            "*not run: backend 'raising' is not available here: detection raised*sysfs*",
            "sloppy: 1 passed, 6 failed, 1 not applicable (of 8 checks)",
            "*not applicable: backend 'sloppy' has no runtime process to kill*",
        ]
    )
    result.stdout.fnmatch_lines(["*must return Availability.unavailable(reason) instead*"])
    result.stdout.fnmatch_lines(["*exactly one must carry it*"])


def test_command_line_backend_option_runs_the_shipped_suite(pytester: pytest.Pytester):
    """``--rocmux-backend NAME --pyargs rocmux.testing``; without a name, nothing runs."""
    pytester.makeini("[pytest]\n")  # not the workspace's settings
    result = pytester.runpytest_inprocess(
        "-p", "no:cacheprovider", "--pyargs", "rocmux.testing", "--collect-only", "-q"
    )
    result.stdout.fnmatch_lines(["*TestInstalledBackend::*[[]no-backend-given[]]"])
    result = pytester.runpytest_inprocess(
        "-p",
        "no:cacheprovider",
        "--rocmux-backend",
        "vllm_rocm",
        "--rocmux-backend",
        "llamacpp_hip",
        "--pyargs",
        "rocmux.testing",
        "--collect-only",
        "-q",
    )
    result.stdout.fnmatch_lines(
        [
            "*test_detect_returns_an_availability_with_a_reason[[]vllm_rocm[]]",
            "*test_detect_returns_an_availability_with_a_reason[[]llamacpp_hip[]]",
        ]
    )
    assert "16 tests collected" in result.stdout.str()
