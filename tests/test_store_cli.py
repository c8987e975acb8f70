"""Choosing a store, and ``shipyard store migrate`` / ``store copy``, through the CLI.

Runners are real ``shipyard`` processes (tests/runners.py); the PostgreSQL cluster is the test
run's own (tests/pg_cluster.py).
"""

from __future__ import annotations

import json
import sqlite3
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from runners import Fleet
from runners import out_of
from shipyard import Status
from shipyard.sdk import open_store


@pytest.fixture
def schema_url(pg: Any) -> Any:
    made: list[str] = []

    def make() -> str:
        name = f"c_{uuid.uuid4().hex[:12]}"
        pg.psql(f"CREATE SCHEMA {name} AUTHORIZATION shipyard")
        made.append(name)
        return pg.url(schema=name)

    yield make
    if made:
        pg.psql("; ".join(f"DROP SCHEMA {m} CASCADE" for m in made))


# -- choosing a store -----------------------------------------------------------------------------


def test_the_store_comes_from_store_then_the_variables_then_pyproject(
    tmp_path: Path, schema_url: Any
) -> None:
    fleet = Fleet(tmp_path, schema_url())
    r = fleet.runner()
    (r.dir / "pyproject.toml").write_text('[tool.shipyard]\nstore = "from-pyproject.db"\n')
    del r.env["SHIPYARD_STORE"]
    assert r.run("deploy", "web", "1", "-e", "x").returncode == 0
    assert (r.dir / "from-pyproject.db").exists()
    r.env["SHIPYARD_HISTORY"] = str(tmp_path / "from-history.db")
    assert r.run("deploy", "web", "2", "-e", "x").returncode == 0
    assert (tmp_path / "from-history.db").exists()
    r.env["SHIPYARD_STORE"] = fleet.url  # wins over SHIPYARD_HISTORY
    assert r.run("deploy", "web", "3", "-e", "x").returncode == 0
    assert [d["version"] for d in r.json("history")] == ["3"]
    other = tmp_path / "from-option.db"
    assert r.run("--store", str(other), "deploy", "web", "4", "-e", "x").returncode == 0
    assert _versions(other) == ["4"]


def _versions(path: Path) -> list[str]:
    with sqlite3.connect(path) as conn:
        return [v for (v,) in conn.execute("SELECT version FROM deployments ORDER BY id")]


def test_pgpassword_and_pgpass_work_as_for_libpq_and_are_masked(
    tmp_path: Path, pg: Any, schema_url: Any
) -> None:
    url = schema_url()
    bare = url.replace(f"shipyard:{pg.password}@", "shipyard@")
    fleet = Fleet(tmp_path, bare)
    r = fleet.runner()
    denied = r.run("deploy", "web", "1", "-e", "x")
    assert denied.returncode == 2, out_of(denied)
    assert "cannot connect to the history store" in denied.stderr
    assert "password" in denied.stderr
    r.env["PGPASSWORD"] = pg.password
    assert r.run("deploy", "web", "1", "-e", "x").returncode == 0
    del r.env["PGPASSWORD"]
    pgpass = r.dir / ".pgpass"  # the runner's HOME
    pgpass.write_text(f"127.0.0.1:{pg.port}:shipyard:shipyard:{pg.password}\n")
    pgpass.chmod(0o600)
    ok = r.run("deploy", "web", "2", "-e", "x")
    assert ok.returncode == 0, out_of(ok)
    # Shipyard masks the passwords it is given (URL, PGPASSWORD); ~/.pgpass it never reads.
    r.env["PGPASSWORD"] = pg.password
    again = r.run("deploy", "web", "3", "-e", "x", "--var", f"echo={pg.password}")
    assert pg.password not in out_of(again)
    assert pg.password not in json.dumps(r.json("show", "3"))


