"""Deliberately broken plugins are reported by `rocmux plugins` and `rocmux backends`,
run as a user runs them (a subprocess), while every other plugin keeps working.

Each broken plugin is a fake distribution: a ``*.dist-info`` folder with an
``entry_points.txt`` and a module, in a temporary folder put on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

# A short detection timeout, so that the hanging plugin costs a second, not ten.
DETECT_TIMEOUT = "1"

REGISTERS = textwrap.dedent(
    """
    from typing import ClassVar

    import anyio
    from rocmux import hookimpl
    from rocmux.backend import Backend
    from rocmux.types import Availability


    class Hangs(Backend):
        name: ClassVar[str] = "hangs"

        async def detect(self):
            await anyio.sleep(3600)
            return Availability(ok=True, reason="never", priority=1000)

        async def load(self, model, config):
            raise NotImplementedError


    @hookimpl
    def rocmux_register_backends(registry):
        registry.add(Hangs())
    """
)

HOOK_RAISES = textwrap.dedent(
    """
    from rocmux import hookimpl


    @hookimpl
    def rocmux_register_backends(registry):
        raise RuntimeError("boom in register")
    """
)


def _fake_distribution(root: Path, name: str, module: str, source: str, target: str) -> None:
    """A distribution ``name`` whose ``rocmux`` entry point ``module`` is ``target``."""
    (root / f"{module}.py").write_text(source)
    # The folder name must be the normalized name: importlib.metadata takes the name from
    # it, and two folders both starting "rocmux-" would be one distribution to it.
    dist = root / f"{name.replace('-', '_')}-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(f"[rocmux]\n{module} = {target}\n")


@pytest.fixture(scope="module")
def broken_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("broken-site")
    _fake_distribution(
        root,
        "rocmux-broken-import",
        "broken_import",
        "import no_such_module_anywhere\n",
        "broken_import",
    )
    _fake_distribution(
        root,
        "rocmux-broken-raise",
        "broken_raise",
        "raise ValueError('bad configuration at import')\n",
        "broken_raise",
    )
    _fake_distribution(
        root, "rocmux-broken-attr", "broken_attr", "x = 1\n", "broken_attr:no_such_object"
    )
    _fake_distribution(root, "rocmux-broken-hook", "broken_hook", HOOK_RAISES, "broken_hook")
    _fake_distribution(root, "rocmux-hanging", "hanging", REGISTERS, "hanging")
    return root


def _cli(
    site: Path, *args: str, timeout: float = 60
) -> tuple[subprocess.CompletedProcess[str], float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(site), os.environ.get("PYTHONPATH")) if p),
        "ROCMUX_DETECT_TIMEOUT": DETECT_TIMEOUT,
        "COLUMNS": "400",  # rich would fold long errors at 80 columns
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "rocmux.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done, time.monotonic() - started


@pytest.fixture(scope="module")
def plugins_json(broken_site: Path) -> dict[str, dict[str, Any]]:
    done, _ = _cli(broken_site, "plugins", "--json")
    assert done.returncode == 0, done.stderr
    return {row["name"]: row for row in json.loads(done.stdout)}


@pytest.fixture(scope="module")
def backends_json(broken_site: Path) -> tuple[dict[str, Any], float]:
    done, elapsed = _cli(broken_site, "backends", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout), elapsed


# -- rocmux plugins ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("plugin", "distribution", "error"),
    [
        ("broken_import", "rocmux-broken-import", "ModuleNotFoundError(\"No module named 'no_such"),
        ("broken_raise", "rocmux-broken-raise", "ValueError('bad configuration at import')"),
        ("broken_attr", "rocmux-broken-attr", "has no attribute 'no_such_object'"),
    ],
)
def test_plugins_json_reports_any_load_error(plugins_json, plugin, distribution, error):
    row = plugins_json[plugin]
    assert row["distribution"] == distribution
    assert row["version"] == "1.0"
    assert row["hooks"] == []
    assert f"plugin {plugin!r} ({distribution}) failed to import" in row["error"]
    assert error in row["error"]


def test_plugins_json_reports_a_hook_that_raises(plugins_json):
    row = plugins_json["broken_hook"]
    assert row["hooks"] == ["rocmux_register_backends"]
    assert "'broken_hook' failed in rocmux_register_backends" in row["error"]
    assert "boom in register" in row["error"]


def test_plugins_json_lists_the_working_plugins_without_errors(plugins_json):
    for name in ("llamacpp_hip", "vllm_rocm", "hip_direct", "hanging"):
        assert plugins_json[name]["error"] is None, plugins_json[name]
        assert plugins_json[name]["disabled"] is False
    assert plugins_json["hanging"]["hooks"] == ["rocmux_register_backends"]


def test_plugins_table_names_each_broken_plugin_and_its_error(broken_site):
    done, _ = _cli(broken_site, "plugins")
    assert done.returncode == 0, done.stderr
    for text in (
        "broken_import",
        "no_such_module_anywhere",
        "bad configuration at import",
        "no_such_object",
        "boom in register",
    ):
        assert text in done.stdout, text
    assert "llamacpp_hip" in done.stdout


# -- rocmux backends ---------------------------------------------------------------------------


def test_backends_json_reports_broken_plugins_and_the_rest_work(backends_json):
    output, _ = backends_json
    rows = {row["name"]: row for row in output["backends"]}
    assert rows["llamacpp_hip"]["available"] is True
    assert "vllm_rocm" in rows and "hip_direct" in rows
    errors = "\n".join(output["plugin_errors"])
    for text in (
        "'broken_import' (rocmux-broken-import) failed to import",
        "'broken_raise' (rocmux-broken-raise) failed to import",
        "'broken_attr' (rocmux-broken-attr) failed to import",
        "'broken_hook' failed in rocmux_register_backends: RuntimeError('boom in register')",
    ):
        assert text in errors


def test_a_hanging_detection_is_cut_off_and_the_cli_finishes(backends_json):
    output, elapsed = backends_json
    rows = {row["name"]: row for row in output["backends"]}
    hangs = rows["hangs"]
    assert hangs["available"] is False
    assert hangs["plugin"] == "hanging"
    assert hangs["reason"] == f"detection did not finish within {DETECT_TIMEOUT} s"
    # Detection runs concurrently: the hang costs its timeout once, not more.
    assert elapsed < 30
    # Best first: the hanging backend's priority never counted.
    assert output["backends"][0]["available"] is True


def test_backends_table_shows_reasons_and_plugin_errors(broken_site):
    done, _ = _cli(broken_site, "backends")
    assert done.returncode == 0, done.stderr
    assert "detection did not finish within 1 s" in done.stdout
    assert "plugin error:" in done.stdout
    assert "boom in register" in done.stdout
    assert "no_such_module_anywhere" in done.stdout


def test_detect_timeout_env_falls_back_on_bad_values(monkeypatch):
    from rocmux import selection

    for raw, expected in (("0.5", 0.5), ("", 10.0), ("soon", 10.0), ("-1", 10.0)):
        monkeypatch.setenv("ROCMUX_DETECT_TIMEOUT", raw)
        assert selection._detect_timeout() == expected


# -- load errors that must not escape the plugin manager -----------------------------------


def test_a_hook_with_a_bad_signature_is_reported(tmp_path):
    source = textwrap.dedent(
        """
        from rocmux import hookimpl


        @hookimpl
        def rocmux_register_backends(registry, extra):
            pass
        """
    )
    _fake_distribution(tmp_path, "rocmux-bad-signature", "bad_signature", source, "bad_signature")
    done, _ = _cli(tmp_path, "plugins", "--json")
    assert done.returncode == 0, done.stderr[-500:]
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert "extra" in rows["bad_signature"]["error"]


def test_a_plugin_that_exits_at_import_is_reported(tmp_path):
    _fake_distribution(tmp_path, "rocmux-exits", "exits", "raise SystemExit(3)\n", "exits")
    done, _ = _cli(tmp_path, "plugins", "--json")
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-500:]}"
    rows = {row["name"]: row for row in json.loads(done.stdout)}
    assert "SystemExit" in rows["exits"]["error"]


def test_a_detection_hanging_in_a_thread_is_cut_off(tmp_path):
    source = REGISTERS.replace(
        "await anyio.sleep(3600)", "await anyio.to_thread.run_sync(__import__('time').sleep, 3600)"
    )
    _fake_distribution(tmp_path, "rocmux-thread-hang", "thread_hang", source, "thread_hang")
    done, _ = _cli(tmp_path, "backends", "--json", timeout=8)
    rows = {row["name"]: row for row in json.loads(done.stdout)["backends"]}
    assert "did not finish" in rows["hangs"]["reason"]
