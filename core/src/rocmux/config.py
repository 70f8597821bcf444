"""User configuration: ``rocmux.toml``, environment variables and defaults.

Where the file is looked for, first found wins: ``$ROCMUX_CONFIG``, ``./rocmux.toml``,
``$XDG_CONFIG_HOME/rocmux/rocmux.toml`` (``~/.config/rocmux/rocmux.toml``).

Recognised keys (every one optional)::

    backend = "llamacpp_hip"       # runtime to use; else the best detected one
    model = "/models/x.gguf"       # model used when none is named
    model_dirs = ["/models"]       # where `rocmux models` and name lookups search

    [load]                         # LoadConfig defaults
    gpu_layers = 99
    context_len = 8192

    [generate]                     # GenerateConfig defaults
    temperature = 0.7

    [backends.llamacpp_hip]        # options read by that backend's plugin
    server = "/opt/llama.cpp/build/bin/llama-server"

    [server]                       # `rocmux serve`
    host = "127.0.0.1"             # default: loopback only
    port = 8080
    api_keys = ["sk-local-1"]      # Bearer keys; also $ROCMUX_API_KEYS (comma-separated)
    max_body_bytes = 1048576       # larger requests get 413
    max_tokens_limit = 4096        # larger max_tokens get 400; the default when none is asked
    shutdown_timeout = 30          # seconds SIGTERM lets streams finish before cutting them
    loading_comments = false       # SSE ": loading MODEL" lines while a stream waits for a load
    loading_comment_interval = 5   # seconds between them
    burst_window = 0.00025         # seconds a forward waits for more of a burst (0: none)

    [limits]
    max_loaded = 2                 # models loaded at once
    idle_ttl = 900                 # seconds idle before a model is unloaded (0: never)
    queue_length = 256             # requests waiting per model beyond its slots, then 503
    queue_timeout = 60             # seconds a request waits for room before 503
    max_restarts = 3               # crash restarts per model within restart_window
    restart_window = 300
    stall_timeout = 300            # seconds of runtime silence before a request fails (504)
    health_timeout = 5             # an idle runtime silent this long, twice, is killed
    memory_budget = "6GiB"         # estimated memory all loaded models may use; default none
    memory_margin = "512MiB"       # measured free memory kept unused (with a budget)
    memory_return_timeout = 10     # seconds to wait for an unloaded model's memory to show free
    load_stall_timeout = 120       # seconds a starting runtime may show no progress
    load_timeout = 1800            # outer cap on a runtime's start, seconds

    [devices]                      # which GPUs runtimes get (docs/gpu.md)
    extra_targets = ["gfx1102"]    # gfx targets to treat as supported beyond ROCm's list
    keep_integrated = false        # true: keep an integrated GPU beside a discrete one

    [[models]]                     # what `rocmux serve` offers; default: the default model
    name = "smollm2"
    path = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"
    backend = "llamacpp_hip"       # optional
    aliases = ["default"]
    [models.load]                  # LoadConfig for this model
    context_len = 4096
    devices = ["0000:03:00.0"]     # pin to GPUs by stable id (`rocmux devices`), not index
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from rocmux.errors import ConfigError
from rocmux.types import GenerateConfig, LoadConfig

_TOP_KEYS = {
    "backend",
    "model",
    "model_dirs",
    "load",
    "generate",
    "backends",
    "server",
    "limits",
    "models",
    "devices",
}


def config_path() -> Path | None:
    """The configuration file in use, or ``None`` when there is none."""
    explicit = os.environ.get("ROCMUX_CONFIG")
    if explicit:
        path = Path(explicit).expanduser()
        if not path.is_file():
            raise ConfigError(f"ROCMUX_CONFIG names {path}, which is not a file")
        return path
    candidates = [Path.cwd() / "rocmux.toml"]
    xdg = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    candidates.append(Path(xdg) / "rocmux" / "rocmux.toml")
    return next((p for p in candidates if p.is_file()), None)


def _build(cls: type[Any], table: object, where: str) -> Any:
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table, got {table!r}")
    known = {a.name for a in attrs.fields(cls)}
    for key in table:
        if key not in known:
            raise ConfigError(f"unknown key {where}.{key}; known keys: {', '.join(sorted(known))}")
    try:
        return cls(**table)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad value in {where}: {exc}") from None


_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(value: object) -> int | None:
    """``"6GiB"``, ``"512 MB"``, ``4096`` → bytes; ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, got {value}")
        return value
    if isinstance(value, str):
        import re

        match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
        if match and match[2].lower() in _UNITS:
            size = int(float(match[1]) * _UNITS[match[2].lower()])
            if size > 0:
                return size
    raise ValueError(f"not a size: {value!r} (use bytes or a string like '6GiB' or '512MB')")


