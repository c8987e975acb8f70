"""The run protocol: stages and steps, parallelism, failures, timeouts, retries, output (DESIGN §2)."""

from __future__ import annotations

import hashlib
import re
import sqlite3

import pytest

HEADER = """
import asyncio
import sys
from pathlib import Path

import shipyard as sy

HERE = Path(__file__).parent
PY = sys.executable


def sh(script, *args, **options):
    return sy.command("sh", "-c", script, *args, **options)
"""

# A step that touches NAME.ready, then waits (at most ~LIMIT x 10ms) for OTHER.ready.
RENDEZVOUS = (
    'touch "$0.ready"; i=0; '
    'while [ ! -e "$1.ready" ]; do i=$((i+1)); [ "$i" -gt "$2" ] && exit 3; sleep 0.01; done'
)


def steps_of(doc):
    return {(s["name"], st["name"]): st for s in doc["stages"] for st in s["steps"]}


def statuses(doc):
    return {step: st["status"] for (_, step), st in steps_of(doc).items()}


def log_rows(history_path, dep_id):
    conn = sqlite3.connect(history_path)
    try:
        return conn.execute(
            "SELECT stage_idx, step_idx, ts, stream, line FROM logs WHERE deployment_id=? "
            "ORDER BY id",
            (dep_id,),
        ).fetchall()
    finally:
        conn.close()


# -- order and concurrency --------------------------------------------------------------------------


