"""``shipyard store``: migrate a store's schema, and copy a whole history between stores.

A copy keeps what ``rollback`` needs: every deployment with its stages, steps, log lines and
artifacts, and the audit trail. Ids are kept where the destination has them free, and mapped
otherwise (``rollback_of``, ``retry_of`` and the audit follow the mapping). It is idempotent:
a deployment already in the destination (the same pipeline, environment, version, creation time,
host and pid) is not copied again, nor is an audit record already there. Nothing is copied while
a deployment runs in the source: its record is not final yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._exceptions import HistoryError
from ._store import HistoryStore

#: Deployments copied per batch (their stages, steps, lines, artifacts, gates, decisions and
#: measurements go with them).
BATCH = 500

_KEY = ("pipeline", "environment", "version", "created_at", "host", "pid")
_AUDIT_KEY = ("ts", "action", "deployment_id", "pipeline", "environment", "user", "reason")
_CHILDREN = ("stages", "steps", "logs", "artifacts", "gates", "approvals", "measurements")


@dataclass
class CopyReport:
    deployments: int = 0
    already_there: int = 0
    renumbered: int = 0
    lines: int = 0
    audit: int = 0


def _bulk(store: HistoryStore, which: str) -> Any:
    bulk = getattr(store, "bulk", None)
    if bulk is None:
        raise HistoryError(
            f"the {which} store {store.url} cannot be copied: its type "
            f"({type(store).__name__}) offers no bulk access (only Shipyard's own stores do)"
        )
    return bulk()


def copy_history(
    src: HistoryStore, dst: HistoryStore, progress: Callable[[str], None] | None = None
) -> CopyReport:
    """Copy every deployment and audit record of ``src`` that ``dst`` does not hold yet."""
    if src.identity == dst.identity:
        raise HistoryError(f"{src.url} and {dst.url} are the same store; nothing to copy")
    s, d = _bulk(src, "source"), _bulk(dst, "destination")
    running = src.deployments(statuses=("running", "pending"), limit=1)
    if running:
        r = running[0]
        raise HistoryError(
            f"deployment {r['id']} ({r['pipeline']} {r['version']} to {r['environment']}) is "
            f"still {r['status']} in {src.url}; copy once nothing runs there"
        )
    report = CopyReport()
    with d.transaction():
        there = d.read("deployments")
        known = {tuple(r[k] for k in _KEY): r["id"] for r in there}
        taken = {r["id"] for r in there}
        mapping: dict[int, int] = {}
        rows = s.read("deployments")
        for start in range(0, len(rows), BATCH):
            new: list[int] = []
            for row in rows[start : start + BATCH]:
                key = tuple(row[k] for k in _KEY)
                if key in known:
                    mapping[row["id"]] = known[key]
                    report.already_there += 1
                    continue
                row = dict(row)
                for ref in ("rollback_of", "retry_of"):
                    if row.get(ref) is not None:
                        row[ref] = mapping.get(row[ref], row[ref])
                keep = row["id"] not in taken
                new_id = d.insert_deployment(row, keep_id=keep)
                report.renumbered += not keep
                mapping[row["id"]] = new_id
                taken.add(new_id)
                known[key] = new_id
                new.append(row["id"])
            if not new:
                continue
            for table in _CHILDREN:
                children = s.read(table, new)
                for c in children:
                    c["deployment_id"] = mapping[c["deployment_id"]]
                d.write(table, children)
                if table == "logs":
                    report.lines += len(children)
            report.deployments += len(new)
            if progress is not None:
                progress(f"{report.deployments} deployment(s) copied")
        have = {tuple(a[k] for k in _AUDIT_KEY) for a in d.read("audit")}
        audit = []
        for a in s.read("audit"):
            a = dict(a)
            if a["deployment_id"] is not None:
                a["deployment_id"] = mapping.get(a["deployment_id"], a["deployment_id"])
            if tuple(a[k] for k in _AUDIT_KEY) not in have:
                audit.append(a)
        d.write("audit", audit)
        report.audit = len(audit)
        d.done()
    return report


def migrate(url: str) -> tuple[HistoryStore, list[int]]:
    """Open the store at ``url`` (creating its schema) and bring it to the current schema;
    returns the store and the versions applied."""
    from ._store import open_store

    store = open_store(url, create=True)
    return store, list(getattr(store, "migrated", []))
