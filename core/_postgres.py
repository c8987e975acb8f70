"""The shared store: a PostgreSQL database many CI runners use at once (a :class:`HistoryStore`).

Opened for ``postgresql://`` (and ``postgres://``) URLs, with the optional extra
``shipyard[postgres]`` (psycopg 3). The URL is handed to libpq as it is, so ``PGPASSWORD``,
``~/.pgpass``, ``PGSSLMODE``/``sslmode`` and every other libpq setting work as usual.

PostgreSQL specifics, and why:

- **Locks are sessions.** Taking a pipeline and environment's lock takes a session advisory lock
  on a connection of its own (never pooled), with TCP keepalives and ``tcp_user_timeout`` set on
  both ends, so the server frees the lock about ten seconds after its runner vanishes (its own
  default would wait two hours). Beside it a holder row (deployment, host, pid, runner, since)
  says who holds it, with a *generation* drawn from a sequence: every write of that deployment
  checks it (a fencing token), so a holder that lost its lock can never write over the one that
  took it. Dead means: no session holds the advisory lock any more, or the engine's liveness
  predicate says the holder's process is gone (its session is then ended).
- **Begins are serialized** per pipeline and environment by a transaction advisory lock, so a
  runner refused the lock always sees the holder's committed row and can name it.
- **Writes are batched** (:attr:`PostgresStore.batch_interval`): the history recorder commits step
  ends and log lines at most every 100 ms and at stage ends; deployment-level transitions and lock
  calls are synchronous and durable. Step-level commits use ``synchronous_commit=off`` (a crash of
  the server may lose the last few hundred milliseconds, never a kill of the runner).
- **Transient errors are retried** with backoff (the connection is made again) for up to
  :data:`WRITE_RETRY_SECONDS`; past that the error reaches the engine, which stops the deployment
  rather than run it unrecorded.
- **Migrations** are numbered and serialized by a transaction advisory lock, so five runners
  starting at once against an empty database all succeed; a migrated schema needs no DDL rights.
- A transaction-mode pooler (pgbouncer) is refused: session advisory locks cannot work through
  it, and two connections reporting one backend pid give it away.

All of Shipyard's PostgreSQL lives in this module; psycopg is imported here only.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING
from typing import Any
from typing import TypeVar
from typing import cast

from ._exceptions import ApprovalRefused
from ._exceptions import DeploymentNotFound
from ._exceptions import EnvironmentLocked
from ._exceptions import HistoryError
from ._exceptions import LockLost
from ._exceptions import NoPreviousDeployment
from ._reports import Status
from ._reports import utcnow
from ._sqlite import _TRANSITIONS as _SQLITE_TRANSITIONS
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
from ._store import locked_message
from ._store import process_ref as _ref

if TYPE_CHECKING:
    from ._events import Event

T = TypeVar("T")

#: The schema version this code writes (the SQLite store's schema 4, in PostgreSQL).
SCHEMA_VERSION = 3
#: How long a write is retried (connection made again) before the error reaches the engine
#: (``SHIPYARD_STORE_RETRY`` seconds; a deployment's final record, three times as long).
WRITE_RETRY_SECONDS = float(os.environ.get("SHIPYARD_STORE_RETRY") or 10.0)
#: Seconds without a connection to the store after which a holder counts its lock as lost:
#: the server ends a silent session after about this long (the keepalives below).
LOCK_GRACE_SECONDS = 10.0
#: Keepalives of every session (a lock's above all), on both ends: idle 5 s, then 3 probes 2 s
#: apart, and no unacknowledged data for more than 10 s.
KEEPALIVES = {"keepalives": "1", "keepalives_idle": "5", "keepalives_interval": "2",
              "keepalives_count": "3", "tcp_user_timeout": "10000"}  # fmt: skip
SERVER_KEEPALIVES = ("-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 "
                     "-c tcp_keepalives_count=3 -c tcp_user_timeout=10000")  # fmt: skip
#: Seconds to wait for a connection when the URL does not say (libpq would wait forever).
CONNECT_TIMEOUT = "10"
#: The key of the transaction advisory lock that serializes migrations.
MIGRATION_LOCK = 0x5348594400000001

_DEPLOYMENT_COLUMNS = (
    "id, pipeline, version, environment, status, started_at, finished_at, rollback_of, "
    'retry_of, error, "user", ci_actor, host, pid, pipelines_file, file_hash, git_commit, args, '
    "vars, shipyard_version, stages_total, current_stage, cancel_requested"
)

_MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE shipyard_meta (key text PRIMARY KEY, value text NOT NULL)",
        """CREATE TABLE deployments (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
            pipeline text NOT NULL, version text NOT NULL, environment text NOT NULL,
            status text NOT NULL, created_at text NOT NULL, started_at text, finished_at text,
            heartbeat_at text, rollback_of bigint, retry_of bigint, error text, "user" text,
            ci_actor text, host text, pid integer, proc_start text, pipelines_file text,
            file_hash text, git_commit text, args text, vars text, shipyard_version text,
            stages_total integer, current_stage integer, cancel_requested text)""",
        "CREATE INDEX ix_dep_pes ON deployments (pipeline, environment, status, started_at)",
        "CREATE INDEX ix_dep_pe ON deployments (pipeline, environment, started_at)",
        "CREATE INDEX ix_dep_started ON deployments (started_at DESC NULLS LAST, id DESC)",
        "CREATE INDEX ix_dep_status ON deployments (status) WHERE status IN ('running','pending')",
        "CREATE INDEX ix_dep_rollback_of ON deployments (rollback_of)",
        """CREATE TABLE stages (
            deployment_id bigint NOT NULL, idx integer NOT NULL, name text, status text,
            parallel boolean, continue_on_failure boolean, started_at text, finished_at text,
            note text, PRIMARY KEY (deployment_id, idx))""",
        """CREATE TABLE steps (
            deployment_id bigint NOT NULL, stage_idx integer NOT NULL, idx integer NOT NULL,
            name text, kind text, description text, status text, attempts integer,
            exit_code integer, error text, warning boolean, started_at text, finished_at text,
            PRIMARY KEY (deployment_id, stage_idx, idx))""",
        """CREATE TABLE logs (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, deployment_id bigint NOT NULL,
            stage_idx integer, step_idx integer, ts double precision, stream text, line text)""",
        "CREATE INDEX ix_logs_dep ON logs (deployment_id, id)",
        """CREATE TABLE locks (
            pipeline text NOT NULL, environment text NOT NULL, deployment_id bigint NOT NULL,
            pid integer, host text, proc_start text, "user" text, version text,
            acquired_at text, heartbeat_at text, runner text, backend_pid integer,
            generation bigint NOT NULL, PRIMARY KEY (pipeline, environment))""",
        "CREATE SEQUENCE lock_generation",
        """CREATE TABLE lock_queue (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, pipeline text NOT NULL,
            environment text NOT NULL, pid integer, host text, proc_start text, since text,
            heartbeat_at text)""",
        "CREATE INDEX ix_queue_pe ON lock_queue (pipeline, environment, id)",
        """CREATE TABLE audit (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, ts text, action text,
            deployment_id bigint, pipeline text, environment text, "user" text, host text,
            reason text)""",
        "CREATE INDEX ix_audit_dep ON audit (deployment_id, id)",
        """CREATE TABLE artifacts (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, deployment_id bigint NOT NULL,
            stage_idx integer NOT NULL, step_idx integer NOT NULL, name text NOT NULL,
            content text NOT NULL, created_at text)""",
        "CREATE INDEX ix_art ON artifacts (deployment_id, stage_idx, step_idx)",
        "INSERT INTO shipyard_meta VALUES ('application', 'shipyard')",
        # The identity of this history, the same through every address that reaches it.
        "INSERT INTO shipyard_meta VALUES ('store_id', md5(random()::text || clock_timestamp()))",
    ],
    2: [
        """CREATE TABLE gates (
            deployment_id bigint NOT NULL, stage_idx integer NOT NULL, stage text,
            requested_at text, expires_at text, spec text, fingerprint text, context text,
            status text NOT NULL, decided_at text, PRIMARY KEY (deployment_id, stage_idx))""",
        """CREATE TABLE approvals (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, deployment_id bigint NOT NULL,
            stage_idx integer NOT NULL, decision text NOT NULL, "user" text NOT NULL,
            source text, comment text, choice text, host text, ci_run text, ts text NOT NULL)""",
        "CREATE INDEX ix_approvals_dep ON approvals (deployment_id, id)",
        "CREATE INDEX ix_gates_status ON gates (status)",
    ],
    3: [
        """CREATE TABLE measurements (
            id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, deployment_id bigint NOT NULL,
            stage_idx integer NOT NULL, step_idx integer NOT NULL, metric text NOT NULL,
            n integer NOT NULL, ts text NOT NULL, value text, outcome text NOT NULL, error text,
            dry_run boolean NOT NULL DEFAULT false, warnings text)""",
        "CREATE INDEX ix_meas_dep ON measurements (deployment_id, id)",
    ],
}


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError as exc:
        raise HistoryError(
            "a postgresql:// history needs the PostgreSQL extra: pip install 'shipyard[postgres]'"
            f" ({exc})"
        ) from None
    return psycopg


def _key(*parts: str) -> int:
    """A signed 64-bit advisory lock key for ``parts``."""
    digest = hashlib.sha256("\0".join(parts).encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


class _Held:
    """A lock this process holds: its session's connection and its fencing generation."""

    def __init__(self, conn: Any, key: int, generation: int) -> None:
        self.conn = conn
        self.key = key
        self.generation = generation
        self.guard = threading.Lock()
        #: Why the lock is known lost, once it is.
        self.lost: str | None = None
        #: Released by its deployment's end: not lost, whatever its closed session says.
        self.released = False

    def check(self) -> str | None:
        """Why the lock is lost (its session ended), or None while it is held (or was released
        by its deployment's end)."""
        if self.lost:
            return self.lost
        with self.guard:
            if self.released:
                return None
            try:
                holds = _holds(self.conn, self.key)
            except Exception as exc:  # any failure of the session is the end of the lock
                self.lost = f"the store's session holding it ended: {_one_line(exc)}"
                return self.lost
        if not holds:
            self.lost = "the store's session no longer holds it (its session was ended)"
        return self.lost

    def release(self) -> None:
        with self.guard:
            self.released = True
            try:
                if not self.conn.closed:
                    self.conn.execute("SELECT pg_advisory_unlock(%s)", (self.key,))
            except Exception:
                pass
            finally:
                try:
                    self.conn.close()
                except Exception:
                    pass


