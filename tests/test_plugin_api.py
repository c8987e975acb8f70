"""The plugin author's API: ``shipyard.sdk`` is all a built-in plugin uses, so a third party can
do whatever a built-in plugin does.

The built-in plugins (``plugins/``, ``contrib/``) are read as source: any import of a private
module (``shipyard._*``) or of another plugin fails here, naming the file and line. The names of
the SDK are pinned, so removing or renaming one is a deliberate change of the public API.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = [REPO / "plugins", REPO / "contrib"]

#: The public API of shipyard.sdk. Adding a name is a feature; removing one breaks plugins.
SDK_NAMES = {
    # step types and notifiers
    "Step", "StepContext", "StepResult", "StepFailed", "StepTypeRegistry", "NotifierRegistry",
    "ProviderRegistry", "AnalysisStarted", "AnalysisFinished",
    "CanaryStepReached",
    "HostFinished",
    "PipelineDefinitionError", "HealthCheckFailed", "Deployment", "Status", "hookimpl",
    "reject_unknown_options", "__version__",
    # output, processes and threads
    "Event", "LogLine", "LineSplitter", "MAX_LINE", "TAIL_LINES", "ThreadedFollower",
    "BlockingCalls", "tail_text", "children", "group_members",
    # secrets and time
    "Secret", "mask", "cut_point", "register_secrets", "parse_ts", "utcnow",
    # the HTTP probe
    "HttpProbe", "ProbeReport", "probe_until_healthy", "body_excerpt", "classify_error",
    "display_url", "ssl_verify",
    # packages that import their modules on first use
    "lazy_exports",
    # the store port
    "HistoryStore", "Begun", "DeploymentInfo", "DeploymentRow", "StageRow", "StepRow", "LogRow",
    "ArtifactRow", "AuditRow", "LockRow", "LogRecord", "ProcessRef", "Liveness", "StagePlan", "StepPlan",
    "MeasurementRecord", "MeasurementRow", "DeploymentCountRow",
    "StoreNotFound", "open_store", "plan_of", "HistoryError", "LockLost", "EnvironmentLocked",
    "DeploymentNotFound", "NoPreviousDeployment",
    # the events a store records
    "DeploymentStarted", "RollbackStarted", "StageStarted", "StepStarted", "StepOutput",
    "StepFinished", "StageFinished", "DeploymentFinished",
}  # fmt: skip


def plugin_files() -> list[Path]:
    return sorted(p for d in PLUGIN_DIRS for p in d.rglob("*.py"))


def plugin_of(path: Path) -> str:
    """The installed name of the plugin a file belongs to (``shipyard.plugins.docker``)."""
    rel = path.relative_to(REPO)
    top = "plugins" if rel.parts[0] == "plugins" else "contrib"
    name = rel.parts[1].removesuffix(".py")
    return f"shipyard.{top}.{name}"


def imports_of(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import in ``path``, relative imports made absolute."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(["shipyard", *path.relative_to(REPO).with_suffix("").parts[:-1]])
    if path.name == "__init__.py":
        package = ".".join(["shipyard", *path.relative_to(REPO).parts[:-1]])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                module = ".".join([*base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            if module == "shipyard":  # ``from shipyard import _x`` reaches a private module
                found += [(node.lineno, f"shipyard.{a.name}") for a in node.names]
    return found


def test_there_are_plugins_to_check():
    names = {plugin_of(p) for p in plugin_files()}
    assert {
        "shipyard.plugins.docker",
        "shipyard.plugins.kubernetes",
        "shipyard.contrib.slack",
    } <= names


@pytest.mark.parametrize("path", plugin_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_built_in_plugins_use_only_the_public_api(path):
    own = plugin_of(path)
    bad = []
    for line, module in imports_of(path):
        parts = module.split(".")
        if parts[0] != "shipyard":
            continue
        if len(parts) > 1 and parts[1].startswith("_") and not parts[1].startswith("__"):
            bad.append(f"{path.relative_to(REPO)}:{line}: imports the private {module}")
        elif parts[1:2] in (["plugins"], ["contrib"]) and ".".join(parts[:3]) != own:
            bad.append(f"{path.relative_to(REPO)}:{line}: imports another plugin, {module}")
    assert not bad, "use shipyard.sdk (or the shipyard façade) instead:\n" + "\n".join(bad)


def test_the_scan_sees_a_private_import(tmp_path, monkeypatch):
    """The check above can fail: a private and a cross-plugin import are both found."""
    fake = tmp_path / "plugins" / "mine.py"
    fake.parent.mkdir()
    fake.write_text(
        "from shipyard._runner import StepContext\n"
        "from shipyard import _secrets\n"
        "from ..plugins.docker import run\n"
        "from shipyard.sdk import Step\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    found = [m for _, m in imports_of(fake)]
    assert "shipyard._runner" in found
    assert "shipyard._secrets" in found
    assert "shipyard.plugins.docker" in found
    with pytest.raises(AssertionError, match=r"private shipyard\._runner"):
        test_built_in_plugins_use_only_the_public_api(fake)


def test_the_sdk_names_are_pinned():
    from shipyard import sdk

    assert set(sdk.__all__) == SDK_NAMES
    for name in sdk.__all__:
        assert getattr(sdk, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        sdk.nothing  # noqa: B018


def test_the_sdk_types_are_the_engine_s_own():
    """A plugin's ``sdk.Step`` subclass is a step to the engine, not a look-alike."""
    import shipyard as sy
    from shipyard import sdk

    assert sdk.Step is sy.Step
    assert sdk.StepResult is sy.StepResult
    assert sdk.HistoryStore is sy.HistoryStore
    assert sdk.Status is sy.Status


def test_importing_the_sdk_costs_nothing_heavy():
    """What a plugin imports at load time (StepContext is for annotations: it is the runner's)."""
    code = (
        "import sys, shipyard.sdk\n"
        "from shipyard.sdk import Step, StepResult, HttpProbe, HistoryStore, hookimpl\n"
        "HttpProbe('http://127.0.0.1:1/')\n"
        "heavy = {'httpx', 'tenacity', 'docker', 'kubernetes', 'sqlite_utils', 'asyncio'}\n"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert out.strip() == "[]"
