"""Traces of deployments (``shipyard.plugins.otel``, issue #19), sent to a real OTLP receiver.

The receiver (tests/otlp_receiver.py) is a loopback HTTP server decoding the protobuf with the
official ``opentelemetry-proto`` package; each test names its own ``OTEL_SERVICE_NAME`` and
reads back only the spans of that service.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from otlp_receiver import ClosedPort
from otlp_receiver import HangingPort
from otlp_receiver import OTLPReceiver
from otlp_receiver import ReceivedSpan
from polling import wait_for
from shipyard.plugins.otel import export_timeout
from shipyard.plugins.otel import tracing_endpoint

TRACEPARENT = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}$")


@pytest.fixture(scope="session")
def receiver():
    r = OTLPReceiver()
    yield r
    r.close()


@pytest.fixture
def service():
    return f"test-{uuid.uuid4().hex[:12]}"


def tracing_env(receiver: OTLPReceiver, service: str, **extra: str) -> dict[str, str | None]:
    env: dict[str, str | None] = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None,
        "OTEL_SERVICE_NAME": service,
        "OTEL_SDK_DISABLED": None,
        "TRACEPARENT": None,
    }
    env.update(extra)
    return env


def by_name(spans: list[ReceivedSpan], name: str) -> list[ReceivedSpan]:
    return [s for s in spans if s.name == name]


def one(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    found = by_name(spans, name)
    assert len(found) == 1, (name, [s.name for s in spans])
    return found[0]


def children(spans: list[ReceivedSpan], parent: ReceivedSpan) -> list[ReceivedSpan]:
    return sorted(
        (s for s in spans if s.parent_span_id == parent.span_id), key=lambda s: s.start_ns
    )


PIPELINES = """
    import sys

    import shipyard as sy

    PY = sys.executable


    @sy.pipeline(rollback="auto")
    def web(d: sy.Deployment):
        release = "exit 3" if d.version == "2" else "true"
        return [
            sy.stage("build", sy.command(PY, "flaky.py", name="flaky", retries=2)),
            sy.stage(
                "verify",
                sy.command("sleep", "0.3", name="left"),
                sy.command("sleep", "0.3", name="right"),
                parallel=True,
            ),
            sy.stage("release", sy.command("sh", "-c", release, name="release")),
        ]
"""

# Fails the first attempt of each deployment, then succeeds.
FLAKY = """
    import os
    import sys
    from pathlib import Path

    mark = Path(f"attempted-{os.environ['DEPLOYMENT_ID']}")
    if not mark.exists():
        mark.write_text("1")
        print("not yet", file=sys.stderr)
        sys.exit(1)
    print("built")
