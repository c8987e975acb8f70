"""The SQLite history: schema, refusal of foreign files, permissions, completeness, rollback target."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from shipyard import HistoryError
from shipyard import NoPreviousDeployment
from shipyard._history import APPLICATION_ID
from shipyard._history import MIGRATIONS
from shipyard._history import SCHEMA_VERSION
from shipyard._history import open_store

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
    dep = store.begin(pipeline="web", version="1", environment="x", lock=False)
    store.close()

    def add_notes(db):
        db["notes"].create({"id": int, "text": str}, pk="id")

    import shipyard._history as history

    monkeypatch.setitem(history.MIGRATIONS, SCHEMA_VERSION + 1, add_notes)
    monkeypatch.setattr(history, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    store = open_store(str(path))
    try:
        assert store.get(dep)["version"] == "1"
    finally:
        store.close()
    assert query(path, "PRAGMA user_version") == [(SCHEMA_VERSION + 1,)]
    assert query(path, "SELECT name FROM sqlite_master WHERE name='notes'") == [("notes",)]


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


def test_an_unsupported_store_url_is_refused(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run(
        "--history", "postgresql://db/shipyard", "deploy", "web", "1", "-e", "x"
    )
    assert result.exit_code == 2
    assert "unsupported store 'postgresql'; use a file path or sqlite:///path" in result.stderr


def test_a_sqlite_url_names_a_file(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    url = f"sqlite://{shipyarder.path / 'url.db'}"
    assert shipyarder.run("--history", url, "deploy", "web", "1", "-e", "x").exit_code == 0
    assert query(shipyarder.path / "url.db", "SELECT count(*) FROM deployments") == [(1,)]


# -- completeness -------------------------------------------------------------------------------------


def test_every_deployment_stage_step_and_line_is_recorded(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    for version in ("1", "2"):
        assert shipyarder.run("deploy", "web", version, "-e", "x").exit_code == 0
    db = shipyarder.history_path
    deployments = query(db, "SELECT id, pipeline, version, environment, status, user, host, pid, "
                            "started_at, finished_at, file_hash FROM deployments ORDER BY id")  # fmt: skip
    assert [d[:5] for d in deployments] == [(1, "web", "1", "x", "succeeded"),
                                            (2, "web", "2", "x", "succeeded")]  # fmt: skip
    for d in deployments:
        assert all(v is not None for v in d), d
    assert query(
        db, "SELECT deployment_id, idx, name, status, parallel FROM stages ORDER BY 1, 2"
    ) == [
        (1, 0, "build", "succeeded", 0),
        (1, 1, "verify", "succeeded", 1),
        (2, 0, "build", "succeeded", 0),
        (2, 1, "verify", "succeeded", 1),
    ]
    steps = query(db, "SELECT deployment_id, stage_idx, idx, name, kind, status, attempts, "
                      "exit_code, started_at IS NOT NULL, finished_at IS NOT NULL FROM steps "
                      "ORDER BY 1, 2, 3")  # fmt: skip
    assert steps == [
        (dep, si, i, name, "command", "succeeded", 1, 0, 1, 1)
        for dep in (1, 2)
        for si, i, name in (
            (0, 0, "compile"),
            (0, 1, "package"),
            (1, 0, "smoke"),
            (1, 1, "metrics"),
        )
    ]
    logs = query(db, "SELECT deployment_id, stage_idx, step_idx, stream, line FROM logs "
                     "ORDER BY deployment_id, stage_idx, step_idx, id")  # fmt: skip
    assert sorted(logs) == sorted(
        (dep, *row)
        for dep in (1, 2)
        for row in ((0, 0, "stdout", "one"), (0, 0, "stderr", "two"), (0, 1, "stdout", "three"),
                    (1, 0, "stdout", "four"), (1, 0, "stdout", "five"), (1, 1, "stdout", "six"))
    )  # fmt: skip


@pytest.mark.slow
def test_a_thousand_steps_are_all_recorded(shipyarder):
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def big(d):
            return [
                sy.stage(f"stage-{s}", *[sy.command("step", str(s), str(i), name=f"s{s}-{i}")
                                         for i in range(100)], parallel=s % 2 == 1)
                for s in range(10)
            ]
        """
    )

    def handler(step, context):
        context.log_lines([f"{step.name} line 1", f"{step.name} line 2"])

    shipyarder.fake_executor("command", handler)
    deployed = shipyarder.deploy("big", "1", "x")
    assert deployed.status == "succeeded"
    deployed.assert_outcomes(succeeded=1000)
    db = shipyarder.history_path
    assert query(
        db, "SELECT count(*), count(DISTINCT name) FROM steps WHERE status='succeeded'"
    ) == [(1000, 1000)]
    assert query(db, "SELECT count(*) FROM stages WHERE status='succeeded'") == [(10,)]
    lines = {r[0] for r in query(db, "SELECT line FROM logs")}
    assert lines == {f"s{s}-{i} line {n}" for s in range(10) for i in range(100) for n in (1, 2)}
    assert query(db, "SELECT count(*) FROM logs") == [(2000,)]


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
            dep = store.begin(pipeline="web", version=f"1.{i}", environment="x", lock=False)
            store.apply([("UPDATE deployments SET status='succeeded' WHERE id=?", (dep,))], [])
        store.begin(pipeline="web", version="1.10", environment="x", rollback_of=40, lock=False)
        store.apply([("UPDATE deployments SET status='succeeded' WHERE id=41", ())], [])
        for plan_sql, plan in traced_plans(store, call).items():
            text = "\n".join(plan)
            assert any("USING INDEX" in p or "USING COVERING INDEX" in p or "PRIMARY KEY" in p
                       for p in plan), f"{plan_sql}\n{text}"  # fmt: skip
            for p in plan:
                assert not (p.startswith("SCAN") and "INDEX" not in p), f"{plan_sql}\n{text}"
            assert "USE TEMP B-TREE FOR ORDER BY" not in text, f"{plan_sql}\n{text}"
    finally:
        store.close()


