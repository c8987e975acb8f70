"""``shipyard serve`` (issue 18): a real server process on 127.0.0.1, real HTTP, a real SQLite
file, and real Chromium pages (tests/browser.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from browser import browser_fixture  # noqa: F401  # the fixtures `browser`, `page`, `screenshot`
from browser import page_fixture  # noqa: F401
from browser import screenshot_fixture  # noqa: F401
from polling import wait_for
from tcp_relay import Relay

PIPELINES = """
import os

import shipyard as sy

SLOW = "for i in $(seq 1 ${LINES:-3}); do echo line $i; sleep ${PAUSE:-0.05}; done"


@sy.pipeline(environments=["staging", "production"], rollback="manual")
def web(d):
    return [
        sy.stage("build", sy.command("sh", "-c", SLOW, name="build")),
        sy.stage("release", sy.command("sh", "-c", "test \\"$FAIL\\" != 1", name="release")),
    ]


@sy.pipeline(environments=["staging"])
def gated(d):
    return [
        sy.stage("approve", sy.approval(timeout="1h")),
        sy.stage("release", sy.command("echo", "released", d.version, name="release")),
    ]


FLAKY = "test -e tried && exit 0; touch tried; echo flaky >&2; exit 3"


@sy.pipeline(environments=["staging"])
def checked(d):
    return [
        sy.stage("build", sy.command("sh", "-c", FLAKY, name="flaky", retries=2)),
        sy.stage("verify", sy.analysis(
            sy.metric("errors", sy.python_metric(lambda: 0.01), success=sy.below(0.05), count=3,
                      interval=0.05),
            sy.metric("watch", sy.python_metric(lambda: 99.0), failure=sy.above(1), dry_run=True),
        )),
    ]


@sy.pipeline(environments=["staging"])
def evil(d):
    return [sy.stage("print", sy.command(
        "sh", "-c", "echo '<img src=x onerror=alert(1)>'; echo token=$TOKEN",
        env={"TOKEN": sy.secret("DEPLOY_TOKEN")}, name="print"))]
