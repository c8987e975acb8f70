"""The ``shipyard`` command line: commands, JSON documents, exit codes, colour (DESIGN §3)."""

from __future__ import annotations

import json
import os
import pty
import re
import string
import subprocess
import sys

import pytest
import shipyard
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

PIPELINES = """
import shipyard as sy

@sy.pipeline(environments=["staging", "production"])
def web(d):
    \"\"\"Build and release the web app.

    Longer text that list does not show.
    \"\"\"
    return [
        sy.stage("build", sy.command("sh", "-c", f"echo building {d.version}", name="compile")),
        sy.stage("release",
                 sy.command("sh", "-c", "echo releasing; exit ${FAIL:-0}", name="release",
                            timeout=30, retries=1),
                 sy.wait(0, name="settle"), parallel=True),
    ]

@sy.pipeline(rollback=False)
def docs(d):
    return [sy.stage("publish", sy.command("true", name="publish"))]
"""

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z$")
DOC_KEYS = {"id", "pipeline", "version", "environment", "status", "started_at", "finished_at",
            "rollback_of", "error"}  # fmt: skip
STEP_KEYS = {"name", "status", "attempts", "exit_code", "error", "started_at", "finished_at"}


@pytest.fixture
def project(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    return shipyarder


def check_document(doc, *, stages=True):
    """The document of DESIGN §3: keys, types, ISO 8601 UTC times."""
    assert set(doc) >= DOC_KEYS, DOC_KEYS - set(doc)
    assert isinstance(doc["id"], int)
    for key in ("pipeline", "version", "environment", "status"):
        assert isinstance(doc[key], str), key
    assert doc["status"] in ("pending", "running", "succeeded", "failed", "cancelled",
                             "interrupted")  # fmt: skip
    assert ISO_UTC.match(doc["started_at"]), doc["started_at"]
    assert doc["finished_at"] is None or ISO_UTC.match(doc["finished_at"])
    assert doc["rollback_of"] is None or isinstance(doc["rollback_of"], int)
    assert doc["error"] is None or isinstance(doc["error"], str)
    if not stages:
        assert "stages" not in doc
        return
    assert isinstance(doc["stages"], list)
    for stage in doc["stages"]:
        assert {"name", "status", "steps"} <= set(stage)
        for step in stage["steps"]:
            assert set(step) >= STEP_KEYS, STEP_KEYS - set(step)
            assert isinstance(step["attempts"], int)
            assert step["exit_code"] is None or isinstance(step["exit_code"], int)
            for key in ("started_at", "finished_at"):
                assert step[key] is None or ISO_UTC.match(step[key]), step[key]


# -- list and plan -----------------------------------------------------------------------------------


def test_list(project):
    result = project.run("list")
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [
        "web  [staging, production]  rollback=manual",
        "    Build and release the web app.",
        "    stages: build -> release",
        "docs  [any environment]  rollback=False",
        "    stages: publish",
    ]
    assert [p["name"] for p in project.run("list", "--json").json()] == ["web", "docs"]
    assert project.run("list", "--json").json()[0] == {
        "name": "web",
        "description": "Build and release the web app.",
        "environments": ["staging", "production"],
        "rollback": "manual",
        "stages": ["build", "release"],
        "targets": [],  # no step acts on other hosts
    }


def test_plan_shows_the_resolved_steps_and_changes_nothing(project):
    result = project.run("plan", "web", "1.4", "-e", "staging")
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [
        "plan: web 1.4 -> staging",
        "[1/2] build",
        "  - command: sh -c 'echo building 1.4'",
        "[2/2] release (parallel)",
        "  - command: sh -c 'echo releasing; exit ${FAIL:-0}'  [timeout 30s, retries 1]",
        "  - wait: sleep 0s",
    ]
    doc = project.run("plan", "web", "1.4", "-e", "staging", "--json").json()
    assert doc["pipeline"] == "web"
    assert [s["name"] for s in doc["stages"]] == ["build", "release"]
    assert doc["stages"][1]["steps"][0] == {
        "name": "release", "kind": "command",
        "description": "sh -c 'echo releasing; exit ${FAIL:-0}'", "timeout": 30, "retries": 1,
        "details": [],
    }  # fmt: skip
    assert not project.history_path.exists()
    assert not (project.path / ".shipyard").exists()
    assert sorted(p.name for p in project.path.iterdir()) == ["home", "pipelines.py"]


def test_plan_through_the_api_helper(project):
    stages = project.plan("web", "2.0", "production", vars={"x": "1"})
    assert [s.name for s in stages] == ["build", "release"]
    assert stages[0].steps[0].describe() == "sh -c 'echo building 2.0'"
    assert not project.history_path.exists()


# -- deploy, show, history, status, logs ---------------------------------------------------------------


def test_deploy_json_document(project):
    result = project.run("deploy", "web", "1.4", "-e", "staging", "--var", "a=b=c", "--json")
    assert result.exit_code == 0, result
    doc = result.json()  # stdout is the document alone; progress went to stderr
    check_document(doc)
    assert (doc["id"], doc["pipeline"], doc["version"], doc["environment"]) == (
        1, "web", "1.4", "staging",
    )  # fmt: skip
    assert (doc["status"], doc["rollback_of"], doc["error"]) == ("succeeded", None, None)
    assert doc["vars"] == {"a": "b=c"}
    assert doc["started_at"] <= doc["finished_at"]
    assert [(s["name"], s["status"], [st["name"] for st in s["steps"]]) for s in doc["stages"]] == [
        ("build", "succeeded", ["compile"]),
        ("release", "succeeded", ["release", "settle"]),
    ]
    compile_step = doc["stages"][0]["steps"][0]
    assert (compile_step["attempts"], compile_step["exit_code"], compile_step["error"]) == (
        1,
        0,
        None,
    )
    assert "deploying web 1.4 to staging" in result.stderr
    # show --json prints the same document
    assert project.run("show", "1", "--json").json() == doc


def test_deploy_json_of_a_failed_deployment(project):
    result = project.run("deploy", "web", "1", "-e", "staging", "--json", env={"FAIL": "3"})
    assert result.exit_code == 1, result
    doc = result.json()
    check_document(doc)
    assert doc["status"] == "failed"
    release = doc["stages"][1]["steps"][0]
    assert (release["status"], release["attempts"], release["exit_code"]) == ("failed", 2, 3)
    assert doc["error"].startswith("step 'release' of stage 'release' failed: sh exited with 3")
    assert project.run("show", "1", "--json").json() == doc


def test_deploy_text_progress(project):
    result = project.run("deploy", "web", "1.4", "-e", "staging")
    assert result.exit_code == 0, result
    result.fnmatch_lines(
        [
            "deploying web 1.4 to staging (deployment #1)",
            "[[]1/2] build",
            "    │ building 1.4",
            "  ok        compile  (*)",
            "[[]2/2] release (parallel)",
        ],
        consecutive=True,
    )
    # In a parallel stage, output lines name their step.
    result.fnmatch_lines(["    │ release | releasing", "deployment #1 succeeded in *"])
    result.fnmatch_lines(["  ok        release  (*)"])
    result.fnmatch_lines(["  ok        settle  (*)"])
    assert "\x1b[" not in result.output


def test_history_show_status_and_logs(project):
    assert project.run("deploy", "web", "1.0", "-e", "staging").exit_code == 0
    assert project.run("deploy", "web", "1.1", "-e", "production", env={"FAIL": "1"}).exit_code == 1
    assert project.run("deploy", "docs", "7", "-e", "staging").exit_code == 0

    history = project.run("history")
    assert history.exit_code == 0
    history.fnmatch_lines(
        [
            "ID  PIPELINE  VERSION  ENV *STATUS *STARTED *TOOK *BY *NOTE",
            "#3  docs      7        staging *succeeded*",
            "#2  web       1.1      production *failed*",
            "#1  web       1.0      staging *succeeded*",
        ],
        consecutive=True,
    )
    docs = project.run("history", "--json").json()
    assert [d["id"] for d in docs] == [3, 2, 1]
    for d in docs:
        check_document(d, stages=False)
        shown = project.run("show", str(d["id"]), "--json").json()
        assert {k: shown[k] for k in DOC_KEYS} == {k: d[k] for k in DOC_KEYS}
    filtered = project.run("history", "--pipeline", "web", "--env", "staging", "--json").json()
    assert [d["id"] for d in filtered] == [1]
    assert [d["id"] for d in project.run("history", "-n", "2", "--json").json()] == [3, 2]

    show = project.run("show", "2")
    assert show.exit_code == 0
    show.fnmatch_lines(
        [
            "deployment #2: web 1.1 -> production  failed",
            "  started *finished *took *",
            "  error     step 'release' of stage 'release' failed: sh exited with 1*",
            "[[]1/2] build  succeeded  *",
            "  succeeded   compile  *  exit 0",
            "[[]2/2] release  failed  *",
            "  failed      release  *  exit 1  attempts 2",
        ]
    )

    status = project.run("status")
    assert status.exit_code == 0
    status.fnmatch_lines(["ID  PIPELINE  VERSION  ENV *STATUS *STAGE *STARTED *TOOK",
                          "#3  docs *succeeded  1/1*", "#2  web *failed *2/2*"])  # fmt: skip
    one = project.run("status", "1", "--json").json()
    assert [d["id"] for d in one] == [1]

    logs = project.run("logs", "1")
    assert logs.exit_code == 0
    logs.re_match_lines(
        [r"^\d\d:\d\d:\d\d\.\d{3} \[compile\] building 1\.0$", r"^.* \[release\] releasing$"]
    )


def test_reading_an_empty_history(project):
    assert project.run("history").stdout == "no deployments yet\n"
    assert project.run("history", "--json").json() == []
    assert project.run("status").stdout == "no deployments yet\n"


# -- rollback and automatic rollback ------------------------------------------------------------------

ROLLBACK = """
import shipyard as sy

@sy.pipeline(rollback="auto")
def web(d):
    script = f"echo {d.version} > current; exit {d.vars.get('fail', '0')}"
    return [sy.stage("release", sy.command("sh", "-c", script, name="release"))]
"""


def test_automatic_rollback_exits_1_and_records_the_rollback(shipyarder):
    shipyarder.makepipelines(ROLLBACK)
    assert shipyarder.run("deploy", "web", "1.0", "-e", "prod").exit_code == 0
    result = shipyarder.run("deploy", "web", "2.0", "-e", "prod", "--var", "fail=1", "--json")
    assert result.exit_code == 1, result  # failed, although the rollback succeeded
    doc = result.json()
    assert (doc["id"], doc["status"], doc["version"]) == (2, "failed", "2.0")
    # The rollback redeploys 1.0 with the variables 1.0 was deployed with.
    assert doc["rollback"]["rollback_of"] == 2
    assert (doc["rollback"]["version"], doc["rollback"]["status"]) == ("1.0", "succeeded")
    assert (shipyarder.path / "current").read_text().strip() == "1.0"
    result.fnmatch_lines(
        ["rolling back to version 1.0: deployment #2 failed (rollback='auto')",
         "deploying web 1.0 to prod (deployment #3, rolling back #2)",
         "automatic rollback #3 succeeded; deployment #2 stays failed"],
        stream="stderr",
    )  # fmt: skip
    assert result.deployment["id"] == 2  # the result's deployment is the one asked for
    assert result.history[0]["rollback_of"] == 2
    # --no-rollback: just failed.
    manual = shipyarder.run("deploy", "web", "3.0", "-e", "prod", "--var", "fail=1",
                            "--no-rollback")  # fmt: skip
    assert manual.exit_code == 1
    assert [d["id"] for d in manual.history] == [4, 3, 2, 1]


def test_rollback_command(shipyarder):
    shipyarder.makepipelines(ROLLBACK)
    for version in ("1.0", "2.0"):
        assert shipyarder.run("deploy", "web", version, "-e", "prod").exit_code == 0
    result = shipyarder.run("rollback", "2", "--json")
    assert result.exit_code == 0, result
    doc = result.json()
    assert (doc["version"], doc["rollback_of"], doc["status"]) == ("1.0", 2, "succeeded")
    assert (shipyarder.path / "current").read_text().strip() == "1.0"
    # Nothing left to go back to: refused, exit 2, saying what it looked for.
    refused = shipyarder.run("rollback", "web", "-e", "prod")
    assert refused.exit_code == 2
    assert "nothing to roll back to: no succeeded deployment of 'web' in 'prod'" in refused.stderr


def test_a_refused_rollback_exits_2(project):
    assert project.run("deploy", "docs", "1", "-e", "x").exit_code == 0
    assert project.run("deploy", "docs", "2", "-e", "x").exit_code == 0
    result = project.run("rollback", "2")
    assert result.exit_code == 2
    assert "pipeline 'docs' refuses rollback (rollback=False)" in result.stderr
    missing = project.run("rollback", "99")
    assert missing.exit_code == 2
    assert "no deployment 99 in the history" in missing.stderr


# -- exit codes ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["deploy", "web", "1", "-e", "staging"], 0, None, id="ok"),
        pytest.param(["deploy", "wbe", "1", "-e", "staging"], 2,
                     "Error: no pipeline 'wbe' in pipelines.py (defined: 'docs', 'web'); did you "
                     "mean 'web'?", id="unknown-pipeline"),
        pytest.param(["deploy", "web", "1", "-e", "dev"], 2,
                     "Error: pipeline 'web' may deploy to 'staging', 'production', not 'dev'",
                     id="environment-not-allowed"),
        pytest.param(["plan", "web", "1", "-e", "dev"], 2,
                     "Error: pipeline 'web' may deploy to 'staging', 'production', not 'dev'",
                     id="plan-environment-not-allowed"),
        pytest.param(["deploy", "web", "1"], 2, "Error: Missing option '-e' / '--env'.",
                     id="missing-env"),
        pytest.param(["deploy", "web", "1", "-e", "staging", "--var", "novalue"], 2,
                     "Error: Invalid value for --var: 'novalue': expected KEY=VALUE",
                     id="bad-var"),
        pytest.param(["show", "42"], 2, "Error: no deployment 42 in the history", id="show-unknown"),
        pytest.param(["logs", "x"], 2, "Error: Invalid value for 'ID': 'x' is not a valid integer",
                     id="bad-id"),
        pytest.param(["frobnicate"], 2, "Error: No such command 'frobnicate'.", id="no-command"),
    ],
)  # fmt: skip
def test_exit_codes(project, args, code, message):
    if args[0] in ("show", "logs"):
        project.run("deploy", "docs", "1", "-e", "x")
    result = project.run(*args)
    assert result.exit_code == code, result
    assert result.exception is None
    if message:
        assert any(line.startswith(message) for line in result.stderr.splitlines()), result.stderr


