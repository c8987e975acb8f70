"""Approval gates: a deployment stops at ``sy.approval``, exits 4 with no process left, and is
resumed by ``shipyard approve`` from another process and working folder (another runner), on
both stores: a SQLite file shared by the processes of this host, and the PostgreSQL store.
"""

from __future__ import annotations

import json
import os
import textwrap
import uuid
from pathlib import Path
from typing import Any

import pytest
from runners import Fleet
from runners import Runner
from runners import done
from runners import out_of

PIPELINES = textwrap.dedent(
    """
    import os

    import shipyard as sy


    def mark(what, d):
        with open(os.environ["RACE_LOG"], "a") as f:
            gates = {k: (list(v.approvers), v.choice) for k, v in d.approvals.items()}
            f.write(f"{what} {d.version} {gates!r}\\n")


    GATE = dict(timeout="4h")
    if os.environ.get("GATE"):
        GATE = eval(os.environ["GATE"])


    SINKS = [sy.jsonl(os.environ["EVENTS"])] if os.environ.get("EVENTS") else []


    @sy.pipeline(rollback=os.environ.get("ROLLBACK", "manual"), notify=SINKS)
    def web(d):
        release = [sy.python(mark, "release", d, name="release")]
        if os.environ.get("NEEDS_SECRET"):
            release.append(sy.command("true", sy.secret("DEPLOY_TOKEN"), name="uses the token"))
        return [
            sy.stage(os.environ.get("FIRST", "build"), sy.python(mark, "build", d, name="build")),
            sy.stage("approve", sy.approval(**GATE)),
            sy.stage("release", *release),
        ]
    """
)


@pytest.fixture(params=["sqlite", "postgresql"])
def fleet(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "sqlite":
        url = str(tmp_path / "shared" / "history.db")
        yield _Approvals(tmp_path, url)
        return
    pg = request.getfixturevalue("pg")
    schema = f"a_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION shipyard")
    try:
        yield _Approvals(tmp_path, pg.url(schema=schema))
    finally:
        pg.psql(f"DROP SCHEMA {schema} CASCADE")


class _Approvals(Fleet):
    def runner(self, url: str | None = None, user: str = "alice", **env: str) -> Runner:
        r = super().runner(url)
        (r.dir / "pipelines.py").write_text(PIPELINES)
        r.env["SHIPYARD_USER"] = user
        r.env.update(env)
        return r

    def marks(self) -> list[str]:
        return self.log.read_text().splitlines()


def _deploy_to_the_gate(fleet: _Approvals, version: str = "1.0", **env: str) -> Runner:
    r = fleet.runner(**env)
    out = r.run("deploy", "web", version, "-e", "prod")
    assert out.returncode == 4, out_of(out)
    return r


# -- suspending ---------------------------------------------------------------------------------


def test_deploy_stops_at_the_gate_exits_4_and_leaves_nothing_running(fleet: _Approvals) -> None:
    r = fleet.runner()
    out = r.run("deploy", "web", "1.0", "-e", "prod", "--json")
    assert out.returncode == 4, out_of(out)
    doc = json.loads(out.stdout)
    assert doc["status"] == "awaiting_approval"
    gate = doc["gate"]
    assert (gate["stage"], gate["status"], gate["required"], gate["on_timeout"], gate["lock"]) == (
        "approve", "waiting", 1, "reject", "hold")  # fmt: skip
    assert gate["commands"] == {"approve": "shipyard approve 1",
                                "reject": "shipyard reject 1 --comment TEXT"}  # fmt: skip
    assert [s["status"] for s in doc["stages"]] == ["succeeded", "waiting", "pending"]
    assert [m.split()[0] for m in fleet.marks()] == ["build"]  # the release did not run
    # No process of that runner is left (the step processes included).
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                continue
            assert not cwd.startswith(str(r.dir)), f"process {pid} is still running in {cwd}"
    assert r.run("deploy", "web", "1.0", "-e", "prod", "--exit-zero-when-awaiting").returncode == 3


