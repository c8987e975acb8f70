"""The one event stream of a deployment.

The runner emits events; the history, the console, the notifiers and the plugin hooks all receive
the same objects in the same order, so they can never disagree.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING
from typing import Any
from typing import ClassVar
from typing import NamedTuple
from typing import Protocol

from ._reports import Status
from ._reports import StepResult
from ._reports import utcnow

if TYPE_CHECKING:
    from ._pipeline import Deployment
    from ._pipeline import Stage
    from ._pipeline import Step
    from ._plugins import ShipyardPluginManager


class LogLine(NamedTuple):
    """One line of output: when (epoch seconds), which stream, and the text (masked)."""

    ts: float
    stream: str
    text: str


LogLine.__module__ = "shipyard"


@dataclass(kw_only=True, eq=False)
class Event:
    """Base class of deployment events. Treat them as read-only: every listener gets the same
    object. (Not frozen dataclasses: those cost several times more to build, once per event.)"""

    #: The hook that carries this event to plugins.
    hook: ClassVar[str] = ""
    deployment: Deployment
    ts: str = field(default_factory=utcnow)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description, the payload of notifications."""
        d = self.deployment
        return {
            "event": self.hook.removeprefix("shipyard_"),
            "ts": self.ts,
            "deployment": {
                "id": d.id,
                "pipeline": d.pipeline,
                "version": d.version,
                "environment": d.environment,
                "rollback_of": d.rollback_of,
            },
        }


Event.__module__ = "shipyard"


@dataclass(kw_only=True, eq=False)
class DeploymentStarted(Event):
    hook = "shipyard_deployment_started"
    stages: list[Stage]
    start_stage: int = 0
    #: Why stages before ``start_stage`` do not run (a retry names the deployment that ran them).
    note: str | None = None
    #: Resumed after an approval: the same deployment goes on at ``start_stage``.
    resumed: bool = False

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["status"] = Status.RUNNING.value
        out["stages"] = [s.name for s in self.stages]
        if self.resumed:
            out["resumed"] = True
        return out


@dataclass(kw_only=True, eq=False)
class RollbackStarted(Event):
    hook = "shipyard_rollback_started"
    target: str
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(target_version=self.target, reason=self.reason)
        return out


@dataclass(kw_only=True, eq=False)
class StageStarted(Event):
    hook = "shipyard_stage_started"
    index: int
    total: int
    stage: Stage

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage.name, stage_index=self.index, stages_total=self.total)
        out["status"] = Status.RUNNING.value
        return out


@dataclass(kw_only=True, eq=False)
class StepStarted(Event):
    hook = "shipyard_step_started"
    stage: Stage
    stage_index: int
    index: int
    step: Step

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage.name, step=self.step.name, kind=self.step.kind)
        out["status"] = Status.RUNNING.value
        return out


@dataclass(kw_only=True, eq=False)
class StepOutput(Event):
    hook = "shipyard_step_output"
    stage_index: int
    index: int
    step: Step
    lines: list[LogLine]

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(step=self.step.name, lines=[ln.text for ln in self.lines])
        return out


@dataclass(kw_only=True, eq=False)
class StepFinished(Event):
    hook = "shipyard_step_finished"
    stage: Stage
    stage_index: int
    index: int
    step: Step
    result: StepResult

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        r = self.result
        out.update(
            stage=self.stage.name,
            step=self.step.name,
            kind=self.step.kind,
            status=str(r.status),
            attempts=r.attempts,
            exit_code=r.exit_code,
            error=r.error,
            warning=r.warning,
            started_at=r.started_at,
            finished_at=r.finished_at,
        )
        return out


@dataclass(kw_only=True, eq=False)
class StageFinished(Event):
    hook = "shipyard_stage_finished"
    index: int
    stage: Stage
    status: Status

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage.name, stage_index=self.index, status=str(self.status))
        return out