"""


def test_span_tree_of_a_failed_deployment_and_its_rollback(shipyarder, receiver, service):
    shipyarder.makepipelines(PIPELINES)
    shipyarder.makefile("flaky.py", FLAKY)
    env = tracing_env(receiver, service)
    assert shipyarder.run("deploy", "web", "1", "-e", "prod", env=env).exit_code == 0
    result = shipyarder.run("deploy", "web", "2", "-e", "prod", env=env)
    assert result.exit_code == 1, result.output
    # Exported when the command ended: everything is there once the command returned.
    spans = receiver.of_service(service)
    deploys = sorted(by_name(spans, "deploy web"), key=lambda s: s.start_ns)
    assert [d.attributes["shipyard.version"] for d in deploys] == ["1", "2"]
    first, failed = deploys
    assert first.trace_id != failed.trace_id  # one trace per deployment
    assert failed.parent_span_id == ""
    assert failed.attributes["shipyard.pipeline"] == "web"
    assert failed.attributes["shipyard.environment"] == "prod"
    assert failed.attributes["deployment.environment.name"] == "prod"
    assert failed.attributes["shipyard.deployment.id"] == 2
    assert failed.attributes["shipyard.status"] == "failed"
    assert failed.status_code == 2
    assert "'release'" in failed.status_message
    assert failed.resource["service.name"] == service

    trace = [s for s in spans if s.trace_id == failed.trace_id]
    stages = children(trace, failed)
    assert [s.name for s in stages] == [
        "stage build", "stage verify", "stage release", "deploy web (rollback)",
    ]  # fmt: skip
    build, verify, release, rollback = stages
    assert [s.attributes["shipyard.stage.index"] for s in stages[:3]] == [0, 1, 2]
    assert verify.attributes["shipyard.stage.parallel"] is True
    assert release.attributes["shipyard.status"] == "failed"

    # Retries: one step span, an attempt span per attempt, a retry event.
    (flaky,) = children(trace, build)
    assert flaky.name == "step flaky"
    assert flaky.attributes["shipyard.attempts"] == 2
    assert flaky.attributes["shipyard.status"] == "succeeded"
    assert flaky.attributes["shipyard.step.kind"] == "command"
    assert [name for name, _ in flaky.events] == ["retry"]
    assert flaky.events[0][1]["shipyard.attempt"] == 2
    attempts = children(trace, flaky)
    assert [a.name for a in attempts] == ["attempt 1", "attempt 2"]
    assert attempts[0].attributes["shipyard.exit_code"] == 1
    assert attempts[0].status_code == 2
    assert "exited with 1" in attempts[0].attributes["shipyard.error"]
    assert attempts[1].attributes["shipyard.status"] == "succeeded"
    assert attempts[0].end_ns <= attempts[1].start_ns

    # Parallel steps: siblings under their stage, running at the same time.
    left, right = children(trace, verify)
    assert {left.name, right.name} == {"step left", "step right"}
    assert left.start_ns < right.end_ns
    assert right.start_ns < left.end_ns

    (step,) = children(trace, release)
    assert step.attributes["shipyard.exit_code"] == 3
    assert step.attributes["shipyard.step"] == "release"
    assert step.attributes["shipyard.status"] == "failed"
    assert "exited with 3" in step.attributes["shipyard.error"]
    assert step.status_code == 2
    assert "exited with 3" in step.status_message
    assert children(trace, step) == []  # no retries: no attempt spans
    # A step span that is not retried is made in one piece at its end (figure 13): the same
    # resource, scope and kind as the spans the SDK makes, and its times inside its stage's.
    assert (step.resource, step.scope, step.kind) == (release.resource, release.scope, 1)
    assert step.scope[0] == "shipyard"
    assert release.start_ns <= step.start_ns < step.end_ns <= release.end_ns
    assert left.parent_span_id == right.parent_span_id == verify.span_id

    # The automatic rollback: a deployment of its own, a child of the one that failed.
    assert rollback.attributes["shipyard.rollback_of"] == 2
    assert rollback.attributes["shipyard.version"] == "1"
    assert rollback.attributes["shipyard.status"] == "succeeded"
    assert [s.name for s in children(trace, rollback)] == [
        "stage build", "stage verify", "stage release",
    ]  # fmt: skip
    (event,) = [e for e in failed.events if e[0] == "rollback"]
    assert event[1]["shipyard.rollback.target"] == "1"
    assert failed.end_ns <= rollback.start_ns


SCRIPT = """
    import os

    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    parent = TraceContextTextMapPropagator().extract({"traceparent": os.environ["TRACEPARENT"]})
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(OTLPSpanExporter()))
    with provider.get_tracer("deploy-script").start_as_current_span("migrate", context=parent):
        print("traceparent", os.environ["TRACEPARENT"])
    provider.shutdown()
