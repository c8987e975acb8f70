"""The store port: what the engine asks of a history store, and how one is chosen by URL.

:class:`HistoryStore` is the whole contract between Shipyard and a store: the runner, the
application layer and the CLI use nothing else, and a store written by a third party (a plugin
answering :func:`~shipyard.hookspecs.shipyard_store_open`) passes the same contract suite as
the built-in SQLite store (tests/store_contract.py).

The store only keeps records. It never looks at processes: whether the holder of a lock is
still alive is a question the caller answers with a :data:`Liveness` predicate, and stopping
what a dead deployment left running is done outside (see :mod:`shipyard._liveness`).

Rows come back as :class:`~typing.TypedDict` records, which are plain dicts at run time, so
the JSON documents of ``show --json`` and the dashboard are built from them directly.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import TYPE_CHECKING
from typing import Any
from typing import NamedTuple
from typing import Protocol
from typing import TypedDict
from typing import cast
from typing import runtime_checkable

from ._exceptions import HistoryError

if TYPE_CHECKING:
    from ._events import Event
    from ._plugins import ShipyardPluginManager
    from ._reports import Status


# -- what goes in ----------------------------------------------------------------------------------


class ProcessRef(TypedDict):
    """Who runs (or waits for) a deployment: enough to tell later whether it still lives."""

    pid: int | None
    host: str | None
    #: An identity of the process that changes when its pid is reused (Linux: start ticks).
    proc_start: str | None
    #: The last time it said it was alive (ISO 8601 UTC); across hosts the only sign of life.
    heartbeat_at: str | None


#: Answers "is the process behind this record dead?"; given to every store method that may
#: find a dead holder. Built by :func:`shipyard._liveness.dead_after` from the lock lease.
Liveness = Callable[[ProcessRef], bool]


class DeploymentInfo(TypedDict, total=False):
    """What is recorded about a new deployment besides its identity (the audit of DESIGN §4)."""

    user: str
    ci_actor: str | None
    pipelines_file: str | None
    file_hash: str | None
    git_commit: str | None
    args: list[str] | None
    vars: dict[str, str]
    shipyard_version: str


class StepPlan(NamedTuple):
    """A step as planned: recorded ``pending`` before the deployment runs."""

    name: str
    kind: str
    #: One line for ``show`` (already masked).
    description: str


class StagePlan(NamedTuple):
    """A stage as planned, with its steps."""

    name: str
    parallel: bool
    continue_on_failure: bool
    steps: Sequence[StepPlan]


class LogRecord(NamedTuple):
    """One log line to record; ``stage_index``/``step_index`` are None for Shipyard's own."""

    deployment_id: int
    stage_index: int | None
    step_index: int | None
    ts: float
    stream: str
    text: str


class Begun(NamedTuple):
    """The result of :meth:`HistoryStore.begin`."""

    #: The new deployment's id.
    id: int
    #: Deployments found dead holding the lock and marked ``interrupted`` on the way.
    interrupted: list[int]


# -- what comes out --------------------------------------------------------------------------------


class DeploymentRow(TypedDict):
    """One deployment, as ``history --json`` prints it (plus the audit fields)."""

    id: int
    pipeline: str
    version: str
    environment: str
    status: str
    started_at: str | None
    finished_at: str | None
    rollback_of: int | None
    retry_of: int | None
    error: str | None
    user: str | None
    ci_actor: str | None
    host: str | None
    pid: int | None
    pipelines_file: str | None
    file_hash: str | None
    git_commit: str | None
    args: list[str] | None
    vars: dict[str, str]
    shipyard_version: str | None
    stages_total: int | None
    current_stage: int | None
    cancel_requested: str | None


class StepRow(TypedDict):
    idx: int
    name: str
    kind: str
    description: str | None
    status: str
    attempts: int
    exit_code: int | None
    error: str | None
    warning: bool
    started_at: str | None
    finished_at: str | None


class StageRow(TypedDict):
    idx: int
    name: str
    status: str
    parallel: bool
    continue_on_failure: bool
    started_at: str | None
    finished_at: str | None
    #: Why the stage did not run here (a retry names the deployment that ran it).
    note: str | None
    steps: list[StepRow]


class LogRow(TypedDict):
    id: int
    stage_idx: int | None
    step_idx: int | None
    ts: float
    stream: str
    line: str
    #: The step's name, or None for Shipyard's own lines.
    step: str | None


