"""``docker.run`` and ``docker.service`` against a real Docker engine (and a real nginx).

Tests marked ``docker`` need the engine that ``.ci/docker-up.sh`` starts; see docker_fixtures.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import shipyard as sy
from docker_fixtures import BUSYBOX
from docker_fixtures import NGINX
from docker_fixtures import WEB
from docker_fixtures import Load as Traffic
from docker_fixtures import NginxServer
from docker_fixtures import Target
from docker_fixtures import docker_engine_fixture  # noqa: F401 - the fixture docker_engine
from docker_fixtures import docker_session_fixture  # noqa: F401 - used by docker_engine
from docker_fixtures import free_port
from docker_fixtures import free_ports
from docker_fixtures import http_get
from docker_fixtures import start_nginx
from docker_fixtures import stop_nginx
from docker_fixtures import target_fixture  # noqa: F401 - the fixture target
from docker_fixtures import test_containers
from shipyard import PipelineDefinitionError
from shipyard import Status


def run_step(target: Target, image: str, command: Any = None, **kwargs: Any) -> Any:
    return target.run(sy.docker.run(image, command, labels=target.labels, **kwargs))


def ours(client: Any, target: Target) -> list[Any]:
    return test_containers(client, **{"shipyard.pipeline": target.pipeline})


# -- docker.run -----------------------------------------------------------------------------------


@pytest.mark.docker
def test_run_success_streams_output_and_removes_the_container(
    docker_engine: Any, target: Target, tmp_path: Path
) -> None:
    (tmp_path / "in.txt").write_text("from the host\n")
    out = target.run(
        sy.docker.run(
            BUSYBOX,
            ["sh", "-c", 'echo "v=$DEPLOYMENT_VERSION e=$DEPLOYMENT_ENVIRONMENT '
             'p=$DEPLOYMENT_PIPELINE s=$DEPLOYMENT_STAGE x=$EXTRA"; cat in.txt; '
             "echo to-stderr >&2"],
            env={"EXTRA": 42},
            volumes={str(tmp_path): "/data:ro"},
            workdir="/data",
            labels=target.labels,
        ),
        sy.docker.run(BUSYBOX, ["id", "-u"], user="1234", labels=target.labels),
        version="v9",
    )  # fmt: skip
    assert out.status is Status.SUCCEEDED, out.error
    assert [r.exit_code for r in out.results] == [0, 0]
    stdout = [t for s, t in out.lines if s == "stdout"]
    assert f"v=v9 e=staging p={target.pipeline} s=deploy x=42" in stdout
    assert "from the host" in stdout
    assert "1234" in stdout
    assert "to-stderr" in stdout
    # The container's name is recorded, and the container is gone.
    assert any(s == "shipyard" and "container shipyard-run-" in t for s, t in out.lines)
    assert ours(docker_engine, target) == []


@pytest.mark.docker
def test_run_secret_reaches_the_container_but_is_masked(docker_engine: Any, target: Target) -> None:
    out = target.run(
        sy.docker.run(
            BUSYBOX,
            ["sh", "-c", 'echo "token=$TOKEN"; echo "length=${#TOKEN}"'],
            env={"TOKEN": sy.secret("SHIPYARD_TEST_TOKEN")},
            labels=target.labels,
        ),
        secret_values={"SHIPYARD_TEST_TOKEN": "hunter2-very-secret"},
    )
    assert out.status is Status.SUCCEEDED, out.error
    assert "token=***" in out.text()
    assert "length=19" in out.text()  # the real value reached the container
    assert "hunter2" not in out.text()


@pytest.mark.docker
def test_run_failure_reports_exit_code_and_output_tail(docker_engine: Any, target: Target) -> None:
    script = "for i in $(seq 1 30); do echo line $i; done; exit 3"
    out = run_step(target, BUSYBOX, ["sh", "-c", script])
    assert out.status is Status.FAILED
    r = out.result
    assert r.exit_code == 3
    assert "exited with 3" in r.error
    assert "line 30" in r.error
    assert "line 1\n" not in r.error + "\n"  # only the tail
    assert r.output_tail[-1] == "line 30"
    assert len(r.output_tail) <= 20
    assert ours(docker_engine, target) == []


@pytest.mark.docker
def test_run_timeout_stops_and_removes_the_container(docker_engine: Any, target: Target) -> None:
    out = run_step(target, BUSYBOX, ["sleep", "60"], timeout=1)
    assert out.status is Status.FAILED
    assert "timed out after 1s" in out.result.error
    assert out.seconds < 10
    assert ours(docker_engine, target) == []


@pytest.mark.docker
def test_run_cancel_stops_and_removes_the_container(docker_engine: Any, target: Target) -> None:
    async def scenario() -> Any:
        task = asyncio.ensure_future(
            target.arun(sy.docker.run(BUSYBOX, ["sleep", "60"], labels=target.labels))
        )
        deadline = time.monotonic() + 20
        while not await asyncio.to_thread(
            lambda: [c for c in ours(docker_engine, target) if c.status == "running"]
        ):
            assert time.monotonic() < deadline, "the container never started"
            assert not task.done(), task.result()
            await asyncio.sleep(0.05)
        started = time.monotonic()
        task.cancel()  # like Ctrl-C: the runner records the step and deployment cancelled
        out = await task
        return out, time.monotonic() - started

    out, took = asyncio.run(scenario())
    assert out.status is Status.CANCELLED
    assert out.result.status is Status.CANCELLED
    assert took < 10
    assert "stopped and removed container" in out.text()
    assert ours(docker_engine, target) == []


class Lines:
    """Where a log follower delivers its lines (the part of a step context it uses)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log_lines(self, lines: list[str], stream: str) -> None:
        self.lines.extend(lines)


