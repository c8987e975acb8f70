"""The pipeline API: ``@pipeline``, ``Pipeline.build``, ``stage()`` and step options."""

from __future__ import annotations

import functools
import inspect

import pytest
import shipyard as sy
from shipyard import Deployment
from shipyard import Pipeline
from shipyard import PipelineDefinitionError
from shipyard import Stage

THIS_FILE = __file__


def deployment(**kw):
    base = {"id": 0, "pipeline": "p", "version": "1.0", "environment": "staging"}
    return Deployment(**{**base, **kw})


def line_of(marker: str) -> int:
    """The line of this file that contains ``marker`` (in a comment)."""
    lines = inspect.getsource(inspect.getmodule(line_of)).splitlines()
    hits = [i for i, text in enumerate(lines, 1) if f"# <{marker}>" in text]
    assert len(hits) == 1, marker
    return hits[0]


# -- the decorator ---------------------------------------------------------------------------------


def test_bare_decorator_returns_a_pipeline_named_after_the_function():
    @sy.pipeline
    def webapp(d):
        """Build and release.

        More words.
        """
        return [sy.stage("build", sy.wait(0))]

    assert isinstance(webapp, Pipeline)
    assert webapp.name == "webapp"
    assert webapp.description == "Build and release.\n\nMore words."
    assert webapp.environments is None
    assert webapp.rollback == "manual"
    assert webapp.notify == []
    assert repr(webapp) == "<Pipeline 'webapp'>"
    # functools.update_wrapper: the function's identity is kept and it is still callable.
    assert webapp.__name__ == "webapp"
    assert webapp.__wrapped__.__name__ == "webapp"
    assert [s.name for s in webapp(deployment())] == ["build"]


def test_decorator_with_options():
    sink = sy.jsonl("events.jsonl")

    @sy.pipeline(name="web", environments=["staging", "production"], rollback="auto", notify=[sink])
    def webapp(d):
        return [sy.stage("build", sy.wait(0))]

    assert webapp.name == "web"
    assert webapp.environments == ["staging", "production"]
    assert webapp.rollback == "auto"
    assert webapp.notify == [sink]
    assert webapp.description == ""
    assert webapp.allows("staging")
    assert not webapp.allows("dev")


def test_decorator_called_without_options_is_the_bare_form():
    @sy.pipeline()
    def webapp(d):
        return []

    assert isinstance(webapp, Pipeline)
    assert webapp.name == "webapp"
    assert webapp.allows("anywhere")


def test_a_single_environment_may_be_a_string():
    @sy.pipeline(environments="production")
    def webapp(d):
        return []

    assert webapp.environments == ["production"]
    assert not webapp.allows("prod")


def test_called_with_options_returns_a_decorator():
    decorator = sy.pipeline(rollback=False)
    assert isinstance(decorator, functools.partial)
    webapp = decorator(lambda d: [])
    assert webapp.rollback is False


@pytest.mark.parametrize("rollback", ["always", True, None, "Auto"], ids=repr)
def test_bad_rollback_mode_is_refused(rollback):
    with pytest.raises(PipelineDefinitionError, match="rollback must be 'auto', 'manual' or False"):

        @sy.pipeline(rollback=rollback)
        def webapp(d):
            return []


def test_decorating_something_not_callable_is_refused():
    with pytest.raises(PipelineDefinitionError, match="@pipeline decorates a function, got 42"):
        sy.pipeline(42)


def test_pipeline_location_is_where_it_is_defined():
    @sy.pipeline  # <decorated here>
    def webapp(d):
        return []

    assert webapp.location == (THIS_FILE, line_of("decorated here"))


# -- building: what the function returns -----------------------------------------------------------


