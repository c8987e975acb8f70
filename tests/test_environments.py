"""Environments as a promotion path (issue 17): per-environment variables and secrets, a version
that must pass staging before production, ``promote``, ``rollback --to``, protected
environments. Real ``shipyard`` processes on a real SQLite history."""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import pytest
from runners import Fleet
from runners import Runner
from runners import done
from runners import out_of

PIPELINES = textwrap.dedent(
    """
    import os

    import shipyard as sy


    def record(d):
        with open(os.environ["RACE_LOG"], "a") as f:
            f.write(f"{d.environment} {d.version} {sorted(d.vars.items())}\\n")


    STAGING = sy.environment("staging", vars={"replicas": 1, "tier": "small"})
    PRODUCTION = sy.environment(
        "production", vars={"replicas": 3}, secrets=["PROD_TOKEN"], requires=["staging"],
        protected=True,
    )


    @sy.pipeline(environments=[STAGING, PRODUCTION, "dev"], rollback="manual")
    def web(d):
        steps = [sy.python(record, d, name="record")]
        if d.environment == "production":
            steps.append(sy.command("sh", "-c", "echo token=$PROD_TOKEN", name="uses the token",
                                    env={"PROD_TOKEN": sy.secret("PROD_TOKEN")}))
        return [sy.stage("release", *steps)]
    """
)


class _Project(Fleet):
    def runner(self, url: str | None = None) -> Runner:
        r = super().runner(url)
        (r.dir / "pipelines.py").write_text(PIPELINES)
        r.env["SHIPYARD_USER"] = "alice"
        r.env["PROD_TOKEN"] = "s3cr3t-prod-token"
        return r

    def records(self) -> list[str]:
        return self.log.read_text().splitlines()


@pytest.fixture
def project(tmp_path: Path) -> Runner:
    return _Project(tmp_path, str(tmp_path / "history.db")).runner()


def _ok(r: Runner, *args: str) -> subprocess.CompletedProcess[str]:
    out = r.run(*args)
    assert out.returncode == 0, out_of(out)
    return out


def test_environment_vars_sit_under_var_and_plan_says_where_each_comes_from(
    project: Runner,
) -> None:
    out = _ok(project, "plan", "web", "1.0", "-e", "staging", "--var", "tier=large")
    assert "var replicas=1  (pipelines.py)" in out.stdout
    assert "var tier=large  (--var)" in out.stdout
    doc = json.loads(_ok(project, "plan", "web", "1.0", "-e", "staging", "--json").stdout)
    assert {v["name"]: (v["value"], v["from"]) for v in doc["vars"]} == {
        "replicas": ("1", "pipelines.py"), "tier": ("small", "pipelines.py")}  # fmt: skip
    _ok(project, "deploy", "web", "1.0", "-e", "staging", "--var", "tier=large")
    _ok(project, "deploy", "web", "1.0", "-e", "dev")
    log = project.env["RACE_LOG"]
    assert Path(log).read_text().splitlines() == [
        "staging 1.0 [('replicas', '1'), ('tier', 'large')]",
        "dev 1.0 []",
    ]
    # What ran is recorded: a rollback or retry replays the recorded variables.
    assert project.json("show", "1")["vars"] == {"replicas": "1", "tier": "large"}


def test_production_needs_the_version_to_pass_staging_first(project: Runner) -> None:
    refused = project.run("deploy", "web", "2.0", "-e", "production", "--yes")
    assert refused.returncode == 2, out_of(refused)
    assert "web 2.0 may not deploy to 'production'" in refused.stderr
    assert "'staging'" in refused.stderr
    assert "shipyard promote web --from staging --to production" in refused.stderr
    assert project.json("history") == []  # nothing recorded for a refused request
    _ok(project, "deploy", "web", "1.0", "-e", "staging")
    # Another version passing staging does not let 2.0 through.
    assert project.run("deploy", "web", "2.0", "-e", "production", "--yes").returncode == 2
    _ok(project, "deploy", "web", "2.0", "-e", "staging")
    out = _ok(project, "deploy", "web", "2.0", "-e", "production", "--yes")
    assert "s3cr3t-prod-token" not in out_of(out)
    logs = _ok(project, "logs", "3").stdout
    assert "token=***" in logs
    assert "s3cr3t" not in logs


