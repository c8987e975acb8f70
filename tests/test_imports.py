"""``--help``, ``--version``, ``list`` and ``plan`` stay light (DESIGN §3).

Each command runs in a fresh interpreter under ``python -X importtime``, which names every module
the process imported; heavy clients and the runner's machinery must not be among them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: Loaded lazily: only deploying (and reading or writing the history) may import them.
HEAVY = {"sqlite_utils", "tenacity", "asyncio", "httpx", "docker", "kubernetes"}


def imported_modules(args: list[str], cwd: Path, entry: list[str]) -> tuple[set[str], str]:
    """The top-level packages a fresh ``shipyard ARGS`` imports, and its output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", *entry, *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    modules = set()
    output = []
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            name = line.rsplit("|", 1)[-1].strip()
            if name != "imported package":
                modules.add(name.split(".")[0])
        else:
            output.append(line)
    assert proc.returncode == 0, proc.stdout + "\n".join(output)
    return modules, proc.stdout


@pytest.fixture(params=["python -m shipyard", "console script"])
def entry(request):
    if request.param == "python -m shipyard":
        return ["-m", "shipyard"]
    script = shutil.which("shipyard", path=str(Path(sys.executable).parent))
    assert script is not None, "the console script `shipyard` is not installed beside python"
    return [script]


@pytest.fixture
def project(tmp_path, resources):
    shutil.copy(resources / "pipelines_typical.py", tmp_path / "pipelines.py")
    return tmp_path


@pytest.mark.parametrize("args", [["--help"], ["--version"]], ids=["help", "version"])
def test_help_and_version_import_nothing_heavy(args, project, entry):
    modules, out = imported_modules(args, project, entry)
    assert "shipyard" in out
    assert modules & (HEAVY | {"sqlite3"}) == set()


@pytest.mark.parametrize(
    "args",
    [["list"], ["plan", "webapp", "1.0", "-e", "staging"], ["plan", "webapp", "1.0", "-e",
                                                            "staging", "--json"]],
    ids=["list", "plan", "plan-json"],
)  # fmt: skip
def test_list_and_plan_import_nothing_heavy(args, project, entry):
    modules, out = imported_modules(args, project, entry)
    assert "webapp" in out
    assert modules & HEAVY == set()
    assert not (project / ".shipyard").exists()


@pytest.mark.parametrize("args", [["list"], ["plan", "demo", "1.0.0", "-e", "local"]])
def test_the_demo_pipelines_file_is_light_too(args, tmp_path):
    shutil.copy(REPO / "pipelines.py", tmp_path / "pipelines.py")
    modules, out = imported_modules(args, tmp_path, ["-m", "shipyard"])
    assert "demo" in out
    assert modules & HEAVY == set()


def test_the_check_can_fail(project):
    # The same measurement sees the heavy modules of a command that needs them.
    modules_deploy, _ = imported_modules(
        ["deploy", "docs", "1", "-e", "x", "--no-rollback"], project, ["-m", "shipyard"]
    )
    assert {"asyncio", "sqlite_utils"} <= modules_deploy
