"""CI-native output and report files (issue #19, items 3 and 4).

Each test runs the real ``shipyard`` command in a subprocess with the variables a CI runner
sets, and checks what it writes against the documented syntax: GitHub's workflow commands
(``::group::``, ``::error``, ``::add-mask::``, ``$GITHUB_STEP_SUMMARY``) and GitLab's section
markers; the JUnit report is read with junitparser, a real consumer of the format.
"""

from __future__ import annotations

import json
import re

import pytest
from junitparser import Error
from junitparser import Failure
from junitparser import JUnitXml
from junitparser import Skipped
from polling import wait_for

#: The secret the failing step prints (with a ``%`` to check the escaping of messages).
SECRET = "hunter2-s3cret%value"

PIPELINES = r'''
import shipyard as sy

SCRIPT = """
echo "using $TOKEN"
echo "50% done, a:b"
case "$DEPLOYMENT_VERSION" in bad*) echo "token $TOKEN rejected" >&2; exit 3;; esac
"""


@sy.pipeline(environments=["staging"], rollback="auto")
def web(d):
    return [
        sy.stage("build", sy.command("sh", "-c", "echo building $DEPLOYMENT_VERSION", name="compile"),
                 sy.wait(0, name="settle")),
        sy.stage("release",
                 sy.command("sh", "-c", SCRIPT, name="migrate: db, schema",
                            env={"TOKEN": sy.secret("DEPLOY_TOKEN")}),
                 sy.command("true", name="announce")),
    ]
'''

#: No CI at all: the variables of a runner the tests themselves may run on are unset.
NO_CI = {"GITHUB_ACTIONS": None, "GITLAB_CI": None, "GITHUB_STEP_SUMMARY": None, "CI": None}

SECTION_START = re.compile(
    r"^\x1b\[0Ksection_start:(?P<ts>\d+):(?P<name>[a-z0-9_]+)(?P<opts>\[collapsed=true\])?"
    r"\r\x1b\[0K(?P<header>.*)$"
)
SECTION_END = re.compile(r"^\x1b\[0Ksection_end:(?P<ts>\d+):(?P<name>[a-z0-9_]+)\r\x1b\[0K$")
#: A workflow command's message: every %, CR and LF escaped.
ESCAPED_DATA = re.compile(r"(?:[^%\r\n]|%25|%0D|%0A)*")
#: A workflow command's property: also : and ,.
ESCAPED_PROPERTY = re.compile(r"(?:[^%\r\n:,]|%25|%0D|%0A|%3A|%2C)*")


def unescape(text: str) -> str:
    """What the runner makes of an escaped workflow-command value."""
    for escaped, char in (("%0D", "\r"), ("%0A", "\n"), ("%3A", ":"), ("%2C", ","), ("%25", "%")):
        text = text.replace(escaped, char)
    return text


