"""The application layer: every rule about what may be deployed, rolled back, retried, cancelled
or unlocked, in one place, for the CLI and the Python API alike.

The CLI parses, calls :class:`DeploymentService` (or :func:`shipyard._deploy.execute` with a
request built here) and renders; :class:`~shipyard.DeploymentManager` does the same from
Python. Neither knows which store is behind it.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from collections.abc import Mapping
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple

from ._exceptions import RollbackRefused
from ._exceptions import UsageError
from ._pipeline import Deployment
from ._reports import Status

if TYPE_CHECKING:
    from ._deploy import DeployRequest
    from ._pipeline import Pipeline
    from ._pipeline import Stage
    from ._session import Session
    from ._store import AuditRow
    from ._store import DeploymentRow
    from ._store import HistoryStore
    from ._store import LockRow
    from ._store import LogRow

#: Deployments that are still going on.
ACTIVE: frozenset[str] = frozenset({Status.PENDING, Status.RUNNING})
#: Deployments that ``retry`` may run again.
RETRYABLE: frozenset[str] = frozenset({Status.FAILED, Status.CANCELLED, Status.INTERRUPTED})

#: The keys of a deployment in ``history --json`` (DESIGN §3).
HISTORY_KEYS = ("id", "pipeline", "version", "environment", "status", "started_at", "finished_at",
                "rollback_of", "retry_of", "error", "user", "host")  # fmt: skip
_STEP_KEYS = ("name", "kind", "status", "attempts", "exit_code", "error", "warning",
              "started_at", "finished_at")  # fmt: skip


# -- the rules -------------------------------------------------------------------------------------


def check_environment(pipe: Pipeline[Any], environment: str) -> None:
    """Refuse an environment the pipeline does not deploy to."""
    if not pipe.allows(environment):
        allowed = ", ".join(repr(e) for e in pipe.environments or [])
        raise UsageError(f"pipeline {pipe.name!r} may deploy to {allowed}, not {environment!r}")


#: What a version may be: it becomes part of paths, image tags and container names.
VERSION_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}"
_VERSION = re.compile(VERSION_PATTERN)


def check_version(version: str) -> None:
    """Refuse a version that could not safely be a path, an image tag or a container name."""
    if _VERSION.fullmatch(version) and ".." not in version:
        return
    bad = next((c for c in version if not (c.isascii() and (c.isalnum() or c in "._+-"))), None)
    if not version:
        problem = "is empty"
    elif len(version) > 128:
        problem = f"is {len(version)} characters long"
    elif bad is not None:
        problem = f"contains {bad!r}"
    elif ".." in version:
        problem = "contains '..'"
    else:
        problem = f"starts with {version[0]!r}"
    shown = version if len(version) <= 40 else version[:40] + "..."
    raise UsageError(
        f"version {shown!r} {problem}: a version is 1 to 128 letters, digits, '.', '_', '-' "
        "and '+', starting with a letter or a digit (e.g. 1.4.2, 2026.12.03-rc1, 1.0+abc123)"
    )


def check_rollback_allowed(pipe: Pipeline[Any]) -> None:
    """Refuse a rollback of a pipeline declared ``rollback=False``."""
    if pipe.rollback is False:
        raise RollbackRefused(
            f"pipeline {pipe.name!r} refuses rollback (rollback=False); deploy a version instead"
        )


def check_request(session: Session, req: DeployRequest) -> Pipeline[Any]:
    """The pipeline of ``req``, once every rule allows the request."""
    if req.rollback_of is None and req.retry_of is None:  # recorded versions were checked then
        check_version(req.version)
    pipe = session.pipeline(req.pipeline)
    check_environment(pipe, req.environment)
    if req.rollback_of is not None:
        check_rollback_allowed(pipe)
    return pipe


def rollback_request(
    of: DeployRequest | DeploymentRow, of_id: int, target: DeploymentRow, *,
    wait_lock: float = 0.0, notify: list[str] | None = None, args: list[str] | None = None,
    reason: str = "",
) -> DeployRequest:  # fmt: skip
    """The deployment that rolls back deployment ``of_id`` (of ``of``'s pipeline and
    environment) to ``target``'s version, with the variables ``target`` ran with."""
    from ._deploy import DeployRequest

    pipeline = of.pipeline if isinstance(of, DeployRequest) else of["pipeline"]
    environment = of.environment if isinstance(of, DeployRequest) else of["environment"]
    return DeployRequest(
        pipeline=pipeline, version=target["version"], environment=environment,
        vars=dict(target.get("vars") or {}), rollback_of=of_id, restores=target["id"],
        auto_rollback=False,
        wait_lock=wait_lock, notify=list(notify or []), args=args, reason=reason,
    )  # fmt: skip


