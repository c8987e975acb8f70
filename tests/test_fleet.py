"""Deploying to a fleet over SSH (#16), against the real sshd fleet of tests/sshd_fleet.py."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import textwrap
import threading
import time
from pathlib import Path

import pytest
from browser import browser_fixture  # noqa: F401  # the fixtures `browser`, `page`, `screenshot`
from browser import page_fixture  # noqa: F401
from browser import screenshot_fixture  # noqa: F401
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
            ssh("cat", "app.py", cwd=f"releases/{d.version}", hosts=WEB, **OPTS),
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
        assert f"{label} | print('hello from the app')" in result.output  # cwd= applies
        # No empty line per stream at each command's end: only what the host printed.
        assert not re.search(rf"{re.escape(label)} \|\s*$", result.output, re.MULTILINE)
    assert "batch 3/3" in result.output

    second = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert second.exit_code == 0, second.output
    assert all(os.readlink(h.current) == "releases/2.0" for h in five)
    # Every host's outcome is in the history, per step.
    arts = _artifacts(shipyarder, second.deployment["id"])
    switch = arts[max(arts)]
    assert switch["kind"] == "ssh.symlink_switch"
    assert switch["status"] == "succeeded"
    hosts = switch["hosts"]
    assert sorted(hosts) == sorted(f"{h.address}:{h.port}" for h in five)
    assert {r["status"] for r in hosts.values()} == {"succeeded"}
    assert {(r["version"], r["previous_version"]) for r in hosts.values()} == {("2.0", "1.0")}
    for r in hosts.values():
        (attempt,) = r["attempts"]
        assert attempt["action"] == "apply"
        assert attempt["attempt"] == 1
        assert attempt["exit_code"] == 0
        assert attempt["started_at"] <= attempt["finished_at"]
    assert [b["hosts"] for b in switch["batches"]] == [
        [f"{h.address}:{h.port}" for h in five[i : i + 2]] for i in (0, 2, 4)
    ]


def test_each_host_action_is_a_span_of_its_step(shipyarder, fleet: Fleet, five):
    """With tracing on, every host a fleet step touched is a span under the step's (#19)."""
    from otlp_receiver import OTLPReceiver

    three = five[:3]
    for h in three[:2]:
        (h.home / "ready").write_text("")
    body = """[sy.stage("check",
        ssh("test", "-e", "ready", hosts=WEB, max_failures=1, **OPTS),
        ssh("sh", "-c", "test -e ready || exit 7", hosts=WEB, max_failures=1, retries=1,
            name="retried", **OPTS))]"""
    shipyarder.makepipelines(_pipelines(fleet, three, body))
    receiver = OTLPReceiver()
    try:
        env = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "fleet-trace",
               "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None, "TRACEPARENT": None}  # fmt: skip
        events = shipyarder.path / "events.jsonl"
        result = shipyarder.run(
            "deploy", "app", "1.0", "-e", "prod", "--notify", f"jsonl:{events}", env=env
        )
        spans = receiver.of_service("fleet-trace")
    finally:
        receiver.close()
    assert result.exit_code == 0, result.output  # one failed host is within max_failures
    # Host events reach plugins (the spans below), never notification sinks.
    sent = [json.loads(line)["event"] for line in events.read_text().splitlines()]
    assert "step_finished" in sent
    assert not [e for e in sent if e.startswith("host")]
    labels = [f"{h.address}:{h.port}" for h in three]
    (step,) = [s for s in spans if s.name == "step ssh test -e ready"]
    hosts = sorted((s for s in spans if s.parent_span_id == step.span_id), key=lambda s: s.name)
    assert [s.name for s in hosts] == sorted(f"host {label}" for label in labels)
    for span in hosts:
        address, port = span.attributes["server.address"], span.attributes["server.port"]
        assert span.name == f"host {address}:{port}"
        assert span.attributes["shipyard.region"] == "eu"
        assert span.attributes["shipyard.host.group"] == "web"
        assert span.attributes["shipyard.host.action"] == "apply"
        assert step.start_ns <= span.start_ns < span.end_ns <= step.end_ns
    by_host = {s.attributes["shipyard.host"]: s for s in hosts}
    assert [by_host[label].attributes["shipyard.status"] for label in labels] == [
        "succeeded", "succeeded", "failed",
    ]  # fmt: skip
    failed = by_host[labels[2]]
    assert (failed.status_code, failed.attributes["shipyard.exit_code"]) == (2, 1)
    assert "exited with 1" in failed.attributes["shipyard.error"]
    # A step with retries=: the hosts are under the attempt they ran in.
    (retried,) = [s for s in spans if s.name == "step retried"]
    (attempt,) = [s for s in spans if s.parent_span_id == retried.span_id]
    assert attempt.name == "attempt 1"  # within max_failures: one attempt was enough
    under = [s for s in spans if s.parent_span_id == attempt.span_id]
    assert sorted(s.attributes["shipyard.host"] for s in under) == sorted(labels)
    assert {s.attributes["shipyard.attempt"] for s in under} == {1}
    assert [s.attributes.get("shipyard.exit_code") for s in under if s.status_code == 2] == [7]


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
        k: v["status"]
        for k, v in _artifacts(shipyarder, result.deployment["id"])[0]["hosts"].items()
    }
    label = [f"{h.address}:{h.port}" for h in five]
    assert statuses == {
        label[0]: "rolled back", label[1]: "rolled back", label[2]: "rolled back",
        label[3]: "failed", label[4]: "not touched",
    }  # fmt: skip
    # show --json: the host x step matrix; show prints it as a table, a row per host.
    dep = str(result.deployment["id"])
    matrix = shipyarder.run("show", dep, "--json").json()["hosts"]
    assert [(m["stage"], m["host"], m["status"]) for m in matrix] == [
        ("switch", label[i], statuses[label[i]]) for i in range(5)
    ]
    failed = matrix[3]
    assert (failed["version"], failed["attempts"][-1]["action"]) == ("1.0", "apply")  # it stayed
    assert "release folder" in (failed["error"] or "")
    table = [ln.split() for ln in shipyarder.run("show", dep).output.splitlines()]
    rows = {r[0]: " ".join(r[1:]) for r in table if r and r[0] in label}
    assert rows == {label[0]: "rolled back", label[1]: "rolled back", label[2]: "rolled back",
                    label[3]: "failed", label[4]: "not touched"}  # fmt: skip

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