# -- any sequence of outcomes keeps every record (property) ---------------------------------------------

#: A pipelines file whose stages come from --var plan=JSON; its own step type logs N lines, then
#: succeeds, fails, raises, or hangs until cancelled.
PLANNED = """
import asyncio
import json

import shipyard as sy


class Scripted(sy.Step):
    kind = "scripted"

    def __init__(self, outcome, lines, **options):
        self.outcome, self.lines = outcome, lines
        super().__init__(**options)

    async def run(self, context):
        context.log_lines([f"{self.name} #{n}" for n in range(self.lines)])
        if self.outcome == "fail":
            raise sy.StepFailed(f"{self.name} failed", step_exit_code=3)
        if self.outcome == "raise":
            raise RuntimeError(f"{self.name} crashed")
        if self.outcome == "hang":
            await asyncio.sleep(3600)
        return sy.StepResult(exit_code=0)


@sy.hookimpl
def shipyard_register_step_types(registry):
    registry.add(Scripted)


@sy.pipeline
def planned(d):
    return [
        sy.stage(f"s{si}", *[Scripted(o, n, name=f"s{si}-{i}") for i, (o, n) in enumerate(steps)],
                 parallel=parallel, continue_on_failure=cof)
        for si, (parallel, cof, steps) in enumerate(json.loads(d.vars["plan"]))
    ]
"""

step_plan = st.tuples(st.sampled_from(["ok", "fail", "raise", "hang"]), st.integers(0, 3))
stage_plan = st.tuples(st.booleans(), st.booleans(), st.lists(step_plan, min_size=1, max_size=4))
deployment_plan = st.lists(stage_plan, min_size=1, max_size=4)


def runnable(plan):
    """Hang only where a failing sibling in a parallel stage will cancel it."""
    out = []
    for parallel, cof, steps in plan:
        stops = parallel and not cof and any(o in ("fail", "raise") for o, _ in steps)
        out.append([parallel, cof, [[o if o != "hang" or stops else "ok", n] for o, n in steps]])
    return out


def expected_outcome(plan):
    """Independent model of DESIGN §2: statuses of the deployment, stages and steps."""
    status, stopped, stages = "succeeded", False, []
    for parallel, cof, steps in plan:
        if stopped:
            stages.append(("skipped", ["skipped"] * len(steps)))
            continue
        results = []
        for outcome, _ in steps:
            failing = outcome in ("fail", "raise")
            if not parallel and not cof and any(r == "failed" for r in results):
                results.append("skipped")
            elif outcome == "hang":
                results.append("cancelled")
            else:
                results.append("failed" if failing else "succeeded")
        failed = "failed" in results and not cof
        stages.append(("failed" if failed else "succeeded", results))
        if failed:
            status, stopped = "failed", True
    return status, stages