def test_sslmode_is_passed_to_libpq(tmp_path: Path, schema_url: Any) -> None:
    url = schema_url() + "&sslmode=require"
    r = Fleet(tmp_path, url).runner()
    refused = r.run("deploy", "web", "1", "-e", "x")
    # The test server has no TLS: libpq refuses, as it would for any libpq program.
    assert refused.returncode == 2, out_of(refused)
    assert "SSL" in refused.stderr or "ssl" in refused.stderr, refused.stderr


def test_on_ci_a_default_local_history_gets_one_warning(tmp_path: Path) -> None:
    fleet = Fleet(tmp_path, "unused")
    r = fleet.runner()
    del r.env["SHIPYARD_STORE"]
    r.env["GITLAB_CI"] = "true"
    out = r.run("deploy", "web", "2", "-e", "x")
    assert out.returncode == 0
    assert out.stderr.count("warning: GITLAB_CI is set") == 1, out.stderr
    assert "and the lock die with the job" in out.stderr
    assert "choosing-a-store" in out.stderr
    r.env["SHIPYARD_STORE"] = str(r.dir / ".shipyard" / "history.db")  # chosen: it stays
    assert "warning" not in r.run("deploy", "web", "3", "-e", "x").stderr


def test_plan_list_and_help_never_import_psycopg(tmp_path: Path, schema_url: Any) -> None:
    r = Fleet(tmp_path, schema_url()).runner()
    code = (
        "import sys; from shipyard._cli import main\n"
        "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
        "print('PSYCOPG' if any(m.startswith('psycopg') for m in sys.modules) else 'CLEAN')"
    )
    for args in (["--help"], ["list"], ["plan", "web", "1", "-e", "x"]):
        import subprocess

        out = subprocess.run([sys.executable, "-c", code, *args], cwd=r.dir, env=r.env,
                             capture_output=True, text=True, timeout=60)  # fmt: skip
        assert out.stdout.strip().splitlines()[-1] == "CLEAN", (args, out.stdout, out.stderr)


# -- store migrate ----------------------------------------------------------------------------------


def test_store_migrate_then_a_role_without_ddl_rights_deploys(tmp_path: Path, pg: Any) -> None:
    schema = f"m_{uuid.uuid4().hex[:8]}"
    role = f"deployer_{uuid.uuid4().hex[:6]}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION shipyard")
    pg.psql(f"CREATE ROLE {role} LOGIN PASSWORD 'deployer-pw'")
    try:
        fleet = Fleet(tmp_path, pg.url(schema=schema))
        dba = fleet.runner()
        m = dba.run("store", "migrate", fleet.url)
        assert m.returncode == 0, out_of(m)
        assert "applied schema version(s) 1, 2" in m.stdout
        assert pg.password not in out_of(m)
        again = dba.run("store", "migrate", fleet.url)
        assert "nothing to do" in again.stdout
        pg.psql(
            f"GRANT USAGE ON SCHEMA {schema} TO {role}; "
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA {schema} TO {role}; "
            f"GRANT USAGE, SELECT, UPDATE ON ALL SEQUENCES IN SCHEMA {schema} TO {role}"
        )
        limited = fleet.url.replace(f"shipyard:{pg.password}@", f"{role}:deployer-pw@")
        app = fleet.runner(limited)
        ok = app.run("deploy", "web", "1", "-e", "prod")
        assert ok.returncode == 0, out_of(ok)
        # The role may not create anything there: no DDL was needed.
        denied = pg.psql(f"SELECT has_schema_privilege('{role}', '{schema}', 'CREATE')")
        assert denied.strip() == "f"
    finally:
        pg.psql(f"DROP SCHEMA {schema} CASCADE; DROP OWNED BY {role}; DROP ROLE {role}")