def _label(h: Host) -> str:
    return f"{h.address}:{h.port}"


def _at(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text).timestamp()


def _release(hosts: list[Host], version: str, healthy: bool = True) -> None:
    for h in hosts:
        folder = h.releases / version
        folder.mkdir()
        if healthy:
            (folder / "healthy").write_text(f"ok {version}\n")


def test_health_check_per_host_and_bake_between_batches(shipyarder, fleet: Fleet, five):
    from sshd_fleet import health_servers

    _release(five, "1.0")
    _release(five[:2] + five[3:], "2.0")
    _release(five[2:3], "2.0", healthy=False)  # the third host's 2.0 does not answer /health
    with health_servers(five) as port:
        body = f"""[sy.stage("switch", ssh.symlink_switch(hosts=WEB, batch=2, bake=1,
            health_check=sy.health_check("http://{{host}}:{port}/health", timeout=2),
            rollback="auto", **OPTS))]"""
        shipyarder.makepipelines(_pipelines(fleet, five, body))
        first = shipyarder.run("deploy", "app", "1.0", "-e", "prod")
        assert first.exit_code == 0, first.output
        second = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert second.exit_code == 1, second.output
    bad = _label(five[2])
    assert f"{bad} | UNHEALTHY" not in second.output  # it failed its check right after its switch
    assert f"{bad} | FAILED: " in second.output
    assert "503" in second.output
    for h in five:  # the first four hosts were switched; all are back, the fifth never touched
        assert os.readlink(h.current) == "releases/1.0", h.name

    art = _artifacts(shipyarder, second.deployment["id"])[0]
    assert art["status"] == "failed"
    assert "rollout stopped" in art["error"]
    hosts = art["hosts"]
    assert {k: v["status"] for k, v in hosts.items()} == {
        _label(five[0]): "rolled back", _label(five[1]): "rolled back",
        _label(five[2]): "rolled back", _label(five[3]): "rolled back",
        _label(five[4]): "not touched",
    }  # fmt: skip
    assert {v["version"] for k, v in hosts.items() if k != _label(five[4])} == {"1.0"}
    # The first batch was checked again after the bake: apply, check, revert.
    assert [a["action"] for a in hosts[_label(five[0])]["attempts"]] == [
        "apply", "check", "revert",
    ]  # fmt: skip
    assert hosts[_label(five[2])]["attempts"][0]["status"] == "failed"
    # The bake shows in the times: batch 2 started at least 1s after batch 1 ended.
    b1, b2 = art["batches"]
    assert b1["hosts"] == [_label(h) for h in five[:2]]
    assert b2["batch"] == 2
    assert _at(b2["started_at"]) - _at(b1["finished_at"]) >= 1.0
    for h in five[2:4]:
        started = _at(hosts[_label(h)]["attempts"][0]["started_at"])
        assert started >= _at(b1["finished_at"]) + 1.0
        assert all(_at(hosts[_label(g)]["attempts"][0]["finished_at"]) < started for g in five[:2])


