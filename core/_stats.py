"""The four DORA delivery metrics, from the history alone (``shipyard stats``, issue #19).

The store aggregates a window of deployments in SQL (:meth:`HistoryStore.stats_rows`); this
module turns those few numbers into the figures, asks git once for the commit times, and says
which performance band of the DORA report each figure falls in. The definitions and the bands
are written out in docs/guides/dora.md; keep the two in step.
"""

from __future__ import annotations

import math
import re
import subprocess
import time
from collections.abc import Mapping
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ._exceptions import UsageError

if TYPE_CHECKING:
    from ._store import CommitRow
    from ._store import HistoryStore
    from ._store import StatsRows

#: Whose bands: the 2019 Accelerate State of DevOps report (DORA).
BANDS = "DORA 2019 (Accelerate State of DevOps report)"

HOUR = 3600.0
DAY = 24 * HOUR
WEEK = 7 * DAY
MONTH = 30 * DAY

_SINCE = re.compile(r"(\d+)\s*([hdw])")
_UNITS = {"h": HOUR, "d": DAY, "w": WEEK}
_SHA = re.compile(r"[0-9a-f]{7,64}")


def parse_since(text: str, now: float) -> tuple[str | None, float | None]:
    """``--since``: a duration back from now (``30d``, ``12w``, ``48h``), a date or time
    (ISO 8601, UTC unless it says otherwise), or ``all``. Returns the window's start as
    Shipyard's timestamp text (None: all) and its length in seconds (None: all)."""
    from ._reports import format_ts

    text = text.strip().lower()
    if text == "all":
        return None, None
    m = _SINCE.fullmatch(text)
    if m:
        seconds = int(m.group(1)) * _UNITS[m.group(2)]
        if seconds <= 0:
            raise UsageError(f"--since {text!r}: the window must be longer than nothing")
        return format_ts(now - seconds), seconds
    try:
        when = datetime.fromisoformat(text.upper())
    except ValueError:
        raise UsageError(
            f"--since {text!r}: expected a duration such as 30d, 12w or 48h, a date such as "
            "2026-01-31, or all"
        ) from None
    if when.tzinfo is None:
        from datetime import UTC

        when = when.replace(tzinfo=UTC)
    start = when.timestamp()
    if start >= now:
        raise UsageError(f"--since {text!r} is in the future")
    return format_ts(start), now - start


def in_git(rootdir: str | Path) -> bool:
    """Whether ``rootdir`` is in a git work tree (False too when there is no git)."""
    try:
        inside = subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree"], cwd=rootdir, capture_output=True,
            text=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return False
    return inside.returncode == 0 and inside.stdout.strip() == "true"


