"""Shipyard: deployment pipelines written in Python.

This façade is the only documented import path. Names load lazily on first use, so
``import shipyard`` in a pipelines file costs almost nothing and ``shipyard --help`` stays fast.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports
from ._version import __version__ as __version__

if TYPE_CHECKING:
    from . import plugins as _plugins_pkg
    from ._deploy import DeployRequest as DeployRequest
    from ._environments import Environment as Environment
    from ._environments import environment as environment
    from ._events import Event as Event
    from ._events import LogLine as LogLine
    from ._exceptions import ApprovalRefused as ApprovalRefused
    from ._exceptions import DeploymentError as DeploymentError
    from ._exceptions import DeploymentNotFound as DeploymentNotFound
    from ._exceptions import EnvironmentLocked as EnvironmentLocked
    from ._exceptions import ExitCode as ExitCode
    from ._exceptions import HealthCheckFailed as HealthCheckFailed
    from ._exceptions import HistoryError as HistoryError
    from ._exceptions import NoPreviousDeployment as NoPreviousDeployment
    from ._exceptions import PipelineChanged as PipelineChanged
    from ._exceptions import PipelineDefinitionError as PipelineDefinitionError
    from ._exceptions import PipelineFileError as PipelineFileError
    from ._exceptions import PipelineNotFound as PipelineNotFound
    from ._exceptions import PromotionRefused as PromotionRefused
    from ._exceptions import RollbackRefused as RollbackRefused
    from ._exceptions import SecretMissing as SecretMissing
    from ._exceptions import ShipyardError as ShipyardError
    from ._exceptions import ShipyardWarning as ShipyardWarning
    from ._exceptions import StepFailed as StepFailed
    from ._exceptions import UsageError as UsageError
    from ._exceptions import fail as fail
    from ._exceptions import skip as skip
    from ._manager import DeploymentManager as DeploymentManager
    from ._pipeline import Deployment as Deployment
    from ._pipeline import Pipeline as Pipeline
    from ._pipeline import Stage as Stage
    from ._pipeline import Step as Step
    from ._pipeline import pipeline as pipeline
    from ._pipeline import stage as stage
    from ._plugins import hookimpl as hookimpl
    from ._reports import Status as Status
    from ._reports import StepResult as StepResult
    from ._runner import StepContext as StepContext
    from ._secrets import Secret as Secret
    from ._secrets import secret as secret
    from ._store import HistoryStore as HistoryStore
    from .hookspecs import hookspec as hookspec
    from .plugins.analysis import above as above
    from .plugins.analysis import analysis as analysis
    from .plugins.analysis import below as below
    from .plugins.analysis import between as between
    from .plugins.analysis import equals as equals
    from .plugins.analysis import http_json as http_json
    from .plugins.analysis import metric as metric
    from .plugins.analysis import prometheus as prometheus
    from .plugins.analysis import python_metric as python_metric
    from .plugins.approval import approval as approval
    from .plugins.canary import canary as canary
    from .plugins.canary import route as route
    from .plugins.command import command as command
    from .plugins.docker import docker as docker
    from .plugins.healthcheck import health_check as health_check
    from .plugins.kubernetes import kubernetes as kubernetes
    from .plugins.nginx import nginx as nginx
    from .plugins.notify import console as console
    from .plugins.notify import jsonl as jsonl
    from .plugins.notify import webhook as webhook
    from .plugins.python import python as python
    from .plugins.ssh import hosts as hosts
    from .plugins.ssh import inventory as inventory
    from .plugins.ssh import ssh as ssh
    from .plugins.ssh import upload as upload
    from .plugins.ssh import waves as waves
    from .plugins.wait import wait as wait

_LAZY: dict[str, str] = {
    "environment": "shipyard._environments",
    "Environment": "shipyard._environments",
    "PromotionRefused": "shipyard._exceptions",
    "approval": "shipyard.plugins.approval",
    "above": "shipyard.plugins.analysis",
    "analysis": "shipyard.plugins.analysis",
    "below": "shipyard.plugins.analysis",
    "between": "shipyard.plugins.analysis",
    "equals": "shipyard.plugins.analysis",
    "http_json": "shipyard.plugins.analysis",
    "metric": "shipyard.plugins.analysis",
    "prometheus": "shipyard.plugins.analysis",
    "python_metric": "shipyard.plugins.analysis",
    "canary": "shipyard.plugins.canary",
    "route": "shipyard.plugins.canary",
    "ApprovalRefused": "shipyard._exceptions",
    "PipelineChanged": "shipyard._exceptions",
    "Deployment": "shipyard._pipeline",
    "DeploymentError": "shipyard._exceptions",
    "DeploymentManager": "shipyard._manager",
    "DeploymentNotFound": "shipyard._exceptions",
    "DeployRequest": "shipyard._deploy",
    "EnvironmentLocked": "shipyard._exceptions",
    "Event": "shipyard._events",
    "ExitCode": "shipyard._exceptions",
    "HealthCheckFailed": "shipyard._exceptions",
    "HistoryError": "shipyard._exceptions",
    "HistoryStore": "shipyard._store",
    "LogLine": "shipyard._events",
    "NoPreviousDeployment": "shipyard._exceptions",
    "Pipeline": "shipyard._pipeline",
    "PipelineDefinitionError": "shipyard._exceptions",
    "PipelineFileError": "shipyard._exceptions",
    "PipelineNotFound": "shipyard._exceptions",
    "RollbackRefused": "shipyard._exceptions",
    "Secret": "shipyard._secrets",
    "SecretMissing": "shipyard._exceptions",
    "ShipyardError": "shipyard._exceptions",
    "ShipyardWarning": "shipyard._exceptions",
    "Stage": "shipyard._pipeline",
    "Status": "shipyard._reports",
    "Step": "shipyard._pipeline",
    "StepContext": "shipyard._runner",
    "StepFailed": "shipyard._exceptions",
    "StepResult": "shipyard._reports",
    "UsageError": "shipyard._exceptions",
    "command": "shipyard.plugins.command",
    "console": "shipyard.plugins.notify",
    "docker": "shipyard.plugins.docker",
    "health_check": "shipyard.plugins.healthcheck",
    "hookimpl": "shipyard._plugins",
    "hookspec": "shipyard.hookspecs",
    "jsonl": "shipyard.plugins.notify",
    "kubernetes": "shipyard.plugins.kubernetes",
    "nginx": "shipyard.plugins.nginx",
    "pipeline": "shipyard._pipeline",
    "python": "shipyard.plugins.python",
    "hosts": "shipyard.plugins.ssh",
    "inventory": "shipyard.plugins.ssh",
    "ssh": "shipyard.plugins.ssh",
    "upload": "shipyard.plugins.ssh",
    "waves": "shipyard.plugins.ssh",
    "skip": "shipyard._exceptions",
    "fail": "shipyard._exceptions",
    "secret": "shipyard._secrets",
    "stage": "shipyard._pipeline",
    "wait": "shipyard.plugins.wait",
    "webhook": "shipyard.plugins.notify",
}

__all__ = sorted([*_LAZY, "__version__"])


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
