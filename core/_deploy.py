"""The deployment procedure.

:func:`execute` is shared by the CLI (``deploy``, ``rollback``, ``retry``) and by
:class:`shipyard.DeploymentManager`: lock, build, check secrets, run, notify, auto-rollback.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import subprocess
import sys
from collections.abc import Awaitable
from collections.abc import Callable
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any

from ._exceptions import EnvironmentLocked
from ._exceptions import NoPreviousDeployment
from ._exceptions import RollbackRefused
from ._exceptions import SecretMissing
from ._exceptions import ShipyardError
from ._exceptions import UsageError
from ._pipeline import Deployment
from ._reports import Status
from ._session import Session

if TYPE_CHECKING:
    from ._history import SQLiteHistory


@dataclass
class DeployRequest:
    """What to deploy and how."""

    pipeline: str
    version: str
    environment: str
    vars: dict[str, str] = field(default_factory=dict)
    rollback_of: int | None = None
    retry_of: int | None = None
    start_stage: int = 0
    auto_rollback: bool = True
    wait_lock: float = 0.0
    notify: list[str] = field(default_factory=list)
    args: list[str] | None = None
    reason: str = ""


DeployRequest.__module__ = "shipyard"


@dataclass
class Outcome:
    """How a deployment ended (and its automatic rollback, if one ran)."""

    id: int
    status: Status
    error: str | None = None
    rollback: Outcome | None = None
    interrupted_by_signal: bool = False

    @property
    def exit_code(self) -> int:
        if self.interrupted_by_signal:
            return 130
        return 0 if self.status is Status.SUCCEEDED else 1


class RunControl:
    """Cancels the running deployment of this process (signal handler, ``cancel``, the API)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        self.by_signal = False
        self._cancelled: asyncio.Task[Any] | None = None

    def on_signal(self, name: str) -> None:
        self.cancel(f"interrupted by {name}", by_signal=True)

    def cancel(self, reason: str, *, by_signal: bool = False) -> None:
        if self.reason is None:
            self.reason = reason
            self.by_signal = by_signal
        # Once per task: a second Ctrl-C (or a cancel request seen by the heartbeat) while the
        # steps are being stopped would cut their SIGTERM-grace-SIGKILL short and leave a
        # process that ignores SIGTERM running after we exit.
        if self.task is not None and not self.task.done() and self.task is not self._cancelled:
            self._cancelled = self.task
            self.task.cancel()


def file_hash(path: os.PathLike[str] | str) -> str | None:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


def git_commit(rootdir: os.PathLike[str] | str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=rootdir, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=rootdir,
        capture_output=True, text=True, timeout=5,
    )  # fmt: skip
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


async def _begin(
    store: SQLiteHistory, session: Session, req: DeployRequest, control: RunControl,
    commit: Awaitable[str | None],
) -> int:  # fmt: skip
    from ._version import __version__

    cfg = session.config
    info = {
        "pipelines_file": str(cfg.pipelines_file),
        "file_hash": file_hash(cfg.pipelines_file),
        "git_commit": await commit,
        "args": req.args,
        "vars": req.vars,
        "shipyard_version": __version__,
    }
    loop = asyncio.get_running_loop()
    deadline = loop.time() + req.wait_lock
    ticket: int | None = None
    last_touch = loop.time()
    try:
        while True:
            try:
                dep_id = store.begin(
                    pipeline=req.pipeline, version=req.version, environment=req.environment,
                    rollback_of=req.rollback_of, retry_of=req.retry_of, info=info,
                    lease=cfg.lock_lease, ticket=ticket,
                )  # fmt: skip
                ticket = None  # begin() removed it from the queue
                return dep_id
            except EnvironmentLocked as exc:
                if control.reason:
                    raise KeyboardInterrupt(control.reason) from None
                if loop.time() >= deadline:
                    raise
                if ticket is None:
                    ticket = store.enqueue(req.pipeline, req.environment)
                    print(f"waiting for the lock: {exc}", file=sys.stderr)
                elif loop.time() - last_touch > 5:
                    store.touch_ticket(ticket)
                    last_touch = loop.time()
                await asyncio.sleep(0.1)
    finally:
        if ticket is not None:
            store.dequeue(ticket)


