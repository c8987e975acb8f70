"""Weighted canaries (issue 15, item 5): ``sy.route``, ``sy.canary`` and the nginx weights.

A real nginx (in the test's temporary folder) sits in front of two real backends: HTTP servers
in this process for ``sy.route`` in plain pipelines, the local test images on the real Docker
engine for ``docker.service(..., strategy=sy.canary(...))``. Shares are counted from the
answers nginx actually returns.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shipyard as sy
from docker_fixtures import NGINX
from docker_fixtures import WEB
from docker_fixtures import Load
from docker_fixtures import NginxServer
from docker_fixtures import Target
from docker_fixtures import docker_engine_fixture  # noqa: F401 - the fixture docker_engine
from docker_fixtures import docker_session_fixture  # noqa: F401 - used by docker_engine
from docker_fixtures import free_ports
from docker_fixtures import http_get
from docker_fixtures import start_nginx
from docker_fixtures import stop_nginx
from docker_fixtures import target_fixture  # noqa: F401 - the fixture target
from docker_fixtures import test_containers
from http_servers import LoopbackServer
from http_servers import Reply
from http_servers import always
from polling import wait_for
from prometheus_server import prometheus_server  # noqa: F401 - session fixture
from shipyard import PipelineDefinitionError
from shipyard import Status
from shipyard import StepFailed
from shipyard._plugins import ShipyardPluginManager
from shipyard.plugins.nginx import NginxRouter

#: Requests counted for each share.
SAMPLE = 400
#: How far a measured share may be from the weight, in points.
TOLERANCE = 5


class FakeContext:
    """The part of a StepContext a router uses: ``log`` and ``record_artifact``."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.artifacts: dict[str, str] = {}

    def log(self, text: str, stream: str = "stdout") -> None:
        self.lines.append(text)

    def record_artifact(self, name: str, content: str) -> bool:
        self.artifacts[name] = content
        return True


def shares(url: str, n: int = SAMPLE) -> dict[str, float]:
    """Percent of ``n`` requests (fresh connections) answered by each body."""
    counts = Counter(http_get(url, timeout=5)[1] for _ in range(n))
    return {body: 100.0 * c / n for body, c in counts.items()}


def near(measured: dict[str, float], expected: dict[str, int]) -> bool:
    return set(measured) <= set(expected) and all(
        abs(measured.get(k, 0.0) - v) <= TOLERANCE for k, v in expected.items()
    )


# -- definitions and plan (no services) -------------------------------------------------------------


def test_weights_accept_a_mapping_or_pairs(tmp_path: Path) -> None:
    router = sy.nginx(tmp_path)
    assert sy.route(router, "web", {8081: 90, 8082: 10}).weights == {8081: 90, 8082: 10}
    step = sy.route(router, "web", [(8081, 0), (8082, 100)])
    assert step.weights == {8081: 0, 8082: 100}
    assert step.name == "route web"
    assert step.describe() == f"route web via nginx({tmp_path}): 8081 0%, 8082 100%"
    assert sy.canary().steps == (10, 50, 100)


@pytest.mark.parametrize(
    ("weights", "message"),
    [
        ({8081: 90}, "the weights must sum to 100, got 90 (8081 90%)"),
        ({8081: 60, 8082: 60}, "the weights must sum to 100, got 120"),
        ({"blue": 100}, "unknown port 'blue' in the weights"),
        ({70000: 100}, "unknown port 70000 in the weights"),
        ({8081: 50.5, 8082: 49.5}, "the weight of port 8081 must be a whole percent"),
        ({8081: -10, 8082: 110}, "the weight of port 8081 must be a whole percent"),
        ({}, "weights name no port"),
        ([(8081, 50), (8081, 50)], "port 8081 is given twice"),
        ("8081=100", "weights must be {port: percent} or a list of (port, percent)"),
    ],
    ids=["short", "over", "name", "range", "float", "negative", "empty", "twice", "text"],
)
def test_bad_weights_name_the_step(tmp_path: Path, weights: Any, message: str) -> None:
    with pytest.raises(PipelineDefinitionError) as info:
        sy.route(sy.nginx(tmp_path), "web", weights, name="shift web")
    assert str(info.value).startswith("route step 'shift web': ")
    assert message in str(info.value)