@pytest.mark.docker
@pytest.mark.parametrize("when", ["while reading", "before its stream opened"])
def test_log_follower_releases_its_socket_when_closed(
    docker_engine: Any, target: Target, when: str
) -> None:
    """Closing a follower frees the engine socket at once, not when the collector finds it.

    The SDK's stream close marks the socket closed, but while the response's file is open the
    descriptor stays open; left to the garbage collector, it surfaced as a ResourceWarning in
    whichever test happened to be running.
    """
    from shipyard.plugins.docker._engine import Engine
    from shipyard.plugins.docker._logs import LogPump

    class Watched(LogPump):
        def open(self) -> Any:
            handle, chunks = super().open()
            self.sock = handle._response.raw._fp.fp.raw._sock
            return handle, chunks

    container = docker_engine.containers.run(
        BUSYBOX, ["sh", "-c", "echo started; sleep 60"], detach=True, labels=target.labels
    )

    async def scenario() -> Watched:
        engine = await Engine.connect()
        pump = Watched(engine, container.id, Lines(), "web")  # type: ignore[arg-type]
        try:
            if when == "before its stream opened":
                pump.close()
            pump.start()
            deadline = time.monotonic() + 20
            while when == "while reading" and not pump.context.lines:  # type: ignore[attr-defined]
                assert time.monotonic() < deadline, "no output arrived"
                await asyncio.sleep(0.02)
            pump.close()
            await pump.wait(timeout=10)
            return pump
        finally:
            engine.close()

    try:
        pump = asyncio.run(scenario())
    finally:
        container.remove(force=True)
    if when == "while reading":
        assert pump.context.lines == ["started"]  # type: ignore[attr-defined]
    assert pump.sock.fileno() == -1, "the stream's socket is still open"


@pytest.mark.docker
def test_run_missing_image_with_pull_never_names_the_image(
    docker_engine: Any, target: Target
) -> None:
    out = run_step(target, "shipyard-test/nope:1", ["true"], pull="never")
    assert out.status is Status.FAILED
    err = out.result.error
    assert "image 'shipyard-test/nope:1' is not on the Docker engine" in err
    assert "pull='never'" in err
    assert "Traceback" not in err


@pytest.mark.docker
@pytest.mark.parametrize(
    ("image", "pull"),
    [("shipyard-test/nope:1", "missing"), (BUSYBOX, "always")],
    ids=["missing-image-pull-missing", "present-image-pull-always"],
)
def test_run_pull_without_registry_fails_clearly(
    docker_engine: Any, target: Target, image: str, pull: str
) -> None:
    out = run_step(target, image, ["true"], pull=pull)
    assert out.status is Status.FAILED
    err = out.result.error
    assert f"image {image!r} is not on the Docker engine" in err
    assert "pulling it failed" in err
    assert "Traceback" not in err
    assert out.seconds < 30
    assert ours(docker_engine, target) == []


