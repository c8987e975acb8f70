"""The floor of figure 8b: stream a child's 200 MB of output into SQLite, by hand.

Read the pipe in 64 KiB chunks, split complete lines, insert them in batches of 2,000 (one
commit each) - what any tool that records a command's output line by line must at least do.

    python bench/floor_stream.py DB PROGRAM [ARGS...]
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import time


def insert(conn: sqlite3.Connection, batch: list[tuple[float, str, str]]) -> None:
    conn.execute("BEGIN IMMEDIATE")
    conn.executemany("INSERT INTO logs (ts, stream, line) VALUES (?,?,?)", batch)
    conn.execute("COMMIT")


def main() -> None:
    path, argv = sys.argv[1], sys.argv[2:]
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE logs (id INTEGER PRIMARY KEY, ts REAL, stream TEXT, line TEXT)")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    pending = b""
    batch: list[tuple[float, str, str]] = []
    while chunk := proc.stdout.read1(64 * 1024):
        *lines, pending = (pending + chunk).split(b"\n")
        now = time.time()
        batch += [(now, "stdout", ln.decode("utf-8", "replace")) for ln in lines]
        if len(batch) >= 2000:
            insert(conn, batch)
            batch = []
    if pending:
        batch.append((time.time(), "stdout", pending.decode("utf-8", "replace")))
    insert(conn, batch)
    conn.close()
    sys.exit(proc.wait())


if __name__ == "__main__":
    main()
