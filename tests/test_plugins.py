"""The plugin manager, every hook, plugin failures, and runtime choice."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import ClassVar

import anyio
import attrs
import pytest
from httpx_sse import ServerSentEvent
from rocmux import hookimpl, hookspecs
from rocmux.backend import Backend, TextModel
from rocmux.errors import BackendNotFound, BackendUnavailable, PluginError
from rocmux.events import LifecycleEvent
from rocmux.launch import HOST, PORT, Launch
from rocmux.manager import PluginManager
from rocmux.registry import BackendRegistry
from rocmux.selection import choose_backend, detect_all
from rocmux.setup import SetupRequest
from rocmux.supervisor import ServerProcess
from rocmux.types import Availability, LoadConfig, Token

pytestmark = pytest.mark.anyio

ROOT = Path(__file__).parent.parent
HOOKS = sorted(
    name
    for name in dir(hookspecs)
    if name.startswith("rocmux_") and callable(getattr(hookspecs, name))
)


# -- every hook is documented and tested (after datasette) -----------------------------------


def test_hooks_exist():
    assert "rocmux_register_backends" in HOOKS
    assert len(HOOKS) == 5


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_is_documented(hook):
    docs = (ROOT / "docs" / "plugin_hooks.md").read_text()
    assert re.search(rf"^## {hook}\(", docs, re.MULTILINE), f"{hook} is not in plugin_hooks.md"


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hook_has_a_test(hook):
    names = set()
    for path in Path(__file__).parent.glob("test_*.py"):
        tree = ast.parse(path.read_text())
        names |= {
            n.name for n in ast.walk(tree) if isinstance(n, ast.AsyncFunctionDef | ast.FunctionDef)
        }
    assert f"test_hook_{hook}" in names


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_docstring_and_types(hook):
    spec = getattr(hookspecs, hook)
    assert (spec.__doc__ and "Called" in spec.__doc__) or "Return" in (spec.__doc__ or "")
    assert "return" in spec.__annotations__


# -- fake backends ----------------------------------------------------------------------------


@attrs.define(eq=False)
class FakeBackend(Backend):
    name: ClassVar[str] = "fake"
    availability: Availability = Availability(ok=True, reason="fake is fine", priority=5)
    delay: float = 0.0

    async def detect(self) -> Availability:
        await anyio.sleep(self.delay)
        return self.availability

    async def load(self, model: Path, config: LoadConfig) -> TextModel:
        raise NotImplementedError


def _backend(name: str, **kwargs: object) -> FakeBackend:
    cls = type(f"Fake_{name}", (FakeBackend,), {"name": name})
    return attrs.define(eq=False)(cls)(**kwargs)


class Registers:
    def __init__(self, *backends: Backend) -> None:
        self.backends = backends

    @hookimpl
    def rocmux_register_backends(self, registry: BackendRegistry) -> None:
        for backend in self.backends:
            registry.add(backend)


def _manager(*plugins: object) -> PluginManager:
    manager = PluginManager.discover(entry_points=False)
    for i, plugin in enumerate(plugins):
        manager.register(plugin, name=f"p{i}")
    return manager


# -- hook: register backends ------------------------------------------------------------------


def test_hook_rocmux_register_backends():
    manager = _manager(Registers(_backend("one")), Registers(_backend("two")))
    assert manager.backends().names() == ["one", "two"]
    assert manager.backends().get("one").plugin == "p0"


def test_a_name_registered_twice_is_reported_against_the_second_plugin():
    manager = _manager(Registers(_backend("same")), Registers(_backend("same")))
    assert manager.backends().names() == ["same"]
    assert any("already registered" in str(e) for e in manager.errors)


def test_a_register_hook_that_raises_is_reported_and_others_work():
    class Broken:
        @hookimpl
        def rocmux_register_backends(self, registry: BackendRegistry) -> None:
            registry.add(_backend("half"))
            raise RuntimeError("boom in register")

    manager = _manager(Broken(), Registers(_backend("fine")))
    assert manager.backends().names() == ["fine"]
    assert "boom in register" in str(manager.errors[0])
    assert "p0" in manager.infos["p0"].error


# -- hook: adjust launch ------------------------------------------------------------------------


async def test_hook_rocmux_adjust_launch():
    class Adjust:
        @hookimpl
        def rocmux_adjust_launch(self, launch: Launch) -> None:
            launch.env["ROCMUX_TEST_MARK"] = "adjusted"
            launch.argv.append("--say-ready")

    server_script = str(Path(__file__).parent / "servers" / "rocmux_test_server.py")
    launch = Launch(
        backend="t", argv=[sys.executable, server_script, "--port", PORT, "--host", HOST]
    )
    server = ServerProcess(launch, plugins=_manager(Adjust()))
    await server.start()
    try:
        environ = Path(f"/proc/{server.pid}/environ").read_bytes()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
    finally:
        await server.stop()
    assert b"ROCMUX_TEST_MARK=adjusted" in environ
    assert b"--say-ready" in cmdline


async def test_an_adjust_hook_that_raises_stops_the_spawn_with_its_name():
    class Bad:
        @hookimpl
        def rocmux_adjust_launch(self, launch: Launch) -> None:
            raise ValueError("no spawning today")

    launch = Launch(backend="t", argv=[sys.executable, "-c", "pass"])
    with pytest.raises(PluginError, match="'p0' failed in rocmux_adjust_launch.*no spawning"):
        await ServerProcess(launch, plugins=_manager(Bad())).start()


# -- hook: decode event ------------------------------------------------------------------------


def test_hook_rocmux_decode_event():
    class Dialect:
        @hookimpl
        def rocmux_decode_event(self, backend: str, event: ServerSentEvent) -> list[Token] | None:
            if backend != "shouty":
                return None
            return [Token(event.data.upper())]

    manager = _manager(Dialect())
    chunk = json.dumps({"choices": [{"text": "hi", "finish_reason": None}]})
    assert manager.decode_event("shouty", ServerSentEvent(data="abc")) == [Token("ABC")]
    # Not this plugin's runtime: the built-in OpenAI decoder answers.
    assert manager.decode_event("llamacpp_hip", ServerSentEvent(data=chunk)) == [Token("hi")]


# -- hook: lifecycle ---------------------------------------------------------------------------


def test_hook_rocmux_lifecycle():
    seen: list[str] = []

    class Watch:
        @hookimpl
        def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
            seen.append(event.kind)

    class Raises:
        @hookimpl
        def rocmux_lifecycle(self, event: LifecycleEvent) -> None:
            raise RuntimeError("observer bug")

    manager = _manager(Raises(), Watch())
    manager.lifecycle(LifecycleEvent(kind="ready", backend="x"))
    assert seen == ["ready"]
    assert "observer bug" in str(manager.errors[0])


# -- hook: setup --------------------------------------------------------------------------------


def test_hook_rocmux_setup_backend():
    lines: list[str] = []
    manager = PluginManager.discover()
    request = SetupRequest(
        backend="llamacpp_hip", variant="hip", progress=lines.append, dry_run=True
    )
    assert manager.setup_backend(request) is True
    assert any("-DGGML_HIP=ON" in line for line in lines)
    assert manager.setup_backend(SetupRequest(backend="nobody", dry_run=True)) is False


def test_cli_setup_of_an_unknown_backend_fails_cleanly():
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "setup", "nobody", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1
    assert "no installed plugin knows how to set up 'nobody'" in done.stderr


# -- broken, disabled and traced plugins ------------------------------------------------------


def _fake_distribution(root: Path, name: str, entry_points: dict[str, str]) -> None:
    dist = root / f"{name}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[rocmux]\n{lines}\n")


def test_a_plugin_that_fails_to_import_is_reported_and_the_rest_work(tmp_path, monkeypatch):
    (tmp_path / "broken_plugin.py").write_text("import no_such_module_anywhere\n")
    _fake_distribution(tmp_path, "rocmux-broken", {"broken": "broken_plugin"})
    monkeypatch.syspath_prepend(str(tmp_path))
    manager = PluginManager.discover()
    assert "llamacpp_hip" in manager.backends().names()
    assert "no_such_module_anywhere" in manager.infos["broken"].error
    assert any("'broken' (rocmux-broken) failed to import" in str(e) for e in manager.errors)


def test_rocmux_disable_plugins_blocks_by_name(monkeypatch):
    monkeypatch.setenv("ROCMUX_DISABLE_PLUGINS", "vllm_rocm, hip_direct, remote")
    manager = PluginManager.discover()
    assert manager.backends().names() == ["llamacpp_hip"]
    assert manager.infos["vllm_rocm"].disabled


def test_rocmux_trace_plugins_shows_hook_calls():
    env = {**os.environ, "ROCMUX_TRACE_PLUGINS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "plugins", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "[rocmux trace] rocmux_register_backends -> llamacpp_hip" in done.stderr
    names = {row["name"] for row in json.loads(done.stdout)}
    assert {"rocmux.openai_dialect", "llamacpp_hip", "vllm_rocm", "hip_direct"} <= names


# -- runtime choice -----------------------------------------------------------------------------


async def test_highest_priority_available_backend_wins():
    manager = _manager(
        Registers(
            _backend("low", availability=Availability(ok=True, reason="ok", priority=1)),
            _backend("high", availability=Availability(ok=True, reason="ok", priority=9)),
            _backend("best_but_absent", availability=Availability.unavailable("no GPU")),
        )
    )
    detected = await detect_all(manager)
    assert [d.entry.name for d in detected] == ["high", "low", "best_but_absent"]
    assert (await choose_backend(None, manager)).entry.name == "high"


async def test_detection_runs_concurrently_with_a_timeout():
    manager = _manager(
        Registers(
            _backend("slow1", delay=0.3),
            _backend("slow2", delay=0.3),
            _backend("hangs", delay=60),
        )
    )
    started = anyio.current_time()
    detected = {d.entry.name: d.availability for d in await detect_all(manager, limit=0.5)}
    assert anyio.current_time() - started < 1.5
    assert detected["slow1"].ok and detected["slow2"].ok
    assert "did not finish within 0.5 s" in detected["hangs"].reason


async def test_detection_that_raises_becomes_a_reason():
    class Raising(FakeBackend):
        name: ClassVar[str] = "raising"

        async def detect(self) -> Availability:
            raise OSError("sysfs exploded")

    detected = await detect_all(_manager(Registers(Raising())))
    assert "sysfs exploded" in detected[0].availability.reason


async def test_asked_for_backend_via_env_and_unavailable_reason(monkeypatch):
    manager = _manager(
        Registers(
            _backend("high", availability=Availability(ok=True, reason="ok", priority=9)),
            _backend("low", availability=Availability(ok=True, reason="ok", priority=1)),
            _backend("gone", availability=Availability.unavailable("needs a ROCm GPU")),
        )
    )
    monkeypatch.setenv("ROCMUX_BACKEND", "low")
    assert (await choose_backend(None, manager)).entry.name == "low"
    assert (await choose_backend("high", manager)).entry.name == "high"
    with pytest.raises(BackendUnavailable, match="'gone' is not available: needs a ROCm GPU"):
        await choose_backend("gone", manager)
    with pytest.raises(BackendNotFound, match="no backend named 'nope'"):
        await choose_backend("nope", manager)


async def test_backend_from_rocmux_toml(tmp_path, monkeypatch):
    from rocmux import config

    (tmp_path / "rocmux.toml").write_text('backend = "low"\n')
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ROCMUX_BACKEND", raising=False)
    monkeypatch.setattr(config, "_cached", None)
    manager = _manager(
        Registers(
            _backend("high", availability=Availability(ok=True, reason="ok", priority=9)),
            _backend("low", availability=Availability(ok=True, reason="ok", priority=1)),
        )
    )
    try:
        assert (await choose_backend(None, manager)).entry.name == "low"
    finally:
        config._cached = None


# -- a third-party distribution in its own venv ----------------------------------------------


def test_third_party_backend_installed_in_a_venv_appears(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # rocmux and its dependencies come from the test environment; nothing is downloaded.
    # addsitedir, not a plain path line, so the editable installs' own .pth files apply.
    site_dir = sysconfig.get_paths()["purelib"]
    Path(purelib, "rocmux-test-env.pth").write_text(f"import site; site.addsitedir({site_dir!r})\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(ROOT / "tests" / "thirdparty" / "rocmux-echo"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    done = subprocess.run(
        [python, "-m", "rocmux.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    rows = {row["name"]: row for row in json.loads(done.stdout)["backends"]}
    assert rows["echo"]["available"] is True
    assert rows["echo"]["plugin"] == "echo"
    assert "llamacpp_hip" in rows
    done = subprocess.run(
        [python, "-m", "rocmux.cli", "run", "--backend", "echo", "hello there"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == "hello there"
    # The distribution went into the temporary venv only.
    here = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", "backends", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "echo" not in {row["name"] for row in json.loads(here.stdout)["backends"]}


def test_help_does_not_import_plugins_or_httpx():
    code = textwrap.dedent("""
        import sys
        from rocmux.cli import main
        try:
            main(["--help"])
        except SystemExit:
            pass
        heavy = [m for m in ("httpx", "rich", "anyio", "rocmux_llamacpp_hip") if m in sys.modules]
        print(heavy)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip().splitlines()[-1] == "[]"


def test_event_decoder_skips_the_hook_only_when_no_plugin_decodes():
    from rocmux import openai_dialect

    assert _manager().event_decoder("x") is openai_dialect.decode_event

    class Dialect:
        @hookimpl
        def rocmux_decode_event(self, backend: str, event: ServerSentEvent) -> list[Token] | None:
            return [Token("mine")]

    decode = _manager(Dialect()).event_decoder("x")
    assert decode(ServerSentEvent(data="{}")) == [Token("mine")]
