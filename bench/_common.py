"""Shared plumbing of the benchmarks: child environments, process timers, figures.

Every whole-process figure is measured the same way for the command and for its floor: spawn the
process, wall time from spawn to exit, runs interleaved (rotating who goes first) so that a slow
moment of a busy machine hits both sides alike; medians are reported.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
CACHE = BENCH / ".cache"

#: Runs of every whole-process measurement: each figure is a median over at least 10.
DEFAULT_RUNS = 10


@dataclass
class Options:
    """Settings shared by every benchmark (from the command line of run.py)."""

    #: Runs of each whole-process measurement (the median is reported).
    runs: int = DEFAULT_RUNS
    #: Time the start-up figures with hyperfine instead of the built-in interleaved timer.
    hyperfine: bool = False
    #: Rebuild the cached 1M-deployment history even if it is up to date.
    rebuild: bool = False
    #: The peers (``_peers.Peer``) measured beside Shipyard in the same run (``--peers DIR``).
    peers: list[Any] = field(default_factory=list)
    #: Runs of each peer measurement (a Prefect run of 1,000 tasks takes seconds).
    peer_runs: int = 3
    #: Where the peers keep their state during the run: one history each, kept from one
    #: figure to the next, so that figure 7 lists the runs of figures 4 to 6.
    peer_state: Path | None = None


def python() -> str:
    """The interpreter of the environment under test (the floors run on it too)."""
    return sys.executable


def shipyard_exe() -> str:
    """The real ``shipyard`` console script of the current interpreter's environment."""
    exe = Path(sys.executable).parent / "shipyard"
    if not exe.exists():
        raise SystemExit(
            f"{exe} does not exist: install shipyard into this environment "
            "(pip install -e .) and run the benchmarks with its python"
        )
    return str(exe)