_WAVES = """
import shipyard as sy

ssh = sy.ssh
REGIONS = {regions!r}
GROUPS = [sy.hosts(r, specs, region=r) for r, specs in REGIONS.items()]
OPTS = dict(known_hosts={known_hosts!r}, client_keys=[{client_key!r}], keepalive=1)


def score():
    from pathlib import Path

    return float((Path(__file__).parent / "score").read_text())


CHECK = sy.analysis(sy.metric("score", sy.python_metric(score), success=sy.above(0), count=1))


@sy.pipeline()
def app(d):
    return [sy.stage("release", sy.waves(
        list(REGIONS),
        ssh("sh", "-c", "echo deployed > marker-$DEPLOYMENT_VERSION", hosts=GROUPS, **OPTS),
        ssh.symlink_switch(hosts=GROUPS, batch="50%", **OPTS),
        bake=0.2, check=CHECK))]
"""


def _waves_project(shipyarder, fleet: Fleet) -> dict[str, list[Host]]:
    regions = fleet.regions()
    for hosts in regions.values():
        for h in hosts:
            h.reset()
            for marker in h.home.glob("marker-*"):
                marker.unlink()
    shipyarder.makepipelines(
        _WAVES.format(
            regions={r: [h.spec for h in hs] for r, hs in regions.items()},
            known_hosts=str(fleet.known_hosts),
            client_key=str(fleet.client_key),
        )
    )
    shipyarder.makefile("score", "1\n")
    return regions


def test_waves_failure_in_the_last_region_rolls_back_the_first_two(shipyarder, fleet: Fleet):
    regions = _waves_project(shipyarder, fleet)
    everyone = fleet.hosts
    plan = shipyarder.run("plan", "app", "1.0", "-e", "prod")
    assert plan.exit_code == 0, plan.output
    assert "wave 1: region canary: " + _label(everyone[0]) in plan.output
    # list names the hosts of a waves step too, region by region, in wave order.
    (row,) = shipyarder.run("list", "--json").json()
    assert [t.split(" (region ")[1].split(")")[0] for t in row["targets"]] == [
        "canary", "eu", "us",
    ]  # fmt: skip
    _release(everyone, "1.0")
    first = shipyarder.run("deploy", "app", "1.0", "-e", "prod")
    assert first.exit_code == 0, first.output
    assert all(os.readlink(h.current) == "releases/1.0" for h in everyone)
    assert first.output.index("wave 1/3: region canary") < first.output.index(
        "wave 2/3: region eu"
    ) < first.output.index("wave 3/3: region us")  # fmt: skip

    bad = regions["us"][-1]
    _release([h for h in everyone if h is not bad], "2.0")
    result = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert result.exit_code == 1, result.output
    assert "wave 'us' failed" in result.output
    assert "release folder releases/2.0 does not exist" in result.output
    assert "rolled back waves: us, eu, canary" in result.output
    for h in everyone:
        assert os.readlink(h.current) == "releases/1.0", h.name
        assert (h.home / "marker-2.0").exists()  # every wave ran it; it cannot be undone

    art = _artifacts(shipyarder, result.deployment["id"])[0]
    assert art["kind"] == "ssh.waves"
    assert art["failed_region"] == "us"
    assert "wave 'us' failed" in art["error"]
    assert _label(bad) in art["error"]
    assert [(w["region"], w["status"], w["rolled_back"]) for w in art["waves"]] == [
        ("canary", "rolled back", True), ("eu", "rolled back", True), ("us", "failed", True),
    ]  # fmt: skip
    assert [w.get("check") for w in art["waves"]] == ["passed", "passed", None]
    hosts = art["hosts"]
    assert hosts[_label(bad)]["status"] == "failed"
    assert hosts[_label(bad)]["version"] == "1.0"
    for h in everyone:
        if h is not bad:
            assert hosts[_label(h)]["status"] == "rolled back", h.name
            assert hosts[_label(h)]["version"] == "1.0"

    def reverted(h: Host) -> float:
        (run,) = [a for a in hosts[_label(h)]["attempts"] if a["action"] == "revert"]
        assert run["status"] == "succeeded"
        return _at(run["started_at"])

    # Latest wave first: us, then eu, then canary.
    assert max(reverted(h) for h in regions["us"][:-1]) <= min(
        reverted(h) for h in regions["eu"]
    )  # fmt: skip
    assert max(reverted(h) for h in regions["eu"]) <= reverted(regions["canary"][0])