@pytest.mark.parametrize("kind", ["run", "service"])
def test_unreachable_engine_is_one_clear_sentence(
    target: Target, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    pytest.importorskip("docker")
    port = free_port()  # nothing listens there
    monkeypatch.setenv("DOCKER_HOST", f"tcp://127.0.0.1:{port}")
    step = (
        sy.docker.run(BUSYBOX, ["true"])
        if kind == "run"
        else sy.docker.service("web", image=f"{WEB}:v1")
    )
    out = target.run(step)
    assert out.status is Status.FAILED
    err = out.result.error
    assert err.startswith(
        f"cannot reach the Docker engine at tcp://127.0.0.1:{port} (from DOCKER_HOST): "
        "connection refused; "
    )
    assert "set DOCKER_HOST" in err
    assert "\n" not in err
    assert "Traceback" not in err


def test_unreachable_default_socket_names_it(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("docker")
    from shipyard.plugins import docker as plugin
    from shipyard.plugins.docker import _engine  # where engine_address() reads DEFAULT_ENGINE

    monkeypatch.delenv("DOCKER_HOST", raising=False)
    monkeypatch.setattr(_engine, "DEFAULT_ENGINE", "unix:///nonexistent/docker.sock")
    assert plugin.engine_address() == (
        "unix:///nonexistent/docker.sock",
        "the default socket; DOCKER_HOST is not set",
    )
    assert plugin.engine_address({"DOCKER_HOST": "ssh://deploy@web1"}) == (
        "ssh://deploy@web1",
        "from DOCKER_HOST",
    )
    assert plugin.engine_hostname("ssh://deploy@web1:2222") == "web1"
    assert plugin.engine_hostname("tcp://10.0.0.5:2376") == "10.0.0.5"
    assert plugin.engine_hostname("unix:///var/run/docker.sock") == "127.0.0.1"


def test_plan_imports_no_docker_and_touches_no_engine(tmp_path: Path) -> None:
    (tmp_path / "pipelines.py").write_text(
        textwrap.dedent(
            """
            import shipyard as sy

            @sy.pipeline
            def web(d):
                return [sy.stage("release",
                    sy.docker.run("migrate:1", ["up"], env={"TOKEN": sy.secret("TOK")}),
                    sy.docker.service("web", image=f"web:{d.version}", health_check="/healthz",
                                      router=sy.nginx("/etc/nginx/shipyard")))]
            """
        )
    )
    code = (
        "import sys\n"
        "from shipyard._cli import main\n"
        "sys.argv = ['shipyard', 'plan', 'web', 'v7', '-e', 'prod']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('docker', 'requests'))\n"
        "print('HEAVY', heavy)\n"
    )
    env = {**os.environ, "DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"}
    env.pop("SHIPYARD_PLUGINS", None)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert "docker run migrate:1 up  (network=none; pull=missing; env=TOKEN=***)" in proc.stdout
    assert "start web:v7 as web-<version>" in proc.stdout
    assert "check GET http://127.0.0.1:<slot>/healthz" in proc.stdout
    assert "switch router nginx(/etc/nginx/shipyard)" in proc.stdout


def test_facade_module_imports_no_docker_sdk() -> None:
    code = "import sys, shipyard as sy; sy.docker.run; sy.nginx; print('docker' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: sy.docker.run(""), "image must be an image reference"),
        (lambda: sy.docker.run("a", pull="sometimes"), "pull must be 'missing', 'always' or"),
        (lambda: sy.docker.run("a", enviroment={}), "unknown option 'enviroment'"),
        (lambda: sy.docker.run("a", workdir="rel"), "workdir must be an absolute path"),
        (lambda: sy.docker.run("a", volumes=["nocolon"]), "must read 'HOST:CONTAINER[:MODE]'"),
        (lambda: sy.docker.service("a b", image="x"), "the service name must be"),
        (lambda: sy.docker.service("a", image="x", slots=(1, 1)), "two different TCP ports"),
        (lambda: sy.docker.service("a", image="x", health_check=3), "health_check must be"),
        (lambda: sy.docker.service("a", image="x", drain=-1), "drain must be"),
        (lambda: sy.docker.service("a", image="x", heath_check="/"), "did you mean 'health_check'"),
    ],
    ids=[
        "empty-image", "bad-pull", "typo", "relative-workdir", "bad-volume", "bad-service-name",
        "same-slots", "bad-health-check", "negative-drain", "typo-health-check",
    ],
)  # fmt: skip
def test_definition_errors(build: Any, message: str) -> None:
    with pytest.raises(PipelineDefinitionError, match=None) as info:
        build()
    assert message in str(info.value)


def test_service_name_keyword_names_the_service() -> None:
    step = sy.docker.service(name="web", image="web:1")
    assert step.service == "web"
    assert step.name == "docker service web"
    step = sy.docker.service("web", image="web:1", name="release web")
    assert (step.service, step.name) == ("web", "release web")