@attrs.frozen(kw_only=True)
class ServerSettings:
    """``[server]``: where ``rocmux serve`` listens and who may use it."""

    host: str = attrs.field(default="127.0.0.1", validator=attrs.validators.instance_of(str))
    port: int = attrs.field(
        default=8080,
        validator=[
            attrs.validators.instance_of(int),
            attrs.validators.ge(0),
            attrs.validators.le(65535),
        ],
    )
    api_keys: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    max_body_bytes: int = attrs.field(default=1 << 20, validator=attrs.validators.gt(0))
    max_tokens_limit: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            [attrs.validators.instance_of(int), attrs.validators.gt(0)]
        ),
    )
    """Largest ``max_tokens`` a request may ask for (400 above it; the default when it
    asks for none); None: no limit."""
    shutdown_timeout: float = attrs.field(default=30.0, validator=attrs.validators.gt(0))
    """Seconds SIGTERM lets in-flight requests finish before their streams are cut."""
    loading_comments: bool = attrs.field(
        default=False, validator=attrs.validators.instance_of(bool)
    )
    """While a streaming request waits for its model to load, answer at once and send SSE
    comment lines (``: loading MODEL``), which OpenAI clients ignore, so that proxies
    do not time the connection out."""
    loading_comment_interval: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """Seconds between those comment lines."""
    burst_window: float = attrs.field(
        default=0.25e-3,
        validator=[attrs.validators.instance_of((int, float)), attrs.validators.ge(0)],
    )
    """Seconds a request is held before it goes to its runtime, restarting whenever
    another request arrives (at most 20 windows), so that a burst reaches the runtime together
    and shares its first batch (``rocmux.burst``); 0: forward each at once."""

    @api_keys.validator
    def _check_keys(self, attribute: attrs.Attribute[Any], value: tuple[Any, ...]) -> None:
        if not all(isinstance(k, str) and k for k in value):
            raise ValueError("api_keys must be non-empty strings")


@attrs.frozen(kw_only=True)
class Limits:
    """``[limits]``: how many models stay loaded and how long requests wait."""

    max_loaded: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    idle_ttl: float = attrs.field(default=900.0, validator=attrs.validators.ge(0))
    queue_length: int = attrs.field(default=256, validator=attrs.validators.ge(0))
    queue_timeout: float = attrs.field(default=60.0, validator=attrs.validators.gt(0))
    max_restarts: int = attrs.field(default=3, validator=attrs.validators.ge(0))
    restart_window: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    stall_timeout: float = attrs.field(default=300.0, validator=attrs.validators.gt(0))
    """Seconds a request may wait for the runtime's next byte (its first, or the next
    chunk of a stream) before it fails with 504 or an error event."""
    health_timeout: float = attrs.field(default=5.0, validator=attrs.validators.gt(0))
    """Seconds an idle runtime has to answer its health check; two misses: hung, killed."""
    memory_budget: int | None = attrs.field(default=None, converter=lambda v: parse_size(v))
    """Bytes all loaded instances may use together (estimated), e.g. "6GiB"; None: no limit.
    Each instance counts on the device it runs on: GPU memory, host memory on the CPU."""
    memory_margin: int = attrs.field(
        default=512 * 1024**2, converter=lambda v: 0 if v == 0 else parse_size(v)
    )
    """With a budget, the measured free memory less this must also hold a new load."""
    memory_return_timeout: float = attrs.field(default=10.0, validator=attrs.validators.ge(0))
    """Seconds to wait, after an unload, for the device monitor to show the memory free."""
    load_stall_timeout: float | None = attrs.field(
        default=120.0, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    """Seconds a starting runtime may show no progress (no output, no "loading" answer
    from its health endpoint) before its load fails."""
    load_timeout: float | None = attrs.field(
        default=1800.0, validator=attrs.validators.optional(attrs.validators.gt(0))
    )
    """Outer cap on a runtime's start: the backend's own startup timeout is raised to it."""


def _gfx_targets(value: object) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise ValueError(f"extra_targets must be a list of gfx targets, got {value!r}")
    targets = tuple(str(v).strip().lower() for v in value)
    bad = [t for t in targets if not re.fullmatch(r"gfx[0-9a-f]+", t)]
    if bad:
        raise ValueError(f"not gfx targets (like gfx1102): {', '.join(bad)}")
    return targets


@attrs.frozen(kw_only=True)
class DeviceSettings:
    """``[devices]``: which GPUs rocmux gives a runtime when a model pins none."""

    extra_targets: tuple[str, ...] = attrs.field(default=(), converter=_gfx_targets)
    """gfx targets treated as supported by ROCm on top of its documented list
    (``rocmux.devices.ROCM_SUPPORTED_TARGETS``)."""
    keep_integrated: bool = attrs.field(default=False, validator=attrs.validators.instance_of(bool))
    """Keep an integrated GPU beside a discrete one (it is left out by default)."""


@attrs.frozen(kw_only=True)
class ModelEntry:
    """One ``[[models]]`` table: a model ``rocmux serve`` offers under ``name``."""

    name: str = attrs.field(validator=attrs.validators.min_len(1))
    path: Path | None = attrs.field(
        default=None, converter=attrs.converters.optional(lambda p: Path(p).expanduser())
    )
    backend: str | None = None
    aliases: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    load: LoadConfig = attrs.field(factory=LoadConfig)

    @classmethod
    def from_table(cls, table: object, where: str) -> ModelEntry:
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where} must be a table")
        data = dict(table)
        load = _build(LoadConfig, data.pop("load", {}), f"{where}.load")
        entry = _build(cls, data, where)
        return attrs.evolve(entry, load=load)