"""


def test_incoming_traceparent_is_the_parent_and_a_script_span_joins(shipyarder, receiver, service):
    shipyarder.makepipelines(
        """
        import sys

        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("migrate", sy.command(sys.executable, "script.py", name="migrate"))]
        """
    )
    shipyarder.makefile("script.py", SCRIPT)
    ci_trace, ci_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    env = tracing_env(receiver, service, TRACEPARENT=f"00-{ci_trace}-{ci_span}-01")
    result = shipyarder.run("deploy", "job", "7", "-e", "prod", env=env)
    assert result.exit_code == 0, result.output
    (line,) = [ln for ln in result.stdout.splitlines() if "traceparent" in ln]
    match = TRACEPARENT.match(line.split()[-1])
    assert match is not None, line

    spans = receiver.of_service(service)
    deploy = one(spans, "deploy job")
    assert deploy.trace_id == ci_trace
    assert deploy.parent_span_id == ci_span
    step = one(spans, "step migrate")
    assert by_name(spans, "attempt 1") == []  # not retried: the step's span is its attempt's
    # The step's processes get the step's span, in the deployment's trace...
    assert match.groups() == (ci_trace, step.span_id)
    # ...and what the script itself exported joins the trace under it.
    script = wait_for(lambda: by_name(receiver.of_service(service), "migrate"), what="the span")
    assert script[0].trace_id == ci_trace
    assert script[0].parent_span_id == step.span_id


def test_each_attempt_gets_its_own_traceparent(shipyarder, receiver, service):
    shipyarder.makepipelines(
        """
        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("s", sy.command("sh", "-c", 'echo "tp=$TRACEPARENT"; exit 1',
                                             name="twice", retries=1))]
        """
    )
    result = shipyarder.run("deploy", "job", "1", "-e", "x", env=tracing_env(receiver, service))
    assert result.exit_code == 1
    seen = sorted(set(re.findall(r"tp=([0-9a-f-]+)", result.stdout)))
    assert len(seen) == 2
    attempts = {s.span_id for s in by_name(receiver.of_service(service), "attempt 1")}
    attempts |= {s.span_id for s in by_name(receiver.of_service(service), "attempt 2")}
    assert {TRACEPARENT.match(tp).group(2) for tp in seen} == attempts  # type: ignore[union-attr]


def test_the_sdk_settings_apply_to_step_spans(shipyarder, receiver, service):
    """Step spans made in one piece honour the SDK's value limit and samplers as its own do."""
    shipyarder.makepipelines(
        """
        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("s", sy.command("sh", "-c", 'echo "tp=$TRACEPARENT"; exit 4',
                                             name="fails"))]
        """
    )
    env = tracing_env(receiver, service, OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT="9")
    assert shipyarder.run("deploy", "job", "1", "-e", "x", env=env).exit_code == 1
    step, stage = (
        one(receiver.of_service(service), "step fails"),
        one(receiver.of_service(service), "stage s"),
    )
    assert step.attributes["shipyard.step"] == "fails"
    assert len(step.attributes["shipyard.error"]) == 9
    assert stage.attributes["shipyard.stage"] == "s"
    # Nothing sampled: no spans; the processes still get the trace's context, with the sampled
    # flag (bit 0) clear (bit 1 says the trace id is random, W3C Trace Context level 2).
    env = tracing_env(receiver, f"{service}-off", OTEL_TRACES_SAMPLER="always_off")
    result = shipyarder.run("deploy", "job", "2", "-e", "x", env=env)
    assert result.exit_code == 1
    assert re.search(r"tp=00-[0-9a-f]{32}-[0-9a-f]{16}-0[02]\b", result.stdout), result.stdout
    assert receiver.of_service(f"{service}-off") == []
    # Sampled by trace id, all of them: the step's span under its stage's, as with the default.
    env = tracing_env(
        receiver, f"{service}-ratio",
        OTEL_TRACES_SAMPLER="parentbased_traceidratio", OTEL_TRACES_SAMPLER_ARG="1",
    )  # fmt: skip
    assert shipyarder.run("deploy", "job", "3", "-e", "x", env=env).exit_code == 1
    spans = receiver.of_service(f"{service}-ratio")
    assert one(spans, "step fails").parent_span_id == one(spans, "stage s").span_id


def test_tracing_off_leaves_traceparent_alone(shipyarder, receiver, service):
    shipyarder.makepipelines(
        """
        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("s", sy.command("sh", "-c", 'echo "tp=${TRACEPARENT:-none}"'))]
        """
    )
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": None, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": None}
    result = shipyarder.run("deploy", "job", "1", "-e", "x", env=env)
    assert "tp=none" in result.stdout
    incoming = "00-" + "1" * 32 + "-" + "2" * 16 + "-01"
    result = shipyarder.run("deploy", "job", "2", "-e", "x", env={**env, "TRACEPARENT": incoming})
    assert f"tp={incoming}" in result.stdout
    # Disabled by -p no:otel even with an endpoint: nothing sent.
    result = shipyarder.run(
        "-p", "no:otel", "deploy", "job", "3", "-e", "x", env=tracing_env(receiver, service)
    )
    assert result.exit_code == 0
    assert "tp=none" in result.stdout
    assert receiver.of_service(service) == []