"""


class Server:
    """A ``shipyard serve`` process and its URL."""

    def __init__(self, proc: subprocess.Popen[bytes], url: str, lines: list[str]) -> None:
        self.proc = proc
        self.url = url
        self.lines = lines
        self.port = int(url.rsplit(":", 1)[1].strip("/"))

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10, **kwargs)

    def post(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.post(self.url + path, timeout=30, **kwargs)

    @property
    def token(self) -> str:
        line = next(x for x in self.lines if ": token for " in x)
        return line.rsplit(": ", 1)[1]


def start(shipyarder: Any, *args: str, env: dict[str, str] | None = None) -> Server:
    proc = shipyarder.popen("serve", "--port", "0", *args, env=env)
    lines = []
    while True:
        raw = proc.stdout.readline()
        if not raw:
            proc.wait(10)
            pytest.fail(f"serve did not start: {proc.stderr.read().decode()}")
        line = raw.decode().rstrip("\n")
        lines.append(line)
        if line.startswith("shipyard serve: http://"):
            break
    if "--allow-actions" in args and "--token-file" not in args:
        lines.append(proc.stdout.readline().decode().rstrip("\n"))
    url = line.split()[2].rstrip("/")
    return Server(proc, url, lines)


@pytest.fixture
def project(shipyarder: Any) -> Any:
    shipyarder.makepipelines(PIPELINES)
    return shipyarder


def deploy(project: Any, version: str, env: str = "staging", *extra: str, **environ: str) -> Any:
    result = project.spawn("deploy", "web", version, "-e", env, *extra, env=environ)
    return result


def running_one(server: Server) -> bool:
    return any(c["active"] for c in server.get("/api/overview").json()["cells"])


def cli_json(project: Any, *args: str) -> Any:
    result = project.run(*args, "--json")
    assert result.exit_code == 0, result
    return json.loads(result.stdout)


# -- the command ---------------------------------------------------------------------------------


def test_a_host_that_is_not_loopback_needs_allow_remote(project: Any) -> None:
    result = project.run("serve", "--host", "0.0.0.0", "--port", "0")
    assert result.exit_code == 2, result
    assert "--host 0.0.0.0 is not the loopback interface" in result.stderr
    assert "--allow-remote" in result.stderr


def test_port_0_listens_on_127_0_0_1_only_and_prints_its_url(project: Any) -> None:
    server = start(project)
    assert server.url.startswith("http://127.0.0.1:")
    assert server.get("/api/overview").status_code == 200
    with pytest.raises(OSError):  # another loopback address of the same machine: nobody there
        socket.create_connection(("127.0.0.2", server.port), timeout=2).close()


def test_a_token_file_readable_by_others_is_refused(project: Any) -> None:
    tokens = project.makefile("tokens", "alice " + "a" * 24 + "\n")
    os.chmod(tokens, 0o644)
    result = project.run("serve", "--port", "0", "--allow-actions", "--token-file", str(tokens))
    assert result.exit_code == 2, result
    assert "chmod 600" in result.stderr


# -- reading -------------------------------------------------------------------------------------


def test_read_only_api_equals_the_cli_documents_and_writes_nothing(project: Any) -> None:
    assert deploy(project, "1.0").exit_code == 0
    assert deploy(project, "1.1", FAIL="1").exit_code == 1  # newer, failed
    assert deploy(project, "2.0", "production").exit_code == 0
    db = Path(project.history_path)
    before = db.read_bytes()
    server = start(project)

    overview = server.get("/api/overview").json()
    assert overview["actions"] is False
    cells = {(c["pipeline"], c["environment"]): c for c in overview["cells"]}
    for (pipeline, env), cell in cells.items():
        last = cli_json(project, "history", "--pipeline", pipeline, "--env", env, "-n", "1")
        ok = cli_json(project, "history", "--pipeline", pipeline, "--env", env, "-n", "1",
                      "--status", "succeeded")  # fmt: skip
        # With --pipeline and --env, history also says which one is current: the cell says it by
        # where it puts it.
        assert cell["last"] == (
            {k: v for k, v in last[0].items() if k != "current"} if last else None
        )
        assert cell["current"] == (
            {k: v for k, v in ok[0].items() if k != "current"} if ok else None
        )
        assert not ok or ok[0].get("current", True)
    assert cells[("web", "staging")]["current"]["version"] == "1.0"  # not the failed 1.1
    assert cells[("web", "staging")]["last"]["version"] == "1.1"

    assert server.get("/api/history").json()["deployments"] == cli_json(project, "history")
    failed = server.get("/api/history", params={"status": "failed"}).json()["deployments"]
    assert failed == cli_json(project, "history", "--status", "failed")
    assert [d["version"] for d in failed] == ["1.1"]
    for dep_id in (1, 2, 3):
        assert server.get(f"/api/deployments/{dep_id}").json() == cli_json(
            project, "show", str(dep_id)
        )
    assert server.get("/api/deployments/99").status_code == 404

    for path in ("/api/deployments/2/retry", "/api/deployments/1/rollback", "/api/session",
                 "/api/overview"):  # fmt: skip
        refused = server.post(path, json={}, headers={"Origin": server.url})
        assert refused.status_code in (403, 405), (path, refused.text)
        assert "read-only" in refused.json()["error"]
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(10) in (0, -signal.SIGTERM)  # uvicorn ends by the signal it got
    assert db.read_bytes() == before
    assert project.run("history").exit_code == 0
    assert len(cli_json(project, "history")) == 3  # nothing was retried or rolled back


def test_postgresql_store_is_read_the_same_way_and_streams_live(
    pg: Any, project: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ``pg`` first: the project fixture clears every SHIPYARD_* variable, also the one naming
    # the run's cluster.
    import uuid

    schema = f"serve_{uuid.uuid4().hex[:12]}"
    pg.psql(f"CREATE SCHEMA {schema} AUTHORIZATION shipyard")
    monkeypatch.setenv("SHIPYARD_HISTORY", pg.url(schema=schema))
    assert deploy(project, "1.0").exit_code == 0
    assert deploy(project, "1.1", FAIL="1").exit_code == 1
    server = start(project)
    cell = next(c for c in server.get("/api/overview").json()["cells"]
                if (c["pipeline"], c["environment"]) == ("web", "staging"))  # fmt: skip
    assert cell["current"]["version"] == "1.0"
    assert cell["last"]["version"] == "1.1"
    assert server.get("/api/history").json()["deployments"] == cli_json(project, "history")
    assert server.get("/api/deployments/2").json() == cli_json(project, "show", "2")
    running = project.popen("deploy", "web", "2.0", "-e", "staging",
                            env={"LINES": "10", "PAUSE": "0.1"})  # fmt: skip
    wait_for(lambda: running_one(server), 30, "a running deployment")
    with httpx.stream("GET", server.url + "/api/deployments/3/events", timeout=30) as r:
        events = _sse(r)
    assert running.wait(30) == 0
    lines = [json.loads(e["data"])["line"] for e in events if e.get("event") == "log"]
    assert lines == [x["line"] for x in server.get("/api/deployments/3/logs").json()]
    assert [f"line {i}" for i in range(1, 11)] == [ln for ln in lines if ln.startswith("line ")]
    assert events[-1]["event"] == "end"
    wait_for(lambda: server.get("/api/deployments/3").json()["status"] == "succeeded", 10,
             "the dashboard to see the end")  # fmt: skip
    assert len(assert_metrics_count_the_history(server, project)) == 3


def test_five_deploys_while_pages_stream_and_no_database_is_locked(project: Any) -> None:
    server = start(project)
    assert deploy(project, "0.1").exit_code == 0
    streams = []
    for _ in range(3):
        client = httpx.Client(timeout=30)
        cm = client.stream("GET", server.url + "/api/deployments/1/events?after=0")
        streams.append((client, cm, cm.__enter__()))
    try:
        procs = [project.popen("deploy", "web", f"1.{i}", "-e", env, "--wait-lock", "60",
                               env={"LINES": "20", "PAUSE": "0.01"})
                 for i, env in enumerate(["staging", "production", "staging", "production",
                                          "staging"])]  # fmt: skip
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err.decode()
            assert b"database is locked" not in out + err
        for _ in range(20):
            server.get("/api/overview")
        assert len(cli_json(project, "history")) == 6
    finally:
        for client, cm, _ in streams:
            cm.__exit__(None, None, None)
            client.close()
    server.proc.send_signal(signal.SIGTERM)
    _, err = server.proc.communicate(timeout=10)
    assert b"database is locked" not in err
    assert b"Traceback" not in err


def metrics_of(server: Server) -> dict[str, Any]:
    """``/metrics``, parsed by Prometheus' own client library: the families by name."""
    from prometheus_client.parser import text_string_to_metric_families

    response = server.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(response.text)}
    assert "shipyard_deployments" in families, response.text
    return families


