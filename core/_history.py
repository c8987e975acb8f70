"""The history store: every deployment, stage, step and log line, in SQLite.

The runner and the CLI only see :class:`HistoryStore` (record events, query, find the rollback
target, locks, repair); :func:`open_store` picks the implementation from a URL-like setting so a
shared store (PostgreSQL) can be added without touching them.

SQLite specifics, and why:

- WAL, ``busy_timeout`` and ``BEGIN IMMEDIATE`` for every write: many processes write the same
  file, and a deferred BEGIN that upgrades to a write lock fails with "database is locked".
- ``synchronous=NORMAL`` for step and log writes (survives any kill of the process) and a FULL sync
  for deployment-level transitions, at most two commits per step, log lines batched.
- ``PRAGMA application_id`` marks the file as ours and ``PRAGMA user_version`` is the schema
  version: any other file, or a newer schema, is refused and left untouched.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from ._exceptions import DeploymentNotFound
from ._exceptions import EnvironmentLocked
from ._exceptions import HistoryError
from ._exceptions import NoPreviousDeployment
from ._reports import Status
from ._reports import utcnow

if TYPE_CHECKING:
    from ._events import Event
    from ._pipeline import Stage

#: "SHYD" - marks a SQLite file as a Shipyard history.
APPLICATION_ID = 0x53485944
#: The schema version this code writes; migrations bring older files up to it.
SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

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
    d.create_index(["started_at"], index_name="ix_dep_started")
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


#: Migrations by the version they produce. Each runs inside one transaction.
MIGRATIONS = {1: _create_v1}


def current_user() -> str:
    for var in ("SHIPYARD_USER", "USER", "LOGNAME", "USERNAME"):
        if os.environ.get(var):
            return os.environ[var]
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError):
        return "unknown"


def ci_actor() -> str | None:
    """The CI identity from the standard variables of common CI systems."""
    for var in ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILDKITE_BUILD_CREATOR", "CIRCLE_USERNAME"):
        if os.environ.get(var):
            return f"{var}={os.environ[var]}"
    return None


def actor() -> str:
    """Who does something by hand, for the audit trail: the user, and the CI identity if any."""
    ci = ci_actor()
    return f"{current_user()} ({ci})" if ci else current_user()


def process_start(pid: int) -> str | None:
    """An identity of process ``pid`` that changes when the pid is reused (Linux: start ticks).

    ``"dead"`` for a zombie; None where ``/proc`` cannot tell.
    """
    from ._proc import stat

    st = stat(pid)
    if st is None:
        return None
    return st.starttime if st.alive else "dead"


def holder_alive(pid: int | None, host: str | None, proc_start: str | None) -> bool | None:
    """Whether the process that recorded ``pid`` on ``host`` still lives; None: other host."""
    if host != socket.gethostname():
        return None
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    now = process_start(pid)
    if now == "dead":
        return False
    return proc_start is None or now is None or now == proc_start


class HistoryStore:
    """The narrow interface the runner and the CLI use; see :class:`SQLiteHistory`."""

    path: str


def open_store(url: str, *, create: bool = True) -> SQLiteHistory:
    """Open the store named by ``url``: a file path or ``sqlite:///path``.

    :raises HistoryError: unsupported scheme, not a Shipyard history, newer schema, unwritable.
    """
    if url.startswith("sqlite://"):
        path = url[len("sqlite://") :]
    elif "://" in url:
        scheme = url.split("://", 1)[0]
        raise HistoryError(
            f"history {url!r}: unsupported store {scheme!r}; use a file path or sqlite:///path"
        )
    else:
        path = url
    return SQLiteHistory(path, create=create)


class SQLiteHistory(HistoryStore):
    """The embedded default store: one SQLite file, private to its user."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        self.path = str(path)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._proc_start = process_start(self.pid)
        p = Path(self.path)
        exists = p.exists() and p.stat().st_size > 0
        if not exists and not create:
            raise HistoryError(
                f"no history at {self.path}; nothing has been deployed from here yet"
            )
        if not exists:
            self._create_file(p)
        try:
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
        if c.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
            c.execute("PRAGMA journal_mode=WAL")
        c.execute("PRAGMA synchronous=NORMAL")
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
            self.conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            self.conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def close(self) -> None:
        self.conn.close()

    @contextmanager
    def _tx(self, durable: bool = False) -> Iterator[sqlite3.Connection]:
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
            hint = ""
            if "disk" in str(exc) or "full" in str(exc):
                hint = " (is the disk full, or a file size limit reached?)"
            raise HistoryError(f"cannot write the history at {self.path}: {exc}{hint}") from exc

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        try:
            cur = self.conn.execute(sql, params)
        except sqlite3.OperationalError as exc:
            raise HistoryError(f"cannot read the history at {self.path}: {exc}") from exc
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

    # -- deployments ------------------------------------------------------------------------------

    def begin(
        self,
        *,
        pipeline: str,
        version: str,
        environment: str,
        rollback_of: int | None = None,
        retry_of: int | None = None,
        info: dict[str, Any] | None = None,
        lock: bool = True,
        lease: float = 60.0,
        ticket: int | None = None,
    ) -> int:
        """Record a new running deployment and take the lock of its pipeline and environment.

        Both happen in one transaction: either the deployment runs holding the lock, or nothing
        is recorded and :class:`EnvironmentLocked` names the holder. Deployments waiting with a
        ``ticket`` (see :meth:`enqueue`) are served first come, first served; one without a
        ticket does not overtake them.
        """
        dead_holder: int | None = None
        info = dict(info or {})
        now = utcnow()
        with self._tx(durable=True) as c:
            if lock:
                self._check_queue(c, pipeline, environment, ticket, lease)
                row = c.execute(
                    "SELECT * FROM locks WHERE pipeline=? AND environment=?",
                    (pipeline, environment),
                ).fetchone()
                if row is not None:
                    holder = self._row_dict(c, "locks", row)
                    if self._holder_dead(holder, lease):
                        self._interrupt(c, holder["deployment_id"], "its process died")
                        dead_holder = holder["deployment_id"]
                    else:
                        raise EnvironmentLocked(self._locked_message(holder), holder)
            cur = c.execute(
                "INSERT INTO deployments (pipeline, version, environment, status, created_at, "
                "started_at, heartbeat_at, rollback_of, retry_of, user, ci_actor, host, pid, "
                "proc_start, pipelines_file, file_hash, git_commit, args, vars, shipyard_version) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    pipeline, version, environment, Status.RUNNING.value, now, now, now,
                    rollback_of, retry_of, info.get("user") or current_user(), ci_actor(),
                    self.host, self.pid, self._proc_start, info.get("pipelines_file"),
                    info.get("file_hash"), info.get("git_commit"),
                    json.dumps(info.get("args")) if info.get("args") is not None else None,
                    json.dumps(info.get("vars") or {}), info.get("shipyard_version"),
                ),
            )  # fmt: skip
            dep_id = int(cur.lastrowid or 0)
            if ticket is not None:
                c.execute("DELETE FROM lock_queue WHERE id=?", (ticket,))
            if lock:
                c.execute(
                    "INSERT INTO locks VALUES (?,?,?,?,?,?,?,?,?,?)",
                    (
                        pipeline, environment, dep_id, self.pid, self.host, self._proc_start,
                        info.get("user") or current_user(), version, now, now,
                    ),
                )  # fmt: skip
        if dead_holder is not None:
            self.stop_orphans([dead_holder])
        return dep_id

    def _check_queue(
        self, c: sqlite3.Connection, pipeline: str, environment: str, ticket: int | None,
        lease: float,
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
            waiter = {
                "pid": pid,
                "host": host,
                "proc_start": proc_start,
                "heartbeat_at": heartbeat_at,
            }
            if self._holder_dead(waiter, lease):
                c.execute("DELETE FROM lock_queue WHERE id=?", (qid,))
            else:
                ahead += 1
        if ahead:
            holder = c.execute(
                "SELECT * FROM locks WHERE pipeline=? AND environment=?", (pipeline, environment)
            ).fetchone()
            info = self._row_dict(c, "locks", holder) if holder else {}
            raise EnvironmentLocked(
                f"{pipeline!r} in {environment!r}: {ahead} deployment(s) are waiting for the "
                "lock before this one; wait with --wait-lock SECONDS",
                info,
            )

    def enqueue(self, pipeline: str, environment: str) -> int:
        """Join the queue of deployments waiting for this lock; returns the ticket."""
        now = utcnow()
        with self._tx() as c:
            cur = c.execute(
                "INSERT INTO lock_queue (pipeline, environment, pid, host, proc_start, since, "
                "heartbeat_at) VALUES (?,?,?,?,?,?,?)",
                (pipeline, environment, self.pid, self.host, self._proc_start, now, now),
            )
        return int(cur.lastrowid or 0)

    def dequeue(self, ticket: int) -> None:
        """Leave the queue (gave up waiting)."""
        with self._tx() as c:
            c.execute("DELETE FROM lock_queue WHERE id=?", (ticket,))

    def touch_ticket(self, ticket: int) -> None:
        with self._tx() as c:
            c.execute("UPDATE lock_queue SET heartbeat_at=? WHERE id=?", (utcnow(), ticket))

    @staticmethod
    def _row_dict(c: sqlite3.Connection, table: str, row: Sequence[Any]) -> dict[str, Any]:
        cols = [r[1] for r in c.execute(f"PRAGMA table_info({table})")]
        return dict(zip(cols, row, strict=True))

    @staticmethod
    def _locked_message(h: dict[str, Any]) -> str:
        return (
            f"{h['pipeline']!r} in {h['environment']!r} is locked by deployment {h['deployment_id']} "
            f"(version {h['version']}, by {h['user']} on {h['host']}, pid {h['pid']}, since "
            f"{h['acquired_at']}); wait with --wait-lock SECONDS, or if it is stuck run "
            f"`shipyard unlock {h['pipeline']} -e {h['environment']} --reason TEXT`"
        )

    def _holder_dead(self, h: dict[str, Any], lease: float) -> bool:
        alive = holder_alive(h.get("pid"), h.get("host"), h.get("proc_start"))
        if alive is None:  # another host: only the heartbeat can tell
            from ._reports import parse_ts

            return time.time() - parse_ts(h["heartbeat_at"]) > lease
        return not alive

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

    def repair(self, lease: float = 60.0) -> list[int]:
        """Mark deployments whose process died ``interrupted`` and free their locks.

        Cheap when nothing is running (one indexed query); every command calls it.
        """
        rows = self._query(
            "SELECT id, pid, host, proc_start, heartbeat_at FROM deployments "
            "WHERE status IN ('running','pending')"
        )
        dead = [r["id"] for r in rows if self._holder_dead(r, lease)]
        orphan_locks = self._query(
            "SELECT l.* FROM locks l LEFT JOIN deployments d ON d.id = l.deployment_id "
            "WHERE d.id IS NULL OR d.status NOT IN ('running','pending')"
        )
        if dead or orphan_locks:
            with self._tx(durable=True) as c:
                for dep_id in dead:
                    self._interrupt(c, dep_id, "its process died")
                for lk in orphan_locks:
                    c.execute("DELETE FROM locks WHERE deployment_id=?", (lk["deployment_id"],))
            self.stop_orphans(dead)
        return dead

    def process_tag(self, dep_id: int) -> str:
        """The value of ``SHIPYARD_DEPLOYMENT_TAG`` in the environment of deployment
        ``dep_id``'s step processes: unique to this history file and deployment."""
        import hashlib

        where = hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()[:16]
        return f"{where}-{dep_id}"

    def stop_orphans(self, dep_ids: Sequence[int], grace: float = 1.0) -> list[int]:
        """Stop the step processes that dead deployments left running on this host.

        A kill -9 of ``shipyard deploy`` cannot reach its steps, which run in process groups of
        their own. Every step process inherits ``SHIPYARD_DEPLOYMENT_TAG``, so they are found in
        ``/proc`` by their environment, grandchildren included, whatever group they moved to:
        SIGTERM, up to ``grace`` seconds, then SIGKILL. Returns the pids signalled.
        """
        if not dep_ids:
            return []
        import signal

        from ._proc import alive
        from ._proc import tagged

        pids = tagged("SHIPYARD_DEPLOYMENT_TAG", {self.process_tag(d) for d in dep_ids})
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + grace
        while pids and time.monotonic() < deadline and any(alive(p) for p in pids):
            time.sleep(0.05)
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        return pids

    def record_plan(self, dep_id: int, stages: Sequence[Stage], start_stage: int = 0,
                    note: str | None = None) -> None:  # fmt: skip
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
                step_rows.append((dep_id, si, i, step.name, step.kind, step.describe(), status, 0))
        from ._secrets import mask

        step_rows = [(*r[:5], mask(r[5]), *r[6:]) for r in step_rows]
        with self._tx() as c:
            c.executemany(
                "INSERT INTO stages (deployment_id, idx, name, status, parallel, "
                "continue_on_failure, note) VALUES (?,?,?,?,?,?,?)",
                stage_rows,
            )
            c.executemany(
                "INSERT INTO steps (deployment_id, stage_idx, idx, name, kind, description, "
                "status, attempts) VALUES (?,?,?,?,?,?,?,?)",
                step_rows,
            )
            c.execute("UPDATE deployments SET stages_total=? WHERE id=?", (len(stages), dep_id))

    def apply(self, statements: list[tuple[str, Sequence[Any]]], logs: list[tuple[Any, ...]],
              durable: bool = False) -> None:  # fmt: skip
        """Write a batch of updates and log lines in one transaction."""
        with self._tx(durable=durable) as c:
            if logs:
                c.executemany(
                    "INSERT INTO logs (deployment_id, stage_idx, step_idx, ts, stream, line) "
                    "VALUES (?,?,?,?,?,?)",
                    logs,
                )
            for sql, params in statements:
                c.execute(sql, params)

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

    def cancel_requested(self, dep_id: int) -> str | None:
        row = self.conn.execute(
            "SELECT cancel_requested FROM deployments WHERE id=?", (dep_id,)
        ).fetchone()
        return row[0] if row else None

    def request_cancel(self, dep_id: int, *, user: str, reason: str = "") -> dict[str, Any]:
        dep = self.get(dep_id)
        with self._tx(durable=True) as c:
            c.execute(
                "UPDATE deployments SET cancel_requested=? WHERE id=?",
                (f"{user}: {reason}" if reason else user, dep_id),
            )
            self._audit(c, "cancel", dep, user, reason)
        return dep

    def _audit(self, c: sqlite3.Connection, action: str, dep: dict[str, Any] | None, user: str,
               reason: str, pipeline: str | None = None, environment: str | None = None) -> None:  # fmt: skip
        c.execute(
            "INSERT INTO audit (ts, action, deployment_id, pipeline, environment, user, host, "
            "reason) VALUES (?,?,?,?,?,?,?,?)",
            (
                utcnow(), action, dep["id"] if dep else None,
                dep["pipeline"] if dep else pipeline, dep["environment"] if dep else environment,
                user, self.host, reason,
            ),
        )  # fmt: skip

    def record_audit(self, action: str, dep_id: int, reason: str, user: str | None = None) -> None:
        """Record who did ``action`` to deployment ``dep_id`` and why."""
        dep = self.get(dep_id)
        with self._tx() as c:
            self._audit(c, action, dep, user or actor(), reason)

    def unlock(
        self, pipeline: str, environment: str, *, user: str, reason: str
    ) -> dict[str, Any] | None:
        """Break the lock by hand; its deployment becomes ``interrupted``. Recorded in the audit."""
        with self._tx(durable=True) as c:
            row = c.execute(
                "SELECT * FROM locks WHERE pipeline=? AND environment=?", (pipeline, environment)
            ).fetchone()
            holder = self._row_dict(c, "locks", row) if row else None
            if holder:
                self._interrupt(c, holder["deployment_id"], f"unlocked by {user} ({reason})")
            # Recorded on the deployment it interrupted, so that `show` of it lists the unlock.
            dep = {"id": holder["deployment_id"], "pipeline": pipeline,
                   "environment": environment} if holder else None  # fmt: skip
            self._audit(c, "unlock", dep, user, reason, pipeline, environment)
        return holder

    def lock_holder(self, pipeline: str, environment: str) -> dict[str, Any] | None:
        rows = self._query(
            "SELECT * FROM locks WHERE pipeline=? AND environment=?", (pipeline, environment)
        )
        return rows[0] if rows else None

    def finish(self, dep_id: int, status: Status, error: str | None,
               statements: list[tuple[str, Sequence[Any]]] = (),  # type: ignore[assignment]
               logs: list[tuple[Any, ...]] = ()) -> None:  # type: ignore[assignment]  # fmt: skip
        """Record the final status durably, mark what never ran ``skipped``, free the lock."""
        now = utcnow()
        with self._tx(durable=True) as c:
            if logs:
                c.executemany(
                    "INSERT INTO logs (deployment_id, stage_idx, step_idx, ts, stream, line) "
                    "VALUES (?,?,?,?,?,?)",
                    logs,
                )
            for sql, params in statements:
                c.execute(sql, params)
            for table in ("stages", "steps"):
                c.execute(
                    f"UPDATE {table} SET status='skipped' WHERE deployment_id=? AND status='pending'",
                    (dep_id,),
                )
                if status is not Status.SUCCEEDED:
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

    # -- queries ----------------------------------------------------------------------------------

    def get(self, dep_id: int) -> dict[str, Any]:
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
    ) -> list[dict[str, Any]]:
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

    def stages(self, dep_id: int) -> list[dict[str, Any]]:
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
        return stages

    def document(self, dep_id: int, *, stages: bool = True) -> dict[str, Any]:
        """The JSON document of ``show --json`` and ``deploy --json``."""
        doc = self.get(dep_id)
        if stages:
            doc["stages"] = [
                {
                    "name": s["name"],
                    "status": s["status"],
                    "started_at": s["started_at"],
                    "finished_at": s["finished_at"],
                    "steps": [
                        {k: st[k] for k in ("name", "kind", "status", "attempts", "exit_code",
                                            "error", "warning", "started_at", "finished_at")}
                        for st in s["steps"]
                    ],
                }
                for s in self.stages(dep_id)
            ]  # fmt: skip
        return doc

    def logs(self, dep_id: int, *, after: int = 0, limit: int = 10_000) -> list[dict[str, Any]]:
        return self._query(
            "SELECT l.id, l.stage_idx, l.step_idx, l.ts, l.stream, l.line, s.name AS step "
            "FROM logs l LEFT JOIN steps s ON s.deployment_id = l.deployment_id "
            "AND s.stage_idx = l.stage_idx AND s.idx = l.step_idx "
            "WHERE l.deployment_id=? AND l.id>? ORDER BY l.id LIMIT ?",
            (dep_id, after, limit),
        )

    def audit(self, *, deployment_id: int | None = None, limit: int = 50) -> list[dict[str, Any]]:
        if deployment_id is None:
            return self._query("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))
        return self._query(
            "SELECT * FROM audit WHERE deployment_id=? ORDER BY id DESC LIMIT ?",
            (deployment_id, limit),
        )

    def previous_version(self, pipeline: str, environment: str) -> str | None:
        row = self.conn.execute(
            "SELECT version FROM deployments WHERE pipeline=? AND environment=? "
            "AND status='succeeded' ORDER BY started_at DESC LIMIT 1",
            (pipeline, environment),
        ).fetchone()
        return row[0] if row else None

    def rollback_target(self, dep_id: int) -> dict[str, Any]:
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

    def latest(self, pipeline: str, environment: str) -> dict[str, Any]:
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


def _decode(row: dict[str, Any]) -> dict[str, Any]:
    for key in ("vars", "args"):
        if row.get(key):
            row[key] = json.loads(row[key])
    return row


class HistoryRecorder:
    """Turns the event stream into history writes: at most two commits per step.

    Stage transitions and log lines ride along with the next step commit; log lines of a long
    step are also flushed every ``flush_interval`` seconds so ``logs --follow`` sees them.
    """

    def __init__(
        self,
        store: SQLiteHistory,
        flush_interval: float = 0.5,
        max_lines: int = 2000,
        on_error: Callable[[HistoryError], None] | None = None,
    ) -> None:
        self.store = store
        #: The first write error; after it the recorder stops writing (the run is stopped).
        self.error: HistoryError | None = None
        self.on_error = on_error
        self.flush_interval = flush_interval
        self.max_lines = max_lines
        self._statements: list[tuple[str, Sequence[Any]]] = []
        self._logs: list[tuple[Any, ...]] = []
        self._last_flush = time.monotonic()

    def flush(self, durable: bool = False) -> None:
        if self._statements or self._logs:
            statements, logs = self._statements, self._logs
            self._statements, self._logs = [], []
            self.store.apply(statements, logs, durable=durable)
        self._last_flush = time.monotonic()

    def tick(self) -> None:
        """Flush what waited ``flush_interval``: a step that printed and then went quiet would
        otherwise keep its lines from ``logs --follow``, and a long step would not show as
        running, until it finished."""
        if self.error is not None or not (self._logs or self._statements):
            return
        if time.monotonic() - self._last_flush <= self.flush_interval:
            return
        try:
            self.flush()
        except HistoryError as exc:
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    def note(self, dep_id: int, text: str) -> None:
        """Record a message of Shipyard's own (e.g. a notifier error) in the deployment's log."""
        self._logs.append((dep_id, None, None, time.time(), "shipyard", text))

    def handle(self, event: Event) -> None:
        if self.error is not None:
            return
        try:
            self._handle(event)
        except HistoryError as exc:
            # A full disk or a broken file: stop the deployment rather than run it unrecorded.
            self.error = exc
            if self.on_error is not None:
                self.on_error(exc)

    def _handle(self, event: Event) -> None:
        name = event.hook
        d = event.deployment
        s = self._statements
        if name == "shipyard_step_output":
            e: Any = event
            for ln in e.lines:
                self._logs.append((d.id, e.stage_index, e.index, ln.ts, ln.stream, ln.text))
            if (
                len(self._logs) >= self.max_lines
                or time.monotonic() - self._last_flush > self.flush_interval
            ):
                self.flush()
        elif name == "shipyard_step_started":
            e = event
            s.append(
                ("UPDATE steps SET status='running', started_at=? "
                 "WHERE deployment_id=? AND stage_idx=? AND idx=?",
                 (e.ts, d.id, e.stage_index, e.index))
            )  # fmt: skip
            # Not flushed here: a quick step is recorded in one commit when it finishes, and a
            # long one shows as running at the next heartbeat's tick().
        elif name == "shipyard_step_finished":
            e = event
            r = e.result
            s.append(
                ("UPDATE steps SET status=?, attempts=?, exit_code=?, error=?, warning=?, "
                 "started_at=coalesce(started_at, ?), finished_at=? "
                 "WHERE deployment_id=? AND stage_idx=? AND idx=?",
                 (r.status.value, r.attempts, r.exit_code, r.error, int(r.warning), r.started_at,
                  r.finished_at, d.id, e.stage_index, e.index))
            )  # fmt: skip
            self.flush()
        elif name == "shipyard_stage_started":
            e = event
            s.append(
                ("UPDATE stages SET status='running', started_at=? WHERE deployment_id=? AND idx=?",
                 (e.ts, d.id, e.index))
            )  # fmt: skip
            s.append(("UPDATE deployments SET current_stage=? WHERE id=?", (e.index, d.id)))
            # One commit per stage: the previous stage's end and this one's start are durable
            # before any of its steps runs, so a crash never leaves a finished stage "running".
            self.flush()
        elif name == "shipyard_stage_finished":
            e = event
            s.append(
                ("UPDATE stages SET status=?, finished_at=? WHERE deployment_id=? AND idx=?",
                 (e.status.value, e.ts, d.id, e.index))
            )  # fmt: skip
        elif name == "shipyard_deployment_started":
            e = event
            self.flush()
            self.store.record_plan(d.id, e.stages, e.start_stage, note=e.note)
        elif name == "shipyard_rollback_started":
            e = event
            self.note(d.id, f"rolling back to version {e.target}: {e.reason}")
            self.flush()
        elif name == "shipyard_deployment_finished":
            e = event
            statements, logs = self._statements, self._logs
            self._statements, self._logs = [], []
            self.store.finish(d.id, e.status, e.error, statements, logs)
