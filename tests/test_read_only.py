"""A history that cannot be written (issue 12, item 5): reads work, writes say why.

As root (CI), permissions do not stop anything, so the folder is made read-only the way a
read-only mount does it: a private mount namespace (``unshare --mount``) with the folder
bind-mounted read-only, in which the real console script runs. As another user, the folder
and the file lose their write permissions.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SHIPYARD = Path(sys.executable).parent / "shipyard"
PIPELINES = """
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("build", sy.command("echo", "built", d.version, name="build"))]
"""


def _run(project: Path, *args: str, read_only: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")} | {"NO_COLOR": "1"}
    argv = [str(SHIPYARD), *args]
    if read_only and os.geteuid() == 0:
        folder = str(project / ".shipyard")
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
                folder, *argv]  # fmt: skip
    return subprocess.run(argv, cwd=project, env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture
def project(tmp_path: Path):
    if os.geteuid() == 0 and shutil.which("unshare") is None:
        pytest.fail("unshare (util-linux) is needed to test a read-only history as root")
    (tmp_path / "pipelines.py").write_text(PIPELINES)
    first = _run(tmp_path, "deploy", "web", "1.0", "-e", "prod", read_only=False)
    assert first.returncode == 0, first
    folder = tmp_path / ".shipyard"
    if os.geteuid() != 0:
        (folder / "history.db").chmod(0o400)
        folder.chmod(0o500)
    yield tmp_path
    folder.chmod(0o700)


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["history"], "web"),
        (["show", "1"], "build"),
        (["logs", "1"], "built 1.0"),
        (["status"], "succeeded"),
    ],
)
def test_read_commands_work_on_a_read_only_history(project: Path, args, expect):
    r = _run(project, *args, read_only=True)
    assert r.returncode == 0, r
    assert expect in r.stdout
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args",
    [["deploy", "web", "2.0", "-e", "prod"], ["unlock", "web", "-e", "prod", "--reason", "x"]],
)
def test_write_commands_say_the_history_is_read_only(project: Path, args):
    r = _run(project, *args, read_only=True)
    assert r.returncode == 2, r
    assert f"the history at {project / '.shipyard' / 'history.db'} is read-only (" in r.stderr, r
    assert "history, show, logs and status still read it" in r.stderr
    assert "is not a Shipyard history" not in r.stderr
    assert "Traceback" not in r.stderr
    # Nothing was recorded, and the history is still whole.
    h = _run(project, "history", read_only=False)
    assert h.returncode == 0, h
    assert "2.0" not in h.stdout