def test_a_failed_deployment_exits_1(project):
    result = project.run("deploy", "web", "1", "-e", "staging", env={"FAIL": "1"})
    assert result.exit_code == 1
    result.fnmatch_lines(["deployment #1 failed in *"])


def test_exit_code_enum_matches_the_cli():
    assert [int(c) for c in shipyard.ExitCode] == [0, 1, 2, 3, 4, 130]


# -- the process: --version, python -m shipyard, colour --------------------------------------------


def test_version(project):
    result = project.run("--version")
    assert (result.exit_code, result.stdout) == (0, f"shipyard {shipyard.__version__}\n")


def test_python_m_shipyard_help(project):
    result = project.spawn("--help")
    assert result.exit_code == 0, result
    assert result.stdout.startswith("Usage: shipyard [OPTIONS] COMMAND [ARGS]...")
    for command in ("list", "plan", "deploy", "status", "logs", "history", "show", "rollback",
                    "retry", "cancel", "unlock", "plugins"):  # fmt: skip
        assert re.search(rf"^  {command}\b", result.stdout, re.M), command
    version = project.spawn("--version")
    assert version.stdout == f"shipyard {shipyard.__version__}\n"


def run_in_terminal(project, args, env):
    """Run ``python -m shipyard ARGS`` with a pseudo-terminal as stdout and stderr."""
    primary, secondary = pty.openpty()
    environ = {**os.environ, "TERM": "xterm-256color", **env}
    environ = {k: v for k, v in environ.items() if v is not None}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shipyard", *args],
        cwd=project.path, env=environ, stdin=subprocess.DEVNULL, stdout=secondary,
        stderr=secondary,
    )  # fmt: skip
    os.close(secondary)
    chunks = []
    while True:
        try:
            data = os.read(primary, 65536)
        except OSError:  # EIO: the terminal's other side is closed
            break
        if not data:
            break
        chunks.append(data)
    os.close(primary)
    assert proc.wait(timeout=120) == 0
    return b"".join(chunks).decode()