def assert_metrics_count_the_history(server: Server, project: Any) -> list[dict[str, Any]]:
    """``shipyard_deployments`` and the duration histogram say what ``history --json`` says."""
    from collections import Counter

    from shipyard.contrib.serve._app import DURATION_BUCKETS
    from shipyard.contrib.serve._app import FINISHED
    from shipyard.contrib.serve._app import STATUSES
    from shipyard.sdk import parse_ts

    history = cli_json(project, "history", "-n", "1000")
    families = metrics_of(server)
    counted = {(s.labels["pipeline"], s.labels["environment"], s.labels["status"]): s.value
               for s in families["shipyard_deployments"].samples}  # fmt: skip
    pairs = {(d["pipeline"], d["environment"]) for d in history}
    expected = Counter((d["pipeline"], d["environment"], d["status"]) for d in history)
    # Every status of every pair deployed, zeros included (a series does not vanish).
    assert {k: v for k, v in counted.items() if k[:2] in pairs} == {
        (p, e, s): float(expected[(p, e, s)]) for p, e in pairs for s in STATUSES
    }
    assert sum(counted.values()) == len(history)
    samples = families["shipyard_deployment_duration_seconds"].samples
    assert families["shipyard_deployment_duration_seconds"].type == "histogram"
    for p, e in pairs:
        for status in sorted(FINISHED):
            took = [parse_ts(d["finished_at"]) - parse_ts(d["started_at"]) for d in history
                    if (d["pipeline"], d["environment"], d["status"]) == (p, e, status)
                    and d["started_at"] and d["finished_at"]]  # fmt: skip
            mine = [x for x in samples if (x.labels["pipeline"], x.labels["environment"],
                    x.labels["status"]) == (p, e, status)]  # fmt: skip
            by = {(x.name, x.labels.get("le")): x.value for x in mine}
            assert by[("shipyard_deployment_duration_seconds_count", None)] == len(took)
            assert by[("shipyard_deployment_duration_seconds_sum", None)] == pytest.approx(
                sum(took), abs=0.002 * len(took) + 1e-9
            )
            assert by[("shipyard_deployment_duration_seconds_bucket", "+Inf")] == len(took)
            for bound in DURATION_BUCKETS:
                le = by[("shipyard_deployment_duration_seconds_bucket", str(float(bound)))]
                assert le == sum(1 for t in took if t <= bound), (p, e, status, bound)
    return history