class _GatedAnalysis:
    """An analysis step (duck-typed) whose inconclusive verdict waits for an approval."""

    class on_inconclusive:  # stands for a sy.approval(...) step
        kind = "approval"

    async def run(self, context: Any) -> None:
        raise AssertionError("never run")


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sy.canary(steps=[10, 50]), "the last step must be 100"),
        (lambda: sy.canary(steps=[50, 10, 100]), "steps must be increasing whole percents"),
        (lambda: sy.canary(steps=[0, 100]), "steps must be increasing whole percents"),
        (lambda: sy.canary(steps=[]), "steps must be increasing whole percents"),
        (lambda: sy.canary(pause=-1), "pause must be a number of seconds >= 0"),
        (lambda: sy.canary(analysis="errors"), "analysis must be sy.analysis(...)"),
        (lambda: sy.canary(approval=object()), "approval= is not supported yet"),
        (lambda: sy.canary(analysis=_GatedAnalysis()), "cannot suspend a canary halfway yet"),
        (lambda: sy.docker.service("web", image="w:1", strategy=sy.canary()), "needs router="),
        (lambda: sy.docker.service("web", image="w:1", router=sy.nginx("/x"), strategy=10),
         "strategy must be sy.canary(...)"),
        (lambda: sy.route(None, "web", {8081: 100}), "router is required"),
    ],
    ids=["no-100", "order", "zero", "empty", "pause", "analysis", "approval", "gated", "no-router",
         "strategy", "route-no-router"],
)  # fmt: skip
def test_canary_definition_errors(build: Any, message: str) -> None:
    with pytest.raises(PipelineDefinitionError) as info:
        build()
    assert message in str(info.value)


BAD_PIPELINES = {
    "sum": 'sy.route(sy.nginx("conf.d"), "web", {8081: 90, 8082: 5}, name="shift")',
    "port": 'sy.route(sy.nginx("conf.d"), "web", {"green": 100}, name="shift")',
    "router": 'sy.docker.service("web", image="web:1", strategy=sy.canary(), name="shift")',
}


@pytest.mark.parametrize("case", sorted(BAD_PIPELINES))
@pytest.mark.parametrize("command", ["plan", "deploy"])
def test_bad_input_is_exit_2_naming_the_step(shipyarder: Any, case: str, command: str) -> None:
    shipyarder.makepipelines(f"""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            return [sy.stage("release", {BAD_PIPELINES[case]})]
    """)
    result = shipyarder.run(command, "web", "1.0", "-e", "staging")
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert "step 'shift'" in result.output
    expected = {"sum": "must sum to 100, got 95", "port": "unknown port 'green'",
                "router": "needs router="}[case]  # fmt: skip
    assert expected in result.output
    assert "pipelines.py" in result.output
    if command == "deploy":
        assert shipyarder.history == []  # refused before anything was recorded


def test_plan_prints_the_canary_steps(shipyarder: Any) -> None:
    shipyarder.makepipelines("""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            check = sy.analysis(sy.metric("errors", sy.python_metric(lambda: 0.0),
                                          failure=sy.above(0.05), interval=5, count=3))
            return [
                sy.stage("release", sy.docker.service(
                    "web", image=f"web:{d.version}", router=sy.nginx("conf.d"),
                    strategy=sy.canary(steps=[5, 25, 100], analysis=check, pause=30))),
                sy.stage("manual", sy.route(sy.nginx("conf.d"), "api", [(9001, 80), (9002, 20)])),
            ]
    """)
    result = shipyarder.run("plan", "web", "1.0", "-e", "staging")
    assert result.exit_code == 0, result.output
    result.fnmatch_lines([
        "*move traffic through router nginx(conf.d) by canary 5% -> 25% -> 100% (after each step: pause 30s, then analysis of 1 metric*",
        "*canary steps: 5%, 25%, 100%*",
        "*analysis: errors: *failure above(0.05); 3 measurement(s) every 5s*",
        "*route api via nginx(conf.d): 9001 80%, 9002 20%*",
    ])  # fmt: skip