# -- docker.service -------------------------------------------------------------------------------


def service(
    target: Target,
    nginx: NginxServer | None,
    version: str,
    slots: list[int],
    **kwargs: Any,
) -> Any:
    kwargs.setdefault("health_check", sy.health_check("/healthz", timeout=5, interval=0.2))
    return sy.docker.service(
        target.service,
        image=f"{WEB}:{version}",
        slots=slots,
        router=nginx.router() if nginx is not None else None,
        labels=target.labels,
        drain=0.3,
        stop_timeout=2,
        **kwargs,
    )


def running_services(
    client: Any, target: Target, environment: str = "staging"
) -> dict[str, dict[str, str]]:
    """The running containers of the test's service, pipeline and environment."""
    return {
        c.name: c.labels
        for c in ours(client, target)
        if c.status == "running"
        and c.labels.get("shipyard.service") == target.service
        and c.labels.get("shipyard.environment") == environment
    }


@pytest.fixture
def nginx(tmp_path: Path, target: Target) -> Any:
    slots = free_ports(2)
    server = start_nginx(tmp_path, target.service, slots[0])
    server.slots = slots  # type: ignore[attr-defined]
    yield server
    stop_nginx(server)


@pytest.mark.docker
def test_service_first_deploy_without_router(docker_engine: Any, target: Target) -> None:
    S = target.service
    slots = free_ports(2)
    out = target.run(service(target, None, "v1", slots), version="v1")
    assert out.status is Status.SUCCEEDED, out.error
    running = running_services(docker_engine, target)
    assert list(running) == [f"{S}-v1"]
    labels = running[f"{S}-v1"]
    assert labels["shipyard.pipeline"] == target.pipeline
    assert labels["shipyard.environment"] == "staging"
    assert labels["shipyard.version"] == "v1"
    assert labels["shipyard.deployment"] == str(target.next_id)
    assert labels["shipyard.port"] == str(slots[0])
    c = docker_engine.containers.get(f"{S}-v1")
    assert c.attrs["HostConfig"]["NetworkMode"] == "host"
    assert f"PORT={slots[0]}" in c.attrs["Config"]["Env"]
    assert http_get(f"http://127.0.0.1:{slots[0]}/") == (200, "version v1")
    # The slot and the container name are recorded in the output (and so in the history).
    assert f"starting {S}-v1 from {WEB}:v1 on 127.0.0.1:{slots[0]}" in out.text()


@pytest.mark.docker
def test_service_without_router_replaces_in_place(docker_engine: Any, target: Target) -> None:
    S = target.service
    slots = free_ports(2)
    assert target.run(service(target, None, "v1", slots), version="v1").status is Status.SUCCEEDED
    out = target.run(service(target, None, "v2", slots), version="v2")
    assert out.status is Status.SUCCEEDED, out.error
    assert f"no router: stopping {S}-v1 first" in out.text()
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]
    assert http_get(f"http://127.0.0.1:{slots[0]}/") == (200, "version v2")
    # A failing new version brings the old one back.
    out = target.run(
        service(target, None, "broken", slots, health_check=sy.health_check("/healthz", timeout=1)),
        version="v3",
    )
    assert out.status is Status.FAILED
    assert f"{S}-v2 was restarted" in out.result.error
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]
    assert http_get(f"http://127.0.0.1:{slots[0]}/") == (200, "version v2")
    # A missing image is found out before the old version is stopped.
    started = docker_engine.containers.get(f"{S}-v2").attrs["State"]["StartedAt"]
    missing = sy.docker.service(
        S, image="shipyard-test/nope:1", slots=slots, pull="never", labels=target.labels
    )
    out = target.run(missing, version="v4")
    assert out.status is Status.FAILED
    assert "image 'shipyard-test/nope:1' is not on the Docker engine" in out.result.error
    assert "stopping" not in out.text()
    assert docker_engine.containers.get(f"{S}-v2").attrs["State"]["StartedAt"] == started