@dataclass
class Run:
    plan: list
    doc: dict


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(deployment_plan, min_size=1, max_size=3))
def test_any_sequence_of_outcomes_keeps_every_record(plans):
    from shipyard import DeploymentManager

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pipelines.py").write_text(PLANNED)
        manager = DeploymentManager(pipelines=root / "pipelines.py", history=root / "h.db")
        runs = []
        try:
            for plan in plans:
                plan = runnable(plan)
                dep = manager.deploy("planned", "1", "x", vars={"plan": json.dumps(plan)},
                                     rollback=False)  # fmt: skip
                runs.append(Run(plan, manager.wait(dep)))
            # Every earlier record is still there, unchanged, after the later deployments.
            for run in runs:
                doc = manager.show(run.doc["id"])
                assert doc == run.doc
                status, stages = expected_outcome(run.plan)
                assert doc["status"] == status
                assert [(s["status"], [st["status"] for st in s["steps"]]) for s in
                        doc["stages"]] == stages  # fmt: skip
                names = [[st["name"] for st in s["steps"]] for s in doc["stages"]]
                assert names == [[f"s{si}-{i}" for i in range(len(steps))]
                                 for si, (_, _, steps) in enumerate(run.plan)]  # fmt: skip
                for s in doc["stages"]:
                    for step in s["steps"]:
                        assert (step["started_at"] is None) == (step["status"] == "skipped")
                        assert (step["finished_at"] is None) == (step["status"] == "skipped")
            logged = query(root / "h.db", "SELECT deployment_id, line FROM logs ORDER BY id")
            expected_lines = sorted(
                (run.doc["id"], f"s{si}-{i} #{n}")
                for run in runs
                for si, ((_, _, steps), (_, results)) in enumerate(
                    zip(run.plan, expected_outcome(run.plan)[1], strict=True)
                )
                for i, ((_, lines), result) in enumerate(zip(steps, results, strict=True))
                if result != "skipped"
                for n in range(lines)
            )
            assert sorted(logged) == expected_lines
            assert [d["id"] for d in manager.history(limit=100)] == [
                r.doc["id"] for r in reversed(runs)
            ]
        finally:
            manager.close()


# -- the rollback target (property) -----------------------------------------------------------------------

STATUSES = ["succeeded", "failed", "cancelled", "interrupted"]


@dataclass
class Dep:
    id: int
    pipeline: str
    environment: str
    version: str
    status: str
    started_at: str
    rollback_of: int | None


@st.composite
def histories(draw):
    deps: list[Dep] = []
    for i in range(1, draw(st.integers(1, 14)) + 1):
        pipeline = draw(st.sampled_from(["web", "api"]))
        environment = draw(st.sampled_from(["staging", "production"]))
        same = [d.id for d in deps if (d.pipeline, d.environment) == (pipeline, environment)]
        rollback_of = draw(st.none() | st.sampled_from(same)) if same else None
        deps.append(Dep(i, pipeline, environment, draw(st.sampled_from(["v1", "v2", "v3", "v4"])),
                        draw(st.sampled_from(STATUSES)), f"2026-01-01T00:00:{i:02d}.000000Z",
                        rollback_of))  # fmt: skip
    return deps


def reference_target(deps: list[Dep], x: Dep) -> Dep | None:
    """DESIGN §4, written again: the latest succeeded deployment of X's pipeline and environment
    that started before X, skipping X's version (and the versions X rolled back, when X is a
    rollback) and deployments that were themselves rolled back."""
    by_id = {d.id: d for d in deps}
    bad = {x.version}
    back = x.rollback_of
    while back is not None:
        bad.add(by_id[back].version)
        back = by_id[back].rollback_of
    rolled_back = {d.rollback_of for d in deps if d.rollback_of is not None}
    candidates = [
        d
        for d in deps
        if (d.pipeline, d.environment) == (x.pipeline, x.environment)
        and d.status == "succeeded"
        and d.started_at < x.started_at
        and d.version not in bad
        and d.id not in rolled_back
    ]
    return max(candidates, key=lambda d: d.started_at, default=None)


@functools.cache
def empty_history() -> bytes:
    """The bytes of a new, empty history file (made once: migrating costs more than a test)."""
    with tempfile.TemporaryDirectory() as tmp:
        open_store(str(Path(tmp) / "h.db")).close()
        return (Path(tmp) / "h.db").read_bytes()


