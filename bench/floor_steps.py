"""The floors of figures 4 and 5: N steps in a plain loop, each recorded in SQLite.

The same work Shipyard records for a step, done by hand with no framework. ``command``: run
``true`` with its output captured (figure 5); ``command-session``: the same as Shipyard must
spawn it (stdin on /dev/null, a new session, the environment plus ``DEPLOYMENT_*``), shown for
context; ``python``: call a no-op function (figure 4). Then
insert the output's lines (none: ``true`` prints nothing) and one row for the step, and commit,
so every step is on disk before the next starts. The file uses Shipyard's SQLite settings: WAL,
``synchronous=NORMAL``.

    python bench/floor_steps.py command|command-session|python N DB
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time


def noop() -> None:
    """The step of figure 4."""


def run_true() -> tuple[int, bytes, bytes]:
    proc = subprocess.run(["true"], capture_output=True)
    return proc.returncode, proc.stdout, proc.stderr


def run_true_like_shipyard() -> tuple[int, bytes, bytes]:
    proc = subprocess.run(
        ["true"], capture_output=True, stdin=subprocess.DEVNULL, start_new_session=True, env=ENV
    )
    return proc.returncode, proc.stdout, proc.stderr


ENV = dict(os.environ)
ENV.update(
    DEPLOYMENT_ID="1",
    DEPLOYMENT_VERSION="1.0.0",
    DEPLOYMENT_ENVIRONMENT="bench",
    DEPLOYMENT_PIPELINE="steps",
    DEPLOYMENT_STAGE="run",
)


def call_noop() -> tuple[int, bytes, bytes]:
    noop()
    return 0, b"", b""


def main() -> None:
    mode, n, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    step = {"command": run_true, "command-session": run_true_like_shipyard, "python": call_noop}[
        mode
    ]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(
        "CREATE TABLE IF NOT EXISTS steps (run INTEGER, idx INTEGER, name TEXT, status TEXT, "
        "exit_code INTEGER, started_at REAL, finished_at REAL, PRIMARY KEY (run, idx))"
    )
    conn.execute(
        "CREATE TABLE IF NOT EXISTS logs (id INTEGER PRIMARY KEY, run INTEGER, idx INTEGER, "
        "ts REAL, stream TEXT, line TEXT)"
    )
    run = time.time_ns()
    for i in range(n):
        started = time.time()
        rc, out, err = step()
        finished = time.time()
        lines = [
            (run, i, finished, stream, line)
            for stream, data in (("stdout", out), ("stderr", err))
            for line in data.decode("utf-8", "replace").splitlines()
        ]
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany("INSERT INTO logs (run, idx, ts, stream, line) VALUES (?,?,?,?,?)", lines)
        conn.execute(
            "INSERT INTO steps VALUES (?,?,?,?,?,?,?)",
            (run, i, f"{mode} {i}", "succeeded" if rc == 0 else "failed", rc, started, finished),
        )
        conn.execute("COMMIT")
    conn.close()


if __name__ == "__main__":
    main()
