"""Tests of the ``remote`` backend, as its author runs them: ``pytest tests``.

The settings, detection reasons and errors are checked against servers made of
``httpx.MockTransport`` and closed ports; the conformance suite runs against a real
llama-server when one can be found (``$ROCMUX_LLAMA_SERVER``, rocmux's llamacpp_hip
plugin, or ``llama-server`` on PATH) and otherwise reports itself as not run.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from rocmux.backend import Backend, TextModel
from rocmux.errors import BackendUnavailable, ConfigError, InvalidFlag, ModelClosed, StreamError
from rocmux.testing import BackendConformance
from rocmux.types import GenerateConfig, LoadConfig
from rocmux_remote import backend as remote
from rocmux_remote.backend import RemoteBackend, RemoteSettings, normalize_url


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- settings ---------------------------------------------------------------------------------


def test_settings_come_from_the_table_and_the_environment_wins() -> None:
    table = {"url": "http://gpu-box:8080/v1/", "api_key": "sk-file", "model": "qwen"}
    settings = RemoteSettings.resolve(table, {})
    assert settings.url == "http://gpu-box:8080"
    assert (settings.api_key, settings.model) == ("sk-file", "qwen")
    assert settings.headers() == {"Authorization": "Bearer sk-file"}
    env = {"ROCMUX_REMOTE_URL": "https://other:9000", "ROCMUX_REMOTE_API_KEY": "sk-env"}
    settings = RemoteSettings.resolve(table, env)
    assert (settings.url, settings.api_key) == ("https://other:9000", "sk-env")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({}, "no remote server is configured"),
        ({"url": "gpu-box:8080"}, "must start with http:// or https://"),
        ({"url": "http://x", "uri": "typo"}, r"unknown key \[backends.remote\].uri"),
        ({"url": "http://x", "priority": "high"}, "priority must be an integer"),
        ({"url": "http://x", "timeout": 0}, "timeout must be positive"),
    ],
)
def test_bad_settings_say_what_is_wrong(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RemoteSettings.resolve(table, {})


def test_normalize_url_keeps_paths_other_than_v1() -> None:
    assert normalize_url("http://h/proxy/v1", "url") == "http://h/proxy"
    assert normalize_url(" http://h:1/ ", "url") == "http://h:1"


def test_rocmux_toml_table_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rocmux import config

    (tmp_path / "rocmux.toml").write_text(
        '[backends.remote]\nurl = "http://127.0.0.1:1"\nmodel = "m"\n'
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROCMUX_REMOTE_URL", raising=False)
    monkeypatch.delenv("ROCMUX_CONFIG", raising=False)
    monkeypatch.setattr(config, "_cached", None)
    try:
        settings = RemoteBackend().settings()
    finally:
        config._cached = None
    assert (settings.url, settings.model) == ("http://127.0.0.1:1", "m")


# -- detection --------------------------------------------------------------------------------


def _mock(handler: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Route the backend's probes to ``handler`` instead of the network."""
    real = httpx.AsyncClient

    def client(**kwargs: Any) -> httpx.AsyncClient:
        return real(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(remote.httpx, "AsyncClient", client)


def test_detection_without_a_url_says_how_to_set_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ROCMUX_REMOTE_URL", raising=False)
    monkeypatch.setattr(remote, "load_config", lambda: _NoConfig())
    availability = anyio.run(RemoteBackend().detect)
    assert not availability.ok
    assert "ROCMUX_REMOTE_URL" in availability.reason


class _NoConfig:
    def backend_options(self, name: str) -> dict[str, Any]:
        return {}


def test_detection_of_a_closed_port_names_the_url() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    availability = anyio.run(RemoteBackend(url=url).detect)
    assert not availability.ok
    assert f"cannot reach the remote server at {url}" in availability.reason


@pytest.mark.parametrize(
    ("health", "models", "ok", "reason"),
    [
        (200, 200, True, "answers; models: m1, m2"),
        (404, 200, True, "answers; models: m1, m2"),
        (200, 401, False, "refused the API key (HTTP 401)"),
        (503, 200, False, "not ready yet"),
        (404, 404, False, "does not look like an OpenAI-compatible server"),
    ],
)
def test_detection_reasons(
    monkeypatch: pytest.MonkeyPatch, health: int, models: int, ok: bool, reason: str
) -> None:
    seen: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        if request.url.path == "/health":
            return httpx.Response(health, json={"status": "ok"})
        return httpx.Response(models, json={"data": [{"id": "m1"}, {"id": "m2"}]})

    _mock(handler, monkeypatch)
    backend = RemoteBackend(url="http://gpu-box:8080", api_key="sk-1")
    availability = anyio.run(backend.detect)
    assert availability.ok is ok
    assert reason in availability.reason
    assert "http://gpu-box:8080" in availability.reason
    assert seen == ["Bearer sk-1", "Bearer sk-1"]
    if ok:
        assert availability.priority == remote.DEFAULT_PRIORITY


def test_detection_that_times_out_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    _mock(handler, monkeypatch)
    availability = anyio.run(RemoteBackend(url="http://gpu-box:8080").detect)
    assert "did not answer within 3 s" in availability.reason


# -- load and errors --------------------------------------------------------------------------


def test_load_refuses_extra_flags_and_unreachable_servers() -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    backend = RemoteBackend(url=url)
    with pytest.raises(InvalidFlag, match="cannot pass runtime flags"):
        anyio.run(backend.load, Path("m.gguf"), LoadConfig(extra_flags=["--foo"]))
    with pytest.raises(BackendUnavailable, match=f"cannot reach the remote server at {url}"):
        anyio.run(backend.load, Path("m.gguf"), LoadConfig())


async def _drain(model: TextModel) -> None:
    async for _token in model.generate("hi", GenerateConfig(max_tokens=2)):
        pass


def test_a_server_that_went_away_is_a_stream_error_naming_it() -> None:
    port = _closed_port()
    url = f"http://127.0.0.1:{port}"

    async def main() -> None:
        backend = RemoteBackend(url=url, model="m")  # a model name: load sends no request
        model = await backend.load(Path("m.gguf"), LoadConfig(context_len=128))
        assert (
            "ignored by the remote backend (set them on the server): context_len"
            in (model.notes[0])
        )
        with pytest.raises(StreamError, match=f"cannot reach the remote server at {url}"):
            await _drain(model)
        assert isinstance(model.err(), StreamError)
        await model.close()
        await model.close()
        with pytest.raises(ModelClosed, match=f"the remote model at {url} was closed"):
            await _drain(model)

    anyio.run(main)


# -- the conformance suite against a real llama-server ------------------------------------------

API_KEY = "sk-remote-test"


def _llama_server() -> Path | None:
    explicit = os.environ.get("ROCMUX_LLAMA_SERVER")
    if explicit:
        return Path(explicit)
    try:
        from rocmux_llamacpp_hip.binary import locate

        return locate().path
    except Exception:  # not installed, or no binary: try PATH
        found = shutil.which("llama-server")
        return Path(found) if found else None


def _model() -> Path | None:
    explicit = os.environ.get("ROCMUX_REMOTE_TEST_MODEL")
    if explicit:
        return Path(explicit)
    try:
        from rocmux.default_model import default_model_path

        return default_model_path()
    except Exception:
        return None


@pytest.fixture
def llama_server_url(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    binary, model = _llama_server(), _model()
    if binary is None or model is None:
        pytest.skip(
            "not run: needs a llama-server ($ROCMUX_LLAMA_SERVER) and a GGUF "
            "($ROCMUX_REMOTE_TEST_MODEL, or rocmux's default model)"
        )
    port = _closed_port()
    log = tmp_path / "llama-server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                *(str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)),
                *("-c", "2048", "-np", "2", "--api-key", API_KEY),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)
        else:
            raise RuntimeError(f"llama-server did not start: {log.read_text()[-2000:]}")
        yield url, proc
    finally:
        proc.kill()
        proc.wait()


class TestConformance(BackendConformance):
    backend_name = "remote"
    model_path = "remote-model"  # a label: the server chose its model

    @pytest.fixture
    def conformance_backend(self, llama_server_url: tuple[str, subprocess.Popen[bytes]]) -> Backend:
        url, self.proc = llama_server_url
        return RemoteBackend(url=url, api_key=API_KEY)

    def conformance_kill(self, model: TextModel) -> bool:
        self.proc.kill()
        self.proc.wait()
        return True