def test_stages_in_order_steps_one_after_another(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
STEP = 'test -e "$1.done" || exit 7; echo "$0" >> order.txt; touch "$0.done"'

@sy.pipeline
def web(d):
    return [
        sy.stage("one", sh(STEP, "a", "start", name="a"), sh(STEP, "b", "a", name="b")),
        sy.stage("two", sh(STEP, "c", "b", name="c")),
    ]
"""
    )
    shipyarder.makefile("start.done", "")
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    assert (shipyarder.path / "order.txt").read_text().split() == ["a", "b", "c"]
    events = [
        (
            call._name.removeprefix("shipyard_"),
            (getattr(call.event, "step", None) or call.event.stage).name,
        )
        for call in result.hooks.getcalls(
            "shipyard_stage_started shipyard_step_started shipyard_step_finished "
            "shipyard_stage_finished"
        )
    ]
    assert events == [
        ("stage_started", "one"),
        ("step_started", "a"),
        ("step_finished", "a"),
        ("step_started", "b"),
        ("step_finished", "b"),
        ("stage_finished", "one"),
        ("stage_started", "two"),
        ("step_started", "c"),
        ("step_finished", "c"),
        ("stage_finished", "two"),
    ]
    result.fnmatch_lines(["[[]1/2] one", "*ok*a*", "*ok*b*", "[[]2/2] two", "*ok*c*"])


@pytest.mark.parametrize("parallel", [True, False], ids=["parallel", "sequential"])
def test_parallel_steps_really_run_at_the_same_time(shipyarder, parallel):
    # Each step waits for the other's file: only steps running at once can both succeed. A
    # sequential stage (the control) must fail: its first step waits in vain (bounded loop).
    limit = 3000 if parallel else 30
    shipyarder.makepipelines(
        HEADER
        + f"""
@sy.pipeline
def web(d):
    return [sy.stage("meet",
        sh({RENDEZVOUS!r}, "left", "right", "{limit}", name="left", timeout=120),
        sh({RENDEZVOUS!r}, "right", "left", "{limit}", name="right", timeout=120),
        parallel={parallel})]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    if parallel:
        assert result.exit_code == 0, result
        result.assert_outcomes(succeeded=2)
    else:
        assert result.exit_code == 1, result
        assert statuses(result.deployment) == {"left": "failed", "right": "skipped"}
        assert steps_of(result.deployment)[("meet", "left")]["exit_code"] == 3


# -- failures and continue_on_failure -----------------------------------------------------------------


@pytest.mark.parametrize("parallel", [False, True], ids=["sequential", "parallel"])
def test_continue_on_failure_stops_nothing_and_ends_succeeded(shipyarder, parallel):
    shipyarder.makepipelines(
        HEADER
        + f"""
@sy.pipeline
def web(d):
    return [
        sy.stage("verify", sh("echo broken >&2; exit 4", name="smoke"),
                 sh("touch verified", name="metrics"),
                 parallel={parallel}, continue_on_failure=True),
        sy.stage("announce", sh("touch announced", name="announce")),
    ]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    assert (shipyarder.path / "verified").exists()
    assert (shipyarder.path / "announced").exists()
    doc = result.deployment
    assert doc["status"] == "succeeded"
    assert statuses(doc) == {"smoke": "failed", "metrics": "succeeded", "announce": "succeeded"}
    smoke = steps_of(doc)[("verify", "smoke")]
    assert (smoke["warning"], smoke["exit_code"]) == (True, 4)
    assert [s["status"] for s in doc["stages"]] == ["succeeded", "succeeded"]
    assert doc["error"].startswith(
        "succeeded with failed steps in continue_on_failure stages: 'smoke' (sh exited with 4"
    )
    result.assert_outcomes(succeeded=2, failed=1, warnings=1)
    result.fnmatch_lines(["*warning*smoke*", "*sh exited with 4; last output:", "*broken"])


def test_a_failure_stops_the_deployment_later_steps_and_stages_skipped(shipyarder):
    path = shipyarder.makepipelines(
        HEADER
        + """
@sy.pipeline
def web(d):
    return [
        sy.stage("build", sh("echo compiled", name="compile"),
                 sh("echo 'disk full' >&2; exit 4", name="package"),
                 sh("touch never", name="upload")),
        sy.stage("release", sh("touch never", name="release")),
    ]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1, result
    assert not (shipyarder.path / "never").exists()
    doc = result.deployment
    assert doc["status"] == "failed"
    assert statuses(doc) == {
        "compile": "succeeded", "package": "failed", "upload": "skipped", "release": "skipped",
    }  # fmt: skip
    assert [s["status"] for s in doc["stages"]] == ["failed", "skipped"]
    package = steps_of(doc)[("build", "package")]
    assert package["exit_code"] == 4
    assert package["error"] == "sh exited with 4; last output:\n  disk full"
    assert doc["error"] == (
        "step 'package' of stage 'build' failed: sh exited with 4; last output:\n  disk full"
    )
    result.assert_outcomes(succeeded=1, failed=1, skipped=2)
    assert str(path) not in doc["error"]


def test_a_failure_in_a_parallel_stage_cancels_its_siblings(shipyarder, alive):
    shipyarder.makepipelines(
        HEADER
        + """
@sy.pipeline
def web(d):
    return [
        sy.stage("checks",
                 sh('echo $$ > slow.pid; exec sleep 60', name="slow"),
                 sh('i=0; while [ ! -s slow.pid ]; do i=$((i+1)); [ $i -gt 3000 ] && exit 9;'
                    ' sleep 0.01; done; exit 5', name="fast-fail"),
                 parallel=True),
        sy.stage("release", sh("touch never", name="release")),
    ]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1, result
    doc = result.deployment
    assert statuses(doc) == {"slow": "cancelled", "fast-fail": "failed", "release": "skipped"}
    assert steps_of(doc)[("checks", "fast-fail")]["exit_code"] == 5
    assert [s["status"] for s in doc["stages"]] == ["failed", "skipped"]
    assert doc["error"].startswith("step 'fast-fail' of stage 'checks' failed: sh exited with 5")
    assert not alive(int((shipyarder.path / "slow.pid").read_text()))
    result.assert_outcomes(failed=1, cancelled=1, skipped=1)


def test_a_later_plain_failure_after_warnings_fails_the_deployment(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
@sy.pipeline
def web(d):
    return [
        sy.stage("optional", sh("exit 1", name="lint"), continue_on_failure=True),
        sy.stage("required", sh("exit 2", name="test")),
    ]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    assert result.deployment["status"] == "failed"
    assert result.deployment["error"].startswith("step 'test' of stage 'required' failed")
    result.assert_outcomes(failed=2, warnings=1)


@pytest.mark.parametrize(
    ("script", "message", "exit_code"),
    [
        pytest.param("kill -9 $$", "sh was killed by SIGKILL", -9, id="killed"),
        pytest.param("exit 0", None, 0, id="ok"),
        pytest.param("echo out; exit 12", "sh exited with 12; last output:\n  out", 12,
                     id="stdout-tail"),
    ],
)  # fmt: skip
def test_command_results(shipyarder, script, message, exit_code):
    shipyarder.makepipelines(
        HEADER
        + f"\n@sy.pipeline\ndef web(d):\n    return [sy.stage('s', sh({script!r}, name='x'))]\n"
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    step = steps_of(result.deployment)[("s", "x")]
    assert (step["exit_code"], step["error"]) == (exit_code, message)
    assert result.exit_code == (0 if message is None else 1)


def test_a_missing_program_fails_the_step_clearly(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + "\n@sy.pipeline\ndef web(d):\n    return [sy.stage('s', sy.command('no-such-prog-xyz'))]\n"
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    error = steps_of(result.deployment)[("s", "no-such-prog-xyz")]["error"]
    assert error.startswith("cannot run 'no-such-prog-xyz': no-such-prog-xyz not found")


# -- timeouts and retries --------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_timeout_kills_the_whole_process_group(shipyarder, alive):
    # The grandchild ignores SIGTERM (and keeps ignoring it across exec): only the SIGKILL sent to
    # the step's process group after the grace period stops it.
    shipyarder.makepipelines(
        HEADER
        + """
@sy.pipeline
def web(d):
    return [sy.stage("deploy",
        sh('(trap "" TERM; exec sleep 120) & echo $! > grandchild.pid; echo started; wait',
           name="hang", timeout=1))]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1, result
    step = steps_of(result.deployment)[("deploy", "hang")]
    assert (step["status"], step["error"]) == ("failed", "timed out after 1s")
    pid = int((shipyarder.path / "grandchild.pid").read_text())
    assert not alive(pid)
    result.fnmatch_lines(["*│ started", "*failed*hang*", "*timed out after 1s"])


@pytest.mark.parametrize(
    "step",
    [
        pytest.param("sy.wait(60, timeout=0.2)", id="wait"),
        pytest.param("sy.python(asyncio.sleep, 60, timeout=0.2)", id="async-python"),
    ],
)
def test_timeouts_of_other_steps(shipyarder, step):
    shipyarder.makepipelines(
        HEADER + f"\n@sy.pipeline\ndef web(d):\n    return [sy.stage('s', {step})]\n"
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    (stage,) = result.deployment["stages"]
    assert stage["steps"][0]["error"] == "timed out after 0.2s"


def test_retries_until_success_record_the_attempts(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
FLAKY = 'n=$(cat count 2>/dev/null || echo 0); n=$((n+1)); echo $n > count; '\\
        'echo "try $n"; [ $n -ge 3 ]'

@sy.pipeline
def web(d):
    return [sy.stage("s", sh(FLAKY, name="flaky", retries=4))]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    step = steps_of(result.deployment)[("s", "flaky")]
    assert (step["status"], step["attempts"]) == ("succeeded", 3)
    result.fnmatch_lines(["*ok*flaky*after 3 attempts"])
    logs = shipyarder.run("logs", "1")
    logs.fnmatch_lines(
        [
            "*[[]flaky] try 1",
            "*[[]flaky] attempt 1 of 5 failed: sh exited with 1; last output:",
            "  try 1; retrying in 0.01s",
            "*[[]flaky] try 2",
            "*[[]flaky] attempt 2 of 5 failed: sh exited with 1; last output:",
            "  try 2; retrying in 0.02s",
            "*[[]flaky] try 3",
        ]
    )
    assert len(result.hooks.getcalls("shipyard_step_call")) == 3
    assert len(result.hooks.getcalls("shipyard_step_started")) == 1


def test_retries_back_off_exponentially(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + "\n@sy.pipeline\ndef web(d):\n    return [sy.stage('s', sh('exit 1', name='x', retries=4))]\n"
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x", env={"SHIPYARD_RETRY_BACKOFF": "0.04"})
    assert result.exit_code == 1
    step = steps_of(result.deployment)[("s", "x")]
    assert (step["status"], step["attempts"]) == ("failed", 5)
    delays = [
        float(d) for d in re.findall(r"retrying in ([0-9.]+)s", shipyarder.run("logs", "1").stdout)
    ]
    # base x 2^(n-1), plus up to a quarter of the base of jitter
    assert len(delays) == 4
    for n, delay in enumerate(delays, 1):
        assert 0.04 * 2 ** (n - 1) <= delay <= 0.04 * 2 ** (n - 1) + 0.01 + 0.005, delays


def test_retries_of_a_python_step(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
CALLS = []

def flaky():
    CALLS.append(1)
    if len(CALLS) < 2:
        raise ConnectionError("try again")

@sy.pipeline
def web(d):
    return [sy.stage("s", sy.python(flaky, retries=2))]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    assert steps_of(result.deployment)[("s", "flaky")]["attempts"] == 2


# -- the environment of commands -----------------------------------------------------------------------


def test_commands_get_the_deployment_variables(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
SHOW = 'echo "$DEPLOYMENT_ID|$DEPLOYMENT_VERSION|$DEPLOYMENT_ENVIRONMENT|$DEPLOYMENT_PIPELINE|'\\
       '$DEPLOYMENT_STAGE|$INHERITED|$EXTRA|$(pwd)"'

@sy.pipeline
def webapp(d):
    return [
        sy.stage("build", sh("true")),
        sy.stage("release", sh(SHOW, name="show", env={"EXTRA": f"v={d.version}"})),
        sy.stage("sub", sh("pwd", name="cwd", cwd="sub")),
    ]
"""
    )
    (shipyarder.path / "sub").mkdir()
    shipyarder.run("deploy", "webapp", "0.1", "-e", "qa")  # deployment 1
    result = shipyarder.run("deploy", "webapp", "2.0", "-e", "staging", env={"INHERITED": "yes"})
    assert result.exit_code == 0, result
    result.fnmatch_lines(
        [
            f"*│ 2|2.0|staging|webapp|release|yes|v=2.0|{shipyarder.path}",
            f"*│ {shipyarder.path / 'sub'}",
        ]
    )


# -- output ---------------------------------------------------------------------------------------------


def test_output_is_streamed_line_by_line_with_timestamps(shipyarder):
    # The step prints "ping" and then waits for a file that a hook creates when it sees "ping":
    # it can only finish if its first line reached the hooks while it was still running.
    shipyarder.makepipelines(
        HEADER
        + """
SCRIPT = ('echo ping; echo "to stderr" >&2; i=0; while [ ! -e pong ]; do i=$((i+1)); '
          '[ $i -gt 3000 ] && exit 3; sleep 0.01; done; echo pong seen; printf "no newline"')

@sy.pipeline
def web(d):
    return [sy.stage("s", sh(SCRIPT, name="talk"))]

def shipyard_step_output(event):
    if any(line.text == "ping" for line in event.lines):
        (HERE / "pong").touch()
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    doc = result.deployment
    rows = log_rows(shipyarder.history_path, doc["id"])
    # Each stream in order (the two pipes are read concurrently, so they may interleave).
    assert [r[4] for r in rows if r[3] == "stdout"] == ["ping", "pong seen", "no newline"]
    assert [r[4] for r in rows if r[3] == "stderr"] == ["to stderr"]
    assert all((r[0], r[1]) == (0, 0) for r in rows)
    from shipyard._reports import parse_ts

    step = steps_of(doc)[("s", "talk")]
    start, end = parse_ts(step["started_at"]), parse_ts(step["finished_at"])
    stamps = [r[2] for r in rows if r[3] == "stdout"]
    assert stamps == sorted(stamps)
    assert start <= stamps[0] <= stamps[-1] <= end
    # More than one batch of output reached the hooks: line by line, not all at the end.
    assert len(result.hooks.getcalls("shipyard_step_output")) >= 3
    logs = shipyarder.run("logs", str(doc["id"]))
    logs.re_match_lines([r"^\d\d:\d\d:\d\d\.\d{3} \[talk\] ping$", r"^.* \[talk\] no newline$"])


def test_non_utf8_output_is_kept_as_replacement_characters(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + r"""
@sy.pipeline
def web(d):
    return [sy.stage("s", sy.command(PY, "-c",
        "import sys; sys.stdout.buffer.write(b'caf\\xe9 au lait\\n\\xff\\xfe end\\r\\n')",
        name="bytes"))]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    rows = log_rows(shipyarder.history_path, 1)
    assert [r[4] for r in rows] == ["caf\ufffd au lait", "\ufffd\ufffd end"]


@pytest.mark.slow
def test_a_step_printing_20_megabytes_records_every_line(shipyarder):
    lines, width = 200_000, 100
    shipyarder.makepipelines(
        HEADER
        + f"""
PRINT = '''
import sys
out = sys.stdout
for i in range({lines}):
    out.write(f"{{i:08d}} " + "x" * {width - 10} + "\\\\n")
'''

@sy.pipeline
def web(d):
    return [sy.stage("s", sy.command(PY, "-c", PRINT, name="loud"))]
"""
    )
    deployed = shipyarder.deploy("web", "1", "x")
    assert deployed.status == "succeeded", deployed.document
    expected = hashlib.sha256()
    for i in range(lines):
        expected.update((f"{i:08d} " + "x" * (width - 10) + "\n").encode())
    got = hashlib.sha256()
    count = 0
    conn = sqlite3.connect(shipyarder.history_path)
    try:
        for (line,) in conn.execute(
            "SELECT line FROM logs WHERE deployment_id=? AND stream='stdout' ORDER BY id",
            (deployed.id,),
        ):
            got.update((line + "\n").encode())
            count += 1
    finally:
        conn.close()
    assert count == lines
    assert got.hexdigest() == expected.hexdigest()


# -- python and wait steps ---------------------------------------------------------------------------------


def test_python_steps_sync_and_async(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
import threading

def sync_step(name, *, mode):
    (HERE / name).write_text(f"{mode} {threading.current_thread() is threading.main_thread()}")

async def async_step(name):
    await asyncio.sleep(0)
    (HERE / name).write_text("async")

def returns_result():
    return sy.StepResult(sy.Status.FAILED, error="chose to fail")

@sy.pipeline
def web(d):
    return [
        sy.stage("s", sy.python(sync_step, "sync.txt", mode="sync"),
                 sy.python(async_step, "async.txt"),
                 sy.python(lambda: None, name="lambda"),
                 sy.wait(0.01)),
        sy.stage("t", sy.python(returns_result)),
    ]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert (shipyarder.path / "sync.txt").read_text() == "sync False"  # ran in a worker thread
    assert (shipyarder.path / "async.txt").read_text() == "async"
    assert result.exit_code == 1
    assert statuses(result.deployment) == {
        "sync_step": "succeeded", "async_step": "succeeded", "lambda": "succeeded",
        "wait 0.01s": "succeeded", "returns_result": "failed",
    }  # fmt: skip
    assert steps_of(result.deployment)[("t", "returns_result")]["error"] == "chose to fail"


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_python_step_exception_names_file_and_line(shipyarder, kind):
    prefix = "async " if kind == "async" else ""
    path = shipyarder.makepipelines(
        HEADER
        + f"""
def helper(threshold):
    raise ValueError(f"metric below {{threshold}}")

{prefix}def check_metrics(threshold):
    helper(threshold)

@sy.pipeline
def web(d):
    return [sy.stage("verify", sy.python(check_metrics, threshold=0.99))]
"""
    )
    raise_line = (
        path.read_text().splitlines().index('    raise ValueError(f"metric below {threshold}")') + 1
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    error = steps_of(result.deployment)[("verify", "check_metrics")]["error"]
    assert error == f"ValueError: metric below 0.99 ({path}:{raise_line} in helper)"
    assert "Traceback" not in result.output


def test_skip_and_fail_from_a_python_step(shipyarder):
    shipyarder.makepipelines(
        HEADER
        + """
def not_today():
    sy.skip("nothing changed")

def refuse():
    sy.fail("quota exceeded")

@sy.pipeline
def web(d):
    return [sy.stage("s", sy.python(not_today), sy.python(refuse))]
"""
    )
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 1
    steps = steps_of(result.deployment)
    assert (steps[("s", "not_today")]["status"], steps[("s", "not_today")]["error"]) == (
        "skipped", "nothing changed",
    )  # fmt: skip
    assert (steps[("s", "refuse")]["status"], steps[("s", "refuse")]["error"]) == (
        "failed", "quota exceeded",
    )  # fmt: skip


# -- the fake executor drives the real runner ------------------------------------------------------------


def test_fake_executor_outcomes_go_through_the_runner(shipyarder):
    import shipyard as sy

    shipyarder.makepipelines(
        HEADER
        + """
@sy.pipeline
def web(d):
    return [
        sy.stage("a", sy.command("deploy-a"), sy.command("deploy-b", retries=2), parallel=True),
        sy.stage("b", sy.command("deploy-c")),
    ]
"""
    )
    attempts = {}

    def handler(step, context):
        attempts[step.name] = attempts.get(step.name, 0) + 1
        context.log(f"{step.name} attempt {context.attempt}")
        if step.name == "deploy-b" and attempts[step.name] < 3:
            raise sy.StepFailed("not yet", step_exit_code=75)
        return sy.StepResult(exit_code=0)

    fake = shipyarder.fake_executor("command", handler)
    result = shipyarder.run("deploy", "web", "1", "-e", "x")
    assert result.exit_code == 0, result
    assert attempts == {"deploy-a": 1, "deploy-b": 3, "deploy-c": 1}
    assert len(fake.calls) == 5
    assert steps_of(result.deployment)[("a", "deploy-b")]["attempts"] == 3
    result.fnmatch_lines(["*deploy-b attempt 3*"])