def test_a_newer_schema_is_refused_and_left_untouched(
    tmp_path: Path, pg: Any, schema_url: Any
) -> None:
    url = schema_url()
    open_store(url).close()
    schema = url.rsplit("search_path%3D", 1)[1]
    pg.psql(f"UPDATE {schema}.shipyard_meta SET value='99' WHERE key='schema_version'")
    r = Fleet(tmp_path, url).runner()
    out = r.run("history")
    assert out.returncode == 2, out_of(out)
    from shipyard._postgres import SCHEMA_VERSION

    assert f"history schema 99, newer than this Shipyard understands ({SCHEMA_VERSION})" in (
        out.stderr)  # fmt: skip
    assert (
        pg.psql(f"SELECT value FROM {schema}.shipyard_meta WHERE key='schema_version'").strip()
        == "99"
    )


def test_a_schema_of_someone_elses_tables_is_refused(
    tmp_path: Path, pg: Any, schema_url: Any
) -> None:
    url = schema_url()
    schema = url.rsplit("search_path%3D", 1)[1]
    pg.psql(f"CREATE TABLE {schema}.deployments (id int)")
    out = Fleet(tmp_path, url).runner().run("history")
    assert out.returncode == 2
    assert "is not a Shipyard history; it was left untouched" in out.stderr


# -- store copy -------------------------------------------------------------------------------------


def _fabricate(path: Path, count: int) -> None:
    """A SQLite history of ``count`` finished deployments (with stages, steps, lines, an
    artifact every 100, rollbacks every 10), written in bulk."""
    store = open_store(str(path))
    bulk = store.bulk()
    with bulk.transaction():
        deps, stages, steps, logs, artifacts = [], [], [], [], []
        for i in range(1, count + 1):
            ts = f"2026-01-01T00:{i // 6000 % 60:02d}:{i // 100 % 60:02d}.{i:06d}Z"
            failed = i % 10 == 9
            deps.append({
                "id": i, "pipeline": "web", "version": f"1.{i}", "environment": "prod",
                "status": "failed" if failed else "succeeded", "created_at": ts,
                "started_at": ts, "finished_at": ts, "heartbeat_at": ts,
                "rollback_of": i - 1 if i % 10 == 0 else None, "retry_of": None, "error": None,
                "user": "alice", "ci_actor": None, "host": "runner-1", "pid": 1000 + i,
                "proc_start": None, "pipelines_file": "/p/pipelines.py", "file_hash": None,
                "git_commit": None, "args": None, "vars": "{}", "shipyard_version": "0.1.0",
                "stages_total": 1, "current_stage": 0, "cancel_requested": None,
            })  # fmt: skip
            stages.append({"deployment_id": i, "idx": 0, "name": "release", "status": "succeeded",
                           "parallel": 0, "continue_on_failure": 0, "started_at": ts,
                           "finished_at": ts, "note": None})  # fmt: skip
            steps.append({"deployment_id": i, "stage_idx": 0, "idx": 0, "name": "go",
                          "kind": "command", "description": "go", "status": "succeeded",
                          "attempts": 1, "exit_code": 0, "error": None, "warning": 0,
                          "started_at": ts, "finished_at": ts})  # fmt: skip
            for n in range(2):
                logs.append({"deployment_id": i, "stage_idx": 0, "step_idx": 0, "ts": 1.0 * i,
                             "stream": "stdout", "line": f"line {n} of {i}"})  # fmt: skip
            if i % 100 == 0:
                artifacts.append({"deployment_id": i, "stage_idx": 0, "step_idx": 0,
                                  "name": "manifests", "content": f"kind: X # {i}",
                                  "created_at": ts})  # fmt: skip
        for d in deps:
            bulk.insert_deployment(d, keep_id=True)
        for table, rows in (("stages", stages), ("steps", steps), ("logs", logs),
                            ("artifacts", artifacts)):  # fmt: skip
            bulk.write(table, rows)
    store.add_audit("rollback", 10, user="alice", reason="bad release")
    store.close()