def test_a_failing_check_between_waves_stops_and_rolls_back(shipyarder, fleet: Fleet):
    regions = _waves_project(shipyarder, fleet)
    _release(fleet.hosts, "1.0")
    assert shipyarder.run("deploy", "app", "1.0", "-e", "prod").exit_code == 0
    _release(fleet.hosts, "2.0")
    shipyarder.makefile("score", "0\n")  # the analysis after the canary wave fails
    result = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert result.exit_code == 1, result.output
    assert "wave 'canary' failed: check 'analysis' failed: analysis failed" in result.output
    assert all(os.readlink(h.current) == "releases/1.0" for h in fleet.hosts)
    assert (regions["canary"][0].home / "marker-2.0").exists()
    assert not (regions["eu"][0].home / "marker-2.0").exists()  # eu was never touched
    art = _artifacts(shipyarder, result.deployment["id"])[0]
    assert art["failed_region"] == "canary"
    assert [w["status"] for w in art["waves"]] == ["failed", "not started", "not started"]
    assert art["hosts"][_label(regions["eu"][0])]["status"] == "not touched"


def test_rollback_restores_each_hosts_own_previous_version(shipyarder, fleet: Fleet, five):
    body = """[sy.stage("switch", ssh.symlink_switch(hosts=WEB, max_failures=1, **OPTS))]"""
    shipyarder.makepipelines(_pipelines(fleet, five, body))
    _release(five, "1.0")
    _release(five, "3.0")
    lagging = five[3]
    _release([h for h in five if h is not lagging], "2.0")
    assert shipyarder.run("deploy", "app", "1.0", "-e", "prod").exit_code == 0
    second = shipyarder.run("deploy", "app", "2.0", "-e", "prod")
    assert second.exit_code == 0, second.output  # one failed host is within max_failures
    assert os.readlink(lagging.current) == "releases/1.0"
    art = _artifacts(shipyarder, second.deployment["id"])[0]
    assert art["hosts"][_label(lagging)]["version"] == "1.0"
    assert art["hosts"][_label(five[0])]["version"] == "2.0"
    assert shipyarder.run("deploy", "app", "3.0", "-e", "prod").exit_code == 0
    assert all(os.readlink(h.current) == "releases/3.0" for h in five)

    back = shipyarder.run("rollback", "app", "-e", "prod")
    assert back.exit_code == 0, back.output
    for h in five:  # each host as deployment 2.0 left it: the lagging one on 1.0
        want = "releases/1.0" if h is lagging else "releases/2.0"
        assert os.readlink(h.current) == want, h.name
    art = _artifacts(shipyarder, back.deployment["id"])[0]
    assert {k: v["version"] for k, v in art["hosts"].items()} == {
        _label(h): "1.0" if h is lagging else "2.0" for h in five
    }
    assert {v["previous_version"] for v in art["hosts"].values()} == {"3.0"}


