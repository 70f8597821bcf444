"""``LoadConfig`` and ``[backends.vllm_rocm]`` options to a ``vllm serve`` command line.

Pure functions: nothing here runs vLLM or touches the file system. Flag names follow
vLLM's CLI (``vllm/engine/arg_utils.py`` and ``vllm/entrypoints/openai/cli_args.py`` in
https://github.com/vllm-project/vllm); ``vllm serve --help=all`` lists them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import attrs
from rocmux.errors import ConfigError, InvalidFlag
from rocmux.launch import HOST, PORT
from rocmux.types import LoadConfig

if TYPE_CHECKING:
    from rocmux.devices import GpuInfo

NAME = "vllm_rocm"

# Flags rocmux must own: it picks the address, and its client sends no API key.
RESERVED = {
    "--host": "rocmux picks the address",
    "--port": "rocmux picks the address",
    "--model": "the model is the path given to rocmux",
    "--served-model-name": "set served_model_name in [backends.vllm_rocm] instead",
    "--api-key": "rocmux's client sends no key; put `rocmux serve` in front for keys",
    "--uds": "rocmux talks to the server over TCP",
    "--headless": "a headless vLLM has no API server to talk to",
}

# The -O shorthand (``-O3``, ``-O=3``) that vLLM's parser rewrites before argparse sees it.
_OPT_LEVEL = re.compile(r"^-O(=?\S+)$")
_OPT_LEVEL_NAMES = ("-O", "--optimization-level", "--compilation-config")


@attrs.frozen(kw_only=True)
class VllmOptions:
    """The ``[backends.vllm_rocm]`` table of ``rocmux.toml``. ``None``: vLLM's default."""

    command: str | None = None
    gpu_memory_utilization: float | None = None
    tensor_parallel_size: int | None = None
    dtype: str | None = None
    quantization: str | None = None
    enforce_eager: bool | None = None
    served_model_name: str | None = None
    tokenizer: str | None = None
    startup_timeout: float = 900.0
    priority: int = 90

    @classmethod
    def from_table(cls, table: Mapping[str, Any]) -> VllmOptions:
        """Check every key and type; a wrong one is a ``ConfigError`` naming it."""
        fields = {f.name: f for f in attrs.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in table.items():
            if key not in fields:
                raise ConfigError(
                    f"unknown key backends.{NAME}.{key}; known keys: {', '.join(sorted(fields))}"
                )
            values[key] = _check_type(key, value, _TYPES[key])
        if values.get("gpu_memory_utilization") is not None and not (
            0.0 < values["gpu_memory_utilization"] <= 1.0
        ):
            raise ConfigError(f"backends.{NAME}.gpu_memory_utilization must be in (0, 1]")
        for key in ("tensor_parallel_size", "startup_timeout"):
            if values.get(key) is not None and values[key] <= 0:
                raise ConfigError(f"backends.{NAME}.{key} must be positive")
        return cls(**values)


_TYPES: dict[str, type] = {
    "command": str,
    "gpu_memory_utilization": float,
    "tensor_parallel_size": int,
    "dtype": str,
    "quantization": str,
    "enforce_eager": bool,
    "served_model_name": str,
    "tokenizer": str,
    "startup_timeout": float,
    "priority": int,
}


def _check_type(key: str, value: object, kind: type) -> Any:
    # TOML has no int/float distinction that users think about: 1 is a fine utilization.
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise ConfigError(f"backends.{NAME}.{key} must be {_KIND_NAMES[kind]}, got {value!r}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false"}


def gpu_indices(devices: Sequence[str]) -> list[str]:
    """HIP ordinals from ``LoadConfig.devices``: ``"1"`` and ``"ROCm1"`` both give ``"1"``."""
    indices = []
    for device in devices:
        match = re.fullmatch(r"(?:rocm|hip|gpu)?(\d+)", device.strip(), re.IGNORECASE)
        if match is None:
            raise ConfigError(
                f"the {NAME} backend takes GPUs by PCI address or unique id (or, "
                f"discouraged, index), as `rocmux devices` lists them; got {device!r}"
            )
        indices.append(str(int(match[1])))
    if len(set(indices)) != len(indices):
        raise ConfigError(f"devices lists a GPU twice: {', '.join(devices)}")
    return indices


def _check_refs(devices: Sequence[str]) -> None:
    from rocmux.devices import is_index_ref, normalize_pci_bus

    for device in devices:
        text = device.strip()
        stable = normalize_pci_bus(text) is not None or re.fullmatch(r"GPU-[0-9a-fA-F-]+", text)
        if (not stable and not is_index_ref(text)) or text.lower().startswith("cuda"):
            gpu_indices([device])  # raises with the message naming the accepted forms


def visibility(
    devices: Sequence[str],
    gpus: Sequence[GpuInfo] | None = None,
    env: Mapping[str, str] | None = None,
    keep_integrated: bool = False,
) -> tuple[dict[str, str], list[str]]:
    """The environment that gives vLLM exactly ``devices`` (stable ids, as ``rocmux
    devices`` lists them), or when none are pinned the GPUs ``rocmux.devices`` picks by
    default (integrated ones left out beside a discrete one), and notes.

    One filter, HIP's: the value goes into HIP_VISIBLE_DEVICES and, identically, into
    CUDA_VISIBLE_DEVICES, which HIP reads as another name for it (HIP environment
    variables: https://rocm.docs.amd.com/projects/HIP/en/latest/reference/env_variables.html)
    and which vLLM's ROCm platform asserts equal to it (vllm/platforms/rocm.py), so a
    stale one in the shell cannot break the start. Never ROCR_VISIBLE_DEVICES; and
    nothing at all when the user's environment already has a visibility variable, which
    then has to agree with ``devices``. ``gpus`` are the detected ones; without them
    only indices can be passed on, unchecked.
    """
    from rocmux.devices import VISIBILITY_VARIABLES, is_index_ref, select_gpus

    env = os.environ if env is None else env
    _check_refs(devices)
    usable = [g for g in gpus or () if g.vendor == "amd" and g.index is not None]
    if not usable:
        if not devices:
            return {}, []
        stable = [d for d in devices if not is_index_ref(d)]
        if stable:
            raise ConfigError(
                f"devices pins {', '.join(stable)}, but rocmux detects no AMD GPU here to "
                "match them against"
            )
        indices = gpu_indices(devices)
        notes = [f"no AMD GPU detected to check devices {list(devices)} against"]
        if any(env.get(v) is not None for v in VISIBILITY_VARIABLES):
            return {}, [*notes, "a visibility variable is set in the environment: none added"]
        value = ",".join(indices)
        return {"HIP_VISIBLE_DEVICES": value, "CUDA_VISIBLE_DEVICES": value}, notes
    # vLLM's own PyTorch decides which gfx targets it runs on: no target check here.
    selection = select_gpus(
        usable,
        runtime="hip",
        pinned=devices,
        build_targets=None,
        rocm_targets=None,
        keep_integrated=keep_integrated,
        env=env,
    )
    notes = [*selection.notes, *(f"{g.stable_id} left out: {why}" for g, why in selection.left_out)]
    value = selection.env.get("HIP_VISIBLE_DEVICES")
    if value is None:
        return {}, notes
    return {"HIP_VISIBLE_DEVICES": value, "CUDA_VISIBLE_DEVICES": value}, notes


def device_env(
    devices: Sequence[str],
    gpus: Sequence[GpuInfo] | None = None,
    env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of ``visibility`` without its notes."""
    return visibility(devices, gpus, env)[0]


def tensor_parallel_size(config: LoadConfig, options: VllmOptions) -> int | None:
    """The option if set, else one shard per chosen device, else vLLM's default (1)."""
    if options.tensor_parallel_size is not None:
        return options.tensor_parallel_size
    return len(config.devices) or None


def base_flags(config: LoadConfig, options: VllmOptions, served_name: str) -> list[str]:
    """Flags rocmux sets itself, before the user's extra flags.

    ``gpu_layers``, ``flash_attn`` and ``threads`` have no ``vllm serve`` equivalent
    (vLLM keeps the whole model on the GPUs and picks its attention backend) and are
    not passed.
    """
    argv = ["--host", HOST, "--port", PORT, "--served-model-name", served_name]
    if options.tokenizer is not None:
        argv += ["--tokenizer", options.tokenizer]
    if config.context_len is not None:
        argv += ["--max-model-len", str(config.context_len)]
    if config.parallel is not None:
        argv += ["--max-num-seqs", str(config.parallel)]
    tp = tensor_parallel_size(config, options)
    if tp is not None:
        argv += ["--tensor-parallel-size", str(tp)]
    if options.gpu_memory_utilization is not None:
        argv += ["--gpu-memory-utilization", f"{options.gpu_memory_utilization:g}"]
    if options.dtype is not None:
        argv += ["--dtype", options.dtype]
    if options.quantization is not None:
        argv += ["--quantization", options.quantization]
    if options.enforce_eager:
        # Only the positive form: older vLLMs have no --no-enforce-eager.
        argv.append("--enforce-eager")
    return argv


def serve_args(
    model: str,
    config: LoadConfig,
    options: VllmOptions,
    served_name: str,
    known: Mapping[str, frozenset[str]] | None,
) -> list[str]:
    """``serve MODEL FLAGS...``: everything after the vllm executable.

    The model comes first because vLLM refuses ``--served-model-name`` without a
    positional model (``FlexibleArgumentParser.parse_args``).
    """
    flags = merge_extra(base_flags(config, options, served_name), config.extra_flags, known)
    return ["serve", model, *flags]


# -- extra flags ---------------------------------------------------------------------------


def split_flags(argv: Sequence[str]) -> list[list[str]]:
    """Group ``argv`` into ``[flag, value...]`` items (``--flag=value`` stays one item)."""
    groups: list[list[str]] = []
    for item in argv:
        if item.startswith("-") and len(item) > 1 and not _is_number(item):
            groups.append([item])
        elif groups:
            groups[-1].append(item)
        else:
            raise InvalidFlag(f"extra runtime flags must start with a flag, got {item!r} first")
    return groups


def _is_number(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


def canonical(flag: str) -> str:
    """The name vLLM's parser sees: ``--max_model_len=5`` is ``--max-model-len``,
    ``--compilation-config.level`` is ``--compilation-config``, ``-O3`` is ``-O``.

    vLLM's ``FlexibleArgumentParser`` turns underscores into dashes up to the first dot
    and treats ``--flag.key value`` as a key of the JSON argument ``--flag``.
    """
    name = flag.split("=", 1)[0]
    if name.startswith("--"):
        head = name[2:].split(".", 1)[0]
        return "--" + head.replace("_", "-").rstrip("+")
    if _OPT_LEVEL.match(flag):
        return "-O"
    return name


def _aliases(name: str, known: Mapping[str, frozenset[str]]) -> frozenset[str] | None:
    if name in known:
        return known[name]
    if name == "-O":
        found = [known[n] for n in _OPT_LEVEL_NAMES if n in known]
        return frozenset({"-O"}).union(*found) if found else None
    return None


def merge_extra(
    base: Sequence[str], extra: Sequence[str], known: Mapping[str, frozenset[str]] | None
) -> list[str]:
    """``base`` plus ``extra``; each extra flag checked against ``known`` (the flags of
    ``vllm serve --help=all``; ``None`` when they could not be read), and any base flag
    the user also gave dropped so that the user's value wins."""
    extra_groups = split_flags(extra)
    given: set[str] = set()
    for group in extra_groups:
        name = canonical(group[0])
        if name in RESERVED:
            raise InvalidFlag(
                f"{group[0]} is set by rocmux and cannot be an extra flag: {RESERVED[name]}"
            )
        if known is None:
            given.add(name)
            continue
        aliases = _aliases(name, known)
        if aliases is None:
            raise InvalidFlag(
                f"vllm serve does not accept {group[0]!r} (from the extra runtime flags)"
                f"{_hint(name, known)}. See `vllm serve --help=all`."
            )
        if aliases & RESERVED.keys():
            reserved = sorted(aliases & RESERVED.keys())[0]
            raise InvalidFlag(
                f"{group[0]} is set by rocmux and cannot be an extra flag: {RESERVED[reserved]}"
            )
        given |= aliases
    merged: list[str] = []
    for group in split_flags(base):
        name = canonical(group[0])
        aliases = (known or {}).get(name, frozenset({name}))
        if aliases & given or name in given:
            continue
        merged += group
    for group in extra_groups:
        merged += group
    return merged


def _hint(name: str, known: Mapping[str, frozenset[str]]) -> str:
    stem = name.lstrip("-")
    words = [w for w in stem.split("-") if len(w) > 2]
    close = sorted(
        k
        for k in known
        if k.startswith("--") and (k[2:].startswith(stem[:4]) or any(w in k for w in words))
    )
    return f"; similar flags: {', '.join(close[:6])}" if close else ""


# -- vllm serve --help -----------------------------------------------------------------------

# argparse indents each option entry by two spaces; help text wraps at a deeper indent and
# vLLM's JSON tip (the epilog) at three, so neither is mistaken for an entry.
_ENTRY = re.compile(r"^  (-\S.*)$")
_FLAG = re.compile(r"^--?[A-Za-z][\w.+-]*$")


def parse_help_flags(help_text: str) -> dict[str, frozenset[str]]:
    """Map every flag in argparse help output to the set of its aliases.

    An entry reads ``--flag METAVAR, -f METAVAR  help``: option strings joined by
    ``", "`` and separated from the help by two or more spaces. Only the first word of
    each option string is a flag; the rest is its metavar (which may name other flags,
    as ``--tool-call-parser``'s does).
    """
    table: dict[str, frozenset[str]] = {}
    for line in help_text.splitlines():
        match = _ENTRY.match(line)
        if match is None:
            continue
        invocation = re.split(r"\s{2,}", match[1], maxsplit=1)[0]
        names = []
        for part in invocation.split(", "):
            first = part.split(" ", 1)[0]
            if _FLAG.match(first):
                names.append(first)
        group = frozenset(names)
        for name in names:
            table[name] = table.get(name, frozenset()) | group
    return table