@pytest.mark.parametrize(
    ("terminal", "env", "coloured"),
    [
        pytest.param(False, {"NO_COLOR": None}, False, id="pipe"),
        pytest.param(False, {"NO_COLOR": "1", "FORCE_COLOR": "1"}, False, id="pipe-NO_COLOR-wins"),
        pytest.param(False, {"NO_COLOR": None, "FORCE_COLOR": "1"}, True, id="pipe-FORCE_COLOR"),
        pytest.param(True, {"NO_COLOR": None}, True, id="terminal"),
        pytest.param(True, {"NO_COLOR": "1"}, False, id="terminal-NO_COLOR"),
    ],
)
def test_colour_only_on_a_terminal_without_no_color(project, terminal, env, coloured):
    args = ["deploy", "docs", "1", "-e", "x"]
    if terminal:
        output = run_in_terminal(project, args, env)
    else:
        result = project.spawn(*args, env=env)
        assert result.exit_code == 0, result
        output = result.output
    assert "deployment #1 succeeded" in re.sub(r"\x1b\[[0-9;]*m", "", output)
    assert ("\x1b[" in output) is coloured, repr(output)


# -- --var parsing (property) --------------------------------------------------------------------------

VARS_PIPELINE = """
import json
import shipyard as sy

@sy.pipeline
def show(d):
    return [sy.stage("vars", sy.wait(0, name=json.dumps(dict(d.vars))))]
"""