def test_a_version_from_another_git_commit_than_staging_is_refused(project: Runner) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org"]

    def commit(message: str) -> None:
        subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", message], cwd=project.dir,
                       check=True)  # fmt: skip

    subprocess.run(["git", "init", "-q"], cwd=project.dir, check=True)
    (project.dir / ".gitignore").write_text(".shipyard/\n")
    subprocess.run(["git", "add", "-A"], cwd=project.dir, check=True)
    commit("first")
    _ok(project, "deploy", "web", "1.0", "-e", "staging")
    commit("second")
    refused = project.run("deploy", "web", "1.0", "-e", "production", "--yes")
    assert refused.returncode == 2, out_of(refused)
    assert "from git commit" in refused.stderr
    assert "this checkout is at" in refused.stderr


def test_a_secret_of_the_environment_must_be_there(project: Runner) -> None:
    _ok(project, "deploy", "web", "1.0", "-e", "staging")
    del project.env["PROD_TOKEN"]
    out = project.run("deploy", "web", "1.0", "-e", "production", "--yes")
    assert out.returncode != 0
    assert "PROD_TOKEN" in out_of(out)
    assert project.json("history")[0]["status"] == "failed"
    assert not any(line.startswith("production") for line in Path(project.env["RACE_LOG"])
                   .read_text().splitlines())  # fmt: skip


def test_promote_deploys_what_succeeded_in_staging_and_show_links_them(project: Runner) -> None:
    nothing = project.run("promote", "web", "--from", "staging", "--to", "production", "--yes")
    assert nothing.returncode == 2, out_of(nothing)
    assert "nothing of 'web' has succeeded in 'staging'" in nothing.stderr
    _ok(project, "deploy", "web", "1.0", "-e", "staging")
    _ok(project, "deploy", "web", "1.1", "-e", "staging")
    _ok(project, "deploy", "web", "1.2", "-e", "staging")
    # A later version that failed there is not what runs in staging: 1.2 is.
    project.env["RACE_LOG"] = "/nonexistent/dir/log"
    assert project.run("deploy", "web", "1.3", "-e", "staging").returncode == 1
    project.env["RACE_LOG"] = str(project.dir / "log")
    out = _ok(project, "promote", "web", "--from", "staging", "--to", "production", "--yes")
    assert "promoting web 1.2 from staging (deployment #3) to production" in out.stdout
    doc = project.json("show", "5")
    assert (doc["version"], doc["environment"], doc["status"], doc["promoted_from"]) == (
        "1.2", "production", "succeeded", 3)  # fmt: skip
    assert "promoted from #3" in _ok(project, "show", "5").stdout
    assert project.json("show", "3")["promoted_from"] is None


def test_rollback_to_a_chosen_version_and_the_candidates_when_it_never_succeeded(
    project: Runner,
) -> None:
    for v in ("1.0", "1.1", "1.2"):
        _ok(project, "deploy", "web", v, "-e", "dev")
    refused = project.run("rollback", "web", "-e", "dev", "--to", "0.9")
    assert refused.returncode == 2, out_of(refused)
    assert "version 0.9 never succeeded in 'dev'" in refused.stderr
    assert "1.2 (#3), 1.1 (#2), 1.0 (#1)" in refused.stderr
    other = project.run("rollback", "web", "-e", "dev", "--to", "99")
    assert other.returncode == 2
    assert "there is no deployment 99" in other.stderr
    out = _ok(project, "rollback", "web", "-e", "dev", "--to", "1.0")
    assert "to version 1.0 (from deployment #1)" in out.stdout
    doc = project.json("show", "4")
    assert (doc["version"], doc["rollback_of"], doc["status"]) == ("1.0", 3, "succeeded")
    _ok(project, "rollback", "web", "-e", "dev", "--to", "2")
    assert project.json("show", "5")["version"] == "1.1"
    rows = project.json("history", "--pipeline", "web", "--env", "dev")
    assert [(x["id"], x["current"]) for x in rows] == [
        (5, True), (4, False), (3, False), (2, False), (1, False)]  # fmt: skip
    text = _ok(project, "history", "--pipeline", "web", "--env", "dev").stdout
    marked = [line for line in text.splitlines() if "current" in line]
    assert len(marked) == 1
    assert marked[0].startswith("#5")


