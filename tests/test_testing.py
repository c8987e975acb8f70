"""The public pytest plugin ``shipyard.testing``: the ``shipyarder`` fixture and its results."""

from __future__ import annotations

import os
import sys

import pytest
import shipyard as sy
from shipyard.testing import HookRecorder
from shipyard.testing import RunResult

#: Inner pytest runs skip hypothesis' plugin: it costs seconds per run and is not used there.
INNER = ("-p", "no:hypothesispytest")

PIPELINES = """
import shipyard as sy

@sy.pipeline
def web(d):
    return [
        sy.stage("build", sy.command("make", "wheel")),
        sy.stage("release", sy.command("./release.sh", d.version), sy.wait(0), parallel=True),
    ]
"""


def test_the_fixture_is_provided_by_the_entry_point(pytestconfig):
    plugin = pytestconfig.pluginmanager.get_plugin("shipyard")
    assert plugin is not None
    assert plugin.__name__ == "shipyard.testing"


def test_isolated_project_and_environment(shipyarder, tmp_path):
    assert shipyarder.path == tmp_path
    assert os.getcwd() == str(tmp_path)
    assert str(tmp_path) in sys.path
    assert os.environ["HOME"] == str(tmp_path / "home")
    assert os.environ["SHIPYARD_DISABLE_PLUGIN_AUTOLOAD"] == "1"
    assert os.environ["NO_COLOR"] == "1"
    assert os.environ["SHIPYARD_RETRY_BACKOFF"] == "0.01"
    assert os.environ["SHIPYARD_HISTORY"] == str(shipyarder.history_path)
    assert shipyarder.history_path.parent.parent == tmp_path
    assert shipyarder.history == []


def test_callers_shipyard_variables_do_not_leak_in(pytester, monkeypatch):
    monkeypatch.setenv("SHIPYARD_FILE", "/elsewhere/pipelines.py")
    monkeypatch.setenv("SHIPYARD_PLUGINS", "some_plugin")
    monkeypatch.setenv("FORCE_COLOR", "1")
    pytester.makepyfile(
        """
        import os

        def test_clean(shipyarder):
            assert not [k for k in os.environ if k.startswith("SHIPYARD_") and k not in (
                "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD", "SHIPYARD_RETRY_BACKOFF", "SHIPYARD_HISTORY")]
            assert "FORCE_COLOR" not in os.environ
        """
    )
    pytester.runpytest(*INNER).assert_outcomes(passed=1)
    assert os.environ["SHIPYARD_FILE"] == "/elsewhere/pipelines.py"  # restored afterwards


