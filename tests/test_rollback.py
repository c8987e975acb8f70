"""Rollback with real processes: the target rule, automatic rollback, refusals.

DESIGN §2 and §4: a rollback of X deploys the latest succeeded version of the same pipeline and
environment before X, skipping X's version and deployments that were themselves rolled back -
rolling back twice never returns to the bad version. ``rollback="auto"`` rolls back once when a
deployment fails (the exit code stays 1); ``--no-rollback`` turns it off; ``rollback=False``
refuses. Refusals exit 2 and say what exists instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import faults
import pytest
from faults import Harness


@pytest.fixture
def sy(tmp_path) -> Iterator[Harness]:
    yield from faults.harness(tmp_path)


def _deploy(sy: Harness, pipeline: str, *versions: str, env: str = "prod") -> None:
    for v in versions:
        r = sy.run("deploy", pipeline, v, "-e", env)
        assert r.code == 0, r


def _summary(sy: Harness) -> list[tuple[int, str, str, int | None]]:
    return [(d["id"], d["version"], d["status"], d["rollback_of"]) for d in sy.deployments()]


@pytest.mark.slow
def test_rolling_back_twice_never_returns_to_the_bad_version(sy: Harness) -> None:
    # v3 is bad, and it had already succeeded once before (deployment 2).
    _deploy(sy, "manual", "v1", "v3", "v2", "v3")
    r = sy.run("rollback", "4", "--reason", "v3 is broken")
    assert r.code == 0, r
    assert "rolling back deployment #4 (v3) to version v2 (from deployment #3)" in r.out
    r = sy.run("rollback", "manual", "-e", "prod")
    assert r.code == 0, r
    assert _summary(sy)[4:] == [(5, "v2", "succeeded", 4), (6, "v1", "succeeded", 5)]
    assert "v3" not in {v for _, v, _, rb in _summary(sy) if rb}
    (audit,) = sy.query("SELECT reason FROM audit WHERE action='rollback' AND deployment_id=5")
    assert audit["reason"] == "v3 is broken"
    # A third time: every earlier version was rolled back along the way; refused, naming
    # what is there.
    r = sy.run("rollback", "manual", "-e", "prod")
    assert r.code == 2, r
    assert "nothing to roll back to" in r.err, r
    assert "before it there: #5 v2 succeeded (rolled back), #4 v3 succeeded (rolled back)" in r.err
    assert len(sy.deployments()) == 6


def test_automatic_rollback_runs_once_and_the_exit_code_stays_1(sy: Harness) -> None:
    _deploy(sy, "app", "v1")
    r = sy.run("deploy", "app", "bad2", "-e", "prod")
    assert r.code == 1, r
    assert "automatic rollback #3 succeeded; deployment #2 stays failed" in r.out, r
    assert _summary(sy) == [
        (1, "v1", "succeeded", None), (2, "bad2", "failed", None), (3, "v1", "succeeded", 2),
    ]  # fmt: skip


def test_a_failing_automatic_rollback_is_not_rolled_back_again(sy: Harness) -> None:
    _deploy(sy, "app", "v1")
    (sy.markers / "fail-flag").touch()  # from now on every version fails its verify stage
    r = sy.run("deploy", "app", "v2", "-e", "prod")
    assert r.code == 1, r
    assert _summary(sy) == [
        (1, "v1", "succeeded", None), (2, "v2", "failed", None), (3, "v1", "failed", 2),
    ]  # fmt: skip
    assert sy.locks() == []


def test_no_rollback_flag_turns_the_automatic_rollback_off_for_one_run(sy: Harness) -> None:
    _deploy(sy, "app", "v1")
    r = sy.run("deploy", "app", "bad2", "-e", "prod", "--no-rollback")
    assert r.code == 1, r
    assert _summary(sy) == [(1, "v1", "succeeded", None), (2, "bad2", "failed", None)]
    r = sy.run("deploy", "app", "bad3", "-e", "prod")  # the next run rolls back again
    assert r.code == 1, r
    assert _summary(sy)[2:] == [(3, "bad3", "failed", None), (4, "v1", "succeeded", 3)]


def test_rollback_false_refuses(sy: Harness) -> None:
    _deploy(sy, "pinned", "v1")
    r = sy.run("deploy", "pinned", "bad2", "-e", "prod")
    assert r.code == 1, r  # no automatic rollback either
    for args in (("rollback", "pinned", "-e", "prod"), ("rollback", "2")):
        r = sy.run(*args)
        assert r.code == 2, r
        assert "'pinned' refuses rollback (rollback=False); deploy a version instead" in r.err, r
    assert len(sy.deployments()) == 2


def test_unknown_deployment_says_which_ids_exist(sy: Harness) -> None:
    r = sy.run("rollback", "1")
    assert r.code == 2, r
    assert f"no history at {sy.history}; nothing has been deployed from here yet" in r.err, r
    _deploy(sy, "manual", "v1", "v2")
    r = sy.run("rollback", "99")
    assert r.code == 2, r
    assert "no deployment 99 in the history (ids go from 1 to 2)" in r.err, r


def test_pipeline_never_deployed_to_the_environment_says_where_it_was(sy: Harness) -> None:
    _deploy(sy, "manual", "v1", env="prod")
    _deploy(sy, "manual", "v1", env="qa")
    r = sy.run("rollback", "manual", "-e", "staging")
    assert r.code == 2, r
    assert "nothing was deployed of 'manual' to 'staging'; it was deployed to 'prod', 'qa'" in r.err
    r = sy.run("rollback", "app", "-e", "prod")
    assert r.code == 2, r
    assert "'app' was never deployed anywhere" in r.err, r


def test_no_previous_deployment_says_what_is_there(sy: Harness) -> None:
    _deploy(sy, "manual", "v1")
    r = sy.run("rollback", "1")
    assert r.code == 2, r
    assert "nothing to roll back to" in r.err
    assert "nothing was deployed there before it" in r.err
    r = sy.run("deploy", "manual", "bad2", "-e", "prod")
    assert r.code == 1, r
    _deploy(sy, "manual", "v1")
    r = sy.run("rollback", "manual", "-e", "prod")
    assert r.code == 2, r
    assert "before it there: #2 bad2 failed, #1 v1 succeeded" in r.err, r
    assert len(sy.deployments()) == 3


def test_rollback_exits_3_while_the_environment_is_locked(sy: Harness) -> None:
    _deploy(sy, "manual", "v1", "v2")
    holder = sy.start("deploy", "manual", "v3", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", 3, procs=[holder])
    r = sy.run("rollback", "2")
    assert r.code == 3, r
    assert "locked by deployment 3" in r.err
    sy.release()
    assert holder.wait().code == 0
    r = sy.run("rollback", "manual", "-e", "prod", "--json")
    assert r.code == 0, r
    doc = json.loads(r.out)
    assert (doc["id"], doc["version"], doc["rollback_of"], doc["status"]) == (
        4,
        "v2",
        3,
        "succeeded",
    )
    assert [s["name"] for s in doc["stages"]] == ["build", "release", "verify"]