def test_a_protected_environment_needs_yes(project: Runner) -> None:
    _ok(project, "deploy", "web", "1.0", "-e", "staging")
    refused = project.run("deploy", "web", "1.0", "-e", "production")
    assert refused.returncode == 2, out_of(refused)
    assert "environment 'production' is protected (pipelines.py)" in refused.stderr
    assert "--yes" in refused.stderr
    assert project.json("history", "--env", "production") == []
    refused = project.run("promote", "web", "--from", "staging", "--to", "production")
    assert refused.returncode == 2
    assert "a promotion there needs --yes" in refused.stderr
    _ok(project, "deploy", "web", "1.0", "-e", "production", "--yes")
    _ok(project, "deploy", "web", "1.1", "-e", "staging")
    project.env["SHIPYARD_YES"] = "1"
    _ok(project, "deploy", "web", "1.1", "-e", "production")
    del project.env["SHIPYARD_YES"]
    refused = project.run("rollback", "web", "-e", "production")
    assert refused.returncode == 2
    assert "a rollback there needs --yes" in refused.stderr
    _ok(project, "rollback", "web", "-e", "production", "--yes")
    assert project.json("history", "-n", "1")[0]["version"] == "1.0"


def test_pyproject_declares_environments_and_bad_declarations_are_clear(
    project: Runner,
) -> None:
    (project.dir / "pipelines.py").write_text(textwrap.dedent("""
        import shipyard as sy

        @sy.pipeline
        def api(d):
            return [sy.stage("show", sy.command("sh", "-c", "echo replicas=$R", name="show",
                                                env={"R": d.vars.get("replicas", "?")}))]
    """))  # fmt: skip
    (project.dir / "pyproject.toml").write_text(textwrap.dedent("""
        [tool.shipyard.environments.qa]
        vars = { replicas = 2 }
        protected = true
    """))  # fmt: skip
    out = _ok(project, "plan", "api", "1.0", "-e", "qa")
    assert "environment qa (pyproject.toml [tool.shipyard.environments.qa]): protected" in (
        out.stdout)  # fmt: skip
    assert "var replicas=2  (pyproject.toml [tool.shipyard.environments.qa])" in out.stdout
    assert project.run("deploy", "api", "1.0", "-e", "qa").returncode == 2
    _ok(project, "deploy", "api", "1.0", "-e", "qa", "--yes")
    assert "replicas=2" in _ok(project, "logs", "1").stdout
    (project.dir / "pyproject.toml").write_text("[tool.shipyard.environments.qa]\nreplica = 2\n")
    bad = project.run("deploy", "api", "1.0", "-e", "qa")
    assert bad.returncode == 2, out_of(bad)
    assert "[tool.shipyard.environments.qa]: unknown key(s) replica" in bad.stderr
    assert "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    ("declaration", "message"),
    [
        ('sy.environment("prod", lock="region")', "lock must be 'pipeline' or 'environment'"),
        ('sy.environment("prod", requires=["prod"])', "cannot require itself"),
        ('sy.environment("prod", vars={"a b": 1})', "'a b' is not a variable name"),
        ('sy.environment("prod", secrets="TOKEN")', "secrets must be a list of names"),
        ("42", "environments holds 42"),
    ],
)
def test_a_bad_environment_declaration_names_what_to_fix(
    project: Runner, declaration: str, message: str
) -> None:
    (project.dir / "pipelines.py").write_text(textwrap.dedent(f"""
        import shipyard as sy

        @sy.pipeline(environments=[{declaration}])
        def api(d):
            return [sy.stage("s", sy.command("true"))]
    """))  # fmt: skip
    out = project.run("list")
    assert out.returncode == 2, out_of(out)
    assert message in out.stderr
    assert "pipelines.py" in out.stderr
    assert "Traceback" not in out.stderr


GATED = textwrap.dedent(
    """
    import os

    import shipyard as sy

    PROD = sy.environment("production", approval=sy.approval(timeout="1h", approvers=["bob"]))


    @sy.pipeline(environments=["staging", PROD])
    def web(d):
        return [sy.stage("release", sy.command("sh", "-c", "echo released >> $LOG", name="rel",
                                               env={"LOG": os.environ["RACE_LOG"]}))]
    """
)