def test_store_copy_of_10000_deployments_to_postgresql_twice_copies_nothing_twice(
    tmp_path: Path, schema_url: Any
) -> None:
    src = tmp_path / "history.db"
    _fabricate(src, 10_000)
    dst = schema_url()
    r = Fleet(tmp_path, dst).runner()
    first = r.run("store", "copy", str(src), dst, timeout=600)
    assert first.returncode == 0, out_of(first)
    assert "copied 10000 deployment(s), 20000 log line(s) and 1 audit record(s)" in first.stdout
    second = r.run("store", "copy", str(src), dst, timeout=600)
    assert second.returncode == 0, out_of(second)
    assert "copied 0 deployment(s), 0 log line(s) and 0 audit record(s)" in second.stdout
    assert "10000 were there already" in second.stdout
    a, b = open_store(str(src)), open_store(dst)
    try:
        for dep_id in (1, 500, 9_999, 10_000):
            assert b.get(dep_id) == a.get(dep_id)
            assert b.stages(dep_id) == a.stages(dep_id)
            assert [x["line"] for x in b.logs(dep_id)] == [x["line"] for x in a.logs(dep_id)]
            assert b.artifacts(dep_id) == a.artifacts(dep_id)
        # What rollback needs is the same on both.
        for dep_id in (9_999, 10_000, 5_001):
            assert b.rollback_target(dep_id)["id"] == a.rollback_target(dep_id)["id"]
        assert [x["action"] for x in b.audit_trail()] == ["rollback"]
        # New deployments on the copy get ids after the copied ones.
        new = b.begin(pipeline="web", version="2.0", environment="prod",
                      owner={"pid": 1, "host": "h", "proc_start": None, "heartbeat_at": None},
                      is_dead=lambda ref: False).id  # fmt: skip
        assert new == 10_001
        b.finish(new, Status.SUCCEEDED, None)
    finally:
        a.close()
        b.close()


def test_store_copy_back_into_a_used_history_maps_the_ids(tmp_path: Path, schema_url: Any) -> None:
    pg_url = schema_url()
    fleet = Fleet(tmp_path, pg_url)
    on_pg = fleet.runner()
    for v in ("1.0", "1.1"):
        assert on_pg.run("deploy", "web", v, "-e", "prod").returncode == 0
    failed = on_pg.run("deploy", "web", "1.2", "-e", "prod", "--var", "fail=1")
    assert failed.returncode == 1
    assert on_pg.run("rollback", "3").returncode == 0
    local = tmp_path / "local.db"
    on_sqlite = fleet.runner(str(local))
    assert on_sqlite.run("deploy", "web", "0.9", "-e", "dev").returncode == 0  # id 1 is taken
    r = on_sqlite.run("store", "copy", pg_url, str(local))
    assert r.returncode == 0, out_of(r)
    assert "copied 4 deployment(s), 4 under new ids" in r.stdout
    seen = sorted(on_sqlite.json("history"), key=lambda d: d["id"])
    assert [(d["id"], d["version"], d["environment"], d["status"]) for d in seen] == [
        (1, "0.9", "dev", "succeeded"), (2, "1.0", "prod", "succeeded"),
        (3, "1.1", "prod", "succeeded"), (4, "1.2", "prod", "failed"),
        (5, "1.1", "prod", "succeeded"),
    ]  # fmt: skip
    # The rollback of 1.2 points at 1.2's new id (4), not at the id it had on PostgreSQL (3).
    assert [d["rollback_of"] for d in seen] == [None, None, None, None, 4]
    again = on_sqlite.run("store", "copy", pg_url, str(local))
    assert "copied 0 deployment(s)" in again.stdout


def test_store_copy_refuses_while_a_deployment_runs_and_names_it(
    tmp_path: Path, schema_url: Any
) -> None:
    url = schema_url()
    store = open_store(url)
    try:
        dep = store.begin(pipeline="web", version="1.0", environment="prod",
                          owner={"pid": 1, "host": "h", "proc_start": None, "heartbeat_at": None},
                          is_dead=lambda ref: False).id  # fmt: skip
        r = Fleet(tmp_path, url).runner().run("store", "copy", url, str(tmp_path / "x.db"))
        assert r.returncode == 2, out_of(r)
        assert f"deployment {dep} (web 1.0 to prod) is still running" in r.stderr
    finally:
        store.close()