def test_env_values_never_reach_a_remote_command_line(shipyarder, fleet: Fleet, five):
    value = "s3cr3t-cmdline-token-5521"
    host = five[0]
    body = """[sy.stage("run", ssh("sleep", "600", hosts=WEB, **OPTS,
                                   env={"TOKEN": sy.secret("FLEET_TOKEN"), "PLAIN": "a b 'c'"}))]"""
    shipyarder.makepipelines(_pipelines(fleet, [host], body))
    proc = shipyarder.popen("deploy", "app", "1.0", "-e", "prod", env={"FLEET_TOKEN": value})
    try:
        _wait_for(lambda: host.processes("sleep"), "the remote sleep")
        (pid,) = host.processes("sleep")
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"TOKEN={value}".encode() in environ
        assert b"PLAIN=a b 'c'" in environ
        for p in host.processes("sleep") + host.sshd_pids():
            assert value.encode() not in Path(f"/proc/{p}/cmdline").read_bytes(), p
        assert b"DEPLOYMENT_VERSION=1.0" in environ
    finally:
        os.kill(proc.pid, signal.SIGINT)
        proc.communicate(timeout=60)
    _wait_for(lambda: not host.processes("sleep"), "no remote sleep", 10)


@pytest.mark.parametrize(
    ("regions", "options", "message"),
    [
        ('["canary", "eu"]', "", "has hosts in no wave: "),
        ('["canary", "eu", "us", "asia"]', "", "region 'asia' has no host in any step"),
        ('"canary"', "", "give the regions as a list of names"),
        ("list(REGIONS)", "check=42", "check= takes a step such as sy.analysis"),
        ("list(REGIONS)", "bake=-1", "bake= takes seconds >= 0"),
    ],
)
def test_bad_waves_are_definition_errors(
    shipyarder, fleet: Fleet, regions: str, options: str, message: str
):
    _waves_project(shipyarder, fleet)
    text = (shipyarder.path / "pipelines.py").read_text()
    text = text.replace("sy.waves(\n        list(REGIONS),", f"sy.waves(\n        {regions},")
    text = text.replace("bake=0.2, check=CHECK))]", f"{options}))]")
    shipyarder.makepipelines(text)
    result = shipyarder.run("plan", "app", "1.0", "-e", "prod")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


_INVENTORY_PIPELINES = """
import shipyard as sy

GROUPS = sy.inventory("inventory/hosts.{ext}")

@sy.pipeline()
def app(d):
    return [sy.stage("release",
                     sy.ssh("true", hosts="region:eu", name="eu"),
                     sy.ssh("true", hosts=[GROUPS["db"], "tag:canary"], name="db and canaries"))]
"""


@pytest.mark.parametrize("ext", ["toml", "yaml"])
def test_an_inventory_file_declares_groups_that_list_and_plan_show(shipyarder, ext):
    """Groups from a TOML or YAML inventory, addressed by group, region and tag (#16 item 1)."""
    toml = """
        [web]
        hosts = ["10.9.0.1", "deploy@10.9.0.2:2222"]
        region = "eu"
        tags = ["canary"]

        [db]
        hosts = ["10.9.1.1"]
        region = "us"
        user = "pg"
        port = 2200
    """
    yaml = """
        web:
          hosts: [10.9.0.1, "deploy@10.9.0.2:2222"]
          region: eu
          tags: [canary]
        db:
          hosts: [10.9.1.1]
          region: us
          user: pg
          port: 2200
    """
    (shipyarder.path / "inventory").mkdir()
    shipyarder.makefile(f"inventory/hosts.{ext}", textwrap.dedent(toml if ext == "toml" else yaml))
    shipyarder.makepipelines(_INVENTORY_PIPELINES.replace("{ext}", ext))
    listed = shipyarder.run("list")
    assert listed.exit_code == 0, listed.output
    assert "    hosts web (region eu): 10.9.0.1, 10.9.0.2:2222\n" in listed.output
    assert "    hosts db (region us): 10.9.1.1:2200\n" in listed.output
    (row,) = shipyarder.run("list", "--json").json()
    assert row["targets"] == [
        "web (region eu): 10.9.0.1, 10.9.0.2:2222", "db (region us): 10.9.1.1:2200",
    ]  # fmt: skip
    plan = shipyarder.run("plan", "app", "1.0", "-e", "prod")
    assert plan.exit_code == 0, plan.output
    # The second step: the db group, then the canary-tagged hosts, each once, in that order.
    assert "(on 3 host(s): 10.9.1.1:2200, 10.9.0.1, 10.9.0.2:2222" in plan.output