def test_build_passes_the_deployment_and_returns_the_stages():
    seen = []

    @sy.pipeline
    def webapp(d):
        seen.append(d)
        return [
            sy.stage("build", sy.command("make", d.version)),
            sy.stage("verify", sy.wait(1), sy.wait(2), parallel=True, continue_on_failure=True),
        ]

    d = deployment(vars={"port": "1"}, previous_version="0.9", rollback_of=None)
    stages = webapp.build(d)
    assert seen == [d]
    assert [s.name for s in stages] == ["build", "verify"]
    assert [st.name for st in stages[0].steps] == ["make 1.0"]
    assert (stages[1].parallel, stages[1].continue_on_failure) == (True, True)
    assert (stages[0].parallel, stages[0].continue_on_failure) == (False, False)


@pytest.mark.parametrize(
    "returned",
    [
        pytest.param(lambda: sy.stage("only", sy.wait(0)), id="one-stage"),
        pytest.param(lambda: (sy.stage("a", sy.wait(0)), sy.stage("b", sy.wait(0))), id="tuple"),
    ],
)
def test_build_accepts_one_stage_or_a_tuple(returned):
    p = sy.pipeline(lambda d: returned())
    stages = p.build(deployment())
    assert all(isinstance(s, Stage) for s in stages)
    assert isinstance(stages, list)


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        pytest.param(None, "returned NoneType, not a list of stages", id="none"),
        pytest.param("build", "returned str, not a list of stages", id="string"),
        pytest.param({"build": 1}, "returned dict, not a list of stages", id="dict"),
        pytest.param([], "returned no stages", id="empty"),
        pytest.param(
            ["build"], "item 1 of the returned list is 'build', not a stage", id="str-item"
        ),
        pytest.param(
            [sy.stage("a", sy.wait(0)), sy.wait(0)],
            "item 2 of the returned list is <WaitStep 'wait 0s'>, not a stage",
            id="step-item",
        ),
        pytest.param(
            [sy.stage("a", sy.wait(0)), sy.stage("a", sy.wait(1))],
            "two stages are named 'a'",
            id="duplicate-stage",
        ),
    ],
)
def test_build_refuses_what_is_not_a_list_of_stages(returned, message):
    @sy.pipeline  # <bad return>
    def webapp(d):
        return returned

    with pytest.raises(PipelineDefinitionError) as info:
        webapp.build(deployment())
    assert message in str(info.value)
    assert "pipeline 'webapp'" in str(info.value)
    assert str(info.value).startswith(f"{THIS_FILE}:{line_of('bad return')}: ")
    assert (info.value.path, info.value.lineno) == (THIS_FILE, line_of("bad return"))


def test_an_exception_in_the_pipeline_function_names_the_line_that_raised():
    def helper(d):
        raise KeyError(d.version)  # <raised here>

    @sy.pipeline
    def webapp(d):
        return [sy.stage("build", helper(d))]

    with pytest.raises(PipelineDefinitionError) as info:
        webapp.build(deployment())
    assert str(info.value) == (
        f"{THIS_FILE}:{line_of('raised here')}: in pipeline 'webapp': KeyError: '1.0'"
    )
    assert isinstance(info.value.__cause__, KeyError)


def test_a_definition_error_inside_keeps_its_message_and_gets_the_line():
    @sy.pipeline
    def webapp(d):
        return [sy.stage("build", sy.command("make", tiemout=3))]  # <typo here>

    with pytest.raises(PipelineDefinitionError) as info:
        webapp.build(deployment())
    assert str(info.value) == (
        f"{THIS_FILE}:{line_of('typo here')}: in pipeline 'webapp': command step: unknown option "
        "'tiemout'; did you mean 'timeout'? (options: cwd, env, name, program, retries, shell, "
        "timeout)"
    )


# -- stages ------------------------------------------------------------------------------------------


