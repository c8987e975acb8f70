"""The audit trail: who ran each deployment, from where, with which file, commit and arguments;
who broke a lock, cancelled or rolled back, and why. Real ``shipyard`` processes throughout."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from shipyard import DeploymentManager
from shipyard import __version__ as SHIPYARD_VERSION
from shipyard._liveness import dead_after
from shipyard._liveness import this_process
from shipyard._store import open_store

PIPELINES = """
import shipyard as sy

@sy.pipeline(rollback="manual")
def app(d):
    return [sy.stage("build", sy.command("true")),
            sy.stage("release", sy.wait(float(d.vars.get("wait", "0")) or 0.01))]

@sy.pipeline(rollback="auto")
def flaky(d):
    return [sy.stage("s", sy.command("false" if d.version == "bad" else "true"))]
"""

CI_VARIABLES = ("GITHUB_ACTOR", "GITLAB_USER_LOGIN", "BUILDKITE_BUILD_CREATOR", "CIRCLE_USERNAME")


def env_for(project: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SHIPYARD_", "GIT_")) and k not in CI_VARIABLES
    }
    # git must not find a repository above the project, nor read the user's configuration
    env.update(
        NO_COLOR="1",
        SHIPYARD_HEARTBEAT="0.1",
        GIT_CEILING_DIRECTORIES=str(project.parent),
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@example.com",
    )
    env.update(extra)
    return env


def shipyard(project: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "shipyard", *args],
        cwd=project,
        env=env_for(project, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def git(project: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=project, env=env_for(project), capture_output=True, text=True,
        check=True,
    ).stdout.strip()  # fmt: skip


@pytest.fixture
def project(tmp_path: Path) -> Path:
    p = tmp_path / "proj"
    p.mkdir()
    (p / "pipelines.py").write_text(PIPELINES)
    return p


def show(project: Path, dep_id: int) -> tuple[dict[str, Any], str]:
    """The deployment as ``show --json`` has it (read in-process), and ``shipyard show``."""
    manager = DeploymentManager(project / "pipelines.py")
    try:
        doc = manager.show(dep_id)
    finally:
        manager.close()
    text = shipyard(project, "show", str(dep_id))
    assert text.returncode == 0, text.stderr
    return doc, text.stdout


def test_a_deployment_records_who_where_what_file_commit_args_and_version(project: Path) -> None:
    git(project, "init", "-q")
    git(project, "add", "pipelines.py")
    git(project, "commit", "-q", "-m", "pipelines")
    head = git(project, "rev-parse", "HEAD")
    args = ["deploy", "app", "1.0", "-e", "dev", "--var", "k=v"]
    r = shipyard(project, *args, SHIPYARD_USER="alice", GITHUB_ACTOR="octocat")
    assert r.returncode == 0, r.stderr

    doc, text = show(project, 1)
    sha = hashlib.sha256((project / "pipelines.py").read_bytes()).hexdigest()
    assert doc["user"] == "alice"
    assert doc["ci_actor"] == "GITHUB_ACTOR=octocat"
    assert doc["host"] == socket.gethostname()
    assert Path(doc["pipelines_file"]) == (project / "pipelines.py").resolve()
    assert doc["file_hash"] == sha
    assert doc["git_commit"] == head
    assert doc["args"] == args
    assert doc["vars"] == {"k": "v"}
    assert doc["shipyard_version"] == SHIPYARD_VERSION
    assert f"  by        alice (GITHUB_ACTOR=octocat) on {socket.gethostname()}\n" in text
    assert f"  file      {doc['pipelines_file']}  sha256 {sha[:12]}\n" in text
    assert f"  commit    {head}\n" in text
    assert f"  shipyard  {SHIPYARD_VERSION}\n" in text
    assert "  args      shipyard deploy app 1.0 -e dev --var k=v\n" in text

    listed = json.loads(shipyard(project, "history", "--json").stdout)
    assert listed[0]["user"] == "alice"
    assert listed[0]["host"] == socket.gethostname()

    # A change to a tracked file makes the tree dirty; a new untracked file does not.
    (project / "notes.txt").write_text("untracked")
    assert shipyard(project, "deploy", "app", "1.1", "-e", "dev").returncode == 0
    assert show(project, 2)[0]["git_commit"] == head
    (project / "pipelines.py").write_text(PIPELINES + "\n# edited\n")
    assert shipyard(project, "deploy", "app", "1.2", "-e", "dev").returncode == 0
    doc3, text3 = show(project, 3)
    assert doc3["git_commit"] == f"{head}-dirty"
    assert doc3["file_hash"] == hashlib.sha256((project / "pipelines.py").read_bytes()).hexdigest()
    assert doc3["file_hash"] != sha
    assert f"  commit    {head}-dirty\n" in text3


@pytest.mark.parametrize(
    ("ci", "expected"),
    [
        ({"GITLAB_USER_LOGIN": "gl-user"}, "GITLAB_USER_LOGIN=gl-user"),
        ({"GITHUB_ACTOR": "gh-user", "GITLAB_USER_LOGIN": "gl-user"}, "GITHUB_ACTOR=gh-user"),
        ({}, None),
    ],
)
def test_the_ci_identity_and_no_commit_outside_git(
    project: Path, ci: dict[str, str], expected: str | None
) -> None:
    r = shipyard(project, "deploy", "app", "1", "-e", "dev", USER="ci-runner", **ci)
    assert r.returncode == 0, r.stderr
    doc, text = show(project, 1)
    assert doc["user"] == "ci-runner"
    assert doc["ci_actor"] == expected
    assert doc["git_commit"] is None
    assert "  commit " not in text
    by = f"ci-runner ({expected})" if expected else "ci-runner"
    assert f"  by        {by} on " in text


def test_unlock_records_who_and_why_on_the_interrupted_deployment(project: Path) -> None:
    store = open_store(str(project / ".shipyard" / "history.db"))
    try:
        held = store.begin(
            pipeline="app", version="1", environment="dev", owner=this_process(),
            is_dead=dead_after(60),
        ).id  # fmt: skip
    finally:
        store.close()
    blocked = shipyard(project, "deploy", "app", "2", "-e", "dev")
    assert blocked.returncode == 3

    r = shipyard(project, "unlock", "app", "-e", "dev", "--reason", "runner vm is gone",
                 SHIPYARD_USER="bob", GITLAB_USER_LOGIN="bob-ci")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"deployment #{held} is now interrupted" in r.stdout
    doc, text = show(project, held)
    assert doc["status"] == "interrupted"
    assert "unlocked by bob (GITLAB_USER_LOGIN=bob-ci) (runner vm is gone)" in doc["error"]
    assert "unlock by bob (GITLAB_USER_LOGIN=bob-ci): runner vm is gone" in text
    store = open_store(str(project / ".shipyard" / "history.db"))
    try:
        [row] = store.audit_trail()
    finally:
        store.close()
    assert row["action"] == "unlock"
    assert row["deployment_id"] == held
    assert (row["pipeline"], row["environment"]) == ("app", "dev")
    assert row["user"] == "bob (GITLAB_USER_LOGIN=bob-ci)"
    assert row["host"] == socket.gethostname()
    assert row["reason"] == "runner vm is gone"

    again = shipyard(project, "unlock", "app", "-e", "dev", "--reason", "just in case",
                     SHIPYARD_USER="bob")  # fmt: skip
    assert "was not locked; recorded anyway" in again.stdout
    store = open_store(str(project / ".shipyard" / "history.db"))
    try:
        latest = store.audit_trail()[0]
    finally:
        store.close()
    assert (latest["action"], latest["deployment_id"], latest["user"], latest["reason"]) == (
        "unlock", None, "bob", "just in case")  # fmt: skip
    assert latest["pipeline"] == "app"

    no_reason = shipyard(project, "unlock", "app", "-e", "dev")
    assert no_reason.returncode == 2
    assert "--reason" in no_reason.stderr


def test_cancel_records_who_and_why(project: Path) -> None:
    env = env_for(project)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard", "deploy", "app", "1", "-e", "dev", "--var", "wait=30"],
        cwd=project, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            r = shipyard(project, "status", "1", "--json")
            if r.stdout.startswith("[") and json.loads(r.stdout)[0]["current_stage"] == 1:
                break
            time.sleep(0.1)
        c = shipyard(project, "cancel", "1", "--reason", "wrong version",
                     SHIPYARD_USER="carol", GITHUB_ACTOR="carol-gh")  # fmt: skip
        assert c.returncode == 0, c.stderr
        assert "deployment #1 cancelled" in c.stdout
        _, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, err
    doc, text = show(project, 1)
    assert doc["status"] == "cancelled"
    assert "cancelled by carol (GITHUB_ACTOR=carol-gh): wrong version" in doc["error"]
    assert "cancel by carol (GITHUB_ACTOR=carol-gh): wrong version" in text


def test_rollback_records_who_and_why(project: Path) -> None:
    for version in ("1", "2"):
        assert shipyard(project, "deploy", "app", version, "-e", "dev").returncode == 0
    r = shipyard(project, "rollback", "app", "-e", "dev", "--reason", "v2 is slow",
                 SHIPYARD_USER="dave")  # fmt: skip
    assert r.returncode == 0, r.stderr
    doc, text = show(project, 3)
    assert (doc["version"], doc["rollback_of"], doc["user"]) == ("1", 2, "dave")
    assert doc["args"] == ["rollback", "app", "-e", "dev", "--reason", "v2 is slow"]
    assert "  rollback of #2" in text
    assert "rollback by dave: v2 is slow" in text

    # Without --reason the audit says what was rolled back; an automatic rollback too.
    assert shipyard(project, "deploy", "flaky", "good", "-e", "dev").returncode == 0
    bad = shipyard(project, "deploy", "flaky", "bad", "-e", "dev", SHIPYARD_USER="erin")
    assert bad.returncode == 1
    auto, auto_text = show(project, 6)
    assert (auto["version"], auto["rollback_of"], auto["user"]) == ("good", 5, "erin")
    assert "rollback by erin: rollback of deployment 5" in auto_text