def test_groups_of_a_file_loaded_earlier_in_the_process_are_forgotten(shipyarder):
    """``"tag:..."`` selects only from the pipelines file loaded now (in-process runs)."""
    old = """
import shipyard as sy
OLD = sy.hosts("old", ["10.8.0.1"], tags=["canary"])

@sy.pipeline()
def app(d):
    return [sy.stage("release", sy.ssh("true", hosts="tag:canary"))]
"""
    shipyarder.makepipelines(old)
    assert "(on 1 host(s): 10.8.0.1" in shipyarder.run("plan", "app", "1", "-e", "x").output
    shipyarder.makepipelines(old.replace('"old", ["10.8.0.1"]', '"new", ["10.8.0.2"]'))
    plan = shipyarder.run("plan", "app", "1", "-e", "x")
    assert plan.exit_code == 0, plan.output
    assert "(on 1 host(s): 10.8.0.2" in plan.output  # not 10.8.0.1 as well


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (None, "cannot read it"),
        ("[web\n", "not valid TOML"),
        ("web = 3\n", "group 'web' must be a table with hosts = [...]"),
        ('[web]\nhost = ["a"]\n', "group 'web': unknown key(s) host; a group takes hosts,"),
        ('[web]\nhosts = "a"\n', "hosts 'web': give a list of addresses, not one string"),
        ('[web]\nhosts = ["a"]\nport = 0\n', "hosts 'web': port must be 1-65535, not 0"),
        ('[web]\nhosts = ["a"]\ntags = "x"\n', "hosts 'web': tags must be a list of names"),
        ('[web]\nhosts = ["a:port"]\n', "bad address 'a:port'"),
        ("", "expected a table of host groups"),
    ],
)
def test_a_bad_inventory_is_a_definition_error_naming_the_file(shipyarder, text, message):
    if text is not None:
        shipyarder.makefile("inventory/hosts.toml", text)
    shipyarder.makepipelines(_INVENTORY_PIPELINES.replace("{ext}", "toml"))
    result = shipyarder.run("list")
    assert result.exit_code == 2, result.output
    assert f"inventory {shipyarder.path / 'inventory' / 'hosts.toml'}: " in result.output
    assert message in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ('sy.hosts("web", ["10.0.0.1"], port=70000)', "hosts 'web': port must be 1-65535"),
        ('sy.hosts("web", ["10.0.0.1"], tags="canary")', "hosts 'web': tags must be a list"),
        ('sy.hosts("web", [10])', "hosts 'web': hosts must be a list of addresses"),
        ('sy.hosts("web", ["10.0.0.1"], region=1)', "hosts 'web': region must be a string"),
    ],
)
def test_bad_host_groups_are_definition_errors(shipyarder, call, message):
    """The checks an inventory file gets are those of sy.hosts: one place for both."""
    shipyarder.makepipelines(f"import shipyard as sy\nWEB = {call}\n")
    result = shipyarder.run("list")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_the_dashboard_draws_the_host_matrix_of_a_fleet_deployment(
    shipyarder, fleet: Fleet, five, page, screenshot
):
    from test_serve import start

    shipyarder.makefile("app.py", "v\n")
    shipyarder.makepipelines(_pipelines(fleet, five, _RELEASE))
    # In processes of their own: the browser's event loop runs in this thread.
    result = shipyarder.spawn("deploy", "app", "1.0", "-e", "prod")
    assert result.exit_code == 0, result
    matrix = json.loads(shipyarder.spawn("show", "1", "--json").stdout)["hosts"]
    server = start(shipyarder)  # stopped at teardown with every process of the test
    page.goto(server.url + "/deployments/1")
    page.wait_for_selector("#hosts tr[data-host]", timeout=20_000)
    labels = [f"{h.address}:{h.port}" for h in five]
    rows = page.query_selector_all("#hosts tr[data-host]")
    assert [r.get_attribute("data-host") for r in rows] == labels
    steps = [m["step"] for m in matrix if m["host"] == labels[0]]
    assert len(steps) == 5  # mkdir, upload, cat, sh, switch
    for m in matrix:
        cell = page.query_selector(
            f"#hosts tr[data-host='{m['host']}'] td[data-step='{m['step']}']"
        )
        assert cell is not None, m
        assert cell.text_content().startswith(m["status"])
    last = page.text_content(f"#hosts tr[data-host='{labels[0]}'] td[data-step='{steps[-1]}']")
    assert last == "succeeded exit 0, version 1.0"
    screenshot(page, "hosts")
    assert not page.errors
