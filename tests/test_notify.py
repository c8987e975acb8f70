"""Notification sinks: the webhook and Slack against real receivers on 127.0.0.1, and the
dispatcher's promise that a sink never fails or stalls a deployment beyond its timeout."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest
import shipyard as sy
from http_servers import HANG
from http_servers import LoopbackServer
from http_servers import Reply
from http_servers import Request
from http_servers import always
from http_servers import no_leftover_threads  # noqa: F401 - autouse fixture
from http_servers import statuses
from http_servers import unused_port
from shipyard._notify import NotifierDispatcher
from shipyard.contrib.slack import SlackNotifier
from shipyard.contrib.slack import escape
from shipyard.contrib.slack import slack
from shipyard.plugins.notify import SIGNATURE_HEADER
from shipyard.plugins.notify import WebhookNotifier
from shipyard.plugins.notify import signature
from shipyard.plugins.notify import verify_signature

SECRET = "hook-signing-secret-123"

ALL_EVENTS = [
    "deployment_started",
    "stage_started",
    "step_started",
    "step_finished",
    "stage_finished",
    "stage_started",
    "step_started",
    "step_finished",
    "stage_finished",
    "deployment_finished",
]


def two_stage_pipeline(notify: str, *, fail: bool = False, rollback: str = "manual") -> str:
    second = "sy.command('false')" if fail else "sy.command('true')"
    return f"""
        import shipyard as sy
        from shipyard.contrib.slack import slack

        @sy.pipeline(notify={notify}, rollback={rollback!r})
        def web(d):
            second = {second} if d.version != "1.0" else sy.command("true")
            return [
                sy.stage("build", sy.command("true")),
                sy.stage("release", second),
            ]
        """


def events_of(requests: list[Request]) -> list[str]:
    return [json.loads(r.body)["event"] for r in requests]


def notify_logs(shipyarder: Any, dep_id: int) -> str:
    return str(shipyarder.run("logs", str(dep_id)).output)


# -- the webhook ----------------------------------------------------------------------------------


def test_webhook_posts_every_event_in_order_signed(shipyarder: Any):
    with LoopbackServer(always(204)) as receiver:
        url = receiver.url("/hook")
        shipyarder.makepipelines(
            two_stage_pipeline(f"[sy.webhook({url!r}, secret=sy.secret('HOOK_SECRET'))]")
        )
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod", env={"HOOK_SECRET": SECRET})
    assert result.exit_code == 0, result
    requests = receiver.requests
    assert events_of(requests) == ALL_EVENTS
    assert [int(r.headers["x-shipyard-sequence"]) for r in requests] == list(range(1, 11))
    assert len({r.headers["x-shipyard-delivery"] for r in requests}) == 10
    for r in requests:
        assert r.method == "POST"
        assert r.path == "/hook"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-shipyard-event"] == json.loads(r.body)["event"]
        assert r.headers["user-agent"].startswith("shipyard/")
        # HMAC-SHA256 over the exact body bytes, like GitHub's X-Hub-Signature-256.
        assert r.headers[SIGNATURE_HEADER.lower()] == signature(SECRET, r.body)
        assert verify_signature(SECRET, r.body, r.headers[SIGNATURE_HEADER.lower()])
        assert not verify_signature("other-secret", r.body, r.headers[SIGNATURE_HEADER.lower()])
    first, *_, last = [json.loads(r.body) for r in requests]
    dep_id = result.deployment["id"]
    expected_deployment = {
        "id": dep_id, "pipeline": "web", "version": "2.0", "environment": "prod",
        "rollback_of": None,
    }  # fmt: skip
    assert first["deployment"] == expected_deployment
    assert first["status"] == "running"
    assert first["stages"] == ["build", "release"]
    assert last["deployment"] == expected_deployment
    assert last["status"] == "succeeded"
    assert last["error"] is None
    assert last["started_at"] <= last["finished_at"]
    assert last["started_at"].endswith("Z")
    step = json.loads(requests[3].body)
    assert step["stage"] == "build"
    assert step["step"] == "true"
    assert step["status"] == "succeeded"
    assert {"started_at", "finished_at", "error", "attempts", "exit_code"} <= set(step)
    # The signing secret shows nowhere.
    assert SECRET not in result.output
    assert SECRET not in notify_logs(shipyarder, dep_id)


def test_failed_deployment_payload_carries_the_error(shipyarder: Any):
    with LoopbackServer(always(200)) as receiver:
        shipyarder.makepipelines(two_stage_pipeline(f"[sy.webhook({receiver.url()!r})]", fail=True))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert result.exit_code == 1
    bodies = [json.loads(r.body) for r in receiver.requests]
    finished = bodies[-1]
    assert finished["event"] == "deployment_finished"
    assert finished["status"] == "failed"
    assert "step 'false' of stage 'release' failed" in finished["error"]
    failed_step = [b for b in bodies if b["event"] == "step_finished"][-1]
    assert failed_step["status"] == "failed"
    assert failed_step["exit_code"] == 1


def test_webhook_retries_with_backoff_then_delivers(shipyarder: Any):
    with LoopbackServer(statuses(500, 503, Reply(429, "slow down"), then=200)) as receiver:
        sink = f"[sy.webhook({receiver.url()!r}, backoff=0.05)]"
        shipyarder.makepipelines(two_stage_pipeline(sink))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert result.exit_code == 0
    requests = receiver.requests
    # The first event took four attempts, all with the same delivery id; then one each.
    first_four = {r.headers["x-shipyard-delivery"] for r in requests[:4]}
    assert len(first_four) == 1
    assert events_of(requests) == ["deployment_started"] * 3 + ALL_EVENTS
    assert "notifier" not in result.output


def test_webhook_gives_up_on_a_client_error_without_retrying(shipyarder: Any):
    with LoopbackServer(always(Reply(401, "bad token"))) as receiver:
        shipyarder.makepipelines(two_stage_pipeline(f"[sy.webhook({receiver.url('/h')!r})]"))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    # One attempt per event: a 401 is not retried. Each event was still tried, in order.
    assert result.exit_code == 0, result
    assert events_of(receiver.requests) == ALL_EVENTS
    result.fnmatch_lines(
        [
            f"shipyard: warning: notifier webhook:{receiver.url('/h')} failed on "
            f"deployment_started: WebhookError: POST {receiver.url('/h')} failed after 1 attempt "
            "in *s: HTTP 401 Unauthorized: 'bad token'"
        ]
    )
    logs = notify_logs(shipyarder, result.deployment["id"])
    # The other events failed the same way: reported once, counted (the history has both).
    more = len(ALL_EVENTS) - 1
    assert f"failed on {more} more event(s) the same way (WebhookError: 'bad token')" in logs


def test_receiver_that_is_down_never_fails_the_deployment(shipyarder: Any):
    url = f"http://127.0.0.1:{unused_port()}/hook"
    sink = f"[sy.webhook({url!r}, retries=3, backoff=0.05)]"
    shipyarder.makepipelines(two_stage_pipeline(sink))
    result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert result.exit_code == 0, result
    result.assert_outcomes(succeeded=2)
    # A refused connection is not retried (issue 12, item 10), and the events after it get one
    # attempt each: the warning says so once and counts the rest.
    result.fnmatch_lines(
        [
            f"*notifier webhook:{url} failed on deployment_started*failed after 1 attempt in*"
            "connection refused*",
            f"*notifier webhook:{url} failed on {len(ALL_EVENTS) - 1} more event(s) the same way "
            "(WebhookError: connection refused)",
        ]
    )
    assert result.stderr.count("connection refused") == 2, result.stderr
    logs = notify_logs(shipyarder, result.deployment["id"])
    assert "connection refused" in logs


def test_a_receiver_back_up_gets_retries_again():
    # While the last attempt was refused, an event gets one attempt; once the receiver answers
    # (even with a 503), events are retried again.
    from shipyard.plugins import notify

    with LoopbackServer(always(Reply(503, "busy"))) as receiver:
        hook = sy.webhook(receiver.url("/h"), retries=2, backoff=0.01)
        hook.open(lambda value: value)
        try:
            notify._deliveries()[id(hook)].refusing = True  # as after a refused connection
            with pytest.raises(notify.WebhookError, match="after 1 attempt "):
                hook.send({"event": "deployment_started"})
            assert len(receiver.requests) == 1
            with pytest.raises(notify.WebhookError, match="after 3 attempts"):
                hook.send({"event": "deployment_finished"})
            assert len(receiver.requests) == 4
        finally:
            hook.close()


def test_hanging_receiver_stalls_the_deployment_at_most_the_sink_timeout(shipyarder: Any):
    with LoopbackServer(always(200)) as fast:
        shipyarder.makepipelines(two_stage_pipeline("[]"))
        start = time.monotonic()
        plain = shipyarder.run("deploy", "web", "1.0", "-e", "prod")
        baseline = time.monotonic() - start
    assert plain.exit_code == 0
    del fast
    with LoopbackServer(always(HANG)) as receiver:
        sink = f"[sy.webhook({receiver.url()!r}, timeout=1.0, request_timeout=0.3, backoff=0.05)]"
        shipyarder.makepipelines(two_stage_pipeline(sink))
        start = time.monotonic()
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
        took = time.monotonic() - start
        assert result.exit_code == 0, result
        # The bound under test: the sink's timeout (plus generous slack), not its retries.
        assert took < baseline + 1.0 + 2.0
        assert receiver.requests  # it was tried
    result.fnmatch_lines(
        [f"*notifier webhook:{receiver.url()} did not finish within its timeout of 1s; *"]
    )
    logs = notify_logs(shipyarder, result.deployment["id"])
    assert "did not finish within its timeout of 1s" in logs


def test_deploy_notify_url_uses_the_webhook_and_the_env_secret(shipyarder: Any):
    with LoopbackServer(always(200)) as receiver:
        shipyarder.makepipelines(two_stage_pipeline("[]"))
        result = shipyarder.run(
            "deploy", "web", "2.0", "-e", "prod", "--notify", receiver.url("/cli"),
            env={"SHIPYARD_WEBHOOK_SECRET": SECRET},
        )  # fmt: skip
    assert result.exit_code == 0, result
    assert events_of(receiver.requests) == ALL_EVENTS
    for r in receiver.requests:
        assert verify_signature(SECRET, r.body, r.headers[SIGNATURE_HEADER.lower()])
    assert SECRET not in result.output


def test_secrets_in_webhook_url_and_headers_are_masked(shipyarder: Any):
    token = "url-token-0123456789"
    with LoopbackServer(always(Reply(403, f"token {token} is revoked"))) as receiver:
        sink = (
            f"[sy.webhook({receiver.url('/hook')!r} + '?token=' + sy.secret('HOOK_TOKEN'), "
            "headers={'Authorization': 'Bearer ' + sy.secret('HOOK_TOKEN')})]"
        )
        shipyarder.makepipelines(two_stage_pipeline(sink))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod", env={"HOOK_TOKEN": token})
    assert result.exit_code == 0, result
    first = receiver.requests[0]
    assert first.path == f"/hook?token={token}"
    assert first.headers["authorization"] == f"Bearer {token}"
    logs = notify_logs(shipyarder, result.deployment["id"])
    for text in (result.output, logs):
        assert token not in text
        assert "HTTP 403 Forbidden: 'token *** is revoked'" in text
    plan = shipyarder.run("plan", "web", "2.0", "-e", "prod")
    assert token not in plan.output


def test_events_filter(shipyarder: Any):
    with LoopbackServer(always(200)) as receiver:
        sink = f"[sy.webhook({receiver.url()!r}, events=['deployment_finished'])]"
        shipyarder.makepipelines(two_stage_pipeline(sink))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert result.exit_code == 0
    assert events_of(receiver.requests) == ["deployment_finished"]
    assert receiver.requests[0].headers["x-shipyard-sequence"] == "1"


def test_jsonl_and_console_sinks_still_work(shipyarder: Any):
    shipyarder.makepipelines(two_stage_pipeline("[sy.console()]"))
    result = shipyarder.run("deploy", "web", "2.0", "-e", "prod", "--notify", "jsonl:events.jsonl")
    assert result.exit_code == 0
    lines = (shipyarder.path / "events.jsonl").read_text().splitlines()
    assert [json.loads(line)["event"] for line in lines] == ALL_EVENTS
    result.fnmatch_lines(["[[]notify] deployment_finished web 2.0 -> prod #* succeeded"])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        pytest.param({"url": "ftp://x"}, "url must be an http:// or https:// URL", id="url"),
        pytest.param({"secret": ""}, "secret must be a non-empty string", id="secret"),
        pytest.param({"events": ["deploy_done"]}, "unknown event 'deploy_done'", id="events"),
        pytest.param({"timeout": 0}, "timeout must be a positive number", id="timeout"),
        pytest.param({"request_timeout": -1}, "request_timeout must be", id="request-timeout"),
        pytest.param({"retries": -1}, "retries must be a whole number", id="retries"),
        pytest.param({"headers": {"A": 1}}, "headers must map strings", id="headers"),
    ],
)
def test_webhook_definition_errors(kwargs: dict[str, Any], fragment: str):
    kwargs = {"url": "http://127.0.0.1/hook", **kwargs}
    with pytest.raises(sy.PipelineDefinitionError, match=r"webhook\(...\)") as info:
        sy.webhook(**kwargs)
    assert fragment in str(info.value)


def test_webhook_name_hides_passwords_and_queries():
    sink = sy.webhook("https://user:pw-1234@hooks.example.test/x?token=abcd")
    assert sink.name == "webhook:https://user:***@hooks.example.test/x"
    assert "abcd" not in repr(sink)


# -- Slack ----------------------------------------------------------------------------------------


def test_slack_gets_start_finish_and_rollback_only(shipyarder: Any):
    with LoopbackServer(always(Reply(200, "ok"))) as receiver:
        sink = f"[slack({receiver.url('/services/T0/B0/XXXX')!r}), sy.webhook({receiver.url('/all')!r})]"
        shipyarder.makepipelines(two_stage_pipeline(sink, fail=True, rollback="auto"))
        good = shipyarder.run("deploy", "web", "1.0", "-e", "prod")
        assert good.exit_code == 0, good
        bad = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert bad.exit_code == 1, bad
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in receiver.requests:
        by_path.setdefault(r.path, []).append(json.loads(r.body))
    texts = [m["text"] for m in by_path["/services/T0/B0/XXXX"]]
    bad_id = bad.deployment["id"]
    rollback_id = bad_id + 1
    assert texts[0] == f":rocket: Deploying: *web* 1.0 to prod (deployment #{bad_id - 1})"
    assert texts[1].startswith(":white_check_mark: *web* 1.0 to prod: *succeeded* in ")
    assert texts[2] == f":rocket: Deploying: *web* 2.0 to prod (deployment #{bad_id})"
    assert texts[3].startswith(":x: *web* 2.0 to prod: *failed* in ")
    assert texts[3].split("\n")[1].startswith("> step 'false' of stage 'release' failed")
    assert texts[4] == (
        f":rewind: Rolling back *web* in prod to 1.0 (after deployment #{bad_id}, version 2.0): "
        f"deployment #{bad_id} failed (rollback='auto')"
    )
    assert texts[5] == (
        f":rocket: Rollback started: *web* 1.0 to prod (deployment #{rollback_id}, rollback of "
        f"#{bad_id})"
    )
    assert texts[6].startswith(":white_check_mark: *web* 1.0 to prod: *succeeded* in ")
    assert len(texts) == 7
    for m in by_path["/services/T0/B0/XXXX"]:
        assert m["unfurl_links"] is False
    # The generic webhook got the rollback event too, before the rollback's own start.
    all_events = [b["event"] for b in by_path["/all"]]
    i = all_events.index("rollback_started")
    assert all_events[i - 1] == "deployment_finished"
    assert all_events[i + 1] == "deployment_started"
    assert by_path["/all"][i]["target_version"] == "1.0"


def test_slack_name_hides_the_webhook_path_and_escapes_text():
    sink = slack("https://hooks.slack.com/services/T000/B000/SECRETPART")
    assert sink.name == "slack:hooks.slack.com"
    assert "SECRETPART" not in repr(sink)
    assert isinstance(sink, SlackNotifier)
    assert escape("<http://x|click> & <@U123>") == "&lt;http://x|click&gt; &amp; &lt;@U123&gt;"


def test_slack_failure_does_not_show_its_url(shipyarder: Any):
    with LoopbackServer(always(Reply(404, "no_service"))) as receiver:
        url = receiver.url("/services/T0/B0/TOPSECRET")
        shipyarder.makepipelines(two_stage_pipeline(f"[slack({url!r})]"))
        result = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert result.exit_code == 0
    result.fnmatch_lines(["*notifier slack:127.0.0.1 failed on deployment_started*HTTP 404*"])
    assert "TOPSECRET" not in result.output


# -- the dispatcher -------------------------------------------------------------------------------


class _Hanging:
    """A sink whose send blocks until released."""

    def __init__(self, name: str, timeout: float) -> None:
        self.name = name
        self.timeout = timeout
        self.release = threading.Event()
        self.sent: list[dict[str, Any]] = []

    def send(self, payload: dict[str, Any]) -> None:
        self.sent.append(payload)
        self.release.wait()


class _Recording:
    name = "recording"
    timeout = 5.0

    def __init__(self) -> None:
        self.opened_with: Any = None
        self.sent: list[dict[str, Any]] = []
        self.closed = False

    def open(self, resolve: Any) -> None:
        self.opened_with = resolve("{{shipyard.secret:X}}")

    def send(self, payload: dict[str, Any]) -> None:
        self.sent.append(payload)

    def close(self) -> None:
        self.closed = True


def _event() -> Any:
    from shipyard._events import DeploymentStarted

    d = sy.Deployment(id=1, pipeline="p", version="1", environment="e")
    return DeploymentStarted(deployment=d, stages=[])


def test_dispatcher_waits_for_all_sinks_at_once_and_abandons_hanging_ones(
    capsys: pytest.CaptureFixture[str],
):
    sinks = [_Hanging(f"hang{i}", timeout=0.5) for i in range(3)]
    recording = _Recording()
    dispatcher = NotifierDispatcher([*sinks, recording], resolve=lambda v: "resolved")
    for _ in range(3):
        dispatcher.handle(_event())
    start = time.monotonic()
    errors = dispatcher.close()
    took = time.monotonic() - start
    # Three hanging sinks of 0.5 s each: waited for together, not one after another.
    assert took < 1.2
    assert len(errors) == 3
    assert "notifier hang0 did not finish within its timeout of 0.5s" in errors[0]
    assert recording.opened_with == "resolved"
    assert len(recording.sent) == 3
    assert recording.closed
    for s in sinks:
        s.release.set()
    # Abandoned sinks drop the events they had not started.
    for w in dispatcher.workers:
        w.thread.join(5)
    assert [len(s.sent) for s in sinks] == [1, 1, 1]
    assert "did not finish" in capsys.readouterr().err


def test_dispatcher_sink_that_cannot_open_gets_no_events():
    class Broken(_Recording):
        name = "broken"

        def open(self, resolve: Any) -> None:
            raise RuntimeError("no route")

    sink = Broken()
    dispatcher = NotifierDispatcher([sink])
    dispatcher.handle(_event())
    errors = dispatcher.close()
    assert errors == [
        "notifier broken could not start: RuntimeError: no route; it receives no events"
    ]
    assert sink.sent == []


def test_one_webhook_object_serves_concurrent_threads():
    """``@pipeline(notify=[...])`` sinks are shared: each dispatcher thread has its own client."""
    with LoopbackServer(always(200)) as receiver:
        sink = WebhookNotifier(receiver.url())
        dispatchers = [NotifierDispatcher([sink]) for _ in range(3)]
        for d in dispatchers:
            for _ in range(4):
                d.handle(_event())
        errors = [d.close() for d in dispatchers]
    assert errors == [[], [], []]
    assert len(receiver.requests) == 12
    sequences = sorted(int(r.headers["x-shipyard-sequence"]) for r in receiver.requests)
    assert sequences == [1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4]
