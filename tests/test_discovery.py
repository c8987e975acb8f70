"""Finding and loading pipelines.py, and how every pipelines-file error is shown (DESIGN §2, §3)."""

from __future__ import annotations

import pytest

# Each case: a pipelines file, the command that meets the error, the line it must name and what
# the message must say. The marker comment `# <here>` is the line the message must point at.
ERROR_CASES = [
    pytest.param(
        """
        import shipyard as sy

        def broken(:  # <here>
            pass
        """,
        ["list"],
        "SyntaxError: invalid syntax",
        True,
        id="syntax-error",
    ),
    pytest.param(
        """
        import shipyard as sy
        import shipyard_no_such_module_xyz  # <here>
        """,
        ["list"],
        "ModuleNotFoundError: No module named 'shipyard_no_such_module_xyz'",
        True,
        id="import-error",
    ),
    pytest.param(
        """
        import shipyard as sy

        def settings():
            raise RuntimeError("no settings for this host")  # <here>

        SETTINGS = settings()
        """,
        ["list"],
        "RuntimeError: no settings for this host",
        True,
        id="exception-at-import",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("build", sy.wait(0))]

        @sy.pipeline(name="web")  # <here>
        def web2(d):
            return [sy.stage("build", sy.wait(0))]
        """,
        ["list"],
        "two pipelines are named 'web' (the other at line 3); rename one, or pass "
        "@pipeline(name=...)",
        False,
        id="duplicate-pipeline-names",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            ports = {"staging": 8080}
            return [sy.stage("build", sy.wait(ports[d.environment]))]  # <here>
        """,
        ["plan", "web", "1.0", "-e", "production"],
        "in pipeline 'web': KeyError: 'production'",
        True,
        id="pipeline-raises",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline  # <here>
        def web(d):
            return sy.wait(1)
        """,
        ["plan", "web", "1.0", "-e", "x"],
        "pipeline 'web' returned WaitStep, not a list of stages; return [shipyard.stage(...), ...]",
        False,
        id="returns-non-list",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline  # <here>
        def web(d):
            return [sy.stage("build", sy.wait(0)), "release"]
        """,
        ["deploy", "web", "1.0", "-e", "x"],
        "pipeline 'web': item 2 of the returned list is 'release', not a stage; wrap steps in "
        "shipyard.stage(name, *steps)",
        False,
        id="non-stage-item",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [
                sy.stage("build",
                    sy.command("make", tiemout=3)),  # <here>
            ]
        """,
        ["plan", "web", "1.0", "-e", "x"],
        "in pipeline 'web': command step: unknown option 'tiemout'; did you mean 'timeout'?",
        True,
        id="unknown-step-option",
    ),
    pytest.param(
        """
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("build", [sy.wait(0), sy.wait(1)])]  # <here>
        """,
        ["plan", "web", "1.0", "-e", "x"],
        "in pipeline 'web': stage 'build': step 1 is a list; pass steps as separate arguments",
        True,
        id="stage-given-a-list",
    ),
    pytest.param(
        """
        import shipyard as sy

        class Deploy(sy.Step):
            kind = "custom-unregistered"

        @sy.pipeline
        def web(d):
            return [sy.stage("build", Deploy(name="go"))]  # <here>
        """,
        ["plan", "web", "1.0", "-e", "x"],
        "pipeline 'web', stage 'build', step 'go': step type 'custom-unregistered' is not "
        "provided by any loaded plugin",
        False,
        id="unknown-step-type",
    ),
]


def marked_line(src: str) -> int:
    import textwrap

    lines = textwrap.dedent(src).lstrip("\n").splitlines()
    return next(i for i, text in enumerate(lines, 1) if "# <here>" in text)


@pytest.mark.parametrize(("src", "args", "message", "traced"), ERROR_CASES)
def test_pipelines_file_errors_name_file_and_line_without_traceback(
    shipyarder, src, args, message, traced
):
    path = shipyarder.makepipelines(src)
    result = shipyarder.run(*args)
    assert result.exit_code == 2, result
    assert result.exception is None
    first = result.stderr.splitlines()[0]
    assert first == f"Error: {path}:{marked_line(src)}: {message}" or first.startswith(
        f"Error: {path}:{marked_line(src)}: {message}"
    ), result
    assert "Traceback" not in result.output
    # A definition error is refused before anything is recorded, by deploy as by plan.
    assert result.stdout == "", result
    if "deploy" in args:
        assert result.deployment is None


@pytest.mark.parametrize("flag", ["-v", "--debug"])
@pytest.mark.parametrize(("src", "args", "message", "traced"), ERROR_CASES)
def test_verbose_adds_a_traceback_of_the_users_frames(shipyarder, src, args, message, traced, flag):
    path = shipyarder.makepipelines(src)
    result = shipyarder.run(flag, *args)
    assert result.exit_code == 2, result
    assert result.stderr.startswith(f"Error: {path}:{marked_line(src)}: {message}"), result
    if not traced:
        # Found by Shipyard's checks, not raised by the user's code: no frame to show.
        assert "Traceback" not in result.output
        return
    tb = result.stderr[result.stderr.index("Traceback") :]
    assert tb.startswith("Traceback (most recent call last, Shipyard's frames hidden):\n"), tb
    frames = [ln for ln in tb.splitlines() if ln.startswith("  File ")]
    assert frames, tb
    for frame in frames:
        assert frame.startswith(f'  File "{path}", line '), f"not a user frame: {frame}\n{tb}"
    assert f'File "{path}", line {marked_line(src)}' in tb
    assert message.removeprefix("in pipeline 'web': ") in tb.rstrip().splitlines()[-1]


def test_missing_pipelines_file_is_a_usage_error(shipyarder):
    result = shipyarder.run("list")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: no pipelines file at {shipyarder.path / 'pipelines.py'}; create one, or pass "
        "-f PATH (or set SHIPYARD_FILE)"
    ]


PIPELINES = """
import shipyard as sy

