"""Figure 7: the history at 1,000,000 deployments.

The file is built once and cached in ``bench/.cache/`` (rebuilt when the schema changes, or with
``run.py --rebuild``): a real ``shipyard deploy`` creates it, so the schema, the indexes and the
pragmas are Shipyard's own; its one deployment is removed and 1,000,000 deployments across
20 pipelines x 5 environments are written with ``executemany`` in one transaction: mostly
succeeded, some failed, cancelled and interrupted, with rollbacks of failed deployments and
retries, times increasing with the id as in a real history.

Then, against that file:

- ``shipyard --history FILE history -n 20``, whole process: <= 150 ms;
- ``SQLiteStore.rollback_target`` and ``SQLiteStore.deployments(limit=20)``, in this process: each
  <= 3x the same indexed queries run with sqlite3 directly (the floor returns plain tuples; its
  answers are checked against Shipyard's, and both query plans are recorded).
"""

from __future__ import annotations

import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _common import CACHE
from _common import Options
from _common import cpu_ms
from _common import figure
from _common import interleaved
from _common import median
from _common import python
from _common import run_process
from _common import shipyard_exe
from _common import spread
from _common import tmpdir
from _common import walls_ms
from bench_steps import deploy_argv
from bench_steps import peer_state
from bench_steps import peer_walls
from bench_steps import steps_pipelines

ROWS = 1_000_000
PIPELINES = [f"service-{i:02d}" for i in range(20)]
ENVIRONMENTS = ["dev", "qa", "staging", "canary", "production"]
DB = CACHE / "history-1m.db"
META = CACHE / "history-1m.json"
#: Bump when the generated data changes.
GENERATOR = 1

#: The columns of Shipyard's ``deployments`` table (core/_sqlite.py) this generator fills.
COLUMNS = (
    "id",
    "pipeline",
    "version",
    "environment",
    "status",
    "created_at",
    "started_at",
    "finished_at",
    "heartbeat_at",
    "rollback_of",
    "retry_of",
    "error",
    "user",
    "ci_actor",
    "host",
    "pid",
    "proc_start",
    "pipelines_file",
    "file_hash",
    "git_commit",
    "args",
    "vars",
    "shipyard_version",
    "stages_total",
    "current_stage",
    "cancel_requested",
)

#: The rows Shipyard returns: core/_sqlite.py ``_DEPLOYMENT_COLUMNS``.
RETURNED = (
    "id, pipeline, version, environment, status, started_at, finished_at, rollback_of, "
    "retry_of, error, user, ci_actor, host, pid, pipelines_file, file_hash, git_commit, args, "
    "vars, shipyard_version, stages_total, current_stage, cancel_requested"
)

#: The floors: the same questions asked of the same indexes, with sqlite3 and nothing else.
RAW_GET = f"SELECT {RETURNED} FROM deployments WHERE id=?"
RAW_ROLLBACK = (
    f"SELECT {RETURNED} FROM deployments d "
    "WHERE d.pipeline=? AND d.environment=? AND d.status='succeeded' AND d.started_at<? "
    "AND d.version<>? AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of=d.id) "
    "ORDER BY d.started_at DESC LIMIT 1"
)
RAW_LIST = f"SELECT {RETURNED} FROM deployments ORDER BY started_at DESC, id DESC LIMIT ?"

_FLOOR_CLI = (
    "import sqlite3, sys\n"
    "db = sqlite3.connect(sys.argv[1])\n"
    "for row in db.execute(sys.argv[2], (20,)):\n"
    "    print(*row)\n"
)


_DAYS: dict[int, str] = {}


def _ts(seconds: float) -> str:
    """Shipyard's timestamp format (core/_reports.py ``format_ts``), computed fast."""
    whole = int(seconds)
    day, sec = divmod(whole, 86400)
    date = _DAYS.get(day)
    if date is None:
        date = _DAYS[day] = time.strftime("%Y-%m-%d", time.gmtime(whole))
    h, rest = divmod(sec, 3600)
    m, s = divmod(rest, 60)
    return f"{date}T{h:02d}:{m:02d}:{s:02d}.{int((seconds - whole) * 1e6):06d}Z"