def test_pyproject_setting(shipyarder, receiver, service):
    shipyarder.makepipelines(
        """
        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("s", sy.command("true"))]
        """
    )
    env = tracing_env(receiver, service, OTEL_EXPORTER_OTLP_ENDPOINT=None)
    shipyarder.makefile("pyproject.toml", f'[tool.shipyard]\notel = "{receiver.url}"\n')
    assert shipyarder.run("deploy", "job", "1", "-e", "x", env=env).exit_code == 0
    assert [s.name for s in receiver.of_service(service)].count("deploy job") == 1
    # false wins over an endpoint in the environment (set for other tools of the CI job).
    shipyarder.makefile("pyproject.toml", "[tool.shipyard]\notel = false\n")
    env = tracing_env(receiver, service)
    assert shipyarder.run("deploy", "job", "2", "-e", "x", env=env).exit_code == 0
    assert [s.name for s in receiver.of_service(service)].count("deploy job") == 1
    shipyarder.makefile("pyproject.toml", "[tool.shipyard]\notel = 3\n")
    result = shipyarder.run("deploy", "job", "3", "-e", "x", env=env)
    assert result.exit_code == 2
    assert "otel must be true, false or the collector's URL" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize(
    ("setting", "environ", "expected"),
    [
        (None, {}, None),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c/t"}, "http://c/t"),
        (True, {}, "http://localhost:4318/v1/traces"),
        ("http://p:1", {}, "http://p:1/v1/traces"),
        ("http://p:1", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:2"}, "http://e:2/v1/traces"),
        (False, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://e:2"}, None),
        (True, {"OTEL_SDK_DISABLED": "true"}, None),
    ],
)
def test_when_tracing_is_on(setting, environ, expected):
    assert tracing_endpoint(setting, environ) == expected


def test_export_timeout():
    assert export_timeout({}) == 10.0
    assert export_timeout({"OTEL_EXPORTER_OTLP_TIMEOUT": "2.5"}) == 2.5
    assert (
        export_timeout(
            {"OTEL_EXPORTER_OTLP_TIMEOUT": "3", "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "1"}
        )
        == 1.0
    )
    assert export_timeout({"OTEL_EXPORTER_OTLP_TIMEOUT": "soon"}) == 10.0


# -- a dead collector -----------------------------------------------------------------------------

SLOW = """
    import shipyard as sy


    @sy.pipeline()
    def slow(d: sy.Deployment):
        return [
            sy.stage("first", sy.command("true")),
            sy.stage("s", sy.command("sleep", "3"), sy.command("true", name="then")),
        ]
"""


def _timed_deploy(shipyarder, version: str, env: dict[str, str | None]) -> tuple[float, str]:
    t0 = time.monotonic()
    result = shipyarder.spawn("deploy", "slow", version, "-e", "x", env=env)
    elapsed = time.monotonic() - t0
    assert result.exit_code == 0, result.output
    return elapsed, result.stderr


@pytest.mark.parametrize("dead", [ClosedPort, HangingPort], ids=["closed-port", "hanging"])
def test_a_dead_collector_costs_at_most_its_timeout_once(shipyarder, dead, service):
    """Exports are tried every 100 ms during a 3 s step (the first stage's spans are done);
    the collector never answers (or refuses). Unbounded, each export would wait its timeout,
    and the last flush once more."""
    shipyarder.makepipelines(SLOW)
    collector = dead()
    timeout = 2.0
    try:
        off, _ = _timed_deploy(shipyarder, "1", {"OTEL_EXPORTER_OTLP_ENDPOINT": None})
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": collector.url, "OTEL_SERVICE_NAME": service,
            "OTEL_EXPORTER_OTLP_TIMEOUT": str(timeout), "OTEL_BSP_SCHEDULE_DELAY": "100",
        }  # fmt: skip
        on, stderr = _timed_deploy(shipyarder, "2", env)
    finally:
        collector.close()
    # Generous for a busy machine's start-up noise, well below a second timeout.
    assert on - off < timeout + 0.8, (on, off)
    warnings = [ln for ln in stderr.splitlines() if "tracing:" in ln]
    assert len(warnings) == 1, stderr
    assert "could not be sent to " + collector.url in warnings[0]
    assert "Traceback" not in stderr


# -- import cost ----------------------------------------------------------------------------------


def _modules(args: list[str], cwd: Path, env: dict[str, str]) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "shipyard", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    return {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:")
    }


def test_tracing_off_imports_no_opentelemetry(tmp_path, resources, receiver):
    import shutil

    shutil.copy(resources / "pipelines_typical.py", tmp_path / "pipelines.py")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SHIPYARD_", "OTEL_"))}
    base["SHIPYARD_HISTORY"] = str(tmp_path / "history.db")
    deploy = ["deploy", "docs", "1", "-e", "x", "--no-rollback"]
    assert "opentelemetry" not in _modules(deploy, tmp_path, base)
    on = {**base, "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url, "OTEL_SERVICE_NAME": "imports"}
    # On, but nothing deployed: list and plan stay light.
    assert "opentelemetry" not in _modules(["list"], tmp_path, on)
    assert "opentelemetry" not in _modules(["plan", "webapp", "1.0", "-e", "staging"], tmp_path, on)
    # The same measurement sees it when a deployment is traced.
    assert "opentelemetry" in _modules(deploy, tmp_path, on)


@pytest.mark.docker
def test_traceparent_reaches_a_docker_run_container(shipyarder, receiver, service):
    shipyarder.makepipelines(
        """
        import shipyard as sy


        @sy.pipeline()
        def job(d: sy.Deployment):
            return [sy.stage("s", sy.docker.run("shipyard-test/busybox:latest",
                                                ["sh", "-c", 'echo "tp=$TRACEPARENT"'],
                                                name="container"))]
        """
    )
    result = shipyarder.run("deploy", "job", "1", "-e", "x", env=tracing_env(receiver, service))
    assert result.exit_code == 0, result.output
    (tp,) = set(re.findall(r"tp=([0-9a-f-]+)", result.stdout))
    step = one(receiver.of_service(service), "step container")
    assert TRACEPARENT.match(tp).groups() == (step.trace_id, step.span_id)  # type: ignore[union-attr]