def test_stage_keeps_its_options():
    s = sy.stage("verify", sy.wait(0), parallel=True, description="smoke tests")
    assert (s.name, s.parallel, s.continue_on_failure, s.description) == (
        "verify",
        True,
        False,
        "smoke tests",
    )
    assert [st.kind for st in s.steps] == ["wait"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        pytest.param(lambda: sy.stage(""), "stage name must be a non-empty string", id="empty"),
        pytest.param(lambda: sy.stage(3), "stage name must be a non-empty string", id="not-str"),
        pytest.param(
            lambda: sy.stage("s", [sy.wait(0)]),
            "stage 's': step 1 is a list; pass steps as separate arguments",
            id="list-of-steps",
        ),
        pytest.param(
            lambda: sy.stage("s", sy.wait(0), "make"),
            "stage 's': step 2 is 'make', not a step",
            id="string-step",
        ),
    ],
)
def test_stage_refuses_bad_arguments(call, message):
    with pytest.raises(PipelineDefinitionError, match=message):
        call()


# -- steps --------------------------------------------------------------------------------------------


def test_every_step_takes_name_timeout_and_retries():
    for step in (
        sy.command("true", name="n", timeout=2, retries=3),
        sy.python(print, name="n", timeout=2, retries=3),
        sy.wait(0, name="n", timeout=2, retries=3),
    ):
        assert (step.name, step.timeout, step.retries) == ("n", 2, 3)


def test_step_defaults():
    assert sy.command("make", "wheel").name == "make wheel"
    assert sy.command("x" * 100).name == "x" * 57 + "..."
    assert sy.python(print).name == "print"
    assert sy.wait(1.5).name == "wait 1.5s"
    step = sy.wait(1)
    assert (step.timeout, step.retries, step.kind) == (None, 0, "wait")


def test_step_location_is_where_the_user_built_it():
    step = sy.command("true")  # <built here>
    assert step.location == (THIS_FILE, line_of("built here"))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"timeout": 0}, "timeout must be a positive number of seconds, got 0"),
        ({"timeout": -1}, "timeout must be a positive number of seconds, got -1"),
        ({"timeout": "10"}, "timeout must be a positive number of seconds, got '10'"),
        ({"retries": -1}, "retries must be a whole number >= 0, got -1"),
        ({"retries": 1.5}, "retries must be a whole number >= 0, got 1.5"),
    ],
    ids=lambda v: repr(v) if isinstance(v, dict) else "",
)
def test_bad_step_options_are_refused(options, message):
    with pytest.raises(PipelineDefinitionError, match=message):
        sy.command("true", **options)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(
            lambda: sy.command("x", tiemout=3),
            "command step: unknown option 'tiemout'; did you mean 'timeout'?",
            id="command-tiemout",
        ),
        pytest.param(
            lambda: sy.command("x", retry=3),
            "command step: unknown option 'retry'; did you mean 'retries'?",
            id="command-retry",
        ),
        pytest.param(
            lambda: sy.wait(1, nmae="x"),
            "wait step: unknown option 'nmae'; did you mean 'name'?",
            id="wait-nmae",
        ),
        pytest.param(
            lambda: sy.command("x", flavour=1),
            "command step: unknown option 'flavour' (options: cwd, env, name, program, retries, "
            "shell, timeout)",
            id="no-close-match",
        ),
    ],
)
def test_unknown_step_options_suggest_the_known_ones(make, message):
    with pytest.raises(PipelineDefinitionError) as info:
        make()
    assert message in str(info.value)


def test_python_step_arguments_are_checked_against_the_signature():
    def check(url, *, threshold):
        pass

    assert sy.python(check, "http://x", threshold=1).describe() == "check('http://x', threshold=1)"
    with pytest.raises(PipelineDefinitionError, match=r"python step '.*check': missing a required"):
        sy.python(check, "http://x")
    with pytest.raises(PipelineDefinitionError, match="is not callable"):
        sy.python("check")


@pytest.mark.parametrize("seconds", [-1, "1", None, True], ids=repr)
def test_wait_needs_a_number_of_seconds(seconds):
    with pytest.raises(PipelineDefinitionError, match="wait step: seconds must be a number >= 0"):
        sy.wait(seconds)


def test_command_program_must_be_a_string():
    with pytest.raises(PipelineDefinitionError, match="the program must be a non-empty string"):
        sy.command("")
    assert sy.command("echo", 1, 2.5).args == ["1", "2.5"]
