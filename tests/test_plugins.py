"""Plugins: built-ins, entry points, -p, SHIPYARD_PLUGINS, hooks in pipelines.py (DESIGN §5)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from shipyard._plugins import DEFAULT_PLUGINS

REPO = Path(__file__).resolve().parent.parent

SIMPLE = """
import shipyard as sy

@sy.pipeline
def web(d):
    return [sy.stage("build", sy.command("true", name="compile")), sy.stage("wait", sy.wait(0))]
"""

GREET_PLUGIN = """
import shipyard as sy

__version__ = "2.5"

class GreetStep(sy.Step):
    kind = "greet"

    def __init__(self, who, **options):
        self.who = who
        super().__init__(**options)

    async def run(self, context):
        context.log(f"hello {self.who}")
        return sy.StepResult()

class ListNotifier:
    name = "memo"
    sent = []

    def __init__(self, value):
        self.value = value

    def send(self, payload):
        with open(self.value, "a") as f:
            f.write(payload["event"] + "\\n")

@sy.hookimpl
def shipyard_register_step_types(registry):
    registry.add(GreetStep)

@sy.hookimpl
def shipyard_register_notifiers(registry):
    registry.add("memo", ListNotifier)
"""

GREET_PIPELINES = """
import shipyard as sy
from greetplug import GreetStep

@sy.pipeline
def web(d):
    return [sy.stage("hello", GreetStep("world"))]