@pytest.fixture
def project(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    good = shipyarder.spawn("deploy", "web", "good", "-e", "staging",
                            env={**NO_CI, "DEPLOY_TOKEN": SECRET})  # fmt: skip
    assert good.exit_code == 0, good.output
    return shipyarder


def deploy(project, *args, env):
    return project.spawn("deploy", "web", *args, "-e", "staging",
                         env={**NO_CI, "DEPLOY_TOKEN": SECRET, **env})  # fmt: skip


def groups(lines: list[str]) -> list[tuple[str, list[str]]]:
    """The ``::group::`` blocks of ``lines``: (title, the lines inside); never nested."""
    found: list[tuple[str, list[str]]] = []
    inside: list[str] | None = None
    for line in lines:
        if line.startswith("::group::"):
            assert inside is None, f"a group opened inside another: {line!r}"
            inside = []
            found.append((unescape(line.removeprefix("::group::")), inside))
        elif line == "::endgroup::":
            assert inside is not None, "::endgroup:: without a group"
            inside = None
        elif inside is not None:
            inside.append(line)
    assert inside is None, "a group was left open"
    return found


def test_github_actions_groups_annotations_masks_and_summary(project, tmp_path):
    summary = tmp_path / "step-summary.md"
    summary.write_text("earlier step's summary\n", encoding="utf-8")
    r = deploy(project, "bad", env={"GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)})
    assert r.exit_code == 1, r.output
    lines = r.stdout.splitlines()

    # The secret is registered with GitHub before anything else is written, and appears
    # nowhere but there.
    assert lines[0] == f"::add-mask::{SECRET.replace('%', '%25')}", lines[:3]
    assert [ln for ln in lines if "hunter2" in ln] == [lines[0]]
    assert "hunter2" not in r.stderr

    # Each stage of the deployment (#2) and of its automatic rollback (#3) in its own group.
    blocks = groups(lines)
    assert [title for title, _ in blocks] == ["[1/2] build", "[2/2] release"] * 2
    (_, build), (_, release) = blocks[:2]
    assert any(re.match(r"  ok +compile ", ln) for ln in build), build
    assert any(re.match(r"  ok +settle ", ln) for ln in build), build
    assert any(re.match(r"  failed +migrate: db, schema ", ln) for ln in release), release
    assert "    │ token *** rejected" in release
    assert lines.index("deploying web bad to staging (deployment #2)") < lines.index(
        "::group::[1/2] build"
    )
    assert not any(ln.startswith("::") for _, inside in blocks for ln in inside)

    # One annotation, for the failed step, after its group: title, error and last lines.
    errors = [ln for ln in lines if ln.startswith("::error")]
    assert len(errors) == 1, errors
    m = re.fullmatch(r"::error title=(?P<title>[^:]*)::(?P<message>.*)", errors[0])
    assert m is not None, errors[0]
    assert ESCAPED_PROPERTY.fullmatch(m["title"]), m["title"]
    assert ESCAPED_DATA.fullmatch(m["message"]), m["message"]
    assert "%3A" in m["title"]
    assert "%2C" in m["title"]
    assert unescape(m["title"]) == "step 'migrate: db, schema' of stage 'release' failed"
    message = unescape(m["message"]).splitlines()
    assert message[0] == "sh exited with 3; last output:"
    assert message[-3:] == ["using ***", "50% done, a:b", "token *** rejected"], message
    assert lines.index(errors[0]) > lines.index(
        "::endgroup::", lines.index("::group::[2/2] release")
    )

    # The summary is appended (what earlier steps wrote stays), as Markdown tables.
    text = summary.read_text(encoding="utf-8")
    assert text.startswith("earlier step's summary\n")
    assert "hunter2" not in text
    assert "## ❌ Shipyard: web bad to staging failed" in text
    assert "| Deployment | Pipeline | Version | Environment | Status | Duration | Note |" in text
    assert re.search(r"^\| #2 \| web \| bad \| staging \| failed \| \d+m?s \|  \|$", text, re.M)
    table = re.findall(r"^\| (build|release) \| (.+?) \| (.+?) \| (.+?) \|$", text, re.M)
    assert [row[:3] for row in table[:4]] == [
        ("build", "compile", "✅ succeeded"),
        ("build", "settle", "✅ succeeded"),
        ("release", "migrate: db, schema", "❌ failed (exit 3)"),
        ("release", "announce", "⏭️ skipped"),
    ]
    assert table[3][3] == "-"  # never ran: no duration
    assert "token *** rejected" in text  # the deployment's error, in a code block
    assert "### Rollback: deployment #3 to version good ✅ succeeded" in text
    assert re.search(r"^\| #3 \| web \| good \| staging \| succeeded \| .+ \| rollback of #2 \|$",
                     text, re.M)  # fmt: skip


def test_gitlab_sections_and_summary(project):
    r = deploy(project, "bad", "--no-rollback", env={"GITLAB_CI": "true"})
    assert r.exit_code == 1, r.output
    assert "hunter2" not in r.output
    assert "::" not in r.stdout.replace("migrate: db", "")  # no GitHub commands
    lines = r.stdout.split("\n")
    opened: list[re.Match[str]] = []
    sections: list[tuple[str, str, list[str]]] = []
    inside: list[str] | None = None
    for line in lines:
        if "section_" in line:
            start, end = SECTION_START.fullmatch(line), SECTION_END.fullmatch(line)
            assert start or end, f"not the documented marker syntax: {line!r}"
            if start:
                assert inside is None, "a section opened inside another"
                opened.append(start)
                inside = []
            else:
                assert end is not None
                assert inside is not None
                begin = opened[-1]
                assert end["name"] == begin["name"]
                assert int(begin["ts"]) <= int(end["ts"])
                sections.append((begin["name"], begin["header"], inside))
                inside = None
        elif inside is not None:
            inside.append(line)
    assert inside is None
    assert [(n, h) for n, h, _ in sections] == [
        ("shipyard_2_1_build", "[1/2] build"),
        ("shipyard_2_2_release", "[2/2] release"),
        ("shipyard_2_summary", "summary of deployment #2"),
    ]
    assert [bool(m["opts"]) for m in opened] == [True, True, False]  # stages folded
    assert any(re.match(r"  ok +compile ", ln) for ln in sections[0][2])
    assert any(re.match(r"  failed +migrate: db, schema ", ln) for ln in sections[1][2])
    summary = sections[2][2]
    assert re.match(r"deployment #2: web bad -> staging  failed  \d", summary[0]), summary
    assert re.match(r"  STAGE +STEP +STATUS +TOOK$", summary[1]), summary
    assert re.match(r"  release +migrate: db, schema +failed +\S+ +exit 3$", summary[4]), summary
    assert re.match(r"  release +announce +skipped +-$", summary[5]), summary
    assert "  error:   token *** rejected" in summary
    # After the last section, only the end of the output.
    assert lines[-1] == ""


def normalized(text: str) -> str:
    return re.sub(r"\(\d+(?:\.\d+)?m?s\)|in \d+(?:\.\d+)?m?s", "(T)", text)


def test_ci_none_and_plain_terminals_keep_plain_output(project, tmp_path):
    summary = tmp_path / "summary.md"
    plain = deploy(project, "bad", "--no-rollback", env={})
    forced_off = deploy(project, "bad", "--no-rollback", "--ci", "none",
                        env={"GITHUB_ACTIONS": "true", "GITLAB_CI": "true",
                             "GITHUB_STEP_SUMMARY": str(summary)})  # fmt: skip
    assert plain.exit_code == forced_off.exit_code == 1
    assert normalized(plain.stdout).replace("#2", "#N") == normalized(forced_off.stdout).replace(
        "#3", "#N"
    )
    for out in (plain.stdout, forced_off.stdout):
        assert "::group::" not in out
        assert "::add-mask::" not in out
        assert "::error" not in out
        assert "section_start" not in out
        assert "\x1b" not in out
    assert "[2/2] release" in plain.stdout
    assert not summary.exists()


def test_ci_option_overrides_detection(project, tmp_path):
    # --ci gitlab on a GitHub runner, --ci github with no CI variables at all.
    r = deploy(project, "good2", "--ci", "gitlab", env={"GITHUB_ACTIONS": "true"})
    assert r.exit_code == 0, r.output
    assert "::group::" not in r.stdout
    assert sum(bool(SECTION_START.fullmatch(ln)) for ln in r.stdout.split("\n")) == 3
    summary = tmp_path / "summary.md"
    r = deploy(project, "good3", "--ci", "github", env={"GITHUB_STEP_SUMMARY": str(summary)})
    assert r.exit_code == 0, r.output
    assert [t for t, _ in groups(r.stdout.splitlines())] == ["[1/2] build", "[2/2] release"]
    assert not any(ln.startswith("::error") for ln in r.stdout.splitlines())
    assert "## ✅ Shipyard: web good3 to staging succeeded" in summary.read_text(encoding="utf-8")


def test_rollback_and_retry_take_the_ci_option(project):
    env = {**NO_CI, "DEPLOY_TOKEN": SECRET, "GITHUB_ACTIONS": "true"}
    assert deploy(project, "good2", env={}).exit_code == 0
    r = project.spawn("rollback", "web", "-e", "staging", env=env)
    assert r.exit_code == 0, r.output
    assert [t for t, _ in groups(r.stdout.splitlines())] == ["[1/2] build", "[2/2] release"]
    assert r.stdout.splitlines()[1].startswith("::add-mask::"), r.stdout
    failed = deploy(project, "bad", "--no-rollback", env={})
    assert failed.exit_code == 1
    r = project.spawn("retry", str(failed.deployment["id"]), "--ci", "gitlab", env=env)
    assert r.exit_code == 1, r.output
    assert "::" not in r.stdout.replace("migrate: db", "")
    names = [m["name"] for ln in r.stdout.split("\n") if (m := SECTION_START.fullmatch(ln))]
    new = r.deployment["id"]
    assert r.deployment["retry_of"] == failed.deployment["id"]
    # The retry starts at the failed stage, the second; it fails again, and its automatic
    # rollback's sections are named after the rollback's own id.
    rb = new + 1
    assert names == [f"shipyard_{new}_2_release", f"shipyard_{rb}_1_build",
                     f"shipyard_{rb}_2_release", f"shipyard_{new}_summary"], names  # fmt: skip


def test_junit_report_read_by_junitparser(project, tmp_path):
    path = tmp_path / "reports" / "junit.xml"  # the folder does not exist yet
    r = deploy(project, "bad", "--junit", str(path), env={})
    assert r.exit_code == 1, r.output
    raw = path.read_bytes()
    assert b"hunter2" not in raw
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed
    xml = JUnitXml.fromfile(str(path))
    suites = list(xml)
    # The deployment's stages, then those of its automatic rollback (#3, to "good").
    assert [s.name for s in suites] == ["build", "release", "rollback #3: build",
                                        "rollback #3: release"]  # fmt: skip
    build, release = suites[:2]
    assert [c.name for c in build] == ["compile", "settle"]
    assert all(c.is_passed for c in build)
    assert (build.tests, build.failures, build.skipped) == (2, 0, 0)
    migrate, announce = list(release)
    assert (release.tests, release.failures, release.errors, release.skipped) == (2, 1, 0, 1)
    assert migrate.classname == "web.release"
    assert migrate.time >= 0
    (failure,) = migrate.result
    assert isinstance(failure, Failure)
    assert failure.message == "sh exited with 3; last output: token *** rejected"
    assert failure.text.splitlines() == [
        "sh exited with 3; last output:",
        "  token *** rejected",
        "last 3 output lines:",
        "using ***",
        "50% done, a:b",
        "token *** rejected",
    ]
    (skipped,) = announce.result
    assert isinstance(skipped, Skipped)
    assert "not run" in skipped.message
    assert all(c.is_passed for s in suites[2:] for c in s)
    props = {p.name: p.value for p in release.properties()}
    assert props["deployment.id"] == "2"
    assert props["deployment.status"] == "failed"
    assert (xml.tests, xml.failures, xml.errors, xml.skipped) == (8, 1, 0, 1)
    assert not any(isinstance(res, Error) for s in suites for c in s for res in c.result)


def test_report_json_is_the_show_json_document(project, tmp_path):
    path = tmp_path / "deployment.json"
    junit = tmp_path / "junit.xml"
    path.write_text("stale", encoding="utf-8")
    r = deploy(project, "bad", "--no-rollback", "--report-json", str(path), "--junit", str(junit),
               env={})  # fmt: skip
    assert r.exit_code == 1, r.output
    assert "hunter2" not in path.read_text(encoding="utf-8")
    report = json.loads(path.read_text(encoding="utf-8"))
    shown = project.spawn("show", str(report["id"]), "--json", env=NO_CI)
    assert shown.exit_code == 0, shown.output
    assert report == json.loads(shown.stdout)
    assert report["status"] == "failed"
    assert report["stages"][1]["steps"][1]["status"] == "skipped"
    assert JUnitXml.fromfile(str(junit)).failures == 1

    # With an automatic rollback: the document of `deploy --json`, the rollback under "rollback".
    r = deploy(project, "bad2", "--json", "--report-json", str(path), env={})
    assert r.exit_code == 1, r.output
    report = json.loads(path.read_text(encoding="utf-8"))
    assert report == json.loads(r.stdout)
    assert report["rollback"]["rollback_of"] == report["id"]
    assert report["rollback"]["status"] == "succeeded"
    assert "stages" not in report["rollback"]


def test_reports_of_a_deployment_that_failed_before_any_step(project, tmp_path):
    junit, doc = tmp_path / "junit.xml", tmp_path / "doc.json"
    r = project.spawn("deploy", "web", "bad", "-e", "staging", "--junit", str(junit),
                      "--report-json", str(doc), env={**NO_CI, "DEPLOY_TOKEN": None})  # fmt: skip
    assert r.exit_code == 1, r.output  # a missing secret: the deployment failed
    report = json.loads(doc.read_text(encoding="utf-8"))
    assert report["status"] == "failed"
    assert "DEPLOY_TOKEN not set" in report["error"]
    xml = JUnitXml.fromfile(str(junit))
    assert xml.tests == 0


def test_an_unwritable_report_is_a_warning_not_another_outcome(project, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("", encoding="utf-8")
    r = deploy(project, "good2", "--junit", str(blocker / "junit.xml"), env={})
    assert r.exit_code == 0, r.output
    assert "warning: could not write the JUnit report to" in r.stderr


CHECKS = """
import shipyard as sy


@sy.pipeline
def checks(d):
    return [
        sy.stage("lint", sy.command("sh", "-c", "echo 3 warnings; exit 2", name="style"),
                 sy.command("true", name="types"), parallel=True, continue_on_failure=True),
        sy.stage("ship", sy.command("sh", "-c", "touch started; exec sleep 60", name="upload")),
    ]
"""


def test_continue_on_failure_is_a_warning_and_a_cancel_closes_the_group(shipyarder, tmp_path):
    shipyarder.makefile("checks.py", CHECKS)
    summary, junit = tmp_path / "summary.md", tmp_path / "junit.xml"
    env = {**NO_CI, "GITHUB_ACTIONS": "true", "GITHUB_STEP_SUMMARY": str(summary)}
    proc = shipyarder.popen("-f", "checks.py", "deploy", "checks", "1", "-e", "x",
                            "--junit", str(junit), env=env)  # fmt: skip
    wait_for(lambda: (shipyarder.path / "started").exists(), timeout=30, what="the upload step")
    proc.terminate()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = out.decode().splitlines()
    blocks = groups(lines)  # every group closed, also the one the cancel cut short
    assert [t for t, _ in blocks] == ["[1/2] lint (parallel, continue on failure)", "[2/2] ship"]
    assert any(re.match(r"  cancelled +upload ", ln) for ln in blocks[1][1]), blocks[1]
    annotations = [ln for ln in lines if ln.startswith(("::error", "::warning"))]
    assert annotations == [
        "::warning title=step 'style' of stage 'lint' failed::sh exited with 2; last output:%0A  "
        "3 warnings%0Alast 1 output line:%0A3 warnings",
        "::error title=deployment #1 cancelled::interrupted by SIGTERM",
    ]
    text = summary.read_text(encoding="utf-8")
    assert "| lint | style | ⚠️ warning (exit 2) |" in text
    assert "| ship | upload | ⛔ cancelled |" in text
    xml = JUnitXml.fromfile(str(junit))
    (style, types), (upload,) = (list(s) for s in xml)
    assert [type(r).__name__ for r in style.result] == ["Failure"]
    assert style.result[0].type == "warning"
    assert types.is_passed
    (error,) = upload.result
    assert isinstance(error, Error)
    assert error.type == "cancelled"
    assert error.message == "cancelled"