@pytest.mark.docker
def test_service_blue_green_behind_nginx(
    docker_engine: Any, target: Target, nginx: NginxServer
) -> None:
    S = target.service
    slots: list[int] = nginx.slots  # type: ignore[attr-defined]
    out = target.run(service(target, nginx, "v1", slots), version="v1")
    assert out.status is Status.SUCCEEDED, out.error
    assert nginx.get() == (200, "version v1")

    # v1 -> v2 while requests flow through nginx the whole time.
    with Traffic(f"http://127.0.0.1:{nginx.port}/") as traffic:
        time.sleep(0.3)
        out = target.run(service(target, nginx, "v2", slots), version="v2")
        switched = time.monotonic()
        time.sleep(0.5)
    assert out.status is Status.SUCCEEDED, out.error
    assert len(traffic.results) > 50
    assert traffic.failures() == []
    assert traffic.after(switched) == {(200, "version v2")}
    assert {a for _, a in traffic.results[:5]} == {(200, "version v1")}
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]
    assert running_services(docker_engine, target)[f"{S}-v2"]["shipyard.port"] == str(slots[1])
    assert f"server 127.0.0.1:{slots[1]};" in nginx.upstream_file.read_text()
    text = out.text()
    assert text.index(f"{S}-v2 is healthy") < text.index(f"nginx: shipyard_{S} ->")
    assert text.index(f"nginx: shipyard_{S} ->") < text.index(f"stopped and removed {S}-v1")


@pytest.mark.docker
def test_service_failing_health_check_keeps_old_serving(
    docker_engine: Any, target: Target, nginx: NginxServer
) -> None:
    S = target.service
    slots: list[int] = nginx.slots  # type: ignore[attr-defined]
    assert target.run(service(target, nginx, "v1", slots), version="v1").status is Status.SUCCEEDED
    before = nginx.upstream_file.read_bytes(), nginx.upstream_file.stat().st_mtime_ns
    with Traffic(f"http://127.0.0.1:{nginx.port}/") as traffic:
        out = target.run(
            service(
                target, nginx, "broken", slots, health_check=sy.health_check("/healthz", timeout=2)
            ),
            version="v2",
        )
    assert out.status is Status.FAILED
    err = out.result.error
    assert err.startswith(f"{S}-v2 did not become healthy: GET http://127.0.0.1:")
    assert "connection refused" in err
    assert f"removed {S}-v2; the router was not touched; {S}-v1 keeps serving" in err
    assert (nginx.upstream_file.read_bytes(), nginx.upstream_file.stat().st_mtime_ns) == before
    assert "reload" not in out.text()
    assert traffic.failures() == []
    assert {a for _, a in traffic.results} == {(200, "version v1")}
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]
    assert nginx.get() == (200, "version v1")


@pytest.mark.docker
def test_service_timeout_removes_the_new_container_and_keeps_the_old(
    docker_engine: Any, target: Target, nginx: NginxServer
) -> None:
    S = target.service
    slots: list[int] = nginx.slots  # type: ignore[attr-defined]
    assert target.run(service(target, nginx, "v1", slots), version="v1").status is Status.SUCCEEDED
    slow_check = sy.health_check("/healthz", timeout=30)
    out = target.run(
        service(target, nginx, "broken", slots, health_check=slow_check, timeout=1),
        version="v2",
    )
    assert out.status is Status.FAILED
    assert out.result.error == "timed out after 1s"
    assert out.seconds < 10
    assert f"removed {S}-v2" in out.text()
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]
    assert [c.name for c in ours(docker_engine, target)] == [f"{S}-v1"]
    assert nginx.get() == (200, "version v1")


@pytest.mark.docker
def test_service_container_that_exits_fails_fast_with_its_output(
    docker_engine: Any, target: Target
) -> None:
    S = target.service
    slots = free_ports(2)
    out = target.run(
        service(
            target, None, "v1", slots, command=["sh", "-c", "echo starting up; echo boom >&2; exit 4"],
            restart="no", health_check=sy.health_check("/healthz", timeout=30),
        ),
        version="v1",
    )  # fmt: skip
    assert out.status is Status.FAILED
    err = out.result.error
    assert f"{S}-v1 exited with 4 during its health check" in err
    assert "boom" in err
    assert "starting up" in err
    assert out.seconds < 15  # it did not wait for the 30 s health check deadline
    assert running_services(docker_engine, target) == {}


@pytest.mark.docker
def test_service_docker_healthcheck(docker_engine: Any, target: Target, nginx: NginxServer) -> None:
    S = target.service
    slots: list[int] = nginx.slots  # type: ignore[attr-defined]

    def check(port_var: str = "$PORT") -> dict[str, Any]:
        return {
            "test": f"wget -q -O /dev/null http://127.0.0.1:{port_var}/healthz",
            "interval": 0.2,
            "retries": 2,
        }

    out = target.run(service(target, nginx, "v1", slots, health_check=check()), version="v1")
    assert out.status is Status.SUCCEEDED, out.error
    assert f"{S}-v1 is healthy (Docker health check)" in out.text()
    out = target.run(service(target, nginx, "broken", slots, health_check=check()), version="v2")
    assert out.status is Status.FAILED
    assert f"{S}-v2 is unhealthy" in out.result.error
    assert "last health check output:" in out.result.error
    assert nginx.get() == (200, "version v1")