def test_metrics_are_in_the_prometheus_text_format(project: Any) -> None:
    assert deploy(project, "1.0").exit_code == 0
    assert deploy(project, "1.1", FAIL="1").exit_code == 1
    assert deploy(project, "2.0", "production", LINES="15", PAUSE="0.1").exit_code == 0
    assert project.spawn("deploy", "gated", "1.0", "-e", "staging").exit_code == 4
    server = start(project)
    families = metrics_of(server)
    current = families["shipyard_current_version_info"].samples
    assert sorted((s.labels["pipeline"], s.labels["environment"], s.labels["version"])
                  for s in current) == [("web", "production", "2.0"), ("web", "staging", "1.0")]  # fmt: skip
    duration = next(s for s in families["shipyard_last_deployment_duration_seconds"].samples
                    if s.labels["environment"] == "production")  # fmt: skip
    doc = cli_json(project, "show", "3")
    from shipyard.sdk import parse_ts

    assert duration.value == pytest.approx(
        parse_ts(doc["finished_at"]) - parse_ts(doc["started_at"])
    )
    history = assert_metrics_count_the_history(server, project)
    assert len(history) == 4
    counted = {(s.labels["pipeline"], s.labels["environment"], s.labels["status"]): s.value
               for s in families["shipyard_deployments"].samples}  # fmt: skip
    assert counted[("gated", "staging", "awaiting_approval")] == 1
    assert counted[("web", "staging", "failed")] == 1
    # Declared but never deployed: counted as zeros.
    assert counted[("evil", "staging", "succeeded")] == 0
    buckets = {s.labels["le"]: s.value for s in families["shipyard_deployment_duration_seconds"]
               .samples if s.name.endswith("_bucket") and s.labels["environment"] == "production"
               and s.labels["status"] == "succeeded"}  # fmt: skip
    assert (buckets["1.0"], buckets["5.0"], buckets["+Inf"]) == (0, 1, 1)  # it took 1.5 s
    # A new deployment is counted at the next scrape (the counts are cached until the store
    # changes, and only then).
    assert deploy(project, "1.2").exit_code == 0
    wait_for(lambda: metrics_of(server)["shipyard_deployments"].samples
             and sum(x.value for x in metrics_of(server)["shipyard_deployments"].samples) == 5,
             20, "the fifth deployment counted")  # fmt: skip
    assert_metrics_count_the_history(server, project)


def _sse(response: httpx.Response) -> list[dict[str, str]]:
    events, current = [], {}
    for line in response.iter_lines():
        if not line:
            if current:
                events.append(current)
                if current.get("event") == "end":
                    return events
            current = {}
            continue
        if line.startswith(":"):
            continue
        key, _, value = line.partition(":")
        current[key] = value.removeprefix(" ")
    return events


