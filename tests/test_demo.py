"""The README's demo: the repository's own pipelines.py deploys 1.0.0 then 1.0.1 (a real app)."""

from __future__ import annotations

import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def demo(shipyarder, alive):
    """A copy of the repository's pipelines.py and demo/; the app is stopped at the end."""
    shipyarder.copy(REPO / "pipelines.py")
    shipyarder.copy(REPO / "demo")
    yield shipyarder
    pidfile = shipyarder.path / "releases" / "app.pid"
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    stop = subprocess.run(
        [sys.executable, "demo/serve.py", "stop"],
        cwd=shipyarder.path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert stop.returncode == 0, stop.stderr
    if pid is not None:
        assert not alive(pid), f"the demo app (pid {pid}) is still running"


@pytest.mark.slow
def test_the_demo_deploys_two_versions(demo):
    port = str(free_port())
    for version in ("1.0.0", "1.0.1"):
        result = demo.run("deploy", "demo", version, "-e", "local", "--var", f"port={port}")
        assert result.exit_code == 0, result
        result.fnmatch_lines(
            [
                f"deploying demo {version} to local (deployment #*)",
                "[[]1/3] build",
                f"*built release {version}*",
                "[[]2/3] release",
                f"*started version {version} on http://127.0.0.1:{port}/*",
                "[[]3/3] verify",
                "*ok*app answers*",
                "deployment #* succeeded in *",
            ]
        )
        result.assert_outcomes(succeeded=4)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as resp:
            assert resp.read().decode() == f"version {version}"
    assert (demo.path / "releases" / "current").resolve() == demo.path / "releases" / "1.0.1"

    history = demo.run("history")
    assert history.exit_code == 0
    history.fnmatch_lines(
        [
            "ID  PIPELINE *",
            "#2  demo      1.0.1    local *succeeded*",
            "#1  demo      1.0.0 *succeeded*",
        ]
    )
    assert [(d["version"], d["status"]) for d in history.history] == [
        ("1.0.1", "succeeded"),
        ("1.0.0", "succeeded"),
    ]
    # The demo's own checkout was not touched: everything happened in the copy.
    assert demo.history_path.parent.parent == demo.path


def test_the_demo_says_when_its_port_is_taken(demo):
    # Issue 12, item 11: not "restart ok" followed by a puzzling failed check.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = str(squatter.getsockname()[1])
        result = demo.run("deploy", "demo", "1.0.0", "-e", "local", "--var", f"port={port}")
    assert result.exit_code == 1, result
    result.fnmatch_lines(
        [
            f"*127.0.0.1:{port} cannot be used (*): another program listens there. Pick a free "
            "port for the demo, e.g.: shipyard deploy demo 1.0.0 -e local --var port=8766",
            "*failed*restart app*",
        ]
    )
    assert "[3/3] verify" not in result.stdout  # stopped at the cause, not at a puzzling check
