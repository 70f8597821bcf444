"""pytest plugin of the rocmux conformance suite (entry point ``pytest11: rocmux``).

Adds ``--rocmux-backend NAME`` (repeatable) and ``--rocmux-model PATH``, the fixtures
the suite's checks take (each overridable in a test class), and a summary that
counts the checks per backend: passed, failed, not applicable, not run. A skip is
not a pass, so the summary never folds skips into the passed count.

pytest loads this module in every session of every environment that has rocmux, so
it imports nothing from rocmux until a conformance test asks for it.
"""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# The suite's assertions explain themselves, but rewriting adds the compared values.
pytest.register_assert_rewrite("rocmux.testing.conformance")

if TYPE_CHECKING:
    from rocmux.backend import Backend
    from rocmux.types import Availability, LoadConfig

NOT_APPLICABLE = "not applicable"  # kept equal to rocmux.testing.conformance's constants
NOT_RUN = "not run"

_BACKEND = pytest.StashKey[str]()
_DETECTED = pytest.StashKey[dict[int, tuple[Any, "Availability"]]]()
_RESULTS = pytest.StashKey[dict[str, tuple[str, str, str]]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("rocmux", "rocmux backend conformance (rocmux.testing)")
    group.addoption(
        "--rocmux-backend",
        action="append",
        default=[],
        dest="rocmux_backend",
        metavar="NAME",
        help="run the conformance suite against this installed backend (repeatable); "
        "with `--pyargs rocmux.testing`",
    )
    group.addoption(
        "--rocmux-model",
        dest="rocmux_model",
        default=None,
        metavar="PATH",
        help="model the conformance suite loads when the test class names none "
        "(default: rocmux.toml's model, else the default model)",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "rocmux_conformance: a check of rocmux's backend conformance suite"
    )
    config.stash[_DETECTED] = {}
    config.stash[_RESULTS] = {}


def _is_conformance(cls: type | None) -> bool:
    # Import the suite only for classes that could derive from it.
    if cls is None or not any(c.__name__ == "BackendConformance" for c in cls.__mro__):
        return False
    from rocmux.testing.conformance import BackendConformance

    return issubclass(cls, BackendConformance)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    cls = metafunc.cls
    if not _is_conformance(cls) or getattr(cls, "backend_name", None) is not None:
        return
    if "conformance_backend_name" not in metafunc.fixturenames:
        return
    names: list[str | None] = list(metafunc.config.getoption("rocmux_backend")) or [None]
    metafunc.parametrize(
        "conformance_backend_name", names, ids=[n or "no-backend-given" for n in names]
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _is_conformance(getattr(item, "cls", None)):
            item.add_marker(pytest.mark.rocmux_conformance)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def conformance_backend_name(request: pytest.FixtureRequest) -> str | None:
    """The backend under test: the class's ``backend_name`` (or ``--rocmux-backend``)."""
    return getattr(request.cls, "backend_name", None)


@pytest.fixture
def conformance_backend(
    request: pytest.FixtureRequest, conformance_backend_name: str | None
) -> Backend:
    """The registered backend of that name, as rocmux's plugin manager found it."""
    if conformance_backend_name is None:
        pytest.skip(
            f"{NOT_RUN}: no backend named; pass --rocmux-backend NAME or set backend_name "
            "on the test class"
        )
    request.node.stash[_BACKEND] = conformance_backend_name
    from rocmux.manager import get_plugin_manager

    return get_plugin_manager().backends().get(conformance_backend_name).backend


@pytest.fixture
def conformance_available_backend(
    request: pytest.FixtureRequest, conformance_backend: Backend
) -> Backend:
    """``conformance_backend`` once its detection says it can run here; else a skip
    that quotes the backend's own reason. Detected once per backend object."""
    request.node.stash[_BACKEND] = conformance_backend.name
    cache = request.config.stash[_DETECTED]
    hit = cache.get(id(conformance_backend))
    if hit is None:
        import anyio

        from rocmux.registry import RegisteredBackend
        from rocmux.selection import detect_one

        # detect_one is what `rocmux backends` runs: same timeout, same error handling.
        detected = anyio.run(detect_one, RegisteredBackend(conformance_backend, "?"))
        # The backend is kept in the entry so that its id is not reused.
        hit = cache[id(conformance_backend)] = (conformance_backend, detected.availability)
    availability = hit[1]
    if not availability.ok:
        pytest.skip(
            f"{NOT_RUN}: backend {conformance_backend.name!r} is not available here: "
            f"{availability.reason}"
        )
    return conformance_backend


@pytest.fixture
def conformance_model_path(request: pytest.FixtureRequest) -> Path:
    """The class's ``model_path``, else ``--rocmux-model``, else rocmux's model."""
    value = getattr(request.cls, "model_path", None) or request.config.getoption("rocmux_model")
    if value:
        return Path(value).expanduser()
    from rocmux.errors import RocmuxError
    from rocmux.models import resolve_model

    try:
        return resolve_model(None)
    except RocmuxError as exc:
        pytest.skip(
            f"{NOT_RUN}: no model to load ({exc}); pass --rocmux-model PATH or set "
            "model_path on the test class"
        )


@pytest.fixture
def conformance_load_config(request: pytest.FixtureRequest) -> LoadConfig:
    """The class's ``load_config``."""
    config = getattr(request.cls, "load_config", None)
    if config is None:
        from rocmux.types import LoadConfig

        config = LoadConfig()
    return config


# -- the summary --------------------------------------------------------------------------------


def _skip_reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    cls = getattr(item, "cls", None)
    if not _is_conformance(cls):
        return report
    backend = item.stash.get(_BACKEND, None)
    if backend is None:
        # A class that overrides conformance_backend: the backend is among the arguments.
        for value in (getattr(item, "funcargs", None) or {}).values():
            if isinstance(getattr(value, "name", None), str) and hasattr(value, "detect"):
                backend = item.stash[_BACKEND] = value.name
    backend = backend or getattr(cls, "backend_name", None) or getattr(cls, "__name__", "?")
    results = item.config.stash[_RESULTS]
    previous = results.get(item.nodeid)
    if report.failed:
        results[item.nodeid] = (backend, "failed", "")
    elif report.skipped:
        reason = _skip_reason(report)
        kind = NOT_APPLICABLE if reason.startswith(NOT_APPLICABLE) else NOT_RUN
        results[item.nodeid] = (backend, kind, reason)
    elif report.when == "call" and previous is None:
        results[item.nodeid] = (backend, "passed", "")
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    results = config.stash.get(_RESULTS, {})
    if not results:
        return
    by_backend: dict[str, list[tuple[str, str]]] = {}
    for backend, outcome, reason in results.values():
        by_backend.setdefault(backend, []).append((outcome, reason))
    terminalreporter.section("rocmux conformance")
    for backend in sorted(by_backend):
        outcomes = by_backend[backend]
        counts = ", ".join(
            f"{sum(1 for o, _ in outcomes if o == kind)} {kind}"
            for kind in ("passed", "failed", NOT_APPLICABLE, NOT_RUN)
            if any(o == kind for o, _ in outcomes)
        )
        terminalreporter.write_line(f"{backend}: {counts} (of {len(outcomes)} checks)")
        for reason in sorted({r for _, r in outcomes if r}):
            terminalreporter.write_line(f"    {reason}")