"""


def rows_by_name(result):
    assert result.exit_code == 0, result
    return {row["name"]: row for row in result.json()}


# -- built-ins ----------------------------------------------------------------------------------


def test_pyproject_entry_points_are_the_default_plugins():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["entry-points"]["shipyard"] == DEFAULT_PLUGINS


@pytest.mark.parametrize(("name", "module"), sorted(DEFAULT_PLUGINS.items()))
def test_every_default_plugin_imports_and_implements_hooks(name, module):
    import importlib

    plugin = importlib.import_module(module)
    assert [attr for attr in dir(plugin) if attr.startswith("shipyard_")], module


def test_builtins_are_listed_with_their_step_types_and_notifiers(shipyarder):
    rows = rows_by_name(shipyarder.run("plugins", "--json"))
    assert rows["core"]["source"] == "builtin"
    assert rows["command"]["step_types"] == ["command"]
    assert rows["python"]["step_types"] == ["python"]
    assert rows["wait"]["step_types"] == ["wait"]
    assert {"console", "jsonl"} <= set(rows["notify"]["notifiers"])
    for name in DEFAULT_PLUGINS:
        assert rows[name]["source"] == "builtin", name


def test_plugins_text_lists_name_source_step_types_and_notifiers(shipyarder):
    shipyarder.makeplugin("greetplug", GREET_PLUGIN)
    shipyarder.makepipelines(SIMPLE)
    result = shipyarder.run("-p", "greetplug", "plugins")
    assert result.exit_code == 0, result
    result.fnmatch_lines(
        [
            "core  (builtin)",
            "command  (builtin)",
            "    step types: command",
            "notify  (builtin)",
            "    notifiers:  *console*jsonl*",
            "greetplug 2.5  (-p)",
            "    step types: greet",
            "    notifiers:  memo",
            f"pipelines.py  ({shipyarder.path / 'pipelines.py'})",
        ]
    )


def test_plugins_works_without_a_pipelines_file(shipyarder):
    result = shipyarder.run("plugins")
    assert result.exit_code == 0, result
    assert "pipelines.py" not in result.stdout


# -- -p, SHIPYARD_PLUGINS, -p no: -----------------------------------------------------------------


@pytest.mark.parametrize("how", ["-p", "SHIPYARD_PLUGINS", "pyproject"])
def test_a_plugin_module_adds_a_step_type_and_a_notifier(shipyarder, how):
    shipyarder.makeplugin("greetplug", GREET_PLUGIN)
    shipyarder.makepipelines(GREET_PIPELINES)
    args, env = [], {}
    if how == "-p":
        args = ["-p", "greetplug"]
    elif how == "SHIPYARD_PLUGINS":
        env = {"SHIPYARD_PLUGINS": " greetplug , "}
    else:
        shipyarder.makefile("pyproject.toml", '[tool.shipyard]\nplugins = ["greetplug"]\n')
    rows = rows_by_name(shipyarder.run(*args, "plugins", "--json", env=env))
    assert rows["greetplug"] == {
        "name": "greetplug",
        "source": {"-p": "-p", "SHIPYARD_PLUGINS": "SHIPYARD_PLUGINS"}.get(how, "pyproject.toml"),
        "version": "2.5",
        "step_types": ["greet"],
        "notifiers": ["memo"],
        "metric_providers": [],
        "hooks": ["shipyard_register_notifiers", "shipyard_register_step_types"],
    }
    result = shipyarder.run(*args, "deploy", "web", "1", "-e", "x", "--notify", "memo:memo.txt",
                            env=env)  # fmt: skip
    assert result.exit_code == 0, result
    result.fnmatch_lines(["*│ hello world", "*ok*greet*"])
    assert (shipyarder.path / "memo.txt").read_text().splitlines()[0] == "deployment_started"
    assert (shipyarder.path / "memo.txt").read_text().splitlines()[-1] == "deployment_finished"


def test_a_missing_plugin_module_is_a_usage_error(shipyarder):
    shipyarder.makepipelines(SIMPLE)
    result = shipyarder.run("-p", "no_such_plugin_xyz", "list")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "Error: plugin 'no_such_plugin_xyz' (from -p) could not be imported: No module named "
        "'no_such_plugin_xyz'; check the module name and that its package is installed"
    ]


def test_disabling_a_builtin_removes_its_step_type(shipyarder):
    path = shipyarder.makepipelines(SIMPLE)
    rows = rows_by_name(shipyarder.run("-p", "no:wait", "plugins", "--json"))
    assert rows["wait"]["source"] == "disabled (-p no:)"
    assert rows["wait"]["step_types"] == []
    result = shipyarder.run("-p", "no:wait", "plan", "web", "1", "-e", "x")
    assert result.exit_code == 2
    assert result.stderr.splitlines()[0] == (
        f"Error: {path}:5: pipeline 'web', stage 'wait', step 'wait 0s': step type 'wait' is not "
        "provided by any loaded plugin; plugin 'wait' is disabled; `shipyard plugins` lists what "
        "is loaded"
    )
    # A deploy meets the same error before any step runs.
    result = shipyarder.run("-p", "no:wait", "deploy", "web", "1", "-e", "x")
    assert result.exit_code == 2
    assert "step type 'wait' is not provided by any loaded plugin; plugin 'wait' is disabled" in (
        result.stderr
    )
    # Refused like plan refuses it, before anything is recorded (issue 12, item 8).
    assert result.deployment is None
    assert "failed before any step ran" not in result.output


def test_disabling_a_plugin_given_with_p_wins(shipyarder):
    shipyarder.makeplugin("greetplug", GREET_PLUGIN)
    rows = rows_by_name(
        shipyarder.run("-p", "greetplug", "-p", "no:greetplug", "plugins", "--json")
    )
    assert rows["greetplug"]["source"] == "disabled (-p no:)"


def test_the_core_plugin_cannot_be_disabled(shipyarder):
    result = shipyarder.run("-p", "no:core", "plugins")
    assert result.exit_code == 2
    assert result.stderr.strip() == "Error: plugin 'core' is essential and cannot be disabled"


def test_duplicate_step_kind_names_both_plugins(shipyarder):
    shipyarder.makeplugin("greet_one", GREET_PLUGIN.replace('"memo"', '"memo1"'))
    shipyarder.makeplugin("greet_two", GREET_PLUGIN.replace('"memo"', '"memo2"'))
    result = shipyarder.run("-p", "greet_one", "-p", "greet_two", "plugins")
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("Error: step type 'greet' is registered by plugin ")
    assert "'greet_one'" in line
    assert "'greet_two'" in line
    assert line.endswith("; disable one with -p no:NAME")
    # Disabling one resolves it.
    assert shipyarder.run("-p", "greet_one", "-p", "greet_two", "-p", "no:greet_two",
                          "plugins").exit_code == 0  # fmt: skip


def test_duplicate_notifier_names_both_plugins(shipyarder):
    shipyarder.makeplugin("greet_one", GREET_PLUGIN.replace('kind = "greet"', 'kind = "g1"'))
    shipyarder.makeplugin("greet_two", GREET_PLUGIN.replace('kind = "greet"', 'kind = "g2"'))
    result = shipyarder.run("-p", "greet_one", "-p", "greet_two", "plugins")
    assert result.exit_code == 2
    assert "notifier 'memo' is registered by plugin " in result.stderr
    assert "'greet_one'" in result.stderr
    assert "'greet_two'" in result.stderr


# -- entry points and autoload ----------------------------------------------------------------------


def make_distribution(shipyarder, name="autodemo", version="1.2", module="autodemo_plugin"):
    """An installed distribution on sys.path (a dist-info folder) with a `shipyard` entry point."""
    shipyarder.makefile(
        f"{name}-{version}.dist-info/METADATA",
        f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
    )
    shipyarder.makefile(
        f"{name}-{version}.dist-info/entry_points.txt", f"[shipyard]\nautodemo = {module}\n"
    )


def test_installed_entry_points_load_only_with_autoload(shipyarder):
    make_distribution(shipyarder)
    shipyarder.makeplugin("autodemo_plugin", GREET_PLUGIN)
    # The fixture turns autoload off, as SHIPYARD_DISABLE_PLUGIN_AUTOLOAD=1 does.
    assert "autodemo" not in rows_by_name(shipyarder.run("plugins", "--json"))
    rows = rows_by_name(
        shipyarder.run("plugins", "--json", env={"SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None})
    )
    assert rows["autodemo"]["source"] == "entry point of autodemo"
    assert rows["autodemo"]["version"] == "1.2"
    assert rows["autodemo"]["step_types"] == ["greet"]
    for off in ("1", "true", "yes"):
        env = {"SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": off}
        assert "autodemo" not in rows_by_name(shipyarder.run("plugins", "--json", env=env)), off
    # Built-ins load either way.
    assert "command" in rows_by_name(shipyarder.run("plugins", "--json"))
    # -p no:NAME disables an entry point too.
    rows = rows_by_name(
        shipyarder.run("-p", "no:autodemo", "plugins", "--json",
                       env={"SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None})
    )  # fmt: skip
    assert rows["autodemo"]["source"] == "disabled (-p no:)"


def test_a_broken_entry_point_says_how_to_get_rid_of_it(shipyarder):
    make_distribution(shipyarder, module="autodemo_broken")
    shipyarder.makeplugin("autodemo_broken", "raise ImportError('needs libfoo')\n")
    result = shipyarder.run("plugins", env={"SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None})
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "Error: plugin 'autodemo' from autodemo failed to load: ImportError: needs libfoo; "
        "uninstall it or disable it with -p no:autodemo"
    )


# -- hooks ----------------------------------------------------------------------------------------------


def test_hooks_written_in_pipelines_py_fire(shipyarder):
    shipyarder.makepipelines(
        """
        from pathlib import Path

        import shipyard as sy

        LOG = Path(__file__).parent / "events.txt"

        @sy.pipeline
        def web(d):
            return [sy.stage("build", sy.command("true", name="compile"), sy.wait(0))]

        def shipyard_step_finished(event):  # unmarked: accepted like in conftest.py
            with LOG.open("a") as f:
                f.write(f"step {event.step.name} {event.result.status}\\n")

        @sy.hookimpl
        def shipyard_deployment_finished(event):
            with LOG.open("a") as f:
                f.write(f"deployment {event.deployment.id} {event.status}\\n")
        """
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    assert (shipyarder.path / "events.txt").read_text().splitlines() == [
        "step compile succeeded",
        "step wait 0s succeeded",
        "deployment 1 succeeded",
    ]
    rows = rows_by_name(shipyarder.run("plugins", "--json"))
    assert rows["pipelines.py"]["hooks"] == [
        "shipyard_deployment_finished",
        "shipyard_step_finished",
    ]


@pytest.mark.parametrize("where", ["pipelines.py", "-p"])
def test_a_misspelt_hook_fails_clearly(shipyarder, where):
    src = "def shipyard_step_finishd(event):\n    pass\n"
    path = shipyarder.makepipelines(SIMPLE + ("\n" + src if where == "pipelines.py" else ""))
    args = []
    if where == "-p":
        shipyarder.makeplugin("typoplug", src)
        args = ["-p", "typoplug"]
    result = shipyarder.run(*args, "deploy", "web", "1", "-e", "x")
    assert result.exit_code == 2, result
    (line,) = result.stderr.splitlines()
    assert "unknown hook 'shipyard_step_finishd'" in line
    assert "does not exist" in line
    assert str(path) in line if where == "pipelines.py" else "typoplug" in line
    assert not shipyarder.history_path.exists()  # nothing ran


def test_other_attributes_of_pipelines_py_are_not_hooks(shipyarder):
    shipyarder.makepipelines(SIMPLE + "\nshipyard_notes = 'just a string'\nSHIPYARD_X = 1\n")
    assert shipyarder.run("plan", "web", "1", "-e", "x").exit_code == 0


def test_a_raising_event_hook_never_fails_the_deployment(shipyarder):
    shipyarder.makepipelines(
        SIMPLE
        + """
