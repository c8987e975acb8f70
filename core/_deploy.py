"""The deployment procedure.

:func:`execute` is shared by the CLI (``deploy``, ``rollback``, ``retry``) and by
:class:`shipyard.DeploymentManager`: check the request, record it and take the lock, build the
stages and load the secrets, run them with a heartbeat, close the notifiers, and run the
automatic rollback when one is due. Every write about the running deployment goes through the
:class:`~shipyard._recorder.HistoryRecorder` listening on the event stream.
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
from typing import Protocol

from ._events import DeploymentFinished
from ._events import EventBus
from ._events import Listener
from ._events import RollbackStarted
from ._exceptions import EnvironmentLocked
from ._exceptions import ExitCode
from ._exceptions import HistoryError
from ._exceptions import LockLost
from ._exceptions import NoPreviousDeployment
from ._exceptions import SecretMissing
from ._exceptions import ShipyardError
from ._identity import actor
from ._identity import ci_actor
from ._notify import NotifierDispatcher
from ._pipeline import Deployment
from ._reports import Status
from ._session import Session

if TYPE_CHECKING:
    from ._events import Event
    from ._pipeline import Pipeline
    from ._pipeline import Stage
    from ._recorder import HistoryRecorder
    from ._secrets import SecretValues
    from ._store import DeploymentInfo
    from ._store import DeploymentRow
    from ._store import HistoryStore


@dataclass
class DeployRequest:
    """What to deploy and how."""

    pipeline: str
    version: str
    environment: str
    vars: dict[str, str] = field(default_factory=dict)
    rollback_of: int | None = None
    #: In a rollback, the deployment whose version comes back.
    restores: int | None = None
    retry_of: int | None = None
    start_stage: int = 0
    auto_rollback: bool = True
    wait_lock: float = 0.0
    notify: list[str] = field(default_factory=list)
    args: list[str] | None = None
    reason: str = ""
    #: Resume this deployment (approved at a gate) at ``start_stage``, instead of a new one;
    #: its lock is already held by this process (``HistoryStore.decide``).
    resume_of: int | None = None
    #: For a resume: the recorded context and the gates' decisions.
    previous_version: str | None = None
    approvals: dict[str, Any] = field(default_factory=dict)
    #: ``--yes``: meant for a protected environment.
    yes: bool = False
    #: ``shipyard promote``: the deployment whose version this one takes further.
    promoted_from: int | None = None


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
    def exit_code(self) -> ExitCode:
        if self.interrupted_by_signal:
            return ExitCode.INTERRUPTED
        if self.status is Status.AWAITING_APPROVAL:
            return ExitCode.AWAITING_APPROVAL
        return ExitCode.OK if self.status is Status.SUCCEEDED else ExitCode.FAILED


class RunControl:
    """Cancels the running deployment of this process (signal handler, ``cancel``, the API)."""

    def __init__(self) -> None:
        self.task: asyncio.Task[Any] | None = None
        self.reason: str | None = None
        self.by_signal = False
        #: How a stopped deployment ends.
        self.status = Status.CANCELLED
        self._cancelled: asyncio.Task[Any] | None = None

    def on_signal(self, name: str) -> None:
        self.cancel(f"interrupted by {name}", by_signal=True)

    def cancel(
        self, reason: str, *, by_signal: bool = False, status: Status = Status.CANCELLED
    ) -> None:
        """Stop the deployment; it ends ``status`` (``interrupted`` when it lost its lock)."""
        if self.reason is None:
            self.reason = reason
            self.by_signal = by_signal
            self.status = status
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


class Reporter(Protocol):
    """Where a deployment's progress is shown (the console): an event listener that can also
    write a line of its own."""

    def handle(self, event: Event) -> None: ...

    def write(self, text: str) -> None: ...


class _Unnumbered(Deployment):
    """A deployment before the history numbered it, for building its stages first: it notes
    whether the pipeline function read ``id``, and takes its number afterwards."""

    @property
    def id_was_read(self) -> bool:
        return bool(self.__dict__.get("_id_read"))

    def __getattribute__(self, name: str) -> Any:
        if name == "id":
            object.__setattr__(self, "_id_read", True)
        return object.__getattribute__(self, name)

    def numbered(self, dep_id: int) -> Deployment:
        """This same object (the steps may hold it), now a plain Deployment with its id."""
        object.__setattr__(self, "id", dep_id)
        self.__dict__.pop("_id_read", None)
        object.__setattr__(self, "__class__", Deployment)
        return self

    def __repr__(self) -> str:
        return Deployment.__repr__(self).replace(type(self).__qualname__, "Deployment", 1)


class _Deployment:
    """One run of :func:`execute`: lock, build, run, notify, roll back — in that order."""

    def __init__(
        self, session: Session, req: DeployRequest, reporter: Reporter | None,
        control: RunControl, on_begin: Callable[[int], None] | None,
    ) -> None:  # fmt: skip
        self.session = session
        self.req = req
        self.reporter = reporter
        self.control = control
        self.on_begin = on_begin

    def say(self, text: str) -> None:
        if self.reporter is not None:
            self.reporter.write(text)

    async def run(self) -> Outcome:
        from ._recorder import HistoryRecorder
        from ._service import check_request

        session, req = self.session, self.req
        pipe = check_request(session, req)
        # Asked of git at once, so that it runs while the history is opened and repaired.
        commit = asyncio.ensure_future(asyncio.to_thread(git_commit, session.config.rootdir))
        _warn_if_ephemeral(session)
        store = session.open_store()
        try:
            if req.rollback_of is None and req.retry_of is None and req.resume_of is None:
                from ._environments import check_requires
                from ._environments import resolve

                env = resolve(pipe, session.config, req.environment)
                if env is not None and env.requires:
                    check_requires(store, pipe.name, env, req.version, await commit)
            previous = (
                req.previous_version if req.resume_of is not None
                else store.previous_version(pipe.name, req.environment)
            )  # fmt: skip
            # Built before anything is recorded: a definition error (no stages, a step type no
            # plugin provides) is refused like `plan` refuses it, with no "failed" row.
            draft = _Unnumbered(
                id=req.resume_of or 0, pipeline=pipe.name, version=req.version,
                environment=req.environment, vars=dict(req.vars), previous_version=previous,
                rollback_of=req.rollback_of, restores=req.restores, approvals=req.approvals,
            )  # fmt: skip
            try:
                stages: list[Stage] | None = session.build(pipe, draft)
            except BaseException:
                commit.cancel()
                raise
            if req.resume_of is not None:  # approved: its lock was taken with the decision
                commit.cancel()
                dep_id = req.resume_of
            else:
                dep_id = await self._begin(store, commit)
            if req.rollback_of is not None and req.resume_of is None:
                store.add_audit(
                    "rollback", dep_id, user=actor(),
                    reason=req.reason or f"rollback of deployment {req.rollback_of}",
                )  # fmt: skip
            if req.promoted_from is not None:
                store.add_audit("promote", dep_id, user=actor(), reason=req.reason)
            if self.on_begin is not None:
                self.on_begin(dep_id)
            if draft.id_was_read:  # the stages depend on the id: built again with the real one
                deployment: Deployment = Deployment(
                    id=dep_id, pipeline=pipe.name, version=req.version,
                    environment=req.environment, vars=dict(req.vars), previous_version=previous,
                    rollback_of=req.rollback_of, restores=req.restores, approvals=req.approvals,
                )  # fmt: skip
                stages = None
            else:
                deployment = draft.numbered(dep_id)
            recorder = HistoryRecorder(store, on_error=self._history_failed)
            stages, sinks, secrets = self._prepare(pipe, deployment, recorder, stages)
            dispatcher = NotifierDispatcher(sinks, resolve=secrets.resolve)
            listeners: list[Listener] = [recorder, *([self.reporter] if self.reporter else [])]
            bus = EventBus([*listeners, dispatcher], session.pm)
            status, error = await self._run_stages(
                store, bus, secrets, deployment, stages, recorder.tick
            )
            target = self._rollback_target(store, pipe, dep_id, status, recorder)
            if target is not None:
                # Emitted before the notifiers close, so that sinks receive it too.
                bus.emit(RollbackStarted(deployment=deployment, target=target["version"],
                                         reason=f"deployment #{dep_id} failed (rollback='auto')"))  # fmt: skip
            for text in await asyncio.to_thread(dispatcher.close):
                recorder.note(dep_id, text, stream="notify")
            if recorder.error is None:
                recorder.flush()
            if recorder.error is not None and not isinstance(recorder.error, LockLost):
                raise recorder.error
        finally:
            store.close()
        outcome = Outcome(
            dep_id, status, error,
            interrupted_by_signal=self.control.by_signal and status is Status.CANCELLED,
        )  # fmt: skip
        if target is not None:
            from ._service import automatic_rollback

            rb = automatic_rollback(req, dep_id, target)
            outcome.rollback = await execute(
                session, rb, reporter=self.reporter, control=self.control
            )
        return outcome

    def _history_failed(self, exc: HistoryError) -> None:
        """A write failed: stop rather than run unrecorded (a lost lock: interrupted)."""
        if isinstance(exc, LockLost):
            self.control.cancel(str(exc), status=Status.INTERRUPTED)
        else:
            self.control.cancel(f"stopped: the history cannot be written: {exc}")

    async def _begin(self, store: HistoryStore, commit: Awaitable[str | None]) -> int:
        """Record the deployment and take the lock, waiting in the queue up to ``wait_lock``."""
        from ._liveness import dead_after
        from ._liveness import stop_orphans
        from ._liveness import this_process
        from ._version import __version__

        req, cfg = self.req, self.session.config
        info: DeploymentInfo = {
            "user": self.session.identify("deploy"),
            "ci_actor": ci_actor(),
            "pipelines_file": str(cfg.pipelines_file),
            "file_hash": file_hash(cfg.pipelines_file),
            "git_commit": await commit,
            "args": req.args,
            "vars": req.vars,
            "shipyard_version": __version__,
        }
        is_dead = dead_after(cfg.lock_lease)
        from ._environments import lock_key

        key = lock_key(self.session, req.pipeline, req.environment)
        keyed: dict[str, Any] = {"lock_key": key} if key != req.pipeline else {}
        # How often a waiter asks again: a server store answers without contending for a file.
        poll = float(getattr(store, "lock_poll_interval", 0.1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + req.wait_lock
        ticket: int | None = None
        last_touch = loop.time()
        try:
            while True:
                try:
                    begun = store.begin(
                        pipeline=req.pipeline, version=req.version, environment=req.environment,
                        owner=this_process(), is_dead=is_dead, info=info,
                        rollback_of=req.rollback_of, retry_of=req.retry_of, ticket=ticket,
                        **keyed,
                    )  # fmt: skip
                    ticket = None  # begin() removed it from the queue
                    stop_orphans(store, begun.interrupted)
                    if begun.interrupted:
                        self.session.clean_up(store, begun.interrupted)
                    return begun.id
                except EnvironmentLocked as exc:
                    if self.control.reason:
                        raise KeyboardInterrupt(self.control.reason) from None
                    if loop.time() >= deadline:
                        raise
                    if ticket is None:
                        ticket = store.enqueue(key, req.environment, this_process())
                        print(f"waiting for the lock: {exc}", file=sys.stderr)
                    elif loop.time() - last_touch > 5:
                        store.touch_ticket(ticket)
                        last_touch = loop.time()
                    await asyncio.sleep(poll)
        finally:
            if ticket is not None:
                store.dequeue(ticket)

    def _prepare(
        self, pipe: Pipeline[Any], deployment: Deployment, recorder: HistoryRecorder,
        stages: list[Stage] | None,
    ) -> tuple[list[Stage], list[Any], SecretValues]:  # fmt: skip
        """The stages (built unless given), the notification sinks and the secrets; a failure
        here is recorded as the deployment's failure before any step ran."""
        from ._secrets import mask
        from ._secrets import names_in

        session, pm = self.session, self.session.pm
        try:
            if stages is None:
                stages = session.build(pipe, deployment)
            sinks = list(pipe.notify) + [
                pm.notifiers.create(s) for s in session.config.notify + self.req.notify
            ]
            names = names_in([st.steps for st in stages]) | names_in(sinks)
            if self.req.resume_of is None:
                from ._environments import resolve

                env = resolve(pipe, session.config, deployment.environment)
                names |= set(env.secrets if env else ())
            secrets = _load_secrets(session, names, pipe.name)
        except ShipyardError as exc:
            recorder.handle(
                DeploymentFinished(
                    deployment=deployment, status=Status.FAILED, error=mask(str(exc))
                )
            )
            self.say(f"deployment #{deployment.id} failed before any step ran")
            raise
        return stages, sinks, secrets

    async def _run_stages(
        self, store: HistoryStore, bus: EventBus, secrets: SecretValues, deployment: Deployment,
        stages: list[Stage], tick: Callable[[], None],
    ) -> tuple[Status, str | None]:  # fmt: skip
        """Run the stages with a heartbeat beside them; a cancellation of our caller stops the
        run, which still records how it ended."""
        from ._liveness import process_tag
        from ._runner import Runner

        req, control = self.req, self.control
        runner = Runner(
            pluginmanager=self.session.pm, bus=bus, secrets=secrets,
            rootdir=self.session.config.rootdir, control=control,
            process_tag=process_tag(store, deployment.id), store=store,
        )  # fmt: skip
        note = (
            f"stages before {req.start_stage + 1} were done by deployment {req.retry_of}"
            if req.retry_of
            else None
        )
        run_task = asyncio.ensure_future(
            runner.run(
                deployment,
                stages,
                start_stage=req.start_stage,
                note=note,
                resumed=req.resume_of is not None,
            )
        )
        control.task = run_task
        if control.reason:
            run_task.cancel()
        hb = asyncio.ensure_future(_heartbeat(self.session, deployment.id, control, tick=tick))
        try:
            return await asyncio.shield(run_task)
        except asyncio.CancelledError:
            if run_task.done() and runner.result is not None:
                return runner.result  # ended and recorded; only a late cancel request remained
            # Our caller was cancelled (e.g. the API's thread): stop the run and let it record.
            control.cancel(control.reason or "cancelled")
            try:
                return await run_task
            except asyncio.CancelledError:
                if runner.result is not None:
                    return runner.result
                raise
        finally:
            hb.cancel()
            control.task = None

    def _rollback_target(
        self, store: HistoryStore, pipe: Pipeline[Any], dep_id: int, status: Status,
        recorder: HistoryRecorder,
    ) -> DeploymentRow | None:  # fmt: skip
        """The version an automatic rollback returns to, or None (saying why when it is
        skipped for lack of a target)."""
        req = self.req
        if not (
            status is Status.FAILED
            and pipe.rollback == "auto"
            and req.auto_rollback
            and req.rollback_of is None
            and recorder.error is None
        ):
            return None
        try:
            return store.rollback_target(dep_id)
        except NoPreviousDeployment as exc:
            recorder.note(dep_id, f"automatic rollback skipped: {exc}")
            self.say(f"automatic rollback skipped: {exc}")
            return None


