"""The dashboard's web application: Starlette on uvicorn, over one read-only store connection.

Imported only by ``shipyard serve`` (it imports Starlette and uvicorn).

- Reading: one connection to the store, used by one thread at a time (``Reader``); each query
  is its own short read transaction, so a long-lived page never holds a snapshot that would
  keep a WAL checkpoint from completing. The store is opened without ``repair``: the dashboard
  never writes it, not even to mark a dead deployment ``interrupted`` (any command does that).
- Polling: one task asks the store for its change token every ``POLL`` seconds (the port's
  ``change_token()``: SQLite's ``PRAGMA data_version``, PostgreSQL's current snapshot; no table
  is read); only when it moved do the pages' streams and the overview query again. A store
  that cannot tell (None) is re-read every ``FALLBACK_POLL`` seconds.
- Live logs: Server-Sent Events whose ``id`` is the log row's id, so a browser reconnecting
  with ``Last-Event-ID`` gets exactly the lines after the last one it saw.
- Actions: each runs the ``shipyard`` command line on this host (no shell), as the token's
  user (``SHIPYARD_USER``) with ``SHIPYARD_SOURCE=web``: one code path, one audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import TypeVar

import click
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.responses import JSONResponse
from starlette.responses import PlainTextResponse
from starlette.responses import Response
from starlette.responses import StreamingResponse
from starlette.routing import Route

T = TypeVar("T")

#: Seconds between two looks at the store's change token while it changes (a deployment runs:
#: its heartbeat alone commits every second) ...
POLL = 0.1
#: ... and once it has been still for ``QUIET_AFTER`` seconds: every look wakes the process, which
#: is most of what an idle dashboard costs; a new deployment's first commits are seen within it.
IDLE_POLL = 0.25
QUIET_AFTER = 3.0
#: Seconds between two reads of a store that has no change counter.
FALLBACK_POLL = 0.2
#: Seconds without an event after which a stream sends a comment (proxies close idle streams).
KEEPALIVE = 15.0
#: Milliseconds a browser waits before reconnecting a cut stream (the SSE ``retry`` field).
RETRY_MS = 300
#: How long an action's command may take before the answer says it runs in the background.
ACTION_WAIT = 5.0
#: The most recent deployments whose pipelines and environments the overview always shows.
RECENT = 1000
#: A deployment in one of these statuses is over: its log will not grow.
FINISHED = frozenset({"succeeded", "failed", "cancelled", "interrupted", "superseded"})
ACTIVE = ("pending", "running", "awaiting_approval")
#: The keys of one deployment in ``history --json`` (DESIGN §3); a test pins the equality.
HISTORY_KEYS = ("id", "pipeline", "version", "environment", "status", "started_at", "finished_at",
                "rollback_of", "retry_of", "error", "user", "host")  # fmt: skip
STATUSES = ("pending", "running", "awaiting_approval", "succeeded", "failed", "cancelled",
            "interrupted", "superseded")  # fmt: skip
#: The upper bounds (seconds) of ``/metrics``' histogram of deployment durations.
DURATION_BUCKETS = (1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400)
#: The counts of ``/metrics`` scan the whole history: while it keeps changing they are counted
#: again at most every ``COUNT_SPACING`` times as long as the last count took (at most every
#: ``COUNT_MAX_AGE`` seconds): a scan of 1,000,000 deployments takes seconds.
COUNT_SPACING = 10.0
COUNT_MAX_AGE = 60.0
STATIC = Path(__file__).parent / "static"
COOKIE = "shipyard_session"
PAGE_SIZE = 50


@dataclass
class Options:
    """The ``shipyard`` group's options the dashboard was started with."""

    file: str | None = None
    history: str | None = None
    plugins: list[str] = field(default_factory=list)


def history_doc(row: Any) -> dict[str, Any]:
    """One deployment as ``history --json`` prints it."""
    return {k: row.get(k) for k in HISTORY_KEYS}


# -- reading the store -----------------------------------------------------------------------------