def commit_times(rootdir: str | Path, shas: Sequence[str]) -> dict[str, float]:
    """The commit time of each of ``shas`` git knows, by one ``git log`` in ``rootdir`` (a git
    work tree). Unknown shas are left out."""
    wanted = sorted({s for s in shas if _SHA.fullmatch(s)})
    if not wanted:
        return {}
    try:
        # --stdin: no limit on how many; --ignore-missing: a sha git does not know is skipped.
        out = subprocess.run(
            ["git", "log", "--no-walk=unsorted", "--ignore-missing", "--format=%H %cI",
             "--stdin"],
            cwd=rootdir, input="\n".join(wanted) + "\n", capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    times: dict[str, float] = {}
    for line in out.stdout.splitlines():
        sha, _, when = line.partition(" ")
        try:
            times[sha] = datetime.fromisoformat(when).timestamp()
        except ValueError:
            continue
    return times


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def percentile(values: Sequence[float], q: float) -> float | None:
    """The nearest-rank percentile ``q`` (0-100) of ``values``; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def median(values: Sequence[float]) -> float | None:
    """The median (the mean of the middle two for an even count); None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# -- the bands (2019 report; docs/guides/dora.md says them in words) ----------------------------


def frequency_band(per_day: float) -> str:
    if per_day >= 1:
        return "elite"  # on demand: daily or more
    if per_day >= 1 / 7:
        return "high"  # between daily and weekly
    if per_day >= 1 / 30:
        return "medium"  # between weekly and monthly
    return "low"


def lead_time_band(seconds: float) -> str:
    if seconds < DAY:
        return "elite"
    if seconds < WEEK:
        return "high"
    if seconds < MONTH:
        return "medium"
    return "low"


def failure_band(rate: float) -> str:
    # The 2019 report gives elite, high and medium the same 0-15% and low 46-60%: above 15%
    # is low here.
    return "elite" if rate <= 0.15 else "low"


def restore_band(seconds: float) -> str:
    if seconds < HOUR:
        return "elite"
    if seconds < DAY:
        return "high"
    if seconds < WEEK:  # the report's medium is "less than one day" like high; low starts at a week
        return "medium"
    return "low"


# -- the SQL both stores share --------------------------------------------------------------------


def window_sql(
    pipeline: str | None,
    environment: str | None,
    since: str | None,
    *,
    alias: str = "d",
    placeholder: str = "?",
) -> tuple[str, list[Any]]:
    """The window's condition on ``alias`` (a deployment row) and its parameters."""
    where, params = ["1=1"], []
    for column, value in (("started_at >=", since), ("pipeline =", pipeline),
                          ("environment =", environment)):  # fmt: skip
        if value is not None:
            where.append(f"{alias}.{column} {placeholder}")
            params.append(value)
    return " AND ".join(where), params


def previous_sql(of: str = "rb") -> str:
    """The deployment started just before ``of`` in its pipeline and environment (its id): the
    one a rollback ``of`` follows, and so marks as rolled back."""
    return (
        f"(SELECT p.id FROM deployments p WHERE p.pipeline = {of}.pipeline AND p.environment = "
        f"{of}.environment AND p.started_at < {of}.started_at ORDER BY p.started_at DESC, "
        "p.id DESC LIMIT 1)"
    )


def failures_sql(w: str, *, status: str = "d.status", rollback_of: str = "d.rollback_of") -> str:
    """The common table expressions of a window's failures and their restores, as both stores
    compute them from the deployments alone: ``hit`` (what a rollback of the window names or
    follows), ``f`` (the window's failed and rolled-back deployments) and ``g`` (each of those
    with ``sid``, its restore: the next succeeded deployment there not rolled back itself).

    ``w`` is the window's condition on ``d``, used three times; ``status`` and ``rollback_of``
    are how the columns are written in it (SQLite's ``+d.status`` turns an index away).
    """
    return (
        "WITH rb AS (SELECT d.id, d.rollback_of, d.pipeline, d.environment, d.started_at "
        f"FROM deployments d WHERE {rollback_of} > 0 AND {w}), "
        "hit(id) AS MATERIALIZED (SELECT rollback_of FROM rb UNION SELECT x FROM (SELECT "
        f"{previous_sql()} AS x FROM rb) AS prev WHERE x IS NOT NULL), "
        "f AS (SELECT d.pipeline, d.environment, d.started_at, "
        "coalesce(d.finished_at, d.started_at) AS at FROM deployments d "
        f"WHERE {status} = 'failed' AND {w} UNION SELECT d.pipeline, d.environment, "
        "d.started_at, coalesce(d.finished_at, d.started_at) FROM deployments d "
        f"WHERE d.id IN (SELECT id FROM hit) AND {w}), "
        "g AS MATERIALIZED (SELECT f.at, (SELECT s.id FROM deployments s WHERE s.pipeline = "
        "f.pipeline AND s.environment = f.environment AND s.status = 'succeeded' "
        "AND s.started_at > f.started_at AND s.id NOT IN (SELECT id FROM hit) "
        "ORDER BY s.started_at, s.id LIMIT 1) AS sid FROM f) "
    )


# -- the figures ------------------------------------------------------------------------------


def compute(
    store: HistoryStore | None, *, rootdir: str | Path, pipeline: str | None = None,
    environment: str | None = None, since: str = "30d", now: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The four figures of the window as one JSON-ready document (what ``stats --json``
    prints)."""
    from ._reports import format_ts

    now = time.time() if now is None else now
    start, length = parse_since(since, now)
    # Outside a git repository no commit time can be known: the commits are not even read.
    git = in_git(rootdir)
    if store is None:  # nothing was ever recorded
        rows: StatsRows = {"changes": 0, "failed": 0, "rolled_back": 0, "rollbacks": 0,
                           "succeeded": 0, "days": 0, "first_at": None, "last_at": None,
                           "restores": [], "unrestored": 0, "commits": []}  # fmt: skip
    else:
        rows = store.stats_rows(
            pipeline=pipeline, environment=environment, since=start, commits=git
        )
    return figures(rows, rootdir=rootdir if git else None, pipeline=pipeline,
                   environment=environment, since=since, start=start, length=length, now=now,
                   until=format_ts(now))  # fmt: skip


def figures(
    rows: StatsRows, *, rootdir: str | Path | None, pipeline: str | None, environment: str | None,
    since: str, start: str | None, length: float | None, now: float, until: str,
) -> dict[str, Any]:  # fmt: skip
    if length is None:  # all: from the first deployment on, at least a day
        length = max(DAY, now - _ts(rows["first_at"])) if rows["first_at"] else DAY
    days = length / DAY
    per_day = rows["succeeded"] / days
    frequency = {
        "deployments": rows["succeeded"],
        "days_with_deployments": rows["days"],
        "per_day": round(per_day, 3),
        "per_week": round(per_day * 7, 3),
        "band": frequency_band(per_day) if rows["changes"] else None,
    }
    lead = _lead_time(rows["commits"], rootdir, rows["succeeded"])
    changes = rows["changes"]
    bad = rows["failed"] + rows["rolled_back"]
    rate = bad / changes if changes else None
    failure = {
        "rate": None if rate is None else round(rate, 4),
        "changes": changes,
        "failed": rows["failed"],
        "rolled_back": rows["rolled_back"],
        "rollbacks": rows["rollbacks"],
        "band": None if rate is None else failure_band(rate),
    }
    restores = rows["restores"]
    mid = median(restores)
    restore = {
        "median_seconds": _round(mid),
        "p90_seconds": _round(percentile(restores, 90)),
        "outages": len(restores),
        "unrestored": rows["unrestored"],
        "band": None if mid is None else restore_band(mid),
    }
    window = {"since": start, "until": until, "days": round(days, 3), "asked": since,
              "pipeline": pipeline, "environment": environment,
              "first_at": rows["first_at"], "last_at": rows["last_at"]}  # fmt: skip
    return {
        "window": window,
        "bands": BANDS,
        "deployment_frequency": frequency,
        "lead_time": lead,
        "change_failure_rate": failure,
        "time_to_restore": restore,
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 1)


def _lead_time(
    commits: Sequence[CommitRow], rootdir: str | Path | None, succeeded: int
) -> dict[str, Any]:
    """From each commit's commit time to its first succeeded deployment in each pipeline and
    environment."""
    first: dict[tuple[str, str, str], tuple[str, int]] = {}
    for c in commits:
        key = (c["pipeline"], c["environment"], c["git_commit"].removesuffix("-dirty"))
        at, n = first.get(key, (c["deployed_at"], 0))
        first[key] = (min(at, c["deployed_at"]), n + c["deployments"])
    doc: dict[str, Any] = {
        "median_seconds": None, "p90_seconds": None, "commits": 0,
        "deployments_with_commit": 0, "deployments": succeeded, "band": None, "note": None,
    }  # fmt: skip
    if rootdir is None:
        doc["note"] = "not in a git repository: commit times unknown"
        return doc
    if not first:
        doc["note"] = "no commit recorded" if succeeded else None
        return doc
    times = commit_times(rootdir, sorted({k[2] for k in first}))
    leads = []
    for (_, _, sha), (at, n) in first.items():
        if sha in times:
            leads.append(max(0.0, _ts(at) - times[sha]))
            doc["deployments_with_commit"] += n
    doc["commits"] = len(leads)
    if not leads:
        doc["note"] = "git knows none of the recorded commits"
        return doc
    mid = median(leads)
    doc.update(median_seconds=_round(mid), p90_seconds=_round(percentile(leads, 90)),
               band=lead_time_band(mid or 0.0))  # fmt: skip
    return doc


# -- for people -------------------------------------------------------------------------------


def span(seconds: float) -> str:
    """A duration for people: ``45s``, ``12m``, ``3h 12m``, ``2d 4h``."""
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def render(doc: Mapping[str, Any]) -> list[str]:
    """The lines ``shipyard stats`` prints."""
    w = doc["window"]
    scope = f"{w['pipeline'] or 'all pipelines'}, {w['environment'] or 'all environments'}"
    when = f"since {w['since']}" if w["since"] else "all history"
    lines = [f"delivery metrics ({scope}; {when}, {w['days']:g} days)"]
    f = doc["deployment_frequency"]
    lines.append(_line(
        "deployment frequency",
        f"{f['per_day']:g} a day ({f['per_week']:g} a week): {f['deployments']} succeeded, "
        f"on {f['days_with_deployments']} day(s)", f["band"]))  # fmt: skip
    lt = doc["lead_time"]
    if lt["median_seconds"] is None:
        lines.append(_line("lead time for changes", f"- ({lt['note']})", None))
    else:
        lines.append(_line(
            "lead time for changes",
            f"median {span(lt['median_seconds'])}, p90 {span(lt['p90_seconds'])} "
            f"({lt['deployments_with_commit']} of {lt['deployments']} deployment(s) with a known "
            "commit)", lt["band"]))  # fmt: skip
    c = doc["change_failure_rate"]
    if c["rate"] is None:
        lines.append(_line("change failure rate", "- (no deployment ended)", None))
    else:
        lines.append(_line(
            "change failure rate",
            f"{c['rate'] * 100:.1f}% ({c['failed'] + c['rolled_back']} of {c['changes']}: "
            f"{c['failed']} failed, {c['rolled_back']} rolled back)", c["band"]))  # fmt: skip
    r = doc["time_to_restore"]
    open_ = f"; {r['unrestored']} not restored yet" if r["unrestored"] else ""
    if r["median_seconds"] is None:
        lines.append(_line("time to restore", f"- (no outage restored{open_})", None))
    else:
        lines.append(_line(
            "time to restore",
            f"median {span(r['median_seconds'])}, p90 {span(r['p90_seconds'])} "
            f"({r['outages']} outage(s){open_})", r["band"]))  # fmt: skip
    lines.append(f"bands: {doc['bands']}; definitions: docs/guides/dora.md")
    return lines


def _line(name: str, text: str, band: str | None) -> str:
    return f"  {name:<22} {text}" + (f"  [{band}]" if band else "")