#: The locks this process holds, by deployment id: every store object of the process (the
#: heartbeat opens its own) checks them.
_HELD: dict[int, _Held] = {}


_HOLDS = ("SELECT count(*) FROM pg_locks WHERE locktype='advisory' AND granted AND pid={pid} "
          "AND classid=%s AND objid=%s AND objsubid=1")  # fmt: skip


def _holds(conn: Any, key: int, backend_pid: int | None = None) -> bool:
    """Whether the session ``backend_pid`` (default: ``conn``'s own) holds advisory lock ``key``."""
    params: tuple[int, ...] = _split(key)
    if backend_pid is None:
        sql = _HOLDS.format(pid="pg_backend_pid()")
    else:
        sql, params = _HOLDS.format(pid="%s"), (backend_pid, *params)
    return bool(conn.execute(sql, params).fetchone()[0])


def _split(key: int) -> tuple[int, int]:
    """The (classid, objid) under which pg_locks shows a bigint advisory key."""
    u = key & 0xFFFFFFFFFFFFFFFF
    return (u >> 32, u & 0xFFFFFFFF)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


class PostgresStore:
    """The shared store: a PostgreSQL database (see the module docstring)."""

    #: The history recorder batches step ends and log lines for this long (and at stage ends).
    batch_interval = 0.1
    #: A deployment waiting for the lock (``--wait-lock``) asks again this often.
    lock_poll_interval = 0.02

    def __init__(self, url: str, *, create: bool = True) -> None:
        from ._secrets import mask_url

        self._psycopg = _import_psycopg()
        self.url = mask_url(url)
        self._raw_url = url
        self._guard = threading.RLock()
        #: The deployments whose locks this object took (released by :meth:`close`).
        self._mine: set[int] = set()
        #: The schema versions this open applied (``shipyard store migrate`` says them).
        self.migrated: list[int] = []
        params = self._psycopg.conninfo.conninfo_to_dict(url)
        self._params = params
        self.host = str(params.get("host") or "the default host")
        self.conn = self._connect()
        try:
            row = self.conn.execute(
                "SELECT current_database(), current_schema(), "
                "coalesce(inet_server_addr()::text, 'local'), current_setting('port')"
            ).fetchone()
            db, schema, addr, port = row
            if schema is None:
                raise HistoryError(
                    f"history {self.url}: no schema to write in (the search_path names none "
                    "that exists); create it, or set options=-csearch_path=NAME in the URL"
                )
            self.schema = str(schema)
            self._ns = f"{db}\0{schema}"
            self._check_and_migrate(create)
            store_id = self.conn.execute(
                "SELECT value FROM shipyard_meta WHERE key='store_id'"
            ).fetchone()
            self.identity = (
                f"postgresql:{store_id[0] if store_id else f'{addr}:{port}/{db}/{schema}'}"
            )
        except BaseException:
            self.conn.close()
            raise

    # -- connections ------------------------------------------------------------------------------

    def _connect(self, *, lock: bool = False) -> Any:
        pg = self._psycopg
        kw: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in self._params:
            kw["connect_timeout"] = CONNECT_TIMEOUT
        if "application_name" not in self._params:
            kw["application_name"] = "shipyard-lock" if lock else "shipyard"
        # Every connection: a write to a server that vanished fails in about 10 s (not after
        # the kernel's quarter of an hour of retransmissions), and the server ends the session
        # of a runner that vanished as soon (a lock's session first of all).
        for k, v in KEEPALIVES.items():
            if k not in self._params:
                kw[k] = v
        kw["options"] = " ".join(
            x for x in (str(self._params.get("options") or ""), SERVER_KEEPALIVES) if x
        )
        try:
            return pg.connect(self._raw_url, **kw)
        except pg.Error as exc:
            raise HistoryError(
                f"cannot connect to the history store {self.url} (host {self.host}): "
                f"{_one_line(exc)}"
            ) from None

    def close(self) -> None:
        """Close the connection and end the sessions of the locks this object took (as the
        end of its process would)."""
        with self._guard:
            for dep_id in self._mine:
                held = _HELD.pop(dep_id, None)
                if held is not None:
                    held.release()
            self._mine.clear()
            try:
                self.conn.close()
            except Exception:
                pass

    def _reconnect(self) -> None:
        try:
            self.conn.close()
        except Exception:
            pass
        self.conn = self._connect()

    def _retrying(self, what: str, fn: Callable[[], T], seconds: float = WRITE_RETRY_SECONDS) -> T:
        """Run ``fn`` (one transaction), again on a new connection after a connection error,
        with backoff, for up to ``seconds``."""
        pg = self._psycopg
        deadline = time.monotonic() + seconds
        delay = 0.05
        with self._guard:
            while True:
                try:
                    if self.conn.closed or self.conn.broken:
                        self._reconnect()
                    return fn()
                except (pg.OperationalError, pg.InterfaceError, HistoryError) as exc:
                    if isinstance(exc, HistoryError) and not _is_connection_error(exc):
                        raise
                    if time.monotonic() + delay > deadline:
                        raise HistoryError(
                            f"cannot {what} the history store {self.url} (host {self.host}): "
                            f"{_one_line(exc)}"
                        ) from None
                    time.sleep(delay)
                    delay = min(delay * 2, 1.0)
                except pg.Error as exc:
                    raise HistoryError(
                        f"cannot {what} the history store {self.url}: {_one_line(exc)}"
                    ) from None

    @contextmanager
    def _tx(self, *, durable: bool = True) -> Iterator[Any]:
        with self.conn.transaction():
            if not durable:
                self.conn.execute("SET LOCAL synchronous_commit = off")
            yield self.conn

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        def run() -> list[dict[str, Any]]:
            cur = self.conn.execute(sql, params)
            if cur.description is None:
                return []
            cols = [d.name for d in cur.description]
            return [dict(zip(cols, row, strict=True)) for row in cur.fetchall()]

        return self._retrying("read", run)

    # -- schema -----------------------------------------------------------------------------------

    def _version(self, c: Any) -> int | None:
        """The schema version there, or None when the schema holds no Shipyard history."""
        # One statement, one snapshot: a runner migrating meanwhile commits all its tables at
        # once, so they are seen all or none (two queries could see none, then some).
        exists, others = c.execute(
            "SELECT count(*) FILTER (WHERE tablename = 'shipyard_meta'), "
            "count(*) FILTER (WHERE tablename IN ('deployments','locks','logs')) "
            "FROM pg_tables WHERE schemaname=current_schema()"
        ).fetchone()
        if not exists:
            if others:
                raise HistoryError(
                    f"history {self.url}: schema {self.schema!r} has tables named like "
                    "Shipyard's but is not a Shipyard history; it was left untouched — use "
                    "another database or schema"
                )
            return None
        rows = dict(c.execute("SELECT key, value FROM shipyard_meta").fetchall())
        if rows.get("application") != "shipyard":
            raise HistoryError(f"history {self.url}: not a Shipyard history; left untouched")
        return int(rows.get("schema_version", "0"))

    def _check_and_migrate(self, create: bool) -> None:
        try:
            version = self._version(self.conn)
        except self._psycopg.Error as exc:
            raise HistoryError(
                f"cannot read the history store {self.url}: {_one_line(exc)}"
            ) from None
        if version is None and not create:
            raise StoreNotFound(
                f"no history at {self.url}; nothing has been deployed with this store yet"
            )
        if version is not None and version > SCHEMA_VERSION:
            raise HistoryError(
                f"{self.url} has history schema {version}, newer than this Shipyard understands "
                f"({SCHEMA_VERSION}); upgrade shipyard to use it. Nothing was changed."
            )
        if version is None or version < SCHEMA_VERSION:
            self.migrated = self.migrate()

    def migrate(self) -> list[int]:
        """Bring the schema up to :data:`SCHEMA_VERSION`; returns the versions applied.

        Serialized by a transaction advisory lock: of several runners starting at once against
        an empty database, one creates the schema and the others find it done.
        """
        pg = self._psycopg
        applied: list[int] = []
        try:
            with self.conn.transaction():
                self.conn.execute(
                    "SELECT pg_advisory_xact_lock(%s)",
                    (_key("migrate", self._ns) ^ MIGRATION_LOCK,),
                )
                version = self._version(self.conn) or 0
                if version > SCHEMA_VERSION:
                    raise HistoryError(
                        f"{self.url} has history schema {version}, newer than this Shipyard "
                        f"understands ({SCHEMA_VERSION}); upgrade shipyard to use it"
                    )
                for target in range(version + 1, SCHEMA_VERSION + 1):
                    for sql in _MIGRATIONS[target]:
                        self.conn.execute(sql)
                    applied.append(target)
                self.conn.execute(
                    "INSERT INTO shipyard_meta VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )
        except pg.errors.InsufficientPrivilege as exc:
            raise HistoryError(
                f"history {self.url}: schema {self.schema!r} needs migrating to version "
                f"{SCHEMA_VERSION} and this role may not: {_one_line(exc)}; have a DBA run "
                "`shipyard store migrate URL`"
            ) from None
        except pg.Error as exc:
            raise HistoryError(
                f"cannot migrate the history store {self.url}: {_one_line(exc)}"
            ) from None
        return applied

    # -- locks ------------------------------------------------------------------------------------

    def _lock_keys(self, pipeline: str, environment: str) -> tuple[int, int]:
        """The session lock's key and the key that serializes begins."""
        return _key("lock", self._ns, pipeline, environment), _key(
            "begin", self._ns, pipeline, environment
        )

    def _holder(self, c: Any, pipeline: str, environment: str) -> dict[str, Any] | None:
        cur = c.execute(
            "SELECT * FROM locks WHERE pipeline=%s AND environment=%s", (pipeline, environment)
        )
        row = cur.fetchone()
        if row is None:
            return None
        out = dict(zip([d.name for d in cur.description], row, strict=True))
        if pipeline == ENVIRONMENT_LOCK:  # name the pipeline whose deployment holds it
            of = c.execute("SELECT pipeline FROM deployments WHERE id=%s", (out["deployment_id"],))
            out["holder_pipeline"] = (of.fetchone() or [None])[0]
        return out

    def _session_holds(self, c: Any, key: int, backend_pid: int | None) -> bool:
        return bool(backend_pid) and _holds(c, key, backend_pid)

    def _lock_session(self) -> Any:
        """A new connection for a lock's session; a transaction-mode pooler is refused."""
        lc = self._connect(lock=True)
        try:
            mine = self.conn.execute("SELECT pg_backend_pid()").fetchone()[0]
            theirs = lc.execute("SELECT pg_backend_pid()").fetchone()[0]
            if mine == theirs:
                raise HistoryError(_POOLER.format(url=self.url))
        except BaseException:
            lc.close()
            raise
        return lc

    def _try_lock(self, lc: Any, key: int) -> bool:
        if not lc.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
            return False
        held = _holds(lc, key)
        if not held:  # the lock did not stay with its session: a pooler in between
            raise HistoryError(_POOLER.format(url=self.url))
        return True

    def _end_session(self, c: Any, backend_pid: int | None) -> None:
        if backend_pid:
            c.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))

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
        pg = self._psycopg
        try:
            with self._guard:
                if self.conn.broken or self.conn.closed:
                    self._reconnect()
                return self._begin(pipeline=pipeline, version=version, environment=environment,
                                   owner=owner, is_dead=is_dead, info=info or {},
                                   rollback_of=rollback_of, retry_of=retry_of, lock=lock,
                                   ticket=ticket, lock_key=lock_key)  # fmt: skip
        except pg.Error as exc:
            raise HistoryError(
                f"cannot record the deployment in the history store {self.url} (host "
                f"{self.host}): {_one_line(exc)}"
            ) from None

    def _begin(self, *, pipeline: str, version: str, environment: str, owner: ProcessRef,
               is_dead: Liveness, info: DeploymentInfo, rollback_of: int | None,
               retry_of: int | None, lock: bool, ticket: int | None,
               lock_key: str | None = None) -> Begun:  # fmt: skip

        interrupted: list[int] = []
        user = info.get("user")
        lk = lock_key or pipeline
        key, serial = self._lock_keys(lk, environment)
        lc: Any = self._lock_session() if lock else None
        try:
            with self._tx() as c:
                if lock:
                    c.execute("SET LOCAL lock_timeout = '30s'")
                    c.execute("SELECT pg_advisory_xact_lock(%s)", (serial,))
                    self._check_queue(c, lk, environment, ticket, is_dead)
                    self._acquire(c, lc, key, lk, environment, is_dead, interrupted)
                # The clock is read holding the lock: a deployment that waited for the previous
                # one's end never records a start from before that end.
                now = utcnow()
                args = info.get("args")
                dep_id = c.execute(
                    'INSERT INTO deployments (pipeline, version, environment, status, created_at, '
                    'started_at, heartbeat_at, rollback_of, retry_of, "user", ci_actor, host, pid, '
                    "proc_start, pipelines_file, file_hash, git_commit, args, vars, "
                    "shipyard_version) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,"
                    "%s,%s,%s,%s) RETURNING id",
                    (
                        pipeline, version, environment, Status.RUNNING.value, now, now, now,
                        rollback_of, retry_of, user, info.get("ci_actor"), owner["host"],
                        owner["pid"], owner["proc_start"], info.get("pipelines_file"),
                        info.get("file_hash"), info.get("git_commit"),
                        json.dumps(args) if args is not None else None,
                        json.dumps(info.get("vars") or {}), info.get("shipyard_version"),
                    ),
                ).fetchone()[0]  # fmt: skip
                if ticket is not None:
                    c.execute("DELETE FROM lock_queue WHERE id=%s", (ticket,))
                generation = 0
                if lock:
                    generation = self._insert_lock(c, lc, lk, environment, dep_id, owner,
                                                   user, version, now)  # fmt: skip
        except BaseException:
            if lc is not None:
                _Held(lc, key, 0).release()
            raise
        if lock:
            _HELD[int(dep_id)] = _Held(lc, key, int(generation))
            self._mine.add(int(dep_id))
        return Begun(int(dep_id), interrupted)

    @staticmethod
    def _insert_lock(c: Any, lc: Any, pipeline: str, environment: str, dep_id: int,
                     owner: ProcessRef, user: str | None, version: str, now: str) -> int:  # fmt: skip
        """The holder row of a lock ``lc``'s session took; returns its generation (the fencing
        token of every write of ``dep_id`` from now on)."""
        from ._identity import runner_identity

        generation = int(c.execute("SELECT nextval('lock_generation')").fetchone()[0])
        backend = lc.execute("SELECT pg_backend_pid()").fetchone()[0]
        c.execute(
            'INSERT INTO locks (pipeline, environment, deployment_id, pid, host, proc_start, '
            '"user", version, acquired_at, heartbeat_at, runner, backend_pid, generation) '
            "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
            (pipeline, environment, dep_id, owner["pid"], owner["host"], owner["proc_start"],
             user, version, now, now, runner_identity(), backend, generation),
        )  # fmt: skip
        return generation

    def _acquire(self, c: Any, lc: Any, key: int, pipeline: str, environment: str,
                 is_dead: Liveness, interrupted: list[int]) -> None:  # fmt: skip
        """Take the session lock ``key`` on ``lc``; a dead holder is interrupted on the way."""
        deadline = time.monotonic() + 2.0
        while True:
            holder = self._holder(c, pipeline, environment)
            if holder is not None:
                self._refuse_if_gate(c, holder)
            if holder is not None and not self._session_holds(c, key, holder["backend_pid"]):
                # Its session is gone: the runner died or lost its network.
                self._interrupt(c, holder["deployment_id"], "its lock's session ended")
                interrupted.append(holder["deployment_id"])
                holder = None
            elif holder is not None and is_dead(_ref(holder)):
                self._end_session(c, holder["backend_pid"])
                self._interrupt(c, holder["deployment_id"], "its process died")
                interrupted.append(holder["deployment_id"])
                holder = None
            elif holder is not None:
                raise EnvironmentLocked(locked_message(holder), dict(_lock_row(holder)))
            if self._try_lock(lc, key):
                return
            # Held by a session with no row: a holder committing its finish, whose unlock
            # follows at once, or one just ended above.
            if time.monotonic() > deadline:
                raise EnvironmentLocked(
                    f"{pipeline!r} in {environment!r} is locked by a session of the history "
                    f"store {self.url} that recorded no deployment; if it stays so, run "
                    f"`shipyard unlock {pipeline} -e {environment} --reason TEXT`",
                    {},
                )
            time.sleep(0.01)

    def _refuse_if_gate(self, c: Any, holder: Mapping[str, Any]) -> None:
        """A lock held by a deployment awaiting approval: no session, never dead; say so."""
        row = c.execute(
            "SELECT d.status, g.requested_at, g.expires_at, g.stage FROM deployments d "
            "LEFT JOIN gates g ON g.deployment_id = d.id AND g.status = 'waiting' WHERE d.id=%s",
            (holder["deployment_id"],),
        ).fetchone()
        if row and row[0] == Status.AWAITING_APPROVAL.value:
            from ._store import gate_locked_message

            raise EnvironmentLocked(
                gate_locked_message(holder, requested_at=row[1], expires_at=row[2], stage=row[3]),
                dict(_lock_row(holder)),
            )

    def _check_queue(self, c: Any, pipeline: str, environment: str, ticket: int | None,
                     is_dead: Liveness) -> None:  # fmt: skip
        rows = c.execute(
            "SELECT id, pid, host, proc_start, heartbeat_at FROM lock_queue "
            "WHERE pipeline=%s AND environment=%s ORDER BY id",
            (pipeline, environment),
        ).fetchall()
        ahead = 0
        for qid, pid, host, proc_start, heartbeat_at in rows:
            if ticket is not None and qid >= ticket:
                break
            waiter: ProcessRef = {"pid": pid, "host": host, "proc_start": proc_start,
                                  "heartbeat_at": heartbeat_at}  # fmt: skip
            if is_dead(waiter):
                c.execute("DELETE FROM lock_queue WHERE id=%s", (qid,))
            else:
                ahead += 1
        if ahead:
            holder = self._holder(c, pipeline, environment)
            raise EnvironmentLocked(
                f"{pipeline!r} in {environment!r}: {ahead} deployment(s) are waiting for the "
                "lock before this one; wait with --wait-lock SECONDS",
                dict(_lock_row(holder)) if holder else {},
            )

    def enqueue(self, pipeline: str, environment: str, owner: ProcessRef) -> int:
        now = utcnow()

        def run() -> int:
            with self._tx() as c:
                return int(c.execute(
                    "INSERT INTO lock_queue (pipeline, environment, pid, host, proc_start, since, "
                    "heartbeat_at) VALUES (%s,%s,%s,%s,%s,%s,%s) RETURNING id",
                    (pipeline, environment, owner["pid"], owner["host"], owner["proc_start"], now,
                     now),
                ).fetchone()[0])  # fmt: skip

        return self._retrying("write", run)

    def dequeue(self, ticket: int) -> None:
        self._retrying("write", lambda: self.conn.execute(
            "DELETE FROM lock_queue WHERE id=%s", (ticket,)))  # fmt: skip

    def touch_ticket(self, ticket: int) -> None:
        self._retrying("write", lambda: self.conn.execute(
            "UPDATE lock_queue SET heartbeat_at=%s WHERE id=%s", (utcnow(), ticket)))  # fmt: skip

    def _interrupt(self, c: Any, dep_id: int, why: str) -> None:
        now = utcnow()
        c.execute(
            "UPDATE deployments SET status='interrupted', finished_at=%s, error=%s "
            "WHERE id=%s AND status IN ('running','pending')",
            (now, f"interrupted: {why} before it finished", dep_id),
        )
        for table in ("stages", "steps"):
            c.execute(
                f"UPDATE {table} SET status='interrupted', finished_at=%s "
                "WHERE deployment_id=%s AND status='running'",
                (now, dep_id),
            )
            c.execute(
                f"UPDATE {table} SET status='skipped' WHERE deployment_id=%s AND status='pending'",
                (dep_id,),
            )
        c.execute("DELETE FROM locks WHERE deployment_id=%s", (dep_id,))

    def _fence(self, c: Any, dep_id: int) -> None:
        """Refuse a write of ``dep_id`` once another deployment took its lock (fencing)."""
        held = _HELD.get(dep_id)
        if held is None:
            return
        row = c.execute(
            "SELECT generation FROM locks WHERE deployment_id=%s FOR SHARE", (dep_id,)
        ).fetchone()
        if row is None or row[0] != held.generation:
            held.lost = held.lost or "another process took the lock over"
            raise LockLost(
                f"the lock was lost ({held.lost}); deployment {dep_id} records nothing more"
            )

    def repair(self, is_dead: Liveness) -> list[int]:
        rows = self._query(
            "SELECT d.id, d.pid, d.host, d.proc_start, d.heartbeat_at, l.backend_pid, "
            "l.pipeline, l.environment FROM deployments d LEFT JOIN locks l "
            "ON l.deployment_id = d.id WHERE d.status IN ('running','pending')"
        )
        dead: list[int] = []
        for r in rows:
            if r["backend_pid"] is not None:
                key, _ = self._lock_keys(r["pipeline"], r["environment"])
                backend: int = r["backend_pid"]

                def holds(key: int = key, backend: int = backend) -> bool:
                    return self._session_holds(self.conn, key, backend)

                session_gone = not self._retrying("read", holds)
                if session_gone or is_dead(_ref(r)):
                    dead.append(r["id"])
            elif is_dead(_ref(r)):
                dead.append(r["id"])
        orphans = self._query(
            "SELECT l.deployment_id FROM locks l LEFT JOIN deployments d ON d.id = l.deployment_id "
            "WHERE d.id IS NULL OR d.status NOT IN ('running','pending','awaiting_approval')"
        )
        if dead or orphans:

            def run() -> None:
                with self._tx() as c:
                    for dep_id in dead:
                        for bp in c.execute(
                            "SELECT backend_pid FROM locks WHERE deployment_id=%s", (dep_id,)
                        ).fetchall():
                            self._end_session(c, bp[0])
                        self._interrupt(c, dep_id, "its process died")
                    for lk in orphans:
                        c.execute(
                            "DELETE FROM locks WHERE deployment_id=%s", (lk["deployment_id"],)
                        )

            self._retrying("write", run)
        return dead

    # -- recording --------------------------------------------------------------------------------

    def record_plan(
        self, dep_id: int, stages: Sequence[StagePlan], start_stage: int = 0,
        note: str | None = None,
    ) -> None:  # fmt: skip
        stage_rows = []
        step_rows = []
        for si, st in enumerate(stages):
            before = si < start_stage
            status = Status.SKIPPED.value if before else Status.PENDING.value
            stage_rows.append((dep_id, si, st.name, status, bool(st.parallel),
                               bool(st.continue_on_failure), note if before else None))  # fmt: skip
            for i, step in enumerate(st.steps):
                step_rows.append((dep_id, si, i, step.name, step.kind, step.description, status))

        def run() -> None:
            with self._tx() as c:
                self._fence(c, dep_id)
                with c.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO stages (deployment_id, idx, name, status, parallel, "
                        "continue_on_failure, note) VALUES (%s,%s,%s,%s,%s,%s,%s)",
                        stage_rows,
                    )
                    cur.executemany(
                        "INSERT INTO steps (deployment_id, stage_idx, idx, name, kind, description, "
                        "status, attempts) VALUES (%s,%s,%s,%s,%s,%s,%s,0)",
                        step_rows,
                    )
                c.execute(
                    "UPDATE deployments SET stages_total=%s WHERE id=%s", (len(stages), dep_id)
                )

        self._retrying("write", run)

    def record(
        self, transitions: Sequence[Event], logs: Sequence[LogRecord], *, durable: bool = False
    ) -> None:
        if not transitions and not logs:
            return
        deps = {e.deployment.id for e in transitions} | {ln.deployment_id for ln in logs}

        def run() -> None:
            with self._tx(durable=durable) as c:
                for d in deps:
                    self._fence(c, d)
                self._write(c, transitions, logs)

        self._writing(deps, run)

    def _writing(self, deps: set[int], run: Callable[[], None]) -> None:
        """``run`` a write of ``deps``; when the store cannot be reached and the lock of one of
        them is gone with it, say so: the deployment must stop as having lost its lock."""
        try:
            self._retrying("write", run)
        except LockLost:
            raise
        except HistoryError as exc:
            for d in deps:
                held = _HELD.get(d)
                if held is not None and (lost := held.check()):
                    raise LockLost(
                        f"the lock was lost ({lost}); deployment {d} could not record more: {exc}"
                    ) from None
            raise

    @staticmethod
    def _write(c: Any, transitions: Sequence[Event], logs: Sequence[LogRecord]) -> None:
        # One round trip for the whole batch (pipeline mode), statements in their order.
        with c.pipeline(), c.cursor() as cur:
            if logs:
                cur.executemany(
                    "INSERT INTO logs (deployment_id, stage_idx, step_idx, ts, stream, line) "
                    "VALUES (%s,%s,%s,%s,%s,%s)",
                    [tuple(ln) for ln in logs],
                )
            for e in transitions:
                sql, params = _TRANSITIONS[e.hook](e)
                cur.execute(sql, params)
                if e.hook == "shipyard_stage_started":
                    cur.execute(
                        "UPDATE deployments SET current_stage=%s WHERE id=%s",
                        (params[2], params[1]),
                    )

    def heartbeat(self, dep_id: int) -> str | None:
        held = _HELD.get(dep_id)
        # The lock's own session first: a broken one is known at once, without the network.
        lost = held.check() if held is not None else None
        now = utcnow()

        def run() -> tuple[Any, ...] | None:
            with self._tx(durable=False) as c:
                c.execute("UPDATE deployments SET heartbeat_at=%s WHERE id=%s", (now, dep_id))
                c.execute("UPDATE locks SET heartbeat_at=%s WHERE deployment_id=%s", (now, dep_id))
                return cast(
                    "tuple[Any, ...] | None",
                    c.execute(
                        "SELECT d.cancel_requested, d.status, d.error, l.generation FROM "
                        "deployments d LEFT JOIN locks l ON l.deployment_id = d.id WHERE d.id=%s",
                        (dep_id,),
                    ).fetchone(),
                )

        try:
            row = self._retrying("write", run, seconds=0 if lost else LOCK_GRACE_SECONDS)
        except HistoryError as exc:
            if held is not None:
                held.lost = held.lost or (
                    f"the store could not be reached for {LOCK_GRACE_SECONDS:.0f} s: {exc}"
                )
                return f"shipyard: the lock was lost ({held.lost})"
            raise
        # What the history says first: who interrupted it, and why.
        if row and row[1] == Status.INTERRUPTED.value:
            return row[0] or f"shipyard: the lock was lost ({row[2] or row[1]})"
        if held is not None:
            if row and row[3] != held.generation and row[1] == Status.RUNNING.value:
                held.lost = "another process took the lock over"
            if held.lost:
                return f"shipyard: the lock was lost ({held.lost})"
        return row[0] if row else None

    def request_cancel(self, dep_id: int, *, user: str, reason: str = "") -> DeploymentRow:
        dep = self.get(dep_id)

        def run() -> None:
            with self._tx() as c:
                c.execute(
                    "UPDATE deployments SET cancel_requested=%s WHERE id=%s",
                    (f"{user}: {reason}" if reason else user, dep_id),
                )
                self._audit(c, "cancel", dep, user, reason)

        self._retrying("write", run)
        return dep

    @staticmethod
    def _audit(c: Any, action: str, dep: Mapping[str, Any] | None, user: str, reason: str,
               pipeline: str | None = None, environment: str | None = None) -> None:  # fmt: skip
        from ._secrets import mask

        c.execute(
            'INSERT INTO audit (ts, action, deployment_id, pipeline, environment, "user", host, '
            "reason) VALUES (%s,%s,%s,%s,%s,%s,%s,%s)",
            (
                utcnow(), action, dep["id"] if dep else None,
                dep["pipeline"] if dep else pipeline, dep["environment"] if dep else environment,
                user, socket.gethostname(), mask(reason),
            ),
        )  # fmt: skip

    def record_artifact(
        self, dep_id: int, stage_idx: int, step_idx: int, name: str, content: str
    ) -> None:
        def run() -> None:
            with self._tx() as c:
                self._fence(c, dep_id)
                c.execute(
                    "DELETE FROM artifacts WHERE deployment_id=%s AND stage_idx=%s AND "
                    "step_idx=%s AND name=%s",
                    (dep_id, stage_idx, step_idx, name),
                )
                c.execute(
                    "INSERT INTO artifacts (deployment_id, stage_idx, step_idx, name, content, "
                    "created_at) VALUES (%s,%s,%s,%s,%s,%s)",
                    (dep_id, stage_idx, step_idx, name, content, utcnow()),
                )

        self._writing({dep_id}, run)

    def artifacts(self, dep_id: int) -> list[ArtifactRow]:
        return cast(
            "list[ArtifactRow]",
            self._query(
                "SELECT a.stage_idx, a.step_idx, st.name AS stage, s.name AS step, a.name, "
                "a.content, a.created_at FROM artifacts a "
                "LEFT JOIN stages st ON st.deployment_id = a.deployment_id AND st.idx = a.stage_idx "
                "LEFT JOIN steps s ON s.deployment_id = a.deployment_id "
                "AND s.stage_idx = a.stage_idx AND s.idx = a.step_idx "
                "WHERE a.deployment_id=%s ORDER BY a.id",
                (dep_id,),
            ),
        )

    def record_measurement(
        self, dep_id: int, stage_idx: int, step_idx: int, m: MeasurementRecord
    ) -> None:
        def run() -> None:
            with self._tx() as c:
                self._fence(c, dep_id)
                c.execute(
                    "INSERT INTO measurements (deployment_id, stage_idx, step_idx, metric, n, ts, "
                    "value, outcome, error, dry_run, warnings) "
                    "VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (dep_id, stage_idx, step_idx, m["metric"], m["n"], m["ts"], m["value"],
                     m["outcome"], m["error"], bool(m["dry_run"]), m["warnings"]),
                )  # fmt: skip

        self._writing({dep_id}, run)

    def measurements(self, dep_id: int) -> list[MeasurementRow]:
        return cast(
            "list[MeasurementRow]",
            self._query(
                "SELECT m.stage_idx, m.step_idx, st.name AS stage, s.name AS step, m.metric, "
                "m.n, m.ts, m.value, m.outcome, m.error, m.dry_run, m.warnings "
                "FROM measurements m "
                "LEFT JOIN stages st ON st.deployment_id = m.deployment_id AND st.idx = m.stage_idx "
                "LEFT JOIN steps s ON s.deployment_id = m.deployment_id "
                "AND s.stage_idx = m.stage_idx AND s.idx = m.step_idx "
                "WHERE m.deployment_id=%s ORDER BY m.id",
                (dep_id,),
            ),
        )

    def add_audit(self, action: str, dep_id: int, *, user: str, reason: str) -> None:
        dep = self.get(dep_id)

        def run() -> None:
            with self._tx() as c:
                self._audit(c, action, dep, user, reason)

        self._retrying("write", run)

    def unlock(self, pipeline: str, environment: str, *, user: str, reason: str) -> LockRow | None:
        def run() -> dict[str, Any] | None:
            with self._tx() as c:
                holder = self._holder(c, pipeline, environment)
                if holder:
                    self._end_session(c, holder["backend_pid"])
                    self._interrupt(c, holder["deployment_id"], f"unlocked by {user} ({reason})")
                dep = {"id": holder["deployment_id"], "pipeline": pipeline,
                       "environment": environment} if holder else None  # fmt: skip
                self._audit(c, "unlock", dep, user, reason, pipeline, environment)
                return holder

        holder = self._retrying("write", run)
        return _lock_row(holder) if holder else None

    def finish(
        self, dep_id: int, status: Status, error: str | None,
        transitions: Sequence[Event] = (), logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        held = _HELD.get(dep_id)
        if held is not None and held.check():
            # Stopped because its lock was lost: that is what it was, not a cancel.
            status = Status.INTERRUPTED
            error = f"interrupted: the lock was lost ({held.lost}) before it finished"
        now = utcnow()

        def run() -> None:
            with self._tx() as c:
                try:
                    self._fence(c, dep_id)
                    fenced = False
                except LockLost:
                    fenced = True
                if fenced:
                    raise _Fenced
                self._write(c, transitions, logs)
                for table in ("stages", "steps"):
                    c.execute(
                        f"UPDATE {table} SET status='skipped' WHERE deployment_id=%s "
                        "AND status='pending'",
                        (dep_id,),
                    )
                    c.execute(
                        f"UPDATE {table} SET status=%s, finished_at=%s "
                        "WHERE deployment_id=%s AND status='running'",
                        (status.value, now, dep_id),
                    )
                c.execute(
                    "UPDATE deployments SET status=%s, finished_at=%s, error=%s "
                    "WHERE id=%s AND status IN ('running','pending')",
                    (status.value, now, error, dep_id),
                )
                c.execute("DELETE FROM locks WHERE deployment_id=%s", (dep_id,))

        try:
            self._retrying("write", run, seconds=WRITE_RETRY_SECONDS * 3)
        except _Fenced:
            pass  # another process took the lock over and recorded this one as interrupted
        finally:
            if held is not None:
                _HELD.pop(dep_id, None)
                self._mine.discard(dep_id)
                held.release()

    # -- approval gates ---------------------------------------------------------------------------

    def suspend(
        self, dep_id: int, gate: GateRecord, transitions: Sequence[Event] = (),
        logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        si = gate["stage_idx"]

        def run() -> None:
            with self._tx() as c:
                self._fence(c, dep_id)
                self._write(c, transitions, logs)
                c.execute(
                    "INSERT INTO gates (deployment_id, stage_idx, stage, requested_at, expires_at, "
                    "spec, fingerprint, context, status) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s) "
                    "ON CONFLICT (deployment_id, stage_idx) DO UPDATE SET status='waiting', "
                    "requested_at=excluded.requested_at, expires_at=excluded.expires_at",
                    (dep_id, si, gate["stage"], gate["requested_at"], gate["expires_at"],
                     json.dumps(gate["spec"]), json.dumps(gate["fingerprint"]),
                     json.dumps(gate["context"]), "waiting"),
                )  # fmt: skip
                c.execute(
                    "UPDATE deployments SET status='awaiting_approval', current_stage=%s, "
                    "pid=NULL, proc_start=NULL WHERE id=%s AND status='running'",
                    (si, dep_id),
                )
                for table, key in (("stages", "idx"), ("steps", "stage_idx")):
                    # As in SQLiteStore.suspend: the gate's stage and its steps not done.
                    c.execute(
                        f"UPDATE {table} SET status='waiting', started_at=coalesce(started_at, "
                        f"%s) WHERE deployment_id=%s AND {key}=%s AND status IN ('pending', "
                        "'running', 'waiting')",
                        (gate["requested_at"], dep_id, si),
                    )
                if gate["spec"].get("lock") == "release":
                    c.execute("DELETE FROM locks WHERE deployment_id=%s", (dep_id,))
                else:  # held by the gate: no session stands behind it
                    c.execute(
                        "UPDATE locks SET pid=NULL, proc_start=NULL, backend_pid=NULL, "
                        "heartbeat_at=%s WHERE deployment_id=%s",
                        (gate["requested_at"], dep_id),
                    )

        self._writing({dep_id}, run)
        held = _HELD.pop(dep_id, None)
        self._mine.discard(dep_id)
        if held is not None:
            held.release()

    def gate(self, dep_id: int) -> GateRow | None:
        rows = self._query(
            "SELECT stage_idx, stage, requested_at, expires_at, spec, fingerprint, context, "
            "status, decided_at FROM gates WHERE deployment_id=%s ORDER BY stage_idx DESC LIMIT 1",
            (dep_id,),
        )
        if not rows:
            return None
        g = rows[0]
        for key in ("spec", "fingerprint", "context"):
            g[key] = json.loads(g[key]) if g[key] else None
        g["decisions"] = self._query(
            "SELECT * FROM approvals WHERE deployment_id=%s AND stage_idx=%s ORDER BY id",
            (dep_id, g["stage_idx"]),
        )
        return cast("GateRow", g)

    def decide(
        self, dep_id: int, decision: str, *, user: str, comment: str = "",
        choice: str | None = None, source: str | None = None, owner: ProcessRef | None = None,
        is_dead: Liveness | None = None,
    ) -> Decision:  # fmt: skip
        pg = self._psycopg
        lc: Any = None
        try:
            with self._guard:
                if self.conn.broken or self.conn.closed:
                    self._reconnect()
                result, lc, key, generation = self._decide(
                    dep_id, decision, user=user, comment=comment, choice=choice, source=source,
                    owner=owner, is_dead=is_dead,
                )  # fmt: skip
        except pg.Error as exc:
            raise HistoryError(
                f"cannot record the decision in the history store {self.url}: {_one_line(exc)}"
            ) from None
        if lc is not None:
            _HELD[dep_id] = _Held(lc, key, generation)
            self._mine.add(dep_id)
        return result

    def _decide(self, dep_id: int, decision: str, *, user: str, comment: str,
                choice: str | None, source: str | None, owner: ProcessRef | None,
                is_dead: Liveness | None) -> tuple[Decision, Any, int, int]:  # fmt: skip
        from ._identity import runner_identity
        from ._store import decided_message

        now = utcnow()
        lc: Any = None
        try:
            with self._tx() as c:
                dep = c.execute(
                    'SELECT status, pipeline, environment, version, "user" FROM deployments '
                    "WHERE id=%s FOR UPDATE",
                    (dep_id,),
                ).fetchone()
                gate = c.execute(
                    "SELECT stage_idx, spec FROM gates WHERE deployment_id=%s AND "
                    "status='waiting' ORDER BY stage_idx DESC LIMIT 1",
                    (dep_id,),
                ).fetchone()
                if dep is None or dep[0] != Status.AWAITING_APPROVAL.value or gate is None:
                    last = c.execute(
                        'SELECT decision, "user", ts FROM approvals WHERE deployment_id=%s '
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
                    'INSERT INTO approvals (deployment_id, stage_idx, decision, "user", source, '
                    "comment, choice, host, ci_run, ts) VALUES (%s,%s,%s,%s,%s,%s,%s,%s,%s,%s)",
                    (dep_id, si, decision, user, source, comment or None, choice,
                     socket.gethostname(), runner_identity(), now),
                )  # fmt: skip
                approvals = 0
                if decision == "approve" and decision_kind == "approve":
                    approvals = c.execute(
                        'SELECT count(DISTINCT "user") FROM approvals WHERE deployment_id=%s '
                        "AND stage_idx=%s AND decision='approve'",
                        (dep_id, si),
                    ).fetchone()[0]
                    if approvals < required:
                        return Decision("recorded", approvals, required), None, 0, 0
                if decision in ("cancel", "supersede"):
                    c.execute("UPDATE gates SET status=%s, decided_at=%s WHERE deployment_id=%s "
                              "AND stage_idx=%s", ("cancelled" if decision == "cancel"
                                                   else "superseded", now, dep_id, si))  # fmt: skip
                    ended = "cancelled" if decision == "cancel" else "superseded"
                    c.execute(
                        "UPDATE deployments SET status=%s, finished_at=%s, error=%s WHERE id=%s",
                        (ended, now, f"{ended} by {user} while awaiting approval"
                         + (f": {comment}" if comment else ""), dep_id),
                    )  # fmt: skip
                    for table, k in (("stages", "idx"), ("steps", "stage_idx")):
                        c.execute(f"UPDATE {table} SET status='cancelled', finished_at=%s "
                                  f"WHERE deployment_id=%s AND {k}=%s AND status='waiting'",
                                  (now, dep_id, si))  # fmt: skip
                        c.execute(f"UPDATE {table} SET status='skipped' WHERE deployment_id=%s "
                                  "AND status='pending'", (dep_id,))  # fmt: skip
                    c.execute("DELETE FROM locks WHERE deployment_id=%s", (dep_id,))
                    return Decision("cancelled", 0, 1), None, 0, 0
                assert owner is not None, "approve and reject need the process that goes on"
                approved = decision_kind == "approve"
                step_status = Status.SUCCEEDED.value if approved else Status.FAILED.value
                c.execute("UPDATE gates SET status=%s, decided_at=%s WHERE deployment_id=%s AND "
                          "stage_idx=%s", ("expired" if decision == "expire" else "approved" if approved
                                           else "rejected", now, dep_id, si))  # fmt: skip
                if not approved:  # after what the step said, if it said something
                    why = f"rejected by {user}" + (f": {comment}" if comment else "")
                    c.execute(
                        "UPDATE steps SET error=CASE WHEN error IS NULL THEN %s ELSE error || "
                        "'; ' || %s END WHERE deployment_id=%s AND stage_idx=%s AND "
                        "status='waiting'",
                        (why, why, dep_id, si),
                    )
                for table, k in (("stages", "idx"), ("steps", "stage_idx")):
                    c.execute(f"UPDATE {table} SET status=%s, finished_at=%s WHERE "
                              f"deployment_id=%s AND {k}=%s AND status='waiting'",
                              (step_status, now, dep_id, si))  # fmt: skip
                c.execute(
                    "UPDATE deployments SET status='running', pid=%s, host=%s, proc_start=%s, "
                    "heartbeat_at=%s WHERE id=%s",
                    (owner["pid"], owner["host"], owner["proc_start"], now, dep_id),
                )
                if not approved:  # its finish (by this caller) frees whatever lock it has
                    return Decision("rejected", 0, 1), None, 0, 0
                pipeline, environment, version, dep_user = dep[1], dep[2], dep[3], dep[4]
                key, serial = self._lock_keys(pipeline, environment)
                c.execute("SELECT pg_advisory_xact_lock(%s)", (serial,))
                held = self._holder(c, pipeline, environment)
                lc = self._lock_session()
                if held is not None and held["deployment_id"] == dep_id:
                    if not self._try_lock(lc, key):
                        raise EnvironmentLocked(
                            f"{pipeline!r} in {environment!r}: the lock of deployment {dep_id} "
                            "is held by another session of the store; try again", {},
                        )  # fmt: skip
                    generation = c.execute("SELECT nextval('lock_generation')").fetchone()[0]
                    backend = lc.execute("SELECT pg_backend_pid()").fetchone()[0]
                    c.execute(
                        "UPDATE locks SET pid=%s, host=%s, proc_start=%s, heartbeat_at=%s, "
                        "backend_pid=%s, generation=%s, runner=%s WHERE deployment_id=%s",
                        (owner["pid"], owner["host"], owner["proc_start"], now, backend,
                         generation, runner_identity(), dep_id),
                    )  # fmt: skip
                else:  # the gate released it: take it again, as a new deployment would
                    self._acquire(c, lc, key, pipeline, environment,
                                  is_dead or (lambda ref: False), [])  # fmt: skip
                    generation = self._insert_lock(c, lc, pipeline, environment, dep_id, owner,
                                                   dep_user, version, now)  # fmt: skip
                return Decision("resume", approvals, required), lc, key, int(generation)
        except BaseException:
            if lc is not None:
                _Held(lc, 0, 0).release()
            raise

    def bulk(self) -> _PostgresBulk:
        """Whole-table access for ``shipyard store copy``; not part of the store port."""
        return _PostgresBulk(self)

    # -- queries ----------------------------------------------------------------------------------

    def get(self, dep_id: int) -> DeploymentRow:
        rows = self._query(f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments WHERE id=%s", (dep_id,))
        if not rows:
            last = self._query("SELECT max(id) AS m FROM deployments")[0]["m"]
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
        where: list[str] = []
        params: list[Any] = []
        if pipeline:
            where.append("pipeline=%s")
            params.append(pipeline)
        if environment:
            where.append("environment=%s")
            params.append(environment)
        if statuses:
            where.append("status = ANY(%s)")
            params.append(list(statuses))
        sql = f"SELECT {_DEPLOYMENT_COLUMNS} FROM deployments"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_at DESC NULLS LAST, id DESC LIMIT %s"
        params.append(limit)
        return [_decode(r) for r in self._query(sql, params)]

    def stages(self, dep_id: int) -> list[StageRow]:
        stages = self._query(
            "SELECT idx, name, status, parallel, continue_on_failure, started_at, finished_at, "
            "note FROM stages WHERE deployment_id=%s ORDER BY idx",
            (dep_id,),
        )
        steps = self._query(
            "SELECT stage_idx, idx, name, kind, description, status, attempts, exit_code, error, "
            "warning, started_at, finished_at FROM steps WHERE deployment_id=%s "
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
        return cast("list[LogRow]", self._query(
            "SELECT l.id, l.stage_idx, l.step_idx, l.ts, l.stream, l.line, s.name AS step "
            "FROM logs l LEFT JOIN steps s ON s.deployment_id = l.deployment_id "
            "AND s.stage_idx = l.stage_idx AND s.idx = l.step_idx "
            "WHERE l.deployment_id=%s AND l.id>%s ORDER BY l.id LIMIT %s",
            (dep_id, after, limit),
        ))  # fmt: skip

    def audit_trail(self, *, deployment_id: int | None = None, limit: int = 50) -> list[AuditRow]:
        if deployment_id is None:
            return cast("list[AuditRow]", self._query(
                "SELECT * FROM audit ORDER BY id DESC LIMIT %s", (limit,)))  # fmt: skip
        return cast("list[AuditRow]", self._query(
            "SELECT * FROM audit WHERE deployment_id=%s ORDER BY id DESC LIMIT %s",
            (deployment_id, limit),
        ))  # fmt: skip

    def locks(self) -> list[LockRow]:
        return [
            _lock_row(r) for r in self._query("SELECT * FROM locks ORDER BY pipeline, environment")
        ]

    def previous_version(self, pipeline: str, environment: str) -> str | None:
        rows = self._query(
            "SELECT version FROM deployments WHERE pipeline=%s AND environment=%s "
            "AND status='succeeded' ORDER BY started_at DESC LIMIT 1",
            (pipeline, environment),
        )
        return rows[0]["version"] if rows else None

    def rollback_target(self, dep_id: int) -> DeploymentRow:
        x = self.get(dep_id)
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
            "WHERE d.pipeline=%s AND d.environment=%s AND d.status='succeeded' AND d.started_at<%s "
            "AND d.version <> ALL(%s) "
            "AND NOT EXISTS (SELECT 1 FROM deployments r WHERE r.rollback_of=d.id) "
            "ORDER BY d.started_at DESC, d.id DESC LIMIT 1",
            (x["pipeline"], x["environment"], x["started_at"], versions),
        )
        if not rows:
            other = " or ".join(repr(v) for v in dict.fromkeys(versions))
            listed = self._query(
                "SELECT d.id, d.version, d.status, EXISTS (SELECT 1 FROM deployments r "
                "WHERE r.rollback_of=d.id) AS rolled_back FROM deployments d "
                "WHERE d.pipeline=%s AND d.environment=%s AND d.started_at<%s "
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
                    "SELECT DISTINCT environment FROM deployments WHERE pipeline=%s "
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
        """One grouped scan of the deployments; a duration is ``finished_at - started_at``."""
        bounds = [float(b) for b in buckets]
        le = "".join(
            f", count(CASE WHEN dur <= %s THEN 1 END) AS le{i}" for i in range(len(bounds))
        )
        rows = self._query(
            "SELECT pipeline, environment, status, count(*) AS count, count(dur) AS timed, "
            f"coalesce(sum(dur), 0)::float8 AS seconds{le} FROM (SELECT pipeline, environment, "
            "status, extract(epoch FROM finished_at::timestamptz - started_at::timestamptz)"
            "::float8 AS dur FROM deployments) AS d GROUP BY pipeline, environment, status "
            "ORDER BY pipeline, environment, status",
            bounds,
        )
        for r in rows:
            r["le"] = [r.pop(f"le{i}") for i in range(len(bounds))]
        return cast("list[DeploymentCountRow]", rows)

    def change_token(self) -> object | None:
        """The server's snapshot, ``pg_current_snapshot()``: it moves when any transaction on
        the server takes a transaction id (its first write) and when one ends, so the commit of
        a write is seen exactly when its rows become visible to the next query. Reads never
        move it (unlike ``pg_current_wal_lsn()``, which hint bits and page pruning of our own
        reads, checkpoints and background records move, which runs ahead of a commit's
        visibility, and which a standby cannot answer). Server-wide: writes to other
        databases move it too (a reader then re-reads for nothing)."""
        token: object = self._retrying(
            "read", lambda: self.conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        )
        return token

    def stats_rows(
        self, *, pipeline: str | None = None, environment: str | None = None,
        since: str | None = None, commits: bool = True,
    ) -> _StatsRows:  # fmt: skip
        """The same queries as :meth:`SQLiteStore.stats_rows`, in PostgreSQL's dialect."""
        from ._stats import failures_sql
        from ._stats import window_sql

        w, params = window_sql(pipeline, environment, since, placeholder="%s")
        counts = self._query(
            "SELECT count(*) FILTER (WHERE rollback_of IS NULL AND status IN ('succeeded', "
            "'failed')) AS changes, "
            "count(*) FILTER (WHERE rollback_of IS NULL AND status = 'failed') AS failed, "
            "count(rollback_of) AS rollbacks, "
            "count(*) FILTER (WHERE rollback_of IS NULL AND status = 'succeeded') AS succeeded, "
            "count(DISTINCT substr(started_at, 1, 10)) FILTER (WHERE rollback_of IS NULL AND "
            "status = 'succeeded') AS days, "
            f"min(started_at) AS first_at, max(started_at) AS last_at FROM deployments d WHERE {w}",
            params,
        )[0]
        # The rolled-back count (kind 0) and one row per restore (kind 1), in one statement.
        rows = self._query(
            failures_sql(w) + "SELECT 0 AS kind, NULL::bigint AS sid, count(*) AS n, "
            "NULL::float8 AS seconds FROM deployments d WHERE d.id IN (SELECT id FROM hit) "
            f"AND d.rollback_of IS NULL AND d.status = 'succeeded' AND {w} "
            "UNION ALL SELECT 1, g.sid, count(*), extract(epoch FROM "
            "max(s.finished_at)::timestamptz - min(g.at)::timestamptz)::float8 FROM g "
            "LEFT JOIN deployments s ON s.id = g.sid GROUP BY g.sid",
            params * 4,
        )
        rolled_back = next(r["n"] for r in rows if r["kind"] == 0)
        outages = [r for r in rows if r["kind"] == 1]
        found: list[CommitRow] = []
        if commits:
            found = cast("list[CommitRow]", self._query(
                "SELECT pipeline, environment, git_commit, "
                "min(coalesce(finished_at, started_at)) AS deployed_at, count(*) AS deployments "
                "FROM deployments d WHERE d.status = 'succeeded' AND d.rollback_of IS NULL "
                f"AND d.git_commit IS NOT NULL AND {w} GROUP BY pipeline, environment, git_commit",
                params,
            ))  # fmt: skip
        return {
            **counts,  # type: ignore[typeddict-item]
            "rolled_back": rolled_back,
            "restores": [max(0.0, o["seconds"]) for o in outages if o["sid"] is not None],
            "unrestored": sum(o["n"] for o in outages if o["sid"] is None),
            "commits": found,
        }


if TYPE_CHECKING:  # the row types of stats_rows (issue #19)
    from ._store import CommitRow
    from ._store import StatsRows as _StatsRows


_POOLER = (
    "history {url}: this URL goes through a transaction-mode pooler (two connections reported "
    "one server process, or a session lock did not stay with its connection); Shipyard's locks "
    "are session advisory locks, which cannot work there. Point the URL at the server itself, "
    "or at a session-mode pool"
)


class _Fenced(Exception):
    """finish() of a deployment whose lock another process took over."""


def _is_connection_error(exc: HistoryError) -> bool:
    return str(exc).startswith("cannot connect")


_LOCK_KEYS = ("pipeline", "environment", "deployment_id", "pid", "host", "proc_start", "user",
              "version", "acquired_at", "heartbeat_at", "runner")  # fmt: skip


def _lock_row(h: Mapping[str, Any]) -> LockRow:
    return cast("LockRow", {k: h.get(k) for k in _LOCK_KEYS})


def _placeholders(
    transition: Callable[[Any], tuple[str, tuple[Any, ...]]],
) -> Callable[[Any], tuple[str, tuple[Any, ...]]]:
    """The SQLite store's statement for a transition, with PostgreSQL's placeholders."""

    def pg(e: Any) -> tuple[str, tuple[Any, ...]]:
        sql, params = transition(e)
        return sql.replace("?", "%s"), params

    return pg


#: The SQL of each transition the runner reports (the SQLite store's, same tables and columns).
_TRANSITIONS: dict[str, Callable[[Any], tuple[str, tuple[Any, ...]]]] = {
    hook: _placeholders(fn) for hook, fn in _SQLITE_TRANSITIONS.items()
}


class _PostgresBulk:
    """Whole-table reads and writes for ``shipyard store copy`` (:mod:`shipyard._storeops`)."""

    _ORDER = {"stages": "deployment_id, idx", "steps": "deployment_id, stage_idx, idx",
              "gates": "deployment_id, stage_idx"}  # fmt: skip

    def __init__(self, store: PostgresStore) -> None:
        self.store = store

    @contextmanager
    def transaction(self) -> Iterator[None]:
        with self.store._guard, self.store.conn.transaction():
            yield

    def read(self, table: str, dep_ids: Sequence[int] | None = None) -> list[dict[str, Any]]:
        sql = f"SELECT * FROM {table}"
        params: list[Any] = []
        if dep_ids is not None:
            key = "id" if table == "deployments" else "deployment_id"
            sql += f" WHERE {key} = ANY(%s)"
            params = [list(dep_ids)]
        sql += f" ORDER BY {self._ORDER.get(table, 'id')}"
        rows = self.store._query(sql, params)
        if table == "locks":
            for r in rows:
                r.pop("backend_pid", None)
                r.pop("generation", None)
        return rows

    @staticmethod
    def _cols(cols: Sequence[str]) -> str:
        return ", ".join(f'"{c}"' for c in cols)

    def write(self, table: str, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        cols = [c for c in rows[0] if not (c == "id" and table != "deployments")]
        booleans = {"parallel", "continue_on_failure", "warning"}
        data = [
            tuple(bool(r[c]) if c in booleans and r[c] is not None else r[c] for c in cols)
            for r in rows
        ]
        with self.store.conn.cursor() as cur:
            cur.executemany(
                f"INSERT INTO {table} ({self._cols(cols)}) VALUES ({', '.join(['%s'] * len(cols))})",
                data,
            )

    def insert_deployment(self, row: Mapping[str, Any], keep_id: bool) -> int:
        cols = [c for c in row if keep_id or c != "id"]
        return int(self.store.conn.execute(
            f"INSERT INTO deployments ({self._cols(cols)}) VALUES ({', '.join(['%s'] * len(cols))}) "
            "RETURNING id",
            tuple(row[c] for c in cols),
        ).fetchone()[0])  # fmt: skip

    def done(self) -> None:
        """Ids given explicitly do not move the identity sequences: set them past the largest."""
        for table in ("deployments", "logs", "audit", "artifacts", "approvals", "measurements"):
            self.store.conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                f"coalesce((SELECT max(id) FROM {table}), 0) + 1, false)"
            )