key_chars = string.ascii_letters + string.digits + "_.-"
good_keys = st.builds(
    lambda first, rest: first + rest,
    st.sampled_from(string.ascii_letters + "_"),
    st.text(alphabet=key_chars, max_size=8),
)
values = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
    | st.just("="),
    max_size=12,
)
bad_keys = st.one_of(
    st.builds(lambda c, rest: c + rest, st.sampled_from(string.digits + "-."),
              st.text(alphabet=key_chars, max_size=5)),
    st.builds(lambda a, c, b: a + c + b, good_keys, st.sampled_from("/:$@!#%^&*()+,;<>?[]{}|~'\""),
              st.text(alphabet=key_chars, max_size=3)),
    # Spaces around the key are forgiven (stripped), not inside it.
    st.builds(lambda a, b: f"{a} {b}", good_keys, good_keys),
)  # fmt: skip


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(st.tuples(good_keys, values), max_size=4))
def test_var_accepts_key_equals_value(shipyarder, pairs):  # fmt: skip
    shipyarder.makepipelines(VARS_PIPELINE)
    args = [f"--var={k}={v}" for k, v in pairs]
    result = shipyarder.run("plan", "show", "1", "-e", "x", "--json", *args)
    assert result.exit_code == 0, result
    (step,) = result.json()["stages"][0]["steps"]
    assert json.loads(step["name"]) == dict(pairs)  # values keep their '='; a later key wins


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    st.one_of(bad_keys.map(lambda k: f"{k}=value"), good_keys, st.just("=value"), st.just(" =x"))
)
def test_var_refuses_bad_keys(shipyarder, raw):  # fmt: skip
    shipyarder.makepipelines(VARS_PIPELINE)
    result = shipyarder.run("plan", "show", "1", "-e", "x", f"--var={raw}")
    assert result.exit_code == 2, result
    assert f"Invalid value for --var: {raw!r}: expected KEY=VALUE" in result.stderr