def shipyard_step_finished(event):
    raise RuntimeError("sink is down")
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    result.fnmatch_lines(
        ["shipyard: warning: plugin hook shipyard_step_finished raised RuntimeError: sink is down"]
    )
    result.assert_outcomes(succeeded=2)
    logs = shipyarder.run("logs", "1")
    logs.fnmatch_lines(["*[[]shipyard] plugin hook shipyard_step_finished raised RuntimeError*"])


def test_a_plugin_can_wrap_the_executor(shipyarder):
    shipyarder.makeplugin(
        "wrapplug",
        """
        import shipyard as sy

        @sy.hookimpl(wrapper=True)
        def shipyard_step_call(step, context):
            awaitable = yield

            async def wrapped():
                context.log(f"before {step.name}")
                result = await awaitable
                context.log(f"after {step.name}: {result.status}")
                return result

            return wrapped()
        """,
    )
    shipyarder.makepipelines(SIMPLE)
    result = shipyarder.run("-p", "wrapplug", "deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    result.fnmatch_lines(
        ["*│ before compile", "*│ after compile: succeeded", "*ok*compile*", "*│ before wait 0s"]
    )


def test_a_plugin_can_replace_the_executor_first_result_wins(shipyarder):
    shipyarder.makeplugin(
        "fakeplug",
        """
        import shipyard as sy

        @sy.hookimpl
        def shipyard_step_call(step, context):
            if step.kind != "command":
                return None  # let the others (the built-in executor) run it

            async def fake():
                context.log(f"pretending to run {step.name}")
                return sy.StepResult(exit_code=0)

            return fake()
        """,
    )
    shipyarder.makepipelines(SIMPLE.replace('"true"', '"/no/such/program"'))
    result = shipyarder.run("-p", "fakeplug", "deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    result.fnmatch_lines(["*│ pretending to run compile"])


def test_configure_collection_and_unconfigure_hooks(shipyarder):
    shipyarder.makeplugin(
        "filterplug",
        """
        import shipyard as sy

        @sy.hookimpl
        def shipyard_collection_modifyitems(pipelines, config):
            pipelines[:] = [p for p in pipelines if not p.name.startswith("wip_")]
        """,
    )
    shipyarder.makepipelines(SIMPLE + "\n@sy.pipeline\ndef wip_api(d):\n    return []\n")
    result = shipyarder.run("-p", "filterplug", "list", "--json")
    assert [p["name"] for p in result.json()] == ["web"]
    assert result.hooks.names() == [
        "shipyard_configure",
        "shipyard_collection_modifyitems",
        "shipyard_unconfigure",
    ]
    assert result.hooks.getcall("shipyard_configure").config.pipelines_file == (
        shipyarder.path / "pipelines.py"
    )


def test_a_plugin_can_add_a_command(shipyarder):
    shipyarder.makeplugin(
        "cmdplug",
        """
        import click
        import shipyard as sy

        @click.command()
        @click.argument("who")
        def hello(who):
            "Say hello."
            click.echo(f"hello {who}")

        @sy.hookimpl
        def shipyard_addcommands(cli):
            cli.add_command(hello)
        """,
    )
    shipyarder.makepipelines(SIMPLE)
    result = shipyarder.run("-p", "cmdplug", "hello", "world")
    assert result.exit_code == 0, result
    assert result.stdout == "hello world\n"
    # Registered on this invocation's own group, not on the global one (issue 12, item 12).
    from shipyard._cli import cli

    assert "hello" not in cli.commands
    again = shipyarder.run("hello", "world")  # without -p cmdplug: no such command now
    assert again.exit_code == 2, again
    assert "No such command 'hello'" in again.stderr


def test_a_plugin_whose_commands_fail_is_named_with_its_error(shipyarder):
    shipyarder.makeplugin(
        "brokencmds",
        """
        import shipyard as sy

        @sy.hookimpl
        def shipyard_addcommands(cli):
            raise RuntimeError("the command table is not ready")
        """,
    )
    shipyarder.makeplugin(
        "okcmds",
        """
        import click
        import shipyard as sy

        @click.command()
        def ping():
            click.echo("pong")

        @sy.hookimpl
        def shipyard_addcommands(cli):
            cli.add_command(ping)
        """,
    )
    shipyarder.makepipelines(SIMPLE)
    missing = shipyarder.run("-p", "brokencmds", "-p", "okcmds", "deploy-canary")
    assert missing.exit_code == 2, missing
    assert (
        "No such command 'deploy-canary'; plugin 'brokencmds' failed to add its commands: "
        "RuntimeError: the command table is not ready"
    ) in missing.stderr, missing.stderr
    assert "Traceback" not in missing.output
    # The other plugin's commands still work; the failure is a warning beside them.
    ok = shipyarder.run("-p", "brokencmds", "-p", "okcmds", "ping")
    assert ok.exit_code == 0, ok
    assert ok.stdout == "pong\n"
    assert "plugin 'brokencmds' failed to add its commands" in ok.stderr


# -- a real third-party distribution, built and installed --------------------------------------------


@pytest.fixture
def thirdparty_site(tmp_path_factory, resources):
    """The demo distribution of tests/resources/thirdparty, built as a wheel and installed."""
    work = tmp_path_factory.mktemp("thirdparty")
    src = work / "src"
    shutil.copytree(resources / "thirdparty", src, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INDEX": "1"}
    build = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work / "dist",
         src],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (work / "dist").glob("*.whl")
    assert wheel.name == "shipyard_thirdparty_demo-0.3.0-py3-none-any.whl"
    site = work / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--target", site,
         wheel],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    return site