@pytest.mark.docker
def test_service_bad_router_config_is_restored(
    docker_engine: Any, target: Target, nginx: NginxServer
) -> None:
    S = target.service
    slots: list[int] = nginx.slots  # type: ignore[attr-defined]
    assert target.run(service(target, nginx, "v1", slots), version="v1").status is Status.SUCCEEDED
    before = nginx.upstream_file.read_bytes()
    # Someone broke the nginx configuration: `nginx -t` fails, nothing may be reloaded.
    (nginx.include_dir / "zz-broken.conf").write_text("this_is_not_a_directive on;\n")
    out = target.run(service(target, nginx, "v2", slots), version="v2")
    assert out.status is Status.FAILED
    err = out.result.error
    assert err.startswith("router nginx(")
    assert "failed to validate the configuration" in err
    assert "this_is_not_a_directive" in err
    assert f"removed {S}-v2; {S}-v1 keeps serving" in err
    assert nginx.upstream_file.read_bytes() == before
    assert [p.name for p in nginx.include_dir.iterdir() if p.name.startswith(".")] == []
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]
    assert nginx.get() == (200, "version v1")
    # Once the configuration is fixed, the same deployment goes through.
    (nginx.include_dir / "zz-broken.conf").unlink()
    out = target.run(service(target, nginx, "v2", slots), version="v2")
    assert out.status is Status.SUCCEEDED, out.error
    assert nginx.get() == (200, "version v2")


@pytest.mark.docker
def test_service_never_touches_other_pipelines_or_names(docker_engine: Any, target: Target) -> None:
    S = target.service
    slots = free_ports(2)
    others = [
        # Same service name, another pipeline; another service name, same pipeline.
        {"shipyard.service": S, "shipyard.pipeline": "someone-else",
         "shipyard.environment": "staging"},
        {"shipyard.service": "api", "shipyard.pipeline": target.pipeline,
         "shipyard.environment": "staging"},
        {"shipyard.service": S, "shipyard.pipeline": target.pipeline,
         "shipyard.environment": "production"},
    ]  # fmt: skip
    ids = [
        docker_engine.containers.run(
            BUSYBOX, ["sleep", "60"], detach=True, network_mode="none",
            labels={**target.labels, **labels, "shipyard.port": str(slots[0])},
        ).id
        for labels in others
    ]  # fmt: skip
    # A container that merely has the name the new version wants.
    docker_engine.containers.run(
        BUSYBOX, ["sleep", "60"], detach=True, network_mode="none", name=f"{S}-v2",
        labels=target.labels,
    )  # fmt: skip
    assert target.run(service(target, None, "v1", slots), version="v1").status is Status.SUCCEEDED
    out = target.run(service(target, None, "v2", slots), version="v2")
    assert out.status is Status.FAILED
    assert f"a container named '{S}-v2' already exists and does not belong to service" in (
        out.result.error
    )
    assert f"{S}-v1 was restarted" not in out.result.error  # refused before stopping it
    assert docker_engine.containers.get(f"{S}-v2").status == "running"
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]
    assert docker_engine.containers.get(f"{S}-v1").attrs["RestartCount"] == 0
    for cid in ids:
        assert docker_engine.containers.get(cid).status == "running"


