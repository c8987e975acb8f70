"""What is specific to the SQLite store (core/_sqlite.py), and only that.

The file itself: its format (``application_id``, ``user_version``, WAL), migrations, the refusal
of foreign or newer files (left byte-identical), the 0700/0600 permissions, the ``sqlite:///``
URL, the query plans of its indexes (EXPLAIN QUERY PLAN), and states only a damaged or foreign
file can hold. Everything about behaviour (locks, queue, recording, repair, the rollback rule,
every record kept) is in the store contract, tests/store_contract.py, which runs against every
store, this one included.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from shipyard import HistoryError
from shipyard import Status
from shipyard._sqlite import APPLICATION_ID
from shipyard._sqlite import MIGRATIONS
from shipyard._sqlite import SCHEMA_VERSION
from shipyard._sqlite import SQLiteStore
from shipyard._store import open_store

PIPELINES = """
import shipyard as sy

@sy.pipeline(rollback="manual")
def web(d):
    return [
        sy.stage("build", sy.command("sh", "-c", "echo one; echo two >&2", name="compile"),
                 sy.command("sh", "-c", "echo three", name="package")),
        sy.stage("verify", sy.command("sh", "-c", "echo four; echo five", name="smoke"),
                 sy.command("sh", "-c", "echo six", name="metrics"), parallel=True),
    ]
