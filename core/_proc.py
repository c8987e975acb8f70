"""Reading processes from Linux ``/proc``: liveness, process groups, children.

Zombies count as gone everywhere: they have exited and only wait for their parent to reap them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import NamedTuple


class ProcStat(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` Shipyard needs."""

    pid: int
    state: str
    ppid: int
    pgrp: int
    #: Clock ticks after boot when the process started: with the pid, an identity that survives
    #: pid reuse.
    starttime: str

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def stat(pid: int | str) -> ProcStat | None:
    """The stat of process ``pid``, or None when it does not exist (or ``/proc`` does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: split after the last ")".
    fields = raw[raw.rindex(b")") + 2 :].split()
    return ProcStat(
        int(pid), fields[0].decode(), int(fields[1]), int(fields[2]), fields[19].decode()
    )


def processes() -> Iterator[ProcStat]:
    """Every live (non-zombie) process visible in ``/proc``."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        return
    for entry in entries:
        if entry.isdigit():
            st = stat(entry)
            if st is not None and st.alive:
                yield st


def group_members(pgid: int) -> list[int]:
    """Pids of the live processes of process group ``pgid``."""
    return [p.pid for p in processes() if p.pgrp == pgid]


def children(pid: int) -> list[int]:
    """Pids of the live child processes of ``pid``."""
    return [p.pid for p in processes() if p.ppid == pid]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live (non-zombie) process."""
    st = stat(pid)
    return st is not None and st.alive


def tagged(name: str, values: set[str]) -> list[int]:
    """Pids of the live processes whose environment sets ``name`` to one of ``values``.

    Only processes whose environment this process may read (its own user's, or all as root).
    """
    wanted = {f"{name}={v}".encode() for v in values}
    me = os.getpid()
    found = []
    for p in processes():
        if p.pid == me:
            continue
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                entries = f.read().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(entries):
            found.append(p.pid)
    return found