@sy.pipeline(environments=["staging"])
def {name}(d):
    "{doc}"
    return [sy.stage("build", sy.wait(0)), sy.stage("check", sy.wait(0))]
"""


@pytest.mark.parametrize("how", ["default", "-f", "--file", "SHIPYARD_FILE", "pyproject"], ids=str)
def test_discovery_finds_the_pipelines_file(shipyarder, how):
    if how == "default":
        shipyarder.makepipelines(PIPELINES.format(name="web", doc="The web app."))
        args, env = [], {}
    else:
        shipyarder.makefile("deploy/ship.py", PIPELINES.format(name="web", doc="The web app."))
        args, env = [], {}
        if how in ("-f", "--file"):
            args = [how, "deploy/ship.py"]
        elif how == "SHIPYARD_FILE":
            env = {"SHIPYARD_FILE": "deploy/ship.py"}
        else:
            shipyarder.makefile("pyproject.toml", '[tool.shipyard]\nfile = "deploy/ship.py"\n')
    result = shipyarder.run(*args, "list", env=env)
    assert result.exit_code == 0, result
    assert result.stdout.splitlines() == [
        "web  [staging]  rollback=manual",
        "    The web app.",
        "    stages: build -> check",
    ]


def test_every_pipeline_is_collected_once_in_definition_order(shipyarder):
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def zeta(d):
            return [sy.stage("s", sy.wait(0))]

        @sy.pipeline
        def alpha(d):
            return [sy.stage("s", sy.wait(0))]

        ALIAS = alpha  # the same object twice is one pipeline

        def not_a_pipeline(d):
            return []
        """
    )
    result = shipyarder.run("list", "--json")
    assert result.exit_code == 0, result
    assert [p["name"] for p in result.json()] == ["zeta", "alpha"]


