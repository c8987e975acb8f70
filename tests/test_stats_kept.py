"""The delivery figures a SQLite history keeps up to date for ``stats`` (core/_sqlitestats.py) are
exactly the ones computed from its deployments alone, whatever was written in between, in any
window; and keeping them costs a deployment only what it changed.
"""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from shipyard import Status
from shipyard import _sqlitestats as kept
from shipyard._reports import format_ts
from shipyard._sqlite import SQLiteStore

OWNER = {"pid": 100, "host": "host-a", "proc_start": "4242", "heartbeat_at": None}
PAIRS = [("web", "prod"), ("web", "staging"), ("api", "prod")]
ENDINGS = [Status.SUCCEEDED] * 5 + [Status.FAILED] * 2 + [Status.CANCELLED, Status.INTERRUPTED]
#: 2026-03-01T00:00:00Z: the histories below run from there, across days.
T0 = 1772323200.0


def never(ref: Any) -> bool:
    return False


def begin(store: SQLiteStore, pipeline: str, environment: str, **kw: Any) -> int:
    return store.begin(pipeline=pipeline, version="v1", environment=environment, owner=OWNER,
                       is_dead=never, lock=False, **kw).id  # fmt: skip


def direct(store: SQLiteStore, **window: Any) -> dict[str, Any]:
    w = {"pipeline": None, "environment": None, "since": None, **window}
    return dict(kept.direct_rows(store._query, commits=True, **w))


def normalized(rows: Any) -> dict[str, Any]:
    out = dict(rows)
    out["restores"] = sorted(round(s, 3) for s in rows["restores"])
    out["commits"] = sorted(tuple(sorted(c.items())) for c in rows["commits"])
    return out


class History:
    """A history written at chosen times: each deployment starts some hours after the last."""

    def __init__(self, store: SQLiteStore, rng: random.Random) -> None:
        self.store, self.rng, self.t = store, rng, T0
        self.ids: dict[tuple[str, str], list[int]] = {pe: [] for pe in PAIRS}

    def deploy(self, pe: tuple[str, str], status: Status | None, rollback_of: int | None = None,
               commit: str | None = None) -> int:  # fmt: skip
        self.t += self.rng.choice([60, 600, 3600, 5 * 3600, 20 * 3600, 30 * 3600])
        dep_id = begin(self.store, *pe, rollback_of=rollback_of, info={"git_commit": commit})
        self.store.conn.execute(
            "UPDATE deployments SET started_at=? WHERE id=?", (format_ts(self.t), dep_id)
        )
        if status is not None:  # None: still running
            self.t += self.rng.choice([5, 90, 1800])
            self.store.finish(dep_id, status, None if status is Status.SUCCEEDED else "x")
            self.store.conn.execute(
                "UPDATE deployments SET finished_at=? WHERE id=?", (format_ts(self.t), dep_id)
            )
        self.ids[pe].append(dep_id)
        return dep_id

    def random(self, n: int) -> None:
        for _ in range(n):
            pe = self.rng.choice(PAIRS)
            earlier = self.ids[pe]
            back = self.rng.choice(earlier) if earlier and self.rng.random() < 0.25 else None
            status = self.rng.choice(ENDINGS) if self.rng.random() < 0.95 else None
            self.deploy(pe, status, back, commit=self.rng.choice(["a" * 40, "b" * 40, None]))

    def windows(self) -> list[dict[str, Any]]:
        starts = [r[0] for r in self.store.conn.execute("SELECT started_at FROM deployments")]
        sinces = [None, format_ts(T0 + 86400 * 2.5), *self.rng.sample(starts, min(4, len(starts)))]
        sinces += [s[:10] + "T00:00:00.000000Z" for s in sinces[2:4]]
        out = []
        for since in sinces:
            for pipeline, environment in [(None, None), ("web", None), (None, "prod"),
                                          ("api", "prod"), ("nope", None)]:  # fmt: skip
                out.append({"since": since, "pipeline": pipeline, "environment": environment})
        return out


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    """A new history written at chosen times; closed after the test."""
    store = SQLiteStore(tmp_path / "history.db")
    try:
        yield History(store, random.Random(1))
    finally:
        store.close()


def assert_kept_equals_direct(history: History) -> None:
    for w in history.windows():
        got = normalized(history.store.stats_rows(**w))
        want = normalized(direct(history.store, **w))
        assert got == want, w
    assert history.store.conn.execute("SELECT count(*) FROM stats_dirty").fetchone() == (0,)


@pytest.mark.parametrize("seed", range(8))
def test_the_kept_figures_are_the_direct_ones_as_the_history_grows(tmp_path, seed):
    store = SQLiteStore(tmp_path / "history.db")
    history = History(store, random.Random(seed))
    try:
        for _ in range(5):
            history.random(12)
            assert_kept_equals_direct(history)
    finally:
        store.close()