@attrs.frozen(kw_only=True)
class Config:
    """The parsed configuration."""

    source: Path | None = None
    backend: str | None = None
    model: Path | None = None
    model_dirs: tuple[Path, ...] = ()
    load: LoadConfig = attrs.field(factory=LoadConfig)
    generate: GenerateConfig = attrs.field(factory=GenerateConfig)
    backends: Mapping[str, Mapping[str, Any]] = attrs.field(factory=dict)
    server: ServerSettings = attrs.field(factory=ServerSettings)
    limits: Limits = attrs.field(factory=Limits)
    models: tuple[ModelEntry, ...] = ()
    devices: DeviceSettings = attrs.field(factory=DeviceSettings)

    @classmethod
    def from_toml(cls, path: Path) -> Config:
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        return cls.from_mapping(data, source=path)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: Path | None = None) -> Config:
        where = str(source) if source else "config"
        for key in data:
            if key not in _TOP_KEYS:
                raise ConfigError(
                    f"unknown key {key!r} in {where}; known keys: {', '.join(sorted(_TOP_KEYS))}"
                )
        backend = data.get("backend")
        if backend is not None and not isinstance(backend, str):
            raise ConfigError(f"'backend' in {where} must be a string, got {backend!r}")
        model = data.get("model")
        if model is not None and not isinstance(model, str):
            raise ConfigError(f"'model' in {where} must be a path string, got {model!r}")
        dirs = data.get("model_dirs", [])
        if not isinstance(dirs, list) or not all(isinstance(d, str) for d in dirs):
            raise ConfigError(f"'model_dirs' in {where} must be a list of paths")
        backends = data.get("backends", {})
        if not isinstance(backends, Mapping) or not all(
            isinstance(v, Mapping) for v in backends.values()
        ):
            raise ConfigError(f"'backends' in {where} must hold one table per backend")
        return cls(
            source=source,
            backend=backend,
            model=Path(model).expanduser() if model else None,
            model_dirs=tuple(Path(d).expanduser() for d in dirs),
            load=_build(LoadConfig, data.get("load", {}), "load"),
            generate=_build(GenerateConfig, data.get("generate", {}), "generate"),
            backends=dict(backends),
            server=_build(ServerSettings, data.get("server", {}), "server"),
            limits=_build(Limits, data.get("limits", {}), "limits"),
            models=_models(data.get("models", []), where),
            devices=_build(DeviceSettings, data.get("devices", {}), "devices"),
        )

    def backend_options(self, name: str) -> Mapping[str, Any]:
        """The ``[backends.NAME]`` table, empty when absent."""
        return self.backends.get(name, {})


def _models(raw: object, where: str) -> tuple[ModelEntry, ...]:
    if not isinstance(raw, list):
        raise ConfigError(f"'models' in {where} must be an array of tables ([[models]])")
    entries = tuple(ModelEntry.from_table(t, f"models[{i}]") for i, t in enumerate(raw))
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        for name in (entry.name, *entry.aliases):
            if name in seen:
                raise ConfigError(
                    f"model name {name!r} is used twice (models[{seen[name]}] and models[{i}])"
                )
            seen[name] = i
    return entries


_cached: Config | None = None


def load_config(*, reload: bool = False) -> Config:
    """The configuration from the file in use (cached), or defaults when there is none."""
    global _cached
    if _cached is None or reload:
        path = config_path()
        _cached = Config.from_toml(path) if path else Config()
    return _cached


def chosen_backend(cli_value: str | None = None) -> str | None:
    """The backend the user asked for: ``--backend``, then ``ROCMUX_BACKEND``, then the file."""
    return cli_value or os.environ.get("ROCMUX_BACKEND") or load_config().backend