def _rows(n: int) -> Iterator[tuple[Any, ...]]:
    """``n`` deployments, oldest first, as tuples in the order of :data:`COLUMNS`."""
    rng = random.Random(20240101)
    rand = rng.random
    bits = rng.getrandbits
    pairs = [(p, e) for p in PIPELINES for e in ENVIRONMENTS]
    counters = dict.fromkeys(pairs, 0)
    last_ok: dict[tuple[str, str], str] = {}
    to_roll_back: list[tuple[int, str, str]] = []
    to_retry: list[tuple[int, str, str, str]] = []
    users = ["alice", "bob", "carol", "dave", "erin", "ci-bot"]
    hosts = ["build-1", "build-2", "build-3", "laptop-7"]
    stages = ("build", "release", "verify")
    file_hash = "9f2c" * 16
    t = 1_451_606_400.0  # 2016-01-01; a deployment every ~5 minutes: ~9.5 years
    for dep_id in range(1, n + 1):
        t += 240 + rand() * 120
        rollback_of = retry_of = None
        roll = rand()
        if to_roll_back and roll < 0.5:
            rollback_of, p, e = to_roll_back.pop()
            version = last_ok.get((p, e), "0.0.0")
        elif to_retry and roll < 0.6:
            retry_of, p, e, version = to_retry.pop()
        else:
            p, e = pair = pairs[int(rand() * 100)]
            c = counters[pair] = counters[pair] + 1
            version = f"{c // 1000}.{c // 50 % 20}.{c % 50}"
        r = rand()
        error = cancel = None
        stage = 2
        if r < 0.86:
            status = "succeeded"
            last_ok[p, e] = version
        elif r < 0.95:
            status = "failed"
            stage = int(rand() * 3)
            error = f"step 'deploy' of stage {stages[stage]!r} failed: exited with 1"
            if rollback_of is None and rand() < 0.7:
                to_roll_back.append((dep_id, p, e))
            elif rand() < 0.3:
                to_retry.append((dep_id, p, e, version))
        elif r < 0.99:
            status = "cancelled"
            stage = int(rand() * 3)
            cancel = "alice: wrong version"
            error = f"cancelled by {cancel}"
        else:
            status = "interrupted"
            stage = int(rand() * 3)
            error = "its process died"
        user = users[dep_id % 6 if dep_id % 7 else 5]
        started = _ts(t)
        finished = _ts(t + 30 + rand() * 600)
        yield (
            dep_id,
            p,
            version,
            e,
            status,
            started,
            started,
            finished,
            finished,
            rollback_of,
            retry_of,
            error,
            user,
            "GITHUB_ACTOR=ci-bot" if user == "ci-bot" else None,
            hosts[dep_id & 3],
            1000 + dep_id % 30000,
            str(bits(30)),
            "/srv/deploy/pipelines.py",
            file_hash,
            f"{bits(160):040x}",
            f'["deploy", "{p}", "{version}", "-e", "{e}"]',
            "{}",
            "0.1.0",
            3,
            stage,
            cancel,
        )


def _schema(path: Path) -> dict[str, Any]:
    db = sqlite3.connect(path)
    try:
        return {
            "user_version": db.execute("PRAGMA user_version").fetchone()[0],
            "columns": [r[1] for r in db.execute("PRAGMA table_info(deployments)")],
            "indexes": sorted(
                r[0]
                for r in db.execute(
                    "SELECT sql FROM sqlite_master WHERE type='index' AND sql IS NOT NULL"
                )
            ),
        }
    finally:
        db.close()


def _create_empty(path: Path) -> dict[str, Any]:
    """A history file made by a real ``shipyard deploy``, then emptied of that deployment."""
    with tmpdir("history-seed") as tmp:
        f = Path(tmp, "pipelines.py")
        f.write_text(steps_pipelines("python", 1))
        run_process(deploy_argv(f, path), cwd=tmp)
    schema = _schema(path)
    missing = set(COLUMNS) - set(schema["columns"])
    if missing:
        raise RuntimeError(
            f"the deployments table has no column(s) {sorted(missing)}: update COLUMNS in "
            f"{__file__} to core/_sqlite.py"
        )
    db = sqlite3.connect(path, isolation_level=None)
    tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    # The deployments first: their triggers write the kept stats tables, emptied after them.
    for table in sorted(tables, key=lambda t: t != "deployments"):
        if table != "sqlite_sequence":
            db.execute(f'DELETE FROM "{table}"')
    db.close()
    return schema


