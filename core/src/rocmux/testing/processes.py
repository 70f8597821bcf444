"""Processes started by this one, read from ``/proc`` (Linux)."""

from __future__ import annotations

import os
from pathlib import Path


def _stat(pid: int) -> tuple[str, int] | None:
    """State letter and parent pid of ``pid``, or ``None`` when it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may hold spaces and parentheses; the fields follow the last ")".
    fields = stat.rsplit(")", 1)[-1].split()
    return fields[0], int(fields[1])


def descendants(pid: int | None = None, *, zombies: bool = True) -> set[int]:
    """Every live descendant of ``pid`` (default: this process).

    Zombies count by default: a child that exited but was never reaped means its
    owner did not wait for it.
    """
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    states: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        found = _stat(int(entry.name))
        if found is None:
            continue
        states[int(entry.name)] = found[0]
        children.setdefault(found[1], []).append(int(entry.name))
    out: set[int] = set()
    todo = list(children.get(root, ()))
    while todo:
        child = todo.pop()
        if child in out:
            continue
        if zombies or states.get(child) != "Z":
            out.add(child)
        todo.extend(children.get(child, ()))
    return out


def describe(pids: set[int]) -> dict[int, str]:
    """Command lines of ``pids`` (for failure messages), ``"?"`` when unreadable."""
    out: dict[int, str] = {}
    for pid in sorted(pids):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            raw = b""
        text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
        state = (_stat(pid) or ("?", 0))[0]
        out[pid] = f"{text[:200] or '?'} (state {state})"
    return out


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not)."""
    found = _stat(pid)
    return found is not None and found[0] != "Z"