def test_log_events_resume_after_last_event_id_without_gaps_or_duplicates(project: Any) -> None:
    assert deploy(project, "1.0", LINES="20", PAUSE="0").exit_code == 0
    server = start(project)
    logs = server.get("/api/deployments/1/logs").json()
    assert len(logs) >= 20
    ids = [r["id"] for r in logs]
    with httpx.stream("GET", server.url + "/api/deployments/1/events", timeout=10) as r:
        every = [e for e in _sse(r) if e.get("event") == "log"]
    assert [int(e["id"]) for e in every] == ids
    cut = ids[7]
    headers = {"Last-Event-ID": str(cut)}
    with httpx.stream("GET", server.url + "/api/deployments/1/events", headers=headers,
                      timeout=10) as r:  # fmt: skip
        rest = [e for e in _sse(r) if e.get("event") == "log"]
    assert [int(e["id"]) for e in rest] == ids[8:]
    assert [json.loads(e["data"])["line"] for e in rest] == [x["line"] for x in logs[8:]]


def test_a_line_reaches_the_stream_while_its_step_is_still_quiet(project: Any) -> None:
    # The step prints a line right after its stage's commit and then nothing for 20 s; the
    # heartbeat's tick (which also commits held lines) is made rare. The line must come from the
    # recorder's own timer, long before the step prints again or ends.
    server = start(project)
    running = project.popen("deploy", "web", "1.0", "-e", "staging",
                            env={"LINES": "2", "PAUSE": "20", "SHIPYARD_HEARTBEAT": "60"})  # fmt: skip
    wait_for(lambda: running_one(server), 30, "a running deployment")
    seen = None
    # No byte for 10 s is a read timeout: the line would otherwise come 20 s later.
    with httpx.stream("GET", server.url + "/api/deployments/1/events", timeout=10) as r:
        event: dict[str, str] = {}
        for line in r.iter_lines():
            if line:
                key, _, value = line.partition(":")
                event[key] = value.removeprefix(" ")
                continue
            if event.get("event") == "log" and json.loads(event["data"])["line"] == "line 1":
                seen = json.loads(event["data"])
                break
            event = {}
    assert seen is not None
    doc = server.get("/api/deployments/1").json()
    assert doc["status"] == "running"
    assert doc["stages"][0]["steps"][0]["status"] in ("pending", "running")  # still quiet
    running.send_signal(signal.SIGTERM)
    assert running.wait(30) != 0


# -- actions -------------------------------------------------------------------------------------


def test_actions_need_host_origin_and_token_then_cancel_as_the_token_user(project: Any) -> None:
    tokens = project.makefile("tokens", "alice " + "t" * 32 + "\n")
    os.chmod(tokens, 0o600)
    server = start(project, "--allow-actions", "--token-file", str(tokens))
    running = project.popen("deploy", "web", "1.0", "-e", "staging", env={"LINES": "600",
                                                                         "PAUSE": "0.1"})  # fmt: skip
    wait_for(lambda: running_one(server), 30, "a running deployment")
    good = {"Origin": server.url}
    path = "/api/deployments/1/cancel"
    assert server.post(path, json={}, headers=good).status_code == 401
    assert server.post(path, json={}, headers={"Origin": "http://evil.example"}).status_code == 403
    assert server.post(path, json={}, headers={**good, "Host": "evil.example"}).status_code == 400
    login = server.post("/api/session", json={"token": "wrong" * 8}, headers=good)
    assert login.status_code == 401
    login = server.post("/api/session", json={"token": "t" * 32}, headers=good)
    assert login.status_code == 200
    cookie = login.headers["set-cookie"]
    assert "HttpOnly" in cookie
    assert "SameSite=strict" in cookie.replace("Strict", "strict")
    # A cookie without the right Origin is still refused (CSRF).
    jar = login.cookies
    assert server.post(path, json={}, cookies=jar).status_code == 403
    done = server.post(path, json={"comment": "from the web"}, headers=good, cookies=jar)
    assert done.status_code == 200, done.text
    assert running.wait(30) != 0
    assert cli_json(project, "show", "1")["status"] == "cancelled"
    audit = server.get("/api/deployments/1/audit").json()
    assert (audit[0]["action"], audit[0]["user"]) == ("cancel", "alice"), audit


