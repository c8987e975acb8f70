"""Deploying to a fleet over SSH (#16), against the real sshd fleet of tests/sshd_fleet.py."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import threading
import time

import pytest
from sshd_fleet import Fleet
from sshd_fleet import Host
from sshd_fleet import fleet_fixture  # noqa: F401 - the session fixture `fleet`

pytestmark = pytest.mark.xdist_group("fleet")


def _pipelines(fleet: Fleet, hosts: list[Host], body: str, known_hosts: str | None = None) -> str:
    specs = [h.spec for h in hosts]
    return f"""
import shipyard as sy
hosts, ssh, upload = sy.hosts, sy.ssh, sy.upload

WEB = hosts("web", {specs!r}, region="eu", tags=["web"])
OPTS = dict(known_hosts={known_hosts or str(fleet.known_hosts)!r},
            client_keys=[{str(fleet.client_key)!r}], keepalive=1)

@sy.pipeline()
def app(d):
    return {body}
"""


_RELEASE = """[
        sy.stage("release",
            ssh("mkdir", "-p", f"releases/{d.version}", hosts=WEB, **OPTS),
            upload("app.py", f"releases/{d.version}/app.py", hosts=WEB, mode=0o640, **OPTS),
            ssh("sh", "-c", "echo version=$DEPLOYMENT_VERSION stage=$DEPLOYMENT_STAGE",
                hosts=WEB, **OPTS),
            ssh.symlink_switch(hosts=WEB, batch=2, rollback="auto", **OPTS)),
    ]"""


def _artifacts(shipyarder, dep_id: int) -> dict[str, dict]:
    with sqlite3.connect(shipyarder.history_path) as db:
        rows = db.execute(
            "select content from artifacts where deployment_id = ? and name = 'hosts'", (dep_id,)
        ).fetchall()
    return {i: json.loads(r[0]) for i, r in enumerate(rows)}


@pytest.fixture
def five(fleet: Fleet) -> list[Host]:
    hosts = fleet.hosts[:5]
    for h in hosts:
        h.reset()
    return hosts


def test_rolling_deploy_switches_every_host(shipyarder, fleet: Fleet, five):
    shipyarder.makefile("app.py", "print('hello from the app')\n")
    shipyarder.makepipelines(_pipelines(fleet, five, _RELEASE))
    plan = shipyarder.run("plan", "app", "1.0", "-e", "prod")
    assert plan.exit_code == 0, plan.output
    assert "batch=2" in plan.output
    assert "hosts web (region eu)" in plan.output

    result = shipyarder.run("deploy", "app", "1.0", "-e", "prod")
    assert result.exit_code == 0, result.output
    for h in five:
        assert os.readlink(h.current) == "releases/1.0"
        assert (h.current / "app.py").read_text() == "print('hello from the app')\n"
        assert oct((h.current / "app.py").stat().st_mode & 0o777) == "0o640"
        label = f"{h.address}:{h.port}"
        assert f"{label} | version=1.0 stage=release" in result.output
    assert "batch 3/3" in result.output

    second = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert second.exit_code == 0, second.output
    assert all(os.readlink(h.current) == "releases/2.0" for h in five)
    # Every host's outcome is in the history, per step.
    arts = _artifacts(shipyarder, second.deployment["id"])
    switch = arts[max(arts)]
    assert sorted(switch) == sorted(f"{h.address}:{h.port}" for h in five)
    assert {r["status"] for r in switch.values()} == {"succeeded"}
    assert all(r["exit_code"] == 0 and r["finished_at"] for r in switch.values())


def test_failures_beyond_max_failures_stop_and_roll_back(shipyarder, fleet: Fleet, five):
    shipyarder.makefile("app.py", "v\n")
    shipyarder.makepipelines(_pipelines(fleet, five, _RELEASE))
    assert shipyarder.run("deploy", "app", "1.0", "-e", "prod").exit_code == 0
    body = (
        """[sy.stage("switch", ssh.symlink_switch(hosts=WEB, batch=2, rollback="auto", **OPTS))]"""
    )
    shipyarder.makepipelines(_pipelines(fleet, five, body))
    for h in five[:3] + five[4:]:  # the fourth host lacks the release: it fails in batch 2
        (h.releases / "2.0").mkdir()
    result = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert result.exit_code == 1, result.output
    bad = five[3]
    assert f"{bad.address}:{bad.port}: host {bad.address}:{bad.port}: release folder" in (
        result.output
    )
    assert "rollout stopped" in result.output
    assert "rolled back" in result.output
    for h in five:  # the updated hosts are back on 1.0; the last was never touched
        assert os.readlink(h.current) == "releases/1.0", h.name
    statuses = {
        k: v["status"] for k, v in _artifacts(shipyarder, result.deployment["id"])[0].items()
    }
    label = [f"{h.address}:{h.port}" for h in five]
    assert statuses == {
        label[0]: "rolled back", label[1]: "rolled back", label[2]: "rolled back",
        label[3]: "failed", label[4]: "not touched",
    }  # fmt: skip

    # A later rollback of the fleet deployment restores the earlier version everywhere.
    good = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert good.exit_code == 1  # still missing on the fourth host
    (bad.releases / "2.0").mkdir()
    assert shipyarder.run("deploy", "app", "2.0", "-e", "prod").exit_code == 0
    assert all(os.readlink(h.current) == "releases/2.0" for h in five)
    back = shipyarder.run("rollback", "app", "-e", "prod")
    assert back.exit_code == 0, back.output
    assert all(os.readlink(h.current) == "releases/1.0" for h in five)


def test_unknown_and_changed_host_keys_are_refused(shipyarder, fleet: Fleet, five):
    target, other = five[0], five[1]
    body = """[sy.stage("run", ssh("true", hosts=WEB, **OPTS))]"""
    unknown = shipyarder.makefile("kh_unknown", other.known_hosts_line() + "\n")
    shipyarder.makepipelines(_pipelines(fleet, [target], body, str(unknown)))
    result = shipyarder.run("deploy", "app", "1.0", "-e", "prod")
    assert result.exit_code == 1
    fingerprint = _fingerprint(target)
    assert f"host {target.address}:{target.port}: host key {fingerprint} is unknown" in (
        result.output
    )

    changed_line = f"[{target.address}]:{target.port} {other.public_host_key}\n"
    changed = shipyarder.makefile("kh_changed", changed_line)
    shipyarder.makepipelines(_pipelines(fleet, [target], body, str(changed)))
    result = shipyarder.run("deploy", "app", "1.1", "-e", "prod")
    assert result.exit_code == 1
    assert f"host {target.address}:{target.port}: host key {fingerprint} is changed" in (
        result.output
    )


def _fingerprint(host: Host) -> str:
    import subprocess

    out = subprocess.run(
        ["ssh-keygen", "-l", "-f", str(host.host_key) + ".pub"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    return out.split()[1]


def _wait_for(predicate, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_host_that_stops_answering_fails_within_its_timeout(shipyarder, fleet: Fleet, five):
    host = five[4]
    body = """[sy.stage("run", ssh("sleep", "600", hosts=WEB, host_timeout=60, **OPTS))]"""
    shipyarder.makepipelines(_pipelines(fleet, [host], body))

    def freeze() -> None:
        _wait_for(lambda: host.processes("sleep"), "the remote sleep")
        host.freeze()

    t = threading.Thread(target=freeze)
    t.start()
    try:
        result = shipyarder.run("deploy", "app", "1.0", "-e", "prod")
    finally:
        t.join()
        host.thaw()
        for pid in host.processes("sleep"):
            os.kill(pid, signal.SIGKILL)
    assert result.exit_code == 1
    # The keepalives (1s) notice the silence long before the host timeout (60s) or the sleep.
    assert f"host {host.address}:{host.port}: connection lost" in result.output, result.output


def test_ctrl_c_mid_batch_leaves_no_remote_process(shipyarder, fleet: Fleet, five):
    body = """[sy.stage("run", ssh("sleep", "600", hosts=WEB, batch=3, **OPTS))]"""
    shipyarder.makepipelines(_pipelines(fleet, five, body))
    proc = shipyarder.popen("deploy", "app", "1.0", "-e", "prod")
    _wait_for(lambda: all(h.processes("sleep") for h in five[:3]), "the first batch's sleeps")
    os.kill(proc.pid, signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out + err).decode()
    _wait_for(lambda: not any(h.processes("sleep") for h in five), "no remote sleep", 10)
    assert not any(h.processes("sleep") for h in five[3:])  # the second batch never started


def test_secrets_never_reach_remote_output_or_history(shipyarder, fleet: Fleet, five):
    value = "s3cr3t-fleet-token-9431"
    body = """[sy.stage("run", ssh("echo", "token:", sy.secret("FLEET_TOKEN"), hosts=WEB,
                                   env={"TOKEN": sy.secret("FLEET_TOKEN")}, **OPTS),
                                ssh("sh", "-c", "echo env:$TOKEN >&2; exit 3", hosts=WEB,
                                   env={"TOKEN": sy.secret("FLEET_TOKEN")}, **OPTS))]"""
    shipyarder.makepipelines(_pipelines(fleet, five[:2], body))
    result = shipyarder.run("deploy", "app", "1.0", "-e", "prod", env={"FLEET_TOKEN": value})
    assert result.exit_code == 1
    assert "token: ***" in result.output
    assert "env:***" in result.output
    assert value not in result.output
    logs = shipyarder.run("logs", str(result.deployment["id"]))
    assert "token: ***" in logs.output
    assert value not in logs.output
    for path in shipyarder.history_path.parent.iterdir():
        assert value.encode() not in path.read_bytes(), path