def test_a_rollback_of_a_restore_moves_the_outage_to_the_next_good_deployment(history):
    h, store = history, history.store
    web = ("web", "prod")
    h.deploy(web, Status.SUCCEEDED)
    h.deploy(web, Status.FAILED)
    fix = h.deploy(web, Status.SUCCEEDED)
    before = store.stats_rows()
    assert (len(before["restores"]), before["unrestored"], before["rolled_back"]) == (1, 0, 0)
    # The fix turns out bad and is rolled back, by a rollback that fails: nothing restored now.
    h.deploy(web, Status.FAILED, rollback_of=fix)
    mid = store.stats_rows()
    assert (mid["restores"], mid["unrestored"], mid["rolled_back"]) == ([], 3, 1)
    assert normalized(mid) == normalized(direct(store))
    # A second rollback succeeds: one outage, from the first failure to its end.
    h.deploy(web, Status.SUCCEEDED, rollback_of=fix)
    after = store.stats_rows()
    assert (len(after["restores"]), after["unrestored"], after["rolled_back"]) == (1, 0, 1)
    assert normalized(after) == normalized(direct(store))
    assert after["restores"][0] > before["restores"][0]


def test_a_deployment_marks_only_its_own_pipeline_and_environment_from_its_start(history):
    h, store = history, history.store
    h.random(10)
    store.stats_rows()
    dirty = "SELECT pipeline, environment, since FROM stats_dirty"
    assert store.conn.execute(dirty).fetchall() == []
    dep_id = h.deploy(("api", "prod"), None)
    start = store.get(dep_id)["started_at"]
    assert store.conn.execute(dirty).fetchall() == [("api", "prod", start)]
    store.stats_rows()
    # A heartbeat, a stage counter, a cancel request change no figure: nothing to recompute.
    store.heartbeat(dep_id)
    store.request_cancel(dep_id, user="tester", reason="test")
    assert store.conn.execute(dirty).fetchall() == []
    store.finish(dep_id, Status.FAILED, "x")
    assert store.conn.execute(dirty).fetchall() == [("api", "prod", start)]
    assert normalized(store.stats_rows()) == normalized(direct(store))


def test_a_schema_5_history_is_migrated_and_its_figures_kept_from_all_of_it(tmp_path):
    path = tmp_path / "history.db"
    store = SQLiteStore(path)
    h = History(store, random.Random(3))
    h.random(40)
    want = normalized(direct(store))
    store.close()
    # As Shipyard wrote it before schema 6: no kept tables, no triggers.
    conn = sqlite3.connect(path, isolation_level=None)
    for kind, name in conn.execute(
        "SELECT type, name FROM sqlite_master WHERE name LIKE 'stats%' AND type IN "
        "('table', 'trigger')"
    ).fetchall():
        conn.execute(f"DROP {kind.upper()} {name}")
    conn.execute("PRAGMA user_version=5")
    conn.close()
    store = SQLiteStore(path)
    try:
        assert store.migrated == [6]
        assert normalized(store.stats_rows()) == want
        assert_kept_equals_direct(History(store, random.Random(4)))
    finally:
        store.close()


def test_a_read_only_history_computes_the_figures_and_writes_nothing(tmp_path):
    path = tmp_path / "history.db"
    store = SQLiteStore(path)
    History(store, random.Random(5)).random(20)
    dirty = store.conn.execute("SELECT count(*) FROM stats_dirty").fetchone()[0]
    assert dirty > 0
    want = normalized(direct(store))
    store.read_only = "a test says so"  # what a file nobody may write gets on opening
    got = normalized(store.stats_rows())
    assert got == want
    assert store.conn.execute("SELECT count(*) FROM stats_dirty").fetchone()[0] == dirty
    assert store.conn.execute("SELECT count(*) FROM stats_failures").fetchone()[0] == 0
    # The same answer as the kept figures, once the file may be written again.
    store.read_only = None
    assert normalized(store.stats_rows()) == got
    assert store.conn.execute("SELECT count(*) FROM stats_failures").fetchone()[0] > 0
    store.close()


def test_an_end_time_changed_after_a_refresh_is_recomputed(history):
    # The outages' lengths are kept; a write of finished_at alone must mark them for redoing.
    h, store = history, history.store
    web = ("web", "prod")
    h.deploy(web, Status.FAILED)
    fix = h.deploy(web, Status.SUCCEEDED)
    before = store.stats_rows()["restores"]
    store.conn.execute(
        "UPDATE deployments SET finished_at=? WHERE id=?", (format_ts(h.t + 7200), fix)
    )
    after = store.stats_rows()["restores"]
    assert normalized(store.stats_rows()) == normalized(direct(store))
    assert len(before) == len(after) == 1
    assert after[0] > before[0] + 7000