def test_a_waiting_deployment_is_never_taken_for_a_dead_holder(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    # A lease so short that any silent holder would count as dead at once.
    other = fleet.runner(user="bob", SHIPYARD_LOCK_LEASE="0.01")
    for cmd in (["status"], ["history"], ["show", "1"]):
        assert other.run(*cmd).returncode == 0
    refused = other.run("deploy", "web", "2.0", "-e", "prod")
    assert refused.returncode == 3, out_of(refused)
    assert "held by deployment 1 (version 1.0), awaiting approval at stage 'approve'" in (
        refused.stderr)  # fmt: skip
    assert "expires" in refused.stderr
    assert other.json("show", "1")["status"] == "awaiting_approval"


def test_plan_refuses_a_gate_that_shares_its_stage_or_has_no_timeout(tmp_path: Path) -> None:
    r = Fleet(tmp_path, str(tmp_path / "h.db")).runner()
    (r.dir / "pipelines.py").write_text(textwrap.dedent("""
        import shipyard as sy

        @sy.pipeline()
        def web(d):
            return [sy.stage("gate", sy.approval(timeout=60), sy.command("true"))]

        @sy.pipeline()
        def api(d):
            return [sy.stage("gate", sy.approval())]
        """))  # fmt: skip
    shared = r.run("plan", "web", "1", "-e", "x")
    assert shared.returncode == 2
    assert "an approval step must be alone in its stage" in shared.stderr
    untimed = r.run("plan", "api", "1", "-e", "x")
    assert untimed.returncode == 2
    assert "timeout is required" in untimed.stderr


def test_plan_shows_who_may_approve_the_timeout_and_the_lock(fleet: _Approvals) -> None:
    gate = "dict(timeout='2h', approvers=['bob', 'carol'], required=2, lock='release')"
    out = fleet.runner(GATE=gate).run("plan", "web", "1", "-e", "prod")
    assert out.returncode == 0, out_of(out)
    assert ("approval by bob, carol (2 required, no self-approval); times out after 2h -> "
            "reject; lock released while waiting") in out.stdout  # fmt: skip


# -- deciding -----------------------------------------------------------------------------------


def test_approve_from_another_runner_runs_only_the_remaining_stages(fleet: _Approvals) -> None:
    gate = "dict(timeout='4h', options=['canary', 'full'])"
    _deploy_to_the_gate(fleet, GATE=gate)
    bob = fleet.runner(user="bob", GATE=gate)
    out = bob.run("approve", "1", "--comment", "looks good", "--choice", "full")
    assert out.returncode == 0, out_of(out)
    assert fleet.marks() == ["build 1.0 {}", "release 1.0 {'approve': (['bob'], 'full')}"]
    doc = bob.json("show", "1")
    assert doc["status"] == "succeeded"
    assert [s["status"] for s in doc["stages"]] == ["succeeded"] * 3
    (decision,) = doc["gate"]["decisions"]
    assert (decision["decision"], decision["user"], decision["comment"], decision["choice"]) == (
        "approve", "bob", "looks good", "full")  # fmt: skip
    r = bob.run("show", "1")
    assert "approve by bob: looks good" in r.stdout
    # The lock is free again.
    assert bob.run("deploy", "web", "1.1", "-e", "prod").returncode == 4


def test_reject_ends_it_failed_and_rolls_back_when_the_pipeline_says_so(fleet: _Approvals) -> None:
    first = fleet.runner(GATE="dict(timeout=60)", ROLLBACK="auto")
    assert first.run("deploy", "web", "1.0", "-e", "prod").returncode == 4
    assert fleet.runner(user="bob", ROLLBACK="auto").run("approve", "1").returncode == 0
    _deploy_to_the_gate(fleet, "2.0", ROLLBACK="auto")
    out = fleet.runner(user="bob", ROLLBACK="auto").run("reject", "2", "--comment", "not now")
    assert out.returncode == 1, out_of(out)
    assert "rejected by bob at gate 'approve': not now" in out.stdout
    history = fleet.runner().json("history")
    assert [(d["version"], d["status"], d["rollback_of"]) for d in history][:2] == [
        ("1.0", "awaiting_approval", 2), ("2.0", "failed", None)]  # fmt: skip
    # The rollback runs the pipeline, so it waits at the gate too; cancelled here.
    assert fleet.runner().run("cancel", "3").returncode == 0
    # With on_reject="fail", a rejection only fails it.
    no_rollback = "dict(timeout=60, on_reject='fail')"
    _deploy_to_the_gate(fleet, "3.0", GATE=no_rollback, ROLLBACK="auto")
    out = fleet.runner(user="bob", GATE=no_rollback, ROLLBACK="auto").run(
        "reject", "4", "--comment", "no")  # fmt: skip
    assert out.returncode == 1, out_of(out)
    top = fleet.runner().json("history")[0]
    assert (top["id"], top["status"]) == (4, "failed")


def test_the_approver_rules(fleet: _Approvals) -> None:
    gate = "dict(timeout='1h', approvers=['bob', 'carol'], required=2)"
    _deploy_to_the_gate(fleet, GATE=gate)
    alice = fleet.runner(GATE=gate)
    own = alice.run("approve", "1")
    assert own.returncode == 2
    assert "bob, carol" in own.stderr  # alice is not an approver at all
    bob = fleet.runner(user="bob", GATE=gate)
    first = bob.run("approve", "1")
    assert first.returncode == 4, out_of(first)
    assert "approval 1 of 2 recorded" in first.stdout
    again = bob.run("approve", "1")  # the same user twice counts once
    assert again.returncode == 4
    assert "approval 1 of 2 recorded" in again.stdout
    assert [m.split()[0] for m in fleet.marks()] == ["build"]
    carol = fleet.runner(user="carol", GATE=gate).run("approve", "1")
    assert carol.returncode == 0, out_of(carol)
    assert fleet.marks()[-1] == "release 1.0 {'approve': (['bob', 'carol'], None)}"


def test_self_approval_is_refused_unless_allowed(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    refused = fleet.runner().run("approve", "1")
    assert refused.returncode == 2
    assert "alice started deployment 1 and may not approve it" in refused.stderr
    allowed = "dict(timeout='1h', allow_self_approval=True)"
    fleet.runner().run("cancel", "1")
    _deploy_to_the_gate(fleet, "1.1", GATE=allowed)
    assert fleet.runner(GATE=allowed).run("approve", "2").returncode == 0


def test_ten_simultaneous_approvals_resume_it_once(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    procs = [fleet.runner(user=f"user{i}").start("approve", "1") for i in range(10)]
    results = [done(p) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0] + [2] * 9, results
    for rc, out in results:
        assert "database is locked" not in out
        if rc == 2:
            assert "was already decided: approve by user" in out, out
    assert [m.split()[0] for m in fleet.marks()] == ["build", "release"]


def test_a_changed_pipeline_is_refused_on_approve(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    changed = fleet.runner(user="bob", FIRST="compile").run("approve", "1")
    assert changed.returncode == 2, out_of(changed)
    assert "pipeline 'web' changed since deployment 1 stopped at gate 'approve'" in changed.stderr
    assert fleet.runner(user="bob").json("show", "1")["status"] == "awaiting_approval"
    assert fleet.runner(user="bob").run("approve", "1").returncode == 0


def test_a_secret_missing_on_resume_fails_it_before_any_step(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet, NEEDS_SECRET="1", DEPLOY_TOKEN="s3cr3t-token")
    out = fleet.runner(user="bob", NEEDS_SECRET="1").run("approve", "1")
    assert out.returncode == 1, out_of(out)
    assert "DEPLOY_TOKEN" in out_of(out)
    doc = fleet.runner().json("show", "1")
    assert doc["status"] == "failed"
    assert [m.split()[0] for m in fleet.marks()] == ["build"]


def test_cancel_of_a_waiting_deployment_frees_its_lock(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    out = fleet.runner(user="bob").run("cancel", "1", "--reason", "wrong version")
    assert out.returncode == 0, out_of(out)
    doc = fleet.runner().json("show", "1")
    assert doc["status"] == "cancelled"
    assert "cancelled by bob while awaiting approval: wrong version" in doc["error"]
    assert fleet.runner().run("deploy", "web", "1.1", "-e", "prod").returncode == 4
    late = fleet.runner(user="bob").run("approve", "1")
    assert late.returncode == 2
    assert "was already decided: cancel by bob" in late.stderr


def test_with_lock_release_others_deploy_while_it_waits(fleet: _Approvals) -> None:
    gate = "dict(timeout='1h', lock='release')"
    _deploy_to_the_gate(fleet, GATE=gate)
    assert fleet.runner(GATE=gate).run("deploy", "web", "2.0", "-e", "prod").returncode == 4
    assert [d["status"] for d in fleet.runner().json("history")] == ["awaiting_approval"] * 2
    assert fleet.runner(user="bob", GATE=gate).run("approve", "1").returncode == 0
    assert [m.split()[:2] for m in fleet.marks()][-1] == ["release", "1.0"]


# -- timeouts, superseding, stale approvals, the Python API ------------------------------------


def test_reading_an_expired_gate_changes_nothing_and_expire_applies_the_default(
    fleet: _Approvals,
) -> None:
    _deploy_to_the_gate(fleet, GATE="dict(timeout=1)")
    _deploy_gate_expired = fleet.runner(user="bob")
    import time

    time.sleep(1.2)  # the gate's own timeout, 1 s, runs out
    doc = _deploy_gate_expired.json("show", "1")
    assert (doc["status"], doc["gate"]["expired"]) == ("awaiting_approval", True)
    late = _deploy_gate_expired.run("approve", "1")
    assert late.returncode == 2
    assert "expired at" in late.stderr
    assert "`shipyard expire` applies it" in late.stderr
    assert _deploy_gate_expired.json("show", "1")["status"] == "awaiting_approval"
    out = _deploy_gate_expired.run("expire")
    assert out.returncode == 0, out_of(out)
    assert "expired, rejected" in out.stderr
    doc = _deploy_gate_expired.json("show", "1")
    assert doc["status"] == "failed"
    assert "the approval expired at" in doc["error"]
    assert doc["gate"]["status"] == "expired"


def test_an_expired_gate_defaulting_to_approve_resumes_when_a_deploy_meets_it(
    fleet: _Approvals,
) -> None:
    gate = "dict(timeout=1, on_timeout='approve')"
    _deploy_to_the_gate(fleet, GATE=gate)
    import time

    time.sleep(1.2)
    nxt = fleet.runner(user="bob", GATE=gate).run("deploy", "web", "2.0", "-e", "prod")
    assert nxt.returncode == 4, out_of(nxt)  # the new one stops at its own gate
    assert "expired, approved" in nxt.stderr
    statuses = {d["version"]: d["status"] for d in fleet.runner().json("history")}
    assert statuses == {"1.0": "succeeded", "2.0": "awaiting_approval"}
    assert [m.split()[:2] for m in fleet.marks()] == [
        ["build", "1.0"], ["release", "1.0"], ["build", "2.0"]]  # fmt: skip


def test_supersede_gives_up_the_waiting_deployment_and_proceeds(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    out = fleet.runner(user="bob").run("deploy", "web", "2.0", "-e", "prod", "--supersede")
    assert out.returncode == 4, out_of(out)
    assert "deployment #1 (1.0) superseded" in out.stderr
    first = fleet.runner().json("show", "1")
    assert first["status"] == "superseded"
    assert "supersede by bob: deploy --supersede" in fleet.runner().run("show", "1").stdout


def test_a_stale_approval_is_refused_when_the_lock_was_released(fleet: _Approvals) -> None:
    gate = "dict(timeout='1h', lock='release')"
    _deploy_to_the_gate(fleet, GATE=gate)
    other = fleet.runner(user="bob", GATE=gate)
    assert other.run("deploy", "web", "2.0", "-e", "prod").returncode == 4
    assert fleet.runner(user="carol", GATE=gate).run("approve", "2").returncode == 0
    stale = fleet.runner(user="carol", GATE=gate).run("approve", "1")
    assert stale.returncode == 3, out_of(stale)
    assert "stale approval: deployment 2 (2.0) succeeded" in stale.stderr


def test_the_python_api_approves_and_wait_returns_at_a_gate(fleet: _Approvals) -> None:
    import sys

    r = fleet.runner()
    code = textwrap.dedent("""
        import json, os, sys
        from shipyard import DeploymentManager

        m = DeploymentManager()
        dep = m.deploy("web", "1.0", "prod")
        first = m.wait(dep)["status"]
        os.environ["SHIPYARD_USER"] = "bob"
        again = m.approve(dep, comment="from python")
        last = m.wait(again)["status"]
        m.close()
        print(json.dumps([first, again == dep, last]))
        """)  # fmt: skip
    import subprocess

    out = subprocess.run([sys.executable, "-c", code], cwd=r.dir, env=r.env, text=True,
                         capture_output=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == ["awaiting_approval", True,
                                                                "succeeded"]  # fmt: skip


def test_sinks_receive_the_gate_with_the_commands_to_decide_it(fleet: _Approvals) -> None:
    r = fleet.runner()
    events = r.dir / "events.jsonl"
    out = r.run("deploy", "web", "1.0", "-e", "prod", "--notify", f"jsonl:{events}")
    assert out.returncode == 4, out_of(out)
    seen = [json.loads(line) for line in events.read_text().splitlines()]
    assert [e["event"] for e in seen] == [
        "deployment_started", "stage_started", "step_started", "step_finished", "stage_finished",
        "deployment_suspended"]  # fmt: skip
    last = seen[-1]
    assert (last["status"], last["stage"]) == ("awaiting_approval", "approve")
    assert last["commands"] == {"approve": "shipyard approve 1",
                                "reject": "shipyard reject 1 --comment TEXT"}  # fmt: skip
    from shipyard.contrib.slack import message

    text = message(last)
    assert text is not None
    assert "Awaiting approval" in text
    assert "`shipyard approve 1`" in text


def test_kill_9_of_the_resumed_run_then_retry_runs_what_is_left(fleet: _Approvals) -> None:
    import time

    gate = "dict(timeout='1h')"
    _deploy_to_the_gate(fleet, GATE=gate)
    slow = fleet.runner(user="bob", GATE=gate, NEEDS_SECRET="1", DEPLOY_TOKEN="abcdefgh")
    (slow.dir / "pipelines.py").write_text(
        (slow.dir / "pipelines.py")
        .read_text()
        .replace(
            'sy.command("true", sy.secret("DEPLOY_TOKEN"), name="uses the token")',
            'sy.command("sleep", "30", name="uses the token")',
        )
    )
    p = slow.start("approve", "1")
    deadline = time.monotonic() + 60
    while not any(m.startswith("release") for m in fleet.marks()):
        assert time.monotonic() < deadline, "the resumed run did not start its release"
        time.sleep(0.05)
    p.kill()
    done(p)
    seen = fleet.runner().json("show", "1")  # the next command finds it dead
    assert seen["status"] == "interrupted", seen
    again = fleet.runner(user="bob").run("retry", "1")
    assert again.returncode == 0, out_of(again)
    assert [m.split()[0] for m in fleet.marks()] == ["build", "release", "release"]


def test_history_status_is_the_inbox_and_show_says_how_long_is_left(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    other = fleet.runner(user="bob")
    assert other.run("cancel", "1").returncode == 0
    _deploy_to_the_gate(fleet, "1.1", GATE="dict(timeout=1)")
    inbox = other.json("history", "--status", "awaiting_approval")
    assert [d["id"] for d in inbox] == [2]
    assert [d["id"] for d in other.json("history", "--status", "cancelled")] == [1]
    bad = other.run("history", "--status", "stuck")
    assert bad.returncode == 2
    assert "'stuck' is not a deployment status" in bad.stderr
    import time

    time.sleep(1.2)
    shown = other.run("show", "2").stdout
    assert "gate      'approve' awaits 1 approval(s) of anyone; expired " in shown
    assert "ago; default: reject" in shown


def test_wait_approval_follows_the_gate_and_ctrl_c_leaves_it_waiting(fleet: _Approvals) -> None:
    import signal
    import time

    r = fleet.runner()
    p = r.start("deploy", "web", "1.0", "-e", "prod", "--wait-approval", "60")
    deadline = time.monotonic() + 60
    while not fleet.runner().json("history", "--status", "awaiting_approval"):
        assert time.monotonic() < deadline, "the deployment never reached its gate"
        time.sleep(0.1)
    assert p.poll() is None  # it stays
    assert fleet.runner(user="bob").run("approve", "1").returncode == 0
    rc, out = done(p)
    assert rc == 0, out
    assert "deployment #1 is succeeded" in out
    # Ctrl-C while waiting stops the waiting only.
    q = fleet.runner().start("deploy", "web", "1.1", "-e", "prod", "--wait-approval", "60")
    while True:
        docs = fleet.runner().json("history", "--status", "awaiting_approval")
        if docs:
            break
        assert time.monotonic() < deadline + 60
        time.sleep(0.1)
    time.sleep(0.5)
    q.send_signal(signal.SIGINT)
    rc, out = done(q)
    assert rc == 130, out
    assert "still awaits its approval" in out
    assert fleet.runner().json("show", "2")["status"] == "awaiting_approval"


# -- decisions reach the sinks; reminders; who decides ---------------------------------------------


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_every_decision_reaches_the_sinks_in_order(fleet: _Approvals) -> None:
    events = fleet.root / "events.jsonl"
    gate = "dict(timeout='4h', required=2)"
    _deploy_to_the_gate(fleet, GATE=gate, EVENTS=str(events))
    bob = fleet.runner(user="bob", GATE=gate, EVENTS=str(events))
    assert bob.run("approve", "1", "--comment", "looks fine").returncode == 4
    carol = fleet.runner(user="carol", GATE=gate, EVENTS=str(events))
    out = carol.run("approve", "1")
    assert out.returncode == 0, out_of(out)
    seen = _events(events)
    names = [e["event"] for e in seen]
    assert names == [
        "deployment_started", "stage_started", "step_started", "step_finished", "stage_finished",
        "deployment_suspended",
        "approval_decided",  # bob: 1 of 2
        "approval_decided",  # carol: resumes it
        "deployment_started", "stage_started", "step_started", "step_finished", "stage_finished",
        "deployment_finished",
    ]  # fmt: skip
    first, second = seen[6], seen[7]
    assert (first["decision"], first["user"], first["outcome"], first["approvals"],
            first["required"], first["comment"], first["source"]) == (
        "approve", "bob", "recorded", 1, 2, "looks fine", "cli")  # fmt: skip
    assert first["commands"]["approve"] == "shipyard approve 1"
    assert (second["user"], second["outcome"], second["approvals"]) == ("carol", "resume", 2)
    assert "commands" not in second
    assert seen[8].get("resumed") is True
    assert "resumed" not in seen[0]
    assert seen[-1]["status"] == "succeeded"
    from shipyard.contrib.slack import message

    assert "Approved by bob" in (message(first) or "")
    assert "1 of 2 approvals" in (message(first) or "")
    assert "Resumed after approval" in (message(seen[8]) or "")


def test_reject_cancel_and_supersede_reach_the_sinks(fleet: _Approvals) -> None:
    events = fleet.root / "events.jsonl"
    _deploy_to_the_gate(fleet, EVENTS=str(events))
    bob = fleet.runner(user="bob", EVENTS=str(events))
    assert bob.run("reject", "1", "--comment", "not today").returncode == 1
    r = _deploy_to_the_gate(fleet, "2.0", EVENTS=str(events))
    assert r.run("cancel", "2", "--reason", "wrong branch").returncode == 0
    _deploy_to_the_gate(fleet, "3.0", EVENTS=str(events))
    out = bob.run("deploy", "web", "4.0", "-e", "prod", "--supersede")
    assert out.returncode == 4, out_of(out)
    decided = [(e["deployment"]["id"], e["decision"], e["outcome"], e["user"])
               for e in _events(events) if e["event"] == "approval_decided"]  # fmt: skip
    assert decided == [
        (1, "reject", "rejected", "bob"),
        (2, "cancel", "cancelled", "alice"),
        (3, "supersede", "superseded", "bob"),
    ]
    from shipyard.contrib.slack import message

    rejected = next(e for e in _events(events) if e.get("decision") == "reject")
    assert "Rejected by bob" in (message(rejected) or "")
    assert "not today" in (message(rejected) or "")


def test_expiry_reaches_the_sinks(fleet: _Approvals) -> None:
    import time

    events = fleet.root / "events.jsonl"
    gate = "dict(timeout=1)"
    _deploy_to_the_gate(fleet, GATE=gate, EVENTS=str(events))
    time.sleep(1.2)  # the gate's own timeout (1 s, its minimum) must pass
    out = fleet.runner(GATE=gate, EVENTS=str(events)).run("expire")
    assert out.returncode == 0, out_of(out)
    expired = [e for e in _events(events) if e["event"] == "approval_expired"]
    assert [(e["stage"], e["outcome"]) for e in expired] == [("approve", "rejected")]


def test_expire_sends_the_reminders_due_once_per_period(fleet: _Approvals) -> None:
    import time

    events = fleet.root / "events.jsonl"
    # A period of 3 s: the second ``expire`` right after the first must fall inside it even on
    # a loaded machine (with 1 s, a slow start of that process was a second reminder).
    gate = "dict(timeout='1h', remind_every=3)"
    _deploy_to_the_gate(fleet, GATE=gate, EVENTS=str(events))
    cron = fleet.runner(user="cron", GATE=gate, EVENTS=str(events))

    def reminders() -> list[dict[str, Any]]:
        return [e for e in _events(events) if e["event"] == "approval_reminder"]

    time.sleep(3.1)
    out = cron.run("expire")
    assert out.returncode == 0, out_of(out)
    assert "reminder sent" in out.stderr
    assert cron.run("expire").returncode == 0  # at once again: not due yet
    assert len(reminders()) == 1
    first = reminders()[0]
    assert (first["stage"], first["approvals"], first["required"]) == ("approve", 0, 1)
    assert first["commands"]["approve"] == "shipyard approve 1"
    assert cron.run("show", "1").stdout.count(" remind by shipyard") == 1
    time.sleep(3.1)
    assert cron.run("expire").returncode == 0
    assert len(reminders()) == 2
    # Nothing was decided by reminding: it still waits.
    assert cron.json("show", "1")["status"] == "awaiting_approval"
    from shipyard.contrib.slack import message

    assert "Still awaiting approval" in (message(first) or "")


IDENTIFY = """

@sy.hookimpl
def shipyard_identify(user, purpose):
    return {"alice": "alice@example.org", "bob": "bob@example.org"}.get(user)
"""


def test_an_identify_hook_renames_who_decides_and_who_deploys(fleet: _Approvals) -> None:
    gate = "dict(timeout='4h', approvers=['bob@example.org'])"
    r = fleet.runner(GATE=gate)
    (r.dir / "pipelines.py").write_text(PIPELINES + IDENTIFY)
    assert r.run("deploy", "web", "1.0", "-e", "prod").returncode == 4
    bob = fleet.runner(user="bob", GATE=gate)
    (bob.dir / "pipelines.py").write_text(PIPELINES + IDENTIFY)
    out = bob.run("approve", "1")
    assert out.returncode == 0, out_of(out)
    doc = bob.json("show", "1")
    assert doc["user"] == "alice@example.org"
    assert [(d["user"], d["decision"]) for d in doc["gate"]["decisions"]] == [
        ("bob@example.org", "approve")]  # fmt: skip
    # Without the hook, bob is not among the approvers.
    _deploy_to_the_gate(fleet, "2.0", GATE=gate)
    refused = fleet.runner(user="bob", GATE=gate).run("approve", "2")
    assert refused.returncode == 2, out_of(refused)
    assert "bob may not decide deployment 2" in refused.stderr


def test_shipyard_source_is_recorded_and_checked(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    bad = fleet.runner(user="bob", SHIPYARD_SOURCE="Web Page").run("approve", "1")
    assert bad.returncode == 2, out_of(bad)
    assert "SHIPYARD_SOURCE='Web Page'" in bad.stderr
    bob = fleet.runner(user="bob", SHIPYARD_SOURCE="web")
    assert bob.run("approve", "1").returncode == 0
    decisions = bob.json("show", "1")["gate"]["decisions"]
    assert [(d["user"], d["source"]) for d in decisions] == [("bob", "web")]


def test_approve_detach_prints_the_id_and_resumes_in_the_background(fleet: _Approvals) -> None:
    _deploy_to_the_gate(fleet)
    bob = fleet.runner(user="bob")
    out = bob.run("approve", "1", "--detach")
    assert out.returncode == 0, out_of(out)
    assert out.stdout.strip() == "1"
    from polling import wait_for

    wait_for(lambda: bob.json("show", "1")["status"] == "succeeded" or None, timeout=30,
             what="the detached resume to succeed")  # fmt: skip
    assert [m.split()[0] for m in fleet.marks()] == ["build", "release"]
    # A refused approval is reported by the parent with its exit code.
    again = bob.run("approve", "1", "--detach")
    assert again.returncode == 2, out_of(again)
    assert "already" in again.stderr


# -- an inconclusive analysis stops at a gate (issue #15) ------------------------------------------

ANALYSED = """
import os
import shipyard as sy

def measure():
    return float(os.environ["VALUE"]) if os.environ.get("VALUE") else None  # none: no data

GATE = sy.approval(timeout="1h", allow_self_approval=True)

@sy.pipeline
def web(d):
    check = sy.analysis(
        sy.metric("error rate", sy.python_metric(measure), success=sy.below(0.05),
                  failure=sy.above(0.1), interval=0.01, count=2),
        on_inconclusive=GATE)
    verify = [sy.command("echo", "pre"), check]
    if os.environ.get("AFTER"):
        verify.append(sy.command("echo", "after"))
    return [sy.stage("build", sy.command("echo", "build")),
            sy.stage("verify", *verify),
            sy.stage("release", sy.command("echo", "released"))]
"""


def _analysed(fleet: _Approvals, **env: str) -> Runner:
    r = fleet.runner(**env)
    (r.dir / "pipelines.py").write_text(ANALYSED)
    return r


def test_an_inconclusive_analysis_waits_and_approving_goes_on_without_analysing_again(
    fleet: _Approvals,
) -> None:
    r = _analysed(fleet)
    out = r.run("deploy", "web", "1.0", "-e", "prod", "--json")
    assert out.returncode == 4, out_of(out)
    doc = r.json("show", "1")
    assert (doc["status"], doc["gate"]["stage"], doc["gate"]["status"]) == (
        "awaiting_approval", "verify", "waiting")  # fmt: skip
    assert [s["status"] for s in doc["stages"]] == ["succeeded", "waiting", "pending"]
    pre, check = doc["stages"][1]["steps"]
    assert (pre["status"], check["status"]) == ("succeeded", "waiting")
    assert check["error"].startswith("analysis inconclusive: error rate inconclusive")
    assert [a["verdict"] for a in doc["analysis"]] == ["inconclusive"]
    assert "shipyard approve 1" in out.stderr + out.stdout
    approved = r.run("approve", "1")
    assert approved.returncode == 0, out_of(approved)
    after = r.json("show", "1")
    assert after["status"] == "succeeded"
    assert [s["status"] for s in after["stages"]] == ["succeeded"] * 3
    pre2, check2 = after["stages"][1]["steps"]
    assert pre2 == pre  # the step before the analysis is as it ended
    assert check2["status"] == "succeeded"
    assert check2["error"] == check["error"]  # what the analysis found stays on record
    assert len(after["analysis"][0]["measurements"]) == 1  # not analysed again
    assert [d["decision"] for d in after["gate"]["decisions"]] == ["approve"]
    assert "released" in r.run("logs", "1").stdout


def test_rejecting_an_inconclusive_analysis_fails_the_deployment_saying_both(
    fleet: _Approvals,
) -> None:
    r = _analysed(fleet)
    assert r.run("deploy", "web", "1.0", "-e", "prod").returncode == 4
    rejected = r.run("reject", "1", "--comment", "error rate unknown")
    assert rejected.returncode == 1, out_of(rejected)  # the deployment failed
    doc = r.json("show", "1")
    assert doc["status"] == "failed"
    check = doc["stages"][1]["steps"][1]
    assert check["status"] == "failed"
    assert check["error"].startswith("analysis inconclusive: ")
    assert check["error"].endswith("; rejected by alice: error rate unknown")
    assert doc["stages"][1]["steps"][0]["status"] == "succeeded"
    assert "released" not in r.run("logs", "1").stdout


def test_a_conclusive_analysis_does_not_stop_and_a_gate_must_end_its_stage(
    fleet: _Approvals,
) -> None:
    r = _analysed(fleet, VALUE="0.01")
    assert r.run("deploy", "web", "1.0", "-e", "prod").returncode == 0
    doc = r.json("show", "1")
    assert (doc["status"], doc["analysis"][0]["verdict"], "gate" in doc) == (
        "succeeded", "successful", False)  # fmt: skip
    bad = _analysed(fleet, AFTER="1")
    out = bad.run("deploy", "web", "2.0", "-e", "prod")
    assert out.returncode == 2, out_of(out)
    assert "stage 'verify': step 'analysis' may stop the deployment for an approval" in out.stderr
    assert "must be the last step of a sequential stage" in out.stderr
