"""The contract of a history store: what every :class:`shipyard.HistoryStore` must do.

The tests here use nothing but the port (core/_store.py): no SQL, no file, no knowledge of the
backend. They run against every backend listed in ``STORE_BACKENDS`` (tests/conftest.py) through
the ``store_factory`` fixture:

- ``store_factory()`` opens a fresh, empty store;
- ``store_factory.reopen(store)`` opens a second connection to the same store, as another
  process would (locks, queues and heartbeats are about several processes);
- ``store_factory.new_url()`` is the URL of a fresh, empty store as ``--history`` accepts it,
  for the tests that run the engine itself against the store.

tests/test_store_contract.py collects these tests; a third-party store runs them by providing
its own ``store_factory`` fixture and importing this module the same way. What is specific to
one backend (the SQLite file format, its pragmas, its query plans) is tested beside it, e.g. in
tests/test_history.py.

Sections: a deployment's life (begin and the lock, the queue, the plan, transitions and logs,
finish, heartbeat, cancel, unlock, audit, repair), questions (get, deployments, stages, logs,
locks, previous_version, latest, rollback_target, with the DESIGN §4 property tests), the engine
against the store (every record kept), and concurrency.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import shipyard as sy
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from shipyard import DeploymentNotFound
from shipyard import EnvironmentLocked
from shipyard import HistoryStore
from shipyard import NoPreviousDeployment
from shipyard import Status
from shipyard import StepResult
from shipyard._identity import runner_identity
from shipyard.sdk import ArtifactRow
from shipyard.sdk import AuditRow
from shipyard.sdk import Deployment
from shipyard.sdk import DeploymentInfo
from shipyard.sdk import DeploymentRow
from shipyard.sdk import LockRow
from shipyard.sdk import LogLine
from shipyard.sdk import LogRecord
from shipyard.sdk import LogRow
from shipyard.sdk import MeasurementRow
from shipyard.sdk import ProcessRef
from shipyard.sdk import StageFinished
from shipyard.sdk import StagePlan
from shipyard.sdk import StageRow
from shipyard.sdk import StageStarted
from shipyard.sdk import StepFinished
from shipyard.sdk import StepOutput
from shipyard.sdk import StepPlan
from shipyard.sdk import StepRow
from shipyard.sdk import StepStarted
from shipyard.sdk import plan_of
from shipyard.sdk import utcnow

# -- the factory ----------------------------------------------------------------------------------


class StoreFactory:
    """Opens stores of one backend for a test, and closes every one of them at its end.

    ``backend`` has ``new_url()`` (a fresh, empty store), ``open(url)`` (a new connection) and
    ``cleanup()``; see ``STORE_BACKENDS`` in tests/conftest.py.
    """

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        #: The open connections, by id(), with the URL each was opened from.
        self._open: dict[int, tuple[HistoryStore, str]] = {}

    def new_url(self) -> str:
        """The URL of a fresh, empty store (nothing opened yet)."""
        return self.backend.new_url()

    def open(self, url: str) -> HistoryStore:
        """A new connection to the store at ``url``."""
        store = self.backend.open(url)
        assert isinstance(store, HistoryStore)
        self._open[id(store)] = (store, url)
        return store

    def __call__(self) -> HistoryStore:
        """A fresh, empty store."""
        return self.open(self.new_url())

    def url_of(self, store: HistoryStore) -> str:
        return self._open[id(store)][1]

    def reopen(self, store: HistoryStore) -> HistoryStore:
        """A second connection to the same store, as another process opens it."""
        return self.open(self.url_of(store))

    def close(self, store: HistoryStore) -> None:
        if self._open.pop(id(store), None) is not None:
            store.close()

    @contextmanager
    def fresh(self) -> Iterator[HistoryStore]:
        """A fresh store closed, with every connection reopened to it, on leaving (for the
        property tests, which make one per example)."""
        store = self()
        url = self.url_of(store)
        try:
            yield store
        finally:
            for other, other_url in list(self._open.values()):
                if other_url == url:
                    self.close(other)

    def close_all(self) -> None:
        for store, _ in reversed(list(self._open.values())):
            self.close(store)
        self.backend.cleanup()


# -- helpers ----------------------------------------------------------------------------------------


def never(ref: ProcessRef) -> bool:
    """The liveness predicate of a world where nobody dies."""
    return False


def always(ref: ProcessRef) -> bool:
    """... and of one where everybody else already did."""
    return True


class Witness:
    """A liveness predicate that records what it was asked about; ``dead`` pids are dead."""

    def __init__(self, *dead: int) -> None:
        self.dead = set(dead)
        self.asked: list[ProcessRef] = []

    def __call__(self, ref: ProcessRef) -> bool:
        self.asked.append(dict(ref))  # type: ignore[arg-type]
        return ref["pid"] in self.dead


def owner(pid: int = 100, host: str = "host-a", proc_start: str | None = "4242",
          heartbeat_at: str | None = None) -> ProcessRef:  # fmt: skip
    return {"pid": pid, "host": host, "proc_start": proc_start, "heartbeat_at": heartbeat_at}


def begin(store: HistoryStore, version: str = "v1", *, pipeline: str = "web",
          environment: str = "prod", pid: int = 100, host: str = "host-a", is_dead=never,
          **kw: Any) -> int:  # fmt: skip
    """Begin a deployment (taking the lock unless ``lock=False``); its id."""
    return store.begin(
        pipeline=pipeline, version=version, environment=environment,
        owner=owner(pid, host), is_dead=is_dead, **kw,
    ).id  # fmt: skip


def succeeded(store: HistoryStore, version: str = "v1", **kw: Any) -> int:
    dep_id = begin(store, version, **kw)
    store.finish(dep_id, Status.SUCCEEDED, None)
    return dep_id


INFO: DeploymentInfo = {
    "user": "alice",
    "ci_actor": "GITHUB_ACTOR=release-bot",
    "pipelines_file": "/srv/deploy/pipelines.py",
    "file_hash": "9f2c" * 16,
    "git_commit": "c0ffee" * 6 + "c0ff",
    "args": ["deploy", "web", "v1", "-e", "prod"],
    "vars": {"color": "blue", "replicas": "3"},
    "shipyard_version": "9.9.9",
}


def keys_of(row_type: Any) -> set[str]:
    return set(row_type.__required_keys__) | set(row_type.__optional_keys__)


def stages_of_a_pipeline() -> list[sy.Stage]:
    """Three stages of real steps, as a pipeline function returns them."""
    return [
        sy.stage("build", sy.command("true", name="compile"), sy.command("true", name="package")),
        sy.stage("verify", sy.command("true", name="smoke"), sy.command("true", name="metrics"),
                 parallel=True, continue_on_failure=True),
        sy.stage("release", sy.command("true", name="publish")),
    ]  # fmt: skip


class Runner:
    """Builds the runner's own event objects for one deployment, as core/_runner.py emits them."""

    def __init__(self, dep_id: int, stages: list[sy.Stage]) -> None:
        self.deployment = Deployment(dep_id, "web", "v1", "prod")
        self.stages = stages

    def stage_started(self, si: int) -> StageStarted:
        return StageStarted(deployment=self.deployment, index=si, total=len(self.stages),
                            stage=self.stages[si])  # fmt: skip

    def step_started(self, si: int, i: int) -> StepStarted:
        stage = self.stages[si]
        return StepStarted(deployment=self.deployment, stage=stage, stage_index=si, index=i,
                           step=stage.steps[i])  # fmt: skip

    def step_finished(self, si: int, i: int, result: StepResult) -> StepFinished:
        stage = self.stages[si]
        return StepFinished(deployment=self.deployment, stage=stage, stage_index=si, index=i,
                            step=stage.steps[i], result=result)  # fmt: skip

    def stage_finished(self, si: int, status: Status) -> StageFinished:
        return StageFinished(deployment=self.deployment, index=si, stage=self.stages[si],
                             status=status)  # fmt: skip

    def output(self, si: int, i: int, *texts: str, stream: str = "stdout") -> StepOutput:
        return StepOutput(deployment=self.deployment, stage_index=si, index=i,
                          step=self.stages[si].steps[i],
                          lines=[LogLine(time.time(), stream, t) for t in texts])  # fmt: skip


def records(*outputs: StepOutput) -> list[LogRecord]:
    """The log records of ``StepOutput`` events, as the recorder (core/_recorder.py) makes them."""
    return [
        LogRecord(e.deployment.id, e.stage_index, e.index, ln.ts, ln.stream, ln.text)
        for e in outputs
        for ln in e.lines
    ]


def ok(started_at: str | None = None, **kw: Any) -> StepResult:
    return StepResult(Status.SUCCEEDED, exit_code=0, started_at=started_at or utcnow(),
                      finished_at=utcnow(), **kw)  # fmt: skip


def statuses(store: HistoryStore, dep_id: int) -> list[tuple[str, list[str]]]:
    return [(s["status"], [st["status"] for st in s["steps"]]) for s in store.stages(dep_id)]


def planned(store: HistoryStore, **kw: Any) -> tuple[int, Runner]:
    """A running deployment with the three stages planned."""
    dep_id = begin(store, **kw)
    stages = stages_of_a_pipeline()
    store.record_plan(dep_id, plan_of(stages))
    return dep_id, Runner(dep_id, stages)


# == a deployment's life ==========================================================================

# -- begin, and the lock --------------------------------------------------------------------------


