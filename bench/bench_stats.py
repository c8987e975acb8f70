"""Figure 12: ``shipyard stats`` (the DORA figures, issue #19) at 1,000,000 deployments.

The history is figure 7's (bench_history.py: built once, cached). Whole process, in a folder
that is not a git repository (so lead time reads no commit; the history's 1M random shas are
known to no repository):

- 12a: the last 30 days of that history (``--since`` the date 30 days before its last
  deployment, since the history ends in the past): <= 500 ms;
- 12b: the whole history, ``--since all``: 1,000,000 deployments in the window: <= 500 ms.

Both read what the store keeps up to date (core/_sqlitestats.py): the untimed first runs bring it
up to date with a freshly built file (reported in the details when there was anything to do),
as the first ``stats`` after an upgrade to schema 6 does once.

The floor, for context: ``shipyard history -n 20`` on the same file (start-up, opening the
store, one indexed query).
"""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from _common import Options
from _common import cpu_ms
from _common import figure
from _common import interleaved
from _common import median
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from _common import walls_ms
from bench_history import DB
from bench_history import ensure


def _last_month_start() -> str:
    db = sqlite3.connect(DB)
    try:
        last = db.execute("SELECT max(started_at) FROM deployments").fetchone()[0]
    finally:
        db.close()
    t = time.mktime(time.strptime(last[:10], "%Y-%m-%d")) - 30 * 86400
    return time.strftime("%Y-%m-%d", time.localtime(t))


def stats_1m(opts: Options) -> dict[str, Any]:
    """Figure 12: ``stats`` over the last month and over all of 1M deployments: <= 500 ms."""
    ensure(rebuild=opts.rebuild)
    db = sqlite3.connect(DB)
    try:  # what the first run below brings up to date (core/_sqlitestats.py)
        dirty = db.execute("SELECT count(*) FROM stats_dirty").fetchone()[0]
    finally:
        db.close()
    exe = shipyard_exe()
    since = _last_month_start()
    first: dict[str, float] = {}
    with tmpdir("stats") as tmp:
        for args in (["--since", since], ["--since", "all"]):
            t0 = time.perf_counter()
            check = run_process([exe, "--history", str(DB), "stats", *args], cwd=tmp)
            assert check.returncode == 0, f"shipyard stats {' '.join(args)} failed"
            first[" ".join(args)] = round((time.perf_counter() - t0) * 1000, 1)
        runs = interleaved(
            {
                "month": lambda: run_process(
                    [exe, "--history", str(DB), "stats", "--since", since], cwd=tmp
                ),
                "all": lambda: run_process(
                    [exe, "--history", str(DB), "stats", "--since", "all"], cwd=tmp
                ),
                "floor": lambda: run_process(
                    [exe, "--history", str(DB), "history", "-n", "20"], cwd=tmp
                ),
            },
            runs=max(opts.runs, 10),
            warmup=2,
        )
    ms = {k: walls_ms(v) for k, v in runs.items()}
    details = {k: spread(v) for k, v in ms.items()} | {"cpu_ms_median": cpu_ms(runs)}
    if dirty:
        # The first ``stats`` of a history written without it keeps the figures of all of it
        # (core/_sqlitestats.py), once; later ones bring them up to date with what was written
        # since, a few ms per deployment.
        details["first_stats_keeping_the_figures_ms"] = first
        details["pairs_brought_up_to_date"] = dirty
    return {
        "figures": [
            figure(
                "12a",
                f"shipyard stats --since {since} (the last 30 days) at 1M deployments",
                measured=median(ms["month"]),
                unit="ms",
                floor=median(ms["floor"]),
                floor_label="shipyard history -n 20, same file",
                max_value=500.0,
                details=details,
            ),
            figure(
                "12b",
                "shipyard stats --since all: 1M deployments in the window (whole process)",
                measured=median(ms["all"]),
                unit="ms",
                floor=median(ms["floor"]),
                floor_label="shipyard history -n 20, same file",
                max_value=500.0,
                details=details,
            ),
        ]
    }
