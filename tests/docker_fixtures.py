"""Fixtures for tests that use a real Docker engine and a real nginx.

Import the fixtures you use into the test module: ``from docker_fixtures import
docker_engine_fixture`` provides the fixture ``docker_engine`` (the ``name=`` of each fixture), so
test arguments do not shadow the imports.

A test that needs the engine carries ``@pytest.mark.docker`` and uses :func:`docker_engine`.
When no engine answers, that is a failure (CI must have one; ``.ci/docker-up.sh`` starts it),
unless ``SHIPYARD_ALLOW_NO_DOCKER=1`` is set for a local run, which skips instead.

Every container a test creates is labelled ``shipyard.test=1`` and removed after the test;
nginx runs in the test's temporary folder on a free loopback port and is stopped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest
from shipyard._events import Event
from shipyard._events import EventBus
from shipyard._events import StepFinished
from shipyard._events import StepOutput
from shipyard._pipeline import Deployment
from shipyard._pipeline import Stage
from shipyard._pipeline import Step
from shipyard._plugins import ShipyardPluginManager
from shipyard._reports import Status
from shipyard._reports import StepResult
from shipyard._runner import Runner
from shipyard._secrets import SecretValues

#: The label every test container carries, so teardown finds them all.
TEST_LABELS = {"shipyard.test": "1"}
BUSYBOX = "shipyard-test/busybox:latest"
WEB = "shipyard-test/web"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"


def free_port() -> int:
    """A TCP port nothing listens on right now (on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_ports(n: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < n:
        ports.add(free_port())
    return sorted(ports)


def http_get(url: str, timeout: float = 2.0) -> tuple[int, str]:
    """``(status, body)`` of a GET on a fresh connection; raises on connection errors."""
    req = urllib.request.Request(url, headers={"Connection": "close"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


# -- the engine -----------------------------------------------------------------------------------


def _engine_problem() -> str | None:
    try:
        import docker
    except ImportError:
        return "the Docker SDK is not installed (pip install 'shipyard[docker]')"
    try:
        client = docker.from_env(timeout=10)
    except Exception as exc:
        where = os.environ.get("DOCKER_HOST") or "the default socket"
        return f"no Docker engine answers at {where}: {exc}"
    try:
        client.ping()
        missing = [
            image
            for image in (BUSYBOX, f"{WEB}:v1", f"{WEB}:v2", f"{WEB}:broken")
            if not client.images.list(name=image)
        ]
    finally:
        client.close()
    if missing:
        return f"the test images {', '.join(missing)} are missing; run bash .ci/docker-up.sh"
    return None


@pytest.fixture(scope="session", name="docker_session")
def docker_session_fixture() -> Iterator[Any]:
    problem = _engine_problem()
    if problem:
        if os.environ.get("SHIPYARD_ALLOW_NO_DOCKER") == "1":
            pytest.skip(f"{problem} (SHIPYARD_ALLOW_NO_DOCKER=1)")
        pytest.fail(
            f"{problem}. Tests marked 'docker' need an engine: run bash .ci/docker-up.sh, or set "
            "SHIPYARD_ALLOW_NO_DOCKER=1 to skip them locally",
            pytrace=False,
        )
    import docker

    client = docker.from_env(timeout=30)
    yield client
    client.close()


def test_containers(client: Any, **labels: str) -> list[Any]:
    """The containers (also stopped ones) labelled as test containers (and with ``labels``)."""
    import docker

    wanted = {**TEST_LABELS, **labels}
    filters = {"label": [f"{k}={v}" for k, v in wanted.items()]}
    # The SDK lists ids, then inspects each: a container removed in between (by the deployment
    # under test, or a test on the other worker) is a 404 that says nothing; ask again.
    for _ in range(20):
        try:
            return list(client.containers.list(all=True, filters=filters))
        except docker.errors.NotFound:
            continue
    return list(client.containers.list(all=True, filters=filters))


test_containers.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(name="docker_engine")
def docker_engine_fixture(docker_session: Any, target: Target) -> Iterator[Any]:
    """A Docker SDK client; the test's containers (``target.labels``) are removed after it.

    Only the test's own: with ``pytest -n``, other tests' containers run at the same time.
    """
    yield docker_session
    for c in test_containers(docker_session, **target.labels):
        try:
            c.remove(force=True)
        except Exception:
            pass


# -- running steps through the real runner --------------------------------------------------------


@dataclass
class Outcome:
    """What a deployment run by :func:`run_steps` produced."""

    status: Status
    error: str | None
    results: list[StepResult] = field(default_factory=list)
    #: Every line of output, as ``(stream, text)``.
    lines: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    #: Every event's payload (``Event.to_dict()``), in order.
    events: list[dict[str, Any]] = field(default_factory=list)

    @property
    def result(self) -> StepResult:
        return self.results[-1]

    def text(self) -> str:
        return "\n".join(t for _, t in self.lines)


class _Collector:
    def __init__(self, outcome: Outcome) -> None:
        self.outcome = outcome

    def handle(self, event: Event) -> None:
        self.outcome.events.append(event.to_dict())
        if isinstance(event, StepOutput):
            self.outcome.lines.extend((ln.stream, ln.text) for ln in event.lines)
        elif isinstance(event, StepFinished):
            self.outcome.results.append(event.result)


def _pluginmanager() -> ShipyardPluginManager:
    pm = ShipyardPluginManager()
    pm.load(autoload=False)
    pm.finish_loading()
    return pm


@dataclass
class Target:
    """The pipeline, environment and service name a test deploys (unique per test).

    Container names are global on the engine, so each test's service has a name of its own.
    """

    pipeline: str = field(default_factory=lambda: f"t{secrets.token_hex(4)}")
    service: str = field(default_factory=lambda: f"web{secrets.token_hex(3)}")
    run_id: str = field(default_factory=lambda: secrets.token_hex(6))
    environment: str = "staging"
    next_id: int = field(default_factory=lambda: 1000 + secrets.randbelow(10**6))

    @property
    def labels(self) -> dict[str, str]:
        """Labels for every container of the test: ``shipyard.test=1`` and the test's own id."""
        return {**TEST_LABELS, "shipyard.test.run": self.run_id}

    async def arun(
        self,
        *steps: Step,
        version: str = "v1",
        rollback_of: int | None = None,
        secret_values: dict[str, str] | None = None,
        rootdir: Path | None = None,
    ) -> Outcome:
        outcome = Outcome(Status.PENDING, None)
        pm = _pluginmanager()
        runner = Runner(
            pluginmanager=pm,
            bus=EventBus([_Collector(outcome)], pm),
            secrets=SecretValues.load(list(secret_values or {}), environ=secret_values or {}),
            rootdir=rootdir,
            grace=1.0,
        )
        self.next_id += 1
        d = Deployment(
            self.next_id, self.pipeline, version, self.environment, rollback_of=rollback_of
        )
        start = time.monotonic()
        outcome.status, outcome.error = await runner.run(d, [Stage("deploy", list(steps))])
        outcome.seconds = time.monotonic() - start
        return outcome

    def run(self, *steps: Step, **kwargs: Any) -> Outcome:
        return asyncio.run(self.arun(*steps, **kwargs))


@pytest.fixture(name="target")
def target_fixture() -> Target:
    """A pipeline and environment of the test's own."""
    return Target()


# -- nginx ----------------------------------------------------------------------------------------


_NGINX_CONF = """\
worker_processes 1;
daemon off;
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log notice;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/tmp/body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;
    include {prefix}/shipyard/*.conf;
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://shipyard_{service};
        }}
    }}
}}
"""


@dataclass
class NginxServer:
    """A private nginx: its own prefix, config, pid file and error log in a temporary folder."""

    prefix: Path
    conf: Path
    port: int
    service: str
    proc: subprocess.Popen[bytes]

    @property
    def include_dir(self) -> Path:
        return self.prefix / "shipyard"

    @property
    def upstream_file(self) -> Path:
        return self.include_dir / f"{self.service}.conf"

    @property
    def pid_file(self) -> Path:
        return self.prefix / "nginx.pid"

    @property
    def args(self) -> list[str]:
        return ["-c", str(self.conf), "-p", str(self.prefix)]

    def router(self, **kwargs: Any) -> Any:
        import shipyard

        return shipyard.nginx(
            self.include_dir, nginx=NGINX, args=self.args, pid_file=self.pid_file, **kwargs
        )

    def get(self, path: str = "/") -> tuple[int, str]:
        return http_get(f"http://127.0.0.1:{self.port}{path}")

    def error_log(self) -> str:
        try:
            return (self.prefix / "error.log").read_text()
        except OSError:
            return ""


def start_nginx(tmp_path: Path, service: str, initial_port: int) -> NginxServer:
    """Start nginx proxying ``service`` (its upstream seeded with ``initial_port``)."""
    from shipyard.plugins.nginx import NginxRouter

    prefix = tmp_path / "nginx"
    (prefix / "tmp").mkdir(parents=True)
    (prefix / "shipyard").mkdir()
    (prefix / "logs").mkdir()  # nginx opens <prefix>/logs/error.log before reading the config
    port = free_port()
    conf = prefix / "nginx.conf"
    user = "user root;\n" if os.geteuid() == 0 else ""
    conf.write_text(_NGINX_CONF.format(prefix=prefix, port=port, service=service, user=user))
    # The upstream must exist before nginx first loads a config that proxies to it.
    seed = NginxRouter(prefix / "shipyard").render(service, initial_port)
    (prefix / "shipyard" / f"{service}.conf").write_text(seed)
    proc = subprocess.Popen(
        [NGINX, "-c", str(conf), "-p", str(prefix)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    server = NginxServer(prefix, conf, port, service, proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr else ""
            raise RuntimeError(f"nginx exited with {proc.returncode}: {err}{server.error_log()}")
        if server.pid_file.exists():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return server
            except OSError:
                pass
        time.sleep(0.02)
    stop_nginx(server)
    raise RuntimeError(f"nginx did not listen on 127.0.0.1:{port}: {server.error_log()}")


def stop_nginx(server: NginxServer) -> None:
    """Stop nginx and its workers (the whole process group); wait for them."""
    if server.proc.poll() is None:
        try:
            os.killpg(server.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            server.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
    if server.proc.stderr:
        server.proc.stderr.close()
    # Workers die with their master; make sure none is left in the group.
    try:
        os.killpg(server.proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class Load:
    """Steady requests through nginx from threads, each on a fresh connection; every answer
    with its time."""

    def __init__(self, url: str, threads: int = 1) -> None:
        self.url = url
        self.results: list[tuple[float, Any]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                answer: Any = http_get(self.url, timeout=5)
            except Exception as exc:
                answer = f"{type(exc).__name__}: {exc}"
            self.results.append((time.monotonic(), answer))

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(10)

    def failures(self, good: frozenset[str] = frozenset({"version v1", "version v2"})) -> list[Any]:
        return [
            a
            for _, a in self.results
            if not (isinstance(a, tuple) and a[0] == 200 and a[1] in good)
        ]

    def bodies_after(self, mark: float) -> set[str]:
        return {a[1] for t, a in self.results if t > mark and isinstance(a, tuple)}

    def after(self, mark: float) -> set[Any]:
        return {a for t, a in self.results if t > mark}