def child_env(**extra: str) -> dict[str, str]:
    """The environment of every measured process, command and floor alike.

    Bytecode is cached (as on any user's machine) but under ``bench/.cache/pycache``, so the
    benchmarks never write into the source tree and a ``PYTHONDONTWRITEBYTECODE`` set by a CI
    image does not make every run recompile shipyard from source. ``SHIPYARD_*`` settings of the
    caller are dropped so that they cannot change what is measured.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("SHIPYARD_") and k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONSTARTUP")
    }
    env["PYTHONPYCACHEPREFIX"] = str(CACHE / "pycache")
    env["NO_COLOR"] = "1"
    env.update(extra)
    return env


def tmpdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=f"shipyard-bench-{prefix}-")


#: GNU time: reports the peak RSS of the command it runs (``-f %M``), measured cleanly.
TIME = "/usr/bin/time"


@dataclass
class Run:
    """One finished process: wall seconds, exit code, and peak RSS figures in KiB.

    ``maxrss_kib``: from GNU time (``-f %M``) when asked for: the largest peak RSS of the command
    and of the children it waited for. ``hwm_kib``: ``VmHWM`` of the command's own process,
    polled while it runs: that process alone, without its children.
    """

    wall: float
    returncode: int
    maxrss_kib: int | None = None
    hwm_kib: int | None = None
    #: CPU seconds (user + system) of the process and the children it waited for: less
    #: sensitive than wall time to other work on the machine; kept in the details.
    cpu: float = 0.0


def _status(pid: int) -> dict[bytes, bytes]:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            return dict(line.split(b":", 1) for line in f if b":" in line)
    except OSError:
        return {}


def _child_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", "rb") as f:
            children = f.read().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def run_process(
    argv: Sequence[str],
    *,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    maxrss: bool = False,
    poll_hwm: bool = False,
    check: bool = True,
    timeout: float = 300.0,
) -> Run:
    """Run ``argv`` with stdin, stdout and stderr on /dev/null; measure its wall time.

    ``maxrss``: run it under GNU time for its peak RSS. (The kernel's rusage of a process
    forked from this one cannot be used: it starts at this Python process's own RSS, copied
    by the fork, so every small command would seem as big as the benchmark runner.)

    ``poll_hwm``: read ``VmHWM`` of the command's process every 2 ms until it exits: the peak
    RSS of that process alone, the right number when it runs children of its own.

    ``Run.cpu`` comes from ``wait4`` (CPU time is not inherited through the fork like the peak
    RSS is).
    """
    env = child_env() if env is None else env
    cmd = list(argv)
    out_file = None
    if maxrss:
        if not os.path.exists(TIME):
            raise RuntimeError(f"{TIME} (GNU time) is needed to measure peak RSS: apt install time")
        fd, out_file = tempfile.mkstemp(prefix="shipyard-bench-rss-")
        os.close(fd)
        cmd = [TIME, "-f", "%M", "-o", out_file, *cmd]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hwm = [0]
    stop = threading.Event()
    poller = None
    if poll_hwm:

        def poll() -> None:
            target = None if maxrss else proc.pid
            while not stop.is_set():
                if target is None:  # the command is the child of GNU time
                    target = _child_of(proc.pid)
                if target is not None:
                    st = _status(target)
                    if maxrss and st.get(b"PPid", b"").strip() != str(proc.pid).encode():
                        break  # it exited: the pid is no longer time's child
                    value = st.get(b"VmHWM")
                    if value:
                        hwm[0] = max(hwm[0], int(value.split()[0]))
                stop.wait(0.002)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
    killer = threading.Timer(timeout, proc.kill)
    killer.start()
    # Block until it exits, without reaping it: the pid stays ours while the poller reads it.
    os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
    wall = time.perf_counter() - t0
    killer.cancel()
    stop.set()
    if poller is not None:
        poller.join()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    rss = None
    if out_file is not None:
        text = Path(out_file).read_text().split()
        os.unlink(out_file)
        rss = int(text[-1]) if text and text[-1].isdigit() else None
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {proc.returncode} (cwd {cwd})")
    cpu = usage.ru_utime + usage.ru_stime
    return Run(wall, proc.returncode, rss, hwm[0] if poll_hwm else None, cpu)


def interleaved(
    commands: dict[str, Callable[[], Run]], *, runs: int, warmup: int = 2
) -> dict[str, list[Run]]:
    """Run every command ``runs`` times, round-robin (rotating who goes first)."""
    names = list(commands)
    for _ in range(warmup):
        for name in names:
            commands[name]()
    out: dict[str, list[Run]] = {name: [] for name in names}
    for i in range(runs):
        shift = i % len(names)
        for name in names[shift:] + names[:shift]:
            out[name].append(commands[name]())
    return out


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> dict[str, float]:
    """min, median, max and the interquartile range, for the JSON details."""
    vals = sorted(values)
    q = statistics.quantiles(vals, n=4) if len(vals) >= 2 else [vals[0]] * 3
    return {
        "min": vals[0],
        "median": statistics.median(vals),
        "max": vals[-1],
        "iqr": q[2] - q[0],
        "n": len(vals),
    }


def walls_ms(runs: Sequence[Run]) -> list[float]:
    return [r.wall * 1000 for r in runs]


def cpu_ms(runs: dict[str, list[Run]]) -> dict[str, float]:
    """Median CPU milliseconds of each command, for the details."""
    return {k: round(median([r.cpu * 1000 for r in v]), 2) for k, v in runs.items()}


def figure(
    fid: str,
    title: str,
    *,
    measured: float,
    unit: str,
    floor: float | None = None,
    floor_label: str = "",
    max_ratio: float | None = None,
    max_value: float | None = None,
    strict: bool = False,
    details: dict[str, Any] | None = None,
    peers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One row of the table: a measured value beside its floor, and whether it meets its target.

    A ratio target compares ``measured / floor`` with ``max_ratio``; an absolute one compares
    ``measured`` with ``max_value`` (``strict``: ``<`` instead of ``<=``). ``peers``: the same
    figure measured on other tools in the same run, by name (``{"measured": ..., ...}``).
    """
    ratio = measured / floor if floor else None
    if max_ratio is not None:
        assert ratio is not None
        ok = ratio <= max_ratio
        target = f"<= {max_ratio:g}x"
    else:
        assert max_value is not None
        ok = measured < max_value if strict else measured <= max_value
        target = f"{'<' if strict else '<='} {max_value:g} {unit}"
    return {
        "id": fid,
        "figure": title,
        "measured": measured,
        "floor": floor,
        "floor_label": floor_label,
        "unit": unit,
        "ratio": ratio,
        "target": target,
        "pass": ok,
        "details": details or {},
        "peers": peers or {},
    }


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