def test_the_pipelines_folder_is_importable_from_anywhere(shipyarder, tmp_path_factory):
    shipyarder.makefile("deploy/helpers.py", "STAGES = ['one', 'two']\n")
    shipyarder.makefile(
        "deploy/pipelines.py",
        """
        import shipyard as sy
        from helpers import STAGES

        @sy.pipeline
        def web(d):
            return [sy.stage(name, sy.command("pwd")) for name in STAGES]
        """,
    )
    elsewhere = tmp_path_factory.mktemp("elsewhere")
    shipyarder.monkeypatch.chdir(elsewhere)
    result = shipyarder.run("-f", shipyarder.path / "deploy/pipelines.py", "list")
    assert result.exit_code == 0, result
    assert "stages: one -> two" in result.stdout
    # Commands run from the pipelines file's folder.
    result = shipyarder.run(
        "-f", shipyarder.path / "deploy/pipelines.py", "deploy", "web", "1", "-e", "x"
    )
    assert result.exit_code == 0, result
    result.fnmatch_lines([f"*│ {shipyarder.path / 'deploy'}"])


def test_two_pipelines_files_never_mix(shipyarder):
    shipyarder.makefile("a/pipelines.py", PIPELINES.format(name="alpha", doc="A."))
    shipyarder.makefile("b/pipelines.py", PIPELINES.format(name="beta", doc="B."))
    first = shipyarder.run("-f", "a/pipelines.py", "list", "--json")
    second = shipyarder.run("-f", "b/pipelines.py", "list", "--json")
    assert [p["name"] for p in first.json()] == ["alpha"]
    assert [p["name"] for p in second.json()] == ["beta"]


def test_an_edited_pipelines_file_is_read_again(shipyarder):
    shipyarder.makepipelines(PIPELINES.format(name="web", doc="First."))
    assert shipyarder.run("list", "--json").json()[0]["description"] == "First."
    shipyarder.makepipelines(PIPELINES.format(name="web", doc="Second, a longer text."))
    assert shipyarder.run("list", "--json").json()[0]["description"] == "Second, a longer text."


def test_load_module_and_collect_directly(tmp_path):
    from shipyard._discovery import collect
    from shipyard._discovery import load_module

    path = tmp_path / "pipelines.py"
    path.write_text(PIPELINES.format(name="web", doc="Doc."))
    module = load_module(path)
    assert [p.name for p in collect(module, path)] == ["web"]


def test_load_module_error_carries_path_line_and_cause(tmp_path):
    from shipyard import PipelineFileError
    from shipyard._discovery import load_module

    path = tmp_path / "pipelines.py"
    path.write_text("x = 1\ny = 1 / 0\n")
    with pytest.raises(PipelineFileError) as info:
        load_module(path)
    assert (info.value.path, info.value.lineno) == (str(path), 2)
    assert isinstance(info.value.cause, ZeroDivisionError)
    assert str(info.value) == f"{path}:2: ZeroDivisionError: division by zero"
    assert info.value.exit_code == 2


@pytest.mark.parametrize("command", ["plan", "deploy"])
def test_a_pipeline_with_no_stages_is_refused_before_anything_is_recorded(shipyarder, command):
    # Issue 12, item 8: plan and deploy refuse it alike; no "failed before any step ran" row.
    path = shipyarder.makepipelines(
        "import shipyard as sy\n\n@sy.pipeline\ndef web(d):\n    return []\n"
    )
    result = shipyarder.run(command, "web", "1.0", "-e", "x")
    assert result.exit_code == 2, result
    assert result.stderr.startswith(f"Error: {path}:3: pipeline 'web'"), result.stderr
    assert "Traceback" not in result.output
    assert result.history == []


def test_a_pipeline_that_reads_the_id_is_built_with_the_real_one(shipyarder):
    # Stages are built before the history numbers the deployment (to refuse definition errors
    # first); a pipeline that reads d.id is built again with the id the history gave.
    shipyarder.makepipelines(
        "import shipyard as sy\n\n@sy.pipeline\ndef web(d):\n"
        "    return [sy.stage('s', sy.command('echo', f'id={d.id}', name='show'))]\n"
    )
    assert shipyarder.run("deploy", "web", "1.0", "-e", "x").exit_code == 0
    second = shipyarder.run("deploy", "web", "1.1", "-e", "x")
    assert second.exit_code == 0, second
    assert "│ id=2" in second.stdout, second.stdout