class ArtifactRow(TypedDict):
    """What a step kept of its work (``StepContext.record_artifact``)."""

    stage_idx: int
    step_idx: int
    #: The names of the step and its stage in that deployment.
    stage: str | None
    step: str | None
    name: str
    content: str
    created_at: str


class MeasurementRecord(TypedDict):
    """One measurement of an analysis metric (``StepContext.record_measurement``)."""

    metric: str
    #: 1 for the first measurement of the metric in this step.
    n: int
    ts: str
    #: The value as JSON text (masked, at most 4 KiB), or None.
    value: str | None
    #: ``successful``, ``failed``, ``inconclusive`` or ``error``.
    outcome: str
    error: str | None
    dry_run: bool
    #: What the provider warned of (Prometheus ``warnings``, a value cut at 4 KiB), as a JSON
    #: list; None when nothing.
    warnings: str | None


class MeasurementRow(MeasurementRecord):
    """A recorded measurement, with the step it belongs to."""

    stage_idx: int
    step_idx: int
    #: The names of the step and its stage in that deployment.
    stage: str | None
    step: str | None


class GateRecord(TypedDict):
    """An approval gate a deployment stopped at (``HistoryStore.suspend``)."""

    stage_idx: int
    #: The gate stage's name.
    stage: str
    requested_at: str
    expires_at: str
    #: ``ApprovalStep.spec()``: approvers, required, self-approval, timeout, lock, ...
    spec: dict[str, Any]
    #: ``[stage name, [step kinds]]`` of every stage before the gate: what a resume must find.
    fingerprint: list[Any]
    #: What the pipeline is called with again on resume: vars, previous_version, rollback_of,
    #: restores (never secret values).
    context: dict[str, Any]


class ApprovalRow(TypedDict):
    """One decision on a gate (the append-only approvals record)."""

    id: int
    deployment_id: int
    stage_idx: int
    #: ``approve``, ``reject``, ``cancel`` (or ``expire``).
    decision: str
    user: str
    source: str | None
    comment: str | None
    choice: str | None
    host: str | None
    ci_run: str | None
    ts: str


class GateRow(GateRecord):
    #: ``waiting``, ``approved``, ``rejected``, ``cancelled``.
    status: str
    decided_at: str | None
    decisions: list[ApprovalRow]


class Decision(NamedTuple):
    """What :meth:`HistoryStore.decide` did."""

    #: ``resume``: approved, and this caller now runs the deployment (holding its lock);
    #: ``rejected``: this caller now ends it (``finish``, then its failure path);
    #: ``recorded``: an approval counted, more are needed; ``cancelled``: ended, lock freed.
    outcome: str
    approvals: int
    required: int


class AuditRow(TypedDict):
    id: int
    ts: str
    action: str
    deployment_id: int | None
    pipeline: str | None
    environment: str | None
    user: str
    host: str | None
    reason: str | None


class LockRow(TypedDict):
    pipeline: str
    environment: str
    deployment_id: int
    pid: int | None
    host: str | None
    proc_start: str | None
    user: str | None
    version: str
    acquired_at: str
    heartbeat_at: str
    #: The CI job holding it, where the CI system says (a link), else None.
    runner: str | None


class CommitRow(TypedDict):
    """A recorded commit's first succeeded deployment in one pipeline and environment."""

    pipeline: str
    environment: str
    #: As recorded: a sha, with ``-dirty`` when the tree had changes.
    git_commit: str
    #: When the first succeeded deployment of it there finished (ISO 8601 UTC).
    deployed_at: str
    #: How many succeeded deployments of it there are in the window.
    deployments: int


class StatsRows(TypedDict):
    """What ``shipyard stats`` reads of a window of the history, aggregated by the store
    (:meth:`HistoryStore.stats_rows`; the definitions are in docs/guides/dora.md)."""

    #: Deployments that are not rollbacks and ended ``succeeded`` or ``failed``.
    changes: int
    #: Of the changes, those that failed.
    failed: int
    #: Of the changes, the succeeded ones rolled back (another deployment has ``rollback_of``
    #: = it) or followed, next in their pipeline and environment, by a rollback.
    rolled_back: int
    #: Rollbacks (deployments with ``rollback_of``), whatever their status.
    rollbacks: int
    #: Succeeded changes, and the distinct days (UTC) they started on.
    succeeded: int
    days: int
    #: The first and last start in the window; None when nothing is there.
    first_at: str | None
    last_at: str | None
    #: One per outage, in seconds: from the end of its first failed or rolled-back deployment
    #: to the end of the next succeeded one in that pipeline and environment (the outage).
    restores: list[float]
    #: Failed or rolled-back deployments that nothing succeeded after (yet).
    unrestored: int
    #: Per recorded commit, pipeline and environment; only when asked (``commits=True``).
    commits: list[CommitRow]


