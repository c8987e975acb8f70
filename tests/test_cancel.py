"""Cancel and detach with real processes: signals, ``shipyard cancel``, ``deploy --detach``.

DESIGN §3: Ctrl-C or SIGTERM during ``deploy`` stops the running steps (process group SIGTERM,
grace, SIGKILL), records ``cancelled``, frees the lock and exits 130 - within 5 seconds, even
when a step traps SIGTERM and has grandchildren. ``shipyard cancel ID`` does the same from
another process, for attached and detached deployments.
"""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import termios
import time
from collections.abc import Iterator

import faults
import pytest
from faults import Harness
from faults import Proc

#: The bound the issue names: every process gone, the CLI exited, within 5 seconds.
CANCEL_WINDOW = 5.0


@pytest.fixture
def sy(tmp_path) -> Iterator[Harness]:
    yield from faults.harness(tmp_path)


def _fanout_pids(sy: Harness, procs: list[Proc], dep_id: int | str = "*") -> list[int]:
    """Wait until every step of the parallel stage runs; return all their pids (and children)."""
    pids = []
    for name in ("plain", "trap", "tree"):
        m = sy.wait_marker(name, dep_id, procs=procs)
        pids += [m["pid"], *m.get("children", [])]
    assert len(pids) == 5
    assert all(faults.alive(p) for p in pids)
    return pids


def _assert_cancelled(sy: Harness, dep_id: int, reason: str) -> None:
    dep = sy.deployment(dep_id)
    assert dep["status"] == "cancelled", dep
    assert reason in dep["error"], dep
    assert dep["finished_at"]
    assert sy.stages(dep_id) == {"prepare": "succeeded", "run": "cancelled", "after": "skipped"}
    steps = sy.query("SELECT name, status FROM steps WHERE deployment_id=? AND stage_idx=1",
                     (dep_id,))  # fmt: skip
    assert {s["status"] for s in steps} == {"cancelled"}, steps
    assert sy.locks() == []
    assert not faults.alive(dep["pid"])


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_during_a_parallel_stage_stops_every_process(sy: Harness, sig: int) -> None:
    cli = sy.start("deploy", "fanout", "v1", "-e", "prod")
    pids = _fanout_pids(sy, [cli])
    t0 = time.monotonic()
    cli.signal(sig)
    r = cli.wait(30)
    took = time.monotonic() - t0
    survivors = faults.wait_gone(pids, t0 + CANCEL_WINDOW)
    assert survivors == [], f"still running {CANCEL_WINDOW}s after {sig.name}: {survivors}"
    assert r.code == 130, r
    assert took <= CANCEL_WINDOW, f"the CLI took {took:.1f}s to exit"
    _assert_cancelled(sy, 1, f"interrupted by {signal.Signals(sig).name}")
    assert sy.markers_named("after") == {}


@pytest.mark.slow
def test_ctrl_c_pressed_twice_still_stops_every_process(sy: Harness) -> None:
    # An impatient user: the second Ctrl-C arrives while the first is still stopping a step
    # that traps SIGTERM. It must not cut the SIGTERM-grace-SIGKILL sequence short.
    cli = sy.start("deploy", "fanout", "v1", "-e", "prod")
    pids = _fanout_pids(sy, [cli])
    t0 = time.monotonic()
    cli.signal(signal.SIGINT)
    # The plain and tree steps die of SIGTERM at once; the trapping one is now in its grace.
    plain = sy.marker("plain", 1)["pid"]
    sy.wait_until("the plain step stopped", lambda: not faults.alive(plain))
    cli.signal(signal.SIGINT)
    r = cli.wait(30)
    survivors = faults.wait_gone(pids, t0 + CANCEL_WINDOW)
    assert survivors == [], f"still running after a double Ctrl-C: {survivors}"
    assert r.code == 130, r
    _assert_cancelled(sy, 1, "interrupted by SIGINT")


@pytest.mark.slow
def test_cancel_command_stops_an_attached_deployment(sy: Harness) -> None:
    cli = sy.start("deploy", "fanout", "v1", "-e", "prod")
    pids = _fanout_pids(sy, [cli])
    t0 = time.monotonic()
    c = sy.run("cancel", "1", "--reason", "wrong version")
    survivors = faults.wait_gone(pids, t0 + CANCEL_WINDOW)
    assert survivors == []
    assert c.code == 0, c
    assert "deployment #1 cancelled" in c.out
    r = cli.wait(30)
    assert time.monotonic() - t0 <= CANCEL_WINDOW
    # Cancelled by `shipyard cancel`, not by a signal to this process: exit 1 (DESIGN §3).
    assert r.code == 1, r
    _assert_cancelled(sy, 1, "cancelled by fault-tester: wrong version")
    (audit,) = sy.query("SELECT action, user, reason FROM audit WHERE deployment_id=1")
    assert audit == {"action": "cancel", "user": "fault-tester", "reason": "wrong version"}