@pytest.mark.docker
def test_rollback_reuses_the_earlier_image_through_the_same_path(
    docker_engine: Any, target: Target, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """deploy v1, deploy v2, `rollback`: the real rollback runs the service step with v1."""
    S = target.service
    slots = free_ports(2)
    nginx = start_nginx(tmp_path, S, slots[0])
    pipeline = target.pipeline
    try:
        project = tmp_path / "project"
        project.mkdir()
        router = (
            f"sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r}, "
            f"pid_file={str(nginx.pid_file)!r})"
        )
        (project / "pipelines.py").write_text(
            textwrap.dedent(
                f"""
                import shipyard as sy

                @sy.pipeline(name={pipeline!r})
                def web(d):
                    return [sy.stage("release", sy.docker.service(
                        {S!r}, image=f"{WEB}:{{d.version}}", slots={slots!r},
                        health_check=sy.health_check("/healthz", timeout=5), drain=0.3,
                        stop_timeout=2, labels={target.labels!r}, router={router}))]
                """
            )
        )
        monkeypatch.chdir(project)
        manager = sy.DeploymentManager(project / "pipelines.py", history=tmp_path / "h.db")
        try:
            first = manager.wait(manager.deploy(pipeline, "v1", "staging"), timeout=60)
            assert first["status"] == "succeeded", first["error"]
            second = manager.wait(manager.deploy(pipeline, "v2", "staging"), timeout=60)
            assert second["status"] == "succeeded", second["error"]
            assert nginx.get() == (200, "version v2")
            with Traffic(f"http://127.0.0.1:{nginx.port}/") as traffic:
                back = manager.wait(manager.rollback(second["id"]), timeout=60)
                switched = time.monotonic()
                time.sleep(0.3)
        finally:
            manager.close()
        assert back["status"] == "succeeded", back["error"]
        assert back["version"] == "v1"
        assert back["rollback_of"] == second["id"]
        assert traffic.failures() == []
        assert traffic.after(switched) == {(200, "version v1")}
        live = {
            c.name: c.labels
            for c in test_containers(docker_engine, **{"shipyard.pipeline": pipeline})
        }
        assert list(live) == [f"{S}-v1"]
        assert live[f"{S}-v1"]["shipyard.deployment"] == str(back["id"])
        assert live[f"{S}-v1"]["shipyard.port"] == str(slots[0])
        image = docker_engine.containers.get(f"{S}-v1").image
        assert f"{WEB}:v1" in image.tags
    finally:
        stop_nginx(nginx)


# -- what a kill -9 leaves (issue 12, item 2) ---------------------------------------------------------

SHIPYARD_EXE = Path(sys.executable).parent / "shipyard"


class KilledProject:
    """A project whose deploys run as real `shipyard` processes, to be killed with kill -9.

    Pipeline ``target.pipeline``: a docker.service, behind ``nginx`` (or with no router);
    ``<pipeline>-task``: a docker.run of a container that sleeps.
    """

    def __init__(self, tmp_path: Path, target: Target, nginx: NginxServer | None) -> None:
        self.root = tmp_path / "project"
        self.root.mkdir()
        self.target, self.nginx = target, nginx
        slots = nginx.slots if nginx is not None else free_ports(2)  # type: ignore[attr-defined]
        router = "None" if nginx is None else (
            f"sy.nginx({str(nginx.include_dir)!r}, nginx={NGINX!r}, args={nginx.args!r}, "
            f"pid_file={str(nginx.pid_file)!r})"
        )  # fmt: skip
        (self.root / "pipelines.py").write_text(textwrap.dedent(f"""
            import shipyard as sy

            @sy.pipeline(name={target.pipeline!r}, rollback="auto")
            def web(d):
                return [sy.stage("release", sy.docker.service(
                    {target.service!r}, image=f"{WEB}:{{d.version.split('-')[0]}}",
                    slots={slots!r}, labels={target.labels!r}, router={router},
                    health_check=sy.health_check(d.vars.get("health", "/healthz"), timeout=60,
                                                 interval=0.2),
                    drain=float(d.vars.get("drain", "0.2")), stop_timeout=2))]

            @sy.pipeline(name={target.pipeline + "-task"!r})
            def task(d):
                return [sy.stage("run", sy.docker.run({BUSYBOX!r}, ["sleep", "120"],
                                                      labels={target.labels!r}, name="sleeper"))]
            """))  # fmt: skip
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("SHIPYARD_")}

    def argv(self, *args: str) -> list[str]:
        return [str(SHIPYARD_EXE), "--history", str(self.root / "h.db"), *args]

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(*args), cwd=self.root, env=self.env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip

    def kill_9_during(self, *args: str, once: Any, what: str) -> None:
        """Run ``shipyard *args`` and kill -9 it as soon as ``once()`` is true."""
        cli = subprocess.Popen(self.argv(*args), cwd=self.root, env=self.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        try:
            deadline = time.monotonic() + 60
            while not once():
                assert cli.poll() is None, f"shipyard {' '.join(args)} ended before {what}"
                assert time.monotonic() < deadline, f"timed out waiting for {what}"
                time.sleep(0.1)
        finally:
            cli.kill()
            cli.wait(10)


@pytest.mark.docker
def test_kill_9_before_the_switch_removes_the_new_container(
    docker_engine: Any, target: Target, nginx: NginxServer, tmp_path: Path
) -> None:
    S = target.service
    p = KilledProject(tmp_path, target, nginx)
    first = p.run("deploy", target.pipeline, "v1", "-e", "staging")
    assert first.returncode == 0, first.stdout + first.stderr
    assert nginx.get() == (200, "version v1")
    # v2 never gets healthy here (a path it does not serve): kill -9 while it is checked.
    p.kill_9_during(
        "deploy", target.pipeline, "v2", "-e", "staging", "--var", "health=/never",
        once=lambda: f"{S}-v2" in running_services(docker_engine, target), what="the new container",
    )  # fmt: skip
    assert set(running_services(docker_engine, target)) == {f"{S}-v1", f"{S}-v2"}

    # The next command records the deployment interrupted and settles what it left.
    status = p.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert (
        f"repair of #2: removed {S}-v2: it never served {S}; the router still sends it to {S}-v1"
        in status.stderr
    )
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]
    assert nginx.get() == (200, "version v1")
    logs = p.run("logs", "2")
    assert f"repair of #2: removed {S}-v2" in logs.stdout
    # ... so the next deployment runs normally (it failed with "2 running containers" before).
    again = p.run("deploy", target.pipeline, "v2", "-e", "staging")
    assert again.returncode == 0, again.stdout + again.stderr
    assert nginx.get() == (200, "version v2")
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]