_warned: list[str] = []


def _warn_if_ephemeral(session: Session) -> None:
    """Once per process: a CI runner's local history dies with the job (issue: choosing a store)."""
    from ._store import ephemeral_warning

    cfg = session.config
    text = ephemeral_warning(cfg.history, cfg.store_chosen, os.environ)
    if text and not _warned:
        _warned.append(text)
        print(text, file=sys.stderr)


async def execute(
    session: Session,
    req: DeployRequest,
    *,
    reporter: Reporter | None = None,
    control: RunControl | None = None,
    on_begin: Callable[[int], None] | None = None,
) -> Outcome:
    """Run one deployment from lock to notification, then its automatic rollback if one is
    due; see the module docstring."""
    return await _Deployment(session, req, reporter, control or RunControl(), on_begin).run()


def _load_secrets(session: Session, names: set[str], pipeline: str) -> SecretValues:
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
    session: Session, dep_id: int, control: RunControl, tick: Callable[[], None] | None = None
) -> None:
    """Renew the lock and watch for ``shipyard cancel`` from another process.

    Uses a connection of its own from a worker thread, so a busy database never stalls the runner.
    ``tick`` runs on the loop at every beat (the recorder flushes a silent step's log lines).
    """
    import threading

    interval = float(os.environ.get("SHIPYARD_HEARTBEAT", "1.0"))
    # Cancelling ``to_thread`` does not stop the thread: a heartbeat may still be running on
    # the connection when we stop. Closing it under the thread's feet crashed the process
    # (SIGSEGV in sqlite3), so the thread and the close take turns, and nothing opens after.
    guard = threading.Lock()
    stores: list[HistoryStore] = []
    closed = False

    def beat() -> str | None:
        with guard:
            if closed:
                return None
            if not stores:
                stores.append(session.open_store(repair=False))
            return stores[0].heartbeat(dep_id)

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
                lost = requested.removeprefix("shipyard: ")
                if lost.startswith("the lock was lost"):
                    control.cancel(lost, status=Status.INTERRUPTED)
                else:
                    control.cancel(f"cancelled by {requested}")
    finally:
        with guard:
            closed = True
            for store in stores:
                store.close()