def build(path: Path = DB, rows: int = ROWS) -> dict[str, Any]:
    """Build the file; returns its metadata (including the build time, which must be < 60 s)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".building")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{tmp}{suffix}").unlink(missing_ok=True)
    t0 = time.perf_counter()
    schema = _create_empty(tmp)
    db = sqlite3.connect(tmp, isolation_level=None)
    # Bulk-load settings for this one connection; WAL is restored at the end.
    db.execute("PRAGMA journal_mode=DELETE")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("PRAGMA cache_size=-400000")
    # The real indexes are dropped and re-created from their own SQL: same schema, faster load.
    index_sql = [
        r[0]
        for r in db.execute(
            "SELECT sql FROM sqlite_master WHERE type='index' AND tbl_name='deployments' "
            "AND sql IS NOT NULL"
        )
    ]
    names = [
        r[0]
        for r in db.execute(
            "SELECT name FROM sqlite_master WHERE type='index' AND tbl_name='deployments' "
            "AND sql IS NOT NULL"
        )
    ]
    db.execute("BEGIN")
    for name in names:
        db.execute(f'DROP INDEX "{name}"')
    db.executemany(
        f"INSERT INTO deployments ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})",
        _rows(rows),
    )
    for sql in index_sql:
        db.execute(sql)
    db.execute("COMMIT")
    # No ANALYZE: Shipyard never runs it on its files, so the query planner works without stats.
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    seconds = time.perf_counter() - t0
    if _schema(tmp) != schema:
        raise RuntimeError("building changed the schema")
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    os.replace(tmp, path)
    meta = {
        "rows": rows,
        "generator": GENERATOR,
        "schema": schema,
        "build_seconds": seconds,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    META.write_text(json.dumps(meta, indent=2))
    return meta


def ensure(rebuild: bool = False) -> tuple[dict[str, Any], bool]:
    """The cached file's metadata, building it if missing or stale; and whether it was built now."""
    if not rebuild and DB.exists() and META.exists():
        meta = json.loads(META.read_text())
        with tmpdir("history-schema") as tmp:
            probe = Path(tmp, "probe.db")
            _create_empty(probe)
            current = _schema(probe)
        if (
            meta.get("rows") == ROWS
            and meta.get("generator") == GENERATOR
            and meta.get("schema") == current
            and _schema(DB) == current
        ):
            return meta, False
    return build(), True