def test_cancel_of_a_finished_deployment_is_refused(sy: Harness) -> None:
    assert sy.run("deploy", "app", "v1", "-e", "prod").code == 0
    r = sy.run("cancel", "1")
    assert r.code == 2, r
    assert "not running (it is succeeded)" in r.err
    r = sy.run("cancel", "7")
    assert r.code == 2, r
    assert "no deployment 7" in r.err


def _detach_on_a_terminal(sy: Harness, *args: str) -> int:
    """Run ``deploy --detach`` on a pseudo-terminal, then hang the terminal up; return the id."""
    master, slave = os.openpty()

    def take_terminal() -> None:
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        p = subprocess.Popen(
            [str(faults.SHIPYARD), "deploy", *args, "--detach"], cwd=sy.root, env=sy.env,
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
            preexec_fn=take_terminal,
        )  # fmt: skip
        os.close(slave)
        out = b""
        while b"\n" not in out:
            chunk = os.read(master, 1024)
            assert chunk, f"the terminal closed before an id was printed: {out!r}"
            out += chunk
        assert p.wait(30) == 0, out
    finally:
        os.close(master)  # the terminal goes away
    try:
        os.killpg(p.pid, signal.SIGHUP)  # and everything still in its session is hung up
    except ProcessLookupError:
        pass
    text = out.decode().strip()
    assert text.isdigit(), text
    return int(text)


@pytest.mark.slow
def test_detached_deployment_survives_the_terminal_and_is_followed(sy: Harness) -> None:
    dep_id = _detach_on_a_terminal(sy, "app", "v1", "-e", "prod", "--var", "mode=block")
    # The id was printed while the release step still blocks: printed "at once".
    step = sy.wait_marker("release", dep_id)
    dep = sy.deployment(dep_id)
    assert dep["status"] == "running"
    assert faults.alive(dep["pid"])
    assert faults.alive(step["pid"])
    st = sy.run("status")
    assert st.code == 0, st
    (row,) = [ln.split() for ln in st.out.splitlines() if ln.startswith(f"#{dep_id} ")]
    assert row[4:6] == ["running", "2/3"], st
    follow = sy.start("logs", str(dep_id), "--follow")
    sy.wait_until("logs --follow printed the release step's output",
                  lambda: "step release (block) running" in follow.out)  # fmt: skip
    assert follow.poll() is None  # still following: the deployment runs
    sy.release()
    r = follow.wait(30)
    assert r.code == 0, r
    assert "step verify (failflag) running" in r.out, r
    assert sy.deployment(dep_id)["status"] == "succeeded"
    assert sy.locks() == []
    st = sy.run("status", str(dep_id))
    assert "succeeded" in st.out, st


@pytest.mark.slow
def test_cancel_of_a_detached_deployment(sy: Harness) -> None:
    r = sy.run("deploy", "fanout", "v1", "-e", "prod", "--detach")
    assert r.code == 0, r
    dep_id = int(r.out.strip())
    pids = _fanout_pids(sy, [], dep_id)
    background = sy.deployment(dep_id)["pid"]
    assert faults.alive(background)
    t0 = time.monotonic()
    c = sy.run("cancel", str(dep_id))
    survivors = faults.wait_gone([*pids, background], t0 + CANCEL_WINDOW)
    assert survivors == [], survivors
    assert c.code == 0, c
    assert f"deployment #{dep_id} cancelled" in c.out
    _assert_cancelled(sy, dep_id, "cancelled by fault-tester")


def test_detach_reports_a_held_lock_at_once(sy: Harness) -> None:
    holder = sy.start("deploy", "app", "v1", "-e", "prod", "--var", "mode=block")
    sy.wait_marker("release", procs=[holder])
    r = sy.run("deploy", "app", "v2", "-e", "prod", "--detach")
    assert r.code == 3, r
    assert "locked by deployment 1" in r.err
    sy.release()
    assert holder.wait().code == 0
    assert [d["version"] for d in sy.deployments()] == ["v1"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_signal_during_a_blocking_python_step_exits_in_time(sy: Harness, sig: int) -> None:
    # A sync python step runs in a thread of the CLI, which cannot be interrupted: the CLI
    # must still record `cancelled`, free the lock and exit 130 without waiting for it.
    cli = sy.start("deploy", "thinker", "v1", "-e", "prod")
    sy.wait_marker("think", procs=[cli])
    t0 = time.monotonic()
    cli.signal(sig)
    r = cli.wait(30)
    took = time.monotonic() - t0
    assert r.code == 130, r
    assert took <= CANCEL_WINDOW, f"the CLI took {took:.1f}s to exit"
    dep = sy.deployment(1)
    assert dep["status"] == "cancelled", dep
    assert sy.locks() == []