def automatic_rollback(failed: DeployRequest, dep_id: int, target: DeploymentRow) -> DeployRequest:
    """The rollback that ``rollback="auto"`` runs after deployment ``dep_id`` failed: it waits a
    little for the lock, which the failed deployment has only just released."""
    return rollback_request(
        failed, dep_id, target, wait_lock=max(failed.wait_lock, 5.0), notify=failed.notify,
        args=failed.args,
    )  # fmt: skip


class Plan(NamedTuple):
    """What ``plan`` shows: the pipeline, the deployment it was built for, its stages."""

    pipeline: Pipeline[Any]
    deployment: Deployment
    stages: list[Stage]


class DeploymentService:
    """The use cases of the CLI and the Python API, over one :class:`~shipyard._session.Session`.

    Reads use one store, opened (and repaired) on first use; each deployment opens its own.
    """

    def __init__(self, session: Session) -> None:
        self.session = session
        self._store: HistoryStore | None = None

    def store(self, *, create: bool = False) -> HistoryStore:
        """The store of this session's reads; :class:`~shipyard.HistoryError` if there is none
        yet and ``create`` is false."""
        if self._store is None:
            self._store = self.session.open_store(create=create)
        return self._store

    def read_store(self) -> HistoryStore | None:
        """The store, or None when nothing was ever recorded (nothing to read, not an error)."""
        from ._store import StoreNotFound

        try:
            return self.store()
        except StoreNotFound:
            return None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None

    # -- planning ---------------------------------------------------------------------------------

    def plan(
        self, pipeline: str, version: str, environment: str, vars: Mapping[str, str] | None = None
    ) -> Plan:
        """The stages ``deploy`` would run; changes nothing."""
        check_version(version)
        pipe = self.session.pipeline(pipeline)
        check_environment(pipe, environment)
        d = Deployment(0, pipe.name, version, environment, dict(vars or {}))
        return Plan(pipe, d, self.session.build(pipe, d))

    # -- requests ---------------------------------------------------------------------------------

    def rollback(
        self, target: int | str, environment: str | None = None, *, wait_lock: float = 0.0,
        reason: str = "", args: list[str] | None = None,
    ) -> tuple[DeployRequest, DeploymentRow, DeploymentRow]:  # fmt: skip
        """The rollback of deployment ``target`` (an id), or of the latest deployment of
        pipeline ``target`` in ``environment``: the request, the deployment rolled back and the
        one whose version comes back.

        :raises RollbackRefused: ``rollback=False``. :raises NoPreviousDeployment: nothing to
            return to. :raises DeploymentNotFound, UsageError: no such deployment.
        """
        store = self.store()
        if environment is not None:
            x = store.latest(str(target), environment)
        elif isinstance(target, int) or target.isdigit():
            x = store.get(int(target))
        else:
            raise UsageError(f"{target!r} is not a deployment id; to name a pipeline, add -e ENV")
        check_rollback_allowed(self.session.pipeline(x["pipeline"]))
        goal = store.rollback_target(x["id"])
        req = rollback_request(x, x["id"], goal, wait_lock=wait_lock, args=args, reason=reason)
        return req, x, goal

    def retry(
        self, dep_id: int, *, wait_lock: float = 0.0, args: list[str] | None = None,
        from_start: bool = False,
    ) -> DeployRequest:  # fmt: skip
        """A new run of a failed, cancelled or interrupted deployment from its first unfinished
        stage, if the pipeline's stages up to there are still the same and nothing else was
        deployed there since; with ``from_start``, a new run of every stage."""
        from ._deploy import DeployRequest

        store = self.store()
        x = store.get(dep_id)
        if x["status"] not in RETRYABLE:
            raise UsageError(
                f"deployment {dep_id} is {x['status']}; only failed, cancelled or interrupted "
                "deployments can be retried"
            )
        stages = store.stages(dep_id)
        # A stage skipped with a note was done by the deployment this one retried.
        start = next(
            (s["idx"] for s in stages
             if s["status"] != Status.SUCCEEDED and not (s["status"] == Status.SKIPPED and s["note"])),
            0,
        )  # fmt: skip
        if from_start:
            start = 0
        elif start > 0:
            # What the stages before ``start`` did may have been undone since: resuming would
            # record this version as deployed while another one runs.
            since = store.latest(x["pipeline"], x["environment"])
            if since["id"] != dep_id:
                what = (
                    f"a rollback to {since['version']}" if since["rollback_of"]
                    else f"a deployment of {since['version']}"
                )  # fmt: skip
                raise UsageError(
                    f"deployment {since['id']} ({what}, {since['status']}) ran in "
                    f"{x['environment']} after deployment {dep_id}, so what {dep_id}'s first "
                    f"{start} stage(s) did may no longer be in place; run every stage again with "
                    f"`shipyard retry {dep_id} --from-start`, or deploy the version: "
                    f"`shipyard deploy {x['pipeline']} {x['version']} -e {x['environment']}`"
                )
        req = DeployRequest(
            pipeline=x["pipeline"], version=x["version"], environment=x["environment"],
            vars=dict(x["vars"]), retry_of=dep_id, start_stage=start, auto_rollback=True,
            wait_lock=wait_lock, args=args,
        )  # fmt: skip
        plan = self.plan(x["pipeline"], x["version"], x["environment"], req.vars)
        names = [s.name for s in plan.stages]
        old = [s["name"] for s in stages]
        if names[:start] != old[:start]:
            raise UsageError(
                f"the stages of {plan.pipeline.name!r} changed since deployment {dep_id} "
                f"({' -> '.join(old)} then, {' -> '.join(names)} now); deploy the version instead"
            )
        return req

    # -- control ----------------------------------------------------------------------------------

    def request_cancel(self, dep_id: int, *, user: str, reason: str = "") -> DeploymentRow:
        """Ask a running deployment (of any process) to stop; audited."""
        store = self.store()
        dep = store.get(dep_id)
        if dep["status"] not in ACTIVE:
            raise UsageError(f"deployment {dep_id} is not running (it is {dep['status']})")
        return store.request_cancel(dep_id, user=user, reason=reason)

    def wait_finished(self, dep_id: int, timeout: float | None) -> str | None:
        """Wait until the deployment is no longer running; its status, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status(dep_id)
            if status not in ACTIVE:
                return status
            if deadline is not None and time.monotonic() > deadline:
                return None
            time.sleep(0.1)

    def unlock(self, pipeline: str, environment: str, *, user: str, reason: str) -> LockRow | None:
        """Break a lock by hand (its deployment becomes ``interrupted``); audited."""
        return self.store(create=True).unlock(pipeline, environment, user=user, reason=reason)

    # -- reading ----------------------------------------------------------------------------------

    def status(self, dep_id: int) -> str:
        """The deployment's status now (a dead holder found on the way is marked so first)."""
        from ._liveness import repair

        store = self.store()
        repair(store, self.session.config.lock_lease)
        return store.get(dep_id)["status"]

    def get(self, dep_id: int) -> DeploymentRow:
        return self.store().get(dep_id)

    def document(self, dep_id: int, *, stages: bool = True) -> dict[str, Any]:
        """The JSON document of ``show --json`` and ``deploy --json`` (DESIGN §3)."""
        store = self.store()
        doc: dict[str, Any] = dict(store.get(dep_id))
        if stages:
            doc["stages"] = [
                {
                    "name": s["name"],
                    "status": s["status"],
                    "started_at": s["started_at"],
                    "finished_at": s["finished_at"],
                    "steps": [{k: st[k] for k in _STEP_KEYS} for st in s["steps"]],  # type: ignore[literal-required]
                }
                for s in store.stages(dep_id)
            ]
        return doc

    def history(
        self, *, pipeline: str | None = None, environment: str | None = None, limit: int = 20,
        statuses: tuple[str, ...] = (),
    ) -> list[DeploymentRow]:  # fmt: skip
        """Deployments, newest first; none when nothing was ever recorded."""
        store = self.read_store()
        if store is None:
            return []
        return store.deployments(
            pipeline=pipeline, environment=environment, statuses=statuses, limit=limit
        )

    def current(self, recent: int = 10) -> list[DeploymentRow]:
        """What ``status`` lists: every running deployment, then the latest others."""
        store = self.read_store()
        if store is None:
            return []
        running = store.deployments(statuses=tuple(ACTIVE), limit=100)
        seen = {r["id"] for r in running}
        return running + [d for d in store.deployments(limit=recent) if d["id"] not in seen]

    def audit_trail(self, dep_id: int) -> list[AuditRow]:
        return self.store().audit_trail(deployment_id=dep_id)

    def logs(self, dep_id: int, *, follow: bool = False, poll: float = 0.2) -> Iterator[LogRow]:
        """The deployment's log lines; with ``follow``, until it has ended and all are read."""
        store = self.store()
        store.get(dep_id)
        last = 0
        while True:
            rows = store.logs(dep_id, after=last)
            yield from rows
            if rows:
                last = rows[-1]["id"]
                continue
            if not follow:
                return
            if self.status(dep_id) not in ACTIVE:
                if not store.logs(dep_id, after=last, limit=1):
                    return
                continue
            time.sleep(poll)
