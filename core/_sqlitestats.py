"""The delivery figures of a SQLite history (``shipyard stats``, issue #19), kept up to date as
the history is written, so that a window of a million deployments is read, not recomputed.

What the store keeps (schema version 6), beside the deployments themselves:

- ``stats_days``: per pipeline, environment and day (UTC, from ``started_at``), how many changes,
  failed changes, rollbacks and succeeded changes started that day. Triggers on ``deployments``
  keep it exact on every insert and every change of a status, a start, a rollback target;
  ``stats_days_all`` is the same per day alone (its sums over pipelines and environments), so
  that a window over all of them reads thousands of rows, not hundreds of thousands.
- ``stats_hits``: which deployments each rollback marks as rolled back (the one it names and the
  one it follows); ``stats_failures``: every failed or rolled-back deployment with the deployment
  that restored it (the next succeeded one there that was not rolled back itself), its start and
  its end. These depend on later deployments, so the triggers only note, in ``stats_dirty``, the
  earliest start changed in each pipeline and environment; :func:`refresh` recomputes what that
  can have changed (the failures from there on, the ones not yet restored, the ones restored from
  there on) and nothing else. ``stats`` refreshes before it reads: after a deployment, that is the
  few rows it touched; after the migration to version 6, the whole history once.

:func:`direct_rows` is the same answer computed from the deployments alone, as before version 6:
what a read-only history gets (it cannot keep anything), and the reference the tests hold the
kept figures to.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any

if TYPE_CHECKING:
    from ._store import CommitRow
    from ._store import StatsRows

#: A query's rows as dicts (the store's ``_query``), or as tuples.
Query = Callable[[str, Sequence[Any]], list[dict[str, Any]]]
Rows = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]

# -- the schema (version 6) -------------------------------------------------------------------------

#: What each kept count counts, as a condition on a deployment row (``{r}``: ``NEW.``, ``OLD.``
#: or nothing): the triggers, the migration and the queries of the deployments all use these.
_COUNTED = {
    "changes": "{r}rollback_of IS NULL AND {r}status IN ('succeeded', 'failed')",
    "failed": "{r}rollback_of IS NULL AND {r}status = 'failed'",
    "rollbacks": "{r}rollback_of IS NOT NULL",
    "succeeded": "{r}rollback_of IS NULL AND {r}status = 'succeeded'",
}
_COUNTS = tuple(_COUNTED)
#: The day a deployment counts on (UTC, from its start); ``''`` for one that never started.
_DAY = "coalesce(substr({r}started_at, 1, 10), '')"
#: The distinct days with a succeeded change, over rows of ``stats_days`` or ``stats_days_all``.
_DAYS = "count(DISTINCT CASE WHEN succeeded > 0 AND day <> '' THEN day END) AS days"


def count_columns(r: str = "") -> str:
    """``count(...) AS changes, ...``: the kept counts, computed from deployment rows."""
    return ", ".join(
        f"count(CASE WHEN {cond.format(r=r)} THEN 1 END) AS {name}"
        for name, cond in _COUNTED.items()
    )


def _contribution(r: str) -> str:
    """What the row ``r`` (``NEW`` or ``OLD``) adds to its day: the day, then each count."""
    ones = (f"CASE WHEN {cond.format(r=r + '.')} THEN 1 ELSE 0 END" for cond in _COUNTED.values())
    return ", ".join([_DAY.format(r=r + "."), *ones])


def _add(r: str, sign: str) -> str:
    """The trigger statements adding (``+``) or taking away (``-``) the row ``r``'s counts, in
    its pipeline and environment's day and in the whole history's day."""
    update = ", ".join(f"{k} = {k} {sign} excluded.{k}" for k in _COUNTS)
    counts, values = ", ".join(_COUNTS), _contribution(r)
    return (
        f"INSERT INTO stats_days (pipeline, environment, day, {counts}) "
        f"VALUES ({r}.pipeline, {r}.environment, {values}) "
        f"ON CONFLICT (pipeline, environment, day) DO UPDATE SET {update}; "
        f"INSERT INTO stats_days_all (day, {counts}) VALUES ({values}) "
        f"ON CONFLICT (day) DO UPDATE SET {update};"
    )


def _dirty(r: str) -> str:
    return (
        "INSERT INTO stats_dirty (pipeline, environment, since) VALUES "
        f"({r}.pipeline, {r}.environment, coalesce({r}.started_at, '')) "
        "ON CONFLICT (pipeline, environment) DO UPDATE SET since = min(since, excluded.since);"
    )


#: The columns whose change can change a figure (not a heartbeat, a stage counter, a pid).
_WATCHED = "status, started_at, finished_at, rollback_of, pipeline, environment"


def add_stats_v6(db: Any) -> None:
    """Version 6: the kept delivery figures (this module's docstring), filled from the
    deployments already there; the first ``stats`` after the migration computes the rest."""
    db.execute(
        "CREATE TABLE stats_days (pipeline TEXT NOT NULL, environment TEXT NOT NULL, "
        "day TEXT NOT NULL, changes INTEGER NOT NULL, failed INTEGER NOT NULL, "
        "rollbacks INTEGER NOT NULL, succeeded INTEGER NOT NULL, "
        "PRIMARY KEY (pipeline, environment, day)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE stats_days_all (day TEXT PRIMARY KEY, changes INTEGER NOT NULL, "
        "failed INTEGER NOT NULL, rollbacks INTEGER NOT NULL, succeeded INTEGER NOT NULL) "
        "WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE stats_dirty (pipeline TEXT NOT NULL, environment TEXT NOT NULL, "
        "since TEXT NOT NULL, PRIMARY KEY (pipeline, environment)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE TABLE stats_hits (rollback_id INTEGER NOT NULL, deployment_id INTEGER NOT NULL, "
        "pipeline TEXT NOT NULL, environment TEXT NOT NULL, rollback_started_at TEXT NOT NULL, "
        "started_at TEXT NOT NULL, PRIMARY KEY (rollback_id, deployment_id)) WITHOUT ROWID"
    )
    db.execute(
        "CREATE INDEX ix_stats_hits_pe ON stats_hits (pipeline, environment, rollback_started_at)"
    )
    db.execute(
        "CREATE TABLE stats_failures (deployment_id INTEGER PRIMARY KEY, pipeline TEXT NOT NULL, "
        "environment TEXT NOT NULL, started_at TEXT NOT NULL, at_jd REAL NOT NULL, "
        "status TEXT NOT NULL, is_rollback INTEGER NOT NULL, hit INTEGER NOT NULL, "
        "restore_id INTEGER, restore_started_at TEXT, restored_jd REAL)"
    )
    db.execute(
        "CREATE INDEX ix_stats_fail_pe ON stats_failures (pipeline, environment, started_at)"
    )
    db.execute("CREATE INDEX ix_stats_fail_at ON stats_failures (started_at)")
    db.execute(
        "CREATE INDEX ix_stats_fail_restored ON stats_failures (pipeline, environment, "
        "restore_started_at)"
    )
    # A whole history's outages read in the order of their restore, with no sort (the times
    # are Julian days: no timestamp is parsed when they are read).
    db.execute(
        "CREATE INDEX ix_stats_fail_restore ON stats_failures (restore_id, at_jd, restored_jd)"
    )
    db.execute(
        f"CREATE TRIGGER stats_insert AFTER INSERT ON deployments BEGIN {_add('NEW', '+')} "
        f"{_dirty('NEW')} END"
    )
    db.execute(
        f"CREATE TRIGGER stats_update AFTER UPDATE OF {_WATCHED} ON deployments BEGIN "
        f"{_add('OLD', '-')} {_add('NEW', '+')} {_dirty('OLD')} {_dirty('NEW')} END"
    )
    db.execute(
        f"CREATE TRIGGER stats_delete AFTER DELETE ON deployments BEGIN {_add('OLD', '-')} "
        f"{_dirty('OLD')} END"
    )
    counts = ", ".join(_COUNTS)
    db.execute(
        f"INSERT INTO stats_days (pipeline, environment, day, {counts}) SELECT pipeline, "
        f"environment, {_DAY.format(r='')}, {count_columns()} FROM deployments GROUP BY 1, 2, 3"
    )
    sums = ", ".join(f"sum({k})" for k in _COUNTS)
    db.execute(
        f"INSERT INTO stats_days_all (day, {counts}) SELECT day, {sums} FROM stats_days "
        "GROUP BY day"
    )
    db.execute(
        "INSERT INTO stats_dirty (pipeline, environment, since) SELECT pipeline, environment, '' "
        "FROM deployments GROUP BY 1, 2"
    )


# -- keeping the failures up to date ------------------------------------------------------------


def refresh(c: sqlite3.Connection) -> None:
    """Recompute what the deployments written since the last refresh can have changed; inside
    the caller's write transaction."""
    for pipeline, environment, since in c.execute(
        "SELECT pipeline, environment, since FROM stats_dirty"
    ).fetchall():
        _refresh_pair(c, pipeline, environment, since)
    c.execute("DELETE FROM stats_dirty")


def _first_hit(c: sqlite3.Connection, pe: tuple[str, str], since: str) -> str | None:
    """The earliest start of a deployment that a rollback of ``pe`` from ``since`` on marks."""
    row = c.execute(
        "SELECT min(started_at) FROM stats_hits WHERE pipeline=? AND environment=? "
        "AND rollback_started_at >= ?",
        (*pe, since),
    ).fetchone()
    return row[0] if row else None


def _refresh_pair(c: sqlite3.Connection, p: str, e: str, since: str) -> None:
    from ._stats import previous_sql

    pe = (p, e)
    # 1. The rollbacks that started from ``since`` on mark their deployments again (the one each
    # names, if it is of this pipeline and environment, and the one it follows there).
    old_hit = _first_hit(c, pe, since)
    c.execute(
        "DELETE FROM stats_hits WHERE pipeline=? AND environment=? AND rollback_started_at >= ?",
        (*pe, since),
    )
    c.execute(
        "INSERT OR IGNORE INTO stats_hits (rollback_id, deployment_id, pipeline, environment, "
        "rollback_started_at, started_at) "
        "SELECT h.rb, t.id, t.pipeline, t.environment, h.at, t.started_at FROM ("
        "SELECT rb.id AS rb, rb.started_at AS at, rb.pipeline AS p, rb.environment AS e, "
        "rb.rollback_of AS target FROM deployments rb WHERE rb.pipeline=? AND rb.environment=? "
        "AND rb.started_at >= ? AND rb.rollback_of > 0 "
        f"UNION ALL SELECT rb.id, rb.started_at, rb.pipeline, rb.environment, {previous_sql()} "
        "FROM deployments rb WHERE rb.pipeline=? AND rb.environment=? AND rb.started_at >= ? "
        "AND rb.rollback_of > 0) AS h "
        "JOIN deployments t ON t.id = h.target AND t.pipeline = h.p AND t.environment = h.e "
        "AND t.started_at IS NOT NULL",
        (*pe, since, *pe, since),
    )
    new_hit = _first_hit(c, pe, since)
    start = min(s for s in (since, old_hit, new_hit) if s is not None)
    # 2. The failures whose facts that can change: from ``start`` on, those not yet restored,
    # and those restored from ``start`` on (by a deployment now rolled back, or no longer the
    # first good one after them).
    c.execute("DROP TABLE IF EXISTS temp.stats_redo")
    c.execute(
        "CREATE TEMP TABLE stats_redo AS SELECT deployment_id AS id FROM stats_failures "
        "WHERE pipeline=? AND environment=? AND started_at < ? AND (restore_started_at IS NULL "
        "OR restore_started_at >= ?)",
        (*pe, start, start),
    )
    c.execute(
        "DELETE FROM stats_failures WHERE pipeline=? AND environment=? AND (started_at >= ? "
        "OR restore_started_at IS NULL OR restore_started_at >= ?)",
        (*pe, start, start),
    )
    hits = "(SELECT deployment_id FROM stats_hits WHERE pipeline=? AND environment=?)"
    c.execute(
        "INSERT INTO stats_failures (deployment_id, pipeline, environment, started_at, at_jd, "
        "status, is_rollback, hit, restore_id, restore_started_at, restored_jd) "
        "SELECT f.id, f.pipeline, f.environment, f.started_at, julianday(f.at), f.status, "
        "f.is_rollback, f.hit, s.id, s.started_at, julianday(s.finished_at) FROM ("
        "SELECT d.id, d.pipeline, d.environment, d.started_at, "
        "coalesce(d.finished_at, d.started_at) AS at, d.status, d.rollback_of IS NOT NULL "
        f"AS is_rollback, d.id IN {hits} AS hit, "
        "(SELECT s.id FROM deployments s WHERE s.pipeline = d.pipeline AND s.environment = "
        "d.environment AND s.status = 'succeeded' AND s.started_at > d.started_at "
        f"AND s.id NOT IN {hits} ORDER BY s.started_at, s.id LIMIT 1) AS sid "
        # From ``start`` on along ix_dep_pe, and the ones to redo before it, by id.
        "FROM (SELECT x.id FROM deployments x WHERE x.pipeline=? AND x.environment=? "
        f"AND x.started_at >= ? AND (x.status = 'failed' OR x.id IN {hits}) "
        "UNION ALL SELECT id FROM temp.stats_redo) AS todo JOIN deployments d ON d.id = todo.id"
        ") AS f LEFT JOIN deployments s ON s.id = f.sid",
        (*pe, *pe, *pe, start, *pe),
    )
    c.execute("DROP TABLE temp.stats_redo")


# -- reading ----------------------------------------------------------------------------------------


def _window(
    pipeline: str | None, environment: str | None, since: str | None, alias: str = "d"
) -> tuple[str, list[Any]]:
    from ._stats import window_sql

    return window_sql(pipeline, environment, since, alias=alias)


def _next_day(ts: str) -> str:
    """The day after the one ``ts`` (ISO 8601) starts with, as ``YYYY-MM-DD``."""
    import datetime

    return (datetime.date.fromisoformat(ts[:10]) + datetime.timedelta(days=1)).isoformat()


def kept_rows(
    query: Query, rows: Rows, *, pipeline: str | None, environment: str | None, since: str | None,
    commits: bool,
) -> StatsRows:  # fmt: skip
    """The figures of a window from the kept tables (refreshed by the caller)."""
    pe_where, pe_params = _window(pipeline, environment, None, alias="k")
    days = "stats_days_all" if pipeline is None and environment is None else "stats_days"
    sums = (
        "coalesce(sum(changes), 0) AS changes, coalesce(sum(failed), 0) AS failed, "
        "coalesce(sum(rollbacks), 0) AS rollbacks, coalesce(sum(succeeded), 0) AS succeeded"
    )
    if since is None:
        counts = query(
            f"SELECT {sums}, {_DAYS} FROM {days} k WHERE {pe_where}",
            pe_params,
        )[0]
    else:
        # Whole days after the first one from the kept sums; the first day, from ``since`` on,
        # from the deployments of that day alone.
        nxt = _next_day(since)
        counts = query(
            f"SELECT {sums}, {_DAYS} FROM {days} k WHERE k.day >= ? AND {pe_where}",
            [nxt, *pe_params],
        )[0]
        w, params = _window(pipeline, environment, since)
        first = query(
            f"SELECT {count_columns()} FROM deployments d WHERE {w} AND d.started_at < ?",
            [*params, nxt],
        )[0]
        for k in _COUNTS:
            counts[k] += first[k]
        counts["days"] += 1 if first["succeeded"] else 0
    w, params = _window(pipeline, environment, since)
    # The first and the last start: each one step along an index (ix_dep_pe with a pipeline,
    # ix_dep_window otherwise).
    ends = {}
    for name, order in (("first_at", "ASC"), ("last_at", "DESC")):
        row = query(
            f"SELECT d.started_at FROM deployments d WHERE {w} AND d.started_at IS NOT NULL "
            f"ORDER BY d.started_at {order} LIMIT 1",
            params,
        )
        ends[name] = row[0]["started_at"] if row else None
    fw, fparams = _window(pipeline, environment, since, alias="f")
    rolled_back = query(
        f"SELECT count(*) AS n FROM stats_failures f WHERE {fw} AND f.hit AND NOT f.is_rollback "
        "AND f.status = 'succeeded'",
        fparams,
    )[0]["n"]
    # One row per restore (and one for the failures not restored yet): tuples, not dicts, for
    # a whole history's tens of thousands of outages. A window from ``since`` reads its range
    # of ix_stats_fail_at (``+``: not the whole of ix_stats_fail_restore, which only spares the
    # sort).
    group = "+f.restore_id" if since is not None else "f.restore_id"
    outages = rows(
        "SELECT f.restore_id IS NULL, count(*), (max(f.restored_jd) - min(f.at_jd)) * 86400.0 "
        f"FROM stats_failures f WHERE {fw} GROUP BY {group}",
        fparams,
    )
    return {
        **counts,  # type: ignore[typeddict-item]
        **ends,
        "rolled_back": rolled_back,
        "restores": [max(0.0, seconds) for unrestored, _, seconds in outages if not unrestored],
        "unrestored": sum(n for unrestored, n, _ in outages if unrestored),
        "commits": commit_rows(query, w, params, windowed=since is not None) if commits else [],
    }


def commit_rows(query: Query, w: str, params: Sequence[Any], *, windowed: bool) -> list[CommitRow]:
    """The commits deployed in the window: succeeded changes, per pipeline and environment.
    ``windowed``: the window has a start (see :func:`direct_rows` about the ``+``)."""
    st = "+d.status" if windowed else "d.status"
    return query(  # type: ignore[return-value]
        "SELECT pipeline, environment, git_commit, "
        "min(coalesce(finished_at, started_at)) AS deployed_at, count(*) AS deployments "
        f"FROM deployments d WHERE {st} = 'succeeded' AND +d.rollback_of IS NULL "
        f"AND d.git_commit IS NOT NULL AND {w} GROUP BY git_commit, pipeline, environment",
        params,
    )


def direct_rows(
    query: Query, *, pipeline: str | None, environment: str | None, since: str | None,
    commits: bool,
) -> StatsRows:  # fmt: skip
    """The figures of a window from the deployments alone, kept nothing: one scan of the window
    for the counts; the failures found from the rollbacks (ix_dep_rollback_of) and ``status``
    (ix_dep_status); each failure's restore one probe of ix_dep_pes."""
    from ._stats import failures_sql

    w, params = _window(pipeline, environment, since)
    # Without ANALYZE, SQLite prefers ix_dep_status for ``status = ...`` even in a narrow
    # window; there the window's index (ix_dep_window) is far better: ``+`` says so.
    st = "+d.status" if since is not None else "d.status"
    rb = "+d.rollback_of" if since is not None else "d.rollback_of"
    counts = query(
        f"SELECT {count_columns()}, count(DISTINCT CASE WHEN {_COUNTED['succeeded'].format(r='')} "
        "THEN substr(started_at, 1, 10) END) AS days, "
        f"min(started_at) AS first_at, max(started_at) AS last_at FROM deployments d WHERE {w}",
        params,
    )[0]
    # The rolled-back count (kind 0) and one row per restore (kind 1), in one statement, so
    # ``hit`` is found once.
    rows = query(
        failures_sql(w, status=st, rollback_of=rb)
        + "SELECT 0 AS kind, NULL AS sid, count(*) AS n, NULL AS seconds FROM deployments d "
        "WHERE d.id IN (SELECT id FROM hit) "
        f"AND +d.rollback_of IS NULL AND {st} = 'succeeded' AND {w} "
        "UNION ALL SELECT * FROM (SELECT 1, g.sid, count(*), (julianday(s.finished_at) - "
        "julianday(min(g.at))) * 86400.0 FROM g LEFT JOIN deployments s ON s.id = g.sid "
        "GROUP BY g.sid)",
        params * 4,
    )
    outages = [r for r in rows if r["kind"] == 1]
    return {
        **counts,  # type: ignore[typeddict-item]
        "rolled_back": next(r["n"] for r in rows if r["kind"] == 0),
        "restores": [max(0.0, o["seconds"]) for o in outages if o["sid"] is not None],
        "unrestored": sum(o["n"] for o in outages if o["sid"] is None),
        "commits": commit_rows(query, w, params, windowed=since is not None) if commits else [],
    }
