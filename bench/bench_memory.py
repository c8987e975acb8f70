"""Figures 3 and 8: peak resident memory.

Two instruments, each used for both sides of a comparison:

- GNU time (``/usr/bin/time -f %M``): the peak RSS of a command, or of a child it waited for if
  that was bigger. Right for ``--help``, which starts no children (figure 3).
- ``VmHWM`` of /proc/PID/status, polled every 2 ms while the process runs: the peak RSS of that
  process alone. Right for ``deploy``, whose step processes must not be counted (figure 8); the
  GNU time value (shipyard or its biggest child) is kept in the details as a cross-check.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import BENCH
from _common import Options
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from bench_steps import deploy_argv
from bench_steps import steps_pipelines

MIB = 1024

#: 204,800 lines of 1,023 characters and a newline: 200 MiB on stdout.
PRINT_200MB = (
    "import sys\n"
    "line = 'x' * 1023 + '\\n'\n"
    "write = sys.stdout.write\n"
    "for _ in range(204800):\n"
    "    write(line)\n"
)

_BIG_OUTPUT = f'''\
from __future__ import annotations

import shipyard as sy

PRINT_200MB = {PRINT_200MB!r}


@sy.pipeline()
def steps(d: sy.Deployment):
    """One step printing 200 MiB of lines."""
    return [sy.stage("run", sy.command("python3", "-c", PRINT_200MB, name="print 200 MiB"))]
'''


def help_rss(opts: Options) -> dict[str, Any]:
    """Figure 3: peak RSS of ``shipyard --help`` <= 1.5x that of a minimal click CLI's."""
    exe = shipyard_exe()
    with tmpdir("rss") as tmp:
        runs = interleaved(
            {
                "floor": lambda: run_process(
                    [python(), str(BENCH / "minimal_click_cli.py"), "--help"], cwd=tmp, maxrss=True
                ),
                "help": lambda: run_process([exe, "--help"], cwd=tmp, maxrss=True),
            },
            runs=opts.runs,
            warmup=1,
        )
    mib = {k: [(r.maxrss_kib or 0) / MIB for r in v] for k, v in runs.items()}
    return {
        "figures": [
            figure(
                "3",
                "peak RSS of shipyard --help",
                measured=median(mib["help"]),
                unit="MiB",
                floor=median(mib["floor"]),
                floor_label="minimal click CLI --help (GNU time %M)",
                max_ratio=1.5,
                details={k: spread(v) for k, v in mib.items()},
            ),
        ]
    }


def deploy_rss(opts: Options) -> dict[str, Any]:
    """Figure 8: peak RSS of ``shipyard deploy``: 1,000 no-op steps <= 45 MB; 200 MB output < 100 MB.

    MB here are MiB (the stricter reading). The peak is the largest of the runs.
    """
    with tmpdir("memory") as tmp_:
        tmp = Path(tmp_)
        noop = tmp / "pipelines_noop.py"
        noop.write_text(steps_pipelines("python", 1000))
        argv = deploy_argv(noop, tmp / "history_noop.db")
        floor = [python(), str(BENCH / "floor_steps.py"), "python", "1000", str(tmp / "floor.db")]
        runs = interleaved(
            {
                "shipyard": lambda: run_process(argv, cwd=tmp, maxrss=True, poll_hwm=True),
                "floor": lambda: run_process(floor, cwd=tmp, maxrss=True, poll_hwm=True),
            },
            runs=max(3, opts.runs // 3),
            warmup=1,
        )
        noop_hwm = {k: [(r.hwm_kib or 0) / MIB for r in v] for k, v in runs.items()}
        noop_time = [(r.maxrss_kib or 0) / MIB for r in runs["shipyard"]]

        big = tmp / "pipelines_big.py"
        big.write_text(_BIG_OUTPUT)
        big_runs: dict[str, list[Any]] = {"shipyard": [], "floor": []}
        for i in range(2):  # a fresh history each time: every run records 200 MiB of lines
            hist = tmp / f"history_big_{i}.db"
            big_runs["shipyard"].append(
                run_process(
                    deploy_argv(big, hist), cwd=tmp, maxrss=True, poll_hwm=True, timeout=600
                )
            )
            fdb = tmp / f"floor_big_{i}.db"
            big_runs["floor"].append(
                run_process(
                    [
                        python(),
                        str(BENCH / "floor_stream.py"),
                        str(fdb),
                        "python3",
                        "-c",
                        PRINT_200MB,
                    ],
                    cwd=tmp,
                    maxrss=True,
                    poll_hwm=True,
                    timeout=600,
                )
            )
            for p in tmp.glob(f"*_big_{i}.db*"):
                p.unlink()
    big_hwm = {k: [(r.hwm_kib or 0) / MIB for r in v] for k, v in big_runs.items()}
    big_details = {
        "hwm_mib": {k: spread(v) for k, v in big_hwm.items()},
        "time_maxrss_mib": spread([(r.maxrss_kib or 0) / MIB for r in big_runs["shipyard"]]),
        "wall_s": {k: spread([r.wall for r in v]) for k, v in big_runs.items()},
    }
    return {
        "figures": [
            figure(
                "8a",
                "peak RSS, deploy of 1,000 no-op steps (shipyard process)",
                measured=max(noop_hwm["shipyard"]),
                unit="MiB",
                floor=max(noop_hwm["floor"]),
                floor_label="plain loop of 1,000 steps recorded in SQLite (VmHWM)",
                max_value=45.0,
                details={
                    "hwm_mib": {k: spread(v) for k, v in noop_hwm.items()},
                    "time_maxrss_mib": spread(noop_time),
                },
            ),
            figure(
                "8b",
                "peak RSS, deploy of a step printing 200 MiB (shipyard process)",
                measured=max(big_hwm["shipyard"]),
                unit="MiB",
                floor=max(big_hwm["floor"]),
                floor_label="plain script streaming the output into SQLite (VmHWM)",
                max_value=100.0,
                strict=True,
                details=big_details,
            ),
        ]
    }
