"""Crash safety with real processes: kill -9 at random moments, retry, a full disk.

DESIGN §4 and the reliability issue: kill -9 at any moment never corrupts the history or loses
a committed record, and the next command repairs the state (the dead holder's deployment becomes
``interrupted``, its lock is freed). ``retry`` resumes from the first unfinished stage. A history
that cannot be written fails clearly and stays readable.
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import faults
import pytest
from faults import Harness


@pytest.fixture
def sy(tmp_path) -> Iterator[Harness]:
    yield from faults.harness(tmp_path)


def _committed(sy: Harness, dep_id: int) -> dict[str, object]:
    """What the history holds for ``dep_id`` now (read like any other reader would)."""
    return {
        "logs": sy.query("SELECT count(*) AS n FROM logs WHERE deployment_id=?", (dep_id,))[0]["n"],
        "done": {
            (r["stage_idx"], r["idx"])
            for r in sy.query(
                "SELECT stage_idx, idx FROM steps WHERE deployment_id=? AND status='succeeded'",
                (dep_id,),
            )
        },
        "planned": sy.query("SELECT count(*) AS n FROM steps WHERE deployment_id=?", (dep_id,))[0]["n"],
    }  # fmt: skip


def _assert_repaired(sy: Harness) -> None:
    """No deployment runs without a living holder; no lock is held by a dead process."""
    for d in sy.query("SELECT * FROM deployments WHERE status IN ('running','pending')"):
        assert faults.alive(d["pid"]), f"deployment {d['id']} is running without its process"
    for lk in sy.locks():
        assert faults.alive(lk["pid"]), f"lock held by dead pid {lk['pid']}: {lk}"


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(20))
def test_kill_9_during_a_step_at_a_random_moment(sy: Harness, seed: int) -> None:
    rnd = random.Random(seed)
    # Six stages of steps that log hundreds of lines, then a stage that blocks: the kill always
    # lands while a step runs and the CLI writes the history (step commits and log batches).
    cli = sy.start("deploy", "chatty", "v1", "-e", "prod", "--var", "hold=1")
    sy.wait_marker("s0", 1, procs=[cli])
    time.sleep(rnd.uniform(0.0, 0.6))  # the random moment itself, not synchronisation
    snapshot = _committed(sy, 1)  # what was committed before the kill
    cli.kill9()

    assert sy.integrity() == "ok"
    after = _committed(sy, 1)
    assert after["logs"] >= snapshot["logs"], (snapshot, after)  # type: ignore[operator]
    assert after["done"] >= snapshot["done"], (snapshot, after)  # type: ignore[operator]
    assert after["planned"] == snapshot["planned"] == 7
    # The kill left its traces: a running deployment and a lock of a dead process ...
    assert sy.deployment(1)["status"] == "running"
    assert [lk["pid"] for lk in sy.locks()] == [cli.pid]
    # ... which the next command, whichever it is, repairs.
    status = sy.run("status")
    assert status.code == 0, status
    assert "interrupted" in status.out, status
    dep = sy.deployment(1)
    assert dep["status"] == "interrupted", dep
    assert "its process died" in dep["error"]
    assert sy.locks() == []
    _assert_repaired(sy)
    assert "running" not in {
        r["status"] for r in sy.query("SELECT status FROM stages WHERE deployment_id=1")
    }
    assert _committed(sy, 1)["logs"] == after["logs"]  # repair keeps every line
    nxt = sy.run("deploy", "chatty", "v2", "-e", "prod", "--var", "n=1")
    assert nxt.code == 0, nxt
    assert sy.deployment(2)["status"] == "succeeded"
    assert sy.integrity() == "ok"


@pytest.mark.parametrize("seed", range(5))
def test_kill_9_at_a_random_moment_from_the_start_on_a_fresh_history(
    sy: Harness, seed: int
) -> None:
    # Also before any step: creating the history, migrating it, taking the lock, planning.
    cli = sy.start("deploy", "chatty", "v1", "-e", "prod", "--var", "hold=1")
    time.sleep(random.Random(seed).uniform(0.0, 0.5))  # the random moment
    cli.kill9()
    if sy.history.exists():
        assert sy.integrity() == "ok"
    status = sy.run("status")
    assert status.code == 0, status
    nxt = sy.run("deploy", "chatty", "v2", "-e", "prod", "--var", "n=1")
    assert nxt.code == 0, nxt
    assert [d["status"] for d in sy.deployments()][-1] == "succeeded"
    assert {d["status"] for d in sy.deployments()} <= {"interrupted", "succeeded"}
    _assert_repaired(sy)
    assert sy.locks() == []
    assert sy.integrity() == "ok"


def test_an_empty_history_left_by_a_kill_during_its_creation(sy: Harness) -> None:
    # The file exists but is empty: created, then the process died before SQLite wrote to it.
    # (The random kills above land here now and then; this pins the moment.)
    sy.history.parent.mkdir(mode=0o700)
    sy.history.touch(mode=0o600)
    for cmd in ("status", "history"):
        r = sy.run(cmd)
        assert r.code == 0, r
        assert "no deployments yet" in r.out, r
    r = sy.run("deploy", "chatty", "v1", "-e", "prod", "--var", "n=1")
    assert r.code == 0, r
    assert sy.integrity() == "ok"


def test_the_next_command_stops_the_step_processes_a_kill_9_left(sy: Harness) -> None:
    """Steps run in their own process groups, so they outlive a CLI killed with SIGKILL; they
    carry the deployment's tag in their environment, and the command that finds the deployment
    dead stops them."""
    cli = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    step = sy.wait_marker("release", procs=[cli])
    assert step["pgid"] == step["pid"] != os.getpgid(0)
    cli.kill9()
    assert faults.alive(step["pid"])  # nothing stopped it yet: the CLI could not
    assert sy.run("status").code == 0
    assert sy.deployment(1)["status"] == "interrupted"
    assert not faults.alive(step["pid"])


def test_retry_after_a_failure_resumes_at_the_failed_stage(sy: Harness) -> None:
    (sy.markers / "fail-flag").touch()
    r = sy.run("deploy", "app", "v1", "-e", "prod", "--var", "color=blue")
    assert r.code == 1, r
    assert sy.stages(1) == {"build": "succeeded", "release": "succeeded", "verify": "failed"}
    (sy.markers / "fail-flag").unlink()
    r = sy.run("retry", "1")
    assert r.code == 0, r
    dep = sy.deployment(2)
    assert (dep["retry_of"], dep["version"], dep["environment"], dep["status"]) == (
        1, "v1", "prod", "succeeded",
    )  # fmt: skip
    assert '"color": "blue"' in dep["vars"]
    assert sy.stages(2) == {"build": "skipped", "release": "skipped", "verify": "succeeded"}
    notes = sy.query("SELECT note FROM stages WHERE deployment_id=2 AND idx<2")
    assert all("deployment 1" in n["note"] for n in notes), notes
    # Stages that were done are not run again.
    assert set(sy.markers_named("build")) == {"1"}
    assert set(sy.markers_named("release")) == {"1"}
    assert set(sy.markers_named("verify")) == {"1", "2"}
    assert sy.deployment(1)["status"] == "failed"  # the first record is left as it was
    h = sy.run("history")
    assert "retry of #1" in h.out, h


def test_retry_after_kill_9_resumes_at_the_interrupted_stage(sy: Harness) -> None:
    cli = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", 1, procs=[cli])
    cli.kill9()
    sy.release()  # the retried release step passes (and so does the orphan)
    r = sy.run("retry", "1")
    assert r.code == 0, r
    assert sy.deployment(1)["status"] == "interrupted"
    assert sy.stages(1) == {"build": "succeeded", "release": "interrupted", "verify": "skipped"}
    dep = sy.deployment(2)
    assert (dep["retry_of"], dep["version"], dep["environment"], dep["status"]) == (
        1, "v1", "prod", "succeeded",
    )  # fmt: skip
    assert sy.stages(2) == {"build": "skipped", "release": "succeeded", "verify": "succeeded"}
    assert set(sy.markers_named("build")) == {"1"}
    assert set(sy.markers_named("release")) == {"1", "2"}
    # A retry of the retry has nothing left to do but is allowed only for unfinished ones.
    again = sy.run("retry", "2")
    assert again.code == 2, again
    assert "succeeded" in again.err


def test_retry_of_a_retry_keeps_the_first_finished_stages(sy: Harness) -> None:
    (sy.markers / "fail-flag").touch()
    assert sy.run("deploy", "app", "v1", "-e", "prod").code == 1
    assert sy.run("retry", "1").code == 1  # verify fails again
    assert sy.stages(2) == {"build": "skipped", "release": "skipped", "verify": "failed"}
    (sy.markers / "fail-flag").unlink()
    r = sy.run("retry", "2")
    assert r.code == 0, r
    assert sy.stages(3) == {"build": "skipped", "release": "skipped", "verify": "succeeded"}
    assert sy.deployment(3)["retry_of"] == 2
    assert set(sy.markers_named("build")) == {"1"}


def test_retry_is_refused_once_the_environment_moved_on(sy: Harness) -> None:
    # Issue 12, item 1: 1.0 runs; 2.0 fails at verify and its automatic rollback restores 1.0.
    # Resuming 2.0 at verify would record "2.0 succeeded" while 1.0 is what runs.
    assert sy.run("deploy", "app", "1.0", "-e", "prod").code == 0
    (sy.markers / "fail-flag-2.0").touch()  # verify fails for 2.0 only
    assert sy.run("deploy", "app", "2.0", "-e", "prod").code == 1
    rollback = sy.deployment(3)
    assert (rollback["rollback_of"], rollback["version"], rollback["status"]) == (
        2,
        "1.0",
        "succeeded",
    )
    (sy.markers / "fail-flag-2.0").unlink()
    r = sy.run("retry", "2")
    assert r.code == 2, r
    assert "deployment 3 (a rollback to 1.0, succeeded) ran in prod after deployment 2" in r.err, r
    assert "shipyard retry 2 --from-start" in r.err
    assert "shipyard deploy app 2.0 -e prod" in r.err
    assert "Traceback" not in r.err
    assert sy.query("SELECT count(*) AS n FROM deployments")[0]["n"] == 3  # nothing recorded
    # --from-start runs every stage of 2.0 again: the record tells the truth.
    r = sy.run("retry", "2", "--from-start")
    assert r.code == 0, r
    dep = sy.deployment(4)
    assert (dep["retry_of"], dep["version"], dep["status"]) == (2, "2.0", "succeeded")
    assert sy.stages(4) == {"build": "succeeded", "release": "succeeded", "verify": "succeeded"}
    assert "4" in sy.markers_named("build")
    assert "4" in sy.markers_named("release")


def test_retry_resumes_when_nothing_ran_there_since(sy: Harness) -> None:
    # Another environment moving on does not matter; the same environment is what counts.
    (sy.markers / "fail-flag").touch()
    assert sy.run("deploy", "app", "2.0", "-e", "prod").code == 1
    (sy.markers / "fail-flag").unlink()
    assert sy.run("deploy", "app", "3.0", "-e", "staging").code == 0
    r = sy.run("retry", "1")
    assert r.code == 0, r
    assert sy.stages(sy.query("SELECT max(id) AS n FROM deployments")[0]["n"])["build"] == "skipped"


def _deploy_limited(sy: Harness, limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """``shipyard deploy ARGS`` with a file size limit (output to pipes: they have none)."""

    def set_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [str(faults.SHIPYARD), "deploy", *args], cwd=sy.root, env=sy.env, capture_output=True,
        text=True, timeout=120, preexec_fn=set_limit,
    )  # fmt: skip


def _assert_history_failure_is_clear(sy: Harness, r: subprocess.CompletedProcess[str]) -> None:
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr)
    assert f"cannot write the history at {sy.history}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_history_on_a_full_disk_rlimit_fsize(sy: Harness) -> None:
    assert sy.run("deploy", "chatty", "v0", "-e", "prod", "--var", "n=1").code == 0
    size = sy.history.stat().st_size
    # The history may grow a little, not by the megabytes of log lines the step writes.
    r = _deploy_limited(sy, size + 128 * 1024, "chatty", "v1", "-e", "prod", "--var", "lines=20000")
    _assert_history_failure_is_clear(sy, r)
    assert sy.integrity() == "ok"
    h = sy.run("history")  # readable, and repaired: the stopped deployment is not `running`
    assert h.code == 0, h
    assert [d["status"] for d in sy.deployments()] == ["succeeded", "interrupted"]
    assert sy.locks() == []
    assert sy.run("deploy", "chatty", "v2", "-e", "prod", "--var", "n=1").code == 0
    assert sy.integrity() == "ok"


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def test_history_on_a_full_tmpfs(sy: Harness, tiny_tmpfs: Path) -> None:
    sy.history = tiny_tmpfs / "history.db"
    sy.env["SHIPYARD_HISTORY"] = str(sy.history)
    assert sy.run("deploy", "chatty", "v0", "-e", "prod", "--var", "n=1").code == 0
    filler = tiny_tmpfs / "filler"
    free = os.statvfs(tiny_tmpfs).f_bavail * os.statvfs(tiny_tmpfs).f_frsize
    filler.write_bytes(b"\0" * max(free - 160 * 1024, 0))
    r = sy.start("deploy", "chatty", "v1", "-e", "prod", "--var", "lines=20000").wait()
    assert r.code == 2, r
    assert f"cannot write the history at {sy.history}" in r.err, r
    assert "full" in r.err, r
    assert "Traceback" not in r.err
    assert sy.integrity() == "ok"
    assert [d["version"] for d in sy.deployments()] == ["v0", "v1"]
    filler.unlink()
    h = sy.run("history")
    assert h.code == 0, h
    assert [d["status"] for d in sy.deployments()] == ["succeeded", "interrupted"]
    assert sy.run("deploy", "chatty", "v2", "-e", "prod", "--var", "n=1").code == 0