def write_history(path: Path, deps: list[Dep]) -> None:
    path.write_bytes(empty_history())
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA synchronous=OFF")  # test data: no fsync
    with conn:
        conn.executemany(
            "INSERT INTO deployments (id, pipeline, version, environment, status, created_at, "
            "started_at, finished_at, rollback_of) VALUES (?,?,?,?,?,?,?,?,?)",
            [(d.id, d.pipeline, d.version, d.environment, d.status, d.started_at, d.started_at,
              d.started_at, d.rollback_of) for d in deps],
        )  # fmt: skip
    conn.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data())
def test_rollback_target_follows_the_rule(deps, data):
    x = data.draw(st.sampled_from(deps))
    with tempfile.TemporaryDirectory() as tmp:
        write_history(Path(tmp) / "h.db", deps)
        store = open_store(str(Path(tmp) / "h.db"))
        try:
            expected = reference_target(deps, x)
            if expected is None:
                with pytest.raises(NoPreviousDeployment, match="nothing to roll back to"):
                    store.rollback_target(x.id)
            else:
                assert store.rollback_target(x.id)["id"] == expected.id
        finally:
            store.close()


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(histories(), st.data(), st.sampled_from(STATUSES))
def test_rolling_back_twice_never_returns_to_the_bad_version(deps, data, rollback_status):
    x = data.draw(st.sampled_from(deps))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "h.db"
        write_history(path, deps)
        store = open_store(str(path))
        try:
            try:
                first = store.rollback_target(x.id)
            except NoPreviousDeployment:
                return
            assert first["version"] != x.version
            # The rollback is itself a deployment; then it is rolled back too.
            rollback = Dep(len(deps) + 1, x.pipeline, x.environment, first["version"],
                           rollback_status, "2026-01-01T00:01:00.000000Z", x.id)  # fmt: skip
            conn = sqlite3.connect(path)
            conn.execute("PRAGMA synchronous=OFF")
            with conn:
                conn.execute(
                    "INSERT INTO deployments (id, pipeline, version, environment, status, "
                    "created_at, started_at, rollback_of) VALUES (?,?,?,?,?,?,?,?)",
                    (rollback.id, rollback.pipeline, rollback.version, rollback.environment,
                     rollback.status, rollback.started_at, rollback.started_at, x.id),
                )  # fmt: skip
            conn.close()
            try:
                second = store.rollback_target(rollback.id)
            except NoPreviousDeployment:
                return
            assert second["version"] not in (x.version, first["version"])
            assert second["id"] != x.id
        finally:
            store.close()


def test_rollback_target_examples(tmp_path):
    ts = "2026-01-01T00:00:{:02d}.000000Z".format
    deps = [
        Dep(1, "web", "prod", "v1", "succeeded", ts(1), None),
        Dep(2, "web", "prod", "v3", "succeeded", ts(2), None),  # the bad version, deployed once
        Dep(3, "web", "prod", "v2", "succeeded", ts(3), None),
        Dep(4, "web", "prod", "v3", "succeeded", ts(4), None),  # ... and again: X
        Dep(5, "web", "prod", "v2", "succeeded", ts(5), 4),  # rollback of X
        Dep(6, "web", "staging", "v9", "succeeded", ts(6), None),
        Dep(7, "web", "prod", "v4", "failed", ts(7), None),
    ]
    write_history(tmp_path / "h.db", deps)
    store = open_store(str(tmp_path / "h.db"))
    try:
        assert store.rollback_target(4)["id"] == 3  # skips nothing but its own version
        assert store.rollback_target(5)["id"] == 1  # neither v2 (its own) nor v3 (rolled back)
        assert store.rollback_target(7)["id"] == 5  # the rollback is a good deployment
        with pytest.raises(NoPreviousDeployment) as info:
            store.rollback_target(1)
        assert str(info.value) == (
            "nothing to roll back to: no succeeded deployment of 'web' in 'prod' before "
            "deployment 1 with a version other than 'v1' that was not itself rolled back; "
            "nothing was deployed there before it"
        )
        with pytest.raises(NoPreviousDeployment) as info:
            store.rollback_target(6)
        assert "before deployment 6 with a version other than 'v9'" in str(info.value)
        assert info.value.exit_code == 2
    finally:
        store.close()


def test_history_error_is_a_shipyard_error(tmp_path):
    path = tmp_path / "junk.db"
    path.write_text("junk" * 100)
    with pytest.raises(HistoryError) as info:
        open_store(str(path))
    assert info.value.exit_code == 2