def test_run_fake_executor_outcomes_and_hooks(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    ran = shipyarder.fake_executor(
        "command", lambda step, context: context.log(f"fake {step.name}")
    )
    result = shipyarder.run("deploy", "web", "1.4.2", "-e", "staging")
    assert isinstance(result, RunResult)
    assert result.exit_code == 0, result
    assert result.exception is None
    result.fnmatch_lines(["[[]1/2] build", "*│ fake make wheel", "*ok*make wheel*"])
    result.no_fnmatch_line("*failed*")
    result.assert_outcomes(succeeded=3)
    assert [step.name for step in ran.calls] == ["make wheel", "./release.sh 1.4.2"]
    assert isinstance(result.hooks, HookRecorder)
    finished = result.hooks.getcalls("shipyard_step_finished")
    assert sorted(call.event.step.name for call in finished) == [
        "./release.sh 1.4.2", "make wheel", "wait 0s",
    ]  # fmt: skip
    assert result.hooks.getcall("shipyard_deployment_finished").event.status == "succeeded"
    assert result.hooks.events("shipyard_stage_started")[1].stage.name == "release"
    names = result.hooks.names()
    assert names[:2] == ["shipyard_configure", "shipyard_collection_modifyitems"]
    assert names[-1] == "shipyard_unconfigure"
    assert "shipyard_step_call" in names
    assert result.deployment["version"] == "1.4.2"
    assert result.history == [result.deployment]


def test_async_handlers_and_failures(shipyarder):
    shipyarder.makepipelines(PIPELINES)

    async def handler(step, context):
        if step.name.startswith("./release"):
            raise sy.StepFailed("release refused", step_exit_code=2)
        return sy.StepResult(exit_code=0)

    shipyarder.fake_executor("command", handler)
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    result.assert_outcomes(succeeded=2, failed=1)
    step = result.deployment["stages"][1]["steps"][0]
    assert (step["status"], step["exit_code"], step["error"]) == ("failed", 2, "release refused")


def test_each_run_is_a_fresh_command(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.fake_executor("command")
    first = shipyarder.run("deploy", "web", "1", "-e", "x")
    second = shipyarder.run("deploy", "web", "2", "-e", "x")
    assert (first.deployment["id"], second.deployment["id"]) == (1, 2)
    assert first.hooks is not second.hooks
    assert len(first.hooks.getcalls("shipyard_deployment_started")) == 1
    assert len(second.hooks.getcalls("shipyard_deployment_started")) == 1
    configured = [
        r.hooks.getcall("shipyard_configure").config.pluginmanager for r in (first, second)
    ]
    assert configured[0] is not configured[1]
    assert [d["version"] for d in second.history] == ["2", "1"]
    # An edited pipelines file is read again by the next run.
    shipyarder.makepipelines(PIPELINES.replace('"build"', '"compile"'))
    assert shipyarder.run("list", "--json").json()[0]["stages"] == ["compile", "release"]


def test_plugin_objects_are_registered_through_p(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.fake_executor("command")
    seen = []

    class Listener:
        @sy.hookimpl
        def shipyard_deployment_finished(self, event):
            seen.append((event.deployment.version, str(event.status)))

    result = shipyarder.run("deploy", "web", "3", "-e", "x", plugins=[Listener()])
    assert result.exit_code == 0, result
    assert seen == [("3", "succeeded")]
    rows = {r["name"]: r for r in shipyarder.run("plugins", "--json", plugins=[Listener()]).json()}
    assert rows["shipyarder_listener"]["source"] == "-p"
    assert rows["shipyarder"]["source"] == "-p"

    class Typo:
        def shipyard_deployment_finishd(self, event):
            pass

    typo = shipyarder.run("plan", "web", "1", "-e", "x", plugins=[Typo()])
    assert typo.exit_code == 2
    assert "unknown hook 'shipyard_deployment_finishd'" in typo.stderr


def test_an_unexpected_exception_is_shown_like_the_real_command(shipyarder):
    shipyarder.makepipelines(PIPELINES)

    class Broken:
        @sy.hookimpl
        def shipyard_configure(self, config):
            raise ZeroDivisionError("plugin bug")

    result = shipyarder.run("list", plugins=[Broken()])
    assert result.exit_code == 1
    assert isinstance(result.exception, ZeroDivisionError)
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.rstrip().endswith("ZeroDivisionError: plugin bug")


def test_spawn_runs_a_real_process(shipyarder):
    shipyarder.makepipelines(PIPELINES.replace('"make", "wheel"', '"true"')
                             .replace('"./release.sh", d.version', '"true"'))  # fmt: skip
    result = shipyarder.spawn("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    result.assert_outcomes(succeeded=3)
    assert result.deployment["pid"] != os.getpid()
    with pytest.raises(AssertionError, match="hooks are recorded only for commands run in-process"):
        result.hooks.getcalls("shipyard_step_finished")


def test_result_history_follows_the_history_option(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.fake_executor("command")
    result = shipyarder.run("--history", "other.db", "deploy", "web", "1", "-e", "x")
    assert result.history_path == str(shipyarder.path / "other.db")
    assert [d["version"] for d in result.history] == ["1"]
    assert shipyarder.history == []


def test_deploy_and_plan_helpers(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    fake = shipyarder.fake_executor("command")
    assert [s.name for s in shipyarder.plan("web", "1", "x")] == ["build", "release"]
    assert fake.calls == []  # planning runs nothing
    deployed = shipyarder.deploy("web", "1", "x", vars={"a": "b"})
    assert (deployed.status, deployed.document["vars"]) == ("succeeded", {"a": "b"})
    deployed.assert_outcomes(succeeded=3)
    assert len(deployed.hooks.getcalls("shipyard_step_call")) == 3
    assert deployed.history[0]["id"] == deployed.id


FAILING_INNER = """
PIPELINES = '''
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("build", sy.command("make", "wheel")), sy.stage("ship", sy.command("ship"))]
'''

def test_lines(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.fake_executor("command")
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    result.fnmatch_lines(["[[]1/2] build", "*deployment #1 exploded*"])

def test_outcomes(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.fake_executor("command")
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    result.assert_outcomes(succeeded=1, failed=1)

def test_no_deployment(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.run("list").assert_outcomes()

def test_repr(shipyarder):
    shipyarder.makepipelines(PIPELINES)
    result = shipyarder.run("deploy", "nope", "1", "-e", "x")
    assert result.exit_code == 0, result
"""


def test_failure_messages_are_clear(pytester):
    pytester.makepyfile(FAILING_INNER)
    result = pytester.runpytest(*INNER)
    result.assert_outcomes(failed=4)
    result.stdout.fnmatch_lines(
        [
            "*test_lines*",
            "*nomatch: '[*]deployment #1 exploded[*]'*",
            "*remains unmatched: '[*]deployment #1 exploded[*]'*",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "*test_outcomes*",
            "*step outcomes of deployment #1 (succeeded) differ:*",
            "*expected {'succeeded': 1, 'failed': 1, *}*",
            "*obtained {'succeeded': 2, 'failed': 0, *}*",
            "*build / make wheel: succeeded*",
            "*ship / ship: succeeded*",
        ]
    )
    result.stdout.fnmatch_lines(["*no deployment was recorded, so there are no outcomes to check*"])
    result.stdout.fnmatch_lines(
        [
            "*test_repr*",
            "*<RunResult shipyard deploy nope 1 -e x exit_code=2>*",
            "*Error: no pipeline 'nope' in pipelines.py (defined: 'web')*",
        ]
    )


def test_teardown_stops_background_commands_and_their_steps(pytester, alive):
    pytester.makepyfile(
        """
        import time

        def test_leaves_a_deployment_running(shipyarder):
            shipyarder.makepipelines('''
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("s", sy.command("sh", "-c", "echo $$ > step.pid; exec sleep 300"))]
        ''')
            proc = shipyarder.popen("deploy", "web", "1", "-e", "x")
            pidfile = shipyarder.path / "step.pid"
            for _ in range(3000):
                if pidfile.exists() and pidfile.read_text().strip():
                    break
                time.sleep(0.01)
            (PIDS).write_text(f"{proc.pid} {pidfile.read_text()}")
        """.replace("(PIDS)", f"__import__('pathlib').Path({str(pytester.path / 'pids')!r})")
    )
    pytester.runpytest(*INNER).assert_outcomes(passed=1)
    cli_pid, step_pid = map(int, (pytester.path / "pids").read_text().split())
    assert not alive(cli_pid)
    assert not alive(step_pid)


def test_modules_from_the_project_are_forgotten(pytester):
    pytester.makepyfile(
        """
        import sys

        def test_one(shipyarder):
            shipyarder.makeplugin("myplug", "X = 1")
            shipyarder.makepipelines("import myplug")
            assert shipyarder.run("-p", "myplug", "plugins").exit_code == 0
            assert "myplug" in sys.modules

        def test_two():
            assert "myplug" not in sys.modules
            assert "shipyarder" not in sys.modules
            assert not any(getattr(m, "__file__", None) and "test_one" in str(m.__file__)
                           for m in list(sys.modules.values()))
        """
    )
    pytester.runpytest(*INNER).assert_outcomes(passed=2)


def test_the_example_in_the_module_docstring_passes(pytester):
    import textwrap

    import shipyard.testing

    doc = shipyard.testing.__doc__
    start = doc.index("::\n") + 3
    end = doc.index("\nWhat the fixture sets up")
    pytester.makepyfile(textwrap.dedent(doc[start:end]))
    pytester.runpytest(*INNER).assert_outcomes(passed=1)


def test_teardown_cancels_deployments_left_running_by_the_api(pytester, alive):
    report = pytester.path / "report.txt"
    pytester.makepyfile(
        """
        import time
        from pathlib import Path

        def test_leaves_a_deployment_running(shipyarder):
            shipyarder.makepipelines('''
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("s", sy.command("sh", "-c", "echo $$ > step.pid; exec sleep 300"))]
        ''')
            manager = shipyarder.manager()
            manager.deploy("web", "1", "x")
            pidfile = shipyarder.path / "step.pid"
            for _ in range(3000):
                if pidfile.exists() and pidfile.read_text().strip():
                    break
                time.sleep(0.01)
            Path(REPORT).write_text(f"{shipyarder.history_path}\\n{pidfile.read_text()}")
        """.replace("REPORT", repr(str(report)))
    )
    pytester.runpytest(*INNER).assert_outcomes(passed=1)
    history, pid = report.read_text().split()
    import sqlite3

    conn = sqlite3.connect(history)
    try:
        assert conn.execute("SELECT status FROM deployments").fetchall() == [("cancelled",)]
    finally:
        conn.close()
    assert not alive(int(pid))
