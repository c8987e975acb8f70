"""The built-in ``nginx`` router, driving a real nginx in a temporary folder.

The upstreams are two tiny HTTP servers in this process ("blue" and "green"), so these tests need
nginx but no Docker engine.
"""

from __future__ import annotations

import asyncio
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import shipyard as sy
from docker_fixtures import NGINX
from docker_fixtures import NginxServer
from docker_fixtures import start_nginx
from docker_fixtures import stop_nginx
from shipyard import PipelineDefinitionError
from shipyard import StepFailed
from shipyard._plugins import ShipyardPluginManager
from shipyard.plugins.nginx import NginxRouter

pytestmark = pytest.mark.skipif(not Path(NGINX).exists(), reason="nginx is not installed")


class FakeContext:
    """The part of a StepContext a router uses: ``log``."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def log(self, text: str, stream: str = "stdout") -> None:
        self.lines.append(text)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = self.server.body  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def upstreams() -> Iterator[dict[str, int]]:
    """Two HTTP servers answering "blue" and "green": their ports by name."""
    servers = {}
    for name in ("blue", "green"):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        server.body = name.encode()  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[name] = server
    yield {name: s.server_address[1] for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture
def nginx(tmp_path: Path, upstreams: dict[str, int]) -> Iterator[NginxServer]:
    server = start_nginx(tmp_path, "web", upstreams["blue"])
    yield server
    stop_nginx(server)


def switch(router: NginxRouter, port: int, context: FakeContext | None = None) -> bool:
    return asyncio.run(router.switch("web", port, context or FakeContext()))  # type: ignore[arg-type]


def test_render_and_paths(tmp_path: Path) -> None:
    router = sy.nginx(tmp_path / "conf.d")
    assert router.path_for("web") == tmp_path / "conf.d" / "web.conf"
    assert sy.nginx(tmp_path / "one.conf").path_for("web") == tmp_path / "one.conf"
    text = router.render("web", 8082)
    assert "upstream shipyard_web {\n    server 127.0.0.1:8082;\n}\n" in text
    assert "upstream api_v2 {" in sy.nginx(tmp_path, upstream="api_v2").render("api", 1)
    assert router.test_cmd == ["nginx", "-t", "-q"]
    assert router.reload_cmd == ["nginx", "-s", "reload"]
    custom = sy.nginx(tmp_path, nginx="/opt/nginx", args=["-c", "/srv/n.conf"])
    assert custom.test_cmd == ["/opt/nginx", "-c", "/srv/n.conf", "-t", "-q"]
    assert custom.reload_cmd == ["/opt/nginx", "-c", "/srv/n.conf", "-s", "reload"]
    assert router.describe() == f"nginx({tmp_path / 'conf.d'})"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"conf_path": ""}, "conf_path must be"),
        ({"conf_path": "/x", "reload_cmd": "nginx -s reload"}, "reload_cmd must be a list"),
        ({"conf_path": "/x", "upstream": "a b"}, "upstream must be"),
    ],
    ids=["empty-path", "string-command", "bad-upstream"],
)
def test_definition_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PipelineDefinitionError) as info:
        sy.nginx(**kwargs)
    assert message in str(info.value)


def test_switch_writes_validates_reloads(nginx: NginxServer, upstreams: dict[str, int]) -> None:
    assert nginx.get() == (200, "blue")
    router = nginx.router()
    ctx = FakeContext()
    # With the pid file, a switch returns once nginx runs the new configuration: each request
    # right after it reaches the new upstream.
    for _ in range(5):
        assert switch(router, upstreams["green"], ctx) is True
        assert nginx.get() == (200, "green")
        assert switch(router, upstreams["blue"], ctx) is True
        assert nginx.get() == (200, "blue")
    assert f"server 127.0.0.1:{upstreams['blue']};" in nginx.upstream_file.read_text()
    assert any("reloaded" in line for line in ctx.lines)
    # The file is replaced atomically: no temporary file is left beside it.
    assert sorted(p.name for p in nginx.include_dir.iterdir()) == ["web.conf"]


def test_switch_to_the_current_port_changes_nothing(
    nginx: NginxServer, upstreams: dict[str, int]
) -> None:
    router = nginx.router(reload_cmd=["false"])  # would fail if it ran
    before = nginx.upstream_file.stat().st_mtime_ns
    ctx = FakeContext()
    assert switch(router, upstreams["blue"], ctx) is True
    assert nginx.upstream_file.stat().st_mtime_ns == before
    assert "already sends web" in ctx.lines[0]


def test_failed_validation_restores_the_previous_file(
    nginx: NginxServer, upstreams: dict[str, int]
) -> None:
    before = nginx.upstream_file.read_bytes()
    (nginx.include_dir / "zz-broken.conf").write_text("this_is_not_a_directive on;\n")
    ctx = FakeContext()
    with pytest.raises(StepFailed) as info:
        switch(nginx.router(), upstreams["green"], ctx)
    message = info.value.message
    assert "-t -q` failed to validate the configuration (exit code 1)" in message
    assert 'unknown directive "this_is_not_a_directive"' in message
    assert "the previous upstream file was restored" in message
    assert nginx.upstream_file.read_bytes() == before
    assert sorted(p.name for p in nginx.include_dir.iterdir()) == ["web.conf", "zz-broken.conf"]
    assert any("restored the previous" in line for line in ctx.lines)
    assert nginx.get() == (200, "blue")  # never reloaded


def test_failed_reload_restores_the_previous_file(
    nginx: NginxServer, upstreams: dict[str, int]
) -> None:
    before = nginx.upstream_file.read_bytes()
    router = nginx.router(reload_cmd=["sh", "-c", "echo 'nginx: [error] no pid' >&2; exit 1"])
    with pytest.raises(StepFailed) as info:
        switch(router, upstreams["green"])
    assert "failed to reload (exit code 1)" in info.value.message
    assert "no pid" in info.value.message
    assert nginx.upstream_file.read_bytes() == before
    assert nginx.get() == (200, "blue")


def test_failed_first_switch_leaves_no_file(tmp_path: Path) -> None:
    router = sy.nginx(tmp_path / "conf.d", test_cmd=["false"])
    with pytest.raises(StepFailed):
        switch(router, 8081)
    assert list((tmp_path / "conf.d").iterdir()) == []


def test_missing_nginx_is_explained(tmp_path: Path) -> None:
    router = sy.nginx(tmp_path, nginx=str(tmp_path / "no-nginx"))
    with pytest.raises(StepFailed) as info:
        switch(router, 8081)
    assert "cannot run" in info.value.message
    assert "is nginx installed" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_the_hook_handles_nginx_routers_only(tmp_path: Path) -> None:
    pm = ShipyardPluginManager()
    pm.load(autoload=False)
    pm.finish_loading()
    ctx: Any = FakeContext()
    assert pm.router_switch(object(), "web", 8081, ctx) is None
    router = sy.nginx(tmp_path, test_cmd=["true"], reload_cmd=["true"])
    result = pm.router_switch(router, "web", 8081, ctx)
    assert result is not None
    assert not isinstance(result, bool)
    assert asyncio.run(result) is True  # type: ignore[arg-type]
    assert "server 127.0.0.1:8081;" in (tmp_path / "web.conf").read_text()