def test_an_environment_can_require_an_approval_before_its_first_stage(project: Runner) -> None:
    (project.dir / "pipelines.py").write_text(GATED)
    plan = _ok(project, "plan", "web", "1.0", "-e", "production").stdout
    assert "[1/2] approval for production" in plan
    assert "[1/1] release" in _ok(project, "plan", "web", "1.0", "-e", "staging").stdout
    out = project.run("deploy", "web", "1.0", "-e", "production")
    assert out.returncode == 4, out_of(out)
    assert Path(project.env["RACE_LOG"]).read_text() == ""  # nothing ran before the gate
    doc = project.json("show", "1")
    assert [s["status"] for s in doc["stages"]] == ["waiting", "pending"]
    assert doc["gate"]["approvers"] == ["bob"]
    project.env["SHIPYARD_USER"] = "bob"
    _ok(project, "approve", "1")
    assert Path(project.env["RACE_LOG"]).read_text() == "released\n"
    assert project.json("show", "1")["status"] == "succeeded"


def test_pyproject_can_give_an_environment_its_approval(project: Runner) -> None:
    (project.dir / "pipelines.py").write_text(GATED.replace(", PROD]", ', "qa"]'))
    (project.dir / "pyproject.toml").write_text(
        '[tool.shipyard.environments.qa]\napproval = { timeout = "2h", required = 2 }\n'
    )
    assert "[1/2] approval for qa" in _ok(project, "plan", "web", "1.0", "-e", "qa").stdout
    assert project.run("deploy", "web", "1.0", "-e", "qa").returncode == 4
    assert project.json("show", "1")["gate"]["required"] == 2
    (project.dir / "pyproject.toml").write_text(
        '[tool.shipyard.environments.qa]\napproval = { timeout = "2h", approver = "x" }\n'
    )
    bad = project.run("plan", "web", "1.0", "-e", "qa")
    assert bad.returncode == 2, out_of(bad)
    assert "[tool.shipyard.environments.qa]: approval:" in bad.stderr
    assert "approver" in bad.stderr


SHARED = textwrap.dedent(
    """
    import os
    import time

    import shipyard as sy


    def hold(name):
        log = os.environ["RACE_LOG"]
        with open(log, "a") as f:
            f.write(f"start {name}\\n")
        end = time.monotonic() + 60
        while not os.path.exists(os.environ["RELEASE"]) and time.monotonic() < end:
            time.sleep(0.02)
        with open(log, "a") as f:
            f.write(f"end {name}\\n")


    @sy.pipeline
    def migrations(d):
        return [sy.stage("migrate", sy.python(hold, "migrations", name="migrate"))]


    @sy.pipeline
    def app(d):
        return [sy.stage("release", sy.python(hold, "app", name="release"))]
    """
)


def test_two_pipelines_share_an_environment_lock(project: Runner) -> None:
    from polling import wait_for

    (project.dir / "pipelines.py").write_text(SHARED)
    (project.dir / "pyproject.toml").write_text(
        '[tool.shipyard.environments.prod]\nlock = "environment"\n'
    )
    release = project.dir / "release"
    project.env["RELEASE"] = str(release)
    log = Path(project.env["RACE_LOG"])
    first = project.start("deploy", "migrations", "1", "-e", "prod")
    wait_for(lambda: "start migrations" in log.read_text() or None, timeout=30)
    refused = project.run("deploy", "app", "1", "-e", "prod")
    assert refused.returncode == 3, out_of(refused)
    assert "one lock for every pipeline, lock='environment'" in refused.stderr
    assert "of pipeline 'migrations'" in refused.stderr
    # Another environment is not held; --wait-lock queues behind the holder.
    waiter = project.start("deploy", "app", "2", "-e", "prod", "--wait-lock", "60")
    wait_for(lambda: "waiting for the lock" in "".join(_peek(waiter)) or None, timeout=30)
    release.touch()
    assert done(first, 60)[0] == 0
    code, text = done(waiter, 60)
    assert code == 0, text
    assert log.read_text().splitlines() == [
        "start migrations", "end migrations", "start app", "end app"]  # fmt: skip


def _peek(p: subprocess.Popen[str]) -> list[str]:
    """What a background runner printed on stderr so far (read without blocking)."""
    import os
    import select

    seen: list[str] = getattr(p, "_seen", [])
    assert p.stderr is not None
    while select.select([p.stderr], [], [], 0)[0]:
        chunk = os.read(p.stderr.fileno(), 65536).decode()
        if not chunk:
            break
        seen.append(chunk)
    p._seen = seen  # type: ignore[attr-defined]
    return seen