async def execute(
    session: Session,
    req: DeployRequest,
    *,
    reporter: Any = None,
    control: RunControl | None = None,
    on_begin: Callable[[int], None] | None = None,
) -> Outcome:
    """Run one deployment from lock to notification; see the module docstring."""
    from ._events import EventBus
    from ._events import RollbackStarted
    from ._history import HistoryRecorder
    from ._notify import NotifierDispatcher
    from ._runner import Runner
    from ._secrets import mask
    from ._secrets import names_in

    control = control or RunControl()
    pipe = session.pipeline(req.pipeline)
    if not pipe.allows(req.environment):
        allowed = ", ".join(repr(e) for e in pipe.environments or [])
        raise UsageError(f"pipeline {pipe.name!r} may deploy to {allowed}, not {req.environment!r}")
    if req.rollback_of is not None and pipe.rollback is False:
        raise RollbackRefused(
            f"pipeline {pipe.name!r} refuses rollback (rollback=False); deploy a version instead"
        )
    # Asked of git at once, so that it runs while the history is opened and repaired.
    commit = asyncio.ensure_future(asyncio.to_thread(git_commit, session.config.rootdir))
    store = session.open_store()
    previous = store.previous_version(pipe.name, req.environment)
    dep_id = await _begin(store, session, req, control, commit)
    if req.rollback_of is not None:
        store.record_audit(
            "rollback", dep_id, req.reason or f"rollback of deployment {req.rollback_of}"
        )
    if on_begin is not None:
        on_begin(dep_id)
    deployment = Deployment(
        id=dep_id, pipeline=pipe.name, version=req.version, environment=req.environment,
        vars=dict(req.vars), previous_version=previous, rollback_of=req.rollback_of,
    )  # fmt: skip
    pm = session.pm
    try:
        stages = session.build(pipe, deployment)
        sinks = list(pipe.notify) + [
            pm.notifiers.create(s) for s in session.config.notify + req.notify
        ]
        names = names_in([st.steps for st in stages]) | names_in(sinks)
        secrets = _load_secrets(session, names, pipe.name)
    except ShipyardError as exc:
        store.finish(dep_id, Status.FAILED, mask(str(exc)))
        if reporter is not None:
            reporter.write(f"deployment #{dep_id} failed before any step ran")
        raise
    recorder = HistoryRecorder(
        store, on_error=lambda exc: control.cancel(f"stopped: the history cannot be written: {exc}")
    )
    dispatcher = NotifierDispatcher(sinks, resolve=secrets.resolve)
    listeners: list[Any] = [recorder] + ([reporter] if reporter is not None else []) + [dispatcher]
    bus = EventBus(listeners, pm)
    runner = Runner(
        pluginmanager=pm, bus=bus, secrets=secrets, rootdir=session.config.rootdir, control=control
    )
    runner.process_tag = store.process_tag(dep_id)
    note = (
        f"stages before {req.start_stage + 1} were done by deployment {req.retry_of}"
        if req.retry_of
        else None
    )
    run_task = asyncio.ensure_future(
        runner.run(deployment, stages, start_stage=req.start_stage, note=note)
    )
    control.task = run_task
    if control.reason:
        run_task.cancel()
    hb = asyncio.ensure_future(
        _heartbeat(session.config.history, dep_id, control, tick=recorder.tick)
    )
    try:
        status, error = await asyncio.shield(run_task)
    except asyncio.CancelledError:
        # Our caller was cancelled (e.g. the API's thread): stop the run and let it record.
        control.cancel(control.reason or "cancelled")
        status, error = await run_task
    finally:
        hb.cancel()
        control.task = None
    target: dict[str, Any] | None = None
    if (
        status is Status.FAILED
        and pipe.rollback == "auto"
        and req.auto_rollback
        and req.rollback_of is None
        and recorder.error is None
    ):
        try:
            target = store.rollback_target(dep_id)
        except NoPreviousDeployment as exc:
            recorder.note(dep_id, f"automatic rollback skipped: {exc}")
            recorder.flush()
            if reporter is not None:
                reporter.write(f"automatic rollback skipped: {exc}")
        else:
            # Emitted before the notifiers close, so that sinks receive it too.
            bus.emit(RollbackStarted(deployment=deployment, target=target["version"],
                                     reason=f"deployment #{dep_id} failed (rollback='auto')"))  # fmt: skip
    errors = await asyncio.to_thread(dispatcher.close)
    if recorder.error is not None:
        raise recorder.error
    if errors:
        store.apply([], [(dep_id, None, None, _now(), "notify", e) for e in errors])
    outcome = Outcome(
        dep_id,
        status,
        error,
        interrupted_by_signal=control.by_signal and status is Status.CANCELLED,
    )
    if target is not None:
        rb_req = DeployRequest(
            pipeline=pipe.name, version=target["version"], environment=req.environment,
            vars=dict(target.get("vars") or {}), rollback_of=dep_id, auto_rollback=False,
            notify=req.notify, args=req.args, wait_lock=max(req.wait_lock, 5.0),
        )  # fmt: skip
        outcome.rollback = await execute(session, rb_req, reporter=reporter, control=control)
    store.close()
    return outcome


