"""The public API for plugin authors: everything a built-in step type or notifier uses.

Shipyard's own plugins (``shipyard.plugins.*``, ``shipyard.contrib.*``) import nothing private
(a test enforces it), so a third-party plugin can do anything a built-in one does with this
module and the :mod:`shipyard` façade alone::

    from shipyard import sdk

    class Deploy(sdk.Step):
        kind = "ansible"

        def __init__(self, playbook: str, **options: object) -> None:
            step_options = {k: options.pop(k) for k in ("name", "timeout", "retries") if k in options}
            super().__init__(**step_options)
            sdk.reject_unknown_options(self, options)
            self.playbook = playbook

        async def run(self, context: sdk.StepContext) -> sdk.StepResult:
            context.log(f"running {self.playbook}")
            return sdk.StepResult(exit_code=0)

    @sdk.hookimpl
    def shipyard_register_step_types(registry: sdk.StepTypeRegistry) -> None:
        registry.add(Deploy)

Names load on first use, so importing this module costs nothing; the HTTP probe imports httpx
only when it probes. See docs/guides/plugin-authors.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from typing import Any

from ._lazy import lazy_exports as lazy_exports

if TYPE_CHECKING:
    from ._events import AnalysisFinished as AnalysisFinished
    from ._events import AnalysisStarted as AnalysisStarted
    from ._events import CanaryStepReached as CanaryStepReached
    from ._events import DeploymentFinished as DeploymentFinished
    from ._events import DeploymentStarted as DeploymentStarted
    from ._events import Event as Event
    from ._events import HostFinished as HostFinished
    from ._events import LogLine as LogLine
    from ._events import RollbackStarted as RollbackStarted
    from ._events import StageFinished as StageFinished
    from ._events import StageStarted as StageStarted
    from ._events import StepFinished as StepFinished
    from ._events import StepOutput as StepOutput
    from ._events import StepStarted as StepStarted
    from ._exceptions import DeploymentNotFound as DeploymentNotFound
    from ._exceptions import EnvironmentLocked as EnvironmentLocked
    from ._exceptions import HealthCheckFailed as HealthCheckFailed
    from ._exceptions import HistoryError as HistoryError
    from ._exceptions import LockLost as LockLost
    from ._exceptions import NoPreviousDeployment as NoPreviousDeployment
    from ._exceptions import PipelineDefinitionError as PipelineDefinitionError
    from ._exceptions import StepFailed as StepFailed
    from ._output import MAX_LINE as MAX_LINE
    from ._output import TAIL_LINES as TAIL_LINES
    from ._output import LineSplitter as LineSplitter
    from ._output import ThreadedFollower as ThreadedFollower
    from ._pipeline import Deployment as Deployment
    from ._pipeline import Step as Step
    from ._pipeline import reject_unknown_options as reject_unknown_options
    from ._plugins import NotifierRegistry as NotifierRegistry
    from ._plugins import ProviderRegistry as ProviderRegistry
    from ._plugins import StepTypeRegistry as StepTypeRegistry
    from ._plugins import hookimpl as hookimpl
    from ._probe import HttpProbe as HttpProbe
    from ._probe import ProbeReport as ProbeReport
    from ._probe import body_excerpt as body_excerpt
    from ._probe import classify_error as classify_error
    from ._probe import display_url as display_url
    from ._probe import probe_until_healthy as probe_until_healthy
    from ._probe import ssl_verify as ssl_verify
    from ._proc import children as children
    from ._proc import group_members as group_members
    from ._recorder import plan_of as plan_of
    from ._reports import Status as Status
    from ._reports import StepResult as StepResult
    from ._reports import parse_ts as parse_ts
    from ._reports import utcnow as utcnow
    from ._runner import StepContext as StepContext
    from ._secrets import Secret as Secret
    from ._secrets import cut_point as cut_point
    from ._secrets import mask as mask
    from ._secrets import register as _register
    from ._store import ArtifactRow as ArtifactRow
    from ._store import AuditRow as AuditRow
    from ._store import Begun as Begun
    from ._store import DeploymentCountRow as DeploymentCountRow
    from ._store import DeploymentInfo as DeploymentInfo
    from ._store import DeploymentRow as DeploymentRow
    from ._store import HistoryStore as HistoryStore
    from ._store import Liveness as Liveness
    from ._store import LockRow as LockRow
    from ._store import LogRecord as LogRecord
    from ._store import LogRow as LogRow
    from ._store import MeasurementRecord as MeasurementRecord
    from ._store import MeasurementRow as MeasurementRow
    from ._store import ProcessRef as ProcessRef
    from ._store import StagePlan as StagePlan
    from ._store import StageRow as StageRow
    from ._store import StepPlan as StepPlan
    from ._store import StepRow as StepRow
    from ._store import StoreNotFound as StoreNotFound
    from ._store import open_store as open_store
    from ._threads import BlockingCalls as BlockingCalls
    from ._threads import tail_text as tail_text
    from ._version import __version__ as __version__

    register_secrets = _register

#: Each public name and the private module (and name there) it comes from.
_LAZY: dict[str, tuple[str, str]] = {
    "BlockingCalls": ("shipyard._threads", "BlockingCalls"),
    "Deployment": ("shipyard._pipeline", "Deployment"),
    "Event": ("shipyard._events", "Event"),
    "HealthCheckFailed": ("shipyard._exceptions", "HealthCheckFailed"),
    "HttpProbe": ("shipyard._probe", "HttpProbe"),
    "LineSplitter": ("shipyard._output", "LineSplitter"),
    "LogLine": ("shipyard._events", "LogLine"),
    "MAX_LINE": ("shipyard._output", "MAX_LINE"),
    "NotifierRegistry": ("shipyard._plugins", "NotifierRegistry"),
    "ProviderRegistry": ("shipyard._plugins", "ProviderRegistry"),
    "PipelineDefinitionError": ("shipyard._exceptions", "PipelineDefinitionError"),
    "ProbeReport": ("shipyard._probe", "ProbeReport"),
    "Secret": ("shipyard._secrets", "Secret"),
    "Status": ("shipyard._reports", "Status"),
    "Step": ("shipyard._pipeline", "Step"),
    "StepContext": ("shipyard._runner", "StepContext"),
    "StepFailed": ("shipyard._exceptions", "StepFailed"),
    "StepResult": ("shipyard._reports", "StepResult"),
    "StepTypeRegistry": ("shipyard._plugins", "StepTypeRegistry"),
    "TAIL_LINES": ("shipyard._output", "TAIL_LINES"),
    "ThreadedFollower": ("shipyard._output", "ThreadedFollower"),
    "__version__": ("shipyard._version", "__version__"),
    "body_excerpt": ("shipyard._probe", "body_excerpt"),
    "children": ("shipyard._proc", "children"),
    "classify_error": ("shipyard._probe", "classify_error"),
    "cut_point": ("shipyard._secrets", "cut_point"),
    "display_url": ("shipyard._probe", "display_url"),
    "group_members": ("shipyard._proc", "group_members"),
    "hookimpl": ("shipyard._plugins", "hookimpl"),
    "mask": ("shipyard._secrets", "mask"),
    "parse_ts": ("shipyard._reports", "parse_ts"),
    "probe_until_healthy": ("shipyard._probe", "probe_until_healthy"),
    "register_secrets": ("shipyard._secrets", "register"),
    "reject_unknown_options": ("shipyard._pipeline", "reject_unknown_options"),
    "ssl_verify": ("shipyard._probe", "ssl_verify"),
    "tail_text": ("shipyard._threads", "tail_text"),
    "utcnow": ("shipyard._reports", "utcnow"),
    "AnalysisFinished": ("shipyard._events", "AnalysisFinished"),
    "AnalysisStarted": ("shipyard._events", "AnalysisStarted"),
    "CanaryStepReached": ("shipyard._events", "CanaryStepReached"),
    "HostFinished": ("shipyard._events", "HostFinished"),
    "ArtifactRow": ("shipyard._store", "ArtifactRow"),
    "MeasurementRecord": ("shipyard._store", "MeasurementRecord"),
    "MeasurementRow": ("shipyard._store", "MeasurementRow"),
    "AuditRow": ("shipyard._store", "AuditRow"),
    "lazy_exports": ("shipyard._lazy", "lazy_exports"),
    "Begun": ("shipyard._store", "Begun"),
    "DeploymentCountRow": ("shipyard._store", "DeploymentCountRow"),
    "DeploymentInfo": ("shipyard._store", "DeploymentInfo"),
    "DeploymentRow": ("shipyard._store", "DeploymentRow"),
    "HistoryStore": ("shipyard._store", "HistoryStore"),
    "Liveness": ("shipyard._store", "Liveness"),
    "LockRow": ("shipyard._store", "LockRow"),
    "LogRecord": ("shipyard._store", "LogRecord"),
    "LogRow": ("shipyard._store", "LogRow"),
    "ProcessRef": ("shipyard._store", "ProcessRef"),
    "StagePlan": ("shipyard._store", "StagePlan"),
    "StageRow": ("shipyard._store", "StageRow"),
    "StepPlan": ("shipyard._store", "StepPlan"),
    "StepRow": ("shipyard._store", "StepRow"),
    "StoreNotFound": ("shipyard._store", "StoreNotFound"),
    "open_store": ("shipyard._store", "open_store"),
    "plan_of": ("shipyard._recorder", "plan_of"),
    "DeploymentStarted": ("shipyard._events", "DeploymentStarted"),
    "RollbackStarted": ("shipyard._events", "RollbackStarted"),
    "StageStarted": ("shipyard._events", "StageStarted"),
    "StepStarted": ("shipyard._events", "StepStarted"),
    "StepOutput": ("shipyard._events", "StepOutput"),
    "StepFinished": ("shipyard._events", "StepFinished"),
    "StageFinished": ("shipyard._events", "StageFinished"),
    "DeploymentFinished": ("shipyard._events", "DeploymentFinished"),
    "HistoryError": ("shipyard._exceptions", "HistoryError"),
    "LockLost": ("shipyard._exceptions", "LockLost"),
    "EnvironmentLocked": ("shipyard._exceptions", "EnvironmentLocked"),
    "DeploymentNotFound": ("shipyard._exceptions", "DeploymentNotFound"),
    "NoPreviousDeployment": ("shipyard._exceptions", "NoPreviousDeployment"),
}

__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, {k: f"{m}:{a}" for k, (m, a) in _LAZY.items()})