class DeploymentCountRow(TypedDict):
    """The deployments of one pipeline, environment and status, with how long the finished ones
    took (:meth:`HistoryStore.deployment_counts`; the dashboard's ``/metrics``)."""

    pipeline: str
    environment: str
    status: str
    count: int
    #: Of them, those with a start and an end: how many, and their durations' sum (seconds).
    timed: int
    seconds: float
    #: Per bound of the ``buckets`` asked for (seconds, ascending): how many of the timed ones
    #: took at most that long (cumulative, as a Prometheus histogram counts).
    le: list[int]


# -- the port --------------------------------------------------------------------------------------


@runtime_checkable
class HistoryStore(Protocol):
    """The contract of a history store. Every method is atomic; every error is a
    :class:`~shipyard.HistoryError` (or the domain error named).

    A store may be used from several threads, one call at a time, and from many processes at
    once (the SQLite file is shared by every process of one machine; a server store by many
    machines): locks and ids must be right under that concurrency.
    """

    #: Where the store is, for messages (passwords masked).
    url: str
    #: A stable identity of the store's data (the same file or database gives the same text),
    #: used to tag a deployment's processes so that a later command finds them.
    identity: str

    def close(self) -> None:
        """Release the connection; the store is not used after."""

    # -- a deployment's life ------------------------------------------------------------------

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
        """Record a new ``running`` deployment and take its pipeline and environment's lock.

        Both or neither: when another live deployment holds the lock (or a live waiter queued
        before ``ticket``), nothing is recorded and :class:`~shipyard.EnvironmentLocked` names the
        holder. A holder that ``is_dead`` is marked ``interrupted`` and its lock taken over.

        ``lock_key``: the name the lock is taken under instead of the pipeline's, with the
        environment: :data:`ENVIRONMENT_LOCK` for one lock shared by every pipeline there (the
        lock row's ``pipeline`` is then that key; the queue of ``enqueue`` uses it too). The
        engine passes it only for such environments, so a store that predates it still works
        for every other.
        """
        ...

    def enqueue(self, pipeline: str, environment: str, owner: ProcessRef) -> int:
        """Join the first-come-first-served queue for a lock; returns the ticket."""
        ...

    def touch_ticket(self, ticket: int) -> None:
        """Say that the waiter holding ``ticket`` is still alive."""
        ...

    def dequeue(self, ticket: int) -> None:
        """Leave the queue (the waiter gave up)."""
        ...

    def record_plan(
        self, dep_id: int, stages: Sequence[StagePlan], start_stage: int = 0,
        note: str | None = None,
    ) -> None:  # fmt: skip
        """Record every stage and step ``pending``; those before ``start_stage`` ``skipped``
        with ``note`` saying why."""
        ...

    def record(
        self, transitions: Sequence[Event], logs: Sequence[LogRecord], *, durable: bool = False
    ) -> None:
        """Record stage and step transitions (the runner's ``StageStarted``, ``StageFinished``,
        ``StepStarted``, ``StepFinished`` events) and log lines, in one transaction.

        ``durable``: survive a power loss, not only a crash of the process.
        """
        ...

    def heartbeat(self, dep_id: int) -> str | None:
        """Renew the deployment's lock lease; return why it must stop, if it must: a cancel
        request (``user: reason``) or a lost lock (another process marked it ``interrupted``)."""
        ...

    def finish(
        self, dep_id: int, status: Status, error: str | None,
        transitions: Sequence[Event] = (), logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        """Record the final status durably with the last transitions and lines, mark stages
        and steps that never ran ``skipped`` (and those still running as ``status``), and free
        the lock. A deployment already ``interrupted`` by another process stays so."""
        ...

    def request_cancel(self, dep_id: int, *, user: str, reason: str = "") -> DeploymentRow:
        """Ask the running deployment to stop (seen at its next heartbeat); audited."""
        ...

    def unlock(self, pipeline: str, environment: str, *, user: str, reason: str) -> LockRow | None:
        """Break the lock by hand: its deployment becomes ``interrupted``; audited even when
        nothing was locked. Returns the lock that was broken."""
        ...

    def record_artifact(
        self, dep_id: int, stage_idx: int, step_idx: int, name: str, content: str
    ) -> None:
        """Keep ``content`` (text) as the artifact ``name`` of a step of ``dep_id``, replacing
        one of the same name; durable at return."""
        ...

    def artifacts(self, dep_id: int) -> list[ArtifactRow]:
        """The artifacts steps of ``dep_id`` recorded, in the order recorded."""
        ...

    def record_measurement(
        self, dep_id: int, stage_idx: int, step_idx: int, m: MeasurementRecord
    ) -> None:
        """Keep one measurement of an analysis step of ``dep_id``; durable at return."""
        ...

    def measurements(self, dep_id: int) -> list[MeasurementRow]:
        """The measurements the analysis steps of ``dep_id`` recorded, in the order taken."""
        ...

    def add_audit(self, action: str, dep_id: int, *, user: str, reason: str) -> None:
        """Record who did ``action`` to deployment ``dep_id`` and why."""
        ...

    def suspend(
        self, dep_id: int, gate: GateRecord, transitions: Sequence[Event] = (),
        logs: Sequence[LogRecord] = (),
    ) -> None:  # fmt: skip
        """Stop the running deployment at a gate, in one durable transaction: the last
        transitions and lines, the gate, status ``awaiting_approval``, the gate's stage and step
        ``waiting``. Its lock stays held by the gate (no process: never a dead holder) or, with
        ``spec["lock"] == "release"``, is freed."""
        ...

    def gate(self, dep_id: int) -> GateRow | None:
        """The latest gate of ``dep_id`` with its decisions (oldest first), or None."""
        ...

    def decide(
        self, dep_id: int, decision: str, *, user: str, comment: str = "",
        choice: str | None = None, source: str | None = None, owner: ProcessRef | None = None,
        is_dead: Liveness | None = None,
    ) -> Decision:  # fmt: skip
        """Record a decision on the waiting gate of ``dep_id``, atomically (exactly one caller
        resumes, however many decide at once).

        ``approve``: counted once per user; with enough approvals the deployment becomes
        ``running`` under ``owner`` and takes its lock (held by the gate, or taken again:
        :class:`~shipyard.EnvironmentLocked` if another deployment holds it, and nothing is
        recorded). ``reject``: ``running`` under ``owner``, for its ``finish``. ``cancel``:
        ``cancelled``, lock freed. :class:`~shipyard.ApprovalRefused` once it no longer waits,
        naming who decided."""
        ...

    def repair(self, is_dead: Liveness) -> list[int]:
        """Mark ``running``/``pending`` deployments whose process ``is_dead`` as
        ``interrupted``, free their locks and any lock left without a running deployment.
        Returns the ids marked. Cheap when nothing runs: every command calls it."""
        ...

    # -- questions ----------------------------------------------------------------------------

    def get(self, dep_id: int) -> DeploymentRow:
        """One deployment; :class:`~shipyard.DeploymentNotFound` names the ids there are."""
        ...

    def deployments(
        self, *, pipeline: str | None = None, environment: str | None = None,
        statuses: Sequence[str] = (), limit: int = 20,
    ) -> list[DeploymentRow]:  # fmt: skip
        """Deployments, newest first (by start time, then id)."""
        ...

    def stages(self, dep_id: int) -> list[StageRow]:
        """The stages of a deployment, each with its steps, in order."""
        ...

    def logs(self, dep_id: int, *, after: int = 0, limit: int = 10_000) -> list[LogRow]:
        """Log lines with an id above ``after``, oldest first."""
        ...

    def audit_trail(self, *, deployment_id: int | None = None, limit: int = 50) -> list[AuditRow]:
        """Audit records, newest first; all of them or one deployment's."""
        ...

    def locks(self) -> list[LockRow]:
        """The locks held now, by pipeline and environment."""
        ...

    def previous_version(self, pipeline: str, environment: str) -> str | None:
        """The version of the latest ``succeeded`` deployment there."""
        ...

    def rollback_target(self, dep_id: int) -> DeploymentRow:
        """The deployment a rollback of ``dep_id`` redeploys (DESIGN §4): the latest
        ``succeeded`` one of the same pipeline and environment that started before it, with
        another version, not itself rolled back. :class:`~shipyard.NoPreviousDeployment` says
        what was looked for and what is there instead."""
        ...

    def latest(self, pipeline: str, environment: str) -> DeploymentRow:
        """The latest deployment of ``pipeline`` in ``environment``."""
        ...

    def stats_rows(
        self, *, pipeline: str | None = None, environment: str | None = None,
        since: str | None = None, commits: bool = True,
    ) -> StatsRows:  # fmt: skip
        """The delivery figures of the deployments that started at or after ``since`` (ISO 8601
        UTC; None: all), of one pipeline and/or environment or all, aggregated by indexed
        queries (never every row to the caller). ``commits``: also the recorded commits."""
        ...

    def deployment_counts(self, *, buckets: Sequence[float] = ()) -> list[DeploymentCountRow]:
        """Every deployment counted by pipeline, environment and status (every status there
        is), with the durations of those that have a start and an end counted into
        ``buckets`` (upper bounds in seconds, ascending): one grouped query, ordered by
        pipeline, environment and status."""
        ...

    def change_token(self) -> object | None:
        """Something that differs after any committed write to the store, by any connection of
        any process (this one's included), compared with ``==``: a reader re-reads only when it
        moved. Cheap enough to ask ten times a second: it reads no table. It may also move
        without a write to this store (a server store's may move with any write on the server),
        never stay the same across one. None: this store cannot tell (the caller then re-reads
        at its own pace)."""
        ...


#: The lock key of an environment-wide lock (``shipyard.environment(lock="environment")``):
#: every pipeline deploying there with that setting takes this one lock.
ENVIRONMENT_LOCK = "*"


def _locked(h: Mapping[str, Any]) -> tuple[str, str, str]:
    """What is locked, whose deployment holds it, and the pipeline to name to unlock it."""
    if h["pipeline"] == ENVIRONMENT_LOCK:
        of = h.get("holder_pipeline") or "?"
        return (f"{h['environment']!r} (one lock for every pipeline, lock='environment')",
                f" of pipeline {of!r}", of)  # fmt: skip
    return f"{h['pipeline']!r} in {h['environment']!r}", "", h["pipeline"]


def locked_message(h: Mapping[str, Any]) -> str:
    """Why a deployment may not start: who holds the lock, and what to do (every store)."""
    runner = f", runner {h['runner']}" if h.get("runner") else ""
    what, of, name = _locked(h)
    return (
        f"{what} is locked by deployment {h['deployment_id']}{of} "
        f"(version {h['version']}, by {h['user']} on {h['host']}, pid {h['pid']}{runner}, since "
        f"{h['acquired_at']}); wait with --wait-lock SECONDS, or if it is stuck run "
        f"`shipyard unlock {name} -e {h['environment']} --reason TEXT`"
    )


def gate_locked_message(
    h: Mapping[str, Any], *, requested_at: str | None, expires_at: str | None, stage: str | None
) -> str:
    """Why a deployment may not start: the lock is held by one awaiting approval."""
    dep = h["deployment_id"]
    what, of, _ = _locked(h)
    return (
        f"{what} is held by deployment {dep}{of} (version "
        f"{h['version']}), awaiting approval at stage {stage!r} since {requested_at} (expires "
        f"{expires_at}); decide it first: `shipyard approve {dep}`, `shipyard reject {dep} "
        f"--comment TEXT` or `shipyard cancel {dep}`"
    )


def decided_message(dep_id: int, status: str | None, last: Sequence[Any] | None) -> str:
    """Why a decision on ``dep_id`` is refused: it does not wait (any more), and who decided."""
    if status is None:
        return f"deployment {dep_id} does not exist"
    if last:
        return (
            f"deployment {dep_id} was already decided: {last[0]} by {last[1]} at {last[2]} "
            f"(it is {status} now)"
        )
    return f"deployment {dep_id} is {status}; it awaits no approval"


class StoreNotFound(HistoryError):
    """There is no store at that URL yet, and it was opened only to read."""


def decode_deployment(row: dict[str, Any]) -> DeploymentRow:
    """A deployments row as the port returns it: ``vars`` and ``args`` decoded from JSON."""
    for key in ("vars", "args"):
        if row.get(key):
            row[key] = json.loads(row[key])
    row["vars"] = row.get("vars") or {}
    return cast("DeploymentRow", row)


def process_ref(row: Mapping[str, Any]) -> ProcessRef:
    """The process recorded in a deployments, locks or queue row."""
    return {
        "pid": row.get("pid"),
        "host": row.get("host"),
        "proc_start": row.get("proc_start"),
        "heartbeat_at": row.get("heartbeat_at"),
    }


# -- choosing a store ------------------------------------------------------------------------------

#: The schemes Shipyard itself opens; others are asked of the plugins.
BUILTIN_SCHEMES = ("sqlite", "postgresql")


#: Variables by which CI systems say a job runs on one of their runners.
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "BUILDKITE", "CIRCLECI", "JENKINS_URL",
                "TF_BUILD", "TEAMCITY_VERSION", "BITBUCKET_BUILD_NUMBER")  # fmt: skip


