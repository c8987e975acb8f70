"""The public names of ``shipyard``: pinned, sorted, each one importable."""

from __future__ import annotations

import inspect

import pytest
import shipyard

#: Adding a name here is adding public API: it needs docs and a changelog entry.
EXPECTED = [
    "ApprovalRefused",
    "DeployRequest",
    "Deployment",
    "DeploymentError",
    "DeploymentManager",
    "DeploymentNotFound",
    "Environment",
    "EnvironmentLocked",
    "Event",
    "ExitCode",
    "HealthCheckFailed",
    "HistoryError",
    "HistoryStore",
    "LogLine",
    "NoPreviousDeployment",
    "Pipeline",
    "PipelineChanged",
    "PipelineDefinitionError",
    "PipelineFileError",
    "PipelineNotFound",
    "PromotionRefused",
    "RollbackRefused",
    "Secret",
    "SecretMissing",
    "ShipyardError",
    "ShipyardWarning",
    "Stage",
    "Status",
    "Step",
    "StepContext",
    "StepFailed",
    "StepResult",
    "UsageError",
    "__version__",
    "above",
    "analysis",
    "approval",
    "below",
    "between",
    "canary",
    "command",
    "console",
    "docker",
    "environment",
    "equals",
    "fail",
    "health_check",
    "hookimpl",
    "hookspec",
    "hosts",
    "http_json",
    "inventory",
    "jsonl",
    "kubernetes",
    "metric",
    "nginx",
    "pipeline",
    "prometheus",
    "python",
    "python_metric",
    "route",
    "secret",
    "skip",
    "ssh",
    "stage",
    "upload",
    "wait",
    "waves",
    "webhook",
]


def test_all_is_pinned():
    assert shipyard.__all__ == EXPECTED


def test_all_is_sorted():
    assert sorted(shipyard.__all__) == shipyard.__all__


@pytest.mark.parametrize("name", EXPECTED)
def test_every_public_name_resolves(name):
    assert getattr(shipyard, name) is not None


def test_dir_is_the_public_names():
    assert dir(shipyard) == shipyard.__all__


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="module 'shipyard' has no attribute 'nope'"):
        shipyard.nope  # noqa: B018 - the attribute access is the test


@pytest.mark.parametrize(
    "name", [n for n in EXPECTED if n[0].isupper() and inspect.isclass(getattr(shipyard, n))]
)
def test_public_classes_report_module_shipyard(name):
    # Reprs and tracebacks say shipyard.X, the only documented import path (STYLE §1).
    assert getattr(shipyard, name).__module__ == "shipyard"


def test_version_is_the_distribution_version():
    from importlib.metadata import version

    assert shipyard.__version__ == version("shipyard")