@pytest.mark.docker
def test_kill_9_after_the_switch_retires_the_old_container(
    docker_engine: Any, target: Target, nginx: NginxServer, tmp_path: Path
) -> None:
    S = target.service
    p = KilledProject(tmp_path, target, nginx)
    assert p.run("deploy", target.pipeline, "v1", "-e", "staging").returncode == 0
    # Killed while draining v1: the router already sends traffic to v2. The step records the
    # switch just after the router made it, and logs "draining" after that.
    p.kill_9_during(
        "deploy", target.pipeline, "v2", "-e", "staging", "--var", "drain=60",
        once=lambda: f"draining {S}-v1" in p.run("logs", "2").stdout, what="the drain",
    )  # fmt: skip
    assert nginx.get() == (200, "version v2")
    status = p.run("history")
    assert status.returncode == 0, status.stdout + status.stderr
    assert (
        f"repair of #2: {S}-v2 already served {S}: removed the old container {S}-v1"
        in status.stderr
    )
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]
    assert nginx.get() == (200, "version v2")
    nxt = p.run("deploy", target.pipeline, "v1-again", "-e", "staging")
    assert nxt.returncode == 0, nxt.stdout + nxt.stderr
    assert nginx.get() == (200, "version v1")


@pytest.mark.docker
def test_kill_9_without_a_router_restarts_the_container_stopped_for_the_port(
    docker_engine: Any, target: Target, tmp_path: Path
) -> None:
    # No router: the old container stops first to free the port, then the new one starts on
    # it; killed before the new one is healthy, the repair removes it and starts the old one.
    S = target.service
    p = KilledProject(tmp_path, target, None)
    assert p.run("deploy", target.pipeline, "v1", "-e", "staging").returncode == 0
    p.kill_9_during(
        "deploy", target.pipeline, "v2", "-e", "staging", "--var", "health=/never",
        once=lambda: f"{S}-v2" in running_services(docker_engine, target), what="the new container",
    )  # fmt: skip
    assert list(running_services(docker_engine, target)) == [f"{S}-v2"]  # v1 was stopped
    status = p.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"repair of #2: removed {S}-v2: it never served {S}" in status.stderr
    assert f"repair of #2: started {S}-v1 again: it was stopped to free the port" in status.stderr
    assert list(running_services(docker_engine, target)) == [f"{S}-v1"]


@pytest.mark.docker
def test_kill_9_during_docker_run_removes_its_container(
    docker_engine: Any, target: Target, tmp_path: Path
) -> None:
    p = KilledProject(tmp_path, target, None)
    task = target.pipeline + "-task"

    def sleeper() -> list[Any]:
        return [c for c in test_containers(docker_engine, **{"shipyard.pipeline": task})
                if c.status == "running"]  # fmt: skip

    p.kill_9_during("deploy", task, "1", "-e", "staging", once=lambda: bool(sleeper()),
                    what="the container")  # fmt: skip
    (left,) = sleeper()
    status = p.run("status")
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"repair of #1: removed {left.name}, the container of step 'sleeper'" in status.stderr
    assert test_containers(docker_engine, **{"shipyard.pipeline": task}) == []