def test_begin_records_a_running_deployment_with_its_audit_fields(store_factory):
    store = store_factory()
    before = utcnow()
    begun = store.begin(pipeline="web", version="v1", environment="prod", info=INFO,
                        owner=owner(pid=4321, host="build-7"), is_dead=never)  # fmt: skip
    assert begun.interrupted == []
    dep = store.get(begun.id)
    assert set(dep) == keys_of(DeploymentRow)
    assert dep == {
        "id": begun.id,
        "pipeline": "web",
        "version": "v1",
        "environment": "prod",
        "status": "running",
        "started_at": dep["started_at"],
        "finished_at": None,
        "rollback_of": None,
        "retry_of": None,
        "error": None,
        "user": "alice",
        "ci_actor": "GITHUB_ACTOR=release-bot",
        "host": "build-7",
        "pid": 4321,
        "pipelines_file": "/srv/deploy/pipelines.py",
        "file_hash": "9f2c" * 16,
        "git_commit": "c0ffee" * 6 + "c0ff",
        "args": ["deploy", "web", "v1", "-e", "prod"],
        "vars": {"color": "blue", "replicas": "3"},
        "shipyard_version": "9.9.9",
        "stages_total": None,
        "current_stage": None,
        "cancel_requested": None,
    }
    assert before <= dep["started_at"] <= utcnow()
    # Another connection (another process) sees it at once.
    assert store_factory.reopen(store).get(begun.id) == dep


def test_begin_without_info_records_no_vars_and_no_args(store_factory):
    store = store_factory()
    dep = store.get(begin(store))
    assert dep["vars"] == {}
    assert dep["args"] is None
    assert dep["user"] is None


def test_begin_records_rollback_of_and_retry_of(store_factory):
    store = store_factory()
    first = succeeded(store, "v1")
    bad = begin(store, "v2")
    store.finish(bad, Status.FAILED, "boom")
    rollback = succeeded(store, "v1", rollback_of=bad)
    retry = begin(store, "v2", retry_of=bad)
    assert (store.get(rollback)["rollback_of"], store.get(rollback)["retry_of"]) == (bad, None)
    assert (store.get(retry)["rollback_of"], store.get(retry)["retry_of"]) == (None, bad)
    assert store.get(first)["rollback_of"] is None
    assert len({first, bad, rollback, retry}) == 4
    assert first < bad < rollback < retry  # ids grow


def test_begin_takes_the_lock(store_factory):
    store = store_factory()
    before = utcnow()
    dep_id = store.begin(pipeline="web", version="v1", environment="prod", info=INFO,
                         owner=owner(pid=4321, host="build-7", proc_start="777"),
                         is_dead=never).id  # fmt: skip
    (lock,) = store_factory.reopen(store).locks()
    assert set(lock) == keys_of(LockRow)
    assert lock == {
        "pipeline": "web",
        "environment": "prod",
        "deployment_id": dep_id,
        "pid": 4321,
        "host": "build-7",
        "proc_start": "777",
        "user": "alice",
        "version": "v1",
        "acquired_at": lock["acquired_at"],
        "heartbeat_at": lock["heartbeat_at"],
        "runner": runner_identity(),
    }
    assert before <= lock["acquired_at"] <= lock["heartbeat_at"] <= utcnow()


def test_a_second_begin_is_refused_naming_the_holder_and_records_nothing(store_factory):
    store = store_factory()
    holder = store.begin(pipeline="web", version="v1", environment="prod", info=INFO,
                         owner=owner(pid=4321, host="build-7"), is_dead=never).id  # fmt: skip
    other = store_factory.reopen(store)
    with pytest.raises(EnvironmentLocked) as info:
        begin(other, "v2", pid=999, host="build-8")
    text = str(info.value)
    assert f"'web' in 'prod' is locked by deployment {holder}" in text
    assert "(version v1, by alice on build-7, pid 4321, since " in text
    assert "wait with --wait-lock SECONDS" in text
    assert "`shipyard unlock web -e prod --reason TEXT`" in text
    assert info.value.exit_code == 3
    assert info.value.holder["deployment_id"] == holder
    assert info.value.holder["pid"] == 4321
    # Both or neither: the refused deployment left no record, the lock did not move.
    assert [d["id"] for d in store.deployments()] == [holder]
    assert [lk["deployment_id"] for lk in store.locks()] == [holder]
    assert store.get(holder)["status"] == "running"


def test_the_lock_is_per_pipeline_and_environment(store_factory):
    store = store_factory()
    a = begin(store, pipeline="web", environment="prod")
    b = begin(store, pipeline="web", environment="staging")
    c = begin(store, pipeline="api", environment="prod")
    assert [(lk["pipeline"], lk["environment"], lk["deployment_id"]) for lk in store.locks()] == [
        ("api", "prod", c),
        ("web", "prod", a),
        ("web", "staging", b),
    ]  # fmt: skip  (ordered by pipeline, then environment)


def test_an_environment_lock_is_shared_by_the_pipelines_that_take_it(store_factory):
    from shipyard._store import ENVIRONMENT_LOCK

    store = store_factory()
    migrate = begin(store, pipeline="migrations", lock_key=ENVIRONMENT_LOCK)
    with pytest.raises(EnvironmentLocked) as info:
        begin(store_factory.reopen(store), pipeline="web", lock_key=ENVIRONMENT_LOCK)
    text = str(info.value)
    assert "'prod' (one lock for every pipeline, lock='environment') is locked by deployment " in (
        text)  # fmt: skip
    assert f"deployment {migrate} of pipeline 'migrations'" in text
    assert "`shipyard unlock migrations -e prod --reason TEXT`" in text
    assert info.value.holder["deployment_id"] == migrate
    # Another environment, or a pipeline with a lock of its own, is not held by it.
    staging = begin(store, pipeline="web", environment="staging", lock_key=ENVIRONMENT_LOCK)
    own = begin(store, pipeline="api")
    assert [(lk["pipeline"], lk["environment"], lk["deployment_id"]) for lk in store.locks()] == [
        (ENVIRONMENT_LOCK, "prod", migrate), (ENVIRONMENT_LOCK, "staging", staging),
        ("api", "prod", own)]  # fmt: skip
    assert store.get(migrate)["pipeline"] == "migrations"  # the deployment keeps its pipeline
    store.finish(migrate, Status.SUCCEEDED, None)
    web = begin(store, pipeline="web", lock_key=ENVIRONMENT_LOCK)
    assert (store.locks()[0]["deployment_id"], store.get(web)["pipeline"]) == (web, "web")
    assert store.unlock(ENVIRONMENT_LOCK, "prod", user="u", reason="r")["deployment_id"] == web
    assert store.get(web)["status"] == "interrupted"


def test_begin_without_the_lock_neither_takes_nor_respects_it(store_factory):
    store = store_factory()
    holder = begin(store, "v1")
    free = begin(store, "v2", lock=False)
    also = begin(store, "v3", lock=False)
    assert [lk["deployment_id"] for lk in store.locks()] == [holder]
    assert {store.get(d)["status"] for d in (holder, free, also)} == {"running"}
    store.finish(holder, Status.SUCCEEDED, None)
    assert store.locks() == []
    assert begin(store, "v4") > also


def test_begin_asks_is_dead_about_the_holder_as_it_recorded_itself(store_factory):
    store = store_factory()
    old_beat = "2001-01-01T00:00:00.000000Z"
    t0 = utcnow()
    holder = store.begin(pipeline="web", version="v1", environment="prod",
                         owner=owner(pid=4321, host="other-host", proc_start="777",
                                     heartbeat_at=old_beat),
                         is_dead=never).id  # fmt: skip
    witness = Witness()
    with pytest.raises(EnvironmentLocked, match=f"locked by deployment {holder}"):
        begin(store_factory.reopen(store), "v2", pid=1, is_dead=witness)
    (ref,) = witness.asked
    assert set(ref) == keys_of(ProcessRef)
    assert (ref["pid"], ref["host"], ref["proc_start"]) == (4321, "other-host", "777")
    # begin records its own heartbeat (now), not the one in ``owner``.
    assert t0 <= ref["heartbeat_at"] <= utcnow()


def test_a_dead_holder_is_interrupted_and_its_lock_taken_over(store_factory):
    store = store_factory()
    dead, runner = planned(store, pid=4321)
    store.record([runner.stage_started(0), runner.step_started(0, 0)], [])
    other = store_factory.reopen(store)
    begun = other.begin(pipeline="web", version="v2", environment="prod",
                        owner=owner(pid=555), is_dead=Witness(4321))  # fmt: skip
    assert begun.interrupted == [dead]
    assert begun.id != dead
    old = store.get(dead)
    assert old["status"] == "interrupted"
    assert "its process died" in old["error"]
    assert old["finished_at"] is not None
    # What ran is interrupted, what never ran is skipped.
    assert statuses(store, dead) == [
        ("interrupted", ["interrupted", "skipped"]),
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped"]),
    ]
    assert [lk["deployment_id"] for lk in store.locks()] == [begun.id]
    assert store.get(begun.id)["status"] == "running"


def test_a_live_holder_is_not_taken_over_and_nothing_is_interrupted(store_factory):
    store = store_factory()
    holder = begin(store, pid=4321)
    with pytest.raises(EnvironmentLocked):
        begin(store_factory.reopen(store), "v2", pid=555, is_dead=Witness(555))
    assert store.get(holder)["status"] == "running"
    assert [lk["deployment_id"] for lk in store.locks()] == [holder]


# -- the queue ------------------------------------------------------------------------------------


def test_waiters_are_served_first_come_first_served(store_factory):
    store = store_factory()
    holder = begin(store, "v1", pid=1)
    b, c = store_factory.reopen(store), store_factory.reopen(store)
    ticket_b = b.enqueue("web", "prod", owner(pid=2))
    ticket_c = c.enqueue("web", "prod", owner(pid=3))
    assert ticket_c > ticket_b
    # While the holder runs, a ticket is no way around its lock.
    with pytest.raises(EnvironmentLocked, match=f"locked by deployment {holder}"):
        begin(b, "v2", pid=2, ticket=ticket_b)
    store.finish(holder, Status.SUCCEEDED, None)
    # The lock is free, but C queued after B: C waits, and so does a newcomer without a ticket.
    with pytest.raises(EnvironmentLocked) as info:
        begin(c, "v3", pid=3, ticket=ticket_c)
    assert "1 deployment(s) are waiting for the lock before this one" in str(info.value)
    assert info.value.exit_code == 3
    with pytest.raises(EnvironmentLocked) as info:
        begin(store, "v9", pid=9)
    assert "2 deployment(s) are waiting for the lock before this one" in str(info.value)
    assert [d["id"] for d in store.deployments()] == [holder]
    # B's turn; beginning takes B out of the queue.
    dep_b = begin(b, "v2", pid=2, ticket=ticket_b)
    store.finish(dep_b, Status.SUCCEEDED, None)
    with pytest.raises(EnvironmentLocked, match="1 deployment"):
        begin(store, "v9", pid=9)
    dep_c = begin(c, "v3", pid=3, ticket=ticket_c)
    store.finish(dep_c, Status.SUCCEEDED, None)
    # The queue is empty again.
    dep_9 = begin(store, "v9", pid=9)
    assert [d["version"] for d in store.deployments()] == ["v9", "v3", "v2", "v1"]
    assert dep_9 > dep_c > dep_b > holder


