"""``LoadConfig`` to llama-server command-line flags."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from rocmux.errors import InvalidFlag
from rocmux.launch import HOST, PORT
from rocmux.types import LoadConfig


def split_flags(argv: Sequence[str]) -> list[list[str]]:
    """Group ``argv`` into ``[flag, value...]`` items (``--flag=value`` stays one item)."""
    groups: list[list[str]] = []
    for item in argv:
        if item.startswith("-") and not _is_number(item):
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


def _name(group: Sequence[str]) -> str:
    return group[0].split("=", 1)[0]


def http_threads(parallel: int | None) -> int:
    """llama-server's HTTP threads: its own sizing (slots + 4; 4 slots when it picks)
    plus one for each spare connection ``rocmux serve``'s relay may hold open to it
    (:data:`rocmux.relay.MAX_SPARES`). An idle kept-alive connection holds a thread,
    and cpp-httplib starts an extra thread only when none is idle at that moment, so
    with too few left some connections of a burst waited until a stream ended (1.1 s
    at 8 slots on the CPU box, 2-6 s in bench/proxy.py's 32-stream rounds)."""
    # Here, not at the top: the relay (httptools) is needed only when a server starts.
    from rocmux.relay import MAX_SPARES

    slots = parallel if parallel is not None and parallel > 0 else 4
    return slots + 4 + MAX_SPARES


def base_flags(model: Path, config: LoadConfig) -> list[str]:
    """Flags rocmux sets itself, before the user's extra flags."""
    argv = ["--model", str(model), "--host", HOST, "--port", PORT, "--no-webui"]
    argv += ["--threads-http", str(http_threads(config.parallel))]
    if config.gpu_layers is not None:
        argv += ["--n-gpu-layers", str(config.gpu_layers)]
    if config.context_len is not None:
        argv += ["--ctx-size", str(config.context_len)]
    if config.parallel is not None:
        argv += ["--parallel", str(config.parallel)]
    if config.flash_attn is not None:
        argv += ["--flash-attn", "on" if config.flash_attn else "off"]
    if config.threads is not None:
        argv += ["--threads", str(config.threads)]
    return argv


def merge_extra(
    base: Sequence[str], extra: Sequence[str], known: Mapping[str, frozenset[str]]
) -> list[str]:
    """``base`` plus ``extra``, each extra flag checked against ``known`` (from
    ``--help``), with any base flag the user also gave dropped so the user's value wins."""
    extra_groups = split_flags(extra)
    given: set[str] = set()
    for group in extra_groups:
        name = _name(group)
        if name not in known:
            close = sorted(k for k in known if k.lstrip("-").startswith(name.lstrip("-")[:3]))
            hint = f"; similar flags: {', '.join(close[:6])}" if close else ""
            raise InvalidFlag(
                f"llama-server does not accept {name!r} (from the extra runtime flags){hint}. "
                "See `llama-server --help`."
            )
        if name in ("--host", "--port", "--model", "-m"):
            raise InvalidFlag(f"{name} is set by rocmux and cannot be given as an extra flag")
        given |= known[name]
    merged: list[str] = []
    for group in split_flags(base):
        aliases = known.get(_name(group), frozenset({_name(group)}))
        if aliases & given:
            continue
        merged += group
    for group in extra_groups:
        merged += group
    return merged