def test_vars_reach_the_pipeline_and_the_history(project):
    project.makepipelines(VARS_PIPELINE)
    result = project.run("deploy", "show", "1", "-e", "x", "--var", "port=8080", "--var",
                         "url=http://h/?a=b", "--var", "port=9090", "--json")  # fmt: skip
    assert result.exit_code == 0, result
    doc = result.json()
    assert doc["vars"] == {"port": "9090", "url": "http://h/?a=b"}
    assert json.loads(doc["stages"][0]["steps"][0]["name"]) == doc["vars"]


# -- versions (issue 12, item 6) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "problem"),
    [
        ("", "is empty"),
        ("1.0/../../etc", "contains '/'"),
        ("..", "contains '..'"),
        (".hidden", "starts with '.'"),
        ("1..2", "contains '..'"),
        ("1.0 beta", "contains ' '"),
        ("1.0\x1b[31m", "contains '\\x1b'"),
        ("1.0;rm", "contains ';'"),
        ("$(id)", "contains '$'"),
        ("-rc1", "starts with '-'"),
        ("v" * 129, "is 129 characters long"),
    ],
)
@pytest.mark.parametrize("command", ["plan", "deploy"])
def test_unsafe_versions_are_refused_with_the_allowed_pattern(project, command, version, problem):
    result = project.run(command, "-e", "staging", "--", "web", version)
    assert result.exit_code == 2, result
    assert problem in result.stderr, result.stderr
    assert "1 to 128 letters, digits, '.', '_', '-' and '+'" in result.stderr
    assert "Traceback" not in result.output
    assert result.history == []