def test_the_queue_is_per_pipeline_and_environment(store_factory):
    store = store_factory()
    store.enqueue("web", "prod", owner(pid=2))
    begin(store, pipeline="web", environment="staging")
    begin(store, pipeline="api", environment="prod")
    with pytest.raises(EnvironmentLocked, match="waiting"):
        begin(store, pipeline="web", environment="prod")


def test_a_waiter_that_gave_up_leaves_the_queue(store_factory):
    store = store_factory()
    waiter = store_factory.reopen(store)
    ticket = waiter.enqueue("web", "prod", owner(pid=2))
    with pytest.raises(EnvironmentLocked, match="waiting"):
        begin(store, pid=1)
    waiter.dequeue(ticket)
    assert store.get(begin(store, pid=1))["status"] == "running"


def test_dead_waiters_are_dropped_from_the_queue(store_factory):
    store = store_factory()
    store_factory.reopen(store).enqueue("web", "prod", owner(pid=2))
    store_factory.reopen(store).enqueue("web", "prod", owner(pid=3))
    witness = Witness(2, 3)
    dep_id = begin(store, pid=1, is_dead=witness)
    assert sorted(ref["pid"] for ref in witness.asked) == [2, 3]
    assert {(ref["host"], ref["proc_start"]) for ref in witness.asked} == {("host-a", "4242")}
    store.finish(dep_id, Status.SUCCEEDED, None)
    # Dropped for good: in a world where nobody dies they no longer stand in the way.
    assert begin(store, "v2", pid=1, is_dead=never) > dep_id


def test_a_live_waiter_behind_a_dead_one_still_waits(store_factory):
    store = store_factory()
    store.enqueue("web", "prod", owner(pid=2))
    live = store.enqueue("web", "prod", owner(pid=3))
    with pytest.raises(EnvironmentLocked, match="1 deployment"):
        begin(store, pid=1, is_dead=Witness(2))
    # The live waiter itself goes first: the dead one before it does not count.
    assert begin(store, "v3", pid=3, ticket=live, is_dead=Witness(2)) > 0


def test_touch_ticket_renews_a_waiters_heartbeat(store_factory):
    store = store_factory()
    waiter = store_factory.reopen(store)
    touched = waiter.enqueue("web", "prod", owner(pid=2, host="other-host"))
    waiter.enqueue("web", "staging", owner(pid=3, host="other-host"))
    time.sleep(0.01)
    mark = utcnow()
    time.sleep(0.01)
    waiter.touch_ticket(touched)

    def beat_before_mark(ref: ProcessRef) -> bool:  # a lease that ended at ``mark``
        return ref["heartbeat_at"] is None or ref["heartbeat_at"] < mark

    # The touched waiter is alive and keeps its place; the other one is dropped.
    with pytest.raises(EnvironmentLocked, match="1 deployment"):
        begin(store, environment="prod", pid=1, is_dead=beat_before_mark)
    assert begin(store, environment="staging", pid=1, is_dead=beat_before_mark) > 0


# -- the plan -------------------------------------------------------------------------------------


def test_record_plan_records_every_stage_and_step_pending(store_factory):
    store = store_factory()
    dep_id = begin(store)
    store.record_plan(dep_id, [
        StagePlan("build", False, False, [StepPlan("compile", "command", "make all"),
                                          StepPlan("package", "python", "package()")]),
        StagePlan("verify", True, True, [StepPlan("smoke", "health_check", "GET /health")]),
    ])  # fmt: skip
    assert store_factory.reopen(store).get(dep_id)["stages_total"] == 2
    stages = store.stages(dep_id)
    for s in stages:
        assert set(s) == keys_of(StageRow)
        for step in s["steps"]:
            assert set(step) == keys_of(StepRow)
    pending = {"status": "pending", "attempts": 0, "exit_code": None, "error": None,
               "warning": False, "started_at": None, "finished_at": None}  # fmt: skip
    assert stages == [
        {"idx": 0, "name": "build", "status": "pending", "parallel": False,
         "continue_on_failure": False, "started_at": None, "finished_at": None, "note": None,
         "steps": [
             {"idx": 0, "name": "compile", "kind": "command", "description": "make all", **pending},
             {"idx": 1, "name": "package", "kind": "python", "description": "package()", **pending},
         ]},
        {"idx": 1, "name": "verify", "status": "pending", "parallel": True,
         "continue_on_failure": True, "started_at": None, "finished_at": None, "note": None,
         "steps": [
             {"idx": 0, "name": "smoke", "kind": "health_check", "description": "GET /health",
              **pending},
         ]},
    ]  # fmt: skip


def test_record_plan_skips_the_stages_before_start_stage_saying_why(store_factory):
    store = store_factory()
    dep_id = begin(store)
    store.record_plan(dep_id, plan_of(stages_of_a_pipeline()), 2, note="done by deployment 7")
    assert statuses(store, dep_id) == [
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped", "skipped"]),
        ("pending", ["pending"]),
    ]
    assert [s["note"] for s in store.stages(dep_id)] == [
        "done by deployment 7", "done by deployment 7", None,
    ]  # fmt: skip
    assert store.get(dep_id)["stages_total"] == 3


def test_stages_of_a_deployment_without_a_plan(store_factory):
    store = store_factory()
    dep_id = begin(store)
    assert store.stages(dep_id) == []
    assert store.get(dep_id)["stages_total"] is None


# -- transitions and logs -------------------------------------------------------------------------