def ephemeral_warning(url: str, chosen: bool, environ: Mapping[str, str]) -> str | None:
    """The warning for a deploy on a CI runner whose history is a local SQLite file that was
    not chosen explicitly: history and locks die with the runner. None otherwise."""
    if chosen or scheme_of(url) != "sqlite":
        return None
    ci = next((v for v in CI_VARIABLES if environ.get(v) not in (None, "", "0", "false")), None)
    if ci is None:
        return None
    return (
        f"warning: {ci} is set, and the history is the local file {url}: on a CI runner that "
        "does not keep its disk, the history (what `rollback` needs) and the lock die with the "
        "job. Use a shared store (--store postgresql://...), or set SHIPYARD_STORE to this file "
        "to say it stays; see docs/guides/choosing-a-store.md"
    )


def is_builtin(url: str) -> bool:
    """Whether Shipyard opens ``url`` itself (no plugin needs loading)."""
    return scheme_of(url) in ("sqlite", "postgresql", "postgres")


def scheme_of(url: str) -> str:
    """``"sqlite"`` for a plain path, else the URL's scheme."""
    if "://" not in url:
        return "sqlite"
    return url.split("://", 1)[0].lower()


def open_store(
    url: str, *, create: bool = True, pluginmanager: ShipyardPluginManager | None = None
) -> HistoryStore:
    """Open the store named by ``url``: a file path, ``sqlite:///path``, ``postgresql://…``
    (the extra ``shipyard[postgres]``), or a scheme that a plugin opens (:func:`~shipyard.hookspecs.shipyard_store_open`, first result wins).

    :param create: create an empty store when there is none (commands that only read pass
        False, and get a :class:`~shipyard.HistoryError` saying nothing was deployed yet).
    :raises HistoryError: an unsupported scheme (naming the supported ones), not a Shipyard
        history, a newer schema, unwritable.
    """
    scheme = scheme_of(url)
    if scheme == "sqlite":
        from ._sqlite import SQLiteStore

        path = url[len("sqlite://") :] if url.startswith("sqlite://") else url
        return SQLiteStore(path, create=create)
    if scheme in ("postgresql", "postgres"):
        from ._postgres import PostgresStore  # psycopg is imported only now

        return PostgresStore(url, create=create)
    store: Any = None
    offered: list[str] = []
    if pluginmanager is not None:
        store = pluginmanager.open_store(url, create=create)
        offered = pluginmanager.store_schemes()
    if store is None:
        from ._secrets import mask_url

        supported = ", ".join(f"{s}://" for s in [*BUILTIN_SCHEMES, *offered])
        raise HistoryError(
            f"history {mask_url(url)!r}: no store for the scheme {scheme!r}; supported: a file "
            f"path, {supported} (a plugin may add others)"
        )
    if not isinstance(store, HistoryStore):
        missing = sorted(
            name for name in dir(HistoryStore)
            if not name.startswith("_") and not hasattr(store, name)
        )  # fmt: skip
        raise HistoryError(
            f"history {scheme}://: the plugin's store {type(store).__name__} does not implement "
            f"shipyard.sdk.HistoryStore (missing: {', '.join(missing) or '?'}); upgrade the "
            "plugin that provides it"
        )
    return store


HistoryStore.__module__ = "shipyard"