def announce(session: Session, x: DeploymentRow, make: Callable[[Deployment], Event]) -> None:
    """Send an event no run carries (a gate decided, expired, a reminder) to the sinks of
    ``x``'s pipeline and ``[tool.shipyard] notify``, and to the plugin hooks; waits for the sinks
    at most their timeouts. A sink that cannot be set up or fails only warns: the decision it
    reports is already recorded."""
    from ._secrets import mask
    from ._secrets import names_in

    deployment = Deployment(
        id=x["id"], pipeline=x["pipeline"], version=x["version"], environment=x["environment"],
        vars=dict(x.get("vars") or {}), rollback_of=x["rollback_of"],
    )  # fmt: skip
    sinks: list[Any] = []
    resolve = None
    try:
        pipe = session.pipeline(x["pipeline"])
        sinks = list(pipe.notify) + [session.pm.notifiers.create(s) for s in session.config.notify]
        resolve = _load_secrets(session, names_in(sinks), pipe.name).resolve
    except ShipyardError as exc:
        print(f"shipyard: warning: notifications not sent: {mask(str(exc))}", file=sys.stderr)
        sinks = []
    dispatcher = NotifierDispatcher(sinks, resolve=resolve)
    EventBus([dispatcher], session.pm).emit(make(deployment))
    dispatcher.close()