def _now() -> float:
    import time

    return time.time()


def _load_secrets(session: Session, names: set[str], pipeline: str) -> Any:
    from ._secrets import SecretValues
    from ._secrets import register

    env: dict[str, str] = dict(os.environ)
    for path in session.config.secret_files:
        env.update(read_secret_file(path))
    # Masked from now on: a provider below may print or raise with one of them.
    register(env[n] for n in names if n in env)
    for name in sorted(names):
        try:
            value = session.pm.resolve_secret(name, session.config)
        except Exception as exc:  # a provider's failure fails the deployment, before any step
            raise SecretMissing(
                f"pipeline {pipeline!r}: secret {name}: the secret provider failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        if value is not None and not isinstance(value, str):
            raise SecretMissing(
                f"pipeline {pipeline!r}: secret {name}: the secret provider returned a "
                f"{type(value).__name__}, not a str"
            )
        if value is not None:
            register([value])
            env[name] = value
    return SecretValues.load(names, env, where=f"pipeline {pipeline!r}: ")


def read_secret_file(path: os.PathLike[str] | str) -> dict[str, str]:
    """Read a dotenv file of secrets; refuse one that others can read."""
    import stat

    try:
        st = os.stat(path)
    except OSError as exc:
        raise SecretMissing(f"secret file {path}: {exc.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretMissing(
            f"secret file {path} is readable by group or others "
            f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod 600 {path}`"
        )
    values: dict[str, str] = {}
    # Bytes that are not UTF-8 are kept (as in os.environ): the step receives them unchanged.
    try:
        f = open(path, encoding="utf-8", errors="surrogateescape")  # noqa: SIM115
    except OSError as exc:
        raise SecretMissing(f"secret file {path}: {exc.strerror}") from None
    with f:
        for n, raw in enumerate(f, 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("export "):
                line = line[7:].lstrip()
            key, sep, value = line.partition("=")
            key = key.strip()
            if not sep or not key.isidentifier():
                raise SecretMissing(f"secret file {path}:{n}: expected NAME=VALUE")
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
            values[key] = value
    return values


async def _heartbeat(
    history: str, dep_id: int, control: RunControl, tick: Callable[[], None] | None = None
) -> None:
    """Renew the lock and watch for ``shipyard cancel`` from another process.

    Uses a connection of its own from a worker thread, so a busy database never stalls the runner.
    ``tick`` runs on the loop at every beat (the recorder flushes a silent step's log lines).
    """
    import threading

    from ._history import open_store

    interval = float(os.environ.get("SHIPYARD_HEARTBEAT", "1.0"))
    # Cancelling ``to_thread`` does not stop the thread: a heartbeat may still be running on
    # the connection when we stop. Closing it under the thread's feet crashed the process
    # (SIGSEGV in sqlite3), so the thread and the close take turns, and nothing opens after.
    guard = threading.Lock()
    stores: list[Any] = []
    closed = False

    def beat() -> str | None:
        with guard:
            if closed:
                return None
            if not stores:
                stores.append(open_store(history))
            result: str | None = stores[0].heartbeat(dep_id)
            return result

    try:
        while True:
            await asyncio.sleep(interval)
            if tick is not None:
                tick()
            try:
                requested = await asyncio.to_thread(beat)
            except ShipyardError:
                continue
            if requested and control.reason is None:
                control.cancel(f"cancelled by {requested}")
    finally:
        with guard:
            closed = True
            for store in stores:
                store.close()