"""


OWNER = {"pid": 100, "host": "host-a", "proc_start": "4242", "heartbeat_at": None}


def never(ref):
    return False


def begin(store, version="1", **kw):
    kw.setdefault("pipeline", "web")
    kw.setdefault("environment", "x")
    return store.begin(version=version, owner=OWNER, is_dead=never, **kw).id


def query(path, sql, params=()):
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# -- the file ---------------------------------------------------------------------------------------


def test_schema_version_application_id_and_wal(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    assert shipyarder.run("deploy", "web", "1", "-e", "x").exit_code == 0
    db = shipyarder.history_path
    assert query(db, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert query(db, "PRAGMA application_id") == [(APPLICATION_ID,)]
    assert int.from_bytes(b"SHYD", "big") == APPLICATION_ID
    assert query(db, "PRAGMA journal_mode") == [("wal",)]
    tables = {r[0] for r in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"deployments", "stages", "steps", "logs", "locks", "audit"} <= tables


def test_migrations_cover_every_version_in_order():
    assert sorted(MIGRATIONS) == list(range(1, SCHEMA_VERSION + 1))


def test_an_older_file_is_migrated_keeping_its_records(tmp_path, monkeypatch):
    path = tmp_path / "history.db"
    store = open_store(str(path))
    assert isinstance(store, SQLiteStore)
    dep = begin(store, lock=False)
    store.close()

    def add_notes(db):
        db["notes"].create({"id": int, "text": str}, pk="id")

    import shipyard._sqlite as sqlite_store

    monkeypatch.setitem(sqlite_store.MIGRATIONS, SCHEMA_VERSION + 1, add_notes)
    monkeypatch.setattr(sqlite_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = open_store(str(path))
    try:
        assert store.get(dep)["version"] == "1"
    finally:
        store.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert query(path, "SELECT name FROM sqlite_master WHERE name='notes'") == [("notes",)]


def test_a_version_1_history_gains_the_artifacts_table_and_keeps_everything(tmp_path):
    # Written as Shipyard 0.1 wrote it: schema 1, a finished deployment with a log line.
    import sqlite_utils
    from shipyard._sqlite import MIGRATIONS as migrations

    path = tmp_path / "history.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    migrations[1](sqlite_utils.Database(conn))
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.execute(
        "INSERT INTO deployments (id, pipeline, version, environment, status, created_at) "
        "VALUES (1, 'web', '1.0', 'prod', 'succeeded', '2026-01-01T00:00:00Z')"
    )
    conn.execute("INSERT INTO logs (deployment_id, ts, stream, line) VALUES (1, 0, 'stdout', 'hi')")
    conn.close()
    store = open_store(str(path))
    try:
        assert store.get(1)["version"] == "1.0"
        assert [r["line"] for r in store.logs(1)] == ["hi"]
        assert store.artifacts(1) == []
    finally:
        store.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


def foreign_sqlite(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
    conn.execute("INSERT INTO users (name) VALUES ('ada')")
    conn.commit()
    conn.close()


def other_application(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA application_id=1234")
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()


def not_sqlite(path: Path) -> None:
    path.write_bytes(b"deployments,version\nweb,1.0\n" * 100)


def newer_schema(path: Path) -> None:
    store = open_store(str(path))
    store.close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=DELETE")
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            foreign_sqlite,
            "is a SQLite file but not a Shipyard history; it was left untouched",
            id="foreign-sqlite",
        ),
        pytest.param(
            other_application,
            "is a SQLite file but not a Shipyard history; it was left untouched",
            id="other-application-id",
        ),
        pytest.param(not_sqlite, "is not a Shipyard history", id="not-sqlite"),
        pytest.param(
            newer_schema,
            f"has history schema {SCHEMA_VERSION + 1}, newer than this Shipyard understands "
            f"({SCHEMA_VERSION}); upgrade shipyard to read it. The file was left untouched.",
            id="newer-schema",
        ),
    ],
)
@pytest.mark.parametrize(
    "args",
    [["deploy", "web", "1", "-e", "x"], ["history"], ["show", "1"], ["status"]],
    ids=lambda a: a[0],
)
def test_a_file_that_is_not_ours_is_refused_and_left_byte_identical(shipyarder, make, message,
                                                                     args):  # fmt: skip
    shipyarder.makepipelines(PIPELINES)
    folder = shipyarder.path / "data"
    folder.mkdir()
    path = folder / "history.db"
    make(path)
    before = snapshot(folder)
    result = shipyarder.run("--history", path, *args)
    assert result.exit_code == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {path} ")
    assert message in line
    assert "--history (or SHIPYARD_HISTORY)" in line or "upgrade shipyard" in line
    assert snapshot(folder) == before  # not a byte changed, no -wal or -shm left beside it
    assert not (shipyarder.path / "marker").exists()


def test_folder_0700_and_file_0600_whatever_the_umask(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    old = os.umask(0)
    try:
        result = shipyarder.run("deploy", "web", "1", "-e", "x", env={"SHIPYARD_HISTORY": None})
    finally:
        os.umask(old)
    assert result.exit_code == 0, result
    default = shipyarder.path / ".shipyard" / "history.db"
    assert default.exists()
    assert stat.S_IMODE(default.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(default.stat().st_mode) == 0o600


def test_a_history_elsewhere_is_private_too(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    target = shipyarder.path / "state" / "deploys.db"
    assert shipyarder.run("--history", target, "deploy", "web", "1", "-e", "x").exit_code == 0
    assert stat.S_IMODE(target.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(target.stat().st_mode) == 0o600


def test_reading_commands_create_nothing(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    for args in (["history"], ["status"], ["list"], ["plan", "web", "1", "-e", "x"]):
        assert shipyarder.run(*args).exit_code == 0, args
    assert not (shipyarder.path / ".shipyard").exists()


def test_an_unsupported_store_url_is_refused_naming_the_supported_ones(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run(
        "--history", "redis://ops:s3cret@db/shipyard", "deploy", "web", "1", "-e", "x"
    )
    assert result.exit_code == 2, result
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: history 'redis://ops:***@db/shipyard': ")
    assert "no store for the scheme 'redis'; supported: a file path, sqlite://" in line
    assert "s3cret" not in result.output
    assert not (shipyarder.path / ".shipyard").exists()


def test_a_sqlite_url_names_a_file(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    url = f"sqlite://{shipyarder.path / 'url.db'}"
    assert shipyarder.run("--history", url, "deploy", "web", "1", "-e", "x").exit_code == 0
    assert query(shipyarder.path / "url.db", "SELECT count(*) FROM deployments") == [(1,)]


# -- indexes --------------------------------------------------------------------------------------------


def traced_plans(store, call):
    """EXPLAIN QUERY PLAN of every SELECT that ``call(store)`` runs."""
    statements: list[str] = []
    store.conn.set_trace_callback(statements.append)
    try:
        call(store)
    finally:
        store.conn.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT")]
    assert selects
    return {s: [row[-1] for row in store.conn.execute("EXPLAIN QUERY PLAN " + s)] for s in selects}


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda s: s.deployments(limit=20), id="history"),
        pytest.param(lambda s: s.deployments(pipeline="web", environment="x", limit=20),
                     id="history-pipeline-env"),
        pytest.param(lambda s: s.rollback_target(40), id="rollback-target"),
        pytest.param(lambda s: s.rollback_target(41), id="rollback-target-of-a-rollback"),
        pytest.param(lambda s: s.previous_version("web", "x"), id="previous-version"),
        pytest.param(lambda s: s.logs(40), id="logs"),
    ],
)  # fmt: skip
def test_listing_and_rollback_queries_use_indexes(tmp_path, call):
    store = open_store(str(tmp_path / "h.db"))
    try:
        for i in range(40):
            store.finish(begin(store, f"1.{i}"), Status.SUCCEEDED, None)
        store.finish(begin(store, "1.10", rollback_of=40), Status.SUCCEEDED, None)
        assert [d["id"] for d in store.deployments(limit=2)] == [41, 40]
        for plan_sql, plan in traced_plans(store, call).items():
            text = "\n".join(plan)
            assert any("USING INDEX" in p or "USING COVERING INDEX" in p or "PRIMARY KEY" in p
                       for p in plan), f"{plan_sql}\n{text}"  # fmt: skip
            for p in plan:
                assert not (p.startswith("SCAN") and "INDEX" not in p), f"{plan_sql}\n{text}"
            assert "USE TEMP B-TREE FOR ORDER BY" not in text, f"{plan_sql}\n{text}"
    finally:
        store.close()


# -- states only a damaged file holds ---------------------------------------------------------------


def test_repair_frees_locks_left_without_a_running_deployment(tmp_path):
    # No sequence of port calls leaves such a lock (finish and every interruption free the lock
    # in the same transaction), so it is written here with SQL: a file damaged by hand, or by
    # an older Shipyard.
    path = tmp_path / "h.db"
    store = open_store(str(path))
    try:
        done = begin(store, "1")
        store.finish(done, Status.SUCCEEDED, None)
        live = begin(store, "2", environment="y")
        conn = sqlite3.connect(path, isolation_level=None)
        try:
            for dep_id, env in ((done, "x"), (999, "z")):
                conn.execute(
                    "INSERT INTO locks VALUES ('web', ?, ?, 1, 'h', NULL, 'u', '1', ?, ?, NULL)",
                    (env, dep_id, "2026-01-01T00:00:00.000000Z", "2026-01-01T00:00:00.000000Z"),
                )
        finally:
            conn.close()
        assert [lk["deployment_id"] for lk in store.locks()] == [done, live, 999]
        assert store.repair(never) == []
        assert [lk["deployment_id"] for lk in store.locks()] == [live]
        assert store.get(done)["status"] == "succeeded"
        assert begin(store, "3") > live
    finally:
        store.close()


def test_repair_when_nothing_runs_does_not_write(tmp_path):
    """Every command repairs first: with nothing running it is a read, not a write transaction
    (which would wait for, and block, the deployments of other processes)."""
    store = open_store(str(tmp_path / "h.db"))
    try:
        store.finish(begin(store), Status.SUCCEEDED, None)
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        try:
            assert store.repair(lambda ref: True) == []
        finally:
            store.conn.set_trace_callback(None)
        assert statements
        assert all(s.lstrip().upper().startswith("SELECT") for s in statements), statements
    finally:
        store.close()


def test_history_error_is_a_shipyard_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("junk" * 100)
    with pytest.raises(HistoryError) as info:
        open_store(str(path))
    assert info.value.exit_code == 2


def test_a_deployment_that_waits_for_the_write_lock_starts_after_it_got_it(tmp_path):
    # begin reads the clock holding the lock: a start recorded while another writer (the
    # previous deployment's finish) held the file would precede that writer's end.
    import threading
    import time

    from shipyard._reports import parse_ts

    path = tmp_path / "history.db"
    store = open_store(str(path))
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    ids: list[int] = []
    waiter = threading.Thread(target=lambda: ids.append(begin(store, lock=False)))
    waiter.start()
    time.sleep(0.3)
    released = time.time()
    other.execute("COMMIT")
    waiter.join(10)
    other.close()
    try:
        assert parse_ts(store.get(ids[0])["started_at"]) >= released - 0.001
    finally:
        store.close()