def _plan(db: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> list[str]:
    return [r[3] for r in db.execute("EXPLAIN QUERY PLAN " + sql, params)]


def _full_scan(plan: list[str]) -> bool:
    """A step that reads the whole table (``SCAN d`` without an index)."""
    return any(step.startswith("SCAN") and "INDEX" not in step for step in plan)


def _time_pair(
    a: Any, b: Any, *, n: int = 400, warmup: int = 40
) -> tuple[list[float], list[float]]:
    """Microseconds per call of ``a`` and ``b``, alternating calls."""
    ta, tb = [], []
    for _ in range(warmup):
        a()
        b()
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        a()
        t1 = clock()
        b()
        t2 = clock()
        ta.append((t1 - t0) / 1000)
        tb.append((t2 - t1) / 1000)
    return ta, tb


def history_1m(opts: Options) -> dict[str, Any]:
    """Figure 7: ``history -n 20`` <= 150 ms; rollback target and last 20 <= 3x raw sqlite3."""
    from shipyard._sqlite import SQLiteStore

    meta, built_now = ensure(rebuild=opts.rebuild)
    exe = shipyard_exe()
    with tmpdir("history") as tmp:
        runs = interleaved(
            {
                "shipyard": lambda: run_process(
                    [exe, "--history", str(DB), "history", "-n", "20"], cwd=tmp
                ),
                "floor": lambda: run_process(
                    [python(), "-c", _FLOOR_CLI, str(DB), RAW_LIST], cwd=tmp
                ),
            },
            runs=max(opts.runs, 15),
            warmup=3,
        )
    cli_ms = {k: walls_ms(v) for k, v in runs.items()}

    store = SQLiteStore(DB, create=False)
    raw = sqlite3.connect(DB)
    try:
        pipeline, environment = PIPELINES[7], "production"
        x = store.latest(pipeline, environment)
        target = store.rollback_target(x["id"])

        def raw_rollback() -> Any:
            row = raw.execute(RAW_GET, (x["id"],)).fetchone()
            # row: id, pipeline, version, environment, status, started_at, ...
            return raw.execute(RAW_ROLLBACK, (row[1], row[3], row[5], row[2])).fetchone()

        assert raw_rollback()[0] == target["id"], "the floor must find the same deployment"
        rb_sy, rb_raw = _time_pair(lambda: store.rollback_target(x["id"]), raw_rollback)

        listing = store.deployments
        assert [d["id"] for d in listing(limit=20)] == [
            r[0] for r in raw.execute(RAW_LIST, (20,))
        ], "the floor must list the same deployments"
        ls_sy, ls_raw = _time_pair(
            lambda: listing(limit=20), lambda: raw.execute(RAW_LIST, (20,)).fetchall()
        )
        plans = {
            "rollback": _plan(raw, RAW_ROLLBACK, (pipeline, environment, x["started_at"], "?")),
            "list": _plan(raw, RAW_LIST, (20,)),
        }
    finally:
        store.close()
        raw.close()
    build_details = {
        "cached": not built_now,
        "built_at": meta["built_at"],
        "rows": meta["rows"],
        "file_mib": round(DB.stat().st_size / 2**20, 1),
    }
    peers: dict[str, dict[str, Any]] = {}
    for peer in opts.peers:
        argv = peer.history_argv()
        if argv is None:
            peers[peer.name] = {"version": peer.version, "measured": None,
                                "note": "keeps no history of runs (each task's last state only)"}  # fmt: skip
            continue
        with tmpdir("peer-history") as tmp:
            state = peer_state(opts, peer, Path(tmp))
            walls = peer_walls(opts, peer, state, {"run": argv})["run"]
        peers[peer.name] = {"version": peer.version, "measured": round(median(walls), 1),
                            "unit": "ms", "runs": opts.peer_runs, "details": spread(walls),
                            "note": "on its own history: the runs of this bench run, not 1M"}  # fmt: skip
    return {
        "figures": [
            figure(
                "7a",
                "shipyard history -n 20 at 1M deployments (whole process)",
                measured=median(cli_ms["shipyard"]),
                unit="ms",
                floor=median(cli_ms["floor"]),
                floor_label="python: sqlite3 query, print 20 rows",
                max_value=150.0,
                details={k: spread(v) for k, v in cli_ms.items()} | {"cpu_ms_median": cpu_ms(runs)},
                peers=peers,
            ),
            figure(
                "7b",
                "rollback_target() at 1M deployments (in process)",
                measured=median(rb_sy),
                unit="us",
                floor=median(rb_raw),
                floor_label="same 2 indexed queries, sqlite3 directly",
                max_ratio=3.0,
                details={
                    "shipyard_us": spread(rb_sy),
                    "raw_us": spread(rb_raw),
                    "deployment": x["id"],
                    "target": target["id"],
                    "plan": plans["rollback"],
                    "full_scan": _full_scan(plans["rollback"]),
                },
            ),
            figure(
                "7c",
                f"{listing.__name__}(limit=20) at 1M deployments (in process)",
                measured=median(ls_sy),
                unit="us",
                floor=median(ls_raw),
                floor_label="same indexed query, sqlite3 directly",
                max_ratio=3.0,
                details={
                    "shipyard_us": spread(ls_sy),
                    "raw_us": spread(ls_raw),
                    "plan": plans["list"],
                    "full_scan": _full_scan(plans["list"]),
                },
            ),
            figure(
                "7d",
                "building the 1M-deployment history",
                measured=meta["build_seconds"],
                unit="s",
                max_value=60.0,
                strict=True,
                details=build_details,
            ),
        ]
    }
