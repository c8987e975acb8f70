"""The embedded default store: one SQLite file, private to its user (a :class:`HistoryStore`).

SQLite specifics, and why:

- WAL, ``busy_timeout`` and ``BEGIN IMMEDIATE`` for every write: many processes write the same
  file, and a deferred BEGIN that upgrades to a write lock fails with "database is locked".
- ``synchronous=NORMAL`` for step and log writes (survives any kill of the process) and a FULL sync
  for deployment-level transitions, at most two commits per step, log lines batched.
- A checkpoint every 8,192 WAL pages (SQLite's default is 1,000; the last connection to close
  checkpoints too): a checkpoint syncs the file, which would otherwise cost every quick step
  ~10 µs on average.
- ``PRAGMA application_id`` marks the file as ours and ``PRAGMA user_version`` is the schema
  version: any other file, or a newer schema, is refused and left untouched.

All of Shipyard's SQLite SQL lives in this module, but for the kept delivery figures of
``stats`` (their own module, :mod:`shipyard._sqlitestats`).
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

from . import _sqlitestats as kept
from ._exceptions import ApprovalRefused
from ._exceptions import DeploymentNotFound
from ._exceptions import EnvironmentLocked
from ._exceptions import HistoryError
from ._exceptions import NoPreviousDeployment
from ._identity import runner_identity
from ._reports import Status
from ._reports import utcnow
from ._store import ENVIRONMENT_LOCK
from ._store import ArtifactRow
from ._store import AuditRow
from ._store import Begun
from ._store import Decision
from ._store import DeploymentCountRow
from ._store import DeploymentInfo
from ._store import DeploymentRow
from ._store import GateRecord
from ._store import GateRow
from ._store import Liveness
from ._store import LockRow
from ._store import LogRecord
from ._store import LogRow
from ._store import MeasurementRecord
from ._store import MeasurementRow
from ._store import ProcessRef
from ._store import StagePlan
from ._store import StageRow
from ._store import StoreNotFound
from ._store import decode_deployment as _decode
from ._store import process_ref as _ref

if TYPE_CHECKING:
    from ._events import Event

#: "SHYD" - marks a SQLite file as a Shipyard history.
APPLICATION_ID = 0x53485944
#: The schema version this code writes; migrations bring older files up to it.
SCHEMA_VERSION = 6
BUSY_TIMEOUT_MS = 30_000
#: Bytes of the file read through a memory map rather than read() calls: the pages are the
#: kernel's page cache, shared by every process, and a large history's scans (``stats``) no longer
#: copy each page into the connection's own small cache. Mapped only as far as the file goes.
MMAP_BYTES = 1 << 30
#: WAL pages between automatic checkpoints (see the docstring): about 32 MiB of WAL at most.
WAL_CHECKPOINT_PAGES = 8192


def _unwritable(p: Path) -> str | None:
    """Why the history ``p`` cannot be written, or None: SQLite writes the file and, beside it,
    its journal files, so the folder must be writable too."""
    try:
        if os.statvfs(p).f_flag & os.ST_RDONLY:
            return "it is on a read-only file system"
    except OSError:
        pass
    if not os.access(p, os.W_OK):
        return "you cannot write the file"
    if not os.access(p.parent, os.W_OK | os.X_OK):
        return "you cannot write its folder"
    return None


_DEPLOYMENT_COLUMNS = (
    "id, pipeline, version, environment, status, started_at, finished_at, rollback_of, "
    "retry_of, error, user, ci_actor, host, pid, pipelines_file, file_hash, git_commit, args, "
    "vars, shipyard_version, stages_total, current_stage, cancel_requested"
)


def _create_v1(db: Any) -> None:
    """Schema version 1, through sqlite-utils."""
    db["deployments"].create(
        {
            "id": int,
            "pipeline": str,
            "version": str,
            "environment": str,
            "status": str,
            "created_at": str,
            "started_at": str,
            "finished_at": str,
            "heartbeat_at": str,
            "rollback_of": int,
            "retry_of": int,
            "error": str,
            "user": str,
            "ci_actor": str,
            "host": str,
            "pid": int,
            "proc_start": str,
            "pipelines_file": str,
            "file_hash": str,
            "git_commit": str,
            "args": str,
            "vars": str,
            "shipyard_version": str,
            "stages_total": int,
            "current_stage": int,
            "cancel_requested": str,
        },
        pk="id",
        not_null={"pipeline", "version", "environment", "status", "created_at"},
    )
    d = db["deployments"]
    d.create_index(["pipeline", "environment", "status", "started_at"], index_name="ix_dep_pes")
    d.create_index(["pipeline", "environment", "started_at"], index_name="ix_dep_pe")
    d.create_index(["started_at"], index_name="ix_dep_started")  # replaced by ix_dep_window (v5)
    d.create_index(["status"], index_name="ix_dep_status")
    d.create_index(["rollback_of"], index_name="ix_dep_rollback_of")
    db["stages"].create(
        {
            "deployment_id": int,
            "idx": int,
            "name": str,
            "status": str,
            "parallel": int,
            "continue_on_failure": int,
            "started_at": str,
            "finished_at": str,
            "note": str,
        },
        pk=("deployment_id", "idx"),
    )
    db["steps"].create(
        {
            "deployment_id": int,
            "stage_idx": int,
            "idx": int,
            "name": str,
            "kind": str,
            "description": str,
            "status": str,
            "attempts": int,
            "exit_code": int,
            "error": str,
            "warning": int,
            "started_at": str,
            "finished_at": str,
        },
        pk=("deployment_id", "stage_idx", "idx"),
    )
    db["logs"].create(
        {
            "id": int,
            "deployment_id": int,
            "stage_idx": int,
            "step_idx": int,
            "ts": float,
            "stream": str,
            "line": str,
        },
        pk="id",
    )
    db["logs"].create_index(["deployment_id", "id"], index_name="ix_logs_dep")
    db["locks"].create(
        {
            "pipeline": str,
            "environment": str,
            "deployment_id": int,
            "pid": int,
            "host": str,
            "proc_start": str,
            "user": str,
            "version": str,
            "acquired_at": str,
            "heartbeat_at": str,
        },
        pk=("pipeline", "environment"),
    )
    # Deployments waiting with --wait-lock, first come first served.
    db["lock_queue"].create(
        {
            "id": int,
            "pipeline": str,
            "environment": str,
            "pid": int,
            "host": str,
            "proc_start": str,
            "since": str,
            "heartbeat_at": str,
        },
        pk="id",
    )
    db["lock_queue"].create_index(["pipeline", "environment", "id"], index_name="ix_queue_pe")
    db["audit"].create(
        {
            "id": int,
            "ts": str,
            "action": str,
            "deployment_id": int,
            "pipeline": str,
            "environment": str,
            "user": str,
            "host": str,
            "reason": str,
        },
        pk="id",
    )


def _add_artifacts_v2(db: Any) -> None:
    """Version 2: what steps recorded of their work (a Kubernetes step's rendered manifests),
    so that a rollback can apply exactly what the deployment it restores applied."""
    db["artifacts"].create(
        {
            "id": int,
            "deployment_id": int,
            "stage_idx": int,
            "step_idx": int,
            "name": str,
            "content": str,
            "created_at": str,
        },
        pk="id",
        not_null={"deployment_id", "stage_idx", "step_idx", "name", "content"},
    )
    db["artifacts"].create_index(["deployment_id", "stage_idx", "step_idx"], index_name="ix_art")


def _add_lock_runner_v3(db: Any) -> None:
    """Version 3: the CI job holding a lock (``runner``), named when another is refused."""
    db["locks"].add_column("runner", str)


def _add_gates_v4(db: Any) -> None:
    """Version 4: approval gates, and the append-only record of their decisions."""
    db.execute(
        "CREATE TABLE gates (deployment_id INTEGER NOT NULL, stage_idx INTEGER NOT NULL, "
        "stage TEXT, requested_at TEXT, expires_at TEXT, spec TEXT, fingerprint TEXT, "
        "context TEXT, status TEXT NOT NULL, decided_at TEXT, "
        "PRIMARY KEY (deployment_id, stage_idx))"
    )
    db.execute(
        "CREATE TABLE approvals (id INTEGER PRIMARY KEY, deployment_id INTEGER NOT NULL, "
        "stage_idx INTEGER NOT NULL, decision TEXT NOT NULL, user TEXT NOT NULL, source TEXT, "
        "comment TEXT, choice TEXT, host TEXT, ci_run TEXT, ts TEXT NOT NULL)"
    )
    db.execute("CREATE INDEX ix_approvals_dep ON approvals (deployment_id, id)")
    db.execute("CREATE INDEX ix_gates_status ON gates (status)")


def _add_measurements_v5(db: Any) -> None:
    """Version 5: every measurement of an analysis step, in its own table (issue #15); the
    window index covers what ``stats`` counts, so a whole history is counted from the index
    alone (issue #19)."""
    db.execute(
        "CREATE TABLE measurements (id INTEGER PRIMARY KEY, deployment_id INTEGER NOT NULL, "
        "stage_idx INTEGER NOT NULL, step_idx INTEGER NOT NULL, metric TEXT NOT NULL, "
        "n INTEGER NOT NULL, ts TEXT NOT NULL, value TEXT, outcome TEXT NOT NULL, error TEXT, "
        "dry_run INTEGER NOT NULL DEFAULT 0, warnings TEXT)"
    )
    db.execute("CREATE INDEX ix_meas_dep ON measurements (deployment_id, id)")
    db.execute("DROP INDEX IF EXISTS ix_dep_started")
    db.execute(
        "CREATE INDEX ix_dep_window ON deployments (started_at, status, rollback_of, pipeline, "
        "environment)"
    )


#: Migrations by the version they produce. Each runs inside one transaction.
MIGRATIONS = {
    1: _create_v1, 2: _add_artifacts_v2, 3: _add_lock_runner_v3, 4: _add_gates_v4,
    5: _add_measurements_v5, 6: kept.add_stats_v6,
}  # fmt: skip


class SQLiteStore:
    """The embedded default store: one SQLite file, private to its user."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = str(path)
        self.url = self.path
        self.identity = os.path.realpath(self.path)
        p = Path(self.path)
        exists = p.exists() and p.stat().st_size > 0
        if not exists and not create:
            raise StoreNotFound(
                f"no history at {self.path}; nothing has been deployed from here yet"
            )
        if not exists:
            self._create_file(p)
        #: Why this history cannot be written (a read-only mount, a folder of someone else's),
        #: or None. It is then read only, as it was when opened: read commands work.
        self.read_only: str | None = _unwritable(p) if exists else None
        #: The schema versions this open applied (``shipyard store migrate`` says them).
        self.migrated: list[int] = []
        try:
            if self.read_only:
                self.conn = self._connect_read_only(p)
            else:
                self.conn = sqlite3.connect(
                    self.path,
                    isolation_level=None,
                    check_same_thread=False,
                    timeout=BUSY_TIMEOUT_MS / 1000,
                )
            self._check_and_migrate()
        except sqlite3.DatabaseError as exc:
            raise HistoryError(
                f"{self.path} is not a Shipyard history ({exc}); it was left untouched — point "
                "--history (or SHIPYARD_HISTORY) at another file"
            ) from exc

    # -- opening ----------------------------------------------------------------------------------

    @staticmethod
    def _connect_read_only(p: Path) -> sqlite3.Connection:
        """A connection that writes nothing, not even the WAL index a WAL file needs beside it:
        read-only first, else ``immutable`` (nobody can write a file in such a folder anyway)."""
        from urllib.parse import quote

        base = "file:" + quote(str(p.resolve()))
        try:
            conn = sqlite3.connect(f"{base}?mode=ro", uri=True, isolation_level=None,
                                   check_same_thread=False)  # fmt: skip
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            pass
        return sqlite3.connect(f"{base}?mode=ro&immutable=1", uri=True, isolation_level=None,
                               check_same_thread=False)  # fmt: skip

    @staticmethod
    def _create_file(p: Path) -> None:
        try:
            p.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if p.parent.name == ".shipyard":
                os.chmod(p.parent, 0o700)
            fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o600)
            os.close(fd)
            os.chmod(p, 0o600)
        except OSError as exc:
            raise HistoryError(f"cannot create the history at {p}: {exc.strerror}") from exc

    def _check_and_migrate(self) -> None:
        c = self.conn
        c.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        c.execute(f"PRAGMA mmap_size={MMAP_BYTES}")
        # One read transaction: a process creating the file meanwhile must not be seen half done.
        c.execute("BEGIN")
        try:
            app_id = c.execute("PRAGMA application_id").fetchone()[0]
            version = c.execute("PRAGMA user_version").fetchone()[0]
            tables = c.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        finally:
            if c.in_transaction:
                c.execute("COMMIT")
        if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables > 0):
            raise HistoryError(
                f"{self.path} is a SQLite file but not a Shipyard history; it was left untouched "
                "— point --history (or SHIPYARD_HISTORY) at another file"
            )
        if version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.path} has history schema {version}, newer than this Shipyard understands "
                f"({SCHEMA_VERSION}); upgrade shipyard to read it. The file was left untouched."
            )
        if self.read_only:
            if version < SCHEMA_VERSION:
                raise HistoryError(self._read_only_message("upgrade its schema"))
            return
        if c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
        c.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        c.execute(f"PRAGMA journal_size_limit={WAL_CHECKPOINT_PAGES * 4096}")
        if version < SCHEMA_VERSION:
            self._migrate(version)

    def _migrate(self, version: int) -> None:
        import sqlite_utils

        db = sqlite_utils.Database(self.conn, execute_plugins=False, recursive_triggers=False)
        with self._tx(durable=True):
            # Re-read under the write lock: another process may have migrated meanwhile.
            version = self.conn.execute("PRAGMA user_version").fetchone()[0]
            for target in range(version + 1, SCHEMA_VERSION + 1):
                MIGRATIONS[target](db)
                self.migrated.append(target)
            self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    def _read_only_message(self, what: str = "record anything") -> str:
        return (
            f"the history at {self.path} is read-only ({self.read_only}), so Shipyard cannot "
            f"{what} there; history, show, logs and status still read it. To deploy, make the "
            "file and its folder writable by you, or point --history (or SHIPYARD_HISTORY) at "
            "a writable file"
        )

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
        if self.read_only:
            raise HistoryError(self._read_only_message())
        c = self.conn
        try:
            if durable:
                c.execute("PRAGMA synchronous=FULL")
            c.execute("BEGIN IMMEDIATE")
            try:
                yield c
                c.execute("COMMIT")
            except BaseException:
                if c.in_transaction:
                    c.execute("ROLLBACK")
                raise
            finally:
                if durable:
                    c.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.OperationalError as exc:
            raise self._write_error(exc) from exc

    def _write_error(self, exc: sqlite3.OperationalError) -> HistoryError:
        if "readonly" in str(exc) and (reason := _unwritable(Path(self.path))):
            self.read_only = reason  # made read-only since it was opened
            return HistoryError(self._read_only_message())
        hint = ""
        if "disk" in str(exc) or "full" in str(exc):
            hint = " (is the disk full, or a file size limit reached?)"
        return HistoryError(f"cannot write the history at {self.path}: {exc}{hint}")

    def _read(self, sql: str, params: Sequence[Any]) -> sqlite3.Cursor:
        try:
            return self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise HistoryError(f"cannot read the history at {self.path}: {exc}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        cur = self._read(sql, params)
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    def _tuples(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """:meth:`_query`'s rows as tuples, for many rows of few columns."""
        return self._read(sql, params).fetchall()

    # -- deployments ------------------------------------------------------------------------------

    def begin(
        self,
        *,
        pipeline: str,
        version: str,
        environment: str,
        owner: ProcessRef,
        is_dead: Liveness,
        info: DeploymentInfo | None = None,
        rollback_of: int | None = None,
        retry_of: int | None = None,
        lock: bool = True,
        ticket: int | None = None,
        lock_key: str | None = None,
    ) -> Begun:
        """Record a new running deployment and take the lock of its pipeline and environment.

        Both happen in one transaction: either the deployment runs holding the lock, or nothing
        is recorded and :class:`EnvironmentLocked` names the holder. Deployments waiting with a
        ``ticket`` (see :meth:`enqueue`) are served first come, first served; one without a
        ticket does not overtake them.
        """
        interrupted: list[int] = []
        info = info or {}
        user = info.get("user")
        key = lock_key or pipeline
        with self._tx(durable=True) as c:
            # Read the clock holding the write lock: a deployment waiting for the previous one's
            # end must not record a start from before that end.
            now = utcnow()
            if lock:
                self._check_queue(c, key, environment, ticket, is_dead)
                holder = self._lock(c, key, environment)
                if holder is not None:
                    self._refuse_if_gate(c, holder)
                    if is_dead(_ref(holder)):
                        self._interrupt(c, holder["deployment_id"], "its process died")
                        interrupted.append(holder["deployment_id"])
                    else:
                        raise EnvironmentLocked(self._locked_message(holder), dict(holder))
            args = info.get("args")
            cur = c.execute(
                "INSERT INTO deployments (pipeline, version, environment, status, created_at, "
                "started_at, heartbeat_at, rollback_of, retry_of, user, ci_actor, host, pid, "
                "proc_start, pipelines_file, file_hash, git_commit, args, vars, shipyard_version) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pipeline, version, environment, Status.RUNNING.value, now, now, now,
                    rollback_of, retry_of, user, info.get("ci_actor"), owner["host"],
                    owner["pid"], owner["proc_start"], info.get("pipelines_file"),
                    info.get("file_hash"), info.get("git_commit"),
                    json.dumps(args) if args is not None else None,
                    json.dumps(info.get("vars") or {}), info.get("shipyard_version"),
                ),
            )  # fmt: skip
            dep_id = int(cur.lastrowid or 0)
            if ticket is not None:
                c.execute("DELETE FROM lock_queue WHERE id=?", (ticket,))
            if lock:
                c.execute(
                    "INSERT INTO locks (pipeline, environment, deployment_id, pid, host, "
                    "proc_start, user, version, acquired_at, heartbeat_at, runner) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        key, environment, dep_id, owner["pid"], owner["host"],
                        owner["proc_start"], user, version, now, now, runner_identity(),
                    ),
                )  # fmt: skip
        return Begun(dep_id, interrupted)

    def _check_queue(
        self, c: sqlite3.Connection, pipeline: str, environment: str, ticket: int | None,
        is_dead: Liveness,
    ) -> None:  # fmt: skip
        """Refuse the lock while an earlier live waiter is queued; drop dead waiters."""
        rows = c.execute(
            "SELECT id, pid, host, proc_start, heartbeat_at FROM lock_queue "
            "WHERE pipeline=? AND environment=? ORDER BY id",
            (pipeline, environment),
        ).fetchall()
        ahead = 0
        for qid, pid, host, proc_start, heartbeat_at in rows:
            if ticket is not None and qid >= ticket:
                break
            waiter: ProcessRef = {
                "pid": pid,
                "host": host,
                "proc_start": proc_start,
                "heartbeat_at": heartbeat_at,
            }
            if is_dead(waiter):
                c.execute("DELETE FROM lock_queue WHERE id=?", (qid,))
            else:
                ahead += 1
        if ahead:
            holder = self._lock(c, pipeline, environment)
            raise EnvironmentLocked(
                f"{pipeline!r} in {environment!r}: {ahead} deployment(s) are waiting for the "
                "lock before this one; wait with --wait-lock SECONDS",
                dict(holder) if holder else {},
            )

    def enqueue(self, pipeline: str, environment: str, owner: ProcessRef) -> int:
        """Join the queue of deployments waiting for this lock; returns the ticket."""
        now = utcnow()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO lock_queue (pipeline, environment, pid, host, proc_start, since, "
                "heartbeat_at) VALUES (?,?,?,?,?,?,?)",
                (pipeline, environment, owner["pid"], owner["host"], owner["proc_start"], now,
                 now),
            )  # fmt: skip
        return int(cur.lastrowid or 0)

    def dequeue(self, ticket: int) -> None:
        """Leave the queue (gave up waiting)."""
        with self._tx() as c:
            c.execute("DELETE FROM lock_queue WHERE id=?", (ticket,))

    def touch_ticket(self, ticket: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE lock_queue SET heartbeat_at=? WHERE id=?", (utcnow(), ticket))

    @staticmethod
    def _lock(c: sqlite3.Connection, pipeline: str, environment: str) -> LockRow | None:
        cur = c.execute(
            "SELECT * FROM locks WHERE pipeline=? AND environment=?", (pipeline, environment)
        )
        row = cur.fetchone()
        if row is None:
            return None
        cols = [d[0] for d in cur.description]
        out = dict(zip(cols, row, strict=True))
        if pipeline == ENVIRONMENT_LOCK:  # name the pipeline whose deployment holds it
            of = c.execute("SELECT pipeline FROM deployments WHERE id=?", (out["deployment_id"],))
            out["holder_pipeline"] = (of.fetchone() or [None])[0]
        return cast("LockRow", out)

    @staticmethod
    def _refuse_if_gate(c: sqlite3.Connection, holder: LockRow) -> None:
        """A lock held by a deployment awaiting approval: no process, never dead; say so."""
        row = c.execute(
            "SELECT d.status, g.requested_at, g.expires_at, g.stage FROM deployments d "
            "LEFT JOIN gates g ON g.deployment_id = d.id AND g.status = 'waiting' WHERE d.id=?",
            (holder["deployment_id"],),
        ).fetchone()
        if row and row[0] == Status.AWAITING_APPROVAL.value:
            from ._store import gate_locked_message

            raise EnvironmentLocked(
                gate_locked_message(holder, requested_at=row[1], expires_at=row[2], stage=row[3]),
                dict(holder),
            )

    @staticmethod
    def _locked_message(h: LockRow) -> str:
        from ._store import locked_message

        return locked_message(h)

    def _interrupt(self, c: sqlite3.Connection, dep_id: int, why: str) -> None:
        now = utcnow()
        c.execute(
            "UPDATE deployments SET status='interrupted', finished_at=?, error=? "
            "WHERE id=? AND status IN ('running','pending')",
            (now, f"interrupted: {why} before it finished", dep_id),
        )
        for table in ("stages", "steps"):
            c.execute(
                f"UPDATE {table} SET status='interrupted', finished_at=? "
                "WHERE deployment_id=? AND status='running'",
                (now, dep_id),
            )
            c.execute(
                f"UPDATE {table} SET status='skipped' WHERE deployment_id=? AND status='pending'",
                (dep_id,),
            )
        c.execute("DELETE FROM locks WHERE deployment_id=?", (dep_id,))

    def repair(self, is_dead: Liveness) -> list[int]:
        """Mark deployments whose process ``is_dead`` ``interrupted`` and free their locks.

        Cheap when nothing is running (one indexed query); every command calls it. A read-only
        history is read as it is: nothing can be marked there.
        """
        rows = self._query(
            "SELECT id, pid, host, proc_start, heartbeat_at FROM deployments "
            "WHERE status IN ('running','pending')"
        )
        dead = [r["id"] for r in rows if is_dead(_ref(r))]
        orphan_locks = self._query(
            "SELECT l.deployment_id FROM locks l LEFT JOIN deployments d ON d.id = l.deployment_id "
            "WHERE d.id IS NULL OR d.status NOT IN ('running','pending','awaiting_approval')"
        )
        if (dead or orphan_locks) and not self.read_only:
            with self._tx(durable=True) as c:
                for dep_id in dead:
                    self._interrupt(c, dep_id, "its process died")
                for lk in orphan_locks:
                    c.execute("DELETE FROM locks WHERE deployment_id=?", (lk["deployment_id"],))
        return dead

    def record_plan(
        self, dep_id: int, stages: Sequence[StagePlan], start_stage: int = 0,
        note: str | None = None,
    ) -> None:  # fmt: skip
        """Record every stage and step as pending (those before ``start_stage`` as skipped)."""
        stage_rows = []
        step_rows = []
        for si, st in enumerate(stages):
            before = si < start_stage
            status = Status.SKIPPED.value if before else Status.PENDING.value
            stage_rows.append(
                (dep_id, si, st.name, status, int(st.parallel), int(st.continue_on_failure),
                 note if before else None)
            )  # fmt: skip
            for i, step in enumerate(st.steps):
                step_rows.append((dep_id, si, i, step.name, step.kind, step.description, status))
        with self._tx() as c:
            c.executemany(
                "INSERT INTO stages (deployment_id, idx, name, status, parallel, "
                "continue_on_failure, note) VALUES (?,?,?,?,?,?,?)",
                stage_rows,
            )
            c.executemany(
                "INSERT INTO steps (deployment_id, stage_idx, idx, name, kind, description, "
                "status, attempts) VALUES (?,?,?,?,?,?,?,0)",
                step_rows,
            )
            c.execute("UPDATE deployments SET stages_total=? WHERE id=?", (len(stages), dep_id))

    def record(
        self, transitions: Sequence[Event], logs: Sequence[LogRecord], *, durable: bool = False
    ) -> None:
        """Write a batch of transitions and log lines in one transaction."""
        if not durable and not logs and len(transitions) == 1:
            # The end of a quick step: one statement is a transaction of its own (a single
            # write takes the write lock at once, so the deferred BEGIN's "database is
            # locked" on upgrade cannot happen), saving BEGIN and COMMIT on the hot path.
            e = transitions[0]
            if e.hook != "shipyard_stage_started":
                sql, params = _TRANSITIONS[e.hook](e)
                try:
                    self.conn.execute(sql, params)
                except sqlite3.OperationalError as exc:
                    raise self._write_error(exc) from exc
                return
        with self._tx(durable=durable) as c:
            self._write(c, transitions, logs)

    @staticmethod
    def _write(
        c: sqlite3.Connection, transitions: Sequence[Event], logs: Sequence[LogRecord]
    ) -> None:
        if logs:
            c.executemany(
                "INSERT INTO logs (deployment_id, stage_idx, step_idx, ts, stream, line) "
                "VALUES (?,?,?,?,?,?)",
                logs,
            )
        for e in transitions:
            sql, params = _TRANSITIONS[e.hook](e)
            c.execute(sql, params)
            if e.hook == "shipyard_stage_started":
                c.execute(
                    "UPDATE deployments SET current_stage=? WHERE id=?", (params[2], params[1])
                )

    def heartbeat(self, dep_id: int) -> str | None:
        """Renew the lock and the deployment's heartbeat; return a pending cancel request.

        A deployment that lost its lock (``unlock``, or its lease expired and another command
        marked it ``interrupted``) gets a cancel request too: it must not go on unlocked.
        """
        now = utcnow()
        with self._tx() as c:
            c.execute("UPDATE deployments SET heartbeat_at=? WHERE id=?", (now, dep_id))
            c.execute("UPDATE locks SET heartbeat_at=? WHERE deployment_id=?", (now, dep_id))
            row = c.execute(
                "SELECT cancel_requested, status, error FROM deployments WHERE id=?", (dep_id,)
            ).fetchone()
        # Only another process writes ``interrupted``; a final status of our own (a heartbeat
        # racing our finish) is no reason to cancel anything.
        if row and row[1] == Status.INTERRUPTED.value:
            return row[0] or f"shipyard: the lock was lost ({row[2] or row[1]})"
        return row[0] if row else None

    def request_cancel(self, dep_id: int, *, user: str, reason: str = "") -> DeploymentRow:
        dep = self.get(dep_id)
        with self._tx(durable=True) as c:
            c.execute(
                "UPDATE deployments SET cancel_requested=? WHERE id=?",
                (f"{user}: {reason}" if reason else user, dep_id),
            )
            self._audit(c, "cancel", dep, user, reason)
        return dep

    @staticmethod
    def _audit(c: sqlite3.Connection, action: str, dep: Mapping[str, Any] | None, user: str,
               reason: str, pipeline: str | None = None, environment: str | None = None) -> None:  # fmt: skip
        from ._secrets import mask  # a reason may quote a secret, as the PostgreSQL store's

        reason = mask(reason)
        c.execute(
            "INSERT INTO audit (ts, action, deployment_id, pipeline, environment, user, host, "
            "reason) VALUES (?,?,?,?,?,?,?,?)",
            (
                utcnow(), action, dep["id"] if dep else None,
                dep["pipeline"] if dep else pipeline, dep["environment"] if dep else environment,
                user, socket.gethostname(), reason,
            ),
        )  # fmt: skip

    def record_artifact(
        self, dep_id: int, stage_idx: int, step_idx: int, name: str, content: str
    ) -> None:
        """Keep ``content`` as the artifact ``name`` of a step (replacing one of that name)."""
        with self._tx() as c:
            c.execute(
                "DELETE FROM artifacts WHERE deployment_id=? AND stage_idx=? AND step_idx=? "
                "AND name=?",
                (dep_id, stage_idx, step_idx, name),
            )
            c.execute(
                "INSERT INTO artifacts (deployment_id, stage_idx, step_idx, name, content, "
                "created_at) VALUES (?,?,?,?,?,?)",
                (dep_id, stage_idx, step_idx, name, content, utcnow()),
            )

    def artifacts(self, dep_id: int) -> list[ArtifactRow]:
        return cast(
            "list[ArtifactRow]",
            self._query(
                "SELECT a.stage_idx, a.step_idx, st.name AS stage, s.name AS step, a.name, "
                "a.content, a.created_at FROM artifacts a "
                "LEFT JOIN stages st ON st.deployment_id = a.deployment_id AND st.idx = a.stage_idx "
                "LEFT JOIN steps s ON s.deployment_id = a.deployment_id "
                "AND s.stage_idx = a.stage_idx AND s.idx = a.step_idx "
                "WHERE a.deployment_id=? ORDER BY a.id",
                (dep_id,),
            ),
        )

    def record_measurement(
        self, dep_id: int, stage_idx: int, step_idx: int, m: MeasurementRecord
    ) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO measurements (deployment_id, stage_idx, step_idx, metric, n, ts, "
                "value, outcome, error, dry_run, warnings) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (dep_id, stage_idx, step_idx, m["metric"], m["n"], m["ts"], m["value"],
                 m["outcome"], m["error"], bool(m["dry_run"]), m["warnings"]),
            )  # fmt: skip

    def measurements(self, dep_id: int) -> list[MeasurementRow]:
        rows = self._query(
            "SELECT m.stage_idx, m.step_idx, st.name AS stage, s.name AS step, m.metric, m.n, "
            "m.ts, m.value, m.outcome, m.error, m.dry_run, m.warnings FROM measurements m "
            "LEFT JOIN stages st ON st.deployment_id = m.deployment_id AND st.idx = m.stage_idx "
            "LEFT JOIN steps s ON s.deployment_id = m.deployment_id "
            "AND s.stage_idx = m.stage_idx AND s.idx = m.step_idx "
            "WHERE m.deployment_id=? ORDER BY m.id",
            (dep_id,),
        )
        for r in rows:
            r["dry_run"] = bool(r["dry_run"])
        return cast("list[MeasurementRow]", rows)

    def add_audit(self, action: str, dep_id: int, *, user: str, reason: str) -> None:
        """Record who did ``action`` to deployment ``dep_id`` and why."""
        dep = self.get(dep_id)
        with self._tx() as c:
            self._audit(c, action, dep, user, reason)

    def unlock(self, pipeline: str, environment: str, *, user: str, reason: str) -> LockRow | None:
        """Break the lock by hand; its deployment becomes ``interrupted``. Recorded in the audit."""
        with self._tx(durable=True) as c:
            holder = self._lock(c, pipeline, environment)
            if holder:
                self._interrupt(c, holder["deployment_id"], f"unlocked by {user} ({reason})")
            # Recorded on the deployment it interrupted, so that `show` of it lists the unlock.
            dep = {"id": holder["deployment_id"], "pipeline": pipeline,
                   "environment": environment} if holder else None  # fmt: skip
            self._audit(c, "unlock", dep, user, reason, pipeline, environment)
        return holder

    def finish(
        self, dep_id: int, status: Status, error: str | None,
        transitions: Sequence[Event] = (), logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        """Record the final status durably, mark what never ran ``skipped``, free the lock."""
        now = utcnow()
        with self._tx(durable=True) as c:
            self._write(c, transitions, logs)
            for table in ("stages", "steps"):
                c.execute(
                    f"UPDATE {table} SET status='skipped' WHERE deployment_id=? AND status='pending'",
                    (dep_id,),
                )
                c.execute(
                    f"UPDATE {table} SET status=?, finished_at=? "
                    "WHERE deployment_id=? AND status='running'",
                    (status.value, now, dep_id),
                )
            # A deployment already marked ``interrupted`` (its lock was broken) stays so.
            c.execute(
                "UPDATE deployments SET status=?, finished_at=?, error=? "
                "WHERE id=? AND status IN ('running','pending')",
                (status.value, now, error, dep_id),
            )
            c.execute("DELETE FROM locks WHERE deployment_id=?", (dep_id,))

    # -- approval gates ---------------------------------------------------------------------------

    def suspend(
        self, dep_id: int, gate: GateRecord, transitions: Sequence[Event] = (),
        logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        si = gate["stage_idx"]
        with self._tx(durable=True) as c:
            self._write(c, transitions, logs)
            c.execute(
                "INSERT OR REPLACE INTO gates (deployment_id, stage_idx, stage, requested_at, "
                "expires_at, spec, fingerprint, context, status) VALUES (?,?,?,?,?,?,?,?,?)",
                (dep_id, si, gate["stage"], gate["requested_at"], gate["expires_at"],
                 json.dumps(gate["spec"]), json.dumps(gate["fingerprint"]),
                 json.dumps(gate["context"]), "waiting"),
            )  # fmt: skip
            c.execute(
                "UPDATE deployments SET status='awaiting_approval', current_stage=?, pid=NULL, "
                "proc_start=NULL WHERE id=? AND status='running'",
                (si, dep_id),
            )
            for table, key in (("stages", "idx"), ("steps", "stage_idx")):
                # The gate's stage, and its steps not done (a step that stopped at a gate is
                # ``waiting`` already; the steps before it in its stage stay as they ended).
                c.execute(
                    f"UPDATE {table} SET status='waiting', started_at=coalesce(started_at, ?) "
                    f"WHERE deployment_id=? AND {key}=? AND status IN ('pending', 'running', "
                    "'waiting')",
                    (gate["requested_at"], dep_id, si),
                )
            if gate["spec"].get("lock") == "release":
                c.execute("DELETE FROM locks WHERE deployment_id=?", (dep_id,))
            else:  # held by the gate: no process stands behind it
                c.execute(
                    "UPDATE locks SET pid=NULL, proc_start=NULL, heartbeat_at=? "
                    "WHERE deployment_id=?",
                    (gate["requested_at"], dep_id),
                )

    def gate(self, dep_id: int) -> GateRow | None:
        rows = self._query(
            "SELECT * FROM gates WHERE deployment_id=? ORDER BY stage_idx DESC LIMIT 1", (dep_id,)
        )
        if not rows:
            return None
        g = rows[0]
        for key in ("spec", "fingerprint", "context"):
            g[key] = json.loads(g[key]) if g[key] else None
        g["decisions"] = self._query(
            "SELECT * FROM approvals WHERE deployment_id=? AND stage_idx=? ORDER BY id",
            (dep_id, g["stage_idx"]),
        )
        g.pop("deployment_id", None)
        return cast("GateRow", g)

    def decide(
        self, dep_id: int, decision: str, *, user: str, comment: str = "",
        choice: str | None = None, source: str | None = None, owner: ProcessRef | None = None,
        is_dead: Liveness | None = None,
    ) -> Decision:  # fmt: skip
        from ._identity import runner_identity
        from ._store import decided_message

        now = utcnow()
        with self._tx(durable=True) as c:
            dep = c.execute(
                "SELECT status, pipeline, environment, version, user FROM deployments WHERE id=?",
                (dep_id,),
            ).fetchone()
            gate = c.execute(
                "SELECT stage_idx, spec FROM gates WHERE deployment_id=? AND status='waiting' "
                "ORDER BY stage_idx DESC LIMIT 1",
                (dep_id,),
            ).fetchone()
            if dep is None or dep[0] != Status.AWAITING_APPROVAL.value or gate is None:
                last = c.execute(
                    "SELECT decision, user, ts FROM approvals WHERE deployment_id=? "
                    "ORDER BY id DESC LIMIT 1",
                    (dep_id,),
                ).fetchone()
                raise ApprovalRefused(decided_message(dep_id, dep[0] if dep else None, last))
            si, spec = gate[0], json.loads(gate[1])
            required = int(spec.get("required") or 1) if decision == "approve" else 1
            if decision == "expire":  # the gate's default outcome, applied once it expired
                decision_kind = "approve" if spec.get("on_timeout") == "approve" else "reject"
            else:
                decision_kind = decision
            c.execute(
                "INSERT INTO approvals (deployment_id, stage_idx, decision, user, source, comment, "
                "choice, host, ci_run, ts) VALUES (?,?,?,?,?,?,?,?,?,?)",
                (dep_id, si, decision, user, source, comment or None, choice,
                 socket.gethostname(), runner_identity(), now),
            )  # fmt: skip
            approvals = 0
            if decision == "approve" and decision_kind == "approve":
                approvals = c.execute(
                    "SELECT count(DISTINCT user) FROM approvals WHERE deployment_id=? AND "
                    "stage_idx=? AND decision='approve'",
                    (dep_id, si),
                ).fetchone()[0]
                if approvals < required:
                    return Decision("recorded", approvals, required)
            if decision in ("cancel", "supersede"):
                c.execute("UPDATE gates SET status=?, decided_at=? WHERE deployment_id=? AND "
                          "stage_idx=?", ("cancelled" if decision == "cancel" else "superseded",
                                          now, dep_id, si))  # fmt: skip
                ended = "cancelled" if decision == "cancel" else "superseded"
                c.execute(
                    "UPDATE deployments SET status=?, finished_at=?, error=? WHERE id=?",
                    (ended, now, f"{ended} by {user} while awaiting approval"
                     + (f": {comment}" if comment else ""), dep_id),
                )  # fmt: skip
                for table, key in (("stages", "idx"), ("steps", "stage_idx")):
                    c.execute(f"UPDATE {table} SET status='cancelled', finished_at=? "
                              f"WHERE deployment_id=? AND {key}=? AND status='waiting'",
                              (now, dep_id, si))  # fmt: skip
                    c.execute(f"UPDATE {table} SET status='skipped' WHERE deployment_id=? "
                              "AND status='pending'", (dep_id,))  # fmt: skip
                c.execute("DELETE FROM locks WHERE deployment_id=?", (dep_id,))
                return Decision("cancelled", 0, 1)
            assert owner is not None, "approve and reject need the process that goes on"
            approved = decision_kind == "approve"
            gate_status = "approved" if approved else "rejected"
            if decision == "expire":
                gate_status = "expired"
            step_status = Status.SUCCEEDED.value if approved else Status.FAILED.value
            c.execute("UPDATE gates SET status=?, decided_at=? WHERE deployment_id=? AND "
                      "stage_idx=?", (gate_status, now, dep_id, si))  # fmt: skip
            if not approved:  # after what the step said, if it said something (an analysis)
                why = f"rejected by {user}" + (f": {comment}" if comment else "")
                c.execute(
                    "UPDATE steps SET error=CASE WHEN error IS NULL THEN ? ELSE error || '; ' || ? "
                    "END WHERE deployment_id=? AND stage_idx=? AND status='waiting'",
                    (why, why, dep_id, si),
                )
            for table, key in (("stages", "idx"), ("steps", "stage_idx")):
                c.execute(f"UPDATE {table} SET status=?, finished_at=? WHERE deployment_id=? "
                          f"AND {key}=? AND status='waiting'", (step_status, now, dep_id, si))  # fmt: skip
            c.execute(
                "UPDATE deployments SET status='running', pid=?, host=?, proc_start=?, "
                "heartbeat_at=? WHERE id=?",
                (owner["pid"], owner["host"], owner["proc_start"], now, dep_id),
            )
            pipeline, environment, version, dep_user = dep[1], dep[2], dep[3], dep[4]
            held = c.execute("SELECT 1 FROM locks WHERE deployment_id=?", (dep_id,)).fetchone()
            if held:
                c.execute(
                    "UPDATE locks SET pid=?, host=?, proc_start=?, heartbeat_at=? "
                    "WHERE deployment_id=?",
                    (owner["pid"], owner["host"], owner["proc_start"], now, dep_id),
                )
            elif approved:  # the gate released it: take it again, as a new deployment would
                holder = self._lock(c, pipeline, environment)
                if holder is not None:
                    self._refuse_if_gate(c, holder)
                    if is_dead is not None and is_dead(_ref(holder)):
                        self._interrupt(c, holder["deployment_id"], "its process died")
                    else:
                        raise EnvironmentLocked(self._locked_message(holder), dict(holder))
                c.execute(
                    "INSERT INTO locks (pipeline, environment, deployment_id, pid, host, "
                    "proc_start, user, version, acquired_at, heartbeat_at, runner) "
                    "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (pipeline, environment, dep_id, owner["pid"], owner["host"],
                     owner["proc_start"], dep_user, version, now, now, runner_identity()),
                )  # fmt: skip
            return Decision("resume" if approved else "rejected", approvals, required)

    def bulk(self) -> _SQLiteBulk:
        """Whole-table access for ``shipyard store copy``; not part of the store port."""
        return _SQLiteBulk(self)

    # -- queries ----------------------------------------------------------------------------------

    def get(self, dep_id: int) -> DeploymentRow:
        rows = self._query(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id=?", (dep_id,))
        if not rows:
            last = self.conn.execute("SELECT max(id) FROM deployments").fetchone()[0]
            hint = f"ids go from 1 to {last}" if last else "the history is empty"
            raise DeploymentNotFound(dep_id, hint)
        return _decode(rows[0])

    def deployments(
        self,
        *,
        pipeline: str | None = None,
        environment: str | None = None,
        statuses: Sequence[str] = (),
        limit: int = 20,
    ) -> list[DeploymentRow]:
        """Deployments, newest first."""
        where: list[str] = []
        params: list[Any] = []
        if pipeline:
            where.append("pipeline=?")
            params.append(pipeline)
        if environment:
            where.append("environment=?")
            params.append(environment)
        if statuses:
            where.append(f"status IN ({','.join('?' * len(statuses))})")
            params.extend(statuses)
        sql = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC, id DESC LIMIT ?"
        params.append(limit)
        return [_decode(r) for r in self._query(sql, params)]

    def stages(self, dep_id: int) -> list[StageRow]:
        stages = self._query(
            "SELECT idx, name, status, parallel, continue_on_failure, started_at, finished_at, "
            "note FROM stages WHERE deployment_id=? ORDER BY idx",
            (dep_id,),
        )
        steps = self._query(
            "SELECT stage_idx, idx, name, kind, description, status, attempts, exit_code, error, "
            "warning, started_at, finished_at FROM steps WHERE deployment_id=? "
            "ORDER BY stage_idx, idx",
            (dep_id,),
        )
        for s in stages:
            s["parallel"] = bool(s["parallel"])
            s["continue_on_failure"] = bool(s["continue_on_failure"])
            s["steps"] = []
        for st in steps:
            st["warning"] = bool(st["warning"])
            stages[st.pop("stage_idx")]["steps"].append(st)
        return cast("list[StageRow]", stages)

    def logs(self, dep_id: int, *, after: int = 0, limit: int = 10_000) -> list[LogRow]:
        return self._query(  # type: ignore[return-value]
            "SELECT l.id, l.stage_idx, l.step_idx, l.ts, l.stream, l.line, s.name AS step "
            "FROM logs l LEFT JOIN steps s ON s.deployment_id = l.deployment_id "
            "AND s.stage_idx = l.stage_idx AND s.idx = l.step_idx "
            "WHERE l.deployment_id=? AND l.id>? ORDER BY l.id LIMIT ?",
            (dep_id, after, limit),
        )

    def audit_trail(self, *, deployment_id: int | None = None, limit: int = 50) -> list[AuditRow]:
        if deployment_id is None:
            return self._query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))  # type: ignore[return-value]
        return self._query(  # type: ignore[return-value]
            "SELECT * FROM audit WHERE deployment_id=? ORDER BY id DESC LIMIT ?",
            (deployment_id, limit),
        )

    def locks(self) -> list[LockRow]:
        return self._query("SELECT * FROM locks ORDER BY pipeline, environment")  # type: ignore[return-value]

    def previous_version(self, pipeline: str, environment: str) -> str | None:
        row = self.conn.execute(
            "SELECT version FROM deployments WHERE pipeline=? AND environment=? "
            "AND status='succeeded' ORDER BY started_at DESC LIMIT 1",
            (pipeline, environment),
        ).fetchone()
        return row[0] if row else None

    def rollback_target(self, dep_id: int) -> DeploymentRow:
        """The deployment a rollback of ``dep_id`` redeploys (DESIGN §4).

        The latest ``succeeded`` deployment of the same pipeline and environment that started
        before it, skipping its own version and deployments that were themselves rolled back.

        :raises NoPreviousDeployment: naming what was looked for.
        """
        x = self.get(dep_id)
        # Rolling back a rollback also skips the versions it rolled back (transitively): the bad
        # version may have succeeded earlier too, and must not come back (DESIGN §4).
        versions = [x["version"]]
        seen = {dep_id}
        back = x["rollback_of"]
        while back is not None and back not in seen:
            seen.add(back)
            earlier = self.get(back)
            versions.append(earlier["version"])
            back = earlier["rollback_of"]
        rows = self._query(
            f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments d "
            "WHERE d.pipeline=? AND d.environment=? AND d.status='succeeded' AND d.started_at<? "
            f"AND d.version NOT IN ({','.join('?' * len(versions))}) "
            "AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of=d.id) "
            "ORDER BY d.started_at DESC, d.id DESC LIMIT 1",
            (x["pipeline"], x["environment"], x["started_at"], *versions),
        )
        if not rows:
            other = " or ".join(repr(v) for v in dict.fromkeys(versions))
            # Say what is there instead, so the user sees why none of it qualifies.
            listed = self._query(
                "SELECT d.id, d.version, d.status, EXISTS (SELECT 1 FROM deployments r "
                "WHERE r.rollback_of=d.id) AS rolled_back FROM deployments d "
                "WHERE d.pipeline=? AND d.environment=? AND d.started_at<? "
                "ORDER BY d.started_at DESC, d.id DESC LIMIT 5",
                (x["pipeline"], x["environment"], x["started_at"]),
            )
            there = ", ".join(
                f"#{e['id']} {e['version']} {e['status']}"
                + (" (rolled back)" if e["rolled_back"] else "")
                for e in listed
            )
            raise NoPreviousDeployment(
                f"nothing to roll back to: no succeeded deployment of {x['pipeline']!r} in "
                f"{x['environment']!r} before deployment {dep_id} with a version other than "
                f"{other} that was not itself rolled back; "
                + (f"before it there: {there}" if there else "nothing was deployed there before it")
            )
        return _decode(rows[0])

    def latest(self, pipeline: str, environment: str) -> DeploymentRow:
        rows = self.deployments(pipeline=pipeline, environment=environment, limit=1)
        if not rows:
            envs = [
                r["environment"]
                for r in self._query(
                    "SELECT DISTINCT environment FROM deployments WHERE pipeline=? "
                    "ORDER BY environment",
                    (pipeline,),
                )
            ]
            where = (
                f"it was deployed to {', '.join(repr(e) for e in envs)}"
                if envs
                else f"{pipeline!r} was never deployed anywhere"
            )
            raise DeploymentNotFound(
                f"{pipeline} -e {environment}",
                f"nothing was deployed of {pipeline!r} to {environment!r}; {where}",
            )
        return rows[0]

    def deployment_counts(self, *, buckets: Sequence[float] = ()) -> list[DeploymentCountRow]:
        """One grouped scan of the deployments, in table order (NOT INDEXED: reading every row
        through ix_dep_pes would visit the table in random order, about twice as slow); a
        duration is ``finished_at - started_at`` (SQLite's date functions read milliseconds)."""
        bounds = [float(b) for b in buckets]
        le = "".join(f", count(CASE WHEN dur <= ? THEN 1 END) AS le{i}" for i in range(len(bounds)))
        rows = self._query(
            "SELECT pipeline, environment, status, count(*) AS count, count(dur) AS timed, "
            f"coalesce(sum(dur), 0.0) AS seconds{le} FROM (SELECT pipeline, environment, "
            "status, (julianday(finished_at) - julianday(started_at)) * 86400.0 AS dur "
            "FROM deployments NOT INDEXED) GROUP BY pipeline, environment, status "
            "ORDER BY pipeline, environment, status",
            bounds,
        )
        for r in rows:
            r["le"] = [r.pop(f"le{i}") for i in range(len(bounds))]
        return cast("list[DeploymentCountRow]", rows)

    def change_token(self) -> object | None:
        """``PRAGMA data_version`` (it moves when another connection commits to the file) with
        this connection's own ``total_changes`` (its own writes): no table is read."""
        try:
            version = self.conn.execute("PRAGMA data_version").fetchone()[0]
        except sqlite3.Error as exc:
            raise HistoryError(f"cannot read the history at {self.path}: {exc}") from exc
        return (version, self.conn.total_changes)

    def stats_rows(
        self, *, pipeline: str | None = None, environment: str | None = None,
        since: str | None = None, commits: bool = True,
    ) -> _StatsRows:  # fmt: skip
        """The delivery figures of a window (docs/guides/dora.md), read from what the store keeps
        up to date (:mod:`shipyard._sqlitestats`) after bringing it up to date: one short write
        transaction when deployments were written since the last ``stats``. A read-only history
        computes them from the deployments alone."""
        args: dict[str, Any] = {"pipeline": pipeline, "environment": environment,
                                "since": since, "commits": commits}  # fmt: skip
        if self.read_only:
            return kept.direct_rows(self._query, **args)
        args["rows"] = self._tuples
        c = self.conn
        try:
            c.execute("BEGIN")  # one snapshot for every figure
            try:
                if c.execute("SELECT 1 FROM stats_dirty LIMIT 1").fetchone() is None:
                    return kept.kept_rows(self._query, **args)
            finally:
                if c.in_transaction:
                    c.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            raise HistoryError(f"cannot read the history at {self.path}: {exc}") from exc
        with self._tx() as c:
            kept.refresh(c)
            return kept.kept_rows(self._query, **args)


if TYPE_CHECKING:  # the row types of stats_rows (issue #19)
    from ._store import StatsRows as _StatsRows


def _step_started(e: Any) -> tuple[str, tuple[Any, ...]]:
    return (
        "UPDATE steps SET status='running', started_at=? "
        "WHERE deployment_id=? AND stage_idx=? AND idx=?",
        (e.ts, e.deployment.id, e.stage_index, e.index),
    )


def _step_finished(e: Any) -> tuple[str, tuple[Any, ...]]:
    r = e.result
    return (
        "UPDATE steps SET status=?, attempts=?, exit_code=?, error=?, warning=?, "
        "started_at=coalesce(started_at, ?), finished_at=? "
        "WHERE deployment_id=? AND stage_idx=? AND idx=?",
        (r.status.value, r.attempts, r.exit_code, r.error, bool(r.warning), r.started_at,
         r.finished_at, e.deployment.id, e.stage_index, e.index),
    )  # fmt: skip


def _stage_started(e: Any) -> tuple[str, tuple[Any, ...]]:
    return (
        "UPDATE stages SET status='running', started_at=? WHERE deployment_id=? AND idx=?",
        (e.ts, e.deployment.id, e.index),
    )


def _stage_finished(e: Any) -> tuple[str, tuple[Any, ...]]:
    return (
        "UPDATE stages SET status=?, finished_at=? WHERE deployment_id=? AND idx=?",
        (e.status.value, e.ts, e.deployment.id, e.index),
    )


#: The SQL of each transition the runner reports, by the event's hook name.
_TRANSITIONS: dict[str, Callable[[Any], tuple[str, tuple[Any, ...]]]] = {
    "shipyard_step_started": _step_started,
    "shipyard_step_finished": _step_finished,
    "shipyard_stage_started": _stage_started,
    "shipyard_stage_finished": _stage_finished,
}


class _SQLiteBulk:
    """Whole-table reads and writes for ``shipyard store copy`` (:mod:`shipyard._storeops`)."""

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.store._tx(durable=True):
            yield

    def read(self, table: str, dep_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        order = {"stages": "deployment_id, idx", "steps": "deployment_id, stage_idx, idx",
                 "gates": "deployment_id, stage_idx"}  # fmt: skip
        sql = f"SELECT * FROM {table}"
        params: list[Any] = []
        if dep_ids is not None:
            key = "id" if table == "deployments" else "deployment_id"
            sql += f" WHERE {key} IN ({','.join('?' * len(dep_ids))})"
            params = list(dep_ids)
        sql += f" ORDER BY {order.get(table, 'id')}"
        return self.store._query(sql, params)

    def write(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        cols = [c for c in rows[0] if not (c == "id" and table != "deployments")]
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        self.store.conn.executemany(sql, [tuple(r[c] for c in cols) for r in rows])

    def insert_deployment(self, row: Mapping[str, Any], keep_id: bool) -> int:
        cols = [c for c in row if keep_id or c != "id"]
        cur = self.store.conn.execute(
            f"INSERT INTO deployments ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            tuple(row[c] for c in cols),
        )
        return int(cur.lastrowid or 0)

    def done(self) -> None:
        """Nothing to do: SQLite's next id follows the largest."""