def test_approve_from_the_web_resumes_the_deployment_recorded_as_web_and_the_user(
    project: Any,
) -> None:
    waiting = project.spawn("deploy", "gated", "1.0", "-e", "staging")
    assert waiting.exit_code == 4, waiting
    tokens = project.makefile("tokens", "alice " + "a" * 32 + "\n")
    os.chmod(tokens, 0o600)
    server = start(project, "--allow-actions", "--token-file", str(tokens))
    inbox = server.get("/api/history", params={"status": "awaiting_approval"}).json()
    assert [d["id"] for d in inbox["deployments"]] == [1]
    headers = {"Authorization": "Bearer " + "a" * 32}
    answer = server.post("/api/deployments/1/approve", json={}, headers=headers)
    assert answer.status_code in (200, 202), answer.text
    assert "--detach" in answer.json()["command"]
    wait_for(lambda: server.get("/api/deployments/1").json()["status"] == "succeeded", 60,
             "the approved deployment to finish")  # fmt: skip
    doc = cli_json(project, "show", "1")
    decision = doc["gate"]["decisions"][-1]
    assert (decision["decision"], decision["user"], decision["source"]) == (
        "approve",
        "alice",
        "web",
    )
    assert "released 1.0" in project.run("logs", "1").stdout


def test_bearer_token_works_without_a_cookie(project: Any) -> None:
    server = start(project, "--allow-actions")
    assert server.token
    headers = {"Authorization": f"Bearer {server.token}"}
    answer = server.post("/api/deployments/1/retry", json={}, headers=headers)
    assert answer.status_code == 422  # the command ran, and said there is no deployment 1
    assert "no history" in answer.json()["output"]


# -- stopping ------------------------------------------------------------------------------------


def test_sigterm_with_three_open_streams_exits_within_3_s(project: Any) -> None:
    running = project.popen("deploy", "web", "1.0", "-e", "staging",
                            env={"LINES": "600", "PAUSE": "0.1"})  # fmt: skip
    server = start(project)
    wait_for(lambda: running_one(server), 30, "a running deployment")
    streams = []
    for _ in range(3):
        s = httpx.Client(timeout=10)
        cm = s.stream("GET", server.url + "/api/deployments/1/events")
        r = cm.__enter__()
        assert next(r.iter_lines()).startswith("retry:")
        streams.append((s, cm))
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    server.proc.wait(3)
    assert time.monotonic() - t0 < 3
    for s, r in streams:
        r.__exit__(None, None, None)
        s.close()
    running.send_signal(signal.SIGTERM)
    running.wait(30)


# -- in a real browser ---------------------------------------------------------------------------


def _log_lines(pg: Any) -> list[str]:
    return pg.eval_on_selector_all("#log .line .text", "els => els.map(e => e.textContent)")


def test_live_log_in_chromium_survives_a_cut_connection(project: Any, page: Any,
                                                        screenshot: Any) -> None:  # fmt: skip
    server = start(project)
    running = project.popen("deploy", "web", "1.0", "-e", "staging",
                            env={"LINES": "25", "PAUSE": "0.2"})  # fmt: skip
    wait_for(lambda: running_one(server), 30, "a running deployment")
    relay = Relay(server.port)
    try:
        page.goto(f"http://127.0.0.1:{relay.port}/deployments/1")
        page.wait_for_selector("#log .line", timeout=20_000)
        first = len(_log_lines(page))
        wait_for(lambda: len(_log_lines(page)) > first, 10, "the log to grow")
        relay.cut()  # the browser reconnects by itself, with Last-Event-ID
        wait_for(lambda: len(_log_lines(page)) > first + 3, 20, "the log to grow after the cut")
        assert running.wait(60) == 0
        page.wait_for_selector("#log[data-ended='1']", timeout=20_000)
        shown = _log_lines(page)
        expected = [r["line"] for r in server.get("/api/deployments/1/logs").json()]
        cli = [ln.split("] ", 1)[1] for ln in project.run("logs", "1").stdout.splitlines()]
        assert shown == expected == cli
        assert len(
            set(page.eval_on_selector_all("#log .line", "els => els.map(e => e.dataset.id)"))
        ) == len(shown)
        assert page.text_content("#status") == "succeeded"
        screenshot(page, "deployment")
    finally:
        relay.close()
    assert relay.cuts >= 1
    assert not page.errors