class Reader:
    """The store, read through the same application layer as ``show --json`` and ``history
    --json``; one call at a time (the store port allows several threads, one call at a time)."""

    def __init__(self, options: Options) -> None:
        import shipyard

        self.manager = shipyard.DeploymentManager(
            pipelines=options.file, history=options.history, plugins=options.plugins
        )
        self.config = self.manager.config
        self.url: str = self.config.history
        self.lock = threading.Lock()
        self._store: Any = None
        #: A second connection for the scans of ``/metrics`` (the whole history at each change),
        #: so that one never holds up the live streams' reads.
        self.scan_lock = threading.Lock()
        self._scan_store: Any = None
        reader = self
        base: Any = type(self.manager.service)

        class ReadOnlyService(base):  # type: ignore[misc]  # the façade's service
            """The service of ``show --json``, over this reader's store (opened without
            ``repair``, so that reading never writes)."""

            def store(self, *, create: bool = False) -> Any:
                return reader.store()

        self.service = ReadOnlyService(self.manager.session)
        self.known_pairs: dict[tuple[str, str], None] = dict.fromkeys(self._declared_pairs())

    def _declared_pairs(self) -> list[tuple[str, str]]:
        """Pipeline and environment pairs the pipelines file declares (if it loads)."""
        from shipyard import ShipyardError

        try:
            pipelines = self.manager.session.load(require_file=False)
        except ShipyardError as exc:
            click.echo(
                f"shipyard serve: warning: the pipelines file is not loaded: {exc}", err=True
            )
            return []
        return [(p.name, env) for p in pipelines.values() for env in (p.environments or [])]

    def store(self) -> Any:
        """The open store; :class:`shipyard.sdk.StoreNotFound` while nothing was recorded."""
        if self._store is None:
            self._store = self.manager.session.open_store(create=False, repair=False)
        return self._store

    def call(self, fn: Callable[[], T]) -> T:
        with self.lock:
            return fn()

    def close(self) -> None:
        with self.lock:
            if self._store is not None:
                self._store.close()
                self._store = None
        with self.scan_lock:
            if self._scan_store is not None:
                self._scan_store.close()
                self._scan_store = None

    def counts(self) -> dict[str, Any]:
        """Every deployment counted by pipeline, environment and status, with the durations of
        the finished ones (the store's one grouped query), on the scan connection; ``at``: when
        (Unix time)."""
        from shipyard.sdk import StoreNotFound

        with self.scan_lock:
            at = time.time()
            if self._scan_store is None:
                try:
                    self._scan_store = self.manager.session.open_store(create=False, repair=False)
                except StoreNotFound:
                    return {"at": at, "rows": []}
            rows = self._scan_store.deployment_counts(buckets=DURATION_BUCKETS)
            return {"at": at, "rows": [dict(r) for r in rows]}

    # -- what the pages ask (each called under the lock) ------------------------------------------

    def change_token(self) -> Any:
        """What changes whenever the store does; None when the store cannot say."""
        from shipyard.sdk import StoreNotFound

        try:
            store = self.store()
        except StoreNotFound:
            return ("absent",)
        return store.change_token()

    def overview(self) -> dict[str, Any]:
        """The matrix: per pipeline and environment, the current version (latest succeeded),
        the last attempt, and what runs or waits there now."""
        from shipyard.sdk import StoreNotFound

        try:
            store = self.store()
        except StoreNotFound:
            return {"pipelines": [], "environments": [], "cells": []}
        for d in store.deployments(limit=RECENT):
            self.known_pairs.setdefault((d["pipeline"], d["environment"]), None)
        active = store.deployments(statuses=ACTIVE, limit=500)
        for d in active:
            self.known_pairs.setdefault((d["pipeline"], d["environment"]), None)
        cells = []
        for pipeline, environment in self.known_pairs:
            last = store.deployments(pipeline=pipeline, environment=environment, limit=1)
            current = store.deployments(
                pipeline=pipeline, environment=environment, statuses=("succeeded",), limit=1
            )
            here = []
            for d in active:
                if (d["pipeline"], d["environment"]) != (pipeline, environment):
                    continue
                item = history_doc(d)
                if d["status"] == "awaiting_approval":
                    gate = store.gate(d["id"])
                    item["expires_at"] = gate["expires_at"] if gate else None
                    item["gate"] = gate["stage"] if gate else None
                here.append(item)
            cells.append({
                "pipeline": pipeline, "environment": environment,
                "current": history_doc(current[0]) if current else None,
                "last": history_doc(last[0]) if last else None,
                "active": here,
            })  # fmt: skip
        pipelines = list(dict.fromkeys(c["pipeline"] for c in cells))
        environments = list(dict.fromkeys(c["environment"] for c in cells))
        return {"pipelines": pipelines, "environments": environments, "cells": cells}

    def history(
        self, *, pipeline: str | None, environment: str | None, statuses: tuple[str, ...],
        page: int, size: int,
    ) -> dict[str, Any]:  # fmt: skip
        rows = self.service.history(
            pipeline=pipeline, environment=environment, statuses=statuses,
            limit=(page + 1) * size + 1,
        )  # fmt: skip
        chunk = rows[page * size : (page + 1) * size]
        return {
            "deployments": [history_doc(r) for r in chunk],
            "page": page, "more": len(rows) > (page + 1) * size,
        }  # fmt: skip

    def document(self, dep_id: int) -> dict[str, Any]:
        """``show ID --json``."""
        doc: dict[str, Any] = self.service.document(dep_id)
        return doc

    def audit(self, dep_id: int) -> list[dict[str, Any]]:
        return [dict(a) for a in self.store().audit_trail(deployment_id=dep_id)]

    def status(self, dep_id: int) -> str:
        return str(self.store().get(dep_id)["status"])

    def logs(self, dep_id: int, after: int, limit: int = 1000) -> list[dict[str, Any]]:
        return [dict(r) for r in self.store().logs(dep_id, after=after, limit=limit)]