@dataclass(kw_only=True, eq=False)
class DeploymentFinished(Event):
    hook = "shipyard_deployment_finished"
    status: Status
    error: str | None = None
    started_at: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(status=str(self.status), error=self.error, started_at=self.started_at)
        out["finished_at"] = self.ts
        return out


@dataclass(kw_only=True, eq=False)
class DeploymentSuspended(Event):
    """The deployment stopped at an approval gate: it awaits a decision, with no process."""

    hook = "shipyard_deployment_suspended"
    #: The gate's stage.
    index: int
    stage: Stage
    #: The approval step (``shipyard.plugins.approval.ApprovalStep``).
    gate: Any
    requested_at: str
    expires_at: str

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        d = self.deployment
        out.update(
            status=Status.AWAITING_APPROVAL.value, stage=self.stage.name, stage_index=self.index,
            requested_at=self.requested_at, expires_at=self.expires_at,
            gate=self.gate.spec(), commands=_decide_commands(d.id),
        )  # fmt: skip
        return out


def _decide_commands(dep_id: int) -> dict[str, str]:
    return {"approve": f"shipyard approve {dep_id}",
            "reject": f"shipyard reject {dep_id} --comment TEXT"}  # fmt: skip


@dataclass(kw_only=True, eq=False)
class ApprovalDecided(Event):
    """Someone decided the gate a deployment waits at (sent by the deciding process)."""

    hook = "shipyard_approval_decided"
    #: The gate's stage name.
    stage: str
    #: ``approve``, ``reject``, ``cancel``, ``supersede``.
    decision: str
    user: str
    comment: str = ""
    choice: str | None = None
    #: ``resume``, ``recorded`` (more approvals needed), ``rejected``, ``cancelled``,
    #: ``superseded``.
    outcome: str = ""
    approvals: int = 0
    required: int = 1
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            stage=self.stage, decision=self.decision, user=self.user, comment=self.comment,
            choice=self.choice, outcome=self.outcome, approvals=self.approvals,
            required=self.required, source=self.source,
        )  # fmt: skip
        if self.outcome == "recorded":
            out["commands"] = _decide_commands(self.deployment.id)
        return out


@dataclass(kw_only=True, eq=False)
class ApprovalExpired(Event):
    """A gate's time ran out; its default outcome was applied."""

    hook = "shipyard_approval_expired"
    stage: str
    expires_at: str
    #: ``approved`` or ``rejected``.
    outcome: str

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage, expires_at=self.expires_at, outcome=self.outcome)
        return out


@dataclass(kw_only=True, eq=False)
class ApprovalReminder(Event):
    """A gate with ``remind_every`` still waits for a decision."""

    hook = "shipyard_approval_reminder"
    stage: str
    requested_at: str
    expires_at: str
    #: Approvals so far and how many are required.
    approvals: int = 0
    required: int = 1

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            status=Status.AWAITING_APPROVAL.value, stage=self.stage,
            requested_at=self.requested_at, expires_at=self.expires_at,
            approvals=self.approvals, required=self.required,
            commands=_decide_commands(self.deployment.id),
        )  # fmt: skip
        return out


@dataclass(kw_only=True, eq=False)
class AnalysisStarted(Event):
    """An analysis step starts measuring (``sy.analysis``): its metrics, as ``plan`` shows them.
    Single measurements are no event: they go to the step's log and the history only."""

    hook = "shipyard_analysis_started"
    stage: str
    stage_index: int
    index: int
    step: str
    #: Per metric: ``metric``, ``provider``, ``description``, ``conditions``, ``count``,
    #: ``interval``, ``dry_run``.
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage, stage_index=self.stage_index, step=self.step,
                   metrics=self.metrics)  # fmt: skip
        return out