def test_pages_render_markup_in_logs_as_text_masked_and_without_buttons(
    project: Any, page: Any, screenshot: Any
) -> None:
    result = project.spawn("deploy", "evil", "1.0", "-e", "staging",
                           env={"DEPLOY_TOKEN": "s3cr3t-value-42"})  # fmt: skip
    assert result.exit_code == 0, result
    server = start(project)
    page.goto(server.url + "/deployments/1")
    page.wait_for_selector("#log[data-ended='1']", timeout=20_000)
    lines = _log_lines(page)
    assert "<img src=x onerror=alert(1)>" in lines
    assert "token=***" in lines
    assert page.query_selector("#log img") is None
    assert "s3cr3t-value-42" not in page.content()
    assert page.query_selector_all("#actions button") == []  # read-only: no buttons
    screenshot(page, "deployment")

    page.goto(server.url + "/")
    page.wait_for_selector("#main[data-ready='1']")
    cell = page.text_content("td[data-pipeline='evil'][data-environment='staging']")
    assert "1.0" in cell
    assert "succeeded" in cell
    assert page.query_selector_all("button") == []
    screenshot(page, "overview")

    page.goto(server.url + "/history?status=succeeded")
    page.wait_for_selector("#main[data-ready='1']")
    assert page.query_selector_all("#history tr[data-id]")
    assert page.text_content("#history").count("evil") == 1
    screenshot(page, "history")
    assert not page.errors


def _cells(pg: Any, selector: str) -> list[str]:
    return pg.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


def test_deployment_page_shows_attempts_retries_exit_codes_errors_and_analysis(
    project: Any, page: Any, screenshot: Any
) -> None:
    checked = project.spawn("deploy", "checked", "1.0", "-e", "staging",
                            env={"SHIPYARD_RETRY_BACKOFF": "0.01"})  # fmt: skip
    assert checked.exit_code == 0, checked
    assert deploy(project, "2.0", FAIL="1").exit_code == 1
    doc = cli_json(project, "show", "1")
    server = start(project)
    page.goto(server.url + "/deployments/1")
    page.wait_for_selector("#log[data-ended='1']", timeout=20_000)
    flaky = "#timeline tr[data-stage='0'][data-step='0']"
    assert (
        page.text_content(flaky + " td.attempts")
        == "2"
        == str(doc["stages"][0]["steps"][0]["attempts"])
    )
    retries = _cells(page, flaky + " td.retries .retry")
    assert len(retries) == 1
    assert retries[0].startswith("attempt 1 of 3 failed: sh exited with 3")
    assert retries[0] in [r["line"] for r in server.get("/api/deployments/1/logs").json()]
    assert page.text_content(flaky + " td.exit") == "0"  # the last attempt's

    analysis = {a["metric"]: a for a in doc["analysis"]}
    assert set(analysis) == {"errors", "watch"}
    errors = "#details .metric[data-metric='errors']"
    assert "successful" in page.text_content(errors + " h3 .status")
    assert page.text_content(errors + " .counts") == (
        "successful 3, failed 0, inconclusive 0, error 0"
    )
    values = _cells(page, errors + " tr.measurement td.value")
    assert values == [str(m["value"]) for m in analysis["errors"]["measurements"]]
    assert values == ["0.01"] * 3
    watch = "#details .metric[data-metric='watch']"
    assert "(dry run)" in page.text_content(watch + " h3")
    assert page.text_content(watch + " h3 .status") == analysis["watch"]["verdict"] == "failed"
    assert page.query_selector("#hosts") is None  # no fleet step: no host matrix
    screenshot(page, "analysis")

    page.goto(server.url + "/deployments/2")
    page.wait_for_selector("#log[data-ended='1']", timeout=20_000)
    failed = cli_json(project, "show", "2")["stages"][1]["steps"][0]
    release = "#timeline tr[data-stage='1'][data-step='0']"
    assert page.text_content(release + " td.exit") == str(failed["exit_code"]) == "1"
    assert page.text_content(release + " td.error") == failed["error"]
    assert failed["error"]
    assert page.query_selector("#details .metric") is None
    assert not page.errors
