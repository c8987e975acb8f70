"""Locks with real processes: one deployment per pipeline and environment, dead holders, leases.

DESIGN §3: a second deployment exits 3 naming the holder, or waits its turn with --wait-lock;
a dead holder (same host: pid gone, reused or a zombie; other host: heartbeat older than the
lease) is found by any later command, its deployment becomes ``interrupted``, the lock is freed.
"""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC
from datetime import datetime

import faults
import pytest
from faults import Harness
from shipyard import Status
from shipyard._store import ProcessRef


@pytest.fixture
def sy(tmp_path) -> Iterator[Harness]:
    yield from faults.harness(tmp_path)


def _ts(age: float) -> str:
    """A history timestamp ``age`` seconds ago."""
    return datetime.fromtimestamp(time.time() - age, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _never(ref: ProcessRef) -> bool:
    return False


def _holder(
    sy: Harness, *, host: str, pid: int, proc_start: str | None, heartbeat_age: float = 0.0
) -> int:
    """Record a running deployment of app/prod holding the lock, as another process would: it
    began, planned the three stages of ``app`` and runs the second."""
    import shipyard as sy_api
    from shipyard._events import StageFinished
    from shipyard._events import StageStarted
    from shipyard._pipeline import Deployment
    from shipyard._recorder import plan_of

    with sy.store() as store:
        assert store is not None, "the history exists (_init_history)"
        dep_id = store.begin(
            pipeline="app", version="remote-1", environment="prod", info={"user": "ci"},
            owner={"pid": pid, "host": host, "proc_start": proc_start, "heartbeat_at": None},
            is_dead=_never,
        ).id  # fmt: skip
        stages = [
            sy_api.stage(name, sy_api.command("true")) for name in ("build", "release", "verify")
        ]
        store.record_plan(dep_id, plan_of(stages))
        d = Deployment(dep_id, "app", "remote-1", "prod")
        store.record([
            StageStarted(deployment=d, index=0, total=3, stage=stages[0]),
            StageFinished(deployment=d, index=0, stage=stages[0], status=Status.SUCCEEDED),
            StageStarted(deployment=d, index=1, total=3, stage=stages[1]),
        ], [])  # fmt: skip
    if heartbeat_age:
        _sqlite_age_heartbeat(sy, dep_id, heartbeat_age)
    return dep_id


def _sqlite_age_heartbeat(sy: Harness, dep_id: int, age: float) -> None:
    """SQLite only: make the last heartbeat of ``dep_id`` (its deployment and its lock) ``age``
    seconds old.

    No port call can do it, rightly: begin() records the heartbeat as now and heartbeat() renews
    it, because only the holder says it is alive. A short ``SHIPYARD_LOCK_LEASE`` and a wait
    would do for a small age (test_sigstopped_holder_keeps_its_lock does so), but not for the
    cases judged by the default 60 s lease (45 s and 90 s old), so the age is written with SQL.
    """
    beat = _ts(age)
    conn = sy.db()
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("UPDATE deployments SET heartbeat_at=? WHERE id=?", (beat, dep_id))
        conn.execute("UPDATE locks SET heartbeat_at=? WHERE deployment_id=?", (beat, dep_id))
        conn.execute("COMMIT")
    finally:
        conn.close()
    (lock,) = [lk for lk in sy.locks() if lk["deployment_id"] == dep_id]
    assert lock["heartbeat_at"] == beat


def _init_history(sy: Harness) -> None:
    r = sy.run("deploy", "app", "v0", "-e", "prod")
    assert r.code == 0, r


def test_second_deploy_exits_3_naming_the_holder(sy: Harness) -> None:
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", procs=[holder])
    second = sy.run("deploy", "app", "v2", "-e", "prod")
    assert second.code == 3, second
    assert "locked by deployment 1" in second.err, second
    assert f"pid {holder.pid}" in second.err, second
    assert "fault-tester" in second.err, second
    assert "v1" in second.err, second
    assert [d["version"] for d in sy.deployments()] == ["v1"]  # the refused one left no record
    (lock,) = sy.locks()
    assert (lock["deployment_id"], lock["pid"], lock["version"], lock["user"]) == (
        1, holder.pid, "v1", "fault-tester",
    )  # fmt: skip
    assert lock["host"] == faults.hostname()
    assert lock["proc_start"] == faults.process_start(holder.pid)
    assert lock["acquired_at"]
    assert lock["heartbeat_at"]
    sy.release()
    assert holder.wait().code == 0
    assert sy.locks() == []


def test_sigstopped_holder_keeps_its_lock(sy: Harness) -> None:
    # A tiny lease: the stopped holder's heartbeat goes stale, yet on the same host the
    # living pid wins - a paused (not dead) process keeps its lock.
    env = {"SHIPYARD_LOCK_LEASE": "0.5"}
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block", env=env)
    sy.wait_marker("release", procs=[holder])
    sy.sigstop(holder)
    try:
        sy.wait_until(
            "the stopped holder's heartbeat is older than the lease",
            lambda: time.time() - _parse(sy.locks()[0]["heartbeat_at"]) > 1.0,
        )
        second = sy.run("deploy", "app", "v2", "-e", "prod", env=env)
        assert second.code == 3, second
        assert "locked by deployment 1" in second.err
        status = sy.run("status", env=env)
        assert status.code == 0, status
        assert sy.deployment(1)["status"] == "running"
        assert len(sy.locks()) == 1
    finally:
        holder.signal(signal.SIGCONT)
    sy.release()
    done = holder.wait()
    assert done.code == 0, done
    assert sy.deployment(1)["status"] == "succeeded"
    assert sy.locks() == []
    assert sy.run("deploy", "app", "v2", "-e", "prod").code == 0


def _parse(ts: str) -> float:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp()


@pytest.mark.slow
def test_ten_deploys_at_once_exactly_one_runs(sy: Harness) -> None:
    procs = [
        sy.start("deploy", "app", f"v{i}", "-e", "prod", "--var", "mode=block") for i in range(10)
    ]
    refused = []
    # The one that got the lock blocks in its release step until we release it, so the nine
    # others must all have tried while it held the lock.
    deadline = time.monotonic() + 60
    while len(refused) < 9 and time.monotonic() < deadline:
        refused = [p for p in procs if p.poll() is not None]
        time.sleep(0.02)
    results = {p.pid: p.wait() for p in refused}
    assert len(results) == 9, [p.args for p in procs if p.poll() is None]
    assert [r for r in results.values() if r.code != 3] == []
    (runner,) = [p for p in procs if p.pid not in results]
    sy.wait_marker("release", procs=[runner])
    assert len(sy.markers_named("release")) == 1
    assert len(sy.markers_named("build")) == 1
    (dep,) = sy.deployments()
    assert dep["pid"] == runner.pid
    for r in results.values():
        assert f"locked by deployment {dep['id']}" in r.err, r
    sy.release()
    assert runner.wait().code == 0
    assert [d["status"] for d in sy.deployments()] == ["succeeded"]
    assert sy.locks() == []


@pytest.mark.slow
def test_ten_deploys_with_wait_lock_run_one_after_another_in_queue_order(sy: Harness) -> None:
    procs = [
        sy.start("deploy", "app", f"v{i}", "-e", "prod", "--var", "mode=block",
                 "--wait-lock", "120")
        for i in range(10)
    ]  # fmt: skip
    sy.wait_marker("release", procs=procs)
    # Everyone else has queued: read the queue's order (the order they will be served in).
    queue = sy.wait_until(
        "nine deployments queued",
        lambda: (q := sy.lock_queue()) and len(q) == 9 and q,
    )
    (first,) = sy.deployments()
    expected = [first["pid"]] + [q["pid"] for q in queue]
    assert sorted(expected) == sorted(p.pid for p in procs)
    assert len(sy.markers_named("release")) == 1  # still exactly one running
    sy.release()
    results = [p.wait(120) for p in procs]
    assert all(r.code == 0 for r in results), [r for r in results if r.code != 0]
    deps = sy.deployments()
    assert len(deps) == 10
    assert all(d["status"] == "succeeded" for d in deps)
    assert [d["pid"] for d in deps] == expected  # served first come, first served
    for before, after in itertools.pairwise(deps):
        assert before["finished_at"] <= after["started_at"], (before, after)  # never overlapped
    assert sy.locks() == []
    assert sy.lock_queue() == []


@pytest.mark.slow
def test_twenty_environments_at_once_all_succeed(sy: Harness) -> None:
    procs = [
        sy.start("deploy", "chatty", "v1", "-e", f"env{i}", "--var", "n=2", "--var", "lines=20")
        for i in range(20)
    ]
    results = [p.wait(120) for p in procs]
    assert all(r.code == 0 for r in results), [r for r in results if r.code != 0]
    deps = sy.deployments()
    assert sorted(d["environment"] for d in deps) == sorted(f"env{i}" for i in range(20))
    assert all(d["status"] == "succeeded" for d in deps)
    assert sum(list(sy.stages(d["id"]).values()).count("succeeded") for d in deps) == 40
    assert sy.locks() == []
    assert sy.integrity() == "ok"


@pytest.mark.parametrize(
    ("env", "age", "taken"),
    [
        pytest.param({"SHIPYARD_LOCK_LEASE": "5"}, 30, True, id="stale-heartbeat-lease-5s"),
        pytest.param({"SHIPYARD_LOCK_LEASE": "120"}, 30, False, id="fresh-heartbeat-lease-120s"),
        pytest.param({}, 1, False, id="fresh-heartbeat-default-lease"),
        pytest.param({}, 45, False, id="45s-old-within-default-60s-lease"),
        pytest.param({}, 90, True, id="90s-old-beyond-default-60s-lease"),
    ],
)
def test_other_host_holder_is_judged_by_its_heartbeat_lease(
    sy: Harness, env: dict[str, str], age: float, taken: bool
) -> None:
    _init_history(sy)
    # A pid that runs here (ours) must not matter: the holder is on another host.
    old = _holder(sy, host="ci-runner-7", pid=os.getpid(), proc_start=None, heartbeat_age=age)
    r = sy.run("deploy", "app", "v2", "-e", "prod", env=env)
    if taken:
        assert r.code == 0, r
        dep = sy.deployment(old)
        assert dep["status"] == "interrupted"
        assert "died" in dep["error"]
        assert sy.deployment(old + 1)["status"] == "succeeded"
    else:
        assert r.code == 3, r
        assert f"locked by deployment {old}" in r.err
        assert "ci-runner-7" in r.err
        assert sy.deployment(old)["status"] == "running"
        assert [lk["deployment_id"] for lk in sy.locks()] == [old]


def test_lease_from_pyproject(sy: Harness) -> None:
    (sy.root / "pyproject.toml").write_text("[tool.shipyard]\nlock_lease = 5\n")
    _init_history(sy)
    old = _holder(sy, host="ci-runner-7", pid=1, proc_start=None, heartbeat_age=30)
    # Any later command finds the expired lease, not only deploy.
    status = sy.run("status")
    assert status.code == 0, status
    assert sy.deployment(old)["status"] == "interrupted"
    assert sy.locks() == []
    # The environment variable overrides pyproject.toml.
    old = _holder(sy, host="ci-runner-7", pid=1, proc_start=None, heartbeat_age=30)
    r = sy.run("deploy", "app", "v3", "-e", "prod", env={"SHIPYARD_LOCK_LEASE": "600"})
    assert r.code == 3, r


def _zombie() -> tuple[int, str, subprocess.Popen[bytes]]:
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    start = faults.process_start(child.pid)
    assert start is not None
    assert child.stdin is not None
    child.stdin.close()
    while faults.proc_state(child.pid) != "Z":  # exited, not reaped: a zombie
        time.sleep(0.01)
    return child.pid, start, child


@pytest.mark.parametrize("how", ["pid-gone", "pid-reused", "zombie"])
def test_dead_holder_on_this_host_is_found_by_the_next_command(sy: Harness, how: str) -> None:
    _init_history(sy)
    zombie = None
    if how == "pid-gone":
        p = subprocess.Popen([sys.executable, "-c", "pass"])
        start = faults.process_start(p.pid)
        p.wait()
        pid = p.pid
    elif how == "pid-reused":  # our pid is alive, but it started at another time
        pid, start = os.getpid(), "12345"
    else:
        pid, start, zombie = _zombie()
    try:
        old = _holder(sy, host=faults.hostname(), pid=pid, proc_start=start)
        # A fresh heartbeat and the default 60 s lease: only the pid check can tell.
        r = sy.run("history")
        assert r.code == 0, r
        dep = sy.deployment(old)
        assert dep["status"] == "interrupted", dep
        assert dep["finished_at"]
        assert sy.locks() == []
        assert sy.run("deploy", "app", "v2", "-e", "prod").code == 0
    finally:
        if zombie is not None:
            zombie.wait()


def test_unlock_breaks_the_lock_and_records_who_and_why(sy: Harness) -> None:
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    step = sy.wait_marker("release", procs=[holder])
    sy.sigstop(holder)  # a stuck holder
    try:
        r = sy.run("unlock", "app", "-e", "prod", "--reason", "stuck since the outage")
        assert r.code == 0, r
        assert "deployment #1 is now interrupted" in r.out
        dep = sy.deployment(1)
        assert dep["status"] == "interrupted"
        assert "unlocked by fault-tester (stuck since the outage)" in dep["error"]
        assert sy.locks() == []
        (audit,) = [a for a in sy.audit() if a["action"] == "unlock"]
        assert (audit["user"], audit["reason"], audit["pipeline"], audit["environment"]) == (
            "fault-tester", "stuck since the outage", "app", "prod",
        )  # fmt: skip
        assert audit["host"] == faults.hostname()
        assert audit["deployment_id"] == 1
        second = sy.run("deploy", "app", "v2", "-e", "prod")
        assert second.code == 0, second
    finally:
        holder.signal(signal.SIGCONT)
    # The old holder wakes up without its lock: it must stop rather than go on deploying
    # concurrently, and must not overwrite what the history says about it.
    done = holder.wait(30)
    assert done.code == 1, done  # stopped like a cancel
    assert "the lock was lost" in done.out, done
    assert faults.wait_gone([step["pid"]], time.monotonic() + 10) == []
    dep = sy.deployment(1)
    assert dep["status"] == "interrupted", dep
    assert sy.deployment(2)["status"] == "succeeded"
    assert sy.locks() == []


def test_unlock_of_a_free_lock_is_recorded(sy: Harness) -> None:
    r = sy.run("unlock", "app", "-e", "prod", "--reason", "just checking")
    assert r.code == 0, r
    assert "was not locked" in r.out
    assert [{"user": a["user"], "reason": a["reason"]} for a in sy.audit()] == [
        {"user": "fault-tester", "reason": "just checking"}
    ]


def test_ctrl_c_while_waiting_for_the_lock_leaves_the_queue(sy: Harness) -> None:
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", procs=[holder])
    waiter = sy.start("deploy", "app", "v2", "-e", "prod", "--wait-lock", "300")
    sy.wait_until("the waiter queued", sy.lock_queue)
    waiter.signal(signal.SIGINT)
    r = waiter.wait(10)
    assert r.code == 130, r
    assert sy.lock_queue() == []
    assert [d["version"] for d in sy.deployments()] == ["v1"]
    sy.release()
    assert holder.wait().code == 0


def test_a_killed_waiter_does_not_block_the_queue(sy: Harness) -> None:
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", procs=[holder])
    dead = sy.start("deploy", "app", "v2", "-e", "prod", "--wait-lock", "300")
    sy.wait_until("the first waiter queued", sy.lock_queue)
    live = sy.start("deploy", "app", "v3", "-e", "prod", "--wait-lock", "300")
    sy.wait_until(
        "the second waiter queued",
        lambda: len(sy.lock_queue()) == 2,
    )
    dead.kill9()
    sy.release()
    assert holder.wait().code == 0
    r = live.wait(60)
    assert r.code == 0, r
    assert [d["version"] for d in sy.deployments()] == ["v1", "v3"]
    assert sy.lock_queue() == []