# -- the change signal -----------------------------------------------------------------------------


class Hub:
    """Wakes every waiting stream when the store changed; says when the server stops."""

    def __init__(self, reader: Reader) -> None:
        self.reader = reader
        self.version = 0
        self.changed = asyncio.Event()
        self.stopping = asyncio.Event()
        #: key -> (version read at, value, when read, seconds it took)
        self._cache: dict[str, tuple[int, Any, float, float]] = {}

    async def read(self, fn: Callable[[], T]) -> T:
        return await asyncio.to_thread(self.reader.call, fn)

    def bump(self) -> None:
        self.version += 1
        old, self.changed = self.changed, asyncio.Event()
        old.set()

    async def poll(self) -> None:
        """Look at the store's change token (the port promises it moves with every committed
        write, so the rows are visible once it did) and wake the streams when it moved."""
        last: Any = object()
        fallback_at = 0.0
        changed_at = time.monotonic()
        while not self.stopping.is_set():
            try:
                token = await self.read(self.reader.change_token)
            except Exception as exc:  # a store gone away: keep serving, say it once a tick
                token = ("error", str(exc))
            now = time.monotonic()
            if token is None:
                changed_at = now
                if now >= fallback_at:
                    fallback_at = now + FALLBACK_POLL
                    self.bump()
            elif token != last:
                last = token
                changed_at = now
                self.bump()
            # A plain sleep (no task, no timer beside it): the lifespan cancels it at the end.
            await asyncio.sleep(POLL if now - changed_at < QUIET_AFTER else IDLE_POLL)

    async def wait(self, version: int, timeout: float) -> bool:
        """Wait until the store changed after ``version`` (True) or the server stops or the
        timeout passes (False)."""
        if self.version != version:
            return True
        changed = asyncio.ensure_future(self.changed.wait())
        stopping = asyncio.ensure_future(self.stopping.wait())
        try:
            await asyncio.wait({changed, stopping}, timeout=timeout,
                               return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        finally:
            changed.cancel()
            stopping.cancel()
        return self.version != version and not self.stopping.is_set()

    async def cached(
        self, key: str, fn: Callable[[], T], *, own_lock: bool = False, spacing: float = 0.0
    ) -> T:
        """``fn()``'s result, read again only when the store changed since (and, with
        ``spacing``, once ``spacing`` times as long as the last read took has passed, at most
        ``COUNT_MAX_AGE``). ``own_lock``: ``fn`` takes a lock of its own (not the reader's)."""
        hit = self._cache.get(key)
        version = self.version
        if hit is not None and (
            hit[0] == version or time.monotonic() - hit[2] < min(COUNT_MAX_AGE, spacing * hit[3])
        ):
            return hit[1]  # type: ignore[no-any-return]
        t0 = time.monotonic()
        value = await (asyncio.to_thread(fn) if own_lock else self.read(fn))
        self._cache[key] = (version, value, t0, time.monotonic() - t0)
        return value


# -- security --------------------------------------------------------------------------------------


@dataclass
class Guard:
    """Who may act: tokens, the sessions they were exchanged for, the Host and Origin allowed."""

    allow_actions: bool
    tokens: dict[str, str]
    hosts: set[str] = field(default_factory=set)
    sessions: dict[str, str] = field(default_factory=dict)

    def origins(self) -> set[str]:
        return {f"http://{h}" for h in self.hosts}

    def user_of(self, request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        if auth.lower().startswith("bearer "):
            return self.user_of_token(auth[7:].strip())
        cookie = request.cookies.get(COOKIE)
        return self.sessions.get(cookie) if cookie else None

    def user_of_token(self, token: str) -> str | None:
        for known, user in self.tokens.items():
            if secrets.compare_digest(known.encode(), token.encode()):
                return user
        return None

    def refuse(self, request: Request, *, login: bool = False) -> Response | None:
        """Why a state-changing request is refused, or None: read-only (403), a foreign Host
        (400: DNS rebinding), a foreign Origin (403: CSRF), no valid token (401)."""
        if not self.allow_actions:
            return _error(403, "this dashboard is read-only; start `shipyard serve` with "
                          "--allow-actions to approve, reject, cancel, roll back or retry")  # fmt: skip
        host = request.headers.get("host", "")
        if host.lower() not in self.hosts:
            return _error(400, f"unexpected Host header {host!r}")
        origin = request.headers.get("origin")
        bearer = request.headers.get("authorization", "").lower().startswith("bearer ")
        if origin is not None and origin.lower() not in self.origins():
            return _error(403, f"cross-origin request from {origin!r} refused")
        if origin is None and not bearer:
            return _error(403, "a request without Origin must authenticate with a Bearer token")
        if not login and self.user_of(request) is None:
            return _error(401, "log in with the dashboard's token first (or send "
                          "Authorization: Bearer TOKEN)")  # fmt: skip
        return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# -- actions ---------------------------------------------------------------------------------------


class Actions:
    """Runs ``shipyard ACTION ID ...`` on this host for a user of the dashboard."""

    def __init__(self, reader: Reader, options: Options, environ: dict[str, str]) -> None:
        self.reader = reader
        self.options = options
        self.environ = environ
        self.logs = Path(tempfile.mkdtemp(prefix="shipyard-serve-"))
        self._detach: bool | None = None

    def base(self) -> list[str]:
        argv = [sys.executable, "-m", "shipyard"]
        for p in self.options.plugins:
            argv += ["-p", p]
        return argv

    def env(self, user: str) -> dict[str, str]:
        env = dict(self.environ)
        # The store and file the dashboard reads, through the environment (no password in ps).
        env["SHIPYARD_STORE"] = self.reader.url
        env["SHIPYARD_FILE"] = str(self.reader.config.pipelines_file)
        env["SHIPYARD_USER"] = user
        env["SHIPYARD_SOURCE"] = "web"
        return env

    def approve_detaches(self) -> bool:
        """Whether this Shipyard's ``approve`` has ``--detach`` (else the approval runs the
        resumed deployment in the background command itself)."""
        if self._detach is None:
            out = subprocess.run(
                [*self.base(), "approve", "--help"], capture_output=True, text=True,
                env=self.env("-"), cwd=self.reader.config.rootdir, timeout=60,
            )  # fmt: skip
            self._detach = "--detach" in out.stdout
        return self._detach

    def argv(self, action: str, dep_id: int, body: dict[str, Any]) -> list[str] | str:
        """The command for ``action``, or why it cannot be given."""
        comment = str(body.get("comment") or "")
        if action == "approve":
            return ["approve", str(dep_id), *(["--detach"] if self.approve_detaches() else []),
                    *(["--comment", comment] if comment else [])]  # fmt: skip
        if action == "reject":
            if not comment.strip():
                return "a rejection needs a comment saying why"
            return ["reject", str(dep_id), "--comment", comment]
        if action == "cancel":
            return ["cancel", str(dep_id), *(["--reason", comment] if comment else [])]
        if action == "rollback":
            return ["rollback", str(dep_id), *(["--reason", comment] if comment else [])]
        if action == "retry":
            return ["retry", str(dep_id)]
        return f"no action {action!r}; one of approve, reject, cancel, rollback, retry"

    def run(self, args: list[str], user: str) -> tuple[int, dict[str, Any]]:
        """Start the command; its answer if it ends within ``ACTION_WAIT`` seconds, else say it
        goes on in the background (a rollback or retry runs its deployment)."""
        log = self.logs / f"{time.time_ns()}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*self.base(), *args], cwd=self.reader.config.rootdir, env=self.env(user),
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
        try:
            code = proc.wait(ACTION_WAIT)
        except subprocess.TimeoutExpired:
            threading.Thread(target=proc.wait, daemon=True).start()  # reaped when it ends
            return 202, {"command": ["shipyard", *args], "running": True, "pid": proc.pid,
                         "output": log.read_text("utf-8", "replace")}  # fmt: skip
        output = log.read_text("utf-8", "replace")
        log.unlink()
        ok = code in (0, 4)  # 4: the approval counted, more are needed
        return (200 if ok else 422), {"command": ["shipyard", *args], "exit_code": code,
                                      "output": output}  # fmt: skip


# -- the application -------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(data, default=str)
    return Response(body, status_code=status, media_type="application/json")


_PAGE_HEADERS = {
    # Log lines are inserted as text; this also keeps any injected markup from running.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _label(value: Any) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def metrics_text(overview: dict[str, Any], totals: dict[str, Any] | None = None) -> str:
    """The overview and the ``totals`` (``Reader.counts``) in the Prometheus text exposition format
    (version 0.0.4)."""
    from shipyard.sdk import parse_ts

    out: list[str] = []

    def family(
        name: str, kind: str, help_: str, samples: list[tuple[dict[str, Any], float]]
    ) -> None:
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label(v)}"' for k, v in labels.items())
            out.append(f"{name}{{{text}}} {float(value)!r}" if text else f"{name} {float(value)!r}")

    def pe(cell: dict[str, Any]) -> dict[str, Any]:
        return {"pipeline": cell["pipeline"], "environment": cell["environment"]}

    cells = overview["cells"]
    family("shipyard_current_version_info", "gauge",
           "The version in service: the latest succeeded deployment.",
           [({**pe(c), "version": c["current"]["version"], "deployment": c["current"]["id"]}, 1)
            for c in cells if c["current"]])  # fmt: skip
    family("shipyard_last_deployment_info", "gauge",
           "The latest deployment, whatever its status.",
           [({**pe(c), "version": c["last"]["version"], "status": c["last"]["status"],
              "deployment": c["last"]["id"]}, 1) for c in cells if c["last"]])  # fmt: skip
    family("shipyard_last_deployment_start_timestamp_seconds", "gauge",
           "When the latest deployment started (Unix time).",
           [(pe(c), parse_ts(c["last"]["started_at"])) for c in cells
            if c["last"] and c["last"]["started_at"]])  # fmt: skip
    family("shipyard_last_deployment_duration_seconds", "gauge",
           "How long the latest finished deployment took.",
           [({**pe(c), "status": c["last"]["status"]},
             parse_ts(c["last"]["finished_at"]) - parse_ts(c["last"]["started_at"]))
            for c in cells if c["last"] and c["last"]["started_at"] and c["last"]["finished_at"]])  # fmt: skip
    family("shipyard_current_version_duration_seconds", "gauge",
           "How long the deployment of the version in service took.",
           [(pe(c), parse_ts(c["current"]["finished_at"]) - parse_ts(c["current"]["started_at"]))
            for c in cells if c["current"] and c["current"]["started_at"]
            and c["current"]["finished_at"]])  # fmt: skip
    counts: dict[tuple[str, str, str], int] = {}
    for c in cells:
        for s in ("pending", "running", "awaiting_approval"):
            counts[(c["pipeline"], c["environment"], s)] = 0
        for a in c["active"]:
            counts[(c["pipeline"], c["environment"], a["status"])] += 1
    family("shipyard_deployments_active", "gauge",
           "Deployments going on now, by status (awaiting_approval: the inbox).",
           [({"pipeline": p, "environment": e, "status": s}, n)
            for (p, e, s), n in counts.items()])  # fmt: skip
    if totals is not None:
        family("shipyard_deployments_counted_timestamp_seconds", "gauge",
               "When the deployments below were counted (Unix time; a big history that keeps "
               "changing is counted again only every few scan times).",
               [({}, totals["at"])])  # fmt: skip
        _counted(family, out, overview, totals["rows"])
    return "\n".join(out) + "\n"


def _counted(family: Callable[..., None], out: list[str], overview: dict[str, Any],
             counts: list[dict[str, Any]]) -> None:  # fmt: skip
    """Every deployment by pipeline, environment and status (every status, zeros included, for
    every pair deployed or declared), and the histogram of the finished ones' durations."""
    pairs = dict.fromkeys((c["pipeline"], c["environment"]) for c in overview["cells"])
    pairs.update(dict.fromkeys((r["pipeline"], r["environment"]) for r in counts))
    by_key = {(r["pipeline"], r["environment"], r["status"]): r for r in counts}
    none = {"count": 0, "timed": 0, "seconds": 0.0, "le": [0] * len(DURATION_BUCKETS)}
    family("shipyard_deployments", "gauge",
           "Deployments recorded, by pipeline, environment and the status they have now.",
           [({"pipeline": p, "environment": e, "status": s}, by_key.get((p, e, s), none)["count"])
            for (p, e) in pairs for s in STATUSES])  # fmt: skip
    name = "shipyard_deployment_duration_seconds"
    out.append(f"# HELP {name} How long finished deployments took, from start to end.")
    out.append(f"# TYPE {name} histogram")
    for p, e in pairs:
        for s in STATUSES:
            if s not in FINISHED:
                continue
            r = by_key.get((p, e, s), none)
            labels = f'pipeline="{_label(p)}",environment="{_label(e)}",status="{_label(s)}"'
            for bound, n in zip(DURATION_BUCKETS, r["le"], strict=True):
                out.append(f'{name}_bucket{{{labels},le="{float(bound)!r}"}} {float(n)!r}')
            out.append(f'{name}_bucket{{{labels},le="+Inf"}} {float(r["timed"])!r}')
            out.append(f"{name}_sum{{{labels}}} {float(r['seconds'])!r}")
            out.append(f"{name}_count{{{labels}}} {float(r['timed'])!r}")


def build_app(reader: Reader, guard: Guard, actions: Actions) -> tuple[Starlette, list[Hub]]:
    hub_box: list[Hub] = []

    def hub() -> Hub:
        return hub_box[0]

    def page(name: str) -> Callable[[Request], Any]:
        async def handler(request: Request) -> Response:
            return FileResponse(STATIC / name, headers=_PAGE_HEADERS, media_type="text/html")

        return handler

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            return PlainTextResponse("not found", status_code=404)
        return FileResponse(path, headers={"Cache-Control": "no-cache",
                                           "X-Content-Type-Options": "nosniff"})  # fmt: skip

    async def api_session(request: Request) -> Response:
        if request.method == "GET":
            return _json({"actions": guard.allow_actions, "user": guard.user_of(request)})
        refused = guard.refuse(request, login=True)
        if refused is not None:
            return refused
        try:
            body = await request.json()
        except ValueError:
            body = {}
        token = str(body.get("token") or "") if isinstance(body, dict) else ""
        user = guard.user_of_token(token)
        if user is None:
            return _error(401, "unknown token")
        sid = secrets.token_urlsafe(32)
        guard.sessions[sid] = user
        response = _json({"actions": True, "user": user})
        response.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/")
        return response

    async def api_overview(request: Request) -> Response:
        doc = await hub().cached("overview", reader.overview)
        return _json({**doc, "actions": guard.allow_actions})

    async def api_history(request: Request) -> Response:
        q = request.query_params
        statuses = tuple(s for s in q.getlist("status") if s)
        bad = [s for s in statuses if s not in STATUSES]
        if bad:
            return _error(
                400, f"{bad[0]!r} is not a deployment status; one of {', '.join(STATUSES)}"
            )
        try:
            page_no = max(0, int(q.get("page", "0")))
            size = min(500, max(1, int(q.get("limit", str(PAGE_SIZE)))))
        except ValueError:
            return _error(400, "page and limit must be whole numbers")
        kwargs = dict(pipeline=q.get("pipeline") or None, environment=q.get("env") or None,
                      statuses=statuses, page=page_no, size=size)  # fmt: skip
        key = "history " + json.dumps(kwargs, sort_keys=True)
        return _json(await hub().cached(key, lambda: reader.history(**kwargs)))  # type: ignore[arg-type]

    async def _deployment_or_404(dep_id: int, fn: Callable[[], T]) -> T | Response:
        from shipyard.sdk import DeploymentNotFound
        from shipyard.sdk import StoreNotFound

        try:
            return await hub().read(fn)
        except (DeploymentNotFound, StoreNotFound) as exc:
            return _error(404, str(exc))

    async def api_deployment(request: Request) -> Response:
        dep_id = request.path_params["id"]
        doc = await _deployment_or_404(dep_id, lambda: reader.document(dep_id))
        return doc if isinstance(doc, Response) else _json(doc)

    async def api_audit(request: Request) -> Response:
        dep_id = request.path_params["id"]
        rows = await _deployment_or_404(
            dep_id, lambda: (reader.status(dep_id), reader.audit(dep_id))[1]
        )
        return rows if isinstance(rows, Response) else _json(rows)

    async def api_logs(request: Request) -> Response:
        dep_id = request.path_params["id"]
        try:
            after = int(request.query_params.get("after", "0"))
        except ValueError:
            return _error(400, "after must be a log line id")
        rows = await _deployment_or_404(
            dep_id, lambda: (reader.status(dep_id), reader.logs(dep_id, after))[1]
        )
        return rows if isinstance(rows, Response) else _json(rows)

    async def api_events(request: Request) -> Response:
        dep_id = request.path_params["id"]
        raw = request.headers.get("last-event-id") or request.query_params.get("after") or "0"
        try:
            after = int(raw)
        except ValueError:
            return _error(400, f"Last-Event-ID {raw!r} is not a log line id")
        first = await _deployment_or_404(dep_id, lambda: reader.status(dep_id))
        if isinstance(first, Response):
            return first
        return StreamingResponse(
            _events(dep_id, after), media_type="text/event-stream",
            headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
        )  # fmt: skip

    async def _events(dep_id: int, after: int) -> AsyncIterator[str]:
        h = hub()
        last = after
        sent_status: str | None = None
        yield f"retry: {RETRY_MS}\n\n"
        while not h.stopping.is_set():
            version = h.version

            # The status first: the last lines are committed with (or before) the final status,
            # so once it says finished, the lines read next are all there are.
            def poll(after: int = last) -> tuple[Any, list[Any]]:
                return reader.status(dep_id), reader.logs(dep_id, after)

            status, rows = await h.read(poll)
            for r in rows:
                last = r["id"]
                yield f"id: {r['id']}\nevent: log\ndata: {json.dumps(r)}\n\n"
            if status != sent_status:
                sent_status = status
                yield f"event: status\ndata: {json.dumps({'status': status})}\n\n"
            if len(rows) >= 1000:
                continue
            if status in FINISHED:
                yield "event: end\ndata: {}\n\n"
                return
            if not await h.wait(version, KEEPALIVE) and not h.stopping.is_set():
                yield ": keepalive\n\n"

    async def api_action(request: Request) -> Response:
        refused = guard.refuse(request)
        if refused is not None:
            return refused
        user = guard.user_of(request)
        assert user is not None
        try:
            body = await request.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        dep_id = request.path_params["id"]
        args = await asyncio.to_thread(actions.argv, request.path_params["action"], dep_id, body)
        if isinstance(args, str):
            return _error(400, args)
        status, answer = await asyncio.to_thread(actions.run, args, user)
        h = hub()
        h.bump()
        return _json(answer, status)

    async def refuse_post(request: Request) -> Response:
        refused = guard.refuse(request)
        return refused if refused is not None else _error(405, "method not allowed")

    async def metrics(request: Request) -> Response:
        doc = await hub().cached("overview", reader.overview)
        counts = await hub().cached("counts", reader.counts, own_lock=True, spacing=COUNT_SPACING)
        return PlainTextResponse(metrics_text(doc, counts), media_type="text/plain; version=0.0.4")

    routes = [
        Route("/", page("index.html")),
        Route("/history", page("history.html")),
        Route("/deployments/{id:int}", page("deployment.html")),
        Route("/static/{name}", static),
        Route("/metrics", metrics),
        Route("/api/session", api_session, methods=["GET", "POST"]),
        Route("/api/overview", api_overview),
        Route("/api/history", api_history),
        Route("/api/deployments/{id:int}", api_deployment),
        Route("/api/deployments/{id:int}/audit", api_audit),
        Route("/api/deployments/{id:int}/logs", api_logs),
        Route("/api/deployments/{id:int}/events", api_events),
        Route("/api/deployments/{id:int}/{action}", api_action, methods=["POST"]),
        Route("/{path:path}", refuse_post, methods=["POST", "PUT", "PATCH", "DELETE"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        h = Hub(reader)
        hub_box.append(h)
        task = asyncio.create_task(h.poll())
        try:
            yield
        finally:
            h.stopping.set()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app = Starlette(routes=routes, lifespan=lifespan)
    return app, hub_box


# -- running ---------------------------------------------------------------------------------------


def _bind(host: str, port: int) -> socket.socket:
    from shipyard import UsageError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def _allowed_hosts(host: str, port: int, remote: bool) -> set[str]:
    names = {"127.0.0.1", "localhost", "[::1]", host if ":" not in host else f"[{host}]"}
    if remote:
        names |= {socket.gethostname(), socket.getfqdn()}
    return {f"{n}:{port}".lower() for n in names}


def run(
    *, host: str, port: int, allow_actions: bool, tokens: dict[str, str], options: Options,
    environ: dict[str, str],
) -> None:  # fmt: skip
    import uvicorn
    from shipyard.contrib.serve import is_loopback

    reader = Reader(options)
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    user_token = None
    if allow_actions and not tokens:
        import getpass

        user = environ.get("SHIPYARD_USER") or getpass.getuser()
        user_token = secrets.token_urlsafe(24)
        tokens = {user_token: user}
    guard = Guard(allow_actions, tokens, _allowed_hosts(host, bound, not is_loopback(host)))
    actions = Actions(reader, options, environ)
    app, hub_box = build_app(reader, guard, actions)
    shown = f"[{host}]" if ":" in host else host
    mode = "actions allowed" if allow_actions else "read-only"
    click.echo(f"shipyard serve: http://{shown}:{bound}/ ({mode}; history {_masked(reader.url)})")
    if user_token is not None:
        click.echo(f"shipyard serve: token for {tokens[user_token]}: {user_token}")
    sys.stdout.flush()

    class Server(uvicorn.Server):
        """Ends the live streams at once on SIGTERM or Ctrl-C: they would otherwise keep the
        graceful shutdown waiting for connections that never close by themselves."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            if loop_box:
                if hub_box:
                    loop_box[0].call_soon_threadsafe(hub_box[0].stopping.set)
                loop_box[0].call_soon_threadsafe(wake.set)

        async def serve(self, sockets: Any = None) -> None:
            loop_box.append(asyncio.get_running_loop())
            await super().serve(sockets=sockets)

        async def main_loop(self) -> None:
            # uvicorn looks at its exit flag ten times a second, waking an idle server for
            # nothing; here once a second (refreshing the Date header each time), and at once
            # when handle_exit sets ``wake``.
            while not await self.on_tick(0):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), 1.0)

    wake = asyncio.Event()

    loop_box: list[asyncio.AbstractEventLoop] = []
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on",
        timeout_graceful_shutdown=1, timeout_keep_alive=5,
    )  # fmt: skip
    try:
        Server(config).run(sockets=[sock])
    finally:
        sock.close()
        reader.close()
        import shutil

        shutil.rmtree(actions.logs, ignore_errors=True)


def _masked(url: str) -> str:
    from shipyard.sdk import display_url

    return display_url(url) if "://" in url else url