# -- the nginx router's weights -----------------------------------------------------------------


def test_render_and_read_weights(tmp_path: Path) -> None:
    router = sy.nginx(tmp_path)
    text = router.render_weights("web", {8081: 90, 8082: 10})
    assert "upstream shipyard_web {\n    server 127.0.0.1:8081 weight=90;\n" in text
    assert "    server 127.0.0.1:8082 weight=10;\n}\n" in text
    # 0% leaves the server out; one at 100% is exactly the switch's file.
    assert router.render_weights("web", {8081: 0, 8082: 100}) == router.render("web", 8082)
    assert router.current_weights("web") is None
    (tmp_path / "web.conf").write_text(text)
    assert router.current_weights("web") == {8081: 90, 8082: 10}
    (tmp_path / "web.conf").write_text(router.render("web", 8082))
    assert router.current_weights("web") == {8082: 100}
    assert NginxRouter.from_spec(router.spec()).spec() == router.spec()


def test_the_weights_hook_handles_nginx_routers_only(tmp_path: Path) -> None:
    pm = ShipyardPluginManager()
    pm.load(autoload=False)
    pm.finish_loading()
    ctx: Any = FakeContext()
    assert pm.router_weights(object(), "web", {8081: 100}, ctx) is None
    router = sy.nginx(tmp_path, test_cmd=["true"], reload_cmd=["true"])
    result = pm.router_weights(router, "web", {8081: 70, 8082: 30}, ctx)
    assert result is not None
    assert not isinstance(result, bool)
    assert asyncio.run(result) is True  # type: ignore[arg-type]
    assert "server 127.0.0.1:8082 weight=30;" in (tmp_path / "web.conf").read_text()
    # What a repair needs to reach this nginx without the pipelines file.
    spec = json.loads(ctx.artifacts["nginx:web"])
    assert spec["service"] == "web"
    assert spec["reload_cmd"] == ["true"]


@pytest.fixture
def backends() -> Iterator[dict[str, LoopbackServer]]:
    """Two HTTP servers answering "blue" and "green"."""
    servers = {name: LoopbackServer(always(Reply(200, name))).start() for name in ("blue", "green")}
    yield servers
    for s in servers.values():
        s.stop()


@pytest.fixture
def nginx(tmp_path: Path, backends: dict[str, LoopbackServer]) -> Iterator[NginxServer]:
    server = start_nginx(tmp_path, "web", backends["blue"].port)
    yield server
    stop_nginx(server)