def test_record_stage_and_step_transitions(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    reader = store_factory.reopen(store)
    stage0, step00 = run.stage_started(0), run.step_started(0, 0)
    store.record([stage0, step00], [])
    assert reader.get(dep_id)["current_stage"] == 0
    (build, *_) = reader.stages(dep_id)
    assert (build["status"], build["started_at"]) == ("running", stage0.ts)
    assert (build["steps"][0]["status"], build["steps"][0]["started_at"]) == ("running", step00.ts)
    assert build["steps"][1]["status"] == "pending"

    failed = StepResult(Status.FAILED, exit_code=3, error="compile failed", attempts=2,
                        started_at=step00.ts, finished_at=utcnow(), warning=True)  # fmt: skip
    store.record([run.step_finished(0, 0, failed)], [], durable=True)
    step = reader.stages(dep_id)[0]["steps"][0]
    assert step == {
        "idx": 0, "name": "compile", "kind": "command", "description": "true",
        "status": "failed", "attempts": 2, "exit_code": 3, "error": "compile failed",
        "warning": True, "started_at": step00.ts, "finished_at": failed.finished_at,
    }  # fmt: skip
    done = run.stage_finished(0, Status.FAILED)
    store.record([done, run.stage_started(1)], [])
    build, verify, _ = reader.stages(dep_id)
    assert (build["status"], build["finished_at"]) == ("failed", done.ts)
    assert verify["status"] == "running"
    assert reader.get(dep_id)["current_stage"] == 1


def test_a_step_finished_without_its_start_records_the_start_time(store_factory):
    # The recorder drops a StepStarted still waiting in its batch when the step ends: the end
    # must carry the start time (StepResult.started_at).
    store = store_factory()
    dep_id, run = planned(store)
    result = ok("2030-01-01T00:00:00.000000Z")
    store.record([run.stage_started(0), run.step_finished(0, 1, result)], [])
    step = store.stages(dep_id)[0]["steps"][1]
    assert (step["status"], step["started_at"], step["finished_at"]) == (
        "succeeded", "2030-01-01T00:00:00.000000Z", result.finished_at,
    )  # fmt: skip
    assert (step["attempts"], step["exit_code"], step["warning"]) == (1, 0, False)


def test_a_step_finished_after_its_start_keeps_the_first_start_time(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    started = run.step_started(0, 0)
    store.record([run.stage_started(0), started], [])
    store.record([run.step_finished(0, 0, ok("2030-01-01T00:00:00.000000Z"))], [])
    assert store.stages(dep_id)[0]["steps"][0]["started_at"] == started.ts


def test_record_logs_with_their_step_names(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    lines = records(run.output(0, 0, "one"), run.output(0, 0, "two", stream="stderr"),
                    run.output(1, 1, "three"))  # fmt: skip
    own = LogRecord(dep_id, None, None, time.time(), "shipyard", "rolling back to v0")
    store.record([run.stage_started(0)], [*lines, own])
    logs = store_factory.reopen(store).logs(dep_id)
    for row in logs:
        assert set(row) == keys_of(LogRow)
    assert [(r["stage_idx"], r["step_idx"], r["stream"], r["line"], r["step"]) for r in logs] == [
        (0, 0, "stdout", "one", "compile"),
        (0, 0, "stderr", "two", "compile"),
        (1, 1, "stdout", "three", "metrics"),
        (None, None, "shipyard", "rolling back to v0", None),
    ]
    assert [r["ts"] for r in logs] == [ln.ts for ln in [*lines, own]]
    ids = [r["id"] for r in logs]
    assert ids == sorted(ids)
    assert len(set(ids)) == 4


def test_logs_after_and_limit_page_through_the_lines_oldest_first(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    other, other_run = planned(store, environment="staging")
    store.record([], records(run.output(0, 0, *[f"line {n}" for n in range(10)])))
    store.record([], records(other_run.output(0, 0, "not mine")))
    store.record([], records(run.output(0, 1, *[f"line {n}" for n in range(10, 15)])))
    everything = store.logs(dep_id)
    assert [r["line"] for r in everything] == [f"line {n}" for n in range(15)]
    first = store.logs(dep_id, limit=4)
    assert [r["line"] for r in first] == ["line 0", "line 1", "line 2", "line 3"]
    rest = store.logs(dep_id, after=first[-1]["id"])
    assert [r["line"] for r in rest] == [f"line {n}" for n in range(4, 15)]
    assert store.logs(dep_id, after=everything[-1]["id"]) == []
    assert [r["line"] for r in store.logs(other)] == ["not mine"]
    assert store.logs(dep_id, after=everything[-1]["id"], limit=1) == []


# -- artifacts ------------------------------------------------------------------------------------


def _two_step_plan() -> list[StagePlan]:
    return [
        StagePlan("build", False, False, [StepPlan("compile", "command", "make")]),
        StagePlan("release", False, False, [StepPlan("apply", "kubernetes", "apply k8s/"),
                                            StepPlan("smoke", "command", "curl")]),
    ]  # fmt: skip


def test_artifacts_are_kept_per_step_with_the_names_of_step_and_stage(store_factory):
    store = store_factory()
    dep_id = begin(store)
    store.record_plan(dep_id, _two_step_plan())
    store.record_artifact(dep_id, 1, 0, "kubernetes.manifests", '[{"kind": "ConfigMap"}]')
    store.record_artifact(dep_id, 0, 0, "build.log", "é\n" + "x" * 100_000)
    rows = store_factory.reopen(store).artifacts(dep_id)
    assert [set(r) for r in rows] == [keys_of(ArtifactRow)] * 2
    assert [(r["stage_idx"], r["step_idx"], r["stage"], r["step"], r["name"]) for r in rows] == [
        (1, 0, "release", "apply", "kubernetes.manifests"),
        (0, 0, "build", "compile", "build.log"),
    ]
    assert rows[0]["content"] == '[{"kind": "ConfigMap"}]'
    assert rows[1]["content"] == "é\n" + "x" * 100_000  # long text, whole
    assert rows[0]["created_at"] <= utcnow()


def test_an_artifact_of_the_same_name_replaces_the_step_s_earlier_one(store_factory):
    store = store_factory()
    dep_id = begin(store)
    other = begin(store, "v2", environment="staging")
    store.record_plan(dep_id, _two_step_plan())
    store.record_artifact(dep_id, 1, 0, "m", "first attempt")
    store.record_artifact(dep_id, 1, 0, "m", "second attempt")  # a retried step
    store.record_artifact(dep_id, 1, 1, "m", "another step")
    assert [(r["step"], r["content"]) for r in store.artifacts(dep_id)] == [
        ("apply", "second attempt"), ("smoke", "another step"),
    ]  # fmt: skip
    assert store.artifacts(other) == []
    assert store.artifacts(dep_id + 1000) == []


def test_measurements_are_kept_in_order_with_the_names_of_step_and_stage(store_factory):
    store = store_factory()
    dep_id = begin(store)
    other = begin(store, "v2", environment="staging")
    store.record_plan(dep_id, _two_step_plan())
    for n, (value, outcome) in enumerate((("0.01", "successful"), (None, "inconclusive")), 1):
        store.record_measurement(dep_id, 1, 1, {
            "metric": "error rate", "n": n, "ts": utcnow(), "value": value, "outcome": outcome,
            "error": None, "dry_run": False, "warnings": None,
        })  # fmt: skip
    store.record_measurement(dep_id, 1, 1, {
        "metric": "latency", "n": 1, "ts": utcnow(), "value": None, "outcome": "error",
        "error": "provider down", "dry_run": True, "warnings": '["partial response"]',
    })  # fmt: skip
    rows = store_factory.reopen(store).measurements(dep_id)
    assert [set(r) for r in rows] == [keys_of(MeasurementRow)] * 3
    assert [(r["stage"], r["step"], r["metric"], r["n"], r["value"], r["outcome"]) for r in rows] == [
        ("release", "smoke", "error rate", 1, "0.01", "successful"),
        ("release", "smoke", "error rate", 2, None, "inconclusive"),
        ("release", "smoke", "latency", 1, None, "error"),
    ]  # fmt: skip
    assert [(r["error"], r["dry_run"], r["warnings"]) for r in rows] == [
        (None, False, None), (None, False, None), ("provider down", True, '["partial response"]'),
    ]  # fmt: skip
    assert store.measurements(other) == []


# -- finish ---------------------------------------------------------------------------------------


def test_finish_records_the_final_status_and_frees_the_lock(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    store.record([run.stage_started(0), run.step_started(0, 0)], [])
    last = [run.step_finished(0, 0, ok()), run.step_finished(0, 1, ok()),
            run.stage_finished(0, Status.SUCCEEDED)]  # fmt: skip
    before = utcnow()
    store.finish(dep_id, Status.SUCCEEDED, None, last, records(run.output(0, 1, "done")))
    reader = store_factory.reopen(store)
    dep = reader.get(dep_id)
    assert (dep["status"], dep["error"]) == ("succeeded", None)
    assert before <= dep["finished_at"] <= utcnow()
    assert dep["started_at"] <= dep["finished_at"]
    # The last transitions and lines were written; what never ran is skipped.
    assert statuses(reader, dep_id) == [
        ("succeeded", ["succeeded", "succeeded"]),
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped"]),
    ]
    assert [r["line"] for r in reader.logs(dep_id)] == ["done"]
    assert reader.locks() == []
    assert begin(reader, "v2") > dep_id


@pytest.mark.parametrize("status", [Status.FAILED, Status.CANCELLED])
def test_finish_marks_what_still_runs_with_the_final_status(store_factory, status):
    store = store_factory()
    dep_id, run = planned(store)
    store.record([run.stage_started(0), run.step_finished(0, 0, ok()), run.step_started(0, 1)], [])
    store.finish(dep_id, status, f"{status} on purpose")
    dep = store.get(dep_id)
    assert (dep["status"], dep["error"]) == (status.value, f"{status} on purpose")
    assert statuses(store, dep_id) == [
        (status.value, ["succeeded", status.value]),
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped"]),
    ]
    build = store.stages(dep_id)[0]
    assert build["finished_at"] is not None
    assert build["steps"][1]["finished_at"] is not None
    assert store.locks() == []


def test_after_finish_nothing_of_the_deployment_runs_or_waits(store_factory):
    store = store_factory()
    dep_id, run = planned(store)
    store.record([run.stage_started(0), run.step_started(0, 0)], [])
    store.finish(dep_id, Status.SUCCEEDED, None)
    left = {status for _, steps in statuses(store, dep_id) for status in steps}
    left |= {status for status, _ in statuses(store, dep_id)}
    assert not left & {"running", "pending"}, statuses(store, dep_id)


def test_an_interrupted_deployment_stays_interrupted(store_factory):
    store = store_factory()
    dep_id, _run = planned(store)
    other = store_factory.reopen(store)
    other.unlock("web", "prod", user="bob", reason="stuck")
    # Another process now holds the lock.
    newer = begin(other, "v2", pid=555)
    store.finish(dep_id, Status.SUCCEEDED, None)
    dep = store.get(dep_id)
    assert dep["status"] == "interrupted"
    assert "unlocked by bob (stuck)" in dep["error"]
    # ... and keeps it: finishing the interrupted one frees only its own lock.
    assert [lk["deployment_id"] for lk in store.locks()] == [newer]
    assert store.get(newer)["status"] == "running"


def test_finish_of_a_deployment_that_took_no_lock_leaves_the_lock_alone(store_factory):
    store = store_factory()
    holder = begin(store, "v1")
    free = begin(store, "v2", lock=False)
    store.finish(free, Status.FAILED, "boom")
    assert [lk["deployment_id"] for lk in store.locks()] == [holder]


# -- heartbeat ------------------------------------------------------------------------------------


def test_heartbeat_renews_the_lease_of_the_lock_and_the_deployment(store_factory):
    store = store_factory()
    dep_id = begin(store, pid=4321, host="other-host")
    (lock,) = store.locks()
    time.sleep(0.01)
    mark = utcnow()
    time.sleep(0.01)
    assert store_factory.reopen(store).heartbeat(dep_id) is None
    (renewed,) = store.locks()
    assert renewed["heartbeat_at"] > mark > lock["heartbeat_at"]
    assert renewed["acquired_at"] == lock["acquired_at"]
    # What repair() and begin() are asked about is the renewed heartbeat.
    witness = Witness()
    assert store.repair(witness) == []
    (ref,) = witness.asked
    assert ref["heartbeat_at"] > mark
    witness = Witness()
    with pytest.raises(EnvironmentLocked):
        begin(store, "v2", is_dead=witness)
    assert witness.asked[0]["heartbeat_at"] > mark


def test_heartbeat_returns_a_cancel_request(store_factory):
    store = store_factory()
    dep_id = begin(store)
    quiet = begin(store, environment="staging")
    other = store_factory.reopen(store)
    row = other.request_cancel(dep_id, user="alice", reason="wrong version")
    assert (row["id"], row["pipeline"], row["environment"]) == (dep_id, "web", "prod")
    assert store.heartbeat(dep_id) == "alice: wrong version"
    assert store.heartbeat(dep_id) == "alice: wrong version"  # until it stops
    assert store.get(dep_id)["cancel_requested"] == "alice: wrong version"
    assert store.get(dep_id)["status"] == "running"  # a request, not a status
    assert store.heartbeat(quiet) is None
    other.request_cancel(quiet, user="bob")
    assert store.heartbeat(quiet) == "bob"


def test_heartbeat_after_an_unlock_says_the_lock_was_lost(store_factory):
    store = store_factory()
    dep_id = begin(store)
    store_factory.reopen(store).unlock("web", "prod", user="bob", reason="stuck")
    reason = store.heartbeat(dep_id)
    assert reason is not None
    assert "the lock was lost" in reason
    assert "unlocked by bob (stuck)" in reason


def test_heartbeat_after_a_takeover_says_the_lock_was_lost(store_factory):
    store = store_factory()
    dep_id = begin(store, pid=4321)
    begin(store_factory.reopen(store), "v2", pid=555, is_dead=Witness(4321))
    reason = store.heartbeat(dep_id)
    assert reason is not None
    assert "the lock was lost" in reason
    assert "died" in reason


def test_heartbeat_after_a_repair_by_another_process_says_the_lock_was_lost(store_factory):
    store = store_factory()
    dep_id = begin(store, pid=4321)
    assert store_factory.reopen(store).repair(Witness(4321)) == [dep_id]
    assert "the lock was lost" in (store.heartbeat(dep_id) or "")


@pytest.mark.parametrize("status", [Status.SUCCEEDED, Status.FAILED, Status.CANCELLED])
def test_a_heartbeat_racing_its_own_finish_asks_for_nothing(store_factory, status):
    store = store_factory()
    dep_id = begin(store)
    store.finish(dep_id, status, None)
    assert store.heartbeat(dep_id) is None


# -- cancel, unlock, audit ------------------------------------------------------------------------


def test_request_cancel_is_audited(store_factory):
    store = store_factory()
    dep_id = begin(store)
    before = utcnow()
    store.request_cancel(dep_id, user="alice", reason="wrong version")
    (audit,) = store_factory.reopen(store).audit_trail()
    assert set(audit) == keys_of(AuditRow)
    assert audit == {
        "id": audit["id"], "ts": audit["ts"], "action": "cancel", "deployment_id": dep_id,
        "pipeline": "web", "environment": "prod", "user": "alice",
        "host": socket.gethostname(), "reason": "wrong version",
    }  # fmt: skip
    assert before <= audit["ts"] <= utcnow()
    assert store.audit_trail(deployment_id=dep_id) == [audit]


def test_request_cancel_of_an_unknown_deployment(store_factory):
    store = store_factory()
    with pytest.raises(DeploymentNotFound):
        store.request_cancel(42, user="alice", reason="?")
    assert store.audit_trail() == []


def test_unlock_interrupts_the_holder_and_is_audited(store_factory):
    store = store_factory()
    dep_id, run = planned(store, pid=4321)
    store.record([run.stage_started(0), run.step_started(0, 0)], [])
    (held,) = store.locks()
    broken = store_factory.reopen(store).unlock("web", "prod", user="bob",
                                                reason="stuck since the outage")  # fmt: skip
    assert broken == held
    dep = store.get(dep_id)
    assert dep["status"] == "interrupted"
    assert "unlocked by bob (stuck since the outage)" in dep["error"]
    assert dep["finished_at"] is not None
    assert statuses(store, dep_id) == [
        ("interrupted", ["interrupted", "skipped"]),
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped"]),
    ]
    assert store.locks() == []
    (audit,) = store.audit_trail()
    assert (audit["action"], audit["deployment_id"], audit["user"], audit["reason"],
            audit["pipeline"], audit["environment"], audit["host"]) == (
        "unlock", dep_id, "bob", "stuck since the outage", "web", "prod", socket.gethostname(),
    )  # fmt: skip
    # Recorded on the deployment it interrupted, so that `show` of it lists the unlock.
    assert store.audit_trail(deployment_id=dep_id) == [audit]
    assert begin(store, "v2") > dep_id


def test_unlock_of_a_free_lock_is_audited(store_factory):
    store = store_factory()
    done = succeeded(store)
    assert store.unlock("web", "prod", user="bob", reason="just checking") is None
    (audit,) = store.audit_trail()
    assert (audit["action"], audit["deployment_id"], audit["user"], audit["reason"],
            audit["pipeline"], audit["environment"]) == (
        "unlock", None, "bob", "just checking", "web", "prod",
    )  # fmt: skip
    assert store.get(done)["status"] == "succeeded"
    assert store.audit_trail(deployment_id=done) == []


def test_add_audit_and_the_audit_trail_newest_first(store_factory):
    store = store_factory()
    a = succeeded(store, "v1")
    b = succeeded(store, "v2", environment="staging")
    store.add_audit("rollback", a, user="alice", reason="v1 is broken")
    store.add_audit("retry", b, user="bob", reason="flaky")
    store.request_cancel(b, user="carol", reason="late")
    reader = store_factory.reopen(store)
    trail = reader.audit_trail()
    assert [(r["action"], r["deployment_id"], r["user"], r["reason"]) for r in trail] == [
        ("cancel", b, "carol", "late"),
        ("retry", b, "bob", "flaky"),
        ("rollback", a, "alice", "v1 is broken"),
    ]
    assert [(r["pipeline"], r["environment"]) for r in trail] == [
        ("web", "staging"), ("web", "staging"), ("web", "prod"),
    ]  # fmt: skip
    assert trail[0]["id"] > trail[1]["id"] > trail[2]["id"]
    assert trail[0]["ts"] >= trail[1]["ts"] >= trail[2]["ts"]
    assert reader.audit_trail(limit=2) == trail[:2]
    assert reader.audit_trail(deployment_id=b) == trail[:2]
    assert reader.audit_trail(deployment_id=b, limit=1) == trail[:1]
    assert reader.audit_trail(deployment_id=a) == trail[2:]
    assert reader.audit_trail(deployment_id=999) == []
    with pytest.raises(DeploymentNotFound):
        store.add_audit("rollback", 999, user="alice", reason="?")


# -- repair ---------------------------------------------------------------------------------------


def test_repair_marks_only_running_deployments_whose_process_is_dead(store_factory):
    store = store_factory()
    done = succeeded(store, "v0", pid=11)
    failed = begin(store, "v0", pid=11, environment="qa")
    store.finish(failed, Status.FAILED, "boom")
    dead, run = planned(store, pid=11)
    store.record([run.stage_started(0), run.step_started(0, 0)], [])
    dead_free = begin(store, "v1", pid=11, environment="qa", lock=False)
    alive = begin(store, "v1", pid=22, environment="staging")
    witness = Witness(11)
    marked = store_factory.reopen(store).repair(witness)
    assert sorted(marked) == sorted([dead, dead_free])
    # Only running (or pending) deployments are asked about.
    assert sorted(ref["pid"] for ref in witness.asked) == [11, 11, 22]
    for dep_id in marked:
        dep = store.get(dep_id)
        assert dep["status"] == "interrupted"
        assert "its process died" in dep["error"]
        assert dep["finished_at"] is not None
    assert statuses(store, dead) == [
        ("interrupted", ["interrupted", "skipped"]),
        ("skipped", ["skipped", "skipped"]),
        ("skipped", ["skipped"]),
    ]
    assert store.get(alive)["status"] == "running"
    assert (store.get(done)["status"], store.get(failed)["status"]) == ("succeeded", "failed")
    assert [lk["deployment_id"] for lk in store.locks()] == [alive]
    # Nothing more to do the second time.
    assert store.repair(witness) == []


def test_repair_when_nothing_runs_is_a_no_op(store_factory):
    store = store_factory()
    assert store.repair(always) == []
    done = succeeded(store)
    before = (store.get(done), store.stages(done), store.locks(), store.audit_trail())
    witness = Witness()
    assert store.repair(witness) == []
    assert witness.asked == []  # nothing runs: nobody to ask about
    assert (store.get(done), store.stages(done), store.locks(), store.audit_trail()) == before


# == questions ====================================================================================


def test_get_of_an_unknown_deployment_says_what_there_is(store_factory):
    store = store_factory()
    with pytest.raises(DeploymentNotFound) as info:
        store.get(7)
    assert str(info.value) == "no deployment 7 in the history (the history is empty)"
    assert info.value.exit_code == 2
    first = succeeded(store)
    last = succeeded(store, "v2")
    with pytest.raises(DeploymentNotFound) as info:
        store.get(last + 100)
    assert str(info.value) == (
        f"no deployment {last + 100} in the history (ids go from {first} to {last})"
    )


def test_deployments_newest_first_with_filters_and_a_limit(store_factory):
    store = store_factory()
    ids = {}
    for n, (pipeline, env, outcome) in enumerate([
        ("web", "prod", Status.SUCCEEDED), ("web", "staging", Status.FAILED),
        ("api", "prod", Status.SUCCEEDED), ("web", "prod", Status.CANCELLED),
        ("api", "staging", None), ("web", "prod", None),
    ]):  # fmt: skip
        ids[n] = begin(store, f"v{n}", pipeline=pipeline, environment=env)
        if outcome is not None:
            store.finish(ids[n], outcome, None)
    reader = store_factory.reopen(store)

    def listed(**kw: Any) -> list[int]:
        return [d["id"] for d in reader.deployments(**kw)]

    assert listed() == [ids[n] for n in (5, 4, 3, 2, 1, 0)]
    assert listed(pipeline="web") == [ids[n] for n in (5, 3, 1, 0)]
    assert listed(environment="prod") == [ids[n] for n in (5, 3, 2, 0)]
    assert listed(pipeline="web", environment="prod") == [ids[n] for n in (5, 3, 0)]
    assert listed(statuses=["succeeded"]) == [ids[n] for n in (2, 0)]
    assert listed(statuses=(Status.RUNNING, Status.FAILED)) == [ids[n] for n in (5, 4, 1)]
    assert listed(pipeline="web", statuses=["running"]) == [ids[5]]
    assert listed(limit=2) == [ids[5], ids[4]]
    assert listed(pipeline="nope") == []
    rows = reader.deployments()
    assert all(set(r) == keys_of(DeploymentRow) for r in rows)
    assert [r["started_at"] for r in rows] == sorted((r["started_at"] for r in rows), reverse=True)


def test_deployments_lists_twenty_by_default(store_factory):
    store = store_factory()
    ids = [begin(store, f"v{n}", lock=False) for n in range(23)]
    assert [d["id"] for d in store.deployments()] == ids[::-1][:20]
    assert len(store.deployments(limit=100)) == 23


def test_locks_lists_the_held_locks(store_factory):
    store = store_factory()
    assert store.locks() == []
    a = begin(store, pipeline="web", environment="prod")
    succeeded(store, pipeline="web", environment="qa")
    b = begin(store, pipeline="api", environment="staging")
    assert [(lk["pipeline"], lk["environment"], lk["deployment_id"]) for lk in store.locks()] == [
        ("api", "staging", b), ("web", "prod", a),
    ]  # fmt: skip


def test_previous_version_is_the_latest_succeeded_one_there(store_factory):
    store = store_factory()
    assert store.previous_version("web", "prod") is None
    succeeded(store, "v1")
    succeeded(store, "v9", environment="staging")
    succeeded(store, "v8", pipeline="api")
    assert store.previous_version("web", "prod") == "v1"
    failed = begin(store, "v2")
    store.finish(failed, Status.FAILED, "boom")
    begin(store, "v3")  # running
    assert store.previous_version("web", "prod") == "v1"
    assert store.previous_version("web", "staging") == "v9"
    assert store.previous_version("api", "prod") == "v8"
    assert store.previous_version("api", "staging") is None


def test_latest_is_the_latest_deployment_there_whatever_its_status(store_factory):
    store = store_factory()
    succeeded(store, "v1")
    failed = begin(store, "v2")
    store.finish(failed, Status.FAILED, "boom")
    succeeded(store, "v7", environment="staging")
    latest = store_factory.reopen(store).latest("web", "prod")
    assert (latest["id"], latest["version"], latest["status"]) == (failed, "v2", "failed")
    running = begin(store, "v3")
    assert store.latest("web", "prod")["id"] == running


def test_latest_where_nothing_was_deployed_says_where_it_was(store_factory):
    store = store_factory()
    succeeded(store, "v1", environment="staging")
    succeeded(store, "v1", environment="qa")
    with pytest.raises(DeploymentNotFound) as info:
        store.latest("web", "prod")
    assert str(info.value) == (
        "no deployment 'web -e prod' in the history (nothing was deployed of 'web' to 'prod'; "
        "it was deployed to 'qa', 'staging')"
    )
    with pytest.raises(DeploymentNotFound) as info:
        store.latest("api", "prod")
    assert "'api' was never deployed anywhere" in str(info.value)
    assert info.value.exit_code == 2


# -- the rollback target: DESIGN §4 ---------------------------------------------------------------

STATUSES = ["succeeded", "failed", "cancelled", "interrupted"]


@dataclass
class Dep:
    id: int
    pipeline: str
    environment: str
    version: str
    status: str
    rollback_of: int | None
    #: As the store recorded it.
    started_at: str = ""


@st.composite
def histories(draw):
    deps: list[Dep] = []
    for i in range(1, draw(st.integers(1, 14)) + 1):
        pipeline = draw(st.sampled_from(["web", "api"]))
        environment = draw(st.sampled_from(["staging", "production"]))
        same = [d.id for d in deps if (d.pipeline, d.environment) == (pipeline, environment)]
        rollback_of = draw(st.none() | st.sampled_from(same)) if same else None
        deps.append(Dep(i, pipeline, environment, draw(st.sampled_from(["v1", "v2", "v3", "v4"])),
                        draw(st.sampled_from(STATUSES)), rollback_of))  # fmt: skip
    return deps


def reference_target(deps: list[Dep], x: Dep) -> Dep | None:
    """DESIGN §4, written again: the latest succeeded deployment of X's pipeline and environment
    that started before X, skipping X's version (and the versions X rolled back, when X is a
    rollback) and deployments that were themselves rolled back."""
    by_id = {d.id: d for d in deps}
    bad = {x.version}
    back = x.rollback_of
    while back is not None:
        bad.add(by_id[back].version)
        back = by_id[back].rollback_of
    rolled_back = {d.rollback_of for d in deps if d.rollback_of is not None}
    candidates = [
        d
        for d in deps
        if (d.pipeline, d.environment) == (x.pipeline, x.environment)
        and d.status == "succeeded"
        and d.started_at < x.started_at
        and d.version not in bad
        and d.id not in rolled_back
    ]
    return max(candidates, key=lambda d: (d.started_at, d.id), default=None)


def record_history(store: HistoryStore, deps: list[Dep]) -> list[Dep]:
    """Deploy ``deps`` one after another through the port; the same deployments with the ids
    and start times the store gave them (``rollback_of`` translated)."""
    ids: dict[int, int] = {}
    for d in deps:
        dep_id = begin(store, d.version, pipeline=d.pipeline, environment=d.environment,
                       rollback_of=ids[d.rollback_of] if d.rollback_of else None)  # fmt: skip
        if d.status == "interrupted":  # as another process finds it: its lock broken
            store.unlock(d.pipeline, d.environment, user="tester", reason="test history")
        else:
            store.finish(dep_id, Status(d.status), None if d.status == "succeeded" else "x")
        ids[d.id] = dep_id
    rows = {r["id"]: r for r in store.deployments(limit=len(deps))}
    recorded = [
        dataclasses.replace(d, id=ids[d.id], started_at=rows[ids[d.id]]["started_at"],
                            rollback_of=ids[d.rollback_of] if d.rollback_of else None)
        for d in deps
    ]  # fmt: skip
    assert [rows[d.id]["status"] for d in recorded] == [d.status for d in deps]
    return recorded


PROPERTY = settings(
    max_examples=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(histories(), st.data())
def test_rollback_target_follows_the_rule(store_factory, deps, data):
    with store_factory.fresh() as store:
        deps = record_history(store, deps)
        x = data.draw(st.sampled_from(deps))
        expected = reference_target(deps, x)
        if expected is None:
            with pytest.raises(NoPreviousDeployment, match="nothing to roll back to"):
                store.rollback_target(x.id)
        else:
            assert store.rollback_target(x.id)["id"] == expected.id


@PROPERTY
@given(histories(), st.data(), st.sampled_from(STATUSES))
def test_rolling_back_twice_never_returns_to_the_bad_version(store_factory, deps, data,
                                                             rollback_status):  # fmt: skip
    with store_factory.fresh() as store:
        deps = record_history(store, deps)
        x = data.draw(st.sampled_from(deps))
        try:
            first = store.rollback_target(x.id)
        except NoPreviousDeployment:
            return
        assert first["version"] != x.version
        # The rollback is itself a deployment; then it is rolled back too.
        dep_id = begin(store, first["version"], pipeline=x.pipeline, environment=x.environment,
                       rollback_of=x.id)  # fmt: skip
        if rollback_status == "interrupted":
            store.unlock(x.pipeline, x.environment, user="tester", reason="test history")
        else:
            store.finish(dep_id, Status(rollback_status), None)
        assert store.get(dep_id)["status"] == rollback_status
        try:
            second = store.rollback_target(dep_id)
        except NoPreviousDeployment:
            return
        assert second["version"] not in (x.version, first["version"])
        assert second["id"] != x.id


def test_rollback_target_examples(store_factory):
    store = store_factory()
    deps = record_history(store, [
        Dep(1, "web", "prod", "v1", "succeeded", None),
        Dep(2, "web", "prod", "v3", "succeeded", None),  # the bad version, deployed once
        Dep(3, "web", "prod", "v2", "succeeded", None),
        Dep(4, "web", "prod", "v3", "succeeded", None),  # ... and again: X
        Dep(5, "web", "prod", "v2", "succeeded", 4),  # rollback of X
        Dep(6, "web", "staging", "v9", "succeeded", None),
        Dep(7, "web", "prod", "v4", "failed", None),
    ])  # fmt: skip
    ids = {n: d.id for n, d in enumerate(deps, 1)}
    assert store.rollback_target(ids[4])["id"] == ids[3]  # skips nothing but its own version
    assert (
        store.rollback_target(ids[5])["id"] == ids[1]
    )  # neither v2 (its own) nor v3 (rolled back)
    assert store.rollback_target(ids[7])["id"] == ids[5]  # the rollback is a good deployment
    target = store_factory.reopen(store).rollback_target(ids[4])
    assert set(target) == keys_of(DeploymentRow)
    assert target == store.get(ids[3])
    with pytest.raises(NoPreviousDeployment) as info:
        store.rollback_target(ids[1])
    assert str(info.value) == (
        "nothing to roll back to: no succeeded deployment of 'web' in 'prod' before "
        f"deployment {ids[1]} with a version other than 'v1' that was not itself rolled back; "
        "nothing was deployed there before it"
    )
    with pytest.raises(NoPreviousDeployment) as info:
        store.rollback_target(ids[6])
    assert f"before deployment {ids[6]} with a version other than 'v9'" in str(info.value)
    assert info.value.exit_code == 2


def test_no_previous_deployment_says_what_is_there_instead(store_factory):
    store = store_factory()
    first, bad, back, x = record_history(store, [
        Dep(1, "web", "prod", "v1", "failed", None),
        Dep(2, "web", "prod", "v2", "succeeded", None),
        Dep(3, "web", "prod", "v3", "succeeded", 2),
        Dep(4, "web", "prod", "v3", "succeeded", None),
    ])  # fmt: skip
    with pytest.raises(NoPreviousDeployment) as info:
        store.rollback_target(x.id)
    assert str(info.value) == (
        "nothing to roll back to: no succeeded deployment of 'web' in 'prod' before deployment "
        f"{x.id} with a version other than 'v3' that was not itself rolled back; before it "
        f"there: #{back.id} v3 succeeded, #{bad.id} v2 succeeded (rolled back), "
        f"#{first.id} v1 failed"
    )
    # A rollback of a rollback names every version it skips.
    with pytest.raises(NoPreviousDeployment) as info:
        store.rollback_target(back.id)
    assert "with a version other than 'v3' or 'v2' that was not" in str(info.value)


def test_rollback_target_of_an_unknown_deployment(store_factory):
    store = store_factory()
    with pytest.raises(DeploymentNotFound):
        store.rollback_target(3)


# == the engine against the store: every record is kept ==========================================

PIPELINES = """
import shipyard as sy

@sy.pipeline(rollback="manual")
def web(d):
    return [
        sy.stage("build", sy.command("sh", "-c", "echo one; echo two >&2", name="compile"),
                 sy.command("sh", "-c", "echo three", name="package")),
        sy.stage("verify", sy.command("sh", "-c", "echo four; echo five", name="smoke"),
                 sy.command("sh", "-c", "echo six", name="metrics"), parallel=True),
    ]
"""


def test_every_deployment_stage_step_and_line_is_recorded(store_factory, shipyarder):
    shipyarder.makepipelines(PIPELINES)
    url = store_factory.new_url()
    for version in ("1", "2"):
        result = shipyarder.run("--history", url, "deploy", "web", version, "-e", "x")
        assert result.exit_code == 0, result
    store = store_factory.open(url)
    deployments = sorted(store.deployments(), key=lambda d: d["id"])
    assert [(d["pipeline"], d["version"], d["environment"], d["status"]) for d in deployments] == [
        ("web", "1", "x", "succeeded"), ("web", "2", "x", "succeeded"),
    ]  # fmt: skip
    fields = ("user", "host", "pid", "started_at", "finished_at", "file_hash")
    for d in deployments:
        assert all(d[k] is not None for k in fields), d  # type: ignore[literal-required]
    ids = [d["id"] for d in deployments]
    assert [
        (dep, s["idx"], s["name"], s["status"], s["parallel"])
        for dep in ids
        for s in store.stages(dep)
    ] == [
        (ids[0], 0, "build", "succeeded", False),
        (ids[0], 1, "verify", "succeeded", True),
        (ids[1], 0, "build", "succeeded", False),
        (ids[1], 1, "verify", "succeeded", True),
    ]
    steps = [
        (dep, s["idx"], st["idx"], st["name"], st["kind"], st["status"], st["attempts"],
         st["exit_code"], st["started_at"] is not None, st["finished_at"] is not None)
        for dep in ids for s in store.stages(dep) for st in s["steps"]
    ]  # fmt: skip
    assert steps == [
        (dep, si, i, name, "command", "succeeded", 1, 0, True, True)
        for dep in ids
        for si, i, name in (
            (0, 0, "compile"),
            (0, 1, "package"),
            (1, 0, "smoke"),
            (1, 1, "metrics"),
        )
    ]
    logs = [(dep, r["stage_idx"], r["step_idx"], r["stream"], r["line"])
            for dep in ids for r in store.logs(dep)]  # fmt: skip
    assert sorted(logs) == sorted(
        (dep, *row)
        for dep in ids
        for row in ((0, 0, "stdout", "one"), (0, 0, "stderr", "two"), (0, 1, "stdout", "three"),
                    (1, 0, "stdout", "four"), (1, 0, "stdout", "five"), (1, 1, "stdout", "six"))
    )  # fmt: skip
    assert store.locks() == []


@pytest.mark.slow
def test_a_thousand_steps_are_all_recorded(store_factory, shipyarder):
    shipyarder.makepipelines(
        """
        import shipyard as sy

        @sy.pipeline
        def big(d):
            return [
                sy.stage(f"stage-{s}", *[sy.command("step", str(s), str(i), name=f"s{s}-{i}")
                                         for i in range(100)], parallel=s % 2 == 1)
                for s in range(10)
            ]
        """
    )

    def handler(step, context):
        context.log_lines([f"{step.name} line 1", f"{step.name} line 2"])

    shipyarder.fake_executor("command", handler)
    url = store_factory.new_url()
    shipyarder.history_path = url
    deployed = shipyarder.deploy("big", "1", "x")
    assert deployed.status == "succeeded"
    deployed.assert_outcomes(succeeded=1000)
    store = store_factory.open(url)
    stages = store.stages(deployed.id)
    steps = [st for s in stages for st in s["steps"] if st["status"] == "succeeded"]
    assert (len(steps), len({st["name"] for st in steps})) == (1000, 1000)
    assert [s["status"] for s in stages].count("succeeded") == 10
    lines = [r["line"] for r in store.logs(deployed.id)]
    assert set(lines) == {
        f"s{s}-{i} line {n}" for s in range(10) for i in range(100) for n in (1, 2)
    }
    assert len(lines) == 2000


#: A pipelines file whose stages come from --var plan=JSON; its own step type logs N lines, then
#: succeeds, fails, raises, or hangs until cancelled.
PLANNED = """
import asyncio
import json

import shipyard as sy


class Scripted(sy.Step):
    kind = "scripted"

    def __init__(self, outcome, lines, **options):
        self.outcome, self.lines = outcome, lines
        super().__init__(**options)

    async def run(self, context):
        context.log_lines([f"{self.name} #{n}" for n in range(self.lines)])
        if self.outcome == "fail":
            raise sy.StepFailed(f"{self.name} failed", step_exit_code=3)
        if self.outcome == "raise":
            raise RuntimeError(f"{self.name} crashed")
        if self.outcome == "hang":
            await asyncio.sleep(3600)
        return sy.StepResult(exit_code=0)


@sy.hookimpl
def shipyard_register_step_types(registry):
    registry.add(Scripted)


@sy.pipeline
def planned(d):
    return [
        sy.stage(f"s{si}", *[Scripted(o, n, name=f"s{si}-{i}") for i, (o, n) in enumerate(steps)],
                 parallel=parallel, continue_on_failure=cof)
        for si, (parallel, cof, steps) in enumerate(json.loads(d.vars["plan"]))
    ]
"""

step_plan = st.tuples(st.sampled_from(["ok", "fail", "raise", "hang"]), st.integers(0, 3))
stage_plan = st.tuples(st.booleans(), st.booleans(), st.lists(step_plan, min_size=1, max_size=4))
deployment_plan = st.lists(stage_plan, min_size=1, max_size=4)


def runnable(plan):
    """Hang only where a failing sibling in a parallel stage will cancel it."""
    out = []
    for parallel, cof, steps in plan:
        stops = parallel and not cof and any(o in ("fail", "raise") for o, _ in steps)
        out.append([parallel, cof, [[o if o != "hang" or stops else "ok", n] for o, n in steps]])
    return out


def expected_outcome(plan):
    """Independent model of DESIGN §2: statuses of the deployment, stages and steps."""
    status, stopped, stages = "succeeded", False, []
    for parallel, cof, steps in plan:
        if stopped:
            stages.append(("skipped", ["skipped"] * len(steps)))
            continue
        results = []
        for outcome, _ in steps:
            failing = outcome in ("fail", "raise")
            if not parallel and not cof and any(r == "failed" for r in results):
                results.append("skipped")
            elif outcome == "hang":
                results.append("cancelled")
            else:
                results.append("failed" if failing else "succeeded")
        failed = "failed" in results and not cof
        stages.append(("failed" if failed else "succeeded", results))
        if failed:
            status, stopped = "failed", True
    return status, stages


@dataclass
class Run:
    plan: list
    doc: dict


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.lists(deployment_plan, min_size=1, max_size=3))
def test_any_sequence_of_outcomes_keeps_every_record(store_factory, plans):
    from shipyard import DeploymentManager

    url = store_factory.new_url()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "pipelines.py").write_text(PLANNED)
        manager = DeploymentManager(pipelines=root / "pipelines.py", history=url)
        runs = []
        try:
            for plan in plans:
                plan = runnable(plan)
                dep = manager.deploy("planned", "1", "x", vars={"plan": json.dumps(plan)},
                                     rollback=False)  # fmt: skip
                runs.append(Run(plan, manager.wait(dep)))
            # Every earlier record is still there, unchanged, after the later deployments.
            for run in runs:
                doc = manager.show(run.doc["id"])
                assert doc == run.doc
                status, stages = expected_outcome(run.plan)
                assert doc["status"] == status
                assert [(s["status"], [st["status"] for st in s["steps"]]) for s in
                        doc["stages"]] == stages  # fmt: skip
                names = [[st["name"] for st in s["steps"]] for s in doc["stages"]]
                assert names == [[f"s{si}-{i}" for i in range(len(steps))]
                                 for si, (_, _, steps) in enumerate(run.plan)]  # fmt: skip
                for s in doc["stages"]:
                    for step in s["steps"]:
                        assert (step["started_at"] is None) == (step["status"] == "skipped")
                        assert (step["finished_at"] is None) == (step["status"] == "skipped")
            store = store_factory.open(url)
            try:
                logged = [(run.doc["id"], r["line"]) for run in runs
                          for r in store.logs(run.doc["id"])]  # fmt: skip
            finally:
                store_factory.close(store)
            expected_lines = sorted(
                (run.doc["id"], f"s{si}-{i} #{n}")
                for run in runs
                for si, ((_, _, steps), (_, results)) in enumerate(
                    zip(run.plan, expected_outcome(run.plan)[1], strict=True)
                )
                for i, ((_, lines), result) in enumerate(zip(steps, results, strict=True))
                if result != "skipped"
                for n in range(lines)
            )
            assert sorted(logged) == expected_lines
            assert [d["id"] for d in manager.history(limit=100)] == [
                r.doc["id"] for r in reversed(runs)
            ]
        finally:
            manager.close()


# == concurrency ==================================================================================


def race(n: int, calls: list[Any]) -> list[Any]:
    """Run ``calls`` in ``n`` threads released together; each one's result or exception."""
    barrier = threading.Barrier(n)
    results: list[Any] = [None] * n

    def go(i: int) -> None:
        barrier.wait()
        try:
            results[i] = calls[i]()
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=go, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return results


@pytest.mark.parametrize("connections", [2, 8])
def test_racing_begins_exactly_one_takes_the_lock(store_factory, connections):
    n = 8
    first = store_factory()
    stores = [first, *(store_factory.reopen(first) for _ in range(connections - 1))]
    # A store is used by one thread at a time: threads sharing a connection take turns.
    turns = [threading.Lock() for _ in stores]

    def attempt(i: int) -> Any:
        with turns[i % connections]:
            return begin(stores[i % connections], f"v{i}", pid=1000 + i)

    results = race(n, [lambda i=i: attempt(i) for i in range(n)])
    winners = [r for r in results if isinstance(r, int)]
    losers = [r for r in results if isinstance(r, EnvironmentLocked)]
    assert len(winners) == 1, results
    assert len(losers) == n - 1, results
    (winner,) = winners
    for exc in losers:
        assert f"locked by deployment {winner}" in str(exc)
        assert exc.holder["deployment_id"] == winner
    (dep,) = first.deployments()
    assert dep["id"] == winner
    assert dep["pid"] == 1000 + results.index(winner)
    assert [lk["deployment_id"] for lk in first.locks()] == [winner]


def test_racing_begins_without_the_lock_all_get_ids_of_their_own(store_factory):
    n = 8
    first = store_factory()
    stores = [first, *(store_factory.reopen(first) for _ in range(n - 1))]
    results = race(n, [lambda s=s, i=i: begin(s, f"v{i}", pid=i, lock=False)
                       for i, s in enumerate(stores)])  # fmt: skip
    assert all(isinstance(r, int) for r in results), results
    assert len(set(results)) == n
    assert sorted(d["id"] for d in first.deployments()) == sorted(results)
    assert {first.get(r)["version"] for r in results} == {f"v{i}" for i in range(n)}


def test_racing_waiters_get_tickets_of_their_own_in_one_order(store_factory):
    n = 8
    first = store_factory()
    holder = begin(first, pid=1)
    stores = [store_factory.reopen(first) for _ in range(n)]
    tickets = race(n, [lambda s=s, i=i: s.enqueue("web", "prod", owner(pid=10 + i))
                       for i, s in enumerate(stores)])  # fmt: skip
    assert all(isinstance(t, int) for t in tickets), tickets
    assert len(set(tickets)) == n
    first.finish(holder, Status.SUCCEEDED, None)
    # Served in ticket order, whoever asks first.
    order = sorted(range(n), key=lambda i: tickets[i])
    for i in reversed(order[1:]):
        with pytest.raises(EnvironmentLocked, match="waiting"):
            begin(stores[i], pid=10 + i, ticket=tickets[i])
    for i in order:
        dep_id = begin(stores[i], f"v{i}", pid=10 + i, ticket=tickets[i])
        stores[i].finish(dep_id, Status.SUCCEEDED, None)
    assert [d["pid"] for d in first.deployments(limit=100)][::-1] == [1, *(10 + i for i in order)]


# -- delivery metrics (stats_rows, issue #19) ---------------------------------------------------

#: A history with a known answer: (pipeline, environment, version, status, rollback of the
#: n-th, 1-based; git commit). Rollbacks: 5 of 4; 10 of 8 (so 9 is followed by a rollback);
#: and the chain 12 of 11, 13 of 12 (12 itself failed).
STATS_HISTORY = [
    ("web", "prod", "v1", "succeeded", None, "a" * 40),  # 1
    ("web", "prod", "v2", "failed", None, "b" * 40),  # 2: failed, restored by 3
    ("web", "prod", "v3", "succeeded", None, "b" * 40),  # 3
    ("web", "prod", "v4", "succeeded", None, "b" * 40 + "-dirty"),  # 4: rolled back by 5
    ("web", "prod", "v3", "succeeded", 4, "b" * 40),  # 5: a rollback (no new change)
    ("web", "prod", "v5", "cancelled", None, None),  # 6: not a change
    ("web", "staging", "v1", "failed", None, None),  # 7: never restored
    ("api", "prod", "a1", "succeeded", None, "a" * 40),  # 8: rolled back by 10
    ("api", "prod", "a2", "succeeded", None, None),  # 9: followed by the rollback 10
    ("api", "prod", "a0", "succeeded", 8, None),  # 10
    ("web", "prod", "v6", "succeeded", None, "c" * 40),  # 11: rolled back by 12
    ("web", "prod", "v3", "failed", 11, None),  # 12: the rollback failed, rolled back by 13
    ("web", "prod", "v3", "succeeded", 12, None),  # 13: restores 11 (and 12)
]


def record_stats_history(store: HistoryStore) -> list[int]:
    ids: list[int] = []
    for pipeline, environment, version, status, back, commit in STATS_HISTORY:
        dep_id = begin(store, version, pipeline=pipeline, environment=environment,
                       rollback_of=ids[back - 1] if back else None,
                       info={"git_commit": commit})  # fmt: skip
        store.finish(dep_id, Status(status), None if status == "succeeded" else "x")
        ids.append(dep_id)
    return ids


def test_stats_rows_of_an_empty_store(store_factory):
    rows = store_factory().stats_rows()
    assert rows == {
        "changes": 0, "failed": 0, "rolled_back": 0, "rollbacks": 0, "succeeded": 0, "days": 0,
        "first_at": None, "last_at": None, "restores": [], "unrestored": 0, "commits": [],
    }  # fmt: skip


def test_stats_rows_of_a_known_history(store_factory):
    store = store_factory()
    t0 = time.time()
    ids = record_stats_history(store)
    elapsed = time.time() - t0
    deps = {n: store.get(dep_id) for n, dep_id in enumerate(ids, 1)}
    rows = store_factory.reopen(store).stats_rows()
    from shipyard._store import StatsRows

    assert set(rows) == keys_of(StatsRows)
    assert {k: v for k, v in rows.items() if k not in ("restores", "commits", "days")} == {
        # changes: not rollbacks, ended succeeded or failed: 1 2 3 4 7 8 9 11
        "changes": 8, "failed": 2, "rollbacks": 4, "succeeded": 6,
        # 4 and 8 rolled back, 9 followed by a rollback, 11 rolled back (its rollback too)
        "rolled_back": 4, "unrestored": 1,
        "first_at": deps[1]["started_at"], "last_at": deps[13]["started_at"],
    }  # fmt: skip
    assert rows["days"] in (1, 2)  # all today (or across midnight UTC)
    # One outage per restoring deployment: 2 -> 3, 4 -> 5, 8 (and 9) -> 10, 11 (and 12) -> 13.
    assert len(rows["restores"]) == 4
    assert all(0 <= s <= elapsed + 1 for s in rows["restores"])
    # Commits: succeeded changes only, per pipeline, environment and commit as recorded.
    got = {(c["pipeline"], c["environment"], c["git_commit"], c["deployments"], c["deployed_at"])
           for c in rows["commits"]}  # fmt: skip
    assert got == {
        ("web", "prod", "a" * 40, 1, deps[1]["finished_at"]),
        ("web", "prod", "b" * 40, 1, deps[3]["finished_at"]),
        ("web", "prod", "b" * 40 + "-dirty", 1, deps[4]["finished_at"]),
        ("web", "prod", "c" * 40, 1, deps[11]["finished_at"]),
        ("api", "prod", "a" * 40, 1, deps[8]["finished_at"]),
    }
    assert store.stats_rows(commits=False)["commits"] == []


def test_stats_rows_of_a_window_and_a_filter(store_factory):
    store = store_factory()
    ids = record_stats_history(store)
    since = store.get(ids[7])["started_at"]  # from deployment 8 on
    rows = store.stats_rows(since=since)
    assert (rows["changes"], rows["failed"], rows["rollbacks"], rows["succeeded"],
            rows["rolled_back"], len(rows["restores"]), rows["unrestored"]) == (
        3, 0, 3, 3, 3, 2, 0)  # fmt: skip
    assert rows["first_at"] == since
    api = store.stats_rows(pipeline="api")
    assert (api["changes"], api["rolled_back"], api["rollbacks"], len(api["restores"])) == (
        2, 2, 1, 1)  # fmt: skip
    staging = store.stats_rows(environment="staging")
    assert (staging["changes"], staging["failed"], staging["restores"], staging["unrestored"],
            staging["commits"]) == (1, 1, [], 1, [])  # fmt: skip
    later = store.stats_rows(since="2999-01-01T00:00:00.000000Z")
    assert (later["changes"], later["first_at"], later["restores"]) == (0, None, [])
    nothing = store.stats_rows(pipeline="nope")
    assert (nothing["succeeded"], nothing["commits"]) == (0, [])


# -- the change token (change_token, issue #18) ----------------------------------------------------


def test_change_token_moves_with_every_committed_write_and_not_with_reads(store_factory):
    store = store_factory()
    other = store_factory.reopen(store)
    dep_id = begin(store)
    runner = Runner(dep_id, stages_of_a_pipeline())
    store.record_plan(dep_id, plan_of(runner.stages))
    assert store.change_token() is not None  # None would leave readers re-reading blindly

    def reads(s: HistoryStore) -> None:
        s.get(dep_id), s.deployments(), s.stages(dep_id), s.logs(dep_id), s.locks()
        s.audit_trail(), s.gate(dep_id), s.previous_version("web", "prod")

    def quiet(s: HistoryStore) -> bool:
        # A few tries: a server store's token may move with writes elsewhere on the server
        # (other tests, its own background work); it must stay put across reads alone.
        for _ in range(20):
            before = s.change_token()
            reads(s)
            if s.change_token() == before == s.change_token():
                return True
        return False

    assert quiet(store)
    assert quiet(other)
    out = runner.output(0, 0, "compiling")
    writes = [
        ("a step's start, by the store itself", store,
         lambda: store.record([runner.stage_started(0), runner.step_started(0, 0)], [])),
        ("a log line, by another connection", other, lambda: other.record([], records(out))),
        ("a heartbeat", store, lambda: store.heartbeat(dep_id)),
        ("a cancel request", other, lambda: other.request_cancel(dep_id, user="bob")),
        ("an audit record", store,
         lambda: store.add_audit("note", dep_id, user="carol", reason="checked")),
        ("the finish", other, lambda: other.finish(dep_id, Status.CANCELLED, "cancelled")),
    ]  # fmt: skip
    for what, writer, write in writes:
        before = (store.change_token(), other.change_token())
        write()
        after = (store.change_token(), other.change_token())
        assert after[0] != before[0], f"{what}: the store's own token did not move"
        assert after[1] != before[1], f"{what}: the other connection's token did not move"
        assert quiet(store if writer is other else other), what
    assert store.get(dep_id)["status"] == "cancelled"
