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