@dataclass(kw_only=True, eq=False)
class AnalysisFinished(Event):
    """An analysis step decided (or was stopped): the verdict, what it does about it, and a
    summary per metric."""

    hook = "shipyard_analysis_finished"
    stage: str
    stage_index: int
    index: int
    step: str
    #: ``successful``, ``failed``, ``inconclusive``, ``error``, or None when stopped first.
    verdict: str | None
    #: What follows: ``continue``, ``fail``, ``wait for approval``, ``stopped``.
    outcome: str
    #: One line: each deciding metric's verdict and counts (and the dry-run ones).
    summary: str
    #: Per metric: ``metric``, ``verdict``, ``counts``, ``dry_run``.
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage, stage_index=self.stage_index, step=self.step,
                   verdict=self.verdict, outcome=self.outcome, summary=self.summary,
                   metrics=self.metrics)  # fmt: skip
        return out


@dataclass(kw_only=True, eq=False)
class CanaryStepReached(Event):
    """A canary moved the traffic of a service to its next step (``sy.canary``)."""

    hook = "shipyard_canary_step_reached"
    stage: str
    stage_index: int
    index: int
    step: str
    service: str
    #: The new version's share of the traffic now, in percent.
    percent: int
    #: The container names of the new version and of the old one.
    new: str
    old: str
    #: The router's weights, by host port (as text: JSON keys).
    weights: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage, stage_index=self.stage_index, step=self.step,
                   service=self.service, percent=self.percent, new=self.new, old=self.old,
                   weights=self.weights)  # fmt: skip
        return out


@dataclass(kw_only=True, eq=False)
class HostFinished(Event):
    """One action of a fleet step on one host ended (``sy.ssh``, ``sy.upload``, ...): applying
    the step, reverting it, or re-checking the host's health between batches.

    Sent to plugins and core listeners, never to notification sinks (a fleet of 100 hosts would
    be 100 chat messages): the step's log and its ``hosts`` artifact already say it all."""

    hook = "shipyard_host_finished"
    stage: str
    stage_index: int
    index: int
    step: str
    #: ``address:port`` as the step's output shows it.
    host: str
    address: str
    port: int
    group: str
    region: str | None
    #: ``apply``, ``revert`` or ``check``.
    action: str
    attempt: int
    #: ``succeeded``, ``failed`` or ``cancelled``.
    status: str
    exit_code: int | None
    error: str | None
    #: Seconds since the epoch.
    started_at: float
    finished_at: float

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(stage=self.stage, stage_index=self.stage_index, step=self.step,
                   host=self.host, address=self.address, port=self.port, group=self.group,
                   region=self.region, action=self.action, attempt=self.attempt,
                   status=self.status, exit_code=self.exit_code, error=self.error,
                   started_at=self.started_at, finished_at=self.finished_at)  # fmt: skip
        return out


class Listener(Protocol):
    """A core consumer of events (history, console, notifier dispatcher)."""

    def handle(self, event: Event) -> None: ...


class EventBus:
    """Delivers each event to the core listeners, in order, then to the plugin hooks.

    A core listener's exception propagates (the history must not silently lose records);
    a plugin hook's exception is reported through ``on_hook_error`` and never fails the deployment.
    """

    def __init__(
        self,
        listeners: list[Listener],
        pluginmanager: ShipyardPluginManager | None = None,
    ) -> None:
        self.listeners = listeners
        self.pm = pluginmanager
        self.errors: list[str] = []
        self._hook_cache: dict[str, Any] = {}

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener.handle(event)
        if self.pm is None:
            return
        hook = self._hook_cache.get(event.hook)
        if hook is None:
            hook = self._hook_cache[event.hook] = getattr(self.pm.hook, event.hook)
        if not hook.get_hookimpls():
            return
        try:
            hook(event=event)
        except Exception as exc:  # a plugin's bug must not fail the deployment
            self.on_hook_error(event, exc)

    def on_hook_error(self, event: Event, exc: Exception) -> None:
        from ._secrets import mask

        text = mask(f"plugin hook {event.hook} raised {type(exc).__name__}: {exc}")
        self.errors.append(text)
        print(f"shipyard: warning: {text}", file=sys.stderr)
        for listener in self.listeners:
            note = getattr(listener, "note", None)
            if note is not None:
                note(event.deployment.id, text)