def test_failed_validation_keeps_the_previous_weights(
    nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    before = nginx.upstream_file.read_bytes()
    (nginx.include_dir / "zz-broken.conf").write_text("this_is_not_a_directive on;\n")
    ctx: Any = FakeContext()
    weights = {backends["blue"].port: 50, backends["green"].port: 50}
    with pytest.raises(StepFailed) as info:
        asyncio.run(nginx.router().set_weights("web", weights, ctx))
    assert "failed to validate the configuration" in info.value.message
    assert nginx.upstream_file.read_bytes() == before
    assert shares(f"http://127.0.0.1:{nginx.port}/", 20) == {"blue": 100.0}


def test_a_hanging_nginx_test_is_a_step_failure_and_the_file_is_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``nginx -t`` that never returns is killed after its timeout: a clear failure."""
    import shipyard.plugins.nginx as nginx_plugin

    hanging = tmp_path / "nginx"
    hanging.write_text("#!/bin/sh\nexec sleep 60\n")
    hanging.chmod(0o755)
    include = tmp_path / "conf.d"
    include.mkdir()
    monkeypatch.setattr(nginx_plugin, "COMMAND_TIMEOUT", 0.3)
    router = sy.nginx(str(include), nginx=str(hanging))
    ctx: Any = FakeContext()
    started = time.monotonic()
    with pytest.raises(StepFailed) as info:
        asyncio.run(router.set_weights("web", {8001: 90, 8002: 10}, ctx))
    assert time.monotonic() - started < 10
    assert info.value.message.startswith(f"`{hanging} -t")
    assert "did not validate the configuration within 0.3s and was killed" in info.value.message
    assert "the previous upstream file was restored" in info.value.message
    assert list(include.iterdir()) == []  # there was none: none is left


def test_route_steps_in_a_plain_pipeline_split_the_traffic(
    nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    blue, green = backends["blue"].port, backends["green"].port
    url = f"http://127.0.0.1:{nginx.port}/"
    measured: list[dict[str, float]] = []

    def measure() -> None:
        measured.append(shares(url))

    router = nginx.router()
    steps = []
    for percent in (10, 50, 100):
        steps += [sy.route(router, "web", {blue: 100 - percent, green: percent}),
                  sy.python(measure, name=f"measure {percent}")]  # fmt: skip
    out = Target(service="web").run(*steps)
    assert out.status is Status.SUCCEEDED, out.error
    assert len(measured) == 3
    for got, percent in zip(measured, (10, 50, 100), strict=True):
        assert near(got, {"green": percent, "blue": 100 - percent}), (percent, got)
    assert f"traffic of web: {blue} 50%, {green} 50%" in out.text()
    assert nginx.upstream_file.read_text() == router.render("web", green)


def test_route_records_the_weights_in_the_history(
    shipyarder: Any, nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    from shipyard._store import open_store

    blue, green = backends["blue"].port, backends["green"].port
    shipyarder.makepipelines(f"""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            router = sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r},
                              pid_file={str(nginx.pid_file)!r})
            return [sy.stage("shift", sy.route(router, "web", {{{blue}: 75, {green}: 25}}))]
    """)
    result = shipyarder.run("deploy", "web", "1.0", "-e", "staging")
    assert result.exit_code == 0, result.output
    assert near(shares(f"http://127.0.0.1:{nginx.port}/"), {"blue": 75, "green": 25})
    store = open_store(str(shipyarder.history_path), create=False)
    try:
        dep_id = shipyarder.history[0]["id"]
        arts = {a["name"]: json.loads(a["content"]) for a in store.artifacts(dep_id)}
    finally:
        store.close()
    assert arts["route:web"] == {"service": "web", "state": "set",
                                 "weights": {str(blue): 75, str(green): 25},
                                 "settle": {str(blue): 75, str(green): 25}}  # fmt: skip
    assert arts["nginx:web"]["conf_path"] == str(nginx.include_dir)


def test_route_stages_with_approval_gates_between_them_are_a_canary_a_human_widens(
    shipyarder: Any, nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    blue, green = backends["blue"].port, backends["green"].port
    url = f"http://127.0.0.1:{nginx.port}/"
    shipyarder.makepipelines(f"""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            router = sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r},
                              pid_file={str(nginx.pid_file)!r})
            gate = dict(timeout="1h", allow_self_approval=True)
            return [
                sy.stage("10%", sy.route(router, "web", {{{blue}: 90, {green}: 10}})),
                sy.stage("widen to 50%", sy.approval(**gate)),
                sy.stage("50%", sy.route(router, "web", {{{blue}: 50, {green}: 50}})),
                sy.stage("widen to 100%", sy.approval(**gate)),
                sy.stage("100%", sy.route(router, "web", {{{blue}: 0, {green}: 100}})),
            ]
    """)
    first = shipyarder.run("deploy", "web", "2.0", "-e", "prod")
    assert first.exit_code == 4, first.output  # waiting at 10%, with the traffic split
    assert near(shares(url), {"blue": 90, "green": 10})
    second = shipyarder.run("approve", "1")
    assert second.exit_code == 4, second.output
    assert near(shares(url), {"blue": 50, "green": 50})
    third = shipyarder.run("approve", "1")
    assert third.exit_code == 0, third.output
    assert shares(url, 50) == {"green": 100.0}
    doc = shipyarder.run("show", "1", "--json").json()
    assert [s["status"] for s in doc["stages"]] == ["succeeded"] * 5


def test_weight_changes_under_load_fail_no_request(
    nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    blue, green = backends["blue"].port, backends["green"].port
    router = nginx.router()
    with Load(f"http://127.0.0.1:{nginx.port}/", threads=2) as load:
        for percent in (10, 30, 50, 70, 90, 100, 50, 0):
            out = Target(service="web").run(sy.route(router, "web", {blue: 100 - percent,
                                                                      green: percent}))  # fmt: skip
            assert out.status is Status.SUCCEEDED, out.error
        done = time.monotonic()
        wait_for(lambda: load.results and load.results[-1][0] > done + 0.2, 5, "more requests")
    assert len(load.results) > 200
    assert load.failures({"blue", "green"}) == []
    assert load.bodies_after(done) == {"blue"}


# -- canaries of docker.service (real engine) -----------------------------------------------------


@pytest.fixture
def web_nginx(tmp_path: Path, target: Target) -> Iterator[NginxServer]:
    slots = free_ports(2)
    server = start_nginx(tmp_path, target.service, slots[0])
    server.slots = slots  # type: ignore[attr-defined]
    yield server
    stop_nginx(server)


def service(target: Target, nginx: NginxServer, image: str, **kwargs: Any) -> Any:
    return sy.docker.service(
        target.service, image=f"{WEB}:{image}", slots=nginx.slots,  # type: ignore[attr-defined]
        router=nginx.router(), labels=target.labels, drain=0.3, stop_timeout=2,
        health_check=sy.health_check("/healthz", timeout=10, interval=0.2), **kwargs,
    )  # fmt: skip


def running(client: Any, target: Target) -> list[str]:
    return sorted(
        c.name
        for c in test_containers(client, **{"shipyard.pipeline": target.pipeline})
        if c.status == "running" and c.labels.get("shipyard.service") == target.service
    )


@pytest.mark.docker
def test_canary_moves_the_measured_share_step_by_step(
    docker_engine: Any, target: Target, web_nginx: NginxServer
) -> None:
    S, url = target.service, f"http://127.0.0.1:{web_nginx.port}/"
    assert target.run(service(target, web_nginx, "v1"), version="v1").status is Status.SUCCEEDED
    measured: list[dict[str, float]] = []

    def share_of_v2() -> float:
        measured.append(shares(url))
        return measured[-1].get("version v2", 0.0)

    check = sy.analysis(sy.metric("share", sy.python_metric(share_of_v2),
                                  success=sy.between(0, 100), interval=0.1, count=1))  # fmt: skip
    step = service(target, web_nginx, "v2", strategy=sy.canary(steps=[10, 50, 100], analysis=check))
    out = target.run(step, version="v2")
    assert out.status is Status.SUCCEEDED, out.error
    assert len(measured) == 2
    assert near(measured[0], {"version v2": 10, "version v1": 90}), measured[0]
    assert near(measured[1], {"version v2": 50, "version v1": 50}), measured[1]
    assert shares(url) == {"version v2": 100.0}
    assert running(docker_engine, target) == [f"{S}-v2"]
    text = out.text()
    for percent in (10, 50, 100):
        assert f"canary step reached: {percent}% of {S} on {S}-v2" in text
    reached = [e for e in out.events if e["event"] == "canary_step_reached"]
    old_port, new_port = web_nginx.slots  # type: ignore[attr-defined]
    assert [(e["percent"], e["new"], e["old"], e["weights"]) for e in reached] == [
        (p, f"{S}-v2", f"{S}-v1", {str(old_port): 100 - p, str(new_port): p}) for p in (10, 50, 100)
    ]
    assert text.index("canary step reached: 100%") < text.index(f"stopped and removed {S}-v1")
    new_port = web_nginx.slots[1]  # type: ignore[attr-defined]
    assert web_nginx.upstream_file.read_text() == web_nginx.router().render(S, new_port)


@pytest.mark.docker
def test_failing_analysis_at_50_puts_all_traffic_back_without_failed_requests(
    docker_engine: Any, target: Target, web_nginx: NginxServer
) -> None:
    S, url = target.service, f"http://127.0.0.1:{web_nginx.port}/"
    assert target.run(service(target, web_nginx, "v1"), version="v1").status is Status.SUCCEEDED
    calls: list[float] = []

    def errors() -> float:  # healthy at 10%, failing at 50%
        calls.append(time.monotonic())
        return 0.0 if len(calls) == 1 else 0.9

    check = sy.analysis(sy.metric("errors", sy.python_metric(errors), failure=sy.above(0.05),
                                  interval=0.1, count=1))  # fmt: skip
    step = service(target, web_nginx, "v2", strategy=sy.canary(steps=[10, 50, 100], analysis=check))
    with Load(url) as load:
        out = target.run(step, version="v2")
        finished = time.monotonic()
        wait_for(lambda: load.results[-1][0] > finished + 0.3, 5, "requests after the canary")
    assert out.status is Status.FAILED
    err = out.result.error
    assert err.startswith("canary stopped at 50%: analysis failed: errors failed")
    assert f"all traffic is back on {S}-v1" in err
    assert f"removed {S}-v2; {S}-v1 keeps serving" in err
    assert load.failures({"version v1", "version v2"}) == []
    assert "version v2" in {a[1] for _, a in load.results}  # the canary did serve
    assert load.bodies_after(finished) == {"version v1"}
    assert running(docker_engine, target) == [f"{S}-v1"]
    old_port = web_nginx.slots[0]  # type: ignore[attr-defined]
    assert web_nginx.upstream_file.read_text() == web_nginx.router().render(S, old_port)
    assert shares(url, 50) == {"version v1": 100.0}


@pytest.mark.docker
def test_a_canary_that_cannot_put_the_traffic_back_keeps_both_versions(
    docker_engine: Any, target: Target, web_nginx: NginxServer
) -> None:
    S, url = target.service, f"http://127.0.0.1:{web_nginx.port}/"
    assert target.run(service(target, web_nginx, "v1"), version="v1").status is Status.SUCCEEDED

    def errors() -> float:  # fails, and breaks nginx's configuration meanwhile
        (web_nginx.include_dir / "zz-broken.conf").write_text("this_is_not_a_directive on;\n")
        return 1.0

    check = sy.analysis(sy.metric("errors", sy.python_metric(errors), failure=sy.above(0.5),
                                  interval=0.1, count=1))  # fmt: skip
    out = target.run(service(target, web_nginx, "v2", strategy=sy.canary(analysis=check)),
                     version="v2")  # fmt: skip
    assert out.status is Status.FAILED
    err = out.result.error
    assert err.startswith("canary stopped at 10%: analysis failed: errors failed")
    assert f"the traffic could NOT be put back on {S}-v1" in err
    assert f"{S}-v2 and {S}-v1 were both left running, since either may get traffic" in err
    # The history tells the truth: nginx still runs the 10% split, so both must keep serving.
    assert running(docker_engine, target) == [f"{S}-v1", f"{S}-v2"]
    assert near(shares(url), {"version v1": 90, "version v2": 10})


def test_a_route_step_that_nginx_refuses_fails_and_changes_nothing(
    nginx: NginxServer, backends: dict[str, LoopbackServer]
) -> None:
    blue, green = backends["blue"].port, backends["green"].port
    (nginx.include_dir / "zz-broken.conf").write_text("this_is_not_a_directive on;\n")
    out = Target(service="web").run(sy.route(nginx.router(), "web", {blue: 50, green: 50}))
    assert out.status is Status.FAILED
    assert out.result.error.startswith(
        f"router nginx({nginx.include_dir}) could not split web as {blue} 50%, {green} 50%: "
    )
    assert "failed to validate the configuration" in out.result.error
    assert shares(f"http://127.0.0.1:{nginx.port}/", 20) == {"blue": 100.0}


@pytest.mark.docker
@pytest.mark.xdist_group("prometheus")
def test_canary_with_a_real_prometheus_analysis(
    docker_engine: Any,
    target: Target,
    web_nginx: NginxServer,
    prometheus_server: Any,  # noqa: F811 - the session fixture
) -> None:
    S, url = target.service, f"http://127.0.0.1:{web_nginx.port}/"
    assert target.run(service(target, web_nginx, "v1"), version="v1").status is Status.SUCCEEDED

    def canary() -> Any:
        query = 'shipyard_test_errors{version="$DEPLOYMENT_VERSION"}'
        check = sy.analysis(sy.metric("errors", sy.prometheus(prometheus_server.url, query),
                                      failure=sy.above(0.1), interval=0.2, count=2))  # fmt: skip
        return service(target, web_nginx, "v2", strategy=sy.canary(steps=[20, 100],
                                                                   analysis=check))  # fmt: skip

    # Prometheus says version "bad" errs 50% of the time: back to v1 at the first step.
    out = target.run(canary(), version="bad")
    assert out.status is Status.FAILED
    assert out.result.error.startswith("canary stopped at 20%: analysis failed: errors failed")
    assert running(docker_engine, target) == [f"{S}-v1"]
    assert shares(url, 50) == {"version v1": 100.0}
    # Version "good" errs 1%: the canary goes to 100%.
    out = target.run(canary(), version="good")
    assert out.status is Status.SUCCEEDED, out.error
    assert running(docker_engine, target) == [f"{S}-good"]
    assert shares(url, 50) == {"version v2": 100.0}


# -- kill -9 mid-canary, repair, rollback ----------------------------------------------------------

SHIPYARD_EXE = Path(sys.executable).parent / "shipyard"


class Project:
    """A project whose commands run as real ``shipyard`` processes (to be killed with -9)."""

    def __init__(self, tmp_path: Path, target: Target, nginx: NginxServer) -> None:
        self.root = tmp_path / "project"
        self.root.mkdir()
        slots = nginx.slots  # type: ignore[attr-defined]
        router = (
            f"sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r}, "
            f"pid_file={str(nginx.pid_file)!r})"
        )
        (self.root / "pipelines.py").write_text(textwrap.dedent(f"""
            import shipyard as sy

            @sy.pipeline(name={target.pipeline!r})
            def web(d):
                return [sy.stage("release", sy.docker.service(
                    {target.service!r}, image=f"{WEB}:{{d.version.split('-')[0]}}",
                    slots={slots!r}, labels={target.labels!r}, router={router},
                    health_check=sy.health_check("/healthz", timeout=30, interval=0.2),
                    drain=0.2, stop_timeout=2,
                    strategy=sy.canary(steps=[10, 50, 100],
                                       pause=float(d.vars.get("pause", "0")))))]
            """))  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}

    def argv(self, *args: str) -> list[str]:
        return [str(SHIPYARD_EXE), "--history", str(self.root / "h.db"), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.mark.docker
def test_kill_9_mid_canary_then_repair_leaves_the_old_version_serving(
    docker_engine: Any, target: Target, web_nginx: NginxServer, tmp_path: Path
) -> None:
    S, P = target.service, target.pipeline
    url = f"http://127.0.0.1:{web_nginx.port}/"
    p = Project(tmp_path, target, web_nginx)
    first = p.run("deploy", P, "v1", "-e", "staging")
    assert first.returncode == 0, first.stdout + first.stderr
    cli = subprocess.Popen(p.argv("deploy", P, "v2", "-e", "staging", "--var", "pause=5"),
                           cwd=p.root, env=p.env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: "canary step reached: 50%" in p.run("logs", "2").stdout, 60,
                 "the canary at 50%")  # fmt: skip
    finally:
        cli.kill()
        cli.wait(10)
    assert near(shares(url), {"version v1": 50, "version v2": 50})  # killed: both serve
    status = p.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert (f"repair of #2: removed {S}-v2: the canary of {S} never reached 100%; {S}-v1 "
            "serves all of it again") in status.stderr  # fmt: skip
    old_port = web_nginx.slots[0]  # type: ignore[attr-defined]
    assert f"repair of #2: nginx sends {S} to 127.0.0.1:{old_port} 100%" in status.stderr
    assert shares(url, 50) == {"version v1": 100.0}
    assert running(docker_engine, target) == [f"{S}-v1"]
    assert web_nginx.upstream_file.read_text() == web_nginx.router().render(S, old_port)
    assert f"repair of #2: removed {S}-v2" in p.run("logs", "2").stdout

    # The next deployment's canary runs normally, and a rollback moves all traffic at once.
    again = p.run("deploy", P, "v2", "-e", "staging")
    assert again.returncode == 0, again.stdout + again.stderr
    assert shares(url, 50) == {"version v2": 100.0}
    back = p.run("rollback", P, "-e", "staging")
    assert back.returncode == 0, back.stdout + back.stderr
    assert shares(url, 50) == {"version v1": 100.0}
    assert running(docker_engine, target) == [f"{S}-v1"]
    logs = p.run("logs", "4").stdout
    assert "canary: a rollback moves all traffic at once" in logs
    assert "canary step reached: 10%" not in logs


def test_kill_9_during_a_route_change_then_repair_restores_the_weights_it_started_from(
    nginx: NginxServer, backends: dict[str, LoopbackServer], tmp_path: Path
) -> None:
    blue, green = backends["blue"].port, backends["green"].port
    url = f"http://127.0.0.1:{nginx.port}/"
    root = tmp_path / "project"
    root.mkdir()
    hold = tmp_path / "hold-the-reload"
    hold.touch()
    # The reload waits while `hold` exists: shipyard is killed between writing the new upstream
    # and nginx running it (the window a repair must close).
    reload = ["sh", "-c", f'while [ -e "{hold}" ]; do sleep 0.05; done; exec "$0" "$@"',
              NGINX, *nginx.args, "-s", "reload"]  # fmt: skip
    (root / "pipelines.py").write_text(textwrap.dedent(f"""
        import shipyard as sy

        @sy.pipeline
        def web(d):
            router = sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r},
                              pid_file={str(nginx.pid_file)!r}, reload_cmd={reload!r})
            return [sy.stage("shift", sy.route(router, "web", {{{blue}: 20, {green}: 80}}))]
        """))  # fmt: skip
    before = nginx.upstream_file.read_text()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}
    argv = [str(SHIPYARD_EXE), "--history", str(root / "h.db")]
    cli = subprocess.Popen([*argv, "deploy", "web", "1.0", "-e", "staging"], cwd=root, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(lambda: "weight=80" in nginx.upstream_file.read_text(), 30, "the new upstream")
    finally:
        cli.kill()
        cli.wait(10)
    hold.unlink()  # the orphaned reload may run now; the repair settles either way
    status = subprocess.run([*argv, "status"], cwd=root, env=env, capture_output=True,
                            text=True, timeout=60)  # fmt: skip
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"repair of #1: nginx sends web to 127.0.0.1:{blue} 100% again" in status.stderr
    assert nginx.upstream_file.read_text() == before
    assert shares(url, 50) == {"blue": 100.0}