@pytest.mark.parametrize("version", ["1.4.2", "2026.12.03-rc1", "1.0+abc123", "v2_beta", "7"])
def test_ordinary_versions_are_accepted(project, version):
    result = project.run("plan", "web", version, "-e", "staging")
    assert result.exit_code == 0, result


# -- output that is not a terminal (issue 12, item 9) ------------------------------------------------

ESCAPING = r"""
import shipyard as sy

@sy.pipeline
def noisy(d):
    return [sy.stage("s", sy.command(
        "printf", r"\033[31mred\033[0m \033]0;title\007bell\007 nul:\000: cr\rend\ttab\n",
        name="noisy"))]
"""


def test_step_output_is_sanitised_when_not_a_terminal(shipyarder):
    shipyarder.makepipelines(ESCAPING)
    r = shipyarder.spawn("deploy", "noisy", "1", "-e", "x", env={"NO_COLOR": None})
    assert r.exit_code == 0, r
    assert "\x1b" not in r.stdout
    assert "\x00" not in r.stdout
    assert "\x07" not in r.stdout
    assert "│ red bell nul:: crend\ttab" in r.stdout, repr(r.stdout)
    shown = shipyarder.spawn("logs", "1")
    assert "[noisy] red bell nul:: crend\ttab" in shown.stdout, repr(shown.stdout)
    # The history keeps what the step printed; only what is shown is cleaned.
    from shipyard.sdk import open_store

    store = open_store(r.history_path, create=False)
    try:
        assert store.logs(1)[0]["line"].startswith("\x1b[31mred\x1b[0m")
    finally:
        store.close()


def test_color_always_keeps_colours_and_output_as_it_is(shipyarder):
    shipyarder.makepipelines(ESCAPING)
    r = shipyarder.spawn("--color", "always", "deploy", "noisy", "1", "-e", "x")
    assert r.exit_code == 0, r
    assert "\x1b[31mred\x1b[0m" in r.stdout
    assert "\x1b[1m[1/1] s\x1b[0m" in r.stdout  # the reporter's own colours
    never = shipyarder.spawn("--color", "never", "deploy", "noisy", "2", "-e", "x",
                             env={"FORCE_COLOR": "1"})  # fmt: skip
    assert never.exit_code == 0, never
    assert "\x1b" not in never.stdout