@pytest.mark.slow
def test_a_third_party_distribution_adds_a_step_type_and_a_notifier(shipyarder, thirdparty_site):
    env = {"PYTHONPATH": str(thirdparty_site), "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": None}
    shipyarder.makepipelines(
        """
        import shipyard as sy
        from shipyard_thirdparty_demo import greet

        @sy.pipeline(environments=["staging"])
        def web(d):
            return [
                sy.stage("hello", greet("world")),
                sy.stage("build", sy.command("true", name="compile")),
            ]
        """
    )
    listed = shipyarder.spawn("plugins", env=env)
    assert listed.exit_code == 0, listed
    listed.fnmatch_lines(
        [
            "thirdparty 0.3.0  (entry point of shipyard[-_]thirdparty[-_]demo)".replace(
                "[-_]", "?"
            ),
            "    step types: greet",
            "    notifiers:  demo-file",
        ]
    )
    rows = {r["name"]: r for r in json.loads(shipyarder.spawn("plugins", "--json", env=env).stdout)}
    assert rows["thirdparty"]["version"] == "0.3.0"
    assert rows["thirdparty"]["source"].replace("-", "_") == (
        "entry point of shipyard_thirdparty_demo"
    )

    notes = shipyarder.path / "notes.jsonl"
    deployed = shipyarder.spawn(
        "deploy", "web", "2.0", "-e", "staging", "--notify", f"demo-file:{notes}", env=env
    )
    assert deployed.exit_code == 0, deployed
    deployed.fnmatch_lines(["*│ hello, world, from staging", "*ok*greet world*"])
    deployed.assert_outcomes(succeeded=2)
    events = [json.loads(line) for line in notes.read_text().splitlines()]
    assert events[0] == {"event": "deployment_started", "status": "running", "step": None,
                         "version": "2.0"}  # fmt: skip
    assert {"event": "step_finished", "status": "succeeded", "step": "greet world",
            "version": "2.0"} in events  # fmt: skip
    assert events[-1]["event"] == "deployment_finished"
    assert events[-1]["status"] == "succeeded"

    # Named with -p too while installed: registered once, works (issue 12, item 13).
    both = shipyarder.spawn("-p", "shipyard_thirdparty_demo", "plan", "web", "2.0", "-e", "staging",
                            env=env)  # fmt: skip
    assert both.exit_code == 0, both
    assert "greet" in both.stdout
    twice = shipyarder.spawn("-p", "shipyard_thirdparty_demo", "plugins", "--json", env=env)
    names = [r["name"] for r in json.loads(twice.stdout)]
    assert names.count("thirdparty") + names.count("shipyard_thirdparty_demo") == 1, names

    # With autoload off the distribution is not loaded; its step type is then unknown.
    off = shipyarder.spawn("plugins", env={**env, "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert "thirdparty" not in off.stdout
    refused = shipyarder.spawn(
        "plan", "web", "2.0", "-e", "staging", env={**env, "SHIPYARD_DISABLE_PLUGIN_AUTOLOAD": "1"}
    )
    assert refused.exit_code == 2
    assert "step type 'greet' is not provided by any loaded plugin" in refused.stderr


def test_shipyards_own_wheel_maps_the_folders_and_declares_the_entry_points(tmp_path):
    """DESIGN §1: one distribution; core/, plugins/, contrib/ become shipyard[.plugins|.contrib]."""
    import shutil
    import subprocess
    import zipfile

    from test_examples import _can_build_offline

    # A copy: setuptools builds in place, and the source tree must stay clean for parallel runs.
    root = tmp_path / "src"
    repo = Path(__file__).resolve().parents[1]
    root.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(repo / name, root / name)
    for name in ("core", "plugins", "contrib"):
        shutil.copytree(repo / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    isolation = ["--no-build-isolation"] if _can_build_offline() else []
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", *isolation,
         "--wheel-dir", str(tmp_path / "dist"), str(root)],
        check=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("shipyard-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (ep_name,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        entry_points = z.read(ep_name).decode()
    for module in ("shipyard/__init__.py", "shipyard/hookspecs.py", "shipyard/testing.py",
                   "shipyard/py.typed", "shipyard/plugins/command.py",
                   "shipyard/contrib/slack.py"):  # fmt: skip
        assert module in names, sorted(names)
    assert not any(n.startswith(("core/", "plugins/", "contrib/", "tests/")) for n in names)
    assert "shipyard = shipyard._cli:main" in entry_points
    assert "[pytest11]" in entry_points
    for name, module in DEFAULT_PLUGINS.items():
        assert f"{name} = {module}" in entry_points


def test_a_plugin_store_missing_port_methods_is_refused_naming_them(shipyarder):
    shipyarder.makeplugin(
        "halfstore",
        """
        import shipyard as sy

        class HalfStore:
            url = "half://x"

            def get(self, dep_id):
                return None

        @sy.hookimpl
        def shipyard_store_open(url, create):
            return HalfStore() if url.startswith("half://") else None

        @sy.hookimpl
        def shipyard_store_schemes():
            return ["half"]
    """,
    )
    shipyarder.makepipelines("""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("s", sy.command("true"))]
    """)
    result = shipyarder.run("-p", "halfstore", "--store", "half://x", "history")
    assert result.exit_code == 2, result.output
    assert (
        "the plugin's store HalfStore does not implement shipyard.sdk.HistoryStore" in result.output
    )
    assert "change_token" in result.output
    assert "record_measurement" in result.output
    missing = result.output.split("(missing: ")[1].split(")")[0].split(", ")
    assert "get" not in missing  # it has that one
    assert "deployments" in missing
